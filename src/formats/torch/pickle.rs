//! A data-only pickle reader (protocols 0-5): it turns pickle bytes into an
//! owned [`Value`] tree and never executes anything.
//!
//! Calls (`REDUCE`, `NEWOBJ`, `NEWOBJ_EX`, `INST`, `OBJ`) become
//! [`Value::Object`] nodes naming their class; `BUILD` stores the state on
//! that node. Three calls that are only protocol 2's spelling of plain data
//! are folded back to data: `_codecs.encode(s, 'latin1')` -> [`Value::Bytes`],
//! `builtins.bytes()` -> empty bytes, `builtins.set([..])` -> [`Value::Set`]. Every `GLOBAL`/`STACK_GLOBAL` is checked against the caller's
//! [`Policy`] at the moment it is read, so a file naming `os.system` fails
//! with [`Error::UnsupportedGlobal`] before anything else happens.
//!
//! Objects are kept as shared `Rc<RefCell<..>>` nodes while the VM runs, so a
//! `BUILD` or `SETITEMS` after `BINPUT`/`MEMOIZE` is visible through later
//! `BINGET`s (DCP `.metadata` and `state_dict()` pickles depend on this); the
//! tree is copied out into plain owned values at `STOP`.
//!
//! Opcode names follow CPython's `pickletools`. Not supported (error):
//! `EXT1/2/4` and the protocol-5 out-of-band buffers.
//!
//! Public API:
//! * [`parse`]`(bytes, &Policy) -> Result<Value, Error>`
//! * [`parse_prefix`]`(bytes, &Policy) -> Result<(Value, usize), Error>` (bytes consumed; legacy files
//!   hold several pickles back to back)
//! * [`Policy::torch`], [`Policy::allow_module_prefix`], [`Policy::allow_global`], [`Policy::allows`]
//! * [`Value`], [`Global`], [`Object`], [`Construct`], [`Error`]

use std::collections::HashMap;

use crate::formats::torch::policy::map_module;
pub use crate::formats::torch::policy::Policy;
pub use crate::formats::torch::value::{Construct, Global, Object, Value};
use graph::{convert, fold_reduce, leaf, node, Budget, Node, R};

/// Most entries the memo may hold.
pub const MAX_MEMO: usize = 1 << 24;
/// Most items on the stack (all marks together).
pub const MAX_STACK: usize = 1 << 24;
/// Deepest nesting of containers in the result. Real checkpoints nest a few
/// levels; the converter recurses per level, and 100 levels stay well inside
/// a 2 MiB thread stack even in debug builds (256 overflowed it).
pub const MAX_DEPTH: usize = 100;

/// Why a pickle could not be read. `offset` is the byte offset of the opcode
/// inside the pickle; `opcode` its byte.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// The input ended inside an opcode (`opcode` != 0) or before `STOP` (`opcode` == 0).
    #[error("pickle: truncated at byte {offset}: {}", truncated_why(*.opcode, *.need))]
    Truncated {
        /// Offset of the opcode.
        offset: u64,
        /// The opcode (0 when the input ended before any opcode).
        opcode: u8,
        /// Bytes missing.
        need: u64,
    },
    /// A byte that is no pickle opcode.
    #[error("pickle: unknown opcode 0x{opcode:02x} at byte {offset}")]
    UnknownOpcode {
        /// Offset of the opcode.
        offset: u64,
        /// The byte.
        opcode: u8,
    },
    /// A real opcode this reader deliberately does not implement.
    #[error("pickle: unsupported opcode {name} (0x{opcode:02x}) at byte {offset}")]
    UnsupportedOpcode {
        /// Offset of the opcode.
        offset: u64,
        /// The opcode.
        opcode: u8,
        /// Its pickletools name.
        name: &'static str,
    },
    /// A global the policy does not allow.
    #[error("pickle: refusing global {module}.{name} at byte {offset}")]
    UnsupportedGlobal {
        /// Module as written (after Python 2 name mapping).
        module: String,
        /// Attribute name.
        name: String,
        /// Offset of the GLOBAL/STACK_GLOBAL opcode.
        offset: u64,
    },
    /// An opcode needed more stack items (or a MARK) than there were.
    #[error("pickle: stack underflow: opcode 0x{opcode:02x} at byte {offset}")]
    StackUnderflow {
        /// Offset of the opcode.
        offset: u64,
        /// The opcode.
        opcode: u8,
    },
    /// A memo lookup of an index never stored.
    #[error("pickle: bad memo index {index}: opcode 0x{opcode:02x} at byte {offset}")]
    BadMemo {
        /// Offset of the opcode.
        offset: u64,
        /// The opcode.
        opcode: u8,
        /// The index.
        index: u64,
    },
    /// A declared length larger than the rest of the input.
    #[error("pickle: opcode 0x{opcode:02x} at byte {offset} declares {len} bytes but only {remaining} remain")]
    TooLong {
        /// Offset of the opcode.
        offset: u64,
        /// The opcode.
        opcode: u8,
        /// Declared length.
        len: u64,
        /// Bytes left in the input.
        remaining: u64,
    },
    /// A resource cap (memo, stack, nesting, output size) was hit.
    #[error("pickle: limit exceeded: {what} over {limit} at byte {offset}")]
    Limit {
        /// Offset of the opcode (or input length for output caps).
        offset: u64,
        /// Which cap.
        what: &'static str,
        /// The cap.
        limit: u64,
    },
    /// Operands of the wrong kind (e.g. APPEND to a dict, bad UTF-8, bad int text).
    #[error("pickle: bad operand: opcode 0x{opcode:02x} at byte {offset}: {why}")]
    BadOperand {
        /// Offset of the opcode.
        offset: u64,
        /// The opcode.
        opcode: u8,
        /// What was wrong.
        why: String,
    },
}

