//! Randomized oracle test: thousands of random INSERT/UPDATE/DELETE statements go to Kappa
//! and to a throw-away PostgreSQL. At checkpoints every materialized view in Kappa must
//! equal (a) the same query run by PostgreSQL on its copy of the table and (b) the same
//! query run ad hoc by Kappa on the table. Every view exists twice, in one shard and in
//! three (keyed parallelism), and both copies must equal PostgreSQL.
//!
//! Two modes: single-row statements with a FLUSH after each (every epoch holds one change),
//! and multi-row statements with epochs cut by the barrier timer. A third test drives a
//! second table as well, through joins (inner, outer, semi, anti) and top-N views, and
//! checks after every epoch; a fourth does the same through window functions (OVER), and a
//! fifth through temporal joins against a versioned table.

use std::collections::BTreeMap;

use kappa_sql_tests::{DbError, Postgres, connect, query_text, start_kappa};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

const TABLE: &str =
    "CREATE TABLE t (id BIGINT PRIMARY KEY, g TEXT, h BIGINT, v DOUBLE PRECISION, w BIGINT)";

/// The second table of the join and top-N test.
const TABLE_U: &str = "CREATE TABLE u (id BIGINT PRIMARY KEY, g TEXT, x BIGINT)";

/// Joins and top-N over `t` and `u`. Every ORDER BY of a ROW_NUMBER ends in a unique key,
/// so both engines number rows the same way.
const JOIN_TOP_N_VIEWS: &[(&str, &str)] = &[
    (
        "j_inner",
        "SELECT t.id, u.id AS uid, t.w, u.x FROM t JOIN u ON t.g = u.g AND t.h <= u.x",
    ),
    (
        "j_left",
        "SELECT t.id, u.id AS uid, u.x FROM t LEFT JOIN u ON t.g = u.g AND t.h = u.x",
    ),
    (
        "j_full",
        "SELECT t.id, u.id AS uid FROM t FULL JOIN u ON t.h = u.x",
    ),
    (
        "j_semi",
        "SELECT id, g FROM t WHERE EXISTS (SELECT 1 FROM u WHERE u.g = t.g AND u.x > t.w)",
    ),
    (
        "j_anti",
        "SELECT id FROM t WHERE NOT EXISTS (SELECT 1 FROM u WHERE u.x = t.h)",
    ),
    (
        "j_agg",
        "SELECT u.g, count(*) AS n, sum(t.w) AS s FROM t JOIN u ON t.g = u.g GROUP BY u.g",
    ),
    (
        "top_rn",
        "SELECT g, id, w, rn FROM (SELECT g, id, w, ROW_NUMBER() OVER (PARTITION BY g ORDER BY w DESC, id) AS rn FROM t) s WHERE rn <= 3",
    ),
    (
        "top_rank",
        "SELECT g, h, r FROM (SELECT g, h, RANK() OVER (PARTITION BY g ORDER BY h) AS r FROM t) s WHERE r <= 2",
    ),
    (
        "top_dense",
        "SELECT h, d FROM (SELECT h, DENSE_RANK() OVER (ORDER BY h DESC) AS d FROM t) s WHERE d BETWEEN 2 AND 3",
    ),
    (
        "top_limit",
        "SELECT id, w FROM t ORDER BY w, id LIMIT 5 OFFSET 2",
    ),
    (
        "top_distinct_on",
        "SELECT DISTINCT ON (g) g, id, v FROM t ORDER BY g, v DESC, id",
    ),
    (
        "top_join",
        "SELECT uid, id, w FROM (SELECT u.id AS uid, t.id, t.w, ROW_NUMBER() OVER (PARTITION BY u.id ORDER BY t.w DESC, t.id) AS rn FROM u JOIN t ON u.g = t.g) s WHERE rn = 1",
    ),
];

/// The versioned table of the temporal join test: its event-time column `vt` is the version
/// time (the watermark trails by far more than the generated times span, so no change is
/// late). PostgreSQL gets the same table without the watermark.
const TABLE_VERSIONED: &str = "CREATE TABLE r (id BIGINT PRIMARY KEY, g TEXT, vt TIMESTAMP, x BIGINT, WATERMARK FOR vt AS vt - INTERVAL '1000' DAY)";
const TABLE_VERSIONED_PG: &str =
    "CREATE TABLE r (id BIGINT PRIMARY KEY, g TEXT, vt TIMESTAMP, x BIGINT)";

