//! Edged: runs the pods bound to this node.
//!
//! [`Edged::sync`] receives the desired state (every pod bound to the node,
//! Kubernetes v1 Pod JSON) after each change and resolves each pod against
//! its configmaps and secrets into a plan. One tokio task per pod (a
//! *worker*) owns the pod's containers: it gets the latest plan over a watch
//! channel, starts containers through a [`Runtime`], watches them exit,
//! runs their probes, restarts them per `restartPolicy` with back-off, and
//! reports the pod's `status` to the [`StatusSink`] whenever it changes.
//!
//! The default runtime, [`ProcessRuntime`], runs each container as a host
//! process (host network) in its own process group; [`Runtime`] and
//! [`ContainerHandle`] are the seam for CRI or WebAssembly runtimes.
//!
//! # Containers
//! The executable is `command[0]` (then the rest of `command`, then `args`);
//! without `command`, `image` is the executable and `args` its arguments.
//! `$(VAR)` in `command`/`args`/`env` values is expanded as kubelet does.
//! The environment is clean: `PATH` (edgecore's), `HOME` (the pod
//! directory), `HOSTNAME` (the pod name), then `envFrom` (configmaps,
//! secrets, with `prefix` and `optional`) and `env` (`value`,
//! `configMapKeyRef`, `secretKeyRef`, and `fieldRef` for the pod's name,
//! namespace, uid, labels, annotations, node name, service account and
//! IPs). A missing required configmap/secret key leaves the container
//! waiting with `CreateContainerConfigError` until a later sync resolves it.
//! `workingDir` defaults to the pod directory and is created if missing.
//! A container that cannot be started waits with `RunContainerError` and is
//! retried with back-off.
//!
//! # Volumes and mounts
//! `configMap`, `secret` and `projected` (configMap and secret sources)
//! volumes are written as files (`items`, `defaultMode`, `mode`,
//! `optional`) under `root/pods/{ns}_{pod}_{uid}/volumes/{volume}/`, each
//! file replaced atomically (write + rename) and refreshed when the source
//! changes. `emptyDir` is a directory there; `hostPath` is used as is
//! (`DirectoryOrCreate` creates it). Other volume types get an empty
//! directory. A process cannot have private bind mounts, so each
//! `volumeMount` is exposed as a **symlink at the mount path** pointing to
//! the volume's directory (or `subPath` inside it):
//! - a relative `mountPath` is resolved against the container's working
//!   directory (by default the pod directory), parents created;
//! - an absolute `mountPath` inside the pod directory is linked likewise;
//! - an absolute `mountPath` elsewhere is linked only if nothing exists
//!   there and its parent directory exists and is writable (the link is
//!   removed with the pod).
//!
//! When a mount cannot be exposed, the container still starts; a warning is
//! logged and added to the pod's `status.message`. `readOnly` is not
//! enforced. Applications should use relative mount paths (or read them
//! from the pod directory) to be portable to this runtime.
//!
//! # Files under `root`
//! - `pods/{ns}_{pod}_{uid}/`: pod directory (working directory, `HOME`,
//!   `volumes/`);
//! - `logs/{ns}_{pod}_{uid}/{container}/{n}.log`: stdout and stderr of
//!   each run, not rotated; `n` is the restart count, continued after the
//!   highest existing number when an earlier edgecore left logs (so
//!   [`Edged::log_path`] `previous` then shows the run before the crash);
//! - `run/{ns}_{pod}_{uid}_{container}.pid`: `"<pid> <start time>"` of each
//!   running container, so that [`Edged::new`] can kill what a crashed
//!   edgecore left running (only if `/proc/<pid>/stat` still shows the same
//!   start time).
//!
//! Dropping an [`Edged`] without [`Edged::shutdown`] behaves like a crash of
//! edgecore: workers stop, processes keep running until the next
//! [`Edged::new`] on the same root kills them. Directories of pods not
//! listed by the first [`Edged::sync`] after [`Edged::new`] are removed.
//!
//! # Status
//! `phase` is Pending until init containers completed and every container
//! started once, Succeeded/Failed when every container exited and none
//! will restart (or an init container failed with `restartPolicy: Never`),
//! else Running. Conditions: Initialized, Ready, ContainersReady,
//! PodScheduled. `hostIP` is the node's IP; `podIP` (from the first
//! container start on) is the pod's own on a pod network (a CRI runtime
//! with CNI, a pod without `hostNetwork`), else the node's;
//! `qosClass` is derived from requests and limits. Container states follow
//! kubelet: running, waiting (`ContainerCreating`, `PodInitializing`,
//! `CrashLoopBackOff`, `RunContainerError`, `CreateContainerConfigError`),
//! terminated (`Completed`/`Error`, exit code 128+n for signal n), with
//! `lastState` the previous run; `containerID` is `process://<pid>`.
//!
//! # Probes
//! Startup, liveness and readiness probes with `exec` (run with the
//! container's environment and working directory), `httpGet` (plain HTTP,
//! host defaulting to the node IP, named ports, `httpHeaders`) and
//! `tcpSocket`; `grpc` and HTTPS probes are not implemented and always
//! succeed. Liveness/startup failure kills the container (SIGTERM, SIGKILL
//! after the grace period), which restarts per policy with back-off.
//!
//! # Exec
//! [`Edged::exec`] (`kubectl exec`) runs a command in a running container
//! (or init container) through [`ContainerHandle::exec_interactive`]: with
//! the process runtime, a new process with the container's environment and
//! working directory, in its own process group, its stdin, stdout and
//! stderr piped to the caller ([`ExecProcess`]; no terminal). It is killed
//! (its whole group) when the caller drops [`ExecProcess::exit`] before it
//! ended and when the container stops; what it leaves in its group is
//! killed when it exits. The worker records each running container's
//! handle (by pod key and container name) for it.
//!
//! # Lifecycle
//! A changed container spec (command, args, env, image, ...) restarts that
//! container immediately; a changed pod uid replaces the pod. A pod no
//! longer listed (or with `deletionTimestamp`) is stopped: SIGTERM to each
//! process group, SIGKILL after `terminationGracePeriodSeconds` (default
//! 30 s, capped at 10 s); a removed pod's files and logs are deleted.
//! Init containers run in order to completion first. Not implemented:
//! lifecycle hooks, resource limits, `imagePullPolicy`/images, ephemeral and
//! sidecar (restartable init) containers, log rotation.

