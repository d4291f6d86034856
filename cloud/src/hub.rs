//! CloudHub: the QUIC server every edge node connects to.
//!
//! One connection per node, mutually authenticated: the node is the CN of
//! its client certificate (a `keel:nodes` certificate from the cluster CA,
//! not revoked), and its link is bound to that node's two streams only.
//! One live connection per node: a newer connection of the same node
//! closes the older one (code `REPLACED`), so a stolen or buggy node cannot
//! pile up connections.
//!
//! During a reconnect storm the hub paces catch-up: at most
//! `max_catchups` links send bulk data at once, and waiting links are
//! admitted least-behind first. Control frames (acks, pings) and receiving
//! are never paced, so a waiting node still uploads and stays alive.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use keel_log::{Role, Store};
use keel_sync::link::{LinkConfig, Side, down_stream, up_stream};
use keel_sync::quic::{Admit, Pacer, Sink, run_link};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::pki::node_name_from_cert;

/// Settings of the hub.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// Links sending catch-up data at once.
    pub max_catchups: usize,
    /// QUIC idle timeout; edges keep the connection alive below it.
    pub idle_timeout: Duration,
    /// Link ping interval and idle timeout (application level).
    pub ping_interval: Duration,
    pub link_idle_timeout: Duration,
    /// Secret for QUIC stateless-reset tokens; keep it across restarts
    /// (see `keel_sync::quic::server_endpoint`). Random if `None`.
    pub reset_secret: Option<[u8; 32]>,
    /// Handshakes in flight at once, at most. A connection attempt beyond
    /// the hub's limit waits for a slot a bounded time, then is refused
    /// (QUIC `CONNECTION_REFUSED`) and the edge comes back after its
    /// jittered back-off, instead of waiting out QUIC's retransmission
    /// timers behind a saturated process. The limit itself follows the
    /// measured handshake throughput (see `HandshakeGate`); this is its
    /// ceiling.
    pub max_handshakes: usize,
    /// Checked against every connection's client certificate after its
    /// handshake: a resumed TLS session (`pki::hub_tls_config`) never
    /// reaches the verifier, so revocation and expiry are enforced here.
    pub revocations: Option<Arc<crate::pki::Revocations>>,
    /// Which replica owns a node, when several cloudcores share the
    /// cluster's nodes (`attach::shards`); `None`: this one owns them all.
    pub router: Option<Arc<dyn Router>>,
}

/// Where a node's connection belongs, when cloudcore replicas share the
/// nodes of one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// This replica owns the node; its `down` stream is in `epoch` (a new
    /// owner's epoch is above every earlier owner's).
    Here { epoch: u64 },
    /// Another replica owns it; edges reach it at `addr` (host:port).
    Elsewhere { replica: String, addr: String },
    /// Nobody does at the moment (a hand-over under way).
    Nobody,
}

/// The seam between the hub and whatever shards nodes over replicas.
pub trait Router: Send + Sync + std::fmt::Debug {
    fn route(&self, node: &str) -> Route;

    /// Called before the link of a node this replica owns starts, once
    /// its `down` stream exists: whatever that stream must hold before the
    /// node reads it. `takeover`: the node comes from another replica (its
    /// stream is about to start a new epoch, whose snapshot the node will
    /// install in place of what it holds).
    fn prepare<'a>(
        &'a self,
        node: &'a str,
        takeover: bool,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        let _ = (node, takeover);
        Box::pin(async {})
    }
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            max_catchups: 256,
            idle_timeout: Duration::from_secs(90),
            // Liveness is QUIC's job (keep-alive from the edge, idle
            // timeout on both ends); the link's own ping is a rare
            // end-to-end check, so an idle node costs a few bytes/s.
            ping_interval: Duration::from_secs(600),
            link_idle_timeout: Duration::from_secs(1800),
            reset_secret: None,
            max_handshakes: 1024,
            revocations: None,
            router: None,
        }
    }
}

