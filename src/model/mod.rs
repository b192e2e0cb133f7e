//! The layout-independent model of a checkpoint: its `config`, the detected
//! `checkpoint` layout and its tensors, the TP/PP partition rules (`layout`,
//! data in `formats/*.yaml`), the TP=1 `canonical` view, the reshard `plan`,
//! and the true vocabulary from the `tokenizer`.

pub mod canonical;
pub mod checkpoint;
pub mod config;
pub mod layout;
pub mod plan;
pub mod tokenizer;
