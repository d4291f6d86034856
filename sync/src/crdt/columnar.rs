//! keel's own reader of one automerge change, for the fold's fast path
//! ([`super::shadow`]).
//!
//! automerge's `Change::try_from` plus `decode` cost about 10 µs for a
//! pod-status change of seven ops; this reader decodes and checks the same
//! bytes in about 4 µs, without allocating per value. It reads only what keel
//! writes: one uncompressed change chunk whose columns are the change-op
//! columns automerge 0.12 writes (no deflate, no unknown columns), with at
//! most [`MAX_OPS`] ops. Anything else is "not for the fast path" (`None`),
//! never an error: the slow path (automerge) then decides, with its own
//! errors.
//!
//! **Canonical bytes only.** automerge keeps a change as its op set and
//! rebuilds the change from it when asked (saving, `get_changes`); keel
//! refuses a change that would not rebuild bit for bit (`verify_faithful`).
//! A change read here is accepted only if it is written exactly as
//! automerge's encoders write it — numbers in as few bytes as they need,
//! runs as its run-length encoder makes them (a repeat of at least two, a
//! literal whose neighbours differ, no run that continues the one before,
//! no column of nulls alone), booleans with no empty run but the first —
//! so that [`encode_body`] (those encoders, written again) gives back the
//! bytes received. The readers check this as they read, without writing
//! the change again; a hand-made change with, say, a literal run where
//! automerge writes a repeat run goes to the slow path, which refuses it.

