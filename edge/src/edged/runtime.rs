//! Container runtimes: the [`Runtime`] trait Edged drives, and
//! [`ProcessRuntime`], which runs every container as a host process in its
//! own process group.

use std::fmt::Debug;
use std::fs;
use std::future::Future;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tracing::{debug, info, warn};

use super::Error;

/// A boxed, `Send` future (runtimes are used as trait objects).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a runtime needs to start one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// Container name (for messages).
    pub name: String,
    /// The container's `image` (a process runtime ignores it).
    pub image: String,
    /// Executable: a path, or a name looked up in the `PATH` of `env`.
    pub program: String,
    /// Arguments after the executable.
    pub args: Vec<String>,
    /// The complete environment (nothing is inherited from edgecore).
    pub env: Vec<(String, String)>,
    /// Working directory; it exists.
    pub working_dir: PathBuf,
    /// stdout and stderr are appended to this file (CRI format).
    pub log_file: PathBuf,
    /// Rotation of `log_file`: past this size it becomes `<file>.1` (the
    /// older ones shifted up), keeping `log_max_files` files in all.
    pub log_max_size: u64,
    pub log_max_files: u32,
    /// The container's `stdin`: keep a pipe to it open for `kubectl
    /// attach -i` (otherwise it reads end of file at once).
    pub stdin: bool,
    /// Where the runtime records what it needs to find and kill this
    /// container after edgecore crashed (see [`Runtime::kill_leftover`]).
    /// The runtime removes it once the container has exited.
    pub state_file: PathBuf,
    /// The uid and gid a process runtime runs the container (and its
    /// execs) as; `None`: edgecore's own.
    pub user: Option<(u32, u32)>,
    /// What a runtime that isolates containers needs besides (see
    /// [`Runtime::isolates`]); the process runtime uses none of it.
    pub isolated: Isolated,
}

/// A running container taken over from a previous edgecore.
#[derive(Debug)]
pub struct Adopted {
    pub handle: Arc<dyn ContainerHandle>,
    /// How many times it had been restarted when it was started.
    pub restart_count: u32,
    /// When it started (Unix nanoseconds).
    pub started_at_ns: i64,
}

/// The pod a container belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// A port of the node forwarded to a container (`ports[].hostPort`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub container_port: u16,
    pub host_port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    pub protocol: String,
    /// `hostIP`, or empty for every address.
    pub host_ip: String,
}

/// The network a pod's spec asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodNetwork {
    /// `spec.hostNetwork`: the node's network namespace.
    pub host: bool,
    /// The containers' ports that name a `hostPort`.
    pub host_ports: Vec<HostPort>,
}

/// A volume a container sees at `container_path`: the host directory or
/// file `host_path`, bind-mounted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    pub host_path: PathBuf,
    pub container_path: String,
    pub read_only: bool,
}

/// The container's `imagePullPolicy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Pull at every start.
    Always,
    /// Pull only when the image is missing (Kubernetes' default for a
    /// tagged image).
    #[default]
    IfNotPresent,
    /// Never pull: a missing image is `ErrImageNeverPull`.
    Never,
}

/// A container as a runtime with its own filesystem and namespaces sees
/// it (a CRI runtime): the pod, the command as the spec gives it (empty:
/// the image's), bind mounts, security context and resource limits.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Isolated {
    pub pod: PodRef,
    pub network: PodNetwork,
    /// `command` and `args` as the spec gives them, `$(VAR)` expanded;
    /// empty ones take the image's entrypoint and command.
    pub command: Vec<String>,
    pub args: Vec<String>,
    /// `workingDir`, or empty for the image's.
    pub working_dir: String,
    /// The declared environment only (the image's comes first).
    pub env: Vec<(String, String)>,
    pub mounts: Vec<BindMount>,
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    pub read_only_root: bool,
    pub privileged: bool,
    /// `resources.limits.memory` in bytes.
    pub memory_limit: Option<i64>,
    /// `resources.limits.cpu` in millicores.
    pub cpu_limit_millis: Option<i64>,
    /// `resources.requests.cpu` in millicores (CPU shares).
    pub cpu_request_millis: Option<i64>,
    pub pull_policy: PullPolicy,
    /// How many times this container was started before (CRI attempt).
    pub attempt: u32,
    /// `stdinOnce`: the container's stdin closes when the first attach
    /// session that wrote to it ends.
    pub stdin_once: bool,
}

