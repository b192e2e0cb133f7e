//! The `.nemo` container: a member index over a plain tar, a gzip tar or an
//! already-extracted folder (nemo-format.md §1.1), handing out member bytes as
//! zero-copy [`ByteView`]s.
//!
//! * Plain tar: the file is memory-mapped and only headers are read, so
//!   opening a 100 GiB archive costs a few page faults.
//! * Gzip tar (pre-1.7 NeMo): detected by the `1f 8b` magic (NeMo tries plain
//!   tar first and falls back to gzip; sniffing gives the same answer),
//!   decompressed once into an anonymous temporary file that is then mapped,
//!   so memory use does not grow with the archive.
//! * Folder: walked in sorted order; each file is mapped when read.
//!
//! Member names are normalised: a leading `./` is dropped and the `.` root
//! entry is ignored. Like NeMo's `_safe_extract`, absolute paths, `..`
//! components, symlinks and hard links are refused; unlike NeMo we refuse the
//! whole archive instead of skipping the member, since a checkpoint with
//! such members is broken or hostile.

mod tar;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};

use crate::io::bytes::ByteView;
use crate::io::mmap::map_file;

/// Errors from opening or reading an archive. Each names the member (or the
/// file) and, for tar structure problems, the byte offset.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file or folder could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The gzip stream is corrupt or cut short.
    #[error("gzip tar: {}: stream is corrupt or cut short after {decompressed} decompressed bytes: {source}", path.display())]
    Gzip {
        /// The archive.
        path: PathBuf,
        /// Bytes decompressed before the failure.
        decompressed: u64,
        /// The decoder's error.
        #[source]
        source: io::Error,
    },
    /// The input does not start with a tar header.
    #[error("not a tar archive: {reason}")]
    NotTar {
        /// Why.
        reason: String,
    },
    /// A header's checksum does not match its contents.
    #[error(
        "tar header at byte {offset}: {member}: bad checksum: stored {stored}, computed {computed}"
    )]
    BadChecksum {
        /// The name field of the damaged header (possibly garbage).
        member: String,
        /// Offset of the header.
        offset: u64,
        /// The stored checksum (`u64::MAX` when unreadable).
        stored: u64,
        /// The computed (unsigned) checksum.
        computed: u64,
    },
    /// The archive ends inside a header block.
    #[error("truncated tar: header at byte {offset} (after member {after}): only {available} of 512 bytes present")]
    TruncatedHeader {
        /// The member before the cut header.
        after: String,
        /// Offset of the cut header.
        offset: u64,
        /// Bytes present.
        available: u64,
    },
    /// A member's data runs past the end of the archive.
    #[error("truncated tar: {member}: data at bytes {start}..{end} (header at {header_offset}), but the archive ends at byte {len}")]
    TruncatedData {
        /// The member.
        member: String,
        /// Offset of its header.
        header_offset: u64,
        /// Data start.
        start: u64,
        /// Data end (exclusive).
        end: u64,
        /// Archive length.
        len: u64,
    },
    /// A header field cannot be parsed.
    #[error("tar header field {field}: {member}: at byte {offset}: {reason}")]
    BadField {
        /// The member (raw name).
        member: String,
        /// The field.
        field: &'static str,
        /// Offset of the header or field.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// A PAX extended header or GNU long name is malformed.
    #[error("tar extended header: {member}: at byte {offset}: {reason}")]
    BadPax {
        /// The extended header's name.
        member: String,
        /// Offset of its header.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// A member path is absolute or climbs out with `..`.
    #[error("unsafe member path: {member}: absolute paths and `..` components are refused")]
    UnsafePath {
        /// The member as written in the archive.
        member: String,
    },
    /// A member is a symlink or hard link.
    #[error(
        "link member refused: {member}: symlinks and hard links are not allowed in a checkpoint"
    )]
    Link {
        /// The member.
        member: String,
    },
    /// A member is a device, fifo, sparse file or other unsupported type.
    #[error("unsupported member type: {member}: {kind}")]
    UnsupportedType {
        /// The member.
        member: String,
        /// What it is.
        kind: String,
    },
    /// Two members have the same (normalised) name.
    #[error("duplicate member: {member}: appears twice in the archive")]
    Duplicate {
        /// The member.
        member: String,
    },
    /// A name in an extracted folder is not UTF-8.
    #[error("member name is not utf-8: {}", path.display())]
    NonUtf8Name {
        /// The file.
        path: PathBuf,
    },
    /// No member has this name.
    #[error("no such member: {member}")]
    NotFound {
        /// The name asked for.
        member: String,
    },
    /// The member is a directory, not a file.
    #[error("member is a directory: {member}")]
    NotAFile {
        /// The member.
        member: String,
    },
    /// A file in an extracted folder changed since the folder was indexed.
    #[error("member changed on disk: {member}: indexed as a {expected}-byte file, now {actual}")]
    Changed {
        /// The member.
        member: String,
        /// Size when indexed.
        expected: u64,
        /// What is there now.
        actual: String,
    },
}

