//! A flood of MQTT QoS 1 publishes into a real edgecore, replicated to a
//! real cloudcore as node records: both processes stay under a memory
//! bound (the broker stops reading a client whose messages are not
//! durable yet; the link's window bounds the cloud), and every message
//! acknowledged is in the edge's log and reaches the cloud.
//!
//! `KEEL_FLOOD_MIB` sets the volume (default 192 MiB). Before the store
//! bounded fjall's memtables, 400 MiB took edgecore to 457 MiB and
//! cloudcore to 331 MiB; now both stay near 150 MiB whatever the volume.

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

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cluster::*;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish};

/// One flooding client: writes `count` QoS 1 publishes of `size` bytes as
/// fast as the socket takes them, while a thread counts the PUBACKs.
fn flood(addr: &str, id: usize, count: u16, size: usize, acked: Arc<AtomicU64>) {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut out = BytesMut::new();
    Packet::Connect(Connect::new(format!("flood-{id}")))
        .write(&mut out, 1 << 20)
        .unwrap();
    s.write_all(&out).unwrap();
    let mut rd = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = BytesMut::new();
        let mut chunk = vec![0u8; 64 * 1024];
        let mut acks = 0u16;
        while acks < count {
            match Packet::read(&mut buf, 1 << 20) {
                Ok(Packet::PubAck(_)) => {
                    acks += 1;
                    acked.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Ok(_) => continue,
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("client {id}: {e}"),
            }
            let n = rd.read(&mut chunk).unwrap();
            assert!(n > 0, "client {id}: the broker closed after {acks} acks");
            buf.extend_from_slice(&chunk[..n]);
        }
    });
    let payload = Bytes::from(vec![b'x'; size]);
    for pkid in 1..=count {
        out.clear();
        let mut p = Publish::new(
            format!("$hw/events/upload/flood/{id}"),
            QoS::AtLeastOnce,
            payload.clone(),
        );
        p.pkid = pkid;
        Packet::Publish(p).write(&mut out, 1 << 20).unwrap();
        s.write_all(&out).unwrap();
    }
    reader.join().unwrap();
}

fn http_get(addr: &str, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn mqtt_flood_stays_bounded() {
    let mib: usize = std::env::var("KEEL_FLOOD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(192);
    let tmp = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let cloud = Cloud::start_with(
        &tmp.path().join("cloud"),
        None,
        None,
        None,
        &["--metrics-addr", &metrics],
    );
    let node = "flooded";
    let edge = Edge::start(
        &tmp.path().join("edge"),
        node,
        &cloud,
        Some(cloud.token(node)),
        None,
    );
    let (edge_pid, cloud_pid) = (
        edge.proc.0.as_ref().unwrap().id(),
        cloud.proc.0.as_ref().unwrap().id(),
    );
    wait_for("the node to be Ready", Duration::from_secs(60), || {
        let o = cloud.k(&[
            "get",
            "node",
            node,
            "-o",
            "jsonpath={.status.conditions[0].status}",
        ]);
        String::from_utf8_lossy(&o.stdout) == "True"
    });
    let before = (proc_kib(edge_pid, "VmRSS"), proc_kib(cloud_pid, "VmRSS"));

    let clients = 8;
    let size = 32 * 1024;
    let count = u16::try_from(mib * 1024 * 1024 / size / clients).unwrap();
    let acked = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    // RSS sampled while the flood goes on.
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = (0, 0);
            while !done.load(Ordering::Relaxed) {
                peak.0 = peak.0.max(proc_kib(edge_pid, "VmRSS"));

                peak.1 = peak.1.max(proc_kib(cloud_pid, "VmRSS"));
                std::thread::sleep(Duration::from_millis(50));
            }
            peak
        })
    };
    let floods: Vec<_> = (0..clients)
        .map(|id| {
            let (addr, acked) = (edge.mqtt.clone(), acked.clone());
            std::thread::spawn(move || flood(&addr, id, count, size, acked))
        })
        .collect();
    for f in floods {
        f.join().unwrap();
    }
    let total = u64::from(count) * clients as u64;
    assert_eq!(acked.load(Ordering::Relaxed), total);
    // Every acknowledged message replicates to the cloud.
    let up = format!("{node}/up");
    wait_for(
        "the cloud to hold the flood",
        Duration::from_secs(300),
        || {
            // The cloud's metrics name how far each node's up stream is held.
            let text = http_get(&metrics, "/metrics");
            text.lines()
                .filter(|l| {
                    l.contains(&format!("stream=\"{up}\"")) && l.starts_with("keel_stream_head_seq")
                })
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .any(|head| head >= total)
        },
    );
    done.store(true, Ordering::Relaxed);
    let (edge_peak, cloud_peak) = sampler.join().unwrap();
    eprintln!(
        "flood of {mib} MiB ({total} QoS 1 publishes of {size} B over {clients} connections): edgecore RSS {} -> peak {} MiB, cloudcore {} -> peak {} MiB (VmHWM {} / {} MiB)",
        before.0 / 1024,
        edge_peak / 1024,
        before.1 / 1024,
        cloud_peak / 1024,
        proc_kib(edge_pid, "VmHWM") / 1024,
        proc_kib(cloud_pid, "VmHWM") / 1024,
    );
    // Generous: the queues and memtables allow far less.
    assert!(
        proc_kib(edge_pid, "VmHWM") < 256 * 1024,
        "edgecore peaked at {} MiB",
        proc_kib(edge_pid, "VmHWM") / 1024
    );
    assert!(
        proc_kib(cloud_pid, "VmHWM") < 384 * 1024,
        "cloudcore peaked at {} MiB",
        proc_kib(cloud_pid, "VmHWM") / 1024
    );
}
