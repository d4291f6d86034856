//! The JSON <-> automerge mapping, and the minimal-diff writer.
//!
//! | JSON                         | automerge                         |
//! |------------------------------|-----------------------------------|
//! | object                       | `Map`                             |
//! | array                        | `List`                            |
//! | string                       | scalar `Str` (never `Text`)       |
//! | integer in `i64`             | `Int`                             |
//! | integer above `i64::MAX`     | `Uint`                            |
//! | float (`1.0`, `1e3`, `-0.0`) | `F64` (so `1.0` stays `1.0`)      |
//! | `true` / `false`             | `Boolean`                         |
//! | `null`                       | `Null`                            |
//!
//! Reading also accepts values that this module never writes but that a
//! foreign change may contain: `Text` reads as a string, `Table` as an object,
//! `Counter` and `Timestamp` as integers, `Bytes` as an array of byte values,
//! and non-finite floats and unknown scalar types as `null`.
//!
//! Output key order: automerge maps have no insertion order, so every object in
//! the output has its keys sorted (by `str` ordering). With serde_json's
//! `preserve_order` the serialized text is then canonical: replicas holding the
//! same changes serialize byte-identical JSON. Input key order is not kept;
//! compare round-tripped values with `serde_json::Value` equality, which is
//! order-insensitive for objects.

use automerge::transaction::Transactable;
use automerge::{ObjId, ObjType, Prop, ReadDoc, ScalarValue, ScalarValueRef, ValueRef};
use serde_json::{Map, Number, Value};

use super::CrdtError;

/// Deepest nesting accepted on write and rendered on read: a value may nest at
/// most this many objects/arrays, the top-level object counting as one.
pub const MAX_DEPTH: usize = 128;

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// Render the root map of `doc` as a JSON object.
pub(crate) fn read_root<R: ReadDoc>(doc: &R) -> Value {
    read_map(doc, &automerge::ROOT, 0)
}

fn read_obj<R: ReadDoc>(doc: &R, obj: &ObjId, typ: ObjType, depth: usize) -> Value {
    if depth >= MAX_DEPTH {
        tracing::warn!(%obj, "object nested deeper than {MAX_DEPTH}; rendered as null");
        return Value::Null;
    }
    match typ {
        ObjType::Map | ObjType::Table => read_map(doc, obj, depth),
        ObjType::List => read_list(doc, obj, depth),
        ObjType::Text => match doc.text(obj) {
            Ok(s) => Value::String(s),
            Err(error) => {
                tracing::warn!(%obj, %error, "unreadable text object; rendered as null");
                Value::Null
            }
        },
    }
}

fn read_map<R: ReadDoc>(doc: &R, obj: &ObjId, depth: usize) -> Value {
    let mut entries: Vec<(String, Value)> = Vec::new();
    for item in doc.map_range(obj, ..) {
        let value = match &item.value {
            ValueRef::Object(t) => read_obj(doc, &item.id(), *t, depth + 1),
            ValueRef::Scalar(s) => scalar_ref_to_json(s),
        };
        entries.push((item.key.into_owned(), value));
    }
    // automerge already iterates keys in order; sorting makes the canonical
    // order a property of this module rather than of automerge internals.
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Value::Object(entries.into_iter().collect())
}

fn read_list<R: ReadDoc>(doc: &R, obj: &ObjId, depth: usize) -> Value {
    let mut out = Vec::new();
    for item in doc.list_range(obj, ..) {
        out.push(match &item.value {
            ValueRef::Object(t) => read_obj(doc, &item.id(), *t, depth + 1),
            ValueRef::Scalar(s) => scalar_ref_to_json(s),
        });
    }
    Value::Array(out)
}

fn f64_to_json(f: f64) -> Value {
    match Number::from_f64(f) {
        Some(n) => Value::Number(n),
        None => {
            tracing::warn!(value = f, "non-finite float; rendered as null");
            Value::Null
        }
    }
}

fn bytes_to_json(b: &[u8]) -> Value {
    Value::Array(b.iter().map(|x| Value::Number(Number::from(*x))).collect())
}

fn scalar_ref_to_json(s: &ScalarValueRef<'_>) -> Value {
    match s {
        ScalarValueRef::Bytes(b) => bytes_to_json(b),
        ScalarValueRef::Str(s) => Value::String(s.to_string()),
        ScalarValueRef::Int(i) | ScalarValueRef::Counter(i) | ScalarValueRef::Timestamp(i) => {
            Value::Number(Number::from(*i))
        }
        ScalarValueRef::Uint(u) => Value::Number(Number::from(*u)),
        ScalarValueRef::F64(f) => f64_to_json(*f),
        ScalarValueRef::Boolean(b) => Value::Bool(*b),
        ScalarValueRef::Unknown { .. } | ScalarValueRef::Null => Value::Null,
    }
}

