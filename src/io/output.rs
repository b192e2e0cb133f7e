//! Atomic outputs: every file or folder we produce is written under a
//! temporary name in the destination's own directory and renamed into place
//! only on [`OutputFile::commit`] / [`OutputDir::commit`], after an fsync.
//! Dropping an uncommitted output removes the temporary, so an error at any
//! point leaves no half-written checkpoint behind, and readers that have the
//! old target mapped keep seeing intact bytes.
//!
//! A process killed outright (SIGKILL, OOM killer, power loss) cannot remove
//! its temporary, so each temporary is owned: its writer holds an exclusive
//! `flock` on it for its whole life, which the kernel releases when the
//! process dies. Creating an output first removes the temporaries in the same
//! folder whose lock can be taken (`remove_stale`); a live writer's never can.

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

/// Removes a file or a whole folder; already gone counts as removed.
fn remove_any(path: &Path) -> io::Result<()> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Ownership of temporaries between processes, by `flock(2)`:
///
/// * a temporary's owner holds `LOCK_EX` on it (an open descriptor of the
///   file or folder) until the temporary is gone or committed;
/// * whoever puts a temporary into a folder holds `LOCK_SH` on the folder from
///   before the entry appears until its own lock is taken;
/// * a cleaner takes `LOCK_EX` on the folder (without waiting: a folder being
///   written to is simply cleaned next time), so it never sees a temporary
///   whose owner has not locked it yet, and removes those it can lock itself.
///
/// Anything that cannot be locked (a file system without `flock`, another
/// user's file) is never removed: only a provably dead owner's leftovers are.
#[cfg(unix)]
mod owner {
    use std::fs::{File, OpenOptions};
    use std::io;
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    use std::path::Path;

    /// `flock(f, op | LOCK_NB)`: `Ok(false)` when another descriptor holds it.
    fn try_flock(f: &File, op: libc::c_int) -> io::Result<bool> {
        flock(f, op | libc::LOCK_NB)
    }

    fn flock(f: &File, op: libc::c_int) -> io::Result<bool> {
        loop {
            // SAFETY: a valid open descriptor, borrowed for the call.
            if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) => return Ok(false),
                _ => return Err(e),
            }
        }
    }

    /// Opens a temporary for locking only: never follows a symlink, never
    /// blocks on a FIFO planted under our prefix.
    fn open_entry(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(path)
    }

    /// Opens a destination folder (through symlinks: `out -> /data/out` is
    /// the same folder for every writer).
    fn open_dir(dir: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir)
    }

    /// The exclusive lock on the temporary at `path`, if nobody holds it;
    /// held while the returned descriptor is open.
    pub fn take(path: &Path) -> Option<File> {
        let f = open_entry(path).ok()?;
        try_flock(&f, libc::LOCK_EX).ok()?.then_some(f)
    }

    /// A shared lock on a folder, for putting an entry into it (waits for a
    /// cleaner's scan to end); `None` where folders cannot be locked.
    pub fn adding_to(dir: &Path) -> Option<File> {
        let f = open_dir(dir).ok()?;
        flock(&f, libc::LOCK_SH).ok()?.then_some(f)
    }

    /// The exclusive lock on a folder, for scanning it; `None` when an entry
    /// is being added right now or folders cannot be locked.
    pub fn scanning(dir: &Path) -> Option<File> {
        let f = open_dir(dir).ok()?;
        try_flock(&f, libc::LOCK_EX).ok()?.then_some(f)
    }
}

/// Without `flock`: nothing is ever provably dead, so nothing is removed.
#[cfg(not(unix))]
mod owner {
    use std::fs::File;
    use std::path::Path;

    pub fn take(_: &Path) -> Option<File> {
        None
    }

    pub fn adding_to(_: &Path) -> Option<File> {
        None
    }

    pub fn scanning(_: &Path) -> Option<File> {
        None
    }
}

/// Removes the temporaries in `dir` that a killed run left behind (their
/// owner's lock is free), naming each on stderr. Best effort: it fails
/// nothing, and leaves whatever it cannot prove abandoned.
fn remove_stale(dir: &Path) {
    let Some(scan) = owner::scanning(dir) else {
        return;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut dead = Vec::new();
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(TEMP_PREFIX.as_bytes())
        {
            continue;
        }
        if !entry.file_type().is_ok_and(|t| t.is_file() || t.is_dir()) {
            continue;
        }
        let path = entry.path();
        if let Some(lock) = owner::take(&path) {
            dead.push((path, lock));
        }
    }
    // Holding each dead entry's lock is enough from here on: no process ever
    // adopts an existing temporary, and other cleaners now see it as owned.
    drop(scan);
    for (path, _lock) in dead {
        match remove_any(&path) {
            Ok(()) => eprintln!(
                "nemo-tool: removed {}, the temporary of a nemo-tool run that was killed",
                path.display()
            ),
            Err(e) => eprintln!(
                "nemo-tool: warning: cannot remove {}, the temporary of a killed run: {e}",
                path.display()
            ),
        }
    }
}

