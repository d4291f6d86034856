//! [`CriRuntime`]: pods as containers of a CRI runtime (containerd),
//! driven over its unix socket with the Kubernetes Container Runtime
//! Interface (`runtime.v1`).
//!
//! Each pod gets one sandbox, made before its first container starts and
//! labelled with the pod's uid. A pod without `hostNetwork` gets a network
//! of its own when the runtime reports its network ready (containerd with
//! a CNI configuration): its sandbox's IP is the pod's IP, and its host
//! ports are mapped by the CNI plugins. Otherwise (and for `hostNetwork`)
//! the sandbox shares the node's network. Containers write
//! their output to the pod's log directory in the CRI format, which
//! `kubectl logs` reads as for the process runtime. A container's end is
//! learnt by polling its status; `OOMKilled` comes from the runtime.
//!
//! The Runtime trait is synchronous where it starts containers: the CRI
//! calls run on the caller's worker with `block_in_place` (edgecore's
//! runtime is multi-threaded), each under a deadline.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use keel_proto::cri;
use keel_proto::cri::image_service_client::ImageServiceClient;
use keel_proto::cri::runtime_service_client::RuntimeServiceClient;
use tokio::sync::watch;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

use super::Error;
use super::runtime::{
    BoxFuture, ContainerHandle, ExitStatus, LaunchSpec, PodNetwork, PodRef, PullPolicy, Runtime,
    StopSignal,
};

/// Label naming the pod uid on sandboxes and containers keel makes.
const POD_UID_LABEL: &str = "io.kubernetes.pod.uid";
/// Label naming the container on containers keel makes.
const CONTAINER_LABEL: &str = "io.kubernetes.container.name";
/// Label holding a hash of what the container was made from: a container
/// left running is adopted only if it still matches its spec.
const SPEC_LABEL: &str = "keel.io/spec-hash";
/// Deadline of one CRI call that does not pull an image.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Deadline of an image pull.
const PULL_TIMEOUT: Duration = Duration::from_secs(600);
/// How often a running container's status is asked for.
const POLL: Duration = Duration::from_millis(500);
/// A Term asks the container to stop within this long (the worker sends
/// Kill after the pod's grace period anyway).
const TERM_TIMEOUT_SECS: i64 = 3600;

/// A hash of everything a container is made from but its attempt.
fn spec_hash(spec: &LaunchSpec) -> String {
    let mut iso = spec.isolated.clone();
    iso.attempt = 0;
    let text = format!("{:?}|{}|{}|{:?}", iso, spec.name, spec.image, spec.stdin);
    blake3::hash(text.as_bytes()).to_hex()[..32].to_owned()
}

fn rpc(what: &str, e: &tonic::Status) -> Error {
    Error::Runtime(format!("{what}: {}", e.message()))
}

/// Runs `f` to completion from synchronous code inside edgecore's runtime.
fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, Error> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    let handle = Handle::try_current().map_err(|_| Error::NoRuntime)?;
    if handle.runtime_flavor() != RuntimeFlavor::MultiThread {
        return Err(Error::Runtime(
            "the CRI runtime needs a multi-threaded tokio runtime".into(),
        ));
    }
    Ok(tokio::task::block_in_place(|| handle.block_on(f)))
}

async fn timed<T>(
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(e)) => Err(rpc(what, &e)),
        Err(_) => Err(Error::Runtime(format!(
            "{what}: no answer within {limit:?}"
        ))),
    }
}

/// A container's status as the runtime reports it (`None`: no status).
async fn container_status(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<Option<cri::ContainerStatus>, Error> {
    timed(
        "ContainerStatus",
        CALL_TIMEOUT,
        rt.container_status(cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        }),
    )
    .await
    .map(|r| r.status)
}

/// The sandboxes keel made for pod `uid` (only ready ones if `ready`).
async fn pod_sandboxes(
    rt: &mut RuntimeServiceClient<Channel>,
    uid: &str,
    ready: bool,
) -> Result<Vec<cri::PodSandbox>, Error> {
    timed(
        "ListPodSandbox",
        CALL_TIMEOUT,
        rt.list_pod_sandbox(cri::ListPodSandboxRequest {
            filter: Some(cri::PodSandboxFilter {
                id: String::new(),
                state: ready.then_some(cri::PodSandboxStateValue {
                    state: cri::PodSandboxState::SandboxReady as i32,
                }),
                label_selector: [(POD_UID_LABEL.to_owned(), uid.to_owned())].into(),
            }),
        }),
    )
    .await
    .map(|r| r.items)
}

/// Whether the runtime can give pods a network of their own: its
/// `NetworkReady` condition (containerd: a CNI configuration is loaded).
async fn network_ready(rt: &mut RuntimeServiceClient<Channel>) -> bool {
    match timed(
        "Status",
        CALL_TIMEOUT,
        rt.status(cri::StatusRequest { verbose: false }),
    )
    .await
    {
        Ok(r) => r.status.is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.r#type == "NetworkReady" && c.status)
        }),
        Err(e) => {
            warn!(error = %e, "cannot read the runtime's status; pods share the node's network");
            false
        }
    }
}

