//! The `Sink` contract, and the file sink.
//!
//! # Exactly once
//! A sink receives a view's changes epoch by epoch, from the runtime's epoch loop, in
//! order. The runtime's state is a deterministic function of its history, and recovery
//! replays every epoch after the last checkpoint, so a sink sees those epochs again after
//! a crash. Exactly-once output therefore needs only this:
//! 1. [`Sink::write`] an epoch's changes (buffered; not yet durable);
//! 2. at a checkpoint, [`Sink::pre_commit`] makes everything written so far durable and
//!    returns a small token (a file length, a transaction id) that the runtime stores *in*
//!    the checkpoint;
//! 3. once the checkpoint is durable, [`Sink::commit`] (a Kafka transaction commits here);
//! 4. after a crash, the sink is started with the token of the last durable checkpoint
//!    ([`Sink::start`]) and discards what it wrote after it; the replay then writes those
//!    epochs again, identically.
//!
//! So the output holds each epoch's changes once: up to the checkpoint from before the
//! crash, after it from the replay.

use std::collections::BTreeMap;
use std::io::{BufWriter, Seek, Write};
use std::path::PathBuf;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use kappa_common::{ChangeBatch, Epoch, KappaError, Result, SqlState};

/// Where a view's changes go (see the module's documentation for the protocol).
pub trait Sink: Send {
    /// Opens the sink. `resume`: what [`Sink::pre_commit`] returned for the last durable
    /// checkpoint, when the sink is restored from one: anything written after it is
    /// discarded. `None`: the sink starts empty (it is new, or recovery replays it from
    /// its creation).
    fn start(&mut self, resume: Option<&[u8]>) -> Result<()>;

    /// Writes epoch `epoch`'s changes (after the view committed them).
    fn write(&mut self, epoch: Epoch, changes: &[ChangeBatch]) -> Result<()>;

    /// Makes everything written up to now durable, before the checkpoint that holds
    /// `epoch` is written; returns the token the checkpoint stores.
    fn pre_commit(&mut self, epoch: Epoch) -> Result<Vec<u8>>;

    /// The checkpoint holding `token` is durable. Default: nothing to do.
    fn commit(&mut self, _token: &[u8]) -> Result<()> {
        Ok(())
    }
}

/// How the file sink writes a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileFormat {
    /// One JSON object per line: `{"kappa_epoch":…,"kappa_diff":…,<columns>}`.
    Jsonl,
    /// One CSV record per line: `kappa_epoch,kappa_diff,<columns>`, no header.
    Csv,
}

/// `CREATE SINK … WITH (connector = 'file', path = …, format = 'jsonl' | 'csv')`: a file
/// of one line per changed row, with the epoch and the row's weight.
pub struct FileSink {
    path: PathBuf,
    format: FileFormat,
    /// `kappa_epoch, kappa_diff, <the view's columns>`.
    schema: SchemaRef,
    out: Option<BufWriter<std::fs::File>>,
}

/// The options the file sink takes (besides `connector` and `snapshot`).
const FILE_OPTIONS: &[&str] = &["path", "format", "snapshot"];

impl FileSink {
    /// Builds the sink of `columns` from its options; refuses unknown options and a
    /// format it does not write.
    pub fn new(options: &BTreeMap<String, String>, columns: &Schema) -> Result<Self> {
        crate::check_known(options, FILE_OPTIONS)?;
        let path = options.get("path").ok_or_else(|| {
            KappaError::user(
                SqlState::INVALID_PARAMETER_VALUE,
                "the file sink needs WITH (path = '…')",
            )
        })?;
        let format = match options.get("format").map(|f| f.to_lowercase()).as_deref() {
            None | Some("jsonl") | Some("json") => FileFormat::Jsonl,
            Some("csv") => FileFormat::Csv,
            Some(other) => {
                return Err(KappaError::user(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("the file sink writes format 'jsonl' or 'csv', not '{other}'"),
                ));
            }
        };
        Ok(Self {
            path: PathBuf::from(path),
            format,
            schema: change_schema(columns),
            out: None,
        })
    }

