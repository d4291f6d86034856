//! MetaManager: this node's objects, materialised from its log.
//!
//! The node's `down` stream (what the cloud bound to it: pods, the
//! configmaps and secrets they use, devices, its own Node object) and its
//! `up` stream (what this node reported) are folded into one CRDT object
//! store, exactly as the cloud folds them, so both sides hold the same
//! documents. On start the store is rebuilt from the local log alone: with
//! the cloud unreachable the node still knows every pod it must run.
//!
//! The edge writes only observed fields (a pod's `status`; its Node's
//! capacity, addresses and node info) as automerge changes appended to
//! `up`, which EdgeHub delivers whenever the cloud is reachable.
//!
//! resourceVersions on the edge count the records applied (down + up), so
//! they only grow, across restarts too; watches resume within the history
//! kept since this process started.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use keel_api::meta::with_rv;
use keel_api::watch::{EventKind, WatchEvent, WatchHub, WatchStart};
use keel_api::{ReadObjects, Status};
use keel_log::{Cursor, Entry, PayloadKind, Read, ReadLimits, Record, Role, Store, Ticket};
use keel_sync::crdt::{ActorId, ObjectStore};
use keel_sync::link::{down_stream, up_stream};
use keel_sync::objects::{CrdtFold, LiveFold, apply_records, apply_snapshot_object};
use keel_sync::queue::{CommitQueue, Commits, commit_queue};
use serde_json::Value;
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use crate::error::{Error, Result};

struct Inner {
    objects: ObjectStore,
    view: BTreeMap<String, (Arc<Value>, u64)>,
    next_rv: u64,
}

struct Commit {
    ticket: Option<Ticket<Cursor>>,
    events: Vec<Arc<WatchEvent>>,
    /// Told whether the change became durable.
    done: Option<oneshot::Sender<bool>>,
}

/// How long the edge API's watch history lasts by default
/// ([`MetaManager::set_watch_window`]).
pub const WATCH_WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

/// Commits waiting for durability past which the sync driver waits
/// before persisting more of what the cloud sends.
const META_QUEUE: usize = 1024;

/// The node's objects (cheap to share behind an `Arc`).
pub struct MetaManager {
    node: String,
    store: Store,
    actor: ActorId,
    inner: Mutex<Inner>,
    hub: WatchHub,
    commits: CommitQueue<Commit>,
    /// Bumped after every change from the cloud (Edged and the node
    /// reporter wait on it).
    changed: watch::Sender<u64>,
    /// Seq of `up` the cloud has acknowledged (durable there).
    acked_up: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for MetaManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaManager")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn log_err(e: keel_log::Error) -> Error {
    Error::Log(e)
}

/// Folds every record of `stream` into `objects`.
fn load_stream(store: &Store, stream: &str, objects: &mut ObjectStore) -> Result<()> {
    let mut after = 0;
    loop {
        let seg = match store
            .read(stream, after, ReadLimits::default())
            .map_err(log_err)?
        {
            Read::Records(seg) => seg,
            Read::Snapshot { snapshot, tail } => {
                for o in &snapshot.objects {
                    if let Err(e) = apply_snapshot_object(objects, o) {
                        warn!(key = %o.key, error = %e, "snapshot object unusable; skipped");
                    }
                }
                tail
            }
        };
        let Some(last) = seg.records.last() else {
            return Ok(());
        };
        after = last.seq;
        if let Err(e) = apply_records(objects, &seg.records) {
            warn!(%stream, error = %e, "a record was unusable; skipped");
        }
    }
}

/// After the node's whole log is loaded (`down`, then `up`): a rebase root
/// in `down` was met before the node's own changes in `up`, so what it left
/// "diverged" is not what the node held (and the node's re-assertion, if it
/// made one, is in `up` already); changes still waiting were built on
/// history a rebase replaced: nothing will ever complete them.
fn settle_loaded(node: &str, objects: &mut ObjectStore) {
    objects.clear_diverged();
    let dropped = objects.drop_pending();
    if dropped > 0 {
        debug!(%node, dropped, "changes built on rebased history dropped");
    }
}

