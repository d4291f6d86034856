//! The store: streams on fjall, group commit, reads, cursor checks,
//! compaction and recovery.
//!
//! Storage layout (four fjall keyspaces in one database, so one batch is
//! atomic across them):
//! - `records`:   `stream ‖ 0x00 ‖ seq(u64 BE)` → [`crate::codec`] record
//! - `streams`:   `stream` → stream meta (role, epoch, compaction horizon)
//! - `snapshots`: `stream ‖ 0x00 ‖ object key` → `seq(u64 LE) ‖ state`
//! - `commits`:   `applied` → the last commit journal entry in fjall
//!
//! A group commit is durable when its entry in the commit journal
//! ([`crate::wal`], file `commits.journal`) is; fjall's own journal is
//! synced at the commit journal's checkpoints.
//!
//! A group's writes reach fjall from its journal entry, on the *apply
//! thread* (in commit order, beside the next groups' syncs) or, for a
//! small group when that thread is idle, on the committing thread before
//! the sync. A group is acknowledged once its entry is synced, whether or
//! not fjall has it yet: whatever reads fjall (reads, cursor checks,
//! compaction, staging that looks at what is held) first waits for the
//! groups handed to the apply thread ([`Shared::settled`]), and a
//! checkpoint does too before it frees the journal's space. A crash
//! loses nothing the journal holds: recovery applies the entries fjall
//! lacks.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;

use bytes::Bytes;
use bytestring::ByteString;
use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode, Readable};
use tracing::{debug, error, info, warn};

use crate::codec::{decode_record, encode_record_into};
use crate::record::{validate_entry, validate_stream_name};
use crate::ticket::{Completer, ticket};
use crate::wal::{self, Space, Wal, Write};
use crate::wire::Chained;
use crate::{Clock, Cursor, Entry, Error, Fold, Hash, Hlc, Record, Result, SystemClock, Ticket};

/// Who writes a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// This store is the stream's single writer: it assigns seq and hash.
    Writer,
    /// This store keeps a copy of a stream written elsewhere.
    Replica,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Writer => "writer",
            Role::Replica => "replica",
        }
    }
    fn tag(self) -> u8 {
        match self {
            Role::Writer => 1,
            Role::Replica => 2,
        }
    }
    fn from_tag(t: u8) -> Option<Role> {
        match t {
            1 => Some(Role::Writer),
            2 => Some(Role::Replica),
            _ => None,
        }
    }
}

/// How much of each stream's chain to verify when the store opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VerifyOnOpen {
    /// The last `n` records of every stream (and contiguity at the horizon).
    Tail(u64),
    /// Every record of every stream.
    Full,
}

/// Growth of unflushed memtables after which the records memtable is
/// rotated (see `Shared::bound_memtables`).
const MEMTABLE_ROTATE_BYTES: u64 = 4 << 20;
/// Every how many rotations of the records memtable the other keyspaces'
/// are rotated too.
const SMALL_ROTATION_EVERY: u64 = 4;
/// Unflushed memtable bytes past which staging waits for flushes.
const MEMTABLE_STALL_BYTES: u64 = 48 << 20;
/// Flushed memtables of the records keyspace that gather in fjall's first
/// level before they are merged into the second (fjall's default is 4),
/// and the size of that keyspace's tables (default 64 MiB); the second
/// level holds their product, 256 MiB, as by default. Every stream's
/// records are in every flushed memtable (their keys interleave), so
/// each merge rewrites the whole second level: merging 16 flushes of 4
/// MiB at a time instead of 4 made that work four times rarer. Measured
/// on two cores, 32 writers, batches of 16 (with one background worker):
/// 124–149k records/s before, 160–214k after (fjall's background CPU was
/// more than half of the process's). One writer's keys do not
/// interleave (its flushes are moved down, not merged) and are
/// unchanged. fjall records a keyspace's strategy when the keyspace is
/// created: stores created before keep theirs.
const RECORDS_L0_TABLES: u8 = 16;
const RECORDS_TABLE_BYTES: u64 = 16 << 20;
/// The commit journal's file in the store's directory.
const COMMIT_JOURNAL: &str = "commits.journal";
/// The `commits` keyspace's memtable size (fjall's default is 64 MiB).
const COMMITS_MEMTABLE_BYTES: u64 = 1 << 20;
/// The key of the `applied` marker in the `commits` keyspace.
const APPLIED: &[u8] = b"applied";
/// fjall's journal is synced once this much has gone into the commit
/// journal since the last checkpoint: what a restart after a crash (or a
/// close that does not drop the store) must write back first. At half the
/// ring (32 MiB) cloudcore took 2.8 s to start after a 10-minute soak.
const CHECKPOINT_BYTES: u64 = 8 << 20;
/// Groups whose commit journal entry is at least this large are written
/// to fjall on the apply thread, beside the journal's sync and the next
/// groups; smaller ones are written on the committing thread when the
/// apply thread is idle. Measured with one writer, interleaved: handing
/// over every group took batch 1 (about 400 bytes) from 7.6k to 6.6k
/// records/s (the wake-up costs more than the write), and handing over
/// from 16 KiB left batch 16 (about 5.6 KiB) at 65k where handing it over
/// gives 87k.
const APPLY_BESIDE_BYTES: usize = 4 << 10;
/// Most bytes of journal entries waiting for the apply thread (at least
/// one entry waits, whatever its size): the committing thread waits for
/// room beyond it.
const APPLY_QUEUE_BYTES: usize = 16 << 20;

/// Options for [`Store::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    pub clock: Arc<dyn Clock>,
    pub verify_on_open: VerifyOnOpen,
    /// Upper bound of records in one group commit.
    pub max_group_records: usize,
    /// Upper bound of payload bytes in one group commit.
    pub max_group_bytes: usize,
    /// Fault injection for tests: the fsync of the group commit with this
    /// ordinal (1-based) fails as if the disk had failed.
    #[doc(hidden)]
    pub fail_sync_at_group: Option<u64>,
    /// Fault injection for tests: every fsync takes this much longer (a
    /// slow disk), which widens the window a crash test aims at.
    #[doc(hidden)]
    pub slow_sync: Option<std::time::Duration>,
    /// Fault injection for tests: the apply thread takes this much longer
    /// to write each group to fjall, so that acknowledged groups wait for
    /// it (what reads, checkpoints and a crash must cope with).
    #[doc(hidden)]
    pub slow_apply: Option<std::time::Duration>,
    /// How far ahead of this store's clock a replicated record's HLC may
    /// move it (a peer's clock skew). Beyond it, the record is kept as it
    /// is (its hash covers the HLC) but the local clock only advances to
    /// the bound, so one peer cannot pin every later timestamp.
    pub max_clock_skew_ms: u64,
    /// The commit journal's largest size (a ring; it grows to this as it is
    /// used; 16 MiB by default). fjall's journal is synced every 8 MiB of
    /// entries, or when half of the ring is used if that comes first.
    pub commit_journal_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            clock: Arc::new(SystemClock),
            verify_on_open: VerifyOnOpen::Tail(1024),
            max_group_records: 64 * 1024,
            max_group_bytes: 64 << 20,
            fail_sync_at_group: None,
            slow_sync: None,
            slow_apply: None,
            max_clock_skew_ms: 5 * 60 * 1000,
            commit_journal_bytes: 16 << 20,
        }
    }
}

/// Limits of one read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadLimits {
    pub max_records: usize,
    pub max_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_records: 1024,
            max_bytes: 1 << 20,
        }
    }
}

/// Contiguous records of one stream following `prev`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    pub stream: String,
    pub epoch: u64,
    /// The record (or horizon) the first record chains to.
    pub prev: Cursor,
    pub records: Vec<Record>,
}

impl Segment {
    /// Cursor after the last record (or `prev` when empty).
    pub fn end(&self) -> Cursor {
        self.records.last().map(Record::cursor).unwrap_or(self.prev)
    }
}

/// The folded state of one object at a compaction horizon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectSnapshot {
    pub key: String,
    /// Seq of the last record folded into `state`.
    pub seq: u64,
    pub state: Bytes,
}

