//! What cloudcore asks of this node over its connection (sessions, see
//! `keel_sync::session`): `kubectl logs` (the same answers as the edge's
//! own API gives) and `kubectl exec` (a command in a running container,
//! its stdin, stdout, stderr and exit code carried as `v5.channel.k8s.io`
//! messages).

use std::sync::Arc;

use bytes::Bytes;
use keel_api::exec::{
    CLOSE, Deframer, ERROR, ExecRequest, STDERR, STDIN, STDOUT, exit_status, frame, message,
};
use keel_api::{LogRequest, Status};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tracing::debug;

use crate::edged::{Edged, ExecError};
use crate::meta::MetaManager;

/// Answers logs requests (see `core.rs`).
pub(crate) trait Logs: Send + Sync + 'static {
    fn logs_now(&self, pod: &Value, req: &LogRequest) -> Result<mpsc::Receiver<Bytes>, Status>;
}

/// The session handler of edgecore.
pub(crate) struct Sessions<L> {
    pub logs: L,
    pub edged: Arc<Edged>,
    pub meta: Arc<MetaManager>,
}

impl<L: Logs> Sessions<L> {
    fn pod(&self, namespace: &str, name: &str) -> Result<Value, Status> {
        let key = format!("pods/{namespace}/{name}");
        keel_api::ReadObjects::get(&*self.meta, &key).ok_or_else(|| {
            Status::new(
                404,
                "NotFound",
                format!(
                    "pods \"{name}\" not found on this edge node (not bound to it, or not received yet)"
                ),
            )
        })
    }
}

impl<L: Logs> keel_sync::session::SessionHandler for Sessions<L> {
    fn open(
        &self,
        request: Vec<u8>,
        input: mpsc::Receiver<Bytes>,
    ) -> keel_sync::session::SessionFuture {
        let v: Value = match serde_json::from_slice(&request) {
            Ok(v) => v,
            Err(e) => return refuse(Status::bad_request(format!("session request: {e}"))),
        };
        match v.get("op").and_then(Value::as_str) {
            Some("log") => {
                let answer = LogRequest::from_json(&v).and_then(|req| {
                    let pod = self.pod(&req.namespace, &req.pod)?;
                    self.logs.logs_now(&pod, &req)
                });
                Box::pin(std::future::ready(answer.map_err(|s| status_bytes(&s))))
            }
            Some("exec") => {
                let req = match ExecRequest::from_json(&v) {
                    Ok(r) => r,
                    Err(s) => return refuse(s),
                };
                let pod = match self.pod(&req.namespace, &req.pod) {
                    Ok(p) => p,
                    Err(s) => return refuse(s),
                };
                let edged = self.edged.clone();
                Box::pin(async move {
                    exec(&edged, &pod, req, input)
                        .await
                        .map_err(|s| status_bytes(&s))
                })
            }
            other => refuse(Status::bad_request(format!(
                "unknown session request {other:?}"
            ))),
        }
    }
}

fn status_bytes(s: &Status) -> Vec<u8> {
    s.to_json().to_string().into_bytes()
}

fn refuse(s: Status) -> keel_sync::session::SessionFuture {
    Box::pin(std::future::ready(Err(status_bytes(&s))))
}

/// Starts `req` in its container and wires it to the session: messages
/// from `input` (stdin, its close) to the command, its stdout and stderr
/// back, then its exit status on the error channel.
async fn exec(
    edged: &Edged,
    pod: &Value,
    req: ExecRequest,
    mut input: mpsc::Receiver<Bytes>,
) -> Result<mpsc::Receiver<Bytes>, Status> {
    let container = match &req.container {
        Some(c) => c.clone(),
        None => pod
            .pointer("/spec/containers/0/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    let process = match edged
        .exec(&req.namespace, &req.pod, &container, req.command.clone())
        .await
    {
        Ok(p) => p,
        Err(ExecError::Start { message: why, .. }) => {
            // As with kubelet: the command could not start in the
            // container; kubectl shows why and exits non-zero.
            tokio::spawn(async move {
                let _ = tx
                    .send(frame(&message(STDERR, format!("{why}\n").as_bytes())))
                    .await;
                let status = exit_status(127).to_string();
                let _ = tx.send(frame(&message(ERROR, status.as_bytes()))).await;
            });
            return Ok(rx);
        }
        Err(e @ (ExecError::PodNotFound { .. } | ExecError::ContainerNotFound { .. })) => {
            return Err(Status::bad_request(e.to_string()));
        }
        Err(e) => return Err(Status::internal(e.to_string())),
    };
    debug!(pod = %req.pod, %container, command = ?req.command, "exec started");
    let mut stdin = if req.stdin { process.stdin } else { None };
    // stdin: until the client closes it (or leaves).
    tokio::spawn(async move {
        let mut d = Deframer::default();
        while let Some(chunk) = input.recv().await {
            let Ok(msgs) = d.push(&chunk) else { return };
            for m in msgs {
                match m.split_first() {
                    Some((&STDIN, data)) => {
                        if let Some(w) = stdin.as_mut()
                            && w.write_all(data).await.is_err()
                        {
                            stdin = None;
                        }
                    }
                    Some((&CLOSE, [STDIN, ..])) => stdin = None,
                    _ => {}
                }
            }
        }
    });
    let out = tokio::spawn(copy_out(process.stdout, STDOUT, tx.clone()));
    let err = tokio::spawn(copy_out(process.stderr, STDERR, tx.clone()));
    let exit = process.exit;
    tokio::spawn(async move {
        // The client gone (the session's output dropped) ends the wait:
        // dropping `exit` kills the command.
        let code = tokio::select! {
            r = exit.wait() => r,
            () = tx.closed() => return,
        };
        let _ = out.await;
        let _ = err.await;
        let status = match code {
            Ok(code) => exit_status(code),
            Err(e) => keel_api::exec::error_status(&e.to_string()),
        };
        let _ = tx
            .send(frame(&message(ERROR, status.to_string().as_bytes())))
            .await;
    });
    Ok(rx)
}

async fn copy_out(mut from: impl AsyncRead + Unpin, channel: u8, tx: mpsc::Sender<Bytes>) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let Some(data) = buf.get(..n) else { return };
                if tx.send(frame(&message(channel, data))).await.is_err() {
                    return;
                }
            }
        }
    }
}
