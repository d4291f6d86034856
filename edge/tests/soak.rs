//! A soak run on time-scaled settings: a real cloudcore and two real
//! edgecores, each edge receiving a device reading every 10 ms over MQTT
//! and flapping the readiness of its pods every second (pod status churn),
//! for many retention periods (`--retain 5s`, compaction every second,
//! the edges' watch history 5 s: the defaults of days and minutes scaled
//! down). Memory and disk of all
//! three processes are sampled: the end of the run stays within a bound of
//! its middle (they plateau); every reading reached the cloud's log or its
//! event sink; `keel verify` passes; cloudcore restarts about as fast as it
//! started fresh.
//!
//! Object histories are rebased once they hold 32 changes
//! (`--rebase-after`), and each pod's status still reaches the cloud.
//!
//! `KEEL_SOAK_SECS` sets the length (default 60 s), `KEEL_SOAK_PODS` the
//! pods per edge (4) and `KEEL_SOAK_READING_MS` the reading interval (10).

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

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster::*;
use serde_json::Value;

/// Disk use under `dir` in KiB: (the store's journals, everything else).
fn du_kib(dir: &Path) -> (u64, u64) {
    fn walk(p: &Path, sum: &mut (u64, u64)) {
        let Ok(meta) = std::fs::symlink_metadata(p) else {
            return;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), sum);
            }
        } else {
            use std::os::unix::fs::MetadataExt as _;
            let kib = meta.blocks() * 512 / 1024;
            // fjall's journals (`*.jnl`) and keel-log's commit journal.
            if p.extension().is_some_and(|e| e == "jnl" || e == "journal") {
                sum.0 += kib;
            } else {
                sum.1 += kib;
            }
        }
    }
    let mut sum = (0, 0);
    walk(dir, &mut sum);
    sum
}

/// The journals of a store: fjall's are a sawtooth (a new one starts once
/// the active one passes 64 MB and the old one is deleted once flushed;
/// keel-log's `Store::open`), at most two of them; keel-log's commit
/// journal is a ring that grows to 16 MiB and stays there. With some
/// slack, in KiB.
const JOURNAL_CAP_KIB: u64 = 2 * 64 * 1024 + 16 * 1024 + 16 * 1024;

/// A pod whose readiness flips every second (its status changes about
/// once a second).
fn flapping_pod(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: {node}\n  containers:\n  - name: main\n    image: busybox\n    command: [\"/bin/sh\", \"-c\", \"exec sleep 3600\"]\n    readinessProbe:\n      exec:\n        command: [\"/bin/sh\", \"-c\", \"test $(( $(date +%s) % 2 )) = 0\"]\n      periodSeconds: 1\n      failureThreshold: 1\n      successThreshold: 1\n"
    )
}

/// Starts cloudcore; returns it and how long it took to serve.
fn start_cloud(dir: &Path, ports: Option<&Cloud>, flags: &[&str]) -> (Cloud, Duration) {
    let t = Instant::now();
    let c = Cloud::start_with(
        dir,
        ports.map(|c| c.api.clone()),
        ports.map(|c| c.hub.clone()),
        ports.map(|c| c.bootstrap.clone()),
        flags,
    );
    (c, t.elapsed())
}

