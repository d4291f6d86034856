//! keel's own reader of one automerge change, for the fold's fast path
//! ([`super::shadow`]).
//!
//! automerge's `Change::try_from` plus `decode` cost about 10 µs for a
//! pod-status change of seven ops; this reader decodes the same bytes in
//! well under that, without allocating per value. It reads only what keel
//! writes: one uncompressed change chunk whose columns are the change-op
//! columns automerge 0.12 writes (no deflate, no unknown columns), with at
//! most [`MAX_OPS`] ops. Anything else is "not for the fast path" (`None`),
//! never an error: the slow path (automerge) then decides, with its own
//! errors.
//!
//! **Canonical bytes only.** automerge keeps a change as its op set and
//! rebuilds the change from it when asked (saving, `get_changes`); keel
//! refuses a change that would not rebuild bit for bit (`verify_faithful`).
//! A change read here is accepted only if [`encode_body`] — the column
//! encoders automerge uses, written again — gives back exactly the bytes
//! received. A hand-made change with, say, a literal run where automerge
//! writes a repeat run goes to the slow path, which refuses it.

use sha2::Digest;

/// Most ops in a change read here (a pod status has about ten; larger
/// changes go to automerge).
pub(crate) const MAX_OPS: usize = 4096;

const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_CHANGE: u8 = 1;

// Column specs: (column id << 4) | type; no deflate bit.
const OBJ_ACTOR: u64 = 0x01;
const OBJ_CTR: u64 = 0x02;
const KEY_ACTOR: u64 = 0x11;
const KEY_CTR: u64 = 0x13;
const KEY_STR: u64 = 0x15;
const INSERT: u64 = 0x34;
const ACTION: u64 = 0x42;
const VAL_META: u64 = 0x56;
const VAL_RAW: u64 = 0x57;
const PRED_GROUP: u64 = 0x70;
const PRED_ACTOR: u64 = 0x71;
const PRED_CTR: u64 = 0x73;
/// The columns, in the order automerge writes them.
const SPECS: [u64; 12] = [
    OBJ_ACTOR, OBJ_CTR, KEY_ACTOR, KEY_CTR, KEY_STR, INSERT, ACTION, VAL_META, VAL_RAW, PRED_GROUP,
    PRED_ACTOR, PRED_CTR,
];

/// An op id inside one change: (index into the change's actors, counter).
/// Index 0 is the change's author, 1.. its other actors.
pub(crate) type LocalId = (u64, u64);

/// The key of an op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Key<'a> {
    /// A map key.
    Prop(&'a str),
    /// The head of a list (insert at the front).
    Head,
    /// A list element, by the id of the op that inserted it.
    Elem(LocalId),
}

/// A scalar value of an op.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Scalar<'a> {
    Null,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F64(f64),
    Str(&'a str),
}

/// Op actions keel's documents use (automerge's numbering).
pub(crate) const MAKE_MAP: u64 = 0;
pub(crate) const PUT: u64 = 1;
pub(crate) const MAKE_LIST: u64 = 2;
pub(crate) const DELETE: u64 = 3;

/// One op of a change.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Op<'a> {
    /// `None`: the root map.
    pub obj: Option<LocalId>,
    pub key: Key<'a>,
    pub insert: bool,
    pub action: u64,
    pub value: Scalar<'a>,
    /// Range into [`Decoded::preds`].
    pub preds: std::ops::Range<usize>,
}

/// One change, read.
#[derive(Debug, Clone)]
pub(crate) struct Decoded<'a> {
    /// The change hash (SHA-256 of type, length and body).
    pub hash: [u8; 32],
    pub deps: Vec<[u8; 32]>,
    pub actor: &'a [u8],
    pub seq: u64,
    pub start_op: u64,
    pub message: &'a str,
    pub others: Vec<&'a [u8]>,
    pub ops: Vec<Op<'a>>,
    pub preds: Vec<LocalId>,
    time: i64,
    extra: &'a [u8],
    body: &'a [u8],
}

impl Decoded<'_> {
    /// The bytes of one actor index of this change.
    pub(crate) fn actor_at(&self, index: u64) -> Option<&[u8]> {
        match index {
            0 => Some(self.actor),
            i => self.others.get(usize::try_from(i - 1).ok()?).copied(),
        }
    }
}