/// Everything of a stream up to and including `base`, as per-object state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub base: Cursor,
    pub objects: Vec<ObjectSnapshot>,
}

/// The result of [`Store::read`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Read {
    /// The records after the requested seq.
    Records(Segment),
    /// The requested seq is below the compaction horizon: the snapshot at
    /// the horizon and the records after it.
    Snapshot { snapshot: Snapshot, tail: Segment },
}

/// How a peer's cursor relates to this store's copy of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CursorCheck {
    /// The cursor names a record (or the horizon) of this chain: resume after it.
    Match,
    /// The cursor is below the compaction horizon: send snapshot + tail.
    BelowHorizon,
    /// Same seq, different hash or epoch: the peer holds another history.
    Mismatch,
    /// The cursor is past this store's durable head.
    Ahead,
}

/// What a store knows about one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: String,
    pub role: Role,
    pub epoch: u64,
    /// Last durable record.
    pub head: Cursor,
    /// Records up to here are folded into snapshots.
    pub horizon: Cursor,
}

/// Counters for benches and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Group commits (= commit journal syncs) performed.
    pub groups: u64,
    /// Records made durable.
    pub records: u64,
}

#[derive(Clone, Debug)]
struct StreamState {
    role: Role,
    epoch: u64,
    head: Cursor,
    horizon: Cursor,
}

impl StreamState {
    fn info(&self, name: &str) -> StreamInfo {
        StreamInfo {
            name: name.to_owned(),
            role: self.role,
            epoch: self.epoch,
            head: self.head,
            horizon: self.horizon,
        }
    }
}

enum Op {
    Create {
        role: Role,
        epoch: u64,
    },
    Append(Vec<Entry>),
    /// Records to append to a replica; with the hash the first of them
    /// chains to when they were checked to be a chain ([`Chained`]).
    Replicate(Vec<Record>, Option<Hash>),
    Reset(Snapshot),
    Epoch(u64),
}

/// One staged group, before it is made durable.
#[derive(Default)]
struct Group {
    results: Vec<(Completer<Cursor>, Result<Cursor>)>,
    /// Stream states as they are once this group is durable.
    staged: BTreeMap<String, StreamState>,
    /// Streams created or reset by this group: their whole state is new.
    created: Vec<String>,
    records: u64,
    /// Its writes (`None`: it writes nothing).
    batch: Option<Batch>,
    /// The store was poisoned before it was staged.
    failed: bool,
}

/// A group's writes, as a commit journal entry (fjall gets them from it
/// once the entry has its place in the journal).
#[derive(Default)]
struct Batch {
    entry: Vec<u8>,
}

impl Batch {
    fn insert(&mut self, space: Space, key: &[u8], value: &[u8]) {
        wal::encode_write(&mut self.entry, &Write::Insert(space, key, value));
    }

    /// A record of `stream`, encoded in place.
    fn insert_record(&mut self, stream: &str, r: &Record) {
        wal::encode_insert_with(
            &mut self.entry,
            Space::Records,
            |k| {
                k.extend_from_slice(stream.as_bytes());
                k.push(0);
                k.extend_from_slice(&r.seq.to_be_bytes());
            },
            |v| encode_record_into(r, v),
        );
    }

    fn remove(&mut self, space: Space, key: &[u8]) {
        wal::encode_write(&mut self.entry, &Write::Remove(space, key));
    }

    fn is_empty(&self) -> bool {
        self.entry.is_empty()
    }
}

/// What the committing thread owns: the staged heads (which run ahead of
/// the durable ones), the clock, the commit journal.
struct Committing {
    heads: BTreeMap<String, StreamState>,
    hlc: Hlc,
    journal: Wal,
}

/// Counts the entry the apply thread took as applied (or as failed, if it
/// was not written, or on a panic) and wakes whoever waits for it.
struct ApplyGuard<'a> {
    shared: &'a Shared,
    failed: bool,
}

impl Drop for ApplyGuard<'_> {
    fn drop(&mut self) {
        let mut a = lock(&self.shared.applies);
        a.applied += 1;
        if self.failed {
            a.failed = true;
            if std::thread::panicking() {
                // The thread is gone: nothing handed over will be written.
                self.shared.poisoned.store(true, Ordering::SeqCst);
                a.entries.clear();
                a.bytes = 0;
                a.applied = a.handed;
            }
        }
        self.shared.applies_cv.notify_all();
    }
}

/// Commit journal entries waiting to be written to fjall, in commit order
/// (see the module documentation).
#[derive(Default)]
struct Applies {
    entries: VecDeque<(wal::Written, Vec<u8>)>,
    /// Bytes of `entries`.
    bytes: usize,
    /// Entries handed over so far, and taken care of so far (written to
    /// fjall, or failed): equal when the apply thread has nothing to do.
    handed: u64,
    applied: u64,
    /// An entry could not be written: fjall lacks a published group.
    failed: bool,
    shutdown: bool,
}

struct Pending {
    stream: String,
    op: Op,
    done: Completer<Cursor>,
}

#[derive(Default)]
struct Queue {
    items: Vec<Pending>,
    shutdown: bool,
}

struct Shared {
    db: Database,
    records: Keyspace,
    streams: Keyspace,
    snaps: Keyspace,
    commits: Keyspace,
    state: RwLock<BTreeMap<String, StreamState>>,
    queue: Mutex<Queue>,
    queue_cv: Condvar,
    /// Held while a group is staged and made durable: by the commit
    /// thread, or by a blocking [`Store::append`] that finds it free.
    committing: Mutex<Option<Committing>>,
    poisoned: AtomicBool,
    compaction: Mutex<()>,
    groups: AtomicU64,
    committed: AtomicU64,
    /// Tasks waiting for a stream's durable head to move.
    watchers: Mutex<BTreeMap<String, Vec<std::task::Waker>>>,
    /// Groups handed to the apply thread.
    applies: Mutex<Applies>,
    applies_cv: Condvar,
    /// Write-buffer size at the last rotation, and rotations so far (by
    /// whichever thread writes to fjall).
    rotated_at: Mutex<(u64, u64)>,
    opts: StoreOptions,
}

struct Committer {
    shared: Arc<Shared>,
    commit: Option<JoinHandle<()>>,
    apply: Option<JoinHandle<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        lock(&self.shared.queue).shutdown = true;
        self.shared.queue_cv.notify_all();
        // The commit thread makes what is queued durable, then exits.
        if let Some(t) = self.commit.take() {
            let _ = t.join();
        }
        // A clean close leaves everything in fjall, synced, and an empty
        // commit journal.
        if let Some(c) = lock(&self.shared.committing).as_mut()
            && !self.shared.poisoned.load(Ordering::SeqCst)
        {
            let closed = self
                .shared
                .checkpoint(c)
                .and_then(|()| c.journal.clear().map_err(Error::from));
            if let Err(e) = closed {
                warn!(error = %e, "closing the log store");
            }
        }
        // The apply thread writes what it was handed, then exits.
        lock(&self.shared.applies).shutdown = true;
        self.shared.applies_cv.notify_all();
        if let Some(t) = self.apply.take() {
            let _ = t.join();
        }
    }
}

/// A durable log store. Cheap to clone; all clones share one database and
/// one group-commit thread and one apply thread, which stop when the last
/// clone is dropped.
#[derive(Clone)]
pub struct Store {
    shared: Arc<Shared>,
    _committer: Arc<Committer>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.shared.db.disk_space().ok())
            .field("poisoned", &self.is_poisoned())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stream_prefix(stream: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(stream.len() + 9);
    k.extend_from_slice(stream.as_bytes());
    k.push(0);
    k
}

