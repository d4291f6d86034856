//! The cloud's side of a link against a node that breaks the rules on
//! purpose (sans-IO; the real QUIC attacks are in keel-edge's tests): each
//! broken rule closes the link with an error naming it, and nothing of the
//! offending frame is handed on to be persisted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use keel_log::{
    Cursor, Entry, ObjectSnapshot, PayloadKind, Read, ReadLimits, Role, Segment, Snapshot, Store,
    StoreOptions,
};
use keel_sync::crdt::{ActorId, ObjectStore};
use keel_sync::frame::{
    ErrorCode, Frame, FrameError, Hello, MAX_SEGMENT_RECORDS, decode_frame, encode_frame,
};
use keel_sync::link::{Action, Link, LinkConfig, Side, down_stream, up_stream};
use serde_json::json;

const NODE: &str = "n1";

struct Rig {
    _dir: tempfile::TempDir,
    cloud: Store,
    edge: Store,
    link: Link,
}

/// A cloud-side link for `NODE` that has accepted the node's Hello, and the
/// node's own store to write `up` records in.
fn rig(cfg: impl FnOnce(&mut LinkConfig)) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Store::open(dir.path().join("cloud"), StoreOptions::default()).unwrap();
    let edge = Store::open(dir.path().join("edge"), StoreOptions::default()).unwrap();
    cloud
        .create_stream(&down_stream(NODE), Role::Writer, 1)
        .unwrap();
    let up = cloud
        .create_stream(&up_stream(NODE), Role::Replica, 1)
        .unwrap();
    edge.create_stream(&up_stream(NODE), Role::Writer, 1)
        .unwrap();
    let mut c = LinkConfig::new(NODE, Side::Cloud, up.head);
    cfg(&mut c);
    let mut link = Link::new(c, 0);
    link.handle_frame(
        0,
        Frame::Hello(Hello {
            protocol_version: keel_proto::PROTOCOL_VERSION,
            node: NODE.into(),
            cursors: vec![(down_stream(NODE), Cursor::default())],
            window_records: 0,
            window_bytes: 0,
        }),
        &cloud,
    );
    assert!(link.is_established(), "{:?}", link.closed());
    Rig {
        _dir: dir,
        cloud,
        edge,
        link,
    }
}

impl Rig {
    /// Appends entries to the node's `up` and returns them as one segment.
    fn segment(&self, entries: Vec<Entry>) -> Segment {
        let stream = up_stream(NODE);
        let after = self.edge.info(&stream).unwrap().head.seq;
        self.edge.append(&stream, entries).unwrap();
        match self
            .edge
            .read(&stream, after, ReadLimits::default())
            .unwrap()
        {
            Read::Records(s) => s,
            Read::Snapshot { .. } => panic!("no compaction here"),
        }
    }

    fn send(&mut self, seg: Segment) {
        self.link.handle_frame(1, Frame::Segment(seg), &self.cloud);
    }

    fn persisted_all(&mut self) {
        while let Some(a) = self.link.poll_action() {
            if let Action::Persist { stream, records } = a {
                let c = self.cloud.append_chained(&stream, records).unwrap();
                self.link.handle_persisted(&stream, c);
            }
        }
    }

    fn closed_with(&self, code: ErrorCode, words: &str) {
        let c = self.link.closed().expect("the link closed");
        assert_eq!(c.code, code, "{c:?}");
        assert!(
            c.message.to_lowercase().contains(words),
            "close reason {:?} does not name {words:?}",
            c.message
        );
    }

    fn nothing_to_persist(&mut self) {
        assert_eq!(self.link.poll_action(), None);
    }
}

fn pod_change(actor: &str) -> Vec<u8> {
    let mut objects = ObjectStore::new();
    objects
        .edit_merge_patch(
            "pods/default/p",
            &ActorId::from_name(actor),
            &json!({"status": {"phase": "Running"}}),
        )
        .unwrap()
        .unwrap()
}

#[test]
fn an_honest_segment_is_persisted() {
    let mut r = rig(|_| {});
    let seg = r.segment(vec![Entry::new(
        NODE,
        "pods/default/p",
        PayloadKind::Change,
        pod_change(NODE),
    )]);
    r.send(seg);
    assert!(!r.link.is_closed(), "{:?}", r.link.closed());
    assert!(matches!(r.link.poll_action(), Some(Action::Persist { .. })));
}

