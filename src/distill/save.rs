//! Writes the distilled student as a `.nemo` in NeMo's per-rank layout at the training TP
//! (`model_weights.ckpt` at TP1, `mp_rank_XX/model_weights.ckpt` above), with its config
//! (tensor/pipeline sizes set) and tokenizer artifacts, atomically (temporary file + rename).
//!
//! Keys follow the student's checkpoint (TE-fused or separate norm names); a student built
//! from the config gets the separate-norm names of the `modelopt` layer spec that NeMo's
//! distillation script saves (`name: modelopt`), with mcore's `_extra_state = None` entries
//! for the linear layers.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::formats::tar_write::TarWriter;
use crate::formats::torch::tensor::{row_major_strides, StorageRef, TensorKind, TensorRef};
use crate::formats::torch::{Construct, Dtype, Global, Object, Value};
use crate::io::bytes::ByteView;
use crate::io::output::OutputFile;
use crate::model::checkpoint::Variant;

/// Errors writing the student.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Writing the archive.
    #[error("writing {path}: {source}")]
    Io {
        /// The output.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A tensor that cannot be stored.
    #[error("student tensor {key}: {why}")]
    Tensor {
        /// The key.
        key: String,
        /// Why.
        why: String,
    },
}

/// What goes into the archive.
#[derive(Debug)]
pub struct StudentArchive {
    /// `model_config.yaml` text.
    pub config: String,
    /// Artifact members (tokenizer files), name and bytes.
    pub artifacts: Vec<(String, ByteView)>,
    /// Per TP rank: (canonical parameter name, shard).
    pub ranks: Vec<Vec<(String, Tensor)>>,
    /// Store norms under the TE-fused names (`linear_qkv.layer_norm_weight`).
    pub te_norm_names: bool,
}

/// The stored key of a canonical parameter name.
pub fn stored_key(name: &str, te: bool) -> String {
    let n = if te {
        name.replace("input_layernorm.", "self_attention.linear_qkv.layer_norm_")
            .replace("pre_mlp_layernorm.", "mlp.linear_fc1.layer_norm_")
    } else {
        name.to_string()
    };
    format!("model.{n}")
}

/// The module of a key that carries an `_extra_state` entry (mcore linear layers).
fn extra_state_module(key: &str) -> Option<&str> {
    let (module, _) = key.rsplit_once('.')?;
    [
        "self_attention.linear_qkv",
        "self_attention.linear_proj",
        "mlp.linear_fc1",
        "mlp.linear_fc2",
        "output_layer",
    ]
    .iter()
    .any(|m| module.ends_with(m))
    .then_some(module)
}

fn tensor_ref(key: &str, t: &Tensor) -> Result<TensorRef, Error> {
    let t = t
        .detach()
        .to_device(tch::Device::Cpu)
        .to_kind(Kind::Float)
        .contiguous();
    let n = t.numel();
    let mut v = vec![0f32; n];
    t.f_copy_data(&mut v, n).map_err(|e| Error::Tensor {
        key: key.to_string(),
        why: e.to_string(),
    })?;
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let shape: Vec<u64> = t.size().iter().map(|&d| d as u64).collect();
    Ok(TensorRef {
        dtype: Dtype::F32,
        stride: row_major_strides(&shape),
        shape,
        storage_offset: 0,
        storage: StorageRef::from_view(key, ByteView::from_vec(bytes)),
        requires_grad: false,
        kind: TensorKind::Plain,
    })
}

/// One rank's state dict as a pickled OrderedDict.
fn state_dict(params: &[(String, Tensor)], te: bool) -> Result<Value, Error> {
    let mut od = Object::new(
        Global::new("collections", "OrderedDict"),
        Construct::Reduce,
        vec![],
    );
    let keys: Vec<String> = params.iter().map(|(n, _)| stored_key(n, te)).collect();
    for (i, ((_, t), key)) in params.iter().zip(&keys).enumerate() {
        od.items.push((
            Value::Str(key.clone()),
            Value::Tensor(Box::new(tensor_ref(key, t)?)),
        ));
        // after a module's last parameter comes its extra state
        if let Some(m) = extra_state_module(key) {
            let next_same = keys
                .get(i + 1)
                .and_then(|k| extra_state_module(k))
                .is_some_and(|n| n == m);
            if !next_same {
                od.items
                    .push((Value::Str(format!("{m}._extra_state")), Value::None));
            }
        }
    }
    // tied embeddings: mcore still registers the output layer's extra state
    if !keys.iter().any(|k| k.starts_with("model.output_layer.")) {
        od.items.push((
            Value::Str("model.output_layer._extra_state".to_string()),
            Value::None,
        ));
    }
    Ok(Value::Object(Box::new(od)))
}

