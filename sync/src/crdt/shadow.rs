//! The fold's fast path: a shadow of one object's document that folds the
//! common change without automerge.
//!
//! Almost every change keel carries is *causally next* for its object: its
//! dependencies are the object's current heads (the node writes its status
//! on top of what it last saw, the cloud its spec), and each op overwrites
//! exactly the values that are visible now. For such a change automerge's
//! merge is plain sequential application — a put replaces the value, an
//! insert goes right after its reference (its op id is the greatest in the
//! document), a delete removes — and that is what [`Shadow::fold_next`]
//! does, on a tree of the document's live ops (id, value) per map key and
//! list element, in a few microseconds instead of automerge's few hundred.
//!
//! A change *concurrent* with what the document holds (its dependencies
//! are held but are not every head: the node wrote its status while the
//! cloud, apart, wrote the spec) folds the same way when it is *disjoint*
//! from the concurrent edits: each op's predecessors are exactly the live
//! ops of its key now (nothing concurrent touched that key), each op id
//! is greater than its predecessors' (as automerge writes them), its op
//! ids follow its author's earlier ones, and it inserts list elements
//! only into lists it made itself (elsewhere the shadow may not know the
//! deleted elements an insert is ordered against). automerge's merge of
//! such a change is again plain application: each touched key ends with
//! the change's op alone, every other key keeps what it had.
//!
//! Anything else (a concurrent edit of the same key, an op whose
//! predecessors are not exactly the live values, a shape keel does not
//! write) is refused and goes to automerge, which stays the document
//! format and does every merge of overlapping edits; changes automerge
//! applied are folded into the shadow afterwards with
//! [`Shadow::fold_applied`] (general map semantics: predecessors out, the
//! new op in, the greatest op id visible).
//!
//! The object store keeps the changes folded here as a *tail* of raw bytes
//! and hands them to automerge in one batch when the document is needed
//! (an edit, a rebase, a concurrent change, or a full tail); the JSON view
//! is rendered from the shadow, which renders exactly what
//! [`super::json::read_root`] renders from the document.

use std::collections::BTreeMap;

use rustc_hash::FxHashMap as HashMap;
use smallvec::SmallVec;

use automerge::{Automerge, Cursor, ObjId as ExId, ObjType, ROOT, ReadDoc};
use serde_json::{Map, Number, Value};

use super::columnar::{DELETE, Decoded, Key, LocalId, MAKE_LIST, MAKE_MAP, PUT, Scalar};
use super::json::MAX_DEPTH;

/// An op id: counter, then the actor (an index into [`Shadow::actors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Id {
    ctr: u64,
    actor: u32,
}

#[derive(Debug, Clone, PartialEq)]
enum Val {
    Null,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F64(f64),
    /// Inline up to [`Text::INLINE`] bytes (most values of a Kubernetes
    /// object: phases, IPs, timestamps, image names): a put allocates
    /// nothing for them.
    Str(Text),
    /// A map or list object: the object's id is the op's own.
    Map,
    List,
}

/// A string value: its bytes inline when they fit, else on the heap. Made
/// by a copy (no scan of the bytes, as a general small-string type makes
/// to pick among its forms).
#[derive(Clone, PartialEq)]
enum Text {
    Inline { len: u8, bytes: [u8; Text::INLINE] },
    Heap(Box<str>),
}

impl Text {
    const INLINE: usize = 22;

    fn new(s: &str) -> Text {
        let mut bytes = [0; Text::INLINE];
        match bytes.get_mut(..s.len()) {
            Some(b) => {
                b.copy_from_slice(s.as_bytes());
                Text::Inline {
                    len: s.len() as u8,
                    bytes,
                }
            }
            None => Text::Heap(s.into()),
        }
    }

    fn as_str(&self) -> &str {
        match self {
            // Copied from a `str` whole: always UTF-8.
            Text::Inline { len, bytes } => bytes
                .get(..usize::from(*len))
                .and_then(|b| std::str::from_utf8(b).ok())
                .unwrap_or_default(),
            Text::Heap(s) => s,
        }
    }
}

impl std::fmt::Debug for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// A copy of `v` with the same room (a vector's clone keeps none): what
/// the original had room for moves nothing in the copy either.
fn clone_with_room<T: Clone>(v: &Vec<T>) -> Vec<T> {
    let mut copy = Vec::with_capacity(v.capacity());
    copy.extend_from_slice(v);
    copy
}

/// Push the value `make` makes onto `v`, written where `v` keeps it. A
/// value built apart and then pushed is written by narrow stores and read
/// back by the push's wide loads, each spanning several of those stores:
/// the loads wait until the stores have left the store buffer.
#[inline(always)]
pub(crate) fn push_in_place<T>(v: &mut Vec<T>, make: impl FnMut() -> T) {
    v.resize_with(v.len() + 1, make);
}

/// Push an entry `(at, slot)` onto `v` and put `(id, put)` into its slot,
/// both written where `v` keeps them (see [`push_in_place`]).
#[inline(always)]
fn push_entry<T: Copy>(v: &mut Vec<(T, Slot)>, at: T, id: Id, put: Put<'_, '_>) {
    push_in_place(v, || (at, Slot::new()));
    if let Some((_, slot)) = v.last_mut() {
        put_into(slot, id, put);
    }
}

/// The live ops of one map key or list element (usually one, held inline;
/// several after concurrent puts, the greatest id visible).
type Slot = SmallVec<[(Id, Val); 1]>;

#[derive(Debug, Clone)]
enum Obj {
    Map(Keys),
    /// Elements in order, deleted ones kept (an insert may refer to them),
    /// each with the id of the op that inserted it.
    List(Vec<(Id, Slot)>),
}

/// Most keys a map keeps in a sorted vector; past them it moves to a
/// B-tree.
const SMALL_MAP: usize = 32;

/// A map object's keys, in order. Most maps of a Kubernetes object hold a
/// few keys: a sorted vector of them takes a fraction of a B-tree's memory
/// (whose smallest node has room for 11) and is searched as fast. A map
/// that grows past [`SMALL_MAP`] keys moves to a B-tree, so that a change
/// adding many keys in any order costs no more than a B-tree's inserts.
#[derive(Debug, Clone)]
enum Keys {
    Small(SmallKeys),
    Large(BTreeMap<Box<str>, Slot>),
}

