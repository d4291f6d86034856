//! A containerd of a test's (or bench's) own, and a test image: shared by
//! `edge/tests/containers.rs` and the `edge_pods` bench. Needs Debian's
//! containerd, runc, containernetworking-plugins and busybox-static
//! (`./dev test` installs them).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A tool on `PATH` (or in /usr/sbin).
fn tool(name: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("{name} is missing: run the tests with ./dev test (it installs containerd)")
        })
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Builds an OCI image archive `out` named `reference` from the host's
/// busybox with `script` (`edge/tests/support/oci_image.py`).
pub fn build_image(script: &Path, out: &Path, reference: &str) {
    let built = Command::new("python3")
        .arg(script)
        .arg(out)
        .arg(reference)
        .status()
        .unwrap();
    assert!(built.success(), "building the test image");
}

/// A containerd of the test's own: config, root, state and socket under
/// `dir`; the sandbox ("pause") image is the test image.
pub struct Containerd {
    child: Option<Child>,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl Containerd {
    pub fn start(dir: &Path, sandbox_image: &str) -> Containerd {
        std::fs::create_dir_all(dir.join("net.d")).unwrap();
        let runc = ["/usr/sbin/runc", "/usr/bin/runc"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| tool("runc"));
        let socket = dir.join("containerd.sock");
        // Loopback only: pods share the node's network.
        std::fs::write(
            dir.join("net.d/10-lo.conflist"),
            r#"{"cniVersion":"0.4.0","name":"lo","plugins":[{"type":"loopback"}]}"#,
        )
        .unwrap();
        let d = dir.display();
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{socket}"
[ttrpc]
  address = "{socket}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox_image}"
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/net.d"
"#,
            socket = socket.display(),
            runc = runc.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new(tool("containerd"))
            .arg("--config")
            .arg(dir.join("config.toml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let c = Containerd {
            child: Some(child),
            dir: dir.to_owned(),
            socket,
        };
        wait_for("containerd to answer", Duration::from_secs(60), || {
            c.ctr(&["version"]).status.success()
        });
        c
    }

    /// SIGKILL, then the same containerd again.
    pub fn restart(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("containerd.log"))
            .unwrap();
        self.child = Some(
            Command::new(tool("containerd"))
                .arg("--config")
                .arg(self.dir.join("config.toml"))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        wait_for(
            "containerd to answer again",
            Duration::from_secs(60),
            || self.ctr(&["version"]).status.success(),
        );
    }

    /// containerd's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new(tool("ctr"))
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // What still runs is killed and deleted, so the shims exit.
        let tasks = self.ctr(&["tasks", "ls", "-q"]);
        for id in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        }
        std::thread::sleep(Duration::from_millis(500));
        for id in String::from_utf8_lossy(&tasks.stdout).split_whitespace() {
            let _ = self.ctr(&["tasks", "delete", "-f", id]);
        }
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(1));
            let _ = c.kill();
            let _ = c.wait();
        }
        // Shims of this containerd, if any outlived it.
        let sock = self.socket.display().to_string();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                let cmdline = String::from_utf8_lossy(&cmdline);
                if cmdline.contains("containerd-shim") && cmdline.contains(&sock) {
                    let _ = Command::new("kill")
                        .args(["-KILL", &p.file_name().to_string_lossy()])
                        .status();
                }
            }
        }
        // Its mounts (snapshots, sandbox shm) under the test's directory.
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let dir = self.dir.display().to_string();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|m| m.starts_with(&dir))
            .collect();
        points.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in points {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
    }
}
