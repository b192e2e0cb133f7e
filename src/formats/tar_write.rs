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
use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::io::sink::Sink;

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

impl<W: Sink + Seek> TarWriter<W> {
    /// Writes a file entry whose size is only known once `fill` has written
    /// it: the header goes out with size 0, the data streams through, then the
    /// header is patched in place. This lets a serializer stream straight
    /// into the archive without a measuring pass or a temporary file. Sizes
    /// beyond ustar's octal limit (8 GiB) use GNU base-256, which Python's
    /// `tarfile` (and so NeMo) reads. Returns the entry's size.
    ///
    /// # Errors
    /// A bad name, or a write/seek error from `fill` or the output.
    pub fn append_streamed<F>(&mut self, name: &str, fill: F) -> Result<u64, Error>
    where
        F: FnOnce(&mut dyn Sink) -> io::Result<()>,
    {
        let header = entry_header(name, EntryKind::File, 0, self.mtime)?;
        self.write(name, &header)?;
        let data_start = self.position;
        let io = |source| Error::Io {
            name: name.to_string(),
            source,
        };
        let mut counting = crate::io::sink::Counted::new(&mut self.out);
        let filled = fill(&mut counting);
        let size = counting.count();
        self.position += size;
        if let Err(e) = filled {
            self.poisoned = true;
            return Err(io(e));
        }
        let path = tar_path(name, EntryKind::File)?;
        let mtime = if self.mtime > MAX_OCTAL_12 {
            0
        } else {
            self.mtime
        };
        let mut ustar = ustar_header(&path, 0o644, 0, mtime, b'0');
        set_size(&mut ustar, size);
        let patch = (|| {
            self.out.seek(SeekFrom::Start(data_start - BLOCK as u64))?;
            self.out.write_all(&ustar)?;
            self.out.seek(SeekFrom::Start(data_start + size))?;
            Ok(())
        })();
        if let Err(e) = patch {
            self.poisoned = true;
            return Err(io(e));
        }
        self.finish_entry(name, size, size)?;
        Ok(size)
    }
}

