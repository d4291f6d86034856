//! Scale-out: several cloudcore replicas attached to one cluster share its
//! edge nodes by Leases (`coordination.k8s.io/v1`), the API server being the
//! only thing they agree through.
//!
//! - Nodes fall into a fixed number of shards (`shard_of`: BLAKE3 of the
//!   node name). Each shard has a Lease `keel-shard-<n>` whose holder is the
//!   replica that owns the shard's nodes; its annotation names the address
//!   edges reach that replica's hub at.
//! - Each replica renews a Lease `keel-replica-<id>` of its own. The live
//!   replicas (those whose Lease moved within its duration, as this replica
//!   observed it: no clock is compared with another's) split the shards
//!   evenly: each holds at most ⌈shards / live⌉. One above its share gives
//!   back one shard per pass, so a new replica takes shards over gradually
//!   rather than in a reconnect storm; one below takes free shards (never
//!   held, given back, or whose holder stopped renewing for a whole
//!   duration).
//! - A replica owns a shard only while its own renewals succeed: past one
//!   lease duration since the start of its last successful renewal, less one
//!   renewal interval, it stops, before any other replica can see the lease
//!   expire. Its connected nodes of a shard it lost or gave back are closed
//!   with `MOVED` (the new holder's address) or `UNAVAILABLE`.
//! - A shard's `leaseTransitions` counts its holders; the holder writes its
//!   nodes' `down` streams in epoch `leaseTransitions + 1`, above every
//!   earlier holder's, so a node that comes over installs the new holder's
//!   snapshot (the hub's `take_over`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use kube::api::{ListParams, PostParams};
use serde::Deserialize;
use serde_json::json;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::lock;
use crate::api::registry::now_rfc3339_micro;
use crate::hub::{HubHandle, Route, Router};

/// The label on keel's Leases, whose value says which kind.
const KIND_LABEL: &str = "lease.keel.io/kind";
/// The annotation with the holder's hub address (host:port).
const ADDRESS: &str = "lease.keel.io/hub-address";

/// The `kubernetes.replica` section: this cloudcore is one of several.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReplicaConfig {
    /// This replica's name, unique among the cluster's replicas.
    pub id: String,
    /// Where edges reach this replica's hub (host:port); default: the
    /// address the hub is bound to, which must then not be a wildcard.
    #[serde(default)]
    pub advertise: Option<String>,
    /// Number of shards; the same for every replica of a cluster.
    #[serde(default = "default_shards")]
    pub shards: u32,
    /// Seconds a Lease lasts unrenewed; renewals come three times in it.
    #[serde(default = "default_lease_seconds")]
    pub lease_seconds: u64,
    /// The namespace of keel's Leases.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_shards() -> u32 {
    32
}

fn default_lease_seconds() -> u64 {
    15
}

fn default_namespace() -> String {
    "kube-system".to_owned()
}

impl ReplicaConfig {
    pub fn new(id: impl Into<String>) -> Self {
        ReplicaConfig {
            id: id.into(),
            advertise: None,
            shards: default_shards(),
            lease_seconds: default_lease_seconds(),
            namespace: default_namespace(),
        }
    }
}

/// The shard node `node` falls into, out of `shards`.
pub fn shard_of(node: &str, shards: u32) -> u32 {
    let h = blake3::hash(node.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(h.as_bytes().get(..8).unwrap_or(&[0; 8]));
    u32::try_from(u64::from_le_bytes(b) % u64::from(shards.max(1))).unwrap_or(0)
}

/// A shard as one pass sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardView {
    pub shard: u32,
    /// Its live holder (`None`: never held, given back, or expired).
    pub holder: Option<String>,
}

/// What one pass does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub renew: Vec<u32>,
    pub release: Option<u32>,
    pub acquire: Vec<u32>,
}

