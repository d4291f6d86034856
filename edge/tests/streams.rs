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

#[test]
fn kubectl_logs_and_exec_through_cloudcore() {
    let tmp = tempfile::tempdir().unwrap();
    eprintln!("state and logs in {}", tmp.path().display());
    let cloud = Cloud::start(&tmp.path().join("cloud"), None, None, None);
    let mut edge = Edge::start(
        &tmp.path().join("edge-a"),
        "edge-a",
        &cloud,
        Some(cloud.token("edge-a")),
        None,
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
    // A client that goes away takes its command with it.
    let running = || {
        Command::new("pgrep")
            .args(["-f", "sleep 4242"])
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
            if r.kind == keel_log::PayloadKind::Event && r.key == "pods/default/counter" {
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
}
