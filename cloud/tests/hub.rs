//! CloudHub and EdgeHub over real loopback QUIC with mTLS: sync both ways,
//! resume without resending, per-node authorisation, refused certificates,
//! and malformed input that closes only the offending connection.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_cloud::hub::{CloudHub, HubOptions};
use keel_cloud::pki::{self, ClusterCa};
use keel_edge::hub::EdgeHubOptions;
use keel_log::{Cursor, Entry, PayloadKind, Record, Role, Store, StoreOptions};
use keel_sync::frame::{Frame, Hello, encode_frame};
use keel_sync::link::{down_stream, up_stream};
use keel_sync::quic::Sink;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};

#[derive(Default)]
struct Recorder {
    /// Records persisted per stream, as handed to the sink (resends would
    /// show up here as extra records).
    records: Mutex<BTreeMap<String, Vec<u64>>>,
}

impl Sink for Recorder {
    fn admit(&self, _: &str, _: &str, _: &[Record]) -> Result<(), keel_sync::link::Refusal> {
        Ok(())
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        keel_sync::quic::room_now()
    }

    fn persisted(&self, _node: &str, stream: &str, records: &[Record]) {
        std::thread::sleep(Duration::from_millis(30));
        self.records
            .lock()
            .unwrap()
            .entry(stream.to_owned())
            .or_default()
            .extend(records.iter().map(|r| r.seq));
    }
    fn snapshot_installed(&self, _node: &str, _stream: &str) {}
}

impl Recorder {
    fn seqs(&self, stream: &str) -> Vec<u64> {
        self.records
            .lock()
            .unwrap()
            .get(stream)
            .cloned()
            .unwrap_or_default()
    }
}

struct Creds {
    cert_pem: String,
    key_pem: String,
    serial: String,
}

fn node_creds(ca: &ClusterCa, node: &str) -> Creds {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, node);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let issued = ca
        .sign_node_csr(&csr, node, pki::DEFAULT_NODE_CERT_VALIDITY)
        .unwrap();
    Creds {
        cert_pem: issued.cert_pem,
        key_pem: key.serialize_pem(),
        serial: issued.serial,
    }
}

struct Cloud {
    _dir: tempfile::TempDir,
    ca: ClusterCa,
    store: Store,
    sink: Arc<Recorder>,
    hub: CloudHub,
    addr: SocketAddr,
}

fn cloud() -> Cloud {
    cloud_with(HubOptions::default())
}

fn cloud_with(opts: HubOptions) -> Cloud {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let server = ca.server_cert(&["127.0.0.1"]).unwrap();
    let tls = pki::server_tls_config(&ca, &server.cert_pem, &server.key_pem).unwrap();
    let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
    let sink = Arc::new(Recorder::default());
    let hub = CloudHub::bind(
        "127.0.0.1:0".parse().unwrap(),
        tls,
        store.clone(),
        sink.clone(),
        opts,
    )
    .unwrap();
    let addr = hub.local_addr().unwrap();
    Cloud {
        _dir: dir,
        ca,
        store,
        sink,
        hub,
        addr,
    }
}

struct Edge {
    dir: tempfile::TempDir,
    store: Store,
    sink: Arc<Recorder>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Edge {
    fn new() -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        Edge {
            dir,
            store,
            sink: Arc::new(Recorder::default()),
            stop: None,
            task: None,
        }
    }

    fn start(&mut self, cloud: &Cloud, node: &str, creds: &Creds) {
        let tls =
            pki::client_tls_config(cloud.ca.cert_pem(), &creds.cert_pem, &creds.key_pem).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let opts = EdgeHubOptions::new(cloud.addr, node);
        let (store, sink) = (self.store.clone(), self.sink.clone());
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            keel_edge::hub::run(opts, tls, store, sink, None, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        }));
    }

    async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

fn entries(n: usize, origin: &str, tag: &str) -> Vec<Entry> {
    (0..n)
        .map(|i| {
            Entry::new(
                origin,
                format!("pods/default/p{}", i % 5),
                PayloadKind::Event,
                format!("{tag}-{i}"),
            )
        })
        .collect()
}

