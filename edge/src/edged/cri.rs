//! [`CriRuntime`]: pods as containers of a CRI runtime (containerd),
//! driven over its unix socket with the Kubernetes Container Runtime
//! Interface (`runtime.v1`).
//!
//! Each pod gets one sandbox, made when its first container starts and
//! labelled with the pod's uid; it shares the node's network (pod
//! networking through CNI is not configured by keel). Containers write
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
    BoxFuture, ContainerHandle, ExitStatus, LaunchSpec, PodRef, PullPolicy, Runtime, StopSignal,
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

/// The namespaces of keel's pods and containers: the node's network, a
/// PID namespace per container, IPC shared in the pod.
fn namespaces() -> Option<cri::NamespaceOption> {
    Some(cri::NamespaceOption {
        network: cri::NamespaceMode::Node as i32,
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
    sandboxes: Mutex<HashMap<String, String>>,
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

    fn sandboxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox_config(pod: &PodRef, log_dir: &Path) -> cri::PodSandboxConfig {
        cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: pod.name.clone(),
                uid: pod.uid.clone(),
                namespace: pod.namespace.clone(),
                attempt: 0,
            }),
            // No hostname: the sandbox shares the node's UTS namespace
            // with its network.
            hostname: String::new(),
            log_directory: log_dir.to_string_lossy().into_owned(),
            labels: [(POD_UID_LABEL.to_owned(), pod.uid.clone())].into(),
            annotations: HashMap::new(),
            linux: Some(cri::LinuxPodSandboxConfig {
                cgroup_parent: String::new(),
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: namespaces(),
                    ..Default::default()
                }),
            }),
        }
    }

    /// The pod's ready sandbox: known, found by label, or made now.
    async fn sandbox(&self, pod: &PodRef, log_dir: &Path) -> Result<String, Error> {
        if let Some(id) = self.sandboxes().get(&pod.uid).cloned() {
            return Ok(id);
        }
        let mut rt = self.runtime.clone();
        let found = pod_sandboxes(&mut rt, &pod.uid, true).await?;
        let id = match found.into_iter().next() {
            Some(s) => s.id,
            None => {
                let r = timed(
                    "RunPodSandbox",
                    CALL_TIMEOUT,
                    rt.run_pod_sandbox(cri::RunPodSandboxRequest {
                        config: Some(Self::sandbox_config(pod, log_dir)),
                        runtime_handler: String::new(),
                    }),
                )
                .await?;
                info!(pod = %format!("{}/{}", pod.namespace, pod.name), sandbox = %r.pod_sandbox_id, "pod sandbox ready");
                r.pod_sandbox_id
            }
        };
        self.sandboxes().insert(pod.uid.clone(), id.clone());
        Ok(id)
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
        let log_dir = spec
            .log_file
            .parent()
            .and_then(Path::parent)
            .ok_or_else(|| Error::Runtime("log file outside a pod log directory".into()))?;
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
        let sandbox = self.sandbox(&iso.pod, log_dir).await?;
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
            stdin_once: false,
            tty: false,
            linux: Some(cri::LinuxContainerConfig {
                resources: Some(limits),
                security_context: Some(cri::LinuxContainerSecurityContext {
                    privileged: iso.privileged,
                    namespace_options: namespaces(),
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
                sandbox_config: Some(Self::sandbox_config(&iso.pod, log_dir)),
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
                if let Some(dir) = spec.log_file.parent().and_then(Path::parent) {
                    // Its sandbox, for the containers to come.
                    let sandbox = block_on(self.sandbox(&spec.isolated.pod, dir))??;
                    debug!(%sandbox, "the adopted container's sandbox");
                }
                Ok(Some(super::runtime::Adopted {
                    handle: CriContainer::follow(
                        self.runtime.clone(),
                        id,
                        s.image_ref.clone(),
                        state_file.to_path_buf(),
                        rotation(spec),
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

    fn pod_removed(&self, pod: &PodRef) -> BoxFuture<'static, ()> {
        let known = self.sandboxes().remove(&pod.uid);
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
                for r in [
                    timed(
                        "StopPodSandbox",
                        CALL_TIMEOUT,
                        rt.stop_pod_sandbox(cri::StopPodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        }),
                    )
                    .await
                    .map(drop),
                    timed(
                        "RemovePodSandbox",
                        CALL_TIMEOUT,
                        rt.remove_pod_sandbox(cri::RemovePodSandboxRequest {
                            pod_sandbox_id: id.clone(),
                        }),
                    )
                    .await
                    .map(drop),
                ] {
                    if let Err(e) = r {
                        warn!(pod_uid = %uid, sandbox = %id, error = %e, "cannot remove pod sandbox");
                    }
                }
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
        })
    }
}

impl ContainerHandle for CriContainer {
    fn id(&self) -> String {
        format!("containerd://{}", self.id)
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
/// remotecommand protocol over a WebSocket (`v4.channel.k8s.io`: a byte
/// of channel, then data; 0 stdin, 1 stdout, 2 stderr, 3 the status, 4
/// terminal size). Its streams are handed to the caller as pipes; the
/// returned sender resizes the terminal.
///
/// v4 cannot say that stdin ended: the command sees its stdin close only
/// when the session ends.
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
    use futures::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;

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
    let ws_url = url
        .strip_prefix("http://")
        .map(|rest| format!("ws://{rest}"))
        .ok_or_else(|| Error::Runtime(format!("exec: unexpected streaming URL {url:?}")))?;
    let host = ws_url
        .trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned();
    let mut request = ws_url
        .as_str()
        .into_client_request()
        .map_err(|e| Error::Runtime(format!("exec: {e}")))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_static("v4.channel.k8s.io"),
    );
    let tcp = tokio::net::TcpStream::connect(&host)
        .await
        .map_err(|e| Error::Runtime(format!("exec: connecting to {host}: {e}")))?;
    let (ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .map_err(|e| Error::Runtime(format!("exec: {e}")))?;
    let (mut ws_tx, mut ws_rx) = ws.split();

    const PIPE: usize = 64 << 10;
    let (stdin_caller, mut stdin_ours) = tokio::io::duplex(PIPE);
    let (mut stdout_ours, stdout_caller) = tokio::io::duplex(PIPE);
    let (mut stderr_ours, stderr_caller) = tokio::io::duplex(PIPE);
    let (result_tx, result_rx) = tokio::sync::oneshot::channel();
    let (cancel_tx, mut cancel_rx) = tokio::sync::oneshot::channel::<()>();
    let (resize_tx, mut resize_rx) = tokio::sync::mpsc::channel::<(u16, u16)>(4);
    tokio::spawn(async move {
        let mut code = None;
        let mut stdin_open = true;
        let mut buf = vec![0u8; 32 << 10];
        loop {
            tokio::select! {
                msg = ws_rx.next() => match msg {
                    Some(Ok(Message::Binary(data))) => {
                        let (Some(&ch), Some(rest)) = (data.first(), data.get(1..)) else {
                            continue;
                        };
                        let written = match ch {
                            1 => stdout_ours.write_all(rest).await,
                            2 => stderr_ours.write_all(rest).await,
                            3 => {
                                code = status_exit_code(rest);
                                Ok(())
                            }
                            _ => Ok(()),
                        };
                        // A caller that stopped reading: the session ends.
                        if written.is_err() {
                            break;
                        }
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                    Some(Ok(_)) => {}
                },
                n = stdin_ours.read(&mut buf), if stdin_open => match n {
                    Ok(0) | Err(_) => stdin_open = false,
                    Ok(n) => {
                        let mut m = Vec::with_capacity(n + 1);
                        m.push(0u8);
                        m.extend_from_slice(buf.get(..n).unwrap_or_default());
                        if ws_tx.send(Message::Binary(m.into())).await.is_err() {
                            break;
                        }
                    }
                },
                Some((cols, rows)) = resize_rx.recv() => {
                    let size = serde_json::json!({"Width": cols, "Height": rows}).to_string();
                    let mut m = vec![4u8];
                    m.extend_from_slice(size.as_bytes());
                    let _ = ws_tx.send(Message::Binary(m.into())).await;
                }
                _ = &mut cancel_rx => {
                    let _ = ws_tx.send(Message::Close(None)).await;
                    return;
                }
            }
        }
        let _ = stdout_ours.shutdown().await;
        let _ = stderr_ours.shutdown().await;
        let _ = result_tx.send(match code {
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