impl MetaManager {
    /// Opens the node's streams in `store` (creating them if new) and
    /// rebuilds the objects from them. Must run inside a tokio runtime.
    pub fn open(store: Store, node: &str) -> Result<Arc<MetaManager>> {
        let (down, up) = (down_stream(node), up_stream(node));
        store.create_stream(&up, Role::Writer, 1).map_err(log_err)?;
        store
            .create_stream(&down, Role::Replica, 1)
            .map_err(log_err)?;
        let mut objects = ObjectStore::new();
        load_stream(&store, &down, &mut objects)?;
        load_stream(&store, &up, &mut objects)?;
        settle_loaded(node, &mut objects);
        let base = store.info(&down).map_err(log_err)?.head.seq
            + store.info(&up).map_err(log_err)?.head.seq;
        let view = objects
            .keys()
            .filter_map(|k| {
                objects
                    .get_json(k)
                    .map(|o| (k.to_owned(), (Arc::new(o), base)))
            })
            .collect::<BTreeMap<_, _>>();
        info!(%node, objects = view.len(), "node objects loaded from the local log");
        let (commits, rx) = commit_queue(META_QUEUE);
        let (changed, _) = watch::channel(0);
        let meta = Arc::new(MetaManager {
            node: node.to_owned(),
            store,
            actor: ActorId::from_name(node),
            inner: Mutex::new(Inner {
                objects,
                view,
                next_rv: base + 1,
            }),
            hub: WatchHub::new(base),
            commits,
            changed,
            acked_up: std::sync::atomic::AtomicU64::new(0),
        });
        // Local watchers (on this host) that were away longer list again
        // (410): history stays what minutes of churn make, not hours.
        meta.hub.set_window(WATCH_WINDOW);
        tokio::spawn(publish(Arc::downgrade(&meta), rx));
        Ok(meta)
    }

