//! Devices end to end, with real peers: a cloudcore and an edgecore
//! (their own processes), a pymodbus Modbus TCP server as the device,
//! Debian's mosquitto_pub / mosquitto_sub on edgecore's event bus, and the
//! real kubectl on the cloud. The cloud is SIGKILLed mid-stream and every
//! reading taken during the outage must reach it, in order.
//!
//! `KEEL_OUTAGE_SECS` sets the outage (default 8 s; the closing figure is
//! measured with 60).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/devices.rs"]
mod devices;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cluster::*;
use devices::*;
use serde_json::Value;

fn device(cloud: &Cloud, name: &str) -> Value {
    serde_json::from_str(&ok(
        cloud.k(&["get", "device", name, "-o", "json"]),
        "get device",
    ))
    .unwrap()
}

fn twin<'a>(d: &'a Value, prop: &str) -> Option<&'a Value> {
    d["status"]["twins"]
        .as_array()?
        .iter()
        .find(|t| t["propertyName"] == prop)
}

fn reported(d: &Value, prop: &str) -> Option<String> {
    twin(d, prop)?["reported"]["value"]
        .as_str()
        .map(str::to_owned)
}

/// `kubectl patch` of the thermostat's desired setpoint (its third
/// property).
fn patch_setpoint(cloud: &Cloud, value: &str) {
    let patch = format!(
        r#"[{{"op": "replace", "path": "/spec/properties/2/desired/value", "value": "{value}"}}]"#
    );
    ok(
        cloud.k(&["patch", "device", "thermostat", "--type=json", "-p", &patch]),
        "patch desired",
    );
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// (timestamp, value) of every `counter` reading recorded in `node/up`.
fn counter_readings(log: &Path, node: &str, key: &str) -> (Vec<(i64, i64)>, keel_log::Cursor) {
    let store = keel_log::Store::open(log, keel_log::StoreOptions::default()).unwrap();
    let stream = format!("{node}/up");
    let head = store.info(&stream).unwrap().head;
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let read = store
            .read(&stream, after, keel_log::ReadLimits::default())
            .unwrap();
        let keel_log::Read::Records(seg) = read else {
            panic!("{stream} was compacted during the test");
        };
        if seg.records.is_empty() {
            break;
        }
        for r in &seg.records {
            after = r.seq;
            if r.kind == keel_log::PayloadKind::Event && r.key == key {
                let v: Value = serde_json::from_slice(&r.payload).unwrap();
                if v["property"] == "counter" {
                    out.push((
                        v["timestamp"].as_i64().unwrap(),
                        v["value"].as_str().unwrap().parse().unwrap(),
                    ));
                }
            }
        }
    }
    (out, head)
}

const METER: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: meter-model}
spec:
  protocol: vendor-mqtt
  properties:
    - {name: power, type: FLOAT, accessMode: ReadOnly, unit: kW}
    - {name: relay, type: BOOLEAN, accessMode: ReadWrite}
---
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: meter}
spec:
  deviceModelRef: {name: meter-model}
  nodeName: edge-1
  protocol: {protocolName: vendor-mqtt}
  properties:
    - {name: power}
    - {name: relay, desired: {value: "false"}}
"#;

