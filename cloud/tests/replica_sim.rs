//! The deterministic replica simulator: cloudcore replicas sharing edge
//! nodes by shard Leases, in virtual time, driving the replicas' own
//! ownership logic (`attach::shards::ShardCore`, the code `Shards` runs
//! against the API server) against a lease store with the API server's
//! rules (a write names the version it read; a stale one is refused).
//!
//! Replicas crash and restart (their log survives, their memory does not)
//! and are cut off from the lease store; nodes write status values all
//! along, connect to whichever replica their target is, follow `MOVED`,
//! and back off on `UNAVAILABLE` or a dead replica. A replica acknowledges
//! a value once it holds it (its log) and writes it to the cluster while it
//! owns the node, the node is connected to it, and it did not just take
//! the node over; a takeover brings a new epoch: the new owner adopts the
//! cluster's value, the node re-asserts its own (as `MetaManager` does).
//!
//! Checked at every step: no shard has two replicas acting as owner at
//! once, no node's epoch goes back, no value on the cluster goes back.
//! After the faults stop: every node is connected to its shard's owner and
//! the cluster holds every node's last value (nothing acknowledged lost).
//!
//! `KEEL_REPLICA_SIM_NODES` (default 10,000), `KEEL_REPLICA_SIM_REPLICAS`
//! (default 10), `KEEL_REPLICA_SIM_SEEDS` (default 3 seeds) and
//! `KEEL_REPLICA_SIM_SEED` (replay one) scale and pick runs; every run
//! prints its seed.

#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};

use keel_cloud::attach::shards::{LeaseRecord, LeaseWrite, ShardCore, shard_of};
use keel_cloud::hub::Route;
use keel_sync::sim::Rng;

/// Whether something that happens `per_mille` times in a thousand does.
fn chance(rng: &mut Rng, per_mille: u64) -> bool {
    rng.below(1000) < per_mille
}

const SHARDS: u32 = 32;
/// Lease duration and step, in virtual milliseconds.
const LEASE_MS: u64 = 6_000;
const STEP_MS: u64 = 100;
/// How long a node takes to notice a dead replica (its idle timeout).
const IDLE_MS: u64 = 6_000;
/// How long a new owner waits for a node taken over to re-assert.
const QUIET_MS: u64 = 5_000;
/// Latest a cluster write lands after it is made (below a renewal
/// interval: what the ownership window relies on).
const WRITE_MS: u64 = 300;

/// The lease store (the API server's rules for Leases).
#[derive(Default)]
struct Store {
    leases: BTreeMap<String, LeaseRecord>,
    version: u64,
}

impl Store {
    fn bump(&mut self) -> String {
        self.version += 1;
        self.version.to_string()
    }

    fn renew_replica(&mut self, id: &str) {
        let version = self.bump();
        let name = format!("keel-replica-{id}");
        self.leases.insert(
            name.clone(),
            LeaseRecord {
                name,
                shard: None,
                holder: Some(id.to_owned()),
                version,
                duration_ms: LEASE_MS,
                transitions: 0,
                addr: id.to_owned(),
            },
        );
    }

    fn apply(&mut self, w: &LeaseWrite, id: &str) -> bool {
        let (shard, expected) = match w {
            LeaseWrite::Renew { shard, version } | LeaseWrite::Release { shard, version } => {
                (*shard, Some(version.clone()))
            }
            LeaseWrite::Take { shard, version, .. } => (*shard, version.clone()),
        };
        let name = format!("keel-shard-{shard}");
        let current = self.leases.get(&name).map(|l| l.version.clone());
        if current != expected {
            return false;
        }
        let version = self.bump();
        let old = self.leases.get(&name).cloned();
        let l = match w {
            LeaseWrite::Release { .. } => LeaseRecord {
                holder: None,
                version,
                ..old.unwrap()
            },
            LeaseWrite::Renew { .. } => LeaseRecord {
                version,
                ..old.unwrap()
            },
            LeaseWrite::Take { transitions, .. } => LeaseRecord {
                name: name.clone(),
                shard: Some(shard),
                holder: Some(id.to_owned()),
                version,
                duration_ms: LEASE_MS,
                transitions: *transitions,
                addr: id.to_owned(),
            },
        };
        self.leases.insert(name, l);
        true
    }
}

