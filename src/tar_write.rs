//! A streaming tar writer that produces the bytes Python's `tarfile` writes
//! for NeMo's `tar.add(dir, arcname=".")` (PAX format, Python 3.8+): a `./`
//! root entry, `./name` members, directories with a trailing `/`, mode 0644
//! files and 0755 directories, uid/gid 0, empty user/group names, a fixed
//! mtime (0 by default, for reproducible output), PAX `path`/`size` records
//! when a name or size does not fit ustar, two zero blocks and padding to
//! the 10240-byte record at the end.
//!
//! Entries are written in the order given; [`python_add_order`] sorts names
//! the way `tarfile.add` walks a folder. Sizes are declared up front so the
//! header can be written before the data streams through.

use std::cmp::Ordering;
use std::io::{self, Read, Write};

/// Tar block size.
const BLOCK: usize = 512;
/// Python's `tarfile.RECORDSIZE`: the archive is padded to a multiple of it.
const RECORD: u64 = 20 * BLOCK as u64;
/// Largest value an 11-digit octal field holds (8 GiB - 1).
const MAX_OCTAL_12: u64 = (1 << 33) - 1;
/// `tarfile.LENGTH_NAME`.
const NAME_LEN: usize = 100;

/// Errors from writing a tar.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The member name cannot be written safely.
    #[error("tar entry name {name:?}: {reason}")]
    BadName {
        /// The name given.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// The data source gave a different number of bytes than declared.
    #[error("tar entry {name}: {declared} bytes declared, {written} supplied")]
    SizeMismatch {
        /// The entry.
        name: String,
        /// Size declared in the header.
        declared: u64,
        /// Bytes the source supplied (counting stops at `declared + 1`).
        written: u64,
    },
    /// Reading the source or writing the output failed.
    #[error("tar entry {name}: {source}")]
    Io {
        /// The entry being written.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An earlier error left the archive incomplete; it must be discarded.
    #[error("tar writer: an earlier entry failed; the archive is incomplete")]
    Poisoned,
}

/// A file or a directory entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// Regular file, mode 0644.
    File,
    /// Directory, mode 0755.
    Dir,
}

/// The name as stored: `./` + normalised name, plus `/` for directories;
/// the root directory (`""`, `"."`, `"./"`) is `./`.
///
/// # Errors
/// [`Error::BadName`] for absolute names, `..` components, NUL bytes, and an
/// empty file name.
pub fn tar_path(name: &str, kind: EntryKind) -> Result<String, Error> {
    let bad = |reason| Error::BadName {
        name: name.to_string(),
        reason,
    };
    if name.starts_with('/') {
        return Err(bad("absolute paths are not allowed"));
    }
    if name.contains('\0') {
        return Err(bad("NUL bytes are not allowed"));
    }
    let mut parts = Vec::new();
    for part in name.split('/') {
        match part {
            "" | "." => {}
            ".." => return Err(bad("`..` components are not allowed")),
            p => parts.push(p),
        }
    }
    let mut out = String::from(".");
    for p in &parts {
        out.push('/');
        out.push_str(p);
    }
    match kind {
        EntryKind::Dir => out.push('/'),
        EntryKind::File if parts.is_empty() => return Err(bad("a file needs a name")),
        EntryKind::File => {}
    }
    Ok(out)
}

/// The header block(s) for one entry: a PAX extended header when needed,
/// then the ustar header. Useful to plan byte offsets before writing.
///
/// # Errors
/// As for [`tar_path`].
pub fn entry_header(name: &str, kind: EntryKind, size: u64, mtime: u64) -> Result<Vec<u8>, Error> {
    let path = tar_path(name, kind)?;
    let size = if kind == EntryKind::Dir { 0 } else { size };
    // Same tests and order as Python's `TarInfo.create_pax_header`.
    let mut pax: Vec<(&str, String)> = Vec::new();
    if !path.is_ascii() || path.len() > NAME_LEN {
        pax.push(("path", path.clone()));
    }
    let size_field = if size > MAX_OCTAL_12 {
        pax.push(("size", size.to_string()));
        0
    } else {
        size
    };
    let mtime_field = if mtime > MAX_OCTAL_12 {
        pax.push(("mtime", mtime.to_string()));
        0
    } else {
        mtime
    };
    let mut out = Vec::with_capacity(3 * BLOCK);
    if !pax.is_empty() {
        let mut records = Vec::new();
        for (key, value) in &pax {
            records.extend_from_slice(&pax_record(key, value));
        }
        out.extend_from_slice(&ustar_header(
            "././@PaxHeader",
            0,
            records.len() as u64,
            0,
            b'x',
        ));
        out.extend_from_slice(&records);
        out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
    }
    let (mode, flag) = match kind {
        EntryKind::File => (0o644, b'0'),
        EntryKind::Dir => (0o755, b'5'),
    };
    out.extend_from_slice(&ustar_header(&path, mode, size_field, mtime_field, flag));
    Ok(out)
}

/// One PAX record `"<len> <key>=<value>\n"`, where `<len>` counts itself.
fn pax_record(key: &str, value: &str) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body;
    // Converges in at most two steps: adding the digits may add one digit.
    loop {
        let total = body + len.to_string().len();
        if total == len {
            break;
        }
        len = total;
    }
    format!("{len} {key}={value}\n").into_bytes()
}