use sha2::Digest;
use smallvec::SmallVec;

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
    pub deps: SmallVec<[[u8; 32]; 2]>,
    pub actor: &'a [u8],
    pub seq: u64,
    pub start_op: u64,
    pub message: &'a str,
    pub others: SmallVec<[&'a [u8]; 4]>,
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
pub(crate) fn decode<'a>(bytes: &'a [u8]) -> Option<Decoded<'a>> {
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
    let mut deps = SmallVec::with_capacity(ndeps);
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
    let mut others = SmallVec::with_capacity(nothers);
    for _ in 0..nothers {
        others.push(r.prefixed()?);
    }
    let ncols = usize::try_from(r.uleb()?).ok()?;
    if ncols > SPECS.len() {
        return None;
    }
    let mut cols: [&[u8]; 12] = [&[]; 12];
    // Each column's length, by its place in SPECS (none is empty).
    let mut lens = [0usize; SPECS.len()];
    let mut last = None;
    for _ in 0..ncols {
        let spec = r.uleb()?;
        let len = usize::try_from(r.uleb()?).ok()?;
        let at = SPECS.iter().position(|s| *s == spec)?;
        if last.is_some_and(|l| l >= at) || len == 0 {
            return None;
        }
        last = Some(at);
        *lens.get_mut(at)? = len;
    }
    for (col, len) in cols.iter_mut().zip(lens) {
        if len > 0 {
            *col = r.take(len)?;
        }
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

    let mut action = Rle::new(action, Reader::uleb);
    let mut obj_actor = Rle::new(obj_actor, Reader::uleb);
    let mut obj_ctr = Rle::new(obj_ctr, Reader::uleb);
    let mut key_actor = Rle::new(key_actor, Reader::uleb);
    let mut key_ctr = delta(key_ctr);
    // Keys are checked as UTF-8 once for the column when it is UTF-8
    // whole (its lengths and run headers are then single bytes): a key is
    // then UTF-8 exactly when it starts and ends on character boundaries.
    let key_text = std::str::from_utf8(key_str).ok();
    let key_column = key_str;
    let mut key_str = Rle::new(key_str, |r: &mut Reader<'a>| -> Option<&'a str> {
        let len = usize::try_from(r.uleb()?).ok()?;
        let at = key_column.len() - r.0.len();
        let bytes = r.take(len)?;
        match key_text {
            Some(text) => text.get(at..at + len),
            None => std::str::from_utf8(bytes).ok(),
        }
    });
    let mut insert = Bools::new(insert);
    let mut meta = Rle::new(meta, Reader::uleb);
    let mut pred_group = Rle::new(pred_group, Reader::uleb);
    let mut pred_actor = Rle::new(pred_actor, Reader::uleb);
    let mut pred_ctr = delta(pred_ctr);
    let nactors = 1 + others.len() as u64;
    let mut raw_text = RawText::new(raw);
    let mut raw = Reader(raw);
    // (A pod-status change has 7 to 30 ops.)
    let mut ops = Vec::with_capacity(32);
    let mut preds = Vec::with_capacity(32);
    while !action.at_end() {
        let act = action.next()?;
        if ops.len() >= MAX_OPS {
            return None;
        }
        let obj = match (obj_actor.next().flatten(), obj_ctr.next().flatten()) {
            (None, None) => None,
            (Some(a), Some(c)) if a < nactors && c > 0 => Some((a, c)),
            _ => return None,
        };
        let key = match (
            key_str.next().flatten(),
            key_actor.next().flatten(),
            key_ctr.next().flatten(),
        ) {
            (Some(s), None, None) => Key::Prop(s),
            (None, None, Some(0)) => Key::Head,
            (None, Some(a), Some(c)) if a < nactors && c > 0 => {
                Key::Elem((a, u64::try_from(c).ok()?))
            }
            _ => return None,
        };
        let value = scalar(meta.next().flatten()?, &mut raw, &mut raw_text)?;
        let count = usize::try_from(pred_group.next().flatten()?).ok()?;
        let at = preds.len();
        if at.checked_add(count)? > MAX_OPS {
            return None;
        }
        for _ in 0..count {
            let a = pred_actor.next().flatten()?;
            let c = u64::try_from(pred_ctr.next().flatten()?).ok()?;
            if a >= nactors {
                return None;
            }
            preds.push((a, c));
        }
        ops.push(Op {
            obj,
            key,
            insert: insert.next()?,
            action: act?,
            value,
            preds: at..preds.len(),
        });
    }
    let exhausted = action.done()
        && obj_actor.done()
        && obj_ctr.done()
        && key_actor.done()
        && key_ctr.done()
        && key_str.done()
        && insert.done()
        && meta.done()
        && pred_group.done()
        && pred_actor.done()
        && pred_ctr.done()
        && raw.0.is_empty();
    if !exhausted {
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
    // The strict readers above accept exactly the bytes automerge's
    // encoders write: what they read, `encode_body` writes again bit for
    // bit. Checked on every change read in debug builds (the tests and
    // the simulator); `tests::strict_columns_are_exactly_the_encoders`
    // checks the readers against the encoders. (Were a change let through
    // that automerge would not rebuild, the document would refuse it when
    // the tail is handed over: `verify_faithful`.)
    debug_assert!(
        canonical(&decoded),
        "a change read as canonical does not encode again to its bytes"
    );
    Some(decoded)
}

/// Whether [`encode_body`] gives back exactly the body `c` was read from
/// (the strict readers' invariant; evaluated in debug builds and tests).
fn canonical(c: &Decoded<'_>) -> bool {
    let (mut out, mut data, mut raw, mut lit) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // The body is the head, the columns, then the extra bytes (which are
    // the body's last bytes, as read).
    encode_body(c, &mut out, &mut data, &mut raw, &mut lit)
        && c.body.len() == out.len() + data.len() + c.extra.len()
        && c.body.get(..out.len()) == Some(out.as_slice())
        && c.body.get(out.len()..out.len() + data.len()) == Some(data.as_slice())
}

/// The raw value column's strings, checked as UTF-8 once for the column
/// (not once per value): the column's runs of valid UTF-8, by where each
/// starts. A value is UTF-8 on its own exactly when it lies inside one run
/// and starts and ends on character boundaries there (a value that is
/// UTF-8 starts with a byte that ends any sequence before it, and every
/// byte outside the runs is invalid in any context it can have inside a
/// value).
struct RawText<'a> {
    column: usize,
    runs: SmallVec<[(usize, &'a str); 4]>,
    /// The run the last value was found in (values are read in order).
    at: usize,
}

impl<'a> RawText<'a> {
    fn new(column: &'a [u8]) -> RawText<'a> {
        let mut runs = SmallVec::new();
        // Found with the standard check (which reads ASCII a word at a
        // time) rather than the per-chunk walk (a byte at a time): a
        // column is mostly strings, with a few bytes of numbers between
        // them that are not UTF-8 (a restart count past 127).
        let mut start = 0;
        while let Some(rest) = column.get(start..).filter(|r| !r.is_empty()) {
            let (valid, skip) = match std::str::from_utf8(rest) {
                Ok(text) => (text, 0),
                Err(e) => {
                    let valid = rest
                        .get(..e.valid_up_to())
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .unwrap_or_default();
                    // (`None`: a sequence cut by the end, invalid to it.)
                    let skip = e.error_len().unwrap_or(rest.len() - valid.len());
                    (valid, skip)
                }
            };
            if !valid.is_empty() {
                runs.push((start, valid));
            }
            start += valid.len() + skip.max(usize::from(valid.is_empty()));
        }
        RawText {
            column: column.len(),
            runs,
            at: 0,
        }
    }

    /// The value of `len` bytes whose last byte is `left` bytes from the
    /// end of the column, if it is UTF-8.
    fn get(&mut self, left: usize, len: usize) -> Option<&'a str> {
        if len == 0 {
            return Some("");
        }
        let start = self.column.checked_sub(left)?;
        while let Some(&(run, text)) = self.runs.get(self.at) {
            if start < run {
                return None;
            }
            if start < run + text.len() {
                return text.get(start - run..start - run + len);
            }
            self.at += 1;
        }
        None
    }
}

/// The value of one op from its metadata and the raw value column (with
/// its strings checked as UTF-8).
#[inline(always)]
fn scalar<'a>(meta: u64, raw: &mut Reader<'a>, text: &mut RawText<'a>) -> Option<Scalar<'a>> {
    let len = usize::try_from(meta >> 4).ok()?;
    let left = raw.0.len();
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
        6 => Scalar::Str(text.get(left, len)?),
        _ => return None,
    })
}

