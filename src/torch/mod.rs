//! PyTorch serialization: the restricted pickle VM and emitter, the zip
//! container torch.save uses, and tensor views over its storages.

pub mod dtype;
pub mod emit;
pub mod pickle;
mod pickle_text;
pub mod tensor;
pub mod value;
pub mod zip;

pub use dtype::Dtype;
pub use pickle::{Policy, Value};
pub use tensor::{Piece, StorageRef, TensorKind, TensorRef};
pub use value::{Construct, Global, Object};
