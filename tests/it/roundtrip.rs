//! Read -> write -> read is identical for each of the four layouts: same
//! members in the same order, config text and artifact bytes unchanged, same
//! tensors (keys, dtypes, shapes, bytes) and same non-tensor entries.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use nemo_tool::formats::dist::Location;
use nemo_tool::formats::tar_write::TarWriter;
use nemo_tool::formats::torch::file::{load, save};
use nemo_tool::formats::torch::pickle::Policy;
use nemo_tool::formats::torch::value::{Construct, Global, Object};
use nemo_tool::formats::torch::Value;
use nemo_tool::model::checkpoint::write::{pack, PackOptions};
use nemo_tool::model::checkpoint::{Checkpoint, Variant, Weights};
use nemo_tool::model::config::ModelConfig;
use nemo_tool::ops::checksum;

pub fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Everything a round trip must keep, in comparable form.
#[derive(Debug, PartialEq)]
struct Snapshot {
    variant: Variant,
    tp: u64,
    pp: u64,
    config: String,
    artifacts: BTreeMap<String, Vec<u8>>,
    sums: Vec<checksum::StoredSum>,
    /// Non-tensor entries of rank files, by (member, key), as debug text.
    objects: Vec<(String, String, String)>,
    /// Key order of each rank file.
    key_order: Vec<(String, Vec<String>)>,
    dist_objects: Vec<(String, Vec<u8>)>,
}

fn snapshot(path: &Path) -> Snapshot {
    let ck = Checkpoint::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let artifacts = ck
        .artifacts
        .iter()
        .map(|a| (a.clone(), ck.read_member(a).unwrap().as_slice().to_vec()))
        .collect();
    let mut objects = Vec::new();
    let mut key_order = Vec::new();
    for r in ck.rank_files() {
        key_order.push((
            r.member.clone(),
            r.entries().map(|(k, _)| k.to_string()).collect(),
        ));
        for (k, v) in r.entries() {
            if !matches!(v, Value::Tensor(_)) {
                objects.push((r.member.clone(), k.to_string(), format!("{v:?}")));
            }
        }
    }
    let dist_objects = match &ck.weights {
        Weights::Dist(d) => d
            .objects
            .iter()
            .map(|o| {
                let file = ck.read_member(o.location.member()).unwrap();
                let bytes = match &o.location {
                    Location::Item { offset, length, .. } => {
                        file.slice_len(*offset, *length).unwrap()
                    }
                    _ => file,
                };
                (o.key.clone(), bytes.as_slice().to_vec())
            })
            .collect(),
        Weights::PerRank(_) | Weights::Global(_) => vec![],
    };
    Snapshot {
        variant: ck.layout.variant,
        tp: ck.layout.tp,
        pp: ck.layout.pp,
        config: ck.config.text().to_string(),
        artifacts,
        sums: checksum::stored(&ck).unwrap(),
        objects,
        key_order,
        dist_objects,
    }
}

fn round_trip(path: &Path) -> (Snapshot, Snapshot) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.nemo");
    let ck = Checkpoint::open(path).unwrap();
    pack(&ck, &out, &PackOptions::default()).unwrap();
    let before = snapshot(path);
    let after = snapshot(&out);
    // A second pass must be a fixed point, byte for byte.
    let out2 = dir.path().join("out2.nemo");
    pack(
        &Checkpoint::open(&out).unwrap(),
        &out2,
        &PackOptions::default(),
    )
    .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap(),
        "pack is not deterministic"
    );
    (before, after)
}

#[test]
fn single_file_layout_round_trips() {
    let (a, b) = round_trip(&fixture("mcore/llama/nemo/tiny_llama_tp1.nemo"));
    assert_eq!(a.variant, Variant::SingleFile);
    assert_eq!(a.sums.len(), 15);
    assert_eq!(a, b);
}

#[test]
fn tp_shards_layout_round_trips() {
    let (a, b) = round_trip(&fixture("mcore/llama/nemo/tiny_llama_tp2.nemo"));
    assert_eq!((a.variant, a.tp), (Variant::TpShards, 2));
    assert_eq!(a, b);
}

