//! Test support: a real Kappa server on a free port, a sqllogictest driver that speaks to it
//! over pgwire (tokio-postgres, simple query protocol), and a throw-away PostgreSQL cluster to
//! use as an independent oracle.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_trait::async_trait;
use kappa_engine::{Engine, EngineConfig};
use sqllogictest::{AsyncDB, DBOutput, DefaultColumnType};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// Starts a Kappa server (engine + pgwire) inside this process on a free loopback port.
pub async fn start_kappa() -> SocketAddr {
    start_kappa_with(EngineConfig::default()).await
}

/// Starts a Kappa server with `config` (for example on a data directory) in this process.
pub async fn start_kappa_with(config: EngineConfig) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let addr = listener.local_addr().expect("local addr");
    let engine = Engine::open(config).await.expect("start the engine");
    tokio::spawn(kappa_pgwire::serve(listener, engine));
    addr
}

pub async fn connect(addr: SocketAddr) -> Client {
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host={} port={} user=kappa dbname=kappa",
            addr.ip(),
            addr.port()
        ),
        NoTls,
    )
    .await
    .expect("connect to kappa");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// An error as the tests match it: `SQLSTATE: message`.
#[derive(Debug)]
pub struct DbError(pub String);

impl std::fmt::Display for DbError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DbError {}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => DbError(format!("{}: {}", db.code().code(), db.message())),
            None => DbError(e.to_string()),
        }
    }
}

/// Rows of a simple-protocol query as text; NULL is `NULL`, the empty string `(empty)`.
pub async fn query_text(
    client: &Client,
    sql: &str,
) -> Result<(Vec<Vec<String>>, Option<u64>, bool), DbError> {
    let msgs = client.simple_query(sql).await?;
    let mut rows = vec![];
    let mut count = None;
    let mut had_rows = false;
    for m in msgs {
        match m {
            SimpleQueryMessage::Row(r) => {
                had_rows = true;
                rows.push(
                    (0..r.len())
                        .map(|i| match r.get(i) {
                            None => "NULL".to_string(),
                            Some("") => "(empty)".to_string(),
                            Some(v) => v.to_string(),
                        })
                        .collect(),
                );
            }
            SimpleQueryMessage::RowDescription(_) => had_rows = true,
            SimpleQueryMessage::CommandComplete(n) => count = Some(n),
            _ => {}
        }
    }
    Ok((rows, count, had_rows))
}

pub struct KappaDb {
    client: Client,
}

impl KappaDb {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self {
            client: connect(addr).await,
        }
    }
}

#[async_trait]
impl AsyncDB for KappaDb {
    type Error = DbError;
    type ColumnType = DefaultColumnType;

    async fn run(&mut self, sql: &str) -> Result<DBOutput<DefaultColumnType>, DbError> {
        let (rows, count, had_rows) = query_text(&self.client, sql).await?;
        if had_rows {
            let n = rows.first().map(|r| r.len()).unwrap_or(0);
            Ok(DBOutput::Rows {
                types: vec![DefaultColumnType::Any; n],
                rows,
            })
        } else {
            Ok(DBOutput::StatementComplete(count.unwrap_or(0)))
        }
    }

    async fn shutdown(&mut self) {}

    fn engine_name(&self) -> &str {
        "kappa"
    }

    async fn sleep(dur: Duration) {
        tokio::time::sleep(dur).await
    }
}

/// Runs one `.slt` file against a fresh Kappa server.
/// Runs one `.slt` file against a fresh server whose views run in `parallelism` shards.
pub async fn run_slt_file(path: &Path, parallelism: usize) -> Result<(), String> {
    let addr = start_kappa_with(EngineConfig {
        parallelism,
        ..EngineConfig::default()
    })
    .await;
    let mut runner =
        sqllogictest::Runner::new(move || async move { Ok(KappaDb::connect(addr).await) });
    runner.with_hash_threshold(0);
    runner
        .run_file_async(path)
        .await
        .map_err(|e| e.display(true).to_string())
}

