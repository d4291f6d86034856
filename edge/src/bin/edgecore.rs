//! `edgecore`: keel's edge agent. Thin: flags and config in, [`keel_edge::core`] does the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_edge::core::{self, Config};

/// edgecore runs on mimalloc: glibc's allocator hands the memory a
/// catch-up frees back to the kernel and faults it in again for the next
/// (see ARCHITECTURE.md, "Memory").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "edgecore",
    version,
    about = "keel edgecore: runs an edge node's pods, online or not"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug)]
struct Common {
    /// YAML config file (camelCase keys: dataDir, cloudHub, cloudBootstrap,
    /// serverName, apiAddr, nodeIp, restartBackoffSeconds); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// cloudcore's CloudHub (QUIC), e.g. 127.0.0.1:10000.
    #[arg(long)]
    cloud_hub: Option<SocketAddr>,
    /// More cloudcore replicas' CloudHubs (comma-separated), tried in turn
    /// after `--cloud-hub`; a replica that does not own this node sends it
    /// to the one that does.
    #[arg(long, value_delimiter = ',')]
    cloud_hubs: Vec<SocketAddr>,
    /// cloudcore's join endpoint (HTTPS), e.g. 127.0.0.1:10002.
    #[arg(long)]
    cloud_bootstrap: Option<SocketAddr>,
}