/// This replica's moves, given the shards and the number of live replicas
/// (itself included): keep its share, give back one shard above it, take
/// free ones up to it (starting at a place of its own, so that replicas
/// starting together try different ones first).
pub fn plan(me: &str, views: &[ShardView], live: usize) -> Plan {
    let total = views.len();
    let share = total.div_ceil(live.max(1));
    let mine: Vec<u32> = views
        .iter()
        .filter(|v| v.holder.as_deref() == Some(me))
        .map(|v| v.shard)
        .collect();
    let mut p = Plan {
        renew: mine.clone(),
        ..Plan::default()
    };
    if mine.len() > share {
        p.release = mine.last().copied();
        p.renew.pop();
    } else if mine.len() < share && total > 0 {
        let start =
            usize::try_from(shard_of(me, u32::try_from(total).unwrap_or(u32::MAX))).unwrap_or(0);
        p.acquire = (0..total)
            .filter_map(|i| views.get((start + i) % total))
            .filter(|v| v.holder.is_none())
            .map(|v| v.shard)
            .take(share - mine.len())
            .collect();
    }
    p
}

/// A shard in the routing table.
#[derive(Clone, Debug)]
struct Held {
    replica: String,
    addr: String,
    epoch: u64,
    /// For this replica's own shards: until when (ms on its clock) it may
    /// act as owner.
    mine_until: Option<u64>,
}

/// One of keel's Leases as a pass read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    pub name: String,
    /// `Some(n)`: shard n's; `None`: a replica's.
    pub shard: Option<u32>,
    pub holder: Option<String>,
    /// The API server's resourceVersion: a write names it (409 if stale).
    pub version: String,
    pub duration_ms: u64,
    pub transitions: u64,
    /// The holder's hub address.
    pub addr: String,
}

/// A Lease write one pass decides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LeaseWrite {
    /// Renew this replica's shard (its Lease at `version`).
    Renew { shard: u32, version: String },
    /// Take a free or lapsed shard (`version: None`: its Lease does not
    /// exist yet); the holder count becomes `transitions`.
    Take {
        shard: u32,
        version: Option<String>,
        transitions: u64,
    },
    /// Give a shard back.
    Release { shard: u32, version: String },
}

/// One replica's ownership logic without I/O (what `Shards` runs against
/// the API server and the replica simulator against its own lease store):
/// time is milliseconds of the replica's own monotonic clock.
#[derive(Debug)]
pub struct ShardCore {
    id: String,
    addr: String,
    shards: u32,
    lease_ms: u64,
    renew_ms: u64,
    /// Lease name → (version, when this replica saw it change).
    seen: BTreeMap<String, (String, u64)>,
    table: BTreeMap<u32, Held>,
    /// When the pass under way started.
    started: u64,
}

impl ShardCore {
    pub fn new(id: &str, addr: &str, shards: u32, lease_ms: u64) -> ShardCore {
        ShardCore {
            id: id.to_owned(),
            addr: addr.to_owned(),
            shards: shards.max(1),
            lease_ms: lease_ms.max(3),
            renew_ms: lease_ms.max(3) / 3,
            seen: BTreeMap::new(),
            table: BTreeMap::new(),
            started: 0,
        }
    }