/// The pod's log directory (the sandbox's), where `spec`'s log file is
/// `<container>/<n>.log`.
fn pod_log_dir(spec: &LaunchSpec) -> Result<&Path, Error> {
    spec.log_file
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| Error::Runtime("log file outside a pod log directory".into()))
}

/// Stops the sandbox `id` of pod `uid` (its network torn down) and
/// removes it; failures are logged.
async fn remove_sandbox(rt: &mut RuntimeServiceClient<Channel>, id: &str, uid: &str) {
    let stopped = timed(
        "StopPodSandbox",
        CALL_TIMEOUT,
        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }),
    )
    .await
    .map(drop);
    let removed = timed(
        "RemovePodSandbox",
        CALL_TIMEOUT,
        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }),
    )
    .await
    .map(drop);
    for r in [stopped, removed] {
        if let Err(e) = r {
            warn!(pod_uid = %uid, sandbox = %id, error = %e, "cannot remove pod sandbox");
        }
    }
}

/// The sandbox `id` as its status describes it, and whether it is ready.
async fn sandbox_status(
    rt: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<(Sandbox, bool), Error> {
    let r = timed(
        "PodSandboxStatus",
        CALL_TIMEOUT,
        rt.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: false,
        }),
    )
    .await?;
    let status = r.status.unwrap_or_default();
    let ready = status.state == cri::PodSandboxState::SandboxReady as i32;
    let own_network = status
        .linux
        .and_then(|l| l.namespaces)
        .and_then(|n| n.options)
        .is_some_and(|o| o.network == cri::NamespaceMode::Pod as i32);
    let sandbox = Sandbox {
        id: id.to_owned(),
        attempt: status.metadata.as_ref().map_or(0, |m| m.attempt),
        own_network,
        ip: status
            .network
            .map(|n| n.ip)
            .filter(|ip| own_network && !ip.is_empty()),
    };
    Ok((sandbox, ready))
}

/// A pod's sandbox.
#[derive(Debug, Clone)]
struct Sandbox {
    id: String,
    /// It has a network namespace of its own (else the node's).
    own_network: bool,
    /// Its IP on a pod network; `None` on the node's network.
    ip: Option<String>,
    /// The pod's how-manieth sandbox (CRI attempt).
    attempt: u32,
}

/// The namespaces of keel's pods and containers: the node's network or the
/// pod's, a PID namespace per container, IPC shared in the pod.
fn namespaces(own_network: bool) -> Option<cri::NamespaceOption> {
    Some(cri::NamespaceOption {
        network: if own_network {
            cri::NamespaceMode::Pod as i32
        } else {
            cri::NamespaceMode::Node as i32
        },
        pid: cri::NamespaceMode::Container as i32,
        ipc: cri::NamespaceMode::Pod as i32,
    })
}

/// A CRI runtime reached over a unix socket.
pub struct CriRuntime {
    socket: PathBuf,
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    /// Pod uid → its sandbox.
    sandboxes: Mutex<HashMap<String, Sandbox>>,
}

impl std::fmt::Debug for CriRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriRuntime")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

