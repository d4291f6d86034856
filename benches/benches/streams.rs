//! Container streams through cloudcore and the node's own QUIC connection,
//! against real processes: the release `cloudcore` and `edgecore` on
//! loopback (build them first), the real kubectl, the kube client.
//!
//! 1. Time to first byte of `kubectl logs`: the kube client asks cloudcore
//!    for a pod's log (`--tail=1`) and times the first chunk of the body,
//!    over `KEEL_STREAMS_N` requests (default 200); then curl, a new TLS
//!    connection each, from the request to the first byte, beside a GET
//!    of the same pod (no session to the edge) in the same run.
//! 2. `kubectl exec POD -- true`: the whole kubectl command, p50 / p99 over
//!    `KEEL_STREAMS_N / 4` runs, beside `kubectl get pod POD` (the same
//!    kubectl start-up, kubeconfig and TLS handshake with no stream) in
//!    the same run, so the difference is what the tunnel adds.
//! 3. Port-forward throughput: a 256 MiB file from an HTTP server in a pod
//!    (python's http.server), fetched through `kubectl port-forward` and
//!    directly from the same server, 3 times each, MB/s of the best run.
//!
//! `cargo build --release --bins && cargo bench -p keel-benches --bench streams`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use futures::{AsyncBufReadExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, LogParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use keel_benches::port;

const FILE_MIB: usize = 256;

fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str]) -> Output {
    Command::new(support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1e3
}

/// Fetches `/big` from `port` with HTTP/1.0 and returns MB/s.
fn fetch(port: u16) -> f64 {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /big HTTP/1.0\r\nHost: pod\r\n\r\n")
        .unwrap();
    let start = Instant::now();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0usize;
    loop {
        let n = c.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    let secs = start.elapsed().as_secs_f64();
    assert!(total > FILE_MIB << 20, "short answer: {total} bytes");
    total as f64 / 1e6 / secs
}

/// Time to first byte of `GET /api/v1/namespaces/default/{path}` with
/// curl, each on a new connection: `time_starttransfer - time_appconnect`
/// (from the request, once TLS is up, to the answer's first byte).
fn curl_ttfb(dir: &Path, kubeconfig: &Path, path: &str, n: usize) -> Vec<Duration> {
    let pem = |field: &str, file: &str| {
        let out = dir.join(file);
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep '{field}:' '{}' | awk '{{print $2}}' | base64 -d > '{}'",
                kubeconfig.display(),
                out.display()
            ))
            .output()
            .unwrap();
        assert!(o.status.success(), "{o:?}");
        out
    };
    let (ca, crt, key) = (
        pem("certificate-authority-data", "ca.pem"),
        pem("client-certificate-data", "crt.pem"),
        pem("client-key-data", "key.pem"),
    );
    let text = std::fs::read_to_string(kubeconfig).unwrap();
    let server = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:"))
        .unwrap()
        .trim()
        .to_owned();
    (0..n)
        .map(|_| {
            let o = Command::new("curl")
                .args([
                    "-s",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{time_appconnect} %{time_starttransfer}",
                ])
                .arg("--cacert")
                .arg(&ca)
                .arg("--cert")
                .arg(&crt)
                .arg("--key")
                .arg(&key)
                .arg(format!("{server}/api/v1/namespaces/default/{path}"))
                .output()
                .unwrap();
            let out = String::from_utf8_lossy(&o.stdout);
            let mut t = out.split_whitespace().map(|v| v.parse::<f64>().unwrap());
            let (tls, first) = (t.next().unwrap(), t.next().unwrap());
            assert!(first > 0.0, "curl: {o:?}");
            Duration::from_secs_f64(first - tls)
        })
        .collect()
}

