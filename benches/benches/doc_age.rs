//! Cloud ingest of node changes through the registry, by object age: the
//! cost of one pod-status change from a node (admitted, folded into the
//! object, recorded in `cluster`), against a fresh pod and against pods
//! 10,000 changes old — with histories rebased (`--rebase-after`, default
//! 1000) and, for comparison, never rebased. Update cost must not grow
//! with age.
//!
//! `cargo bench -p keel-benches --bench doc_age`

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use keel_cloud::api::registry::{Registry, Write, new_meta};
use keel_log::{Hash, PayloadKind, Read, ReadLimits, Record, Store, StoreOptions};
use keel_sync::crdt::{ActorId, ObjectStore};
use keel_sync::objects::apply_record;
use serde_json::json;

const NODE: &str = "edge-1";
const KEY: &str = "pods/default/p";

/// A registry with one pod bound to `NODE`, and the node's copy of it.
struct Fixture {
    _dir: tempfile::TempDir,
    reg: std::sync::Arc<Registry>,
    edge: ObjectStore,
    actor: ActorId,
    seq: u64,
    n: u64,
    /// Seq of the node's `down` stream applied to `edge`.
    down_seen: u64,
}

impl Fixture {
    fn new(rt: &tokio::runtime::Runtime) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let reg = rt.block_on(async { Registry::open(store.clone()).unwrap() });
        let pod = json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": NODE, "containers": [{"name": "c", "image": "busybox",
                "command": ["sleep", "3600"]}]}});
        rt.block_on(reg.write(KEY, |_| Ok(Some(Write::Put(new_meta(pod, None))))))
            .unwrap();
        let mut edge = ObjectStore::new();
        let mut down_seen = 0;
        if let Read::Records(seg) = store
            .read(&format!("{NODE}/down"), 0, ReadLimits::default())
            .unwrap()
        {
            for r in &seg.records {
                apply_record(&mut edge, r).unwrap();
                down_seen = r.seq;
            }
        }
        Fixture {
            down_seen,
            _dir: dir,
            reg,
            edge,
            actor: ActorId::from_name(NODE),
            seq: 0,
            n: 0,
        }
    }

    /// The node's next status change, as a record of its `up` stream.
    fn next(&mut self) -> Record {
        self.n += 1;
        let n = self.n;
        let status = json!({"status": {"phase": "Running", "conditions": [
            {"type": "Ready", "status": if n.is_multiple_of(2) { "True" } else { "False" },
             "lastTransitionTime": format!("2026-01-01T00:00:{:02}Z", n % 60)}],
            "containerStatuses": [{"name": "c", "ready": n.is_multiple_of(2), "restartCount": n / 100}]}});
        let change = self
            .edge
            .edit_merge_patch(KEY, &self.actor, &status)
            .unwrap()
            .unwrap();
        self.seq += 1;
        Record {
            seq: self.seq,
            epoch: 1,
            hlc: self.seq,
            origin: NODE.to_owned(),
            key: KEY.to_owned(),
            kind: PayloadKind::Change,
            payload: change.into(),
            hash: Hash::default(),
        }
    }

    /// What cloudcore does with a node's records: admit, then fold.
    fn ingest(&self, r: &Record) {
        let rs = std::slice::from_ref(r);
        self.reg.admit_from_node(NODE, rs).unwrap();
        assert_eq!(self.reg.apply_from_node(NODE, rs).len(), 1);
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
        let store = self.reg.store().clone();
        let down = format!("{NODE}/down");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut records = Vec::new();
            loop {
                let seg = match store
                    .read(&down, self.down_seen, ReadLimits::default())
                    .unwrap()
                {
                    Read::Records(seg) => seg,
                    Read::Snapshot { tail, .. } => tail,
                };
                let Some(last) = seg.records.last() else {
                    break;
                };
                self.down_seen = last.seq;
                records.extend(seg.records);
            }
            let mut met = false;
            for r in &records {
                apply_record(&mut self.edge, r).unwrap();
                met |= keel_sync::crdt::is_rebase(&r.payload);
            }
            if met {
                break;
            }
            assert!(Instant::now() < deadline, "the root never reached down");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(self.edge.take_diverged(KEY, &self.actor).unwrap().is_none());
    }
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
        let mut fx = Fixture::new(&rt);
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