fn truncated_why(opcode: u8, need: u64) -> String {
    if opcode == 0 {
        "input ends before STOP".to_string()
    } else {
        format!("opcode 0x{opcode:02x} needs {need} more bytes")
    }
}

/// Parses one pickle, ignoring anything after its `STOP`.
///
/// # Errors
/// Any [`Error`]; never panics on malformed input.
pub fn parse(bytes: &[u8], policy: &Policy) -> Result<Value, Error> {
    parse_prefix(bytes, policy).map(|(v, _)| v)
}

/// Parses one pickle and returns it with the number of bytes consumed
/// (through `STOP`), for inputs holding several pickles back to back.
///
/// # Errors
/// Any [`Error`]; never panics on malformed input.
pub fn parse_prefix(bytes: &[u8], policy: &Policy) -> Result<(Value, usize), Error> {
    let mut vm = Vm {
        input: bytes,
        pos: 0,
        op_at: 0,
        op: 0,
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        memoized: Vec::new(),
        policy,
    };
    let root = vm.run()?;
    let mut budget = Budget::for_input(bytes.len(), vm.pos);
    let v = convert(&root, 0, &mut budget)?;
    Ok((v, vm.pos))
}

struct Vm<'a> {
    input: &'a [u8],
    pos: usize,
    op_at: usize,
    op: u8,
    stack: Vec<R>,
    marks: Vec<usize>,
    memo: HashMap<u64, R>,
    memoized: Vec<std::rc::Weak<std::cell::RefCell<Node>>>,
    policy: &'a Policy,
}

impl Drop for Vm<'_> {
    /// Breaks reference cycles (`l = []; l.append(l)` through the memo or
    /// DUP), which `Rc` would otherwise leak: every cycle runs through a node
    /// that was memoized or DUP'd at some point, since those are the only
    /// ways to refer to an existing object again.
    fn drop(&mut self) {
        let mut pending = Vec::new();
        for w in &self.memoized {
            if let Some(r) = w.upgrade() {
                if let Ok(mut n) = r.try_borrow_mut() {
                    n.take_children(&mut pending);
                }
            }
        }
        drop(pending); // Node's iterative drop
    }
}

