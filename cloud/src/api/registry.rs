//! The control plane's objects, backed by the log.
//!
//! Every change to an object — a write through the API or a status change
//! an edge reports — is one automerge change appended to the cloud's
//! `cluster` stream; an object's `resourceVersion` is the seq of the last
//! record that touched it, so the stream is the watch history and a watch
//! resumes from any seq still held (older: `410 Gone`). Objects bound to an
//! edge node (pods and devices with `spec.nodeName`, and the configmaps
//! and secrets those pods use) also go, change for change, into that
//! node's `down` stream; what the node reports arrives on its `up` stream
//! and is folded in here.
//!
//! A write answers only after its record is durable, and nothing is
//! visible before it is: get, list and watch read the *visible* view, which
//! a change reaches only once its records are durable (a failed commit
//! leaves it unseen). Writers work on the *latest* view, durable or not, so
//! that writes queue behind each other; `Inner::shadow` holds, for every
//! object with a change still in flight, what readers see meanwhile.
//! Watchers see events in seq order, once durable; a list's
//! resourceVersion is the last durable seq.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use keel_log::{Cursor, Entry, PayloadKind, Read, ReadLimits, Record, Role, Store, Ticket};
use keel_sync::crdt::{ActorId, Applied, ObjectStore};
use keel_sync::link::{Refusal, down_stream, up_stream};
use keel_sync::objects::{apply_record, apply_snapshot_object};
use keel_sync::queue::{CommitQueue, Commits, commit_queue, off_workers};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::resources::{self, ResourceType};
use super::status::Status;

/// The cloud's own stream of every object change.
pub const CLUSTER_STREAM: &str = "cluster";
pub use keel_api::meta::{
    CLOUDCORE_ORIGIN as ACTOR, now_rfc3339, now_rfc3339_micro, user_origin, with_rv,
};

use super::watch::WatchHub;
pub use super::watch::{EventKind, WatchEvent, WatchStart};

#[derive(Debug, Clone)]
struct Stored {
    obj: Arc<Value>,
    rv: u64,
}

/// What readers see of an object that has a change in flight.
#[derive(Debug)]
struct Shadow {
    /// The object as last made durable (`None`: absent).
    visible: Option<Stored>,
    /// The seq of its latest change in flight.
    pending: u64,
}

/// One object's state once a commit is durable (`None`: deleted).
type Visible = (String, Option<Stored>, u64);

struct Inner {
    objects: ObjectStore,
    /// The latest state, durable or not (what writers build on).
    view: BTreeMap<String, Stored>,
    /// Objects whose latest change is not durable yet: what readers see.
    shadow: BTreeMap<String, Shadow>,
    /// The last `cluster` seq that is durable and visible.
    durable_seq: u64,
    /// Node → the last seq of its `up` stream whose fold into `cluster`
    /// is durable (compaction of `up` never passes it).
    folded: BTreeMap<String, u64>,
    next_seq: u64,
    /// Object key → nodes whose `down` stream carries it.
    bound: BTreeMap<String, BTreeSet<String>>,
    /// Node streams known to exist.
    node_streams: BTreeSet<String>,
}

struct Commit {
    /// `cluster` appends, each with the seq it must get.
    cluster: Vec<(Ticket<Cursor>, u64)>,
    /// Appends to node streams.
    tickets: Vec<Ticket<Cursor>>,
    events: Vec<Arc<WatchEvent>>,
    visible: Vec<Visible>,
    /// A node's `up` records folded up to this seq by this commit.
    folded: Option<(String, u64)>,
    done: Option<oneshot::Sender<Result<(), String>>>,
}

impl Commit {
    fn new() -> Commit {
        Commit {
            cluster: Vec::new(),
            tickets: Vec::new(),
            events: Vec::new(),
            visible: Vec::new(),
            folded: None,
            done: None,
        }
    }
}

/// What a write function decides.
#[derive(Debug)]
pub enum Write {
    /// Store this object (without `resourceVersion`).
    Put(Value),
    /// Delete the object.
    Delete,
}

/// Commits waiting for durability past which writers from sockets wait.
const REGISTRY_QUEUE: usize = 1024;

/// The registry (cheap to share behind an `Arc`).
pub struct Registry {
    store: Store,
    inner: Mutex<Inner>,
    hub: WatchHub,
    commits: CommitQueue<Commit>,
    actor: ActorId,
    unscheduled: std::sync::atomic::AtomicBool,
    /// Objects rebased since start.
    rebased: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn strip_rv(obj: &mut Value) {
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str().filter(|s| !s.is_empty())
}

pub(crate) const DEVICES_PREFIX: &str = "devices.devices.kubeedge.io/";
const MODELS_PREFIX: &str = "devicemodels.devices.kubeedge.io/";

/// Objects (kind prefix, name; same namespace) that an object bound to a
/// node needs there too: a pod's configmaps and secrets, a device's model.
fn refs(key: &str, obj: &Value) -> Vec<(&'static str, String)> {
    if key.starts_with("pods/") {
        pod_refs(obj)
    } else if key.starts_with(DEVICES_PREFIX) {
        str_at(obj, &["spec", "deviceModelRef", "name"])
            .map(|m| vec![("devicemodels.devices.kubeedge.io", m.to_owned())])
            .unwrap_or_default()
    } else {
        Vec::new()
    }
}

/// Configmap and secret names a pod uses (volumes, projected volumes,
/// environment).
pub fn pod_refs(pod: &Value) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let spec = pod.get("spec").unwrap_or(&Value::Null);
    for v in spec
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(n) = str_at(v, &["configMap", "name"]) {
            out.push(("configmaps", n.to_owned()));
        }
        if let Some(n) = str_at(v, &["secret", "secretName"]) {
            out.push(("secrets", n.to_owned()));
        }
        for src in v
            .pointer("/projected/sources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(n) = str_at(src, &["configMap", "name"]) {
                out.push(("configmaps", n.to_owned()));
            }
            if let Some(n) = str_at(src, &["secret", "name"]) {
                out.push(("secrets", n.to_owned()));
            }
        }
    }
    for list in ["containers", "initContainers"] {
        for c in spec
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for e in c.get("env").and_then(Value::as_array).into_iter().flatten() {
                if let Some(n) = str_at(e, &["valueFrom", "configMapKeyRef", "name"]) {
                    out.push(("configmaps", n.to_owned()));
                }
                if let Some(n) = str_at(e, &["valueFrom", "secretKeyRef", "name"]) {
                    out.push(("secrets", n.to_owned()));
                }
            }
            for e in c
                .get("envFrom")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(n) = str_at(e, &["configMapRef", "name"]) {
                    out.push(("configmaps", n.to_owned()));
                }
                if let Some(n) = str_at(e, &["secretRef", "name"]) {
                    out.push(("secrets", n.to_owned()));
                }
            }
        }
    }
    out
}

