// ProcessGroupNCCL constructor (compiled only with the `cuda` feature). The collectives in
// c10d_shim.cpp and the autograd functions in tp_autograd.cpp work on any c10d::Backend, so
// only creation and device selection live here.
#include "shim.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>

#include <chrono>
#include <cstdio>

using nemo_shim::guard;

extern "C" {

void* nemo_shim_pg_nccl_new(void* store, int rank, int world_size, int64_t timeout_ms) {
  nemo_shim::Pg* out = nullptr;
  guard([&] {
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(
        static_cast<nemo_shim::Store*>(store)->s, rank, world_size, opts);
    out = nemo_shim::new_pg(pg, rank, world_size);
  });
  return out;
}

// torch.cuda.get_device_name(idx), for the MFU peak table.
int nemo_shim_cuda_device_name(int idx, char* buf, size_t cap) {
  return guard([&] {
    const cudaDeviceProp* p = at::cuda::getDeviceProperties(static_cast<c10::DeviceIndex>(idx));
    std::snprintf(buf, cap, "%s", p->name);
  });
}

// torch.cuda.set_device(local_rank): must precede the NCCL group's first collective.
int nemo_shim_cuda_set_device(int idx) {
  return guard([&] { c10::cuda::set_device(static_cast<c10::DeviceIndex>(idx)); });
}

}  // extern "C"
