//! CREATE SOURCE: connectors that feed append-only streams into the runtime.

use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::{RelationId, Result};
use kappa_sql::catalog::WatermarkDef;

use crate::Engine;
use crate::ddl::TableOptions;

/// Starts the source's connector; returns the connector's name.
pub(crate) fn start_source(
    engine: &Engine,
    ddl: &str,
    id: RelationId,
    schema: &SchemaRef,
    opts: &TableOptions,
    watermark: Option<&(WatermarkDef, datafusion::logical_expr::Expr)>,
) -> Result<String> {
    let reader = kappa_connectors::create_reader(&opts.with, schema.clone())?;
    engine.runtime().create_source(
        ddl,
        id,
        schema.clone(),
        reader,
        watermark.map(|(d, e)| (d.column, e.clone())),
        opts.idle_timeout,
    )?;
    Ok(opts.with.get("connector").cloned().unwrap_or_default())
}