#[test]
fn a_change_by_another_actor_is_refused() {
    for actor in ["cloudcore", "n2"] {
        let mut r = rig(|_| {});
        let seg = r.segment(vec![Entry::new(
            NODE,
            "pods/default/p",
            PayloadKind::Change,
            pod_change(actor),
        )]);
        r.send(seg);
        r.closed_with(ErrorCode::Forbidden, "actor");
        r.nothing_to_persist();
    }
}

#[test]
fn a_record_of_another_origin_is_refused() {
    let mut r = rig(|_| {});
    let seg = r.segment(vec![Entry::new(
        "user:keel-admin",
        "pods/default/p",
        PayloadKind::Change,
        pod_change(NODE),
    )]);
    r.send(seg);
    r.closed_with(ErrorCode::Forbidden, "origin");
    r.nothing_to_persist();
}

#[test]
fn a_compressed_change_is_refused() {
    // An automerge chunk header of type 2 (deflated change): never parsed.
    let mut bytes = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2, 8];
    bytes.extend_from_slice(&[0x4b, 0x4c, 0x1c, 0x05, 0xa3, 0x60, 0x14, 0x00]);
    let mut r = rig(|_| {});
    let seg = r.segment(vec![Entry::new(
        NODE,
        "pods/default/p",
        PayloadKind::Change,
        bytes,
    )]);
    r.send(seg);
    r.closed_with(ErrorCode::Forbidden, "compressed");
    r.nothing_to_persist();
}

#[test]
fn the_granted_window_is_enforced() {
    let mut r = rig(|c| c.window_records = 8);
    let event = |i: u32| Entry::new(NODE, "nodes/n1", PayloadKind::Event, format!("{i}"));
    let seg = r.segment((0..8).map(event).collect());
    r.send(seg);
    assert!(!r.link.is_closed());
    // Durable and acknowledged: the window opens again.
    r.persisted_all();
    let seg = r.segment((0..8).map(event).collect());
    r.send(seg);
    assert!(!r.link.is_closed());
    // Not acknowledged yet: one more record is beyond the window.
    let seg = r.segment(vec![event(9)]);
    r.send(seg);
    r.closed_with(ErrorCode::Limit, "window");
}

#[test]
fn a_duplicate_segment_is_acknowledged_again() {
    let mut r = rig(|_| {});
    while r.link.poll_control().is_some() {}
    let seg = r.segment(vec![Entry::new(NODE, "nodes/n1", PayloadKind::Event, "x")]);
    r.send(seg.clone());
    r.persisted_all();
    let first = r.link.poll_control();
    assert!(matches!(first, Some(Frame::Ack { .. })), "{first:?}");
    assert_eq!(r.link.poll_control(), None);
    // The ack was lost; the node sends the segment again.
    r.send(seg);
    assert_eq!(r.link.poll_control(), first);
}

fn snapshot_frame(base_seq: u64, epoch: u64, chunk: u32, last: bool, objects: usize) -> Frame {
    Frame::Snapshot {
        stream: up_stream(NODE),
        snapshot: Snapshot {
            base: Cursor {
                epoch,
                seq: base_seq,
                hash: keel_log::Hash([7; 32]),
            },
            objects: (0..objects)
                .map(|i| ObjectSnapshot {
                    key: format!("pods/default/p{i}"),
                    seq: 1,
                    state: vec![0; 1024].into(),
                })
                .collect(),
        },
        chunk,
        last,
    }
}

#[test]
fn a_snapshot_never_rewinds_what_the_cloud_holds() {
    let mut r = rig(|_| {});
    let seg = r.segment(vec![Entry::new(NODE, "nodes/n1", PayloadKind::Event, "x")]);
    r.send(seg);
    r.persisted_all();
    // An empty snapshot of a newer epoch would wipe the node's history.
    r.link
        .handle_frame(2, snapshot_frame(5, 2, 0, true, 0), &r.cloud);
    r.closed_with(ErrorCode::Forbidden, "rewound");
    r.nothing_to_persist();
    assert_eq!(
        r.cloud.info(&up_stream(NODE)).unwrap().head.seq,
        1,
        "the replica keeps its record"
    );
}

#[test]
fn snapshot_chunks_are_bounded() {
    // The cloud holds nothing of the node yet, so a snapshot is allowed,
    // but not an endless one.
    let mut r = rig(|c| c.max_snapshot_chunks = 100);
    for chunk in 0..200 {
        r.link
            .handle_frame(2, snapshot_frame(5, 1, chunk, false, 0), &r.cloud);
        if r.link.is_closed() {
            break;
        }
    }
    r.closed_with(ErrorCode::Limit, "snapshot");

    let mut r = rig(|c| c.max_snapshot_bytes = 64 << 10);
    for chunk in 0..200 {
        r.link
            .handle_frame(2, snapshot_frame(5, 1, chunk, false, 16), &r.cloud);
        if r.link.is_closed() {
            break;
        }
    }
    r.closed_with(ErrorCode::Limit, "snapshot");
    r.nothing_to_persist();
}

