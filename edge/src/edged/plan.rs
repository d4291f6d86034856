//! Turns a Pod's JSON and the configmaps/secrets it references into a
//! resolved [`PodPlan`]: everything a pod worker needs, with no further
//! lookups. Plans are compared to decide whether a worker must be told.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;

use super::EdgedConfig;
use super::probe::ProbeSpec;
use super::runtime::{HostPort, PodNetwork};

/// Grace period when a pod is removed: `terminationGracePeriodSeconds`
/// (default 30 s) capped at this.
pub(crate) const MAX_REMOVE_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RestartPolicy {
    Always,
    OnFailure,
    Never,
}

/// Stands for the pod's IP in a plan (environment values, arguments, probe
/// hosts): the IP is known only once the runtime has made the pod's
/// network, just before its containers start, when the pod worker puts it
/// in (`LaunchSpec::fill_pod_ip`, `ProbeSpec::at_pod_ip`). No value from a
/// spec can hold it: a NUL cannot pass through `execve`.
pub(crate) const POD_IP: &str = "\0pod-ip\0";

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PodPlan {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub restart_policy: RestartPolicy,
    /// Grace period for stopping containers (already capped).
    pub grace: Duration,
    /// `metadata.deletionTimestamp` is set: stop everything, restart nothing.
    pub deleting: bool,
    pub qos_class: &'static str,
    pub volumes: Vec<(String, VolumePlan)>,
    pub init_containers: Vec<ContainerPlan>,
    pub containers: Vec<ContainerPlan>,
    /// `spec.runtimeClassName` (which of the node's runtimes runs it).
    pub runtime_class: Option<String>,
    /// `spec.securityContext` (the containers' own settings win).
    pub security: Value,
    /// `spec.hostNetwork` and the containers' host ports.
    pub network: PodNetwork,
}