impl CriRuntime {
    /// Connects to the CRI socket at `socket` and checks that it answers
    /// `Version` with the v1 API.
    pub async fn connect(socket: &Path) -> Result<Arc<CriRuntime>, Error> {
        let path = socket.to_path_buf();
        let channel = tonic::transport::Endpoint::from_static("http://cri.invalid")
            .connect_timeout(Duration::from_secs(5))
            .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| {
                Error::Runtime(format!(
                    "cannot reach the CRI socket {}: {e}",
                    socket.display()
                ))
            })?;
        let mut runtime = RuntimeServiceClient::new(channel.clone());
        let v = timed(
            "Version",
            CALL_TIMEOUT,
            runtime.version(cri::VersionRequest {
                version: "v1".into(),
            }),
        )
        .await?;
        if v.runtime_api_version != "v1" {
            return Err(Error::Runtime(format!(
                "the CRI runtime at {} speaks {:?}, not v1",
                socket.display(),
                v.runtime_api_version
            )));
        }
        info!(socket = %socket.display(), runtime = %v.runtime_name, version = %v.runtime_version, "CRI runtime connected");
        Ok(Arc::new(CriRuntime {
            socket: socket.to_path_buf(),
            runtime,
            images: ImageServiceClient::new(channel),
            sandboxes: Mutex::default(),
        }))
    }

    fn sandboxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox_config(
        pod: &PodRef,
        network: &PodNetwork,
        own_network: bool,
        log_dir: &Path,
        attempt: u32,
    ) -> cri::PodSandboxConfig {
        let protocol = |p: &str| match p {
            "UDP" => cri::Protocol::Udp,
            "SCTP" => cri::Protocol::Sctp,
            _ => cri::Protocol::Tcp,
        };
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt,
            }),
            // On the node's network the sandbox shares the node's UTS
            // namespace too, and has no hostname of its own.
            hostname: if own_network {
                pod.name.clone()
            } else {
                String::new()
            },
            port_mappings: if own_network {
                network
                    .host_ports
                    .iter()
                    .map(|p| cri::PortMapping {
                        protocol: protocol(&p.protocol) as i32,
                        container_port: i32::from(p.container_port),
                        host_port: i32::from(p.host_port),
                        host_ip: p.host_ip.clone(),
                    })
                    .collect()
            } else {
                Vec::new()
            },
            log_directory: log_dir.to_string_lossy().into_owned(),
            labels: [(POD_UID_LABEL.to_owned(), pod.uid.clone())].into(),
            annotations: HashMap::new(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: namespaces(own_network),
                    ..Default::default()
                }),
            }),
        }
    }

    /// The pod's ready sandbox: known, found by label, or made now (with a
    /// network of its own unless the pod asks for the node's or the
    /// runtime has none to give). Sandboxes of the pod that are no longer
    /// ready (their containers died with them, as at a reboot) are removed
    /// first, and the new one takes the next attempt number.
    async fn sandbox(&self, spec: &LaunchSpec) -> Result<Sandbox, Error> {
        let pod = &spec.isolated.pod;
        let mut rt = self.runtime.clone();
        let known = self.sandboxes().get(&pod.uid).cloned();
        if let Some(known) = known {
            match sandbox_status(&mut rt, &known.id).await {
                Ok((s, true)) => return Ok(s),
                _ => {
                    self.sandboxes().remove(&pod.uid);
                }
            }
        }
        let log_dir = pod_log_dir(spec)?;
        let all = pod_sandboxes(&mut rt, &pod.uid, false).await?;
        let ready = all
            .iter()
            .find(|s| s.state == cri::PodSandboxState::SandboxReady as i32);
        let id = match ready {
            Some(s) => s.id.clone(),
            None => {
                let attempt = all
                    .iter()
                    .filter_map(|s| s.metadata.as_ref())
                    .map(|m| m.attempt.saturating_add(1))
                    .max()
                    .unwrap_or(0);
                for old in &all {
                    remove_sandbox(&mut rt, &old.id, &pod.uid).await;
                }
                let network = &spec.isolated.network;
                let own_network = !network.host && network_ready(&mut rt).await;
                let config = Self::sandbox_config(pod, network, own_network, log_dir, attempt);
                let r = timed(
                    "RunPodSandbox",
                    CALL_TIMEOUT,
                    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(config),
                        runtime_handler: String::new(),
                    }),
                )
                .await?;
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), sandbox = %r.pod_sandbox_id, own_network, attempt, "pod sandbox ready");
                r.pod_sandbox_id
            }
        };
        let (sandbox, _) = sandbox_status(&mut rt, &id).await?;
        self.sandboxes().insert(pod.uid.clone(), sandbox.clone());
        Ok(sandbox)
    }

    /// Makes sure `image` is on the node, pulling it as `policy` says.
    async fn ensure_image(&self, image: &str, policy: PullPolicy) -> Result<(), Error> {
        if !valid_reference(image) {
            return Err(Error::Image {
                reason: "InvalidImageName",
                message: format!(
                    "Failed to apply default image tag {image:?}: couldn't parse image name {image:?}: invalid reference format"
                ),
            });
        }
        let mut images = self.images.clone();
        let spec = || {
            Some(cri::ImageSpec {
                image: image.to_owned(),
            })
        };
        let present = match images
            .image_status(cri::ImageStatusRequest { image: spec() })
            .await
        {
            Ok(r) => r.into_inner().image.is_some(),
            Err(e) if e.code() == tonic::Code::InvalidArgument => {
                return Err(Error::Image {
                    reason: "InvalidImageName",
                    message: format!(
                        "Failed to apply default image tag {image:?}: {}",
                        e.message()
                    ),
                });
            }
            Err(e) => return Err(rpc("ImageStatus", &e)),
        };
        match (present, policy) {
            (true, PullPolicy::IfNotPresent | PullPolicy::Never) => Ok(()),
            (false, PullPolicy::Never) => Err(Error::Image {
                reason: "ErrImageNeverPull",
                message: format!(
                    "Container image {image:?} is not present with pull policy of Never"
                ),
            }),
            (_, PullPolicy::Always | PullPolicy::IfNotPresent) => {
                debug!(%image, "pulling image");
                match tokio::time::timeout(
                    PULL_TIMEOUT,
                    images.pull_image(cri::PullImageRequest {
                        image: spec(),
                        sandbox_config: None,
                    }),
                )
                .await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(Error::Image {
                        reason: "ErrImagePull",
                        message: e.message().to_owned(),
                    }),
                    Err(_) => Err(Error::Image {
                        reason: "ErrImagePull",
                        message: format!("pulling {image:?} took longer than {PULL_TIMEOUT:?}"),
                    }),
                }
            }
        }
    }

    async fn start_async(&self, spec: &LaunchSpec) -> Result<Arc<CriContainer>, Error> {
        let iso = &spec.isolated;
        let log_dir = pod_log_dir(spec)?;
        let log_path = spec
            .log_file
            .strip_prefix(log_dir)
            .map_err(|e| Error::Runtime(e.to_string()))?
            .to_string_lossy()
            .into_owned();
        if let Some(dir) = spec.log_file.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        self.ensure_image(&spec.image, iso.pull_policy).await?;
        let Sandbox {
            id: sandbox,
            own_network,
            attempt,
            ..
        } = self.sandbox(spec).await?;
        let mut rt = self.runtime.clone();
        // The previous run of this container (exited) goes: its log stays.
        self.remove_exited(&sandbox, &spec.name).await;
        let limits = cri::LinuxContainerResources {
            cpu_period: if iso.cpu_limit_millis.is_some() {
                100_000
            } else {
                0
            },
            cpu_quota: iso.cpu_limit_millis.map_or(0, |m| (m * 100).max(1000)),
            cpu_shares: iso
                .cpu_request_millis
                .or(iso.cpu_limit_millis)
                .map_or(2, |m| (m * 1024 / 1000).max(2)),
            memory_limit_in_bytes: iso.memory_limit.unwrap_or(0),
            oom_score_adj: 0,
        };
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata {
                name: spec.name.clone(),
                attempt: iso.attempt,
            }),
            image: Some(cri::ImageSpec {
                image: spec.image.clone(),
            }),
            command: iso.command.clone(),
            args: iso.args.clone(),
            working_dir: iso.working_dir.clone(),
            envs: iso
                .env
                .iter()
                .map(|(k, v)| cri::KeyValue {
                    key: k.clone(),
                    value: v.clone(),
                })
                .collect(),
            mounts: iso
                .mounts
                .iter()
                .map(|m| cri::Mount {
                    container_path: m.container_path.clone(),
                    host_path: m.host_path.to_string_lossy().into_owned(),
                    readonly: m.read_only,
                })
                .collect(),
            labels: [
                (POD_UID_LABEL.to_owned(), iso.pod.uid.clone()),
                (CONTAINER_LABEL.to_owned(), spec.name.clone()),
                (SPEC_LABEL.to_owned(), spec_hash(spec)),
            ]
            .into(),
            annotations: HashMap::new(),
            log_path,
            stdin: spec.stdin,
            stdin_once: iso.stdin_once,
            tty: false,
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(limits),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged: iso.privileged,
                    namespace_options: namespaces(own_network),
                    run_as_user: iso.run_as_user.map(|value| cri::Int64Value { value }),
                    readonly_rootfs: iso.read_only_root,
                    supplemental_groups: Vec::new(),
                    no_new_privs: !iso.privileged,
                    run_as_group: iso.run_as_group.map(|value| cri::Int64Value { value }),
                }),
            }),
        };
        let created = timed(
            "CreateContainer",
            CALL_TIMEOUT,
            rt.create_container(cri::CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(config),
                sandbox_config: Some(Self::sandbox_config(
                    &iso.pod,
                    &iso.network,
                    own_network,
                    log_dir,
                    attempt,
                )),
            }),
        )
        .await?;
        let id = created.container_id;
        if let Err(e) = timed(
            "StartContainer",
            CALL_TIMEOUT,
            rt.start_container(cri::StartContainerRequest {
                container_id: id.clone(),
            }),
        )
        .await
        {
            let _ = rt
                .remove_container(cri::RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await;
            return Err(e);
        }
        write_state(&spec.state_file, &id)?;
        let image_ref = container_status(&mut rt, &id)
            .await
            .ok()
            .flatten()
            .map(|s| s.image_ref)
            .unwrap_or_default();
        Ok(CriContainer::follow(
            self.runtime.clone(),
            id,
            image_ref,
            spec.state_file.clone(),
            rotation(spec),
            spec.stdin,
        ))
    }

    /// Removes the exited containers named `name` in `sandbox`.
    async fn remove_exited(&self, sandbox: &str, name: &str) {
        let mut rt = self.runtime.clone();
        let Ok(list) = timed(
            "ListContainers",
            CALL_TIMEOUT,
            rt.list_containers(cri::ListContainersRequest {
                filter: Some(cri::ContainerFilter {
                    id: String::new(),
                    state: Some(cri::ContainerStateValue {
                        state: cri::ContainerState::ContainerExited as i32,
                    }),
                    pod_sandbox_id: sandbox.to_owned(),
                    label_selector: [(CONTAINER_LABEL.to_owned(), name.to_owned())].into(),
                }),
            }),
        )
        .await
        else {
            return;
        };
        for c in list.containers {
            let _ = rt
                .remove_container(cri::RemoveContainerRequest { container_id: c.id })
                .await;
        }
    }
}

