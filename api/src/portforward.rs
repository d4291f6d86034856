//! `kubectl port-forward` over WebSocket, as current kubectl speaks it
//! (client-go's `tools/portforward` tunneling dialer): the connection is
//! upgraded with subprotocol [`PROTOCOL`], and the WebSocket's binary
//! messages then carry, in arbitrary chunks, a SPDY/3.1 connection
//! ([`crate::spdy`]) in which kubectl is the client. The same session also
//! runs on a raw SPDY connection ([`serve_spdy`]): the kubelet's API, where
//! the API server upgrades an HTTP/1.1 connection to `SPDY/3.1` with
//! `X-Stream-Protocol-Version:` [`SPDY_PROTOCOL`] and then relays
//! kubectl's SPDY bytes as they are. Only the transport differs
//! (`spdy::conn`).
//!
//! For each local connection kubectl opens two streams with headers
//! `streamtype` (`error`, then `data`), `port` and `requestid`, and waits
//! for a SYN_REPLY on each. It FINs the error stream at once and reads it
//! to the end: anything read there is shown as the forward's error. The
//! data stream carries the forwarded bytes both ways; when the pod's side
//! ends, the data stream is FINed (kubectl then resets it) and the error
//! stream is FINed empty.
//!
//! The session follows the kubelet's rules (`cri/streaming/portforward`):
//! streams are paired by `requestid` (missing: derived from the stream id,
//! as the kubelet does for old clients) in either order; a pair whose
//! second stream has not come after [`STREAM_CREATION_TIMEOUT`] fails
//! ("timed out waiting for streams"); a stream without a valid
//! `streamtype` is refused (RST_STREAM); a missing or invalid `port` is
//! reported on the error stream with the kubelet's words.
//!
//! Bounds: at most [`MAX_PAIRS`] forwards (pairs) per session, a stream
//! that would open one more is refused with RST_STREAM (REFUSED_STREAM);
//! client bytes wait in a queue of [`CLIENT_QUEUE`] chunks per forward, and
//! a full queue stops reading the connection (backpressure on the whole
//! session, as spdystream does); frames to the client wait in one queue of
//! [`WRITE_QUEUE`] frames; pod bytes go out in data frames of at most
//! [`MAX_CHUNK`] bytes. SPDY flow control is not used (spdystream sends no
//! WINDOW_UPDATE; they are ignored). A protocol error (bad frame, bad
//! compression, stream-id reuse) ends the session with GOAWAY.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{Instrument as _, debug, debug_span, info_span, warn};

use crate::spdy::conn::{self, Connection, End, Inbound, Outbound, Peer, fin};
use crate::spdy::{Frame, Headers};
use crate::status::Status;

/// The WebSocket subprotocol keel serves for port-forward.
pub const PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";
/// `X-Stream-Protocol-Version` of port-forward over plain SPDY.
pub const SPDY_PROTOCOL: &str = "portforward.k8s.io";
/// Largest WebSocket message accepted (kubectl writes a few bytes to 32 KiB).
pub const MAX_MESSAGE: usize = 1 << 20;
/// Most forwards (error + data stream pairs) open at once in one session.
pub const MAX_PAIRS: usize = 128;
/// How long the first stream of a pair waits for the second (the kubelet's
/// default stream creation timeout).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest data frame sent.
pub const MAX_CHUNK: usize = 32 * 1024;
/// Client chunks queued per forward before the session stops reading.
pub const CLIENT_QUEUE: usize = 16;
/// Frames queued for the connection's writer.
pub const WRITE_QUEUE: usize = 64;

const STREAM_TYPE: &str = "streamtype";
const PORT: &str = "port";
const REQUEST_ID: &str = "requestid";

/// One port-forward request: a connection to `port` of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardRequest {
    pub namespace: String,
    pub pod: String,
    pub port: u16,
}

impl ForwardRequest {
    pub fn to_json(&self) -> Value {
        json!({"op": "portforward", "namespace": self.namespace, "pod": self.pod,
            "port": self.port})
    }

    pub fn from_json(v: &Value) -> Result<ForwardRequest, Status> {
        if v.get("op").and_then(Value::as_str) != Some("portforward") {
            return Err(Status::bad_request("not a port-forward request"));
        }
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| Status::bad_request(format!("a port-forward needs a {k}")))
        };
        let port = v
            .get("port")
            .and_then(Value::as_u64)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| Status::bad_request("a port-forward needs a port in 1..65535"))?;
        Ok(ForwardRequest {
            namespace: s("namespace")?,
            pod: s("pod")?,
            port,
        })
    }
}

/// One forwarded connection: bytes to the pod's port (dropping `input` =
/// the client finished sending, a half-close) and bytes from it (`output`
/// ending = the pod's side closed).
#[derive(Debug)]
pub struct ForwardStreams {
    pub input: mpsc::Sender<Bytes>,
    pub output: mpsc::Receiver<Bytes>,
}

/// A pending [`PodPortForward::forward`] answer.
pub type ForwardFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<ForwardStreams, Status>> + Send + 'a>,
>;

/// `kubectl port-forward`: connections to a pod's ports.
pub trait PodPortForward: Send + Sync + 'static {
    /// Whether `pod` (a Pod object named `name`) can be reached at all
    /// (node connected); checked before the upgrade.
    fn check(&self, pod: &Value, name: &str) -> Result<(), Status>;
    /// Opens one connection to `req.port` of the pod.
    fn forward<'a>(&'a self, pod: &'a Value, req: &'a ForwardRequest) -> ForwardFuture<'a>;
}

