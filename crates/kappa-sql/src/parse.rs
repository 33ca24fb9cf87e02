//! Parsing SQL text into statements.
//!
//! Kappa speaks PostgreSQL's dialect plus three streaming extensions that sqlparser does not
//! know. They are taken out of each statement's tokens before parsing and put back into the
//! parsed statement as options whose keys start with `__kappa_` (a prefix users cannot
//! write, see [`is_internal_option`]):
//! - `CREATE SOURCE name (…) WITH (…)` parses as `CREATE TABLE` plus the option
//!   [`SOURCE_OPTION`];
//! - `WATERMARK FOR col AS expr` inside a CREATE TABLE / SOURCE column list becomes the option
//!   [`WATERMARK_OPTION`] whose value is the tuple `(col, expr)`;
//! - `DROP SOURCE` parses as `DROP TABLE`, which drops tables and sources;
//! - a trailing `EMIT ON WINDOW CLOSE` on CREATE MATERIALIZED VIEW becomes the option
//!   [`EMIT_OPTION`];
//! - `table [alias] FOR SYSTEM_TIME AS OF expr [alias]` (which sqlparser's PostgreSQL
//!   dialect does not parse) becomes the table factor's `version`, as other dialects have
//!   it (see [`crate::as_of`]).

use std::ops::ControlFlow;

