//! Tensor views over torch storages: dtype, shape, strides and offset over a
//! shared [`ByteView`] of the whole storage record, checked to fit, with
//! zero-copy access to the logical row-major bytes as [`Piece`]s.

use std::fmt;

use crate::formats::torch::dtype::Dtype;
use crate::formats::torch::value::{Global, Value};
use crate::io::bytes::ByteView;
use crate::io::piece::{concat, Piece, PieceIndex};

/// One storage record (`data/<key>`): the whole storage, shared by every view on it.
#[derive(Debug, Clone)]
pub struct StorageRef {
    /// Storage key (`"0"`, `"1"`, ...): the record is `data/<key>`. When
    /// saving, keys are reassigned in order of first use; tensors with the
    /// same key share one storage.
    pub key: String,
    /// The whole record's bytes (empty for a composed storage).
    pub bytes: ByteView,
    /// Device string from the pickle (`cpu`, `cuda:0`); saving always writes `cpu`.
    pub location: String,
    /// When non-empty, the storage content is these pieces in order and
    /// `bytes` is ignored: lets a writer stream a tensor assembled from
    /// slices of other files plus zero fill without materialising it.
    /// Readers never set it.
    pub composed: Vec<Piece>,
    /// Set by metadata-only loads ([`crate::formats::torch::file::load_metadata`]):
    /// the storage's size from the zip directory. Its bytes were never mapped,
    /// so `bytes` is empty and [`TensorRef::pieces`] refuses.
    pub unmapped_len: Option<u64>,
}

impl StorageRef {
    /// A storage over one byte range.
    pub fn from_view(key: impl Into<String>, bytes: ByteView) -> StorageRef {
        StorageRef {
            key: key.into(),
            bytes,
            location: "cpu".to_string(),
            composed: Vec::new(),
            unmapped_len: None,
        }
    }

    /// A storage whose content is `pieces` concatenated.
    pub fn from_pieces(key: impl Into<String>, pieces: Vec<Piece>) -> StorageRef {
        StorageRef {
            key: key.into(),
            bytes: ByteView::from_vec(Vec::new()),
            location: "cpu".to_string(),
            composed: pieces,
            unmapped_len: None,
        }
    }

    /// Size in bytes.
    pub fn nbytes(&self) -> u64 {
        if let Some(n) = self.unmapped_len {
            n
        } else if self.composed.is_empty() {
            self.bytes.len() as u64
        } else {
            self.composed.iter().map(Piece::len).sum()
        }
    }

    /// The content as pieces (one piece unless composed).
    pub fn pieces(&self) -> Vec<Piece> {
        if self.composed.is_empty() {
            vec![Piece::Bytes(self.bytes.clone())]
        } else {
            self.composed.clone()
        }
    }

    /// The content, copied.
    pub fn to_vec(&self) -> Vec<u8> {
        concat(&self.pieces())
    }
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
            && same_content(&self.storage, &o.storage)
            && self.requires_grad == o.requires_grad
            && self.kind == o.kind
    }
}

fn same_content(a: &StorageRef, b: &StorageRef) -> bool {
    if a.composed.is_empty() && b.composed.is_empty() {
        return a.bytes.as_slice() == b.bytes.as_slice();
    }
    a.nbytes() == b.nbytes() && a.to_vec() == b.to_vec()
}

/// A tensor view that does not fit its storage or is inconsistent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Shape and stride lengths differ.
    #[error("tensor over storage `{key}`: shape has {shape} dims but stride has {stride}")]
    RankMismatch {
        /// Storage key.
        key: String,
        /// Shape length.
        shape: usize,
        /// Stride length.
        stride: usize,
    },
    /// Sizes, strides or offsets overflow u64.
    #[error("tensor over storage `{key}`: size arithmetic overflows")]
    Overflow {
        /// Storage key.
        key: String,
    },
    /// The view reaches past the end of its storage.
    #[error("tensor over storage `{key}`: element {last} (offset {offset}) is outside a storage of {numel} elements")]
    OutOfStorage {
        /// Storage key.
        key: String,
        /// Storage offset.
        offset: u64,
        /// Highest element index the view touches.
        last: u64,
        /// Elements in the storage.
        numel: u64,
    },
    /// A view with more bytes than its storage (overlapping strides, e.g.
    /// stride 0): its logical bytes would be a multiple of the file, so a
    /// few bytes could claim terabytes. Checkpoints never hold such views.
    #[error("tensor over storage `{key}`: a view of {nbytes} bytes over a storage of {storage} bytes (overlapping strides) is refused")]
    Overlapping {
        /// Storage key.
        key: String,
        /// Logical bytes of the view.
        nbytes: u64,
        /// Bytes of the storage.
        storage: u64,
    },
    /// The storage was loaded metadata-only; its bytes are not available.
    #[error("tensor over storage `{key}`: loaded without its data (metadata only)")]
    Unmapped {
        /// Storage key.
        key: String,
    },
}

impl fmt::Display for TensorRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.dtype, self.shape)
    }
}

