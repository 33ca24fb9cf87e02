//! INSERT … SELECT of N rows into a table with a grouped-aggregate materialized view over it.
//!
//! Reports, for the whole server (engine + pgwire, in this process):
//! - rows/s until the INSERT is acknowledged (the table write),
//! - rows/s until `FLUSH` returns (the view has absorbed every row),
//! - peak RSS of the process.
//!
//! Usage: `cargo run --release -p kappa-benches --bin insert-select -- [ROWS] [GROUPS]`
//! (defaults: 1000000 rows, 1000 groups).

use std::time::Instant;

use kappa_sql_tests::peak_rss_mib;

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let rows: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let groups: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1000);
    let addr = kappa_sql_tests::start_kappa().await;
    let client = kappa_sql_tests::connect(addr).await;
    client
        .batch_execute(
            "CREATE TABLE orders (id BIGINT PRIMARY KEY, customer TEXT, amount DOUBLE);
             CREATE MATERIALIZED VIEW spend AS
               SELECT customer, count(*) AS n, sum(amount) AS total, max(amount) AS biggest, min(amount) AS smallest
               FROM orders GROUP BY customer;",
        )
        .await?;
    let rss_before = peak_rss_mib();
    let start = Instant::now();
    client
        .batch_execute(&format!(
            "INSERT INTO orders SELECT value, 'c' || (value % {groups}), CAST(value % 97 AS DOUBLE) FROM generate_series(1, {rows})"
        ))
        .await?;
    let acked = start.elapsed();
    client.batch_execute("FLUSH").await?;
    let visible = start.elapsed();
    let n: i64 = client
        .query_one("SELECT sum(n) FROM spend", &[])
        .await?
        .get(0);
    assert_eq!(n as u64, rows, "the view must hold every row");
    println!("insert-select: rows={rows} groups={groups}");
    println!(
        "  insert acknowledged: {:.3} s  {:>12.0} rows/s",
        acked.as_secs_f64(),
        rows as f64 / acked.as_secs_f64()
    );
    println!(
        "  view caught up:      {:.3} s  {:>12.0} rows/s",
        visible.as_secs_f64(),
        rows as f64 / visible.as_secs_f64()
    );
    println!(
        "  peak RSS: {:.0} MiB (before the insert: {:.0} MiB)",
        peak_rss_mib(),
        rss_before
    );
    Ok(())
}
