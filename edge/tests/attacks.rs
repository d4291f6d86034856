//! A hostile or broken edge node cannot hurt the cloud, other nodes or
//! history. Each test is one attack by a real QUIC + mTLS client holding a
//! real node certificate (joined with a token, as edgecore joins) against
//! a real cloudcore process, with a real edgecore ("bystander") beside it.
//! The attacker speaks the sync wire protocol by hand
//! (`support/attacker.rs`).
//!
//! After every attack the same checks run (`Fixture::assert_healthy`):
//! cloudcore serves kubectl, the bystander still converges, every hash
//! chain verifies (`keel verify`) and cloudcore's peak RSS stayed below a
//! generous cap.
//!
//! cloudcore and keel are the binaries built next to edgecore (`cargo test
//! --workspace` builds them; with `-p keel-edge` alone build them first:
//! `cargo build -p keel-cloud --bins`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/attacker.rs"]
mod attacker;
#[path = "support/cluster.rs"]
mod cluster;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::process::Command;
use std::time::Duration;

use attacker::*;
use cluster::{Edge, ok, wait_for};
use keel_log::{Cursor, PayloadKind};
use keel_sync::crdt::ActorId;
use keel_sync::frame::{Frame, MAX_FRAME_BYTES};
use keel_sync::link::up_stream;
use serde_json::{Value, json};

fn node_key() -> String {
    format!("nodes/{ATTACKER}")
}

/// Attack 1: changes authored as cloudcore's automerge actor: one with all its
/// dependencies (forged on a copy of the attacker's own pod), one whose
/// dependency is missing (on its own Node object). Both close the link and
/// neither reaches the cloud's objects; the cloud's own edits of the pod
/// still reach its node afterwards.
#[test]
fn forged_cloudcore_changes_are_refused() {
    let mut fx = Fixture::start();
    let pod_key = "pods/default/victim";
    fx.apply(&pod_yaml("victim", ATTACKER, "", ""));
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    fx.rt.block_on(fx.attacker.wait_object(pod_key));
    fx.rt.block_on(fx.attacker.wait_object(&node_key()));
    let cloudcore = ActorId::from_name("cloudcore");

    // With every dependency: the next change in cloudcore's own sequence.
    let mut forged = fx.attacker.objects();
    let mut pod = forged.get_json(pod_key).unwrap();
    pod["metadata"]["labels"] = json!({"forged": "yes"});
    pod["status"]["message"] = json!("forged by mallory");
    let change = forged
        .edit_replace(pod_key, &cloudcore, &pod)
        .unwrap()
        .unwrap();
    fx.rt
        .block_on(conn.send_entries(vec![entry(ATTACKER, pod_key, PayloadKind::Change, change)]));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["actor"]);
    drop(conn);

    // With a missing dependency: two forged edits, only the second sent.
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    let mut forged = fx.attacker.objects();
    let key = node_key();
    forged
        .edit_merge_patch(
            &key,
            &cloudcore,
            &json!({"metadata": {"labels": {"a": "1"}}}),
        )
        .unwrap()
        .unwrap();
    let second = forged
        .edit_merge_patch(
            &key,
            &cloudcore,
            &json!({"metadata": {"labels": {"b": "2"}}, "status": {"phase": "Forged"}}),
        )
        .unwrap()
        .unwrap();
    fx.rt
        .block_on(conn.send_entries(vec![entry(ATTACKER, &key, PayloadKind::Change, second)]));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["actor"]);
    drop(conn);

    // Nothing of either reached the cloud's objects.
    let pod = fx.get(&["pod", "victim"]);
    assert!(pod["metadata"]["labels"]["forged"].is_null(), "{pod}");
    assert_ne!(pod["status"]["message"], "forged by mallory", "{pod}");
    let node = fx.get(&["node", ATTACKER]);
    assert!(node["metadata"]["labels"]["a"].is_null(), "{node}");
    assert!(node["metadata"]["labels"]["b"].is_null(), "{node}");
    assert_ne!(node["status"]["phase"], "Forged", "{node}");

    // The cloud's own edits of the pod still work and reach its node (the
    // attacker's honest view: were a forged cloudcore change in the
    // cloud's document, the cloud's next change would depend on it and
    // never apply here).
    ok(
        fx.kubectl(&["label", "pod", "victim", "after=yes"], None),
        "kubectl label",
    );
    let conn = fx.rt.block_on(fx.attacker.establish());
    wait_for(
        "the cloud's label on the pod's node",
        Duration::from_secs(60),
        || fx.attacker.object(pod_key).unwrap()["metadata"]["labels"]["after"] == "yes",
    );
    let seen = fx.attacker.object(pod_key).unwrap();
    assert!(seen["metadata"]["labels"]["forged"].is_null(), "{seen}");
    drop(conn);
    fx.assert_healthy("forge");
}