/// Writes the body of `change` as automerge writes it, but for the extra
/// bytes after the columns: its head (dependencies to column lengths) into
/// `out`, its columns into `data`, with `raw` and `lit` as working space
/// (all four empty when called). `false` if a value cannot be written
/// (never for what [`decode`] returns).
fn encode_body(
    c: &Decoded<'_>,
    out: &mut Vec<u8>,
    data: &mut Vec<u8>,
    raw: &mut Vec<u8>,
    lit: &mut Vec<u8>,
) -> bool {
    put_uleb(out, c.deps.len() as u64);
    for d in &c.deps {
        out.extend_from_slice(d);
    }
    put_prefixed(out, c.actor);
    put_uleb(out, c.seq);
    put_uleb(out, c.start_op);
    put_sleb(out, c.time);
    put_prefixed(out, c.message.as_bytes());
    put_uleb(out, c.others.len() as u64);
    for a in &c.others {
        put_prefixed(out, a);
    }
    let ops = &c.ops;
    // Every column into one buffer, in order, each one's length noted.
    let mut lens = [0usize; 12];
    let mut mark = |data: &Vec<u8>, i: usize, before: usize| {
        if let Some(l) = lens.get_mut(i) {
            *l = data.len() - before;
        }
    };
    let elem = |k: &Key<'_>| match k {
        Key::Elem(id) => Some(*id),
        _ => None,
    };
    let b = data.len();
    rle_out(
        data,
        lit,
        ops.iter().map(|o| o.obj.map(|(a, _)| a)),
        put_uleb,
    );
    mark(data, 0, b);
    let b = data.len();
    rle_out(
        data,
        lit,
        ops.iter().map(|o| o.obj.map(|(_, c)| c)),
        put_uleb,
    );
    mark(data, 1, b);
    let b = data.len();
    rle_out(
        data,
        lit,
        ops.iter().map(|o| elem(&o.key).map(|(a, _)| a)),
        put_uleb,
    );
    mark(data, 2, b);
    let b = data.len();
    let mut abs: i64 = 0;
    let mut overflow = false;
    rle_out(
        data,
        lit,
        ops.iter().map(|o| {
            let v = match o.key {
                Key::Prop(_) => None,
                Key::Head => Some(0),
                Key::Elem((_, c)) => Some(i64::try_from(c).unwrap_or_else(|_| {
                    overflow = true;
                    0
                })),
            };
            v.map(|v| {
                let d = v.saturating_sub(abs);
                abs = v;
                d
            })
        }),
        put_sleb,
    );
    mark(data, 3, b);
    let b = data.len();
    rle_out(
        data,
        lit,
        ops.iter().map(|o| match o.key {
            Key::Prop(s) => Some(s),
            _ => None,
        }),
        |out, s: &str| put_prefixed(out, s.as_bytes()),
    );
    mark(data, 4, b);
    let b = data.len();
    bool_out(data, ops.iter().map(|o| o.insert));
    mark(data, 5, b);
    let b = data.len();
    rle_out(data, lit, ops.iter().map(|o| Some(o.action)), put_uleb);
    mark(data, 6, b);
    let b = data.len();
    let metas = ops.iter().map(|o| Some(put_scalar(raw, o.value)));
    rle_out(data, lit, metas, put_uleb);
    mark(data, 7, b);
    let b = data.len();
    data.extend_from_slice(raw);
    mark(data, 8, b);
    let b = data.len();
    rle_out(
        data,
        lit,
        ops.iter().map(|o| Some(o.preds.len() as u64)),
        put_uleb,
    );
    mark(data, 9, b);
    let b = data.len();
    rle_out(data, lit, c.preds.iter().map(|(a, _)| Some(*a)), put_uleb);
    mark(data, 10, b);
    let b = data.len();
    let mut abs: i64 = 0;
    rle_out(
        data,
        lit,
        c.preds.iter().map(|(_, ctr)| {
            let v = i64::try_from(*ctr).unwrap_or_else(|_| {
                overflow = true;
                0
            });
            let d = v.saturating_sub(abs);
            abs = v;
            Some(d)
        }),
        put_sleb,
    );
    mark(data, 11, b);
    if overflow {
        return false;
    }
    put_uleb(out, lens.iter().filter(|l| **l > 0).count() as u64);
    for (spec, len) in SPECS.iter().zip(lens) {
        if len > 0 {
            put_uleb(out, *spec);
            put_uleb(out, len as u64);
        }
    }
    true
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

