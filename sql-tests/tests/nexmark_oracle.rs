//! Nexmark window and join queries over 1M generated events, checked against DuckDB.
//!
//! The three streams are generated once by the connector's own generator function and
//! written to CSV files; Kappa runs the queries as materialized views over
//! `CREATE SOURCE person / auction / bid` (the same generator, seed and rate); DuckDB runs
//! the same queries in batch over the CSVs, with the window table functions spelled out by
//! hand (`time_bucket`, `generate_series`). Every view must equal DuckDB's result row for
//! row. q5, q7 and q8 are RisingWave's published Nexmark SQL, unchanged. The event rate is
//! 10k events/s, so 1M events span 100 s of event time: q7 and q8 see ten 10 s windows,
//! q5 about fifty hopping ones.

use std::io::Write;
use std::sync::Arc;

use datafusion::arrow::array::{AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Field, Int64Type, Schema, TimeUnit, TimestampMicrosecondType,
};
use kappa_connectors::nexmark::{NexmarkConfig, NexmarkTable, generate};

const EVENTS: u64 = 1_000_000;
const RATE: u64 = 10_000;
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
    (
        "q5",
        "SELECT AuctionBids.auction, AuctionBids.num FROM (
           SELECT bid.auction, count(*) AS num, window_start AS starttime
           FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
           GROUP BY window_start, bid.auction
         ) AS AuctionBids
         JOIN (
           SELECT max(CountBids.num) AS maxn, CountBids.starttime_c
           FROM (
             SELECT count(*) AS num, window_start AS starttime_c
             FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND)
             GROUP BY bid.auction, window_start
           ) AS CountBids
           GROUP BY CountBids.starttime_c
         ) AS MaxBids
         ON AuctionBids.starttime = MaxBids.starttime_c AND AuctionBids.num >= MaxBids.maxn",
        "SELECT auction, num FROM q5",
        "WITH hop AS (SELECT auction, unnest(generate_series(time_bucket(INTERVAL 2 SECOND, date_time) - INTERVAL 8 SECOND, time_bucket(INTERVAL 2 SECOND, date_time), INTERVAL 2 SECOND)) AS ws FROM bid),
              ab AS (SELECT auction, count(*) AS num, ws AS starttime FROM hop GROUP BY ws, auction),
              mb AS (SELECT max(num) AS maxn, starttime AS starttime_c FROM ab GROUP BY starttime)
         SELECT ab.auction, ab.num FROM ab JOIN mb ON ab.starttime = mb.starttime_c AND ab.num >= mb.maxn",
    ),
    (
        "q7",
        "SELECT B.auction, B.price, B.bidder, B.date_time
         FROM bid B
         JOIN (
           SELECT MAX(price) AS maxprice, window_end as date_time
           FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND)
           GROUP BY window_end
         ) B1 ON B.price = B1.maxprice
         WHERE B.date_time BETWEEN B1.date_time - INTERVAL '10' SECOND AND B1.date_time",
        "SELECT auction, price, bidder, CAST(date_time AS BIGINT) FROM q7",
        "SELECT B.auction, B.price, B.bidder, epoch_us(B.date_time) FROM bid B
         JOIN (SELECT max(price) AS maxprice, time_bucket(INTERVAL 10 SECOND, date_time) + INTERVAL 10 SECOND AS date_time FROM bid GROUP BY 2) B1
         ON B.price = B1.maxprice
         WHERE B.date_time BETWEEN B1.date_time - INTERVAL 10 SECOND AND B1.date_time",
    ),
    (
        "q8",
        "SELECT P.id, P.name, P.starttime
         FROM (
           SELECT id, name, window_start AS starttime, window_end AS endtime
           FROM TUMBLE(person, date_time, INTERVAL '10' SECOND)
           GROUP BY id, name, window_start, window_end
         ) P
         JOIN (
           SELECT seller, window_start AS starttime, window_end AS endtime
           FROM TUMBLE(auction, date_time, INTERVAL '10' SECOND)
           GROUP BY seller, window_start, window_end
         ) A ON P.id = A.seller AND P.starttime = A.starttime AND P.endtime = A.endtime",
        "SELECT id, name, CAST(starttime AS BIGINT) FROM q8",
        "SELECT P.id, P.name, epoch_us(P.starttime) FROM
           (SELECT id, name, time_bucket(INTERVAL 10 SECOND, date_time) AS starttime FROM person GROUP BY 1, 2, 3) P
         JOIN (SELECT seller, time_bucket(INTERVAL 10 SECOND, date_time) AS starttime FROM auction GROUP BY 1, 2) A
         ON P.id = A.seller AND P.starttime = A.starttime",
    ),
];

