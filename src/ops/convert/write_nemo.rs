//! Writing a canonical model as a per-rank `.nemo` (variants A-C) at any
//! TP/PP: each rank's state dict (local-spec keys, stage-local layer
//! numbers, an `OrderedDict` as mcore saves it) is streamed from slices of
//! the canonical pieces straight into the tar, with source pages read ahead
//! before and released after each tensor so resident memory stays bounded.
//! Config and artifacts go first; members are in `tarfile.add` order.

use std::io;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::formats::tar_write::{python_add_order, TarWriter};
use crate::formats::torch::dtype::Dtype;
use crate::formats::torch::tensor::{StorageRef, TensorKind, TensorRef};
use crate::formats::torch::value::{Construct, Global, Object, Value};
use crate::io::bytes::ByteView;
use crate::io::output::OutputFile;
use crate::io::piece::Piece;
use crate::io::sink::RecordSink;
use crate::model::checkpoint::Variant;
use crate::model::layout::{Family, Rule};

use super::canonical::{split_layer, Canonical, Item};
use super::tensor::{self, resize_rows, Flat};

/// Errors writing a `.nemo`; each names the member or tensor.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating or committing the output, the tar stream, a source member,
    /// a member's bytes (the failures every archive writer shares).
    #[error(transparent)]
    Write(#[from] crate::formats::tar_write::WriteError),
    /// Tensor arithmetic (a split that does not divide).
    #[error(transparent)]
    Tensor(#[from] tensor::Error),
    /// The target layout is impossible for this model.
    #[error("cannot write TP={tp} PP={pp}: {why}")]
    Layout {
        /// TP size.
        tp: u64,
        /// PP size.
        pp: u64,
        /// Why.
        why: String,
    },
    /// Partition rules.
    #[error(transparent)]
    Rules(#[from] crate::model::layout::Error),
}

crate::formats::tar_write::from_write_errors!(Error);

/// How to lay the model out.
#[derive(Debug, Clone)]
pub struct Target {
    /// Tensor-parallel size.
    pub tp: u64,
    /// Pipeline-parallel size.
    pub pp: u64,
    /// Rows of the word embedding / output layer (padded vocab, divisible by `tp`).
    pub vocab_rows: u64,
    /// Embeddings tied (no output layer weight except on the last stage at PP>1).
    pub tied: bool,
    /// Output element type (a cast when it differs from a tensor's).
    pub dtype: Option<Dtype>,
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The output file.
    pub output: PathBuf,
    /// TP size.
    pub tp: u64,
    /// PP size.
    pub pp: u64,
    /// Rank files.
    pub rank_files: usize,
    /// Tensors written (over all ranks).
    pub tensors: usize,
    /// Bytes of the `.nemo`.
    pub bytes: u64,
}

/// One tensor to stream.
struct Job {
    pieces: Vec<Piece>,
    cast: Option<(Dtype, Dtype)>,
}

/// Source bytes read ahead, written and released at a time: bounds the
/// resident pages of the mapping to about this much (plus the kernel's folio
/// rounding), whatever the tensor size.
const WINDOW: u64 = 8 << 20;

/// Streams pieces into `sink` a window at a time, reading each window's
/// mapped source pages ahead and releasing them after; casts float types
/// when asked.
pub(crate) fn stream_pieces(
    pieces: &[Piece],
    cast: Option<(Dtype, Dtype)>,
    sink: &mut dyn RecordSink,
) -> io::Result<()> {
    let mut group: Vec<Piece> = Vec::new();
    let mut size = 0u64;
    for p in pieces {
        match p {
            Piece::Bytes(b) if b.len() as u64 > WINDOW => {
                write_window(&group, cast, sink)?;
                group.clear();
                size = 0;
                let len = b.len() as u64;
                let mut off = 0u64;
                while off < len {
                    let end = (off + WINDOW).min(len);
                    let w = b.slice(off..end).map_err(io::Error::other)?;
                    write_window(&[Piece::Bytes(w)], cast, sink)?;
                    off = end;
                }
            }
            _ => {
                group.push(p.clone());
                size += p.len();
                if size >= WINDOW {
                    write_window(&group, cast, sink)?;
                    group.clear();
                    size = 0;
                }
            }
        }
    }
    write_window(&group, cast, sink)
}

/// One window: prefetch its mapped spans, write (or cast) it, release them.
/// Windows end on piece boundaries, which are element boundaries, so a cast
/// never straddles two windows.
fn write_window(
    pieces: &[Piece],
    cast: Option<(Dtype, Dtype)>,
    sink: &mut dyn RecordSink,
) -> io::Result<()> {
    if pieces.is_empty() {
        return Ok(());
    }
    match cast {
        Some((from, to)) if from != to => crate::io::piece::with_pages_of(pieces, || {
            crate::ops::reshard::cast_pieces(pieces, from, to, sink)
        }),
        // The sink prefetches and releases (see `RecordSink::pieces`).
        _ => sink.pieces(pieces),
    }
}

/// A float cast `from -> to`, checked.
pub(crate) fn cast_of(
    name: &str,
    from: Dtype,
    to: Option<Dtype>,
) -> Result<Option<(Dtype, Dtype)>, tensor::Error> {
    match to {
        Some(to) if to != from => {
            let float = |d: Dtype| matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16);
            if !float(from) || !float(to) {
                return Err(tensor::Error::Shape {
                    name: name.to_string(),
                    why: format!("cannot cast {from} to {to} (float32/float16/bfloat16 only)"),
                });
            }
            Ok(Some((from, to)))
        }
        _ => Ok(None),
    }
}

/// A tensor value over a placeholder storage of `nbytes` (the bytes come from its job).
fn placeholder(key: &str, dtype: Dtype, shape: Vec<u64>) -> Value {
    let n = tensor::nbytes(dtype, &shape).unwrap_or(0);
    let t = TensorRef {
        dtype,
        stride: crate::formats::torch::tensor::row_major_strides(&shape),
        shape,
        storage_offset: 0,
        storage: StorageRef::from_pieces(key, vec![Piece::Zeros(n)]),
        requires_grad: false,
        kind: TensorKind::Plain,
    };
    Value::Tensor(Box::new(t))
}

/// Appends one tensor (rank `tp`'s split of `f`) to the state dict and its job.
fn push_tensor(
    od: &mut Object,
    jobs: &mut Vec<Job>,
    key: String,
    f: &Flat,
    rule: Rule,
    t: &Target,
    tp: u64,
) -> Result<(), Error> {
    let (shape, pieces) = f.split(rule, t.tp, tp)?;
    let cast = cast_of(&key, f.dtype, t.dtype)?;
    let dtype = t.dtype.unwrap_or(f.dtype);
    od.items
        .push((Value::Str(key.clone()), placeholder(&key, dtype, shape)));
    jobs.push(Job { pieces, cast });
    Ok(())
}

/// The state dict of rank `(tp, pp)` and its jobs in storage order.
fn build_rank(
    canon: &Canonical,
    family: &Family,
    t: &Target,
    tp: u64,
    pp: u64,
) -> Result<(Value, Vec<Job>), Error> {
    let layers = canon.num_layers();
    let per = layers / t.pp;
    let (first, last) = (pp * per, (pp + 1) * per);
    let last_stage = pp + 1 == t.pp;
    let mut od = Object::new(
        Global::new("collections", "OrderedDict"),
        Construct::Reduce,
        vec![],
    );
    let mut jobs = Vec::new();
    const EMBED: &str = "model.embedding.word_embeddings.weight";
    for e in &canon.entries {
        let local = match split_layer(&e.name) {
            Some((l, suffix)) if (first..last).contains(&l) => {
                Some(format!("model.decoder.layers.{}.{suffix}", l - first))
            }
            Some(_) => None,
            None if e.name.starts_with("model.embedding.") => (pp == 0).then(|| e.name.clone()),
            None => last_stage.then(|| e.name.clone()),
        };
        // Tied at PP>1: the last stage holds its own copy of the embedding as
        // the output layer (before the output layer's extra state).
        if t.tied && t.pp > 1 && last_stage && e.name == "model.output_layer._extra_state" {
            if let Some(f) = canon.tensor(EMBED) {
                let padded = resize_rows(f, "model.output_layer.weight", t.vocab_rows)?;
                push_tensor(
                    &mut od,
                    &mut jobs,
                    "model.output_layer.weight".into(),
                    &padded,
                    Rule::Vocab,
                    t,
                    tp,
                )?;
            }
        }
        let Some(key) = local else { continue };
        match &e.item {
            Item::Object(v) => od.items.push((Value::Str(key), v.clone())),
            Item::Tensor(f) => {
                let rule = Canonical::rule(family, &key, true);
                if rule == Rule::Vocab {
                    let padded = resize_rows(f, &key, t.vocab_rows)?;
                    push_tensor(&mut od, &mut jobs, key, &padded, rule, t, tp)?;
                } else {
                    push_tensor(&mut od, &mut jobs, key, f, rule, t, tp)?;
                }
            }
        }
    }
    Ok((Value::Object(Box::new(od)), jobs))
}

/// Checks the target against the model (mcore's `divide()` asserts).
pub fn check_target(
    canon: &Canonical,
    heads: u64,
    groups: u64,
    ffn: u64,
    t: &Target,
) -> Result<(), Error> {
    let bad = |why: String| Error::Layout {
        tp: t.tp,
        pp: t.pp,
        why,
    };
    if t.tp == 0 || t.pp == 0 {
        return Err(bad("sizes must be at least 1".into()));
    }
    let layers = canon.num_layers();
    for (what, n, by) in [
        ("attention heads", heads, t.tp),
        ("query groups", groups, t.tp),
        ("ffn_hidden_size", ffn, t.tp),
        ("padded vocab rows", t.vocab_rows, t.tp),
        ("layers", layers, t.pp),
    ] {
        if n % by != 0 {
            return Err(bad(format!("{what} ({n}) do not divide by {by}")));
        }
    }
    Ok(())
}

/// Writes `canon` as a per-rank `.nemo` at `out`: `config_text` as
/// `model_config.yaml`, `artifacts` (member name, bytes) byte for byte.
///
/// # Errors
/// [`Error`]; on error the output does not appear.
pub fn write(
    canon: &Canonical,
    t: &Target,
    config_text: &str,
    artifacts: &[(String, ByteView)],
    out: &Path,
    force: bool,
    no_sync: bool,
) -> Result<Summary, Error> {
    let family = Family::load("mcore-gpt")?;
    let variant = Variant::for_sizes(t.tp, t.pp);
    enum M<'a> {
        Dir,
        Bytes(&'a [u8]),
        Rank(u64, u64),
    }
    let mut members: Vec<(String, M<'_>)> = vec![(
        crate::model::checkpoint::CONFIG_MEMBER.to_string(),
        M::Bytes(config_text.as_bytes()),
    )];
    for (name, b) in artifacts {
        members.push((name.clone(), M::Bytes(b.as_slice())));
    }
    for pp in 0..t.pp {
        for tp in 0..t.tp {
            let m = variant.rank_member(tp, pp);
            if let Some((dir, _)) = m.split_once('/') {
                members.push((dir.to_string(), M::Dir));
            }
            members.push((m, M::Rank(tp, pp)));
        }
    }
    members.sort_by(|a, b| python_add_order(&a.0, &b.0));
    let mut file = OutputFile::create(out, force)?;
    if no_sync {
        file = file.not_durable();
    }
    let mut tar =
        TarWriter::new(crate::io::sink::BlockWriter::new(file.file()).with_writeback(!no_sync));
    tar.append_dir("")?;
    let mut tensors = 0usize;
    for (name, m) in &members {
        match m {
            M::Dir => tar.append_dir(name)?,
            M::Bytes(b) => tar.append_pieces(name, b.len() as u64, [*b])?,
            M::Rank(tp, pp) => {
                let (root, jobs) = build_rank(canon, &family, t, *tp, *pp)?;
                tensors += jobs.len();
                // Tensors without a cast are read (and checksummed) on a
                // second thread running ahead of this one, which only writes.
                let plain = |j: &Job| !matches!(j.cast, Some((a, b)) if a != b);
                let uncast: Vec<&[Piece]> = jobs
                    .iter()
                    .filter(|j| plain(j))
                    .map(|j| &j.pieces[..])
                    .collect();
                std::thread::scope(|scope| -> Result<(), Error> {
                    let mut ahead =
                        crate::io::stream::Prefetch::start(scope, uncast).map_err(|source| {
                            Error::Write(crate::formats::tar_write::WriteError::Member {
                                member: name.clone(),
                                source,
                            })
                        })?;
                    let mut next = 0usize;
                    tar.append_streamed(name, |w| {
                        let mut fill =
                            |_: &StorageRef, sink: &mut dyn RecordSink| -> io::Result<()> {
                                // Storages come in first-use order = state-dict order = job order.
                                let job = jobs
                                    .get(next)
                                    .ok_or_else(|| io::Error::other("storage without a tensor"))?;
                                next += 1;
                                if plain(job) {
                                    let n = job.pieces.iter().map(Piece::len).sum();
                                    sink.streamed(n, &mut |out| ahead.write_next(out))
                                } else {
                                    stream_pieces(&job.pieces, job.cast, sink)
                                }
                            };
                        crate::formats::torch::file::save_with(w, "model_weights", &root, &mut fill)
                            .map(|_| ())
                            .map_err(io::Error::other)
                    })?;
                    Ok(())
                })?;
            }
        }
    }
    let bytes = tar.position();
    // (finish flushes; the writer borrows the file until dropped)
    drop(tar.finish()?);
    let output = file.commit()?;
    Ok(Summary {
        output,
        tp: t.tp,
        pp: t.pp,
        rank_files: (t.tp * t.pp) as usize,
        tensors,
        bytes,
    })
}