/// A run-length encoded column, read lazily: runs of `n > 0` repeats of
/// one value, `-n` literal values, or `0` then a count of nulls. Yields
/// `Some(None)` for a null; stops (for good) at the end or at bad bytes
/// ([`Rle::done`] tells them apart). An empty column is all nulls.
///
/// Only the runs automerge's encoder writes are read (see [`rle_out`]):
/// a repeat of at least two, a literal whose neighbours differ and that
/// does not follow a literal, runs that do not continue the run before
/// (a repeat of the same value, nulls after nulls), and no column of
/// nulls alone (that one is left empty). Anything else fails the column.
struct Rle<'a, T, F> {
    r: Reader<'a>,
    read: F,
    /// The value repeated (`None`: nulls), or literal values to read.
    repeat: Option<Option<T>>,
    left: u64,
    failed: bool,
    /// The column was empty.
    empty: bool,
    /// The run before the next one.
    last: Last<T>,
    /// Every run so far was nulls.
    only_nulls: bool,
}

/// The last run read of an RLE column, as far as the next one is
/// concerned.
#[derive(Clone, Copy)]
enum Last<T> {
    Start,
    Nulls,
    Repeat(T),
    /// A literal run, and its last value so far.
    Literal(T),
}

impl<'a, T: Copy + PartialEq, F: FnMut(&mut Reader<'a>) -> Option<T>> Rle<'a, T, F> {
    fn new(bytes: &'a [u8], read: F) -> Self {
        Rle {
            r: Reader(bytes),
            read,
            repeat: None,
            left: 0,
            failed: false,
            empty: bytes.is_empty(),
            last: Last::Start,
            only_nulls: true,
        }
    }

    /// Read to the end without error.
    fn done(&self) -> bool {
        !self.failed && self.at_end() && (self.empty || !self.only_nulls)
    }

    /// Nothing more to read (the column may still have failed).
    fn at_end(&self) -> bool {
        self.left == 0 && self.r.0.is_empty()
    }

    /// The next value: a run's next repeat without a call (most values
    /// of a change's columns are repeats), the rest in [`Rle::next_read`].
    #[inline]
    fn next(&mut self) -> Option<Option<T>> {
        if self.left > 0
            && !self.failed
            && let Some(v) = self.repeat
        {
            self.left -= 1;
            return Some(v);
        }
        self.next_read()
    }

    fn next_read(&mut self) -> Option<Option<T>> {
        if self.failed {
            return None;
        }
        if self.empty {
            return Some(None);
        }
        let v = self.step();
        if v.is_none() {
            // Bad bytes, a run automerge does not write, or fewer values
            // than asked for (a column that is not empty holds one for
            // every op).
            self.failed = true;
        }
        v
    }

    fn step(&mut self) -> Option<Option<T>> {
        while self.left == 0 {
            if self.r.0.is_empty() {
                return None;
            }
            let count = self.r.sleb()?;
            if count > 0 {
                let v = (self.read)(&mut self.r)?;
                let continues = match self.last {
                    Last::Repeat(p) | Last::Literal(p) => p == v,
                    Last::Start | Last::Nulls => false,
                };
                if count < 2 || continues {
                    return None;
                }
                self.last = Last::Repeat(v);
                self.repeat = Some(Some(v));
                self.left = count.unsigned_abs();
            } else if count < 0 {
                if matches!(self.last, Last::Literal(_)) {
                    return None;
                }
                self.repeat = None;
                self.left = count.unsigned_abs();
            } else {
                let n = self.r.uleb()?;
                if n == 0 || matches!(self.last, Last::Nulls) {
                    return None;
                }
                self.last = Last::Nulls;
                self.repeat = Some(None);
                self.left = n;
            }
            if count != 0 {
                self.only_nulls = false;
            }
        }
        self.left -= 1;
        match self.repeat {
            Some(v) => Some(v),
            None => {
                let v = (self.read)(&mut self.r)?;
                // A literal value differs from the one before it (in
                // this run, or the repeat before it).
                if let Last::Repeat(p) | Last::Literal(p) = self.last
                    && p == v
                {
                    return None;
                }
                self.last = Last::Literal(v);
                Some(Some(v))
            }
        }
    }
}

