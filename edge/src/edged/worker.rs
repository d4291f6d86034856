//! The pod worker: one tokio task per pod owns its containers, receives the
//! desired plan over a watch channel, container exits and probe results over
//! an mpsc channel, and reports the pod status when it changes.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::{Instant, sleep, sleep_until};
use tracing::{debug, info, warn};

use super::plan::{
    ContainerPlan, MountPlan, POD_IP, PodPlan, RestartPolicy, VolumePlan, safe_component,
    safe_relative,
};
use super::probe::{ProbeEvent, ProbeSpec, run_probes};
use super::runtime::{
    BindMount, ContainerHandle, ExitStatus, Isolated, LaunchSpec, PodRef, PullPolicy, StopSignal,
};
use super::{EdgedConfig, Runtime, StatusSink, volume};

/// A container that ran this long gets its back-off reset.
const BACKOFF_RESET: Duration = Duration::from_secs(600);
/// `PATH` when edgecore has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

pub(crate) struct Shared {
    pub cfg: EdgedConfig,
    /// The runtime of pods without a `runtimeClassName`.
    pub runtime: Arc<dyn Runtime>,
    /// The runtimes pods name by `runtimeClassName`.
    pub classes: HashMap<String, Arc<dyn Runtime>>,
    pub sink: Arc<dyn StatusSink>,
    /// Handles of the running containers by (pod key, container name), for
    /// `Edged::exec`: added when a worker started one, removed when it
    /// exited (or the worker stopped following it).
    containers: Mutex<HashMap<(String, String), Arc<dyn ContainerHandle>>>,
}

impl Shared {
    pub fn new(
        cfg: EdgedConfig,
        runtime: Arc<dyn Runtime>,
        classes: HashMap<String, Arc<dyn Runtime>>,
        sink: Arc<dyn StatusSink>,
    ) -> Shared {
        Shared {
            cfg,
            runtime,
            classes,
            sink,
            containers: Mutex::default(),
        }
    }

    /// The runtime of pods with `runtimeClassName` `class` (the default
    /// one without; an unknown class is refused earlier, by Edged).
    pub fn runtime_for(&self, class: Option<&str>) -> Arc<dyn Runtime> {
        class
            .and_then(|c| self.classes.get(c))
            .unwrap_or(&self.runtime)
            .clone()
    }

    fn running_map(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<dyn ContainerHandle>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The running container `container` of pod `key`.
    pub fn running(&self, key: &str, container: &str) -> Option<Arc<dyn ContainerHandle>> {
        self.running_map()
            .get(&(key.to_owned(), container.to_owned()))
            .cloned()
    }

    fn add_running(&self, key: &str, container: &str, handle: &Arc<dyn ContainerHandle>) {
        self.running_map()
            .insert((key.to_owned(), container.to_owned()), handle.clone());
    }

    /// Forgets `handle` (not a newer container of the same name, which a
    /// worker replacing the pod may have started meanwhile).
    fn remove_running(&self, key: &str, container: &str, handle: &Arc<dyn ContainerHandle>) {
        let mut map = self.running_map();
        let id = (key.to_owned(), container.to_owned());
        if map.get(&id).is_some_and(|h| Arc::ptr_eq(h, handle)) {
            map.remove(&id);
        }
    }
}

/// What Edged wants of a worker.
#[derive(Debug, Clone)]
pub(crate) enum Desired {
    Run(Arc<PodPlan>),
    /// Stop every container; with `remove`, delete the pod's files too.
    Stop {
        grace: Duration,
        remove: bool,
    },
}

/// A uid or gid of a `securityContext` (`runAsUser`, `fsGroup`, ...).
fn security_id(security: &Value, key: &str) -> Option<u32> {
    security
        .get(key)
        .and_then(Value::as_u64)
        .and_then(|v| u32::try_from(v).ok())
}

/// The user and group process-runtime containers run as by default
/// (`nobody`).
const NOBODY: u32 = 65534;

/// Container exits and probe results waiting for the pod's worker; the
/// tasks that report them wait while it is full.
const EVENTS_QUEUE: usize = 64;

#[derive(Debug)]
pub(crate) enum Event {
    Exited {
        run_id: u64,
        result: Result<ExitStatus, String>,
    },
    Probe {
        run_id: u64,
        event: ProbeEvent,
    },
}

/// Sets `key` of a JSON object.
fn put(object: &mut Value, key: &str, value: Value) {
    if let Some(map) = object.as_object_mut() {
        map.insert(key.to_owned(), value);
    }
}

/// RFC 3339, UTC, whole seconds.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// A duration the way kubelet (Go) prints it: `100ms`, `10s`, `1.6s`, `5m0s`.
pub(crate) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let minutes = ms / 60_000;
    let seconds = (ms % 60_000) as f64 / 1000.0;
    if minutes > 0 {
        format!("{minutes}m{seconds}s")
    } else {
        format!("{seconds}s")
    }
}

#[derive(Debug, Clone)]
struct Terminated {
    exit_code: i32,
    signal: Option<i32>,
    oom_killed: bool,
    message: Option<String>,
    started_at: OffsetDateTime,
    finished_at: OffsetDateTime,
    container_id: String,
}

impl Terminated {
    fn json(&self) -> Value {
        let mut t = json!({
            "exitCode": self.exit_code,
            "reason": if self.oom_killed {
                "OOMKilled"
            } else if self.exit_code == 0 {
                "Completed"
            } else {
                "Error"
            },
            "startedAt": rfc3339(self.started_at),
            "finishedAt": rfc3339(self.finished_at),
            "containerID": self.container_id,
        });
        if let Some(signal) = self.signal {
            put(&mut t, "signal", json!(signal));
        }
        if let Some(message) = &self.message {
            put(&mut t, "message", json!(message));
        }
        t
    }
}

