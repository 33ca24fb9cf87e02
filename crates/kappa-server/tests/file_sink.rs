//! The file sink under repeated `kill -9`: after every restart the file holds each epoch's
//! changes exactly once (epochs never go back in the file, as a repeated epoch would), and
//! its fold equals the view and an oracle of the acknowledged writes.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

mod common;
use common::Server;

fn start(dir: &std::path::Path) -> Server {
    Server::start(dir, &["--checkpoint-interval-ms", "150", "--fsync", "off"])
}

/// The view `SELECT k, count(*), sum(x) FROM t GROUP BY k` of the model, as (k, n, s) → 1.
fn oracle(model: &HashMap<i64, (i64, i64)>) -> BTreeMap<(i64, i64, i64), i64> {
    let mut agg: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
    for &(k, x) in model.values() {
        let e = agg.entry(k).or_default();
        e.0 += 1;
        e.1 += x;
    }
    agg.into_iter().map(|(k, (n, s))| ((k, n, s), 1)).collect()
}

/// The sink's file: checks the epochs never go back, and folds the diffs.
fn fold_file(path: &std::path::Path) -> BTreeMap<(i64, i64, i64), i64> {
    let text = std::fs::read_to_string(path).expect("the sink's file");
    let mut fold: BTreeMap<(i64, i64, i64), i64> = BTreeMap::new();
    let mut last_epoch = 0;
    for line in text.lines() {
        let f: Vec<i64> = line
            .split(',')
            .map(|v| v.parse().expect("an integer"))
            .collect();
        assert_eq!(f.len(), 5, "{line}");
        assert!(
            f[0] >= last_epoch,
            "epoch {} after epoch {last_epoch}: an epoch written twice",
            f[0]
        );
        last_epoch = f[0];
        *fold.entry((f[2], f[3], f[4])).or_default() += f[1];
    }
    fold.retain(|_, n| *n != 0);
    assert!(
        fold.values().all(|&n| n > 0),
        "more retracted than inserted"
    );
    fold
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_sink_holds_every_epoch_once_across_sigkill() {
    let base = std::env::temp_dir().join(format!("kappa-sink-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).expect("temp dir");
    let dir = base.join("data");
    let out = base.join("out.csv");
    let mut server = start(&dir);
    let c = server.client().await;
    c.batch_execute(&format!(
        "CREATE TABLE t (id BIGINT PRIMARY KEY, k BIGINT, x BIGINT);
         CREATE MATERIALIZED VIEW v AS SELECT k, count(*) AS n, sum(x) AS s FROM t GROUP BY k;
         INSERT INTO t VALUES (1, 1, 10), (2, 2, 20), (3, 1, 5);
         CREATE SINK out FROM v WITH (connector = 'file', path = '{}', format = 'csv');",
        out.display()
    ))
    .await
    .expect("set up");
    // A second sink on the same path is refused: it would overwrite the first one's output.
    let again = c
        .batch_execute(&format!(
            "CREATE SINK out2 FROM v WITH (connector = 'file', path = '{}')",
            out.display()
        ))
        .await;
    assert!(again.is_err());
    let mut model: HashMap<i64, (i64, i64)> =
        HashMap::from([(1, (1, 10)), (2, (2, 20)), (3, (1, 5))]);
    let mut next_id = 4;
    let mut rng = rand::rngs::StdRng::seed_from_u64(20261207);
    drop(c);
    for cycle in 0..8 {
        let c = server.client().await;
        let until = Instant::now() + Duration::from_millis(rng.gen_range(100..600));
        while Instant::now() < until {
            let sql = match rng.gen_range(0..10) {
                0..5 => {
                    let (id, k, x) = (next_id, rng.gen_range(0..5), rng.gen_range(-9..10));
                    next_id += 1;
                    model.insert(id, (k, x));
                    format!("INSERT INTO t VALUES ({id}, {k}, {x})")
                }
                5..8 if !model.is_empty() => {
                    let ids: Vec<i64> = model.keys().copied().collect();
                    let id = ids[rng.gen_range(0..ids.len())];
                    let x = rng.gen_range(-9..10);
                    if let Some(row) = model.get_mut(&id) {
                        row.1 = x;
                    }
                    format!("UPDATE t SET x = {x} WHERE id = {id}")
                }
                _ if !model.is_empty() => {
                    let ids: Vec<i64> = model.keys().copied().collect();
                    let id = ids[rng.gen_range(0..ids.len())];
                    model.remove(&id);
                    format!("DELETE FROM t WHERE id = {id}")
                }
                _ => continue,
            };
            c.batch_execute(&sql).await.expect("write");
        }
        drop(c);
        // SIGKILL at whatever the server is doing: an epoch, a checkpoint, a sink write.
        server.kill();
        server = start(&dir);
        let c = server.client().await;
        c.batch_execute("FLUSH").await.expect("flush");
        let view: BTreeMap<(i64, i64, i64), i64> = c
            .query("SELECT k, n, s FROM v", &[])
            .await
            .expect("read v")
            .iter()
            .map(|r| ((r.get(0), r.get(1), r.get(2)), 1))
            .collect();
        assert_eq!(view, oracle(&model), "cycle {cycle}: the view");
        // The file catches up with the view within an epoch or two of the FLUSH.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let fold = fold_file(&out);
            if fold == view {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "cycle {cycle}: the file's fold {fold:?} is not the view {view:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // DROP SINK stops it; its file stays as it was.
    let c = server.client().await;
    let before = std::fs::read_to_string(&out).expect("file");
    c.batch_execute("DROP SINK out; INSERT INTO t VALUES (-1, 1, 1); FLUSH;")
        .await
        .expect("drop the sink");
    assert_eq!(std::fs::read_to_string(&out).expect("file"), before);
    drop(server);
    let _ = std::fs::remove_dir_all(&base);
}
