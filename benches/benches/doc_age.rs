//! Cloud ingest of node changes through the registry, by object age: the
//! cost of one pod-status change from a node (admitted, folded into the
//! object, recorded in `cluster`), against a fresh pod and against pods
//! 10,000 changes old — with histories rebased (`--rebase-after`, default
//! 1000) and, for comparison, never rebased. Update cost must not grow
//! with age.
//!
//! The last row holds 10,000 pods whose histories were replaced by roots
//! (what 10,000 changes with rebasing leave: a root and the changes since)
//! and 10 changes on top of each, and changes them in turn; it prints the
//! registry's RSS per pod. `KEEL_DOC_AGE_PODS` sets its count.
//!
//! `cargo bench -p keel-benches --bench doc_age`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

// keel's allocator (see `keel_benches`).
use keel_benches as _;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keel_cloud::api::registry::{Registry, Write, new_meta};
use keel_log::{Hash, PayloadKind, Read, ReadLimits, Record, Store, StoreOptions};
use keel_sync::crdt::{ActorId, ObjectStore};
use keel_sync::objects::apply_record;
use serde_json::json;

const NODE: &str = "edge-1";
const KEY: &str = "pods/default/p-0";

/// A registry with pods bound to `NODE`, and the node's copy of them.
struct Fixture {
    _dir: tempfile::TempDir,
    reg: std::sync::Arc<Registry>,
    edge: ObjectStore,
    keys: Vec<String>,
    actor: ActorId,
    seq: u64,
    n: u64,
    /// Seq of the node's `down` stream applied to `edge`.
    down_seen: u64,
}