/// A node writes only the status of its own pods: a change (by its own
/// actor) to a pod's spec is refused, and the cloud's pod is unchanged.
#[test]
fn a_spec_change_to_its_own_pod_is_refused() {
    let mut fx = Fixture::start();
    let pod_key = "pods/default/mine";
    fx.apply(&pod_yaml("mine", ATTACKER, "", ""));
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    fx.rt.block_on(fx.attacker.wait_object(pod_key));
    let mut own = fx.attacker.objects();
    let change = own
        .edit_merge_patch(
            pod_key,
            &ActorId::from_name(ATTACKER),
            &json!({"spec": {"containers": [{"name": "main", "image": "evil/image:1"}]},
                "status": {"phase": "Running"}}),
        )
        .unwrap()
        .unwrap();
    fx.rt
        .block_on(conn.send_entries(vec![entry(ATTACKER, pod_key, PayloadKind::Change, change)]));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["beyond its status"]);
    let pod = fx.get(&["pod", "mine"]);
    assert_eq!(pod["spec"]["containers"][0]["image"], "busybox", "{pod}");
    let metrics = fx.metrics();
    assert!(
        metrics.contains("keel_hub_link_violations_total{rule=\"forbidden\"} 1"),
        "{metrics}"
    );
    fx.assert_healthy("spec");
}

/// Attack 2: a node may not write a ConfigMap it merely uses (here one shared
/// with the bystander): the link closes, and later updates of the
/// ConfigMap still reach the bystander.
#[test]
fn a_shared_configmap_cannot_be_frozen() {
    let mut fx = Fixture::start();
    let key = "configmaps/default/shared";
    fx.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\ndata:\n  greeting: hello\n",
    );
    let uses = "    env:\n    - name: GREETING\n      valueFrom:\n        configMapKeyRef: {name: shared, key: greeting}\n";
    fx.apply(&pod_yaml("by-user", BYSTANDER, uses, ""));
    fx.apply(&pod_yaml("mal-user", ATTACKER, uses, ""));
    fx.wait_pod_phase("by-user", "Running");

    let mut conn = fx.rt.block_on(fx.attacker.establish());
    fx.rt.block_on(fx.attacker.wait_object(key));
    let mut mine = fx.attacker.objects();
    let change = mine
        .edit_merge_patch(
            key,
            &ActorId::from_name(ATTACKER),
            &json!({"data": {"greeting": "frozen"}}),
        )
        .unwrap()
        .unwrap();
    fx.rt
        .block_on(conn.send_entries(vec![entry(ATTACKER, key, PayloadKind::Change, change)]));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["may not write"]);
    drop(conn);

    fx.apply(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: shared\ndata:\n  greeting: updated\n",
    );
    wait_for(
        "the update on the bystander",
        Duration::from_secs(60),
        || {
            let o = fx
                .bystander
                .k(&["get", "configmap", "shared", "-o", "json"]);
            o.status.success()
                && serde_json::from_slice::<Value>(&o.stdout).unwrap()["data"]["greeting"]
                    == "updated"
        },
    );
    let cm = fx.get(&["configmap", "shared"]);
    assert_eq!(cm["data"]["greeting"], "updated", "{cm}");
    fx.assert_healthy("configmap");
}

