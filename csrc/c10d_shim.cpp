// extern "C" shim over libtorch's c10d: TCPStore rendezvous, ProcessGroupGloo, and blocking
// collectives on any c10d::Backend (Gloo here, NCCL from c10d_nccl.cpp).
// Tensor handles are tch's C_tensor*, i.e. at::Tensor*. Every int-returning function gives 0,
// or -1 with nemo_shim_last_error() set; pointer-returning ones give nullptr on error.
#include "shim.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <stdexcept>
#include <string>
#include <vector>

namespace nemo_shim {

namespace {
thread_local std::string g_last_error;

c10d::ReduceOp to_op(int op) {
  switch (op) {
    case 0: return c10d::ReduceOp::SUM;
    case 1: return c10d::ReduceOp::AVG;
    case 2: return c10d::ReduceOp::PRODUCT;
    case 3: return c10d::ReduceOp::MIN;
    case 4: return c10d::ReduceOp::MAX;
    default: throw std::invalid_argument("reduce op " + std::to_string(op) + " is not 0..4");
  }
}

void all_reduce(Pg* pg, at::Tensor& t, int op) {
  std::vector<at::Tensor> v{t};
  c10d::AllreduceOptions o;
  o.reduceOp = to_op(op);
  pg->b->allreduce(v, o)->wait();
}
}  // namespace

void set_error(const std::string& msg) { g_last_error = msg; }

namespace {
std::mutex g_registry_mu;
std::unordered_map<int64_t, Pg> g_registry;
int64_t g_next_id = 1;
}  // namespace

Pg* new_pg(c10::intrusive_ptr<c10d::Backend> b, int rank, int world) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  Pg* pg = new Pg{std::move(b), rank, world, g_next_id++};
  g_registry.emplace(pg->id, *pg);
  return pg;
}

void free_pg(Pg* pg) {
  if (!pg) return;
  {
    std::lock_guard<std::mutex> lock(g_registry_mu);
    g_registry.erase(pg->id);
  }
  delete pg;
}

Pg lookup_pg(int64_t id) {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto it = g_registry.find(id);
  if (it == g_registry.end()) {
    throw std::runtime_error("tensor-parallel backward: process group " + std::to_string(id) +
                             " was destroyed before the backward pass");
  }
  return it->second;
}

void all_reduce_sum(Pg* pg, at::Tensor& t) { all_reduce(pg, t, 0); }

}  // namespace nemo_shim

using nemo_shim::guard;
using nemo_shim::Pg;
using nemo_shim::Store;

extern "C" {

const char* nemo_shim_last_error() { return nemo_shim::g_last_error.c_str(); }

// is_server=1 serves the TCPStore from this process (rank 0 without torchrun). Under
// torchrun (TORCHELASTIC_USE_AGENT_STORE=True) the agent already serves it, so every rank
// connects as a client; the Rust side decides.
void* nemo_shim_store_new(const char* host, uint16_t port, int world_size, int is_server,
                          int64_t timeout_ms, const char* prefix) {
  Store* out = nullptr;
  guard([&] {
    c10d::TCPStoreOptions o;
    o.port = port;
    o.isServer = is_server != 0;
    o.numWorkers = world_size;
    // true on every rank: each one bumps the init counter the server waits on
    o.waitWorkers = true;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    o.multiTenant = true;
    c10::intrusive_ptr<c10d::Store> s = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
    // PrefixStore adds the '/' itself
    if (prefix && *prefix) s = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s);
    out = new Store{std::move(s)};
  });
  return out;
}

void nemo_shim_store_free(void* s) { delete static_cast<Store*>(s); }

// A view of `store` whose keys live under `prefix/` (torch's new_group does the same): a
// subgroup's backend rendezvouses there without a second TCP connection.
void* nemo_shim_store_prefixed(void* store, const char* prefix) {
  Store* out = nullptr;
  guard([&] {
    c10::intrusive_ptr<c10d::Store> base = static_cast<Store*>(store)->s;
    out = new Store{c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), base)};
  });
  return out;
}