mod cri;
pub(crate) mod crilog;
mod cristream;
mod plan;
mod probe;
mod runtime;
mod volume;
mod worker;

#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

pub use cri::{CriRuntime, import_image};
pub use runtime::{
    Adopted, BindMount, BoxFuture, ContainerHandle, ExecExit, ExecOutput, ExecProcess, ExecStdin,
    ExitStatus, HostPort, Isolated, LaunchSpec, PodNetwork, PodRef, ProcessRuntime, PullPolicy,
    Runtime, StopSignal, TerminalResize,
};

/// The `runtimeClassName` of pods that run as host processes on a node
/// whose default runtime is a CRI runtime.
pub const PROCESS_RUNTIME_CLASS: &str = "keel-process";

use plan::PodPlan;
use worker::{Desired, Shared, Worker};

/// Grace period cap when Edged shuts down.
const MAX_SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Errors of Edged and its runtimes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// [`Edged::new`] was called outside a tokio runtime.
    #[error("Edged must be created inside a tokio runtime")]
    NoRuntime,
    /// A container's (or probe's) executable could not be started.
    #[error("failed to start {program:?}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    /// An exec did not finish in time.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// The container has exited (an exec into it).
    #[error("the container is not running")]
    NotRunning,
    /// The runtime does not implement this operation (named).
    #[error("{0} is not supported by this container runtime")]
    Unsupported(&'static str),
    /// The container's image is not on the node and could not be pulled
    /// (`reason`: `ErrImagePull`, `ErrImageNeverPull`, `InvalidImageName`).
    #[error("{message}")]
    Image {
        reason: &'static str,
        message: String,
    },
    /// Any other runtime failure.
    #[error("{0}")]
    Runtime(String),
}

