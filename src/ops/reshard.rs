//! Executes a reshard [`Plan`]: writes the per-rank `.nemo` tar, streaming each
//! output tensor from slices of the memory-mapped input straight into the
//! output (no tensor is materialised; only a `--dtype` cast computes bytes,
//! a block at a time). Resident memory stays bounded: the source pages of a
//! tensor are read ahead just before it streams and dropped from this
//! process right after. The output is atomic (a temporary file renamed at the
//! end; nothing is left behind on error).
//!
//! Member order is what `tarfile.add` of NeMo's temp folder gives: the
//! config, the artifacts byte for byte, and the rank folders, sorted.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::formats::archive::MemberKind;
use crate::formats::tar_write::{python_add_order, TarWriter};
use crate::formats::torch::tensor::{StorageRef, TensorRef};
use crate::formats::torch::value::{Construct, Global, Object};
use crate::formats::torch::{Dtype, Value};
use crate::io::output::OutputFile;
use crate::io::piece::{with_pages_of, Piece};
use crate::io::sink::RecordSink;
use crate::model::canonical::{Canonical, EntryValue};
use crate::model::checkpoint::{is_weights_member, Weights, CONFIG_MEMBER};
use crate::model::plan::{Plan, PlanItem};

/// Errors writing the resharded checkpoint; each names the member or tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or committing the output, the tar stream, a source member,
    /// a member's bytes (the failures every archive writer shares).
    #[error(transparent)]
    Write(#[from] crate::formats::tar_write::WriteError),
    /// Reading a canonical slice.
    #[error(transparent)]
    Canonical(#[from] crate::model::canonical::Error),
    /// A tensor's slices do not add up to its size (a bug in the plan).
    #[error("{key}: slices hold {found} bytes, the tensor needs {expected}")]
    Size {
        /// The output key.
        key: String,
        /// Bytes from the slices.
        found: u64,
        /// Bytes of the tensor.
        expected: u64,
    },
    /// Building a tensor view.
    #[error("{key}: {source}")]
    Tensor {
        /// The output key.
        key: String,
        /// Why.
        #[source]
        source: crate::formats::torch::tensor::Error,
    },
}

crate::formats::tar_write::from_write_errors!(Error);

/// What [`write()`] wrote.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The output file.
    pub output: PathBuf,
    /// Target TP.
    pub tp: u64,
    /// Target PP.
    pub pp: u64,
    /// Rank files written.
    pub rank_files: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Tensor bytes written.
    pub tensor_bytes: u64,
    /// Bytes of the output archive.
    pub bytes: u64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Non-fatal findings.
    pub warnings: Vec<String>,
}

/// Output options.
#[derive(Default)]
pub struct WriteOptions<'p> {
    /// Replace an existing output.
    pub force: bool,
    /// Called with (tensor bytes written, total) as the output streams.
    pub progress: Option<&'p mut dyn FnMut(u64, u64)>,
    /// Skip the fsyncs before the final rename (still atomic, not durable).
    pub no_sync: bool,
}