#[test]
fn pings_get_one_answer_while_the_writer_is_busy() {
    let mut r = rig(|_| {});
    while r.link.poll_control().is_some() {}
    for n in 0..10_000 {
        r.link.handle_frame(3, Frame::Ping(n), &r.cloud);
    }
    assert_eq!(r.link.poll_control(), Some(Frame::Pong(9_999)));
    assert_eq!(r.link.poll_control(), None);
}

#[test]
fn list_lengths_are_checked_before_decoding() {
    // A segment of many empty records: a few bytes each on the wire.
    let seg = keel_proto::Segment {
        stream: up_stream(NODE),
        records: vec![keel_proto::Record::default(); MAX_SEGMENT_RECORDS + 1],
        ..Default::default()
    };
    let frame = keel_proto::Frame {
        body: Some(keel_proto::frame::Body::Segment(seg)),
    };
    let bytes = prost::Message::encode_to_vec(&frame);
    assert!(bytes.len() < 64 << 10, "{} bytes", bytes.len());
    assert!(matches!(
        decode_frame(&bytes),
        Err(FrameError::TooMany {
            what: "segment.records",
            ..
        })
    ));
    // The same list split over repeated bodies (protobuf merges them).
    let half = keel_proto::Frame {
        body: Some(keel_proto::frame::Body::Segment(keel_proto::Segment {
            stream: up_stream(NODE),
            records: vec![keel_proto::Record::default(); MAX_SEGMENT_RECORDS / 2 + 1],
            ..Default::default()
        })),
    };
    let mut twice = prost::Message::encode_to_vec(&half);
    twice.extend(prost::Message::encode_to_vec(&half));
    assert!(matches!(
        decode_frame(&twice),
        Err(FrameError::TooMany { .. })
    ));
    // A well-formed frame still decodes.
    let ok = encode_frame(&Frame::Ping(1));
    assert_eq!(decode_frame(&ok), Ok(Frame::Ping(1)));
}

/// A peer that answers pings but never acknowledges what it is sent (its
/// side of the link is stuck): the sender retransmits, and after
/// `max_unacked_retransmits` retransmissions in a row without an
/// acknowledgement it closes the link so that a new connection starts
/// over. An acknowledgement in between starts the count again.
#[test]
fn a_peer_that_acknowledges_nothing_is_given_up_on() {
    let mut r = rig(|c| {
        c.retransmit_ms = 1_000;
        c.max_unacked_retransmits = 4;
        c.ping_interval_ms = 500;
        c.idle_timeout_ms = 60_000;
    });
    let down = down_stream(NODE);
    let entry = || Entry::new("kubectl", "pods/default/p", PayloadKind::Change, vec![1u8]);
    r.cloud.append(&down, vec![entry()]).unwrap();
    let mut now = 1;
    // Sends what it has; the peer pings and never acks, so every
    // retransmission time it sends the same segment again.
    let step = |r: &mut Rig, now: &mut u64| -> usize {
        let mut segments = 0;
        while let Some((_, f)) = r.link.poll_transmit(&r.cloud) {
            segments += usize::from(matches!(f, Frame::Segment(_)));
        }
        *now += 1_000;
        r.link.handle_frame(*now, Frame::Ping(*now), &r.cloud);
        r.link.handle_timeout(*now);
        segments
    };
    let mut sent = 0;
    for _ in 0..3 {
        sent += step(&mut r, &mut now);
    }
    assert!(!r.link.is_closed(), "{:?}", r.link.closed());
    assert_eq!(sent, 3, "sent once, then again at each retransmission time");
    // The peer acknowledges: the count starts again.
    let head = r.cloud.info(&down).unwrap().head;
    r.link.handle_frame(
        now,
        Frame::Ack {
            stream: down.clone(),
            cursor: head,
        },
        &r.cloud,
    );
    r.cloud.append(&down, vec![entry()]).unwrap();
    for _ in 0..4 {
        step(&mut r, &mut now);
        assert!(!r.link.is_closed(), "{:?}", r.link.closed());
    }
    step(&mut r, &mut now);
    r.closed_with(ErrorCode::IdleTimeout, "acknowledged nothing");
}
