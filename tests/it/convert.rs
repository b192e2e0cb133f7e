//! `convert` end to end through the library: HF fixture -> .nemo at several
//! layouts -> HF again, byte for byte; `--to dist` read back; sharding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use nemo_tool::formats::safetensors;
use nemo_tool::io::piece::concat;
use nemo_tool::model::checkpoint::Checkpoint;
use nemo_tool::ops::convert::named::{Item, NamedModel};
use nemo_tool::ops::convert::{hf_to_nemo, nemo_to_dist, nemo_to_hf, FromHf, ToHf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The fixture HF folder plus the fixture tokenizer, in a temp dir.
fn hf_dir(tmp: &Path) -> PathBuf {
    let d = tmp.join("hf");
    std::fs::create_dir_all(&d).unwrap();
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(root().join("fixtures/mcore/llama/hf").join(f), d.join(f)).unwrap();
    }
    std::fs::copy(
        root().join("fixtures/mcore/tokenizer/tokenizer.model"),
        d.join("tokenizer.model"),
    )
    .unwrap();
    d
}

fn from_hf(tp: u64, pp: u64) -> FromHf {
    FromHf {
        tp,
        pp,
        dtype: None,
        vocab_divisor: None,
        force: false,
        no_sync: false,
    }
}

fn tensors_of(ck: &Checkpoint) -> HashMap<String, Vec<u8>> {
    let c = NamedModel::from_checkpoint(ck).unwrap();
    c.entries
        .iter()
        .filter_map(|e| match &e.item {
            Item::Tensor(t) => Some((e.name.clone(), concat(t.pieces()))),
            Item::Object(_) => None,
        })
        .collect()
}

fn hf_bytes(dir: &Path) -> HashMap<String, Vec<u8>> {
    safetensors::open_dir(dir)
        .unwrap()
        .into_iter()
        .flat_map(|(_, st)| st.tensors)
        .map(|t| (t.name, t.data.as_slice().to_vec()))
        .collect()
}

#[test]
fn hf_to_every_layout_and_back_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = hf_dir(tmp.path());
    let want = hf_bytes(&root().join("fixtures/mcore/llama/hf"));
    let reference = tensors_of(
        &Checkpoint::open(root().join("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo")).unwrap(),
    );
    for (tp, pp) in [(1, 1), (2, 1), (1, 2), (2, 2)] {
        let nemo = tmp.path().join(format!("m_{tp}_{pp}.nemo"));
        let s = hf_to_nemo(&hf, &nemo, &from_hf(tp, pp)).unwrap();
        assert_eq!((s.tp, s.pp, s.files as u64), (tp, pp, tp * pp));
        let ck = Checkpoint::open(&nemo).unwrap();
        assert!(ck.warnings.is_empty(), "{:?}", ck.warnings);
        assert_eq!(ck.layout.tp, tp);
        assert_eq!(ck.layout.pp, pp);
        // Every tensor equals the megatron-core fixture's (vocab rows: the true 100).
        let ours = tensors_of(&ck);
        assert_eq!(ours.len(), reference.len());
        for (k, v) in &reference {
            let o = &ours[k];
            if k.contains("word_embeddings") || k.contains("output_layer") {
                let n = 100 * 64 * 4;
                assert!(o[..n] == v[..n], "{k} at {tp}x{pp}");
                assert!(o[n..].iter().all(|b| *b == 0), "{k}: padding is zero");
            } else {
                assert!(o == v, "{k} at {tp}x{pp}");
            }
        }
        let back = tmp.path().join(format!("hf_{tp}_{pp}"));
        let s = nemo_to_hf(
            &nemo,
            &back,
            &ToHf {
                shard_size: 5_000_000_000,
                dtype: None,
                force: false,
            },
        )
        .unwrap();
        assert_eq!(s.vocab, (100, 100));
        assert_eq!(hf_bytes(&back), want, "{tp}x{pp}");
        assert_eq!(
            std::fs::read(back.join("tokenizer.model")).unwrap(),
            std::fs::read(hf.join("tokenizer.model")).unwrap()
        );
    }
}

