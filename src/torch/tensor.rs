//! Tensor views over torch storages: dtype, shape, strides and offset over a
//! shared [`ByteView`] of the whole storage record, checked to fit, with
//! zero-copy access to the logical row-major bytes as [`Piece`]s.

use crate::bytes::ByteView;
use crate::torch::dtype::Dtype;
use crate::torch::value::{Global, Value};

/// One storage record (`data/<key>`): the whole storage, shared by every view on it.
#[derive(Debug, Clone)]
pub struct StorageRef {
    /// Storage key (`"0"`, `"1"`, ...): the record is `data/<key>`.
    pub key: String,
    /// The whole record's bytes.
    pub bytes: ByteView,
    /// Device string from the pickle (`cpu`, `cuda:0`).
    pub location: String,
}

/// How the tensor was wrapped in the pickle.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorKind {
    /// A plain tensor (`_rebuild_tensor_v2/v3`).
    Plain,
    /// `nn.Parameter` (`_rebuild_parameter`, or `_rebuild_parameter_with_state` when `state` is set).
    Parameter {
        /// Python attribute state, if any.
        state: Option<Box<Value>>,
    },
    /// A subclass or a tensor with a `__dict__` (`_rebuild_from_type_v2(func, class, args, state)`).
    FromType {
        /// The Python type.
        class: Global,
        /// Its state dict.
        state: Box<Value>,
    },
}

/// A tensor: a strided view over a storage.
#[derive(Debug, Clone)]
pub struct TensorRef {
    /// Element type.
    pub dtype: Dtype,
    /// Sizes.
    pub shape: Vec<u64>,
    /// Strides, in elements.
    pub stride: Vec<u64>,
    /// Offset of element 0 in the storage, in elements.
    pub storage_offset: u64,
    /// The storage.
    pub storage: StorageRef,
    /// `requires_grad` flag.
    pub requires_grad: bool,
    /// Plain tensor, parameter or subclass.
    pub kind: TensorKind,
}

impl PartialEq for TensorRef {
    /// Equal when metadata, storage key and storage bytes are equal.
    fn eq(&self, o: &TensorRef) -> bool {
        self.dtype == o.dtype
            && self.shape == o.shape
            && self.stride == o.stride
            && self.storage_offset == o.storage_offset
            && self.storage.key == o.storage.key
            && self.storage.location == o.storage.location
            && self.storage.bytes.as_slice() == o.storage.bytes.as_slice()
            && self.requires_grad == o.requires_grad
            && self.kind == o.kind
    }
}

/// A piece of a tensor's logical bytes.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Bytes taken (not copied) from a storage.
    Bytes(ByteView),
    /// This many zero bytes.
    Zeros(u64),
}