/// Runs one port-forward session on an upgraded WebSocket connection
/// (already past the HTTP handshake, server role) until the client leaves:
/// SPDY over the WebSocket's binary messages.
pub async fn serve<IO>(
    io: IO,
    pod: Value,
    namespace: String,
    name: String,
    forwarder: Arc<dyn PodPortForward>,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span =
        info_span!("portforward", namespace = %namespace, pod = %name, transport = "websocket");
    async move {
        let transport = conn::websocket(io, MAX_MESSAGE).await;
        run(transport, pod, namespace, name, forwarder).await;
    }
    .instrument(span)
    .await
}

/// Runs one port-forward session on a raw SPDY connection (an upgraded
/// HTTP/1.1 connection, server role), as the API server opens it to a
/// kubelet; otherwise exactly like [`serve`].
pub async fn serve_spdy<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: IO,
    pod: Value,
    namespace: String,
    name: String,
    forwarder: Arc<dyn PodPortForward>,
) {
    let span = info_span!("portforward", namespace = %namespace, pod = %name, transport = "spdy");
    run(conn::raw(io), pod, namespace, name, forwarder)
        .instrument(span)
        .await
}

/// The session, whatever carries its bytes.
async fn run<IO: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    transport: (Inbound<IO>, Outbound<IO>),
    pod: Value,
    namespace: String,
    name: String,
    forwarder: Arc<dyn PodPortForward>,
) {
    let (mut connection, peer) = conn::start(transport, WRITE_QUEUE);
    let mut session = Session {
        pod: Arc::new(pod),
        namespace,
        name,
        forwarder,
        peer,
        streams: HashMap::new(),
        pairs: HashMap::new(),
        tasks: JoinSet::new(),
        serial: 0,
        pending: None,
    };
    let Err(end) = session.run(&mut connection).await;
    // Every forward stops (their connections to the pod close); the
    // client is told with a GOAWAY, then the connection closes.
    session.tasks.shutdown().await;
    session.peer.goaway(&end, "port-forward").await;
    drop(session);
    connection.finish().await;
    debug!("port-forward session ended");
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Error,
    Data,
}

/// One stream of a pair: its id and its `port` header.
struct Slot {
    id: u32,
    port: Option<String>,
}

/// The streams of one `requestid`, and its forward once both are there.
struct Pair {
    serial: u64,
    error: Option<Slot>,
    data: Option<Slot>,
    /// While waiting for the second stream.
    deadline: Option<Instant>,
    /// Client bytes of the data stream to the forward; `None` once the
    /// client FINed (or reset) the data stream, or the pod stopped reading.
    to_pod: Option<mpsc::Sender<Bytes>>,
    /// The queue's other end, until the forward starts.
    from_client: Option<mpsc::Receiver<Bytes>>,
    /// Tells the running forward that the client reset one of its streams.
    cancel: Option<oneshot::Sender<Kind>>,
    task: Option<tokio::task::Id>,
}

/// A client chunk waiting for room in its forward's queue.
struct Pending {
    to_pod: mpsc::Sender<Bytes>,
    data: Bytes,
    stream_id: u32,
    fin: bool,
}

struct Session {
    pod: Arc<Value>,
    namespace: String,
    name: String,
    forwarder: Arc<dyn PodPortForward>,
    peer: Peer,
    /// Open streams: their pair's request id and type.
    streams: HashMap<u32, (String, Kind)>,
    pairs: HashMap<String, Pair>,
    tasks: JoinSet<()>,
    serial: u64,
    pending: Option<Pending>,
}

