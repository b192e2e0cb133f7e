//! Integration tests (one binary; a module per area).

mod torch_samples;
