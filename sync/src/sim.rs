//! Deterministic fault simulator for the sync protocol (DESIGN.md §7 tier 2).
//!
//! One cloud and N edges, each with an in-memory log that models durability
//! exactly (appends become durable only at a simulated fsync; a crash loses
//! everything not yet durable), its CRDT object stores, and one [`Link`] per
//! connection. Frames cross a simulated network as encoded bytes, with loss,
//! duplication, delay (hence reordering) and partitions; nodes crash and
//! restart; both sides make random edits throughout. Virtual time and one
//! seeded RNG make every run reproducible from its seed.
//!
//! The checker runs after every step: an acknowledged record is durable at
//! the receiver and stays so; replicas are prefixes of their writer's chain;
//! writers never lose durable records. After the faults stop, every stream
//! and every object must converge, and every writer's acknowledged cursor
//! must reach the receiver's durable head (a lost ack that is never sent
//! again would leave it behind).
//!
//! In a share of the seeds one edge is hostile: it writes records that
//! claim another origin, changes authored as the cloud's actor, and
//! compacts its `up` stream past what the cloud acknowledged (so it sends
//! snapshots that would rewind the cloud's history). The cloud must keep
//! none of it, and every other edge must converge as usual.

#![allow(clippy::indexing_slicing)] // indices are the simulator's own, never input

use std::collections::BTreeMap;

use bytes::Bytes;
use keel_log::wire::EncodedSegment;
use keel_log::{
    ByteString, Chained, Cursor, CursorCheck, Entry, Fold, Hash, Hlc, ObjectSnapshot, PayloadKind,
    Read, ReadLimits, Record, Role, Segment, Snapshot,
};
use serde_json::json;

use crate::crdt::{ActorId, ObjectStore};
use crate::frame::encode_frame;
use crate::link::{
    Action, Event, Fault, Link, LinkConfig, LogSource, Side, check_node_records, down_stream,
    up_stream,
};
use crate::objects::{CrdtFold, LiveFold, apply_record, apply_records, apply_snapshot_object};

/// splitmix64: small, fast, good enough, and ours (no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5851_f42d_4c95_7f2d)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn chance(&mut self, p: f64) -> bool {
        ((self.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < p
    }
}

// ---------------------------------------------------------------- the log

/// One stream of the in-memory log: durable state only.
#[derive(Debug, Clone)]
pub struct MemStream {
    pub role: Role,
    /// Compaction horizon (or installed snapshot base).
    pub base: Cursor,
    pub objects: BTreeMap<String, (u64, Vec<u8>)>,
    /// Durable records after `base`.
    pub records: Records,
}

/// A stream's records after its base, held in the batches they were
/// appended in: an append moves its batch in whole instead of growing one
/// vector, which copies everything held each time it doubles.
#[derive(Debug, Clone, Default)]
pub struct Records {
    /// None empty.
    batches: Vec<Batch>,
}

/// Records appended together.
#[derive(Debug, Clone)]
struct Batch {
    /// The index (from the base) of its first record.
    start: usize,
    records: Vec<Record>,
    /// The records in wire form, for a writer's records (appended
    /// locally: the writer sends them); a replica's records are never
    /// sent on, and are not held twice.
    wire: Option<Wire>,
}

/// Records as a segment carries them ([`keel_log::wire::encode_record_entry`]),
/// one after another, as keel-log holds each record as its encoding.
#[derive(Debug, Clone, Default)]
struct Wire {
    bytes: Vec<u8>,
    /// Each record's end in `bytes`, and its size hint.
    ends: Vec<(usize, usize)>,
}

impl Wire {
    fn push(&mut self, r: &Record) {
        keel_log::wire::encode_record_entry(r, &mut self.bytes);
        self.ends.push((self.bytes.len(), r.size_hint()));
    }

    /// Where record `i` starts.
    fn start_of(&self, i: usize) -> usize {
        i.checked_sub(1)
            .and_then(|p| self.ends.get(p))
            .map_or(0, |(end, _)| *end)
    }

    /// The records from `i` on.
    fn split_off(&mut self, i: usize) -> Wire {
        let at = self.start_of(i);
        let bytes = self.bytes.split_off(at.min(self.bytes.len()));
        let ends = self
            .ends
            .split_off(i.min(self.ends.len()))
            .into_iter()
            .map(|(end, hint)| (end - at, hint))
            .collect();
        Wire { bytes, ends }
    }
}

impl Batch {
    fn end(&self) -> usize {
        self.start + self.records.len()
    }
}

impl Records {
    pub fn len(&self) -> usize {
        self.batches.last().map_or(0, Batch::end)
    }

    pub fn is_empty(&self) -> bool {
        self.batches.is_empty()
    }

    /// The batch holding the `i`th record after the base, and the
    /// record's index in it.
    fn locate(&self, i: usize) -> Option<(usize, usize)> {
        let b = self
            .batches
            .partition_point(|b| b.start <= i)
            .checked_sub(1)?;
        let batch = self.batches.get(b)?;
        (i < batch.end()).then(|| (b, i - batch.start))
    }

    /// The `i`th record after the base.
    pub fn get(&self, i: usize) -> Option<&Record> {
        let (b, j) = self.locate(i)?;
        self.batches.get(b)?.records.get(j)
    }

    pub fn last(&self) -> Option<&Record> {
        self.batches.last().and_then(|b| b.records.last())
    }

    pub fn iter(&self) -> impl Iterator<Item = &Record> {
        self.batches.iter().flat_map(|b| &b.records)
    }

    /// The batches, oldest first (none empty).
    pub fn batches(&self) -> impl Iterator<Item = &[Record]> {
        self.batches.iter().map(|b| b.records.as_slice())
    }

    /// One record written here, at the end of the last batch (a new one
    /// after replicated records).
    fn push(&mut self, r: Record) {
        let start = self.len();
        match self.batches.last_mut() {
            Some(Batch {
                records,
                wire: Some(wire),
                ..
            }) => {
                wire.push(&r);
                records.push(r);
            }
            _ => {
                let mut wire = Wire::default();
                wire.push(&r);
                self.batches.push(Batch {
                    start,
                    records: vec![r],
                    wire: Some(wire),
                });
            }
        }
    }

    /// A replicated batch after the last, moved in; returns it as held.
    fn push_batch(&mut self, batch: Vec<Record>) -> &[Record] {
        self.push_held(batch, None)
    }

    fn push_held(&mut self, records: Vec<Record>, wire: Option<Wire>) -> &[Record] {
        if records.is_empty() {
            return &[];
        }
        self.batches.push(Batch {
            start: self.len(),
            records,
            wire,
        });
        self.batches
            .last()
            .map(|b| b.records.as_slice())
            .unwrap_or_default()
    }

    fn clear(&mut self) {
        *self = Records::default();
    }

