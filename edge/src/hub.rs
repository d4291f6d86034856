//! EdgeHub: the edge's side of the sync connection. Connects to CloudHub
//! with the node certificate, runs the link, and on any disconnect waits a
//! jittered exponential backoff and connects again; the link's Hello
//! resumes from the durable cursors, so nothing is resent that the cloud
//! already acknowledged and nothing is lost.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use keel_log::{Role, Store};
use keel_sync::link::{LinkConfig, Side, down_stream, up_stream};
use keel_sync::quic::{Sink, run_link};
use tracing::{info, warn};

/// Settings of the edge hub.
#[derive(Clone, Debug)]
pub struct EdgeHubOptions {
    pub server: SocketAddr,
    /// Other cloudcore replicas' hubs, tried in turn after `server` when
    /// the current one cannot be reached.
    pub alternates: Vec<SocketAddr>,
    /// Name the server certificate must carry (an IP address or DNS name).
    pub server_name: String,
    pub node: String,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// QUIC keep-alive, below the hub's idle timeout.
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub ping_interval: Duration,
    pub link_idle_timeout: Duration,
}

impl EdgeHubOptions {
    pub fn new(server: SocketAddr, node: impl Into<String>) -> Self {
        EdgeHubOptions {
            server_name: server.ip().to_string(),
            server,
            alternates: Vec::new(),
            node: node.into(),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            keep_alive: Duration::from_secs(25),
            idle_timeout: Duration::from_secs(90),
            // Liveness is QUIC's job (keep-alive from the edge, idle
            // timeout on both ends); the link's own ping is a rare
            // end-to-end check, so an idle node costs a few bytes/s.
            ping_interval: Duration::from_secs(600),
            link_idle_timeout: Duration::from_secs(1800),
        }
    }
}

/// Jittered exponential backoff ("full jitter"), with the randomness passed in.
pub fn backoff(attempt: u32, min: Duration, max: Duration, random: u64) -> Duration {
    let cap = min
        .saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX))
        .min(max);
    let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX).max(1);
    Duration::from_millis(u64::try_from(min.as_millis()).unwrap_or(0) / 2 + random % cap_ms)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    // ring's system RNG; a failure only makes the jitter less random.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u64::from_le_bytes(b)
}

/// Sessions cloudcore may have open on the connection at once.
const MAX_SESSIONS: u32 = 128;

