//! Point lookups on a view's key versus a scan of the whole view.
//!
//! Builds a table of ROWS rows and a view grouped by `k` with GROUPS groups, then runs the
//! same query with `WHERE k = …` (a lookup: `k` leads the view's rows) and with
//! `WHERE k + 0 = …` (not a lookup: a scan), QUERIES times each, and prints p50/p99 latency.
//!
//! Each is measured twice: on a quiet view (the scan reads a decoded copy of the snapshot,
//! cached per epoch) and while another client writes to the table, so that every epoch
//! publishes a new version of the view (the scan must decode it again; the lookup decodes
//! only its rows).
//!
//! Usage: `lookup [ROWS] [GROUPS] [QUERIES]` (defaults: 1000000 200000 500).

use std::time::Instant;

use kappa_sql_tests::{connect, peak_rss_mib, percentile, start_kappa};

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rows: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let groups: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let queries: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let c_addr = start_kappa().await;
    let c = connect(c_addr).await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, v BIGINT);
         CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k;
         INSERT INTO t SELECT value, value % {groups}, value % 97 FROM generate_series(1, {rows});
         FLUSH;"
    ))
    .await
    .expect("setup");
    println!("lookup: {rows} rows, {groups} groups in the view, {queries} queries each");
    let addr = c_addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writer = None;
    for (name, cond, busy) in [
        ("lookup (k = x)", "k = ", false),
        ("scan (k + 0 = x)", "k + 0 = ", false),
        ("lookup, writes", "k = ", true),
        ("scan, writes", "k + 0 = ", true),
    ] {
        if busy && writer.is_none() {
            let w = connect(addr).await;
            let stop = stop.clone();
            writer = Some(tokio::spawn(async move {
                let mut id = rows;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    id += 1;
                    w.batch_execute(&format!("INSERT INTO t VALUES ({id}, {}, 1)", id % groups))
                        .await
                        .expect("write");
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }));
        }
        let mut ms = vec![];
        for q in 0..queries {
            let key = (q * 7919) % groups;
            let start = Instant::now();
            let r = c
                .query(&format!("SELECT k, n, s FROM per_k WHERE {cond}{key}"), &[])
                .await
                .expect("query");
            ms.push(start.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r.len(), 1, "one group per key");
            if busy {
                // Let the next epoch publish a new version of the view.
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "  {name:<18} p50 {:>7.3} ms  p99 {:>7.3} ms",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99)
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(w) = writer {
        w.await.expect("writer");
    }
    println!("  peak RSS: {:.0} MiB", peak_rss_mib());
}
