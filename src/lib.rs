#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod archive;
pub mod bytes;
pub mod canonical;
pub mod checkpoint;
pub mod checksum;
pub mod config;
pub mod dcp;
pub mod dcp_write;
pub mod diff;
pub mod dist;
pub mod hostile;
pub mod inspect;
pub mod layout;
pub mod members;
pub mod mmap;
pub mod numeric;
pub mod outdir;
pub mod output;
pub mod plan;
pub mod synth;
pub mod tar_write;
pub mod tokenizer;
pub mod torch;
pub mod validate;
pub mod zarr;