/// How long a handshake may take before its slot is given back (an edge
/// gives up after 10 s too).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Counters of the hub.
#[derive(Debug, Default)]
pub struct HubStats {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub closed: AtomicU64,
    /// Links the hub closed because the node broke a rule: of its identity
    /// (`FORBIDDEN`), a bound (`LIMIT`), the wire format (`MALFORMED`) or
    /// the streams it may use (`UNAUTHORIZED`).
    pub forbidden: AtomicU64,
    pub limit: AtomicU64,
    pub malformed: AtomicU64,
    pub unauthorized: AtomicU64,
    /// Connection attempts refused because `max_handshakes` were in flight.
    pub turned_away: AtomicU64,
}

/// Least-behind-first admission of catch-up senders.
#[derive(Debug)]
struct Admission {
    max: usize,
    inner: Mutex<AdmissionInner>,
}

#[derive(Debug, Default)]
struct AdmissionInner {
    active: usize,
    next: u64,
    waiting: BTreeMap<(u64, u64), oneshot::Sender<()>>,
}

struct Permit(Arc<Admission>);

impl Drop for Permit {
    fn drop(&mut self) {
        let mut inner = self.0.inner.lock().unwrap_or_else(PoisonError::into_inner);
        // Hand the slot to the least-behind waiter still waiting.
        while let Some((_, tx)) = inner.waiting.pop_first() {
            if tx.send(()).is_ok() {
                return;
            }
        }
        inner.active = inner.active.saturating_sub(1);
    }
}

struct Pace(Arc<Admission>);

impl Pacer for Pace {
    fn admit(&self, lag: u64) -> Admit<'_> {
        let adm = self.0.clone();
        Box::pin(async move {
            let rx = {
                let mut inner = adm.inner.lock().unwrap_or_else(PoisonError::into_inner);
                if inner.active < adm.max {
                    inner.active += 1;
                    None
                } else {
                    let (tx, rx) = oneshot::channel();
                    let n = inner.next;
                    inner.next += 1;
                    inner.waiting.insert((lag, n), tx);
                    Some(rx)
                }
            };
            if let Some(rx) = rx {
                // A dropped sender means the hub is gone; go ahead.
                let _ = rx.await;
            }
            Box::new(Permit(adm)) as Box<dyn Send>
        })
    }
}

struct HubState {
    store: Store,
    sink: Arc<dyn Sink>,
    opts: HubOptions,
    pace: Arc<Pace>,
    /// Node → its current connection (and that connection's arrival
    /// number: the newest arrival wins, whatever order the set-up of
    /// several of them finishes in).
    current: Mutex<BTreeMap<String, (u64, quinn::Connection)>>,
    /// Node → seq of its down stream it last acknowledged.
    acked: Mutex<BTreeMap<String, u64>>,
    /// Node → when the hub last heard from it (connect, records, acks,
    /// disconnect); in memory only, as liveness is not logged.
    seen: Mutex<BTreeMap<String, SystemTime>>,
    stats: HubStats,
}

impl HubState {
    fn saw(&self, node: &str) {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.to_owned(), SystemTime::now());
    }
}

/// Passes link events on to the hub's sink, noting acks per node.
struct Tracking(Arc<HubState>);

impl Sink for Tracking {
    fn persisted(&self, node: &str, stream: &str, records: &[keel_log::Record]) {
        self.0.saw(node);
        self.0.sink.persisted(node, stream, records);
    }
    fn snapshot_installed(&self, node: &str, stream: &str) {
        self.0.saw(node);
        self.0.sink.snapshot_installed(node, stream);
    }
    fn connected(&self, node: &str) {
        self.0.saw(node);
        self.0.sink.connected(node);
    }
    fn disconnected(&self, node: &str) {
        self.0.saw(node);
        self.0.sink.disconnected(node);
    }
    fn acked(&self, node: &str, stream: &str, cursor: keel_log::Cursor) {
        self.0.saw(node);
        self.0
            .acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(node.to_owned(), cursor.seq);
        self.0.sink.acked(node, stream, cursor);
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        self.0.sink.room()
    }
    fn admit(
        &self,
        node: &str,
        stream: &str,
        records: &[keel_log::Record],
    ) -> Result<(), keel_sync::link::Refusal> {
        self.0.sink.admit(node, stream, records)
    }
}

/// A cheap handle on a hub's live state (for metrics).
#[derive(Clone)]
pub struct HubHandle(Arc<HubState>);

impl std::fmt::Debug for HubHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubHandle").finish_non_exhaustive()
    }
}

