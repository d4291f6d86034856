//! Recovery and corruption: a torn journal tail is tolerated, any other
//! corruption is an error (naming stream and seq where the log can know
//! them), a failed fsync poisons the store, and replicas only accept
//! records that extend their chain.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};

use keel_log::codec::{decode_record, encode_record};
use keel_log::wire::WireError;
use keel_log::{
    Chained, ConcatFold, CursorCheck, Entry, Error, PayloadKind, Read, ReadLimits, Role, Store,
    StoreOptions, VerifyOnOpen,
};

const S: &str = "edge-1/up";

fn entries(n: usize, tag: &str) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            Entry::new(
                "edge-1",
                format!("pods/default/p{}", i % 3),
                PayloadKind::Change,
                format!("{tag}-{i}"),
            )
        })
        .collect()
}

fn full() -> StoreOptions {
    StoreOptions {
        verify_on_open: VerifyOnOpen::Full,
        ..StoreOptions::default()
    }
}

/// Ten appends of ten records each, then close.
fn write_hundred(dir: &Path) {
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    store.create_stream(S, Role::Writer, 1).unwrap();
    for b in 0..10 {
        store.append(S, entries(10, &format!("b{b}"))).unwrap();
    }
}

fn journals(dir: &Path) -> Vec<PathBuf> {
    let mut j: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jnl"))
        .collect();
    j.sort();
    j
}

/// Bytes of a preallocated journal that hold data.
fn data_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1)
}

#[test]
fn torn_tail_recovers_to_a_verified_prefix() {
    let dir = tempfile::tempdir().unwrap();
    write_hundred(dir.path());
    let jnl = journals(dir.path()).pop().expect("a journal file");
    // The journal is preallocated with zeros; a write cut short by a crash
    // leaves the end of the last batch as zeros.
    let mut bytes = std::fs::read(&jnl).unwrap();
    let end = data_len(&bytes);
    bytes[end - 40..end].fill(0);
    std::fs::write(&jnl, &bytes).unwrap();

    let store = Store::open(dir.path(), full()).unwrap();
    let info = store.info(S).unwrap();
    assert_eq!(
        info.head.seq, 90,
        "the torn last batch is dropped, every earlier one kept"
    );
    assert_eq!(store.verify(S).unwrap(), info.head);
    // The stream goes on from the recovered head.
    let c = store.append(S, entries(5, "after")).unwrap();
    assert_eq!(c.seq, 95);
    assert_eq!(store.verify(S).unwrap().seq, 95);
}

/// What a crash right after the last ack leaves: fjall's journal is
/// synced only at checkpoints, so its tail may be lost; the commit journal
/// holds every acknowledged group and brings them back.
#[test]
fn acked_groups_lost_from_fjalls_journal_come_back_from_the_commit_journal() {
    let dir = tempfile::tempdir().unwrap();
    let ring = dir.path().join("commits.journal");
    let saved = {
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        store.create_stream(S, Role::Writer, 1).unwrap();
        for b in 0..10 {
            store.append(S, entries(10, &format!("b{b}"))).unwrap();
        }
        // The commit journal as it is at the last ack (a clean close then
        // empties it).
        std::fs::read(&ring).unwrap()
    };
    assert!(
        std::fs::metadata(&ring).unwrap().len() == 0,
        "a clean close leaves an empty commit journal"
    );
    // Lose the last two groups from fjall's journal, as a crash before its
    // next sync would: cut it back to the end of the eighth.
    let jnl = journals(dir.path()).pop().expect("a journal file");
    let bytes = std::fs::read(&jnl).unwrap();
    let end = data_len(&bytes);
    let tail = b"b8-0";
    let cut = bytes[..end]
        .windows(tail.len())
        .position(|w| w == tail)
        .expect("the ninth group in fjall's journal");
    let mut cut_bytes = bytes.clone();
    cut_bytes[cut - 200..].fill(0);
    std::fs::write(&jnl, &cut_bytes).unwrap();
    std::fs::write(&ring, &saved).unwrap();

    let store = Store::open(dir.path(), full()).unwrap();
    let info = store.info(S).unwrap();
    assert_eq!(info.head.seq, 100, "every acknowledged record is back");
    assert_eq!(store.verify(S).unwrap(), info.head);
    let Read::Records(seg) = store
        .read(
            S,
            90,
            ReadLimits {
                max_records: 10,
                max_bytes: 1 << 20,
            },
        )
        .unwrap()
    else {
        panic!("no compaction here")
    };
    assert_eq!(seg.records[9].payload.as_ref(), b"b9-9");
    let c = store.append(S, entries(5, "after")).unwrap();
    assert_eq!(c.seq, 105);
    drop(store);
    // And again after a clean close.
    let store = Store::open(dir.path(), full()).unwrap();
    assert_eq!(store.verify(S).unwrap().seq, 105);
}

