//! COPY FROM STDIN through a real client: text and CSV formats feed the table and its views;
//! a bad record or a duplicate key fails the whole COPY and writes nothing.

use bytes::Bytes;
use futures::SinkExt;
use kappa_sql_tests::{DbError, connect, start_kappa};
use tokio_postgres::Client;

async fn copy(client: &Client, stmt: &str, data: &str) -> Result<u64, DbError> {
    let sink = client.copy_in(stmt).await?;
    let mut sink = Box::pin(sink);
    sink.send(Bytes::from(data.to_string())).await?;
    Ok(sink.as_mut().finish().await?)
}

async fn count_and_sum(client: &Client) -> (i64, f64) {
    let r = client
        .query_one("SELECT n, coalesce(s, 0) FROM totals", &[])
        .await
        .expect("read view");
    (r.get(0), r.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_text_and_csv_atomically() {
    let addr = start_kappa().await;
    let c = connect(addr).await;
    c.batch_execute(
        "CREATE TABLE c (a BIGINT PRIMARY KEY, b TEXT, d DOUBLE);
         CREATE MATERIALIZED VIEW totals AS SELECT count(*) AS n, sum(d) AS s FROM c;",
    )
    .await
    .expect("ddl");

    let n = copy(&c, "COPY c FROM STDIN", "1\tx\t1.5\n2\t\\N\t2\n")
        .await
        .expect("text copy");
    assert_eq!(n, 2);
    let n = copy(
        &c,
        "COPY c FROM STDIN WITH (FORMAT csv, HEADER true)",
        "a,b,d\n3,\"q,r\",3\n",
    )
    .await
    .expect("csv copy");
    assert_eq!(n, 1);
    assert_eq!(count_and_sum(&c).await, (3, 6.5));
    let row = c
        .query_one("SELECT b FROM c WHERE a = 3", &[])
        .await
        .expect("row");
    assert_eq!(row.get::<_, String>(0), "q,r");
    let row = c
        .query_one("SELECT b IS NULL FROM c WHERE a = 2", &[])
        .await
        .expect("row");
    assert!(row.get::<_, bool>(0));

    let e = copy(&c, "COPY c FROM STDIN", "4\ty\t7\n5\tz\tnot-a-number\n")
        .await
        .unwrap_err();
    assert!(e.0.starts_with("22P02"), "{e}");
    let e = copy(&c, "COPY c FROM STDIN", "6\ty\t7\n1\tdup\t1\n")
        .await
        .unwrap_err();
    assert!(e.0.starts_with("23505"), "{e}");
    let e = copy(&c, "COPY c FROM STDIN", "7\ty\n").await.unwrap_err();
    assert!(e.0.starts_with("22P04"), "{e}");
    let e = copy(&c, "COPY c FROM STDIN WITH (FORMAT csv)", "8,\"open,1\n")
        .await
        .unwrap_err();
    assert!(e.0.starts_with("22P04"), "{e}");
    // None of the failed COPYs wrote anything; the connection is still usable.
    assert_eq!(count_and_sum(&c).await, (3, 6.5));
    let n = copy(&c, "COPY c (d, a) FROM STDIN", "10\t9\n")
        .await
        .expect("column list");
    assert_eq!(n, 1);
    assert_eq!(count_and_sum(&c).await, (4, 16.5));
}
