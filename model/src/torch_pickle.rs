//! Reading `torch.save` archives without Python: the zip container (PyTorch ≥ 1.6), the
//! subset of the pickle machine that `torch.save` emits (protocol 2, and 3–5 for files written
//! with a newer protocol), and tensors rebuilt from the archive's storages.
//!
//! Nothing of the file is executed: classes other than the few `torch.save` needs
//! (`collections.OrderedDict`, `torch._utils._rebuild_tensor_v2`, `_rebuild_parameter`, the
//! storage types) become inert [`Value::Object`]s, which is how the numpy scalars, optimizer
//! state and training curves of an nnU-Net checkpoint are read past. Every length, index and
//! tensor extent is checked against the file, so a broken or hostile file is an error naming
//! what is wrong, never a panic or an allocation it did not pay for.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use tch::{Kind, Tensor};

/// A decoded pickle value. Tensors live in [`Checkpoint::tensors`]; values refer to them by
/// index, so values are plain data that the memo can copy.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    /// Dicts keep their order (an `OrderedDict` state dict is read in its order).
    Dict(Vec<(Value, Value)>),
    /// A class or function named by the file (`module.name`).
    Global(String),
    /// An instance of a class this reader does not rebuild: its class, the arguments it was
    /// built from and the state set on it.
    Object {
        class: String,
        args: Box<Value>,
        state: Option<Box<Value>>,
    },
    /// A storage of the archive, as `torch.save` refers to it (persistent id).
    Storage {
        key: String,
        kind: Kind,
    },
    /// Index into [`Checkpoint::tensors`].
    Tensor(usize),
}

impl Value {
    /// The value under string key `key` of a dict.
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Dict(items) => items.iter().find(|(k, _)| matches!(k, Value::Str(s) if s == key)).map(|(_, v)| v),
            _ => None,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "a bool",
            Value::Int(_) => "an int",
            Value::Float(_) => "a float",
            Value::Str(_) => "a string",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Dict(_) => "a dict",
            Value::Global(_) => "a global",
            Value::Object { .. } => "an object",
            Value::Storage { .. } => "a storage",
            Value::Tensor(_) => "a tensor",
        }
    }
}

/// A `torch.save` file, read.
pub struct Checkpoint {
    /// What was saved.
    pub root: Value,
    pub tensors: Vec<Tensor>,
}

impl Checkpoint {
    /// Reads the `torch.save` archive at `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut zip = zip::ZipArchive::new(file).map_err(|e| {
            anyhow!(
                "{}: not a torch.save zip archive ({e}); files of PyTorch < 1.6 (legacy format) are not read: \
                 re-save them with a current PyTorch",
                path.display()
            )
        })?;
        let pickle_name = (0..zip.len())
            .filter_map(|i| zip.by_index(i).ok().map(|f| f.name().to_string()))
            .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .ok_or_else(|| anyhow!("{}: no <archive>/data.pkl in the zip: not a torch.save file", path.display()))?;
        let prefix = pickle_name.trim_end_matches("data.pkl").to_string();
        if let Ok(mut order) = zip.by_name(&format!("{prefix}byteorder")) {
            let mut text = String::new();
            order.read_to_string(&mut text)?;
            ensure!(
                text.trim() == "little",
                "{}: byte order {text:?}: only little-endian archives are read",
                path.display()
            );
        }
        let pickle = read_entry(&mut zip, &pickle_name).with_context(|| path.display().to_string())?;
        let mut machine = Machine::new(&pickle);
        let root = machine.run().with_context(|| format!("{}: unpickling {pickle_name}", path.display()))?;
        let mut storages = HashMap::new();
        let mut tensors = Vec::new();
        let root = materialize(root, &mut |spec: TensorSpec| {
            if !storages.contains_key(&spec.storage) {
                let bytes = read_entry(&mut zip, &format!("{prefix}data/{}", spec.storage))?;
                storages.insert(spec.storage.clone(), bytes);
            }
            tensors.push(spec.build(&storages[&spec.storage])?);
            Ok(tensors.len() - 1)
        })
        .with_context(|| path.display().to_string())?;
        Ok(Checkpoint { root, tensors })
    }
}

