//! edgecore's own endpoints off loopback: refused without authentication,
//! and with it, clients without the right credentials are refused — real
//! edgecore and cloudcore processes, real kubectl, the `keel` CLI and
//! Debian's mosquitto_pub.
//!
//! cloudcore and keel are the binaries built next to edgecore (`cargo test
//! --workspace` builds them; with `-p keel-edge` alone build them first).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use cluster::*;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A kubeconfig for the edge API at `server` trusting `ca`, with the
/// client certificate and key (PEM files) `client`, or none.
fn kubeconfig(path: &Path, server: &str, ca: &Path, client: Option<(&Path, &Path)>) {
    let user = match client {
        Some((c, k)) => format!(
            "client-certificate: {}\n    client-key: {}",
            c.display(),
            k.display()
        ),
        None => "{}".into(),
    };
    std::fs::write(
        path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: edge\n  cluster:\n    server: https://{server}\n    certificate-authority: {}\ncontexts:\n- name: edge\n  context:\n    cluster: edge\n    user: u\nusers:\n- name: u\n  user:\n    {user}\ncurrent-context: edge\n",
            ca.display()
        ),
    )
    .unwrap();
}

/// The admin's certificate and key from cloudcore's admin kubeconfig, as
/// PEM files in `dir`.
fn admin_cert(cloud: &Cloud, dir: &Path) -> (PathBuf, PathBuf) {
    use base64::Engine as _;
    let text = std::fs::read_to_string(cloud.kubeconfig()).unwrap();
    let field = |name: &str| {
        let b64 = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name} not in the admin kubeconfig"));
        base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .unwrap()
    };
    let (c, k) = (dir.join("admin.pem"), dir.join("admin.key"));
    std::fs::write(&c, field("client-certificate-data")).unwrap();
    std::fs::write(&k, field("client-key-data")).unwrap();
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).unwrap();
    (c, k)
}

