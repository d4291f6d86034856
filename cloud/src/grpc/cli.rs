//! The `keel` admin CLI's work: finding credentials, connecting, calling
//! the admin API and rendering the answers as tables or JSON. The `keel`
//! binary parses flags and calls into this module.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use keel_proto::cluster_service_client::ClusterServiceClient;
use keel_proto::log_service_client::LogServiceClient;
use keel_proto::{
    AuditRequest, CreateTokenRequest, OriginKind, PayloadKind, RecordFilter, ReplayItem,
    ReplayRequest, RevokeNodeRequest, StatusRequest, TailRequest, VerifyChainRequest, replay_item,
};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::api::resources::RESOURCES;

/// Why a `keel` command failed; the message is what the user sees.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
    #[error("cannot reach {what} at {addr}: {reason}")]
    Connect {
        what: &'static str,
        addr: String,
        reason: String,
    },
    #[error("{0}")]
    Rpc(String),
    #[error("{0}")]
    Usage(String),
    #[error("writing the output: {0}")]
    Output(#[from] std::io::Error),
    /// The command ran and found a problem (a chain that does not verify).
    #[error("{0}")]
    Failed(String),
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
}

/// The admin credentials from a kubeconfig.
#[derive(Clone)]
pub struct Credentials {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// The kubeconfig to use: `explicit`, else the first path of `KUBECONFIG`,
/// else the one cloudcore writes in its default data directory.
pub fn kubeconfig_path(explicit: Option<PathBuf>, env: Option<String>) -> PathBuf {
    explicit
        .or_else(|| env.and_then(|v| v.split(':').find(|p| !p.is_empty()).map(PathBuf::from)))
        .unwrap_or_else(|| crate::core::kubeconfig_path(Path::new("cloudcore-data")))
}

/// Reads the current context's cluster CA and client certificate and key
/// from a kubeconfig (inline `*-data` or file paths).
pub fn load_credentials(path: &Path) -> Result<Credentials, CliError> {
    let err = |reason: String| CliError::Kubeconfig {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| {
        err(format!(
            "{e} (cloudcore writes admin.kubeconfig in its data directory; use --kubeconfig or KUBECONFIG)"
        ))
    })?;
    let doc: Value = serde_yaml::from_str(&text).map_err(|e| err(format!("not YAML: {e}")))?;
    let current = doc.get("current-context").and_then(Value::as_str);
    let named = |list: &str, name: Option<&str>, field: &str| -> Option<Value> {
        let items = doc.get(list)?.as_array()?;
        let item = match name {
            Some(n) => items
                .iter()
                .find(|i| i.get("name").and_then(Value::as_str) == Some(n))?,
            None => items.first()?,
        };
        item.get(field).cloned()
    };
    let ctx = named("contexts", current, "context").unwrap_or(Value::Null);
    let cluster = named(
        "clusters",
        ctx.get("cluster").and_then(Value::as_str),
        "cluster",
    )
    .ok_or_else(|| err("no cluster".into()))?;
    let user = named("users", ctx.get("user").and_then(Value::as_str), "user")
        .ok_or_else(|| err("no user".into()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let pem = |obj: &Value, field: &str| -> Result<String, CliError> {
        if let Some(d) = obj.get(format!("{field}-data")).and_then(Value::as_str) {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(d.trim())
                .map_err(|e| err(format!("{field}-data is not base64: {e}")))?;
            return String::from_utf8(bytes).map_err(|_| err(format!("{field}-data is not PEM")));
        }
        if let Some(f) = obj.get(field).and_then(Value::as_str) {
            let p = base.join(f);
            return std::fs::read_to_string(&p)
                .map_err(|e| err(format!("{field} {}: {e}", p.display())));
        }
        Err(err(format!(
            "no {field} or {field}-data (the admin API needs the admin client certificate)"
        )))
    };
    Ok(Credentials {
        ca_pem: pem(&cluster, "certificate-authority")?,
        cert_pem: pem(&user, "client-certificate")?,
        key_pem: pem(&user, "client-key")?,
    })
}

/// Connects to cloudcore's admin API at `addr` (host:port) over TLS.
pub async fn connect_cloud(addr: &str, creds: &Credentials) -> Result<Channel, CliError> {
    connect_tls(
        addr,
        creds,
        "cloudcore's admin API",
        "cloudcore",
        "--grpc-addr",
    )
    .await
}

async fn connect_tls(
    addr: &str,
    creds: &Credentials,
    what: &'static str,
    peer: &str,
    flag: &str,
) -> Result<Channel, CliError> {
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&creds.ca_pem))
        .identity(Identity::from_pem(&creds.cert_pem, &creds.key_pem))
        .domain_name(host);
    let conn = |reason: String| CliError::Connect {
        what,
        addr: addr.to_owned(),
        reason,
    };
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(|e| conn(format!("bad address: {e}")))?
        .tls_config(tls)
        .map_err(|e| conn(e.to_string()))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| {
            conn(format!(
                "{} (is {peer} running with {flag} {addr}?)",
                error_chain(&e)
            ))
        })
}

