//! Output sinks for large outputs: [`BlockWriter`] (aligned block writes and early
//! writeback, what keeps reshard and convert at `cp` speed; see `src/io/stream.rs` for the
//! reading side), and [`Sink::append_view`], which copies a range of a memory-mapped input
//! file to file in the kernel (`copy_file_range`) where no checksum has to be computed on
//! the way, e.g. the safetensors files of `convert --to hf`.

use std::fs::File;
use std::io::{self, Cursor, Read, Seek, SeekFrom, Write};

use crate::io::bytes::ByteView;
use crate::io::output::WRITE_BLOCK;
use crate::io::piece::Piece;

/// Views shorter than this are written from the map: below it the copy's
/// syscall and setup cost more than the memcpy they save.
pub const KERNEL_COPY_MIN: usize = 1 << 20;

/// A [`Write`] that can also append a [`ByteView`], copying it file to file
/// when both ends are plain files. The default writes the view's bytes.
pub trait Sink: Write {
    /// Appends all of `view`'s bytes.
    ///
    /// # Errors
    /// I/O errors from the write or the copy.
    fn append_view(&mut self, view: &ByteView) -> io::Result<()> {
        self.write_all(view.as_slice())
    }

    /// Hints that `[offset, offset+len)` of the output is final and may go to disk now
    /// (see [`crate::io::mmap::start_writeback`]); a no-op unless the sink is a file.
    fn start_writeback(&mut self, offset: u64, len: u64) {
        let _ = (offset, len);
    }
}

impl Sink for Vec<u8> {}

impl<T> Sink for Cursor<T> where Cursor<T>: Write {}

impl<S: Sink + ?Sized> Sink for &mut S {
    fn append_view(&mut self, view: &ByteView) -> io::Result<()> {
        (**self).append_view(view)
    }

    fn start_writeback(&mut self, offset: u64, len: u64) {
        (**self).start_writeback(offset, len);
    }
}

impl Sink for File {
    fn append_view(&mut self, view: &ByteView) -> io::Result<()> {
        match view.file_range() {
            Some((src, offset)) if view.len() >= KERNEL_COPY_MIN => {
                copy_range(src, offset, view.len() as u64, self)
            }
            _ => self.write_all(view.as_slice()),
        }
    }

    fn start_writeback(&mut self, offset: u64, len: u64) {
        crate::io::mmap::start_writeback(self, offset, len);
    }
}

/// A buffered writer for large outputs whose writes to `inner` are all
/// [`WRITE_BLOCK`] long and start at multiples of it in the file (except a
/// last partial one before a seek or flush). The kernel then fills the page
/// cache in whole aligned folios: 2 GiB in 128 KiB writes measured 0.41 s
/// aligned against 0.55-0.58 s shifted by 64 bytes. Larger writes would be
/// worse on VMs that hand free memory back to the host (see `WRITE_BLOCK`).
///
/// With [`BlockWriter::with_writeback`], every [`WRITEBACK_STEP`] written is handed to the
/// kernel's writeback at once ([`Sink::start_writeback`]), so that the fsync of a durable
/// output overlaps the writing instead of starting after it.
#[derive(Debug)]
pub struct BlockWriter<W: Sink> {
    inner: W,
    buf: Vec<u8>,
    /// The file position of `buf[0]`.
    pos: u64,
    /// Start writeback as we go.
    writeback: bool,
    /// Where the range not yet handed to writeback starts.
    written_back: u64,
}

/// How much written output is handed to writeback at a time.
pub const WRITEBACK_STEP: u64 = 32 << 20;

impl<W: Sink> BlockWriter<W> {
    /// A writer over `inner`, which is at file position 0.
    pub fn new(inner: W) -> Self {
        BlockWriter {
            inner,
            buf: Vec::with_capacity(WRITE_BLOCK),
            pos: 0,
            writeback: false,
            written_back: 0,
        }
    }

    /// Starts writeback of the output as it is written when `on` (for outputs that are
    /// fsynced at the end).
    pub fn with_writeback(mut self, on: bool) -> Self {
        self.writeback = on;
        self
    }

    fn after_write(&mut self) {
        if self.writeback && self.pos >= self.written_back + WRITEBACK_STEP {
            self.inner
                .start_writeback(self.written_back, self.pos - self.written_back);
            self.written_back = self.pos;
        }
    }

