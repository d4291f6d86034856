//! The Kubernetes API server: enough of the Kubernetes REST API that an
//! unmodified kubectl works against cloudcore (HTTPS, cluster CA, admin
//! client certificate) and against an edgecore (plain HTTP on loopback,
//! read-only).
//!
//! Served here: discovery (`/api`, `/apis`, resource lists), a minimal
//! OpenAPI (`/openapi/v3` per group version declaring server-side field
//! validation, and an empty `/openapi/v2`), and for every type in
//! [`resources::RESOURCES`]: get, list (label and field selectors), watch
//! (resumable from a resourceVersion; `410 Gone` when too old; the
//! `sendInitialEvents` form kubectl's delete uses), the `status`
//! subresource, `as=Table` answers for `kubectl get`, and container logs
//! (`pods/<name>/log`) where a [`PodLogs`] is given. Objects are read
//! through [`ReadObjects`]; create, update, patch and delete go to the
//! server's [`WriteObjects`] (cloudcore's registry), or get `405
//! MethodNotAllowed` on a read-only server.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::service::Service;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::resources::{self, ResourceType};
use crate::select::{FieldSelector, LabelSelector};
use crate::status::Status;
use crate::watch;

/// Largest request body accepted.
pub const MAX_BODY: usize = 3 << 20;

/// A response body: whole, or streamed (watch).
#[derive(Debug)]
pub enum ApiBody {
    Full(Option<Bytes>),
    Stream(mpsc::Receiver<Bytes>),
}

impl hyper::body::Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Stream(rx) => rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }
}

pub(crate) type Resp = Response<ApiBody>;

pub(crate) fn respond(code: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(ApiBody::Full(Some(body.into())));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(CONTENT_TYPE, v);
    }
    r
}

fn json_resp(code: u16, v: &Value) -> Resp {
    respond(
        code,
        "application/json",
        serde_json::to_vec(v).unwrap_or_default(),
    )
}

pub(crate) fn status_resp(s: &Status) -> Resp {
    json_resp(s.code, &s.to_json())
}

/// The running API server.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

/// What serves a pod's container streams (cloudcore: each node's own
/// connection); what is `None` is refused.
#[derive(Clone, Default)]
pub struct PodStreams {
    /// `kubectl logs`.
    pub logs: Option<Arc<dyn PodLogs>>,
    /// `kubectl exec` and `kubectl attach`.
    pub exec: Option<Arc<dyn crate::exec::PodExec>>,
    /// `kubectl port-forward`.
    pub portforward: Option<Arc<dyn crate::portforward::PodPortForward>>,
}

impl std::fmt::Debug for PodStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodStreams")
            .field("logs", &self.logs.is_some())
            .field("exec", &self.exec.is_some())
            .field("portforward", &self.portforward.is_some())
            .finish()
    }
}

impl ApiServer {
    /// Serves the API on `addr` with `tls` (which should require client
    /// certificates from the cluster CA): reads from `reader`, writes to
    /// `writer`, container logs, exec, attach and port-forward through
    /// `streams`. Only a client whose
    /// certificate `admin` accepts may use it; any other gets `403
    /// Forbidden`.
    pub async fn bind(
        addr: SocketAddr,
        tls: rustls::ServerConfig,
        reader: Arc<dyn ReadObjects>,
        writer: Arc<dyn WriteObjects>,
        streams: PodStreams,
        admin: fn(&[u8]) -> bool,
    ) -> std::io::Result<ApiServer> {
        let PodStreams {
            logs,
            exec,
            portforward,
        } = streams;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        info!(%addr, "kubernetes API listening");
        let server = Arc::new(Server {
            reader,
            writer: Some(writer),
            logs,
            exec,
            portforward,
            addr: addr.to_string(),
        });
        let task = tokio::spawn(serve_tls(
            listener,
            tls,
            "API",
            |peer| info_span!("api", %peer),
            // Only the admin certificate may use the API; node
            // certificates speak the sync protocol, not this.
            move |cert| api_service(server.clone(), cert.is_some_and(admin)),
        ));
        Ok(ApiServer { addr, task })
    }

