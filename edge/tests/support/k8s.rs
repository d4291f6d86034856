//! A real Kubernetes control plane on loopback for the attached-mode
//! tests: etcd, kube-apiserver, kube-controller-manager and kube-scheduler,
//! each its own OS process with its log in a temporary directory, behind a
//! CA and client certificates generated here. No node, no cloud provider,
//! no listener other than etcd's and the apiserver's.
//!
//! The binaries come from `KEEL_K8S_BIN` (a directory) or from
//! `./dev k8s-peers`, which builds them once and prints their directory.
//! Every process is SIGKILLed when the [`ControlPlane`] is dropped; when it
//! is dropped during a panic, or `KEEL_E2E_KEEP` is set, its directory
//! (logs included) is kept.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use super::cluster::{Proc, free_port, kubectl, ok, wait_for};

/// The user of the API server's kubelet client certificate.
pub const KUBELET_CLIENT: &str = "kube-apiserver-kubelet-client";

/// Where the Kubernetes binaries are.
#[derive(Debug, Clone)]
pub struct K8sBins {
    pub dir: PathBuf,
}

impl K8sBins {
    /// `KEEL_K8S_BIN` if set, else the last line `<workspace>/dev k8s-peers`
    /// prints (it builds the binaries the first time; its progress goes to
    /// stderr). Resolved once per test binary.
    pub fn locate() -> K8sBins {
        static DIR: OnceLock<PathBuf> = OnceLock::new();
        let dir = DIR
            .get_or_init(|| {
                if let Some(dir) = std::env::var_os("KEEL_K8S_BIN") {
                    return PathBuf::from(dir);
                }
                let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .parent()
                    .unwrap()
                    .to_owned();
                let out = Command::new(workspace.join("dev"))
                    .arg("k8s-peers")
                    .current_dir(&workspace)
                    .stdin(Stdio::null())
                    .stderr(Stdio::inherit())
                    .output()
                    .unwrap_or_else(|e| {
                        panic!(
                            "cannot run {}/dev k8s-peers ({e}); set KEEL_K8S_BIN to a directory \
                             holding etcd, kube-apiserver, kube-controller-manager and kube-scheduler",
                            workspace.display()
                        )
                    });
                let stdout = String::from_utf8_lossy(&out.stdout);
                let last = stdout.lines().map(str::trim).rfind(|l| !l.is_empty());
                match last {
                    Some(dir) if out.status.success() => PathBuf::from(dir),
                    _ => panic!(
                        "`./dev k8s-peers` failed ({}): it builds the Kubernetes test peers \
                         (Go is needed); or set KEEL_K8S_BIN to a directory holding etcd, \
                         kube-apiserver, kube-controller-manager and kube-scheduler.\nstdout: {stdout}",
                        out.status
                    ),
                }
            })
            .clone();
        let bins = K8sBins { dir };
        for name in [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
        ] {
            assert!(
                bins.bin(name).is_file(),
                "{} is missing (from KEEL_K8S_BIN or `./dev k8s-peers`)",
                bins.bin(name).display()
            );
        }
        bins
    }

    pub fn bin(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// How the control plane is started.
#[derive(Debug, Clone)]
pub struct K8sOptions {
    /// kube-apiserver's `--default-unreachable-toleration-seconds` and
    /// `--default-not-ready-toleration-seconds`: how long a pod stays bound
    /// to a node that went NotReady/Unreachable before it is evicted.
    pub unreachable_toleration_secs: u32,
    /// kube-controller-manager's `--node-monitor-grace-period`: how long a
    /// node may go without a heartbeat before it is marked unreachable.
    pub node_monitor_grace_secs: u32,
    /// Extra arguments, appended to each component's command line.
    pub etcd_args: Vec<String>,
    pub apiserver_args: Vec<String>,
    pub controller_manager_args: Vec<String>,
    pub scheduler_args: Vec<String>,
    /// How long each component may take to become ready.
    pub ready_timeout: Duration,
}

impl Default for K8sOptions {
    fn default() -> Self {
        K8sOptions {
            unreachable_toleration_secs: 5,
            node_monitor_grace_secs: 10,
            etcd_args: Vec::new(),
            apiserver_args: Vec::new(),
            controller_manager_args: Vec::new(),
            scheduler_args: Vec::new(),
            ready_timeout: Duration::from_secs(120),
        }
    }
}

struct Component {
    name: &'static str,
    log: PathBuf,
    proc: Proc,
}

/// A running control plane; see the module documentation.
pub struct ControlPlane {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    bins: K8sBins,
    server: String,
    etcd: String,
    ca_pem: String,
    ca: Issuer<'static, KeyPair>,
    admin_kubeconfig: PathBuf,
    components: Vec<Component>,
}

impl ControlPlane {
    /// Generates the PKI, starts etcd, kube-apiserver (waits for `/readyz`),
    /// kube-controller-manager (waits for the `default` ServiceAccount, so
    /// pods can be created at once) and kube-scheduler. Panics with every
    /// component's log tail if one fails to start.
    pub fn start(opts: K8sOptions) -> ControlPlane {
        let bins = K8sBins::locate();
        let dir = tempfile::Builder::new()
            .prefix("keel-k8s-")
            .tempdir()
            .unwrap();
        let path = dir.path().to_owned();
        eprintln!(
            "Kubernetes control plane state and logs in {}",
            path.display()
        );
        let p = |name: &str| path.join(name);

        // PKI.
        let ca_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name = dn("keel-test-ca", &[]);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut ca_params);
        let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
        std::fs::write(p("ca.crt"), &ca_pem).unwrap();
        write_private(&p("ca.key"), &ca_key.serialize_pem());
        let ca = Issuer::new(ca_params, ca_key);

        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_owned(),
            "localhost".to_owned(),
            "10.0.0.1".to_owned(),
            "kubernetes".to_owned(),
            "kubernetes.default".to_owned(),
            "kubernetes.default.svc".to_owned(),
            "kubernetes.default.svc.cluster.local".to_owned(),
        ])
        .unwrap();
        serving.distinguished_name = dn("kube-apiserver", &[]);
        serving.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let (cert, key) = sign(&ca, serving);
        std::fs::write(p("apiserver.crt"), cert).unwrap();
        write_private(&p("apiserver.key"), &key);