impl PodPlan {
    /// `{namespace}_{name}_{uid}`: the pod's directory name under
    /// `root/pods` and `root/logs`.
    pub fn dir_name(&self) -> String {
        format!("{}_{}_{}", self.namespace, self.name, self.uid)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ContainerPlan {
    pub name: String,
    pub image: String,
    /// The container's JSON: a change restarts the container.
    pub spec: Value,
    /// Executable, arguments and declared environment, or why they could
    /// not be resolved (`CreateContainerConfigError`).
    pub launch: Result<Launch, String>,
    pub working_dir: Option<PathBuf>,
    pub mounts: Vec<MountPlan>,
    pub startup: Option<ProbeSpec>,
    pub liveness: Option<ProbeSpec>,
    pub readiness: Option<ProbeSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Launch {
    pub program: String,
    pub args: Vec<String>,
    /// Declared environment (`envFrom`, then `env`), in order.
    pub env: Vec<(String, String)>,
    /// `command` and `args` as the spec gives them, expanded (a runtime
    /// with images takes empty ones from the image).
    pub command: Vec<String>,
    pub spec_args: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MountPlan {
    pub volume: String,
    pub mount_path: String,
    pub sub_path: Option<String>,
    pub read_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum VolumePlan {
    /// configMap, secret or projected: files to write, or why not.
    Files(Result<Vec<VolumeFile>, String>),
    /// emptyDir, and volume types the process runtime does not support.
    EmptyDir,
    HostPath {
        path: PathBuf,
        create: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct VolumeFile {
    /// Relative path inside the volume (validated: no `..`, not absolute).
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

type Lookup<'a> = &'a dyn Fn(&str) -> Option<Value>;

/// Whether `s` can be used as one path component.
pub(crate) fn safe_component(s: &str) -> bool {
    !s.is_empty() && s != "." && s != ".." && !s.contains('/') && !s.contains('\0')
}

/// Whether `s` is a relative path that stays inside its base directory.
pub(crate) fn safe_relative(s: &str) -> bool {
    !s.is_empty()
        && !s.contains('\0')
        && Path::new(s)
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn str_at<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn array_at<'a>(v: &'a Value, key: &str) -> &'a [Value] {
    v.get(key)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default()
}

fn bool_at(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn strings_at(v: &Value, key: &str) -> Vec<String> {
    array_at(v, key)
        .iter()
        .map(|s| {
            s.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| s.to_string())
        })
        .collect()
}

/// Builds the plan of one pod; `Err` when the pod cannot be run at all.
pub(crate) fn plan_pod(
    pod: &Value,
    cfg: &EdgedConfig,
    lookup: Lookup<'_>,
) -> Result<PodPlan, String> {
    let meta = pod.get("metadata").ok_or("pod has no metadata")?;
    let name = str_at(meta, "name").ok_or("pod has no name")?.to_owned();
    let namespace = str_at(meta, "namespace").unwrap_or("default").to_owned();
    let uid = str_at(meta, "uid").unwrap_or("nouid").to_owned();
    for part in [&name, &namespace, &uid] {
        if !safe_component(part) {
            return Err(format!("unusable pod name, namespace or uid {part:?}"));
        }
    }
    let spec = pod.get("spec").ok_or("pod has no spec")?;
    let restart_policy = match str_at(spec, "restartPolicy") {
        Some("Never") => RestartPolicy::Never,
        Some("OnFailure") => RestartPolicy::OnFailure,
        _ => RestartPolicy::Always,
    };
    let deleting = meta.get("deletionTimestamp").is_some_and(|t| !t.is_null());
    let grace_secs = meta
        .get("deletionGracePeriodSeconds")
        .filter(|_| deleting)
        .or_else(|| spec.get("terminationGracePeriodSeconds"))
        .and_then(Value::as_u64)
        .unwrap_or(30);
    let grace = Duration::from_secs(grace_secs).min(MAX_REMOVE_GRACE);

    let ctx = PodCtx {
        pod,
        namespace: &namespace,
        cfg,
        lookup,
    };
    let volumes = array_at(spec, "volumes")
        .iter()
        .filter_map(|v| Some((str_at(v, "name")?.to_owned(), ctx.volume(v))))
        .collect();
    let mut seen = Vec::new();
    let mut containers_of = |key: &str| -> Result<Vec<ContainerPlan>, String> {
        let mut out = Vec::new();
        for c in array_at(spec, key) {
            let plan = ctx.container(c)?;
            if seen.contains(&plan.name) {
                return Err(format!("duplicate container name {:?}", plan.name));
            }
            seen.push(plan.name.clone());
            out.push(plan);
        }
        Ok(out)
    };
    let init_containers = containers_of("initContainers")?;
    let containers = containers_of("containers")?;
    if containers.is_empty() {
        return Err("pod has no containers".into());
    }
    let all: Vec<&Value> = array_at(spec, "initContainers")
        .iter()
        .chain(array_at(spec, "containers"))
        .collect();
    let network = PodNetwork {
        host: bool_at(spec, "hostNetwork"),
        host_ports: all
            .iter()
            .flat_map(|c| array_at(c, "ports"))
            .filter_map(|p| {
                let port = |key: &str| u16::try_from(p.get(key)?.as_u64()?).ok().filter(|p| *p > 0);
                Some(HostPort {
                    container_port: port("containerPort")?,
                    host_port: port("hostPort")?,
                    protocol: str_at(p, "protocol").unwrap_or("TCP").to_owned(),
                    host_ip: str_at(p, "hostIP").unwrap_or_default().to_owned(),
                })
            })
            .collect(),
    };
    Ok(PodPlan {
        network,
        runtime_class: str_at(spec, "runtimeClassName")
            .filter(|c| !c.is_empty())
            .map(str::to_owned),
        security: spec.get("securityContext").cloned().unwrap_or(Value::Null),
        qos_class: qos_class(&all),
        namespace,
        name,
        uid,
        restart_policy,
        grace,
        deleting,
        volumes,
        init_containers,
        containers,
    })
}

/// "BestEffort" without any requests or limits, "Guaranteed" when every
/// container's cpu and memory requests equal its limits, else "Burstable".
fn qos_class(containers: &[&Value]) -> &'static str {
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let requests = c.pointer("/resources/requests").and_then(Value::as_object);
        let limits = c.pointer("/resources/limits").and_then(Value::as_object);
        any |= requests.is_some_and(|r| !r.is_empty()) || limits.is_some_and(|l| !l.is_empty());
        for resource in ["cpu", "memory"] {
            let limit = limits.and_then(|l| l.get(resource));
            let request = requests.and_then(|r| r.get(resource)).or(limit);
            if limit.is_none() || request != limit {
                guaranteed = false;
            }
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

struct PodCtx<'a> {
    pod: &'a Value,
    namespace: &'a str,
    cfg: &'a EdgedConfig,
    lookup: Lookup<'a>,
}

/// The key/value data of a configmap (`data`, `binaryData`) or secret
/// (`data` base64, `stringData` plain).
fn source_data(obj: &Value, secret: bool) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let b64 = |k: &str, v: &Value| -> Result<Vec<u8>, String> {
        base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .map_err(|e| format!("key {k:?}: invalid base64: {e}"))
    };
    let (plain, encoded) = if secret {
        ("stringData", "data")
    } else {
        ("data", "binaryData")
    };
    if let Some(map) = obj.get(encoded).and_then(Value::as_object) {
        for (k, v) in map {
            out.insert(k.clone(), b64(k, v)?);
        }
    }
    if let Some(map) = obj.get(plain).and_then(Value::as_object) {
        for (k, v) in map {
            out.insert(
                k.clone(),
                v.as_str().unwrap_or_default().as_bytes().to_vec(),
            );
        }
    }
    Ok(out)
}

impl PodCtx<'_> {
    /// Data of `configmaps/{ns}/{name}` or `secrets/{ns}/{name}`; `Ok(None)`
    /// when it does not exist.
    fn source(
        &self,
        secret: bool,
        name: &str,
    ) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
        let kind = if secret { "secrets" } else { "configmaps" };
        match (self.lookup)(&format!("{kind}/{}/{name}", self.namespace)) {
            Some(obj) => source_data(&obj, secret).map(Some),
            None => Ok(None),
        }
    }

    fn container(&self, c: &Value) -> Result<ContainerPlan, String> {
        let name = str_at(c, "name").ok_or("container has no name")?.to_owned();
        if !safe_component(&name) {
            return Err(format!("unusable container name {name:?}"));
        }
        let image = str_at(c, "image").unwrap_or_default().to_owned();
        let launch = self.env(c).map(|env| {
            let command = strings_at(c, "command");
            let args = strings_at(c, "args");
            let lookup = |var: &str| {
                env.iter()
                    .rev()
                    .find(|(k, _)| k == var)
                    .map(|(_, v)| v.as_str())
            };
            let command: Vec<String> = command.iter().map(|a| expand(a, lookup)).collect();
            let spec_args: Vec<String> = args.iter().map(|a| expand(a, lookup)).collect();
            let (program, rest) = match command.split_first() {
                Some((program, rest)) => (program.clone(), rest.to_vec()),
                None => (expand(&image, lookup), Vec::new()),
            };
            Launch {
                program,
                args: rest.into_iter().chain(spec_args.iter().cloned()).collect(),
                env,
                command,
                spec_args,
            }
        });
        let ports: Vec<(String, u16)> = array_at(c, "ports")
            .iter()
            .filter_map(|p| {
                let port = u16::try_from(p.get("containerPort")?.as_u64()?).ok()?;
                Some((str_at(p, "name").unwrap_or_default().to_owned(), port))
            })
            .collect();
        let probe = |key: &str| {
            c.get(key)
                .filter(|p| p.is_object())
                .map(|p| ProbeSpec::parse(p, &ports, POD_IP))
        };
        Ok(ContainerPlan {
            image,
            spec: c.clone(),
            launch,
            working_dir: str_at(c, "workingDir")
                .filter(|d| !d.is_empty())
                .map(PathBuf::from),
            mounts: array_at(c, "volumeMounts")
                .iter()
                .filter_map(|m| {
                    Some(MountPlan {
                        volume: str_at(m, "name")?.to_owned(),
                        mount_path: str_at(m, "mountPath")?.to_owned(),
                        sub_path: str_at(m, "subPath")
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned),
                        read_only: bool_at(m, "readOnly"),
                    })
                })
                .collect(),
            startup: probe("startupProbe"),
            liveness: probe("livenessProbe"),
            readiness: probe("readinessProbe"),
            name,
        })
    }

    /// The declared environment: `envFrom` sources in order, then `env`
    /// (whose values may reference earlier variables as `$(VAR)`).
    fn env(&self, c: &Value) -> Result<Vec<(String, String)>, String> {
        let mut env: Vec<(String, String)> = Vec::new();
        fn set(env: &mut Vec<(String, String)>, key: String, value: String) {
            match env.iter_mut().find(|(k, _)| *k == key) {
                Some(entry) => entry.1 = value,
                None => env.push((key, value)),
            }
        }
        for from in array_at(c, "envFrom") {
            let prefix = str_at(from, "prefix").unwrap_or_default();
            let (reference, secret) = match (from.get("configMapRef"), from.get("secretRef")) {
                (Some(r), _) => (r, false),
                (None, Some(r)) => (r, true),
                (None, None) => continue,
            };
            let name = str_at(reference, "name").unwrap_or_default();
            let Some(data) = self.source(secret, name)? else {
                if bool_at(reference, "optional") {
                    continue;
                }
                let kind = if secret { "secret" } else { "configmap" };
                return Err(format!("{kind} \"{name}\" not found"));
            };
            for (key, value) in data {
                let key = format!("{prefix}{key}");
                if key.is_empty() || key.contains('=') || key.contains('\0') {
                    continue;
                }
                set(&mut env, key, String::from_utf8_lossy(&value).into_owned());
            }
        }
        for e in array_at(c, "env") {
            let Some(name) = str_at(e, "name") else {
                continue;
            };
            let value = if let Some(value) = str_at(e, "value") {
                Some(expand(value, |var| {
                    env.iter().find(|(k, _)| k == var).map(|(_, v)| v.as_str())
                }))
            } else if let Some(from) = e.get("valueFrom") {
                self.value_from(from)?
            } else {
                Some(String::new())
            };
            if let Some(value) = value {
                set(&mut env, name.to_owned(), value);
            }
        }
        Ok(env)
    }

    /// `valueFrom`: `Ok(None)` leaves the variable unset (optional and
    /// missing, or an unsupported source).
    fn value_from(&self, from: &Value) -> Result<Option<String>, String> {
        for (field, secret) in [("configMapKeyRef", false), ("secretKeyRef", true)] {
            let Some(reference) = from.get(field) else {
                continue;
            };
            let name = str_at(reference, "name").unwrap_or_default();
            let key = str_at(reference, "key").unwrap_or_default();
            let kind = if secret { "Secret" } else { "ConfigMap" };
            let value = self.source(secret, name)?.and_then(|mut d| d.remove(key));
            return match value {
                Some(v) => Ok(Some(String::from_utf8_lossy(&v).into_owned())),
                None if bool_at(reference, "optional") => Ok(None),
                None => Err(format!(
                    "couldn't find key {key} in {kind} {}/{name}",
                    self.namespace
                )),
            };
        }
        if let Some(path) = from.pointer("/fieldRef/fieldPath").and_then(Value::as_str) {
            return Ok(self.field(path));
        }
        Ok(None)
    }

    /// Downward API `fieldRef` values.
    fn field(&self, path: &str) -> Option<String> {
        let pod = self.pod;
        let meta_map = |map: &str, rest: &str| {
            let key = rest.strip_prefix("['")?.strip_suffix("']")?;
            Some(
                pod.get("metadata")?
                    .get(map)?
                    .get(key)?
                    .as_str()?
                    .to_owned(),
            )
        };
        match path {
            "metadata.name" | "metadata.namespace" | "metadata.uid" => Some(
                pod.pointer(&format!("/{}", path.replace('.', "/")))?
                    .as_str()?
                    .to_owned(),
            ),
            "spec.nodeName" => Some(
                str_at(pod.get("spec")?, "nodeName")
                    .unwrap_or(&self.cfg.node_name)
                    .to_owned(),
            ),
            "spec.serviceAccountName" => {
                Some(str_at(pod.get("spec")?, "serviceAccountName")?.to_owned())
            }
            "status.hostIP" | "status.hostIPs" => Some(self.cfg.host_ip.clone()),
            // Known once the pod's sandbox is made (see `POD_IP`).
            "status.podIP" | "status.podIPs" => Some(POD_IP.to_owned()),
            _ => {
                if let Some(rest) = path.strip_prefix("metadata.labels") {
                    meta_map("labels", rest)
                } else if let Some(rest) = path.strip_prefix("metadata.annotations") {
                    meta_map("annotations", rest)
                } else {
                    None
                }
            }
        }
    }

    fn volume(&self, v: &Value) -> VolumePlan {
        if let Some(cm) = v.get("configMap") {
            let mode = mode_at(cm, "defaultMode");
            return VolumePlan::Files(self.project(cm, false, mode));
        }
        if let Some(secret) = v.get("secret") {
            let mode = mode_at(secret, "defaultMode");
            return VolumePlan::Files(self.project(secret, true, mode));
        }
        if let Some(projected) = v.get("projected") {
            let mode = mode_at(projected, "defaultMode");
            let mut files = Vec::new();
            for source in array_at(projected, "sources") {
                let part = match (source.get("configMap"), source.get("secret")) {
                    (Some(cm), _) => self.project(cm, false, mode),
                    (None, Some(secret)) => self.project(secret, true, mode),
                    // serviceAccountToken, downwardAPI, clusterTrustBundle:
                    // not provided by the process runtime.
                    (None, None) => continue,
                };
                match part {
                    Ok(part) => files.extend(part),
                    Err(e) => return VolumePlan::Files(Err(e)),
                }
            }
            return VolumePlan::Files(Ok(files));
        }
        if let Some(host) = v.get("hostPath") {
            return VolumePlan::HostPath {
                path: PathBuf::from(str_at(host, "path").unwrap_or("/")),
                create: str_at(host, "type") == Some("DirectoryOrCreate"),
            };
        }
        // emptyDir, and every type a process runtime cannot provide.
        VolumePlan::EmptyDir
    }

    /// Files of a configMap/secret volume (or projection): all keys, or the
    /// `items` (key → path, mode).
    fn project(
        &self,
        source: &Value,
        secret: bool,
        default_mode: Option<u32>,
    ) -> Result<Vec<VolumeFile>, String> {
        let name = if secret {
            str_at(source, "secretName").or_else(|| str_at(source, "name"))
        } else {
            str_at(source, "name")
        }
        .unwrap_or_default();
        let optional = bool_at(source, "optional");
        let kind = if secret { "secret" } else { "configmap" };
        let mode = mode_at(source, "defaultMode")
            .or(default_mode)
            .unwrap_or(0o644);
        // A secret's files are its owner's only: the process runtime's
        // pods share the host, so group and others are left out whatever
        // mode is asked (the API server defaults it to 0644).
        let owner_only = |m: u32| if secret { m & 0o700 } else { m };
        let mode = owner_only(mode);
        let Some(mut data) = self.source(secret, name)? else {
            return if optional {
                Ok(Vec::new())
            } else {
                Err(format!("{kind} \"{name}\" not found"))
            };
        };
        let items = array_at(source, "items");
        let mut files = Vec::new();
        if items.is_empty() {
            for (key, data) in data {
                if safe_component(&key) {
                    files.push(VolumeFile {
                        path: key,
                        data,
                        mode,
                    });
                }
            }
            return Ok(files);
        }
        for item in items {
            let key = str_at(item, "key").unwrap_or_default();
            let path = str_at(item, "path").unwrap_or(key);
            if !safe_relative(path) {
                return Err(format!("{kind} \"{name}\": invalid path {path:?}"));
            }
            match data.remove(key) {
                Some(data) => files.push(VolumeFile {
                    path: path.to_owned(),
                    data,
                    mode: mode_at(item, "mode").map_or(mode, owner_only),
                }),
                None if optional => {}
                None => return Err(format!("{kind} \"{name}\" has no key {key:?}")),
            }
        }
        Ok(files)
    }
}

fn mode_at(v: &Value, key: &str) -> Option<u32> {
    v.get(key)
        .and_then(Value::as_u64)
        .and_then(|m| u32::try_from(m & 0o7777).ok())
}

/// Kubernetes `$(VAR)` expansion: `$(VAR)` becomes the variable's value when
/// defined and stays as written otherwise; `$$` is an escaped `$`.
pub(crate) fn expand<'a>(input: &str, lookup: impl Fn(&str) -> Option<&'a str>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        let (before, after) = rest.split_at(pos);
        out.push_str(before);
        let after = after.get(1..).unwrap_or_default();
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('(') {
            match tail.find(')') {
                Some(end) => {
                    let name = tail.get(..end).unwrap_or_default();
                    match lookup(name) {
                        Some(value) => out.push_str(value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = tail.get(end + 1..).unwrap_or_default();
                }
                None => {
                    out.push_str("$(");
                    rest = tail;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A Kubernetes quantity (`64Mi`, `500m`, `1.5`, `2G`) in thousandths of
/// its unit, or `None` if it is not one.
pub(crate) fn quantity_milli(q: &str) -> Option<i64> {
    let q = q.trim();
    let split = q
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(q.len());
    let (number, suffix) = q.split_at(split);
    let number: f64 = number.parse().ok()?;
    let factor: f64 = match suffix {
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "" => 1.0,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        "Ki" => 1024.0,
        "Mi" => 1024.0 * 1024.0,
        "Gi" => 1024.0 * 1024.0 * 1024.0,
        "Ti" => 1024.0_f64.powi(4),
        "Pi" => 1024.0_f64.powi(5),
        "Ei" => 1024.0_f64.powi(6),
        _ => return None,
    };
    let milli = (number * factor * 1000.0).ceil();
    (milli.is_finite() && milli >= 0.0 && milli < i64::MAX as f64).then_some(milli as i64)
}