/// What kind of container an [`Archive`] was opened from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArchiveKind {
    /// An uncompressed tar (NeMo ≥ 1.7), mapped in place.
    Tar,
    /// A gzip-compressed tar (NeMo < 1.7), decompressed to a temporary file.
    GzipTar,
    /// An extracted folder.
    Folder,
    /// Members assembled in memory from other files (an HF folder presented
    /// as a `.nemo`: generated config, tokenizer files by their artifact names).
    Assembled,
}

/// Whether a member is a file or a directory (nothing else is accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberKind {
    /// A regular file.
    File,
    /// A directory (explicit in the archive or implied by a member path).
    Dir,
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Normalised name: `/`-separated, no leading `./`, no trailing `/`.
    pub name: String,
    /// Size in bytes (0 for directories).
    pub size: u64,
    /// File or directory.
    pub kind: MemberKind,
    /// Offset of the data in the (decompressed) tar; `None` for folders and
    /// for directories implied by member paths.
    pub data_offset: Option<u64>,
}

/// An opened `.nemo`: the member index plus the bytes behind it.
#[derive(Debug)]
pub struct Archive {
    path: PathBuf,
    kind: ArchiveKind,
    members: Vec<Member>,
    by_name: BTreeMap<String, usize>,
    /// The whole (decompressed) tar; `None` for folders.
    data: Option<ByteView>,
    /// The bytes of each member of an assembled archive, by name.
    assembled: BTreeMap<String, ByteView>,
}

