//! The admin gRPC API (tonic): log replay, live tail, object audit and
//! hash-chain verification over any keel log ([`LogApi`], served by
//! cloudcore and by edgecore), and the server of the admin API
//! ([`GrpcServer`]), to which cloudcore adds its own services.
//!
//! cloudcore serves it over TLS with the cluster CA's server certificate,
//! and only to the admin client certificate (the same rule as the
//! Kubernetes API); any other certificate of the cluster CA gets
//! `PermissionDenied`, a client without one fails the handshake.
//! edgecore serves [`LogApi`] in plain HTTP/2 on loopback, like its
//! read-only Kubernetes API.
//!
//! Replay and audit read the log from the compaction horizon on: records
//! folded into a snapshot no longer exist one by one. A replay says where
//! each stream's history starts ([`keel_proto::StreamHeader`]); an audit
//! reports the compacted part and the object's state there
//! ([`keel_proto::Compacted`]).

mod audit;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use keel_log::{Read, ReadLimits, Record, Store, StreamInfo};
use keel_proto::log_service_server::{LogService, LogServiceServer};
use keel_proto::{
    AuditRequest, AuditResponse, ReplayItem, ReplayRequest, StreamHeader, StreamRecords,
    StreamVerdict, TailRequest, VerifyChainRequest, VerifyChainResponse, replay_item,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::{InterceptorLayer, Routes};
use tonic::{Request, Response, Status};
use tracing::{Instrument as _, debug, info, info_span, warn};

/// ALPN protocol of the admin gRPC endpoint.
pub const ALPN_H2: &[u8] = b"h2";

/// Records per message of a replay or tail (and at most ~1 MiB).
const BATCH: ReadLimits = ReadLimits {
    max_records: 512,
    max_bytes: 1 << 20,
};

/// Messages a replay may run ahead of a slow client.
const QUEUE: usize = 8;

type ItemStream = Pin<Box<dyn Stream<Item = Result<ReplayItem, Status>> + Send>>;

/// A log error as a gRPC status with a message an operator can act on.
fn log_status(e: &keel_log::Error) -> Status {
    use keel_log::Error as E;
    match e {
        E::UnknownStream(s) => Status::not_found(format!("no stream {s:?} in this log")),
        E::BeyondHead { .. } => Status::out_of_range(e.to_string()),
        E::Corrupt { .. } => Status::data_loss(e.to_string()),
        E::Poisoned | E::Closed => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn cursor_proto(stream: &str, c: &keel_log::Cursor) -> keel_proto::Cursor {
    keel_log::wire::cursor_to_proto(stream, c)
}

/// Milliseconds since the Unix epoch of an HLC timestamp.
pub fn hlc_millis(hlc: u64) -> u64 {
    hlc >> 16
}

/// Which records a replay, tail or audit wants.
#[derive(Debug, Clone, Default)]
struct Filter {
    streams: Vec<String>,
    key: String,
    kind: String,
    since_ms: u64,
    until_ms: u64,
}

impl Filter {
    fn from_proto(f: Option<keel_proto::RecordFilter>) -> Result<Filter, Status> {
        let f = f.unwrap_or_default();
        if f.until_ms != 0 && f.until_ms <= f.since_ms {
            return Err(Status::invalid_argument(format!(
                "empty time range: until ({}) is not after since ({})",
                f.until_ms, f.since_ms
            )));
        }
        if f.kind.contains('/') {
            return Err(Status::invalid_argument(format!(
                "kind {:?} must be a resource name such as \"pods\" (no '/')",
                f.kind
            )));
        }
        Ok(Filter {
            streams: f.streams,
            key: f.key,
            kind: f.kind,
            since_ms: f.since_ms,
            until_ms: f.until_ms,
        })
    }

    fn matches(&self, r: &Record) -> bool {
        if !self.key.is_empty() && r.key != self.key {
            return false;
        }
        if !self.kind.is_empty() && r.key.split('/').next() != Some(self.kind.as_str()) {
            return false;
        }
        let t = hlc_millis(r.hlc);
        t >= self.since_ms && (self.until_ms == 0 || t < self.until_ms)
    }
}

/// The streams named (every one if none), in name order; an unknown
/// name is an error.
fn select_streams(store: &Store, names: &[String]) -> Result<Vec<StreamInfo>, Status> {
    if names.is_empty() {
        return Ok(store.streams());
    }
    let wanted: BTreeSet<&String> = names.iter().collect();
    wanted
        .into_iter()
        .map(|n| store.info(n).map_err(|e| log_status(&e)))
        .collect()
}

fn header(st: &StreamInfo, after: u64) -> StreamHeader {
    StreamHeader {
        stream: st.name.clone(),
        role: match st.role {
            keel_log::Role::Writer => "writer".into(),
            keel_log::Role::Replica => "replica".into(),
        },
        epoch: st.epoch,
        head: Some(cursor_proto(&st.name, &st.head)),
        horizon_seq: st.horizon.seq,
        from_seq: after.max(st.horizon.seq) + 1,
    }
}

fn records_item(stream: &str, records: Vec<keel_proto::Record>) -> ReplayItem {
    ReplayItem {
        item: Some(replay_item::Item::Records(StreamRecords {
            stream: stream.to_owned(),
            records,
        })),
    }
}

/// Reads `stream` from seq `after` (exclusive) to `until` (inclusive),
/// sending matching records in batches; `Ok(false)` if the client left.
fn send_range(
    store: &Store,
    stream: &str,
    mut after: u64,
    until: u64,
    filter: &Filter,
    tx: &mpsc::Sender<Result<ReplayItem, Status>>,
) -> Result<bool, Status> {
    while after < until {
        let seg = match store
            .read(stream, after, BATCH)
            .map_err(|e| log_status(&e))?
        {
            Read::Records(seg) => seg,
            Read::Snapshot { snapshot, .. } => {
                return Err(Status::aborted(format!(
                    "stream {stream:?} was compacted through seq {} during the read; \
                     records up to there exist only as a snapshot now: read again",
                    snapshot.base.seq
                )));
            }
        };
        let end = seg.end().seq;
        if end <= after {
            break;
        }
        let batch: Vec<keel_proto::Record> = seg
            .records
            .iter()
            .filter(|r| r.seq <= until && filter.matches(r))
            .map(keel_log::codec::record_to_proto)
            .collect();
        if !batch.is_empty() && tx.blocking_send(Ok(records_item(stream, batch))).is_err() {
            return Ok(false);
        }
        after = end;
    }
    Ok(true)
}

/// [`LogService`] over one log store.
#[derive(Debug, Clone)]
pub struct LogApi {
    store: Store,
    audit_streams: Vec<String>,
}

impl LogApi {
    /// Serves `store`; an audit without streams named reads
    /// `audit_streams` (cloudcore: `cluster`; edgecore: its `down` and `up`).
    pub fn new(store: Store, audit_streams: Vec<String>) -> LogApi {
        LogApi {
            store,
            audit_streams,
        }
    }
}

#[tonic::async_trait]
impl LogService for LogApi {
    type ReplayStream = ItemStream;
    type TailStream = ItemStream;

    async fn replay(
        &self,
        req: Request<ReplayRequest>,
    ) -> Result<Response<Self::ReplayStream>, Status> {
        let r = req.into_inner();
        let filter = Filter::from_proto(r.filter)?;
        let streams = select_streams(&self.store, &filter.streams)?;
        let after = r.after_seq;
        let (tx, rx) = mpsc::channel(QUEUE);
        let store = self.store.clone();
        let span = info_span!("grpc_replay", streams = streams.len(), after);
        tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            for st in &streams {
                let h = header(st, after);
                let item = ReplayItem {
                    item: Some(replay_item::Item::Stream(h)),
                };
                if tx.blocking_send(Ok(item)).is_err() {
                    return;
                }
            }
            let mut sent = 0u64;
            for st in &streams {
                let from = after.max(st.horizon.seq);
                match send_range(&store, &st.name, from, st.head.seq, &filter, &tx) {
                    Ok(true) => sent += st.head.seq.saturating_sub(from),
                    Ok(false) => {
                        debug!("client left during the replay");
                        return;
                    }
                    Err(s) => {
                        warn!(stream = %st.name, error = %s.message(), "replay failed");
                        let _ = tx.blocking_send(Err(s));
                        return;
                    }
                }
            }
            debug!(records = sent, "replay done");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn tail(&self, req: Request<TailRequest>) -> Result<Response<Self::TailStream>, Status> {
        let r = req.into_inner();
        let filter = Arc::new(Filter::from_proto(r.filter)?);
        let named = !filter.streams.is_empty();
        let streams = select_streams(&self.store, &filter.streams)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let store = self.store.clone();
        let after = r.after_seq;
        let span = info_span!("grpc_tail", streams = streams.len());
        tokio::spawn(
            async move {
                let mut known = BTreeSet::new();
                for st in &streams {
                    known.insert(st.name.clone());
                    let from = after.unwrap_or(st.head.seq);
                    if !start_tail(&store, st, from, &filter, &tx).await {
                        return;
                    }
                }
                if named {
                    return;
                }
                // Every stream: pick up streams created later (a node's
                // first connection), from their start.
                loop {
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                    for st in store.streams() {
                        if known.insert(st.name.clone())
                            && !start_tail(&store, &st, 0, &filter, &tx).await
                        {
                            return;
                        }
                    }
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn audit(&self, req: Request<AuditRequest>) -> Result<Response<AuditResponse>, Status> {
        let r = req.into_inner();
        if r.key.is_empty() || r.key.len() > 4096 {
            return Err(Status::invalid_argument(
                "an object key such as \"pods/default/web\" is required",
            ));
        }
        let streams = if r.streams.is_empty() {
            self.audit_streams.clone()
        } else {
            r.streams
        };
        let store = self.store.clone();
        let span = info_span!("grpc_audit", key = %r.key);
        tokio::task::spawn_blocking(move || {
            let _g = span.enter();
            audit::audit(&store, &r.key, &streams)
        })
        .await
        .map_err(|e| Status::internal(format!("audit task: {e}")))?
        .map(Response::new)
    }

    async fn verify_chain(
        &self,
        req: Request<VerifyChainRequest>,
    ) -> Result<Response<VerifyChainResponse>, Status> {
        let names = req.into_inner().streams;
        let store = self.store.clone();
        let streams = select_streams(&store, &names)?;
        let verdicts = tokio::task::spawn_blocking(move || {
            streams
                .iter()
                .map(|st| verify_stream(&store, st))
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(format!("verify task: {e}")))?;
        Ok(Response::new(VerifyChainResponse { streams: verdicts }))
    }
}

fn verify_stream(store: &Store, st: &StreamInfo) -> StreamVerdict {
    let mut v = StreamVerdict {
        stream: st.name.clone(),
        ok: true,
        horizon_seq: st.horizon.seq,
        head_seq: st.head.seq,
        first_bad_seq: 0,
        reason: String::new(),
    };
    match store.verify(&st.name) {
        Ok(head) => v.head_seq = head.seq,
        Err(keel_log::Error::Corrupt { seq, reason, .. }) => {
            warn!(stream = %st.name, seq, %reason, "hash chain does not verify");
            v.ok = false;
            v.first_bad_seq = seq;
            v.reason = reason;
        }
        Err(e) => {
            v.ok = false;
            v.reason = e.to_string();
        }
    }
    v
}

/// Sends `st`'s header and what follows `from` up to now, then follows the
/// stream live in its own task; `false` if the client left.
async fn start_tail(
    store: &Store,
    st: &StreamInfo,
    from: u64,
    filter: &Arc<Filter>,
    tx: &mpsc::Sender<Result<ReplayItem, Status>>,
) -> bool {
    let item = ReplayItem {
        item: Some(replay_item::Item::Stream(header(st, from))),
    };
    if tx.send(Ok(item)).await.is_err() {
        return false;
    }
    let (store, name, filter, tx) = (store.clone(), st.name.clone(), filter.clone(), tx.clone());
    let from = from.max(st.horizon.seq);
    tokio::spawn(
        async move {
            let mut pos = from;
            loop {
                tokio::select! {
                    () = tx.closed() => return,
                    () = store.wait_head(&name, pos) => {}
                }
                if store.is_poisoned() {
                    let _ = tx
                        .send(Err(Status::unavailable("the log store failed")))
                        .await;
                    return;
                }
                let head = match store.info(&name) {
                    Ok(i) => i.head.seq,
                    Err(e) => {
                        let _ = tx.send(Err(log_status(&e))).await;
                        return;
                    }
                };
                let (s, n, f, t) = (store.clone(), name.clone(), filter.clone(), tx.clone());
                let sent =
                    tokio::task::spawn_blocking(move || send_range(&s, &n, pos, head, &f, &t))
                        .await;
                match sent {
                    Ok(Ok(true)) => pos = head,
                    Ok(Ok(false)) => return,
                    Ok(Err(s)) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                }
            }
        }
        .instrument(info_span!("tail", stream = %st.name)),
    );
    true
}

/// Refuses every call from a client that did not present a certificate
/// `admin` accepts.
#[allow(clippy::result_large_err)]
fn admin_only(admin: fn(&[u8]) -> bool, req: Request<()>) -> Result<Request<()>, Status> {
    let admin = req
        .peer_certs()
        .and_then(|c| c.first().map(|c| admin(c)))
        .unwrap_or(false);
    if admin {
        Ok(req)
    } else {
        Err(Status::permission_denied(
            "only the cluster admin certificate may use the keel admin API",
        ))
    }
}

/// A running admin gRPC endpoint.
#[derive(Debug)]
pub struct GrpcServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl GrpcServer {
    /// Serves `log` and the services of `more` on `addr` over TLS (`tls`
    /// must require a client certificate of the cluster CA); only a client
    /// whose certificate `admin` accepts is served.
    pub async fn bind_tls(
        addr: SocketAddr,
        mut tls: rustls::ServerConfig,
        log: LogApi,
        more: Routes,
        admin: fn(&[u8]) -> bool,
    ) -> std::io::Result<GrpcServer> {
        tls.alpn_protocols = vec![ALPN_H2.to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (conns_tx, conns_rx) = mpsc::channel(64);
        let accept = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        warn!(error = %e, "accepting an admin API connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, conns_tx) = (acceptor.clone(), conns_tx.clone());
                tokio::spawn(
                    async move {
                        match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(tls)) => {
                                let _ = conns_tx.send(Ok::<_, std::io::Error>(tls)).await;
                            }
                            Ok(Err(e)) => debug!(error = %e, "admin API TLS handshake failed"),
                            Err(_) => debug!("admin API TLS handshake timed out"),
                        }
                    }
                    .instrument(info_span!("grpc", %peer)),
                );
            }
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder()
            .layer(InterceptorLayer::new(move |req| admin_only(admin, req)))
            .add_routes(more)
            .add_service(LogServiceServer::new(log));
        let task = tokio::spawn(async move {
            let r = router
                .serve_with_incoming_shutdown(ReceiverStream::new(conns_rx), async {
                    let _ = stopped.await;
                })
                .await;
            accept.abort();
            if let Err(e) = r {
                warn!(error = %e, "admin API server failed");
            }
        });
        info!(%addr, "admin gRPC API listening");
        Ok(GrpcServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// Serves `log` alone on `addr` (edgecore's log API): over TLS where
    /// only the cluster admin's certificate is served when `tls` is given
    /// (it must require client certificates), else plain.
    pub async fn bind_log(
        addr: SocketAddr,
        log: LogApi,
        tls: Option<rustls::ServerConfig>,
    ) -> std::io::Result<GrpcServer> {
        match tls {
            Some(tls) => {
                Self::bind_tls(
                    addr,
                    tls,
                    log,
                    Routes::default(),
                    crate::auth::is_admin_cert,
                )
                .await
            }
            None => Self::bind_plain(addr, log).await,
        }
    }

    /// Serves `log` on `addr` in plain HTTP/2 with no authentication: for
    /// loopback only (edgecore).
    pub async fn bind_plain(addr: SocketAddr, log: LogApi) -> std::io::Result<GrpcServer> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let router = tonic::transport::Server::builder().add_service(LogServiceServer::new(log));
        let task = tokio::spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            if let Err(e) = router
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await
            {
                warn!(error = %e, "admin API server failed");
            }
        });
        info!(%addr, "log gRPC API listening (plain, loopback)");
        Ok(GrpcServer {
            addr,
            stop: Some(stop),
            task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting and ends open calls.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        // Tails never end on their own: give calls a moment, then stop.
        if tokio::time::timeout(Duration::from_secs(2), &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}
