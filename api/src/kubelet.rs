//! The kubelet's streaming API, served for edge nodes by cloudcore when it
//! is attached to a real Kubernetes cluster: the API server answers
//! `kubectl logs`, `exec`, `attach` and `port-forward` by calling the
//! kubelet of the pod's node at the Node's address and kubelet port, and
//! keel's Nodes name cloudcore's stream server there. So the API server
//! reaches every edge pod through cloudcore and the node's own QUIC
//! connection: no port, no route and no iptables rule on the edge.
//!
//! Paths, as the API server builds them:
//! - `GET /containerLogs/{namespace}/{pod}/{container}?follow=…` (the body
//!   streams);
//! - `/exec/{namespace}/{pod}/{container}?command=…&input=1&output=1&error=1&tty=1`
//!   and `/attach/{namespace}/{pod}/{container}?…`: an HTTP/1.1 upgrade to
//!   SPDY/3.1 with `X-Stream-Protocol-Version` (the API server translates
//!   kubectl's WebSocket into this), served by `remotecommand`;
//! - `/portForward/{namespace}/{pod}`: an upgrade to SPDY/3.1 with
//!   `X-Stream-Protocol-Version: portforward.k8s.io`, kubectl's own SPDY
//!   connection relayed by the API server, served by `portforward`.
//!
//! The TLS configuration the caller gives decides which client
//! certificates are accepted (the API server's kubelet client certificate
//! is issued by the cluster's CA); [`KubeletAuth`] then decides, per
//! request, whether that client may use the node's kubelet API
//! (cloudcore asks the API server: `nodes/proxy` of the pod's node, as a
//! kubelet with webhook authorization does).

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{CONNECTION, CONTENT_TYPE, HeaderValue, UPGRADE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, info_span};

use crate::exec::ExecRequest;
use crate::server::{
    ApiBody, LogRequest, PodStreams, ReadObjects, Resp, decode, on_upgrade, query_map,
    query_values, serve_tls, status_resp,
};
use crate::status::Status;

/// What the caller of a request may do with a node's kubelet API.
pub type AuthFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Status>> + Send + 'a>>;

/// Decides whether a client may use the kubelet API of a node.
pub trait KubeletAuth: Send + Sync + 'static {
    /// Whether the client whose (TLS-verified) certificate is `cert` (DER)
    /// may `verb` (`get` or `create`) the `nodes/proxy` of `node`; the
    /// refusal is answered as it is (403 with a reason).
    fn allow<'a>(&'a self, cert: &'a [u8], node: &'a str, verb: &'a str) -> AuthFuture<'a>;
}

/// The running stream server.
#[derive(Debug)]
pub struct KubeletServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

struct Server {
    reader: Arc<dyn ReadObjects>,
    streams: PodStreams,
    auth: Arc<dyn KubeletAuth>,
}

impl KubeletServer {
    /// Serves the kubelet streaming API on `addr` with `tls` (which should
    /// require client certificates from the cluster's CA), pods read from
    /// `reader`, streams through `streams`, each request allowed by `auth`.
    pub async fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        reader: Arc<dyn ReadObjects>,
        streams: PodStreams,
        auth: Arc<dyn KubeletAuth>,
    ) -> std::io::Result<KubeletServer> {
        let server = Arc::new(Server {
            reader,
            streams,
            auth,
        });
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        info!(%addr, "kubelet stream API listening");
        let task = tokio::spawn(serve_tls(
            listener,
            tls,
            "kubelet API",
            |peer| info_span!("kubelet_api", %peer),
            move |cert| {
                let server = server.clone();
                let cert: Arc<[u8]> = cert.unwrap_or_default().into();
                hyper::service::service_fn(move |req| {
                    let (server, cert) = (server.clone(), cert.clone());
                    async move {
                        let r = match server.handle(req, &cert).await {
                            Ok(r) => r,
                            Err(s) => status_resp(&s),
                        };
                        Ok::<_, std::convert::Infallible>(r)
                    }
                })
            },
        ));
        Ok(KubeletServer { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(&self) {
        self.task.abort();
    }
}

impl Drop for KubeletServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn not_found(what: &str) -> Status {
    Status::new(404, "NotFound", what.to_owned())
}

fn unsupported(what: &str) -> Status {
    Status::new(
        405,
        "MethodNotAllowed",
        format!("{what} is not served for keel's edge nodes"),
    )
}

/// The values of a header that may be repeated or comma-separated.
fn header_values<'a>(req: &'a Request<Incoming>, name: &str) -> Vec<&'a str> {
    req.headers()
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect()
}

/// The `101 Switching Protocols` answer to an upgrade to SPDY/3.1 with
/// stream protocol `protocol`.
fn switching_to_spdy(protocol: &'static str) -> Resp {
    let mut r = Response::new(ApiBody::Full(None));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("SPDY/3.1"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        "x-stream-protocol-version",
        HeaderValue::from_static(protocol),
    );
    r
}

/// The remotecommand protocol to answer a SPDY upgrade for `what` (exec
/// or attach) with, or why it cannot be (as the kubelet answers).
pub(crate) fn spdy_exec_protocol(
    req: &Request<Incoming>,
    what: &str,
) -> Result<&'static str, Status> {
    if !wants_spdy(req) {
        return Err(Status::bad_request(format!(
            "{what} needs an upgrade to SPDY/3.1"
        )));
    }
    let offered = header_values(req, "x-stream-protocol-version");
    if offered.is_empty() {
        return Err(Status::bad_request(
            "unable to upgrade: no X-Stream-Protocol-Version given",
        ));
    }
    crate::remotecommand::negotiate(offered.iter().copied()).ok_or_else(|| {
        Status::new(
            403,
            "Forbidden",
            format!(
                "unable to upgrade: unable to negotiate protocol: client supports {offered:?}, server supports {:?}",
                crate::remotecommand::PROTOCOLS
            ),
        )
    })
}

