//! Streams tensor pieces into an output on two threads: a helper reads the
//! source into large buffers (file-backed views with `pread`, small mapped
//! pieces such as the rows of a row-parallel split through the map) and
//! computes the CRC-32 the zip record needs, while the calling thread only
//! writes the buffers out.
//!
//! Why not write straight from the map: on a VM, copying out of page-cache
//! pages mapped into the process costs several times a kernel copy (4 KiB
//! TLB entries), plus populating and dropping the mapping. And why not
//! `copy_file_range`: it only runs at `cp` speed when source and
//! destination offsets agree modulo 64 KiB, which zip payload offsets do
//! not. `pread` into a buffer reused while it is hot, then `write`, keeps the
//! writing thread's work per byte close to `cp`'s.

use std::io;
use std::sync::{mpsc, Mutex};

use crate::io::bytes::ByteView;
use crate::io::piece::{with_pages_of, Piece};
use crate::io::sink::Sink;

/// Size of the buffers pieces are gathered into.
const CHUNK: usize = 2 << 20;

/// Gathered buffers queued between the two threads.
const IN_FLIGHT: usize = 3;

/// Most buffers that exist at once: queued, one being written, one being
/// filled.
const BUFFERS: usize = IN_FLIGHT + 2;

/// File-backed views at least this long are read with `pread`; shorter ones
/// (a row of a row-parallel split) are copied from the map, where one
/// syscall per piece would cost more than the copy.
const PREAD_MIN: usize = 64 << 10;

/// Buffers kept between calls: a fresh 4 MiB allocation per tensor would
/// cost a page fault per page every time.
static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// What the reader hands the writer: a filled buffer (and how many of its
/// bytes are data), or the end of a job with the CRC-32 of its bytes.
enum Msg {
    Data(Vec<u8>, usize),
    End(crc32fast::Hasher),
}

fn is_pread(p: &Piece) -> bool {
    matches!(p, Piece::Bytes(b) if b.len() >= PREAD_MIN && b.file_range().is_some())
}

/// A reader thread that runs ahead through a list of jobs (each a list of
/// pieces, e.g. the tensors of one rank file, in the order they are
/// written), so that reading one tensor overlaps writing the one before
/// and the writer never waits at tensor boundaries. It holds at most
/// `BUFFERS` buffers of `CHUNK` bytes, whatever the model size.
pub struct Prefetch<'scope> {
    full: mpsc::Receiver<Msg>,
    free: mpsc::Sender<Vec<u8>>,
    reader: Option<std::thread::ScopedJoinHandle<'scope, io::Result<()>>>,
}

impl<'scope> Prefetch<'scope> {
    /// Starts reading `jobs` in order on a thread of `scope`.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub fn start<'env>(
        scope: &'scope std::thread::Scope<'scope, 'env>,
        jobs: Vec<&'env [Piece]>,
    ) -> io::Result<Prefetch<'scope>> {
        let (full_tx, full) = mpsc::sync_channel::<Msg>(IN_FLIGHT);
        let (free, free_rx) = mpsc::channel::<Vec<u8>>();
        let reader = std::thread::Builder::new()
            .name("nemo-tool-read".into())
            .spawn_scoped(scope, move || read_side(&jobs, full_tx, free_rx))?;
        Ok(Prefetch {
            full,
            free,
            reader: Some(reader),
        })
    }

    /// Writes the next job's bytes to `out` and returns their CRC-32 state.
    ///
    /// # Errors
    /// I/O errors of `out`; the reader's error (reading the source) or
    /// panic; asking for more jobs than were given.
    pub fn write_next<S: Sink + ?Sized>(&mut self, out: &mut S) -> io::Result<crc32fast::Hasher> {
        loop {
            match self.full.recv() {
                Ok(Msg::Data(buf, n)) => {
                    // Our outputs split this into aligned blocks
                    // (`sink::BlockWriter`).
                    out.write_all(&buf[..n])?;
                    // The reader may be gone after its last buffer.
                    let _ = self.free.send(buf);
                }
                Ok(Msg::End(crc)) => return Ok(crc),
                Err(_) => return Err(self.reader_error()),
            }
        }
    }

    /// Why the reader stopped sending.
    fn reader_error(&mut self) -> io::Error {
        match self.reader.take().map(|h| h.join()) {
            Some(Ok(Err(e))) => e,
            Some(Err(_)) => io::Error::other("the reading thread panicked"),
            _ => io::Error::other("no more tensors were planned to be read"),
        }
    }
}

/// Writes `pieces` in order to `out` and returns their CRC-32 state, reading
/// them on a second thread (see [`Prefetch`]).
///
/// # Errors
/// As [`Prefetch::write_next`].
pub fn write_checksummed<S: Sink + ?Sized>(
    out: &mut S,
    pieces: &[Piece],
) -> io::Result<crc32fast::Hasher> {
    std::thread::scope(|scope| Prefetch::start(scope, vec![pieces])?.write_next(out))
}