impl HubHandle {
    /// Nodes with a live connection.
    pub fn connected(&self) -> BTreeSet<String> {
        self.0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect()
    }

    pub fn stats(&self) -> &HubStats {
        &self.0.stats
    }

    /// Node `node`'s live connection (for sessions: kubectl logs).
    pub fn connection(&self, node: &str) -> Option<quinn::Connection> {
        self.0
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .map(|(_, c)| c.clone())
    }

    /// Closes node `node`'s live connection, if it has one, telling it
    /// `reason` (code `UNAUTHORIZED`): for a revoked node. Returns whether
    /// there was one.
    pub fn disconnect(&self, node: &str, reason: &str) -> bool {
        match self.connection(node) {
            Some(c) => {
                info!(%node, %reason, "closing the node's connection");
                c.close(
                    quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Unauthorized as u32),
                    reason.as_bytes(),
                );
                true
            }
            None => false,
        }
    }

    /// Closes node `node`'s live connection, if it has one, telling it to
    /// go to the replica at `addr` (code `MOVED`), or to come back later
    /// when `addr` is empty (code `UNAVAILABLE`): its shard changed hands.
    pub fn move_node(&self, node: &str, addr: &str) -> bool {
        let Some(c) = self.connection(node) else {
            return false;
        };
        use keel_sync::frame::ErrorCode as C;
        let code = if addr.is_empty() {
            C::Unavailable
        } else {
            C::Moved
        };
        info!(%node, to = %addr, "the node's shard moved; closing its connection");
        c.close(quinn::VarInt::from_u32(code as u32), addr.as_bytes());
        true
    }

    /// Node → the seq of its down stream it last acknowledged.
    pub fn acked(&self) -> BTreeMap<String, u64> {
        self.0
            .acked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Node → when the hub last heard from it since cloudcore started; a
    /// connected node counts as seen now (QUIC keep-alives hold it open).
    pub fn last_seen(&self) -> BTreeMap<String, SystemTime> {
        let mut seen = self
            .0
            .seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now = SystemTime::now();
        for node in self.connected() {
            seen.insert(node, now);
        }
        seen
    }
}

/// The running hub.
pub struct CloudHub {
    endpoint: quinn::Endpoint,
    state: Arc<HubState>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for CloudHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudHub")
            .field("addr", &self.endpoint.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// QUIC transport settings shared by hub and edges.
pub fn transport(idle_timeout: Duration, keep_alive: Option<Duration>) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle_timeout).ok());
    t.keep_alive_interval(keep_alive);
    // Two streams each way per connection; nothing else is accepted.
    t.max_concurrent_uni_streams(2u32.into());
    t.max_concurrent_bidi_streams(0u32.into());
    t
}

