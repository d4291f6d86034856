//! `kubectl exec` over WebSocket, as current kubectl speaks it
//! (`v5.channel.k8s.io`): every binary message starts with a channel byte
//! — 0 stdin, 1 stdout, 2 stderr, 3 the final Status (JSON), 4 terminal
//! resize — and `[255, 0]` says stdin is closed. The same messages travel
//! between cloudcore and the edge inside a session (`keel_sync::session`),
//! each as `u32 BE length ‖ message`, so cloudcore only relays them.

use std::collections::BTreeMap;

use bytes::{Buf as _, Bytes, BytesMut};
use futures::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tracing::debug;

use crate::status::Status;

/// The WebSocket subprotocol keel serves.
pub const PROTOCOL: &str = "v5.channel.k8s.io";
pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const ERROR: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;
/// Largest message accepted, either way.
pub const MAX_MESSAGE: usize = 1 << 20;

/// What `kubectl exec` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    /// `kubectl attach`: to the container's main process (no command).
    pub attach: bool,
}

impl ExecRequest {
    /// From the request's query (`command` repeated, one per argument).
    pub fn from_query(
        namespace: &str,
        pod: &str,
        query: &BTreeMap<String, String>,
        commands: Vec<String>,
    ) -> Result<ExecRequest, Status> {
        let attach = commands.is_empty() && query.contains_key("attach");
        if commands.is_empty() && !attach {
            return Err(Status::bad_request(
                "you must specify at least one command for the container",
            ));
        }
        let flag = |k: &str| query.get(k).is_some_and(|v| v == "true" || v == "1");
        Ok(ExecRequest {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container: query.get("container").cloned(),
            command: commands,
            stdin: flag("stdin"),
            stdout: flag("stdout"),
            stderr: flag("stderr"),
            tty: flag("tty"),
            attach,
        })
    }

    /// `kubectl attach`'s request (`pods/NAME/attach`).
    pub fn attach_from_query(
        namespace: &str,
        pod: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<ExecRequest, Status> {
        let mut q = query.clone();
        q.insert("attach".into(), "true".into());
        ExecRequest::from_query(namespace, pod, &q, Vec::new())
    }

    /// What the session carries: `exec` or `attach`.
    pub fn op(&self) -> &'static str {
        if self.attach { "attach" } else { "exec" }
    }

    pub fn to_json(&self) -> Value {
        json!({"op": self.op(), "namespace": self.namespace, "pod": self.pod,
            "container": self.container, "command": self.command, "stdin": self.stdin,
            "stdout": self.stdout, "stderr": self.stderr, "tty": self.tty})
    }

    pub fn from_json(v: &Value) -> Result<ExecRequest, Status> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let attach = match v.get("op").and_then(Value::as_str) {
            Some("exec") => false,
            Some("attach") => true,
            _ => return Err(Status::bad_request("not an exec or attach request")),
        };
        let command: Vec<String> = v
            .get("command")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if command.is_empty() != attach {
            return Err(Status::bad_request(
                "an exec needs a command, an attach has none",
            ));
        }
        Ok(ExecRequest {
            namespace: s("namespace").ok_or_else(|| Status::bad_request("no namespace"))?,
            pod: s("pod").ok_or_else(|| Status::bad_request("no pod"))?,
            container: s("container"),
            command,
            stdin: b("stdin"),
            stdout: b("stdout"),
            stderr: b("stderr"),
            tty: b("tty"),
            attach,
        })
    }
}

/// The final Status an exec reports on [`ERROR`]: success, or the exit
/// code as kubelet reports it (kubectl exits with that code).
pub fn exit_status(code: i32) -> Value {
    if code == 0 {
        json!({"metadata": {}, "status": "Success"})
    } else {
        json!({"metadata": {}, "status": "Failure",
            "message": format!("command terminated with non-zero exit code: error executing command, exit status {code}"),
            "reason": "NonZeroExitCode",
            "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
    }
}

/// An exec that failed to start, as its final Status.
pub fn error_status(message: &str) -> Value {
    json!({"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"})
}

/// One message with its channel byte.
pub fn message(channel: u8, data: &[u8]) -> Bytes {
    let mut m = BytesMut::with_capacity(data.len() + 1);
    m.extend_from_slice(&[channel]);
    m.extend_from_slice(data);
    m.freeze()
}

/// Frames a message for a session stream.
pub fn frame(message: &[u8]) -> Bytes {
    let mut m = BytesMut::with_capacity(message.len() + 4);
    m.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    m.extend_from_slice(message);
    m.freeze()
}

/// Reassembles framed messages from a session stream's chunks.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: BytesMut,
}

impl Deframer {
    /// Takes a chunk; returns the messages it completes, or an error for a
    /// message over [`MAX_MESSAGE`].
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Bytes>, Status> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(len) = self.buf.get(..4).and_then(|l| <[u8; 4]>::try_from(l).ok()) {
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_MESSAGE {
                return Err(Status::bad_request(format!(
                    "exec message of {len} bytes exceeds {MAX_MESSAGE}"
                )));
            }
            if self.buf.len() < 4 + len {
                break;
            }
            self.buf.advance(4);
            out.push(self.buf.split_to(len).freeze());
        }
        Ok(out)
    }
}

