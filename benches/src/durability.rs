//! The cost of durability on writes: many clients INSERT small batches into a table with a
//! grouped-aggregate view, once with state in memory, once on a data directory with
//! `--fsync off`, once with `--fsync on` (the default).
//!
//! Reports per mode: acknowledged statements/s and rows/s, and the freshness of the view
//! (write acknowledged → visible to another session's SELECT) at p50/p99/max, measured by
//! a probe that writes a marker every 20 ms while the load runs and polls a view over it.
//! Checks that the view holds every acknowledged row.
//!
//! Usage: `durability [SECONDS] [CLIENTS] [ROWS_PER_INSERT]` (defaults: 10 8 10).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kappa_engine::EngineConfig;
use kappa_sql_tests::{connect, peak_rss_mib, percentile, start_kappa_with};

struct Outcome {
    statements: u64,
    rows: u64,
    seconds: f64,
    freshness_ms: Vec<f64>,
    checkpoints: Option<String>,
}

async fn run(config: EngineConfig, seconds: u64, clients: u64, rows_per: u64) -> Outcome {
    let addr = start_kappa_with(config).await;
    let admin = connect(addr).await;
    admin
        .batch_execute(
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, customer TEXT, amount DOUBLE);
             CREATE MATERIALIZED VIEW spend AS
               SELECT customer, count(*) AS n, sum(amount) AS total, max(amount) AS biggest
               FROM orders GROUP BY customer;
             CREATE TABLE probe (id BIGINT);
             CREATE MATERIALIZED VIEW probe_max AS SELECT max(id) AS id FROM probe;",
        )
        .await
        .expect("schema");
    let stop = Arc::new(AtomicBool::new(false));
    let statements = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut writers = vec![];
    for w in 0..clients {
        let c = connect(addr).await;
        let stop = stop.clone();
        let statements = statements.clone();
        writers.push(tokio::spawn(async move {
            let mut next = w * 1_000_000_000;
            while !stop.load(Ordering::Relaxed) {
                let values: Vec<String> = (0..rows_per)
                    .map(|i| {
                        let id = next + i;
                        format!("({id}, 'c{}', {})", id % 1000, (id % 97) as f64)
                    })
                    .collect();
                next += rows_per;
                c.batch_execute(&format!("INSERT INTO orders VALUES {}", values.join(",")))
                    .await
                    .expect("insert");
                statements.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Freshness: a marker written by one session, looked for by another.
    let writer = connect(addr).await;
    let reader = connect(addr).await;
    let mut freshness_ms = vec![];
    let mut marker = 0i64;
    while start.elapsed() < Duration::from_secs(seconds) {
        marker += 1;
        writer
            .batch_execute(&format!("INSERT INTO probe VALUES ({marker})"))
            .await
            .expect("probe write");
        let acked = Instant::now();
        loop {
            let seen: Option<i64> = reader
                .query_one("SELECT id FROM probe_max", &[])
                .await
                .expect("probe read")
                .get(0);
            if seen.unwrap_or(0) >= marker {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        freshness_ms.push(acked.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let seconds = start.elapsed().as_secs_f64();
    let statements = statements.load(Ordering::Relaxed);
    admin.batch_execute("FLUSH").await.expect("flush");
    let n: i64 = admin
        .query_one("SELECT sum(n) FROM spend", &[])
        .await
        .expect("view")
        .get(0);
    assert_eq!(
        n as u64,
        statements * rows_per,
        "the view holds every acknowledged row"
    );
    Outcome {
        statements,
        rows: statements * rows_per,
        seconds,
        freshness_ms,
        checkpoints: kappa_sql_tests::checkpoint_report(&admin).await,
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let clients: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(8);
    let rows_per: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    println!("durability: {seconds} s, {clients} clients, {rows_per} rows per INSERT");
    let base = std::env::temp_dir().join(format!("kappa-bench-durability-{}", std::process::id()));
    // (name, fsync with a data directory, checkpoint interval)
    let modes: [(&str, Option<bool>, Option<u64>); 4] = [
        ("in memory", None, None),
        ("data dir, fsync off", Some(false), None),
        ("data dir, fsync on", Some(true), None),
        ("fsync on, ckpt 1 s", Some(true), Some(1000)),
    ];
    for (i, (name, fsync, checkpoint_ms)) in modes.into_iter().enumerate() {
        let dir = base.join(i.to_string());
        let config = EngineConfig {
            data_dir: fsync.map(|_| dir.clone()),
            fsync: fsync.unwrap_or(true),
            checkpoint_interval: checkpoint_ms.map(Duration::from_millis),
            ..EngineConfig::default()
        };
        let mut o = run(config, seconds, clients, rows_per).await;
        o.freshness_ms.sort_by(f64::total_cmp);
        println!(
            "  {name:<20} {:>8.0} statements/s {:>9.0} rows/s   freshness p50 {:>5.1} ms  p99 {:>5.1} ms  max {:>5.1} ms ({} probes)",
            o.statements as f64 / o.seconds,
            o.rows as f64 / o.seconds,
            percentile(&o.freshness_ms, 0.5),
            percentile(&o.freshness_ms, 0.99),
            o.freshness_ms.last().copied().unwrap_or(f64::NAN),
            o.freshness_ms.len(),
        );
        if let Some(c) = &o.checkpoints {
            println!("  {:<20} {c}", "");
        }
    }
    println!("  peak RSS (whole run): {:.0} MiB", peak_rss_mib());
    let _ = std::fs::remove_dir_all(&base);
}
