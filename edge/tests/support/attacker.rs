//! A hostile edge node for the attack tests: a real QUIC + mTLS client
//! with a real node certificate (joined with a token through the bootstrap
//! endpoint, as edgecore joins), which speaks the sync wire protocol by
//! hand so that it can send what an honest edgecore never would.
//!
//! Wire: each side opens two unidirectional streams, the first byte of each
//! is its kind (0 control, 1 bulk), then frames as `u32 BE length ‖
//! protobuf keel.v1.Frame`.
//!
//! Also here: the fixture every attack starts from (a cloudcore with its
//! admin gRPC API, a real edgecore beside the attacker) and the checks that
//! must hold after every attack.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use keel_edge::bootstrap::NodeIdentity;
use keel_log::{Cursor, Entry, Hash, ObjectSnapshot, PayloadKind, Record, Segment, Snapshot};
use keel_sync::crdt::ObjectStore;
use keel_sync::frame::{Frame, Hello, MAX_FRAME_BYTES, decode_frame, encode_frame};
use keel_sync::link::{down_stream, up_stream};
use serde_json::Value;
use tokio::sync::mpsc;

use super::cluster::{Cloud, Edge, Proc, free_port, free_udp_port, kubectl, ok, run, wait_for};

/// Stream kinds: the first byte of each unidirectional stream.
pub const CONTROL: u8 = 0;
pub const BULK: u8 = 1;

/// The honest node beside the attacker.
pub const BYSTANDER: &str = "bystander";
/// The hostile node.
pub const ATTACKER: &str = "mallory";
/// cloudcore's peak resident set must stay below this, whatever is sent.
pub const RSS_CAP_KIB: u64 = 1 << 20;

/// How long the cloud may take to close a hostile connection (generous:
/// the tests assert that it closes, not how fast).
pub const CLOSE_WITHIN: Duration = Duration::from_secs(60);

pub fn now_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

/// An HLC timestamp for now (milliseconds << 16).
pub fn hlc_now() -> u64 {
    now_ms() << 16
}

// ---------------------------------------------------------------------------
// the attacker
// ---------------------------------------------------------------------------

/// What the attacker received of its `down` stream, folded as edgecore
/// would fold it.
#[derive(Default)]
pub struct Down {
    pub cursor: Cursor,
    pub records: Vec<Record>,
    pub objects: ObjectStore,
}

impl Down {
    fn take(&mut self, seg: &Segment) {
        let fresh: Vec<Record> = seg
            .records
            .iter()
            .filter(|r| r.seq > self.cursor.seq)
            .cloned()
            .collect();
        let Some(first) = fresh.first() else {
            return;
        };
        if first.seq != self.cursor.seq + 1 {
            return;
        }
        let _ = keel_sync::objects::apply_records(&mut self.objects, &fresh);
        self.cursor = fresh.last().unwrap().cursor();
        self.records.extend(fresh);
    }
}

/// A node that joined the cluster for real and then misbehaves.
pub struct Attacker {
    pub node: String,
    pub identity: NodeIdentity,
    pub hub: SocketAddr,
    endpoint: quinn::Endpoint,
    pub down: Arc<Mutex<Down>>,
}

