//! The distillation compute engine (feature `distill`): a Megatron-Core GPT on libtorch (tch)
//! with tensor parallelism over c10d, weights streamed from any checkpoint layout, and the
//! vocab-parallel knowledge-distillation losses. Design: docs/distill-engine.md. Around it,
//! the `nemo-tool distill` job: config resolution ([`job`]), optimizer ([`optim`]), training
//! loop ([`train`]), checkpoints ([`state`]) and the saved student ([`save`]); docs/distill.md.

pub mod eval;
mod ffi;
pub mod flops;
pub mod job;
pub mod loss;
pub mod model;
pub mod optim;
pub mod parallel;
pub mod rope;
pub mod save;
pub mod spec;
pub mod state;
pub mod train;
pub mod weights;