/// Temporal joins of `t` (probe time: `h` seconds after the epoch) with `r`. PostgreSQL has
/// no `FOR SYSTEM_TIME AS OF`: its definitions (in [`TEMPORAL_PG`]) pick the latest version
/// with a correlated `max`.
const TEMPORAL_VIEWS: &[(&str, &str)] = &[
    (
        "tj_inner",
        "SELECT t.id, r.id AS rid, r.x FROM t JOIN r FOR SYSTEM_TIME AS OF to_timestamp_seconds(t.h) ON t.g = r.g",
    ),
    (
        "tj_left",
        "SELECT t.id, t.w, r.id AS rid, r.vt FROM t LEFT JOIN r FOR SYSTEM_TIME AS OF to_timestamp_seconds(t.h) ON t.g = r.g AND t.w = r.x",
    ),
    (
        "tj_agg",
        "SELECT t.g, count(*) AS n, sum(r.x) AS s FROM t JOIN r FOR SYSTEM_TIME AS OF to_timestamp_seconds(t.h) ON t.g = r.g GROUP BY t.g",
    ),
];

const TEMPORAL_PG: &[(&str, &str)] = &[
    (
        "tj_inner",
        "SELECT t.id, r.id AS rid, r.x FROM t JOIN r ON t.g = r.g AND r.vt = (SELECT max(v.vt) FROM r v WHERE v.g = t.g AND v.vt <= to_timestamp(t.h) AT TIME ZONE 'UTC')",
    ),
    (
        "tj_left",
        "SELECT t.id, t.w, r.id AS rid, r.vt FROM t LEFT JOIN r ON t.g = r.g AND t.w = r.x AND r.vt = (SELECT max(v.vt) FROM r v WHERE v.g = t.g AND v.x = t.w AND v.vt <= to_timestamp(t.h) AT TIME ZONE 'UTC')",
    ),
    (
        "tj_agg",
        "SELECT t.g, count(*) AS n, sum(r.x) AS s FROM t JOIN r ON t.g = r.g AND r.vt = (SELECT max(v.vt) FROM r v WHERE v.g = t.g AND v.vt <= to_timestamp(t.h) AT TIME ZONE 'UTC') GROUP BY t.g",
    ),
];

