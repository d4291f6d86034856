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
        HubOptions::default(),
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

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
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
    eventually("resume", || {
        head(&c.store, &up).seq == 60 && head(&e.store, &down).seq == 65
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
