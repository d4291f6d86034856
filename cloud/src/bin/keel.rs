//! `keel`: the admin CLI (log replay, tail, audit, chain verification,
//! node status, join tokens, node revocation) over cloudcore's admin gRPC API, or an
//! edgecore's loopback log API with `--edge`. Thin: flags in,
//! [`keel_cloud::grpc::cli`] does the work.

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::{Parser, Subcommand, ValueEnum};
use keel_cloud::grpc::cli::{self, CliError, Format, ReplayArgs};

#[derive(Parser, Debug)]
#[command(
    name = "keel",
    version,
    about = "keel admin CLI: replay and audit the log, verify its hash chains, node status, join tokens, node revocation"
)]
struct Cli {
    /// Admin kubeconfig (default: $KUBECONFIG, else cloudcore-data/admin.kubeconfig).
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// cloudcore's admin gRPC address.
    #[arg(long, global = true, default_value = keel_cloud::grpc::DEFAULT_CLOUD_ADDR)]
    server: String,
    /// Talk to an edgecore's log API at this address instead (replay,
    /// tail, audit, verify).
    #[arg(long, global = true)]
    edge: Option<String>,
    /// The edge's serving certificate (or its CA), for an edgecore run with
    /// --client-ca-file: TLS with the admin kubeconfig's certificate. An
    /// edge's generated one is DATA_DIR/pki/serving.pem.
    #[arg(long, global = true)]
    edge_ca: Option<PathBuf>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(clap::Args, Debug, Default)]
struct Filter {
    /// Stream to read (repeat for several; default: every stream).
    #[arg(long = "stream", short = 's')]
    streams: Vec<String>,
    /// Only records of this object, TYPE/NAME (such as pod/web).
    #[arg(long)]
    object: Option<String>,
    /// Namespace of --object.
    #[arg(long, short = 'n', default_value = "default")]
    namespace: String,
    /// Only records of this resource type (such as pods).
    #[arg(long)]
    kind: Option<String>,
    /// Records from this time: milliseconds since the epoch or an age (90s, 10m, 2h, 1d).
    #[arg(long)]
    since: Option<String>,
    /// Records before this time (same forms as --since).
    #[arg(long)]
    until: Option<String>,
    /// Start after this seq in each stream.
    #[arg(long)]
    after: Option<u64>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Edge nodes: connected, last seen, cursors both ways and lag.
    Nodes,
    /// One edge node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Records of the log, from a cursor, filtered.
    Replay {
        #[command(flatten)]
        filter: Filter,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Records as they are appended (until Ctrl-C).
    Tail {
        #[command(flatten)]
        filter: Filter,
    },
    /// Every change to one object, with who made it and when.
    Audit {
        /// TYPE/NAME, such as pod/web.
        object: String,
        #[arg(long, short = 'n', default_value = "default")]
        namespace: String,
        /// Streams to read (default: the server's object history).
        #[arg(long = "stream", short = 's')]
        streams: Vec<String>,
    },
    /// Verify the hash chain of every stream (or those named).
    Verify {
        #[arg(long = "stream", short = 's')]
        streams: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Issue a single-use join token bound to NODE.
    Create {
        node: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: u64,
    },
}

#[derive(Subcommand, Debug)]
enum NodeCommand {
    /// Revoke every certificate of NODE and close its live connection; it
    /// can join again only with a token created afterwards.
    Revoke { node: String },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("keel: tokio: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        // `keel replay | head`: the reader left; not an error.
        Err(CliError::Output(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keel: {e}");
            ExitCode::FAILURE
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn replay_args(f: Filter) -> Result<ReplayArgs, CliError> {
    let now = now_ms();
    Ok(ReplayArgs {
        streams: f.streams,
        key: f
            .object
            .map(|o| cli::object_key(&o, &f.namespace))
            .transpose()?,
        kind: f.kind,
        since_ms: f.since.map(|s| cli::parse_time(&s, now)).transpose()?,
        until_ms: f.until.map(|s| cli::parse_time(&s, now)).transpose()?,
        after_seq: f.after,
    })
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let format = match cli.output {
        Output::Table => Format::Table,
        Output::Json => Format::Json,
    };
    let ch = match &cli.edge {
        Some(addr) => {
            let tls = match &cli.edge_ca {
                Some(ca) => {
                    let path =
                        cli::kubeconfig_path(cli.kubeconfig, std::env::var("KUBECONFIG").ok());
                    let mut creds = cli::load_credentials(&path)?;
                    creds.ca_pem =
                        std::fs::read_to_string(ca).map_err(|e| CliError::Kubeconfig {
                            path: ca.clone(),
                            reason: e.to_string(),
                        })?;
                    Some(creds)
                }
                None => None,
            };
            cli::connect_edge(addr, tls.as_ref()).await?
        }
        None => {
            let path = cli::kubeconfig_path(cli.kubeconfig, std::env::var("KUBECONFIG").ok());
            let creds = cli::load_credentials(&path)?;
            cli::connect_cloud(&cli.server, &creds).await?
        }
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match cli.command {
        Command::Token {
            command: TokenCommand::Create { node, ttl },
        } => cli::token_create(ch, &node, Duration::from_secs(ttl), format, &mut out).await,
        Command::Nodes => cli::nodes(ch, format, now_ms(), &mut out).await,
        Command::Node {
            command: NodeCommand::Revoke { node },
        } => cli::node_revoke(ch, &node, format, &mut out).await,
        Command::Replay { filter, quiet } => {
            let args = replay_args(filter)?;
            let progress = !quiet && std::io::stderr().is_terminal();
            cli::replay(ch, &args, format, progress, &mut out)
                .await
                .map(|_| ())
        }
        Command::Tail { filter } => {
            let args = replay_args(filter)?;
            tokio::select! {
                r = cli::tail(ch, &args, format, &mut out) => r.map(|_| ()),
                () = keel_cloud::core::shutdown_signal() => Ok(()),
            }
        }
        Command::Audit {
            object,
            namespace,
            streams,
        } => {
            let key = cli::object_key(&object, &namespace)?;
            cli::audit(ch, &key, streams, format, &mut out).await
        }
        Command::Verify { streams } => cli::verify(ch, streams, format, &mut out).await,
    }
}
