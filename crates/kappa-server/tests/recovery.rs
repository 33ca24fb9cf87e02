//! Durability end to end: the real `kappa` binary on a data directory (with `--fsync on`
//! and `off` in turn, and state in memory or spilled in turn), killed with SIGKILL at random moments while three clients write
//! concurrently and views (aggregate, joins,
//! window, top-N, a generator source) update. After each restart every table must hold
//! exactly the acknowledged writes (each writer's statement in flight when the process died
//! counts wholly or not at all)
//! and every view must equal PostgreSQL's answer to the same query over those tables. The
//! source's views must end equal to the generator's own rows, counted here.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, Int64Array};
use kappa_connectors::ColumnSet;
use kappa_connectors::nexmark::{NexmarkConfig, generate};
use kappa_sql_tests::{Postgres, query_text};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;

mod common;
use common::Server;

const EVENTS: u64 = 6_000_000;
const SEED: u64 = 7;

fn schema() -> Vec<String> {
    vec![
        "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, v BIGINT)".into(),
        "CREATE TABLE d (k BIGINT PRIMARY KEY, name TEXT)".into(),
        "CREATE TABLE ev (id BIGINT, x BIGINT, ts TIMESTAMP,
           WATERMARK FOR ts AS ts - INTERVAL '5' SECOND)"
            .into(),
        format!(
            "CREATE SOURCE bid (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP,
               WATERMARK FOR date_time AS date_time - INTERVAL '1' SECOND)
             WITH (connector = 'nexmark', nexmark.table.type = 'bid',
                   nexmark.event.num = '{EVENTS}', nexmark.seed = '{SEED}')"
        ),
    ]
}

/// (name, Kappa's query, PostgreSQL's query): the views over the tables, checked against
/// PostgreSQL.
const VIEWS: &[(&str, &str, &str)] = &[
    (
        "agg",
        "SELECT k, count(*) AS n, sum(v) AS s, min(v) AS lo, max(v) AS hi FROM t GROUP BY k",
        "SELECT k, count(*) AS n, sum(v) AS s, min(v) AS lo, max(v) AS hi FROM t GROUP BY k",
    ),
    (
        "joined",
        "SELECT t.id, t.v, d.name FROM t JOIN d ON t.k = d.k",
        "SELECT t.id, t.v, d.name FROM t JOIN d ON t.k = d.k",
    ),
    (
        "per_name",
        "SELECT d.k, d.name, count(t.id) AS n, sum(t.v) AS s FROM d LEFT JOIN t ON t.k = d.k GROUP BY d.k, d.name",
        "SELECT d.k, d.name, count(t.id) AS n, sum(t.v) AS s FROM d LEFT JOIN t ON t.k = d.k GROUP BY d.k, d.name",
    ),
    (
        "lonely",
        "SELECT d.k, d.name FROM d WHERE NOT EXISTS (SELECT 1 FROM t WHERE t.k = d.k)",
        "SELECT d.k, d.name FROM d WHERE NOT EXISTS (SELECT 1 FROM t WHERE t.k = d.k)",
    ),
    (
        "top2",
        "SELECT k, id, v FROM (SELECT k, id, v, row_number() OVER (PARTITION BY k ORDER BY v DESC, id) AS rn FROM t) s WHERE rn <= 2",
        "SELECT k, id, v FROM (SELECT k, id, v, row_number() OVER (PARTITION BY k ORDER BY v DESC, id) AS rn FROM t) s WHERE rn <= 2",
    ),
    (
        "windows",
        "SELECT window_start AS w, count(*) AS n, sum(x) AS s FROM TUMBLE(ev, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end",
        "SELECT date_bin('10 seconds', ts, TIMESTAMP '2001-01-01') AS w, count(*) AS n, sum(x) AS s FROM ev GROUP BY 1",
    ),
];

/// Views over the generator source, checked against the generator's rows.
const SOURCE_VIEWS: &[(&str, &str)] = &[
    (
        "bid_totals",
        "SELECT count(*) AS n, sum(price) AS total, max(price) AS top FROM bid",
    ),
    (
        "bid_by_bidder",
        "SELECT bidder % 7 AS b, count(*) AS n FROM bid GROUP BY bidder % 7",
    ),
];

