//! cloudcore's Kubernetes API: keel-api's server (reads, discovery,
//! tables, watch) over the [`registry::Registry`], with the write path
//! here — validation, create, update, patch (merge, strategic, JSON patch,
//! server-side apply), delete and the `status` subresource — and pods
//! placed on create ([`scheduler`]). Only the admin certificate may call
//! it; its writes are recorded as the admin user's.

pub mod patch;
pub mod registry;
pub mod scheduler;
pub mod typed;

pub use keel_api::server::{ApiBody, ApiServer, LogRequest, MAX_BODY, PodLogs, ReadObjects};
pub use keel_api::{resources, select, status, watch};

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use keel_api::server::{Target, WriteFuture, WriteObjects, Written};
use serde_json::{Value, json};

use registry::{Registry, Write, new_meta, with_rv};
use resources::ResourceType;
use status::Status;

/// Serves the Kubernetes API for `registry` on `addr` with `tls` (which
/// should require client certificates from the cluster CA).
pub async fn bind(
    addr: SocketAddr,
    tls: rustls::ServerConfig,
    registry: Arc<Registry>,
    streams: Arc<crate::streams::Tunnel>,
) -> std::io::Result<ApiServer> {
    let writes = Writes {
        registry: registry.clone(),
        origin: registry::user_origin(crate::pki::ADMIN_COMMON_NAME),
    };
    ApiServer::bind(
        addr,
        tls,
        registry,
        Arc::new(writes),
        streams.pod_streams(),
        crate::pki::is_admin_cert,
    )
    .await
}

impl ReadObjects for Registry {
    fn get(&self, key: &str) -> Option<Value> {
        Registry::get(self, key)
    }
    fn list(&self, prefix: &str) -> (Vec<Value>, u64) {
        Registry::list(self, prefix)
    }
    fn watch(&self, rv: u64) -> Result<watch::WatchStart, Status> {
        Registry::watch(self, rv)
    }
}

/// The API's writes: to the registry, recorded as `origin`'s changes.
struct Writes {
    registry: Arc<Registry>,
    origin: String,
}

impl WriteObjects for Writes {
    fn create<'a>(&'a self, t: &'a Target, body: Bytes, strict: bool) -> WriteFuture<'a> {
        Box::pin(async move {
            self.create_object(t, parse_json(&body, false)?, strict)
                .await
        })
    }

    fn update<'a>(
        &'a self,
        t: &'a Target,
        name: &'a str,
        sub: Option<&'a str>,
        body: Bytes,
        strict: bool,
    ) -> WriteFuture<'a> {
        Box::pin(async move {
            self.update_object(t, name, sub, parse_json(&body, false)?, strict)
                .await
        })
    }

    fn patch<'a>(
        &'a self,
        t: &'a Target,
        name: &'a str,
        sub: Option<&'a str>,
        content_type: &'a str,
        body: Bytes,
        force: bool,
    ) -> WriteFuture<'a> {
        Box::pin(async move {
            self.patch_object(t, name, sub, content_type, &body, force)
                .await
        })
    }

    fn delete<'a>(&'a self, t: &'a Target, name: &'a str) -> WriteFuture<'a> {
        Box::pin(async move {
            let key = t.rt.key(t.namespace.as_deref(), name);
            let rt = t.rt;
            let gone = self
                .registry
                .write_as(&self.origin, &key, move |old| {
                    if old.is_none() {
                        return Err(Status::not_found(rt, name));
                    }
                    Ok(Some(Write::Delete))
                })
                .await?;
            Ok((200, gone.unwrap_or(Value::Null)))
        })
    }
}