#[test]
fn devices_from_kubectl_to_modbus_and_back_through_an_outage() {
    let outage = Duration::from_secs(
        std::env::var("KEEL_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(8),
    );
    let tmp = tempfile::tempdir().unwrap();
    eprintln!("state and logs in {}", tmp.path().display());
    let mut modbus = ModbusDevice::start(free_port(), 100);
    modbus.set("ir", 0, 215); // 21.5 °C
    let cloud = Cloud::start(&tmp.path().join("cloud"), None, None, None);
    let mut edge = Edge::start(
        &tmp.path().join("edge-1"),
        "edge-1",
        &cloud,
        Some(cloud.token("edge-1")),
        None,
    );
    let yaml = include_str!("../../examples/devices/thermostat.yaml")
        .replace("port: 5020", &format!("port: {}", modbus.port));
    let apply = |y: &str| {
        ok(
            kubectl(
                &cloud.kubeconfig(),
                &tmp.path().join("kube-cache"),
                &["apply", "-f", "-"],
                Some(y),
            ),
            "kubectl apply",
        )
    };
    apply(&yaml);
    apply(METER);

    // Readings reach the cloud; the initial desired setpoint reaches the
    // device.
    wait_for(
        "reported temperature on the cloud",
        Duration::from_secs(60),
        || {
            let d = device(&cloud, "thermostat");
            reported(&d, "temperature").as_deref() == Some("21.5")
                && d["status"]["state"] == "online"
        },
    );
    wait_for(
        "the desired setpoint in the register",
        Duration::from_secs(30),
        || modbus.get("hr", 0) == 21,
    );
    wait_for("setpoint reported", Duration::from_secs(30), || {
        let d = device(&cloud, "thermostat");
        reported(&d, "setpoint").as_deref() == Some("21")
            && twin(&d, "setpoint").unwrap()["observedDesired"]["value"] == "21"
    });
    let table = ok(cloud.k(&["get", "devices"]), "get devices");
    assert!(
        table.contains("thermostat") && table.contains("thermostat-model"),
        "{table}"
    );

    // kubectl patch desired → register written → reported on the cloud; a
    // mapper outside edgecore would see the delta on the bus.
    let delta = MqttSub::start(
        &edge.mqtt,
        "$hw/events/device/default/thermostat/twin/update/delta",
    );
    let data = MqttSub::start(
        &edge.mqtt,
        "$ke/events/device/default/thermostat/data/update",
    );
    patch_setpoint(&cloud, "25");
    wait_for(
        "setpoint 25 in the register",
        Duration::from_secs(30),
        || modbus.get("hr", 0) == 25,
    );
    wait_for("setpoint 25 reported", Duration::from_secs(30), || {
        reported(&device(&cloud, "thermostat"), "setpoint").as_deref() == Some("25")
    });
    delta.expect(Duration::from_secs(10), "with the setpoint delta", |l| {
        l.contains(r#""delta":{"setpoint":"25"}"#)
    });
    data.expect(Duration::from_secs(10), "with a temperature reading", |l| {
        l.contains(r#""temperature":{"#) && l.contains(r#""value":"21.5""#)
    });

    // The device goes away (offline on the cloud) and comes back blank on
    // the same address: the mapper reconnects and writes the desired
    // value again.
    let port = modbus.port;
    modbus.kill();
    wait_for(
        "the device offline on the cloud",
        Duration::from_secs(30),
        || device(&cloud, "thermostat")["status"]["state"] == "offline",
    );
    modbus = ModbusDevice::start(port, 100);
    modbus.set("ir", 0, 215);
    wait_for(
        "the setpoint written again after reconnect",
        Duration::from_secs(30),
        || modbus.get("hr", 0) == 25,
    );
    wait_for(
        "the device online on the cloud",
        Duration::from_secs(30),
        || device(&cloud, "thermostat")["status"]["state"] == "online",
    );

    // A desired value beyond the model's maximum is refused with a reason
    // kubectl shows; the register keeps its value.
    patch_setpoint(&cloud, "99");
    wait_for("the refusal on the cloud", Duration::from_secs(30), || {
        let d = device(&cloud, "thermostat");
        let t = twin(&d, "setpoint").unwrap();
        t["observedDesired"]["value"] == "99"
            && t["observedDesired"]["metadata"]["error"]
                .as_str()
                .is_some_and(|e| e.contains("maximum"))
    });
    assert_eq!(modbus.get("hr", 0), 25);

    // The local rule: temperature above 30 switches the fan coil on.
    assert_eq!(modbus.get("co", 0), 0);
    modbus.set("ir", 0, 352);
    wait_for("the fan coil on", Duration::from_secs(30), || {
        modbus.get("co", 0) == 1
    });
    wait_for("fan reported on the cloud", Duration::from_secs(30), || {
        reported(&device(&cloud, "thermostat"), "fan").as_deref() == Some("true")
    });

    // A mapper outside edgecore: twin updates over MQTT (QoS 1) become
    // reported values; twin/get answers with the twin; an unknown device
    // gets a 404 result.
    let results = MqttSub::start(&edge.mqtt, "$hw/events/device/+/+/twin/+/result");
    mqtt_pub(
        &edge.mqtt,
        "$hw/events/device/default/meter/twin/update",
        r#"{"event_id":"e1","timestamp":1700000000000,"twin":{"power":{"actual":{"value":"1.5"},"metadata":{"type":"float"}}}}"#,
    );
    wait_for(
        "power reported on the cloud",
        Duration::from_secs(30),
        || reported(&device(&cloud, "meter"), "power").as_deref() == Some("1.5"),
    );
    mqtt_pub(
        &edge.mqtt,
        "$hw/events/device/default/meter/twin/get",
        r#"{"event_id":"g1"}"#,
    );
    results.expect(Duration::from_secs(10), "twin/get/result", |l| {
        l.starts_with("$hw/events/device/default/meter/twin/get/result")
            && l.contains(r#""event_id":"g1""#)
            && l.contains(r#""power":{"actual":{"value":"1.5""#)
    });
    mqtt_pub(
        &edge.mqtt,
        "$hw/events/device/default/nosuch/twin/update",
        r#"{"twin":{}}"#,
    );
    results.expect(
        Duration::from_secs(10),
        "a 404 for an unknown device",
        |l| {
            l.starts_with("$hw/events/device/default/nosuch/twin/update/result")
                && l.contains(r#""code":404"#)
        },
    );
    // The meter's desired relay value went out as a delta and counts as
    // observed once published.
    wait_for("relay observedDesired", Duration::from_secs(30), || {
        twin(&device(&cloud, "meter"), "relay")
            .is_some_and(|t| t["observedDesired"]["value"] == "false")
    });
    drop((delta, data, results));

    // Outage: cloudcore SIGKILLed mid-stream. The edge keeps reading the
    // device (its own API shows it) and records every reading.
    let killed_at = now_ms();
    let (api, hub, bootstrap, dir) = (
        cloud.api.clone(),
        cloud.hub.clone(),
        cloud.bootstrap.clone(),
        cloud.dir.clone(),
    );
    drop(cloud);
    let edge_counter = |edge: &Edge| -> i64 {
        let o = edge.k(&["get", "device", "thermostat", "-o", "json"]);
        let d: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        reported(&d, "counter")
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    let c0 = edge_counter(&edge);
    std::thread::sleep(outage);
    let c1 = edge_counter(&edge);
    assert!(
        c1 > c0,
        "the edge kept reading while the cloud was down ({c0} → {c1})"
    );
    let back_at = now_ms();
    let cloud = Cloud::start(&dir, Some(api), Some(hub), Some(bootstrap));
    // The device goes away: the last record is its offline state.
    modbus.kill();
    wait_for(
        "the offline state on the edge",
        Duration::from_secs(30),
        || {
            let o = edge.k(&["get", "device", "thermostat", "-o", "json"]);
            serde_json::from_slice::<Value>(&o.stdout)
                .is_ok_and(|d| d["status"]["state"] == "offline")
        },
    );
    // Usually at once: the restarted cloudcore resets the old connection.
    // An edge that sent nothing large since the SIGKILL only notices at
    // QUIC's 90 s idle timeout, then reconnects with back-off.
    wait_for("the cloud to catch up", Duration::from_secs(200), || {
        let e: Value = serde_json::from_slice(
            &edge
                .k(&["get", "device", "thermostat", "-o", "json"])
                .stdout,
        )
        .unwrap();
        device(&cloud, "thermostat")["status"] == e["status"]
    });
    edge.proc.stop();
    let mut cloud = cloud;
    cloud.proc.kill9();
    let key = "devices.devices.kubeedge.io/default/thermostat";
    let (at_edge, edge_head) =
        counter_readings(&tmp.path().join("edge-1").join("log"), "edge-1", key);
    let (at_cloud, cloud_head) = counter_readings(&dir.join("log"), "edge-1", key);
    assert_eq!(
        edge_head, cloud_head,
        "the cloud's replica of edge-1/up is the edge's stream"
    );
    assert_eq!(
        at_edge, at_cloud,
        "every reading reached the cloud, in order"
    );
    // In time order; the counter only grows within one run of the device
    // (it restarted once, before the outage).
    assert!(
        at_cloud.windows(2).all(|w| w[0].0 <= w[1].0),
        "readings in time order"
    );
    let since_outage: Vec<_> = at_cloud.iter().filter(|(t, _)| *t >= killed_at).collect();
    assert!(
        since_outage.windows(2).all(|w| w[0].1 <= w[1].1),
        "the counter in order: {since_outage:?}"
    );
    let during = |v: &[(i64, i64)]| {
        v.iter()
            .filter(|(t, _)| *t >= killed_at && *t < back_at)
            .count()
    };
    let (taken, arrived) = (during(&at_edge), during(&at_cloud));
    assert!(taken > 0);
    eprintln!(
        "outage of {} s: {taken} counter readings taken at the edge, {arrived} reached the cloud, {} lost",
        outage.as_secs(),
        taken - arrived
    );
}

/// The event bus with the real mosquitto_pub: every QoS 1 message it
/// acknowledged is in the log when mosquitto_pub exits; garbage closes
/// only its own connection.
#[test]
fn event_bus_acks_only_what_is_recorded() {
    use std::io::{Read as _, Write as _};
    let tmp = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store =
        keel_log::Store::open(tmp.path().join("log"), keel_log::StoreOptions::default()).unwrap();
    let bus = rt.block_on(async {
        let meta = keel_edge::meta::MetaManager::open(store.clone(), "edge-1").unwrap();
        let bus = keel_edge::eventbus::EventBus::bind("127.0.0.1:0".parse().unwrap(), None)
            .await
            .unwrap();
        keel_edge::devicetwin::DeviceTwin::start(meta, bus.clone());
        bus
    });
    let addr = bus.addr().to_string();

    // Garbage instead of CONNECT: that connection is closed.
    let mut raw = std::net::TcpStream::connect(&addr).unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(&[b"GET / HTTP/1.1\r\n".as_slice(), &[b'x'; 128]].concat())
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        raw.read(&mut buf).unwrap_or(0),
        0,
        "garbage must close the connection"
    );

    let n = 500;
    let lines: String = (0..n).map(|i| format!("{{\"seq\":{i}}}\n")).collect();
    mqtt_pub_lines(&addr, "$ke/events/device/default/meter/data/update", &lines);
    // mosquitto_pub has every PUBACK: every message is durable in `up`.
    let head = store.info("edge-1/up").unwrap().head.seq;
    assert_eq!(head, n, "acknowledged messages in the log");
    let keel_log::Read::Records(seg) = store
        .read(
            "edge-1/up",
            0,
            keel_log::ReadLimits {
                max_records: 1000,
                max_bytes: 1 << 24,
            },
        )
        .unwrap()
    else {
        panic!("not compacted")
    };
    for (i, r) in seg.records.iter().enumerate() {
        assert_eq!(r.kind, keel_log::PayloadKind::Event);
        assert_eq!(r.key, "devices.devices.kubeedge.io/default/meter");
        let v: Value = serde_json::from_slice(&r.payload).unwrap();
        assert_eq!(v["payload"]["seq"], i as u64, "in publish order");
    }
    drop(rt);
}