/// Attack 3: a compressed automerge change chunk (type 2) that inflates to 1 GiB
/// of zeros from about 1 MiB: refused without inflating it.
#[test]
fn compressed_change_chunks_are_refused() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    let chunk = compressed_change_chunk(1 << 30);
    assert!(chunk.len() < 2 << 20, "{} bytes", chunk.len());
    fx.rt.block_on(conn.send_entries(vec![entry(
        ATTACKER,
        &node_key(),
        PayloadKind::Change,
        chunk,
    )]));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["compressed"]);
    drop(conn);
    fx.assert_healthy("compressed");
}

/// Attack 4a: before any Hello, a frame header declaring the largest length
/// (32 MiB) followed by a trickle: the cloud closes without waiting for
/// (or buffering) the rest.
#[test]
fn a_huge_frame_before_hello_is_refused() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.connect());
    let len = u32::try_from(MAX_FRAME_BYTES).unwrap();
    let mut bytes = len.to_be_bytes().to_vec();
    bytes.extend_from_slice(&[0x0a; 64 << 10]);
    fx.rt.block_on(conn.send_raw(CONTROL, &bytes));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["hello"]);
    drop(conn);
    fx.assert_healthy("huge-first-frame");
}

/// Attack 4b: before any Hello, a 1 MiB frame that decodes into half a million
/// empty records.
#[test]
fn a_frame_of_empty_entries_before_hello_is_refused() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.connect());
    let body = frame_of_empty_records(1 << 20);
    fx.rt.block_on(conn.send_body(CONTROL, &body));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["hello"]);
    drop(conn);
    fx.assert_healthy("empty-entries");
}

/// Attack 5a: more unacknowledged records than the cloud's Hello granted (one
/// segment of window + 1 records, so no ack can come in between).
#[test]
fn exceeding_the_receive_window_closes_the_link() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    let window = conn.cloud_hello.as_ref().unwrap().window_records;
    assert!(window > 0);
    let entries = (0..=window)
        .map(|i| {
            entry(
                ATTACKER,
                &node_key(),
                PayloadKind::Event,
                format!("reading {i}").into_bytes(),
            )
        })
        .collect();
    fx.rt.block_on(conn.send_entries(entries));
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["window"]);
    drop(conn);
    fx.assert_healthy("window");
}

/// Attack 5b: an endless snapshot: chunks of a newer base with `last = false`,
/// 256 KiB each, until the cloud closes (at most the RSS cap and a bit).
#[test]
fn an_endless_snapshot_closes_the_link() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    let base = Cursor {
        epoch: conn.up.epoch + 1,
        seq: conn.up.seq + 1,
        hash: some_hash(7),
    };
    let chunk_bytes = 256 << 10;
    let max_chunks = u32::try_from((RSS_CAP_KIB << 10) / chunk_bytes + 256).unwrap();
    let sent = fx.rt.block_on(async {
        for i in 0..max_chunks {
            let key = format!("{}-{i}", node_key());
            let f = conn.snapshot(
                base,
                vec![object_snapshot(&key, usize::try_from(chunk_bytes).unwrap())],
                i,
                false,
            );
            if !conn.send(&f).await || conn.close_reason().is_some() {
                return i;
            }
        }
        max_chunks
    });
    eprintln!("sent {sent} snapshot chunks");
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    assert_reason(&reason, &["snapshot"]);
    drop(conn);
    fx.assert_healthy("snapshot-flood");
}

