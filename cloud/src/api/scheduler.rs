//! A simple scheduler: pods without `spec.nodeName` go to a Ready edge
//! node whose labels match their `nodeSelector`, the one with the fewest
//! pods. Runs when a pod is created and again whenever a node becomes
//! Ready (for pods that found no node before).

use serde_json::{Value, json};

use super::registry::{self, Registry, Write};

/// Places a pod without `spec.nodeName` on a Ready node whose labels
/// match its `nodeSelector` (the one with the fewest pods); a pod no
/// node fits stays Pending with `PodScheduled=False`.
pub fn schedule(registry: &Registry, pod: &mut Value) {
    if pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .is_some_and(|n| !n.is_empty())
    {
        return;
    }
    let selector = pod
        .pointer("/spec/nodeSelector")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    // The latest state, durable or not: a node's Ready condition is
    // recorded without waiting, and this is a writer's decision.
    let mut nodes = Vec::new();
    registry.scan_latest("nodes/", |n| nodes.push(n.clone()));
    // Pods per node, counted in place (no copies of the pods).
    let mut per_node: std::collections::BTreeMap<String, usize> = Default::default();
    registry.scan_latest("pods/", |p| {
        if let Some(n) = p.pointer("/spec/nodeName").and_then(Value::as_str) {
            *per_node.entry(n.to_owned()).or_default() += 1;
        }
    });
    let ready = |n: &Value| {
        n.pointer("/status/conditions")
            .and_then(Value::as_array)
            .is_some_and(|c| {
                c.iter().any(|c| {
                    c.get("type") == Some(&json!("Ready"))
                        && c.get("status") == Some(&json!("True"))
                })
            })
    };
    let fits = |n: &Value| {
        selector
            .iter()
            .all(|(k, v)| n.pointer("/metadata/labels").and_then(|l| l.get(k)) == Some(v))
    };
    let load = |name: &str| per_node.get(name).copied().unwrap_or(0);
    let best = nodes
        .iter()
        .filter(|n| ready(n) && fits(n))
        .filter_map(|n| n.pointer("/metadata/name").and_then(Value::as_str))
        .min_by_key(|n| (load(n), n.to_string()));
    let Some(spec) = pod.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    match best {
        Some(n) => {
            spec.insert("nodeName".into(), json!(n));
        }
        None => {
            if let Some(o) = pod.as_object_mut() {
                o.insert(
                    "status".into(),
                    json!({"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                        "reason": "Unschedulable", "message": "no Ready edge node matches the pod's nodeSelector",
                        "lastTransitionTime": registry::now_rfc3339()}]}),
                );
            }
        }
    }
}

/// Places every pod still without a node (after a node became Ready).
pub fn place_pending(registry: &Registry) {
    if !registry.may_have_unscheduled() {
        return;
    }
    registry.set_may_have_unscheduled(false);
    let mut pods = Vec::new();
    registry.scan_latest("pods/", |p| {
        if p.pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_none()
        {
            pods.push(p.clone());
        }
    });
    for pod in pods {
        if pod
            .pointer("/spec/nodeName")
            .and_then(Value::as_str)
            .is_some_and(|n| !n.is_empty())
            || pod.pointer("/metadata/deletionTimestamp").is_some()
        {
            continue;
        }
        let mut placed = pod.clone();
        schedule(registry, &mut placed);
        let Some(node) = placed.pointer("/spec/nodeName").and_then(Value::as_str) else {
            // Still no node for it: look again at the next Ready node.
            registry.set_may_have_unscheduled(true);
            continue;
        };
        let (Some(ns), Some(name)) = (
            pod.pointer("/metadata/namespace").and_then(Value::as_str),
            pod.pointer("/metadata/name").and_then(Value::as_str),
        ) else {
            continue;
        };
        let node = node.to_owned();
        let key = format!("pods/{ns}/{name}");
        let r = registry.submit(&key, move |cur| {
            let Some(cur) = cur else { return Ok(None) };
            if cur
                .pointer("/spec/nodeName")
                .and_then(Value::as_str)
                .is_some_and(|n| !n.is_empty())
            {
                return Ok(None);
            }
            let mut new = cur.clone();
            if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
                spec.insert("nodeName".into(), json!(node));
            }
            if let Some(st) = new.get_mut("status").and_then(Value::as_object_mut) {
                st.remove("conditions");
            }
            Ok(Some(Write::Put(new)))
        });
        if let Err(e) = r {
            tracing::warn!(%key, error = %e, "could not place a pending pod");
        }
    }
}
