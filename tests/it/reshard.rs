//! `reshard` acceptance: megatron-core's own shards as ground truth, round
//! trips over generated models of every flavour, and refusals through the
//! binary.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use nemo_tool::formats::archive::{Archive, MemberKind};
use nemo_tool::formats::torch::{Dtype, Value};
use nemo_tool::model::canonical::Canonical;
use nemo_tool::model::checkpoint::Checkpoint;
use nemo_tool::model::plan::{plan_reshard, ReshardOptions};
use nemo_tool::ops::reshard::{write, WriteOptions};
use nemo_tool::testkit::synth::{write_nemo, Fill, Spec};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/mcore/llama")
        .join(rel)
}

fn tool() -> Command {
    Command::new(env!("CARGO_BIN_EXE_nemo-tool"))
}

fn reshard(input: &Path, out: &Path, opts: &ReshardOptions) {
    let ckpt = Checkpoint::open(input).unwrap();
    let canon = Canonical::new(&ckpt).unwrap();
    let plan = plan_reshard(&canon, opts)
        .unwrap_or_else(|e| panic!("{} -> TP{} PP{}: {e}", input.display(), opts.tp, opts.pp));
    write(
        &canon,
        &plan,
        out,
        WriteOptions {
            force: true,
            progress: None,
            no_sync: false,
        },
    )
    .unwrap();
}

fn opts(tp: u64, pp: u64, vocab: Option<u64>) -> ReshardOptions {
    ReshardOptions {
        tp,
        pp,
        vocab_size: vocab,
        ..Default::default()
    }
}

/// Rank member -> ordered (key, dtype, shape, bytes or object debug text).
type Ranks = BTreeMap<String, Vec<(String, String)>>;

fn ranks(path: &Path) -> Ranks {
    let ckpt = Checkpoint::open(path).unwrap();
    ckpt.rank_files()
        .iter()
        .map(|r| {
            let entries = r
                .entries()
                .map(|(k, v)| {
                    let d = match v {
                        Value::Tensor(t) => format!(
                            "{}{:?} {}",
                            t.dtype,
                            t.shape,
                            hex::encode(t.to_vec().unwrap())
                        ),
                        other => format!("{other:?}"),
                    };
                    (k.to_string(), d)
                })
                .collect();
            (r.member.clone(), entries)
        })
        .collect()
}

fn assert_same_ranks(a: &Path, b: &Path) {
    let (ra, rb) = (ranks(a), ranks(b));
    assert_eq!(
        ra.keys().collect::<Vec<_>>(),
        rb.keys().collect::<Vec<_>>(),
        "rank files"
    );
    for (m, ea) in &ra {
        let eb = &rb[m];
        let ka: Vec<&str> = ea.iter().map(|x| x.0.as_str()).collect();
        let kb: Vec<&str> = eb.iter().map(|x| x.0.as_str()).collect();
        assert_eq!(ka, kb, "{m}: keys and order");
        for (x, y) in ea.iter().zip(eb) {
            assert!(x.1 == y.1, "{m}: {} differs", x.0);
        }
    }
}

/// Every file member of two archives, byte for byte.
fn assert_same_members(a: &Path, b: &Path) {
    assert_same_ranks(a, b); // names the first differing tensor
    let files = |p: &Path| -> BTreeMap<String, Vec<u8>> {
        let ar = Archive::open(p).unwrap();
        ar.members()
            .iter()
            .filter(|m| m.kind == MemberKind::File)
            .map(|m| {
                (
                    m.name.clone(),
                    ar.read(&m.name).unwrap().as_slice().to_vec(),
                )
            })
            .collect()
    };
    let (fa, fb) = (files(a), files(b));
    assert_eq!(fa.keys().collect::<Vec<_>>(), fb.keys().collect::<Vec<_>>());
    for (k, v) in &fa {
        assert!(v == &fb[k], "{k} differs");
    }
}

#[test]
fn tp1_to_tp2_equals_megatron_core_tp2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tp2.nemo");
    reshard(
        &fixture("nemo/tiny_llama_tp1.nemo"),
        &out,
        &opts(2, 1, None),
    );
    let want = fixture("nemo/tiny_llama_tp2.nemo");
    assert_same_ranks(&out, &want);
    // config (only TP changed) and the tokenizer are byte-identical too
    let (a, b) = (Archive::open(&out).unwrap(), Archive::open(&want).unwrap());
    for m in b.members() {
        if m.kind == MemberKind::File && !m.name.ends_with(".ckpt") {
            assert_eq!(
                a.read(&m.name).unwrap().as_slice(),
                b.read(&m.name).unwrap().as_slice(),
                "{}",
                m.name
            );
        }
    }
}