/// Imports the image archive `archive` (an OCI image layout, or `docker
/// save`) into the containerd at `socket`, in the namespace its CRI
/// plugin uses, with containerd's own client (`ctr`, shipped with
/// containerd). Returns what it printed (the images imported).
pub fn import_image(socket: &Path, archive: &Path) -> Result<String, Error> {
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(socket)
        .args(["--namespace", "k8s.io", "images", "import"])
        .arg(archive)
        .output()
        .map_err(|e| Error::Spawn {
            program: "ctr".into(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(Error::Runtime(format!(
            "importing {}: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `r` is an image reference as the distribution grammar has it:
/// `[domain[:port]/]path[:tag][@algorithm:hex]`, path components
/// lowercase alphanumerics with `.`, `_` or `-` inside.
fn valid_reference(r: &str) -> bool {
    if r.is_empty() || r.len() > 255 {
        return false;
    }
    let (name, digest) = match r.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (r, None),
    };
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return false;
        };
        if alg.is_empty() || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return false;
        }
    }
    let (path, tag) = match name.rsplit_once(':') {
        Some((p, t)) if !t.contains('/') => (p, Some(t)),
        _ => (name, None),
    };
    if let Some(t) = tag {
        let mut cs = t.chars();
        let first_ok = cs
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !first_ok
            || t.len() > 128
            || !cs.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        {
            return false;
        }
    }
    let parts: Vec<&str> = path.split('/').collect();
    let domain = parts.len() > 1
        && parts
            .first()
            .is_some_and(|d| d.contains('.') || d.contains(':') || *d == "localhost");
    parts.iter().enumerate().all(|(i, p)| {
        if i == 0 && domain {
            let (host, port) = p.split_once(':').unwrap_or((p, ""));
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
                && port.chars().all(|c| c.is_ascii_digit())
        } else {
            let edge_ok =
                |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            edge_ok(p.chars().next())
                && edge_ok(p.chars().last())
                && p.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
                })
        }
    })
}

/// How `spec`'s log file rotates.
fn rotation(spec: &LaunchSpec) -> super::crilog::Rotation {
    super::crilog::Rotation {
        path: spec.log_file.clone(),
        max_size: spec.log_max_size,
        max_files: spec.log_max_files,
    }
}

/// Records the container id for [`Runtime::kill_leftover`], created with
/// its final content and mode (a rename into place).
fn write_state(path: &Path, id: &str) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, id).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

