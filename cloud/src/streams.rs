//! Container streams through each node's own connection: cloudcore's API
//! answers `kubectl logs`, `exec`, `attach` and `port-forward` by opening a
//! session (one per forwarded connection) on the
//! node's QUIC connection (`keel_sync::session`); edgecore answers logs
//! from its containers' log files, as its own API does, and runs an exec
//! in the container. No port on the edge, no inbound route to it: the
//! node dialled the connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use keel_api::exec::{
    ERROR, ExecFuture, ExecRequest, ExecStreams, PodExec, deframe, frame, recv_while_wanted,
};
use keel_api::portforward::{ForwardFuture, ForwardRequest, ForwardStreams, PodPortForward};
use keel_api::{LogRequest, LogsFuture, PodLogs, Status};
use keel_sync::session::{SessionError, open_session};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::api::registry::{Registry, user_origin};
use crate::hub::HubHandle;

/// How long a node may take to answer a session's request.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);
/// How long a node that did not answer is reported so without trying.
const UNANSWERED_FOR: Duration = Duration::from_secs(30);

/// `kubectl logs` and `kubectl exec` through the node's connection.
pub struct Tunnel {
    hub: OnceLock<HubHandle>,
    /// Where exec sessions are recorded (`cluster`, for `keel audit`).
    registry: Arc<Registry>,
    /// Nodes whose connection did not answer a session lately, and when:
    /// requests meanwhile fail at once, with the same reason.
    unanswered: Mutex<HashMap<String, Instant>>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel").finish_non_exhaustive()
    }
}

impl Tunnel {
    pub fn new(registry: Arc<Registry>) -> Arc<Tunnel> {
        Arc::new(Tunnel {
            hub: OnceLock::new(),
            registry,
            unanswered: Mutex::new(HashMap::new()),
        })
    }

    /// Everything this tunnel serves, for an API server.
    pub fn pod_streams(self: &Arc<Self>) -> keel_api::server::PodStreams {
        let logs: Arc<dyn PodLogs> = self.clone();
        let exec: Arc<dyn PodExec> = self.clone();
        let portforward: Arc<dyn PodPortForward> = self.clone();
        keel_api::server::PodStreams {
            logs: Some(logs),
            exec: Some(exec),
            portforward: Some(portforward),
        }
    }

    /// The hub whose connections carry the sessions (it starts after the
    /// API; until then every request is answered 503).
    pub fn set_hub(&self, hub: HubHandle) {
        let _ = self.hub.set(hub);
    }
}

/// Records one phase of an exec or attach session in the cluster's log
/// (who, which pod and container, the command; at the end its exit code).
fn audit(registry: &Registry, req: &ExecRequest, phase: &str, exit_code: Option<i64>) {
    let key = format!("pods/{}/{}", req.namespace, req.pod);
    let mut record = serde_json::Map::new();
    record.insert(
        req.op().to_owned(),
        json!({"phase": phase, "container": req.container,
            "command": req.command, "stdin": req.stdin, "exitCode": exit_code}),
    );
    record_session(registry, &key, &Value::Object(record));
}

/// Records a session event on `key` in the cluster's log.
fn record_session(registry: &Registry, key: &str, record: &Value) {
    let origin = user_origin(crate::pki::ADMIN_COMMON_NAME);
    if let Err(e) = registry.record_event(&origin, key, record.to_string().into_bytes()) {
        warn!(%key, error = %e, "could not record a session");
    }
}

fn unavailable(message: String) -> Status {
    Status::new(503, "ServiceUnavailable", message)
}

impl Tunnel {
    /// The connection of the node `pod` runs on.
    fn connection(&self, pod: &Value, name: &str) -> Result<(String, quinn::Connection), Status> {
        let Some(node) = pod.pointer("/spec/nodeName").and_then(Value::as_str) else {
            return Err(Status::bad_request(format!(
                "pod {name} is not scheduled to a node yet"
            )));
        };
        let conn = self
            .hub
            .get()
            .and_then(|h| h.connection(node))
            .ok_or_else(|| {
                unavailable(format!(
                    "node {node} is not connected to cloudcore: pod {name} cannot be reached until it is (its pods keep running)"
                ))
            })?;
        let since = self
            .unanswered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(node)
            .map(Instant::elapsed)
            .filter(|t| *t < UNANSWERED_FOR);
        if let Some(t) = since {
            return Err(Self::timeout(node, t));
        }
        Ok((node.to_owned(), conn))
    }

    fn timeout(node: &str, ago: Duration) -> Status {
        Status::new(
            504,
            "Timeout",
            format!(
                "node {node} did not answer within {ANSWER_WITHIN:?} ({}s ago); its connection may be gone",
                ago.as_secs()
            ),
        )
    }