    /// Keeps watch history for `window` (an event holds its object's
    /// version: this bounds what churn costs in memory).
    pub fn set_watch_window(&self, window: std::time::Duration) {
        self.hub.set_window(window);
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A receiver that sees a new value after every change from the cloud
    /// (not after the edge's own [`Self::update`]s).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The object at `key` (without a resourceVersion).
    pub fn object(&self, key: &str) -> Option<Arc<Value>> {
        lock(&self.inner).view.get(key).map(|(o, _)| o.clone())
    }

    /// Every object whose key starts with `prefix`, key order.
    pub fn objects(&self, prefix: &str) -> Vec<(String, Arc<Value>)> {
        lock(&self.inner)
            .view
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, (o, _))| (k.clone(), o.clone()))
            .collect()
    }

    /// Changes the object at `key` with `f` (given its current JSON) and
    /// records the difference in `up`. Returns false if the object does not
    /// exist (any more) or nothing changed. The record becomes durable
    /// shortly after; watchers see the change then.
    pub fn update(&self, key: &str, f: impl FnOnce(&mut Value)) -> Result<bool> {
        self.update_inner(key, f, None)
    }

    /// [`Self::update`], returning a receiver told once the change is
    /// durable (`true`) or could not be written (`false`); `None` if
    /// nothing changed.
    pub fn update_durable(
        &self,
        key: &str,
        f: impl FnOnce(&mut Value),
    ) -> Result<Option<oneshot::Receiver<bool>>> {
        let (tx, rx) = oneshot::channel();
        Ok(self.update_inner(key, f, Some(tx))?.then_some(rx))
    }

    /// Appends an opaque event record (telemetry, an MQTT upload) about
    /// `key` to `up`; the ticket completes once it is durable. Events are
    /// replicated to the cloud like every record but fold into no object.
    pub fn record_event(&self, key: &str, payload: Vec<u8>) -> Result<Ticket<Cursor>> {
        self.append_up(key, PayloadKind::Event, payload)
    }

    /// Appends one record of this node about `key` to `up`.
    fn append_up(&self, key: &str, kind: PayloadKind, payload: Vec<u8>) -> Result<Ticket<Cursor>> {
        self.store
            .append_async(
                &up_stream(&self.node),
                vec![Entry::new(self.node.as_str(), key, kind, payload)],
            )
            .map_err(log_err)
    }

    fn update_inner(
        &self,
        key: &str,
        f: impl FnOnce(&mut Value),
        done: Option<oneshot::Sender<bool>>,
    ) -> Result<bool> {
        let mut inner = lock(&self.inner);
        let Some(mut obj) = inner.objects.get_json(key) else {
            return Ok(false);
        };
        let before = obj.clone();
        f(&mut obj);
        if obj == before {
            return Ok(false);
        }
        let change = inner
            .objects
            .edit_replace(key, &self.actor, &obj)
            .map_err(|e| Error::Object {
                key: key.to_owned(),
                message: e.to_string(),
            })?;
        let Some(change) = change else {
            return Ok(false);
        };
        let ticket = self.append_up(key, PayloadKind::Change, change)?;
        let events = refresh(&mut inner, [key]);
        self.commits.push(Commit {
            ticket: Some(ticket),
            events,
            done,
        });
        // No wake-up: what the edge itself writes (status) changes nothing
        // Edged or the node reporter act on.
        Ok(true)
    }

    /// Records durable in the node's `down` stream: fold them in.
    fn apply_down(&self, records: &[Record]) {
        let mut inner = lock(&self.inner);
        if let Err(e) = apply_records(&mut inner.objects, records) {
            warn!(node = %self.node, error = %e, "a record from the cloud was unusable; skipped");
        }
        let mut keys: Vec<&str> = records.iter().map(|r| &*r.key).collect();
        keys.sort_unstable();
        keys.dedup();
        // A rebase root the cloud made before it had folded all this node
        // wrote: what the node holds beyond it goes up again, on top of it.
        let mut again = Vec::new();
        for key in &keys {
            match inner.objects.take_diverged(key, &self.actor) {
                Ok(Some(change)) => again.push(Entry::new(
                    self.node.as_str(),
                    *key,
                    PayloadKind::Change,
                    change,
                )),
                Ok(None) => {}
                Err(e) => {
                    warn!(node = %self.node, %key, error = %e, "could not re-assert after a rebase")
                }
            }
        }
        let ticket = if again.is_empty() {
            None
        } else {
            debug!(node = %self.node, objects = again.len(), "re-asserting status after a rebase");
            match self.store.append_async(&up_stream(&self.node), again) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(node = %self.node, error = %e, "could not record a re-assertion");
                    None
                }
            }
        };
        let events = refresh(&mut inner, keys);
        if !events.is_empty() || ticket.is_some() {
            debug!(node = %self.node, changes = events.len(), "applied changes from the cloud");
            self.commits.push(Commit {
                ticket,
                events,
                done: None,
            });
        }
        drop(inner);
        self.changed.send_modify(|v| *v += 1);
    }

    /// Folds old records into per-object snapshots (keel-log compaction
    /// with [`CrdtFold`]) where at least `min_records` are above the
    /// horizon: `down` up to its head (every record there is durable and
    /// applied), `up` up to what the cloud has acknowledged (so the cloud
    /// never needs a record folded away). Blocking; run it off the async
    /// workers. Returns how many streams were compacted.
    pub fn compact(&self, min_records: u64) -> Result<usize> {
        let mut done = 0;
        // Deleted objects are remembered (against stragglers) for one to
        // two passes, not for ever.
        let forgotten = lock(&self.inner).objects.forget_deleted();
        if forgotten > 0 {
            debug!(node = %self.node, objects = forgotten, "forgot deleted objects");
        }
        let down = down_stream(&self.node);
        let up = up_stream(&self.node);
        let acked = self.acked_up.load(std::sync::atomic::Ordering::SeqCst);
        // `up` keeps only the node's changes its documents still hold (not
        // those a rebase root replaced, nor those of deleted objects).
        let live =
            LiveFold(|key: &str, hash: &[u8; 32]| lock(&self.inner).objects.has_change(key, hash));
        for (stream, limit) in [(down, u64::MAX), (up, acked)] {
            let info = self.store.info(&stream)?;
            let upto = info.head.seq.min(limit);
            if upto >= info.horizon.seq.saturating_add(min_records.max(1)) {
                if stream.ends_with("/up") {
                    self.store.compact(&stream, upto, &live)?;
                } else {
                    self.store.compact(&stream, upto, &CrdtFold)?;
                }
                info!(node = %self.node, %stream, upto, "compacted");
                done += 1;
            }
        }
        Ok(done)
    }

    /// The `down` replica was replaced by a snapshot: rebuild from the log.
    fn reload(&self) {
        let mut objects = ObjectStore::new();
        let down = down_stream(&self.node);
        let up = up_stream(&self.node);
        if let Err(e) = load_stream(&self.store, &down, &mut objects)
            .and_then(|()| load_stream(&self.store, &up, &mut objects))
        {
            warn!(node = %self.node, error = %e, "rebuilding from the log failed");
            return;
        }
        settle_loaded(&self.node, &mut objects);
        let mut inner = lock(&self.inner);
        // What this node wrote and the new documents do not hold (the
        // snapshot of a cloudcore replica that took the node over, built
        // on the cluster's copy, without the changes this node built on
        // the previous replica's documents): written again, on top of them.
        let again = self.reassert(&inner.objects, &mut objects);
        let mut keys: Vec<String> = inner.view.keys().cloned().collect();
        keys.extend(objects.keys().map(str::to_owned));
        keys.sort();
        keys.dedup();
        inner.objects = objects;
        let events = refresh(&mut inner, keys.iter().map(String::as_str));
        let ticket = if again.is_empty() {
            None
        } else {
            info!(node = %self.node, objects = again.len(), "re-asserting this node's status over the cloud's new snapshot");
            match self.store.append_async(&up_stream(&self.node), again) {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!(node = %self.node, error = %e, "could not record a re-assertion");
                    None
                }
            }
        };
        self.commits.push(Commit {
            ticket,
            events,
            done: None,
        });
        drop(inner);
        self.changed.send_modify(|v| *v += 1);
    }
}