fn record_key(stream: &str, seq: u64) -> Vec<u8> {
    let mut k = stream_prefix(stream);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn snap_key(stream: &str, key: &str) -> Vec<u8> {
    let mut k = stream_prefix(stream);
    k.extend_from_slice(key.as_bytes());
    k
}

fn seq_of_key(key: &[u8], prefix_len: usize) -> Option<u64> {
    let tail = key.get(prefix_len..)?;
    Some(u64::from_be_bytes(<[u8; 8]>::try_from(tail).ok()?))
}

const META_V1: u8 = 1;

fn encode_meta(s: &StreamState) -> Vec<u8> {
    let mut v = Vec::with_capacity(66);
    v.push(META_V1);
    v.push(s.role.tag());
    v.extend_from_slice(&s.epoch.to_le_bytes());
    v.extend_from_slice(&s.horizon.epoch.to_le_bytes());
    v.extend_from_slice(&s.horizon.seq.to_le_bytes());
    v.extend_from_slice(s.horizon.hash.as_bytes());
    v
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        <[u8; 8]>::try_from(b.get(at..at + 8)?).ok()?,
    ))
}

fn decode_meta(b: &[u8]) -> Option<(Role, u64, Cursor)> {
    if b.len() != 58 || b.first() != Some(&META_V1) {
        return None;
    }
    let role = Role::from_tag(*b.get(1)?)?;
    let epoch = u64_at(b, 2)?;
    let horizon = Cursor {
        epoch: u64_at(b, 10)?,
        seq: u64_at(b, 18)?,
        hash: Hash::from_slice(b.get(26..58)?)?,
    };
    Some((role, epoch, horizon))
}

fn encode_snap(seq: u64, state: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + state.len());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend_from_slice(state);
    v
}

fn decode_snap(stream: &str, b: &[u8]) -> Result<(u64, Bytes)> {
    let seq = u64_at(b, 0).ok_or_else(|| Error::corrupt(stream, 0, "object snapshot too short"))?;
    Ok((seq, Bytes::copy_from_slice(b.get(8..).unwrap_or_default())))
}

impl Store {
    /// Opens (creating if needed) the store in directory `path`, recovering
    /// to the durable prefix of what was written before.
    pub fn open(path: impl AsRef<Path>, opts: StoreOptions) -> Result<Store> {
        let path = path.as_ref();
        std::fs::create_dir_all(path)?;
        // A block cache of 16 MiB (fjall's default is 32): the log is read
        // mostly at its tail, and edges are small machines.
        let db = Database::builder(path)
            .manual_journal_persist(true)
            .cache_size(16 << 20)
            // The journals on disk are a sawtooth: fjall (3.1) starts a new
            // journal at a flush once the active one has passed 64 MB, and
            // deletes an old one once every keyspace has flushed past it
            // (`bound_memtables` rotates all of them). Past this bound on all
            // journals (its smallest; 512 MiB by default) fjall flushes the
            // keyspaces that hold the oldest journal back.
            .max_journaling_size(64 << 20)
            // One background worker for flushes and compactions. With two
            // or more, fjall (3.1) has worker 0 leave compactions to the
            // others by sending each compaction message back to the pool:
            // while the others compact, worker 0 receives and re-sends
            // those messages without pause, a core spent spinning (a fifth
            // of the process's CPU at 32 writers, on two cores). Measured
            // with the records keyspace's compaction below, 32 writers,
            // batches of 16: 154–158k records/s with two workers, 160–214k
            // with one.
            .worker_threads(1)
            .open()?;
        let records = db.keyspace("records", || {
            KeyspaceCreateOptions::default().compaction_strategy(Arc::new(
                fjall::compaction::Leveled::default()
                    .with_l0_threshold(RECORDS_L0_TABLES)
                    .with_table_target_size(RECORDS_TABLE_BYTES),
            ))
        })?;
        let streams = db.keyspace("streams", KeyspaceCreateOptions::default)?;
        let snaps = db.keyspace("snapshots", KeyspaceCreateOptions::default)?;
        // One key, rewritten by every group: each version stays in the
        // memtable until it is flushed, so the memtable is kept small.
        let commits = db.keyspace("commits", || {
            KeyspaceCreateOptions::default().max_memtable_size(COMMITS_MEMTABLE_BYTES)
        })?;
        let shared = Arc::new(Shared {
            db,
            records,
            streams,
            snaps,
            commits,
            state: RwLock::new(BTreeMap::new()),
            queue: Mutex::new(Queue::default()),
            queue_cv: Condvar::new(),
            committing: Mutex::new(None),
            poisoned: AtomicBool::new(false),
            compaction: Mutex::new(()),
            groups: AtomicU64::new(0),
            committed: AtomicU64::new(0),
            watchers: Mutex::new(BTreeMap::new()),
            applies: Mutex::new(Applies::default()),
            applies_cv: Condvar::new(),
            rotated_at: Mutex::new((0, 0)),
            opts,
        });
        let journal = shared.replay_commit_journal(&path.join(COMMIT_JOURNAL))?;
        let hlc = shared.recover()?;
        *lock(&shared.committing) = Some(Committing {
            heads: shared.read_state().clone(),
            hlc: Hlc::new(hlc),
            journal,
        });
        let applier = shared.clone();
        let apply = std::thread::Builder::new()
            .name("keel-log-apply".into())
            .spawn(move || applier.apply_loop())?;
        // (Dropped on an early return: the apply thread then stops.)
        let mut committer = Committer {
            shared: shared.clone(),
            commit: None,
            apply: Some(apply),
        };
        let commits = shared.clone();
        committer.commit = Some(
            std::thread::Builder::new()
                .name("keel-log-commit".into())
                .spawn(move || commits.commit_loop())?,
        );
        info!(path = %path.display(), streams = shared.read_state().len(), "log store open");
        Ok(Store {
            _committer: Arc::new(committer),
            shared,
        })
    }

    /// Creates a stream (idempotent for the same role). Writers start at
    /// `epoch`; a replica takes the epoch of what it receives.
    pub fn create_stream(&self, stream: &str, role: Role, epoch: u64) -> Result<StreamInfo> {
        // A stream that exists (durably: only committed state is
        // published) with this role needs no round through the writer.
        if let Ok(info) = self.info(stream)
            && info.role == role
        {
            return Ok(info);
        }
        self.submit(stream, Op::Create { role, epoch })?.wait()?;
        self.info(stream)
    }

    /// Appends entries to a stream this store writes. Returns once they are
    /// durable, with the cursor after the last one. When no group is being
    /// committed, the calling thread commits this one itself (no hand-off
    /// to the commit thread and back).
    pub fn append(&self, stream: &str, entries: Vec<Entry>) -> Result<Cursor> {
        for e in &entries {
            validate_entry(e)?;
        }
        let ticket = self.submit_and(stream, Op::Append(entries), false)?;
        match self.shared.committing.try_lock() {
            Ok(mut c) => match c.as_mut() {
                Some(c) => self.shared.commit_queued(c, &ticket),
                None => self.shared.queue_cv.notify_one(),
            },
            // Someone else commits: the commit thread takes this group.
            Err(_) => self.shared.queue_cv.notify_one(),
        }
        ticket.wait()
    }

    /// Like [`Store::append`], returning a ticket to wait on or await.
    pub fn append_async(&self, stream: &str, entries: Vec<Entry>) -> Result<Ticket<Cursor>> {
        for e in &entries {
            validate_entry(e)?;
        }
        self.submit(stream, Op::Append(entries))
    }

    /// Appends records received from a stream's writer to this store's
    /// replica. They must extend the local chain; records already held (same
    /// seq and hash) are skipped, so redelivery is harmless. Returns once
    /// durable, with the replica's new head.
    pub fn append_replicated(&self, stream: &str, records: Vec<Record>) -> Result<Cursor> {
        self.append_replicated_async(stream, records)?.wait()
    }

    /// Like [`Store::append_replicated`], returning a ticket.
    pub fn append_replicated_async(
        &self,
        stream: &str,
        records: Vec<Record>,
    ) -> Result<Ticket<Cursor>> {
        self.submit(stream, Op::Replicate(records, None))
    }

    /// [`Store::append_replicated`] of records whose chain was checked when
    /// they were decoded: the same checks and outcome, without hashing each
    /// record again (the chain is joined to the replica's head by its link
    /// hash alone).
    pub fn append_chained(&self, stream: &str, records: Chained) -> Result<Cursor> {
        self.append_chained_async(stream, records)?.wait()
    }

    /// Like [`Store::append_chained`], returning a ticket.
    pub fn append_chained_async(&self, stream: &str, records: Chained) -> Result<Ticket<Cursor>> {
        let link = records.prev().hash;
        self.submit(stream, Op::Replicate(records.into_records(), Some(link)))
    }

