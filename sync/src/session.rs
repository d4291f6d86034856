//! Sessions: requests cloudcore makes of an edge node over the node's own
//! QUIC connection (`kubectl logs` today), each on its own bidirectional
//! stream beside the replication streams. The edge needs no other port
//! and no inbound reachability: the node dialled the connection.
//!
//! On a session stream the opener writes a request header (`u32 BE length
//! ‖ bytes`, at most [`MAX_SESSION_HEADER`]), then its input (raw bytes)
//! until it finishes its side. The responder answers with a status byte
//! (0 ok, 1 error), a header of the same form (on error: why), then, when
//! ok, its output (raw bytes) until it finishes. What the bytes of a
//! request, an error and the output mean is the business of the layer
//! above (keel-api's Kubernetes types); this module only moves them.
//!
//! Flow control is QUIC's, end to end: each side reads its peer only as
//! fast as its consumer takes chunks from a small bounded channel, so a
//! slow reader slows the writer and never grows memory. Session streams
//! have a lower send priority than the link's control and bulk streams, so
//! many sessions do not delay replication.
//!
//! Either side's reader going away reaches the other at once, even while
//! nothing flows: dropping what a session's bytes are read into stops the
//! stream (STOP_SENDING), and the peer's copy of its channel into the
//! stream ends on that, dropping the channel's receiver, so its producer
//! (an exec'd command's output) sees it closed.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tracing::debug;

/// Stream kind byte of a session stream.
const SESSION: u8 = 2;
/// Largest request or error header.
pub const MAX_SESSION_HEADER: usize = 64 << 10;
/// Chunks buffered each way between a stream and its consumer.
const CHUNKS: usize = 16;
/// Largest chunk read from a stream at once.
const CHUNK_BYTES: usize = 16 << 10;
/// Send priority of session streams (the link's control stream has 10,
/// its bulk stream 0).
const PRIORITY: i32 = -1;

/// What a session handler answers: its output, or an error header.
pub type SessionResult = Result<mpsc::Receiver<Bytes>, Vec<u8>>;

/// A pending answer of a [`SessionHandler`].
pub type SessionFuture = Pin<Box<dyn Future<Output = SessionResult> + Send>>;

/// Serves the sessions opened on an edge's connection.
pub trait SessionHandler: Send + Sync + 'static {
    /// Answers `request`. `input` yields what the opener sends after its
    /// request, until it finishes.
    fn open(&self, request: Vec<u8>, input: mpsc::Receiver<Bytes>) -> SessionFuture;
}

/// Why a session could not be opened or answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    #[error("the node's connection is gone: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("writing to the session stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("reading the session stream: {0}")]
    Read(String),
    #[error("the node did not answer within {0:?}")]
    Timeout(Duration),
    #[error("header of {0} bytes exceeds the {MAX_SESSION_HEADER}-byte limit")]
    TooLarge(usize),
    #[error("the answer's status byte is {0}")]
    BadStatus(u8),
}

async fn write_header(
    send: &mut quinn::SendStream,
    prefix: &[u8],
    header: &[u8],
) -> Result<(), SessionError> {
    if header.len() > MAX_SESSION_HEADER {
        return Err(SessionError::TooLarge(header.len()));
    }
    let len = u32::try_from(header.len()).unwrap_or(u32::MAX);
    send.write_all(prefix).await?;
    send.write_all(&len.to_be_bytes()).await?;
    send.write_all(header).await?;
    Ok(())
}

async fn read_header(recv: &mut quinn::RecvStream) -> Result<Vec<u8>, SessionError> {
    let mut len = [0u8; 4];
    recv.read_exact(&mut len)
        .await
        .map_err(|e| SessionError::Read(e.to_string()))?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_SESSION_HEADER {
        return Err(SessionError::TooLarge(len));
    }
    let mut buf = Vec::with_capacity(len);
    (&mut *recv)
        .take(len as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| SessionError::Read(e.to_string()))?;
    if buf.len() != len {
        return Err(SessionError::Read("stream ended inside a header".into()));
    }
    Ok(buf)
}