fn read_entry(zip: &mut zip::ZipArchive<std::fs::File>, name: &str) -> Result<Vec<u8>> {
    let mut entry = zip.by_name(name).map_err(|e| anyhow!("archive entry {name}: {e}"))?;
    let mut bytes = Vec::with_capacity(entry.size().min(1 << 30) as usize);
    entry.read_to_end(&mut bytes).with_context(|| format!("reading archive entry {name}"))?;
    Ok(bytes)
}

/// A tensor as `_rebuild_tensor_v2` describes it: a view of a storage.
#[derive(Clone, Debug, PartialEq)]
struct TensorSpec {
    storage: String,
    kind: Kind,
    offset: i64,
    size: Vec<i64>,
    stride: Vec<i64>,
}

impl TensorSpec {
    fn from_args(args: &[Value]) -> Result<Self> {
        let [Value::Storage { key, kind }, Value::Int(offset), Value::Tuple(size), Value::Tuple(stride), ..] = args
        else {
            bail!("_rebuild_tensor_v2 with unexpected arguments ({} of them)", args.len())
        };
        let ints = |v: &[Value], what: &str| -> Result<Vec<i64>> {
            v.iter()
                .map(|x| match x {
                    Value::Int(i) if *i >= 0 => Ok(*i),
                    other => bail!("tensor {what}: {} is not a non-negative int", other.describe()),
                })
                .collect()
        };
        let (size, stride) = (ints(size, "size")?, ints(stride, "stride")?);
        ensure!(
            size.len() == stride.len(),
            "tensor of storage {key}: {} sizes but {} strides",
            size.len(),
            stride.len()
        );
        ensure!(*offset >= 0, "tensor of storage {key}: negative offset {offset}");
        Ok(TensorSpec { storage: key.clone(), kind: *kind, offset: *offset, size, stride })
    }

    /// The tensor, copied out of its storage's bytes; its whole extent must lie inside them.
    fn build(&self, bytes: &[u8]) -> Result<Tensor> {
        let element = self.kind.elt_size_in_bytes() as i64;
        ensure!(
            bytes.len() as i64 % element == 0,
            "storage {}: {} bytes is no whole number of {:?} elements",
            self.storage,
            bytes.len(),
            self.kind
        );
        let numel = bytes.len() as i64 / element;
        if self.size.iter().all(|&s| s > 0) {
            let last = self
                .size
                .iter()
                .zip(&self.stride)
                .try_fold(self.offset, |acc, (&s, &st)| acc.checked_add((s - 1).checked_mul(st)?))
                .ok_or_else(|| anyhow!("storage {}: tensor extent overflows", self.storage))?;
            ensure!(
                last < numel,
                "storage {}: tensor of size {:?} (stride {:?}, offset {}) reaches element {last}, the storage has {numel}",
                self.storage,
                self.size,
                self.stride,
                self.offset
            );
        }
        let flat = Tensor::f_from_data_size(bytes, &[numel], self.kind)?;
        Ok(flat.f_as_strided(&self.size, &self.stride, Some(self.offset))?.f_contiguous()?)
    }
}

/// Replaces every rebuilt-tensor object by [`Value::Tensor`], calling `load` for each.
fn materialize(value: Value, load: &mut impl FnMut(TensorSpec) -> Result<usize>) -> Result<Value> {
    Ok(match value {
        Value::Object { class, args, state } => match (class.as_str(), *args) {
            ("torch._utils._rebuild_tensor_v2", Value::Tuple(a)) => Value::Tensor(load(TensorSpec::from_args(&a)?)?),
            ("torch._utils._rebuild_parameter", Value::Tuple(a)) if !a.is_empty() => {
                materialize(a.into_iter().next().unwrap_or(Value::None), load)?
            }
            (_, args) => Value::Object {
                class,
                args: Box::new(materialize(args, load)?),
                state: match state {
                    Some(s) => Some(Box::new(materialize(*s, load)?)),
                    None => None,
                },
            },
        },
        Value::List(v) => Value::List(v.into_iter().map(|x| materialize(x, load)).collect::<Result<_>>()?),
        Value::Tuple(v) => Value::Tuple(v.into_iter().map(|x| materialize(x, load)).collect::<Result<_>>()?),
        Value::Dict(v) => Value::Dict(
            v.into_iter().map(|(k, x)| Ok((materialize(k, load)?, materialize(x, load)?))).collect::<Result<_>>()?,
        ),
        other => other,
    })
}

