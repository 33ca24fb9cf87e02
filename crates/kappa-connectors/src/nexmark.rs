//! The Nexmark generator: the `person`, `auction` and `bid` streams of the Nexmark
//! benchmark, with the distributions of the reference generator (nexmark/nexmark,
//! `nexmark-flink/.../generator`, itself derived from Apache Beam's):
//!
//! - event `n` is a person if `n % 50 == 0`, an auction if `n % 50 ∈ [1, 4)`, else a bid
//!   (proportions 1 : 3 : 46);
//! - event time advances with the first-event rate: event `n` happens at
//!   `base_time + n / rate` seconds, truncated to milliseconds as in the reference
//!   (default rate 10 M events/s of event time; default base 2015-07-15 00:00:00 UTC, Beam's
//!   `BASE_TIME`);
//! - ids count from 1000; an auction's seller is a hot seller (the first person of the last
//!   batch of 100) with probability 3/4, a bid's bidder a hot bidder (the second person of
//!   that batch) with probability 3/4, a bid's auction a hot auction (the first of the last
//!   batch of 100 auctions) with probability 1/2; otherwise ids are drawn among the 1000
//!   most recent people (+10 lead) or 100 in-flight auctions (+10 lead);
//! - prices are log-uniform: `round(10^(6u) · 100)` cents; reserve = initial bid + a price;
//!   auction lengths `1 + [0, 2·horizon)` ms with the horizon the time until 100 more auctions;
//!   categories 10..14; bid channels one of four hot ones with probability 1/2, else
//!   `channel-0` … `channel-9999`;
//! - `extra` pads each event towards the reference's average sizes (person 200, auction 500,
//!   bid 100 bytes) with ±20 % spread.
//!
//! Deviations from the reference (values, not distributions): random draws come from a
//! wyrand stream per (seed, event, column) instead of one `java.util.Random` per event, so
//! the same seed does not give the reference's exact strings and numbers; the base time is
//! fixed (the reference uses the wall clock at start); URLs are built from the channel number
//! deterministically (the reference caches random ones per process). Rows are generated
//! column by column straight into Arrow arrays, chunk by chunk on `workers` threads, and
//! delivered in order.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TryRecvError, sync_channel};

use datafusion::arrow::array::{
    ArrayRef, Int64Array, RecordBatch, RecordBatchOptions, StringBuilder, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use kappa_common::{KappaError, Result, SqlState};

use crate::rng::Rng;
use crate::{Batches, ColumnSet, RowStream, check_known, int_option};

const PERSON_PROPORTION: u64 = 1;
const AUCTION_PROPORTION: u64 = 3;
const BID_PROPORTION: u64 = 46;
const TOTAL: u64 = PERSON_PROPORTION + AUCTION_PROPORTION + BID_PROPORTION;
const FIRST_ID: i64 = 1000;
const HOT_RATIO: i64 = 100;
const NUM_ACTIVE_PEOPLE: i64 = 1000;
const NUM_IN_FLIGHT_AUCTIONS: i64 = 100;
const ID_LEAD: i64 = 10;
/// nexmark-flink's defaults: P(hot auction) = 1/2, P(hot seller) = P(hot bidder) = 3/4.
const HOT_AUCTION_RATIO: u64 = 2;
const HOT_SELLER_RATIO: u64 = 4;
const HOT_BIDDER_RATIO: u64 = 4;
/// 2015-07-15 00:00:00 UTC in milliseconds.
const BASE_TIME_MS: i64 = 1_436_918_400_000;

const FIRST_NAMES: [&str; 11] = [
    "Peter", "Paul", "Luke", "John", "Saul", "Vicky", "Kate", "Julie", "Sarah", "Deiter", "Walter",
];
const LAST_NAMES: [&str; 9] = [
    "Shultz", "Abrams", "Spencer", "White", "Bartels", "Walton", "Smith", "Jones", "Noris",
];
const US_CITIES: [&str; 10] = [
    "Phoenix",
    "Los Angeles",
    "San Francisco",
    "Boise",
    "Portland",
    "Bend",
    "Redmond",
    "Seattle",
    "Kent",
    "Cheyenne",
];
const US_STATES: [&str; 6] = ["AZ", "CA", "ID", "OR", "WA", "WY"];
const HOT_CHANNELS: [&str; 4] = ["Google", "Facebook", "Baidu", "Apple"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NexmarkTable {
    Person,
    Auction,
    Bid,
}

impl NexmarkTable {
    /// First event offset within each group of 50 and how many of the 50 are this kind.
    fn slot(self) -> (u64, u64) {
        match self {
            Self::Person => (0, PERSON_PROPORTION),
            Self::Auction => (PERSON_PROPORTION, AUCTION_PROPORTION),
            Self::Bid => (PERSON_PROPORTION + AUCTION_PROPORTION, BID_PROPORTION),
        }
    }

    /// The columns this table can produce, with their types (`T` = timestamp).
    pub fn columns(self) -> &'static [(&'static str, char)] {
        match self {
            Self::Person => &[
                ("id", 'I'),
                ("name", 'S'),
                ("email_address", 'S'),
                ("credit_card", 'S'),
                ("city", 'S'),
                ("state", 'S'),
                ("date_time", 'T'),
                ("extra", 'S'),
            ],
            Self::Auction => &[
                ("id", 'I'),
                ("item_name", 'S'),
                ("description", 'S'),
                ("initial_bid", 'I'),
                ("reserve", 'I'),
                ("date_time", 'T'),
                ("expires", 'T'),
                ("seller", 'I'),
                ("category", 'I'),
                ("extra", 'S'),
            ],
            Self::Bid => &[
                ("auction", 'I'),
                ("bidder", 'I'),
                ("price", 'I'),
                ("channel", 'S'),
                ("url", 'S'),
                ("date_time", 'T'),
                ("extra", 'S'),
            ],
        }
    }
}

