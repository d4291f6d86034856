// The link target's driver, shared word for word by the fuzz target
// (fuzz/fuzz_targets/link.rs) and the corpus replay test
// (sync/tests/fuzz_corpus.rs), both of which `include!` it: a crash the
// fuzzer keeps fails the normal test run through the same code.
//
// One input drives one `Link` (side and settings from its first byte)
// against a real `keel_log::Store` holding both streams of node `edge-7`,
// with an honest driver: actions are persisted in order into a model of
// the local replica, which reports each new head with `handle_persisted`.
// The rest of the input is a list of operations:
//
//   0  len(u16 le) bytes   `handle_bytes` with the next `len` bytes
//   1                      persist the oldest pending action
//   2  dt(u8)              `handle_timeout` `dt * 250` ms later
//   3                      `poll_transmit` until it has nothing
//   4                      `poll_control` once
//   5                      persist every pending action
//   6                      report the replica's head again
//   7                      `close` from this side
//
// and, so that the fuzzer need not forge hash chains to get deep, frames
// made from the fixture (each then encoded and handed to `handle_bytes`):
//
//   8  a b                 a segment of the stream this side receives,
//                          records `a % 7 ..= b % 7`
//   9  k                   an Ack of the stream this side sends at seq `k % 7`
//   10 k w                 the peer's Hello, cursor at seq `k % 7`, window `w`
//   11 c                   the snapshot of the stream this side receives,
//                          as chunk `c % 3` (`last` unless `c & 4`)
//   12 a b                 records `a % 7 ..= b % 7` of the stream this side
//                          sends, labelled as the one it receives (forged)
//   13 n                   a Ping
//   14                     an Error
//   15                     as 3
//
// (operation codes are taken modulo 16).
// Whatever the input, nothing may panic and these must hold:
// - the first frame out is the Hello (or the Error, if the link closed
//   first); after `is_closed()` nothing but one Error frame goes out, and
//   nothing at all after it;
// - bulk frames (segments, snapshot chunks) go out only once the peer's
//   Hello was accepted, only for the stream this side sends, on the bulk
//   channel, and decode on the other side to themselves;
// - an `Ack` names the stream this side receives and a cursor the driver
//   reported durable (or the one it started with): persist before ack;
// - actions name only the stream this side receives, none is produced by
//   a call made after the link closed, and each `Persist` extends the
//   replica's chain (the cloud's only carry records of origin `edge-7`);
// - `Established` and `Closed` are reported at most once each, `Closed`
//   only when `is_closed()`; `poll_timeout()` is `None` exactly when closed.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use keel_log::{Cursor, Entry, PayloadKind, Read, ReadLimits, Role, Segment, Store, StoreOptions};
use keel_sync::crdt::{ActorId, ObjectStore};
use keel_sync::frame::{ErrorCode, Frame, Hello, decode_frame, encode_frame};
use keel_sync::link::{
    Action, Channel, Closed, Event, Link, LinkConfig, Side, down_stream, up_stream,
};
use keel_sync::objects::CrdtFold;

/// The node every link of the target is for.
pub const NODE: &str = "edge-7";
/// Records up to this seq of each fixture stream are compacted.
pub const HORIZON: u64 = 2;

/// A wall clock that never moves: the fixture (hashes included) is the
/// same on every run, so seeds that name its cursors stay valid.
#[derive(Debug)]
struct FixedClock;

impl keel_log::Clock for FixedClock {
    fn now_ms(&self) -> u64 {
        1_750_000_000_000
    }
}

/// This side's log: both streams of `edge-7` written (six records each,
/// compacted up to [`HORIZON`]), and every record of each as its writer
/// sends them (read before compaction), to build a peer's frames from.
#[derive(Debug)]
pub struct Fixture {
    pub store: Store,
    pub up: Segment,
    pub down: Segment,
}

fn fixture_stream(store: &Store, stream: &str, origin: &str) -> Segment {
    let actor = ActorId::from_name(origin);
    let mut objects = ObjectStore::new();
    let mut change = |key: &str, patch: serde_json::Value| {
        let c = objects
            .edit_merge_patch(key, &actor, &patch)
            .expect("edit")
            .expect("a change");
        Entry::new(origin, key, PayloadKind::Change, c)
    };
    let entries = vec![
        change(
            "pods/default/web",
            serde_json::json!({"spec": {"image": "web:1"}}),
        ),
        change(
            "pods/default/db",
            serde_json::json!({"spec": {"image": "db:1"}}),
        ),
        change(
            "pods/default/web",
            serde_json::json!({"status": {"phase": "Running"}}),
        ),
        Entry::new(
            origin,
            "devices/default/thermo",
            PayloadKind::Event,
            &b"{\"t\":21.5}"[..],
        ),
        Entry::new(origin, "pods/default/db", PayloadKind::Tombstone, &b""[..]),
        change(
            "pods/default/web",
            serde_json::json!({"spec": {"image": "web:2"}}),
        ),
    ];
    store
        .create_stream(stream, Role::Writer, 1)
        .expect("create");
    store.append(stream, entries).expect("append");
    let Ok(Read::Records(all)) = store.read(stream, 0, ReadLimits::default()) else {
        panic!("reading {stream}")
    };
    store.compact(stream, HORIZON, &CrdtFold).expect("compact");
    all
}

