//! The resource types the API serves, their discovery documents, the
//! minimal OpenAPI documents kubectl asks for, and `kubectl get` tables.

use serde_json::{Value, json};

/// One resource type (a REST collection).
#[derive(Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group; empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lowercase: the URL segment.
    pub plural: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    pub short_names: &'static [&'static str],
    /// Whether the type has a `status` subresource.
    pub has_status: bool,
    /// Top-level fields an object may carry besides apiVersion, kind and
    /// metadata (strict field validation checks these).
    pub fields: &'static [&'static str],
}

pub const DEVICES_GROUP: &str = "devices.kubeedge.io";
pub const COORDINATION_GROUP: &str = "coordination.k8s.io";

pub static RESOURCES: &[ResourceType] = &[
    ResourceType {
        group: "",
        version: "v1",
        plural: "namespaces",
        singular: "namespace",
        kind: "Namespace",
        namespaced: false,
        short_names: &["ns"],
        has_status: true,
        fields: &["spec", "status"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "pods",
        singular: "pod",
        kind: "Pod",
        namespaced: true,
        short_names: &["po"],
        has_status: true,
        fields: &["spec", "status"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "nodes",
        singular: "node",
        kind: "Node",
        namespaced: false,
        short_names: &["no"],
        has_status: true,
        fields: &["spec", "status"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "configmaps",
        singular: "configmap",
        kind: "ConfigMap",
        namespaced: true,
        short_names: &["cm"],
        has_status: false,
        fields: &["data", "binaryData", "immutable"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "secrets",
        singular: "secret",
        kind: "Secret",
        namespaced: true,
        short_names: &[],
        has_status: false,
        fields: &["data", "stringData", "type", "immutable"],
    },
    ResourceType {
        group: "",
        version: "v1",
        plural: "events",
        singular: "event",
        kind: "Event",
        namespaced: true,
        short_names: &["ev"],
        has_status: false,
        fields: &[
            "involvedObject",
            "reason",
            "message",
            "source",
            "firstTimestamp",
            "lastTimestamp",
            "count",
            "type",
            "eventTime",
            "series",
            "action",
            "related",
            "reportingComponent",
            "reportingInstance",
        ],
    },
    ResourceType {
        group: COORDINATION_GROUP,
        version: "v1",
        plural: "leases",
        singular: "lease",
        kind: "Lease",
        namespaced: true,
        short_names: &[],
        has_status: false,
        fields: &["spec"],
    },
    ResourceType {
        group: DEVICES_GROUP,
        version: "v1beta1",
        plural: "devices",
        singular: "device",
        kind: "Device",
        namespaced: true,
        short_names: &[],
        has_status: true,
        fields: &["spec", "status"],
    },
    ResourceType {
        group: DEVICES_GROUP,
        version: "v1beta1",
        plural: "devicemodels",
        singular: "devicemodel",
        kind: "DeviceModel",
        namespaced: true,
        short_names: &[],
        has_status: false,
        fields: &["spec"],
    },
];

impl ResourceType {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `devices.devices.kubeedge.io`, as Kubernetes names a
    /// resource in messages.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }

    /// The log key of an object: `pods/default/web`, `nodes/edge-1`,
    /// `devices.devices.kubeedge.io/default/sensor`.
    pub fn key(&self, namespace: Option<&str>, name: &str) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}/{ns}/{name}", self.qualified()),
            _ => format!("{}/{name}", self.qualified()),
        }
    }

    /// Prefix of every key of this type (and namespace).
    pub fn key_prefix(&self, namespace: Option<&str>) -> String {
        match namespace {
            Some(ns) if self.namespaced => format!("{}/{ns}/", self.qualified()),
            _ => format!("{}/", self.qualified()),
        }
    }
}

/// The resource type served at `group`/`version` under `plural`.
pub fn find(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// The resource type whose keys start with the first segment of `key`.
pub fn of_key(key: &str) -> Option<&'static ResourceType> {
    let head = key.split('/').next()?;
    RESOURCES.iter().find(|r| r.qualified() == head)
}

/// The resource type of `kind` in `api_version`.
pub fn of_kind(api_version: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.kind == kind && r.api_version() == api_version)
}

