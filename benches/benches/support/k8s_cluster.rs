//! What `edge/tests/support/k8s.rs` takes from the end-to-end tests' process
//! helpers (`edge/tests/support/cluster.rs`, which needs the edge crate's own
//! binaries), on the benches' library: included as `mod cluster` by the
//! benches that run a Kubernetes control plane.

use std::io::Write as _;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    keel_benches::port(false)
}

/// A child process, SIGKILLed when dropped.
pub struct Proc(pub Option<Child>);

impl Proc {
    pub fn alive(&mut self) -> bool {
        matches!(self.0.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The real kubectl with `input` on its stdin (empty if `None`).
pub fn kubectl(kubeconfig: &Path, cache: &Path, args: &[&str], input: Option<&str>) -> Output {
    let mut child = Command::new(crate::support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(cache)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(input.unwrap_or_default().as_bytes())
        .unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// stdout of a command that must have succeeded.
pub fn ok(o: Output, what: &str) -> String {
    if !o.status.success() {
        panic!("{what}: {}", String::from_utf8_lossy(&o.stderr));
    }
    String::from_utf8(o.stdout).unwrap()
}
