//! Randomized oracle test: thousands of random INSERT/UPDATE/DELETE statements go to Kappa
//! and to a throw-away PostgreSQL. At checkpoints every materialized view in Kappa must
//! equal (a) the same query run by PostgreSQL on its copy of the table and (b) the same
//! query run ad hoc by Kappa on the table.
//!
//! Two modes: single-row statements with a FLUSH after each (every epoch holds one change),
//! and multi-row statements with epochs cut by the barrier timer.

use std::collections::BTreeMap;

use kappa_sql_tests::{DbError, Postgres, connect, query_text, start_kappa};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

const TABLE: &str =
    "CREATE TABLE t (id BIGINT PRIMARY KEY, g TEXT, h BIGINT, v DOUBLE PRECISION, w BIGINT)";

/// (name, definition). The same SQL runs on both engines.
const VIEWS: &[(&str, &str)] = &[
    (
        "v_group",
        "SELECT g, count(*) AS n, sum(w) AS sw, min(v) AS mn, max(v) AS mx, avg(w) AS aw FROM t GROUP BY g",
    ),
    (
        "v_filter",
        "SELECT id, g, w * 2 + h AS x FROM t WHERE v > 0 AND h % 3 <> 1",
    ),
    ("v_distinct", "SELECT DISTINCT g, h FROM t"),
    (
        "v_scalar",
        "SELECT count(*) AS n, sum(h) AS sh, max(w) AS mw, min(g) AS mg FROM t",
    ),
    (
        "v_union",
        "SELECT g, h FROM t WHERE h < 3 UNION ALL SELECT g, w FROM t WHERE w > 5",
    ),
    ("v_nested", "SELECT g, n, sw FROM v_group WHERE n > 2"),
    (
        "v_twolevel",
        "SELECT n, count(*) AS groups, max(mx) AS top FROM v_group GROUP BY n",
    ),
];

fn normalize(cell: &str) -> String {
    match cell.parse::<f64>() {
        Ok(f) if cell != "NaN" => {
            let r = (f * 1e6).round() / 1e6;
            if r == 0.0 { "0".into() } else { format!("{r}") }
        }
        _ => cell.to_string(),
    }
}

async fn rows(client: &Client, sql: &str) -> Vec<String> {
    let (rows, _, _) = query_text(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out: Vec<String> = rows
        .into_iter()
        .map(|r| r.iter().map(|c| normalize(c)).collect::<Vec<_>>().join("|"))
        .collect();
    out.sort();
    out
}

fn g(rng: &mut StdRng) -> String {
    match rng.gen_range(0..6) {
        0 => "NULL".into(),
        i => format!("'g{i}'"),
    }
}

fn h(rng: &mut StdRng) -> String {
    if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        rng.gen_range(0..7).to_string()
    }
}

fn v(rng: &mut StdRng) -> String {
    if rng.gen_bool(0.05) {
        "NULL".into()
    } else {
        format!("{}", rng.gen_range(-20..21) as f64 * 0.25)
    }
}

fn w(rng: &mut StdRng) -> String {
    if rng.gen_bool(0.1) {
        "NULL".into()
    } else {
        rng.gen_range(-10..21).to_string()
    }
}

fn random_statement(rng: &mut StdRng, multi_row: bool) -> String {
    let id = |rng: &mut StdRng| rng.gen_range(0..300);
    match rng.gen_range(0..10) {
        0..=4 => {
            let n = if multi_row { rng.gen_range(1..8) } else { 1 };
            let rows: Vec<String> = (0..n)
                .map(|_| {
                    format!(
                        "({}, {}, {}, {}, {})",
                        id(rng),
                        g(rng),
                        h(rng),
                        v(rng),
                        w(rng)
                    )
                })
                .collect();
            format!("INSERT INTO t VALUES {}", rows.join(", "))
        }
        5..=6 => {
            let set = match rng.gen_range(0..4) {
                0 => format!("v = {}", v(rng)),
                1 => format!("w = {}, g = {}", w(rng), g(rng)),
                2 => format!("h = {}", h(rng)),
                _ => "w = w + 1".into(),
            };
            if multi_row {
                format!("UPDATE t SET {set} WHERE h = {}", rng.gen_range(0..7))
            } else {
                format!("UPDATE t SET {set} WHERE id = {}", id(rng))
            }
        }
        7 if multi_row => format!("UPDATE t SET id = id + 1000 WHERE id = {}", id(rng)),
        _ => {
            if multi_row {
                format!(
                    "DELETE FROM t WHERE g = {} AND h = {}",
                    g(rng),
                    rng.gen_range(0..7)
                )
            } else {
                format!("DELETE FROM t WHERE id = {}", id(rng))
            }
        }
    }
}

fn sqlstate(e: &DbError) -> String {
    e.0.split(':').next().unwrap_or_default().to_string()
}

async fn check(kappa: &Client, pg: &Client, step: usize) {
    for (name, def) in VIEWS {
        let in_kappa = rows(kappa, &format!("SELECT * FROM {name}")).await;
        let in_pg = rows(pg, &format!("SELECT * FROM {name}")).await;
        assert_eq!(
            in_kappa, in_pg,
            "view {name} differs from PostgreSQL after {step} statements"
        );
        let adhoc = rows(kappa, def).await;
        assert_eq!(
            in_kappa, adhoc,
            "view {name} differs from Kappa's ad-hoc query after {step} statements"
        );
    }
}

async fn run(seed: u64, statements: usize, multi_row: bool) {
    let Some(pg_server) = Postgres::start() else {
        panic!("PostgreSQL 15 is required for the oracle test (scripts/setup.sh installs it)");
    };
    let pg = pg_server.connect().await;
    let addr = start_kappa().await;
    let kappa = connect(addr).await;
    for c in [&kappa, &pg] {
        c.batch_execute(TABLE).await.expect("create table");
    }
    for (name, def) in VIEWS {
        kappa
            .batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {def}"))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
        pg.batch_execute(&format!("CREATE VIEW {name} AS {def}"))
            .await
            .unwrap_or_else(|e| panic!("create {name} in PostgreSQL: {e}"));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for step in 1..=statements {
        let sql = random_statement(&mut rng, multi_row);
        let k = query_text(&kappa, &sql).await;
        let p = query_text(&pg, &sql).await;
        match (&k, &p) {
            (Ok((_, kc, _)), Ok((_, pc, _))) => {
                assert_eq!(kc, pc, "row counts differ for {sql}");
                *outcomes.entry("ok".into()).or_default() += 1;
            }
            (Err(ke), Err(pe)) => {
                assert_eq!(
                    sqlstate(ke),
                    sqlstate(pe),
                    "different errors for {sql}: {ke} / {pe}"
                );
                *outcomes.entry(sqlstate(ke)).or_default() += 1;
            }
            _ => panic!(
                "outcome differs for {sql}: kappa {:?} postgres {:?}",
                k.as_ref().err(),
                p.as_ref().err()
            ),
        }
        if !multi_row {
            kappa.batch_execute("FLUSH").await.expect("flush");
        }
        if step % 250 == 0 {
            if multi_row {
                kappa.batch_execute("FLUSH").await.expect("flush");
            }
            check(&kappa, &pg, step).await;
        }
    }
    kappa.batch_execute("FLUSH").await.expect("flush");
    check(&kappa, &pg, statements).await;
    eprintln!("seed {seed}, multi_row {multi_row}: {outcomes:?}");
    assert!(outcomes.get("ok").copied().unwrap_or(0) > statements / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_dml_one_row_per_epoch() {
    run(7, 1500, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_dml_batched_epochs() {
    run(11, 2500, true).await;
}