#[derive(Clone, Debug)]
pub struct NexmarkConfig {
    pub table: NexmarkTable,
    /// Total events (of all three kinds) after which the stream ends; `None`: never.
    pub event_num: Option<u64>,
    pub seed: u64,
    /// Events per second of event time.
    pub rate: u64,
    pub base_time_ms: i64,
    pub workers: usize,
    /// Rows per generated batch.
    pub chunk_rows: u64,
}

const OPTIONS: &[&str] = &[
    "nexmark.table.type",
    "nexmark.event.num",
    "nexmark.seed",
    "nexmark.rate",
    "nexmark.base.time.ms",
    "nexmark.workers",
    "nexmark.chunk.rows",
];

impl NexmarkConfig {
    pub fn new(table: NexmarkTable) -> Self {
        Self {
            table,
            event_num: None,
            seed: 0,
            rate: 10_000_000,
            base_time_ms: BASE_TIME_MS,
            workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
            chunk_rows: 16_384,
        }
    }

    pub fn from_options(o: &BTreeMap<String, String>) -> Result<Self> {
        check_known(o, OPTIONS)?;
        let table = match o
            .get("nexmark.table.type")
            .map(|s| s.to_lowercase())
            .as_deref()
        {
            Some("person") => NexmarkTable::Person,
            Some("auction") => NexmarkTable::Auction,
            Some("bid") => NexmarkTable::Bid,
            other => {
                return Err(KappaError::user(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!(
                        "nexmark.table.type must be 'person', 'auction' or 'bid', not {}",
                        other.map_or("missing".to_string(), |s| format!("'{s}'"))
                    ),
                ));
            }
        };
        let mut c = Self::new(table);
        c.event_num = int_option(o, "nexmark.event.num", None)?;
        c.seed = int_option(o, "nexmark.seed", Some(0))?.unwrap_or(0);
        c.rate = int_option(o, "nexmark.rate", Some(c.rate))?.unwrap_or(c.rate);
        if let Some(b) = int_option(o, "nexmark.base.time.ms", None)? {
            c.base_time_ms = b as i64;
        }
        c.workers = int_option(o, "nexmark.workers", Some(c.workers as u64))?
            .unwrap_or(1)
            .clamp(1, 64) as usize;
        c.chunk_rows = int_option(o, "nexmark.chunk.rows", Some(c.chunk_rows))?
            .unwrap_or(16_384)
            .clamp(1, 1 << 20);
        if c.rate == 0 {
            return Err(KappaError::user(
                SqlState::INVALID_PARAMETER_VALUE,
                "nexmark.rate must be positive",
            ));
        }
        Ok(c)
    }

    /// How many rows of this table the first `events` events hold.
    pub fn rows_in(&self, events: u64) -> u64 {
        let (start, n) = self.table.slot();
        let rem = events % TOTAL;
        events / TOTAL * n + rem.saturating_sub(start).min(n)
    }

    /// The event id of this table's row number `row`.
    fn event_id(&self, row: u64) -> u64 {
        let (start, n) = self.table.slot();
        row / n * TOTAL + start + row % n
    }

    fn timestamp_ms(&self, event: u64) -> i64 {
        self.base_time_ms + (event as u128 * 1000 / self.rate as u128) as i64
    }
}

fn last_base0_person_id(event: u64) -> i64 {
    (event / TOTAL) as i64
}