/// A throw-away PostgreSQL 15 cluster in a temporary directory, on its own port, stopped and
/// removed when dropped. `None` when PostgreSQL is not installed.
pub struct Postgres {
    dir: PathBuf,
    pub port: u16,
    child: Child,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

impl Postgres {
    pub fn start() -> Option<Self> {
        if !Path::new(PG_BIN).join("initdb").exists() {
            return None;
        }
        let dir = std::env::temp_dir().join(format!(
            "kappa-pg-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        // PostgreSQL refuses to run as root; run it as the `postgres` user when we are root.
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .map(|o| o.stdout.starts_with(b"0"))
            == Some(true);
        let wrap = |args: &[&str]| -> Command {
            if as_root {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).args(args);
                c
            } else {
                let mut c = Command::new(args[0]);
                c.args(&args[1..]);
                c
            }
        };
        if as_root {
            Command::new("chown")
                .args(["-R", "postgres", dir.to_str()?])
                .status()
                .ok()?;
        }
        let data = dir.join("data");
        let initdb = format!("{PG_BIN}/initdb");
        let ok = wrap(&[
            &initdb,
            "-D",
            data.to_str()?,
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
            "--locale=C",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?
        .success();
        if !ok {
            return None;
        }
        let postgres = format!("{PG_BIN}/postgres");
        let port_s = port.to_string();
        let child = wrap(&[
            &postgres,
            "-D",
            data.to_str()?,
            "-p",
            &port_s,
            "-k",
            dir.to_str()?,
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "wal_level=logical",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
        Some(Self { dir, port, child })
    }

    pub async fn connect(&self) -> Client {
        for _ in 0..100 {
            if let Ok((client, conn)) = tokio_postgres::connect(
                &format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres",
                    self.port
                ),
                NoTls,
            )
            .await
            {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("PostgreSQL did not start on port {}", self.port);
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `p`-quantile (0..=1) of ascending `sorted` samples, nearest rank; NaN when empty.
/// The server's checkpoints so far, as benchmarks report them; `None` when its state is in
/// memory (no `kappa_history` row).
pub async fn checkpoint_report(c: &Client) -> Option<String> {
    let row = c
        .query_opt(
            "SELECT checkpoints, last_checkpoint_ms, max_checkpoint_ms, last_checkpoint_bytes, \
             disk_bytes, checkpoint_status FROM kappa_history",
            &[],
        )
        .await
        .ok()??;
    Some(format!(
        "checkpoints={} last={:.1}ms max={:.1}ms last_size={}KiB data_dir={}MiB ({})",
        row.get::<_, i64>(0),
        row.get::<_, f64>(1),
        row.get::<_, f64>(2),
        row.get::<_, i64>(3) / 1024,
        row.get::<_, i64>(4) / (1 << 20),
        row.get::<_, String>(5),
    ))
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len().max(1) - 1) as f64 * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

/// The peak resident set size of this process so far, in MiB (Linux; NaN elsewhere).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The statistics columns of Nexmark q15 and q16 (SQL both Kappa and DuckDB accept), for the
/// benchmark harness and the oracle test.
#[macro_export]
macro_rules! nexmark_bid_statistics {
    () => {
        "count(*) AS total_bids, \
         count(*) filter (where price < 10000) AS rank1_bids, \
         count(*) filter (where price >= 10000 and price < 1000000) AS rank2_bids, \
         count(*) filter (where price >= 1000000) AS rank3_bids, \
         count(distinct bidder) AS total_bidders, \
         count(distinct bidder) filter (where price < 10000) AS rank1_bidders, \
         count(distinct bidder) filter (where price >= 10000 and price < 1000000) AS rank2_bidders, \
         count(distinct bidder) filter (where price >= 1000000) AS rank3_bidders, \
         count(distinct auction) AS total_auctions, \
         count(distinct auction) filter (where price < 10000) AS rank1_auctions, \
         count(distinct auction) filter (where price >= 10000 and price < 1000000) AS rank2_auctions, \
         count(distinct auction) filter (where price >= 1000000) AS rank3_auctions"
    };
}
