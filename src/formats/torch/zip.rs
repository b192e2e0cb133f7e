//! The zip container of `torch.save`: a reader over a [`ByteView`] (the
//! stream may sit at any offset of a bigger file, e.g. a DCP item, so all
//! offsets are relative to the view) and a streaming writer that reproduces
//! miniz/PyTorchStreamWriter byte for byte (torch-formats.md §1.2).
//!
//! Only stored (uncompressed) records are read; DEFLATE is refused by name,
//! because torch never writes it and `mmap=True` cannot read it either.

use std::io::Write;

use crate::io::bytes::ByteView;
use crate::io::piece::Piece;
use crate::io::sink::Sink;

const SIG_LOCAL: u32 = 0x0403_4b50;
const SIG_CENTRAL: u32 = 0x0201_4b50;
const SIG_DESCRIPTOR: u32 = 0x0807_4b50;
const SIG_EOCD: u32 = 0x0605_4b50;
const SIG_EOCD64: u32 = 0x0606_4b50;
const SIG_LOCATOR64: u32 = 0x0706_4b50;
const ALIGN: u64 = 64;
const MAX32: u64 = 0xFFFF_FFFF;

/// Why a zip stream could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No end-of-central-directory record: not a zip, or cut short.
    #[error("zip: no end-of-central-directory record in {len} bytes (truncated or not a zip)")]
    NoEndRecord {
        /// Stream length.
        len: u64,
    },
    /// A fixed-size structure runs past the end of the stream.
    #[error("zip: {what} at offset {offset} needs {need} bytes but the stream has only {len}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// Its size.
        need: u64,
        /// Stream length.
        len: u64,
    },
    /// A structure without its signature.
    #[error("zip: bad signature for {what} at offset {offset}")]
    BadSignature {
        /// Which structure.
        what: &'static str,
        /// Its offset.
        offset: u64,
    },
    /// A record whose payload runs past the end of the stream.
    #[error("zip record `{name}` declares {size} bytes at offset {offset} but the stream has only {len}")]
    RecordOutOfBounds {
        /// Record name.
        name: String,
        /// Declared size.
        size: u64,
        /// Payload offset.
        offset: u64,
        /// Stream length.
        len: u64,
    },
    /// A compressed record.
    #[error("zip record `{name}`: compression method {method} is not supported (only stored records; torch never compresses)")]
    Compressed {
        /// Record name.
        name: String,
        /// Method number (8 = DEFLATE).
        method: u16,
    },
    /// Structural nonsense (entry counts, names, sizes).
    #[error("zip: malformed: {why}")]
    Malformed {
        /// What was wrong.
        why: String,
    },
    /// A record that is not in the archive.
    #[error("zip: no record `{name}`")]
    Missing {
        /// Record name.
        name: String,
    },
    /// The writer was fed a different number of bytes than declared.
    #[error("zip writer: record `{name}` declared {declared} bytes but got {written}")]
    SizeMismatch {
        /// Record name.
        name: String,
        /// Declared size.
        declared: u64,
        /// Bytes written.
        written: u64,
    },
    /// The writer was used out of order (write without begin, begin twice).
    #[error("zip writer: {why}")]
    Usage {
        /// What was wrong.
        why: &'static str,
    },
    /// Writing failed.
    #[error("zip writer: {0}")]
    Io(#[from] std::io::Error),
}

/// One record of an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Full name, e.g. `archive/data/0`.
    pub name: String,
    /// Compression method (0 = stored).
    pub method: u16,
    /// CRC-32 from the central directory.
    pub crc32: u32,
    /// Compressed size.
    pub compressed_size: u64,
    /// Uncompressed size.
    pub size: u64,
    /// Offset of the local header in the stream.
    pub header_offset: u64,
}

