//! Durable append throughput of keel-log against SQLite (what KubeEdge keeps
//! edge state in), same writers and batches in the same run, plus segment
//! read throughput.
//!
//! `cargo bench -p keel-benches --bench log_append`
//!
//! Every writer thread appends `batch` records of 256 bytes and waits until
//! they are durable before the next batch. keel-log: one stream per writer,
//! one store (group commit across writers). SQLite: one connection per
//! writer to one database, WAL, `synchronous=FULL`, one transaction per
//! batch. Throughput is reported in records/s.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    missing_docs
)]

// keel's allocator (see `keel_benches`).
use keel_benches as _;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel_log::{Entry, PayloadKind, Read, ReadLimits, Role, Store, StoreOptions};

const RECORD: usize = 256;
const BATCHES: [usize; 3] = [1, 16, 256];
const WRITERS: [usize; 2] = [1, 32];

fn entries(batch: usize, n: u64) -> Vec<Entry> {
    (0..batch)
        .map(|i| {
            Entry::new(
                "bench",
                format!("pods/default/p{}", (n as usize + i) % 100),
                PayloadKind::Change,
                vec![0xab; RECORD],
            )
        })
        .collect()
}

/// Runs `iters` batches on each of `writers` threads, timed from a common start.
fn run_threads<S: Send>(states: &mut [S], iters: u64, f: impl Fn(&mut S, u64) + Sync) -> Duration {
    let barrier = Barrier::new(states.len() + 1);
    std::thread::scope(|s| {
        for st in states.iter_mut() {
            let (barrier, f) = (&barrier, &f);
            s.spawn(move || {
                barrier.wait();
                for n in 0..iters {
                    f(st, n);
                }
            });
        }
        barrier.wait();
        let start = Instant::now();
        // Scope joins all writers before returning.
        start
    })
    .elapsed()
}

fn append(c: &mut Criterion) {
    let mut g = c.benchmark_group("durable_append");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    for &batch in &BATCHES {
        for &writers in &WRITERS {
            g.throughput(Throughput::Elements((batch * writers) as u64));
            let param = format!("batch{batch}/writers{writers}");

            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            let mut streams: Vec<(Store, String)> = (0..writers)
                .map(|w| {
                    let name = format!("node-{w}/up");
                    store.create_stream(&name, Role::Writer, 1).unwrap();
                    (store.clone(), name)
                })
                .collect();
            g.bench_function(BenchmarkId::new("keel-log", &param), |b| {
                b.iter_custom(|iters| {
                    run_threads(&mut streams, iters, |(st, name), n| {
                        st.append(name, entries(batch, n)).unwrap();
                    })
                })
            });
            let stats = store.stats();
            eprintln!(
                "keel-log {param}: {:.1} records per fsync",
                stats.records as f64 / stats.groups.max(1) as f64
            );
            drop((streams, store));

            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("edge.db");
            let mut conns: Vec<(rusqlite::Connection, usize)> = (0..writers)
                .map(|w| {
                    let c = rusqlite::Connection::open(&path).unwrap();
                    // SQLite's default busy handler sleeps in steps of up to
                    // 100 ms, which starves 32 writers (≈15 records/s); a
                    // tight retry is the fair comparison.
                    c.busy_handler(Some(|_attempt| {
                        std::thread::sleep(Duration::from_micros(50));
                        true
                    }))
                    .unwrap();
                    c.pragma_update(None, "journal_mode", "WAL").unwrap();
                    c.pragma_update(None, "synchronous", "FULL").unwrap();
                    c.execute_batch(
                        "CREATE TABLE IF NOT EXISTS records (stream INTEGER, seq INTEGER, key TEXT, payload BLOB, PRIMARY KEY (stream, seq))",
                    )
                    .unwrap();
                    (c, w)
                })
                .collect();
            let mut seqs = vec![0u64; writers];
            let seq_cells: Vec<std::sync::atomic::AtomicU64> = seqs
                .drain(..)
                .map(std::sync::atomic::AtomicU64::new)
                .collect();
            g.bench_function(BenchmarkId::new("sqlite", &param), |b| {
                b.iter_custom(|iters| {
                    run_threads(&mut conns, iters, |(conn, w), n| {
                        let tx = conn
                            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                            .unwrap();
                        {
                            let mut stmt = tx
                                .prepare_cached("INSERT INTO records (stream, seq, key, payload) VALUES (?1, ?2, ?3, ?4)")
                                .unwrap();
                            for e in entries(batch, n) {
                                let seq = seq_cells[*w].fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                                stmt.execute(rusqlite::params![*w as i64, seq as i64, e.key, &e.payload[..]])
                                    .unwrap();
                            }
                        }
                        tx.commit().unwrap();
                    })
                })
            });
        }
    }
    g.finish();
}

fn read(c: &mut Criterion) {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.create_stream("node-0/down", Role::Writer, 1).unwrap();
    for n in 0..N / 1000 {
        store.append("node-0/down", entries(1000, n)).unwrap();
    }
    let mut g = c.benchmark_group("segment_read");
    g.sample_size(10).throughput(Throughput::Elements(N));
    g.bench_function("keel-log/256B/segments-of-1024", |b| {
        b.iter(|| {
            let mut after = 0;
            while after < N {
                let Read::Records(seg) = store
                    .read(
                        "node-0/down",
                        after,
                        ReadLimits {
                            max_records: 1024,
                            max_bytes: 4 << 20,
                        },
                    )
                    .unwrap()
                else {
                    unreachable!("no compaction here")
                };
                after = seg.end().seq;
            }
            after
        })
    });
    g.finish();
}

criterion_group!(benches, append, read);
criterion_main!(benches);
