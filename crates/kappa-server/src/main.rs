//! `kappa`: the Kappa server.

mod metrics;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use kappa_engine::{Engine, EngineConfig};

/// jemalloc: the dataflow allocates and frees many small buffers on several threads, and
/// glibc's per-thread arenas keep freed memory from the operating system (resident memory
/// then grows with the threads rather than the state); jemalloc returns it and is faster.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "kappa", version, about = "Kappa: a streaming SQL database")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the server (PostgreSQL wire protocol).
    Serve {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:5466")]
        listen: SocketAddr,
        /// Directory for durable state (RocksDB): the history of every DDL statement,
        /// write and epoch, replayed on start. Created if missing.
        #[arg(long, default_value = "kappa-data")]
        data_dir: PathBuf,
        /// Keep everything in memory: nothing is written to disk, nothing survives a
        /// restart (`--data-dir` is ignored).
        #[arg(long)]
        in_memory: bool,
        /// Whether a write is `fsync`ed before it is acknowledged. `off`: it survives the
        /// process being killed, but not the machine losing power.
        #[arg(long, default_value = "on", value_parser = ["on", "off"])]
        fsync: String,
        /// Milliseconds between epoch barriers.
        #[arg(long, default_value_t = 100)]
        barrier_interval_ms: u64,
        /// Milliseconds between checkpoints of all state; 0: none, a restart replays the
        /// whole history (docs/operations.md).
        #[arg(long, default_value_t = 1000)]
        checkpoint_interval_ms: u64,
        /// Keep state tables on disk and use about this many MiB of memory for them (the
        /// rest of the state, e.g. joins' and top-N's, stays in memory). Default: all state
        /// in memory. Needs checkpoints (an interval of 0 becomes 1000).
        #[arg(long)]
        state_memory_mb: Option<u64>,
        /// Shards each materialized view's keyed operators (aggregates, joins, top-N,
        /// windows) run in, unless the view's `WITH (parallelism = n)` says otherwise.
        /// Default: the machine's cores.
        #[arg(long)]
        parallelism: Option<usize>,
        /// Serve Prometheus metrics over HTTP on this address (`GET /metrics`; see
        /// docs/operations.md). Default: no metrics endpoint.
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("kappa: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kappa: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Serve {
            listen,
            data_dir,
            in_memory,
            fsync,
            barrier_interval_ms,
            checkpoint_interval_ms,
            state_memory_mb,
            parallelism,
            metrics_listen,
        } => {
            let engine = Engine::open(EngineConfig {
                barrier_interval: std::time::Duration::from_millis(barrier_interval_ms.max(1)),
                data_dir: (!in_memory).then_some(data_dir),
                fsync: fsync == "on",
                checkpoint_interval: (checkpoint_interval_ms > 0)
                    .then(|| std::time::Duration::from_millis(checkpoint_interval_ms)),
                state_memory: state_memory_mb.map(|m| m << 20),
                parallelism: parallelism.unwrap_or_else(kappa_engine::default_parallelism),
            })
            .await
            .map_err(|e| e.to_string())?;
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
            if let Some(addr) = metrics_listen {
                let metrics = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("cannot listen for metrics on {addr}: {e}"))?;
                tracing::info!(%addr, "metrics at http://{addr}/metrics");
                let engine = engine.clone();
                tokio::spawn(async move {
                    if let Err(e) = metrics::serve(metrics, engine).await {
                        tracing::error!(error = %e, "the metrics endpoint failed");
                    }
                });
            }
            tracing::info!(%listen, "kappa is ready: psql -h {} -p {} -U kappa", listen.ip(), listen.port());
            tokio::select! {
                r = kappa_pgwire::serve(listener, engine) => r.map_err(|e| format!("server failed: {e}")),
                _ = tokio::signal::ctrl_c() => {
                    tracing::info!("shutting down");
                    Ok(())
                }
            }
        }
    }
}
