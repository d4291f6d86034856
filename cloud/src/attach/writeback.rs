//! What edge nodes report, written back to the cluster: the status of
//! pods and devices, through the status subresource, as a JSON merge patch
//! of what differs from the cluster's copy.
//!
//! Keys are taken in the order they first changed (a key whose write
//! fails goes to the back of the queue); a key that changed again
//! meanwhile is written once with its latest status (the CRDT state
//! includes every record folded so far, so nothing recorded is lost by
//! coalescing). A patch the API server rejects (4xx other than conflict
//! and throttling) is logged with the object and the reason and dropped;
//! anything else is retried in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use serde_json::{Map, Value, json};
use tracing::{debug, warn};

use super::{Attached, Kind, lock, str_at};

impl Attached {
    /// Writes back queued statuses for ever.
    pub(super) async fn status_loop(self: Arc<Self>) {
        loop {
            let key = self.status_q.next().await;
            if let Err(Retry(e)) = self.write_status(&key).await {
                // To the back of the queue: one object the API server
                // keeps failing does not hold up every other.
                warn!(%key, server = %self.server, error = %e, "status write-back failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                self.status_q.push(key);
            }
        }
    }

    async fn write_status(&self, key: &str) -> Result<(), Retry> {
        let Some(kind) = Kind::of_key(key).filter(|k| k.edge_status) else {
            return Ok(());
        };
        // The latest fold: the write-back is queued as a node's change is
        // folded, before its `cluster` record is durable (and visible).
        let Some(mirror) = self.registry.get_latest(key) else {
            return Ok(());
        };
        let Some(cluster) = lock(&self.state).cache.get(key).cloned() else {
            // Gone on the cluster: nothing to write to.
            return Ok(());
        };
        if mirror.pointer("/metadata/uid") != cluster.pointer("/metadata/uid") {
            return Ok(());
        }
        // Only the replica the object's node is connected to writes its
        // status: a former owner's copy may be older than the cluster's.
        if let Some(node) = str_at(&mirror, "/spec/nodeName")
            && !self.writes_status_of(node)
        {
            self.defer_status(node, key);
            return Ok(());
        }
        let empty = Value::Object(Map::new());
        let Some(diff) = merge_diff(
            cluster.get("status").unwrap_or(&empty),
            mirror.get("status").unwrap_or(&empty),
            false,
        ) else {
            return Ok(());
        };
        let (Some(ns), Some(name)) = (
            str_at(&mirror, "/metadata/namespace"),
            str_at(&mirror, "/metadata/name"),
        ) else {
            return Ok(());
        };
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), ns, &kind.api_resource());
        // The UID makes the API server refuse the patch (409) if the name
        // now belongs to another object.
        let body = json!({"metadata": {"uid": mirror.pointer("/metadata/uid")}, "status": diff});
        let pp = PatchParams::default();
        let subresource =
            kind.plural == "pods" || self.device_status_subresource.load(Ordering::Relaxed);
        let r = if kind.plural == "pods" {
            // Strategic: conditions and container statuses merge by their
            // keys, so conditions others set (readiness gates) stay.
            api.patch_status(name, &pp, &Patch::Strategic(&body)).await
        } else if subresource {
            api.patch_status(name, &pp, &Patch::Merge(&body)).await
        } else {
            api.patch(name, &pp, &Patch::Merge(&body)).await
        };
        match r {
            Ok(_) => {
                debug!(%key, "status written to the cluster");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 && s.message.contains("UID") => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 || s.code == 429 => {
                Err(Retry(s.message.clone()))
            }
            Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => {
                warn!(object = %key, reason = %s.reason, code = s.code, message = %s.message,
                    "the API server rejected a status the node reported; skipped");
                Ok(())
            }
            Err(e) => Err(Retry(e.to_string())),
        }
    }
}

/// A failure worth retrying.
struct Retry(String);

/// The JSON merge patch (RFC 7386) that turns `old` into `new`, or `None`
/// if they are equal. With `remove` false at the top level, fields only
/// the cluster has (set by its own controllers) are left alone.
pub(super) fn merge_diff(old: &Value, new: &Value, remove: bool) -> Option<Value> {
    match (old.as_object(), new.as_object()) {
        (Some(o), Some(n)) => {
            let mut out = Map::new();
            for (k, nv) in n {
                match o.get(k) {
                    Some(ov) if ov == nv => {}
                    Some(ov) if ov.is_object() && nv.is_object() => {
                        if let Some(d) = merge_diff(ov, nv, true) {
                            out.insert(k.clone(), d);
                        }
                    }
                    _ => {
                        out.insert(k.clone(), nv.clone());
                    }
                }
            }
            if remove {
                for k in o.keys() {
                    if !n.contains_key(k) {
                        out.insert(k.clone(), Value::Null);
                    }
                }
            }
            (!out.is_empty()).then_some(Value::Object(out))
        }
        _ => (old != new).then(|| new.clone()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use super::merge_diff;
    use serde_json::json;

    /// Applies a merge patch (RFC 7386) to `target`.
    fn apply(target: &mut serde_json::Value, patch: &serde_json::Value) {
        match (target.as_object_mut(), patch.as_object()) {
            (Some(t), Some(p)) => {
                for (k, v) in p {
                    if v.is_null() {
                        t.remove(k);
                    } else if let Some(tv) =
                        t.get_mut(k).filter(|tv| tv.is_object() && v.is_object())
                    {
                        apply(tv, v);
                    } else {
                        t.insert(k.clone(), v.clone());
                    }
                }
            }
            _ => *target = patch.clone(),
        }
    }

    #[test]
    fn diff_applied_gives_new_and_keeps_cluster_only_fields() {
        let old = json!({"phase": "Pending", "qosClass": "BestEffort",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "nested": {"a": 1, "b": {"c": 2}}});
        let new = json!({"phase": "Running",
            "conditions": [{"type": "Ready", "status": "True"}],
            "nested": {"a": 1, "b": {"d": 3}}, "podIP": "127.0.0.1"});
        let d = merge_diff(&old, &new, false).unwrap();
        assert!(
            d.get("qosClass").is_none(),
            "a top-level field only the cluster has stays"
        );
        assert_eq!(d["nested"]["b"]["c"], serde_json::Value::Null);
        assert!(d["nested"].get("a").is_none());
        let mut patched = old.clone();
        apply(&mut patched, &d);
        let mut want = new.clone();
        want["qosClass"] = json!("BestEffort");
        assert_eq!(patched, want);
        assert_eq!(merge_diff(&new, &new, false), None);
    }
}
