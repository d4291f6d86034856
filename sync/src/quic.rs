//! The QUIC driver: runs a [`Link`] on a real quinn connection, with
//! persist-before-ack through keel-log.
//!
//! Each side opens two unidirectional streams: control (Hello, Ack, Ping,
//! Pong, Error) and bulk (segments, snapshot chunks), marked by a first byte
//! 0 or 1 and carrying frames as `u32 BE length ‖ protobuf`. The control
//! stream has the higher send priority and its own writer, so acks and
//! pings never queue behind catch-up.
//!
//! A link is one task. Its readers, writers and the persist pipeline are
//! futures the driver loop polls alongside its own events (channels
//! between them keep each bounded); none of them waits on another, so two
//! peers cannot deadlock on each other's flow control, and an idle link
//! costs one task's state, not six tasks'.
//!
//! A link that closes (malformed frame, unauthorised stream, idle timeout)
//! closes the QUIC connection with the error code and message as the
//! reason: the peer sees why.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_log::{Cursor, Record, Store};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{Instrument, debug, info_span, warn};

use crate::frame::{ErrorCode, Frame, MAX_CONTROL_FRAME_BYTES, MAX_FRAME_BYTES, encode_frame};
use crate::link::{Action, Closed, Event, Link, LinkConfig, Refusal};

const CONTROL: u8 = 0;
const BULK: u8 = 1;
/// Bulk frames queued to the writer before the driver stops reading the log.
const BULK_QUEUE: usize = 4;
/// Frames read from the peer's bulk stream ahead of the link; with
/// [`MAX_FRAME_BYTES`] and QUIC's stream window this bounds what one
/// connection can make this side hold.
const BULK_IN_QUEUE: usize = 2;
/// A link holding a catch-up permit without any acknowledgement for this
/// long gives it back and queues again (a peer that never acks cannot hold
/// a turn other nodes need).
const STALLED_PERMIT: Duration = Duration::from_secs(10);

/// Segments (or snapshots) accepted from the peer and waiting for the
/// store; the link's receive window bounds what they hold.
const PERSIST_QUEUE: usize = 16;

/// What the driver tells its owner. `admit`, `persisted` and
/// `snapshot_installed` run on the blocking pool, one at a time per link
/// and in the link's order (they may do CPU work: folding CRDT changes).
pub trait Sink: Send + Sync + 'static {
    /// Records from the peer are durable in `stream` (apply them).
    fn persisted(&self, node: &str, stream: &str, records: &[Record]);
    /// The local replica of `stream` was replaced by a snapshot (rebuild).
    fn snapshot_installed(&self, node: &str, stream: &str);
    /// Resolves once what this sink feeds has room for one more segment
    /// (see [`crate::queue`]); the driver waits for it before persisting,
    /// so a sink that falls behind slows the peer through the window it
    /// was granted. Required, like `admit`, so that a wrapping sink passes
    /// it on.
    fn room(&self) -> Room<'_>;
    /// The link completed its handshake.
    fn connected(&self, _node: &str) {}
    /// The node has no live connection any more (called by hubs that track
    /// connections per node).
    fn disconnected(&self, _node: &str) {}
    /// The peer acknowledged `cursor` of the stream this side sends.
    fn acked(&self, _node: &str, _stream: &str, _cursor: Cursor) {}
    /// Records from the peer, before they are persisted: an `Err` refuses
    /// them (nothing of them is kept; the link closes with the refusal's
    /// code and message). Required, so that a wrapping sink cannot drop
    /// the check by forgetting to pass it on.
    fn admit(&self, node: &str, stream: &str, records: &[Record]) -> Result<(), Refusal>;
}

/// A sink's wait for room (see [`Sink::room`]).
pub type Room<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// A sink with nothing to wait for.
pub fn room_now<'a>() -> Room<'a> {
    Box::pin(std::future::ready(()))
}

/// A pending admission: resolves to a permit that is held while sending.
pub type Admit<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Box<dyn Send>> + Send + 'a>>;

/// Paces bulk sending: the driver asks before sending catch-up data and
/// says when it is done. See CloudHub's admission.
pub trait Pacer: Send + Sync + 'static {
    /// Waits for a turn to send catch-up data, `lag` records behind.
    fn admit(&self, lag: u64) -> Admit<'_>;
}