/// Window functions (OVER) over `t` and over an aggregate. Every ROWS frame and every
/// LAG/LEAD orders by a unique key (ending in `id`), so both engines see one order; RANGE
/// frames and ranks order by `h` alone, whose ties they treat alike.
const OVER_VIEWS: &[(&str, &str)] = &[
    (
        "o_lag",
        "SELECT id, g, LAG(w) OVER (PARTITION BY g ORDER BY h, id) AS pw, LEAD(id, 2) OVER (PARTITION BY g ORDER BY h, id) AS n2 FROM t",
    ),
    (
        "o_frames",
        "SELECT id, sum(w) OVER (PARTITION BY g ORDER BY h, id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS rs, max(v) OVER (PARTITION BY g ORDER BY h, id ROWS BETWEEN 2 PRECEDING AND 1 FOLLOWING) AS mv, min(w) OVER (PARTITION BY g ORDER BY h, id ROWS BETWEEN 1 FOLLOWING AND UNBOUNDED FOLLOWING) AS rest FROM t",
    ),
    (
        "o_range",
        "SELECT id, count(w) OVER (PARTITION BY g ORDER BY h RANGE BETWEEN 1 PRECEDING AND 1 FOLLOWING) AS near, sum(h) OVER (PARTITION BY g ORDER BY h) AS upto, RANK() OVER (PARTITION BY g ORDER BY h) AS r, DENSE_RANK() OVER (PARTITION BY g ORDER BY h DESC) AS d FROM t",
    ),
    (
        "o_global",
        "SELECT id, ROW_NUMBER() OVER (ORDER BY w, id) AS rn, sum(w) OVER (PARTITION BY g) AS gs, avg(w) OVER (PARTITION BY g ORDER BY id ROWS BETWEEN 1 PRECEDING AND 1 FOLLOWING) AS a3 FROM t",
    ),
    (
        "o_over_agg",
        "SELECT g, n, LAG(n) OVER (ORDER BY g) AS pn, sum(n) OVER (ORDER BY g) AS cn FROM (SELECT g, count(*) AS n FROM t GROUP BY g) s",
    ),
];

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
    (
        "v_count_distinct",
        "SELECT g, count(DISTINCT h) AS dh, sum(DISTINCT w) AS dw, avg(DISTINCT v) AS dv, count(DISTINCT w) FILTER (WHERE h > 2) AS fw FROM t GROUP BY g",
    ),
    (
        "v_recomputed",
        "SELECT g, string_agg(CAST(h AS TEXT), ',' ORDER BY h) AS sh, array_to_string(array_agg(w ORDER BY w), ',') AS aw, percentile_cont(0.5) WITHIN GROUP (ORDER BY v) AS pv, var_pop(w) AS vw, bool_and(v > 0) AS allpos, string_agg(DISTINCT g, ';') FILTER (WHERE w > 3) AS dg FROM t GROUP BY g",
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

/// A random statement on `u` (one row, or a few with `multi_row`).
fn random_u_statement(rng: &mut StdRng, multi_row: bool) -> String {
    let id = |rng: &mut StdRng| rng.gen_range(0..60);
    match rng.gen_range(0..10) {
        0..=4 => {
            let n = if multi_row { rng.gen_range(1..4) } else { 1 };
            let rows: Vec<String> = (0..n)
                .map(|_| format!("({}, {}, {})", id(rng), g(rng), h(rng)))
                .collect();
            format!("INSERT INTO u VALUES {}", rows.join(", "))
        }
        5..=7 => match rng.gen_range(0..2) {
            0 => format!("UPDATE u SET x = {} WHERE id = {}", h(rng), id(rng)),
            _ => format!("UPDATE u SET g = {} WHERE id = {}", g(rng), id(rng)),
        },
        _ if multi_row => format!("DELETE FROM u WHERE g = {}", g(rng)),
        _ => format!("DELETE FROM u WHERE id = {}", id(rng)),
    }
}

/// A random statement on the versioned table `r`: versions at 0–7 s after the epoch, so
/// they interleave with the probe times of `t` (`h` seconds).
fn random_r_statement(rng: &mut StdRng, multi_row: bool) -> String {
    let id = |rng: &mut StdRng| rng.gen_range(0..40);
    let vt = |rng: &mut StdRng| {
        if rng.gen_bool(0.05) {
            "NULL".to_string()
        } else {
            format!("'1970-01-01 00:00:0{}'", rng.gen_range(0..8))
        }
    };
    match rng.gen_range(0..10) {
        0..=4 => {
            let n = if multi_row { rng.gen_range(1..4) } else { 1 };
            let rows: Vec<String> = (0..n)
                .map(|_| format!("({}, {}, {}, {})", id(rng), g(rng), vt(rng), h(rng)))
                .collect();
            format!("INSERT INTO r VALUES {}", rows.join(", "))
        }
        5..=7 => match rng.gen_range(0..3) {
            0 => format!("UPDATE r SET x = {} WHERE id = {}", h(rng), id(rng)),
            1 => format!("UPDATE r SET vt = {} WHERE id = {}", vt(rng), id(rng)),
            _ => format!("UPDATE r SET g = {} WHERE id = {}", g(rng), id(rng)),
        },
        _ if multi_row => format!("DELETE FROM r WHERE g = {}", g(rng)),
        _ => format!("DELETE FROM r WHERE id = {}", id(rng)),
    }
}

fn sqlstate(e: &DbError) -> String {
    e.0.split(':').next().unwrap_or_default().to_string()
}

/// Shards of the second copy of every view.
const SHARDS: usize = 3;

fn sharded(view: &str) -> String {
    format!("{view}_in_{SHARDS}_shards")
}

async fn check(kappa: &Client, pg: &Client, views: &[(&str, &str)], step: usize) {
    for (name, def) in views {
        let in_kappa = rows(kappa, &format!("SELECT * FROM {name}")).await;
        let in_pg = rows(pg, &format!("SELECT * FROM {name}")).await;
        assert_eq!(
            in_kappa, in_pg,
            "view {name} differs from PostgreSQL after {step} statements"
        );
        let in_shards = rows(kappa, &format!("SELECT * FROM {}", sharded(name))).await;
        assert_eq!(
            in_shards, in_pg,
            "view {name} in {SHARDS} shards differs from PostgreSQL after {step} statements"
        );
        let adhoc = rows(kappa, def).await;
        assert_eq!(
            in_kappa, adhoc,
            "view {name} differs from Kappa's ad-hoc query after {step} statements"
        );
    }
}

type Statement = fn(&mut StdRng, bool) -> String;

/// What one randomized run does.
struct Suite {
    tables: &'static [&'static str],
    /// PostgreSQL's tables, where their DDL differs.
    pg_tables: Option<&'static [&'static str]>,
    views: &'static [(&'static str, &'static str)],
    /// PostgreSQL's definitions, where they differ.
    pg_views: &'static [(&'static str, &'static str)],
    /// Statements on the second table, if there is one.
    second: Option<Statement>,
    /// Statements between checks (each a FLUSH first).
    check_every: usize,
}