#[test]
fn corrupt_journal_middle_is_an_error_not_a_silent_truncation() {
    let dir = tempfile::tempdir().unwrap();
    write_hundred(dir.path());
    let jnl = journals(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&jnl).unwrap();
    let mid = data_len(&bytes) / 2;
    bytes[mid] ^= 0x5a;
    std::fs::write(&jnl, &bytes).unwrap();
    let err =
        Store::open(dir.path(), full()).expect_err("a flipped byte mid-journal must not open");
    assert!(matches!(err, Error::Storage(_)), "got {err}");
    assert!(!err.to_string().is_empty());
}

#[test]
fn tampered_record_is_reported_with_stream_and_seq() {
    let dir = tempfile::tempdir().unwrap();
    write_hundred(dir.path());
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    // A well-formed record with a changed payload: only the chain catches it.
    let Read::Records(seg) = store
        .read(
            S,
            49,
            ReadLimits {
                max_records: 1,
                max_bytes: 1 << 20,
            },
        )
        .unwrap()
    else {
        panic!()
    };
    let mut r = seg.records[0].clone();
    assert_eq!(r.seq, 50);
    r.payload = bytes::Bytes::from_static(b"rewritten history");
    store.tamper_record(S, 50, encode_record(&r)).unwrap();

    match store.verify(S) {
        Err(Error::Corrupt { stream, seq, .. }) => assert_eq!((stream.as_str(), seq), (S, 50)),
        other => panic!("verify: {other:?}"),
    }
    match store.read(S, 40, ReadLimits::default()) {
        Err(Error::Corrupt { stream, seq, .. }) => assert_eq!((stream.as_str(), seq), (S, 50)),
        other => panic!("read: {other:?}"),
    }
    // Garbage bytes at seq 60 are reported too.
    store.tamper_record(S, 60, b"\x01garbage".to_vec()).unwrap();
    match store.read(S, 55, ReadLimits::default()) {
        Err(Error::Corrupt { stream, seq, .. }) => assert_eq!((stream.as_str(), seq), (S, 60)),
        other => panic!("read: {other:?}"),
    }
    drop(store);
    match Store::open(dir.path(), full()) {
        Err(Error::Corrupt { stream, seq, .. }) => assert_eq!((stream.as_str(), seq), (S, 50)),
        other => panic!("reopen: {other:?}"),
    }
}

#[test]
fn failed_fsync_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(
            dir.path(),
            StoreOptions {
                fail_sync_at_group: Some(4),
                ..StoreOptions::default()
            },
        )
        .unwrap();
        store.create_stream(S, Role::Writer, 1).unwrap(); // group 1
        store.append(S, entries(3, "a")).unwrap(); // group 2
        store.append(S, entries(3, "b")).unwrap(); // group 3
        assert!(matches!(
            store.append(S, entries(3, "c")),
            Err(Error::Poisoned)
        ));
        assert!(store.is_poisoned());
        assert!(matches!(
            store.append(S, entries(1, "d")),
            Err(Error::Poisoned)
        ));
        assert!(matches!(
            store.create_stream("other", Role::Writer, 1),
            Err(Error::Poisoned)
        ));
        assert!(matches!(
            store.compact(S, 3, &ConcatFold),
            Err(Error::Poisoned)
        ));
        // What was acknowledged is still readable.
        assert_eq!(store.info(S).unwrap().head.seq, 6);
    }
    let store = Store::open(dir.path(), full()).unwrap();
    assert!(
        store.info(S).unwrap().head.seq >= 6,
        "acked records survive"
    );
    assert!(!store.is_poisoned());
}

