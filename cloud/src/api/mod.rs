//! The Kubernetes API adaptor: enough of the Kubernetes REST API over
//! HTTPS (cluster CA, client certificates) that an unmodified kubectl
//! works against cloudcore, backed by the [`registry::Registry`].
//!
//! Served: discovery (`/api`, `/apis`, resource lists), a minimal OpenAPI
//! (`/openapi/v3` per group version declaring server-side field
//! validation, and an empty `/openapi/v2`), and for every type in
//! [`resources::RESOURCES`]: get, list (label and field selectors), watch
//! (resumable from a resourceVersion; `410 Gone` when too old; the
//! `sendInitialEvents` form kubectl's delete uses), create, update, patch
//! (merge, strategic, JSON patch, server-side apply), delete, and the
//! `status` subresource; `as=Table` answers for `kubectl get`.

pub mod patch;
pub mod registry;
pub mod resources;
pub mod scheduler;
pub mod select;
pub mod status;
pub mod typed;
pub mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info, info_span, warn};

use registry::{Registry, Write, new_meta, with_rv};
use resources::ResourceType;
use select::{FieldSelector, LabelSelector};
use status::Status;

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

type Resp = Response<ApiBody>;

fn respond(code: u16, content_type: &str, body: impl Into<Bytes>) -> Resp {
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

fn status_resp(s: &Status) -> Resp {
    json_resp(s.code, &s.to_json())
}

/// The running API server.
#[derive(Debug)]
pub struct ApiServer {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl ApiServer {
    /// Serves the API on `addr` with `tls` (which should require client
    /// certificates from the cluster CA).
    pub async fn bind(
        addr: SocketAddr,
        mut tls: rustls::ServerConfig,
        registry: Arc<Registry>,
    ) -> std::io::Result<ApiServer> {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(Arc::new(tls));
        info!(%addr, "kubernetes API listening");
        let server = Arc::new(Server {
            reader: registry.clone(),
            registry: Some(registry),
            logs: None,
            addr: addr.to_string(),
            origin: registry::ACTOR.to_owned(),
        });
        let task = tokio::spawn(accept_loop(listener, move |tcp, peer| {
            let (acceptor, server) = (acceptor.clone(), server.clone());
            async move {
                let tls = match tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    acceptor.accept(tcp),
                )
                .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        debug!(error = %e, "API TLS handshake failed");
                        return;
                    }
                    Err(_) => return,
                };
                // Only the admin certificate may use the API; node
                // certificates speak the sync protocol, not this.
                let admin = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .is_some_and(|c| crate::pki::is_admin_cert(c));
                // The connection's writes are recorded as the admin user's.
                let server = Arc::new(Server {
                    origin: registry::user_origin(crate::pki::ADMIN_COMMON_NAME),
                    ..(*server).clone()
                });
                serve_http(tls, server, admin).await;
            }
            .instrument(info_span!("api", %peer))
        }));
        Ok(ApiServer { addr, task })
    }

    /// Serves a read-only API over plain HTTP on `addr` (meant for
    /// loopback: edgecore's offline API, as KubeEdge's MetaServer): get,
    /// list and watch from `reader`, container logs from `logs`; every
    /// write is refused with `405 MethodNotAllowed`.
    pub async fn bind_read_only(
        addr: SocketAddr,
        reader: Arc<dyn ReadObjects>,
        logs: Option<Arc<dyn PodLogs>>,
    ) -> std::io::Result<ApiServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        info!(%addr, "read-only kubernetes API listening");
        let server = Arc::new(Server {
            reader,
            registry: None,
            logs,
            addr: addr.to_string(),
            origin: String::new(),
        });
        let task = tokio::spawn(accept_loop(listener, move |tcp, peer| {
            serve_http(tcp, server.clone(), true).instrument(info_span!("edge_api", %peer))
        }));
        Ok(ApiServer { addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn shutdown(&self) {
        self.task.abort();
    }
}

/// The read side of the API: cloudcore's [`Registry`], or edgecore's
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

impl ReadObjects for Registry {
    fn get(&self, key: &str) -> Option<Value> {
        Registry::get(self, key)
    }
    fn list(&self, prefix: &str) -> (Vec<Value>, u64) {
        Registry::list(self, prefix)
    }
    fn watch(&self, rv: u64) -> Result<watch::WatchStart, Status> {
        Registry::watch(self, rv)
    }
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
}

/// Container logs (served where the containers run: edgecore).
pub trait PodLogs: Send + Sync + 'static {
    /// The log of one container of `pod` (a Pod object), as a stream of
    /// chunks; the stream ends when the log does (or, with `follow`, when
    /// the container is gone or the client leaves).
    fn logs(&self, pod: &Value, req: &LogRequest) -> Result<mpsc::Receiver<Bytes>, Status>;
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
                tokio::spawn(handle(tcp, peer));
            }
            Err(e) => {
                warn!(error = %e, "accepting an API connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// HTTP/1.1 on one connection; `allowed` is false for a client the API
/// refuses (every request then gets 403).
async fn serve_http<IO>(io: IO, server: Arc<Server>, allowed: bool)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req| {
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
    });
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(Some(std::time::Duration::from_secs(30)));
    if let Err(e) = b.serve_connection(TokioIo::new(io), service).await {
        debug!(error = %e, "API connection ended with an error");
    }
}