#[test]
fn tp2_to_tp1_equals_tp1() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tp1.nemo");
    reshard(
        &fixture("nemo/tiny_llama_tp2.nemo"),
        &out,
        &opts(1, 1, None),
    );
    assert_same_ranks(&out, &fixture("nemo/tiny_llama_tp1.nemo"));
}

#[test]
fn torch_dist_to_tp2_equals_tp2() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tp2.nemo");
    reshard(
        &fixture("nemo/tiny_llama_dist_tp1.nemo"),
        &out,
        &opts(2, 1, None),
    );
    assert_same_ranks(&out, &fixture("nemo/tiny_llama_tp2.nemo"));
    let out1 = tmp.path().join("tp1.nemo");
    reshard(
        &fixture("nemo/tiny_llama_dist_tp1.nemo"),
        &out1,
        &opts(1, 1, None),
    );
    assert_same_ranks(&out1, &fixture("nemo/tiny_llama_tp1.nemo"));
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

#[test]
fn zarr_folder_to_tp2_equals_tp2() {
    // an extracted .nemo folder: the llama config and tokenizer, zarr weights
    let tmp = tempfile::tempdir().unwrap();
    let folder = tmp.path().join("llama_zarr");
    let zarr = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/zarr/llama_tp2/model_weights");
    copy_dir(&zarr, &folder.join("model_weights"));
    let src = Archive::open(fixture("nemo/tiny_llama_dist_tp1.nemo")).unwrap();
    for m in src.members() {
        if m.kind == MemberKind::File && !m.name.starts_with("model_weights") {
            std::fs::write(folder.join(&m.name), src.read(&m.name).unwrap().as_slice()).unwrap();
        }
    }
    let out = tmp.path().join("tp2.nemo");
    reshard(&folder, &out, &opts(2, 1, None));
    assert_same_ranks(&out, &fixture("nemo/tiny_llama_tp2.nemo"));
}

#[test]
fn cast_to_bf16_converts_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16.nemo");
    let mut o = opts(2, 1, None);
    o.dtype = Some(Dtype::BF16);
    reshard(&fixture("nemo/tiny_llama_tp1.nemo"), &out, &o);
    let got = Checkpoint::open(&out).unwrap();
    let want = Checkpoint::open(fixture("nemo/tiny_llama_tp2.nemo")).unwrap();
    let mut n = 0;
    for (g, w) in got.rank_files().iter().zip(want.rank_files()) {
        for ((kg, vg), (kw, vw)) in g.entries().zip(w.entries()) {
            assert_eq!(kg, kw);
            let (Value::Tensor(tg), Value::Tensor(tw)) = (vg, vw) else {
                continue;
            };
            assert_eq!(tg.dtype, Dtype::BF16);
            let expect: Vec<u8> = tw
                .to_vec()
                .unwrap()
                .chunks(4)
                .flat_map(|c| {
                    half::bf16::from_f32(f32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes()
                })
                .collect();
            assert_eq!(tg.to_vec().unwrap(), expect, "{kg}");
            n += 1;
        }
    }
    assert_eq!(n, 2 * 15);
}

/// The generated model flavours of the acceptance list.
fn flavours() -> Vec<(&'static str, Spec, bool)> {
    let base = Spec::tiny(); // GQA 8 heads / 4 groups, gated, RMSNorm, no bias, untied, V=100 m=16
    let mut mha = base.clone();
    mha.groups = 8;
    let mut single = base.clone();
    single.groups = 1;
    let mut plain = base.clone();
    plain.gated = false;
    plain.bias = true;
    plain.rmsnorm = false;
    plain.tied = true;
    plain.vocab = 200; // Vp(1)=208, Vp(2)=224, Vp(4)=256, Vp(8)=256
    plain.dtype = Dtype::BF16;
    vec![
        ("gqa", base, false),
        ("mha", mha, false),
        ("single-group", single, true),
        ("plain-bias-layernorm-tied", plain, false),
    ]
}

fn allowed_tp(spec: &Spec, partial: bool) -> Vec<u64> {
    [1u64, 2, 4, 8]
        .into_iter()
        .filter(|t| {
            spec.heads % t == 0
                && spec.ffn % t == 0
                && (spec.groups % t == 0 || (partial && t % spec.groups == 0))
        })
        .collect()
}

