//! Crash test: a child process appends to several streams in a loop and
//! reports every acknowledged (durable) append on stdout; the parent
//! SIGKILLs it at a random instant, reopens the store, and checks that every
//! acknowledged record is there, in order, with the chain intact. Repeated
//! for `KEEL_CRASH_ROUNDS` rounds (default 24) on the same directory.
//!
//! Runs without the libtest harness: the same binary is the child when
//! `KEEL_CRASH_CHILD` names a directory.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use keel_log::{Entry, PayloadKind, Read, ReadLimits, Role, Store, StoreOptions, VerifyOnOpen};

const STREAMS: usize = 4;

fn stream(i: usize) -> String {
    format!("crash-node-{i}/up")
}

/// Stream 0 writes records of 6 KB (groups of 6 to 24 KB, past the size
/// the store writes to fjall on its apply thread, so a kill also lands
/// while acknowledged groups wait for that thread); the others 200 bytes.
fn payload(i: usize, counter: u64) -> Vec<u8> {
    let mut p = format!("{i}:{counter}:").into_bytes();
    p.resize(if i == 0 { 6000 } else { 200 }, b'x');
    p
}

fn child(dir: &str) {
    // The apply thread slowed down, so that a kill lands while
    // acknowledged groups still wait for it, and a small commit journal
    // that wraps often (a checkpoint that freed the space of an entry
    // fjall does not hold yet would let it be overwritten).
    let opts = StoreOptions {
        slow_apply: Some(Duration::from_millis(2)),
        commit_journal_bytes: 1 << 20,
        ..StoreOptions::default()
    };
    let store = Store::open(dir, opts).expect("child open");
    let mut handles = Vec::new();
    for i in 0..STREAMS {
        let store = store.clone();
        handles.push(std::thread::spawn(move || {
            let name = stream(i);
            let info = store.create_stream(&name, Role::Writer, 1).expect("create");
            let mut counter = info.head.seq;
            let mut batch = 1 + i; // 1..=4 entries per append, per stream
            loop {
                let entries = (0..batch)
                    .map(|k| {
                        Entry::new(
                            "crash-test",
                            format!("obj-{}", (counter + k as u64) % 7),
                            PayloadKind::Change,
                            payload(i, counter + k as u64),
                        )
                    })
                    .collect();
                let head = store.append(&name, entries).expect("append");
                counter += batch as u64;
                assert_eq!(head.seq, counter);
                let out = std::io::stdout();
                let mut out = out.lock();
                writeln!(out, "ACK {i} {}", head.seq).expect("stdout");
                out.flush().expect("flush");
                batch = batch % 4 + 1;
            }
        }));
    }
    for h in handles {
        let _ = h.join();
    }
}

fn parent() {
    let rounds: usize = std::env::var("KEEL_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut total_acked = 0u64;
    let mut checked = [0u64; STREAMS];
    let mut acked_before = [0u64; STREAMS];
    // A small deterministic spread of kill instants (ms after the first ack).
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for round in 1..=rounds {
        let mut child = Command::new(&exe)
            .env("KEEL_CRASH_CHILD", dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let kill_after = Duration::from_millis(5 + seed % 250);
        let (tx, rx) = std::sync::mpsc::channel::<(usize, u64)>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut it = line.split_whitespace();
                if it.next() != Some("ACK") {
                    continue;
                }
                // A line cut short by the kill does not parse and is ignored.
                let (Some(i), Some(seq)) = (it.next(), it.next()) else {
                    continue;
                };
                let (Ok(i), Ok(seq)) = (i.parse(), seq.parse()) else {
                    continue;
                };
                if tx.send((i, seq)).is_err() {
                    break;
                }
            }
        });
        // Wait for the first ack, then let it run a little and kill -9.
        let mut acked: BTreeMap<usize, u64> = BTreeMap::new();
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("child made no progress");
        acked.insert(first.0, first.1);
        let deadline = Instant::now() + kill_after;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok((i, s)) => {
                    let e = acked.entry(i).or_default();
                    *e = (*e).max(s);
                }
                Err(_) => break,
            }
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        reader.join().unwrap();
        while let Ok((i, s)) = rx.try_recv() {
            let e = acked.entry(i).or_default();
            *e = (*e).max(s);
        }

        let store = Store::open(
            dir.path(),
            StoreOptions {
                verify_on_open: VerifyOnOpen::Full,
                ..StoreOptions::default()
            },
        )
        .unwrap_or_else(|e| panic!("round {round}: reopen failed: {e}"));
        for i in 0..STREAMS {
            let name = stream(i);
            let Ok(info) = store.info(&name) else {
                assert!(!acked.contains_key(&i), "round {round}: stream {name} lost");
                continue;
            };
            let want = acked.get(&i).copied().unwrap_or(0);
            assert!(
                info.head.seq >= want,
                "round {round}: {name} recovered to seq {} but seq {want} was acked",
                info.head.seq
            );
            // Opening with VerifyOnOpen::Full checked the whole chain. Every
            // record since the last round is where the writer put it.
            let mut after = checked[i].min(info.head.seq);
            while after < info.head.seq {
                let Read::Records(seg) = store.read(&name, after, ReadLimits::default()).unwrap()
                else {
                    panic!("no compaction in this test")
                };
                for r in &seg.records {
                    assert_eq!(
                        &r.payload[..],
                        &payload(i, r.seq - 1)[..],
                        "round {round}: {name} seq {}",
                        r.seq
                    );
                }
                after = seg.end().seq;
            }
            checked[i] = info.head.seq;
            total_acked += want - acked_before[i].min(want);
            acked_before[i] = want;
        }
        drop(store);
    }
    println!(
        "crash test: {rounds} SIGKILL rounds, {total_acked} acked records, every one recovered with its chain intact, 0 lost"
    );
}

fn main() {
    if let Ok(dir) = std::env::var("KEEL_CRASH_CHILD") {
        child(&dir);
        return;
    }
    parent();
}
