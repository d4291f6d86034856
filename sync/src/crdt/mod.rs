//! The CRDT object store: one automerge document per object key.
//!
//! Every Kubernetes-style object (key `pods/default/web-1`, ...) is an automerge
//! document. Writers never send state, only changes: the cloud edits
//! spec-like fields, the edge edits status-like fields, each under its own
//! [`ActorId`], and [`ObjectStore::edit_replace`] / [`ObjectStore::edit_merge_patch`]
//! emit *minimal* changes (only the fields that differ), so concurrent edits to
//! different fields by the two writers both survive the merge.
//!
//! Changes arrive from the log in any interleaving, possibly duplicated;
//! [`ObjectStore::apply_change`] is idempotent, holds changes whose
//! dependencies have not arrived yet, and applies them once they have. Any two
//! stores that applied the same set of changes render byte-identical JSON
//! (see [`json`] for the mapping and the sorted-key output order).
//!
//! ## Deletion
//!
//! [`ObjectStore::apply_tombstone`] drops the document and remembers the hashes
//! of all its changes ("dead" history). A later change that depends on dead
//! history — a straggler from a writer that had not seen the deletion, or a
//! duplicate of a dead change — is discarded ([`Applied::Discarded`]) and never
//! resurrects the object. A change with no dependencies starts a new
//! incarnation. Tombstones are not CRDT operations and do not name the
//! history they delete (the API takes just the key): the dead set is whatever
//! this replica had applied when the tombstone arrived. So the log must
//! deliver a tombstone after the changes it deletes that have no dependencies
//! (an object's creation) and before any re-creation that follows it;
//! otherwise replicas can disagree on whether the object exists.
//!
//! ## Rebase (history compaction)
//!
//! An automerge document keeps every op ever made, so an object updated for
//! months (a Node's heartbeat, a pod's status) grows without bound.
//! [`ObjectStore::rebase`] replaces an object's document with a fresh one
//! holding its current value as a single change with no dependencies, the
//! *rebase root* (marked by its commit message). Only cloudcore rebases; the
//! root travels as an ordinary change record, so every replica that meets
//! it (in stream order, after the history it replaces) drops its document
//! for the root. Everything the replaced document held becomes dead
//! history, as after a tombstone: a straggler built on it is discarded, and
//! so is whatever was still waiting for dependencies. A replica that had
//! changes the root does not include (an edge's status the cloud had not
//! folded yet) keeps what it had as *diverged*; its writer re-asserts it
//! with [`ObjectStore::take_diverged`], a minimal change on top of the root.
//! A log compaction fold that meets a root replaces its state with it.
//!
//! ## Hostile input
//!
//! Change and snapshot bytes are untrusted. The checksum is verified, ops are
//! checked structurally against the document, automerge runs on a copy under
//! a panic guard (automerge 0.12 panics on some well-formed but inconsistent
//! changes), and an applied change must be rebuildable bit-for-bit from the
//! document (otherwise the document could not be saved and loaded again). A
//! rejected change leaves the store unchanged. Actor ids are not
//! authenticated here: the sync layer must check that a stream only carries
//! changes by that stream's writer.

mod actor;
mod columnar;
mod doc;
mod guard;
pub mod json;
mod shadow;

use std::collections::{BTreeMap, BTreeSet};

use automerge::transaction::CommitOptions;
use automerge::{Automerge, Change, ChangeHash, ROOT, ReadDoc};
use serde_json::Value;

pub use actor::ActorId;
pub use json::MAX_DEPTH;

use doc::Doc;
use guard::{
    Chunk, Created, check_alone, check_change, check_in_batch, guarded, parse_change, parse_state,
};
pub use json::merge_patch;
use shadow::Shadow;

