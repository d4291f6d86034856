//! The HTTPS bootstrap endpoint: CA download, token join, certificate renewal.
//!
//! | request | auth | answer |
//! |---|---|---|
//! | `GET /v1/ca` | none | the CA certificate PEM (the client pins it by the hash in its token) |
//! | `POST /v1/join` `{"token","node","csr"}` | join token | `{"certificate","ca"}` |
//! | `POST /v1/renew` `{"csr"}` | mTLS with a current node certificate | `{"certificate","ca"}` |
//!
//! Errors are JSON `{"error": <code>, "reason": <text>}`: 400 for a malformed
//! body, token or CSR, 401 for a token that is unknown, bound to another node,
//! expired or used (and for renewal without a valid client certificate), 403
//! when the CSR's common name is not the node, 404/405 for other routes, 413
//! for bodies over the limit.
//!
//! TLS 1.3 only, with the server certificate from the cluster CA. Client
//! certificates are optional at the TLS layer (join has none) but, when
//! presented, are verified like the hub's: chained to the CA, in validity,
//! clientAuth, not revoked. Every connection gets a handshake timeout and a
//! header read timeout; bodies are read up to a size limit.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use hyper::body::{Body as _, Incoming};
use hyper::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::error::{Error, TokenError};
use crate::pki::{
    ALPN_HTTP1, ClientAuth, ClusterCa, Credentials, DEFAULT_NODE_CERT_VALIDITY,
    build_server_config, node_name_from_cert, not_after_of_cert, serial_of_cert,
};
use crate::token::TokenStore;

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
}

#[derive(Debug, Default)]
struct Counters {
    ca_served: AtomicU64,
    join_requests: AtomicU64,
    joins_ok: AtomicU64,
    renew_requests: AtomicU64,
    renewals_ok: AtomicU64,
    tls_failures: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

struct State {
    ca: Arc<ClusterCa>,
    tokens: Arc<TokenStore>,
    options: BootstrapOptions,
    counters: Counters,
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
            options,
            counters: Counters::default(),
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
                    let _ = tcp.set_nodelay(true);
                    let watcher = graceful.watcher();
                    let acceptor = acceptor.clone();
                    let state = Arc::clone(&state);
                    tokio::spawn(async move {
                        serve_connection(tcp, peer, acceptor, state, watcher).await;
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
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    addr: SocketAddr,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    watcher: hyper_util::server::graceful::Watcher,
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
    let peer = Arc::new(Peer { addr, cert });
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
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            code,
            reason: reason.into(),
        }
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
struct ErrorBody<'a> {
    error: &'a str,
    reason: &'a str,
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

async fn route(state: &State, peer: &Peer, req: Request<Incoming>) -> Response<String> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let result = match (path.as_str(), &method) {
        ("/v1/ca", &Method::GET) => {
            bump(&state.counters.ca_served);
            Ok(pem_response(state.ca.cert_pem().to_owned()))
        }
        ("/v1/join", &Method::POST) => {
            bump(&state.counters.join_requests);
            join(state, peer, req).await
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
            tracing::info!(
                peer = %peer.addr, %method, path = %path.chars().take(200).collect::<String>(),
                status = e.status.as_u16(), error = e.code, reason = %e.reason,
                "bootstrap request refused"
            );
            error_response(&e)
        }
    }
}

async fn join(
    state: &State,
    peer: &Peer,
    req: Request<Incoming>,
) -> Result<Response<String>, ApiError> {
    let body = read_body(req, state.options.max_body_bytes).await?;
    let request: JoinRequest = parse_json(&body)?;
    crate::pki::validate_node_name(&request.node)?;
    let now = SystemTime::now();
    // Check the token without using it up, so that a bad CSR does not burn
    // it; then sign; then redeem (which re-checks under the store's lock).
    state.tokens.check(&request.token, &request.node, now)?;
    let issued = state.ca.sign_node_csr(
        &request.csr,
        &request.node,
        state.options.node_cert_validity,
    )?;
    state.tokens.redeem(&request.token, &request.node, now)?;
    bump(&state.counters.joins_ok);
    tracing::info!(peer = %peer.addr, node = %request.node, serial = %issued.serial, "node joined");
    Ok(cert_response(&issued.cert_pem, state.ca.cert_pem()))
}

async fn renew(
    state: &State,
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
    if state.ca.is_revoked(&serial) {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "certificate_revoked",
            format!("client certificate {serial} is revoked"),
        ));
    }
    if not_after_of_cert(cert)? <= SystemTime::now() {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "certificate_expired",
            "client certificate has expired",
        ));
    }
    let body = read_body(req, state.options.max_body_bytes).await?;
    let request: RenewRequest = parse_json(&body)?;
    let issued = state
        .ca
        .sign_node_csr(&request.csr, &node, state.options.node_cert_validity)?;
    bump(&state.counters.renewals_ok);
    tracing::info!(
        peer = %peer.addr, node = %node, old_serial = %serial, serial = %issued.serial,
        "node certificate renewed"
    );
    Ok(cert_response(&issued.cert_pem, state.ca.cert_pem()))
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_request", format!("invalid JSON body: {e}")))
}

async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Vec<u8>, ApiError> {
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
    let body = serde_json::to_string(&ErrorBody {
        error: e.code,
        reason: &e.reason,
    })
    .unwrap_or_default();
    json_response(e.status, body)
}

fn json_response(status: StatusCode, body: String) -> Response<String> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
