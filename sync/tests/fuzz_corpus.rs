//! Replays the fuzz targets' corpora (`fuzz/corpus/{record,segment,frame,link}`)
//! as ordinary tests, with the same checks the fuzz targets make: every
//! input decodes or errors without panicking, and whatever decodes
//! round-trips. Files named `valid-*` must decode. The frame and link
//! targets' checks are the same code as the targets' (`fuzz/shared/`,
//! included here): every input drives a link without panicking or breaking
//! its invariants, and `valid-*` link inputs end with the link established,
//! open and every record persisted. A crash the fuzzer finds is kept in the
//! corpus (`./dev test` copies it there) and so fails this test until fixed.
//!
//! `KEEL_WRITE_FUZZ_SEEDS=1 cargo test -p keel-sync --test fuzz_corpus`
//! regenerates the seeds from real log output.

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
use keel_sync::frame::{ErrorCode, Frame, Hello, MAX_HELLO_CURSORS, encode_frame};
use keel_sync::link::{Side, down_stream, up_stream};

mod frame_check {
    include!("../../fuzz/shared/frame_check.rs");
}
mod link_driver {
    include!("../../fuzz/shared/link_driver.rs");
}

use frame_check::check_frame;
use link_driver::{Fixture, HORIZON, NODE, config_byte, drive, push_frame};

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
    // One cursor too many (refused by the list counts before decoding),
    // and a segment body twice on the wire (protobuf merges the parts, so
    // the counts add up; the merged records then break the chain).
    let many = Frame::Hello(Hello {
        protocol_version: keel_proto::PROTOCOL_VERSION,
        node: "edge-7".into(),
        cursors: (0..=MAX_HELLO_CURSORS)
            .map(|i| (format!("edge-7/down-{i}"), Cursor::default()))
            .collect(),
        window_records: 0,
        window_bytes: 0,
    });
    out.push((
        "frame",
        "bad-hello-too-many-cursors".into(),
        encode_frame(&many).to_vec(),
    ));
    let mut split = encode_frame(&Frame::Segment(seg.clone())).to_vec();
    split.extend_from_slice(&encode_frame(&Frame::Segment(seg)));
    out.push(("frame", "bad-segment-split-body".into(), split));
    out
}

