//! Nexmark queries as materialized views over the built-in generator.
//!
//! One query per process, so the peak RSS is the query's. The clock starts before
//! `CREATE SOURCE` and stops when the (bounded) source has finished and the epoch that
//! consumed its last rows is committed, so generation, the dataflow and the view's storage
//! are all inside the measurement. The source DDL is Kappa's; the query text is the
//! published RisingWave/Nexmark SQL.
//!
//! Usage: `nexmark QUERY [EVENTS] [WORKERS]` (defaults: 10000000 events, all cores for the
//! generator). `nexmark list` prints the queries. With `KAPPA_DATA_DIR=DIR` the server
//! keeps its history there (durable, as `kappa serve --data-dir DIR`), else in memory; with
//! `KAPPA_STATE_MEMORY_MB=N` as well, its state spills (`--state-memory-mb N`).

use std::time::{Duration, Instant};

use kappa_sql_tests::peak_rss_mib;

/// The allocator the server uses (see `kappa-server`'s main).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// (name, sources it reads, view SQL, what it is).
const QUERIES: &[(&str, &[&str], &str, &str)] = &[
    (
        "q0",
        &["bid"],
        "SELECT auction, bidder, price, date_time FROM bid",
        "pass-through",
    ),
    (
        "q1",
        &["bid"],
        "SELECT auction, bidder, 0.908 * price AS price, date_time FROM bid",
        "currency conversion",
    ),
    (
        "q2",
        &["bid"],
        "SELECT auction, price FROM bid WHERE auction = 1007 OR auction = 1020 OR auction = 2001 OR auction = 2019 OR auction = 2087",
        "selection",
    ),
    (
        "q5",
        &["bid"],
        "SELECT AuctionBids.auction, AuctionBids.num FROM ( \
           SELECT bid.auction, count(*) AS num, window_start AS starttime \
           FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
           GROUP BY window_start, bid.auction \
         ) AS AuctionBids \
         JOIN ( \
           SELECT max(CountBids.num) AS maxn, CountBids.starttime_c \
           FROM ( \
             SELECT count(*) AS num, window_start AS starttime_c \
             FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) \
             GROUP BY bid.auction, window_start \
           ) AS CountBids \
           GROUP BY CountBids.starttime_c \
         ) AS MaxBids \
         ON AuctionBids.starttime = MaxBids.starttime_c AND AuctionBids.num >= MaxBids.maxn",
        "hot items: auctions with the most bids per hopping window (window join)",
    ),
    (
        "q7",
        &["bid"],
        "SELECT B.auction, B.price, B.bidder, B.date_time, B.extra \
         FROM bid B \
         JOIN ( \
           SELECT MAX(price) AS maxprice, window_end as date_time \
           FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND) \
           GROUP BY window_end \
         ) B1 ON B.price = B1.maxprice \
         WHERE B.date_time BETWEEN B1.date_time - INTERVAL '10' SECOND AND B1.date_time",
        "highest bid per window (interval join with the window's max)",
    ),
    (
        "q8",
        &["person", "auction"],
        "SELECT P.id, P.name, P.starttime \
         FROM ( \
           SELECT id, name, window_start AS starttime, window_end AS endtime \
           FROM TUMBLE(person, date_time, INTERVAL '10' SECOND) \
           GROUP BY id, name, window_start, window_end \
         ) P \
         JOIN ( \
           SELECT seller, window_start AS starttime, window_end AS endtime \
           FROM TUMBLE(auction, date_time, INTERVAL '10' SECOND) \
           GROUP BY seller, window_start, window_end \
         ) A ON P.id = A.seller AND P.starttime = A.starttime AND P.endtime = A.endtime",
        "new users who opened an auction in the same window (window join)",
    ),
    (
        "q3",
        &["person", "auction"],
        "SELECT P.name, P.city, P.state, A.id FROM auction AS A INNER JOIN person AS P on A.seller = P.id \
         WHERE A.category = 10 and (P.state = 'OR' OR P.state = 'ID' OR P.state = 'CA')",
        "local item suggestion (unbounded join)",
    ),
    (
        "q4",
        &["auction", "bid"],
        "SELECT Q.category, AVG(Q.final) as avg FROM ( \
           SELECT MAX(B.price) AS final, A.category FROM auction A, bid B \
           WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires \
           GROUP BY A.id, A.category) Q \
         GROUP BY Q.category",
        "average closing price per category (interval join, two aggregates)",
    ),
    (
        "q6",
        &["auction", "bid"],
        "SELECT Q.seller, AVG(Q.final) OVER ( \
           PARTITION BY Q.seller ORDER BY Q.date_time, Q.id ROWS BETWEEN 10 PRECEDING AND CURRENT ROW) AS avg \
         FROM ( \
           SELECT MAX(B.price) AS final, A.id, A.seller, A.expires AS date_time \
           FROM auction AS A, bid AS B \
           WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires \
           GROUP BY A.id, A.seller, A.expires) AS Q",
        "average selling price per seller over their last 10 auctions (interval join, max, OVER ROWS frame)",
    ),
    (
        "q9",
        &["auction", "bid"],
        "SELECT id, item_name, description, initial_bid, reserve, date_time, expires, seller, category, extra, \
                auction, bidder, price, bid_date_time, bid_extra \
         FROM ( \
           SELECT A.*, B.auction, B.bidder, B.price, B.date_time AS bid_date_time, B.extra AS bid_extra, \
                  ROW_NUMBER() OVER (PARTITION BY A.id ORDER BY B.price DESC, B.date_time ASC) AS rownum \
           FROM auction A, bid B \
           WHERE A.id = B.auction AND B.date_time BETWEEN A.date_time AND A.expires \
         ) WHERE rownum <= 1",
        "winning bids (interval join, top-1 per auction)",
    ),
    (
        "q11",
        &["bid"],
        "SELECT bidder, count(*) AS bid_count, window_start AS starttime, window_end AS endtime \
         FROM SESSION(bid, date_time, INTERVAL '10' SECOND, bidder) \
         GROUP BY bidder, window_start, window_end",
        "user sessions (session windows per bidder)",
    ),
    (
        "q13",
        &["side_input", "bid"],
        "SELECT B.auction, B.bidder, B.price, B.date_time, S.value \
         FROM bid B JOIN side_input FOR SYSTEM_TIME AS OF B.date_time S ON B.auction % 10000 = S.key",
        "bounded side input join (temporal join, FOR SYSTEM_TIME AS OF event time)",
    ),
    (
        "q10",
        &["bid"],
        "SELECT auction, bidder, price, date_time, to_char(date_time, '%Y-%m-%d') AS date, \
                to_char(date_time, '%H:%M') AS time FROM bid",
        "log to file system: the published sink as a view (9.2M rows)",
    ),
    (
        "q12",
        &["bid"],
        "SELECT bidder, count(*) AS bid_count, window_start, window_end \
         FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND) \
         GROUP BY bidder, window_start, window_end",
        "bids per bidder per 10 s (on event time, not processing time)",
    ),
    (
        "q14",
        &["bid"],
        "SELECT auction, bidder, 0.908 * price AS price, \
                CASE WHEN extract(hour FROM date_time) >= 8 AND extract(hour FROM date_time) <= 18 THEN 'dayTime' \
                     WHEN extract(hour FROM date_time) <= 6 OR extract(hour FROM date_time) >= 20 THEN 'nightTime' \
                     ELSE 'otherTime' END AS bidTimeType, \
                date_time, extra, length(extra) - length(replace(extra, 'c', '')) AS c_counts \
         FROM bid WHERE 0.908 * price > 1000000 AND 0.908 * price < 50000000",
        "calculation: CASE on the hour, count_char as length arithmetic",
    ),
    (
        "q15",
        &["bid"],
        concat!(
            "SELECT to_char(date_time, '%Y-%m-%d') AS day, ",
            kappa_sql_tests::nexmark_bid_statistics!(),
            " FROM bid GROUP BY to_char(date_time, '%Y-%m-%d')"
        ),
        "bidding statistics per day: count(DISTINCT) with FILTER",
    ),
    (
        "q16",
        &["bid"],
        concat!(
            "SELECT channel, to_char(date_time, '%Y-%m-%d') AS day, \
             max(to_char(date_time, '%H:%M')) AS minute, ",
            kappa_sql_tests::nexmark_bid_statistics!(),
            " FROM bid GROUP BY channel, to_char(date_time, '%Y-%m-%d')"
        ),
        "channel statistics per day: count(DISTINCT) with FILTER",
    ),
    (
        "q17",
        &["bid"],
        "SELECT auction, to_char(date_time, '%Y-%m-%d') AS day, count(*) AS total_bids, \
                count(*) filter (where price < 10000) AS rank1_bids, \
                count(*) filter (where price >= 10000 and price < 1000000) AS rank2_bids, \
                count(*) filter (where price >= 1000000) AS rank3_bids, \
                min(price) AS min_price, max(price) AS max_price, avg(price) AS avg_price, sum(price) AS sum_price \
         FROM bid GROUP BY auction, to_char(date_time, '%Y-%m-%d')",
        "auction statistics per day (aggregates with FILTER)",
    ),
    (
        "q18",
        &["bid"],
        "SELECT auction, bidder, price, channel, url, date_time, extra FROM ( \
           SELECT *, ROW_NUMBER() OVER (PARTITION BY bidder, auction ORDER BY date_time DESC) AS rank_number FROM bid) \
         WHERE rank_number <= 1",
        "last bid per bidder and auction (dedup)",
    ),
    (
        "q19",
        &["bid"],
        "SELECT * FROM ( \
           SELECT *, ROW_NUMBER() OVER (PARTITION BY auction ORDER BY price DESC) AS rank_number FROM bid) \
         WHERE rank_number <= 10",
        "top 10 bids per auction (top-N)",
    ),
    (
        "q20",
        &["auction", "bid"],
        "SELECT auction, bidder, price, channel, url, B.date_time as date_timeB, item_name, description, \
                initial_bid, reserve, A.date_time as date_timeA, expires, seller, category \
         FROM bid B INNER JOIN auction A on B.auction = A.id WHERE A.category = 10",
        "bids with their auction's details (unbounded join)",
    ),
    (
        "q21",
        &["bid"],
        "SELECT auction, bidder, price, channel, \
           CASE \
             WHEN lower(channel) = 'apple' THEN '0' \
             WHEN lower(channel) = 'google' THEN '1' \
             WHEN lower(channel) = 'facebook' THEN '2' \
             WHEN lower(channel) = 'baidu' THEN '3' \
             ELSE REGEXP_MATCH(url, '(&|^)channel_id=([^&]*)')[2] \
           END AS channel_id \
         FROM bid \
         WHERE REGEXP_MATCH(url, '(&|^)channel_id=([^&]*)')[2] is not null or lower(channel) in ('apple', 'google', 'facebook', 'baidu')",
        "channel ids (CASE, regular expressions)",
    ),
    (
        "q22",
        &["bid"],
        "SELECT auction, bidder, price, channel, split_part(url, '/', 4) as dir1, split_part(url, '/', 5) as dir2, \
                split_part(url, '/', 6) as dir3 FROM bid",
        "URL directories (string functions)",
    ),
    (
        "q5-hop",
        &["bid"],
        "SELECT auction, count(*) AS num, window_start AS starttime FROM HOP(bid, date_time, INTERVAL '2' SECOND, INTERVAL '10' SECOND) GROUP BY window_start, window_end, auction",
        "q5's windowed count per auction (q5 without its join)",
    ),
    (
        "q7-tumble",
        &["bid"],
        "SELECT window_start, window_end, max(price) AS maxprice FROM TUMBLE(bid, date_time, INTERVAL '10' SECOND) GROUP BY window_start, window_end EMIT ON WINDOW CLOSE",
        "q7's windowed max (q7 without its join), emit on window close",
    ),
];