impl CloudHub {
    /// Binds the hub on `addr` (must run inside a tokio runtime).
    pub fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        store: Store,
        sink: Arc<dyn Sink>,
        opts: HubOptions,
    ) -> crate::Result<CloudHub> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| {
            crate::Error::InvalidCertificate(format!("server TLS config unusable for QUIC: {e}"))
        })?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(Arc::new(transport(opts.idle_timeout, None)));
        let endpoint = keel_sync::quic::server_endpoint(
            server,
            addr,
            opts.reset_secret.as_ref().map(<[u8; 32]>::as_slice),
        )
        .map_err(crate::Error::Net)?;
        let state = Arc::new(HubState {
            store,
            sink,
            pace: Arc::new(Pace(Arc::new(Admission {
                max: opts.max_catchups.max(1),
                inner: Mutex::new(AdmissionInner::default()),
            }))),
            opts,
            current: Mutex::new(BTreeMap::new()),
            acked: Mutex::new(BTreeMap::new()),
            seen: Mutex::new(BTreeMap::new()),
            stats: HubStats::default(),
        });
        let ep = endpoint.clone();
        let st = state.clone();
        let accept = tokio::spawn(async move {
            let mut arrival = 0u64;
            let gate = Arc::new(HandshakeGate::new(st.opts.max_handshakes));
            // Attempts beyond the limit wait here, oldest first, at most
            // WAITING_PER_SLOT per slot and for at most HANDSHAKE_WAIT;
            // beyond, they are turned away.
            let mut waiting: std::collections::VecDeque<(tokio::time::Instant, quinn::Incoming)> =
                std::collections::VecDeque::new();
            let mut start = |incoming: quinn::Incoming, slot: HandshakeSlot| {
                arrival += 1;
                let (st, id) = (st.clone(), arrival);
                tokio::spawn(async move { st.serve(incoming, slot, id).await });
            };
            let turn_away = |incoming: quinn::Incoming| {
                st.stats.turned_away.fetch_add(1, Ordering::Relaxed);
                incoming.refuse();
            };
            loop {
                while !waiting.is_empty()
                    && let Some(slot) = gate.enter()
                {
                    if let Some((_, incoming)) = waiting.pop_front() {
                        start(incoming, slot);
                    }
                }
                while waiting
                    .front()
                    .is_some_and(|(t, _)| t.elapsed() >= HANDSHAKE_WAIT)
                {
                    if let Some((_, incoming)) = waiting.pop_front() {
                        turn_away(incoming);
                    }
                }
                let expiry = waiting.front().map(|(t, _)| *t + HANDSHAKE_WAIT);
                tokio::select! {
                    incoming = ep.accept() => {
                        let Some(incoming) = incoming else { break };
                        // Nobody jumps the queue.
                        if waiting.is_empty()
                            && let Some(slot) = gate.enter()
                        {
                            start(incoming, slot);
                        } else {
                            gate.pressed();
                            if waiting.len() < gate.limit().saturating_mul(WAITING_PER_SLOT) {
                                waiting.push_back((tokio::time::Instant::now(), incoming));
                            } else {
                                turn_away(incoming);
                            }
                        }
                    }
                    () = gate.freed.notified(), if !waiting.is_empty() => {}
                    () = async {
                        match expiry {
                            Some(t) => tokio::time::sleep_until(t).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
            for (_, incoming) in waiting {
                turn_away(incoming);
            }
        });
        info!(addr = %endpoint.local_addr().map_err(crate::Error::Net)?, "cloudhub listening");
        Ok(CloudHub {
            endpoint,
            state,
            accept,
        })
    }

    pub fn local_addr(&self) -> crate::Result<SocketAddr> {
        self.endpoint.local_addr().map_err(crate::Error::Net)
    }

    /// Nodes with a live connection.
    pub fn connected(&self) -> BTreeSet<String> {
        self.stats_handle().connected()
    }

    pub fn stats(&self) -> &HubStats {
        &self.state.stats
    }

    /// A handle on the hub's live state that outlives borrows of the hub.
    pub fn stats_handle(&self) -> HubHandle {
        HubHandle(self.state.clone())
    }

    /// Closes every connection and stops accepting. The close goes out at
    /// once; draining the connections is awaited for at most
    /// [`SHUTDOWN_DRAIN`] (with hundreds of connections it took seconds,
    /// and every node that tried to come back meanwhile was refused and
    /// backed off further).
    pub async fn shutdown(self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"cloudcore shutting down");
        self.accept.abort();
        let _ = tokio::time::timeout(SHUTDOWN_DRAIN, self.endpoint.wait_idle()).await;
    }
}

/// How long [`CloudHub::shutdown`] waits for closed connections to drain.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(1);

/// How long a handshake should wait for the hub's CPU at most: the limit
/// on handshakes in flight is the measured throughput times this. Well
/// under a client's first retransmission timeout (about 1 s with QUIC's
/// initial RTT of 333 ms), so an admitted node never retransmits.
const HANDSHAKE_LATENCY_TARGET: Duration = Duration::from_millis(400);
/// The limit never goes below this (a cold hub has measured nothing, and
/// clients that stall their handshakes hold a slot for up to
/// `HANDSHAKE_TIMEOUT`).
const HANDSHAKE_FLOOR: usize = 64;
/// How long an attempt beyond the limit may wait for a slot before it is
/// turned away: well within the 10 s an edge gives a handshake. While it
/// waits, the client's retransmitted Initials are buffered by quinn.
const HANDSHAKE_WAIT: Duration = Duration::from_secs(7);
/// Attempts that may wait, per slot of the limit: what the measured
/// throughput serves within `HANDSHAKE_WAIT` (the limit is the throughput
/// times `HANDSHAKE_LATENCY_TARGET`), 17. Measured with `reconnect_storm` at 10,000 nodes: a 4 s
/// wait (and 10 per slot) turned away 62,900 attempts of the cold storm
/// and the last node came at 47.7 s; 7 s (17 per slot) turned away 39,300
/// and the last came at 43.7 s, 90 % at 20 s instead of 26 s.
const WAITING_PER_SLOT: usize =
    (HANDSHAKE_WAIT.as_millis() / HANDSHAKE_LATENCY_TARGET.as_millis()) as usize;
/// How often the limit follows the measured throughput.
const HANDSHAKE_WINDOW: Duration = Duration::from_millis(250);

/// Handshakes in flight, bounded by a limit that follows the hub's
/// measured handshake throughput: `throughput × HANDSHAKE_LATENCY_TARGET`,
/// between [`HANDSHAKE_FLOOR`] and `max_handshakes`. It only comes down
/// while attempts are being turned away (a quiet hub measures its
/// arrivals, not its capacity).
#[derive(Debug)]
struct HandshakeGate {
    in_flight: std::sync::atomic::AtomicUsize,
    limit: std::sync::atomic::AtomicUsize,
    ceiling: usize,
    /// Signalled whenever a slot is given back.
    freed: tokio::sync::Notify,
    window: Mutex<GateWindow>,
}

#[derive(Debug)]
struct GateWindow {
    start: std::time::Instant,
    finished: u64,
    turned_away: u64,
}

impl HandshakeGate {
    fn new(ceiling: usize) -> HandshakeGate {
        let ceiling = ceiling.max(1);
        HandshakeGate {
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            // A cold hub starts low and rises with what it measures: all
            // of a storm admitted at once overflows the socket's buffer
            // and the dropped Initials wait out the clients' timers.
            limit: std::sync::atomic::AtomicUsize::new(HANDSHAKE_FLOOR.min(ceiling)),
            ceiling,
            freed: tokio::sync::Notify::new(),
            window: Mutex::new(GateWindow {
                start: std::time::Instant::now(),
                finished: 0,
                turned_away: 0,
            }),
        }
    }

    /// A slot for one more handshake, or `None` (the caller holds the
    /// attempt back or turns it away).
    fn enter(self: &Arc<Self>) -> Option<HandshakeSlot> {
        if !self.has_room() {
            return None;
        }
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(HandshakeSlot(self.clone()))
    }

    fn has_room(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) < self.limit()
    }

    /// An attempt found no room: the limit may come down.
    fn pressed(&self) {
        self.count(|w| w.turned_away += 1);
    }

    /// The current limit.
    fn limit(&self) -> usize {
        self.limit.load(Ordering::Acquire)
    }

    fn count(&self, f: impl FnOnce(&mut GateWindow)) {
        let mut w = self.window.lock().unwrap_or_else(PoisonError::into_inner);
        f(&mut w);
        let elapsed = w.start.elapsed();
        if elapsed < HANDSHAKE_WINDOW {
            return;
        }
        let rate = w.finished as f64 / elapsed.as_secs_f64();
        let want = (rate * HANDSHAKE_LATENCY_TARGET.as_secs_f64()) as usize;
        let want = want.clamp(HANDSHAKE_FLOOR.min(self.ceiling), self.ceiling);
        let now = self.limit.load(Ordering::Acquire);
        // Up whenever the hub did more; down only under pressure.
        if want > now || w.turned_away > 0 {
            self.limit.store(want, Ordering::Release);
        }
        *w = GateWindow {
            start: std::time::Instant::now(),
            finished: 0,
            turned_away: 0,
        };
    }
}