/// A running container.
#[derive(Debug)]
struct Run {
    run_id: u64,
    handle: Arc<dyn ContainerHandle>,
    started_at: OffsetDateTime,
    since: Instant,
    /// Startup probe passed (or none).
    started: bool,
    /// Readiness probe passed (or none).
    ready: bool,
    /// Signalled to stop.
    stopping: bool,
    /// Start again at once when it has exited (its spec changed).
    restart_now: bool,
    /// Probe task and kill timer, aborted when it exits.
    tasks: Vec<AbortHandle>,
}

#[derive(Debug)]
struct Ctr {
    init: bool,
    plan: ContainerPlan,
    restart_count: u32,
    /// Number of the next run's log file (`{n}.log`): the restart count,
    /// unless an earlier edgecore left logs of this pod.
    log_seq: u32,
    ever_started: bool,
    run: Option<Run>,
    waiting: Option<(&'static str, String)>,
    /// Final termination (`done`).
    terminated: Option<Terminated>,
    /// The previous run's termination (`lastState`).
    last: Option<Terminated>,
    backoff: Duration,
    next_start: Option<Instant>,
    container_id: Option<String>,
    /// No start tried yet by this edgecore: a container a previous one
    /// left running may be adopted.
    adoptable: bool,
    /// The image id its runtime reported for the last container started.
    image_id: String,
    /// Exited and will not be started again.
    done: bool,
}

impl Ctr {
    fn new(init: bool, plan: ContainerPlan, backoff: Duration, log_dir: &Path) -> Ctr {
        let log_seq = fs::read_dir(log_dir.join(&plan.name))
            .into_iter()
            .flatten()
            .filter_map(|e| {
                let name = e.ok()?.file_name();
                name.to_str()?.strip_suffix(".log")?.parse::<u32>().ok()
            })
            .max()
            .map_or(0, |n| n + 1);
        // Logs left by an earlier edgecore mean the container ran before
        // (and was stopped by that edgecore's end): the next run is a
        // restart, and the count goes on from there.
        Ctr {
            init,
            plan,
            restart_count: log_seq.saturating_sub(1),
            log_seq,
            ever_started: log_seq > 0,
            adoptable: true,
            run: None,
            waiting: None,
            terminated: None,
            last: None,
            backoff,
            next_start: None,
            container_id: None,
            image_id: String::new(),
            done: false,
        }
    }

    fn succeeded(&self) -> bool {
        self.done && self.terminated.as_ref().is_some_and(|t| t.exit_code == 0)
    }

    fn ready(&self) -> bool {
        if self.init {
            return self.succeeded();
        }
        self.run
            .as_ref()
            .is_some_and(|r| r.started && r.ready && !r.stopping)
    }

