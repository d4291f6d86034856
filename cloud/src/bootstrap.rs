//! The HTTPS bootstrap endpoint: CA download, token join, certificate renewal.
//!
//! | request | auth | answer |
//! |---|---|---|
//! | `GET /v1/ca` | none | the CA certificate PEM (the client pins it by the hash in its token) |
//! | `POST /v1/join` `{"token","node","csr"}` | join token | `{"certificate","ca"}` |
//! | `POST /v1/renew` `{"csr"}` | mTLS with a current node certificate | `{"certificate","ca"}` |
//!
//! Errors are JSON `{"error": <code>, "reason": <text>}`: 400 for a malformed
//! body, token or CSR or a node name keel does not accept (not a DNS-1123
//! subdomain, or reserved, such as `cloudcore`: `invalid_node_name`), 401
//! for a token that is unknown, bound to another node, expired or used (and
//! for renewal without a valid client certificate, or with a revoked one),
//! 403 when the CSR's common name is not the node, 404/405 for other routes,
//! 408 for a body that does not arrive in time, 413 for bodies over the
//! limit, 429 (`rate_limited`, with a `Retry-After` header and
//! `retryAfterSeconds`) for joins over the per-address rate or a renewal
//! sooner than [`BootstrapOptions::renew_min_interval`] after the node's
//! last one.
//!
//! A renewal revokes the certificate it replaces (persisted before the
//! answer); the node's live QUIC connection made with it stays up, and its
//! next connection must use the new certificate.
//!
//! TLS 1.3 only, with the server certificate from the cluster CA. Client
//! certificates are optional at the TLS layer (join has none) but, when
//! presented, are verified like the hub's: chained to the CA, in validity,
//! clientAuth, not revoked (nor of a revoked node); renewal checks again per
//! request.
//!
//! Hostile clients: one request per connection (no keep-alive); every
//! connection gets a handshake timeout, a header read timeout, a body
//! timeout and an overall deadline ([`BootstrapOptions::idle_timeout`]);
//! bodies are read up to a size limit. At most
//! [`BootstrapOptions::max_connections_per_ip`] connections per source
//! address are open at once (more are closed at accept, before TLS), and at
//! most [`BootstrapOptions::max_connections`] in all: at that cap a new
//! connection evicts the oldest one still sending its request, so slow
//! clients cannot starve real joins. Joins are rate-limited per source
//! address (a token bucket), malformed tokens are refused before any file
//! is read, and the file work (token store, CA signing, the certificate
//! ledger and revocations) runs on the blocking pool, a few at a time.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use hyper::body::{Body as _, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, TokenError};
use crate::pki::{
    ALPN_HTTP1, ClientAuth, ClusterCa, Credentials, DEFAULT_NODE_CERT_VALIDITY, IssuedCert,
    build_server_config, node_name_from_cert, not_after_of_cert, serial_of_cert,
};
use crate::token::{TokenStore, parse_token};

/// File work (token store, signing, ledger, revocations) running at once.
const BLOCKING_WORK: usize = 4;
/// Per-address join buckets kept before idle (full) ones are pruned.
const MAX_BUCKETS: usize = 4096;

/// Tunables of the bootstrap endpoint.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BootstrapOptions {
    /// Validity of node certificates issued by join and renew.
    pub node_cert_validity: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Time allowed for the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for a request's headers to arrive.
    pub header_timeout: Duration,
    /// Time allowed for a request's body to arrive once its headers have.
    pub body_timeout: Duration,
    /// Longest a connection stays open, handshake and answer included.
    pub idle_timeout: Duration,
    /// Connections open at once; at the cap a new one evicts the oldest
    /// still sending its request.
    pub max_connections: usize,
    /// Connections open at once from one source address; more are closed
    /// at accept.
    pub max_connections_per_ip: usize,
    /// Joins one source address may send in a burst (0: no limit).
    pub join_burst: u32,
    /// After the burst, one more join per this interval per address.
    pub join_refill: Duration,
    /// Least time between two renewals of one node (persisted in the CA's
    /// ledger, so a restart does not reset it).
    pub renew_min_interval: Duration,
    /// How long [`BootstrapServer::shutdown`] waits for open connections.
    pub shutdown_grace: Duration,
}