/// Signals Edged sends to a container (to its whole process group for the
/// process runtime).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopSignal {
    /// Ask to terminate (SIGTERM).
    Term,
    /// Kill (SIGKILL).
    Kill,
}

/// How a container (or an exec'd command) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// Exit code, when it exited normally.
    pub code: Option<i32>,
    /// Signal number, when a signal killed it.
    pub signal: Option<i32>,
    /// The kernel's OOM killer ended it (its memory limit was reached).
    pub oom_killed: bool,
}

impl ExitStatus {
    /// The Kubernetes `exitCode`: the code, or 128 + signal number.
    pub fn exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(code), _) => code,
            (None, Some(signal)) => 128 + signal,
            (None, None) => 255,
        }
    }

    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl From<std::process::ExitStatus> for ExitStatus {
    fn from(status: std::process::ExitStatus) -> Self {
        ExitStatus {
            code: status.code(),
            signal: status.signal(),
            oom_killed: false,
        }
    }
}

/// A container runtime. Edged calls [`Runtime::start`] from inside its tokio
/// runtime; the returned handle is waited on by one task and signalled by
/// others.
pub trait Runtime: Send + Sync + Debug + 'static {
    /// Starts a container. Errors (executable not found, ...) become the
    /// container's `RunContainerError`.
    fn start(&self, spec: &LaunchSpec) -> Result<Arc<dyn ContainerHandle>, Error>;

    /// Kills what a previous edgecore left running, as recorded in
    /// `state_file` (a [`LaunchSpec::state_file`]), and removes the file.
    /// Returns whether something was killed. Must never kill anything that
    /// is not that container.
    fn kill_leftover(&self, state_file: &Path) -> Result<bool, Error>;

    /// The extension of the state files this runtime writes (and whose
    /// leftovers it kills at start).
    fn state_extension(&self) -> &'static str {
        "pid"
    }

    /// Whether containers outlive edgecore and are taken over by the next
    /// one ([`Runtime::adopt`]) instead of killed at its start.
    fn adopts(&self) -> bool {
        false
    }

    /// Takes over the container recorded in `state_file` if it still runs
    /// what `spec` asks (same pod, container and spec); otherwise kills it
    /// and returns `None`, so that the caller starts a new one.
    fn adopt(&self, state_file: &Path, spec: &LaunchSpec) -> Result<Option<Adopted>, Error> {
        let _ = (state_file, spec);
        Ok(None)
    }

    /// Whether containers get a filesystem and namespaces of their own (a
    /// CRI runtime): volumes are then bind mounts at their mount paths and
    /// the command runs as the spec and the image say, instead of the
    /// process runtime's host process in the pod directory.
    fn isolates(&self) -> bool {
        false
    }

    /// The pod's own IP address when this runtime gives the pod a network
    /// of its own (a CRI runtime whose CNI is set up, for a pod without
    /// `hostNetwork`), making the pod's sandbox if need be; `None` when the
    /// pod shares the node's network. Edged asks with the spec of the
    /// container it is about to start (every start: the runtime remembers),
    /// as the kubelet makes the sandbox first.
    fn pod_ip(&self, spec: &LaunchSpec) -> Result<Option<String>, Error> {
        let _ = spec;
        Ok(None)
    }

    /// The pod is gone from this node: release what the runtime holds for
    /// it (a CRI runtime's pod sandbox). Its containers have exited.
    fn pod_removed(&self, _pod: &PodRef) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// A started container.
