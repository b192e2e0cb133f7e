//! Output folders for the checkpoint writers: the [`OutDir`] trait (files
//! with sizes declared up front, so a tar writer can stream its headers) and
//! [`FsDir`], a plain directory.

use std::io::{self, Write};
use std::path::PathBuf;

/// Where writers put files: a folder, or (later) tar members. Names are
/// relative (`__0_0.distcp`, `w/.zarray`); sizes are declared up front so
/// a tar writer can emit its header before the data.
pub trait OutDir {
    /// Writes one file of exactly `size` bytes, produced by `fill`.
    ///
    /// # Errors
    /// I/O errors, or `fill` writing a different number of bytes.
    fn write_file(
        &mut self,
        name: &str,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()>;
}

/// Writes a whole buffer as one file.
///
/// # Errors
/// As [`OutDir::write_file`].
pub fn write_bytes(out: &mut dyn OutDir, name: &str, bytes: &[u8]) -> io::Result<()> {
    out.write_file(name, bytes.len() as u64, &mut |w| w.write_all(bytes))
}

/// An [`OutDir`] over a plain directory (created as needed).
#[derive(Debug, Clone)]
pub struct FsDir {
    root: PathBuf,
}

impl FsDir {
    /// Files go under `root`.
    pub fn new(root: impl Into<PathBuf>) -> FsDir {
        FsDir { root: root.into() }
    }
}

/// A writer that counts the bytes written through it (also used by the
/// torch_dist writer, hence a [`crate::io::sink::Sink`]).
pub(crate) struct Counting<W> {
    pub(crate) inner: W,
    pub(crate) n: u64,
}

impl<W: Write> crate::io::sink::Sink for Counting<W> {}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl OutDir for FsDir {
    fn write_file(
        &mut self,
        name: &str,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        let bad = name.is_empty()
            || name.starts_with('/')
            || name
                .split('/')
                .any(|p| p.is_empty() || p == ".." || p == ".");
        // `.metadata`/`.zarray` are fine; only whole `.`/`..` components are refused.
        if bad {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsafe output name {name:?}"),
            ));
        }
        let path = self.root.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let f = std::fs::File::create(&path)?;
        let mut w = Counting {
            inner: std::io::BufWriter::new(f),
            n: 0,
        };
        fill(&mut w)?;
        w.flush()?;
        if w.n != size {
            return Err(io::Error::other(format!(
                "{name}: declared {size} bytes, wrote {}",
                w.n
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_dir_writes_checks_size_and_refuses_unsafe_names() {
        let tmp = tempfile::tempdir().unwrap();
        let mut d = FsDir::new(tmp.path().join("out"));
        write_bytes(&mut d, "a/.zarray", b"{}").unwrap();
        assert_eq!(
            std::fs::read(tmp.path().join("out/a/.zarray")).unwrap(),
            b"{}"
        );
        let e = d
            .write_file("b", 3, &mut |w| w.write_all(b"xy"))
            .unwrap_err();
        assert!(e.to_string().contains("declared 3 bytes, wrote 2"), "{e}");
        for bad in ["", "/abs", "../up", "a/../b", "a//b", "./a"] {
            assert!(write_bytes(&mut d, bad, b"x").is_err(), "{bad}");
        }
    }
}