/// Why [`Edged::exec`] could not start a command.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// No such pod runs on this node.
    #[error("pod {namespace}/{pod} not found on this node")]
    PodNotFound { namespace: String, pod: String },
    /// The pod has no container of that name (`containers`: the pod's
    /// init containers and containers).
    #[error(
        "container {container} is not valid for pod {pod}, choose one of: [{}]",
        containers.join(" ")
    )]
    ContainerNotFound {
        pod: String,
        container: String,
        containers: Vec<String>,
    },
    /// The container exists but is not running now.
    #[error("container {container} is not running in pod {pod}")]
    ContainerNotRunning { pod: String, container: String },
    /// No command was given.
    #[error("no command given")]
    EmptyCommand,
    /// The program could not be started; `message` reads like kubelet's
    /// (`exec: "nope": executable file not found in $PATH`).
    #[error("{message}")]
    Start { program: String, message: String },
    /// The container runtime cannot exec.
    #[error("exec is not supported by this container runtime")]
    Unsupported,
    /// The runtime failed otherwise.
    #[error("exec failed: {0}")]
    Runtime(Error),
}

/// kubelet's (runc's) words for a program that cannot be started.
fn start_message(program: &str, source: &std::io::Error) -> String {
    match source.kind() {
        std::io::ErrorKind::NotFound if !program.contains('/') => {
            format!("exec: {program:?}: executable file not found in $PATH")
        }
        std::io::ErrorKind::NotFound => {
            format!("exec: {program:?}: stat {program}: no such file or directory")
        }
        std::io::ErrorKind::PermissionDenied => format!("exec: {program:?}: permission denied"),
        _ => format!("exec: {program:?}: {source}"),
    }
}

impl Error {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Configuration of [`Edged`].
#[derive(Debug, Clone)]
pub struct EdgedConfig {
    /// Directory Edged owns: per-pod dirs, volumes, logs, pid files.
    pub root: PathBuf,
    pub node_name: String,
    /// Reported as `status.hostIP`, and as `status.podIP` of pods on the
    /// node's network.
    pub host_ip: String,
    /// Restart back-off start (kubelet: 10 s), doubled per restart.
    pub backoff_base: Duration,
    /// Back-off cap (kubelet: 300 s).
    pub backoff_max: Duration,
    /// A container's log file is rotated past this size (kubelet's
    /// `containerLogMaxSize`, 10 MiB).
    pub container_log_max_size: u64,
    /// Log files kept per container run, the current one included
    /// (kubelet's `containerLogMaxFiles`, 5).
    pub container_log_max_files: u32,
}

impl EdgedConfig {
    /// A configuration with kubelet's back-off (10 s doubling to 300 s).
    pub fn new(root: PathBuf, node_name: impl Into<String>, host_ip: impl Into<String>) -> Self {
        EdgedConfig {
            root,
            node_name: node_name.into(),
            host_ip: host_ip.into(),
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(300),
            container_log_max_size: 10 << 20,
            container_log_max_files: 5,
        }
    }
}

/// Where pod statuses go.
pub trait StatusSink: Send + Sync + 'static {
    /// The observed status of pod `key` ("pods/{namespace}/{name}") changed;
    /// `status` is the complete new `status` object of the Pod.
    fn pod_status(&self, key: &str, status: Value);
}

pub(crate) fn pods_dir(root: &Path) -> PathBuf {
    root.join("pods")
}

pub(crate) fn logs_dir(root: &Path) -> PathBuf {
    root.join("logs")
}

pub(crate) fn run_dir(root: &Path) -> PathBuf {
    root.join("run")
}

struct PodEntry {
    namespace: String,
    name: String,
    uid: String,
    dir_name: String,
    grace: Duration,
    desired: watch::Sender<Desired>,
    task: JoinHandle<()>,
}

#[derive(Default)]
struct State {
    pods: HashMap<String, PodEntry>,
    /// Workers stopping removed pods (their sender keeps them from seeing
    /// a closed channel).
    stopping: Vec<(watch::Sender<Desired>, JoinHandle<()>)>,
    gc_pending: bool,
    shut_down: bool,
    /// State files of containers a previous edgecore left running, of
    /// runtimes that adopt them: the pods' workers take theirs over; the
    /// first sync kills those of pods this node no longer runs.
    leftovers: Vec<(PathBuf, Arc<dyn Runtime>)>,
}

/// Runs the pods bound to this node. See the [module documentation](self).
pub struct Edged {
    shared: Arc<Shared>,
    handle: tokio::runtime::Handle,
    state: Mutex<State>,
}

impl fmt::Debug for Edged {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Edged")
            .field("cfg", &self.shared.cfg)
            .field("runtime", &self.shared.runtime)
            .field("pods", &self.lock().pods.len())
            .finish_non_exhaustive()
    }
}