struct Replica {
    id: String,
    core: Option<ShardCore>,
    /// Cut off from the lease store until then.
    cut_until: u64,
    next_pass: u64,
    /// What it holds of each node's value (its log: survives a crash).
    view: BTreeMap<usize, u64>,
    connected: BTreeSet<usize>,
    /// Nodes taken over, since when.
    quiet: BTreeMap<usize, u64>,
    /// When its last cluster write lands: its writes land in order (one
    /// write-back queue, each write awaited).
    last_land: u64,
    /// What it owned after its previous pass, and in which epoch.
    owned: BTreeMap<u32, u64>,
}

impl Replica {
    fn alive(&self) -> bool {
        self.core.is_some()
    }

    fn writes(&self, n: usize, name: &str, now: u64) -> bool {
        let Some(core) = &self.core else {
            return false;
        };
        matches!(core.route(name, now), Route::Here { .. })
            && self.connected.contains(&n)
            && self.quiet.get(&n).is_none_or(|t| now >= t + QUIET_MS)
    }
}

struct Node {
    name: String,
    shard: u32,
    head: u64,
    conn: Option<usize>,
    epoch: u64,
    target: usize,
    retry_at: u64,
    /// When the replica it is connected to died (it notices later).
    dead_since: Option<u64>,
}

struct Sim {
    rng: Rng,
    now: u64,
    store: Store,
    replicas: Vec<Replica>,
    nodes: Vec<Node>,
    cluster: Vec<u64>,
    /// Cluster writes in flight: (lands at, node, value).
    writes: Vec<(u64, usize, u64)>,
    violations: Vec<String>,
    takeovers: u64,
}

impl Sim {
    fn new(seed: u64, nodes: usize, replicas: usize) -> Sim {
        let replicas = (0..replicas)
            .map(|i| Replica {
                id: format!("r{i}"),
                core: Some(ShardCore::new(
                    &format!("r{i}"),
                    &format!("r{i}"),
                    SHARDS,
                    LEASE_MS,
                )),
                cut_until: 0,
                next_pass: (i as u64) * 37,
                view: BTreeMap::new(),
                connected: BTreeSet::new(),
                quiet: BTreeMap::new(),
                last_land: 0,
                owned: BTreeMap::new(),
            })
            .collect::<Vec<_>>();
        let r = replicas.len();
        let nodes = (0..nodes)
            .map(|i| {
                let name = format!("node-{i}");
                Node {
                    shard: shard_of(&name, SHARDS),
                    name,
                    head: 0,
                    conn: None,
                    epoch: 0,
                    target: i % r,
                    retry_at: 0,
                    dead_since: None,
                }
            })
            .collect::<Vec<_>>();
        let n = nodes.len();
        Sim {
            rng: Rng::new(seed),
            now: 0,
            store: Store::default(),
            replicas,
            nodes,
            cluster: vec![0; n],
            writes: Vec::new(),
            violations: Vec::new(),
            takeovers: 0,
        }
    }