pub trait ContainerHandle: Send + Sync + Debug + 'static {
    /// Kubernetes `containerID`, e.g. `process://1234`.
    fn id(&self) -> String;

    /// Kubernetes `imageID`: the image's digest, where the runtime has
    /// images (empty for the process runtime).
    fn image_id(&self) -> String {
        String::new()
    }

    /// Sends a signal to the container (all its processes). Signalling a
    /// container that has exited is a no-op.
    fn signal(&self, signal: StopSignal) -> Result<(), Error>;

    /// Waits until the container's main process exits; the rest of the
    /// container is killed then. Returns the same status when called again.
    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, Error>>;

    /// Runs `command` "inside" the container (same environment and working
    /// directory for the process runtime), output discarded, killed after
    /// `timeout` (then [`Error::Timeout`]).
    fn exec(
        &self,
        command: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<ExitStatus, Error>>;

    /// Starts `command` (program, then arguments) "inside" the container
    /// with its stdin, stdout and stderr handed to the caller (`kubectl
    /// exec`); no terminal. The command is killed when the caller drops
    /// [`ExecProcess::exit`] before it ended, and when the container stops.
    ///
    /// Errors: [`Error::NotRunning`] if the container has exited,
    /// [`Error::Spawn`] if the program could not be started. Runtimes
    /// without it (the default) return [`Error::Unsupported`]; a CRI
    /// runtime implements it with the streaming `Exec` call.
    fn exec_interactive(
        &self,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<ExecProcess, Error>> {
        drop(command);
        Box::pin(async { Err(Error::Unsupported("exec")) })
    }

    /// Like [`ContainerHandle::exec_interactive`], with the command on a
    /// new terminal (`kubectl exec -t`): its stdin, stdout and stderr are
    /// the terminal, [`ExecProcess::stdout`] reads what it shows,
    /// [`ExecProcess::stdin`] types, [`ExecProcess::stderr`] yields
    /// nothing; the returned [`TerminalResize`] sets its size. Runtimes
    /// without it return [`Error::Unsupported`].
    fn exec_terminal(
        &self,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<(ExecProcess, TerminalResize), Error>> {
        drop(command);
        Box::pin(async { Err(Error::Unsupported("exec with a terminal")) })
    }

    /// Writes `data` to the container's stdin (`kubectl attach -i`);
    /// `None` closes it (`stdinOnce`). Errors: [`Error::Unsupported`] when
    /// the container has no stdin (its spec did not ask for one, or the
    /// runtime cannot), [`Error::NotRunning`] once it is closed.
    fn write_stdin(&self, data: Option<bytes::Bytes>) -> BoxFuture<'_, Result<(), Error>> {
        drop(data);
        Box::pin(async { Err(Error::Unsupported("stdin")) })
    }
}

/// Sets the size (columns, rows) of an exec's terminal.
pub type TerminalResize = Box<dyn Fn(u16, u16) + Send + Sync>;

/// The caller's end of an exec'd command's stdin.
pub type ExecStdin = Box<dyn AsyncWrite + Send + Unpin>;

/// The caller's end of an exec'd command's stdout or stderr.
pub type ExecOutput = Box<dyn AsyncRead + Send + Unpin>;

/// A command started by [`ContainerHandle::exec_interactive`] (see
/// `Edged::exec`).
///
/// The fields are independent: move the streams out (e.g. to copy them to
/// and from a client) and keep `exit` to learn how the command ended.
/// Dropping `exit` (or the future of [`ExecExit::wait`]) before the command
/// ended kills it (its whole process group with the process runtime), so a
/// client that goes away leaves nothing running. stdout and stderr are
/// pipes: read them, or the command blocks once a pipe is full.
pub struct ExecProcess {
    /// The command's stdin; dropping it closes it (the command reads end of
    /// file). Always `Some` from [`ContainerHandle::exec_interactive`]; an
    /// `Option` so that it can be [`Option::take`]n and dropped.
    pub stdin: Option<ExecStdin>,
    /// The command's stdout.
    pub stdout: ExecOutput,
    /// The command's stderr.
    pub stderr: ExecOutput,
    /// How the command ends; kills it when dropped before.
    pub exit: ExecExit,
}

impl Debug for ExecProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecProcess")
            .field("stdin", &self.stdin.is_some())
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

/// The end of an exec'd command. Dropping it before the command ended kills
/// the command.
#[derive(Debug)]
pub struct ExecExit {
    result: oneshot::Receiver<Result<ExitStatus, Error>>,
    _cancel: oneshot::Sender<()>,
}

impl ExecExit {
    /// For runtimes: the task running the command sends its status on
    /// `result` once it ended, and kills the command as soon as `cancel`'s
    /// sender (held by the returned value) is dropped before that.
    pub fn new(
        result: oneshot::Receiver<Result<ExitStatus, Error>>,
        cancel: oneshot::Sender<()>,
    ) -> ExecExit {
        ExecExit {
            result,
            _cancel: cancel,
        }
    }

    /// Waits until the command ended: its exit code, or 128 + the signal
    /// number if a signal killed it (137 when it was killed because the
    /// container stopped). Dropping this future kills the command.
    pub async fn wait(self) -> Result<i32, Error> {
        Ok(self.status().await?.exit_code())
    }

    /// Like [`ExecExit::wait`], with the exit code and signal apart.
    pub async fn status(self) -> Result<ExitStatus, Error> {
        // `_cancel` lives until the status arrived.
        let ExecExit { result, _cancel } = self;
        result
            .await
            .map_err(|_| Error::Runtime("exec: the command's supervisor went away".into()))?
    }
}

/// Runs containers as host processes: `program` with `args`, a clean
/// environment, in its own process group, output appended to the log file.
/// The state file holds `"<pid> <start time>"`, the start time being field 22
/// of `/proc/<pid>/stat`, so that a leftover is only killed if it is still
/// the same process.
#[derive(Debug, Default)]
pub struct ProcessRuntime;

impl Runtime for ProcessRuntime {
    fn start(&self, spec: &LaunchSpec) -> Result<Arc<dyn ContainerHandle>, Error> {
        if let Some(parent) = spec.log_file.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log_file)
            .map_err(|e| Error::io(&spec.log_file, e))?;
        // Looked up here (as edgecore): run as another user, a search
        // through PATH entries it may not read would say "permission
        // denied" for a program that is simply missing.
        let program =
            resolve(&spec.env, &spec.working_dir, spec.user, &spec.program).map_err(|source| {
                Error::Spawn {
                    program: spec.program.clone(),
                    source,
                }
            })?;
        let mut command = tokio::process::Command::new(&program);
        command
            .args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.working_dir)
            .stdin(if spec.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(false);
        as_user(&mut command, spec.user);
        let mut child = command.spawn().map_err(|source| Error::Spawn {
            program: spec.program.clone(),
            source,
        })?;
        // Its output, stamped, into the log file (CRI format, see crilog).
        if let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) {
            let (file, path) = (tokio::fs::File::from_std(log), spec.log_file.clone());
            let rotation = super::crilog::Rotation {
                path: path.clone(),
                max_size: spec.log_max_size,
                max_files: spec.log_max_files,
            };
            tokio::spawn(async move {
                if let Err(e) = super::crilog::copy(stdout, stderr, file, &rotation).await {
                    warn!(file = %path.display(), error = %e, "writing a container's log failed");
                }
            });
        }
        let stdin = child.stdin.take();
        let pid = child
            .id()
            .and_then(|pid| i32::try_from(pid).ok())
            .ok_or_else(|| Error::Runtime("started process has no pid".into()))?;
        let container = ProcessContainer {
            pid,
            child: tokio::sync::Mutex::new(Some(child)),
            stdin: tokio::sync::Mutex::new(stdin),
            exit: OnceLock::new(),
            exited: AtomicBool::new(false),
            gone: watch::Sender::new(false),
            env: spec.env.clone(),
            working_dir: spec.working_dir.clone(),
            user: spec.user,
            state_file: spec.state_file.clone(),
        };
        if let Err(e) = write_state_file(&spec.state_file, pid) {
            // Without the record a crash of edgecore would leave it running.
            let _ = kill_group(pid, Signal::KILL);
            return Err(e);
        }
        debug!(pid, program = %spec.program, container = %spec.name, "container process started");
        Ok(Arc::new(container))
    }

    fn kill_leftover(&self, state_file: &Path) -> Result<bool, Error> {
        let text = match fs::read_to_string(state_file) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(Error::io(state_file, e)),
        };
        let mut fields = text.split_whitespace();
        let pid = fields.next().and_then(|p| p.parse::<i32>().ok());
        let start = fields.next().and_then(|s| s.parse::<u64>().ok());
        let mut killed = false;
        if let (Some(pid), Some(start)) = (pid, start)
            && proc_start_time(pid) == Some(start)
        {
            info!(pid, file = %state_file.display(), "killing container left by a previous edgecore");
            kill_group(pid, Signal::KILL).map_err(|e| Error::io(state_file, e))?;
            killed = true;
        }
        match fs::remove_file(state_file) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(state_file, e)),
        }
        Ok(killed)
    }
}