impl Archive {
    /// Opens a `.nemo` tar, gzip tar or extracted folder and indexes it.
    ///
    /// # Errors
    /// I/O errors, a broken tar or gzip stream, or an unsafe member (see
    /// [`Error`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Archive, Error> {
        let path = path.as_ref().to_path_buf();
        let io_err = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let meta = fs::metadata(&path).map_err(io_err)?;
        if meta.is_dir() {
            let members = walk_folder(&path)?;
            return Archive::from_members(path, ArchiveKind::Folder, members, None);
        }
        let mut file = File::open(&path).map_err(io_err)?;
        let mut magic = [0u8; 2];
        let n = read_up_to(&mut file, &mut magic).map_err(io_err)?;
        let (kind, file) = if n == 2 && magic == [0x1f, 0x8b] {
            file.rewind().map_err(io_err)?;
            (ArchiveKind::GzipTar, gunzip_to_temp(&path, file)?)
        } else {
            (ArchiveKind::Tar, file)
        };
        let len = file.metadata().map_err(io_err)?.len();
        if len == 0 {
            return Err(Error::NotTar {
                reason: "the file is empty".into(),
            });
        }
        let data = ByteView::from_mapped_file(map_file(&file).map_err(io_err)?, file);
        let members = tar::read_index(data.as_slice())?
            .into_iter()
            .map(|e| Member {
                name: e.name,
                size: e.size,
                kind: e.kind,
                data_offset: Some(e.data_offset),
            })
            .collect();
        Archive::from_members(path, kind, members, Some(data))
    }

    /// Indexes a tar image already in memory (used by tests and fuzzing).
    ///
    /// # Errors
    /// As for [`Archive::open`].
    pub fn from_tar_bytes(path: impl Into<PathBuf>, data: ByteView) -> Result<Archive, Error> {
        let members = tar::read_index(data.as_slice())?
            .into_iter()
            .map(|e| Member {
                name: e.name,
                size: e.size,
                kind: e.kind,
                data_offset: Some(e.data_offset),
            })
            .collect();
        Archive::from_members(path.into(), ArchiveKind::Tar, members, Some(data))
    }

    /// An archive whose members are the given files, in this order (their
    /// bytes are shared, not copied). `path` names where they came from.
    ///
    /// # Errors
    /// An unsafe or duplicate member name.
    pub fn assembled(
        path: impl Into<PathBuf>,
        files: Vec<(String, ByteView)>,
    ) -> Result<Archive, Error> {
        let mut members = Vec::with_capacity(files.len());
        let mut bytes = BTreeMap::new();
        for (raw, data) in files {
            let Some(name) = normalise_name(&raw)? else {
                return Err(Error::NotFound { member: raw });
            };
            members.push(Member {
                name: name.clone(),
                size: data.len() as u64,
                kind: MemberKind::File,
                data_offset: None,
            });
            bytes.insert(name, data);
        }
        let mut a = Archive::from_members(path.into(), ArchiveKind::Assembled, members, None)?;
        a.assembled = bytes;
        Ok(a)
    }

    /// Builds the name index, refusing duplicates and adding directories that
    /// are only implied by member paths (third-party tars often omit them).
    fn from_members(
        path: PathBuf,
        kind: ArchiveKind,
        listed: Vec<Member>,
        data: Option<ByteView>,
    ) -> Result<Archive, Error> {
        let mut members: Vec<Member> = Vec::with_capacity(listed.len());
        let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
        for m in listed {
            // Parents first, so list order stays parent-before-child.
            let mut parents = Vec::new();
            let mut p = parent_of(&m.name);
            while !p.is_empty() && !by_name.contains_key(p) {
                parents.push(p.to_string());
                p = parent_of(p);
            }
            for dir in parents.into_iter().rev() {
                by_name.insert(dir.clone(), members.len());
                members.push(Member {
                    name: dir,
                    size: 0,
                    kind: MemberKind::Dir,
                    data_offset: None,
                });
            }
            match by_name.get(&m.name).and_then(|&i| members.get(i)) {
                None => {
                    by_name.insert(m.name.clone(), members.len());
                    members.push(m);
                }
                // A directory listed after a child implied it (or twice): fine.
                Some(prev) if prev.kind == MemberKind::Dir && m.kind == MemberKind::Dir => {}
                Some(_) => return Err(Error::Duplicate { member: m.name }),
            }
        }
        Ok(Archive {
            path,
            kind,
            members,
            by_name,
            data,
            assembled: BTreeMap::new(),
        })
    }

    /// The path the archive was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tar, gzip tar or folder.
    pub fn kind(&self) -> ArchiveKind {
        self.kind
    }

    /// All members, in archive order (folders: sorted depth-first, the order
    /// Python's `tarfile.add` would write them).
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The member called `name` (with or without a leading `./`).
    pub fn get(&self, name: &str) -> Option<&Member> {
        let key = normalise_name(name).ok()??;
        self.by_name.get(&key).and_then(|&i| self.members.get(i))
    }

    /// The direct children of directory `prefix` (`""` or `"."` for the root),
    /// in archive order.
    pub fn list_dir(&self, prefix: &str) -> Vec<&Member> {
        let dir = match normalise_name(prefix) {
            Ok(Some(d)) => d,
            Ok(None) => String::new(),
            Err(_) => return Vec::new(),
        };
        self.members
            .iter()
            .filter(|m| parent_of(&m.name) == dir)
            .collect()
    }

    /// The bytes of file member `name`: a slice of the mapping for tars, a
    /// fresh mapping of the file for folders.
    ///
    /// # Errors
    /// [`Error::NotFound`], [`Error::NotAFile`], and for folders I/O errors or
    /// [`Error::Changed`] when the file no longer matches the index.
    pub fn read(&self, name: &str) -> Result<ByteView, Error> {
        let member = self.get(name).ok_or_else(|| Error::NotFound {
            member: name.to_string(),
        })?;
        if member.kind == MemberKind::Dir {
            return Err(Error::NotAFile {
                member: member.name.clone(),
            });
        }
        if let Some(b) = self.assembled.get(&member.name) {
            return Ok(b.clone());
        }
        match (&self.data, member.data_offset) {
            (Some(data), Some(offset)) => {
                data.slice_len(offset, member.size)
                    .map_err(|e| Error::TruncatedData {
                        member: member.name.clone(),
                        header_offset: offset.saturating_sub(tar::BLOCK),
                        start: e.start,
                        end: e.end,
                        len: e.len,
                    })
            }
            _ => read_folder_file(&self.path, member),
        }
    }
}

/// Normalises a member name: drops `./` and empty components and a trailing
/// `/`; `None` for the root (`.`, `./`, `""`).
///
/// # Errors
/// [`Error::UnsafePath`] for absolute names and `..` components.
pub fn normalise_name(raw: &str) -> Result<Option<String>, Error> {
    if raw.starts_with('/') || raw.contains('\0') {
        return Err(Error::UnsafePath {
            member: raw.to_string(),
        });
    }
    let mut parts = Vec::new();
    for part in raw.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(Error::UnsafePath {
                    member: raw.to_string(),
                })
            }
            p => parts.push(p),
        }
    }
    Ok((!parts.is_empty()).then(|| parts.join("/")))
}