#[test]
fn to_hf_shards_with_an_index() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    let s = nemo_to_hf(
        &root().join("fixtures/mcore/llama/nemo/tiny_llama_tp2.nemo"),
        &out,
        &ToHf {
            shard_size: 60_000,
            dtype: None,
            force: false,
        },
    )
    .unwrap();
    assert!(s.files >= 4, "{}", s.files);
    assert!(out.join(safetensors::INDEX_FILE).is_file());
    assert!(!out.join(safetensors::SINGLE_FILE).exists());
    assert_eq!(
        hf_bytes(&out),
        hf_bytes(&root().join("fixtures/mcore/llama/hf"))
    );
    // No overwrite without force; with force it is replaced.
    let opts = ToHf {
        shard_size: 5_000_000_000,
        dtype: None,
        force: false,
    };
    let src = root().join("fixtures/mcore/llama/nemo/tiny_llama_tp1.nemo");
    assert!(nemo_to_hf(&src, &out, &opts).is_err());
    nemo_to_hf(
        &src,
        &out,
        &ToHf {
            force: true,
            ..opts
        },
    )
    .unwrap();
    assert!(out.join(safetensors::SINGLE_FILE).is_file());
}

#[test]
fn dtype_cast_to_bf16() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = hf_dir(tmp.path());
    let nemo = tmp.path().join("bf16.nemo");
    let mut o = from_hf(2, 1);
    o.dtype = Some(nemo_tool::formats::torch::Dtype::BF16);
    hf_to_nemo(&hf, &nemo, &o).unwrap();
    let ck = Checkpoint::open(&nemo).unwrap();
    assert_eq!(ck.config.precision(), Some("bf16"));
    let src = hf_bytes(&hf);
    let ours = tensors_of(&ck);
    let norm = &ours["model.decoder.final_layernorm.weight"];
    let f32s = &src["model.norm.weight"];
    for (i, w) in f32s.chunks(4).enumerate() {
        let x = f32::from_le_bytes(w.try_into().unwrap());
        let b = half::bf16::from_le_bytes([norm[2 * i], norm[2 * i + 1]]);
        assert_eq!(b, half::bf16::from_f32(x));
    }
}

#[test]
fn to_dist_reads_back_equal() {
    let tmp = tempfile::tempdir().unwrap();
    for src in ["tiny_llama_tp1.nemo", "tiny_llama_tp2.nemo"] {
        let input = root().join("fixtures/mcore/llama/nemo").join(src);
        let out = tmp.path().join(format!("dist_{src}"));
        nemo_to_dist(&input, &out, None, false).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        assert_eq!(
            ck.layout.variant,
            nemo_tool::model::checkpoint::Variant::Distributed
        );
        assert_eq!(
            ck.config.text(),
            Checkpoint::open(&input).unwrap().config.text()
        );
        assert_eq!(
            tensors_of(&ck),
            tensors_of(&Checkpoint::open(&input).unwrap()),
            "{src}"
        );
        // Objects: one per layer module, holding None.
        let nemo_tool::model::checkpoint::Weights::Dist(d) = &ck.weights else {
            panic!("not dist")
        };
        assert_eq!(d.objects.len(), 8);
        assert!(d
            .objects
            .iter()
            .any(|o| o.key == "model.decoder.layers.mlp.linear_fc2._extra_state/shard_1_2"));
    }
}

#[test]
fn bad_requests_are_refused_and_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = hf_dir(tmp.path());
    let out = tmp.path().join("x.nemo");
    // 8 heads / 2 groups do not split 4 ways on groups... 3 ways at all.
    let e = hf_to_nemo(&hf, &out, &from_hf(3, 1)).unwrap_err();
    assert!(
        e.to_string().contains("not divisible by the target TP = 3"),
        "{e}"
    );
    let e = hf_to_nemo(&hf, &out, &from_hf(1, 3)).unwrap_err();
    assert!(e.to_string().contains("layers"), "{e}");
    assert!(!out.exists());
    std::fs::write(&out, b"keep").unwrap();
    assert!(hf_to_nemo(&hf, &out, &from_hf(1, 1)).is_err());
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}

