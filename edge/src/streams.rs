//! What cloudcore asks of this node over its connection (sessions, see
//! `keel_sync::session`): `kubectl logs` (the same answers as the edge's
//! own API gives) and `kubectl exec` (a command in a running container,
//! its stdin, stdout, stderr and exit code carried as `v5.channel.k8s.io`
//! messages).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use keel_api::exec::{
    CLOSE, Deframer, ERROR, ExecRequest, RESIZE, STDERR, STDIN, STDOUT, exit_status, frame, message,
};
use keel_api::portforward::ForwardRequest;
use keel_api::{LogRequest, Status};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::mpsc;
use tracing::debug;

use crate::edged::{ContainerHandle, Edged, ExecError, crilog};
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
            Some("attach") => {
                let answer = ExecRequest::from_json(&v).and_then(|mut req| {
                    let pod = self.pod(&req.namespace, &req.pod)?;
                    if req.container.is_none() {
                        req.container = pod
                            .pointer("/spec/containers/0/name")
                            .and_then(Value::as_str)
                            .map(str::to_owned);
                    }
                    let once = pod
                        .pointer("/spec/containers")
                        .and_then(Value::as_array)
                        .and_then(|cs| {
                            cs.iter().find(|c| {
                                c.get("name").and_then(Value::as_str) == req.container.as_deref()
                            })
                        })
                        .and_then(|c| c.get("stdinOnce"))
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    Ok((req, once))
                });
                let edged = self.edged.clone();
                Box::pin(async move {
                    let (req, once) = answer.map_err(|s| status_bytes(&s))?;
                    attach(&edged, req, once, input)
                        .await
                        .map_err(|s| status_bytes(&s))
                })
            }
            Some("portforward") => {
                let req = match ForwardRequest::from_json(&v) {
                    Ok(r) => r,
                    Err(s) => return refuse(s),
                };
                let pod = match self.pod(&req.namespace, &req.pod) {
                    Ok(p) => p,
                    Err(s) => return refuse(s),
                };
                let to = pod_address(&pod);
                Box::pin(async move { forward(req, to, input).await.map_err(|s| status_bytes(&s)) })
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
    let started = if req.tty {
        edged
            .exec_terminal(&req.namespace, &req.pod, &container, req.command.clone())
            .await
            .map(|(p, resize)| (p, Some(resize)))
    } else {
        edged
            .exec(&req.namespace, &req.pod, &container, req.command.clone())
            .await
            .map(|p| (p, None))
    };
    let (process, resize) = match started {
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
                            && (w.write_all(data).await.is_err() || w.flush().await.is_err())
                        {
                            stdin = None;
                        }
                    }
                    Some((&CLOSE, [STDIN, ..])) => stdin = None,
                    Some((&RESIZE, size)) => {
                        if let (Some(resize), Some((cols, rows))) =
                            (resize.as_ref(), terminal_size(size))
                        {
                            resize(cols, rows);
                        }
                    }
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

/// How long connecting to a pod's port may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);

/// Where a pod's ports are: its own address on a pod network (its
/// `podIP` differs from its `hostIP`), else the node's loopback (a pod on
/// the node's network, as every process-runtime pod is).
fn pod_address(pod: &Value) -> std::net::IpAddr {
    let status = pod.get("status");
    let ip = |key: &str| status.and_then(|s| s.get(key)).and_then(Value::as_str);
    match (ip("podIP"), ip("hostIP")) {
        (Some(pod_ip), host) if Some(pod_ip) != host => pod_ip
            .parse()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
        _ => std::net::Ipv4Addr::LOCALHOST.into(),
    }
}

/// One `kubectl port-forward` connection: to the pod's port at `to`, the
/// session's input to it and its output back. The session's input ending
/// closes the connection's sending side; the pod closing ends the output.
async fn forward(
    req: ForwardRequest,
    to: std::net::IpAddr,
    mut input: mpsc::Receiver<Bytes>,
) -> Result<mpsc::Receiver<Bytes>, Status> {
    let failed = |why: String| {
        let at = if to.is_loopback() {
            "localhost".to_owned()
        } else {
            to.to_string()
        };
        Status::internal(format!(
            "error forwarding port {} to pod {}: failed to connect to {at}:{}: {why}",
            req.port, req.pod, req.port
        ))
    };
    let conn = tokio::time::timeout(
        CONNECT_WITHIN,
        tokio::net::TcpStream::connect((to, req.port)),
    )
    .await
    .map_err(|_| failed(format!("no answer within {CONNECT_WITHIN:?}")))?
    .map_err(|e| failed(e.to_string()))?;
    debug!(pod = %req.pod, port = req.port, "port forwarded");
    let (mut from_pod, mut to_pod) = conn.into_split();
    tokio::spawn(async move {
        while let Some(chunk) = input.recv().await {
            if to_pod.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_pod.shutdown().await;
    });
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 << 10];
        loop {
            let n = tokio::select! {
                r = from_pod.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                },
                () = tx.closed() => return,
            };
            let chunk = buf.get(..n).map(Bytes::copy_from_slice).unwrap_or_default();
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// Attaches `req` to its container's main process: its output from now
/// on (read from its log, each entry on its stream's channel) until it
/// exits, and with stdin, the client's input to its stdin (closed after
/// the session when the container's `stdinOnce`).
///
/// "From now on" is the log's end before any of the client's input is
/// written: what the container answers to that input is always shown.
async fn attach(
    edged: &Edged,
    req: ExecRequest,
    stdin_once: bool,
    mut input: mpsc::Receiver<Bytes>,
) -> Result<mpsc::Receiver<Bytes>, Status> {
    let container = req.container.clone().unwrap_or_default();
    let (handle, log) = edged
        .attach(&req.namespace, &req.pod, &container)
        .map_err(|e| Status::bad_request(e.to_string()))?;
    let reader = match crilog::Reader::open(&log).await {
        Ok(mut r) => r.seek(std::io::SeekFrom::End(0)).await.ok().map(|()| r),
        Err(_) => None,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(16);
    if req.stdin {
        let (handle, tx) = (handle.clone(), tx.clone());
        tokio::spawn(async move {
            let mut d = Deframer::default();
            while let Some(chunk) = input.recv().await {
                let Ok(msgs) = d.push(&chunk) else { return };
                for m in msgs {
                    let write = match m.split_first() {
                        Some((&STDIN, data)) => Some(Bytes::copy_from_slice(data)),
                        // The client closed its stdin: so does a
                        // `stdinOnce` container's.
                        Some((&CLOSE, [STDIN, ..])) if stdin_once => None,
                        _ => continue,
                    };
                    if let Err(e) = handle.write_stdin(write).await {
                        let why = format!("the container's stdin: {e}\n");
                        let _ = tx.send(frame(&message(STDERR, why.as_bytes()))).await;
                        return;
                    }
                }
            }
        });
    }
    debug!(pod = %req.pod, %container, "attached");
    tokio::spawn(async move {
        if follow_output(reader, &*handle, &tx).await {
            let status = exit_status(0).to_string();
            let _ = tx.send(frame(&message(ERROR, status.as_bytes()))).await;
        }
    });
    Ok(rx)
}

/// Sends what the container writes past `reader`'s position (its log's
/// new entries, each on its stream's channel) until it exits (true) or the
/// client goes away (false). Without a log to read, the session ends.
async fn follow_output(
    reader: Option<crilog::Reader>,
    handle: &dyn ContainerHandle,
    tx: &mpsc::Sender<Bytes>,
) -> bool {
    let Some(mut r) = reader else {
        return true;
    };
    let exited = handle.wait();
    tokio::pin!(exited);
    let mut exited_now = false;
    let mut messages = Vec::new();
    loop {
        let each = |entry: &crilog::Entry<'_>| {
            let mut data = entry.content.to_vec();
            if entry.full {
                data.push(b'\n');
            }
            let channel = if entry.stderr { STDERR } else { STDOUT };
            messages.push(frame(&message(channel, &data)));
        };
        if let Ok(true) = r.read(each).await {
            for m in messages.drain(..) {
                if tx.send(m).await.is_err() {
                    return false;
                }
            }
            continue;
        }
        if exited_now {
            return true;
        }
        match r.rotated().await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(_) => return true,
        }
        tokio::select! {
            _ = &mut exited => {
                // Its last output may still be on its way to the log.
                exited_now = true;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = tx.closed() => return false,
        }
    }
}

/// A terminal size message (`{"Width": …, "Height": …}`).
fn terminal_size(json: &[u8]) -> Option<(u16, u16)> {
    let v: Value = serde_json::from_slice(json).ok()?;
    let n = |k: &str| v.get(k)?.as_u64().and_then(|n| u16::try_from(n).ok());
    Some((n("Width")?, n("Height")?))
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