fn parse_json(body: &[u8], yaml_ok: bool) -> Result<Value, Status> {
    if body.starts_with(b"k8s\0") {
        return Err(Status::new(
            415,
            "UnsupportedMediaType",
            "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (protobuf is not supported)",
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(v) => Ok(v),
        Err(e) if yaml_ok => serde_yaml::from_slice::<Value>(body).map_err(|y| {
            Status::bad_request(format!("the body is neither JSON ({e}) nor YAML ({y})"))
        }),
        Err(e) => Err(Status::bad_request(format!(
            "the body of the request was in an unknown format: {e}"
        ))),
    }
}

const META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
    "selfLink",
];

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// Checks an incoming object against its type: kind and apiVersion,
/// unknown fields (when strict), name, and the fields each kind requires.
fn validate(rt: &ResourceType, obj: &Value, strict: bool) -> Result<(), Status> {
    let Value::Object(m) = obj else {
        return Err(Status::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: the object must be a JSON object",
            rt.kind, rt.version, rt.kind
        )));
    };
    let cannot = |why: String| {
        Status::bad_request(format!(
            "{} in version \"{}\" cannot be handled as a {}: {why}",
            rt.kind, rt.version, rt.kind
        ))
    };
    if let Some(k) = m.get("kind").and_then(Value::as_str)
        && k != rt.kind
    {
        return Err(cannot(format!("kind {k:?} does not match the URL")));
    }
    if let Some(v) = m.get("apiVersion").and_then(Value::as_str)
        && v != rt.api_version()
    {
        return Err(cannot(format!("apiVersion {v:?} does not match the URL")));
    }
    if strict {
        for k in m.keys() {
            if !matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                && !rt.fields.contains(&k.as_str())
            {
                return Err(cannot(format!(
                    "strict decoding error: unknown field \"{k}\""
                )));
            }
        }
        if let Some(Value::Object(meta)) = m.get("metadata") {
            for k in meta.keys() {
                if !META_FIELDS.contains(&k.as_str()) {
                    return Err(cannot(format!(
                        "strict decoding error: unknown field \"metadata.{k}\""
                    )));
                }
            }
        }
    }
    match typed::check(rt.kind, obj) {
        Err(e) => return Err(cannot(e)),
        Ok(unknown) if strict => {
            if let Some(f) = unknown.first() {
                return Err(cannot(format!(
                    "strict decoding error: unknown field \"{f}\""
                )));
            }
        }
        Ok(_) => {}
    }
    let name = obj
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut causes = Vec::new();
    if !valid_name(name) {
        causes.push((
            "metadata.name".to_owned(),
            format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
        ));
    }
    for (field, what) in [("labels", "label"), ("annotations", "annotation")] {
        if let Some(Value::Object(l)) = obj.pointer(&format!("/metadata/{field}")) {
            for (k, v) in l {
                if !v.is_string() {
                    causes.push((
                        format!("metadata.{field}.{k}"),
                        format!("Invalid value: the {what} value must be a string"),
                    ));
                }
            }
        }
    }
    if rt.kind == "Pod" {
        match obj.pointer("/spec/containers").and_then(Value::as_array) {
            Some(cs) if !cs.is_empty() => {
                for (i, c) in cs.iter().enumerate() {
                    for f in ["name", "image"] {
                        if c.get(f).and_then(Value::as_str).is_none_or(str::is_empty) {
                            causes.push((
                                format!("spec.containers[{i}].{f}"),
                                "Required value".to_owned(),
                            ));
                        }
                    }
                }
            }
            _ => causes.push(("spec.containers".to_owned(), "Required value".to_owned())),
        }
    }
    if rt.kind == "Device"
        && obj
            .pointer("/spec/deviceModelRef/name")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        causes.push((
            "spec.deviceModelRef.name".to_owned(),
            "Required value".to_owned(),
        ));
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(Status::invalid(rt, name, &causes))
    }
}

