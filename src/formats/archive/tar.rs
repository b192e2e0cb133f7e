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
        let raw_name = String::from_utf8_lossy(cstr(field(header, 0, 100))).into_owned();
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
                let normalised = normalise_name(&name)?;
                if normalised.is_none() && kind != MemberKind::Dir {
                    // Only a directory may stand for the root (`./`).
                    return Err(Error::UnsafePath { member: name });
                }
                if let Some(norm) = normalised {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tar_write::{entry_header, ustar_header, EntryKind, TarWriter};
    use proptest::prelude::*;

    /// A ustar header with a correct checksum.
    fn hdr(name: &str, size: u64, flag: u8) -> Vec<u8> {
        ustar_header(name, 0o644, size, 0, flag).to_vec()
    }

    fn file(name: &str, data: &[u8]) -> Vec<u8> {
        let mut v = hdr(name, data.len() as u64, b'0');
        v.extend_from_slice(data);
        v.resize(v.len().div_ceil(512) * 512, 0);
        v
    }

    fn end(mut v: Vec<u8>) -> Vec<u8> {
        v.extend_from_slice(&[0u8; 1024]);
        v
    }

    /// Recomputes the checksum of the header at `at` after a test edited it.
    fn fix_checksum(v: &mut [u8], at: usize) {
        v[at + 148..at + 156].copy_from_slice(b"        ");
        let sum: u32 = v[at..at + 512].iter().map(|&b| u32::from(b)).sum();
        v[at + 148..at + 155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    }

    fn sample() -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        w.append_dir("").unwrap();
        w.append_file("a.txt", 5, &b"hello"[..]).unwrap();
        w.append_dir("d").unwrap();
        w.append_file("d/b.bin", 600, &[7u8; 600][..]).unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn indexes_writer_output_without_root() {
        let v = sample();
        let idx = read_index(&v).unwrap();
        let names: Vec<_> = idx
            .iter()
            .map(|e| (e.name.as_str(), e.kind, e.size))
            .collect();
        assert_eq!(
            names,
            [
                ("a.txt", MemberKind::File, 5),
                ("d", MemberKind::Dir, 0),
                ("d/b.bin", MemberKind::File, 600)
            ]
        );
        assert_eq!(idx[0].header_offset, 512);
        assert_eq!(idx[0].data_offset, 1024);
        assert_eq!(&v[1024..1029], b"hello");
        let b = &idx[2];
        assert_eq!(&v[b.data_offset as usize..][..600], &[7u8; 600][..]);
    }

    #[test]
    fn accepts_names_without_dot_slash_and_eof_without_end_blocks() {
        let v = [file("x/y.txt", b"1"), file("./z", b"22")].concat();
        let idx = read_index(&v).unwrap();
        assert_eq!(idx[0].name, "x/y.txt");
        assert_eq!(idx[1].name, "z");
        assert_eq!(idx[1].size, 2);
    }

    #[test]
    fn truncated_data_names_member_and_offsets() {
        let mut v = file("./model_weights.ckpt", &[1u8; 1000]);
        v.truncate(512 + 700);
        match read_index(&v) {
            Err(Error::TruncatedData {
                member,
                header_offset,
                start,
                end,
                len,
            }) => {
                assert_eq!(member, "./model_weights.ckpt");
                assert_eq!((header_offset, start, end, len), (0, 512, 1512, 1212));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn truncated_header_names_previous_member() {
        let mut v = [file("./a", b"abc"), hdr("./b", 1, b'0')].concat();
        v.truncate(1024 + 100);
        match read_index(&v) {
            Err(e @ Error::TruncatedHeader { .. }) => {
                let msg = e.to_string();
                assert!(msg.contains("after member ./a"), "{msg}");
                assert!(msg.contains("byte 1024"), "{msg}");
                assert!(msg.contains("100 of 512"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_checksum_names_member() {
        let mut v = end([file("./a", b"abc"), file("./tokenizer.model", b"x")].concat());
        v[1024 + 10] ^= 0x01; // flip a bit in the second name
        match read_index(&v) {
            Err(Error::BadChecksum { member, offset, .. }) => {
                assert!(member.starts_with("./tok"), "{member}");
                assert_eq!(offset, 1024);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn not_a_tar() {
        let text = b"PK\x03\x04 this is a zip, not a tar".repeat(40);
        assert!(matches!(read_index(&text), Err(Error::NotTar { .. })));
        assert!(matches!(read_index(&[]), Err(Error::NotTar { .. })));
        // Shorter than one block and not zeros.
        assert!(matches!(
            read_index(b"hello"),
            Err(Error::TruncatedHeader { offset: 0, .. })
        ));
    }

    #[test]
    fn refuses_parent_and_absolute_paths() {
        for name in ["../x", "./a/../../x", "/etc/passwd", "."] {
            match read_index(&end(file(name, b"x"))) {
                Err(Error::UnsafePath { member }) => assert_eq!(member, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn refuses_symlinks_and_hard_links() {
        for flag in [b'1', b'2'] {
            let mut v = hdr("./model_weights.ckpt", 0, flag);
            v[157..168].copy_from_slice(b"/etc/passwd");
            fix_checksum(&mut v, 0);
            match read_index(&end(v)) {
                Err(Error::Link { member }) => assert_eq!(member, "./model_weights.ckpt"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn refuses_special_files() {
        match read_index(&end(hdr("./fifo", 0, b'6'))) {
            Err(Error::UnsupportedType { member, kind }) => {
                assert_eq!(member, "./fifo");
                assert!(kind.contains("fifo"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ustar_prefix_joins_name() {
        let mut v = file("leaf.bin", b"abc");
        v[345..345 + 12].copy_from_slice(b"./some/dirs\0");
        fix_checksum(&mut v, 0);
        let idx = read_index(&end(v)).unwrap();
        assert_eq!(idx[0].name, "some/dirs/leaf.bin");
    }

    #[test]
    fn pax_path_and_size_apply_to_next_member_only() {
        let long = format!("./model_weights/{}", "k".repeat(150));
        let mut v = entry_header(&long, EntryKind::File, 3, 0).unwrap();
        assert_eq!(v.len(), 3 * 512, "pax header + records + ustar header");
        v.extend_from_slice(b"abc");
        v.resize(v.len().div_ceil(512) * 512, 0);
        // A global header is skipped; a size record overrides the field.
        let mut g = hdr("././@PaxGlobal", 11, b'g');
        g.extend_from_slice(b"11 path=zz\n");
        g.resize(1024, 0);
        v.extend_from_slice(&g);
        let mut x = hdr("././@PaxHeader", 9, b'x');
        x.extend_from_slice(b"9 size=2\n");
        x.resize(1024, 0);
        v.extend_from_slice(&x);
        v.extend_from_slice(&file("./short", b"xy")[..]);
        // The size field says 2 too; make it lie so only the record can be right.
        let at = v.len() - 1024;
        v[at + 124..at + 136].copy_from_slice(b"00000000777\0");
        fix_checksum(&mut v, at);
        v.extend_from_slice(&file("./after", b"q"));
        let idx = read_index(&end(v)).unwrap();
        let names: Vec<_> = idx.iter().map(|e| (e.name.clone(), e.size)).collect();
        assert_eq!(
            names,
            [
                (long[2..].to_string(), 3),
                ("short".to_string(), 2),
                ("after".to_string(), 1)
            ]
        );
    }

    #[test]
    fn gnu_long_name_and_long_link() {
        let long = "d/".repeat(80) + "leaf";
        let mut v = hdr("././@LongLink", long.len() as u64 + 1, b'L');
        v.extend_from_slice(long.as_bytes());
        v.push(0);
        v.resize(v.len().div_ceil(512) * 512, 0);
        v.extend_from_slice(&file(&long[..100], b"z"));
        let idx = read_index(&end(v.clone())).unwrap();
        assert_eq!(idx[0].name, long);

        // A GNU long link target on a regular file is refused.
        let mut k = hdr("././@LongLink", 4, b'K');
        k.extend_from_slice(b"/etc");
        k.resize(1024, 0);
        k.extend_from_slice(&file("./f", b"z"));
        assert!(matches!(read_index(&end(k)), Err(Error::Link { .. })));
    }

    #[test]
    fn base256_and_octal_numbers() {
        assert_eq!(parse_number(b"00000001750\0").unwrap(), 1000);
        assert_eq!(parse_number(b"  1750 \0    ").unwrap(), 1000);
        assert_eq!(parse_number(b"\0\0\0\0").unwrap(), 0);
        let nine_gib: u64 = 9 << 30;
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[4..].copy_from_slice(&nine_gib.to_be_bytes());
        assert_eq!(parse_number(&f).unwrap(), nine_gib);
        assert!(parse_number(&[0xff; 12]).is_err());
        assert!(
            parse_number(&[0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).is_err()
        );
        assert!(parse_number(b"12389\0").is_err());
    }

    #[test]
    fn base256_size_reaches_data_check() {
        let mut v = hdr("./big.ckpt", 0, b'0');
        v[124..128].copy_from_slice(&[0x80, 0, 0, 0]);
        v[128..136].copy_from_slice(&(9u64 << 30).to_be_bytes());
        fix_checksum(&mut v, 0);
        match read_index(&v) {
            Err(Error::TruncatedData { member, end, .. }) => {
                assert_eq!(member, "./big.ckpt");
                assert_eq!(end, 512 + (9u64 << 30));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_size_field() {
        let mut v = hdr("./a", 0, b'0');
        v[124..136].copy_from_slice(b"0000000009x\0");
        fix_checksum(&mut v, 0);
        match read_index(&end(v)) {
            Err(Error::BadField { member, field, .. }) => {
                assert_eq!((member.as_str(), field), ("./a", "size"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_pax_record() {
        for records in [
            &b"99 path=x\n"[..],
            b"5 path=x\n",
            b"nonsense",
            b"10 pathxx\n",
        ] {
            let mut v = hdr("././@PaxHeader", records.len() as u64, b'x');
            v.extend_from_slice(records);
            v.resize(1024, 0);
            v.extend_from_slice(&file("./a", b"1"));
            assert!(
                matches!(read_index(&end(v)), Err(Error::BadPax { offset: 0, .. })),
                "{records:?}"
            );
        }
        let mut v = hdr("././@PaxHeader", 2 << 20, b'x');
        v.resize(512 + (2 << 20), b'1');
        assert!(matches!(read_index(&end(v)), Err(Error::BadPax { .. })));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = read_index(&data);
        }

        #[test]
        fn mutated_tars_never_panic(
            edits in proptest::collection::vec((0usize..4096, any::<u8>()), 1..8),
            cut in 0usize..4096,
        ) {
            let mut v = sample();
            let mut pax = entry_header(&"p".repeat(120), EntryKind::File, 1, 0).unwrap();
            pax.extend_from_slice(&[b'z'; 512]);
            v.splice(0..0, pax);
            for (at, byte) in edits {
                let n = v.len();
                if let Some(b) = v.get_mut(at % n) {
                    *b = byte;
                }
            }
            // Keep checksums valid half the time so parsing goes deeper.
            if cut % 2 == 0 {
                let mut at = 0;
                while at + 512 <= v.len() {
                    fix_checksum(&mut v, at);
                    at += 512;
                }
            }
            v.truncate(cut.max(1) * 3 % (v.len() + 1));
            let _ = read_index(&v);
        }
    }
}
