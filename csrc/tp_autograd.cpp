// Megatron's tensor-parallel autograd mappings (megatron/core/tensor_parallel/mappings.py) as
// C++ torch::autograd::Functions, so their backward passes run inside libtorch's autograd
// engine when Rust calls backward(). Graph nodes keep the group's registry id (saved_data), not
// a pointer: a backward after the group was freed is an error, not a use-after-free.
#include "shim.h"

#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <vector>

using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

namespace nemo_shim {
namespace {

Pg pg_of(AutogradContext* ctx) { return lookup_pg(ctx->saved_data["pg"].toInt()); }

// Out-of-place all-reduce: the input may be saved by another node for its backward.
at::Tensor summed(Pg pg, const at::Tensor& x) {
  at::Tensor y = x.contiguous().clone();
  all_reduce_sum(&pg, y);
  return y;
}

at::Tensor gather_last(Pg pg, const at::Tensor& x) {
  at::Tensor in = x.contiguous();
  std::vector<std::vector<at::Tensor>> outs(1);
  for (int i = 0; i < pg.world; ++i) outs[0].push_back(at::empty_like(in));
  std::vector<at::Tensor> ins{in};
  pg.b->allgather(outs, ins)->wait();
  return at::cat(outs[0], -1);
}

// copy_to_tensor_model_parallel_region: identity forward, all-reduce backward. Used where a
// replicated activation enters a column-parallel layer: each rank's gradient covers only its
// output slice, the sum is the full gradient.
struct CopyToTp : public Function<CopyToTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t pg) {
    ctx->saved_data["pg"] = pg;
    return x;
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {summed(pg_of(ctx), g[0]), at::Tensor()};
  }
};

// reduce_from_tensor_model_parallel_region: all-reduce forward, identity backward. Used after
// a row-parallel layer (partial sums) and the vocab-parallel embedding.
struct ReduceFromTp : public Function<ReduceFromTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t pg) {
    (void)ctx;
    return summed(lookup_pg(pg), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    (void)ctx;
    return {g[0], at::Tensor()};
  }
};

// gather_from_tensor_model_parallel_region: all-gather along the last dim forward, keep this
// rank's slice backward.
struct GatherFromTp : public Function<GatherFromTp> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t pg) {
    ctx->saved_data["pg"] = pg;
    return gather_last(lookup_pg(pg), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    Pg pg = pg_of(ctx);
    auto parts = g[0].chunk(pg.world, -1);
    return {parts.at(pg.rank).contiguous(), at::Tensor()};
  }
};

// All-reduce (sum) forward and backward: for a quantity every rank's loss term depends on
// (the vocab-parallel softmax normaliser), when the total loss is the sum over ranks.
struct AllReduceBoth : public Function<AllReduceBoth> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, int64_t pg) {
    ctx->saved_data["pg"] = pg;
    return summed(lookup_pg(pg), x);
  }
  static variable_list backward(AutogradContext* ctx, variable_list g) {
    return {summed(pg_of(ctx), g[0]), at::Tensor()};
  }
};

template <typename F>
at::Tensor* apply(void* pg, at::Tensor* x) {
  at::Tensor* out = nullptr;
  guard([&] {
    out = new at::Tensor(F::apply(*x, static_cast<Pg*>(pg)->id));
  });
  return out;
}

}  // namespace
}  // namespace nemo_shim

extern "C" {

at::Tensor* nemo_shim_tp_copy(void* pg, at::Tensor* x) {
  return nemo_shim::apply<nemo_shim::CopyToTp>(pg, x);
}
at::Tensor* nemo_shim_tp_reduce(void* pg, at::Tensor* x) {
  return nemo_shim::apply<nemo_shim::ReduceFromTp>(pg, x);
}
at::Tensor* nemo_shim_tp_gather_last(void* pg, at::Tensor* x) {
  return nemo_shim::apply<nemo_shim::GatherFromTp>(pg, x);
}
at::Tensor* nemo_shim_tp_all_reduce(void* pg, at::Tensor* x) {
  return nemo_shim::apply<nemo_shim::AllReduceBoth>(pg, x);
}

}  // extern "C"