/// A delta column, read lazily: a run-length column of differences,
/// yielding the absolute values (nulls leave the running value alone).
struct Delta<'a, F> {
    rle: Rle<'a, i64, F>,
    abs: i64,
}

/// A [`Delta`] reader of `bytes` (its reader of differences a function
/// item, not a pointer: inlined).
fn delta<'a>(bytes: &'a [u8]) -> Delta<'a, impl FnMut(&mut Reader<'a>) -> Option<i64>> {
    Delta {
        rle: Rle::new(bytes, Reader::sleb),
        abs: 0,
    }
}

impl<'a, F: FnMut(&mut Reader<'a>) -> Option<i64>> Delta<'a, F> {
    fn done(&self) -> bool {
        self.rle.done()
    }

    fn next(&mut self) -> Option<Option<i64>> {
        match self.rle.next()? {
            None => Some(None),
            Some(d) => match self.abs.checked_add(d) {
                Some(a) => {
                    self.abs = a;
                    Some(Some(a))
                }
                None => {
                    self.rle.failed = true;
                    None
                }
            },
        }
    }
}

/// A boolean column, read lazily: alternating run lengths, starting with
/// `false`. Only as automerge writes it: no run is empty but the first
/// (when the first value is `true`).
struct Bools<'a> {
    r: Reader<'a>,
    value: bool,
    left: u64,
    failed: bool,
    first: bool,
}

impl<'a> Bools<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Bools {
            r: Reader(bytes),
            value: true,
            left: 0,
            failed: false,
            first: true,
        }
    }

    fn done(&self) -> bool {
        !self.failed && self.left == 0 && self.r.0.is_empty()
    }

    fn next(&mut self) -> Option<bool> {
        while self.left == 0 {
            if self.r.0.is_empty() {
                return None;
            }
            match self.r.uleb() {
                Some(n) if n > 0 || self.first => {
                    self.left = n;
                    self.first = false;
                }
                _ => {
                    self.failed = true;
                    return None;
                }
            }
            self.value = !self.value;
        }
        self.left -= 1;
        Some(self.value)
    }
}

// ---------------------------------------------------------------------------
// Column encoders, as automerge's.
// ---------------------------------------------------------------------------

