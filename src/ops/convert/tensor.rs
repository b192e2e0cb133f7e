//! Whole (TP=1) tensors as zero-copy byte pieces, and the row arithmetic of
//! the Hugging Face mapping (nemo-format.md §4): row ranges, the fused QKV
//! interleave per query group and its inverse, `[gate; up]`, vocab trimming;
//! and streaming pieces out a window at a time, with a float cast. Nothing
//! here copies tensor bytes: every result is a list of [`Piece`]s borrowing
//! from the inputs (or zero fill). The TP/PP partition rules are not here:
//! they belong to [`crate::model::canonical`].

use std::io;

use crate::formats::torch::dtype::Dtype;
use crate::io::piece::Piece;
use crate::io::sink::RecordSink;

/// Errors from tensor arithmetic; each names the tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pieces do not hold as many bytes as the shape needs.
    #[error("{name}: {dtype}{shape:?} needs {need} bytes, the pieces hold {have}")]
    Size {
        /// Tensor name.
        name: String,
        /// Element type.
        dtype: Dtype,
        /// Shape.
        shape: Vec<u64>,
        /// Bytes needed.
        need: u64,
        /// Bytes given.
        have: u64,
    },
    /// A split or slice does not fit the tensor.
    #[error("{name}: {why}")]
    Shape {
        /// Tensor name.
        name: String,
        /// What was wrong.
        why: String,
    },
}

/// A row-major tensor whose bytes are a list of pieces, with an index of
/// piece start offsets so any byte range is found by binary search.
#[derive(Debug, Clone)]
pub struct Flat {
    /// Name (for errors and as the key it will be written under).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<u64>,
    pieces: Vec<Piece>,
    starts: Vec<u64>,
}

/// Bytes of `shape` elements of `dtype`, if it does not overflow.
pub fn nbytes(dtype: Dtype, shape: &[u64]) -> Option<u64> {
    shape
        .iter()
        .try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d))
}

impl Flat {
    /// A tensor over `pieces`, checked to hold exactly the shape's bytes.
    ///
    /// # Errors
    /// [`Error::Size`].
    pub fn new(
        name: impl Into<String>,
        dtype: Dtype,
        shape: Vec<u64>,
        pieces: Vec<Piece>,
    ) -> Result<Flat, Error> {
        let name = name.into();
        let pieces: Vec<Piece> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        let mut starts = Vec::with_capacity(pieces.len());
        let mut pos = 0u64;
        for p in &pieces {
            starts.push(pos);
            pos = pos.saturating_add(p.len());
        }
        let need = nbytes(dtype, &shape);
        if need != Some(pos) {
            return Err(Error::Size {
                name,
                dtype,
                shape,
                need: need.unwrap_or(u64::MAX),
                have: pos,
            });
        }
        Ok(Flat {
            name,
            dtype,
            shape,
            pieces,
            starts,
        })
    }

    /// Total bytes.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(Piece::len).sum()
    }

    /// True for an empty tensor.
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// All pieces.
    pub fn pieces(&self) -> &[Piece] {
        &self.pieces
    }

    /// The same bytes under another name and shape (a reshape).
    ///
    /// # Errors
    /// [`Error::Size`] when the byte count differs.
    pub fn renamed(&self, name: impl Into<String>, shape: Vec<u64>) -> Result<Flat, Error> {
        Flat::new(name, self.dtype, shape, self.pieces.clone())
    }

    fn shape_err(&self, why: String) -> Error {
        Error::Shape {
            name: self.name.clone(),
            why,
        }
    }

    /// Bytes `[start, start+len)` as pieces.
    ///
    /// # Errors
    /// [`Error::Shape`] when the range is outside the tensor.
    pub fn bytes(&self, start: u64, len: u64) -> Result<Vec<Piece>, Error> {
        let end = start
            .checked_add(len)
            .filter(|&e| e <= self.len())
            .ok_or_else(|| {
                self.shape_err(format!("bytes {start}+{len} outside {} bytes", self.len()))
            })?;
        let mut out = Vec::new();
        if len == 0 {
            return Ok(out);
        }
        let mut i = self
            .starts
            .partition_point(|&s| s <= start)
            .saturating_sub(1);
        let mut pos = start;
        while pos < end {
            let (Some(p), Some(&s)) = (self.pieces.get(i), self.starts.get(i)) else {
                return Err(self.shape_err(format!("bytes {start}+{len}: index out of step")));
            };
            let a = pos - s;
            let b = (end - s).min(p.len());
            out.push(match p {
                Piece::Bytes(v) => Piece::Bytes(
                    v.slice(a..b)
                        .map_err(|e| self.shape_err(format!("piece {i}: {e}")))?,
                ),
                Piece::Zeros(_) => Piece::Zeros(b - a),
            });
            pos = s + b;
            i += 1;
        }
        Ok(out)
    }

    /// Bytes in one row (one index of dim 0).
    pub fn row_bytes(&self) -> u64 {
        nbytes(self.dtype, self.shape.get(1..).unwrap_or_default()).unwrap_or(0)
    }

    /// Rows `[r0, r1)` of dim 0 as pieces.
    ///
    /// # Errors
    /// [`Error::Shape`] for a range outside dim 0.
    pub fn rows(&self, r0: u64, r1: u64) -> Result<Vec<Piece>, Error> {
        let n = self.shape.first().copied().unwrap_or(0);
        if r0 > r1 || r1 > n {
            return Err(self.shape_err(format!("rows {r0}..{r1} outside dim 0 of {n}")));
        }
        let rb = self.row_bytes();
        self.bytes(r0 * rb, (r1 - r0) * rb)
    }
}

