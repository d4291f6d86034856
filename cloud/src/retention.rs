//! Compaction of cloudcore's log: `cluster` and its copies of every node's
//! `up` and `down` streams are folded into per-object snapshots (keel-log
//! compaction with the CRDT folder, the same as the edge's), so that disk
//! use and start-up time follow the objects, not their age.
//!
//! What is kept: every record younger than `age` and the newest `records`
//! of each stream (history for `keel audit`, readings for whoever reads
//! them), and whatever a peer still needs: `N/down` only up to what node
//! `N` acknowledged, `N/up` only up to what the registry has folded into
//! `cluster` durably. Event records (device readings, MQTT uploads) fold
//! into nothing: past retention they are gone from the log, after being
//! appended to the event sink when one is configured.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use keel_log::{Hlc, PayloadKind, Read, ReadLimits, Record, Store};
use keel_sync::objects::{CrdtFold, LiveFold};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::api::registry::{CLUSTER_STREAM, Registry};
use crate::hub::HubHandle;

/// Records above a stream's horizon before a pass compacts it.
const MIN_BATCH: u64 = 256;

/// What the log keeps (config `retention`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetentionConfig {
    /// Records younger than this are kept (`--retain`; `90s`, `10m`, `2h`,
    /// `7d`).
    #[serde(default = "default_age", with = "keel_api::meta::age_serde")]
    pub age: Duration,
    /// The newest this many records of each stream are kept
    /// (`--retain-records`).
    #[serde(default = "default_records")]
    pub records: u64,
    /// Event records are appended here (JSON lines) before compaction
    /// drops them (`--event-sink`); none: they are dropped.
    #[serde(default)]
    pub event_sink: Option<PathBuf>,
    /// How often a compaction pass runs (`--compact-interval`).
    #[serde(default = "default_interval", with = "keel_api::meta::age_serde")]
    pub interval: Duration,
    /// An object whose document holds this many changes has its history
    /// replaced by its current value (a rebase root) at the next pass
    /// (`--rebase-after`; 0: never).
    #[serde(default = "default_rebase_after")]
    pub rebase_after: usize,
}

fn default_rebase_after() -> usize {
    1000
}

fn default_age() -> Duration {
    Duration::from_secs(7 * 86_400)
}

fn default_records() -> u64 {
    10_000
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig {
            age: default_age(),
            records: default_records(),
            event_sink: None,
            interval: default_interval(),
            rebase_after: default_rebase_after(),
        }
    }
}

pub use keel_api::meta::parse_age;

