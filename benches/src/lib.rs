//! keel's benches live in `benches/`; this library holds what several of
//! them share: starting the release `cloudcore` and an `edgecore` as real
//! processes on loopback, and reading a process's RSS.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The benches run keel on the allocator its binaries run on (see
/// ARCHITECTURE.md, "Memory"), so that what they measure in process is
/// what cloudcore and edgecore do. A bench that uses nothing else of this
/// library links it with `use keel_benches as _;`.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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

/// The release cloudcore, `run --no-grpc --data-dir <dir> --hub-addr <hub>
/// --bootstrap-addr <boot>` and `extra`, its stdout and stderr to `out` and
/// `err` (null if `None`).
pub fn cloudcore(
    dir: &Path,
    hub: &str,
    boot: &str,
    extra: &[&std::ffi::OsStr],
    out: Option<&Path>,
    err: Option<&Path>,
) -> Kill {
    let to = |p: Option<&Path>| p.map_or_else(Stdio::null, |p| File::create(p).unwrap().into());
    Kill(
        Command::new(bin("cloudcore"))
            .args(["run", "--no-grpc", "--data-dir"])
            .arg(dir)
            .args(["--hub-addr", hub, "--bootstrap-addr", boot])
            .args(extra)
            .stdout(to(out))
            .stderr(to(err))
            .spawn()
            .unwrap(),
    )
}

/// A join token for `node` from the cloudcore whose data directory is `dir`.
pub fn token(dir: &Path, node: &str) -> String {
    let token = Command::new(bin("cloudcore"))
        .args(["token", node, "--data-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "cloudcore token: {}",
        String::from_utf8_lossy(&token.stderr)
    );
    String::from_utf8(token.stdout).unwrap().trim().to_owned()
}

/// The release edgecore on `dir`, joining the cloudcore at `hub`/`boot`
/// with `token`; its stderr to `err` (null if `None`).
pub fn edgecore(dir: &Path, hub: &str, boot: &str, token: &str, err: Option<&Path>) -> Kill {
    edgecore_with(dir, hub, boot, token, err, &[])
}

/// [`edgecore`] with `extra` arguments to `edgecore run`.
pub fn edgecore_with(
    dir: &Path,
    hub: &str,
    boot: &str,
    token: &str,
    err: Option<&Path>,
    extra: &[&str],
) -> Kill {
    Kill(
        Command::new(bin("edgecore"))
            .args(["run", "--data-dir"])
            .arg(dir)
            .args([
                "--cloud-hub",
                hub,
                "--cloud-bootstrap",
                boot,
                "--api-addr",
                &format!("127.0.0.1:{}", port(false)),
                "--mqtt-addr",
                "127.0.0.1:0",
                "--token",
                token,
            ])
            .args(extra)
            .stderr(err.map_or_else(Stdio::null, |p| File::create(p).unwrap().into()))
            .spawn()
            .unwrap(),
    )
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
        Self::start_with(dir, &[])
    }

    /// [`Cluster::start`] with `edge_extra` arguments to `edgecore run`.
    pub fn start_with(dir: &Path, edge_extra: &[&str]) -> Cluster {
        let (hub, boot) = (
            format!("127.0.0.1:{}", port(true)),
            format!("127.0.0.1:{}", port(false)),
        );
        let cloud_dir = dir.join("cloud");
        let cloud = cloudcore(
            &cloud_dir,
            &hub,
            &boot,
            &["--api-addr".as_ref(), "127.0.0.1:0".as_ref()],
            None,
            None,
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
        let token = token(&cloud_dir, "edge-1");
        let edge = edgecore_with(&dir.join("edge-1"), &hub, &boot, &token, None, edge_extra);
        Cluster {
            edge,
            cloud,
            kubeconfig,
        }
    }
}
