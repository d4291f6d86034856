#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::plan::expand;
use super::runtime::proc_start_time;
use super::worker::{go_duration, rfc3339};
use super::*;

#[derive(Default)]
struct Sink {
    updates: Mutex<Vec<(String, Value)>>,
}

impl StatusSink for Sink {
    fn pod_status(&self, key: &str, status: Value) {
        self.updates.lock().unwrap().push((key.to_owned(), status));
    }
}

impl Sink {
    fn history(&self, key: &str) -> Vec<Value> {
        self.updates
            .lock()
            .unwrap()
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, s)| s.clone())
            .collect()
    }

    fn latest(&self, key: &str) -> Option<Value> {
        self.history(key).pop()
    }
}

const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds (panics after [`WAIT`]).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn alive(pid: i32) -> bool {
    proc_start_time(pid).is_some()
}

fn pid_of(status: &Value, list: &str, index: usize) -> i32 {
    status[list][index]["containerID"]
        .as_str()
        .and_then(|id| id.strip_prefix("process://"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {status}"))
}

fn pod(name: &str, uid: &str, spec: Value) -> (String, Value) {
    (
        format!("pods/default/{name}"),
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "uid": uid},
            "spec": spec,
        }),
    )
}

fn no_lookup(_: &str) -> Option<Value> {
    None
}

struct Fixture {
    dir: tempfile::TempDir,
    sink: Arc<Sink>,
    edged: Option<Edged>,
}

impl Fixture {
    fn new() -> Fixture {
        Self::with_runtime(Arc::new(ProcessRuntime))
    }