/// Writes `size` into a ustar header (octal, or GNU base-256 past 8 GiB) and
/// recomputes its checksum.
fn set_size(h: &mut [u8; BLOCK], size: u64) {
    if size <= MAX_OCTAL_12 {
        put_octal(&mut h[124..136], size);
    } else {
        h[124] = 0x80;
        h[125..128].fill(0);
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    let chk = format!("{sum:06o}\0");
    h[148..155].copy_from_slice(chk.as_bytes());
}

/// The failures every archive writer (pack, reshard, convert) has in
/// common; each writer's error wraps it as its `Write` variant.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Creating or committing the output.
    #[error(transparent)]
    Output(#[from] crate::io::output::Error),
    /// Writing the tar.
    #[error(transparent)]
    Tar(#[from] Error),
    /// Reading a source member.
    #[error(transparent)]
    Archive(#[from] crate::formats::archive::Error),
    /// Writing a member's bytes.
    #[error("{member}: {source}")]
    Member {
        /// The member.
        member: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// `From` each [`WriteError`] cause for a writer's error type with a
/// `Write(WriteError)` variant, so `?` works on them directly.
macro_rules! from_write_errors {
    ($t:ty) => {
        impl From<crate::io::output::Error> for $t {
            fn from(e: crate::io::output::Error) -> Self {
                Self::Write(e.into())
            }
        }
        impl From<crate::formats::tar_write::Error> for $t {
            fn from(e: crate::formats::tar_write::Error) -> Self {
                Self::Write(e.into())
            }
        }
        impl From<crate::formats::archive::Error> for $t {
            fn from(e: crate::formats::archive::Error) -> Self {
                Self::Write(e.into())
            }
        }
    };
}
pub(crate) use from_write_errors;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::archive::{Archive, MemberKind};
    use std::path::Path;

    /// Rewrites an archive member by member through the writer.
    fn rewrite(a: &Archive) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        w.append_dir("").unwrap();
        for m in a.members() {
            match m.kind {
                MemberKind::Dir => w.append_dir(&m.name).unwrap(),
                MemberKind::File => {
                    let bytes = a.read(&m.name).unwrap();
                    w.append_pieces(&m.name, m.size, [bytes]).unwrap()
                }
            }
        }
        w.finish().unwrap()
    }

    #[test]
    fn rewrites_fixtures_byte_for_byte() {
        // The fixtures were written by Python's tarfile (mtime reset to 0).
        for fx in [
            "tiny_llama_tp1.nemo",
            "tiny_llama_tp2.nemo",
            "tiny_llama_dist_tp1.nemo",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("fixtures/mcore/llama/nemo")
                .join(fx);
            let original = std::fs::read(&path).unwrap();
            let a = Archive::open(&path).unwrap();
            let ours = rewrite(&a);
            assert_eq!(ours.len(), original.len(), "{fx}");
            assert!(ours == original, "{fx}: bytes differ");
        }
    }

    #[test]
    fn streamed_entries_equal_declared_ones() {
        let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let mut a = TarWriter::new(Vec::new());
        a.append_dir("").unwrap();
        a.append_pieces(&format!("dir/{}", "n".repeat(150)), 1000, [&data])
            .unwrap();
        a.append_pieces("b.txt", 3, [b"abc"]).unwrap();
        let a = a.finish().unwrap();
        let mut b = TarWriter::new(std::io::Cursor::new(Vec::new()));
        b.append_dir("").unwrap();
        let n = b
            .append_streamed(&format!("dir/{}", "n".repeat(150)), |w| {
                w.write_all(&data[..10])?;
                w.write_all(&data[10..])
            })
            .unwrap();
        assert_eq!(n, 1000);
        b.append_streamed("b.txt", |w| w.write_all(b"abc")).unwrap();
        let b = b.finish().unwrap().into_inner();
        assert!(
            a == b,
            "streamed entries must be byte-identical to declared ones"
        );
    }

    #[test]
    fn huge_sizes_use_base256() {
        let mut h = ustar_header("./x", 0o644, 0, 0, b'0');
        set_size(&mut h, 9 << 30);
        assert_eq!(h[124], 0x80);
        assert_eq!(u64::from_be_bytes(h[128..136].try_into().unwrap()), 9 << 30);
        let idx = crate::formats::archive::Archive::from_tar_bytes("x", {
            let mut v = h.to_vec();
            v.resize(512 * 3, 0);
            crate::io::bytes::ByteView::from_vec(v)
        });
        // The reader sees the 9 GiB size (and then refuses the truncated data).
        let err = idx.unwrap_err().to_string();
        assert!(err.contains("512..9663676928"), "{err}");
    }

    #[test]
    fn long_names_get_a_pax_path_record() {
        let name = format!("model_weights/{}", "x".repeat(120));
        let h = entry_header(&name, EntryKind::File, 10, 0).unwrap();
        assert_eq!(h.len(), 3 * BLOCK);
        assert_eq!(&h[..14], b"././@PaxHeader");
        assert_eq!(h[156], b'x');
        let full = format!("./{name}");
        assert_eq!(full.len(), 136);
        let record = format!("146 path={full}\n");
        assert_eq!(&h[512..512 + record.len()], record.as_bytes());
        // The ustar header keeps the first 100 bytes and the real size.
        assert_eq!(&h[1024..1124], &full.as_bytes()[..100]);
        assert_eq!(&h[1024 + 124..1024 + 136], b"00000000012\0");
        // Exactly 100 bytes still fits ustar.
        let fits = "y".repeat(98);
        assert_eq!(
            entry_header(&fits, EntryKind::File, 0, 0).unwrap().len(),
            BLOCK
        );
    }

    #[test]
    fn sizes_over_8_gib_get_a_pax_size_record() {
        let nine: u64 = 9 << 30;
        let h = entry_header("model_weights.ckpt", EntryKind::File, nine, 0).unwrap();
        assert_eq!(h.len(), 3 * BLOCK);
        assert_eq!(&h[512..512 + 19], b"19 size=9663676416\n");
        assert_eq!(&h[1024 + 124..1024 + 136], b"00000000000\0");
        // 8 GiB - 1 is the largest octal size.
        let max = entry_header("m", EntryKind::File, (8 << 30) - 1, 0).unwrap();
        assert_eq!((max.len(), &max[124..136]), (BLOCK, &b"77777777777\0"[..]));
        // Our reader takes the size from the record.
        let mut tar = h.clone();
        tar.extend_from_slice(&[0u8; 100]);
        match crate::formats::archive::Archive::from_tar_bytes(
            "t",
            crate::io::bytes::ByteView::from_vec(tar),
        ) {
            Err(crate::formats::archive::Error::TruncatedData { member, end, .. }) => {
                assert_eq!(
                    (member.as_str(), end),
                    ("./model_weights.ckpt", 1536 + nine)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pax_record_length_counts_itself() {
        for n in 0..300 {
            let rec = pax_record("path", &"v".repeat(n));
            let text = String::from_utf8(rec.clone()).unwrap();
            let len: usize = text.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(len, rec.len(), "value length {n}");
        }
    }

    #[test]
    fn mtime_and_modes() {
        let mut w = TarWriter::new(Vec::new()).with_mtime(1_700_000_000);
        w.append_dir("d").unwrap();
        w.append_file("d/f", 0, std::io::empty()).unwrap();
        let v = w.finish().unwrap();
        assert_eq!(v.len(), 10240);
        assert_eq!(&v[..4], b"./d/");
        assert_eq!(&v[100..108], b"0000755\0");
        assert_eq!(&v[136..148], format!("{:011o}\0", 1_700_000_000).as_bytes());
        assert_eq!(&v[512..517], b"./d/f");
        assert_eq!(&v[612..620], b"0000644\0");
        assert!(v[1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn size_mismatch_is_caught_and_poisons() {
        let mut w = TarWriter::new(Vec::new());
        match w.append_file("short", 10, &b"12345"[..]) {
            Err(Error::SizeMismatch {
                name,
                declared,
                written,
            }) => assert_eq!((name.as_str(), declared, written), ("short", 10, 5)),
            other => panic!("{other:?}"),
        }
        assert!(matches!(w.append_dir("d"), Err(Error::Poisoned)));
        assert!(matches!(w.finish(), Err(Error::Poisoned)));

        let mut w = TarWriter::new(Vec::new());
        match w.append_file("long", 3, &b"12345"[..]) {
            Err(Error::SizeMismatch { written, .. }) => assert_eq!(written, 4),
            other => panic!("{other:?}"),
        }
        let mut w = TarWriter::new(Vec::new());
        match w.append_pieces("p", 4, [&b"12"[..], b"345"]) {
            Err(Error::SizeMismatch { written, .. }) => assert_eq!(written, 5),
            other => panic!("{other:?}"),
        }
        let mut w = TarWriter::new(Vec::new());
        assert!(matches!(
            w.append_pieces("p", 4, [&b"12"[..]]),
            Err(Error::SizeMismatch { written: 2, .. })
        ));
    }

    #[test]
    fn io_errors_name_the_entry() {
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::other("disk on fire"))
            }
        }
        let mut w = TarWriter::new(Vec::new());
        match w.append_file("w.bin", 4, Failing) {
            Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("w.bin: disk on fire")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_names_are_refused() {
        for (name, kind) in [
            ("/etc/passwd", EntryKind::File),
            ("a/../../b", EntryKind::File),
            ("", EntryKind::File),
            ("./", EntryKind::File),
            ("a\0b", EntryKind::Dir),
        ] {
            assert!(
                matches!(tar_path(name, kind), Err(Error::BadName { .. })),
                "{name:?}"
            );
        }
        assert_eq!(tar_path("", EntryKind::Dir).unwrap(), "./");
        assert_eq!(tar_path("./a//b", EntryKind::File).unwrap(), "./a/b");
        assert_eq!(tar_path("a/b/", EntryKind::Dir).unwrap(), "./a/b/");
    }

    #[test]
    fn python_add_order_puts_children_after_their_directory() {
        let mut v = vec!["a.txt", "b", "a/z", "a", "a/b/c", "a-b"];
        v.sort_by(|a, b| python_add_order(a, b));
        assert_eq!(v, ["a", "a/b/c", "a/z", "a-b", "a.txt", "b"]);
    }
}