        let sa = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        write_private(&p("sa.key"), &sa.serialize_pem());
        std::fs::write(p("sa.pub"), sa.public_key_pem()).unwrap();

        let etcd_port = free_port();
        let etcd_peer_port = free_port();
        let api_port = free_port();
        let server = format!("https://127.0.0.1:{api_port}");
        let etcd = format!("http://127.0.0.1:{etcd_port}");

        let mut cp = ControlPlane {
            dir: Some(dir),
            path: path.clone(),
            bins,
            server,
            etcd: etcd.clone(),
            ca_pem,
            ca,
            admin_kubeconfig: PathBuf::new(),
            components: Vec::new(),
        };
        cp.admin_kubeconfig = cp.client_kubeconfig("admin", "keel-test-admin", &["system:masters"]);
        let kcm_kubeconfig =
            cp.client_kubeconfig("controller-manager", "system:kube-controller-manager", &[]);
        let scheduler_kubeconfig = cp.client_kubeconfig("scheduler", "system:kube-scheduler", &[]);
        let s = |p: &Path| p.to_str().unwrap().to_owned();

        // etcd.
        let t = Instant::now();
        let peer = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut args = vec![
            "--name".to_owned(),
            "default".to_owned(),
            "--data-dir".to_owned(),
            s(&p("etcd-data")),
            "--listen-client-urls".to_owned(),
            etcd.clone(),
            "--advertise-client-urls".to_owned(),
            etcd.clone(),
            "--listen-peer-urls".to_owned(),
            peer.clone(),
            "--initial-advertise-peer-urls".to_owned(),
            peer.clone(),
            "--initial-cluster".to_owned(),
            format!("default={peer}"),
            "--unsafe-no-fsync".to_owned(),
        ];
        args.extend(opts.etcd_args.iter().cloned());
        cp.spawn("etcd", "etcd", &args);
        let health = format!("{etcd}/health");
        cp.wait_ready("etcd", opts.ready_timeout, |_| http_ok(&health));
        eprintln!("etcd ready in {:.1?}", t.elapsed());

        // kube-apiserver; its client certificate for kubelets (here:
        // cloudcore's kubelet stream API for the edge nodes).
        let (kubelet_client, kubelet_client_key) = cp.client_cert(KUBELET_CLIENT, &[]);
        std::fs::write(p("kubelet-client.crt"), kubelet_client).unwrap();
        write_private(&p("kubelet-client.key"), &kubelet_client_key);
        let t = Instant::now();
        let tol = opts.unreachable_toleration_secs.to_string();
        let mut args = vec![
            format!("--etcd-servers={etcd}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={api_port}"),
            "--endpoint-reconciler-type=none".to_owned(),
            format!("--tls-cert-file={}", s(&p("apiserver.crt"))),
            format!("--tls-private-key-file={}", s(&p("apiserver.key"))),
            format!("--client-ca-file={}", s(&p("ca.crt"))),
            "--service-account-issuer=https://kubernetes.default.svc".to_owned(),
            format!("--service-account-key-file={}", s(&p("sa.pub"))),
            format!("--service-account-signing-key-file={}", s(&p("sa.key"))),
            "--service-cluster-ip-range=10.0.0.0/24".to_owned(),
            "--authorization-mode=Node,RBAC".to_owned(),
            format!("--default-unreachable-toleration-seconds={tol}"),
            format!("--default-not-ready-toleration-seconds={tol}"),
            format!("--cert-dir={}", s(&p("apiserver-certs"))),
            format!(
                "--kubelet-client-certificate={}",
                s(&p("kubelet-client.crt"))
            ),
            format!("--kubelet-client-key={}", s(&p("kubelet-client.key"))),
        ];
        args.extend(opts.apiserver_args.iter().cloned());
        cp.spawn("kube-apiserver", "kube-apiserver", &args);
        cp.wait_ready("kube-apiserver /readyz", opts.ready_timeout, |cp| {
            cp.kubectl(&["get", "--raw", "/readyz"]).status.success()
        });
        eprintln!("kube-apiserver ready in {:.1?}", t.elapsed());
        // As kubeadm: the API server's kubelet client may use every
        // kubelet API (`nodes/proxy`, asked by cloudcore).
        cp.kubectl_ok(&[
            "create",
            "clusterrolebinding",
            "kube-apiserver-kubelet-client",
            "--clusterrole=system:kubelet-api-admin",
            &format!("--user={KUBELET_CLIENT}"),
        ]);