    fn with_runtime(runtime: Arc<dyn Runtime>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // Pods run as an unprivileged user: they pass through to their
        // directories, as through a data directory's parents, and the
        // tests' pods leave their output here (sticky, as /tmp).
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        }
        let sink = Arc::new(Sink::default());
        let edged = Edged::new(Self::config(dir.path()), runtime, sink.clone()).unwrap();
        Fixture {
            dir,
            sink,
            edged: Some(edged),
        }
    }

    fn config(dir: &std::path::Path) -> EdgedConfig {
        let mut cfg = EdgedConfig::new(dir.join("edged"), "node-1", "127.0.0.1");
        cfg.backoff_base = Duration::from_millis(100);
        cfg.backoff_max = Duration::from_millis(400);
        // Small, so that rotation is tested: 4 KiB, the current file and
        // one older.
        cfg.container_log_max_size = 4096;
        cfg.container_log_max_files = 2;
        cfg
    }

    fn edged(&self) -> &Edged {
        self.edged.as_ref().unwrap()
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("edged")
    }

    fn pod_dir(&self, name: &str, uid: &str) -> PathBuf {
        self.root()
            .join("pods")
            .join(format!("default_{name}_{uid}"))
    }

    async fn wait_status(&self, key: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.sink.latest(key)
                && pred(&status)
            {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status: {:#}",
                self.sink.latest(key).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Whatever a failed test left running dies here.
        drop(self.edged.take());
        if let Ok(entries) = std::fs::read_dir(self.root().join("run")) {
            for entry in entries.flatten() {
                let _ = ProcessRuntime.kill_leftover(&entry.path());
            }
        }
    }
}

#[tokio::test]
async fn pod_runs_and_reports_running() {
    let fx = Fixture::new();
    let (key, p) = pod(
        "web",
        "u1",
        json!({"containers": [{"name": "main", "image": "sleep", "args": ["30"]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "Running and ready", |s| {
            s["phase"] == "Running" && s["containerStatuses"][0]["ready"] == true
        })
        .await;
    let pid = pid_of(&status, "containerStatuses", 0);
    assert!(alive(pid));
    let c = &status["containerStatuses"][0];
    assert_eq!(c["name"], "main");
    assert_eq!(c["image"], "sleep");
    assert_eq!(c["restartCount"], 0);
    assert_eq!(c["started"], true);
    assert!(
        c["state"]["running"]["startedAt"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );
    assert_eq!(status["hostIP"], "127.0.0.1");
    assert_eq!(status["podIP"], "127.0.0.1");
    assert_eq!(status["podIPs"], json!([{"ip": "127.0.0.1"}]));
    assert_eq!(status["qosClass"], "BestEffort");
    assert!(status["startTime"].is_string());
    let conditions = status["conditions"].as_array().unwrap();
    for kind in ["Initialized", "Ready", "ContainersReady", "PodScheduled"] {
        let c = conditions.iter().find(|c| c["type"] == kind).unwrap();
        assert_eq!(c["status"], "True", "{kind}");
    }
    // The same desired state again changes nothing.
    let reports = fx.sink.history(&key).len();
    let (_, p) = pod(
        "web",
        "u1",
        json!({"containers": [{"name": "main", "image": "sleep", "args": ["30"]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    tokio::task::yield_now().await;
    assert_eq!(fx.sink.history(&key).len(), reports);

    fx.edged().shutdown().await;
    assert!(!alive(pid));
}

#[tokio::test]
async fn failing_container_restarts_with_back_off() {
    let fx = Fixture::new();
    let (key, p) = pod(
        "crash",
        "u2",
        json!({"containers": [{"name": "c", "image": "sh", "command": ["/bin/sh", "-c", "exit 1"]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "3 restarts", |s| {
            s["containerStatuses"][0]["restartCount"].as_u64() >= Some(3)
        })
        .await;
    assert_eq!(status["phase"], "Running");
    let history = fx.sink.history(&key);
    let backoff = history
        .iter()
        .map(|s| &s["containerStatuses"][0])
        .find(|c| c["state"]["waiting"]["reason"] == "CrashLoopBackOff")
        .expect("a CrashLoopBackOff state");
    let message = backoff["state"]["waiting"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("back-off 100ms restarting failed container=c pod=crash_default(u2)"),
        "{message}"
    );
    assert_eq!(backoff["lastState"]["terminated"]["exitCode"], 1);
    assert_eq!(backoff["lastState"]["terminated"]["reason"], "Error");
    assert_eq!(backoff["ready"], false);
    // The back-off doubles.
    assert!(history.iter().any(|s| {
        s["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("back-off 200ms"))
    }));
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn restart_never_fails_and_on_failure_succeeds() {
    let fx = Fixture::new();
    let (never, p1) = pod(
        "never",
        "u3",
        json!({"restartPolicy": "Never",
               "containers": [{"name": "c", "image": "sh", "command": ["/bin/sh", "-c", "exit 3"]}]}),
    );
    let (ok, p2) = pod(
        "ok",
        "u4",
        json!({"restartPolicy": "OnFailure",
               "containers": [{"name": "c", "image": "sh", "command": ["/bin/sh", "-c", "exit 0"]}]}),
    );
    fx.edged()
        .sync(vec![(never.clone(), p1), (ok.clone(), p2)], &no_lookup);
    let status = fx
        .wait_status(&never, "Failed", |s| s["phase"] == "Failed")
        .await;
    let c = &status["containerStatuses"][0];
    assert_eq!(c["state"]["terminated"]["exitCode"], 3);
    assert_eq!(c["state"]["terminated"]["reason"], "Error");
    assert_eq!(c["restartCount"], 0);
    let status = fx
        .wait_status(&ok, "Succeeded", |s| s["phase"] == "Succeeded")
        .await;
    let c = &status["containerStatuses"][0];
    assert_eq!(c["state"]["terminated"]["exitCode"], 0);
    assert_eq!(c["state"]["terminated"]["reason"], "Completed");
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Ready")
        .unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "PodCompleted");
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn env_and_configmap_volume_reach_the_process() {
    let fx = Fixture::new();
    let out = fx.dir.path().join("out.txt");
    let secret = base64::engine::general_purpose::STANDARD.encode("s3cret");
    let objects = Arc::new(Mutex::new(json!({
        "configmaps/default/cfg": {"data": {"greeting": "hello", "file.txt": "from-volume"}},
        "secrets/default/sec": {"data": {"token": secret}},
    })));
    let lookup_objects = objects.clone();
    let lookup = move |key: &str| {
        let objects = lookup_objects.lock().unwrap();
        objects.get(key).cloned()
    };
    let spec = json!({
        "volumes": [{"name": "conf", "configMap": {"name": "cfg", "items": [{"key": "file.txt", "path": "file.txt"}]}},
                    {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 420}}],
        "containers": [{
            "name": "c",
            "image": "sh",
            "command": ["/bin/sh", "-c"],
            "args": ["echo \"$A $B $G $T $CM_greeting $HOSTNAME $(A)\" > $OUT.tmp && cat conf/file.txt >> $OUT.tmp && mv $OUT.tmp $OUT && exec sleep 30"],
            "env": [
                {"name": "A", "value": "lit"},
                {"name": "B", "value": "$(A)-x"},
                {"name": "G", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
                {"name": "T", "valueFrom": {"secretKeyRef": {"name": "sec", "key": "token"}}},
                {"name": "M", "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "x", "optional": true}}},
                {"name": "OUT", "value": out.to_str().unwrap()},
            ],
            "envFrom": [{"prefix": "CM_", "configMapRef": {"name": "cfg"}}],
            "volumeMounts": [{"name": "conf", "mountPath": "conf"}],
        }],
    });
    let (key, p) = pod("env", "u5", spec);
    fx.edged().sync(vec![(key.clone(), p.clone())], &lookup);
    wait_until("the process output", || out.exists()).await;
    let seen = std::fs::read_to_string(&out).unwrap();
    assert_eq!(seen, "lit lit-x hello s3cret hello env lit\nfrom-volume");

    // The volume is refreshed when the configmap changes, without a restart.
    objects.lock().unwrap()["configmaps/default/cfg"]["data"]["file.txt"] = json!("changed");
    fx.edged().sync(vec![(key.clone(), p)], &lookup);
    let file = fx.pod_dir("env", "u5").join("volumes/conf/file.txt");
    wait_until("the refreshed volume", || {
        std::fs::read_to_string(&file).is_ok_and(|s| s == "changed")
    })
    .await;
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o644
    );
    // A secret's file is its owner's only, whatever mode the spec asks.
    let token = fx.pod_dir("env", "u5").join("volumes/sec/token");
    assert_eq!(std::fs::read_to_string(&token).unwrap(), "s3cret");
    assert_eq!(
        std::fs::metadata(&token).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let status = fx.sink.latest(&key).unwrap();
    assert_eq!(status["containerStatuses"][0]["restartCount"], 0);
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn missing_configmap_waits_then_starts() {
    let fx = Fixture::new();
    let spec = json!({"containers": [{
        "name": "c", "image": "sleep", "args": ["30"],
        "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "x"}}}],
    }]});
    let (key, p) = pod("late", "u6", spec);
    fx.edged().sync(vec![(key.clone(), p.clone())], &no_lookup);
    let status = fx
        .wait_status(&key, "CreateContainerConfigError", |s| {
            s["containerStatuses"][0]["state"]["waiting"]["reason"] == "CreateContainerConfigError"
        })
        .await;
    assert_eq!(status["phase"], "Pending");
    let lookup =
        |key: &str| (key == "configmaps/default/late").then(|| json!({"data": {"x": "1"}}));
    fx.edged().sync(vec![(key.clone(), p)], &lookup);
    fx.wait_status(&key, "Running", |s| s["phase"] == "Running")
        .await;
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn unstartable_container_reports_run_container_error() {
    let fx = Fixture::new();
    let (key, p) = pod(
        "bad",
        "u7",
        json!({"containers": [{"name": "c", "image": "x", "command": ["/nonexistent/program"]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "RunContainerError", |s| {
            s["containerStatuses"][0]["state"]["waiting"]["reason"] == "RunContainerError"
        })
        .await;
    assert_eq!(status["phase"], "Pending");
    let message = status["containerStatuses"][0]["state"]["waiting"]["message"]
        .as_str()
        .unwrap();
    assert!(message.contains("/nonexistent/program"), "{message}");
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn failing_liveness_probe_restarts_the_container() {
    let fx = Fixture::new();
    let spec = json!({"containers": [{
        "name": "c", "image": "sleep", "args": ["30"],
        "livenessProbe": {"exec": {"command": ["/bin/sh", "-c", "exit 1"]},
                          "periodSeconds": 1, "failureThreshold": 1},
    }]});
    let (key, p) = pod("live", "u8", spec);
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "a restart", |s| {
            s["containerStatuses"][0]["restartCount"].as_u64() >= Some(1)
        })
        .await;
    let last = &status["containerStatuses"][0]["lastState"]["terminated"];
    assert_eq!(last["signal"], 15, "{status:#}");
    assert_eq!(last["exitCode"], 143);
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn http_readiness_probe_makes_the_container_ready() {
    let fx = Fixture::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    let server = tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 1024];
            let n = stream.read(&mut buf).await.unwrap_or(0);
            let request = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.lock()
                .unwrap()
                .push(request.lines().next().unwrap_or_default().to_owned());
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await;
        }
    });
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let spec = json!({"containers": [
        {"name": "web", "image": "sleep", "args": ["30"],
         "ports": [{"name": "http", "containerPort": port}],
         "readinessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1}},
        {"name": "other", "image": "sleep", "args": ["30"],
         "readinessProbe": {"tcpSocket": {"port": closed_port}, "periodSeconds": 1}},
    ]});
    let (key, p) = pod("ready", "u9", spec);
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "web ready", |s| {
            s["containerStatuses"][0]["ready"] == true
        })
        .await;
    assert_eq!(status["phase"], "Running");
    assert_eq!(status["containerStatuses"][1]["ready"], false);
    let ready = status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "ContainersReady")
        .unwrap();
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["message"], "containers with unready status: [other]");
    assert!(
        requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r == "GET /healthz HTTP/1.1")
    );
    fx.edged().shutdown().await;
    server.abort();
}

#[tokio::test]
async fn removed_pod_is_killed_and_its_files_removed() {
    let fx = Fixture::new();
    let (key, p) = pod(
        "gone",
        "u10",
        json!({"terminationGracePeriodSeconds": 1,
               "volumes": [{"name": "scratch", "emptyDir": {}}],
               "containers": [{"name": "c", "image": "sleep", "args": ["30"],
                               "volumeMounts": [{"name": "scratch", "mountPath": "scratch"}]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "Running", |s| s["phase"] == "Running")
        .await;
    let pid = pid_of(&status, "containerStatuses", 0);
    let dir = fx.pod_dir("gone", "u10");
    assert!(dir.join("scratch").is_dir());
    assert!(fx.edged().log_path("default", "gone", "c", false).is_some());
    fx.edged().sync(vec![], &no_lookup);
    wait_until("the process to die", || !alive(pid)).await;
    wait_until("the pod directory to go", || !dir.exists()).await;
    assert_eq!(fx.edged().log_path("default", "gone", "c", false), None);
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn new_edged_kills_leftovers_of_a_crashed_one() {
    let mut fx = Fixture::new();
    let (key, p) = pod(
        "left",
        "u11",
        json!({"containers": [{"name": "c", "image": "sleep", "args": ["30"]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p.clone())], &no_lookup);
    let status = fx
        .wait_status(&key, "Running", |s| s["phase"] == "Running")
        .await;
    let pid = pid_of(&status, "containerStatuses", 0);
    // "Crash": the workers stop, the process keeps running.
    drop(fx.edged.take());
    tokio::task::yield_now().await;
    assert!(alive(pid));
    let edged = Edged::new(
        Fixture::config(fx.dir.path()),
        Arc::new(ProcessRuntime),
        fx.sink.clone(),
    )
    .unwrap();
    fx.edged = Some(edged);
    wait_until("the leftover to die", || !alive(pid)).await;
    // The pod runs again, once.
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "Running again", |s| {
            s["phase"] == "Running" && pid_of(s, "containerStatuses", 0) != pid
        })
        .await;
    let new_pid = pid_of(&status, "containerStatuses", 0);
    // Logs of the run before the crash stay the "previous" ones.
    let log = |previous| {
        fx.edged()
            .log_path("default", "left", "c", previous)
            .unwrap()
    };
    assert!(log(false).ends_with("c/1.log"), "{}", log(false).display());
    assert!(log(true).ends_with("c/0.log"));
    assert!(alive(new_pid));
    fx.edged().shutdown().await;
    assert!(!alive(new_pid));
}

#[tokio::test]
async fn log_path_holds_the_output_of_each_run() {
    let fx = Fixture::new();
    let (key, p) = pod(
        "logs",
        "u12",
        json!({"containers": [{"name": "c", "image": "sh",
                               "command": ["/bin/sh", "-c", "echo hello; echo oops >&2; exit 1"]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    fx.wait_status(&key, "a restart", |s| {
        s["containerStatuses"][0]["restartCount"].as_u64() >= Some(1)
    })
    .await;
    let current = fx.edged().log_path("default", "logs", "c", false).unwrap();
    let previous = fx.edged().log_path("default", "logs", "c", true).unwrap();
    assert_ne!(current, previous);
    // CRI entries: each line stamped and tagged with its stream.
    let text = |path: &std::path::Path| {
        let file = std::fs::read(path).unwrap_or_default();
        let mut out = Vec::new();
        let mut streams = Vec::new();
        for line in file.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let e = super::crilog::parse(line);
            assert!(e.time.is_some(), "{}", String::from_utf8_lossy(line));
            streams.push(
                String::from_utf8_lossy(line.split(|b| *b == b' ').nth(1).unwrap()).into_owned(),
            );
            super::crilog::render(&e, false, &mut out);
        }
        (String::from_utf8(out).unwrap(), streams)
    };
    let want = (
        "hello\noops\n".to_owned(),
        vec!["stdout".to_owned(), "stderr".to_owned()],
    );
    wait_until("the output", || text(&current) == want).await;
    assert_eq!(text(&previous), want);
    assert_eq!(fx.edged().log_path("default", "logs", "../c", false), None);
    assert_eq!(fx.edged().log_path("default", "nope", "c", false), None);
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn logs_rotate_and_a_follower_goes_on_in_the_new_file() {
    // A line every 20 ms rotates the 4 KiB file about every 2 s: a follower
    // that a loaded machine stalls for less than that still finds each
    // file (at 5 ms, it failed under CI beside a soak: its file was gone).
    let fx = Fixture::new();
    let (key, p) = pod(
        "chatty",
        "u-rot",
        json!({"containers": [{"name": "c", "image": "sh",
            "command": ["/bin/sh", "-c",
                "i=0; while [ $i -lt 300 ]; do i=$((i+1)); echo \"line $i\"; sleep 0.02; done; exec sleep 60"]}]}),
    );
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    fx.wait_status(&key, "Running", |s| s["phase"] == "Running")
        .await;
    let path = fx
        .edged()
        .log_path("default", "chatty", "c", false)
        .unwrap();
    let req = keel_api::LogRequest {
        namespace: "default".into(),
        pod: "chatty".into(),
        container: Some("c".into()),
        follow: true,
        ..keel_api::LogRequest::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut text = String::new();
    let follow = crate::core::stream_log(fx.edged(), path.clone(), "c", &req, &tx);
    let collect = async {
        while let Some(chunk) = rx.recv().await {
            text.push_str(&String::from_utf8_lossy(&chunk));
            if text.contains("line 300\n") {
                return;
            }
        }
    };
    tokio::select! {
        r = follow => panic!("the follower ended: {r:?}"),
        () = collect => {}
        () = tokio::time::sleep(Duration::from_secs(30)) => panic!("not every line: {text}"),
    }
    // Every line from where the follower started, none lost in rotations.
    let numbers: Vec<u32> = text
        .lines()
        .map(|l| l.strip_prefix("line ").unwrap().parse().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");
    assert_eq!(numbers.last(), Some(&300));
    // Rotated, keeping two files of at most 4 KiB.
    let mut rotated = path.clone().into_os_string();
    rotated.push(".1");
    assert!(std::path::Path::new(&rotated).exists());
    let mut gone = path.clone().into_os_string();
    gone.push(".2");
    assert!(!std::path::Path::new(&gone).exists());
    assert!(std::fs::metadata(&path).unwrap().len() <= 4096);
    // --tail reads the current file's last lines.
    let mut f = tokio::fs::File::open(&path).await.unwrap();
    let len = f.metadata().await.unwrap().len();
    let at = crate::core::tail_offset(&mut f, len, 1).await.unwrap();
    let last = std::fs::read(&path).unwrap();
    let last = String::from_utf8_lossy(&last[at as usize..]).into_owned();
    assert!(last.ends_with(" stdout F line 300\n"), "{last}");
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn init_containers_run_first_and_spec_change_restarts() {
    let fx = Fixture::new();
    let out = fx.dir.path().join("init-out.txt");
    let spec = |arg: &str| {
        json!({
            "initContainers": [{"name": "init", "image": "sh",
                                "command": ["/bin/sh", "-c", "echo ready > init.txt"]}],
            "containers": [{"name": "app", "image": "sh",
                            "command": ["/bin/sh", "-c", format!("cat init.txt > {}; exec sleep {arg}", out.display())]}],
        })
    };
    let (key, p) = pod("init", "u13", spec("30"));
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "Running", |s| s["phase"] == "Running")
        .await;
    let init = &status["initContainerStatuses"][0];
    assert_eq!(init["state"]["terminated"]["reason"], "Completed");
    assert_eq!(init["ready"], true);
    wait_until("the app output", || {
        std::fs::read_to_string(&out).is_ok_and(|s| s == "ready\n")
    })
    .await;
    let pid = pid_of(&status, "containerStatuses", 0);

    let (_, p) = pod("init", "u13", spec("31"));
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    let status = fx
        .wait_status(&key, "the restarted app", |s| {
            s["containerStatuses"][0]["restartCount"] == 1 && s["phase"] == "Running"
        })
        .await;
    assert_ne!(pid_of(&status, "containerStatuses", 0), pid);
    wait_until("the old process to die", || !alive(pid)).await;
    fx.edged().shutdown().await;
}

/// Pod `default/box`: container `main`, `sleep 60` with env `GREETING=hi`
/// and working directory `work` under the test directory.
fn box_pod(fx: &Fixture) -> (String, Value) {
    let work = fx.dir.path().join("work");
    pod(
        "box",
        "u20",
        json!({"terminationGracePeriodSeconds": 1,
               "containers": [{"name": "main", "image": "sleep", "args": ["60"],
                               "workingDir": work.to_str().unwrap(),
                               "env": [{"name": "GREETING", "value": "hi"}]}]}),
    )
}

/// Starts [`box_pod`] and waits until it runs; returns its working
/// directory.
async fn running_box(fx: &Fixture) -> PathBuf {
    let (key, p) = box_pod(fx);
    fx.edged().sync(vec![(key.clone(), p)], &no_lookup);
    fx.wait_status(&key, "Running", |s| s["phase"] == "Running")
        .await;
    fx.dir.path().join("work")
}

fn command(args: &[&str]) -> Vec<String> {
    args.iter().map(|a| (*a).to_owned()).collect()
}

async fn read_all(mut stream: impl tokio::io::AsyncRead + Unpin) -> String {
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn exec_runs_in_the_container_environment() {
    let fx = Fixture::new();
    let work = running_box(&fx).await;
    let process = fx
        .edged()
        .exec(
            "default",
            "box",
            "main",
            command(&[
                "sh",
                "-c",
                "echo $HOSTNAME $GREETING; pwd; echo err >&2; exit 3",
            ]),
        )
        .await
        .unwrap();
    let ExecProcess {
        stdin,
        stdout,
        stderr,
        exit,
    } = process;
    drop(stdin);
    let (stdout, stderr) = tokio::join!(read_all(stdout), read_all(stderr));
    let work = std::fs::canonicalize(work).unwrap();
    assert_eq!(stdout, format!("box hi\n{}\n", work.display()));
    assert_eq!(stderr, "err\n");
    assert_eq!(exit.wait().await.unwrap(), 3);
    // A signal gives 128 + its number.
    let process = fx
        .edged()
        .exec(
            "default",
            "box",
            "main",
            command(&["sh", "-c", "kill -9 $$"]),
        )
        .await
        .unwrap();
    assert_eq!(process.exit.wait().await.unwrap(), 137);
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn exec_stdin_reaches_the_command() {
    let fx = Fixture::new();
    running_box(&fx).await;
    let mut process = fx
        .edged()
        .exec("default", "box", "main", command(&["cat"]))
        .await
        .unwrap();
    let mut stdin = process.stdin.take().unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    stdin.flush().await.unwrap();
    let mut line = [0u8; 6];
    process.stdout.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"hello\n");
    stdin.write_all(b"bye").await.unwrap();
    // Closing stdin ends `cat`.
    drop(stdin);
    assert_eq!(read_all(&mut process.stdout).await, "bye");
    assert_eq!(process.exit.wait().await.unwrap(), 0);
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn exec_errors_name_what_is_wrong() {
    let fx = Fixture::new();
    running_box(&fx).await;
    let (done, p) = pod(
        "done",
        "u21",
        json!({"restartPolicy": "Never",
               "initContainers": [{"name": "setup", "image": "true"}],
               "containers": [{"name": "c", "image": "true"}]}),
    );
    fx.edged()
        .sync(vec![box_pod(&fx), (done.clone(), p)], &no_lookup);
    let edged = fx.edged();
    let exec = |pod: &'static str, container: &'static str, args: &'static [&'static str]| {
        edged.exec("default", pod, container, command(args))
    };

    let e = exec("nope", "main", &["true"]).await.unwrap_err();
    assert!(matches!(e, ExecError::PodNotFound { .. }), "{e:?}");
    assert_eq!(e.to_string(), "pod default/nope not found on this node");
    let e = fx
        .edged()
        .exec("other", "box", "main", command(&["true"]))
        .await
        .unwrap_err();
    assert!(matches!(e, ExecError::PodNotFound { .. }), "{e:?}");

    let e = exec("box", "side", &["true"]).await.unwrap_err();
    assert!(matches!(e, ExecError::ContainerNotFound { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        "container side is not valid for pod box, choose one of: [main]"
    );

    let e = exec("box", "main", &["no-such-program-here"])
        .await
        .unwrap_err();
    assert!(matches!(e, ExecError::Start { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        r#"exec: "no-such-program-here": executable file not found in $PATH"#
    );
    let e = exec("box", "main", &["/nonexistent/program"])
        .await
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        r#"exec: "/nonexistent/program": stat /nonexistent/program: no such file or directory"#
    );
    let e = exec("box", "main", &[]).await.unwrap_err();
    assert!(matches!(e, ExecError::EmptyCommand), "{e:?}");

    fx.wait_status(&done, "Succeeded", |s| s["phase"] == "Succeeded")
        .await;
    let e = exec("done", "c", &["true"]).await.unwrap_err();
    assert!(matches!(e, ExecError::ContainerNotRunning { .. }), "{e:?}");
    assert_eq!(e.to_string(), "container c is not running in pod done");
    let e = exec("done", "x", &["true"]).await.unwrap_err();
    assert_eq!(
        e.to_string(),
        "container x is not valid for pod done, choose one of: [setup c]"
    );
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn dropped_exec_and_stopped_container_kill_the_command() {
    let fx = Fixture::new();
    running_box(&fx).await;
    let start =
        |args: &'static [&'static str]| fx.edged().exec("default", "box", "main", command(args));
    let pid_of_exec = |mut process: ExecProcess| async move {
        let mut line = String::new();
        while !line.ends_with('\n') {
            let mut byte = [0u8; 1];
            process.stdout.read_exact(&mut byte).await.unwrap();
            line.push(char::from(byte[0]));
        }
        let pid: i32 = line.trim().parse().unwrap();
        (pid, process)
    };

    // The client goes away: the command dies.
    let process = start(&["sh", "-c", "echo $$; exec sleep 1000"])
        .await
        .unwrap();
    let (pid, process) = pid_of_exec(process).await;
    assert!(alive(pid));
    drop(process);
    wait_until("the dropped exec to die", || !alive(pid)).await;

    // Dropping the future waiting for it does the same, and kills what it
    // started in the background too.
    let process = start(&["sh", "-c", "sleep 1000 & echo $!; wait"])
        .await
        .unwrap();
    let (child, process) = pid_of_exec(process).await;
    assert!(alive(child));
    let waited = tokio::time::timeout(Duration::from_millis(100), process.exit.wait()).await;
    assert!(waited.is_err());
    wait_until("the background child to die", || !alive(child)).await;

    // The container stops: its exec is killed.
    let process = start(&["sh", "-c", "echo $$; exec sleep 1000"])
        .await
        .unwrap();
    let (pid, process) = pid_of_exec(process).await;
    fx.edged().shutdown().await;
    assert_eq!(process.exit.wait().await.unwrap(), 137);
    assert!(!alive(pid));
}

/// The process runtime without interactive exec (the trait's default).
#[derive(Debug)]
struct NoExecRuntime;

#[derive(Debug)]
struct NoExec(Arc<dyn ContainerHandle>);

impl Runtime for NoExecRuntime {
    fn start(&self, spec: &LaunchSpec) -> Result<Arc<dyn ContainerHandle>, Error> {
        Ok(Arc::new(NoExec(ProcessRuntime.start(spec)?)))
    }

    fn kill_leftover(&self, state_file: &std::path::Path) -> Result<bool, Error> {
        ProcessRuntime.kill_leftover(state_file)
    }
}

impl ContainerHandle for NoExec {
    fn id(&self) -> String {
        self.0.id()
    }

    fn signal(&self, signal: StopSignal) -> Result<(), Error> {
        self.0.signal(signal)
    }

    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, Error>> {
        self.0.wait()
    }

    fn exec(
        &self,
        command: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<ExitStatus, Error>> {
        self.0.exec(command, timeout)
    }
}

#[tokio::test]
async fn exec_needs_a_runtime_that_supports_it() {
    let fx = Fixture::with_runtime(Arc::new(NoExecRuntime));
    running_box(&fx).await;
    let e = fx
        .edged()
        .exec("default", "box", "main", command(&["true"]))
        .await
        .unwrap_err();
    assert!(matches!(e, ExecError::Unsupported), "{e:?}");
    fx.edged().shutdown().await;
}

#[tokio::test]
async fn new_outside_a_runtime_fails() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = Fixture::config(dir.path());
    let result = std::thread::spawn(move || {
        Edged::new(cfg, Arc::new(ProcessRuntime), Arc::new(Sink::default())).map(|_| ())
    })
    .join()
    .unwrap();
    assert!(matches!(result, Err(Error::NoRuntime)));
}

#[test]
fn expansion_follows_kubernetes() {
    let vars = [("A", "1"), ("B", "two")];
    let lookup = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| *v);
    assert_eq!(expand("$(A)-$(B)", lookup), "1-two");
    assert_eq!(expand("$(C)", lookup), "$(C)");
    assert_eq!(expand("$$(A)", lookup), "$(A)");
    assert_eq!(expand("$$", lookup), "$");
    assert_eq!(expand("a$b", lookup), "a$b");
    assert_eq!(expand("$(A", lookup), "$(A");
    assert_eq!(expand("end$", lookup), "end$");
}

#[test]
fn formats_like_kubernetes() {
    assert_eq!(go_duration(Duration::from_millis(100)), "100ms");
    assert_eq!(go_duration(Duration::from_secs(10)), "10s");
    assert_eq!(go_duration(Duration::from_millis(1600)), "1.6s");
    assert_eq!(go_duration(Duration::from_secs(300)), "5m0s");
    let t = time::OffsetDateTime::from_unix_timestamp(1_795_442_400).unwrap();
    assert_eq!(rfc3339(t), "2026-11-23T14:00:00Z");
}
