//! The pickle VM's mutable object graph (`Rc<RefCell<Node>>`, so BUILD and
//! SETITEMS after a memo put are seen through later gets), its iterative
//! drop, and its conversion into owned [`Value`]s under size and depth caps.

use std::cell::RefCell;
use std::rc::Rc;

use super::{Error, MAX_DEPTH};
use crate::formats::torch::value::{Construct, Global, Object, Value};

pub(crate) type R = Rc<RefCell<Node>>;

/// The VM's mutable object graph; converted to [`Value`] at STOP.
pub(crate) enum Node {
    Leaf(Value),
    Tuple(Vec<R>),
    List(Vec<R>),
    Dict(Vec<(R, R)>),
    Set(Vec<R>),
    Object {
        class: Global,
        how: Construct,
        args: Vec<R>,
        kwargs: Option<R>,
        state: Option<R>,
        items: Vec<(R, R)>,
        appended: Vec<R>,
    },
    PersId(R),
}

impl Node {
    /// Moves out the child references, leaving this node childless.
    pub(crate) fn take_children(&mut self, out: &mut Vec<R>) {
        match self {
            Node::Leaf(_) => {}
            Node::Tuple(v) | Node::List(v) | Node::Set(v) => out.append(v),
            Node::Dict(d) => out.extend(std::mem::take(d).into_iter().flat_map(|(k, v)| [k, v])),
            Node::PersId(r) => out.push(std::mem::replace(r, leaf(Value::None))),
            Node::Object {
                args,
                kwargs,
                state,
                items,
                appended,
                ..
            } => {
                out.append(args);
                out.extend(kwargs.take());
                out.extend(state.take());
                out.extend(std::mem::take(items).into_iter().flat_map(|(k, v)| [k, v]));
                out.append(appended);
            }
        }
    }
}

impl Drop for Node {
    /// Iterative, so a deeply nested graph from hostile input cannot overflow the stack.
    fn drop(&mut self) {
        let mut pending = Vec::new();
        self.take_children(&mut pending);
        while let Some(r) = pending.pop() {
            if let Ok(cell) = Rc::try_unwrap(r) {
                cell.into_inner().take_children(&mut pending);
            }
        }
    }
}

pub(crate) fn leaf(v: Value) -> R {
    Rc::new(RefCell::new(Node::Leaf(v)))
}
pub(crate) fn node(n: Node) -> R {
    Rc::new(RefCell::new(n))
}

/// How protocol 2 spells plain data through calls, folded back to data:
/// `_codecs.encode(text, 'latin1')` is bytes, `builtins.bytes()` is `b""`,
/// `builtins.set([..])` is a set. Anything else stays an [`Object`].
pub(crate) fn fold_reduce(class: &Global, args: &[R]) -> Option<Node> {
    match (class.module.as_str(), class.name.as_str(), args) {
        ("_codecs", "encode", [text, enc]) => {
            let (text, enc) = (text.borrow(), enc.borrow());
            match (&*text, &*enc) {
                (Node::Leaf(Value::Str(t)), Node::Leaf(Value::Str(e)))
                    if e == "latin1" || e == "latin-1" =>
                {
                    let b: Option<Vec<u8>> = t.chars().map(|c| u8::try_from(c).ok()).collect();
                    b.map(|b| Node::Leaf(Value::Bytes(b)))
                }
                _ => None,
            }
        }
        ("builtins", "bytes", []) => Some(Node::Leaf(Value::Bytes(Vec::new()))),
        ("builtins", "set", [items]) => match &*items.borrow() {
            Node::List(v) | Node::Tuple(v) => Some(Node::Set(v.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// What the conversion may still produce (shared references are copied, so
/// a small pickle could otherwise expand exponentially).
pub(crate) struct Budget {
    nodes: u64,
    bytes: u64,
    at: u64,
}

impl Budget {
    /// Caps proportional to the input: 16 nodes and 16 bytes per input byte, plus slack.
    pub(crate) fn for_input(len: usize, at: usize) -> Budget {
        let len = len as u64;
        Budget {
            nodes: 1_000_000u64.saturating_add(len.saturating_mul(16)),
            bytes: (64u64 << 20).saturating_add(len.saturating_mul(16)),
            at: at as u64,
        }
    }
}

pub(crate) fn convert(r: &R, depth: usize, b: &mut Budget) -> Result<Value, Error> {
    let limit = |what, limit| Error::Limit {
        offset: b.at,
        what,
        limit,
    };
    if depth > MAX_DEPTH {
        return Err(limit("nesting depth", MAX_DEPTH as u64));
    }
    b.nodes = b
        .nodes
        .checked_sub(1)
        .ok_or_else(|| limit("output nodes", 0))?;
    let n = r
        .try_borrow()
        .map_err(|_| limit("nesting depth", MAX_DEPTH as u64))?;
    let all = |v: &[R], b: &mut Budget| -> Result<Vec<Value>, Error> {
        v.iter().map(|x| convert(x, depth + 1, b)).collect()
    };
    let pairs = |v: &[(R, R)], b: &mut Budget| -> Result<Vec<(Value, Value)>, Error> {
        v.iter()
            .map(|(k, x)| Ok((convert(k, depth + 1, b)?, convert(x, depth + 1, b)?)))
            .collect()
    };
    Ok(match &*n {
        Node::Leaf(v) => {
            let len = match v {
                Value::Str(s) => s.len(),
                Value::Bytes(s) | Value::BigInt(s) => s.len(),
                _ => 0,
            } as u64;
            b.bytes = b
                .bytes
                .checked_sub(len)
                .ok_or_else(|| limit("output bytes", 0))?;
            v.clone()
        }
        Node::Tuple(v) => Value::Tuple(all(v, b)?),
        Node::List(v) => Value::List(all(v, b)?),
        Node::Set(v) => Value::Set(all(v, b)?),
        Node::Dict(v) => Value::Dict(pairs(v, b)?),
        Node::PersId(x) => Value::PersId(Box::new(convert(x, depth + 1, b)?)),
        Node::Object {
            class,
            how,
            args,
            kwargs,
            state,
            items,
            appended,
        } => Value::Object(Box::new(Object {
            class: class.clone(),
            how: *how,
            args: all(args, b)?,
            kwargs: kwargs
                .as_ref()
                .map(|k| convert(k, depth + 1, b))
                .transpose()?,
            state: state
                .as_ref()
                .map(|s| convert(s, depth + 1, b))
                .transpose()?,
            items: pairs(items, b)?,
            appended: all(appended, b)?,
        })),
    })
}