/// The room a map's first key makes for the bytes of its keys.
const KEYS_TEXT: usize = 64;

/// A few keys, sorted, each with its slot. The keys' bytes are in one
/// string, one after another: a lookup reads a few cache lines (the ends,
/// then the bytes of keys of the right length) rather than one allocation
/// per key, and a new key allocates nothing of its own.
#[derive(Debug, Default)]
struct SmallKeys {
    text: String,
    /// Where each key ends in `text`, and its slot.
    entries: Vec<(usize, Slot)>,
}

impl Clone for SmallKeys {
    /// A copy with the same room (a vector's clone keeps none): a key
    /// the map had room for moves nothing in the copy either.
    fn clone(&self) -> SmallKeys {
        let mut text = String::with_capacity(self.text.capacity());
        text.push_str(&self.text);
        SmallKeys {
            text,
            entries: clone_with_room(&self.entries),
        }
    }
}

/// `a.cmp(b)`, deciding on the first byte where it can (the keys of one
/// map mostly differ there) without a call to compare the bytes.
#[inline]
fn cmp_keys(a: &str, b: &str) -> std::cmp::Ordering {
    match (a.as_bytes().first(), b.as_bytes().first()) {
        (Some(x), Some(y)) if x != y => x.cmp(y),
        _ => a.cmp(b),
    }
}

impl SmallKeys {
    fn end(&self, i: usize) -> Option<usize> {
        self.entries.get(i).map(|(end, _)| *end)
    }

    /// Where key `i` starts in `text`.
    fn start(&self, i: usize) -> usize {
        i.checked_sub(1).and_then(|p| self.end(p)).unwrap_or(0)
    }

    fn key(&self, i: usize) -> &str {
        let end = self.end(i).unwrap_or(0);
        self.text.get(self.start(i)..end).unwrap_or_default()
    }

    fn find(&self, k: &str) -> Option<usize> {
        let mut start = 0;
        for (i, &(end, _)) in self.entries.iter().enumerate() {
            if end - start == k.len() && self.text.as_bytes().get(start..end) == Some(k.as_bytes())
            {
                return Some(i);
            }
            start = end;
        }
        None
    }

    fn search(&self, k: &str) -> Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.entries.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match cmp_keys(self.key(mid), k) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// Insert `k` with `slot` as key `at`: `false` (nothing changed) if
    /// `at` is past the end.
    #[inline(always)]
    fn insert_at(&mut self, at: usize, k: &str, slot: Slot) -> bool {
        let start = self.start(at);
        if !self.text.is_char_boundary(start) || at > self.entries.len() {
            return false;
        }
        self.room_for_first(k);
        self.text.insert_str(start, k);
        for (end, _) in self.entries.iter_mut().skip(at) {
            *end += k.len();
        }
        self.entries.insert(at, (start + k.len(), slot));
        true
    }

    /// Room for the few short keys most maps hold, at once, when the map
    /// has none yet (`k` is its first).
    fn room_for_first(&mut self, k: &str) {
        if self.text.capacity() == 0 {
            self.text.reserve(KEYS_TEXT.max(k.len()));
        }
    }

    /// Put `(id, put)` in as a new key `k` after the last one: `false`
    /// (nothing changed) if `k` does not sort after every key, or the map
    /// is full.
    #[inline(always)]
    fn push_last(&mut self, k: &str, id: Id, put: Put<'_, '_>) -> bool {
        let n = self.entries.len();
        if n >= SMALL_MAP
            || n.checked_sub(1)
                .is_some_and(|last| cmp_keys(self.key(last), k) != std::cmp::Ordering::Less)
        {
            return false;
        }
        self.room_for_first(k);
        self.text.push_str(k);
        push_entry(&mut self.entries, self.text.len(), id, put);
        true
    }

    fn remove_at(&mut self, at: usize) {
        let (start, Some(end)) = (self.start(at), self.end(at)) else {
            return;
        };
        if !self.text.is_char_boundary(end) {
            return;
        }
        self.text.replace_range(start..end, "");
        self.entries.remove(at);
        for (e, _) in self.entries.iter_mut().skip(at) {
            *e -= end - start;
        }
    }

    fn slot_mut(&mut self, at: usize) -> Option<&mut Slot> {
        self.entries.get_mut(at).map(|(_, slot)| slot)
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &Slot)> {
        (0..self.entries.len())
            .map(|i| self.key(i))
            .zip(self.entries.iter().map(|(_, slot)| slot))
    }
}

impl Keys {
    fn new() -> Keys {
        Keys::Small(SmallKeys::default())
    }

    /// An empty map with room for `room` (past [`SMALL_MAP`] keys, a
    /// B-tree's).
    fn with_room(room: Room) -> Keys {
        if room.entries > SMALL_MAP {
            return Keys::Large(BTreeMap::new());
        }
        Keys::Small(SmallKeys {
            text: String::with_capacity(room.text),
            entries: Vec::with_capacity(room.entries),
        })
    }

    /// Changes the slot of `k` with `f` (an empty one if the map has no
    /// `k`), found once: the key is then in the map if its slot is not
    /// empty. `None` (the map unchanged) if `f` gives `None` and leaves
    /// the slot as it was.
    fn update<T>(&mut self, k: &str, f: impl FnOnce(&mut Slot) -> Option<T>) -> Option<T> {
        match self {
            Keys::Small(small) => match small.search(k) {
                Ok(at) => {
                    let slot = small.slot_mut(at)?;
                    let out = f(slot)?;
                    if slot.is_empty() {
                        small.remove_at(at);
                    }
                    Some(out)
                }
                // The new key's slot is made in its place (not apart and
                // then moved in), and taken out again if `f` leaves it
                // empty.
                Err(at) if small.entries.len() < SMALL_MAP => {
                    if !small.insert_at(at, k, Slot::new()) {
                        return None;
                    }
                    let out = small.slot_mut(at).and_then(f);
                    if small.slot_mut(at).is_none_or(|s| s.is_empty()) {
                        small.remove_at(at);
                    }
                    out
                }
                Err(_) => {
                    let mut slot = Slot::new();
                    let out = f(&mut slot)?;
                    if !slot.is_empty() {
                        self.insert(k, slot);
                    }
                    Some(out)
                }
            },
            Keys::Large(m) => match m.get_mut(k) {
                Some(slot) => {
                    let out = f(slot)?;
                    if slot.is_empty() {
                        m.remove(k);
                    }
                    Some(out)
                }
                None => {
                    let mut slot = Slot::new();
                    let out = f(&mut slot)?;
                    if !slot.is_empty() {
                        m.insert(k.into(), slot);
                    }
                    Some(out)
                }
            },
        }
    }