impl TensorRef {
    /// A plain contiguous (row-major) tensor over a whole storage.
    ///
    /// # Errors
    /// As [`TensorRef::validate`].
    pub fn contiguous(
        dtype: Dtype,
        shape: Vec<u64>,
        storage: StorageRef,
    ) -> Result<TensorRef, Error> {
        let t = TensorRef {
            dtype,
            stride: row_major_strides(&shape),
            shape,
            storage_offset: 0,
            storage,
            requires_grad: false,
            kind: TensorKind::Plain,
        };
        t.validate()?;
        Ok(t)
    }

    /// Elements in the view (saturating; validated views never saturate).
    pub fn numel(&self) -> u64 {
        self.shape.iter().fold(1u64, |a, &d| a.saturating_mul(d))
    }

    /// Bytes in the view.
    pub fn nbytes(&self) -> u64 {
        self.numel().saturating_mul(self.dtype.size() as u64)
    }

    /// Whole elements in the storage.
    pub fn storage_numel(&self) -> u64 {
        self.storage.nbytes() / self.dtype.size() as u64
    }

    /// Checks that shape and stride agree and that every element of the view
    /// lies in the storage: `offset + sum((size_i - 1) * stride_i) < numel`.
    ///
    /// # Errors
    /// [`Error::RankMismatch`], [`Error::Overflow`], [`Error::OutOfStorage`].
    pub fn validate(&self) -> Result<(), Error> {
        let key = || self.storage.key.clone();
        if self.shape.len() != self.stride.len() {
            return Err(Error::RankMismatch {
                key: key(),
                shape: self.shape.len(),
                stride: self.stride.len(),
            });
        }
        let mut numel = 1u64;
        for &d in &self.shape {
            numel = numel
                .checked_mul(d)
                .ok_or_else(|| Error::Overflow { key: key() })?;
        }
        numel
            .checked_mul(self.dtype.size() as u64)
            .ok_or_else(|| Error::Overflow { key: key() })?;
        if numel == 0 {
            return Ok(());
        }
        let mut last = self.storage_offset;
        for (&d, &s) in self.shape.iter().zip(&self.stride) {
            last = (d - 1)
                .checked_mul(s)
                .and_then(|x| x.checked_add(last))
                .ok_or_else(|| Error::Overflow { key: key() })?;
        }
        let storage = self.storage_numel();
        if last >= storage {
            return Err(Error::OutOfStorage {
                key: key(),
                offset: self.storage_offset,
                last,
                numel: storage,
            });
        }
        Ok(())
    }

    /// Row-major layout (dims of size 1 may have any stride, as in torch).
    pub fn is_contiguous(&self) -> bool {
        if self.numel() == 0 {
            return true;
        }
        let mut want = 1u64;
        for (&d, &s) in self.shape.iter().zip(&self.stride).rev() {
            if d != 1 && s != want {
                return false;
            }
            want = want.saturating_mul(d);
        }
        true
    }