#[test]
fn tied_embeddings_at_pp2_copy_the_embedding_to_the_last_stage() {
    use nemo_tool::formats::safetensors::WriteTensor;
    use nemo_tool::io::piece::Piece;
    let tmp = tempfile::tempdir().unwrap();
    let hf = hf_dir(tmp.path());
    // The fixture as a tied model: drop lm_head, say so in config.json.
    let st = safetensors::open_dir(&hf).unwrap().remove(0).1;
    let tensors: Vec<WriteTensor> = st
        .tensors
        .iter()
        .filter(|t| t.name != "lm_head.weight")
        .map(|t| WriteTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
            pieces: vec![Piece::Bytes(t.data.clone())],
        })
        .collect();
    let tied = tmp.path().join("tied");
    std::fs::create_dir_all(&tied).unwrap();
    let mut f = std::fs::File::create(tied.join("model.safetensors")).unwrap();
    safetensors::write(&mut f, "m", &tensors, &Default::default()).unwrap();
    drop(f);
    let cfg = std::fs::read_to_string(hf.join("config.json"))
        .unwrap()
        .replace(
            "\"tie_word_embeddings\": false",
            "\"tie_word_embeddings\": true",
        );
    std::fs::write(tied.join("config.json"), cfg).unwrap();
    std::fs::copy(hf.join("tokenizer.model"), tied.join("tokenizer.model")).unwrap();

    let nemo = tmp.path().join("tied_pp2.nemo");
    hf_to_nemo(&tied, &nemo, &from_hf(2, 2)).unwrap();
    let ck = Checkpoint::open(&nemo).unwrap();
    assert!(ck.config.share_embeddings_and_output_weights());
    for r in ck.rank_files() {
        let keys: Vec<&str> = r.entries().map(|(k, _)| k).collect();
        let has = |k: &str| keys.contains(&k);
        // Stage 0 holds the embedding; stage 1 the tied copy, before its extra state.
        assert_eq!(
            has("model.embedding.word_embeddings.weight"),
            r.pp == 0,
            "{}",
            r.member
        );
        assert_eq!(has("model.output_layer.weight"), r.pp == 1, "{}", r.member);
        if r.pp == 1 {
            let i = keys
                .iter()
                .position(|k| *k == "model.output_layer.weight")
                .unwrap();
            assert_eq!(keys[i + 1], "model.output_layer._extra_state");
            let stage0 = ck
                .rank_files()
                .iter()
                .find(|x| x.pp == 0 && x.tp == r.tp)
                .unwrap();
            let get = |rf: &nemo_tool::model::checkpoint::RankFile, k: &str| {
                rf.entries()
                    .find(|(n, _)| *n == k)
                    .and_then(|(_, v)| v.as_tensor().cloned())
                    .unwrap()
                    .to_vec()
                    .unwrap()
            };
            assert!(
                get(r, "model.output_layer.weight")
                    == get(stage0, "model.embedding.word_embeddings.weight")
            );
        }
    }
    let back = tmp.path().join("tied_back");
    nemo_to_hf(
        &nemo,
        &back,
        &ToHf {
            shard_size: 5_000_000_000,
            dtype: None,
            force: false,
        },
    )
    .unwrap();
    let want = hf_bytes(&tied);
    let got = hf_bytes(&back);
    assert!(!got.contains_key("lm_head.weight"));
    assert_eq!(got.len(), 20);
    assert!(got == want);
}

#[test]
fn cli_json_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = hf_dir(tmp.path());
    let bin = env!("CARGO_BIN_EXE_nemo-tool");
    let run =
        |args: &[&std::ffi::OsStr]| std::process::Command::new(bin).args(args).output().unwrap();
    let nemo = tmp.path().join("m.nemo");
    let out = run(&[
        "convert".as_ref(),
        "--from".as_ref(),
        "hf".as_ref(),
        hf.as_os_str(),
        nemo.as_os_str(),
        "--tp".as_ref(),
        "2".as_ref(),
        "--json".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["direction"], "hf -> nemo");
    assert_eq!(j["tp"], 2);
    assert_eq!(j["vocab"], serde_json::json!([100, 104]));
    assert_eq!(j["artifacts"].as_array().unwrap().len(), 2);
    let back = tmp.path().join("back");
    let out = run(&[
        "convert".as_ref(),
        nemo.as_os_str(),
        "--to".as_ref(),
        "hf".as_ref(),
        back.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["vocab"], serde_json::json!([100, 100]));
    let mut arts: Vec<&str> = j["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    arts.sort();
    assert_eq!(arts, ["generation_config.json", "tokenizer.model"]);
    // Refusals exit 2 and name the problem.
    for (args, want) in [
        (
            vec!["convert", "--from", "hf", "x", "y", "--to", "dist"],
            "not possible",
        ),
        (vec!["convert", "in.nemo", "out"], "--to"),
        (
            vec!["convert", "in.nemo", "out", "--to", "dist", "--tp", "2"],
            "any TP",
        ),
    ] {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        let out = run(&args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(want),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
