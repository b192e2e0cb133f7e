//! Every `fixtures/torch-samples/pt` file read against `expected.json`,
//! round trips read -> save -> read, the golden minimal file, bad inputs, and
//! (with `NEMO_TOOL_INTEROP_OUT=<dir>`) files for `tests/interop/test_torch_files.py`.

use std::path::PathBuf;

use half::{bf16, f16};
use nemo_tool::formats::torch::{
    self, file, pickle, zip, Dtype, Policy, StorageRef, TensorRef, TorchFile, Value,
};
use nemo_tool::io::bytes::ByteView;
use nemo_tool::io::piece::Piece;
use serde_json::Value as Json;

fn samples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/torch-samples")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(samples().join("pt").join(name)).unwrap()
}

fn load_bytes(b: Vec<u8>) -> Result<TorchFile, file::Error> {
    torch::load(ByteView::from_vec(b), &Policy::torch())
}

fn expected() -> Json {
    serde_json::from_slice(&std::fs::read(samples().join("expected.json")).unwrap()).unwrap()
}

/// The logical values as f64 (bools as 0/1).
fn values(t: &TensorRef) -> Vec<f64> {
    let b = t.to_vec().unwrap();
    let n = t.dtype.size();
    b.chunks(n)
        .map(|c| match t.dtype {
            Dtype::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
            Dtype::F64 => f64::from_le_bytes(c.try_into().unwrap()),
            Dtype::F16 => f16::from_le_bytes(c.try_into().unwrap()).to_f64(),
            Dtype::BF16 => bf16::from_le_bytes(c.try_into().unwrap()).to_f64(),
            Dtype::I64 => i64::from_le_bytes(c.try_into().unwrap()) as f64,
            Dtype::I32 => i32::from_le_bytes(c.try_into().unwrap()) as f64,
            Dtype::I16 => i16::from_le_bytes(c.try_into().unwrap()) as f64,
            Dtype::I8 => c[0] as i8 as f64,
            Dtype::U8 | Dtype::Bool => c[0] as f64,
            Dtype::U16 => u16::from_le_bytes(c.try_into().unwrap()) as f64,
            other => panic!("no decoder for {other}"),
        })
        .collect()
}

fn json_values(e: &Json) -> Vec<f64> {
    let v = e
        .get("values")
        .or_else(|| e.get("values_as_float"))
        .unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| match x {
            Json::Bool(b) => *b as u8 as f64,
            x => x.as_f64().unwrap(),
        })
        .collect()
}