/// A storage type's element kind (`torch.FloatStorage` …).
fn storage_kind(name: &str) -> Option<Kind> {
    Some(match name.strip_prefix("torch.")? {
        "FloatStorage" => Kind::Float,
        "DoubleStorage" => Kind::Double,
        "HalfStorage" => Kind::Half,
        "BFloat16Storage" => Kind::BFloat16,
        "LongStorage" => Kind::Int64,
        "IntStorage" => Kind::Int,
        "ShortStorage" => Kind::Int16,
        "CharStorage" => Kind::Int8,
        "ByteStorage" => Kind::Uint8,
        "BoolStorage" => Kind::Bool,
        _ => return None,
    })
}

/// Stack items: values and the MARK opcode's marker.
#[derive(Clone, Debug)]
enum Item {
    Mark,
    Value(Value),
}

/// The pickle machine over one pickle's bytes.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Item>,
    memo: HashMap<u32, Value>,
}

impl<'a> Machine<'a> {
    fn new(data: &'a [u8]) -> Self {
        Machine { data, pos: 0, stack: Vec::new(), memo: HashMap::new() }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| anyhow!("truncated at byte {}: {n} more bytes wanted", self.pos))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn le<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("take returns N bytes"))
    }

    fn len(&mut self, width: usize) -> Result<usize> {
        let n = match width {
            1 => self.u8()? as u64,
            4 => u32::from_le_bytes(self.le()?) as u64,
            _ => u64::from_le_bytes(self.le()?),
        };
        usize::try_from(n).map_err(|_| anyhow!("length {n} at byte {}", self.pos))
    }

    fn string(&mut self, width: usize) -> Result<String> {
        let n = self.len(width)?;
        let bytes = self.take(n)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| anyhow!("string at byte {} is not UTF-8", self.pos))
    }

    fn line(&mut self) -> Result<String> {
        let rest = &self.data[self.pos..];
        let n =
            rest.iter().position(|&b| b == b'\n').ok_or_else(|| anyhow!("unterminated line at byte {}", self.pos))?;
        let text = std::str::from_utf8(&rest[..n]).map_err(|_| anyhow!("line at byte {} is not UTF-8", self.pos))?;
        self.pos += n + 1;
        Ok(text.to_string())
    }

    fn push(&mut self, v: Value) {
        self.stack.push(Item::Value(v));
    }

    fn pop(&mut self) -> Result<Value> {
        match self.stack.pop() {
            Some(Item::Value(v)) => Ok(v),
            Some(Item::Mark) => bail!("unexpected MARK on the stack at byte {}", self.pos),
            None => bail!("stack underflow at byte {}", self.pos),
        }
    }

    /// The items above the topmost MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let mark = self
            .stack
            .iter()
            .rposition(|i| matches!(i, Item::Mark))
            .ok_or_else(|| anyhow!("no MARK on the stack at byte {}", self.pos))?;
        let items = self.stack.split_off(mark + 1);
        self.stack.pop();
        Ok(items
            .into_iter()
            .map(|i| match i {
                Item::Value(v) => v,
                Item::Mark => unreachable!("rposition found the topmost mark"),
            })
            .collect())
    }

    fn top_mut(&mut self) -> Result<&mut Value> {
        match self.stack.last_mut() {
            Some(Item::Value(v)) => Ok(v),
            _ => bail!("no value on the stack at byte {}", self.pos),
        }
    }

    fn memo_get(&self, key: u32) -> Result<Value> {
        self.memo.get(&key).cloned().ok_or_else(|| anyhow!("memo key {key} unset at byte {}", self.pos))
    }

    fn memo_put(&mut self, key: u32) -> Result<()> {
        let v = match self.stack.last() {
            Some(Item::Value(v)) => v.clone(),
            _ => bail!("memoizing without a value at byte {}", self.pos),
        };
        self.memo.insert(key, v);
        Ok(())
    }

    fn run(&mut self) -> Result<Value> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?;
                    ensure!(proto <= 5, "pickle protocol {proto}");
                }
                0x95 => {
                    self.take(8)?; // FRAME: a length hint only
                }
                b'.' => return self.pop(),
                b'(' => self.stack.push(Item::Mark),
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = self.u8()?;
                    self.push(Value::Int(v as i64))
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64))
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.le()?);
                    self.push(Value::Int(v as i64))
                }
                0x8a => {
                    let n = self.u8()? as usize;
                    let bytes = self.take(n)?;
                    ensure!(n <= 8, "LONG1 of {n} bytes at byte {at}: integers beyond 64 bits are not read");
                    let negative = bytes.last().is_some_and(|b| b & 0x80 != 0);
                    let mut buf = [if negative { 0xff } else { 0 }; 8];
                    buf[..n].copy_from_slice(bytes);
                    self.push(Value::Int(i64::from_le_bytes(buf)))
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.le()?);
                    self.push(Value::Float(v))
                }
                b'X' => {
                    let s = self.string(4)?;
                    self.push(Value::Str(s))
                }
                0x8c => {
                    let s = self.string(1)?;
                    self.push(Value::Str(s))
                }
                0x8d => {
                    let s = self.string(8)?;
                    self.push(Value::Str(s))
                }
                b'U' | b'C' | b'B' | 0x8e => {
                    let width = match op {
                        b'U' | b'C' => 1,
                        b'B' => 4,
                        _ => 8,
                    };
                    let n = self.len(width)?;
                    let bytes = self.take(n)?.to_vec();
                    self.push(Value::Bytes(bytes))
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                0x8f => self.push(Value::List(Vec::new())), // EMPTY_SET, read as a list
                b't' => {
                    let items = self.pop_mark()?;
                    self.push(Value::Tuple(items))
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    ensure!(self.stack.len() >= n, "TUPLE{n} on a short stack at byte {at}");
                    let mut items = (0..n).map(|_| self.pop()).collect::<Result<Vec<_>>>()?;
                    items.reverse();
                    self.push(Value::Tuple(items))
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push(Value::List(items)) // FROZENSET
                }
                b'q' => {
                    let k = self.u8()? as u32;
                    self.memo_put(k)?
                }
                b'r' => {
                    let k = u32::from_le_bytes(self.le()?);
                    self.memo_put(k)?
                }
                0x94 => {
                    let k = self.memo.len() as u32;
                    self.memo_put(k)?
                }
                b'h' => {
                    let k = self.u8()? as u32;
                    let v = self.memo_get(k)?;
                    self.push(v)
                }
                b'j' => {
                    let k = u32::from_le_bytes(self.le()?);
                    let v = self.memo_get(k)?;
                    self.push(v)
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.push(Value::Global(format!("{module}.{name}")))
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        bail!("STACK_GLOBAL without two strings at byte {at}")
                    };
                    self.push(Value::Global(format!("{module}.{name}")))
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = persistent_load(pid).with_context(|| format!("persistent id at byte {at}"))?;
                    self.push(v)
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let callable = self.pop()?;
                    let v = reduce(callable, args).with_context(|| format!("REDUCE at byte {at}"))?;
                    self.push(v)
                }
                b'b' => {
                    let state = self.pop()?;
                    // Anything else (an OrderedDict's empty instance state, a tensor's Python
                    // attributes) holds nothing a state dict needs.
                    if let Value::Object { state: slot, .. } = self.top_mut()? {
                        *slot = Some(Box::new(state));
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top_mut()? {
                        Value::List(items) => items.push(v),
                        other => bail!("APPEND to {} at byte {at}", other.describe()),
                    }
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    match self.top_mut()? {
                        Value::List(list) => list.extend(items),
                        other => bail!("APPENDS to {} at byte {at}", other.describe()),
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top_mut()? {
                        Value::Dict(items) => items.push((k, v)),
                        other => bail!("SETITEM on {} at byte {at}", other.describe()),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    ensure!(items.len() % 2 == 0, "SETITEMS with an odd number of items at byte {at}");
                    let mut it = items.into_iter();
                    let mut pairs = Vec::new();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    match self.top_mut()? {
                        Value::Dict(d) => d.extend(pairs),
                        other => bail!("SETITEMS on {} at byte {at}", other.describe()),
                    }
                }
                other => bail!("pickle opcode 0x{other:02x} at byte {at} is not one torch.save writes"),
            }
        }
    }
}