#[derive(Debug)]
struct ProcessContainer {
    pid: i32,
    child: tokio::sync::Mutex<Option<tokio::process::Child>>,
    /// The pipe to its stdin while open (specs with `stdin: true`).
    stdin: tokio::sync::Mutex<Option<tokio::process::ChildStdin>>,
    exit: OnceLock<ExitStatus>,
    exited: AtomicBool,
    /// Becomes true when the container has exited (kills its execs).
    gone: watch::Sender<bool>,
    env: Vec<(String, String)>,
    working_dir: PathBuf,
    user: Option<(u32, u32)>,
    state_file: PathBuf,
}

/// What an exec needs of its container, taken when it is asked for.
struct ExecIn {
    env: Vec<(String, String)>,
    working_dir: PathBuf,
    user: Option<(u32, u32)>,
    gone: watch::Receiver<bool>,
    exited: bool,
}

impl ProcessContainer {
    fn exec_in(&self) -> ExecIn {
        ExecIn {
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            user: self.user,
            gone: self.gone.subscribe(),
            exited: self.exited.load(Ordering::Acquire),
        }
    }
}

/// The program and arguments of an exec into a container that still runs
/// (unless `gone`).
fn exec_command(command: &[String], gone: bool) -> Result<(&String, &[String]), Error> {
    if gone {
        return Err(Error::NotRunning);
    }
    command
        .split_first()
        .ok_or_else(|| Error::Runtime("exec: empty command".into()))
}

