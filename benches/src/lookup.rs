//! Point lookups on a view's key versus a scan of the whole view.
//!
//! Builds a table of ROWS rows and a view grouped by `k` with GROUPS groups, then runs the
//! same query with `WHERE k = …` (a lookup: `k` leads the view's rows) and with
//! `WHERE k + 0 = …` (not a lookup: a scan), QUERIES times each, and prints p50/p99 latency.
//!
//! Usage: `lookup [ROWS] [GROUPS] [QUERIES]` (defaults: 1000000 200000 500).

use std::time::Instant;

use kappa_sql_tests::{connect, peak_rss_mib, start_kappa};

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len().max(1) - 1) as f64 * p).round() as usize;
    sorted.get(i).copied().unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let rows: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let groups: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let queries: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let c = connect(start_kappa().await).await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, v BIGINT);
         CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k;
         INSERT INTO t SELECT value, value % {groups}, value % 97 FROM generate_series(1, {rows});
         FLUSH;"
    ))
    .await
    .expect("setup");
    println!("lookup: {rows} rows, {groups} groups in the view, {queries} queries each");
    for (name, cond) in [("lookup (k = x)", "k = "), ("scan (k + 0 = x)", "k + 0 = ")] {
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
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "  {name:<18} p50 {:>7.3} ms  p99 {:>7.3} ms",
            percentile(&ms, 0.5),
            percentile(&ms, 0.99)
        );
    }
    println!("  peak RSS: {:.0} MiB", peak_rss_mib());
}
