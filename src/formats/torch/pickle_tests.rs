//! Tests for the pickle reader: one per opcode family and per error variant.

use super::*;

fn p(bytes: &[u8]) -> Result<Value, Error> {
    parse(bytes, &Policy::torch())
}

fn s(x: &str) -> Value {
    Value::Str(x.to_string())
}

/// `PROTO 2` + body + `STOP`.
fn p2(body: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, 2];
    v.extend_from_slice(body);
    v.push(b'.');
    v
}

#[test]
fn ints_of_every_width() {
    assert_eq!(p(&p2(b"K\x07")), Ok(Value::Int(7)));
    assert_eq!(p(&p2(b"M\x2c\x01")), Ok(Value::Int(300)));
    assert_eq!(p(&p2(b"J\xff\xff\xff\xff")), Ok(Value::Int(-1)));
    assert_eq!(
        p(&p2(b"\x8a\x06\x00\x00\x00\x00\x00\x01")),
        Ok(Value::Int(1 << 40))
    );
    assert_eq!(
        p(&p2(b"\x8a\x06\x00\x00\x00\x00\x00\xff")),
        Ok(Value::Int(-(1 << 40)))
    );
    assert_eq!(p(&p2(b"\x8a\x00")), Ok(Value::Int(0)));
    let big = b"\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\x01";
    assert_eq!(
        p(&p2(big)),
        Ok(Value::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1]))
    );
    assert_eq!(p(&p2(b"\x8b\x01\x00\x00\x00\x05")), Ok(Value::Int(5)));
    assert_eq!(p(b"I42\n."), Ok(Value::Int(42)));
    assert_eq!(p(b"I01\n."), Ok(Value::Bool(true)));
    assert_eq!(p(b"L-3L\n."), Ok(Value::Int(-3)));
}

#[test]
fn floats_and_constants() {
    let mut b = vec![b'G'];
    b.extend_from_slice(&1.25f64.to_be_bytes());
    assert_eq!(p(&p2(&b)), Ok(Value::Float(1.25)));
    assert_eq!(p(b"F0.5\n."), Ok(Value::Float(0.5)));
    assert_eq!(p(&p2(b"N")), Ok(Value::None));
    assert_eq!(p(&p2(b"\x88")), Ok(Value::Bool(true)));
    assert_eq!(p(&p2(b"\x89")), Ok(Value::Bool(false)));
}

#[test]
fn strings_and_bytes() {
    assert_eq!(p(&p2(b"X\x02\x00\x00\x00hi")), Ok(s("hi")));
    assert_eq!(p(&p2(b"\x8c\x03h\xc3\xa9")), Ok(s("h\u{e9}")));
    assert_eq!(p(&p2(b"\x8d\x01\x00\x00\x00\x00\x00\x00\x00z")), Ok(s("z")));
    assert_eq!(p(b"Vh\\u00e9\n."), Ok(s("h\u{e9}")));
    assert_eq!(p(b"S'ab'\n."), Ok(Value::Bytes(b"ab".to_vec())));
    assert_eq!(
        p(&p2(b"T\x01\x00\x00\x00a")),
        Ok(Value::Bytes(b"a".to_vec()))
    );
    assert_eq!(p(&p2(b"U\x01a")), Ok(Value::Bytes(b"a".to_vec())));
    assert_eq!(
        p(&p2(b"B\x02\x00\x00\x00\x00\xff")),
        Ok(Value::Bytes(vec![0, 255]))
    );
    assert_eq!(p(&p2(b"C\x01\x07")), Ok(Value::Bytes(vec![7])));
    assert_eq!(
        p(&p2(b"\x8e\x01\x00\x00\x00\x00\x00\x00\x00\x07")),
        Ok(Value::Bytes(vec![7]))
    );
    assert_eq!(
        p(&p2(b"\x96\x01\x00\x00\x00\x00\x00\x00\x00\x07")),
        Ok(Value::Bytes(vec![7]))
    );
}

