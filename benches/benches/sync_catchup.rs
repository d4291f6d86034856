//! Sync engine throughput, in memory (no sockets, no disk):
//!
//! - `catchup/10000-nodes/links-only`: 10,000 edge nodes, each 10 records
//!   behind in each direction, caught up through both link state machines
//!   (frames encoded and decoded, chains verified, records persisted to the
//!   in-memory log).
//! - `catchup/crdt-apply/10000-objects/history-H`: 1,000 nodes with 10 pods
//!   each (10,000 objects whose documents hold H changes, loaded from saved
//!   state as cloudcore loads them), each node sending one real automerge
//!   pod-status change per pod (the common case: one change per object per
//!   segment), through both link state machines and applied to the cloud's
//!   object store. Elements are changes applied.
//! - `catchup/1000-nodes/concurrent-edits`: the links-only shape for 1,000
//!   nodes, applying every record to both sides' object stores, where each
//!   pod's spec (cloud) and status (node) were edited concurrently while
//!   apart: every change is concurrent with the other side's, on other
//!   keys (the fold's fast path takes such changes; automerge merges
//!   edits of one key).
//! - `crdt/apply-pod-status/history-N`: 64 pod-status changes (one full
//!   tail) applied one at a time to a pod whose document holds N changes
//!   (the fold's fast path); `/then-automerge`: the same, then handed to
//!   automerge's document (what an edit, a rebase or the next change after
//!   a full tail costs); `/one-batch`: handed over together.
//!
//! `cargo bench -p keel-benches --bench sync_catchup`
//!
//! Making the 10,000 nodes' logs takes a few minutes before the first
//! group; `KEEL_CATCHUP_NODES=N` makes N instead (for profiling: the rate
//! per record hardly depends on N).
//!
//! Profiling the timed sections alone (set-up takes most of a run):
//! `mkfifo ctl ctl.ack; KEEL_PERF_CTL=ctl perf record -g -D -1 --control
//! fifo:ctl,ctl.ack -- target/release/deps/sync_catchup-* --bench FILTER`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

// keel's allocator (see `keel_benches`).
use keel_benches as _;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use keel_log::{Entry, PayloadKind, Role};
use keel_sync::crdt::{ActorId, Applied, ObjectStore};
use keel_sync::link::{LogSource, down_stream, up_stream};
use keel_sync::sim::{MemLog, Pair};
use serde_json::json;

/// With `KEEL_PERF_CTL=FIFO`, tells `perf record --control fifo:FIFO,FIFO.ack
/// -D -1` to sample the timed sections alone (`enable` before each, `disable`
/// after): set-up takes most of a run's time. Not a benchmark's first
/// iteration (`warm` false), which criterion runs as its warm-up: that one
/// grows the process onto memory it never touched, and the kernel's
/// zeroing of those fresh huge pages (slow on a virtual machine whose host
/// backs memory on first touch: about six times the iteration's own work)
/// made a third or more of a whole profile, where the measured iterations
/// reuse that memory and fault no page.
fn perf_ctl(cmd: &str, warm: bool) {
    use std::io::{Read, Write};
    let Ok(fifo) = std::env::var("KEEL_PERF_CTL") else {
        return;
    };
    if !warm {
        return;
    }
    let mut ctl = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    ctl.write_all(cmd.as_bytes()).unwrap();
    let mut ack = [0u8; 5];
    let _ = std::fs::File::open(format!("{fifo}.ack"))
        .unwrap()
        .read(&mut ack)
        .unwrap();
}

const NODES: usize = 10_000;
const BEHIND: u64 = 10;

fn status(i: u64) -> serde_json::Value {
    json!({"status": {
        "phase": if i.is_multiple_of(2) { "Running" } else { "Pending" },
        "podIP": format!("10.42.0.{}", i % 250),
        "conditions": [
            {"type": "Ready", "status": if i.is_multiple_of(2) { "True" } else { "False" }, "lastTransitionTime": format!("2026-11-23T08:{:02}:00Z", i % 60)},
            {"type": "ContainersReady", "status": "True", "lastTransitionTime": "2026-11-23T08:00:00Z"}
        ],
        "containerStatuses": [{"name": "app", "ready": i.is_multiple_of(2), "restartCount": i, "image": "registry.local/app:1",
            "state": {"running": {"startedAt": format!("2026-11-23T08:{:02}:00Z", i % 60)}}}]
    }})
}