/// Read `bytes` as one change for the fast path: `None` if they are not
/// one well-formed, canonical, uncompressed change chunk of the shapes keel
/// writes (see the module documentation).
pub(crate) fn decode(bytes: &[u8]) -> Option<Decoded<'_>> {
    if bytes.get(..4)? != MAGIC || *bytes.get(8)? != CHUNK_CHANGE {
        return None;
    }
    let mut r = Reader(bytes.get(9..)?);
    let len = usize::try_from(r.uleb()?).ok()?;
    let body = r.0;
    if body.len() != len {
        return None;
    }
    let hash: [u8; 32] = sha2::Sha256::new()
        .chain_update(bytes.get(8..bytes.len() - body.len())?)
        .chain_update(body)
        .finalize()
        .into();
    if bytes.get(4..8)? != hash.get(..4)? {
        return None;
    }
    let mut r = Reader(body);
    let ndeps = usize::try_from(r.uleb()?).ok()?;
    if ndeps > body.len() / 32 {
        return None;
    }
    let mut deps = Vec::with_capacity(ndeps);
    for _ in 0..ndeps {
        deps.push(r.take(32)?.try_into().ok()?);
    }
    let actor = r.prefixed()?;
    let seq = r.uleb()?;
    let start_op = r.uleb()?;
    if start_op == 0 {
        return None;
    }
    let time = r.sleb()?;
    let message = std::str::from_utf8(r.prefixed()?).ok()?;
    let nothers = usize::try_from(r.uleb()?).ok()?;
    if nothers > body.len() {
        return None;
    }
    let mut others = Vec::with_capacity(nothers);
    for _ in 0..nothers {
        others.push(r.prefixed()?);
    }
    let ncols = usize::try_from(r.uleb()?).ok()?;
    if ncols > SPECS.len() {
        return None;
    }
    let mut cols: [&[u8]; 12] = [&[]; 12];
    let mut lens = Vec::with_capacity(ncols);
    let mut last = None;
    for _ in 0..ncols {
        let spec = r.uleb()?;
        let len = usize::try_from(r.uleb()?).ok()?;
        let at = SPECS.iter().position(|s| *s == spec)?;
        if last.is_some_and(|l| l >= at) || len == 0 {
            return None;
        }
        last = Some(at);
        lens.push((at, len));
    }
    for (at, len) in lens {
        *cols.get_mut(at)? = r.take(len)?;
    }
    let extra = r.0;
    let [
        obj_actor,
        obj_ctr,
        key_actor,
        key_ctr,
        key_str,
        insert,
        action,
        meta,
        raw,
        pred_group,
        pred_actor,
        pred_ctr,
    ] = cols;

    let action = rle(action, Reader::uleb)?;
    let n = action.len();
    if n > MAX_OPS {
        return None;
    }
    let fit = |v: Option<Vec<Option<u64>>>| v.filter(|v| v.len() <= n);
    let obj_actor = fit(rle(obj_actor, Reader::uleb))?;
    let obj_ctr = fit(rle(obj_ctr, Reader::uleb))?;
    let key_actor = fit(rle(key_actor, Reader::uleb))?;
    let key_ctr = delta(key_ctr, n)?;
    let key_str = rle(key_str, Reader::str)?;
    let insert = booleans(insert, n)?;
    let meta = fit(rle(meta, Reader::uleb))?;
    let pred_group = fit(rle(pred_group, Reader::uleb))?;
    let npreds = pred_group.iter().flatten().try_fold(0usize, |a, c| {
        a.checked_add(usize::try_from(*c).ok()?)
            .filter(|a| *a <= MAX_OPS)
    })?;
    let pred_actor = rle(pred_actor, Reader::uleb)?;
    let pred_ctr = delta(pred_ctr, npreds)?;
    if key_str.len() > n || pred_actor.len() != npreds || pred_ctr.len() != npreds {
        return None;
    }
    let mut preds = Vec::with_capacity(npreds);
    for (a, c) in pred_actor.iter().zip(&pred_ctr) {
        preds.push(((*a)?, u64::try_from((*c)?).ok()?));
    }
    let nactors = 1 + others.len() as u64;
    if preds.iter().any(|(a, _)| *a >= nactors) {
        return None;
    }

    let mut raw = Reader(raw);
    let mut ops = Vec::with_capacity(n);
    let mut pred_at = 0usize;
    let get = |v: &Vec<Option<u64>>, i: usize| v.get(i).copied().flatten();
    for i in 0..n {
        let obj = match (get(&obj_actor, i), get(&obj_ctr, i)) {
            (None, None) => None,
            (Some(a), Some(c)) if a < nactors && c > 0 => Some((a, c)),
            _ => return None,
        };
        let key = match (
            key_str.get(i).copied().flatten(),
            get(&key_actor, i),
            key_ctr.get(i).copied().flatten(),
        ) {
            (Some(s), None, None) => Key::Prop(s),
            (None, None, Some(0)) => Key::Head,
            (None, Some(a), Some(c)) if a < nactors && c > 0 => {
                Key::Elem((a, u64::try_from(c).ok()?))
            }
            _ => return None,
        };
        let value = scalar(get(&meta, i).unwrap_or(0), &mut raw)?;
        let count = usize::try_from(get(&pred_group, i).unwrap_or(0)).ok()?;
        let end = pred_at.checked_add(count)?;
        ops.push(Op {
            obj,
            key,
            insert: *insert.get(i)?,
            action: (*action.get(i)?)?,
            value,
            preds: pred_at..end,
        });
        pred_at = end;
    }
    if !raw.0.is_empty() {
        return None;
    }
    let decoded = Decoded {
        hash,
        deps,
        actor,
        seq,
        start_op,
        message,
        others,
        ops,
        preds,
        time,
        extra,
        body,
    };
    (encode_body(&decoded).as_deref() == Some(body)).then_some(decoded)
}