#[test]
fn tuples_lists_dicts_sets() {
    let one = Value::Int(1);
    let two = Value::Int(2);
    assert_eq!(p(&p2(b")")), Ok(Value::Tuple(vec![])));
    assert_eq!(p(&p2(b"K\x01\x85")), Ok(Value::Tuple(vec![one.clone()])));
    assert_eq!(
        p(&p2(b"K\x01K\x02\x86")),
        Ok(Value::Tuple(vec![one.clone(), two.clone()]))
    );
    assert_eq!(
        p(&p2(b"K\x01K\x02K\x01\x87")),
        Ok(Value::Tuple(vec![one.clone(), two.clone(), one.clone()]))
    );
    assert_eq!(
        p(&p2(b"(K\x01K\x02t")),
        Ok(Value::Tuple(vec![one.clone(), two.clone()]))
    );
    assert_eq!(
        p(&p2(b"]K\x01a(K\x02K\x01e")),
        Ok(Value::List(vec![one.clone(), two.clone(), one.clone()]))
    );
    assert_eq!(p(b"(K\x01l."), Ok(Value::List(vec![one.clone()])));
    assert_eq!(
        p(&p2(b"}K\x01K\x02s(K\x02K\x01u")),
        Ok(Value::Dict(vec![
            (one.clone(), two.clone()),
            (two.clone(), one.clone())
        ]))
    );
    assert_eq!(
        p(b"(K\x01K\x02d."),
        Ok(Value::Dict(vec![(one.clone(), two.clone())]))
    );
    assert_eq!(
        p(&p2(b"\x8f(K\x01K\x02\x90")),
        Ok(Value::Set(vec![one.clone(), two.clone()]))
    );
    assert_eq!(p(&p2(b"(K\x01\x91")), Ok(Value::Set(vec![one])));
}

#[test]
fn stack_ops_pop_dup_popmark() {
    assert_eq!(p(&p2(b"K\x01K\x020")), Ok(Value::Int(1)));
    assert_eq!(p(&p2(b"K\x01(K\x02K\x031")), Ok(Value::Int(1)));
    assert_eq!(
        p(&p2(b"K\x012\x86")),
        Ok(Value::Tuple(vec![Value::Int(1), Value::Int(1)]))
    );
}

#[test]
fn memo_put_get_and_memoize() {
    let two = |v: Value| Ok(Value::Tuple(vec![v.clone(), v]));
    assert_eq!(p(&p2(b"K\x05q\x00h\x00\x86")), two(Value::Int(5)));
    assert_eq!(
        p(&p2(b"K\x05r\x01\x00\x00\x00j\x01\x00\x00\x00\x86")),
        two(Value::Int(5))
    );
    assert_eq!(p(&p2(b"K\x05\x94h\x00\x86")), two(Value::Int(5)));
    assert_eq!(p(b"I5\np3\ng3\n\x86."), two(Value::Int(5)));
}

#[test]
fn build_after_memoize_is_seen_through_binget() {
    // obj = SimpleNamespace-like NEWOBJ, memoized, then (obj, obj) with BUILD in between.
    let pk = p2(b"\x8c\x07pathlib\x8c\x04Path\x93)\x81\x94}\x8c\x01aK\x01sbh\x00\x86");
    let pol = Policy::empty().allow_module_prefix("pathlib.");
    let v = parse(&pk, &pol).unwrap();
    let items = v.as_seq().unwrap();
    for it in items {
        let o = it.as_object().unwrap();
        assert_eq!(o.class, Global::new("pathlib", "Path"));
        assert_eq!(o.how, Construct::NewObj);
        assert_eq!(o.field("a"), Some(&Value::Int(1)));
    }
}

#[test]
fn setitems_into_memoized_dict_are_shared() {
    // d = {}; memo; d['k'] = 1 later; result (d, d)
    let v = p(&p2(b"}q\x00h\x00X\x01\x00\x00\x00kK\x01s\x86")).unwrap();
    let want = Value::Dict(vec![(s("k"), Value::Int(1))]);
    assert_eq!(v, Value::Tuple(vec![want.clone(), want]));
}