impl MetaManager {
    /// For each object whose `status` this node writes (its Node, the pods
    /// and devices bound to it) and that `new` holds with another status
    /// than `old`: a change of `new` that puts `old`'s status back.
    fn reassert(&self, old: &ObjectStore, new: &mut ObjectStore) -> Vec<Entry> {
        let own = format!("nodes/{}", self.node);
        let keys: Vec<String> = old
            .keys()
            .filter(|k| {
                *k == own
                    || k.starts_with("pods/")
                    || k.starts_with(crate::devicetwin::DEVICE_PREFIX)
            })
            .map(str::to_owned)
            .collect();
        let mut out = Vec::new();
        for key in keys {
            let (Some(was), Some(mut now)) = (old.get_json(&key), new.get_json(&key)) else {
                continue;
            };
            // Another object under the same name (a pod made again):
            // nothing to carry over. Not for this node's own Node: there is
            // only ever one, and a replica that never had the node makes
            // its own copy (with a uid of its own) as it takes it over.
            if key != own && was.pointer("/metadata/uid") != now.pointer("/metadata/uid") {
                continue;
            }
            let Some(status) = was.get("status").filter(|s| now.get("status") != Some(*s)) else {
                continue;
            };
            if let Some(o) = now.as_object_mut() {
                o.insert("status".into(), status.clone());
            }
            match new.edit_replace(&key, &self.actor, &now) {
                Ok(Some(change)) => out.push(Entry::new(
                    self.node.as_str(),
                    key,
                    PayloadKind::Change,
                    change,
                )),
                Ok(None) => {}
                Err(e) => {
                    warn!(node = %self.node, %key, error = %e, "could not re-assert a status")
                }
            }
        }
        out
    }
}

/// Brings the view of `keys` up to date with the object store; one watch
/// event per object that changed.
fn refresh<'a>(inner: &mut Inner, keys: impl IntoIterator<Item = &'a str>) -> Vec<Arc<WatchEvent>> {
    let mut events = Vec::new();
    for key in keys {
        let now = inner.objects.get_json(key);
        let old = inner.view.get(key).map(|(o, _)| o.clone());
        let (kind, obj) = match (&old, now) {
            (None, None) => continue,
            (Some(o), Some(n)) if **o == n => continue,
            (Some(o), None) => {
                inner.view.remove(key);
                (EventKind::Deleted, o.clone())
            }
            (o, Some(n)) => {
                let kind = if o.is_some() {
                    EventKind::Modified
                } else {
                    EventKind::Added
                };
                let n = Arc::new(n);
                inner
                    .view
                    .insert(key.to_owned(), (n.clone(), inner.next_rv));
                (kind, n)
            }
        };
        let rv = inner.next_rv;
        inner.next_rv += 1;
        events.push(Arc::new(WatchEvent {
            rv,
            kind,
            key: key.to_owned(),
            object: obj,
        }));
    }
    events
}