/// The value of one op from its metadata and the raw value column.
fn scalar<'a>(meta: u64, raw: &mut Reader<'a>) -> Option<Scalar<'a>> {
    let len = usize::try_from(meta >> 4).ok()?;
    let bytes = raw.take(len)?;
    let whole = |f: fn(&mut Reader<'a>) -> Option<u64>| {
        let mut r = Reader(bytes);
        f(&mut r).filter(|_| r.0.is_empty())
    };
    Some(match meta & 0xf {
        0 if len == 0 => Scalar::Null,
        1 if len == 0 => Scalar::Bool(false),
        2 if len == 0 => Scalar::Bool(true),
        3 => Scalar::Uint(whole(Reader::uleb)?),
        4 => {
            let mut r = Reader(bytes);
            let v = r.sleb().filter(|_| r.0.is_empty())?;
            Scalar::Int(v)
        }
        5 => Scalar::F64(f64::from_le_bytes(bytes.try_into().ok()?)),
        6 => Scalar::Str(std::str::from_utf8(bytes).ok()?),
        _ => return None,
    })
}

/// The body of `change` as automerge writes it (`None` if a value cannot
/// be written: never for what [`decode`] returns).
fn encode_body(c: &Decoded<'_>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(c.body.len());
    put_uleb(&mut out, c.deps.len() as u64);
    for d in &c.deps {
        out.extend_from_slice(d);
    }
    put_prefixed(&mut out, c.actor);
    put_uleb(&mut out, c.seq);
    put_uleb(&mut out, c.start_op);
    put_sleb(&mut out, c.time);
    put_prefixed(&mut out, c.message.as_bytes());
    put_uleb(&mut out, c.others.len() as u64);
    for a in &c.others {
        put_prefixed(&mut out, a);
    }
    let ops = &c.ops;
    let local = |id: Option<LocalId>| id.map(|(a, _)| a);
    let mut cols: Vec<(u64, Vec<u8>)> = Vec::with_capacity(SPECS.len());
    let objs: Vec<Option<LocalId>> = ops.iter().map(|o| o.obj).collect();
    cols.push((OBJ_ACTOR, rle_out(objs.iter().map(|o| local(*o)), put_uleb)));
    cols.push((
        OBJ_CTR,
        rle_out(objs.iter().map(|o| o.map(|(_, c)| c)), put_uleb),
    ));
    let elem = |k: &Key<'_>| match k {
        Key::Elem(id) => Some(*id),
        _ => None,
    };
    cols.push((
        KEY_ACTOR,
        rle_out(ops.iter().map(|o| local(elem(&o.key))), put_uleb),
    ));
    let key_ctrs: Vec<Option<i64>> = ops
        .iter()
        .map(|o| match o.key {
            Key::Prop(_) => Some(None),
            Key::Head => Some(Some(0)),
            Key::Elem((_, c)) => i64::try_from(c).ok().map(Some),
        })
        .collect::<Option<_>>()?;
    cols.push((KEY_CTR, delta_out(&key_ctrs)));
    cols.push((
        KEY_STR,
        rle_out(
            ops.iter().map(|o| match o.key {
                Key::Prop(s) => Some(s),
                _ => None,
            }),
            |out, s: &str| put_prefixed(out, s.as_bytes()),
        ),
    ));
    cols.push((INSERT, bool_out(ops.iter().map(|o| o.insert))));
    cols.push((
        ACTION,
        rle_out(ops.iter().map(|o| Some(o.action)), put_uleb),
    ));
    let mut raw = Vec::new();
    let metas: Vec<u64> = ops.iter().map(|o| put_scalar(&mut raw, o.value)).collect();
    cols.push((VAL_META, rle_out(metas.into_iter().map(Some), put_uleb)));
    cols.push((VAL_RAW, raw));
    cols.push((
        PRED_GROUP,
        rle_out(ops.iter().map(|o| Some(o.preds.len() as u64)), put_uleb),
    ));
    cols.push((
        PRED_ACTOR,
        rle_out(c.preds.iter().map(|(a, _)| Some(*a)), put_uleb),
    ));
    let pred_ctrs: Vec<Option<i64>> = c
        .preds
        .iter()
        .map(|(_, ctr)| i64::try_from(*ctr).ok().map(Some))
        .collect::<Option<_>>()?;
    cols.push((PRED_CTR, delta_out(&pred_ctrs)));
    cols.retain(|(_, data)| !data.is_empty());
    put_uleb(&mut out, cols.len() as u64);
    for (spec, data) in &cols {
        put_uleb(&mut out, *spec);
        put_uleb(&mut out, data.len() as u64);
    }
    for (_, data) in &cols {
        out.extend_from_slice(data);
    }
    out.extend_from_slice(c.extra);
    Some(out)
}

