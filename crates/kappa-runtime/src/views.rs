//! The view graph: building a materialized view's dataflow and filling it from its inputs,
//! a subscription's transient dataflow, and dropping relations.

use super::*;

impl Runtime {
    /// Builds a view's dataflow, fills it from the current contents of its inputs (the
    /// relations' contents at the last committed epoch are exactly what their future
    /// changes will apply to), and commits an epoch so the view is visible on return.
    /// `parallelism`: how many shards its keyed operators run in (a view restored from a
    /// checkpoint keeps the number it was checkpointed with, which its state is split by).
    pub fn create_view(
        &self,
        ddl: &str,
        relation: RelationId,
        graph: StreamGraph,
        parallelism: usize,
    ) -> Result<()> {
        let mut inner = self.lock()?;
        let current = self.committed();
        if self.restoring()? {
            // Its state is the checkpoint's (a view dropped before the checkpoint has none;
            // its DROP follows).
            let checkpointed = self
                .restored(|c| c.views.contains(&relation).then_some(()))?
                .is_some();
            let parallelism = if checkpointed {
                dataflow::checkpointed_parallelism(self.store.as_ref(), relation)?
            } else {
                parallelism
            };
            let mut view = build::build_dataflow(
                &self.ctx,
                relation,
                graph,
                self.store.as_ref(),
                parallelism,
            )?;
            if checkpointed {
                view.restore()?;
            }
            inner.views.push(view);
            set_columns_read(&mut inner, None);
            return Ok(());
        }
        let mut view =
            build::build_dataflow(&self.ctx, relation, graph, self.store.as_ref(), parallelism)?;
        // Before the replay, which must fill the columns the new view reads.
        set_columns_read(&mut inner, Some(&view.graph));
        let backfill = Self::backfill_inputs(&inner, &view, &current)?;
        let epoch = inner.epoch;
        let now = self.current_now(&mut inner);
        view.run_epoch(epoch, now, &backfill, &HashMap::new())?;
        self.record_ddl_locked(&mut inner, ddl)?;
        inner.views.push(view);
        self.run_barrier(&mut inner, None)
    }

    /// Every input relation's contents as of `current` (a source's rows up to its
    /// position), as inserts: what a new dataflow is filled from.
    pub(crate) fn backfill_inputs(
        inner: &Inner,
        view: &Dataflow,
        current: &Commit,
    ) -> Result<HashMap<RelationId, Vec<ChangeBatch>>> {
        let mut backfill: HashMap<RelationId, Vec<ChangeBatch>> = HashMap::new();
        for src in view.graph.sources() {
            if let Some(s) = inner.sources.get(&src) {
                let changes = s.source.read_range(&s.source.earliest(), &s.position)?;
                backfill.insert(src, changes);
                continue;
            }
            backfill.insert(src, current.contents_as_inserts(src)?);
        }
        Ok(backfill)
    }

    /// Builds a subscription's own dataflow over `graph` (`SUBSCRIBE (query)`), fills it
    /// from the last commit's contents, and follows it from the next commit on. Returns
    /// the epoch it was filled at, its contents then, and the listener of its changes.
    /// It is not recorded, not checkpointed and keeps its state in memory; it goes away at
    /// the first barrier after the returned handle is dropped.
    pub fn create_transient_view(
        &self,
        relation: RelationId,
        graph: StreamGraph,
        parallelism: usize,
        limits: ListenLimits,
    ) -> Result<(Epoch, ContentsSnapshot, Listening, TransientView)> {
        let mut inner = self.lock()?;
        let current = self.committed();
        let mut view = build::build_dataflow(
            &self.ctx,
            relation,
            graph,
            &kappa_state::MemStateStore,
            parallelism,
        )?;
        set_columns_read(&mut inner, Some(&view.graph));
        let backfill = Self::backfill_inputs(&inner, &view, &current)?;
        let now = self.current_now(&mut inner);
        view.run_epoch(current.epoch, now, &backfill, &HashMap::new())?;
        // Its backfill is its contents, not a change.
        view.take_output();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        view.transient = Some(ended.clone());
        let contents = view.snapshot()?;
        inner.views.push(view);
        // Under the runtime lock: the next commit is the first with the view in it.
        let (commit, listening) = self.commits.listen(Some(vec![relation]), limits);
        Ok((commit.epoch, contents, listening, TransientView(ended)))
    }

    /// Removes a relation's dataflow or table. Readers stop seeing it at the next commit.
    /// `ddl` is the statement, for the history, on the first of its drops.
    pub fn drop_relation(&self, ddl: Option<&str>, relation: RelationId) -> Result<()> {
        let mut inner = self.lock()?;
        match ddl {
            Some(sql) => self.record_ddl_locked(&mut inner, sql)?,
            None => inner.relations_changed = true,
        }
        let table = self
            .tables
            .write()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .remove(&relation);
        let views = inner.views.len();
        inner.views.retain(|v| v.relation != relation);
        let view = inner.views.len() < views;
        inner.sources.remove(&relation);
        inner.sinks.remove(&relation);
        set_columns_read(&mut inner, None);
        if self.restoring()? {
            // The checkpoint holds no state of it any more.
            return Ok(());
        }
        if table.is_some() || view {
            inner
                .dropped_state
                .push(build::state_prefix(relation, view));
        }
        self.run_barrier(&mut inner, None)
    }
}
