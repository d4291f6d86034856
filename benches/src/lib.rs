//! keel's benches live in `benches/`; this library holds what several of
//! them share: starting the release `cloudcore` and an `edgecore` as real
//! processes on loopback, and reading a process's RSS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A release binary of this workspace (`cargo build --release --bins`).
pub fn bin(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --release --bins` first",
        p.display()
    );
    p
}

/// A free loopback port (UDP or TCP).
pub fn port(udp: bool) -> u16 {
    if udp {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    } else {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }
}

/// Resident set size of process `pid`, KiB (0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A child process stopped (SIGTERM, then SIGKILL after 20 s) when dropped.
#[derive(Debug)]
pub struct Kill(pub Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(20) {
            if self.0.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A release cloudcore and one joined edgecore `edge-1` under `dir`.
#[derive(Debug)]
pub struct Cluster {
    /// Dropped last: edgecore stops before cloudcore.
    pub edge: Kill,
    pub cloud: Kill,
    /// The admin kubeconfig cloudcore wrote.
    pub kubeconfig: PathBuf,
}

impl Cluster {
    pub fn start(dir: &Path) -> Cluster {
        let (hub, boot) = (
            format!("127.0.0.1:{}", port(true)),
            format!("127.0.0.1:{}", port(false)),
        );
        let cloud_dir = dir.join("cloud");
        let cloud = Kill(
            Command::new(bin("cloudcore"))
                .args(["run", "--no-grpc", "--data-dir"])
                .arg(&cloud_dir)
                .args([
                    "--api-addr",
                    "127.0.0.1:0",
                    "--hub-addr",
                    &hub,
                    "--bootstrap-addr",
                    &boot,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let kubeconfig = cloud_dir.join("admin.kubeconfig");
        let start = Instant::now();
        while !kubeconfig.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "cloudcore did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let token = Command::new(bin("cloudcore"))
            .args(["token", "edge-1", "--data-dir"])
            .arg(&cloud_dir)
            .output()
            .unwrap();
        assert!(token.status.success());
        let token = String::from_utf8(token.stdout).unwrap().trim().to_owned();
        let edge = Kill(
            Command::new(bin("edgecore"))
                .args(["run", "--data-dir"])
                .arg(dir.join("edge-1"))
                .args([
                    "--cloud-hub",
                    &hub,
                    "--cloud-bootstrap",
                    &boot,
                    "--api-addr",
                    &format!("127.0.0.1:{}", port(false)),
                    "--mqtt-addr",
                    "127.0.0.1:0",
                    "--token",
                    &token,
                ])
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        Cluster {
            edge,
            cloud,
            kubeconfig,
        }
    }
}