    /// Writes out the buffer and returns the inner writer.
    ///
    /// # Errors
    /// The write's I/O error.
    pub fn into_inner(mut self) -> io::Result<W> {
        self.flush_buf()?;
        Ok(self.inner)
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.inner.write_all(&self.buf)?;
            self.pos += self.buf.len() as u64;
            self.buf.clear();
            self.after_write();
        }
        Ok(())
    }

    /// Bytes from the end of the buffer to the next block boundary.
    fn room(&self) -> usize {
        let at = self.pos + self.buf.len() as u64;
        WRITE_BLOCK - (at % WRITE_BLOCK as u64) as usize
    }
}

impl<W: Sink> Write for BlockWriter<W> {
    fn write(&mut self, mut data: &[u8]) -> io::Result<usize> {
        let total = data.len();
        while !data.is_empty() {
            let room = self.room();
            if self.buf.is_empty() && room == WRITE_BLOCK && data.len() >= WRITE_BLOCK {
                // Aligned: whole blocks go straight from the caller's bytes.
                let k = data.len() / WRITE_BLOCK * WRITE_BLOCK;
                for block in data[..k].chunks(WRITE_BLOCK) {
                    self.inner.write_all(block)?;
                }
                self.pos += k as u64;
                data = &data[k..];
                self.after_write();
            } else {
                let k = room.min(data.len());
                self.buf.extend_from_slice(&data[..k]);
                data = &data[k..];
                if k == room {
                    self.flush_buf()?;
                }
            }
        }
        Ok(total)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_buf()?;
        self.inner.flush()
    }
}

impl<W: Sink + Seek> Seek for BlockWriter<W> {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        self.flush_buf()?;
        self.pos = self.inner.seek(to)?;
        Ok(self.pos)
    }
}

impl<W: Sink> Sink for BlockWriter<W> {
    fn append_view(&mut self, view: &ByteView) -> io::Result<()> {
        if view.len() >= KERNEL_COPY_MIN && view.file_range().is_some() {
            self.flush_buf()?;
            self.inner.append_view(view)?;
            self.pos += view.len() as u64;
            self.after_write();
            Ok(())
        } else {
            self.write_all(view.as_slice())
        }
    }
}

/// Appends `len` bytes of `src` from `offset` at `dst`'s position.
///
/// `std::io::copy` between files uses `copy_file_range` on Linux (falling
/// back to `sendfile`/`splice`, then to a buffered copy elsewhere). It reads
/// from `src`'s cursor: we seek it first. The cursor of a mapped input is
/// used by nothing else (its bytes are read through the map), so moving it
/// is harmless.
fn copy_range(src: &File, offset: u64, len: u64, dst: &mut File) -> io::Result<()> {
    let mut src = src;
    src.seek(SeekFrom::Start(offset))?;
    let copied = io::copy(&mut src.take(len), dst)?;
    if copied != len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("input ended after {copied} of {len} bytes being copied"),
        ));
    }
    Ok(())
}

/// A [`Sink`] that counts the bytes going through it.
pub struct Counted<S: Sink> {
    inner: S,
    count: u64,
}

impl<S: Sink> Counted<S> {
    /// Counts what goes to `inner`.
    pub fn new(inner: S) -> Self {
        Counted { inner, count: 0 }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }
}

impl<S: Sink> Write for Counted<S> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(b)?;
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl<S: Sink> Sink for Counted<S> {
    fn append_view(&mut self, view: &ByteView) -> io::Result<()> {
        self.inner.append_view(view)?;
        self.count += view.len() as u64;
        Ok(())
    }

    fn start_writeback(&mut self, offset: u64, len: u64) {
        self.inner.start_writeback(offset, len);
    }
}

/// A [`Sink`] as the destination of a [`RecordSink`] stream (no checksum to
/// keep, e.g. a safetensors file): views go through [`Sink::append_view`].
pub struct Record<'a, S: Sink + ?Sized>(pub &'a mut S);

