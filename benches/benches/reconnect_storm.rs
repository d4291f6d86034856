//! Reconnect storm: N edge nodes (default 10,000; `KEEL_STORM_NODES`)
//! reconnect at once to one CloudHub over loopback QUIC with mTLS, each 10
//! records behind in both directions. Measures wall time until every node
//! is caught up both ways, handshakes/s, and the cloud process's RSS with
//! every connection idle.
//!
//! `cargo bench -p keel-benches --bench reconnect_storm` (criterion, 10+
//! storms), or with `KEEL_STORM_ONCE=1` two (cold, then warm); `KEEL_STORM_TRACE=1`
//! prints progress twice a second; `KEEL_STORM_MAX_HANDSHAKES` sets the
//! cloud's handshakes in flight (`0`: no bound).
//!
//! The first storm is cold (full TLS handshakes), the later ones warm (the
//! nodes resume their sessions with the hub's tickets). Each storm
//! reports: time until 50 / 90 / 99 / 100 % of the nodes are
//! caught up both ways, handshakes/s, connection attempts the cloud turned
//! away, UDP datagrams the kernel dropped (`/proc/net/snmp`), and the CPU
//! time of the cloud process and of this one (the simulated edges).
//!
//! The cloud runs in a child process (this binary with `KEEL_STORM_CLOUD`
//! set) so that its RSS is its own; the edges share client endpoints (one per 500 nodes)
//! and one log store in this process. Each storm: all connections close,
//! both sides append 10 records per node, then all reconnect at once.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use criterion::Criterion;
use keel_cloud::hub::{CloudHub, HubOptions};
use keel_cloud::pki::{self, ClusterCa};
use keel_log::{Cursor, Entry, PayloadKind, Record, Role, Store, StoreOptions};
use keel_sync::link::{LinkConfig, Side, down_stream, up_stream};
use keel_sync::quic::{Sink, run_link};

const BEHIND: usize = 10;

fn nodes() -> usize {
    std::env::var("KEEL_STORM_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000)
}

fn node(i: usize) -> String {
    format!("storm-{i:05}")
}

fn entries(origin: &str, round: usize) -> Vec<Entry> {
    (0..BEHIND)
        .map(|k| {
            // Opaque event records (readings): the cloud refuses a
            // "change" that is not an automerge change by the node.
            Entry::new(
                origin,
                format!("pods/default/p{k}"),
                PayloadKind::Event,
                format!("round {round} record {k}: {:0>200}", k),
            )
        })
        .collect()
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

struct Quiet;
impl Sink for Quiet {
    fn admit(&self, _: &str, _: &str, _: &[Record]) -> Result<(), keel_sync::link::Refusal> {
        Ok(())
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        keel_sync::quic::room_now()
    }

    fn persisted(&self, _: &str, _: &str, _: &[Record]) {}
    fn snapshot_installed(&self, _: &str, _: &str) {}
}

/// Child: the cloud. Commands on stdin: `append`, `rss`; answers on stdout.
fn cloud(dir: &str) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let ca = ClusterCa::load_or_create(std::path::Path::new(dir)).unwrap();
        let server = ca.server_cert(&["127.0.0.1"]).unwrap();
        // Session tickets, as cloudcore's hub: storms after the first
        // resume their TLS sessions.
        let tickets = pki::HubTickets::new(&[7; 32]).unwrap();
        let tls = pki::hub_tls_config(&ca, &server.cert_pem, &server.key_pem, tickets).unwrap();
        let store = Store::open(
            std::path::Path::new(dir).join("log"),
            StoreOptions::default(),
        )
        .unwrap();
        let n = nodes();
        for i in 0..n {
            store
                .create_stream(&down_stream(&node(i)), Role::Writer, 1)
                .unwrap();
            store
                .create_stream(&up_stream(&node(i)), Role::Replica, 1)
                .unwrap();
        }
        let mut opts = HubOptions::default();
        if let Some(k) = std::env::var("KEEL_STORM_MAX_HANDSHAKES")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
        {
            opts.max_handshakes = if k == 0 { usize::MAX } else { k };
        }
        let hub = CloudHub::bind(
            "127.0.0.1:0".parse().unwrap(),
            tls,
            store.clone(),
            Arc::new(Quiet),
            opts,
        )
        .unwrap();
        println!("addr {}", hub.local_addr().unwrap());
        let mut round = 0;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(cmd) = rx.recv().await {
            match cmd.as_str() {
                "append" => {
                    round += 1;
                    let tickets: Vec<_> = (0..n)
                        .map(|i| {
                            store
                                .append_async(&down_stream(&node(i)), entries("kubectl", round))
                                .unwrap()
                        })
                        .collect();
                    for t in tickets {
                        t.await.unwrap();
                    }
                    println!("ok");
                }
                "rss" => println!("rss {} connected {}", rss_kib(), hub.connected().len()),
                "turned-away" => println!(
                    "{}",
                    hub.stats()
                        .turned_away
                        .load(std::sync::atomic::Ordering::Relaxed)
                ),
                _ => break,
            }
            std::io::stdout().flush().unwrap();
        }
    });
}