impl Edged {
    /// Must be called inside a tokio runtime. Kills leftovers of a previous
    /// run of edgecore (containers recorded in pid files under `root` that
    /// are still alive and are the same process), so a restarted edgecore
    /// never runs a container twice.
    pub fn new(
        cfg: EdgedConfig,
        runtime: Arc<dyn Runtime>,
        sink: Arc<dyn StatusSink>,
    ) -> Result<Edged, Error> {
        Edged::with_runtimes(cfg, runtime, HashMap::new(), sink)
    }

    /// [`Edged::new`] with more runtimes, which pods choose by
    /// `runtimeClassName` (`runtime` runs the pods that name none).
    pub fn with_runtimes(
        cfg: EdgedConfig,
        runtime: Arc<dyn Runtime>,
        classes: HashMap<String, Arc<dyn Runtime>>,
        sink: Arc<dyn StatusSink>,
    ) -> Result<Edged, Error> {
        let handle = tokio::runtime::Handle::try_current().map_err(|_| Error::NoRuntime)?;
        // Pods pass through `pods/` to their own directory (0711); logs
        // and state are edgecore's (0700).
        for (dir, mode) in [
            (pods_dir(&cfg.root), 0o711),
            (logs_dir(&cfg.root), 0o700),
            (run_dir(&cfg.root), 0o700),
        ] {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
                })
                .map_err(|e| Error::io(&dir, e))?;
        }
        let run = run_dir(&cfg.root);
        let mut leftovers = Vec::new();
        for entry in std::fs::read_dir(&run).map_err(|e| Error::io(&run, e))? {
            let path = entry.map_err(|e| Error::io(&run, e))?.path();
            let ext = path.extension().and_then(|e| e.to_str());
            let owner = std::iter::once(&runtime)
                .chain(classes.values())
                .find(|r| Some(r.state_extension()) == ext);
            match (ext, owner) {
                (Some("tmp"), _) => {
                    let _ = std::fs::remove_file(&path);
                }
                (_, Some(owner)) if owner.adopts() => leftovers.push((path, owner.clone())),
                (_, Some(owner)) => match owner.kill_leftover(&path) {
                    Ok(true) => info!(file = %path.display(), "killed a leftover container"),
                    Ok(false) => {}
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "cannot kill leftover container")
                    }
                },
                _ => {}
            }
        }
        Ok(Edged {
            shared: Arc::new(Shared::new(cfg, runtime, classes, sink)),
            handle,
            state: Mutex::new(State {
                gc_pending: true,
                leftovers,
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn spawn_worker(&self, key: &str, plan: PodPlan) -> PodEntry {
        let plan = Arc::new(plan);
        let (desired, receiver) = watch::channel(Desired::Run(plan.clone()));
        let worker = Worker::new(self.shared.clone(), key.to_owned(), plan.clone());
        info!(pod = key, uid = %plan.uid, "starting pod");
        PodEntry {
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            uid: plan.uid.clone(),
            dir_name: plan.dir_name(),
            grace: plan.grace,
            desired,
            task: self.handle.spawn(worker.run(receiver)),
        }
    }

    /// Desired state: every pod bound to this node (key "pods/{ns}/{name}",
    /// full Pod JSON). Idempotent; called after every change of the node's
    /// objects. `lookup` returns configmaps and secrets by key
    /// "configmaps/{ns}/{name}" / "secrets/{ns}/{name}". Pods no longer
    /// listed are stopped and their files removed.
    pub fn sync(&self, pods: Vec<(String, Value)>, lookup: &dyn Fn(&str) -> Option<Value>) {
        let mut state = self.lock();
        if state.shut_down {
            return;
        }
        let mut seen = HashSet::new();
        for (key, pod) in pods {
            let plan = match plan::plan_pod(&pod, &self.shared.cfg, lookup) {
                Ok(plan) => plan,
                Err(message) => {
                    warn!(pod = %key, %message, "cannot run pod");
                    continue;
                }
            };
            seen.insert(key.clone());
            match state.pods.get_mut(&key) {
                Some(entry) if entry.uid == plan.uid => {
                    entry.grace = plan.grace;
                    entry.desired.send_if_modified(|current| match current {
                        Desired::Run(old) if **old == plan => false,
                        _ => {
                            *current = Desired::Run(Arc::new(plan));
                            true
                        }
                    });
                }
                _ => {
                    if let Some(old) = state.pods.remove(&key) {
                        info!(pod = %key, "pod uid changed: replacing the pod");
                        stop(&mut state, old, true, plan::MAX_REMOVE_GRACE);
                    }
                    let entry = self.spawn_worker(&key, plan);
                    state.pods.insert(key, entry);
                }
            }
        }
        let gone: Vec<String> = state
            .pods
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(entry) = state.pods.remove(&key) {
                info!(pod = %key, "pod removed: stopping it");
                stop(&mut state, entry, true, plan::MAX_REMOVE_GRACE);
            }
        }
        state.stopping.retain(|(_, task)| !task.is_finished());
        if std::mem::take(&mut state.gc_pending) {
            // Containers left running by a previous edgecore: those of pods
            // still here are adopted by their workers, the rest killed.
            let leftovers = std::mem::take(&mut state.leftovers);
            for (path, runtime) in leftovers {
                let file = path
                    .file_name()
                    .and_then(|f| f.to_str())
                    .unwrap_or_default();
                let kept = state
                    .pods
                    .values()
                    .any(|e| file.starts_with(&format!("{}_", e.dir_name)));
                if kept {
                    continue;
                }
                match runtime.kill_leftover(&path) {
                    Ok(true) => {
                        info!(file = %path.display(), "killed a leftover container of a pod gone")
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "cannot kill leftover container")
                    }
                }
            }
            let live: HashSet<&str> = state.pods.values().map(|e| e.dir_name.as_str()).collect();
            for dir in [
                pods_dir(&self.shared.cfg.root),
                logs_dir(&self.shared.cfg.root),
            ] {
                remove_stale_dirs(&dir, &live);
            }
        }
    }

    /// Path of a container's log file (current run, or the previous run when
    /// `previous`).
    pub fn log_path(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        previous: bool,
    ) -> Option<PathBuf> {
        if !plan::safe_component(container) {
            return None;
        }
        let dir_name = {
            let state = self.lock();
            state
                .pods
                .values()
                .find(|e| e.namespace == namespace && e.name == pod)?
                .dir_name
                .clone()
        };
        let dir = logs_dir(&self.shared.cfg.root)
            .join(dir_name)
            .join(container);
        // A run's log is `{run}.log`, rotated to `{run}.log.{k}`. While it
        // rotates, `{run}.log` is briefly missing: its rotated files still
        // name the run, so the run's path stays the same for a follower.
        let mut runs: Vec<u32> = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                let (run, rest) = name.to_str()?.split_once(".log")?;
                let rotated = rest
                    .strip_prefix('.')
                    .is_some_and(|k| k.parse::<u32>().is_ok());
                (rest.is_empty() || rotated).then(|| run.parse().ok())?
            })
            .collect();
        runs.sort_unstable_by(|a, b| b.cmp(a));
        runs.dedup();
        let run = runs.get(usize::from(previous))?;
        Some(dir.join(format!("{run}.log")))
    }

    /// Runs `command` (program, then arguments) in container `container`
    /// (an init container or a container) of pod `namespace/pod`, for
    /// `kubectl exec`: with the process runtime, a new process with that
    /// container's environment and working directory, in its own process
    /// group, stdin/stdout/stderr piped (no terminal). The program is looked
    /// up in the container's `PATH`.
    ///
    /// The command is killed (its whole process group) when the returned
    /// [`ExecProcess::exit`] is dropped before it ended (the client went
    /// away) and when the container stops; what it leaves in its process
    /// group is killed when it exits.
    pub async fn exec(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        command: Vec<String>,
    ) -> Result<ExecProcess, ExecError> {
        let handle = self.running_container(namespace, pod, container)?;
        if command.is_empty() {
            return Err(ExecError::EmptyCommand);
        }
        handle
            .exec_interactive(command)
            .await
            .map_err(|e| exec_error(pod, container, e))
    }

    /// Like [`Edged::exec`], on a new terminal (`kubectl exec -t`); see
    /// [`ContainerHandle::exec_terminal`].
    pub async fn exec_terminal(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
        command: Vec<String>,
    ) -> Result<(ExecProcess, TerminalResize), ExecError> {
        let handle = self.running_container(namespace, pod, container)?;
        if command.is_empty() {
            return Err(ExecError::EmptyCommand);
        }
        handle
            .exec_terminal(command)
            .await
            .map_err(|e| exec_error(pod, container, e))
    }

    /// The running container `container` of pod `namespace/pod`, for
    /// `kubectl attach`: its handle (stdin, exit) and its current log file
    /// (its output).
    pub fn attach(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<(Arc<dyn ContainerHandle>, PathBuf), ExecError> {
        let handle = self.running_container(namespace, pod, container)?;
        let log = self
            .log_path(namespace, pod, container, false)
            .ok_or_else(|| ExecError::ContainerNotRunning {
                pod: pod.to_owned(),
                container: container.to_owned(),
            })?;
        Ok((handle, log))
    }

    fn running_container(
        &self,
        namespace: &str,
        pod: &str,
        container: &str,
    ) -> Result<Arc<dyn ContainerHandle>, ExecError> {
        let (key, containers) = {
            let state = self.lock();
            let Some((key, entry)) = state
                .pods
                .iter()
                .find(|(_, e)| e.namespace == namespace && e.name == pod)
            else {
                return Err(ExecError::PodNotFound {
                    namespace: namespace.to_owned(),
                    pod: pod.to_owned(),
                });
            };
            let containers: Vec<String> = match &*entry.desired.borrow() {
                Desired::Run(plan) => plan
                    .init_containers
                    .iter()
                    .chain(&plan.containers)
                    .map(|c| c.name.clone())
                    .collect(),
                Desired::Stop { .. } => Vec::new(),
            };
            (key.clone(), containers)
        };
        if !containers.iter().any(|c| c == container) {
            return Err(ExecError::ContainerNotFound {
                pod: pod.to_owned(),
                container: container.to_owned(),
                containers,
            });
        }
        let not_running = || ExecError::ContainerNotRunning {
            pod: pod.to_owned(),
            container: container.to_owned(),
        };
        self.shared.running(&key, container).ok_or_else(not_running)
    }

    /// Stops every container (SIGTERM to its process group, then SIGKILL
    /// after the grace period, capped at 5 s here) and waits for them.
    /// Later [`Edged::sync`] calls do nothing.
    pub async fn shutdown(&self) {
        let tasks: Vec<(watch::Sender<Desired>, JoinHandle<()>)> = {
            let mut state = self.lock();
            state.shut_down = true;
            let mut tasks = std::mem::take(&mut state.stopping);
            for (_, entry) in state.pods.drain() {
                let grace = entry.grace.min(MAX_SHUTDOWN_GRACE);
                entry.desired.send_replace(Desired::Stop {
                    grace,
                    remove: false,
                });
                tasks.push((entry.desired, entry.task));
            }
            tasks
        };
        for (_sender, task) in tasks {
            if let Err(e) = task.await {
                warn!(error = %e, "pod worker failed");
            }
        }
    }
}