/// Concurrent writers. Each owns its rows (ids ≡ writer mod WRITERS, and the same for the
/// keys of `d`), so each knows exactly what its acknowledged statements did.
const WRITERS: i64 = 3;

/// The tables as one writer knows its rows: every acknowledged write applied.
#[derive(Default, Clone, PartialEq, Debug)]
struct Model {
    t: std::collections::BTreeMap<i64, (i64, i64)>,
    d: std::collections::BTreeMap<i64, String>,
    ev: std::collections::BTreeMap<i64, (i64, i64)>,
    writer: i64,
    next_id: i64,
    next_value: i64,
}

impl Model {
    fn new(writer: i64) -> Self {
        Self {
            writer,
            ..Self::default()
        }
    }

    fn fresh_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id * WRITERS + self.writer
    }

    /// All writers' rows together: what the tables must hold.
    fn union(models: &[Model]) -> Model {
        let mut all = Model::default();
        for m in models {
            all.t.extend(m.t.iter().map(|(k, v)| (*k, *v)));
            all.d.extend(m.d.iter().map(|(k, v)| (*k, v.clone())));
            all.ev.extend(m.ev.iter().map(|(k, v)| (*k, *v)));
        }
        all
    }
}

/// One statement, identifiable afterwards by its effect.
#[derive(Clone, Debug)]
enum Op {
    InsertT { id: i64, k: i64, v: i64 },
    UpdateT { id: i64, v: i64 },
    DeleteT { id: i64 },
    UpsertD { k: i64, name: String, exists: bool },
    InsertEv { id: i64, x: i64, sec: i64 },
}

impl Op {
    fn sql(&self) -> String {
        match self {
            Op::InsertT { id, k, v } => format!("INSERT INTO t VALUES ({id}, {k}, {v})"),
            Op::UpdateT { id, v } => format!("UPDATE t SET v = {v} WHERE id = {id}"),
            Op::DeleteT { id } => format!("DELETE FROM t WHERE id = {id}"),
            Op::UpsertD { k, name, exists } => {
                if *exists {
                    format!("UPDATE d SET name = '{name}' WHERE k = {k}")
                } else {
                    format!("INSERT INTO d VALUES ({k}, '{name}')")
                }
            }
            Op::InsertEv { id, x, sec } => format!(
                "INSERT INTO ev VALUES ({id}, {x}, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL '{sec} seconds')"
            ),
        }
    }

    fn apply(&self, m: &mut Model) {
        match self {
            Op::InsertT { id, k, v } => {
                m.t.insert(*id, (*k, *v));
            }
            Op::UpdateT { id, v } => {
                if let Some(r) = m.t.get_mut(id) {
                    r.1 = *v;
                }
            }
            Op::DeleteT { id } => {
                m.t.remove(id);
            }
            Op::UpsertD { k, name, .. } => {
                m.d.insert(*k, name.clone());
            }
            Op::InsertEv { id, x, sec } => {
                m.ev.insert(*id, (*x, *sec));
            }
        }
    }

    /// Whether the statement's effect is in the server's tables (it ran before the kill).
    async fn happened(&self, c: &Client) -> bool {
        let one = |sql: String| async move {
            let (rows, _, _) = query_text(c, &sql).await.expect("probe");
            rows.first().map(|r| r[0].clone())
        };
        match self {
            Op::InsertT { id, .. } => one(format!("SELECT id FROM t WHERE id = {id}"))
                .await
                .is_some(),
            Op::UpdateT { id, v } => {
                one(format!("SELECT v FROM t WHERE id = {id}")).await == Some(v.to_string())
            }
            Op::DeleteT { id } => one(format!("SELECT id FROM t WHERE id = {id}"))
                .await
                .is_none(),
            Op::UpsertD { k, name, .. } => {
                one(format!("SELECT name FROM d WHERE k = {k}")).await == Some(name.clone())
            }
            Op::InsertEv { id, .. } => one(format!("SELECT id FROM ev WHERE id = {id}"))
                .await
                .is_some(),
        }
    }
}

