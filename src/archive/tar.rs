//! The tar header scanner: walks 512-byte headers over an in-memory (mapped)
//! tar image and returns where each member's data lies, without touching any
//! member payload (only headers, PAX records and GNU long names are read).
//!
//! Formats understood: v7, ustar (with the `prefix` field), GNU (`L`/`K` long
//! names, base-256 numbers) and PAX (`x` records `path`, `size`, `linkpath`;
//! `g` global headers are skipped), which covers what Python's `tarfile` and
//! GNU tar write. Links and special files are refused, never followed.

use super::{normalise_name, Error, MemberKind};

/// Tar block size.
pub(crate) const BLOCK: u64 = 512;

/// Cap on a PAX extended header or a GNU long name: real ones are a few
/// hundred bytes, and the cap keeps a hostile size from being scanned.
const MAX_META: u64 = 1 << 20;

/// One member as found in the tar, name already normalised (no `./`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub kind: MemberKind,
    pub size: u64,
    pub header_offset: u64,
    pub data_offset: u64,
}

/// Extended attributes collected from `x`/`L`/`K` headers for the next member.
#[derive(Default)]
struct Pending {
    pax_path: Option<String>,
    pax_size: Option<u64>,
    pax_link: bool,
    gnu_name: Option<Vec<u8>>,
    gnu_link: bool,
}

/// Scans every header of the tar image `data`.
///
/// The archive ends at the first all-zero block or at the end of `data` on a
/// block boundary (Python's `tarfile` accepts both). Every header checksum is
/// verified, and every member's data must lie inside `data`.
pub(crate) fn read_index(data: &[u8]) -> Result<Vec<Entry>, Error> {
    let len = data.len() as u64;
    if len == 0 {
        return Err(Error::NotTar {
            reason: "the file is empty".into(),
        });
    }
    let mut entries: Vec<Entry> = Vec::new();
    let mut pending = Pending::default();
    let mut pos: u64 = 0;
    // The name of the last member seen, for errors about the next header.
    let mut last = String::from("(start of archive)");
    loop {
        if pos >= len {
            break;
        }
        let header = match block_at(data, pos) {
            Some(h) => h,
            None => {
                let rest = data.get(pos as usize..).unwrap_or(&[]);
                if rest.iter().all(|&b| b == 0) {
                    break;
                }
                return Err(Error::TruncatedHeader {
                    after: last,
                    offset: pos,
                    available: len - pos,
                });
            }
        };
        if header.iter().all(|&b| b == 0) {
            break;
        }
        let raw_name = String::from_utf8_lossy(field(header, 0, 100)).into_owned();
        verify_checksum(header, pos, &raw_name)?;
        let member_hint = || raw_name.clone();
        let hsize = parse_number(field(header, 124, 12)).map_err(|reason| Error::BadField {
            member: member_hint(),
            field: "size",
            offset: pos + 124,
            reason,
        })?;
        let typeflag = header[156];
        let is_meta = matches!(typeflag, b'x' | b'g' | b'L' | b'K');
        // A PAX `size` record replaces the header field of the member it precedes.
        let size = if is_meta {
            hsize
        } else {
            pending.pax_size.take().unwrap_or(hsize)
        };
        let data_start = pos + BLOCK;
        let data_end = data_start
            .checked_add(size)
            .ok_or_else(|| Error::BadField {
                member: member_hint(),
                field: "size",
                offset: pos + 124,
                reason: format!("{size} overflows"),
            })?;
        if data_end > len {
            let member = if is_meta {
                format!("{raw_name} (extended header)")
            } else {
                resolve_name(header, &pending, pos).unwrap_or_else(|_| raw_name.clone())
            };
            return Err(Error::TruncatedData {
                member,
                header_offset: pos,
                start: data_start,
                end: data_end,
                len,
            });
        }
        // data_end <= len < u64::MAX - BLOCK, so rounding up cannot overflow.
        let next = data_start + round_up(size);
        let payload = data
            .get(data_start as usize..data_end as usize)
            .unwrap_or(&[]);
        match typeflag {
            b'x' => {
                check_meta_size(size, &raw_name, pos)?;
                parse_pax(payload, &mut pending, pos)?;
            }
            b'g' => {}
            b'L' | b'K' => {
                check_meta_size(size, &raw_name, pos)?;
                let text = payload.split(|&b| b == 0).next().unwrap_or(&[]).to_vec();
                if typeflag == b'L' {
                    pending.gnu_name = Some(text);
                } else {
                    pending.gnu_link = true;
                }
            }
            _ => {
                let name = resolve_name(header, &pending, pos)?;
                let had_link_meta = pending.pax_link || pending.gnu_link;
                pending = Pending::default();
                let kind = match typeflag {
                    b'0' | 0 | b'7' if name.ends_with('/') => MemberKind::Dir,
                    b'0' | 0 | b'7' => MemberKind::File,
                    b'5' => MemberKind::Dir,
                    b'1' | b'2' => return Err(Error::Link { member: name }),
                    other => {
                        return Err(Error::UnsupportedType {
                            member: name,
                            kind: describe_type(other),
                        })
                    }
                };
                if had_link_meta && kind == MemberKind::File {
                    // A link target on a regular file is meaningless; refuse
                    // rather than guess which reader's view is right.
                    return Err(Error::Link { member: name });
                }
                last = name.clone();
                if let Some(norm) = normalise_name(&name)? {
                    entries.push(Entry {
                        name: norm,
                        kind,
                        size: if kind == MemberKind::Dir { 0 } else { size },
                        header_offset: pos,
                        data_offset: data_start,
                    });
                }
            }
        }
        pos = next;
    }
    Ok(entries)
}