impl ContainerHandle for ProcessContainer {
    fn id(&self) -> String {
        format!("process://{}", self.pid)
    }

    fn write_stdin(&self, data: Option<bytes::Bytes>) -> BoxFuture<'_, Result<(), Error>> {
        Box::pin(async move {
            use tokio::io::AsyncWriteExt as _;
            let mut stdin = self.stdin.lock().await;
            let Some(pipe) = stdin.as_mut() else {
                return Err(Error::NotRunning);
            };
            match data {
                Some(data) => {
                    if let Err(e) = pipe.write_all(&data).await {
                        *stdin = None;
                        return Err(Error::Runtime(format!("writing to stdin: {e}")));
                    }
                    Ok(())
                }
                None => {
                    *stdin = None;
                    Ok(())
                }
            }
        })
    }

    fn signal(&self, signal: StopSignal) -> Result<(), Error> {
        if self.exited.load(Ordering::Acquire) {
            return Ok(());
        }
        let signal = match signal {
            StopSignal::Term => Signal::TERM,
            StopSignal::Kill => Signal::KILL,
        };
        kill_group(self.pid, signal)
            .map_err(|e| Error::Runtime(format!("signal {}: {e}", self.pid)))
    }

    fn wait(&self) -> BoxFuture<'_, Result<ExitStatus, Error>> {
        Box::pin(async move {
            let mut guard = self.child.lock().await;
            if let Some(status) = self.exit.get() {
                return Ok(*status);
            }
            let Some(child) = guard.as_mut() else {
                return Err(Error::Runtime("container process lost".into()));
            };
            let status = child
                .wait()
                .await
                .map_err(|e| Error::Runtime(format!("wait for {}: {e}", self.pid)))?;
            // The main process is gone: so is the container. Kill what it
            // left in its group (the group id stays reserved while members
            // remain, so this cannot hit another process).
            let _ = kill_group(self.pid, Signal::KILL);
            self.exited.store(true, Ordering::Release);
            self.gone.send_replace(true);
            let status = ExitStatus::from(status);
            let _ = self.exit.set(status);
            *guard = None;
            if let Err(e) = fs::remove_file(&self.state_file)
                && e.kind() != io::ErrorKind::NotFound
            {
                warn!(file = %self.state_file.display(), error = %e, "cannot remove pid file");
            }
            Ok(status)
        })
    }

    fn exec(
        &self,
        command: Vec<String>,
        timeout: Duration,
    ) -> BoxFuture<'static, Result<ExitStatus, Error>> {
        let env = self.env.clone();
        let working_dir = self.working_dir.clone();
        let user = self.user;
        Box::pin(async move {
            let Some((program, args)) = command.split_first() else {
                return Err(Error::Runtime("exec: empty command".into()));
            };
            let mut child = command_in(&env, &working_dir, user, program, args, Stdio::null)
                .and_then(|mut c| c.spawn())
                .map_err(|source| Error::Spawn {
                    program: program.clone(),
                    source,
                })?;
            let pid = child.id().and_then(|p| i32::try_from(p).ok());
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(status) => {
                    if let Some(pid) = pid {
                        let _ = kill_group(pid, Signal::KILL);
                    }
                    status
                        .map(ExitStatus::from)
                        .map_err(|e| Error::Runtime(format!("exec wait: {e}")))
                }
                Err(_) => {
                    if let Some(pid) = pid {
                        let _ = kill_group(pid, Signal::KILL);
                    }
                    let _ = child.wait().await;
                    Err(Error::Timeout(timeout))
                }
            }
        })
    }

    fn exec_interactive(
        &self,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<ExecProcess, Error>> {
        let cx = self.exec_in();
        Box::pin(async move {
            let (program, args) = exec_command(&command, cx.exited || *cx.gone.borrow())?;
            let mut child = command_in(
                &cx.env,
                &cx.working_dir,
                cx.user,
                program,
                args,
                Stdio::piped,
            )
            .and_then(|mut c| c.spawn())
            .map_err(|source| Error::Spawn {
                program: program.clone(),
                source,
            })?;
            let (pid, guard) = leader(&mut child).await?;
            let (Some(stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                drop(guard);
                let _ = child.wait().await;
                return Err(Error::Runtime("exec: no pipes to the process".into()));
            };
            debug!(pid, program = %program, "exec started");
            let (result_tx, result_rx) = oneshot::channel();
            let (cancel_tx, cancel_rx) = oneshot::channel();
            tokio::spawn(supervise_exec(child, guard, cancel_rx, cx.gone, result_tx));
            Ok(ExecProcess {
                stdin: Some(Box::new(stdin)),
                stdout: Box::new(stdout),
                stderr: Box::new(stderr),
                exit: ExecExit::new(result_rx, cancel_tx),
            })
        })
    }

    fn exec_terminal(
        &self,
        command: Vec<String>,
    ) -> BoxFuture<'static, Result<(ExecProcess, TerminalResize), Error>> {
        let cx = self.exec_in();
        Box::pin(async move {
            let (program, args) = exec_command(&command, cx.exited || *cx.gone.borrow())?;
            let (mut child, master) =
                spawn_on_terminal(&cx.env, &cx.working_dir, cx.user, program, args)?;
            // `setsid` made it the leader of its own group.
            let (pid, guard) = leader(&mut child).await?;
            let clone = |m: &std::os::fd::OwnedFd| {
                m.try_clone()
                    .map(|fd| tokio::fs::File::from_std(fs::File::from(fd)))
                    .map_err(|e| Error::Runtime(format!("exec -t: {e}")))
            };
            let (reader, writer) = (clone(&master)?, clone(&master)?);
            debug!(pid, program = %program, "exec on a terminal started");
            let (result_tx, result_rx) = oneshot::channel();
            let (cancel_tx, cancel_rx) = oneshot::channel();
            tokio::spawn(supervise_exec(child, guard, cancel_rx, cx.gone, result_tx));
            let resize: TerminalResize = Box::new(move |cols, rows| {
                let size = rustix::termios::Winsize {
                    ws_row: rows,
                    ws_col: cols,
                    ws_xpixel: 0,
                    ws_ypixel: 0,
                };
                let _ = rustix::termios::tcsetwinsize(&master, size);
            });
            Ok((
                ExecProcess {
                    stdin: Some(Box::new(writer)),
                    stdout: Box::new(reader),
                    stderr: Box::new(tokio::io::empty()),
                    exit: ExecExit::new(result_rx, cancel_tx),
                },
                resize,
            ))
        })
    }
}

