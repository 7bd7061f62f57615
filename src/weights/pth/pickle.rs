//! The subset of Python's pickle machine that `torch.save` and plain `pickle.dump` of lists,
//! dicts and NumPy arrays emit. Nothing in a file is executed: globals are only names, and
//! objects are kept as their constructor and arguments.

use std::collections::HashMap;

use anyhow::{Context, Result, bail};

use super::{Dtype, TensorRef};

/// A value of the pickled object graph.
#[derive(Debug, Clone)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Vec<Value>),
    List(Vec<Value>),
    Dict(Vec<(Value, Value)>),
    /// A class or function named by module and name.
    Global(String, String),
    /// An object built by calling a global we do not model (argparse.Namespace, ...).
    Object { class: Box<Value>, args: Box<Value>, state: Option<Box<Value>> },
    /// A tensor storage of the archive: its key and element type.
    Storage { key: String, dtype: Dtype },
    Tensor(TensorRef),
}

impl Value {
    /// The entry of a dict with a string key.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string keys of a dict.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            Value::Dict(items) => items.iter().filter_map(|(k, _)| if let Value::Str(s) = k { Some(s.as_str()) } else { None }).collect(),
            _ => Vec::new(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "a tuple",
            Value::List(_) => "a list",
            Value::Dict(_) => "a dict",
            Value::Global(..) => "a global",
            Value::Object { .. } => "an object",
            Value::Storage { .. } => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// The pickle machine: a stack with marks, and the memo.
#[derive(Default)]
pub(super) struct Machine {
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let s = self.bytes.get(self.at..self.at + n).context("pickle ends early")?;
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn line(&mut self) -> Result<String> {
        let end = self.bytes[self.at..].iter().position(|&b| b == b'\n').context("pickle ends early")?;
        let s = String::from_utf8_lossy(&self.bytes[self.at..self.at + end]).into_owned();
        self.at += end + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<String> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

impl Machine {
    fn pop(&mut self) -> Result<Value> {
        self.stack.pop().context("pickle stack underflow")
    }

    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self.marks.pop().context("pickle mark missing")?;
        if mark > self.stack.len() {
            bail!("pickle mark beyond the stack");
        }
        Ok(self.stack.split_off(mark))
    }

    fn top(&mut self) -> Result<&mut Value> {
        self.stack.last_mut().context("pickle stack underflow")
    }

    fn set_items(&mut self, items: Vec<Value>) -> Result<()> {
        if !items.len().is_multiple_of(2) {
            bail!("odd number of dict items");
        }
        let target = self.top()?;
        let dict = match target {
            Value::Dict(d) => d,
            // OrderedDict() and friends: keep the items on the object as a dict.
            Value::Object { state, .. } => match state.get_or_insert_with(|| Box::new(Value::Dict(Vec::new()))).as_mut() {
                Value::Dict(d) => d,
                _ => bail!("SETITEMS on an object with a non-dict state"),
            },
            other => bail!("SETITEMS on {}", other.kind()),
        };
        let mut it = items.into_iter();
        while let (Some(k), Some(v)) = (it.next(), it.next()) {
            dict.push((k, v));
        }
        Ok(())
    }

    /// Calls a global: the tensor rebuilders and dict constructors are modelled, anything else
    /// becomes an opaque object.
    fn call(&self, callable: Value, args: Value) -> Result<Value> {
        let Value::Tuple(mut a) = args else { bail!("call arguments are not a tuple") };
        let Value::Global(module, name) = &callable else { return Ok(Value::Object { class: Box::new(callable), args: Box::new(Value::Tuple(a)), state: None }) };
        match (module.as_str(), name.as_str()) {
            ("torch._utils", "_rebuild_tensor_v2") | ("torch._utils", "_rebuild_tensor") => {
                if a.len() < 4 {
                    bail!("{name}: too few arguments");
                }
                let as_dims = |v: &Value| -> Result<Vec<usize>> {
                    match v {
                        Value::Tuple(items) | Value::List(items) => items
                            .iter()
                            .map(|d| if let Value::Int(i) = d { Ok(*i as usize) } else { bail!("non-integer tensor dimension") })
                            .collect(),
                        _ => bail!("tensor size is not a tuple"),
                    }
                };
                let (Value::Storage { key, dtype }, Value::Int(offset)) = (&a[0], &a[1]) else { bail!("{name}: unexpected arguments") };
                Ok(Value::Tensor(TensorRef { storage: key.clone(), dtype: *dtype, offset: *offset as usize, shape: as_dims(&a[2])?, stride: as_dims(&a[3])? }))
            }
            ("torch._utils", "_rebuild_parameter") | ("torch._utils", "_rebuild_parameter_with_state") => {
                if a.is_empty() {
                    bail!("{name}: no arguments");
                }
                Ok(a.swap_remove(0))
            }
            ("collections", "OrderedDict") | ("builtins", "dict") if a.is_empty() => Ok(Value::Dict(Vec::new())),
            _ => Ok(Value::Object { class: Box::new(callable), args: Box::new(Value::Tuple(a)), state: None }),
        }
    }

    pub(super) fn run(mut self, bytes: &[u8]) -> Result<Value> {
        let mut r = Reader { bytes, at: 0 };
        loop {
            let op = r.u8()?;
            match op {
                0x80 => {
                    r.u8()?; // PROTO
                }
                0x95 => {
                    r.take(8)?; // FRAME
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Vec::new())),
                b']' => self.stack.push(Value::List(Vec::new())),
                b')' => self.stack.push(Value::Tuple(Vec::new())),
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'J' => {
                    let v = r.u32()? as i32;
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = r.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = r.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = r.u8()? as usize;
                    let b = r.take(n)?;
                    if n > 8 {
                        bail!("integer wider than 64 bits");
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= (byte as i64) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.stack.push(Value::Int(v));
                }
                b'G' => {
                    let v = f64::from_be_bytes(r.take(8)?.try_into().unwrap());
                    self.stack.push(Value::Float(v));
                }
                b'X' => {
                    let n = r.u32()? as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8c => {
                    let n = r.u8()? as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                0x8d => {
                    let n = u64::from_le_bytes(r.take(8)?.try_into().unwrap()) as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'U' => {
                    let n = r.u8()? as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'T' => {
                    let n = r.u32()? as usize;
                    let s = r.string(n)?;
                    self.stack.push(Value::Str(s));
                }
                b'C' => {
                    let n = r.u8()? as usize;
                    let b = r.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'B' => {
                    let n = r.u32()? as usize;
                    let b = r.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'c' => {
                    let module = r.line()?;
                    let name = r.line()?;
                    self.stack.push(Value::Global(module, name));
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(m), Value::Str(n)) = (module, name) else { bail!("STACK_GLOBAL without strings") };
                    self.stack.push(Value::Global(m, n));
                }
                b'q' => {
                    let i = r.u8()? as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'r' => {
                    let i = r.u32()?;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                0x94 => {
                    let i = self.memo.len() as u32;
                    let v = self.top()?.clone();
                    self.memo.insert(i, v);
                }
                b'h' => {
                    let i = r.u8()? as u32;
                    let v = self.memo.get(&i).context("memo entry missing")?.clone();
                    self.stack.push(v);
                }
                b'j' => {
                    let i = r.u32()?;
                    let v = self.memo.get(&i).context("memo entry missing")?.clone();
                    self.stack.push(v);
                }
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(items));
                }
                0x85 => {
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a]));
                }
                0x86 => {
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b]));
                }
                0x87 => {
                    let c = self.pop()?;
                    let b = self.pop()?;
                    let a = self.pop()?;
                    self.stack.push(Value::Tuple(vec![a, b, c]));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::List(items));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Dict(Vec::new()));
                    self.set_items(items)?;
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.push(v),
                        other => bail!("APPEND to {}", other.kind()),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        other => bail!("APPENDS to {}", other.kind()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    self.set_items(vec![k, v])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    self.set_items(items)?;
                }
                0x8f => self.stack.push(Value::List(Vec::new())), // EMPTY_SET, kept as a list
                0x90 => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.extend(items),
                        other => bail!("ADDITEMS to {}", other.kind()),
                    }
                }
                b'R' => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = self.call(callable, args)?;
                    self.stack.push(v);
                }
                0x81 => {
                    // NEWOBJ: cls.__new__(cls, *args)
                    let args = self.pop()?;
                    let class = self.pop()?;
                    self.stack.push(Value::Object { class: Box::new(class), args: Box::new(args), state: None });
                }
                b'b' => {
                    let new_state = self.pop()?;
                    // Only objects keep their state: an OrderedDict's (a state dict's _metadata)
                    // and tensor hooks are not needed.
                    if let Value::Object { state, .. } = self.top()? {
                        *state = Some(Box::new(new_state));
                    }
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let Value::Tuple(items) = pid else { bail!("persistent id is not a tuple") };
                    match items.as_slice() {
                        [Value::Str(tag), Value::Global(_, storage_type), Value::Str(key), ..] if tag == "storage" => {
                            let dtype = Dtype::from_storage(storage_type).with_context(|| format!("unsupported storage type {storage_type}"))?;
                            self.stack.push(Value::Storage { key: key.clone(), dtype });
                        }
                        _ => bail!("unsupported persistent id"),
                    }
                }
                other => bail!("unsupported pickle opcode 0x{other:02x} at byte {}", r.at - 1),
            }
        }
    }
}