/// Connects to an edgecore's log API at `addr`: plain HTTP/2 (loopback),
/// or, with `tls` (the admin's certificate, and the edge's serving
/// certificate as CA), TLS for an edgecore run with `--client-ca-file`.
pub async fn connect_edge(addr: &str, tls: Option<&Credentials>) -> Result<Channel, CliError> {
    if let Some(creds) = tls {
        return connect_tls(addr, creds, "edgecore's log API", "edgecore", "--grpc-addr").await;
    }
    let conn = |reason: String| CliError::Connect {
        what: "edgecore's log API",
        addr: addr.to_owned(),
        reason,
    };
    Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| conn(format!("bad address: {e}")))?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| {
            conn(format!(
                "{} (is edgecore running with --grpc-addr {addr}?)",
                error_chain(&e)
            ))
        })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn rpc(s: tonic::Status) -> CliError {
    use tonic::Code;
    let msg = s.message();
    CliError::Rpc(match s.code() {
        Code::Unimplemented => {
            "not served here (an edgecore serves replay, tail, audit and verify; nodes and tokens are cloudcore's)".into()
        }
        Code::PermissionDenied => format!("refused: {msg}"),
        Code::NotFound => format!("not found: {msg}"),
        Code::InvalidArgument => format!("invalid request: {msg}"),
        Code::DataLoss => format!("the log is damaged: {msg}"),
        Code::Unavailable => format!("unavailable: {msg}"),
        c => format!("{c:?}: {msg}"),
    })
}

/// RFC 3339 UTC with milliseconds, from milliseconds since the epoch.
pub fn format_millis(ms: u64) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    match time::OffsetDateTime::from_unix_timestamp_nanos(nanos) {
        Ok(t) => format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.millisecond()
        ),
        Err(_) => ms.to_string(),
    }
}

/// A time bound for `--since` / `--until`: milliseconds since the epoch,
/// or a duration before `now_ms` such as `90s`, `10m`, `2h`, `1d`.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, CliError> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let age = crate::retention::parse_age(s).map_err(|_| {
        CliError::Usage(format!(
            "time {s:?}: want milliseconds since the epoch or an age such as 90s, 10m, 2h, 1d"
        ))
    })?;
    Ok(now_ms.saturating_sub(u64::try_from(age.as_millis()).unwrap_or(u64::MAX)))
}