/// Puts a new temporary into `dir` with `make` and takes its lock, so that no
/// cleaner ever sees it unowned (see [`owner`]).
fn owned<T>(
    dir: &Path,
    make: impl FnOnce() -> Result<T, Error>,
    path_of: impl Fn(&T) -> &Path,
) -> Result<(T, Option<File>), Error> {
    let adding = owner::adding_to(dir);
    let temp = make()?;
    let lock = owner::take(path_of(&temp));
    drop(adding);
    Ok((temp, lock))
}

/// The start shared by files and folders: refuse an existing target without
/// `force`, clear stale temporaries beside it, create an owned temporary.
fn start<T>(
    target: &Path,
    force: bool,
    op: &'static str,
    make: impl FnOnce(&tempfile::Builder, &Path) -> io::Result<T>,
    path_of: impl Fn(&T) -> &Path,
) -> Result<(PathBuf, T, Option<File>), Error> {
    let target = target.to_path_buf();
    if !force && exists(&target) {
        return Err(Error::Exists { path: target });
    }
    let dir = parent_dir(&target);
    remove_stale(dir);
    let (temp, lock) = owned(
        dir,
        || make(tempfile::Builder::new().prefix(TEMP_PREFIX), dir).map_err(io_err(dir, op)),
        path_of,
    )?;
    Ok((target, temp, lock))
}

/// Committed outputs are ordinary files (0644) and folders (0755), not the
/// owner-only mode temporaries are created with.
fn publish_mode(path: &Path, _mode: u32) -> Result<(), Error> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(_mode))
            .map_err(io_err(path, "setting permissions"))?;
    }
    Ok(())
}

/// A file being written atomically. Write through [`Write`] or [`Self::file`].
#[derive(Debug)]
pub struct OutputFile {
    target: PathBuf,
    force: bool,
    // Declared before `_owner`: dropped (removed) while still locked.
    temp: NamedTempFile,
    _owner: Option<File>,
    durable: bool,
}

