//! Many sessions at once: concurrent writers never lose or duplicate a write, and a reader
//! always sees every view at the same epoch (a consistent cut).

use kappa_sql_tests::{connect, start_kappa};

const WRITERS: i64 = 6;
const ROWS: i64 = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_and_a_consistent_reader() {
    let addr = start_kappa().await;
    let admin = connect(addr).await;
    admin
        .batch_execute(
            "CREATE TABLE t (id BIGINT PRIMARY KEY, writer BIGINT, v BIGINT);
             CREATE MATERIALIZED VIEW per_writer AS SELECT writer, count(*) AS n, sum(v) AS s FROM t GROUP BY writer;
             CREATE MATERIALIZED VIEW total_a AS SELECT count(*) AS n FROM t;
             CREATE MATERIALIZED VIEW total_b AS SELECT sum(n) AS n FROM per_writer;",
        )
        .await
        .expect("ddl");

    let mut tasks = vec![];
    for w in 0..WRITERS {
        tasks.push(tokio::spawn(async move {
            let c = connect(addr).await;
            for i in 0..ROWS {
                let id = w * 1_000_000 + i;
                c.execute("INSERT INTO t VALUES ($1, $2, $3)", &[&id, &w, &i])
                    .await
                    .expect("insert");
                if i % 10 == 9 {
                    // Move the row's value and back: net effect zero, but retractions flow.
                    c.batch_execute(&format!("UPDATE t SET v = v + 1000 WHERE id = {id}"))
                        .await
                        .expect("update");
                    c.batch_execute(&format!("UPDATE t SET v = v - 1000 WHERE id = {id}"))
                        .await
                        .expect("update");
                }
            }
        }));
    }
    let reader = tokio::spawn(async move {
        let c = connect(addr).await;
        let mut reads = 0;
        loop {
            // Two views over the same table, fed through different paths, must agree at
            // every committed epoch.
            let row = c
                .query_one(
                    "SELECT a.n, coalesce(b.n, 0) FROM total_a a CROSS JOIN total_b b",
                    &[],
                )
                .await
                .expect("read");
            let (a, b): (i64, i64) = (row.get(0), row.get(1));
            assert_eq!(a, b, "views seen at different epochs");
            reads += 1;
            if a == WRITERS * ROWS {
                return reads;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    });
    for t in tasks {
        t.await.expect("writer");
    }
    admin.batch_execute("FLUSH").await.expect("flush");
    let reads = reader.await.expect("reader");
    assert!(reads > 1);
    let rows = admin
        .query("SELECT writer, n, s FROM per_writer ORDER BY writer", &[])
        .await
        .expect("final");
    assert_eq!(rows.len() as i64, WRITERS);
    for (w, r) in rows.iter().enumerate() {
        let (writer, n, s): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        assert_eq!(writer, w as i64);
        assert_eq!(n, ROWS);
        assert_eq!(s, ROWS * (ROWS - 1) / 2);
    }
}
