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
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| crate::Error::Protocol(format!("client TLS config unusable for QUIC: {e}")))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(opts.idle_timeout).ok());
    transport.keep_alive_interval(Some(opts.keep_alive));
    transport.max_concurrent_uni_streams(2u32.into());
    // Sessions cloudcore opens on this connection (kubectl logs), each a
    // bidirectional stream; none when this edge serves none.
    transport
        .max_concurrent_bidi_streams((if sessions.is_some() { MAX_SESSIONS } else { 0 }).into());
    client.transport_config(Arc::new(transport));
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
        loop {
            let started = tokio::time::Instant::now();
            match connect(&endpoint, &opts).await {
                Ok(conn) => {
                    let head = store.info(&down).map(|i| i.head).unwrap_or_default();
                    let mut cfg = LinkConfig::new(opts.node.clone(), Side::Edge, head);
                    cfg.ping_interval_ms =
                        u64::try_from(opts.ping_interval.as_millis()).unwrap_or(u64::MAX);
                    cfg.idle_timeout_ms =
                        u64::try_from(opts.link_idle_timeout.as_millis()).unwrap_or(u64::MAX);
                    info!(node = %opts.node, server = %opts.server, "connected to cloudcore");
                    let serving = sessions
                        .clone()
                        .map(|h| tokio::spawn(keel_sync::session::serve_sessions(conn.clone(), h)));
                    let closed = run_link(conn, store.clone(), cfg, sink.clone(), None).await;
                    if let Some(s) = serving {
                        s.abort();
                    }
                    warn!(node = %opts.node, code = ?closed.code, reason = %closed.message, "disconnected from cloudcore");
                    // A connection that lasted resets the backoff.
                    if started.elapsed() > Duration::from_secs(10) {
                        attempt = 0;
                    }
                }
                Err(e) => {
                    warn!(node = %opts.node, server = %opts.server, error = %e, "cannot reach cloudcore")
                }
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

async fn connect(
    endpoint: &quinn::Endpoint,
    opts: &EdgeHubOptions,
) -> Result<quinn::Connection, String> {
    let connecting = endpoint
        .connect(opts.server, &opts.server_name)
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(Duration::from_secs(10), connecting).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(_) => Err("handshake timed out".into()),
    }
}
