//! Device and DeviceModel YAML in KubeEdge's v1beta1 layout decodes into
//! keel's types and encodes back to the same JSON (nothing dropped, nothing
//! added), and the Modbus mapper plans the example device.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, clippy::panic)]

use keel_devices::mapper::modbus::{self, Register};
use keel_devices::types::{AccessMode, DataType};
use keel_devices::{Device, DeviceModel};
use serde_json::Value;

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// Every field KubeEdge's v1beta1 Device schema defines, with some values
/// in the open (`x-kubernetes-preserve-unknown-fields`) parts.
const FULL_DEVICE: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: Device
metadata: {name: full, namespace: plant, labels: {a: b}}
spec:
  deviceModelRef: {name: m}
  nodeName: edge-9
  methods:
    - name: reset
      description: resets the device
      propertyNames: [temperature]
  protocol:
    protocolName: modbus
    configData: {ip: 10.0.0.5, port: 502, slaveID: 3, vendorKey: {nested: [1, 2]}}
  stateReport: {reportCycle: 5000, reportToCloud: true}
  properties:
    - name: temperature
      collectCycle: 1000
      reportCycle: 2000
      reportToCloud: false
      desired: {value: "20", metadata: {source: ui}}
      visitors:
        protocolName: modbus
        configData: {register: HoldingRegister, offset: 2, limit: 1, scale: 0.5, isSwap: true, isRegisterSwap: false}
      pushMethod:
        mqtt: {address: "tcp://127.0.0.1:1883", topic: t, qos: 1, retained: false}
        http: {hostName: h, port: 80, requestPath: /p, timeout: 5}
        otel: {endpointURL: "http://localhost:4318/v1/metrics"}
        anomalyDetection: {anything: true}
        dbMethod:
          influxdb2:
            influxdb2ClientConfig: {url: u, org: o, bucket: b}
            influxdb2DataConfig: {measurement: m, tag: {k: v}, fieldKey: f}
          redis: {redisClientConfig: {addr: a, db: 0, poolsize: 4, minIdleConns: 1}}
          TDEngine: {TDEngineClientConfig: {addr: a, dbName: d}}
          mysql: {mysqlClientConfig: {addr: a, database: d, userName: u}}
status:
  reportCycle: 5000
  reportToCloud: true
  state: online
  lastOnlineTime: "2026-01-01T00:00:00Z"
  twins:
    - propertyName: temperature
      reported: {value: "21.5", metadata: {timestamp: "1700000000000", type: float}}
      observedDesired: {value: "20", metadata: {timestamp: "1700000000000"}}
  extensions: {vendor: x}
"#;

const FULL_MODEL: &str = r#"
apiVersion: devices.kubeedge.io/v1beta1
kind: DeviceModel
metadata: {name: m, namespace: plant}
spec:
  protocol: modbus
  protocolConfigData: {ip: 10.0.0.5, port: 502}
  properties:
    - {name: temperature, description: d, type: DOUBLE, accessMode: ReadWrite, minimum: "0", maximum: "100", unit: C,
       visitors: {protocolName: modbus, configData: {register: InputRegister, offset: 0}}}
    - {name: label, type: STRING, accessMode: ReadOnly}
    - {name: blob, type: BYTES, accessMode: ReadOnly}
    - {name: frames, type: STREAM, accessMode: ReadOnly}
"#;

#[test]
fn kubeedge_v1beta1_yaml_roundtrips_unchanged() {
    let example = include_str!("../../examples/devices/thermostat.yaml");
    let mut all = docs(example);
    all.extend(docs(FULL_DEVICE));
    all.extend(docs(FULL_MODEL));
    assert_eq!(all.len(), 4);
    for doc in all {
        let back = match doc["kind"].as_str().unwrap() {
            "Device" => {
                serde_json::to_value(serde_json::from_value::<Device>(doc.clone()).unwrap())
                    .unwrap()
            }
            "DeviceModel" => {
                serde_json::to_value(serde_json::from_value::<DeviceModel>(doc.clone()).unwrap())
                    .unwrap()
            }
            k => panic!("unexpected kind {k}"),
        };
        assert_eq!(back, doc);
    }
}

#[test]
fn example_device_plans_for_the_modbus_mapper() {
    let all = docs(include_str!("../../examples/devices/thermostat.yaml"));
    let model: DeviceModel = serde_json::from_value(all[0].clone()).unwrap();
    let device: Device = serde_json::from_value(all[1].clone()).unwrap();
    let plan = modbus::plan(&device, &model).unwrap();
    assert_eq!(plan.connection.addr.to_string(), "127.0.0.1:5020");
    assert_eq!(plan.connection.slave, 1);
    let t = &plan.properties[0];
    assert_eq!(
        (t.name.as_str(), t.data_type),
        ("temperature", DataType::Float)
    );
    assert_eq!(t.access.register, Register::Input);
    assert!((t.access.scale - 0.1).abs() < 1e-12);
    assert_eq!(t.collect.as_millis(), 500);
    let sp = plan
        .properties
        .iter()
        .find(|p| p.name == "setpoint")
        .unwrap();
    assert_eq!(sp.model.access_mode, Some(AccessMode::ReadWrite));
    assert!(sp.writable());
    // A device whose model lacks a property is refused with its name.
    let mut bad = device.clone();
    bad.spec.properties[0].name = "humidity".into();
    let e = modbus::plan(&bad, &model).unwrap_err().to_string();
    assert!(e.contains("humidity"), "{e}");
    // Bad connection data is named.
    let mut bad = device;
    bad.spec
        .protocol
        .as_mut()
        .unwrap()
        .config_data
        .as_mut()
        .unwrap()
        .insert("port".into(), serde_json::json!(70000));
    let e = modbus::plan(&bad, &model).unwrap_err().to_string();
    assert!(e.contains("port"), "{e}");
}