/// Attack 6a: once the cloud holds some of the node's up records, an empty
/// snapshot of `N/up` with a newer epoch and base: refused, and the
/// cloud's replica keeps every record.
#[test]
fn an_empty_snapshot_does_not_wipe_the_up_stream() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    let entries = (0..3)
        .map(|i| {
            entry(
                ATTACKER,
                &node_key(),
                PayloadKind::Event,
                format!("reading {i}").into_bytes(),
            )
        })
        .collect();
    fx.rt.block_on(conn.send_entries(entries));
    let held = fx.rt.block_on(conn.wait_ack(conn.up.seq));
    assert!(held.seq >= 3);
    let up = up_stream(ATTACKER);
    let before = fx.replay(&["-s", &up]);
    assert!(before.len() >= 3, "{before:?}");

    let base = Cursor {
        epoch: held.epoch + 1,
        seq: held.seq + 10,
        hash: some_hash(9),
    };
    let f = conn.snapshot(base, Vec::new(), 0, true);
    fx.rt.block_on(conn.send(&f));
    let reason = fx.rt.block_on(conn.closed_within(CLOSE_WITHIN));
    drop(conn);

    // The replica first (the more telling failure), then the reason.
    let after = fx.replay(&["-s", &up]);
    let hashes = |v: &[Value]| -> Vec<(u64, String)> {
        v.iter()
            .map(|r| (r["seq"].as_u64().unwrap(), r["hash"].to_string()))
            .collect()
    };
    let seqs = |v: &[Value]| -> Vec<u64> { v.iter().map(|r| r["seq"].as_u64().unwrap()).collect() };
    assert!(
        hashes(&after).starts_with(&hashes(&before)),
        "the cloud's replica of {up} lost records: seqs {:?} before, {:?} after",
        seqs(&before),
        seqs(&after)
    );
    let reason = reason.expect("the cloud did not close the connection");
    assert_reason(&reason, &["snapshot"]);
    fx.assert_healthy("empty-snapshot");
}

/// Attack 6b: records stamped with the largest HLC: the cloud's clock is not
/// pinned to the far future (such records may be accepted, clamped);
/// the next record the cloud writes carries a time near now.
#[test]
fn far_future_hlc_does_not_pin_the_cloud_clock() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    let seg = conn.segment(
        vec![entry(
            ATTACKER,
            &node_key(),
            PayloadKind::Event,
            b"from the end of time".to_vec(),
        )],
        u64::MAX,
    );
    fx.rt.block_on(conn.send(&Frame::Segment(seg)));
    // Accepted (clamped) or refused: either way, wait for the outcome.
    let up = up_stream(ATTACKER);
    let outcome = fx.rt.block_on(async {
        let start = std::time::Instant::now();
        while start.elapsed() < CLOSE_WITHIN {
            match conn.next_frame(Duration::from_secs(1)).await {
                Some(Frame::Ack { stream, cursor }) if stream == up => {
                    return format!("acked up to seq {}", cursor.seq);
                }
                _ => {
                    if let Some(r) = conn.close_reason() {
                        return format!("refused: {r}");
                    }
                }
            }
        }
        "neither acked nor refused".to_owned()
    });
    eprintln!("far-future record {outcome}");
    drop(conn);

    fx.apply("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: hlc-probe\ndata:\n  a: b\n");
    let now = now_ms();
    let records = fx.replay(&["-s", "cluster"]);
    let probe = records
        .iter()
        .rev()
        .find(|r| r["key"] == "configmaps/default/hlc-probe")
        .unwrap_or_else(|| panic!("no record of the probe in cluster: {records:?}"));
    let ms = probe["hlc"].as_u64().unwrap() >> 16;
    let skew = ms.abs_diff(now);
    assert!(
        skew < 10 * 60 * 1000,
        "the cloud's record is stamped {ms} ms since the epoch, {skew} ms from now: {probe}"
    );
    fx.assert_healthy("hlc");
}

