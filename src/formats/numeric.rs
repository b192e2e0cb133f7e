//! Element values of stored tensors: decoding little-endian bytes of a dtype
//! to `f64` (floats via `half` for f16/bf16, integers exactly up to 2^53) and
//! streaming over piece lists whose boundaries need not fall on elements.
//! Used by `validate --deep` (NaN/Inf counts) and `diff` (max abs difference).

use crate::formats::torch::Dtype;
use crate::io::piece::Piece;

/// Bytes decoded per step when streaming (a multiple of every element size).
const STEP: usize = 1 << 16;

/// Decodes one element; `None` for types without a real value (complex, fp8).
pub fn decode(dtype: Dtype, b: &[u8]) -> Option<f64> {
    let a = |n: usize| b.get(..n);
    Some(match dtype {
        Dtype::F64 => f64::from_le_bytes(a(8)?.try_into().ok()?),
        Dtype::F32 => f64::from(f32::from_le_bytes(a(4)?.try_into().ok()?)),
        Dtype::F16 => half::f16::from_le_bytes(a(2)?.try_into().ok()?).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes(a(2)?.try_into().ok()?).to_f64(),
        Dtype::I64 => i64::from_le_bytes(a(8)?.try_into().ok()?) as f64,
        Dtype::I32 => f64::from(i32::from_le_bytes(a(4)?.try_into().ok()?)),
        Dtype::I16 => f64::from(i16::from_le_bytes(a(2)?.try_into().ok()?)),
        Dtype::I8 => f64::from(*b.first()? as i8),
        Dtype::U8 | Dtype::Bool => f64::from(*b.first()?),
        Dtype::U16 => f64::from(u16::from_le_bytes(a(2)?.try_into().ok()?)),
        Dtype::U32 => f64::from(u32::from_le_bytes(a(4)?.try_into().ok()?)),
        Dtype::U64 => u64::from_le_bytes(a(8)?.try_into().ok()?) as f64,
        _ => return None,
    })
}

/// True for dtypes [`decode`] understands.
pub fn decodable(dtype: Dtype) -> bool {
    decode(dtype, &[0u8; 16]).is_some()
}

/// True for floating-point dtypes that can hold NaN or Inf.
pub fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F64 | Dtype::F32 | Dtype::F16 | Dtype::BF16)
}

/// Calls `f` with element-aligned byte blocks of the concatenation of
/// `pieces` (zero runs are materialised in bounded blocks). A trailing partial
/// element is dropped (callers pass whole tensors).
pub fn for_each_block(pieces: &[Piece], elem: usize, mut f: impl FnMut(&[u8])) {
    let elem = elem.max(1);
    let mut carry: Vec<u8> = Vec::new();
    let zeros = vec![0u8; STEP];
    let mut feed = |mut data: &[u8], carry: &mut Vec<u8>| {
        if !carry.is_empty() {
            let need = elem - carry.len();
            let take = need.min(data.len());
            carry.extend_from_slice(&data[..take]);
            data = &data[take..];
            if carry.len() == elem {
                f(carry);
                carry.clear();
            }
        }
        let whole = data.len() / elem * elem;
        if whole > 0 {
            f(&data[..whole]);
        }
        carry.extend_from_slice(&data[whole..]);
    };
    for p in pieces {
        match p {
            Piece::Bytes(b) => {
                for chunk in b.as_slice().chunks(STEP) {
                    feed(chunk, &mut carry);
                }
            }
            Piece::Zeros(n) => {
                let mut left = *n;
                while left > 0 {
                    let k = left.min(STEP as u64) as usize;
                    feed(&zeros[..k], &mut carry);
                    left -= k as u64;
                }
            }
        }
    }
}

/// NaN and infinity counts of a float tensor's bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Special {
    /// NaN elements.
    pub nan: u64,
    /// +Inf or -Inf elements.
    pub inf: u64,
}

impl Special {
    /// Adds the counts of an element-aligned block.
    pub fn count(&mut self, dtype: Dtype, block: &[u8]) {
        if !is_float(dtype) {
            return;
        }
        let es = dtype.size();
        for e in block.chunks_exact(es) {
            if let Some(v) = decode(dtype, e) {
                if v.is_nan() {
                    self.nan += 1;
                } else if v.is_infinite() {
                    self.inf += 1;
                }
            }
        }
    }
}

/// Sequential reader over a piece list.
struct Cursor<'p> {
    pieces: &'p [Piece],
    idx: usize,
    off: u64,
}

