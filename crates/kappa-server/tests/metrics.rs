//! The Prometheus endpoint: scraped over HTTP, its values checked against hand-counted
//! rows and against the system tables.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

mod common;
use common::Server;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    out
}

/// The value of the sample `name` (with its labels, as written), if present.
fn value(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
}

/// Scrapes until `sample` has `want` (the metrics follow commits asynchronously).
fn wait_for(port: u16, sample: &str, want: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = scrape(port);
        if value(&text, sample) == Some(want) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{sample} never became {want}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_hand_counts_and_system_tables() {
    let dir = std::env::temp_dir().join(format!("kappa-metrics-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mport = free_port();
    let server = Server::start(&dir, &["--metrics-listen", &format!("127.0.0.1:{mport}")]);
    let c = server.client().await;
    c.batch_execute(
        "CREATE TABLE t (k INT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND);
         CREATE MATERIALIZED VIEW s AS SELECT k, count(*) AS n FROM t GROUP BY k;
         INSERT INTO t VALUES (1, '2024-01-01 00:00:10'), (1, '2024-01-01 00:00:10'), (2, '2024-01-01 00:00:10');
         FLUSH;",
    )
    .await
    .expect("set up");
    // Three rows in; out: +(1,2), +(2,1).
    let text = wait_for(mport, "kappa_view_rows_in_total{view=\"s\"}", 3.0);
    assert_eq!(
        value(&text, "kappa_view_rows_out_total{view=\"s\"}"),
        Some(2.0)
    );
    // One more row in, and a late one (dropped before the view); out: −(2,1), +(2,2).
    c.batch_execute(
        "INSERT INTO t VALUES (2, '2024-01-01 00:00:11');
         INSERT INTO t VALUES (3, '2024-01-01 00:00:01');
         FLUSH;",
    )
    .await
    .expect("more rows");
    let text = wait_for(mport, "kappa_view_rows_in_total{view=\"s\"}", 4.0);
    assert_eq!(
        value(&text, "kappa_view_rows_out_total{view=\"s\"}"),
        Some(4.0)
    );
    // The same numbers as the system tables'.
    let row = c
        .query_one(
            "SELECT state_entries, late_rows, epoch FROM kappa_view_stats WHERE name = 's'",
            &[],
        )
        .await
        .expect("kappa_view_stats");
    let (entries, late, epoch): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(late, 1, "the late row");
    let text = scrape(mport);
    assert_eq!(
        value(&text, "kappa_view_state_entries{view=\"s\"}"),
        Some(entries as f64)
    );
    assert_eq!(
        value(&text, "kappa_view_late_rows_total{view=\"s\"}"),
        Some(1.0)
    );
    assert_eq!(value(&text, "kappa_view_failed{view=\"s\"}"), Some(0.0));
    let scraped_epoch = value(&text, "kappa_epoch").expect("kappa_epoch");
    assert!(scraped_epoch >= epoch as f64, "{scraped_epoch} < {epoch}");
    assert_eq!(
        value(&text, "kappa_view_watermark_seconds{view=\"s\"}"),
        Some(1_704_067_210.0),
        "the watermark: 00:00:11 - 1 s"
    );
    assert!(value(&text, "kappa_process_resident_memory_bytes").is_some_and(|v| v > 1e6));
    assert_eq!(value(&text, "kappa_subscriptions"), Some(0.0));
    // A streaming subscriber counts while it is connected and is freed when it goes away,
    // even though the view does not change meanwhile (the stream's heartbeat notices).
    let mut copy = std::process::Command::new("psql")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port.to_string(),
            "-U",
            "kappa",
            "-X",
        ])
        .args(["-c", "COPY (SUBSCRIBE s) TO STDOUT"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("psql is installed (scripts/setup.sh)");
    wait_for(mport, "kappa_subscriptions", 1.0);
    let _ = copy.kill();
    let _ = copy.wait();
    wait_for(mport, "kappa_subscriptions", 0.0);
    // Checkpoints are counted as kappa_history counts them.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = c
            .query_one("SELECT checkpoints FROM kappa_history", &[])
            .await
            .expect("kappa_history")
            .get(0);
        let scraped = value(&scrape(mport), "kappa_checkpoints_total").expect("checkpoints");
        if n > 0 && scraped >= n as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "checkpoints: {n} vs {scraped}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Anything but /metrics is 404.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", mport)).expect("connect");
    s.write_all(b"GET /nope HTTP/1.1\r\n\r\n").expect("request");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("response");
    assert!(out.starts_with("HTTP/1.1 404"), "{out}");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
