//! The SQL front end: parsing (sqlparser, PostgreSQL dialect), the catalog model, and the
//! lowering of DataFusion logical plans into streaming [`kappa_plan::StreamGraph`]s.
//!
//! This crate never depends on the runtime: it produces plans, the runtime runs them.

pub mod as_of;
pub mod catalog;
mod join;
mod lower;
pub mod parse;
pub mod sink;
pub mod subscribe;
pub mod temporal;
mod top_n;
pub mod tvf;

pub use lower::{ScanSource, lower_to_stream_graph};
