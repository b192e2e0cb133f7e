//! The `distill` and `eval` jobs. Always built: the run configuration with Hydra-style
//! overrides ([`runconfig`]), learning-rate [`schedule`]s, Megatron's blended dataset
//! [`sampling`], and TensorBoard / PNG [`obs`]ervability.
//!
//! With the feature `distill`, the compute engine: a Megatron-Core GPT on libtorch (tch) with
//! tensor parallelism over c10d (`model`, `parallel`), weights streamed from any checkpoint
//! layout through the canonical view (`weights`), the vocab-parallel knowledge-distillation
//! losses (`loss`), and around it the job: config resolution (`job`), optimizer (`optim`),
//! training loop (`train`), checkpoints (`state`), the saved student (`save`) and `eval`.
//! Design: docs/distill-engine.md, docs/distill.md.

#[cfg(feature = "distill")]
pub mod eval;
#[cfg(feature = "distill")]
mod ffi;
#[cfg(feature = "distill")]
pub mod flops;
#[cfg(feature = "distill")]
pub mod hidden_loss;
#[cfg(feature = "distill")]
pub mod job;
#[cfg(feature = "distill")]
pub mod loss;
#[cfg(feature = "distill")]
pub mod model;
#[cfg(feature = "distill")]
pub mod optim;
#[cfg(feature = "distill")]
pub mod parallel;
#[cfg(feature = "distill")]
pub mod pipeline;
#[cfg(feature = "distill")]
pub mod rope;
#[cfg(feature = "distill")]
pub mod save;
#[cfg(feature = "distill")]
pub mod spec;
#[cfg(feature = "distill")]
pub mod state;
#[cfg(feature = "distill")]
pub mod teacher_cache;
#[cfg(feature = "distill")]
pub mod train;
#[cfg(feature = "distill")]
pub mod weights;

// Job plumbing without libtorch (also used by `eval`, `data` and the CLI).
pub mod obs;
pub mod runconfig;
pub mod sampling;
pub mod schedule;
