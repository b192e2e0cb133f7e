//! Entry points that run one parser over untrusted bytes, for the cargo-fuzz
//! targets in `fuzz/` and the stable fuzz smoke test (`tests/it/fuzz_smoke.rs`).
//! Each one parses, then exercises what the parse returned (reads members,
//! resolves tensor views, builds the canonical view), and swallows every
//! error: the only failures a fuzzer may see are panics, hangs and runaway
//! allocations. Work on the results is bounded by the input's size, so a
//! small input that *declares* a huge tensor costs nothing.

use crate::formats::archive::Archive;
use crate::formats::members::MemoryMembers;
use crate::formats::torch::Value;
use crate::io::bytes::ByteView;

/// Most bytes of tensor data an entry point reads per input byte; views that
/// repeat storage (stride 0) could otherwise make a tiny file expensive.
const READ_FACTOR: u64 = 16;

/// One fuzz entry point.
pub type Target = fn(&[u8]);

/// The fuzzable parsers, by the name of their cargo-fuzz target.
pub const TARGETS: &[(&str, Target)] = &[
    ("tar_index", tar_index),
    ("zip_reader", zip_reader),
    ("pickle_vm", pickle_vm),
    ("dcp_metadata", dcp_metadata),
    ("zarr_metadata", zarr_metadata),
    ("config_reader", config_reader),
];

/// A tar image: the index, every member, then the whole checkpoint model
/// (config, layout detection, rank files or the distributed checkpoint), the
/// canonical view and metadata-level validation.
pub fn tar_index(data: &[u8]) {
    let Ok(archive) = Archive::from_tar_bytes("fuzz.nemo", ByteView::from_vec(data.to_vec()))
    else {
        return;
    };
    for m in archive.members() {
        let _ = archive.read(&m.name);
    }
    let Ok(ckpt) = crate::model::checkpoint::Checkpoint::from_archive(archive, true) else {
        return;
    };
    let _ = ckpt.tensors();
    let _ = crate::ops::validate::validate(&ckpt, &crate::ops::validate::Options::default());
    if let Ok(c) = crate::model::canonical::Canonical::new(&ckpt) {
        let budget = (data.len() as u64).saturating_mul(READ_FACTOR);
        let _ = crate::ops::checksum::canonical_bounded(&c, budget);
    }
}

/// A torch.save zip (or legacy) file: the zip directory, every record's
/// payload, the pickle, and every tensor view's bytes.
pub fn zip_reader(data: &[u8]) {
    let view = ByteView::from_vec(data.to_vec());
    if let Ok(z) = crate::formats::torch::zip::ZipArchive::open(view.clone()) {
        for e in z.entries() {
            let _ = z.payload(e);
        }
    }
    let Ok(file) =
        crate::formats::torch::file::load(view, &crate::formats::torch::pickle::Policy::torch())
    else {
        return;
    };
    let mut budget = (data.len() as u64).saturating_mul(READ_FACTOR);
    for (_, t) in file.tensors() {
        // Resolving a view is bounded by its storage (overlapping views are
        // refused); hashing many views of one storage is what the budget caps.
        let Ok(p) = t.pieces() else { continue };
        if t.nbytes() > budget {
            continue;
        }
        budget -= t.nbytes();
        let _ = crate::ops::checksum::sha256_pieces(&p);
    }
}

/// A bare pickle, under torch's allowlist and under the DCP metadata one.
pub fn pickle_vm(data: &[u8]) {
    let _ =
        crate::formats::torch::pickle::parse(data, &crate::formats::torch::pickle::Policy::torch());
    if let Ok(v) =
        crate::formats::torch::pickle::parse(data, &crate::formats::dist::dcp::metadata_policy())
    {
        let _ = walk(&v, 0);
    }
}

/// Counts nodes, touching every one (so lazily shared structure is visited).
fn walk(v: &Value, depth: usize) -> usize {
    if depth > 512 {
        return 0;
    }
    match v {
        Value::List(l) | Value::Tuple(l) => 1 + l.iter().map(|x| walk(x, depth + 1)).sum::<usize>(),
        Value::Dict(d) => {
            1 + d
                .iter()
                .map(|(k, x)| walk(k, depth + 1) + walk(x, depth + 1))
                .sum::<usize>()
        }
        _ => 1,
    }
}

/// A distributed checkpoint `.metadata`: parsed and opened as a plain DCP
/// folder (no payload files), chunks tiled and small tensors read.
pub fn dcp_metadata(data: &[u8]) {
    if let Ok(md) = crate::formats::dist::dcp::parse_metadata(".metadata", data) {
        let _ = crate::formats::dist::dcp::model_from_metadata(".metadata", "", &md);
        let _ = crate::formats::dist::dcp::planner_paths(&md);
    }
    let mut m = MemoryMembers::default();
    m.insert(".metadata", data.to_vec());
    m.insert("__0_0.distcp", vec![0u8; 64]);
    open_dist(&m, data.len());
}

