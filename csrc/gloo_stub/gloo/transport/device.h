// See rendezvous/store.h: declaration-only gloo stub.
#pragma once
#include <gloo/rendezvous/store.h>