impl Inner {
    /// Sets the latest state of `key` (`None`: deleted) at seq `rv`, and
    /// notes it in `commit`, which makes it visible once durable.
    fn stage(&mut self, commit: &mut Commit, key: &str, new: Option<Stored>, rv: u64) {
        let before = self.view.get(key).cloned();
        self.shadow
            .entry(key.to_owned())
            .and_modify(|s| s.pending = rv)
            .or_insert(Shadow {
                visible: before,
                pending: rv,
            });
        match &new {
            Some(s) => {
                self.view.insert(key.to_owned(), s.clone());
            }
            None => {
                self.view.remove(key);
            }
        }
        commit.visible.push((key.to_owned(), new, rv));
    }

    /// Makes a durable commit's changes visible.
    fn make_visible(&mut self, visible: Vec<Visible>) {
        for (key, val, rv) in visible {
            if let Some(sh) = self.shadow.get_mut(&key) {
                if sh.pending <= rv {
                    self.shadow.remove(&key);
                } else {
                    sh.visible = val;
                }
            }
        }
    }

    /// What readers see of `key`.
    fn visible(&self, key: &str) -> Option<&Stored> {
        match self.shadow.get(key) {
            Some(sh) => sh.visible.as_ref(),
            None => self.view.get(key),
        }
    }

    /// Calls `f` on what readers see of every object whose key starts
    /// with `prefix`, in key order.
    fn visible_range(&self, prefix: &str, mut f: impl FnMut(&Stored)) {
        let in_range = |k: &String| k.starts_with(prefix);
        // Objects deleted (or not yet created) in the latest view but
        // visible still; few, and merged in key order.
        let mut extra = self
            .shadow
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| in_range(k))
            .filter(|(k, _)| !self.view.contains_key(*k))
            .filter_map(|(k, sh)| sh.visible.as_ref().map(|v| (k, v)))
            .peekable();
        for (k, s) in self
            .view
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| in_range(k))
        {
            while let Some((_, ev)) = extra.next_if(|(ek, _)| *ek < k) {
                f(ev);
            }
            match self.shadow.get(k) {
                Some(sh) => {
                    if let Some(v) = &sh.visible {
                        f(v);
                    }
                }
                None => f(s),
            }
        }
        for (_, ev) in extra {
            f(ev);
        }
    }

    /// Nodes `key` (holding `obj`) must reach.
    fn targets(&self, key: &str, obj: &Value) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if let Some(node) = key.strip_prefix("nodes/") {
            // A node holds its own Node object, so that what it reports
            // (capacity, addresses, node info) merges into the same
            // document as the cloud's conditions.
            out.insert(node.to_owned());
        } else if key.starts_with("pods/") || key.starts_with("devices.") {
            if let Some(n) = str_at(obj, &["spec", "nodeName"]) {
                out.insert(n.to_owned());
            }
        } else if key.starts_with("configmaps/")
            || key.starts_with("secrets/")
            || key.starts_with(MODELS_PREFIX)
        {
            let mut parts = key.splitn(3, '/');
            let (Some(kind), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                return out;
            };
            let prefix = if key.starts_with(MODELS_PREFIX) {
                format!("{DEVICES_PREFIX}{ns}/")
            } else {
                format!("pods/{ns}/")
            };
            for (_, pod) in self
                .view
                .range(prefix.clone()..)
                .take_while(|(k, _)| k.starts_with(&prefix))
            {
                if let Some(n) = str_at(&pod.obj, &["spec", "nodeName"])
                    && refs(&prefix, &pod.obj)
                        .iter()
                        .any(|(k, nm)| *k == kind && nm == name)
                {
                    out.insert(n.to_owned());
                }
            }
        }
        out
    }
}