#[test]
fn globals_reduce_newobj_build() {
    // OrderedDict() with items and a _metadata BUILD, as state_dict() writes it.
    let v = p(&p2(
        b"ccollections\nOrderedDict\nq\x00)Rq\x01(X\x01\x00\x00\x00aK\x01u}X\x09\x00\x00\x00_metadata}sb",
    ))
    .unwrap();
    let o = v.as_object().unwrap();
    assert!(o.class.is("collections", "OrderedDict"));
    assert_eq!(o.how, Construct::Reduce);
    assert_eq!(o.items, vec![(s("a"), Value::Int(1))]);
    assert_eq!(v.get("a"), Some(&Value::Int(1)));
    assert_eq!(o.field("_metadata"), Some(&Value::Dict(vec![])));

    // __builtin__ is mapped to builtins; set/bytes spelled as calls fold to data.
    assert_eq!(
        p(&p2(b"c__builtin__\nset\n]K\x01a\x85R")),
        Ok(Value::Set(vec![Value::Int(1)]))
    );
    assert_eq!(p(&p2(b"c__builtin__\nbytes\n)R")), Ok(Value::Bytes(vec![])));
    assert_eq!(
        p(&p2(
            b"c_codecs\nencode\nX\x03\x00\x00\x00a\xc3\xbfX\x06\x00\x00\x00latin1\x86R"
        )),
        Ok(Value::Bytes(vec![b'a', 0xff]))
    );
    let v = p(&p2(b"c__builtin__\nbytearray\n)R")).unwrap();
    assert!(v.as_object().unwrap().class.is("builtins", "bytearray"));

    // STACK_GLOBAL + NEWOBJ_EX
    let v = p(&p2(b"\x8c\x03_io\x8c\x07BytesIO\x93)}\x92")).unwrap();
    let o = v.as_object().unwrap();
    assert!(o.class.is("_io", "BytesIO"));
    assert_eq!(o.how, Construct::NewObjEx);
    assert_eq!(o.kwargs, Some(Value::Dict(vec![])));

    // protocol-0 INST and OBJ
    let v = p(b"(I1\nicollections\nOrderedDict\n.").unwrap();
    assert_eq!(v.as_object().unwrap().args, vec![Value::Int(1)]);
    let v = p(b"(ccollections\nOrderedDict\nI2\no.").unwrap();
    assert_eq!(v.as_object().unwrap().args, vec![Value::Int(2)]);
    // bare global
    assert_eq!(
        p(&p2(b"ctorch\nbfloat16\n")),
        Ok(Value::Global(Global::new("torch", "bfloat16")))
    );
}