    /// Replaces a replica's content with a snapshot received from its
    /// writer (new epoch, or a cursor below the writer's horizon): atomically
    /// drops the local records and snapshots and installs these.
    pub fn install_snapshot(&self, stream: &str, snapshot: Snapshot) -> Result<Cursor> {
        self.submit(stream, Op::Reset(snapshot))?.wait()
    }

    /// Starts epoch `epoch` of a stream this store writes, whose records
    /// are all folded into its snapshot (compact it to its head first):
    /// its horizon and head take the new epoch, and so does every record
    /// appended after. A reader whose cursor names an older epoch gets
    /// the snapshot (cursor check: mismatch) and installs it, as when a
    /// writer lost its log. For a node's `down` stream written by a
    /// replica that takes the node over from another (whose chain the
    /// node holds). An epoch not above the stream's changes nothing.
    pub fn begin_epoch(&self, stream: &str, epoch: u64) -> Result<Cursor> {
        self.submit(stream, Op::Epoch(epoch))?.wait()
    }

    fn submit(&self, stream: &str, op: Op) -> Result<Ticket<Cursor>> {
        self.submit_and(stream, op, true)
    }

    /// Queues `op`; wakes the commit thread if `wake`.
    fn submit_and(&self, stream: &str, op: Op, wake: bool) -> Result<Ticket<Cursor>> {
        validate_stream_name(stream)?;
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let (done, t) = ticket();
        let mut q = lock(&self.shared.queue);
        if q.shutdown {
            return Err(Error::Closed);
        }
        q.items.push(Pending {
            stream: stream.to_owned(),
            op,
            done,
        });
        drop(q);
        if wake {
            self.shared.queue_cv.notify_one();
        }
        Ok(t)
    }

    /// Resolves once the durable head of `stream` is past seq `beyond`
    /// (at once if it already is, or if the stream does not exist). This is
    /// how a sender learns of new local appends without polling.
    pub fn wait_head(&self, stream: &str, beyond: u64) -> HeadWait {
        HeadWait {
            store: self.clone(),
            stream: stream.to_owned(),
            beyond,
        }
    }

    pub fn is_poisoned(&self) -> bool {
        self.shared.poisoned.load(Ordering::SeqCst)
    }

    pub fn stats(&self) -> StoreStats {
        StoreStats {
            groups: self.shared.groups.load(Ordering::Relaxed),
            records: self.shared.committed.load(Ordering::Relaxed),
        }
    }

    pub fn info(&self, stream: &str) -> Result<StreamInfo> {
        self.shared
            .read_state()
            .get(stream)
            .map(|s| s.info(stream))
            .ok_or_else(|| Error::UnknownStream(stream.to_owned()))
    }

    pub fn streams(&self) -> Vec<StreamInfo> {
        self.shared
            .read_state()
            .iter()
            .map(|(n, s)| s.info(n))
            .collect()
    }

    /// Reads durable records after seq `after`, verifying the chain. Below
    /// the compaction horizon the result is snapshot + tail.
    pub fn read(&self, stream: &str, after: u64, limits: ReadLimits) -> Result<Read> {
        let st = self.info(stream)?;
        if after > st.head.seq {
            return Err(Error::BeyondHead {
                stream: stream.to_owned(),
                seq: after,
                head: st.head.seq,
            });
        }
        // Head first, then the snapshot: the snapshot then holds every
        // record up to the head, and a horizon consistent with the records.
        let snap = self.shared.settled()?;
        let horizon = self.shared.horizon_in(&snap, stream)?;
        if after < horizon.seq {
            let objects = self.shared.objects_in(&snap, stream)?;
            let tail = self
                .shared
                .segment_in(&snap, stream, horizon, st.head.seq, limits)?;
            return Ok(Read::Snapshot {
                snapshot: Snapshot {
                    base: horizon,
                    objects,
                },
                tail,
            });
        }
        let prev = if after == horizon.seq {
            horizon
        } else {
            self.shared.record_in(&snap, stream, after)?.cursor()
        };
        Ok(Read::Records(self.shared.segment_in(
            &snap,
            stream,
            prev,
            st.head.seq,
            limits,
        )?))
    }

    /// How `cursor` (a peer's position in `stream`) relates to this chain.
    pub fn check_cursor(&self, stream: &str, cursor: &Cursor) -> Result<CursorCheck> {
        let st = self.info(stream)?;
        if cursor.seq > st.head.seq {
            // Past the head in an older epoch: another writer's history
            // (one this writer took over from), not a lost tail.
            return Ok(if cursor.epoch < st.head.epoch {
                CursorCheck::Mismatch
            } else {
                CursorCheck::Ahead
            });
        }
        let snap = self.shared.settled()?;
        let horizon = self.shared.horizon_in(&snap, stream)?;
        if cursor.seq < horizon.seq {
            return Ok(CursorCheck::BelowHorizon);
        }
        let here = if cursor.seq == horizon.seq {
            horizon
        } else {
            self.shared.record_in(&snap, stream, cursor.seq)?.cursor()
        };
        Ok(if here.hash == cursor.hash && here.epoch == cursor.epoch {
            CursorCheck::Match
        } else {
            CursorCheck::Mismatch
        })
    }

    /// The snapshot at the stream's compaction horizon.
    pub fn snapshot(&self, stream: &str) -> Result<Snapshot> {
        self.info(stream)?;
        let snap = self.shared.settled()?;
        Ok(Snapshot {
            base: self.shared.horizon_in(&snap, stream)?,
            objects: self.shared.objects_in(&snap, stream)?,
        })
    }

    /// Verifies the whole chain of a stream from its horizon to its head;
    /// returns the head, or [`Error::Corrupt`] naming the first bad seq.
    pub fn verify(&self, stream: &str) -> Result<Cursor> {
        let st = self.info(stream)?;
        let snap = self.shared.settled()?;
        let horizon = self.shared.horizon_in(&snap, stream)?;
        self.shared
            .verify_range(&snap, stream, horizon, st.head.seq)
    }

    /// Folds the records up to `upto` into per-object snapshots with `fold`
    /// and drops them. Runs beside appends without blocking them; one
    /// compaction at a time. Returns the new horizon.
    pub fn compact(&self, stream: &str, upto: u64, fold: &dyn Fold) -> Result<Cursor> {
        let _one = lock(&self.shared.compaction);
        if self.is_poisoned() {
            return Err(Error::Poisoned);
        }
        let st = self.info(stream)?;
        if upto > st.head.seq {
            return Err(Error::BeyondHead {
                stream: stream.to_owned(),
                seq: upto,
                head: st.head.seq,
            });
        }
        let shared = &self.shared;
        let snap = shared.settled()?;
        let horizon = shared.horizon_in(&snap, stream)?;
        if upto <= horizon.seq {
            return Ok(horizon);
        }
        // Fold in chunks so memory holds object states, not the records.
        let mut states: BTreeMap<ByteString, Option<(u64, Vec<u8>)>> = BTreeMap::new();
        let mut prev = horizon;
        while prev.seq < upto {
            let seg = shared.segment_in(
                &snap,
                stream,
                prev,
                upto,
                ReadLimits {
                    max_records: 4096,
                    max_bytes: 16 << 20,
                },
            )?;
            for r in &seg.records {
                if !states.contains_key(&*r.key) {
                    let old = match snap.get(&shared.snaps, snap_key(stream, &r.key))? {
                        Some(v) => Some(decode_snap(stream, &v).map(|(s, b)| (s, b.to_vec()))?),
                        None => None,
                    };
                    states.insert(r.key.clone(), old);
                }
                let slot = states.entry(r.key.clone()).or_insert(None);
                let next = fold
                    .fold(&r.key, slot.as_ref().map(|(_, s)| s.as_slice()), r)
                    .map_err(|source| Error::Fold {
                        stream: stream.to_owned(),
                        key: r.key.to_string(),
                        source,
                    })?;
                *slot = next.map(|s| (r.seq, s));
            }
            let end = seg.end();
            if end.seq == prev.seq {
                return Err(Error::corrupt(stream, prev.seq + 1, "record missing"));
            }
            prev = end;
        }
        let new_horizon = prev;
        let mut batch = shared.db.batch();
        for (key, state) in &states {
            match state {
                Some((seq, s)) => {
                    batch.insert(&shared.snaps, snap_key(stream, key), encode_snap(*seq, s))
                }
                None => batch.remove(&shared.snaps, snap_key(stream, key)),
            }
        }
        // The new horizon is written with no group staged or waiting for
        // the apply thread: a group published while this folded (which
        // may write the stream's meta, as an epoch change does) is in
        // fjall before it, and every group staged after it sees it.
        let mut committing = lock(&shared.committing);
        shared.settle()?;
        let meta = {
            let mut state = shared.write_state();
            let s = state
                .get_mut(stream)
                .ok_or_else(|| Error::UnknownStream(stream.to_owned()))?;
            if s.horizon != horizon || s.epoch != st.epoch {
                // A snapshot was installed or an epoch begun meanwhile:
                // what was folded is not the stream's history any more.
                return Ok(s.horizon);
            }
            let mut m = s.clone();
            m.horizon = new_horizon;
            encode_meta(&m)
        };
        batch.insert(&shared.streams, stream.as_bytes(), meta);
        shared.commit_durable(batch)?;
        if let Some(s) = shared.write_state().get_mut(stream) {
            s.horizon = new_horizon;
        }
        if let Some(s) = committing.as_mut().and_then(|c| c.heads.get_mut(stream)) {
            s.horizon = new_horizon;
        }
        drop(committing);
        // The records below the horizon are now unreachable; drop them in
        // chunks. A crash here leaves leftovers that recovery removes.
        shared.delete_records(stream, horizon.seq + 1, new_horizon.seq)?;
        debug!(
            stream,
            horizon = new_horizon.seq,
            objects = states.len(),
            "compacted"
        );
        Ok(new_horizon)
    }

