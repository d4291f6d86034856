//! Several cloudcore replicas attached to one real Kubernetes cluster
//! (etcd, kube-apiserver, kube-controller-manager, kube-scheduler built
//! from the Go module proxy), sharing its edge nodes by Leases: real
//! edgecores, and in-process EdgeHubs for most nodes (30 in all), that
//! know every replica's hub. The replica owning the most
//! nodes is SIGKILLed while the nodes record status changes, then every
//! replica is restarted in turn: every node comes back Ready under a live
//! replica, what each edge recorded reaches the API server, and no pod is
//! restarted or recreated.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/k8s.rs"]
mod k8s;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cluster::*;
use k8s::{ControlPlane, K8sOptions};
use serde_json::Value;

const REPLICAS: usize = 3;
/// Real edgecores (pods run there).
const NODES: usize = 6;
/// In-process EdgeHubs (keel-edge's own, in this test's process): they
/// report a counter in their Node's status.
const LIGHT: usize = 24;
/// Tells the in-process nodes to stop counting.
static STOP_COUNTING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// In-process nodes that stopped counting (their last value durable).
static STOPPED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
/// Seconds a shard Lease lasts unrenewed, and an edge waits for a silent
/// replica: a failover within seconds.
const LEASE_SECS: &str = "6";
/// Times each counter pod's container exits before it stays up.
const RUNS: u64 = 6;

/// A Deployment spread over the edge nodes (one pod each): it must never
/// restart.
fn web() -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: {NODES}
  selector:
    matchLabels: {{app: web}}
  template:
    metadata:
      labels: {{app: web}}
    spec:
      nodeSelector:
        keel-test/runs-pods: "true"
      topologySpreadConstraints:
      - maxSkew: 1
        topologyKey: kubernetes.io/hostname
        whenUnsatisfiable: DoNotSchedule
        labelSelector:
          matchLabels: {{app: web}}
      terminationGracePeriodSeconds: 2
      containers:
      - name: main
        image: busybox
        command: ["/bin/sh", "-c", "exec sleep 3600"]
"#
    )
}

/// One pod per edge node whose container exits `RUNS` times (each exit a
/// status change its node records: a restart count one higher), then
/// stays up.
fn counter(name: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: DaemonSet
metadata:
  name: {name}
spec:
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      nodeSelector:
        keel-test/runs-pods: "true"
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: busybox
        command: ["/bin/sh", "-c", "n=$(cat runs 2>/dev/null || echo 0); n=$((n+1)); echo $n > runs; if [ $n -gt {RUNS} ]; then exec sleep 3600; fi; sleep 1; exit 3"]
"#
    )
}

fn node_name(i: usize) -> String {
    format!("edge-{i}")
}

fn get(k8s: &ControlPlane, what: &[&str]) -> Value {
    let mut args = vec!["get"];
    args.extend_from_slice(what);
    args.extend_from_slice(&["-o", "json"]);
    let o = k8s.kubectl(&args);
    if !o.status.success() {
        return Value::Null;
    }
    serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
}

