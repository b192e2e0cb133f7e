//! The distillation compute engine (feature `distill`): a Megatron-Core GPT on libtorch (tch)
//! with tensor parallelism over c10d, weights streamed from any checkpoint layout, and the
//! vocab-parallel knowledge-distillation losses. Design: docs/distill-engine.md.

pub mod eval;
mod ffi;
pub mod loss;
pub mod model;
pub mod parallel;
pub mod rope;
pub mod spec;
pub mod weights;
