//! The one error type of `keel-cloud`.

use std::path::PathBuf;

/// Why a join token was refused.
///
/// Carried by [`Error::Token`]; each variant maps to one HTTP status and
/// error code on the bootstrap endpoint (see [`TokenError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The string is not a keel join token (wrong prefix, field count,
    /// lengths or characters).
    #[error("malformed join token: {0}")]
    Malformed(&'static str),
    /// No token with this id and secret was issued by this cluster.
    #[error("unknown join token")]
    Unknown,
    /// The token is valid but bound to another node.
    #[error("join token is bound to node {bound:?}, not {requested:?}")]
    WrongNode {
        /// The node the token was created for.
        bound: String,
        /// The node that tried to use it.
        requested: String,
    },
    /// The token's time to live has passed.
    #[error("join token has expired")]
    Expired,
    /// The token was already redeemed once (tokens are single use).
    #[error("join token was already used")]
    AlreadyUsed,
}

impl TokenError {
    /// A stable machine-readable code, used as the `error` field of the
    /// bootstrap endpoint's JSON errors.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "token_malformed",
            Self::Unknown => "token_unknown",
            Self::WrongNode { .. } => "token_wrong_node",
            Self::Expired => "token_expired",
            Self::AlreadyUsed => "token_used",
        }
    }
}

/// Every error returned by `keel-cloud`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file or directory operation failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A network operation (bind, accept) failed.
    #[error("network error: {0}")]
    Net(#[source] std::io::Error),
    /// A persisted file exists but cannot be used as it is.
    #[error("{} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Certificate or key generation failed.
    #[error("certificate generation failed: {0}")]
    CertGen(#[from] rcgen::Error),
    /// A PEM or DER certificate or key could not be parsed or used.
    #[error("invalid certificate or key: {0}")]
    InvalidCertificate(String),
    /// A certificate signing request could not be parsed, or its signature
    /// does not verify.
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    /// The CSR's common name is not the node it is being signed for.
    #[error("CSR common name {actual:?} does not match node {expected:?}")]
    NodeMismatch {
        /// The node name the request is authorised for.
        expected: String,
        /// The common name found in the CSR.
        actual: String,
    },
    /// A node name that keel does not accept.
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName {
        /// The offending name (possibly truncated).
        name: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A certificate that is not a keel node certificate was used where one
    /// is required.
    #[error("not a keel node certificate: {0}")]
    NotANodeCertificate(String),
    /// A serial number string that is not hexadecimal.
    #[error("invalid certificate serial number {0:?}")]
    InvalidSerial(String),
    /// A validity period that is empty or out of range.
    #[error("invalid validity period: {0}")]
    InvalidValidity(String),
    /// Building a TLS configuration failed.
    #[error("TLS configuration error: {0}")]
    Tls(#[from] rustls::Error),
    /// Building the client certificate verifier failed.
    #[error("client certificate verifier error: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// A join token was refused.
    #[error("join token rejected: {0}")]
    Token(#[from] TokenError),
    /// The system random number generator failed.
    #[error("system random number generator failed")]
    Random,
    /// The admission state replicas share (join tokens, issued and revoked
    /// certificates) could not be read or written.
    #[error("shared admission state, {what}: {message}")]
    Shared {
        /// What was being done.
        what: String,
        /// Why it failed.
        message: String,
    },
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
