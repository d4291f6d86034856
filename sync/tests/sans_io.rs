//! The protocol core is sans-IO: keel-sync's default dependency tree has no
//! async runtime, QUIC or socket crates, and the core modules name no
//! clock, socket, file, thread or runtime API.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

#[test]
fn default_dependency_tree_has_no_runtime_or_sockets() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-p",
            "keel-sync",
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).unwrap();
    assert!(
        tree.contains("keel-sync"),
        "unexpected cargo tree output: {tree}"
    );
    for forbidden in [
        "tokio ",
        "quinn ",
        "quinn-proto ",
        "mio ",
        "socket2 ",
        "rustls ",
    ] {
        assert!(
            !tree.lines().any(|l| l.starts_with(forbidden)),
            "keel-sync (default features) depends on {forbidden}:\n{tree}"
        );
    }
}

#[test]
fn core_modules_use_no_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![
        src.join("link.rs"),
        src.join("frame.rs"),
        src.join("objects.rs"),
    ];
    for e in std::fs::read_dir(src.join("crdt")).unwrap() {
        files.push(e.unwrap().path());
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for forbidden in [
            "std::net",
            "std::fs",
            "Instant",
            "SystemTime",
            "tokio",
            "quinn",
            "std::thread",
            "std::io::Write",
        ] {
            let hits: Vec<&str> = text
                .lines()
                .filter(|l| !l.trim_start().starts_with("//") && l.contains(forbidden))
                .collect();
            assert!(
                hits.is_empty(),
                "{} uses {forbidden}: {hits:?}",
                f.display()
            );
        }
    }
}