    /// Takes the first `n` records out.
    fn take_front(&mut self, n: usize) -> Vec<Record> {
        let mut front = Vec::with_capacity(n.min(self.len()));
        let held = std::mem::take(&mut self.batches);
        for mut b in held {
            let take = n.saturating_sub(front.len()).min(b.records.len());
            let rest = b.records.split_off(take);
            front.append(&mut b.records);
            let wire = b.wire.as_mut().map(|w| w.split_off(take));
            self.push_held(rest, wire);
        }
        front
    }

    /// The records after the `i`th as the segment [`MemLog::segment`]
    /// reads, in wire form: `None` if one of them is not held so.
    fn encoded(
        &self,
        stream: &str,
        prev: Cursor,
        mut i: usize,
        limits: ReadLimits,
    ) -> Option<EncodedSegment> {
        let (mut b, first) = self.locate(i)?;
        let batch = self.batches.get(b)?;
        let epoch = batch.records.get(first)?.epoch;
        // Room for the rest of this batch, as far as the limits go.
        let room = batch.wire.as_ref().map_or(0, |w| {
            (w.bytes.len() - w.start_of(first)).min(limits.max_bytes.saturating_add(1 << 16))
        });
        let mut seg = EncodedSegment::builder(stream, epoch, prev, room);
        // Whether the segment is full before a record that would add
        // `size` to `records` records of `bytes` (as `MemLog::segment`).
        let full = |records: usize, bytes: usize| {
            records >= limits.max_records.max(1) || (bytes >= limits.max_bytes && records > 0)
        };
        while let Some(batch) = self.batches.get(b) {
            if full(seg.records(), seg.size()) {
                break;
            }
            let wire = batch.wire.as_ref()?;
            let from = i - batch.start;
            let mut to = from;
            let mut size = 0;
            for (_, hint) in wire.ends.get(from..).unwrap_or_default() {
                if full(seg.records() + (to - from), seg.size() + size) {
                    break;
                }
                size += hint;
                to += 1;
            }
            let end = batch.records.get(to.checked_sub(1)?)?.cursor();
            let bytes = wire.bytes.get(wire.start_of(from)..wire.start_of(to))?;
            seg.extend(bytes, to - from, end, size);
            i = batch.start + to;
            b += 1;
        }
        Some(seg.finish())
    }
}

impl MemStream {
    fn new(role: Role) -> Self {
        MemStream {
            role,
            base: Cursor {
                epoch: 1,
                seq: 0,
                hash: Hash::ZERO,
            },
            objects: BTreeMap::new(),
            records: Records::default(),
        }
    }
    pub fn head(&self) -> Cursor {
        self.records.last().map(Record::cursor).unwrap_or(self.base)
    }
    fn get(&self, seq: u64) -> Option<&Record> {
        if seq <= self.base.seq {
            return None;
        }
        self.records
            .get(usize::try_from(seq - self.base.seq - 1).ok()?)
    }
    fn cursor_at(&self, seq: u64) -> Option<Cursor> {
        if seq == self.base.seq {
            Some(self.base)
        } else {
            self.get(seq).map(Record::cursor)
        }
    }
}

/// A record's origin, key and payload in one buffer, as keel-log keeps a
/// record (one value) and as records received in one frame share it:
/// cloning the record then counts one reference, not three.
fn one_buffer(origin: &str, key: &str, payload: &[u8]) -> (ByteString, ByteString, Bytes) {
    let mut buf = Vec::with_capacity(origin.len() + key.len() + payload.len());
    buf.extend_from_slice(origin.as_bytes());
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(payload);
    let buf = Bytes::from(buf);
    let (o, k) = (origin.len(), origin.len() + key.len());
    let text = |range, s: &str| ByteString::try_from(buf.slice(range)).unwrap_or_else(|_| s.into());
    (text(0..o, origin), text(o..k, key), buf.slice(k..))
}

/// A node's durable log, in memory, with keel-log's semantics.
#[derive(Debug, Clone, Default)]
pub struct MemLog {
    pub streams: BTreeMap<String, MemStream>,
    hlc: Hlc,
}

impl MemLog {
    /// A log holding the given streams, empty.
    pub fn with_streams(streams: impl IntoIterator<Item = (String, Role)>) -> MemLog {
        MemLog {
            streams: streams
                .into_iter()
                .map(|(s, r)| (s, MemStream::new(r)))
                .collect(),
            hlc: Hlc::default(),
        }
    }

    fn stream(&self, name: &str) -> Result<&MemStream, keel_log::Error> {
        self.streams
            .get(name)
            .ok_or_else(|| keel_log::Error::UnknownStream(name.to_owned()))
    }

    /// Appends one local record (durable at once).
    pub fn append_local(&mut self, name: &str, entry: Entry, now_ms: u64) -> Cursor {
        let ts = self.hlc.tick(now_ms);
        let Some(s) = self.streams.get_mut(name) else {
            return Cursor::default();
        };
        let prev = s.head();
        let seq = prev.seq + 1;
        let hash = Record::chain_hash(
            &prev.hash,
            seq,
            prev.epoch,
            ts,
            &entry.origin,
            &entry.key,
            entry.kind,
            &entry.payload,
        );
        let (origin, key, payload) = one_buffer(&entry.origin, &entry.key, &entry.payload);
        s.records.push(Record {
            seq,
            epoch: prev.epoch,
            hlc: ts,
            origin,
            key,
            kind: entry.kind,
            payload,
            hash,
        });
        s.head()
    }

    /// keel-log's `append_replicated`: skips what is held, refuses what does
    /// not extend the chain. Returns the records actually appended.
    pub fn append_replicated(
        &mut self,
        name: &str,
        records: Vec<Record>,
    ) -> Result<Vec<Record>, String> {
        self.append_checked(name, records, None)
            .map(<[Record]>::to_vec)
    }

    /// keel-log's `append_chained`: [`Self::append_replicated`] of records
    /// checked to chain when they were received (not hashed again).
    pub fn append_chained(&mut self, name: &str, records: Chained) -> Result<Vec<Record>, String> {
        self.append_fresh(name, records).map(<[Record]>::to_vec)
    }

    /// [`Self::append_chained`], returning the records appended as they
    /// are held (no copies). All or nothing, as keel-log's batches.
    pub fn append_fresh(&mut self, name: &str, records: Chained) -> Result<&[Record], String> {
        let link = records.prev().hash;
        self.append_checked(name, records.into_records(), Some(link))
    }