/// A writer of [`S`] holding 20 records, a replica of it holding none, and
/// the writer's records (the directories live as long as the first value).
fn writer_and_replica() -> ([tempfile::TempDir; 2], Store, Store, keel_log::Segment) {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let writer = Store::open(a.path(), StoreOptions::default()).unwrap();
    let replica = Store::open(b.path(), StoreOptions::default()).unwrap();
    writer.create_stream(S, Role::Writer, 1).unwrap();
    replica.create_stream(S, Role::Replica, 1).unwrap();
    writer.append(S, entries(20, "x")).unwrap();
    let Read::Records(seg) = writer.read(S, 0, ReadLimits::default()).unwrap() else {
        panic!()
    };
    ([a, b], writer, replica, seg)
}

#[test]
fn replica_accepts_only_chain_extensions_and_redelivery_is_harmless() {
    let (_dirs, writer, replica, seg) = writer_and_replica();

    assert_eq!(
        replica
            .append_replicated(S, seg.records[..10].to_vec())
            .unwrap()
            .seq,
        10
    );
    // Redelivery of an overlapping range only adds what is new.
    assert_eq!(
        replica
            .append_replicated(S, seg.records[5..15].to_vec())
            .unwrap()
            .seq,
        15
    );
    assert_eq!(
        replica
            .append_replicated(S, seg.records[..15].to_vec())
            .unwrap()
            .seq,
        15
    );
    // A gap is refused.
    assert!(matches!(
        replica.append_replicated(S, seg.records[16..].to_vec()),
        Err(Error::ChainMismatch { seq: 17, .. })
    ));
    // A forged record is refused, and nothing of the op is written.
    let mut forged = seg.records[15].clone();
    forged.payload = bytes::Bytes::from_static(b"forged");
    assert!(matches!(
        replica.append_replicated(S, vec![forged]),
        Err(Error::ChainMismatch { seq: 16, .. })
    ));
    assert_eq!(replica.info(S).unwrap().head.seq, 15);
    // The rest goes through; both sides hold the same chain.
    let head = replica
        .append_replicated(S, seg.records[15..].to_vec())
        .unwrap();
    assert_eq!(head, writer.info(S).unwrap().head);
    assert_eq!(writer.check_cursor(S, &head).unwrap(), CursorCheck::Match);
    // Writers and replicas keep to their roles.
    assert!(matches!(
        replica.append(S, entries(1, "no")),
        Err(Error::WrongRole { .. })
    ));
    assert!(matches!(
        writer.append_replicated(S, vec![]),
        Err(Error::WrongRole { .. })
    ));
    assert!(matches!(
        writer.create_stream(S, Role::Replica, 1),
        Err(Error::RoleConflict { .. })
    ));
}