/// The next statement of writer `m`. Event time comes from one clock shared by the
/// writers, so it moves forward by less than the watermark's 5 s delay between any two
/// concurrent inserts: nothing is late.
fn next_op(rng: &mut StdRng, m: &mut Model, clock: &AtomicI64) -> Op {
    m.next_value += 1;
    let fresh = m.next_value * 1000 + rng.gen_range(0..1000);
    let existing = |rng: &mut StdRng, m: &Model| -> Option<i64> {
        (!m.t.is_empty()).then(|| *m.t.keys().nth(rng.gen_range(0..m.t.len())).unwrap_or(&0))
    };
    match rng.gen_range(0..10) {
        0..=3 => Op::InsertT {
            id: m.fresh_id(),
            k: rng.gen_range(0..10),
            v: fresh,
        },
        4 | 5 => match existing(rng, m) {
            Some(id) => Op::UpdateT { id, v: fresh },
            None => Op::DeleteT { id: -1 },
        },
        6 => match existing(rng, m) {
            Some(id) => Op::DeleteT { id },
            None => Op::DeleteT { id: -1 },
        },
        7 => {
            let k = rng.gen_range(0..10 / WRITERS) * WRITERS + m.writer;
            Op::UpsertD {
                k,
                name: format!("n{fresh}"),
                exists: m.d.contains_key(&k),
            }
        }
        _ => Op::InsertEv {
            id: m.fresh_id(),
            x: fresh % 97,
            sec: clock.fetch_add(1, Ordering::SeqCst),
        },
    }
}

/// Writes until the connection fails. Returns the statement in flight when it failed.
async fn write_until_killed(
    c: Client,
    mut m: Model,
    seed: u64,
    clock: Arc<AtomicI64>,
) -> (Model, Option<Op>) {
    let mut rng = StdRng::seed_from_u64(seed);
    loop {
        let op = next_op(&mut rng, &mut m, &clock);
        match c.simple_query(&op.sql()).await {
            Ok(_) => op.apply(&mut m),
            Err(e) if e.as_db_error().is_some() => panic!("{} failed: {e}", op.sql()),
            Err(_) => return (m, Some(op)),
        }
    }
}

async fn rows(c: &Client, sql: &str) -> Vec<Vec<String>> {
    let (mut rows, _, _) = query_text(c, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.sort();
    rows
}

async fn check_tables(c: &Client, m: &Model) {
    let t: Vec<Vec<String>> =
        m.t.iter()
            .map(|(id, (k, v))| vec![id.to_string(), k.to_string(), v.to_string()])
            .collect();
    let mut t = t;
    t.sort();
    assert_eq!(rows(c, "SELECT id, k, v FROM t").await, t, "table t");
    let mut d: Vec<Vec<String>> =
        m.d.iter()
            .map(|(k, n)| vec![k.to_string(), n.clone()])
            .collect();
    d.sort();
    assert_eq!(rows(c, "SELECT k, name FROM d").await, d, "table d");
    let mut ev: Vec<Vec<String>> = m.ev.keys().map(|id| vec![id.to_string()]).collect();
    ev.sort();
    assert_eq!(rows(c, "SELECT id FROM ev").await, ev, "table ev");
}

/// Loads the model into PostgreSQL and compares every view with PostgreSQL's answer.
async fn check_views(kappa: &Client, pg: &Client, m: &Model) {
    pg.batch_execute(
        "DROP TABLE IF EXISTS t, d, ev;
         CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, v BIGINT);
         CREATE TABLE d (k BIGINT PRIMARY KEY, name TEXT);
         CREATE TABLE ev (id BIGINT, x BIGINT, ts TIMESTAMP);",
    )
    .await
    .expect("oracle tables");
    let mut sql = String::new();
    for (id, (k, v)) in &m.t {
        sql.push_str(&format!("INSERT INTO t VALUES ({id}, {k}, {v});"));
    }
    for (k, n) in &m.d {
        sql.push_str(&format!("INSERT INTO d VALUES ({k}, '{n}');"));
    }
    for (id, (x, sec)) in &m.ev {
        sql.push_str(&format!(
            "INSERT INTO ev VALUES ({id}, {x}, TIMESTAMP '2024-01-01 00:00:00' + INTERVAL '{sec} seconds');"
        ));
    }
    if !sql.is_empty() {
        pg.batch_execute(&sql).await.expect("oracle rows");
    }
    for (name, _, oracle) in VIEWS {
        assert_eq!(
            rows(kappa, &format!("SELECT * FROM {name}")).await,
            rows(pg, oracle).await,
            "view {name} differs from PostgreSQL"
        );
    }
}