/// Whether `user` (uid, gid) may run the file at `path`: every directory
/// on the way (as written and as resolved) searchable, the file readable
/// and executable, by the owner, group or other bits that apply (root:
/// anything). As `execvp` does, a PATH search then passes over entries
/// the user cannot reach (a tool under root's home) to the next one.
fn may_run(path: &Path, (uid, gid): (u32, u32)) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    if uid == 0 {
        return true;
    }
    let allows = |m: &fs::Metadata, bits: u32| {
        let mode = m.mode();
        let class = if m.uid() == uid {
            mode >> 6
        } else if m.gid() == gid {
            mode >> 3
        } else {
            mode
        };
        class & bits == bits
    };
    let dirs_ok = |p: &Path| {
        p.ancestors()
            .skip(1)
            .all(|d| fs::metadata(d).is_ok_and(|m| allows(&m, 0o1)))
    };
    let Ok(real) = fs::canonicalize(path) else {
        return false;
    };
    dirs_ok(path) && dirs_ok(&real) && fs::metadata(&real).is_ok_and(|m| allows(&m, 0o5))
}

/// Where `program` is found: itself when it names a path, else the first
/// match in the `PATH` of `env` (`kubectl exec` reports a missing program
/// before anything runs).
fn resolve(
    env: &[(String, String)],
    working_dir: &Path,
    user: Option<(u32, u32)>,
    program: &str,
) -> io::Result<PathBuf> {
    let found = |p: &Path| {
        fs::metadata(p).is_ok_and(|m| {
            use std::os::unix::fs::PermissionsExt as _;
            m.is_file() && m.permissions().mode() & 0o111 != 0
        }) && user.is_none_or(|u| may_run(p, u))
    };
    let not_found = || io::Error::new(io::ErrorKind::NotFound, "no such file or directory");
    if program.contains('/') {
        let p = working_dir.join(program);
        return if found(&p) { Ok(p) } else { Err(not_found()) };
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or("/usr/local/bin:/usr/bin:/bin", |(_, v)| v.as_str());
    path.split(':')
        .map(|d| working_dir.join(d).join(program))
        .find(|p| found(p))
        .ok_or_else(not_found)
}

/// Starts `program` with `args` on a new terminal: a pseudo-terminal whose
/// other end is the command's stdin, stdout, stderr and controlling
/// terminal (through util-linux `setsid --ctty`, which also makes it the
/// leader of its own session and process group).
fn spawn_on_terminal(
    env: &[(String, String)],
    working_dir: &Path,
    user: Option<(u32, u32)>,
    program: &str,
    args: &[String],
) -> Result<(tokio::process::Child, std::os::fd::OwnedFd), Error> {
    use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};
    let io_err = |what: &str, e: io::Error| Error::Runtime(format!("exec -t: {what}: {e}"));
    let resolved = resolve(env, working_dir, user, program).map_err(|source| Error::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let setsid = ["/usr/bin/setsid", "/bin/setsid"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or(Error::Unsupported(
            "exec with a terminal (util-linux setsid is missing)",
        ))?;
    let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC)
        .map_err(|e| io_err("opening a terminal", e.into()))?;
    grantpt(&master).map_err(|e| io_err("grantpt", e.into()))?;
    unlockpt(&master).map_err(|e| io_err("unlockpt", e.into()))?;
    let name = ptsname(&master, Vec::new()).map_err(|e| io_err("ptsname", e.into()))?;
    let slave = {
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(rustix::fs::OFlags::NOCTTY.bits() as i32)
            .open(std::ffi::OsStr::from_bytes(name.as_bytes()))
            .map_err(|e| io_err("opening its other end", e))?
    };
    let stdio = |f: &fs::File| {
        f.try_clone()
            .map(Stdio::from)
            .map_err(|e| io_err("its other end", e))
    };
    let mut c = tokio::process::Command::new(setsid);
    c.arg("--ctty")
        .arg(&resolved)
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(working_dir)
        .stdin(stdio(&slave)?)
        .stdout(stdio(&slave)?)
        .stderr(Stdio::from(slave))
        .kill_on_drop(false);
    as_user(&mut c, user);
    let child = c.spawn().map_err(|source| Error::Spawn {
        program: program.to_owned(),
        source,
    })?;
    // The command's copies are its own now: ours close, so the terminal
    // reads end of file (EIO) once the command and its children are gone.
    drop(c);
    Ok((child, master))
}

/// The pid of a started exec, leader of its own process group, and the
/// guard that kills that group.
async fn leader(child: &mut tokio::process::Child) -> Result<(i32, GroupGuard), Error> {
    let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
        let _ = child.kill().await;
        return Err(Error::Runtime("exec: started process has no pid".into()));
    };
    Ok((pid, GroupGuard::new(pid)))
}

