//! Parsing SQL text into statements.

use datafusion::sql::sqlparser::ast::Statement;
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use kappa_common::{KappaError, Result, SqlState};

/// Parses one or more `;`-separated statements.
pub fn parse_statements(sql: &str) -> Result<Vec<Statement>> {
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(sql)
        .and_then(|mut p| p.parse_statements())
        .map_err(|e| {
            let msg = e.to_string();
            let msg = msg.strip_prefix("sql parser error: ").unwrap_or(&msg);
            KappaError::user(SqlState::SYNTAX_ERROR, format!("syntax error: {msg}"))
        })
}

/// Folds an identifier as PostgreSQL does: unquoted names are lower-cased.
pub fn normalize_ident(id: &datafusion::sql::sqlparser::ast::Ident) -> String {
    if id.quote_style.is_some() {
        id.value.clone()
    } else {
        id.value.to_lowercase()
    }
}

/// The last part of an object name (`db.schema.t` → `t`), normalized. Kappa has one schema.
pub fn object_name(name: &datafusion::sql::sqlparser::ast::ObjectName) -> Result<String> {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(normalize_ident)
        .ok_or_else(|| KappaError::user(SqlState::SYNTAX_ERROR, format!("invalid name {name}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_have_sqlstate() {
        let e = parse_statements("SELEC 1").unwrap_err();
        assert_eq!(e.sqlstate(), SqlState::SYNTAX_ERROR);
        assert_eq!(parse_statements("select 1; select 2").unwrap().len(), 2);
    }
}
