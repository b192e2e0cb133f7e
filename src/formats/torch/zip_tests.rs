//! Tests for the zip reader and writer: golden bytes, the zip64 branch, and
//! one test per error variant.

use super::*;

fn fixture(name: &str) -> Vec<u8> {
    let p = format!(
        "{}/fixtures/torch-samples/pt/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(p).unwrap()
}

fn open(b: Vec<u8>) -> Result<ZipArchive, Error> {
    ZipArchive::open(ByteView::from_vec(b))
}

#[test]
fn reads_torch_written_archive() {
    let z = open(fixture("two_tensors.pt")).unwrap();
    let names: Vec<_> = z.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "two_tensors/data.pkl",
            "two_tensors/.format_version",
            "two_tensors/.storage_alignment",
            "two_tensors/byteorder",
            "two_tensors/data/0",
            "two_tensors/data/1",
            "two_tensors/version",
            "two_tensors/.data/serialization_id"
        ]
    );
    let d0 = z.entry("two_tensors/data/0").unwrap();
    assert_eq!((d0.header_offset, d0.size, d0.crc32), (726, 12, 0xb20e96b1));
    assert_eq!(z.data_offset(d0).unwrap(), 832);
    let b = z.read("two_tensors/data/0").unwrap();
    let f: Vec<f32> = b
        .as_slice()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(f, [1.0, 2.0, 3.0]);
    assert_eq!(z.read("two_tensors/version").unwrap().as_slice(), b"3\n");
    assert!(z
        .entries()
        .iter()
        .all(|e| z.data_offset(e).unwrap() % 64 == 0));
}

#[test]
fn reads_a_stream_embedded_at_an_odd_offset() {
    let mut b = vec![7u8; 13];
    b.extend(fixture("minimal_one_tensor.pt"));
    b.extend([9u8; 5]);
    let whole = ByteView::from_vec(b);
    let item = whole.slice(13..13 + 1577).unwrap();
    let z = ZipArchive::open(item).unwrap();
    let w = z.read("archive/data/0").unwrap();
    assert_eq!(
        w.as_slice(),
        [1f32.to_le_bytes(), 2f32.to_le_bytes()].concat()
    );
}