/// Logs and stores for one node: 20 records per stream, the receiving side
/// holding the first 10 of each. Each node's changes are its own (its
/// name as their origin, its actor as their author): the cloud refuses
/// anything else.
struct Template {
    cloud: MemLog,
    edge: MemLog,
    cloud_store: ObjectStore,
    edge_store: ObjectStore,
}

fn template(node: &str) -> Template {
    let (down, up) = (down_stream(node), up_stream(node));
    let mut cloud =
        MemLog::with_streams([(down.clone(), Role::Writer), (up.clone(), Role::Replica)]);
    let mut edge =
        MemLog::with_streams([(up.clone(), Role::Writer), (down.clone(), Role::Replica)]);
    let (mut cs, mut es) = (ObjectStore::new(), ObjectStore::new());
    let (ca, ea) = (ActorId::from_name("cloud"), ActorId::from_name(node));
    let mut t = 0;
    for round in 0..2u64 {
        for i in 0..BEHIND {
            let key = format!("pods/default/web-{i}");
            let patch = json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": format!("web-{i}"), "namespace": "default", "labels": {"app": "web", "rev": round.to_string()}},
                "spec": {"nodeName": node, "containers": [{"name": "app", "image": format!("registry.local/app:{round}")}]}});
            let c = cs.edit_merge_patch(&key, &ca, &patch).unwrap().unwrap();
            t += 1;
            cloud.append_local(&down, Entry::new("kubectl", key, PayloadKind::Change, c), t);
        }
        if round == 0 {
            // The edge has seen the first round and reported on it.
            let recs = match cloud.read(&down, 0, Default::default()).unwrap() {
                keel_log::Read::Records(s) => s.records,
                keel_log::Read::Snapshot { .. } => unreachable!(),
            };
            for r in &recs {
                es.apply_change(&r.key, &r.payload).unwrap();
            }
            edge.append_replicated(&down, recs).unwrap();
        }
        for i in 0..BEHIND {
            let key = format!("pods/default/web-{i}");
            let c = es
                .edit_merge_patch(&key, &ea, &status(round * BEHIND + i))
                .unwrap()
                .unwrap();
            t += 1;
            edge.append_local(&up, Entry::new(node, key, PayloadKind::Change, c), t);
        }
        if round == 0 {
            let recs = match edge.read(&up, 0, Default::default()).unwrap() {
                keel_log::Read::Records(s) => s.records,
                keel_log::Read::Snapshot { .. } => unreachable!(),
            };
            for r in &recs {
                cs.apply_change(&r.key, &r.payload).unwrap();
            }
            cloud.append_replicated(&up, recs).unwrap();
        }
    }
    Template {
        cloud,
        edge,
        cloud_store: cs,
        edge_store: es,
    }
}

fn pairs(templates: &[Template], nodes: usize, with_objects: bool) -> Vec<Pair> {
    templates
        .iter()
        .take(nodes)
        .enumerate()
        .map(|(i, t)| {
            let objects = with_objects.then(|| (t.cloud_store.clone(), t.edge_store.clone()));
            Pair::new(
                &format!("edge-{i}"),
                t.cloud.clone(),
                t.edge.clone(),
                objects,
            )
        })
        .collect()
}