    /// Test helper: overwrites the stored bytes of one record, bypassing
    /// every check, to prove that verification catches tampering.
    #[doc(hidden)]
    pub fn tamper_record(&self, stream: &str, seq: u64, bytes: Vec<u8>) -> Result<()> {
        self.shared.settle()?;
        self.shared.records.insert(record_key(stream, seq), bytes)?;
        self.shared.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }
}

/// Future returned by [`Store::wait_head`].
#[derive(Debug)]
pub struct HeadWait {
    store: Store,
    stream: String,
    beyond: u64,
}

impl std::future::Future for HeadWait {
    type Output = ();

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        let shared = &self.store.shared;
        let past = |s: &Shared| {
            s.read_state()
                .get(&self.stream)
                .is_none_or(|st| st.head.seq > self.beyond)
        };
        if past(shared) {
            return std::task::Poll::Ready(());
        }
        // Register, then check again: a publish between the two checks has
        // either been seen or will wake this waker.
        lock(&shared.watchers)
            .entry(self.stream.clone())
            .or_default()
            .push(cx.waker().clone());
        if past(shared) || self.store.is_poisoned() {
            return std::task::Poll::Ready(());
        }
        std::task::Poll::Pending
    }
}

impl Shared {
    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, StreamState>> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, StreamState>> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn poison(&self, why: &dyn std::fmt::Display) {
        error!(error = %why, "log write failed; store poisoned, refusing all further writes");
        self.poisoned.store(true, Ordering::SeqCst);
    }