impl Runtime for CriRuntime {
    fn start(&self, spec: &LaunchSpec) -> Result<Arc<dyn ContainerHandle>, Error> {
        let c = block_on(self.start_async(spec))??;
        Ok(c)
    }

    fn kill_leftover(&self, state_file: &Path) -> Result<bool, Error> {
        let id = std::fs::read_to_string(state_file).map_err(|e| Error::io(state_file, e))?;
        let id = id.trim().to_owned();
        let mut rt = self.runtime.clone();
        let killed = block_on(async move {
            let stopped = rt
                .stop_container(cri::StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 0,
                })
                .await
                .is_ok();
            let _ = rt
                .remove_container(cri::RemoveContainerRequest { container_id: id })
                .await;
            stopped
        })?;
        let _ = std::fs::remove_file(state_file);
        Ok(killed)
    }

    fn state_extension(&self) -> &'static str {
        "cri"
    }

    fn adopts(&self) -> bool {
        true
    }

    fn adopt(
        &self,
        state_file: &Path,
        spec: &LaunchSpec,
    ) -> Result<Option<super::runtime::Adopted>, Error> {
        let id = std::fs::read_to_string(state_file).map_err(|e| Error::io(state_file, e))?;
        let id = id.trim().to_owned();
        let mut rt = self.runtime.clone();
        // An error is a container gone (the node rebooted, containerd lost
        // it): start anew.
        let status = block_on(container_status(&mut rt, &id))?.unwrap_or(None);
        let matches = status.as_ref().is_some_and(|s| {
            s.state == cri::ContainerState::ContainerRunning as i32
                && s.labels.get(POD_UID_LABEL) == Some(&spec.isolated.pod.uid)
                && s.labels.get(CONTAINER_LABEL) == Some(&spec.name)
                && s.labels.get(SPEC_LABEL) == Some(&spec_hash(spec))
        });
        match status {
            Some(s) if matches => {
                info!(container = %id, "adopting a container left running");
                let attempt = s.metadata.as_ref().map_or(0, |m| m.attempt);
                // Its sandbox, for the containers to come.
                let sandbox = block_on(self.sandbox(spec))??;
                debug!(sandbox = %sandbox.id, "the adopted container's sandbox");
                Ok(Some(super::runtime::Adopted {
                    handle: CriContainer::follow(
                        self.runtime.clone(),
                        id,
                        s.image_ref.clone(),
                        state_file.to_path_buf(),
                        rotation(spec),
                        spec.stdin,
                    ),
                    restart_count: attempt,
                    started_at_ns: s.started_at,
                }))
            }
            _ => {
                // Not what the pod asks any more (or gone): it goes.
                self.kill_leftover(state_file)?;
                Ok(None)
            }
        }
    }

    fn isolates(&self) -> bool {
        true
    }

    fn pod_ip(&self, spec: &LaunchSpec) -> Result<Option<String>, Error> {
        Ok(block_on(self.sandbox(spec))??.ip)
    }

    fn pod_removed(&self, pod: &PodRef) -> BoxFuture<'static, ()> {
        let known = self.sandboxes().remove(&pod.uid).map(|s| s.id);
        let mut rt = self.runtime.clone();
        let uid = pod.uid.clone();
        Box::pin(async move {
            let mut ids: Vec<String> = known.into_iter().collect();
            if let Ok(found) = pod_sandboxes(&mut rt, &uid, false).await {
                ids.extend(found.into_iter().map(|s| s.id));
            }
            ids.sort();
            ids.dedup();
            for id in ids {
                remove_sandbox(&mut rt, &id, &uid).await;
            }
        })
    }
}