struct Edges {
    configs: Vec<quinn::ClientConfig>,
    store: Store,
    _dir: tempfile::TempDir,
}

#[derive(Default)]
struct Progress {
    connected: AtomicUsize,
    done: AtomicUsize,
    last_connect_ns: AtomicU64,
    /// When each node was caught up both ways, from the storm's start.
    done_at: std::sync::Mutex<Vec<Duration>>,
}

/// CPU time (user + system) of process `pid`, from `/proc`.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 (11 and 12 after the name);
    // the kernel's USER_HZ is 100.
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// The kernel's UDP receive errors and receive-buffer drops.
fn udp_drops() -> (u64, u64) {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let udp: Vec<Vec<&str>> = snmp
        .lines()
        .filter(|l| l.starts_with("Udp:"))
        .map(|l| l.split_whitespace().collect())
        .collect();
    let (Some(names), Some(values)) = (udp.first(), udp.get(1)) else {
        return (0, 0);
    };
    let get = |name: &str| {
        names
            .iter()
            .position(|n| *n == name)
            .and_then(|i| values.get(i))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("InErrors"), get("RcvbufErrors"))
}

struct EdgeSink {
    progress: Arc<Progress>,
    start: Instant,
    want_up: u64,
    want_down: u64,
    store: Store,
    state: std::sync::Mutex<(bool, bool)>,
}