impl Fixture {
    /// Creates the fixture's store in the empty directory `dir`.
    pub fn create(dir: &Path) -> Fixture {
        let opts = StoreOptions {
            clock: Arc::new(FixedClock),
            ..StoreOptions::default()
        };
        let store = Store::open(dir, opts).expect("open the fixture store");
        let up = fixture_stream(&store, &up_stream(NODE), NODE);
        let down = fixture_stream(&store, &down_stream(NODE), "cloudcore");
        Fixture { store, up, down }
    }

    /// Records `from..=to` of a stream as its writer sends them.
    pub fn segment(&self, stream: &str, from: u64, to: u64) -> Segment {
        let all = if stream == self.up.stream {
            &self.up
        } else {
            &self.down
        };
        let records: Vec<_> = all
            .records
            .iter()
            .filter(|r| (from..=to).contains(&r.seq))
            .cloned()
            .collect();
        Segment {
            stream: all.stream.clone(),
            epoch: all.epoch,
            prev: self.cursor(stream, from.saturating_sub(1)),
            records,
        }
    }

    /// The writer's cursor at `seq` (0: the empty stream).
    pub fn cursor(&self, stream: &str, seq: u64) -> Cursor {
        let all = if stream == self.up.stream {
            &self.up
        } else {
            &self.down
        };
        all.records
            .iter()
            .find(|r| r.seq == seq)
            .map_or(all.prev, keel_log::Record::cursor)
    }
}

/// The first byte of an input: which side, which settings.
pub fn config_byte(
    side: Side,
    small_windows: bool,
    from_horizon: bool,
    small_snapshots: bool,
) -> u8 {
    u8::from(side == Side::Cloud)
        | u8::from(small_windows) << 1
        | u8::from(from_horizon) << 2
        | u8::from(small_snapshots) << 3
}

/// Appends operation 0 (a frame from the peer) to an input.
pub fn push_frame(input: &mut Vec<u8>, frame: &Frame) {
    let bytes = encode_frame(frame);
    let len = u16::try_from(bytes.len()).expect("a seed frame under 64 KiB");
    input.push(0);
    input.extend_from_slice(&len.to_le_bytes());
    input.extend_from_slice(&bytes);
}

/// How one input ended, for the replay test's checks of valid seeds.
#[derive(Debug)]
pub struct Outcome {
    pub established: bool,
    pub closed: Option<Closed>,
    /// The local replica of the stream this side receives.
    pub replica_head: Cursor,
    pub frames_out: usize,
}

struct Driver<'a> {
    fx: &'a Fixture,
    link: Link,
    side: Side,
    inbound: String,
    outbound: String,
    now: u64,
    replica: Cursor,
    /// Cursors the driver reported durable (the first: where it started).
    reported: Vec<Cursor>,
    pending: VecDeque<Action>,
    frames_out: usize,
    error_sent: bool,
    established_events: usize,
    closed_events: usize,
}