/// The object a plain pickle file (not a PyTorch archive) holds: lists, dicts, strings,
/// numbers, and objects kept as their constructor and state (NumPy arrays among them).
pub fn read_pickle(bytes: &[u8]) -> Result<Value> {
    Machine::default().run(bytes)
}

/// The items of a list or tuple.
pub fn list_items(value: &Value) -> Option<&[Value]> {
    match value {
        Value::List(items) | Value::Tuple(items) => Some(items),
        _ => None,
    }
}

/// Whole numbers from a list or tuple of ints, or from a one-dimensional NumPy integer array
/// (rebuilt by `numpy.core.multiarray._reconstruct`, its data as bytes, or as the latin-1
/// string protocol 2 writes through `_codecs.encode`, or `bytes()` when empty).
pub fn integers(value: &Value) -> Result<Vec<i64>> {
    if let Some(items) = list_items(value) {
        return items.iter().map(|v| if let Value::Int(i) = v { Ok(*i) } else { bail!("{} in a list of integers", v.kind()) }).collect();
    }
    let Value::Object { class, state: Some(state), .. } = value else { bail!("expected a list of integers or an array, found {}", value.kind()) };
    let is_array = matches!(class.as_ref(), Value::Global(m, n) if m.starts_with("numpy") && n == "_reconstruct");
    let Some([_, _, dtype, _, data]) = list_items(state).filter(|_| is_array).and_then(|s| <&[Value; 5]>::try_from(s).ok()) else {
        bail!("expected a list of integers or a NumPy array, found {}", value.kind())
    };
    let code = match dtype {
        Value::Object { args, .. } => list_items(args).and_then(|a| a.first()).and_then(|c| if let Value::Str(c) = c { Some(c.clone()) } else { None }),
        _ => None,
    }
    .context("a NumPy array without a dtype")?;
    let bytes = match data {
        Value::Bytes(b) => b.clone(),
        Value::Object { class, args, .. } if matches!(class.as_ref(), Value::Global(m, n) if m == "_codecs" && n == "encode") => match list_items(args) {
            Some([Value::Str(text), ..]) => text.chars().map(|c| c as u32 as u8).collect(),
            _ => bail!("a NumPy array whose data is not a string"),
        },
        // An empty array's data at protocol 2: `bytes()`.
        Value::Object { class, args, .. } if matches!(class.as_ref(), Value::Global(_, n) if n == "bytes") && list_items(args).is_some_and(|a| a.is_empty()) => Vec::new(),
        other => bail!("a NumPy array whose data is {}", other.kind()),
    };
    let width = match code.as_str() {
        "i8" | "u8" => 8,
        "i4" | "u4" => 4,
        "i2" | "u2" => 2,
        "i1" | "u1" => 1,
        other => bail!("a NumPy array of {other}, not of integers"),
    };
    let signed = code.starts_with('i');
    Ok(bytes
        .chunks_exact(width)
        .map(|b| {
            let mut le = [0u8; 8];
            le[..width].copy_from_slice(b);
            let raw = u64::from_le_bytes(le);
            let shift = 64 - 8 * width as u32;
            if signed { ((raw << shift) as i64) >> shift } else { raw as i64 }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/gnd_rtiny.pkl (make_retrieval_fixture.py): NumPy int64 and int32 arrays,
    /// empty ones and plain lists, pickled at protocol 2.
    #[test]
    fn reads_integer_lists_and_numpy_arrays_of_a_plain_pickle() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gnd_rtiny.pkl");
        let root = read_pickle(&std::fs::read(path).unwrap()).unwrap();
        let queries = list_items(root.get("gnd").unwrap()).unwrap();
        let ids = |q: usize, key: &str| integers(queries[q].get(key).unwrap()).unwrap();
        assert_eq!((ids(0, "easy"), ids(0, "hard"), ids(0, "junk")), (vec![2], vec![0], vec![1]));
        assert_eq!((ids(1, "easy"), ids(1, "hard"), ids(1, "junk")), (vec![0], vec![], vec![]));
        assert!(integers(queries[0].get("bbx").unwrap()).is_err(), "floats are not integers");
        assert_eq!(list_items(root.get("imlist").unwrap()).unwrap().len(), 4);
    }

    #[test]
    fn runs_a_small_protocol_2_program() {
        // pickle.dumps({'a': [1, -2, 3.5], 'b': (True, None), 'c': 70000}, protocol=2)
        let program = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00eX\x01\x00\x00\x00bq\x03\x88N\x86q\x04X\x01\x00\x00\x00cq\x05Jp\x11\x01\x00u.";
        let v = Machine::default().run(program).unwrap();
        assert_eq!(v.keys(), vec!["a", "b", "c"]);
        let Some(Value::List(a)) = v.get("a") else { panic!("{v:?}") };
        assert!(matches!(a.as_slice(), [Value::Int(1), Value::Int(-2), Value::Float(f)] if *f == 3.5));
        assert!(matches!(v.get("b"), Some(Value::Tuple(t)) if matches!(t.as_slice(), [Value::Bool(true), Value::None])));
        assert!(matches!(v.get("c"), Some(Value::Int(70000))));
    }
}