    /// Serves a read-only API on `addr` (edgecore's offline API, as
    /// KubeEdge's MetaServer): get, list and watch from `reader`, container
    /// logs from `logs`; every write is refused with `405
    /// MethodNotAllowed`. Without `tls`, plain HTTP with no authentication
    /// (for loopback only); with it (which must require client
    /// certificates), HTTPS where only the cluster admin's certificate
    /// ([`crate::auth::is_admin_cert`]) is served and any other gets `403
    /// Forbidden`.
    pub async fn bind_read_only(
        addr: SocketAddr,
        reader: Arc<dyn ReadObjects>,
        logs: Option<Arc<dyn PodLogs>>,
        tls: Option<rustls::ServerConfig>,
    ) -> std::io::Result<ApiServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let server = Arc::new(Server {
            reader,
            writer: None,
            logs,
            exec: None,
            portforward: None,
            addr: addr.to_string(),
        });
        let task = match tls {
            Some(tls) => {
                info!(%addr, "read-only kubernetes API listening (HTTPS, client certificates)");
                tokio::spawn(serve_tls(
                    listener,
                    tls,
                    "API",
                    |peer| info_span!("edge_api", %peer),
                    move |cert| {
                        api_service(server.clone(), cert.is_some_and(crate::auth::is_admin_cert))
                    },
                ))
            }
            None => {
                info!(%addr, "read-only kubernetes API listening");
                tokio::spawn(accept_loop(listener, move |tcp, peer| {
                    serve_http(tcp, api_service(server.clone(), true), "API")
                        .instrument(info_span!("edge_api", %peer))
                }))
            }
        };
        Ok(ApiServer { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(&self) {
        self.task.abort();
    }
}

/// The read side of the API: cloudcore's registry, or edgecore's
/// local view of its node's objects.
pub trait ReadObjects: Send + Sync + 'static {
    /// The object at `key`, with its `resourceVersion`.
    fn get(&self, key: &str) -> Option<Value>;
    /// Every object whose key starts with `prefix`, and the list's
    /// resourceVersion.
    fn list(&self, prefix: &str) -> (Vec<Value>, u64);
    /// Events after `rv` still held, and the live feed.
    fn watch(&self, rv: u64) -> Result<watch::WatchStart, Status>;
}

/// What a write answers: the HTTP status (200, or 201 when it created the
/// object) and the object.
pub type Written = (u16, Value);

/// A write in progress.
pub type WriteFuture<'a> = Pin<Box<dyn Future<Output = Result<Written, Status>> + Send + 'a>>;

/// The write side of the API (cloudcore's registry): the server routes a
/// request and reads its body; what the body means, validation and the
/// write itself are the implementation's.
pub trait WriteObjects: Send + Sync + 'static {
    /// POST to the collection `t`; `strict`: unknown fields are an error
    /// (`fieldValidation` other than `Ignore` or `Warn`).
    fn create<'a>(&'a self, t: &'a Target, body: Bytes, strict: bool) -> WriteFuture<'a>;
    /// PUT of the object `name` (or of its subresource `sub`).
    fn update<'a>(
        &'a self,
        t: &'a Target,
        name: &'a str,
        sub: Option<&'a str>,
        body: Bytes,
        strict: bool,
    ) -> WriteFuture<'a>;
    /// PATCH of the object `name` (or of its subresource `sub`) with a
    /// patch of `content_type`.
    fn patch<'a>(
        &'a self,
        t: &'a Target,
        name: &'a str,
        sub: Option<&'a str>,
        content_type: &'a str,
        body: Bytes,
        force: bool,
    ) -> WriteFuture<'a>;
    /// DELETE of the object `name`.
    fn delete<'a>(&'a self, t: &'a Target, name: &'a str) -> WriteFuture<'a>;
}

/// What `kubectl logs` asks for.
#[derive(Debug, Clone, Default)]
pub struct LogRequest {
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
    pub follow: bool,
    pub previous: bool,
    pub tail_lines: Option<u64>,
    pub limit_bytes: Option<u64>,
    /// Each line prefixed with the time the node read it (RFC 3339).
    pub timestamps: bool,
    /// Only lines read at most this many seconds ago (by the node's clock).
    pub since_seconds: Option<u64>,
    /// Only lines read at or after this time (RFC 3339; checked on parse).
    pub since_time: Option<String>,
}