/// Writes `values` to `out` as automerge's RLE column, with `lit` (empty)
/// as working space.
fn rle_out<T: Copy + PartialEq>(
    out: &mut Vec<u8>,
    lit: &mut Vec<u8>,
    values: impl Iterator<Item = Option<T>>,
    mut put: impl FnMut(&mut Vec<u8>, T),
) {
    /// A literal run's values but its last are written to `lit` as they
    /// come (`n` of them), and copied out after its length once it ends.
    enum State<T> {
        Empty,
        InitialNulls,
        Nulls(u64),
        Lone(T),
        Run(T, u64),
        Literal(u64, T),
    }
    let flush_literal = |out: &mut Vec<u8>, lit: &mut Vec<u8>, n: u64| {
        put_sleb(out, -(n as i64));
        out.extend_from_slice(lit);
        lit.clear();
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
                put(lit, o);
                flush_literal(out, lit, 1);
                State::Nulls(1)
            }
            (State::Run(o, n), None) => {
                put_sleb(out, n as i64);
                put(out, o);
                State::Nulls(1)
            }
            (State::Literal(n, last), None) => {
                put(lit, last);
                flush_literal(out, lit, n + 1);
                State::Nulls(1)
            }
            (State::Empty, Some(v)) => State::Lone(v),
            (State::Lone(o), Some(v)) if o == v => State::Run(v, 2),
            (State::Lone(o), Some(v)) => {
                put(lit, o);
                State::Literal(1, v)
            }
            (State::Run(o, n), Some(v)) if o == v => State::Run(o, n + 1),
            (State::Run(o, n), Some(v)) => {
                put_sleb(out, n as i64);
                put(out, o);
                State::Lone(v)
            }
            (State::Literal(n, last), Some(v)) if last == v => {
                flush_literal(out, lit, n);
                State::Run(v, 2)
            }
            (State::Literal(n, last), Some(v)) => {
                put(lit, last);
                State::Literal(n + 1, v)
            }
            (State::InitialNulls, Some(v)) => {
                put_sleb(out, 0);
                put_uleb(out, nulls_at_start);
                State::Lone(v)
            }
            (State::Nulls(n), Some(v)) => {
                put_sleb(out, 0);
                put_uleb(out, n);
                State::Lone(v)
            }
        };
    }
    match state {
        State::Empty | State::InitialNulls => {}
        State::Nulls(n) => {
            put_sleb(out, 0);
            put_uleb(out, n);
        }
        State::Lone(v) => {
            put(lit, v);
            flush_literal(out, lit, 1);
        }
        State::Run(v, n) => {
            put_sleb(out, n as i64);
            put(out, v);
        }
        State::Literal(n, last) => {
            put(lit, last);
            flush_literal(out, lit, n + 1);
        }
    }
}