/// A container of the CRI runtime, its end learnt by polling.
struct CriContainer {
    id: String,
    /// The image's id (digest) as the runtime reports it.
    image_ref: String,
    runtime: RuntimeServiceClient<Channel>,
    exited: watch::Receiver<Option<Result<ExitStatus, String>>>,
    /// Its spec asked for stdin (`stdin: true`).
    has_stdin: bool,
    /// Its stdin as attach sessions write to it.
    stdin: tokio::sync::Mutex<AttachedStdin>,
}

/// A container's stdin, written through one CRI `Attach` session (stdin
/// only; output is read from the container's log) opened at the first
/// write and kept for the container's life, so that attach sessions one
/// after the other write to it in turn.
enum AttachedStdin {
    NotOpen,
    Open(tokio::io::DuplexStream),
    /// Closed (`stdinOnce`, or writing failed).
    Closed,
}

/// Opens a stdin-only attach session to container `id`; what is written
/// to the returned pipe reaches its stdin, and the pipe's end closes it
/// (for a `stdinOnce` container; otherwise only the session ends).
async fn attach_stdin(
    mut rt: RuntimeServiceClient<Channel>,
    id: String,
) -> Result<tokio::io::DuplexStream, Error> {
    let url = timed(
        "Attach",
        CALL_TIMEOUT,
        rt.attach(cri::AttachRequest {
            container_id: id.clone(),
            stdin: true,
            tty: false,
            stdout: false,
            stderr: false,
        }),
    )
    .await?
    .url;
    let conn = super::cristream::upgrade(&url).await?;
    let (caller, stdin) = tokio::io::duplex(64 << 10);
    let (_, resize) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let pipes = super::cristream::Pipes {
            stdin,
            stdout: tokio::io::sink(),
            stderr: tokio::io::sink(),
            resize,
            cancel: None,
        };
        let status = super::cristream::run(conn, super::cristream::Outputs::Nothing, pipes).await;
        debug!(container = %id, status = ?status.as_deref().map(String::from_utf8_lossy), "attach session ended");
    });
    Ok(caller)
}

