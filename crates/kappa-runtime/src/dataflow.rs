//! One materialized view's running dataflow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result};
use kappa_operators::{Materialize, Operator};
use kappa_plan::{NodeKind, StreamGraph};
use kappa_state::{MultisetSnapshot, RowMultiset};

pub(crate) struct Dataflow {
    pub relation: RelationId,
    pub graph: StreamGraph,
    /// One operator per graph node, same index.
    pub ops: Vec<Box<dyn Operator>>,
    pub contents: Arc<Mutex<RowMultiset>>,
    pub failure: Option<String>,
    /// The view's changes in the epoch just run, for the views that read it.
    output: Vec<ChangeBatch>,
}

impl Dataflow {
    pub fn new(
        relation: RelationId,
        graph: StreamGraph,
        ops: Vec<Box<dyn Operator>>,
        contents: Arc<Mutex<RowMultiset>>,
    ) -> Self {
        Self {
            relation,
            graph,
            ops,
            contents,
            failure: None,
            output: Vec::new(),
        }
    }

    pub fn name(&self) -> &str {
        match self.graph.sink().map(|n| &n.kind) {
            Some(NodeKind::Materialize { name, .. }) => name,
            _ => "?",
        }
    }

    /// Drives one epoch: each node receives all of its inputs' batches, then the barrier.
    /// Nodes are in topological order, so a node's inputs are complete when it runs.
    pub fn run_epoch(
        &mut self,
        epoch: Epoch,
        deltas: &HashMap<RelationId, Vec<ChangeBatch>>,
    ) -> Result<()> {
        let n = self.graph.nodes.len();
        let mut outputs: Vec<Vec<ChangeBatch>> = Vec::with_capacity(n);
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let op = &mut self.ops[i];
            let mut out = Vec::new();
            match &node.kind {
                NodeKind::Source { relation, .. } => {
                    for b in deltas.get(relation).into_iter().flatten() {
                        op.process(0, b.clone(), &mut out)?;
                    }
                }
                _ => {
                    for (port, &input) in node.inputs.iter().enumerate() {
                        let batches = outputs.get(input).ok_or_else(|| {
                            KappaError::internal("stream graph is not in topological order")
                        })?;
                        for b in batches {
                            op.process(port, b.clone(), &mut out)?;
                        }
                    }
                }
            }
            op.on_barrier(epoch, &mut out)?;
            outputs.push(out);
        }
        self.output = outputs.pop().unwrap_or_default();
        Ok(())
    }

    pub fn take_output(&mut self) -> Vec<ChangeBatch> {
        std::mem::take(&mut self.output)
    }

    pub fn snapshot(&self) -> Result<MultisetSnapshot> {
        Materialize::snapshot(&self.contents)
    }
}