fn put_scalar(raw: &mut Vec<u8>, v: Scalar<'_>) -> u64 {
    let start = raw.len();
    let kind = match v {
        Scalar::Null => 0,
        Scalar::Bool(false) => 1,
        Scalar::Bool(true) => 2,
        Scalar::Uint(u) => {
            put_uleb(raw, u);
            3
        }
        Scalar::Int(i) => {
            put_sleb(raw, i);
            4
        }
        Scalar::F64(f) => {
            raw.extend_from_slice(&f.to_le_bytes());
            5
        }
        Scalar::Str(s) => {
            raw.extend_from_slice(s.as_bytes());
            6
        }
    };
    (((raw.len() - start) as u64) << 4) | kind
}

// ---------------------------------------------------------------------------
// Column decoders (lenient about nothing but length: canonical form is
// checked by encoding again).
// ---------------------------------------------------------------------------

/// A run-length encoded column: runs of `n > 0` repeats of one value,
/// `-n` literal values, or `0` then a count of nulls.
fn rle<'a, T: Copy>(
    bytes: &'a [u8],
    mut read: impl FnMut(&mut Reader<'a>) -> Option<T>,
) -> Option<Vec<Option<T>>> {
    let mut r = Reader(bytes);
    let mut out = Vec::new();
    while !r.0.is_empty() {
        let count = r.sleb()?;
        let n = usize::try_from(count.unsigned_abs()).ok()?;
        if out.len().checked_add(n)? > MAX_OPS {
            return None;
        }
        if count > 0 {
            let v = read(&mut r)?;
            out.extend(std::iter::repeat_n(Some(v), n));
        } else if count < 0 {
            for _ in 0..n {
                out.push(Some(read(&mut r)?));
            }
        } else {
            let nulls = usize::try_from(r.uleb()?).ok()?;
            if out.len().checked_add(nulls)? > MAX_OPS {
                return None;
            }
            out.extend(std::iter::repeat_n(None, nulls));
        }
    }
    Some(out)
}

/// A delta column: a run-length column of differences, read back as the
/// absolute values (nulls leave the running value alone).
fn delta(bytes: &[u8], max: usize) -> Option<Vec<Option<i64>>> {
    let deltas = rle(bytes, Reader::sleb)?;
    if deltas.len() > max {
        return None;
    }
    let mut abs: i64 = 0;
    deltas
        .into_iter()
        .map(|d| match d {
            None => Some(None),
            Some(d) => {
                abs = abs.checked_add(d)?;
                Some(Some(abs))
            }
        })
        .collect()
}