/// Errors of the driver.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DriverError {
    #[error("quic connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("quic write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("quic stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
}

/// QUIC application error code for a closed link: the link's error code.
fn close_code(code: ErrorCode) -> quinn::VarInt {
    quinn::VarInt::from_u32(code as u32)
}

async fn write_frames(
    mut send: quinn::SendStream,
    kind: u8,
    mut rx: mpsc::Receiver<Bytes>,
) -> Result<(), DriverError> {
    send.write_all(&[kind]).await?;
    while let Some(bytes) = rx.recv().await {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        send.write_all(&len.to_be_bytes()).await?;
        send.write_all(&bytes).await?;
    }
    let _ = send.shutdown().await;
    Ok(())
}

/// Reads frames from one peer stream into `tx`, tagging them with the
/// stream kind. Returns a reason when the stream is not well-formed.
///
/// Nothing is read from the bulk stream before the peer's Hello is
/// accepted (`established`), control frames are small, and a frame's
/// buffer grows with the bytes that actually arrive, never to a length
/// the peer merely declares.
async fn read_frames(
    mut recv: quinn::RecvStream,
    ctrl: mpsc::Sender<Vec<u8>>,
    bulk: mpsc::Sender<Vec<u8>>,
    mut established: tokio::sync::watch::Receiver<bool>,
) -> Option<String> {
    use tokio::io::AsyncReadExt;
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return None;
    }
    let (tx, max) = match kind {
        [CONTROL] => (ctrl, MAX_CONTROL_FRAME_BYTES),
        [BULK] => {
            if established.wait_for(|e| *e).await.is_err() {
                return None;
            }
            (bulk, MAX_FRAME_BYTES)
        }
        [k] => return Some(format!("unknown stream kind {k}")),
    };
    let mut first = true;
    loop {
        let mut len = [0u8; 4];
        if recv.read_exact(&mut len).await.is_err() {
            return None;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > max {
            return Some(if first && max == MAX_CONTROL_FRAME_BYTES {
                format!(
                    "first frame of {len} bytes exceeds the {max}-byte limit: a connection starts with a Hello"
                )
            } else {
                format!("frame of {len} bytes exceeds the {max}-byte limit")
            });
        }
        first = false;
        let mut buf = Vec::with_capacity(len.min(64 << 10));
        match (&mut recv).take(len as u64).read_to_end(&mut buf).await {
            Ok(n) if n == len => {}
            _ => return None,
        }
        if tx.send(buf).await.is_err() {
            return None;
        }
    }
}

/// Runs `link` on `conn` until either side closes. Returns why it closed.
pub async fn run_link(
    conn: quinn::Connection,
    store: Store,
    cfg: LinkConfig,
    sink: Arc<dyn Sink>,
    pacer: Option<Arc<dyn Pacer>>,
) -> Closed {
    let node = cfg.node.clone();
    let span =
        info_span!("link", node = %node, conn = %conn.stable_id(), peer = %conn.remote_address());
    async move {
        let closed = drive(&conn, store, cfg, sink, pacer).await;
        if !closed.by_peer {
            conn.close(close_code(closed.code), closed.message.as_bytes());
        }
        debug!(code = ?closed.code, message = %closed.message, by_peer = closed.by_peer, "link closed");
        closed
    }
    .instrument(span)
    .await
}

/// What the persist task reports for one action: the stream and its new
/// head, or why nothing more of this link is persisted.
type Persisted = Result<(String, Cursor), Unpersisted>;

enum Unpersisted {
    /// The sink refused the records (nothing of them was kept).
    Refused(Refusal),
    /// The store failed.
    Failed(String),
}

/// Runs `f` on the blocking pool (CPU work of the sink: off the async
/// workers).
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> R + Send + 'static,
) -> Result<R, Unpersisted> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Unpersisted::Failed(format!("sink: {e}")))
}

/// Records durable in a stream, for the sink once their ack is on its way.
type Durable = Option<(String, Vec<Record>)>;

