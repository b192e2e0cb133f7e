#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

// The data path, in order: bytes on disk (`io`) are parsed by `formats`
// (containers and serializations) into a layout-independent `model` of the
// checkpoint, which the commands in `ops` read, plan and write; `distill` is
// the libtorch training/eval job on top. Training data: raw text (`text`:
// corpus files and tokenizers) becomes Megatron indexed datasets
// (`formats::indexed`) through `ops::data_make`.

pub mod distill;
pub mod formats;
pub mod io;
pub mod model;
pub mod ops;
pub mod testkit;
pub mod text;
