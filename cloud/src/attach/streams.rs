//! The kubelet streaming API of every edge node, served by cloudcore
//! (`keel_api::kubelet`): each edge Node's `InternalIP` and kubelet port
//! name this server, so the API server's `kubectl logs`, `exec`, `attach`
//! and `port-forward` for an edge pod come here and go on through the
//! node's own QUIC connection (`crate::streams::Tunnel`).
//!
//! Who may use it: TLS accepts a client certificate issued by the
//! cluster's CA (the kubeconfig's, or `kubeletClientCA`); then, as a
//! kubelet with webhook authorization does, the API server decides with a
//! SubjectAccessReview whether that certificate's user (its CN) and
//! groups (its O) may `get`/`create` the `nodes/proxy` of the pod's node.
//! A kubelet client certificate of the API server (kubeadm binds it to
//! `system:kubelet-api-admin`) may; a node's own certificate may not.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::SubjectAccessReview;
use keel_api::Status;
use keel_api::kubelet::{AuthFuture, KubeletAuth, KubeletServer};
use keel_api::server::PodStreams;
use kube::api::{Api, PostParams};
use serde_json::json;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::{AttachError, Attached, lock};
use crate::pki::Credentials;

/// How long an answer of the API server about a client is reused.
const DECISION_TTL: Duration = Duration::from_secs(30);

/// Starts the stream server; returns the address the API server should
/// dial (advertised IP, bound port).
pub(super) async fn start(
    a: &Arc<Attached>,
    cert: &Credentials,
    streams: PodStreams,
) -> Result<SocketAddr, AttachError> {
    let addr = a.cfg.stream_addr;
    let err = |message: String| AttachError::Streams { addr, message };
    let ip = match a.cfg.stream_advertise_address {
        Some(ip) => ip,
        None if addr.ip().is_unspecified() => {
            return Err(err(
                "streamAddr binds every interface: set streamAdvertiseAddress to the IP the API server should dial".into(),
            ));
        }
        None => addr.ip(),
    };
    let roots = match &a.cfg.kubelet_client_ca {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| err(format!("reading kubeletClientCA {}: {e}", path.display())))?;
            let pem = String::from_utf8_lossy(&pem);
            crate::pki::certs_from_pem(&pem)
                .map_err(|e| err(format!("kubeletClientCA {}: {e}", path.display())))?
                .into_iter()
                .map(|c| c.as_ref().to_vec())
                .collect()
        }
        None => a.cluster_ca.clone(),
    };
    if roots.is_empty() {
        return Err(err(
            "no CA for the API server's kubelet client certificate: the kubeconfig names none; set kubeletClientCA".into(),
        ));
    }
    let tls = crate::pki::kubelet_api_tls_config(&roots, &cert.cert_pem, &cert.key_pem)
        .map_err(|e| err(e.to_string()))?;
    let auth = Arc::new(SarAuth {
        client: a.client.clone(),
        decisions: Mutex::new(HashMap::new()),
    });
    let reader: Arc<dyn keel_api::ReadObjects> = a.registry.clone();
    let server = KubeletServer::bind(addr, tls, reader, streams, auth)
        .await
        .map_err(|e| err(e.to_string()))?;
    let endpoint = SocketAddr::new(ip, server.local_addr().port());
    info!(listen = %server.local_addr(), %endpoint, "edge nodes' kubelet API served by cloudcore");
    lock(&a.streams_server).replace(server);
    Ok(endpoint)
}

/// What is asked of the API server: may (user, groups) verb the
/// `nodes/proxy` of node?
type Question = (String, Vec<String>, String, String);

/// Decides with SubjectAccessReviews, answers cached for a while.
struct SarAuth {
    client: kube::Client,
    /// (user, groups, node, verb) → (allowed, when asked).
    decisions: Mutex<HashMap<Question, (bool, Instant)>>,
}

/// The user (CN) and groups (O) of a client certificate.
fn identity(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let subject = cert.subject();
    let user = subject
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())?
        .to_owned();
    let groups = subject
        .iter_organization()
        .filter_map(|o| o.as_str().ok().map(str::to_owned))
        .collect();
    Some((user, groups))
}

impl KubeletAuth for SarAuth {
    fn allow<'a>(&'a self, cert: &'a [u8], node: &'a str, verb: &'a str) -> AuthFuture<'a> {
        Box::pin(async move {
            let Some((user, groups)) = identity(cert) else {
                return Err(Status::new(
                    401,
                    "Unauthorized",
                    "a client certificate with a common name is required",
                ));
            };
            let key = (
                user.clone(),
                groups.clone(),
                node.to_owned(),
                verb.to_owned(),
            );
            let cached = lock(&self.decisions)
                .get(&key)
                .filter(|(_, at)| at.elapsed() < DECISION_TTL)
                .map(|(allowed, _)| *allowed);
            let allowed = match cached {
                Some(a) => a,
                None => {
                    let review: SubjectAccessReview = serde_json::from_value(json!({
                        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                        "spec": {"user": user, "groups": groups, "resourceAttributes": {
                            "verb": verb, "resource": "nodes", "subresource": "proxy",
                            "name": node}}}))
                    .map_err(|e| Status::internal(e.to_string()))?;
                    let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
                    let answer = api
                        .create(&PostParams::default(), &review)
                        .await
                        .map_err(|e| {
                            warn!(%user, %node, error = %e, "SubjectAccessReview failed");
                            Status::new(
                                503,
                                "ServiceUnavailable",
                                format!("cannot ask the API server whether {user} may use node {node}: {e}"),
                            )
                        })?;
                    let allowed = answer.status.is_some_and(|s| s.allowed);
                    let mut decisions = lock(&self.decisions);
                    if decisions.len() > 4096 {
                        decisions.clear();
                    }
                    decisions.insert(key, (allowed, Instant::now()));
                    allowed
                }
            };
            if allowed {
                Ok(())
            } else {
                Err(Status::new(
                    403,
                    "Forbidden",
                    format!(
                        "user {user} (groups {groups:?}) may not {verb} nodes/proxy of node {node}"
                    ),
                ))
            }
        })
    }
}
