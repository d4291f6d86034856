//! Deep checks of core objects against the Kubernetes types of
//! k8s-openapi (v1.37): an object must decode as its kind (a type error is
//! a 400, as the API server answers), and with strict field validation,
//! every field it carries must be one the type knows. Unknown fields are
//! found by decoding into the typed struct, encoding it again and listing
//! what did not survive.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Pod, Secret};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// Decodes `obj` as `kind`; returns the dotted paths of fields the type
/// does not know. `Err` is a decoding error. Kinds without a typed
/// definition here pass.
pub fn check(kind: &str, obj: &Value) -> Result<Vec<String>, String> {
    match kind {
        "Pod" => roundtrip::<Pod>(obj),
        "Node" => roundtrip::<Node>(obj),
        "Namespace" => roundtrip::<Namespace>(obj),
        "ConfigMap" => roundtrip::<ConfigMap>(obj),
        "Secret" => roundtrip::<Secret>(obj),
        "Event" => roundtrip::<Event>(obj),
        "Lease" => roundtrip::<Lease>(obj),
        "Device" => roundtrip::<keel_devices::Device>(obj),
        "DeviceModel" => roundtrip::<keel_devices::DeviceModel>(obj),
        _ => Ok(Vec::new()),
    }
}

fn roundtrip<T: DeserializeOwned + Serialize>(obj: &Value) -> Result<Vec<String>, String> {
    let typed: T = serde_json::from_value(obj.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    let mut unknown = Vec::new();
    diff(obj, &back, "", &mut unknown);
    Ok(unknown)
}

fn diff(input: &Value, back: &Value, path: &str, out: &mut Vec<String>) {
    match (input, back) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match b.get(k) {
                    Some(w) => diff(v, w, &p, out),
                    // null means "absent" to the typed decoder too.
                    None if v.is_null() => {}
                    None => out.push(p),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (v, w)) in a.iter().zip(b).enumerate() {
                diff(v, w, &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_unknown_nested_fields_and_type_errors() {
        let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "labels": {"a": "b"}},
            "spec": {"containers": [{"name": "c", "image": "i", "bogus": 1,
                "resources": {"limits": {"cpu": "100m"}}, "ports": [{"containerPort": 80}]}]},
            "status": {"phase": "Running"}});
        assert_eq!(check("Pod", &pod).unwrap(), ["spec.containers[0].bogus"]);
        let bad = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
            "spec": {"containers": [{"name": "c", "image": "i", "ports": [{"containerPort": "eighty"}]}]}});
        assert!(check("Pod", &bad).is_err());
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"},
            "type": "Opaque", "data": {"k": "c2VjcmV0"}, "stringData": {"x": "y"}});
        assert!(check("Secret", &secret).unwrap().is_empty());
        assert_eq!(
            check("Device", &json!({"anything": 1})).unwrap(),
            ["anything"]
        );
        let dev = json!({"apiVersion": "devices.kubeedge.io/v1beta1", "kind": "Device",
            "metadata": {"name": "d"}, "spec": {"deviceModelRef": {"name": "m"},
            "protocol": {"protocolName": "modbus", "configData": {"ip": "127.0.0.1", "any": {"x": 1}}},
            "properties": [{"name": "t", "visitors": {"protocolName": "modbus", "configData": {"register": "InputRegister"}}, "bogus": 1}]},
            "status": {"twins": [{"propertyName": "t", "reported": {"value": "1"}}], "anything": true}});
        assert_eq!(check("Device", &dev).unwrap(), ["spec.properties[0].bogus"]);
    }
}