/// A ustar header as Python's `TarInfo._create_header` lays it out.
pub(crate) fn ustar_header(name: &str, mode: u32, size: u64, mtime: u64, flag: u8) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    // Python encodes the ustar name as ASCII with `?` for other characters,
    // truncated to 100 bytes; the PAX `path` record carries the real name.
    let ascii: Vec<u8> = name
        .chars()
        .map(|c| if c.is_ascii() { c as u8 } else { b'?' })
        .take(NAME_LEN)
        .collect();
    h[..ascii.len()].copy_from_slice(&ascii);
    put_octal(&mut h[100..108], u64::from(mode));
    put_octal(&mut h[108..116], 0);
    put_octal(&mut h[116..124], 0);
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], mtime);
    h[148..156].copy_from_slice(b"        ");
    h[156] = flag;
    h[257..265].copy_from_slice(b"ustar\x0000");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let chk = format!("{sum:06o}\0");
    h[148..155].copy_from_slice(chk.as_bytes());
    h
}

/// Zero-padded octal with a trailing NUL, filling the field (callers keep
/// values below `8^(len-1)`).
fn put_octal(field: &mut [u8], value: u64) {
    let digits = field.len() - 1;
    let text = format!("{value:0digits$o}");
    field[..digits].copy_from_slice(text.as_bytes());
    field[digits] = 0;
}

/// Sorts member names the way `tarfile.add` recurses a folder: siblings in
/// sorted order, each directory followed by its contents (so `a`, `a/b`,
/// `a.txt`, not the plain string order `a`, `a.txt`, `a/b`).
pub fn python_add_order(a: &str, b: &str) -> Ordering {
    a.split('/').cmp(b.split('/'))
}

/// Streams tar entries into `W`.
pub struct TarWriter<W: Write> {
    out: W,
    mtime: u64,
    position: u64,
    poisoned: bool,
}

impl<W: Write> TarWriter<W> {
    /// A writer with mtime 0.
    pub fn new(out: W) -> Self {
        TarWriter {
            out,
            mtime: 0,
            position: 0,
            poisoned: false,
        }
    }

    /// Sets the mtime (seconds since the epoch) written for every entry.
    pub fn with_mtime(mut self, mtime: u64) -> Self {
        self.mtime = mtime;
        self
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Writes a directory entry (`""` or `"."` for the `./` root).
    ///
    /// # Errors
    /// A bad name or a write error.
    pub fn append_dir(&mut self, name: &str) -> Result<(), Error> {
        let header = entry_header(name, EntryKind::Dir, 0, self.mtime)?;
        self.write(name, &header)
    }

    /// Writes a file entry whose `size` bytes come from `data`. Exactly
    /// `size` bytes must be available: fewer, or more, is an error (and the
    /// archive is then incomplete).
    ///
    /// # Errors
    /// A bad name, a read/write error, or [`Error::SizeMismatch`].
    pub fn append_file(&mut self, name: &str, size: u64, data: impl Read) -> Result<(), Error> {
        let header = entry_header(name, EntryKind::File, size, self.mtime)?;
        self.write(name, &header)?;
        // Take one extra byte so a source longer than declared is caught.
        let mut limited = data.take(size.saturating_add(1));
        let mut buf = vec![0u8; 1 << 20];
        let mut copied: u64 = 0;
        loop {
            let n = match limited.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    self.poisoned = true;
                    return Err(Error::Io {
                        name: name.to_string(),
                        source,
                    });
                }
            };
            let keep = usize::try_from(size - copied).map_or(n, |left| n.min(left));
            if keep > 0 {
                self.write(name, buf.get(..keep).unwrap_or(&[]))?;
            }
            copied += n as u64;
            if copied > size {
                break;
            }
        }
        self.finish_entry(name, size, copied)
    }

    /// Writes a file entry from in-memory pieces (mmap slices, zero fill)
    /// whose lengths must add up to `size`.
    ///
    /// # Errors
    /// A bad name, a write error, or [`Error::SizeMismatch`] (detected before
    /// writing past `size`).
    pub fn append_pieces<I, B>(&mut self, name: &str, size: u64, pieces: I) -> Result<(), Error>
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        let header = entry_header(name, EntryKind::File, size, self.mtime)?;
        self.write(name, &header)?;
        let mut copied: u64 = 0;
        for piece in pieces {
            let piece = piece.as_ref();
            let after = copied.saturating_add(piece.len() as u64);
            if after > size {
                self.poisoned = true;
                return Err(Error::SizeMismatch {
                    name: name.to_string(),
                    declared: size,
                    written: after,
                });
            }
            self.write(name, piece)?;
            copied = after;
        }
        self.finish_entry(name, size, copied)
    }

    fn finish_entry(&mut self, name: &str, size: u64, copied: u64) -> Result<(), Error> {
        if copied != size {
            self.poisoned = true;
            return Err(Error::SizeMismatch {
                name: name.to_string(),
                declared: size,
                written: copied,
            });
        }
        let pad = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        self.write(name, &[0u8; BLOCK][..pad as usize])
    }

    /// Writes the end-of-archive marker (two zero blocks), pads to Python's
    /// 10240-byte record size, flushes, and returns the output.
    ///
    /// # Errors
    /// A write error, or [`Error::Poisoned`] after an earlier failure.
    pub fn finish(mut self) -> Result<W, Error> {
        let end = self.position + 2 * BLOCK as u64;
        let total = end.div_ceil(RECORD) * RECORD;
        let zeros = [0u8; BLOCK];
        while self.position < total {
            self.write("(end of archive)", &zeros)?;
        }
        self.out.flush().map_err(|source| Error::Io {
            name: "(end of archive)".into(),
            source,
        })?;
        Ok(self.out)
    }

    fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), Error> {
        if self.poisoned {
            return Err(Error::Poisoned);
        }
        if let Err(source) = self.out.write_all(bytes) {
            self.poisoned = true;
            return Err(Error::Io {
                name: name.to_string(),
                source,
            });
        }
        self.position += bytes.len() as u64;
        Ok(())
    }
}