/// Copies a stream into a bounded channel until either ends. The
/// consumer dropping its receiver stops the stream at once, even while
/// the peer sends nothing: that is how the peer learns its output has no
/// reader (an exec'd command whose client went away is killed then).
fn pump_in(mut recv: quinn::RecvStream) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(CHUNKS);
    tokio::spawn(async move {
        loop {
            // Wait for room first: a slow consumer stops the reads, and
            // QUIC's flow control then stops the peer.
            let Ok(permit) = tx.reserve().await else {
                let _ = recv.stop(quinn::VarInt::from_u32(0));
                return;
            };
            let chunk = tokio::select! {
                c = recv.read_chunk(CHUNK_BYTES, true) => c,
                () = tx.closed() => {
                    let _ = recv.stop(quinn::VarInt::from_u32(0));
                    return;
                }
            };
            match chunk {
                Ok(Some(c)) => permit.send(c.bytes),
                Ok(None) | Err(_) => return,
            }
        }
    });
    rx
}

/// Copies a channel into a stream until the channel ends (then finishes
/// the stream) or the peer stops reading. A stop ends the copy (dropping
/// the receiver, so its producer sees it closed) even while the channel
/// is silent, not only at the next write.
fn pump_out(mut send: quinn::SendStream, mut rx: mpsc::Receiver<Bytes>) {
    tokio::spawn(async move {
        let stopped = send.stopped();
        tokio::pin!(stopped);
        loop {
            let next = tokio::select! {
                b = rx.recv() => b,
                _ = &mut stopped => return,
            };
            let Some(b) = next else { break };
            if send.write_all(&b).await.is_err() {
                return;
            }
        }
        let _ = send.finish();
    });
}

/// Opens a session on `conn` (cloud side): sends `request`, then `input`
/// (if any) as it comes, and waits at most `timeout` for the answer's
/// header. Returns the node's output, or its error header.
pub async fn open_session(
    conn: &quinn::Connection,
    request: &[u8],
    input: Option<mpsc::Receiver<Bytes>>,
    timeout: Duration,
) -> Result<SessionResult, SessionError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let _ = send.set_priority(PRIORITY);
    write_header(&mut send, &[SESSION], request).await?;
    match input {
        Some(rx) => pump_out(send, rx),
        None => {
            let _ = send.finish();
        }
    }
    let answer = async {
        let mut status = [0u8; 1];
        recv.read_exact(&mut status)
            .await
            .map_err(|e| SessionError::Read(e.to_string()))?;
        let header = read_header(&mut recv).await?;
        let [status] = status;
        Ok::<_, SessionError>((status, header))
    };
    let (status, header) = tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| SessionError::Timeout(timeout))??;
    match status {
        0 => Ok(Ok(pump_in(recv))),
        1 => Ok(Err(header)),
        s => Err(SessionError::BadStatus(s)),
    }
}

/// Serves the sessions the peer opens on `conn` (edge side) until the
/// connection ends.
pub async fn serve_sessions(conn: quinn::Connection, handler: Arc<dyn SessionHandler>) {
    while let Ok((send, recv)) = conn.accept_bi().await {
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_one(send, recv, handler).await {
                debug!(error = %e, "session ended with an error");
            }
        });
    }
}

async fn serve_one(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    handler: Arc<dyn SessionHandler>,
) -> Result<(), SessionError> {
    let _ = send.set_priority(PRIORITY);
    let mut kind = [0u8; 1];
    recv.read_exact(&mut kind)
        .await
        .map_err(|e| SessionError::Read(e.to_string()))?;
    let [kind] = kind;
    if kind != SESSION {
        let _ = recv.stop(quinn::VarInt::from_u32(1));
        return Err(SessionError::Read(format!(
            "unknown session stream kind {kind}"
        )));
    }
    let request = read_header(&mut recv).await?;
    let input = pump_in(recv);
    match handler.open(request, input).await {
        Ok(output) => {
            write_header(&mut send, &[0], b"").await?;
            pump_out(send, output);
        }
        Err(why) => {
            write_header(&mut send, &[1], &why).await?;
            let _ = send.finish();
        }
    }
    Ok(())
}
