//! Cheap, clonable, zero-copy views over bytes that are either memory-mapped
//! from a file or owned in memory (decompressed gzip, generated data).

use std::fmt;
use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use crate::io::mmap::Mmap;

enum Backing {
    /// A map of a whole file (from offset 0), with the file when we have it:
    /// writers can then copy ranges file to file in the kernel.
    Mapped(Mmap, Option<File>),
    Owned(Vec<u8>),
}

impl Backing {
    fn as_slice(&self) -> &[u8] {
        match self {
            Backing::Mapped(m, _) => m,
            Backing::Owned(v) => v,
        }
    }
}

/// A byte range inside a shared buffer. Cloning and slicing never copy.
#[derive(Clone)]
pub struct ByteView {
    buf: Arc<Backing>,
    start: usize,
    len: usize,
}

/// A requested sub-range does not fit the view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("byte range {start}..{end} is outside a view of {len} bytes")]
pub struct OutOfRange {
    /// Requested start.
    pub start: u64,
    /// Requested end (exclusive).
    pub end: u64,
    /// Length of the view.
    pub len: u64,
}

impl ByteView {
    /// A view over a whole memory map.
    pub fn from_mmap(map: Mmap) -> Self {
        let len = map.len();
        ByteView {
            buf: Arc::new(Backing::Mapped(map, None)),
            start: 0,
            len,
        }
    }

    /// A view over a whole map of `file` (mapped from offset 0), which is
    /// kept so that [`ByteView::file_range`] can name the bytes' source.
    pub fn from_mapped_file(map: Mmap, file: File) -> Self {
        let len = map.len();
        ByteView {
            buf: Arc::new(Backing::Mapped(map, Some(file))),
            start: 0,
            len,
        }
    }

    /// The file these bytes are mapped from and their offset in it, when
    /// known: lets a writer copy them in the kernel instead of through the
    /// map (see [`crate::io::sink::Sink::append_view`]).
    pub fn file_range(&self) -> Option<(&File, u64)> {
        match &*self.buf {
            Backing::Mapped(_, Some(f)) => Some((f, self.start as u64)),
            _ => None,
        }
    }

    /// A view over owned bytes.
    pub fn from_vec(v: Vec<u8>) -> Self {
        let len = v.len();
        ByteView {
            buf: Arc::new(Backing::Owned(v)),
            start: 0,
            len,
        }
    }

    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf.as_slice()[self.start..self.start + self.len]
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the view holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-view `[start, end)` relative to this view, checked.
    pub fn slice(&self, range: Range<u64>) -> Result<ByteView, OutOfRange> {
        let err = OutOfRange {
            start: range.start,
            end: range.end,
            len: self.len as u64,
        };
        if range.start > range.end || range.end > self.len as u64 {
            return Err(err);
        }
        Ok(ByteView {
            buf: self.buf.clone(),
            start: self.start + range.start as usize,
            len: (range.end - range.start) as usize,
        })
    }

    /// A sub-view of `len` bytes at `offset`, with overflow-checked arithmetic.
    pub fn slice_len(&self, offset: u64, len: u64) -> Result<ByteView, OutOfRange> {
        let end = offset.checked_add(len).ok_or(OutOfRange {
            start: offset,
            end: u64::MAX,
            len: self.len as u64,
        })?;
        self.slice(offset..end)
    }

    /// Which shared buffer this view is over (an opaque identity) and its
    /// byte range there: lets a streaming writer merge nearby views of one
    /// mapping into a few spans for read-ahead and release hints.
    pub fn location(&self) -> (usize, Range<usize>) {
        (
            Arc::as_ptr(&self.buf) as usize,
            self.start..self.start + self.len,
        )
    }

    /// A view over `range` of the same underlying buffer (buffer
    /// coordinates, as [`ByteView::location`] gives them), checked.
    pub fn rebase(&self, range: Range<usize>) -> Option<ByteView> {
        let total = self.buf.as_slice().len();
        (range.start <= range.end && range.end <= total).then(|| ByteView {
            buf: self.buf.clone(),
            start: range.start,
            len: range.end - range.start,
        })
    }

    /// Drops this range's resident pages if it is memory-mapped (see
    /// [`crate::io::mmap::release`]); a no-op for owned bytes.
    pub fn release(&self) {
        if let Backing::Mapped(m, _) = &*self.buf {
            crate::io::mmap::release(m, self.start, self.len);
        }
    }

    /// Advises sequential read-ahead of this range if it is memory-mapped (see
    /// [`crate::io::mmap::prefetch`]); a no-op for owned bytes.
    pub fn prefetch(&self) {
        if let Backing::Mapped(m, _) = &*self.buf {
            crate::io::mmap::prefetch(m, self.start, self.len);
        }
    }

    /// True when both views are backed by a memory map (used by tests and benches
    /// that check we stay zero-copy).
    pub fn is_mapped(&self) -> bool {
        matches!(*self.buf, Backing::Mapped(..))
    }
}

impl AsRef<[u8]> for ByteView {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl fmt::Debug for ByteView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ByteView({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slicing_is_checked() {
        let v = ByteView::from_vec((0u8..10).collect());
        let s = v.slice(2..6).unwrap();
        assert_eq!(s.as_slice(), &[2, 3, 4, 5]);
        assert_eq!(s.slice(1..3).unwrap().as_slice(), &[3, 4]);
        assert!(s.slice(1..5).is_err());
        assert!(v.slice_len(u64::MAX, 2).is_err());
    }
}
