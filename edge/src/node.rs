//! Node status from the host: capacity and allocatable (cpu, memory,
//! pods), addresses, node info. Written into the node's own Node object
//! when it differs from what was last reported — a reboot (new boot id) or
//! a changed address is one record; liveness is not logged.

use std::sync::Arc;

use serde_json::{Value, json};
use tracing::{info, warn};

use crate::meta::MetaManager;

/// Pods a node accepts (kubelet's default).
pub const MAX_PODS: u32 = 110;

fn read_trim(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// `MemTotal` from `/proc/meminfo`, in KiB.
fn mem_total_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

fn os_image() -> String {
    std::fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "Linux".into())
}

/// The `status` fields the edge owns for its Node, read from the host.
pub fn host_status(node: &str, node_ip: &str, api_port: u16) -> Value {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = mem_total_kib().map_or_else(|| "0".to_owned(), |k| format!("{k}Ki"));
    let resources = json!({"cpu": cpus.to_string(), "memory": mem,
        "pods": MAX_PODS.to_string(), "ephemeral-storage": "0"});
    json!({
        "capacity": resources,
        "allocatable": resources,
        "addresses": [
            {"type": "InternalIP", "address": node_ip},
            {"type": "Hostname", "address": node},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": api_port}},
        "nodeInfo": {
            "machineID": read_trim("/etc/machine-id").unwrap_or_default(),
            "systemUUID": read_trim("/sys/class/dmi/id/product_uuid").unwrap_or_default(),
            "bootID": read_trim("/proc/sys/kernel/random/boot_id").unwrap_or_default(),
            "kernelVersion": read_trim("/proc/sys/kernel/osrelease").unwrap_or_default(),
            "osImage": os_image(),
            "containerRuntimeVersion": "process://keel",
            "kubeletVersion": concat!("v1.37.0-keel-", env!("CARGO_PKG_VERSION")),
            "kubeProxyVersion": "",
            "operatingSystem": std::env::consts::OS,
            "architecture": match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                other => other,
            },
        },
    })
}

/// Merges `fields` into `status` of `obj`; true if anything changed.
fn merge_status(obj: &mut Value, fields: &Value) {
    let Some(o) = obj.as_object_mut() else {
        return;
    };
    let status = o.entry("status").or_insert_with(|| json!({}));
    if !status.is_object() {
        *status = json!({});
    }
    if let (Some(st), Some(f)) = (status.as_object_mut(), fields.as_object()) {
        for (k, v) in f {
            st.insert(k.clone(), v.clone());
        }
    }
}

/// Reports the host's status into the node's Node object whenever the
/// object (first created by the cloud when the node connects) exists and
/// lacks it. Runs until the meta manager is dropped.
pub async fn report(meta: Arc<MetaManager>, node_ip: String, api_port: u16) {
    let key = format!("nodes/{}", meta.node());
    let fields = host_status(meta.node(), &node_ip, api_port);
    let mut changed = meta.subscribe();
    loop {
        if meta.object(&key).is_some() {
            match meta.update(&key, |obj| merge_status(obj, &fields)) {
                Ok(true) => info!(node = %meta.node(), "node status reported"),
                Ok(false) => {}
                Err(e) => warn!(node = %meta.node(), error = %e, "could not report node status"),
            }
        }
        if changed.changed().await.is_err() {
            return;
        }
    }
}
