//! `cloudcore`: keel's cloud side. Thin: flags and config in, [`keel_cloud::core`] does the work.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use keel_cloud::core::{self, Config};

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
            let rt = tokio::runtime::Runtime::new().map_err(|e| format!("tokio: {e}"))?;
            rt.block_on(core::run(cfg, started, core::shutdown_signal()))
                .map_err(|e| e.to_string())
        }
    }
}

/// Tells the operator where cloudcore listens and how to reach it.
fn started(r: &core::Running) {
    println!(
        "cloudcore is running.\n  API:        https://{}\n  kubeconfig: {}\n  try:        kubectl --kubeconfig {} get nodes",
        r.api_addr,
        r.kubeconfig.display(),
        r.kubeconfig.display()
    );
    if let Some(g) = r.grpc_addr {
        println!(
            "  admin gRPC: {g}\n  try:        keel --kubeconfig {} --server {g} nodes",
            r.kubeconfig.display()
        );
    }
}
