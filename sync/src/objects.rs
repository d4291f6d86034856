//! Folding log records into the CRDT object store — the one place that
//! says what a record means to an object, shared by live apply, snapshot
//! install, recovery and log compaction.

use keel_log::{FoldError, ObjectSnapshot, PayloadKind, Record};

use crate::crdt::{Applied, CrdtError, ObjectStore, fold_change};

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
                let run = runs.remove(r.key.as_str()).unwrap_or_default();
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