impl LogRequest {
    /// The request as JSON (what cloudcore sends an edge through the
    /// node's connection; the query parameters' names).
    pub fn to_json(&self) -> Value {
        json!({"op": "log", "namespace": self.namespace, "pod": self.pod,
            "container": self.container, "follow": self.follow, "previous": self.previous,
            "tailLines": self.tail_lines, "limitBytes": self.limit_bytes,
            "timestamps": self.timestamps, "sinceSeconds": self.since_seconds,
            "sinceTime": self.since_time})
    }

    /// A request from its JSON form.
    pub fn from_json(v: &Value) -> Result<LogRequest, Status> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
        let b = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let n = |k: &str| v.get(k).and_then(Value::as_u64);
        if v.get("op").and_then(Value::as_str) != Some("log") {
            return Err(Status::bad_request("not a log request"));
        }
        LogRequest {
            namespace: s("namespace").ok_or_else(|| Status::bad_request("no namespace"))?,
            pod: s("pod").ok_or_else(|| Status::bad_request("no pod"))?,
            container: s("container"),
            follow: b("follow"),
            previous: b("previous"),
            tail_lines: n("tailLines"),
            limit_bytes: n("limitBytes"),
            timestamps: b("timestamps"),
            since_seconds: n("sinceSeconds"),
            since_time: s("sinceTime"),
        }
        .checked()
    }

    /// From a `pods/NAME/log` (or kubelet `containerLogs`) query.
    pub fn from_query(
        namespace: &str,
        pod: &str,
        container: Option<String>,
        query: &BTreeMap<String, String>,
    ) -> Result<LogRequest, Status> {
        let num = |k: &str| -> Result<Option<u64>, Status> {
            query
                .get(k)
                .map(|v| {
                    v.parse()
                        .map_err(|_| Status::bad_request(format!("invalid {k} {v:?}")))
                })
                .transpose()
        };
        let flag = |k: &str| query.get(k).is_some_and(|v| v == "true" || v == "1");
        LogRequest {
            namespace: namespace.to_owned(),
            pod: pod.to_owned(),
            container,
            follow: flag("follow"),
            previous: flag("previous"),
            tail_lines: num("tailLines")?,
            limit_bytes: num("limitBytes")?,
            timestamps: flag("timestamps"),
            since_seconds: num("sinceSeconds")?,
            since_time: query.get("sinceTime").cloned(),
        }
        .checked()
    }

    /// The time before which lines are left out (`since_time`, or
    /// `since_seconds` before `now`).
    pub fn since(&self, now: time::OffsetDateTime) -> Option<time::OffsetDateTime> {
        let time = self.since_time.as_deref().and_then(|t| {
            time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
        });
        let seconds = self
            .since_seconds
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| now.checked_sub(time::Duration::seconds(s)));
        time.or(seconds)
    }

    /// Refuses what the Kubernetes API refuses: both `sinceSeconds` and
    /// `sinceTime`, a `sinceSeconds` under 1, a `sinceTime` that is not RFC
    /// 3339, a negative count.
    fn checked(self) -> Result<LogRequest, Status> {
        if self.since_seconds.is_some() && self.since_time.is_some() {
            return Err(Status::bad_request(
                "at most one of sinceTime or sinceSeconds may be specified",
            ));
        }
        if self.since_seconds == Some(0) {
            return Err(Status::bad_request("sinceSeconds: must be greater than 0"));
        }
        if let Some(t) = &self.since_time
            && time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .is_err()
        {
            return Err(Status::bad_request(format!(
                "sinceTime: {t:?} is not an RFC 3339 time"
            )));
        }
        Ok(self)
    }
}

/// A pending answer of [`PodLogs`].
pub type LogsFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<mpsc::Receiver<Bytes>, Status>> + Send + 'a>,
>;

/// Container logs: served where the containers run (edgecore), and by
/// cloudcore through each node's own connection.
pub trait PodLogs: Send + Sync + 'static {
    /// The log of one container of `pod` (a Pod object), as a stream of
    /// chunks; the stream ends when the log does (or, with `follow`, when
    /// the container is gone or the client leaves).
    fn logs<'a>(&'a self, pod: &'a Value, req: &'a LogRequest) -> LogsFuture<'a>;
}