fn last_base0_auction_id(event: u64) -> i64 {
    let mut epoch = (event / TOTAL) as i64;
    let mut offset = event % TOTAL;
    if offset < PERSON_PROPORTION {
        epoch -= 1;
        offset = AUCTION_PROPORTION - 1;
    } else if offset >= PERSON_PROPORTION + AUCTION_PROPORTION {
        offset = AUCTION_PROPORTION - 1;
    } else {
        offset -= PERSON_PROPORTION;
    }
    epoch * AUCTION_PROPORTION as i64 + offset as i64
}

fn next_base0_person_id(event: u64, r: &mut Rng) -> i64 {
    let num_people = last_base0_person_id(event) + 1;
    let active = num_people.min(NUM_ACTIVE_PEOPLE);
    let n = r.below((active + ID_LEAD) as u64) as i64;
    num_people - active + n
}

fn next_base0_auction_id(event: u64, r: &mut Rng) -> i64 {
    let max_a = last_base0_auction_id(event).max(0);
    let min_a = (max_a - NUM_IN_FLIGHT_AUCTIONS).max(0);
    min_a + r.below((max_a - min_a + 1 + ID_LEAD) as u64) as i64
}

fn next_price(r: &mut Rng) -> i64 {
    (10f64.powf(r.unit() * 6.0) * 100.0).round() as i64
}

/// Length of `next_string(max)` from the same stream: its first draw.
fn string_len(r: &mut Rng, max: u64) -> usize {
    3 + r.below(max - 3) as usize
}

/// Lower-case letters with about one space in 13, length in `[3, max)`.
fn next_string(r: &mut Rng, max: u64, out: &mut String) {
    let len = string_len(r, max);
    for _ in 0..len {
        let x = r.next_u64();
        if x.is_multiple_of(13) {
            out.push(' ');
        } else {
            out.push((b'a' + ((x >> 8) % 26) as u8) as char);
        }
    }
}

/// Padding that brings an event of `current` bytes to about `avg` bytes (±20 %).
fn extra_len(r: &mut Rng, current: usize, avg: usize) -> usize {
    if current > avg {
        return 0;
    }
    let desired = avg - current;
    let delta = (desired as f64 * 0.2).round() as u64;
    let min = desired as u64 - delta;
    (min + if delta == 0 { 0 } else { r.below(2 * delta) }) as usize
}

fn letters(r: &mut Rng, len: usize, out: &mut String) {
    let mut left = len;
    while left > 0 {
        let mut x = r.next_u64();
        for _ in 0..left.min(8) {
            out.push((b'a' + (((x & 0xff) * 26) >> 8) as u8) as char);
            x >>= 8;
        }
        left = left.saturating_sub(8);
    }
}

fn base_url(r: &mut Rng, out: &mut String) {
    out.push_str("https://www.nexmark.com/");
    for _ in 0..3 {
        let len = 3 + r.below(3) as usize;
        letters(r, len, out);
        out.push('/');
    }
    out.push_str("item.htm?query=1");
}

/// Stream numbers: one per generated column (and hidden draw).
mod stream {
    pub const ID: u64 = 1;
    pub const NAME: u64 = 2;
    pub const EMAIL: u64 = 3;
    pub const CARD: u64 = 4;
    pub const CITY: u64 = 5;
    pub const STATE: u64 = 6;
    pub const EXTRA: u64 = 7;
    pub const ITEM: u64 = 8;
    pub const DESCRIPTION: u64 = 9;
    pub const INITIAL_BID: u64 = 10;
    pub const RESERVE: u64 = 11;
    pub const EXPIRES: u64 = 12;
    pub const CATEGORY: u64 = 13;
    pub const PRICE: u64 = 14;
    pub const CHANNEL: u64 = 15;
    pub const URL: u64 = 16;
}