    fn due(&self, now: Instant) -> bool {
        self.run.is_none() && !self.done && self.next_start.is_none_or(|t| t <= now)
    }
}

/// Signals a run to stop: SIGTERM, SIGKILL after `grace` (at once when 0).
fn stop_run(tasks: &mut JoinSet<()>, run: &mut Run, grace: Duration) {
    if run.stopping {
        return;
    }
    run.stopping = true;
    let signal = if grace.is_zero() {
        StopSignal::Kill
    } else {
        StopSignal::Term
    };
    if let Err(e) = run.handle.signal(signal) {
        warn!(container = %run.handle.id(), error = %e, "cannot signal container");
    }
    if !grace.is_zero() {
        let handle = run.handle.clone();
        run.tasks.push(tasks.spawn(async move {
            sleep(grace).await;
            if let Err(e) = handle.signal(StopSignal::Kill) {
                warn!(container = %handle.id(), error = %e, "cannot kill container");
            }
        }));
    }
}

async fn sleep_opt(until: Option<Instant>) {
    match until {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

pub(crate) struct Worker {
    shared: Arc<Shared>,
    key: String,
    plan: Arc<PodPlan>,
    pod_dir: PathBuf,
    log_dir: PathBuf,
    run_dir: PathBuf,
    ctrs: Vec<Ctr>,
    volumes_dirty: bool,
    volume_error: Option<String>,
    retry_at: Option<Instant>,
    mount_warnings: BTreeSet<String>,
    /// Symlinks created outside the pod directory: (link, target).
    outside_links: Vec<(PathBuf, PathBuf)>,
    start_time: OffsetDateTime,
    conditions: HashMap<&'static str, (bool, OffsetDateTime)>,
    last_status: Option<Value>,
    tasks: JoinSet<()>,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
    next_run_id: u64,
    stopping: bool,
    /// The pod's IP once known: its sandbox's on a pod network, else the
    /// node's.
    pod_ip: Option<String>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>, key: String, plan: Arc<PodPlan>) -> Worker {
        let root = &shared.cfg.root;
        let dir_name = plan.dir_name();
        let base = shared.cfg.backoff_base;
        let log_dir = super::logs_dir(root).join(&dir_name);
        let ctrs = plan
            .init_containers
            .iter()
            .map(|c| Ctr::new(true, c.clone(), base, &log_dir))
            .chain(
                plan.containers
                    .iter()
                    .map(|c| Ctr::new(false, c.clone(), base, &log_dir)),
            )
            .collect();
        let (events_tx, events_rx) = mpsc::channel(EVENTS_QUEUE);
        Worker {
            pod_dir: super::pods_dir(root).join(&dir_name),
            log_dir,
            run_dir: super::run_dir(root),
            shared,
            key,
            plan,
            ctrs,
            volumes_dirty: true,
            volume_error: None,
            retry_at: None,
            mount_warnings: BTreeSet::new(),
            outside_links: Vec::new(),
            start_time: OffsetDateTime::now_utc(),
            conditions: HashMap::new(),
            last_status: None,
            tasks: JoinSet::new(),
            events_tx,
            events_rx,
            next_run_id: 0,
            stopping: false,
            pod_ip: None,
        }
    }

    pub async fn run(mut self, mut desired: watch::Receiver<Desired>) {
        enum Wake {
            Desired(bool),
            Event(Option<Event>),
            Other,
        }
        loop {
            let current = desired.borrow_and_update().clone();
            match current {
                Desired::Stop { grace, remove } => {
                    if !remove && self.runtime().adopts() {
                        // edgecore stops, the pod does not: its containers
                        // go on, and the next edgecore adopts them.
                        for c in &self.ctrs {
                            if let Some(run) = &c.run {
                                self.shared
                                    .remove_running(&self.key, &c.plan.name, &run.handle);
                            }
                        }
                        debug!(pod = %self.key, "pod left running for the next edgecore");
                        return;
                    }
                    self.terminate(grace).await;
                    for c in &self.ctrs {
                        if let Some(run) = &c.run {
                            self.shared
                                .remove_running(&self.key, &c.plan.name, &run.handle);
                        }
                    }
                    if remove {
                        self.remove_files();
                        self.runtime().pod_removed(&self.pod_ref()).await;
                    }
                    debug!(pod = %self.key, "pod worker done");
                    return;
                }
                Desired::Run(plan) => {
                    if !Arc::ptr_eq(&plan, &self.plan) {
                        self.apply(plan);
                    }
                }
            }
            self.reconcile();
            self.report();
            let wake_at = self.next_wakeup();
            let wake = tokio::select! {
                changed = desired.changed() => Wake::Desired(changed.is_ok()),
                event = self.events_rx.recv() => Wake::Event(event),
                () = sleep_opt(wake_at) => Wake::Other,
                Some(_) = self.tasks.join_next(), if !self.tasks.is_empty() => Wake::Other,
            };
            match wake {
                // Edged was dropped without shutdown (as if edgecore
                // crashed): leave the processes; the next Edged kills them.
                Wake::Desired(false) => return,
                Wake::Event(Some(event)) => self.handle(event),
                _ => {}
            }
        }
    }

    fn next_wakeup(&self) -> Option<Instant> {
        self.ctrs
            .iter()
            .filter(|c| c.run.is_none() && !c.done)
            .filter_map(|c| c.next_start)
            .chain(self.retry_at.filter(|_| self.volumes_dirty))
            .min()
    }

    /// A new plan: refresh volumes, restart containers whose spec changed.
    fn apply(&mut self, plan: Arc<PodPlan>) {
        let old = std::mem::replace(&mut self.plan, plan.clone());
        if old.volumes != plan.volumes {
            self.volumes_dirty = true;
            self.retry_at = None;
        }
        let base = self.shared.cfg.backoff_base;
        let grace = plan.grace;
        let mut old_ctrs = std::mem::take(&mut self.ctrs);
        let wanted = plan
            .init_containers
            .iter()
            .map(|c| (true, c))
            .chain(plan.containers.iter().map(|c| (false, c)));
        for (init, cp) in wanted {
            let Some(i) = old_ctrs
                .iter()
                .position(|c| c.init == init && c.plan.name == cp.name)
            else {
                self.ctrs
                    .push(Ctr::new(init, cp.clone(), base, &self.log_dir));
                continue;
            };
            let mut c = old_ctrs.swap_remove(i);
            if c.plan.spec != cp.spec {
                info!(pod = %self.key, container = %cp.name, "container spec changed");
                match &mut c.run {
                    Some(run) => {
                        run.restart_now = true;
                        stop_run(&mut self.tasks, run, grace);
                    }
                    None if !c.done => {
                        c.next_start = None;
                        c.backoff = base;
                    }
                    None => {}
                }
            }
            c.plan = cp.clone();
            self.ctrs.push(c);
        }
        for mut c in old_ctrs {
            if let Some(run) = &mut c.run {
                info!(pod = %self.key, container = %c.plan.name, "container removed from the spec");
                stop_run(&mut self.tasks, run, Duration::ZERO);
                self.shared
                    .remove_running(&self.key, &c.plan.name, &run.handle);
            }
        }
    }

    /// Starts what should run now.
    fn reconcile(&mut self) {
        if self.stopping {
            return;
        }
        if self.plan.deleting {
            let grace = self.plan.grace;
            for c in &mut self.ctrs {
                if let Some(run) = &mut c.run {
                    stop_run(&mut self.tasks, run, grace);
                }
            }
            return;
        }
        let now = Instant::now();
        if self.volumes_dirty && self.retry_at.is_none_or(|t| t <= now) {
            match self.write_volumes() {
                Ok(()) => {
                    self.volumes_dirty = false;
                    self.volume_error = None;
                    self.retry_at = None;
                }
                Err(message) => {
                    if self.volume_error.as_ref() != Some(&message) {
                        warn!(pod = %self.key, %message, "volumes not ready");
                    }
                    self.volume_error = Some(message);
                    self.retry_at = Some(now + self.shared.cfg.backoff_base);
                }
            }
        }
        if self.volume_error.is_some() {
            return;
        }
        let mut to_start = Vec::new();
        let mut init_blocked = false;
        for (i, c) in self.ctrs.iter().enumerate() {
            if c.init {
                if init_blocked || c.succeeded() {
                    continue;
                }
                // This init container must complete before anything else.
                init_blocked = true;
                if c.due(now) {
                    to_start.push(i);
                }
            } else if init_blocked {
                break;
            } else if c.due(now) {
                to_start.push(i);
            }
        }
        for i in to_start {
            self.start(i, now);
        }
    }

    fn write_volumes(&mut self) -> Result<(), String> {
        let mut errors = Vec::new();
        for (name, volume) in &self.plan.volumes {
            if !safe_component(name) {
                errors.push(format!("invalid volume name {name:?}"));
                continue;
            }
            let dir = self.pod_dir.join("volumes").join(name);
            let result = match volume {
                VolumePlan::Files(Ok(files)) => {
                    volume::write_files(&dir, files).map_err(|e| e.to_string())
                }
                VolumePlan::Files(Err(message)) => Err(message.clone()),
                VolumePlan::EmptyDir => fs::create_dir_all(&dir).map_err(|e| e.to_string()),
                VolumePlan::HostPath { path, create: true } => {
                    fs::create_dir_all(path).map_err(|e| e.to_string())
                }
                VolumePlan::HostPath { create: false, .. } => Ok(()),
            };
            if let Err(e) = result {
                errors.push(format!(
                    "MountVolume.SetUp failed for volume \"{name}\": {e}"
                ));
            }
        }
        if errors.is_empty()
            && let Err(e) = self.own_pod_dir()
        {
            errors.push(format!("cannot give the pod its directory: {e}"));
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// A number of the pod's `securityContext`.
    fn pod_id(&self, key: &str) -> Option<u32> {
        security_id(&self.plan.security, key)
    }

    /// Who owns the pod's directory and volume files: the pod's
    /// `runAsUser` and `fsGroup` (or `runAsGroup`); for the process
    /// runtime by default the unprivileged user its containers run as.
    /// `None` when edgecore cannot give files away (not root) or there is
    /// nothing to change (a container runtime's pods run as root unless
    /// told otherwise).
    fn file_owner(&self) -> Option<(u32, u32)> {
        if !rustix::process::getuid().is_root() {
            return None;
        }
        let (uid, gid) = (
            self.pod_id("runAsUser"),
            self.pod_id("fsGroup").or(self.pod_id("runAsGroup")),
        );
        if self.runtime().isolates() {
            return (uid.is_some() || gid.is_some()).then(|| (uid.unwrap_or(0), gid.unwrap_or(0)));
        }
        Some((uid.unwrap_or(NOBODY), gid.unwrap_or(NOBODY)))
    }

    /// Who a process-runtime container runs as: its `runAsUser` and
    /// `runAsGroup` over the pod's, else the unprivileged `nobody`; `None`
    /// when edgecore is not root (it runs them as itself).
    fn process_user(&self, plan: &ContainerPlan) -> Option<(u32, u32)> {
        if !rustix::process::getuid().is_root() {
            return None;
        }
        let own = plan.spec.get("securityContext").unwrap_or(&Value::Null);
        let id = |key: &str| security_id(own, key).or(self.pod_id(key));
        Some((
            id("runAsUser").unwrap_or(NOBODY),
            id("runAsGroup").unwrap_or(NOBODY),
        ))
    }

    /// Gives the pod directory (and what is in it) to [`Self::file_owner`],
    /// owner-only: other pods and users cannot look in.
    fn own_pod_dir(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        fs::create_dir_all(&self.pod_dir)?;
        if let Some((uid, gid)) = self.file_owner() {
            volume::chown_tree(&self.pod_dir, uid, gid)?;
            fs::set_permissions(&self.pod_dir, fs::Permissions::from_mode(0o700))?;
        }
        Ok(())
    }

    /// The runtime that runs this pod (by its `runtimeClassName`).
    fn runtime(&self) -> Arc<dyn Runtime> {
        self.shared.runtime_for(self.plan.runtime_class.as_deref())
    }

    fn pod_ref(&self) -> PodRef {
        PodRef {
            namespace: self.plan.namespace.clone(),
            name: self.plan.name.clone(),
            uid: self.plan.uid.clone(),
        }
    }

    /// The container's launch spec, with the pod's IP in it: the runtime
    /// makes the pod's network first (a CRI sandbox) if it has one to make.
    fn prepare(
        &mut self,
        plan: &ContainerPlan,
        log_seq: u32,
        attempt: u32,
    ) -> Result<LaunchSpec, (&'static str, String)> {
        let mut spec = self.launch_spec(plan, log_seq, attempt)?;
        let ip = self
            .runtime()
            .pod_ip(&spec)
            .map_err(|e| {
                (
                    "ContainerCreating",
                    format!("Failed to create pod sandbox: {e}"),
                )
            })?
            .unwrap_or_else(|| self.shared.cfg.host_ip.clone());
        fill_pod_ip(&mut spec, &ip);
        self.pod_ip = Some(ip);
        Ok(spec)
    }

    /// Everything needed to launch `plan`, or (reason, message).
    fn launch_spec(
        &mut self,
        plan: &ContainerPlan,
        log_seq: u32,
        attempt: u32,
    ) -> Result<LaunchSpec, (&'static str, String)> {
        let launch = plan
            .launch
            .as_ref()
            .map_err(|message| ("CreateContainerConfigError", message.clone()))?;
        if let Some(class) = &self.plan.runtime_class
            && !self.shared.classes.contains_key(class)
        {
            let mut known: Vec<&str> = self.shared.classes.keys().map(String::as_str).collect();
            known.sort_unstable();
            return Err((
                "CreateContainerConfigError",
                format!(
                    "runtimeClassName {class:?} is not a runtime of this node (it has: {})",
                    if known.is_empty() {
                        "only the default".to_owned()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        }
        let runtime = self.runtime();
        let state_file = self.run_dir.join(format!(
            "{}_{}.{}",
            self.plan.dir_name(),
            plan.name,
            runtime.state_extension()
        ));
        let log_file = self.log_dir.join(&plan.name).join(format!("{log_seq}.log"));
        let stdin = plan.spec.get("stdin").and_then(Value::as_bool) == Some(true);
        if runtime.isolates() {
            let isolated = self.isolated(plan, launch, attempt)?;
            return Ok(LaunchSpec {
                name: plan.name.clone(),
                image: plan.image.clone(),
                program: launch.program.clone(),
                args: launch.args.clone(),
                env: isolated.env.clone(),
                working_dir: self.pod_dir.clone(),
                log_file,
                log_max_size: self.shared.cfg.container_log_max_size,
                log_max_files: self.shared.cfg.container_log_max_files,
                stdin,
                state_file,
                user: None,
                isolated,
            });
        }
        let working_dir = plan
            .working_dir
            .clone()
            .unwrap_or_else(|| self.pod_dir.clone());
        fs::create_dir_all(&working_dir)
            .and_then(|()| {
                if working_dir.starts_with(&self.pod_dir) {
                    self.own_pod_dir()
                } else {
                    Ok(())
                }
            })
            .map_err(|e| {
                (
                    "RunContainerError",
                    format!(
                        "cannot create working directory {}: {e}",
                        working_dir.display()
                    ),
                )
            })?;
        let prefix = format!("container {}: ", plan.name);
        self.mount_warnings.retain(|w| !w.starts_with(&prefix));
        for mount in &plan.mounts {
            if let Err(message) = self.expose(mount, &working_dir) {
                let warning = format!(
                    "container {}: volume {} not available at {}: {message}",
                    plan.name, mount.volume, mount.mount_path
                );
                if self.mount_warnings.insert(warning.clone()) {
                    warn!(pod = %self.key, "{warning}");
                }
            }
        }
        let mut env = vec![
            (
                "PATH".to_owned(),
                std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned()),
            ),
            (
                "HOME".to_owned(),
                self.pod_dir.to_string_lossy().into_owned(),
            ),
            ("HOSTNAME".to_owned(), self.plan.name.clone()),
        ];
        for (key, value) in &launch.env {
            match env.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1.clone_from(value),
                None => env.push((key.clone(), value.clone())),
            }
        }
        Ok(LaunchSpec {
            name: plan.name.clone(),
            image: plan.image.clone(),
            program: launch.program.clone(),
            args: launch.args.clone(),
            env,
            working_dir,
            log_file,
            log_max_size: self.shared.cfg.container_log_max_size,
            log_max_files: self.shared.cfg.container_log_max_files,
            stdin,
            state_file,
            user: self.process_user(plan),
            isolated: Isolated {
                pod: self.pod_ref(),
                attempt,
                ..Isolated::default()
            },
        })
    }

    /// The container as a runtime with images sees it: volumes as bind
    /// mounts of their directories on the node, the security context
    /// (the container's over the pod's), limits, the pull policy.
    fn isolated(
        &self,
        plan: &ContainerPlan,
        launch: &super::plan::Launch,
        attempt: u32,
    ) -> Result<Isolated, (&'static str, String)> {
        let config = |m: String| ("CreateContainerConfigError", m);
        let mut mounts = Vec::new();
        for m in &plan.mounts {
            let volume = self
                .plan
                .volumes
                .iter()
                .find(|(name, _)| *name == m.volume)
                .map(|(_, v)| v)
                .ok_or_else(|| config(format!("volume {:?} not found", m.volume)))?;
            let (mut host_path, read_only) = match volume {
                VolumePlan::HostPath { path, .. } => (path.clone(), false),
                VolumePlan::Files(_) => (self.pod_dir.join("volumes").join(&m.volume), true),
                VolumePlan::EmptyDir => (self.pod_dir.join("volumes").join(&m.volume), false),
            };
            if let Some(sub) = &m.sub_path {
                if !safe_relative(sub) {
                    return Err(config(format!("invalid subPath {sub:?}")));
                }
                host_path = host_path.join(sub);
            }
            if !m.mount_path.starts_with('/') || m.mount_path.contains('\0') {
                return Err(config(format!(
                    "mountPath {:?} must be an absolute path",
                    m.mount_path
                )));
            }
            mounts.push(BindMount {
                host_path,
                container_path: m.mount_path.clone(),
                read_only: read_only || m.read_only,
            });
        }
        let own = |key: &str| {
            plan.spec
                .get("securityContext")
                .and_then(|s| s.get(key))
                .filter(|v| !v.is_null())
        };
        let either = |key: &str| own(key).or_else(|| self.plan.security.get(key));
        let quantity = |path: &str| {
            plan.spec.pointer(path).and_then(|q| match q {
                Value::String(s) => super::plan::quantity_milli(s),
                Value::Number(n) => n.as_f64().map(|f| (f * 1000.0) as i64),
                _ => None,
            })
        };
        let tag_is_latest = {
            let last = plan.image.rsplit('/').next().unwrap_or_default();
            let name = last.split('@').next().unwrap_or_default();
            !plan.image.contains('@') && name.rsplit_once(':').is_none_or(|(_, t)| t == "latest")
        };
        let pull_policy = match plan.spec.get("imagePullPolicy").and_then(Value::as_str) {
            Some("Always") => PullPolicy::Always,
            Some("Never") => PullPolicy::Never,
            Some("IfNotPresent") => PullPolicy::IfNotPresent,
            _ if tag_is_latest => PullPolicy::Always,
            _ => PullPolicy::IfNotPresent,
        };
        let mut env = vec![("HOSTNAME".to_owned(), self.plan.name.clone())];
        for (key, value) in &launch.env {
            match env.iter_mut().find(|(k, _)| k == key) {
                Some(entry) => entry.1.clone_from(value),
                None => env.push((key.clone(), value.clone())),
            }
        }
        Ok(Isolated {
            pod: self.pod_ref(),
            network: self.plan.network.clone(),
            command: launch.command.clone(),
            args: launch.spec_args.clone(),
            working_dir: plan
                .spec
                .get("workingDir")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            env,
            mounts,
            run_as_user: either("runAsUser").and_then(Value::as_i64),
            run_as_group: either("runAsGroup").and_then(Value::as_i64),
            read_only_root: own("readOnlyRootFilesystem").and_then(Value::as_bool) == Some(true),
            privileged: own("privileged").and_then(Value::as_bool) == Some(true),
            memory_limit: quantity("/resources/limits/memory").map(|m| m / 1000),
            cpu_limit_millis: quantity("/resources/limits/cpu"),
            cpu_request_millis: quantity("/resources/requests/cpu"),
            pull_policy,
            attempt,
            stdin_once: plan.spec.get("stdinOnce").and_then(Value::as_bool) == Some(true),
        })
    }

    /// Exposes a volume mount as a symlink at its mount path (see the module
    /// documentation).
    fn expose(&mut self, mount: &MountPlan, working_dir: &Path) -> Result<(), String> {
        let volume = self
            .plan
            .volumes
            .iter()
            .find(|(name, _)| *name == mount.volume)
            .map(|(_, v)| v)
            .ok_or("no such volume")?;
        let mut source = match volume {
            VolumePlan::HostPath { path, .. } => path.clone(),
            _ => self.pod_dir.join("volumes").join(&mount.volume),
        };
        if let Some(sub) = &mount.sub_path {
            if !safe_relative(sub) {
                return Err(format!("invalid subPath {sub:?}"));
            }
            source = source.join(sub);
        }
        let mount_path = Path::new(&mount.mount_path);
        let relative = mount_path.is_relative();
        let clean = mount_path.components().all(|c| {
            matches!(
                c,
                Component::Normal(_) | Component::RootDir | Component::CurDir
            )
        });
        if !clean || mount.mount_path.is_empty() {
            return Err("invalid mountPath".into());
        }
        let target = if relative {
            working_dir.join(mount_path)
        } else {
            mount_path.to_path_buf()
        };
        let inside = target.starts_with(&self.pod_dir);
        let created = volume::expose_mount(&source, &target, inside || relative, inside)?;
        if created && !inside {
            self.outside_links.push((target, source));
        }
        Ok(())
    }

    fn start(&mut self, i: usize, now: Instant) {
        let Some(c) = self.ctrs.get(i) else {
            return;
        };
        let plan = c.plan.clone();
        let attempt = if c.ever_started {
            c.restart_count + 1
        } else {
            0
        };
        let first = c.adoptable;
        let started = self
            .prepare(&plan, c.log_seq, attempt)
            .and_then(|spec| {
                let runtime = self.runtime();
                // A container a previous edgecore left running goes on.
                if first && runtime.adopts() && spec.state_file.exists() {
                    match runtime.adopt(&spec.state_file, &spec) {
                        Ok(Some(a)) => return Ok((a.handle, Some((a.restart_count, a.started_at_ns)))),
                        Ok(None) => {}
                        Err(e) => {
                            warn!(pod = %self.key, container = %plan.name, error = %e, "cannot adopt the running container")
                        }
                    }
                }
                runtime.start(&spec).map(|h| (h, None))
                    .map_err(|e| match e {
                        super::Error::Image { reason, message } => (reason, message),
                        e => ("RunContainerError", e.to_string()),
                    })
            });
        let run_id = self.next_run_id;
        self.next_run_id += 1;
        let max = self.shared.cfg.backoff_max;
        let Some(c) = self.ctrs.get_mut(i) else {
            return;
        };
        // A container left running stays adoptable until something runs:
        // a start that failed before adopting it (containerd still coming
        // up, its sandbox not found yet) tries to adopt it again.
        if started.is_ok() {
            c.adoptable = false;
        }
        let (handle, adopted) = match started {
            Ok(started) => started,
            Err((reason, message)) => {
                if c.waiting.as_ref().is_none_or(|(_, m)| *m != message) {
                    warn!(pod = %self.key, container = %plan.name, reason, %message, "cannot start container");
                }
                let again = c
                    .waiting
                    .as_ref()
                    .is_some_and(|(r, _)| matches!(*r, "ErrImagePull" | "ImagePullBackOff"));
                c.waiting = Some(if reason == "ErrImagePull" && again {
                    (
                        "ImagePullBackOff",
                        format!("Back-off pulling image {:?}: {message}", plan.image),
                    )
                } else {
                    (reason, message)
                });
                if reason == "CreateContainerConfigError" {
                    // Retried when the plan changes.
                    c.next_start = None;
                } else {
                    c.next_start = Some(now + c.backoff);
                    c.backoff = (c.backoff * 2).min(max);
                }
                return;
            }
        };
        let (attempt, started_at) = match adopted {
            Some((restart_count, ns)) => {
                info!(pod = %self.key, container = %plan.name, id = %handle.id(), restart_count, "adopted the running container");
                (
                    restart_count,
                    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ns))
                        .unwrap_or_else(|_| OffsetDateTime::now_utc()),
                )
            }
            None => {
                info!(pod = %self.key, container = %plan.name, id = %handle.id(), restart_count = attempt, "container started");
                (attempt, OffsetDateTime::now_utc())
            }
        };
        let events = self.events_tx.clone();
        let waited = handle.clone();
        self.tasks.spawn(async move {
            let result = waited.wait().await.map_err(|e| e.to_string());
            let _ = events.send(Event::Exited { run_id, result }).await;
        });
        let mut tasks = Vec::new();
        let probed = !c.init
            && (plan.startup.is_some() || plan.liveness.is_some() || plan.readiness.is_some());
        if probed {
            let events = self.events_tx.clone();
            let ip = self.pod_ip.as_deref().unwrap_or(&self.shared.cfg.host_ip);
            let at_ip = |p: &Option<ProbeSpec>| p.clone().map(|p| p.at_pod_ip(ip));
            tasks.push(self.tasks.spawn(run_probes(
                handle.clone(),
                now,
                at_ip(&plan.startup),
                at_ip(&plan.liveness),
                at_ip(&plan.readiness),
                events,
                move |event| Event::Probe { run_id, event },
            )));
        }
        c.container_id = Some(handle.id());
        c.image_id = handle.image_id();
        self.shared.add_running(&self.key, &plan.name, &handle);
        c.run = Some(Run {
            run_id,
            handle,
            started_at,
            since: now,
            started: c.init || plan.startup.is_none(),
            ready: c.init || plan.readiness.is_none(),
            stopping: false,
            restart_now: false,
            tasks,
        });
        c.restart_count = attempt;
        if adopted.is_none() {
            c.log_seq += 1;
        }
        c.ever_started = true;
        c.waiting = None;
        c.next_start = None;
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Exited { run_id, result } => self.on_exit(run_id, result),
            Event::Probe { run_id, event } => {
                let grace = self.plan.grace;
                let Some((name, run)) = self.ctrs.iter_mut().find_map(|c| {
                    Some((&c.plan.name, c.run.as_mut().filter(|r| r.run_id == run_id)?))
                }) else {
                    return;
                };
                match event {
                    ProbeEvent::Started => {
                        run.started = true;
                    }
                    ProbeEvent::Ready(ready) => {
                        debug!(pod = %self.key, container = %name, ready, "readiness changed");
                        run.ready = ready;
                    }
                    ProbeEvent::Unhealthy(message) => {
                        info!(pod = %self.key, container = %name, %message, "container unhealthy, will be restarted");
                        stop_run(&mut self.tasks, run, grace);
                    }
                }
            }
        }
    }

    fn on_exit(&mut self, run_id: u64, result: Result<ExitStatus, String>) {
        let now = Instant::now();
        let finished_at = OffsetDateTime::now_utc();
        let stopping = self.stopping || self.plan.deleting;
        let policy = self.plan.restart_policy;
        let base = self.shared.cfg.backoff_base;
        let max = self.shared.cfg.backoff_max;
        let Some(c) = self
            .ctrs
            .iter_mut()
            .find(|c| c.run.as_ref().is_some_and(|r| r.run_id == run_id))
        else {
            return;
        };
        let Some(run) = c.run.take() else {
            return;
        };
        self.shared
            .remove_running(&self.key, &c.plan.name, &run.handle);
        for task in &run.tasks {
            task.abort();
        }
        let (exit_code, signal, oom_killed, message) = match result {
            Ok(status) => (status.exit_code(), status.signal, status.oom_killed, None),
            Err(e) => (255, None, false, Some(e)),
        };
        info!(pod = %self.key, container = %c.plan.name, exit_code, ?signal, oom_killed, "container exited");
        let terminated = Terminated {
            exit_code,
            signal,
            oom_killed,
            message,
            started_at: run.started_at,
            finished_at,
            container_id: run.handle.id(),
        };
        let by_policy = match (c.init, policy) {
            (_, RestartPolicy::Never) => false,
            (true, _) | (false, RestartPolicy::OnFailure) => exit_code != 0,
            (false, RestartPolicy::Always) => true,
        };
        if stopping || !(run.restart_now || by_policy) {
            c.terminated = Some(terminated);
            c.done = true;
            c.waiting = None;
            return;
        }
        c.last = Some(terminated);
        if run.restart_now {
            c.backoff = base;
            c.next_start = None;
            c.waiting = None;
            return;
        }
        if now.duration_since(run.since) >= BACKOFF_RESET {
            c.backoff = base;
        }
        c.next_start = Some(now + c.backoff);
        c.waiting = Some((
            "CrashLoopBackOff",
            format!(
                "back-off {} restarting failed container={} pod={}_{}({})",
                go_duration(c.backoff),
                c.plan.name,
                self.plan.name,
                self.plan.namespace,
                self.plan.uid
            ),
        ));
        c.backoff = (c.backoff * 2).min(max);
    }

    /// Stops every container and waits for them (at most `grace` + 5 s).
    async fn terminate(&mut self, grace: Duration) {
        self.stopping = true;
        for c in &mut self.ctrs {
            if let Some(run) = &mut c.run {
                stop_run(&mut self.tasks, run, grace);
            }
        }
        let deadline = Instant::now() + grace + Duration::from_secs(5);
        while self.ctrs.iter().any(|c| c.run.is_some()) {
            let event = tokio::select! {
                event = self.events_rx.recv() => event,
                () = sleep_until(deadline) => {
                    warn!(pod = %self.key, "containers did not stop in time");
                    return;
                }
            };
            if let Some(Event::Exited { run_id, result }) = event {
                self.on_exit(run_id, result);
            }
        }
    }

    fn remove_files(&mut self) {
        for (link, target) in &self.outside_links {
            if fs::read_link(link).is_ok_and(|t| t == *target)
                && let Err(e) = fs::remove_file(link)
            {
                warn!(link = %link.display(), error = %e, "cannot remove mount symlink");
            }
        }
        for dir in [&self.pod_dir, &self.log_dir] {
            if let Err(e) = volume::remove_all(dir) {
                warn!(dir = %dir.display(), error = %e, "cannot remove pod files");
            }
        }
    }

    fn report(&mut self) {
        let status = self.status();
        if self.last_status.as_ref() != Some(&status) {
            self.shared.sink.pod_status(&self.key, status.clone());
            self.last_status = Some(status);
        }
    }

    fn status(&mut self) -> Value {
        let init_failed = self.ctrs.iter().any(|c| c.init && c.done && !c.succeeded());
        let incomplete: Vec<&str> = self
            .ctrs
            .iter()
            .filter(|c| c.init && !c.succeeded())
            .map(|c| c.plan.name.as_str())
            .collect();
        let init_done = incomplete.is_empty();
        let apps = || self.ctrs.iter().filter(|c| !c.init);
        let phase = if init_failed {
            "Failed"
        } else if !init_done || apps().any(|c| !c.ever_started) {
            "Pending"
        } else if apps().all(|c| c.done) {
            if apps().all(Ctr::succeeded) {
                "Succeeded"
            } else {
                "Failed"
            }
        } else {
            "Running"
        };
        let unready: Vec<&str> = apps()
            .filter(|c| !c.ready())
            .map(|c| c.plan.name.as_str())
            .collect();
        let list = |names: &[&str]| format!("[{}]", names.join(" "));
        let not_ready_reason = if phase == "Succeeded" {
            "PodCompleted"
        } else {
            "ContainersNotReady"
        };
        let not_ready = (
            not_ready_reason,
            format!("containers with unready status: {}", list(&unready)),
        );
        let conditions = [
            (
                "Initialized",
                init_done,
                (
                    "ContainersNotInitialized",
                    format!("containers with incomplete status: {}", list(&incomplete)),
                ),
            ),
            ("Ready", unready.is_empty(), not_ready.clone()),
            ("ContainersReady", unready.is_empty(), not_ready),
            ("PodScheduled", true, ("", String::new())),
        ];
        let now = OffsetDateTime::now_utc();
        let mut condition_json = Vec::new();
        for (kind, ok, (reason, message)) in conditions {
            let entry = self.conditions.entry(kind).or_insert((ok, now));
            if entry.0 != ok {
                *entry = (ok, now);
            }
            let mut c = json!({
                "type": kind,
                "status": if ok { "True" } else { "False" },
                "lastProbeTime": null,
                "lastTransitionTime": rfc3339(entry.1),
            });
            if !ok {
                put(&mut c, "reason", json!(reason));
                if phase != "Succeeded" {
                    put(&mut c, "message", json!(message));
                }
            }
            condition_json.push(c);
        }
        let ip = &self.shared.cfg.host_ip;
        let mut status = json!({
            "phase": phase,
            "conditions": condition_json,
            "hostIP": ip,
            "hostIPs": [{"ip": ip}],
            "startTime": rfc3339(self.start_time),
        });
        // Known once the pod's network is (a pod network: its sandbox).
        if let Some(pod_ip) = &self.pod_ip {
            put(&mut status, "podIP", json!(pod_ip));
            put(&mut status, "podIPs", json!([{ "ip": pod_ip }]));
        }
        let mut messages: Vec<&str> = self.volume_error.iter().map(String::as_str).collect();
        messages.extend(self.mount_warnings.iter().map(String::as_str));
        if !messages.is_empty() {
            put(&mut status, "message", json!(messages.join("; ")));
        }
        let statuses = |init: bool| -> Vec<Value> {
            self.ctrs
                .iter()
                .filter(|c| c.init == init)
                .map(|c| self.container_status(c, init_done))
                .collect()
        };
        let init_statuses = statuses(true);
        if !init_statuses.is_empty() {
            put(&mut status, "initContainerStatuses", json!(init_statuses));
        }
        put(&mut status, "containerStatuses", json!(statuses(false)));
        put(&mut status, "qosClass", json!(self.plan.qos_class));
        status
    }

    fn container_status(&self, c: &Ctr, init_done: bool) -> Value {
        let state = if let Some(run) = &c.run {
            json!({"running": {"startedAt": rfc3339(run.started_at)}})
        } else if let Some(t) = &c.terminated {
            json!({"terminated": t.json()})
        } else {
            let (reason, message) = match (&c.waiting, &self.volume_error) {
                (Some((reason, message)), _) => (*reason, Some(message.as_str())),
                (None, Some(error)) => ("ContainerCreating", Some(error.as_str())),
                (None, None) if !c.init && !init_done => ("PodInitializing", None),
                (None, None) => ("ContainerCreating", None),
            };
            let mut waiting = json!({"reason": reason});
            if let Some(message) = message {
                put(&mut waiting, "message", json!(message));
            }
            json!({"waiting": waiting})
        };
        let mut s = json!({
            "name": c.plan.name,
            "image": c.plan.image,
            "imageID": c.image_id,
        });
        if let Some(id) = &c.container_id {
            put(&mut s, "containerID", json!(id));
        }
        put(&mut s, "ready", json!(c.ready()));
        put(
            &mut s,
            "started",
            json!(c.run.as_ref().is_some_and(|r| r.started)),
        );
        put(&mut s, "restartCount", json!(c.restart_count));
        put(&mut s, "state", state);
        let last = match &c.last {
            Some(t) => json!({"terminated": t.json()}),
            None => json!({}),
        };
        put(&mut s, "lastState", last);
        s
    }
}

/// Puts the pod's IP where the plan holds its place (`plan::POD_IP`): in
/// environment values and the arguments expanded from them.
fn fill_pod_ip(spec: &mut LaunchSpec, ip: &str) {
    let fill = |s: &mut String| {
        if s.contains(POD_IP) {
            *s = s.replace(POD_IP, ip);
        }
    };
    fill(&mut spec.program);
    let i = &mut spec.isolated;
    for s in spec
        .args
        .iter_mut()
        .chain(&mut i.command)
        .chain(&mut i.args)
    {
        fill(s);
    }
    for (_, v) in spec.env.iter_mut().chain(&mut i.env) {
        fill(v);
    }
}