use datafusion::sql::sqlparser::ast::{
    CreateTableOptions, Expr, Ident, SqlOption, Statement, TableFactor, TableVersion, Value,
    VisitMut, VisitorMut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::keywords::Keyword;
use datafusion::sql::sqlparser::parser::Parser;
use datafusion::sql::sqlparser::tokenizer::{Span, Token, TokenWithSpan, Tokenizer};
use kappa_common::{KappaError, Result, SqlState};

pub const SOURCE_OPTION: &str = "__kappa_source";
pub const WATERMARK_OPTION: &str = "__kappa_watermark";
pub const EMIT_OPTION: &str = "__kappa_emit_on_window_close";

pub fn is_internal_option(key: &str) -> bool {
    key.starts_with("__kappa")
}

fn syntax(msg: impl std::fmt::Display) -> KappaError {
    let msg = msg.to_string();
    let msg = msg
        .strip_prefix("sql parser error: ")
        .unwrap_or(&msg)
        .to_string();
    KappaError::user(SqlState::SYNTAX_ERROR, format!("syntax error: {msg}"))
}

/// Parses one or more `;`-separated statements.
pub fn parse_statements(sql: &str) -> Result<Vec<Statement>> {
    parse(sql, false)
}

/// Parses statements Kappa wrote itself (the history's DDL records: a parsed statement's
/// text, with the extensions already turned into internal options, which users may not
/// write).
pub fn parse_recorded(sql: &str) -> Result<Vec<Statement>> {
    parse(sql, true)
}

fn parse(sql: &str, trusted: bool) -> Result<Vec<Statement>> {
    let dialect = PostgreSqlDialect {};
    let tokens = Tokenizer::new(&dialect, sql)
        .tokenize_with_location()
        .map_err(syntax)?;
    let mut out = Vec::new();
    let mut current: Vec<TokenWithSpan> = Vec::new();
    for t in tokens
        .into_iter()
        .chain(std::iter::once(TokenWithSpan::wrap(Token::SemiColon)))
    {
        if t.token != Token::SemiColon {
            current.push(t);
            continue;
        }
        let stmt = std::mem::take(&mut current);
        if stmt.iter().all(|t| is_blank(&t.token)) {
            continue;
        }
        out.push(parse_one(&dialect, stmt, trusted)?);
    }
    Ok(out)
}

fn is_blank(t: &Token) -> bool {
    matches!(t, Token::Whitespace(_) | Token::EOF)
}

/// The first significant (non-blank) token at or after `from`.
fn next_sig(tokens: &[TokenWithSpan], from: usize) -> Option<usize> {
    (from..tokens.len()).find(|&j| !is_blank(&tokens[j].token))
}

fn is_word(t: &Token, kw: Keyword) -> bool {
    matches!(t, Token::Word(w) if w.keyword == kw)
}

fn is_word_text(t: &Token, text: &str) -> bool {
    matches!(t, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(text))
}

#[derive(Default)]
struct Extensions {
    source: bool,
    /// Column and the tokens of the watermark expression.
    watermark: Option<(Ident, Vec<TokenWithSpan>)>,
    emit_on_window_close: bool,
}

fn parse_one(
    dialect: &PostgreSqlDialect,
    mut tokens: Vec<TokenWithSpan>,
    trusted: bool,
) -> Result<Statement> {
    let as_of = extract_as_of(dialect, &mut tokens)?;
    let ext = extract_extensions(&mut tokens)?;
    let mut parser = Parser::new(dialect).with_tokens_with_locations(tokens);
    let mut stmt = parser.parse_statement().map_err(syntax)?;
    if parser.peek_token().token != Token::EOF {
        return Err(syntax(format!(
            "Expected: end of statement, found: {}",
            parser.peek_token().token
        )));
    }
    attach_as_of(&mut stmt, as_of)?;
    let flag = |key: &str| SqlOption::KeyValue {
        key: Ident::new(key),
        value: Expr::Value(Value::Boolean(true).into()),
    };
    let push = |opts: &mut CreateTableOptions, o: SqlOption| match opts {
        CreateTableOptions::With(v) => v.push(o),
        other => *other = CreateTableOptions::With(vec![o]),
    };
    // The internal keys come only from the extensions above, never from the user.
    let user_options = match &stmt {
        Statement::CreateTable(ct) => Some(&ct.table_options),
        Statement::CreateView(cv) => Some(&cv.options),
        _ => None,
    };
    if let (Some(CreateTableOptions::With(opts)), false) = (user_options, trusted) {
        for o in opts {
            if let SqlOption::KeyValue { key, .. } = o
                && is_internal_option(&key.value.to_lowercase())
            {
                return Err(KappaError::user(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("unknown option \"{}\"", key.value),
                ));
            }
        }
    }
    match &mut stmt {
        Statement::CreateTable(ct) => {
            if ext.source {
                push(&mut ct.table_options, flag(SOURCE_OPTION));
            }
            if let Some((col, expr_tokens)) = ext.watermark {
                let expr = Parser::new(dialect)
                    .with_tokens_with_locations(expr_tokens)
                    .parse_expr()
                    .map_err(syntax)?;
                push(
                    &mut ct.table_options,
                    SqlOption::KeyValue {
                        key: Ident::new(WATERMARK_OPTION),
                        value: Expr::Tuple(vec![Expr::Identifier(col), expr]),
                    },
                );
            }
        }
        Statement::CreateView(cv) if ext.emit_on_window_close => {
            push(&mut cv.options, flag(EMIT_OPTION));
        }
        _ => {}
    }
    Ok(stmt)
}

/// A `FOR SYSTEM_TIME AS OF` clause taken out of a statement: the span of the token right
/// before it (the table's name or alias) and its expression.
type AsOfClause = (Span, Expr);

/// Finds and removes every `FOR SYSTEM_TIME AS OF expr` from a statement's tokens. The
/// expression ends where sqlparser's expression parser stops.
fn extract_as_of(
    dialect: &PostgreSqlDialect,
    tokens: &mut Vec<TokenWithSpan>,
) -> Result<Vec<AsOfClause>> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        let clause = is_word(&tokens[i].token, Keyword::FOR)
            .then(|| next_sig(tokens, i + 1))
            .flatten()
            .filter(|&j| is_word(&tokens[j].token, Keyword::SYSTEM_TIME))
            .and_then(|j| next_sig(tokens, j + 1))
            .filter(|&j| is_word(&tokens[j].token, Keyword::AS))
            .and_then(|j| next_sig(tokens, j + 1))
            .filter(|&j| is_word(&tokens[j].token, Keyword::OF));
        let Some(of) = clause else {
            i += 1;
            continue;
        };
        let anchor = (0..i)
            .rev()
            .find(|&j| !is_blank(&tokens[j].token))
            .filter(|&j| matches!(tokens[j].token, Token::Word(_)))
            .ok_or_else(|| syntax("FOR SYSTEM_TIME AS OF must follow a table name"))?;
        let mut parser = Parser::new(dialect).with_tokens_with_locations(tokens[of + 1..].to_vec());
        let expr = parser.parse_expr().map_err(syntax)?;
        let end = of + 1 + parser.index();
        out.push((tokens[anchor].span, expr));
        tokens.drain(i..end.min(tokens.len()));
    }
    Ok(out)
}

