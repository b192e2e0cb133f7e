//! PyTorch serialization: the restricted pickle VM and emitter, the zip
//! container torch.save uses, and tensor views over its storages.

pub mod dtype;

pub use dtype::Dtype;
