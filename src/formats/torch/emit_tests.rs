//! Tests for the pickle emitter: exact bytes for torch's layouts, and a
//! proptest round trip emit -> parse.

use super::*;
use crate::formats::torch::pickle::{parse, Policy};
use crate::formats::torch::Dtype;
use crate::io::bytes::ByteView;
use proptest::prelude::*;

fn round(v: &Value) -> Value {
    let e = emit(v).unwrap();
    parse(&e.pickle, &Policy::torch()).unwrap()
}

#[test]
fn minimal_one_tensor_pickle_matches_the_reference_bytes() {
    // torch-formats.md §5.2 (hex of data.pkl)
    let want = hex::decode(concat!(
        "80027d58010000007763746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a2828580700000073",
        "746f7261676563746f7263680a466c6f617453746f726167650a58010000003058030000006370754b0274514b004b02854b",
        "01858963636f6c6c656374696f6e730a4f726465726564446963740a29527452732e"
    ))
    .unwrap();
    let bytes: Vec<u8> = [1f32, 2.0].iter().flat_map(|f| f.to_le_bytes()).collect();
    let st = StorageRef::from_view("whatever", ByteView::from_vec(bytes));
    let t = TensorRef::contiguous(Dtype::F32, vec![2], st).unwrap();
    let root = Value::Dict(vec![(Value::Str("w".into()), Value::Tensor(Box::new(t)))]);
    let e = emit(&root).unwrap();
    assert_eq!(hex::encode(&e.pickle), hex::encode(&want));
    assert_eq!(e.storages.len(), 1);
    assert_eq!(e.storages[0].key, "0");
}

#[test]
fn ints_use_minimal_opcodes() {
    let cases: &[(i64, &[u8])] = &[
        (7, b"K\x07"),
        (300, b"M\x2c\x01"),
        (70000, b"J\x70\x11\x01\x00"),
        (-1, b"J\xff\xff\xff\xff"),
        (1 << 40, b"\x8a\x06\x00\x00\x00\x00\x00\x01"),
        (-(1 << 40), b"\x8a\x06\x00\x00\x00\x00\x00\xff"),
        (i64::MIN, b"\x8a\x08\x00\x00\x00\x00\x00\x00\x00\x80"),
    ];
    for (v, want) in cases {
        let e = emit(&Value::Int(*v)).unwrap();
        assert_eq!(&e.pickle[2..e.pickle.len() - 1], *want, "{v}");
        assert_eq!(round(&Value::Int(*v)), Value::Int(*v));
    }
}

#[test]
fn bytes_are_written_as_torch_does() {
    let e = emit(&Value::Bytes(vec![0, 0xff])).unwrap();
    assert_eq!(
        &e.pickle[2..],
        b"c_codecs\nencode\nX\x03\x00\x00\x00\x00\xc3\xbfX\x06\x00\x00\x00latin1\x86R."
    );
    let e = emit(&Value::Bytes(vec![])).unwrap();
    assert_eq!(&e.pickle[2..], b"c__builtin__\nbytes\n)R.");
}

#[test]
fn shared_storages_keep_one_key_and_new_dtypes_use_v3() {
    let bytes = ByteView::from_vec(vec![0u8; 8]);
    let a = TensorRef::contiguous(
        Dtype::F32,
        vec![2],
        StorageRef::from_view("7", bytes.clone()),
    )
    .unwrap();
    let mut b = a.clone();
    b.shape = vec![1];
    b.storage_offset = 1;
    let c = TensorRef::contiguous(Dtype::U16, vec![4], StorageRef::from_view("9", bytes)).unwrap();
    let root = Value::List(vec![
        Value::Tensor(Box::new(c)),
        Value::Tensor(Box::new(a)),
        Value::Tensor(Box::new(b)),
    ]);
    let e = emit(&root).unwrap();
    assert_eq!(
        e.storages
            .iter()
            .map(|s| s.key.as_str())
            .collect::<Vec<_>>(),
        ["0", "1"]
    );
    let v = parse(&e.pickle, &Policy::torch()).unwrap();
    let items = v.as_seq().unwrap();
    let c = items[0].as_object().unwrap();
    assert!(c.class.is("torch._utils", "_rebuild_tensor_v3"));
    assert_eq!(c.args[6], Value::Global(Global::new("torch", "uint16")));
    let Value::PersId(id) = &c.args[0] else {
        panic!()
    };
    assert_eq!(
        id.as_seq().unwrap()[1],
        Value::Global(Global::new("torch.storage", "UntypedStorage"))
    );
    assert_eq!(id.as_seq().unwrap()[4], Value::Int(8)); // bytes for v3
    for t in &items[1..] {
        let Value::PersId(id) = &t.as_object().unwrap().args[0] else {
            panic!()
        };
        assert_eq!(id.as_seq().unwrap()[2], Value::Str("1".into()));
        assert_eq!(id.as_seq().unwrap()[4], Value::Int(2)); // elements for v2
    }
}

