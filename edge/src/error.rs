//! The one error type of `keel-edge`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Every error returned by `keel-edge`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The join token string is not a keel token.
    #[error("invalid join token: {0}")]
    InvalidToken(&'static str),
    /// The token names another node than the one joining.
    #[error("the join token is for node {token_node:?}, not {node:?}")]
    TokenNodeMismatch {
        /// The node named in the token.
        token_node: String,
        /// The node that tried to join.
        node: String,
    },
    /// The CA served by the bootstrap endpoint is not the one the token pins:
    /// the server is not the cluster the token came from (or someone is in
    /// the middle). Nothing was sent to it.
    #[error(
        "cluster CA mismatch: the join token pins {expected} but the server at {addr} \
         presented a CA with {actual}; refusing to trust it"
    )]
    CaHashMismatch {
        /// The bootstrap server.
        addr: SocketAddr,
        /// The hash carried by the token.
        expected: String,
        /// The hash of the CA the server presented.
        actual: String,
    },
    /// TCP connection to the bootstrap endpoint failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The bootstrap server.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The TLS layer failed or the peer refused us with a TLS alert (for
    /// example `CertificateRevoked` or `CertificateExpired` on renewal).
    #[error("TLS error with {addr}: {source}")]
    Tls {
        /// The bootstrap server.
        addr: SocketAddr,
        /// The rustls error.
        #[source]
        source: rustls::Error,
    },
    /// The HTTP exchange failed below the application level.
    #[error("HTTP error with {addr}: {reason}")]
    Http {
        /// The bootstrap server.
        addr: SocketAddr,
        /// What went wrong.
        reason: String,
    },
    /// The bootstrap endpoint refused the request.
    #[error("the bootstrap server refused the request (HTTP {status}): {code}: {reason}")]
    Refused {
        /// HTTP status code.
        status: u16,
        /// The server's error code (`token_expired`, `node_mismatch`, ...).
        code: String,
        /// The server's explanation.
        reason: String,
    },
    /// The bootstrap endpoint answered something that is not a valid answer.
    #[error("invalid answer from the bootstrap server: {0}")]
    Protocol(String),
    /// An exchange took too long.
    #[error("{what} timed out after {after:?}")]
    Timeout {
        /// The exchange.
        what: &'static str,
        /// The limit.
        after: Duration,
    },
    /// A file operation failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A certificate or key (received or stored) is unusable.
    #[error("invalid certificate or key: {0}")]
    Certificate(String),
    /// Key or CSR generation failed.
    #[error("key or CSR generation failed: {0}")]
    KeyGen(#[from] rcgen::Error),
    /// Building a TLS configuration failed.
    #[error("TLS configuration error: {0}")]
    TlsConfig(#[source] rustls::Error),
    /// The local log store failed (a failed write poisons it).
    #[error("local log: {0}")]
    Log(#[from] keel_log::Error),
    /// A change to a local object could not be made.
    #[error("object {key}: {message}")]
    Object {
        /// The object's key.
        key: String,
        /// What went wrong.
        message: String,
    },
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// No identity stored yet.
    #[error("no node identity in {}; join the cluster first", .0.display())]
    NotJoined(PathBuf),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