impl Attacker {
    /// Joins as `node` with `token` through the bootstrap endpoint (the
    /// real join: CA pinned by the token, CSR, node certificate), and
    /// prepares a QUIC client with that certificate. Must run inside a
    /// tokio runtime.
    pub async fn join(
        bootstrap: SocketAddr,
        hub: SocketAddr,
        token: &str,
        node: &str,
        dir: &Path,
    ) -> Attacker {
        let identity = keel_edge::bootstrap::join(bootstrap, token, node, dir)
            .await
            .expect("the attacker joins with its token");
        let tls = identity.client_tls_config().unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut client = quinn::ClientConfig::new(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(quinn::IdleTimeout::try_from(Duration::from_secs(90)).ok());
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        transport.max_concurrent_uni_streams(2u32.into());
        transport.max_concurrent_bidi_streams(0u32.into());
        client.transport_config(Arc::new(transport));
        let mut endpoint =
            keel_sync::quic::client_endpoint(([127, 0, 0, 1], 0).into()).expect("client endpoint");
        endpoint.set_default_client_config(client);
        Attacker {
            node: node.to_owned(),
            identity,
            hub,
            endpoint,
            down: Arc::default(),
        }
    }

    /// A copy of the objects received so far (to forge changes on without
    /// touching the attacker's own view).
    pub fn objects(&self) -> ObjectStore {
        self.down.lock().unwrap().objects.clone()
    }

    pub fn object(&self, key: &str) -> Option<Value> {
        self.down.lock().unwrap().objects.get_json(key)
    }

    /// A connection with both streams open (kind bytes sent), nothing else
    /// sent yet. Frames the cloud sends are read in the background.
    pub async fn connect(&self) -> Conn {
        let conn = self
            .endpoint
            .connect(self.hub, &self.hub.ip().to_string())
            .unwrap()
            .await
            .expect("QUIC + mTLS handshake with the node certificate");
        let mut ctrl = conn.open_uni().await.unwrap();
        let mut bulk = conn.open_uni().await.unwrap();
        ctrl.write_all(&[CONTROL]).await.unwrap();
        bulk.write_all(&[BULK]).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        {
            let conn = conn.clone();
            let down = self.down.clone();
            let down_name = down_stream(&self.node);
            tokio::spawn(async move {
                for _ in 0..2 {
                    let Ok(recv) = conn.accept_uni().await else {
                        return;
                    };
                    let (tx, down, name) = (tx.clone(), down.clone(), down_name.clone());
                    tokio::spawn(read_frames(recv, tx, down, name));
                }
            });
        }
        Conn {
            conn,
            node: self.node.clone(),
            ctrl,
            bulk,
            rx,
            seen: Vec::new(),
            cloud_hello: None,
            up: Cursor::default(),
            down: self.down.clone(),
        }
    }

    /// A QUIC + mTLS handshake only: the connection, or why it failed
    /// (TLS 1.3: a refused client certificate may only show once the
    /// connection closes, so a connection that closes at once counts as
    /// refused too).
    pub async fn try_handshake(&self) -> Result<quinn::Connection, String> {
        let conn = self
            .endpoint
            .connect(self.hub, &self.hub.ip().to_string())
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
            Ok(e) => Err(e.to_string()),
            Err(_) => Ok(conn),
        }
    }

    /// [`Self::connect`] and a valid Hello; waits for the cloud's Hello.
    pub async fn establish(&self) -> Conn {
        let mut c = self.connect().await;
        c.hello().await;
        c.wait_cloud_hello().await;
        c
    }