fn block_at(data: &[u8], pos: u64) -> Option<&[u8; 512]> {
    let start = usize::try_from(pos).ok()?;
    data.get(start..start.checked_add(BLOCK as usize)?)?
        .try_into()
        .ok()
}

fn field(header: &[u8], start: usize, len: usize) -> &[u8] {
    header.get(start..start + len).unwrap_or(&[])
}

/// A NUL-terminated string field.
fn cstr(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or(&[])
}

pub(crate) fn round_up(size: u64) -> u64 {
    size.div_ceil(BLOCK) * BLOCK
}

fn check_meta_size(size: u64, raw_name: &str, offset: u64) -> Result<(), Error> {
    if size > MAX_META {
        return Err(Error::BadPax {
            member: raw_name.to_string(),
            offset,
            reason: format!("extended header of {size} bytes exceeds the {MAX_META}-byte cap"),
        });
    }
    Ok(())
}

/// The member name: PAX `path`, else GNU long name, else ustar prefix + name.
fn resolve_name(header: &[u8], pending: &Pending, pos: u64) -> Result<String, Error> {
    if let Some(p) = &pending.pax_path {
        return Ok(p.clone());
    }
    let bytes: Vec<u8> = if let Some(n) = &pending.gnu_name {
        n.clone()
    } else {
        let name = cstr(field(header, 0, 100));
        // Only POSIX ustar has a prefix; GNU's old format keeps times there.
        let prefix = if field(header, 257, 6) == b"ustar\0" {
            cstr(field(header, 345, 155))
        } else {
            &[]
        };
        if prefix.is_empty() {
            name.to_vec()
        } else {
            let mut v = prefix.to_vec();
            v.push(b'/');
            v.extend_from_slice(name);
            v
        }
    };
    String::from_utf8(bytes).map_err(|e| Error::BadField {
        member: String::from_utf8_lossy(e.as_bytes()).into_owned(),
        field: "name",
        offset: pos,
        reason: "not utf-8".into(),
    })
}

fn verify_checksum(header: &[u8], pos: u64, raw_name: &str) -> Result<(), Error> {
    let stored = parse_number(field(header, 148, 8));
    let (mut unsigned, mut signed) = (0u64, 0i64);
    for (i, &b) in header.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += u64::from(b);
        signed += i64::from(b as i8);
    }
    let ok = matches!(stored, Ok(s) if s == unsigned || i64::try_from(s).ok() == Some(signed));
    if ok {
        return Ok(());
    }
    if pos == 0 {
        return Err(Error::NotTar {
            reason: "the first 512-byte block is not a valid tar header (checksum mismatch)".into(),
        });
    }
    Err(Error::BadChecksum {
        member: raw_name.to_string(),
        offset: pos,
        stored: stored.unwrap_or(u64::MAX),
        computed: unsigned,
    })
}

