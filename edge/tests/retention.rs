//! cloudcore compacts its log under retention settings, with real
//! cloudcore and edgecore processes, kubectl, mosquitto_pub and the `keel`
//! CLI: device readings older than the retention leave the cloud's copy of
//! the node's `up` stream after being appended to the event sink (none
//! lost, none twice), `cluster` is folded into a snapshot, `keel audit`
//! and `keel verify` still work, and a restarted cloudcore serves the same
//! objects.

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
use std::process::{Command, Stdio};
use std::time::Duration;

use cluster::*;
use serde_json::Value;

const READINGS: usize = 1000;

#[test]
fn compaction_keeps_what_retention_says_and_exports_readings() {
    let tmp = tempfile::tempdir().unwrap();
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
        "2s",
        "--retain-records",
        "20",
        "--compact-interval",
        "1s",
        "--event-sink",
        sink.to_str().unwrap(),
    ];
    let mut cloud = Cloud::start_with(&cloud_dir, None, None, None, &flags);
    let node = "kept";
    let edge = Edge::start(
        &tmp.path().join("edge"),
        node,
        &cloud,
        Some(cloud.token(node)),
        None,
    );

    // 400 configmaps (one apply): `cluster` records.
    let yaml: String = (0..400)
        .map(|i| {
            format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{i}\ndata:\n  i: \"{i}\"\n")
        })
        .collect();
    let yaml_path = tmp.path().join("cms.yaml");
    std::fs::write(&yaml_path, yaml).unwrap();
    ok(
        cloud.k(&["apply", "-f", yaml_path.to_str().unwrap()]),
        "apply configmaps",
    );
    ok(
        cloud.k(&["label", "configmap", "cm-7", "audited=yes"]),
        "label",
    );

    // Readings through the edge's MQTT broker (QoS 1: each is durable in
    // the node's `up` stream once mosquitto_pub exits).
    let (host, port) = edge.mqtt.rsplit_once(':').unwrap();
    let mut pubber = Command::new(on_path("mosquitto_pub"))
        .args(["-h", host, "-p", port, "-q", "1", "-l"])
        .args(["-t", "$hw/events/upload/meter"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = pubber.stdin.take().unwrap();
        for i in 0..READINGS {
            writeln!(stdin, "{{\"i\":{i}}}").unwrap();
        }
    }
    assert!(pubber.wait().unwrap().success());

    // Past the retention, both streams are compacted.
    let up = format!("{node}/up");
    wait_for(
        "compaction of cluster and up",
        Duration::from_secs(90),
        || {
            metric(&metrics, "keel_stream_horizon_seq", "cluster") >= 256
                && metric(&metrics, "keel_stream_horizon_seq", &up) >= 256
        },
    );

    // Every reading is in the sink or still in the log, and none twice.
    let mut seen = BTreeSet::new();
    let exported = std::fs::read_to_string(&sink).unwrap();
    for line in exported.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["stream"], up.as_str(), "{line}");
        if v["key"] == "upload/$hw/events/upload/meter" || v["key"] == "upload/meter" {
            let i = v["payload"]["payload"]["i"].as_u64().unwrap();
            assert!(seen.insert(i), "reading {i} exported twice");
        }
    }
    assert!(!seen.is_empty(), "nothing exported: {exported}");
    let replay = keel_cli(
        &cloud,
        &grpc,
        &["replay", "--quiet", "-s", &up, "-o", "json"],
    );
    assert!(
        replay.status.success(),
        "{}",
        String::from_utf8_lossy(&replay.stderr)
    );
    let mut in_log = 0;
    for line in String::from_utf8_lossy(&replay.stdout).lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["type"] != "record" || v["kind"] != "event" {
            continue;
        }
        use base64::Engine as _;
        let payload = base64::engine::general_purpose::STANDARD
            .decode(v["payload"].as_str().unwrap())
            .unwrap();
        let ev: Value = serde_json::from_slice(&payload).unwrap();
        if let Some(i) = ev["payload"]["i"].as_u64() {
            assert!(seen.insert(i), "reading {i} both exported and in the log");
            in_log += 1;
        }
    }
    assert_eq!(
        seen,
        (0..READINGS as u64).collect::<BTreeSet<_>>(),
        "{} exported, {in_log} in the log",
        seen.len() - in_log
    );

    // History across compaction, chains, and a restart from snapshots.
    let audit = keel_cli(&cloud, &grpc, &["audit", "configmap/cm-7"]);
    assert!(
        audit.status.success(),
        "{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    assert!(
        String::from_utf8_lossy(&audit.stdout).contains("audited"),
        "{}",
        String::from_utf8_lossy(&audit.stdout)
    );
    let verify = keel_cli(&cloud, &grpc, &["verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );
    let before = ok(cloud.k(&["get", "configmaps", "-o", "json"]), "get");
    cloud.proc.stop();
    cloud = Cloud::start_with(
        &cloud_dir,
        Some(cloud.api.clone()),
        Some(cloud.hub.clone()),
        Some(cloud.bootstrap.clone()),
        &flags,
    );
    let after = ok(cloud.k(&["get", "configmaps", "-o", "json"]), "get");
    let items = |s: &str| serde_json::from_str::<Value>(s).unwrap()["items"].clone();
    assert_eq!(items(&before), items(&after));
    wait_for("the node back", Duration::from_secs(60), || {
        let o = cloud.k(&[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[0].status}",
        ]);
        String::from_utf8_lossy(&o.stdout) == "True"
    });
    drop(edge);
}
