//! State far larger than the memory budget: `--state-memory-mb` keeps state tables on disk.

mod common;

use common::Server;
use kappa_sql_tests::query_text;

/// KEYS distinct keys (default 400k; `KAPPA_SPILL_KEYS` for more) go into a table, a grouped
/// view over it and the view's contents, a join's stored rows (a LEFT JOIN of the table
/// with a third of the keys) and a top-N's partitions (the top row of each of 100) — five
/// state tables of KEYS entries each, far more than the 16 MiB budget (`KAPPA_SPILL_MIB`) — and then half of them get a second row. With the
/// state kept on disk, the views must hold exactly the rows worked out in closed form,
/// answer point lookups, and come back after a restart without being loaded.
///
/// The memory must stop growing with the state: the resident memory is sampled after every
/// statement, and its floor may grow from the second quarter of the keys to the last by at
/// most what it grew up to the second quarter (state kept in memory grows linearly with
/// the keys: by 1.6 times that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_kept_on_disk_is_exact_and_survives_a_restart() {
    let keys: u64 = std::env::var("KAPPA_SPILL_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400_000);
    let budget_mib: u64 = std::env::var("KAPPA_SPILL_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(16);
    let chunk = 25_000u64.min(keys);
    let base = std::env::temp_dir().join(format!("kappa-spill-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);

    let run = |dir: std::path::PathBuf| async move {
        let budget = budget_mib.to_string();
        let s = Server::start(&dir, &["--state-memory-mb", &budget, "--fsync", "off"]);
        let c = s.client().await;
        c.batch_execute(
            "CREATE TABLE t (k BIGINT, v BIGINT);
             CREATE TABLE u (k BIGINT, w BIGINT);
             CREATE MATERIALIZED VIEW g AS SELECT k, count(*) AS n, sum(v) AS s FROM t GROUP BY k;
             CREATE MATERIALIZED VIEW lj AS
               SELECT count(*) AS n, count(u.k) AS matched, sum(u.w) AS w
               FROM t LEFT JOIN u ON t.k = u.k;
             CREATE MATERIALIZED VIEW top AS
               SELECT p, k, v FROM (
                 SELECT k % 100 AS p, k, v,
                        row_number() OVER (PARTITION BY k % 100 ORDER BY v DESC, k DESC) AS rn
                 FROM t) s
               WHERE rn = 1;",
        )
        .await
        .expect("setup");
        c.batch_execute(&format!(
            "INSERT INTO u SELECT value, 2 * value FROM generate_series(3, {keys}, 3)"
        ))
        .await
        .expect("dimension");
        // (keys written, resident MiB after the statement)
        let mut rss = vec![(0, s.rss_mib())];
        let mut from = 1;
        while from <= keys {
            let to = (from + chunk - 1).min(keys);
            c.batch_execute(&format!(
                "INSERT INTO t SELECT value, value % 7 FROM generate_series({from}, {to})"
            ))
            .await
            .expect("insert");
            rss.push((to, s.rss_mib()));
            from = to + 1;
        }
        // Every even key gets a second row.
        let mut from = 2;
        while from <= keys {
            let to = (from + 2 * chunk - 1).min(keys);
            c.batch_execute(&format!(
                "INSERT INTO t SELECT value, 100 FROM generate_series({from}, {to}, 2)"
            ))
            .await
            .expect("update");
            from = to + 1;
        }
        c.batch_execute("FLUSH").await.expect("flush");
        (s, c, rss)
    };
    let check = |c: tokio_postgres::Client| async move {
        let (r, _, _) = query_text(&c, "SELECT count(*), sum(n), sum(s), max(k) FROM g")
            .await
            .expect("totals");
        // Σ n = keys + ⌊keys/2⌋; Σ s = Σ (k mod 7) + 100 ⌊keys/2⌋.
        let even = keys / 2;
        let mods: u64 = (1..=keys).map(|k| k % 7).sum();
        assert_eq!(
            r,
            vec![vec![
                keys.to_string(),
                (keys + even).to_string(),
                (mods + 100 * even).to_string(),
                keys.to_string()
            ]]
        );
        // Point lookups on the view's key read single groups from disk.
        for k in [1, 2, keys / 2, keys] {
            let (r, _, _) = query_text(&c, &format!("SELECT n, s FROM g WHERE k = {k}"))
                .await
                .expect("lookup");
            let (n, s) = if k % 2 == 0 {
                (2, k % 7 + 100)
            } else {
                (1, k % 7)
            };
            assert_eq!(r, vec![vec![n.to_string(), s.to_string()]], "k = {k}");
        }
        // Each row of t with a key divisible by 3 matches u's one row, whose w is 2k.
        let (r, _, _) = query_text(&c, "SELECT n, matched, w FROM lj")
            .await
            .expect("join");
        let rows_of = |k: u64| 1 + u64::from(k.is_multiple_of(2));
        let threes = (3..=keys).step_by(3);
        assert_eq!(
            r,
            vec![vec![
                (keys + even).to_string(),
                threes.clone().map(rows_of).sum::<u64>().to_string(),
                threes.map(|k| 2 * k * rows_of(k)).sum::<u64>().to_string(),
            ]]
        );
        // Per k mod 100, the row with the largest v (100 for an even key's second row, else
        // k mod 7), ties to the largest k.
        let mut best = std::collections::BTreeMap::new();
        for k in 1..=keys {
            let v = if k.is_multiple_of(2) { 100 } else { k % 7 };
            let e = best.entry(k % 100).or_insert((k, v));
            if (v, k) > (e.1, e.0) {
                *e = (k, v);
            }
        }
        let want: Vec<Vec<String>> = best
            .iter()
            .map(|(p, (k, v))| vec![p.to_string(), k.to_string(), v.to_string()])
            .collect();
        let (r, _, _) = query_text(&c, "SELECT p, k, v FROM top ORDER BY p")
            .await
            .expect("top-N");
        assert_eq!(r, want);
    };

    let dir = base.join("spill");
    let (s, c, rss) = run(dir.clone()).await;
    let spilled = s.peak_rss_mib();
    eprintln!("resident MiB after each statement (keys, MiB): {rss:?}");
    // The lowest sample of each quarter: what stays between the brief peaks of
    // checkpoint writes, which land in either quarter.
    let floor = |from: u64, to: u64| {
        rss.iter()
            .filter(|(k, _)| *k > from && *k <= to)
            .map(|(_, m)| *m)
            .min()
            .unwrap_or(0)
    };
    let start = rss[0].1;
    let second = floor(keys / 4, keys / 2);
    let fourth = floor(keys / 4 * 3, keys);
    assert!(
        fourth.saturating_sub(second) <= second.saturating_sub(start),
        "resident memory kept growing with the state: {start} MiB at the start, at least \
         {second} MiB over the second quarter of the keys, {fourth} MiB over the last"
    );
    let (h, _, _) = query_text(
        &c,
        "SELECT checkpoints > 0, checkpoint_status FROM kappa_history",
    )
    .await
    .expect("kappa_history");
    assert_eq!(h, vec![vec!["t".to_string(), "every 1000 ms".to_string()]]);
    eprintln!("{keys} keys: peak RSS {spilled} MiB with --state-memory-mb {budget_mib}");
    check(c).await;
    s.kill();

    // A restart recovers the checkpointed state without loading it.
    let s = Server::start(&dir, &["--state-memory-mb", &budget_mib.to_string()]);
    check(s.client().await).await;
    eprintln!("after a restart: peak RSS {} MiB", s.peak_rss_mib());
    s.kill();
    let _ = std::fs::remove_dir_all(&base);
}
