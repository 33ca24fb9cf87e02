//! Prometheus metrics (`--metrics-listen ADDR`, `GET /metrics`, text format 0.0.4).
//!
//! The metrics are a listener of the runtime's commits: a task folds every epoch's delta
//! into counters (rows into and out of each view, epochs), and a scrape reads those with
//! the last commit's statistics (state entries, late rows, watermarks), the history's
//! checkpoint statistics and the process's memory. Names and labels are documented in
//! `docs/operations.md`.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use kappa_engine::Engine;
use kappa_runtime::{CommitDelta, ListenLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the commit listener has counted since the server started.
#[derive(Default)]
struct Counters {
    epochs: u64,
    /// Per relation, rows in its changes (a row with weight ±n counts once).
    changed_rows: HashMap<u64, u64>,
    /// The processing time of the last commit (µs), for freshness.
    last_commit_now: i64,
}

impl Counters {
    fn add(&mut self, d: &CommitDelta) {
        self.epochs += 1;
        self.last_commit_now = d.now;
        for (rel, changes) in &d.changes {
            let rows: u64 = changes.iter().map(|b| b.num_rows() as u64).sum();
            *self.changed_rows.entry(*rel).or_default() += rows;
        }
    }
}

/// Serves metrics on `listener` until the process ends.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    let counters = Arc::new(Mutex::new(Counters::default()));
    tokio::spawn(follow(engine.clone(), counters.clone()));
    loop {
        let (mut socket, _) = listener.accept().await?;
        let engine = engine.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            // A request line and headers; anything longer than 8 KiB is not a scrape.
            let mut buf = vec![0u8; 8192];
            let mut len = 0;
            while len < buf.len() {
                match socket.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let request = String::from_utf8_lossy(&buf[..len]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let response = if request.starts_with("GET ") && (path == "/metrics" || path == "/") {
                let body = render(&engine, &counters);
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".into()
            };
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        });
    }
}

/// Folds every commit into the counters. A listener dropped for falling behind (the
/// process starved of CPU) starts again: counters are then short of the missed epochs'
/// rows, which the log says.
async fn follow(engine: Arc<Engine>, counters: Arc<Mutex<Counters>>) {
    let limits = ListenLimits {
        epochs: 1 << 16,
        rows: u64::MAX,
    };
    loop {
        let (_, mut listening) = engine.runtime().listen(None, limits);
        loop {
            match listening.recv().await {
                Ok(d) => {
                    if let Ok(mut c) = counters.lock() {
                        c.add(&d);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the metrics listener stopped; starting again");
                    break;
                }
            }
        }
    }
}

/// One metric family: its HELP and TYPE lines, then its samples.
fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(out, "{name}{labels} {v}");
    }
}

/// A label set `{key="value"}`, the value escaped as the text format wants.
fn label(key: &str, value: &str) -> String {
    let v = value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n");
    format!("{{{key}=\"{v}\"}}")
}