fn stop(state: &mut State, entry: PodEntry, remove: bool, max_grace: Duration) {
    let grace = entry.grace.min(max_grace);
    entry.desired.send_replace(Desired::Stop { grace, remove });
    state.stopping.push((entry.desired, entry.task));
}

fn remove_stale_dirs(dir: &Path, live: &HashSet<&str>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| live.contains(n)) {
            continue;
        }
        info!(dir = %entry.path().display(), "removing files of a pod no longer here");
        if let Err(e) = volume::remove_all(&entry.path()) {
            warn!(dir = %entry.path().display(), error = %e, "cannot remove stale pod files");
        }
    }
}

impl Drop for Edged {
    fn drop(&mut self) {
        // Like a crash of edgecore: workers stop, processes stay (see the
        // module documentation).
        let state = self.lock();
        for entry in state.pods.values() {
            entry.task.abort();
        }
        for (_, task) in &state.stopping {
            task.abort();
        }
    }
}

/// What a runtime's exec error means to `kubectl exec`.
fn exec_error(pod: &str, container: &str, e: Error) -> ExecError {
    match e {
        Error::Spawn { program, source } => ExecError::Start {
            message: start_message(&program, &source),
            program,
        },
        Error::NotRunning => ExecError::ContainerNotRunning {
            pod: pod.to_owned(),
            container: container.to_owned(),
        },
        Error::Unsupported(_) => ExecError::Unsupported,
        e => ExecError::Runtime(e),
    }
}
