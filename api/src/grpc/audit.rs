//! Audit: every change to one object, oldest first, each shown as the JSON
//! Patch it made to the object (the object folded from the log exactly as
//! cloudcore and edgecore fold it).
//!
//! The log has no index by object, so an audit scans its streams from the
//! compaction horizon; below it the object exists only as snapshot state,
//! which becomes the base of the first change shown (and is reported).

use keel_log::{PayloadKind, Read, ReadLimits, Record, Store};
use keel_proto::{AuditEntry, AuditResponse, Compacted, OriginKind};
use keel_sync::crdt::{Applied, ObjectStore};
use serde_json::Value;
use tonic::Status;

use super::{hlc_millis, log_status};

/// The kind of author an origin names.
pub fn origin_kind(origin: &str) -> OriginKind {
    if origin.starts_with("user:") {
        OriginKind::User
    } else if origin == crate::meta::CLOUDCORE_ORIGIN {
        OriginKind::Cloudcore
    } else {
        OriginKind::Node
    }
}

fn kind_proto(k: PayloadKind) -> keel_proto::PayloadKind {
    match k {
        PayloadKind::Change => keel_proto::PayloadKind::Change,
        PayloadKind::Tombstone => keel_proto::PayloadKind::Tombstone,
        PayloadKind::Event => keel_proto::PayloadKind::Event,
    }
}

fn json_text(v: Option<&Value>) -> String {
    v.map(Value::to_string).unwrap_or_default()
}

/// The audit of `key` over `streams` of `store`.
pub(super) fn audit(store: &Store, key: &str, streams: &[String]) -> Result<AuditResponse, Status> {
    let mut objects = ObjectStore::new();
    let mut compacted = Vec::new();
    let mut records: Vec<(String, Record)> = Vec::new();
    for stream in streams {
        let info = store.info(stream).map_err(|e| log_status(&e))?;
        let mut after = info.horizon.seq;
        if after > 0 {
            let snap = store.snapshot(stream).map_err(|e| log_status(&e))?;
            let mut state = None;
            if let Some(o) = snap.objects.iter().find(|o| o.key == key) {
                // Each stream's snapshot merges into the base (a document
                // load merges; an empty state is a deleted object).
                if o.state.is_empty() {
                    objects.apply_tombstone(key);
                } else {
                    objects.load(key, &o.state).map_err(|e| {
                        Status::data_loss(format!("snapshot of {key} in {stream}: {e}"))
                    })?;
                    let mut alone = ObjectStore::new();
                    if alone.load(key, &o.state).is_ok() {
                        state = alone.get_json(key);
                    }
                }
            }
            compacted.push(Compacted {
                stream: stream.clone(),
                through_seq: info.horizon.seq,
                object_json: json_text(state.as_ref()),
            });
        }
        let head = info.head.seq;
        while after < head {
            let limits = ReadLimits {
                max_records: 4096,
                max_bytes: 16 << 20,
            };
            let seg = match store
                .read(stream, after, limits)
                .map_err(|e| log_status(&e))?
            {
                Read::Records(seg) => seg,
                Read::Snapshot { .. } => {
                    return Err(Status::aborted(format!(
                        "stream {stream:?} was compacted during the audit; run it again"
                    )));
                }
            };
            let end = seg.end().seq;
            if end <= after {
                break;
            }
            records.extend(
                seg.records
                    .into_iter()
                    .filter(|r| r.key == key && r.seq <= head)
                    .map(|r| (stream.clone(), r)),
            );
            after = end;
        }
    }
    // One stream: seq order. Several (an edge's down and up): HLC order,
    // which respects causality between the writers.
    records.sort_by(|(sa, a), (sb, b)| (a.hlc, sa, a.seq).cmp(&(b.hlc, sb, b.seq)));
    let mut entries = Vec::with_capacity(records.len());
    for (stream, r) in records {
        let before = objects.get_json(key).unwrap_or(Value::Null);
        let mut note = String::new();
        match r.kind {
            PayloadKind::Change => match objects.apply_change(key, &r.payload) {
                Ok(Applied::New) if keel_sync::crdt::is_rebase(&r.payload) => {
                    note = "rebase: history replaced by the current value".into();
                }
                Ok(Applied::New) => {}
                Ok(Applied::Duplicate) => note = "duplicate".into(),
                Ok(Applied::Queued) => note = "queued".into(),
                Ok(Applied::Discarded) => note = "discarded".into(),
                Ok(_) => {}
                Err(e) => note = format!("unreadable change: {e}"),
            },
            PayloadKind::Tombstone => objects.apply_tombstone(key),
            PayloadKind::Event => {
                // An event's text, if it is one (an exec session's record).
                note = match std::str::from_utf8(&r.payload) {
                    Ok(t) if t.len() <= 4096 => format!("event: {t}"),
                    _ => "event".into(),
                };
            }
        }
        let after = objects.get_json(key).unwrap_or(Value::Null);
        let patch = json_patch::diff(&before, &after);
        entries.push(AuditEntry {
            stream,
            seq: r.seq,
            hlc: r.hlc,
            time_ms: hlc_millis(r.hlc),
            origin_kind: origin_kind(&r.origin) as i32,
            origin: r.origin.into(),
            kind: kind_proto(r.kind) as i32,
            patch_json: serde_json::to_string(&patch).unwrap_or_else(|_| "[]".into()),
            hash: r.hash.to_hex(),
            note,
        });
    }
    Ok(AuditResponse {
        key: key.to_owned(),
        entries,
        compacted,
        object_json: json_text(objects.get_json(key).as_ref()),
    })
}