#[derive(Clone)]
struct Server {
    reader: Arc<dyn ReadObjects>,
    registry: Option<Arc<Registry>>,
    logs: Option<Arc<dyn PodLogs>>,
    addr: String,
    /// Who this connection's writes are recorded as (the records' origin).
    origin: String,
}

/// What a URL names.
#[derive(Debug)]
struct Target {
    rt: &'static ResourceType,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn query_map(q: Option<&str>) -> std::collections::BTreeMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

fn decode(s: &str) -> String {
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

fn parse_json(body: &[u8], yaml_ok: bool) -> Result<Value, Status> {
    if body.starts_with(b"k8s\0") {
        return Err(Status::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (protobuf is not supported)",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) if yaml_ok => serde_yaml::from_slice::<Value>(body).map_err(|y| {
            Status::bad_request(format!("the body is neither JSON ({e}) nor YAML ({y})"))
        }),
        Err(e) => Err(Status::bad_request(format!(
            "the body of the request was in an unknown format: {e}"
        ))),
    }
}

const META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "selfLink",
];

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks an incoming object against its type: kind and apiVersion,
/// unknown fields (when strict), name, and the fields each kind requires.
fn validate(rt: &ResourceType, obj: &Value, strict: bool) -> Result<(), Status> {
    let Value::Object(m) = obj else {
        return Err(Status::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: the object must be a JSON object",
            rt.kind, rt.version, rt.kind
        )));
    };
    let cannot = |why: String| {
        Status::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {why}",
            rt.kind, rt.version, rt.kind
        ))
    };
    if let Some(k) = m.get("kind").and_then(Value::as_str)
        && k != rt.kind
    {
        return Err(cannot(format!("kind {k:?} does not match the URL")));
    }
    if let Some(v) = m.get("apiVersion").and_then(Value::as_str)
        && v != rt.api_version()
    {
        return Err(cannot(format!("apiVersion {v:?} does not match the URL")));
    }
    if strict {
        for k in m.keys() {
            if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                && !rt.fields.contains(&k.as_str())
            {
                return Err(cannot(format!(
                    "strict decoding error: unknown field \"{k}\""
                )));
            }
        }
        if let Some(Value::Object(meta)) = m.get("metadata") {
            for k in meta.keys() {
                if !META_FIELDS.contains(&k.as_str()) {
                    return Err(cannot(format!(
                        "strict decoding error: unknown field \"metadata.{k}\""
                    )));
                }
            }
        }
    }
    match typed::check(rt.kind, obj) {
        Err(e) => return Err(cannot(e)),
        Ok(unknown) if strict => {
            if let Some(f) = unknown.first() {
                return Err(cannot(format!(
                    "strict decoding error: unknown field \"{f}\""
                )));
            }
        }
        Ok(_) => {}
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut causes = Vec::new();
    if !valid_name(name) {
        causes.push((
            "metadata.name".to_owned(),
            format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ));
    }
    for (field, what) in [("labels", "label"), ("annotations", "annotation")] {
        if let Some(Value::Object(l)) = obj.pointer(&format!("/metadata/{field}")) {
            for (k, v) in l {
                if !v.is_string() {
                    causes.push((
                        format!("metadata.{field}.{k}"),
                        format!("Invalid value: the {what} value must be a string"),
                    ));
                }
            }
        }
    }
    if rt.kind == "Pod" {
        match obj.pointer("/spec/containers").and_then(Value::as_array) {
            Some(cs) if !cs.is_empty() => {
                for (i, c) in cs.iter().enumerate() {
                    for f in ["name", "image"] {
                        if c.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                            causes.push((
                                format!("spec.containers[{i}].{f}"),
                                "Required value".to_owned(),
                            ));
                        }
                    }
                }
            }
            _ => causes.push(("spec.containers".to_owned(), "Required value".to_owned())),
        }
    }
    if rt.kind == "Device"
        && obj
            .pointer("/spec/deviceModelRef/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        causes.push((
            "spec.deviceModelRef.name".to_owned(),
            "Required value".to_owned(),
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid(rt, name, &causes))
    }
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
                let key = t.rt.key(t.namespace.as_deref(), name);
                let obj = self
                    .reader
                    .get(&key)
                    .ok_or_else(|| Status::not_found(t.rt, name))?;
                Ok(self.one(t.rt, &obj, table))
            }
            (&Method::GET, Some(name), Some("status")) if t.rt.has_status => {
                let key = t.rt.key(t.namespace.as_deref(), name);
                let obj = self
                    .reader
                    .get(&key)
                    .ok_or_else(|| Status::not_found(t.rt, name))?;
                Ok(json_resp(200, &obj))
            }
            (&Method::GET, Some(name), Some("log")) if t.rt.plural == "pods" => {
                let key = t.rt.key(t.namespace.as_deref(), name);
                let pod = self
                    .reader
                    .get(&key)
                    .ok_or_else(|| Status::not_found(t.rt, name))?;
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
                let num = |k: &str| -> Result<Option<u64>, Status> {
                    query
                        .get(k)
                        .map(|v| {
                            v.parse()
                                .map_err(|_| Status::bad_request(format!("invalid {k} {v:?}")))
                        })
                        .transpose()
                };
                let lr = LogRequest {
                    namespace: t.namespace.clone().unwrap_or_else(|| "default".into()),
                    pod: name.clone(),
                    container: query.get("container").cloned(),
                    follow: query.get("follow").is_some_and(|v| v == "true"),
                    previous: query.get("previous").is_some_and(|v| v == "true"),
                    tail_lines: num("tailLines")?,
                    limit_bytes: num("limitBytes")?,
                };
                let rx = logs.logs(&pod, &lr)?;
                let mut r = Response::new(ApiBody::Stream(rx));
                r.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
                Ok(r)
            }
            (&Method::POST, None, None) => {
                let strict = !matches!(
                    query.get("fieldValidation").map(String::as_str),
                    Some("Ignore" | "Warn")
                );
                let body = read_body(req).await?;
                let obj = parse_json(&body, false)?;
                self.create(&t, obj, strict).await
            }
            (&Method::PUT, Some(name), sub) => {
                let strict = !matches!(
                    query.get("fieldValidation").map(String::as_str),
                    Some("Ignore" | "Warn")
                );
                let body = read_body(req).await?;
                let obj = parse_json(&body, false)?;
                self.update(&t, name, sub, obj, strict).await
            }
            (&Method::PATCH, Some(name), sub) => {
                let body = read_body(req).await?;
                let force = query.get("force").is_some_and(|f| f == "true");
                self.patch(&t, name, sub, &content_type, &body, force).await
            }
            (&Method::DELETE, Some(name), None) => {
                let key = t.rt.key(t.namespace.as_deref(), name);
                let rt = t.rt;
                let n = name.clone();
                let gone = self
                    .writer()?
                    .write_as(&self.origin, &key, move |old| {
                        if old.is_none() {
                            return Err(Status::not_found(rt, &n));
                        }
                        Ok(Some(Write::Delete))
                    })
                    .await?;
                Ok(json_resp(200, &gone.unwrap_or(Value::Null)))
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

    /// The registry, for writes; a read-only API (edgecore's) refuses them.
    fn writer(&self) -> Result<&Arc<Registry>, Status> {
        self.registry.as_ref().ok_or_else(|| {
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
        &self,
        t: &Target,
        query: &std::collections::BTreeMap<String, String>,
    ) -> Result<(LabelSelector, FieldSelector), Status> {
        let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))
            .map_err(Status::bad_request)?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map_or("", String::as_str))
            .map_err(Status::bad_request)?;
        let _ = t;
        Ok((labels, fields))
    }

    fn list(
        &self,
        t: &Target,
        query: &std::collections::BTreeMap<String, String>,
        table: bool,
    ) -> Result<Resp, Status> {
        let (labels, fields) = self.selected(t, query)?;
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
        query: &std::collections::BTreeMap<String, String>,
        table: bool,
    ) -> Result<Resp, Status> {
        let (labels, fields) = self.selected(t, query)?;
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
                if tx.send(render(ev.kind.as_str(), &ev.object)).await.is_err() {
                    return;
                }
            }
        });
        let mut r = Response::new(ApiBody::Stream(body));
        r.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(r)
    }

    async fn create(&self, t: &Target, mut obj: Value, strict: bool) -> Result<Resp, Status> {
        let rt = t.rt;
        if let Value::Object(m) = &mut obj {
            m.entry("apiVersion").or_insert(json!(rt.api_version()));
            m.entry("kind").or_insert(json!(rt.kind));
            let meta = m.entry("metadata").or_insert(json!({}));
            if let Value::Object(meta) = meta {
                if !meta.contains_key("name")
                    && let Some(g) = meta.get("generateName").and_then(Value::as_str)
                {
                    let suffix = blake3::hash(registry::now_rfc3339().as_bytes()).to_hex();
                    let name = format!("{g}{}", suffix.get(..5).unwrap_or("x"));
                    meta.insert("name".into(), json!(name));
                }
                match (meta.get("namespace").and_then(Value::as_str), &t.namespace) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(Status::bad_request(format!(
                            "the namespace of the provided object ({a}) does not match the namespace sent on the request ({b})"
                        )));
                    }
                    _ => {}
                }
            }
        }
        validate(rt, &obj, strict)?;
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if let Some(ns) = &t.namespace
            && self.reader.get(&format!("namespaces/{ns}")).is_none()
        {
            return Err(Status {
                details: Some(json!({"name": ns, "kind": "namespaces"})),
                ..Status::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
            });
        }
        let mut obj = new_meta(obj, t.namespace.as_deref());
        if rt.kind == "Pod" {
            if let Some(o) = obj.as_object_mut() {
                o.entry("status").or_insert(json!({"phase": "Pending"}));
            }
            scheduler::schedule(self.writer()?, &mut obj);
        }
        let key = rt.key(t.namespace.as_deref(), &name);
        let created = self
            .writer()?
            .write_as(&self.origin, &key, move |old| {
                if old.is_some() {
                    return Err(Status::already_exists(rt, &name));
                }
                Ok(Some(Write::Put(obj)))
            })
            .await?;
        Ok(json_resp(201, &created.unwrap_or(Value::Null)))
    }

    async fn update(
        &self,
        t: &Target,
        name: &str,
        sub: Option<&str>,
        obj: Value,
        strict: bool,
    ) -> Result<Resp, Status> {
        if sub.is_some_and(|s| s != "status") || (sub.is_some() && !t.rt.has_status) {
            return Err(Status::new(405, "MethodNotAllowed", "no such subresource"));
        }
        validate(t.rt, &obj, strict)?;
        if obj.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
            return Err(Status::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let key = t.rt.key(t.namespace.as_deref(), name);
        let out = self
            .writer()?
            .write_as(&self.origin, &key, |old| {
                let old = old.ok_or_else(|| Status::not_found(t.rt, name))?;
                merged_update(t.rt, name, old, obj, sub == Some("status"))
            })
            .await?;
        match out {
            Some(o) => Ok(json_resp(200, &o)),
            None => Ok(json_resp(
                200,
                &self
                    .writer()?
                    .get(&key)
                    .ok_or_else(|| Status::not_found(t.rt, name))?,
            )),
        }
    }

    async fn patch(
        &self,
        t: &Target,
        name: &str,
        sub: Option<&str>,
        content_type: &str,
        body: &[u8],
        _force: bool,
    ) -> Result<Resp, Status> {
        if sub.is_some_and(|s| s != "status") || (sub.is_some() && !t.rt.has_status) {
            return Err(Status::new(405, "MethodNotAllowed", "no such subresource"));
        }
        let rt = t.rt;
        let key = rt.key(t.namespace.as_deref(), name);
        let apply = content_type == "application/apply-patch+yaml";
        let patch = parse_json(body, apply)?;
        if content_type == "application/strategic-merge-patch+json" && !rt.group.is_empty() {
            return Err(Status::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml ({content_type} is not supported by {}, Kind={})",
                    rt.api_version(),
                    rt.kind
                ),
            ));
        }
        if !matches!(
            content_type,
            "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
                | "application/json-patch+json"
                | "application/apply-patch+yaml"
        ) {
            return Err(Status::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, not {content_type}"
                ),
            ));
        }
        if apply && self.reader.get(&key).is_none() {
            // Server-side apply of an absent object creates it.
            let target = Target {
                rt,
                namespace: t.namespace.clone(),
                name: None,
                sub: None,
            };
            if patch.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
                return Err(Status::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            return self.create(&target, patch, true).await;
        }
        let out = self
            .writer()?
            .write_as(&self.origin, &key, |old| {
                let old = old.ok_or_else(|| Status::not_found(rt, name))?;
                let mut new = old.clone();
                match content_type {
                    "application/json-patch+json" => {
                        patch::json_patch(&mut new, &patch).map_err(|e| {
                            Status::new(
                                422,
                                "Invalid",
                                format!("the JSON patch could not be applied: {e}"),
                            )
                        })?;
                    }
                    "application/strategic-merge-patch+json" => {
                        patch::strategic_merge(&mut new, &patch).map_err(Status::bad_request)?;
                    }
                    _ => {
                        if apply {
                            validate(rt, &patch, true)?;
                        }
                        patch::merge_patch(&mut new, &patch);
                    }
                }
                validate(rt, &new, false)?;
                merged_update(rt, name, old, new, sub == Some("status"))
            })
            .await?;
        match out {
            Some(o) => Ok(json_resp(200, &o)),
            None => Ok(json_resp(
                200,
                &self
                    .writer()?
                    .get(&key)
                    .ok_or_else(|| Status::not_found(rt, name))?,
            )),
        }
    }
}

