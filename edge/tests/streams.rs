//! `kubectl logs` and `exec` against cloudcore, carried by the node's own QUIC
//! connection (a session stream beside replication): real kubectl, a real
//! cloudcore and edgecore as processes. kubectl talks to cloudcore only;
//! the edge's API is never used here.
//!
//! cloudcore is the binary built next to edgecore (`cargo test --workspace`
//! builds both; with `-p keel-edge` alone build it first).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cluster::*;
use serde_json::Value;

fn pod_yaml(name: &str, node: &str, script: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: busybox\n    command: [\"/bin/sh\", \"-c\", {script:?}]\n"
    )
}

fn cloud_pod(cloud: &Cloud, name: &str) -> Value {
    serde_json::from_str(&ok(cloud.k(&["get", "pod", name, "-o", "json"]), "get pod")).unwrap()
}

/// `kubectl logs -f` against the cloud, its lines collected on a thread.
struct Follow {
    child: std::process::Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Follow {
    fn start(cloud: &Cloud, cache: &std::path::Path, pod: &str) -> Follow {
        let mut child = Command::new(support::kubectl_bin())
            .arg("--kubeconfig")
            .arg(cloud.kubeconfig())
            .arg("--cache-dir")
            .arg(cache)
            .args(["logs", "-f", pod])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        Follow { child, lines }
    }

    fn numbers(&self) -> Vec<u64> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|l| l.strip_prefix("line ")?.parse().ok())
            .collect()
    }
}