/// Generates this table's rows `rows` with the columns of `schema` (a subset of
/// [`NexmarkTable::columns`], in any order); the columns not in `read` are left unfilled
/// ([`crate::unread_column`]). A column's values do not depend on which others are made.
pub fn generate(
    c: &NexmarkConfig,
    schema: &SchemaRef,
    rows: Range<u64>,
    read: ColumnSet,
) -> Result<RecordBatch> {
    let n = (rows.end - rows.start) as usize;
    let events: Vec<u64> = rows.clone().map(|r| c.event_id(r)).collect();
    let seed = c.seed;
    let rng = |e: u64, s: u64| Rng::new(seed, e, s);
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
    let mut scratch = String::new();
    for (i, field) in schema.fields().iter().enumerate() {
        if !read.contains(i) {
            columns.push(crate::unread_column(field, n)?);
            continue;
        }
        let name = field.name().as_str();
        let ints = |f: &dyn Fn(u64) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(events.iter().map(|&e| f(e))))
        };
        let mut strings = |f: &mut dyn FnMut(u64, &mut String)| -> ArrayRef {
            let mut b = StringBuilder::with_capacity(n, n * 16);
            for &e in &events {
                scratch.clear();
                f(e, &mut scratch);
                b.append_value(&scratch);
            }
            Arc::new(b.finish())
        };
        let tz = match field.data_type() {
            DataType::Timestamp(TimeUnit::Microsecond, tz) => tz.clone(),
            _ => None,
        };
        let times = |f: &dyn Fn(u64) -> i64| -> ArrayRef {
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(events.iter().map(|&e| f(e) * 1000))
                    .with_timezone_opt(tz.clone()),
            )
        };
        let auction_len_ms = |e: u64| -> i64 {
            let future = e + (NUM_IN_FLIGHT_AUCTIONS as u64 * TOTAL) / AUCTION_PROPORTION;
            let horizon = c.timestamp_ms(future) - c.timestamp_ms(e);
            1 + rng(e, stream::EXPIRES).below((horizon * 2).max(1) as u64) as i64
        };
        let name_len = |e: u64| {
            let mut r = rng(e, stream::NAME);
            FIRST_NAMES[r.below(11) as usize].len() + 1 + LAST_NAMES[r.below(9) as usize].len()
        };
        let col = match (c.table, name) {
            (NexmarkTable::Person, "id") => ints(&|e| last_base0_person_id(e) + FIRST_ID),
            (NexmarkTable::Auction, "id") => ints(&|e| last_base0_auction_id(e) + FIRST_ID),
            (_, "date_time") => times(&|e| c.timestamp_ms(e)),
            (NexmarkTable::Person, "name") => strings(&mut |e, s| {
                let mut r = rng(e, stream::NAME);
                s.push_str(FIRST_NAMES[r.below(11) as usize]);
                s.push(' ');
                s.push_str(LAST_NAMES[r.below(9) as usize]);
            }),
            (NexmarkTable::Person, "email_address") => strings(&mut |e, s| {
                let mut r = rng(e, stream::EMAIL);
                next_string(&mut r, 7, s);
                s.push('@');
                next_string(&mut r, 5, s);
                s.push_str(".com");
            }),
            (NexmarkTable::Person, "credit_card") => strings(&mut |e, s| {
                let mut r = rng(e, stream::CARD);
                for i in 0..4 {
                    if i > 0 {
                        s.push(' ');
                    }
                    let v = r.below(10_000);
                    s.push_str(&format!("{v:04}"));
                }
            }),
            (NexmarkTable::Person, "city") => {
                strings(&mut |e, s| s.push_str(US_CITIES[rng(e, stream::CITY).below(10) as usize]))
            }
            (NexmarkTable::Person, "state") => {
                strings(&mut |e, s| s.push_str(US_STATES[rng(e, stream::STATE).below(6) as usize]))
            }
            (NexmarkTable::Person, "extra") => strings(&mut |e, s| {
                let mut r = rng(e, stream::EMAIL);
                let email = string_len(&mut r, 7) + 1 + 5 + 4;
                let city = US_CITIES[rng(e, stream::CITY).below(10) as usize].len();
                let current = 8 + name_len(e) + email + 19 + city + 2;
                let mut r = rng(e, stream::EXTRA);
                let len = extra_len(&mut r, current, 200);
                letters(&mut r, len, s);
            }),
            (NexmarkTable::Auction, "item_name") => {
                strings(&mut |e, s| next_string(&mut rng(e, stream::ITEM), 20, s))
            }
            (NexmarkTable::Auction, "description") => {
                strings(&mut |e, s| next_string(&mut rng(e, stream::DESCRIPTION), 100, s))
            }
            (NexmarkTable::Auction, "initial_bid") => {
                ints(&|e| next_price(&mut rng(e, stream::INITIAL_BID)))
            }
            (NexmarkTable::Auction, "reserve") => ints(&|e| {
                next_price(&mut rng(e, stream::INITIAL_BID))
                    + next_price(&mut rng(e, stream::RESERVE))
            }),
            (NexmarkTable::Auction, "expires") => times(&|e| c.timestamp_ms(e) + auction_len_ms(e)),
            (NexmarkTable::Auction, "seller") => ints(&|e| {
                let mut r = rng(e, stream::ID);
                let p = if r.below(HOT_SELLER_RATIO) > 0 {
                    last_base0_person_id(e) / HOT_RATIO * HOT_RATIO
                } else {
                    next_base0_person_id(e, &mut r)
                };
                p + FIRST_ID
            }),
            (NexmarkTable::Auction, "category") => {
                ints(&|e| 10 + rng(e, stream::CATEGORY).below(5) as i64)
            }
            (NexmarkTable::Auction, "extra") => strings(&mut |e, s| {
                let item = string_len(&mut rng(e, stream::ITEM), 20);
                let desc = string_len(&mut rng(e, stream::DESCRIPTION), 100);
                let mut r = rng(e, stream::EXTRA);
                let len = extra_len(&mut r, 8 + item + desc + 8 * 5, 500);
                letters(&mut r, len, s);
            }),
            (NexmarkTable::Bid, "auction") => ints(&|e| {
                let mut r = rng(e, stream::ID);
                let a = if r.below(HOT_AUCTION_RATIO) > 0 {
                    last_base0_auction_id(e).max(0) / HOT_RATIO * HOT_RATIO
                } else {
                    next_base0_auction_id(e, &mut r)
                };
                a + FIRST_ID
            }),
            (NexmarkTable::Bid, "bidder") => ints(&|e| {
                let mut r = rng(e, stream::NAME);
                let p = if r.below(HOT_BIDDER_RATIO) > 0 {
                    last_base0_person_id(e) / HOT_RATIO * HOT_RATIO + 1
                } else {
                    next_base0_person_id(e, &mut r)
                };
                p + FIRST_ID
            }),
            (NexmarkTable::Bid, "price") => ints(&|e| next_price(&mut rng(e, stream::PRICE))),
            (NexmarkTable::Bid, "channel") => strings(&mut |e, s| {
                let mut r = rng(e, stream::CHANNEL);
                if r.below(2) > 0 {
                    s.push_str(HOT_CHANNELS[r.below(4) as usize]);
                } else {
                    s.push_str("channel-");
                    s.push_str(&r.below(10_000).to_string());
                }
            }),
            (NexmarkTable::Bid, "url") => strings(&mut |e, s| {
                let mut r = rng(e, stream::CHANNEL);
                // The URL belongs to the channel drawn for the same event.
                let (key, numbered) = if r.below(2) > 0 {
                    (r.below(4), None)
                } else {
                    let ch = r.below(10_000);
                    (100 + ch, Some(ch))
                };
                let mut u = Rng::new(seed, key, stream::URL);
                base_url(&mut u, s);
                if let Some(ch) = numbered
                    && u.below(10) > 0
                {
                    s.push_str("&channel_id=");
                    s.push_str(&(ch as u32).reverse_bits().to_string());
                }
            }),
            (NexmarkTable::Bid, "extra") => strings(&mut |e, s| {
                let mut r = rng(e, stream::EXTRA);
                let len = extra_len(&mut r, 32, 100);
                letters(&mut r, len, s);
            }),
            (t, other) => {
                return Err(KappaError::user(
                    SqlState::UNDEFINED_COLUMN,
                    format!("the nexmark {t:?} stream has no column \"{other}\""),
                ));
            }
        };
        columns.push(col);
    }
    let opts = RecordBatchOptions::new().with_row_count(Some(n));
    Ok(RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &opts,
    )?)
}