/// Persists one action of the link: waits for the sink's room, has the
/// sink admit the records, appends them and waits until durable. The
/// records come back for [`Sink::persisted`], which the persist task calls
/// after it has reported them durable: the ack does not wait for the fold.
async fn persist(
    store: &Store,
    sink: &Arc<dyn Sink>,
    node: &str,
    stream: String,
    action: Action,
) -> (Persisted, Durable) {
    match persist_action(store, sink, node, stream, action).await {
        Ok((stream, cursor, durable)) => (Ok((stream, cursor)), durable),
        Err(e) => (Err(e), None),
    }
}

async fn persist_action(
    store: &Store,
    sink: &Arc<dyn Sink>,
    node: &str,
    stream: String,
    action: Action,
) -> Result<(String, Cursor, Durable), Unpersisted> {
    sink.room().await;
    match action {
        Action::Persist { records, .. } => {
            let (s, n, st) = (sink.clone(), node.to_owned(), stream.clone());
            let records = blocking(move || s.admit(&n, &st, &records).map(|()| records))
                .await?
                .map_err(Unpersisted::Refused)?;
            let cursor = store
                .append_chained_async(&stream, records.clone())
                .map_err(|e| Unpersisted::Failed(e.to_string()))?
                .await
                .map_err(|e| Unpersisted::Failed(e.to_string()))?;
            Ok((
                stream.clone(),
                cursor,
                Some((stream, records.into_records())),
            ))
        }
        Action::InstallSnapshot { snapshot, .. } => {
            let (store, s, n, st) = (store.clone(), sink.clone(), node.to_owned(), stream.clone());
            let cursor = blocking(move || {
                let c = store.install_snapshot(&st, snapshot)?;
                s.snapshot_installed(&n, &st);
                Ok::<_, keel_log::Error>(c)
            })
            .await?
            .map_err(|e| Unpersisted::Failed(e.to_string()))?;
            Ok((stream, cursor, None))
        }
    }
}

fn lost(message: String) -> Closed {
    Closed {
        code: ErrorCode::Internal,
        message,
        by_peer: true,
    }
}