fn catchup(c: &mut Criterion) {
    let all = std::env::var("KEEL_CATCHUP_NODES")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(NODES)
        .max(10);
    if !wanted(&format!("catchup/{all}-nodes")) && !wanted(&format!("catchup/{}-nodes", all / 10)) {
        return;
    }
    let start = Instant::now();
    let t: Vec<Template> = (0..all).map(|i| template(&format!("edge-{i}"))).collect();
    eprintln!("{all} node templates made in {:?}", start.elapsed());
    for (nodes, name, with_objects) in [
        (all, "links-only", false),
        (all / 10, "concurrent-edits", true),
    ] {
        let mut g = c.benchmark_group(format!("catchup/{nodes}-nodes"));
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(500))
            .measurement_time(Duration::from_secs(10))
            .throughput(Throughput::Elements(nodes as u64 * BEHIND * 2));
        let mut warm = false;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut ps = pairs(&t, nodes, with_objects);
                    perf_ctl("enable\n", warm);
                    let start = Instant::now();
                    let mut moved = 0;
                    for p in &mut ps {
                        moved += p.run().unwrap();
                    }
                    total += start.elapsed();
                    perf_ctl("disable\n", warm);
                    warm = true;
                    assert_eq!(moved, nodes as u64 * BEHIND * 2);
                    drop(ps);
                }
                total
            })
        });
        g.finish();
    }
}

/// Nodes and pods per node of the CRDT-apply catch-up: 10,000 objects.
const APPLY_NODES: usize = 1_000;
const PODS: usize = 10;

/// The saved state of a pod whose document holds `history` changes: its
/// creation by the cloud, then status changes by a node that ran it before.
fn pod_with_history(history: usize) -> Vec<u8> {
    let key = "pods/default/template";
    let mut s = ObjectStore::new();
    s.edit_merge_patch(key, &ActorId::from_name("cloud"), &json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"nodeName": "edge-past", "containers": [{"name": "app", "image": "registry.local/app:1"}]}}))
        .unwrap();
    let past = ActorId::from_name("edge-past");
    for i in 1..history as u64 {
        s.edit_merge_patch(key, &past, &status(i)).unwrap();
    }
    s.settle(key);
    assert_eq!(s.history_len(key), history);
    s.save(key).unwrap()
}

/// One node of the CRDT-apply catch-up: the cloud holding its pods, the
/// node's log one status change per pod ahead.
struct ApplyTemplate {
    cloud: MemLog,
    edge: MemLog,
    cloud_store: ObjectStore,
}

/// `base` holds the node's pods (`pods/default/web-P`, as the cloud and the
/// node both hold them; `edge_base` the same with their documents in
/// memory, as the node writes to them): the node writes one status change
/// to each.
fn apply_template(
    node: &str,
    base: &ObjectStore,
    edge_base: &ObjectStore,
    round: u64,
) -> ApplyTemplate {
    let (down, up) = (down_stream(node), up_stream(node));
    let cloud = MemLog::with_streams([(down.clone(), Role::Writer), (up.clone(), Role::Replica)]);
    let mut edge = MemLog::with_streams([(up.clone(), Role::Writer), (down, Role::Replica)]);
    let mut edge_store = edge_base.clone();
    let actor = ActorId::from_name(node);
    for p in 0..PODS {
        let key = format!("pods/default/web-{p}");
        let change = edge_store
            .edit_merge_patch(&key, &actor, &status(round + p as u64))
            .unwrap()
            .unwrap();
        edge.append_local(
            &up,
            Entry::new(node, key, PayloadKind::Change, change),
            p as u64 + 1,
        );
    }
    ApplyTemplate {
        cloud,
        edge,
        cloud_store: base.clone(),
    }
}

/// Whether the command line's filter (if any) may select a benchmark whose
/// name starts with `group`: the setup of groups not run is skipped.
fn wanted(group: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        // Not the options' values (`--measurement-time 8`).
        .filter(|a| !a.starts_with('-') && a.parse::<f64>().is_err())
        .collect();
    filters.is_empty()
        || filters
            .iter()
            .any(|f| group.contains(f.as_str()) || f.contains(group))
}