impl Registry {
    /// Opens the registry on `store`, replaying the `cluster` stream. Must
    /// run inside a tokio runtime (a task publishes durable commits).
    pub fn open(store: Store) -> Result<Arc<Registry>, Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        store
            .create_stream(CLUSTER_STREAM, Role::Writer, 1)
            .map_err(err)?;
        let mut objects = ObjectStore::new();
        let mut rvs: BTreeMap<String, u64> = BTreeMap::new();
        let mut after = 0;
        let mut floor = 0;
        loop {
            let seg = match store
                .read(CLUSTER_STREAM, after, ReadLimits::default())
                .map_err(err)?
            {
                Read::Records(seg) => seg,
                Read::Snapshot { snapshot, tail } => {
                    floor = snapshot.base.seq;
                    for o in &snapshot.objects {
                        if let Err(e) = apply_snapshot_object(&mut objects, o) {
                            warn!(key = %o.key, error = %e, "snapshot object unusable; skipped");
                        }
                        rvs.insert(o.key.clone(), o.seq);
                    }
                    tail
                }
            };
            if seg.records.is_empty() {
                break;
            }
            for r in &seg.records {
                if let Err(e) = apply_record(&mut objects, r) {
                    warn!(key = %r.key, seq = r.seq, error = %e, "record unusable; skipped");
                }
                // An event record (an exec session, say) changes no
                // object, and a rebase root no value.
                let rebase =
                    r.kind == PayloadKind::Change && keel_sync::crdt::is_rebase(&r.payload);
                if r.kind != PayloadKind::Event && !rebase {
                    rvs.insert(r.key.to_string(), r.seq);
                }
                after = r.seq;
            }
        }
        // Its own rebase roots hold what it had: nothing diverged.
        objects.clear_diverged();
        let head = store.info(CLUSTER_STREAM).map_err(err)?.head.seq;
        let mut view = BTreeMap::new();
        for key in objects.keys() {
            if let Some(obj) = objects.get_json(key) {
                let rv = rvs.get(key).copied().unwrap_or(head);
                view.insert(
                    key.to_owned(),
                    Stored {
                        obj: Arc::new(obj),
                        rv,
                    },
                );
            }
        }
        info!(objects = view.len(), head, "registry loaded from the log");
        let (commits, rx) = commit_queue(REGISTRY_QUEUE);
        let reg = Arc::new(Registry {
            store,
            inner: Mutex::new(Inner {
                objects,
                view,
                shadow: BTreeMap::new(),
                durable_seq: head,
                folded: BTreeMap::new(),
                next_seq: head + 1,
                bound: BTreeMap::new(),
                node_streams: BTreeSet::new(),
            }),
            hub: WatchHub::new(head.max(floor)),
            commits,
            actor: ActorId::from_name(ACTOR),
            // After a restart, let the first node connection look.
            unscheduled: std::sync::atomic::AtomicBool::new(true),
            rebased: std::sync::atomic::AtomicU64::new(0),
        });
        tokio::spawn(publish(Arc::downgrade(&reg), rx));
        reg.rebind()?;
        reg.refold_up()?;
        for ns in ["default", "kube-system", "kube-node-lease"] {
            let key = format!("namespaces/{ns}");
            if !lock(&reg.inner).view.contains_key(&key) {
                let obj = json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": ns}, "spec": {"finalizers": ["kubernetes"]},
                    "status": {"phase": "Active"}});
                reg.submit(&key, |_| Ok(Some(Write::Put(new_meta(obj, None)))))?;
            }
        }
        // No node is connected to a cloudcore that just started: a Ready
        // condition kept from before (a crash records no disconnect) would lie.
        let mut was_ready = Vec::new();
        reg.scan("nodes/", |n| {
            let ready = n
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                });
            if ready && let Some(name) = str_at(n, &["metadata", "name"]) {
                was_ready.push(name.to_owned());
            }
        });
        for n in was_ready {
            reg.node_ready(&n, false);
        }
        Ok(reg)
    }

    /// Rebuilds which node streams carry which objects, and sends every
    /// bound object's missing changes (a crash may have come between the
    /// `cluster` append and the `down` append).
    fn rebind(&self) -> Result<(), Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        let nodes: Vec<String> = self
            .store
            .streams()
            .into_iter()
            .filter_map(|s| s.name.strip_suffix("/down").map(str::to_owned))
            .collect();
        let mut inner = lock(&self.inner);
        let mut tickets = Vec::new();
        for node in nodes {
            let down = down_stream(&node);
            inner.node_streams.insert(down.clone());
            let mut sent = ObjectStore::new();
            let mut after = 0;
            loop {
                let seg = match self
                    .store
                    .read(&down, after, ReadLimits::default())
                    .map_err(err)?
                {
                    Read::Records(s) => s,
                    Read::Snapshot { snapshot, tail } => {
                        for o in &snapshot.objects {
                            let _ = apply_snapshot_object(&mut sent, o);
                        }
                        tail
                    }
                };
                if seg.records.is_empty() {
                    break;
                }
                for r in &seg.records {
                    let _ = apply_record(&mut sent, r);
                    after = r.seq;
                }
            }
            for key in sent.keys() {
                inner
                    .bound
                    .entry(key.to_owned())
                    .or_default()
                    .insert(node.clone());
                if sent.heads(key) != inner.objects.heads(key) && inner.view.contains_key(key) {
                    let entries: Vec<Entry> = inner
                        .objects
                        .changes(key)
                        .into_iter()
                        .map(|c| Entry::new(ACTOR, key, PayloadKind::Change, c))
                        .collect();
                    tickets.push(self.store.append_async(&down, entries).map_err(err)?);
                }
            }
        }
        drop(inner);
        for t in tickets {
            t.wait().map_err(err)?;
        }
        Ok(())
    }

    /// The store under the registry.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// One object with its resourceVersion, or `None`.
    pub fn get(&self, key: &str) -> Option<Value> {
        lock(&self.inner)
            .visible(key)
            .map(|s| with_rv(&s.obj, s.rv))
    }

    /// Every object whose key starts with `prefix`, and the list's
    /// resourceVersion.
    pub fn list(&self, prefix: &str) -> (Vec<Value>, u64) {
        let inner = lock(&self.inner);
        let mut items = Vec::new();
        inner.visible_range(prefix, |s| items.push(with_rv(&s.obj, s.rv)));
        (items, inner.durable_seq)
    }

    /// Calls `f` on every visible object whose key starts with `prefix`,
    /// without copying them (the registry is locked meanwhile: keep `f`
    /// short).
    pub fn scan(&self, prefix: &str, mut f: impl FnMut(&Value)) {
        lock(&self.inner).visible_range(prefix, |s| f(&s.obj));
    }

    /// [`Self::get`] from the latest state, durable or not: for what
    /// cloudcore itself passes on (attached mode writes what a node
    /// reported back to the API server as soon as it is folded; the node's
    /// records are durable already, and a crash folds them again).
    pub(crate) fn get_latest(&self, key: &str) -> Option<Value> {
        lock(&self.inner)
            .view
            .get(key)
            .map(|s| with_rv(&s.obj, s.rv))
    }

    /// [`Self::scan`] over the latest state, durable or not: for writers'
    /// decisions (the scheduler places pods on nodes whose readiness is
    /// still being recorded), never for what a reader is shown.
    pub(crate) fn scan_latest(&self, prefix: &str, mut f: impl FnMut(&Value)) {
        let inner = lock(&self.inner);
        for (_, s) in inner
            .view
            .range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
        {
            f(&s.obj);
        }
    }

    /// Whether a pod without a node may exist (set when one is stored,
    /// cleared by the scheduler after a pass that placed every pod).
    pub fn may_have_unscheduled(&self) -> bool {
        self.unscheduled.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn set_may_have_unscheduled(&self, v: bool) {
        self.unscheduled
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }

    /// Number of objects held.
    pub fn len(&self) -> usize {
        lock(&self.inner).view.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Lets watch history go once older than `window` (the retention).
    pub fn set_watch_window(&self, window: std::time::Duration) {
        self.hub.set_window(window);
    }

    /// Events after `rv` still held, and a receiver for the ones to come
    /// (subscribed first, so nothing falls between). `410 Gone` if `rv`
    /// is older than the history kept.
    pub fn watch(&self, rv: u64) -> Result<WatchStart, Status> {
        self.hub.watch(rv)
    }

    /// Changes `key` with `f` (given the current object with its
    /// resourceVersion) and returns once the change is durable: the new
    /// object (the deleted one, for a delete) with its resourceVersion,
    /// or `None` if `f` changed nothing.
    pub async fn write(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Value>) -> Result<Option<Write>, Status>,
    ) -> Result<Option<Value>, Status> {
        self.write_as(ACTOR, key, f).await
    }

    /// [`Self::write`] on behalf of `origin`, which the records carry (an
    /// API user is `user:<name>`, see [`user_origin`]).
    pub async fn write_as(
        &self,
        origin: &str,
        key: &str,
        f: impl FnOnce(Option<&Value>) -> Result<Option<Write>, Status>,
    ) -> Result<Option<Value>, Status> {
        self.room().await;
        let (out, done) = off_workers(|| self.prepare(origin, key, f))?;
        if let Some(done) = done {
            match done.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Status::internal(format!("log: {e}"))),
                Err(_) => return Err(Status::internal("registry stopped")),
            }
        }
        Ok(out)
    }

    /// Resolves once the queue of commits waiting for durability has
    /// room: what feeds the registry from a socket (an API write, a node's
    /// segment) waits for it first, so that queue stays bounded.
    pub async fn room(&self) {
        self.commits.room().await
    }

    /// [`Self::write`] without waiting for durability (for callers that
    /// cannot wait; the change is durable shortly after).
    pub fn submit(
        &self,
        key: &str,
        f: impl FnOnce(Option<&Value>) -> Result<Option<Write>, Status>,
    ) -> Result<Option<Value>, Status> {
        self.prepare(ACTOR, key, f).map(|(v, _)| v)
    }

    /// Records an event about `key` (an exec session's start or end) in
    /// `cluster`, for `keel audit`; it changes no object. Resolves once
    /// durable.
    pub fn record_event(
        &self,
        origin: &str,
        key: &str,
        payload: Vec<u8>,
    ) -> Result<oneshot::Receiver<Result<(), String>>, Status> {
        let mut inner = lock(&self.inner);
        let mut commit = Commit::new();
        self.append_cluster(
            &mut inner,
            &mut commit,
            Entry::new(origin, key, PayloadKind::Event, payload),
        )
        .map_err(|e| Status::internal(format!("log: {e}")))?;
        let (tx, rx) = oneshot::channel();
        commit.done = Some(tx);
        self.commits.push(commit);
        Ok(rx)
    }

    #[allow(clippy::type_complexity)]
    fn prepare(
        &self,
        origin: &str,
        key: &str,
        f: impl FnOnce(Option<&Value>) -> Result<Option<Write>, Status>,
    ) -> Result<(Option<Value>, Option<oneshot::Receiver<Result<(), String>>>), Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        let mut inner = lock(&self.inner);
        let old = inner.view.get(key).cloned();
        let current = old.as_ref().map(|s| with_rv(&s.obj, s.rv));
        let Some(write) = f(current.as_ref())? else {
            return Ok((None, None));
        };
        let seq = inner.next_seq;
        let mut commit = Commit::new();
        // From the `cluster` append on, the change has its seq: whatever
        // fails after it, the commit goes out (visible if it turns out
        // durable), so that resourceVersion stays the `cluster` seq.
        let (kind, obj, rest) = match write {
            Write::Put(mut new) => {
                strip_rv(&mut new);
                if key.starts_with("pods/") && str_at(&new, &["spec", "nodeName"]).is_none() {
                    self.set_may_have_unscheduled(true);
                }
                if old.as_ref().is_some_and(|o| *o.obj == new) {
                    return Ok((None, None));
                }
                let change = inner
                    .objects
                    .edit_replace(key, &self.actor, &new)
                    .map_err(|e| Status::internal(format!("object store: {e}")))?;
                let Some(change) = change else {
                    return Ok((None, None));
                };
                self.append_cluster(
                    &mut inner,
                    &mut commit,
                    Entry::new(origin, key, PayloadKind::Change, change.clone()),
                )
                .map_err(err)?;
                // The store's view is what the CRDT folded (identical to
                // `new` for a single writer; merged if an edge wrote too).
                let folded = inner.objects.get_json(key).unwrap_or(new);
                let obj = Arc::new(folded);
                let stored = Stored {
                    obj: obj.clone(),
                    rv: seq,
                };
                inner.stage(&mut commit, key, Some(stored), seq);
                let rest = self
                    .send_down(&mut inner, origin, key, &obj, Some(change))
                    .map(|t| commit.tickets.extend(t));
                let kind = if old.is_some() {
                    EventKind::Modified
                } else {
                    EventKind::Added
                };
                (kind, obj, rest)
            }
            Write::Delete => {
                let Some(old) = old else {
                    return Ok((None, None));
                };
                inner.objects.apply_tombstone(key);
                self.append_cluster(
                    &mut inner,
                    &mut commit,
                    Entry::new(origin, key, PayloadKind::Tombstone, Vec::new()),
                )
                .map_err(err)?;
                inner.stage(&mut commit, key, None, seq);
                let rest = self.unbind_deleted(&mut inner, origin, key, &old.obj);
                (
                    EventKind::Deleted,
                    old.obj,
                    rest.map(|t| commit.tickets.extend(t)),
                )
            }
        };
        let out = with_rv(&obj, seq);
        commit.events.push(Arc::new(WatchEvent {
            rv: seq,
            kind,
            key: key.to_owned(),
            object: obj,
        }));
        let (tx, rx) = oneshot::channel();
        commit.done = Some(tx);
        self.commits.push(commit);
        rest?;
        Ok((Some(out), Some(rx)))
    }

    /// Tombstones deleted `key` (which held `obj`) in the `down` stream of
    /// every node it was bound to, and unbinds what only it used there (a
    /// pod's configmaps and secrets, a device's model).
    fn unbind_deleted(
        &self,
        inner: &mut Inner,
        origin: &str,
        key: &str,
        obj: &Value,
    ) -> Result<Vec<Ticket<Cursor>>, Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        let mut tickets = Vec::new();
        if let Some(nodes) = inner.bound.remove(key) {
            for n in nodes {
                tickets.push(
                    self.store
                        .append_async(
                            &down_stream(&n),
                            vec![Entry::new(origin, key, PayloadKind::Tombstone, Vec::new())],
                        )
                        .map_err(err)?,
                );
            }
        }
        let ns = str_at(obj, &["metadata", "namespace"]).unwrap_or("default");
        for (kind, name) in refs(key, obj) {
            let k = format!("{kind}/{ns}/{name}");
            if let Some(used) = inner.view.get(&k).map(|s| s.obj.clone()) {
                tickets.extend(self.unbind_stale(inner, origin, &k, &used)?);
            }
        }
        Ok(tickets)
    }

    /// Appends `entry` to `cluster` as part of `commit`, and returns its seq
    /// (the resourceVersion). The seq is taken with the append, whatever
    /// fails after it, so that resourceVersion stays the `cluster` seq.
    fn append_cluster(
        &self,
        inner: &mut Inner,
        commit: &mut Commit,
        entry: Entry,
    ) -> Result<u64, keel_log::Error> {
        let ticket = self.store.append_async(CLUSTER_STREAM, vec![entry])?;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        commit.cluster.push((ticket, seq));
        Ok(seq)
    }

    /// Appends `key`'s change (or whole history, where a node has not had
    /// the object yet) to the `down` stream of every node it is bound to;
    /// binding a pod also sends the configmaps and secrets it uses.
    fn send_down(
        &self,
        inner: &mut Inner,
        origin: &str,
        key: &str,
        obj: &Value,
        change: Option<Vec<u8>>,
    ) -> Result<Vec<Ticket<Cursor>>, Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        let mut tickets = self.unbind_stale(inner, origin, key, obj)?;
        let targets = inner.targets(key, obj);
        let mut extra: Vec<(String, String)> = Vec::new();
        for node in targets {
            let down = down_stream(&node);
            if !inner.node_streams.contains(&down) {
                self.store
                    .create_stream(&down, Role::Writer, 1)
                    .map_err(err)?;
                self.store
                    .create_stream(&up_stream(&node), Role::Replica, 1)
                    .map_err(err)?;
                inner.node_streams.insert(down.clone());
            }
            let known = inner.bound.get(key).is_some_and(|s| s.contains(&node));
            // The change being written carries its author; the earlier
            // history resent on first binding is cloudcore's resend.
            let entries: Vec<Entry> = match (&change, known) {
                (Some(c), true) => vec![Entry::new(origin, key, PayloadKind::Change, c.clone())],
                _ => inner
                    .objects
                    .changes(key)
                    .into_iter()
                    .map(|c| {
                        let by = if change.as_ref() == Some(&c) {
                            origin
                        } else {
                            ACTOR
                        };
                        Entry::new(by, key, PayloadKind::Change, c)
                    })
                    .collect(),
            };
            tickets.push(self.store.append_async(&down, entries).map_err(err)?);
            inner
                .bound
                .entry(key.to_owned())
                .or_default()
                .insert(node.clone());
            {
                let ns = str_at(obj, &["metadata", "namespace"]).unwrap_or("default");
                for (kind, name) in refs(key, obj) {
                    let k = format!("{kind}/{ns}/{name}");
                    let has = inner.bound.get(&k).is_some_and(|s| s.contains(&node));
                    if !has && inner.view.contains_key(&k) {
                        extra.push((k, node.clone()));
                    }
                }
            }
        }
        for (k, node) in extra {
            let entries: Vec<Entry> = inner
                .objects
                .changes(&k)
                .into_iter()
                .map(|c| Entry::new(ACTOR, &k, PayloadKind::Change, c))
                .collect();
            tickets.push(
                self.store
                    .append_async(&down_stream(&node), entries)
                    .map_err(err)?,
            );
            inner.bound.entry(k).or_default().insert(node);
        }
        Ok(tickets)
    }

    /// Tombstones `key` (holding `obj`) in the `down` stream of every node
    /// that holds it but no longer should (a device moved to another node,
    /// a configmap no pod there uses any more).
    fn unbind_stale(
        &self,
        inner: &mut Inner,
        origin: &str,
        key: &str,
        obj: &Value,
    ) -> Result<Vec<Ticket<Cursor>>, Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        let targets = inner.targets(key, obj);
        let gone: Vec<String> = inner
            .bound
            .get(key)
            .map(|b| b.difference(&targets).cloned().collect())
            .unwrap_or_default();
        let mut tickets = Vec::new();
        for node in gone {
            tickets.push(
                self.store
                    .append_async(
                        &down_stream(&node),
                        vec![Entry::new(origin, key, PayloadKind::Tombstone, Vec::new())],
                    )
                    .map_err(err)?,
            );
            if let Some(b) = inner.bound.get_mut(key) {
                b.remove(&node);
            }
        }
        Ok(tickets)
    }

    /// How many objects [`Self::rebase_long_histories`] rebased since start.
    pub fn rebased_total(&self) -> u64 {
        self.rebased.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the registry's document of `key` holds the change `hash`
    /// (compaction of a node's `up` stream keeps only those).
    pub fn holds_change(&self, key: &str, hash: &[u8; 32]) -> bool {
        lock(&self.inner).objects.has_change(key, hash)
    }

    /// Rebases every object whose document holds at least `min_history`
    /// changes (see `keel_sync::crdt`): its history is replaced by one
    /// root holding its value, recorded in `cluster` and sent to every node
    /// that holds it, in order after everything sent before. No value
    /// changes: no watch event, and the object keeps its resourceVersion
    /// (a restart that finds the root in a compaction snapshot gives the
    /// object the root's seq). Returns how many objects were rebased.
    pub fn rebase_long_histories(&self, min_history: usize) -> usize {
        let min_history = min_history.max(2);
        let inner = lock(&self.inner);
        let keys: Vec<String> = inner
            .view
            .keys()
            .filter(|k| inner.objects.op_count(k) >= min_history as u64)
            .filter(|k| inner.objects.history_len(k) >= min_history)
            .cloned()
            .collect();
        self.rebase_in(inner, keys)
    }

    /// Rebases the objects at `keys` (those with more than one change),
    /// as [`Registry::rebase_long_histories`] does: for a node taken over
    /// from another replica, whose changes built on this replica's older
    /// documents must not apply any more (they become dead history).
    pub fn rebase_keys(&self, keys: Vec<String>) -> usize {
        let inner = lock(&self.inner);
        self.rebase_in(inner, keys)
    }

    fn rebase_in(&self, mut inner: std::sync::MutexGuard<'_, Inner>, keys: Vec<String>) -> usize {
        let mut commit = Commit::new();
        let mut rebased = 0;
        for key in keys {
            let root = match inner.objects.rebase(&key, &self.actor) {
                Ok(Some(root)) => root,
                Ok(None) => continue,
                Err(e) => {
                    warn!(%key, error = %e, "could not rebase an object");
                    continue;
                }
            };
            let entry = Entry::new(ACTOR, &key, PayloadKind::Change, root);
            if let Err(e) = self.append_cluster(&mut inner, &mut commit, entry.clone()) {
                warn!(%key, error = %e, "could not record a rebase");
                break;
            }
            let nodes: Vec<String> = inner
                .bound
                .get(&key)
                .map(|b| b.iter().cloned().collect())
                .unwrap_or_default();
            for node in nodes {
                match self
                    .store
                    .append_async(&down_stream(&node), vec![entry.clone()])
                {
                    Ok(t) => commit.tickets.push(t),
                    Err(e) => warn!(%key, %node, error = %e, "could not send a rebase"),
                }
            }
            rebased += 1;
        }
        self.rebased
            .fetch_add(rebased as u64, std::sync::atomic::Ordering::Relaxed);
        if !commit.cluster.is_empty() {
            info!(objects = rebased, "rebased long object histories");
            self.commits.push(commit);
        }
        rebased
    }

    /// Forgets the memory of objects deleted before the previous call
    /// (their dead history; see [`ObjectStore::forget_deleted`]). Returns
    /// how many.
    pub fn forget_deleted(&self) -> usize {
        let n = lock(&self.inner).objects.forget_deleted();
        if n > 0 {
            debug!(objects = n, "forgot deleted objects");
        }
        n
    }

    /// Records node `node` reported (durable in its `up` stream): folded
    /// into the objects bound to it, each new change re-recorded in the
    /// `cluster` stream. Changes to objects not bound to the node (other
    /// than its own Node object) are refused.
    ///
    /// Returns the keys of the objects that changed, in the order their
    /// first change arrived.
    pub fn apply_from_node(&self, node: &str, records: &[Record]) -> Vec<String> {
        self.fold_node(node, records, false)
    }

    /// Checks records of node `node`'s `up` stream before they are kept
    /// (see `keel_sync::quic::Sink::admit`; the link has already checked
    /// their origin and actor): a node writes only the status of its own
    /// Node and of the pods and devices bound to it — never a shared object
    /// (configmap, secret, device model: cloud changes to those never
    /// depend on a node's change), never another node, never a deletion.
    /// A pod or device no longer bound to the node passes (a race with a
    /// delete or a move; its change is ignored when folded). Event records
    /// (readings, MQTT uploads) fold into nothing and pass on any key.
    pub fn admit_from_node(&self, node: &str, records: &[Record]) -> Result<(), Refusal> {
        let own = format!("nodes/{node}");
        let mut changes: BTreeMap<&str, Vec<&[u8]>> = BTreeMap::new();
        for r in records {
            // Events (readings, MQTT uploads) fold into no object: any key.
            if r.kind == PayloadKind::Event {
                continue;
            }
            let writable =
                r.key == own || r.key.starts_with("pods/") || r.key.starts_with(DEVICES_PREFIX);
            if !writable {
                return Err(Refusal::forbidden(format!(
                    "record {}: node {node:?} may not write {} (a node writes the status of its own Node and of the pods and devices bound to it)",
                    r.seq, r.key
                )));
            }
            match r.kind {
                PayloadKind::Tombstone => {
                    return Err(Refusal::forbidden(format!(
                        "record {}: node {node:?} may not delete {}",
                        r.seq, r.key
                    )));
                }
                PayloadKind::Change if keel_sync::crdt::is_rebase(&r.payload) => {
                    return Err(Refusal::forbidden(format!(
                        "record {}: node {node:?} may not rebase {} (only cloudcore compacts histories)",
                        r.seq, r.key
                    )));
                }
                PayloadKind::Change => changes.entry(&r.key).or_default().push(&r.payload),
                PayloadKind::Event => {}
            }
        }
        let inner = lock(&self.inner);
        for (key, changes) in changes {
            let bound = key == own || inner.bound.get(key).is_some_and(|s| s.contains(node));
            let Some(before) = inner.objects.get_json(key).filter(|_| bound) else {
                continue;
            };
            match inner.objects.preview(key, changes) {
                Ok(Some(after)) if !same_but_status(&before, &after) => {
                    return Err(Refusal::forbidden(format!(
                        "node {node:?} may not write {key} beyond its status (it changes other fields)"
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Refusal::forbidden(format!(
                        "node {node:?} sent a change to {key} that cannot be applied: {e}"
                    )));
                }
            }
        }
        Ok(())
    }

    fn fold_node(&self, node: &str, records: &[Record], refold: bool) -> Vec<String> {
        let mut changed: Vec<String> = Vec::new();
        let mut inner = lock(&self.inner);
        let mut commit = Commit::new();
        let own_node = format!("nodes/{node}");
        // Batched per object: each object's changes in these records are
        // applied in one call, its JSON view is read once and it gets one
        // watch event (objects are independent CRDTs, so the order across
        // objects does not matter; within one it is the records' order).
        let mut per_key: Vec<(&str, Vec<&Record>)> = Vec::new();
        let mut slot: HashMap<&str, usize> = HashMap::new();
        for r in records.iter().filter(|r| r.kind == PayloadKind::Change) {
            let i = *slot.entry(&r.key).or_insert_with(|| {
                per_key.push((&r.key, Vec::new()));
                per_key.len() - 1
            });
            if let Some((_, rs)) = per_key.get_mut(i) {
                rs.push(r);
            }
        }
        for (key, recs) in per_key {
            let allowed = key == own_node || inner.bound.get(key).is_some_and(|s| s.contains(node));
            if !allowed {
                // (Also every record of a deleted object that a re-fold
                // on start-up meets again: harmless, hence debug there.)
                if refold {
                    debug!(%node, %key, "a node's change to an object no longer bound to it");
                } else {
                    warn!(%node, %key, "node wrote an object not bound to it; ignored");
                }
                continue;
            }
            let before = inner.view.get(key).map(|s| s.obj.clone());
            let results = inner
                .objects
                .apply_changes(key, recs.iter().map(|r| &*r.payload));
            let mut seq = None;
            for (r, applied) in recs.iter().zip(results) {
                match applied {
                    Ok(Applied::New) => {}
                    Ok(_) => continue,
                    Err(e) => {
                        warn!(%node, %key, error = %e, "node change unusable; ignored");
                        continue;
                    }
                }
                let entry = Entry::new(node, key, PayloadKind::Change, r.payload.clone());
                match self.append_cluster(&mut inner, &mut commit, entry) {
                    Ok(s) => seq = Some(s),
                    Err(e) => warn!(%node, error = %e, "could not record a node change"),
                }
            }
            let Some(mut seq) = seq else {
                continue;
            };
            let Some(mut obj) = inner.objects.get_json(key) else {
                continue;
            };
            // A node owns only the status of what is bound to it: anything
            // else it changed is put back by a cloud change right after
            // (the node's change stays in the log, history is never
            // rewritten; the correction reaches the node like any change).
            if let Some(before) = &before
                && !same_but_status(before, &obj)
            {
                warn!(%node, %key, "node changed fields it does not own; the cloud puts them back");
                let mut fixed = (**before).clone();
                match (fixed.as_object_mut(), obj.get("status")) {
                    (Some(f), Some(st)) => {
                        f.insert("status".into(), st.clone());
                    }
                    (Some(f), None) => {
                        f.remove("status");
                    }
                    _ => {}
                }
                match self.correct(&mut inner, &mut commit, key, &fixed) {
                    Ok(Some(s)) => {
                        seq = s;
                        obj = inner.objects.get_json(key).unwrap_or(fixed);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        warn!(%node, %key, error = %e, "could not put back the fields")
                    }
                }
            }
            let existed = inner.view.contains_key(key);
            changed.push(key.to_owned());
            let obj = Arc::new(obj);
            let stored = Stored {
                obj: obj.clone(),
                rv: seq,
            };
            inner.stage(&mut commit, key, Some(stored), seq);
            commit.events.push(Arc::new(WatchEvent {
                rv: seq,
                kind: if existed {
                    EventKind::Modified
                } else {
                    EventKind::Added
                },
                key: key.to_owned(),
                object: obj,
            }));
        }
        if !commit.cluster.is_empty() {
            debug!(%node, changes = commit.events.len(), "folded node changes");
        }
        // Sent even with nothing to record: it marks the records folded
        // once everything before it is durable (commits complete in order).
        commit.folded = records.last().map(|r| (node.to_owned(), r.seq));
        if commit.folded.is_some() {
            self.commits.push(commit);
        }
        changed
    }

    /// Folds every record of every node's `up` stream that the registry
    /// has not folded yet (a crash can come between a node's records
    /// being durable, and acknowledged, and their fold into `cluster`).
    /// Records already folded are recognised by the CRDT and skipped.
    fn refold_up(&self) -> Result<(), Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        let nodes: Vec<String> = self
            .store
            .streams()
            .into_iter()
            .filter_map(|s| s.name.strip_suffix("/up").map(str::to_owned))
            .collect();
        for node in nodes {
            let up = up_stream(&node);
            let mut after = 0;
            loop {
                let seg = match self
                    .store
                    .read(&up, after, ReadLimits::default())
                    .map_err(err)?
                {
                    Read::Records(s) => s,
                    Read::Snapshot { snapshot, tail } => {
                        // Compaction folded only what was folded here.
                        let mut inner = lock(&self.inner);
                        let f = inner.folded.entry(node.clone()).or_default();
                        *f = (*f).max(snapshot.base.seq);
                        tail
                    }
                };
                let Some(last) = seg.records.last() else {
                    break;
                };
                after = last.seq;
                let changed = self.fold_node(&node, &seg.records, true);
                if !changed.is_empty() {
                    info!(%node, objects = changed.len(), "folded node changes a crash had left out");
                }
            }
        }
        Ok(())
    }

    /// The last seq of `node`'s `up` stream whose fold into `cluster` is
    /// durable: what compaction of `up` may fold away (0 before anything).
    pub fn folded_up(&self, node: &str) -> u64 {
        lock(&self.inner).folded.get(node).copied().unwrap_or(0)
    }

    /// Names of the edge nodes this cloudcore holds streams for.
    pub fn nodes(&self) -> Vec<String> {
        lock(&self.inner)
            .node_streams
            .iter()
            .filter_map(|s| s.strip_suffix("/down").map(str::to_owned))
            .collect()
    }

    /// Writes `fixed` as the cloud's change to `key` (in `cluster` and the
    /// bound nodes' `down`) into `commit`; its seq, or `None` if nothing
    /// differed.
    fn correct(
        &self,
        inner: &mut Inner,
        commit: &mut Commit,
        key: &str,
        fixed: &Value,
    ) -> Result<Option<u64>, Status> {
        let err = |e: keel_log::Error| Status::internal(format!("log: {e}"));
        let Some(change) = inner
            .objects
            .edit_replace(key, &self.actor, fixed)
            .map_err(|e| Status::internal(format!("object {key}: {e}")))?
        else {
            return Ok(None);
        };
        let seq = self
            .append_cluster(
                inner,
                commit,
                Entry::new(ACTOR, key, PayloadKind::Change, change.clone()),
            )
            .map_err(err)?;
        // (On failure here the correction has its seq all the same.)
        match self.send_down(inner, ACTOR, key, fixed, Some(change)) {
            Ok(t) => commit.tickets.extend(t),
            Err(e) => warn!(key, error = %e, "could not send a correction down"),
        }
        Ok(Some(seq))
    }

    /// Node `node` connected (`ready`) or lost its connection: its Node
    /// object is created if new and its Ready condition set. Pods on a
    /// node that is not ready stay where they are (edge autonomy).
    pub fn node_ready(&self, node: &str, ready: bool) {
        let key = format!("nodes/{node}");
        let now = now_rfc3339();
        let (status, reason, message) = ready_condition(ready);
        let node_name = node.to_owned();
        let r = self.submit(&key, move |old| {
            let mut obj = match old {
                Some(o) => o.clone(),
                None => new_meta(
                    json!({"apiVersion": "v1", "kind": "Node",
                        "metadata": {"name": node_name, "labels": {
                            "kubernetes.io/hostname": node_name,
                            "node-role.kubernetes.io/edge": ""}},
                        "spec": {}, "status": {}}),
                    None,
                ),
            };
            let mut conds: Vec<Value> = obj
                .pointer("/status/conditions")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let prev = conds
                .iter()
                .find(|c| c.get("type") == Some(&json!("Ready")))
                .cloned();
            let transition = match &prev {
                Some(p) if p.get("status") == Some(&json!(status)) => {
                    p.get("lastTransitionTime").cloned().unwrap_or(json!(now))
                }
                _ => json!(now),
            };
            conds.retain(|c| c.get("type") != Some(&json!("Ready")));
            conds.push(json!({"type": "Ready", "status": status, "reason": reason,
                "message": message, "lastHeartbeatTime": now, "lastTransitionTime": transition}));
            if let Some(st) = obj.get_mut("status").and_then(Value::as_object_mut) {
                st.insert("conditions".into(), Value::Array(conds));
            } else if let Some(o) = obj.as_object_mut() {
                o.insert("status".into(), json!({"conditions": conds}));
            }
            Ok(Some(Write::Put(obj)))
        });
        if let Err(e) = r {
            warn!(%node, error = %e, "could not record node readiness");
        }
        if !ready {
            return;
        }
        // The node's Lease in kube-node-lease (what `kubectl describe node`
        // shows): renewed when the node connects. Liveness in between is
        // the connection's (QUIC keep-alive), not logged.
        let lease_key = format!("leases.coordination.k8s.io/kube-node-lease/{node}");
        let micro = now_rfc3339_micro();
        let node_name = node.to_owned();
        let r = self.submit(&lease_key, move |old| {
            let mut obj = match old {
                Some(o) => o.clone(),
                None => new_meta(
                    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                        "metadata": {"name": node_name, "namespace": "kube-node-lease"},
                        "spec": {"holderIdentity": node_name, "leaseDurationSeconds": 40,
                            "acquireTime": micro}}),
                    Some("kube-node-lease"),
                ),
            };
            if let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) {
                spec.insert("renewTime".into(), json!(micro));
            }
            Ok(Some(Write::Put(obj)))
        });
        if let Err(e) = r {
            warn!(%node, error = %e, "could not renew the node lease");
        }
    }
}