    /// Milliseconds between passes: a third of a lease.
    pub fn renew_ms(&self) -> u64 {
        self.renew_ms
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// Where `node`'s connection belongs at `now`.
    pub fn route(&self, node: &str, now: u64) -> Route {
        let shard = shard_of(node, self.shards);
        match self.table.get(&shard) {
            Some(h) if h.replica == self.id => match h.mine_until {
                Some(t) if t > now => Route::Here { epoch: h.epoch },
                _ => Route::Nobody,
            },
            Some(h) if !h.addr.is_empty() => Route::Elsewhere {
                replica: h.replica.clone(),
                addr: h.addr.clone(),
            },
            _ => Route::Nobody,
        }
    }

    /// The replica holding `node`'s shard, as last read.
    pub fn owner_of(&self, node: &str) -> Option<String> {
        let shard = shard_of(node, self.shards);
        self.table.get(&shard).map(|h| h.replica.clone())
    }

    /// The shards this replica may act as owner of at `now`.
    pub fn owned(&self, now: u64) -> BTreeSet<u32> {
        self.table
            .iter()
            .filter(|(_, h)| h.replica == self.id && h.mine_until.is_some_and(|t| t > now))
            .map(|(s, _)| *s)
            .collect()
    }

    /// The shards this replica may act as owner of at `now`, with the
    /// epoch it owns each in. A shard whose epoch changed between two
    /// looks was lost in between (its Lease lapsed and was taken again):
    /// what its nodes sent meanwhile was not written to the cluster, so
    /// they must come back through a takeover.
    pub fn owned_epochs(&self, now: u64) -> BTreeMap<u32, u64> {
        self.table
            .iter()
            .filter(|(_, h)| h.replica == self.id && h.mine_until.is_some_and(|t| t > now))
            .map(|(s, h)| (*s, h.epoch))
            .collect()
    }

    /// The shards lost between two looks at [`ShardCore::owned_epochs`]:
    /// no longer owned, or owned again in a new epoch.
    pub fn lost_between(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> BTreeSet<u32> {
        before
            .iter()
            .filter(|(s, e)| after.get(*s) != Some(*e))
            .map(|(s, _)| *s)
            .collect()
    }

    /// Forgets every shard (a replica that stops).
    pub fn clear(&mut self) {
        self.table.clear();
    }

    /// Whether a Lease held by another replica lapsed at `now`: unchanged
    /// for its duration since this replica saw it change.
    fn lapsed(&self, l: &LeaseRecord, now: u64) -> bool {
        self.seen
            .get(&l.name)
            .is_none_or(|(_, at)| now.saturating_sub(*at) > l.duration_ms)
    }

    /// A pass that started at `started` read `leases` at `now`: the writes
    /// to make, in order (`written` is told each one's outcome). A shard
    /// given back stops being this replica's at once.
    pub fn pass(&mut self, leases: &[LeaseRecord], started: u64, now: u64) -> Vec<LeaseWrite> {
        self.started = started;
        for l in leases {
            if self.seen.get(&l.name).is_none_or(|(v, _)| *v != l.version) {
                self.seen.insert(l.name.clone(), (l.version.clone(), now));
            }
        }
        let live = 1 + leases
            .iter()
            .filter(|l| {
                l.shard.is_none()
                    && l.holder.as_deref() != Some(self.id.as_str())
                    && !self.lapsed(l, now)
            })
            .count();
        let by_shard: BTreeMap<u32, &LeaseRecord> = leases
            .iter()
            .filter_map(|l| Some((l.shard.filter(|s| *s < self.shards)?, l)))
            .collect();
        let owned = self.owned(now);
        let live_holder = |shard: u32, l: &LeaseRecord| -> Option<String> {
            let h = l.holder.clone().filter(|h| !h.is_empty())?;
            if h == self.id {
                // This replica's own: as long as it may act on it.
                return owned.contains(&shard).then_some(h);
            }
            (!self.lapsed(l, now)).then_some(h)
        };
        let views: Vec<ShardView> = (0..self.shards)
            .map(|shard| ShardView {
                shard,
                holder: by_shard.get(&shard).and_then(|l| live_holder(shard, l)),
            })
            .collect();
        let p = plan(&self.id, &views, live);
        let mut table = BTreeMap::new();
        for (shard, l) in &by_shard {
            let Some(replica) = views.get(*shard as usize).and_then(|v| v.holder.clone()) else {
                continue;
            };
            let mine_until = self.table.get(shard).and_then(|h| h.mine_until);
            table.insert(
                *shard,
                Held {
                    replica,
                    addr: l.addr.clone(),
                    epoch: l.transitions + 1,
                    mine_until,
                },
            );
        }
        let mut writes = Vec::new();
        if let Some(shard) = p.release {
            table.remove(&shard);
            if let Some(l) = by_shard.get(&shard) {
                writes.push(LeaseWrite::Release {
                    shard,
                    version: l.version.clone(),
                });
            }
        }
        self.table = table;
        for shard in p.renew {
            if let Some(l) = by_shard.get(&shard) {
                writes.push(LeaseWrite::Renew {
                    shard,
                    version: l.version.clone(),
                });
            }
        }
        for shard in p.acquire {
            let l = by_shard.get(&shard);
            writes.push(LeaseWrite::Take {
                shard,
                version: l.map(|l| l.version.clone()),
                transitions: l.map_or(0, |l| l.transitions) + 1,
            });
        }
        writes
    }

    /// The outcome of one of the pass's writes.
    pub fn written(&mut self, w: &LeaseWrite, ok: bool) {
        // Owner until a lease after the pass began, less one renewal: it
        // stops before anyone can see its Lease lapse.
        let until = self.started + self.lease_ms.saturating_sub(self.renew_ms);
        match (w, ok) {
            (LeaseWrite::Renew { shard, .. }, true) => {
                if let Some(h) = self.table.get_mut(shard) {
                    h.mine_until = Some(until);
                }
            }
            (LeaseWrite::Renew { shard, .. }, false) => {
                self.table.remove(shard);
            }
            (
                LeaseWrite::Take {
                    shard, transitions, ..
                },
                true,
            ) => {
                self.table.insert(
                    *shard,
                    Held {
                        replica: self.id.clone(),
                        addr: self.addr.clone(),
                        epoch: transitions + 1,
                        mine_until: Some(until),
                    },
                );
            }
            (LeaseWrite::Take { .. } | LeaseWrite::Release { .. }, _) => {}
        }
    }
}

/// The replicas' shared view of who owns what, kept by one task against
/// the API server.
pub struct Shards {
    cfg: ReplicaConfig,
    client: kube::Client,
    core: Mutex<ShardCore>,
    /// The core's clock: milliseconds since this instant.
    base: Instant,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("replica", &self.cfg.id)
            .finish_non_exhaustive()
    }
}

impl Router for Shards {
    fn route(&self, node: &str) -> Route {
        lock(&self.core).route(node, self.now())
    }
}

impl Shards {
    /// This replica's share of the nodes of the cluster of `client`; its
    /// hub's address is set (`set_address`) before it runs.
    pub fn new(cfg: ReplicaConfig, client: kube::Client) -> Arc<Shards> {
        let addr = cfg.advertise.clone().unwrap_or_default();
        let core = ShardCore::new(
            &cfg.id,
            &addr,
            cfg.shards,
            cfg.lease_seconds.max(1).saturating_mul(1000),
        );
        Arc::new(Shards {
            cfg,
            client,
            core: Mutex::new(core),
            base: Instant::now(),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The hub's address, unless the configuration names one. False if
    /// neither names a host edges can be sent to (a wildcard address).
    pub fn set_address(&self, bound: std::net::SocketAddr) -> bool {
        let mut core = lock(&self.core);
        if core.addr.is_empty() {
            if bound.ip().is_unspecified() {
                return false;
            }
            core.addr = bound.to_string();
        }
        true
    }

    /// Where edges reach this replica's hub.
    fn address(&self) -> String {
        lock(&self.core).addr.clone()
    }

    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// The replica owning `node`'s shard, as last read (for `/metrics`).
    pub fn owner_of(&self, node: &str) -> Option<String> {
        lock(&self.core).owner_of(node)
    }

    /// Keeps this replica's share for ever; closes the connections of
    /// nodes whose shard it no longer owns through `hub`.
    pub async fn run(self: Arc<Self>, hub: HubHandle) {
        let every = Duration::from_millis(lock(&self.core).renew_ms());
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // What it owned after the previous pass: a shard lost meanwhile
        // (its renewals failing until its time ran out) counts too.
        // A shard owned again in a new epoch counts as lost: its nodes come
        // back through a takeover (what they sent while it had lapsed was
        // not written to the cluster).
        let mut before: BTreeMap<u32, u64> = BTreeMap::new();
        loop {
            tick.tick().await;
            if let Err(e) = self.pass().await {
                warn!(replica = %self.cfg.id, error = %e, "shard lease pass failed");
            }
            let after = lock(&self.core).owned_epochs(self.now());
            let lost = ShardCore::lost_between(&before, &after);
            before = after;
            if !lost.is_empty() {
                for node in hub.connected() {
                    if lost.contains(&shard_of(&node, self.cfg.shards)) {
                        let addr = match self.route(&node) {
                            Route::Elsewhere { addr, .. } => addr,
                            Route::Here { .. } => self.address(),
                            Route::Nobody => String::new(),
                        };
                        hub.move_node(&node, &addr);
                    }
                }
            }
        }
    }

    /// Gives every shard back and removes this replica's Lease, for a
    /// replica that stops: the others take its nodes at their next pass
    /// instead of after its Leases lapse. Best effort (the Leases lapse
    /// anyway).
    pub async fn release_all(&self) {
        let mine: Vec<u32> = self.owned().into_iter().collect();
        lock(&self.core).clear();
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        for shard in mine {
            match api.get_opt(&Self::lease_name(shard)).await {
                Ok(Some(l))
                    if l.spec.as_ref().and_then(|s| s.holder_identity.as_deref())
                        == Some(self.cfg.id.as_str()) =>
                {
                    let version = l.metadata.resource_version.clone().unwrap_or_default();
                    self.write(&api, &LeaseWrite::Release { shard, version }, Some(&l))
                        .await;
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(replica = %self.cfg.id, shard, error = %e, "reading a shard lease to give it back")
                }
            }
        }
        let name = format!("keel-replica-{}", self.cfg.id);
        if let Err(e) = api.delete(&name, &Default::default()).await {
            warn!(replica = %self.cfg.id, error = %e, "removing the replica's lease");
        }
    }

    /// How many shards this replica owns now.
    pub fn owned_count(&self) -> usize {
        self.owned().len()
    }

    /// The shards this replica may act as owner of now.
    fn owned(&self) -> BTreeSet<u32> {
        lock(&self.core).owned(self.now())
    }

    fn lease_name(shard: u32) -> String {
        format!("keel-shard-{shard}")
    }

    /// One pass: renew this replica's Lease, read every keel Lease, and
    /// make the writes the core decides.
    async fn pass(&self) -> Result<(), String> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let started = self.now();
        self.renew_replica(&api).await?;
        let list = api
            .list(&ListParams::default().labels(KIND_LABEL))
            .await
            .map_err(|e| format!("listing leases: {e}"))?;
        let mut objects: BTreeMap<u32, Lease> = BTreeMap::new();
        let mut records = Vec::new();
        for l in list.items {
            let name = l.metadata.name.clone().unwrap_or_default();
            let kind = l
                .metadata
                .labels
                .as_ref()
                .and_then(|m| m.get(KIND_LABEL))
                .cloned()
                .unwrap_or_default();
            let shard = if kind == "replica" {
                None
            } else if let Some(n) = name
                .strip_prefix("keel-shard-")
                .and_then(|n| n.parse::<u32>().ok())
            {
                objects.insert(n, l.clone());
                Some(n)
            } else {
                continue;
            };
            let spec = l.spec.as_ref();
            records.push(LeaseRecord {
                name,
                shard,
                holder: spec.and_then(|s| s.holder_identity.clone()),
                version: l.metadata.resource_version.clone().unwrap_or_default(),
                duration_ms: spec
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|d| u64::try_from(d).ok())
                    .unwrap_or(self.cfg.lease_seconds)
                    .saturating_mul(1000),
                transitions: spec
                    .and_then(|s| s.lease_transitions)
                    .and_then(|t| u64::try_from(t).ok())
                    .unwrap_or(0),
                addr: l
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(ADDRESS))
                    .cloned()
                    .unwrap_or_default(),
            });
        }
        let now = self.now();
        let writes = lock(&self.core).pass(&records, started, now);
        for w in writes {
            let shard = match &w {
                LeaseWrite::Renew { shard, .. }
                | LeaseWrite::Take { shard, .. }
                | LeaseWrite::Release { shard, .. } => *shard,
            };
            let ok = self.write(&api, &w, objects.get(&shard)).await;
            lock(&self.core).written(&w, ok);
        }
        Ok(())
    }