impl Fixture {
    fn new(rt: &tokio::runtime::Runtime, pods: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let reg = rt.block_on(async { Registry::open(store.clone()).unwrap() });
        let keys: Vec<String> = (0..pods).map(|i| format!("pods/default/p-{i}")).collect();
        for (i, key) in keys.iter().enumerate() {
            let pod = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("p-{i}"), "namespace": "default", "labels": {"app": "web"}},
                "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox",
                    "command": ["sleep", "3600"]}]}});
            // Durable before the next one only at the end (one wait).
            if i + 1 < pods {
                reg.submit(key, |_| Ok(Some(Write::Put(new_meta(pod, None)))))
                    .unwrap();
            } else {
                rt.block_on(reg.write(key, |_| Ok(Some(Write::Put(new_meta(pod, None))))))
                    .unwrap();
            }
        }
        let mut fx = Fixture {
            down_seen: 0,
            _dir: dir,
            reg,
            edge: ObjectStore::new(),
            keys,
            actor: ActorId::from_name(NODE),
            seq: 0,
            n: 0,
        };
        fx.read_down();
        assert_eq!(fx.edge.keys().count(), pods);
        fx
    }

    /// Applies to the node's copy what is durable in its `down` stream;
    /// whether a rebase root was among it.
    fn read_down(&mut self) -> bool {
        let store = self.reg.store().clone();
        let down = format!("{NODE}/down");
        let mut met = false;
        loop {
            let seg = match store
                .read(&down, self.down_seen, ReadLimits::default())
                .unwrap()
            {
                Read::Records(seg) => seg,
                Read::Snapshot { tail, .. } => tail,
            };
            let Some(last) = seg.records.last() else {
                return met;
            };
            self.down_seen = last.seq;
            for r in &seg.records {
                apply_record(&mut self.edge, r).unwrap();
                met |= keel_sync::crdt::is_rebase(&r.payload);
            }
        }
    }

    /// The node's next status change of the first pod, as a record of its
    /// `up` stream.
    fn next(&mut self) -> Record {
        self.next_of(0)
    }

    /// The node's next status change of pod `i`.
    fn next_of(&mut self, i: usize) -> Record {
        let key = self.keys[i % self.keys.len()].clone();
        self.n += 1;
        let n = self.n;
        let status = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": if n.is_multiple_of(2) { "True" } else { "False" },
             "lastTransitionTime": format!("2026-01-01T00:00:{:02}Z", n % 60)}],
            "containerStatuses": [{"name": "c", "ready": n.is_multiple_of(2), "restartCount": n / 100}]}});
        let change = self
            .edge
            .edit_merge_patch(&key, &self.actor, &status)
            .unwrap()
            .unwrap();
        self.seq += 1;
        Record {
            seq: self.seq,
            epoch: 1,
            hlc: self.seq,
            origin: NODE.into(),
            key: key.into(),
            kind: PayloadKind::Change,
            payload: change.into(),
            hash: Hash::default(),
        }
    }

    /// What cloudcore does with a node's records: admit, then fold.
    fn ingest(&self, r: &Record) {
        self.ingest_all(std::slice::from_ref(r));
    }

    /// [`Self::ingest`] of a segment, each record on another object.
    fn ingest_all(&self, rs: &[Record]) {
        self.reg.admit_from_node(NODE, rs).unwrap();
        assert_eq!(self.reg.apply_from_node(NODE, rs).len(), rs.len());
    }

    /// Every pod: `changes` status changes, its history replaced by a
    /// root, then `since` changes more (set up in segments of 100).
    fn rebased_with(&mut self, changes: usize, since: usize) {
        let pods = self.keys.len();
        for _ in 0..changes {
            for chunk in (0..pods).collect::<Vec<_>>().chunks(100) {
                let rs: Vec<Record> = chunk.iter().map(|&i| self.next_of(i)).collect();
                self.ingest_all(&rs);
            }
        }
        assert_eq!(self.reg.rebase_long_histories(2), pods);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.read_down() {
            assert!(Instant::now() < deadline, "the roots never reached down");
            std::thread::sleep(Duration::from_millis(1));
        }
        // Every root is durable once the last one is.
        std::thread::sleep(Duration::from_millis(200));
        self.read_down();
        for k in &self.keys {
            assert_eq!(self.edge.history_len(k), 1, "{k} not rebased on the node");
        }
        for _ in 0..since {
            for chunk in (0..pods).collect::<Vec<_>>().chunks(100) {
                let rs: Vec<Record> = chunk.iter().map(|&i| self.next_of(i)).collect();
                self.ingest_all(&rs);
            }
        }
    }

    /// `changes` status changes, rebasing every `rebase_after` (0: never),
    /// and the edge following the cloud's roots as edgecore does.
    fn age(&mut self, changes: u64, rebase_after: usize) {
        for _ in 0..changes {
            let r = self.next();
            self.ingest(&r);
            if rebase_after > 0 && self.reg.rebase_long_histories(rebase_after) > 0 {
                self.follow_rebase();
            }
        }
    }

    /// The node meets the root the cloud sent down (once it is durable).
    fn follow_rebase(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.read_down() {
            assert!(Instant::now() < deadline, "the root never reached down");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(self.edge.take_diverged(KEY, &self.actor).unwrap().is_none());
    }
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("registry_ingest_by_age");
    g.measurement_time(Duration::from_secs(5)).sample_size(20);
    for (name, age, rebase_after) in [
        ("fresh", 0u64, 1000usize),
        ("10000_old_rebased", 10_000, 1000),
        ("10000_old_never_rebased", 10_000, 0),
    ] {
        let mut fx = Fixture::new(&rt, 1);
        fx.age(age, rebase_after);
        let history = fx.edge.history_len(KEY);
        eprintln!("{name}: the node's copy holds {history} changes");
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = fx.next();
                    let t = Instant::now();
                    fx.ingest(&r);
                    total += t.elapsed();
                    // Compaction's rebase runs in its own pass, untimed.
                    if rebase_after > 0 && fx.reg.rebase_long_histories(rebase_after) > 0 {
                        fx.follow_rebase();
                    }
                }
                total
            })
        });
    }
    // Many old objects: cost per change must not grow with their number.
    let pods: usize = std::env::var("KEEL_DOC_AGE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let before = rss_kib();
    let t = Instant::now();
    let mut fx = Fixture::new(&rt, pods);
    fx.rebased_with(1, 10);
    let after = rss_kib();
    eprintln!(
        "{pods} pods rebased, each with 11 changes since its root: set up in {:.0?}; RSS {} -> {} MiB ({:.1} KiB per pod, registry and the node's copy)",
        t.elapsed(),
        before / 1024,
        after / 1024,
        after.saturating_sub(before) as f64 / pods as f64
    );
    let name = format!("{pods}_pods_rebased");
    let mut turn = 0usize;
    g.bench_function(name.as_str(), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let r = fx.next_of(turn);
                turn += 1;
                let t = Instant::now();
                fx.ingest(&r);
                total += t.elapsed();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