/// A boolean column: alternating run lengths, starting with `false`.
fn booleans(bytes: &[u8], max: usize) -> Option<Vec<bool>> {
    let mut r = Reader(bytes);
    let mut out = Vec::new();
    let mut value = false;
    while !r.0.is_empty() {
        let n = usize::try_from(r.uleb()?).ok()?;
        if out.len().checked_add(n)? > max {
            return None;
        }
        out.extend(std::iter::repeat_n(value, n));
        value = !value;
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// Column encoders, as automerge's.
// ---------------------------------------------------------------------------

fn rle_out<T: Copy + PartialEq>(
    values: impl Iterator<Item = Option<T>>,
    mut put: impl FnMut(&mut Vec<u8>, T),
) -> Vec<u8> {
    enum State<T> {
        Empty,
        InitialNulls,
        Nulls(u64),
        Lone(T),
        Run(T, u64),
        Literal(Vec<T>, T),
    }
    let mut out = Vec::new();
    let flush_literal = |out: &mut Vec<u8>, run: &[T], put: &mut dyn FnMut(&mut Vec<u8>, T)| {
        put_sleb(out, -(run.len() as i64));
        for v in run {
            put(out, *v);
        }
    };
    let mut state = State::Empty;
    let mut nulls_at_start = 0u64;
    for v in values {
        state = match (state, v) {
            (State::Empty, None) => {
                nulls_at_start = 1;
                State::InitialNulls
            }
            (State::InitialNulls, None) => {
                nulls_at_start += 1;
                State::InitialNulls
            }
            (State::Nulls(n), None) => State::Nulls(n + 1),
            (State::Lone(o), None) => {
                flush_literal(&mut out, &[o], &mut put);
                State::Nulls(1)
            }
            (State::Run(o, n), None) => {
                put_sleb(&mut out, n as i64);
                put(&mut out, o);
                State::Nulls(1)
            }
            (State::Literal(mut run, last), None) => {
                run.push(last);
                flush_literal(&mut out, &run, &mut put);
                State::Nulls(1)
            }
            (State::Empty, Some(v)) => State::Lone(v),
            (State::Lone(o), Some(v)) if o == v => State::Run(v, 2),
            (State::Lone(o), Some(v)) => State::Literal(vec![o], v),
            (State::Run(o, n), Some(v)) if o == v => State::Run(o, n + 1),
            (State::Run(o, n), Some(v)) => {
                put_sleb(&mut out, n as i64);
                put(&mut out, o);
                State::Lone(v)
            }
            (State::Literal(run, last), Some(v)) if last == v => {
                flush_literal(&mut out, &run, &mut put);
                State::Run(v, 2)
            }
            (State::Literal(mut run, last), Some(v)) => {
                run.push(last);
                State::Literal(run, v)
            }
            (State::InitialNulls, Some(v)) => {
                put_sleb(&mut out, 0);
                put_uleb(&mut out, nulls_at_start);
                State::Lone(v)
            }
            (State::Nulls(n), Some(v)) => {
                put_sleb(&mut out, 0);
                put_uleb(&mut out, n);
                State::Lone(v)
            }
        };
    }
    match state {
        State::Empty | State::InitialNulls => {}
        State::Nulls(n) => {
            put_sleb(&mut out, 0);
            put_uleb(&mut out, n);
        }
        State::Lone(v) => flush_literal(&mut out, &[v], &mut put),
        State::Run(v, n) => {
            put_sleb(&mut out, n as i64);
            put(&mut out, v);
        }
        State::Literal(mut run, last) => {
            run.push(last);
            flush_literal(&mut out, &run, &mut put);
        }
    }
    out
}

fn delta_out(values: &[Option<i64>]) -> Vec<u8> {
    let mut abs: i64 = 0;
    rle_out(
        values.iter().map(|v| {
            v.map(|v| {
                let d = v.saturating_sub(abs);
                abs = v;
                d
            })
        }),
        put_sleb,
    )
}

fn bool_out(values: impl Iterator<Item = bool>) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut last, mut count) = (false, 0u64);
    for v in values {
        if v == last {
            count += 1;
        } else {
            put_uleb(&mut out, count);
            last = v;
            count = 1;
        }
    }
    if count > 0 {
        put_uleb(&mut out, count);
    }
    out
}

// ---------------------------------------------------------------------------
// LEB128
// ---------------------------------------------------------------------------

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }

    fn prefixed(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.uleb()?).ok()?;
        self.take(n)
    }

    fn str(&mut self) -> Option<&'a str> {
        std::str::from_utf8(self.prefixed()?).ok()
    }

    fn uleb(&mut self) -> Option<u64> {
        let mut value: u64 = 0;
        for i in 0..10u32 {
            let b = *self.0.get(i as usize)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return None;
            }
            value |= bits << (7 * i);
            if b & 0x80 == 0 {
                self.0 = self.0.get(i as usize + 1..)?;
                return Some(value);
            }
        }
        None
    }

    fn sleb(&mut self) -> Option<i64> {
        let mut value: i64 = 0;
        let mut shift = 0u32;
        for i in 0..10usize {
            let b = *self.0.get(i)?;
            if shift == 63 && b != 0 && b != 0x7f {
                return None;
            }
            value |= i64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                self.0 = self.0.get(i + 1..)?;
                return Some(value);
            }
        }
        None
    }
}

fn put_uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_sleb(out: &mut Vec<u8>, mut v: i64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0) {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn put_prefixed(out: &mut Vec<u8>, bytes: &[u8]) {
    put_uleb(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}
