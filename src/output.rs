//! Atomic outputs: every file or folder we produce is written under a
//! temporary name in the destination's own directory and renamed into place
//! only on [`OutputFile::commit`] / [`OutputDir::commit`], after an fsync.
//! Dropping an uncommitted output removes the temporary, so an error at any
//! point leaves no half-written checkpoint behind, and readers that have the
//! old target mapped keep seeing intact bytes.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use tempfile::{NamedTempFile, TempDir};

/// Size of the writes (and write buffers) of large outputs. Larger writes
/// let the kernel allocate the page cache in large folios, which on VMs with
/// free-page reporting (their memory handed back to the host) must be
/// faulted back in: 4 MiB `write`s of a 2 GiB output measured 1.6-4.9 s
/// there against 0.4 s in 128 KiB ones (and 0.67 s for `cp`).
pub const WRITE_BLOCK: usize = 128 << 10;

/// Prefix of our temporaries, so a crash leaves recognisable leftovers.
const TEMP_PREFIX: &str = ".nemo-tool-tmp-";

/// Errors from creating or committing an output.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The target exists and overwriting was not requested.
    #[error("output {}: already exists\nhint: pass --force to replace it", path.display())]
    Exists {
        /// The target.
        path: PathBuf,
    },
    /// A file-system operation failed.
    #[error("output {}: {op}: {source}", path.display())]
    Io {
        /// The path involved.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The failures every archive writer (pack, reshard, convert) has in
/// common; each writer's error wraps it as its `Write` variant.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// Creating or committing the output.
    #[error(transparent)]
    Output(#[from] Error),
    /// Writing the tar.
    #[error(transparent)]
    Tar(#[from] crate::tar_write::Error),
    /// Reading a source member.
    #[error(transparent)]
    Archive(#[from] crate::archive::Error),
    /// Writing a member's bytes.
    #[error("{member}: {source}")]
    Member {
        /// The member.
        member: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `From` each [`WriteError`] cause for a writer's error type with a
/// `Write(WriteError)` variant, so `?` works on them directly.
macro_rules! from_write_errors {
    ($t:ty) => {
        impl From<crate::output::Error> for $t {
            fn from(e: crate::output::Error) -> Self {
                Self::Write(e.into())
            }
        }
        impl From<crate::tar_write::Error> for $t {
            fn from(e: crate::tar_write::Error) -> Self {
                Self::Write(e.into())
            }
        }
        impl From<crate::archive::Error> for $t {
            fn from(e: crate::archive::Error) -> Self {
                Self::Write(e.into())
            }
        }
    };
}
pub(crate) use from_write_errors;

fn io_err(path: &Path, op: &'static str) -> impl FnOnce(io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::Io { path, op, source }
}

/// The directory a target lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// True when something (even a dangling symlink) is at `path`.
fn exists(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Makes a rename durable; some file systems do not support syncing a
/// directory, which is not worth failing the whole output for.
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// A file being written atomically. Write through [`Write`] or [`Self::file`].
#[derive(Debug)]
pub struct OutputFile {
    target: PathBuf,
    force: bool,
    temp: NamedTempFile,
    durable: bool,
}

impl OutputFile {
    /// Starts writing `target`.
    ///
    /// # Errors
    /// [`Error::Exists`] when `target` exists and `!force`; I/O errors
    /// creating the temporary beside it.
    pub fn create(target: impl AsRef<Path>, force: bool) -> Result<OutputFile, Error> {
        let target = target.as_ref().to_path_buf();
        if !force && exists(&target) {
            return Err(Error::Exists { path: target });
        }
        let dir = parent_dir(&target);
        let temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(io_err(dir, "creating a temporary file"))?;
        Ok(OutputFile {
            target,
            force,
            temp,
            durable: true,
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Skips the fsyncs at commit: the rename is still atomic (no reader ever
    /// sees a partial file), but after a power loss the output may be
    /// missing or empty. For scratch outputs where speed matters more.
    pub fn not_durable(mut self) -> Self {
        self.durable = false;
        self
    }

    /// Where the bytes go until commit.
    pub fn temp_path(&self) -> &Path {
        self.temp.path()
    }

    /// The temporary file, for seeking or `set_len`.
    pub fn file(&mut self) -> &mut File {
        self.temp.as_file_mut()
    }

    /// Flushes, fsyncs and renames the temporary over the target.
    ///
    /// # Errors
    /// I/O errors; [`Error::Exists`] when, without `force`, the target
    /// appeared while we were writing (then the temporary is removed).
    pub fn commit(mut self) -> Result<PathBuf, Error> {
        let temp_path = self.temp.path().to_path_buf();
        self.temp
            .as_file_mut()
            .flush()
            .map_err(io_err(&temp_path, "flushing"))?;
        // Temporary files are created 0600; a checkpoint is an ordinary file.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            self.temp
                .as_file()
                .set_permissions(fs::Permissions::from_mode(0o644))
                .map_err(io_err(&temp_path, "setting permissions"))?;
        }
        if self.durable {
            self.temp
                .as_file()
                .sync_all()
                .map_err(io_err(&temp_path, "syncing"))?;
        }
        let target = self.target.clone();
        if self.force {
            self.temp
                .persist(&target)
                .map_err(|e| io_err(&target, "renaming into place")(e.error))?;
        } else {
            // `persist_noclobber` refuses if the target appeared meanwhile.
            self.temp.persist_noclobber(&target).map_err(|e| {
                if e.error.kind() == io::ErrorKind::AlreadyExists {
                    Error::Exists {
                        path: target.clone(),
                    }
                } else {
                    io_err(&target, "renaming into place")(e.error)
                }
            })?;
        }
        if self.durable {
            sync_dir(parent_dir(&target));
        }
        Ok(target)
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.temp.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.temp.flush()
    }
}

/// A directory being written atomically: fill [`Self::path`], then commit.
#[derive(Debug)]
pub struct OutputDir {
    target: PathBuf,
    force: bool,
    temp: TempDir,
}

impl OutputDir {
    /// Starts writing directory `target`.
    ///
    /// # Errors
    /// [`Error::Exists`] when `target` exists and `!force`; I/O errors
    /// creating the temporary directory beside it.
    pub fn create(target: impl AsRef<Path>, force: bool) -> Result<OutputDir, Error> {
        let target = target.as_ref().to_path_buf();
        if !force && exists(&target) {
            return Err(Error::Exists { path: target });
        }
        let dir = parent_dir(&target);
        let temp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempdir_in(dir)
            .map_err(io_err(dir, "creating a temporary directory"))?;
        Ok(OutputDir {
            target,
            force,
            temp,
        })
    }

    /// The final path.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary directory to write into.
    pub fn path(&self) -> &Path {
        self.temp.path()
    }

    /// Fsyncs everything inside, then renames the temporary directory to the
    /// target. With `force`, an existing target is first moved aside and
    /// deleted only after the new one is in place (restored if that fails).
    ///
    /// # Errors
    /// I/O errors; [`Error::Exists`] when, without `force`, the target
    /// appeared while we were writing.
    pub fn commit(self) -> Result<PathBuf, Error> {
        sync_tree(self.temp.path())?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(self.temp.path(), fs::Permissions::from_mode(0o755))
                .map_err(io_err(self.temp.path(), "setting permissions"))?;
        }
        let target = self.target.clone();
        let parent = parent_dir(&target).to_path_buf();
        let old = if exists(&target) {
            if !self.force {
                return Err(Error::Exists { path: target });
            }
            // A unique name beside the target: a fresh temp dir's name, freed.
            let aside = tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .tempdir_in(&parent)
                .map_err(io_err(&parent, "creating a temporary directory"))?
                .path()
                .to_path_buf();
            fs::rename(&target, &aside).map_err(io_err(&target, "moving the old output aside"))?;
            Some(aside)
        } else {
            None
        };
        let temp_path = self.temp.path().to_path_buf();
        if let Err(e) = fs::rename(&temp_path, &target) {
            if let Some(aside) = &old {
                let _ = fs::rename(aside, &target);
            }
            return Err(io_err(&target, "renaming into place")(e));
        }
        // The temporary now lives at `target`; stop TempDir from deleting it.
        let _ = self.temp.keep();
        sync_dir(&parent);
        if let Some(aside) = old {
            let removed = if fs::symlink_metadata(&aside).is_ok_and(|m| m.is_dir()) {
                fs::remove_dir_all(&aside)
            } else {
                fs::remove_file(&aside)
            };
            removed.map_err(io_err(&aside, "removing the old output"))?;
        }
        Ok(target)
    }
}

/// Fsyncs every file and directory under `dir`.
fn sync_tree(dir: &Path) -> Result<(), Error> {
    for entry in fs::read_dir(dir).map_err(io_err(dir, "listing"))? {
        let entry = entry.map_err(io_err(dir, "listing"))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(io_err(&path, "inspecting"))?;
        if ft.is_dir() {
            sync_tree(&path)?;
        } else if ft.is_file() {
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&path, "syncing"))?;
        }
    }
    sync_dir(dir);
    Ok(())
}

#[cfg(test)]
mod tests {

    #[cfg(unix)]
    #[test]
    fn committed_files_are_world_readable() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("o.nemo");
        let mut f = OutputFile::create(&target, false).unwrap();
        f.write_all(b"x").unwrap();
        f.commit().unwrap();
        let mode = fs::metadata(&target).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
    }

    use super::*;

    /// Names in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn file_appears_only_on_commit() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.nemo");
        let mut out = OutputFile::create(&target, false).unwrap();
        out.write_all(b"tar bytes").unwrap();
        assert!(!target.exists());
        assert_eq!(out.temp_path().parent(), Some(dir.path()));
        assert_eq!(out.commit().unwrap(), target);
        assert_eq!(fs::read(&target).unwrap(), b"tar bytes");
        assert_eq!(listing(dir.path()), ["out.nemo"]);
    }

    #[test]
    fn file_refuses_existing_target_without_force() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.nemo");
        fs::write(&target, b"old").unwrap();
        match OutputFile::create(&target, false) {
            Err(e @ Error::Exists { .. }) => {
                assert!(e.to_string().contains("out.nemo: already exists"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        let mut out = OutputFile::create(&target, true).unwrap();
        out.write_all(b"new").unwrap();
        out.commit().unwrap();
        assert_eq!(fs::read(&target).unwrap(), b"new");
        assert_eq!(listing(dir.path()), ["out.nemo"]);
    }

    #[test]
    fn file_target_appearing_meanwhile_is_not_clobbered() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.nemo");
        let mut out = OutputFile::create(&target, false).unwrap();
        out.write_all(b"ours").unwrap();
        fs::write(&target, b"theirs").unwrap();
        assert!(matches!(out.commit(), Err(Error::Exists { .. })));
        assert_eq!(fs::read(&target).unwrap(), b"theirs");
        assert_eq!(listing(dir.path()), ["out.nemo"]);
    }

    #[test]
    fn dropped_file_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.nemo");
        {
            let mut out = OutputFile::create(&target, false).unwrap();
            out.write_all(b"half").unwrap();
        }
        assert!(listing(dir.path()).is_empty());
    }

    #[test]
    fn missing_parent_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("no/such/dir/out.nemo");
        match OutputFile::create(&target, false) {
            Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("no/such/dir"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn dir_commit_creates_and_force_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("extracted");
        let out = OutputDir::create(&target, false).unwrap();
        fs::create_dir(out.path().join("mp_rank_00")).unwrap();
        fs::write(out.path().join("mp_rank_00/w.ckpt"), b"1").unwrap();
        assert!(!target.exists());
        out.commit().unwrap();
        assert_eq!(fs::read(target.join("mp_rank_00/w.ckpt")).unwrap(), b"1");

        assert!(matches!(
            OutputDir::create(&target, false),
            Err(Error::Exists { .. })
        ));
        let out = OutputDir::create(&target, true).unwrap();
        fs::write(out.path().join("model_config.yaml"), b"2").unwrap();
        out.commit().unwrap();
        assert_eq!(listing(&target), ["model_config.yaml"]);
        assert_eq!(listing(dir.path()), ["extracted"]);
    }

    #[test]
    fn dir_force_replaces_a_file_and_drop_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        fs::write(&target, b"a file").unwrap();
        {
            let out = OutputDir::create(&target, true).unwrap();
            fs::write(out.path().join("x"), b"1").unwrap();
        }
        assert_eq!(fs::read(&target).unwrap(), b"a file");
        assert_eq!(listing(dir.path()), ["out"]);
        let out = OutputDir::create(&target, true).unwrap();
        fs::write(out.path().join("x"), b"1").unwrap();
        out.commit().unwrap();
        assert_eq!(listing(&target), ["x"]);
        assert_eq!(listing(dir.path()), ["out"]);
    }

    #[test]
    fn dir_target_appearing_meanwhile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        let out = OutputDir::create(&target, false).unwrap();
        fs::create_dir(&target).unwrap();
        assert!(matches!(out.commit(), Err(Error::Exists { .. })));
        assert_eq!(listing(dir.path()), ["out"]);
    }
}
