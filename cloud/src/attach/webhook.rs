//! Edge autonomy on an attached cluster: a mutating admission webhook that
//! keeps the cluster from evicting pods of an offline edge node.
//!
//! When a node stops renewing its Lease, the cluster's node lifecycle
//! controller taints it `node.kubernetes.io/unreachable:NoExecute` and
//! evicts every pod that does not tolerate that taint for longer (the API
//! server's `DefaultTolerationSeconds` gives each pod 300 s). An edge node
//! is expected to be offline for hours, and its pods keep running there,
//! so on pod creation this webhook replaces the time-limited unreachable
//! and not-ready `NoExecute` tolerations of pods meant for edge nodes with
//! unlimited ones (DaemonSet pods already have them).
//!
//! A pod annotated `keel.io/autonomy: "off"` is left alone.
//!
//! The webhook is the first line; cloudcore's mirror is the backstop: a pod
//! bound to an edge node that still has limited tolerations (admitted
//! while cloudcore was down) has them made unlimited with a pod update,
//! which Kubernetes allows for `tolerationSeconds`.
//!
//! A pod is meant for edge nodes when its `nodeSelector` or a required
//! node-affinity term names the `node-role.kubernetes.io/edge` label, or
//! its `nodeName` is one of cloudcore's nodes. The webhook is registered
//! with `failurePolicy: Ignore`: while cloudcore is down, pods are
//! admitted unchanged rather than refused.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info, info_span, warn};

use super::{AttachError, Attached, classify};
use crate::pki::{ClusterCa, Credentials};

/// The label that marks edge nodes.
pub const EDGE_LABEL: &str = "node-role.kubernetes.io/edge";
/// Name of the MutatingWebhookConfiguration cloudcore keeps.
pub const CONFIG_NAME: &str = "keel-edge-autonomy";
const PATH: &str = "/mutate-pods";
const MAX_REVIEW: usize = 4 << 20;
/// The annotation with which a pod opts out (`"off"`): the cluster's
/// own eviction then applies to it.
pub const OPT_OUT: &str = "keel.io/autonomy";
const TAINTS: [&str; 2] = [
    "node.kubernetes.io/unreachable",
    "node.kubernetes.io/not-ready",
];

/// Serves the webhook and registers it with the cluster; the address.
pub async fn start(
    a: &Arc<Attached>,
    ca: &ClusterCa,
    cert: &Credentials,
) -> Result<SocketAddr, AttachError> {
    let addr = a.cfg.webhook_addr;
    let werr = |message: String| AttachError::Webhook { addr, message };
    let tls = crate::pki::build_server_config(
        ca,
        &cert.cert_pem,
        &cert.key_pem,
        crate::pki::ClientAuth::Optional,
        b"http/1.1",
    )
    .map_err(|e| werr(e.to_string()))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| werr(e.to_string()))?;
    let local = listener.local_addr().map_err(|e| werr(e.to_string()))?;
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let me = a.clone();
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "accepting a webhook connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (acceptor, me) = (acceptor.clone(), me.clone());
            tokio::spawn(
                async move {
                    let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let me = me.clone();
                        async move { Ok::<_, Infallible>(handle(&me, req).await) }
                    });
                    let mut b = hyper::server::conn::http1::Builder::new();
                    b.timer(TokioTimer::new())
                        .header_read_timeout(Some(Duration::from_secs(30)));
                    if let Err(e) = b.serve_connection(TokioIo::new(tls), service).await {
                        debug!(error = %e, "webhook connection ended with an error");
                    }
                }
                .instrument(info_span!("webhook", %peer)),
            );
        }
    });
    super::lock(&a.tasks).push(task);
    let url = match (&a.cfg.webhook_url, local.ip().is_unspecified()) {
        (Some(u), _) => u.clone(),
        (None, false) => format!("https://{local}{PATH}"),
        (None, true) => {
            return Err(werr(format!(
                "listening on {local}: set webhookUrl to the address the API server reaches (and list its host in serverNames)"
            )));
        }
    };
    register(a, ca, &url).await?;
    info!(addr = %local, %url, "edge autonomy webhook serving");
    Ok(local)
}

/// Creates or updates the MutatingWebhookConfiguration.
async fn register(a: &Attached, ca: &ClusterCa, url: &str) -> Result<(), AttachError> {
    use base64::Engine as _;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca.cert_pem());
    let cfg = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": CONFIG_NAME,
            "labels": {"app.kubernetes.io/managed-by": "keel-cloudcore"}},
        "webhooks": [{
            "name": "edge-autonomy.keel.io",
            "clientConfig": {"url": url, "caBundle": bundle},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"],
                "operations": ["CREATE"], "resources": ["pods"], "scope": "Namespaced"}],
            // The cluster's own system pods never wait for cloudcore.
            "namespaceSelector": {"matchExpressions": [{"key": "kubernetes.io/metadata.name",
                "operator": "NotIn", "values": ["kube-system", "kube-node-lease"]}]},
            "failurePolicy": "Ignore",
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "timeoutSeconds": 3,
            "reinvocationPolicy": "IfNeeded",
        }],
    });
    let api: Api<MutatingWebhookConfiguration> = Api::all(a.client.clone());
    let pp = PatchParams::apply("keel-cloudcore").force();
    api.patch(CONFIG_NAME, &pp, &Patch::Apply(&cfg))
        .await
        .map_err(|e| classify(&a.server, "registering the admission webhook", &e))?;
    Ok(())
}