async fn eventually(what: &str, f: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(20), f).await;
}

async fn eventually_within(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    for _ in 0..limit.as_millis() / 50 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

fn head(store: &Store, stream: &str) -> Cursor {
    store.info(stream).map(|i| i.head).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_and_cloud_sync_both_ways_and_resume_without_resending() {
    let c = cloud();
    let creds = node_creds(&c.ca, "edge-a");
    let (down, up) = (down_stream("edge-a"), up_stream("edge-a"));
    c.store.create_stream(&down, Role::Writer, 1).unwrap();
    c.store.create_stream(&up, Role::Replica, 1).unwrap();
    c.store
        .append(&down, entries(50, "kubectl", "spec"))
        .unwrap();
    let mut e = Edge::new();
    e.store.create_stream(&up, Role::Writer, 1).unwrap();
    e.store.create_stream(&down, Role::Replica, 1).unwrap();
    e.store
        .append(&up, entries(50, "edge-a", "status"))
        .unwrap();

    e.start(&c, "edge-a", &creds);
    eventually("first catch-up", || {
        head(&c.store, &up).seq == 50 && head(&e.store, &down).seq == 50
    })
    .await;
    assert_eq!(head(&c.store, &up), head(&e.store, &up));
    assert_eq!(head(&c.store, &down), head(&e.store, &down));
    assert!(c.hub.connected().contains("edge-a"));

    // Live push on the open connection.
    c.store
        .append(&down, entries(5, "kubectl", "live"))
        .unwrap();
    eventually("live push", || head(&e.store, &down).seq == 55).await;

    // Disconnect, write on both sides while apart, reconnect.
    e.stop().await;
    c.store
        .append(&down, entries(10, "kubectl", "offline"))
        .unwrap();
    e.store
        .append(&up, entries(10, "edge-a", "offline"))
        .unwrap();
    e.start(&c, "edge-a", &creds);
    // The sinks hear of records after they are durable (the ack does not
    // wait for the fold): wait for them too.
    eventually("resume", || {
        head(&c.store, &up).seq == 60
            && head(&e.store, &down).seq == 65
            && c.sink.seqs(&up).len() >= 60
            && e.sink.seqs(&down).len() >= 65
    })
    .await;
    assert_eq!(head(&c.store, &up), head(&e.store, &up));
    assert_eq!(head(&c.store, &down), head(&e.store, &down));
    // Every record crossed exactly once over both connections.
    assert_eq!(c.sink.seqs(&up), (1..=60).collect::<Vec<_>>());
    assert_eq!(e.sink.seqs(&down), (1..=65).collect::<Vec<_>>());
    e.stop().await;
    assert_eq!(c.store.verify(&up).unwrap(), head(&e.store, &up));
    drop(e.dir);
}

/// Runs node `node`'s edge hub against `addr` on `edge`'s store, until
/// the returned sender fires.
fn spawn_node(
    ca: &ClusterCa,
    creds: &Creds,
    addr: SocketAddr,
    node: &str,
    edge: &Edge,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let tls = pki::client_tls_config(ca.cert_pem(), &creds.cert_pem, &creds.key_pem).unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let opts = EdgeHubOptions::new(addr, node);
    let (store, sink) = (edge.store.clone(), edge.sink.clone());
    let task = tokio::spawn(async move {
        keel_edge::hub::run(opts, tls, store, sink, None, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    (tx, task)
}

/// A crowd of nodes connecting at once, beyond the hub's handshakes in
/// flight: those turned away come back after their back-off, and every
/// node catches up both ways with each record crossing once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_beyond_the_handshake_bound_is_turned_away_and_comes_back() {
    let c = cloud_with(HubOptions {
        max_handshakes: 2,
        ..HubOptions::default()
    });
    let edge = Edge::new();
    // Two in flight and up to 17 waiting per slot (34): a crowd of 80
    // leaves more than 40 with neither.
    let nodes: Vec<String> = (0..80).map(|i| format!("crowd-{i:02}")).collect();
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    for node in &nodes {
        let (down, up) = (down_stream(node), up_stream(node));
        c.store.create_stream(&down, Role::Writer, 1).unwrap();
        c.store.create_stream(&up, Role::Replica, 1).unwrap();
        c.store
            .append(&down, entries(5, "kubectl", "spec"))
            .unwrap();
        edge.store.create_stream(&up, Role::Writer, 1).unwrap();
        edge.store.create_stream(&down, Role::Replica, 1).unwrap();
        edge.store.append(&up, entries(5, node, "status")).unwrap();
    }
    for node in &nodes {
        let (tx, task) = spawn_node(&c.ca, &node_creds(&c.ca, node), c.addr, node, &edge);
        stops.push(tx);
        tasks.push(task);
    }
    // Back-offs double from 200 ms: a node turned away often waits long.
    eventually_within(
        "every node caught up both ways",
        Duration::from_secs(120),
        || {
            // The sinks hear of records after they are durable.
            nodes.iter().all(|n| {
                head(&c.store, &up_stream(n)).seq == 5
                    && head(&edge.store, &down_stream(n)).seq == 5
                    && c.sink.seqs(&up_stream(n)).len() >= 5
                    && edge.sink.seqs(&down_stream(n)).len() >= 5
            })
        },
    )
    .await;
    let turned_away = c
        .hub
        .stats()
        .turned_away
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(turned_away > 0, "no connection was turned away");
    for n in &nodes {
        assert_eq!(c.sink.seqs(&up_stream(n)), (1..=5).collect::<Vec<_>>());
        assert_eq!(edge.sink.seqs(&down_stream(n)), (1..=5).collect::<Vec<_>>());
    }
    for tx in stops {
        let _ = tx.send(());
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A reconnect storm at small scale: 500 nodes connect at once (beyond
/// the hub's default bound on handshakes in flight), each 10 records
/// behind both ways; then the hub restarts on the same address while both
/// sides write 5 more, and every node comes back by itself. Every record
/// crosses, once. No timing is asserted (the reconnect_storm bench
/// measures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_500_nodes_catches_up_with_nothing_lost_across_a_hub_restart() {
    const NODES: usize = 500;
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let server = ca.server_cert(&["127.0.0.1"]).unwrap();
    let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
    let sink = Arc::new(Recorder::default());
    // The old hub's socket is held until its connections have drained: a
    // restart on the same address waits for it (as a restarted process
    // would find it free).
    let bind = |addr: SocketAddr| {
        let mut tries = 0;
        loop {
            let tls = pki::server_tls_config(&ca, &server.cert_pem, &server.key_pem).unwrap();
            match CloudHub::bind(
                addr,
                tls,
                store.clone(),
                sink.clone(),
                HubOptions::default(),
            ) {
                Ok(hub) => break hub,
                Err(_) if tries < 300 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("binding {addr}: {e}"),
            }
        }
    };
    let hub = bind("127.0.0.1:0".parse().unwrap());
    let addr = hub.local_addr().unwrap();
    let edge = Edge::new();
    let nodes: Vec<String> = (0..NODES).map(|i| format!("storm-{i:03}")).collect();
    let write_both = |tag: &str, n: usize| {
        let tickets: Vec<_> = nodes
            .iter()
            .flat_map(|node| {
                [
                    store
                        .append_async(&down_stream(node), entries(n, "kubectl", tag))
                        .unwrap(),
                    edge.store
                        .append_async(&up_stream(node), entries(n, node, tag))
                        .unwrap(),
                ]
            })
            .collect();
        tickets
    };
    for node in &nodes {
        let (down, up) = (down_stream(node), up_stream(node));
        store.create_stream(&down, Role::Writer, 1).unwrap();
        store.create_stream(&up, Role::Replica, 1).unwrap();
        edge.store.create_stream(&up, Role::Writer, 1).unwrap();
        edge.store.create_stream(&down, Role::Replica, 1).unwrap();
    }
    for t in write_both("first", 10) {
        t.await.unwrap();
    }
    // Caught up, and heard of by both sinks (which hear of records after
    // they are durable).
    let all_at = |seq: u64| {
        nodes.iter().all(|n| {
            head(&store, &up_stream(n)).seq == seq
                && head(&edge.store, &down_stream(n)).seq == seq
                && sink.seqs(&up_stream(n)).last() == Some(&seq)
                && edge.sink.seqs(&down_stream(n)).last() == Some(&seq)
        })
    };
    let mut stops = Vec::new();
    let mut tasks = Vec::new();
    let creds: Vec<Creds> = nodes.iter().map(|n| node_creds(&ca, n)).collect();
    let start = std::time::Instant::now();
    for (node, creds) in nodes.iter().zip(&creds) {
        let (tx, task) = spawn_node(&ca, creds, addr, node, &edge);
        stops.push(tx);
        tasks.push(task);
    }
    eventually_within(
        "the first storm caught up",
        Duration::from_secs(300),
        || all_at(10),
    )
    .await;
    eprintln!("500 nodes: first storm caught up in {:?}", start.elapsed());

    // Connected long enough that the nodes' back-off starts over (a
    // connection that lasts 10 s resets it), the hub restarts; meanwhile
    // both sides write.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let down = std::time::Instant::now();
    hub.shutdown().await;
    for t in write_both("apart", 5) {
        t.await.unwrap();
    }
    let hub = bind(addr);
    eprintln!("500 nodes: the hub was down {:?}", down.elapsed());
    let start = std::time::Instant::now();
    eventually_within(
        "the second storm caught up",
        Duration::from_secs(300),
        || all_at(15),
    )
    .await;
    eprintln!(
        "500 nodes: caught up {:?} after the hub came back",
        start.elapsed()
    );
    assert_eq!(hub.connected().len(), NODES);
    for n in &nodes {
        assert_eq!(
            sink.seqs(&up_stream(n)),
            (1..=15).collect::<Vec<_>>(),
            "{n} up"
        );
        assert_eq!(
            edge.sink.seqs(&down_stream(n)),
            (1..=15).collect::<Vec<_>>(),
            "{n} down"
        );
        assert_eq!(
            store.verify(&up_stream(n)).unwrap(),
            head(&edge.store, &up_stream(n))
        );
    }
    for tx in stops {
        let _ = tx.send(());
    }
    for t in tasks {
        t.await.unwrap();
    }
    hub.shutdown().await;
}

/// A raw client with a node certificate, speaking frames by hand.
async fn raw_client(c: &Cloud, creds: &Creds) -> quinn::Connection {
    let tls = pki::client_tls_config(c.ca.cert_pem(), &creds.cert_pem, &creds.key_pem).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    ep.connect(c.addr, "127.0.0.1").unwrap().await.unwrap()
}

async fn send_frames(conn: &quinn::Connection, frames: &[Vec<u8>]) {
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[0]).await.unwrap(); // control stream
    for f in frames {
        s.write_all(&(f.len() as u32).to_be_bytes()).await.unwrap();
        s.write_all(f).await.unwrap();
    }
}

async fn close_reason(conn: &quinn::Connection) -> String {
    match tokio::time::timeout(Duration::from_secs(20), conn.closed())
        .await
        .expect("the hub did not close the connection")
    {
        quinn::ConnectionError::ApplicationClosed(a) => {
            String::from_utf8_lossy(&a.reason).into_owned()
        }
        other => other.to_string(),
    }
}

fn hello(node: &str, cursors: Vec<(String, Cursor)>) -> Vec<u8> {
    encode_frame(&Frame::Hello(Hello {
        protocol_version: keel_proto::PROTOCOL_VERSION,
        node: node.into(),
        cursors,
        window_records: 64,
        window_bytes: 1 << 20,
    }))
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_certificate_reaches_only_its_own_streams() {
    let c = cloud();
    let a = node_creds(&c.ca, "edge-a");
    c.store
        .create_stream(&down_stream("edge-b"), Role::Writer, 1)
        .unwrap();
    c.store
        .create_stream(&up_stream("edge-b"), Role::Replica, 1)
        .unwrap();
    c.store
        .append(&down_stream("edge-b"), entries(3, "kubectl", "secret-of-b"))
        .unwrap();

    // Claiming to be B with A's certificate.
    let conn = raw_client(&c, &a).await;
    send_frames(&conn, &[hello("edge-b", vec![])]).await;
    let why = close_reason(&conn).await;
    assert!(
        why.contains("edge-b") && why.contains("edge-a"),
        "reason: {why}"
    );

    // Asking for B's down stream in A's Hello.
    let conn = raw_client(&c, &a).await;
    send_frames(
        &conn,
        &[hello(
            "edge-a",
            vec![(down_stream("edge-b"), Cursor::default())],
        )],
    )
    .await;
    let why = close_reason(&conn).await;
    assert!(why.contains("may not read"), "reason: {why}");

    // Writing into B's up stream.
    let forged = keel_log::Segment {
        stream: up_stream("edge-b"),
        epoch: 1,
        prev: Cursor::default(),
        records: vec![{
            let hash = Record::chain_hash(
                &keel_log::Hash::ZERO,
                1,
                1,
                1,
                "edge-a",
                "k",
                PayloadKind::Event,
                b"x",
            );
            Record {
                seq: 1,
                epoch: 1,
                hlc: 1,
                origin: "edge-a".into(),
                key: "k".into(),
                kind: PayloadKind::Event,
                payload: bytes::Bytes::from_static(b"x"),
                hash,
            }
        }],
    };
    let conn = raw_client(&c, &a).await;
    send_frames(
        &conn,
        &[
            hello("edge-a", vec![]),
            encode_frame(&Frame::Segment(forged)).to_vec(),
        ],
    )
    .await;
    let why = close_reason(&conn).await;
    assert!(why.contains("may not write"), "reason: {why}");
    assert_eq!(
        head(&c.store, &up_stream("edge-b")).seq,
        0,
        "nothing was written to B's stream"
    );
    assert!(c.sink.seqs(&up_stream("edge-b")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_foreign_certificates_are_refused_with_a_reason() {
    let c = cloud();
    let revoked = node_creds(&c.ca, "edge-r");
    c.ca.revoke(&revoked.serial).unwrap();
    let other_dir = tempfile::tempdir().unwrap();
    let other_ca = ClusterCa::load_or_create(other_dir.path()).unwrap();
    let foreign = node_creds(&other_ca, "edge-f");
    for (creds, want) in [(&revoked, "revoked"), (&foreign, "unknown")] {
        let tls = pki::client_tls_config(c.ca.cert_pem(), &creds.cert_pem, &creds.key_pem).unwrap();
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        // TLS 1.3: the client may finish its side before the server's alert
        // arrives; either way the connection ends with the alert as reason.
        let why = match ep.connect(c.addr, "127.0.0.1").unwrap().await {
            Err(e) => e.to_string(),
            Ok(conn) => tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .unwrap()
                .to_string(),
        };
        assert!(
            why.to_lowercase().contains(want),
            "reason for {want}: {why}"
        );
    }
    eventually("refusals counted", || {
        c.hub
            .stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    })
    .await;
    assert!(c.hub.connected().is_empty());
}

/// TLS session resumption: a node coming back resumes with the ticket the
/// hub gave it, across a hub restart (the ticket key comes from the hub's
/// persisted secret). A resumed handshake never asks the certificate
/// verifier, so a certificate revoked since would get in; the hub checks
/// every connection's certificate after the handshake and refuses it. A
/// ticket sealed under another secret does not open: a full handshake,
/// whose verifier refuses the revoked certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumed_sessions_are_checked_against_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let server = ca.server_cert(&["127.0.0.1"]).unwrap();
    let store = Store::open(dir.path().join("log"), StoreOptions::default()).unwrap();
    let hub_with = |secret: [u8; 32], revocations: Option<Arc<pki::Revocations>>| {
        let tickets = pki::HubTickets::new(&secret).unwrap();
        let tls = pki::hub_tls_config(&ca, &server.cert_pem, &server.key_pem, tickets).unwrap();
        CloudHub::bind(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            store.clone(),
            Arc::new(Recorder::default()),
            HubOptions {
                revocations,
                ..HubOptions::default()
            },
        )
        .unwrap()
    };
    let creds = node_creds(&ca, "edge-t");
    // One client configuration: its session store keeps the tickets.
    let tls = pki::client_tls_config(ca.cert_pem(), &creds.cert_pem, &creds.key_pem).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let settle = || tokio::time::sleep(Duration::from_millis(500));
    let connect = |hub: &CloudHub| ep.connect(hub.local_addr().unwrap(), "127.0.0.1").unwrap();

    // A full handshake; the hub sends a ticket.
    let hub = hub_with([7; 32], None);
    let conn = connect(&hub).await.unwrap();
    settle().await;
    conn.close(0u32.into(), b"bye");
    // Revoked since: without the hub's own check, the resumed session gets
    // in (and this shows the session was resumed: the verifier would
    // have refused it).
    ca.revoke(&creds.serial).unwrap();
    let conn = connect(&hub).await.unwrap();
    settle().await;
    assert!(
        conn.close_reason().is_none(),
        "not resumed: {:?}",
        conn.close_reason()
    );
    conn.close(0u32.into(), b"bye");
    hub.shutdown().await;
    // The hub restarted with the same secret and its check: the ticket
    // opens, the certificate is refused after the handshake.
    let hub = hub_with([7; 32], Some(ca.revocations()));
    let conn = connect(&hub).await.unwrap();
    let why = close_reason(&conn).await;
    assert!(why.contains("revoked"), "{why}");
    hub.shutdown().await;
    // Another secret: the ticket does not open, the full handshake's
    // verifier refuses the certificate.
    let hub = hub_with([9; 32], None);
    let why = match ep
        .connect(hub.local_addr().unwrap(), "127.0.0.1")
        .unwrap()
        .await
    {
        Err(e) => e.to_string(),
        Ok(conn) => tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .unwrap()
            .to_string(),
    };
    assert!(why.to_lowercase().contains("revoked"), "{why}");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_closes_only_the_offending_connection() {
    let c = cloud();
    let good = node_creds(&c.ca, "edge-g");
    let bad = node_creds(&c.ca, "edge-x");
    let mut e = Edge::new();
    e.start(&c, "edge-g", &good);
    eventually("good edge connected", || {
        c.hub.connected().contains("edge-g")
    })
    .await;

    // Garbage UDP datagrams at the hub's port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let junk: Vec<u8> = (0..(i % 1200 + 1)).map(|k| (k * 31 + i) as u8).collect();
        udp.send_to(&junk, c.addr).unwrap();
    }
    // A malformed frame, an oversized frame, an unknown stream kind.
    let conn = raw_client(&c, &bad).await;
    send_frames(&conn, &[b"\xff\xff\xff\xff garbage".to_vec()]).await;
    let why = close_reason(&conn).await;
    assert!(why.contains("malformed"), "reason: {why}");
    let conn = raw_client(&c, &bad).await;
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[0, 0xff, 0xff, 0xff, 0xff]).await.unwrap();
    let why = close_reason(&conn).await;
    assert!(why.contains("exceeds"), "reason: {why}");
    let conn = raw_client(&c, &bad).await;
    let mut s = conn.open_uni().await.unwrap();
    s.write_all(&[7, 1, 2, 3]).await.unwrap();
    let why = close_reason(&conn).await;
    assert!(why.contains("unknown stream kind"), "reason: {why}");

    // The good edge still syncs.
    c.store
        .append(
            &down_stream("edge-g"),
            entries(7, "kubectl", "after-garbage"),
        )
        .unwrap();
    eventually("good edge still served", || {
        head(&e.store, &down_stream("edge-g")).seq == 7
    })
    .await;
    assert!(c.hub.connected().contains("edge-g"));
    e.stop().await;
}