/// Attack 7: hundreds of connections with the same certificate, each sending
/// Hello and never acking: each newer one replaces the older, at most one
/// stays open, and the bystander still catches up.
#[test]
fn a_connection_flood_of_one_node_keeps_one_connection() {
    let mut fx = Fixture::start();
    let n = 220;
    let conns = fx.rt.block_on(async {
        let mut conns = Vec::with_capacity(n);
        for _ in 0..n {
            let mut c = fx.attacker.connect().await;
            c.hello().await;
            conns.push(c);
        }
        conns
    });
    wait_for(
        "every connection but the newest closed",
        Duration::from_secs(120),
        || conns.iter().filter(|c| c.close_reason().is_none()).count() <= 1,
    );
    for (i, c) in conns.iter().enumerate().take(n - 1) {
        let reason = c.close_reason().unwrap();
        assert!(
            ["replaced", "newer connection"]
                .iter()
                .any(|k| reason.to_lowercase().contains(k)),
            "connection {i} closed with {reason:?}"
        );
    }
    let open = conns.iter().filter(|c| c.close_reason().is_none()).count();
    assert!(open <= 1, "{open} connections still open");
    fx.assert_healthy("flood");
    drop(conns);
}

/// Attack 8a: up records whose origin is not the node: an API user's name, and
/// another node's.
#[test]
fn records_with_a_foreign_origin_are_refused() {
    let mut fx = Fixture::start();
    for (i, origin) in ["user:keel-admin", BYSTANDER, "cloudcore"]
        .into_iter()
        .enumerate()
    {
        let mut conn = fx.rt.block_on(fx.attacker.establish());
        fx.rt.block_on(fx.attacker.wait_object(&node_key()));
        let mut mine = fx.attacker.objects();
        let change = mine
            .edit_merge_patch(
                &node_key(),
                &ActorId::from_name(ATTACKER),
                &json!({"status": {"phase": format!("spoofed-{i}")}}),
            )
            .unwrap()
            .unwrap();
        fx.rt.block_on(conn.send_entries(vec![entry(
            origin,
            &node_key(),
            PayloadKind::Change,
            change,
        )]));
        let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
        assert_reason(&reason, &["origin"]);
    }
    let node = fx.get(&["node", ATTACKER]);
    assert!(
        !node["status"]["phase"]
            .as_str()
            .is_some_and(|p| p.starts_with("spoofed")),
        "{node}"
    );
    let spoofed: Vec<Value> = fx
        .replay(&[])
        .into_iter()
        .filter(|r| {
            r["key"] == node_key()
                && ["user:keel-admin", BYSTANDER].contains(&r["origin"].as_str().unwrap_or(""))
        })
        .collect();
    assert!(
        spoofed.is_empty(),
        "records under a foreign name: {spoofed:?}"
    );
    fx.assert_healthy("origin");
}

/// Attack 8b: no node may be called `cloudcore`: no token is issued for that
/// name, or the join with it is refused.
#[test]
fn no_node_may_be_called_cloudcore() {
    let mut fx = Fixture::start();
    let via_cli = fx.keel(&["token", "create", "cloudcore"]);
    let via_file = Command::new(sibling("cloudcore"))
        .args(["token", "cloudcore", "--data-dir"])
        .arg(&fx.cloud.dir)
        .output()
        .unwrap();
    for (i, (how, o)) in [
        ("keel token create", &via_cli),
        ("cloudcore token", &via_file),
    ]
    .into_iter()
    .enumerate()
    {
        if !o.status.success() {
            continue;
        }
        // A token was issued: the join with it must be refused.
        let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        let joined = fx.rt.block_on(keel_edge::bootstrap::join(
            fx.cloud.bootstrap.parse().unwrap(),
            &token,
            "cloudcore",
            &fx.tmp.path().join(format!("as-cloudcore-{i}")),
        ));
        assert!(
            joined.is_err(),
            "{how} issued a token for `cloudcore` and the join with it succeeded"
        );
    }
    fx.assert_healthy("cloudcore-name");
}