#[test]
fn frame_and_persistent_ids() {
    let v = p(b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00(X\x07\x00\x00\x00storageK\x01tQ.")
        .unwrap();
    assert_eq!(
        v,
        Value::PersId(Box::new(Value::Tuple(vec![s("storage"), Value::Int(1)])))
    );
    assert_eq!(p(b"Pabc\n."), Ok(Value::PersId(Box::new(s("abc")))));
}

#[test]
fn reads_torch_written_data_pkl() {
    // two_tensors/data.pkl: payload at offset 64, 246 bytes (torch-formats.md §5.1).
    let f = include_bytes!("../../../fixtures/torch-samples/pt/two_tensors.pt");
    let v = p(&f[64..64 + 246]).unwrap();
    let o = v.as_object().unwrap();
    assert!(o.class.is("collections", "OrderedDict"));
    assert_eq!(o.items.len(), 2);
    let b = v.get("b").unwrap().as_object().unwrap();
    assert!(b.class.is("torch._utils", "_rebuild_tensor_v2"));
    let Value::PersId(id) = &b.args[0] else {
        panic!("no persid")
    };
    assert_eq!(
        **id,
        Value::Tuple(vec![
            s("storage"),
            Value::Global(Global::new("torch", "LongStorage")),
            s("1"),
            s("cpu"),
            Value::Int(4)
        ])
    );
    assert_eq!(
        &b.args[1..4],
        &[
            Value::Int(0),
            Value::Tuple(vec![Value::Int(2), Value::Int(2)]),
            Value::Tuple(vec![Value::Int(2), Value::Int(1)])
        ]
    );
}

#[test]
fn parse_prefix_reports_consumed_bytes() {
    let (v, n) = parse_prefix(b"K\x01.K\x02.", &Policy::torch()).unwrap();
    assert_eq!((v, n), (Value::Int(1), 3));
}

// ---- policy ----

#[test]
fn policy_torch_set_and_extensions() {
    let t = Policy::torch();
    for (m, n) in [
        ("collections", "OrderedDict"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch", "BFloat16Storage"),
        ("torch.storage", "UntypedStorage"),
        ("torch", "float8_e4m3fn"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("_codecs", "encode"),
        ("builtins", "bytes"),
        ("_io", "BytesIO"),
        ("torch._tensor", "_rebuild_from_type_v2"),
    ] {
        assert!(t.allows(m, n), "{m}.{n}");
    }
    assert!(!t.allows("torch", "load"));
    assert!(!t.allows("builtins", "eval"));
    assert!(!t.allows("megatron.core.x", "Y"));
    let d = Policy::torch()
        .allow_module_prefix("megatron.core.")
        .allow_module_prefix("enum.")
        .allow_global("argparse", "Namespace");
    assert!(d.allows("megatron.core.dist_checkpointing.x", "Y"));
    assert!(d.allows("enum", "Enum"));
    assert!(!d.allows("megatron.corex", "Y"));
    assert!(d.allows("argparse", "Namespace"));
    // blocked modules stay blocked whatever the caller adds
    let bad = Policy::empty()
        .allow_module_prefix("os.")
        .allow_global("os", "system");
    assert!(!bad.allows("os", "system"));
}

// ---- one test per error variant ----

#[test]
fn refuses_os_system() {
    let pk = b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.";
    let e = p(pk).unwrap_err();
    assert_eq!(
        e,
        Error::UnsupportedGlobal {
            module: "os".into(),
            name: "system".into(),
            offset: 2
        }
    );
    assert_eq!(e.to_string(), "pickle: refusing global os.system at byte 2");
    // the same through STACK_GLOBAL, and via the Python 2 spelling of builtins
    let pk = b"\x80\x04\x8c\x02os\x8c\x06system\x93.";
    assert!(matches!(
        p(pk),
        Err(Error::UnsupportedGlobal { offset: 14, .. })
    ));
    let pk = b"\x80\x02c__builtin__\neval\n.";
    assert!(
        matches!(p(pk), Err(Error::UnsupportedGlobal { ref module, .. }) if module == "builtins")
    );
}

#[test]
fn truncated_pickle() {
    assert_eq!(
        p(b"\x80\x02J\x01\x00"),
        Err(Error::Truncated {
            offset: 2,
            opcode: b'J',
            need: 2
        })
    );
    // no STOP
    assert!(matches!(
        p(b"\x80\x02K\x01"),
        Err(Error::Truncated {
            opcode: 0,
            offset: 4,
            ..
        })
    ));
    assert!(matches!(p(b""), Err(Error::Truncated { .. })));
}

#[test]
fn unknown_opcode() {
    assert_eq!(
        p(b"\x80\x02\xff."),
        Err(Error::UnknownOpcode {
            offset: 2,
            opcode: 0xff
        })
    );
}

#[test]
fn unsupported_opcode() {
    assert!(matches!(
        p(b"\x80\x02\x82\x01."),
        Err(Error::UnsupportedOpcode { name: "EXT1", .. })
    ));
}

#[test]
fn stack_underflow() {
    assert_eq!(
        p(b"\x80\x02\x86."),
        Err(Error::StackUnderflow {
            offset: 2,
            opcode: 0x86
        })
    );
    // items below a MARK are not reachable
    assert!(matches!(p(b"K\x01(a."), Err(Error::StackUnderflow { .. })));
    assert!(matches!(p(b"K\x01t."), Err(Error::StackUnderflow { .. })));
}

#[test]
fn bad_memo() {
    assert_eq!(
        p(b"\x80\x02h\x03."),
        Err(Error::BadMemo {
            offset: 2,
            opcode: b'h',
            index: 3
        })
    );
}

#[test]
fn too_long_string_is_rejected_before_reading() {
    assert_eq!(
        p(b"\x80\x02X\xff\xff\xff\xffab."),
        Err(Error::TooLong {
            offset: 2,
            opcode: b'X',
            len: 0xffff_ffff,
            remaining: 3
        })
    );
}

#[test]
fn limits_on_depth_cycles_and_blowup() {
    // 300 nested lists
    let mut b = vec![0x80, 2];
    b.extend(std::iter::repeat_n(b']', 300));
    b.extend(std::iter::repeat_n(b'a', 299));
    b.push(b'.');
    assert!(matches!(
        p(&b),
        Err(Error::Limit {
            what: "nesting depth",
            ..
        })
    ));
    // a list containing itself
    assert!(matches!(
        p(b"\x80\x02]q\x00h\x00a."),
        Err(Error::Limit {
            what: "nesting depth",
            ..
        })
    ));
    // 2^40 nodes through shared references
    let mut b = vec![0x80, 2, b']', b'q', 0];
    for k in 1..41u8 {
        b.extend_from_slice(&[b']', b'(', b'h', k - 1, b'h', k - 1, b'e', b'q', k]);
    }
    b.push(b'.');
    assert!(matches!(
        p(&b),
        Err(Error::Limit {
            what: "output nodes",
            ..
        })
    ));
    // 200k nested lists: refused, and dropping the graph must not overflow the stack
    let mut b = vec![0x80, 2];
    b.extend(std::iter::repeat_n(b']', 200_000));
    b.extend(std::iter::repeat_n(b'a', 199_999));
    b.push(b'.');
    assert!(matches!(
        p(&b),
        Err(Error::Limit {
            what: "nesting depth",
            ..
        })
    ));
}

#[test]
fn reads_dcp_metadata_with_extended_policy() {
    let pol = Policy::torch()
        .allow_module_prefix("torch.distributed.checkpoint.")
        .allow_module_prefix("torch.distributed._shard.")
        .allow_module_prefix("megatron.core.")
        .allow_module_prefix("pathlib.")
        .allow_module_prefix("enum.");
    for dir in [
        "plain_single_rank",
        "megatron_core_v0.13.0_tp2",
        "megatron_core_v0.19.0_tp2",
    ] {
        let path = format!(
            "{}/fixtures/torch-samples/dcp/{dir}/.metadata",
            env!("CARGO_MANIFEST_DIR")
        );
        let bytes = std::fs::read(&path).unwrap();
        let v = parse(&bytes, &pol).unwrap();
        let md = v.as_object().unwrap();
        assert_eq!(md.class.name, "Metadata", "{dir}");
        let sdm = md
            .field("state_dict_metadata")
            .unwrap()
            .dict_items()
            .unwrap();
        assert!(!sdm.is_empty());
        let storage = md.field("storage_data").unwrap().dict_items().unwrap();
        // object keys: MetadataIndex with an fqn field
        assert!(storage
            .iter()
            .all(|(k, _)| k.as_object().and_then(|o| o.field("fqn")).is_some()));
        // and the torch-only policy refuses it
        assert!(matches!(
            parse(&bytes, &Policy::torch()),
            Err(Error::UnsupportedGlobal { .. })
        ));
    }
}

#[test]
fn bad_operands() {
    assert!(matches!(
        p(b"\x80\x02}K\x01a."),
        Err(Error::BadOperand { opcode: b'a', .. })
    ));
    assert!(matches!(
        p(b"\x80\x02X\x01\x00\x00\x00\xff."),
        Err(Error::BadOperand { opcode: b'X', .. })
    ));
    assert!(matches!(
        p(b"\x80\x02K\x01)R."),
        Err(Error::BadOperand { opcode: b'R', .. })
    ));
    assert!(matches!(p(b"\x80\x09."), Err(Error::BadOperand { .. })));
}

mod no_panic {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        /// Arbitrary bytes (biased towards real opcodes) give a value or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            body in prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    prop::sample::select(b"()]}tlde.asuqhjrpgKMJNXRbQ\x85\x86\x87\x88\x89\x8a\x8c\x93\x94\x95\x8f\x90\x91\x810122".to_vec()),
                ],
                0..96,
            )
        ) {
            let _ = parse(&body, &Policy::torch());
        }

        /// Mutated DCP metadata: never a panic.
        #[test]
        fn mutated_metadata_never_panics(
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        ) {
            let path = format!(
                "{}/fixtures/torch-samples/dcp/plain_single_rank/.metadata",
                env!("CARGO_MANIFEST_DIR")
            );
            let mut b = std::fs::read(path).unwrap();
            for (i, x) in flips {
                let i = i.index(b.len());
                b[i] = x;
            }
            let _ = parse(&b, &Policy::torch().allow_module_prefix("torch.").allow_module_prefix("pathlib."));
        }
    }
}