/// One of the gate's slots, given back when dropped.
struct HandshakeSlot(Arc<HandshakeGate>);

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.count(|w| w.finished += 1);
        self.0.freed.notify_one();
    }
}

impl HubState {
    async fn serve(self: Arc<Self>, incoming: quinn::Incoming, slot: HandshakeSlot, id: u64) {
        let remote = incoming.remote_address();
        // A client that stops half-way holds its slot no longer than an
        // edge waits for a handshake.
        let handshake = match incoming.accept() {
            Ok(connecting) => tokio::time::timeout(HANDSHAKE_TIMEOUT, connecting)
                .await
                .unwrap_or(Err(quinn::ConnectionError::TimedOut)),
            Err(e) => Err(e),
        };
        drop(slot);
        let conn = match handshake {
            Ok(c) => c,
            Err(e) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!(%remote, error = %e, "refused a connection at the handshake");
                return;
            }
        };
        let node = match peer_node(&conn, self.opts.revocations.as_deref()) {
            Ok(n) => n,
            Err(why) => {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!(%remote, %why, "refused a connection without a node identity");
                conn.close(
                    quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Unauthorized as u32),
                    why.as_bytes(),
                );
                return;
            }
        };
        let routed = self.opts.router.as_ref().map(|r| r.route(&node));
        let epoch = match routed {
            None => 1,
            Some(Route::Here { epoch }) => epoch,
            Some(Route::Elsewhere { replica, addr }) => {
                debug!(%node, %replica, %addr, "the node belongs to another replica");
                conn.close(
                    quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Moved as u32),
                    addr.as_bytes(),
                );
                return;
            }
            Some(Route::Nobody) => {
                debug!(%node, "no replica owns the node at the moment");
                conn.close(
                    quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Unavailable as u32),
                    b"",
                );
                return;
            }
        };
        let (down, up) = (down_stream(&node), up_stream(&node));
        // Creating a stream waits for a group commit: off the async workers.
        let store = self.store.clone();
        let takeover = match &self.opts.router {
            None => Ok(false),
            Some(router) => {
                // A node that comes from another replica (or anew): the
                // stream gets what the node must hold, then its new epoch.
                let (store, down2) = (store.clone(), down.clone());
                let made = tokio::task::spawn_blocking(move || {
                    store.create_stream(&down2, Role::Writer, 1)
                })
                .await
                .unwrap_or_else(joined);
                match made {
                    Ok(info) => {
                        let takeover = info.epoch < epoch;
                        router.prepare(&node, takeover).await;
                        Ok(takeover)
                    }
                    Err(e) => Err(e),
                }
            }
        };
        let created = match takeover {
            Ok(_) => tokio::task::spawn_blocking(move || {
                store
                    .create_stream(&down, Role::Writer, epoch)
                    .and_then(|_| take_over(&store, &down, epoch))
                    .and_then(|_| store.create_stream(&up, Role::Replica, 1))
            })
            .await
            .unwrap_or_else(joined),
            Err(e) => Err(e),
        };
        let up_head = match created {
            Ok(info) => info.head,
            Err(e) => {
                warn!(%node, error = %e, "cannot prepare the node's streams");
                conn.close(
                    quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Internal as u32),
                    b"cloud log unavailable",
                );
                return;
            }
        };
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        // The newer arrival of the same node wins: an older one whose set-up
        // finished later is refused as replaced, not let in over the newer.
        let older = {
            let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
            match current.get(&node) {
                Some((newer, _)) if *newer > id => Err(()),
                _ => Ok(current.insert(node.clone(), (id, conn.clone()))),
            }
        };
        let older = match older {
            Ok(older) => older,
            Err(()) => {
                debug!(%node, "a newer connection of the node arrived first");
                conn.close(
                    quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Replaced as u32),
                    b"replaced by a newer connection of the same node",
                );
                return;
            }
        };
        if let Some((_, old)) = older {
            debug!(%node, "a newer connection replaces the node's older one");
            old.close(
                quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Replaced as u32),
                b"replaced by a newer connection of the same node",
            );
        }
        let mut cfg = LinkConfig::new(node.clone(), Side::Cloud, up_head);
        cfg.ping_interval_ms =
            u64::try_from(self.opts.ping_interval.as_millis()).unwrap_or(u64::MAX);
        cfg.idle_timeout_ms =
            u64::try_from(self.opts.link_idle_timeout.as_millis()).unwrap_or(u64::MAX);
        // A node's `up` snapshot holds only what it writes (its Node, the
        // status of its pods and devices): far less than a `down` one.
        cfg.max_snapshot_bytes = 64 << 20;
        debug!(%node, %remote, "node connected");
        let pace: Arc<dyn Pacer> = self.pace.clone();
        let sink: Arc<dyn Sink> = Arc::new(Tracking(self.clone()));
        let closed = run_link(conn, self.store.clone(), cfg, sink, Some(pace)).await;
        self.stats.closed.fetch_add(1, Ordering::Relaxed);
        if !closed.by_peer {
            use keel_sync::frame::ErrorCode as C;
            let counter = match closed.code {
                C::Forbidden => Some(&self.stats.forbidden),
                C::Limit => Some(&self.stats.limit),
                C::Malformed => Some(&self.stats.malformed),
                C::Unauthorized => Some(&self.stats.unauthorized),
                _ => None,
            };
            if let Some(c) = counter {
                c.fetch_add(1, Ordering::Relaxed);
                warn!(%node, code = ?closed.code, reason = %closed.message, "closed the link of a node that broke a rule");
            }
        }
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.get(&node).is_some_and(|(i, _)| *i == id) {
            current.remove(&node);
            drop(current);
            self.sink.disconnected(&node);
        }
        debug!(%node, code = ?closed.code, reason = %closed.message, "node disconnected");
    }
}