fn source_ddl(name: &str, events: u64, workers: usize) -> String {
    if name == "side_input" {
        // q13's bounded side input: one version per key, valid from before every event.
        // It goes idle, so the join's watermark follows the bids.
        return "CREATE TABLE side_input (key BIGINT, value VARCHAR, vt TIMESTAMP, \
                  WATERMARK FOR vt AS vt) WITH (idle_timeout = '1 second'); \
                INSERT INTO side_input SELECT value AS key, CAST(value AS VARCHAR) AS value, \
                  TIMESTAMP '1970-01-01 00:00:00' AS vt FROM generate_series(0, 9999)"
            .to_string();
    }
    let cols = match name {
        "bid" => {
            "auction BIGINT, bidder BIGINT, price BIGINT, channel VARCHAR, url VARCHAR, date_time TIMESTAMP, extra VARCHAR"
        }
        "auction" => {
            "id BIGINT, item_name VARCHAR, description VARCHAR, initial_bid BIGINT, reserve BIGINT, date_time TIMESTAMP, expires TIMESTAMP, seller BIGINT, category BIGINT, extra VARCHAR"
        }
        _ => {
            "id BIGINT, name VARCHAR, email_address VARCHAR, credit_card VARCHAR, city VARCHAR, state VARCHAR, date_time TIMESTAMP, extra VARCHAR"
        }
    };
    format!(
        "CREATE SOURCE {name} ({cols}, WATERMARK FOR date_time AS date_time - INTERVAL '4' SECOND) \
         WITH (connector = 'nexmark', nexmark.table.type = '{name}', nexmark.event.num = '{events}', nexmark.workers = '{workers}')"
    )
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let query = args.next().unwrap_or_else(|| "list".into());
    if query == "list" {
        for (name, _, sql, what) in QUERIES {
            println!("{name}: {what}\n    {sql}");
        }
        return Ok(());
    }
    let events: u64 = args
        .next()
        .and_then(|a| a.replace('_', "").parse().ok())
        .unwrap_or(10_000_000);
    let workers: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()));
    let Some((name, sources, sql, _)) = QUERIES.iter().find(|q| q.0 == query) else {
        return Err(format!("unknown query {query}; try `nexmark list`").into());
    };
    let config = kappa_engine::EngineConfig {
        data_dir: std::env::var_os("KAPPA_DATA_DIR").map(Into::into),
        // KAPPA_CHECKPOINT_MS=0: no checkpoints; unset: the default interval.
        checkpoint_interval: match std::env::var("KAPPA_CHECKPOINT_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
            None => kappa_engine::EngineConfig::default().checkpoint_interval,
        },
        // KAPPA_STATE_MEMORY_MB=N (with KAPPA_DATA_DIR): spilled state, as
        // `kappa serve --state-memory-mb N`.
        state_memory: std::env::var("KAPPA_STATE_MEMORY_MB")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(|mb| mb << 20),
        // KAPPA_PARALLELISM=N: the view's shards (default: the cores).
        parallelism: std::env::var("KAPPA_PARALLELISM")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(kappa_engine::default_parallelism),
        ..Default::default()
    };
    let addr = kappa_sql_tests::start_kappa_with(config).await;
    let client = kappa_sql_tests::connect(addr).await;
    let start = Instant::now();
    for s in *sources {
        client
            .batch_execute(&source_ddl(s, events, workers))
            .await?;
    }
    client
        .batch_execute(&format!("CREATE MATERIALIZED VIEW \"{name}\" AS {sql}"))
        .await?;
    loop {
        let unfinished: i64 = client
            .query_one("SELECT count(*) FROM kappa_sources WHERE NOT finished", &[])
            .await?
            .get(0);
        if unfinished == 0 {
            break;
        }
        // Each poll plans and runs a query on the cores the dataflow uses: at 10 ms they
        // took about 5 % of the samples. 50 ms adds at most 0.05 s to a run.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = start.elapsed();
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM \"{name}\""), &[])
        .await?
        .get(0);
    let secs = elapsed.as_secs_f64();
    println!(
        "nexmark {name}: events={events} generator_workers={workers} time={secs:.2}s \
         throughput={:.2}M events/s view_rows={rows} peak_rss={:.0}MiB",
        events as f64 / secs / 1e6,
        peak_rss_mib()
    );
    if let Some(c) = kappa_sql_tests::checkpoint_report(&client).await {
        println!("nexmark {name}: {c}");
    }
    Ok(())
}
