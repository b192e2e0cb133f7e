//! Generators and entry points for tests, benchmarks and fuzzing: synthetic
//! Megatron-Core checkpoints (`synth`) and one-parser-over-untrusted-bytes
//! entry points for cargo-fuzz (`hostile`).

pub mod hostile;
pub mod synth;
