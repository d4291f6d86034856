//! The replication link: a sans-IO state machine for one edge node's
//! connection, used on both sides (DESIGN.md §4).
//!
//! The edge sends `N/up` and receives `N/down`; the cloud the reverse. The
//! link never touches sockets, clocks, files or a runtime: frames come in
//! through [`Link::handle_frame`] / [`Link::handle_bytes`], time through
//! `now` (milliseconds on any monotonic origin), and out come frames
//! ([`Link::poll_transmit`], control frames first), persistence requests
//! ([`Link::poll_action`]) and events ([`Link::poll_event`]). The link reads
//! the sender's log through [`LogSource`], as raft-rs reads its `Storage`.
//!
//! Persist before ack: a received segment becomes an [`Action::Persist`];
//! the link sends the `Ack` only once the driver reports the records durable
//! with [`Link::handle_persisted`].
//!
//! Flow control: at most `window_records` / `window_bytes` (granted by the
//! receiver's `Hello`) may be unacknowledged. Loss is repaired by
//! go-back-N from the last ack: on a duplicate ack (the receiver saw a gap)
//! or when acks stop for `retransmit_ms`. Duplicates are harmless: the
//! receiver drops what it already holds. A peer that answers pings but
//! acknowledges nothing through `max_unacked_retransmits` retransmissions
//! in a row has a stuck side: the link closes (`IdleTimeout`) and the next
//! connection starts again from both sides' durable cursors.

use std::collections::{BTreeMap, VecDeque};

use keel_log::wire::EncodedSegment;
use keel_log::{
    Chained, Cursor, CursorCheck, Hash, ObjectSnapshot, Read, ReadLimits, Record, Snapshot,
};
use tracing::{debug, warn};

use crate::frame::{
    ErrorCode, Frame, FrameError, Hello, Received, decode_received, decode_received_copy,
};

/// The sender's log, as the link needs to see it.
pub trait LogSource {
    /// Durable head of a stream this side writes, if it has the stream.
    fn head(&self, stream: &str) -> Option<Cursor>;
    fn check_cursor(&self, stream: &str, cursor: &Cursor) -> Result<CursorCheck, keel_log::Error>;
    fn read(&self, stream: &str, after: u64, limits: ReadLimits) -> Result<Read, keel_log::Error>;
    /// The snapshot at the horizon and the records after it.
    fn read_snapshot(
        &self,
        stream: &str,
        limits: ReadLimits,
    ) -> Result<(Snapshot, keel_log::Segment), keel_log::Error>;
    /// [`Self::read`] of a log that holds its records in wire form: the
    /// records after `after` as the segment they make, copied as held.
    /// `None` (the default) when it cannot (records not held encoded, or
    /// a snapshot needed): the link then reads them with [`Self::read`].
    fn read_encoded(
        &self,
        _stream: &str,
        _after: u64,
        _limits: ReadLimits,
    ) -> Result<Option<EncodedSegment>, keel_log::Error> {
        Ok(None)
    }
}

impl LogSource for keel_log::Store {
    fn head(&self, stream: &str) -> Option<Cursor> {
        self.info(stream).ok().map(|i| i.head)
    }
    fn check_cursor(&self, stream: &str, cursor: &Cursor) -> Result<CursorCheck, keel_log::Error> {
        keel_log::Store::check_cursor(self, stream, cursor)
    }
    fn read(&self, stream: &str, after: u64, limits: ReadLimits) -> Result<Read, keel_log::Error> {
        keel_log::Store::read(self, stream, after, limits)
    }
    fn read_snapshot(
        &self,
        stream: &str,
        limits: ReadLimits,
    ) -> Result<(Snapshot, keel_log::Segment), keel_log::Error> {
        match keel_log::Store::read(self, stream, 0, limits)? {
            Read::Snapshot { snapshot, tail } => Ok((snapshot, tail)),
            Read::Records(seg) => Ok((
                Snapshot {
                    base: seg.prev,
                    objects: Vec::new(),
                },
                seg,
            )),
        }
    }
}

/// Which end of the connection this link is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Edge,
    Cloud,
}

/// The stream node `node` writes.
pub fn up_stream(node: &str) -> String {
    format!("{node}/up")
}

/// The stream the cloud writes for node `node`.
pub fn down_stream(node: &str) -> String {
    format!("{node}/down")
}

/// Deliberate protocol bugs, for proving that the simulator's checker
/// catches them. Never set outside tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Ack a segment as soon as it arrives, before it is durable.
    AckBeforePersist,
    /// Drop the last record of every segment of two or more, yet move on
    /// as if it had been received.
    SkipRecord,
}