/// A node's Ready condition from its connection: (status, reason,
/// message). The same in both modes.
pub fn ready_condition(connected: bool) -> (&'static str, &'static str, &'static str) {
    if connected {
        (
            "True",
            "EdgeConnected",
            "edgecore is connected to cloudcore",
        )
    } else {
        (
            "Unknown",
            "EdgeDisconnected",
            "edgecore lost its connection to cloudcore; its pods keep running",
        )
    }
}

/// Whether `a` and `b` agree on everything but `status` (what a node must
/// not change); compared in place, no copies.
fn same_but_status(a: &Value, b: &Value) -> bool {
    match (a.as_object(), b.as_object()) {
        (Some(a), Some(b)) => {
            let others =
                |m: &serde_json::Map<String, Value>| m.keys().filter(|k| *k != "status").count();
            others(a) == others(b)
                && a.iter()
                    .filter(|(k, _)| *k != "status")
                    .all(|(k, v)| b.get(k) == Some(v))
        }
        _ => a == b,
    }
}

/// Publishes commits in order once durable: their events go to watchers
/// and their changes become visible to get and list. A failed commit
/// (the store is then poisoned) publishes nothing.
async fn publish(reg: std::sync::Weak<Registry>, mut rx: Commits<Commit>) {
    while let Some(c) = rx.recv().await {
        let mut result = Ok(());
        let mut last = 0;
        for (t, want) in c.cluster {
            match t.await {
                Ok(cursor) => {
                    if cursor.seq != want {
                        // Never expected: every `cluster` append goes
                        // through the registry in seq order.
                        tracing::error!(
                            got = cursor.seq,
                            want,
                            "a cluster record got another seq than its resourceVersion"
                        );
                    }
                    last = cursor.seq;
                }
                Err(e) => result = Err(e.to_string()),
            }
        }
        for t in c.tickets {
            if let Err(e) = t.await {
                result = Err(e.to_string());
            }
        }
        let Some(reg) = reg.upgrade() else {
            return;
        };
        if result.is_ok() {
            let mut inner = lock(&reg.inner);
            // Under the lock, so that a list and its resourceVersion are
            // of one moment and a watch from it misses nothing.
            reg.hub.publish(c.events);
            inner.make_visible(c.visible);
            inner.durable_seq = inner.durable_seq.max(last);
            if let Some((node, seq)) = c.folded {
                let f = inner.folded.entry(node).or_default();
                *f = (*f).max(seq);
            }
        } else {
            warn!(error = ?result, "a commit failed: the log store is poisoned; its changes stay unseen");
        }
        if let Some(done) = c.done {
            let _ = done.send(result);
        }
    }
}

