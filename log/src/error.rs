use thiserror::Error;

/// Result alias for keel-log.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the log.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// An earlier write or fsync failed; the store refuses all writes until
    /// it is reopened (which recovers to the durable prefix).
    #[error("log store is poisoned by an earlier failed write or fsync; reopen it to recover")]
    Poisoned,

    /// A stored record or stream meta does not decode or does not verify.
    #[error("log corrupt in stream {stream:?} at seq {seq}: {reason}")]
    Corrupt {
        stream: String,
        seq: u64,
        reason: String,
    },

    /// The underlying storage engine failed (I/O, journal corruption, lock).
    #[error("storage engine: {0}")]
    Storage(#[from] fjall::Error),

    /// I/O outside the storage engine (creating the data directory).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),

    #[error("invalid stream name {name:?}: {reason}")]
    InvalidStreamName { name: String, reason: &'static str },

    #[error("unknown stream {0:?}")]
    UnknownStream(String),

    #[error("stream {stream:?} already exists as a {existing}")]
    RoleConflict {
        stream: String,
        existing: &'static str,
    },

    /// `append` on a replica, or `append_replicated` on a stream this store writes.
    #[error("stream {stream:?} is a {role} here; {op} is not allowed")]
    WrongRole {
        stream: String,
        role: &'static str,
        op: &'static str,
    },

    /// `begin_epoch` on a stream with records not yet folded into its
    /// snapshot.
    #[error(
        "stream {stream:?}: a new epoch needs every record compacted (horizon {horizon}, head {head})"
    )]
    NotCompacted {
        stream: String,
        horizon: u64,
        head: u64,
    },

    /// A replicated record does not extend the local chain.
    #[error("stream {stream:?}: record seq {seq} does not extend the chain: {reason}")]
    ChainMismatch {
        stream: String,
        seq: u64,
        reason: String,
    },

    /// A read or compaction asked for a seq past the durable head.
    #[error("stream {stream:?}: seq {seq} is past the durable head {head}")]
    BeyondHead { stream: String, seq: u64, head: u64 },

    #[error("fold failed for object {key:?} in stream {stream:?}: {source}")]
    Fold {
        stream: String,
        key: String,
        source: crate::FoldError,
    },

    #[error("invalid entry: {0}")]
    InvalidEntry(&'static str),

    /// The group-commit thread is gone (the store is shutting down).
    #[error("log store is shut down")]
    Closed,
}

impl Error {
    /// Whether retrying the same call later can succeed without reopening
    /// the store or changing the input.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::BeyondHead { .. })
    }

    pub(crate) fn corrupt(stream: &str, seq: u64, reason: impl Into<String>) -> Self {
        Error::Corrupt {
            stream: stream.to_owned(),
            seq,
            reason: reason.into(),
        }
    }
}