/// Errors of the object store. Malformed input of any kind (change bytes,
/// snapshot bytes, JSON) is reported here; nothing panics on input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CrdtError {
    /// The bytes are not one well-formed automerge change.
    #[error("malformed change: {0}")]
    MalformedChange(#[source] automerge::LoadChangeError),
    /// The change's chunk header is not that of one uncompressed change.
    #[error("malformed change header: {0}")]
    MalformedHeader(&'static str),
    /// The change's checksum does not match its contents (corruption).
    #[error("change checksum does not match its contents")]
    BadChecksum,
    /// A compressed automerge chunk: never accepted, as automerge would
    /// inflate it without a bound.
    #[error("compressed automerge chunks are not accepted")]
    Compressed,
    /// The change's actor id is not a keel actor id (16 bytes).
    #[error("actor id of {0} bytes (keel actors have 16)")]
    ForeignActor(usize),
    /// An object already holds as many changes waiting for dependencies as
    /// it may; the change was dropped.
    #[error("{key} already holds {max} changes waiting for dependencies")]
    TooManyQueued { key: String, max: usize },
    /// The bytes are not well-formed saved state.
    #[error("malformed snapshot: {0}")]
    MalformedSnapshot(String),
    /// The change is well-formed but does not make sense against the document
    /// (an op on a missing object, a map key on a list, ...).
    #[error("invalid change: {0}")]
    InvalidChange(String),
    /// automerge refused the change or the edit (e.g. an actor reused a
    /// sequence number with different content).
    #[error("automerge rejected the operation: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    /// automerge panicked on hostile input; the input was rejected and the
    /// store left unchanged.
    #[error("automerge panicked while {0}; input rejected")]
    Panicked(&'static str),
    /// An edit's value (or merge patch) is not a JSON object.
    #[error("the object value must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// A JSON number that is neither an `i64`, a `u64`, nor a finite `f64`.
    #[error("unsupported JSON number {0}")]
    UnsupportedNumber(String),
    /// The JSON nests deeper than the store accepts.
    #[error("JSON nests deeper than {max} levels")]
    TooDeep { max: usize },
    /// The editing actor has its own changes for this object waiting for
    /// dependencies; a new edit would reuse their sequence numbers.
    #[error("actor {actor} has changes to {key} still waiting for dependencies")]
    PendingOwnChanges { key: String, actor: ActorId },
    /// Could not produce a re-creation change distinct from deleted history.
    #[error("could not re-create {0}: every candidate change is already dead history")]
    Recreate(String),
}

/// The actor of one change, for checking who wrote it before it is kept
/// anywhere: from the change's header, whose framing is checked as
/// [`ObjectStore::apply_change`] checks it (compressed chunks refused). Its
/// checksum and ops are checked when it is applied.
pub fn change_actor(bytes: &[u8]) -> Result<ActorId, CrdtError> {
    let raw = guard::header_actor(bytes)?;
    let id: [u8; 16] = raw
        .try_into()
        .map_err(|_| CrdtError::ForeignActor(raw.len()))?;
    Ok(ActorId::from_bytes(id))
}

/// What [`ObjectStore::apply_change`] did with a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Applied {
    /// Applied now (possibly unblocking queued changes as well).
    New,
    /// Already part of the document; nothing changed.
    Duplicate,
    /// Dependencies missing: kept and applied as soon as they arrive. A
    /// re-delivery of a change that is still queued also reports `Queued`.
    Queued,
    /// Belongs to (or depends on) history removed by a tombstone; dropped.
    Discarded,
}

#[derive(Debug, Clone, Default)]
struct Entry {
    /// The document (in memory, or as the bytes it was loaded from: see
    /// [`doc`]); `None` when the object does not exist. A document is only
    /// ever stored with at least one change applied, and its automerge
    /// queue is always empty (this module queues changes itself, below).
    doc: Option<Doc>,
    /// Changes whose dependencies are not all applied yet.
    pending: BTreeMap<ChangeHash, Change>,
    /// Hashes of changes removed by a tombstone or replaced by a rebase
    /// root, and of changes discarded because they depend on such changes
    /// or could not be applied. A rebase starts the set afresh (so it holds
    /// one generation of history, not all of them).
    dead: BTreeSet<ChangeHash>,
    /// What this replica held beyond a rebase root that replaced its
    /// document, as a merge patch on top of the root (see
    /// [`ObjectStore::take_diverged`]).
    diverged: Option<Value>,
    /// Without a document at the last [`ObjectStore::forget_deleted`].
    gone_at_sweep: bool,
    /// The fold's fast path (see [`shadow`]): a shadow of the document and
    /// of `tail`, when there is one.
    /// (Held in the entry: it is read for every change the fast path
    /// takes.)
    fast: Option<Shadow>,
    /// Changes folded by the fast path that the document does not hold
    /// yet, in causal order, each with its hash. Only ever non-empty with a
    /// shadow; handed to automerge by [`Entry::flush`] before anything else
    /// reads or changes the document.
    tail: Vec<(ChangeHash, Vec<u8>)>,
    /// The document's history holds something the shadow cannot represent:
    /// no fast path until the document is replaced.
    no_fast: bool,
}

/// Most changes an object's fast-path tail holds before they are handed
/// to automerge together.
const MAX_TAIL: usize = 64;

/// The commit message that marks a rebase root.
const REBASE_MESSAGE: &str = "keel: rebase";

fn is_rebase_root(change: &Change) -> bool {
    change.deps().is_empty()
        && change
            .message()
            .is_some_and(|m| m.starts_with(REBASE_MESSAGE))
}

/// Whether `bytes` is one change that rebases its object (see the module
/// documentation): false for anything else, malformed bytes included. Read
/// from the change's header alone (framing and checksum checked, ops not
/// decoded: that happens when it is applied), as the cloud asks this of
/// every change a node sends.
pub fn is_rebase(bytes: &[u8]) -> bool {
    guard::header(bytes).is_ok_and(|h| {
        h.deps == 0
            && h.message()
                .is_ok_and(|m| m.starts_with(REBASE_MESSAGE.as_bytes()))
    })
}

/// The hash of one change (checked as [`ObjectStore::apply_change`]
/// checks it).
pub fn change_hash(bytes: &[u8]) -> Result<[u8; 32], CrdtError> {
    parse_change(bytes).map(|c| c.hash().0)
}

/// Check that `doc` reproduces each of `hashes` exactly from its op set.
///
/// automerge accepts some well-formed but inconsistent changes (e.g. one that
/// overwrites an op that does not exist) that its op set cannot represent:
/// the change rebuilt from the document differs from the one applied, and
/// the saved document then fails to load ("mismatching heads"). Rebuilding
/// the change and comparing hashes catches every such case.
fn verify_faithful(doc: &Automerge, hashes: &[ChangeHash]) -> Result<(), CrdtError> {
    for hash in hashes {
        let rebuilt = guarded("rebuilding an applied change", || {
            doc.get_change_by_hash(hash)
        })?;
        if rebuilt.map(|c| c.hash()) != Some(*hash) {
            return Err(CrdtError::InvalidChange(format!(
                "{hash} is inconsistent with the document (it references ops that do not exist)"
            )));
        }
    }
    Ok(())
}

fn has_change(doc: &Automerge, hash: &ChangeHash) -> bool {
    // With an empty automerge queue, "not missing" means "applied".
    doc.get_missing_deps(std::slice::from_ref(hash)).is_empty()
}

/// Whether the change with `hash` is applied: in the document, or in the
/// fast path's tail waiting to be handed to it.
/// (A saved document is loaded only if the tail does not hold it.)
fn holds(doc: Option<&Doc>, tail: &[(ChangeHash, Vec<u8>)], hash: &ChangeHash) -> bool {
    tail.iter().any(|(t, _)| t == hash) || doc.is_some_and(|d| has_change(d.get(), hash))
}

impl Entry {
    /// The document, loaded if it is held saved.
    fn doc(&self) -> Option<&Automerge> {
        self.doc.as_ref().map(Doc::get)
    }

    /// The fast path (see [`shadow`]): fold `bytes` without automerge if
    /// it is one change that is causally next for this document, or
    /// concurrent with it and disjoint from what it does not know. `false`
    /// (nothing changed) when it is not, or not for the fast path; the
    /// caller then takes the slow path, which decides (and reports) what
    /// the change is.
    fn try_fast(&mut self, bytes: &[u8]) -> bool {
        if self.doc.is_none() {
            return false;
        }
        if !self.pending.is_empty() {
            return false;
        }
        let Some(change) = columnar::decode(bytes) else {
            return false;
        };
        let hash = ChangeHash(change.hash);
        if self.dead.contains(&hash) {
            return false;
        }
        if self.fast.is_none()
            && let Some(doc) = self.doc()
        {
            // Read the shadow only for a change whose dependencies the
            // document holds (not for one that will wait for others).
            let heads = doc.get_heads();
            let held =
                |d: &[u8; 32]| heads.iter().any(|h| h.0 == *d) || has_change(doc, &ChangeHash(*d));
            if !change.deps.iter().all(held) {
                return false;
            }
        }
        if self.tail.len() >= MAX_TAIL {
            self.flush();
        }
        if self.shadow_mut().is_none() {
            return false;
        }
        let (doc, tail) = (self.doc.as_ref(), &self.tail);
        let known = |h: &[u8; 32]| holds(doc, tail, &ChangeHash(*h));
        let Some(shadow) = self.fast.as_mut() else {
            return false;
        };
        if !shadow.fold_next(&change, known) {
            return false;
        }
        // The entry written in place, then its bytes (see `push_in_place`).
        shadow::push_in_place(&mut self.tail, || (hash, Vec::new()));
        if let Some((_, kept)) = self.tail.last_mut() {
            *kept = bytes.to_vec();
        }
        true
    }

    /// The shadow, read from the document if there is none yet (once:
    /// `no_fast` remembers a document it cannot represent).
    fn shadow_mut(&mut self) -> Option<&mut Shadow> {
        if self.fast.is_none() && !self.no_fast && self.tail.is_empty() {
            let doc = self.doc()?;
            match guarded("reading a document", || Shadow::from_doc(doc)) {
                Ok(Some(fast)) => self.fast = Some(fast),
                _ => self.no_fast = true,
            }
        }
        self.fast.as_mut()
    }

    /// Fold changes automerge has just applied into the shadow, if there is
    /// one; a change it cannot represent drops it.
    fn fold_into_shadow<'a>(&mut self, applied: impl IntoIterator<Item = &'a [u8]>) {
        let Some(fast) = self.fast.as_mut() else {
            return;
        };
        for bytes in applied {
            if !columnar::decode(bytes).is_some_and(|c| fast.fold_applied(&c)) {
                self.fast = None;
                self.no_fast = true;
                return;
            }
        }
    }

    /// Hand the fast path's tail to automerge, so that the document holds
    /// every change applied. A change automerge refuses (only ever a
    /// hand-made one that the fast path's checks let through) is
    /// discarded, as on the slow path, and the shadow is dropped (the view
    /// is the document's again).
    fn flush(&mut self) {
        if self.tail.is_empty() {
            return;
        }
        let tail = std::mem::take(&mut self.tail);
        // The shadow holds these already: keep it out of the way.
        let fast = self.fast.take();
        let mut batch = Vec::with_capacity(tail.len());
        let mut broken = false;
        for (hash, bytes) in &tail {
            match parse_change(bytes) {
                Ok(c) => batch.push(c),
                Err(error) => {
                    tracing::warn!(%hash, %error, "fast-path change refused by automerge; discarded");
                    self.dead.insert(*hash);
                    broken = true;
                }
            }
        }
        if self.apply_batch(batch.clone()).is_err() {
            broken = true;
            for c in batch {
                let hash = c.hash();
                if let Err(error) = self.apply_ready(c) {
                    tracing::warn!(%hash, %error, "fast-path change refused by automerge; discarded");
                    self.dead.insert(hash);
                }
            }
        }
        if !broken {
            self.fast = fast;
        }
    }

    /// The document (with the tail) as JSON: `None` if it does not exist.
    fn view(&self) -> Option<Value> {
        let doc = self.doc.as_ref()?;
        Some(match &self.fast {
            Some(fast) => fast.render(),
            None => json::read_root(doc.get()),
        })
    }

    fn is_ready(&self, change: &Change) -> bool {
        match self.doc() {
            None => change.deps().is_empty(),
            Some(doc) => change.deps().iter().all(|d| has_change(doc, d)),
        }
    }

    fn knows(&self, hash: &ChangeHash) -> Option<Applied> {
        if self.dead.contains(hash) {
            Some(Applied::Discarded)
        } else if holds(self.doc.as_ref(), &self.tail, hash) {
            Some(Applied::Duplicate)
        } else if self.pending.contains_key(hash) {
            Some(Applied::Queued)
        } else {
            None
        }
    }

    /// Route one change: discard, queue, or apply (then drain the queue).
    fn ingest(&mut self, change: Change) -> Result<Applied, CrdtError> {
        self.flush();
        let hash = change.hash();
        if let Some(known) = self.knows(&hash) {
            return Ok(known);
        }
        if is_rebase_root(&change) {
            self.rebase_to(change)?;
            return Ok(Applied::New);
        }
        if change.deps().iter().any(|d| self.dead.contains(d)) {
            self.dead.insert(hash);
            // Queued changes that depend on this one are dead as well.
            self.drain_pending();
            return Ok(Applied::Discarded);
        }
        if !self.is_ready(&change) {
            self.pending.insert(hash, change);
            return Ok(Applied::Queued);
        }
        self.apply_ready(change)?;
        self.drain_pending();
        Ok(Applied::New)
    }

    /// Replace the document with a rebase root: the old document's history,
    /// and every change still waiting, become dead; what the old document
    /// held beyond the root is kept as `diverged`. Atomic: on error the
    /// entry is left as it was.
    fn rebase_to(&mut self, change: Change) -> Result<(), CrdtError> {
        self.flush();
        check_change(None, &change)?;
        let hash = change.hash();
        let fast = fresh_shadow([change.raw_bytes()]);
        let doc = guarded("applying a rebase root", move || {
            let mut doc = Automerge::new();
            doc.apply_changes([change]).map(|()| doc)
        })??;
        if !has_change(&doc, &hash) {
            return Err(CrdtError::InvalidChange(format!("{hash} was not applied")));
        }
        verify_faithful(&doc, &[hash])?;
        let mut dead: BTreeSet<ChangeHash> = BTreeSet::new();
        self.diverged = None;
        if let Some(old) = self.doc.take().map(Doc::into_doc) {
            self.diverged = json::merge_diff(&json::read_root(&doc), &json::read_root(&old));
            dead.extend(old.get_changes_meta(&[]).into_iter().map(|m| m.hash));
        }
        // What was waiting was built on the history the root replaces.
        dead.extend(std::mem::take(&mut self.pending).into_keys());
        self.dead = dead;
        self.doc = Some(Doc::live(doc));
        self.fast = fast;
        self.no_fast = false;
        Ok(())
    }

    /// Apply a causally ready change, atomically: on any error (or a panic
    /// inside automerge) the document is left as it was.
    fn apply_ready(&mut self, change: Change) -> Result<(), CrdtError> {
        check_change(self.doc(), &change)?;
        let hash = change.hash();
        let fresh = self.doc.is_none();
        let bytes = (self.fast.is_some() || fresh).then(|| change.raw_bytes().to_vec());
        let base = self.doc.as_ref().map(Doc::to_doc).unwrap_or_default();
        let doc = guarded("applying a change", move || {
            let mut doc = base;
            doc.apply_changes([change]).map(|()| doc)
        })??;
        if !has_change(&doc, &hash) {
            return Err(CrdtError::InvalidChange(format!("{hash} was not applied")));
        }
        verify_faithful(&doc, &[hash])?;
        self.doc = Some(Doc::live(doc));
        self.shadow_after(fresh, bytes.as_deref());
        Ok(())
    }

    /// The shadow after changes automerge applied: folded into it, or, for
    /// a document they created, the shadow of just them (so that changes
    /// after them take the fast path without reading the document).
    fn shadow_after<'a>(&mut self, fresh: bool, applied: impl IntoIterator<Item = &'a [u8]>) {
        if fresh {
            self.fast = fresh_shadow(applied);
            self.no_fast = false;
        } else {
            self.fold_into_shadow(applied);
        }
    }

    /// Apply a causally ordered batch of ready changes with one automerge
    /// call, atomically: on any error the document is left as it was.
    /// Cheaper than one call per change (automerge walks its op set once per
    /// call, and the document is cloned and verified once).
    fn apply_batch(&mut self, batch: Vec<Change>) -> Result<(), CrdtError> {
        let mut created = Created::new();
        for change in &batch {
            check_in_batch(self.doc(), change, &mut created)?;
        }
        let hashes: Vec<ChangeHash> = batch.iter().map(Change::hash).collect();
        let fresh = self.doc.is_none();
        let raw: Vec<Vec<u8>> = if self.fast.is_some() || fresh {
            batch.iter().map(|c| c.raw_bytes().to_vec()).collect()
        } else {
            Vec::new()
        };
        let base = self.doc.as_ref().map(Doc::to_doc).unwrap_or_default();
        let doc = guarded("applying a batch of changes", move || {
            let mut doc = base;
            doc.apply_changes(batch).map(|()| doc)
        })??;
        if let Some(h) = hashes.iter().find(|h| !has_change(&doc, h)) {
            return Err(CrdtError::InvalidChange(format!("{h} was not applied")));
        }
        verify_faithful(&doc, &hashes)?;
        self.doc = Some(Doc::live(doc));
        self.shadow_after(fresh, raw.iter().map(Vec::as_slice));
        Ok(())
    }

    /// Apply every queued change that has become ready, discard those that
    /// depend on dead history, until nothing moves. Ready changes are
    /// applied as one batch; if the batch fails, one by one, so that a bad
    /// change is discarded alone.
    fn drain_pending(&mut self) {
        loop {
            let mut progressed = false;
            // Drop what is dead or already applied.
            let hashes: Vec<ChangeHash> = self.pending.keys().copied().collect();
            for hash in &hashes {
                let Some(change) = self.pending.get(hash) else {
                    continue;
                };
                if change.deps().iter().any(|d| self.dead.contains(d)) {
                    self.pending.remove(hash);
                    self.dead.insert(*hash);
                    progressed = true;
                } else if self.doc().is_some_and(|d| has_change(d, hash)) {
                    self.pending.remove(hash);
                    progressed = true;
                }
            }
            // Everything ready, in causal order: ready against the document
            // or against changes chosen before it.
            let mut chosen: Vec<ChangeHash> = Vec::new();
            let mut chosen_set: BTreeSet<ChangeHash> = BTreeSet::new();
            loop {
                let before = chosen.len();
                for (hash, change) in &self.pending {
                    if chosen_set.contains(hash) {
                        continue;
                    }
                    let ready = change.deps().iter().all(|d| {
                        chosen_set.contains(d) || self.doc().is_some_and(|doc| has_change(doc, d))
                    });
                    if ready {
                        chosen.push(*hash);
                        chosen_set.insert(*hash);
                    }
                }
                if chosen.len() == before {
                    break;
                }
            }
            if !chosen.is_empty() {
                progressed = true;
                let batch: Vec<Change> = chosen
                    .iter()
                    .filter_map(|h| self.pending.remove(h))
                    .collect();
                let single = batch.len() == 1;
                if let Err(error) = self.apply_batch(batch.clone()) {
                    if single {
                        for c in batch {
                            let hash = c.hash();
                            tracing::warn!(%hash, %error, "queued change could not be applied; discarded");
                            self.dead.insert(hash);
                        }
                    } else {
                        // Retry one at a time; what stays unready is queued again.
                        for c in batch {
                            let hash = c.hash();
                            if !self.is_ready(&c) {
                                self.pending.insert(hash, c);
                            } else if let Err(error) = self.apply_ready(c) {
                                tracing::warn!(%hash, %error, "queued change could not be applied; discarded");
                                self.dead.insert(hash);
                            }
                        }
                    }
                }
            }
            if !progressed {
                break;
            }
        }
    }

    /// Route a batch of changes for this object. Unknown changes are queued
    /// and the queue drained once, so ready changes go to automerge together.
    fn ingest_batch(&mut self, changes: Vec<Change>) -> Vec<Applied> {
        self.flush();
        // A rebase root cuts the batch: what comes before it is applied
        // (and then superseded) before the root replaces the document.
        let mut out = Vec::with_capacity(changes.len());
        let mut run = Vec::new();
        for change in changes {
            if is_rebase_root(&change) && self.knows(&change.hash()).is_none() {
                out.extend(self.ingest_run(std::mem::take(&mut run)));
                out.push(match self.rebase_to(change) {
                    Ok(()) => Applied::New,
                    Err(error) => {
                        tracing::warn!(%error, "rebase root could not be applied; discarded");
                        Applied::Discarded
                    }
                });
            } else {
                run.push(change);
            }
        }
        out.extend(self.ingest_run(run));
        out
    }

    /// [`Self::ingest_batch`] for changes that hold no rebase root.
    fn ingest_run(&mut self, changes: Vec<Change>) -> Vec<Applied> {
        let mut out = Vec::with_capacity(changes.len());
        let mut fresh = Vec::new();
        for change in changes {
            let hash = change.hash();
            if let Some(known) = self.knows(&hash) {
                out.push(Some(known));
            } else if change.deps().iter().any(|d| self.dead.contains(d)) {
                self.dead.insert(hash);
                out.push(Some(Applied::Discarded));
            } else {
                self.pending.insert(hash, change);
                fresh.push((out.len(), hash));
                out.push(None);
            }
        }
        self.drain_pending();
        for (i, hash) in fresh {
            if let Some(slot) = out.get_mut(i) {
                *slot = Some(match self.knows(&hash) {
                    Some(Applied::Duplicate) => Applied::New,
                    Some(other) => other,
                    None => Applied::Discarded,
                });
            }
        }
        out.into_iter()
            .map(|a| a.unwrap_or(Applied::Discarded))
            .collect()
    }

    /// Merge a whole loaded document: its changes that are new to us, minus
    /// dead history, are applied as one batch.
    /// `raw`: the bytes of the document's chunk.
    fn merge_doc(&mut self, loaded: Automerge, raw: &[u8]) -> Result<(), CrdtError> {
        if loaded.get_heads().is_empty() {
            return Ok(());
        }
        self.flush();
        let merged = self.merge_doc_flushed(loaded);
        // The shadow is read again from the merged document now, while
        // loading, rather than on the first change that needs it.
        self.fast = None;
        self.no_fast = false;
        self.shadow_mut();
        // A document adopted as it was loaded, whose shadow the fast path
        // folds on: held as the bytes it came from until it is needed.
        if matches!(merged, Ok(true)) && self.fast.is_some() && self.tail.is_empty() {
            self.doc = Some(Doc::saved(raw));
        }
        merged.map(|_| ())
    }

    /// `true` if the document is now the loaded one, as it was loaded.
    fn merge_doc_flushed(&mut self, loaded: Automerge) -> Result<bool, CrdtError> {
        // A document that starts from a rebase root this replica has not
        // met replaces what it holds (its root first, then the rest).
        let root = loaded.get_changes_meta(&[]).into_iter().find(|m| {
            m.deps.is_empty()
                && m.message
                    .as_deref()
                    .is_some_and(|t| t.starts_with(REBASE_MESSAGE))
        });
        if let Some(root) = root
            && self.knows(&root.hash).is_none()
            && let Some(change) = loaded.get_change_by_hash(&root.hash)
        {
            self.rebase_to(change)?;
        }
        if self.doc.is_none() && self.dead.is_empty() {
            // Fast path: adopt the loaded document as is.
            let whole = self.pending.is_empty();
            self.doc = Some(Doc::live(loaded));
            self.drain_pending();
            return Ok(whole);
        }
        let mut batch: Vec<Change> = guarded("reading loaded changes", || loaded.get_changes(&[]))?
            .into_iter()
            .filter(|c| {
                let h = c.hash();
                !self.dead.contains(&h) && !self.doc().is_some_and(|d| has_change(d, &h))
            })
            .collect();
        // Anything depending (transitively) on dead history is dead too.
        loop {
            let before = batch.len();
            let dead = &mut self.dead;
            batch.retain(|c| {
                if c.deps().iter().any(|d| dead.contains(d)) {
                    dead.insert(c.hash());
                    false
                } else {
                    true
                }
            });
            if batch.len() == before {
                break;
            }
        }
        if batch.is_empty() {
            return Ok(false);
        }
        let hashes: Vec<ChangeHash> = batch.iter().map(Change::hash).collect();
        let base = self.doc.as_ref().map(Doc::to_doc).unwrap_or_default();
        let doc = guarded("merging a loaded document", move || {
            let mut doc = base;
            doc.apply_changes(batch).map(|()| doc)
        })??;
        if !hashes.iter().all(|h| has_change(&doc, h)) {
            return Err(CrdtError::MalformedSnapshot(
                "snapshot changes depend on history this store does not have".into(),
            ));
        }
        self.doc = Some(Doc::live(doc));
        self.drain_pending();
        Ok(false)
    }
}