const VERBS: &[&str] = &[
    "create", "delete", "get", "list", "patch", "update", "watch",
];

/// `GET /api`.
pub fn api_versions(server: &str) -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server}]})
}

/// Named groups served, with their (single) version, in catalog order.
fn groups() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for r in RESOURCES.iter().filter(|r| !r.group.is_empty()) {
        if !out.iter().any(|(g, _)| *g == r.group) {
            out.push((r.group, r.version));
        }
    }
    out
}

fn group_doc(group: &str, version: &str) -> Value {
    let gv = json!({"groupVersion": format!("{group}/{version}"), "version": version});
    json!({"name": group, "versions": [gv.clone()], "preferredVersion": gv})
}

/// `GET /apis`.
pub fn api_group_list() -> Value {
    let groups: Vec<Value> = groups().into_iter().map(|(g, v)| group_doc(g, v)).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

/// `GET /apis/<group>`.
pub fn api_group(group: &str) -> Option<Value> {
    let (g, v) = groups().into_iter().find(|(g, _)| *g == group)?;
    let mut doc = group_doc(g, v);
    if let Some(o) = doc.as_object_mut() {
        o.insert("kind".into(), json!("APIGroup"));
        o.insert("apiVersion".into(), json!("v1"));
    }
    Some(doc)
}

/// `GET /api/v1` or `GET /apis/<group>/<version>`: `None` if not served.
pub fn resource_list(group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        resources.push(json!({"name": r.plural, "singularName": r.singular,
            "namespaced": r.namespaced, "kind": r.kind, "verbs": VERBS,
            "shortNames": r.short_names}));
        if r.has_status {
            resources.push(
                json!({"name": format!("{}/status", r.plural), "singularName": "",
                "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}),
            );
        }
        if r.plural == "pods" {
            resources.push(json!({"name": "pods/log", "singularName": "",
                "namespaced": true, "kind": "Pod", "verbs": ["get"]}));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let gv = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
        "resources": resources}),
    )
}

/// `GET /openapi/v3`: one document per group version.
pub fn openapi_v3_root() -> Value {
    let mut paths = serde_json::Map::new();
    paths.insert(
        "api/v1".into(),
        json!({"serverRelativeURL": "/openapi/v3/api/v1?hash=keel1"}),
    );
    for (g, v) in groups() {
        paths.insert(
            format!("apis/{g}/{v}"),
            json!({"serverRelativeURL": format!("/openapi/v3/apis/{g}/{v}?hash=keel1")}),
        );
    }
    json!({ "paths": paths })
}

/// `GET /openapi/v3/<gv path>`: a PATCH operation per kind that declares
/// the `fieldValidation` parameter, which tells kubectl this server
/// validates fields itself (so it sends `fieldValidation=Strict` and skips
/// client-side schema validation). No schemas: `kubectl explain` is not
/// supported.
pub fn openapi_v3_group(path: &str) -> Option<Value> {
    let (group, version) = match path {
        "api/v1" => ("", "v1"),
        p => {
            let rest = p.strip_prefix("apis/")?;
            let (g, v) = rest.split_once('/')?;
            (g, v)
        }
    };
    let mut paths = serde_json::Map::new();
    for r in RESOURCES
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let base = if group.is_empty() {
            "/api/v1".to_owned()
        } else {
            format!("/apis/{group}/{version}")
        };
        let p = if r.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", r.plural)
        } else {
            format!("{base}/{}/{{name}}", r.plural)
        };
        paths.insert(
            p,
            json!({"patch": {
                "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
                "parameters": [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}],
                "responses": {"200": {"description": "OK"}}
            }}),
        );
    }
    if paths.is_empty() {
        return None;
    }
    Some(
        json!({"openapi": "3.0.0", "info": {"title": "keel", "version": "v1.37.0"}, "paths": paths}),
    )
}

