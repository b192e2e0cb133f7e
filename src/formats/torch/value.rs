//! The owned value tree that the pickle reader produces and the emitter
//! writes: plain Python data plus stubs for globals and constructed objects.
//! Nothing here refers back to Python; a [`Value::Object`] only *names* its
//! class.

use crate::formats::torch::tensor::TensorRef;

/// A module-level name from a `GLOBAL`/`STACK_GLOBAL` (Python 2 module
/// spellings already mapped: `__builtin__` -> `builtins`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Global {
    /// Module, e.g. `collections`.
    pub module: String,
    /// Attribute, e.g. `OrderedDict`.
    pub name: String,
}

impl Global {
    /// A global from its parts.
    pub fn new(module: impl Into<String>, name: impl Into<String>) -> Global {
        Global {
            module: module.into(),
            name: name.into(),
        }
    }

    /// True when this is exactly `module.name`.
    pub fn is(&self, module: &str, name: &str) -> bool {
        self.module == module && self.name == name
    }
}

/// How an [`Object`] was constructed in the pickle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Construct {
    /// `callable(*args)` via `REDUCE` (also protocol-0 `INST`/`OBJ`).
    Reduce,
    /// `cls.__new__(cls, *args)` via `NEWOBJ`.
    NewObj,
    /// `cls.__new__(cls, *args, **kwargs)` via `NEWOBJ_EX`.
    NewObjEx,
}

/// A call or instantiation recorded, not performed.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// The callable or class.
    pub class: Global,
    /// Which opcode built it.
    pub how: Construct,
    /// Positional arguments.
    pub args: Vec<Value>,
    /// Keyword arguments (`NEWOBJ_EX` only).
    pub kwargs: Option<Value>,
    /// State given by `BUILD` (e.g. a dataclass field dict, or
    /// `{'_metadata': ..}` on a `state_dict()` OrderedDict).
    pub state: Option<Value>,
    /// Pairs added by `SETITEM(S)` (OrderedDict and other dict subclasses).
    pub items: Vec<(Value, Value)>,
    /// Values added by `APPEND(S)` (list subclasses).
    pub appended: Vec<Value>,
}

impl Object {
    /// An object with no state, items or appended values.
    pub fn new(class: Global, how: Construct, args: Vec<Value>) -> Object {
        Object {
            class,
            how,
            args,
            kwargs: None,
            state: None,
            items: Vec::new(),
            appended: Vec::new(),
        }
    }

    /// A field of a dict `state` (how dataclasses pickle): `obj.state[name]`.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.state.as_ref().and_then(|s| s.get(name))
    }
}

/// A Python value as data.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`.
    None,
    /// `True`/`False`.
    Bool(bool),
    /// An int that fits i64.
    Int(i64),
    /// A larger int: minimal little-endian two's complement bytes.
    BigInt(Vec<u8>),
    /// A float.
    Float(f64),
    /// A str.
    Str(String),
    /// bytes (also Python 2 `str` and bytearray).
    Bytes(Vec<u8>),
    /// A tuple.
    Tuple(Vec<Value>),
    /// A list.
    List(Vec<Value>),
    /// A dict, in insertion order; keys may be any value (including objects).
    Dict(Vec<(Value, Value)>),
    /// A set or frozenset.
    Set(Vec<Value>),
    /// A bare global (a class, function or `torch.float32`-like constant).
    Global(Global),
    /// A recorded call/instantiation.
    Object(Box<Object>),
    /// A persistent id (`BINPERSID`), e.g. a torch storage tuple.
    PersId(Box<Value>),
    /// A tensor resolved against its storage. Never produced by
    /// `pickle::parse`; `torch::file::load` replaces `_rebuild_*` calls with it.
    Tensor(Box<TensorRef>),
}

impl Value {
    /// An int from little-endian two's complement bytes (LONG1/LONG4):
    /// `Int` when it fits i64, else `BigInt` with the bytes minimised.
    pub fn from_le_signed(b: &[u8]) -> Value {
        if b.is_empty() {
            return Value::Int(0);
        }
        if b.len() <= 8 {
            let neg = b[b.len() - 1] & 0x80 != 0;
            let mut a = [if neg { 0xff } else { 0 }; 8];
            a[..b.len()].copy_from_slice(b);
            return Value::Int(i64::from_le_bytes(a));
        }
        let mut v = b.to_vec();
        // Drop redundant sign bytes; if it then fits 8 bytes it is an Int.
        while v.len() > 1 {
            let (last, prev) = (v[v.len() - 1], v[v.len() - 2]);
            if (last == 0 && prev < 0x80) || (last == 0xff && prev >= 0x80) {
                v.pop();
            } else {
                break;
            }
        }
        if v.len() <= 8 {
            return Value::from_le_signed(&v);
        }
        Value::BigInt(v)
    }

    /// The str, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The int, if this is an `Int` (or a bool, as in Python).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Bool(b) => Some(*b as i64),
            _ => None,
        }
    }

    /// The bool, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The items of a tuple or list.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(v) | Value::List(v) => Some(v),
            _ => None,
        }
    }

    /// The object, if this is one.
    pub fn as_object(&self) -> Option<&Object> {
        match self {
            Value::Object(o) => Some(o),
            _ => None,
        }
    }

    /// The global, if this is one.
    pub fn as_global(&self) -> Option<&Global> {
        match self {
            Value::Global(g) => Some(g),
            _ => None,
        }
    }

    /// Key/value pairs of a dict or of a dict-like object (OrderedDict, ...).
    pub fn dict_items(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Dict(d) => Some(d),
            Value::Object(o) if o.class.is("collections", "OrderedDict") => Some(&o.items),
            Value::Object(o) if !o.items.is_empty() => Some(&o.items),
            _ => None,
        }
    }

    /// `self[key]` for a dict or dict-like object with str keys (last wins, as in Python).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.dict_items()?
            .iter()
            .rev()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The tensor, if this is one.
    pub fn as_tensor(&self) -> Option<&TensorRef> {
        match self {
            Value::Tensor(t) => Some(t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_bytes_fold_to_int_or_bigint() {
        assert_eq!(Value::from_le_signed(&[]), Value::Int(0));
        assert_eq!(Value::from_le_signed(&[0xff]), Value::Int(-1));
        assert_eq!(
            Value::from_le_signed(&[0, 0, 0, 0, 0, 1]),
            Value::Int(1 << 40)
        );
        // 9 bytes with a redundant sign byte still fits i64.
        assert_eq!(Value::from_le_signed(&[0xff; 9]), Value::Int(-1));
        let big = [0, 0, 0, 0, 0, 0, 0, 0, 1];
        assert_eq!(Value::from_le_signed(&big), Value::BigInt(big.to_vec()));
    }

    #[test]
    fn get_looks_into_ordered_dicts() {
        let mut o = Object::new(
            Global::new("collections", "OrderedDict"),
            Construct::Reduce,
            vec![],
        );
        o.items.push((Value::Str("a".into()), Value::Int(1)));
        let v = Value::Object(Box::new(o));
        assert_eq!(v.get("a"), Some(&Value::Int(1)));
        assert_eq!(v.get("b"), None);
    }
}