impl<S: Sink + ?Sized> RecordSink for Record<'_, S> {
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.0.write_all(b)
    }

    fn pieces(&mut self, pieces: &[Piece]) -> io::Result<()> {
        // Views copied in the kernel need no pages mapped here; the others
        // are read through the map.
        let read: Vec<Piece> = pieces
            .iter()
            .filter(|p| !matches!(p, Piece::Bytes(b) if b.len() >= KERNEL_COPY_MIN && b.file_range().is_some()))
            .cloned()
            .collect();
        crate::io::piece::with_pages_of(&read, || {
            for p in pieces {
                match p {
                    Piece::Bytes(b) => self.0.append_view(b)?,
                    Piece::Zeros(n) => crate::io::sink::write_zeros(self, *n)?,
                }
            }
            Ok(())
        })
    }
}

/// Where a record writer (a zip storage record, a DCP chunk) takes the bytes
/// of one record from.
pub trait RecordSink {
    /// Appends `b`.
    ///
    /// # Errors
    /// I/O errors of the output.
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()>;

    /// Appends the `len` bytes that `write` writes (and checksums, so the
    /// record writer need not read them again).
    ///
    /// # Errors
    /// I/O errors; a length other than `len`.
    fn streamed(&mut self, len: u64, write: &mut StreamedWrite<'_>) -> std::io::Result<()> {
        let mut out = Counted::new(BytesOf(self));
        write(&mut out)?;
        check_streamed(len, out.count())
    }

    /// Appends `pieces` in order, reading their mapped source pages ahead
    /// and dropping them from this process afterwards (so that streaming a
    /// model keeps resident memory at about one tensor). The record writer
    /// overrides this to read them on a second thread while it writes (see
    /// `ZipWriter::write_pieces` in `formats::torch::zip`).
    ///
    /// # Errors
    /// I/O errors of the output.
    fn pieces(&mut self, pieces: &[Piece]) -> std::io::Result<()> {
        crate::io::piece::with_pages_of(pieces, || {
            for p in pieces {
                match p {
                    Piece::Bytes(b) => self.bytes(b.as_slice())?,
                    Piece::Zeros(n) => write_zeros(self, *n)?,
                }
            }
            Ok(())
        })
    }
}

/// Writes bytes `write` produces and reports the CRC-32 of, e.g.
/// [`crate::io::stream::Prefetch::write_next`].
pub type StreamedWrite<'a> = dyn FnMut(&mut dyn Sink) -> std::io::Result<crc32fast::Hasher> + 'a;

/// Checks that a streamed write produced exactly `len` bytes.
fn check_streamed(len: u64, written: u64) -> std::io::Result<()> {
    if written == len {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "a tensor streamed {written} bytes, {len} were planned"
        )))
    }
}

impl<F: FnMut(&[u8]) -> std::io::Result<()> + ?Sized> RecordSink for F {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self(b)
    }
}

/// A [`RecordSink`] as a [`Sink`].
struct BytesOf<'a, R: RecordSink + ?Sized>(&'a mut R);

impl<R: RecordSink + ?Sized> std::io::Write for BytesOf<'_, R> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.bytes(b)?;
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<R: RecordSink + ?Sized> Sink for BytesOf<'_, R> {}