/// `torch.save`'s persistent ids: `('storage', <storage type>, key, location, numel)`.
fn persistent_load(pid: Value) -> Result<Value> {
    let Value::Tuple(parts) = pid else { bail!("persistent id is {}, not a tuple", pid.describe()) };
    match parts.as_slice() {
        [Value::Str(tag), Value::Global(storage), Value::Str(key), ..] if tag == "storage" => {
            let kind = storage_kind(storage).ok_or_else(|| anyhow!("storage {key}: unknown storage type {storage}"))?;
            Ok(Value::Storage { key: key.clone(), kind })
        }
        _ => bail!("persistent id is not a torch storage reference"),
    }
}

/// Applies a REDUCE: the classes `torch.save` needs are rebuilt, every other one stays inert.
fn reduce(callable: Value, args: Value) -> Result<Value> {
    let Value::Global(class) = callable else { bail!("calling {}, not a global", callable.describe()) };
    Ok(match class.as_str() {
        "collections.OrderedDict" => match args {
            Value::Tuple(a) if a.is_empty() => Value::Dict(Vec::new()),
            Value::Tuple(a) => match a.into_iter().next() {
                Some(Value::List(pairs)) => Value::Dict(
                    pairs
                        .into_iter()
                        .map(|p| match p {
                            Value::Tuple(kv) if kv.len() == 2 => {
                                let mut kv = kv.into_iter();
                                Ok((kv.next().unwrap_or(Value::None), kv.next().unwrap_or(Value::None)))
                            }
                            other => bail!("OrderedDict item is {}", other.describe()),
                        })
                        .collect::<Result<_>>()?,
                ),
                _ => bail!("OrderedDict built from something other than a list of pairs"),
            },
            other => bail!("OrderedDict with arguments {}", other.describe()),
        },
        _ => Value::Object { class, args: Box::new(args), state: None },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(bytes: &[u8]) -> Result<Value> {
        Machine::new(bytes).run()
    }

    #[test]
    fn reads_basic_protocol_2_values() {
        // pickle.dumps({'a': [1, -2, 3.5, None, True], 'b': (300, 70000, 'x')}, protocol=2)
        let bytes = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00N\x88eX\x01\x00\x00\x00bq\x03M,\x01Jp\x11\x01\x00X\x01\x00\x00\x00xq\x04\x87q\x05u.";
        let v = run(bytes).unwrap();
        assert_eq!(
            v.get("a"),
            Some(&Value::List(vec![Value::Int(1), Value::Int(-2), Value::Float(3.5), Value::None, Value::Bool(true)]))
        );
        assert_eq!(v.get("b"), Some(&Value::Tuple(vec![Value::Int(300), Value::Int(70000), Value::Str("x".into())])));
    }

    #[test]
    fn broken_pickles_are_errors_not_panics() {
        for bytes in [&b"\x80\x02"[..], b"X\xff\xff\xff\x7fab", b"h\x05.", b"u.", b"\x80\x02K\x01\xff", b"t."] {
            assert!(run(bytes).is_err(), "{bytes:?}");
        }
        // an unknown class is kept inert, not called
        let v = run(b"cos\nsystem\nX\x02\x00\x00\x00lsq\x00\x85R.").unwrap();
        assert!(matches!(v, Value::Object { ref class, .. } if class == "os.system"));
    }

    #[test]
    fn tensor_extent_is_checked_against_its_storage() {
        let spec =
            TensorSpec { storage: "0".into(), kind: Kind::Float, offset: 1, size: vec![2, 2], stride: vec![2, 1] };
        let bytes: Vec<u8> = (0..5).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let t = spec.build(&bytes).unwrap();
        assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1)).unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        let too_far = TensorSpec { offset: 2, ..spec };
        let err = too_far.build(&bytes).unwrap_err().to_string();
        assert!(err.contains("reaches element 5"), "{err}");
    }
}