/// Accepts connections forever, each handled by its own task.
async fn accept_loop<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                // Small writes (a response's head, then a log line) go out
                // at once, not after the peer's delayed ack.
                let _ = tcp.set_nodelay(true);
                tokio::spawn(handle(tcp, peer));
            }
            Err(e) => {
                warn!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves HTTPS on `listener` with `tls`: each connection (in the span
/// `span` makes for its peer) has 10 s for the TLS handshake, then is
/// served HTTP/1.1 by the service `service` makes for the client's
/// certificate (the first it gave, DER). `api` names the API in the log.
pub(crate) async fn serve_tls<F, S>(
    listener: TcpListener,
    mut tls: rustls::ServerConfig,
    api: &'static str,
    span: fn(SocketAddr) -> tracing::Span,
    service: F,
) where
    F: Fn(Option<&[u8]>) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Resp, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
{
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let service = Arc::new(service);
    accept_loop(listener, move |tcp, peer| {
        let (acceptor, service) = (acceptor.clone(), service.clone());
        async move {
            let tls = match tokio::time::timeout(
                std::time::Duration::from_secs(10),
                acceptor.accept(tcp),
            )
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    debug!(error = %e, "{api} TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let service = service(cert.map(|c| c.as_ref()));
            serve_http(tls, service, api).await;
        }
        .instrument(span(peer))
    })
    .await;
}

/// HTTP/1.1 (with upgrades) on one connection, answered by `service`.
async fn serve_http<IO, S>(io: IO, service: S, api: &str)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Resp, Error = Infallible>,
    S::Future: Send + 'static,
{
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(Some(std::time::Duration::from_secs(30)));
    if let Err(e) = b
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await
    {
        debug!(error = %e, "{api} connection ended with an error");
    }
}

/// The API's service on one connection; `allowed` is false for a client
/// the API refuses (every request then gets 403).
fn api_service(
    server: Arc<Server>,
    allowed: bool,
) -> impl Service<Request<Incoming>, Response = Resp, Error = Infallible, Future: Send + 'static>
+ Send
+ 'static {
    hyper::service::service_fn(move |req| {
        let server = server.clone();
        async move {
            if !allowed {
                let s = Status::new(
                    403,
                    "Forbidden",
                    "only the cluster admin certificate may use the Kubernetes API",
                );
                return Ok::<_, Infallible>(status_resp(&s));
            }
            Ok::<_, Infallible>(server.handle(req).await)
        }
    })
}

#[derive(Clone)]
struct Server {
    reader: Arc<dyn ReadObjects>,
    writer: Option<Arc<dyn WriteObjects>>,
    logs: Option<Arc<dyn PodLogs>>,
    exec: Option<Arc<dyn crate::exec::PodExec>>,
    portforward: Option<Arc<dyn crate::portforward::PodPortForward>>,
    addr: String,
}

/// What a URL names: a resource type and, as the URL gives them, the
/// namespace, the object's name and a subresource (`status`, `log`).
#[derive(Debug)]
pub struct Target {
    pub rt: &'static ResourceType,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub sub: Option<String>,
}

/// Every value of a repeated query parameter, in order.
pub(crate) fn query_values(q: Option<&str>, key: &str) -> Vec<String> {
    q.unwrap_or_default()
        .split('&')
        .filter_map(|p| p.split_once('=').filter(|(k, _)| decode(k) == key))
        .map(|(_, v)| decode(v))
        .collect()
}

pub(crate) fn query_map(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

pub(crate) fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%'
            && let Some(h) = b.get(i + 1..i + 3)
            && let Ok(h) = std::str::from_utf8(h)
            && let Ok(v) = u8::from_str_radix(h, 16)
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(if c == b'+' { b' ' } else { c });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_target(segs: &[&str]) -> Option<Target> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] if !matches!(*plural, "status" | "finalize") => {
            (Some((*ns).to_owned()), {
                let mut v = vec![*plural];
                v.extend_from_slice(rest);
                v
            })
        }
        _ => (None, rest.to_vec()),
    };
    let (plural, name, sub) = match rest.as_slice() {
        [p] => (*p, None, None),
        [p, n] => (*p, Some((*n).to_owned()), None),
        [p, n, s] => (*p, Some((*n).to_owned()), Some((*s).to_owned())),
        _ => return None,
    };
    let rt = resources::find(group, version, plural)?;
    if namespace.is_some() && !rt.namespaced {
        return None;
    }
    Some(Target {
        rt,
        namespace,
        name,
        sub,
    })
}

