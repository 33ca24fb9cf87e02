//! Versioned on-disk formats: a data directory, or an operator's checkpointed state, written
//! in a format this build does not read is refused at start with both versions named, never
//! misread.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;
use common::Server;

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kappa-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// A data directory holding a table and a materialized view, checkpointed; the server is
/// killed after the checkpoint.
async fn checkpointed_dir(dir: &Path) {
    let server = Server::start(dir, &["--checkpoint-interval-ms", "100"]);
    let c = server.client().await;
    c.batch_execute(
        "CREATE TABLE t (k INT, v BIGINT);
         CREATE MATERIALIZED VIEW s AS SELECT k, sum(v) AS total FROM t GROUP BY k;
         INSERT INTO t VALUES (1, 10), (2, 20), (1, 5);
         FLUSH;",
    )
    .await
    .expect("set up");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = c
            .query_one(
                "SELECT checkpoints > 0 AND last_checkpoint_record = records FROM kappa_history",
                &[],
            )
            .await
            .expect("kappa_history")
            .get::<_, bool>(0);
        if done {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint was taken");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.kill();
}

/// Starts the server on `dir` expecting it to refuse; returns what it said.
fn refused(dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kappa"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .expect("run kappa");
    assert!(
        !out.status.success(),
        "the server accepted a directory it cannot read"
    );
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn history(dir: &Path) -> kappa_state::History {
    kappa_state::History::open(dir, kappa_state::HistoryOptions::default()).expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_in_another_format_is_refused_naming_both() {
    let dir = fresh_dir("format-dir");
    checkpointed_dir(&dir).await;
    history(&dir)
        .overwrite_format(b"kappa-history-3")
        .expect("alter the marker");
    let err = refused(&dir);
    assert!(
        err.contains("kappa-history-3") && err.contains("kappa-history-4"),
        "the message names both formats: {err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_state_in_another_format_is_refused_naming_both() {
    let dir = fresh_dir("format-op");
    checkpointed_dir(&dir).await;
    // The view is relation 2 (the table is 1); its node 0 claims state format 99.
    let mut e = kappa_state::codec::Encoder::new();
    e.u64(1).str("StreamScan").u64(99);
    history(&dir)
        .overwrite_state("mv2.meta", b"state_versions", &e.finish())
        .expect("alter the version");
    let err = refused(&dir);
    assert!(
        err.contains("state format 99") && err.contains("reads format 1"),
        "the message names both versions: {err}"
    );
    assert!(err.contains("\"s\""), "and the view: {err}");
    // Unaltered, the same directory starts and holds the view's rows.
    let dir2 = fresh_dir("format-ok");
    checkpointed_dir(&dir2).await;
    let server = Server::start(&dir2, &[]);
    let c = server.client().await;
    let rows = c
        .query("SELECT k, total FROM s ORDER BY k", &[])
        .await
        .expect("read the view");
    let got: Vec<(i32, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(1, 15), (2, 20)]);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}
