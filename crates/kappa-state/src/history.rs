//! The history: Kappa's durable log, kept in RocksDB under `--data-dir`.
//!
//! Everything that changes what the engine holds is one record in it, in the order it
//! happened, numbered by a sequence number (`seq`, from 1):
//! - [`Record::Ddl`]: a statement that changed the catalog (CREATE/DROP), as SQL text;
//! - [`Record::Write`]: one statement's write to an engine table (rows deleted, rows
//!   inserted, as Arrow IPC);
//! - [`Record::Epoch`]: an epoch boundary. Every write before it (and after the previous one)
//!   is in that epoch; it carries what else the epoch depended on: its processing time
//!   (`now`), how far each source had been read, and which inputs were idle.
//!
//! Replaying the history through the same engine rebuilds the catalog, every table and every
//! view exactly: the dataflow is deterministic given its inputs, and the history records
//! every input including the epoch boundaries (see `docs/architecture.md`, "Durability").
//!
//! # Checkpoints and truncation
//! [`History::checkpoint`] stores, in one atomic write batch, the changes to every state
//! table since the previous checkpoint (`s` ‖ table name ‖ 0 ‖ key), the runtime's own small
//! state (`m/checkpoint`: the sequence number of the epoch record the state reflects, then
//! the runtime's encoding), and the deletion of every write and epoch record up to that
//! sequence number. DDL records are kept (`d` ‖ seq, apart from the others so the deletion
//! is one range): recovery runs the catalog's statements again, binding each relation to
//! its checkpointed state, and then replays only the records after the checkpoint.
//!
//! # Durability
//! A record is written to RocksDB's write-ahead log when [`History::append`] returns: it
//! survives the process being killed. [`History::sync`] makes every record up to a sequence
//! number survive a power failure too (an `fsync` of the log, shared by every writer waiting
//! at the same time: group commit); with `fsync` off it returns at once.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::ipc::reader::StreamReader;
use kappa_common::{KappaError, RelationId, Result, SqlState};

use crate::Bytes;
use crate::codec::ipc_bytes;

/// The key under which the format version is kept.
const FORMAT_KEY: &[u8] = b"m/format";
/// Bumped whenever what is stored changes meaning (3: a join's state is the log of its
/// inputs; 4: a source's position is the source's own bytes, not a row count), so an older
/// data directory is refused rather than misread.
const FORMAT: &[u8] = b"kappa-history-4";
/// Write and epoch records are keyed `h` ‖ seq (big-endian), so key order is sequence
/// order; DDL records `d` ‖ seq, in the same sequence.
const RECORD_PREFIX: u8 = b'h';
const DDL_PREFIX: u8 = b'd';
/// State tables' entries: `s` ‖ table name ‖ 0 ‖ key, in their own column family (so the
/// compaction of state never rewrites history records, and truncated history can be
/// dropped a file at a time).
const STATE_PREFIX: u8 = b's';
const STATE_CF: &str = "state";
/// The last checkpoint (in the state column family): seq (8 bytes, little-endian) ‖ the
/// runtime's encoding.
const CHECKPOINT_KEY: &[u8] = b"m/checkpoint";

const TAG_DDL: u8 = 1;
const TAG_WRITE: u8 = 2;
const TAG_EPOCH: u8 = 3;

/// One entry of the history.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Ddl(String),
    Write {
        table: RelationId,
        deletes: Option<RecordBatch>,
        inserts: Option<RecordBatch>,
    },
    Epoch(EpochRecord),
}

/// What an epoch depended on besides the writes before it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EpochRecord {
    /// The epoch's processing time (µs since the Unix epoch).
    pub now: i64,
    /// Every connector source's position after the epoch.
    pub sources: Vec<SourcePosition>,
    /// Inputs (tables and sources) that reported themselves idle.
    pub idle: Vec<RelationId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourcePosition {
    pub source: RelationId,
    /// Where the source stands after the epoch, as the source encodes it (opaque here).
    pub position: Vec<u8>,
    pub finished: bool,
}