    #[cfg(test)]
    fn get_mut(&mut self, k: &str) -> Option<&mut Slot> {
        match self {
            Keys::Small(small) => {
                let at = small.find(k)?;
                small.slot_mut(at)
            }
            Keys::Large(m) => m.get_mut(k),
        }
    }

    fn insert(&mut self, k: &str, slot: Slot) {
        match self {
            Keys::Small(small) => match small.search(k) {
                Ok(at) => {
                    if let Some(s) = small.slot_mut(at) {
                        *s = slot;
                    }
                }
                Err(at) if small.entries.len() < SMALL_MAP => {
                    small.insert_at(at, k, slot);
                }
                Err(_) => {
                    let SmallKeys { text, entries } = std::mem::take(small);
                    let mut start = 0;
                    let mut m: BTreeMap<Box<str>, Slot> = entries
                        .into_iter()
                        .map(|(end, slot)| {
                            let k = text.get(start..end).unwrap_or_default();
                            start = end;
                            (k.into(), slot)
                        })
                        .collect();
                    m.insert(k.into(), slot);
                    *self = Keys::Large(m);
                }
            },
            Keys::Large(m) => {
                m.insert(k.into(), slot);
            }
        }
    }

    fn remove(&mut self, k: &str) {
        match self {
            Keys::Small(small) => {
                if let Some(at) = small.find(k) {
                    small.remove_at(at);
                }
            }
            Keys::Large(m) => {
                m.remove(k);
            }
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &Slot)> {
        let (small, large) = match self {
            Keys::Small(small) => (Some(small.iter()), None),
            Keys::Large(m) => (None, Some(m.iter().map(|(k, s)| (&**k, s)))),
        };
        small
            .into_iter()
            .flatten()
            .chain(large.into_iter().flatten())
    }
}

impl Obj {
    /// Put `(id, put)` in after the object's last key or element, where
    /// `key` (and `insert`) place it there: `false` (nothing changed)
    /// anywhere else. What a change writes into an object it made itself
    /// mostly goes there (automerge writes a new map's keys in order, a
    /// new list's elements one after another): nothing to find.
    #[inline(always)]
    fn push_last(&mut self, key: K<'_>, insert: bool, id: Id, put: Put<'_, '_>) -> bool {
        match (self, key) {
            (Obj::Map(Keys::Small(small)), K::Prop(k)) if !insert => small.push_last(k, id, put),
            (Obj::List(list), K::Head) if insert && list.is_empty() => {
                push_entry(list, id, id, put);
                true
            }
            (Obj::List(list), K::Elem(e))
                if insert && list.last().is_some_and(|(last, _)| *last == e) =>
            {
                push_entry(list, id, id, put);
                true
            }
            _ => false,
        }
    }
}

/// One actor of a document.
#[derive(Debug, Clone)]
struct Actor {
    /// Its id (keel's are 16 bytes: held inline).
    bytes: SmallVec<[u8; 16]>,
    /// Its last sequence number.
    seq: u64,
    /// Its greatest op counter.
    max_op: u64,
}

/// Up to this many actors a document's actor is found by a scan (a
/// document usually has two or three: the cloud and the nodes that ran
/// it); past them through [`Shadow::actor_index`].
const ACTOR_SCAN: usize = 8;

/// The shadow of one document; see the module documentation.
#[derive(Debug)]
pub(crate) struct Shadow {
    actors: Vec<Actor>,
    /// Every actor's index, by its bytes, once there are more than
    /// [`ACTOR_SCAN`] (empty before).
    actor_index: HashMap<Box<[u8]>, u32>,
    max_op: u64,
    /// Sorted.
    heads: Vec<[u8; 32]>,
    objs: Objs,
}

impl Clone for Shadow {
    /// A copy with the same room (see [`Shadow::keep_room`]).
    fn clone(&self) -> Shadow {
        Shadow {
            actors: clone_with_room(&self.actors),
            actor_index: self.actor_index.clone(),
            max_op: self.max_op,
            heads: self.heads.clone(),
            objs: self.objs.clone(),
        }
    }
}

/// Up to this many objects a document's object is found by a scan (a pod
/// has a few dozen); past them through [`Objs::index`].
const OBJ_SCAN: usize = 48;

/// A document's objects, by id (`None` is the root map), in the order
/// they were made. Held in vectors rather than a hash table: a change
/// that makes objects (a pod's first status makes eight) appends them,
/// where a table would grow by hashing every object again into memory
/// just allocated; a lookup scans the ids (24 bytes each, the
/// newest first: what a change writes into it mostly made itself).
#[derive(Debug)]
struct Objs {
    ids: Vec<Option<Id>>,
    objs: Vec<Obj>,
    /// Every object's place, by its id, once there are more than
    /// [`OBJ_SCAN`] (empty before).
    index: HashMap<Option<Id>, u32>,
}

/// The room for objects a shadow keeps beyond those it holds when it is
/// read or made (a pod's first status makes eight objects): a change that
/// makes them moves no vector.
const OBJ_ROOM: usize = 8;

/// The room for actors a shadow keeps beyond those it holds (see
/// [`Shadow::keep_room`]).
const ACTOR_ROOM: usize = 2;

/// The room for keys (of about eight bytes) a shadow's root map keeps
/// beyond those it holds (see [`Shadow::keep_room`]).
const ROOT_ROOM: usize = 2;

impl Clone for Objs {
    /// A copy with the same room (a vector's clone keeps none).
    fn clone(&self) -> Objs {
        Objs {
            ids: clone_with_room(&self.ids),
            objs: clone_with_room(&self.objs),
            index: self.index.clone(),
        }
    }
}

impl Objs {
    fn new() -> Objs {
        let mut ids = Vec::with_capacity(1 + OBJ_ROOM);
        ids.push(None);
        let mut objs = Vec::with_capacity(1 + OBJ_ROOM);
        objs.push(Obj::Map(Keys::new()));
        Objs {
            ids,
            objs,
            index: HashMap::default(),
        }
    }

