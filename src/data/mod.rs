//! Training data: Megatron indexed datasets (`.bin`/`.idx`) and how samples
//! are drawn from weighted blends of them (used by `distill` and `eval`, and
//! written by `nemo-tool data make`).

pub mod indexed;
pub mod sampling;

pub use indexed::{Builder, IndexedDataset, TokenType};
pub use sampling::{Blend, BlendedSamples, GptSamples, Split};