fn respond(code: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = code;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn handle(a: &Attached, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST || req.uri().path() != PATH {
        return respond(StatusCode::NOT_FOUND, &json!({"error": "not found"}));
    }
    let read = tokio::time::timeout(
        Duration::from_secs(10),
        Limited::new(req.into_body(), MAX_REVIEW).collect(),
    );
    let body = match read.await {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            return respond(
                StatusCode::REQUEST_TIMEOUT,
                &json!({"error": "the review did not arrive within 10 s"}),
            );
        }
        Ok(Err(e)) => {
            return respond(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("reading the review: {e}")}),
            );
        }
    };
    let review: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return respond(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("not an AdmissionReview: {e}")}),
            );
        }
    };
    let Some(uid) = review.pointer("/request/uid").and_then(Value::as_str) else {
        return respond(
            StatusCode::BAD_REQUEST,
            &json!({"error": "AdmissionReview without request.uid"}),
        );
    };
    let pod = review.pointer("/request/object").unwrap_or(&Value::Null);
    let mut response = json!({"uid": uid, "allowed": true});
    if for_edge(a, pod)
        && let Some(patch) = toleration_patch(pod)
    {
        use base64::Engine as _;
        let text = patch.to_string();
        if let Some(r) = response.as_object_mut() {
            r.insert("patchType".into(), json!("JSONPatch"));
            r.insert(
                "patch".into(),
                json!(base64::engine::general_purpose::STANDARD.encode(text)),
            );
        }
        debug!(pod = ?pod.pointer("/metadata/generateName"), "unlimited edge tolerations added");
    }
    respond(
        StatusCode::OK,
        &json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "response": response}),
    )
}

/// Whether `pod` is meant for edge nodes.
fn for_edge(a: &Attached, pod: &Value) -> bool {
    let spec = pod.get("spec").unwrap_or(&Value::Null);
    if spec
        .get("nodeSelector")
        .and_then(Value::as_object)
        .is_some_and(|s| s.contains_key(EDGE_LABEL))
    {
        return true;
    }
    let terms = spec
        .pointer("/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms")
        .and_then(Value::as_array);
    let names_label = terms.into_iter().flatten().any(|t| {
        t.get("matchExpressions")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .any(|e| e.get("key").and_then(Value::as_str) == Some(EDGE_LABEL))
    });
    names_label
        || spec
            .get("nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| a.is_edge_node(n))
}

/// The JSON patch giving `pod` unlimited unreachable / not-ready
/// tolerations, or `None` if it has them already.
pub(super) fn toleration_patch(pod: &Value) -> Option<Value> {
    if pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(OPT_OUT))
        .and_then(Value::as_str)
        == Some("off")
    {
        return None;
    }
    let current: Vec<Value> = pod
        .pointer("/spec/tolerations")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let limited = |t: &Value| {
        let key = t.get("key").and_then(Value::as_str).unwrap_or_default();
        TAINTS.contains(&key)
            && t.get("effect").and_then(Value::as_str) == Some("NoExecute")
            && t.get("tolerationSeconds").is_some_and(|s| !s.is_null())
    };
    let unlimited = |taint: &str| {
        current.iter().any(|t| {
            t.get("key").and_then(Value::as_str) == Some(taint)
                && t.get("effect").and_then(Value::as_str) == Some("NoExecute")
                && t.get("tolerationSeconds").is_none_or(Value::is_null)
        })
    };
    if TAINTS.iter().all(|t| unlimited(t)) && !current.iter().any(limited) {
        return None;
    }
    let mut out: Vec<Value> = current.iter().filter(|t| !limited(t)).cloned().collect();
    for taint in TAINTS {
        if !unlimited(taint) {
            out.push(json!({"key": taint, "operator": "Exists", "effect": "NoExecute"}));
        }
    }
    Some(json!([{"op": "add", "path": "/spec/tolerations", "value": out}]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::toleration_patch;
    use serde_json::json;

    #[test]
    fn limited_tolerations_become_unlimited_and_others_stay() {
        let pod = json!({"spec": {"tolerations": [
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists",
             "effect": "NoExecute", "tolerationSeconds": 300},
            {"key": "dedicated", "operator": "Equal", "value": "edge", "effect": "NoSchedule"}]}});
        let patch = toleration_patch(&pod).unwrap();
        let value = patch[0]["value"].as_array().unwrap();
        assert_eq!(value.len(), 3);
        assert_eq!(value[0]["key"], "dedicated");
        assert!(
            value
                .iter()
                .skip(1)
                .all(|t| t.get("tolerationSeconds").is_none())
        );
        let mut patched = pod.clone();
        patched["spec"]["tolerations"] = patch[0]["value"].clone();
        assert_eq!(
            toleration_patch(&patched),
            None,
            "a second pass changes nothing"
        );
        let mut opted_out = pod.clone();
        opted_out["metadata"] = json!({"annotations": {"keel.io/autonomy": "off"}});
        assert_eq!(toleration_patch(&opted_out), None);
        let bare = json!({"spec": {}});
        assert_eq!(
            toleration_patch(&bare).unwrap()[0]["value"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }
}
