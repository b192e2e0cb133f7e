//! PyTorch serialization: the restricted pickle VM and emitter, the zip
//! container torch.save uses, and tensor views over its storages.
//!
//! * [`pickle`]: data-only pickle reader with a global allowlist ([`Policy`]).
//! * [`value`]: the [`Value`] tree it produces ([`Value::Tensor`] nodes come from [`file::load`]).
//! * [`emit`]: protocol-2, weights_only-safe pickle writer.
//! * [`zip`]: stored-record zip reader over a [`ByteView`](crate::io::bytes::ByteView) and a
//!   miniz-identical writer.
//! * [`tensor`]: strided tensor views over storages ([`TensorRef`], over [`crate::io::piece::Piece`]s).
//! * [`file`](mod@file): whole `torch.save` files: [`load`] and [`save`].

pub mod dtype;
pub mod emit;
pub mod file;
pub mod pickle;
mod pickle_text;
pub mod policy;
pub mod tensor;
pub mod value;
pub mod zip;

pub use dtype::Dtype;
pub use file::{load, load_file, save, TorchFile};
pub use pickle::Policy;
pub use tensor::{StorageRef, TensorKind, TensorRef};
pub use value::{Construct, Global, Object, Value};