/// Most changes one object holds waiting for their dependencies.
pub const MAX_QUEUED_PER_OBJECT: usize = 256;

/// All objects this replica knows, keyed by object key.
#[derive(Debug, Clone, Default)]
pub struct ObjectStore {
    entries: BTreeMap<String, Entry>,
}

impl ObjectStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// Apply one change (the bytes of one automerge change, as produced by
    /// the `edit_*` methods) to the object's document. Idempotent.
    ///
    /// A change whose dependencies are missing is held, at most
    /// [`MAX_QUEUED_PER_OBJECT`] per object: beyond that it is dropped with
    /// [`CrdtError::TooManyQueued`] (whoever sent it must send it again).
    pub fn apply_change(&mut self, key: &str, change: &[u8]) -> Result<Applied, CrdtError> {
        if let Some(entry) = self.entries.get_mut(key)
            && entry.try_fast(change)
        {
            return Ok(Applied::New);
        }
        let change = parse_change(change)?;
        let hash = change.hash();
        let entry = self.entry_mut(key);
        let applied = entry.ingest(change)?;
        if applied == Applied::Queued && entry.pending.len() > MAX_QUEUED_PER_OBJECT {
            entry.pending.remove(&hash);
            return Err(CrdtError::TooManyQueued {
                key: key.to_owned(),
                max: MAX_QUEUED_PER_OBJECT,
            });
        }
        Ok(applied)
    }

    /// What the document of `key` would look like after `changes` (applied
    /// in order to a copy; the store is not changed): `None` if the object
    /// would not exist. Changes that would wait for dependencies do not
    /// count; an error means a change would be refused.
    pub fn preview<'a>(
        &self,
        key: &str,
        changes: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<Option<Value>, CrdtError> {
        let changes: Vec<&[u8]> = changes.into_iter().collect();
        let current = self.entries.get(key);
        // Fast: fold them into a copy of the shadow alone.
        if let Some(e) = current
            && e.doc.is_some()
            && e.pending.is_empty()
            && let Some(fast) = &e.fast
        {
            let mut fast = fast.clone();
            let mut folded: Vec<[u8; 32]> = Vec::new();
            let all = changes.iter().all(|bytes| {
                columnar::decode(bytes).is_some_and(|c| {
                    let known = |h: &[u8; 32]| {
                        folded.contains(h) || holds(e.doc.as_ref(), &e.tail, &ChangeHash(*h))
                    };
                    let ok = !e.dead.contains(&ChangeHash(c.hash)) && fast.fold_next(&c, known);
                    if ok {
                        folded.push(c.hash);
                    }
                    ok
                })
            });
            if all {
                return Ok(Some(fast.render()));
            }
        }
        let mut entry = current.cloned().unwrap_or_default();
        for bytes in changes {
            if !entry.try_fast(bytes) {
                entry.ingest(parse_change(bytes)?)?;
            }
        }
        Ok(entry.view())
    }

    /// Apply several changes to one object's document at once, with one
    /// automerge call for all that are causally ready (much cheaper than
    /// one call each). Same outcome as [`Self::apply_change`] for each; a
    /// change that cannot be parsed or applied is reported and discarded
    /// without affecting the others.
    pub fn apply_changes<'a>(
        &mut self,
        key: &str,
        changes: impl IntoIterator<Item = &'a [u8]>,
    ) -> Vec<Result<Applied, CrdtError>> {
        let mut out = Vec::new();
        self.apply_changes_into(key, changes, &mut out);
        out
    }

    /// [`Self::apply_changes`], its results written into `out` (emptied
    /// first): a caller applying many objects' runs reuses one vector.
    pub(crate) fn apply_changes_into<'a>(
        &mut self,
        key: &str,
        changes: impl IntoIterator<Item = &'a [u8]>,
        out: &mut Vec<Result<Applied, CrdtError>>,
    ) {
        out.clear();
        let mut parsed = Vec::new();
        let mut fast = self.entries.get_mut(key);
        for bytes in changes {
            // The fast path while it lasts; once a change leaves it, the
            // rest go to automerge with it (in order).
            if parsed.is_empty()
                && let Some(entry) = fast.as_deref_mut()
                && entry.try_fast(bytes)
            {
                out.push(Ok(Applied::New));
                continue;
            }
            fast = None;
            match parse_change(bytes) {
                Ok(c) => {
                    parsed.push((out.len(), c));
                    out.push(Ok(Applied::Discarded));
                }
                Err(e) => out.push(Err(e)),
            }
        }
        if parsed.is_empty() {
            return;
        }
        let slots: Vec<(usize, ChangeHash)> = parsed.iter().map(|(i, c)| (*i, c.hash())).collect();
        let entry = self.entry_mut(key);
        let results = entry.ingest_batch(parsed.into_iter().map(|(_, c)| c).collect());
        // The same bound on waiting changes as one call per change: past
        // it, the latest of the batch are dropped.
        for ((slot, hash), r) in slots.into_iter().zip(results).rev() {
            let r = if r == Applied::Queued && entry.pending.len() > MAX_QUEUED_PER_OBJECT {
                entry.pending.remove(&hash);
                Err(CrdtError::TooManyQueued {
                    key: key.to_owned(),
                    max: MAX_QUEUED_PER_OBJECT,
                })
            } else {
                Ok(r)
            };
            if let Some(o) = out.get_mut(slot) {
                *o = r;
            }
        }
    }

    /// The object was deleted: drop its document and remember its history as
    /// dead, so that stragglers depending on it cannot resurrect it. Queued
    /// changes that depend on it are discarded. A later change with no
    /// dependencies re-creates the object from scratch.
    pub fn apply_tombstone(&mut self, key: &str) {
        let Some(entry) = self.entries.get_mut(key) else {
            return;
        };
        if let Some(doc) = entry.doc.take().map(Doc::into_doc) {
            entry
                .dead
                .extend(doc.get_changes_meta(&[]).into_iter().map(|m| m.hash));
        }
        let tail = std::mem::take(&mut entry.tail);
        entry.dead.extend(tail.into_iter().map(|(h, _)| h));
        entry.fast = None;
        entry.no_fast = false;
        entry.drain_pending();
    }

    /// Forgets deleted objects: an object without a document at this call
    /// and at the one before is dropped with its dead history and whatever
    /// waits in its queue. Call it at each log compaction, so that a
    /// deleted object's memory lasts one to two compaction intervals
    /// instead of for ever. That is what a restart from a snapshot past
    /// the tombstone forgets as well (the fold keeps no tombstone
    /// memory); a straggler that arrives later depends on the forgotten
    /// history, so it only waits in the queue until the next call. Returns
    /// how many objects were forgotten.
    pub fn forget_deleted(&mut self) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| {
            if e.doc.is_some() {
                e.gone_at_sweep = false;
                return true;
            }
            let keep = !e.gone_at_sweep;
            e.gone_at_sweep = true;
            keep
        });
        before - self.entries.len()
    }

    /// The object as JSON (an object, keys sorted), or `None` if it does not
    /// exist.
    pub fn get_json(&self, key: &str) -> Option<Value> {
        self.entries.get(key)?.view()
    }

    /// Keys of the objects that exist, in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.entries
            .iter()
            .filter(|(_, e)| e.doc.is_some())
            .map(|(k, _)| k.as_str())
    }

    /// Whether the object exists.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.get(key).is_some_and(|e| e.doc.is_some())
    }

    /// The bytes of every change in the object's document, in causal
    /// order (what a replica that has never seen the object needs).
    pub fn changes(&self, key: &str) -> Vec<Vec<u8>> {
        let Some(entry) = self.entries.get(key) else {
            return Vec::new();
        };
        let Some(doc) = entry.doc() else {
            return Vec::new();
        };
        doc.get_changes(&[])
            .into_iter()
            .map(|c| c.raw_bytes().to_vec())
            .chain(entry.tail.iter().map(|(_, b)| b.clone()))
            .collect()
    }

    /// Number of applied changes of `key` that the fold's fast path holds
    /// and automerge's document does not yet (see [`shadow`]): they are
    /// handed over together when the document is needed.
    pub fn fast_tail(&self, key: &str) -> usize {
        self.entries.get(key).map_or(0, |e| e.tail.len())
    }

    /// Hands the fast path's tail of `key` to automerge now (see
    /// [`shadow`]), as any edit, rebase or concurrent change would first.
    pub fn settle(&mut self, key: &str) {
        if let Some(e) = self.entries.get_mut(key) {
            e.flush();
        }
    }

    /// Number of changes for `key` waiting for their dependencies.
    pub fn queued(&self, key: &str) -> usize {
        self.entries.get(key).map_or(0, |e| e.pending.len())
    }

    /// Hashes of the current heads of the object's document, sorted (empty if
    /// it does not exist). Equal heads mean equal change sets.
    pub fn heads(&self, key: &str) -> Vec<[u8; 32]> {
        let Some(entry) = self.entries.get(key).filter(|e| e.doc.is_some()) else {
            return Vec::new();
        };
        if let Some(fast) = &entry.fast {
            return fast.heads().to_vec();
        }
        let mut heads: Vec<[u8; 32]> = entry
            .doc()
            .map(|d| d.get_heads().into_iter().map(|h| h.0).collect())
            .unwrap_or_default();
        heads.sort_unstable();
        heads
    }

    /// The writer `actor` replaces the whole object with `value` (a JSON
    /// object). Emits a minimal change — only fields that differ are written,
    /// so a concurrent edit to other fields by another writer survives the
    /// merge — applies it locally and returns its bytes; `None` when nothing
    /// changed. Lists are diffed element-wise over the common prefix
    /// (recursing into objects), then the tail is deleted or appended.
    ///
    /// Creating an object (the key does not exist) always emits a change, even
    /// for `{}`, so that the object comes into existence on every replica.
    ///
    /// "Whole object" means whole: a field owned by the other writer that
    /// differs from this replica's current value is overwritten too (e.g. a
    /// stale `status` in the cloud's value reverts the edge's newer one). A
    /// writer that only owns some fields should build `value` from
    /// [`Self::get_json`] or use [`Self::edit_merge_patch`].
    pub fn edit_replace(
        &mut self,
        key: &str,
        actor: &ActorId,
        value: &Value,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        let Value::Object(new) = value else {
            return Err(CrdtError::NotAnObject(kind_name(value)));
        };
        json::check_depth(value)?;
        self.edit(key, *actor, new)
    }

    /// RFC 7386 JSON merge patch (`null` deletes a field) applied by `actor`;
    /// emits a minimal change as [`Self::edit_replace`] does. Arrays in the
    /// patch replace the whole array (per RFC 7386), diffed element-wise.
    pub fn edit_merge_patch(
        &mut self,
        key: &str,
        actor: &ActorId,
        patch: &Value,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        if !patch.is_object() {
            return Err(CrdtError::NotAnObject(kind_name(patch)));
        }
        json::check_depth(patch)?;
        let mut target = self
            .get_json(key)
            .unwrap_or_else(|| Value::Object(serde_json::Map::new()));
        json::merge_patch(&mut target, patch);
        // The patch can graft a deep subtree below an existing deep one.
        json::check_depth(&target)?;
        let Value::Object(new) = &target else {
            return Err(CrdtError::NotAnObject(kind_name(&target)));
        };
        self.edit(key, *actor, new)
    }

    fn edit(
        &mut self,
        key: &str,
        actor: ActorId,
        new: &serde_json::Map<String, Value>,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        let am_actor = actor.to_automerge();
        let entry = self.entry_mut(key);
        entry.flush();
        if entry.pending.values().any(|c| *c.actor_id() == am_actor) {
            return Err(CrdtError::PendingOwnChanges {
                key: key.to_owned(),
                actor,
            });
        }
        let Some(doc) = entry.doc.as_mut().map(Doc::get_mut) else {
            return create(entry, key, am_actor, new).map(Some);
        };
        doc.set_actor(am_actor);
        let mut tx = doc.transaction();
        if let Err(e) = json::sync_map(&mut tx, &ROOT, new, 0) {
            tx.rollback();
            return Err(e);
        }
        let (hash, _) = tx.commit();
        match hash {
            None => Ok(None),
            Some(hash) => {
                let bytes = change_bytes(doc, &hash)?;
                entry.fold_into_shadow([bytes.as_slice()]);
                Ok(Some(bytes))
            }
        }
    }

    /// Replaces the object's document with a rebase root written by `actor`
    /// that holds its current value, dropping its history (see the module
    /// documentation), and returns the root's bytes, to be recorded and
    /// sent like any change. `None` if the object does not exist or its
    /// history is already a single change.
    pub fn rebase(&mut self, key: &str, actor: &ActorId) -> Result<Option<Vec<u8>>, CrdtError> {
        let Some(entry) = self.entries.get_mut(key) else {
            return Ok(None);
        };
        entry.flush();
        let Some(doc) = entry.doc() else {
            return Ok(None);
        };
        let history = doc.get_changes_meta(&[]);
        if history.len() <= 1 {
            return Ok(None);
        }
        let Value::Object(value) = json::read_root(doc) else {
            return Ok(None);
        };
        // Named after the history it replaces: two rebases never make the
        // same root, even of the same value.
        let mut heads: Vec<ChangeHash> = doc.get_heads();
        heads.sort_unstable();
        let mut hasher = blake3::Hasher::new();
        for h in &heads {
            hasher.update(&h.0);
        }
        let tag = hasher.finalize().to_hex();
        let message = format!(
            "{REBASE_MESSAGE} of {} changes, heads {}",
            history.len(),
            &tag[..16]
        );
        let options = || {
            CommitOptions::default()
                .with_message(message.clone())
                .with_time(0)
        };
        let (base, hash) = single_change_doc(actor.to_automerge(), &value, options)?;
        let bytes = change_bytes(&base, &hash)?;
        entry.rebase_to(parse_change(&bytes)?)?;
        entry.diverged = None;
        Ok(Some(bytes))
    }

    /// How many changes the object's document holds (0 if it does not
    /// exist): what decides whether a rebase is worth it.
    pub fn history_len(&self, key: &str) -> usize {
        self.entries.get(key).map_or(0, |e| {
            e.doc()
                .map_or(0, |d| d.get_changes_meta(&[]).len() + e.tail.len())
        })
    }

    /// The object's op counter (0 if it does not exist): cheap, and never
    /// less than the number of changes its document holds.
    pub fn op_count(&self, key: &str) -> u64 {
        if let Some(fast) = self
            .entries
            .get(key)
            .filter(|e| e.doc.is_some())
            .and_then(|e| e.fast.as_ref())
        {
            return fast.max_op();
        }
        self.entries.get(key).and_then(Entry::doc).map_or(0, |d| {
            d.get_heads()
                .iter()
                .filter_map(|h| d.get_change_by_hash(h))
                .map(|c| c.max_op())
                .max()
                .unwrap_or(0)
        })
    }

    /// Whether the object's live document holds the change with `hash`.
    pub fn has_change(&self, key: &str, hash: &[u8; 32]) -> bool {
        let hash = ChangeHash(*hash);
        self.entries
            .get(key)
            .is_some_and(|e| holds(e.doc.as_ref(), &e.tail, &hash))
    }

    /// After a rebase root replaced the object's document: what this
    /// replica held beyond the root (the fields where the two differed),
    /// re-asserted by `actor` as a change on top of the document as it is
    /// now — the root and whatever came after it (applied here; returns its
    /// bytes to be sent). `None` when nothing diverged. Called by the writer
    /// whose changes the root may not include (an edge, for the status it
    /// wrote).
    pub fn take_diverged(
        &mut self,
        key: &str,
        actor: &ActorId,
    ) -> Result<Option<Vec<u8>>, CrdtError> {
        let Some(patch) = self.entries.get_mut(key).and_then(|e| e.diverged.take()) else {
            return Ok(None);
        };
        if !self.contains(key) {
            return Ok(None);
        }
        self.edit_merge_patch(key, actor, &patch)
    }

    /// Forgets what any rebase left diverged, without re-asserting it (a
    /// replica that does not write, or one rebuilding from its own log,
    /// where its re-assertions are recorded already).
    pub fn clear_diverged(&mut self) {
        for e in self.entries.values_mut() {
            e.diverged = None;
        }
    }

    /// Drops every change still waiting for dependencies, as dead history:
    /// for a replica that has read all it will ever get of the history they
    /// wait for (an edge after loading its own log).
    pub fn drop_pending(&mut self) -> usize {
        let mut dropped = 0;
        for e in self.entries.values_mut() {
            dropped += e.pending.len();
            let pending = std::mem::take(&mut e.pending);
            e.dead.extend(pending.into_keys());
        }
        dropped
    }

    /// The object's whole state for log compaction or snapshot transfer:
    /// automerge's saved document, followed by any changes still queued for
    /// it (as automerge does with orphans). `None` if the object does not
    /// exist.
    pub fn save(&self, key: &str) -> Option<Vec<u8>> {
        let entry = self.entries.get(key)?;
        let mut bytes = entry.doc.as_ref()?.save();
        for (_, change) in &entry.tail {
            bytes.extend_from_slice(change);
        }
        for change in entry.pending.values() {
            bytes.extend_from_slice(change.raw_bytes());
        }
        Some(bytes)
    }

    /// Merge saved state (from [`Self::save`], [`fold_change`], or a plain
    /// concatenation of change bytes) into the object's document, creating it
    /// if needed. Duplicates, queueing and dead history are handled exactly as
    /// in [`Self::apply_change`]. The bytes are fully parsed before anything
    /// is applied, so malformed bytes leave the store unchanged; each
    /// document chunk and each change is then applied atomically.
    pub fn load(&mut self, key: &str, bytes: &[u8]) -> Result<(), CrdtError> {
        let chunks = parse_state(bytes)?;
        let entry = self.entry_mut(key);
        for chunk in chunks {
            match chunk {
                Chunk::Document(doc, raw) => entry.merge_doc(*doc, raw)?,
                Chunk::Change(change) => {
                    entry.ingest(*change)?;
                }
            }
        }
        Ok(())
    }

    fn entry_mut(&mut self, key: &str) -> &mut Entry {
        self.entries.entry(key.to_owned()).or_default()
    }
}

