//! Runs every `.slt` file under `sql-tests/slt/`, each against its own fresh server, once
//! with views in one shard and once in two (keyed parallelism).
//! `KAPPA_SLT=text` runs only the files whose path contains `text`.

use std::path::PathBuf;

fn slt_files() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("slt");
    let mut out = vec![];
    let mut dirs = vec![root];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).expect("read slt dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "slt") {
                out.push(p);
            }
        }
    }
    if let Ok(only) = std::env::var("KAPPA_SLT") {
        out.retain(|p| p.to_string_lossy().contains(&only));
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqllogictest_files() {
    let files = slt_files();
    assert!(!files.is_empty(), "no .slt files found");
    let mut failures = vec![];
    for f in &files {
        // Every file in one shard and in two: the results must not depend on it.
        for parallelism in [1, 2] {
            match kappa_sql_tests::run_slt_file(f, parallelism).await {
                Ok(()) => eprintln!("ok   {} (parallelism {parallelism})", f.display()),
                Err(e) => {
                    eprintln!("FAIL {} (parallelism {parallelism})\n{e}", f.display());
                    failures.push(format!("{} (parallelism {parallelism})", f.display()));
                }
            }
        }
    }
    assert!(failures.is_empty(), "failing .slt files: {failures:?}");
}
