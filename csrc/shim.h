// Shared declarations of the c10d shim's C++ files (not part of the extern "C" API).
#pragma once
#include <ATen/core/Tensor.h>
#include <torch/csrc/distributed/c10d/Backend.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <cstdint>
#include <string>

namespace nemo_shim {

// Opaque handles given to Rust.
struct Store {
  c10::intrusive_ptr<c10d::Store> s;
};
struct Pg {
  c10::intrusive_ptr<c10d::Backend> b;
  int rank;
  int world;
  int64_t id;  // key in the registry below; never reused
};

// Live groups by id. Autograd nodes keep only the id, so a backward pass that runs after its
// group was freed fails with an error instead of touching freed memory.
Pg* new_pg(c10::intrusive_ptr<c10d::Backend> b, int rank, int world);
void free_pg(Pg* pg);
// A copy of the live group `id` (holding a reference to the backend); throws if it is gone.
Pg lookup_pg(int64_t id);

// Records the message for nemo_shim_last_error (per thread).
void set_error(const std::string& msg);

// Runs f, turning any C++ exception into -1 plus a recorded message.
template <typename F>
int guard(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    set_error(e.what());
  } catch (...) {
    set_error("unknown C++ exception");
  }
  return -1;
}

// Blocking collectives on one tensor (in place), used by the autograd functions too.
void all_reduce_sum(Pg* pg, at::Tensor& t);

}  // namespace nemo_shim