    /// Appends to a replica: with `chained`, the records were checked to
    /// chain from that hash, and only the junction with the head is left
    /// to check.
    fn append_checked(
        &mut self,
        name: &str,
        mut records: Vec<Record>,
        chained: Option<Hash>,
    ) -> Result<&[Record], String> {
        let s = self.streams.get_mut(name).ok_or("unknown stream")?;
        let head = s.head();
        // What is held already (a prefix, or the chain breaks below).
        let held = records.iter().take_while(|r| r.seq <= head.seq).count();
        for r in records.get(..held).unwrap_or_default() {
            match s.cursor_at(r.seq) {
                Some(c) if c.hash == r.hash => {}
                None if r.seq < s.base.seq => {}
                _ => {
                    return Err(format!(
                        "{name}: a different record is held at seq {}",
                        r.seq
                    ));
                }
            }
        }
        // What the first fresh record chains to, for a checked chain.
        let link = match held.checked_sub(1) {
            None => chained,
            Some(last) => chained.and(records.get(last).map(|r| r.hash)),
        };
        records.drain(..held);
        let mut prev = head;
        for (i, r) in records.iter().enumerate() {
            let joins = match link {
                Some(h) if i == 0 => h == prev.hash,
                // Within a checked chain.
                Some(_) => true,
                None => r.expected_hash(&prev.hash) == r.hash,
            };
            if r.seq != prev.seq + 1 || !joins {
                return Err(format!(
                    "{name}: record seq {} does not extend head {}",
                    r.seq, prev.seq
                ));
            }
            prev = r.cursor();
        }
        for r in &records {
            self.hlc.observe(r.hlc);
        }
        Ok(s.records.push_batch(records))
    }

    fn install(&mut self, name: &str, snapshot: Snapshot) {
        if let Some(s) = self.streams.get_mut(name) {
            s.base = snapshot.base;
            s.records.clear();
            s.objects = snapshot
                .objects
                .into_iter()
                .map(|o| (o.key, (o.seq, o.state.to_vec())))
                .collect();
        }
    }

    fn compact(&mut self, name: &str, upto: u64, fold: &dyn Fold) -> Result<(), String> {
        let s = self.streams.get_mut(name).ok_or("unknown stream")?;
        if upto <= s.base.seq || upto > s.head().seq {
            return Ok(());
        }
        let n = usize::try_from(upto - s.base.seq).map_err(|e| e.to_string())?;
        let folded = s.records.take_front(n);
        for r in &folded {
            let prev = s.objects.get(&*r.key).map(|(_, st)| st.as_slice());
            match fold.fold(&r.key, prev, r).map_err(|e| e.to_string())? {
                Some(st) => {
                    s.objects.insert(r.key.to_string(), (r.seq, st));
                }
                None => {
                    s.objects.remove(&*r.key);
                }
            }
        }
        if let Some(last) = folded.last() {
            s.base = last.cursor();
        }
        Ok(())
    }

    fn segment(s: &MemStream, stream: &str, after: u64, limits: ReadLimits) -> Segment {
        let prev = s.cursor_at(after).unwrap_or(s.base);
        let held = s.head().seq.saturating_sub(after);
        let mut records =
            Vec::with_capacity(limits.max_records.min(usize::try_from(held).unwrap_or(0)));
        let mut bytes = 0;
        let mut seq = after + 1;
        while let Some(r) = s.get(seq) {
            if records.len() >= limits.max_records.max(1)
                || (bytes >= limits.max_bytes && !records.is_empty())
            {
                break;
            }
            bytes += r.size_hint();
            records.push(r.clone());
            seq += 1;
        }
        Segment {
            stream: stream.to_owned(),
            epoch: records.first().map(|r| r.epoch).unwrap_or(prev.epoch),
            prev,
            records,
        }
    }

    fn snapshot_of(s: &MemStream) -> Snapshot {
        Snapshot {
            base: s.base,
            objects: s
                .objects
                .iter()
                .map(|(k, (seq, st))| ObjectSnapshot {
                    key: k.clone(),
                    seq: *seq,
                    state: st.clone().into(),
                })
                .collect(),
        }
    }
}

impl LogSource for MemLog {
    fn head(&self, stream: &str) -> Option<Cursor> {
        self.streams.get(stream).map(MemStream::head)
    }
    fn check_cursor(&self, stream: &str, cursor: &Cursor) -> Result<CursorCheck, keel_log::Error> {
        let s = self.stream(stream)?;
        Ok(
            if cursor.seq > s.head().seq && cursor.epoch < s.head().epoch {
                CursorCheck::Mismatch
            } else if cursor.seq > s.head().seq {
                CursorCheck::Ahead
            } else if cursor.seq < s.base.seq {
                CursorCheck::BelowHorizon
            } else if s.cursor_at(cursor.seq) == Some(*cursor) {
                CursorCheck::Match
            } else {
                CursorCheck::Mismatch
            },
        )
    }
    fn read(&self, stream: &str, after: u64, limits: ReadLimits) -> Result<Read, keel_log::Error> {
        let s = self.stream(stream)?;
        if after > s.head().seq {
            return Err(keel_log::Error::BeyondHead {
                stream: stream.to_owned(),
                seq: after,
                head: s.head().seq,
            });
        }
        if after < s.base.seq {
            return Ok(Read::Snapshot {
                snapshot: Self::snapshot_of(s),
                tail: Self::segment(s, stream, s.base.seq, limits),
            });
        }
        Ok(Read::Records(Self::segment(s, stream, after, limits)))
    }
    fn read_snapshot(
        &self,
        stream: &str,
        limits: ReadLimits,
    ) -> Result<(Snapshot, Segment), keel_log::Error> {
        let s = self.stream(stream)?;
        Ok((
            Self::snapshot_of(s),
            Self::segment(s, stream, s.base.seq, limits),
        ))
    }
    fn read_encoded(
        &self,
        stream: &str,
        after: u64,
        limits: ReadLimits,
    ) -> Result<Option<EncodedSegment>, keel_log::Error> {
        let s = self.stream(stream)?;
        if after < s.base.seq || after >= s.head().seq {
            return Ok(None);
        }
        let (Some(prev), Ok(i)) = (s.cursor_at(after), usize::try_from(after - s.base.seq)) else {
            return Ok(None);
        };
        Ok(s.records.encoded(stream, prev, i, limits))
    }
}

// ---------------------------------------------------------------- nodes

#[derive(Debug)]
enum Pending {
    Local {
        stream: String,
        entry: Entry,
    },
    Replicate {
        edge: usize,
        stream: String,
        records: Chained,
    },
    Install {
        edge: usize,
        stream: String,
        snapshot: Snapshot,
    },
}

#[derive(Debug)]
struct Node {
    name: String,
    actor: ActorId,
    log: MemLog,
    /// Object stores by edge index (an edge has only its own).
    objects: BTreeMap<usize, ObjectStore>,
    /// Writes handed to the "disk" but not yet fsync'd.
    pending: Vec<Pending>,
    /// Current connection per edge index: (connection id, link).
    links: BTreeMap<usize, (u64, Link)>,
    down_until: Option<u64>,
}

impl Node {
    fn new(name: String, streams: Vec<(String, Role)>, edges: impl Iterator<Item = usize>) -> Node {
        Node {
            actor: ActorId::from_name(&name),
            name,
            log: MemLog {
                streams: streams
                    .into_iter()
                    .map(|(s, r)| (s, MemStream::new(r)))
                    .collect(),
                hlc: Hlc::default(),
            },
            objects: edges.map(|e| (e, ObjectStore::new())).collect(),
            pending: Vec::new(),
            links: BTreeMap::new(),
            down_until: None,
        }
    }

    fn is_up(&self) -> bool {
        self.down_until.is_none()
    }