    /// Opens a session with `request` (and `input`) on `node`'s connection;
    /// the node's error answer becomes its Status.
    async fn session(
        &self,
        node: &str,
        conn: &quinn::Connection,
        request: &Value,
        input: Option<mpsc::Receiver<Bytes>>,
    ) -> Result<mpsc::Receiver<Bytes>, Status> {
        let request = request.to_string();
        let answer = open_session(conn, request.as_bytes(), input, ANSWER_WITHIN).await;
        let mut unanswered = self
            .unanswered
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if matches!(answer, Err(SessionError::Timeout(_))) {
            unanswered.insert(node.to_owned(), Instant::now());
        } else {
            unanswered.remove(node);
        }
        drop(unanswered);
        match answer {
            Ok(Ok(output)) => Ok(output),
            Ok(Err(why)) => Err(serde_json::from_slice::<Value>(&why)
                .map(|v| Status::from_json(&v))
                .unwrap_or_else(|_| Status::internal(String::from_utf8_lossy(&why).into_owned()))),
            Err(SessionError::Timeout(_)) => Err(Self::timeout(node, Duration::ZERO)),
            Err(e) => Err(unavailable(format!("node {node}: {e}"))),
        }
    }
}

impl PodExec for Tunnel {
    fn check(&self, pod: &Value, name: &str) -> Result<(), Status> {
        self.connection(pod, name).map(|_| ())
    }

    fn exec<'a>(&'a self, pod: &'a Value, req: &'a ExecRequest) -> ExecFuture<'a> {
        Box::pin(async move {
            let (node, conn) = self.connection(pod, &req.pod)?;
            debug!(%node, pod = %req.pod, command = ?req.command, "exec through the node's connection");
            // kubectl's messages, framed for the session.
            let (input, mut messages) = mpsc::channel::<Bytes>(16);
            let (framed_tx, framed) = mpsc::channel::<Bytes>(16);
            tokio::spawn(async move {
                while let Some(m) = recv_while_wanted(&mut messages, &framed_tx).await {
                    if framed_tx.send(frame(&m)).await.is_err() {
                        return;
                    }
                }
            });
            let output = self
                .session(&node, &conn, &req.to_json(), Some(framed))
                .await?;
            audit(&self.registry, req, "started", None);
            // Passed on as they come; the final Status gives the exit code
            // for the session's record.
            let (tx, rx) = mpsc::channel::<Bytes>(16);
            let mut messages = deframe(output);
            let (registry, req) = (self.registry.clone(), req.clone());
            tokio::spawn(async move {
                let mut exit = None;
                while let Some(m) = recv_while_wanted(&mut messages, &tx).await {
                    if let Some((&ERROR, status)) = m.split_first() {
                        exit = serde_json::from_slice::<Value>(status).ok().map(|s| {
                            s.pointer("/details/causes/0/message")
                                .and_then(Value::as_str)
                                .and_then(|c| c.parse().ok())
                                .unwrap_or(i64::from(s.get("status") != Some(&json!("Success"))))
                        });
                    }
                    if tx.send(m).await.is_err() {
                        break;
                    }
                }
                audit(&registry, &req, "ended", exit);
            });
            Ok(ExecStreams { input, output: rx })
        })
    }
}

impl PodPortForward for Tunnel {
    fn check(&self, pod: &Value, name: &str) -> Result<(), Status> {
        self.connection(pod, name).map(|_| ())
    }

    fn forward<'a>(&'a self, pod: &'a Value, req: &'a ForwardRequest) -> ForwardFuture<'a> {
        Box::pin(async move {
            let (node, conn) = self.connection(pod, &req.pod)?;
            debug!(%node, pod = %req.pod, port = req.port, "port-forward through the node's connection");
            let (input, to_node) = mpsc::channel::<Bytes>(16);
            let mut from_node = self
                .session(&node, &conn, &req.to_json(), Some(to_node))
                .await?;
            let key = format!("pods/{}/{}", req.namespace, req.pod);
            let record = |phase: &str| json!({"portforward": {"phase": phase, "port": req.port}});
            record_session(&self.registry, &key, &record("started"));
            let ended = record("ended");
            let (tx, output) = mpsc::channel::<Bytes>(16);
            let registry = self.registry.clone();
            tokio::spawn(async move {
                while let Some(chunk) = recv_while_wanted(&mut from_node, &tx).await {
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                record_session(&registry, &key, &ended);
            });
            Ok(ForwardStreams { input, output })
        })
    }
}

impl PodLogs for Tunnel {
    fn logs<'a>(&'a self, pod: &'a Value, req: &'a LogRequest) -> LogsFuture<'a> {
        Box::pin(async move {
            let (node, conn) = self.connection(pod, &req.pod)?;
            debug!(%node, pod = %req.pod, follow = req.follow, "logs through the node's connection");
            self.session(&node, &conn, &req.to_json(), None).await
        })
    }
}