impl EdgeSink {
    fn check(&self, down_ok: bool, up_ok: bool) {
        let mut s = self.state.lock().unwrap();
        let before = s.0 && s.1;
        s.0 |= down_ok;
        s.1 |= up_ok;
        if !before && s.0 && s.1 {
            self.progress
                .done_at
                .lock()
                .unwrap()
                .push(self.start.elapsed());
            self.progress.done.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Sink for EdgeSink {
    fn admit(&self, _: &str, _: &str, _: &[Record]) -> Result<(), keel_sync::link::Refusal> {
        Ok(())
    }
    fn room(&self) -> keel_sync::quic::Room<'_> {
        keel_sync::quic::room_now()
    }

    fn persisted(&self, node: &str, stream: &str, _: &[Record]) {
        let head = self.store.info(stream).map(|i| i.head.seq).unwrap_or(0);
        let _ = node;
        self.check(head >= self.want_down, false);
    }
    fn snapshot_installed(&self, _: &str, _: &str) {}
    fn connected(&self, _: &str) {
        self.progress.connected.fetch_add(1, Ordering::SeqCst);
        self.progress
            .last_connect_ns
            .fetch_max(self.start.elapsed().as_nanos() as u64, Ordering::SeqCst);
    }
    fn acked(&self, _: &str, _: &str, cursor: Cursor) {
        self.check(false, cursor.seq >= self.want_up);
    }
}

fn storm(c: &mut Criterion) {
    let n = nodes();
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("KEEL_STORM_CLOUD", dir.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let cloud_pid = child.id();
    let mut to_cloud = child.stdin.take().unwrap();
    let mut from_cloud = BufReader::new(child.stdout.take().unwrap()).lines();
    let addr: SocketAddr = from_cloud
        .next()
        .unwrap()
        .unwrap()
        .strip_prefix("addr ")
        .unwrap()
        .parse()
        .unwrap();
    let mut ask = |cmd: &str| -> String {
        writeln!(to_cloud, "{cmd}").unwrap();
        to_cloud.flush().unwrap();
        from_cloud.next().unwrap().unwrap()
    };

    // Node identities from the cloud's CA (created by the child).
    let ca = ClusterCa::load_or_create(dir.path()).unwrap();
    let edir = tempfile::tempdir().unwrap();
    let store = Store::open(edir.path(), StoreOptions::default()).unwrap();
    let configs: Vec<quinn::ClientConfig> = (0..n)
        .map(|i| {
            let name = node(i);
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let mut params = rcgen::CertificateParams::default();
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name.clone());
            let csr = params.serialize_request(&key).unwrap().pem().unwrap();
            let cert = ca
                .sign_node_csr(&csr, &name, pki::DEFAULT_NODE_CERT_VALIDITY)
                .unwrap();
            let tls = pki::client_tls_config(ca.cert_pem(), &cert.cert_pem, &key.serialize_pem())
                .unwrap();
            let mut cfg = quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
            ));
            cfg.transport_config(Arc::new(keel_cloud::hub::transport(
                Duration::from_secs(90),
                Some(Duration::from_secs(25)),
            )));
            store
                .create_stream(&up_stream(&name), Role::Writer, 1)
                .unwrap();
            store
                .create_stream(&down_stream(&name), Role::Replica, 1)
                .unwrap();
            cfg
        })
        .collect();
    let edges = Edges {
        configs,
        store,
        _dir: edir,
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    // One client endpoint (UDP socket) per 500 nodes: a fleet's packets do
    // not share one socket buffer, and one socket for 10,000 handshakes
    // would measure the bench's own drops.
    let per_endpoint = 500;
    let endpoints_for = || -> Vec<quinn::Endpoint> {
        rt.block_on(async {
            (0..n.div_ceil(per_endpoint))
                .map(|_| keel_sync::quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap())
                .collect()
        })
    };
    let mut endpoints = endpoints_for();
    let rss_before = ask("rss");
    let mut round = 0usize;
    let mut report = Vec::new();
    let conns: Arc<std::sync::Mutex<Vec<quinn::Connection>>> = Arc::default();

    let mut storm_once = || -> Duration {
        // Everyone offline; both sides write 10 records per node.
        rt.block_on(async {
            for e in &endpoints {
                e.close(0u32.into(), b"storm round over");
            }
            for e in &endpoints {
                e.wait_idle().await;
            }
        });
        endpoints = endpoints_for();
        round += 1;
        assert_eq!(ask("append"), "ok");
        let tickets: Vec<_> = (0..n)
            .map(|i| {
                edges
                    .store
                    .append_async(&up_stream(&node(i)), entries(&node(i), round))
                    .unwrap()
            })
            .collect();
        rt.block_on(async {
            for t in tickets {
                t.await.unwrap();
            }
        });
        let want = (round * BEHIND) as u64;
        let progress = Arc::new(Progress::default());
        conns.lock().unwrap().clear();
        let trace_errors = std::env::var_os("KEEL_STORM_TRACE").is_some();
        let turned_away_before: u64 = ask("turned-away").parse().unwrap_or(0);
        let drops_before = udp_drops();
        let cpu_before = (cpu_secs(cloud_pid), cpu_secs(std::process::id()));
        let start = Instant::now();
        rt.block_on(async {
            for i in 0..n {
                let name = node(i);
                let sink = Arc::new(EdgeSink {
                    progress: progress.clone(),
                    start,
                    want_up: want,
                    want_down: want,
                    store: edges.store.clone(),
                    state: Default::default(),
                });
                let (ep, cfg, store, conns) = (
                    endpoints[i / per_endpoint].clone(),
                    edges.configs[i].clone(),
                    edges.store.clone(),
                    conns.clone(),
                );
                tokio::spawn(async move {
                    // A handshake refused or lost in the storm is retried
                    // after EdgeHub's jittered back-off.
                    let defaults = keel_edge::hub::EdgeHubOptions::new(addr, name.clone());
                    let mut attempt = 0;
                    let conn = loop {
                        match ep
                            .connect_with(cfg.clone(), addr, "127.0.0.1")
                            .unwrap()
                            .await
                        {
                            Ok(c) => break c,
                            Err(e) => {
                                if trace_errors {
                                    eprintln!("{name}: {e}; retrying");
                                }
                                let wait = keel_edge::hub::backoff(
                                    attempt,
                                    defaults.backoff_min,
                                    defaults.backoff_max,
                                    rand_u64(),
                                );
                                attempt += 1;
                                tokio::time::sleep(wait).await;
                            }
                        }
                    };
                    conns.lock().unwrap().push(conn.clone());
                    let head = store.info(&down_stream(&name)).unwrap().head;
                    let mut link = LinkConfig::new(name.clone(), Side::Edge, head);
                    link.ping_interval_ms = defaults.ping_interval.as_millis() as u64;
                    link.idle_timeout_ms = defaults.link_idle_timeout.as_millis() as u64;
                    run_link(conn, store, link, sink, None).await;
                });
            }
            let trace = std::env::var_os("KEEL_STORM_TRACE").is_some();
            let mut last_trace = Instant::now();
            while progress.done.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
                if trace && last_trace.elapsed() > Duration::from_millis(500) {
                    last_trace = Instant::now();
                    eprintln!(
                        "storm {:.1}s: {} connected, {} caught up",
                        start.elapsed().as_secs_f64(),
                        progress.connected.load(Ordering::SeqCst),
                        progress.done.load(Ordering::SeqCst)
                    );
                }
                assert!(
                    start.elapsed() < Duration::from_secs(600),
                    "storm stuck: {} connected, {} caught up of {n}",
                    progress.connected.load(Ordering::SeqCst),
                    progress.done.load(Ordering::SeqCst)
                );
            }
        });
        let took = start.elapsed();
        let hs = progress.last_connect_ns.load(Ordering::SeqCst) as f64 / 1e9;
        let mut done_at = progress.done_at.lock().unwrap().clone();
        done_at.sort();
        let at = |p: usize| done_at[(done_at.len() * p / 100).min(done_at.len() - 1)].as_secs_f64();
        let drops = udp_drops();
        let turned_away: u64 = ask("turned-away").parse().unwrap_or(0);
        report.push(StormReport {
            took,
            p50: at(50),
            p90: at(90),
            p99: at(99),
            handshakes_per_sec: n as f64 / hs,
            turned_away: turned_away - turned_away_before,
            udp_in_errors: drops.0 - drops_before.0,
            udp_rcvbuf_errors: drops.1 - drops_before.1,
            cloud_cpu: cpu_secs(cloud_pid) - cpu_before.0,
            edges_cpu: cpu_secs(std::process::id()) - cpu_before.1,
        });
        took
    };
    if std::env::var_os("KEEL_STORM_ONCE").is_some() {
        // Two storms, no statistics (a 10,000-node storm takes a minute):
        // cold (first connections: full handshakes) and warm (resumed).
        storm_once();
        storm_once();
    } else {
        let mut g = c.benchmark_group("reconnect_storm");
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(1))
            .measurement_time(Duration::from_secs(1));
        g.bench_function(format!("{n}-nodes-10-behind-both-ways"), |b| {
            b.iter_custom(|iters| (0..iters).map(|_| storm_once()).sum())
        });
        g.finish();
    }
    std::thread::sleep(Duration::from_secs(2));
    let rss_idle = ask("rss");
    let idle_secs: u64 = std::env::var("KEEL_STORM_IDLE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let wire = || -> u64 {
        conns
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                let s = c.stats();
                s.udp_tx.bytes + s.udp_rx.bytes
            })
            .sum()
    };
    let open0 = conns.lock().unwrap().len();
    let before = wire();
    std::thread::sleep(Duration::from_secs(idle_secs));
    let after = wire();
    let open = conns
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.close_reason().is_none())
        .count();
    for (i, r) in report.iter().enumerate() {
        let kind = if i == 0 { "cold" } else { "warm" };
        eprintln!(
            "storm {kind}: {n} nodes caught up both ways: 50 % {:.2} s, 90 % {:.2} s, 99 % {:.2} s, 100 % {:.2} s; handshakes {:.0}/s; turned away {}; kernel UDP drops {} (receive-buffer {}); CPU: cloud {:.1} s, edges {:.1} s",
            r.p50,
            r.p90,
            r.p99,
            r.took.as_secs_f64(),
            r.handshakes_per_sec,
            r.turned_away,
            r.udp_in_errors,
            r.udp_rcvbuf_errors,
            r.cloud_cpu,
            r.edges_cpu,
        );
    }
    eprintln!("cloud process before connections: {rss_before}");
    let kib = |s: &str| -> u64 {
        s.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    eprintln!(
        "cloud RSS per idle connected node: {:.1} KB",
        (kib(&rss_idle).saturating_sub(kib(&rss_before))) as f64 * 1024.0 / 1000.0 / n as f64
    );
    eprintln!("cloud process with {n} idle connections: {rss_idle}");
    eprintln!(
        "idle wire: {} bytes both ways over {idle_secs} s for {open0} connections ({open} still open): {:.2} bytes/s per node",
        after - before,
        (after - before) as f64 / idle_secs as f64 / open0.max(1) as f64
    );
    let _ = to_cloud.write_all(b"quit\n");
    let _ = child.kill();
    let _ = child.wait();
}

/// What one storm measured.
struct StormReport {
    took: Duration,
    p50: f64,
    p90: f64,
    p99: f64,
    handshakes_per_sec: f64,
    turned_away: u64,
    udp_in_errors: u64,
    udp_rcvbuf_errors: u64,
    cloud_cpu: f64,
    edges_cpu: f64,
}

/// Jitter for the back-off (not cryptographic).
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish()
}

fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Ok(dir) = std::env::var("KEEL_STORM_CLOUD") {
        cloud(&dir);
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    storm(&mut c);
    c.final_summary();
}