/// Settings of a link.
#[derive(Clone, Debug)]
pub struct LinkConfig {
    pub node: String,
    pub side: Side,
    /// Durable cursors of the streams this side receives (from its store).
    pub inbound: Vec<(String, Cursor)>,
    /// Flow-control window this side grants its peer.
    pub window_records: u32,
    pub window_bytes: u64,
    /// Largest segment or snapshot chunk this side sends.
    pub max_segment_records: usize,
    pub max_segment_bytes: usize,
    pub ping_interval_ms: u64,
    pub idle_timeout_ms: u64,
    pub retransmit_ms: u64,
    /// Retransmissions in a row that bring no acknowledgement before this
    /// side gives up and closes the link (`IdleTimeout`): the peer answers
    /// pings but takes nothing it is sent (its side of the link is stuck).
    /// The next connection starts again from both sides' durable cursors,
    /// so nothing is lost; 0 never gives up.
    pub max_unacked_retransmits: u32,
    /// How long the QUIC driver lets a peer that lacks records, and may be
    /// sent them, acknowledge nothing before it closes the link
    /// (`IdleTimeout`). Unlike `max_unacked_retransmits` this also covers
    /// records that could not even be sent (the peer stopped reading the
    /// bulk stream, so the writer waits on QUIC flow control); 0 never
    /// gives up.
    pub unacked_limit_ms: u64,
    /// Largest snapshot (sum of object keys and states) and most chunks
    /// this side accepts for one stream; beyond either the link closes.
    pub max_snapshot_bytes: u64,
    pub max_snapshot_chunks: u32,
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

impl LinkConfig {
    /// Defaults for `side` of node `node`, receiving from `inbound`.
    pub fn new(node: impl Into<String>, side: Side, inbound_cursor: Cursor) -> Self {
        let node = node.into();
        let inbound_stream = match side {
            Side::Edge => down_stream(&node),
            Side::Cloud => up_stream(&node),
        };
        LinkConfig {
            inbound: vec![(inbound_stream, inbound_cursor)],
            node,
            side,
            window_records: DEFAULT_WINDOW_RECORDS,
            window_bytes: DEFAULT_WINDOW_BYTES,
            max_segment_records: 512,
            max_segment_bytes: 1 << 20,
            ping_interval_ms: 15_000,
            idle_timeout_ms: 60_000,
            retransmit_ms: 2_000,
            max_unacked_retransmits: 30,
            unacked_limit_ms: 60_000,
            max_snapshot_bytes: 256 << 20,
            max_snapshot_chunks: 65_536,
            fault: None,
        }
    }

    fn outbound_stream(&self) -> String {
        match self.side {
            Side::Edge => up_stream(&self.node),
            Side::Cloud => down_stream(&self.node),
        }
    }
}

/// The window a side grants unless configured otherwise.
const DEFAULT_WINDOW_RECORDS: u32 = 4096;
const DEFAULT_WINDOW_BYTES: u64 = 8 << 20;

/// The window a Hello grants, in records and bytes: 0 means the default.
fn granted_window(records: u32, bytes: u64) -> (u64, u64) {
    let records = match records {
        0 => DEFAULT_WINDOW_RECORDS,
        r => r,
    };
    let bytes = match bytes {
        0 => DEFAULT_WINDOW_BYTES,
        b => b,
    };
    (u64::from(records), bytes)
}

/// Which transport channel a frame belongs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Channel {
    /// Hello, Ack, Ping, Pong, Error: never queued behind bulk data.
    Control,
    /// Segments and snapshot chunks.
    Bulk,
}

/// Work the driver must do for the link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Append these records to the local replica of `stream`, make them
    /// durable, apply them, then call [`Link::handle_persisted`].
    Persist {
        stream: String,
        /// Checked to chain as they were received (the store appends them
        /// with [`keel_log::Store::append_chained`], not hashing them again).
        records: Chained,
    },
    /// Replace the local replica of `stream` with this snapshot, make it
    /// durable, then call [`Link::handle_persisted`] with its base.
    InstallSnapshot { stream: String, snapshot: Snapshot },
}

/// Why records from a peer are refused (see [`crate::quic::Sink::admit`]):
/// the link closes with this code and message, and nothing of the records
/// is kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
}

impl Refusal {
    /// A record, change or snapshot the peer's identity does not allow.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Refusal {
            code: ErrorCode::Forbidden,
            message: message.into(),
        }
    }
}

