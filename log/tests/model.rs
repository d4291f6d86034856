//! Model test: random append / read / compact / check-cursor / reopen
//! sequences against an in-memory model of what the log must hold.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;

use keel_log::{
    ConcatFold, Cursor, CursorCheck, Entry, Hash, PayloadKind, Read, ReadLimits, Role, Store,
    StoreOptions,
};
use proptest::prelude::*;

const STREAMS: usize = 3;

#[derive(Clone, Debug)]
enum Op {
    Append {
        s: usize,
        entries: Vec<(u8, bool, Vec<u8>)>,
    },
    Read {
        s: usize,
        at: f64,
        max_records: usize,
        max_bytes: usize,
    },
    Compact {
        s: usize,
        at: f64,
    },
    Check {
        s: usize,
        at: f64,
        flip: bool,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let s = 0..STREAMS;
    prop_oneof![
        // Now and then a payload of a few KB: groups past 4 KiB reach
        // fjall on the store's apply thread.
        4 => (s.clone(), prop::collection::vec((0u8..5, prop::bool::weighted(0.1), prop_oneof![9 => prop::collection::vec(any::<u8>(), 0..300), 1 => prop::collection::vec(any::<u8>(), 2000..6000)]), 1..12))
            .prop_map(|(s, entries)| Op::Append { s, entries }),
        3 => (s.clone(), 0.0..=1.0f64, 1usize..20, 1usize..3000)
            .prop_map(|(s, at, max_records, max_bytes)| Op::Read { s, at, max_records, max_bytes }),
        1 => (s.clone(), 0.0..=1.0f64).prop_map(|(s, at)| Op::Compact { s, at }),
        1 => (s.clone(), 0.0..=1.0f64, any::<bool>()).prop_map(|(s, at, flip)| Op::Check { s, at, flip }),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Default, Clone)]
struct ModelStream {
    /// (key, kind, payload) of seq i+1.
    records: Vec<(String, PayloadKind, Vec<u8>)>,
    /// Hashes learned from reads; history must never change.
    hashes: BTreeMap<u64, Hash>,
    horizon: u64,
}

impl ModelStream {
    fn head(&self) -> u64 {
        self.records.len() as u64
    }
    fn seq_at(&self, at: f64) -> u64 {
        (at * self.head() as f64).floor() as u64
    }
    /// What ConcatFold leaves for each object after folding up to `horizon`.
    fn objects(&self) -> BTreeMap<String, (u64, Vec<u8>)> {
        let mut out: BTreeMap<String, (u64, Vec<u8>)> = BTreeMap::new();
        for (i, (k, kind, p)) in self.records.iter().enumerate().take(self.horizon as usize) {
            if *kind == PayloadKind::Tombstone {
                out.remove(k);
            } else {
                let e = out.entry(k.clone()).or_default();
                e.0 = i as u64 + 1;
                e.1.extend_from_slice(p);
            }
        }
        out
    }
}

fn name(s: usize) -> String {
    format!("node-{s}/down")
}

fn check_segment(m: &mut ModelStream, seg: &keel_log::Segment, after: u64, limits: (usize, usize)) {
    assert_eq!(seg.prev.seq, after);
    let want = (m.head() - after) as usize;
    assert!(seg.records.len() <= limits.0.max(1));
    if want > 0 {
        assert!(
            !seg.records.is_empty(),
            "read returned nothing though records exist"
        );
    }
    let bytes: usize = seg.records.iter().map(|r| r.size_hint()).sum();
    if seg.records.len() > 1 {
        let without_last = bytes - seg.records.last().unwrap().size_hint();
        assert!(
            without_last < limits.1,
            "read overshot the byte limit by more than one record"
        );
    }
    if seg.records.len() < want && seg.records.len() < limits.0 {
        assert!(
            bytes >= limits.1,
            "read stopped early without reaching a limit"
        );
    }
    let mut prev = seg.prev.hash;
    for (i, r) in seg.records.iter().enumerate() {
        let seq = after + 1 + i as u64;
        assert_eq!(r.seq, seq);
        let (k, kind, p) = &m.records[seq as usize - 1];
        assert_eq!(&r.key, k);
        assert_eq!(r.kind, *kind);
        assert_eq!(&r.payload[..], &p[..]);
        assert_eq!(r.expected_hash(&prev), r.hash);
        prev = r.hash;
        let h = m.hashes.entry(seq).or_insert(r.hash);
        assert_eq!(*h, r.hash, "history rewritten at seq {seq}");
    }
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Some(Store::open(dir.path(), StoreOptions::default()).unwrap());
    let mut model = vec![ModelStream::default(); STREAMS];
    for s in 0..STREAMS {
        store
            .as_ref()
            .unwrap()
            .create_stream(&name(s), Role::Writer, 1)
            .unwrap();
    }
    for op in ops {
        let st = store.as_ref().unwrap();
        match op {
            Op::Append { s, entries } => {
                let es: Vec<Entry> = entries
                    .iter()
                    .map(|(k, tomb, p)| {
                        let kind = if *tomb {
                            PayloadKind::Tombstone
                        } else {
                            PayloadKind::Change
                        };
                        Entry::new("model", format!("obj-{k}"), kind, p.clone())
                    })
                    .collect();
                for e in &es {
                    model[s]
                        .records
                        .push((e.key.clone(), e.kind, e.payload.to_vec()));
                }
                let c = st.append(&name(s), es).unwrap();
                assert_eq!(c.seq, model[s].head());
                model[s].hashes.insert(c.seq, c.hash);
            }
            Op::Read {
                s,
                at,
                max_records,
                max_bytes,
            } => {
                let m = &mut model[s];
                let after = m.seq_at(at);
                let limits = ReadLimits {
                    max_records,
                    max_bytes,
                };
                match st.read(&name(s), after, limits).unwrap() {
                    Read::Records(seg) => {
                        assert!(after >= m.horizon, "records below the horizon at {after}");
                        check_segment(m, &seg, after, (max_records, max_bytes));
                    }
                    Read::Snapshot { snapshot, tail } => {
                        assert!(after < m.horizon, "snapshot although {after} >= horizon");
                        assert_eq!(snapshot.base.seq, m.horizon);
                        let got: BTreeMap<String, (u64, Vec<u8>)> = snapshot
                            .objects
                            .iter()
                            .map(|o| (o.key.clone(), (o.seq, o.state.to_vec())))
                            .collect();
                        assert_eq!(got, m.objects());
                        let h = m.horizon;
                        check_segment(m, &tail, h, (max_records, max_bytes));
                    }
                }
            }
            Op::Compact { s, at } => {
                let m = &mut model[s];
                let upto = m.seq_at(at);
                let c = st.compact(&name(s), upto, &ConcatFold).unwrap();
                m.horizon = m.horizon.max(upto);
                assert_eq!(c.seq, m.horizon);
            }
            Op::Check { s, at, flip } => {
                let m = &model[s];
                let seq = m.seq_at(at);
                let Some(hash) = (if seq == 0 {
                    Some(Hash::ZERO)
                } else {
                    m.hashes.get(&seq).copied()
                }) else {
                    continue;
                };
                let mut hash = hash;
                if flip {
                    hash.0[0] ^= 1;
                }
                let got = st
                    .check_cursor(
                        &name(s),
                        &Cursor {
                            epoch: 1,
                            seq,
                            hash,
                        },
                    )
                    .unwrap();
                let want = if seq < m.horizon {
                    CursorCheck::BelowHorizon
                } else if flip {
                    CursorCheck::Mismatch
                } else {
                    CursorCheck::Match
                };
                assert_eq!(got, want, "cursor at {seq} flip={flip}");
                let ahead = st
                    .check_cursor(
                        &name(s),
                        &Cursor {
                            epoch: 1,
                            seq: m.head() + 1,
                            hash,
                        },
                    )
                    .unwrap();
                assert_eq!(ahead, CursorCheck::Ahead);
            }
            Op::Reopen => {
                drop(store.take());
                store = Some(Store::open(dir.path(), StoreOptions::default()).unwrap());
            }
        }
        // Invariants after every step: head and horizon as the model says.
        let st = store.as_ref().unwrap();
        for (s, m) in model.iter().enumerate() {
            let info = st.info(&name(s)).unwrap();
            assert_eq!(info.head.seq, m.head());
            assert_eq!(info.horizon.seq, m.horizon);
        }
    }
    // The whole chain still verifies at the end.
    for (s, m) in model.iter().enumerate() {
        let st = store.as_ref().unwrap();
        assert_eq!(st.verify(&name(s)).unwrap().seq, m.head());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn log_matches_model(ops in prop::collection::vec(op(), 1..40)) {
        run(ops);
    }
}
