//! The kubelet's side of `exec` and `attach` over SPDY (remotecommand), as
//! the API server calls it: for a kubectl WebSocket it translates to SPDY
//! (`StreamTranslatorHandler`, client-go's SPDY executor), and an old
//! kubectl's own SPDY connection is relayed as it is. The HTTP/1.1 upgrade
//! to `SPDY/3.1` names the stream protocol ([`negotiate`]); then the client
//! opens one SPDY stream per channel, told apart by their `streamtype`
//! header, in this order, each waiting for its SYN_REPLY:
//!
//! - `error`: always; the server writes the outcome there, then FINs it;
//! - `stdin` if the request has `input=1`; its FIN ends the command's stdin;
//! - `stdout` if `output=1`;
//! - `stderr` if `error=1` and not `tty=1` (a terminal has one output);
//! - `resize` if `tty=1` and the protocol is v3 or later: terminal sizes,
//!   one JSON object after another (`{"Width":80,"Height":24}`).
//!
//! The session bridges these streams to an exec's v5 channel messages
//! ([`crate::exec`]): stdin data becomes STDIN messages (at most
//! [`MAX_CHUNK`] bytes each) and its FIN the `[255, 0]` close, sizes become
//! RESIZE messages; STDOUT and STDERR messages become data on those
//! streams, and the final ERROR message (a `Status`) ends the session. On
//! the error stream, v4 (and v5, which over SPDY is v4) carries that
//! `Status` as JSON (the exit code in `details.causes`, reason `ExitCode`,
//! which client-go turns into the exit code); v1–v3 carry only a failure,
//! as its message in plain text, and nothing on success. Then every stream
//! is FINed and the session ends with GOAWAY.
//!
//! The kubelet's rules (`k8s.io/cri-streaming`, remotecommand/httpstream.go):
//! it serves [`PROTOCOLS`], the client's first supported choice wins; every
//! SYN_STREAM is answered at once with a SYN_REPLY; the streams must all be
//! there within [`STREAM_CREATION_TIMEOUT`] ("timed out waiting for client
//! to create streams": the session ends); under v1 the server FINs stdin
//! once the streams are there; a connection silent both ways for
//! [`IDLE_TIMEOUT`] ends (the API server pings every 5 s). Unlike the
//! kubelet, streams of an unknown or unexpected type are answered but not
//! used, streams opened after the set is complete are refused
//! (RST_STREAM), and under v1 the error stream is not reset (the kubelet
//! resets it, so a v1 client never sees an error).
//!
//! When the client goes away (connection closed or GOAWAY), the exec's
//! input is dropped and its output no longer read: that ends the exec's
//! session on the edge. Bounds: frames to the client wait in one queue of
//! [`WRITE_QUEUE`] frames; client bytes are handed to the exec's bounded
//! input queue as they are read (a full queue stops reading the
//! connection); at most [`MAX_STREAMS`] streams per session; a resize
//! stream's unparsed bytes are at most [`MAX_RESIZE_BUFFER`]. A protocol
//! error (bad frame, bad compression, stream-id reuse) ends the session
//! with GOAWAY. SPDY flow control is not used (as spdystream).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Buf as _, Bytes, BytesMut};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{Instrument as _, debug, info_span};

use crate::exec::{self, ExecRequest, ExecStreams};
use crate::spdy::conn::{self, End, Peer, fin};
use crate::spdy::{Frame, Headers};

/// `X-Stream-Protocol-Version` values.
pub const V1: &str = "channel.k8s.io";
pub const V2: &str = "v2.channel.k8s.io";
pub const V3: &str = "v3.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";
/// Offered by client-go (first) but not served over SPDY by the kubelet,
/// nor by keel: over SPDY it would mean exactly v4.
pub const V5: &str = "v5.channel.k8s.io";

/// Stream protocols served over SPDY, best first (`X-Stream-Protocol-Version`):
/// the kubelet's (`SupportedStreamingProtocols`).
pub const PROTOCOLS: &[&str] = &[V4, V3, V2, V1];
/// How long the client has to open its streams (the kubelet's default).
pub const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a session may go without a frame either way (the kubelet's
/// default stream idle timeout).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60 * 60);
/// Largest data frame sent, and largest STDIN message made.
pub const MAX_CHUNK: usize = 32 * 1024;
/// Frames queued for the connection's writer.
pub const WRITE_QUEUE: usize = 64;
/// Most streams a client may open in one session (it needs at most five).
pub const MAX_STREAMS: usize = 16;
/// Most bytes of a resize stream kept while waiting for a whole JSON value.
pub const MAX_RESIZE_BUFFER: usize = 4 * 1024;

const STREAM_TYPE: &str = "streamtype";

/// The protocol to answer for a request offering `offered` (the header's
/// values, possibly comma-separated in one header or repeated): the
/// client's first choice that is served, as the kubelet negotiates. `None`
/// when there is none; then the kubelet answers 400 if no protocol was
/// offered at all ("unable to upgrade: header X-Stream-Protocol-Version
/// ..."), and otherwise 403 ("unable to upgrade: unable to negotiate
/// protocol: client supports [...], server accepts [...]") with
/// `X-Accepted-Stream-Protocol-Versions` naming each of [`PROTOCOLS`].
pub fn negotiate<'a>(offered: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    offered
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|p| p.trim_matches(' '))
        .filter(|p| !p.is_empty())
        .find_map(|p| PROTOCOLS.iter().copied().find(|s| *s == p))
}

