//! The layout-independent model of a checkpoint: its `config`, the detected
//! `checkpoint` layout and its tensors, the TP/PP partition rules (`layout`,
//! data in `formats/*.yaml`), the TP=1 `canonical` view, the reshard `plan`,
//! the true vocabulary from the `tokenizer`, and `foreign`: NeMo 2, Megatron-Bridge and
//! Megatron-LM folders read through NeMo 1 names.

pub mod canonical;
pub mod checkpoint;
pub mod config;
pub mod foreign;
pub mod layout;
pub mod plan;
pub mod tokenizer;
