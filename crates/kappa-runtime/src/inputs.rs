//! The runtime's inputs: engine tables (written by DML) and connector-fed sources (polled
//! at every barrier), which sources' columns are read, and the sinks that write views'
//! changes out.

use super::*;

/// A connector-fed source: the source, how far the views have read it, its event clock.
pub(crate) struct LiveSource {
    pub(crate) source: Box<dyn Source>,
    /// Where the views have read up to: what a later view replays to, and where the next
    /// poll starts.
    pub(crate) position: Position,
    /// Rows handed to the views so far (`kappa_sources`).
    pub(crate) rows: u64,
    pub(crate) finished: bool,
    /// The last poll returned rows: there may be more ready.
    pub(crate) busy: bool,
    pub(crate) clock: Option<clock::EventClock>,
    /// After this long without rows the source reports itself idle; `None`: never.
    pub(crate) idle_timeout: Option<std::time::Duration>,
    pub(crate) last_rows: std::time::Instant,
}

/// Tells each source which of its columns are read: by its event clock, and by the scans
/// of the views (and of `new`, a view about to be added) over it.
pub(crate) fn set_columns_read(inner: &mut Inner, new: Option<&StreamGraph>) {
    let graphs: Vec<&StreamGraph> = inner.views.iter().map(|v| &v.graph).chain(new).collect();
    for (id, s) in inner.sources.iter_mut() {
        let mut read = ColumnSet::of(s.clock.iter().flat_map(|c| c.columns()));
        for node in graphs.iter().flat_map(|g| &g.nodes) {
            if let NodeKind::Source {
                relation,
                projection,
                ..
            } = &node.kind
                && relation == id
            {
                read = read.union(match projection {
                    Some(cols) => ColumnSet::of(cols.iter().copied()),
                    None => ColumnSet::ALL,
                });
            }
        }
        s.source.set_columns_read(read);
    }
}

impl LiveSource {
    /// Where the source stands in event time. A finished stream's watermark is the end of
    /// time (every window closes); a live one without rows for longer than its idle timeout
    /// is idle.
    pub(crate) fn event_time(&self) -> EventTime {
        let watermark = match (&self.clock, self.finished) {
            (Some(_), true) => Some(i64::MAX),
            (Some(c), false) => c.watermark,
            (None, _) => None,
        };
        let idle = !self.finished
            && self
                .idle_timeout
                .is_some_and(|t| self.last_rows.elapsed() > t);
        EventTime { watermark, idle }
    }
}

/// A sink: the relation whose changes it writes, and how far it got.
pub(crate) struct LiveSink {
    pub(crate) sink: Box<dyn Sink>,
    pub(crate) from: RelationId,
    /// What the last successful `pre_commit` returned (what a restart resumes from, if its
    /// checkpoint was written).
    pub(crate) token: Option<Vec<u8>>,
    /// Why it stopped writing, if it did (it resumes from its last checkpoint at the next
    /// start).
    pub(crate) failure: Option<String>,
    /// Restored from a checkpoint that did not hold it (it was dropped before, its DROP
    /// follows): it must not touch its output.
    pub(crate) dormant: bool,
}

/// Rows a barrier takes from one source at most, so an epoch stays short.
pub(crate) const MAX_SOURCE_ROWS_PER_EPOCH: usize = 1 << 20;

/// A source's progress, as `kappa_sources` shows it.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    pub rows: u64,
    pub finished: bool,
}