/// Revocation: `keel node revoke` closes the node's live connection at
/// once, every later handshake with its certificate is refused, and the
/// other node is unaffected.
#[test]
fn a_revoked_node_is_cut_off_at_once_and_stays_out() {
    let mut fx = Fixture::start();
    let conn = fx.rt.block_on(fx.attacker.establish());
    let started = std::time::Instant::now();
    ok(
        fx.keel(&["node", "revoke", ATTACKER, "-o", "json"]),
        "keel node revoke",
    );
    let reason = fx.rt.block_on(conn.closed(CLOSE_WITHIN));
    let took = started.elapsed();
    eprintln!("the revoked node's connection closed {took:?} after `keel node revoke` started");
    assert_reason(&reason, &["revoked"]);
    for _ in 0..3 {
        let again = fx.rt.block_on(fx.attacker.try_handshake());
        match again {
            Err(why) => assert!(why.to_lowercase().contains("revoked"), "{why}"),
            Ok(_) => panic!("a revoked certificate completed a handshake and stayed connected"),
        }
    }
    fx.assert_healthy("revoked");
    assert!(fx.node_ready(BYSTANDER));
}

/// The bootstrap endpoint under a flood: 5,000 TLS connections that send a
/// join's headers and never finish the body (from 200 loopback source
/// addresses), and a flood of well-formed joins with unknown tokens. A real
/// node still joins and connects, and cloudcore still serves kubectl.
/// `KEEL_FLOOD_CONNECTIONS` changes the number of slow connections.
#[test]
fn slow_bodies_and_fake_joins_do_not_stop_real_joins_or_kubectl() {
    use tokio::io::AsyncWriteExt as _;
    let mut fx = Fixture::start();
    let flood: usize = std::env::var("KEEL_FLOOD_CONNECTIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let addr: std::net::SocketAddr = fx.cloud.bootstrap.parse().unwrap();
    let ca = std::fs::read_to_string(fx.cloud.dir.join("pki").join("ca.pem")).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    {
        use rustls::pki_types::pem::PemObject as _;
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(ca.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let tls = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let held = fx.rt.block_on(async {
        let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..flood {
            let src: std::net::IpAddr = format!("127.0.1.{}", i % 200 + 1).parse().unwrap();
            let (gate, tls) = (gate.clone(), tls.clone());
            tasks.spawn(async move {
                let _permit = gate.acquire_owned().await.unwrap();
                let socket = tokio::net::TcpSocket::new_v4().ok()?;
                socket.bind(std::net::SocketAddr::new(src, 0)).ok()?;
                let tcp = socket.connect(addr).await.ok()?;
                let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let mut s = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await
                    .ok()?;
                let head = format!(
                    "POST /v1/join HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: 4000\r\n\r\n{}",
                    " ".repeat(100)
                );
                s.write_all(head.as_bytes()).await.ok()?;
                s.flush().await.ok()?;
                Some(s)
            });
        }
        let mut held = Vec::new();
        while let Some(r) = tasks.join_next().await {
            if let Ok(Some(s)) = r {
                held.push(s);
            }
        }
        held
    });
    eprintln!(
        "{} of {flood} slow connections got through the TLS handshake",
        held.len()
    );

    // Fake joins: a real token's shape (so the client trusts the CA and
    // the server does the work) with a wrong secret, from one address.
    let real = fx.cloud.token("fake");
    let mut parts: Vec<String> = real.split('.').map(str::to_owned).collect();
    let secret = parts.len() - 2;
    parts[secret] = "0".repeat(parts[secret].len());
    let fake = parts.join(".");
    let body = json!({"token": fake, "node": "fake", "csr": "not a csr"}).to_string();
    let statuses = fx.rt.block_on(async {
        use tokio::io::AsyncReadExt as _;
        let mut statuses = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..500 {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let status = match tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
            {
                Ok(mut s) => {
                    let req = format!(
                        "POST /v1/join HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let mut answer = Vec::new();
                    let _ = s.write_all(req.as_bytes()).await;
                    let _ = tokio::time::timeout(
                        Duration::from_secs(30),
                        s.read_to_end(&mut answer),
                    )
                    .await;
                    String::from_utf8_lossy(&answer)
                        .split(' ')
                        .nth(1)
                        .unwrap_or("none")
                        .to_owned()
                }
                Err(_) => "tls-refused".to_owned(),
            };
            *statuses.entry(status).or_default() += 1;
        }
        statuses
    });
    eprintln!("fake joins answered: {statuses:?}");
    assert!(
        !statuses.contains_key("200"),
        "a fake join succeeded: {statuses:?}"
    );
    assert!(
        statuses.contains_key("429"),
        "fake joins were not rate-limited: {statuses:?}"
    );

    // A real node joins and connects while the slow connections are open.
    let late = Edge::start(
        &fx.tmp.path().join("latecomer"),
        "latecomer",
        &fx.cloud,
        Some(fx.cloud.token("latecomer")),
        None,
    );
    wait_for("the latecomer Ready", Duration::from_secs(120), || {
        fx.node_ready("latecomer")
    });
    fx.assert_healthy("bootstrap-flood");
    drop(held);
    drop(late);
}

/// What an honest node sends passes: its own status changes and event
/// records on any key (device readings, MQTT uploads under `upload/`),
/// acknowledged on the same connection.
#[test]
fn honest_records_and_events_are_acknowledged() {
    let mut fx = Fixture::start();
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    let first = conn.up.seq + 1;
    fx.rt.block_on(conn.send_entries(vec![
        entry(
            ATTACKER,
            "upload/line-1/counter",
            PayloadKind::Event,
            b"{\"n\":1}".to_vec(),
        ),
        entry(
            ATTACKER,
            "devices.devices.kubeedge.io/default/thermo",
            PayloadKind::Event,
            b"{\"t\":21}".to_vec(),
        ),
    ]));
    fx.rt.block_on(conn.wait_ack(first + 1));
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    drop(conn);
    fx.assert_healthy("honest");
}

/// A node that writes its pod's status as fast as its link lets it: each
/// change folds into the pod through the registry, whose queue of commits
/// waiting for durability holds the node back (through the window it was
/// granted) instead of growing. cloudcore stays under the memory cap and
/// the last status written is the pod's status on the cloud.
#[test]
fn a_flood_of_status_changes_is_paced_and_folded() {
    let mut fx = Fixture::start();
    let pod_key = "pods/default/busy";
    fx.apply(&pod_yaml("busy", ATTACKER, "", ""));
    let mut conn = fx.rt.block_on(fx.attacker.establish());
    fx.rt.block_on(fx.attacker.wait_object(pod_key));
    let mut own = fx.attacker.objects();
    let actor = ActorId::from_name(ATTACKER);
    let window = u64::from(conn.cloud_hello.as_ref().unwrap().window_records);
    let per_segment = 50u64.min(window);
    let first = conn.up.seq + 1;
    let total = 4000u64;
    let mut sent = 0u64;
    while sent < total {
        let entries = (sent..sent + per_segment)
            .map(|n| {
                let change = own
                    .edit_merge_patch(
                        pod_key,
                        &actor,
                        &json!({"status": {"phase": "Running", "message": format!("tick {n}")}}),
                    )
                    .unwrap()
                    .unwrap();
                entry(ATTACKER, pod_key, PayloadKind::Change, change)
            })
            .collect();
        assert!(fx.rt.block_on(conn.send_entries(entries)), "link closed");
        sent += per_segment;
        // Never more in flight than the window the cloud granted.
        if sent + per_segment > window {
            fx.rt
                .block_on(conn.wait_ack(first + sent + per_segment - window - 1));
        }
    }
    fx.rt.block_on(conn.wait_ack(first + total - 1));
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    let last = format!("tick {}", total - 1);
    wait_for(
        "the last status on the cloud",
        Duration::from_secs(60),
        || fx.get(&["pod", "busy"])["status"]["message"] == last.as_str(),
    );
    drop(conn);
    fx.assert_healthy("status-flood");
}