/// A parsed zip stream over shared bytes.
#[derive(Debug, Clone)]
pub struct ZipArchive {
    view: ByteView,
    entries: Vec<Entry>,
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// `need` bytes at `offset`, or a `Truncated` error naming `what`.
fn fixed<'a>(b: &'a [u8], offset: u64, need: u64, what: &'static str) -> Result<&'a [u8], Error> {
    let len = b.len() as u64;
    let end = offset.checked_add(need).filter(|&e| e <= len);
    match end {
        Some(end) => Ok(&b[offset as usize..end as usize]),
        None => Err(Error::Truncated {
            what,
            offset,
            need,
            len,
        }),
    }
}

fn signed(b: &[u8], sig: u32, offset: u64, what: &'static str) -> Result<(), Error> {
    if u32_at(b, 0) != sig {
        return Err(Error::BadSignature { what, offset });
    }
    Ok(())
}

impl ZipArchive {
    /// Parses the central directory. Local headers are read only when a
    /// record's payload is asked for, so listing a multi-GB file touches only
    /// its directory (inspect reads no payload pages); each record's declared
    /// extent is still checked against the stream length here.
    ///
    /// # Errors
    /// [`Error::NoEndRecord`], [`Error::Truncated`], [`Error::BadSignature`],
    /// [`Error::RecordOutOfBounds`], [`Error::Malformed`].
    pub fn open(view: ByteView) -> Result<ZipArchive, Error> {
        let b = view.as_slice();
        let len = b.len() as u64;
        // The EOCD is 22 bytes plus a comment of at most 65535 bytes.
        let lowest = b.len().saturating_sub(22 + 0xFFFF);
        let eocd = (lowest..=b.len().saturating_sub(22))
            .rev()
            .find(|&i| b.len() >= 22 && u32_at(b, i) == SIG_EOCD)
            .ok_or(Error::NoEndRecord { len })?;
        let e = &b[eocd..eocd + 22];
        let mut count = u16_at(e, 10) as u64;
        let mut cd_size = u32_at(e, 12) as u64;
        let mut cd_offset = u32_at(e, 16) as u64;
        if eocd >= 20 && u32_at(b, eocd - 20) == SIG_LOCATOR64 {
            let loc = &b[eocd - 20..eocd];
            let z_off = u64_at(loc, 8);
            let z = fixed(b, z_off, 56, "zip64 end record")?;
            signed(z, SIG_EOCD64, z_off, "zip64 end record")?;
            count = u64_at(z, 32);
            cd_size = u64_at(z, 40);
            cd_offset = u64_at(z, 48);
        }
        let cd = fixed(b, cd_offset, cd_size, "central directory")?;
        if count > cd_size / 46 {
            return Err(Error::Malformed {
                why: format!("{count} entries cannot fit a {cd_size}-byte central directory"),
            });
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut at = 0u64;
        for _ in 0..count {
            let (entry, next) = central_entry(cd, at, cd_offset)?;
            at = next;
            entries.push(check_extent(len, entry)?);
        }
        Ok(ZipArchive { view, entries })
    }

    /// Records in central-directory order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The record named `name` (full name, including the archive folder).
    pub fn entry(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The payload of a stored record, without copying.
    ///
    /// # Errors
    /// [`Error::Compressed`] for anything but stored records.
    pub fn payload(&self, entry: &Entry) -> Result<ByteView, Error> {
        if entry.method != 0 {
            return Err(Error::Compressed {
                name: entry.name.clone(),
                method: entry.method,
            });
        }
        let data_offset = self.data_offset(entry)?;
        self.view
            .slice_len(data_offset, entry.size)
            .map_err(|_| Error::RecordOutOfBounds {
                name: entry.name.clone(),
                size: entry.size,
                offset: data_offset,
                len: self.view.len() as u64,
            })
    }

    /// The payload of the record named `name`.
    ///
    /// # Errors
    /// [`Error::Missing`] or as [`ZipArchive::payload`].
    pub fn read(&self, name: &str) -> Result<ByteView, Error> {
        let e = self.entry(name).ok_or_else(|| Error::Missing {
            name: name.to_string(),
        })?;
        self.payload(e)
    }
}

/// Parses the central entry at `at` (relative to the directory); returns it
/// (with `data_offset` still 0) and the next entry's position.
fn central_entry(cd: &[u8], at: u64, cd_offset: u64) -> Result<(Entry, u64), Error> {
    let abs = cd_offset + at;
    let h = fixed(cd, at, 46, "central directory entry").map_err(|_| Error::Truncated {
        what: "central directory entry",
        offset: abs,
        need: 46,
        len: cd_offset + cd.len() as u64,
    })?;
    signed(h, SIG_CENTRAL, abs, "central directory entry")?;
    let method = u16_at(h, 10);
    let crc32 = u32_at(h, 16);
    let mut csize = u32_at(h, 20) as u64;
    let mut size = u32_at(h, 24) as u64;
    let (nlen, xlen, clen) = (
        u16_at(h, 28) as u64,
        u16_at(h, 30) as u64,
        u16_at(h, 32) as u64,
    );
    let mut header_offset = u32_at(h, 42) as u64;
    let var = fixed(cd, at + 46, nlen + xlen + clen, "central directory entry")?;
    let name = std::str::from_utf8(&var[..nlen as usize])
        .map_err(|_| Error::Malformed {
            why: format!("record name at offset {abs} is not UTF-8"),
        })?
        .to_string();
    // zip64 extra: only the fields whose 32-bit slot is saturated, in this order.
    let mut x = &var[nlen as usize..(nlen + xlen) as usize];
    while x.len() >= 4 {
        let (id, n) = (u16_at(x, 0), u16_at(x, 2) as usize);
        let body = x.get(4..4 + n).ok_or_else(|| Error::Malformed {
            why: format!("record `{name}`: extra field runs past its header"),
        })?;
        if id == 1 {
            let mut fields = body.chunks_exact(8).map(|c| u64_at(c, 0));
            let mut take = |slot: &mut u64| -> Result<(), Error> {
                if *slot == MAX32 {
                    *slot = fields.next().ok_or_else(|| Error::Malformed {
                        why: format!("record `{name}`: zip64 extra is too short"),
                    })?;
                }
                Ok(())
            };
            take(&mut size)?;
            take(&mut csize)?;
            take(&mut header_offset)?;
        }
        x = &x[4 + n..];
    }
    let entry = Entry {
        name,
        method,
        crc32,
        compressed_size: csize,
        size,
        header_offset,
    };
    Ok((entry, at + 46 + nlen + xlen + clen))
}

/// Cheap bounds check from the central directory alone: the local header and
/// the payload must fit the stream (the payload starts at least 30 bytes past
/// the header).
fn check_extent(len: u64, e: Entry) -> Result<Entry, Error> {
    let stored = if e.method == 0 {
        e.size
    } else {
        e.compressed_size
    };
    if e.method == 0 && e.size != e.compressed_size {
        return Err(Error::Malformed {
            why: format!(
                "record `{}` is stored but declares {} compressed and {} uncompressed bytes",
                e.name, e.compressed_size, e.size
            ),
        });
    }
    let end = e
        .header_offset
        .checked_add(30)
        .and_then(|x| x.checked_add(stored));
    if end.is_none_or(|end| end > len) {
        return Err(Error::RecordOutOfBounds {
            name: e.name.clone(),
            size: stored,
            offset: e.header_offset.saturating_add(30),
            len,
        });
    }
    Ok(e)
}

impl ZipArchive {
    /// Where record `e`'s payload starts, from its local header (read now).
    ///
    /// # Errors
    /// [`Error::RecordOutOfBounds`], [`Error::BadSignature`].
    pub fn data_offset(&self, e: &Entry) -> Result<u64, Error> {
        let b = self.view.as_slice();
        let len = b.len() as u64;
        let h = fixed(b, e.header_offset, 30, "local header").map_err(|_| {
            Error::RecordOutOfBounds {
                name: e.name.clone(),
                size: 30,
                offset: e.header_offset,
                len,
            }
        })?;
        signed(h, SIG_LOCAL, e.header_offset, "local header")?;
        let data = e.header_offset + 30 + u16_at(h, 26) as u64 + u16_at(h, 28) as u64;
        // Reading 30 bytes maps the whole page-cache folio around them (up to
        // 2 MiB): drop it again, or opening a file with thousands of tensors
        // would make the resident set grow with the tensor count.
        if let Ok(v) = self.view.slice_len(e.header_offset, 30) {
            v.release();
        }
        let stored = if e.method == 0 {
            e.size
        } else {
            e.compressed_size
        };
        if data.checked_add(stored).is_none_or(|end| end > len) {
            return Err(Error::RecordOutOfBounds {
                name: e.name.clone(),
                size: stored,
                offset: data,
                len,
            });
        }
        Ok(data)
    }
}

/// The CRC-32 state of `n` zero bytes, built by combining power-of-two
/// blocks so that multi-GiB runs stay cheap.
fn zeros_crc(n: u64) -> crc32fast::Hasher {
    let mut crc = crc32fast::Hasher::new();
    let mut blocks = n / ZEROS.len() as u64;
    let mut pow = crc32fast::Hasher::new();
    if blocks > 0 {
        pow.update(&ZEROS);
    }
    while blocks > 0 {
        if blocks & 1 == 1 {
            crc.combine(&pow);
        }
        let twice = pow.clone();
        pow.combine(&twice);
        blocks >>= 1;
    }
    crc.update(&ZEROS[..(n % ZEROS.len() as u64) as usize]);
    crc
}

static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

fn write_zero_bytes<W: Write + ?Sized>(out: &mut W, mut n: u64) -> std::io::Result<()> {
    while n > 0 {
        let k = n.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..k])?;
        n -= k as u64;
    }
    Ok(())
}

/// Payloads smaller than this are checksummed on the writing thread.
const PARALLEL_CRC_MIN: u64 = 256 << 10;

struct CdEntry {
    name: Vec<u8>,
    crc: u32,
    size: u64,
    offset: u64,
}

struct Open {
    name: String,
    declared: u64,
    written: u64,
    crc: crc32fast::Hasher,
    zip64: bool,
}

/// A streaming zip writer laid out exactly as miniz writes for torch:
/// stored records under one `archive/` folder, payloads 64-byte aligned with
/// an `FB` extra, data descriptors (none for empty records), zip64 extras
/// when a size or offset reaches 4 GiB, and zip64 end records always.
pub struct ZipWriter<W: Write> {
    out: W,
    pos: u64,
    prefix: String,
    done: Vec<CdEntry>,
    open: Option<Open>,
}

impl<W: Write> ZipWriter<W> {
    /// A writer putting every record under `archive_name/`.
    pub fn new(out: W, archive_name: &str) -> ZipWriter<W> {
        ZipWriter {
            out,
            pos: 0,
            prefix: format!("{archive_name}/"),
            done: Vec::new(),
            open: None,
        }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), Error> {
        self.out.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    /// Starts record `name` (without the archive folder) of exactly `size` bytes.
    ///
    /// # Errors
    /// [`Error::Usage`] if a record is still open; I/O errors.
    pub fn begin(&mut self, name: &str, size: u64) -> Result<(), Error> {
        if self.open.is_some() {
            return Err(Error::Usage {
                why: "begin while a record is open",
            });
        }
        let full = format!("{}{name}", self.prefix);
        let offset = self.pos;
        let (big_size, big_off) = (size >= MAX32, offset >= MAX32);
        let mut extra = Vec::new();
        if big_size || big_off {
            let n = 16 * big_size as u16 + 8 * big_off as u16;
            extra.extend_from_slice(&1u16.to_le_bytes());
            extra.extend_from_slice(&n.to_le_bytes());
            if big_size {
                extra.extend_from_slice(&size.to_le_bytes());
                extra.extend_from_slice(&0u64.to_le_bytes());
            }
            if big_off {
                extra.extend_from_slice(&offset.to_le_bytes());
            }
        }
        let start = offset + 30 + full.len() as u64 + extra.len() as u64 + 4;
        let pad = (ALIGN - start % ALIGN) % ALIGN;
        extra.extend_from_slice(b"FB");
        extra.extend_from_slice(&(pad as u16).to_le_bytes());
        extra.resize(extra.len() + pad as usize, b'Z');
        let flags: u16 = if size == 0 { 0x0800 } else { 0x0808 };
        let mut h = Vec::with_capacity(30 + full.len() + extra.len());
        h.extend_from_slice(&SIG_LOCAL.to_le_bytes());
        h.extend_from_slice(&0u16.to_le_bytes()); // version needed: miniz writes 0
        h.extend_from_slice(&flags.to_le_bytes());
        h.extend_from_slice(&[0u8; 2 + 4 + 4 + 4 + 4]); // method, time/date, crc, sizes
        h.extend_from_slice(&(full.len() as u16).to_le_bytes());
        h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
        h.extend_from_slice(full.as_bytes());
        h.extend_from_slice(&extra);
        self.put(&h)?;
        self.done.push(CdEntry {
            name: full.clone().into_bytes(),
            crc: 0,
            size,
            offset,
        });
        self.open = Some(Open {
            name: full,
            declared: size,
            written: 0,
            crc: crc32fast::Hasher::new(),
            zip64: big_size || big_off,
        });
        Ok(())
    }

    /// Appends payload bytes to the open record.
    ///
    /// # Errors
    /// [`Error::Usage`] with no open record, [`Error::SizeMismatch`] past the declared size.
    pub fn write(&mut self, data: &[u8]) -> Result<(), Error> {
        let o = self.open.as_mut().ok_or(Error::Usage {
            why: "write without an open record",
        })?;
        o.written += data.len() as u64;
        if o.written > o.declared {
            return Err(Error::SizeMismatch {
                name: o.name.clone(),
                declared: o.declared,
                written: o.written,
            });
        }
        o.crc.update(data);
        self.put(data)
    }

    /// Appends `n` zero bytes to the open record. The CRC is built by
    /// combining power-of-two blocks, so multi-GiB fills stay cheap.
    ///
    /// # Errors
    /// As [`ZipWriter::write`].
    pub fn write_zeros(&mut self, n: u64) -> Result<(), Error> {
        self.reserve(n)?;
        let crc = zeros_crc(n);
        if let Some(o) = self.open.as_mut() {
            o.crc.combine(&crc);
        }
        write_zero_bytes(&mut self.out, n)?;
        self.pos += n;
        Ok(())
    }

    /// Counts `n` more payload bytes against the open record's declared size.
    fn reserve(&mut self, n: u64) -> Result<(), Error> {
        let o = self.open.as_mut().ok_or(Error::Usage {
            why: "write without an open record",
        })?;
        let written = o.written.saturating_add(n);
        if written > o.declared {
            return Err(Error::SizeMismatch {
                name: o.name.clone(),
                declared: o.declared,
                written,
            });
        }
        o.written = written;
        Ok(())
    }

    /// Ends the open record, writing its data descriptor.
    ///
    /// # Errors
    /// [`Error::SizeMismatch`] when fewer bytes than declared were written.
    pub fn end(&mut self) -> Result<(), Error> {
        let o = self.open.take().ok_or(Error::Usage {
            why: "end without an open record",
        })?;
        if o.written != o.declared {
            return Err(Error::SizeMismatch {
                name: o.name,
                declared: o.declared,
                written: o.written,
            });
        }
        let crc = o.crc.finalize();
        if let Some(last) = self.done.last_mut() {
            last.crc = crc;
        }
        if o.declared == 0 {
            return Ok(());
        }
        let mut d = Vec::with_capacity(24);
        d.extend_from_slice(&SIG_DESCRIPTOR.to_le_bytes());
        d.extend_from_slice(&crc.to_le_bytes());
        if o.zip64 {
            d.extend_from_slice(&o.declared.to_le_bytes());
            d.extend_from_slice(&o.declared.to_le_bytes());
        } else {
            d.extend_from_slice(&(o.declared as u32).to_le_bytes());
            d.extend_from_slice(&(o.declared as u32).to_le_bytes());
        }
        self.put(&d)
    }

    /// Writes a whole record.
    ///
    /// # Errors
    /// As [`ZipWriter::begin`].
    pub fn add(&mut self, name: &str, data: &[u8]) -> Result<(), Error> {
        self.begin(name, data.len() as u64)?;
        self.write(data)?;
        self.end()
    }

    /// Writes the central directory and end records; returns the sink.
    ///
    /// # Errors
    /// [`Error::Usage`] if a record is still open; I/O errors.
    pub fn finish(mut self) -> Result<W, Error> {
        if self.open.is_some() {
            return Err(Error::Usage {
                why: "finish while a record is open",
            });
        }
        let cd_offset = self.pos;
        let entries = std::mem::take(&mut self.done);
        for e in &entries {
            let (big_size, big_off) = (e.size >= MAX32, e.offset >= MAX32);
            let mut extra = Vec::new();
            if big_size || big_off {
                let n = 16 * big_size as u16 + 8 * big_off as u16;
                extra.extend_from_slice(&1u16.to_le_bytes());
                extra.extend_from_slice(&n.to_le_bytes());
                if big_size {
                    extra.extend_from_slice(&e.size.to_le_bytes());
                    extra.extend_from_slice(&e.size.to_le_bytes());
                }
                if big_off {
                    extra.extend_from_slice(&e.offset.to_le_bytes());
                }
            }
            let flags: u16 = if e.size == 0 { 0x0800 } else { 0x0808 };
            let size32 = e.size.min(MAX32) as u32;
            let mut h = Vec::with_capacity(46 + e.name.len() + extra.len());
            h.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
            h.extend_from_slice(&[0u8; 4]); // made by, needed
            h.extend_from_slice(&flags.to_le_bytes());
            h.extend_from_slice(&[0u8; 6]); // method, time, date
            h.extend_from_slice(&e.crc.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&size32.to_le_bytes());
            h.extend_from_slice(&(e.name.len() as u16).to_le_bytes());
            h.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            h.extend_from_slice(&[0u8; 2 + 2 + 2 + 4]); // comment, disk, attrs
            h.extend_from_slice(&(e.offset.min(MAX32) as u32).to_le_bytes());
            h.extend_from_slice(&e.name);
            h.extend_from_slice(&extra);
            self.put(&h)?;
        }
        let cd_size = self.pos - cd_offset;
        let z64 = self.pos;
        let n = entries.len() as u64;
        let mut t = Vec::with_capacity(56 + 20 + 22);
        t.extend_from_slice(&SIG_EOCD64.to_le_bytes());
        t.extend_from_slice(&44u64.to_le_bytes());
        t.extend_from_slice(&0x031eu16.to_le_bytes());
        t.extend_from_slice(&0x002du16.to_le_bytes());
        t.extend_from_slice(&[0u8; 8]);
        for v in [n, n, cd_size, cd_offset] {
            t.extend_from_slice(&v.to_le_bytes());
        }
        t.extend_from_slice(&SIG_LOCATOR64.to_le_bytes());
        t.extend_from_slice(&0u32.to_le_bytes());
        t.extend_from_slice(&z64.to_le_bytes());
        t.extend_from_slice(&1u32.to_le_bytes());
        t.extend_from_slice(&SIG_EOCD.to_le_bytes());
        t.extend_from_slice(&[0u8; 4]);
        let n16 = n.min(0xFFFF) as u16;
        t.extend_from_slice(&n16.to_le_bytes());
        t.extend_from_slice(&n16.to_le_bytes());
        t.extend_from_slice(&(cd_size.min(MAX32) as u32).to_le_bytes());
        t.extend_from_slice(&(cd_offset.min(MAX32) as u32).to_le_bytes());
        t.extend_from_slice(&0u16.to_le_bytes());
        self.put(&t)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

impl<W: Sink> ZipWriter<W> {
    /// Appends `pieces` to the open record. Large payloads are read and
    /// checksummed on a second thread while this one writes
    /// ([`crate::io::stream::write_checksummed`]). The pieces' mapped source
    /// pages are dropped from this process afterwards (see
    /// [`crate::io::mmap::release`]), so streaming a model keeps resident memory
    /// at about one tensor.
    ///
    /// # Errors
    /// As [`ZipWriter::write`].
    pub fn write_pieces(&mut self, pieces: &[Piece]) -> Result<(), Error> {
        let total: u64 = pieces.iter().map(Piece::len).sum();
        if total < PARALLEL_CRC_MIN {
            return crate::io::piece::with_pages_of(pieces, || {
                for p in pieces {
                    match p {
                        Piece::Bytes(b) => self.write(b.as_slice())?,
                        Piece::Zeros(n) => self.write_zeros(*n)?,
                    }
                }
                Ok(())
            });
        }
        self.reserve(total)?;
        let crc = crate::io::stream::write_checksummed(&mut self.out, pieces)?;
        if let Some(o) = self.open.as_mut() {
            o.crc.combine(&crc);
        }
        self.pos += total;
        Ok(())
    }

    /// Appends the `len` bytes that `write` writes to the output and reports
    /// the CRC-32 of (see [`crate::io::stream::Prefetch`]).
    ///
    /// # Errors
    /// As [`ZipWriter::write`]; [`Error::SizeMismatch`] when `write` wrote
    /// another length.
    pub fn write_streamed(
        &mut self,
        len: u64,
        write: &mut crate::io::sink::StreamedWrite<'_>,
    ) -> Result<(), Error> {
        self.reserve(len)?;
        let mut out = crate::io::sink::Counted::new(&mut self.out);
        let crc = write(&mut out)?;
        let written = out.count();
        if written != len {
            let name = self
                .open
                .as_ref()
                .map(|o| o.name.clone())
                .unwrap_or_default();
            return Err(Error::SizeMismatch {
                name,
                declared: len,
                written,
            });
        }
        if let Some(o) = self.open.as_mut() {
            o.crc.combine(&crc);
        }
        self.pos += len;
        Ok(())
    }
}

#[cfg(test)]
#[path = "zip_tests.rs"]
mod tests;