/// `<sha256[:32]>_<basename>`: a stable artifact name for a tokenizer file (NeMo uses a
/// random uuid in the same place).
pub fn artifact_name(path: &Path, bytes: &[u8]) -> String {
    let h = hex::encode(Sha256::digest(bytes));
    let base = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tokenizer.model".to_string());
    format!("{}_{base}", &h[..32])
}

/// Writes `a` to `out` (replacing it).
///
/// # Errors
/// [`Error::Io`], [`Error::Tensor`].
pub fn write(a: &StudentArchive, out: &Path) -> Result<PathBuf, Error> {
    let io_err = |source| Error::Io {
        path: out.to_path_buf(),
        source,
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io_err)?;
    }
    let mut of = OutputFile::create(out, true).map_err(|e| io_err(io::Error::other(e)))?;
    let file = of.file().try_clone().map_err(io_err)?;
    let mut tar = TarWriter::new(crate::io::sink::BlockWriter::new(file).with_writeback(true));
    let tp = a.ranks.len() as u64;
    let to_io = |e: crate::formats::tar_write::Error| io::Error::other(e);
    tar.append_dir("").map_err(|e| io_err(to_io(e)))?;
    for (name, bytes) in &a.artifacts {
        tar.append_pieces(name, bytes.len() as u64, [bytes.as_slice()])
            .map_err(|e| io_err(to_io(e)))?;
    }
    tar.append_pieces(
        "model_config.yaml",
        a.config.len() as u64,
        [a.config.as_bytes()],
    )
    .map_err(|e| io_err(to_io(e)))?;
    let variant = Variant::for_sizes(tp, 1);
    for (t, params) in a.ranks.iter().enumerate() {
        let member = variant.rank_member(t as u64, 0);
        if let Some((dir, _)) = member.split_once('/') {
            tar.append_dir(dir).map_err(|e| io_err(to_io(e)))?;
        }
        let root = state_dict(params, a.te_norm_names)?;
        tar.append_streamed(&member, |w| {
            crate::formats::torch::file::save(w, "model_weights", &root)
                .map(|_| ())
                .map_err(io::Error::other)
        })
        .map_err(|e| io_err(to_io(e)))?;
    }
    // (finish flushes)
    tar.finish().map_err(|e| io_err(to_io(e)))?;
    of.commit().map_err(|e| io_err(io::Error::other(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::checkpoint::Checkpoint;

    #[test]
    fn writes_a_checkpoint_our_reader_opens() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let out = dir.path().join("s.nemo");
        let w = Tensor::arange(8, (Kind::Float, tch::Device::Cpu)).view([4, 2]);
        let rank = |off: f64| {
            vec![
                ("embedding.word_embeddings.weight".to_string(), &w + off),
                (
                    "decoder.layers.0.input_layernorm.weight".to_string(),
                    w.get(0),
                ),
                (
                    "decoder.layers.0.self_attention.linear_qkv.weight".to_string(),
                    w.shallow_clone(),
                ),
            ]
        };
        let a = StudentArchive {
            config: "num_layers: 1\nhidden_size: 2\ntensor_model_parallel_size: 2\n".to_string(),
            artifacts: vec![(
                "abc_tokenizer.model".to_string(),
                ByteView::from_vec(vec![1, 2]),
            )],
            ranks: vec![rank(0.0), rank(100.0)],
            te_norm_names: true,
        };
        write(&a, &out).unwrap_or_else(|e| panic!("{e}"));
        let ck = Checkpoint::open(&out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(ck.rank_files().len(), 2);
        let r1 = ck
            .rank_files()
            .iter()
            .find(|r| r.tp == 1)
            .unwrap_or_else(|| panic!("no rank 1"));
        let e = r1
            .file
            .root
            .get("model.embedding.word_embeddings.weight")
            .and_then(|v| v.as_tensor())
            .unwrap_or_else(|| panic!("no embedding"));
        let bytes = e.to_vec().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&bytes[..4], &100f32.to_le_bytes());
        assert!(r1
            .file
            .root
            .get("model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight")
            .is_some());
        assert!(r1
            .file
            .root
            .get("model.decoder.layers.0.self_attention.linear_qkv._extra_state")
            .is_some());
        assert_eq!(ck.artifacts, vec!["abc_tokenizer.model".to_string()]);
    }

    #[test]
    fn refuses_an_unwritable_target() {
        let a = StudentArchive {
            config: String::new(),
            artifacts: vec![],
            ranks: vec![vec![]],
            te_norm_names: false,
        };
        let r = write(&a, Path::new("/proc/nonexistent/dir/x.nemo"));
        assert!(matches!(r, Err(Error::Io { .. })));
    }
}