/// Attention geometry: heads, query groups, head size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heads {
    /// Attention heads.
    pub heads: u64,
    /// Query groups (KV heads).
    pub groups: u64,
    /// Channels per head (`kv_channels` / HF `head_dim`).
    pub head_dim: u64,
}

impl Heads {
    fn check(&self, name: &str) -> Result<u64, Error> {
        if self.groups == 0 || self.head_dim == 0 || self.heads % self.groups != 0 {
            return Err(Error::Shape {
                name: name.to_string(),
                why: format!(
                    "{} heads do not form {} query groups of size {}",
                    self.heads, self.groups, self.head_dim
                ),
            });
        }
        Ok(self.heads / self.groups)
    }
}

/// Megatron's fused QKV from HF `q`, `k`, `v` (weights `[n·d, H]` or biases
/// `[n·d]`): per query group `g`, its `heads/groups` q heads, then `k[g]`,
/// then `v[g]` (nemo-format.md §4.2). No RoPE permutation (§4.3).
///
/// # Errors
/// [`Error::Shape`] when the shapes do not match the geometry.
pub fn interleave_qkv(name: &str, h: Heads, q: &Flat, k: &Flat, v: &Flat) -> Result<Flat, Error> {
    let hpg = h.check(name)?;
    let rows = |t: &Flat, n: u64| -> Result<(), Error> {
        if t.shape.first() != Some(&(n * h.head_dim)) || t.dtype != q.dtype {
            return Err(Error::Shape {
                name: t.name.clone(),
                why: format!(
                    "expected {} rows of {} ({n} heads of {}), found {}{:?}",
                    n * h.head_dim,
                    q.dtype,
                    h.head_dim,
                    t.dtype,
                    t.shape
                ),
            });
        }
        Ok(())
    };
    rows(q, h.heads)?;
    rows(k, h.groups)?;
    rows(v, h.groups)?;
    if k.shape.get(1..) != q.shape.get(1..) || v.shape.get(1..) != q.shape.get(1..) {
        return Err(Error::Shape {
            name: name.to_string(),
            why: "q, k and v differ in their trailing dims".into(),
        });
    }
    let d = h.head_dim;
    let mut pieces = Vec::new();
    for g in 0..h.groups {
        pieces.extend(q.rows(g * hpg * d, (g + 1) * hpg * d)?);
        pieces.extend(k.rows(g * d, (g + 1) * d)?);
        pieces.extend(v.rows(g * d, (g + 1) * d)?);
    }
    let mut shape = q.shape.clone();
    if let Some(r) = shape.first_mut() {
        *r = (h.heads + 2 * h.groups) * d;
    }
    Flat::new(name, q.dtype, shape, pieces)
}