/// A blocking log task that did not finish, as a log error.
fn joined<T>(e: tokio::task::JoinError) -> keel_log::Result<T> {
    Err(keel_log::Error::Io(std::io::Error::other(e.to_string())))
}

/// Brings a node's `down` stream to `epoch` if it is in an older one:
/// this replica takes the node over from another, whose chain the node
/// holds. Every record is folded into the snapshot, which the node then
/// installs (its cursor names the older epoch) before the tail.
fn take_over(store: &keel_log::Store, down: &str, epoch: u64) -> keel_log::Result<()> {
    let mut tries = 0;
    loop {
        let info = store.info(down)?;
        if info.epoch >= epoch {
            return Ok(());
        }
        if info.horizon.seq < info.head.seq {
            store.compact(down, info.head.seq, &keel_sync::objects::CrdtFold)?;
        }
        match store.begin_epoch(down, epoch) {
            Ok(c) => {
                info!(stream = %down, epoch = c.epoch, seq = c.seq, "new epoch of a node's down stream: taken over");
                return Ok(());
            }
            // Appended to between the compaction and the new epoch.
            Err(keel_log::Error::NotCompacted { .. }) if tries < 8 => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

/// The node a connection belongs to: the CN of its verified client
/// certificate.
/// The node a connection's client certificate names; refused if
/// `revocations` refuse the certificate (revoked, expired).
fn peer_node(
    conn: &quinn::Connection,
    revocations: Option<&crate::pki::Revocations>,
) -> Result<String, String> {
    let identity = conn.peer_identity().ok_or("no client certificate")?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type".to_owned())?;
    let first = certs.first().ok_or("empty client certificate chain")?;
    if revocations.is_some_and(|r| r.refuses_der(first)) {
        return Err("certificate revoked or expired".into());
    }
    node_name_from_cert(first).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate's limit comes down to what the hub finishes while it turns
    /// attempts away, and goes back up when it finishes more.
    #[test]
    fn the_handshake_limit_follows_measured_throughput() {
        let gate = Arc::new(HandshakeGate::new(1000));
        // A cold gate starts at the floor.
        let slots: Vec<HandshakeSlot> = (0..1000).map_while(|_| gate.enter()).collect();
        assert_eq!(slots.len(), HANDSHAKE_FLOOR);
        gate.pressed();
        drop(slots);
        // Thousands per second: the limit rises.
        for _ in 0..2000 {
            drop(gate.enter());
        }
        std::thread::sleep(HANDSHAKE_WINDOW + Duration::from_millis(10));
        drop(gate.enter());
        let risen = gate.limit();
        assert!(risen > HANDSHAKE_FLOOR, "limit {risen}");
        // A quarter second in which one handshake finishes while attempts
        // find no room: down to the floor.
        let mut slots: Vec<HandshakeSlot> = (0..risen).map_while(|_| gate.enter()).collect();
        assert_eq!(slots.len(), risen);
        assert!(gate.enter().is_none(), "the limit holds");
        gate.pressed();
        std::thread::sleep(HANDSHAKE_WINDOW + Duration::from_millis(10));
        slots.truncate(risen - 1);
        assert_eq!(gate.limit(), HANDSHAKE_FLOOR, "down to the floor");
        assert!(gate.enter().is_none(), "beyond the limit");
        slots.clear();
        assert!(gate.enter().is_some(), "room again");
    }
}