// Parsed once at start: the size of the `run` variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Import an OCI (or Docker) image archive into the node's containerd,
    /// for pods whose images no registry serves the node.
    ImportImage {
        #[command(flatten)]
        common: Common,
        /// containerd's socket (default: criSocket of the config).
        #[arg(long)]
        cri_socket: Option<PathBuf>,
        /// The image archive (a tar of an OCI image layout, or `docker save`).
        archive: PathBuf,
    },
    /// Join the cluster with a token from `cloudcore token NODE`, then exit.
    Join {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        token: String,
    },
    /// Run edgecore until SIGINT/SIGTERM (joins first if --token is given
    /// and the data directory holds no identity yet).
    Run {
        #[command(flatten)]
        common: Common,
        #[arg(long)]
        token: Option<String>,
        /// The read-only Kubernetes API (plain HTTP on loopback; HTTPS with
        /// client certificates with --client-ca-file, required elsewhere).
        #[arg(long)]
        api_addr: Option<SocketAddr>,
        #[arg(long)]
        node_ip: Option<String>,
        /// The event bus (MQTT broker for mappers and devices; on loopback
        /// unless --mqtt-password-file is set).
        #[arg(long)]
        mqtt_addr: Option<SocketAddr>,
        /// The log gRPC API for `keel --edge` (plain HTTP/2 on loopback;
        /// TLS with client certificates with --client-ca-file); off unless
        /// set.
        #[arg(long)]
        grpc_addr: Option<SocketAddr>,
        /// Require client certificates of this CA (PEM) on the Kubernetes
        /// and gRPC APIs; only the cluster admin's is served. The cluster
        /// CA is DATA_DIR/pki/ca.pem.
        #[arg(long)]
        client_ca_file: Option<PathBuf>,
        /// Serving certificate of those APIs (default: self-signed, made
        /// in DATA_DIR/pki/serving.pem).
        #[arg(long)]
        tls_cert_file: Option<PathBuf>,
        #[arg(long)]
        tls_private_key_file: Option<PathBuf>,
        /// MQTT clients log in with a user:password line of this file.
        #[arg(long)]
        mqtt_password_file: Option<PathBuf>,
        /// How long the edge API keeps watch history (default 5m).
        #[arg(long, value_parser = keel_api::meta::parse_age)]
        watch_window: Option<std::time::Duration>,
        /// First container restart back-off, seconds.
        #[arg(long)]
        restart_backoff_seconds: Option<f64>,
        /// Seconds without a packet from cloudcore before its connection
        /// counts as lost and the next replica is tried (default 90).
        #[arg(long)]
        hub_idle_timeout_seconds: Option<u64>,
        /// Rotate a container's log file past this many bytes (default
        /// 10 MiB).
        #[arg(long)]
        container_log_max_size: Option<u64>,
        /// Log files kept per container run (default 5).
        #[arg(long)]
        container_log_max_files: Option<u32>,
        /// Run pods as containers of the CRI runtime (containerd) at this
        /// socket; `runtimeClassName: keel-process` still runs a pod as
        /// host processes.
        #[arg(long)]
        cri_socket: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match real_main(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edgecore: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config(c: &Common) -> Result<Config, String> {
    let mut cfg = match &c.config {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))?;
            serde_yaml::from_str::<Config>(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => Config::default(),
    };
    if let Some(v) = &c.data_dir {
        cfg.data_dir = v.clone();
    }
    if let Some(v) = c.cloud_hub {
        cfg.cloud_hub = v;
    }
    if !c.cloud_hubs.is_empty() {
        cfg.cloud_hubs = c.cloud_hubs.clone();
    }
    if let Some(v) = c.cloud_bootstrap {
        cfg.cloud_bootstrap = v;
    }
    Ok(cfg)
}

fn real_main(cli: Cli) -> Result<(), String> {
    let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
    match cli.command {
        Command::ImportImage {
            common,
            cri_socket,
            archive,
        } => {
            let cfg = config(&common)?;
            let socket = cri_socket
                .or(cfg.cri_socket)
                .ok_or("no containerd socket: give --cri-socket or criSocket in the config")?;
            let out =
                keel_edge::edged::import_image(&socket, &archive).map_err(|e| e.to_string())?;
            print!("{out}");
            Ok(())
        }
        Command::Join { common, token } => {
            let cfg = config(&common)?;
            let id = rt
                .block_on(core::ensure_identity(&cfg, Some(&token)))
                .map_err(|e| e.to_string())?;
            println!("joined as node {}", id.node);
            Ok(())
        }
        Command::Run {
            common,
            token,
            api_addr,
            node_ip,
            mqtt_addr,
            grpc_addr,
            restart_backoff_seconds,
            hub_idle_timeout_seconds,
            container_log_max_size,
            container_log_max_files,
            cri_socket,
            client_ca_file,
            tls_cert_file,
            tls_private_key_file,
            mqtt_password_file,
            watch_window,
        } => {
            let mut cfg = config(&common)?;
            if let Some(v) = api_addr {
                cfg.api_addr = v;
            }
            if node_ip.is_some() {
                cfg.node_ip = node_ip;
            }
            if let Some(v) = mqtt_addr {
                cfg.mqtt_addr = v;
            }
            if grpc_addr.is_some() {
                cfg.grpc_addr = grpc_addr;
            }
            if let Some(v) = restart_backoff_seconds {
                cfg.restart_backoff_seconds = v;
            }
            if let Some(v) = hub_idle_timeout_seconds {
                cfg.hub_idle_timeout_seconds = v;
            }
            if let Some(v) = container_log_max_size {
                cfg.container_log_max_size = v;
            }
            if let Some(v) = container_log_max_files {
                cfg.container_log_max_files = v;
            }
            if cri_socket.is_some() {
                cfg.cri_socket = cri_socket;
            }
            for (flag, field) in [
                (client_ca_file, &mut cfg.client_ca_file),
                (tls_cert_file, &mut cfg.tls_cert_file),
                (tls_private_key_file, &mut cfg.tls_private_key_file),
                (mqtt_password_file, &mut cfg.mqtt_password_file),
            ] {
                if flag.is_some() {
                    *field = flag;
                }
            }
            if let Some(v) = watch_window {
                cfg.watch_window = v;
            }
            rt.block_on(core::run(
                cfg,
                token,
                |r| {
                    tracing::info!(node = %r.node, api = %r.api_addr, mqtt = %r.mqtt_addr, grpc = ?r.grpc_addr, "edgecore running");
                },
                keel_api::shutdown_signal(),
            ))
            .map_err(|e| e.to_string())
        }
    }
}