    /// Waits until the down stream brought `key`.
    pub async fn wait_object(&self, key: &str) -> Value {
        let start = std::time::Instant::now();
        loop {
            if let Some(v) = self.object(key) {
                return v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "timed out waiting for {key} on the attacker's down stream"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn read_frames(
    mut recv: quinn::RecvStream,
    tx: mpsc::UnboundedSender<Frame>,
    down: Arc<Mutex<Down>>,
    down_name: String,
) {
    let mut kind = [0u8; 1];
    if recv.read_exact(&mut kind).await.is_err() {
        return;
    }
    loop {
        let mut len = [0u8; 4];
        if recv.read_exact(&mut len).await.is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_FRAME_BYTES {
            return;
        }
        let mut buf = vec![0u8; len];
        if recv.read_exact(&mut buf).await.is_err() {
            return;
        }
        let Ok(f) = decode_frame(&buf) else {
            return;
        };
        if let Frame::Segment(seg) = &f
            && seg.stream == down_name
        {
            down.lock().unwrap().take(seg);
        }
        if tx.send(f).is_err() {
            return;
        }
    }
}

/// One connection of the attacker.
pub struct Conn {
    pub conn: quinn::Connection,
    node: String,
    ctrl: quinn::SendStream,
    bulk: quinn::SendStream,
    rx: mpsc::UnboundedReceiver<Frame>,
    /// Frames from the cloud not consumed by a wait.
    pub seen: Vec<Frame>,
    /// The cloud's Hello, once received.
    pub cloud_hello: Option<Hello>,
    /// Where the next up record chains (the cloud's cursor from its Hello,
    /// then the last record sent).
    pub up: Cursor,
    down: Arc<Mutex<Down>>,
}

impl Conn {
    /// Writes raw bytes on the control or bulk stream. False if the stream
    /// is gone (the cloud closed the connection).
    pub async fn send_raw(&mut self, kind: u8, bytes: &[u8]) -> bool {
        let s = if kind == CONTROL {
            &mut self.ctrl
        } else {
            &mut self.bulk
        };
        s.write_all(bytes).await.is_ok()
    }

    /// Writes one length-prefixed frame body on a stream.
    pub async fn send_body(&mut self, kind: u8, body: &[u8]) -> bool {
        let len = u32::try_from(body.len()).unwrap().to_be_bytes();
        let mut buf = Vec::with_capacity(4 + body.len());
        buf.extend_from_slice(&len);
        buf.extend_from_slice(body);
        self.send_raw(kind, &buf).await
    }

    /// Sends a frame on the stream it belongs on.
    pub async fn send(&mut self, f: &Frame) -> bool {
        let kind = if f.is_control() { CONTROL } else { BULK };
        self.send_body(kind, &encode_frame(f)).await
    }

    /// A valid Hello for the attacker's node, resuming `down` from what
    /// the attacker received.
    pub async fn hello(&mut self) -> bool {
        let cursor = self.down.lock().unwrap().cursor;
        let f = Frame::Hello(Hello {
            protocol_version: keel_proto::PROTOCOL_VERSION,
            node: self.node.clone(),
            cursors: vec![(down_stream(&self.node), cursor)],
            window_records: 4096,
            window_bytes: 8 << 20,
        });
        self.send(&f).await
    }

    /// The next frame from the cloud, if one comes within `limit`.
    pub async fn next_frame(&mut self, limit: Duration) -> Option<Frame> {
        tokio::time::timeout(limit, self.rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits for the cloud's Hello; notes the cloud's cursor of `N/up`.
    pub async fn wait_cloud_hello(&mut self) -> Hello {
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            match self.next_frame(Duration::from_secs(1)).await {
                Some(Frame::Hello(h)) => {
                    let up = up_stream(&self.node);
                    self.up = h
                        .cursors
                        .iter()
                        .find(|(s, _)| *s == up)
                        .map(|(_, c)| *c)
                        .unwrap_or_default();
                    self.cloud_hello = Some(h.clone());
                    return h;
                }
                Some(f) => self.seen.push(f),
                None => {
                    if let Some(e) = self.conn.close_reason() {
                        panic!("closed before the cloud's Hello: {}", reason_of(&e));
                    }
                }
            }
        }
        panic!("no Hello from the cloud within 60 s");
    }

    /// Waits for the cloud's ack of `N/up` up to `seq`.
    pub async fn wait_ack(&mut self, seq: u64) -> Cursor {
        let up = up_stream(&self.node);
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            match self.next_frame(Duration::from_secs(1)).await {
                Some(Frame::Ack { stream, cursor }) if stream == up && cursor.seq >= seq => {
                    return cursor;
                }
                Some(f) => self.seen.push(f),
                None => {
                    if let Some(e) = self.conn.close_reason() {
                        panic!("closed before the ack of {up} seq {seq}: {}", reason_of(&e));
                    }
                }
            }
        }
        panic!("no ack of {up} seq {seq} within 60 s");
    }

    /// Acknowledges what the attacker received of its down stream.
    pub async fn ack_down(&mut self) -> bool {
        let cursor = self.down.lock().unwrap().cursor;
        let f = Frame::Ack {
            stream: down_stream(&self.node),
            cursor,
        };
        self.send(&f).await
    }

    /// Records that extend the chain the cloud holds of `N/up` (from the
    /// cursor in its Hello, then from the last record made here), each
    /// with the given HLC. Returns them as one segment.
    pub fn segment(&mut self, entries: Vec<Entry>, hlc: u64) -> Segment {
        let prev = self.up;
        let epoch = prev.epoch.max(1);
        let mut records = Vec::with_capacity(entries.len());
        let mut at = prev;
        for e in entries {
            let seq = at.seq + 1;
            let hash = Record::chain_hash(
                &at.hash, seq, epoch, hlc, &e.origin, &e.key, e.kind, &e.payload,
            );
            let r = Record {
                seq,
                epoch,
                hlc,
                origin: e.origin.into(),
                key: e.key.into(),
                kind: e.kind,
                payload: e.payload,
                hash,
            };
            at = r.cursor();
            records.push(r);
        }
        self.up = at;
        Segment {
            stream: up_stream(&self.node),
            epoch,
            prev: Cursor { epoch, ..prev },
            records,
        }
    }

    /// Sends records built by [`Self::segment`] (HLC now).
    pub async fn send_entries(&mut self, entries: Vec<Entry>) -> bool {
        let seg = self.segment(entries, hlc_now());
        self.send(&Frame::Segment(seg)).await
    }

    /// A snapshot chunk of `N/up`.
    pub fn snapshot(
        &self,
        base: Cursor,
        objects: Vec<ObjectSnapshot>,
        chunk: u32,
        last: bool,
    ) -> Frame {
        Frame::Snapshot {
            stream: up_stream(&self.node),
            snapshot: Snapshot { base, objects },
            chunk,
            last,
        }
    }

    /// Waits until the cloud closes the connection; its close reason (the
    /// application-close reason string), or a description of how else it
    /// ended. Panics if it is still open after `limit`.
    pub async fn closed(&self, limit: Duration) -> String {
        match tokio::time::timeout(limit, self.conn.closed()).await {
            Ok(e) => reason_of(&e),
            Err(_) => panic!("the cloud did not close the connection within {limit:?}"),
        }
    }

    /// Like [`Self::closed`], but `None` if still open after `limit`.
    pub async fn closed_within(&self, limit: Duration) -> Option<String> {
        tokio::time::timeout(limit, self.conn.closed())
            .await
            .ok()
            .map(|e| reason_of(&e))
    }

    /// The close reason if the connection is closed by now.
    pub fn close_reason(&self) -> Option<String> {
        self.conn.close_reason().map(|e| reason_of(&e))
    }
}

/// The reason string of a connection the peer closed at the application
/// level, or a description of how else it ended.
pub fn reason_of(e: &quinn::ConnectionError) -> String {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => {
            String::from_utf8_lossy(&c.reason).into_owned()
        }
        other => format!("<not an application close: {other}>"),
    }
}

/// Asserts that `reason` names one of `keywords` (case-insensitively).
#[track_caller]
pub fn assert_reason(reason: &str, keywords: &[&str]) {
    let lower = reason.to_lowercase();
    assert!(
        keywords.iter().any(|k| lower.contains(&k.to_lowercase())),
        "close reason {reason:?} names none of {keywords:?}"
    );
}

/// An object snapshot of `bytes` bytes of state.
pub fn object_snapshot(key: &str, bytes: usize) -> ObjectSnapshot {
    ObjectSnapshot {
        key: key.to_owned(),
        seq: 1,
        state: Bytes::from(vec![0x55; bytes]),
    }
}

/// An entry of the attacker's node (origin = its name).
pub fn entry(origin: &str, key: &str, kind: PayloadKind, payload: Vec<u8>) -> Entry {
    Entry::new(origin, key, kind, payload)
}

pub fn some_hash(b: u8) -> Hash {
    Hash([b; 32])
}

// ---------------------------------------------------------------------------
// hand-made payloads
// ---------------------------------------------------------------------------

/// Protobuf varint.
pub fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A `keel.v1.Frame` of about `bytes` bytes holding a Segment of nothing
/// but empty records (`Frame.segment = 2`, `Segment.records = 5`): cheap
/// to send, many entries to decode.
pub fn frame_of_empty_records(bytes: usize) -> Vec<u8> {
    let n = bytes / 2;
    let mut seg = Vec::with_capacity(n * 2);
    for _ in 0..n {
        seg.extend_from_slice(&[0x2a, 0x00]);
    }
    let mut out = vec![0x12];
    varint(seg.len() as u64, &mut out);
    out.extend_from_slice(&seg);
    out
}

struct Bits {
    out: Vec<u8>,
    acc: u8,
    n: u8,
}

impl Bits {
    fn push(&mut self, bit: u8) {
        self.acc |= (bit & 1) << self.n;
        self.n += 1;
        if self.n == 8 {
            self.out.push(self.acc);
            self.acc = 0;
            self.n = 0;
        }
    }
    /// A value, least significant bit first (header fields, extra bits).
    fn value(&mut self, v: u32, n: u8) {
        for i in 0..n {
            self.push(((v >> i) & 1) as u8);
        }
    }
    /// A Huffman code, most significant bit first.
    fn code(&mut self, c: u32, n: u8) {
        for i in (0..n).rev() {
            self.push(((c >> i) & 1) as u8);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push(self.acc);
        }
        self.out
    }
}

/// A raw DEFLATE stream (RFC 1951) that inflates to `1 + 258 * repeats`
/// zero bytes: one dynamic-Huffman block whose literal/length code gives
/// length 258 a 1-bit code and whose distance code gives distance 1 a
/// 1-bit code, so each 258 bytes of output cost 2 bits (about 1:1000).
pub fn deflate_zeros(repeats: usize) -> Vec<u8> {
    let mut b = Bits {
        out: Vec::with_capacity(repeats / 4 + 64),
        acc: 0,
        n: 0,
    };
    b.value(1, 1); // BFINAL
    b.value(2, 2); // BTYPE = dynamic
    b.value(29, 5); // HLIT: 286 literal/length codes
    b.value(1, 5); // HDIST: 2 distance codes
    b.value(14, 4); // HCLEN: 18 code-length codes
    // Code-length code lengths in RFC order: 18 → 1 bit, 1 and 2 → 2 bits.
    let order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1];
    for s in order {
        let len = match s {
            18 => 1,
            1 | 2 => 2,
            _ => 0,
        };
        b.value(len, 3);
    }
    // Canonical codes of the code-length alphabet: 18 → 0, 1 → 10, 2 → 11.
    let (cl1, cl2, cl18) = ((0b10, 2), (0b11, 2), (0, 1));
    // Literal/length lengths: 0 → 2, 1..=255 → 0, 256 → 2, 257..=284 → 0,
    // 285 → 1; then distance lengths 1, 1.
    b.code(cl2.0, cl2.1);
    b.code(cl18.0, cl18.1);
    b.value(138 - 11, 7);
    b.code(cl18.0, cl18.1);
    b.value(117 - 11, 7);
    b.code(cl2.0, cl2.1);
    b.code(cl18.0, cl18.1);
    b.value(28 - 11, 7);
    b.code(cl1.0, cl1.1);
    b.code(cl1.0, cl1.1);
    b.code(cl1.0, cl1.1);
    // Literal/length codes: 285 → 0, 0 → 10, 256 → 11; distance 0 → 0.
    b.code(0b10, 2); // literal 0
    for _ in 0..repeats {
        b.code(0, 1); // length 258
        b.code(0, 1); // distance 1
    }
    b.code(0b11, 2); // end of block
    b.finish()
}

/// An automerge chunk of type 2 (compressed change) whose body is
/// [`deflate_zeros`] inflating to about `inflated` bytes.
pub fn compressed_change_chunk(inflated: usize) -> Vec<u8> {
    let body = deflate_zeros(inflated / 258);
    let mut out = vec![0x85, 0x6f, 0x4a, 0x83, 0, 0, 0, 0, 2];
    varint(body.len() as u64, &mut out);
    out.extend_from_slice(&body);
    out
}

// ---------------------------------------------------------------------------
// the fixture
// ---------------------------------------------------------------------------

pub fn sibling(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_edgecore")).with_file_name(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first with `cargo build -p keel-cloud --bins`",
        bin.display()
    );
    bin
}

/// cloudcore with its admin gRPC API (for `keel`) and metrics, on free
/// loopback ports: the cloud, the gRPC address and the metrics address.
pub fn start_cloud(dir: &Path) -> (Cloud, String, String) {
    let api = format!("127.0.0.1:{}", free_port());
    let hub = format!("127.0.0.1:{}", free_udp_port());
    let bootstrap = format!("127.0.0.1:{}", free_port());
    let grpc = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.with_extension("log"))
        .unwrap();
    let child = Command::new(sibling("cloudcore"))
        .args(["run", "--data-dir"])
        .arg(dir)
        .args(["--api-addr", &api, "--hub-addr", &hub])
        .args(["--bootstrap-addr", &bootstrap, "--grpc-addr", &grpc])
        .args(["--metrics-addr", &metrics])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let cloud = Cloud {
        dir: dir.to_owned(),
        api,
        hub,
        bootstrap,
        stream: String::new(),
        proc: Proc(Some(child)),
    };
    wait_for("cloudcore to serve", Duration::from_secs(60), || {
        cloud.kubeconfig().exists()
            && cloud.k(&["get", "--raw", "/healthz"]).status.success()
            && keel(&cloud, &grpc, &["verify"]).status.success()
    });
    (cloud, grpc, metrics)
}