/// Writes `plan` (made from `canon`) as a `.nemo` tar at `out`.
///
/// # Errors
/// An existing output without `force`, unreadable input slices, I/O errors;
/// on any error the output does not appear.
pub fn write(
    canon: &Canonical,
    plan: &Plan,
    out: &Path,
    opts: WriteOptions<'_>,
) -> Result<Summary, Error> {
    let started = Instant::now();
    let ckpt = canon.checkpoint();
    let mut progress = opts.progress;
    let mut file = OutputFile::create(out, opts.force)?;
    if opts.no_sync {
        file = file.not_durable();
    }
    let mut tar = TarWriter::new(
        crate::io::sink::BlockWriter::new(file.file()).with_writeback(!opts.no_sync),
    );
    tar.append_dir("")?;

    // Members: everything that is not weights, plus the new rank files.
    enum Item<'a> {
        Dir(String),
        Copy(String),
        Config(&'a str),
        Rank(usize),
    }
    let dist_dir = match &ckpt.weights {
        Weights::Dist(d) => Some(d.dir.clone()),
        Weights::PerRank(_) | Weights::Global(_) => None,
    };
    let in_dist = |name: &str| match &dist_dir {
        Some(d) if d.is_empty() => true,
        Some(d) => {
            name == d
                || name
                    .strip_prefix(d.as_str())
                    .is_some_and(|r| r.starts_with('/'))
        }
        None => false,
    };
    let mut items: Vec<(String, Item)> = Vec::new();
    for m in ckpt.archive().members() {
        let name = m.name.as_str();
        if name.is_empty() || is_weights_member(name) || in_dist(name) {
            continue;
        }
        let item = match m.kind {
            MemberKind::Dir => Item::Dir(name.to_string()),
            MemberKind::File if name == CONFIG_MEMBER => match &plan.config_text {
                Some(t) => Item::Config(t),
                None => continue,
            },
            MemberKind::File => Item::Copy(name.to_string()),
        };
        items.push((name.to_string(), item));
    }
    for (i, r) in plan.ranks.iter().enumerate() {
        if let Some((dir, _)) = r.member.split_once('/') {
            items.push((dir.to_string(), Item::Dir(dir.to_string())));
        }
        items.push((r.member.clone(), Item::Rank(i)));
    }
    items.sort_by(|a, b| python_add_order(&a.0, &b.0));

    let archive_name = ckpt
        .rank_files()
        .first()
        .map(|r| r.file.archive_name.clone())
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .unwrap_or_else(|| "model_weights".to_string());
    let mut done = 0u64;
    let mut tensors = 0usize;
    for (name, item) in &items {
        match item {
            Item::Dir(d) => tar.append_dir(d)?,
            Item::Config(text) => {
                tar.append_pieces(name, text.len() as u64, [text.as_bytes()])?;
            }
            Item::Copy(m) => {
                let bytes = ckpt.read_member(m)?;
                tar.append_pieces(name, bytes.len() as u64, [bytes])?;
            }
            Item::Rank(i) => {
                let member = plan.ranks[*i].member.clone();
                tensors += emit_rank(
                    canon,
                    plan,
                    *i,
                    &archive_name,
                    None,
                    &mut progress,
                    &mut done,
                    &mut |f| {
                        tar.append_streamed(&member, |w| f(w))?;
                        Ok(())
                    },
                )?;
            }
        }
    }
    let bytes = tar.position();
    // (finish flushes; the writer borrows the file until dropped)
    drop(tar.finish()?);
    let output = file.commit()?;
    Ok(Summary {
        output,
        tp: plan.tp,
        pp: plan.pp,
        rank_files: plan.ranks.len(),
        tensors,
        tensor_bytes: plan.bytes,
        bytes,
        seconds: started.elapsed().as_secs_f64(),
        warnings: plan.warnings.clone(),
    })
}

/// Writes a rank file's bytes: given the emission (which writes into a sink), runs it on
/// a tar member or a file.
pub(crate) type RankPut<'a> = dyn FnMut(&mut dyn FnMut(&mut dyn crate::io::sink::Sink) -> io::Result<()>) -> Result<(), Error>
    + 'a;