impl std::fmt::Debug for CriContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriContainer")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CriContainer {
    fn follow(
        runtime: RuntimeServiceClient<Channel>,
        id: String,
        image_ref: String,
        state_file: PathBuf,
        rotation: super::crilog::Rotation,
        has_stdin: bool,
    ) -> Arc<CriContainer> {
        let (tx, exited) = watch::channel(None);
        let mut rt = runtime.clone();
        let cid = id.clone();
        tokio::spawn(async move {
            // While the runtime does not answer (containerd restarting),
            // the container is not taken for ended: its shim keeps it
            // running, and a new one would run beside it. Only the
            // runtime saying it exited, or that it is gone, ends it.
            let mut wait = POLL;
            let end = loop {
                tokio::time::sleep(wait).await;
                match container_status(&mut rt, &cid).await {
                    Ok(Some(s)) if s.state == cri::ContainerState::ContainerExited as i32 => {
                        break Ok(ExitStatus {
                            code: Some(s.exit_code),
                            signal: None,
                            oom_killed: s.reason == "OOMKilled",
                        });
                    }
                    Ok(Some(_)) => {
                        wait = POLL;
                        // The runtime writes the log; rotating it is ours
                        // (as the kubelet's): move it aside, have the
                        // runtime open a new one.
                        let full = std::fs::metadata(&rotation.path)
                            .is_ok_and(|m| m.len() >= rotation.max_size);
                        if full {
                            match rotation.move_aside().await {
                                Ok(()) => {
                                    if let Err(e) = timed(
                                        "ReopenContainerLog",
                                        CALL_TIMEOUT,
                                        rt.reopen_container_log(cri::ReopenContainerLogRequest {
                                            container_id: cid.clone(),
                                        }),
                                    )
                                    .await
                                    {
                                        warn!(container = %cid, error = %e, "the runtime did not reopen a rotated log");
                                    }
                                }
                                Err(e) => {
                                    warn!(log = %rotation.path.display(), error = %e, "cannot rotate a container log")
                                }
                            }
                        }
                    }
                    Ok(None) => break Err("the container is gone from the runtime".to_owned()),
                    Err(Error::Runtime(m)) if m.contains("not found") => {
                        break Err("the container is gone from the runtime".to_owned());
                    }
                    Err(e) => {
                        debug!(container = %cid, error = %e, "the runtime does not answer");
                        wait = (wait * 2).min(Duration::from_secs(5));
                    }
                }
            };
            let _ = std::fs::remove_file(&state_file);
            let _ = tx.send(Some(end));
        });
        Arc::new(CriContainer {
            id,
            image_ref,
            runtime,
            exited,
            has_stdin,
            stdin: tokio::sync::Mutex::new(AttachedStdin::NotOpen),
        })
    }
}

impl ContainerHandle for CriContainer {
    fn id(&self) -> String {
        format!("containerd://{}", self.id)
    }