/// Inputs of the link target (see `fuzz/shared/link_driver.rs`): the
/// peer's side of real exchanges, built from the fixture's records.
fn link_seeds(fx: &Fixture) -> Vec<(String, Vec<u8>)> {
    let (up, down) = (up_stream(NODE), down_stream(NODE));
    let hello = |stream: &str, seq: u64, window_records: u32, window_bytes: u64| {
        Frame::Hello(Hello {
            protocol_version: keel_proto::PROTOCOL_VERSION,
            node: NODE.into(),
            cursors: vec![(stream.to_owned(), fx.cursor(stream, seq))],
            window_records,
            window_bytes,
        })
    };
    let seg = |stream: &str, from: u64, to: u64| Frame::Segment(fx.segment(stream, from, to));
    let snapshot = |stream: &str| Frame::Snapshot {
        stream: stream.to_owned(),
        snapshot: fx.store.snapshot(stream).unwrap(),
        chunk: 0,
        last: true,
    };
    let ack = |stream: &str, seq: u64| Frame::Ack {
        stream: stream.to_owned(),
        cursor: fx.cursor(stream, seq),
    };
    // Operations (see the driver): 1 persist one, 2 dt time, 3 transmit,
    // 4 poll_control, 5 persist all, 6 report again, 7 close.
    enum Op {
        F(Frame),
        Raw(&'static [u8]),
    }
    use Op::{F, Raw};
    const TRANSMIT: &[u8] = &[3];
    let build = |config: u8, ops: Vec<Op>| {
        let mut input = vec![config];
        for op in ops {
            match op {
                F(f) => push_frame(&mut input, &f),
                Raw(b) => input.extend_from_slice(b),
            }
        }
        input
    };
    let edge = config_byte(Side::Edge, false, false, false);
    let cloud = config_byte(Side::Cloud, false, false, false);
    vec![
        // The edge: the cloud holds nothing of `up` (below the horizon:
        // snapshot + tail), sends `down` as snapshot + tail.
        (
            "valid-link-edge-snapshot",
            build(
                edge,
                vec![
                    F(hello(&up, 0, 0, 0)),
                    Raw(TRANSMIT),
                    F(snapshot(&down)),
                    F(seg(&down, HORIZON + 1, 6)),
                    Raw(&[5, 3]),
                    F(ack(&up, 6)),
                    Raw(&[3, 2, 80, 3]),
                    F(Frame::Ping(7)),
                    Raw(&[4, 3, 6, 3]),
                ],
            ),
        ),
        // The edge, records only, persisted one at a time.
        (
            "valid-link-edge-records",
            build(
                edge,
                vec![
                    F(hello(&up, 4, 0, 0)),
                    Raw(TRANSMIT),
                    F(seg(&down, 1, 3)),
                    Raw(&[1, 3]),
                    F(seg(&down, 4, 6)),
                    F(seg(&down, 2, 4)),
                    Raw(&[1, 3]),
                    F(ack(&up, 6)),
                    Raw(&[3]),
                ],
            ),
        ),
        // Small windows both ways, the edge receiving from the horizon.
        (
            "valid-link-edge-windows",
            build(
                config_byte(Side::Edge, true, true, false),
                vec![
                    F(hello(&up, 2, 3, 600)),
                    Raw(TRANSMIT),
                    F(seg(&down, 3, 4)),
                    Raw(&[5, 3]),
                    F(ack(&up, 4)),
                    Raw(TRANSMIT),
                    F(seg(&down, 5, 6)),
                    Raw(&[5, 3]),
                    F(ack(&up, 6)),
                    Raw(&[2, 12, 3]),
                ],
            ),
        ),
        // The cloud: the edge holds all of `down`; `up` arrives as records.
        (
            "valid-link-cloud-records",
            build(
                cloud,
                vec![
                    F(hello(&down, 6, 0, 0)),
                    Raw(TRANSMIT),
                    F(seg(&up, 1, 2)),
                    F(seg(&up, 3, 6)),
                    Raw(&[5, 3]),
                    F(Frame::Ping(1)),
                    Raw(&[3, 2, 100, 3]),
                    F(Frame::Pong(1)),
                ],
            ),
        ),
        // The cloud from the horizon; the edge holds nothing of `down`.
        (
            "valid-link-cloud-horizon",
            build(
                config_byte(Side::Cloud, false, true, false),
                vec![
                    F(hello(&down, 0, 0, 0)),
                    Raw(TRANSMIT),
                    F(seg(&up, 3, 6)),
                    Raw(&[5, 3]),
                    F(ack(&down, 6)),
                    Raw(&[3]),
                ],
            ),
        ),
        // The cloud holds nothing of `up`: the edge's snapshot + tail.
        (
            "valid-link-cloud-snapshot",
            build(
                config_byte(Side::Cloud, false, false, true),
                vec![
                    F(hello(&down, 6, 0, 0)),
                    F(snapshot(&up)),
                    F(seg(&up, HORIZON + 1, 6)),
                    Raw(&[1, 3, 1, 3]),
                ],
            ),
        ),
        // The same, with the driver's frames made from the fixture.
        (
            "valid-link-edge-made",
            build(
                edge,
                vec![Raw(&[10, 4, 0, 3, 8, 1, 3, 5, 3, 8, 4, 6, 5, 3, 9, 6, 3])],
            ),
        ),
        (
            "valid-link-cloud-made",
            build(
                cloud,
                vec![Raw(&[10, 6, 0, 8, 1, 2, 8, 3, 6, 5, 3, 13, 9, 3])],
            ),
        ),
        // Misbehaving peers: each closes the link (or is dropped).
        (
            "bad-link-segment-before-hello",
            build(edge, vec![F(seg(&down, 1, 3)), Raw(TRANSMIT)]),
        ),
        (
            "bad-link-gap-then-idle",
            build(
                edge,
                vec![
                    F(hello(&up, 6, 0, 0)),
                    F(seg(&down, 4, 6)),
                    Raw(TRANSMIT),
                    F(seg(&down, 1, 3)),
                    Raw(&[5, 3, 2, 255, 3]),
                ],
            ),
        ),
        (
            "bad-link-foreign-origin",
            build(
                cloud,
                vec![
                    F(hello(&down, 6, 0, 0)),
                    F(Frame::Segment(keel_log::Segment {
                        stream: up.clone(),
                        ..fx.segment(&down, 1, 3)
                    })),
                    Raw(&[5, 3]),
                ],
            ),
        ),
        (
            "bad-link-ack-beyond-head",
            build(
                cloud,
                vec![
                    F(hello(&down, 2, 0, 0)),
                    Raw(TRANSMIT),
                    F(Frame::Ack {
                        stream: down.clone(),
                        cursor: Cursor {
                            seq: 9,
                            ..fx.cursor(&down, 6)
                        },
                    }),
                    Raw(TRANSMIT),
                ],
            ),
        ),
        (
            "bad-link-closed-by-driver",
            build(
                edge,
                vec![
                    F(hello(&up, 0, 0, 0)),
                    F(seg(&down, 1, 3)),
                    Raw(&[7, 5, 3]),
                    F(seg(&down, 4, 6)),
                    Raw(&[5, 3]),
                ],
            ),
        ),
        (
            "bad-link-peer-error",
            build(
                cloud,
                vec![
                    F(hello(&down, 6, 0, 0)),
                    F(seg(&up, 1, 3)),
                    F(Frame::Error {
                        code: ErrorCode::Internal,
                        message: "gone".into(),
                    }),
                    Raw(&[5, 3, 6, 3]),
                ],
            ),
        ),
    ]
    .into_iter()
    .map(|(n, b)| (n.to_owned(), b))
    .collect()
}

/// Checks one link input; valid seeds must end with the link open and
/// every record of the stream this side receives persisted.
fn check_link(fx: &Fixture, name: &str, data: &[u8]) {
    let outcome = drive(fx, data);
    if name.starts_with("valid-") {
        assert!(outcome.established, "{name}: not established");
        assert_eq!(outcome.closed, None, "{name}: closed");
        assert_eq!(outcome.replica_head.seq, 6, "{name}: {outcome:?}");
        assert!(outcome.frames_out > 1, "{name}: {outcome:?}");
    }
}

#[test]
fn link_seeds_run_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let fx = Fixture::create(dir.path());
    // The fixture is the same on every run: seeds keep naming its cursors.
    let again = tempfile::tempdir().unwrap();
    assert_eq!(Fixture::create(again.path()).up, fx.up);
    let seeds = link_seeds(&fx);
    for (name, bytes) in &seeds {
        check_link(&fx, name, bytes);
    }
    if std::env::var_os("KEEL_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(corpus("link")).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(corpus("link").join(name), bytes).unwrap();
        }
    }
    let mut n = 0;
    let dir = corpus("link");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let data = std::fs::read(&path).unwrap();
        check_link(&fx, &name, &data);
        // Every prefix and a few bit flips too, as for the decoders.
        for cut in 0..data.len() {
            drive(&fx, &data[..cut]);
        }
        for i in (0..data.len()).step_by(3) {
            let mut m = data.clone();
            m[i] ^= 0x41;
            drive(&fx, &m);
        }
        n += 1;
    }
    assert!(n >= seeds.len(), "corpus link holds {n} inputs");
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
        assert_eq!(
            ok,
            name.starts_with("valid-"),
            "{target}/{name}: only valid-* seeds decode"
        );
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