fn crdt_catchup(c: &mut Criterion) {
    for history in [1usize, 1000] {
        let group = format!("catchup/crdt-apply/{}-objects", APPLY_NODES * PODS);
        if !wanted(&group) {
            continue;
        }
        let start = Instant::now();
        let saved = pod_with_history(history);
        let mut base = ObjectStore::new();
        for p in 0..PODS {
            base.load(&format!("pods/default/web-{p}"), &saved).unwrap();
        }
        // (Reading each document's history loads it: its copies share it.)
        let edge_base = base.clone();
        for p in 0..PODS {
            assert_eq!(
                edge_base.history_len(&format!("pods/default/web-{p}")),
                history
            );
        }
        let t: Vec<ApplyTemplate> = (0..APPLY_NODES)
            .map(|i| apply_template(&format!("edge-{i}"), &base, &edge_base, 1000 + i as u64))
            .collect();
        eprintln!(
            "{} objects with {history} changes of history made in {:?}",
            APPLY_NODES * PODS,
            start.elapsed()
        );
        let mut g = c.benchmark_group(group);
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_secs(2))
            .throughput(Throughput::Elements((APPLY_NODES * PODS) as u64));
        let mut warm = false;
        g.bench_function(format!("history-{history}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut ps: Vec<Pair> = t
                        .iter()
                        .enumerate()
                        .map(|(i, t)| {
                            Pair::new(
                                &format!("edge-{i}"),
                                t.cloud.clone(),
                                t.edge.clone(),
                                Some((t.cloud_store.clone(), ObjectStore::new())),
                            )
                        })
                        .collect();
                    perf_ctl("enable\n", warm);
                    let start = Instant::now();
                    let mut moved = 0;
                    for p in &mut ps {
                        moved += p.run().unwrap();
                    }
                    total += start.elapsed();
                    perf_ctl("disable\n", warm);
                    warm = true;
                    assert_eq!(moved, (APPLY_NODES * PODS) as u64);
                    // Every change applied (not queued, not refused).
                    let p = ps.first().unwrap();
                    let store = &p.objects.as_ref().unwrap().0;
                    assert_eq!(store.history_len("pods/default/web-0"), history + 1);
                    drop(ps);
                }
                total
            })
        });
        g.finish();
    }
}

fn crdt_apply(c: &mut Criterion) {
    // One full tail of the fast path.
    const N: u64 = 64;
    let (ca, ea) = (ActorId::from_name("cloud"), ActorId::from_name("edge-1"));
    let key = "pods/default/web-0";
    let mut g = c.benchmark_group("crdt/apply-pod-status");
    g.sample_size(10).throughput(Throughput::Elements(N));
    for history in [0u64, 100, 1000] {
        // A pod whose document holds `history` status changes, and the next
        // N status changes made on top of it.
        let mut source = ObjectStore::new();
        let create = source
            .edit_merge_patch(key, &ca, &json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-0"}, "spec": {"containers": [{"name": "app", "image": "registry.local/app:1"}]}}))
            .unwrap()
            .unwrap();
        let past: Vec<Vec<u8>> = (0..history)
            .map(|i| {
                source
                    .edit_merge_patch(key, &ea, &status(i))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let next: Vec<Vec<u8>> = (history..history + N)
            .map(|i| {
                source
                    .edit_merge_patch(key, &ea, &status(i))
                    .unwrap()
                    .unwrap()
            })
            .collect();
        let bytes: usize = next.iter().map(Vec::len).sum();
        eprintln!("pod-status change: {} bytes on average", bytes as u64 / N);
        let mut base = ObjectStore::new();
        base.apply_change(key, &create).unwrap();
        for ch in &past {
            base.apply_change(key, ch).unwrap();
        }
        base.settle(key);
        for settle in [false, true] {
            let name = if settle {
                format!("history-{history}/then-automerge")
            } else {
                format!("history-{history}")
            };
            g.bench_function(name, |b| {
                b.iter_batched(
                    || base.clone(),
                    |mut s| {
                        for ch in &next {
                            assert_eq!(s.apply_change(key, ch).unwrap(), Applied::New);
                        }
                        if settle {
                            s.settle(key);
                        }
                        s
                    },
                    criterion::BatchSize::LargeInput,
                )
            });
        }
        // The same N changes handed over together (as catch-up after an
        // offline period does for one object).
        g.bench_function(format!("history-{history}/one-batch"), |b| {
            b.iter_batched(
                || base.clone(),
                |mut s| {
                    let r = s.apply_changes(key, next.iter().map(Vec::as_slice));
                    assert!(r.iter().all(|r| matches!(r, Ok(Applied::New))));
                    s
                },
                criterion::BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, catchup, crdt_catchup, crdt_apply);
criterion_main!(benches);