impl Driver<'_> {
    fn out(&mut self, channel: Channel, frame: Frame) {
        let closed = self.link.is_closed();
        assert!(!self.error_sent, "{frame:?} went out after the Error frame");
        assert_eq!(
            channel == Channel::Control,
            frame.is_control(),
            "{frame:?} on the {channel:?} channel"
        );
        if self.frames_out == 0 {
            assert!(
                matches!(frame, Frame::Hello(_) | Frame::Error { .. }),
                "first frame out is {frame:?}"
            );
        }
        self.frames_out += 1;
        // A segment sent as its log held it is checked as the segment it
        // decodes to, and must encode to exactly that segment's bytes.
        let frame = match frame {
            Frame::EncodedSegment(e) => {
                let seg = e.decode().expect("a segment this side sends decodes");
                let seg = Frame::Segment(seg);
                assert_eq!(encode_frame(&Frame::EncodedSegment(e)), encode_frame(&seg));
                seg
            }
            f => f,
        };
        match &frame {
            Frame::EncodedSegment(_) => unreachable!("decoded above"),
            Frame::Error { .. } => {
                assert!(closed, "an Error frame went out on an open link");
                self.error_sent = true;
            }
            _ if closed => panic!("{frame:?} went out after the link closed"),
            Frame::Hello(h) => {
                assert_eq!(self.frames_out, 1, "a second Hello went out");
                assert_eq!(h.node, NODE);
            }
            Frame::Ack { stream, cursor } => {
                assert_eq!(
                    stream, &self.inbound,
                    "ack for a stream this side does not receive"
                );
                assert!(
                    self.reported.contains(cursor),
                    "ack of {cursor:?}, which the driver never reported durable ({:?})",
                    self.reported
                );
            }
            Frame::Segment(seg) => {
                assert!(
                    self.link.is_established(),
                    "segment before the peer's Hello"
                );
                assert_eq!(
                    seg.stream, self.outbound,
                    "segment of a stream this side does not send"
                );
                assert!(!seg.records.is_empty(), "empty segment sent");
            }
            Frame::Snapshot { stream, .. } => {
                assert!(
                    self.link.is_established(),
                    "snapshot before the peer's Hello"
                );
                assert_eq!(
                    stream, &self.outbound,
                    "snapshot of a stream this side does not send"
                );
            }
            Frame::Ping(_) | Frame::Pong(_) => {}
        }
        // What this side sends, the peer can decode.
        assert_eq!(decode_frame(&encode_frame(&frame)).as_ref(), Ok(&frame));
    }

    /// Takes every action and event after a call; `was_closed`: the link
    /// was closed before the call.
    fn collect(&mut self, was_closed: bool) {
        while let Some(a) = self.link.poll_action() {
            assert!(!was_closed, "{a:?} from a call made after the link closed");
            let stream = match &a {
                Action::Persist { stream, .. } | Action::InstallSnapshot { stream, .. } => stream,
            };
            assert_eq!(
                stream, &self.inbound,
                "action for a stream this side does not receive"
            );
            self.pending.push_back(a);
        }
        while let Some(e) = self.link.poll_event() {
            match e {
                Event::Established => {
                    self.established_events += 1;
                    assert!(self.link.is_established());
                    assert_eq!(self.established_events, 1, "Established twice");
                }
                Event::Closed(_) => {
                    self.closed_events += 1;
                    assert!(self.link.is_closed(), "Closed event on an open link");
                    assert_eq!(self.closed_events, 1, "Closed twice");
                }
                Event::Acked { stream, cursor } => {
                    assert_eq!(
                        stream, self.outbound,
                        "Acked for a stream this side does not send"
                    );
                    let head = self.fx.store.info(&self.outbound).expect("info").head;
                    assert!(cursor.seq <= head.seq, "Acked {cursor:?} beyond the head");
                }
            }
        }
        assert_eq!(self.link.poll_timeout().is_none(), self.link.is_closed());
    }

    /// Persists the oldest pending action into the replica, in order, as
    /// keel-log's `append_replicated` / `install_snapshot` would.
    fn persist_one(&mut self) -> bool {
        let Some(a) = self.pending.pop_front() else {
            return false;
        };
        match a {
            Action::Persist { stream, records } => {
                for r in records.iter() {
                    if self.side == Side::Cloud {
                        assert_eq!(
                            r.origin, NODE,
                            "the cloud persists a record of another origin"
                        );
                    }
                    assert!(
                        r.seq == self.replica.seq + 1
                            && r.expected_hash(&self.replica.hash) == r.hash,
                        "Persist of {stream} seq {} (epoch {}) does not extend the replica's head {:?}",
                        r.seq,
                        r.epoch,
                        self.replica
                    );
                    self.replica = r.cursor();
                }
                self.report(&stream);
            }
            Action::InstallSnapshot { stream, snapshot } => {
                self.replica = snapshot.base;
                self.report(&stream);
            }
        }
        true
    }

    fn report(&mut self, stream: &str) {
        self.reported.push(self.replica);
        let was_closed = self.link.is_closed();
        self.link.handle_persisted(stream, self.replica);
        self.collect(was_closed);
    }

    fn transmit(&mut self) {
        for _ in 0..256 {
            let was_closed = self.link.is_closed();
            let Some((channel, frame)) = self.link.poll_transmit(&self.fx.store) else {
                return;
            };
            self.out(channel, frame);
            self.collect(was_closed);
        }
    }
}

