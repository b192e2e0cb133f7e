//! Writing a checkpoint back as a `.nemo` tar: members in their original
//! order, config text and artifacts byte for byte, weights re-serialized by
//! our own torch.save / distributed-checkpoint writers and streamed straight
//! into the tar. The output is atomic: a temporary file beside the target,
//! renamed only when everything was written.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::formats::archive::MemberKind;
use crate::formats::dist::{Backend, DistCheckpoint, OutDir};
use crate::formats::tar_write::TarWriter;
use crate::io::output::OutputFile;

pub use super::names::{artifact_name, artifact_original};
use super::{Checkpoint, Weights, CONFIG_MEMBER};

/// Errors writing a checkpoint; each names the member being written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or committing the output, the tar stream, a source member,
    /// a member's bytes (the failures every archive writer shares).
    #[error(transparent)]
    Write(#[from] crate::formats::tar_write::WriteError),
    /// Writing the distributed checkpoint.
    #[error("{dir}/: {source}")]
    Dist {
        /// The folder.
        dir: String,
        /// Why.
        #[source]
        source: Box<crate::formats::dist::Error>,
    },
}

crate::formats::tar_write::from_write_errors!(Error);

/// Options for [`pack`].
#[derive(Debug, Clone, Default)]
pub struct PackOptions {
    /// Replace an existing output.
    pub force: bool,
    /// Replacement `model_config.yaml` text (for commands that edit the config).
    pub config_text: Option<String>,
}

/// What [`pack`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct PackSummary {
    /// The output file.
    pub output: PathBuf,
    /// Members written (files and folders).
    pub members: usize,
    /// Bytes written.
    pub bytes: u64,
}

/// Writes `ckpt` to `out` as an uncompressed `.nemo` tar in the same layout.
pub fn pack(ckpt: &Checkpoint, out: &Path, opts: &PackOptions) -> Result<PackSummary, Error> {
    let mut file = OutputFile::create(out, opts.force)?;
    let mut tar =
        TarWriter::new(crate::io::sink::BlockWriter::new(file.file()).with_writeback(true));
    tar.append_dir("")?;
    let mut count = 1;
    let ranks: BTreeMap<&str, &super::RankFile> = ckpt
        .rank_files()
        .iter()
        .map(|r| (r.member.as_str(), r))
        .collect();
    let mut dist_done = false;
    let dist_dir = ckpt.layout.dist_dir.as_str();
    let in_dist = |name: &str| {
        dist_dir.is_empty()
            || name == dist_dir
            || name
                .strip_prefix(dist_dir)
                .is_some_and(|r| r.starts_with('/'))
    };
    for m in ckpt.archive().members() {
        let name = m.name.as_str();
        if let (Weights::Dist(dist), true) = (&ckpt.weights, in_dist(name) && name != CONFIG_MEMBER)
        {
            if !dist_done {
                dist_done = true;
                count += write_dist(&mut tar, ckpt, dist, dist_dir)?;
            }
            continue;
        }
        count += 1;
        match m.kind {
            MemberKind::Dir => tar.append_dir(name)?,
            MemberKind::File if name == CONFIG_MEMBER => {
                let text = opts.config_text.as_deref().unwrap_or(ckpt.config.text());
                tar.append_pieces(name, text.len() as u64, [text.as_bytes()])?;
            }
            MemberKind::File => match ranks.get(name) {
                Some(rank) => {
                    tar.append_streamed(name, |w| save_torch(w, &rank.file))?;
                }
                None => {
                    let bytes = ckpt.read_member(name)?;
                    tar.append_pieces(name, bytes.len() as u64, [bytes])?;
                }
            },
        }
    }
    let bytes = tar.position();
    // (finish flushes; the writer borrows the file until dropped)
    drop(tar.finish()?);
    let output = file.commit()?;
    Ok(PackSummary {
        output,
        members: count,
        bytes,
    })
}

fn save_torch(
    w: &mut dyn crate::io::sink::Sink,
    file: &crate::formats::torch::file::TorchFile,
) -> io::Result<()> {
    crate::formats::torch::file::save(w, &file.archive_name, &file.root)
        .map(|_| ())
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Tar members as a distributed-checkpoint writer's output folder: each file
/// streams straight into the archive (under `dir/`). Shared by `pack` and
/// `convert --to dist`.
pub(crate) struct TarDir<'a, W: crate::io::sink::Sink + io::Seek> {
    tar: &'a mut TarWriter<W>,
    dir: &'a str,
    count: usize,
    dirs: BTreeSet<String>,
}

impl<'a, W: crate::io::sink::Sink + io::Seek> TarDir<'a, W> {
    /// Members go under `dir/` (the caller appends `dir` itself).
    pub(crate) fn new(tar: &'a mut TarWriter<W>, dir: &'a str) -> Self {
        TarDir {
            tar,
            dir,
            count: 0,
            dirs: BTreeSet::new(),
        }
    }
}

impl<W: crate::io::sink::Sink + io::Seek> OutDir for TarDir<'_, W> {
    fn write_file(
        &mut self,
        name: &str,
        size: u64,
        fill: &mut dyn FnMut(&mut dyn Write) -> io::Result<()>,
    ) -> io::Result<()> {
        let member = if self.dir.is_empty() {
            name.to_string()
        } else {
            format!("{}/{name}", self.dir)
        };
        // Parent folders of nested members (zarr arrays) first, as tar.add writes them.
        let mut parent = String::new();
        for part in member
            .split('/')
            .collect::<Vec<_>>()
            .iter()
            .rev()
            .skip(1)
            .rev()
        {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(part);
            if parent != self.dir && self.dirs.insert(parent.clone()) {
                self.tar.append_dir(&parent).map_err(io::Error::other)?;
                self.count += 1;
            }
        }
        let written = self
            .tar
            .append_streamed(&member, |mut w| fill(&mut w))
            .map_err(io::Error::other)?;
        if written != size {
            return Err(io::Error::other(format!(
                "{member}: {size} bytes declared, {written} written"
            )));
        }
        self.count += 1;
        Ok(())
    }
}

/// Writes the distributed checkpoint folder; returns the number of members.
fn write_dist<W: crate::io::sink::Sink + io::Seek>(
    tar: &mut TarWriter<W>,
    ckpt: &Checkpoint,
    dist: &DistCheckpoint,
    dir: &str,
) -> Result<usize, Error> {
    let mut n = 0;
    if !dir.is_empty() {
        tar.append_dir(dir)?;
        n += 1;
    }
    let mut out = TarDir::new(tar, dir);
    let written = match dist.backend {
        Backend::TorchDist => {
            crate::formats::dist::dcp_write::write_torch_dist(dist, ckpt.archive(), &mut out)
        }
        Backend::Zarr => {
            crate::formats::dist::zarr_write::write_zarr(dist, ckpt.archive(), &mut out)
        }
    };
    written.map_err(|source| Error::Dist {
        dir: dir.to_string(),
        source: Box::new(source),
    })?;
    Ok(n + out.count)
}