/// Create a new incarnation of an object: a fresh document whose first
/// change has no dependencies. If that change happens to be identical to one
/// in the dead history (same actor re-creating the same content after a
/// delete), a commit message makes it distinct.
fn create(
    entry: &mut Entry,
    key: &str,
    actor: automerge::ActorId,
    new: &serde_json::Map<String, Value>,
) -> Result<Vec<u8>, CrdtError> {
    const ATTEMPTS: u32 = 16;
    for attempt in 0..ATTEMPTS {
        let options = || {
            let o = CommitOptions::default();
            if attempt == 0 {
                o
            } else {
                o.with_message(format!("keel: re-creation {attempt}"))
            }
        };
        let (doc, hash) = single_change_doc(actor.clone(), new, options)?;
        if entry.dead.contains(&hash) {
            continue;
        }
        let bytes = change_bytes(&doc, &hash)?;
        entry.doc = Some(Doc::live(doc));
        entry.fast = fresh_shadow([bytes.as_slice()]);
        entry.no_fast = false;
        entry.drain_pending();
        return Ok(bytes);
    }
    Err(CrdtError::Recreate(key.to_owned()))
}

/// The shadow of a document made by `changes` alone (its first changes,
/// in causal order): `None` if it cannot represent them.
fn fresh_shadow<'a>(changes: impl IntoIterator<Item = &'a [u8]>) -> Option<Shadow> {
    let mut fast = Shadow::new();
    let all = changes
        .into_iter()
        .all(|bytes| columnar::decode(bytes).is_some_and(|c| fast.fold_applied(&c)));
    fast.keep_room();
    all.then_some(fast)
}

