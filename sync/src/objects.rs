//! Folding log records into the CRDT object store — the one place that
//! says what a record means to an object, shared by live apply, snapshot
//! install, recovery and log compaction.

use keel_log::{FoldError, ObjectSnapshot, PayloadKind, Record};

use crate::crdt::{Applied, CrdtError, ObjectStore, change_hash, fold_change, state_changes};

/// Compaction folder for object streams: an object's snapshot state is its
/// saved automerge document. A tombstone is kept as an empty state, so that
/// a peer installing the snapshot deletes its copy too; events (telemetry)
/// do not change object state.
#[derive(Debug, Default, Clone, Copy)]
pub struct CrdtFold;

impl keel_log::Fold for CrdtFold {
    fn fold(
        &self,
        _key: &str,
        state: Option<&[u8]>,
        record: &Record,
    ) -> Result<Option<Vec<u8>>, FoldError> {
        let state = state.filter(|s| !s.is_empty());
        Ok(match record.kind {
            PayloadKind::Tombstone => Some(Vec::new()),
            PayloadKind::Event => state.map(<[u8]>::to_vec),
            PayloadKind::Change => Some(fold_change(state, &record.payload)?),
        })
    }
}

/// Compaction folder for a stream whose changes the replica's live
/// documents hold (a node's `up` stream, which only carries that node's
/// changes, built on the cloud's): an object's state is the concatenation
/// of its changes that `live(key, hash)` says the live document still
/// holds. A change a rebase root replaced, or of a deleted object, is
/// dropped, from the record folded and from the state folded before, so
/// the state holds no more history than the document itself. Tombstones
/// and events fold as in [`CrdtFold`].
#[derive(Debug, Clone, Copy)]
pub struct LiveFold<F>(pub F);

impl<F: Fn(&str, &[u8; 32]) -> bool> keel_log::Fold for LiveFold<F> {
    fn fold(
        &self,
        key: &str,
        state: Option<&[u8]>,
        record: &Record,
    ) -> Result<Option<Vec<u8>>, FoldError> {
        if record.kind != PayloadKind::Change {
            return CrdtFold.fold(key, state, record);
        }
        let mut out = Vec::new();
        let hash = change_hash(&record.payload)?;
        let mut folded_before = false;
        if let Some(state) = state.filter(|s| !s.is_empty()) {
            for (h, bytes) in state_changes(state)? {
                if (self.0)(key, &h) {
                    folded_before |= h == hash;
                    out.extend_from_slice(&bytes);
                }
            }
        }
        if !folded_before && (self.0)(key, &hash) {
            out.extend_from_slice(&record.payload);
        }
        Ok((!out.is_empty()).then_some(out))
    }
}

/// Applies one record to the store. Events leave objects alone.
pub fn apply_record(
    store: &mut ObjectStore,
    record: &Record,
) -> Result<Option<Applied>, CrdtError> {
    match record.kind {
        PayloadKind::Change => store.apply_change(&record.key, &record.payload).map(Some),
        PayloadKind::Tombstone => {
            store.apply_tombstone(&record.key);
            Ok(None)
        }
        PayloadKind::Event => Ok(None),
    }
}

/// Applies one object of a snapshot (see [`CrdtFold`]) to the store.
pub fn apply_snapshot_object(
    store: &mut ObjectStore,
    object: &ObjectSnapshot,
) -> Result<(), CrdtError> {
    if object.state.is_empty() {
        store.apply_tombstone(&object.key);
        Ok(())
    } else {
        store.load(&object.key, &object.state)
    }
}

/// Applies a run of records to the store, giving each object's changes to
/// automerge together (see [`ObjectStore::apply_changes`]); per-object order
/// is kept, so a tombstone still cuts the changes before it from those
/// after. Returns the first error; the other records are applied anyway.
pub fn apply_records(store: &mut ObjectStore, records: &[Record]) -> Result<(), CrdtError> {
    if records.iter().all(|r| r.kind != PayloadKind::Tombstone) {
        return apply_changes_only(store, records);
    }
    let mut runs: std::collections::BTreeMap<&str, Vec<&[u8]>> = Default::default();
    let mut first_error = None;
    let mut flush = |store: &mut ObjectStore, key: &str, run: Vec<&[u8]>| {
        if run.is_empty() {
            return;
        }
        for r in store.apply_changes(key, run) {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
    };
    for r in records {
        match r.kind {
            PayloadKind::Change => runs.entry(&r.key).or_default().push(&r.payload),
            PayloadKind::Tombstone => {
                let run = runs.remove(&*r.key).unwrap_or_default();
                flush(store, &r.key, run);
                store.apply_tombstone(&r.key);
            }
            PayloadKind::Event => {}
        }
    }
    for (key, run) in std::mem::take(&mut runs) {
        flush(store, key, run);
    }
    first_error.map_or(Ok(()), Err)
}

/// [`apply_records`] for records without a tombstone (a segment's usual
/// case): each object's changes in one run, the objects in key order, as
/// there; grouped by a stable sort of one vector rather than a map of one
/// vector per object.
fn apply_changes_only(store: &mut ObjectStore, records: &[Record]) -> Result<(), CrdtError> {
    let mut changes: Vec<(&str, &[u8])> = records
        .iter()
        .filter(|r| r.kind == PayloadKind::Change)
        .map(|r| (&*r.key, &*r.payload))
        .collect();
    changes.sort_by(|a, b| a.0.cmp(b.0));
    let mut first_error = None;
    let mut results = Vec::new();
    for run in changes.chunk_by(|a, b| a.0 == b.0) {
        let Some(&(key, _)) = run.first() else {
            continue;
        };
        store.apply_changes_into(key, run.iter().map(|(_, bytes)| *bytes), &mut results);
        for r in results.drain(..) {
            if let Err(e) = r {
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