fn parent_of(name: &str) -> &str {
    name.rfind('/').map_or("", |i| &name[..i])
}

/// Reads until `buf` is full or EOF; returns the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Decompresses a gzip stream (all concatenated members) into an anonymous
/// temporary file: the disk holds the tar, memory holds one buffer.
fn gunzip_to_temp(path: &Path, file: File) -> Result<File, Error> {
    let temp_err = |source| Error::Io {
        path: std::env::temp_dir(),
        source,
    };
    let mut out = tempfile::tempfile().map_err(temp_err)?;
    let mut decoder = flate2::read::MultiGzDecoder::new(io::BufReader::new(file));
    let mut buf = vec![0u8; 1 << 20];
    let mut decompressed: u64 = 0;
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(Error::Gzip {
                    path: path.to_path_buf(),
                    decompressed,
                    source,
                })
            }
        };
        out.write_all(buf.get(..n).unwrap_or(&[]))
            .map_err(temp_err)?;
        decompressed += n as u64;
    }
    out.flush().map_err(temp_err)?;
    Ok(out)
}

/// Lists an extracted folder depth-first with sorted siblings, refusing
/// symlinks and special files.
fn walk_folder(root: &Path) -> Result<Vec<Member>, Error> {
    let mut out = Vec::new();
    walk_dir(root, "", &mut out)?;
    Ok(out)
}

fn walk_dir(dir: &Path, rel: &str, out: &mut Vec<Member>) -> Result<(), Error> {
    let io_err = |path: &Path, source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut entries = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| io_err(dir, e))? {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let file_name = entry.file_name();
        let name = file_name
            .to_str()
            .ok_or_else(|| Error::NonUtf8Name { path: entry.path() })?;
        entries.push((name.to_string(), entry));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, entry) in entries {
        let member = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        // `DirEntry::file_type` does not follow symlinks.
        let ft = entry.file_type().map_err(|e| io_err(&entry.path(), e))?;
        if ft.is_symlink() {
            return Err(Error::Link { member });
        } else if ft.is_dir() {
            out.push(Member {
                name: member.clone(),
                size: 0,
                kind: MemberKind::Dir,
                data_offset: None,
            });
            walk_dir(&entry.path(), &member, out)?;
        } else if ft.is_file() {
            let size = entry
                .metadata()
                .map_err(|e| io_err(&entry.path(), e))?
                .len();
            out.push(Member {
                name: member,
                size,
                kind: MemberKind::File,
                data_offset: None,
            });
        } else {
            return Err(Error::UnsupportedType {
                member,
                kind: "special file (device, fifo or socket)".into(),
            });
        }
    }
    Ok(())
}

