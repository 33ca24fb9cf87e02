//! The `Source` contract: what the runtime needs from anything that feeds a relation from
//! outside the engine (a generator today; Kafka, Postgres CDC and files next).
//!
//! # Positions
//! A source is read in one or more *splits* (a Kafka partition, a replication slot, a
//! generator's single stream). Each split has a position that only the source interprets:
//! a partition's next offset, an LSN, a row count. A [`Position`] is the set of them. The
//! runtime stores positions as opaque bytes (in the history's epoch records and in
//! checkpoints) and hands them back: to [`Source::read_range`] to read an epoch again, to
//! [`Source::seek`] to continue after recovery, and to [`Source::checkpoint_durable`] once
//! a checkpoint that holds it cannot be lost.
//!
//! # Invariants
//! - Reading is deterministic: `read_range(p, q)` returns the same changes, in the same
//!   batches, as the polls that moved the source from `p` to `q` — this is what makes
//!   recovery and backfill exact.
//! - `position()` after a poll is the position right after the changes it returned.
//! - Positions from `earliest()` on can be read; a source that cannot replay its whole
//!   stream (a log with retention) says where it can start.

use datafusion::arrow::array::RecordBatch;
use kappa_common::{ChangeBatch, Envelope, KappaError, Result, SqlState};

use crate::ColumnSet;

/// Where a source stands: each split's opaque position, by split name (sorted).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    splits: Vec<(String, Vec<u8>)>,
}

impl Position {
    /// One split (named "") at a row count: a generator's position.
    pub fn rows(n: u64) -> Self {
        Self {
            splits: vec![(String::new(), n.to_le_bytes().to_vec())],
        }
    }

    /// A position of several splits.
    pub fn of(mut splits: Vec<(String, Vec<u8>)>) -> Self {
        splits.sort_by(|a, b| a.0.cmp(&b.0));
        Self { splits }
    }

    pub fn splits(&self) -> &[(String, Vec<u8>)] {
        &self.splits
    }

    /// The row count of a one-split position made by [`Position::rows`] (the start, 0, for
    /// an empty position).
    pub fn as_rows(&self) -> Result<u64> {
        match self.splits.as_slice() {
            [] => Ok(0),
            [(name, bytes)] if name.is_empty() => <[u8; 8]>::try_from(bytes.as_slice())
                .map(u64::from_le_bytes)
                .map_err(|_| damaged("a row count is not 8 bytes")),
            _ => Err(damaged("a generator's position has more than one split")),
        }
    }

    /// The bytes the runtime stores.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(self.splits.len() as u32).to_le_bytes());
        for (name, pos) in &self.splits {
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(pos.len() as u32).to_le_bytes());
            out.extend_from_slice(pos);
        }
        out
    }

    /// What [`Position::encode`] wrote (empty bytes: the empty position).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.is_empty() {
            return Ok(Self::default());
        }
        let mut rest = bytes;
        let mut take = |n: usize| -> Result<&[u8]> {
            if rest.len() < n {
                return Err(damaged("it is cut short"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let u32_of = |b: &[u8]| -> Result<usize> {
            <[u8; 4]>::try_from(b)
                .map(|a| u32::from_le_bytes(a) as usize)
                .map_err(|_| damaged("it is cut short"))
        };
        let n = u32_of(take(4)?)?;
        let mut splits = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            let len = u32_of(take(4)?)?;
            let name = std::str::from_utf8(take(len)?)
                .map_err(|_| damaged("a split name is not UTF-8"))?
                .to_string();
            let len = u32_of(take(4)?)?;
            splits.push((name, take(len)?.to_vec()));
        }
        if !rest.is_empty() {
            return Err(damaged("it has bytes after its last split"));
        }
        Ok(Self { splits })
    }
}

fn damaged(why: &str) -> KappaError {
    KappaError::user(
        SqlState::DATA_CORRUPTED,
        format!("a stored source position is damaged: {why}"),
    )
}

/// What one poll returned.
pub struct Poll {
    /// The changes, in order (all inserts for an append-only source).
    pub changes: Vec<ChangeBatch>,
    /// The stream has ended: nothing will ever follow.
    pub finished: bool,
}

impl Poll {
    /// Append-only batches as changes.
    pub fn inserts(batches: Vec<RecordBatch>, finished: bool) -> Self {
        Self {
            changes: batches.into_iter().map(ChangeBatch::inserts).collect(),
            finished,
        }
    }
}

/// A source of changes for one relation (see the module's documentation).
pub trait Source: Send {
    /// What the changes mean: append-only inserts, upserts by key, or a changelog with
    /// retractions. The planner takes it from here, never from the kind of relation.
    fn envelope(&self) -> Envelope {
        Envelope::AppendOnly
    }

    /// The position the next poll starts at.
    fn position(&self) -> Position;

    /// The earliest position the source can read from.
    fn earliest(&self) -> Position;

    /// What is available now, up to roughly `max_rows` rows, without waiting long.
    fn poll(&mut self, max_rows: usize) -> Result<Poll>;

    /// The changes between two positions (`from` before `to`), in the batches the polls
    /// that crossed them returned when `from` is where a poll began: an epoch read again in
    /// recovery, or the history a new view is filled from (`from` = `earliest()`).
    fn read_range(&self, from: &Position, to: &Position) -> Result<Vec<ChangeBatch>>;

    /// Continues at `to`: the next poll starts there (recovery, after the history).
    fn seek(&mut self, to: &Position) -> Result<()>;

    /// A checkpoint holding `at` (or a later position) is durable: nothing before it will
    /// be read again by recovery. Where Kafka commits its offsets and CDC acknowledges its
    /// LSN. Default: nothing to do.
    fn checkpoint_durable(&mut self, _at: &Position) -> Result<()> {
        Ok(())
    }

    /// Rows the stream holds between `earliest()` and `at`, when the source can tell
    /// (progress of a backfill); `None` when it cannot.
    fn rows_until(&self, _at: &Position) -> Option<u64> {
        None
    }

    /// Which of its schema's columns anyone reads: the views' scans and the watermark
    /// expression. It may leave the others unfilled ([`crate::unread_column`]), which
    /// spares generating or decoding them. Every batch handed out after this call, by any
    /// method, holds real values in every column of `read`. A source that ignores the call
    /// fills every column.
    fn set_columns_read(&mut self, _read: ColumnSet) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_refuse_damage() -> Result<()> {
        let p = Position::of(vec![
            ("2".into(), vec![9, 9]),
            ("10".into(), vec![]),
            ("1".into(), 77u64.to_le_bytes().to_vec()),
        ]);
        assert_eq!(p.splits()[0].0, "1", "sorted by split name");
        assert_eq!(Position::decode(&p.encode())?, p);
        assert_eq!(Position::decode(&[])?, Position::default());
        assert_eq!(Position::rows(12).as_rows()?, 12);
        assert_eq!(Position::default().as_rows()?, 0);
        let bytes = p.encode();
        for cut in 1..bytes.len() {
            assert!(Position::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(p.as_rows().is_err());
        Ok(())
    }
}