/// Reshards every generated model of `grid` to every other point and back:
/// the way there gives exactly the generator's model at the target (every
/// member byte for byte), and the way back reproduces the source byte for byte.
fn round_trips(tag: &str, grid_of: impl Fn(&Spec, bool) -> Vec<(u64, u64)>) {
    let tmp = tempfile::tempdir().unwrap();
    for (name, spec, partial) in flavours() {
        let grid = grid_of(&spec, partial);
        assert!(grid.len() >= 3, "{name}: {grid:?}");
        let files: Vec<PathBuf> = grid
            .iter()
            .map(|&(t, p)| {
                let f = tmp.path().join(format!("{tag}-{name}-{t}-{p}.nemo"));
                write_nemo(&spec, t, p, Fill::Random(7), &f).unwrap();
                f
            })
            .collect();
        for (i, &(ta, pa)) in grid.iter().enumerate() {
            for (j, &(tb, pb)) in grid.iter().enumerate() {
                let mid = tmp.path().join("mid.nemo");
                let back = tmp.path().join("back.nemo");
                let mut o = opts(tb, pb, Some(spec.vocab));
                o.allow_partial_query_groups = partial;
                reshard(&files[i], &mid, &o);
                assert_same_members(&mid, &files[j]);
                let mut o = opts(ta, pa, Some(spec.vocab));
                o.allow_partial_query_groups = partial;
                reshard(&mid, &back, &o);
                assert_same_members(&back, &files[i]);
            }
        }
    }
}

/// TPa -> TPb -> TPa for every allowed a, b in {1, 2, 4, 8}.
#[test]
fn tp_round_trips_are_byte_identical() {
    round_trips("tp", |spec, partial| {
        allowed_tp(spec, partial)
            .into_iter()
            .map(|t| (t, 1))
            .collect()
    });
}

/// PP 1 <-> 2 <-> 4, and TP and PP changed together.
#[test]
fn pp_and_tp_pp_round_trips_are_byte_identical() {
    round_trips("pp", |spec, partial| {
        let tmax = *allowed_tp(spec, partial).last().unwrap();
        vec![(1, 1), (1, 2), (1, 4), (tmax, 2)]
    });
}

/// Tied embeddings: a copy of the embedding on the last stage at PP>1 only.
#[test]
fn tied_embedding_copy_on_the_last_stage() {
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = Spec::tiny();
    spec.tied = true;
    let src = tmp.path().join("tied.nemo");
    write_nemo(&spec, 1, 1, Fill::Random(5), &src).unwrap();
    let out = tmp.path().join("pp2.nemo");
    reshard(&src, &out, &opts(1, 2, Some(spec.vocab)));
    let r = ranks(&out);
    let first = &r["tp_rank_00_pp_rank_000/model_weights.ckpt"];
    let last = &r["tp_rank_00_pp_rank_001/model_weights.ckpt"];
    let emb = first
        .iter()
        .find(|e| e.0 == "model.embedding.word_embeddings.weight")
        .unwrap();
    let out_layer = last
        .iter()
        .find(|e| e.0 == "model.output_layer.weight")
        .unwrap();
    assert_eq!(emb.1, out_layer.1);
    assert!(!first.iter().any(|e| e.0 == "model.output_layer.weight"));
    // layers renumbered per stage: both stages hold layers 0 and 1
    assert!(last
        .iter()
        .any(|e| e.0 == "model.decoder.layers.1.mlp.linear_fc2.weight"));
    assert!(!last
        .iter()
        .any(|e| e.0.starts_with("model.decoder.layers.2.")));
}

fn run_fail(args: &[&str], out: &Path, needles: &[&str]) {
    let o = tool().arg("reshard").args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: `{n}` not in: {err}");
    }
    assert!(!out.exists(), "{args:?} left {}", out.display());
    let dir = out.parent().unwrap();
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("out.nemo"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

#[test]
fn refusals_through_the_binary() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.nemo");
    let o = out.to_str().unwrap();
    let tp1 = fixture("nemo/tiny_llama_tp1.nemo");
    let i = tp1.to_str().unwrap();
    // heads 8, groups 2, ffn 96, layers 2
    run_fail(
        &[i, o, "--tp", "3"],
        &out,
        &["num_attention_heads = 8 is not divisible by the target TP = 3"],
    );
    run_fail(
        &[i, o, "--tp", "4"],
        &out,
        &["num_query_groups = 2", "--allow-partial-query-groups"],
    );
    run_fail(
        &[i, o, "--tp", "1", "--pp", "3"],
        &out,
        &["num_layers = 2 is not divisible by the target PP = 3"],
    );
    // ffn: 8 heads and groups divide 8, ffn 100 does not
    let mut spec = Spec::tiny();
    spec.groups = 8;
    spec.ffn = 100;
    let odd = tmp.path().join("odd.nemo");
    write_nemo(&spec, 1, 1, Fill::Sparse, &odd).unwrap();
    run_fail(
        &[odd.to_str().unwrap(), o, "--tp", "8"],
        &out,
        &["ffn_hidden_size = 100 is not divisible by the target TP = 8"],
    );
    // unreadable inputs
    let missing = tmp.path().join("missing.nemo");
    run_fail(
        &[missing.to_str().unwrap(), o, "--tp", "2"],
        &out,
        &["missing.nemo"],
    );
    let junk = tmp.path().join("junk.nemo");
    std::fs::write(&junk, b"this is not a checkpoint at all").unwrap();
    run_fail(
        &[junk.to_str().unwrap(), o, "--tp", "2"],
        &out,
        &["junk.nemo"],
    );
    // an existing output is kept without --force
    std::fs::write(&out, b"precious").unwrap();
    let r = tool()
        .args(["reshard", i, o, "--tp", "2"])
        .output()
        .unwrap();
    assert_eq!(r.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&r.stderr).contains("already exists"));
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    let r = tool()
        .args(["reshard", i, o, "--tp", "2", "--force"])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_same_ranks(&out, &fixture("nemo/tiny_llama_tp2.nemo"));
}