fn read_folder_file(root: &Path, member: &Member) -> Result<ByteView, Error> {
    let path = root.join(&member.name);
    let io_err = |source| Error::Io {
        path: path.clone(),
        source,
    };
    // Re-check: the folder may have changed since it was indexed.
    let meta = fs::symlink_metadata(&path).map_err(io_err)?;
    if !meta.is_file() || meta.len() != member.size {
        let actual = if meta.file_type().is_symlink() {
            "a symlink".to_string()
        } else if meta.is_file() {
            format!("{} bytes", meta.len())
        } else {
            "not a regular file".to_string()
        };
        return Err(Error::Changed {
            member: member.name.clone(),
            expected: member.size,
            actual,
        });
    }
    if member.size == 0 {
        // Mapping zero bytes fails on some platforms; nothing to map anyway.
        return Ok(ByteView::from_vec(Vec::new()));
    }
    let file = File::open(&path).map_err(io_err)?;
    Ok(ByteView::from_mapped_file(
        map_file(&file).map_err(io_err)?,
        file,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::tar_write::{entry_header, EntryKind, TarWriter};
    use std::io::{Seek, SeekFrom};

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/mcore/llama/nemo")
            .join(name)
    }

    fn names(a: &Archive) -> Vec<(String, MemberKind, u64)> {
        a.members()
            .iter()
            .map(|m| (m.name.clone(), m.kind, m.size))
            .collect()
    }

    const TOKENIZER: &str = "79b7d2d99291075a58045d29d6b0b3cc_tokenizer.model";

    #[test]
    fn reads_fixture_member_lists() {
        use MemberKind::{Dir, File};
        let tp2 = Archive::open(fixture("tiny_llama_tp2.nemo")).unwrap();
        assert_eq!(tp2.kind(), ArchiveKind::Tar);
        assert_eq!(
            names(&tp2),
            [
                (TOKENIZER.to_string(), File, 1189),
                ("model_config.yaml".to_string(), File, 1963),
                ("mp_rank_00".to_string(), Dir, 0),
                ("mp_rank_00/model_weights.ckpt".to_string(), File, 155188),
                ("mp_rank_01".to_string(), Dir, 0),
                ("mp_rank_01/model_weights.ckpt".to_string(), File, 155188),
            ]
        );
        let cfg = tp2.read("./model_config.yaml").unwrap();
        assert!(cfg.is_mapped());
        assert!(cfg.as_slice().starts_with(b"mcore_gpt: true\n"));
        // A torch zip starts with a local file header.
        let w = tp2.read("mp_rank_01/model_weights.ckpt").unwrap();
        assert_eq!(&w.as_slice()[..4], b"PK\x03\x04");

        let dist = Archive::open(fixture("tiny_llama_dist_tp1.nemo")).unwrap();
        let children: Vec<_> = dist
            .list_dir("./model_weights/")
            .iter()
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(
            children,
            [
                "model_weights/.metadata",
                "model_weights/__0_0.distcp",
                "model_weights/__0_1.distcp",
                "model_weights/common.pt",
                "model_weights/metadata.json"
            ]
        );
        assert_eq!(dist.list_dir(".").len(), 3);
        assert_eq!(dist.get("model_weights/__0_1.distcp").unwrap().size, 165628);

        let tp1 = Archive::open(fixture("tiny_llama_tp1.nemo")).unwrap();
        assert_eq!(tp1.get("./model_weights.ckpt").unwrap().size, 302644);
        assert_eq!(tp1.path(), fixture("tiny_llama_tp1.nemo"));
    }

    /// Every file member of `a` and `b`: same names, same bytes.
    fn assert_same_contents(a: &Archive, b: &Archive) {
        assert_eq!(names(a), names(b));
        for m in a.members().iter().filter(|m| m.kind == MemberKind::File) {
            assert_eq!(
                a.read(&m.name).unwrap().as_slice(),
                b.read(&m.name).unwrap().as_slice(),
                "{}",
                m.name
            );
        }
    }

    #[test]
    fn gzip_and_folder_copies_match_the_tar() {
        let dir = tempfile::tempdir().unwrap();
        for fx in [
            "tiny_llama_tp1.nemo",
            "tiny_llama_tp2.nemo",
            "tiny_llama_dist_tp1.nemo",
        ] {
            let tar = Archive::open(fixture(fx)).unwrap();
            let gz_path = dir.path().join(format!("{fx}.gz"));
            let mut enc = flate2::write::GzEncoder::new(
                File::create(&gz_path).unwrap(),
                flate2::Compression::fast(),
            );
            enc.write_all(&fs::read(fixture(fx)).unwrap()).unwrap();
            enc.finish().unwrap();
            let gz = Archive::open(&gz_path).unwrap();
            assert_eq!(gz.kind(), ArchiveKind::GzipTar);
            assert_same_contents(&tar, &gz);

            let root = dir.path().join(format!("{fx}.d"));
            for m in tar.members() {
                let p = root.join(&m.name);
                match m.kind {
                    MemberKind::Dir => fs::create_dir_all(&p).unwrap(),
                    MemberKind::File => {
                        fs::create_dir_all(p.parent().unwrap()).unwrap();
                        fs::write(&p, tar.read(&m.name).unwrap().as_slice()).unwrap();
                    }
                }
            }
            let folder = Archive::open(&root).unwrap();
            assert_eq!(folder.kind(), ArchiveKind::Folder);
            assert_same_contents(&tar, &folder);
        }
    }

    #[test]
    fn gzip_cut_short_is_a_gzip_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&fs::read(fixture("tiny_llama_tp1.nemo")).unwrap())
            .unwrap();
        let gz = enc.finish().unwrap();
        let path = dir.path().join("cut.nemo");
        fs::write(&path, &gz[..gz.len() / 2]).unwrap();
        match Archive::open(&path) {
            Err(e @ Error::Gzip { .. }) => {
                assert!(e.to_string().contains("cut short"), "{e}");
                assert!(e.to_string().contains("cut.nemo"), "{e}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn folder_mode_refuses_symlinks_and_maps_empty_files() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/empty"), b"").unwrap();
        fs::write(dir.path().join("a.yaml"), b"x: 1\n").unwrap();
        let a = Archive::open(dir.path()).unwrap();
        assert_eq!(
            names(&a),
            [
                ("a.yaml".to_string(), MemberKind::File, 5),
                ("sub".to_string(), MemberKind::Dir, 0),
                ("sub/empty".to_string(), MemberKind::File, 0),
            ]
        );
        assert!(a.read("sub/empty").unwrap().is_empty());
        assert!(a.read("a.yaml").unwrap().is_mapped());
        assert!(matches!(a.read("sub"), Err(Error::NotAFile { .. })));

        // The file grew after indexing.
        fs::write(dir.path().join("a.yaml"), b"x: 12\n").unwrap();
        match a.read("a.yaml") {
            Err(Error::Changed {
                member, expected, ..
            }) => assert_eq!((member.as_str(), expected), ("a.yaml", 5)),
            other => panic!("{other:?}"),
        }

        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("sub/link")).unwrap();
        match Archive::open(dir.path()) {
            Err(Error::Link { member }) => assert_eq!(member, "sub/link"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn folder_mode_refuses_non_utf8_names() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join(std::ffi::OsStr::from_bytes(b"w\xff.bin"));
        fs::write(&bad, b"1").unwrap();
        match Archive::open(dir.path()) {
            Err(Error::NonUtf8Name { path }) => assert_eq!(path, bad),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn implied_directories_duplicates_and_lookups() {
        let mut w = TarWriter::new(Vec::new());
        w.append_file("a/b/c.bin", 2, &b"hi"[..]).unwrap();
        w.append_dir("a").unwrap(); // listed after its child: not a duplicate
        let a =
            Archive::from_tar_bytes("mem.tar", ByteView::from_vec(w.finish().unwrap())).unwrap();
        assert_eq!(
            names(&a),
            [
                ("a".to_string(), MemberKind::Dir, 0),
                ("a/b".to_string(), MemberKind::Dir, 0),
                ("a/b/c.bin".to_string(), MemberKind::File, 2),
            ]
        );
        assert_eq!(a.get("./a/b/").unwrap().kind, MemberKind::Dir);
        assert!(a.get("../a").is_none());
        assert_eq!(a.list_dir("a/b")[0].name, "a/b/c.bin");
        assert_eq!(a.read("a/b/c.bin").unwrap().as_slice(), b"hi");
        match a.read("a/b/missing") {
            Err(e @ Error::NotFound { .. }) => assert!(e.to_string().contains("a/b/missing")),
            other => panic!("{other:?}"),
        }

        let mut w = TarWriter::new(Vec::new());
        w.append_file("x", 1, &b"1"[..]).unwrap();
        w.append_file("./x", 1, &b"2"[..]).unwrap();
        match Archive::from_tar_bytes("dup.tar", ByteView::from_vec(w.finish().unwrap())) {
            Err(Error::Duplicate { member }) => assert_eq!(member, "x"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        match Archive::open("/nonexistent/x.nemo") {
            Err(e @ Error::Io { .. }) => assert!(e.to_string().contains("/nonexistent/x.nemo")),
            other => panic!("{other:?}"),
        }
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(matches!(Archive::open(f.path()), Err(Error::NotTar { .. })));
    }

    #[test]
    fn huge_sparse_tar_opens_reading_only_headers() {
        // 100 GiB of holes: indexing must not read (or allocate) the payload.
        let big: u64 = 100 << 30;
        let mut tmp = tempfile::NamedTempFile::new().unwrap();
        let f = tmp.as_file_mut();
        f.write_all(&entry_header("weights.bin", EntryKind::File, big, 0).unwrap())
            .unwrap();
        let data_at = f.stream_position().unwrap();
        f.seek(SeekFrom::Current(big as i64)).unwrap();
        let mut w = TarWriter::new(f);
        w.append_file("model_config.yaml", 3, &b"a: "[..]).unwrap();
        w.finish().unwrap();
        let a = Archive::open(tmp.path()).unwrap();
        assert_eq!(a.kind(), ArchiveKind::Tar);
        let m = a.get("weights.bin").unwrap();
        assert_eq!((m.size, m.data_offset), (big, Some(data_at)));
        assert_eq!(a.read("model_config.yaml").unwrap().as_slice(), b"a: ");
        assert_eq!(a.read("weights.bin").unwrap().len() as u64, big);
    }
}