fn scalar_to_json(s: &ScalarValue) -> Value {
    match s {
        ScalarValue::Bytes(b) => bytes_to_json(b),
        ScalarValue::Str(s) => Value::String(s.to_string()),
        ScalarValue::Int(i) | ScalarValue::Timestamp(i) => Value::Number(Number::from(*i)),
        ScalarValue::Counter(c) => Value::Number(Number::from(i64::from(c))),
        ScalarValue::Uint(u) => Value::Number(Number::from(*u)),
        ScalarValue::F64(f) => f64_to_json(*f),
        ScalarValue::Boolean(b) => Value::Bool(*b),
        ScalarValue::Unknown { .. } | ScalarValue::Null => Value::Null,
    }
}

// ---------------------------------------------------------------------------
// Value helpers
// ---------------------------------------------------------------------------

/// Exact equality of JSON values rendered from scalars: numbers must have the
/// same kind (integer vs float) and floats the same bits (`0.0` differs from
/// `-0.0`), so that "equal" means "serializes identically".
fn exact_eq(a: &Value, b: &Value) -> bool {
    #[derive(PartialEq)]
    enum N {
        I(i64),
        U(u64),
        F(u64),
        Other,
    }
    fn kind(n: &Number) -> N {
        if n.is_f64() {
            n.as_f64().map_or(N::Other, |f| N::F(f.to_bits()))
        } else if let Some(i) = n.as_i64() {
            N::I(i)
        } else if let Some(u) = n.as_u64() {
            N::U(u)
        } else {
            N::Other
        }
    }
    match (a, b) {
        (Value::Null, Value::Null) => true,
        (Value::Bool(x), Value::Bool(y)) => x == y,
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => {
            let (kx, ky) = (kind(x), kind(y));
            kx != N::Other && kx == ky
        }
        // Only reached for foreign scalars that render as arrays (bytes).
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| exact_eq(a, b))
        }
        _ => false,
    }
}

/// The automerge scalar for a JSON scalar (`None` for objects and arrays).
fn to_scalar(v: &Value) -> Result<Option<ScalarValue>, CrdtError> {
    Ok(Some(match v {
        Value::Null => ScalarValue::Null,
        Value::Bool(b) => ScalarValue::Boolean(*b),
        Value::String(s) => ScalarValue::Str(s.as_str().into()),
        Value::Number(n) => {
            if n.is_f64() {
                match n.as_f64() {
                    Some(f) if f.is_finite() => ScalarValue::F64(f),
                    _ => return Err(CrdtError::UnsupportedNumber(n.to_string())),
                }
            } else if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                return Err(CrdtError::UnsupportedNumber(n.to_string()));
            }
        }
        Value::Array(_) | Value::Object(_) => return Ok(None),
    }))
}

/// Fail if `v` nests objects/arrays deeper than [`MAX_DEPTH`]. Iterative, so a
/// hostile, very deep value cannot overflow the stack here; every recursive
/// walk in this module runs only on values that passed this check.
pub(crate) fn check_depth(v: &Value) -> Result<(), CrdtError> {
    let mut stack: Vec<(&Value, usize)> = vec![(v, 0)];
    while let Some((v, d)) = stack.pop() {
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Object(m) => Box::new(m.values()),
            Value::Array(a) => Box::new(a.iter()),
            _ => continue,
        };
        if d >= MAX_DEPTH {
            return Err(CrdtError::TooDeep { max: MAX_DEPTH });
        }
        stack.extend(children.map(|c| (c, d + 1)));
    }
    Ok(())
}

/// RFC 7386 JSON merge patch, in place. Callers check the depth of `patch`
/// first; recursion follows the patch, so it is bounded by that depth.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.shift_remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// The RFC 7386 merge patch that turns `from` into `to` (`None`: they are
/// equal). Objects are diffed key by key; anything else that differs is
/// replaced whole. (A merge patch cannot set a value to `null`: such a
/// value in `to` comes out as a deletion.)
pub fn merge_diff(from: &Value, to: &Value) -> Option<Value> {
    match (from, to) {
        (Value::Object(f), Value::Object(t)) => {
            let mut patch = Map::new();
            for (k, v) in t {
                match f.get(k) {
                    Some(old) => {
                        if let Some(d) = merge_diff(old, v) {
                            patch.insert(k.clone(), d);
                        }
                    }
                    None => {
                        patch.insert(k.clone(), v.clone());
                    }
                }
            }
            for k in f.keys() {
                if !t.contains_key(k) {
                    patch.insert(k.clone(), Value::Null);
                }
            }
            (!patch.is_empty()).then_some(Value::Object(patch))
        }
        _ if from == to => None,
        _ => Some(to.clone()),
    }
}

// ---------------------------------------------------------------------------
// Writing: make the object at `obj` equal `new` with as few ops as possible.
// ---------------------------------------------------------------------------

/// Make the map `obj` equal to `new`: delete keys missing from `new`, and sync
/// every key of `new` (in sorted order, so an edit's ops do not depend on the
/// input's key order). Unchanged values emit no op.
pub(crate) fn sync_map<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    new: &Map<String, Value>,
    depth: usize,
) -> Result<(), CrdtError> {
    if depth >= MAX_DEPTH {
        return Err(CrdtError::TooDeep { max: MAX_DEPTH });
    }
    let existing: Vec<String> = tx.keys(obj).collect();
    for k in existing {
        if !new.contains_key(&k) {
            tx.delete(obj, k.as_str())?;
        }
    }
    let mut entries: Vec<(&String, &Value)> = new.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in entries {
        sync_prop(tx, obj, Prop::Map(k.clone()), v, depth + 1)?;
    }
    Ok(())
}