/// Turns a session's output chunks into messages. Dropping the returned
/// receiver drops `chunks` at once (not at the next chunk), so the
/// session's reader going away reaches the node even from a silent
/// command.
pub fn deframe(mut chunks: mpsc::Receiver<Bytes>) -> mpsc::Receiver<Bytes> {
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut d = Deframer::default();
        while let Some(c) = recv_while_wanted(&mut chunks, &tx).await {
            let Ok(msgs) = d.push(&c) else { return };
            for m in msgs {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next item of `from`, or `None` once it ends or once `to`'s receiver
/// is gone (nobody wants what `from` would bring): for the tasks that
/// relay one channel to another, so that a consumer going away is felt
/// upstream without waiting for the next item.
pub async fn recv_while_wanted<T, U>(
    from: &mut mpsc::Receiver<T>,
    to: &mpsc::Sender<U>,
) -> Option<T> {
    tokio::select! {
        item = from.recv() => item,
        () = to.closed() => None,
    }
}

/// A running exec: messages to it (stdin, resize, close) and from it
/// (stdout, stderr, then the final Status on [`ERROR`]).
#[derive(Debug)]
pub struct ExecStreams {
    pub input: mpsc::Sender<Bytes>,
    pub output: mpsc::Receiver<Bytes>,
}

/// A pending [`PodExec`] answer.
pub type ExecFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<ExecStreams, Status>> + Send + 'a>>;

/// `kubectl exec`: served by cloudcore through each node's connection.
pub trait PodExec: Send + Sync + 'static {
    fn exec<'a>(&'a self, pod: &'a Value, req: &'a ExecRequest) -> ExecFuture<'a>;
    /// Whether an exec in `pod` could be served now (its node reachable),
    /// without starting one: the error a request in a protocol keel does
    /// not speak (kubectl falls back to SPDY after a failed WebSocket
    /// upgrade) reports first, so the user sees why.
    fn check(&self, pod: &Value, name: &str) -> Result<(), Status>;
}

/// Relays an upgraded WebSocket connection and an exec until either ends.
pub async fn relay<IO>(io: IO, streams: ExecStreams)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut config = WebSocketConfig::default();
    config.max_message_size = Some(MAX_MESSAGE);
    config.max_frame_size = Some(MAX_MESSAGE);
    let ws =
        tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, Some(config)).await;
    let (mut sink, mut source) = ws.split();
    let ExecStreams { input, mut output } = streams;
    // Until the client goes away (v5 signals the end of stdin with a
    // message, not by closing): what the exec no longer reads is dropped.
    let upstream = async move {
        let mut input = Some(input);
        while let Some(m) = source.next().await {
            match m {
                Ok(Message::Binary(b)) => {
                    if let Some(i) = &input
                        && i.send(b).await.is_err()
                    {
                        input = None;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    let downstream = async move {
        while let Some(m) = output.recv().await {
            if sink.send(Message::Binary(m)).await.is_err() {
                return;
            }
        }
        close_normally(&mut sink).await;
    };
    // The exec ends when its output does (the final Status is sent), or
    // when the client goes away: then its output is dropped, which ends
    // the session and kills the command on the edge.
    tokio::select! {
        () = downstream => {}
        () = upstream => debug!("exec client went away"),
    }
    debug!("exec stream closed");
}

/// Ends a WebSocket with a normal closure: kubectl reads it as the end of
/// every stream (a close without a status code is an error to it).
pub(crate) async fn close_normally<S>(sink: &mut S)
where
    S: futures::Sink<Message> + Unpin,
{
    let _ = sink
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    let _ = sink.close().await;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use super::*;

    #[test]
    fn frames_survive_any_chunking_and_oversize_is_refused() {
        let msgs = [
            message(STDOUT, b"hello"),
            message(ERROR, b"{}"),
            message(STDIN, b""),
        ];
        let wire: Vec<u8> = msgs.iter().flat_map(|m| frame(m).to_vec()).collect();
        for cut in 1..wire.len() {
            let mut d = Deframer::default();
            let mut got = d.push(&wire[..cut]).unwrap();
            got.extend(d.push(&wire[cut..]).unwrap());
            assert_eq!(got, msgs.to_vec(), "cut at {cut}");
        }
        let mut d = Deframer::default();
        let huge = u32::try_from(MAX_MESSAGE + 1).unwrap().to_be_bytes();
        assert!(d.push(&huge).is_err());
    }

    #[test]
    fn requests_round_trip_and_need_a_command() {
        let q: BTreeMap<String, String> =
            [("stdin", "true"), ("stdout", "true"), ("container", "c")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let r = ExecRequest::from_query("ns", "p", &q, vec!["sh".into(), "-c".into()]).unwrap();
        assert!(r.stdin && r.stdout && !r.stderr && !r.tty);
        assert_eq!(ExecRequest::from_json(&r.to_json()).unwrap(), r);
        assert_eq!(
            ExecRequest::from_query("ns", "p", &q, vec![])
                .unwrap_err()
                .code,
            400
        );
        assert_eq!(exit_status(3)["details"]["causes"][0]["message"], "3");
        assert_eq!(exit_status(0)["status"], "Success");
    }
}