fn bool_out(out: &mut Vec<u8>, values: impl Iterator<Item = bool>) {
    let (mut last, mut count) = (false, 0u64);
    for v in values {
        if v == last {
            count += 1;
        } else {
            put_uleb(out, count);
            last = v;
            count = 1;
        }
    }
    if count > 0 {
        put_uleb(out, count);
    }
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

    /// Most numbers of a change fit in one byte: read without a call.
    #[inline]
    fn uleb(&mut self) -> Option<u64> {
        if let Some((&b, rest)) = self.0.split_first()
            && b & 0x80 == 0
        {
            self.0 = rest;
            return Some(u64::from(b));
        }
        self.uleb_long()
    }

    fn uleb_long(&mut self) -> Option<u64> {
        let mut value: u64 = 0;
        for i in 0..10u32 {
            let b = *self.0.get(i as usize)?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && bits > 1 {
                return None;
            }
            value |= bits << (7 * i);
            if b & 0x80 == 0 {
                // As automerge writes it: no more bytes than the value
                // needs (a last byte of zeros after others is padding).
                if i > 0 && b == 0 {
                    return None;
                }
                self.0 = self.0.get(i as usize + 1..)?;
                return Some(value);
            }
        }
        None
    }

    /// [`Reader::uleb`]'s signed twin (one byte: -64..=63, the sign in
    /// bit 6).
    #[inline]
    fn sleb(&mut self) -> Option<i64> {
        if let Some((&b, rest)) = self.0.split_first()
            && b & 0x80 == 0
        {
            self.0 = rest;
            return Some(i64::from(((b << 1) as i8) >> 1));
        }
        self.sleb_long()
    }

    fn sleb_long(&mut self) -> Option<i64> {
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
                // No more bytes than the value needs: a last byte that
                // only repeats the sign of the one before is padding.
                if let Some(prev) = i.checked_sub(1).and_then(|p| self.0.get(p))
                    && ((b == 0 && prev & 0x40 == 0) || (b == 0x7f && prev & 0x40 != 0))
                {
                    return None;
                }
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

    use super::*;
    use crate::crdt::{ActorId, ObjectStore};

    /// The change chunk of `body`, with its length and checksum.
    fn chunk(body: &[u8]) -> Vec<u8> {
        let mut head = vec![CHUNK_CHANGE];
        put_uleb(&mut head, body.len() as u64);
        let hash = sha2::Sha256::new()
            .chain_update(&head)
            .chain_update(body)
            .finalize();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&hash[..4]);
        out.extend_from_slice(&head);
        out.extend_from_slice(body);
        out
    }

    /// Keys are read as UTF-8 whether their column is UTF-8 whole or not
    /// (a key of 128 bytes or more has a length of two bytes, the first
    /// not ASCII); a key that is not UTF-8 on its own is refused even when
    /// the column around it is.
    #[test]
    fn keys_are_utf8_each() {
        let long = "b".repeat(128);
        let mut s = ObjectStore::new();
        let change = s
            .edit_merge_patch(
                "pods/default/web",
                &ActorId::from_name("cloud"),
                &serde_json::json!({"aa": 1, "é日本🦀": 2, long.clone(): 3}),
            )
            .unwrap()
            .unwrap();
        let read = decode(&change).expect("automerge's own change is read");
        let keys: Vec<&str> = read
            .ops
            .iter()
            .filter_map(|op| match op.key {
                Key::Prop(k) => Some(k),
                _ => None,
            })
            .collect();
        assert_eq!(keys, ["aa", long.as_str(), "é日本🦀"]);
        // "aa", then the long key's length (0x80 0x01): a last byte of
        // 0xc3 makes "a\xc3" (not UTF-8) and "\xc3\x80" ("À", UTF-8).
        let body = read.body.to_vec();
        let at = body
            .windows(5)
            .position(|w| w == [2, b'a', b'a', 0x80, 0x01])
            .expect("the key column as expected");
        let mut bad = body.clone();
        bad[at + 2] = 0xc3;
        assert!(decode(&chunk(&bad)).is_none());
        bad[at + 2] = b'c';
        assert!(decode(&chunk(&bad)).is_some(), "any other key is read");
    }

    /// Only canonical bytes are read: the same change with one number
    /// written in more bytes than automerge writes it (which would not
    /// rebuild bit for bit) goes to the slow path, though it means the
    /// same.
    #[test]
    fn non_canonical_changes_are_not_read() {
        let mut s = ObjectStore::new();
        let change = s
            .edit_merge_patch(
                "pods/default/web",
                &ActorId::from_name("cloud"),
                &serde_json::json!({"kind": "Pod", "status": {"phase": "Running"}}),
            )
            .unwrap()
            .unwrap();
        let read = decode(&change).expect("automerge's own change is read");
        assert!(read.deps.is_empty());
        assert_eq!(chunk(read.body), change, "the chunk is rebuilt as it was");
        // No dependencies: the body's first byte is a zero. As two bytes:
        let mut body = vec![0x80, 0x00];
        body.extend_from_slice(&read.body[1..]);
        let long = chunk(&body);
        assert!(decode(&long).is_none());
        // Bytes after the columns are kept as they came (and are part of
        // what is compared).
        let mut extra = read.body.to_vec();
        extra.push(0);
        assert!(
            decode(&chunk(&extra)).is_some(),
            "extra bytes are kept as they are"
        );
    }

    use proptest::prelude::*;

    /// A run of an RLE column as bytes could hold it, canonical or not.
    #[derive(Debug, Clone)]
    enum Run {
        Repeat(i64, u64),
        Literal(Vec<u64>),
        Nulls(u64),
    }

    fn run() -> impl Strategy<Value = Run> {
        prop_oneof![
            (0i64..4, 0u64..3).prop_map(|(n, v)| Run::Repeat(n, v)),
            prop::collection::vec(0u64..3, 0..4).prop_map(Run::Literal),
            (0u64..3).prop_map(Run::Nulls),
        ]
    }

    /// The bytes of `runs`, and the values they stand for.
    fn column(runs: &[Run]) -> (Vec<u8>, Vec<Option<u64>>) {
        let (mut bytes, mut values) = (Vec::new(), Vec::new());
        for r in runs {
            match r {
                Run::Repeat(n, v) => {
                    put_sleb(&mut bytes, *n);
                    put_uleb(&mut bytes, *v);
                    values.extend((0..*n).map(|_| Some(*v)));
                }
                Run::Literal(vs) => {
                    put_sleb(&mut bytes, -(vs.len() as i64));
                    for v in vs {
                        put_uleb(&mut bytes, *v);
                        values.push(Some(*v));
                    }
                }
                Run::Nulls(n) => {
                    put_sleb(&mut bytes, 0);
                    put_uleb(&mut bytes, *n);
                    values.extend((0..*n).map(|_| None));
                }
            }
        }
        (bytes, values)
    }

    proptest! {
        /// A raw column's value is read as a string exactly when it is
        /// UTF-8 on its own, whatever the bytes around it: values cut from
        /// bytes that mix ASCII, whole and cut multi-byte characters and
        /// bytes that never start one.
        #[test]
        fn raw_strings_are_utf8_each(
            parts in prop::collection::vec(prop_oneof![
                Just(vec![b'a']),
                Just("é".as_bytes().to_vec()),
                Just("日".as_bytes().to_vec()),
                Just("🦀".as_bytes().to_vec()),
                Just(vec![0xc3]),
                Just(vec![0xe6, 0x97]),
                Just(vec![0x80]),
                Just(vec![0xff]),
                Just(vec![0xe0, 0x80]),
            ], 0..24),
            cuts in prop::collection::vec(0usize..6, 0..16),
        ) {
            let column: Vec<u8> = parts.concat();
            let mut text = RawText::new(&column);
            let mut at = 0;
            for len in cuts.into_iter().chain([usize::MAX]) {
                let len = len.min(column.len() - at);
                let value = &column[at..at + len];
                prop_assert_eq!(
                    text.get(column.len() - at, len),
                    std::str::from_utf8(value).ok(),
                    "{:x?} at {} in {:x?}", value, at, column
                );
                at += len;
            }
        }

        /// Numbers are read only in as few bytes as they need: what is
        /// read is what `put_uleb` / `put_sleb` write.
        #[test]
        fn leb_is_read_only_as_written(bytes in prop::collection::vec(any::<u8>(), 1..12), u in any::<u64>(), i in any::<i64>()) {
            let mut r = Reader(&bytes);
            if let Some(v) = r.uleb() {
                let mut out = Vec::new();
                put_uleb(&mut out, v);
                prop_assert_eq!(&bytes[..bytes.len() - r.0.len()], out.as_slice());
            }
            let mut r = Reader(&bytes);
            if let Some(v) = r.sleb() {
                let mut out = Vec::new();
                put_sleb(&mut out, v);
                prop_assert_eq!(&bytes[..bytes.len() - r.0.len()], out.as_slice());
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            put_uleb(&mut a, u);
            put_sleb(&mut b, i);
            prop_assert_eq!(Reader(&a).uleb(), Some(u));
            prop_assert_eq!(Reader(&b).sleb(), Some(i));
        }

        /// The strict RLE reader accepts a column exactly when automerge's
        /// encoder writes its values so, and then reads those values.
        #[test]
        fn strict_columns_are_exactly_the_encoders(runs in prop::collection::vec(run(), 0..6)) {
            let (bytes, values) = column(&runs);
            let mut rle = Rle::new(&bytes, Reader::uleb);
            let read: Option<Vec<Option<u64>>> = values.iter().map(|_| rle.next()).collect();
            let accepted = read.as_ref() == Some(&values) && rle.done();
            let (mut out, mut lit) = (Vec::new(), Vec::new());
            rle_out(&mut out, &mut lit, values.iter().copied(), put_uleb);
            prop_assert_eq!(accepted, out == bytes, "{:?} -> {:?} read {:?}", runs, bytes, read);
        }

        /// The same for boolean columns.
        #[test]
        fn strict_bools_are_exactly_the_encoder(runs in prop::collection::vec(0u64..3, 0..6)) {
            let mut bytes = Vec::new();
            let mut values = Vec::new();
            for (i, n) in runs.iter().enumerate() {
                put_uleb(&mut bytes, *n);
                values.extend((0..*n).map(|_| i % 2 == 1));
            }
            let mut b = Bools::new(&bytes);
            let read: Option<Vec<bool>> = values.iter().map(|_| b.next()).collect();
            let accepted = read.as_ref() == Some(&values) && b.done();
            let mut out = Vec::new();
            bool_out(&mut out, values.iter().copied());
            prop_assert_eq!(accepted, out == bytes, "{:?} read {:?}", runs, read);
        }

        /// A change whose body was altered (its checksum made to match) is
        /// either not read, or read as bytes that encode again exactly.
        #[test]
        fn altered_changes_are_read_only_when_canonical(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..4),
        ) {
            let mut s = ObjectStore::new();
            let change = s
                .edit_merge_patch(
                    "pods/default/web",
                    &ActorId::from_name("cloud"),
                    &serde_json::json!({"kind": "Pod", "metadata": {"labels": {"a": "1", "b": "1"}},
                        "status": {"phase": "Running", "restartCount": 3, "ready": true,
                        "conditions": [{"type": "Ready"}, {"type": "Ready", "x": null}]}}),
                )
                .unwrap()
                .unwrap();
            let mut body = decode(&change).unwrap().body.to_vec();
            for (at, byte, how) in edits {
                let i = at.index(body.len() + 1);
                match how {
                    0 if i < body.len() => body[i] = byte,
                    1 => body.insert(i, byte),
                    _ if i < body.len() => {
                        body.remove(i);
                    }
                    _ => {}
                }
            }
            if let Some(d) = decode(&chunk(&body)) {
                prop_assert!(canonical(&d));
            }
        }
    }
}