/// A fresh document whose one change, by `actor`, writes `value`
/// (committed with `options`; `{}` still makes an empty change).
fn single_change_doc(
    actor: automerge::ActorId,
    value: &serde_json::Map<String, Value>,
    options: impl Fn() -> CommitOptions,
) -> Result<(Automerge, ChangeHash), CrdtError> {
    let mut doc = Automerge::new().with_actor(actor);
    let mut tx = doc.transaction();
    if let Err(e) = json::sync_map(&mut tx, &ROOT, value, 0) {
        tx.rollback();
        return Err(e);
    }
    let hash = match tx.commit_with(options()).0 {
        Some(h) => h,
        None => doc.empty_commit(options()),
    };
    Ok((doc, hash))
}

fn change_bytes(doc: &Automerge, hash: &ChangeHash) -> Result<Vec<u8>, CrdtError> {
    doc.get_change_by_hash(hash)
        .map(|c| c.raw_bytes().to_vec())
        .ok_or(CrdtError::Automerge(
            automerge::AutomergeError::MissingHash(*hash),
        ))
}

fn kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A folder for log compaction: saved state + one change -> new saved state.
///
/// `state` is what a previous `fold_change` returned, what
/// [`ObjectStore::save`] returned, or a concatenation of change bytes;
/// `None` starts from an empty document. A change whose dependencies are
/// missing is kept in the state (as an automerge orphan) and applied when a
/// later fold supplies them. Folding a change twice is a no-op. The folder
/// keeps no tombstone memory: on a tombstone the compactor drops the state,
/// and must not fold older records of the same object afterwards.
pub fn fold_change(state: Option<&[u8]>, change: &[u8]) -> Result<Vec<u8>, CrdtError> {
    let change = parse_change(change)?;
    let mut doc = match state {
        None => Automerge::new(),
        Some(bytes) => load_for_fold(bytes)?,
    };
    if is_rebase_root(&change) && !has_change(&doc, &change.hash()) {
        // The root replaces the state; it is checked as when applied.
        let mut entry = Entry::default();
        entry.rebase_to(change)?;
        return entry.doc().map_or(Ok(Vec::new()), |d| {
            guarded("saving a rebased document", || d.save())
        });
    }
    if change.deps().iter().all(|d| has_change(&doc, d)) {
        check_change(Some(&doc), &change)?;
    } else {
        check_alone(&change)?;
    }
    let before = doc.get_heads();
    let doc = guarded("folding a change", move || {
        doc.apply_changes([change])?;
        Ok::<_, CrdtError>(doc)
    })??;
    // Everything this fold applied (the change, and queued ones it unblocked).
    let applied: Vec<ChangeHash> = doc
        .get_changes_meta(&before)
        .into_iter()
        .map(|m| m.hash)
        .collect();
    verify_faithful(&doc, &applied)?;
    guarded("saving a folded document", || doc.save())
}