fn wants_table(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("as=Table"))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Status> {
    use http_body_util::BodyExt;
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    match limited.collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(Status::new(
            413,
            "RequestEntityTooLarge",
            format!("request body: {e}"),
        )),
    }
}

/// Server-side strict field validation unless the request turns it off.
fn strict(query: &BTreeMap<String, String>) -> bool {
    !matches!(
        query.get("fieldValidation").map(String::as_str),
        Some("Ignore" | "Warn")
    )
}

fn written((code, obj): Written) -> Resp {
    json_resp(code, &obj)
}

impl Server {
    async fn handle(&self, req: Request<Incoming>) -> Resp {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let r = self.route(req).await;
        let resp = match r {
            Ok(r) => r,
            Err(s) => status_resp(&s),
        };
        debug!(%method, %path, status = resp.status().as_u16(), "api request");
        resp
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Resp, Status> {
        let path = req.uri().path().trim_end_matches('/').to_owned();
        let query = query_map(req.uri().query());
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let get = req.method() == Method::GET;
        match segs.as_slice() {
            ["version"] if get => {
                return Ok(json_resp(
                    200,
                    &json!({"major": "1", "minor": "37", "gitVersion": "v1.37.0-keel",
                        "gitCommit": "", "gitTreeState": "clean", "buildDate": "",
                        "goVersion": "", "compiler": "rustc",
                        "platform": format!("{}/{}", std::env::consts::OS, std::env::consts::ARCH)}),
                ));
            }
            ["healthz" | "readyz" | "livez"] if get => return Ok(respond(200, "text/plain", "ok")),
            ["api"] if get => return Ok(json_resp(200, &resources::api_versions(&self.addr))),
            ["apis"] if get => return Ok(json_resp(200, &resources::api_group_list())),
            ["apis", g] if get => {
                return resources::api_group(g)
                    .map(|v| json_resp(200, &v))
                    .ok_or_else(|| {
                        Status::new(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        )
                    });
            }
            ["api", v] if get => {
                return resources::resource_list("", v)
                    .map(|v| json_resp(200, &v))
                    .ok_or_else(|| {
                        Status::new(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        )
                    });
            }
            ["apis", g, v] if get => {
                return resources::resource_list(g, v)
                    .map(|v| json_resp(200, &v))
                    .ok_or_else(|| {
                        Status::new(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        )
                    });
            }
            ["openapi", "v2"] if get => {
                // An empty protobuf document: kubectl then skips client-side
                // schema validation (the server validates).
                return Ok(respond(
                    200,
                    "application/com.github.proto-openapi.spec.v2.v1.0+protobuf",
                    Bytes::new(),
                ));
            }
            ["openapi", "v3"] if get => return Ok(json_resp(200, &resources::openapi_v3_root())),
            ["openapi", "v3", rest @ ..] if get => {
                return resources::openapi_v3_group(&rest.join("/"))
                    .map(|v| json_resp(200, &v))
                    .ok_or_else(|| {
                        Status::new(
                            404,
                            "NotFound",
                            "the server could not find the requested resource",
                        )
                    });
            }
            _ => {}
        }
        let Some(t) = parse_target(&segs) else {
            return Err(Status::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ));
        };
        let table = wants_table(&req);
        let method = req.method().clone();
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        match (&method, &t.name, t.sub.as_deref()) {
            (&Method::GET, None, None) => {
                if matches!(query.get("watch").map(String::as_str), Some("true" | "1")) {
                    self.watch(&t, &query, table)
                } else {
                    self.list(&t, &query, table)
                }
            }
            (&Method::GET, Some(name), None) => {
                let obj = self.get_or_404(&t, name)?;
                Ok(self.one(t.rt, &obj, table))
            }
            (&Method::GET, Some(name), Some("status")) if t.rt.has_status => {
                let obj = self.get_or_404(&t, name)?;
                Ok(json_resp(200, &obj))
            }
            (&Method::GET | &Method::POST, Some(name), Some(sub @ ("exec" | "attach")))
                if t.rt.plural == "pods" =>
            {
                let (name, attach) = (name.clone(), sub == "attach");
                return self.exec(req, &t, &name, &query, attach).await;
            }
            (&Method::GET | &Method::POST, Some(name), Some("portforward"))
                if t.rt.plural == "pods" =>
            {
                let name = name.clone();
                return self.portforward(req, &t, &name).await;
            }
            (&Method::GET, Some(name), Some("log")) if t.rt.plural == "pods" => {
                let pod = self.get_or_404(&t, name)?;
                let Some(logs) = &self.logs else {
                    let node = pod
                        .pointer("/spec/nodeName")
                        .and_then(Value::as_str)
                        .unwrap_or("<none>");
                    return Err(Status::new(
                        503,
                        "ServiceUnavailable",
                        format!(
                            "container logs stay on edge node {node}: read them with kubectl against that node's edge API"
                        ),
                    ));
                };
                let namespace = t.namespace.clone().unwrap_or_else(|| "default".into());
                let lr = LogRequest::from_query(
                    &namespace,
                    name,
                    query.get("container").cloned(),
                    &query,
                )?;
                let rx = logs.logs(&pod, &lr).await?;
                let mut r = Response::new(ApiBody::Stream(rx));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                Ok(r)
            }
            (&Method::POST, None, None) => {
                let writer = self.writer()?;
                let body = read_body(req).await?;
                writer.create(&t, body, strict(&query)).await.map(written)
            }
            (&Method::PUT, Some(name), sub) => {
                let writer = self.writer()?;
                let body = read_body(req).await?;
                writer
                    .update(&t, name, sub, body, strict(&query))
                    .await
                    .map(written)
            }
            (&Method::PATCH, Some(name), sub) => {
                let writer = self.writer()?;
                let body = read_body(req).await?;
                let force = query.get("force").is_some_and(|f| f == "true");
                writer
                    .patch(&t, name, sub, &content_type, body, force)
                    .await
                    .map(written)
            }
            (&Method::DELETE, Some(name), None) => {
                self.writer()?.delete(&t, name).await.map(written)
            }
            _ => Err(Status::new(
                405,
                "MethodNotAllowed",
                format!(
                    "{method} is not supported on {}{}",
                    t.rt.qualified(),
                    t.sub.map(|s| format!("/{s}")).unwrap_or_default()
                ),
            )),
        }
    }