async fn drive(
    conn: &quinn::Connection,
    store: Store,
    cfg: LinkConfig,
    sink: Arc<dyn Sink>,
    pacer: Option<Arc<dyn Pacer>>,
) -> Closed {
    let start = Instant::now();
    let now = move || u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    let node = cfg.node.clone();
    let unacked_limit = Duration::from_millis(cfg.unacked_limit_ms);
    let mut link = Link::new(cfg, now());
    let out_stream = link.outbound_stream().to_owned();

    // Our two streams.
    let (ctrl_send, bulk_send) = match (conn.open_uni().await, conn.open_uni().await) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => return lost(format!("opening streams: {e}")),
    };
    let _ = ctrl_send.set_priority(10);
    // Channels carry encoded frames and boxed actions: a tokio channel
    // allocates its first block of 32 slots when it is made, and an idle
    // connection should not hold 32 `Frame`s' worth of each.
    let (ctrl_tx, ctrl_out) = mpsc::channel::<Bytes>(1024);
    let (bulk_tx, bulk_out) = mpsc::channel::<Bytes>(BULK_QUEUE);
    let mut writers = std::pin::pin!(async move {
        let (a, b) = tokio::join!(
            write_frames(ctrl_send, CONTROL, ctrl_out),
            write_frames(bulk_send, BULK, bulk_out)
        );
        a.and(b)
    });
    let mut writers_done = false;

    // The peer's two streams, each read as it is accepted; a stream that
    // is not well-formed reports why on `bad`.
    let (ctrl_in_tx, mut ctrl_in) = mpsc::channel::<Vec<u8>>(64);
    let (bulk_in_tx, mut bulk_in) = mpsc::channel::<Vec<u8>>(BULK_IN_QUEUE);
    let (bad_tx, mut bad_rx) = mpsc::channel::<String>(2);
    let (established_tx, established_rx) = tokio::sync::watch::channel(false);
    let read_one = || {
        let (c, b, bad) = (ctrl_in_tx.clone(), bulk_in_tx.clone(), bad_tx.clone());
        let est = established_rx.clone();
        async move {
            let Ok(recv) = conn.accept_uni().await else {
                return;
            };
            if let Some(why) = read_frames(recv, c, b, est).await {
                let _ = bad.send(why).await;
            }
        }
    };
    let (first, second) = (read_one(), read_one());
    let mut readers = std::pin::pin!(async move {
        tokio::join!(first, second);
    });
    let mut readers_done = false;
    drop((ctrl_in_tx, bulk_in_tx, bad_tx));

    // Persistence runs in order, alongside the loop; completions come
    // back on `done`.
    let (persist_tx, mut persist_rx) = mpsc::channel::<Box<(String, Action)>>(PERSIST_QUEUE);
    let (done_tx, mut done_rx) = mpsc::channel::<Box<Persisted>>(PERSIST_QUEUE);
    let (p_store, p_sink, p_node) = (store.clone(), sink.clone(), node.clone());
    let mut persister = std::pin::pin!(async move {
        let (store, sink, node) = (p_store, p_sink, p_node);
        while let Some(next) = persist_rx.recv().await {
            let (stream, action) = *next;
            let (r, durable) = persist(&store, &sink, &node, stream, action).await;
            let stop = r.is_err();
            let reported = done_tx.send(Box::new(r)).await.is_ok();
            // The fold runs after the ack went to the link, and before
            // the next action's admit (which may read what it folds).
            // The owner hears of durable records even when the link has
            // closed meanwhile.
            if let Some((st, records)) = durable {
                let (s, n) = (sink.clone(), node.clone());
                if blocking(move || s.persisted(&n, &st, &records))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if !reported || stop {
                return;
            }
        }
    });
    let mut persister_done = false;
    // An action the persist queue had no room for: queued first once it has.
    let mut persist_stash: Option<Box<(String, Action)>> = None;

    let mut permit: Option<Box<dyn Send>> = None;
    let mut admitted = pacer.is_none();
    let mut admission: Option<Admit<'_>> = None;
    let mut seen_head = 0u64;
    // A control frame the writer had no room for: sent first next time
    // (control frames are never dropped; the link coalesces acks and
    // pongs, so what waits behind it stays small).
    let mut ctrl_stash: Option<Bytes> = None;
    let mut progress = Instant::now();
    // A link whose peer lacks records this side holds for it, and which may
    // send them (its catch-up turn taken, if it waits for turns), closes
    // when the peer acknowledges nothing for `unacked_limit_ms`: the next
    // connection starts from both sides' durable cursors. The sans-IO link
    // gives up after unacknowledged retransmissions; this also covers what
    // it never counts as sent. After a rewind, a bulk writer that waits on
    // QUIC flow control (a peer that stopped reading the bulk stream) keeps
    // the bulk queue full, nothing is sent again, and nothing counts as
    // retransmitted, while pings and pongs go on. `acked_at`: when the
    // peer last acknowledged something, or lacked nothing.
    let mut acked_at = Instant::now();

    let closed = loop {
        // Outputs: control frames always, bulk while the writer has room
        // and this link has its turn.
        while let Some(f) = ctrl_stash
            .take()
            .or_else(|| link.poll_control().map(|f| encode_frame(&f)))
        {
            if let Err(mpsc::error::TrySendError::Full(f)) = ctrl_tx.try_send(f) {
                ctrl_stash = Some(f);
                break;
            }
        }
        // The persist queue holds what the link accepted and the store has
        // not made durable yet: at most the window this side granted. What
        // it has no room for waits in the link.
        while persist_stash.is_none()
            && let Some(a) = link.poll_action()
        {
            let stream = match &a {
                Action::Persist { stream, .. } | Action::InstallSnapshot { stream, .. } => {
                    stream.clone()
                }
            };
            if let Err(mpsc::error::TrySendError::Full(a)) =
                persist_tx.try_send(Box::new((stream, a)))
            {
                persist_stash = Some(a);
            }
        }
        while let Some(e) = link.poll_event() {
            match e {
                Event::Established => {
                    let _ = established_tx.send(true);
                    sink.connected(&node);
                    if let (Some(p), Some(lag)) = (&pacer, link.lag(&store)) {
                        if lag > 0 {
                            admission = Some(p.admit(lag));
                        } else {
                            admitted = true;
                        }
                    }
                }
                Event::Acked { stream, cursor } => {
                    progress = Instant::now();
                    acked_at = Instant::now();
                    sink.acked(&node, &stream, cursor);
                }
                Event::Closed(_) => {}
            }
        }
        if let Some(c) = link.closed().cloned() {
            // Let the Error frame reach the writer; the connection close
            // carries the reason as well.
            while let Some(f) = ctrl_stash
                .take()
                .or_else(|| link.poll_control().map(|f| encode_frame(&f)))
            {
                let _ = ctrl_tx.try_send(f);
            }
            break c;
        }
        if admitted {
            while bulk_tx.capacity() > 0 {
                match link.poll_transmit(&store) {
                    Some((_, f @ Frame::Segment(_)))
                    | Some((_, f @ Frame::EncodedSegment(_)))
                    | Some((_, f @ Frame::Snapshot { .. })) => {
                        let _ = bulk_tx.try_send(encode_frame(&f));
                    }
                    Some((_, f)) => {
                        if let Err(mpsc::error::TrySendError::Full(f)) =
                            ctrl_tx.try_send(encode_frame(&f))
                        {
                            ctrl_stash = Some(f);
                            break;
                        }
                    }
                    None => break,
                }
            }
        }
        // What the peer still lacks (read once per turn of the loop).
        let lag = link.lag(&store);
        // Caught up: give the turn back (a permit is held only while
        // admitted).
        if permit.is_some() && lag == Some(0) {
            permit = None;
        }
        // A turn without progress goes back to the queue.
        if permit.is_some()
            && progress.elapsed() >= STALLED_PERMIT
            && let (Some(p), Some(lag)) = (&pacer, lag)
        {
            debug!(
                lag,
                "no acknowledgement while holding a catch-up turn; queueing again"
            );
            permit = None;
            admitted = false;
            progress = Instant::now();
            admission = Some(p.admit(lag));
        }
        // The peer lacks records and acknowledges nothing: start over.
        let lag = lag.unwrap_or(0);
        let owed = lag > 0 && admitted && !unacked_limit.is_zero();
        if !owed {
            acked_at = Instant::now();
        } else if acked_at.elapsed() >= unacked_limit {
            warn!(
                lag,
                bulk_room = bulk_tx.capacity(),
                "the peer acknowledged nothing for {unacked_limit:?} while it lacks records: closing the link"
            );
            link.close(
                ErrorCode::IdleTimeout,
                format!(
                    "the peer acknowledged nothing of {out_stream} for {unacked_limit:?} while it lacks {lag} records: starting over"
                ),
            );
            continue;
        }
        if let Some(h) = store.info(&out_stream).ok().map(|i| i.head.seq) {
            seen_head = seen_head.max(h);
        }
        let mut deadline = link
            .poll_timeout()
            .map(|t| start + Duration::from_millis(t))
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        if permit.is_some() {
            deadline = deadline.min(progress + STALLED_PERMIT);
        }
        if owed {
            deadline = deadline.min(acked_at + unacked_limit);
        }

        tokio::select! {
            biased;
            // The link's own futures first: they are polled on every turn
            // (and finish only when the link is going away).
            _ = &mut readers, if !readers_done => readers_done = true,
            _ = &mut writers, if !writers_done => writers_done = true,
            _ = &mut persister, if !persister_done => persister_done = true,
            Some(why) = bad_rx.recv() => link.close(ErrorCode::Malformed, why),
            // The control writer has room again for a stashed frame.
            Ok(room) = ctrl_tx.reserve(), if ctrl_stash.is_some() => drop(room),
            Ok(room) = persist_tx.reserve(), if persist_stash.is_some() => {
                if let Some(a) = persist_stash.take() {
                    room.send(a);
                }
            }
            Some(bytes) = ctrl_in.recv() => link.handle_shared(now(), bytes.into(), &store),
            Some(done) = done_rx.recv() => match *done {
                Ok((stream, cursor)) => link.handle_persisted(&stream, cursor),
                Err(Unpersisted::Refused(r)) => {
                    warn!(code = ?r.code, reason = %r.message, "refused the peer's records");
                    link.close(r.code, r.message);
                }
                Err(Unpersisted::Failed(e)) => {
                    link.close(ErrorCode::ChainMismatch, format!("persisting: {e}"))
                }
            },
            p = async {
                match admission.as_mut() {
                    Some(f) => f.await,
                    None => std::future::pending().await,
                }
            }, if admission.is_some() => {
                admission = None;
                permit = Some(p);
                admitted = true;
                progress = Instant::now();
            }
            // The peer's Hello travels on its control stream, which QUIC
            // may deliver after the first bulk frames: bulk waits for it.
            Some(bytes) = bulk_in.recv(), if link.is_established() => {
                link.handle_shared(now(), bytes.into(), &store)
            }
            _ = store.wait_head(&out_stream, seen_head) => {}
            _ = tokio::time::sleep_until(deadline) => link.handle_timeout(now()),
            e = conn.closed() => break lost(format!("connection lost: {e}")),
        }
    };
    drop(permit);
    drop(ctrl_tx);
    drop(bulk_tx);
    // What the persist task already took on becomes durable whatever the
    // connection does, and the owner hears of every such record (the task
    // hands them to the sink), even though nothing is acknowledged any
    // more: wait for it.
    drop(persist_tx);
    drop(persist_stash);
    let drain = async { while done_rx.recv().await.is_some() {} };
    if persister_done {
        drain.await;
    } else {
        tokio::join!(persister, drain);
    }
    // Give the writers a moment to flush the Error frame.
    if !writers_done {
        let _ = tokio::time::timeout(Duration::from_millis(200), writers).await;
    }
    if !closed.by_peer {
        warn!(code = ?closed.code, message = %closed.message, "sync link closed");
    }
    closed
}