    /// Commits a batch and fsyncs the journal; poisons the store on failure.
    fn commit_durable(&self, batch: fjall::OwnedWriteBatch) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Poisoned);
        }
        let r = batch
            .commit()
            .and_then(|()| self.db.persist(PersistMode::SyncAll));
        if let Err(e) = r {
            self.poison(&e);
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    fn horizon_in(&self, snap: &fjall::Snapshot, stream: &str) -> Result<Cursor> {
        let v = snap
            .get(&self.streams, stream.as_bytes())?
            .ok_or_else(|| Error::UnknownStream(stream.to_owned()))?;
        decode_meta(&v)
            .map(|(_, _, h)| h)
            .ok_or_else(|| Error::corrupt(stream, 0, "stream meta does not decode"))
    }

    fn record_in(&self, snap: &fjall::Snapshot, stream: &str, seq: u64) -> Result<Record> {
        let v = snap
            .get(&self.records, record_key(stream, seq))?
            .ok_or_else(|| Error::corrupt(stream, seq, "record missing"))?;
        let r = decode_record(&v).map_err(|e| Error::corrupt(stream, seq, e.to_string()))?;
        if r.seq != seq {
            return Err(Error::corrupt(stream, seq, format!("holds seq {}", r.seq)));
        }
        Ok(r)
    }

    fn objects_in(&self, snap: &fjall::Snapshot, stream: &str) -> Result<Vec<ObjectSnapshot>> {
        let prefix = stream_prefix(stream);
        let mut out = Vec::new();
        for g in snap.prefix(&self.snaps, &prefix) {
            let (k, v) = g.into_inner()?;
            let key = k
                .get(prefix.len()..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .ok_or_else(|| Error::corrupt(stream, 0, "object snapshot key is not UTF-8"))?
                .to_owned();
            let (seq, state) = decode_snap(stream, &v)?;
            out.push(ObjectSnapshot { key, seq, state });
        }
        Ok(out)
    }

    /// Records after `prev` up to `last`, within `limits` (always at least
    /// one record if any), each checked against the chain.
    fn segment_in(
        &self,
        snap: &fjall::Snapshot,
        stream: &str,
        prev: Cursor,
        last: u64,
        limits: ReadLimits,
    ) -> Result<Segment> {
        let mut records = Vec::new();
        let mut bytes = 0usize;
        let mut want = prev.seq + 1;
        let mut hash = prev.hash;
        if want <= last {
            let range = record_key(stream, want)..=record_key(stream, last);
            for g in snap.range(&self.records, range) {
                if records.len() >= limits.max_records.max(1)
                    || (bytes >= limits.max_bytes && !records.is_empty())
                {
                    break;
                }
                let (_, v) = g.into_inner()?;
                let r =
                    decode_record(&v).map_err(|e| Error::corrupt(stream, want, e.to_string()))?;
                if r.seq != want {
                    return Err(Error::corrupt(
                        stream,
                        want,
                        format!("record missing (found seq {} next)", r.seq),
                    ));
                }
                if r.expected_hash(&hash) != r.hash {
                    return Err(Error::corrupt(stream, r.seq, "hash chain broken"));
                }
                hash = r.hash;
                want += 1;
                bytes += r.size_hint();
                records.push(r);
            }
            if records.is_empty() {
                return Err(Error::corrupt(stream, want, "record missing"));
            }
        }
        Ok(Segment {
            stream: stream.to_owned(),
            epoch: records.first().map(|r| r.epoch).unwrap_or(prev.epoch),
            prev,
            records,
        })
    }

    fn verify_range(
        &self,
        snap: &fjall::Snapshot,
        stream: &str,
        from: Cursor,
        last: u64,
    ) -> Result<Cursor> {
        let mut prev = from;
        while prev.seq < last {
            let seg = self.segment_in(
                snap,
                stream,
                prev,
                last,
                ReadLimits {
                    max_records: 4096,
                    max_bytes: 16 << 20,
                },
            )?;
            prev = seg.end();
        }
        Ok(prev)
    }

    fn delete_records(&self, stream: &str, from: u64, to: u64) -> Result<()> {
        let mut seq = from;
        while seq <= to {
            let end = to.min(seq.saturating_add(4095));
            let mut batch = self.db.batch();
            for s in seq..=end {
                batch.remove(&self.records, record_key(stream, s));
            }
            batch.commit()?;
            seq = end + 1;
        }
        Ok(())
    }

    /// Rebuilds the in-memory stream table from disk and checks it. Returns
    /// the highest HLC seen, to seed the clock.
    fn recover(&self) -> Result<u64> {
        let mut table = BTreeMap::new();
        // The highest HLC of the streams this store writes, and of the
        // replicas (bounded like a live replicated record).
        let (mut max_hlc, mut max_replica) = (0, 0);
        let snap = self.settled()?;
        for g in snap.iter(&self.streams) {
            let (k, v) = g.into_inner()?;
            let name = std::str::from_utf8(&k)
                .map_err(|_| Error::corrupt("?", 0, "stream name is not UTF-8"))?
                .to_owned();
            let (role, epoch, horizon) = decode_meta(&v)
                .ok_or_else(|| Error::corrupt(&name, 0, "stream meta does not decode"))?;
            let prefix = stream_prefix(&name);
            // Leftovers of a compaction interrupted by a crash.
            let first = match snap.prefix(&self.records, &prefix).next() {
                Some(g) => {
                    let k = g.key()?;
                    seq_of_key(&k, prefix.len())
                        .ok_or_else(|| Error::corrupt(&name, 0, "bad record key"))?
                }
                None => 0,
            };
            if first != 0 && first <= horizon.seq {
                warn!(stream = %name, from = first, to = horizon.seq, "removing records left below the compaction horizon");
                self.delete_records(&name, first, horizon.seq)?;
            }
            let head = match snap.prefix(&self.records, &prefix).next_back() {
                Some(g) => {
                    let (k, v) = g.into_inner()?;
                    let seq = seq_of_key(&k, prefix.len())
                        .ok_or_else(|| Error::corrupt(&name, 0, "bad record key"))?;
                    let r =
                        decode_record(&v).map_err(|e| Error::corrupt(&name, seq, e.to_string()))?;
                    if r.seq != seq {
                        return Err(Error::corrupt(&name, seq, format!("holds seq {}", r.seq)));
                    }
                    match role {
                        Role::Writer => max_hlc = max_hlc.max(r.hlc),
                        Role::Replica => max_replica = max_replica.max(r.hlc),
                    }
                    r.cursor()
                }
                None => horizon,
            };
            if head.seq < horizon.seq {
                return Err(Error::corrupt(
                    &name,
                    head.seq,
                    "head below compaction horizon",
                ));
            }
            let from = match self.opts.verify_on_open {
                VerifyOnOpen::Full => horizon,
                VerifyOnOpen::Tail(n) => {
                    let start = head.seq.saturating_sub(n).max(horizon.seq);
                    if start == horizon.seq {
                        horizon
                    } else {
                        self.record_in(&snap, &name, start)?.cursor()
                    }
                }
            };
            // A chain whose first record after the horizon is missing or
            // does not follow the horizon is caught here too.
            if head.seq > horizon.seq && from.seq > horizon.seq {
                self.segment_in(
                    &snap,
                    &name,
                    horizon,
                    horizon.seq + 1,
                    ReadLimits::default(),
                )?;
            }
            let verified = self.verify_range(&snap, &name, from, head.seq)?;
            if verified != head {
                return Err(Error::corrupt(&name, head.seq, "tail does not verify"));
            }
            table.insert(
                name,
                StreamState {
                    role,
                    epoch,
                    head,
                    horizon,
                },
            );
        }
        *self.write_state() = table;
        let bound = Hlc::bound(self.opts.clock.now_ms(), self.opts.max_clock_skew_ms);
        Ok(max_hlc.max(max_replica.min(bound)))
    }

    /// Keeps what fjall holds in memory bounded under sustained appends.
    /// fjall rotates a memtable through a request its workers may drop when
    /// busy, and its write-buffer limit is not enforced (3.1), so under a
    /// flood the active memtable grew with everything written. Here the
    /// memtables are rotated (and flushed) every
    /// [`MEMTABLE_ROTATE_BYTES`] of growth, and staging waits while more
    /// than [`MEMTABLE_STALL_BYTES`] is unflushed: appends then queue up
    /// behind it, and their writers wait for their tickets (backpressure).
    ///
    /// The records memtable, which grows the most, is rotated every time;
    /// the others (snapshots, stream metas, the commit marker) every
    /// [`SMALL_ROTATION_EVERY`]th time, so that fjall's old journals are
    /// still released soon (each waits for every keyspace to flush past
    /// it) without the fsyncs of four flushes at every rotation, which
    /// compete with the commit journal's for the disk.
    fn bound_memtables(&self) {
        let mut guard = lock(&self.rotated_at);
        let (rotated_at, rotations) = &mut *guard;
        let size = self.db.write_buffer_size();
        if size < *rotated_at {
            *rotated_at = size;
        }
        if size >= *rotated_at + MEMTABLE_ROTATE_BYTES {
            *rotations += 1;
            let all = rotations.is_multiple_of(SMALL_ROTATION_EVERY);
            let small = [&self.snaps, &self.streams, &self.commits];
            let rotate = std::iter::once(&self.records).chain(small.into_iter().filter(|_| all));
            for ks in rotate {
                if let Err(e) = ks.rotate_memtable() {
                    warn!(error = %e, "rotating a memtable failed");
                }
            }
            *rotated_at = self.db.write_buffer_size();
        }
        let start = std::time::Instant::now();
        while self.db.write_buffer_size() > MEMTABLE_STALL_BYTES
            && start.elapsed() < std::time::Duration::from_secs(30)
            && !self.poisoned.load(Ordering::SeqCst)
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// The commit thread: commits whatever is queued, group by group, until
    /// the store shuts down with nothing queued.
    fn commit_loop(self: Arc<Self>) {
        loop {
            {
                let mut q = lock(&self.queue);
                while q.items.is_empty() && !q.shutdown {
                    q = self
                        .queue_cv
                        .wait(q)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if q.items.is_empty() {
                    return;
                }
            }
            let mut c = lock(&self.committing);
            let Some(c) = c.as_mut() else { return };
            loop {
                let items = self.take_group(&mut lock(&self.queue));
                if items.is_empty() {
                    break;
                }
                self.commit_round(c, items);
            }
        }
    }

    /// A blocking append's own commit: groups are committed until `mine`
    /// is done; what is queued after it is left to the commit thread.
    fn commit_queued(&self, c: &mut Committing, mine: &Ticket<Cursor>) {
        while !mine.is_done() {
            let items = self.take_group(&mut lock(&self.queue));
            if items.is_empty() {
                break;
            }
            self.commit_round(c, items);
        }
        if !lock(&self.queue).items.is_empty() {
            self.queue_cv.notify_one();
        }
    }

    /// Group commit: assigns seq / HLC / hash to a group of pending ops
    /// against the staged heads, makes their writes durable with one
    /// commit journal sync, then publishes the new heads and completes the
    /// callers.
    fn commit_round(&self, c: &mut Committing, items: Vec<Pending>) {
        let mut group = self.stage_group(items, &mut c.heads, &mut c.hlc);
        let ok = match group.batch.take() {
            _ if group.failed => false,
            Some(batch) => match self.make_durable(c, batch) {
                Ok(()) => true,
                Err(e) => {
                    self.poison(&e);
                    false
                }
            },
            None => true,
        };
        if !ok {
            for (done, _) in group.results {
                done.complete(Err(Error::Poisoned));
            }
            // What was staged is not durable: the next group stages
            // against the durable heads.
            c.heads = self.read_state().clone();
            return;
        }
        self.committed.fetch_add(group.records, Ordering::Relaxed);
        self.publish(group.staged, &group.created);
        for (done, r) in group.results {
            done.complete(r);
        }
    }

    /// Writes a group's entry to the commit journal and syncs it; its
    /// writes (with the `applied` marker) go to fjall on the apply thread,
    /// or here before the sync for a small group when that thread is idle.
    /// A group larger than the whole journal goes through fjall's journal,
    /// synced.
    fn make_durable(&self, c: &mut Committing, batch: Batch) -> Result<()> {
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Poisoned);
        }
        let ordinal = self.groups.fetch_add(1, Ordering::Relaxed) + 1;
        let written = match c.journal.append(&batch.entry) {
            Ok(w) => Some(w?),
            Err(wal::Full::NoRoom) => {
                self.checkpoint(c)?;
                match c.journal.append(&batch.entry) {
                    Ok(w) => Some(w?),
                    Err(_) => None,
                }
            }
            Err(wal::Full::TooLarge) => None,
        };
        let Some(w) = written else {
            self.settle()?;
            self.apply_entry(None, &batch.entry)?;
            self.db.persist(PersistMode::SyncAll)?;
            c.journal.checkpoint();
            self.bound_memtables();
            return Ok(());
        };
        let inline = batch.entry.len() < APPLY_BESIDE_BYTES && self.apply_idle();
        if inline {
            self.apply_entry(Some(w), &batch.entry)?;
        } else {
            self.hand_over(w, batch.entry);
        }
        if let Some(d) = self.opts.slow_sync {
            std::thread::sleep(d);
        }
        if self.opts.fail_sync_at_group == Some(ordinal) {
            return Err(Error::Io(std::io::Error::other("injected fsync failure")));
        }
        c.journal.sync()?;
        if c.journal.live_bytes() > (c.journal.capacity() / 2).min(CHECKPOINT_BYTES) {
            self.checkpoint(c)?;
        }
        if inline {
            self.bound_memtables();
        }
        Ok(())
    }

    /// Syncs fjall's journal: every group written to fjall so far is then
    /// durable there, and the commit journal's space is free again. Waits
    /// for the apply thread first (the space of an entry fjall does not
    /// hold is not free).
    fn checkpoint(&self, c: &mut Committing) -> Result<()> {
        self.settle()?;
        if self.poisoned.load(Ordering::SeqCst) {
            return Err(Error::Poisoned);
        }
        self.db.persist(PersistMode::SyncAll)?;
        c.journal.checkpoint();
        Ok(())
    }

    /// Whether the apply thread has nothing to write (only the committing
    /// thread hands it anything, so it stays so until that thread does).
    fn apply_idle(&self) -> bool {
        let a = lock(&self.applies);
        a.applied == a.handed
    }

    /// Hands a journal entry to the apply thread, once there is room.
    fn hand_over(&self, w: wal::Written, entry: Vec<u8>) {
        let mut a = lock(&self.applies);
        while !a.entries.is_empty() && a.bytes + entry.len() > APPLY_QUEUE_BYTES {
            a = self
                .applies_cv
                .wait(a)
                .unwrap_or_else(PoisonError::into_inner);
        }
        a.bytes += entry.len();
        a.entries.push_back((w, entry));
        a.handed += 1;
        self.applies_cv.notify_all();
    }

    /// Waits until fjall holds every group handed to the apply thread so
    /// far (each group published so far included): [`Error::Poisoned`] if
    /// one of them could not be written (fjall then lacks it).
    fn settle(&self) -> Result<()> {
        let mut a = lock(&self.applies);
        let target = a.handed;
        while a.applied < target {
            a = self
                .applies_cv
                .wait(a)
                .unwrap_or_else(PoisonError::into_inner);
        }
        if a.failed {
            return Err(Error::Poisoned);
        }
        Ok(())
    }

    /// A snapshot of fjall holding every group published so far.
    fn settled(&self) -> Result<fjall::Snapshot> {
        self.settle()?;
        Ok(self.db.snapshot())
    }

    /// The apply thread: writes handed entries to fjall in order, until
    /// the store shuts down with nothing left. A failed write poisons the
    /// store; from then on entries are counted but not written (a later
    /// entry's `applied` marker would make recovery skip the failed one,
    /// which the journal still holds: recovery writes it again).
    fn apply_loop(self: Arc<Self>) {
        loop {
            let (written, entry) = {
                let mut a = lock(&self.applies);
                loop {
                    if let Some(e) = a.entries.pop_front() {
                        a.bytes -= e.1.len();
                        break e;
                    }
                    if a.shutdown {
                        return;
                    }
                    a = self
                        .applies_cv
                        .wait(a)
                        .unwrap_or_else(PoisonError::into_inner);
                }
            };
            // A panic below would leave every waiter waiting: the guard
            // counts the entry as failed and wakes them.
            let mut guard = ApplyGuard {
                shared: &self,
                failed: true,
            };
            if let Some(d) = self.opts.slow_apply {
                std::thread::sleep(d);
            }
            if !self.poisoned.load(Ordering::SeqCst) {
                match self.apply_entry(Some(written), &entry) {
                    Ok(()) => guard.failed = false,
                    Err(e) => self.poison(&e),
                }
            }
            drop(entry);
            drop(guard);
            // (After the waiters are woken: fjall holds the entry; a stall
            // for flushes holds back only the next one.)
            self.bound_memtables();
        }
    }

    /// Applies the commit journal's entries that fjall does not hold (its
    /// journal was synced only at checkpoints) and checkpoints. Returns
    /// the journal, ready for writing.
    fn replay_commit_journal(&self, path: &Path) -> Result<Wal> {
        let applied =
            match self.commits.get(APPLIED)? {
                Some(v) => Some(wal::decode_applied(&v).ok_or_else(|| {
                    Error::corrupt("?", 0, "commit journal marker does not decode")
                })?),
                None => None,
            };
        let mut replayed = 0u64;
        let mut journal = Wal::open(path, self.opts.commit_journal_bytes, applied, |w, entry| {
            self.apply_entry(Some(w), entry)?;
            replayed += 1;
            Ok(())
        })?;
        if replayed > 0 {
            info!(entries = replayed, "applied the commit journal's tail");
        }
        self.db.persist(PersistMode::SyncAll)?;
        journal.checkpoint();
        Ok(journal)
    }

    /// Writes a commit journal entry's writes to fjall as one atomic
    /// batch, the `applied` marker first (when the entry is in the
    /// journal).
    fn apply_entry(&self, written: Option<wal::Written>, entry: &[u8]) -> Result<()> {
        let writes = wal::decode_writes(entry)
            .ok_or_else(|| Error::corrupt("?", 0, "a commit journal entry does not decode"))?;
        let mut batch = self.db.batch();
        if let Some(w) = written {
            batch.insert(&self.commits, APPLIED, wal::encode_applied(w).to_vec());
        }
        for write in writes {
            match write {
                Write::Insert(space, k, v) => batch.insert(self.keyspace(space), k, v),
                Write::Remove(space, k) => batch.remove(self.keyspace(space), k),
            }
        }
        batch.commit()?;
        Ok(())
    }

    fn keyspace(&self, space: Space) -> &Keyspace {
        match space {
            Space::Records => &self.records,
            Space::Streams => &self.streams,
            Space::Snapshots => &self.snaps,
        }
    }

    fn publish(&self, staged: BTreeMap<String, StreamState>, created: &[String]) {
        let names: Vec<String> = staged.keys().cloned().collect();
        // State first, then wake: a waiter registering meanwhile re-checks
        // the state after registering, so no wake-up is lost.
        self.publish_state(staged, created);
        let mut wake = Vec::new();
        {
            let mut watchers = lock(&self.watchers);
            for name in &names {
                if let Some(w) = watchers.remove(name) {
                    wake.extend(w);
                }
            }
        }
        for w in wake {
            w.wake();
        }
    }

    fn publish_state(&self, staged: BTreeMap<String, StreamState>, created: &[String]) {
        let mut state = self.write_state();
        for (name, s) in staged {
            match state.get_mut(&name) {
                // Compaction owns the horizon of an existing stream,
                // unless this group created or reset it.
                Some(cur) if !created.contains(&name) => {
                    cur.head = s.head;
                    cur.epoch = s.epoch;
                }
                _ => {
                    state.insert(name, s);
                }
            }
        }
    }

    /// Takes pending items up to the group limits (at least one).
    fn take_group(&self, q: &mut Queue) -> Vec<Pending> {
        let mut records = 0usize;
        let mut bytes = 0usize;
        let mut n = 0;
        for p in &q.items {
            let (r, b) = match &p.op {
                Op::Append(es) => (es.len(), es.iter().map(|e| e.payload.len()).sum()),
                Op::Replicate(rs, _) => (rs.len(), rs.iter().map(|r| r.payload.len()).sum()),
                Op::Create { .. } | Op::Reset(_) | Op::Epoch(_) => (1, 0),
            };
            if n > 0
                && (records + r > self.opts.max_group_records
                    || bytes + b > self.opts.max_group_bytes)
            {
                break;
            }
            records += r;
            bytes += b;
            n += 1;
        }
        q.items.drain(..n).collect()
    }

    fn stage_group(
        &self,
        items: Vec<Pending>,
        heads: &mut BTreeMap<String, StreamState>,
        hlc: &mut Hlc,
    ) -> Group {
        let mut group = Group::default();
        if self.poisoned.load(Ordering::SeqCst) {
            group.failed = true;
            group.results = items
                .into_iter()
                .map(|p| (p.done, Err(Error::Poisoned)))
                .collect();
            return group;
        }
        let mut batch = Batch::default();
        let now = self.opts.clock.now_ms();
        for p in items {
            let resets = matches!(p.op, Op::Reset(_) | Op::Epoch(_));
            let mut current = heads.get(&p.stream).cloned();
            // Compaction moves horizons beside staging; take the newest.
            if let (Some(cur), Some(published)) =
                (current.as_mut(), self.read_state().get(&p.stream))
                && published.horizon.seq > cur.horizon.seq
                && published.epoch == cur.epoch
            {
                cur.horizon = published.horizon;
            }
            let r = match self.stage(&p.stream, p.op, current, &mut batch, hlc, now) {
                Ok((state, is_new, n)) => {
                    group.records += n;
                    let c = state.head;
                    if is_new || resets {
                        group.created.push(p.stream.clone());
                    }
                    heads.insert(p.stream.clone(), state.clone());
                    group.staged.insert(p.stream, state);
                    Ok(c)
                }
                Err(e) => Err(e),
            };
            group.results.push((p.done, r));
        }
        if !batch.is_empty() {
            group.batch = Some(batch);
        }
        group
    }

    /// Validates one pending op against the stream's staged state and adds
    /// its writes to the batch. Returns (new state, created?, records).
    fn stage(
        &self,
        stream: &str,
        op: Op,
        current: Option<StreamState>,
        batch: &mut Batch,
        hlc: &mut Hlc,
        now: u64,
    ) -> Result<(StreamState, bool, u64)> {
        match op {
            Op::Create { role, epoch } => match current {
                Some(s) if s.role == role => Ok((s, false, 0)),
                Some(s) => Err(Error::RoleConflict {
                    stream: stream.to_owned(),
                    existing: s.role.name(),
                }),
                None => {
                    let s = StreamState {
                        role,
                        epoch,
                        head: Cursor {
                            epoch,
                            seq: 0,
                            hash: Hash::ZERO,
                        },
                        horizon: Cursor {
                            epoch,
                            seq: 0,
                            hash: Hash::ZERO,
                        },
                    };
                    batch.insert(Space::Streams, stream.as_bytes(), &encode_meta(&s));
                    Ok((s, true, 0))
                }
            },
            Op::Append(entries) => {
                let mut s = current.ok_or_else(|| Error::UnknownStream(stream.to_owned()))?;
                if s.role != Role::Writer {
                    return Err(Error::WrongRole {
                        stream: stream.to_owned(),
                        role: s.role.name(),
                        op: "append",
                    });
                }
                let n = entries.len() as u64;
                for e in entries {
                    let seq = s.head.seq + 1;
                    let ts = hlc.tick(now);
                    let hash = Record::chain_hash(
                        &s.head.hash,
                        seq,
                        s.epoch,
                        ts,
                        &e.origin,
                        &e.key,
                        e.kind,
                        &e.payload,
                    );
                    let r = Record {
                        seq,
                        epoch: s.epoch,
                        hlc: ts,
                        origin: e.origin.into(),
                        key: e.key.into(),
                        kind: e.kind,
                        payload: e.payload,
                        hash,
                    };
                    batch.insert_record(stream, &r);
                    s.head = r.cursor();
                }
                Ok((s, false, n))
            }
            Op::Replicate(records, chained) => {
                let mut s = current.ok_or_else(|| Error::UnknownStream(stream.to_owned()))?;
                if s.role != Role::Replica {
                    return Err(Error::WrongRole {
                        stream: stream.to_owned(),
                        role: s.role.name(),
                        op: "append_replicated",
                    });
                }
                let mismatch = |seq, reason: &str| Error::ChainMismatch {
                    stream: stream.to_owned(),
                    seq,
                    reason: reason.to_owned(),
                };
                // Validate everything before writing anything: an op is
                // all or nothing.
                let mut fresh = Vec::new();
                let mut head = s.head;
                let mut epoch = s.epoch;
                // For a checked chain: the hash each record chains to.
                let mut link = chained;
                for r in records {
                    let chains_to = link;
                    if link.is_some() {
                        link = Some(r.hash);
                    }
                    if r.seq <= head.seq {
                        // Redelivery of what we hold is fine; anything else
                        // at an old seq is another history.
                        if r.seq == head.seq && r.hash == head.hash {
                            continue;
                        }
                        if r.seq <= s.horizon.seq {
                            continue;
                        }
                        if fresh.is_empty() && r.seq < head.seq {
                            // Older than the durable head: compare on disk.
                            let snap = self.settled()?;
                            if matches!(self.record_in(&snap, stream, r.seq), Ok(held) if held.hash == r.hash)
                            {
                                continue;
                            }
                        }
                        return Err(mismatch(r.seq, "a different record is held at this seq"));
                    }
                    if r.seq != head.seq + 1 {
                        return Err(mismatch(r.seq, &format!("gap after seq {}", head.seq)));
                    }
                    if r.epoch < epoch {
                        return Err(mismatch(r.seq, "record from an older epoch"));
                    }
                    let joins = match chains_to {
                        Some(h) => h == head.hash,
                        None => r.expected_hash(&head.hash) == r.hash,
                    };
                    if !joins {
                        return Err(mismatch(r.seq, "hash does not chain"));
                    }
                    epoch = r.epoch;
                    head = r.cursor();
                    fresh.push(r);
                }
                let n = fresh.len() as u64;
                for r in &fresh {
                    hlc.observe_bounded(r.hlc, now, self.opts.max_clock_skew_ms);
                    batch.insert_record(stream, r);
                }
                if epoch != s.epoch {
                    s.epoch = epoch;
                    batch.insert(Space::Streams, stream.as_bytes(), &encode_meta(&s));
                }
                s.head = head;
                Ok((s, false, n))
            }
            Op::Reset(snapshot) => {
                let mut s = current.ok_or_else(|| Error::UnknownStream(stream.to_owned()))?;
                if s.role != Role::Replica {
                    return Err(Error::WrongRole {
                        stream: stream.to_owned(),
                        role: s.role.name(),
                        op: "install_snapshot",
                    });
                }
                let prefix = stream_prefix(stream);
                let snap = self.settled()?;
                for g in snap.prefix(&self.records, &prefix) {
                    batch.remove(Space::Records, &g.key()?);
                }
                for g in snap.prefix(&self.snaps, &prefix) {
                    batch.remove(Space::Snapshots, &g.key()?);
                }
                for o in &snapshot.objects {
                    batch.insert(
                        Space::Snapshots,
                        &snap_key(stream, &o.key),
                        &encode_snap(o.seq, &o.state),
                    );
                }
                s.epoch = snapshot.base.epoch;
                s.head = snapshot.base;
                s.horizon = snapshot.base;
                batch.insert(Space::Streams, stream.as_bytes(), &encode_meta(&s));
                Ok((s, false, 0))
            }
            Op::Epoch(epoch) => {
                let mut s = current.ok_or_else(|| Error::UnknownStream(stream.to_owned()))?;
                if s.role != Role::Writer {
                    return Err(Error::WrongRole {
                        stream: stream.to_owned(),
                        role: s.role.name(),
                        op: "begin_epoch",
                    });
                }
                if epoch <= s.epoch {
                    return Ok((s, false, 0));
                }
                if s.horizon.seq != s.head.seq {
                    return Err(Error::NotCompacted {
                        stream: stream.to_owned(),
                        horizon: s.horizon.seq,
                        head: s.head.seq,
                    });
                }
                s.epoch = epoch;
                s.head.epoch = epoch;
                s.horizon.epoch = epoch;
                batch.insert(Space::Streams, stream.as_bytes(), &encode_meta(&s));
                Ok((s, false, 0))
            }
        }
    }
}