const AGGREGATES: Suite = Suite {
    tables: &[TABLE],
    pg_tables: None,
    views: VIEWS,
    pg_views: &[],
    second: None,
    check_every: 250,
};

const JOINS_AND_TOP_N: Suite = Suite {
    tables: &[TABLE, TABLE_U],
    pg_tables: None,
    views: JOIN_TOP_N_VIEWS,
    pg_views: &[],
    second: Some(random_u_statement),
    check_every: 1,
};

const OVER: Suite = Suite {
    tables: &[TABLE],
    pg_tables: None,
    views: OVER_VIEWS,
    pg_views: &[],
    second: None,
    check_every: 1,
};

const TEMPORAL: Suite = Suite {
    tables: &[TABLE, TABLE_VERSIONED],
    pg_tables: Some(&[TABLE, TABLE_VERSIONED_PG]),
    views: TEMPORAL_VIEWS,
    pg_views: TEMPORAL_PG,
    second: Some(random_r_statement),
    check_every: 1,
};

async fn run(suite: &Suite, seed: u64, statements: usize, multi_row: bool) {
    let Some(pg_server) = Postgres::start() else {
        panic!("PostgreSQL 15 is required for the oracle test (scripts/setup.sh installs it)");
    };
    let pg = pg_server.connect().await;
    let addr = start_kappa().await;
    let kappa = connect(addr).await;
    for (c, tables) in [
        (&kappa, suite.tables),
        (&pg, suite.pg_tables.unwrap_or(suite.tables)),
    ] {
        for t in tables {
            c.batch_execute(t).await.expect("create table");
        }
    }
    for (name, def) in suite.views {
        // Each view twice: in one shard, and in SHARDS shards (keyed parallelism).
        for (view, n) in [(name.to_string(), 1), (sharded(name), SHARDS)] {
            kappa
                .batch_execute(&format!(
                    "CREATE MATERIALIZED VIEW {view} WITH (parallelism = {n}) AS {def}"
                ))
                .await
                .unwrap_or_else(|e| panic!("create {view}: {e}"));
        }
        let pg_def = suite
            .pg_views
            .iter()
            .find(|(n, _)| n == name)
            .map_or(*def, |(_, d)| *d);
        pg.batch_execute(&format!("CREATE VIEW {name} AS {pg_def}"))
            .await
            .unwrap_or_else(|e| panic!("create {name} in PostgreSQL: {e}"));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for step in 1..=statements {
        let sql = match suite.second {
            Some(second) if rng.gen_bool(0.4) => second(&mut rng, multi_row),
            _ => random_statement(&mut rng, multi_row),
        };
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
        if step % suite.check_every == 0 {
            if multi_row {
                kappa.batch_execute("FLUSH").await.expect("flush");
            }
            check(&kappa, &pg, suite.views, step).await;
        }
    }
    kappa.batch_execute("FLUSH").await.expect("flush");
    check(&kappa, &pg, suite.views, statements).await;
    eprintln!("seed {seed}, multi_row {multi_row}: {outcomes:?}");
    assert!(outcomes.get("ok").copied().unwrap_or(0) > statements / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_dml_one_row_per_epoch() {
    run(&AGGREGATES, 7, 1500, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_dml_batched_epochs() {
    run(&AGGREGATES, 11, 2500, true).await;
}

/// Joins and top-N, checked against PostgreSQL after every epoch (every statement is
/// flushed into an epoch of its own, single-row or multi-row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_dml_through_joins_and_top_n() {
    run(&JOINS_AND_TOP_N, 23, 400, false).await;
    run(&JOINS_AND_TOP_N, 29, 300, true).await;
}

/// Window functions, checked against PostgreSQL after every epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_dml_through_over() {
    run(&OVER, 31, 300, false).await;
    run(&OVER, 37, 200, true).await;
}

/// Temporal joins (FOR SYSTEM_TIME AS OF) against a versioned table whose versions are
/// inserted, moved in time, updated and deleted: checked against PostgreSQL (a correlated
/// `max`) and against Kappa's own batch plan after every epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_dml_through_temporal_joins() {
    run(&TEMPORAL, 41, 400, false).await;
    run(&TEMPORAL, 43, 300, true).await;
}