/// Streams output rank `i` of `plan` as a `torch.save` zip through `put`, which hands the
/// emission a sink (a tar member, a file). `wrap` turns the state dict into the pickled root
/// (Megatron-LM's `{args, model, ...}`); `None` saves the state dict itself. Returns the
/// number of tensors written.
///
/// # Errors
/// Unreadable input slices, sizes that disagree with the plan, I/O errors.
#[allow(clippy::too_many_arguments)]
pub(crate) fn emit_rank(
    canon: &Canonical,
    plan: &Plan,
    i: usize,
    archive_name: &str,
    wrap: Option<&dyn Fn(Value) -> Value>,
    progress: &mut Option<&mut dyn FnMut(u64, u64)>,
    done: &mut u64,
    put: &mut RankPut<'_>,
) -> Result<usize, Error> {
    let rank = &plan.ranks[i];
    let (root, jobs) = build_rank(canon, plan, i)?;
    let root = match wrap {
        Some(w) => w(root),
        None => root,
    };
    let mut next = 0usize;
    let total = plan.bytes;
    // Uncast tensors are read (and checksummed) on a second thread running ahead of this
    // one, which only writes.
    let uncast: Vec<&[Piece]> = jobs
        .iter()
        .filter(|j| j.cast.is_none())
        .map(|j| &j.pieces[..])
        .collect();
    std::thread::scope(|scope| {
        let mut ahead = crate::io::stream::Prefetch::start(scope, uncast).map_err(|source| {
            Error::Write(crate::formats::tar_write::WriteError::Member {
                member: rank.member.clone(),
                source,
            })
        })?;
        put(&mut |w| {
            let mut fill = |s: &StorageRef, sink: &mut dyn RecordSink| -> io::Result<()> {
                // A storage inside a kept object (a TE `_extra_state` tensor) is written as
                // it is; ours are composed placeholders, met in first-use order = tensor order.
                if s.composed.is_empty() {
                    for p in s.pieces() {
                        if let Piece::Bytes(b) = p {
                            sink.bytes(b.as_slice())?;
                        }
                    }
                    return Ok(());
                }
                let job = jobs
                    .get(next)
                    .ok_or_else(|| io::Error::other("storage without a planned tensor"))?;
                next += 1;
                if job.nbytes != s.nbytes() {
                    return Err(io::Error::other(format!(
                        "{}: storage of {} bytes, planned {}",
                        job.key,
                        s.nbytes(),
                        job.nbytes
                    )));
                }
                match job.cast {
                    None => sink.streamed(job.nbytes, &mut |out| ahead.write_next(out))?,
                    Some((from, to)) => {
                        with_pages_of(&job.pieces, || cast_pieces(&job.pieces, from, to, sink))?
                    }
                }
                *done += job.nbytes;
                if let Some(cb) = progress.as_mut() {
                    cb(*done, total);
                }
                Ok(())
            };
            crate::formats::torch::file::save_with(w, archive_name, &root, &mut fill)
                .map(|_| ())
                .map_err(io::Error::other)
        })
    })?;
    Ok(jobs.len())
}

/// One tensor to stream: its source pieces and an optional cast.
struct Job {
    key: String,
    nbytes: u64,
    pieces: Vec<Piece>,
    cast: Option<(Dtype, Dtype)>,
}

/// The state dict of one output rank (tensors over placeholder storages of
/// the right size) and the pieces each storage streams from, in order.
fn build_rank(canon: &Canonical, plan: &Plan, i: usize) -> Result<(Value, Vec<Job>), Error> {
    let rank = &plan.ranks[i];
    let mut od = Object::new(
        Global::new("collections", "OrderedDict"),
        Construct::Reduce,
        vec![],
    );
    let mut jobs = Vec::new();
    for e in &rank.entries {
        let value = match &e.item {
            PlanItem::Object { canon: None, .. } => Value::None,
            PlanItem::Object {
                canon: Some(ci),
                source_rank,
            } => match canon.entries.get(*ci).map(|x| &x.value) {
                Some(EntryValue::Object(v)) => v
                    .get(*source_rank)
                    .or_else(|| v.first())
                    .cloned()
                    .unwrap_or(Value::None),
                _ => Value::None,
            },
            PlanItem::Tensor {
                canon: ci,
                source_dtype,
                dtype,
                shape,
                bytes,
                segments,
            } => {
                let Some(EntryValue::Tensor(x)) = canon.entries.get(*ci).map(|x| &x.value) else {
                    continue;
                };
                let name = &canon.entries[*ci].name;
                let pieces = canon.read_segments(name, x, segments)?;
                let src_bytes: u64 = pieces.iter().map(Piece::len).sum();
                let numel: u64 = shape.iter().product();
                let expected = numel * source_dtype.size() as u64;
                if src_bytes != expected {
                    return Err(Error::Size {
                        key: e.key.clone(),
                        found: src_bytes,
                        expected,
                    });
                }
                let cast = (dtype != source_dtype).then_some((*source_dtype, *dtype));
                // The storage only declares the size; the fill streams the bytes.
                let storage = StorageRef::from_pieces(e.key.clone(), vec![Piece::Zeros(*bytes)]);
                jobs.push(Job {
                    key: e.key.clone(),
                    nbytes: *bytes,
                    pieces,
                    cast,
                });
                let t =
                    TensorRef::contiguous(*dtype, shape.clone(), storage).map_err(|source| {
                        Error::Tensor {
                            key: e.key.clone(),
                            source,
                        }
                    })?;
                Value::Tensor(Box::new(t))
            }
        };
        od.items.push((Value::Str(e.key.clone()), value));
    }
    Ok((Value::Object(Box::new(od)), jobs))
}