    /// Rebuilds the object store of `edge` from the durable log alone.
    fn rebuild(&self, edge: usize) -> Result<ObjectStore, String> {
        let mut store = ObjectStore::new();
        let streams = [down_stream(&edge_name(edge)), up_stream(&edge_name(edge))];
        // Stream by stream, as edgecore loads them: all of `down` (where
        // rebase roots are) before `up`.
        for s in &streams {
            if let Some(ms) = self.log.streams.get(s) {
                for (key, (seq, state)) in &ms.objects {
                    let o = ObjectSnapshot {
                        key: key.clone(),
                        seq: *seq,
                        state: state.clone().into(),
                    };
                    apply_snapshot_object(&mut store, &o)
                        .map_err(|e| format!("{}: {e}", self.name))?;
                }
                for r in ms.records.iter() {
                    apply_record(&mut store, r)
                        .map_err(|e| format!("{} seq {}: {e}", self.name, r.seq))?;
                }
            }
        }
        // As edgecore does after loading its log: what a rebase left
        // diverged is re-asserted in the log already (or lost with the
        // crash), and what still waits was built on replaced history.
        store.clear_diverged();
        store.drop_pending();
        Ok(store)
    }
}

fn edge_name(i: usize) -> String {
    format!("edge-{i}")
}

// ---------------------------------------------------------------- the sim

/// Settings of one simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub edges: usize,
    /// Steps with faults and edits.
    pub fault_steps: u64,
    /// Upper bound of steps for convergence once faults stop.
    pub heal_steps: u64,
    pub step_ms: u64,
    pub loss: f64,
    pub duplicate: f64,
    pub max_delay_ms: u64,
    pub partition: f64,
    pub crash_edge: f64,
    pub crash_cloud: f64,
    pub compact: f64,
    pub edit: f64,
    /// Chance that a cloud edit is a rebase of the object instead.
    pub rebase: f64,
    pub fsync: f64,
    /// A deliberately broken link, to prove the checker bites.
    pub fault: Option<Fault>,
    /// The index of a hostile edge, if any (one seed in four by default).
    pub hostile: Option<usize>,
}

impl SimConfig {
    pub fn new(seed: u64, edges: usize) -> Self {
        SimConfig {
            seed,
            edges,
            fault_steps: 300,
            heal_steps: 4000,
            step_ms: 5,
            loss: 0.05,
            duplicate: 0.03,
            max_delay_ms: 40,
            partition: 0.002,
            crash_edge: 0.001,
            crash_cloud: 0.0005,
            compact: 0.004,
            edit: 0.03,
            rebase: 0.1,
            fsync: 0.5,
            fault: None,
            hostile: (seed % 4 == 3 && edges > 1).then(|| (seed / 4) as usize % edges),
        }
    }
}

/// What one run saw.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    pub seed: u64,
    pub steps: u64,
    pub records_written: u64,
    pub acks: u64,
    pub messages: u64,
    pub lost_messages: u64,
    pub crashes: u64,
    pub partitions: u64,
    pub compactions: u64,
    pub snapshots_sent: u64,
    pub connections: u64,
    /// Links the cloud closed because a node broke a rule of its identity.
    pub refusals: u64,
    /// Rebase roots the cloud wrote, and re-assertions the edges wrote.
    pub rebases: u64,
    /// Deleted objects whose memory (dead history) was dropped.
    pub forgotten: u64,
    pub reasserted: u64,
    pub converged: bool,
    /// Invariant violations, each with the step it was seen at.
    pub violations: Vec<String>,
}

#[derive(Debug)]
struct Msg {
    at: u64,
    edge: usize,
    to_cloud: bool,
    conn: u64,
    bytes: bytes::Bytes,
}

#[derive(Debug, Clone, Copy)]
enum Conn {
    Up,
    Down { retry_at: u64 },
}

