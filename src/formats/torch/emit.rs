//! A protocol-2, memo-free pickle emitter that uses only the opcodes torch's
//! `weights_only` unpickler accepts (torch-formats.md §2.2), so every file we
//! write loads under `torch.load(weights_only=True)` as long as the values'
//! globals are in torch's allowlist.
//!
//! Tensors are written as torch does: `_rebuild_tensor_v2` with a legacy
//! `torch.<X>Storage` persistent id, or `_rebuild_tensor_v3` with
//! `torch.storage.UntypedStorage` (numel in bytes) for dtypes without a
//! legacy storage class (uint16/32/64, float8). Storages get keys `"0"`,
//! `"1"`, ... in order of first use; see [`Emitted::storages`].

use std::collections::HashMap;

use crate::formats::torch::tensor::{self, StorageRef, TensorKind, TensorRef};
use crate::formats::torch::value::{Construct, Global, Object, Value};

/// Deepest nesting the emitter accepts.
pub const MAX_DEPTH: usize = 256;

/// Why a value could not be written.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A value protocol 2 / weights_only cannot express.
    #[error("pickle emit: cannot write {what}")]
    Unsupported {
        /// What it was.
        what: String,
    },
    /// A tensor view that does not fit its storage.
    #[error("pickle emit: {0}")]
    Tensor(#[from] tensor::Error),
    /// Nesting deeper than [`MAX_DEPTH`].
    #[error("pickle emit: nesting deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// The pickle bytes and the storages it refers to.
#[derive(Debug)]
pub struct Emitted {
    /// `data.pkl` content.
    pub pickle: Vec<u8>,
    /// Storages in key order: `storages[i].key == i.to_string()`.
    pub storages: Vec<StorageRef>,
}

/// Pickles `root` (protocol 2, no memo).
///
/// # Errors
/// [`Error::Unsupported`] for `NEWOBJ_EX` with keyword arguments or ints
/// wider than 255 bytes; [`Error::Tensor`] for views outside their storage.
pub fn emit(root: &Value) -> Result<Emitted, Error> {
    let mut e = Emitter {
        out: vec![0x80, 2],
        storages: Vec::new(),
        keys: HashMap::new(),
    };
    e.value(root, 0)?;
    e.out.push(b'.');
    Ok(Emitted {
        pickle: e.out,
        storages: e.storages,
    })
}

/// Identity of a source storage: its key plus, for plain storages, the bytes it views.
type StorageId = (String, usize, usize, bool);

struct Emitter {
    out: Vec<u8>,
    storages: Vec<StorageRef>,
    keys: HashMap<StorageId, usize>,
}

const BATCH: usize = 1000;

impl Emitter {
    fn op(&mut self, b: u8) {
        self.out.push(b);
    }

    fn global(&mut self, module: &str, name: &str) {
        // Protocol 2 writes Python 2 module spellings, as CPython does.
        let module = match module {
            "builtins" => "__builtin__",
            "copyreg" => "copy_reg",
            m => m,
        };
        self.op(b'c');
        self.out.extend_from_slice(module.as_bytes());
        self.op(b'\n');
        self.out.extend_from_slice(name.as_bytes());
        self.op(b'\n');
    }

    fn str(&mut self, s: &str) {
        self.op(b'X');
        self.out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.out.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: i64) {
        if (0..256).contains(&v) {
            self.op(b'K');
            self.op(v as u8);
        } else if (0..65536).contains(&v) {
            self.op(b'M');
            self.out.extend_from_slice(&(v as u16).to_le_bytes());
        } else if i32::try_from(v).is_ok() {
            self.op(b'J');
            self.out.extend_from_slice(&(v as i32).to_le_bytes());
        } else {
            let mut b = v.to_le_bytes().to_vec();
            while b.len() > 1 {
                let (last, prev) = (b[b.len() - 1], b[b.len() - 2]);
                if (last == 0 && prev < 0x80) || (last == 0xff && prev >= 0x80) {
                    b.pop();
                } else {
                    break;
                }
            }
            self.long1(&b);
        }
    }

    fn long1(&mut self, b: &[u8]) {
        self.op(0x8a);
        self.op(b.len() as u8);
        self.out.extend_from_slice(b);
    }

    fn uint(&mut self, v: u64) -> Result<(), Error> {
        match i64::try_from(v) {
            Ok(i) => self.int(i),
            Err(_) => {
                let mut b = v.to_le_bytes().to_vec();
                b.push(0);
                self.long1(&b);
            }
        }
        Ok(())
    }

    fn tuple(&mut self, items: &[Value], depth: usize) -> Result<(), Error> {
        match items.len() {
            0 => self.op(b')'),
            n @ 1..=3 => {
                for v in items {
                    self.value(v, depth + 1)?;
                }
                self.op(0x84 + n as u8);
            }
            _ => {
                self.op(b'(');
                for v in items {
                    self.value(v, depth + 1)?;
                }
                self.op(b't');
            }
        }
        Ok(())
    }

    fn appends(&mut self, items: &[Value], depth: usize) -> Result<(), Error> {
        for chunk in items.chunks(BATCH) {
            if let [one] = chunk {
                self.value(one, depth + 1)?;
                self.op(b'a');
            } else {
                self.op(b'(');
                for v in chunk {
                    self.value(v, depth + 1)?;
                }
                self.op(b'e');
            }
        }
        Ok(())
    }

    fn setitems(&mut self, items: &[(Value, Value)], depth: usize) -> Result<(), Error> {
        for chunk in items.chunks(BATCH) {
            if let [(k, v)] = chunk {
                self.value(k, depth + 1)?;
                self.value(v, depth + 1)?;
                self.op(b's');
            } else {
                self.op(b'(');
                for (k, v) in chunk {
                    self.value(k, depth + 1)?;
                    self.value(v, depth + 1)?;
                }
                self.op(b'u');
            }
        }
        Ok(())
    }

    fn value(&mut self, v: &Value, depth: usize) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err(Error::TooDeep);
        }
        match v {
            Value::None => self.op(b'N'),
            Value::Bool(true) => self.op(0x88),
            Value::Bool(false) => self.op(0x89),
            Value::Int(i) => self.int(*i),
            Value::BigInt(b) => {
                if b.len() > 255 {
                    return Err(Error::Unsupported {
                        what: format!(
                            "an int of {} bytes (LONG4 is not weights_only-safe)",
                            b.len()
                        ),
                    });
                }
                self.long1(b)
            }
            Value::Float(f) => {
                self.op(b'G');
                self.out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Str(s) => self.str(s),
            Value::Bytes(b) if b.is_empty() => {
                // what CPython writes for b"" under protocol 2
                self.global("builtins", "bytes");
                self.op(b')');
                self.op(b'R');
            }
            Value::Bytes(b) => {
                // _codecs.encode(<bytes as latin-1 text>, 'latin1'), as torch/CPython do
                self.global("_codecs", "encode");
                let text: String = b.iter().map(|&c| c as char).collect();
                self.str(&text);
                self.str("latin1");
                self.op(0x86);
                self.op(b'R');
            }
            Value::Tuple(items) => self.tuple(items, depth)?,
            Value::List(items) => {
                self.op(b']');
                self.appends(items, depth)?;
            }
            Value::Dict(items) => {
                self.op(b'}');
                self.setitems(items, depth)?;
            }
            Value::Set(items) => {
                self.global("builtins", "set");
                self.op(b']');
                self.appends(items, depth)?;
                self.op(0x85);
                self.op(b'R');
            }
            Value::Global(g) => self.global(&g.module, &g.name),
            Value::Object(o) => self.object(o, depth)?,
            Value::PersId(id) => {
                self.value(id, depth + 1)?;
                self.op(b'Q');
            }
            Value::Tensor(t) => self.tensor(t, depth)?,
        }
        Ok(())
    }

    fn object(&mut self, o: &Object, depth: usize) -> Result<(), Error> {
        self.global(&o.class.module, &o.class.name);
        self.tuple(&o.args, depth)?;
        match o.how {
            Construct::Reduce => self.op(b'R'),
            Construct::NewObj => self.op(0x81),
            Construct::NewObjEx => {
                let empty = o
                    .kwargs
                    .as_ref()
                    .is_none_or(|k| k.dict_items().is_some_and(|d| d.is_empty()));
                if !empty {
                    return Err(Error::Unsupported {
                        what: format!(
                            "{}.{} built with keyword arguments (NEWOBJ_EX)",
                            o.class.module, o.class.name
                        ),
                    });
                }
                self.op(0x81)
            }
        }
        if !o.appended.is_empty() {
            self.appends(&o.appended, depth)?;
        }
        if !o.items.is_empty() {
            self.setitems(&o.items, depth)?;
        }
        if let Some(state) = &o.state {
            self.value(state, depth + 1)?;
            self.op(b'b');
        }
        Ok(())
    }

    fn storage_key(&mut self, s: &StorageRef) -> usize {
        let id = if s.composed.is_empty() {
            let b = s.bytes.as_slice();
            (s.key.clone(), b.as_ptr() as usize, b.len(), false)
        } else {
            (s.key.clone(), 0, 0, true)
        };
        let next = self.storages.len();
        let k = *self.keys.entry(id).or_insert(next);
        if k == next {
            let mut st = s.clone();
            st.key = k.to_string();
            st.location = "cpu".to_string();
            self.storages.push(st);
        }
        k
    }

    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }

    fn int_tuple(&mut self, v: &[u64]) -> Result<(), Error> {
        let items: Vec<Value> = v
            .iter()
            .map(|&x| i64::try_from(x).map(Value::Int))
            .collect::<Result<_, _>>()
            .map_err(|_| Error::Unsupported {
                what: "a tensor size or stride above 2^63".into(),
            })?;
        self.tuple(&items, 0)
    }

    fn rebuild_name(t: &TensorRef) -> &'static str {
        if t.dtype.storage_class().is_some() {
            "_rebuild_tensor_v2"
        } else {
            "_rebuild_tensor_v3"
        }
    }

    /// `_rebuild_tensor_v2/v3(pid, offset, size, stride, requires_grad, OrderedDict()[, dtype])`.
    fn plain_tensor(&mut self, t: &TensorRef, requires_grad: bool) -> Result<(), Error> {
        self.global("torch._utils", Self::rebuild_name(t));
        self.tensor_args(t, requires_grad)?;
        self.op(b'R');
        Ok(())
    }

    /// The argument tuple of [`Emitter::plain_tensor`].
    fn tensor_args(&mut self, t: &TensorRef, requires_grad: bool) -> Result<(), Error> {
        t.validate()?;
        let key = self.storage_key(&t.storage);
        let nbytes = t.storage.nbytes();
        let es = t.dtype.size() as u64;
        let legacy = t.dtype.storage_class();
        self.op(b'(');
        self.op(b'(');
        self.str("storage");
        match legacy {
            Some(class) => {
                if nbytes % es != 0 {
                    return Err(Error::Unsupported {
                        what: format!("a {nbytes}-byte storage of {}", t.dtype),
                    });
                }
                self.global("torch", class);
                self.str(&key.to_string());
                self.str("cpu");
                self.uint(nbytes / es)?;
            }
            None => {
                self.global("torch.storage", "UntypedStorage");
                self.str(&key.to_string());
                self.str("cpu");
                self.uint(nbytes)?;
            }
        }
        self.op(b't');
        self.op(b'Q');
        self.uint(t.storage_offset)?;
        self.int_tuple(&t.shape)?;
        self.int_tuple(&t.stride)?;
        self.op(if requires_grad { 0x88 } else { 0x89 });
        self.ordered_dict();
        if legacy.is_none() {
            self.global("torch", t.dtype.torch_name());
        }
        self.op(b't');
        Ok(())
    }

    fn tensor(&mut self, t: &TensorRef, depth: usize) -> Result<(), Error> {
        match &t.kind {
            TensorKind::Plain => self.plain_tensor(t, t.requires_grad),
            TensorKind::Parameter { state } => {
                let name = if state.is_some() {
                    "_rebuild_parameter_with_state"
                } else {
                    "_rebuild_parameter"
                };
                self.global("torch._utils", name);
                self.op(b'(');
                // Parameter pickles `self.data`, which never requires grad.
                self.plain_tensor(t, false)?;
                self.op(if t.requires_grad { 0x88 } else { 0x89 });
                self.ordered_dict();
                if let Some(s) = state {
                    self.value(s, depth + 1)?;
                }
                self.op(b't');
                self.op(b'R');
                Ok(())
            }
            TensorKind::FromType { class, state } => {
                // _rebuild_from_type_v2(func, type, args, state), func = _rebuild_tensor_v2/v3
                self.global("torch._tensor", "_rebuild_from_type_v2");
                self.op(b'(');
                self.global("torch._utils", Self::rebuild_name(t));
                self.global(&class.module, &class.name);
                self.tensor_args(t, t.requires_grad)?;
                self.value(state, depth + 1)?;
                self.op(b't');
                self.op(b'R');
                Ok(())
            }
        }
    }
}

/// The global for a `torch.<dtype>` constant.
pub fn dtype_global(d: crate::formats::torch::Dtype) -> Global {
    Global::new("torch", d.torch_name())
}

#[cfg(test)]
#[path = "emit_tests.rs"]
mod tests;