/// Checks that `schema` names only columns the table produces, with matching types.
pub fn check_schema(table: NexmarkTable, schema: &SchemaRef) -> Result<()> {
    for f in schema.fields() {
        let Some((_, t)) = table.columns().iter().find(|(n, _)| n == f.name()) else {
            let names: Vec<&str> = table.columns().iter().map(|(n, _)| *n).collect();
            return Err(KappaError::user(
                SqlState::UNDEFINED_COLUMN,
                format!(
                    "the nexmark {} stream has no column \"{}\" (it has {})",
                    format!("{table:?}").to_lowercase(),
                    f.name(),
                    names.join(", ")
                ),
            ));
        };
        let ok = match t {
            'I' => f.data_type() == &DataType::Int64,
            'S' => f.data_type() == &DataType::Utf8,
            _ => matches!(f.data_type(), DataType::Timestamp(TimeUnit::Microsecond, _)),
        };
        if !ok {
            let want = match t {
                'I' => "BIGINT",
                'S' => "VARCHAR",
                _ => "TIMESTAMP",
            };
            return Err(KappaError::user(
                SqlState::DATATYPE_MISMATCH,
                format!("nexmark column \"{}\" must be declared {want}", f.name()),
            ));
        }
    }
    Ok(())
}

/// Generates on worker threads, chunk `k` on worker `k % workers`, and hands the chunks out
/// in order.
pub struct NexmarkReader {
    config: NexmarkConfig,
    schema: SchemaRef,
    /// The columns anyone reads ([`ColumnSet`] bits), shared with the workers, which read
    /// it anew for each chunk.
    read: Arc<AtomicU64>,
    /// Each chunk with the columns it was generated with.
    workers: Vec<Receiver<Result<(ColumnSet, RecordBatch)>>>,
    next_chunk: u64,
    total_chunks: Option<u64>,
}