/// Runs the edge hub until `stop` resolves.
pub async fn run(
    opts: EdgeHubOptions,
    tls: rustls::ClientConfig,
    store: Store,
    sink: Arc<dyn Sink>,
    sessions: Option<Arc<dyn keel_sync::session::SessionHandler>>,
    stop: impl std::future::Future<Output = ()>,
) -> crate::Result<()> {
    let (down, up) = (down_stream(&opts.node), up_stream(&opts.node));
    store
        .create_stream(&up, Role::Writer, 1)
        .map_err(|e| crate::Error::Protocol(format!("log: {e}")))?;
    store
        .create_stream(&down, Role::Replica, 1)
        .map_err(|e| crate::Error::Protocol(format!("log: {e}")))?;
    let client = client_config(tls.clone(), &opts, sessions.is_some())?;
    let mut resumption_off = false;
    let bind: SocketAddr = if opts.server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let mut endpoint =
        keel_sync::quic::client_endpoint(bind).map_err(|e| crate::Error::Connect {
            addr: opts.server,
            source: e,
        })?;
    endpoint.set_default_client_config(client);

    let run = async {
        let mut attempt = 0u32;
        // The hub tried next: `server`, then the alternates in turn, or
        // where a replica that does not own this node sent it.
        let mut target = opts.server;
        let mut next_alternate = 0usize;
        let mut moves = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let mut moved_to: Option<SocketAddr> = None;
            match connect(&endpoint, &opts, target).await {
                Ok(conn) => {
                    let head = store.info(&down).map(|i| i.head).unwrap_or_default();
                    let mut cfg = LinkConfig::new(opts.node.clone(), Side::Edge, head);
                    cfg.ping_interval_ms =
                        u64::try_from(opts.ping_interval.as_millis()).unwrap_or(u64::MAX);
                    cfg.idle_timeout_ms =
                        u64::try_from(opts.link_idle_timeout.as_millis()).unwrap_or(u64::MAX);
                    info!(node = %opts.node, server = %target, "connected to cloudcore");
                    let serving = sessions
                        .clone()
                        .map(|h| tokio::spawn(keel_sync::session::serve_sessions(conn.clone(), h)));
                    let closed =
                        run_link(conn.clone(), store.clone(), cfg, sink.clone(), None).await;
                    if let Some(s) = serving {
                        s.abort();
                    }
                    // Refused for its certificate: whatever session this
                    // node would resume carries a refused certificate, so
                    // it makes full handshakes from now on.
                    if refused_identity(&conn) && !resumption_off {
                        warn!(node = %opts.node, "cloudcore refused the node's certificate; no TLS session resumption from now on");
                        let mut tls = tls.clone();
                        tls.resumption = rustls::client::Resumption::disabled();
                        if let Ok(c) = client_config(tls, &opts, sessions.is_some()) {
                            endpoint.set_default_client_config(c);
                            resumption_off = true;
                        }
                    }
                    moved_to = moved(&conn);
                    match moved_to {
                        Some(to) => {
                            info!(node = %opts.node, from = %target, %to, "this node's cloudcore replica is elsewhere")
                        }
                        None => {
                            warn!(node = %opts.node, code = ?closed.code, reason = %closed.message, "disconnected from cloudcore")
                        }
                    }
                    // A connection that lasted resets the backoff.
                    if started.elapsed() > Duration::from_secs(10) {
                        attempt = 0;
                    }
                }
                Err(e) => {
                    warn!(node = %opts.node, server = %target, error = %e, "cannot reach cloudcore");
                    // The next replica's hub, if there are several.
                    let all: Vec<SocketAddr> = std::iter::once(opts.server)
                        .chain(opts.alternates.iter().copied())
                        .collect();
                    next_alternate = (next_alternate + 1) % all.len();
                    target = all.get(next_alternate).copied().unwrap_or(opts.server);
                }
            }
            if let Some(to) = moved_to {
                target = to;
                // Straight there, a few times in a row; past that, replicas
                // disagree for a moment (a hand-over): back off.
                moves += 1;
                if moves <= 3 {
                    continue;
                }
            } else {
                moves = 0;
            }
            let wait = backoff(attempt, opts.backoff_min, opts.backoff_max, random_u64());
            attempt = attempt.saturating_add(1);
            tokio::time::sleep(wait).await;
        }
    };
    tokio::select! {
        _ = run => {}
        _ = stop => {}
    }
    endpoint.close(quinn::VarInt::from_u32(0), b"edgecore stopping");
    Ok(())
}

/// The QUIC client configuration of the hub connection.
fn client_config(
    tls: rustls::ClientConfig,
    opts: &EdgeHubOptions,
    serves_sessions: bool,
) -> crate::Result<quinn::ClientConfig> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| crate::Error::Protocol(format!("client TLS config unusable for QUIC: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(opts.idle_timeout).ok());
    transport.keep_alive_interval(Some(opts.keep_alive));
    transport.max_concurrent_uni_streams(2u32.into());
    // Sessions cloudcore opens on this connection (kubectl logs), each a
    // bidirectional stream; none when this edge serves none.
    transport.max_concurrent_bidi_streams((if serves_sessions { MAX_SESSIONS } else { 0 }).into());
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// Whether cloudcore closed `conn` for the node's certificate (revoked,
/// expired, or no node identity).
fn refused_identity(conn: &quinn::Connection) -> bool {
    matches!(
        conn.close_reason(),
        Some(quinn::ConnectionError::ApplicationClosed(a))
            if a.error_code == quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Unauthorized as u32)
    )
}

/// The hub a replica that does not own this node sent it to (`MOVED`).
fn moved(conn: &quinn::Connection) -> Option<SocketAddr> {
    match conn.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(a))
            if a.error_code
                == quinn::VarInt::from_u32(keel_sync::frame::ErrorCode::Moved as u32) =>
        {
            std::str::from_utf8(&a.reason).ok()?.parse().ok()
        }
        _ => None,
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    opts: &EdgeHubOptions,
    target: SocketAddr,
) -> Result<quinn::Connection, String> {
    // The name to verify: the configured one, or the target's IP (each
    // replica's certificate names its own).
    let name = if target != opts.server && opts.server_name == opts.server.ip().to_string() {
        target.ip().to_string()
    } else {
        opts.server_name.clone()
    };
    let connecting = endpoint.connect(target, &name).map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}