/// Kills the process group of a started, not yet reaped, process when
/// dropped (also when the task owning it is dropped, e.g. at shutdown).
struct GroupGuard {
    pid: i32,
    armed: bool,
}

impl GroupGuard {
    fn new(pid: i32) -> GroupGuard {
        GroupGuard { pid, armed: true }
    }

    /// The process was reaped: its pid may be reused, never signal it.
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            let _ = kill_group(self.pid, Signal::KILL);
        }
    }
}

/// Owns an exec'd process until it ended: kills its group when the caller
/// dropped its [`ExecExit`] (`cancel`) or the container stopped (`gone`),
/// kills what it left in its group once it exited, and reports its status.
async fn supervise_exec(
    mut child: tokio::process::Child,
    mut guard: GroupGuard,
    mut cancel: oneshot::Receiver<()>,
    mut gone: watch::Receiver<bool>,
    result: oneshot::Sender<Result<ExitStatus, Error>>,
) {
    let pid = guard.pid;
    let container_gone = async {
        // The container's handle dropped without an exit (edgecore going
        // away as if it crashed): nothing to react to.
        if gone.wait_for(|gone| *gone).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let status = tokio::select! {
        status = child.wait() => status,
        _ = &mut cancel => {
            debug!(pid, "exec abandoned by its caller: killing it");
            let _ = kill_group(pid, Signal::KILL);
            child.wait().await
        }
        () = container_gone => {
            debug!(pid, "container stopped: killing its exec");
            let _ = kill_group(pid, Signal::KILL);
            child.wait().await
        }
    };
    guard.disarm();
    // The leader is gone; so is the command. Kill what it left in its
    // group (the group id stays reserved while members remain).
    let _ = kill_group(pid, Signal::KILL);
    let status = status
        .map(ExitStatus::from)
        .map_err(|e| Error::Runtime(format!("exec wait: {e}")));
    let _ = result.send(status);
}

/// Sends `signal` to the process group `pid`; a group that no longer exists
/// is not an error. Refuses pids 0 and 1 (which would mean "everything").
pub(crate) fn kill_group(pid: i32, signal: Signal) -> io::Result<()> {
    if pid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal pid <= 1",
        ));
    }
    let Some(pid) = Pid::from_raw(pid) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "invalid pid"));
    };
    match rustix::process::kill_process_group(pid, signal) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Field 22 (`starttime`) of `/proc/<pid>/stat`, if the process exists and