/// The object an update stores: server-owned metadata kept from `old`; the
/// main resource keeps `old`'s status, the status subresource changes only
/// status; a stale resourceVersion is a conflict.
fn merged_update(
    rt: &'static ResourceType,
    name: &str,
    old: &Value,
    mut new: Value,
    status_only: bool,
) -> Result<Option<Write>, Status> {
    let old_rv = old.pointer("/metadata/resourceVersion").cloned();
    if let Some(rv) = new.pointer("/metadata/resourceVersion")
        && Some(rv) != old_rv.as_ref()
    {
        return Err(Status::conflict(rt, name));
    }
    if status_only {
        let mut out = old.clone();
        if let (Some(o), Some(st)) = (out.as_object_mut(), new.get("status")) {
            o.insert("status".into(), st.clone());
        }
        return Ok(Some(Write::Put(out)));
    }
    if rt.has_status
        && let Some(o) = new.as_object_mut()
    {
        match old.get("status") {
            Some(st) => {
                o.insert("status".into(), st.clone());
            }
            None => {
                o.remove("status");
            }
        }
    }
    for f in ["uid", "creationTimestamp", "namespace", "generation"] {
        if let (Some(v), Some(m)) = (
            old.pointer(&format!("/metadata/{f}")).cloned(),
            new.get_mut("metadata").and_then(Value::as_object_mut),
        ) {
            m.insert(f.into(), v);
        }
    }
    if old.get("spec") != new.get("spec") {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("generation".into(), json!(g + 1));
        }
    }
    // Nothing but the resourceVersion differs: no write (kubectl then
    // reports "no change").
    let mut a = with_rv(old, 0);
    let mut b = with_rv(&new, 0);
    if let (Some(x), Some(y)) = (a.get_mut("metadata"), b.get_mut("metadata"))
        && let (Some(x), Some(y)) = (x.as_object_mut(), y.as_object_mut())
    {
        x.remove("resourceVersion");
        y.remove("resourceVersion");
    }
    if a == b {
        return Ok(None);
    }
    Ok(Some(Write::Put(new)))
}