    fn write_stdin(&self, data: Option<bytes::Bytes>) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt as _;
            if !self.has_stdin {
                return Err(Error::Unsupported("stdin"));
            }
            let mut stdin = self.stdin.lock().await;
            let Some(data) = data else {
                *stdin = AttachedStdin::Closed;
                return Ok(());
            };
            if matches!(*stdin, AttachedStdin::NotOpen) {
                *stdin =
                    AttachedStdin::Open(attach_stdin(self.runtime.clone(), self.id.clone()).await?);
            }
            let AttachedStdin::Open(pipe) = &mut *stdin else {
                return Err(Error::NotRunning);
            };
            if let Err(e) = pipe.write_all(&data).await {
                *stdin = AttachedStdin::Closed;
                return Err(Error::Runtime(format!("writing to stdin: {e}")));
            }
            Ok(())
        })
    }

    fn image_id(&self) -> String {
        self.image_ref.clone()
    }

    fn signal(&self, signal: StopSignal) -> Result<(), Error> {
        if self.exited.borrow().is_some() {
            return Ok(());
        }
        let mut rt = self.runtime.clone();
        let id = self.id.clone();
        let timeout = match signal {
            StopSignal::Term => TERM_TIMEOUT_SECS,
            StopSignal::Kill => 0,
        };
        tokio::spawn(async move {
            if let Err(e) = rt
                .stop_container(cri::StopContainerRequest {
                    container_id: id.clone(),
                    timeout,
                })
                .await
            {
                debug!(container = %id, error = %e.message(), "StopContainer");
            }
        });
        Ok(())
    }

    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, Error>> {
        let mut rx = self.exited.clone();
        Box::pin(async move {
            let end = rx
                .wait_for(Option::is_some)
                .await
                .map_err(|_| Error::Runtime("the runtime stopped following it".into()))?
                .clone();
            match end {
                Some(Ok(status)) => Ok(status),
                Some(Err(e)) => Err(Error::Runtime(e)),
                None => Err(Error::Runtime("no exit status".into())),
            }
        })
    }

    fn exec_interactive(
        &self,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<super::runtime::ExecProcess, Error>> {
        let rt = self.runtime.clone();
        let id = self.id.clone();
        let running = self.exited.borrow().is_none();
        Box::pin(async move {
            if !running {
                return Err(Error::NotRunning);
            }
            let (p, _) = stream_exec(rt, id, command, false).await?;
            Ok(p)
        })
    }

    fn exec_terminal(
        &self,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<(super::runtime::ExecProcess, super::TerminalResize), Error>>
    {
        let rt = self.runtime.clone();
        let id = self.id.clone();
        let running = self.exited.borrow().is_none();
        Box::pin(async move {
            if !running {
                return Err(Error::NotRunning);
            }
            let (p, resize) = stream_exec(rt, id, command, true).await?;
            let resize: super::TerminalResize = Box::new(move |cols, rows| {
                let _ = resize.try_send((cols, rows));
            });
            Ok((p, resize))
        })
    }

    fn exec(
        &self,
        command: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<ExitStatus, Error>> {
        let mut rt = self.runtime.clone();
        let id = self.id.clone();
        let running = self.exited.borrow().is_none();
        Box::pin(async move {
            if !running {
                return Err(Error::NotRunning);
            }
            let secs = i64::try_from(timeout.as_secs().max(1)).unwrap_or(i64::MAX);
            let r = tokio::time::timeout(
                timeout + Duration::from_secs(5),
                rt.exec_sync(cri::ExecSyncRequest {
                    container_id: id,
                    cmd: command,
                    timeout: secs,
                }),
            )
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(|e| {
                if e.code() == tonic::Code::DeadlineExceeded || e.message().contains("timeout") {
                    Error::Timeout(timeout)
                } else {
                    rpc("ExecSync", &e)
                }
            })?
            .into_inner();
            Ok(ExitStatus {
                code: Some(r.exit_code),
                signal: None,
                oom_killed: false,
            })
        })
    }
}

/// The exit code in a remotecommand v4 status message (channel 3): 0 for
/// `Success`, the `ExitCode` cause of a `NonZeroExitCode`, else `None`.
fn status_exit_code(message: &[u8]) -> Option<i32> {
    let v: serde_json::Value = serde_json::from_slice(message).ok()?;
    if v.get("status").and_then(serde_json::Value::as_str) == Some("Success") {
        return Some(0);
    }
    v.pointer("/details/causes")?
        .as_array()?
        .iter()
        .find(|c| c.get("reason").and_then(serde_json::Value::as_str) == Some("ExitCode"))?
        .get("message")?
        .as_str()?
        .parse()
        .ok()
}

/// Runs `command` in container `id` through the runtime's streaming
/// server: CRI `Exec` gives a URL, which speaks the kubelet's
/// remote-command protocol over SPDY (`cristream`). Its streams are handed
/// to the caller as pipes (the end of stdin reaches the command); the
/// returned sender resizes the terminal.
async fn stream_exec(
    mut rt: RuntimeServiceClient<Channel>,
    id: String,
    command: Vec<String>,
    tty: bool,
) -> Result<
    (
        super::runtime::ExecProcess,
        tokio::sync::mpsc::Sender<(u16, u16)>,
    ),
    Error,
> {
    if command.is_empty() {
        return Err(Error::Runtime("exec: empty command".into()));
    }
    let url = timed(
        "Exec",
        CALL_TIMEOUT,
        rt.exec(cri::ExecRequest {
            container_id: id,
            cmd: command,
            tty,
            stdin: true,
            stdout: true,
            stderr: !tty,
        }),
    )
    .await?
    .url;
    let conn = super::cristream::upgrade(&url).await?;
    const PIPE: usize = 64 << 10;
    let (stdin_caller, stdin) = tokio::io::duplex(PIPE);
    let (stdout, stdout_caller) = tokio::io::duplex(PIPE);
    let (stderr, stderr_caller) = tokio::io::duplex(PIPE);
    let (result_tx, result_rx) = tokio::sync::oneshot::channel();
    let (cancel_tx, cancel) = tokio::sync::oneshot::channel::<()>();
    let (resize_tx, resize) = tokio::sync::mpsc::channel::<(u16, u16)>(4);
    tokio::spawn(async move {
        let pipes = super::cristream::Pipes {
            stdin,
            stdout,
            stderr,
            resize,
            cancel: Some(cancel),
        };
        let outputs = if tty {
            super::cristream::Outputs::Terminal
        } else {
            super::cristream::Outputs::Both
        };
        let status = super::cristream::run(conn, outputs, pipes).await;
        let _ = result_tx.send(match status.as_deref().and_then(status_exit_code) {
            Some(code) => Ok(ExitStatus {
                code: Some(code),
                signal: None,
                oom_killed: false,
            }),
            None => Err(Error::Runtime(
                "the exec session ended without a status".into(),
            )),
        });
    });
    Ok((
        super::runtime::ExecProcess {
            stdin: Some(Box::new(stdin_caller)),
            stdout: Box::new(stdout_caller),
            stderr: Box::new(stderr_caller),
            exit: super::runtime::ExecExit::new(result_rx, cancel_tx),
        },
        resize_tx,
    ))
}

#[cfg(test)]
mod tests {
    use super::valid_reference;

    #[test]
    fn image_references() {
        for good in [
            "busybox",
            "busybox:1.36",
            "docker.io/library/keel-busybox:1",
            "localhost:5000/team/app:v1.2_3",
            "registry.example.com/a/b",
            "app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(valid_reference(good), "{good}");
        }
        for bad in [
            "",
            "Not//A::Valid@@ref",
            "UPPER/case",
            "app:",
            "app:-tag",
            "app@sha256:xyz",
            "-leading",
            "a//b",
        ] {
            assert!(!valid_reference(bad), "{bad}");
        }
    }
}