/// Socket buffer size asked for QUIC endpoints (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`). 2,000 Initials arriving at once
/// take about 4.6 MB of a receive buffer (the kernel counts each
/// datagram's whole buffer): measured with `reconnect_storm`, a 4 MiB cap
/// dropped 2,500 datagrams of a 2,000-node storm and its last node came at
/// 9.3 s; with 16 MiB none was dropped and the last came at 3.5 s.
pub const UDP_BUFFER_BYTES: usize = 16 << 20;

/// A UDP socket for a quinn endpoint with large kernel buffers. With the
/// default (~208 KiB) a burst of handshakes — a reconnect storm — overflows
/// the receive buffer, the kernel drops Initial packets, and those
/// connections stall in QUIC's exponential retransmission backoff.
pub fn bind_udp(addr: std::net::SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        let _ = socket.set_only_v6(false);
    }
    // Best effort: a smaller buffer still works, only less well in storms.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// A client endpoint on [`bind_udp`].
pub fn client_endpoint(addr: std::net::SocketAddr) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        bind_udp(addr)?,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}

/// A server endpoint on [`bind_udp`]. With `reset_secret` kept across
/// restarts, the server's stateless-reset tokens stay the same, so a
/// stateless reset sent by a restarted server for an old connection is
/// one the edge accepts (quinn sends them only for packets large enough;
/// an idle edge's keep-alives are not, and it waits out the idle timeout).
pub fn server_endpoint(
    config: quinn::ServerConfig,
    addr: std::net::SocketAddr,
    reset_secret: Option<&[u8]>,
) -> std::io::Result<quinn::Endpoint> {
    let endpoint_config = match reset_secret {
        Some(secret) => {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
            // Connection IDs are keyed from the same secret: a restarted
            // server recognises the IDs its predecessor issued and answers
            // their packets with a stateless reset, so peers reconnect at
            // once instead of waiting out the idle timeout.
            let tag = ring::hmac::sign(&key, b"keel connection ids v1");
            let mut cid_key = [0u8; 8];
            for (d, s) in cid_key.iter_mut().zip(tag.as_ref()) {
                *d = *s;
            }
            let cid_key = u64::from_le_bytes(cid_key);
            let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(key));
            config.cid_generator(move || {
                Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
            });
            config
        }
        None => quinn::EndpointConfig::default(),
    };
    quinn::Endpoint::new(
        endpoint_config,
        Some(config),
        bind_udp(addr)?,
        std::sync::Arc::new(quinn::TokioRuntime),
    )
}
