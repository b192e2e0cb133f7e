//! `nemo-tool convert`: Hugging Face Llama-family folders <-> `.nemo`, and
//! per-rank <-> distributed (`torch_dist`) weight layouts. Every input is
//! read through the core canonical view ([`crate::model::canonical`]: an HF
//! folder becomes a TP=1 checkpoint of whole tensors, see [`hf`]); per-rank
//! output is `reshard`'s planner and writer; the HF and `torch_dist` writers
//! look tensors up in [`named::NamedModel`]. Tensors stream from the input
//! mapping into the output without being materialised.

pub mod dist_out;
pub mod hf;
pub mod hf_config;
pub mod mlm_out;
pub mod named;
pub mod nemo2_out;
pub mod ops;
pub mod tensor;

pub use mlm_out::{to_mlm, to_mlm_with, write_mlm};
pub use nemo2_out::{to_nemo2, write_nemo2};
pub use ops::{
    hf_checkpoint, hf_to_nemo, nemo_to_dist, nemo_to_hf, nemo_to_per_rank, FromHf, Summary, ToHf,
};
