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
use keel_log::{
    ConcatFold, CursorCheck, Entry, Error, PayloadKind, Read, ReadLimits, Role, Store,
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

#[test]
fn replica_accepts_only_chain_extensions_and_redelivery_is_harmless() {
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
