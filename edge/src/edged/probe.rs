//! Startup, liveness and readiness probes: `exec`, `httpGet` (plain HTTP)
//! and `tcpSocket`. One task per running container runs them and reports
//! transitions to the pod worker.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep, sleep_until, timeout};
use tracing::debug;

use super::runtime::ContainerHandle;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeAction {
    Exec(Vec<String>),
    Http {
        host: String,
        port: u16,
        path: String,
        headers: Vec<(String, String)>,
    },
    Tcp {
        host: String,
        port: u16,
    },
    /// A probe that can never succeed (e.g. an unknown named port).
    Invalid(String),
    /// A handler this runtime does not implement (gRPC, HTTPS): always
    /// succeeds, so that it never kills a container.
    Unsupported(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeSpec {
    pub action: ProbeAction,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub failure_threshold: u32,
    pub success_threshold: u32,
}

fn secs(probe: &Value, key: &str, default: u64, min: u64) -> u64 {
    probe
        .get(key)
        .and_then(Value::as_u64)
        .unwrap_or(default)
        .max(min)
}

fn threshold(probe: &Value, key: &str, default: u64) -> u32 {
    u32::try_from(secs(probe, key, default, 1)).unwrap_or(u32::MAX)
}

impl ProbeSpec {
    /// The probe with `pod_ip` for a host given as `plan::POD_IP` (the
    /// default host of HTTP and TCP probes).
    pub fn at_pod_ip(mut self, pod_ip: &str) -> ProbeSpec {
        if let ProbeAction::Http { host, .. } | ProbeAction::Tcp { host, .. } = &mut self.action
            && host.contains(super::plan::POD_IP)
        {
            *host = host.replace(super::plan::POD_IP, pod_ip);
        }
        self
    }

    /// Parses a Kubernetes probe; `ports` are the container's (name, port)
    /// pairs for named ports; `host_ip` is the default host (the pod's IP,
    /// or `plan::POD_IP` for it).
    pub fn parse(probe: &Value, ports: &[(String, u16)], host_ip: &str) -> ProbeSpec {
        let port_of = |handler: &Value| -> Result<u16, String> {
            match handler.get("port") {
                Some(Value::Number(n)) => n
                    .as_u64()
                    .and_then(|p| u16::try_from(p).ok())
                    .ok_or_else(|| format!("invalid port {n}")),
                Some(Value::String(name)) => ports
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, p)| *p)
                    .or_else(|| name.parse().ok())
                    .ok_or_else(|| format!("port {name:?} not found in the container's ports")),
                _ => Err("probe has no port".into()),
            }
        };
        let host_of = |handler: &Value| {
            handler
                .get("host")
                .and_then(Value::as_str)
                .filter(|h| !h.is_empty())
                .unwrap_or(host_ip)
                .to_owned()
        };
        let action = if let Some(exec) = probe.get("exec") {
            let command: Vec<String> = exec
                .get("command")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if command.is_empty() {
                ProbeAction::Invalid("exec probe without command".into())
            } else {
                ProbeAction::Exec(command)
            }
        } else if let Some(http) = probe.get("httpGet") {
            let scheme = http.get("scheme").and_then(Value::as_str).unwrap_or("HTTP");
            match port_of(http) {
                _ if !scheme.eq_ignore_ascii_case("HTTP") => {
                    ProbeAction::Unsupported(format!("httpGet scheme {scheme}"))
                }
                Ok(port) => ProbeAction::Http {
                    host: host_of(http),
                    port,
                    path: http
                        .get("path")
                        .and_then(Value::as_str)
                        .filter(|p| !p.is_empty())
                        .map(|p| {
                            if p.starts_with('/') {
                                p.to_owned()
                            } else {
                                format!("/{p}")
                            }
                        })
                        .unwrap_or_else(|| "/".into()),
                    headers: http
                        .get("httpHeaders")
                        .and_then(Value::as_array)
                        .map(|hs| {
                            hs.iter()
                                .filter_map(|h| {
                                    let name = h.get("name")?.as_str()?;
                                    let value = h.get("value")?.as_str()?;
                                    // No header injection into the request.
                                    let clean = |s: &str| !s.contains(['\r', '\n']);
                                    (clean(name) && clean(value))
                                        .then(|| (name.to_owned(), value.to_owned()))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                },
                Err(e) => ProbeAction::Invalid(e),
            }
        } else if let Some(tcp) = probe.get("tcpSocket") {
            match port_of(tcp) {
                Ok(port) => ProbeAction::Tcp {
                    host: host_of(tcp),
                    port,
                },
                Err(e) => ProbeAction::Invalid(e),
            }
        } else if probe.get("grpc").is_some() {
            ProbeAction::Unsupported("grpc probe".into())
        } else {
            ProbeAction::Invalid("probe has no handler".into())
        };
        ProbeSpec {
            action,
            initial_delay: Duration::from_secs(secs(probe, "initialDelaySeconds", 0, 0)),
            period: Duration::from_secs(secs(probe, "periodSeconds", 10, 1)),
            timeout: Duration::from_secs(secs(probe, "timeoutSeconds", 1, 1)),
            failure_threshold: threshold(probe, "failureThreshold", 3),
            success_threshold: threshold(probe, "successThreshold", 1),
        }
    }

    /// Runs the probe once: `Err` holds the failure message.
    pub async fn run_once(&self, container: &dyn ContainerHandle) -> Result<(), String> {
        match &self.action {
            ProbeAction::Exec(command) => match container.exec(command.clone(), self.timeout).await
            {
                Ok(status) if status.success() => Ok(()),
                Ok(status) => Err(format!(
                    "command {command:?} exited with {}",
                    status.exit_code()
                )),
                Err(e) => Err(e.to_string()),
            },
            ProbeAction::Http {
                host,
                port,
                path,
                headers,
            } => match timeout(self.timeout, http_get(host, *port, path, headers)).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "Get \"http://{}{path}\": timeout after {:?}",
                    host_port(host, *port),
                    self.timeout
                )),
            },
            ProbeAction::Tcp { host, port } => {
                match timeout(self.timeout, TcpStream::connect((host.as_str(), *port))).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(format!("dial tcp {}: {e}", host_port(host, *port))),
                    Err(_) => Err(format!("dial tcp {}: i/o timeout", host_port(host, *port))),
                }
            }
            ProbeAction::Invalid(message) => Err(message.clone()),
            ProbeAction::Unsupported(_) => Ok(()),
        }
    }
}

fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// A minimal HTTP/1.1 GET: success is a 2xx or 3xx status line.
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
) -> Result<(), String> {
    let authority = host_port(host, port);
    let url = format!("http://{authority}{path}");
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut request = format!("GET {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
        request.push_str(&format!("Host: {authority}\r\n"));
    }
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("user-agent"))
    {
        request.push_str("User-Agent: kube-probe/keel\r\n");
    }
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("Accept: */*\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 4096 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("Get \"{url}\": {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
    }
    let line = String::from_utf8_lossy(&head);
    let code = line
        .lines()
        .next()
        .filter(|l| l.starts_with("HTTP/"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("Get \"{url}\": malformed HTTP response"))?;
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("HTTP probe failed with statuscode: {code}"))
    }
}

/// What the probe task tells the pod worker (only transitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProbeEvent {
    /// The startup probe succeeded.
    Started,
    /// Readiness changed.
    Ready(bool),
    /// Liveness or startup probe failed `failureThreshold` times: kill.
    Unhealthy(String),
}

/// Runs a container's probes until the task is aborted: the startup probe
/// first (if any), then liveness and readiness side by side.
pub(crate) async fn run_probes<E: Send>(
    container: Arc<dyn ContainerHandle>,
    started_at: Instant,
    startup: Option<ProbeSpec>,
    liveness: Option<ProbeSpec>,
    readiness: Option<ProbeSpec>,
    events: tokio::sync::mpsc::Sender<E>,
    wrap: impl Fn(ProbeEvent) -> E + Send + Sync,
) {
    // A full queue makes the prober wait (it probes nothing meanwhile).
    let send = async |event: ProbeEvent| {
        let _ = events.send(wrap(event)).await;
    };
    if let Some(probe) = startup {
        sleep_until(started_at + probe.initial_delay).await;
        let mut failures = 0;
        loop {
            match probe.run_once(container.as_ref()).await {
                Ok(()) => {
                    send(ProbeEvent::Started).await;
                    break;
                }
                Err(message) => {
                    failures += 1;
                    debug!(%message, failures, "startup probe failed");
                    if failures >= probe.failure_threshold {
                        send(ProbeEvent::Unhealthy(format!(
                            "Startup probe failed: {message}"
                        )))
                        .await;
                        return;
                    }
                }
            }
            sleep(probe.period).await;
        }
    }
    let live = async {
        let Some(probe) = liveness else {
            return;
        };
        sleep_until(started_at + probe.initial_delay).await;
        let mut failures = 0;
        loop {
            match probe.run_once(container.as_ref()).await {
                Ok(()) => failures = 0,
                Err(message) => {
                    failures += 1;
                    debug!(%message, failures, "liveness probe failed");
                    if failures >= probe.failure_threshold {
                        send(ProbeEvent::Unhealthy(format!(
                            "Liveness probe failed: {message}"
                        )))
                        .await;
                        return;
                    }
                }
            }
            sleep(probe.period).await;
        }
    };
    let ready = async {
        let Some(probe) = readiness else {
            return;
        };
        sleep_until(started_at + probe.initial_delay).await;
        let (mut ready, mut successes, mut failures) = (false, 0, 0);
        loop {
            match probe.run_once(container.as_ref()).await {
                Ok(()) => {
                    failures = 0;
                    successes += 1;
                    if !ready && successes >= probe.success_threshold {
                        ready = true;
                        send(ProbeEvent::Ready(true)).await;
                    }
                }
                Err(message) => {
                    successes = 0;
                    failures += 1;
                    debug!(%message, failures, "readiness probe failed");
                    if ready && failures >= probe.failure_threshold {
                        ready = false;
                        send(ProbeEvent::Ready(false)).await;
                    }
                }
            }
            sleep(probe.period).await;
        }
    };
    tokio::join!(live, ready);
}