/// Puts each clause [`extract_as_of`] took out back as the `version` of the table it
/// followed.
fn attach_as_of(stmt: &mut Statement, clauses: Vec<AsOfClause>) -> Result<()> {
    struct Attach(Vec<Option<AsOfClause>>);
    impl VisitorMut for Attach {
        type Break = ();
        fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<()> {
            if let TableFactor::Table {
                name,
                alias,
                version,
                ..
            } = tf
            {
                let spans = [
                    name.0.last().and_then(|p| p.as_ident()).map(|i| i.span),
                    alias.as_ref().map(|a| a.name.span),
                ];
                for slot in &mut self.0 {
                    if slot
                        .as_ref()
                        .is_some_and(|(at, _)| spans.contains(&Some(*at)))
                        && let Some((_, e)) = slot.take()
                    {
                        *version = Some(TableVersion::ForSystemTimeAsOf(e));
                    }
                }
            }
            ControlFlow::Continue(())
        }
    }
    if clauses.is_empty() {
        return Ok(());
    }
    let mut attach = Attach(clauses.into_iter().map(Some).collect());
    let _ = stmt.visit(&mut attach);
    if attach.0.iter().any(Option::is_some) {
        return Err(syntax("FOR SYSTEM_TIME AS OF must follow a table name"));
    }
    Ok(())
}

/// Finds and removes the streaming extensions from one statement's tokens.
fn extract_extensions(tokens: &mut Vec<TokenWithSpan>) -> Result<Extensions> {
    let mut ext = Extensions::default();
    let sig: Vec<usize> = (0..tokens.len())
        .filter(|&i| !is_blank(&tokens[i].token))
        .collect();
    let word = |tokens: &[TokenWithSpan], k: usize, kw: Keyword| {
        sig.get(k).is_some_and(|&i| is_word(&tokens[i].token, kw))
    };
    // DROP SOURCE → DROP TABLE (which drops sources too).
    if word(tokens, 0, Keyword::DROP)
        && sig
            .get(1)
            .is_some_and(|&i| is_word_text(&tokens[i].token, "source"))
    {
        tokens[sig[1]].token = Token::make_keyword("TABLE");
        return Ok(ext);
    }
    if !word(tokens, 0, Keyword::CREATE) {
        return Ok(ext);
    }
    // CREATE SOURCE → CREATE TABLE.
    if sig
        .get(1)
        .is_some_and(|&i| is_word_text(&tokens[i].token, "source"))
    {
        ext.source = true;
        tokens[sig[1]].token = Token::make_keyword("TABLE");
    }
    let is_mv = word(tokens, 1, Keyword::MATERIALIZED)
        || (word(tokens, 1, Keyword::OR)
            && word(tokens, 2, Keyword::REPLACE)
            && word(tokens, 3, Keyword::MATERIALIZED));
    if ext.source || word(tokens, 1, Keyword::TABLE) {
        extract_watermark(tokens, &mut ext)?;
        join_dotted_option_keys(tokens);
    }
    if is_mv && sig.len() >= 4 {
        let n = sig.len();
        let tail = [sig[n - 4], sig[n - 3], sig[n - 2], sig[n - 1]];
        if is_word_text(&tokens[tail[0]].token, "emit")
            && is_word(&tokens[tail[1]].token, Keyword::ON)
            && is_word(&tokens[tail[2]].token, Keyword::WINDOW)
            && is_word(&tokens[tail[3]].token, Keyword::CLOSE)
        {
            ext.emit_on_window_close = true;
            tokens.truncate(tail[0]);
        }
    }
    Ok(ext)
}