// ---------------------------------------------------------------------------
// tables
// ---------------------------------------------------------------------------

fn col(name: &str, priority: u8) -> Value {
    let format = if name == "Name" { "name" } else { "" };
    json!({"name": name, "type": "string", "format": format, "description": "", "priority": priority})
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a Value {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).unwrap_or(&Value::Null);
    }
    cur
}

fn text(v: &Value, path: &[&str]) -> String {
    match s(v, path) {
        Value::String(x) => x.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn or_none(x: String) -> String {
    if x.is_empty() { "<none>".into() } else { x }
}

/// Human age since an RFC 3339 timestamp, as kubectl prints it.
pub fn age(created: &str, now: time::OffsetDateTime) -> String {
    let Ok(t) =
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
    else {
        return "<unknown>".into();
    };
    let secs = (now - t).whole_seconds().max(0);
    match secs {
        0..=119 => format!("{secs}s"),
        120..=599 => format!("{}m{}s", secs / 60, secs % 60),
        600..=10799 => format!("{}m", secs / 60),
        10800..=172_799 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Column definitions for `kind`.
pub fn columns(rt: &ResourceType) -> Vec<Value> {
    match rt.kind {
        "Pod" => vec![
            col("Name", 0),
            col("Ready", 0),
            col("Status", 0),
            col("Restarts", 0),
            col("Age", 0),
            col("IP", 1),
            col("Node", 1),
        ],
        "Node" => vec![
            col("Name", 0),
            col("Status", 0),
            col("Roles", 0),
            col("Age", 0),
            col("Version", 0),
            col("Internal-IP", 1),
            col("OS-Image", 1),
            col("Kernel-Version", 1),
        ],
        "Namespace" => vec![col("Name", 0), col("Status", 0), col("Age", 0)],
        "ConfigMap" | "Secret" => {
            let mut c = vec![col("Name", 0)];
            if rt.kind == "Secret" {
                c.push(col("Type", 0));
            }
            c.push(col("Data", 0));
            c.push(col("Age", 0));
            c
        }
        "Event" => vec![
            col("Last Seen", 0),
            col("Type", 0),
            col("Reason", 0),
            col("Object", 0),
            col("Message", 0),
            col("Name", 1),
        ],
        "Lease" => vec![col("Name", 0), col("Holder", 0), col("Age", 0)],
        "Device" => vec![
            col("Name", 0),
            col("Node", 0),
            col("Model", 0),
            col("Age", 0),
        ],
        _ => vec![col("Name", 0), col("Age", 0)],
    }
}

/// One table row's cells for `obj`.
pub fn cells(rt: &ResourceType, obj: &Value, now: time::OffsetDateTime) -> Vec<Value> {
    let name = text(obj, &["metadata", "name"]);
    let created = text(obj, &["metadata", "creationTimestamp"]);
    let age = age(&created, now);
    match rt.kind {
        "Pod" => {
            let containers = s(obj, &["spec", "containers"])
                .as_array()
                .map_or(0, Vec::len);
            let statuses = s(obj, &["status", "containerStatuses"]).as_array();
            let ready = statuses.map_or(0, |v| {
                v.iter()
                    .filter(|c| c.get("ready") == Some(&Value::Bool(true)))
                    .count()
            });
            let restarts: u64 = statuses.map_or(0, |v| {
                v.iter()
                    .filter_map(|c| c.get("restartCount").and_then(Value::as_u64))
                    .sum()
            });
            let mut phase = text(obj, &["status", "phase"]);
            if phase.is_empty() {
                phase = "Pending".into();
            }
            if !s(obj, &["metadata", "deletionTimestamp"]).is_null() {
                phase = "Terminating".into();
            }
            vec![
                json!(name),
                json!(format!("{ready}/{containers}")),
                json!(phase),
                json!(restarts),
                json!(age),
                json!(or_none(text(obj, &["status", "podIP"]))),
                json!(or_none(text(obj, &["spec", "nodeName"]))),
            ]
        }
        "Node" => {
            let ready = s(obj, &["status", "conditions"])
                .as_array()
                .and_then(|c| {
                    c.iter()
                        .find(|c| c.get("type") == Some(&json!("Ready")))
                        .map(|c| c.get("status") == Some(&json!("True")))
                })
                .unwrap_or(false);
            let mut status = if ready { "Ready" } else { "NotReady" }.to_owned();
            if s(obj, &["spec", "unschedulable"]) == &Value::Bool(true) {
                status.push_str(",SchedulingDisabled");
            }
            let roles: Vec<String> = s(obj, &["metadata", "labels"])
                .as_object()
                .map(|l| {
                    l.keys()
                        .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default();
            let ip = s(obj, &["status", "addresses"])
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|a| a.get("type") == Some(&json!("InternalIP")))
                        .map(|a| text(a, &["address"]))
                })
                .unwrap_or_default();
            vec![
                json!(name),
                json!(status),
                json!(or_none(roles.join(","))),
                json!(age),
                json!(text(obj, &["status", "nodeInfo", "kubeletVersion"])),
                json!(or_none(ip)),
                json!(or_none(text(obj, &["status", "nodeInfo", "osImage"]))),
                json!(or_none(text(obj, &["status", "nodeInfo", "kernelVersion"]))),
            ]
        }
        "Namespace" => {
            let mut phase = text(obj, &["status", "phase"]);
            if phase.is_empty() {
                phase = "Active".into();
            }
            vec![json!(name), json!(phase), json!(age)]
        }
        "ConfigMap" | "Secret" => {
            let n = ["data", "binaryData"]
                .iter()
                .filter_map(|f| obj.get(f).and_then(Value::as_object))
                .map(serde_json::Map::len)
                .sum::<usize>();
            let mut c = vec![json!(name)];
            if rt.kind == "Secret" {
                let mut t = text(obj, &["type"]);
                if t.is_empty() {
                    t = "Opaque".into();
                }
                c.push(json!(t));
            }
            c.push(json!(n));
            c.push(json!(age));
            c
        }
        "Event" => {
            let mut last = text(obj, &["lastTimestamp"]);
            if last.is_empty() {
                last = created;
            }
            let object = format!(
                "{}/{}",
                text(obj, &["involvedObject", "kind"]).to_lowercase(),
                text(obj, &["involvedObject", "name"])
            );
            vec![
                json!(self::age(&last, now)),
                json!(text(obj, &["type"])),
                json!(text(obj, &["reason"])),
                json!(object),
                json!(text(obj, &["message"])),
                json!(name),
            ]
        }
        "Lease" => vec![
            json!(name),
            json!(or_none(text(obj, &["spec", "holderIdentity"]))),
            json!(age),
        ],
        "Device" => vec![
            json!(name),
            json!(or_none(text(obj, &["spec", "nodeName"]))),
            json!(or_none(text(obj, &["spec", "deviceModelRef", "name"]))),
            json!(age),
        ],
        _ => vec![json!(name), json!(age)],
    }
}

/// A `meta.k8s.io/v1` Table of `objects`.
pub fn table(rt: &ResourceType, objects: &[&Value], resource_version: u64) -> Value {
    let now = time::OffsetDateTime::now_utc();
    let rows: Vec<Value> = objects
        .iter()
        .map(|o| {
            json!({"cells": cells(rt, o, now), "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": o.get("metadata").cloned().unwrap_or(Value::Null)}})
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version.to_string()},
        "columnDefinitions": columns(rt), "rows": rows})
}