/// Answers a SPDY upgrade with `protocol` and serves `er` on it through
/// `streams` once upgraded.
pub(crate) fn spdy_exec_upgrade(
    req: &mut Request<Incoming>,
    protocol: &'static str,
    er: ExecRequest,
    streams: crate::exec::ExecStreams,
) -> Resp {
    on_upgrade(req, move |io| {
        crate::remotecommand::serve_spdy(io, protocol, er, streams)
    });
    switching_to_spdy(protocol)
}

/// Whether `req` is an upgrade to SPDY for port-forward.
pub(crate) fn spdy_portforward_check(req: &Request<Incoming>) -> Result<(), Status> {
    let offered = header_values(req, "x-stream-protocol-version");
    if !wants_spdy(req) || !offered.contains(&crate::portforward::SPDY_PROTOCOL) {
        return Err(Status::bad_request(format!(
            "port-forward needs an upgrade to SPDY/3.1 with protocol {}; offered {offered:?}",
            crate::portforward::SPDY_PROTOCOL
        )));
    }
    Ok(())
}

/// Answers a SPDY upgrade for port-forward and serves it once upgraded.
pub(crate) fn spdy_portforward_upgrade(
    req: &mut Request<Incoming>,
    pod: Value,
    namespace: String,
    name: String,
    forwarder: std::sync::Arc<dyn crate::portforward::PodPortForward>,
) -> Resp {
    on_upgrade(req, move |io| {
        crate::portforward::serve_spdy(io, pod, namespace, name, forwarder)
    });
    switching_to_spdy(crate::portforward::SPDY_PROTOCOL)
}

/// Whether `req` asks to upgrade to SPDY/3.1.
pub(crate) fn wants_spdy(req: &Request<Incoming>) -> bool {
    header_values(req, "upgrade")
        .iter()
        .any(|u| u.eq_ignore_ascii_case("SPDY/3.1"))
}

impl Server {
    async fn handle(&self, mut req: Request<Incoming>, cert: &[u8]) -> Result<Resp, Status> {
        let path = req.uri().path().to_owned();
        let segs: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(decode)
            .collect::<Vec<_>>();
        let segs: Vec<&str> = segs.iter().map(String::as_str).collect();
        let (what, namespace, pod, container) = match segs.as_slice() {
            [w @ ("containerLogs" | "exec" | "attach"), ns, pod, c] => (*w, *ns, *pod, Some(*c)),
            [w @ "portForward", ns, pod] => (*w, *ns, *pod, None),
            // `exec` and `attach` by pod UID: the API server does not use them.
            [w @ ("exec" | "attach"), _, _, _, _] => return Err(unsupported(w)),
            _ => return Err(not_found(&format!("the path {path} is not served"))),
        };
        let pod_obj = self
            .reader
            .get(&format!("pods/{namespace}/{pod}"))
            .ok_or_else(|| not_found(&format!("pod {namespace}/{pod} not found")))?;
        let node = pod_obj
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let verb = if req.method() == Method::GET && what == "containerLogs" {
            "get"
        } else {
            "create"
        };
        self.auth.allow(cert, &node, verb).await?;
        let query: BTreeMap<String, String> = query_map(req.uri().query());
        debug!(%what, %namespace, %pod, %node, "kubelet API request");
        match what {
            "containerLogs" => {
                let logs = self
                    .streams
                    .logs
                    .as_ref()
                    .ok_or_else(|| unsupported("containerLogs"))?;
                let lr =
                    LogRequest::from_query(namespace, pod, container.map(str::to_owned), &query)?;
                let rx = logs.logs(&pod_obj, &lr).await?;
                let mut r = Response::new(ApiBody::Stream(rx));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                Ok(r)
            }
            "exec" | "attach" => {
                let exec = self.streams.exec.clone().ok_or_else(|| unsupported(what))?;
                exec.check(&pod_obj, pod)?;
                let flag = |k: &str| query.get(k).is_some_and(|v| v == "1" || v == "true");
                let command = query_values(req.uri().query(), "command");
                let er = ExecRequest {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                    container: container.map(str::to_owned),
                    command,
                    stdin: flag("input"),
                    stdout: flag("output"),
                    stderr: flag("error"),
                    tty: flag("tty"),
                    attach: what == "attach",
                };
                if !(er.stdin || er.stdout || er.stderr) {
                    return Err(Status::bad_request(
                        "you must specify at least 1 of stdin, stdout, stderr",
                    ));
                }
                if !er.attach && er.command.is_empty() {
                    return Err(Status::bad_request(
                        "you must specify at least one command for the container",
                    ));
                }
                let protocol = spdy_exec_protocol(&req, what)?;
                let streams = exec.exec(&pod_obj, &er).await?;
                Ok(spdy_exec_upgrade(&mut req, protocol, er, streams))
            }
            _ => {
                let forwarder = self
                    .streams
                    .portforward
                    .clone()
                    .ok_or_else(|| unsupported("portForward"))?;
                forwarder.check(&pod_obj, pod)?;
                spdy_portforward_check(&req)?;
                Ok(spdy_portforward_upgrade(
                    &mut req,
                    pod_obj,
                    namespace.to_owned(),
                    pod.to_owned(),
                    forwarder,
                ))
            }
        }
    }
}