    fn io(&self, what: &str, e: std::io::Error) -> KappaError {
        let state = if e.kind() == std::io::ErrorKind::StorageFull {
            SqlState::DISK_FULL
        } else {
            SqlState::IO_ERROR
        };
        KappaError::user(
            state,
            format!("file sink {}: cannot {what}: {e}", self.path.display()),
        )
    }

    fn lines(&self, epoch: Epoch, change: &ChangeBatch) -> Result<Vec<u8>> {
        let n = change.num_rows();
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from_value(epoch as i64, n)),
            Arc::new(change.weights().clone()),
        ];
        cols.extend(change.data().columns().iter().cloned());
        let batch = RecordBatch::try_new(self.schema.clone(), cols)?;
        let mut buf = Vec::new();
        match self.format {
            FileFormat::Jsonl => {
                let mut w = datafusion::arrow::json::WriterBuilder::new()
                    .with_explicit_nulls(true)
                    .build::<_, datafusion::arrow::json::writer::LineDelimited>(&mut buf);
                w.write(&batch)?;
                w.finish()?;
            }
            FileFormat::Csv => {
                let mut w = datafusion::arrow::csv::WriterBuilder::new()
                    .with_header(false)
                    .build(&mut buf);
                w.write(&batch)?;
            }
        }
        Ok(buf)
    }
}

/// The schema of a change line: the epoch, the weight, then the view's columns.
fn change_schema(columns: &Schema) -> SchemaRef {
    let mut fields = vec![
        Field::new("kappa_epoch", DataType::Int64, false),
        Field::new("kappa_diff", DataType::Int64, false),
    ];
    fields.extend(columns.fields().iter().map(|f| f.as_ref().clone()));
    Arc::new(Schema::new(fields))
}