fn pods(k8s: &ControlPlane, app: &str) -> Vec<Value> {
    get(k8s, &["pods", "-l", &format!("app={app}")])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A pod's name, node, phase, deletion and scheduling condition, for a
/// failure's output.
fn pod_state(p: &Value) -> String {
    let scheduled = p["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "PodScheduled"))
        .map(|c| format!("{} {}", c["status"], c["message"]))
        .unwrap_or_default();
    format!(
        "{} on {} {} deleting={} scheduled={scheduled}",
        p["metadata"]["name"],
        p["spec"]["nodeName"],
        p["status"]["phase"],
        !p["metadata"]["deletionTimestamp"].is_null()
    )
}

fn ready(n: &Value) -> bool {
    n["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
        .is_some_and(|c| c["status"] == "True")
}

/// Node → the stream address its status names (that of the replica
/// that wrote it last), for every edge Node.
fn stream_of(k8s: &ControlPlane) -> BTreeMap<String, (bool, String)> {
    let list = get(k8s, &["nodes", "-l", "node-role.kubernetes.io/edge"]);
    let mut out = BTreeMap::new();
    for n in list["items"].as_array().cloned().unwrap_or_default() {
        let name = n["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let ip = n["status"]["addresses"][0]["address"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let port = &n["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"];
        out.insert(name, (ready(&n), format!("{ip}:{port}")));
    }
    out
}

/// Shard Lease holders: replica → shards held.
fn holders(k8s: &ControlPlane) -> BTreeMap<String, usize> {
    let list = get(
        k8s,
        &[
            "leases",
            "-n",
            "kube-system",
            "-l",
            "lease.keel.io/kind=shard",
        ],
    );
    let mut out = BTreeMap::new();
    for l in list["items"].as_array().cloned().unwrap_or_default() {
        if let Some(h) = l["spec"]["holderIdentity"].as_str() {
            *out.entry(h.to_owned()).or_insert(0) += 1;
        }
    }
    out
}

fn restarts(p: &Value) -> u64 {
    p["status"]["containerStatuses"][0]["restartCount"]
        .as_u64()
        .unwrap_or(0)
}

struct Replica {
    id: String,
    dir: PathBuf,
    hub: String,
    metrics: String,
    grpc: String,
    cloud: Option<Cloud>,
}

impl Replica {
    fn start(&mut self, kubeconfig: &Path) {
        self.cloud = Some(Cloud::start_attached_with(
            &self.dir,
            kubeconfig,
            Some(self.hub.clone()),
            None,
            None,
            &[
                "--replica-id",
                &self.id,
                "--shard-lease-seconds",
                LEASE_SECS,
                "--metrics-addr",
                &self.metrics,
                "--grpc-addr",
                &self.grpc,
            ],
        ));
    }

    fn cloud(&self) -> &Cloud {
        self.cloud.as_ref().unwrap()
    }
}

/// Every edge Node Ready, its status written by a live replica.
fn all_ready_under(k8s: &ControlPlane, live: &BTreeSet<String>) -> bool {
    let s = stream_of(k8s);
    let ok = s.len() == NODES + LIGHT && s.values().all(|(r, at)| *r && live.contains(at));
    if !ok {
        // What is missing, for a failure's output.
        let off: Vec<String> = s
            .iter()
            .filter(|(_, (r, at))| !*r || !live.contains(at))
            .map(|(n, (r, at))| format!("{n}: ready={r} at {at}"))
            .collect();
        eprintln!("not yet (live {live:?}): {off:?}");
    }
    ok
}

fn light_name(i: usize) -> String {
    format!("light-{i}")
}

/// An edge node made of keel-edge's EdgeHub and MetaManager alone, in this
/// process: it joins through `cloud` with `token`, knows every hub in `hubs`, and
/// writes counter values into its Node's status (an extended resource in
/// `capacity`), one every `every`, each once the previous is durable, until
/// `STOP_COUNTING`. Returns its count so far.
fn light_node(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    name: &str,
    cloud: &Cloud,
    token: String,
    hubs: &[String],
    every: Duration,
) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
    use keel_edge::{bootstrap, hub, meta::MetaManager};
    let count = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let bootstrap_addr = cloud.bootstrap.parse().unwrap();
    let home: std::net::SocketAddr = cloud.hub.parse().unwrap();
    let alternates: Vec<std::net::SocketAddr> = hubs
        .iter()
        .map(|h| h.parse().unwrap())
        .filter(|h| *h != home)
        .collect();
    let (dir, name) = (dir.to_owned(), name.to_owned());
    let counted = count.clone();
    rt.block_on(async move {
        std::fs::create_dir_all(&dir).unwrap();
        let id = bootstrap::join(bootstrap_addr, &token, &name, &dir)
            .await
            .unwrap();
        let tls = bootstrap::LiveIdentity::new(id)
            .unwrap()
            .client_tls_config()
            .unwrap();
        let store =
            keel_log::Store::open(dir.join("log"), keel_log::StoreOptions::default()).unwrap();
        let meta = MetaManager::open(store.clone(), &name).unwrap();
        let mut opts = hub::EdgeHubOptions::new(home, name.clone());
        opts.alternates = alternates;
        opts.idle_timeout = Duration::from_secs(LEASE_SECS.parse().unwrap());
        opts.keep_alive = Duration::from_secs(2);
        let m = meta.clone();
        tokio::spawn(hub::run(opts, tls, store, m, None, std::future::pending()));
        let key = format!("nodes/{name}");
        tokio::spawn(async move {
            let mut n = 0u64;
            while !STOP_COUNTING.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(every).await;
                if meta.object(&key).is_none() {
                    continue;
                }
                let next = n + 1;
                let written = meta.update_durable(&key, |o| {
                    o["status"]["capacity"]["keel.io/ticks"] = Value::from(next.to_string());
                });
                if let Ok(Some(done)) = written
                    && done.await == Ok(true)
                {
                    n = next;
                    counted.store(n, std::sync::atomic::Ordering::SeqCst);
                }
            }
            STOPPED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        });
    });
    count
}

/// Node name → the ticks its status shows on the API server.
fn ticks(k8s: &ControlPlane) -> BTreeMap<String, u64> {
    let list = get(k8s, &["nodes", "-l", "node-role.kubernetes.io/edge"]);
    list["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter_map(|n| {
            let t = n["status"]["capacity"]["keel.io/ticks"]
                .as_str()?
                .parse()
                .ok()?;
            Some((n["metadata"]["name"].as_str()?.to_owned(), t))
        })
        .collect()
}

/// Watches `kind` objects labelled `selector` on the API server into
/// `out`: every version it sends, as JSON.
fn watch(k8s: &ControlPlane, kind: &str, selector: &str, out: &Path) -> Child {
    Command::new(support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(k8s.admin_kubeconfig())
        .args(["get", kind, "-l", selector, "--watch", "-o", "json"])
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Pod name → the restart counts the watch saw, in order.
fn watched(out: &Path) -> BTreeMap<String, Vec<u64>> {
    let text = std::fs::read_to_string(out).unwrap_or_default();
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for v in serde_json::Deserializer::from_str(&text).into_iter::<Value>() {
        let Ok(p) = v else { break };
        let name = p["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        seen.entry(name).or_default().push(restarts(&p));
    }
    seen
}

/// Runs a counter DaemonSet through `disrupt`, then checks that every
/// node's count reached the API server, in order, and that the edge's
/// own view agrees.
fn counted(k8s: &ControlPlane, edges: &[Edge], tmp: &Path, name: &str, disrupt: impl FnOnce()) {
    let out = tmp.join(format!("{name}.watch"));
    let mut w = watch(k8s, "pods", &format!("app={name}"), &out);
    k8s.apply_yaml(&counter(name));
    wait_for(
        &format!("{name} pods running everywhere"),
        Duration::from_secs(120),
        || {
            let p = pods(k8s, name);
            p.len() == NODES && p.iter().all(|p| p["status"]["phase"] == "Running")
        },
    );
    disrupt();
    wait_for(
        &format!("every {name} pod's {RUNS} restarts on the API server"),
        Duration::from_secs(240),
        || {
            let p = pods(k8s, name);
            p.len() == NODES && p.iter().all(|p| restarts(p) == RUNS)
        },
    );
    // The edges recorded exactly as many.
    for e in edges {
        let o = e.k(&["get", "pods", "-l", &format!("app={name}"), "-o", "json"]);
        let list: Value = serde_json::from_slice(&o.stdout).unwrap();
        for p in list["items"].as_array().unwrap() {
            assert_eq!(restarts(p), RUNS, "edge {}: {p}", e.dir.display());
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let _ = w.kill();
    let _ = w.wait();
    // In order on the API server: no count went back.
    let seen = watched(&out);
    assert_eq!(seen.len(), NODES, "{seen:?}");
    for (pod, counts) in &seen {
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{pod}: restart counts out of order on the API server: {counts:?}"
        );
        assert_eq!(counts.last(), Some(&RUNS), "{pod}: {counts:?}");
    }
}

/// A directory removed when dropped, unless the test is failing.
struct KeptOnFailure(PathBuf);

impl KeptOnFailure {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for KeptOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn replicas_share_the_nodes_and_fail_over_with_nothing_lost() {
    // Kept when the test fails (the replicas' and edges' logs are there).
    let tmp = KeptOnFailure(tempfile::tempdir().unwrap().keep());
    eprintln!("state and logs in {}", tmp.path().display());
    // The in-process nodes' logs, beside the replicas' and edgecores'.
    let log = std::fs::File::create(tmp.path().join("light-nodes.log")).unwrap();
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .try_init();
    let k8s = ControlPlane::start(K8sOptions {
        unreachable_toleration_secs: 300,
        node_monitor_grace_secs: 25,
        ..K8sOptions::default()
    });
    let kubeconfig = k8s.admin_kubeconfig().to_owned();

    // Three replicas; they share the first one's cluster CA through the
    // cluster (a Secret).
    let mut replicas: Vec<Replica> = (0..REPLICAS)
        .map(|i| Replica {
            id: format!("r{i}"),
            dir: tmp.path().join(format!("cloud-{i}")),
            hub: format!("127.0.0.1:{}", free_udp_port()),
            metrics: format!("127.0.0.1:{}", free_port()),
            grpc: format!("127.0.0.1:{}", free_port()),
            cloud: None,
        })
        .collect();
    replicas[0].start(&kubeconfig);
    for r in replicas.iter_mut().skip(1) {
        r.start(&kubeconfig);
    }
    for r in &replicas[1..] {
        assert_eq!(
            std::fs::read(r.dir.join("pki/ca.pem")).unwrap(),
            std::fs::read(replicas[0].dir.join("pki/ca.pem")).unwrap(),
            "replica {} has another CA",
            r.id
        );
    }
    // A replica whose data directory holds another cluster's CA is
    // refused with a message.
    let stranger = tmp.path().join("stranger");
    std::fs::create_dir_all(stranger.join("pki")).unwrap();
    let made = Command::new(cloudcore_bin())
        .args(["token", "x", "--data-dir"])
        .arg(&stranger)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let out = Command::new(cloudcore_bin())
        .args(["run", "--no-grpc", "--data-dir"])
        .arg(&stranger)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--replica-id", "stranger", "--hub-addr", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is not the cluster's"), "{err}");
    wait_for(
        "the shards split three ways",
        Duration::from_secs(60),
        || {
            let h = holders(&k8s);
            h.len() == REPLICAS && h.values().sum::<usize>() == 32 && h.values().all(|n| *n >= 10)
        },
    );

    // Edge nodes, each joining through one replica and knowing them all.
    let hubs: Vec<String> = replicas.iter().map(|r| r.hub.clone()).collect();
    let edges: Vec<Edge> = (0..NODES)
        .map(|i| {
            let home = replicas[i % REPLICAS].cloud();
            let others: Vec<&str> = hubs
                .iter()
                .filter(|h| **h != home.hub)
                .map(String::as_str)
                .collect();
            let n = node_name(i);
            Edge::start_with(
                &tmp.path().join(&n),
                &n,
                home,
                Some(home.token(&n)),
                None,
                &[
                    "--cloud-hubs",
                    &others.join(","),
                    "--hub-idle-timeout-seconds",
                    LEASE_SECS,
                ],
            )
        })
        .collect();
    // The in-process nodes, spread over the replicas like the others,
    // counting in their Node's status from now to well past the failover.
    let node_watch = tmp.path().join("nodes.watch");
    let mut nw = watch(&k8s, "nodes", "node-role.kubernetes.io/edge", &node_watch);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // Each joins through one replica with a token another replica made
    // (join tokens are shared through the cluster).
    let tokens: Vec<String> = (0..LIGHT)
        .map(|i| token_from(&replicas[(i + 1) % REPLICAS], &light_name(i)))
        .collect();
    let light: Vec<_> = (0..LIGHT)
        .map(|i| {
            let n = light_name(i);
            light_node(
                &rt,
                &tmp.path().join(&n),
                &n,
                replicas[i % REPLICAS].cloud(),
                tokens[i].clone(),
                &hubs,
                Duration::from_millis(1000),
            )
        })
        .collect();
    let mut live: BTreeSet<String> = replicas.iter().map(|r| r.cloud().stream.clone()).collect();
    wait_for(
        "every edge Node Ready on the cluster",
        Duration::from_secs(120),
        || all_ready_under(&k8s, &live),
    );
    for i in 0..NODES {
        k8s.kubectl_ok(&["label", "node", &node_name(i), "keel-test/runs-pods=true"]);
    }
    k8s.apply_yaml(&web());
    let mut last = String::new();
    wait_for(
        "web running on every node",
        Duration::from_secs(120),
        || {
            let p = pods(&k8s, "web");
            let ok = p.len() == NODES
                && p.iter().all(|p| {
                    p["status"]["phase"] == "Running"
                        && p["metadata"]["deletionTimestamp"].is_null()
                });
            if !ok {
                // What is missing, for a failure's output, when it changes.
                let now = format!("{:?}", p.iter().map(pod_state).collect::<Vec<_>>());
                if now != last {
                    eprintln!("web not yet: {now}");
                    last = now;
                }
            }
            ok
        },
    );
    let web_before: BTreeMap<String, Value> = pods(&k8s, "web")
        .into_iter()
        .map(|p| (p["metadata"]["uid"].as_str().unwrap().to_owned(), p))
        .collect();
    let web_unchanged = |k8s: &ControlPlane| {
        let now = pods(k8s, "web");
        assert_eq!(now.len(), NODES, "{now:?}");
        for p in &now {
            let uid = p["metadata"]["uid"].as_str().unwrap();
            let before = web_before
                .get(uid)
                .unwrap_or_else(|| panic!("recreated: {p}"));
            assert_eq!(restarts(p), 0, "{p}");
            assert_eq!(
                p["status"]["containerStatuses"][0]["containerID"],
                before["status"]["containerStatuses"][0]["containerID"],
                "{p}"
            );
        }
    };

    // SIGKILL the replica whose stream address the most Nodes name, while
    // every node records restarts.
    let owners = stream_of(&k8s);
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for (_, at) in owners.values() {
        *per.entry(at.clone()).or_default() += 1;
    }
    let busiest = per.iter().max_by_key(|(_, n)| **n).unwrap().0.clone();
    let victim = replicas
        .iter()
        .position(|r| r.cloud().stream == busiest)
        .unwrap();
    eprintln!("owners: {per:?}; killing {}", replicas[victim].id);
    counted(&k8s, &edges, tmp.path(), "count-a", || {
        std::thread::sleep(Duration::from_secs(2));
        replicas[victim].cloud.as_mut().unwrap().proc.kill9();
        live.remove(&busiest);
        wait_for(
            "the dead replica's shards taken over",
            Duration::from_secs(60),
            || {
                let h = holders(&k8s);
                !h.contains_key(&replicas[victim].id) && h.values().sum::<usize>() == 32
            },
        );
    });
    wait_for(
        "every node Ready under a live replica",
        Duration::from_secs(120),
        || all_ready_under(&k8s, &live),
    );
    web_unchanged(&k8s);

    // The killed replica comes back; then every replica restarts in turn
    // (SIGTERM), under the same load.
    replicas[victim].start(&kubeconfig);
    live = replicas.iter().map(|r| r.cloud().stream.clone()).collect();
    counted(&k8s, &edges, tmp.path(), "count-b", || {
        for i in 0..REPLICAS {
            replicas[i].cloud.as_mut().unwrap().proc.stop();
            replicas[i].start(&kubeconfig);
            live = replicas.iter().map(|r| r.cloud().stream.clone()).collect();
            wait_for(
                "every node Ready again after a restart",
                Duration::from_secs(120),
                || all_ready_under(&k8s, &live),
            );
        }
    });
    web_unchanged(&k8s);
    let h = holders(&k8s);
    assert_eq!(h.len(), REPLICAS, "{h:?}");
    // The in-process nodes counted through all of it: every count each
    // recorded reached the API server, and a watch of the Nodes never saw
    // one go back.
    STOP_COUNTING.store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for(
        "the in-process nodes to stop counting",
        Duration::from_secs(60),
        || STOPPED.load(std::sync::atomic::Ordering::SeqCst) == LIGHT,
    );
    let counts_of: Vec<u64> = light
        .iter()
        .map(|c| c.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    assert!(counts_of.iter().all(|c| *c >= 30), "{counts_of:?}");
    wait_for(
        "every in-process node's count on the API server",
        Duration::from_secs(120),
        || {
            let t = ticks(&k8s);
            let behind: Vec<String> = counts_of
                .iter()
                .enumerate()
                .filter(|(i, c)| t.get(&light_name(*i)) != Some(c))
                .map(|(i, c)| {
                    format!(
                        "{}: {c} here, {:?} there",
                        light_name(i),
                        t.get(&light_name(i))
                    )
                })
                .collect();
            if !behind.is_empty() {
                eprintln!("counts behind: {behind:?}");
            }
            behind.is_empty()
        },
    );
    std::thread::sleep(Duration::from_secs(1));
    let _ = nw.kill();
    let _ = nw.wait();
    let text = std::fs::read_to_string(&node_watch).unwrap();
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for v in serde_json::Deserializer::from_str(&text).into_iter::<Value>() {
        let Ok(n) = v else { break };
        if let Some(t) = n["status"]["capacity"]["keel.io/ticks"]
            .as_str()
            .and_then(|t| t.parse::<u64>().ok())
        {
            let name = n["metadata"]["name"].as_str().unwrap().to_owned();
            seen.entry(name).or_default().push(t);
        }
    }
    assert_eq!(seen.len(), LIGHT, "{:?}", seen.keys());
    for (node, counts) in &seen {
        assert!(
            counts.windows(2).all(|w| w[0] <= w[1]),
            "{node}: counts out of order on the API server: {counts:?}"
        );
        let i: usize = node.strip_prefix("light-").unwrap().parse().unwrap();
        assert_eq!(counts.last(), Some(&counts_of[i]), "{node}: {counts:?}");
    }
    // Each replica's /metrics: the shards it owns (all of them between
    // the three, as the Leases say), and the owner of each node it knows.
    wait_for(
        "the replicas' metrics agree with the Leases",
        Duration::from_secs(30),
        || {
            let h = holders(&k8s);
            replicas.iter().all(|r| {
                metrics_text(&r.metrics).contains(&format!(
                    "keel_replica_shards{{replica=\"{}\"}} {}",
                    r.id,
                    h.get(&r.id).copied().unwrap_or(0)
                ))
            })
        },
    );
    let owners: String = replicas.iter().map(|r| metrics_text(&r.metrics)).collect();
    for n in (0..NODES).map(node_name).chain((0..LIGHT).map(light_name)) {
        assert!(
            replicas.iter().any(|r| owners.contains(&format!(
                "keel_node_owner{{node=\"{n}\",replica=\"{}\"}} 1",
                r.id
            ))),
            "{n}: {owners}"
        );
    }
    // `keel nodes` names each node's owner, as the Leases say.
    // A shard being handed from one replica to another has no owner for
    // a moment (shown as none), so this waits for a settled view.
    for r in &replicas {
        let mut last = String::new();
        wait_for(
            "every node's owner in `keel nodes`",
            Duration::from_secs(30),
            || {
                let o = keel_cli(r.cloud(), &r.grpc, &["nodes", "-o", "json"]);
                assert!(o.status.success(), "{o:?}");
                let v: Value = serde_json::from_slice(&o.stdout).unwrap();
                let h = holders(&k8s);
                let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
                let off: Vec<&Value> = nodes
                    .iter()
                    .filter(|n| !h.contains_key(n["owner"].as_str().unwrap_or_default()))
                    .collect();
                if !off.is_empty() && format!("{off:?}") != last {
                    last = format!("{off:?}");
                    eprintln!("{}: owners not yet known: {last}", r.id);
                }
                !nodes.is_empty() && off.is_empty()
            },
        );
        let o = keel_cli(r.cloud(), &r.grpc, &["nodes"]);
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("OWNER"),
            "{o:?}"
        );
    }
    // A token is used once, whichever replica it is presented to.
    let again = rt.block_on(keel_edge::bootstrap::join(
        replicas[(1 + 2) % REPLICAS]
            .cloud()
            .bootstrap
            .parse()
            .unwrap(),
        &tokens[1],
        &light_name(1),
        &tmp.path().join("rejoin"),
    ));
    let err = format!("{:?}", again.expect_err("a used token joined again"));
    assert!(err.contains("already used"), "{err}");
    // A node revoked through a replica that does not own it loses its
    // connection on its owner and is refused by every replica.
    let node = light_name(0);
    let owner = replicas
        .iter()
        .find(|r| {
            owners.contains(&format!(
                "keel_node_owner{{node=\"{node}\",replica=\"{}\"}} 1",
                r.id
            ))
        })
        .unwrap()
        .id
        .clone();
    let by = replicas.iter().find(|r| r.id != owner).unwrap();
    eprintln!("revoking {node} (owned by {owner}) through {}", by.id);
    let o = keel_cli(by.cloud(), &by.grpc, &["node", "revoke", &node]);
    assert!(o.status.success(), "{o:?}");
    let connected_anywhere = || {
        replicas.iter().any(|r| {
            let o = keel_cli(r.cloud(), &r.grpc, &["nodes", "-o", "json"]);
            let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
            v["nodes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|n| n["node"] == node.as_str() && n["connected"] == true)
        })
    };
    wait_for(
        "the revoked node disconnected everywhere",
        Duration::from_secs(30),
        || !connected_anywhere(),
    );
    // It keeps trying every replica (its idle timeout is 6 s); none takes it.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_secs(1));
        assert!(!connected_anywhere(), "a revoked node connected again");
    }
    drop(edges);
    rt.shutdown_background();
}

/// A join token for `node`, made by `replica` through its admin API.
fn token_from(replica: &Replica, node: &str) -> String {
    let o = keel_cli(replica.cloud(), &replica.grpc, &["token", "create", node]);
    assert!(o.status.success(), "{o:?}");
    String::from_utf8(o.stdout).unwrap().trim().to_owned()
}
