//! The layout-independent checkpoint model: config, artifacts, layout and
//! tensors that know their per-rank pieces, over any of the four layouts.

pub mod detect;

pub use detect::{Detected, Variant};