/// Publishes watch events in order, each once durable.
async fn publish(meta: std::sync::Weak<MetaManager>, mut rx: Commits<Commit>) {
    while let Some(c) = rx.recv().await {
        if let Some(t) = c.ticket
            && let Err(e) = t.await
        {
            warn!(error = %e, "writing to the local log failed: the store is poisoned");
            if let Some(d) = c.done {
                let _ = d.send(false);
            }
            continue;
        }
        if let Some(d) = c.done {
            let _ = d.send(true);
        }
        let Some(meta) = meta.upgrade() else {
            return;
        };
        meta.hub.publish(c.events);
    }
}

impl ReadObjects for MetaManager {
    fn get(&self, key: &str) -> Option<Value> {
        lock(&self.inner)
            .view
            .get(key)
            .map(|(o, rv)| with_rv(o, *rv))
    }

    fn list(&self, prefix: &str) -> (Vec<Value>, u64) {
        let inner = lock(&self.inner);
        let items = inner
            .view
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(_, (o, rv))| with_rv(o, *rv))
            .collect();
        (items, inner.next_rv.saturating_sub(1))
    }

    fn watch(&self, rv: u64) -> std::result::Result<WatchStart, Status> {
        self.hub.watch(rv)
    }
}

/// The sync driver's sink: what arrives on `down` is folded in.
impl keel_sync::quic::Sink for MetaManager {
    /// What comes down is folded in and its watch events queued: the
    /// driver waits while that queue is full.
    fn room(&self) -> keel_sync::quic::Room<'_> {
        Box::pin(self.commits.room())
    }

    /// The edge takes what its cloud sends (the cloud is the authority).
    fn admit(
        &self,
        _node: &str,
        _stream: &str,
        _records: &[Record],
    ) -> Result<(), keel_sync::link::Refusal> {
        Ok(())
    }

    fn persisted(&self, _node: &str, stream: &str, records: &[Record]) {
        if stream == down_stream(&self.node) {
            self.apply_down(records);
        }
    }

    fn snapshot_installed(&self, _node: &str, stream: &str) {
        if stream == down_stream(&self.node) {
            self.reload();
        }
    }

    fn acked(&self, _node: &str, stream: &str, cursor: Cursor) {
        if stream == up_stream(&self.node) {
            self.acked_up
                .fetch_max(cursor.seq, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use super::*;
    use keel_log::StoreOptions;
    use keel_sync::quic::Sink as _;
    use serde_json::json;

    /// Records the cloud would send down: one change per pod edit.
    fn cloud_records(cloud: &Store, stream: &str, n: usize) -> Vec<Record> {
        let mut objects = ObjectStore::new();
        let actor = ActorId::from_name("cloudcore");
        cloud.create_stream(stream, Role::Writer, 1).unwrap();
        for i in 0..n {
            let key = format!("pods/default/p{}", i % 3);
            let change = objects
                .edit_merge_patch(
                    &key,
                    &actor,
                    &json!({"metadata": {"name": key}, "spec": {"i": i}}),
                )
                .unwrap()
                .unwrap();
            cloud
                .append(
                    stream,
                    vec![Entry::new("cloudcore", key, PayloadKind::Change, change)],
                )
                .unwrap();
        }
        match cloud
            .read(
                stream,
                0,
                ReadLimits {
                    max_records: n,
                    max_bytes: 1 << 24,
                },
            )
            .unwrap()
        {
            Read::Records(seg) => seg.records,
            Read::Snapshot { .. } => panic!("no compaction on the cloud here"),
        }
    }

    /// A cloud's `down` stream for node `n1` holding its Node object with
    /// `uid` and `ticks` in its status, written by `actor`, compacted to
    /// its head and brought to `epoch`.
    fn cloud_with_node(
        dir: &std::path::Path,
        actor: &str,
        uid: &str,
        ticks: &str,
        epoch: u64,
    ) -> Store {
        let cloud = Store::open(dir, StoreOptions::default()).unwrap();
        cloud.create_stream("n1/down", Role::Writer, 1).unwrap();
        let mut objects = ObjectStore::new();
        let change = objects
            .edit_merge_patch(
                "nodes/n1",
                &ActorId::from_name(actor),
                &json!({"metadata": {"name": "n1", "uid": uid},
                        "status": {"capacity": {"ticks": ticks}}}),
            )
            .unwrap()
            .unwrap();
        cloud
            .append(
                "n1/down",
                vec![Entry::new(actor, "nodes/n1", PayloadKind::Change, change)],
            )
            .unwrap();
        let head = cloud.info("n1/down").unwrap().head.seq;
        cloud.compact("n1/down", head, &CrdtFold).unwrap();
        cloud.begin_epoch("n1/down", epoch).unwrap();
        cloud
    }

    /// A replica that never had the node takes it over with a Node object
    /// of its own making (another uid) and the cluster's older status: the
    /// node writes what it recorded meanwhile again, on the new document.
    #[tokio::test]
    async fn own_node_status_is_reasserted_over_a_new_owners_copy() {
        let dir = tempfile::tempdir().unwrap();
        let a = cloud_with_node(&dir.path().join("a"), "replica-a", "uid-a", "3", 2);
        let store = Store::open(dir.path().join("edge"), StoreOptions::default()).unwrap();
        let meta = MetaManager::open(store.clone(), "n1").unwrap();
        store
            .install_snapshot("n1/down", a.snapshot("n1/down").unwrap())
            .unwrap();
        meta.snapshot_installed("n1", "n1/down");
        assert_eq!(
            meta.object("nodes/n1").unwrap()["status"]["capacity"]["ticks"],
            "3"
        );
        // Recorded while no replica owns it.
        for t in ["4", "5"] {
            assert!(
                meta.update("nodes/n1", |o| o["status"]["capacity"]["ticks"] = json!(t))
                    .unwrap()
            );
        }
        let b = cloud_with_node(&dir.path().join("b"), "replica-b", "uid-b", "3", 3);
        store
            .install_snapshot("n1/down", b.snapshot("n1/down").unwrap())
            .unwrap();
        meta.snapshot_installed("n1", "n1/down");
        let now = meta.object("nodes/n1").unwrap();
        assert_eq!(now["metadata"]["uid"], "uid-b");
        assert_eq!(now["status"]["capacity"]["ticks"], "5");
        // What goes up applies on the new owner's document, once durable
        // (two edits and the re-assertion).
        for _ in 0..1000 {
            if store.info("n1/up").unwrap().head.seq >= 3 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(store.info("n1/up").unwrap().head.seq, 3);
        let mut cloud_b = ObjectStore::new();
        load_stream(&b, "n1/down", &mut cloud_b).unwrap();
        load_stream(&store, "n1/up", &mut cloud_b).unwrap();
        assert_eq!(
            cloud_b.get_json("nodes/n1").unwrap()["status"]["capacity"]["ticks"],
            "5"
        );
    }

    #[tokio::test]
    async fn rebuilt_from_the_log_before_and_after_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let cloud = Store::open(dir.path().join("cloud"), StoreOptions::default()).unwrap();
        let records = cloud_records(&cloud, "n1/down", 30);
        let path = dir.path().join("edge");
        let store = Store::open(&path, StoreOptions::default()).unwrap();
        let meta = MetaManager::open(store.clone(), "n1").unwrap();
        store.append_replicated("n1/down", records.clone()).unwrap();
        meta.persisted("n1", "n1/down", &records);
        assert!(
            meta.update("pods/default/p1", |o| o["status"] =
                json!({"phase": "Running"}))
                .unwrap()
        );
        let want: Vec<_> = meta
            .objects("pods/")
            .into_iter()
            .map(|(k, v)| (k, (*v).clone()))
            .collect();
        assert_eq!(want.len(), 3);
        assert_eq!(want[2].1["spec"]["i"], 29);
        // Nothing of `up` is acknowledged yet: only `down` is compacted.
        assert_eq!(meta.compact(10).unwrap(), 1);
        assert_eq!(store.info("n1/up").unwrap().horizon.seq, 0);
        meta.acked("n1", "n1/up", store.info("n1/up").unwrap().head);
        assert_eq!(meta.compact(1).unwrap(), 1);
        drop(meta);
        let again = MetaManager::open(store.clone(), "n1").unwrap();
        let got: Vec<_> = again
            .objects("pods/")
            .into_iter()
            .map(|(k, v)| (k, (*v).clone()))
            .collect();
        assert_eq!(got, want, "the same objects from snapshots");
        assert_eq!(got[1].1["status"]["phase"], "Running");
        // The edge keeps editing on top of the compacted state.
        assert!(
            again
                .update("pods/default/p1", |o| o["status"] =
                    json!({"phase": "Failed"}))
                .unwrap()
        );
    }
}