impl Drop for Follow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A file holding `over spdy\n` (kubectl's stdin).
fn local_input(tmp: &tempfile::TempDir) -> std::path::PathBuf {
    let p = tmp.path().join("spdy-input.txt");
    std::fs::write(&p, "over spdy\n").unwrap();
    p
}

/// `kubectl port-forward pod/NAME :PORT` against the cloud.
struct PortForward {
    child: std::process::Child,
    local: u16,
    err: Arc<Mutex<String>>,
}

impl PortForward {
    fn start(cloud: &Cloud, cache: &std::path::Path, pod: &str, port: u16) -> PortForward {
        Self::start_with(cloud, cache, pod, port, &[])
    }

    fn start_with(
        cloud: &Cloud,
        cache: &std::path::Path,
        pod: &str,
        port: u16,
        env: &[(&str, &str)],
    ) -> PortForward {
        let mut child = Command::new(support::kubectl_bin())
            .envs(env.iter().copied())
            .arg("--kubeconfig")
            .arg(cloud.kubeconfig())
            .arg("--cache-dir")
            .arg(cache)
            .args(["port-forward", &format!("pod/{pod}"), &format!(":{port}")])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = Arc::new(Mutex::new(String::new()));
        let sink = err.clone();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut e = sink.lock().unwrap();
                e.push_str(&l);
                e.push('\n');
            }
        });
        // "Forwarding from 127.0.0.1:LOCAL -> PORT"
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let local = first
            .strip_prefix("Forwarding from 127.0.0.1:")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "kubectl port-forward said {first:?}: {}",
                    err.lock().unwrap()
                )
            });
        std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
        PortForward { child, local, err }
    }

    /// What kubectl wrote on stderr so far (after a moment for it to).
    fn stderr(&mut self) -> String {
        std::thread::sleep(Duration::from_millis(500));
        self.err.lock().unwrap().clone()
    }
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kubectl_logs_and_exec_through_cloudcore() {
    let tmp = tempfile::tempdir().unwrap();
    eprintln!("state and logs in {}", tmp.path().display());
    let cloud = Cloud::start(&tmp.path().join("cloud"), None, None, None);
    // The edge on another loopback address than the cloud (kubectl only
    // ever has the cloud's).
    let mut edge = Edge::start(
        &tmp.path().join("edge-a"),
        "edge-a",
        &cloud,
        Some(cloud.token("edge-a")),
        Some(format!("127.0.0.2:{}", free_port())),
    );
    wait_for("edge-a Ready", Duration::from_secs(60), || {
        String::from_utf8_lossy(&cloud.k(&["get", "nodes"]).stdout)
            .lines()
            .any(|l| l.starts_with("edge-a") && l.contains(" Ready"))
    });
    let apply = |yaml: &str| {
        ok(
            kubectl(
                &cloud.kubeconfig(),
                &tmp.path().join("kc"),
                &["apply", "-f", "-"],
                Some(yaml),
            ),
            "kubectl apply",
        )
    };
    apply(&pod_yaml(
        "counter",
        "edge-a",
        "i=0; while true; do i=$((i+1)); echo \"line $i\"; sleep 0.1; done",
    ));
    wait_for(
        "log lines through cloudcore",
        Duration::from_secs(60),
        || String::from_utf8_lossy(&cloud.k(&["logs", "counter"]).stdout).contains("line 5"),
    );
    let tail = ok(cloud.k(&["logs", "counter", "--tail=2"]), "logs --tail");
    assert_eq!(tail.lines().count(), 2, "{tail}");
    let limited = ok(
        cloud.k(&["logs", "counter", "--limit-bytes=7"]),
        "logs --limit-bytes",
    );
    assert_eq!(limited, "line 1\n");
    // --timestamps: each line carries the time the node read it.
    let stamped = ok(
        cloud.k(&["logs", "counter", "--tail=3", "--timestamps"]),
        "logs --timestamps",
    );
    for l in stamped.lines() {
        let (stamp, text) = l.split_once(' ').unwrap();
        assert!(
            stamp.len() >= 20 && stamp.ends_with('Z') && stamp.contains('T'),
            "{l}"
        );
        assert!(text.starts_with("line "), "{l}");
    }
    // --since: only the lines of the last seconds (10 a second).
    std::thread::sleep(Duration::from_secs(3));
    let all = ok(cloud.k(&["logs", "counter"]), "logs").lines().count();
    let recent = ok(cloud.k(&["logs", "counter", "--since=1s"]), "logs --since");
    let n = recent.lines().count();
    assert!(n > 0 && n < all && n <= 30, "{n} of {all}: {recent}");
    let o = cloud.k(&["logs", "counter", "--since-time=yesterday"]);
    assert!(!o.status.success(), "{o:?}");

    // Follow: lines keep arriving while the pod writes.
    let cache = tmp.path().join("kc");
    let follow = Follow::start(&cloud, &cache, "counter");
    wait_for("lines on logs -f", Duration::from_secs(30), || {
        follow.numbers().len() > 5
    });
    let seen = follow.numbers().last().copied().unwrap();
    wait_for("newer lines on logs -f", Duration::from_secs(30), || {
        follow.numbers().last().is_some_and(|n| *n >= seen + 10)
    });
    let numbers = follow.numbers();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "lines lost or reordered: {numbers:?}"
    );
    drop(follow);

    // Clear errors: an unknown container, an unknown pod.
    let o = cloud.k(&["logs", "counter", "-c", "nope"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("container nope is not valid"), "{err}");
    let o = cloud.k(&["logs", "nobody"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"));

    // --previous: the container is killed and restarted by edgecore.
    let pod = cloud_pod(&cloud, "counter");
    let pid: u32 = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|c| c.strip_prefix("process://"))
        .and_then(|p| p.parse().ok())
        .unwrap();
    ok(
        Command::new("kill")
            .args(["-9", &pid.to_string()])
            .output()
            .unwrap(),
        "kill the container",
    );
    wait_for("the container restarted", Duration::from_secs(60), || {
        cloud_pod(&cloud, "counter")["status"]["containerStatuses"][0]["restartCount"] == 1
    });
    let previous = ok(
        cloud.k(&["logs", "counter", "--previous"]),
        "logs --previous",
    );
    assert!(previous.starts_with("line 1\n"), "{previous}");

    // 50 followers at once on one node while it replicates: every line
    // reaches each of them, and a new pod's status still comes back.
    let followers: Vec<Follow> = (0..50)
        .map(|_| Follow::start(&cloud, &cache, "counter"))
        .collect();
    apply(&pod_yaml("during", "edge-a", "exec sleep 3600"));
    wait_for(
        "a new pod Running while 50 follow",
        Duration::from_secs(60),
        || cloud_pod(&cloud, "during")["status"]["phase"] == "Running",
    );
    let start = Instant::now();
    wait_for(
        "every follower past the same line",
        Duration::from_secs(120),
        || {
            followers
                .iter()
                .all(|f| f.numbers().last().is_some_and(|n| *n >= 40))
        },
    );
    eprintln!("50 followers caught up in {:?}", start.elapsed());
    for f in &followers {
        let n = f.numbers();
        assert_eq!(n.first(), Some(&1), "a follower missed the start");
        assert!(
            n.windows(2).all(|w| w[1] == w[0] + 1),
            "a follower lost or reordered lines: {n:?}"
        );
    }
    drop(followers);

    // kubectl exec: output and exit code, the container's environment.
    let o = cloud.k(&[
        "exec",
        "counter",
        "--",
        "sh",
        "-c",
        "echo $HOSTNAME; echo oops >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "counter\n");
    assert!(String::from_utf8_lossy(&o.stderr).contains("oops"), "{o:?}");
    let o = cloud.k(&["exec", "counter", "--", "true"]);
    assert!(o.status.success(), "{o:?}");
    // stdin piped.
    let o = kubectl(
        &cloud.kubeconfig(),
        &cache,
        &["exec", "-i", "counter", "--", "sh", "-c", "tr a-z A-Z"],
        Some("hello through the tunnel\n"),
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "HELLO THROUGH THE TUNNEL\n"
    );
    // exec -t: the command on a terminal of its own, sized as kubectl's
    // (which needs a terminal itself: `script` gives it one).
    let o = cloud.k_on_terminal("exec -it counter -- sh -c 'sleep 1; tty; stty size'");
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{o:?}");
    assert!(shown.contains("/dev/pts/"), "{shown}");
    assert!(shown.contains("45 123"), "{shown}");
    // kubectl's fallback when WebSocket is off: SPDY (remotecommand v4).
    let o = Command::new(support::kubectl_bin())
        .env("KUBECTL_REMOTE_COMMAND_WEBSOCKETS", "false")
        .arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .arg("--cache-dir")
        .arg(&cache)
        .args(["exec", "-i", "counter", "--", "sh", "-c", "cat; exit 4"])
        .stdin(std::fs::File::open(local_input(&tmp)).unwrap())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "over spdy\n");
    // A missing binary: its message and a non-zero exit.
    let o = cloud.k(&["exec", "counter", "--", "no-such-binary"]);
    assert!(!o.status.success(), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no-such-binary"), "{err}");
    // kubectl cp, both ways (exec of tar underneath).
    let local = tmp.path().join("to-pod.txt");
    std::fs::write(&local, "copied through the tunnel\n").unwrap();
    let in_pod = tmp.path().join("in-pod");
    std::fs::create_dir_all(&in_pod).unwrap();
    // The pod runs as `nobody`: a host directory it may write.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&in_pod, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let target = in_pod.join("copy.txt");
    ok(
        cloud.k(&[
            "cp",
            local.to_str().unwrap(),
            &format!("counter:{}", target.display()),
        ]),
        "kubectl cp to the pod",
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "copied through the tunnel\n"
    );
    let back = tmp.path().join("from-pod.txt");
    ok(
        cloud.k(&[
            "cp",
            &format!("counter:{}", target.display()),
            back.to_str().unwrap(),
        ]),
        "kubectl cp from the pod",
    );
    assert_eq!(
        std::fs::read_to_string(&back).unwrap(),
        "copied through the tunnel\n"
    );
    // kubectl attach: the container's output from now on, and with -i its
    // stdin (a container with `stdin: true`).
    let attached = |args: &[&str], input: Option<&str>| {
        let mut child = Command::new(support::kubectl_bin())
            .arg("--kubeconfig")
            .arg(cloud.kubeconfig())
            .arg("--cache-dir")
            .arg(&cache)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        if let Some(input) = input {
            use std::io::Write as _;
            stdin.write_all(input.as_bytes()).unwrap();
        }
        let lines = Arc::new(Mutex::new(Vec::<String>::new()));
        let sink = lines.clone();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(l);
            }
        });
        (child, stdin, lines)
    };
    let (mut child, _stdin, lines) = attached(&["attach", "counter"], None);
    wait_for("lines on kubectl attach", Duration::from_secs(30), || {
        lines.lock().unwrap().len() >= 3
    });
    let got = lines.lock().unwrap().clone();
    let first: u64 = got[0].strip_prefix("line ").unwrap().parse().unwrap();
    assert!(first > 40, "attach shows output from now on: {got:?}");
    child.kill().unwrap();
    child.wait().unwrap();
    apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: echo\nspec:\n  nodeName: edge-a\n  containers:\n  - name: main\n    image: busybox\n    stdin: true\n    command: [\"/bin/sh\", \"-c\", \"while read l; do echo got $l; done\"]\n",
    );
    wait_for("the echo pod Running", Duration::from_secs(60), || {
        cloud_pod(&cloud, "echo")["status"]["phase"] == "Running"
    });
    let (mut child, stdin, lines) = attached(&["attach", "-i", "echo"], Some("one\ntwo\n"));
    wait_for(
        "stdin through kubectl attach -i",
        Duration::from_secs(30),
        || {
            let l = lines.lock().unwrap();
            l.iter().any(|l| l == "got one") && l.iter().any(|l| l == "got two")
        },
    );
    drop(stdin);
    child.kill().unwrap();
    child.wait().unwrap();
    // kubectl port-forward: HTTP through the tunnel to a server in a pod
    // (the process runtime's pods share the node's network).
    let www = tmp.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "hello from the pod\n").unwrap();
    let port = free_port();
    apply(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\nspec:\n  nodeName: edge-a\n  containers:\n  - name: main\n    image: python\n    command: [\"python3\", \"-m\", \"http.server\", \"{port}\", \"--bind\", \"127.0.0.1\", \"--directory\", {:?}]\n    readinessProbe:\n      tcpSocket:\n        port: {port}\n      periodSeconds: 1\n",
        www.display().to_string()
    ));
    // Ready: its server listens (kubectl ends a port-forward session on
    // the first refused connection).
    wait_for("the web pod Ready", Duration::from_secs(60), || {
        cloud_pod(&cloud, "web")["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    let forward = PortForward::start(&cloud, &cache, "web", port);
    let get = |local: u16| -> std::io::Result<String> {
        use std::io::{Read as _, Write as _};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", local))?;
        c.set_read_timeout(Some(Duration::from_secs(20)))?;
        c.write_all(b"GET /hello.txt HTTP/1.0\r\nHost: pod\r\n\r\n")?;
        let mut answer = String::new();
        c.read_to_string(&mut answer)?;
        Ok(answer)
    };
    let answer;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match get(forward.local) {
            Ok(a) if a.contains("hello from the pod") => {
                answer = a;
                break;
            }
            r => assert!(
                Instant::now() < deadline,
                "no HTTP answer through port-forward: {r:?}; kubectl said {}",
                forward.err.lock().unwrap()
            ),
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    // Several connections, one after the other and at once.
    let many: Vec<_> = (0..4)
        .map(|_| {
            let local = forward.local;
            std::thread::spawn(move || get(local))
        })
        .collect();
    for t in many {
        let a = t.join().unwrap().unwrap();
        assert!(a.contains("hello from the pod"), "{a}");
    }
    drop(forward);
    // kubectl's fallback when WebSocket is off: SPDY on the connection.
    let forward = PortForward::start_with(
        &cloud,
        &cache,
        "web",
        port,
        &[("KUBECTL_PORT_FORWARD_WEBSOCKETS", "false")],
    );
    let a = get(forward.local).unwrap();
    assert!(a.contains("hello from the pod"), "{a}");
    drop(forward);
    // A port nothing listens on: kubectl reports the pod's answer.
    let closed = free_port();
    let mut forward = PortForward::start(&cloud, &cache, "web", closed);
    let a = get(forward.local).unwrap_or_default();
    assert!(!a.contains("HTTP"), "{a}");
    let err = forward.stderr();
    assert!(
        err.contains(&format!("localhost:{closed}")) || err.contains("connection refused"),
        "{err}"
    );
    drop(forward);
    // A client that goes away takes its command with it, though the
    // command says nothing (nothing is written that could fail). The
    // pattern is anchored (the command as the runtime resolved it):
    // kubectl's own command line holds the words too.
    let running = || {
        Command::new("pgrep")
            .args(["-f", "^(/[^ ]*/)?sleep 4242$"])
            .output()
            .unwrap()
            .status
            .success()
    };
    let mut client = Command::new(support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .arg("--cache-dir")
        .arg(&cache)
        .args(["exec", "counter", "--", "sleep", "4242"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(
        "the exec'd command running",
        Duration::from_secs(30),
        running,
    );
    client.kill().unwrap();
    client.wait().unwrap();
    wait_for(
        "the exec'd command gone with its client",
        Duration::from_secs(30),
        || !running(),
    );

    // Nothing restarts the edge below (a restarted edgecore would kill
    // what it left): the pods that would outlive it are deleted first.
    let pids: Vec<u32> = ["web", "echo", "during"]
        .iter()
        .filter_map(|p| {
            cloud_pod(&cloud, p)["status"]["containerStatuses"][0]["containerID"]
                .as_str()?
                .strip_prefix("process://")?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(pids.len(), 3);
    ok(
        cloud.k(&["delete", "pod", "web", "echo", "during", "--wait=false"]),
        "delete the pods",
    );
    wait_for("their processes gone", Duration::from_secs(60), || {
        pids.iter()
            .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
    });

    // The node goes away (SIGKILL): logs fail fast with a clear message.
    edge.proc.kill9();
    let start = Instant::now();
    let o = cloud.k(&["logs", "counter"]);
    let took = start.elapsed();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!("logs with the node gone: {took:?}: {err}");
    assert!(
        err.contains("edge-a") && (err.contains("not connected") || err.contains("did not answer")),
        "{err}"
    );
    let o = cloud.k(&["exec", "counter", "--", "true"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("edge-a") && (err.contains("not connected") || err.contains("did not answer")),
        "{err}"
    );
    let start = Instant::now();
    let o = cloud.k(&["port-forward", "pod/counter", &format!(":{port}")]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    eprintln!(
        "port-forward with the node gone: {:?}: {err}",
        start.elapsed()
    );
    assert!(
        err.contains("edge-a") && (err.contains("not connected") || err.contains("did not answer")),
        "{err}"
    );
    let o = cloud.k(&["attach", "counter"]);
    assert!(!o.status.success());
    // Each exec session is in the cluster's log (who, pod, command, and
    // its exit code at the end), for `keel audit`.
    let mut cloud = cloud;
    cloud.proc.stop();
    let store = keel_log::Store::open(
        tmp.path().join("cloud").join("log"),
        keel_log::StoreOptions::default(),
    )
    .unwrap();
    let mut sessions = Vec::new();
    let mut after = 0;
    loop {
        let keel_log::Read::Records(seg) = store
            .read("cluster", after, keel_log::ReadLimits::default())
            .unwrap()
        else {
            panic!("no compaction here");
        };
        let Some(last) = seg.records.last() else {
            break;
        };
        after = last.seq;
        for r in seg.records {
            if r.kind == keel_log::PayloadKind::Event
                && (r.key == "pods/default/counter" || r.key == "pods/default/web")
            {
                assert_eq!(r.origin, "user:keel-admin");
                sessions.push(serde_json::from_slice::<Value>(&r.payload).unwrap());
            }
        }
    }
    let ended: Vec<&Value> = sessions
        .iter()
        .filter(|s| s["exec"]["phase"] == "ended")
        .collect();
    assert!(
        ended
            .iter()
            .any(|s| s["exec"]["exitCode"] == 3 && s["exec"]["command"][0] == "sh"),
        "{sessions:?}"
    );
    assert!(
        sessions
            .iter()
            .filter(|s| s["exec"]["phase"] == "started")
            .count()
            >= 4,
        "{sessions:?}"
    );
    let attaches = sessions
        .iter()
        .filter(|s| s["attach"]["phase"] == "started");
    assert!(attaches.count() >= 1, "{sessions:?}");
    assert!(
        sessions
            .iter()
            .any(|s| s["portforward"]["phase"] == "ended" && s["portforward"]["port"] == port),
        "{sessions:?}"
    );
}