/// The generator's own rows, counted: what the source views must end with.
fn source_oracle() -> Vec<Vec<Vec<String>>> {
    let mut opts = std::collections::BTreeMap::new();
    opts.insert("nexmark.table.type".to_string(), "bid".to_string());
    opts.insert("nexmark.event.num".to_string(), EVENTS.to_string());
    opts.insert("nexmark.seed".to_string(), SEED.to_string());
    let c = NexmarkConfig::from_options(&opts).expect("config");
    use datafusion::arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let int = |name: &str| Field::new(name, DataType::Int64, true);
    let schema = Arc::new(Schema::new(vec![
        int("auction"),
        int("bidder"),
        int("price"),
        Field::new(
            "date_time",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        ),
    ]));
    let batch = generate(&c, &schema, 0..c.rows_in(EVENTS), ColumnSet::ALL).expect("generate");
    let col = |i: usize| {
        batch
            .column(i)
            .as_any()
            .downcast_ref::<Int64Array>()
            .expect("BIGINT")
            .clone()
    };
    let (bidder, price) = (col(1), col(2));
    let (mut total, mut top) = (0i64, i64::MIN);
    let mut by_bidder = std::collections::BTreeMap::<i64, i64>::new();
    for i in 0..batch.num_rows() {
        total += price.value(i);
        top = top.max(price.value(i));
        *by_bidder.entry(bidder.value(i) % 7).or_default() += 1;
    }
    assert_eq!(price.null_count(), 0);
    let mut b: Vec<Vec<String>> = by_bidder
        .iter()
        .map(|(k, n)| vec![k.to_string(), n.to_string()])
        .collect();
    b.sort();
    vec![
        vec![vec![
            batch.num_rows().to_string(),
            total.to_string(),
            top.to_string(),
        ]],
        b,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill_and_views_match_postgres() {
    let Some(pg) = Postgres::start() else {
        panic!("PostgreSQL 15 is not installed (scripts/setup.sh installs it)");
    };
    let pg = pg.connect().await;
    let dir = std::env::temp_dir().join(format!("kappa-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let server = Server::start(
        &dir,
        &["--checkpoint-interval-ms", "200", "--parallelism", "2"],
    );
    let c = server.client().await;
    for ddl in schema() {
        c.batch_execute(&ddl).await.expect("schema");
    }
    for (name, sql, _) in VIEWS {
        c.batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    for (name, sql) in SOURCE_VIEWS {
        c.batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    // A plain view and a dropped view are part of the catalog's history too.
    c.batch_execute(
        "CREATE VIEW big AS SELECT * FROM t WHERE v > 5000;
         CREATE MATERIALIZED VIEW gone AS SELECT count(*) FROM t;
         DROP MATERIALIZED VIEW gone;",
    )
    .await
    .expect("catalog history");

    let mut models: Vec<Model> = (0..WRITERS).map(Model::new).collect();
    let clock = Arc::new(AtomicI64::new(1));
    let mut server = Some(server);
    let mut rng = StdRng::seed_from_u64(42);
    let rounds = 5;
    for round in 0..rounds {
        let s = server.take().expect("server");
        let mut writers = vec![];
        for m in &models {
            writers.push(tokio::spawn(write_until_killed(
                s.client().await,
                m.clone(),
                (round * WRITERS + m.writer) as u64,
                clock.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(300..1500))).await;
        s.kill();
        let mut in_flight = vec![];
        for (i, w) in writers.into_iter().enumerate() {
            let (m, op) = w.await.expect("writer");
            models[i] = m;
            in_flight.push(op);
        }

        // Every other run acknowledges writes without an fsync: they must survive SIGKILL
        // all the same (the process dies, the OS keeps what was written).
        let fsync_off = round % 2 == 0;
        // Checkpoints every 200 ms, except in round 1: the restart after it recovers from an
        // older checkpoint through a long tail of history.
        let checkpoints = if round == 1 { "0" } else { "200" };
        // Rounds 2 and 3 keep the state on disk (a memory budget): the restarts switch from
        // state in memory to spilled state and back, which moves a join's stored rows
        // between its log and its tables.
        let mut args = vec![
            "--fsync",
            if fsync_off { "off" } else { "on" },
            "--checkpoint-interval-ms",
            checkpoints,
        ];
        if matches!(round, 2 | 3) {
            args.extend(["--state-memory-mb", "32"]);
        }
        // Views are created in 2 shards; restarts at other parallelisms keep a checkpointed
        // view's shards (its state is split by them) and rebuild the others at the new one.
        args.extend(["--parallelism", ["1", "3", "2"][(round % 3) as usize]]);
        let s = Server::start(&dir, &args);
        let c = s.client().await;
        // Each writer's statement in flight at the kill either happened wholly or not.
        for (m, op) in models.iter_mut().zip(in_flight) {
            if let Some(op) = op
                && op.happened(&c).await
            {
                op.apply(m);
            }
        }
        let all = Model::union(&models);
        check_tables(&c, &all).await;
        check_views(&c, &pg, &all).await;
        let (src, _, _) = query_text(&c, "SELECT rows FROM kappa_sources")
            .await
            .expect("source progress");
        let (h, _, _) = query_text(
            &c,
            "SELECT recovered_from_checkpoint, recovered_records FROM kappa_history",
        )
        .await
        .expect("kappa_history");
        eprintln!(
            "round {round}: {} rows in t, {} in ev, source at row {}; recovered from the \
             checkpoint at record {} and {} records after it; tables and views exact after SIGKILL",
            all.t.len(),
            all.ev.len(),
            src[0][0],
            h[0][0],
            h[0][1]
        );
        server = Some(s);
    }
    let model = Model::union(&models);

    // The source runs to its end (through every restart) and its views equal the
    // generator's rows, each exactly once.
    let s = server.take().expect("server");
    let c = s.client().await;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (r, _, _) = query_text(&c, "SELECT count(*) FROM kappa_sources WHERE NOT finished")
            .await
            .expect("source progress");
        if r[0][0] == "0" {
            break;
        }
        assert!(Instant::now() < deadline, "the source did not finish");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.batch_execute("FLUSH").await.expect("flush");
    let oracle = source_oracle();
    for ((name, _), want) in SOURCE_VIEWS.iter().zip(oracle) {
        assert_eq!(
            rows(&c, &format!("SELECT * FROM {name}")).await,
            want,
            "view {name}"
        );
    }
    // The catalog came back whole: the plain view works, the dropped one stays dropped.
    let (r, _, _) = query_text(&c, "SELECT count(*) FROM big")
        .await
        .expect("plain view");
    let want = model.t.values().filter(|(_, v)| *v > 5000).count();
    assert_eq!(r[0][0], want.to_string());
    assert!(query_text(&c, "SELECT * FROM gone").await.is_err());
    // The history describes itself: this start replayed it.
    let (h, _, _) = query_text(
        &c,
        "SELECT data_dir, fsync, records > 1000, disk_bytes > 0, recovered_from_checkpoint > 0, \
         checkpoints > 0, checkpoint_status FROM kappa_history",
    )
    .await
    .expect("kappa_history");
    assert_eq!(
        h,
        vec![vec![
            dir.display().to_string(),
            // The last restart (round 4) runs with --fsync off.
            "f".into(),
            "t".into(),
            "t".into(),
            // It started from a checkpoint and has taken more since.
            "t".into(),
            "t".into(),
            "every 200 ms".into()
        ]]
    );
    s.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Waits until a checkpoint covers every record the history holds.
async fn wait_for_checkpoint(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = rows(
            c,
            "SELECT checkpoints > 0 AND last_checkpoint_record = records FROM kappa_history",
        )
        .await;
        if r == vec![vec!["t".to_string()]] {
            return;
        }
        assert!(Instant::now() < deadline, "no checkpoint was taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Session windows (updating and emit-on-close, whose contents are kept as appended
/// batches), a temporal filter and a late row come back from a checkpoint plus a tail of
/// history recorded after it, and go on exactly. Expected rows worked by hand: times are
/// seconds after 2024-01-01 00:00:00, the gap is 10 s, the watermark the largest ts - 6 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_windows_and_temporal_filters_come_back_from_a_checkpoint() {
    let dir = std::env::temp_dir().join(format!("kappa-restore-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let at = |s: u32| format!("'2024-01-01 00:00:{s:02}'");
    let ts = |s: u32| format!("2024-01-01 00:00:{s:02}");

    // 1. Everything up to here is in a checkpoint, the views in 3 shards: every restart
    //    below restores them in 3 shards, whatever its --parallelism.
    let s = Server::start(
        &dir,
        &["--checkpoint-interval-ms", "100", "--parallelism", "3"],
    );
    let c = s.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE clicks (user_id BIGINT, page TEXT, ts TIMESTAMP,
           WATERMARK FOR ts AS ts - INTERVAL '6' SECOND);
         CREATE TABLE pings (id BIGINT, ts TIMESTAMP);
         CREATE MATERIALIZED VIEW sess AS
           SELECT user_id, window_start, window_end, count(*) AS n
           FROM SESSION(clicks, ts, INTERVAL '10' SECOND, user_id)
           GROUP BY user_id, window_start, window_end;
         CREATE MATERIALIZED VIEW sess_eowc AS
           SELECT user_id, window_start, window_end, count(*) AS n
           FROM SESSION(clicks, ts, INTERVAL '10' SECOND, user_id)
           GROUP BY user_id, window_start, window_end
           EMIT ON WINDOW CLOSE;
         CREATE MATERIALIZED VIEW recent AS
           SELECT id FROM pings WHERE ts > now() - INTERVAL '1' HOUR;
         INSERT INTO clicks VALUES (1, 'a', {}), (1, 'b', {}), (2, 'a', {});
         INSERT INTO pings VALUES (1, now()), (2, '2024-01-01 00:00:00');",
        at(0),
        at(4),
        at(3)
    ))
    .await
    .expect("setup");
    wait_for_checkpoint(&c).await;
    s.kill();

    // 2. Without checkpoints: this part is only in the history's tail.
    let s = Server::start(
        &dir,
        &["--checkpoint-interval-ms", "0", "--parallelism", "1"],
    );
    let c = s.client().await;
    // u1 grows to [0, 22); u2 starts [30, 40); the watermark (24 s) closes [3, 13), [0, 22).
    c.batch_execute(&format!(
        "INSERT INTO clicks VALUES (1, 'c', {}), (2, 'b', {});
         INSERT INTO pings VALUES (3, now());",
        at(12),
        at(30)
    ))
    .await
    .expect("tail");
    c.batch_execute("FLUSH").await.expect("flush");
    s.kill();

    // 3. From the checkpoint and the tail, then on: u2's session grows, 5 s is late. With a
    //    memory budget: the state checkpointed in memory is taken up spilled.
    let s = Server::start(
        &dir,
        &[
            "--checkpoint-interval-ms",
            "100",
            "--state-memory-mb",
            "32",
            "--parallelism",
            "2",
        ],
    );
    let c = s.client().await;
    let (h, _, _) = query_text(
        &c,
        "SELECT recovered_from_checkpoint > 0, recovered_records FROM kappa_history",
    )
    .await
    .expect("kappa_history");
    // 5 DDL statements and the tail's 3 writes and their epoch.
    assert_eq!(h, vec![vec!["t".to_string(), "9".to_string()]]);
    c.batch_execute(&format!(
        "INSERT INTO clicks VALUES (2, 'c', {}), (1, 'z', {});
         DELETE FROM pings WHERE id = 1;
         FLUSH;",
        at(31),
        at(5)
    ))
    .await
    .expect("after");
    let row = |u: &str, a: u32, b: u32, n: &str| vec![u.to_string(), ts(a), ts(b), n.to_string()];
    assert_eq!(
        rows(&c, "SELECT * FROM sess").await,
        vec![
            row("1", 0, 22, "3"),
            row("2", 3, 13, "1"),
            row("2", 30, 41, "2")
        ]
    );
    assert_eq!(
        rows(&c, "SELECT * FROM sess_eowc").await,
        vec![row("1", 0, 22, "3"), row("2", 3, 13, "1")]
    );
    assert_eq!(
        rows(&c, "SELECT * FROM recent").await,
        vec![vec!["3".to_string()]]
    );
    assert_eq!(
        rows(
            &c,
            "SELECT name, late_rows FROM kappa_view_stats WHERE name = 'sess'"
        )
        .await,
        vec![vec!["sess".to_string(), "1".to_string()]]
    );
    // And a restart right after a checkpoint of all that gives the same (in memory again).
    wait_for_checkpoint(&c).await;
    s.kill();
    let s = Server::start(
        &dir,
        &["--checkpoint-interval-ms", "100", "--parallelism", "1"],
    );
    let c = s.client().await;
    assert_eq!(
        rows(&c, "SELECT * FROM sess_eowc").await,
        vec![row("1", 0, 22, "3"), row("2", 3, 13, "1")]
    );
    assert_eq!(
        rows(&c, "SELECT * FROM sess").await,
        vec![
            row("1", 0, 22, "3"),
            row("2", 3, 13, "1"),
            row("2", 30, 41, "2")
        ]
    );
    assert_eq!(
        rows(&c, "SELECT * FROM recent").await,
        vec![vec!["3".to_string()]]
    );
    s.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A corrupt data directory is refused at start with a message that says what is wrong.
#[test]
fn a_corrupt_data_directory_is_refused_at_start() {
    let dir = std::env::temp_dir().join(format!("kappa-corrupt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("CURRENT"), "not a manifest name").expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .output()
        .expect("run kappa");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot be used") && err.contains(dir.to_str().unwrap_or("")),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `mount`/`umount` with `args`; whether it succeeded.
fn mount(args: &[&str]) -> bool {
    Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A full disk: the write that does not fit fails with 53100 and applies nothing, reads keep
/// working, and after space is freed a restart recovers exactly the acknowledged writes.
/// Needs a small filesystem, so it mounts a 16 MiB tmpfs (as root; elsewhere it says it is
/// skipped and returns).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_with_53100_and_loses_nothing() {
    let fs = std::env::temp_dir().join(format!("kappa-full-{}", std::process::id()));
    std::fs::create_dir_all(&fs).expect("mount point");
    let fs_s = fs.to_str().expect("path").to_string();
    if !mount(&["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", &fs_s]) {
        eprintln!("SKIPPED: cannot mount a tmpfs here (needs root)");
        return;
    }
    /// Unmounts the tmpfs however the test ends.
    struct Unmount(String);
    impl Drop for Unmount {
        fn drop(&mut self) {
            for _ in 0..50 {
                if mount(&["umount", &self.0]) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _unmount = Unmount(fs_s.clone());
    let dir = fs.join("data");
    let server = Server::start(&dir, &[]);
    let c = server.client().await;
    c.batch_execute(
        "CREATE TABLE big (id BIGINT PRIMARY KEY, pad TEXT);
         CREATE MATERIALIZED VIEW n AS SELECT count(*) AS c FROM big;",
    )
    .await
    .expect("schema");
    let mut acked = 0;
    let mut refused = None;
    for i in 0..100 {
        let sql = format!(
            "INSERT INTO big SELECT value + {i} * 1000000, repeat('x', 1000) FROM generate_series(1, 1000)"
        );
        match c.batch_execute(&sql).await {
            Ok(()) => acked += 1000,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let e = refused.expect("the disk fills up");
    let db = e
        .as_db_error()
        .expect("an error response, not a dropped connection");
    assert_eq!(db.code().code(), "53100", "{}", db.message());
    assert!(db.message().contains("No space left"), "{}", db.message());
    // Reads still work, and show exactly the acknowledged rows.
    let (r, _, _) = query_text(&c, "SELECT count(*) FROM big")
        .await
        .expect("read");
    assert_eq!(r[0][0], acked.to_string());
    server.kill();

    assert!(mount(&["mount", "-o", "remount,size=64m", &fs_s]));
    let server = Server::start(&dir, &[]);
    let c = server.client().await;
    let (r, _, _) = query_text(&c, "SELECT c FROM n").await.expect("view");
    assert_eq!(
        r[0][0],
        acked.to_string(),
        "recovered exactly the acknowledged rows"
    );
    c.batch_execute("INSERT INTO big VALUES (-1, 'after')")
        .await
        .expect("writes work again");
    server.kill();
}