/// Records checked to chain when they were received are appended with
/// the same outcomes as [`Store::append_replicated`]'s, though their hashes
/// are not computed again: the chain's junction with the replica's head is
/// still checked, and a chain that does not make one is refused.
#[test]
fn a_checked_chain_joins_the_replica_only_at_its_head() {
    let (_dirs, writer, replica, seg) = writer_and_replica();
    let chain = |from: usize, to: usize| {
        let prev = from
            .checked_sub(1)
            .map_or(seg.prev, |i| seg.records[i].cursor());
        Chained::verify(seg.epoch, prev, seg.records[from..to].to_vec()).unwrap()
    };

    // A forged record is no chain: it cannot be made into one.
    let mut forged = seg.records[..3].to_vec();
    forged[1].payload = bytes::Bytes::from_static(b"forged");
    assert!(matches!(
        Chained::verify(seg.epoch, seg.prev, forged),
        Err(WireError::Chain { seq: 2 })
    ));
    assert!(matches!(
        Chained::verify(seg.epoch, seg.prev, seg.records[1..3].to_vec()),
        Err(WireError::Gap { want: 1, got: 2 })
    ));

    assert_eq!(replica.append_chained(S, chain(0, 10)).unwrap().seq, 10);
    // Overlap: what is held is skipped, what is new joins at the head.
    assert_eq!(replica.append_chained(S, chain(5, 15)).unwrap().seq, 15);
    assert_eq!(replica.append_chained(S, chain(0, 15)).unwrap().seq, 15);
    // A gap is refused.
    assert!(matches!(
        replica.append_chained(S, chain(16, 20)),
        Err(Error::ChainMismatch { seq: 17, .. })
    ));
    // A chain of the right seqs from another history does not join.
    let other = tempfile::tempdir().unwrap();
    let other = Store::open(other.path(), StoreOptions::default()).unwrap();
    other.create_stream(S, Role::Writer, 1).unwrap();
    other.append(S, entries(20, "y")).unwrap();
    let theirs = |after| {
        let Read::Records(seg) = other.read(S, after, ReadLimits::default()).unwrap() else {
            panic!()
        };
        Chained::verify(seg.epoch, seg.prev, seg.records).unwrap()
    };
    assert!(matches!(
        replica.append_chained(S, theirs(15)),
        Err(Error::ChainMismatch { seq: 16, .. })
    ));
    // Nor does a held record of another history in front of it.
    assert!(matches!(
        replica.append_chained(S, theirs(14)),
        Err(Error::ChainMismatch { seq: 15, .. })
    ));
    assert_eq!(replica.info(S).unwrap().head.seq, 15);
    // A chain whose front was dropped joins where it now starts.
    let mut rest = chain(12, 20);
    rest.skip(3);
    assert_eq!(rest.prev(), seg.records[14].cursor());
    let head = replica.append_chained(S, rest).unwrap();
    assert_eq!(head, writer.info(S).unwrap().head);
    assert_eq!(writer.check_cursor(S, &head).unwrap(), CursorCheck::Match);
}

#[test]
fn snapshot_install_replaces_a_replica() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let writer = Store::open(a.path(), StoreOptions::default()).unwrap();
    let replica = Store::open(b.path(), StoreOptions::default()).unwrap();
    writer.create_stream(S, Role::Writer, 1).unwrap();
    replica.create_stream(S, Role::Replica, 1).unwrap();
    writer.append(S, entries(30, "x")).unwrap();
    writer.compact(S, 20, &ConcatFold).unwrap();
    // The replica is behind the horizon: it gets snapshot + tail.
    assert_eq!(
        writer
            .check_cursor(S, &replica.info(S).unwrap().head)
            .unwrap(),
        CursorCheck::BelowHorizon
    );
    let Read::Snapshot { snapshot, tail } = writer.read(S, 0, ReadLimits::default()).unwrap()
    else {
        panic!("expected snapshot + tail")
    };
    assert_eq!(snapshot.objects.len(), 3);
    assert_eq!(
        replica.install_snapshot(S, snapshot.clone()).unwrap().seq,
        20
    );
    assert_eq!(
        replica.append_replicated(S, tail.records).unwrap(),
        writer.info(S).unwrap().head
    );
    assert_eq!(replica.snapshot(S).unwrap(), snapshot);
    drop(replica);
    let replica = Store::open(b.path(), full()).unwrap();
    assert_eq!(replica.info(S).unwrap().head, writer.info(S).unwrap().head);
    assert_eq!(replica.info(S).unwrap().horizon.seq, 20);
}

