//! Integration tests: one binary, a module per concern.

mod bad_input;
mod convert;
mod fuzz_smoke;
mod kill;
mod obs;
mod reshard;
mod roundtrip;
mod tar_interop;
mod torch_samples;
mod tree;
mod validate;