/// One simulation.
#[derive(Debug)]
pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    now: u64,
    step: u64,
    faults_on: bool,
    cloud: Node,
    edges: Vec<Node>,
    net: Vec<Msg>,
    conns: Vec<Conn>,
    next_conn: u64,
    partitioned_until: Vec<u64>,
    /// Highest ack a writer has received, per stream.
    max_acked: BTreeMap<String, u64>,
    /// Highest durable head a writer has had, per stream.
    writer_heads: BTreeMap<String, u64>,
    /// Per edge, per slot: generation of the cloud's object name.
    generations: Vec<[u64; 4]>,
    counter: u64,
    report: SimReport,
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Sim {
        let n = cfg.edges;
        let mut cloud_streams = Vec::new();
        for i in 0..n {
            cloud_streams.push((down_stream(&edge_name(i)), Role::Writer));
            cloud_streams.push((up_stream(&edge_name(i)), Role::Replica));
        }
        let cloud = Node::new("cloud".into(), cloud_streams, 0..n);
        let edges = (0..n)
            .map(|i| {
                Node::new(
                    edge_name(i),
                    vec![
                        (up_stream(&edge_name(i)), Role::Writer),
                        (down_stream(&edge_name(i)), Role::Replica),
                    ],
                    i..i + 1,
                )
            })
            .collect();
        Sim {
            rng: Rng::new(cfg.seed),
            report: SimReport {
                seed: cfg.seed,
                ..SimReport::default()
            },
            now: 0,
            step: 0,
            faults_on: true,
            cloud,
            edges,
            net: Vec::new(),
            conns: vec![Conn::Down { retry_at: 0 }; n],
            next_conn: 1,
            partitioned_until: vec![0; n],
            max_acked: BTreeMap::new(),
            writer_heads: BTreeMap::new(),
            generations: vec![[0; 4]; n],
            counter: 0,
            cfg,
        }
    }

    /// Runs faults, then heals and waits for convergence. The report's
    /// `violations` is empty if and only if every invariant held.
    pub fn run(mut self) -> SimReport {
        for _ in 0..self.cfg.fault_steps {
            self.tick();
            if self.report.violations.len() > 5 {
                return self.report;
            }
        }
        self.heal();
        for _ in 0..self.cfg.heal_steps {
            self.tick();
            if !self.report.violations.is_empty() {
                return self.report;
            }
            if self.converged() {
                self.report.converged = true;
                break;
            }
        }
        if self.report.converged {
            self.final_checks();
        } else {
            let why = self.divergence().unwrap_or_default();
            self.violate(format!(
                "did not converge within {} steps after healing: {why}",
                self.cfg.heal_steps
            ));
        }
        self.report
    }

    fn violate(&mut self, what: String) {
        self.report
            .violations
            .push(format!("step {} (t={}ms): {what}", self.step, self.now));
    }

    fn heal(&mut self) {
        self.faults_on = false;
        self.partitioned_until.iter_mut().for_each(|p| *p = 0);
        let now = self.now;
        for i in 0..self.cfg.edges {
            if !self.edges[i].is_up() {
                self.restart(Some(i));
            }
        }
        if !self.cloud.is_up() {
            self.restart(None);
        }
        for c in &mut self.conns {
            if let Conn::Down { retry_at } = c {
                *retry_at = (*retry_at).min(now);
            }
        }
    }

    fn node(&mut self, edge: Option<usize>) -> &mut Node {
        match edge {
            None => &mut self.cloud,
            Some(i) => &mut self.edges[i],
        }
    }

    fn tick(&mut self) {
        self.step += 1;
        self.report.steps += 1;
        self.now += self.cfg.step_ms;
        if self.faults_on {
            self.inject_faults();
        }
        // Restarts and reconnects.
        for i in 0..self.cfg.edges {
            if self.edges[i].down_until.is_some_and(|t| t <= self.now) {
                self.restart(Some(i));
            }
        }
        if self.cloud.down_until.is_some_and(|t| t <= self.now) {
            self.restart(None);
        }
        for i in 0..self.cfg.edges {
            self.maybe_connect(i);
        }
        self.deliver();
        if self.faults_on {
            self.edits();
        }
        self.fsyncs();
        self.timeouts();
        self.pump_all();
        self.check();
    }

    fn inject_faults(&mut self) {
        let n = self.cfg.edges as u64;
        if self.rng.chance(self.cfg.partition * n as f64) {
            let i = self.rng.below(n) as usize;
            self.partitioned_until[i] = self.now + self.rng.range(100, 1500);
            self.report.partitions += 1;
        }
        if self.rng.chance(self.cfg.crash_edge * n as f64) {
            let i = self.rng.below(n) as usize;
            if self.edges[i].is_up() {
                self.crash(Some(i));
            }
        }
        if self.rng.chance(self.cfg.crash_cloud) && self.cloud.is_up() {
            self.crash(None);
        }
        if self.rng.chance(self.cfg.compact * n as f64) {
            let i = self.rng.below(n) as usize;
            let on_cloud = self.rng.chance(0.5);
            let (node, stream) = if on_cloud {
                (&mut self.cloud, down_stream(&edge_name(i)))
            } else {
                (&mut self.edges[i], up_stream(&edge_name(i)))
            };
            // An edge compacts its `up` stream only as far as the cloud
            // acknowledged it (the cloud refuses a snapshot that would
            // replace history it holds); the cloud compacts `down` freely.
            let acked = if on_cloud || self.cfg.hostile == Some(i) {
                u64::MAX
            } else {
                self.max_acked.get(&stream).copied().unwrap_or(0)
            };
            if node.is_up()
                && let Some(s) = node.log.streams.get(&stream)
            {
                let (lo, hi) = (s.base.seq, s.head().seq.min(acked));
                if hi > lo {
                    let upto = lo + 1 + self.rng.below(hi - lo);
                    // As edgecore does: `up` keeps what the live documents
                    // hold (not what a rebase root replaced).
                    let Node { log, objects, .. } = &mut *node;
                    let live = objects.get(&i);
                    let live = LiveFold(|key: &str, hash: &[u8; 32]| {
                        live.is_some_and(|o| o.has_change(key, hash))
                    });
                    let fold: &dyn Fold = if on_cloud { &CrdtFold } else { &live };
                    let failed = log.compact(&stream, upto, fold).err();
                    // As cloudcore and edgecore do at each compaction.
                    let forgotten: usize =
                        objects.values_mut().map(ObjectStore::forget_deleted).sum();
                    self.report.forgotten += forgotten as u64;
                    if let Some(e) = failed {
                        self.violate(format!("compaction of {stream} failed: {e}"));
                    }
                    self.report.compactions += 1;
                }
            }
        }
    }

    /// Crash: everything not yet durable is lost, connections drop.
    fn crash(&mut self, edge: Option<usize>) {
        self.report.crashes += 1;
        let down_for = self.rng.range(50, 500);
        let now = self.now;
        let node = self.node(edge);
        node.pending.clear();
        node.down_until = Some(now + down_for);
        match edge {
            Some(i) => self.disconnect(i),
            None => {
                for i in 0..self.cfg.edges {
                    self.disconnect(i);
                }
            }
        }
    }

    fn restart(&mut self, edge: Option<usize>) {
        let node = self.node(edge);
        node.down_until = None;
        let keys: Vec<usize> = node.objects.keys().copied().collect();
        let mut err = None;
        for e in keys {
            match node.rebuild(e) {
                Ok(store) => {
                    node.objects.insert(e, store);
                }
                Err(x) => err = Some(x),
            }
        }
        if let Some(e) = err {
            self.violate(format!("rebuilding objects after restart failed: {e}"));
        }
    }

    fn disconnect(&mut self, i: usize) {
        self.cloud.links.remove(&i);
        self.edges[i].links.remove(&i);
        let backoff = self.rng.range(20, 200);
        self.conns[i] = Conn::Down {
            retry_at: self.now + backoff,
        };
    }

    fn maybe_connect(&mut self, i: usize) {
        let Conn::Down { retry_at } = self.conns[i] else {
            return;
        };
        if retry_at > self.now {
            return;
        }
        if !self.cloud.is_up() || !self.edges[i].is_up() || self.partitioned_until[i] > self.now {
            let backoff = self.rng.range(50, 300);
            self.conns[i] = Conn::Down {
                retry_at: self.now + backoff,
            };
            return;
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.report.connections += 1;
        self.conns[i] = Conn::Up;
        let name = edge_name(i);
        let mk = |node: &Node, side: Side, fault: Option<Fault>, now: u64| {
            let inbound = match side {
                Side::Edge => down_stream(&name),
                Side::Cloud => up_stream(&name),
            };
            let cursor = node.log.head(&inbound).unwrap_or_default();
            let mut cfg = LinkConfig::new(name.clone(), side, cursor);
            cfg.window_records = 64;
            cfg.window_bytes = 64 << 10;
            cfg.max_segment_records = 16;
            cfg.ping_interval_ms = 100;
            cfg.idle_timeout_ms = 600;
            cfg.retransmit_ms = 150;
            cfg.fault = fault;
            Link::new(cfg, now)
        };
        let fault = self.cfg.fault;
        let cl = mk(&self.cloud, Side::Cloud, fault, self.now);
        let el = mk(&self.edges[i], Side::Edge, fault, self.now);
        self.cloud.links.insert(i, (id, cl));
        self.edges[i].links.insert(i, (id, el));
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut due = Vec::new();
        let mut i = 0;
        while i < self.net.len() {
            if self.net[i].at <= now {
                due.push(self.net.swap_remove(i));
            } else {
                i += 1;
            }
        }
        // Deterministic order among messages due at once.
        due.sort_by_key(|m| (m.at, m.edge, m.to_cloud, m.conn));
        for m in due {
            if self.partitioned_until[m.edge] > now {
                self.report.lost_messages += 1;
                continue;
            }
            let edge = m.edge;
            let target = if m.to_cloud { None } else { Some(edge) };
            let node = self.node(target);
            if !node.is_up() {
                continue;
            }
            let Node { links, log, .. } = node;
            let Some((conn, link)) = links.get_mut(&edge) else {
                continue;
            };
            if *conn != m.conn {
                continue;
            }
            link.handle_shared(now, m.bytes.clone(), log);
            self.drive(target, edge);
        }
    }

    /// Takes a link's actions and events after an input.
    fn drive(&mut self, target: Option<usize>, edge: usize) {
        let node = self.node(target);
        let Some((_, link)) = node.links.get_mut(&edge) else {
            return;
        };
        let mut actions = Vec::new();
        while let Some(a) = link.poll_action() {
            actions.push(a);
        }
        let mut events = Vec::new();
        while let Some(e) = link.poll_event() {
            events.push(e);
        }
        for a in actions {
            node.pending.push(match a {
                Action::Persist { stream, records } => Pending::Replicate {
                    edge,
                    stream,
                    records,
                },
                Action::InstallSnapshot { stream, snapshot } => Pending::Install {
                    edge,
                    stream,
                    snapshot,
                },
            });
        }
        let mut closed = false;
        for e in events {
            match e {
                Event::Acked { stream, cursor } => self.on_acked(target, edge, &stream, cursor),
                Event::Closed(c) => {
                    if target.is_none()
                        && !c.by_peer
                        && c.code == crate::frame::ErrorCode::Forbidden
                    {
                        self.report.refusals += 1;
                    }
                    closed = true;
                }
                Event::Established => {}
            }
        }
        if closed {
            // Let the Error frame go out, then drop the connection.
            self.pump(target, edge);
            self.disconnect(edge);
        }
    }

    fn on_acked(&mut self, writer: Option<usize>, edge: usize, stream: &str, cursor: Cursor) {
        self.report.acks += 1;
        let e = self.max_acked.entry(stream.to_owned()).or_default();
        *e = (*e).max(cursor.seq);
        // The receiver must hold it durably right now.
        let receiver = match writer {
            None => &self.edges[edge],
            Some(_) => &self.cloud,
        };
        let held = receiver.log.head(stream).map(|c| c.seq).unwrap_or(0);
        if held < cursor.seq {
            self.violate(format!(
                "{stream}: seq {} acknowledged but the receiver {} holds only {held} durably",
                cursor.seq, receiver.name
            ));
        }
    }

    fn edits(&mut self) {
        for i in 0..self.cfg.edges {
            if self.cloud.is_up() && self.rng.chance(self.cfg.edit) {
                self.cloud_edit(i);
            }
            if self.edges[i].is_up() && self.rng.chance(self.cfg.edit) {
                self.edge_edit(i);
            }
        }
    }

    fn cloud_edit(&mut self, i: usize) {
        self.counter += 1;
        let n = self.counter;
        let slot = self.rng.below(4) as usize;
        let key = format!("pods/default/p{slot}-g{}", self.generations[i][slot]);
        let node = &mut self.cloud;
        let Some(store) = node.objects.get_mut(&i) else {
            return;
        };
        let stream = down_stream(&edge_name(i));
        let exists = store.get_json(&key).is_some();
        if exists && self.rng.chance(self.cfg.rebase) {
            // Compaction of the object's history: a root sent like a change.
            match store.rebase(&key, &node.actor) {
                Ok(Some(root)) => {
                    self.report.rebases += 1;
                    self.report.records_written += 1;
                    let entry = Entry::new("cloudcore", key, PayloadKind::Change, root);
                    self.cloud.pending.push(Pending::Local { stream, entry });
                }
                Ok(None) => {}
                Err(e) => self.violate(format!("rebase of {key} failed: {e}")),
            }
            return;
        }
        let entry = if exists && self.rng.chance(0.1) {
            store.apply_tombstone(&key);
            // Kubernetes gives a re-created object a new uid; keel keys a new
            // incarnation by a new name here.
            self.generations[i][slot] += 1;
            Entry::new("kubectl", key, PayloadKind::Tombstone, Vec::new())
        } else {
            let patch = json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": key, "namespace": "default", "labels": {"rev": n.to_string()}},
                "spec": {"nodeName": edge_name(i), "containers": [{"name": "app", "image": format!("registry.local/app:{n}")}]},
            });
            match store.edit_merge_patch(&key, &node.actor, &patch) {
                Ok(Some(change)) => Entry::new("kubectl", key, PayloadKind::Change, change),
                Ok(None) => return,
                Err(e) => {
                    let msg = format!("cloud edit of {key} failed: {e}");
                    self.violate(msg);
                    return;
                }
            }
        };
        self.report.records_written += 1;
        self.cloud.pending.push(Pending::Local { stream, entry });
    }

    fn edge_edit(&mut self, i: usize) {
        self.counter += 1;
        let n = self.counter;
        let pick = self.rng.next_u64();
        let telemetry = self.rng.chance(0.2);
        let trick = (self.cfg.hostile == Some(i) && self.rng.chance(0.3)).then_some(pick % 3);
        let node = &mut self.edges[i];
        let stream = up_stream(&node.name);
        let entry = if let Some(trick) = trick {
            // Hostile. A forged change goes to an object of its own (so its
            // own history stays consistent with its log).
            let key = format!("pods/default/forged-{n}");
            let patch = json!({"status": {"phase": "Forged", "n": n}});
            let Some(store) = node.objects.get_mut(&i) else {
                return;
            };
            match trick {
                0 => Entry::new(
                    "user:keel-admin",
                    "devices/default/thermo",
                    PayloadKind::Event,
                    format!("{{\"t\":{n}}}"),
                ),
                1 => match store.edit_merge_patch(&key, &ActorId::from_name("cloud"), &patch) {
                    Ok(Some(change)) => {
                        Entry::new(node.name.clone(), key, PayloadKind::Change, change)
                    }
                    _ => return,
                },
                _ => Entry::new(
                    edge_name(i + 1),
                    "devices/default/thermo",
                    PayloadKind::Event,
                    format!("{{\"t\":{n}}}"),
                ),
            }
        } else if telemetry {
            Entry::new(
                node.name.clone(),
                "devices/default/thermo",
                PayloadKind::Event,
                format!("{{\"t\":{n}}}"),
            )
        } else {
            let Some(store) = node.objects.get_mut(&i) else {
                return;
            };
            let keys: Vec<String> = store
                .keys()
                .filter(|k| store.get_json(k).is_some())
                .map(str::to_owned)
                .collect();
            if keys.is_empty() {
                return;
            }
            let key = keys[(pick % keys.len() as u64) as usize].clone();
            let phases = ["Pending", "Running", "Succeeded", "Failed"];
            let patch = json!({"status": {"phase": phases[(n % 4) as usize], "restartCount": n}});
            match store.edit_merge_patch(&key, &node.actor, &patch) {
                Ok(Some(change)) => Entry::new(node.name.clone(), key, PayloadKind::Change, change),
                Ok(None) => return,
                Err(e) => {
                    let msg = format!("edge edit of {key} failed: {e}");
                    self.violate(msg);
                    return;
                }
            }
        };
        self.report.records_written += 1;
        self.edges[i].pending.push(Pending::Local { stream, entry });
    }

    fn fsyncs(&mut self) {
        for idx in 0..=self.cfg.edges {
            let target = if idx == self.cfg.edges {
                None
            } else {
                Some(idx)
            };
            let p = self.cfg.fsync;
            let chance = self.rng.chance(p);
            let now = self.now;
            let node = self.node(target);
            if !node.is_up() || node.pending.is_empty() || !chance {
                continue;
            }
            let pending = std::mem::take(&mut node.pending);
            let mut again = Vec::new();
            let mut reasserted = 0u64;
            let mut errors = Vec::new();
            let mut touched: BTreeMap<usize, Vec<String>> = BTreeMap::new();
            let mut rebuild = Vec::new();
            for op in pending {
                match op {
                    Pending::Local { stream, entry } => {
                        node.log.append_local(&stream, entry, now);
                    }
                    Pending::Replicate {
                        edge,
                        stream,
                        records,
                    } => {
                        match node.log.append_chained(&stream, records) {
                            Ok(fresh) => {
                                if let Some(store) = node.objects.get_mut(&edge) {
                                    if let Err(e) = apply_records(store, &fresh) {
                                        errors.push(format!(
                                            "{}: applying {stream} records {}..: {e}",
                                            node.name,
                                            fresh.first().map_or(0, |r| r.seq)
                                        ));
                                    }
                                    // An edge re-asserts what a rebase root
                                    // did not hold of its own writes.
                                    if target.is_some() {
                                        let up = up_stream(&node.name);
                                        for r in &fresh {
                                            match store.take_diverged(&r.key, &node.actor) {
                                                Ok(Some(change)) => {
                                                    reasserted += 1;
                                                    again.push((
                                                        up.clone(),
                                                        Entry::new(
                                                            node.name.clone(),
                                                            r.key.clone(),
                                                            PayloadKind::Change,
                                                            change,
                                                        ),
                                                    ));
                                                }
                                                Ok(None) => {}
                                                Err(e) => errors.push(format!(
                                                    "{}: re-asserting {}: {e}",
                                                    node.name, r.key
                                                )),
                                            }
                                        }
                                    }
                                }
                            }
                            Err(e) => errors.push(format!(
                                "{}: link handed over records that do not chain: {e}",
                                node.name
                            )),
                        }
                        touched.entry(edge).or_default().push(stream);
                        // Submitted before anything that follows, as
                        // edgecore does (so a rebuild after it finds it).
                        for (stream, entry) in again.drain(..) {
                            node.log.append_local(&stream, entry, now);
                        }
                    }
                    Pending::Install {
                        edge,
                        stream,
                        snapshot,
                    } => {
                        node.log.install(&stream, snapshot);
                        rebuild.push(edge);
                        touched.entry(edge).or_default().push(stream);
                    }
                }
            }
            for edge in rebuild {
                match node.rebuild(edge) {
                    Ok(s) => {
                        node.objects.insert(edge, s);
                    }
                    Err(e) => errors.push(e),
                }
            }
            // Durable now: the links may acknowledge.
            for (edge, streams) in touched {
                let Node { links, log, .. } = &mut *node;
                if let Some((_, link)) = links.get_mut(&edge) {
                    for s in streams {
                        if let Some(c) = log.head(&s) {
                            link.handle_persisted(&s, c);
                        }
                    }
                }
            }
            self.report.records_written += reasserted;
            self.report.reasserted += reasserted;
            for e in errors {
                self.violate(e);
            }
        }
    }

    fn timeouts(&mut self) {
        let now = self.now;
        for i in 0..self.cfg.edges {
            for target in [None, Some(i)] {
                let node = self.node(target);
                if !node.is_up() {
                    continue;
                }
                if let Some((_, link)) = node.links.get_mut(&i)
                    && link.poll_timeout().is_some_and(|t| t <= now)
                {
                    link.handle_timeout(now);
                    self.drive(target, i);
                }
            }
        }
    }

    fn pump_all(&mut self) {
        for i in 0..self.cfg.edges {
            self.pump(None, i);
            self.pump(Some(i), i);
        }
    }

    fn pump(&mut self, target: Option<usize>, edge: usize) {
        let (faults, loss, dup, max_delay) = (
            self.faults_on,
            self.cfg.loss,
            self.cfg.duplicate,
            self.cfg.max_delay_ms,
        );
        let now = self.now;
        let mut out = Vec::new();
        {
            let node = self.node(target);
            if !node.is_up() {
                return;
            }
            let Node { links, log, .. } = node;
            let Some((conn, link)) = links.get_mut(&edge) else {
                return;
            };
            while let Some((_, frame)) = link.poll_transmit(log) {
                out.push((*conn, encode_frame(&frame)));
            }
        }
        for (conn, bytes) in out {
            self.report.messages += 1;
            if faults && self.rng.chance(loss) {
                self.report.lost_messages += 1;
                continue;
            }
            let copies = if faults && self.rng.chance(dup) { 2 } else { 1 };
            for _ in 0..copies {
                let delay = if faults {
                    self.rng.range(1, max_delay)
                } else {
                    1
                };
                self.net.push(Msg {
                    at: now + delay,
                    edge,
                    to_cloud: target.is_some(),
                    conn,
                    bytes: bytes.clone(),
                });
            }
        }
    }

    /// Invariants that hold at every step.
    fn check(&mut self) {
        let mut bad = Vec::new();
        for i in 0..self.cfg.edges {
            let name = edge_name(i);
            for (stream, writer, replica) in [
                (down_stream(&name), &self.cloud, &self.edges[i]),
                (up_stream(&name), &self.edges[i], &self.cloud),
            ] {
                let (Some(w), Some(r)) = (
                    writer.log.streams.get(&stream),
                    replica.log.streams.get(&stream),
                ) else {
                    bad.push(format!("{stream} missing"));
                    continue;
                };
                let (wh, rh) = (w.head(), r.head());
                let acked = self.max_acked.get(&stream).copied().unwrap_or(0);
                if rh.seq < acked {
                    bad.push(format!(
                        "{stream}: acked seq {acked} lost, {} holds only {}",
                        replica.name, rh.seq
                    ));
                }
                if rh.seq > wh.seq {
                    bad.push(format!(
                        "{stream}: replica at {} is ahead of its writer at {}",
                        rh.seq, wh.seq
                    ));
                } else if let Some(c) = w.cursor_at(rh.seq)
                    && c.hash != rh.hash
                {
                    bad.push(format!(
                        "{stream}: replica head {} is not on the writer's chain",
                        rh.seq
                    ));
                }
                let before = self.writer_heads.get(&stream).copied().unwrap_or(0);
                if wh.seq < before {
                    bad.push(format!(
                        "{stream}: writer lost durable records ({before} -> {})",
                        wh.seq
                    ));
                }
            }
        }
        if let Some(h) = self.cfg.hostile {
            let name = edge_name(h);
            if let Some(s) = self.cloud.log.streams.get(&up_stream(&name))
                && let Err(r) = s
                    .records
                    .batches()
                    .try_for_each(|b| check_node_records(&name, b))
            {
                bad.push(format!(
                    "the cloud kept a record the hostile {name} may not write: {}",
                    r.message
                ));
            }
        }
        for i in 0..self.cfg.edges {
            let name = edge_name(i);
            self.writer_heads.insert(
                down_stream(&name),
                self.cloud
                    .log
                    .head(&down_stream(&name))
                    .map_or(0, |c| c.seq),
            );
            self.writer_heads.insert(
                up_stream(&name),
                self.edges[i]
                    .log
                    .head(&up_stream(&name))
                    .map_or(0, |c| c.seq),
            );
        }
        for b in bad {
            self.violate(b);
        }
    }

    fn divergence(&self) -> Option<String> {
        // Cheap checks for every edge first; objects only once logs agree.
        // A hostile edge never converges (the cloud refuses its records).
        for i in self.honest() {
            let name = edge_name(i);
            for s in [down_stream(&name), up_stream(&name)] {
                let (a, b) = (self.cloud.log.head(&s), self.edges[i].log.head(&s));
                if a != b {
                    return Some(format!(
                        "{s}: cloud at {:?}, {name} at {:?}",
                        a.map(|c| c.seq),
                        b.map(|c| c.seq)
                    ));
                }
            }
            if !self.cloud.pending.is_empty() || !self.edges[i].pending.is_empty() {
                return Some("writes still pending".into());
            }
        }
        // Every writer hears that the receiver holds what it holds.
        for i in self.honest() {
            let name = edge_name(i);
            for (stream, writer, receiver) in [
                (down_stream(&name), &self.cloud, &self.edges[i]),
                (up_stream(&name), &self.edges[i], &self.cloud),
            ] {
                let held = receiver.log.head(&stream).map_or(0, |c| c.seq);
                let acked = writer
                    .links
                    .get(&i)
                    .and_then(|(_, l)| l.peer_cursor())
                    .map(|c| c.seq);
                if acked != Some(held) {
                    return Some(format!(
                        "{stream}: the receiver holds seq {held}, the writer's link has {acked:?} acknowledged"
                    ));
                }
            }
        }
        for i in self.honest() {
            let (a, b) = (&self.cloud.objects[&i], &self.edges[i].objects[&i]);
            let keys: std::collections::BTreeSet<&str> = a.keys().chain(b.keys()).collect();
            for k in keys {
                if a.get_json(k) != b.get_json(k) {
                    return Some(format!(
                        "object {k} differs between cloud and {}: {:?} vs {:?}",
                        edge_name(i),
                        a.get_json(k),
                        b.get_json(k)
                    ));
                }
            }
        }
        None
    }

    fn honest(&self) -> impl Iterator<Item = usize> + use<> {
        let hostile = self.cfg.hostile;
        (0..self.cfg.edges).filter(move |i| Some(*i) != hostile)
    }

    /// Every stream and object agrees and nothing is left to persist.
    /// (Frames may still be in flight: pings never stop.)
    fn converged(&self) -> bool {
        self.divergence().is_none()
    }

    /// After convergence: every incrementally maintained object store equals
    /// one rebuilt from the durable log (each record applied exactly once).
    fn final_checks(&mut self) {
        let mut bad = Vec::new();
        for target in std::iter::once(None).chain((0..self.cfg.edges).map(Some)) {
            let node = match target {
                None => &self.cloud,
                Some(i) => &self.edges[i],
            };
            for (edge, store) in &node.objects {
                match node.rebuild(*edge) {
                    Ok(fresh) => {
                        let keys: std::collections::BTreeSet<&str> =
                            store.keys().chain(fresh.keys()).collect();
                        for k in keys {
                            if store.get_json(k) != fresh.get_json(k) {
                                bad.push(format!(
                                    "{}: object {k} differs from a rebuild from its log: {:?} vs rebuilt {:?}",
                                    node.name,
                                    store.get_json(k).map(|v| v["status"].clone()),
                                    fresh.get_json(k).map(|v| v["status"].clone())
                                ));
                            }
                        }
                    }
                    Err(e) => bad.push(e),
                }
            }
            for (_, link) in node.links.values() {
                self.report.snapshots_sent += link.stats().snapshots_sent;
            }
        }
        for b in bad {
            self.violate(b);
        }
    }
}