/// Connector options have dotted keys (`nexmark.table.type = 'bid'`): inside `WITH (…)`,
/// `a.b.c` becomes the one identifier `"a.b.c"`.
fn join_dotted_option_keys(tokens: &mut Vec<TokenWithSpan>) {
    let Some(with) = (0..tokens.len())
        .rev()
        .find(|&i| is_word(&tokens[i].token, Keyword::WITH))
    else {
        return;
    };
    let mut i = with + 1;
    while i < tokens.len() {
        if let Token::Word(w) = &tokens[i].token
            && tokens.get(i + 1).is_some_and(|t| t.token == Token::Period)
        {
            let mut key = w.value.clone();
            let mut j = i + 1;
            while tokens.get(j).is_some_and(|t| t.token == Token::Period) {
                match tokens.get(j + 1).map(|t| &t.token) {
                    Some(Token::Word(next)) => {
                        key.push('.');
                        key.push_str(&next.value);
                        j += 2;
                    }
                    _ => break,
                }
            }
            tokens[i].token = Token::Word(datafusion::sql::sqlparser::tokenizer::Word {
                value: key.to_lowercase(),
                quote_style: Some('"'),
                keyword: Keyword::NoKeyword,
            });
            tokens.drain(i + 1..j);
        }
        i += 1;
    }
}