fn render(engine: &Engine, counters: &Mutex<Counters>) -> String {
    let commit = engine.runtime().committed();
    let catalog = engine.catalog();
    let (epochs, rows, last_now) = match counters.lock() {
        Ok(c) => (c.epochs, c.changed_rows.clone(), c.last_commit_now),
        Err(_) => (0, HashMap::new(), 0),
    };
    let mut out = String::new();
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    family(
        &mut out,
        "kappa_epoch",
        "gauge",
        "The last committed epoch.",
        &[(String::new(), commit.epoch as f64)],
    );
    family(
        &mut out,
        "kappa_epochs_total",
        "counter",
        "Epochs committed since the server started.",
        &[(String::new(), epochs as f64)],
    );
    family(
        &mut out,
        "kappa_commit_age_seconds",
        "gauge",
        "Wall-clock time since the last committed epoch began.",
        &[(
            String::new(),
            if last_now > 0 {
                (wall - last_now as f64 / 1e6).max(0.0)
            } else {
                0.0
            },
        )],
    );
    let mut views: Vec<_> = catalog
        .relations()
        .filter_map(|r| commit.delta.view_stats.get(&r.id).map(|s| (r, s)))
        .collect();
    views.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    let per_view = |f: &dyn Fn(&kappa_sql::catalog::Relation, &kappa_runtime::ViewStats) -> f64| {
        views
            .iter()
            .map(|(r, s)| (label("view", &r.name), f(r, s)))
            .collect::<Vec<_>>()
    };
    family(
        &mut out,
        "kappa_view_committed_epoch",
        "gauge",
        "The epoch a materialized view last committed.",
        &per_view(&|_, _| commit.epoch as f64),
    );
    family(
        &mut out,
        "kappa_view_rows_out_total",
        "counter",
        "Change rows a materialized view emitted since the server started.",
        &per_view(&|r, _| rows.get(&r.id).copied().unwrap_or(0) as f64),
    );
    family(
        &mut out,
        "kappa_view_rows_in_total",
        "counter",
        "Change rows of the relations a materialized view reads, since the server started.",
        &per_view(&|r, _| {
            r.depends_on
                .iter()
                .map(|d| rows.get(d).copied().unwrap_or(0))
                .sum::<u64>() as f64
        }),
    );
    family(
        &mut out,
        "kappa_view_state_entries",
        "gauge",
        "Entries in a materialized view's operator state (its contents excluded).",
        &per_view(&|_, s| s.state_entries as f64),
    );
    family(
        &mut out,
        "kappa_view_late_rows_total",
        "counter",
        "Late changes a materialized view dropped since it was created.",
        &per_view(&|_, s| s.late_rows as f64),
    );
    family(
        &mut out,
        "kappa_view_watermark_seconds",
        "gauge",
        "A materialized view's output watermark (event time, seconds since 1970; absent without one).",
        &views
            .iter()
            .filter_map(|(r, s)| {
                s.watermark
                    .filter(|&w| w != i64::MAX)
                    .map(|w| (label("view", &r.name), w as f64 / 1e6))
            })
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "kappa_view_failed",
        "gauge",
        "1 if a materialized view stopped updating because its dataflow failed.",
        &per_view(&|_, s| f64::from(u8::from(s.failure.is_some()))),
    );
    let mut sources: Vec<_> = catalog
        .relations()
        .filter_map(|r| commit.delta.source_stats.get(&r.id).map(|s| (r, s)))
        .collect();
    sources.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    family(
        &mut out,
        "kappa_source_rows_total",
        "counter",
        "Rows a source delivered (its position).",
        &sources
            .iter()
            .map(|(r, s)| (label("source", &r.name), s.rows as f64))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "kappa_source_finished",
        "gauge",
        "1 once a bounded source has delivered all its rows.",
        &sources
            .iter()
            .map(|(r, s)| (label("source", &r.name), f64::from(u8::from(s.finished))))
            .collect::<Vec<_>>(),
    );
    family(
        &mut out,
        "kappa_subscriptions",
        "gauge",
        "Listeners following the commits (SUBSCRIBE sessions; the metrics' own is not counted).",
        &[(
            String::new(),
            engine.runtime().listeners().saturating_sub(1) as f64,
        )],
    );
    if let Some(h) = engine.runtime().history_info() {
        let c = &h.checkpoints;
        family(
            &mut out,
            "kappa_checkpoints_total",
            "counter",
            "Checkpoints written since the server started.",
            &[(String::new(), c.count as f64)],
        );
        family(
            &mut out,
            "kappa_checkpoint_last_duration_seconds",
            "gauge",
            "How long the last checkpoint took (collecting its changes and writing them).",
            &[(String::new(), c.last_ms / 1e3)],
        );
        family(
            &mut out,
            "kappa_checkpoint_max_duration_seconds",
            "gauge",
            "The longest checkpoint since the server started.",
            &[(String::new(), c.max_ms / 1e3)],
        );
        family(
            &mut out,
            "kappa_checkpoint_last_bytes",
            "gauge",
            "The size of the last checkpoint's write batch.",
            &[(String::new(), c.last_bytes as f64)],
        );
        family(
            &mut out,
            "kappa_history_disk_bytes",
            "gauge",
            "Bytes the data directory's database takes on disk.",
            &[(String::new(), h.disk_bytes as f64)],
        );
    }
    if let Some(rss) = resident_bytes() {
        family(
            &mut out,
            "kappa_process_resident_memory_bytes",
            "gauge",
            "The server's resident memory.",
            &[(String::new(), rss as f64)],
        );
    }
    out
}

/// Resident memory from /proc (Linux); `None` elsewhere.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("view", "a\"b\\c"), "{view=\"a\\\"b\\\\c\"}");
        let mut out = String::new();
        family(&mut out, "m", "gauge", "Help.", &[(label("v", "x"), 2.0)]);
        assert_eq!(out, "# HELP m Help.\n# TYPE m gauge\nm{v=\"x\"} 2\n");
    }
}