#[test]
fn torch_dist_layout_round_trips() {
    let (a, b) = round_trip(&fixture("mcore/llama/nemo/tiny_llama_dist_tp1.nemo"));
    assert_eq!(a.variant, Variant::Distributed);
    assert!(!a.dist_objects.is_empty());
    assert_eq!(a, b);
}

#[test]
fn zarr_layout_round_trips() {
    let (a, b) = round_trip(&fixture("zarr/llama_tp2"));
    assert_eq!(a.variant, Variant::Distributed);
    assert_eq!(a, b);
}

#[test]
fn tp_pp_layout_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let pp2 = make_pp2(dir.path());
    let (a, b) = round_trip(&pp2);
    assert_eq!((a.variant, a.tp, a.pp), (Variant::TpPpShards, 1, 2));
    assert_eq!(a, b);
}

#[test]
fn folder_and_gzip_inputs_read_like_the_tar() {
    let tar = fixture("mcore/llama/nemo/tiny_llama_tp2.nemo");
    let dir = tempfile::tempdir().unwrap();
    let gz = dir.path().join("m.nemo");
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(&gz).unwrap(),
        flate2::Compression::fast(),
    );
    std::io::copy(&mut std::fs::File::open(&tar).unwrap(), &mut enc).unwrap();
    enc.finish().unwrap();
    assert_eq!(snapshot(&tar), snapshot(&gz));
    let (a, b) = round_trip(&gz);
    assert_eq!(a, b);
}

/// Builds a PP=2 `.nemo` (layout tp_rank_00_pp_rank_00X) from the TP1 fixture
/// with our own writers: stage 0 = embedding + layer 0, stage 1 = layer 1
/// (renumbered 0) + final norm + output layer.
pub fn make_pp2(dir: &Path) -> PathBuf {
    let src = Checkpoint::open(fixture("mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap();
    let rank = &src.rank_files()[0];
    let mut stages: [Vec<(Value, Value)>; 2] = [vec![], vec![]];
    for (k, v) in rank.entries() {
        let (stage, key) = if k.contains(".layers.1.") {
            (1, k.replace(".layers.1.", ".layers.0."))
        } else if k.contains(".layers.0.") || k.contains("embedding") {
            (0, k.to_string())
        } else {
            (1, k.to_string())
        };
        stages[stage].push((Value::Str(key), v.clone()));
    }
    let config = ModelConfig::parse(src.config.text())
        .unwrap()
        .with_updates(&[("pipeline_model_parallel_size", "2")])
        .unwrap();
    let out = dir.join("tiny_llama_pp2.nemo");
    let mut tar = TarWriter::new(BufWriter::new(std::fs::File::create(&out).unwrap()));
    tar.append_dir("").unwrap();
    for a in &src.artifacts {
        let bytes = src.read_member(a).unwrap();
        tar.append_pieces(a, bytes.len() as u64, [bytes]).unwrap();
    }
    tar.append_pieces(
        "model_config.yaml",
        config.len() as u64,
        [config.as_bytes()],
    )
    .unwrap();
    for (p, items) in stages.into_iter().enumerate() {
        let folder = format!("tp_rank_00_pp_rank_{p:03}");
        tar.append_dir(&folder).unwrap();
        let mut od = Object::new(
            Global::new("collections", "OrderedDict"),
            Construct::Reduce,
            vec![],
        );
        od.items = items;
        let mut buf = Vec::new();
        save(&mut buf, "model_weights", &Value::Object(Box::new(od))).unwrap();
        // The bytes we wrote must read back as what we put in.
        load(
            nemo_tool::io::bytes::ByteView::from_vec(buf.clone()),
            &Policy::torch(),
        )
        .unwrap();
        tar.append_pieces(
            &format!("{folder}/model_weights.ckpt"),
            buf.len() as u64,
            [&buf],
        )
        .unwrap();
    }
    tar.finish().unwrap();
    out
}