/// is not a zombie.
pub(crate) fn proc_start_time(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state).
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

fn write_state_file(path: &Path, pid: i32) -> Result<(), Error> {
    let start = proc_start_time(pid).unwrap_or(0);
    let tmp = path.with_extension("tmp");
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
    }
    fs::write(&tmp, format!("{pid} {start}\n")).map_err(|e| Error::io(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// A command run in a container's environment and working directory, in a
/// process group of its own, with `stdio` for its three streams.
fn command_in(
    env: &[(String, String)],
    working_dir: &Path,
    user: Option<(u32, u32)>,
    program: &str,
    args: &[String],
    stdio: fn() -> Stdio,
) -> io::Result<tokio::process::Command> {
    let mut c = tokio::process::Command::new(resolve(env, working_dir, user, program)?);
    c.args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(working_dir)
        .stdin(stdio())
        .stdout(stdio())
        .stderr(stdio())
        .process_group(0)
        .kill_on_drop(false);
    as_user(&mut c, user);
    Ok(c)
}

/// Runs the command as `user` (uid, gid), without edgecore's
/// supplementary groups (the standard library drops them when a root
/// process sets a uid).
fn as_user(c: &mut tokio::process::Command, user: Option<(u32, u32)>) {
    if let Some((uid, gid)) = user {
        c.uid(uid).gid(gid);
    }
}