impl Default for BootstrapOptions {
    fn default() -> Self {
        Self {
            node_cert_validity: DEFAULT_NODE_CERT_VALIDITY,
            max_body_bytes: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_connections_per_ip: 32,
            join_burst: 20,
            join_refill: Duration::from_secs(1),
            renew_min_interval: Duration::from_secs(10 * 60),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

impl BootstrapOptions {
    /// Sets [`BootstrapOptions::node_cert_validity`].
    #[must_use]
    pub fn with_node_cert_validity(mut self, validity: Duration) -> Self {
        self.node_cert_validity = validity;
        self
    }

    /// Sets [`BootstrapOptions::max_body_bytes`].
    #[must_use]
    pub fn with_max_body_bytes(mut self, max: usize) -> Self {
        self.max_body_bytes = max;
        self
    }

    /// Sets [`BootstrapOptions::body_timeout`] and
    /// [`BootstrapOptions::idle_timeout`].
    #[must_use]
    pub fn with_timeouts(mut self, body: Duration, idle: Duration) -> Self {
        self.body_timeout = body;
        self.idle_timeout = idle;
        self
    }

    /// Sets [`BootstrapOptions::max_connections`] and
    /// [`BootstrapOptions::max_connections_per_ip`].
    #[must_use]
    pub fn with_connection_limits(mut self, total: usize, per_ip: usize) -> Self {
        self.max_connections = total;
        self.max_connections_per_ip = per_ip;
        self
    }

    /// Sets [`BootstrapOptions::join_burst`] and
    /// [`BootstrapOptions::join_refill`].
    #[must_use]
    pub fn with_join_rate(mut self, burst: u32, refill: Duration) -> Self {
        self.join_burst = burst;
        self.join_refill = refill;
        self
    }

    /// Sets [`BootstrapOptions::renew_min_interval`].
    #[must_use]
    pub fn with_renew_min_interval(mut self, interval: Duration) -> Self {
        self.renew_min_interval = interval;
        self
    }
}

/// Counters of the bootstrap endpoint (a snapshot).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BootstrapStats {
    /// `GET /v1/ca` answered.
    pub ca_served: u64,
    /// `POST /v1/join` requests received (any outcome).
    pub join_requests: u64,
    /// Joins that issued a certificate.
    pub joins_ok: u64,
    /// `POST /v1/renew` requests received (any outcome).
    pub renew_requests: u64,
    /// Renewals that issued a certificate.
    pub renewals_ok: u64,
    /// Connections whose TLS handshake failed or timed out.
    pub tls_failures: u64,
    /// Requests answered 429 (joins over the rate, renewals too soon).
    pub rate_limited: u64,
    /// Connections closed at accept (per-address or total cap).
    pub connections_refused: u64,
    /// Connections closed to make room for a new one at the total cap.
    pub connections_evicted: u64,
    /// Connections closed for exceeding the body or overall deadline.
    pub timeouts: u64,
}

#[derive(Debug, Default)]
struct Counters {
    ca_served: AtomicU64,
    join_requests: AtomicU64,
    joins_ok: AtomicU64,
    renew_requests: AtomicU64,
    renewals_ok: AtomicU64,
    tls_failures: AtomicU64,
    rate_limited: AtomicU64,
    connections_refused: AtomicU64,
    connections_evicted: AtomicU64,
    timeouts: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct State {
    ca: Arc<ClusterCa>,
    tokens: Arc<TokenStore>,
    options: BootstrapOptions,
    counters: Counters,
    slots: Slots,
    joins: RateLimiter,
    /// Bounds the file work on the blocking pool.
    work: Semaphore,
    /// Renewals one at a time: the rate check, signing and revoking the
    /// old certificate are one step.
    renewing: Mutex<()>,
}

// ---------------------------------------------------------------------------
// connection slots and rate limits
// ---------------------------------------------------------------------------

/// The open connections, per source address and in all.
#[derive(Debug, Default)]
struct Slots {
    inner: Mutex<SlotsInner>,
}

#[derive(Debug, Default)]
struct SlotsInner {
    next: u64,
    /// By age: the first is the oldest.
    open: BTreeMap<u64, OpenConn>,
    per_ip: HashMap<IpAddr, usize>,
}

#[derive(Debug)]
struct OpenConn {
    ip: IpAddr,
    /// Set once the request is read and being handled: not evicted then.
    busy: Arc<AtomicBool>,
    evict: oneshot::Sender<()>,
}

/// A connection's place; dropping it frees the place.
struct Slot {
    state: Arc<State>,
    id: u64,
    busy: Arc<AtomicBool>,
    evicted: oneshot::Receiver<()>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.state.slots.lock().remove(self.id);
    }
}

impl SlotsInner {
    fn remove(&mut self, id: u64) -> Option<OpenConn> {
        let conn = self.open.remove(&id)?;
        if let Some(n) = self.per_ip.get_mut(&conn.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&conn.ip);
            }
        }
        Some(conn)
    }
}

