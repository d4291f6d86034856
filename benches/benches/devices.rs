//! Devices, against real peers:
//!
//! - MQTT → log ingest rate on the edge: Debian's `mosquitto_pub` sends
//!   `KEEL_MQTT_MESSAGES` (default 20,000) QoS 1 messages on
//!   `$ke/events/device/default/meter/data/update` to edgecore's event bus
//!   (in this process: MetaManager on a fresh keel-log store, EventBus,
//!   DeviceTwin); each is recorded in `up` and acknowledged only once
//!   fsync'd. Messages/s = messages / time until mosquitto_pub has every
//!   PUBACK and exits. Three runs, each reported.
//! - Twin round trip: `kubectl patch`-equivalent JSON patch of a desired
//!   value through the kube client on the cloud → the release cloudcore →
//!   the release edgecore → the Modbus register written on a pymodbus
//!   server (read back by the mapper) → reported value seen by a watch on
//!   the cloud; p50/p99 over `KEEL_TWIN_ROUNDS` (default 200) patches.
//!
//! `cargo build --release --bins && cargo bench -p keel-benches --bench devices`

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    missing_docs
)]

#[path = "../../edge/tests/support/devices.rs"]
mod peers;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use keel_devices::Device;
use keel_edge::devicetwin::DeviceTwin;
use keel_edge::eventbus::EventBus;
use keel_edge::meta::MetaManager;
use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};

use keel_benches::port;

fn ingest(n: usize) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store =
        keel_log::Store::open(dir.path().join("log"), keel_log::StoreOptions::default()).unwrap();
    let (bus, meta) = rt.block_on(async {
        let meta = MetaManager::open(store.clone(), "edge-1").unwrap();
        let bus = EventBus::bind("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        DeviceTwin::start(meta.clone(), bus.clone());
        (bus, meta)
    });
    let line = r#"{"event_id":"","timestamp":1700000000000,"data":{"power":{"value":"1.5","metadata":{"timestamp":1700000000000,"type":"float"}}}}"#;
    let mut input = String::with_capacity(n * (line.len() + 1));
    for _ in 0..n {
        input.push_str(line);
        input.push('\n');
    }
    for run in 1..=3 {
        let before = store.info("edge-1/up").map(|i| i.head.seq).unwrap_or(0);
        let t = Instant::now();
        peers::mqtt_pub_lines(
            &bus.addr().to_string(),
            "$ke/events/device/default/meter/data/update",
            &input,
        );
        let secs = t.elapsed().as_secs_f64();
        let after = store.info("edge-1/up").unwrap().head.seq;
        assert_eq!(
            after - before,
            n as u64,
            "every acknowledged message is in the log"
        );
        eprintln!(
            "MQTT -> log ingest (QoS 1, acked after fsync), run {run}: {n} messages in {:.2} s = {:.0} msg/s",
            secs,
            n as f64 / secs
        );
    }
    drop(meta);
}

fn round_trip(rounds: usize) {
    let dir = tempfile::tempdir().unwrap();
    let mut modbus = peers::ModbusDevice::start(port(false), 1000);
    let cluster = keel_benches::Cluster::start(dir.path());
    let kubeconfig = cluster.kubeconfig.clone();
    let docs: Vec<serde_json::Value> = serde_yaml_docs(
        &include_str!("../../examples/devices/thermostat.yaml")
            .replace("port: 5020", &format!("port: {}", modbus.port)),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let lat = rt.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let kc = Kubeconfig::read_from(&kubeconfig).unwrap();
        let cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .unwrap();
        let client = kube::Client::try_from(cfg).unwrap();
        let models: Api<keel_devices::DeviceModel> = Api::namespaced(client.clone(), "default");
        let devices: Api<Device> = Api::namespaced(client, "default");
        let pp = kube::api::PostParams::default();
        models
            .create(&pp, &serde_json::from_value(docs[0].clone()).unwrap())
            .await
            .unwrap();
        devices
            .create(&pp, &serde_json::from_value(docs[1].clone()).unwrap())
            .await
            .unwrap();
        let reported = |d: &Device, prop: &str| -> Option<String> {
            d.twin(prop)?.reported.as_ref().map(|r| r.value.clone())
        };
        let start = Instant::now();
        loop {
            let d = devices.get("thermostat").await.unwrap();
            if reported(&d, "setpoint").as_deref() == Some("21") {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "the device never came up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let seen: Arc<Mutex<Option<(String, Instant)>>> = Arc::default();
        let notify = Arc::new(tokio::sync::Notify::new());
        let rv = devices
            .list(&ListParams::default())
            .await
            .unwrap()
            .metadata
            .resource_version
            .unwrap();
        {
            let (devices, seen, notify) = (devices.clone(), seen.clone(), notify.clone());
            tokio::spawn(async move {
                let mut w = devices
                    .watch(&WatchParams::default(), &rv)
                    .await
                    .unwrap()
                    .boxed();
                while let Some(ev) = w.next().await {
                    if let Ok(WatchEvent::Modified(d)) = ev
                        && let Some(v) = reported(&d, "setpoint")
                    {
                        let mut s = seen.lock().unwrap();
                        if s.as_ref().is_none_or(|(old, _)| *old != v) {
                            *s = Some((v, Instant::now()));
                        }
                        notify.notify_waiters();
                    }
                }
            });
        }
        let mut lat = Vec::new();
        for i in 0..rounds {
            let value = (10 + (i % 20)).to_string();
            let patch = serde_json::json!([{"op": "replace",
                "path": "/spec/properties/2/desired/value", "value": value}]);
            let t = Instant::now();
            devices
                .patch(
                    "thermostat",
                    &PatchParams::default(),
                    &Patch::<()>::Json(serde_json::from_value(patch).unwrap()),
                )
                .await
                .unwrap();
            loop {
                let wait = notify.notified();
                if let Some((v, at)) = seen.lock().unwrap().as_ref()
                    && *v == value
                {
                    lat.push(at.duration_since(t));
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "setpoint {value} never reported"
                );
                let _ = tokio::time::timeout(Duration::from_millis(50), wait).await;
            }
        }
        lat
    });
    assert_eq!(modbus.get("hr", 0), (10 + ((rounds - 1) % 20)) as i64);
    let mut lat = lat;
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    eprintln!(
        "twin round trip (patch desired -> Modbus register written -> reported seen on the cloud), {rounds} rounds: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        lat.last().unwrap().as_secs_f64() * 1e3
    );
}

fn serde_yaml_docs(text: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn main() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    ingest(env("KEEL_MQTT_MESSAGES", 20_000).max(100));
    round_trip(env("KEEL_TWIN_ROUNDS", 200).max(10));
}
