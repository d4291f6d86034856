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
    /// The CNI bridge its pods' networks hang on, and their subnet.
    pub bridge: String,
    pub subnet: String,
}

/// A CNI configuration giving each pod an address on a bridge of its own
/// (`bridge`, gateway to the host, no masquerading) and its host ports
/// (portmap); the IPAM state stays under `dir`.
pub fn cni_config(dir: &Path, bridge: &str, subnet: &str) -> String {
    format!(
        r#"{{"cniVersion":"0.4.0","name":"{bridge}","plugins":[
  {{"type":"bridge","bridge":"{bridge}","isGateway":true,"ipMasq":false,"hairpinMode":true,
    "ipam":{{"type":"host-local","dataDir":"{ipam}","ranges":[[{{"subnet":"{subnet}"}}]]}}}},
  {{"type":"portmap","capabilities":{{"portMappings":true}}}}
]}}"#,
        ipam = dir.join("cni-ipam").display(),
    )
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
        // A bridge and a subnet of this process's own (tests in parallel).
        let pid = std::process::id();
        let bridge = format!("kt{pid}");
        let subnet = format!("10.{}.{}.0/24", 200 + (pid >> 8) % 50, pid % 256);
        std::fs::write(
            dir.join("net.d/10-keel.conflist"),
            cni_config(dir, &bridge, &subnet),
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
            bridge,
            subnet,
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
        self.start_again("containerd to answer again");
    }

    /// Starts containerd again on the same config (its log appended) and
    /// waits until it answers.
    fn start_again(&mut self, what: &str) {
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
        wait_for(what, Duration::from_secs(60), || {
            self.ctr(&["version"]).status.success()
        });
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

impl Containerd {
    /// What a node's reboot does: every container, sandbox and shim
    /// killed, containerd too, the pods' network namespaces, bridge and
    /// host-port rules gone, mounts undone; then containerd starts again
    /// on the same root (images and metadata kept).
    pub fn reboot(&mut self) {
        self.power_off();
        self.start_again("containerd to answer after the reboot");
    }

    fn power_off(&mut self) {
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
        // Network namespaces of sandboxes still there (their veths go with
        // them), then the bridge.
        let prefix = self.subnet.trim_end_matches(".0/24").to_owned() + ".";
        for ns in std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = ns.file_name().to_string_lossy().into_owned();
            let addrs = Command::new(tool("ip"))
                .args(["-n", &name, "-o", "-4", "addr"])
                .output();
            if addrs.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&prefix)) {
                let _ = Command::new(tool("ip"))
                    .args(["netns", "delete", &name])
                    .status();
            }
        }
        let _ = Command::new(tool("ip"))
            .args(["link", "delete", &self.bridge])
            .stderr(Stdio::null())
            .status();
        remove_host_ports(&self.bridge);
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

impl Drop for Containerd {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// Removes the host-port rules the CNI portmap plugin left for network
/// `name` (sandboxes killed without their network torn down).
pub fn remove_host_ports(name: &str) {
    let iptables = |args: &[&str]| {
        Command::new(tool("iptables"))
            .args(["-t", "nat"])
            .args(args)
            .output()
    };
    let Ok(listed) = iptables(&["-L", "CNI-HOSTPORT-DNAT", "-n", "--line-numbers"]) else {
        return;
    };
    let tag = format!("dnat name: \"{name}\"");
    // (rule number, the chain it jumps to), deleted from the last.
    let mut found: Vec<(u32, String)> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter(|l| l.contains(&tag))
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.to_owned()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (n, chain) in found {
        let _ = iptables(&["-D", "CNI-HOSTPORT-DNAT", &n.to_string()]);
        let _ = iptables(&["-F", &chain]);
        let _ = iptables(&["-X", &chain]);
    }
}