    fn position(&self, id: &Option<Id>) -> Option<usize> {
        // The root is made first and never removed.
        if id.is_none() && self.ids.first() == Some(&None) {
            return Some(0);
        }
        if self.index.is_empty() {
            self.ids.iter().rposition(|i| i == id)
        } else {
            self.index.get(id).map(|&i| i as usize)
        }
    }

    fn contains(&self, id: &Option<Id>) -> bool {
        self.position(id).is_some()
    }

    fn get(&self, id: &Option<Id>) -> Option<&Obj> {
        self.objs.get(self.position(id)?)
    }

    fn get_mut(&mut self, id: &Option<Id>) -> Option<&mut Obj> {
        let at = self.position(id)?;
        self.objs.get_mut(at)
    }

    fn reserve(&mut self, n: usize) {
        self.ids.reserve(n);
        self.objs.reserve(n);
    }

    /// Put `obj` in as the object `id` (replacing one of that id).
    fn insert(&mut self, id: Option<Id>, obj: Obj) {
        if let Some(at) = self.position(&id)
            && let Some(o) = self.objs.get_mut(at)
        {
            *o = obj;
            return;
        }
        self.push_new(id, obj);
    }

    /// Put `obj` in as the object `id`, which the document does not hold.
    fn push_new(&mut self, id: Option<Id>, obj: Obj) {
        self.ids.push(id);
        self.objs.push(obj);
        self.index_last();
    }

    /// Make the object `id` (a map if `map`, else a list) with `room`: the
    /// document does not hold it. Written in place (see [`push_in_place`]).
    fn push_made(&mut self, id: Id, map: bool, room: Room) {
        push_in_place(&mut self.ids, || Some(id));
        push_in_place(&mut self.objs, || {
            if map {
                Obj::Map(Keys::with_room(room))
            } else {
                Obj::List(Vec::with_capacity(room.entries))
            }
        });
        self.index_last();
    }

    /// Index the object pushed last, once there are more than
    /// [`OBJ_SCAN`].
    fn index_last(&mut self) {
        if self.ids.len() > OBJ_SCAN {
            let (Some(at), Some(id)) = (self.ids.len().checked_sub(1), self.ids.last().copied())
            else {
                return;
            };
            let at = at as u32;
            if self.index.is_empty() {
                self.reindex();
            } else {
                self.index.insert(id, at);
            }
        }
    }

    fn remove(&mut self, id: &Option<Id>) {
        let Some(at) = self.position(id) else {
            return;
        };
        self.ids.remove(at);
        self.objs.remove(at);
        if self.ids.len() > OBJ_SCAN {
            self.reindex();
        } else {
            self.index.clear();
        }
    }

    fn reindex(&mut self) {
        self.index.clear();
        for (i, id) in self.ids.iter().enumerate() {
            self.index.insert(*id, i as u32);
        }
    }
}

/// How a change is folded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Causally next: each op's predecessors must be exactly the live ops.
    Next,
    /// Concurrent with what the document holds: as [`Mode::Next`], with
    /// inserts only into lists the change made, and each op id greater
    /// than its predecessors'.
    Concurrent,
    /// Applied by automerge already: general map semantics.
    Applied,
}

/// An op's key, with actors interned.
#[derive(Debug, Clone, Copy)]
enum K<'a> {
    Prop(&'a str),
    Head,
    Elem(Id),
}

/// What an op puts: a scalar (the op's own, read where the change's ops
/// are), or a new map or list. Made into its [`Val`] where the value is
/// kept ([`put_into`]), not apart and then moved: a value built apart is
/// written piece by piece and then read back whole to be moved, which
/// waits on the store buffer.
#[derive(Debug, Clone, Copy)]
enum Put<'s, 'a> {
    Scalar(&'s Scalar<'a>),
    Map,
    List,
}

/// Push `(id, put)` onto `slot`, its value written in place (a string
/// as [`Text::new`] makes it, but in its slot).
fn put_into(slot: &mut Slot, id: Id, put: Put<'_, '_>) {
    let val = match put {
        Put::Map => Val::Map,
        Put::List => Val::List,
        Put::Scalar(s) => match *s {
            Scalar::Null => Val::Null,
            Scalar::Bool(b) => Val::Bool(b),
            Scalar::Uint(u) => Val::Uint(u),
            Scalar::Int(i) => Val::Int(i),
            Scalar::F64(f) => Val::F64(f),
            Scalar::Str(s) if s.len() > Text::INLINE => Val::Str(Text::Heap(s.into())),
            Scalar::Str(s) => {
                slot.push((
                    id,
                    Val::Str(Text::Inline {
                        len: s.len() as u8,
                        bytes: [0; Text::INLINE],
                    }),
                ));
                if let Some((_, Val::Str(Text::Inline { bytes, .. }))) = slot.last_mut()
                    && let Some(b) = bytes.get_mut(..s.len())
                {
                    b.copy_from_slice(s.as_bytes());
                }
                return;
            }
        },
    };
    slot.push((id, val));
}

/// The room an object is made with: its keys or elements, and the bytes
/// of its keys.
#[derive(Debug, Clone, Copy, Default)]
struct Room {
    entries: usize,
    text: usize,
}

/// A change undone: what an op replaced.
enum Undo {
    Slot(Option<Id>, SlotAt, Slot),
    Inserted(Option<Id>, usize),
    Created(Id),
}

#[derive(Clone)]
enum SlotAt {
    /// The map key of the change's op of this index.
    Key(usize),
    Index(usize),
}

