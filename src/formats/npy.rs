//! NumPy `.npy` files (format versions 1-3): reading little-endian integer arrays (token ids for
//! `eval --tokens`) and writing C-order float32 arrays (`eval --logits-out`). Only what those
//! commands need: no pickled objects, no Fortran order, no big-endian data.

/// Errors of reading a `.npy` file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The header is malformed or unsupported.
    #[error("npy: header: {0}")]
    Header(String),
    /// The data does not match the header.
    #[error("npy: data: {0}")]
    Data(String),
}

const MAGIC: &[u8] = b"\x93NUMPY";
/// Cap on the header length read from input (numpy writes well under this).
const MAX_HEADER: usize = 1 << 20;

/// An integer array read from a `.npy` file, widened to i64.
#[derive(Debug, Clone, PartialEq)]
pub struct IntArray {
    /// The shape.
    pub shape: Vec<usize>,
    /// The values, C order.
    pub data: Vec<i64>,
}

fn field<'a>(header: &'a str, key: &str) -> Result<&'a str, Error> {
    let pat = format!("'{key}':");
    let at = header
        .find(&pat)
        .ok_or_else(|| Error::Header(format!("no {key:?} in {header:?}")))?;
    Ok(header.get(at + pat.len()..).unwrap_or("").trim_start())
}

/// Parses a `.npy` file holding integers (`i1 i2 i4 i8 u1 u2 u4 u8`, little-endian or
/// byte-sized) into i64 values.
///
/// # Errors
/// [`Error::Header`] for a bad magic, version, header, dtype or Fortran order;
/// [`Error::Data`] when the data length differs from the shape or a u64 exceeds i64.
pub fn read_ints(bytes: &[u8]) -> Result<IntArray, Error> {
    if bytes.get(..6) != Some(MAGIC) {
        return Err(Error::Header("not a .npy file (bad magic)".into()));
    }
    let major = *bytes
        .get(6)
        .ok_or_else(|| Error::Header("truncated".into()))?;
    let (hlen, start) = match major {
        1 => {
            let b = bytes
                .get(8..10)
                .ok_or_else(|| Error::Header("truncated".into()))?;
            (usize::from(u16::from_le_bytes([b[0], b[1]])), 10)
        }
        2 | 3 => {
            let b = bytes
                .get(8..12)
                .ok_or_else(|| Error::Header("truncated".into()))?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => return Err(Error::Header(format!("unsupported version {v}"))),
    };
    if hlen > MAX_HEADER {
        return Err(Error::Header(format!("header length {hlen} too large")));
    }
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| Error::Header("truncated header".into()))?;
    let header = std::str::from_utf8(header).map_err(|_| Error::Header("not UTF-8".into()))?;
    let descr = field(header, "descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| Error::Header(format!("bad descr in {header:?}")))?;
    if field(header, "fortran_order")?.starts_with("True") {
        return Err(Error::Header(
            "fortran_order arrays are not supported".into(),
        ));
    }
    let shape_text = field(header, "shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| Error::Header(format!("bad shape in {header:?}")))?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .map_err(|_| Error::Header(format!("bad dimension {s:?}")))
        })
        .collect::<Result<_, _>>()?;
    let (size, signed) = match descr {
        "|i1" | "<i1" | "i1" => (1, true),
        "|u1" | "<u1" | "u1" => (1, false),
        "<i2" => (2, true),
        "<u2" => (2, false),
        "<i4" => (4, true),
        "<u4" => (4, false),
        "<i8" => (8, true),
        "<u8" => (8, false),
        d => {
            return Err(Error::Header(format!(
                "dtype {d:?} is not a little-endian integer type"
            )))
        }
    };
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| Error::Header("shape overflows".into()))?;
    let data = bytes.get(start + hlen..).unwrap_or(&[]);
    if Some(data.len()) != n.checked_mul(size) {
        return Err(Error::Data(format!(
            "{} bytes for shape {shape:?} of {descr}",
            data.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    for c in data.chunks_exact(size) {
        let mut b = [0u8; 8];
        b[..size].copy_from_slice(c);
        let v = if signed {
            let shift = 64 - 8 * size as u32;
            (i64::from_le_bytes(b) << shift) >> shift
        } else {
            let u = u64::from_le_bytes(b);
            i64::try_from(u).map_err(|_| Error::Data(format!("value {u} exceeds i64")))?
        };
        out.push(v);
    }
    Ok(IntArray { shape, data: out })
}

/// The version-1 `.npy` header of a little-endian float32 array of `shape`, C order: the data
/// (`shape.product()` values) follows it.
pub fn f32_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_text = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_text}, }}");
    // magic(6) + version(2) + length(2) + header + '\n', padded to a multiple of 64
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.div_ceil(64) * 64 - unpadded));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

/// A whole `.npy` file of float32 `values` of `shape` (see [`f32_header`]).
pub fn f32_bytes(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let mut out = f32_header(shape);
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn npy(descr: &str, shape: &str, data: &[u8]) -> Vec<u8> {
        let h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}\n");
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&[1, 0]);
        v.extend_from_slice(&(h.len() as u16).to_le_bytes());
        v.extend_from_slice(h.as_bytes());
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_ints_of_every_width() {
        let a = read_ints(&npy(
            "<i8",
            "(2, 2)",
            &[1i64, -2, 3, 4].map(i64::to_le_bytes).concat(),
        ))
        .unwrap();
        assert_eq!(a.shape, vec![2, 2]);
        assert_eq!(a.data, vec![1, -2, 3, 4]);
        let b = read_ints(&npy(
            "<i4",
            "(3,)",
            &[7i32, -1, 99].map(i32::to_le_bytes).concat(),
        ))
        .unwrap();
        assert_eq!((b.shape, b.data), (vec![3], vec![7, -1, 99]));
        let c = read_ints(&npy(
            "<u2",
            "(1, 2)",
            &[65535u16, 5].map(u16::to_le_bytes).concat(),
        ))
        .unwrap();
        assert_eq!(c.data, vec![65535, 5]);
    }

    #[test]
    fn header_errors() {
        assert!(matches!(read_ints(b"nope"), Err(Error::Header(_))));
        assert!(matches!(
            read_ints(&npy("<f4", "(1,)", &[0; 4])),
            Err(Error::Header(m)) if m.contains("<f4")
        ));
    }

    #[test]
    fn data_length_must_match() {
        assert!(matches!(
            read_ints(&npy("<i8", "(2,)", &[0; 8])),
            Err(Error::Data(_))
        ));
    }

    #[test]
    fn f32_header_is_aligned_and_parsable() {
        let b = f32_bytes(&[1, 2], &[1.5, -2.0]);
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(b.len(), 10 + hlen + 8);
        let h = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(h.contains("'shape': (1, 2)"), "{h}");
        assert_eq!(&b[10 + hlen..10 + hlen + 4], &1.5f32.to_le_bytes());
    }
}