    /// The object `name` of `t`, or `404 NotFound`.
    fn get_or_404(&self, t: &Target, name: &str) -> Result<Value, Status> {
        self.reader
            .get(&t.rt.key(t.namespace.as_deref(), name))
            .ok_or_else(|| Status::not_found(t.rt, name))
    }

    /// `kubectl exec` and `kubectl attach`: a WebSocket upgrade
    /// (`v5.channel.k8s.io`) relayed to the pod's exec (or attach).
    async fn exec(
        &self,
        mut req: Request<Incoming>,
        t: &Target,
        name: &str,
        query: &BTreeMap<String, String>,
        attach: bool,
    ) -> Result<Resp, Status> {
        use crate::exec::{ExecRequest, PROTOCOL};
        let pod = self.get_or_404(t, name)?;
        let Some(exec) = &self.exec else {
            return Err(Status::new(
                405,
                "MethodNotAllowed",
                "exec and attach are served by cloudcore, not by this API",
            ));
        };
        let what = if attach { "attach" } else { "exec" };
        let ws_key = websocket_key(&req, PROTOCOL);
        // Else SPDY: what kubectl falls back to when WebSocket is refused
        // (or turned off with KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false).
        if ws_key.is_none() && !crate::kubelet::wants_spdy(&req) {
            exec.check(&pod, name)?;
            return Err(not_websocket(&req, what, PROTOCOL, "1.30"));
        }
        let commands = query_values(req.uri().query(), "command");
        let namespace = t.namespace.clone().unwrap_or_else(|| "default".into());
        let er = if attach {
            ExecRequest::attach_from_query(&namespace, name, query)?
        } else {
            ExecRequest::from_query(&namespace, name, query, commands)?
        };
        let Some(ws_key) = ws_key else {
            exec.check(&pod, name)?;
            let protocol = crate::kubelet::spdy_exec_protocol(&req, what)?;
            let streams = exec.exec(&pod, &er).await?;
            return Ok(crate::kubelet::spdy_exec_upgrade(
                &mut req, protocol, er, streams,
            ));
        };
        let streams = exec.exec(&pod, &er).await?;
        on_upgrade(&mut req, move |io| crate::exec::relay(io, streams));
        Ok(switching(&ws_key, PROTOCOL))
    }