    async fn renew_replica(&self, api: &Api<Lease>) -> Result<(), String> {
        let name = format!("keel-replica-{}", self.cfg.id);
        let now = now_rfc3339_micro();
        let lease = self.lease_object(&name, "replica", &now, None, 0)?;
        match api.get_opt(&name).await {
            Ok(Some(mut l)) => {
                l.spec = lease.spec;
                l.metadata.annotations = lease.metadata.annotations;
                api.replace(&name, &PostParams::default(), &l)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("renewing {name}: {e}"))
            }
            Ok(None) => api
                .create(&PostParams::default(), &lease)
                .await
                .map(|_| ())
                .map_err(|e| format!("creating {name}: {e}")),
            Err(e) => Err(format!("reading {name}: {e}")),
        }
    }

    fn lease_object(
        &self,
        name: &str,
        kind: &str,
        now: &str,
        acquired: Option<&str>,
        transitions: u64,
    ) -> Result<Lease, String> {
        serde_json::from_value(json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": self.cfg.namespace,
                "labels": {KIND_LABEL: kind},
                "annotations": {ADDRESS: self.address()}},
            "spec": {"holderIdentity": self.cfg.id,
                "leaseDurationSeconds": self.cfg.lease_seconds,
                "acquireTime": acquired.unwrap_or(now), "renewTime": now,
                "leaseTransitions": transitions},
        }))
        .map_err(|e| format!("lease object: {e}"))
    }

    /// Makes one write on the API server, naming the version read (the
    /// API server refuses it with 409 if the Lease changed since); `l` is
    /// the Lease as read. Whether it was made.
    async fn write(&self, api: &Api<Lease>, w: &LeaseWrite, l: Option<&Lease>) -> bool {
        let now = now_rfc3339_micro();
        let written = match w {
            LeaseWrite::Release { shard, .. } => {
                let Some(mut l) = l.cloned() else {
                    return false;
                };
                if let Some(spec) = l.spec.as_mut() {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                }
                let r = api
                    .replace(&Self::lease_name(*shard), &PostParams::default(), &l)
                    .await;
                if r.is_ok() {
                    info!(replica = %self.cfg.id, shard, "gave a shard back");
                }
                r
            }
            LeaseWrite::Renew { shard, version }
            | LeaseWrite::Take {
                shard,
                version: Some(version),
                ..
            } => {
                let take = matches!(w, LeaseWrite::Take { .. });
                let transitions = match w {
                    LeaseWrite::Take { transitions, .. } => *transitions,
                    _ => l
                        .and_then(|l| l.spec.as_ref())
                        .and_then(|s| s.lease_transitions)
                        .and_then(|t| u64::try_from(t).ok())
                        .unwrap_or(0),
                };
                let acquired = if take {
                    now.clone()
                } else {
                    l.and_then(|l| l.spec.as_ref())
                        .and_then(|s| s.acquire_time.as_ref())
                        .and_then(|t| serde_json::to_value(t).ok())
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_else(|| now.clone())
                };
                let name = Self::lease_name(*shard);
                let mut lease =
                    match self.lease_object(&name, "shard", &now, Some(&acquired), transitions) {
                        Ok(l) => l,
                        Err(_) => return false,
                    };
                lease.metadata.resource_version = Some(version.clone());
                let r = api.replace(&name, &PostParams::default(), &lease).await;
                if r.is_ok() && take {
                    info!(replica = %self.cfg.id, shard, epoch = transitions + 1, "took a shard");
                }
                r
            }
            LeaseWrite::Take {
                shard,
                version: None,
                transitions,
            } => {
                let name = Self::lease_name(*shard);
                let lease = match self.lease_object(&name, "shard", &now, Some(&now), *transitions)
                {
                    Ok(l) => l,
                    Err(_) => return false,
                };
                let r = api.create(&PostParams::default(), &lease).await;
                if r.is_ok() {
                    info!(replica = %self.cfg.id, shard, epoch = transitions + 1, "took a shard");
                }
                r
            }
        };
        match written {
            Ok(_) => true,
            Err(e) => {
                debug!(replica = %self.cfg.id, ?w, error = %e, "shard lease not written");
                false
            }
        }
    }
}