impl NexmarkReader {
    pub fn start(config: NexmarkConfig, schema: SchemaRef) -> Result<Self> {
        check_schema(config.table, &schema)?;
        let total_rows = config.event_num.map(|e| config.rows_in(e));
        let total_chunks = total_rows.map(|r| r.div_ceil(config.chunk_rows));
        let mut reader = Self {
            config,
            schema,
            read: Arc::new(AtomicU64::new(ColumnSet::ALL.bits())),
            workers: vec![],
            next_chunk: 0,
            total_chunks,
        };
        reader.start_workers(0)?;
        Ok(reader)
    }

    /// (Re)starts the generator threads at chunk `first`. Threads of an earlier start stop
    /// when they find their channel closed.
    /// Chunk `k` is always made by worker `k % workers` (that is where `poll` looks for
    /// it), so worker `w` starts at the first chunk from `first` on that is its own.
    fn start_workers(&mut self, first: u64) -> Result<()> {
        let total_rows = self.config.event_num.map(|e| self.config.rows_in(e));
        let n = self.config.workers as u64;
        let mut workers = Vec::with_capacity(self.config.workers);
        for w in 0..n {
            let (tx, rx) = sync_channel(4);
            let c = self.config.clone();
            let s = self.schema.clone();
            let read = self.read.clone();
            let own = first + (w + n - first % n) % n;
            std::thread::Builder::new()
                .name(format!("nexmark-gen-{w}"))
                .spawn(move || worker(c, s, read, own, total_rows, tx))
                .map_err(|e| KappaError::internal(format!("cannot start generator: {e}")))?;
            workers.push(rx);
        }
        self.workers = workers;
        self.next_chunk = first;
        Ok(())
    }
}

impl NexmarkReader {
    fn columns_read(&self) -> ColumnSet {
        ColumnSet::from_bits(self.read.load(Ordering::Acquire))
    }
}

/// Generates chunks `first`, `first + workers`, `first + 2·workers`, … into `tx`.
fn worker(
    c: NexmarkConfig,
    schema: SchemaRef,
    read: Arc<AtomicU64>,
    first: u64,
    total_rows: Option<u64>,
    tx: SyncSender<Result<(ColumnSet, RecordBatch)>>,
) {
    let step = c.workers as u64;
    let mut chunk = first;
    loop {
        let start = chunk * c.chunk_rows;
        let end = match total_rows {
            Some(t) if start >= t => return,
            Some(t) => (start + c.chunk_rows).min(t),
            None => start + c.chunk_rows,
        };
        let cols = ColumnSet::from_bits(read.load(Ordering::Acquire));
        let batch = generate(&c, &schema, start..end, cols).map(|b| (cols, b));
        let failed = batch.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
        chunk += step;
    }
}

/// How long a poll that finds no chunk ready waits for the next one.
const CHUNK_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

impl RowStream for NexmarkReader {
    fn poll_batches(&mut self, max_rows: usize) -> Result<Batches> {
        let mut batches = Vec::new();
        let mut rows = 0;
        loop {
            if self.total_chunks.is_some_and(|t| self.next_chunk >= t) {
                return Ok(Batches {
                    batches,
                    finished: true,
                });
            }
            if rows >= max_rows {
                break;
            }
            let w = (self.next_chunk % self.workers.len() as u64) as usize;
            let received = match self.workers[w].try_recv() {
                Ok(b) => Some(b),
                // Nothing ready and nothing taken yet: the generator runs as fast as it
                // can, so the next chunk is a few milliseconds away. Waiting for it keeps
                // the source busy; returning nothing would make the runtime wait a whole
                // barrier interval before polling again (a pipeline that keeps up with
                // the generator then idled most of the time).
                Err(TryRecvError::Empty) if batches.is_empty() => {
                    match self.workers[w].recv_timeout(CHUNK_WAIT) {
                        Ok(b) => Some(b),
                        Err(RecvTimeoutError::Timeout) => None,
                        Err(RecvTimeoutError::Disconnected) => {
                            return Err(KappaError::internal("nexmark generator thread stopped"));
                        }
                    }
                }
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => {
                    return Err(KappaError::internal("nexmark generator thread stopped"));
                }
            };
            let Some(b) = received else {
                break;
            };
            let (made_with, mut b) = b?;
            if !made_with.covers(self.columns_read()) {
                // Generated ahead before a new reader asked for more columns.
                let start = self.next_chunk * self.config.chunk_rows;
                let end = start + b.num_rows() as u64;
                b = generate(&self.config, &self.schema, start..end, self.columns_read())?;
            }
            rows += b.num_rows();
            batches.push(b);
            self.next_chunk += 1;
        }
        Ok(Batches {
            batches,
            finished: false,
        })
    }

    fn read_rows(&self, from: u64, to: u64) -> Result<Vec<RecordBatch>> {
        crate::chunks(from, to, self.config.chunk_rows)
            .map(|(start, end)| {
                generate(&self.config, &self.schema, start..end, self.columns_read())
            })
            .collect()
    }