impl Sink for FileSink {
    fn start(&mut self, resume: Option<&[u8]>) -> Result<()> {
        let keep = match resume {
            Some(token) => <[u8; 8]>::try_from(token)
                .map(u64::from_le_bytes)
                .map_err(|_| {
                    KappaError::user(
                        SqlState::DATA_CORRUPTED,
                        format!(
                            "file sink {}: the checkpoint's length is damaged",
                            self.path.display()
                        ),
                    )
                })?,
            None => 0,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&self.path)
            .map_err(|e| self.io("open it", e))?;
        let len = file
            .metadata()
            .map_err(|e| self.io("read its length", e))?
            .len();
        if len < keep {
            return Err(KappaError::user(
                SqlState::DATA_CORRUPTED,
                format!(
                    "file sink {}: the file holds {len} bytes, fewer than the {keep} the last checkpoint wrote (it was changed outside Kappa)",
                    self.path.display()
                ),
            ));
        }
        // What was written after the checkpoint is written again by the replay.
        file.set_len(keep).map_err(|e| self.io("truncate it", e))?;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| self.io("seek to its end", e))?;
        self.out = Some(BufWriter::with_capacity(1 << 16, file));
        Ok(())
    }

    fn write(&mut self, epoch: Epoch, changes: &[ChangeBatch]) -> Result<()> {
        for c in changes.iter().filter(|c| c.num_rows() > 0) {
            let lines = self.lines(epoch, c)?;
            let r = match self.out.as_mut() {
                Some(out) => out.write_all(&lines),
                None => return Err(KappaError::internal("a file sink written before start")),
            };
            r.map_err(|e| self.io("write", e))?;
        }
        // To the operating system at every epoch, so that readers of the file see it
        // promptly; durable only at `pre_commit`.
        let r = match self.out.as_mut() {
            Some(out) => out.flush(),
            None => Ok(()),
        };
        r.map_err(|e| self.io("write", e))
    }

    fn pre_commit(&mut self, _epoch: Epoch) -> Result<Vec<u8>> {
        let Some(out) = self.out.as_mut() else {
            return Err(KappaError::internal("a file sink committed before start"));
        };
        let r = out.flush().and_then(|()| {
            let f = out.get_ref();
            f.sync_data()?;
            f.metadata().map(|m| m.len())
        });
        let len = r.map_err(|e| self.io("make it durable", e))?;
        Ok(len.to_le_bytes().to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes(rows: &[(i64, &str, i64)]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let data = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(datafusion::arrow::array::StringArray::from_iter(
                    rows.iter().map(|r| (!r.1.is_empty()).then_some(r.1)),
                )),
            ],
        )
        .expect("batch");
        ChangeBatch::new(data, rows.iter().map(|r| r.2).collect()).expect("changes")
    }

    fn sink(path: &std::path::Path, format: &str) -> FileSink {
        let options = BTreeMap::from([
            ("connector".to_string(), "file".to_string()),
            ("path".to_string(), path.display().to_string()),
            ("format".to_string(), format.to_string()),
        ]);
        let columns = Schema::new(vec![
            Field::new("k", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]);
        FileSink::new(&options, &columns).expect("sink")
    }

    #[test]
    fn lines_carry_epoch_and_weight_and_a_restart_drops_what_followed_the_checkpoint() -> Result<()>
    {
        let dir = std::env::temp_dir().join(format!("kappa-file-sink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| KappaError::internal(e.to_string()))?;
        let path = dir.join("out.jsonl");
        let mut s = sink(&path, "jsonl");
        s.start(None)?;
        s.write(3, &[changes(&[(1, "a", 1), (2, "", 2)])])?;
        let token = s.pre_commit(3)?;
        s.write(4, &[changes(&[(1, "a", -1)])])?;
        s.pre_commit(4)?;
        let text =
            std::fs::read_to_string(&path).map_err(|e| KappaError::internal(e.to_string()))?;
        assert_eq!(
            text,
            "{\"kappa_epoch\":3,\"kappa_diff\":1,\"k\":1,\"name\":\"a\"}\n\
             {\"kappa_epoch\":3,\"kappa_diff\":2,\"k\":2,\"name\":null}\n\
             {\"kappa_epoch\":4,\"kappa_diff\":-1,\"k\":1,\"name\":\"a\"}\n"
        );
        // Restored from the checkpoint of epoch 3: epoch 4 is gone until it is replayed.
        let mut s = sink(&path, "jsonl");
        s.start(Some(&token))?;
        let text =
            std::fs::read_to_string(&path).map_err(|e| KappaError::internal(e.to_string()))?;
        assert_eq!(text.lines().count(), 2);
        // A file shorter than the checkpoint says was changed behind Kappa's back.
        std::fs::write(&path, b"x").map_err(|e| KappaError::internal(e.to_string()))?;
        assert!(sink(&path, "jsonl").start(Some(&token)).is_err());
        // CSV: the same columns, no header.
        let csv = dir.join("out.csv");
        let mut s = sink(&csv, "csv");
        s.start(None)?;
        s.write(7, &[changes(&[(5, "x,y", -1)])])?;
        s.pre_commit(7)?;
        assert_eq!(
            std::fs::read_to_string(&csv).map_err(|e| KappaError::internal(e.to_string()))?,
            "7,-1,5,\"x,y\"\n"
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    }

    #[test]
    fn options_are_checked() {
        let columns = Schema::new(vec![Field::new("k", DataType::Int64, false)]);
        let opts = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(FileSink::new(&opts(&[("connector", "file")]), &columns).is_err());
        assert!(
            FileSink::new(
                &opts(&[("connector", "file"), ("path", "/tmp/x"), ("format", "xml")]),
                &columns
            )
            .is_err()
        );
        assert!(
            FileSink::new(
                &opts(&[("connector", "file"), ("path", "/tmp/x"), ("colour", "red")]),
                &columns
            )
            .is_err()
        );
    }
}
