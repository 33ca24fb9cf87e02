//! The system relations: `kappa_view_stats`, `kappa_sources`, `kappa_history` — the
//! engine's own state as relations, read from the commit a query runs against.

use super::*;

/// A system relation's rows: one batch in memory.
pub(super) fn one_batch_table(
    schema: SchemaRef,
    columns: Vec<datafusion::arrow::array::ArrayRef>,
) -> DfResult<Arc<dyn TableProvider>> {
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    Ok(Arc::new(datafusion::datasource::MemTable::try_new(
        schema,
        vec![vec![batch]],
    )?))
}

/// The system relation with every materialized view's progress at the snapshot's epoch.
pub const VIEW_STATS: &str = "kappa_view_stats";
/// The system relation with every source's progress at the snapshot's epoch.
pub const SOURCE_STATS: &str = "kappa_sources";
/// The system relation describing the durable history (no rows when in memory).
pub const HISTORY: &str = "kappa_history";

impl KappaSchema {
    pub(super) fn history(&self) -> DfResult<Arc<dyn TableProvider>> {
        use datafusion::arrow::array::{BooleanArray, Float64Array, Int64Array, StringArray};
        use datafusion::arrow::datatypes::DataType;
        let info: Vec<_> = self.sources.runtime.history_info().into_iter().collect();
        let int = |f: &dyn Fn(&kappa_runtime::HistoryInfo) -> u64| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(
                info.iter().map(|i| f(i) as i64),
            ))
        };
        let float = |f: &dyn Fn(&kappa_runtime::HistoryInfo) -> f64| -> ArrayRef {
            Arc::new(Float64Array::from_iter_values(info.iter().map(f)))
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("data_dir", DataType::Utf8, false),
            Field::new("fsync", DataType::Boolean, false),
            Field::new("records", DataType::Int64, false),
            Field::new("disk_bytes", DataType::Int64, false),
            Field::new("recovered_from_checkpoint", DataType::Int64, false),
            Field::new("recovered_records", DataType::Int64, false),
            Field::new("recovery_seconds", DataType::Float64, false),
            Field::new("checkpoints", DataType::Int64, false),
            Field::new("last_checkpoint_record", DataType::Int64, false),
            Field::new("last_checkpoint_ms", DataType::Float64, false),
            Field::new("max_checkpoint_ms", DataType::Float64, false),
            Field::new("last_checkpoint_bytes", DataType::Int64, false),
            Field::new("checkpoint_status", DataType::Utf8, false),
        ]));
        one_batch_table(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(
                    info.iter().map(|i| i.data_dir.clone()),
                )),
                Arc::new(BooleanArray::from_iter(info.iter().map(|i| Some(i.fsync)))),
                int(&|i| i.records),
                int(&|i| i.disk_bytes),
                int(&|i| i.recovered.checkpoint),
                int(&|i| i.recovered.ddl + i.recovered.writes + i.recovered.epochs),
                float(&|i| i.recovered.seconds),
                int(&|i| i.checkpoints.count),
                int(&|i| i.checkpoints.last_seq),
                float(&|i| i.checkpoints.last_ms),
                float(&|i| i.checkpoints.max_ms),
                int(&|i| i.checkpoints.last_bytes),
                Arc::new(StringArray::from_iter_values(info.iter().map(|i| {
                    let c = &i.checkpoints;
                    match (&c.failed, &c.paused, i.checkpoint_interval_ms) {
                        (Some(f), _, _) => format!("failed: {f}"),
                        (None, Some(p), _) => format!("paused: {p}"),
                        (None, None, 0) => "off".to_string(),
                        (None, None, ms) => format!("every {ms} ms"),
                    }
                }))),
            ],
        )
    }

    pub(super) fn source_stats(&self) -> DfResult<Arc<dyn TableProvider>> {
        use datafusion::arrow::array::{BooleanArray, Int64Array, StringArray};
        use datafusion::arrow::datatypes::DataType;
        let s = &self.sources;
        let mut rows: Vec<(&str, &str, &kappa_runtime::SourceStats)> = s
            .catalog
            .relations()
            .filter_map(|r| match &r.kind {
                RelationKind::Source { connector, .. } => s
                    .snapshot
                    .delta
                    .source_stats
                    .get(&r.id)
                    .map(|st| (r.name.as_str(), connector.as_str(), st)),
                _ => None,
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("connector", DataType::Utf8, false),
            Field::new("rows", DataType::Int64, false),
            Field::new("finished", DataType::Boolean, false),
        ]));
        one_batch_table(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|r| r.2.rows as i64),
                )),
                Arc::new(BooleanArray::from_iter(
                    rows.iter().map(|r| Some(r.2.finished)),
                )),
            ],
        )
    }

    pub(super) fn view_stats(&self) -> DfResult<Arc<dyn TableProvider>> {
        use datafusion::arrow::array::{Int64Array, StringArray, TimestampMicrosecondArray};
        use datafusion::arrow::datatypes::{DataType, TimeUnit};
        let s = &self.sources;
        let mut rows: Vec<(&str, &kappa_runtime::ViewStats)> = s
            .catalog
            .relations()
            .filter_map(|r| {
                s.snapshot
                    .delta
                    .view_stats
                    .get(&r.id)
                    .map(|st| (r.name.as_str(), st))
            })
            .collect();
        rows.sort_by_key(|r| r.0);
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("epoch", DataType::Int64, false),
            Field::new(
                "watermark",
                DataType::Timestamp(TimeUnit::Microsecond, None),
                true,
            ),
            Field::new("late_rows", DataType::Int64, false),
            Field::new("state_entries", DataType::Int64, false),
            Field::new("parallelism", DataType::Int64, false),
        ]));
        let epoch = s.snapshot.epoch as i64;
        one_batch_table(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(Int64Array::from(vec![epoch; rows.len()])),
                Arc::new(TimestampMicrosecondArray::from_iter(
                    // The end of a finished stream is shown as NULL (no timestamp).
                    rows.iter()
                        .map(|r| r.1.watermark.filter(|&w| w != i64::MAX)),
                )),
                Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|r| r.1.late_rows as i64),
                )),
                Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|r| r.1.state_entries as i64),
                )),
                Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|r| r.1.parallelism as i64),
                )),
            ],
        )
    }
}