fn main() {
    let n: usize = std::env::var("KEEL_STREAMS_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
        .max(8);
    let dir = tempfile::tempdir().unwrap();
    let cluster = keel_benches::Cluster::start(dir.path());
    let kubeconfig = cluster.kubeconfig.clone();
    let cache = dir.path().join("kc");
    let www = dir.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("big"), vec![7u8; FILE_MIB << 20]).unwrap();
    let web_port = port(false);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (logs_ttfb, client) = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
        for (name, command) in [
            (
                "web",
                serde_json::json!([
                    "python3",
                    "-m",
                    "http.server",
                    web_port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--directory",
                    www.display().to_string()
                ]),
            ),
            (
                "counter",
                serde_json::json!([
                    "/bin/sh",
                    "-c",
                    "i=0; while true; do i=$((i+1)); echo line $i; sleep 0.1; done"
                ]),
            ),
        ] {
            let pod: Pod = serde_json::from_value(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {"nodeName": "edge-1", "containers": [{"name": "main",
                    "image": "busybox", "command": command}]}}))
            .unwrap();
            let start = Instant::now();
            loop {
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(_) => break,
                    Err(e) => {
                        assert!(
                            start.elapsed() < Duration::from_secs(60),
                            "create {name}: {e}"
                        );
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
        let start = Instant::now();
        loop {
            let ready = pods
                .get("counter")
                .await
                .ok()
                .and_then(|p| p.status?.phase)
                .as_deref()
                == Some("Running")
                && pods
                    .get("web")
                    .await
                    .ok()
                    .and_then(|p| p.status?.phase)
                    .as_deref()
                    == Some("Running");
            if ready {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "pods never Running"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let params = LogParams {
            tail_lines: Some(1),
            ..LogParams::default()
        };
        let mut ttfb = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut lines = pods.log_stream("counter", &params).await.unwrap().lines();
            let first = lines.try_next().await.unwrap();
            ttfb.push(t.elapsed());
            assert!(first.is_some_and(|l| l.starts_with("line ")));
        }
        (ttfb, client)
    });
    drop(client);
    let mut logs_ttfb = logs_ttfb;
    let (mut curl_logs, mut curl_get) = (
        curl_ttfb(dir.path(), &kubeconfig, "pods/counter/log?tailLines=1", n),
        curl_ttfb(dir.path(), &kubeconfig, "pods/counter", n),
    );

    let runs = (n / 4).max(8);
    let (mut exec, mut get) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        let t = Instant::now();
        let o = kubectl(&kubeconfig, &cache, &["get", "pod", "counter"]);
        get.push(t.elapsed());
        assert!(o.status.success());
        let t = Instant::now();
        let o = kubectl(&kubeconfig, &cache, &["exec", "counter", "--", "true"]);
        exec.push(t.elapsed());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }

    let mut forward = Command::new(support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--cache-dir")
        .arg(&cache)
        .args(["port-forward", "pod/web", &format!(":{web_port}")])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(forward.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let local: u16 = first
        .strip_prefix("Forwarding from 127.0.0.1:")
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("kubectl port-forward said {first:?}"));
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(drop));
    let (mut through, mut direct) = (0f64, 0f64);
    for _ in 0..3 {
        through = through.max(fetch(local));
        direct = direct.max(fetch(web_port));
    }
    let _ = forward.kill();
    let _ = forward.wait();

    eprintln!(
        "kubectl logs through cloudcore, time to first byte ({n} requests, kube client): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&mut logs_ttfb, 0.5),
        pct(&mut logs_ttfb, 0.9),
        pct(&mut logs_ttfb, 0.99),
        pct(&mut logs_ttfb, 1.0)
    );
    eprintln!(
        "the same with curl (a new TLS connection each; request sent -> first byte, TLS handshake excluded; {n} requests): logs p50 {:.2} ms, p99 {:.2} ms; GET of the pod in the same run p50 {:.2} ms, p99 {:.2} ms",
        pct(&mut curl_logs, 0.5),
        pct(&mut curl_logs, 0.99),
        pct(&mut curl_get, 0.5),
        pct(&mut curl_get, 0.99)
    );
    eprintln!(
        "kubectl exec POD -- true, whole command ({runs} runs): p50 {:.1} ms, p99 {:.1} ms; kubectl get pod in the same run: p50 {:.1} ms, p99 {:.1} ms",
        pct(&mut exec, 0.5),
        pct(&mut exec, 0.99),
        pct(&mut get, 0.5),
        pct(&mut get, 0.99)
    );
    eprintln!(
        "port-forward, {FILE_MIB} MiB over HTTP (best of 3): {through:.0} MB/s through cloudcore and the node's QUIC connection, {direct:.0} MB/s directly from the same server ({:.2}x)",
        through / direct
    );
    drop(cluster);
}