/// Element-wise sync of the common prefix, then delete or append at the tail.
fn sync_list<T: Transactable>(
    tx: &mut T,
    list: &ObjId,
    new: &[Value],
    depth: usize,
) -> Result<(), CrdtError> {
    if depth >= MAX_DEPTH {
        return Err(CrdtError::TooDeep { max: MAX_DEPTH });
    }
    let len = tx.length(list);
    for (i, v) in new.iter().enumerate().take(len) {
        sync_prop(tx, list, Prop::Seq(i), v, depth + 1)?;
    }
    if len > new.len() {
        for i in (new.len()..len).rev() {
            tx.delete(list, i)?;
        }
    } else {
        for (i, v) in new.iter().enumerate().skip(len) {
            insert_fresh(tx, list, i, v, depth + 1)?;
        }
    }
    Ok(())
}

enum Current {
    Absent,
    Map(ObjId),
    List(ObjId),
    Text(ObjId),
    Scalar(Value),
}

fn sync_prop<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    new: &Value,
    depth: usize,
) -> Result<(), CrdtError> {
    let current = match tx.get(obj, prop.clone())? {
        None => Current::Absent,
        Some((automerge::Value::Object(ObjType::Map), id)) => Current::Map(id),
        Some((automerge::Value::Object(ObjType::List), id)) => Current::List(id),
        Some((automerge::Value::Object(ObjType::Text), id)) => Current::Text(id),
        // A legacy table is rewritten as a map on the first edit that touches it.
        Some((automerge::Value::Object(ObjType::Table), _)) => Current::Absent,
        Some((automerge::Value::Scalar(s), _)) => Current::Scalar(scalar_to_json(&s)),
    };
    match (current, new) {
        (Current::Map(id), Value::Object(m)) => sync_map(tx, &id, m, depth),
        (Current::List(id), Value::Array(a)) => sync_list(tx, &id, a, depth),
        (Current::Text(id), Value::String(s)) if tx.text(&id)? == *s => Ok(()),
        (Current::Scalar(cur), _) if exact_eq(&cur, new) => Ok(()),
        _ => put_fresh(tx, obj, prop, new, depth),
    }
}

/// Write `new` at `prop`, overwriting whatever is there.
fn put_fresh<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: Prop,
    new: &Value,
    depth: usize,
) -> Result<(), CrdtError> {
    match new {
        Value::Object(m) => {
            let id = tx.put_object(obj, prop, ObjType::Map)?;
            fill_map(tx, &id, m, depth)
        }
        Value::Array(a) => {
            let id = tx.put_object(obj, prop, ObjType::List)?;
            fill_list(tx, &id, a, depth)
        }
        scalar => {
            if let Some(s) = to_scalar(scalar)? {
                let before = tx.pending_ops();
                tx.put(obj, prop.clone(), s.clone())?;
                if tx.pending_ops() == before {
                    // automerge skips a put of a value it deems equal to the
                    // current one (`0.0 == -0.0`), but they serialize
                    // differently: delete and write again.
                    tx.delete(obj, prop.clone())?;
                    match prop {
                        Prop::Map(_) => tx.put(obj, prop, s)?,
                        Prop::Seq(i) => tx.insert(obj, i, s)?,
                    }
                }
            }
            Ok(())
        }
    }
}

fn insert_fresh<T: Transactable>(
    tx: &mut T,
    list: &ObjId,
    index: usize,
    new: &Value,
    depth: usize,
) -> Result<(), CrdtError> {
    match new {
        Value::Object(m) => {
            let id = tx.insert_object(list, index, ObjType::Map)?;
            fill_map(tx, &id, m, depth)
        }
        Value::Array(a) => {
            let id = tx.insert_object(list, index, ObjType::List)?;
            fill_list(tx, &id, a, depth)
        }
        scalar => {
            if let Some(s) = to_scalar(scalar)? {
                tx.insert(list, index, s)?;
            }
            Ok(())
        }
    }
}

fn fill_map<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    new: &Map<String, Value>,
    depth: usize,
) -> Result<(), CrdtError> {
    if depth >= MAX_DEPTH {
        return Err(CrdtError::TooDeep { max: MAX_DEPTH });
    }
    let mut entries: Vec<(&String, &Value)> = new.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));
    for (k, v) in entries {
        put_fresh(tx, obj, Prop::Map(k.clone()), v, depth + 1)?;
    }
    Ok(())
}

fn fill_list<T: Transactable>(
    tx: &mut T,
    list: &ObjId,
    new: &[Value],
    depth: usize,
) -> Result<(), CrdtError> {
    if depth >= MAX_DEPTH {
        return Err(CrdtError::TooDeep { max: MAX_DEPTH });
    }
    for (i, v) in new.iter().enumerate() {
        insert_fresh(tx, list, i, v, depth + 1)?;
    }
    Ok(())
}