/// The log key of `TYPE/NAME` (kubectl's forms: `pod/web`, `pods/web`,
/// `po/web`), or a log key given as is (`pods/default/web`).
pub fn object_key(arg: &str, namespace: &str) -> Result<String, CliError> {
    let Some((ty, name)) = arg.split_once('/') else {
        return Err(CliError::Usage(format!(
            "{arg:?}: name an object as TYPE/NAME, such as pod/web"
        )));
    };
    let ty_l = ty.to_ascii_lowercase();
    let rt = RESOURCES.iter().find(|r| {
        r.plural == ty_l
            || r.singular == ty_l
            || r.short_names.contains(&ty_l.as_str())
            || r.qualified() == ty_l
            || r.kind.eq_ignore_ascii_case(&ty_l)
    });
    let Some(rt) = rt else {
        return Err(CliError::Usage(format!(
            "{ty:?} is not a resource type keel serves ({})",
            RESOURCES
                .iter()
                .map(|r| r.singular)
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    if name.contains('/') {
        // Already a key: `pods/default/web`.
        return Ok(format!("{}/{name}", rt.qualified()));
    }
    if name.is_empty() {
        return Err(CliError::Usage(format!("{arg:?}: the name is empty")));
    }
    Ok(rt.key(Some(namespace), name))
}

/// `keel token create NODE`.
pub async fn token_create(
    ch: Channel,
    node: &str,
    ttl: Duration,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let r = ClusterServiceClient::new(ch)
        .create_token(CreateTokenRequest {
            node: node.to_owned(),
            ttl_seconds: ttl.as_secs(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    match format {
        Format::Table => writeln!(out, "{}", r.token)?,
        Format::Json => writeln!(
            out,
            "{}",
            json!({"node": node, "token": r.token, "expires": format_millis(r.expires_ms)})
        )?,
    }
    Ok(())
}

/// `keel node revoke NODE`.
pub async fn node_revoke(
    ch: Channel,
    node: &str,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let r = ClusterServiceClient::new(ch)
        .revoke_node(RevokeNodeRequest {
            node: node.to_owned(),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    match format {
        Format::Table => {
            writeln!(
                out,
                "node {} revoked: {} certificate(s), {} unused token(s) deleted, {}",
                r.node,
                r.revoked_serials.len(),
                r.tokens_deleted,
                if r.disconnected {
                    "live connection closed"
                } else {
                    "not connected"
                }
            )?;
            for s in &r.revoked_serials {
                writeln!(out, "  {s}")?;
            }
        }
        Format::Json => writeln!(
            out,
            "{}",
            json!({
                "node": r.node,
                "revokedSerials": r.revoked_serials,
                "tokensDeleted": r.tokens_deleted,
                "disconnected": r.disconnected,
            })
        )?,
    }
    Ok(())
}

fn table(out: &mut dyn Write, rows: &[Vec<String>]) -> std::io::Result<()> {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i + 1 == r.len() {
                line.push_str(cell);
            } else {
                let w = widths.get(i).copied().unwrap_or(0);
                line.push_str(&format!("{cell:<w$}   "));
            }
        }
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn ago(ms: u64, now_ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let s = now_ms.saturating_sub(ms) / 1000;
    match s {
        0..=1 => "now".into(),
        2..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

/// `keel nodes`.
pub async fn nodes(
    ch: Channel,
    format: Format,
    now_ms: u64,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let r = ClusterServiceClient::new(ch)
        .status(StatusRequest {})
        .await
        .map_err(rpc)?
        .into_inner();
    match format {
        Format::Json => {
            let nodes: Vec<Value> = r
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "node": n.node,
                        "connected": n.connected,
                        "lastSeen": (n.last_seen_ms != 0).then(|| format_millis(n.last_seen_ms)),
                        "down": {"head": n.down_head_seq,
                                 "acked": n.acked_known.then_some(n.down_acked_seq),
                                 "lag": n.down_lag},
                        "up": {"received": n.up_received_seq},
                        "owner": (!n.owner.is_empty()).then_some(&n.owner),
                    })
                })
                .collect();
            writeln!(out, "{}", json!({ "nodes": nodes }))?;
        }
        Format::Table => {
            let mut rows = vec![
                [
                    "NODE",
                    "CONNECTED",
                    "LAST SEEN",
                    "DOWN HEAD",
                    "ACKED",
                    "LAG",
                    "UP RECEIVED",
                ]
                .map(String::from)
                .to_vec(),
            ];
            for n in &r.nodes {
                rows.push(vec![
                    n.node.clone(),
                    if n.connected { "yes" } else { "no" }.into(),
                    ago(n.last_seen_ms, now_ms),
                    n.down_head_seq.to_string(),
                    if n.acked_known {
                        n.down_acked_seq.to_string()
                    } else {
                        "?".into()
                    },
                    if n.acked_known {
                        n.down_lag.to_string()
                    } else {
                        format!("≤{}", n.down_lag)
                    },
                    n.up_received_seq.to_string(),
                ]);
            }
            // Replicas sharing the nodes: which one owns each.
            if r.nodes.iter().any(|n| !n.owner.is_empty()) {
                for (row, n) in rows
                    .iter_mut()
                    .zip(std::iter::once(None).chain(r.nodes.iter().map(Some)))
                {
                    row.push(n.map_or_else(|| "OWNER".to_owned(), |n| n.owner.clone()));
                }
            }
            table(out, &rows)?;
            if r.nodes.is_empty() {
                writeln!(
                    out,
                    "(no nodes yet: `keel token create NODE`, then join it)"
                )?;
            }
        }
    }
    Ok(())
}

/// What `keel replay` / `keel tail` want.
#[derive(Debug, Clone, Default)]
pub struct ReplayArgs {
    pub streams: Vec<String>,
    pub key: Option<String>,
    pub kind: Option<String>,
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    pub after_seq: Option<u64>,
}

impl ReplayArgs {
    fn filter(&self) -> RecordFilter {
        RecordFilter {
            streams: self.streams.clone(),
            key: self.key.clone().unwrap_or_default(),
            kind: self.kind.clone().unwrap_or_default(),
            since_ms: self.since_ms.unwrap_or(0),
            until_ms: self.until_ms.unwrap_or(0),
        }
    }
}

fn kind_name(k: i32) -> &'static str {
    match PayloadKind::try_from(k) {
        Ok(PayloadKind::Change) => "change",
        Ok(PayloadKind::Tombstone) => "tombstone",
        Ok(PayloadKind::Event) => "event",
        _ => "unknown",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Replay / tail output: table lines or JSON lines, and counts.
struct Printer<'a> {
    format: Format,
    out: &'a mut dyn Write,
    records: u64,
    header_done: bool,
}

impl Printer<'_> {
    fn item(
        &mut self,
        item: ReplayItem,
        progress: &indicatif::ProgressBar,
        pos: &mut BTreeMap<String, u64>,
    ) -> Result<(), CliError> {
        match item.item {
            Some(replay_item::Item::Stream(h)) => {
                let head = h.head.as_ref().map_or(0, |c| c.seq);
                pos.insert(h.stream.clone(), h.from_seq.saturating_sub(1));
                progress.inc_length(head.saturating_sub(h.from_seq.saturating_sub(1)));
                match self.format {
                    Format::Json => writeln!(
                        self.out,
                        "{}",
                        json!({"type": "stream", "stream": h.stream, "role": h.role,
                            "epoch": h.epoch, "head": head, "horizon": h.horizon_seq,
                            "from": h.from_seq})
                    )?,
                    Format::Table => {
                        let compacted = if h.horizon_seq > 0 {
                            format!(
                                "; history through seq {} compacted into a snapshot",
                                h.horizon_seq
                            )
                        } else {
                            String::new()
                        };
                        let out = &mut *self.out;
                        progress.suspend(|| {
                            writeln!(
                                out,
                                "# stream {} ({}, epoch {}): head {}, from seq {}{compacted}",
                                h.stream, h.role, h.epoch, head, h.from_seq
                            )
                        })?;
                    }
                }
            }
            Some(replay_item::Item::Records(batch)) => {
                let p = pos.entry(batch.stream.clone()).or_insert(0);
                for r in &batch.records {
                    self.records += 1;
                    progress.inc(r.seq.saturating_sub(*p));
                    *p = r.seq;
                    match self.format {
                        Format::Json => writeln!(
                            self.out,
                            "{}",
                            json!({"type": "record", "stream": batch.stream, "seq": r.seq,
                                "epoch": r.epoch, "hlc": r.hlc,
                                "time": format_millis(super::hlc_millis(r.hlc)),
                                "origin": r.origin, "key": r.key, "kind": kind_name(r.kind),
                                "payload": base64::engine::general_purpose::STANDARD.encode(&r.payload),
                                "hash": hex(&r.hash)})
                        )?,
                        Format::Table => {
                            if !self.header_done {
                                self.header_done = true;
                                writeln!(
                                    self.out,
                                    "{:<16} {:>7}  {:<24} {:<18} {:<10} {:>7}  KEY",
                                    "STREAM", "SEQ", "TIME", "ORIGIN", "KIND", "BYTES"
                                )?;
                            }
                            writeln!(
                                self.out,
                                "{:<16} {:>7}  {:<24} {:<18} {:<10} {:>7}  {}",
                                batch.stream,
                                r.seq,
                                format_millis(super::hlc_millis(r.hlc)),
                                r.origin,
                                kind_name(r.kind),
                                r.payload.len(),
                                r.key
                            )?;
                        }
                    }
                }
            }
            None => {}
        }
        Ok(())
    }
}

/// `keel replay`; returns the number of records written. `progress`
/// shows a bar on stderr (only drawn on a terminal).
pub async fn replay(
    ch: Channel,
    args: &ReplayArgs,
    format: Format,
    progress: bool,
    out: &mut dyn Write,
) -> Result<u64, CliError> {
    let mut s = LogServiceClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .replay(ReplayRequest {
            filter: Some(args.filter()),
            after_seq: args.after_seq.unwrap_or(0),
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let bar = if progress {
        let b = indicatif::ProgressBar::with_draw_target(
            Some(0),
            indicatif::ProgressDrawTarget::stderr(),
        );
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {pos}/{len} seq ({per_sec}, eta {eta})",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let n = print_items(&mut s, format, out, &bar, false).await?;
    bar.finish_and_clear();
    Ok(n)
}

/// `keel tail`: runs until the server ends the stream (or the process is
/// stopped).
pub async fn tail(
    ch: Channel,
    args: &ReplayArgs,
    format: Format,
    out: &mut dyn Write,
) -> Result<u64, CliError> {
    let mut s = LogServiceClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .tail(TailRequest {
            filter: Some(args.filter()),
            after_seq: args.after_seq,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    print_items(&mut s, format, out, &indicatif::ProgressBar::hidden(), true).await
}

/// Prints a replay or tail stream to its end; `flush_each` writes each
/// message out as it arrives (tail). Returns the number of records.
async fn print_items(
    s: &mut tonic::Streaming<ReplayItem>,
    format: Format,
    out: &mut dyn Write,
    bar: &indicatif::ProgressBar,
    flush_each: bool,
) -> Result<u64, CliError> {
    let mut p = Printer {
        format,
        out,
        records: 0,
        header_done: false,
    };
    let mut pos = BTreeMap::new();
    while let Some(item) = s.message().await.map_err(rpc)? {
        p.item(item, bar, &mut pos)?;
        if flush_each {
            p.out.flush()?;
        }
    }
    p.out.flush()?;
    Ok(p.records)
}

fn origin_kind_name(k: i32) -> &'static str {
    match OriginKind::try_from(k) {
        Ok(OriginKind::User) => "user",
        Ok(OriginKind::Node) => "node",
        Ok(OriginKind::Cloudcore) => "cloudcore",
        _ => "unknown",
    }
}

fn short(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.chars().count() <= max {
        s
    } else {
        let mut t: String = s.chars().take(max).collect();
        t.push('…');
        t
    }
}

/// `keel audit TYPE/NAME`.
pub async fn audit(
    ch: Channel,
    key: &str,
    streams: Vec<String>,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let r = LogServiceClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .audit(AuditRequest {
            key: key.to_owned(),
            streams,
        })
        .await
        .map_err(rpc)?
        .into_inner();
    let parse = |s: &str| -> Value {
        if s.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(s).unwrap_or(Value::String(s.to_owned()))
        }
    };
    match format {
        Format::Json => {
            let entries: Vec<Value> = r
                .entries
                .iter()
                .map(|e| {
                    json!({"stream": e.stream, "seq": e.seq, "hlc": e.hlc,
                        "time": format_millis(e.time_ms), "origin": e.origin,
                        "originKind": origin_kind_name(e.origin_kind),
                        "kind": kind_name(e.kind), "patch": parse(&e.patch_json),
                        "hash": e.hash, "note": (!e.note.is_empty()).then_some(&e.note)})
                })
                .collect();
            let compacted: Vec<Value> = r
                .compacted
                .iter()
                .map(|c| {
                    json!({"stream": c.stream, "throughSeq": c.through_seq,
                        "object": parse(&c.object_json)})
                })
                .collect();
            writeln!(
                out,
                "{}",
                json!({"key": r.key, "compacted": compacted, "entries": entries,
                    "object": parse(&r.object_json)})
            )?;
        }
        Format::Table => {
            writeln!(out, "{}", r.key)?;
            for c in &r.compacted {
                writeln!(
                    out,
                    "  history before seq {} of {} compacted: its changes are folded into a snapshot{}",
                    c.through_seq + 1,
                    c.stream,
                    if c.object_json.is_empty() {
                        " (the object was not in it)".to_owned()
                    } else {
                        format!("; the object there: {}", short(&parse(&c.object_json), 100))
                    }
                )?;
            }
            if r.entries.is_empty() {
                writeln!(out, "  no changes in the log")?;
            }
            for e in &r.entries {
                writeln!(
                    out,
                    "{}  {} #{}  {} {}  {}{}",
                    format_millis(e.time_ms),
                    e.stream,
                    e.seq,
                    origin_kind_name(e.origin_kind),
                    e.origin,
                    kind_name(e.kind),
                    if e.note.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", e.note)
                    }
                )?;
                if let Value::Array(ops) = parse(&e.patch_json) {
                    for op in ops {
                        let verb = op.get("op").and_then(Value::as_str).unwrap_or("?");
                        let path = match op.get("path").and_then(Value::as_str) {
                            Some("") | None => "(whole object)",
                            Some(p) => p,
                        };
                        match op.get("value") {
                            Some(v) => writeln!(out, "    {verb:<7} {path} = {}", short(v, 100))?,
                            None => writeln!(out, "    {verb:<7} {path}")?,
                        }
                    }
                }
            }
            if r.object_json.is_empty() {
                writeln!(out, "(the object does not exist now)")?;
            }
        }
    }
    Ok(())
}

/// `keel verify`: an error (non-zero exit) if any chain does not verify.
pub async fn verify(
    ch: Channel,
    streams: Vec<String>,
    format: Format,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let r = LogServiceClient::new(ch)
        .verify_chain(VerifyChainRequest { streams })
        .await
        .map_err(rpc)?
        .into_inner();
    match format {
        Format::Json => {
            let v: Vec<Value> = r
                .streams
                .iter()
                .map(|s| {
                    json!({"stream": s.stream, "ok": s.ok, "horizon": s.horizon_seq,
                        "head": s.head_seq,
                        "firstBadSeq": (!s.ok && s.first_bad_seq != 0).then_some(s.first_bad_seq),
                        "reason": (!s.reason.is_empty()).then_some(&s.reason)})
                })
                .collect();
            writeln!(out, "{}", json!({ "streams": v }))?;
        }
        Format::Table => {
            let mut rows = vec![
                ["STREAM", "CHAIN", "VERIFIED", "FIRST BAD SEQ", "REASON"]
                    .map(String::from)
                    .to_vec(),
            ];
            for s in &r.streams {
                rows.push(vec![
                    s.stream.clone(),
                    if s.ok { "ok" } else { "BROKEN" }.into(),
                    format!("{}..={}", s.horizon_seq + 1, s.head_seq),
                    if s.ok || s.first_bad_seq == 0 {
                        "-".into()
                    } else {
                        s.first_bad_seq.to_string()
                    },
                    if s.reason.is_empty() {
                        "-".into()
                    } else {
                        s.reason.clone()
                    },
                ]);
            }
            table(out, &rows)?;
        }
    }
    out.flush()?;
    let bad: Vec<String> = r
        .streams
        .iter()
        .filter(|s| !s.ok)
        .map(|s| format!("{} at seq {}", s.stream, s.first_bad_seq))
        .collect();
    if bad.is_empty() {
        Ok(())
    } else {
        Err(CliError::Failed(format!(
            "hash chain does not verify: {}",
            bad.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn object_keys_in_kubectl_forms() {
        assert_eq!(
            object_key("pod/web", "default").unwrap(),
            "pods/default/web"
        );
        assert_eq!(object_key("po/web", "team").unwrap(), "pods/team/web");
        assert_eq!(
            object_key("Pod/web", "default").unwrap(),
            "pods/default/web"
        );
        assert_eq!(
            object_key("node/edge-1", "default").unwrap(),
            "nodes/edge-1"
        );
        assert_eq!(
            object_key("cm/conf", "default").unwrap(),
            "configmaps/default/conf"
        );
        assert_eq!(
            object_key("pods/kube-system/x", "default").unwrap(),
            "pods/kube-system/x"
        );
        assert!(object_key("web", "default").is_err());
        assert!(object_key("pod/", "default").is_err());
        assert!(object_key("widget/x", "default").is_err());
    }

    #[test]
    fn times_and_ages() {
        assert_eq!(parse_time("1700000000000", 0).unwrap(), 1_700_000_000_000);
        assert_eq!(parse_time("90s", 100_000).unwrap(), 10_000);
        assert_eq!(parse_time("2h", 10_000_000).unwrap(), 2_800_000);
        assert_eq!(parse_time("1d", 0).unwrap(), 0);
        assert!(parse_time("5x", 0).is_err());
        assert!(parse_time("h", 0).is_err());
        assert_eq!(format_millis(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn credentials_from_inline_kubeconfig() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kc");
        crate::core::write_kubeconfig(&p, "https://127.0.0.1:1", "CA", "CERT", "KEY").unwrap();
        let c = load_credentials(&p).unwrap();
        assert_eq!(
            (c.ca_pem.as_str(), c.cert_pem.as_str(), c.key_pem.as_str()),
            ("CA", "CERT", "KEY")
        );
        std::fs::write(&p, "apiVersion: v1\nclusters: []\n").unwrap();
        let e = load_credentials(&p).unwrap_err().to_string();
        assert!(e.contains("no cluster"), "{e}");
    }
}