/// The Secret holding the cluster CA all replicas share.
const CA_SECRET: &str = "keel-cluster-ca";

/// Makes this replica's cluster CA (`data_dir/pki/ca.pem`, `ca.key`) the
/// one every replica of the cluster shares, kept in the Secret
/// `keel-cluster-ca`: the first replica to start puts its own there (made
/// if it has none); the others take it. A replica whose CA differs from
/// the cluster's is refused: its nodes' certificates would not be
/// accepted by the others (and theirs not by it). Runs before the CA is
/// loaded.
pub async fn share_ca(
    kube: &super::KubernetesConfig,
    replica: &ReplicaConfig,
    data_dir: &std::path::Path,
) -> Result<(), super::AttachError> {
    use k8s_openapi::ByteString;
    use k8s_openapi::api::core::v1::Secret;
    let (client, server, _) = super::client_for(kube).await?;
    let api: Api<Secret> = Api::namespaced(client, &replica.namespace);
    let pki = data_dir.join("pki");
    let (cert_path, key_path) = (pki.join("ca.pem"), pki.join("ca.key"));
    let setup = |what: &str, message: String| super::AttachError::Setup {
        server: server.clone(),
        what: what.to_owned(),
        message,
    };
    let local = || -> Option<(Vec<u8>, Vec<u8>)> {
        Some((
            std::fs::read(&cert_path).ok()?,
            std::fs::read(&key_path).ok()?,
        ))
    };
    let mut made_here = false;
    for _ in 0..3 {
        let found = api
            .get_opt(CA_SECRET)
            .await
            .map_err(|e| setup("reading the Secret keel-cluster-ca", e.to_string()))?;
        match found {
            Some(secret) => {
                let data = secret.data.unwrap_or_default();
                let (Some(cert), Some(key)) = (data.get("ca.pem"), data.get("ca.key")) else {
                    return Err(setup(
                        "the Secret keel-cluster-ca",
                        "it lacks ca.pem or ca.key".into(),
                    ));
                };
                match local() {
                    Some((c, _)) if c == cert.0 => return Ok(()),
                    Some(_) if !made_here => {
                        return Err(setup(
                            "the Secret keel-cluster-ca",
                            format!(
                                "this replica's CA ({}) is not the cluster's; a replica's data directory belongs to one cluster",
                                cert_path.display()
                            ),
                        ));
                    }
                    _ => {
                        let io = |e: crate::Error| setup("writing the shared CA", e.to_string());
                        crate::pki::create_private_dir(&pki).map_err(io)?;
                        crate::pki::write_atomic(&key_path, &key.0, 0o600).map_err(io)?;
                        crate::pki::write_atomic(&cert_path, &cert.0, 0o644).map_err(io)?;
                        info!(replica = %replica.id, "took the cluster CA shared by the replicas");
                        return Ok(());
                    }
                }
            }
            None => {
                if local().is_none() {
                    crate::pki::ClusterCa::load_or_create(data_dir)
                        .map_err(|e| setup("making the cluster CA", e.to_string()))?;
                    made_here = true;
                }
                let Some((cert, key)) = local() else {
                    return Err(setup("reading the cluster CA", "unreadable".into()));
                };
                let secret: Secret = serde_json::from_value(json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": CA_SECRET, "namespace": replica.namespace},
                    "type": "Opaque",
                }))
                .map_err(|e| setup("the Secret keel-cluster-ca", e.to_string()))?;
                let mut secret = secret;
                secret.data = Some(
                    [
                        ("ca.pem".to_owned(), ByteString(cert)),
                        ("ca.key".to_owned(), ByteString(key)),
                    ]
                    .into(),
                );
                match api.create(&PostParams::default(), &secret).await {
                    Ok(_) => {
                        info!(replica = %replica.id, "shared this replica's CA with the cluster's replicas");
                        return Ok(());
                    }
                    // Another replica was first: take its CA.
                    Err(kube::Error::Api(e)) if e.code == 409 => continue,
                    Err(e) => {
                        return Err(setup("creating the Secret keel-cluster-ca", e.to_string()));
                    }
                }
            }
        }
    }
    Err(setup(
        "the Secret keel-cluster-ca",
        "it kept changing".into(),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    fn views(holders: &[Option<&str>]) -> Vec<ShardView> {
        holders
            .iter()
            .enumerate()
            .map(|(i, h)| ShardView {
                shard: u32::try_from(i).unwrap(),
                holder: h.map(str::to_owned),
            })
            .collect()
    }

    /// Replicas taking turns from nothing end with an even split, and
    /// every shard held once.
    #[test]
    fn replicas_split_the_shards_evenly() {
        let mut holders: Vec<Option<String>> = vec![None; 32];
        let names = ["a", "b", "c"];
        for _ in 0..10 {
            for me in names {
                let v: Vec<ShardView> = holders
                    .iter()
                    .enumerate()
                    .map(|(i, h)| ShardView {
                        shard: u32::try_from(i).unwrap(),
                        holder: h.clone(),
                    })
                    .collect();
                let p = plan(me, &v, names.len());
                if let Some(r) = p.release {
                    holders[r as usize] = None;
                }
                for s in p.acquire {
                    assert!(holders[s as usize].is_none());
                    holders[s as usize] = Some(me.to_owned());
                }
            }
        }
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for h in &holders {
            *counts.entry(h.clone().unwrap()).or_default() += 1;
        }
        assert_eq!(counts.len(), 3);
        assert!(counts.values().all(|c| (10..=11).contains(c)), "{counts:?}");
    }

    /// A replica above its share (a new one joined) gives back one shard
    /// per pass, not all at once.
    #[test]
    fn a_replica_above_its_share_gives_back_one_shard_per_pass() {
        let mut h = vec![Some("a"); 16];
        h.extend(vec![Some("b"); 16]);
        let p = plan("a", &views(&h), 3);
        assert_eq!(p.release, Some(15));
        assert_eq!(p.renew.len(), 15);
        assert!(p.acquire.is_empty());
        // The newcomer takes what is free, up to its share.
        h[15] = None;
        let p = plan("c", &views(&h), 3);
        assert_eq!(p.acquire, vec![15]);
    }

    /// When a replica dies its shards lapse and the others take them, up
    /// to their new share.
    #[test]
    fn the_shards_of_a_dead_replica_are_taken_by_the_living() {
        let mut h = vec![Some("a"); 11];
        h.extend(vec![Some("b"); 11]);
        h.extend(vec![None; 10]); // c's, lapsed
        let p = plan("a", &views(&h), 2);
        assert_eq!(p.acquire.len(), 5);
        assert_eq!(p.renew.len(), 11);
        assert!(p.acquire.iter().all(|s| *s >= 22));
    }

    #[test]
    fn shards_are_stable_and_in_range() {
        for i in 0..1000 {
            let n = format!("node-{i}");
            let s = shard_of(&n, 32);
            assert!(s < 32);
            assert_eq!(s, shard_of(&n, 32));
        }
        assert_eq!(shard_of("x", 0), 0);
    }
}