/// The inverse of [`interleave_qkv`]: `(q, k, v)` named by `names`.
///
/// # Errors
/// [`Error::Shape`] when the fused tensor does not match the geometry.
pub fn split_qkv(qkv: &Flat, h: Heads, names: [&str; 3]) -> Result<[Flat; 3], Error> {
    let hpg = h.check(&qkv.name)?;
    let d = h.head_dim;
    let u = hpg + 2;
    if qkv.shape.first() != Some(&((h.heads + 2 * h.groups) * d)) {
        return Err(Error::Shape {
            name: qkv.name.clone(),
            why: format!(
                "{:?} is not ({} heads + 2·{} groups)·{d} rows",
                qkv.shape, h.heads, h.groups
            ),
        });
    }
    let (mut q, mut k, mut v) = (Vec::new(), Vec::new(), Vec::new());
    for g in 0..h.groups {
        let base = g * u * d;
        q.extend(qkv.rows(base, base + hpg * d)?);
        k.extend(qkv.rows(base + hpg * d, base + (hpg + 1) * d)?);
        v.extend(qkv.rows(base + (hpg + 1) * d, base + u * d)?);
    }
    let with_rows = |n: u64| {
        let mut s = qkv.shape.clone();
        if let Some(r) = s.first_mut() {
            *r = n * d;
        }
        s
    };
    Ok([
        Flat::new(names[0], qkv.dtype, with_rows(h.heads), q)?,
        Flat::new(names[1], qkv.dtype, with_rows(h.groups), k)?,
        Flat::new(names[2], qkv.dtype, with_rows(h.groups), v)?,
    ])
}

/// `a` then `b` along dim 0 (fc1 = `[gate; up]`).
///
/// # Errors
/// [`Error::Shape`] when the trailing dims or dtypes differ.
pub fn cat_rows(name: &str, a: &Flat, b: &Flat) -> Result<Flat, Error> {
    if a.shape.get(1..) != b.shape.get(1..) || a.dtype != b.dtype || a.shape.is_empty() {
        return Err(Error::Shape {
            name: name.to_string(),
            why: format!(
                "cannot stack {}{:?} on {}{:?}",
                a.dtype, a.shape, b.dtype, b.shape
            ),
        });
    }
    let mut shape = a.shape.clone();
    if let (Some(r), Some(rb)) = (shape.first_mut(), b.shape.first()) {
        *r += rb;
    }
    let mut p = a.pieces().to_vec();
    p.extend(b.pieces().iter().cloned());
    Flat::new(name, a.dtype, shape, p)
}

/// Rows `[0, rows)` of `t`, with zero rows appended past its end (vocab
/// padding) or rows dropped (trimming).
///
/// # Errors
/// [`Error::Shape`] for a tensor without dims.
pub fn resize_rows(t: &Flat, name: &str, rows: u64) -> Result<Flat, Error> {
    let n = *t.shape.first().ok_or_else(|| Error::Shape {
        name: name.to_string(),
        why: "a scalar has no rows".into(),
    })?;
    let mut p = t.rows(0, rows.min(n))?;
    if rows > n {
        p.push(Piece::Zeros((rows - n) * t.row_bytes()));
    }
    let mut shape = t.shape.clone();
    if let Some(r) = shape.first_mut() {
        *r = rows;
    }
    Flat::new(name, t.dtype, shape, p)
}

/// Source bytes read ahead, written and released at a time: bounds the
/// resident pages of the mapping to about this much (plus the kernel's folio
/// rounding), whatever the tensor size.
const WINDOW: u64 = 8 << 20;

/// Streams pieces into `sink` a window at a time, reading each window's
/// mapped source pages ahead and releasing them after; casts float types
/// when asked.
pub(crate) fn stream_pieces(
    pieces: &[Piece],
    cast: Option<(Dtype, Dtype)>,
    sink: &mut dyn RecordSink,
) -> io::Result<()> {
    let mut group: Vec<Piece> = Vec::new();
    let mut size = 0u64;
    for p in pieces {
        match p {
            Piece::Bytes(b) if b.len() as u64 > WINDOW => {
                write_window(&group, cast, sink)?;
                group.clear();
                size = 0;
                let len = b.len() as u64;
                let mut off = 0u64;
                while off < len {
                    let end = (off + WINDOW).min(len);
                    let w = b.slice(off..end).map_err(io::Error::other)?;
                    write_window(&[Piece::Bytes(w)], cast, sink)?;
                    off = end;
                }
            }
            _ => {
                group.push(p.clone());
                size += p.len();
                if size >= WINDOW {
                    write_window(&group, cast, sink)?;
                    group.clear();
                    size = 0;
                }
            }
        }
    }
    write_window(&group, cast, sink)
}