/// The `keel` admin CLI against `cloud`.
pub fn keel(cloud: &Cloud, grpc: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(sibling("keel"));
    cmd.arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .args(["--server", grpc])
        .args(args);
    run(&mut cmd, None)
}

pub use super::cluster::proc_kib;

pub fn pod_yaml(name: &str, node: &str, extra_container: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n{extra_spec}  containers:\n  - name: main\n    image: busybox\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 3600\"]\n{extra_container}"
    )
}

/// Every attack starts here: a cloudcore (admin gRPC on), a real edgecore
/// ("bystander") connected and Ready, and the attacker joined with its own
/// token.
pub struct Fixture {
    pub cloud: Cloud,
    pub grpc: String,
    pub metrics: String,
    pub bystander: Edge,
    pub attacker: Attacker,
    pub rt: tokio::runtime::Runtime,
    pub tmp: tempfile::TempDir,
}

impl Fixture {
    pub fn start() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        eprintln!("state and logs in {}", tmp.path().display());
        let (cloud, grpc, metrics) = start_cloud(&tmp.path().join("cloud"));
        let bystander = Edge::start(
            &tmp.path().join(BYSTANDER),
            BYSTANDER,
            &cloud,
            Some(cloud.token(BYSTANDER)),
            None,
        );
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let token = cloud.token(ATTACKER);
        let attacker = rt.block_on(Attacker::join(
            cloud.bootstrap.parse().unwrap(),
            cloud.hub.parse().unwrap(),
            &token,
            ATTACKER,
            &tmp.path().join(ATTACKER),
        ));
        let fx = Fixture {
            cloud,
            grpc,
            metrics,
            bystander,
            attacker,
            rt,
            tmp,
        };
        wait_for("the bystander Ready", Duration::from_secs(60), || {
            fx.node_ready(BYSTANDER)
        });
        fx
    }

    pub fn cloud_pid(&self) -> u32 {
        self.cloud.proc.0.as_ref().unwrap().id()
    }

    pub fn node_ready(&self, node: &str) -> bool {
        let o = self.cloud.k(&["get", "nodes"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with(node) && l.contains(" Ready"))
    }

    /// kubectl against the cloud, with `stdin`.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> Output {
        kubectl(
            &self.cloud.kubeconfig(),
            &self.cloud.dir.with_extension("kube-cache"),
            args,
            stdin,
        )
    }

    pub fn apply(&self, yaml: &str) {
        ok(
            self.kubectl(&["apply", "-f", "-"], Some(yaml)),
            "kubectl apply",
        );
    }

    /// An object as the cloud's API serves it.
    pub fn get(&self, args: &[&str]) -> Value {
        let mut a = vec!["get"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&ok(self.kubectl(&a, None), "kubectl get")).unwrap()
    }

    /// cloudcore's `/metrics`.
    pub fn metrics(&self) -> String {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect(&self.metrics).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        out
    }

    pub fn keel(&self, args: &[&str]) -> Output {
        keel(&self.cloud, &self.grpc, args)
    }

    /// `keel replay -o json` lines of type `record`.
    pub fn replay(&self, args: &[&str]) -> Vec<Value> {
        let mut a = vec!["replay", "--quiet"];
        a.extend_from_slice(args);
        a.extend_from_slice(&["-o", "json"]);
        ok(self.keel(&a), "keel replay")
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|l| l["type"] == "record")
            .collect()
    }

    pub fn wait_pod_phase(&self, name: &str, phase: &str) {
        wait_for(
            &format!("pod {name} {phase} on the cloud"),
            Duration::from_secs(90),
            || {
                let o = self.kubectl(&["get", "pod", name, "-o", "json"], None);
                o.status.success()
                    && serde_json::from_slice::<Value>(&o.stdout).unwrap()["status"]["phase"]
                        == phase
            },
        );
    }

    /// What must hold after every attack: cloudcore is alive and serves
    /// kubectl, the bystander still converges (a new pod bound to it runs
    /// and its status reaches the cloud), every chain verifies, and
    /// cloudcore's peak RSS stayed below [`RSS_CAP_KIB`].
    pub fn assert_healthy(&mut self, tag: &str) {
        assert!(
            self.cloud.proc.alive(),
            "cloudcore died; see {}",
            self.cloud.dir.with_extension("log").display()
        );
        let peak = proc_kib(self.cloud_pid(), "VmHWM");
        ok(self.kubectl(&["get", "nodes"], None), "kubectl get nodes");
        let probe = format!("probe-{tag}");
        self.apply(&pod_yaml(&probe, BYSTANDER, "", ""));
        self.wait_pod_phase(&probe, "Running");
        wait_for(
            "the probe pod on the bystander's own API",
            Duration::from_secs(60),
            || {
                self.bystander
                    .pod(&probe)
                    .is_some_and(|p| p["status"]["phase"] == "Running")
            },
        );
        let v: Value =
            serde_json::from_str(&ok(self.keel(&["verify", "-o", "json"]), "keel verify")).unwrap();
        let streams = v["streams"].as_array().unwrap();
        assert!(!streams.is_empty(), "{v}");
        assert!(streams.iter().all(|s| s["ok"] == true), "keel verify: {v}");
        let peak = peak.max(proc_kib(self.cloud_pid(), "VmHWM"));
        assert!(
            peak < RSS_CAP_KIB,
            "cloudcore's peak RSS {peak} KiB reached the {RSS_CAP_KIB} KiB cap"
        );
        assert!(self.cloud.proc.alive(), "cloudcore died");
    }
}
