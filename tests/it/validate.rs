//! `validate` on generated corruptions, through the real binary: each one is
//! reported with its specific finding code and place; every valid fixture
//! passes. Also the model digest: equal across layouts, changed by one ulp.

use std::path::{Path, PathBuf};
use std::process::Command;

use nemo_tool::formats::archive::{Archive, MemberKind};
use nemo_tool::formats::torch::pickle::Policy;
use nemo_tool::formats::torch::Value;
use nemo_tool::io::bytes::ByteView;
use nemo_tool::model::canonical::Canonical;
use nemo_tool::model::checkpoint::Checkpoint;
use nemo_tool::ops::checksum::{canonical, CanonicalOptions};

use crate::roundtrip::fixture;

pub fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nemo-tool"))
}

/// Extracts a fixture `.nemo` into a fresh folder (with our own reader).
pub fn extract(rel: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("model");
    std::fs::create_dir(&root).unwrap();
    let a = Archive::open(fixture(rel)).unwrap();
    for m in a.members() {
        let p = root.join(&m.name);
        match m.kind {
            MemberKind::Dir => std::fs::create_dir_all(&p).unwrap(),
            MemberKind::File => {
                std::fs::create_dir_all(p.parent().unwrap()).unwrap();
                std::fs::write(&p, a.read(&m.name).unwrap().as_slice()).unwrap();
            }
        }
    }
    (dir, root)
}

/// Runs `validate --json` with extra args: (exit code, report).
pub fn validate(path: &Path, extra: &[&str]) -> (i32, serde_json::Value) {
    let out = tool()
        .arg("validate")
        .arg(path)
        .arg("--json")
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): stderr {stderr}"));
    (out.status.code().unwrap(), v)
}