/// How the error stream is written, and which streams exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Version {
    V1,
    V2,
    V3,
    V4,
}

impl Version {
    fn of(protocol: &str) -> Version {
        match protocol {
            V4 | V5 => Version::V4,
            V3 => Version::V3,
            V2 => Version::V2,
            // As the kubelet does when none was negotiated.
            _ => Version::V1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Error,
    Stdin,
    Stdout,
    Stderr,
    Resize,
}

impl Kind {
    fn of(streamtype: Option<&str>) -> Option<Kind> {
        Some(match streamtype? {
            "error" => Kind::Error,
            "stdin" => Kind::Stdin,
            "stdout" => Kind::Stdout,
            "stderr" => Kind::Stderr,
            "resize" => Kind::Resize,
            _ => return None,
        })
    }
}

/// The session's streams by kind: which are wanted, then their ids.
#[derive(Debug, Clone, Copy, Default)]
struct Ids {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl Ids {
    fn slot(&mut self, kind: Kind) -> &mut Option<u32> {
        match kind {
            Kind::Error => &mut self.error,
            Kind::Stdin => &mut self.stdin,
            Kind::Stdout => &mut self.stdout,
            Kind::Stderr => &mut self.stderr,
            Kind::Resize => &mut self.resize,
        }
    }

    fn kind_of(&self, stream_id: u32) -> Option<Kind> {
        [
            (self.error, Kind::Error),
            (self.stdin, Kind::Stdin),
            (self.stdout, Kind::Stdout),
            (self.stderr, Kind::Stderr),
            (self.resize, Kind::Resize),
        ]
        .into_iter()
        .find(|(id, _)| *id == Some(stream_id))
        .map(|(_, k)| k)
    }
}

/// The streams the client opens for `req` under `version`.
fn wanted(req: &ExecRequest, version: Version) -> Vec<Kind> {
    let mut kinds = vec![Kind::Error];
    if req.stdin {
        kinds.push(Kind::Stdin);
    }
    if req.stdout {
        kinds.push(Kind::Stdout);
    }
    if req.stderr && !req.tty {
        kinds.push(Kind::Stderr);
    }
    if req.tty && version >= Version::V3 {
        kinds.push(Kind::Resize);
    }
    kinds
}

/// Runs an exec or attach session on a raw SPDY connection (server role,
/// after the 101 answer naming `protocol`): waits for the streams the
/// client opens for `req`, then bridges them to `streams` until the exec's
/// final status (or its output's end) or until the client goes away; see
/// the module documentation.
pub async fn serve_spdy<IO>(io: IO, protocol: &'static str, req: ExecRequest, streams: ExecStreams)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = info_span!("remotecommand", op = req.op(), namespace = %req.namespace,
        pod = %req.pod, container = req.container.as_deref().unwrap_or(""), protocol);
    async move {
        let version = Version::of(protocol);
        let (mut connection, peer) = conn::start(conn::raw(io), WRITE_QUEUE);
        let activity = Activity::new();
        let ExecStreams { input, output } = streams;
        let (ready, setup) = oneshot::channel();
        let downstream = Downstream {
            version,
            out: peer.out.clone(),
            activity: activity.clone(),
        };
        let mut upstream = Upstream {
            version,
            wanted: wanted(&req, version),
            peer,
            opened: 0,
            ids: Ids::default(),
            extra: Vec::new(),
            ready: Some(ready),
            input: Some(input),
            stdin_closed: false,
            resize: Some(BytesMut::new()),
            activity: activity.clone(),
        };
        let end = tokio::select! {
            end = conn::serve(&mut upstream, &mut connection) => end,
            end = downstream.run(setup, output) => end,
            () = activity.idle() => End::Idle,
        };
        // The exec's output went with the future that read it; its input
        // goes now: that ends the exec's session on the edge.
        upstream.input = None;
        upstream.peer.goaway(&end, "remotecommand").await;
        drop((upstream, downstream));
        connection.finish().await;
        debug!("remotecommand session ended");
    }
    .instrument(span)
    .await
}

/// When a frame last went either way, for the idle timeout.
#[derive(Debug, Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing happened for [`IDLE_TIMEOUT`].
    async fn idle(&self) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + IDLE_TIMEOUT;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

/// The client's side: streams opened, stdin and resize data to the exec.
struct Upstream {
    version: Version,
    wanted: Vec<Kind>,
    peer: Peer,
    opened: usize,
    ids: Ids,
    /// Streams answered but not used (unknown type, or one too many).
    extra: Vec<u32>,
    /// Hands the streams to [`Downstream`] once all are there.
    ready: Option<oneshot::Sender<Ready>>,
    /// `None` once the exec stopped reading.
    input: Option<mpsc::Sender<Bytes>>,
    stdin_closed: bool,
    /// Resize bytes not yet a whole JSON value; `None` after a bad one.
    resize: Option<BytesMut>,
    activity: Activity,
}

/// What [`Downstream`] needs once the streams are there.
#[derive(Debug)]
struct Ready {
    ids: Ids,
    /// Every stream to FIN at the end, the error stream last.
    to_fin: Vec<u32>,
}

impl Upstream {
    /// Hands a message to the exec (waiting for room: meanwhile the
    /// connection is not read), unless it stopped reading.
    async fn pass_on(&mut self, message: Bytes) {
        if let Some(input) = &self.input
            && input.send(message).await.is_err()
        {
            debug!("the exec stopped reading its input");
            self.input = None;
        }
    }

    async fn close_stdin(&mut self) {
        if !self.stdin_closed {
            self.stdin_closed = true;
            self.pass_on(exec::message(exec::CLOSE, &[exec::STDIN]))
                .await;
        }
    }

    /// Terminal sizes: JSON objects one after another, each passed on as
    /// a RESIZE message `{"Width":..,"Height":..}`. Like Go's decoder into
    /// the kubelet's `TerminalSize`: names match in any case, other fields
    /// are ignored, and a bad value ends resizing (not the session).
    async fn resize(&mut self, data: &[u8]) {
        let Some(buf) = &mut self.resize else {
            return;
        };
        buf.extend_from_slice(data);
        let mut sizes = Vec::new();
        let mut failed = None;
        let mut values = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
        for value in values.by_ref() {
            match value {
                Ok(v) => match terminal_size(&v) {
                    Some(size) => sizes.push(size),
                    None => {
                        failed = Some(format!("not a terminal size: {v}"));
                        break;
                    }
                },
                Err(e) if e.is_eof() => break,
                Err(e) => {
                    failed = Some(e.to_string());
                    break;
                }
            }
        }
        let used = values.byte_offset();
        buf.advance(used.min(buf.len()));
        if failed.is_none() && buf.len() > MAX_RESIZE_BUFFER {
            failed = Some(format!(
                "over {MAX_RESIZE_BUFFER} bytes without a whole value"
            ));
        }
        if let Some(why) = failed {
            debug!(why, "resize stream: stopped reading sizes");
            self.resize = None;
        }
        for (width, height) in sizes {
            let size = json!({"Width": width, "Height": height}).to_string();
            self.pass_on(exec::message(exec::RESIZE, size.as_bytes()))
                .await;
        }
    }
}

impl conn::Streams for Upstream {
    fn peer(&mut self) -> &mut Peer {
        &mut self.peer
    }

    fn received(&mut self) {
        self.activity.touch();
    }

    /// A SYN_STREAM: answered with a SYN_REPLY while the streams are being
    /// set up, refused after.
    async fn open(&mut self, stream_id: u32, syn_fin: bool, headers: &Headers) -> Result<(), End> {
        if self.ready.is_none() || self.opened >= MAX_STREAMS {
            debug!(
                stream_id,
                "refusing a stream: the session's streams are set up"
            );
            return self.peer.refuse(stream_id).await;
        }
        self.opened += 1;
        let streamtype = headers.get(STREAM_TYPE);
        let kind = Kind::of(streamtype).filter(|k| self.wanted.contains(k));
        match kind {
            Some(kind) if self.ids.slot(kind).is_none() => {
                *self.ids.slot(kind) = Some(stream_id);
            }
            _ => {
                debug!(stream_id, ?streamtype, "a stream this session does not use");
                self.extra.push(stream_id);
            }
        }
        self.peer.reply(stream_id).await?;
        if syn_fin && self.ids.stdin == Some(stream_id) {
            self.close_stdin().await;
        }
        let mut ids = self.ids;
        if self.wanted.iter().all(|k| ids.slot(*k).is_some())
            && let Some(ready) = self.ready.take()
        {
            debug!(?ids, "streams set up");
            let mut to_fin: Vec<u32> = [ids.stdout, ids.stderr, ids.resize]
                .into_iter()
                .flatten()
                .chain(self.extra.iter().copied())
                .collect();
            match (self.version, ids.stdin) {
                // As the kubelet: v1 closes stdin (our side) at once.
                (Version::V1, Some(stdin)) => self.peer.send(fin(stdin)).await?,
                (_, Some(stdin)) => to_fin.push(stdin),
                (_, None) => {}
            }
            to_fin.extend(ids.error);
            // Gone only if the session is ending anyway.
            let _ = ready.send(Ready { ids, to_fin });
        }
        Ok(())
    }

    async fn data(&mut self, stream_id: u32, fin: bool, mut data: Bytes) -> Result<(), End> {
        match self.ids.kind_of(stream_id) {
            Some(Kind::Stdin) if !self.stdin_closed => {
                while !data.is_empty() {
                    let part = data.split_to(data.len().min(MAX_CHUNK));
                    self.pass_on(exec::message(exec::STDIN, &part)).await;
                }
                if fin {
                    self.close_stdin().await;
                }
            }
            Some(Kind::Resize) => self.resize(&data).await,
            // Nothing is read from the other streams.
            _ => {}
        }
        Ok(())
    }

    async fn reset(&mut self, stream_id: u32) -> Result<(), End> {
        if self.ids.stdin == Some(stream_id) {
            self.close_stdin().await;
        }
        Ok(())
    }
}

/// Go's `json.Decoder` into `struct { Width, Height uint16 }`: an object
/// (or null), field names in any case, missing ones 0, others ignored.
fn terminal_size(v: &Value) -> Option<(u16, u16)> {
    let fields = match v {
        Value::Object(fields) => fields,
        Value::Null => return Some((0, 0)),
        _ => return None,
    };
    let field = |name: &str| -> Option<u16> {
        // Go takes the last of several matching keys.
        match fields
            .iter()
            .rev()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
        {
            None | Some((_, Value::Null)) => Some(0),
            Some((_, v)) => v.as_u64().and_then(|n| u16::try_from(n).ok()),
        }
    };
    Some((field("width")?, field("height")?))
}

/// The exec's side: its output to the client's streams, then the outcome.
struct Downstream {
    version: Version,
    out: mpsc::Sender<Frame>,
    activity: Activity,
}

impl Downstream {
    async fn run(&self, setup: oneshot::Receiver<Ready>, mut output: mpsc::Receiver<Bytes>) -> End {
        let ready = match tokio::time::timeout(STREAM_CREATION_TIMEOUT, setup).await {
            Ok(Ok(ready)) => ready,
            Ok(Err(_)) => return End::Client,
            Err(_) => return End::Timeout,
        };
        let Ready { ids, to_fin } = ready;
        let mut status = None;
        while let Some(mut message) = output.recv().await {
            self.activity.touch();
            if message.is_empty() {
                continue;
            }
            let channel = message.split_to(1);
            let stream_id = match channel.first().copied() {
                Some(exec::STDOUT) => ids.stdout,
                Some(exec::STDERR) => ids.stderr,
                Some(exec::ERROR) => {
                    status = Some(message);
                    break;
                }
                _ => None,
            };
            let Some(stream_id) = stream_id else {
                continue;
            };
            while !message.is_empty() {
                let data = message.split_to(message.len().min(MAX_CHUNK));
                if self.send(stream_id, false, data).await.is_err() {
                    return End::WriterGone;
                }
            }
        }
        drop(output);
        let status = status.unwrap_or_else(|| {
            debug!("the exec ended without a status");
            Bytes::from(
                json!({"metadata": {}, "status": "Failure",
                    "message": "Internal error occurred: the exec ended without a status",
                    "reason": "InternalError", "code": 500})
                .to_string(),
            )
        });
        let report = error_stream_payload(self.version, status);
        if let Some(error) = ids.error
            && !report.is_empty()
            && self.send(error, false, report).await.is_err()
        {
            return End::WriterGone;
        }
        for stream_id in to_fin {
            if self.send(stream_id, true, Bytes::new()).await.is_err() {
                return End::WriterGone;
            }
        }
        End::Done
    }

    async fn send(&self, stream_id: u32, fin: bool, data: Bytes) -> Result<(), End> {
        self.activity.touch();
        self.out
            .send(Frame::Data {
                stream_id,
                fin,
                data,
            })
            .await
            .map_err(|_| End::WriterGone)
    }
}

/// What the error stream carries for the exec's final `status` (a v1
/// `Status` as JSON): v4 the JSON as it is; v1–v3 nothing on success, the
/// message as text on failure (the kubelet's `v1WriteStatusFunc`).
fn error_stream_payload(version: Version, status: Bytes) -> Bytes {
    if version >= Version::V4 {
        return status;
    }
    let Ok(v) = serde_json::from_slice::<Value>(&status) else {
        return status;
    };
    if v.get("status").and_then(Value::as_str) == Some("Success") {
        return Bytes::new();
    }
    match v.get("message").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => Bytes::from(m.to_owned()),
        _ => Bytes::from(
            v.get("reason")
                .and_then(Value::as_str)
                .filter(|r| !r.is_empty())
                .unwrap_or("error executing command")
                .to_owned(),
        ),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

    use tokio::task::JoinHandle;

    use super::*;
    use crate::spdy;
    use crate::spdy::testing::{self, Rx, Tx};

    const WAIT: Option<Duration> = Some(Duration::from_secs(10));

    struct Client {
        tx: Tx,
        rx: Rx,
        server: JoinHandle<()>,
        /// The exec's ends: what it reads, what it writes.
        pod_in: mpsc::Receiver<Bytes>,
        pod_out: mpsc::Sender<Bytes>,
    }

    fn request(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> ExecRequest {
        ExecRequest {
            namespace: "ns".into(),
            pod: "web".into(),
            container: Some("c".into()),
            command: vec!["sh".into()],
            stdin,
            stdout,
            stderr,
            tty,
            attach: false,
        }
    }

    fn start(protocol: &'static str, req: ExecRequest, wait: Option<Duration>) -> Client {
        let (tx, rx, server_io) = testing::raw_pair(wait);
        let (input, pod_in) = mpsc::channel(4);
        let (pod_out, output) = mpsc::channel(4);
        let server = tokio::spawn(serve_spdy(
            server_io,
            protocol,
            req,
            ExecStreams { input, output },
        ));
        Client {
            tx,
            rx,
            server,
            pod_in,
            pod_out,
        }
    }

    /// An exec that echoes stdin to stdout; at the end of stdin it writes
    /// "bye" to stderr and exits with `code`. Gives back what it read.
    fn echo(c: &mut Client, code: i32) -> JoinHandle<Vec<Bytes>> {
        let (_, empty) = mpsc::channel(1);
        let mut pod_in = std::mem::replace(&mut c.pod_in, empty);
        let pod_out = c.pod_out.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some(m) = pod_in.recv().await {
                seen.push(m.clone());
                match m[0] {
                    exec::STDIN => {
                        let _ = pod_out.send(exec::message(exec::STDOUT, &m[1..])).await;
                    }
                    exec::CLOSE => {
                        let status = exec::exit_status(code).to_string();
                        for m in [
                            exec::message(exec::STDERR, b"bye"),
                            exec::message(exec::ERROR, status.as_bytes()),
                        ] {
                            let _ = pod_out.send(m).await;
                        }
                        break;
                    }
                    _ => {}
                }
            }
            seen
        })
    }

    fn open(stream_id: u32, streamtype: &str) -> Frame {
        // Go's header name, lower-cased on the wire as spdystream does.
        testing::syn_stream(stream_id, Headers::new().with("streamType", streamtype))
    }

    fn data(stream_id: u32, fin: bool, bytes: &[u8]) -> Frame {
        Frame::Data {
            stream_id,
            fin,
            data: Bytes::copy_from_slice(bytes),
        }
    }

    /// Opens streams as client-go does (each after the previous reply).
    async fn open_all(c: &mut Client, streams: &[(u32, &str)]) {
        for (id, kind) in streams {
            c.tx.send(open(*id, kind)).await;
            c.rx.reply(*id).await;
        }
    }

    /// See [`testing::ends_with_goaway`].
    async fn ends_with_goaway(c: Client, last_good_stream_id: u32, status: u32) {
        testing::ends_with_goaway(c.tx, c.rx, c.server, last_good_stream_id, status).await;
    }

    const EXIT_3: &str =
        "command terminated with non-zero exit code: error executing command, exit status 3";

    #[tokio::test]
    async fn an_exec_relays_its_streams_and_reports_its_exit_code() {
        for (protocol, code, report) in [
            (V4, 3, exec::exit_status(3).to_string()),
            (V4, 0, exec::exit_status(0).to_string()),
            (V3, 3, EXIT_3.to_owned()),
            (V2, 3, EXIT_3.to_owned()),
            (V3, 0, String::new()),
            (V2, 0, String::new()),
        ] {
            let mut c = start(protocol, request(true, true, true, false), WAIT);
            let exec = echo(&mut c, code);
            open_all(
                &mut c,
                &[(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")],
            )
            .await;
            c.tx.send(data(3, false, b"hello ")).await;
            c.tx.send(data(3, true, b"world")).await;
            let got = c.rx.until_fin(&[1, 3, 5, 7]).await;
            assert_eq!(got[&5], b"hello world", "{protocol}");
            assert_eq!(got[&7], b"bye");
            assert_eq!(
                String::from_utf8_lossy(&got[&1]),
                report,
                "{protocol} {code}"
            );
            assert!(got[&3].is_empty());
            assert_eq!(
                exec.await.unwrap(),
                vec![
                    exec::message(exec::STDIN, b"hello "),
                    exec::message(exec::STDIN, b"world"),
                    exec::message(exec::CLOSE, &[exec::STDIN]),
                ]
            );
            ends_with_goaway(c, 7, spdy::goaway::OK).await;
        }
    }

    #[tokio::test]
    async fn v1_closes_stdin_at_once_and_reports_failures_as_text() {
        let mut c = start(V1, request(true, true, true, false), WAIT);
        let exec = echo(&mut c, 3);
        open_all(
            &mut c,
            &[(1, "error"), (3, "stdin"), (5, "stdout"), (7, "stderr")],
        )
        .await;
        assert_eq!(c.rx.frame().await, Some(data(3, true, b"")));
        c.tx.send(data(3, true, b"x")).await;
        let got = c.rx.until_fin(&[1, 5, 7]).await;
        assert_eq!(got[&5], b"x");
        assert_eq!(String::from_utf8_lossy(&got[&1]), EXIT_3);
        assert_eq!(exec.await.unwrap().len(), 2);
        ends_with_goaway(c, 7, spdy::goaway::OK).await;
    }

    #[tokio::test]
    async fn a_terminal_has_no_stderr_stream_and_passes_resizes_on() {
        let mut c = start(V4, request(true, true, true, true), WAIT);
        let exec = echo(&mut c, 0);
        open_all(
            &mut c,
            &[(1, "error"), (3, "stdin"), (5, "stdout"), (7, "resize")],
        )
        .await;
        // As Go's json.Encoder writes them, cut anywhere; names in any
        // case, unknown fields ignored.
        c.tx.send(data(
            7,
            false,
            b"{\"Width\":80,\"Height\":24}\n{\"width\":1",
        ))
        .await;
        c.tx.send(data(7, false, b"00, \"HEIGHT\": 50, \"x\": [1]}\n"))
            .await;
        c.tx.send(data(3, true, b"ls\r")).await;
        let got = c.rx.until_fin(&[1, 3, 5, 7]).await;
        // The exec's stderr has no stream: dropped.
        assert_eq!(got[&5], b"ls\r");
        assert_eq!(
            serde_json::from_slice::<Value>(&got[&1]).unwrap(),
            exec::exit_status(0)
        );
        assert_eq!(
            exec.await.unwrap(),
            vec![
                exec::message(exec::RESIZE, br#"{"Width":80,"Height":24}"#),
                exec::message(exec::RESIZE, br#"{"Width":100,"Height":50}"#),
                exec::message(exec::STDIN, b"ls\r"),
                exec::message(exec::CLOSE, &[exec::STDIN]),
            ]
        );
        ends_with_goaway(c, 7, spdy::goaway::OK).await;
    }

    #[tokio::test]
    async fn a_bad_size_stops_resizing_but_not_the_session() {
        let mut c = start(V4, request(false, true, false, true), WAIT);
        open_all(&mut c, &[(1, "error"), (3, "stdout"), (5, "resize")]).await;
        c.tx.send(data(
            5,
            false,
            b"{\"Width\":70000,\"Height\":1}\n{\"Width\":1,\"Height\":2}\n",
        ))
        .await;
        // An oversized value half-sent is dropped too (nothing arrives).
        c.pod_out
            .send(exec::message(exec::STDOUT, b"still here"))
            .await
            .unwrap();
        let Some(Frame::Data {
            stream_id: 3, data, ..
        }) = c.rx.frame().await
        else {
            panic!("no output");
        };
        assert_eq!(&data[..], b"still here");
        assert!(c.pod_in.try_recv().is_err());
        let mut r = Upstream {
            version: Version::V4,
            wanted: vec![],
            peer: Peer::new(mpsc::channel(1).0),
            opened: 0,
            ids: Ids::default(),
            extra: vec![],
            ready: None,
            input: Some(mpsc::channel(1).0),
            stdin_closed: false,
            resize: Some(BytesMut::new()),
            activity: Activity::new(),
        };
        r.resize(&[b' '; 100]).await;
        r.resize(b"{\"Width\":").await;
        assert!(r.resize.is_some());
        r.resize(&vec![b' '; MAX_RESIZE_BUFFER]).await;
        assert!(r.resize.is_none());
    }

    #[test]
    fn terminal_sizes_decode_as_go_does() {
        let size = |s: &str| terminal_size(&serde_json::from_str(s).unwrap());
        assert_eq!(size(r#"{"Width":80,"Height":24}"#), Some((80, 24)));
        assert_eq!(size(r#"{"wIdTh":80}"#), Some((80, 0)));
        assert_eq!(size(r#"{"Width":1,"width":2,"Height":null}"#), Some((2, 0)));
        assert_eq!(size("null"), Some((0, 0)));
        for bad in [
            r#"{"Width":-1}"#,
            r#"{"Width":65536}"#,
            r#"{"Width":1.5}"#,
            r#"{"Width":"80"}"#,
            "[]",
            "3",
        ] {
            assert_eq!(size(bad), None, "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn streams_opened_late_are_waited_for_and_never_time_out() {
        // Late, within the timeout: the session goes on.
        let mut c = start(V4, request(false, true, false, false), None);
        c.pod_out
            .send(exec::message(exec::STDOUT, b"early output"))
            .await
            .unwrap();
        let status = exec::exit_status(0).to_string();
        c.pod_out
            .send(exec::message(exec::ERROR, status.as_bytes()))
            .await
            .unwrap();
        open_all(&mut c, &[(1, "error")]).await;
        tokio::time::sleep(STREAM_CREATION_TIMEOUT - Duration::from_secs(1)).await;
        open_all(&mut c, &[(3, "stdout")]).await;
        let got = c.rx.until_fin(&[1, 3]).await;
        assert_eq!(got[&3], b"early output");
        assert_eq!(got[&1], status.as_bytes());
        ends_with_goaway(c, 3, spdy::goaway::OK).await;

        // Never: after the timeout the session ends, and the exec with it.
        let mut c = start(V4, request(true, true, false, false), None);
        let started = Instant::now();
        open_all(&mut c, &[(1, "error"), (3, "stdin")]).await;
        c.tx.send(data(3, false, b"typed early")).await;
        assert_eq!(
            c.pod_in.recv().await,
            Some(exec::message(exec::STDIN, b"typed early"))
        );
        assert_eq!(
            c.rx.frame().await,
            Some(Frame::GoAway {
                last_good_stream_id: 3,
                status: spdy::goaway::OK
            })
        );
        assert!(started.elapsed() >= STREAM_CREATION_TIMEOUT);
        assert_eq!(c.pod_in.recv().await, None);
        c.pod_out.closed().await;
        assert_eq!(c.rx.frame().await, None);
        c.tx.close().await;
        c.server.await.unwrap();
    }

    #[tokio::test]
    async fn a_client_leaving_mid_session_ends_the_exec() {
        for goaway in [false, true] {
            let mut c = start(V4, request(true, true, false, false), WAIT);
            open_all(&mut c, &[(1, "error"), (3, "stdin"), (5, "stdout")]).await;
            c.tx.send(data(3, false, b"a")).await;
            assert_eq!(
                c.pod_in.recv().await,
                Some(exec::message(exec::STDIN, b"a"))
            );
            c.pod_out
                .send(exec::message(exec::STDOUT, b"b"))
                .await
                .unwrap();
            assert_eq!(c.rx.frame().await, Some(data(5, false, b"b")));
            if goaway {
                // As spdystream's Close: reset streams, then GOAWAY.
                for stream_id in [1, 3, 5] {
                    c.tx.send(Frame::RstStream {
                        stream_id,
                        status: spdy::rst::CANCEL,
                    })
                    .await;
                }
                c.tx.send(Frame::GoAway {
                    last_good_stream_id: 0,
                    status: spdy::goaway::OK,
                })
                .await;
                // A reset stdin is its end.
                assert_eq!(
                    c.pod_in.recv().await,
                    Some(exec::message(exec::CLOSE, &[exec::STDIN]))
                );
            } else {
                c.tx.close().await;
            }
            // The exec's input is dropped, its output no longer read.
            assert_eq!(c.pod_in.recv().await, None);
            tokio::time::timeout(Duration::from_secs(5), c.pod_out.closed())
                .await
                .unwrap();
            if goaway {
                ends_with_goaway(c, 5, spdy::goaway::OK).await;
            } else {
                testing::ended(c.server).await;
            }
        }
    }

    #[tokio::test]
    async fn an_exec_that_ends_without_a_status_is_reported_as_an_error() {
        for (protocol, report) in [
            (V4, None),
            (
                V3,
                Some("Internal error occurred: the exec ended without a status"),
            ),
        ] {
            let mut c = start(protocol, request(false, true, false, false), WAIT);
            open_all(&mut c, &[(1, "error"), (3, "stdout")]).await;
            let (dummy, _) = mpsc::channel(1);
            drop(std::mem::replace(&mut c.pod_out, dummy));
            let got = c.rx.until_fin(&[1, 3]).await;
            match report {
                Some(text) => assert_eq!(String::from_utf8_lossy(&got[&1]), text),
                None => {
                    let v: Value = serde_json::from_slice(&got[&1]).unwrap();
                    assert_eq!(v["status"], "Failure");
                    assert_eq!(v["reason"], "InternalError");
                }
            }
            ends_with_goaway(c, 3, spdy::goaway::OK).await;
        }
    }

    #[tokio::test]
    async fn big_chunks_are_cut_and_pings_answered() {
        let mut c = start(V4, request(true, true, false, false), WAIT);
        open_all(&mut c, &[(1, "error"), (3, "stdin"), (5, "stdout")]).await;
        let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        c.tx.send(data(3, false, &big)).await;
        let mut got = Vec::new();
        while got.len() < big.len() {
            let m = c.pod_in.recv().await.unwrap();
            assert_eq!(m[0], exec::STDIN);
            assert!(m.len() <= MAX_CHUNK + 1);
            got.extend_from_slice(&m[1..]);
        }
        assert_eq!(got, big);
        let sender = c.pod_out.clone();
        let message = exec::message(exec::STDOUT, &big);
        tokio::spawn(async move { sender.send(message).await.unwrap() });
        let mut got = Vec::new();
        while got.len() < big.len() {
            let Some(Frame::Data {
                stream_id: 5,
                fin: false,
                data,
            }) = c.rx.frame().await
            else {
                panic!("not stdout data");
            };
            assert!(data.len() <= MAX_CHUNK);
            got.extend_from_slice(&data);
        }
        assert_eq!(got, big);
        c.tx.send(Frame::Ping { id: 7 }).await;
        assert_eq!(c.rx.frame().await, Some(Frame::Ping { id: 7 }));
    }

    #[tokio::test]
    async fn unexpected_streams_are_answered_while_setting_up_and_refused_after() {
        let mut c = start(V4, request(false, true, false, false), WAIT);
        // Unknown and unexpected types, and a second error stream: answered,
        // not used.
        open_all(
            &mut c,
            &[(1, "bogus"), (3, "error"), (5, "stdin"), (7, "error")],
        )
        .await;
        c.tx.send(testing::syn_stream(9, Headers::new())).await;
        c.rx.reply(9).await;
        c.tx.send(data(5, true, b"ignored")).await;
        open_all(&mut c, &[(11, "stdout")]).await;
        // Set up: more streams are refused.
        c.tx.send(open(13, "stderr")).await;
        assert_eq!(
            c.rx.frame().await,
            Some(Frame::RstStream {
                stream_id: 13,
                status: spdy::rst::REFUSED_STREAM
            })
        );
        let status = exec::exit_status(0).to_string();
        c.pod_out
            .send(exec::message(exec::STDOUT, b"out"))
            .await
            .unwrap();
        c.pod_out
            .send(exec::message(exec::ERROR, status.as_bytes()))
            .await
            .unwrap();
        let got = c.rx.until_fin(&[1, 3, 5, 7, 9, 11]).await;
        assert_eq!(got[&11], b"out");
        assert_eq!(got[&3], status.as_bytes());
        assert!(c.pod_in.try_recv().is_err());
        ends_with_goaway(c, 13, spdy::goaway::OK).await;
    }

    #[tokio::test]
    async fn too_many_streams_are_refused() {
        let mut c = start(V4, request(false, true, false, false), WAIT);
        for i in 0..MAX_STREAMS as u32 {
            open_all(&mut c, &[(2 * i + 1, "bogus")]).await;
        }
        let next = 2 * MAX_STREAMS as u32 + 1;
        c.tx.send(open(next, "error")).await;
        assert_eq!(
            c.rx.frame().await,
            Some(Frame::RstStream {
                stream_id: next,
                status: spdy::rst::REFUSED_STREAM
            })
        );
    }

    #[tokio::test]
    async fn protocol_errors_end_the_session_with_goaway() {
        let mut c = start(V4, request(true, true, false, false), WAIT);
        c.tx.raw(&[0xff; 64]).await;
        ends_with_goaway(c, 0, spdy::goaway::PROTOCOL_ERROR).await;

        let mut c = start(V4, request(true, true, false, false), WAIT);
        open_all(&mut c, &[(1, "error")]).await;
        c.tx.send(open(1, "stdin")).await;
        assert_eq!(c.pod_in.recv().await, None);
        ends_with_goaway(c, 1, spdy::goaway::PROTOCOL_ERROR).await;

        let mut c = start(V4, request(true, true, false, false), WAIT);
        c.tx.send(open(2, "error")).await;
        ends_with_goaway(c, 0, spdy::goaway::PROTOCOL_ERROR).await;
    }

    #[test]
    fn protocols_are_negotiated_as_the_kubelet_does() {
        // client-go's SPDY executor offers v5 first, one header each.
        assert_eq!(negotiate([V5, V4, V3, V2, V1]), Some(V4));
        assert_eq!(
            negotiate(["v5.channel.k8s.io, v3.channel.k8s.io,v4.channel.k8s.io"]),
            Some(V3)
        );
        assert_eq!(negotiate(["", " ,channel.k8s.io "]), Some(V1));
        assert_eq!(negotiate(["v2.channel.k8s.io"]), Some(V2));
        assert_eq!(negotiate([V5]), None);
        assert_eq!(negotiate(["V4.CHANNEL.K8S.IO"]), None);
        assert_eq!(negotiate([]), None);
        assert_eq!(negotiate([" , "]), None);
    }

    #[test]
    fn streams_wanted_follow_the_request_and_the_version() {
        use Kind::*;
        let r = request(true, true, true, true);
        assert_eq!(wanted(&r, Version::V4), vec![Error, Stdin, Stdout, Resize]);
        assert_eq!(wanted(&r, Version::V3), vec![Error, Stdin, Stdout, Resize]);
        assert_eq!(wanted(&r, Version::V2), vec![Error, Stdin, Stdout]);
        assert_eq!(
            wanted(&request(false, true, true, false), Version::V1),
            vec![Error, Stdout, Stderr]
        );
        assert_eq!(Version::of(V5), Version::V4);
        assert_eq!(Version::of(""), Version::V1);
    }
}
