//! Replays the fuzz targets' corpora (`fuzz/corpus/{record,segment,frame}`)
//! as ordinary tests, with the same checks the fuzz targets make: every
//! input decodes or errors without panicking, and whatever decodes
//! round-trips. Files named `valid-*` must decode.
//!
//! `KEEL_WRITE_FUZZ_SEEDS=1 cargo test -p keel-sync --test fuzz_corpus`
//! regenerates the `valid-*` seeds from real log output.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::{Path, PathBuf};

use keel_log::codec::{decode_record, encode_record};
use keel_log::wire::{decode_segment, encode_segment};
use keel_log::{
    ConcatFold, Cursor, Entry, Hash, PayloadKind, Read, ReadLimits, Role, Store, StoreOptions,
};
use keel_sync::frame::{ErrorCode, Frame, Hello, decode_frame, encode_frame};

fn corpus(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

fn check_record(data: &[u8]) -> bool {
    match decode_record(data) {
        Ok(r) => {
            assert_eq!(decode_record(&encode_record(&r)), Ok(r));
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

fn check_segment(data: &[u8]) -> bool {
    match decode_segment(data) {
        Ok(s) => {
            assert_eq!(decode_segment(&encode_segment(&s)), Ok(s));
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

fn check_frame(data: &[u8]) -> bool {
    match decode_frame(data) {
        Ok(f) => {
            assert_eq!(decode_frame(&encode_frame(&f)), Ok(f));
            true
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            false
        }
    }
}

/// Valid inputs made by a real store.
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let s = "edge-7/up";
    store.create_stream(s, Role::Writer, 1).unwrap();
    store
        .append(
            s,
            vec![
                Entry::new(
                    "edge-7",
                    "pods/default/web",
                    PayloadKind::Change,
                    &b"\x85\x6f\x4a\x83change"[..],
                ),
                Entry::new(
                    "edge-7",
                    "pods/default/web",
                    PayloadKind::Tombstone,
                    &b""[..],
                ),
                Entry::new(
                    "edge-7",
                    "devices/default/thermo",
                    PayloadKind::Event,
                    &b"{\"t\":21.5}"[..],
                ),
            ],
        )
        .unwrap();
    let Read::Records(seg) = store.read(s, 0, ReadLimits::default()).unwrap() else {
        panic!()
    };
    let mut out = Vec::new();
    for r in &seg.records {
        out.push((
            "record",
            format!("valid-record-{}", r.seq),
            encode_record(r),
        ));
    }
    out.push(("segment", "valid-segment-3".into(), encode_segment(&seg)));
    let tail = keel_log::Segment {
        records: seg.records[1..].to_vec(),
        prev: seg.records[0].cursor(),
        ..seg.clone()
    };
    out.push((
        "segment",
        "valid-segment-tail".into(),
        encode_segment(&tail),
    ));
    store.compact(s, 2, &ConcatFold).unwrap();
    let snap = store.snapshot(s).unwrap();
    let frames = [
        Frame::Hello(Hello {
            protocol_version: keel_proto::PROTOCOL_VERSION,
            node: "edge-7".into(),
            cursors: vec![(
                "edge-7/down".into(),
                Cursor {
                    epoch: 1,
                    seq: 4,
                    hash: Hash([7; 32]),
                },
            )],
            window_records: 1024,
            window_bytes: 1 << 20,
        }),
        Frame::Segment(seg.clone()),
        Frame::Ack {
            stream: s.into(),
            cursor: seg.end(),
        },
        Frame::Snapshot {
            stream: s.into(),
            snapshot: snap,
            chunk: 0,
            last: true,
        },
        Frame::Ping(42),
        Frame::Pong(42),
        Frame::Error {
            code: ErrorCode::Unauthorized,
            message: "node edge-7 may not write edge-8/up".into(),
        },
    ];
    for (i, f) in frames.iter().enumerate() {
        out.push((
            "frame",
            format!("valid-frame-{i}"),
            encode_frame(f).to_vec(),
        ));
    }
    out
}

#[test]
fn seeds_decode_and_round_trip() {
    let seeds = seeds();
    for (target, name, bytes) in &seeds {
        let ok = match *target {
            "record" => check_record(bytes),
            "segment" => check_segment(bytes),
            _ => check_frame(bytes),
        };
        assert!(ok, "{target}/{name} does not decode");
    }
    if std::env::var_os("KEEL_WRITE_FUZZ_SEEDS").is_some() {
        for (target, name, bytes) in &seeds {
            std::fs::create_dir_all(corpus(target)).unwrap();
            std::fs::write(corpus(target).join(name), bytes).unwrap();
        }
    }
}

#[test]
fn corpora_replay_without_panics() {
    let mut total = 0;
    for (target, check) in [
        ("record", check_record as fn(&[u8]) -> bool),
        ("segment", check_segment),
        ("frame", check_frame),
    ] {
        let dir = corpus(target);
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let ok = check(&data);
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("valid-") {
                assert!(ok, "{} must decode", path.display());
            }
            // Every prefix and a few bit flips of each input too: a cheap
            // stand-in for the fuzzer's own mutations.
            for cut in 0..data.len() {
                check(&data[..cut]);
            }
            for i in (0..data.len()).step_by(3) {
                let mut m = data.clone();
                m[i] ^= 0x41;
                check(&m);
            }
            n += 1;
        }
        assert!(n > 0, "corpus {target} is empty");
        total += n;
    }
    assert!(total >= 10);
}