impl Runtime {
    /// Registers a new, empty engine table. It is visible (empty) after the next barrier.
    /// `ddl` is the statement, for the history.
    pub fn create_table(
        &self,
        ddl: &str,
        id: RelationId,
        name: &str,
        schema: datafusion::arrow::datatypes::SchemaRef,
        primary_key: Option<Vec<usize>>,
        watermark: Option<(
            usize,
            datafusion::logical_expr::Expr,
            Option<std::time::Duration>,
        )>,
    ) -> Result<Arc<Table>> {
        let event_time = match watermark {
            Some((column, expr, idle_timeout)) => {
                let df = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
                Some(TableEventTime {
                    column,
                    expr: self.ctx.create_physical_expr(expr, &df)?,
                    idle_timeout,
                })
            }
            None => None,
        };
        let table = Arc::new(Table::new(
            id,
            name,
            schema,
            primary_key,
            self.store.as_ref(),
            event_time,
            table::WriteOrder {
                gate: self.gate.clone(),
                history: self.history.clone(),
            },
        )?);
        if self.restoring()? {
            table.restore(self.restored(|c| c.tables.get(&id).copied())?.flatten())?;
        }
        let mut inner = self.lock()?;
        self.record_ddl_locked(&mut inner, ddl)?;
        self.tables
            .write()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .insert(id, table.clone());
        Ok(table)
    }

    /// Registers a connector-fed source. Its rows flow to views from the next barrier on.
    pub fn create_source(
        &self,
        ddl: &str,
        id: RelationId,
        schema: datafusion::arrow::datatypes::SchemaRef,
        source: Box<dyn Source>,
        watermark: Option<(usize, datafusion::logical_expr::Expr)>,
        idle_timeout: Option<std::time::Duration>,
    ) -> Result<()> {
        let clock = match watermark {
            Some((column, expr)) => {
                let df = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
                Some(clock::EventClock::new(
                    column,
                    self.ctx.create_physical_expr(expr, &df)?,
                ))
            }
            None => None,
        };
        let mut clock = clock;
        let (position, rows, finished) = match self.restored(|c| c.sources.get(&id).cloned())? {
            Some(saved) if self.restoring()? => {
                if let Some(c) = &mut clock {
                    c.watermark = saved.watermark;
                }
                (
                    Position::decode(&saved.position)?,
                    saved.rows,
                    saved.finished,
                )
            }
            _ => (source.earliest(), 0, false),
        };
        let mut inner = self.lock()?;
        self.record_ddl_locked(&mut inner, ddl)?;
        inner.sources.insert(
            id,
            LiveSource {
                source,
                position,
                rows,
                finished,
                busy: true,
                clock,
                idle_timeout,
                last_rows: std::time::Instant::now(),
            },
        );
        set_columns_read(&mut inner, None);
        Ok(())
    }

    /// Whether a source delivered rows at the last barrier and is not finished: another
    /// barrier right away will likely find more.
    pub fn sources_have_more(&self) -> bool {
        self.inner
            .lock()
            .map(|i| i.sources.values().any(|s| s.busy))
            .unwrap_or(false)
    }

    pub fn table(&self, id: RelationId) -> Option<Arc<Table>> {
        self.tables.read().ok()?.get(&id).cloned()
    }

    /// Registers a sink of relation `from`'s changes. Unless restored from a checkpoint
    /// (then it resumes from the checkpoint's token), it starts empty, is given the
    /// relation's contents at the last commit when `snapshot` (as inserts of that epoch),
    /// and then every later epoch's changes.
    pub fn create_sink(
        &self,
        ddl: &str,
        id: RelationId,
        from: RelationId,
        sink: Box<dyn Sink>,
        snapshot: bool,
    ) -> Result<()> {
        let mut inner = self.lock()?;
        let mut live = LiveSink {
            sink,
            from,
            token: None,
            failure: None,
            dormant: false,
        };
        if self.restoring()? {
            match self.restored(|c| c.sinks.get(&id).cloned())? {
                Some(token) => {
                    live.sink.start(Some(&token))?;
                    live.token = Some(token);
                }
                None => live.dormant = true,
            }
        } else {
            live.sink.start(None)?;
            if snapshot {
                let current = self.committed();
                let rows = current.contents_as_inserts(from)?;
                live.sink.write(current.epoch, &rows)?;
            }
        }
        self.record_ddl_locked(&mut inner, ddl)?;
        inner.sinks.insert(id, live);
        Ok(())
    }
}
