//! Real-process helpers shared by edgecore's end-to-end tests: a
//! cloudcore and edgecores on loopback, each its own OS process, and the
//! real kubectl against them.

#![allow(dead_code)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::support::kubectl_bin;

#[path = "../../../cloud/tests/support/ports.rs"]
mod ports;
pub use ports::{free_port, free_udp_port};

pub fn cloudcore_bin() -> PathBuf {
    let edgecore = PathBuf::from(env!("CARGO_BIN_EXE_edgecore"));
    let bin = edgecore.with_file_name("cloudcore");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo test --workspace`, or `cargo build -p keel-cloud --bin cloudcore` first",
        bin.display()
    );
    bin
}

/// A binary built next to edgecore (cloudcore, keel).
pub fn sibling_bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgecore")).with_file_name(name)
}

/// A tool on `PATH` (mosquitto_pub, curl), which `./dev test` installs.
pub fn on_path(tool: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join(tool))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{tool} is missing: run the tests with ./dev test"))
}

/// cloudcore's whole `/metrics` page at `addr` (empty when unreachable).
pub fn metrics_text(addr: &str) -> String {
    use std::io::Read as _;
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// A stream's value of metric `name` in cloudcore's `/metrics` at `addr`
/// (0 when absent or unreachable).
pub fn metric(addr: &str, name: &str, stream: &str) -> u64 {
    let text = metrics_text(addr);
    // An empty `stream`: a metric without labels.
    let prefix = if stream.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{stream=\"{stream}\"}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
        .unwrap_or(0)
}

/// The `keel` CLI against cloudcore's admin gRPC API at `grpc`.
pub fn keel_cli(cloud: &Cloud, grpc: &str, args: &[&str]) -> Output {
    Command::new(sibling_bin("keel"))
        .arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .args(["--server", grpc])
        .args(args)
        .output()
        .unwrap()
}

/// A field of `/proc/PID/status` in KiB (`VmRSS`, `VmHWM`).
pub fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

pub fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        if start.elapsed() > limit && std::env::var_os("KEEL_E2E_KEEP").is_some() {
            std::thread::sleep(Duration::from_secs(3600));
        }
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

/// A child process that is killed (SIGKILL) when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.0.take() {
            signal(&c, "-TERM");
            let start = Instant::now();
            loop {
                if let Some(st) = c.try_wait().unwrap() {
                    assert!(st.success(), "exit status {st}");
                    return;
                }
                if start.elapsed() > Duration::from_secs(20) {
                    let _ = c.kill();
                    let _ = c.wait();
                    panic!("did not stop within 20 s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    pub fn alive(&mut self) -> bool {
        self.0
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // Edges stop their containers on SIGTERM; then SIGKILL whatever is left.
        if let Some(c) = &self.0 {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(15) {
                if self
                    .0
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
                {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        self.kill9();
    }
}

pub struct Cloud {
    pub dir: PathBuf,
    pub api: String,
    pub hub: String,
    pub bootstrap: String,
    /// Attached mode: where it serves its nodes' kubelet streaming API.
    pub stream: String,
    pub proc: Proc,
}

impl Cloud {
    pub fn start(
        dir: &Path,
        api: Option<String>,
        hub: Option<String>,
        bootstrap: Option<String>,
    ) -> Cloud {
        Self::start_with(dir, api, hub, bootstrap, &[])
    }

    /// [`Cloud::start`] with more flags for `cloudcore run`.
    pub fn start_with(
        dir: &Path,
        api: Option<String>,
        hub: Option<String>,
        bootstrap: Option<String>,
        extra: &[&str],
    ) -> Cloud {
        let api = api.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let hub = hub.unwrap_or_else(|| format!("127.0.0.1:{}", free_udp_port()));
        let bootstrap = bootstrap.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .unwrap();
        // The admin gRPC API only when asked for.
        let grpc = if extra.contains(&"--grpc-addr") {
            None
        } else {
            Some("--no-grpc")
        };
        let child = Command::new(cloudcore_bin())
            .arg("run")
            .args(grpc)
            .arg("--data-dir")
            .arg(dir)
            .args([
                "--api-addr",
                &api,
                "--hub-addr",
                &hub,
                "--bootstrap-addr",
                &bootstrap,
            ])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Cloud {
            dir: dir.to_owned(),
            api,
            hub,
            bootstrap,
            stream: String::new(),
            proc: Proc(Some(child)),
        };
        wait_for("cloudcore to serve", Duration::from_secs(60), || {
            c.kubeconfig().exists() && c.k(&["get", "--raw", "/healthz"]).status.success()
        });
        c
    }

    /// cloudcore attached to the cluster of `kubeconfig` (no API of its
    /// own; `api` is then the autonomy webhook's address). Ready once it
    /// says so on stdout.
    pub fn start_attached(
        dir: &Path,
        kubeconfig: &Path,
        hub: Option<String>,
        bootstrap: Option<String>,
        webhook: Option<String>,
    ) -> Cloud {
        Self::start_attached_with(dir, kubeconfig, hub, bootstrap, webhook, &[])
    }

    /// [`Cloud::start_attached`] with more flags for `cloudcore run`.
    pub fn start_attached_with(
        dir: &Path,
        kubeconfig: &Path,
        hub: Option<String>,
        bootstrap: Option<String>,
        webhook: Option<String>,
        extra: &[&str],
    ) -> Cloud {
        let stream = format!("127.0.0.1:{}", free_port());
        let hub = hub.unwrap_or_else(|| format!("127.0.0.1:{}", free_udp_port()));
        let bootstrap = bootstrap.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let webhook = webhook.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.with_extension("log"))
            .unwrap();
        let out = dir.with_extension("out");
        let stdout = std::fs::File::create(&out).unwrap();
        // The admin gRPC API only when asked for.
        let grpc = (!extra.contains(&"--grpc-addr")).then_some("--no-grpc");
        let child = Command::new(cloudcore_bin())
            .arg("run")
            .args(grpc)
            .arg("--data-dir")
            .arg(dir)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args([
                "--hub-addr",
                &hub,
                "--bootstrap-addr",
                &bootstrap,
                "--webhook-addr",
                &webhook,
                "--stream-addr",
                &stream,
                "--api-addr",
                &format!("127.0.0.1:{}", free_port()),
            ])
            .args(extra)
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .unwrap();
        let mut c = Cloud {
            dir: dir.to_owned(),
            api: webhook,
            hub,
            bootstrap,
            stream,
            proc: Proc(Some(child)),
        };
        wait_for(
            "attached cloudcore to start",
            Duration::from_secs(60),
            || {
                assert!(
                    c.proc.alive(),
                    "cloudcore exited: {}",
                    std::fs::read_to_string(dir.with_extension("log")).unwrap_or_default()
                );
                std::fs::read_to_string(&out).is_ok_and(|s| s.contains("cloudcore is running"))
            },
        );
        c
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// `kubectl ARGS` (a shell word list) against the cloud on a terminal
    /// of its own sized 123 columns by 45 rows (`script` gives kubectl
    /// one), for at most a minute. kubectl logs its requests (`-v=6`) on
    /// that terminal, so a failure shows how far it got. `script`'s own
    /// input stays open until kubectl ends: at the end of its input it
    /// would type an end-of-file into the terminal. `timeout` runs in
    /// the foreground (`--foreground`): without it, it moves itself and
    /// kubectl into a process group of their own, in the terminal's
    /// background, and the kernel stops kubectl (SIGTTOU) as soon as it
    /// puts the terminal in raw mode: it then sits silent until killed.
    pub fn k_on_terminal(&self, args: &str) -> Output {
        let mut child = Command::new("script")
            .args([
                "-qec",
                &format!(
                    "stty cols 123 rows 45; timeout --foreground 60 {} -v=6 --kubeconfig {} --cache-dir {} {args}",
                    kubectl_bin().display(),
                    self.kubeconfig().display(),
                    self.dir.with_extension("kube-cache").display()
                ),
                "/dev/null",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take();
        let out = child.wait_with_output().unwrap();
        drop(input);
        out
    }

    /// The last `lines` lines of this cloudcore's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.dir.with_extension("log"), lines)
    }

    pub fn k(&self, args: &[&str]) -> Output {
        kubectl(
            &self.kubeconfig(),
            &self.dir.with_extension("kube-cache"),
            args,
            None,
        )
    }

    pub fn token(&self, node: &str) -> String {
        let o = Command::new(cloudcore_bin())
            .args(["token", node, "--data-dir"])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap().trim().to_owned()
    }
}

pub fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(kubectl_bin());
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args);
    run(&mut cmd, stdin)
}

/// Runs `cmd` to the end with `stdin` (if any) as its input, capturing
/// its output.
pub fn run(cmd: &mut Command, stdin: Option<&str>) -> Output {
    let mut child = cmd
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    child.wait_with_output().unwrap()
}

pub fn ok(o: Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

pub struct Edge {
    pub dir: PathBuf,
    pub api: String,
    /// The event bus (MQTT) address.
    pub mqtt: String,
    pub kubeconfig: PathBuf,
    pub proc: Proc,
}

impl Edge {
    pub fn start(
        dir: &Path,
        node: &str,
        cloud: &Cloud,
        token: Option<String>,
        api: Option<String>,
    ) -> Edge {
        Self::start_with(dir, node, cloud, token, api, &[])
    }

    /// [`Edge::start`] with more flags for `edgecore run`.
    pub fn start_with(
        dir: &Path,
        node: &str,
        cloud: &Cloud,
        token: Option<String>,
        api: Option<String>,
        extra: &[&str],
    ) -> Edge {
        std::fs::create_dir_all(dir).unwrap();
        // Pods of the process runtime run as an unprivileged user: they
        // pass through the test's directories (0700 as made) to their own,
        // as through a data directory's parents.
        {
            use std::os::unix::fs::PermissionsExt as _;
            let tmp = std::env::temp_dir();
            for a in dir.ancestors().skip(1) {
                if !a.starts_with(&tmp) || a == tmp {
                    break;
                }
                let mode = std::fs::metadata(a).unwrap().permissions().mode();
                std::fs::set_permissions(a, std::fs::Permissions::from_mode(mode | 0o111)).unwrap();
            }
        }
        let api = api.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let mqtt = format!("127.0.0.1:{}", free_port());
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("edgecore.log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgecore"));
        cmd.args(["run", "--data-dir"]).arg(dir).args([
            "--cloud-hub",
            &cloud.hub,
            "--cloud-bootstrap",
            &cloud.bootstrap,
            "--api-addr",
            &api,
            "--mqtt-addr",
            &mqtt,
            "--restart-backoff-seconds",
            "0.2",
        ]);
        if let Some(t) = &token {
            cmd.args(["--token", t]);
        }
        cmd.args(extra);
        let child = cmd.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        let kubeconfig = dir.join("edge.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: edge\n  cluster:\n    server: http://{api}\ncontexts:\n- name: edge\n  context:\n    cluster: edge\n    user: edge\nusers:\n- name: edge\n  user: {{}}\ncurrent-context: edge\n"
            ),
        )
        .unwrap();
        let mut e = Edge {
            dir: dir.to_owned(),
            api,
            mqtt,
            kubeconfig,
            proc: Proc(Some(child)),
        };
        wait_for("edgecore's API", Duration::from_secs(60), || {
            assert!(
                e.proc.alive(),
                "edgecore {node} exited; see {}",
                e.dir.join("edgecore.log").display()
            );
            e.k(&["get", "--raw", "/healthz"]).status.success()
        });
        e
    }

    pub fn k(&self, args: &[&str]) -> Output {
        kubectl(&self.kubeconfig, &self.dir.join("kube-cache"), args, None)
    }

    pub fn pod(&self, name: &str) -> Option<Value> {
        let o = self.k(&["get", "pod", name, "-o", "json"]);
        o.status
            .success()
            .then(|| serde_json::from_slice(&o.stdout).unwrap())
    }
}

/// The last `lines` lines of the file at `path` (empty if unreadable).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