void* nemo_shim_pg_gloo_new(void* store, int rank, int world_size, int64_t timeout_ms) {
  Pg* out = nullptr;
  guard([&] {
    auto opts = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    // as Python does: GLOO_SOCKET_IFNAME picks the interface, else the hostname's address
    // (falling back to loopback)
    const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
    if (ifname && *ifname) {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(static_cast<Store*>(store)->s, rank,
                                                          world_size, opts);
    out = nemo_shim::new_pg(pg, rank, world_size);
  });
  return out;
}

void nemo_shim_pg_free(void* pg) { nemo_shim::free_pg(static_cast<Pg*>(pg)); }

// Writes the backend name ("gloo", "nccl") into buf (NUL-terminated, truncated to cap).
int nemo_shim_pg_backend_name(void* pg, char* buf, size_t cap) {
  return guard([&] {
    std::string n = static_cast<Pg*>(pg)->b->getBackendName();
    if (cap == 0) return;
    size_t k = n.size() < cap - 1 ? n.size() : cap - 1;
    n.copy(buf, k);
    buf[k] = '\0';
  });
}

int nemo_shim_all_reduce(void* pg, at::Tensor* t, int op) {
  return guard([&] { nemo_shim::all_reduce(static_cast<Pg*>(pg), *t, op); });
}

int nemo_shim_broadcast(void* pg, at::Tensor* t, int root) {
  return guard([&] {
    std::vector<at::Tensor> v{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    static_cast<Pg*>(pg)->b->broadcast(v, o)->wait();
  });
}

// outs: world_size tensors shaped like `in`; rank i's tensor lands in outs[i].
int nemo_shim_all_gather(void* pg, at::Tensor** outs, int n_outs, at::Tensor* in) {
  return guard([&] {
    std::vector<std::vector<at::Tensor>> o(1);
    for (int i = 0; i < n_outs; ++i) o[0].push_back(*outs[i]);
    std::vector<at::Tensor> i{*in};
    static_cast<Pg*>(pg)->b->allgather(o, i)->wait();
  });
}

// out: in.numel() / world elements; rank r receives the reduction of every rank's r-th
// contiguous chunk of `in` (torch.distributed.reduce_scatter_tensor).
int nemo_shim_reduce_scatter(void* pg, at::Tensor* out, at::Tensor* in, int op) {
  return guard([&] {
    c10d::ReduceScatterOptions o;
    o.reduceOp = nemo_shim::to_op(op);
    static_cast<Pg*>(pg)->b->_reduce_scatter_base(*out, *in, o)->wait();
  });
}

// out: world x in.numel() elements, rank i's `in` at chunk i (all_gather_into_tensor).
int nemo_shim_all_gather_into(void* pg, at::Tensor* out, at::Tensor* in) {
  return guard([&] { static_cast<Pg*>(pg)->b->_allgather_base(*out, *in)->wait(); });
}

// Point-to-point (pipeline stages): blocking send of `t` to group rank `dst`, and receive into
// `t` from group rank `src`, matched by `tag`.
int nemo_shim_send(void* pg, at::Tensor* t, int dst, int tag) {
  return guard([&] {
    std::vector<at::Tensor> v{*t};
    static_cast<Pg*>(pg)->b->send(v, dst, tag)->wait();
  });
}

int nemo_shim_recv(void* pg, at::Tensor* t, int src, int tag) {
  return guard([&] {
    std::vector<at::Tensor> v{*t};
    static_cast<Pg*>(pg)->b->recv(v, src, tag)->wait();
  });
}

// Posts every send and receive at once, then waits for all (torch's batch_isend_irecv):
// a stage can send its activations forward while receiving gradients from the same
// neighbour without either side blocking the other. NCCL needs the ops coalesced into one
// group call; Gloo matches them by tag.
int nemo_shim_exchange(void* pg, at::Tensor** sends, const int* dsts, int n_send,
                       at::Tensor** recvs, const int* srcs, int n_recv, int tag) {
  return guard([&] {
    auto& b = static_cast<Pg*>(pg)->b;
    const bool coalesce = b->getBackendName() == "nccl";
    if (coalesce) b->startCoalescing();
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    for (int i = 0; i < n_send; ++i) {
      std::vector<at::Tensor> v{*sends[i]};
      works.push_back(b->send(v, dsts[i], tag));
    }
    for (int i = 0; i < n_recv; ++i) {
      std::vector<at::Tensor> v{*recvs[i]};
      works.push_back(b->recv(v, srcs[i], tag));
    }
    if (coalesce) {
      auto w = b->endCoalescing();
      if (w) w->wait();
    } else {
      for (auto& w : works)
        if (w) w->wait();
    }
  });
}

int nemo_shim_barrier(void* pg) {
  return guard([&] { static_cast<Pg*>(pg)->b->barrier()->wait(); });
}

}  // extern "C"