impl<'p> Cursor<'p> {
    fn new(pieces: &'p [Piece]) -> Cursor<'p> {
        Cursor {
            pieces,
            idx: 0,
            off: 0,
        }
    }

    /// Fills `buf` as far as the pieces go; returns the bytes written.
    fn read(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            let Some(p) = self.pieces.get(self.idx) else {
                break;
            };
            let left = p.len().saturating_sub(self.off);
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let k = (buf.len() - n).min(usize::try_from(left).unwrap_or(usize::MAX));
            match p {
                Piece::Bytes(b) => {
                    let s = b.as_slice();
                    let from = self.off as usize;
                    let Some(src) = s.get(from..from + k) else {
                        break;
                    };
                    buf[n..n + k].copy_from_slice(src);
                }
                Piece::Zeros(_) => buf[n..n + k].fill(0),
            }
            n += k;
            self.off += k as u64;
        }
        n
    }
}

/// Max absolute difference of two equally shaped tensors of decodable dtypes,
/// and the number of elements compared. NaN in one and not the other counts
/// as an infinite difference; NaN in both (and equal infinities) as none.
pub fn max_abs_diff(a: (&[Piece], Dtype), b: (&[Piece], Dtype)) -> Option<(f64, u64)> {
    if !decodable(a.1) || !decodable(b.1) {
        return None;
    }
    const K: usize = 4096;
    let (ea, eb) = (a.1.size(), b.1.size());
    let (mut ca, mut cb) = (Cursor::new(a.0), Cursor::new(b.0));
    let (mut ba, mut bb) = (vec![0u8; K * ea], vec![0u8; K * eb]);
    let mut max = 0f64;
    let mut n = 0u64;
    loop {
        let na = ca.read(&mut ba) / ea;
        let nb = cb.read(&mut bb) / eb;
        let k = na.min(nb);
        for (x, y) in ba.chunks_exact(ea).zip(bb.chunks_exact(eb)).take(k) {
            let (Some(x), Some(y)) = (decode(a.1, x), decode(b.1, y)) else {
                continue;
            };
            let d = if x.is_nan() || y.is_nan() {
                if x.is_nan() && y.is_nan() {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else if x == y {
                0.0
            } else {
                (x - y).abs()
            };
            max = max.max(d);
        }
        n += k as u64;
        if k < K {
            break;
        }
    }
    Some((max, n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::bytes::ByteView;

    fn f32s(v: &[f32]) -> Piece {
        Piece::Bytes(ByteView::from_vec(
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ))
    }

    #[test]
    fn decodes_half_types_and_ints() {
        let bf = half::bf16::from_f32(1.5).to_le_bytes();
        assert_eq!(decode(Dtype::BF16, &bf), Some(1.5));
        let h = half::f16::from_f32(-2.0).to_le_bytes();
        assert_eq!(decode(Dtype::F16, &h), Some(-2.0));
        assert_eq!(decode(Dtype::I8, &[0xff]), Some(-1.0));
        assert_eq!(decode(Dtype::I64, &(-5i64).to_le_bytes()), Some(-5.0));
        assert_eq!(decode(Dtype::C64, &[0; 8]), None);
        assert_eq!(decode(Dtype::F32, &[0; 2]), None);
    }

    #[test]
    fn blocks_are_element_aligned_across_pieces() {
        let bytes: Vec<u8> = (0..12).collect();
        let pieces = vec![
            Piece::Bytes(ByteView::from_vec(bytes[..3].to_vec())),
            Piece::Bytes(ByteView::from_vec(bytes[3..9].to_vec())),
            Piece::Zeros(3),
        ];
        let mut seen = Vec::new();
        for_each_block(&pieces, 4, |b| {
            assert_eq!(b.len() % 4, 0);
            seen.extend_from_slice(b);
        });
        assert_eq!(seen.len(), 12);
        assert_eq!(&seen[..9], &bytes[..9]);
        assert_eq!(&seen[9..], &[0, 0, 0]);
    }

    #[test]
    fn counts_nan_and_inf() {
        let mut s = Special::default();
        let p = f32s(&[1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY]);
        for_each_block(&[p], 4, |b| s.count(Dtype::F32, b));
        assert_eq!(s, Special { nan: 1, inf: 2 });
    }

    #[test]
    fn max_abs_diff_across_dtypes() {
        let a = f32s(&[1.0, 2.0, 3.0]);
        let b: Vec<u8> = [1.0f32, 2.5, 3.0]
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let b = Piece::Bytes(ByteView::from_vec(b));
        let (d, n) =
            max_abs_diff((std::slice::from_ref(&a), Dtype::F32), (&[b], Dtype::BF16)).unwrap();
        assert_eq!((d, n), (0.5, 3));
        let c = f32s(&[1.0, f32::NAN, 3.0]);
        let (d, _) = max_abs_diff((&[a], Dtype::F32), (&[c], Dtype::F32)).unwrap();
        assert!(d.is_infinite());
    }
}