/// Converts float elements between f32, f16 and bf16, a block at a time.
pub(crate) fn cast_pieces(
    pieces: &[Piece],
    from: Dtype,
    to: Dtype,
    sink: &mut dyn RecordSink,
) -> io::Result<()> {
    const BLOCK: usize = 1 << 16; // elements
    let (fs, ts) = (from.size(), to.size());
    let mut carry: Vec<u8> = Vec::new(); // partial element across pieces
    let mut out = Vec::with_capacity(BLOCK * ts);
    let convert = |bytes: &[u8], out: &mut Vec<u8>| -> io::Result<()> {
        for el in bytes.chunks_exact(fs) {
            let v: f32 = match from {
                Dtype::F32 => f32::from_le_bytes([el[0], el[1], el[2], el[3]]),
                Dtype::F16 => half::f16::from_le_bytes([el[0], el[1]]).to_f32(),
                Dtype::BF16 => half::bf16::from_le_bytes([el[0], el[1]]).to_f32(),
                _ => return Err(io::Error::other(format!("cannot cast from {from}"))),
            };
            match to {
                Dtype::F32 => out.extend_from_slice(&v.to_le_bytes()),
                Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(v).to_le_bytes()),
                Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes()),
                _ => return Err(io::Error::other(format!("cannot cast to {to}"))),
            }
        }
        Ok(())
    };
    let zero_block = vec![0u8; BLOCK * fs];
    for p in pieces {
        let mut feed = |mut data: &[u8]| -> io::Result<()> {
            if !carry.is_empty() {
                let need = fs - carry.len();
                let k = need.min(data.len());
                carry.extend_from_slice(&data[..k]);
                data = &data[k..];
                if carry.len() == fs {
                    convert(&carry, &mut out)?;
                    carry.clear();
                }
            }
            for block in data.chunks(BLOCK * fs) {
                let whole = block.len() / fs * fs;
                convert(&block[..whole], &mut out)?;
                carry.extend_from_slice(&block[whole..]);
                sink.bytes(&out)?;
                out.clear();
            }
            Ok(())
        };
        match p {
            Piece::Bytes(b) => feed(b.as_slice())?,
            Piece::Zeros(n) => {
                let mut n = *n as usize;
                while n > 0 {
                    let k = n.min(zero_block.len());
                    feed(&zero_block[..k])?;
                    n -= k;
                }
            }
        }
    }
    if !out.is_empty() {
        sink.bytes(&out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::bytes::ByteView;

    #[test]
    fn casts_across_piece_boundaries() {
        let vals = [1.5f32, -2.0, 0.25];
        let bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        // split mid-element
        let pieces = vec![
            Piece::Bytes(ByteView::from_vec(bytes[..5].to_vec())),
            Piece::Bytes(ByteView::from_vec(bytes[5..].to_vec())),
            Piece::Zeros(4),
        ];
        let mut out = Vec::new();
        cast_pieces(&pieces, Dtype::F32, Dtype::BF16, &mut |b: &[u8]| {
            out.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        let got: Vec<f32> = out
            .chunks(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        assert_eq!(got, vec![1.5, -2.0, 0.25, 0.0]);
    }
}