    /// The logical row-major bytes. Contiguous views are one slice of the
    /// storage (no copy); strided views are one slice per contiguous run,
    /// or a single copied buffer when runs are shorter than 4 KiB.
    ///
    /// # Errors
    /// As [`TensorRef::validate`].
    pub fn pieces(&self) -> Result<Vec<Piece>, Error> {
        self.validate()?;
        if self.storage.unmapped_len.is_some() {
            return Err(Error::Unmapped {
                key: self.storage.key.clone(),
            });
        }
        let es = self.dtype.size() as u64;
        if self.nbytes() > self.storage.nbytes() {
            return Err(Error::Overlapping {
                key: self.storage.key.clone(),
                nbytes: self.nbytes(),
                storage: self.storage.nbytes(),
            });
        }
        let storage = self.storage.pieces();
        let index = PieceIndex::new(&storage);
        if self.numel() == 0 {
            return Ok(Vec::new());
        }
        if self.is_contiguous() {
            return Ok(index.range(self.storage_offset * es, self.nbytes()));
        }
        // Innermost dims that are laid out row-major form one run.
        let (mut run, mut k) = (1u64, self.shape.len());
        while k > 0 && (self.shape[k - 1] == 1 || self.stride[k - 1] == run) {
            run *= self.shape[k - 1];
            k -= 1;
        }
        let (outer_shape, outer_stride) = (&self.shape[..k], &self.stride[..k]);
        let run_bytes = run * es;
        let copy = run_bytes < 4096;
        let mut out = Vec::new();
        let mut buf = Vec::new();
        let mut idx = vec![0u64; k];
        loop {
            let start = self.storage_offset
                + idx
                    .iter()
                    .zip(outer_stride)
                    .map(|(i, s)| i * s)
                    .sum::<u64>();
            let piece = index.range(start * es, run_bytes);
            if copy {
                buf.extend_from_slice(&concat(&piece));
            } else {
                out.extend(piece);
            }
            // odometer over the outer dims
            let mut d = k;
            loop {
                if d == 0 {
                    if copy {
                        out.push(Piece::Bytes(ByteView::from_vec(buf)));
                    }
                    return Ok(out);
                }
                d -= 1;
                idx[d] += 1;
                if idx[d] < outer_shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
    }

    /// The logical row-major bytes, copied.
    ///
    /// # Errors
    /// As [`TensorRef::validate`].
    pub fn to_vec(&self) -> Result<Vec<u8>, Error> {
        Ok(concat(&self.pieces()?))
    }
}

/// Row-major strides for `shape`.
pub fn row_major_strides(shape: &[u64]) -> Vec<u64> {
    let mut st = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        st[i] = st[i + 1].saturating_mul(shape[i + 1].max(1));
    }
    st
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::piece::spans;

    fn f32_storage(n: usize) -> StorageRef {
        let b: Vec<u8> = (0..n).flat_map(|i| (i as f32).to_le_bytes()).collect();
        StorageRef::from_view("0", ByteView::from_vec(b))
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn view(shape: &[u64], stride: &[u64], offset: u64, n: usize) -> TensorRef {
        TensorRef {
            dtype: Dtype::F32,
            shape: shape.to_vec(),
            stride: stride.to_vec(),
            storage_offset: offset,
            storage: f32_storage(n),
            requires_grad: false,
            kind: TensorKind::Plain,
        }
    }

    #[test]
    fn overlapping_views_larger_than_their_storage_are_refused() {
        // 2^40 elements out of 4 bytes: refused before any copy.
        let t = view(&[1 << 40], &[0], 0, 1);
        let e = t.pieces().unwrap_err();
        assert_eq!(
            e,
            Error::Overlapping {
                key: "0".into(),
                nbytes: 4 << 40,
                storage: 4
            }
        );
        // An overlapping view that still fits its storage's size reads fine.
        let t = view(&[2, 2], &[1, 1], 0, 4);
        assert_eq!(floats(&t.to_vec().unwrap()), [0., 1., 1., 2.]);
    }

    #[test]
    fn contiguous_view_is_one_uncopied_slice() {
        let t = view(&[2, 2], &[2, 1], 4, 12);
        assert!(t.is_contiguous());
        let p = t.pieces().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(floats(&concat(&p)), [4.0, 5.0, 6.0, 7.0]);
        assert_eq!((t.numel(), t.nbytes(), t.storage_numel()), (4, 16, 12));
    }

    #[test]
    fn transposed_view_reads_in_logical_order() {
        let t = view(&[4, 3], &[1, 4], 0, 12);
        assert!(!t.is_contiguous());
        assert_eq!(
            floats(&t.to_vec().unwrap()),
            [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]
        );
        let t = view(&[2, 2], &[1, 3], 1, 6);
        assert_eq!(floats(&t.to_vec().unwrap()), [1., 4., 2., 5.]);
    }

    #[test]
    fn long_runs_stay_zero_copy_pieces() {
        let t = view(&[2, 1024], &[2048, 1], 0, 4096);
        let p = t.pieces().unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(floats(&concat(&p))[1024], 2048.0);
    }

    #[test]
    fn scalars_empties_and_size_one_dims() {
        let t = view(&[], &[], 3, 4);
        assert_eq!(floats(&t.to_vec().unwrap()), [3.0]);
        let t = view(&[0, 3], &[3, 1], 0, 0);
        assert!(t.pieces().unwrap().is_empty());
        let t = view(&[1, 2], &[99, 1], 0, 2);
        assert!(t.is_contiguous());
    }

    #[test]
    fn composed_storage_with_zero_fill() {
        let a = ByteView::from_vec(1f32.to_le_bytes().to_vec());
        let st = StorageRef::from_pieces("x", vec![Piece::Bytes(a), Piece::Zeros(8)]);
        let t = TensorRef::contiguous(Dtype::F32, vec![3], st).unwrap();
        assert_eq!(floats(&t.to_vec().unwrap()), [1.0, 0.0, 0.0]);
        let mut t2 = t.clone();
        t2.shape = vec![2];
        t2.stride = vec![2];
        assert_eq!(floats(&t2.to_vec().unwrap()), [1.0, 0.0]);
    }

    #[test]
    fn view_outside_storage_is_refused() {
        let t = view(&[4, 3], &[1, 4], 1, 12);
        assert_eq!(
            t.validate(),
            Err(Error::OutOfStorage {
                key: "0".into(),
                offset: 1,
                last: 12,
                numel: 12
            })
        );
        assert!(t.pieces().is_err());
    }

    #[test]
    fn rank_mismatch_is_refused() {
        let t = view(&[4, 3], &[1], 0, 12);
        assert!(matches!(
            t.validate(),
            Err(Error::RankMismatch {
                shape: 2,
                stride: 1,
                ..
            })
        ));
    }

    #[test]
    fn overflow_is_refused() {
        let t = view(&[u64::MAX, 2], &[1, 1], 0, 12);
        assert!(matches!(t.validate(), Err(Error::Overflow { .. })));
        let t = view(&[3], &[u64::MAX], 0, 12);
        assert!(matches!(t.validate(), Err(Error::Overflow { .. })));
    }

    #[test]
    fn spans_merge_nearby_views() {
        let v = ByteView::from_vec(vec![0u8; 1 << 20]);
        // owned views give no spans (nothing to advise)
        assert!(spans(&[Piece::Bytes(v.slice(0..10).unwrap())]).is_empty());
    }
}