/// A writer that takes over a stream whose older history its reader holds
/// (a cloudcore replica taking a node over) starts a new epoch: the
/// reader's cursor no longer matches, it installs the snapshot, and the
/// chain goes on in the new epoch, across a reopen.
#[test]
fn a_new_epoch_sends_readers_to_the_snapshot() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let writer = Store::open(a.path(), StoreOptions::default()).unwrap();
    let replica = Store::open(b.path(), StoreOptions::default()).unwrap();
    writer.create_stream(S, Role::Writer, 1).unwrap();
    replica.create_stream(S, Role::Replica, 1).unwrap();
    writer.append(S, entries(10, "x")).unwrap();
    let Read::Records(seg) = writer.read(S, 0, ReadLimits::default()).unwrap() else {
        panic!("expected records")
    };
    replica.append_replicated(S, seg.records).unwrap();
    // Not everything folded: refused, nothing changed.
    assert!(matches!(
        writer.begin_epoch(S, 3),
        Err(Error::NotCompacted { head: 10, .. })
    ));
    assert!(matches!(
        replica.begin_epoch(S, 3),
        Err(Error::WrongRole { .. })
    ));
    writer.compact(S, 10, &ConcatFold).unwrap();
    let head = writer.begin_epoch(S, 3).unwrap();
    assert_eq!((head.epoch, head.seq), (3, 10));
    // An epoch not above the stream's is a no-op.
    assert_eq!(writer.begin_epoch(S, 2).unwrap(), head);
    let at = replica.info(S).unwrap().head;
    assert_eq!(at.seq, 10);
    assert_eq!(writer.check_cursor(S, &at).unwrap(), CursorCheck::Mismatch);
    // A reader further along the older epoch's chain is of another
    // history too, not ahead of this one.
    let mut beyond = at;
    beyond.seq = 40;
    assert_eq!(
        writer.check_cursor(S, &beyond).unwrap(),
        CursorCheck::Mismatch
    );
    writer.append(S, entries(5, "y")).unwrap();
    let Read::Snapshot { snapshot, tail } = writer.read(S, 0, ReadLimits::default()).unwrap()
    else {
        panic!("expected snapshot + tail")
    };
    assert_eq!(snapshot.base.epoch, 3);
    assert!(tail.records.iter().all(|r| r.epoch == 3));
    replica.install_snapshot(S, snapshot).unwrap();
    replica.append_replicated(S, tail.records).unwrap();
    assert_eq!(replica.info(S).unwrap().head, writer.info(S).unwrap().head);
    drop(writer);
    let writer = Store::open(a.path(), full()).unwrap();
    let head = writer.info(S).unwrap().head;
    assert_eq!((head.epoch, head.seq), (3, 15));
    assert_eq!(writer.check_cursor(S, &head).unwrap(), CursorCheck::Match);
}

#[test]
fn bad_input_is_refused_without_panicking() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    assert!(matches!(
        store.create_stream("", Role::Writer, 1),
        Err(Error::InvalidStreamName { .. })
    ));
    assert!(matches!(
        store.create_stream("a\0b", Role::Writer, 1),
        Err(Error::InvalidStreamName { .. })
    ));
    assert!(matches!(
        store.append("missing", entries(1, "x")),
        Err(Error::UnknownStream(_))
    ));
    store.create_stream(S, Role::Writer, 1).unwrap();
    assert!(matches!(
        store.read(S, 5, ReadLimits::default()),
        Err(Error::BeyondHead { .. })
    ));
    assert!(matches!(
        store.compact(S, 5, &ConcatFold),
        Err(Error::BeyondHead { .. })
    ));
    let huge = Entry::new("x", "k", PayloadKind::Event, vec![0u8; (16 << 20) + 1]);
    assert!(matches!(
        store.append(S, vec![huge]),
        Err(Error::InvalidEntry(_))
    ));
    for bytes in [&b""[..], b"\x07abc", b"\x01\xff\xff\xff"] {
        assert!(decode_record(bytes).is_err());
    }
}

/// Keeps an object's last payload (what a status fold amounts to).
struct LastFold;

impl keel_log::Fold for LastFold {
    fn fold(
        &self,
        _key: &str,
        _state: Option<&[u8]>,
        record: &keel_log::Record,
    ) -> Result<Option<Vec<u8>>, keel_log::FoldError> {
        Ok(Some(record.payload.to_vec()))
    }
}

fn journal_bytes(dir: &Path) -> u64 {
    journals(dir)
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum()
}

