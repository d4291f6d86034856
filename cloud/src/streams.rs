//! Container streams through each node's own connection: cloudcore's API
//! answers `kubectl logs` by opening a session on the node's QUIC
//! connection (`keel_sync::session`); edgecore answers it from its
//! containers' log files, as its own API does. No port on the edge, no
//! inbound route to it: the node dialled the connection.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use keel_api::{LogRequest, LogsFuture, PodLogs, Status};
use keel_sync::session::{SessionError, open_session};
use serde_json::Value;
use tracing::debug;

use crate::hub::HubHandle;

/// How long a node may take to answer a session's request.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// `kubectl logs` through the node's connection.
#[derive(Default)]
pub struct TunnelLogs {
    hub: OnceLock<HubHandle>,
}

impl std::fmt::Debug for TunnelLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelLogs").finish_non_exhaustive()
    }
}

impl TunnelLogs {
    pub fn new() -> Arc<TunnelLogs> {
        Arc::new(TunnelLogs::default())
    }

    /// The hub whose connections carry the sessions (it starts after the
    /// API; until then every request is answered 503).
    pub fn set_hub(&self, hub: HubHandle) {
        let _ = self.hub.set(hub);
    }
}

fn unavailable(message: String) -> Status {
    Status::new(503, "ServiceUnavailable", message)
}

impl PodLogs for TunnelLogs {
    fn logs<'a>(&'a self, pod: &'a Value, req: &'a LogRequest) -> LogsFuture<'a> {
        Box::pin(async move {
            let Some(node) = pod.pointer("/spec/nodeName").and_then(Value::as_str) else {
                return Err(Status::bad_request(format!(
                    "pod {} is not scheduled to a node yet: it has no logs",
                    req.pod
                )));
            };
            let conn = self
                .hub
                .get()
                .and_then(|h| h.connection(node))
                .ok_or_else(|| {
                    unavailable(format!(
                        "node {node} is not connected to cloudcore: the logs of pod {} stay on the node until it is (its pods keep running)",
                        req.pod
                    ))
                })?;
            let request = req.to_json().to_string();
            debug!(%node, pod = %req.pod, follow = req.follow, "logs through the node's connection");
            match open_session(&conn, request.as_bytes(), None, ANSWER_WITHIN).await {
                Ok(Ok(output)) => Ok(output),
                Ok(Err(why)) => Err(serde_json::from_slice::<Value>(&why)
                    .map(|v| Status::from_json(&v))
                    .unwrap_or_else(|_| {
                        Status::internal(String::from_utf8_lossy(&why).into_owned())
                    })),
                Err(SessionError::Timeout(t)) => Err(Status::new(
                    504,
                    "Timeout",
                    format!("node {node} did not answer within {t:?}"),
                )),
                Err(e) => Err(unavailable(format!("node {node}: {e}"))),
            }
        })
    }
}
