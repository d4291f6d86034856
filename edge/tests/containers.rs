//! Pods as containers, through a real containerd (its CRI API) started by
//! the test with its own config, state and socket, and a real cloudcore,
//! edgecore and kubectl. The image is built here from the host's static
//! busybox as an OCI archive (no registry exists) and imported with
//! `edgecore import-image`.
//!
//! One test, in steps: a pod runs from the image (its own filesystem) and
//! `kubectl logs` shows its output; `kubectl exec` runs in it, stdin and
//! its end included (`kubectl cp` into it), `kubectl attach -i` writes to
//! its stdin; a pod gets an address of its own on
//! the containerd's CNI bridge (environment, HTTP probe, host port,
//! `kubectl port-forward`), a hostNetwork pod the node's; a failing exec liveness probe restarts
//! it; a memory limit kills it (OOMKilled); readOnlyRootFilesystem holds;
//! offline, edgecore adopts its containers across restarts, and a reboot
//! of the node (every container, sandbox and network gone) brings the pod
//! back from the local log;
//! a missing image with pull policy Never, and one no registry serves,
//! are errors on the pod; `runtimeClassName: keel-process` runs a pod as
//! host processes beside.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]

#[path = "support/cluster.rs"]
mod cluster;
#[path = "support/containerd.rs"]
mod containerd;
#[path = "../../cloud/tests/support/kubectl.rs"]
mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use cluster::*;
use containerd::Containerd;
use serde_json::Value;

const IMAGE: &str = "docker.io/library/keel-busybox:1";

fn pod(name: &str, extra_spec: &str, container: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  nodeName: box
  restartPolicy: Always
  terminationGracePeriodSeconds: 1
{extra_spec}  containers:
  - name: main
    image: {IMAGE}
    imagePullPolicy: Never
{container}"#
    )
}

fn get(cloud: &Cloud, name: &str) -> Value {
    let o = cloud.k(&["get", "pod", name, "-o", "json"]);
    if !o.status.success() {
        return Value::Null;
    }
    serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
}