impl Slots {
    fn lock(&self) -> std::sync::MutexGuard<'_, SlotsInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Why a connection was closed at accept.
#[derive(Debug, Clone, Copy)]
enum Refused {
    PerIp,
    Full,
}

fn acquire_slot(state: &Arc<State>, ip: IpAddr) -> Result<Slot, Refused> {
    let opts = &state.options;
    let mut slots = state.slots.lock();
    if slots.per_ip.get(&ip).copied().unwrap_or(0) >= opts.max_connections_per_ip {
        return Err(Refused::PerIp);
    }
    if slots.open.len() >= opts.max_connections {
        let victim = slots
            .open
            .iter()
            .find(|(_, c)| !c.busy.load(Ordering::Acquire))
            .map(|(id, _)| *id);
        let Some(victim) = victim.and_then(|id| slots.remove(id)) else {
            return Err(Refused::Full);
        };
        let _ = victim.evict.send(());
        bump(&state.counters.connections_evicted);
    }
    let id = slots.next;
    slots.next = slots.next.wrapping_add(1);
    let busy = Arc::new(AtomicBool::new(false));
    let (evict, evicted) = oneshot::channel();
    slots.open.insert(
        id,
        OpenConn {
            ip,
            busy: Arc::clone(&busy),
            evict,
        },
    );
    *slots.per_ip.entry(ip).or_insert(0) += 1;
    drop(slots);
    Ok(Slot {
        state: Arc::clone(state),
        id,
        busy,
        evicted,
    })
}

/// A token bucket per source address.
#[derive(Debug)]
struct RateLimiter {
    burst: f64,
    refill: Duration,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    fn new(burst: u32, refill: Duration) -> Self {
        Self {
            burst: f64::from(burst),
            refill,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        let gained = now.saturating_duration_since(b.at).as_secs_f64() / self.refill.as_secs_f64();
        (b.tokens + gained).min(self.burst)
    }

    /// Takes one token for `ip`, or says how long until there is one.
    fn take(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        if self.burst <= 0.0 || self.refill.is_zero() {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(&ip) {
            buckets.retain(|_, b| self.refilled(*b, now) < self.burst);
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let tokens = self.refilled(*bucket, now);
        if tokens >= 1.0 {
            *bucket = Bucket {
                tokens: tokens - 1.0,
                at: now,
            };
            Ok(())
        } else {
            *bucket = Bucket { tokens, at: now };
            Err(self.refill.mul_f64(1.0 - tokens))
        }
    }
}

/// A running bootstrap endpoint. Dropping it stops accepting connections
/// (like [`BootstrapServer::shutdown`] without waiting).
#[derive(Debug)]
pub struct BootstrapServer {
    local_addr: SocketAddr,
    shutdown: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
    state: Arc<State>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl BootstrapServer {
    /// Binds `addr` (use port 0 for any free port) and starts serving on the
    /// current tokio runtime, with `server` as the TLS server certificate
    /// (from [`ClusterCa::server_cert`]).
    ///
    /// # Errors
    /// A TLS configuration error or a bind error.
    pub async fn bind(
        addr: SocketAddr,
        ca: Arc<ClusterCa>,
        tokens: Arc<TokenStore>,
        server: &Credentials,
        options: BootstrapOptions,
    ) -> Result<Self, Error> {
        let config = build_server_config(
            &ca,
            &server.cert_pem,
            &server.key_pem,
            ClientAuth::Optional,
            ALPN_HTTP1,
        )?;
        let listener = TcpListener::bind(addr).await.map_err(Error::Net)?;
        let local_addr = listener.local_addr().map_err(Error::Net)?;
        let state = Arc::new(State {
            ca,
            tokens,
            joins: RateLimiter::new(options.join_burst, options.join_refill),
            options,
            counters: Counters::default(),
            slots: Slots::default(),
            work: Semaphore::new(BLOCKING_WORK),
            renewing: Mutex::new(()),
        });
        let (tx, rx) = watch::channel(false);
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let task = tokio::spawn(accept_loop(listener, acceptor, Arc::clone(&state), rx));
        tracing::info!(%local_addr, "bootstrap endpoint listening");
        Ok(Self {
            local_addr,
            shutdown: Some(tx),
            task: Some(task),
            state,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Current counters.
    #[must_use]
    pub fn stats(&self) -> BootstrapStats {
        let c = &self.state.counters;
        BootstrapStats {
            ca_served: c.ca_served.load(Ordering::Relaxed),
            join_requests: c.join_requests.load(Ordering::Relaxed),
            joins_ok: c.joins_ok.load(Ordering::Relaxed),
            renew_requests: c.renew_requests.load(Ordering::Relaxed),
            renewals_ok: c.renewals_ok.load(Ordering::Relaxed),
            tls_failures: c.tls_failures.load(Ordering::Relaxed),
            rate_limited: c.rate_limited.load(Ordering::Relaxed),
            connections_refused: c.connections_refused.load(Ordering::Relaxed),
            connections_evicted: c.connections_evicted.load(Ordering::Relaxed),
            timeouts: c.timeouts.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, lets open connections finish their requests (up to
    /// [`BootstrapOptions::shutdown_grace`]) and returns when the server task
    /// has ended.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "bootstrap server task ended abnormally");
        }
    }
}

impl Drop for BootstrapServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() || *shutdown.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let slot = match acquire_slot(&state, peer.ip()) {
                        Ok(slot) => slot,
                        Err(why) => {
                            bump(&state.counters.connections_refused);
                            tracing::debug!(%peer, ?why, "bootstrap connection refused at accept");
                            drop(tcp);
                            continue;
                        }
                    };
                    let _ = tcp.set_nodelay(true);
                    let watcher = graceful.watcher();
                    let acceptor = acceptor.clone();
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        serve_connection(tcp, peer, acceptor, state, watcher, slot).await;
                    });
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "bootstrap accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    drop(listener);
    let grace = state.options.shutdown_grace;
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "bootstrap connections still open after the grace period"
        );
    }
    tracing::info!("bootstrap endpoint stopped");
}

/// What the handlers know about the connection a request came on.
#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    cert: Option<CertificateDer<'static>>,
    /// Set once the request has been read: the connection is then no
    /// longer evicted to make room.
    busy: Arc<AtomicBool>,
}

impl Peer {
    fn mark_busy(&self) {
        self.busy.store(true, Ordering::Release);
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    watcher: hyper_util::server::graceful::Watcher,
    mut slot: Slot,
) {
    let deadline = state.options.idle_timeout;
    let busy = Arc::clone(&slot.busy);
    let serve = serve_tls(tcp, addr, acceptor, Arc::clone(&state), watcher, busy);
    tokio::select! {
        () = serve => {}
        _ = &mut slot.evicted => {
            tracing::debug!(peer = %addr, "bootstrap connection evicted to make room");
        }
        () = tokio::time::sleep(deadline) => {
            bump(&state.counters.timeouts);
            tracing::info!(peer = %addr, ?deadline, "bootstrap connection closed at its deadline");
        }
    }
    drop(slot);
}

async fn serve_tls(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    watcher: hyper_util::server::graceful::Watcher,
    busy: Arc<AtomicBool>,
) {
    let tls =
        match tokio::time::timeout(state.options.handshake_timeout, acceptor.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                bump(&state.counters.tls_failures);
                tracing::info!(peer = %addr, error = %e, "bootstrap TLS handshake failed");
                return;
            }
            Err(_) => {
                bump(&state.counters.tls_failures);
                tracing::info!(peer = %addr, "bootstrap TLS handshake timed out");
                return;
            }
        };
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .map(|c| c.clone().into_owned());
    let peer = Arc::new(Peer { addr, cert, busy });
    let header_timeout = state.options.header_timeout;
    let service = hyper::service::service_fn(move |req| {
        let state = Arc::clone(&state);
        let peer = Arc::clone(&peer);
        async move { Ok::<_, Infallible>(route(&state, &peer, req).await) }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(Some(header_timeout))
        .keep_alive(false)
        .max_buf_size(64 * 1024);
    let conn = builder.serve_connection(TokioIo::new(tls), service);
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(peer = %addr, error = %e, "bootstrap connection ended with an error");
    }
}

// ---------------------------------------------------------------------------
// routing and handlers
// ---------------------------------------------------------------------------

/// A JSON error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    reason: String,
    retry_after: Option<Duration>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            code,
            reason: reason.into(),
            retry_after: None,
        }
    }

