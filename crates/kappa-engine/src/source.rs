//! CREATE SOURCE: connectors that feed append-only streams into the runtime.

use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::{KappaError, RelationId, Result};
use kappa_sql::catalog::WatermarkDef;

use crate::Engine;
use crate::ddl::TableOptions;

pub(crate) fn start_source(
    _engine: &Engine,
    _id: RelationId,
    _name: &str,
    _schema: &SchemaRef,
    opts: &TableOptions,
    _watermark: Option<&(WatermarkDef, datafusion::logical_expr::Expr)>,
) -> Result<String> {
    let connector = opts.with.get("connector").cloned().unwrap_or_default();
    Err(KappaError::not_supported(format!(
        "the connector '{connector}'"
    )))
}