/// (code, place) of every error finding.
fn errors(report: &serde_json::Value) -> Vec<(String, String)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["severity"] == "error")
        .map(|f| {
            (
                f["code"].as_str().unwrap().to_string(),
                f["place"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn assert_finding(report: &serde_json::Value, code: &str, place: &str) {
    let e = errors(report);
    assert!(
        e.iter().any(|(c, p)| c == code && p == place),
        "no {code} at {place}; findings: {e:?}"
    );
}

/// Writes the manifest of `path` to `dir/manifest.json`.
fn manifest(path: &Path, dir: &Path) -> PathBuf {
    let out = tool()
        .arg("checksum")
        .arg(path)
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let m = dir.join("manifest.json");
    std::fs::write(&m, out.stdout).unwrap();
    m
}

/// Byte offset of a stored zip record's payload inside a rank file.
fn record_offset(file: &Path, suffix: &str) -> (u64, u64) {
    let z = nemo_tool::formats::torch::zip::ZipArchive::open(ByteView::from_vec(
        std::fs::read(file).unwrap(),
    ))
    .unwrap();
    let e = z
        .entries()
        .iter()
        .find(|e| e.name.ends_with(suffix))
        .unwrap();
    (z.data_offset(e).unwrap(), e.size)
}

/// Rewrites a rank file with one tensor's shape changed by `f`.
fn reshape(file: &Path, key: &str, f: impl Fn(&mut Vec<u64>)) {
    let bytes = ByteView::from_vec(std::fs::read(file).unwrap());
    let mut tf = nemo_tool::formats::torch::file::load(bytes, &Policy::torch()).unwrap();
    let Value::Object(od) = &mut tf.root else {
        panic!("not an OrderedDict")
    };
    let (_, v) = od
        .items
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some(key))
        .unwrap();
    let Value::Tensor(t) = v else { panic!("{key}") };
    f(&mut t.shape);
    let out =
        nemo_tool::formats::torch::file::save(Vec::new(), &tf.archive_name, &tf.root).unwrap();
    std::fs::write(file, out).unwrap();
}

#[test]
fn valid_fixtures_pass_deep() {
    for f in [
        "mcore/llama/nemo/tiny_llama_tp1.nemo",
        "mcore/llama/nemo/tiny_llama_tp2.nemo",
        "mcore/llama/nemo/tiny_llama_dist_tp1.nemo",
    ] {
        let (code, r) = validate(&fixture(f), &["--deep"]);
        assert_eq!(code, 0, "{f}: {:?}", errors(&r));
        assert_eq!(r["valid"], true);
        assert_eq!(r["dtypes"]["float32"], 15);
    }
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    let (code, r) = validate(&root, &["--deep"]);
    assert_eq!(code, 0, "{:?}", errors(&r));
}

#[test]
fn missing_rank_file() {
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    std::fs::remove_dir_all(root.join("mp_rank_01")).unwrap();
    let (code, r) = validate(&root, &[]);
    assert_eq!(code, 1);
    assert_finding(&r, "missing_rank_file", "mp_rank_01/model_weights.ckpt");
}

#[test]
fn missing_rank_in_the_middle_of_a_grid() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.nemo");
    let spec = nemo_tool::testkit::synth::Spec::tiny();
    nemo_tool::testkit::synth::write_nemo(
        &spec,
        2,
        2,
        nemo_tool::testkit::synth::Fill::Random(7),
        &p,
    )
    .unwrap();
    // Extract, drop tp_rank_01_pp_rank_000: the grid on disk has a hole.
    let a = Archive::open(&p).unwrap();
    let root = dir.path().join("x");
    for m in a.members() {
        if m.kind == MemberKind::File && !m.name.starts_with("tp_rank_01_pp_rank_000") {
            let q = root.join(&m.name);
            std::fs::create_dir_all(q.parent().unwrap()).unwrap();
            std::fs::write(q, a.read(&m.name).unwrap().as_slice()).unwrap();
        }
    }
    let (code, r) = validate(&root, &[]);
    assert_eq!(code, 1);
    assert_finding(
        &r,
        "missing_rank_file",
        "tp_rank_01_pp_rank_000/model_weights.ckpt",
    );
}

#[test]
fn swapped_rank_files_are_caught_by_the_manifest() {
    let (d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    let m = manifest(&root, d.path());
    let (a, b) = (
        root.join("mp_rank_00/model_weights.ckpt"),
        root.join("mp_rank_01/model_weights.ckpt"),
    );
    let tmp = root.join("swap");
    std::fs::rename(&a, &tmp).unwrap();
    std::fs::rename(&b, &a).unwrap();
    std::fs::rename(&tmp, &b).unwrap();
    // Structurally valid: TP ranks have the same keys and shapes.
    let (code, _) = validate(&root, &[]);
    assert_eq!(code, 0);
    let (code, r) = validate(&root, &["--manifest", m.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_finding(&r, "checksum_mismatch", "embedding.word_embeddings.weight");
    assert_finding(
        &r,
        "checksum_mismatch",
        "decoder.layers.0.self_attention.linear_qkv.weight",
    );
    assert_finding(&r, "digest_mismatch", "model");
    // Replicated tensors are rank 0's, which is now the other rank's identical copy.
    let e = errors(&r);
    assert!(
        !e.iter().any(|(_, p)| p == "decoder.final_layernorm.weight"),
        "{e:?}"
    );
}

#[test]
fn one_rank_with_a_wrong_shape() {
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    let key = "model.decoder.layers.1.mlp.linear_fc2.weight";
    reshape(&root.join("mp_rank_01/model_weights.ckpt"), key, |s| {
        s[1] -= 4
    });
    let (code, r) = validate(&root, &[]);
    assert_eq!(code, 1);
    assert_finding(
        &r,
        "shape_mismatch",
        &format!("mp_rank_01/model_weights.ckpt:{key}"),
    );
    // An unsplit dim: the shards cannot be joined at all.
    let (_d2, root2) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    reshape(&root2.join("mp_rank_01/model_weights.ckpt"), key, |s| {
        s[0] -= 4
    });
    let (code, r) = validate(&root2, &[]);
    assert_eq!(code, 1);
    assert_finding(
        &r,
        "shape_mismatch",
        &format!("mp_rank_01/model_weights.ckpt:{key}"),
    );
    assert_finding(
        &r,
        "shard_mismatch",
        &format!("mp_rank_01/model_weights.ckpt:{key}"),
    );
}

#[test]
fn one_flipped_bit_with_deep_and_a_manifest() {
    let (d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    let m = manifest(&root, d.path());
    let file = root.join("mp_rank_01/model_weights.ckpt");
    let (off, size) = record_offset(&file, "/data/0");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[(off + size / 2) as usize] ^= 0x10;
    std::fs::write(&file, bytes).unwrap();
    // Metadata checks cannot see it.
    assert_eq!(validate(&root, &[]).0, 0);
    let (code, r) = validate(&root, &["--deep", "--manifest", m.to_str().unwrap()]);
    assert_eq!(code, 1);
    let e = errors(&r);
    assert!(
        e.iter().any(|(c, p)| c == "crc_mismatch"
            && p.starts_with("mp_rank_01/model_weights.ckpt:")
            && p.ends_with("/data/0")),
        "{e:?}"
    );
    assert!(e.iter().any(|(c, _)| c == "checksum_mismatch"), "{e:?}");
    assert_finding(&r, "digest_mismatch", "model");
}

#[test]
fn missing_tokenizer_artifact() {
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp1.nemo");
    std::fs::remove_file(root.join("79b7d2d99291075a58045d29d6b0b3cc_tokenizer.model")).unwrap();
    let (code, r) = validate(&root, &[]);
    assert_eq!(code, 1);
    assert_finding(&r, "missing_artifact", "tokenizer.model");
}

#[test]
fn config_tp_not_matching_the_layout() {
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    let cfg = root.join("model_config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains("tensor_model_parallel_size: 2"));
    std::fs::write(
        &cfg,
        text.replace(
            "tensor_model_parallel_size: 2",
            "tensor_model_parallel_size: 1",
        ),
    )
    .unwrap();
    let (code, r) = validate(&root, &[]);
    assert_eq!(code, 1);
    assert_finding(&r, "config_layout_mismatch", "tensor_model_parallel_size");
}

#[test]
fn truncated_member() {
    // A .nemo cut inside a rank file's data.
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("cut.nemo");
    let full = std::fs::read(fixture("mcore/llama/nemo/tiny_llama_tp2.nemo")).unwrap();
    let a = Archive::open(fixture("mcore/llama/nemo/tiny_llama_tp2.nemo")).unwrap();
    let m = a.get("mp_rank_01/model_weights.ckpt").unwrap();
    let cut = m.data_offset.unwrap() + m.size / 2;
    std::fs::write(&p, &full[..cut as usize]).unwrap();
    let (code, r) = validate(&p, &[]);
    assert_eq!(code, 1);
    assert_finding(&r, "truncated_member", "mp_rank_01/model_weights.ckpt");
    // A rank file cut short in a folder.
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    let f = root.join("mp_rank_00/model_weights.ckpt");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() - 100]).unwrap();
    let (code, r) = validate(&root, &[]);
    assert_eq!(code, 1);
    assert_finding(&r, "truncated_member", "mp_rank_00/model_weights.ckpt");
}

#[test]
fn not_a_checkpoint_exits_2() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.nemo");
    std::fs::write(&p, b"definitely not a tar").unwrap();
    let (code, r) = validate(&p, &[]);
    assert_eq!(code, 2);
    assert_eq!(errors(&r)[0].0, "unreadable");
}

fn digest(path: &Path) -> String {
    let ck = Checkpoint::open(path).unwrap();
    let c = Canonical::new(&ck).unwrap();
    canonical(&c, &CanonicalOptions::default())
        .unwrap()
        .model_digest
}

#[test]
fn model_digest_is_layout_independent() {
    let d1 = digest(&fixture("mcore/llama/nemo/tiny_llama_tp1.nemo"));
    assert_eq!(d1, digest(&fixture("mcore/llama/nemo/tiny_llama_tp2.nemo")));
    assert_eq!(
        d1,
        digest(&fixture("mcore/llama/nemo/tiny_llama_dist_tp1.nemo"))
    );
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    assert_eq!(d1, digest(&root));
    // The CLI prints the same digest.
    let out = tool()
        .arg("checksum")
        .arg(fixture("mcore/llama/nemo/tiny_llama_dist_tp1.nemo"))
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("model digest: {d1}")), "{text}");
}

#[test]
fn one_ulp_changes_the_digest_padding_does_not() {
    let base = digest(&fixture("mcore/llama/nemo/tiny_llama_tp1.nemo"));
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp1.nemo");
    let file = root.join("model_weights.ckpt");
    let orig = std::fs::read(&file).unwrap();
    // The embedding [128, 64] f32 is the first storage (data/0) in this file.
    let ck = Checkpoint::open(&root).unwrap();
    let emb = ck.rank_files()[0]
        .entries()
        .find(|(k, _)| k.ends_with("embedding.word_embeddings.weight"))
        .map(|(_, v)| match v {
            Value::Tensor(t) => t.storage.key.clone(),
            _ => panic!(),
        })
        .unwrap();
    drop(ck);
    let (off, size) = record_offset(&file, &format!("/data/{emb}"));
    assert_eq!(size, 128 * 64 * 4);
    let bump = |at: u64| {
        let mut b = orig.clone();
        let i = (off + at) as usize;
        let x = u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
        b[i..i + 4].copy_from_slice(&(x + 1).to_le_bytes()); // one ulp
        std::fs::write(&file, b).unwrap();
        digest(&root)
    };
    // Row 5, element 3: a vocabulary row.
    assert_ne!(bump((5 * 64 + 3) * 4), base);
    // Row 120: padding (the tokenizer has 100 tokens): not part of the digest.
    assert_eq!(bump((120 * 64 + 3) * 4), base);
}

#[test]
fn digest_survives_reshard_round_trips() {
    let d = tempfile::tempdir().unwrap();
    let base = digest(&fixture("mcore/llama/nemo/tiny_llama_tp1.nemo"));
    let m = manifest(&fixture("mcore/llama/nemo/tiny_llama_tp1.nemo"), d.path());
    let reshard = |from: &Path, to: &Path, tp: &str, pp: &str| {
        let st = tool()
            .arg("reshard")
            .arg(from)
            .arg(to)
            .args(["--tp", tp, "--pp", pp])
            .output()
            .unwrap();
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
    };
    let mut prev = fixture("mcore/llama/nemo/tiny_llama_dist_tp1.nemo");
    // dist -> TP2 -> TP2 PP2 -> TP1 PP2 -> TP1: the digest never changes, and
    // each output passes validate --deep against the TP1 manifest.
    for (i, (tp, pp)) in [("2", "1"), ("2", "2"), ("1", "2"), ("1", "1")]
        .iter()
        .enumerate()
    {
        let out = d.path().join(format!("r{i}.nemo"));
        reshard(&prev, &out, tp, pp);
        assert_eq!(digest(&out), base, "after reshard to TP={tp} PP={pp}");
        let (code, r) = validate(&out, &["--deep", "--manifest", m.to_str().unwrap()]);
        assert_eq!(code, 0, "TP={tp} PP={pp}: {:?}", errors(&r));
        prev = out;
    }
    // And diff agrees (only the layout keys and what the fixtures' configs differ in).
    let out = tool()
        .arg("diff")
        .arg(fixture("mcore/llama/nemo/tiny_llama_tp2.nemo"))
        .arg(&prev)
        .arg("--json")
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["tensors"].as_array().unwrap().len(), 0);
    assert_eq!(v["compared"], 15);
    assert_eq!(v["max_abs_diff"], 0.0);
}

#[test]
fn pp_stages_and_synthetic_layouts() {
    let d = tempfile::tempdir().unwrap();
    let spec = nemo_tool::testkit::synth::Spec::tiny();
    // Every synthetic layout is valid.
    for (tp, pp) in [(1, 1), (2, 1), (2, 2), (4, 4)] {
        let p = d.path().join(format!("m{tp}{pp}.nemo"));
        nemo_tool::testkit::synth::write_nemo(
            &spec,
            tp,
            pp,
            nemo_tool::testkit::synth::Fill::Random(1),
            &p,
        )
        .unwrap();
        let (code, r) = validate(&p, &["--deep"]);
        // The synthetic config names a hub tokenizer: no artifact, so padding
        // is only checked for divisibility.
        assert_eq!(code, 0, "TP={tp} PP={pp}: {:?}", errors(&r));
    }
    // A config claiming more layers than the stages hold.
    let p = d.path().join("m22.nemo");
    let (_x, root) = {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("m");
        let a = Archive::open(&p).unwrap();
        for m in a.members() {
            if m.kind == MemberKind::File {
                let q = root.join(&m.name);
                std::fs::create_dir_all(q.parent().unwrap()).unwrap();
                std::fs::write(q, a.read(&m.name).unwrap().as_slice()).unwrap();
            }
        }
        (dir, root)
    };
    let cfg = root.join("model_config.yaml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("num_layers: 4", "num_layers: 8")).unwrap();
    let (code, r) = validate(&root, &[]);
    assert_eq!(code, 1);
    assert_finding(
        &r,
        "layer_count",
        "tp_rank_00_pp_rank_000/model_weights.ckpt",
    );
    assert_finding(&r, "layer_count", "num_layers");
}

/// The rank file path and the payload extent of the storage behind `key`.
fn storage_of(root: &Path, member: &str, key_suffix: &str) -> (PathBuf, u64, u64) {
    let ck = Checkpoint::open(root).unwrap();
    let r = ck.rank_files().iter().find(|r| r.member == member).unwrap();
    let skey = r
        .entries()
        .find(|(k, _)| k.ends_with(key_suffix))
        .map(|(_, v)| match v {
            Value::Tensor(t) => t.storage.key.clone(),
            _ => panic!("{key_suffix} is not a tensor"),
        })
        .unwrap();
    let file = root.join(member);
    let (off, size) = record_offset(&file, &format!("/data/{skey}"));
    (file, off, size)
}

fn patch(file: &Path, at: u64, bytes: &[u8]) {
    let mut b = std::fs::read(file).unwrap();
    b[at as usize..at as usize + bytes.len()].copy_from_slice(bytes);
    std::fs::write(file, b).unwrap();
}

#[test]
fn deep_finds_nan_and_diverging_replicas() {
    let (_d, root) = extract("mcore/llama/nemo/tiny_llama_tp2.nemo");
    // A NaN in a vocabulary row of rank 1's embedding shard.
    let (file, off, _) = storage_of(
        &root,
        "mp_rank_01/model_weights.ckpt",
        "word_embeddings.weight",
    );
    patch(&file, off + 4 * 64 * 3, &f32::NAN.to_le_bytes());
    // Rank 1's copy of the (replicated) final norm differs from rank 0's.
    let (file, off, _) = storage_of(
        &root,
        "mp_rank_01/model_weights.ckpt",
        "final_layernorm.weight",
    );
    patch(&file, off, &2.5f32.to_le_bytes());
    assert_eq!(
        validate(&root, &[]).0,
        0,
        "metadata checks cannot see either"
    );
    let (code, r) = validate(&root, &["--deep"]);
    assert_eq!(code, 1);
    assert_finding(&r, "nan_inf", "embedding.word_embeddings.weight");
    assert_eq!(r["special"][0]["nan"], 1);
    assert_finding(
        &r,
        "replica_mismatch",
        "mp_rank_01/model_weights.ckpt:decoder.final_layernorm.weight",
    );
}