    fn rate_limited(reason: impl Into<String>, retry_after: Duration) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", reason)
        }
    }

    fn revoked(serial: &str) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "certificate_revoked",
            format!("client certificate {serial} is revoked"),
        )
    }

    fn bad_request(code: &'static str, reason: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, reason)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::Token(t) => {
                let status = match t {
                    TokenError::Malformed(_) => StatusCode::BAD_REQUEST,
                    _ => StatusCode::UNAUTHORIZED,
                };
                Self::new(status, t.code(), t.to_string())
            }
            Error::InvalidCsr(_) => Self::bad_request("invalid_csr", e.to_string()),
            Error::InvalidNodeName { .. } => Self::bad_request("invalid_node_name", e.to_string()),
            Error::NodeMismatch { .. } => {
                Self::new(StatusCode::FORBIDDEN, "node_mismatch", e.to_string())
            }
            Error::NotANodeCertificate(_) => Self::new(
                StatusCode::FORBIDDEN,
                "not_a_node_certificate",
                e.to_string(),
            ),
            // One of several replicas that cannot reach the state they
            // share: nothing is admitted, the client may retry.
            Error::Shared { .. } => {
                tracing::warn!(error = %e, "bootstrap request refused");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "cluster_unavailable",
                    e.to_string(),
                )
            }
            other => {
                tracing::error!(error = %other, "bootstrap request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "internal error; see the cloudcore log",
                )
            }
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_seconds: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct JoinRequest {
    token: String,
    node: String,
    csr: String,
}

