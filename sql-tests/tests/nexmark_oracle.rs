//! Window queries over 1M generated Nexmark events, checked against DuckDB.
//!
//! The bids are generated once by the connector's own generator function and written to a
//! CSV file; Kappa runs the queries as materialized views over `CREATE SOURCE bid` (the same
//! generator, seed and rate); DuckDB runs the same queries in batch over the CSV, with the
//! window table functions spelled out by hand (`time_bucket`, `generate_series`). Every view
//! must equal DuckDB's result row for row. The event rate is 100k events/s, so 1M events
//! span 10 s of event time and the windows below are many and small.

use std::io::Write;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Field, Int64Type, Schema, TimeUnit, TimestampMicrosecondType,
};
use kappa_connectors::nexmark::{NexmarkConfig, NexmarkTable, generate};

const EVENTS: u64 = 1_000_000;
const RATE: u64 = 100_000;
const SEED: u64 = 42;

/// (view name, Kappa view SQL, Kappa read-out query, DuckDB query). Both read-outs produce
/// integers only, so both engines print them the same way.
const QUERIES: &[(&str, &str, &str, &str)] = &[
    (
        "q1",
        "SELECT auction, bidder, 0.908 * price AS price, date_time FROM bid",
        "SELECT auction, bidder, CAST(round(price * 1000) AS BIGINT), CAST(date_time AS BIGINT) FROM q1",
        "SELECT auction, bidder, CAST(round(0.908 * price * 1000) AS BIGINT), epoch_us(date_time) FROM bid",
    ),
    (
        "q2",
        "SELECT auction, price FROM bid WHERE auction = 1007 OR auction = 1020 OR auction = 2001 OR auction = 2019 OR auction = 2087",
        "SELECT auction, price FROM q2",
        "SELECT auction, price FROM bid WHERE auction IN (1007, 1020, 2001, 2019, 2087)",
    ),
    (
        "tumble_upd",
        "SELECT auction, window_start, count(*) AS n, sum(price) AS total, max(price) AS hi, min(bidder) AS lo FROM TUMBLE(bid, date_time, INTERVAL '1' SECOND) GROUP BY auction, window_start, window_end",
        "SELECT auction, CAST(window_start AS BIGINT), n, total, hi, lo FROM tumble_upd",
        "SELECT auction, epoch_us(time_bucket(INTERVAL 1 SECOND, date_time)), count(*), sum(price), max(price), min(bidder) FROM bid GROUP BY 1, 2",
    ),
    (
        "q5_hop",
        "SELECT auction, count(*) AS num, window_start AS starttime FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY window_start, window_end, auction",
        "SELECT auction, num, CAST(starttime AS BIGINT) FROM q5_hop",
        "SELECT auction, count(*), epoch_us(ws) FROM (SELECT auction, unnest(generate_series(time_bucket(INTERVAL 2 SECOND, date_time) - INTERVAL 8 SECOND, time_bucket(INTERVAL 2 SECOND, date_time), INTERVAL 2 SECOND)) AS ws FROM bid) GROUP BY ws, auction",
    ),
    (
        "q7_eowc",
        "SELECT window_start, window_end, max(price) AS maxprice FROM TUMBLE(bid, date_time, INTERVAL '500' MILLISECOND) GROUP BY window_start, window_end EMIT ON WINDOW CLOSE",
        "SELECT CAST(window_start AS BIGINT), CAST(window_end AS BIGINT), maxprice FROM q7_eowc",
        "SELECT epoch_us(time_bucket(INTERVAL 500 MILLISECOND, date_time)), epoch_us(time_bucket(INTERVAL 500 MILLISECOND, date_time)) + 500000, max(price) FROM bid GROUP BY 1",
    ),
    (
        "cumulate_eowc",
        "SELECT window_start, window_end, count(*) AS n, sum(price) AS s FROM CUMULATE(bid, date_time, INTERVAL '200' MILLISECOND, INTERVAL '1' SECOND) GROUP BY window_start, window_end EMIT ON WINDOW CLOSE",
        "SELECT CAST(window_start AS BIGINT), CAST(window_end AS BIGINT), n, s FROM cumulate_eowc",
        "SELECT epoch_us(time_bucket(INTERVAL 1 SECOND, date_time)), epoch_us(we), count(*), sum(price) FROM (SELECT *, unnest(generate_series(time_bucket(INTERVAL 200 MILLISECOND, date_time) + INTERVAL 200 MILLISECOND, time_bucket(INTERVAL 1 SECOND, date_time) + INTERVAL 1 SECOND, INTERVAL 200 MILLISECOND)) AS we FROM bid) GROUP BY 1, 2",
    ),
];

