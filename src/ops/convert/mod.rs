//! `nemo-tool convert`: Hugging Face Llama-family folders <-> `.nemo`, and
//! per-rank <-> distributed (`torch_dist`) weight layouts. Every path goes
//! through [`canonical::Canonical`], the TP=1 model as zero-copy pieces, so
//! tensors stream from the input mapping into the output without being
//! materialised.

pub mod canonical;
pub mod dist_out;
pub mod hf;
pub mod hf_config;
pub mod ops;
pub mod tensor;
pub mod write_nemo;

pub use ops::{hf_to_nemo, nemo_to_dist, nemo_to_hf, nemo_to_per_rank, FromHf, Summary, ToHf};
