//! `cloudcore`: keel's cloud side. Thin: flags and config in, [`keel_cloud::core`] does the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keel_cloud::attach::KubernetesConfig;
use keel_cloud::core::{self, Config};

/// cloudcore runs on mimalloc: glibc's allocator hands the memory a
/// catch-up frees back to the kernel and faults it in again for the next
/// (see ARCHITECTURE.md, "Memory").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "cloudcore",
    version,
    about = "keel cloudcore: control plane and CloudHub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start-up: the size of the `run` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run cloudcore until SIGINT/SIGTERM.
    Run {
        /// YAML config file (camelCase keys: dataDir, apiAddr, hubAddr,
        /// bootstrapAddr, metricsAddr, grpcAddr, serverNames); flags
        /// override it.
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long)]
        api_addr: Option<SocketAddr>,
        #[arg(long)]
        hub_addr: Option<SocketAddr>,
        #[arg(long)]
        bootstrap_addr: Option<SocketAddr>,
        #[arg(long)]
        metrics_addr: Option<SocketAddr>,
        /// The admin gRPC API (used by the `keel` CLI); default 127.0.0.1:10003.
        #[arg(long, conflicts_with = "no_grpc")]
        grpc_addr: Option<SocketAddr>,
        /// Do not serve the admin gRPC API.
        #[arg(long)]
        no_grpc: bool,
        /// Attach to the Kubernetes cluster of this kubeconfig (its current
        /// context) instead of serving an embedded control plane; more
        /// settings in the config file's `kubernetes:` section.
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
        /// Attached mode: where the edge-autonomy admission webhook listens
        /// (the API server must reach it); default 127.0.0.1:10004.
        #[arg(long)]
        webhook_addr: Option<SocketAddr>,
        /// Attached mode: where cloudcore serves the kubelet streaming API
        /// of its edge nodes (`kubectl logs/exec/attach/port-forward` from
        /// the API server); default 127.0.0.1:10350.
        #[arg(long)]
        stream_addr: Option<SocketAddr>,
        /// Attached mode: this cloudcore is one of several replicas sharing
        /// the cluster's edge nodes by Leases; its name among them (more
        /// settings in the config file's `kubernetes.replica:`).
        #[arg(long)]
        replica_id: Option<String>,
        /// Replicas: seconds a shard's Lease lasts unrenewed (default 15).
        #[arg(long)]
        shard_lease_seconds: Option<u64>,
        /// Keep every record younger than this in the log (history for
        /// `keel audit`, device readings); older ones are compacted into
        /// snapshots. Default 7d (`90s`, `10m`, `2h`, `7d`).
        #[arg(long, value_parser = keel_cloud::retention::parse_age)]
        retain: Option<Duration>,
        /// Keep at least the newest this many records of each stream
        /// (default 10000).
        #[arg(long)]
        retain_records: Option<u64>,
        /// Append event records (device readings) to this file as JSON
        /// lines before compaction drops them.
        #[arg(long)]
        event_sink: Option<PathBuf>,
        /// How often the log is compacted (default 60s).
        #[arg(long, value_parser = keel_cloud::retention::parse_age)]
        compact_interval: Option<Duration>,
        /// Rebase an object's document (replace its history by its current
        /// value) once it holds this many changes (default 1000; 0: never).
        #[arg(long)]
        rebase_after: Option<usize>,
    },
    /// Issue a single-use join token bound to one node name.
    Token {
        /// The node the token admits.
        node: String,
        #[arg(long, default_value = "cloudcore-data")]
        data_dir: PathBuf,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
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
            eprintln!("cloudcore: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Token {
            node,
            data_dir,
            ttl,
        } => {
            let t = core::create_token(&data_dir, &node, Duration::from_secs(ttl))
                .map_err(|e| e.to_string())?;
            println!("{t}");
            Ok(())
        }
        Command::Run {
            config,
            data_dir,
            api_addr,
            hub_addr,
            bootstrap_addr,
            metrics_addr,
            grpc_addr,
            no_grpc,
            kubeconfig,
            webhook_addr,
            stream_addr,
            replica_id,
            shard_lease_seconds,
            retain,
            retain_records,
            event_sink,
            compact_interval,
            rebase_after,
        } => {
            let mut cfg = match config {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .map_err(|e| format!("reading {}: {e}", p.display()))?;
                    serde_yaml::from_str::<Config>(&text)
                        .map_err(|e| format!("{}: {e}", p.display()))?
                }
                None => Config::default(),
            };
            if let Some(v) = data_dir {
                cfg.data_dir = v;
            }
            if let Some(v) = api_addr {
                cfg.api_addr = v;
            }
            if let Some(v) = hub_addr {
                cfg.hub_addr = v;
            }
            if let Some(v) = bootstrap_addr {
                cfg.bootstrap_addr = v;
            }
            if metrics_addr.is_some() {
                cfg.metrics_addr = metrics_addr;
            }
            if grpc_addr.is_some() {
                cfg.grpc_addr = grpc_addr;
            }
            if no_grpc {
                cfg.grpc_addr = None;
            }
            if let Some(path) = kubeconfig {
                match cfg.kubernetes.as_mut() {
                    Some(k) => k.kubeconfig = path,
                    None => cfg.kubernetes = Some(KubernetesConfig::new(path)),
                }
            }
            if let Some(a) = webhook_addr {
                match cfg.kubernetes.as_mut() {
                    Some(k) => k.webhook_addr = a,
                    None => return Err("--webhook-addr needs --kubeconfig (attached mode)".into()),
                }
            }
            if let Some(a) = stream_addr {
                match cfg.kubernetes.as_mut() {
                    Some(k) => k.stream_addr = a,
                    None => return Err("--stream-addr needs --kubeconfig (attached mode)".into()),
                }
            }
            if let Some(id) = replica_id {
                let Some(k) = cfg.kubernetes.as_mut() else {
                    return Err("--replica-id needs --kubeconfig (attached mode)".into());
                };
                match k.replica.as_mut() {
                    Some(r) => r.id = id,
                    None => {
                        k.replica = Some(keel_cloud::attach::shards::ReplicaConfig::new(id));
                    }
                }
            }
            if let Some(secs) = shard_lease_seconds {
                match cfg.kubernetes.as_mut().and_then(|k| k.replica.as_mut()) {
                    Some(r) => r.lease_seconds = secs,
                    None => return Err("--shard-lease-seconds needs --replica-id".into()),
                }
            }
            if let Some(v) = retain {
                cfg.retention.age = v;
            }
            if let Some(v) = retain_records {
                cfg.retention.records = v;
            }
            if event_sink.is_some() {
                cfg.retention.event_sink = event_sink;
            }
            if let Some(v) = rebase_after {
                cfg.retention.rebase_after = v;
            }
            if let Some(v) = compact_interval {
                if v.is_zero() {
                    return Err("--compact-interval must be more than 0".into());
                }
                cfg.retention.interval = v;
            }
            let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
            let r = rt
                .block_on(core::run(cfg, started, core::shutdown_signal()))
                .map_err(|e| e.to_string());
            // Stopped is stopped: a task still blocked (a request to an
            // unreachable API server, say) does not keep the process alive.
            rt.shutdown_timeout(Duration::from_secs(2));
            r
        }
    }
}

/// Tells the operator where cloudcore listens and how to reach it.
fn started(r: &core::Running) {
    match (&r.attached, r.api_addr) {
        (Some(a), _) => println!(
            "cloudcore is running, attached to the Kubernetes cluster at {}.\n  edge nodes appear there as Nodes: kubectl get nodes -l node-role.kubernetes.io/edge{}",
            a.server(),
            r.webhook_addr
                .map(|w| format!("\n  autonomy webhook: https://{w}"))
                .unwrap_or_default()
        ),
        (None, Some(api)) => println!(
            "cloudcore is running.\n  API:        https://{}\n  kubeconfig: {}\n  try:        kubectl --kubeconfig {} get nodes",
            api,
            r.kubeconfig.display(),
            r.kubeconfig.display()
        ),
        (None, None) => println!("cloudcore is running."),
    }
    if let Some(g) = r.grpc_addr {
        println!(
            "  admin gRPC: {g}\n  try:        keel --kubeconfig {} --server {g} nodes",
            r.kubeconfig.display()
        );
    }
}