/// The object held in saved state (as [`ObjectStore::save`] and
/// [`fold_change`] make it) as automerge alone renders it, without the
/// fold's fast path: for checking the fast path against automerge.
pub fn render_saved(bytes: &[u8]) -> Result<Option<Value>, CrdtError> {
    let doc = load_for_fold(bytes)?;
    Ok((!doc.get_heads().is_empty()).then(|| json::read_root(&doc)))
}

/// One change of saved state: its hash and its bytes.
pub type HashedChange = ([u8; 32], Vec<u8>);

/// The changes in saved state (a document's history, then loose changes),
/// each with its hash and bytes.
pub fn state_changes(bytes: &[u8]) -> Result<Vec<HashedChange>, CrdtError> {
    let mut out = Vec::new();
    for chunk in parse_state(bytes)? {
        match chunk {
            Chunk::Document(doc, _) => {
                let changes = guarded("reading a saved document", || doc.get_changes(&[]))?;
                out.extend(
                    changes
                        .into_iter()
                        .map(|c| (c.hash().0, c.raw_bytes().to_vec())),
                );
            }
            Chunk::Change(c) => out.push((c.hash().0, c.raw_bytes().to_vec())),
        }
    }
    Ok(out)
}

/// Load saved state into one automerge document, keeping orphans queued.
fn load_for_fold(bytes: &[u8]) -> Result<Automerge, CrdtError> {
    let mut doc: Option<Automerge> = None;
    let mut changes = Vec::new();
    for chunk in parse_state(bytes)? {
        match chunk {
            Chunk::Document(loaded, _) => match doc.as_mut() {
                None => doc = Some(*loaded),
                Some(d) => {
                    let mut loaded = *loaded;
                    guarded("merging document chunks", || d.merge(&mut loaded))??;
                }
            },
            Chunk::Change(c) => changes.push(*c),
        }
    }
    let mut doc = doc.unwrap_or_default();
    guarded("loading changes", move || {
        doc.apply_changes(changes)?;
        Ok::<_, CrdtError>(doc)
    })?
}