/// Writes `n` zero bytes through a sink, a block at a time.
///
/// # Errors
/// I/O errors of the sink.
pub fn write_zeros<S: RecordSink + ?Sized>(sink: &mut S, mut n: u64) -> std::io::Result<()> {
    static ZEROS: [u8; 1 << 16] = [0; 1 << 16];
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        sink.bytes(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mapped(bytes: &[u8]) -> (tempfile::NamedTempFile, ByteView) {
        let mut t = tempfile::NamedTempFile::new().unwrap();
        t.write_all(bytes).unwrap();
        let f = File::open(t.path()).unwrap();
        let map = crate::io::mmap::map_file(&f).unwrap();
        (t, ByteView::from_mapped_file(map, f))
    }

    #[test]
    fn kernel_copy_lands_after_buffered_bytes() {
        let data: Vec<u8> = (0..3 * KERNEL_COPY_MIN)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let (_src, view) = mapped(&data);
        let part = view.slice(5..(2 * KERNEL_COPY_MIN + 5) as u64).unwrap();
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut w = BlockWriter::new(out.reopen().unwrap());
        w.write_all(b"head").unwrap();
        w.append_view(&part).unwrap();
        // A small view goes through the buffer.
        w.append_view(&view.slice(1..3).unwrap()).unwrap();
        w.write_all(b"tail").unwrap();
        w.flush().unwrap();
        let got = std::fs::read(out.path()).unwrap();
        let mut want = b"head".to_vec();
        want.extend_from_slice(part.as_slice());
        want.extend_from_slice(&data[1..3]);
        want.extend_from_slice(b"tail");
        assert_eq!(got.len(), want.len());
        assert!(got == want);
    }

    #[test]
    fn views_without_a_file_are_written() {
        let v = ByteView::from_vec(vec![9; KERNEL_COPY_MIN + 1]);
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut f = out.reopen().unwrap();
        f.append_view(&v).unwrap();
        assert_eq!(std::fs::read(out.path()).unwrap(), v.as_slice());
    }

    /// Every write reaching the file is one whole aligned block, except a
    /// partial one before a seek or flush; the bytes are those written.
    #[test]
    fn block_writer_writes_aligned_blocks() {
        #[derive(Default)]
        struct Log {
            data: Vec<u8>,
            pos: usize,
            writes: Vec<(usize, usize)>,
            hints: Vec<(u64, u64)>,
        }
        impl Write for Log {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.writes.push((self.pos, b.len()));
                let end = self.pos + b.len();
                if self.data.len() < end {
                    self.data.resize(end, 0);
                }
                self.data[self.pos..end].copy_from_slice(b);
                self.pos = end;
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl Sink for Log {
            fn start_writeback(&mut self, offset: u64, len: u64) {
                self.hints.push((offset, len));
            }
        }
        impl Seek for Log {
            fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
                let SeekFrom::Start(p) = to else {
                    unreachable!()
                };
                self.pos = p as usize;
                Ok(p)
            }
        }
        let data: Vec<u8> = (0..5 * WRITE_BLOCK + 77).map(|i| (i % 249) as u8).collect();
        let mut w = BlockWriter::new(Log::default());
        w.write_all(&data[..100]).unwrap();
        w.write_all(&data[100..3 * WRITE_BLOCK + 5]).unwrap();
        w.write_all(&data[3 * WRITE_BLOCK + 5..]).unwrap();
        w.seek(SeekFrom::Start(10)).unwrap();
        w.write_all(b"patch").unwrap();
        w.seek(SeekFrom::Start(data.len() as u64)).unwrap();
        w.flush().unwrap();
        let log = w.inner;
        assert!(log.hints.is_empty(), "no writeback unless asked");
        let mut want = data.clone();
        want[10..15].copy_from_slice(b"patch");
        assert!(log.data == want);
        let blocks = &log.writes[..log.writes.len() - 2];
        assert!(
            blocks
                .iter()
                .all(|&(at, n)| at % WRITE_BLOCK == 0 && n == WRITE_BLOCK),
            "{blocks:?}"
        );
        assert_eq!(log.writes[log.writes.len() - 2], (5 * WRITE_BLOCK, 77));
        assert_eq!(log.writes[log.writes.len() - 1], (10, 5));
    }

    /// With writeback on, each step of written output is handed to the kernel once, in
    /// order, and the bytes are unchanged.
    #[test]
    fn block_writer_starts_writeback_as_it_goes() {
        let out = tempfile::NamedTempFile::new().unwrap();
        let mut w = BlockWriter::new(out.reopen().unwrap()).with_writeback(true);
        let chunk = vec![7u8; 3 * WRITE_BLOCK + 1];
        let mut n = 0u64;
        while n < 3 * WRITEBACK_STEP {
            w.write_all(&chunk).unwrap();
            n += chunk.len() as u64;
        }
        w.flush().unwrap();
        assert_eq!(std::fs::metadata(out.path()).unwrap().len(), n);
        // (the hints themselves are only visible to the kernel; the logged ones are
        // checked with a fake sink)
        struct Hints(Vec<(u64, u64)>, u64);
        impl Write for Hints {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.1 += b.len() as u64;
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl Sink for Hints {
            fn start_writeback(&mut self, offset: u64, len: u64) {
                self.0.push((offset, len));
            }
        }
        let mut w = BlockWriter::new(Hints(Vec::new(), 0)).with_writeback(true);
        for _ in 0..(n / chunk.len() as u64) {
            w.write_all(&chunk).unwrap();
        }
        let h = w.into_inner().unwrap();
        assert!(h.0.len() >= 2, "{:?}", h.0);
        let mut next = 0;
        for &(off, len) in &h.0 {
            assert_eq!(off, next);
            assert!(len >= WRITEBACK_STEP);
            next = off + len;
        }
        assert!(next <= h.1);
    }
}