#[test]
fn endpoints_off_loopback_require_authentication() {
    let tmp = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(&tmp.path().join("cloud"), None, None, None);
    let dir = tmp.path().join("edge");
    let node = "edge-auth";
    let common = |cmd: &mut Command| {
        cmd.arg("--data-dir").arg(&dir).args([
            "--cloud-hub",
            &cloud.hub,
            "--cloud-bootstrap",
            &cloud.bootstrap,
        ]);
    };
    let mut join = Command::new(env!("CARGO_BIN_EXE_edgecore"));
    join.arg("join");
    common(&mut join);
    join.args(["--token", &cloud.token(node)]);
    let o = join.output().unwrap();
    assert!(o.status.success(), "join: {}", stderr(&o));

    let (api_port, grpc_port, mqtt_port) = (free_port(), free_port(), free_port());
    let lo = |p: u16| format!("127.0.0.1:{p}");
    let any = |p: u16| format!("0.0.0.0:{p}");
    let run = |extra: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgecore"));
        cmd.arg("run");
        common(&mut cmd);
        cmd.args(extra);
        cmd
    };

    // Off loopback without authentication: refused before anything
    // listens, naming the setting that is missing.
    for (args, needs) in [
        (
            vec!["--api-addr", &any(api_port), "--mqtt-addr", &lo(mqtt_port)],
            "--client-ca-file",
        ),
        (
            vec![
                "--api-addr",
                &lo(api_port),
                "--grpc-addr",
                &any(grpc_port),
                "--mqtt-addr",
                &lo(mqtt_port),
            ],
            "--client-ca-file",
        ),
        (
            vec!["--api-addr", &lo(api_port), "--mqtt-addr", &any(mqtt_port)],
            "--mqtt-password-file",
        ),
    ] {
        let o = run(&args).output().unwrap();
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?} was accepted");
        assert!(
            err.contains("not a loopback address") && err.contains(needs),
            "{args:?}: {err}"
        );
    }

    // A password file others can read is refused.
    let pw = tmp.path().join("mqtt.passwd");
    std::fs::write(&pw, "# mappers\nmapper:s3cret\n").unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
    let ca = dir.join("pki/ca.pem");
    let authed = |at: &dyn Fn(u16) -> String| {
        vec![
            "--api-addr".to_owned(),
            at(api_port),
            "--grpc-addr".to_owned(),
            at(grpc_port),
            "--mqtt-addr".to_owned(),
            at(mqtt_port),
            "--client-ca-file".to_owned(),
            ca.display().to_string(),
            "--mqtt-password-file".to_owned(),
            pw.display().to_string(),
        ]
    };
    let off_loopback = authed(&any);
    let off_loopback: Vec<&str> = off_loopback.iter().map(String::as_str).collect();
    let o = run(&off_loopback).output().unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("chmod 600"), "{}", stderr(&o));
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();

    // With authentication configured it runs (accepted off loopback, see
    // `Config::check_endpoints`' unit test; run here on loopback, as every
    // test peer, with authentication on all the same).
    let on_loopback = authed(&lo);
    let on_loopback: Vec<&str> = on_loopback.iter().map(String::as_str).collect();
    let log = std::fs::File::create(tmp.path().join("edgecore.log")).unwrap();
    let mut edge = Proc(Some(
        run(&on_loopback)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    ));
    let serving = dir.join("pki/serving.pem");
    wait_for("edgecore's endpoints", Duration::from_secs(60), || {
        assert!(edge.alive(), "edgecore exited; see its log");
        serving.exists()
            && [api_port, grpc_port, mqtt_port]
                .iter()
                .all(|p| std::net::TcpStream::connect(lo(*p)).is_ok())
    });
    let k = |kc: &Path, args: &[&str]| kubectl(kc, &tmp.path().join("kube-cache"), args, None);
    // No client certificate: the TLS handshake refuses it.
    let o = Command::new(on_path("curl"))
        .args(["-sS", "--cacert"])
        .arg(&serving)
        .arg(format!("https://{}/api/v1/pods", lo(api_port)))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        o.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(
        stderr(&o).contains("certificate required"),
        "{}",
        stderr(&o)
    );

    // The node's own certificate (same CA, not the admin): 403.
    let as_node = tmp.path().join("node.kubeconfig");
    kubeconfig(
        &as_node,
        &lo(api_port),
        &serving,
        Some((&dir.join("pki/node.pem"), &dir.join("pki/node.key"))),
    );
    let o = k(&as_node, &["get", "pods", "-A"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("Forbidden"), "{}", stderr(&o));

    // The cluster admin's certificate: served.
    let (admin_c, admin_k) = admin_cert(&cloud, tmp.path());
    let admin = tmp.path().join("admin-edge.kubeconfig");
    kubeconfig(&admin, &lo(api_port), &serving, Some((&admin_c, &admin_k)));
    wait_for("the edge's Node object", Duration::from_secs(60), || {
        k(&admin, &["get", "node", node]).status.success()
    });
    let o = k(&admin, &["get", "pods", "-A"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // The log gRPC API: plain HTTP/2 gets nothing; TLS with the admin's
    // certificate verifies the node's chains.
    let keel = |args: &[&str]| {
        Command::new(sibling_bin("keel"))
            .arg("--kubeconfig")
            .arg(cloud.kubeconfig())
            .args(["--edge", &lo(grpc_port)])
            .args(args)
            .output()
            .unwrap()
    };
    let o = keel(&["verify"]);
    assert!(!o.status.success(), "plain gRPC was served");
    let o = keel(&["--edge-ca", serving.to_str().unwrap(), "verify"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&format!("{node}/up")),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    // MQTT: no login, a wrong password, and the right one.
    let publish = |login: &[&str]| {
        Command::new(on_path("mosquitto_pub"))
            .args(["-h", "127.0.0.1", "-p", &mqtt_port.to_string()])
            .args(["-q", "1", "-t", "keel/test", "-m", "x"])
            .args(login)
            .output()
            .unwrap()
    };
    for login in [
        &[][..],
        &["-u", "mapper", "-P", "wrong"],
        &["-u", "nobody", "-P", "s3cret"],
    ] {
        let o = publish(login);
        assert!(!o.status.success(), "{login:?} was let in");
        assert!(
            stderr(&o).to_lowercase().contains("user")
                || stderr(&o).to_lowercase().contains("authori"),
            "{login:?}: {}",
            stderr(&o)
        );
    }
    let o = publish(&["-u", "mapper", "-P", "s3cret"]);
    assert!(o.status.success(), "{}", stderr(&o));
    edge.stop();
}
