//! A small binary encoding for the scalars a checkpoint keeps beside the state tables
//! (watermarks, counters, positions). Integers are little-endian and fixed-size; a damaged
//! or short encoding is reported as data corruption (XX001), never a panic.

use datafusion::arrow::array::RecordBatch;
use kappa_common::{KappaError, Result, SqlState};

/// One batch as an Arrow IPC stream.
pub fn ipc_bytes(batch: &RecordBatch) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut w =
        datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, batch.schema_ref())?;
    w.write(batch)?;
    w.finish()?;
    drop(w);
    Ok(out)
}

/// The one batch of an Arrow IPC stream that [`ipc_bytes`] wrote.
pub fn ipc_batch(bytes: &[u8]) -> Result<RecordBatch> {
    let damaged = |why: String| {
        KappaError::user(
            SqlState::DATA_CORRUPTED,
            format!("a stored batch is damaged: {why}"),
        )
    };
    let reader =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| damaged(e.to_string()))?;
    let mut batches = vec![];
    for b in reader {
        batches.push(b.map_err(|e| damaged(e.to_string()))?);
    }
    match batches.len() {
        1 => batches.pop().ok_or_else(|| damaged("it is empty".into())),
        n => Err(damaged(format!("it holds {n} batches, not one"))),
    }
}

/// Appends `b` with its length in front (4 bytes, big-endian): a field of a state key that
/// other fields follow. Keys with the same first field stay together in key order.
pub fn len_prefixed(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// A key that starts with field `b`, length in front (see [`len_prefixed`]): the prefix of
/// every key whose first field is `b`.
pub fn len_prefix(b: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + b.len());
    len_prefixed(&mut k, b);
    k
}

/// An `i64` (an event time) as 8 bytes that sort like the numbers: sign bit flipped,
/// big-endian.
pub fn ordered_i64(v: i64) -> [u8; 8] {
    ((v as u64) ^ (1 << 63)).to_be_bytes()
}

/// Splits an [`ordered_i64`] off the front of `b`: (value, rest). `None` if `b` is too
/// short (a damaged key).
pub fn split_ordered_i64(b: &[u8]) -> Option<(i64, &[u8])> {
    let (v, rest) = b.split_first_chunk::<8>()?;
    Some(((u64::from_be_bytes(*v) ^ (1 << 63)) as i64, rest))
}

/// Splits a field [`len_prefixed`] wrote off the front of `b`: (field, rest). `None` if `b`
/// is too short (a damaged key).
pub fn split_len_prefixed(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
    b.get(4..)?.split_at_checked(n)
}

/// The error for checkpointed state of `what` (e.g. "a join") that does not decode.
pub fn damaged(what: &str) -> KappaError {
    KappaError::user(
        SqlState::DATA_CORRUPTED,
        format!("the checkpointed state of {what} is damaged"),
    )
}

#[derive(Default)]
pub struct Encoder(Vec<u8>);

impl Encoder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.0.push(u8::from(v));
        self
    }
    pub fn opt_i64(&mut self, v: Option<i64>) -> &mut Self {
        self.bool(v.is_some()).i64(v.unwrap_or(0))
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    pub fn opt_str(&mut self, v: Option<&str>) -> &mut Self {
        self.bool(v.is_some()).bytes(v.unwrap_or("").as_bytes())
    }
    pub fn str(&mut self, v: &str) -> &mut Self {
        self.bytes(v.as_bytes())
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// Reads what an [`Encoder`] wrote, in the same order. `what` names the encoding in errors.
pub struct Decoder<'a> {
    rest: &'a [u8],
    what: &'a str,
}

impl<'a> Decoder<'a> {
    pub fn new(bytes: &'a [u8], what: &'a str) -> Self {
        Self { rest: bytes, what }
    }
    fn damaged(&self, why: &str) -> KappaError {
        KappaError::user(
            SqlState::DATA_CORRUPTED,
            format!("the checkpointed state of {} is damaged: {why}", self.what),
        )
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.rest.len() < n {
            return Err(self.damaged("it is cut short"));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }
    fn array8(&mut self) -> Result<[u8; 8]> {
        let b = self.take(8)?;
        b.try_into().map_err(|_| self.damaged("it is cut short"))
    }
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array8()?))
    }
    pub fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.array8()?))
    }
    pub fn bool(&mut self) -> Result<bool> {
        match self.take(1)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.damaged(&format!("{b} is not a boolean"))),
        }
    }
    pub fn opt_i64(&mut self) -> Result<Option<i64>> {
        let some = self.bool()?;
        let v = self.i64()?;
        Ok(some.then_some(v))
    }
    pub fn bytes(&mut self) -> Result<&'a [u8]> {
        let n = self.u64()?;
        let n = usize::try_from(n).map_err(|_| self.damaged("a length is too large"))?;
        self.take(n)
    }
    pub fn opt_str(&mut self) -> Result<Option<String>> {
        let some = self.bool()?;
        let b = self.bytes()?;
        let s = std::str::from_utf8(b).map_err(|_| self.damaged("a text is not UTF-8"))?;
        Ok(some.then(|| s.to_string()))
    }
    pub fn str(&mut self) -> Result<String> {
        let b = self.bytes()?;
        std::str::from_utf8(b)
            .map(str::to_string)
            .map_err(|_| self.damaged("a text is not UTF-8"))
    }
    /// Fails unless everything was read.
    pub fn end(&self) -> Result<()> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(self.damaged(&format!("{} bytes too many", self.rest.len())))
        }
    }
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_round_trip_and_damage_is_an_error() {
        let bytes = Encoder::new()
            .u64(7)
            .i64(-3)
            .opt_i64(None)
            .opt_i64(Some(i64::MIN))
            .bool(true)
            .opt_str(Some("x"))
            .bytes(b"ab")
            .finish();
        let mut d = Decoder::new(&bytes, "test");
        assert_eq!(d.u64().unwrap(), 7);
        assert_eq!(d.i64().unwrap(), -3);
        assert_eq!(d.opt_i64().unwrap(), None);
        assert_eq!(d.opt_i64().unwrap(), Some(i64::MIN));
        assert!(d.bool().unwrap());
        assert_eq!(d.opt_str().unwrap().as_deref(), Some("x"));
        assert_eq!(d.bytes().unwrap(), b"ab");
        d.end().unwrap();
        let mut short = Decoder::new(&bytes[..5], "view v");
        let e = short.u64().unwrap_err();
        assert_eq!(e.sqlstate(), SqlState::DATA_CORRUPTED);
        assert!(e.to_string().contains("view v"), "{e}");
    }
}
