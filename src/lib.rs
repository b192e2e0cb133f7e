#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod bytes;
pub mod checkpoint;
pub mod inspect;
pub mod layout;
pub mod members;
pub mod mmap;
pub mod tokenizer;
pub mod torch;