thread_local! {
    /// A fold's undo entries, kept from one fold to the next: the entries
    /// of a change are written to memory a previous fold wrote, not to
    /// memory just allocated (whose first writes miss the cache).
    static UNDO: std::cell::Cell<Vec<Undo>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Most undo entries [`UNDO`] keeps between folds (more are freed).
const UNDO_KEEP: usize = 256;

impl Shadow {
    /// The shadow of an empty document.
    pub(crate) fn new() -> Shadow {
        Shadow {
            actors: Vec::new(),
            actor_index: HashMap::default(),
            max_op: 0,
            heads: Vec::new(),
            objs: Objs::new(),
        }
    }

    /// The shadow of `doc`, read through automerge's API (cheaper than
    /// replaying its history): `None` for what the shadow does not
    /// represent (text, tables, counters, timestamps, bytes). List
    /// elements are known by their ids from cursors; deleted elements are
    /// not (an insert that refers to one takes the slow path).
    pub(crate) fn from_doc(doc: &Automerge) -> Option<Shadow> {
        let mut s = Shadow::new();
        for meta in doc.get_changes_meta(&[]) {
            let a = s.intern(meta.actor.to_bytes()) as usize;
            let actor = s.actors.get_mut(a)?;
            actor.seq = actor.seq.max(meta.seq);
            actor.max_op = actor.max_op.max(meta.max_op);
            s.max_op = s.max_op.max(meta.max_op);
        }
        s.heads = doc.get_heads().into_iter().map(|h| h.0).collect();
        s.heads.sort_unstable();
        let mut todo: Vec<(Option<Id>, ExId, ObjType)> = vec![(None, ROOT, ObjType::Map)];
        while let Some((id, exid, typ)) = todo.pop() {
            let obj = match typ {
                ObjType::Map => {
                    let mut map = Keys::new();
                    for item in doc.map_range(&exid, ..) {
                        let slot =
                            s.slot(doc.get_all(&exid, item.key.as_ref()).ok()?, &mut todo)?;
                        map.insert(item.key.as_ref(), slot);
                    }
                    Obj::Map(map)
                }
                ObjType::List => {
                    let mut list = Vec::new();
                    for i in 0..doc.length(&exid) {
                        let cursor = match doc.get_cursor(&exid, i, None).ok()? {
                            c @ Cursor::Op(_) => c.to_string(),
                            _ => return None,
                        };
                        let (ctr, actor) = cursor.split_once('@')?;
                        let actor = automerge::ActorId::try_from(actor).ok()?;
                        let elem = Id {
                            ctr: ctr.parse().ok()?,
                            actor: s.intern(actor.to_bytes()),
                        };
                        let slot = s.slot(doc.get_all(&exid, i).ok()?, &mut todo)?;
                        list.push((elem, slot));
                    }
                    Obj::List(list)
                }
                _ => return None,
            };
            s.objs.insert(id, obj);
        }
        s.keep_room();
        Some(s)
    }

    /// The live ops of one key or element, from automerge's values; the
    /// objects among them are queued to be read.
    fn slot(
        &mut self,
        values: Vec<(automerge::Value<'_>, ExId)>,
        todo: &mut Vec<(Option<Id>, ExId, ObjType)>,
    ) -> Option<Slot> {
        use automerge::{ScalarValue as S, Value as V};
        let mut slot = Slot::with_capacity(values.len());
        for (value, exid) in values {
            let ExId::Id(ctr, actor, _) = &exid else {
                return None;
            };
            let id = Id {
                ctr: *ctr,
                actor: self.intern(actor.to_bytes()),
            };
            let val = match value {
                V::Object(t @ ObjType::Map) | V::Object(t @ ObjType::List) => {
                    todo.push((Some(id), exid.clone(), t));
                    if t == ObjType::Map {
                        Val::Map
                    } else {
                        Val::List
                    }
                }
                V::Object(_) => return None,
                V::Scalar(sc) => match sc.as_ref() {
                    S::Null => Val::Null,
                    S::Boolean(b) => Val::Bool(*b),
                    S::Uint(u) => Val::Uint(*u),
                    S::Int(i) => Val::Int(*i),
                    S::F64(f) => Val::F64(*f),
                    S::Str(st) => Val::Str(Text::new(st.as_str())),
                    _ => return None,
                },
            };
            slot.push((id, val));
        }
        Some(slot)
    }

    /// Room for [`OBJ_ROOM`] more objects, [`ACTOR_ROOM`] more actors
    /// and [`ROOT_ROOM`] more keys of the root map (after the changes that
    /// made a document: a pod's first status comes from a new actor, the
    /// node, and adds `status` to the root).
    pub(crate) fn keep_room(&mut self) {
        self.objs.reserve(OBJ_ROOM);
        self.actors.reserve(ACTOR_ROOM);
        if let Some(Obj::Map(Keys::Small(root))) = self.objs.objs.first_mut() {
            root.entries.reserve(ROOT_ROOM);
            root.text.reserve(ROOT_ROOM * 8);
        }
    }

    /// The document's heads, sorted.
    pub(crate) fn heads(&self) -> &[[u8; 32]] {
        &self.heads
    }

    /// The greatest op counter in the document.
    pub(crate) fn max_op(&self) -> u64 {
        self.max_op
    }

    /// Fold a change that is causally next, or concurrent and disjoint
    /// (see the module documentation): its dependencies are changes the
    /// document holds (current heads, or changes it holds already:
    /// `known`). `false`, with the shadow unchanged, if it is neither.
    pub(crate) fn fold_next(&mut self, c: &Decoded<'_>, known: impl Fn(&[u8; 32]) -> bool) -> bool {
        let sorted = c.deps.windows(2).all(|w| w.first() < w.get(1));
        if !sorted
            || self.heads.is_empty()
            || !c
                .deps
                .iter()
                .all(|d| self.heads.binary_search(d).is_ok() || known(d))
        {
            return false;
        }
        let next = self.heads.iter().all(|h| c.deps.binary_search(h).is_ok());
        let author = self
            .find_actor(c.actor)
            .and_then(|a| self.actors.get(a as usize));
        let last_seq = author.map(|a| a.seq);
        if last_seq.unwrap_or(0).checked_add(1) != Some(c.seq) {
            return false;
        }
        if next {
            // It has seen every op: its own come after all of them.
            if self.max_op.checked_add(1) != Some(c.start_op) {
                return false;
            }
        } else {
            // Its ops come after its author's earlier ones.
            let author_max = author.map(|a| a.max_op);
            if c.start_op == 0 || c.start_op <= author_max.unwrap_or(0) {
                return false;
            }
        }
        let mode = if next { Mode::Next } else { Mode::Concurrent };
        self.others_as_automerge_writes_them(c) && self.fold(c, mode)
    }

    /// Fold a change automerge has applied to the document (in causal
    /// order). `false` if this shadow cannot represent it (the caller then
    /// drops the shadow); the shadow is then left as it was.
    pub(crate) fn fold_applied(&mut self, c: &Decoded<'_>) -> bool {
        self.fold(c, Mode::Applied)
    }

    /// automerge rebuilds a change's other actors as the actors its ops
    /// refer to, sorted, and its predecessors sorted by op id: a change
    /// that lists them otherwise would not rebuild bit for bit.
    fn others_as_automerge_writes_them(&self, c: &Decoded<'_>) -> bool {
        if c.others.windows(2).any(|w| w.first() >= w.get(1)) || c.others.contains(&c.actor) {
            return false;
        }
        let mut used: SmallVec<[bool; 8]> = smallvec::smallvec![false; c.others.len()];
        let mut mark = |id: LocalId| {
            if let Some(u) = id.0.checked_sub(1).and_then(|i| used.get_mut(i as usize)) {
                *u = true;
            }
        };
        for op in &c.ops {
            if let Some(o) = op.obj {
                mark(o);
            }
            if let Key::Elem(e) = op.key {
                mark(e);
            }
        }
        for p in &c.preds {
            mark(*p);
        }
        if used.contains(&false) {
            return false;
        }
        c.ops.iter().all(|op| {
            c.preds.get(op.preds.clone()).is_some_and(|ps| {
                ps.windows(2).all(|w| match (w.first(), w.get(1)) {
                    (Some(a), Some(b)) => (a.1, c.actor_at(a.0)) < (b.1, c.actor_at(b.0)),
                    _ => false,
                })
            })
        })
    }

    fn fold(&mut self, c: &Decoded<'_>, mode: Mode) -> bool {
        let strict = mode != Mode::Applied;
        let actors_before = self.actors.len();
        // The change's actor indices, interned.
        let mut local: SmallVec<[u32; 4]> = SmallVec::with_capacity(1 + c.others.len());
        for bytes in std::iter::once(c.actor).chain(c.others.iter().copied()) {
            local.push(self.intern(bytes));
        }
        // Room for the objects made, at once; and for each of them (by
        // the index of the op that makes it) the room it needs for what
        // this change writes into it: its keys and their bytes, or its
        // elements.
        let made = c
            .ops
            .iter()
            .filter(|op| matches!(op.action, MAKE_MAP | MAKE_LIST))
            .count();
        self.objs.reserve(made);
        let mut room: SmallVec<[Room; 32]> = SmallVec::new();
        if made > 0 {
            room.resize(c.ops.len(), Room::default());
            for op in &c.ops {
                if let Some((0, ctr)) = op.obj
                    && let Some(r) = ctr
                        .checked_sub(c.start_op)
                        .and_then(|i| room.get_mut(usize::try_from(i).ok()?))
                {
                    r.entries += 1;
                    if let Key::Prop(k) = op.key {
                        r.text += k.len();
                    }
                }
            }
        }
        // The objects this change made so far: what it writes into them
        // needs no undo entry (undoing their making removes them).
        let mut created: SmallVec<[Id; 8]> = SmallVec::new();
        // One undo entry per op on an object made before, one per object
        // made.
        let mut undo = UNDO.take();
        undo.clear();
        undo.reserve(c.ops.len() + made);
        let mut ok = true;
        let mut preds: SmallVec<[Id; 4]> = SmallVec::new();
        for (i, op) in c.ops.iter().enumerate() {
            let applied = (|| {
                let id = Id {
                    ctr: c.start_op.checked_add(i as u64)?,
                    actor: *local.first()?,
                };
                let to_id = |l: LocalId| -> Option<Id> {
                    Some(Id {
                        ctr: l.1,
                        actor: *local.get(usize::try_from(l.0).ok()?)?,
                    })
                };
                let obj = match op.obj {
                    None => None,
                    Some(o) => Some(to_id(o)?),
                };
                preds.clear();
                for p in c.preds.get(op.preds.clone())? {
                    preds.push(to_id(*p)?);
                }
                // Inserts only into a list this change made: the shadow
                // knows every element of that one.
                let made_here = obj.is_some_and(|o| created.contains(&o));
                if mode == Mode::Concurrent
                    && ((op.insert && !made_here) || preds.iter().any(|p| !self.greater(id, *p)))
                {
                    return None;
                }
                let key = match op.key {
                    Key::Prop(k) => K::Prop(k),
                    Key::Head => K::Head,
                    Key::Elem(e) => K::Elem(to_id(e)?),
                };
                let put = match (op.action, op.value) {
                    (MAKE_MAP, Scalar::Null) => Some(Put::Map),
                    (MAKE_LIST, Scalar::Null) => Some(Put::List),
                    (DELETE, Scalar::Null) => None,
                    (PUT, _) => Some(Put::Scalar(&op.value)),
                    _ => return None,
                };
                let makes = matches!(put, Some(Put::Map | Put::List));
                let room = room.get(i).copied().unwrap_or_default();
                self.apply_op(
                    obj, i, key, op.insert, made_here, id, &preds, put, room, strict, &mut undo,
                )?;
                if makes {
                    created.push(id);
                }
                Some(())
            })();
            if applied.is_none() {
                ok = false;
                break;
            }
        }
        let undone = !ok;
        if undone {
            for u in undo.drain(..).rev() {
                self.undo(u, c);
            }
        }
        undo.clear();
        if undo.capacity() <= UNDO_KEEP {
            UNDO.set(undo);
        }
        if undone {
            self.actors.truncate(actors_before);
            if self.actors.len() > ACTOR_SCAN {
                self.actor_index
                    .retain(|_, i| (*i as usize) < actors_before);
            } else {
                self.actor_index.clear();
            }
            return false;
        }
        let last = (c.ops.len() as u64)
            .checked_sub(1)
            .map(|n| c.start_op.saturating_add(n));
        if let Some(last) = last {
            self.max_op = self.max_op.max(last);
        }
        if let Some(author) = local.first().and_then(|a| self.actors.get_mut(*a as usize)) {
            author.seq = author.seq.max(c.seq);
            if let Some(last) = last {
                author.max_op = author.max_op.max(last);
            }
        }
        self.heads.retain(|h| !c.deps.contains(h));
        if let Err(at) = self.heads.binary_search(&c.hash) {
            self.heads.insert(at, c.hash);
        }
        true
    }

    /// The index of an actor the document knows.
    fn find_actor(&self, bytes: &[u8]) -> Option<u32> {
        if self.actors.len() > ACTOR_SCAN {
            return self.actor_index.get(bytes).copied();
        }
        let i = self.actors.iter().position(|a| *a.bytes == *bytes)?;
        u32::try_from(i).ok()
    }

    fn intern(&mut self, bytes: &[u8]) -> u32 {
        if let Some(i) = self.find_actor(bytes) {
            return i;
        }
        let i = self.actors.len() as u32;
        self.actors.push(Actor {
            bytes: SmallVec::from_slice(bytes),
            seq: 0,
            max_op: 0,
        });
        if self.actors.len() > ACTOR_SCAN {
            if self.actor_index.is_empty() {
                for (j, a) in self.actors.iter().enumerate() {
                    self.actor_index.insert(a.bytes.as_slice().into(), j as u32);
                }
            } else {
                self.actor_index.insert(bytes.into(), i);
            }
        }
        i
    }

    /// The bytes of an interned actor.
    fn actor_bytes(&self, i: u32) -> Option<&[u8]> {
        self.actors.get(i as usize).map(|a| a.bytes.as_slice())
    }

    /// automerge's op order: counter, then actor bytes.
    fn greater(&self, a: Id, b: Id) -> bool {
        (a.ctr, self.actor_bytes(a.actor)) > (b.ctr, self.actor_bytes(b.actor))
    }

    /// Apply one op (`put`, made with `room` if it is an object) at `obj`
    /// and `key` (`op` is its index in the change; `made_here`: this
    /// change made `obj`). `None` if it cannot be (nothing changed by this
    /// op).
    #[allow(clippy::too_many_arguments)]
    fn apply_op(
        &mut self,
        obj: Option<Id>,
        op: usize,
        key: K<'_>,
        insert: bool,
        made_here: bool,
        id: Id,
        preds: &[Id],
        put: Option<Put<'_, '_>>,
        room: Room,
        strict: bool,
        undo: &mut Vec<Undo>,
    ) -> Option<()> {
        // An op id past the document's greatest (every op of a change
        // that is causally next) is no object's yet: ops of one change
        // have ids of their own.
        let new_id = id.ctr > self.max_op;
        if matches!(put, Some(Put::Map | Put::List)) && !new_id && self.objs.contains(&Some(id)) {
            return None;
        }
        // The object the op makes (a map or not), made once the op is in.
        let made = match put {
            Some(Put::Map) => Some(true),
            Some(Put::List) => Some(false),
            _ => None,
        };
        // A new key or element at the end of an object this change made
        // (nothing live there, nothing after it) is put there as the
        // general path below would put it, and needs no undo entry.
        if made_here
            && preds.is_empty()
            && let Some(p) = put
            && self
                .objs
                .get_mut(&obj)
                .is_some_and(|o| o.push_last(key, insert, id, p))
        {
            if let Some(map) = made {
                self.make(id, map, room, undo);
            }
            return Some(());
        }
        // What an op writes into an object this change made needs no
        // undo entry: undoing the making removes the object.
        let mut undo_entry = |u: Undo| {
            if !made_here {
                undo.push(u);
            }
        };
        // Replace the live ops of a slot (`val` is put in after): in
        // strict mode the predecessors must be exactly the live ops (and a
        // delete must delete something).
        let deletes = put.is_none();
        let replace = |slot: &mut Slot| -> Option<Slot> {
            if slot.is_empty() {
                // A new key: nothing to check or to read.
                return (!strict || (preds.is_empty() && !deletes)).then(Slot::new);
            }
            if strict {
                let same =
                    slot.len() == preds.len() && slot.iter().all(|(live, _)| preds.contains(live));
                if !same || (deletes && preds.is_empty()) {
                    return None;
                }
                // Every live op is replaced.
                return Some(std::mem::take(slot));
            }
            let old = std::mem::take(slot);
            slot.extend(
                old.iter()
                    .filter(|(live, _)| !preds.contains(live))
                    .cloned(),
            );
            Some(old)
        };
        let mut put = put;
        // For an insert: the element right after the reference, if any.
        let mut next_after = None;
        match (self.objs.get_mut(&obj)?, key) {
            (Obj::Map(map), K::Prop(k)) if !insert => {
                // The undo entry is written where the old slot is taken
                // (not moved out through the map's return value).
                map.update(k, |entry| {
                    let old = replace(entry)?;
                    if let Some(p) = put.take() {
                        put_into(entry, id, p);
                    }
                    undo_entry(Undo::Slot(obj, SlotAt::Key(op), old));
                    Some(())
                })?;
            }
            (Obj::List(list), K::Head | K::Elem(_)) if insert => {
                let at = match key {
                    K::Elem(e) => list.iter().position(|(el, _)| *el == e)? + 1,
                    _ => 0,
                };
                if !preds.is_empty() {
                    return None;
                }
                let p = put.take()?;
                next_after = list.get(at).map(|(n, _)| *n);
                list.insert(at, (id, Slot::new()));
                put_into(&mut list.get_mut(at)?.1, id, p);
                undo_entry(Undo::Inserted(obj, at));
            }
            (Obj::List(list), K::Elem(e)) => {
                let at = list.iter().position(|(el, _)| *el == e)?;
                let (_, slot) = list.get_mut(at)?;
                let old = replace(slot)?;
                if let Some(p) = put.take() {
                    put_into(slot, id, p);
                }
                undo_entry(Undo::Slot(obj, SlotAt::Index(at), old));
            }
            _ => return None,
        }
        // With a greater element right after the reference, RGA would
        // place the insert past it: not a case the shadow handles.
        if next_after.is_some_and(|n| self.greater(n, id)) {
            return None;
        }
        if let Some(map) = made {
            self.make(id, map, room, undo);
        }
        Some(())
    }

    /// Make the object an op `id` makes (a map if `map`, else a list),
    /// with `room`, and its undo entry. (No object has this id: checked
    /// before the op is applied.)
    fn make(&mut self, id: Id, map: bool, room: Room, undo: &mut Vec<Undo>) {
        self.objs.push_made(id, map, room);
        push_in_place(undo, || Undo::Created(id));
    }

    fn undo(&mut self, u: Undo, c: &Decoded<'_>) {
        match u {
            Undo::Created(id) => {
                self.objs.remove(&Some(id));
            }
            Undo::Inserted(obj, at) => {
                if let Some(Obj::List(list)) = self.objs.get_mut(&obj)
                    && at < list.len()
                {
                    list.remove(at);
                }
            }
            Undo::Slot(obj, at, old) => match (self.objs.get_mut(&obj), at) {
                (Some(Obj::Map(map)), SlotAt::Key(i)) => {
                    let Some(Key::Prop(k)) = c.ops.get(i).map(|op| op.key) else {
                        return;
                    };
                    if old.is_empty() {
                        map.remove(k);
                    } else {
                        map.insert(k, old);
                    }
                }
                (Some(Obj::List(list)), SlotAt::Index(i)) => {
                    if let Some((_, slot)) = list.get_mut(i) {
                        *slot = old;
                    }
                }
                _ => {}
            },
        }
    }

    /// The document as JSON, as [`super::json::read_root`] renders it.
    pub(crate) fn render(&self) -> Value {
        self.render_map(None, 0)
    }

    fn winner<'s>(&self, slot: &'s Slot) -> Option<&'s (Id, Val)> {
        let mut best: Option<&(Id, Val)> = None;
        for live in slot {
            if best.is_none_or(|b| self.greater(live.0, b.0)) {
                best = Some(live);
            }
        }
        best
    }

    fn render_val(&self, (id, val): &(Id, Val), depth: usize) -> Value {
        match val {
            Val::Null => Value::Null,
            Val::Bool(b) => Value::Bool(*b),
            Val::Uint(u) => Value::Number(Number::from(*u)),
            Val::Int(i) => Value::Number(Number::from(*i)),
            Val::F64(f) => Number::from_f64(*f).map_or(Value::Null, Value::Number),
            Val::Str(s) => Value::String(s.as_str().to_owned()),
            Val::Map | Val::List if depth >= MAX_DEPTH => Value::Null,
            Val::Map => self.render_map(Some(*id), depth),
            Val::List => self.render_list(Some(*id), depth),
        }
    }

    fn render_map(&self, obj: Option<Id>, depth: usize) -> Value {
        let mut out = Map::new();
        if let Some(Obj::Map(map)) = self.objs.get(&obj) {
            for (k, slot) in map.iter() {
                if let Some(w) = self.winner(slot) {
                    out.insert(k.to_string(), self.render_val(w, depth + 1));
                }
            }
        }
        Value::Object(out)
    }

    fn render_list(&self, obj: Option<Id>, depth: usize) -> Value {
        let mut out = Vec::new();
        if let Some(Obj::List(list)) = self.objs.get(&obj) {
            for (_, slot) in list {
                if let Some(w) = self.winner(slot) {
                    out.push(self.render_val(w, depth + 1));
                }
            }
        }
        Value::Array(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn slot(n: u64) -> Slot {
        smallvec::smallvec![(Id { ctr: n, actor: 0 }, Val::Uint(n))]
    }

    /// [`Text`] gives back the string it was made from, inline or not.
    #[test]
    fn text_gives_back_its_string() {
        for s in [
            "",
            "a",
            "Running",
            "0123456789abcdefghijkl",
            "0123456789abcdefghijklm",
            "ééééééééééé",
            "éééééééééééé",
        ] {
            let t = Text::new(s);
            assert_eq!(t.as_str(), s);
            assert_eq!(t.clone().as_str(), s);
            assert_eq!(matches!(t, Text::Inline { .. }), s.len() <= 22, "{s}");
        }
    }

    /// [`Keys`] keeps what a B-tree keeps, in its order, across the move
    /// from the small form to the large one, whatever the order of inserts.
    #[test]
    fn keys_behave_as_a_btree_map() {
        for order in 0..3u64 {
            let mut keys = Keys::new();
            let mut want: BTreeMap<Box<str>, Slot> = BTreeMap::new();
            for i in 0..(3 * SMALL_MAP as u64) {
                let n = match order {
                    0 => i,
                    1 => 1000 - i,
                    _ => (i * 37) % 101,
                };
                let k = format!("k{n}");
                keys.insert(&k, slot(n));
                want.insert(k.as_str().into(), slot(n));
                if i % 5 == 0 {
                    let gone = format!("k{}", n / 2);
                    keys.remove(&gone);
                    want.remove(gone.as_str());
                }
                if i % 7 == 0 {
                    // Overwrite a present key.
                    keys.insert(&k, slot(n + 1));
                    want.insert(k.as_str().into(), slot(n + 1));
                }
                let got: Vec<(&str, &Slot)> = keys.iter().collect();
                let expected: Vec<(&str, &Slot)> = want.iter().map(|(k, s)| (&**k, s)).collect();
                assert_eq!(got, expected);
                assert_eq!(keys.get_mut(&k).cloned(), want.get(k.as_str()).cloned());
                assert!(keys.get_mut("absent").is_none());
                for (k, slot) in &want {
                    assert_eq!(keys.get_mut(k), Some(&mut slot.clone()));
                }
            }
            assert!(matches!(keys, Keys::Large(_)));
        }
    }

    #[test]
    fn update_behaves_as_a_btree_map() {
        for order in 0..3u64 {
            let mut keys = Keys::new();
            let mut want: BTreeMap<Box<str>, Slot> = BTreeMap::new();
            for i in 0..(4 * SMALL_MAP as u64) {
                let n = match order {
                    0 => i % 50,
                    1 => 1000 - i % 70,
                    _ => (i * 37) % 101,
                };
                let k = format!("k{n}");
                // Put, empty (the key goes), or refuse (nothing changes).
                let what = i % 4;
                let before = want.get(k.as_str()).cloned();
                let got = keys.update(&k, |s| match what {
                    0 | 1 => {
                        let old = s.clone();
                        *s = slot(i);
                        Some(old)
                    }
                    2 => Some(std::mem::take(s)),
                    _ => None,
                });
                match what {
                    0 | 1 => {
                        want.insert(k.as_str().into(), slot(i));
                    }
                    2 => {
                        want.remove(k.as_str());
                    }
                    _ => {}
                }
                if what == 3 {
                    assert_eq!(got, None);
                } else {
                    assert_eq!(got, Some(before.unwrap_or_default()));
                }
                let got: Vec<(&str, &Slot)> = keys.iter().collect();
                let expected: Vec<(&str, &Slot)> = want.iter().map(|(k, s)| (&**k, s)).collect();
                assert_eq!(got, expected);
            }
        }
        // Past SMALL_MAP keys through update alone: a B-tree.
        let mut keys = Keys::new();
        for n in 0..(2 * SMALL_MAP as u64) {
            keys.update(&format!("k{n}"), |s| {
                *s = slot(n);
                Some(())
            });
        }
        assert!(matches!(keys, Keys::Large(_)));
        assert_eq!(keys.iter().count(), 2 * SMALL_MAP);
    }
}