/// Runs one input (see the top of this file).
pub fn drive(fx: &Fixture, data: &[u8]) -> Outcome {
    let Some((&config, mut ops)) = data.split_first() else {
        return Outcome {
            established: false,
            closed: None,
            replica_head: Cursor::default(),
            frames_out: 0,
        };
    };
    let side = if config & 1 == 0 {
        Side::Edge
    } else {
        Side::Cloud
    };
    let (inbound, outbound) = match side {
        Side::Edge => (down_stream(NODE), up_stream(NODE)),
        Side::Cloud => (up_stream(NODE), down_stream(NODE)),
    };
    let start = if config & 4 == 0 {
        fx.cursor(&inbound, 0)
    } else {
        fx.cursor(&inbound, HORIZON)
    };
    let mut cfg = LinkConfig::new(NODE, side, start);
    if config & 2 != 0 {
        cfg.window_records = 3;
        cfg.window_bytes = 600;
        cfg.max_segment_records = 2;
        cfg.max_segment_bytes = 300;
    }
    if config & 8 != 0 {
        cfg.max_snapshot_chunks = 2;
        cfg.max_snapshot_bytes = 1024;
    }
    let now = 1_000;
    let mut d = Driver {
        fx,
        link: Link::new(cfg, now),
        side,
        inbound,
        outbound,
        now,
        replica: start,
        reported: vec![start],
        pending: VecDeque::new(),
        frames_out: 0,
        error_sent: false,
        established_events: 0,
        closed_events: 0,
    };
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let was_closed = d.link.is_closed();
        if let Some(frame) = made_frame(&d, op, &mut ops) {
            d.link.handle_bytes(d.now, &encode_frame(&frame), &fx.store);
            d.collect(was_closed);
            continue;
        }
        match op % 16 {
            0 => {
                let (len, rest) = match ops {
                    [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
                    _ => (ops.len(), &[][..]),
                };
                let (frame, rest) = rest.split_at(len.min(rest.len()));
                ops = rest;
                d.link.handle_bytes(d.now, frame, &fx.store);
            }
            1 => {
                d.persist_one();
            }
            2 => {
                d.now += u64::from(next(&mut ops)) * 250;
                d.link.handle_timeout(d.now);
            }
            3 => d.transmit(),
            4 => {
                if let Some(f) = d.link.poll_control() {
                    d.out(Channel::Control, f);
                }
            }
            5 => while d.persist_one() {},
            6 => {
                let s = d.inbound.clone();
                d.report(&s);
            }
            7 => d
                .link
                .close(ErrorCode::Internal, "the driver closes the link"),
            _ => d.transmit(),
        }
        d.collect(was_closed);
    }
    while d.persist_one() {}
    d.transmit();
    let was_closed = d.link.is_closed();
    d.collect(was_closed);
    Outcome {
        established: d.link.is_established(),
        closed: d.link.closed().cloned(),
        replica_head: d.replica,
        frames_out: d.frames_out,
    }
}

fn next(ops: &mut &[u8]) -> u8 {
    let (b, rest) = ops.split_first().map_or((0, &[][..]), |(b, r)| (*b, r));
    *ops = rest;
    b
}

/// Operations 8 to 14: a frame made from the fixture.
fn made_frame(d: &Driver<'_>, op: u8, ops: &mut &[u8]) -> Option<Frame> {
    let fx = d.fx;
    Some(match op % 16 {
        8 => Frame::Segment(fx.segment(
            &d.inbound,
            u64::from(next(ops) % 7),
            u64::from(next(ops) % 7),
        )),
        9 => Frame::Ack {
            stream: d.outbound.clone(),
            cursor: fx.cursor(&d.outbound, u64::from(next(ops) % 7)),
        },
        10 => {
            let k = u64::from(next(ops) % 7);
            let w = next(ops);
            Frame::Hello(Hello {
                protocol_version: keel_proto::PROTOCOL_VERSION,
                node: NODE.into(),
                cursors: vec![(d.outbound.clone(), fx.cursor(&d.outbound, k))],
                window_records: u32::from(w % 8),
                window_bytes: u64::from(w) * 64,
            })
        }
        11 => {
            let c = next(ops);
            Frame::Snapshot {
                stream: d.inbound.clone(),
                snapshot: fx.store.snapshot(&d.inbound).expect("snapshot"),
                chunk: u32::from(c % 3),
                last: c & 4 == 0,
            }
        }
        12 => Frame::Segment(Segment {
            stream: d.inbound.clone(),
            ..fx.segment(
                &d.outbound,
                u64::from(next(ops) % 7),
                u64::from(next(ops) % 7),
            )
        }),
        13 => Frame::Ping(u64::from(next(ops))),
        14 => Frame::Error {
            code: ErrorCode::Internal,
            message: "the peer closes the link".into(),
        },
        _ => return None,
    })
}