#[derive(Debug, Deserialize)]
struct RenewRequest {
    csr: String,
}

#[derive(Debug, Serialize)]
struct CertResponse<'a> {
    certificate: &'a str,
    ca: &'a str,
}

async fn route(state: &Arc<State>, peer: &Peer, req: Request<Incoming>) -> Response<String> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let result = match (path.as_str(), &method) {
        ("/v1/ca", &Method::GET) => {
            bump(&state.counters.ca_served);
            Ok(pem_response(state.ca.cert_pem().to_owned()))
        }
        ("/v1/join", &Method::POST) => {
            bump(&state.counters.join_requests);
            match state.joins.take(peer.addr.ip(), Instant::now()) {
                Ok(()) => join(state, peer, req).await,
                Err(wait) => Err(ApiError::rate_limited(
                    format!(
                        "too many join requests from {}; retry in {}s",
                        peer.addr.ip(),
                        whole_secs(wait)
                    ),
                    wait,
                )),
            }
        }
        ("/v1/renew", &Method::POST) => {
            bump(&state.counters.renew_requests);
            renew(state, peer, req).await
        }
        ("/v1/ca" | "/v1/join" | "/v1/renew", _) => Err(ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!(
                "no such endpoint: {}",
                path.chars().take(200).collect::<String>()
            ),
        )),
    };
    match result {
        Ok(resp) => resp,
        Err(e) => {
            if e.status == StatusCode::TOO_MANY_REQUESTS {
                bump(&state.counters.rate_limited);
            }
            if e.status == StatusCode::REQUEST_TIMEOUT {
                bump(&state.counters.timeouts);
            }
            tracing::info!(
                peer = %peer.addr, %method, path = %path.chars().take(200).collect::<String>(),
                status = e.status.as_u16(), error = e.code, reason = %e.reason,
                "bootstrap request refused"
            );
            error_response(&e)
        }
    }
}

/// Whole seconds, rounded up (at least 1): a `Retry-After` value.
fn whole_secs(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
}

/// Runs file work (token store, CA, ledger, revocations) on the blocking
/// pool, a few at a time.
async fn blocking<T: Send + 'static>(
    state: &State,
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let _permit = state.work.acquire().await.map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the bootstrap endpoint is stopping",
        )
    })?;
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        tracing::error!(error = %e, "bootstrap task failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the cloudcore log",
        )
    })?
}