/// Fills in the server-set metadata of a new object: uid,
/// creationTimestamp, generation, namespace.
pub fn new_meta(mut obj: Value, namespace: Option<&str>) -> Value {
    let seed = format!(
        "{}{}",
        obj.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default(),
        time::OffsetDateTime::now_utc().unix_timestamp_nanos()
    );
    let h = blake3::hash(seed.as_bytes()).to_hex();
    let h = h.as_str();
    let uid = format!(
        "{}-{}-{}-{}-{}",
        h.get(0..8).unwrap_or_default(),
        h.get(8..12).unwrap_or_default(),
        h.get(12..16).unwrap_or_default(),
        h.get(16..20).unwrap_or_default(),
        h.get(20..32).unwrap_or_default()
    );
    if let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        m.insert("uid".into(), json!(uid));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        if let Some(ns) = namespace {
            m.insert("namespace".into(), json!(ns));
        }
        m.remove("resourceVersion");
    }
    if obj.get("spec").is_some()
        && let Some(m) = obj.get_mut("metadata").and_then(Value::as_object_mut)
    {
        m.insert("generation".into(), json!(1));
    }
    obj
}

/// The resource type and namespace/name of a registry key.
pub fn parse_key(key: &str) -> Option<(&'static ResourceType, Option<&str>, &str)> {
    let rt = resources::of_key(key)?;
    let rest = key.get(rt.qualified().len() + 1..)?;
    if rt.namespaced {
        let (ns, name) = rest.split_once('/')?;
        Some((rt, Some(ns), name))
    } else {
        Some((rt, None, rest))
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]
mod tests {
    use super::*;
    use keel_log::StoreOptions;

    fn cm(name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "default"}, "data": {"k": name}})
    }

    fn listed(reg: &Registry, key: &str) -> bool {
        let mut found = false;
        reg.scan("configmaps/", |o| {
            let name = o.pointer("/metadata/name").and_then(Value::as_str);
            found |= name.is_some_and(|n| key.ends_with(&format!("/{n}")));
        });
        let (items, _) = reg.list("configmaps/");
        let in_list = items.iter().any(|o| {
            o.pointer("/metadata/name")
                .and_then(Value::as_str)
                .is_some_and(|n| key.ends_with(&format!("/{n}")))
        });
        assert_eq!(found, in_list, "scan and list disagree on {key}");
        in_list
    }

    /// An object with a long history is rebased: its value and
    /// resourceVersion stay, its history becomes one root, the root goes
    /// to the node that holds it, and a restart rebuilds the same objects.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_histories_are_rebased_and_sent_down() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let reg = Registry::open(store.clone()).unwrap();
        let key = "pods/default/p";
        let mut rv = 0;
        for i in 0..40 {
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "p", "namespace": "default", "labels": {"i": i.to_string()}},
                "spec": {"nodeName": "edge-1", "containers": [{"name": "c", "image": "x"}]}});
            let o = reg
                .write(key, |_| Ok(Some(Write::Put(new_meta(pod, None)))))
                .await
                .unwrap()
                .unwrap();
            rv = o["metadata"]["resourceVersion"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
        }
        let before = reg.get(key).unwrap();
        assert_eq!(lock(&reg.inner).objects.history_len(key), 40);
        // Short histories (the namespaces) are left alone.
        assert_eq!(reg.rebase_long_histories(100), 0);
        assert_eq!(reg.rebase_long_histories(30), 1);
        assert_eq!(lock(&reg.inner).objects.history_len(key), 1);
        // Durable once a later write is.
        reg.write("configmaps/default/after", |_| {
            Ok(Some(Write::Put(new_meta(cm("after"), None))))
        })
        .await
        .unwrap();
        assert_eq!(
            reg.get(key).unwrap(),
            before,
            "same value, same resourceVersion"
        );
        assert_eq!(before["metadata"]["resourceVersion"], rv.to_string());
        let read = |stream: &str| match store.read(stream, 0, ReadLimits::default()).unwrap() {
            Read::Records(seg) => seg.records,
            Read::Snapshot { tail, .. } => tail.records,
        };
        let down = read("edge-1/down");
        let last = down.iter().rev().find(|r| r.key == key).unwrap();
        assert!(
            keel_sync::crdt::is_rebase(&last.payload),
            "the root went down"
        );
        // A node that folds its down stream holds the same value.
        let mut edge = ObjectStore::new();
        for r in &down {
            apply_record(&mut edge, r).unwrap();
        }
        assert_eq!(
            edge.get_json(key).map(|mut v| {
                strip_rv(&mut v);
                v
            }),
            {
                let mut b = before.clone();
                strip_rv(&mut b);
                Some(b)
            }
        );
        assert_eq!(edge.history_len(key), 1);
        assert_eq!(reg.rebased_total(), 1);
        drop(reg);
        let again = Registry::open(store).unwrap();
        assert_eq!(again.get(key).unwrap(), before);
    }

    /// A failed fsync during a create (or a delete) leaves nothing visible:
    /// the object is not got, listed or watched (for a delete: it is still
    /// there), and the list's resourceVersion never passes the last
    /// durable seq. Every group commit in turn is made to fail.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_is_never_seen() {
        let mut failed_creates = 0;
        let mut failed_deletes = 0;
        for group in 1..40 {
            let dir = tempfile::tempdir().unwrap();
            let opts = StoreOptions {
                fail_sync_at_group: Some(group),
                ..StoreOptions::default()
            };
            let store = Store::open(dir.path(), opts).unwrap();
            let Ok(reg) = Registry::open(store) else {
                continue; // the failure hit the registry's own start-up
            };
            let (_, rv0) = reg.list("configmaps/");
            let (mut watched, mut rx) = reg.watch(rv0).unwrap();
            let mut durable = rv0;
            let mut seen_fail = None;
            'ops: for i in 0..30 {
                let key = format!("configmaps/default/c{i}");
                match reg
                    .write(&key, |_| {
                        Ok(Some(Write::Put(new_meta(cm(&format!("c{i}")), None))))
                    })
                    .await
                {
                    Ok(Some(o)) => {
                        assert!(reg.get(&key).is_some() && listed(&reg, &key));
                        durable = o["metadata"]["resourceVersion"]
                            .as_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                    }
                    Ok(None) => panic!("nothing written"),
                    Err(_) => {
                        assert!(reg.get(&key).is_none(), "failed create is visible");
                        assert!(!listed(&reg, &key), "failed create is listed");
                        failed_creates += 1;
                        seen_fail = Some((key, EventKind::Added));
                        break 'ops;
                    }
                }
                if i % 2 == 1 {
                    match reg.write(&key, |_| Ok(Some(Write::Delete))).await {
                        Ok(_) => assert!(reg.get(&key).is_none() && !listed(&reg, &key)),
                        Err(_) => {
                            assert!(reg.get(&key).is_some(), "failed delete is visible");
                            assert!(listed(&reg, &key), "failed delete hides the object");
                            failed_deletes += 1;
                            seen_fail = Some((key, EventKind::Deleted));
                            break 'ops;
                        }
                    }
                }
                let (_, rv) = reg.list("configmaps/");
                assert!(rv >= durable);
            }
            let Some((key, kind)) = seen_fail else {
                continue;
            };
            // Let the publisher finish whatever it still holds.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let head = reg.store().info(CLUSTER_STREAM).unwrap().head.seq;
            assert!(head >= durable);
            let durable = head;
            let (_, rv) = reg.list("configmaps/");
            assert!(
                rv <= durable,
                "list resourceVersion {rv} past durable {durable}"
            );
            while let Ok(e) = rx.try_recv() {
                watched.push(e);
            }
            for e in watched {
                assert!(e.rv <= durable, "watched {} past durable {durable}", e.rv);
                assert!(
                    !(e.key == key && e.kind == kind),
                    "the failed change was watched"
                );
            }
        }
        assert!(
            failed_creates > 0 && failed_deletes > 0,
            "no injected failure hit a create and a delete: {failed_creates} / {failed_deletes}"
        );
    }
}