    fn violate(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(format!("t={}ms: {what}", self.now));
        }
    }

    fn faults(&mut self) {
        let r = self.replicas.len() as u64;
        let i = self.rng.below(r) as usize;
        let alive = self.replicas.iter().filter(|r| r.alive()).count();
        if chance(&mut self.rng, 4) && self.replicas[i].alive() && alive > 1 {
            // A crash: memory gone, in-flight writes may land or not.
            let rep = &mut self.replicas[i];
            rep.core = None;
            rep.owned.clear();
            rep.connected.clear();
            rep.quiet.clear();
            for n in &mut self.nodes {
                if n.conn == Some(i) {
                    n.dead_since = Some(self.now);
                }
            }
        } else if chance(&mut self.rng, 20) && !self.replicas[i].alive() {
            let rep = &mut self.replicas[i];
            rep.core = Some(ShardCore::new(&rep.id, &rep.id, SHARDS, LEASE_MS));
            rep.next_pass = self.now;
        } else if chance(&mut self.rng, 10) && self.replicas[i].alive() {
            self.replicas[i].cut_until = self.now + LEASE_MS + self.rng.below(2 * LEASE_MS);
        }
    }

    fn passes(&mut self) {
        for i in 0..self.replicas.len() {
            let rep = &mut self.replicas[i];
            let Some(core) = rep.core.as_mut() else {
                continue;
            };
            if self.now < rep.next_pass {
                continue;
            }
            // Passes drift: a pass takes as long as the API server makes it.
            rep.next_pass = self.now + core.renew_ms() - 400 + self.rng.below(800);
            let before = std::mem::take(&mut rep.owned);
            if self.now >= rep.cut_until {
                self.store.renew_replica(&rep.id);
                let leases: Vec<LeaseRecord> = self.store.leases.values().cloned().collect();
                let writes = core.pass(&leases, self.now, self.now);
                for w in writes {
                    let ok = self.store.apply(&w, &rep.id);
                    core.written(&w, ok);
                }
            }
            // Lost: no longer owned, or owned again in a new epoch (as
            // `Shards::run` counts).
            let after = core.owned_epochs(self.now);
            let lost = ShardCore::lost_between(&before, &after);
            rep.owned = after;
            if lost.is_empty() {
                continue;
            }
            let moved: Vec<usize> = rep
                .connected
                .iter()
                .copied()
                .filter(|n| lost.contains(&self.nodes[*n].shard))
                .collect();
            for n in moved {
                rep.connected.remove(&n);
                let to = match core.route(&self.nodes[n].name, self.now) {
                    Route::Elsewhere { replica, .. } => replica[1..].parse().ok(),
                    _ => None,
                };
                let node = &mut self.nodes[n];
                node.conn = None;
                node.retry_at = self.now;
                if let Some(t) = to {
                    node.target = t;
                }
            }
        }
    }

    /// A replica takes the value it holds of node `n` to the cluster.
    fn write_back(&mut self, r: usize, n: usize) {
        if let Some(v) = self.replicas[r].view.get(&n).copied()
            && self.replicas[r].writes(n, &self.nodes[n].name, self.now)
        {
            let lands = (self.now + 1 + self.rng.below(WRITE_MS)).max(self.replicas[r].last_land);
            self.replicas[r].last_land = lands;
            self.writes.push((lands, n, v));
        }
    }

    fn connect(&mut self, n: usize) {
        let r = self.nodes[n].target;
        let rcount = self.replicas.len();
        let route = self.replicas[r]
            .core
            .as_ref()
            .map(|c| c.route(&self.nodes[n].name, self.now));
        match route {
            None => {
                // A dead replica: a handshake timeout, then the next one.
                let node = &mut self.nodes[n];
                node.target = (r + 1) % rcount;
                node.retry_at = self.now + 1_000;
            }
            Some(Route::Nobody) => {
                let wait = 200 + self.rng.below(800);
                let node = &mut self.nodes[n];
                node.target = (r + 1) % rcount;
                node.retry_at = self.now + wait;
            }
            Some(Route::Elsewhere { replica, .. }) => {
                let node = &mut self.nodes[n];
                node.target = replica[1..].parse().unwrap();
                node.retry_at = self.now + STEP_MS;
            }
            Some(Route::Here { epoch }) => {
                let head = self.nodes[n].head;
                if epoch < self.nodes[n].epoch {
                    self.violate(format!(
                        "{} went from epoch {} back to {epoch}",
                        self.nodes[n].name, self.nodes[n].epoch
                    ));
                }
                let cluster = self.cluster[n];
                let rep = &mut self.replicas[r];
                if epoch > self.nodes[n].epoch {
                    // A takeover: the owner adopts the cluster's value; the
                    // node installs its snapshot and re-asserts its own.
                    self.takeovers += 1;
                    rep.view.insert(n, cluster);
                    rep.quiet.insert(n, self.now);
                    if head != cluster {
                        rep.quiet.remove(&n);
                    }
                }
                rep.view.insert(n, head);
                rep.connected.insert(n);
                let node = &mut self.nodes[n];
                node.epoch = epoch;
                node.conn = Some(r);
                node.dead_since = None;
                self.write_back(r, n);
            }
        }
    }

    fn step(&mut self, faults: bool) {
        self.now += STEP_MS;
        if faults {
            self.faults();
        }
        self.passes();
        // Nodes that notice their replica died.
        for n in 0..self.nodes.len() {
            if let Some(t) = self.nodes[n].dead_since
                && self.now >= t + IDLE_MS
            {
                let node = &mut self.nodes[n];
                node.dead_since = None;
                node.conn = None;
                node.retry_at = self.now;
            }
        }
        // Writes: a few hundred nodes record a new value each step.
        let count = self.nodes.len() as u64;
        let writers = if faults { (count / 50).max(1) } else { 0 };
        for _ in 0..writers {
            let n = self.rng.below(count) as usize;
            self.nodes[n].head += 1;
            if let Some(r) = self.nodes[n].conn
                && self.nodes[n].dead_since.is_none()
                && self.replicas[r].alive()
            {
                let head = self.nodes[n].head;
                self.replicas[r].view.insert(n, head);
                self.replicas[r].quiet.remove(&n);
                self.write_back(r, n);
            }
        }
        for n in 0..self.nodes.len() {
            if self.nodes[n].conn.is_none() && self.now >= self.nodes[n].retry_at {
                self.connect(n);
            }
        }
        // Quiet times that ended: the owner writes what it holds.
        for r in 0..self.replicas.len() {
            let over: Vec<usize> = self.replicas[r]
                .quiet
                .iter()
                .filter(|(_, t)| self.now >= **t + QUIET_MS)
                .map(|(n, _)| *n)
                .collect();
            for n in over {
                self.replicas[r].quiet.remove(&n);
                self.write_back(r, n);
            }
        }
        // Cluster writes landing.
        let mut landing = Vec::new();
        self.writes.retain(|w| {
            if w.0 <= self.now {
                landing.push(*w);
                false
            } else {
                true
            }
        });
        landing.sort_by_key(|w| w.0);
        for (_, n, v) in landing {
            if v < self.cluster[n] {
                self.violate(format!(
                    "{}: the cluster's value went back from {} to {v}",
                    self.nodes[n].name, self.cluster[n]
                ));
            }
            self.cluster[n] = v;
        }
        // Never two owners of one shard at once.
        let mut owners: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
        for rep in &self.replicas {
            if let Some(c) = &rep.core {
                for s in c.owned(self.now) {
                    owners.entry(s).or_default().push(&rep.id);
                }
            }
        }
        let doubles: Vec<String> = owners
            .iter()
            .filter(|(_, o)| o.len() > 1)
            .map(|(s, o)| format!("shard {s} owned by {o:?} at once"))
            .collect();
        for d in doubles {
            self.violate(d);
        }
    }

    fn converged(&self) -> bool {
        self.nodes.iter().enumerate().all(|(n, node)| {
            self.cluster[n] == node.head
                && node.conn.is_some_and(|r| {
                    self.replicas[r].core.as_ref().is_some_and(|c| {
                        matches!(c.route(&node.name, self.now), Route::Here { .. })
                    })
                })
        })
    }
}