/// A column's name and type.
type Col = (&'static str, DataType);

/// The columns of each stream the queries read (`date_time` follows them).
const STREAMS: &[(&str, NexmarkTable, &[Col])] = &[
    (
        "bid",
        NexmarkTable::Bid,
        &[
            ("auction", DataType::Int64),
            ("bidder", DataType::Int64),
            ("price", DataType::Int64),
        ],
    ),
    (
        "person",
        NexmarkTable::Person,
        &[("id", DataType::Int64), ("name", DataType::Utf8)],
    ),
    (
        "auction",
        NexmarkTable::Auction,
        &[("id", DataType::Int64), ("seller", DataType::Int64)],
    ),
];

/// Writes the stream `table` (columns `cols`, then `date_time` as microseconds) as CSV.
fn write_csv(path: &std::path::Path, table: NexmarkTable, cols: &[Col]) {
    let mut c = NexmarkConfig::new(table);
    c.seed = SEED;
    c.rate = RATE;
    let mut fields: Vec<Field> = cols
        .iter()
        .map(|(n, t)| Field::new(*n, t.clone(), true))
        .collect();
    fields.push(Field::new(
        "date_time",
        DataType::Timestamp(TimeUnit::Microsecond, None),
        true,
    ));
    let schema = Arc::new(Schema::new(fields));
    let rows = c.rows_in(EVENTS);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("csv"));
    let header: Vec<&str> = cols.iter().map(|c| c.0).collect();
    writeln!(out, "{},date_time", header.join(",")).expect("write");
    let mut start = 0;
    while start < rows {
        let end = (start + 65_536).min(rows);
        let b: RecordBatch = generate(&c, &schema, start..end).expect("generate");
        for i in 0..b.num_rows() {
            let cells: Vec<String> = b
                .columns()
                .iter()
                .map(|col| match col.data_type() {
                    DataType::Int64 => col.as_primitive::<Int64Type>().value(i).to_string(),
                    DataType::Utf8 => format!("\"{}\"", col.as_string::<i32>().value(i)),
                    _ => col
                        .as_primitive::<TimestampMicrosecondType>()
                        .value(i)
                        .to_string(),
                })
                .collect();
            writeln!(out, "{}", cells.join(",")).expect("write");
        }
        start = end;
    }
}

fn duckdb_rows(dir: &std::path::Path, query: &str) -> Vec<String> {
    let script = format!(
        r#"
import duckdb, sys
con = duckdb.connect()
con.execute("SET TimeZone = 'UTC'")
for t in ["bid", "person", "auction"]:
    con.execute(f"CREATE TABLE {{t}} AS SELECT * REPLACE (make_timestamp(date_time) AS date_time) FROM read_csv('{}/{{t}}.csv', header = true, quote = '\"')")
for row in con.execute({:?}).fetchall():
    sys.stdout.write('|'.join('NULL' if v is None else str(v) for v in row) + '\n')
"#,
        dir.display(),
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
async fn nexmark_window_and_join_views_equal_duckdb() {
    let dir = std::env::temp_dir().join(format!("kappa-nexmark-oracle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    for (name, table, cols) in STREAMS {
        write_csv(&dir.join(format!("{name}.csv")), *table, cols);
    }

    let addr = kappa_sql_tests::start_kappa().await;
    let client = kappa_sql_tests::connect(addr).await;
    for (name, _, cols) in STREAMS {
        let cols: Vec<String> = cols
            .iter()
            .map(|(n, t)| {
                let ty = if *t == DataType::Utf8 {
                    "VARCHAR"
                } else {
                    "BIGINT"
                };
                format!("{n} {ty}")
            })
            .collect();
        client
            .batch_execute(&format!(
                "CREATE SOURCE {name} ({}, date_time TIMESTAMP,
                   WATERMARK FOR date_time AS date_time - INTERVAL '1' SECOND)
                 WITH (connector = 'nexmark', nexmark.table.type = '{name}',
                       nexmark.event.num = '{EVENTS}', nexmark.seed = '{SEED}',
                       nexmark.rate = '{RATE}')",
                cols.join(", ")
            ))
            .await
            .expect("create source");
    }
    for (name, sql, _, _) in QUERIES {
        client
            .batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}"))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }
    loop {
        let row = client
            .query_one("SELECT count(*) FROM kappa_sources WHERE NOT finished", &[])
            .await
            .expect("source progress");
        if row.get::<_, i64>(0) == 0 {
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
        let theirs = duckdb_rows(&dir, duck);
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
