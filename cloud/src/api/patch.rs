//! The patch formats kubectl sends: JSON merge patch (RFC 7386), JSON
//! patch (RFC 6902, by the `json-patch` crate) and Kubernetes' strategic
//! merge patch for the core types.
//!
//! Strategic merge here knows the merge keys of the lists kubectl patches
//! in core objects (containers by `name`, volume mounts by `mountPath`,
//! ...) and the directives kubectl emits: `$setElementOrder/<list>`,
//! `$patch: replace|delete|merge`, `$retainKeys` and
//! `$deleteFromPrimitiveList/<list>`. Lists without a known merge key are
//! replaced, as Kubernetes does for lists with no patch strategy.

use serde_json::{Map, Value};

/// RFC 7386 merge patch: the one the CRDT store's merge-patch edits use
/// (serde_json's parser bounds the nesting depth of API bodies).
pub use keel_sync::crdt::merge_patch;

/// RFC 6902 JSON patch; the error says which operation failed.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let ops: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| format!("invalid JSON patch: {e}"))?;
    json_patch::patch(target, &ops).map_err(|e| e.to_string())
}

/// Merge key of a list field in core objects, by field name.
fn merge_key(field: &str) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => "containerPort",
        "conditions" | "addresses" => "type",
        "hostAliases" => "ip",
        "taints" => "key",
        "containerStatuses" | "initContainerStatuses" => "name",
        _ => return None,
    })
}

/// Applies a strategic merge patch to `target`.
pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(p) = patch else {
        return Err("a strategic merge patch must be a JSON object".into());
    };
    match p.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut m = p.clone();
            m.remove("$patch");
            *target = Value::Object(m);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Null;
            return Ok(());
        }
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown $patch directive {other:?}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        return Ok(());
    };
    if let Some(keep) = p.get("$retainKeys") {
        let keep: Vec<&str> = keep
            .as_array()
            .ok_or("$retainKeys must be a list")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        t.retain(|k, _| keep.contains(&k.as_str()) || p.contains_key(k));
    }
    let mut orders: Vec<(&str, &Vec<Value>)> = Vec::new();
    for (k, v) in p {
        if let Some(field) = k.strip_prefix("$setElementOrder/") {
            orders.push((
                field,
                v.as_array().ok_or("$setElementOrder must be a list")?,
            ));
            continue;
        }
        if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/") {
            let drop = v
                .as_array()
                .ok_or("$deleteFromPrimitiveList must be a list")?;
            if let Some(Value::Array(list)) = t.get_mut(field) {
                list.retain(|x| !drop.contains(x));
            }
            continue;
        }
        if k.starts_with('$') {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        match (v, merge_key(k)) {
            (Value::Object(_), _) => {
                let slot = t.entry(k.clone()).or_insert(Value::Null);
                strategic_merge(slot, v)?;
                if slot.is_null() {
                    t.remove(k);
                }
            }
            (Value::Array(items), Some(key)) if items.iter().all(Value::is_object) => {
                let slot = t.entry(k.clone()).or_insert(Value::Array(Vec::new()));
                merge_list(slot, items, key)?;
            }
            _ => {
                t.insert(k.clone(), v.clone());
            }
        }
    }
    for (field, order) in orders {
        let (Some(key), Some(Value::Array(list))) = (merge_key(field), t.get_mut(field)) else {
            continue;
        };
        let pos = |item: &Value| {
            order
                .iter()
                .position(|o| o.get(key).is_some() && o.get(key) == item.get(key))
                .unwrap_or(usize::MAX)
        };
        list.sort_by_key(pos);
    }
    Ok(())
}

fn merge_list(target: &mut Value, items: &[Value], key: &str) -> Result<(), String> {
    if items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"))
    {
        *target = Value::Array(
            items
                .iter()
                .filter(|i| i.get("$patch").is_none())
                .cloned()
                .collect(),
        );
        return Ok(());
    }
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let Value::Array(list) = target else {
        return Ok(());
    };
    for item in items {
        let id = item.get(key);
        let at = id.and_then(|id| list.iter().position(|x| x.get(key) == Some(id)));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = at {
                list.remove(i);
            }
            continue;
        }
        match at.and_then(|i| list.get_mut(i)) {
            Some(existing) => strategic_merge(existing, item)?,
            None => {
                let mut fresh = Value::Null;
                strategic_merge(&mut fresh, item)?;
                list.push(fresh);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut t = json!({"a": "b", "c": {"d": "e", "f": "g"}});
        merge_patch(&mut t, &json!({"a": "z", "c": {"f": null}}));
        assert_eq!(t, json!({"a": "z", "c": {"d": "e"}}));
    }

    #[test]
    fn strategic_merges_containers_by_name_and_orders_them() {
        let mut pod = json!({"metadata": {"labels": {"app": "web", "x": "1"}},
            "spec": {"containers": [
                {"name": "c1", "image": "nginx:1.25", "ports": [{"containerPort": 80}]},
                {"name": "c2", "image": "redis"}]}});
        let patch = json!({"metadata": {"labels": {"app": null, "tier": "x"}},
            "spec": {"$setElementOrder/containers": [{"name": "c0"}, {"name": "c1"}],
                "containers": [{"name": "c0", "image": "busybox"}, {"name": "c1", "image": "nginx:1.26"},
                    {"name": "c2", "$patch": "delete"}]}});
        strategic_merge(&mut pod, &patch).unwrap();
        assert_eq!(
            pod,
            json!({"metadata": {"labels": {"x": "1", "tier": "x"}},
            "spec": {"containers": [
                {"name": "c0", "image": "busybox"},
                {"name": "c1", "image": "nginx:1.26", "ports": [{"containerPort": 80}]}]}})
        );
    }

    #[test]
    fn strategic_directives() {
        let mut o = json!({"spec": {"a": 1, "b": 2, "finalizers": ["x", "y"], "args": ["1"]}});
        strategic_merge(
            &mut o,
            &json!({"spec": {"$retainKeys": ["a", "finalizers", "args"], "$deleteFromPrimitiveList/finalizers": ["x"], "args": ["2"]}}),
        )
        .unwrap();
        assert_eq!(
            o,
            json!({"spec": {"a": 1, "finalizers": ["y"], "args": ["2"]}})
        );
        strategic_merge(&mut o, &json!({"spec": {"$patch": "replace", "z": 1}})).unwrap();
        assert_eq!(o, json!({"spec": {"z": 1}}));
        assert!(strategic_merge(&mut o, &json!([1])).is_err());
    }

    #[test]
    fn json_patch_reports_failures() {
        let mut o = json!({"metadata": {"labels": {}}});
        json_patch(
            &mut o,
            &json!([{"op": "add", "path": "/metadata/labels/j", "value": "1"}]),
        )
        .unwrap();
        assert_eq!(o["metadata"]["labels"]["j"], "1");
        assert!(json_patch(&mut o, &json!([{"op": "remove", "path": "/nope"}])).is_err());
        assert!(json_patch(&mut o, &json!({"op": "bogus"})).is_err());
    }
}