/// One window: prefetch its mapped spans, write (or cast) it, release them.
/// Windows end on piece boundaries, which are element boundaries, so a cast
/// never straddles two windows.
fn write_window(
    pieces: &[Piece],
    cast: Option<(Dtype, Dtype)>,
    sink: &mut dyn RecordSink,
) -> io::Result<()> {
    if pieces.is_empty() {
        return Ok(());
    }
    match cast {
        Some((from, to)) if from != to => crate::io::piece::with_pages_of(pieces, || {
            crate::ops::reshard::cast_pieces(pieces, from, to, sink)
        }),
        // The sink prefetches and releases (see `RecordSink::pieces`).
        _ => sink.pieces(pieces),
    }
}

/// A float cast `from -> to`, checked.
pub(crate) fn cast_of(
    name: &str,
    from: Dtype,
    to: Option<Dtype>,
) -> Result<Option<(Dtype, Dtype)>, Error> {
    match to {
        Some(to) if to != from => {
            let float = |d: Dtype| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16);
            if !float(from) || !float(to) {
                return Err(Error::Shape {
                    name: name.to_string(),
                    why: format!("cannot cast {from} to {to} (float32/float16/bfloat16 only)"),
                });
            }
            Ok(Some((from, to)))
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::bytes::ByteView;
    use crate::io::piece::concat;

    /// A u8 tensor whose element i is `base + i`, split into uneven pieces.
    fn counting(name: &str, shape: &[u64], base: u8) -> Flat {
        let n: u64 = shape.iter().product();
        let bytes: Vec<u8> = (0..n).map(|i| base.wrapping_add(i as u8)).collect();
        let v = ByteView::from_vec(bytes);
        let cut = (n / 3).max(1).min(n);
        let pieces = vec![
            Piece::Bytes(v.slice(0..cut).unwrap()),
            Piece::Bytes(v.slice(cut..n).unwrap()),
        ];
        Flat::new(name, Dtype::U8, shape.to_vec(), pieces).unwrap()
    }

    #[test]
    fn size_mismatch_is_refused() {
        let e = Flat::new("t", Dtype::F32, vec![2], vec![Piece::Zeros(4)]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Size {
                    need: 8,
                    have: 4,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn rows_and_bytes() {
        let t = counting("t", &[3, 4], 0);
        assert_eq!(concat(&t.rows(1, 3).unwrap()), (4..12).collect::<Vec<u8>>());
        assert!(matches!(t.rows(2, 4), Err(Error::Shape { .. })));
        assert!(matches!(t.bytes(10, 3), Err(Error::Shape { .. })));
    }

    #[test]
    fn qkv_interleave_matches_megatron_order_and_inverts() {
        // 4 heads, 2 groups, head size 1, hidden 2: q0 q1 k0 v0 q2 q3 k1 v1.
        let h = Heads {
            heads: 4,
            groups: 2,
            head_dim: 1,
        };
        let q = counting("q", &[4, 2], 0);
        let k = counting("k", &[2, 2], 100);
        let v = counting("v", &[2, 2], 200);
        let f = interleave_qkv("qkv", h, &q, &k, &v).unwrap();
        assert_eq!(f.shape, vec![8, 2]);
        assert_eq!(
            concat(f.pieces()),
            [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
        );
        let [q2, k2, v2] = split_qkv(&f, h, ["q", "k", "v"]).unwrap();
        assert_eq!(concat(q2.pieces()), concat(q.pieces()));
        assert_eq!(concat(k2.pieces()), concat(k.pieces()));
        assert_eq!(concat(v2.pieces()), concat(v.pieces()));
        let bad = Heads { groups: 3, ..h };
        assert!(interleave_qkv("qkv", bad, &q, &k, &v).is_err());
        assert!(interleave_qkv("qkv", h, &q, &q, &v).is_err());
    }

    #[test]
    fn cat_and_resize() {
        let a = counting("a", &[1, 2], 0);
        let b = counting("b", &[2, 2], 10);
        let c = cat_rows("c", &a, &b).unwrap();
        assert_eq!(concat(c.pieces()), [0, 1, 10, 11, 12, 13]);
        let padded = resize_rows(&c, "p", 4).unwrap();
        assert_eq!(concat(padded.pieces()), [0, 1, 10, 11, 12, 13, 0, 0]);
        let trimmed = resize_rows(&c, "p", 1).unwrap();
        assert_eq!(concat(trimmed.pieces()), [0, 1]);
        assert!(cat_rows("c", &a, &counting("x", &[3], 0)).is_err());
    }
}