#[derive(Default)]
pub struct HistoryOptions {
    /// `fsync` the log before a write is acknowledged.
    pub fsync: bool,
    /// Memory for RocksDB's block cache (state read back from disk) and write buffers;
    /// `None`: RocksDB's defaults.
    pub cache_bytes: Option<u64>,
}

pub struct History {
    db: rocksdb::DB,
    path: PathBuf,
    fsync: bool,
    /// The last sequence number written. Appends hold it while writing, so records reach
    /// the log in sequence order and everything up to it is in the log.
    tail: Mutex<u64>,
    /// Every record up to this one is on disk.
    synced: Mutex<u64>,
}

impl History {
    /// Opens (or creates) the history in `dir`. Refuses a directory that holds something
    /// else, or a database that is not a Kappa history or is damaged, saying what is wrong.
    pub fn open(dir: &Path, options: HistoryOptions) -> Result<Self> {
        let unusable = |why: String| {
            KappaError::user(
                SqlState::DATA_CORRUPTED,
                format!("the data directory {} cannot be used: {why}", dir.display()),
            )
        };
        std::fs::create_dir_all(dir).map_err(|e| unusable(format!("cannot create it: {e}")))?;
        let has_db = dir.join("CURRENT").exists();
        if !has_db {
            let mut entries =
                std::fs::read_dir(dir).map_err(|e| unusable(format!("cannot read it: {e}")))?;
            if entries.next().is_some() {
                return Err(unusable(
                    "it is not empty and holds no Kappa database (start with an empty or new directory)"
                        .into(),
                ));
            }
        }
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(!has_db);
        opts.create_missing_column_families(!has_db);
        opts.set_paranoid_checks(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        // The budget: a quarter for the write buffers of both families together (RocksDB
        // flushes the largest one when they pass it, each at most an eighth), three
        // quarters for the state's block cache.
        let state_blocks = options.cache_bytes.map(|bytes| {
            let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
            opts.set_db_write_buffer_size(bytes / 4);
            opts.set_write_buffer_size((bytes / 8).max(4 << 20));
            opts.set_max_write_buffer_number(2);
            let mut block = rocksdb::BlockBasedOptions::default();
            block.set_block_cache(&rocksdb::Cache::new_lru_cache(bytes / 4 * 3));
            // Index and filter blocks stay with their files (about 1.5 bytes per key), not in
            // the cache: a small cache would evict them and re-read them for every lookup.
            block.set_bloom_filter(10.0, false);
            block
        });
        let mut state = opts.clone();
        if let Some(block) = &state_blocks {
            state.set_block_based_table_factory(block);
        }
        if has_db {
            let families = rocksdb::DB::list_cf(&opts, dir).map_err(|e| unusable(e.to_string()))?;
            if !families.iter().any(|f| f == STATE_CF) {
                return Err(unusable(
                    "it is a RocksDB database but not Kappa's (or from an older version)".into(),
                ));
            }
        }
        let db = rocksdb::DB::open_cf_descriptors(
            &opts,
            dir,
            [
                rocksdb::ColumnFamilyDescriptor::new(
                    rocksdb::DEFAULT_COLUMN_FAMILY_NAME,
                    opts.clone(),
                ),
                rocksdb::ColumnFamilyDescriptor::new(STATE_CF, state),
            ],
        )
        .map_err(|e| unusable(e.to_string()))?;
        match db.get(FORMAT_KEY).map_err(|e| unusable(e.to_string()))? {
            Some(f) if f.as_slice() == FORMAT => {}
            Some(f) => {
                return Err(unusable(format!(
                    "it was written in format {:?}, this version reads {:?}",
                    String::from_utf8_lossy(&f),
                    String::from_utf8_lossy(FORMAT)
                )));
            }
            None if has_db => {
                return Err(unusable("it is a RocksDB database but not Kappa's".into()));
            }
            None => {
                let mut wo = rocksdb::WriteOptions::default();
                wo.set_sync(true);
                db.put_opt(FORMAT_KEY, FORMAT, &wo)
                    .map_err(|e| unusable(e.to_string()))?;
            }
        }
        let mut last = 0;
        for prefix in [RECORD_PREFIX, DDL_PREFIX] {
            let mut it = db.iterator(rocksdb::IteratorMode::From(
                &key_of(prefix, u64::MAX),
                rocksdb::Direction::Reverse,
            ));
            match it.next() {
                Some(Ok((k, _))) if k.first() == Some(&prefix) => last = last.max(seq_of(&k)?),
                Some(Err(e)) => return Err(unusable(e.to_string())),
                _ => {}
            }
        }
        // A checkpoint may have deleted every record after the last DDL statement.
        let cf = db
            .cf_handle(STATE_CF)
            .ok_or_else(|| unusable("its state column family is missing".into()))?;
        if let Some(cp) = db
            .get_cf(cf, CHECKPOINT_KEY)
            .map_err(|e| unusable(e.to_string()))?
        {
            last = last.max(checkpoint_seq(&cp).map_err(unusable)?);
        }
        Ok(Self {
            db,
            path: dir.to_path_buf(),
            fsync: options.fsync,
            tail: Mutex::new(last),
            synced: Mutex::new(last),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn fsync(&self) -> bool {
        self.fsync
    }

    /// Bytes the data directory holds (RocksDB's files: tables, write-ahead log, manifest).
    pub fn disk_bytes(&self) -> u64 {
        std::fs::read_dir(&self.path)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// The sequence number of the last record (0 when empty).
    pub fn last_seq(&self) -> u64 {
        self.tail.lock().map(|t| *t).unwrap_or(0)
    }

    pub fn append_ddl(&self, sql: &str) -> Result<u64> {
        let mut v = Vec::with_capacity(1 + sql.len());
        v.push(TAG_DDL);
        v.extend_from_slice(sql.as_bytes());
        self.append(DDL_PREFIX, &v)
    }

    pub fn append_write(
        &self,
        table: RelationId,
        deletes: Option<&RecordBatch>,
        inserts: Option<&RecordBatch>,
    ) -> Result<u64> {
        let mut v = vec![TAG_WRITE];
        v.extend_from_slice(&table.to_le_bytes());
        for b in [deletes, inserts] {
            match b {
                None => v.extend_from_slice(&0u64.to_le_bytes()),
                Some(b) => {
                    let ipc = ipc_bytes(b)?;
                    v.extend_from_slice(&(ipc.len() as u64).to_le_bytes());
                    v.extend_from_slice(&ipc);
                }
            }
        }
        self.append(RECORD_PREFIX, &v)
    }

    pub fn append_epoch(&self, e: &EpochRecord) -> Result<u64> {
        let mut v = vec![TAG_EPOCH];
        v.extend_from_slice(&e.now.to_le_bytes());
        v.extend_from_slice(&(e.sources.len() as u64).to_le_bytes());
        for s in &e.sources {
            v.extend_from_slice(&s.source.to_le_bytes());
            v.extend_from_slice(&(s.position.len() as u64).to_le_bytes());
            v.extend_from_slice(&s.position);
            v.push(u8::from(s.finished));
        }
        v.extend_from_slice(&(e.idle.len() as u64).to_le_bytes());
        for i in &e.idle {
            v.extend_from_slice(&i.to_le_bytes());
        }
        self.append(RECORD_PREFIX, &v)
    }

    fn append(&self, prefix: u8, value: &[u8]) -> Result<u64> {
        let mut tail = self
            .tail
            .lock()
            .map_err(|_| KappaError::internal("history lock poisoned"))?;
        let seq = *tail + 1;
        self.db
            .put(key_of(prefix, seq), value)
            .map_err(|e| storage_error("cannot write to the history", &e))?;
        *tail = seq;
        Ok(seq)
    }

    /// Returns once every record up to `seq` is on disk (with `fsync` on).
    pub fn sync(&self, seq: u64) -> Result<()> {
        if !self.fsync {
            return Ok(());
        }
        let mut synced = self
            .synced
            .lock()
            .map_err(|_| KappaError::internal("history sync lock poisoned"))?;
        if *synced >= seq {
            return Ok(());
        }
        // Everything written so far is covered by this fsync, also other writers' records:
        // they find `synced` past their own and return without an fsync of their own.
        let upto = self.last_seq();
        self.db
            .flush_wal(true)
            .map_err(|e| storage_error("cannot sync the history to disk", &e))?;
        *synced = upto;
        Ok(())
    }

    /// Every record with a sequence number of at least `from`, in order (DDL records and
    /// the others merged by sequence number).
    pub fn read_from(&self, from: u64) -> impl Iterator<Item = Result<(u64, Record)>> + '_ {
        let mut records = self.records(RECORD_PREFIX, from).peekable();
        let mut ddl = self.records(DDL_PREFIX, from).peekable();
        std::iter::from_fn(move || {
            let take_ddl = match (ddl.peek(), records.peek()) {
                (None, _) => false,
                (Some(_), None) => true,
                (Some(Ok((a, _))), Some(Ok((b, _)))) => a < b,
                (Some(Err(_)), _) => true,
                (_, Some(Err(_))) => false,
            };
            if take_ddl { ddl.next() } else { records.next() }
        })
    }

    /// The records under one prefix from `from` on.
    fn records(&self, prefix: u8, from: u64) -> impl Iterator<Item = Result<(u64, Record)>> + '_ {
        self.db
            .iterator(rocksdb::IteratorMode::From(
                &key_of(prefix, from),
                rocksdb::Direction::Forward,
            ))
            .take_while(move |item| {
                item.as_ref()
                    .map_or(true, |(k, _)| k.first() == Some(&prefix))
            })
            .map(|item| {
                let (k, v) = item.map_err(|e| storage_error("cannot read the history", &e))?;
                let seq = seq_of(&k)?;
                let record = decode(&v).map_err(|why| {
                    KappaError::user(
                        SqlState::DATA_CORRUPTED,
                        format!("history record {seq} is damaged: {why}"),
                    )
                })?;
                Ok((seq, record))
            })
    }

    /// The last checkpoint: the sequence number of the epoch record its state reflects, and
    /// the runtime's encoding of its own state then. `None` before the first.
    pub fn last_checkpoint(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let Some(v) = self
            .db
            .get_cf(self.state_cf()?, CHECKPOINT_KEY)
            .map_err(|e| storage_error("cannot read the last checkpoint", &e))?
        else {
            return Ok(None);
        };
        let seq = checkpoint_seq(&v).map_err(|why| {
            KappaError::user(
                SqlState::DATA_CORRUPTED,
                format!("the checkpoint is damaged: {why}"),
            )
        })?;
        Ok(Some((seq, v[8..].to_vec())))
    }

    /// A state table's entries as of the last checkpoint, in key order.
    pub fn load_state(&self, table: &str) -> Result<Vec<(Bytes, Bytes)>> {
        let prefix = state_key(table, &[]);
        let mut out = Vec::new();
        for item in self.db.iterator_cf(
            self.state_cf()?,
            rocksdb::IteratorMode::From(&prefix, rocksdb::Direction::Forward),
        ) {
            let (k, v) = item.map_err(|e| storage_error("cannot read checkpointed state", &e))?;
            let Some(key) = k.strip_prefix(prefix.as_slice()) else {
                break;
            };
            out.push((Bytes::from(key), Bytes::from(&*v)));
        }
        Ok(out)
    }

    /// A state table's stored entry (as of the last checkpoint written).
    pub(crate) fn state_get(&self, table: &str, key: &[u8]) -> Result<Option<Bytes>> {
        self.db
            .get_pinned_cf(self.state_cf()?, state_key(table, key))
            .map(|v| v.map(|v| Bytes::from(&*v)))
            .map_err(|e| storage_error("cannot read state", &e))
    }

    /// A state table's stored entries with keys in `[from, to)` (`to` `None`: to the end),
    /// in key order or (`reverse`) the opposite.
    pub(crate) fn state_range<'a>(
        &'a self,
        table: &str,
        from: &[u8],
        to: Option<&[u8]>,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(Bytes, Bytes)>> + 'a {
        let prefix = state_key(table, &[]);
        let lower = state_key(table, from);
        let upper = match to {
            Some(t) => state_key(table, t),
            // The table's end: its name's terminating 0 becomes 1.
            None => {
                let mut u = prefix.clone();
                if let Some(last) = u.last_mut() {
                    *last = 1;
                }
                u
            }
        };
        let mut ro = rocksdb::ReadOptions::default();
        ro.set_iterate_lower_bound(lower.clone());
        ro.set_iterate_upper_bound(upper);
        let mode = if reverse {
            rocksdb::IteratorMode::End
        } else {
            rocksdb::IteratorMode::Start
        };
        let items: Box<dyn Iterator<Item = _>> = match self.state_cf() {
            Ok(cf) => Box::new(self.db.iterator_cf_opt(cf, ro, mode).map(move |item| {
                let (k, v) = item.map_err(|e| storage_error("cannot read state", &e))?;
                let key = k.get(prefix.len()..).unwrap_or_default();
                Ok((Bytes::from(key), Bytes::from(&*v)))
            })),
            Err(e) => Box::new(std::iter::once(Err(e))),
        };
        items
    }

    fn state_cf(&self) -> Result<&rocksdb::ColumnFamily> {
        self.db
            .cf_handle(STATE_CF)
            .ok_or_else(|| KappaError::internal("the state column family is missing"))
    }

    /// Writes a checkpoint atomically (see the module docs): the state tables' changes, the
    /// tables dropped since the last one (every entry whose table name starts with one of
    /// `dropped`), the runtime's state `meta` as of epoch record `seq`, and the deletion of
    /// the write and epoch records up to `seq`. Returns the bytes written.
    pub fn checkpoint(&self, seq: u64, meta: &[u8], state: CheckpointState) -> Result<u64> {
        let cf = self.state_cf()?;
        let mut batch = rocksdb::WriteBatch::default();
        for prefix in &state.dropped {
            let from = state_key(prefix, &[]);
            // Without the name's terminating 0: every table whose name extends the prefix.
            let from = &from[..from.len() - 1];
            if let Some(to) = crate::prefix_end(from) {
                batch.delete_range_cf(cf, from, to.as_slice());
            }
        }
        for (table, changes) in state.tables {
            for (k, v) in changes {
                let key = state_key(&table, &k);
                match v {
                    Some(v) => batch.put_cf(cf, key, v),
                    None => batch.delete_cf(cf, key),
                }
            }
        }
        let mut cp = seq.to_le_bytes().to_vec();
        cp.extend_from_slice(meta);
        batch.put_cf(cf, CHECKPOINT_KEY, cp);
        let (from, to) = (
            key_of(RECORD_PREFIX, 0),
            key_of(RECORD_PREFIX, seq.saturating_add(1)),
        );
        batch.delete_range(from, to);
        let bytes = batch.size_in_bytes() as u64;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(self.fsync);
        self.db
            .write_opt(batch, &wo)
            .map_err(|e| storage_error("cannot write a checkpoint", &e))?;
        // The deleted records' files can go at once instead of waiting for a compaction to
        // read them (files that also hold later records stay until one does).
        if let Err(e) = self.db.delete_file_in_range(from, to) {
            tracing::warn!(error = %e, "cannot drop truncated history files");
        }
        Ok(bytes)
    }

    /// Test support: overwrites one entry of a state table as last checkpointed.
    #[doc(hidden)]
    pub fn overwrite_state(&self, table: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let cf = self
            .db
            .cf_handle(STATE_CF)
            .ok_or_else(|| KappaError::internal("the state column family is missing"))?;
        self.db
            .put_cf(cf, state_key(table, key), value)
            .map_err(|e| storage_error("cannot write state", &e))
    }

    /// Test support: overwrites the data directory's format marker.
    #[doc(hidden)]
    pub fn overwrite_format(&self, format: &[u8]) -> Result<()> {
        self.db
            .put(FORMAT_KEY, format)
            .map_err(|e| storage_error("cannot write the format marker", &e))
    }

    /// Test support: overwrites a record's stored bytes.
    #[doc(hidden)]
    pub fn overwrite_raw(&self, seq: u64, bytes: &[u8]) -> Result<()> {
        self.db
            .put(key_of(RECORD_PREFIX, seq), bytes)
            .map_err(|e| storage_error("cannot write to the history", &e))
    }
}

/// What a checkpoint writes besides the runtime's own state.
#[derive(Default)]
pub struct CheckpointState {
    /// Per state table (by name), its changes since the last checkpoint.
    pub tables: crate::TableChanges,
    /// Name prefixes of the state tables of relations dropped since the last checkpoint.
    pub dropped: Vec<String>,
}

fn state_key(table: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + table.len() + key.len());
    k.push(STATE_PREFIX);
    k.extend_from_slice(table.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

fn checkpoint_seq(v: &[u8]) -> std::result::Result<u64, String> {
    let b: [u8; 8] = v
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or("its sequence number is cut short")?;
    Ok(u64::from_le_bytes(b))
}

fn key_of(prefix: u8, seq: u64) -> [u8; 9] {
    let mut k = [prefix; 9];
    k[1..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn seq_of(key: &[u8]) -> Result<u64> {
    let b: [u8; 8] = key
        .get(1..9)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| {
            KappaError::user(
                SqlState::DATA_CORRUPTED,
                format!("the history holds a malformed key {key:?}"),
            )
        })?;
    Ok(u64::from_be_bytes(b))
}

/// Maps a RocksDB failure to an error that says what happened: a full disk is 53100, damage
/// XX001, anything else an I/O error (58030).
fn storage_error(what: &str, e: &rocksdb::Error) -> KappaError {
    let msg = e.to_string();
    let state = if msg.contains("No space left") {
        SqlState::DISK_FULL
    } else if e.kind() == rocksdb::ErrorKind::Corruption {
        SqlState::DATA_CORRUPTED
    } else {
        SqlState::IO_ERROR
    };
    KappaError::user(state, format!("{what}: {msg}"))
}

/// Reads fixed-size fields off the front of a record.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("{} bytes missing", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b: [u8; 8] = self.take(8)?.try_into().map_err(|_| "short field")?;
        Ok(u64::from_le_bytes(b))
    }

    fn len(&mut self) -> std::result::Result<usize, String> {
        let n = self.u64()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.0.len())
            .ok_or_else(|| format!("a length of {n} bytes runs past the record's end"))
    }

    fn batch(&mut self) -> std::result::Result<Option<RecordBatch>, String> {
        let n = self.len()?;
        if n == 0 {
            return Ok(None);
        }
        let bytes = self.take(n)?;
        let reader = StreamReader::try_new(Cursor::new(bytes), None).map_err(|e| e.to_string())?;
        let mut batches = vec![];
        for b in reader {
            batches.push(b.map_err(|e| e.to_string())?);
        }
        match batches.len() {
            1 => Ok(batches.pop()),
            n => Err(format!("a write holds {n} batches, not one")),
        }
    }
}

fn decode(v: &[u8]) -> std::result::Result<Record, String> {
    let (&tag, rest) = v.split_first().ok_or("it is empty")?;
    let mut f = Fields(rest);
    let record = match tag {
        TAG_DDL => {
            Record::Ddl(String::from_utf8(rest.to_vec()).map_err(|_| "its SQL text is not UTF-8")?)
        }
        TAG_WRITE => {
            let table = f.u64()?;
            let deletes = f.batch()?;
            let inserts = f.batch()?;
            Record::Write {
                table,
                deletes,
                inserts,
            }
        }
        TAG_EPOCH => {
            let now = f.u64()? as i64;
            let n = f.u64()?;
            let mut sources = vec![];
            for _ in 0..n {
                let source = f.u64()?;
                let len =
                    usize::try_from(f.u64()?).map_err(|_| "a position is too long".to_string())?;
                let position = f.take(len)?.to_vec();
                let finished = f.take(1)?[0] != 0;
                sources.push(SourcePosition {
                    source,
                    position,
                    finished,
                });
            }
            let n = f.u64()?;
            let mut idle = vec![];
            for _ in 0..n {
                idle.push(f.u64()?);
            }
            Record::Epoch(EpochRecord { now, sources, idle })
        }
        other => return Err(format!("unknown record type {other}")),
    };
    if tag != TAG_DDL && !f.0.is_empty() {
        return Err(format!("{} bytes too many", f.0.len()));
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(ids: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let names: StringArray = ids.iter().map(|i| Some(format!("n{i}"))).collect();
        RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(ids.to_vec())), Arc::new(names)],
        )
        .unwrap()
    }

    fn open(dir: &Path) -> Result<History> {
        History::open(
            dir,
            HistoryOptions {
                fsync: true,
                ..HistoryOptions::default()
            },
        )
    }

    fn all(h: &History) -> Vec<(u64, Record)> {
        h.read_from(0).collect::<Result<Vec<_>>>().unwrap()
    }

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kappa-history-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_come_back_in_order_after_reopening() {
        let dir = tempdir("order");
        let epoch = EpochRecord {
            now: 1_700_000_000_000_000,
            sources: vec![SourcePosition {
                source: 7,
                position: 30_000u64.to_le_bytes().to_vec(),
                finished: true,
            }],
            idle: vec![3, 7],
        };
        {
            let h = open(&dir).unwrap();
            assert_eq!(h.append_ddl("CREATE TABLE t (id BIGINT)").unwrap(), 1);
            let s = h.append_write(2, None, Some(&batch(&[1, 2]))).unwrap();
            h.sync(s).unwrap();
            h.append_write(2, Some(&batch(&[1])), Some(&batch(&[3])))
                .unwrap();
            let s = h.append_epoch(&epoch).unwrap();
            h.sync(s).unwrap();
        }
        let h = open(&dir).unwrap();
        assert_eq!(h.last_seq(), 4);
        assert_eq!(
            all(&h),
            vec![
                (1, Record::Ddl("CREATE TABLE t (id BIGINT)".into())),
                (
                    2,
                    Record::Write {
                        table: 2,
                        deletes: None,
                        inserts: Some(batch(&[1, 2]))
                    }
                ),
                (
                    3,
                    Record::Write {
                        table: 2,
                        deletes: Some(batch(&[1])),
                        inserts: Some(batch(&[3]))
                    }
                ),
                (4, Record::Epoch(epoch)),
            ]
        );
        // Appends continue after the last record.
        assert_eq!(h.append_ddl("DROP TABLE t").unwrap(), 5);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_checkpoint_keeps_state_and_ddl_and_deletes_the_records_it_covers() {
        let dir = tempdir("checkpoint");
        let b = |s: &[u8]| -> Bytes { Arc::from(s) };
        let changes = |name: &str, c: Vec<(Bytes, Option<Bytes>)>| -> (String, crate::Changes) {
            (name.into(), Box::new(c.into_iter()))
        };
        {
            let h = open(&dir).unwrap();
            h.append_ddl("CREATE TABLE t (id BIGINT)").unwrap(); // 1
            h.append_write(1, None, Some(&batch(&[1]))).unwrap(); // 2
            h.append_ddl("CREATE TABLE u (id BIGINT)").unwrap(); // 3
            h.append_epoch(&EpochRecord::default()).unwrap(); // 4
            let state = CheckpointState {
                tables: vec![
                    changes(
                        "t1.rows",
                        vec![(b(b"a"), Some(b(b"1"))), (b(b"b"), Some(b(b"2")))],
                    ),
                    changes("mv9.meta", vec![(b(b"x"), Some(b(b"y")))]),
                    changes("t10.rows", vec![(b(b"z"), Some(b(b"3")))]),
                ],
                dropped: vec![],
            };
            h.checkpoint(4, b"first", state).unwrap();
            h.append_write(1, None, Some(&batch(&[2]))).unwrap(); // 5
            h.append_epoch(&EpochRecord::default()).unwrap(); // 6
            let state = CheckpointState {
                tables: vec![changes(
                    "t1.rows",
                    vec![(b(b"a"), None), (b(b"c"), Some(b(b"4")))],
                )],
                // A dropped view's tables go; "mv9." must not take "mv90." with it.
                dropped: vec!["mv9.".into()],
            };
            h.checkpoint(6, b"second", state).unwrap();
            h.append_write(1, None, Some(&batch(&[3]))).unwrap(); // 7
        }
        let h = open(&dir).unwrap();
        assert_eq!(h.last_seq(), 7);
        assert_eq!(h.last_checkpoint().unwrap(), Some((6, b"second".to_vec())));
        assert_eq!(
            h.load_state("t1.rows").unwrap(),
            vec![(b(b"b"), b(b"2")), (b(b"c"), b(b"4"))]
        );
        assert!(h.load_state("mv9.meta").unwrap().is_empty());
        assert_eq!(h.load_state("t10.rows").unwrap(), vec![(b(b"z"), b(b"3"))]);
        // The DDL records stay; every other record up to the checkpoint is gone.
        let seqs: Vec<(u64, bool)> = all(&h)
            .into_iter()
            .map(|(s, r)| (s, matches!(r, Record::Ddl(_))))
            .collect();
        assert_eq!(seqs, vec![(1, true), (3, true), (7, false)]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_record_is_reported_with_its_number() {
        let dir = tempdir("damaged");
        let h = open(&dir).unwrap();
        h.append_ddl("CREATE TABLE t (id BIGINT)").unwrap();
        h.append_write(1, None, Some(&batch(&[1]))).unwrap();
        h.overwrite_raw(2, &[TAG_WRITE, 1, 2, 3]).unwrap();
        let r: Result<Vec<_>> = h.read_from(0).collect();
        let e = r.unwrap_err();
        assert_eq!(e.sqlstate(), SqlState::DATA_CORRUPTED);
        assert!(e.to_string().contains("history record 2 is damaged"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_directory_that_is_not_a_kappa_database_is_refused() {
        let dir = tempdir("foreign");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("notes.txt"), "mine").unwrap();
        let e = open(&dir).err().unwrap();
        assert!(e.to_string().contains("holds no Kappa database"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);

        // A database whose CURRENT file was damaged.
        let dir = tempdir("current");
        drop(open(&dir).unwrap());
        std::fs::write(dir.join("CURRENT"), "garbage").unwrap();
        let e = open(&dir).err().unwrap();
        assert_eq!(e.sqlstate(), SqlState::DATA_CORRUPTED);
        assert!(e.to_string().contains("cannot be used"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_second_server_on_the_same_directory_is_refused() {
        let dir = tempdir("locked");
        let _first = open(&dir).unwrap();
        let e = open(&dir).err().unwrap();
        assert!(e.to_string().contains("lock"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