/// Errors of a compaction pass.
#[derive(Debug, thiserror::Error)]
pub enum RetentionError {
    #[error("log: {0}")]
    Log(#[from] keel_log::Error),
    #[error("event sink {path}: {source}")]
    Sink {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Runs a compaction pass every `cfg.interval` until the task is dropped.
pub async fn run(registry: Arc<Registry>, hub: HubHandle, cfg: RetentionConfig) {
    // (A zero interval from a config file would make a busy loop.)
    let mut tick = tokio::time::interval(cfg.interval.max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (registry, acked, cfg) = (registry.clone(), hub.acked(), cfg.clone());
        match tokio::task::spawn_blocking(move || pass(&registry, &acked, &cfg, now_ms())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(error = %e, "compacting the log failed"),
            Err(e) => warn!(error = %e, "the compaction task failed"),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One pass over every stream (blocking; `acked`: node → the seq of its
/// `down` stream it acknowledged): the streams compacted, each with the
/// seq it was folded up to.
///
/// # Errors
/// A log error, or an event sink that cannot be written (then nothing of
/// that stream is compacted).
pub fn pass(
    registry: &Registry,
    acked: &std::collections::BTreeMap<String, u64>,
    cfg: &RetentionConfig,
    now_ms: u64,
) -> Result<Vec<(String, u64)>, RetentionError> {
    let store = registry.store();
    let cutoff = now_ms.saturating_sub(u64::try_from(cfg.age.as_millis()).unwrap_or(u64::MAX));
    let mut done = Vec::new();
    // Long histories first: the compaction below then folds their roots.
    if cfg.rebase_after > 0 {
        registry.rebase_long_histories(cfg.rebase_after);
    }
    // Deleted objects are remembered (against stragglers) for one to two
    // passes, not for ever.
    registry.forget_deleted();
    // A node's `up` keeps only the changes the registry's documents hold.
    let live = LiveFold(|key: &str, hash: &[u8; 32]| registry.holds_change(key, hash));
    for info in store.streams() {
        let name = info.name.as_str();
        // What a peer, or the registry, still needs.
        let needed = if name == CLUSTER_STREAM {
            u64::MAX
        } else if let Some(node) = name.strip_suffix("/down") {
            acked.get(node).copied().unwrap_or(0)
        } else if let Some(node) = name.strip_suffix("/up") {
            registry.folded_up(node)
        } else {
            continue;
        };
        let by_count = info.head.seq.saturating_sub(cfg.records);
        let limit = needed.min(by_count);
        if limit < info.horizon.seq.saturating_add(MIN_BATCH) {
            continue;
        }
        // Up to the last record older than the cutoff (records of a
        // stream are in HLC order).
        let (upto, events) = scan(store, name, info.horizon.seq, limit, cutoff, cfg)?;
        if upto < info.horizon.seq.saturating_add(MIN_BATCH) {
            continue;
        }
        if let Some(path) = &cfg.event_sink
            && !events.is_empty()
        {
            export(path, name, &events)?;
        }
        if name.ends_with("/up") {
            store.compact(name, upto, &live)?;
        } else {
            store.compact(name, upto, &CrdtFold)?;
        }
        info!(stream = %name, upto, events = events.len(), "compacted");
        done.push((name.to_owned(), upto));
    }
    Ok(done)
}

/// The last seq in `(from, limit]` whose record is older than `cutoff`,
/// and the event records up to it when they are to be exported.
fn scan(
    store: &Store,
    stream: &str,
    from: u64,
    limit: u64,
    cutoff: u64,
    cfg: &RetentionConfig,
) -> Result<(u64, Vec<Record>), RetentionError> {
    let mut upto = from;
    let mut events = Vec::new();
    let mut after = from;
    'read: loop {
        let seg = match store.read(stream, after, ReadLimits::default())? {
            Read::Records(s) => s,
            Read::Snapshot { tail, .. } => tail,
        };
        if seg.records.is_empty() {
            break;
        }
        for r in seg.records {
            if r.seq > limit || Hlc::physical_ms(r.hlc) >= cutoff {
                break 'read;
            }
            upto = r.seq;
            after = r.seq;
            if cfg.event_sink.is_some() && r.kind == PayloadKind::Event {
                events.push(r);
            }
        }
    }
    Ok((upto, events))
}

/// Appends `events` of `stream` to the sink as JSON lines and syncs it
/// (before compaction drops them: a crash between the two exports them
/// again, so a reader deduplicates by stream and seq).
fn export(path: &PathBuf, stream: &str, events: &[Record]) -> Result<(), RetentionError> {
    let sink = |source| RetentionError::Sink {
        path: path.clone(),
        source,
    };
    let mut out = Vec::new();
    for r in events {
        let payload = serde_json::from_slice::<Value>(&r.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&r.payload).into_owned()));
        let line = json!({
            "stream": stream,
            "seq": r.seq,
            "timeMs": Hlc::physical_ms(r.hlc),
            "origin": &*r.origin,
            "key": &*r.key,
            "payload": payload,
        });
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(sink)?;
    f.write_all(&out).map_err(sink)?;
    f.sync_data().map_err(sink)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::api::registry::{Write, new_meta};

    #[test]
    fn ages() {
        assert_eq!(parse_age("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_age("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert_eq!(parse_age("250ms"), Ok(Duration::from_millis(250)));
        for bad in ["", "s", "10", "10x", "-1s", "1.5h"] {
            assert!(parse_age(bad).is_err(), "{bad}");
        }
    }

    /// `cluster` keeps the newest `records` and everything younger than
    /// `age`; a node's `down` is never compacted past what it acknowledged;
    /// the objects read back after a restart are the same.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_what_is_young_recent_or_needed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), keel_log::StoreOptions::default()).unwrap();
        let reg = Registry::open(store.clone()).unwrap();
        for i in 0..600 {
            let key = format!("pods/default/p{}", i % 20);
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p{}", i % 20), "namespace": "default",
                    "labels": {"i": i.to_string()}},
                "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "i"}]}});
            reg.write(&key, |_| Ok(Some(Write::Put(new_meta(pod, None)))))
                .await
                .unwrap();
        }
        let before: Vec<Value> = reg.list("pods/").0;
        let cluster_head = store.info(CLUSTER_STREAM).unwrap().head.seq;
        let down_head = store.info("edge-1/down").unwrap().head.seq;
        let cfg = RetentionConfig {
            age: Duration::from_secs(3600),
            records: 100,
            ..RetentionConfig::default()
        };
        let mut acked = std::collections::BTreeMap::new();
        // Everything is younger than an hour: nothing goes.
        let now = now_ms();
        assert!(pass(&reg, &acked, &cfg, now).unwrap().is_empty());
        // An hour later: all but the newest 100 of `cluster`; `down` not
        // at all while the node has acknowledged nothing, then up to its
        // ack.
        let later = now + 3_600_001;
        let done = pass(&reg, &acked, &cfg, later).unwrap();
        assert_eq!(done, vec![(CLUSTER_STREAM.to_owned(), cluster_head - 100)]);
        acked.insert("edge-1".to_owned(), 400);
        let done = pass(&reg, &acked, &cfg, later).unwrap();
        assert_eq!(done, vec![("edge-1/down".to_owned(), 400)]);
        assert!(down_head > 500);
        assert_eq!(store.info("edge-1/down").unwrap().horizon.seq, 400);
        // Restarted from the snapshots: the same objects.
        drop(reg);
        let reg = Registry::open(store).unwrap();
        let after: Vec<Value> = reg.list("pods/").0;
        assert_eq!(before, after);
    }
}