#[test]
fn soak_plateaus() {
    let secs: u64 = std::env::var("KEEL_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let pods: usize = std::env::var("KEEL_SOAK_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let reading_ms: u64 = std::env::var("KEEL_SOAK_READING_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let tmp = tempfile::tempdir().unwrap();
    if let Ok(keep) = std::env::var("KEEL_SOAK_KEEP") {
        eprintln!("soak data in {}", tmp.path().display());
        std::fs::write(keep, tmp.path().display().to_string()).unwrap();
    }
    let grpc = format!("127.0.0.1:{}", free_port());
    let metrics = format!("127.0.0.1:{}", free_port());
    let sink = tmp.path().join("events.jsonl");
    let cloud_dir = tmp.path().join("cloud");
    let flags = [
        "--grpc-addr",
        &grpc,
        "--metrics-addr",
        &metrics,
        "--retain",
        "5s",
        "--retain-records",
        "50",
        "--compact-interval",
        "1s",
        "--rebase-after",
        "32",
        "--event-sink",
        sink.to_str().unwrap(),
    ];
    let (mut cloud, fresh_start) = start_cloud(&cloud_dir, None, &flags);
    let nodes = ["soak-a", "soak-b"];
    let edges: Vec<Edge> = nodes
        .iter()
        .map(|n| Edge::start(&tmp.path().join(n), n, &cloud, Some(cloud.token(n)), None))
        .collect();
    for n in nodes {
        for i in 0..pods {
            let yaml = tmp.path().join(format!("{n}-{i}.yaml"));
            std::fs::write(&yaml, flapping_pod(&format!("{n}-p{i}"), n)).unwrap();
            ok(
                cloud.k(&["apply", "-f", yaml.to_str().unwrap()]),
                "apply pod",
            );
        }
    }

    // A reading every 10 ms on each edge, QoS 1.
    let stop = Arc::new(AtomicBool::new(false));
    let publishers: Vec<_> = edges
        .iter()
        .enumerate()
        .map(|(e, edge)| {
            let (host, port) = edge.mqtt.rsplit_once(':').unwrap();
            let mut child = Command::new(on_path("mosquitto_pub"))
                .args(["-h", host, "-p", port, "-q", "1", "-l"])
                .args(["-t", "$hw/events/upload/meter"])
                .stdin(Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sent = 0u64;
                let start = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    writeln!(stdin, "{{\"e\":{e},\"i\":{sent}}}").unwrap();
                    sent += 1;
                    let next = start + Duration::from_millis(reading_ms * sent);
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                drop(stdin);
                assert!(child.wait().unwrap().success());
                sent
            })
        })
        .collect();

    // Samples every 2 s: RSS and disk of cloudcore and the edges.
    let pids: Vec<u32> = std::iter::once(&cloud.proc)
        .chain(edges.iter().map(|e| &e.proc))
        .map(|p| p.0.as_ref().unwrap().id())
        .collect();
    let dirs: Vec<std::path::PathBuf> = std::iter::once(cloud_dir.clone())
        .chain(nodes.iter().map(|n| tmp.path().join(n)))
        .collect();
    let names = ["cloudcore", "edgecore a", "edgecore b"];
    // (RSS, journals, other disk) in KiB.
    let mut series: Vec<Vec<(u64, u64, u64)>> = vec![Vec::new(); 3];
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(secs) {
        std::thread::sleep(Duration::from_secs(2));
        for (i, s) in series.iter_mut().enumerate() {
            let (journals, data) = du_kib(&dirs[i]);
            s.push((proc_kib(pids[i], "VmRSS"), journals, data));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<u64> = publishers.into_iter().map(|p| p.join().unwrap()).collect();

    for (i, s) in series.iter().enumerate() {
        let mib = |f: fn(&(u64, u64, u64)) -> u64| -> String {
            let v: Vec<String> = s.iter().map(|x| (f(x) / 1024).to_string()).collect();
            v.join(" ")
        };
        eprintln!("{}: RSS MiB {}", names[i], mib(|x| x.0));
        eprintln!("{}: journal MiB {}", names[i], mib(|x| x.1));
        eprintln!("{}: other disk MiB {}", names[i], mib(|x| x.2));
    }
    // The end within a bound of the middle: growth has stopped. The
    // journals are a sawtooth, so they are held to a fixed cap instead.
    for (i, s) in series.iter().enumerate() {
        let journals = s.iter().map(|x| x.1).max().unwrap_or(0);
        assert!(
            journals <= JOURNAL_CAP_KIB,
            "{} journals reached {journals} KiB",
            names[i]
        );
        let mid = s[s.len() / 2];
        let end = s[s.len() - 1];
        assert!(
            end.0 <= mid.0 + mid.0 / 2 + 16 * 1024,
            "{} RSS grew from {} to {} KiB",
            names[i],
            mid.0,
            end.0
        );
        assert!(
            end.2 <= mid.2 + mid.2 / 2 + 16 * 1024,
            "{} disk (journals aside) grew from {} to {} KiB",
            names[i],
            mid.2,
            end.2
        );
    }
    // Object histories were rebased all along, and what the edges report
    // still reaches the cloud: each pod's status there is, at some moment,
    // the one its edge serves (readiness flaps every second).
    let rebased = metric(&metrics, "keel_rebased_objects_total", "");
    eprintln!("objects rebased: {rebased}");
    assert!(rebased >= 4, "only {rebased} objects rebased");
    let status = |out: Output| -> Option<Value> {
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        Some(v["status"]["conditions"].clone())
    };
    for (e, n) in nodes.iter().enumerate() {
        for i in 0..pods {
            let name = format!("{n}-p{i}");
            wait_for(
                &format!("{name}: the cloud's status is the edge's"),
                Duration::from_secs(30),
                || {
                    let at_edge = status(edges[e].k(&["get", "pod", &name, "-o", "json"]));
                    let at_cloud = status(cloud.k(&["get", "pod", &name, "-o", "json"]));
                    at_edge.is_some() && at_edge == at_cloud
                },
            );
        }
    }

    // The cloud compacted all along.
    for n in nodes {
        assert!(metric(&metrics, "keel_stream_horizon_seq", &format!("{n}/up")) > 0);
    }
    assert!(metric(&metrics, "keel_stream_horizon_seq", "cluster") > 0);

    // Every reading is in the cloud's log or its sink.
    let mut got: Vec<BTreeSet<u64>> = vec![BTreeSet::new(); 2];
    wait_for(
        "every reading on the cloud",
        Duration::from_secs(60),
        || {
            got = vec![BTreeSet::new(); 2];
            if let Ok(text) = std::fs::read_to_string(&sink) {
                for line in text.lines() {
                    let v: Value = serde_json::from_str(line).unwrap();
                    if let (Some(e), Some(i)) = (
                        v["payload"]["payload"]["e"].as_u64(),
                        v["payload"]["payload"]["i"].as_u64(),
                    ) {
                        got[e as usize].insert(i);
                    }
                }
            }
            for n in nodes {
                let r = keel_cli(
                    &cloud,
                    &grpc,
                    &["replay", "--quiet", "-s", &format!("{n}/up"), "-o", "json"],
                );
                if !r.status.success() {
                    return false;
                }
                for line in String::from_utf8_lossy(&r.stdout).lines() {
                    let v: Value = serde_json::from_str(line).unwrap();
                    if v["kind"] != "event" {
                        continue;
                    }
                    use base64::Engine as _;
                    let payload = base64::engine::general_purpose::STANDARD
                        .decode(v["payload"].as_str().unwrap())
                        .unwrap();
                    let ev: Value = serde_json::from_slice(&payload).unwrap();
                    if let (Some(e), Some(i)) =
                        (ev["payload"]["e"].as_u64(), ev["payload"]["i"].as_u64())
                    {
                        got[e as usize].insert(i);
                    }
                }
            }
            (0..2).all(|e| got[e].len() as u64 == sent[e])
        },
    );
    for e in 0..2 {
        assert_eq!(got[e], (0..sent[e]).collect::<BTreeSet<_>>(), "edge {e}");
    }
    eprintln!("readings: {sent:?} published, all on the cloud (log or sink)");

    let verify = keel_cli(&cloud, &grpc, &["verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // Start-up after the soak, against a fresh start.
    let before = ok(cloud.k(&["get", "pods", "-o", "json"]), "get pods");
    cloud.proc.stop();
    if std::env::var("KEEL_SOAK_KEEP").is_ok() {
        let _ = std::fs::create_dir_all(tmp.path().join("copy"));
        let _ = Command::new("cp")
            .arg("-a")
            .arg(&cloud_dir)
            .arg(tmp.path().join("copy"))
            .status();
    }
    let (restarted, soaked_start) = start_cloud(&cloud_dir, Some(&cloud), &flags);
    cloud = restarted;
    eprintln!("cloudcore start: fresh {fresh_start:?}, after the soak {soaked_start:?}");
    assert!(
        soaked_start <= fresh_start * 3 + Duration::from_secs(2),
        "start-up after the soak took {soaked_start:?} (fresh: {fresh_start:?})"
    );
    let after: Value =
        serde_json::from_str(&ok(cloud.k(&["get", "pods", "-o", "json"]), "get pods")).unwrap();
    let before: Value = serde_json::from_str(&before).unwrap();
    let names_of = |v: &Value| -> Vec<String> {
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(names_of(&before), names_of(&after));
    drop(edges);
    if std::env::var("KEEL_SOAK_KEEP").is_ok() {
        let _ = tmp.keep();
    }
}