/// Runs one seed: faults for two minutes of virtual time, then everything
/// heals; returns the violations (with the seed) or the virtual time it
/// took to converge.
fn run(seed: u64, nodes: usize, replicas: usize) -> Result<(u64, u64), String> {
    let mut sim = Sim::new(seed, nodes, replicas);
    let faults_until = 120_000;
    while sim.now < faults_until {
        sim.step(true);
    }
    for r in &mut sim.replicas {
        r.cut_until = 0;
        if r.core.is_none() {
            r.core = Some(ShardCore::new(&r.id, &r.id, SHARDS, LEASE_MS));
            r.next_pass = faults_until;
        }
    }
    let healed = sim.now;
    while !sim.converged() && sim.now < healed + 10 * LEASE_MS {
        sim.step(false);
    }
    if !sim.converged() {
        let stuck = sim
            .nodes
            .iter()
            .enumerate()
            .filter(|(n, node)| sim.cluster[*n] != node.head || node.conn.is_none())
            .count();
        sim.violate(format!("{stuck} nodes did not converge"));
    }
    // Every shard held, evenly.
    let mut held: BTreeMap<String, usize> = BTreeMap::new();
    for rep in &sim.replicas {
        if let Some(c) = &rep.core {
            held.insert(rep.id.clone(), c.owned(sim.now).len());
        }
    }
    let total: usize = held.values().sum();
    if total != SHARDS as usize {
        sim.violate(format!("{total} shards owned after healing: {held:?}"));
    }
    if sim.violations.is_empty() {
        Ok((sim.now - healed, sim.takeovers))
    } else {
        Err(format!(
            "seed {seed} (replay: KEEL_REPLICA_SIM_SEED={seed}):\n  {}",
            sim.violations.join("\n  ")
        ))
    }
}

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn replicas_crash_and_lose_the_lease_store_and_no_acknowledged_value_is_lost() {
    let nodes = env("KEEL_REPLICA_SIM_NODES", 10_000) as usize;
    let replicas = env("KEEL_REPLICA_SIM_REPLICAS", 10) as usize;
    let seeds: Vec<u64> = match std::env::var("KEEL_REPLICA_SIM_SEED") {
        Ok(s) => vec![s.parse().unwrap()],
        Err(_) => (1..=env("KEEL_REPLICA_SIM_SEEDS", 3)).collect(),
    };
    let mut failures = Vec::new();
    for seed in seeds {
        match run(seed, nodes, replicas) {
            Ok((converged_ms, takeovers)) => println!(
                "seed {seed}: {nodes} nodes over {replicas} replicas: {takeovers} takeovers, converged {converged_ms} ms after healing"
            ),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