impl<'a> Vm<'a> {
    fn at(&self) -> u64 {
        self.op_at as u64
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        let rest = self.input.len() - self.pos;
        if n > rest {
            return Err(Error::Truncated {
                offset: self.at(),
                opcode: self.op,
                need: (n - rest) as u64,
            });
        }
        let s = &self.input[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn arr<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    /// A length-prefixed payload; the length is checked against the input first.
    fn counted(&mut self, len: u64) -> Result<&'a [u8], Error> {
        let remaining = (self.input.len() - self.pos) as u64;
        if len > remaining {
            return Err(Error::TooLong {
                offset: self.at(),
                opcode: self.op,
                len,
                remaining,
            });
        }
        self.take(len as usize)
    }

    fn line(&mut self) -> Result<&'a [u8], Error> {
        let rest = &self.input[self.pos..];
        let n = rest
            .iter()
            .position(|&c| c == b'\n')
            .ok_or(Error::Truncated {
                offset: self.at(),
                opcode: self.op,
                need: 1,
            })?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    fn bad(&self, why: impl Into<String>) -> Error {
        Error::BadOperand {
            offset: self.at(),
            opcode: self.op,
            why: why.into(),
        }
    }

    fn underflow(&self) -> Error {
        Error::StackUnderflow {
            offset: self.at(),
            opcode: self.op,
        }
    }

    fn push(&mut self, r: R) -> Result<(), Error> {
        if self.stack.len() >= MAX_STACK {
            return Err(Error::Limit {
                offset: self.at(),
                what: "stack size",
                limit: MAX_STACK as u64,
            });
        }
        self.stack.push(r);
        Ok(())
    }

    fn pop(&mut self) -> Result<R, Error> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.underflow());
        }
        self.stack.pop().ok_or_else(|| self.underflow())
    }

    fn top(&self) -> Result<R, Error> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.underflow());
        }
        self.stack.last().cloned().ok_or_else(|| self.underflow())
    }

    fn pop_mark(&mut self) -> Result<Vec<R>, Error> {
        let m = self.marks.pop().ok_or_else(|| self.underflow())?;
        if m > self.stack.len() {
            return Err(self.underflow());
        }
        Ok(self.stack.split_off(m))
    }

    fn put(&mut self, index: u64) -> Result<(), Error> {
        let top = self.top()?;
        if self.memo.len() >= MAX_MEMO && !self.memo.contains_key(&index) {
            return Err(Error::Limit {
                offset: self.at(),
                what: "memo entries",
                limit: MAX_MEMO as u64,
            });
        }
        // Every node ever memoized (or DUP'd), so a cycle through an entry
        // that a later PUT overwrote is still broken on drop (one per opcode:
        // bounded by the input length).
        self.memoized.push(std::rc::Rc::downgrade(&top));
        self.memo.insert(index, top);
        Ok(())
    }

    fn get(&mut self, index: u64) -> Result<(), Error> {
        let r = self.memo.get(&index).cloned().ok_or(Error::BadMemo {
            offset: self.at(),
            opcode: self.op,
            index,
        })?;
        self.push(r)
    }

    fn global(&mut self, module: &str, name: &str) -> Result<R, Error> {
        let module = map_module(module);
        if !self.policy.allows(module, name) {
            return Err(Error::UnsupportedGlobal {
                module: module.to_string(),
                name: name.to_string(),
                offset: self.at(),
            });
        }
        Ok(leaf(Value::Global(Global {
            module: module.to_string(),
            name: name.to_string(),
        })))
    }

    fn class_of(&self, r: &R) -> Result<Global, Error> {
        match &*r.borrow() {
            Node::Leaf(Value::Global(g)) => Ok(g.clone()),
            _ => Err(self.bad("callable is not a global")),
        }
    }

    fn object(&self, class: Global, how: Construct, args: Vec<R>, kwargs: Option<R>) -> R {
        node(Node::Object {
            class,
            how,
            args,
            kwargs,
            state: None,
            items: Vec::new(),
            appended: Vec::new(),
        })
    }

    fn tuple_items(&self, r: &R) -> Result<Vec<R>, Error> {
        match &*r.borrow() {
            Node::Tuple(v) => Ok(v.clone()),
            _ => Err(self.bad("arguments are not a tuple")),
        }
    }

    fn str_of(&self, r: &R) -> Result<String, Error> {
        match &*r.borrow() {
            Node::Leaf(Value::Str(s)) => Ok(s.clone()),
            _ => Err(self.bad("STACK_GLOBAL operand is not a str")),
        }
    }

    fn utf8(&self, b: &[u8]) -> Result<String, Error> {
        String::from_utf8(b.to_vec()).map_err(|_| self.bad("invalid UTF-8 in string"))
    }

    fn setitems(&mut self, target: &R, pairs: Vec<R>) -> Result<(), Error> {
        if pairs.len() % 2 != 0 {
            return Err(self.bad("odd number of items for SETITEMS"));
        }
        let mut it = pairs.into_iter();
        let mut t = target.borrow_mut();
        let dest = match &mut *t {
            Node::Dict(d) => d,
            Node::Object { items, .. } => items,
            _ => return Err(self.bad("SETITEM target is not a dict")),
        };
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dest.push((k, v));
        }
        Ok(())
    }

    fn appends(&mut self, target: &R, values: Vec<R>) -> Result<(), Error> {
        let mut t = target.borrow_mut();
        match &mut *t {
            Node::List(l) => l.extend(values),
            Node::Object { appended, .. } => appended.extend(values),
            _ => return Err(self.bad("APPEND target is not a list")),
        }
        Ok(())
    }

    fn additems(&mut self, target: &R, values: Vec<R>) -> Result<(), Error> {
        match &mut *target.borrow_mut() {
            Node::Set(s) => s.extend(values),
            _ => return Err(self.bad("ADDITEMS target is not a set")),
        }
        Ok(())
    }

    fn run(&mut self) -> Result<R, Error> {
        loop {
            self.op_at = self.pos;
            self.op = 0;
            let op = self.arr::<1>()?[0];
            self.op = op;
            if self.step(op)? {
                return self.pop();
            }
        }
    }

    /// Executes one opcode; true at STOP.
    fn step(&mut self, op: u8) -> Result<bool, Error> {
        use crate::formats::torch::pickle_text as text;
        match op {
            b'.' => return Ok(true),
            // framing / protocol
            0x80 => {
                let p = self.arr::<1>()?[0];
                if p > 5 {
                    return Err(self.bad(format!("unsupported protocol {p}")));
                }
            }
            0x95 => {
                self.arr::<8>()?;
            }
            // constants
            b'N' => self.push(leaf(Value::None))?,
            0x88 => self.push(leaf(Value::Bool(true)))?,
            0x89 => self.push(leaf(Value::Bool(false)))?,
            b'K' => {
                let v = self.arr::<1>()?[0];
                self.push(leaf(Value::Int(v as i64)))?
            }
            b'M' => {
                let v = u16::from_le_bytes(self.arr()?);
                self.push(leaf(Value::Int(v as i64)))?
            }
            b'J' => {
                let v = i32::from_le_bytes(self.arr()?);
                self.push(leaf(Value::Int(v as i64)))?
            }
            0x8a => {
                let n = self.arr::<1>()?[0] as u64;
                let b = self.counted(n)?;
                self.push(leaf(Value::from_le_signed(b)))?
            }
            0x8b => {
                let n = u32::from_le_bytes(self.arr()?) as u64;
                let b = self.counted(n)?;
                self.push(leaf(Value::from_le_signed(b)))?
            }
            b'G' => {
                let v = f64::from_be_bytes(self.arr()?);
                self.push(leaf(Value::Float(v)))?
            }
            b'I' | b'L' | b'F' => {
                let l = self.line()?;
                let v = text::number(op, l).map_err(|w| self.bad(w))?;
                self.push(leaf(v))?
            }
            // strings and bytes
            b'X' => {
                let n = u32::from_le_bytes(self.arr()?) as u64;
                let s = self.counted(n)?;
                let s = self.utf8(s)?;
                self.push(leaf(Value::Str(s)))?
            }
            0x8c => {
                let n = self.arr::<1>()?[0] as u64;
                let s = self.counted(n)?;
                let s = self.utf8(s)?;
                self.push(leaf(Value::Str(s)))?
            }
            0x8d => {
                let n = u64::from_le_bytes(self.arr()?);
                let s = self.counted(n)?;
                let s = self.utf8(s)?;
                self.push(leaf(Value::Str(s)))?
            }
            b'V' => {
                let l = self.line()?;
                let s = text::raw_unicode_escape(l).map_err(|w| self.bad(w))?;
                self.push(leaf(Value::Str(s)))?
            }
            // Python 2 str: bytes in Python 3 terms (encoding="bytes").
            b'S' => {
                let l = self.line()?;
                let b = text::string_literal(l).map_err(|w| self.bad(w))?;
                self.push(leaf(Value::Bytes(b)))?
            }
            b'T' => {
                let n = u32::from_le_bytes(self.arr()?) as u64;
                let b = self.counted(n)?;
                self.push(leaf(Value::Bytes(b.to_vec())))?
            }
            b'U' => {
                let n = self.arr::<1>()?[0] as u64;
                let b = self.counted(n)?;
                self.push(leaf(Value::Bytes(b.to_vec())))?
            }
            b'B' => {
                let n = u32::from_le_bytes(self.arr()?) as u64;
                let b = self.counted(n)?;
                self.push(leaf(Value::Bytes(b.to_vec())))?
            }
            b'C' => {
                let n = self.arr::<1>()?[0] as u64;
                let b = self.counted(n)?;
                self.push(leaf(Value::Bytes(b.to_vec())))?
            }
            0x8e | 0x96 => {
                let n = u64::from_le_bytes(self.arr()?);
                let b = self.counted(n)?;
                self.push(leaf(Value::Bytes(b.to_vec())))?
            }
            // containers
            b'(' => {
                if self.marks.len() >= MAX_STACK {
                    return Err(Error::Limit {
                        offset: self.at(),
                        what: "marks",
                        limit: MAX_STACK as u64,
                    });
                }
                self.marks.push(self.stack.len())
            }
            b')' => self.push(node(Node::Tuple(Vec::new())))?,
            b']' => self.push(node(Node::List(Vec::new())))?,
            b'}' => self.push(node(Node::Dict(Vec::new())))?,
            0x8f => self.push(node(Node::Set(Vec::new())))?,
            b't' => {
                let v = self.pop_mark()?;
                self.push(node(Node::Tuple(v)))?
            }
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.pop()?);
                }
                v.reverse();
                self.push(node(Node::Tuple(v)))?
            }
            b'l' => {
                let v = self.pop_mark()?;
                self.push(node(Node::List(v)))?
            }
            b'd' => {
                let v = self.pop_mark()?;
                let d = node(Node::Dict(Vec::new()));
                self.setitems(&d, v)?;
                self.push(d)?
            }
            0x91 => {
                let v = self.pop_mark()?;
                self.push(node(Node::Set(v)))?
            }
            b'a' => {
                let v = self.pop()?;
                let t = self.top()?;
                self.appends(&t, vec![v])?
            }
            b'e' => {
                let v = self.pop_mark()?;
                let t = self.top()?;
                self.appends(&t, v)?
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                let t = self.top()?;
                self.setitems(&t, vec![k, v])?
            }
            b'u' => {
                let v = self.pop_mark()?;
                let t = self.top()?;
                self.setitems(&t, v)?
            }
            0x90 => {
                let v = self.pop_mark()?;
                let t = self.top()?;
                self.additems(&t, v)?
            }
            // stack manipulation
            b'0' => {
                // POP also pops an empty mark, as CPython does
                if self.marks.last() == Some(&self.stack.len()) {
                    self.marks.pop();
                } else {
                    self.pop()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let t = self.top()?;
                // DUP aliases a node without the memo: it can close a cycle too.
                self.memoized.push(std::rc::Rc::downgrade(&t));
                self.push(t)?
            }
            // memo
            b'p' => {
                let l = self.line()?;
                let i = text::memo_index(l).map_err(|w| self.bad(w))?;
                self.put(i)?
            }
            b'q' => {
                let i = self.arr::<1>()?[0] as u64;
                self.put(i)?
            }
            b'r' => {
                let i = u32::from_le_bytes(self.arr()?) as u64;
                self.put(i)?
            }
            0x94 => {
                let i = self.memo.len() as u64;
                self.put(i)?
            }
            b'g' => {
                let l = self.line()?;
                let i = text::memo_index(l).map_err(|w| self.bad(w))?;
                self.get(i)?
            }
            b'h' => {
                let i = self.arr::<1>()?[0] as u64;
                self.get(i)?
            }
            b'j' => {
                let i = u32::from_le_bytes(self.arr()?) as u64;
                self.get(i)?
            }
            // globals and calls
            b'c' => {
                let m = self.line()?;
                let n = self.line()?;
                let (m, n) = (self.utf8(m)?, self.utf8(n)?);
                let g = self.global(&m, &n)?;
                self.push(g)?
            }
            0x93 => {
                let n = self.pop()?;
                let m = self.pop()?;
                let (m, n) = (self.str_of(&m)?, self.str_of(&n)?);
                let g = self.global(&m, &n)?;
                self.push(g)?
            }
            b'R' => {
                let args = self.pop()?;
                let f = self.pop()?;
                let class = self.class_of(&f)?;
                let args = self.tuple_items(&args)?;
                let o = match fold_reduce(&class, &args) {
                    Some(n) => node(n),
                    None => self.object(class, Construct::Reduce, args, None),
                };
                self.push(o)?
            }
            0x81 => {
                let args = self.pop()?;
                let c = self.pop()?;
                let class = self.class_of(&c)?;
                let args = self.tuple_items(&args)?;
                let o = self.object(class, Construct::NewObj, args, None);
                self.push(o)?
            }
            0x92 => {
                let kwargs = self.pop()?;
                let args = self.pop()?;
                let c = self.pop()?;
                let class = self.class_of(&c)?;
                let args = self.tuple_items(&args)?;
                let o = self.object(class, Construct::NewObjEx, args, Some(kwargs));
                self.push(o)?
            }
            b'i' => {
                let m = self.line()?;
                let n = self.line()?;
                let (m, n) = (self.utf8(m)?, self.utf8(n)?);
                let g = self.global(&m, &n)?;
                let class = self.class_of(&g)?;
                let args = self.pop_mark()?;
                let o = self.object(class, Construct::Reduce, args, None);
                self.push(o)?
            }
            b'o' => {
                let mut v = self.pop_mark()?;
                if v.is_empty() {
                    return Err(self.underflow());
                }
                let c = v.remove(0);
                let class = self.class_of(&c)?;
                let o = self.object(class, Construct::Reduce, v, None);
                self.push(o)?
            }
            b'b' => {
                let state = self.pop()?;
                let t = self.top()?;
                let mut t = t.borrow_mut();
                match &mut *t {
                    Node::Object { state: s, .. } => *s = Some(state),
                    _ => return Err(self.bad("BUILD target is not an object")),
                }
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(node(Node::PersId(id)))?
            }
            b'P' => {
                let l = self.line()?;
                let s = self.utf8(l)?;
                self.push(node(Node::PersId(leaf(Value::Str(s)))))?
            }
            0x82 => return Err(self.unsupported("EXT1")),
            0x83 => return Err(self.unsupported("EXT2")),
            0x84 => return Err(self.unsupported("EXT4")),
            0x97 => return Err(self.unsupported("NEXT_BUFFER")),
            0x98 => return Err(self.unsupported("READONLY_BUFFER")),
            _ => {
                return Err(Error::UnknownOpcode {
                    offset: self.at(),
                    opcode: op,
                })
            }
        }
        Ok(false)
    }

    fn unsupported(&self, name: &'static str) -> Error {
        Error::UnsupportedOpcode {
            offset: self.at(),
            opcode: self.op,
            name,
        }
    }
}