impl Writes {
    async fn create_object(
        &self,
        t: &Target,
        mut obj: Value,
        strict: bool,
    ) -> Result<Written, Status> {
        let rt = t.rt;
        if let Value::Object(m) = &mut obj {
            m.entry("apiVersion").or_insert(json!(rt.api_version()));
            m.entry("kind").or_insert(json!(rt.kind));
            let meta = m.entry("metadata").or_insert(json!({}));
            if let Value::Object(meta) = meta {
                if !meta.contains_key("name")
                    && let Some(g) = meta.get("generateName").and_then(Value::as_str)
                {
                    let suffix = blake3::hash(registry::now_rfc3339().as_bytes()).to_hex();
                    let name = format!("{g}{}", suffix.get(..5).unwrap_or("x"));
                    meta.insert("name".into(), json!(name));
                }
                match (meta.get("namespace").and_then(Value::as_str), &t.namespace) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(Status::bad_request(format!(
                            "the namespace of the provided object ({a}) does not match the namespace sent on the request ({b})"
                        )));
                    }
                    _ => {}
                }
            }
        }
        validate(rt, &obj, strict)?;
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        if let Some(ns) = &t.namespace
            && self.registry.get(&format!("namespaces/{ns}")).is_none()
        {
            return Err(Status {
                details: Some(json!({"name": ns, "kind": "namespaces"})),
                ..Status::new(404, "NotFound", format!("namespaces \"{ns}\" not found"))
            });
        }
        let mut obj = new_meta(obj, t.namespace.as_deref());
        if rt.kind == "Pod" {
            if let Some(o) = obj.as_object_mut() {
                o.entry("status").or_insert(json!({"phase": "Pending"}));
            }
            scheduler::schedule(&self.registry, &mut obj);
        }
        let key = rt.key(t.namespace.as_deref(), &name);
        let created = self
            .registry
            .write_as(&self.origin, &key, move |old| {
                if old.is_some() {
                    return Err(Status::already_exists(rt, &name));
                }
                Ok(Some(Write::Put(obj)))
            })
            .await?;
        Ok((201, created.unwrap_or(Value::Null)))
    }

    async fn update_object(
        &self,
        t: &Target,
        name: &str,
        sub: Option<&str>,
        obj: Value,
        strict: bool,
    ) -> Result<Written, Status> {
        if sub.is_some_and(|s| s != "status") || (sub.is_some() && !t.rt.has_status) {
            return Err(Status::new(405, "MethodNotAllowed", "no such subresource"));
        }
        validate(t.rt, &obj, strict)?;
        if obj.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
            return Err(Status::bad_request(
                "the name of the object does not match the name on the URL",
            ));
        }
        let key = t.rt.key(t.namespace.as_deref(), name);
        let out = self
            .registry
            .write_as(&self.origin, &key, |old| {
                let old = old.ok_or_else(|| Status::not_found(t.rt, name))?;
                merged_update(t.rt, name, old, obj, sub == Some("status"))
            })
            .await?;
        match out {
            Some(o) => Ok((200, o)),
            None => Ok((
                200,
                self.registry
                    .get(&key)
                    .ok_or_else(|| Status::not_found(t.rt, name))?,
            )),
        }
    }

    async fn patch_object(
        &self,
        t: &Target,
        name: &str,
        sub: Option<&str>,
        content_type: &str,
        body: &[u8],
        _force: bool,
    ) -> Result<Written, Status> {
        if sub.is_some_and(|s| s != "status") || (sub.is_some() && !t.rt.has_status) {
            return Err(Status::new(405, "MethodNotAllowed", "no such subresource"));
        }
        let rt = t.rt;
        let key = rt.key(t.namespace.as_deref(), name);
        let apply = content_type == "application/apply-patch+yaml";
        let patch = parse_json(body, apply)?;
        if content_type == "application/strategic-merge-patch+json" && !rt.group.is_empty() {
            return Err(Status::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml ({content_type} is not supported by {}, Kind={})",
                    rt.api_version(),
                    rt.kind
                ),
            ));
        }
        if !matches!(
            content_type,
            "application/merge-patch+json"
                | "application/strategic-merge-patch+json"
                | "application/json-patch+json"
                | "application/apply-patch+yaml"
        ) {
            return Err(Status::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, not {content_type}"
                ),
            ));
        }
        if apply && self.registry.get(&key).is_none() {
            // Server-side apply of an absent object creates it.
            let target = Target {
                rt,
                namespace: t.namespace.clone(),
                name: None,
                sub: None,
            };
            if patch.pointer("/metadata/name").and_then(Value::as_str) != Some(name) {
                return Err(Status::bad_request(
                    "the name of the object does not match the name on the URL",
                ));
            }
            return self.create_object(&target, patch, true).await;
        }
        let out = self
            .registry
            .write_as(&self.origin, &key, |old| {
                let old = old.ok_or_else(|| Status::not_found(rt, name))?;
                let mut new = old.clone();
                match content_type {
                    "application/json-patch+json" => {
                        patch::json_patch(&mut new, &patch).map_err(|e| {
                            Status::new(
                                422,
                                "Invalid",
                                format!("the JSON patch could not be applied: {e}"),
                            )
                        })?;
                    }
                    "application/strategic-merge-patch+json" => {
                        patch::strategic_merge(&mut new, &patch).map_err(Status::bad_request)?;
                    }
                    _ => {
                        if apply {
                            validate(rt, &patch, true)?;
                        }
                        patch::merge_patch(&mut new, &patch);
                    }
                }
                validate(rt, &new, false)?;
                merged_update(rt, name, old, new, sub == Some("status"))
            })
            .await?;
        match out {
            Some(o) => Ok((200, o)),
            None => Ok((
                200,
                self.registry
                    .get(&key)
                    .ok_or_else(|| Status::not_found(rt, name))?,
            )),
        }
    }
}