    fn set_read(&mut self, read: ColumnSet) {
        self.read.store(read.bits(), Ordering::Release);
    }

    fn next_row(&self) -> u64 {
        let at = self.next_chunk * self.config.chunk_rows;
        match self.config.event_num {
            Some(e) => at.min(self.config.rows_in(e)),
            None => at,
        }
    }

    fn seek_rows(&mut self, rows: u64) -> Result<()> {
        if !rows.is_multiple_of(self.config.chunk_rows)
            && Some(rows) != self.config.event_num.map(|e| self.config.rows_in(e))
        {
            return Err(KappaError::internal(format!(
                "nexmark can only continue at a chunk boundary, not at row {rows}"
            )));
        }
        self.start_workers(rows.div_ceil(self.config.chunk_rows))
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{Field, Int64Type, Schema};

    use super::*;

    fn schema(table: NexmarkTable) -> SchemaRef {
        Arc::new(Schema::new(
            table
                .columns()
                .iter()
                .map(|(n, t)| {
                    let ty = match t {
                        'I' => DataType::Int64,
                        'S' => DataType::Utf8,
                        _ => DataType::Timestamp(TimeUnit::Microsecond, None),
                    };
                    Field::new(*n, ty, false)
                })
                .collect::<Vec<_>>(),
        ))
    }

    #[test]
    fn event_mix_and_ids() {
        let c = NexmarkConfig::new(NexmarkTable::Bid);
        assert_eq!(c.rows_in(50), 46);
        assert_eq!(c.rows_in(54), 46);
        assert_eq!(c.rows_in(55), 47);
        assert_eq!(c.event_id(0), 4);
        assert_eq!(c.event_id(46), 54);
        let a = NexmarkConfig::new(NexmarkTable::Auction);
        assert_eq!(a.rows_in(50), 3);
        assert_eq!(a.rows_in(2), 1);
        assert_eq!((a.event_id(0), a.event_id(2), a.event_id(3)), (1, 3, 51));
        assert_eq!(last_base0_auction_id(1), 0);
        assert_eq!(last_base0_auction_id(3), 2);
        assert_eq!(last_base0_auction_id(50), 2);
        assert_eq!(last_base0_auction_id(51), 3);
        // Event time: 10 M events/s, millisecond precision.
        assert_eq!(c.timestamp_ms(9_999) - c.timestamp_ms(0), 0);
        assert_eq!(c.timestamp_ms(10_000) - c.timestamp_ms(0), 1);
    }

    #[test]
    fn bids_are_deterministic_and_distributed_like_the_reference() {
        let mut c = NexmarkConfig::new(NexmarkTable::Bid);
        c.seed = 7;
        let s = schema(NexmarkTable::Bid);
        let a = generate(&c, &s, 0..100_000, ColumnSet::ALL).unwrap();
        let b = generate(&c, &s, 50_000..100_000, ColumnSet::ALL).unwrap();
        assert_eq!(a.slice(50_000, 50_000), b);
        let price = a.column(2).as_primitive::<Int64Type>();
        let (lo, hi) = (
            price.values().iter().min().unwrap(),
            price.values().iter().max().unwrap(),
        );
        assert!(*lo >= 100 && *hi <= 100_000_000, "{lo} {hi}");
        // Log-uniform: about a sixth of prices in each decade.
        let in_decade = price
            .values()
            .iter()
            .filter(|&&p| (1000..10_000).contains(&p))
            .count();
        assert!((14_000..19_000).contains(&in_decade), "{in_decade}");
        // Half the bids go to the hot auction of their batch.
        let auctions = a.column(0).as_primitive::<Int64Type>();
        let hot = (0..a.num_rows())
            .filter(|&i| {
                let e = c.event_id(i as u64);
                auctions.value(i) == last_base0_auction_id(e) / 100 * 100 + 1000
            })
            .count();
        assert!((49_000..53_000).contains(&hot), "{hot}");
        // `extra` pads a bid to about 100 bytes: 68 ± 20 %.
        let extra = a.column(6).as_string::<i32>();
        let avg = (0..extra.len())
            .map(|i| extra.value(i).len())
            .sum::<usize>()
            / extra.len();
        assert!((60..76).contains(&avg), "{avg}");
    }

    /// A column's values do not depend on which others are generated; the unread ones are
    /// NULL (or, NOT NULL, empty / zero).
    #[test]
    fn unread_columns_are_left_unfilled_and_the_read_ones_unchanged() {
        let c = NexmarkConfig::new(NexmarkTable::Bid);
        let not_null = schema(NexmarkTable::Bid);
        let s: SchemaRef = Arc::new(Schema::new(
            not_null
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<Field>>(),
        ));
        let all = generate(&c, &s, 0..5000, ColumnSet::ALL).unwrap();
        // auction and date_time only.
        let some = generate(&c, &s, 0..5000, ColumnSet::of([0, 5])).unwrap();
        assert_eq!(some.schema(), all.schema());
        for i in 0..s.fields().len() {
            if [0, 5].contains(&i) {
                assert_eq!(some.column(i), all.column(i), "column {i}");
            } else {
                assert_eq!(some.column(i).null_count(), 5000, "column {i}");
            }
        }
        let b = generate(&c, &not_null, 0..10, ColumnSet::of([0])).unwrap();
        assert_eq!(
            b.column(2).as_primitive::<Int64Type>().values()[..],
            [0; 10]
        );
        assert!(b.column(6).as_string::<i32>().iter().all(|v| v == Some("")));
    }

    /// Chunks generated ahead with fewer columns than a new reader asks for are made again.
    #[test]
    fn a_reader_fills_the_columns_asked_for_after_it_generated_ahead() {
        let mut c = small_auctions();
        c.chunk_rows = 100;
        let s = schema(NexmarkTable::Auction);
        let total = c.rows_in(100_000);
        let all = generate(&c, &s, 0..total, ColumnSet::ALL).unwrap();
        let mut r = NexmarkReader::start(c, s).unwrap();
        r.set_read(ColumnSet::of([0]));
        // Each worker holds at most 5 chunks: the ones made while this poll frees room
        // (from chunk 15 on) have column 0 only, and wait in the queues after it.
        let first = r.poll_batches(2000).unwrap().batches;
        assert!(first.iter().all(|b| b.column(0).null_count() == 0));
        r.set_read(ColumnSet::of([0, 1]));
        let mut at = first.iter().map(|b| b.num_rows()).sum::<usize>();
        loop {
            let p = r.poll_batches(10_000).unwrap();
            for b in &p.batches {
                let n = b.num_rows();
                assert_eq!(b.column(1), &all.column(1).slice(at, n), "rows from {at}");
                at += n;
            }
            if p.finished {
                break;
            }
        }
        assert_eq!(at as u64, total);
        let replayed = r.read_rows(0, 100).unwrap();
        assert_eq!(replayed[0].column(1), &all.column(1).slice(0, 100));
        // NOT NULL and not read: empty.
        let unread = replayed[0].column(2).as_string::<i32>();
        assert!(unread.iter().all(|v| v == Some("")));
    }

    /// 100k events of auctions (6,000 rows) in chunks of 1,000 over three workers.
    fn small_auctions() -> NexmarkConfig {
        let mut c = NexmarkConfig::new(NexmarkTable::Auction);
        c.event_num = Some(100_000);
        c.chunk_rows = 1000;
        c.workers = 3;
        c
    }

    /// The auction ids (column 0) of `batches`, in order.
    fn ids(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| b.column(0).as_primitive::<Int64Type>().values().to_vec())
            .collect()
    }

