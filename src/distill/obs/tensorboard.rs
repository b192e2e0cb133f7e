//! A TensorBoard event-file writer for scalar summaries, with no TensorFlow
//! or protobuf dependency: the few `Event`/`Summary` fields we need are
//! encoded by hand, framed as TFRecords (length, masked CRC-32C of the
//! length, data, masked CRC-32C of the data).
//!
//! Proto fields used (tensorflow/core/util/event.proto, summary.proto):
//! `Event { double wall_time = 1; int64 step = 2; string file_version = 3;
//! Summary summary = 5; }`, `Summary { repeated Value value = 1; }`,
//! `Value { string tag = 1; float simple_value = 2; }`.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// CRC-32C (Castagnoli), bitwise table built once.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0x82f6_3b78 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

fn masked_crc(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn field_bytes(field: u64, bytes: &[u8], out: &mut Vec<u8>) {
    varint(field << 3 | 2, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

fn event(wall_time: f64, step: i64, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut e = Vec::new();
    varint(1 << 3 | 1, &mut e);
    e.extend_from_slice(&wall_time.to_le_bytes());
    varint(2 << 3, &mut e);
    varint(step as u64, &mut e);
    body(&mut e);
    e
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Appends scalar summaries to `events.out.tfevents.<time>.<host>` in a folder.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if needed).
    pub fn create(dir: &Path) -> io::Result<EventWriter> {
        std::fs::create_dir_all(dir)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let host = if host.is_empty() {
            "localhost".to_string()
        } else {
            host
        };
        let t = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            t as u64,
            std::process::id()
        ));
        let mut w = EventWriter {
            out: BufWriter::new(File::create(&path)?),
            path,
        };
        let first = event(t, 0, |e| field_bytes(3, b"brain.Event:2", e));
        w.record(&first)?;
        Ok(w)
    }

    /// The event file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(data)?;
        self.out.write_all(&masked_crc(data).to_le_bytes())
    }

    /// Writes one scalar.
    pub fn scalar(&mut self, tag: &str, value: f32, step: i64) -> io::Result<()> {
        let mut v = Vec::new();
        field_bytes(1, tag.as_bytes(), &mut v);
        varint(2 << 3 | 5, &mut v);
        v.extend_from_slice(&value.to_le_bytes());
        let mut summary = Vec::new();
        field_bytes(1, &v, &mut summary);
        let e = event(now(), step, |e| field_bytes(5, &summary, e));
        self.record(&e)
    }

    /// Flushes to disk (TensorBoard reads the file while it grows).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_values() {
        // RFC 3720 test vector: 32 zero bytes.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
    }

    #[test]
    fn records_are_framed() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path()).unwrap();
        w.scalar("kd_loss", 1.5, 3).unwrap();
        w.flush().unwrap();
        let b = std::fs::read(w.path()).unwrap();
        let len = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        assert_eq!(
            u32::from_le_bytes(b[8..12].try_into().unwrap()),
            masked_crc(&b[..8])
        );
        let data = &b[12..12 + len];
        assert_eq!(
            u32::from_le_bytes(b[12 + len..16 + len].try_into().unwrap()),
            masked_crc(data)
        );
        assert!(data.windows(13).any(|x| x == b"brain.Event:2"));
        assert!(b.windows(7).any(|x| x == b"kd_loss"));
    }
}