// The value-graph builder: an implementation detail of the VM.
#[path = "pickle_graph.rs"]
mod graph;

#[cfg(test)]
#[path = "pickle_tests.rs"]
mod tests;

#[cfg(test)]
mod cycle_tests {
    use super::*;

    /// Runs `bytes` on a VM; returns weak refs to every node it memoized or
    /// DUP'd, after the VM and its result are gone.
    fn survivors(bytes: &[u8]) -> usize {
        let policy = Policy::torch();
        let mut vm = Vm {
            input: bytes,
            pos: 0,
            op_at: 0,
            op: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            memoized: Vec::new(),
            policy: &policy,
        };
        let root = vm.run();
        let weak = vm.memoized.clone();
        assert!(!weak.is_empty());
        drop(root);
        drop(vm);
        weak.iter().filter(|w| w.upgrade().is_some()).count()
    }

    #[test]
    fn cycles_are_freed() {
        // l = []; l.append(l) via the memo
        assert_eq!(survivors(b"]q\x00h\x00a."), 0);
        // the same through DUP
        assert_eq!(survivors(b"]2a."), 0);
        // a cycle through a memo entry that a later PUT overwrites
        assert_eq!(survivors(b"]q\x00h\x00a0}q\x00."), 0);
        // and the parse itself is refused or bounded, never a hang
        assert!(parse(b"]2a.", &Policy::torch()).is_err());
    }
}