    /// The ids a reader delivers from where it stands to the end of its stream.
    fn read_to_end(r: &mut NexmarkReader) -> Vec<i64> {
        let mut out = vec![];
        loop {
            let p = r.poll_batches(10_000).unwrap();
            out.extend(ids(&p.batches));
            if p.finished {
                return out;
            }
        }
    }

    #[test]
    fn reader_delivers_every_row_once_in_order() {
        let c = small_auctions();
        let mut r = NexmarkReader::start(c.clone(), schema(NexmarkTable::Auction)).unwrap();
        let ids = read_to_end(&mut r);
        assert_eq!(ids.len() as u64, c.rows_in(100_000));
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1));
        let replayed: usize = r
            .read_rows(0, 5000)
            .unwrap()
            .iter()
            .map(|b| b.num_rows())
            .sum();
        assert_eq!(replayed, 5000);
    }

    /// After a seek (recovery) the stream continues with exactly the rows a reader that
    /// never stopped would have delivered, also from a chunk that is not worker 0's.
    #[test]
    fn a_reader_continues_where_it_seeks_to() {
        let c = small_auctions();
        let s = schema(NexmarkTable::Auction);
        let total = c.rows_in(100_000);
        let all = ids(&[generate(&c, &s, 0..total, ColumnSet::ALL).unwrap()]);
        for from in [2000, 3000, 4000] {
            let mut r = NexmarkReader::start(c.clone(), s.clone()).unwrap();
            r.seek_rows(from).unwrap();
            assert_eq!(
                read_to_end(&mut r),
                all[from as usize..],
                "continuing at row {from}"
            );
            assert_eq!(
                ids(&r.read_rows(from, from + 1500).unwrap()),
                all[from as usize..from as usize + 1500]
            );
        }
    }
}
