#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod bytes;
pub mod config;
pub mod mmap;
pub mod torch;