/// Parses an octal (NUL/space padded) or GNU base-256 numeric field.
pub(crate) fn parse_number(field: &[u8]) -> Result<u64, String> {
    match field.first() {
        Some(&first) if first & 0x80 != 0 => {
            if first == 0xff {
                return Err("negative base-256 number".into());
            }
            let mut v = u64::from(first & 0x7f);
            for &b in field.get(1..).unwrap_or(&[]) {
                v = v
                    .checked_mul(256)
                    .and_then(|v| v.checked_add(u64::from(b)))
                    .ok_or_else(|| "base-256 number overflows 64 bits".to_string())?;
            }
            Ok(v)
        }
        _ => {
            let text = cstr(field);
            let trimmed = trim_spaces(text);
            let mut v: u64 = 0;
            for &b in trimmed {
                if !(b'0'..=b'7').contains(&b) {
                    return Err(format!(
                        "{:?} is not an octal number",
                        String::from_utf8_lossy(text)
                    ));
                }
                v = v
                    .checked_mul(8)
                    .and_then(|v| v.checked_add(u64::from(b - b'0')))
                    .ok_or_else(|| "octal number overflows 64 bits".to_string())?;
            }
            Ok(v)
        }
    }
}

fn trim_spaces(b: &[u8]) -> &[u8] {
    let start = b.iter().position(|&c| c != b' ').unwrap_or(b.len());
    let end = b.iter().rposition(|&c| c != b' ').map_or(start, |e| e + 1);
    b.get(start..end).unwrap_or(&[])
}

/// Parses PAX records `"<len> <key>=<value>\n"` into `pending`.
fn parse_pax(mut rest: &[u8], pending: &mut Pending, offset: u64) -> Result<(), Error> {
    let bad = |reason: String| Error::BadPax {
        member: "././@PaxHeader".into(),
        offset,
        reason,
    };
    // Some writers pad the record area with NULs.
    while rest.first().is_some_and(|&b| b != 0) {
        let space = rest
            .iter()
            .take(20)
            .position(|&b| b == b' ')
            .ok_or_else(|| bad("record length not followed by a space".into()))?;
        let len_text = std::str::from_utf8(rest.get(..space).unwrap_or(&[]))
            .ok()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| bad("record length is not a decimal number".into()))?;
        if len_text <= space + 1 || len_text > rest.len() {
            return Err(bad(format!(
                "record length {len_text} does not fit the {} bytes left",
                rest.len()
            )));
        }
        let record = rest.get(space + 1..len_text).unwrap_or(&[]);
        let body = record
            .strip_suffix(b"\n")
            .ok_or_else(|| bad("record does not end with a newline".into()))?;
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or_else(|| bad("record has no `=`".into()))?;
        let (key, value) = (
            body.get(..eq).unwrap_or(&[]),
            body.get(eq + 1..).unwrap_or(&[]),
        );
        match key {
            b"path" => {
                let v = std::str::from_utf8(value)
                    .map_err(|_| bad("path record is not utf-8".into()))?;
                pending.pax_path = Some(v.to_string());
            }
            b"size" => {
                let v = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse::<u64>().ok())
                    .ok_or_else(|| bad("size record is not a decimal number".into()))?;
                pending.pax_size = Some(v);
            }
            b"linkpath" => pending.pax_link = true,
            _ => {}
        }
        rest = rest.get(len_text..).unwrap_or(&[]);
    }
    Ok(())
}

fn describe_type(flag: u8) -> String {
    let what = match flag {
        b'3' => "character device",
        b'4' => "block device",
        b'6' => "fifo",
        b'S' => "gnu sparse file",
        b'V' => "volume label",
        b'M' => "multi-volume continuation",
        b'D' => "gnu dump directory",
        _ => "unknown",
    };
    format!("{what} (type flag {:?})", char::from(flag))
}