fn write_bids_csv(path: &std::path::Path) {
    let mut c = NexmarkConfig::new(NexmarkTable::Bid);
    c.seed = SEED;
    c.rate = RATE;
    let schema = Arc::new(Schema::new(vec![
        Field::new("auction", DataType::Int64, true),
        Field::new("bidder", DataType::Int64, true),
        Field::new("price", DataType::Int64, true),
        Field::new(
            "date_time",
            DataType::Timestamp(TimeUnit::Microsecond, None),
            true,
        ),
    ]));
    let rows = c.rows_in(EVENTS);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("csv"));
    writeln!(out, "auction,bidder,price,date_time_us").expect("write");
    let mut start = 0;
    while start < rows {
        let end = (start + 65_536).min(rows);
        let b: RecordBatch = generate(&c, &schema, start..end).expect("generate");
        let (a, bi, p) = (
            b.column(0).as_primitive::<Int64Type>(),
            b.column(1).as_primitive::<Int64Type>(),
            b.column(2).as_primitive::<Int64Type>(),
        );
        let t = b.column(3).as_primitive::<TimestampMicrosecondType>();
        for i in 0..b.num_rows() {
            writeln!(
                out,
                "{},{},{},{}",
                a.value(i),
                bi.value(i),
                p.value(i),
                t.value(i)
            )
            .expect("write");
        }
        start = end;
    }
}

fn duckdb_rows(csv: &std::path::Path, query: &str) -> Vec<String> {
    let script = format!(
        r#"
import duckdb, sys
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
con.execute("CREATE TABLE bid AS SELECT auction, bidder, price, make_timestamp(date_time_us) AS date_time FROM read_csv('{}', header = true)")
for row in con.execute({:?}).fetchall():
    sys.stdout.write('|'.join('NULL' if v is None else str(v) for v in row) + '\n')
"#,
        csv.display(),
        query
    );
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .output()
        .expect("python3 with duckdb (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "duckdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexmark_window_views_equal_duckdb() {
    let dir = std::env::temp_dir().join(format!("kappa-nexmark-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let csv = dir.join("bid.csv");
    write_bids_csv(&csv);

    let addr = kappa_sql_tests::start_kappa().await;
    let client = kappa_sql_tests::connect(addr).await;
    client
        .batch_execute(&format!(
            "CREATE SOURCE bid (auction BIGINT, bidder BIGINT, price BIGINT, date_time TIMESTAMP,
               WATERMARK FOR date_time AS date_time - INTERVAL '1' SECOND)
             WITH (connector = 'nexmark', nexmark.table.type = 'bid', nexmark.event.num = '{EVENTS}',
                   nexmark.seed = '{SEED}', nexmark.rate = '{RATE}')"
        ))
        .await
        .expect("create source");
    for (name, sql, _, _) in QUERIES {
        client
            .batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    loop {
        let row = client
            .query_one("SELECT finished FROM kappa_sources WHERE name = 'bid'", &[])
            .await
            .expect("source progress");
        if row.get::<_, bool>(0) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    for (name, _, read, duck) in QUERIES {
        let mut ours: Vec<String> = client
            .simple_query(read)
            .await
            .unwrap_or_else(|e| panic!("read {name}: {e}"))
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("NULL").to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect();
        ours.sort();
        let theirs = duckdb_rows(&csv, duck);
        assert!(!theirs.is_empty(), "{name}: DuckDB returned nothing");
        assert_eq!(ours.len(), theirs.len(), "{name}: row counts differ");
        if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
            panic!(
                "{name}: first difference at sorted row {i}: kappa {} vs duckdb {}",
                ours[i], theirs[i]
            );
        }
        println!("{name}: {} rows equal DuckDB's", ours.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
}