impl Session {
    async fn run<IO>(&mut self, connection: &mut Connection<IO>) -> Result<Infallible, End>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        loop {
            // Every whole frame is handled before more is read, unless a
            // forward's queue is full: then nothing is read until it has room.
            conn::handle_frames(self).await?;
            let deadline = self.pairs.values().filter_map(|p| p.deadline).min();
            let far = Instant::now() + STREAM_CREATION_TIMEOUT;
            let pending = self.pending.as_ref().map(|p| p.to_pod.clone());
            tokio::select! {
                permit = async move {
                    match pending {
                        Some(tx) => tx.reserve_owned().await.ok(),
                        None => std::future::pending().await,
                    }
                }, if self.pending.is_some() => {
                    if let Some(p) = self.pending.take() {
                        match permit {
                            Some(permit) => {
                                permit.send(p.data);
                            }
                            None => self.pod_stopped_reading(p.stream_id),
                        }
                        if p.fin {
                            self.client_finished(p.stream_id);
                        }
                    }
                }
                incoming = connection.inbound().next(), if self.pending.is_none() => {
                    self.peer.receive(incoming)?;
                }
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    let id = match done {
                        Ok((id, ())) => id,
                        Err(e) => {
                            warn!(error = %e, "a port-forward task failed");
                            e.id()
                        }
                    };
                    self.reap(id);
                }
                () = tokio::time::sleep_until(deadline.unwrap_or(far)), if deadline.is_some() => {
                    self.expire().await?;
                }
                () = self.peer.out.closed() => return Err(End::WriterGone),
            }
        }
    }

    async fn send(&self, frame: Frame) -> Result<(), End> {
        self.peer.send(frame).await
    }

    /// Both streams are there: checks the ports and starts the forward.
    async fn start(&mut self, request: &str) -> Result<(), End> {
        let Some(pair) = self.pairs.get_mut(request) else {
            return Ok(());
        };
        let (Some(error), Some(data)) = (&pair.error, &pair.data) else {
            return Ok(());
        };
        let (error_id, data_id) = (error.id, data.id);
        pair.deadline = None;
        let port = parse_port(data.port.as_deref())
            .and_then(|port| parse_port(error.port.as_deref()).map(|_| port));
        let port = match port {
            Ok(port) => port,
            Err(message) => {
                debug!(request, message, "invalid port header");
                self.remove_pair(request);
                self.fail(error_id, Some(data_id), message).await?;
                return Ok(());
            }
        };
        let (cancel, cancelled) = oneshot::channel();
        pair.cancel = Some(cancel);
        let Some(from_client) = pair.from_client.take() else {
            return Ok(());
        };
        let forward = Forward {
            forwarder: Arc::clone(&self.forwarder),
            pod: Arc::clone(&self.pod),
            req: ForwardRequest {
                namespace: self.namespace.clone(),
                pod: self.name.clone(),
                port,
            },
            error_id,
            data_id,
            from_client,
            out: self.peer.out.clone(),
            cancelled,
        };
        let span = debug_span!("forward", request, port);
        let task = self.tasks.spawn(forward.run().instrument(span));
        pair.task = Some(task.id());
        Ok(())
    }

    /// Writes `message` on the error stream and FINs it (and `data_id`).
    async fn fail(&self, error_id: u32, data_id: Option<u32>, message: String) -> Result<(), End> {
        self.send(Frame::Data {
            stream_id: error_id,
            fin: true,
            data: Bytes::from(message),
        })
        .await?;
        if let Some(stream_id) = data_id {
            self.send(fin(stream_id)).await?;
        }
        Ok(())
    }

    /// The client FINed a stream: for the data stream, the pod's input ends.
    fn client_finished(&mut self, stream_id: u32) {
        if let Some((request, Kind::Data)) = self.streams.get(&stream_id)
            && let Some(pair) = self.pairs.get_mut(request)
        {
            pair.to_pod = None;
        }
    }

    fn pod_stopped_reading(&mut self, stream_id: u32) {
        self.client_finished(stream_id);
    }

    /// Pairs whose second stream did not come in time fail.
    async fn expire(&mut self) -> Result<(), End> {
        let now = Instant::now();
        let expired: Vec<String> = self
            .pairs
            .iter()
            .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
            .map(|(r, _)| r.clone())
            .collect();
        for request in expired {
            let Some(pair) = self.remove_pair(&request) else {
                continue;
            };
            debug!(request, "timed out waiting for streams");
            let data_id = pair.data.as_ref().map(|s| s.id);
            match pair.error.as_ref().map(|s| s.id) {
                Some(error_id) => {
                    let message = format!("request {request}: timed out waiting for streams");
                    self.fail(error_id, data_id, message).await?;
                }
                None => {
                    if let Some(data_id) = data_id {
                        self.send(fin(data_id)).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// A forward task ended: its pair goes.
    fn reap(&mut self, task: tokio::task::Id) {
        let request = self
            .pairs
            .iter()
            .find(|(_, p)| p.task == Some(task))
            .map(|(r, _)| r.clone());
        if let Some(request) = request {
            self.remove_pair(&request);
        }
    }

    fn remove_pair(&mut self, request: &str) -> Option<Pair> {
        let pair = self.pairs.remove(request)?;
        for slot in [&pair.error, &pair.data].into_iter().flatten() {
            if self
                .streams
                .get(&slot.id)
                .is_some_and(|(r, _)| r == request)
            {
                self.streams.remove(&slot.id);
            }
        }
        debug!(request, serial = pair.serial, "forward done");
        Some(pair)
    }
}

impl conn::Streams for Session {
    fn peer(&mut self) -> &mut Peer {
        &mut self.peer
    }

    fn reading(&self) -> bool {
        self.pending.is_none()
    }

    /// A SYN_STREAM: answered with a SYN_REPLY, or refused.
    async fn open(&mut self, stream_id: u32, fin: bool, headers: &Headers) -> Result<(), End> {
        let kind = match headers.get(STREAM_TYPE) {
            Some("error") => Kind::Error,
            Some("data") => Kind::Data,
            other => {
                debug!(stream_id, stream_type = ?other, "refusing a stream without a valid streamtype");
                return self.peer.refuse(stream_id).await;
            }
        };
        let request = match headers.get(REQUEST_ID) {
            Some(r) => r.to_owned(),
            // As the kubelet does for clients that send no request id.
            None => match kind {
                Kind::Error => stream_id.to_string(),
                Kind::Data => stream_id.saturating_sub(2).to_string(),
            },
        };
        if !self.pairs.contains_key(&request) {
            if self.pairs.len() >= MAX_PAIRS {
                debug!(stream_id, "refusing a stream: {MAX_PAIRS} forwards open");
                return self.peer.refuse(stream_id).await;
            }
            self.serial += 1;
            let (to_pod, from_client) = mpsc::channel(CLIENT_QUEUE);
            self.pairs.insert(
                request.clone(),
                Pair {
                    serial: self.serial,
                    error: None,
                    data: None,
                    deadline: Some(Instant::now() + STREAM_CREATION_TIMEOUT),
                    to_pod: Some(to_pod),
                    from_client: Some(from_client),
                    cancel: None,
                    task: None,
                },
            );
        }
        let Some(pair) = self.pairs.get_mut(&request) else {
            return Ok(());
        };
        let slot = match kind {
            Kind::Error => &mut pair.error,
            Kind::Data => &mut pair.data,
        };
        if slot.is_some() {
            debug!(
                stream_id,
                request,
                ?kind,
                "refusing a second stream of one type"
            );
            return self.peer.refuse(stream_id).await;
        }
        *slot = Some(Slot {
            id: stream_id,
            port: headers.get(PORT).map(str::to_owned),
        });
        let complete = pair.error.is_some() && pair.data.is_some();
        self.streams.insert(stream_id, (request.clone(), kind));
        self.peer.reply(stream_id).await?;
        if fin {
            self.client_finished(stream_id);
        }
        if complete {
            self.start(&request).await?;
        }
        Ok(())
    }

    /// Client bytes: the data stream's go to its forward; the error
    /// stream's (kubectl writes none) are dropped.
    async fn data(&mut self, stream_id: u32, fin: bool, data: Bytes) -> Result<(), End> {
        let Some((request, kind)) = self.streams.get(&stream_id) else {
            // A stream that ended (or never was): nothing to do.
            return Ok(());
        };
        if *kind == Kind::Data
            && !data.is_empty()
            && let Some(pair) = self.pairs.get_mut(request)
            && let Some(to_pod) = &pair.to_pod
        {
            match to_pod.try_send(data) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(data)) => {
                    self.pending = Some(Pending {
                        to_pod: to_pod.clone(),
                        data,
                        stream_id,
                        fin,
                    });
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => pair.to_pod = None,
            }
        }
        if fin {
            self.client_finished(stream_id);
        }
        Ok(())
    }

    /// RST_STREAM from the client: that forward ends.
    async fn reset(&mut self, stream_id: u32) -> Result<(), End> {
        let Some((request, kind)) = self.streams.remove(&stream_id) else {
            return Ok(());
        };
        let Some(pair) = self.pairs.get_mut(&request) else {
            return Ok(());
        };
        if kind == Kind::Data {
            pair.to_pod = None;
        }
        if pair.task.is_some() {
            // The forward FINs the other stream (kubectl, after resetting
            // the data stream, reads the error stream to its end).
            if let Some(cancel) = pair.cancel.take() {
                let _ = cancel.send(kind);
            }
            return Ok(());
        }
        // Still waiting for its other stream: the pair is given up.
        let other = match kind {
            Kind::Error => pair.data.as_ref().map(|s| s.id),
            Kind::Data => pair.error.as_ref().map(|s| s.id),
        };
        self.remove_pair(&request);
        if let Some(other) = other {
            self.send(fin(other)).await?;
        }
        Ok(())
    }
}

/// The kubelet's check of a `port` header (`strconv.ParseUint(s, 10, 16)`,
/// then > 0), with its messages.
fn parse_port(value: Option<&str>) -> Result<u16, String> {
    let Some(s) = value.filter(|s| !s.is_empty()) else {
        return Err(format!("{PORT:?} header is required"));
    };
    let error = |why: &str| {
        format!("unable to parse {s:?} as a port: strconv.ParseUint: parsing {s:?}: {why}")
    };
    if !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(error("invalid syntax"));
    }
    let port = s
        .parse::<u64>()
        .ok()
        .and_then(|p| u16::try_from(p).ok())
        .ok_or_else(|| error("value out of range"))?;
    if port == 0 {
        return Err(format!("port {s:?} must be > 0"));
    }
    Ok(port)
}

/// One running forward: opens the pod connection and relays until the pod
/// side ends or the client resets a stream.
struct Forward {
    forwarder: Arc<dyn PodPortForward>,
    pod: Arc<Value>,
    req: ForwardRequest,
    error_id: u32,
    data_id: u32,
    from_client: mpsc::Receiver<Bytes>,
    out: mpsc::Sender<Frame>,
    cancelled: oneshot::Receiver<Kind>,
}

impl Forward {
    async fn run(self) {
        let Forward {
            forwarder,
            pod,
            req,
            error_id,
            data_id,
            mut from_client,
            out,
            mut cancelled,
        } = self;
        let opened = tokio::select! {
            r = forwarder.forward(&pod, &req) => r,
            reset = &mut cancelled => {
                after_reset(&out, reset.ok(), error_id, data_id).await;
                return;
            }
        };
        let ForwardStreams { input, mut output } = match opened {
            Ok(streams) => streams,
            Err(status) => {
                debug!(message = %status.message, "forward failed");
                let _ = out
                    .send(Frame::Data {
                        stream_id: error_id,
                        fin: true,
                        data: Bytes::from(status.message),
                    })
                    .await;
                let _ = out.send(fin(data_id)).await;
                return;
            }
        };
        debug!("forwarding");
        // Client → pod until the client FINs (or the pod stops reading);
        // then the pod's input is dropped: a half-close.
        let upstream = async move {
            while let Some(chunk) = from_client.recv().await {
                if input.send(chunk).await.is_err() {
                    break;
                }
            }
            drop(input);
            drop(from_client);
            std::future::pending::<()>().await;
        };
        // Pod → client until the pod's side ends.
        let downstream = async {
            while let Some(mut chunk) = output.recv().await {
                while !chunk.is_empty() {
                    let part = chunk.split_to(chunk.len().min(MAX_CHUNK));
                    let frame = Frame::Data {
                        stream_id: data_id,
                        fin: false,
                        data: part,
                    };
                    if out.send(frame).await.is_err() {
                        return false;
                    }
                }
            }
            true
        };
        tokio::select! {
            () = upstream => {}
            open = downstream => {
                if open {
                    debug!("pod side closed");
                    let _ = out.send(fin(data_id)).await;
                    let _ = out.send(fin(error_id)).await;
                }
            }
            reset = &mut cancelled => after_reset(&out, reset.ok(), error_id, data_id).await,
        }
    }
}

/// The client reset one stream of a forward: the other is FINed (nothing
/// if the session is gone).
async fn after_reset(out: &mpsc::Sender<Frame>, reset: Option<Kind>, error_id: u32, data_id: u32) {
    let other = match reset {
        Some(Kind::Data) => error_id,
        Some(Kind::Error) => data_id,
        None => return,
    };
    let _ = out.send(fin(other)).await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use std::net::SocketAddr;
    use std::sync::Mutex;

    use futures::StreamExt as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::protocol::Role;

    use super::*;
    use crate::spdy;
    use crate::spdy::testing::{self, Rx, Tx};

    struct Client {
        tx: Tx,
        rx: Rx,
        server: tokio::task::JoinHandle<()>,
    }

    fn pod() -> Value {
        json!({"metadata": {"name": "web", "namespace": "ns"}})
    }

    /// A session over a WebSocket, as kubectl's tunnel.
    async fn start(forwarder: Arc<dyn PodPortForward>, wait: Option<Duration>) -> Client {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let server = tokio::spawn(serve(
            server_io,
            pod(),
            "ns".into(),
            "web".into(),
            forwarder,
        ));
        let ws = WebSocketStream::from_raw_socket(client_io, Role::Client, None).await;
        let (sink, stream) = ws.split();
        Client {
            tx: Tx::over_websocket(sink),
            rx: Rx::over_websocket(stream, wait),
            server,
        }
    }

    /// A session over a raw connection, as the API server's upgrade.
    fn start_raw(forwarder: Arc<dyn PodPortForward>, wait: Option<Duration>) -> Client {
        let (tx, rx, server_io) = testing::raw_pair(wait);
        let server = tokio::spawn(serve_spdy(
            server_io,
            pod(),
            "ns".into(),
            "web".into(),
            forwarder,
        ));
        Client { tx, rx, server }
    }

    const WAIT: Option<Duration> = Some(Duration::from_secs(10));

    /// A SYN_STREAM as kubectl sends it.
    fn open(stream_id: u32, kind: &str, port: Option<&str>, request: Option<&str>) -> Frame {
        let mut headers = Headers::new().with("streamtype", kind);
        if let Some(p) = port {
            headers = headers.with("port", p);
        }
        if let Some(r) = request {
            headers = headers.with("requestid", r);
        }
        testing::syn_stream(stream_id, headers)
    }

    fn data(stream_id: u32, bytes: &[u8]) -> Frame {
        Frame::Data {
            stream_id,
            fin: false,
            data: Bytes::copy_from_slice(bytes),
        }
    }

    /// Connects each forward to a TCP server (or fails with `fail`).
    struct TcpForwarder {
        addr: SocketAddr,
        fail: Option<String>,
        seen: Mutex<Vec<ForwardRequest>>,
    }

    impl TcpForwarder {
        fn new(addr: SocketAddr, fail: Option<&str>) -> Arc<TcpForwarder> {
            Arc::new(TcpForwarder {
                addr,
                fail: fail.map(str::to_owned),
                seen: Mutex::new(Vec::new()),
            })
        }

        fn seen(&self) -> Vec<ForwardRequest> {
            self.seen.lock().unwrap().clone()
        }
    }

    impl PodPortForward for TcpForwarder {
        fn check(&self, _pod: &Value, _name: &str) -> Result<(), Status> {
            Ok(())
        }

        fn forward<'a>(&'a self, pod: &'a Value, req: &'a ForwardRequest) -> ForwardFuture<'a> {
            Box::pin(async move {
                assert_eq!(pod["metadata"]["name"], "web");
                self.seen.lock().unwrap().push(req.clone());
                if let Some(m) = &self.fail {
                    return Err(Status::internal(m.clone()));
                }
                let tcp = TcpStream::connect(self.addr)
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?;
                let (mut rd, mut wr) = tcp.into_split();
                let (input, mut to_tcp) = mpsc::channel::<Bytes>(16);
                let (from_tcp, output) = mpsc::channel(16);
                tokio::spawn(async move {
                    while let Some(b) = to_tcp.recv().await {
                        if wr.write_all(&b).await.is_err() {
                            return;
                        }
                    }
                    let _ = wr.shutdown().await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0; 16 * 1024];
                    while let Ok(n @ 1..) = rd.read(&mut buf).await {
                        if from_tcp
                            .send(Bytes::copy_from_slice(&buf[..n]))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                });
                Ok(ForwardStreams { input, output })
            })
        }
    }

    /// A TCP echo server that closes its side after the client's EOF.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_bytes_both_ways_and_closes_as_the_kubelet_does() {
        let fwd = TcpForwarder::new(echo_server().await, None);
        let c = start(fwd.clone(), WAIT).await;
        forwards_bytes_both_ways(c, fwd).await;
    }

    #[tokio::test]
    async fn forwards_on_a_raw_spdy_connection_as_over_the_websocket() {
        let fwd = TcpForwarder::new(echo_server().await, None);
        let c = start_raw(fwd.clone(), WAIT);
        forwards_bytes_both_ways(c, fwd).await;
    }

    async fn forwards_bytes_both_ways(mut c: Client, fwd: Arc<TcpForwarder>) {
        // As kubectl: error stream, its FIN, then the data stream.
        c.tx.send(open(1, "error", Some("8080"), Some("0"))).await;
        c.rx.reply(1).await;
        c.tx.send(fin(1)).await;
        c.tx.send(open(3, "data", Some("8080"), Some("0"))).await;
        c.rx.reply(3).await;
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let send = async {
            for chunk in payload.chunks(32 * 1024) {
                c.tx.send(data(3, chunk)).await;
            }
            c.tx.send(fin(3)).await;
        };
        let ((), got) = tokio::join!(send, c.rx.until_fin(&[1, 3]));
        assert_eq!(got[&3], payload);
        assert!(got[&1].is_empty());
        assert_eq!(
            fwd.seen(),
            vec![ForwardRequest {
                namespace: "ns".into(),
                pod: "web".into(),
                port: 8080
            }]
        );
        // kubectl then resets the data stream; the session goes on.
        c.tx.send(Frame::RstStream {
            stream_id: 3,
            status: spdy::rst::CANCEL,
        })
        .await;
        c.tx.send(Frame::Ping { id: 1 }).await;
        assert_eq!(c.rx.frame().await, Some(Frame::Ping { id: 1 }));
        // SETTINGS and WINDOW_UPDATE are ignored.
        c.tx.send(Frame::Settings {
            clear: false,
            settings: vec![],
        })
        .await;
        c.tx.send(Frame::WindowUpdate {
            stream_id: 0,
            delta: 1000,
        })
        .await;
        // A second connection on the same session.
        c.tx.send(open(5, "error", Some("9090"), Some("1"))).await;
        c.rx.reply(5).await;
        c.tx.send(fin(5)).await;
        c.tx.send(open(7, "data", Some("9090"), Some("1"))).await;
        c.rx.reply(7).await;
        c.tx.send(data(7, b"again")).await;
        c.tx.send(fin(7)).await;
        let got = c.rx.until_fin(&[5, 7]).await;
        assert_eq!(got[&7], b"again");
        assert_eq!(fwd.seen().len(), 2);
        // GOAWAY ends the session: answered with GOAWAY, then the close.
        c.tx.send(Frame::GoAway {
            last_good_stream_id: 0,
            status: spdy::goaway::OK,
        })
        .await;
        testing::ends_with_goaway(c.tx, c.rx, c.server, 7, spdy::goaway::OK).await;
    }

    #[tokio::test]
    async fn a_failed_forward_is_reported_on_the_error_stream() {
        let message = "pod web: node n1 is not connected";
        let fwd = TcpForwarder::new(echo_server().await, Some(message));
        let mut c = start(fwd.clone(), WAIT).await;
        c.tx.send(open(1, "error", Some("80"), Some("0"))).await;
        c.rx.reply(1).await;
        c.tx.send(fin(1)).await;
        c.tx.send(open(3, "data", Some("80"), Some("0"))).await;
        c.rx.reply(3).await;
        let got = c.rx.until_fin(&[1, 3]).await;
        assert_eq!(got[&1], message.as_bytes());
        assert!(got[&3].is_empty());
        assert_eq!(fwd.seen().len(), 1);
        // The client leaving ends the session.
        drop(c.tx);
        drop(c.rx);
        testing::ended(c.server).await;
    }

    #[tokio::test]
    async fn bad_port_headers_are_reported_as_the_kubelet_does() {
        let fwd = TcpForwarder::new(echo_server().await, None);
        let mut c = start(fwd.clone(), WAIT).await;
        let cases = [
            (
                Some("abc"),
                r#"unable to parse "abc" as a port: strconv.ParseUint: parsing "abc": invalid syntax"#,
            ),
            (None, r#""port" header is required"#),
            (Some("0"), r#"port "0" must be > 0"#),
            (
                Some("+80"),
                r#"unable to parse "+80" as a port: strconv.ParseUint: parsing "+80": invalid syntax"#,
            ),
            (
                Some("70000"),
                r#"unable to parse "70000" as a port: strconv.ParseUint: parsing "70000": value out of range"#,
            ),
        ];
        for (i, (port, message)) in cases.into_iter().enumerate() {
            let (e, d, request) = (4 * i as u32 + 1, 4 * i as u32 + 3, i.to_string());
            c.tx.send(open(e, "error", port, Some(&request))).await;
            c.rx.reply(e).await;
            c.tx.send(open(d, "data", port, Some(&request))).await;
            c.rx.reply(d).await;
            let got = c.rx.until_fin(&[e, d]).await;
            assert_eq!(String::from_utf8_lossy(&got[&e]), message);
            assert!(got[&d].is_empty());
        }
        assert!(fwd.seen().is_empty());
    }

    #[tokio::test]
    async fn streams_pair_in_either_order_and_bad_ones_are_refused() {
        let fwd = TcpForwarder::new(echo_server().await, None);
        let mut c = start(fwd.clone(), WAIT).await;
        // Data first.
        c.tx.send(open(1, "data", Some("80"), Some("x"))).await;
        c.rx.reply(1).await;
        c.tx.send(data(1, b"early ")).await;
        // No or an unknown stream type: refused.
        c.tx.send(open(3, "stdin", Some("80"), Some("x"))).await;
        c.tx.send(open(5, "", Some("80"), Some("y"))).await;
        for stream_id in [3, 5] {
            assert_eq!(
                c.rx.frame().await,
                Some(Frame::RstStream {
                    stream_id,
                    status: spdy::rst::REFUSED_STREAM
                })
            );
        }
        c.tx.send(open(7, "error", Some("80"), Some("x"))).await;
        c.rx.reply(7).await;
        // A second error stream for the same request: refused.
        c.tx.send(open(9, "error", Some("80"), Some("x"))).await;
        assert_eq!(
            c.rx.frame().await,
            Some(Frame::RstStream {
                stream_id: 9,
                status: spdy::rst::REFUSED_STREAM
            })
        );
        c.tx.send(data(1, b"late")).await;
        c.tx.send(fin(1)).await;
        let got = c.rx.until_fin(&[1, 7]).await;
        assert_eq!(got[&1], b"early late");
        // Without request ids, the kubelet's fallback: error stream id, data
        // stream id - 2.
        c.tx.send(open(11, "error", Some("81"), None)).await;
        c.rx.reply(11).await;
        c.tx.send(open(13, "data", Some("81"), None)).await;
        c.rx.reply(13).await;
        c.tx.send(Frame::Data {
            stream_id: 13,
            fin: true,
            data: Bytes::from_static(b"bye"),
        })
        .await;
        let got = c.rx.until_fin(&[11, 13]).await;
        assert_eq!(got[&13], b"bye");
        let ports: Vec<u16> = fwd.seen().iter().map(|r| r.port).collect();
        assert_eq!(ports, vec![80, 81]);
    }

    #[tokio::test]
    async fn a_reset_data_stream_ends_the_forward_and_fins_the_error_stream() {
        let fwd = TcpForwarder::new(echo_server().await, None);
        let mut c = start(fwd, WAIT).await;
        c.tx.send(open(1, "error", Some("80"), Some("0"))).await;
        c.rx.reply(1).await;
        c.tx.send(fin(1)).await;
        c.tx.send(open(3, "data", Some("80"), Some("0"))).await;
        c.rx.reply(3).await;
        c.tx.send(data(3, b"hi")).await;
        assert_eq!(c.rx.frame().await, Some(data(3, b"hi")));
        // kubectl's local side failed: it resets the data stream, then reads
        // the error stream to its end.
        c.tx.send(Frame::RstStream {
            stream_id: 3,
            status: spdy::rst::CANCEL,
        })
        .await;
        assert_eq!(c.rx.frame().await, Some(fin(1)));
        c.tx.send(Frame::Ping { id: 3 }).await;
        assert_eq!(c.rx.frame().await, Some(Frame::Ping { id: 3 }));
    }

    #[tokio::test]
    async fn protocol_errors_end_the_session_with_goaway() {
        let addr = echo_server().await;
        let goaway = |last_good_stream_id| {
            Some(Frame::GoAway {
                last_good_stream_id,
                status: spdy::goaway::PROTOCOL_ERROR,
            })
        };
        // A stream id used twice.
        let mut c = start(TcpForwarder::new(addr, None), WAIT).await;
        c.tx.send(open(1, "error", Some("80"), Some("0"))).await;
        c.rx.reply(1).await;
        c.tx.send(open(1, "data", Some("80"), Some("0"))).await;
        assert_eq!(c.rx.frame().await, goaway(1));
        assert_eq!(c.rx.frame().await, None);
        c.server.await.unwrap();
        // An even (server-side) stream id.
        let mut c = start(TcpForwarder::new(addr, None), WAIT).await;
        c.tx.send(open(2, "error", Some("80"), Some("0"))).await;
        assert_eq!(c.rx.frame().await, goaway(0));
        c.server.await.unwrap();
        // SPDY/2, and garbage.
        for bytes in [&[0x80, 0x02, 0, 1, 0, 0, 0, 0][..], &[0xff; 64][..]] {
            let mut c = start(TcpForwarder::new(addr, None), WAIT).await;
            c.tx.raw(bytes).await;
            assert_eq!(c.rx.frame().await, goaway(0));
            assert_eq!(c.rx.frame().await, None);
            c.server.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_raw_connection_ends_with_goaway_and_waits_for_the_client_to_close() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut c = start_raw(TcpForwarder::new(addr, None), WAIT);
        c.tx.raw(&[0xff; 64]).await;
        assert_eq!(
            c.rx.frame().await,
            Some(Frame::GoAway {
                last_good_stream_id: 0,
                status: spdy::goaway::PROTOCOL_ERROR,
            })
        );
        // Our side is shut down; the session waits for the client's.
        assert_eq!(c.rx.frame().await, None);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!c.server.is_finished());
        c.tx.close().await;
        testing::ended(c.server).await;
        // A client that never closes is not waited for long.
        let mut c = start_raw(TcpForwarder::new(addr, None), WAIT);
        c.tx.raw(&[0x80, 0x02, 0, 1, 0, 0, 0, 0]).await;
        assert!(matches!(c.rx.frame().await, Some(Frame::GoAway { .. })));
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), c.server)
            .await
            .unwrap()
            .unwrap();
        assert!(started.elapsed() >= conn::CLOSE_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lone_stream_times_out() {
        let fwd = TcpForwarder::new("127.0.0.1:9".parse().unwrap(), None);
        let mut c = start(fwd.clone(), None).await;
        c.tx.send(open(1, "error", Some("80"), Some("0"))).await;
        c.rx.reply(1).await;
        c.tx.send(fin(1)).await;
        let started = Instant::now();
        let got = c.rx.until_fin(&[1]).await;
        assert!(started.elapsed() >= STREAM_CREATION_TIMEOUT);
        assert_eq!(got[&1], b"request 0: timed out waiting for streams");
        // Its data stream coming later is a new, lone pair.
        c.tx.send(open(3, "data", Some("80"), Some("0"))).await;
        c.rx.reply(3).await;
        assert_eq!(c.rx.until_fin(&[3]).await[&3], b"");
        assert!(fwd.seen().is_empty());
    }

    #[tokio::test]
    async fn forwards_are_capped_per_session() {
        let fwd = TcpForwarder::new(echo_server().await, None);
        let mut c = start(fwd, WAIT).await;
        for i in 0..MAX_PAIRS as u32 {
            c.tx.send(open(2 * i + 1, "error", Some("80"), Some(&i.to_string())))
                .await;
            c.rx.reply(2 * i + 1).await;
        }
        let next = 2 * MAX_PAIRS as u32 + 1;
        c.tx.send(open(next, "error", Some("80"), Some("new")))
            .await;
        assert_eq!(
            c.rx.frame().await,
            Some(Frame::RstStream {
                stream_id: next,
                status: spdy::rst::REFUSED_STREAM
            })
        );
        // The second stream of an open pair is still welcome.
        c.tx.send(open(next + 2, "data", Some("80"), Some("0")))
            .await;
        c.rx.reply(next + 2).await;
        c.tx.send(fin(next + 2)).await;
        let got = c.rx.until_fin(&[1, next + 2]).await;
        assert!(got[&1].is_empty());
    }

    /// Hands each forward's pod ends to the test.
    struct ChannelForwarder {
        pods: mpsc::Sender<(mpsc::Receiver<Bytes>, mpsc::Sender<Bytes>)>,
    }

    impl PodPortForward for ChannelForwarder {
        fn check(&self, _pod: &Value, _name: &str) -> Result<(), Status> {
            Ok(())
        }

        fn forward<'a>(&'a self, _pod: &'a Value, _req: &'a ForwardRequest) -> ForwardFuture<'a> {
            Box::pin(async move {
                let (input, pod_in) = mpsc::channel(4);
                let (pod_out, output) = mpsc::channel(4);
                self.pods
                    .send((pod_in, pod_out))
                    .await
                    .map_err(|_| Status::internal("test over"))?;
                Ok(ForwardStreams { input, output })
            })
        }
    }

    #[tokio::test]
    async fn a_pod_that_does_not_read_stops_the_session_reading() {
        let (pods, mut opened) = mpsc::channel(1);
        let mut c = start(Arc::new(ChannelForwarder { pods }), WAIT).await;
        c.tx.send(open(1, "error", Some("80"), Some("0"))).await;
        c.rx.reply(1).await;
        c.tx.send(open(3, "data", Some("80"), Some("0"))).await;
        c.rx.reply(3).await;
        let (mut pod_in, pod_out) = opened.recv().await.unwrap();
        // 400 KiB: far more than the queues and the 64 KiB pipe hold.
        let mut tx = c.tx;
        let sender = tokio::spawn(async move {
            for i in 0..400u32 {
                tx.send(data(3, &[(i % 256) as u8; 1024])).await;
            }
            tx.send(fin(3)).await;
            tx
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!sender.is_finished(), "nothing pushed back");
        // The pod reads: everything arrives, in order, then the half-close.
        let mut got = Vec::new();
        while let Some(chunk) = pod_in.recv().await {
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got.len(), 400 * 1024);
        assert!(
            got.chunks(1024)
                .enumerate()
                .all(|(i, c)| c.iter().all(|b| *b == (i % 256) as u8))
        );
        let _tx = sender.await.unwrap();
        // The pod's side answers and closes.
        pod_out.send(Bytes::from_static(b"done")).await.unwrap();
        drop(pod_out);
        let got = c.rx.until_fin(&[1, 3]).await;
        assert_eq!(got[&3], b"done");
    }

    #[test]
    fn requests_round_trip_through_json() {
        let r = ForwardRequest {
            namespace: "ns".into(),
            pod: "web".into(),
            port: 8080,
        };
        assert_eq!(
            r.to_json(),
            json!({"op": "portforward", "namespace": "ns", "pod": "web", "port": 8080})
        );
        assert_eq!(ForwardRequest::from_json(&r.to_json()).unwrap(), r);
        for bad in [
            json!({"op": "exec", "namespace": "ns", "pod": "web", "port": 8080}),
            json!({"op": "portforward", "pod": "web", "port": 8080}),
            json!({"op": "portforward", "namespace": "ns", "port": 8080}),
            json!({"op": "portforward", "namespace": "ns", "pod": "web"}),
            json!({"op": "portforward", "namespace": "ns", "pod": "web", "port": 0}),
            json!({"op": "portforward", "namespace": "ns", "pod": "web", "port": 65536}),
            json!({"op": "portforward", "namespace": "ns", "pod": "web", "port": "80"}),
        ] {
            assert_eq!(
                ForwardRequest::from_json(&bad).unwrap_err().code,
                400,
                "{bad}"
            );
        }
        assert_eq!(parse_port(Some("65535")), Ok(65535));
        assert!(parse_port(Some("99999999999999999999999")).is_err());
        assert!(parse_port(Some(" 80")).is_err());
    }
}