/// One cloud↔edge pair in memory, no faults: both logs, both links, frames
/// encoded and decoded on the way, persistence immediate. For benches and
/// focused tests (quinn-proto's `Pair`, in spirit).
#[derive(Debug)]
pub struct Pair {
    pub node: String,
    pub cloud: MemLog,
    pub edge: MemLog,
    /// Object stores of the cloud and the edge, if records are applied.
    pub objects: Option<(ObjectStore, ObjectStore)>,
    cloud_link: Link,
    edge_link: Link,
}

impl Pair {
    /// Links for `node` between two logs that already hold their streams.
    pub fn new(
        node: &str,
        cloud: MemLog,
        edge: MemLog,
        objects: Option<(ObjectStore, ObjectStore)>,
    ) -> Pair {
        let link = |log: &MemLog, side: Side| {
            let inbound = match side {
                Side::Edge => down_stream(node),
                Side::Cloud => up_stream(node),
            };
            Link::new(
                LinkConfig::new(node, side, log.head(&inbound).unwrap_or_default()),
                0,
            )
        };
        Pair {
            node: node.to_owned(),
            cloud_link: link(&cloud, Side::Cloud),
            edge_link: link(&edge, Side::Edge),
            cloud,
            edge,
            objects,
        }
    }

    /// Exchanges frames until both links are idle. Returns the number of
    /// records persisted (and applied) on either side.
    pub fn run(&mut self) -> Result<u64, String> {
        let mut moved = 0;
        loop {
            let mut progress = false;
            for to_edge in [true, false] {
                let (from_link, from_log, to_link, to_log, store) = if to_edge {
                    (
                        &mut self.cloud_link,
                        &self.cloud,
                        &mut self.edge_link,
                        &mut self.edge,
                        self.objects.as_mut().map(|o| &mut o.1),
                    )
                } else {
                    (
                        &mut self.edge_link,
                        &self.edge,
                        &mut self.cloud_link,
                        &mut self.cloud,
                        self.objects.as_mut().map(|o| &mut o.0),
                    )
                };
                let mut store = store;
                while let Some((_, frame)) = from_link.poll_transmit(from_log) {
                    progress = true;
                    to_link.handle_shared(0, encode_frame(&frame), to_log);
                    while let Some(a) = to_link.poll_action() {
                        let Action::Persist { stream, records } = a else {
                            return Err("unexpected snapshot".into());
                        };
                        let fresh = to_log.append_fresh(&stream, records)?;
                        if let Some(store) = store.as_deref_mut() {
                            apply_records(store, fresh).map_err(|e| e.to_string())?;
                        }
                        moved += fresh.len() as u64;
                        if let Some(c) = to_log.head(&stream) {
                            to_link.handle_persisted(&stream, c);
                        }
                    }
                    if let Some(c) = to_link.closed() {
                        return Err(format!("link closed: {c:?}"));
                    }
                }
            }
            if !progress {
                return Ok(moved);
            }
        }
    }
}

#[cfg(test)]
mod tests;