        // kube-controller-manager.
        let t = Instant::now();
        let mut args = vec![
            format!("--kubeconfig={}", s(&kcm_kubeconfig)),
            format!("--service-account-private-key-file={}", s(&p("sa.key"))),
            format!("--root-ca-file={}", s(&p("ca.crt"))),
            format!("--cluster-signing-cert-file={}", s(&p("ca.crt"))),
            format!("--cluster-signing-key-file={}", s(&p("ca.key"))),
            "--leader-elect=false".to_owned(),
            "--use-service-account-credentials=true".to_owned(),
            "--secure-port=0".to_owned(),
            format!(
                "--node-monitor-grace-period={}s",
                opts.node_monitor_grace_secs
            ),
            "--node-monitor-period=1s".to_owned(),
            "--controllers=*".to_owned(),
        ];
        args.extend(opts.controller_manager_args.iter().cloned());
        cp.spawn("kube-controller-manager", "kube-controller-manager", &args);
        cp.wait_ready(
            "kube-controller-manager (the default ServiceAccount)",
            opts.ready_timeout,
            |cp| {
                cp.kubectl(&["get", "serviceaccount", "default", "-n", "default"])
                    .status
                    .success()
            },
        );
        eprintln!("kube-controller-manager ready in {:.1?}", t.elapsed());

