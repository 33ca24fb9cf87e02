//! CREATE SOURCE: connectors that feed streams of changes into the runtime.

use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::{RelationId, Result};
use kappa_sql::catalog::WatermarkDef;

use crate::Engine;
use crate::ddl::TableOptions;

/// Starts the source's connector; returns the connector's name and its envelope.
pub(crate) fn start_source(
    engine: &Engine,
    ddl: &str,
    id: RelationId,
    schema: &SchemaRef,
    opts: &TableOptions,
    watermark: Option<&(WatermarkDef, datafusion::logical_expr::Expr)>,
) -> Result<(String, kappa_common::Envelope)> {
    let source = kappa_connectors::create_source(&opts.with, schema.clone())?;
    let envelope = source.envelope();
    engine.runtime().create_source(
        ddl,
        id,
        schema.clone(),
        source,
        watermark.map(|(d, e)| (d.column, e.clone())),
        opts.idle_timeout,
    )?;
    Ok((
        opts.with.get("connector").cloned().unwrap_or_default(),
        envelope,
    ))
}