#[test]
fn parameters_and_subclasses_wrap_the_tensor() {
    let st = StorageRef::from_view("0", ByteView::from_vec(vec![0u8; 4]));
    let mut t = TensorRef::contiguous(Dtype::F32, vec![1], st).unwrap();
    t.kind = TensorKind::Parameter { state: None };
    t.requires_grad = true;
    let v = round(&Value::Tensor(Box::new(t.clone())));
    let o = v.as_object().unwrap();
    assert!(o.class.is("torch._utils", "_rebuild_parameter"));
    assert_eq!(o.args[1], Value::Bool(true));
    assert_eq!(o.args[0].as_object().unwrap().args[4], Value::Bool(false));
    t.kind = TensorKind::FromType {
        class: Global::new("torch.nn.parameter", "Parameter"),
        state: Box::new(Value::Dict(vec![])),
    };
    let v = round(&Value::Tensor(Box::new(t)));
    let o = v.as_object().unwrap();
    assert!(o.class.is("torch._tensor", "_rebuild_from_type_v2"));
    assert_eq!(o.args.len(), 4);
    assert!(o.args[0]
        .as_global()
        .unwrap()
        .is("torch._utils", "_rebuild_tensor_v2"));
    assert_eq!(o.args[2].as_seq().unwrap().len(), 6);
}

#[test]
fn unsupported_values_are_refused() {
    let mut o = Object::new(Global::new("enum", "E"), Construct::NewObjEx, vec![]);
    o.kwargs = Some(Value::Dict(vec![(Value::Str("a".into()), Value::Int(1))]));
    assert!(matches!(
        emit(&Value::Object(Box::new(o))),
        Err(Error::Unsupported { .. })
    ));
    assert!(matches!(
        emit(&Value::BigInt(vec![1; 300])),
        Err(Error::Unsupported { .. })
    ));
    let st = StorageRef::from_view("0", ByteView::from_vec(vec![0u8; 4]));
    let mut t = TensorRef::contiguous(Dtype::F32, vec![1], st).unwrap();
    t.shape = vec![2];
    assert!(matches!(
        emit(&Value::Tensor(Box::new(t))),
        Err(Error::Tensor(_))
    ));
    let mut deep = Value::None;
    for _ in 0..MAX_DEPTH + 2 {
        deep = Value::List(vec![deep]);
    }
    assert!(matches!(emit(&deep), Err(Error::TooDeep)));
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        prop::collection::vec(any::<u8>(), 9..20).prop_map(|b| Value::from_le_signed(&b)),
        any::<f64>()
            .prop_filter("NaN != NaN", |f| !f.is_nan())
            .prop_map(Value::Float),
        ".*".prop_map(Value::Str),
        prop::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
        Just(Value::Global(Global::new("torch", "bfloat16"))),
        Just(Value::Global(Global::new("builtins", "set"))),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Tuple),
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Set),
            prop::collection::vec((inner.clone(), inner.clone()), 0..5).prop_map(Value::Dict),
            inner.clone().prop_map(|v| Value::PersId(Box::new(v))),
            (
                prop::collection::vec((inner.clone(), inner.clone()), 0..4),
                prop::option::of(inner.clone()),
                prop::collection::vec(inner.clone(), 0..3)
            )
                .prop_map(|(items, state, args)| {
                    let mut o = Object::new(
                        Global::new("collections", "OrderedDict"),
                        Construct::Reduce,
                        args,
                    );
                    o.items = items;
                    o.state = state;
                    Value::Object(Box::new(o))
                }),
            (prop::collection::vec(inner.clone(), 0..3), inner).prop_map(|(args, state)| {
                let mut o = Object::new(Global::new("_io", "BytesIO"), Construct::NewObj, args);
                o.state = Some(state);
                Value::Object(Box::new(o))
            }),
        ]
    })
}

proptest! {
    #[test]
    fn emit_then_parse_round_trips(v in value()) {
        prop_assert_eq!(round(&v), v);
    }
}