/// Rewrites every record of a torch file with our writer.
fn rewrite(file: &[u8], archive: &str) -> Vec<u8> {
    let z = open(file.to_vec()).unwrap();
    let mut w = ZipWriter::new(Vec::new(), archive);
    for e in z.entries() {
        let name = e.name.strip_prefix(&format!("{archive}/")).unwrap();
        w.add(name, z.payload(e).unwrap().as_slice()).unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn writer_reproduces_torch_and_miniz_bytes() {
    for (file, archive) in [
        ("minimal_one_tensor.pt", "archive"),
        ("two_tensors.pt", "two_tensors"),
        ("ref_writer_output.pt", "ref_writer_output"),
        ("views.pt", "views"),
    ] {
        let orig = fixture(file);
        assert!(rewrite(&orig, archive) == orig, "{file} differs");
    }
}

#[test]
fn empty_record_has_no_descriptor() {
    let mut w = ZipWriter::new(Vec::new(), "a");
    w.add("e", b"").unwrap();
    w.add("x", b"1").unwrap();
    let b = w.finish().unwrap();
    // local header of "e": flags 0x0800, then the next header right after the padding
    assert_eq!(&b[6..8], &[0x00, 0x08]);
    let e_end = 30 + 3 + u16::from_le_bytes([b[28], b[29]]) as usize;
    assert_eq!(e_end % 64, 0);
    assert_eq!(&b[e_end..e_end + 4], b"PK\x03\x04");
    let z = open(b).unwrap();
    assert_eq!(z.read("a/e").unwrap().len(), 0);
    assert_eq!(z.read("a/x").unwrap().as_slice(), b"1");
}

/// A sink that counts everything but keeps only small writes (headers).
#[derive(Default)]
struct Sparse {
    pos: u64,
    kept: Vec<(u64, Vec<u8>)>,
}

impl Write for Sparse {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() < 4096 {
            self.kept.push((self.pos, b.to_vec()));
        }
        self.pos += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sparse {
    fn at(&self, off: u64, n: usize) -> &[u8] {
        let (start, b) = self
            .kept
            .iter()
            .find(|(s, b)| *s <= off && off + n as u64 <= s + b.len() as u64)
            .unwrap_or_else(|| panic!("no kept bytes at {off}"));
        let i = (off - start) as usize;
        &b[i..i + n]
    }
    fn u16(&self, off: u64) -> u16 {
        u16::from_le_bytes(self.at(off, 2).try_into().unwrap())
    }
    fn u32(&self, off: u64) -> u32 {
        u32::from_le_bytes(self.at(off, 4).try_into().unwrap())
    }
    fn u64(&self, off: u64) -> u64 {
        u64::from_le_bytes(self.at(off, 8).try_into().unwrap())
    }
}

#[test]
fn zip64_extras_descriptors_and_end_records() {
    let big = 0xFFFF_FFFFu64; // the first size that needs zip64
    let mut w = ZipWriter::new(Sparse::default(), "archive");
    w.begin("data/0", big).unwrap();
    w.write_zeros(big).unwrap();
    w.end().unwrap();
    w.add("version", b"3\n").unwrap();
    let s = w.finish().unwrap();

    // local header 0: zip64 extra [size, 0] before FB; sizes in the header stay 0
    let name0 = "archive/data/0".len() as u64;
    assert_eq!(s.u32(0), 0x0403_4b50);
    assert_eq!((s.u16(6), s.u32(18), s.u32(22)), (0x0808, 0, 0));
    let xlen = s.u16(28) as u64;
    let x = 30 + name0;
    assert_eq!((s.u16(x), s.u16(x + 2)), (1, 16));
    assert_eq!((s.u64(x + 4), s.u64(x + 12)), (big, 0));
    assert_eq!(s.at(x + 20, 2), b"FB");
    assert_eq!(s.u16(x + 22) as u64, xlen - 24);
    let data0 = x + xlen;
    assert_eq!(data0 % 64, 0);
    // 24-byte descriptor with u64 sizes; CRC of the zeros
    let d = data0 + big;
    let mut crc = crc32fast::Hasher::new();
    let mut left = big;
    let mb = vec![0u8; 1 << 20];
    let mut mbh = crc32fast::Hasher::new();
    mbh.update(&mb);
    while left >= 1 << 20 {
        crc.combine(&mbh);
        left -= 1 << 20;
    }
    crc.update(&mb[..left as usize]);
    assert_eq!(s.u32(d), 0x0807_4b50);
    assert_eq!(s.u32(d + 4), crc.finalize());
    assert_eq!((s.u64(d + 8), s.u64(d + 16)), (big, big));
    // local header 1 sits past 4 GiB: zip64 extra [offset] in the local header too
    let h1 = d + 24;
    assert!(h1 >= 0xFFFF_FFFF);
    assert_eq!(s.u32(h1), 0x0403_4b50);
    let x1 = h1 + 30 + "archive/version".len() as u64;
    assert_eq!((s.u16(x1), s.u16(x1 + 2), s.u64(x1 + 4)), (1, 8, h1));
    assert_eq!(s.at(x1 + 12, 2), b"FB");
    assert_eq!((x1 + s.u16(h1 + 28) as u64) % 64, 0);
    // data descriptor of record 1 is 24 bytes too
    let d1 = x1 + s.u16(h1 + 28) as u64 + 2;
    assert_eq!((s.u64(d1 + 8), s.u64(d1 + 16)), (2, 2));
    let cd = d1 + 24;
    // central entry 0: saturated sizes, extra [size, size]
    assert_eq!(s.u32(cd), 0x0201_4b50);
    assert_eq!((s.u32(cd + 20), s.u32(cd + 24)), (0xFFFF_FFFF, 0xFFFF_FFFF));
    assert_eq!((s.u16(cd + 30), s.u32(cd + 42)), (20, 0));
    let cx = cd + 46 + name0;
    assert_eq!((s.u16(cx), s.u16(cx + 2)), (1, 16));
    assert_eq!((s.u64(cx + 4), s.u64(cx + 12)), (big, big));
    // central entry 1: real sizes, saturated offset, extra [offset]
    let cd1 = cx + 20;
    assert_eq!((s.u32(cd1 + 20), s.u32(cd1 + 42)), (2, 0xFFFF_FFFF));
    let cx1 = cd1 + 46 + "archive/version".len() as u64;
    assert_eq!((s.u16(cx1), s.u16(cx1 + 2), s.u64(cx1 + 4)), (1, 8, h1));
    // zip64 end record, locator, and an EOCD with a saturated directory offset
    let z = cx1 + 12;
    assert_eq!(s.u32(z), 0x0606_4b50);
    assert_eq!((s.u64(z + 24), s.u64(z + 48)), (2, cd));
    assert_eq!(s.u64(z + 40), z - cd);
    assert_eq!((s.u32(z + 56), s.u64(z + 64)), (0x0706_4b50, z));
    let e = z + 76;
    assert_eq!((s.u32(e), s.u16(e + 10)), (0x0605_4b50, 2));
    assert_eq!(s.u32(e + 16), 0xFFFF_FFFF);
    assert_eq!(s.pos, e + 22);
}

#[test]
fn reader_honours_zip64_extras() {
    // One stored record whose central entry defers size and offset to a zip64 extra.
    let name = b"a/x";
    let mut b = Vec::new();
    b.extend_from_slice(&SIG_LOCAL.to_le_bytes());
    b.extend_from_slice(&[0u8; 22]);
    b.extend_from_slice(&(name.len() as u16).to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(name);
    b.extend_from_slice(b"hey");
    let cd = b.len() as u64;
    b.extend_from_slice(&SIG_CENTRAL.to_le_bytes());
    b.extend_from_slice(&[0u8; 12]);
    b.extend_from_slice(&[0u8; 4]); // crc
    b.extend_from_slice(&[0xff; 8]); // sizes saturated
    b.extend_from_slice(&(name.len() as u16).to_le_bytes());
    b.extend_from_slice(&28u16.to_le_bytes());
    b.extend_from_slice(&[0u8; 10]);
    b.extend_from_slice(&[0xff; 4]); // offset saturated
    b.extend_from_slice(name);
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&24u16.to_le_bytes());
    for v in [3u64, 3, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    let cd_size = b.len() as u64 - cd;
    b.extend_from_slice(&SIG_EOCD.to_le_bytes());
    b.extend_from_slice(&[0u8; 4]);
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&(cd_size as u32).to_le_bytes());
    b.extend_from_slice(&(cd as u32).to_le_bytes());
    b.extend_from_slice(&0u16.to_le_bytes());
    let z = open(b).unwrap();
    let e = &z.entries()[0];
    assert_eq!(
        (e.size, e.header_offset, z.data_offset(e).unwrap()),
        (3, 0, 33)
    );
    assert_eq!(z.read("a/x").unwrap().as_slice(), b"hey");
}

// ---- one test per error variant ----

#[test]
fn truncated_zip_has_no_end_record() {
    let mut b = fixture("minimal_one_tensor.pt");
    b.truncate(1000);
    let e = open(b).unwrap_err();
    assert!(matches!(e, Error::NoEndRecord { len: 1000 }), "{e}");
    assert!(matches!(
        open(vec![1, 2]),
        Err(Error::NoEndRecord { len: 2 })
    ));
}

/// Offset of the central entry for `name` in a fixture.
fn central_of(b: &[u8], name: &[u8]) -> usize {
    let mut at = 0;
    loop {
        at += b[at..].windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        if &b[at + 46..at + 46 + name.len()] == name {
            return at;
        }
        at += 4;
    }
}

#[test]
fn record_past_the_end_is_named() {
    let mut b = fixture("minimal_one_tensor.pt");
    let c = central_of(&b, b"archive/data/0");
    b[c + 20..c + 24].copy_from_slice(&4096u32.to_le_bytes());
    b[c + 24..c + 28].copy_from_slice(&4096u32.to_le_bytes());
    let e = open(b).unwrap_err();
    assert_eq!(
        e.to_string(),
        "zip record `archive/data/0` declares 4096 bytes at offset 628 but the stream has only 1577"
    );
}

#[test]
fn deflate_is_refused_by_name() {
    let mut b = fixture("minimal_one_tensor.pt");
    let c = central_of(&b, b"archive/data/0");
    b[c + 10] = 8;
    let z = open(b).unwrap();
    let e = z.read("archive/data/0").unwrap_err();
    assert!(matches!(e, Error::Compressed { method: 8, .. }));
    assert!(e.to_string().contains("`archive/data/0`"), "{e}");
}

#[test]
fn bad_signature_and_truncated_structures() {
    let mut b = fixture("minimal_one_tensor.pt");
    let c = central_of(&b, b"archive/data/0");
    b[c] = b'X';
    assert!(matches!(
        open(b),
        Err(Error::BadSignature {
            what: "central directory entry",
            ..
        })
    ));
    // zip64 locator pointing past the end
    let mut b = fixture("minimal_one_tensor.pt");
    let n = b.len();
    let loc = n - 22 - 20;
    b[loc + 8..loc + 16].copy_from_slice(&99_999u64.to_le_bytes());
    assert!(matches!(
        open(b),
        Err(Error::Truncated {
            what: "zip64 end record",
            ..
        })
    ));
}

#[test]
fn malformed_counts_and_missing_records() {
    let mut b = fixture("minimal_one_tensor.pt");
    let n = b.len();
    let z64 = n - 22 - 20 - 56;
    b[z64 + 32..z64 + 40].copy_from_slice(&1000u64.to_le_bytes());
    assert!(matches!(open(b), Err(Error::Malformed { .. })));
    let z = open(fixture("minimal_one_tensor.pt")).unwrap();
    assert!(matches!(z.read("archive/nope"), Err(Error::Missing { .. })));
}

#[test]
fn writer_checks_sizes_and_order() {
    let mut w = ZipWriter::new(Vec::new(), "a");
    assert!(matches!(w.write(b"x"), Err(Error::Usage { .. })));
    w.begin("r", 2).unwrap();
    assert!(matches!(w.begin("s", 1), Err(Error::Usage { .. })));
    assert!(matches!(
        w.write(b"abc"),
        Err(Error::SizeMismatch { declared: 2, .. })
    ));
    let mut w = ZipWriter::new(Vec::new(), "a");
    w.begin("r", 2).unwrap();
    w.write_zeros(1).unwrap();
    assert!(matches!(
        w.end(),
        Err(Error::SizeMismatch {
            declared: 2,
            written: 1,
            ..
        })
    ));
}

#[test]
fn writer_reports_io_errors() {
    struct Full;
    impl Write for Full {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut w = ZipWriter::new(Full, "a");
    assert!(matches!(w.add("x", b"1"), Err(Error::Io(_))));
}
