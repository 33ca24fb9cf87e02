//! Freshness of SUBSCRIBE: how long after a write is acknowledged its change reaches a
//! subscriber.
//!
//! A table feeds a view grouped by `k`; a subscriber follows the view through a cursor
//! (`DECLARE c CURSOR FOR SUBSCRIBE per_k WITH (SNAPSHOT = false)`, `FETCH ALL c WITH
//! (timeout = '1s')` in a loop). A writer inserts WRITES rows, one every GAP ms, each into a
//! group of its own, and notes when the INSERT was acknowledged; the subscriber notes when
//! the `+1` row of that group arrives. Prints p50/p99/max of the difference, with the
//! server's default epoch interval (100 ms). With BACKGROUND rows, a second writer keeps
//! inserting into other groups meanwhile (other changes in every epoch).
//!
//! Usage: `subscribe [WRITES] [GAP_MS] [BACKGROUND]` (defaults: 500 10 0).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kappa_sql_tests::{connect, percentile, start_kappa};
use tokio_postgres::SimpleQueryMessage;

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let writes: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(500);
    let gap: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10);
    let background: bool = args.next().is_some_and(|a| a != "0");
    let addr = start_kappa().await;
    let c = connect(addr).await;
    c.batch_execute(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, v BIGINT);
         CREATE MATERIALIZED VIEW per_k AS SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k;
         FLUSH;",
    )
    .await
    .expect("setup");
    let acked: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let received: Arc<Mutex<HashMap<i64, Instant>>> = Arc::default();
    let sub = connect(addr).await;
    sub.batch_execute("BEGIN; DECLARE c CURSOR FOR SUBSCRIBE per_k WITH (SNAPSHOT = false);")
        .await
        .expect("subscribe");
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let received = received.clone();
        let done = done.clone();
        tokio::spawn(async move {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let msgs = sub
                    .simple_query("FETCH ALL c WITH (timeout = '1s')")
                    .await
                    .expect("fetch");
                let now = Instant::now();
                for m in msgs {
                    if let SimpleQueryMessage::Row(r) = m {
                        // kappa_epoch, kappa_diff, k, n, s
                        let diff: i64 = r.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                        let k: i64 = r.get(2).and_then(|v| v.parse().ok()).unwrap_or(-1);
                        if diff > 0 {
                            received.lock().expect("lock").entry(k).or_insert(now);
                        }
                    }
                }
            }
        })
    };
    let noise = background.then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            let w = connect(addr).await;
            let mut id = 1_000_000_000;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                id += 1;
                w.batch_execute(&format!(
                    "INSERT INTO t SELECT {id} * 100 + value, value % 1000 + 1000000, 1 FROM generate_series(0, 99)"
                ))
                .await
                .expect("background write");
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    });
    let w = connect(addr).await;
    for i in 0..writes {
        w.batch_execute(&format!("INSERT INTO t VALUES ({i}, {i}, 1)"))
            .await
            .expect("write");
        acked.lock().expect("lock").insert(i, Instant::now());
        tokio::time::sleep(Duration::from_millis(gap)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while received
        .lock()
        .expect("lock")
        .keys()
        .filter(|k| **k < writes)
        .count()
        < writes as usize
    {
        assert!(
            Instant::now() < deadline,
            "not every write reached the subscriber"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let acked = acked.lock().expect("lock").clone();
    let received = received.lock().expect("lock").clone();
    let mut ms: Vec<f64> = (0..writes)
        .map(|k| {
            received[&k]
                .saturating_duration_since(acked[&k])
                .as_secs_f64()
                * 1000.0
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    println!(
        "subscribe freshness: {writes} writes every {gap} ms{}: p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms",
        if background {
            ", with background writes"
        } else {
            ""
        },
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(0.0)
    );
    let _ = reader.await;
    if let Some(n) = noise {
        let _ = n.await;
    }
}