    /// `kubectl port-forward`: a WebSocket upgrade carrying SPDY
    /// (`SPDY/3.1+portforward.k8s.io`, as kubectl 1.31 and newer speak it),
    /// each forwarded connection opened through `portforward`.
    async fn portforward(
        &self,
        mut req: Request<Incoming>,
        t: &Target,
        name: &str,
    ) -> Result<Resp, Status> {
        use crate::portforward::PROTOCOL;
        let pod = self.get_or_404(t, name)?;
        let Some(forwarder) = self.portforward.clone() else {
            return Err(Status::new(
                405,
                "MethodNotAllowed",
                "port-forward is served by cloudcore, not by this API",
            ));
        };
        forwarder.check(&pod, name)?;
        let Some(ws_key) = websocket_key(&req, PROTOCOL) else {
            // kubectl's fallback (or KUBECTL_PORT_FORWARD_WEBSOCKETS=false):
            // SPDY on the connection itself.
            if crate::kubelet::wants_spdy(&req) {
                crate::kubelet::spdy_portforward_check(&req)?;
                let namespace = t.namespace.clone().unwrap_or_else(|| "default".into());
                return Ok(crate::kubelet::spdy_portforward_upgrade(
                    &mut req,
                    pod,
                    namespace,
                    name.to_owned(),
                    forwarder,
                ));
            }
            return Err(not_websocket(&req, "port-forward", PROTOCOL, "1.31"));
        };
        let namespace = t.namespace.clone().unwrap_or_else(|| "default".into());
        let name = name.to_owned();
        on_upgrade(&mut req, move |io| {
            crate::portforward::serve(io, pod, namespace, name, forwarder)
        });
        Ok(switching(&ws_key, PROTOCOL))
    }

    /// Where writes go; a read-only API (edgecore's) refuses them.
    fn writer(&self) -> Result<&Arc<dyn WriteObjects>, Status> {
        self.writer.as_ref().ok_or_else(|| {
            Status::new(
                405,
                "MethodNotAllowed",
                "this is edgecore's read-only API: change objects through cloudcore, \
                 the edge receives them when connected",
            )
        })
    }

    fn one(&self, rt: &ResourceType, obj: &Value, table: bool) -> Resp {
        if table {
            let rv = obj
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            json_resp(200, &resources::table(rt, &[obj], rv))
        } else {
            json_resp(200, obj)
        }
    }

    fn selected(
        query: &BTreeMap<String, String>,
    ) -> Result<(LabelSelector, FieldSelector), Status> {
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(Status::bad_request)?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(Status::bad_request)?;
        Ok((labels, fields))
    }

    fn list(
        &self,
        t: &Target,
        query: &BTreeMap<String, String>,
        table: bool,
    ) -> Result<Resp, Status> {
        let (labels, fields) = Self::selected(query)?;
        let (items, rv) = self.reader.list(&t.rt.key_prefix(t.namespace.as_deref()));
        let items: Vec<Value> = items
            .into_iter()
            .filter(|o| labels.matches(o) && fields.matches(o))
            .collect();
        if table {
            let refs: Vec<&Value> = items.iter().collect();
            return Ok(json_resp(200, &resources::table(t.rt, &refs, rv)));
        }
        Ok(json_resp(
            200,
            &json!({"kind": format!("{}List", t.rt.kind), "apiVersion": t.rt.api_version(),
                "metadata": {"resourceVersion": rv.to_string()}, "items": items}),
        ))
    }