/// The object an update stores: server-owned metadata kept from `old`; the
/// main resource keeps `old`'s status, the status subresource changes only
/// status; a stale resourceVersion is a conflict.
fn merged_update(
    rt: &'static ResourceType,
    name: &str,
    old: &Value,
    mut new: Value,
    status_only: bool,
) -> Result<Option<Write>, Status> {
    let old_rv = old.pointer("/metadata/resourceVersion").cloned();
    if let Some(rv) = new.pointer("/metadata/resourceVersion")
        && Some(rv) != old_rv.as_ref()
    {
        return Err(Status::conflict(rt, name));
    }
    if status_only {
        let mut out = old.clone();
        if let (Some(o), Some(st)) = (out.as_object_mut(), new.get("status")) {
            o.insert("status".into(), st.clone());
        }
        return Ok(Some(Write::Put(out)));
    }
    if rt.has_status
        && let Some(o) = new.as_object_mut()
    {
        match old.get("status") {
            Some(st) => {
                o.insert("status".into(), st.clone());
            }
            None => {
                o.remove("status");
            }
        }
    }
    for f in ["uid", "creationTimestamp", "namespace", "generation"] {
        if let (Some(v), Some(m)) = (
            old.pointer(&format!("/metadata/{f}")).cloned(),
            new.get_mut("metadata").and_then(Value::as_object_mut),
        ) {
            m.insert(f.into(), v);
        }
    }
    if old.get("spec") != new.get("spec") {
        let g = old
            .pointer("/metadata/generation")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        if let Some(m) = new.get_mut("metadata").and_then(Value::as_object_mut) {
            m.insert("generation".into(), json!(g + 1));
        }
    }
    // Nothing but the resourceVersion differs: no write (kubectl then
    // reports "no change").
    let mut a = with_rv(old, 0);
    let mut b = with_rv(&new, 0);
    if let (Some(x), Some(y)) = (a.get_mut("metadata"), b.get_mut("metadata"))
        && let (Some(x), Some(y)) = (x.as_object_mut(), y.as_object_mut())
    {
        x.remove("resourceVersion");
        y.remove("resourceVersion");
    }
    if a == b {
        return Ok(None);
    }
    Ok(Some(Write::Put(new)))
}