/// The reader: fills buffers with each job's pieces in order, checksums
/// them, and ends each job with its CRC. Mapped pieces are populated in one
/// call per span instead of a fault per page, and dropped again after the
/// job (see [`crate::io::mmap::release`]). Returns early, without an error,
/// when the writer hangs up.
fn read_side(
    jobs: &[&[Piece]],
    full: mpsc::SyncSender<Msg>,
    free: mpsc::Receiver<Vec<u8>>,
) -> io::Result<()> {
    let mut pool = POOL
        .lock()
        .map(|mut p| std::mem::take(&mut *p))
        .unwrap_or_default();
    let buf = pool.pop().unwrap_or_else(|| vec![0; CHUNK]);
    let mut g = Gatherer {
        crc: crc32fast::Hasher::new(),
        buf,
        len: 0,
        allocated: 1,
        pool,
        full,
        free,
    };
    let read = (|| -> io::Result<Option<()>> {
        for pieces in jobs {
            let mapped: Vec<Piece> = pieces.iter().filter(|p| !is_pread(p)).cloned().collect();
            let sent = with_pages_of(&mapped, || -> io::Result<Option<()>> {
                for p in pieces.iter() {
                    let sent = match p {
                        Piece::Bytes(b) if is_pread(p) => g.put_read(b)?,
                        Piece::Bytes(b) => g.put(b.as_slice()),
                        Piece::Zeros(n) => g.put_zeros(*n),
                    };
                    if sent.is_none() {
                        return Ok(None);
                    }
                }
                Ok(g.end_job())
            })?;
            if sent.is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    })();
    // Keep the buffers for the next call (those still with the writer are
    // dropped with the channel).
    if let Ok(mut pool) = POOL.lock() {
        pool.extend(g.free.try_iter().chain(g.pool).chain([g.buf]));
        pool.truncate(BUFFERS);
    }
    read.map(|_| ())
}

/// The helper's buffer, recycled through the writer.
struct Gatherer {
    crc: crc32fast::Hasher,
    buf: Vec<u8>,
    len: usize,
    allocated: usize,
    /// Buffers from earlier calls, used before allocating.
    pool: Vec<Vec<u8>>,
    full: mpsc::SyncSender<Msg>,
    free: mpsc::Receiver<Vec<u8>>,
}

impl Gatherer {
    /// Room left in the buffer.
    fn room(&self) -> usize {
        CHUNK - self.len
    }

    /// `None` when the writer hung up.
    fn advance(&mut self, k: usize) -> Option<()> {
        self.len += k;
        if self.len == CHUNK {
            self.flush()?;
        }
        Some(())
    }

    fn put(&mut self, mut bytes: &[u8]) -> Option<()> {
        while !bytes.is_empty() {
            let k = bytes.len().min(self.room());
            self.buf[self.len..self.len + k].copy_from_slice(&bytes[..k]);
            bytes = &bytes[k..];
            self.advance(k)?;
        }
        Some(())
    }

    /// Reads a file-backed view with `pread` (a kernel copy into the buffer,
    /// no page-table work). `Ok(None)` when the writer hung up.
    #[cfg(unix)]
    fn put_read(&mut self, v: &ByteView) -> io::Result<Option<()>> {
        use std::os::unix::fs::FileExt;
        let Some((file, mut off)) = v.file_range() else {
            return Ok(self.put(v.as_slice()));
        };
        let mut left = v.len();
        while left > 0 {
            let k = left.min(self.room());
            file.read_exact_at(&mut self.buf[self.len..self.len + k], off)?;
            off += k as u64;
            left -= k;
            if self.advance(k).is_none() {
                return Ok(None);
            }
        }
        Ok(Some(()))
    }

    #[cfg(not(unix))]
    fn put_read(&mut self, v: &ByteView) -> io::Result<Option<()>> {
        Ok(self.put(v.as_slice()))
    }

    fn put_zeros(&mut self, mut n: u64) -> Option<()> {
        while n > 0 {
            let k = n.min(self.room() as u64) as usize;
            self.buf[self.len..self.len + k].fill(0);
            n -= k as u64;
            self.advance(k)?;
        }
        Some(())
    }

    /// Checksums the buffer, hands it (if not empty) to the writer and takes
    /// an empty one: a returned one, a pooled or new one while fewer than
    /// [`BUFFERS`] exist, or else waits for one to come back. `None` when
    /// the writer hung up.
    fn flush(&mut self) -> Option<()> {
        if self.len == 0 {
            return Some(());
        }
        self.crc.update(&self.buf[..self.len]);
        let n = std::mem::take(&mut self.len);
        let next = match self.free.try_recv() {
            Ok(b) => b,
            Err(_) if self.allocated < BUFFERS => {
                self.allocated += 1;
                self.pool.pop().unwrap_or_else(|| vec![0; CHUNK])
            }
            Err(_) => {
                // Send first so that the writer can return one.
                let full = std::mem::take(&mut self.buf);
                self.full.send(Msg::Data(full, n)).ok()?;
                self.buf = self.free.recv().ok()?;
                return Some(());
            }
        };
        let full = std::mem::replace(&mut self.buf, next);
        self.full.send(Msg::Data(full, n)).ok()
    }

    /// Sends the rest of a job and its CRC, and starts the next CRC.
    fn end_job(&mut self) -> Option<()> {
        self.flush()?;
        let crc = std::mem::replace(&mut self.crc, crc32fast::Hasher::new());
        self.full.send(Msg::End(crc)).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mapped(bytes: &[u8]) -> (tempfile::NamedTempFile, ByteView) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        let f = std::fs::File::open(t.path()).unwrap();
        let map = crate::io::mmap::map_file(&f).unwrap();
        (t, ByteView::from_mapped_file(map, f))
    }

    /// Every kind of piece, across buffer boundaries, in order, with the
    /// CRC of exactly the bytes written.
    #[test]
    fn pieces_arrive_in_order_with_their_crc() {
        let data: Vec<u8> = (0..3 * CHUNK + 12345)
            .map(|i| (i * 31 % 253) as u8)
            .collect();
        let (_f, view) = mapped(&data);
        let owned = ByteView::from_vec(data[..CHUNK + 7].to_vec());
        let mut pieces = vec![
            Piece::Bytes(view.slice(3..(2 * CHUNK + 3) as u64).unwrap()),
            Piece::Zeros(CHUNK as u64 + 5),
            Piece::Bytes(owned.clone()),
        ];
        for r in 0..300u64 {
            // Row-sized mapped pieces, read through the map.
            pieces.push(Piece::Bytes(view.slice_len(r * 1000, 999).unwrap()));
        }
        pieces.push(Piece::Bytes(
            view.slice(100..(PREAD_MIN + 101) as u64).unwrap(),
        ));
        let mut want = Vec::new();
        for p in &pieces {
            match p {
                Piece::Bytes(b) => want.extend_from_slice(b.as_slice()),
                Piece::Zeros(n) => want.resize(want.len() + *n as usize, 0),
            }
        }
        for _ in 0..2 {
            // The second round reuses pooled buffers.
            let mut out = Vec::new();
            let crc = write_checksummed(&mut out, &pieces).unwrap();
            assert!(out == want);
            assert_eq!(crc.finalize(), crc32fast::hash(&want));
        }
        assert_eq!(
            write_checksummed(&mut Vec::new(), &[]).unwrap().finalize(),
            0
        );
    }

    /// A failing writer stops the helper and reports its error.
    #[test]
    fn a_write_error_is_reported() {
        struct Full(usize);
        impl Write for Full {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                if self.0 == 0 {
                    return Err(io::Error::other("disk full"));
                }
                self.0 -= 1;
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl Sink for Full {}
        let pieces = [Piece::Zeros(20 * CHUNK as u64)];
        let e = write_checksummed(&mut Full(2), &pieces).unwrap_err();
        assert_eq!(e.to_string(), "disk full");
    }

    /// The reader runs through several jobs; each `write_next` gets exactly
    /// one job's bytes and CRC, and asking for one more is an error.
    #[test]
    fn jobs_come_one_at_a_time() {
        let data: Vec<u8> = (0..2 * CHUNK).map(|i| (i % 241) as u8).collect();
        let (_f, view) = mapped(&data);
        let jobs: Vec<Vec<Piece>> = vec![
            vec![Piece::Bytes(view.slice(0..(CHUNK + 9) as u64).unwrap())],
            vec![],
            vec![Piece::Zeros(3), Piece::Bytes(view.slice(7..40).unwrap())],
        ];
        std::thread::scope(|scope| {
            let mut ahead = Prefetch::start(scope, jobs.iter().map(|j| &j[..]).collect()).unwrap();
            for job in &jobs {
                let want = crate::io::piece::concat(job);
                let mut out = Vec::new();
                let crc = ahead.write_next(&mut out).unwrap();
                assert!(out == want);
                assert_eq!(crc.finalize(), crc32fast::hash(&want));
            }
            let e = ahead.write_next(&mut Vec::new()).unwrap_err();
            assert!(e.to_string().contains("no more tensors"), "{e}");
        });
    }

    /// A source that cannot be read (here: truncated under us) is an
    /// error naming the cause, not a hang or short output.
    #[test]
    fn a_read_error_is_reported() {
        let data = vec![5u8; 2 * PREAD_MIN];
        let (f, view) = mapped(&data);
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap()
            .set_len(10)
            .unwrap();
        let e = write_checksummed(&mut Vec::new(), &[Piece::Bytes(view)]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
    }
}