/// A store whose records are folded away soon after they are written (an
/// edge's) writes its journal on and on while its memtables stay small:
/// the journals on disk must still stay bounded, a sawtooth below about
/// twice fjall's 64 MB rotation point, and what the store holds survives.
#[test]
fn journals_are_retired_under_sustained_writes_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    store.create_stream(S, Role::Writer, 1).unwrap();
    let payload = vec![7u8; 16 << 10];
    let mut most = 0u64;
    // 320 MiB of records, 1 MiB per append, compacted every 4 MiB.
    for round in 0..320u32 {
        let batch: Vec<Entry> = (0..64)
            .map(|i| {
                Entry::new(
                    "edge-1",
                    format!("pods/default/p{}", i % 4),
                    PayloadKind::Change,
                    payload.clone(),
                )
            })
            .collect();
        let at = store.append(S, batch).unwrap();
        if round % 4 == 3 {
            store.compact(S, at.seq, &LastFold).unwrap();
            most = most.max(journal_bytes(dir.path()));
        }
    }
    eprintln!("largest journal total {} MiB", most >> 20);
    assert!(
        most <= 160 << 20,
        "journals reached {} MiB under sustained writes",
        most >> 20
    );
    let end = store.info(S).unwrap().head;
    drop(store);
    let store = Store::open(dir.path(), full()).unwrap();
    assert_eq!(store.info(S).unwrap().head, end);
    assert_eq!(store.snapshot(S).unwrap().objects.len(), 4);
}

/// Groups large enough to reach fjall on the store's apply thread are
/// readable the moment they are acknowledged: a read, a cursor check and a
/// verify right after each append see all of it, while another thread
/// reads and compacts beside the appends. The apply thread is slowed down
/// so that acknowledged groups do wait for it; a small commit journal
/// makes checkpoints (which wait for it too) frequent. All of it is there
/// after a reopen.
#[test]
fn large_groups_are_readable_as_soon_as_they_are_acknowledged() {
    /// Stops the reader when the writer ends, also when it fails.
    struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        commit_journal_bytes: 1 << 20,
        slow_apply: Some(std::time::Duration::from_millis(3)),
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts.clone()).unwrap();
    store.create_stream(S, Role::Writer, 1).unwrap();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let group = |b: usize| -> Vec<Entry> {
        (0..32)
            .map(|i| {
                let mut p = format!("g{b}-{i}-").into_bytes();
                p.resize(2000, b'.');
                Entry::new(
                    "edge-1",
                    format!("pods/default/p{}", i % 5),
                    PayloadKind::Change,
                    p,
                )
            })
            .collect()
    };
    let last = std::thread::scope(|sc| {
        sc.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let head = store.info(S).unwrap().head;
                if head.seq > 0 {
                    assert_eq!(store.check_cursor(S, &head).unwrap(), CursorCheck::Match);
                    if head.seq.is_multiple_of(3) {
                        store.compact(S, head.seq / 2, &ConcatFold).unwrap();
                    }
                }
            }
        });
        let _stop = Stop(&stop);
        let mut last = None;
        for b in 0..150 {
            let head = store.append(S, group(b)).unwrap();
            assert_eq!(head.seq, 32 * (b as u64 + 1));
            assert_eq!(store.check_cursor(S, &head).unwrap(), CursorCheck::Match);
            let read = store
                .read(
                    S,
                    head.seq - 32,
                    ReadLimits {
                        max_records: 64,
                        max_bytes: 1 << 20,
                    },
                )
                .unwrap();
            let Read::Records(seg) = read else {
                panic!("the tail is above the horizon")
            };
            assert_eq!(seg.records.len(), 32);
            assert_eq!(seg.end(), head);
            assert!(
                seg.records[31]
                    .payload
                    .starts_with(format!("g{b}-31-").as_bytes())
            );
            if b.is_multiple_of(10) {
                assert_eq!(store.verify(S).unwrap(), head);
            }
            last = Some(head);
        }
        last.unwrap()
    });
    drop(store);
    let store = Store::open(
        dir.path(),
        StoreOptions {
            verify_on_open: VerifyOnOpen::Full,
            ..opts
        },
    )
    .unwrap();
    assert_eq!(store.info(S).unwrap().head, last);
    assert_eq!(store.verify(S).unwrap(), last);
}