    fn watch(
        &self,
        t: &Target,
        query: &BTreeMap<String, String>,
        table: bool,
    ) -> Result<Resp, Status> {
        let (labels, fields) = Self::selected(query)?;
        let prefix = t.rt.key_prefix(t.namespace.as_deref());
        let initial = query.get("sendInitialEvents").is_some_and(|v| v == "true");
        let rv_param: Option<u64> = match query.get("resourceVersion").map(String::as_str) {
            None | Some("") | Some("0") => None,
            Some(s) => Some(
                s.parse()
                    .map_err(|_| Status::bad_request(format!("invalid resourceVersion {s:?}")))?,
            ),
        };
        // Without a resourceVersion (or with sendInitialEvents), the watch
        // starts with the current state as ADDED events.
        let (start_items, start_rv) = if rv_param.is_none() || initial {
            let (items, rv) = self.reader.list(&prefix);
            (Some(items), rv)
        } else {
            (None, rv_param.unwrap_or(0))
        };
        let (past, mut rx) = self.reader.watch(start_rv)?;
        let (tx, body) = mpsc::channel::<Bytes>(64);
        let rt = t.rt;
        let bookmark = initial;
        let allow = move |o: &Value| labels.matches(o) && fields.matches(o);
        let render = move |kind: &str, o: &Value| -> Bytes {
            let object = if table && kind != "BOOKMARK" {
                let rv = o
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(0);
                resources::table(rt, &[o], rv)
            } else {
                o.clone()
            };
            let mut line =
                serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap_or_default();
            line.push(b'\n');
            Bytes::from(line)
        };
        tokio::spawn(async move {
            let mut last = start_rv;
            if let Some(items) = start_items {
                for o in items.iter().filter(|o| allow(o)) {
                    if tx.send(render("ADDED", o)).await.is_err() {
                        return;
                    }
                }
            }
            if bookmark {
                let mark = json!({"kind": rt.kind, "apiVersion": rt.api_version(),
                    "metadata": {"resourceVersion": start_rv.to_string(),
                        "annotations": {"k8s.io/initial-events-end": "true"}}});
                if tx.send(render("BOOKMARK", &mark)).await.is_err() {
                    return;
                }
            }
            let mut pending: std::collections::VecDeque<Arc<watch::WatchEvent>> = past.into();
            loop {
                let ev = match pending.pop_front() {
                    Some(e) => e,
                    None => match rx.recv().await {
                        Ok(e) => e,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            let s = Status::gone(format!(
                                "watch fell {n} events behind; list and watch again"
                            ));
                            let _ = tx.send(render("ERROR", &s.to_json())).await;
                            return;
                        }
                        Err(_) => return,
                    },
                };
                if ev.rv <= last || !ev.key.starts_with(&prefix) {
                    continue;
                }
                last = ev.rv;
                if !allow(&ev.object) {
                    continue;
                }
                if tx
                    .send(render(ev.kind.as_str(), &ev.rendered()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        let mut r = Response::new(ApiBody::Stream(body));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(r)
    }
}

/// The `101 Switching Protocols` answer to a WebSocket upgrade with
/// `ws_key`, choosing `protocol`.
fn switching(ws_key: &str, protocol: &'static str) -> Resp {
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(ws_key.as_bytes());
    let mut r = Response::new(ApiBody::Full(None));
    *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(
        hyper::header::UPGRADE,
        HeaderValue::from_static("websocket"),
    );
    h.insert(
        hyper::header::CONNECTION,
        HeaderValue::from_static("Upgrade"),
    );
    h.insert("sec-websocket-protocol", HeaderValue::from_static(protocol));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// The `Sec-WebSocket-Key` of a WebSocket upgrade offering `protocol`.
fn websocket_key(req: &Request<Incoming>, protocol: &str) -> Option<String> {
    let header = |h: &str| req.headers().get(h).and_then(|v| v.to_str().ok());
    let websocket = header("upgrade").is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let offered = header("sec-websocket-protocol").unwrap_or_default();
    (websocket && offered.split(',').any(|p| p.trim() == protocol))
        .then(|| header("sec-websocket-key").map(str::to_owned))
        .flatten()
}

/// Why a request for `what` that is not such an upgrade is refused.
fn not_websocket(req: &Request<Incoming>, what: &str, protocol: &str, kubectl: &str) -> Status {
    let header = |h: &str| {
        req.headers()
            .get(h)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    Status::bad_request(format!(
        "{what} needs a WebSocket upgrade with subprotocol {protocol} (kubectl {kubectl} or newer); this request asked for {:?} with {:?}",
        header("upgrade"),
        header("sec-websocket-protocol")
    ))
}

/// Runs `serve` on `req`'s connection once it is upgraded.
pub(crate) fn on_upgrade<F, Fut>(req: &mut Request<Incoming>, serve: F)
where
    F: FnOnce(TokioIo<hyper::upgrade::Upgraded>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(
        async move {
            match upgrade.await {
                Ok(io) => serve(TokioIo::new(io)).await,
                Err(e) => debug!(error = %e, "upgrade failed"),
            }
        }
        .in_current_span(),
    );
}