/// Checks what node `node` sends on its `up` stream against its identity,
/// before anything of it is kept: every record has origin `node`, every
/// change is an uncompressed automerge change by `node`'s actor (so a node
/// cannot author changes as cloudcore or as another node).
pub fn check_node_records(node: &str, records: &[Record]) -> Result<(), Refusal> {
    let actor = crate::crdt::ActorId::from_name(node);
    for r in records {
        if r.origin != node {
            return Err(Refusal::forbidden(format!(
                "record {} claims origin {:?}: node {node:?} may only write as itself",
                r.seq, r.origin
            )));
        }
        if r.kind == keel_log::PayloadKind::Change {
            match crate::crdt::change_actor(&r.payload) {
                Ok(a) if a == actor => {}
                Ok(a) => {
                    return Err(Refusal::forbidden(format!(
                        "record {} ({}) is a change by actor {a}: node {node:?} may only write as actor {actor}",
                        r.seq, r.key
                    )));
                }
                Err(e) => {
                    return Err(Refusal::forbidden(format!(
                        "record {} ({}) is not an acceptable change: {e}",
                        r.seq, r.key
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Why a link closed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    pub code: ErrorCode,
    pub message: String,
    /// The peer sent the error (rather than this side detecting it).
    pub by_peer: bool,
}

/// Things that happened, for the driver's logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer's Hello arrived and was accepted.
    Established,
    /// The peer acknowledged `cursor` of a stream this side sends.
    Acked {
        stream: String,
        cursor: Cursor,
    },
    Closed(Closed),
}

/// Counters of one link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkStats {
    pub records_sent: u64,
    pub records_received: u64,
    pub duplicate_records: u64,
    pub snapshots_sent: u64,
    pub rewinds: u64,
}

#[derive(Debug)]
struct Outbound {
    name: String,
    /// Set by the peer's Hello.
    peer: Option<PeerState>,
}

#[derive(Debug)]
struct PeerState {
    acked: Cursor,
    sent: Cursor,
    /// The peer needs snapshot + tail (cursor below horizon or not ours).
    need_snapshot: bool,
    snapshot_sent: bool,
    /// (last seq of a sent segment, its bytes), oldest first.
    inflight: VecDeque<(u64, u64)>,
    last_progress: u64,
    /// Retransmissions since the peer last acknowledged anything new.
    unacked_retransmits: u32,
    window_records: u64,
    window_bytes: u64,
}

impl PeerState {
    fn inflight_records(&self) -> u64 {
        self.sent.seq.saturating_sub(self.acked.seq)
    }
    fn inflight_bytes(&self) -> u64 {
        self.inflight.iter().map(|(_, b)| b).sum()
    }
    fn rewind(&mut self, now: u64) {
        self.sent = self.acked;
        self.snapshot_sent = false;
        self.inflight.clear();
        self.last_progress = now;
    }
}

#[derive(Debug)]
struct Inbound {
    /// Durable in the local replica.
    durable: Cursor,
    /// Accepted segments not yet durable (so not yet acknowledged): (last
    /// seq, records, bytes), oldest first. The peer may not have more out
    /// than the window this side granted.
    unacked: VecDeque<(u64, u64, u64)>,
    /// Last record accepted (handed to the driver to persist).
    expected: Cursor,
    /// Snapshot chunks gathered so far: (base, next chunk, objects).
    snapshot: Option<(Cursor, u32, Vec<ObjectSnapshot>)>,
    /// Bytes of the objects in `snapshot`.
    snapshot_bytes: u64,
    /// `expected.seq` at which a gap was last reported, to report once.
    nacked_at: Option<u64>,
}

/// One side of one edge node's connection.
#[derive(Debug)]
pub struct Link {
    cfg: LinkConfig,
    got_hello: bool,
    closed: Option<Closed>,
    outbound: Outbound,
    inbound: BTreeMap<String, Inbound>,
    control: VecDeque<Frame>,
    acks: BTreeMap<String, Cursor>,
    bulk: VecDeque<Frame>,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    last_recv: u64,
    last_ping: u64,
    ping_nonce: u64,
    stats: LinkStats,
}

impl Link {
    /// A new link; its `Hello` is the first frame [`Link::poll_transmit`] returns.
    pub fn new(cfg: LinkConfig, now: u64) -> Link {
        let inbound: BTreeMap<String, Inbound> = cfg
            .inbound
            .iter()
            .map(|(s, c)| {
                (
                    s.clone(),
                    Inbound {
                        durable: *c,
                        unacked: VecDeque::new(),
                        expected: *c,
                        snapshot: None,
                        snapshot_bytes: 0,
                        nacked_at: None,
                    },
                )
            })
            .collect();
        let hello = Frame::Hello(Hello {
            protocol_version: keel_proto::PROTOCOL_VERSION,
            node: cfg.node.clone(),
            cursors: cfg.inbound.clone(),
            window_records: cfg.window_records,
            window_bytes: cfg.window_bytes,
        });
        Link {
            outbound: Outbound {
                name: cfg.outbound_stream(),
                peer: None,
            },
            inbound,
            control: VecDeque::from([hello]),
            acks: BTreeMap::new(),
            bulk: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            got_hello: false,
            closed: None,
            last_recv: now,
            last_ping: now,
            ping_nonce: 0,
            stats: LinkStats::default(),
            cfg,
        }
    }

    pub fn node(&self) -> &str {
        &self.cfg.node
    }

    pub fn stats(&self) -> LinkStats {
        self.stats
    }

    /// Whether the peer's `Hello` has been handled (frames other than
    /// `Hello` are only accepted after it).
    pub fn is_established(&self) -> bool {
        self.got_hello
    }

    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    pub fn closed(&self) -> Option<&Closed> {
        self.closed.as_ref()
    }

    /// Whether the peer has acknowledged everything up to `head` of the
    /// stream this side sends.
    pub fn peer_has(&self, head: &Cursor) -> bool {
        self.outbound
            .peer
            .as_ref()
            .is_some_and(|p| p.acked.seq >= head.seq && !p.need_snapshot)
    }

    /// Cursor the peer has acknowledged on the stream this side sends.
    pub fn peer_cursor(&self) -> Option<Cursor> {
        self.outbound.peer.as_ref().map(|p| p.acked)
    }

    /// Closes the link, telling the peer why.
    pub fn close(&mut self, code: ErrorCode, message: impl Into<String>) {
        if self.closed.is_some() {
            return;
        }
        let message = message.into();
        warn!(node = %self.cfg.node, ?code, %message, "closing sync link");
        self.control.clear();
        self.acks.clear();
        self.bulk.clear();
        self.control.push_back(Frame::Error {
            code,
            message: message.clone(),
        });
        let c = Closed {
            code,
            message,
            by_peer: false,
        };
        self.events.push_back(Event::Closed(c.clone()));
        self.closed = Some(c);
    }

    /// Bytes of one frame from the peer. Anything that does not decode
    /// closes the link.
    pub fn handle_bytes(&mut self, now: u64, bytes: &[u8], src: &dyn LogSource) {
        self.handle_decoded(now, || decode_received_copy(bytes), src);
    }

    /// [`Self::handle_bytes`] of a buffer the link may keep: records take
    /// their payloads as slices of it instead of copies.
    pub fn handle_shared(&mut self, now: u64, bytes: bytes::Bytes, src: &dyn LogSource) {
        self.handle_decoded(now, || decode_received(bytes), src);
    }

    fn handle_decoded(
        &mut self,
        now: u64,
        decode: impl FnOnce() -> Result<Received, FrameError>,
        src: &dyn LogSource,
    ) {
        if self.closed.is_some() {
            return;
        }
        match decode() {
            Ok(r) => self.handle_received(now, r, src),
            Err(e) => self.close(ErrorCode::Malformed, format!("malformed frame: {e}")),
        }
    }

    /// One decoded frame from the peer.
    pub fn handle_frame(&mut self, now: u64, frame: Frame, src: &dyn LogSource) {
        self.handle_received(now, Received::Frame(frame), src);
    }

    /// One decoded frame from the peer, a segment's chain checked already.
    fn handle_received(&mut self, now: u64, received: Received, src: &dyn LogSource) {
        if self.closed.is_some() {
            return;
        }
        self.last_recv = now;
        let frame = match received {
            Received::Frame(f @ Frame::Hello(_)) => f,
            _ if !self.got_hello => {
                return self.close(ErrorCode::Malformed, "first frame must be Hello");
            }
            Received::Chained(stream, records) => return self.on_segment(stream, records),
            Received::Frame(f) => f,
        };
        match frame {
            Frame::Hello(h) => self.on_hello(now, h, src),
            // A segment handed over as a value is checked as a decoded one
            // was (its chain is verified once, here or in the decoder).
            Frame::Segment(seg) => match Chained::from_segment(seg) {
                Ok((stream, records)) => self.on_segment(stream, records),
                Err(e) => self.close(ErrorCode::Malformed, format!("malformed segment: {e}")),
            },
            // What a peer sends decodes as a segment; one handed over in
            // wire form is decoded as the peer's would be.
            Frame::EncodedSegment(e) => match e.decode_chained() {
                Ok((stream, records)) => self.on_segment(stream, records),
                Err(e) => self.close(ErrorCode::Malformed, format!("malformed segment: {e}")),
            },
            Frame::Snapshot {
                stream,
                snapshot,
                chunk,
                last,
            } => self.on_snapshot(stream, snapshot, chunk, last),
            Frame::Ack { stream, cursor } => self.on_ack(now, stream, cursor, src),
            Frame::Ping(n) => {
                // One answer to the latest ping: a peer that floods pings
                // cannot grow the control queue.
                self.control.retain(|f| !matches!(f, Frame::Pong(_)));
                self.control.push_back(Frame::Pong(n));
            }
            Frame::Pong(_) => {}
            Frame::Error { code, message } => {
                debug!(node = %self.cfg.node, ?code, %message, "peer closed the sync link");
                let c = Closed {
                    code,
                    message,
                    by_peer: true,
                };
                self.events.push_back(Event::Closed(c.clone()));
                self.closed = Some(c);
                self.control.clear();
                self.bulk.clear();
                self.acks.clear();
            }
        }
    }

    fn on_hello(&mut self, now: u64, h: Hello, src: &dyn LogSource) {
        if self.got_hello {
            return self.close(ErrorCode::Malformed, "second Hello");
        }
        if h.protocol_version != keel_proto::PROTOCOL_VERSION {
            return self.close(
                ErrorCode::ProtocolVersion,
                format!(
                    "protocol version {} is not supported (this side speaks {})",
                    h.protocol_version,
                    keel_proto::PROTOCOL_VERSION
                ),
            );
        }
        if h.node != self.cfg.node {
            return self.close(
                ErrorCode::Unauthorized,
                format!(
                    "Hello names node {:?} on a link for node {:?}",
                    h.node, self.cfg.node
                ),
            );
        }
        let name = &self.outbound.name;
        let mut cursor = Cursor::default();
        for (stream, c) in &h.cursors {
            if stream != name {
                return self.close(
                    ErrorCode::Unauthorized,
                    format!("node {:?} may not read stream {stream:?}", self.cfg.node),
                );
            }
            cursor = *c;
        }
        let check = match src.check_cursor(name, &cursor) {
            Ok(c) => c,
            Err(e) => return self.close(ErrorCode::Internal, format!("checking cursor: {e}")),
        };
        let (acked, need_snapshot) = match check {
            CursorCheck::Match => (cursor, false),
            CursorCheck::BelowHorizon => (cursor, true),
            // The peer holds another history: it gets everything anew.
            CursorCheck::Mismatch => (
                Cursor {
                    epoch: cursor.epoch,
                    seq: 0,
                    hash: Hash::ZERO,
                },
                true,
            ),
            CursorCheck::Ahead => {
                return self.close(
                    ErrorCode::ChainMismatch,
                    format!(
                        "peer holds {} up to seq {} but this side's log ends before it",
                        self.outbound.name, cursor.seq
                    ),
                );
            }
        };
        let (window_records, window_bytes) = granted_window(h.window_records, h.window_bytes);
        self.outbound.peer = Some(PeerState {
            acked,
            sent: acked,
            need_snapshot,
            snapshot_sent: false,
            inflight: VecDeque::new(),
            last_progress: now,
            unacked_retransmits: 0,
            window_records,
            window_bytes,
        });
        self.got_hello = true;
        self.events.push_back(Event::Established);
        // The peer's Hello names what it holds durably: as good as an ack
        // (so an owner that waits for the peer to hold a record learns it
        // after a reconnect even when nothing new is sent).
        if !need_snapshot && acked.seq > 0 {
            self.events.push_back(Event::Acked {
                stream: self.outbound.name.clone(),
                cursor: acked,
            });
        }
    }

    /// A segment of `stream` from the peer, its chain checked.
    fn on_segment(&mut self, stream: String, mut records: Chained) {
        let Some(inb) = self.inbound.get_mut(&stream) else {
            let msg = format!("node {:?} may not write stream {:?}", self.cfg.node, stream);
            return self.close(ErrorCode::Unauthorized, msg);
        };
        let exp = inb.expected;
        let (prev, end) = (records.prev(), records.end());
        if end.seq <= exp.seq {
            self.stats.duplicate_records += records.len() as u64;
            // Acks are idempotent: the sender resent what this side holds
            // (its ack was lost, or it timed out), so it hears it again.
            if end.seq <= inb.durable.seq {
                self.acks.insert(stream, inb.durable);
            }
            return;
        }
        if prev.seq > exp.seq {
            // A gap: something before this was lost. Tell the sender once
            // (a repeated ack makes it go back), and drop this segment.
            if inb.nacked_at != Some(exp.seq) {
                inb.nacked_at = Some(exp.seq);
                self.acks.insert(stream, inb.durable);
            }
            return;
        }
        // Overlap or exact continuation: keep what is new, checking the
        // junction against what was accepted before.
        let junction_ok = if prev.seq == exp.seq {
            prev.hash == exp.hash
        } else {
            records
                .iter()
                .find(|r| r.seq == exp.seq)
                .is_some_and(|r| r.hash == exp.hash)
        };
        if !junction_ok {
            let msg = format!(
                "segment of {} does not extend the accepted chain at seq {}",
                stream, exp.seq
            );
            return self.close(ErrorCode::ChainMismatch, msg);
        }
        let skipped = records.iter().take_while(|r| r.seq <= exp.seq).count();
        self.stats.duplicate_records += skipped as u64;
        records.skip(skipped);
        // The window this side granted: the peer may have at most that
        // many records (and may only start a segment while below that many
        // bytes) unacknowledged.
        let (out_records, out_bytes) = inb
            .unacked
            .iter()
            .fold((0u64, 0u64), |(r, b), (_, n, by)| (r + n, b + by));
        let new_bytes: u64 = records.iter().map(|r| r.size_hint() as u64).sum();
        let new_records = records.len() as u64;
        // (Read as the sender reads this side's Hello.)
        let (window_records, window_bytes) =
            granted_window(self.cfg.window_records, self.cfg.window_bytes);
        if out_records + new_records > window_records || out_bytes >= window_bytes {
            let msg = format!(
                "the peer exceeded its window on {}: {} records / {out_bytes} bytes unacknowledged, then {new_records} more (window {window_records} records, {window_bytes} bytes)",
                stream, out_records
            );
            return self.close(ErrorCode::Limit, msg);
        }
        if self.cfg.side == Side::Cloud
            && let Err(r) = check_node_records(&self.cfg.node, &records)
        {
            return self.close(r.code, r.message);
        }
        inb.unacked.push_back((end.seq, new_records, new_bytes));
        if self.cfg.fault == Some(Fault::SkipRecord) && records.len() >= 2 {
            records.pop();
        }
        self.stats.records_received += records.len() as u64;
        inb.expected = end;
        inb.nacked_at = None;
        match self.cfg.fault {
            Some(Fault::AckBeforePersist) => {
                self.acks.insert(stream.clone(), end);
            }
            Some(Fault::SkipRecord) | None => {}
        }
        self.actions.push_back(Action::Persist { stream, records });
    }

    fn on_snapshot(&mut self, stream: String, snapshot: Snapshot, chunk: u32, last: bool) {
        let Some(inb) = self.inbound.get_mut(&stream) else {
            let msg = format!("node {:?} may not write stream {stream:?}", self.cfg.node);
            return self.close(ErrorCode::Unauthorized, msg);
        };
        let exp = inb.expected;
        let base = snapshot.base;
        // A late copy of a snapshot already passed is dropped (and what is
        // held acknowledged again: the sender may be waiting for exactly
        // that); a snapshot of a newer epoch replaces whatever is held.
        if base.epoch <= exp.epoch && base.seq <= exp.seq {
            if base.seq <= inb.durable.seq && base.epoch <= inb.durable.epoch {
                self.acks.insert(stream, inb.durable);
            }
            return;
        }
        // The cloud never lets a node replace what it already holds of the
        // node's `up` stream: an honest edge compacts only what the cloud
        // acknowledged, so it needs a snapshot only when the cloud holds
        // nothing (its replica was lost). Anything else would rewind
        // acknowledged history.
        if self.cfg.side == Side::Cloud && (exp.seq > 0 || inb.durable.seq > 0) {
            let msg = format!(
                "a snapshot of {stream} at seq {} would replace history this side holds up to seq {}: acknowledged history is never rewound",
                base.seq, exp.seq
            );
            return self.close(ErrorCode::Forbidden, msg);
        }
        let buf = match (chunk, inb.snapshot.take()) {
            (0, _) => (base, 0, Vec::new()),
            (n, Some((b, next, objs))) if b == base && next == n => (b, next, objs),
            // Out of order: drop; the sender resends from the last ack.
            _ => return,
        };
        let (b, next, mut objs) = buf;
        if next == 0 {
            inb.snapshot_bytes = 0;
        }
        inb.snapshot_bytes += snapshot
            .objects
            .iter()
            .map(|o| (o.state.len() + o.key.len()) as u64)
            .sum::<u64>();
        objs.extend(snapshot.objects);
        if next >= self.cfg.max_snapshot_chunks || inb.snapshot_bytes > self.cfg.max_snapshot_bytes
        {
            let msg = format!(
                "snapshot of {stream} exceeds the limit of {} chunks / {} bytes",
                self.cfg.max_snapshot_chunks, self.cfg.max_snapshot_bytes
            );
            return self.close(ErrorCode::Limit, msg);
        }
        if !last {
            inb.snapshot = Some((b, next + 1, objs));
            return;
        }
        inb.expected = base;
        inb.nacked_at = None;
        inb.unacked.clear();
        self.actions.push_back(Action::InstallSnapshot {
            stream,
            snapshot: Snapshot {
                base,
                objects: objs,
            },
        });
    }

    fn on_ack(&mut self, now: u64, stream: String, cursor: Cursor, src: &dyn LogSource) {
        if stream != self.outbound.name {
            let msg = format!("ack for stream {stream:?}, which this side does not send");
            return self.close(ErrorCode::Malformed, msg);
        }
        let head = src.head(&stream).unwrap_or_default();
        if cursor.seq > head.seq {
            let msg = format!(
                "ack for {stream} seq {} beyond this side's head {}",
                cursor.seq, head.seq
            );
            return self.close(ErrorCode::ChainMismatch, msg);
        }
        let Some(p) = self.outbound.peer.as_mut() else {
            return;
        };
        if cursor.seq > p.acked.seq || (p.need_snapshot && cursor.epoch > p.acked.epoch) {
            p.acked = cursor;
            p.last_progress = now;
            p.unacked_retransmits = 0;
            if p.sent.seq < cursor.seq {
                p.sent = cursor;
            }
            while p
                .inflight
                .front()
                .is_some_and(|(end, _)| *end <= cursor.seq)
            {
                p.inflight.pop_front();
            }
            if p.need_snapshot && p.snapshot_sent {
                p.need_snapshot = false;
                p.snapshot_sent = false;
            }
            self.events.push_back(Event::Acked { stream, cursor });
        } else if cursor.seq == p.acked.seq && p.sent.seq > p.acked.seq {
            // The receiver reports a gap: go back to its cursor.
            p.rewind(now);
            self.stats.rewinds += 1;
        }
    }

    /// The driver made `cursor` of `stream` durable (records persisted or a
    /// snapshot installed): the link may now acknowledge it.
    pub fn handle_persisted(&mut self, stream: &str, cursor: Cursor) {
        if self.closed.is_some() {
            return;
        }
        let Some(inb) = self.inbound.get_mut(stream) else {
            return;
        };
        if cursor.seq >= inb.durable.seq || cursor.epoch > inb.durable.epoch {
            inb.durable = cursor;
        }
        while inb
            .unacked
            .front()
            .is_some_and(|(end, _, _)| *end <= inb.durable.seq)
        {
            inb.unacked.pop_front();
        }
        if inb.durable.seq > inb.expected.seq || inb.durable.epoch > inb.expected.epoch {
            inb.expected = inb.durable;
        }
        if self.cfg.fault != Some(Fault::AckBeforePersist) {
            self.acks.insert(stream.to_owned(), inb.durable);
        }
    }

    /// Time passed: pings, idle timeout, retransmission.
    pub fn handle_timeout(&mut self, now: u64) {
        if self.closed.is_some() {
            return;
        }
        if now.saturating_sub(self.last_recv) >= self.cfg.idle_timeout_ms {
            let msg = format!("no frame from the peer for {} ms", now - self.last_recv);
            return self.close(ErrorCode::IdleTimeout, msg);
        }
        if now.saturating_sub(self.last_ping) >= self.cfg.ping_interval_ms {
            self.last_ping = now;
            self.ping_nonce += 1;
            self.control.push_back(Frame::Ping(self.ping_nonce));
        }
        let limit = self.cfg.max_unacked_retransmits;
        let mut give_up = None;
        if let Some(p) = self.outbound.peer.as_mut() {
            // Only what was actually sent again counts: after a rewind
            // nothing is in flight until the sender may send (a cloud
            // waiting for its catch-up turn sends nothing and counts none).
            let waiting = p.sent.seq > p.acked.seq || (p.need_snapshot && p.snapshot_sent);
            if waiting && now.saturating_sub(p.last_progress) >= self.cfg.retransmit_ms {
                p.unacked_retransmits = p.unacked_retransmits.saturating_add(1);
                if limit > 0 && p.unacked_retransmits > limit {
                    give_up = Some((p.sent.seq, p.acked.seq));
                } else {
                    p.rewind(now);
                    self.stats.rewinds += 1;
                }
            }
        }
        if let Some((sent, acked)) = give_up {
            let msg = format!(
                "the peer acknowledged nothing of {} through {limit} retransmissions (seq {sent} sent, {acked} acknowledged): starting over",
                self.outbound.name
            );
            self.close(ErrorCode::IdleTimeout, msg);
        }
    }

    /// When [`Link::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<u64> {
        if self.closed.is_some() {
            return None;
        }
        let mut t = (self.last_recv + self.cfg.idle_timeout_ms)
            .min(self.last_ping + self.cfg.ping_interval_ms);
        if let Some(p) = &self.outbound.peer
            && (p.sent.seq > p.acked.seq || (p.need_snapshot && p.snapshot_sent))
        {
            t = t.min(p.last_progress + self.cfg.retransmit_ms);
        }
        Some(t)
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next control frame (Hello, Ack, Ping, Pong, Error), if any. A
    /// driver whose bulk channel is full still drains these.
    pub fn poll_control(&mut self) -> Option<Frame> {
        if let Some(f) = self.control.pop_front() {
            return Some(f);
        }
        if self.closed.is_some() {
            return None;
        }
        self.acks
            .pop_first()
            .map(|(stream, cursor)| Frame::Ack { stream, cursor })
    }

    /// Whether the peer still lacks part of the stream this side sends, as
    /// far as this side knows (for admission and pacing).
    pub fn lag(&self, src: &dyn LogSource) -> Option<u64> {
        let p = self.outbound.peer.as_ref()?;
        let head = src.head(&self.outbound.name)?;
        Some(head.seq.saturating_sub(p.acked.seq))
    }

    /// The stream this side sends.
    pub fn outbound_stream(&self) -> &str {
        &self.outbound.name
    }

    /// The next frame to send and its channel: control frames and acks
    /// first, then bulk data read from `src` as the window allows. Call
    /// again after every input and every local append (live push).
    pub fn poll_transmit(&mut self, src: &dyn LogSource) -> Option<(Channel, Frame)> {
        if let Some(f) = self.control.pop_front() {
            return Some((Channel::Control, f));
        }
        if self.closed.is_some() {
            return None;
        }
        if let Some((stream, cursor)) = self.acks.pop_first() {
            return Some((Channel::Control, Frame::Ack { stream, cursor }));
        }
        if let Some(f) = self.bulk.pop_front() {
            return Some((Channel::Bulk, f));
        }
        match self.next_bulk(src) {
            Ok(f) => f.map(|f| (Channel::Bulk, f)),
            Err(e) => {
                self.close(
                    ErrorCode::Internal,
                    format!("reading {}: {e}", self.outbound.name),
                );
                self.control.pop_front().map(|f| (Channel::Control, f))
            }
        }
    }

    fn next_bulk(&mut self, src: &dyn LogSource) -> Result<Option<Frame>, keel_log::Error> {
        let name = self.outbound.name.clone();
        let (max_records, max_bytes) = (self.cfg.max_segment_records, self.cfg.max_segment_bytes);
        let Some(p) = self.outbound.peer.as_mut() else {
            return Ok(None);
        };
        let room_records = p.window_records.saturating_sub(p.inflight_records());
        let room_bytes = p.window_bytes.saturating_sub(p.inflight_bytes());
        if room_records == 0 || room_bytes == 0 {
            return Ok(None);
        }
        let limits = ReadLimits {
            max_records: max_records.min(usize::try_from(room_records).unwrap_or(usize::MAX)),
            max_bytes: max_bytes.min(usize::try_from(room_bytes).unwrap_or(usize::MAX)),
        };
        if p.need_snapshot && !p.snapshot_sent {
            let (snapshot, tail) = src.read_snapshot(&name, limits)?;
            self.stats.snapshots_sent += 1;
            p.snapshot_sent = true;
            p.last_progress = p.last_progress.max(self.last_recv);
            let chunks = chunk_snapshot(&name, snapshot, max_bytes);
            self.bulk.extend(chunks);
            if !tail.records.is_empty() {
                Self::note_sent(p, &tail, &mut self.stats);
                self.bulk.push_back(Frame::Segment(tail));
            } else {
                p.sent = tail.prev;
            }
            return Ok(self.bulk.pop_front());
        }
        if p.need_snapshot {
            // Waiting for the snapshot's ack before sending more.
            return Ok(None);
        }
        let head = src.head(&name).unwrap_or_default();
        if p.sent.seq >= head.seq {
            return Ok(None);
        }
        // A log that holds its records encoded sends them as it holds them.
        if let Some(enc) = src.read_encoded(&name, p.sent.seq, limits)? {
            if enc.records == 0 {
                return Ok(None);
            }
            Self::note_sent_as(p, enc.end, enc.size, enc.records, &mut self.stats);
            return Ok(Some(Frame::EncodedSegment(enc)));
        }
        match src.read(&name, p.sent.seq, limits)? {
            Read::Records(seg) => {
                if seg.records.is_empty() {
                    return Ok(None);
                }
                Self::note_sent(p, &seg, &mut self.stats);
                Ok(Some(Frame::Segment(seg)))
            }
            Read::Snapshot { .. } => {
                // Compacted past what the peer has: snapshot + tail.
                p.need_snapshot = true;
                p.snapshot_sent = false;
                self.next_bulk(src)
            }
        }
    }

    fn note_sent(p: &mut PeerState, seg: &keel_log::Segment, stats: &mut LinkStats) {
        let bytes: usize = seg.records.iter().map(Record::size_hint).sum();
        Self::note_sent_as(p, seg.end(), bytes, seg.records.len(), stats);
    }

    /// [`Self::note_sent`] of a segment ending at `end`, of `records`
    /// records whose size hints sum to `bytes`.
    fn note_sent_as(
        p: &mut PeerState,
        end: Cursor,
        bytes: usize,
        records: usize,
        stats: &mut LinkStats,
    ) {
        p.inflight.push_back((end.seq, bytes as u64));
        p.sent = end;
        stats.records_sent += records as u64;
    }
}

/// Splits a snapshot into chunks of at most about `max_bytes` of state.
fn chunk_snapshot(stream: &str, snapshot: Snapshot, max_bytes: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut cur: Vec<ObjectSnapshot> = Vec::new();
    let mut bytes = 0;
    let base = snapshot.base;
    for o in snapshot.objects {
        let b = o.state.len() + o.key.len() + 16;
        if !cur.is_empty() && bytes + b > max_bytes {
            frames.push(std::mem::take(&mut cur));
            bytes = 0;
        }
        bytes += b;
        cur.push(o);
    }
    frames.push(cur);
    let n = frames.len();
    frames
        .into_iter()
        .enumerate()
        .map(|(i, objects)| Frame::Snapshot {
            stream: stream.to_owned(),
            snapshot: Snapshot { base, objects },
            chunk: u32::try_from(i).unwrap_or(u32::MAX),
            last: i + 1 == n,
        })
        .collect()
}