#[test]
fn dry_run_writes_nothing_and_json_describes_the_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.nemo");
    let i = fixture("nemo/tiny_llama_dist_tp1.nemo");
    let r = tool()
        .arg("reshard")
        .arg(&i)
        .arg(&out)
        .args([
            "--target_tensor_model_parallel_size",
            "2",
            "--dry-run",
            "--json",
        ])
        .output()
        .unwrap();
    assert_eq!(
        r.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(!out.exists());
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["tp"], 2);
    let ranks = v["ranks"].as_array().unwrap();
    assert_eq!(ranks.len(), 2);
    assert_eq!(ranks[1]["member"], "mp_rank_01/model_weights.ckpt");
    let fc1 = ranks[1]["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "model.decoder.layers.0.mlp.linear_fc1.weight")
        .unwrap();
    // rank 1 of a gated fc1 = [gate rows 48..96; up rows 144..192]
    assert_eq!(fc1["segments"][0]["start"], 48);
    assert_eq!(fc1["segments"][1]["start"], 144);
    let r = tool()
        .arg("reshard")
        .arg(&i)
        .arg(&out)
        .args(["--tp", "2", "--dry-run"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(text.contains("mp_rank_01/model_weights.ckpt"), "{text}");
    assert!(text.contains("rows[48..96] + rows[144..192]"), "{text}");
    assert!(!out.exists());
    // --json result after a real run
    let r = tool()
        .arg("reshard")
        .arg(&i)
        .arg(&out)
        .args(["--tp", "2", "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&r.stdout).unwrap();
    assert_eq!(v["rank_files"], 2);
    assert_eq!(v["tensors"], 30);
}

/// TransformerEngine keeps `_extra_state` as a uint8 tensor (or BytesIO): it is
/// an opaque object, copied verbatim to every rank, never split.
#[test]
fn tensor_extra_state_is_kept_verbatim() {
    use nemo_tool::formats::tar_write::TarWriter;
    use nemo_tool::formats::torch::tensor::{StorageRef, TensorRef};
    use nemo_tool::io::bytes::ByteView;
    let tmp = tempfile::tempdir().unwrap();
    let src = Checkpoint::open(fixture("nemo/tiny_llama_tp1.nemo")).unwrap();
    let key = "model.decoder.layers.1.mlp.linear_fc2._extra_state";
    let blob: Vec<u8> = (0u8..37).collect();
    let mut root = src.rank_files()[0].file.root.clone();
    let Value::Object(od) = &mut root else {
        panic!("not an OrderedDict")
    };
    let slot = od
        .items
        .iter_mut()
        .find(|(k, _)| k.as_str() == Some(key))
        .unwrap();
    let st = StorageRef::from_view("blob", ByteView::from_vec(blob.clone()));
    slot.1 = Value::Tensor(Box::new(
        TensorRef::contiguous(Dtype::U8, vec![37], st).unwrap(),
    ));
    let path = tmp.path().join("te.nemo");
    let mut tar = TarWriter::new(std::fs::File::create(&path).unwrap());
    tar.append_dir("").unwrap();
    for m in src.archive().members() {
        if m.kind == MemberKind::File && m.name != "model_weights.ckpt" {
            let b = src.read_member(&m.name).unwrap();
            tar.append_pieces(&m.name, b.len() as u64, [b]).unwrap();
        }
    }
    tar.append_streamed("model_weights.ckpt", |w| {
        nemo_tool::formats::torch::file::save(w, "model_weights", &root)
            .map(|_| ())
            .map_err(std::io::Error::other)
    })
    .unwrap();
    tar.finish().unwrap();

    let tp2 = tmp.path().join("tp2.nemo");
    reshard(&path, &tp2, &opts(2, 1, None));
    let c = Checkpoint::open(&tp2).unwrap();
    for r in c.rank_files() {
        let (_, v) = r.entries().find(|(k, _)| *k == key).unwrap();
        let Value::Tensor(t) = v else {
            panic!("{}: {key} is not a tensor", r.member)
        };
        assert_eq!((t.dtype, t.to_vec().unwrap()), (Dtype::U8, blob.clone()));
    }
    let back = tmp.path().join("back.nemo");
    reshard(&tp2, &back, &opts(1, 1, None));
    assert_same_ranks(&back, &path);
}