async fn join(
    state: &Arc<State>,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<String>, ApiError> {
    let body = read_body(req, &state.options).await?;
    let request: JoinRequest = parse_json(&body)?;
    crate::pki::validate_node_name(&request.node)?;
    // Malformed tokens never reach the token store's file.
    parse_token(&request.token).map_err(Error::Token)?;
    peer.mark_busy();
    let st = Arc::clone(state);
    let node = request.node.clone();
    let issued: IssuedCert = blocking(state, move || {
        let now = SystemTime::now();
        // Check the token without using it up, so that a bad CSR does not
        // burn it; then sign; then redeem (which re-checks under the
        // store's lock).
        st.tokens.check(&request.token, &request.node, now)?;
        let issued =
            st.ca
                .sign_node_csr(&request.csr, &request.node, st.options.node_cert_validity)?;
        st.tokens.redeem(&request.token, &request.node, now)?;
        Ok(issued)
    })
    .await?;
    bump(&state.counters.joins_ok);
    tracing::info!(peer = %peer.addr, %node, serial = %issued.serial, "node joined");
    Ok(cert_response(&issued.cert_pem, state.ca.cert_pem()))
}

async fn renew(
    state: &Arc<State>,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<String>, ApiError> {
    let Some(cert) = &peer.cert else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "client_certificate_required",
            "renewal requires TLS client authentication with the node's current certificate",
        ));
    };
    let node = node_name_from_cert(cert)?;
    // The TLS verifier checked revocation and validity at the handshake;
    // check again here, since a connection may outlive either.
    let serial = serial_of_cert(cert)?;
    if state.ca.is_cert_revoked(cert) {
        return Err(ApiError::revoked(&serial));
    }
    if not_after_of_cert(cert)? <= SystemTime::now() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "certificate_expired",
            "client certificate has expired",
        ));
    }
    let body = read_body(req, &state.options).await?;
    let request: RenewRequest = parse_json(&body)?;
    peer.mark_busy();
    let st = Arc::clone(state);
    let (der, old, who) = (cert.clone(), serial.clone(), node.clone());
    let issued: IssuedCert = blocking(state, move || {
        let _one_at_a_time = st.renewing.lock().unwrap_or_else(PoisonError::into_inner);
        // A renewal that finished meanwhile revoked this certificate.
        if st.ca.is_cert_revoked(&der) {
            return Err(ApiError::revoked(&old));
        }
        let min = st.options.renew_min_interval;
        if let Some(last) = st.ca.last_renewal(&who) {
            let next = last.checked_add(min).unwrap_or(last);
            if let Ok(wait) = next.duration_since(SystemTime::now())
                && !wait.is_zero()
            {
                return Err(ApiError::rate_limited(
                    format!(
                        "node {who} renewed its certificate less than {}s ago; retry in {}s",
                        min.as_secs(),
                        whole_secs(wait)
                    ),
                    wait,
                ));
            }
        }
        let issued = st
            .ca
            .sign_node_renewal(&request.csr, &who, st.options.node_cert_validity)?;
        st.ca.revoke_replaced(&der)?;
        Ok(issued)
    })
    .await?;
    bump(&state.counters.renewals_ok);
    tracing::info!(
        peer = %peer.addr, node = %node, old_serial = %serial, serial = %issued.serial,
        "node certificate renewed; the old one is revoked"
    );
    Ok(cert_response(&issued.cert_pem, state.ca.cert_pem()))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_request", format!("invalid JSON body: {e}")))
}

/// Reads the body within [`BootstrapOptions::body_timeout`] and
/// [`BootstrapOptions::max_body_bytes`].
async fn read_body(req: Request<Incoming>, opts: &BootstrapOptions) -> Result<Vec<u8>, ApiError> {
    let timeout = opts.body_timeout;
    tokio::time::timeout(timeout, read_body_within(req, opts.max_body_bytes))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("the request body did not arrive within {timeout:?}"),
            )
        })?
}

async fn read_body_within(req: Request<Incoming>, limit: usize) -> Result<Vec<u8>, ApiError> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("request body exceeds {limit} bytes"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(too_large());
    }
    let mut body = std::pin::pin!(req.into_body());
    let mut buf = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
        let frame = frame.map_err(|e| {
            ApiError::bad_request("malformed_request", format!("cannot read body: {e}"))
        })?;
        if let Ok(data) = frame.into_data() {
            if buf.len().saturating_add(data.len()) > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf)
}

fn pem_response(pem: String) -> Response<String> {
    let mut resp = Response::new(pem);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    resp
}

fn cert_response(cert: &str, ca: &str) -> Response<String> {
    let body = serde_json::to_string(&CertResponse {
        certificate: cert,
        ca,
    })
    .unwrap_or_default();
    json_response(StatusCode::OK, body)
}

fn error_response(e: &ApiError) -> Response<String> {
    let retry = e.retry_after.map(whole_secs);
    let body = serde_json::to_string(&ErrorBody {
        error: e.code,
        reason: &e.reason,
        retry_after_seconds: retry,
    })
    .unwrap_or_default();
    let mut resp = json_response(e.status, body);
    if let Some(secs) = retry {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

fn json_response(status: StatusCode, body: String) -> Response<String> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
