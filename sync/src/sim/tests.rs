#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn seeds() -> std::ops::Range<u64> {
    if let Ok(s) = std::env::var("KEEL_SIM_SEED") {
        let s: u64 = s.parse().unwrap_or(0);
        return s..s + 1;
    }
    let n: u64 = std::env::var("KEEL_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    0..n
}

#[test]
fn simulated_faults_lose_nothing_and_converge() {
    let seeds = seeds();
    let edges = 16;
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(4);
    let list: Vec<u64> = seeds.clone().collect();
    let chunks: Vec<Vec<u64>> = (0..threads)
        .map(|t| list.iter().copied().skip(t).step_by(threads).collect())
        .collect();
    let reports: Vec<SimReport> = std::thread::scope(|s| {
        let handles: Vec<_> = chunks
            .into_iter()
            .map(|chunk| {
                s.spawn(move || {
                    chunk
                        .into_iter()
                        .map(|seed| Sim::new(SimConfig::new(seed, edges)).run())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let failed: Vec<&SimReport> = reports
        .iter()
        .filter(|r| !r.violations.is_empty())
        .collect();
    let total = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    // Written to the process's stderr directly, so it shows even when the
    // test harness captures output.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stderr(),
        "simulator: seeds {}..{} ({} runs, {edges} edges each): {} records written, {} acks, {} messages ({} lost), {} crashes, {} partitions, {} compactions, {} snapshots sent, {} connections, {} refusals of hostile edges, {} rebases, {} re-assertions, {} deleted objects forgotten; {} runs with violations",
        seeds.start,
        seeds.end,
        reports.len(),
        total(|r| r.records_written),
        total(|r| r.acks),
        total(|r| r.messages),
        total(|r| r.lost_messages),
        total(|r| r.crashes),
        total(|r| r.partitions),
        total(|r| r.compactions),
        total(|r| r.snapshots_sent),
        total(|r| r.connections),
        total(|r| r.refusals),
        total(|r| r.rebases),
        total(|r| r.reasserted),
        total(|r| r.forgotten),
        failed.len(),
    );
    for r in failed.iter().take(5) {
        println!(
            "FAILED seed {} (replay: KEEL_SIM_SEED={} cargo test -p keel-sync sim::)",
            r.seed, r.seed
        );
        for v in r.violations.iter().take(5) {
            println!("    {v}");
        }
    }
    assert_eq!(reports.len(), seeds.count());
    assert!(
        failed.is_empty(),
        "{} of {} seeds violated an invariant; see the seeds above",
        failed.len(),
        reports.len()
    );
    assert!(reports.iter().all(|r| r.converged));
    // The faults really happened.
    if reports.len() >= 100 {
        assert!(
            total(|r| r.crashes) > 0
                && total(|r| r.partitions) > 0
                && total(|r| r.lost_messages) > 0
        );
        assert!(total(|r| r.compactions) > 0);
        // Hostile edges ran, and the cloud refused them.
        assert!(total(|r| r.refusals) > 0);
        // Histories were rebased, and edges ahead of a root re-asserted.
        assert!(total(|r| r.rebases) > 0 && total(|r| r.reasserted) > 0);
        // Deleted objects were forgotten at compactions.
        assert!(total(|r| r.forgotten) > 0);
    }
}

/// A link that acknowledges before persisting is caught.
#[test]
fn checker_catches_ack_before_persist() {
    let caught = (0..20)
        .map(|seed| {
            let mut cfg = SimConfig::new(seed, 4);
            cfg.fault = Some(Fault::AckBeforePersist);
            Sim::new(cfg).run()
        })
        .filter(|r| {
            r.violations
                .iter()
                .any(|v| v.contains("acknowledged but the receiver") || v.contains("lost"))
        })
        .count();
    assert!(
        caught >= 10,
        "only {caught} of 20 runs caught acks before persist"
    );
}

/// A link that skips a record is caught.
#[test]
fn checker_catches_a_skipped_record() {
    let caught = (0..20)
        .map(|seed| {
            let mut cfg = SimConfig::new(seed, 4);
            cfg.fault = Some(Fault::SkipRecord);
            Sim::new(cfg).run()
        })
        .filter(|r| r.violations.iter().any(|v| v.contains("do not chain")))
        .count();
    assert!(
        caught >= 10,
        "only {caught} of 20 runs caught a skipped record"
    );
}

/// The same seed gives the same run.
#[test]
fn runs_are_deterministic() {
    let a = Sim::new(SimConfig::new(7, 4)).run();
    let b = Sim::new(SimConfig::new(7, 4)).run();
    assert_eq!(
        (
            a.steps,
            a.records_written,
            a.acks,
            a.messages,
            a.lost_messages,
            a.crashes
        ),
        (
            b.steps,
            b.records_written,
            b.acks,
            b.messages,
            b.lost_messages,
            b.crashes
        )
    );
    assert!(a.records_written > 0 && a.acks > 0);
}

/// A pair catches up both ways, applying every record once.
#[test]
fn pair_catches_up_both_ways() {
    let node = "edge-0";
    let mut cloud = MemLog::with_streams([
        (down_stream(node), Role::Writer),
        (up_stream(node), Role::Replica),
    ]);
    let mut edge = MemLog::with_streams([
        (up_stream(node), Role::Writer),
        (down_stream(node), Role::Replica),
    ]);
    let (mut cs, mut es) = (ObjectStore::new(), ObjectStore::new());
    let (ca, ea) = (ActorId::from_name("cloud"), ActorId::from_name(node));
    for i in 0..10u64 {
        let key = format!("pods/default/p{i}");
        let c = cs
            .edit_merge_patch(&key, &ca, &json!({"spec": {"nodeName": node, "n": i}}))
            .unwrap()
            .unwrap();
        cloud.append_local(
            &down_stream(node),
            Entry::new("kubectl", key, PayloadKind::Change, c),
            i,
        );
    }
    edge.append_local(
        &up_stream(node),
        Entry::new(node, "devices/default/t", PayloadKind::Event, &b"21.5"[..]),
        1,
    );
    let mut pair = Pair::new(node, cloud, edge, Some((cs, es.clone())));
    assert_eq!(pair.run().unwrap(), 11);
    let (cs, es2) = pair.objects.take().unwrap();
    for i in 0..10u64 {
        let key = format!("pods/default/p{i}");
        assert_eq!(cs.get_json(&key), es2.get_json(&key));
        assert!(es2.get_json(&key).is_some());
    }
    // The edge writes status on what it received; it flows back.
    es = es2;
    let change = es
        .edit_merge_patch(
            "pods/default/p3",
            &ea,
            &json!({"status": {"phase": "Running"}}),
        )
        .unwrap()
        .unwrap();
    pair.edge.append_local(
        &up_stream(node),
        Entry::new(node, "pods/default/p3", PayloadKind::Change, change),
        2,
    );
    pair.objects = Some((cs, es));
    assert_eq!(pair.run().unwrap(), 1);
    let (cs, es) = pair.objects.take().unwrap();
    assert_eq!(
        cs.get_json("pods/default/p3"),
        es.get_json("pods/default/p3")
    );
    assert_eq!(
        cs.get_json("pods/default/p3").unwrap()["status"]["phase"],
        "Running"
    );
    assert_eq!(
        pair.cloud.head(&up_stream(node)),
        pair.edge.head(&up_stream(node))
    );
}

/// The in-memory log's batches read as one vector: whatever mix of single
/// records, batches, compactions and resets, every index gives what a
/// vector given the same records gives.
#[test]
fn records_read_as_one_vector() {
    use proptest::prelude::*;
    let record = |i: usize| Record {
        seq: i as u64 + 1,
        epoch: 1,
        hlc: 0,
        origin: "edge-1".into(),
        key: format!("k{i}").into(),
        kind: PayloadKind::Event,
        payload: Bytes::new(),
        hash: Hash::ZERO,
    };
    // (0: push one, 1: push a batch of n, 2: take n from the front, 3: clear)
    let ops = prop::collection::vec((0u8..4, 0usize..6), 0..40);
    proptest!(|(ops in ops)| {
        let (mut held, mut want, mut next) = (Records::default(), Vec::new(), 0);
        for (op, n) in ops {
            match op {
                0 => {
                    held.push(record(next));
                    want.push(record(next));
                    next += 1;
                }
                1 => {
                    let batch: Vec<Record> = (next..next + n).map(record).collect();
                    next += n;
                    let pushed = held.push_batch(batch.clone()).to_vec();
                    prop_assert_eq!(pushed, batch.clone());
                    want.extend(batch);
                }
                2 => {
                    let n = n.min(want.len());
                    prop_assert_eq!(held.take_front(n), want.drain(..n).collect::<Vec<_>>());
                }
                _ => {
                    held.clear();
                    want.clear();
                }
            }
            prop_assert_eq!(held.len(), want.len());
            prop_assert_eq!(held.is_empty(), want.is_empty());
            prop_assert_eq!(held.last(), want.last());
            prop_assert!(held.iter().eq(want.iter()));
            prop_assert!(held.batches().all(|b| !b.is_empty()));
            for i in 0..=want.len() {
                prop_assert_eq!(held.get(i), want.get(i));
            }
        }
    });
}

/// A writer's records read in wire form are, byte for byte, the segment
/// [`MemLog::segment`] reads and the link would encode, within the same
/// limits; a range holding a replicated record is not served so.
#[test]
fn records_in_wire_form_encode_as_their_segment() {
    use proptest::prelude::*;
    let record = |i: usize, payload: usize| Record {
        seq: i as u64 + 1,
        epoch: 1 + (i as u64 / 7),
        hlc: i as u64 * 3,
        origin: "edge-1".into(),
        key: format!("pods/default/p{i}").into(),
        kind: PayloadKind::Change,
        payload: Bytes::from(vec![i as u8; payload]),
        hash: Hash([i as u8; 32]),
    };
    // (0: push one local record, 1: push a replicated batch of n,
    // 2: take n from the front), n, payload size.
    let ops = prop::collection::vec((0u8..3, 0usize..6, 0usize..300), 0..30);
    let limits = prop::collection::vec((1usize..8, 1usize..2_000), 1..4);
    proptest!(|(ops in ops, limits in limits)| {
        let (mut held, mut want, mut next) = (Records::default(), Vec::new(), 0);
        for (op, n, payload) in ops {
            match op {
                0 => {
                    held.push(record(next, payload));
                    want.push((record(next, payload), true));
                    next += 1;
                }
                1 => {
                    let batch: Vec<Record> = (next..next + n).map(|i| record(i, payload)).collect();
                    next += n;
                    held.push_batch(batch.clone());
                    want.extend(batch.into_iter().map(|r| (r, false)));
                }
                _ => {
                    let n = n.min(want.len());
                    held.take_front(n);
                    want.drain(..n);
                }
            }
            for i in 0..want.len() {
                for &(max_records, max_bytes) in &limits {
                    let lim = ReadLimits { max_records, max_bytes };
                    let prev = Cursor { epoch: 9, seq: 41, hash: Hash([7; 32]) };
                    let got = held.encoded("up/edge-1", prev, i, lim);
                    // The records MemLog::segment takes from the i-th on.
                    let (mut records, mut local, mut bytes) = (Vec::new(), true, 0);
                    for (r, l) in want.get(i..).unwrap_or_default() {
                        if records.len() >= max_records.max(1) || (bytes >= max_bytes && !records.is_empty()) {
                            break;
                        }
                        bytes += r.size_hint();
                        local &= *l;
                        records.push(r.clone());
                    }
                    let Some(got) = got else {
                        prop_assert!(!local, "records {i}.. held in wire form not served so");
                        continue;
                    };
                    prop_assert!(local, "a replicated record served in wire form");
                    let seg = Segment {
                        stream: "up/edge-1".into(),
                        epoch: records.first().map(|r| r.epoch).unwrap_or(prev.epoch),
                        prev,
                        records,
                    };
                    prop_assert_eq!(got.records, seg.records.len());
                    prop_assert_eq!(got.end, seg.end());
                    prop_assert_eq!(got.size, bytes);
                    prop_assert_eq!(
                        encode_frame(&crate::frame::Frame::EncodedSegment(got)),
                        encode_frame(&crate::frame::Frame::Segment(seg))
                    );
                }
            }
        }
    });
}