/// A `.zarray`: parsed, then opened as the only array of a zarr checkpoint
/// with one small chunk file; then the same inside a `.nemo` with an mcore
/// config, as a stacked layer tensor, through the whole checkpoint model.
pub fn zarr_metadata(data: &[u8]) {
    let _ = crate::formats::dist::zarr::parse_zarray("w/.zarray", data);
    let mut m = MemoryMembers::default();
    m.insert("metadata.json", br#"{"sharded_backend": "zarr"}"#.to_vec());
    m.insert("w/.zarray", data.to_vec());
    m.insert("w/0", vec![0u8; 64]);
    m.insert("w/0.0", vec![0u8; 64]);
    open_dist(&m, data.len());
    let dir = "model_weights/model.decoder.layers.self_attention.linear_proj.weight";
    // One chunk file named for the declared dims (`0.0.0`), so the array opens.
    let chunk = match crate::formats::dist::zarr::parse_zarray("x/.zarray", data) {
        Ok(z) => vec!["0"; z.shape.len().clamp(1, 8)].join(&z.separator.to_string()),
        Err(_) => "0".to_string(),
    };
    let files: [(&str, &[u8]); 4] = [
        ("model_config.yaml", ZARR_CONFIG.as_bytes()),
        (
            "model_weights/metadata.json",
            br#"{"sharded_backend": "zarr"}"#,
        ),
        (&format!("{dir}/.zarray"), data),
        (&format!("{dir}/{chunk}"), &[0u8; 64]),
    ];
    if let Some(image) = tar_image(&files) {
        tar_index(&image);
    }
}

/// The config of the zarr checkpoint [`zarr_metadata`] builds.
const ZARR_CONFIG: &str = "mcore_gpt: true\nnum_layers: 2\nhidden_size: 4\nffn_hidden_size: 8\n\
num_attention_heads: 2\nnormalization: rmsnorm\nactivation: swiglu\nbias: false\n";

/// An uncompressed tar of `files` (our own writer), or `None` if it refuses.
fn tar_image(files: &[(&str, &[u8])]) -> Option<Vec<u8>> {
    let mut t = crate::formats::tar_write::TarWriter::new(Vec::new());
    for (name, data) in files {
        t.append_pieces(name, data.len() as u64, [*data]).ok()?;
    }
    t.finish().ok()
}

fn open_dist(m: &MemoryMembers, input_len: usize) {
    let Ok(d) = crate::formats::dist::DistCheckpoint::open(m, "") else {
        return;
    };
    let mut budget = (input_len as u64).saturating_mul(READ_FACTOR).max(4096);
    for t in &d.tensors {
        let n = t
            .shape
            .iter()
            .try_fold(t.dtype.size() as u64, |a, x| a.checked_mul(*x));
        match n {
            Some(n) if n <= budget => budget -= n,
            _ => continue,
        }
        if let Ok(p) = d.read_global(m, t) {
            let _ = crate::ops::checksum::sha256_pieces(&p);
        }
    }
    for o in &d.objects {
        let _ = d.read_object(m, o);
    }
}

/// A `model_config.yaml`: parsed, every accessor called, one in-place edit.
pub fn config_reader(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = crate::model::config::ModelConfig::parse(text) else {
        return;
    };
    let _ = (cfg.num_layers(), cfg.hidden_size(), cfg.ffn_hidden_size());
    let _ = (cfg.num_attention_heads(), cfg.num_query_groups());
    let _ = (cfg.kv_channels(), cfg.activation(), cfg.is_gated());
    let _ = cfg.artifact_refs();
    let tp = cfg.tensor_model_parallel_size();
    let _ = cfg.padded_vocab(32000, tp);
    let _ = cfg.embedding_rows(32000, tp);
    let _ = cfg.with_updates(&[
        ("tensor_model_parallel_size", "2"),
        ("pipeline_model_parallel_size", "1"),
    ]);
    let _ = crate::ops::diff::config_diff(&cfg, &cfg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_stacked_layer_axis_is_cheap() {
        // 2^40 layers declared in 66 bytes: refused or bounded, never a loop over them.
        let t = std::time::Instant::now();
        zarr_metadata(
            br#"{"zarr_format": 2, "shape": [1099511627776, 4, 4], "chunks": [1099511627776, 4, 4], "dtype": "<f4", "compressor": null, "fill_value": null, "order": "C", "filters": null}"#,
        );
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn every_target_survives_empty_and_garbage_input() {
        for (name, f) in TARGETS {
            f(b"");
            f(&[0xff; 700]);
            f(b"\x80\x02}q\x00.");
            let _ = name;
        }
    }
}