fn u64s(j: &Json) -> Vec<u64> {
    j.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

fn check_against_expected(name: &str, f: &TorchFile) {
    let exp = expected();
    let want = &exp[format!("pt/{name}")]["tensors"];
    let got = f.tensors();
    for (path, e) in want.as_object().unwrap() {
        let (_, t) = got.iter().find(|(p, _)| p == path).unwrap_or_else(|| {
            panic!(
                "{name}: no tensor {path}; have {:?}",
                got.iter().map(|g| &g.0).collect::<Vec<_>>()
            )
        });
        let ctx = format!("{name}:{path}");
        assert_eq!(t.dtype.torch_name(), e["dtype"].as_str().unwrap(), "{ctx}");
        assert_eq!(t.shape, u64s(&e["shape"]), "{ctx}");
        assert_eq!(t.stride, u64s(&e["stride"]), "{ctx}");
        assert_eq!(
            t.storage_offset,
            e["storage_offset"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            t.requires_grad,
            e["requires_grad"].as_bool().unwrap(),
            "{ctx}"
        );
        assert_eq!(
            t.storage.bytes.len() as u64,
            e["storage_nbytes"].as_u64().unwrap(),
            "{ctx}"
        );
        assert_eq!(values(t), json_values(e), "{ctx}");
        if let Some(raw) = e.get("raw_u16") {
            let bits: Vec<i64> = t
                .to_vec()
                .unwrap()
                .chunks(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect();
            let want: Vec<i64> = raw
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            assert_eq!(bits, want, "{ctx}");
        }
    }
}

const ZIP_SAMPLES: &[&str] = &[
    "two_tensors.pt",
    "dtypes.pt",
    "views.pt",
    "nested_values.pt",
    "module_state_dict.pt",
    "te_extra_state.pt",
    "ref_writer_output.pt",
    "minimal_one_tensor.pt",
];

#[test]
fn every_sample_reads_with_expected_tensors() {
    for name in ZIP_SAMPLES.iter().chain(&["legacy_nonzip.pt"]) {
        let f = load_bytes(read(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        check_against_expected(name, &f);
    }
}

#[test]
fn views_share_one_storage() {
    let f = load_bytes(read("views.pt")).unwrap();
    let t = f.tensors();
    let get = |n: &str| t.iter().find(|(p, _)| p == n).unwrap().1;
    let (base, view, tr) = (get("base"), get("view_off4"), get("transposed"));
    assert_eq!(base.storage.key, view.storage.key);
    assert_eq!(
        base.storage.bytes.as_slice().as_ptr(),
        tr.storage.bytes.as_slice().as_ptr()
    );
    assert!(!tr.is_contiguous());
    assert!(matches!(
        get("param").kind,
        torch::TensorKind::Parameter { .. }
    ));
}

fn plain(j: &Json) -> Value {
    match j {
        Json::Null => Value::None,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) if n.is_i64() => Value::Int(n.as_i64().unwrap()),
        Json::Number(n) => Value::Float(n.as_f64().unwrap()),
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(a) => Value::List(a.iter().map(plain).collect()),
        Json::Object(o) => Value::Dict(
            o.iter()
                .map(|(k, v)| (Value::Str(k.clone()), plain(v)))
                .collect(),
        ),
    }
}

#[test]
fn nested_values_match_json() {
    let f = load_bytes(read("nested_values.pt")).unwrap();
    let want: Json = serde_json::from_slice(&read("nested_values.json")).unwrap();
    for (k, w) in want.as_object().unwrap() {
        let got = f.root.get(k).unwrap_or_else(|| panic!("no {k}"));
        let w = match k.as_str() {
            "tuple" => Value::Tuple(plain(w).as_seq().unwrap().to_vec()),
            "bytes" => Value::Bytes(
                w.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as u8)
                    .collect(),
            ),
            _ => plain(w),
        };
        assert_eq!(got, &w, "{k}");
    }
}

#[test]
fn te_extra_state_keeps_bytesio_and_metadata_survives() {
    let f = load_bytes(read("te_extra_state.pt")).unwrap();
    let es = f
        .root
        .get("linear._extra_state")
        .unwrap()
        .as_object()
        .unwrap();
    assert!(es.class.is("_io", "BytesIO"));
    let Some(Value::Tuple(st)) = &es.state else {
        panic!("no BytesIO state")
    };
    let Value::Bytes(inner) = &st[0] else {
        panic!("no bytes")
    };
    // the BytesIO holds a nested torch.save stream
    let nested = load_bytes(inner.clone()).unwrap();
    assert_eq!(nested.root.get("recipe"), Some(&Value::Str("none".into())));
    assert_eq!(nested.root.get("amax_history_len"), Some(&Value::Int(1)));

    let f = load_bytes(read("module_state_dict.pt")).unwrap();
    let md = f.root.as_object().unwrap().field("_metadata").unwrap();
    assert_eq!(md.get("1").unwrap().get("version"), Some(&Value::Int(1)));
}

/// The tree with each tensor replaced by its metadata and logical bytes, so
/// files can be compared independently of storage numbering.
fn canon(v: &Value) -> Value {
    let all = |x: &[Value]| x.iter().map(canon).collect::<Vec<_>>();
    match v {
        Value::Tensor(t) => Value::Tuple(vec![
            Value::Str(format!(
                "{} {:?} {:?} {} {} {:?}",
                t.dtype, t.shape, t.stride, t.storage_offset, t.requires_grad, t.kind
            )),
            Value::Bytes(t.to_vec().unwrap()),
            Value::Int(t.storage.bytes.len() as i64),
        ]),
        Value::Tuple(x) => Value::Tuple(all(x)),
        Value::List(x) => Value::List(all(x)),
        Value::Set(x) => Value::Set(all(x)),
        Value::Dict(x) => Value::Dict(x.iter().map(|(k, v)| (canon(k), canon(v))).collect()),
        Value::Object(o) => {
            let mut o = (**o).clone();
            o.args = all(&o.args);
            o.state = o.state.as_ref().map(canon);
            o.items = o.items.iter().map(|(k, v)| (canon(k), canon(v))).collect();
            Value::Object(Box::new(o))
        }
        other => other.clone(),
    }
}

fn save_bytes(archive: &str, root: &Value) -> Vec<u8> {
    torch::save(Vec::new(), archive, root).unwrap()
}

#[test]
fn round_trip_read_save_read_keeps_values_and_structure() {
    for name in ZIP_SAMPLES.iter().chain(&["legacy_nonzip.pt"]) {
        let a = load_bytes(read(name)).unwrap();
        let saved = save_bytes("archive", &a.root);
        let b = load_bytes(saved.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(canon(&a.root), canon(&b.root), "{name}");
        check_against_expected(name, &b);
        // and our own output is a fixed point
        assert!(
            save_bytes("archive", &b.root) == saved,
            "{name}: second save differs"
        );
    }
    // storage sharing survives
    let a = load_bytes(read("views.pt")).unwrap();
    let b = load_bytes(save_bytes("views", &a.root)).unwrap();
    let keys: Vec<_> = b
        .tensors()
        .iter()
        .map(|(_, t)| t.storage.key.clone())
        .collect();
    assert_eq!(keys, ["0", "0", "0", "1", "2", "3"]);
}

#[test]
fn save_reproduces_minimal_one_tensor_golden_file() {
    let data: Vec<u8> = [1f32, 2.0].iter().flat_map(|f| f.to_le_bytes()).collect();
    let t = TensorRef::contiguous(
        Dtype::F32,
        vec![2],
        StorageRef::from_view("x", ByteView::from_vec(data)),
    )
    .unwrap();
    let root = Value::Dict(vec![(Value::Str("w".into()), Value::Tensor(Box::new(t)))]);
    let out = save_bytes("archive", &root);
    assert!(
        out == read("minimal_one_tensor.pt"),
        "bytes differ from the golden file"
    );
}

/// A tensor assembled from slices of another buffer plus zero fill, saved
/// without materialising it.
fn composed_sample() -> Value {
    let src = ByteView::from_vec((0..8).flat_map(|i| (i as f32).to_le_bytes()).collect());
    let st = StorageRef::from_pieces(
        "c",
        vec![
            Piece::Bytes(src.slice(16..32).unwrap()),
            Piece::Zeros(8),
            Piece::Bytes(src.slice(0..8).unwrap()),
        ],
    );
    let t = TensorRef::contiguous(Dtype::F32, vec![2, 4], st).unwrap();
    let mut t_t = t.clone();
    t_t.shape = vec![4, 2];
    t_t.stride = vec![1, 4];
    let u = TensorRef::contiguous(
        Dtype::U16,
        vec![3],
        StorageRef::from_view("u", ByteView::from_vec(vec![1, 0, 2, 0, 0xff, 0xff])),
    )
    .unwrap();
    Value::Dict(vec![
        (Value::Str("c".into()), Value::Tensor(Box::new(t))),
        (Value::Str("c_t".into()), Value::Tensor(Box::new(t_t))),
        (Value::Str("u16".into()), Value::Tensor(Box::new(u))),
        (Value::Str("n".into()), Value::Int(-5)),
        (Value::Str("big".into()), Value::Int(1 << 40)),
    ])
}

#[test]
fn composed_storages_are_streamed_from_pieces() {
    let f = load_bytes(save_bytes("archive", &composed_sample())).unwrap();
    let t = f.tensors();
    assert_eq!(values(t[0].1), [4., 5., 6., 7., 0., 0., 0., 1.]);
    assert_eq!(values(t[1].1), [4., 0., 5., 0., 6., 0., 7., 1.]);
    assert_eq!(t[0].1.storage.key, t[1].1.storage.key);
    assert_eq!(values(t[2].1), [1., 2., 65535.]);
}

#[test]
fn reads_a_stream_embedded_at_an_odd_offset() {
    let mut b = vec![0u8; 37];
    b.extend(read("two_tensors.pt"));
    let whole = ByteView::from_vec(b);
    let item = whole.slice(37..whole.len() as u64).unwrap();
    let f = torch::load(item, &Policy::torch()).unwrap();
    check_against_expected("two_tensors.pt", &f);
}

// ---- bad inputs: clear errors naming the record, no panics ----

#[test]
fn truncated_zip_is_an_error() {
    let mut b = read("two_tensors.pt");
    for cut in [0, 10, 500, 1000, 1900] {
        b.truncate(cut);
        let e = load_bytes(b.clone()).unwrap_err();
        assert!(!e.to_string().is_empty());
    }
    let mut b = read("two_tensors.pt");
    b.truncate(1000);
    let e = load_bytes(b).unwrap_err().to_string();
    assert!(e.contains("no end-of-central-directory"), "{e}");
}

/// Offset of the central entry for `name`.
fn central_of(b: &[u8], name: &[u8]) -> usize {
    (0..b.len() - 4)
        .find(|&i| &b[i..i + 4] == b"PK\x01\x02" && b[i + 46..].starts_with(name))
        .unwrap()
}

#[test]
fn record_running_past_the_end_is_named() {
    let mut b = read("two_tensors.pt");
    let c = central_of(&b, b"two_tensors/data/1");
    b[c + 20..c + 28].copy_from_slice(&[0, 0x10, 0, 0, 0, 0x10, 0, 0]);
    let e = load_bytes(b).unwrap_err().to_string();
    assert!(
        e.starts_with("zip record `two_tensors/data/1` declares 4096 bytes at offset"),
        "{e}"
    );
}

/// two_tensors.pt with data.pkl replaced by `pkl` (same framing, via our writer).
fn with_pickle(pkl: &[u8]) -> Vec<u8> {
    let z = zip::ZipArchive::open(ByteView::from_vec(read("two_tensors.pt"))).unwrap();
    let mut w = zip::ZipWriter::new(Vec::new(), "two_tensors");
    for e in z.entries() {
        let n = e.name.strip_prefix("two_tensors/").unwrap();
        let data = z.payload(e).unwrap();
        w.add(
            n,
            if n == "data.pkl" {
                pkl
            } else {
                data.as_slice()
            },
        )
        .unwrap();
    }
    w.finish().unwrap()
}

#[test]
fn pickle_calling_os_system_is_refused() {
    let e = load_bytes(with_pickle(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.")).unwrap_err();
    assert!(matches!(
        &e,
        file::Error::Pickle {
            source: pickle::Error::UnsupportedGlobal { .. },
            ..
        }
    ));
    assert_eq!(
        e.to_string(),
        "torch file: `two_tensors/data.pkl`: pickle: refusing global os.system at byte 2"
    );
}

#[test]
fn unknown_opcode_and_truncated_pickle_name_the_record() {
    let e = load_bytes(with_pickle(b"\x80\x02\xfe."))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "torch file: `two_tensors/data.pkl`: pickle: unknown opcode 0xfe at byte 2"
    );
    let pkl = &read("two_tensors.pt")[64..64 + 200];
    let e = load_bytes(with_pickle(pkl)).unwrap_err().to_string();
    assert!(
        e.starts_with("torch file: `two_tensors/data.pkl`: pickle: truncated"),
        "{e}"
    );
}

#[test]
fn storage_smaller_than_declared_is_named() {
    let z = zip::ZipArchive::open(ByteView::from_vec(read("two_tensors.pt"))).unwrap();
    let mut w = zip::ZipWriter::new(Vec::new(), "two_tensors");
    for e in z.entries() {
        let n = e.name.strip_prefix("two_tensors/").unwrap();
        let data = z.payload(e).unwrap();
        w.add(
            n,
            if n == "data/1" {
                &data.as_slice()[..8]
            } else {
                data.as_slice()
            },
        )
        .unwrap();
    }
    let e = load_bytes(w.finish().unwrap()).unwrap_err().to_string();
    assert_eq!(
        e,
        "torch file: storage record `two_tensors/data/1` holds 8 bytes but the pickle declares 32"
    );
}

#[test]
fn torchscript_big_endian_and_garbage_are_refused() {
    let mut w = zip::ZipWriter::new(Vec::new(), "m");
    w.add("constants.pkl", b"\x80\x02).").unwrap();
    w.add("data.pkl", b"\x80\x02).").unwrap();
    let e = load_bytes(w.finish().unwrap()).unwrap_err();
    assert!(matches!(e, file::Error::TorchScript { .. }), "{e}");
    let mut w = zip::ZipWriter::new(Vec::new(), "m");
    w.add("data.pkl", b"\x80\x02).").unwrap();
    w.add("byteorder", b"big").unwrap();
    let e = load_bytes(w.finish().unwrap()).unwrap_err();
    assert!(matches!(e, file::Error::BigEndian { .. }), "{e}");
    let e = load_bytes(b"hello world".to_vec()).unwrap_err();
    assert!(e.to_string().contains("not a torch file"), "{e}");
    let mut legacy = read("legacy_nonzip.pt");
    legacy.truncate(legacy.len() - 4);
    let e = load_bytes(legacy).unwrap_err().to_string();
    assert!(e.contains("legacy") && e.contains("declares"), "{e}");
}

/// Writes files for `tests/interop/test_torch_files.py` when
/// `NEMO_TOOL_INTEROP_OUT` names a directory.
#[test]
fn write_interop_files() {
    let Some(dir) = std::env::var_os("NEMO_TOOL_INTEROP_OUT") else {
        return;
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).unwrap();
    for name in ZIP_SAMPLES.iter().chain(&["legacy_nonzip.pt"]) {
        let f = load_bytes(read(name)).unwrap();
        let stem = name.strip_suffix(".pt").unwrap();
        std::fs::write(dir.join(name), save_bytes(stem, &f.root)).unwrap();
    }
    std::fs::write(
        dir.join("composed.pt"),
        save_bytes("composed", &composed_sample()),
    )
    .unwrap();
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    const ALL: &[&str] = &[
        "two_tensors.pt",
        "dtypes.pt",
        "views.pt",
        "nested_values.pt",
        "module_state_dict.pt",
        "te_extra_state.pt",
        "ref_writer_output.pt",
        "minimal_one_tensor.pt",
        "legacy_nonzip.pt",
    ];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Corrupted files give errors, never panics; whatever loads can be read and saved.
        #[test]
        fn corrupted_files_never_panic(
            which in 0..ALL.len(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
            cut in any::<prop::sample::Index>(),
            do_cut in any::<bool>(),
        ) {
            let mut b = read(ALL[which]);
            for (i, x) in flips {
                let i = i.index(b.len());
                b[i] = x;
            }
            if do_cut {
                b.truncate(cut.index(b.len()));
            }
            if let Ok(f) = load_bytes(b) {
                for (_, t) in f.tensors() {
                    let _ = t.to_vec();
                }
                let _ = torch::save(Vec::new(), "archive", &f.root);
            }
        }
    }
}

#[test]
fn load_file_maps_and_bad_archive_names_are_refused() {
    let f = torch::load_file(&samples().join("pt/views.pt"), &Policy::torch()).unwrap();
    assert!(f.tensors()[0].1.storage.bytes.is_mapped());
    assert_eq!(f.archive_name, "views");
    let e = torch::load_file(&samples().join("pt/nope.pt"), &Policy::torch()).unwrap_err();
    assert!(matches!(e, file::Error::Io { .. }), "{e}");
    for bad in ["", "a/b"] {
        let e = torch::save(Vec::new(), bad, &Value::None).unwrap_err();
        assert!(matches!(e, file::Error::BadArchiveName { .. }), "{e}");
    }
}

/// Every item of the plain DCP sample is a torch.save stream at an arbitrary
/// offset of `__0_0.distcp`; each loads in place.
#[test]
fn dcp_items_load_in_place() {
    let dir = samples().join("dcp/plain_single_rank");
    let pol = Policy::torch()
        .allow_module_prefix("torch.distributed.checkpoint.")
        .allow_module_prefix("pathlib.");
    let md = pickle::parse(&std::fs::read(dir.join(".metadata")).unwrap(), &pol).unwrap();
    let md = md.as_object().unwrap();
    let data = ByteView::from_vec(std::fs::read(dir.join("__0_0.distcp")).unwrap());
    let mut seen = Vec::new();
    for (idx, info) in md.field("storage_data").unwrap().dict_items().unwrap() {
        let fqn = idx
            .as_object()
            .unwrap()
            .field("fqn")
            .unwrap()
            .as_str()
            .unwrap();
        let info = info.as_object().unwrap();
        let off = info.field("offset").unwrap().as_int().unwrap() as u64;
        let len = info.field("length").unwrap().as_int().unwrap() as u64;
        let f = torch::load(data.slice_len(off, len).unwrap(), &Policy::torch()).unwrap();
        match fqn {
            "w" => assert_eq!(
                values(f.root.as_tensor().unwrap()),
                [0., 1., 2., 3., 4., 5.]
            ),
            "b" => assert_eq!(values(f.root.as_tensor().unwrap()), [1.5, -1.5]),
            "nested.x" => assert_eq!(values(f.root.as_tensor().unwrap()), [1., 2., 3.]),
            "step" => assert_eq!(f.root, Value::Int(7)),
            "nested.name" => assert_eq!(f.root, Value::Str("abc".into())),
            other => panic!("unexpected item {other}"),
        }
        seen.push(fqn.to_string());
    }
    seen.sort();
    assert_eq!(seen, ["b", "nested.name", "nested.x", "step", "w"]);
}