fn apply(cloud: &Cloud, yaml: &str) {
    let o = kubectl(
        &cloud.kubeconfig(),
        &cloud.dir.with_extension("kube-cache"),
        &["apply", "-f", "-"],
        Some(yaml),
    );
    assert!(
        o.status.success(),
        "kubectl apply: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn pods_run_as_containers_through_containerd() {
    let tmp = tempfile::tempdir().unwrap();
    let containerd = Containerd::start(&tmp.path().join("containerd"), IMAGE);
    let archive = tmp.path().join("image.tar");
    containerd::build_image(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/oci_image.py"),
        &archive,
        IMAGE,
    );
    let sock = containerd.socket.to_str().unwrap().to_owned();
    let imported = Command::new(env!("CARGO_BIN_EXE_edgecore"))
        .args(["import-image", "--cri-socket", &sock])
        .arg(&archive)
        .output()
        .unwrap();
    assert!(
        imported.status.success(),
        "edgecore import-image: {}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert!(
        containerd
            .ctr(&["images", "ls", "-q"])
            .stdout
            .starts_with(IMAGE.as_bytes())
            || String::from_utf8_lossy(&containerd.ctr(&["images", "ls", "-q"]).stdout)
                .contains(IMAGE),
        "the image was not imported"
    );

    let cloud = Cloud::start(&tmp.path().join("cloud"), None, None, None);
    // Small log files, so that rotation shows.
    let edge_args = [
        "--cri-socket",
        sock.as_str(),
        "--container-log-max-size",
        "65536",
        "--container-log-max-files",
        "3",
    ];
    let start_edge = |cloud: &Cloud, token: Option<String>| {
        Edge::start_with(
            &tmp.path().join("box"),
            "box",
            cloud,
            token,
            None,
            &edge_args,
        )
    };
    let edge = start_edge(&cloud, Some(cloud.token("box")));

    // A pod from the image: its own root filesystem (the host's
    // /etc/os-release is not there), its output in kubectl logs.
    apply(
        &cloud,
        &pod(
            "hello",
            "",
            "    command: [\"sh\", \"-c\", \"test -e /etc/os-release || echo isolated; echo hello from a container; exec sleep 3600\"]\n",
        ),
    );
    wait_for("hello Running", Duration::from_secs(120), || {
        get(&cloud, "hello")["status"]["phase"] == "Running"
    });
    let p = get(&cloud, "hello");
    let id = p["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(id.starts_with("containerd://"), "{p}");
    eprintln!("hello runs as {id}");
    wait_for("hello's logs", Duration::from_secs(30), || {
        let o = cloud.k(&["logs", "hello"]);
        let out = String::from_utf8_lossy(&o.stdout);
        out.contains("isolated") && out.contains("hello from a container")
    });

    // kubectl exec through cloudcore runs in the container: its output,
    // its exit code.
    let o = cloud.k(&[
        "exec",
        "hello",
        "--",
        "sh",
        "-c",
        "test -e /etc/os-release || echo exec-isolated; echo to-stderr >&2; exit 3",
    ]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "exec-isolated\n",
        "{o:?}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("to-stderr"),
        "{o:?}"
    );

    // stdin reaches the command, and so does its end: `kubectl cp` pipes a
    // tar archive into `tar x` in the container and waits for it to end.
    let within = |secs: u32, args: &[&str], input: Option<&[u8]>| {
        let mut child = Command::new("timeout")
            .arg(secs.to_string())
            .arg(support::kubectl_bin())
            .arg("--kubeconfig")
            .arg(cloud.kubeconfig())
            .arg("--cache-dir")
            .arg(cloud.dir.with_extension("kube-cache"))
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write as _;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(input.unwrap_or_default()).unwrap();
        }
        child.wait_with_output().unwrap()
    };
    let o = within(
        60,
        &["exec", "-i", "hello", "--", "wc", "-c"],
        Some(b"twelve bytes"),
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "12", "{o:?}");
    let local = tmp.path().join("copied.txt");
    std::fs::write(&local, "copied into the container\n").unwrap();
    let o = within(
        60,
        &["cp", local.to_str().unwrap(), "hello:/tmp/copied.txt"],
        None,
    );
    assert!(o.status.success(), "kubectl cp: {o:?}");
    let o = cloud.k(&["exec", "hello", "--", "cat", "/tmp/copied.txt"]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "copied into the container\n",
        "{o:?}"
    );

    // kubectl attach -i: the container's stdin (CRI Attach), and with
    // stdinOnce its end once the session ends; its output from its log.
    apply(
        &cloud,
        &pod(
            "echo",
            "",
            "    stdin: true\n    stdinOnce: true\n    command: [\"sh\", \"-c\", \"while read l; do echo got $l; done; echo stdin-closed; exec sleep 3600\"]\n",
        ),
    );
    wait_for("echo Running", Duration::from_secs(120), || {
        get(&cloud, "echo")["status"]["phase"] == "Running"
    });
    // The session lasts as long as the container (here, until `timeout`
    // ends kubectl).
    let o = within(10, &["attach", "-i", "echo"], Some(b"one\ntwo\n"));
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        shown.contains("got one\ngot two\n"),
        "kubectl attach -i: {o:?}"
    );
    wait_for("the end of echo's stdin", Duration::from_secs(30), || {
        let o = cloud.k(&["logs", "echo"]);
        String::from_utf8_lossy(&o.stdout).contains("got two\nstdin-closed\n")
    });
    let o = cloud.k(&["delete", "pod", "echo", "--wait=false"]);
    assert!(o.status.success(), "{o:?}");

    // exec -t: a terminal of the container's, sized as kubectl's (which
    // needs a terminal itself: `script` gives it one).
    let o = cloud.k_on_terminal("exec -it hello -- sh -c 'sleep 1; tty; stty size'");
    let shown = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{o:?}\ncloudcore's log:\n{}\nedgecore's log:\n{}",
        cloud.log_tail(60),
        tail(&edge.dir.join("edgecore.log"), 60)
    );
    assert!(shown.contains("/dev/pts/"), "{shown}");
    assert!(shown.contains("45 123"), "{shown}");

    // Pod networking through CNI: a pod gets an address of its own on the
    // test containerd's bridge, which its downward-API environment sees; its
    // HTTP readiness probe reaches it there; its hostPort is mapped on the
    // node. A hostNetwork pod keeps the node's address.
    let host_port = free_port();
    apply(
        &cloud,
        &pod(
            "web",
            "",
            &format!(
                "    command: [\"sh\", \"-c\", \"echo pod-ip=$POD_IP; mkdir -p /tmp/www; echo served-from-the-pod > /tmp/www/index.html; exec httpd -f -p 8080 -h /tmp/www\"]\n    env:\n    - name: POD_IP\n      valueFrom:\n        fieldRef:\n          fieldPath: status.podIP\n    ports:\n    - containerPort: 8080\n      hostPort: {host_port}\n    readinessProbe:\n      httpGet:\n        port: 8080\n      periodSeconds: 1\n"
            ),
        ),
    );
    wait_for("web Ready", Duration::from_secs(120), || {
        get(&cloud, "web")["status"]["conditions"]
            .as_array()
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
    });
    let web = get(&cloud, "web");
    let pod_ip = web["status"]["podIP"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let prefix = containerd.subnet.trim_end_matches(".0/24").to_owned() + ".";
    assert!(
        pod_ip.starts_with(&prefix),
        "podIP {pod_ip:?} not on {}: {web}",
        containerd.subnet
    );
    assert_eq!(web["status"]["podIPs"][0]["ip"], pod_ip.as_str(), "{web}");
    assert_ne!(web["status"]["hostIP"], pod_ip.as_str(), "{web}");
    wait_for("web's logs", Duration::from_secs(30), || {
        let o = cloud.k(&["logs", "web"]);
        String::from_utf8_lossy(&o.stdout).contains(&format!("pod-ip={pod_ip}\n"))
    });
    let fetch = |addr: &str| -> String {
        use std::io::{Read as _, Write as _};
        let Ok(mut s) = std::net::TcpStream::connect(addr) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    };
    assert!(
        fetch(&format!("{pod_ip}:8080")).contains("served-from-the-pod"),
        "the pod's own address"
    );
    wait_for("the host port", Duration::from_secs(30), || {
        fetch(&format!("127.0.0.1:{host_port}")).contains("served-from-the-pod")
    });
    // kubectl port-forward through cloudcore reaches the pod at its own
    // address.
    let mut forward = Command::new(support::kubectl_bin())
        .arg("--kubeconfig")
        .arg(cloud.kubeconfig())
        .arg("--cache-dir")
        .arg(cloud.dir.with_extension("kube-cache"))
        .args(["port-forward", "pod/web", ":8080"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let first = {
        use std::io::BufRead as _;
        let mut lines = std::io::BufReader::new(forward.stdout.take().unwrap()).lines();
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        // kubectl goes on writing ("Handling connection for …").
        std::thread::spawn(move || lines.for_each(drop));
        first
    };
    // "Forwarding from 127.0.0.1:LOCAL -> 8080"
    let local = first
        .strip_prefix("Forwarding from 127.0.0.1:")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("kubectl port-forward said {first:?}"))
        .to_owned();
    // The first connections may come before kubectl's tunnel is up.
    let mut through = String::new();
    wait_for(
        "an answer through port-forward",
        Duration::from_secs(30),
        || {
            through = fetch(&format!("127.0.0.1:{local}"));
            through.contains("served-from-the-pod")
        },
    );
    let _ = forward.kill();
    let _ = forward.wait();
    apply(
        &cloud,
        &pod(
            "on-the-node",
            "  hostNetwork: true\n",
            "    command: [\"sleep\", \"3600\"]\n",
        ),
    );
    wait_for("on-the-node Running", Duration::from_secs(120), || {
        get(&cloud, "on-the-node")["status"]["phase"] == "Running"
    });
    let p = get(&cloud, "on-the-node");
    assert_eq!(p["status"]["podIP"], p["status"]["hostIP"], "{p}");
    for name in ["web", "on-the-node"] {
        let o = cloud.k(&["delete", "pod", name, "--wait=false"]);
        assert!(o.status.success(), "{o:?}");
    }

    // The runtime writes container logs; edgecore rotates them (moves the
    // file aside, has containerd reopen it): kubectl logs still ends with
    // the last line, and no more files are kept than configured.
    apply(
        &cloud,
        &pod(
            "chatty",
            "",
            "    command: [\"sh\", \"-c\", \"for b in 1 2 3 4 5 6 7 8; do i=0; while [ $i -lt 400 ]; do echo burst $b line $i, padded so that the file fills quickly; i=$((i+1)); done; sleep 1; done; echo the-last-line; exec sleep 3600\"]\n",
        ),
    );
    wait_for("chatty's last line", Duration::from_secs(120), || {
        let o = cloud.k(&["logs", "chatty", "--tail=1"]);
        String::from_utf8_lossy(&o.stdout) == "the-last-line\n"
    });
    let logs = tmp.path().join("box/pods/logs");
    let dir = std::fs::read_dir(&logs)
        .unwrap()
        .flatten()
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("default_chatty_")
        })
        .unwrap()
        .path()
        .join("main");
    let files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|f| f.ends_with(".log.1")),
        "no rotation: {files:?}"
    );
    assert!(files.len() <= 3, "more than 3 files kept: {files:?}");

    // An exec liveness probe that fails restarts the container.
    apply(
        &cloud,
        &pod(
            "unhealthy",
            "",
            "    command: [\"sh\", \"-c\", \"exec sleep 3600\"]\n    livenessProbe:\n      exec:\n        command: [\"cat\", \"/tmp/healthy\"]\n      periodSeconds: 1\n      failureThreshold: 1\n",
        ),
    );
    wait_for("a liveness restart", Duration::from_secs(120), || {
        get(&cloud, "unhealthy")["status"]["containerStatuses"][0]["restartCount"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    });

    // A memory limit is enforced.
    apply(
        &cloud,
        &pod(
            "hungry",
            "",
            "    command: [\"sh\", \"-c\", \"x=$(head -c 200000000 /dev/zero | tr '\\\\0' a); sleep 3600\"]\n    resources:\n      limits:\n        memory: 32Mi\n",
        ),
    );
    wait_for("OOMKilled", Duration::from_secs(120), || {
        let s = &get(&cloud, "hungry")["status"]["containerStatuses"][0];
        s["lastState"]["terminated"]["reason"] == "OOMKilled"
            || s["state"]["terminated"]["reason"] == "OOMKilled"
    });
    eprintln!(
        "hungry: {}",
        get(&cloud, "hungry")["status"]["containerStatuses"][0]
    );

    // readOnlyRootFilesystem holds (an emptyDir stays writable).
    apply(
        &cloud,
        &pod(
            "readonly",
            "  volumes:\n  - name: scratch\n    emptyDir: {}\n",
            "    command: [\"sh\", \"-c\", \"touch /x 2>/dev/null && echo root-writable || echo root-readonly; touch /scratch/y && echo scratch-writable; exec sleep 3600\"]\n    securityContext:\n      readOnlyRootFilesystem: true\n    volumeMounts:\n    - name: scratch\n      mountPath: /scratch\n",
        ),
    );
    wait_for("readonly's logs", Duration::from_secs(120), || {
        let o = cloud.k(&["logs", "readonly"]);
        let out = String::from_utf8_lossy(&o.stdout);
        out.contains("root-readonly") && out.contains("scratch-writable")
    });

    // Images the node does not have: Never is an error on the pod; a pull
    // no registry answers is ErrImagePull, then ImagePullBackOff.
    let missing = |name: &str, policy: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\nspec:\n  nodeName: box\n  containers:\n  - name: main\n    image: registry.invalid/keel/none:1\n    imagePullPolicy: {policy}\n"
        )
    };
    apply(&cloud, &missing("never", "Never"));
    // A malformed reference is an error on the pod (edgecore goes on).
    apply(
        &cloud,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: malformed\nspec:\n  nodeName: box\n  containers:\n  - name: main\n    image: \"Not//A::Valid@@ref\"\n",
    );
    wait_for("InvalidImageName", Duration::from_secs(60), || {
        get(&cloud, "malformed")["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            == "InvalidImageName"
    });
    apply(&cloud, &missing("unpullable", "IfNotPresent"));
    wait_for("ErrImageNeverPull", Duration::from_secs(60), || {
        get(&cloud, "never")["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
            == "ErrImageNeverPull"
    });
    wait_for("an image pull error", Duration::from_secs(120), || {
        let r = get(&cloud, "unpullable")["status"]["containerStatuses"][0]["state"]["waiting"]
            ["reason"]
            .clone();
        r == "ErrImagePull" || r == "ImagePullBackOff"
    });

    // The process runtime beside: a host process.
    apply(
        &cloud,
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: host\nspec:\n  nodeName: box\n  runtimeClassName: keel-process\n  containers:\n  - name: main\n    image: busybox\n    command: [\"sleep\", \"3600\"]\n",
    );
    wait_for("host Running", Duration::from_secs(60), || {
        get(&cloud, "host")["status"]["phase"] == "Running"
    });
    let host_id = get(&cloud, "host")["status"]["containerStatuses"][0]["containerID"].clone();
    assert!(
        host_id
            .as_str()
            .is_some_and(|i| i.starts_with("process://")),
        "{host_id}"
    );

    // Deleting pods removes their containers and sandboxes: only hello's
    // container and sandbox stay.
    for name in [
        "chatty",
        "malformed",
        "unhealthy",
        "hungry",
        "readonly",
        "never",
        "unpullable",
        "host",
    ] {
        let o = cloud.k(&["delete", "pod", name, "--wait=false"]);
        assert!(o.status.success());
    }
    wait_for("only hello left", Duration::from_secs(120), || {
        let o = cloud.k(&["get", "pods", "-o", "name"]);
        let left = String::from_utf8_lossy(&o.stdout).trim().to_owned();
        if left != "pod/hello" {
            eprintln!("pods left: {left:?}");
        }
        left == "pod/hello"
    });
    wait_for(
        "only hello's container and sandbox",
        Duration::from_secs(60),
        || {
            let o = containerd.ctr(&["containers", "ls", "-q"]);
            String::from_utf8_lossy(&o.stdout).lines().count() == 2
        },
    );

    // Offline autonomy: with the cloud down, edgecore SIGKILLed and
    // started again adopts the container (same ID, no restart).
    let mut cloud = cloud;
    cloud.proc.kill9();
    let mut edge = edge;
    edge.proc.kill9();
    let running = |c: &Containerd, id: &str| {
        let o = c.ctr(&["tasks", "ls"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
    };
    let bare = id.trim_start_matches("containerd://").to_owned();
    assert!(
        running(&containerd, &bare),
        "the container died with edgecore"
    );
    let edge = start_edge(&cloud, None);
    let on_edge = |e: &Edge| e.pod("hello").unwrap_or(Value::Null);
    wait_for(
        "hello Running again on the edge",
        Duration::from_secs(60),
        || on_edge(&edge)["status"]["containerStatuses"][0]["state"]["running"].is_object(),
    );
    let s = on_edge(&edge)["status"]["containerStatuses"][0].clone();
    let log = std::fs::read_to_string(tmp.path().join("box/edgecore.log")).unwrap_or_default();
    let log: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("hello") || l.contains("adopt") || l.contains("leftover"))
        .collect();
    assert_eq!(
        s["containerID"],
        id.as_str(),
        "not adopted: {s}\n{}",
        log.join("\n")
    );
    assert_eq!(s["restartCount"], 0, "{s}");
    assert!(running(&containerd, &bare));

    // Stopping edgecore (SIGTERM) leaves it running too, and the next one
    // adopts it again.
    let mut edge = edge;
    edge.proc.stop();
    assert!(
        running(&containerd, &bare),
        "stopping edgecore stopped the container"
    );
    let edge = start_edge(&cloud, None);
    wait_for(
        "hello adopted after a clean stop",
        Duration::from_secs(60),
        || {
            let s = &on_edge(&edge)["status"]["containerStatuses"][0];
            s["state"]["running"].is_object() && s["containerID"] == id.as_str()
        },
    );

    // containerd SIGKILLed and started again: the container (kept by its
    // shim) goes on, still followed.
    let mut containerd = containerd;
    containerd.restart();
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        running(&containerd, &bare),
        "the container died with containerd"
    );
    let s = on_edge(&edge)["status"]["containerStatuses"][0].clone();
    assert_eq!(s["containerID"], id.as_str(), "{s}");
    // What a reboot does to it: the container is killed; edgecore starts
    // it again from its local log, the cloud still down.
    let o = containerd.ctr(&["tasks", "kill", "-s", "SIGKILL", &bare]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    wait_for("hello restarted offline", Duration::from_secs(60), || {
        let s = &on_edge(&edge)["status"]["containerStatuses"][0];
        s["restartCount"] == 1 && s["state"]["running"].is_object()
    });
    let again = on_edge(&edge)["status"]["containerStatuses"][0]["containerID"].clone();
    assert_ne!(again, id.as_str());
    assert!(
        again
            .as_str()
            .is_some_and(|i| i.starts_with("containerd://")),
        "{again}"
    );

    // A reboot of the node, the cloud still down: every container and
    // sandbox gone with their network, containerd started again, then
    // edgecore. The pod comes back from the local log: a new container
    // in a new sandbox, with an address on the pod network.
    let mut edge = edge;
    edge.proc.kill9();
    containerd.reboot();
    let edge = start_edge(&cloud, None);
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    loop {
        let s = &on_edge(&edge)["status"]["containerStatuses"][0];
        if s["state"]["running"].is_object() && s["containerID"] != again {
            break;
        }
        if std::time::Instant::now() > deadline {
            let log =
                std::fs::read_to_string(tmp.path().join("box/edgecore.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!("hello not back after the reboot: {s}\n{}", tail.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = on_edge(&edge);
    let rebooted = after["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("containerd://")
        .to_owned();
    assert!(running(&containerd, &rebooted), "{after}");
    let pod_ip = after["status"]["podIP"].as_str().unwrap_or_default();
    assert!(pod_ip.starts_with(&prefix), "{after}");
    drop(edge);
    drop(cloud);
    drop(containerd);
}