        // kube-scheduler: it has no listener, so it is only checked to be
        // running; tests see it work through pods' PodScheduled condition.
        let mut args = vec![
            format!("--kubeconfig={}", s(&scheduler_kubeconfig)),
            "--leader-elect=false".to_owned(),
            "--secure-port=0".to_owned(),
        ];
        args.extend(opts.scheduler_args.iter().cloned());
        cp.spawn("kube-scheduler", "kube-scheduler", &args);
        cp.check_alive("kube-scheduler");
        cp
    }

    /// The temporary directory holding the PKI, kubeconfigs, etcd's data
    /// and every log.
    pub fn dir(&self) -> &Path {
        &self.path
    }

    /// The kubeconfig of `keel-test-admin` (group `system:masters`).
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.admin_kubeconfig
    }

    /// The apiserver's URL, `https://127.0.0.1:<port>`.
    pub fn server(&self) -> String {
        self.server.clone()
    }

    /// etcd's client URL, `http://127.0.0.1:<port>`.
    pub fn etcd(&self) -> String {
        self.etcd.clone()
    }

    /// The cluster CA certificate (PEM); it signed the apiserver's serving
    /// certificate and every client certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A fresh client certificate and key (PEM) signed by the cluster CA,
    /// for user `cn` in groups `orgs` (e.g. `system:node:edge-1` in
    /// `system:nodes`).
    pub fn client_cert(&self, cn: &str, orgs: &[&str]) -> (String, String) {
        let mut params = CertificateParams::default();
        params.distinguished_name = dn(cn, orgs);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        sign(&self.ca, params)
    }

    /// Writes `<name>.kubeconfig` (with `<name>.crt`/`<name>.key` beside it)
    /// for a fresh client certificate of user `cn` in groups `orgs`.
    pub fn client_kubeconfig(&self, name: &str, cn: &str, orgs: &[&str]) -> PathBuf {
        let (cert, key) = self.client_cert(cn, orgs);
        let crt = self.path.join(format!("{name}.crt"));
        let keyf = self.path.join(format!("{name}.key"));
        std::fs::write(&crt, cert).unwrap();
        write_private(&keyf, &key);
        let kubeconfig = self.path.join(format!("{name}.kubeconfig"));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: keel-test\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\ncontexts:\n- name: {name}\n  context:\n    cluster: keel-test\n    user: {name}\nusers:\n- name: {name}\n  user:\n    client-certificate: {crt}\n    client-key: {key}\ncurrent-context: {name}\n",
                server = self.server,
                ca = self.path.join("ca.crt").display(),
                crt = crt.display(),
                key = keyf.display(),
            ),
        )
        .unwrap();
        kubeconfig
    }

    /// The real kubectl as the admin.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        kubectl(
            &self.admin_kubeconfig,
            &self.path.join("kube-cache"),
            args,
            None,
        )
    }

    /// The real kubectl as the admin; panics (with its output) unless it
    /// succeeds, and returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        ok(self.kubectl(args), &format!("kubectl {}", args.join(" ")))
    }

    /// `kubectl apply -f -` of `yaml` as the admin; returns kubectl's stdout.
    pub fn apply_yaml(&self, yaml: &str) -> String {
        let o = kubectl(
            &self.admin_kubeconfig,
            &self.path.join("kube-cache"),
            &["apply", "-f", "-"],
            Some(yaml),
        );
        ok(o, &format!("kubectl apply of\n{yaml}\n"))
    }

    /// A component's log (`etcd`, `kube-apiserver`,
    /// `kube-controller-manager`, `kube-scheduler`), for failure messages.
    pub fn log(&self, name: &str) -> String {
        std::fs::read(self.path.join(format!("{name}.log")))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(no log for {name}: {e})"))
    }

    /// The last `lines` lines of every component's log.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for c in &self.components {
            let log = self.log(c.name);
            let all: Vec<&str> = log.lines().collect();
            let tail = all.get(all.len().saturating_sub(lines)..).unwrap_or(&[]);
            let _ = write!(
                out,
                "\n----- {} ({}), last {} lines -----\n{}\n",
                c.name,
                c.log.display(),
                tail.len(),
                tail.join("\n")
            );
        }
        out
    }

    /// Whether the named component is still running.
    pub fn alive(&mut self, name: &str) -> bool {
        self.components
            .iter_mut()
            .find(|c| c.name == name)
            .is_some_and(|c| c.proc.alive())
    }

    /// SIGKILLs the named component (the others keep running).
    pub fn kill(&mut self, name: &str) {
        for c in self.components.iter_mut().filter(|c| c.name == name) {
            c.proc.kill9();
        }
    }

    fn spawn(&mut self, name: &'static str, bin: &str, args: &[String]) {
        let log = self.path.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let child = Command::new(self.bins.bin(bin))
            .args(args)
            .current_dir(&self.path)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", self.bins.bin(bin).display()));
        self.components.push(Component {
            name,
            log,
            proc: Proc(Some(child)),
        });
    }

    /// Panics with every log tail if a component has exited.
    fn check_alive(&mut self, what: &str) {
        let dead: Vec<&str> = self
            .components
            .iter_mut()
            .filter_map(|c| (!c.proc.alive()).then_some(c.name))
            .collect();
        if !dead.is_empty() {
            panic!(
                "while waiting for {what}: {} exited{}",
                dead.join(", "),
                self.log_tails(40)
            );
        }
    }

    fn wait_ready(&mut self, what: &str, limit: Duration, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + limit;
        // wait_for's own limit is a backstop: this one panics first, with
        // the logs.
        wait_for(what, limit + Duration::from_secs(30), || {
            self.check_alive(what);
            if ready(self) {
                return true;
            }
            if Instant::now() > deadline {
                panic!("{what} not ready within {limit:?}{}", self.log_tails(40));
            }
            false
        });
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        // SIGKILL, etcd last.
        for c in self.components.iter_mut().rev() {
            c.proc.kill9();
        }
        if (std::thread::panicking() || std::env::var_os("KEEL_E2E_KEEP").is_some())
            && let Some(dir) = self.dir.take()
        {
            eprintln!(
                "keeping the Kubernetes control plane's directory {}",
                dir.keep().display()
            );
        }
    }
}

fn dn(cn: &str, orgs: &[&str]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    dn.push(DnType::CommonName, cn);
    dn
}

fn validity(params: &mut CertificateParams) {
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(365);
}

/// Signs `params` with the CA for a fresh P-256 key: (cert PEM, key PEM).
fn sign(ca: &Issuer<'static, KeyPair>, mut params: CertificateParams) -> (String, String) {
    validity(&mut params);
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

fn write_private(path: &Path, pem: &str) {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(pem.as_bytes()).unwrap();
}

/// A plain-HTTP GET on loopback answered with status 200.
fn http_ok(url: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut conn) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if conn
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut resp = String::new();
    let _ = conn.read_to_string(&mut resp);
    resp.starts_with("HTTP/1.0 200") || resp.starts_with("HTTP/1.1 200")
}