impl OutputFile {
    /// Starts writing `target`, first removing the temporaries that killed
    /// runs left beside it.
    ///
    /// # Errors
    /// [`Error::Exists`] when `target` exists and `!force`; I/O errors
    /// creating the temporary beside it.
    pub fn create(target: impl AsRef<Path>, force: bool) -> Result<OutputFile, Error> {
        let (target, temp, owner) = start(
            target.as_ref(),
            force,
            "creating a temporary file",
            |b, dir| b.tempfile_in(dir),
            NamedTempFile::path,
        )?;
        Ok(OutputFile {
            target,
            force,
            temp,
            _owner: owner,
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
        publish_mode(&temp_path, 0o644)?;
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
    // Declared before `_owner`: dropped (removed) while still locked.
    temp: TempDir,
    _owner: Option<File>,
}

impl OutputDir {
    /// Starts writing directory `target`, first removing the temporaries that
    /// killed runs left beside it.
    ///
    /// # Errors
    /// [`Error::Exists`] when `target` exists and `!force`; I/O errors
    /// creating the temporary directory beside it.
    pub fn create(target: impl AsRef<Path>, force: bool) -> Result<OutputDir, Error> {
        let (target, temp, owner) = start(
            target.as_ref(),
            force,
            "creating a temporary directory",
            |b, dir| b.tempdir_in(dir),
            TempDir::path,
        )?;
        Ok(OutputDir {
            target,
            force,
            temp,
            _owner: owner,
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
    /// target. With `force`, an existing target is swapped out in one step
    /// where the file system can (Linux `RENAME_EXCHANGE`), else first moved
    /// aside (restored if the rename fails); either way the old output sits
    /// under an owned temporary name until it is deleted, after the new one
    /// is in place.
    ///
    /// # Errors
    /// I/O errors; [`Error::Exists`] when, without `force`, the target
    /// appeared while we were writing.
    pub fn commit(self) -> Result<PathBuf, Error> {
        self.commit_with(exchange)
    }

    /// [`Self::commit`] with the swap given (tests take the fallback path).
    fn commit_with(self, swap: fn(&Path, &Path) -> io::Result<()>) -> Result<PathBuf, Error> {
        let temp_path = self.temp.path().to_path_buf();
        sync_tree(&temp_path)?;
        publish_mode(&temp_path, 0o755)?;
        let target = self.target.clone();
        let parent = parent_dir(&target).to_path_buf();
        let old = if !exists(&target) {
            fs::rename(&temp_path, &target).map_err(io_err(&target, "renaming into place"))?;
            None
        } else if !self.force {
            return Err(Error::Exists { path: target });
        } else {
            // As in `owned`: the old output appears under our temporary name
            // and is locked before any cleaner can look.
            let adding = owner::adding_to(&parent);
            if swap(&temp_path, &target).is_ok() {
                let lock = owner::take(&temp_path);
                drop(adding);
                Some((temp_path.clone(), lock))
            } else {
                drop(adding);
                Some(move_aside_and_rename(&temp_path, &target, &parent)?)
            }
        };
        // The new output now lives at `target`; stop TempDir from deleting it.
        let _ = self.temp.keep();
        sync_dir(&parent);
        if let Some((old, _lock)) = old {
            remove_any(&old).map_err(io_err(&old, "removing the old output"))?;
        }
        Ok(target)
    }
}

/// The fallback of [`OutputDir::commit`]'s swap: the old `target` is renamed
/// to a fresh owned temporary name, then `temp` to `target` (on failure the
/// old one is put back). Returns where the old output now is, and its lock.
fn move_aside_and_rename(
    temp: &Path,
    target: &Path,
    parent: &Path,
) -> Result<(PathBuf, Option<File>), Error> {
    let (aside, lock) = owned(
        parent,
        || {
            // A unique name beside the target: a fresh temp dir's name, freed.
            let aside = tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .tempdir_in(parent)
                .map_err(io_err(parent, "creating a temporary directory"))?
                .path()
                .to_path_buf();
            fs::rename(target, &aside).map_err(io_err(target, "moving the old output aside"))?;
            Ok(aside)
        },
        PathBuf::as_path,
    )?;
    if let Err(e) = fs::rename(temp, target) {
        let _ = fs::rename(&aside, target);
        return Err(io_err(target, "renaming into place")(e));
    }
    Ok((aside, lock))
}

/// Swaps the entries at `a` and `b` atomically (`renameat2(RENAME_EXCHANGE)`);
/// an error where the file system (or the OS) cannot.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other);
    let (a, b) = (c(a)?, c(b)?);
    // SAFETY: two NUL-terminated paths that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
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

    /// Replaces a folder output with `--force`, swapping with `swap`.
    fn force_replace_dir_with(swap: fn(&Path, &Path) -> io::Result<()>) {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        fs::create_dir(&target).unwrap();
        fs::write(target.join("old"), b"0").unwrap();
        let out = OutputDir::create(&target, true).unwrap();
        fs::write(out.path().join("new"), b"1").unwrap();
        out.commit_with(swap).unwrap();
        assert_eq!(listing(&target), ["new"]);
        assert_eq!(listing(dir.path()), ["out"]);
    }

    #[test]
    fn dir_force_replaces_without_rename_exchange() {
        force_replace_dir_with(|_, _| Err(io::ErrorKind::Unsupported.into()));
    }

    /// A temporary nobody holds the lock of, as a killed run leaves it.
    fn stale(dir: &Path, name: &str, is_dir: bool) -> PathBuf {
        let p = dir.join(format!("{TEMP_PREFIX}{name}"));
        if is_dir {
            fs::create_dir(&p).unwrap();
            fs::write(p.join("mp_rank_00.ckpt"), b"half").unwrap();
        } else {
            fs::write(&p, b"half").unwrap();
        }
        p
    }

    #[cfg(unix)]
    #[test]
    fn creating_removes_stale_temporaries_only() {
        let dir = tempfile::tempdir().unwrap();
        stale(dir.path(), "deadfile", false);
        stale(dir.path(), "deaddir", true);
        // Held by another descriptor, as a live writer in another process holds it.
        let held = stale(dir.path(), "held", false);
        let lock = owner::take(&held).unwrap();
        // Not ours to judge: a symlink under the prefix, and other names.
        std::os::unix::fs::symlink("elsewhere", dir.path().join(format!("{TEMP_PREFIX}link")))
            .unwrap();
        fs::write(dir.path().join("keep.nemo"), b"k").unwrap();

        let live = OutputFile::create(dir.path().join("a.nemo"), false).unwrap();
        let live_name = live.temp_path().file_name().unwrap().to_owned();
        let mut want = vec![
            format!("{TEMP_PREFIX}held"),
            format!("{TEMP_PREFIX}link"),
            "keep.nemo".to_string(),
            live_name.to_string_lossy().into_owned(),
        ];
        want.sort();
        assert_eq!(listing(dir.path()), want);

        // A second output in the same folder leaves the first one's temporary be.
        let second = OutputDir::create(dir.path().join("b"), false).unwrap();
        assert!(live.temp_path().exists());
        second.commit().unwrap();
        live.commit().unwrap();

        // Once its holder is gone, the held one is stale too.
        drop(lock);
        OutputFile::create(dir.path().join("c.nemo"), false).unwrap();
        assert_eq!(
            listing(dir.path()),
            [
                format!("{TEMP_PREFIX}link").as_str(),
                "a.nemo",
                "b",
                "keep.nemo"
            ]
        );
    }

    #[cfg(unix)]
    #[test]
    fn the_old_output_of_a_forced_dir_commit_is_owned_until_removed() {
        // The old output, swapped out under our temporary name, is a
        // temporary too: a cleaner running right then must leave it be.
        fn exchange_then_clean(a: &Path, b: &Path) -> io::Result<()> {
            exchange(a, b)?;
            remove_stale(parent_dir(b));
            assert!(exists(a), "a cleaner took the old output mid-commit");
            Ok(())
        }
        force_replace_dir_with(exchange_then_clean);
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
