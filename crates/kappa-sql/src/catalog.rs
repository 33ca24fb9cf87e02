//! The catalog model: named relations, their schemas and who depends on whom.
//!
//! Kappa has one namespace (`public`). Names are case-folded as in PostgreSQL. Every
//! relation has an id that is never reused, so a runtime object can never be confused with a
//! later relation of the same name.

use std::collections::BTreeMap;

use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::{Envelope, KappaError, RelationId, Result, SqlState};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RelationKind {
    /// An engine table: a changelog fed by INSERT/UPDATE/DELETE/COPY.
    Table { primary_key: Option<Vec<usize>> },
    /// A source: a stream of changes from a connector, read by materialized views; it keeps
    /// no contents of its own. `envelope`: what its changes mean (the connector's).
    Source {
        connector: String,
        envelope: Envelope,
    },
    /// A materialized view, kept up to date by the runtime.
    MaterializedView,
    /// A sink: where a relation's changes are written (`CREATE SINK … FROM …`); it keeps no
    /// contents. It depends on the relation it writes.
    Sink { connector: String },
    /// A view: a named query, expanded where it is used.
    View,
}

impl RelationKind {
    pub fn describe(&self) -> &'static str {
        match self {
            Self::Table { .. } => "table",
            Self::Source { .. } => "source",
            Self::MaterializedView => "materialized view",
            Self::Sink { .. } => "sink",
            Self::View => "view",
        }
    }
}

impl Relation {
    /// What the changes of this relation mean to a reader: the planner asks this, never the
    /// kind, whether an input can retract. Tables and views change with retractions.
    pub fn envelope(&self) -> Envelope {
        match &self.kind {
            RelationKind::Source { envelope, .. } => envelope.clone(),
            _ => Envelope::Changelog,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Relation {
    pub id: RelationId,
    pub name: String,
    pub kind: RelationKind,
    pub schema: SchemaRef,
    /// The defining query of a view or materialized view.
    pub definition: Option<String>,
    /// Relations this one reads (by id), directly.
    pub depends_on: Vec<RelationId>,
    /// The streaming plan as EXPLAIN prints it (materialized views).
    pub plan_text: Option<String>,
    /// The event-time column and the watermark declared on it (tables and sources).
    pub watermark: Option<WatermarkDef>,
}

/// `WATERMARK FOR column AS expr`: the watermark is the largest value of `expr` over the
/// rows received so far; a change whose `column` is below it is late.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatermarkDef {
    pub column: usize,
    /// The expression, as SQL over the relation's columns.
    pub expr: String,
}

#[derive(Default, Clone, Debug)]
pub struct Catalog {
    by_name: BTreeMap<String, Relation>,
    next_id: RelationId,
}

impl Catalog {
    pub fn get(&self, name: &str) -> Option<&Relation> {
        self.by_name.get(name)
    }

    pub fn get_by_id(&self, id: RelationId) -> Option<&Relation> {
        self.by_name.values().find(|r| r.id == id)
    }

    pub fn require(&self, name: &str) -> Result<&Relation> {
        self.get(name).ok_or_else(|| {
            KappaError::user(
                SqlState::UNDEFINED_TABLE,
                format!("relation \"{name}\" does not exist"),
            )
        })
    }

    pub fn relations(&self) -> impl Iterator<Item = &Relation> {
        self.by_name.values()
    }

    pub fn next_id(&mut self) -> RelationId {
        self.next_id += 1;
        self.next_id
    }

    pub fn insert(&mut self, rel: Relation) -> Result<()> {
        if self.by_name.contains_key(&rel.name) {
            return Err(KappaError::user(
                SqlState::DUPLICATE_TABLE,
                format!("relation \"{}\" already exists", rel.name),
            ));
        }
        self.by_name.insert(rel.name.clone(), rel);
        Ok(())
    }

    /// Relations that read `id` directly.
    pub fn dependents(&self, id: RelationId) -> Vec<&Relation> {
        self.by_name
            .values()
            .filter(|r| r.depends_on.contains(&id))
            .collect()
    }

    /// What `DROP name [CASCADE]` removes, dependents first. Without cascade, a relation that
    /// others depend on cannot be dropped (2BP01).
    pub fn drop_order(&self, name: &str, cascade: bool) -> Result<Vec<Relation>> {
        let root = self.require(name)?;
        let mut order = Vec::new();
        self.collect_dependents(root.id, &mut order);
        if !cascade && let Some(dep) = order.first() {
            let d = self
                .get_by_id(*dep)
                .map(|r| format!("{} {}", r.kind.describe(), r.name))
                .unwrap_or_default();
            return Err(KappaError::user(
                SqlState::DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot drop {} {} because other objects depend on it ({d}); use DROP ... CASCADE to drop them too",
                    root.kind.describe(),
                    root.name
                ),
            ));
        }
        order.push(root.id);
        Ok(order
            .into_iter()
            .filter_map(|id| self.get_by_id(id).cloned())
            .collect())
    }

    /// Post-order: dependents of dependents first.
    fn collect_dependents(&self, id: RelationId, out: &mut Vec<RelationId>) {
        for d in self.dependents(id) {
            if !out.contains(&d.id) {
                self.collect_dependents(d.id, out);
                if !out.contains(&d.id) {
                    out.push(d.id);
                }
            }
        }
    }

    pub fn remove(&mut self, name: &str) -> Option<Relation> {
        self.by_name.remove(name)
    }
}
