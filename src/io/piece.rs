//! Pieces: a tensor's (or any record's) logical bytes as a list of zero-copy
//! views into mapped inputs and runs of zeros, so writers stream from the
//! source pages without assembling buffers.

use crate::io::bytes::ByteView;

/// A piece of a tensor's logical bytes.
#[derive(Debug, Clone)]
pub enum Piece {
    /// Bytes taken (not copied) from a storage.
    Bytes(ByteView),
    /// This many zero bytes.
    Zeros(u64),
}

impl Piece {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Bytes(b) => b.len() as u64,
            Piece::Zeros(n) => *n,
        }
    }

    /// True when the piece holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pieces concatenated into one buffer.
pub fn concat(pieces: &[Piece]) -> Vec<u8> {
    let mut v = Vec::with_capacity(pieces.iter().map(Piece::len).sum::<u64>() as usize);
    for p in pieces {
        match p {
            Piece::Bytes(b) => v.extend_from_slice(b.as_slice()),
            Piece::Zeros(n) => v.resize(v.len() + *n as usize, 0),
        }
    }
    v
}

/// Byte-range lookup over a list of pieces.
pub struct PieceIndex<'a> {
    pieces: &'a [Piece],
    starts: Vec<u64>,
}

impl<'a> PieceIndex<'a> {
    /// Indexes `pieces` by their starting byte offsets.
    pub fn new(pieces: &'a [Piece]) -> Self {
        let mut starts = Vec::with_capacity(pieces.len());
        let mut at = 0;
        for p in pieces {
            starts.push(at);
            at += p.len();
        }
        PieceIndex { pieces, starts }
    }

    /// `[start, start+len)` as sub-pieces; the range was validated to fit.
    pub fn range(&self, start: u64, len: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        let mut i = self
            .starts
            .partition_point(|&s| s <= start)
            .saturating_sub(1);
        let (mut at, end) = (start, start + len);
        while at < end && i < self.pieces.len() {
            let p = &self.pieces[i];
            let (lo, hi) = (at - self.starts[i], (end - self.starts[i]).min(p.len()));
            if hi > lo {
                out.push(match p {
                    Piece::Bytes(b) => Piece::Bytes(
                        b.slice(lo..hi)
                            .expect("lo < hi <= piece length by construction"),
                    ),
                    Piece::Zeros(_) => Piece::Zeros(hi - lo),
                });
                at += hi - lo;
            }
            i += 1;
        }
        out
    }
}

/// Runs `f` with the mapped source pages of `pieces` read ahead (one populate per
/// [`spans`] span instead of a fault per page) and drops them from the process
/// afterwards (widened to whole folios, see [`crate::io::mmap::release`]), so that streaming
/// a model keeps resident memory at about one tensor.
pub fn with_pages_of<R>(pieces: &[Piece], f: impl FnOnce() -> R) -> R {
    let spans = spans(pieces);
    for s in &spans {
        s.prefetch();
    }
    let r = f();
    for s in &spans {
        s.release();
    }
    r
}

/// Mapped pieces merged into spans (gaps under 256 KiB joined), for
/// read-ahead and release hints.
pub fn spans(pieces: &[Piece]) -> Vec<ByteView> {
    const GAP: usize = 256 << 10;
    let mut locs: Vec<(usize, std::ops::Range<usize>, &ByteView)> = pieces
        .iter()
        .filter_map(|p| match p {
            Piece::Bytes(b) if b.is_mapped() => {
                let (id, r) = b.location();
                Some((id, r, b))
            }
            _ => None,
        })
        .collect();
    locs.sort_by_key(|(id, r, _)| (*id, r.start));
    let mut out: Vec<ByteView> = Vec::new();
    let mut cur: Option<(usize, std::ops::Range<usize>, &ByteView)> = None;
    for (id, r, b) in locs {
        match &mut cur {
            Some((cid, cr, _)) if *cid == id && r.start <= cr.end.saturating_add(GAP) => {
                cr.end = cr.end.max(r.end);
            }
            _ => {
                if let Some((_, cr, cb)) = cur.take() {
                    out.extend(cb.rebase(cr));
                }
                cur = Some((id, r, b));
            }
        }
    }
    if let Some((_, cr, cb)) = cur {
        out.extend(cb.rebase(cr));
    }
    out
}