/// `WATERMARK FOR col AS expr` as an element of the column list (paren depth 1).
fn extract_watermark(tokens: &mut Vec<TokenWithSpan>, ext: &mut Extensions) -> Result<()> {
    let mut depth = 0i32;
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i].token {
            Token::LParen => depth += 1,
            Token::RParen => depth -= 1,
            t if depth == 1 && is_word_text(t, "watermark") => {
                let Some(for_i) =
                    next_sig(tokens, i + 1).filter(|&j| is_word(&tokens[j].token, Keyword::FOR))
                else {
                    i += 1;
                    continue;
                };
                let col_i = next_sig(tokens, for_i + 1)
                    .ok_or_else(|| syntax("expected a column after WATERMARK FOR"))?;
                let col = match &tokens[col_i].token {
                    Token::Word(w) => Ident {
                        value: w.value.clone(),
                        quote_style: w.quote_style,
                        span: tokens[col_i].span,
                    },
                    other => {
                        return Err(syntax(format!(
                            "expected a column after WATERMARK FOR, found {other}"
                        )));
                    }
                };
                let as_i = next_sig(tokens, col_i + 1)
                    .filter(|&j| is_word(&tokens[j].token, Keyword::AS))
                    .ok_or_else(|| syntax("expected AS after WATERMARK FOR column"))?;
                // The expression runs to the next comma or closing parenthesis at depth 1.
                let mut d = 0i32;
                let mut end = as_i + 1;
                while end < tokens.len() {
                    match tokens[end].token {
                        Token::LParen => d += 1,
                        Token::RParen if d == 0 => break,
                        Token::RParen => d -= 1,
                        Token::Comma if d == 0 => break,
                        _ => {}
                    }
                    end += 1;
                }
                if ext.watermark.is_some() {
                    return Err(KappaError::user(
                        SqlState::INVALID_TABLE_DEFINITION,
                        "a table can declare only one WATERMARK",
                    ));
                }
                let expr: Vec<TokenWithSpan> = tokens[as_i + 1..end].to_vec();
                if expr.iter().all(|t| is_blank(&t.token)) {
                    return Err(syntax(
                        "expected an expression after WATERMARK FOR column AS",
                    ));
                }
                ext.watermark = Some((col, expr));
                // Remove the element and the comma that separates it from its neighbour.
                let mut start = i;
                let prev = (0..i).rev().find(|&j| !is_blank(&tokens[j].token));
                let mut stop = end;
                if let Some(p) = prev.filter(|&p| tokens[p].token == Token::Comma) {
                    start = p;
                } else if end < tokens.len() && tokens[end].token == Token::Comma {
                    stop = end + 1;
                }
                tokens.drain(start..stop);
                i = start;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    Ok(())
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
        assert_eq!(parse_statements(" ; select 1;; ").unwrap().len(), 1);
        assert!(parse_statements("select 1 select").is_err());
    }

    fn options(s: &Statement) -> Vec<String> {
        let opts = match s {
            Statement::CreateTable(ct) => &ct.table_options,
            Statement::CreateView(cv) => &cv.options,
            _ => return vec![],
        };
        match opts {
            CreateTableOptions::With(v) => v.iter().map(|o| o.to_string()).collect(),
            _ => vec![],
        }
    }

    #[test]
    fn recorded_statements_parse_back_to_themselves() {
        for sql in [
            "CREATE SOURCE bid (a BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND) WITH (connector = 'nexmark', nexmark.table.type = 'bid')",
            "CREATE TABLE t (id BIGINT PRIMARY KEY, s TEXT) WITH (idle_timeout = '1 second')",
            "CREATE MATERIALIZED VIEW v AS SELECT window_start, count(*) FROM TUMBLE(bid, ts, INTERVAL '10' SECOND) GROUP BY window_start, window_end EMIT ON WINDOW CLOSE",
            "DROP SOURCE bid",
            "SELECT * FROM o JOIN r FOR SYSTEM_TIME AS OF o.ts AS x ON o.k = x.k LEFT JOIN q AS y FOR SYSTEM_TIME AS OF o.ts + INTERVAL '1' SECOND ON true",
        ] {
            let parsed = parse_statements(sql).unwrap().remove(0);
            let recorded = parsed.to_string();
            let again = parse_recorded(&recorded).unwrap().remove(0);
            assert_eq!(again, parsed, "{recorded}");
            // Users may not write the internal options the record holds.
            if options(&parsed).iter().any(|o| o.starts_with("__kappa")) {
                assert!(parse_statements(&recorded).is_err());
            }
        }
    }

    #[test]
    fn streaming_extensions() {
        let s = parse_statements(
            "CREATE TABLE bid (a INT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '5' SECOND, b TEXT)",
        )
        .unwrap();
        let Statement::CreateTable(ct) = &s[0] else {
            panic!()
        };
        assert_eq!(ct.columns.len(), 3);
        assert_eq!(
            options(&s[0]),
            vec!["__kappa_watermark = (ts, ts - INTERVAL '5' SECOND)"]
        );
        let s = parse_statements(
            "create source s (ts timestamp, watermark for ts as ts) with (connector = 'nexmark')",
        )
        .unwrap();
        assert_eq!(
            options(&s[0]),
            vec![
                "connector = 'nexmark'",
                "__kappa_source = true",
                "__kappa_watermark = (ts, ts)"
            ]
        );
        let s = parse_statements(
            "CREATE MATERIALIZED VIEW v AS SELECT 1 EMIT ON WINDOW CLOSE; SELECT 2",
        )
        .unwrap();
        assert_eq!(options(&s[0]), vec!["__kappa_emit_on_window_close = true"]);
        assert_eq!(s.len(), 2);
        // `watermark` stays an ordinary column name.
        let s = parse_statements("CREATE TABLE t (watermark INT)").unwrap();
        let Statement::CreateTable(ct) = &s[0] else {
            panic!()
        };
        assert_eq!(ct.columns.len(), 1);
        assert!(parse_statements("CREATE TABLE t (ts TIMESTAMP, WATERMARK FOR ts AS)").is_err());
        // Users cannot write the internal options themselves.
        let e =
            parse_statements("CREATE TABLE t (a INT) WITH (__kappa_source = true)").unwrap_err();
        assert_eq!(e.sqlstate(), SqlState::INVALID_PARAMETER_VALUE);
        assert!(parse_statements("CREATE MATERIALIZED VIEW v WITH (\"__Kappa_emit_on_window_close\" = true) AS SELECT 1").is_err());
    }
}
