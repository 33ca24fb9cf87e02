//! Parsing the change-stream commands, which sqlparser does not know:
//!
//! ```text
//! SUBSCRIBE [TO] name | ( query ) [WITH ( SNAPSHOT [= bool], PROGRESS [= bool] )]
//! DECLARE name CURSOR [WITHOUT HOLD | WITH HOLD] FOR SUBSCRIBE …
//! FETCH [FORWARD] [count | ALL | NEXT] [FROM | IN] name [WITH ( TIMEOUT = 'interval' )]
//! CLOSE name | ALL
//! COPY ( SUBSCRIBE … ) TO STDOUT [[WITH] ( FORMAT text | csv )]
//! ```
//!
//! Each returns `None` when the text is not that command at all, so that other statements
//! fall through to the SQL parser, and a syntax error (42601) when it is one but malformed.

use std::time::Duration;

use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};
use kappa_common::{KappaError, Result, SqlState};

/// What a subscription follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubscribeTarget {
    /// A table or materialized view, by its (folded) name.
    Relation(String),
    /// A query, as its SQL text.
    Query(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub target: SubscribeTarget,
    /// Send the contents at the start first (default true).
    pub snapshot: bool,
    /// Send a progress row when an epoch is complete (default false).
    pub progress: bool,
}

/// `FETCH`: how many rows (`None`: all that are ready), from which cursor, waiting how long
/// for the first one (`None`: until one comes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fetch {
    pub cursor: String,
    pub count: Option<u64>,
    pub timeout: Option<Duration>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyFormat {
    Text,
    Csv,
}

/// A change-stream command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamCommand {
    Subscribe(Subscribe),
    Declare {
        cursor: String,
        subscribe: Subscribe,
    },
    Fetch(Fetch),
    /// `None`: `CLOSE ALL`.
    Close(Option<String>),
    CopyOut {
        subscribe: Subscribe,
        format: CopyFormat,
    },
}

fn syntax(msg: impl std::fmt::Display) -> KappaError {
    KappaError::user(SqlState::SYNTAX_ERROR, format!("syntax error: {msg}"))
}

/// Tokens without whitespace and comments.
pub(crate) struct Tokens {
    pub(crate) toks: Vec<Token>,
    pub(crate) pos: usize,
}

impl Tokens {
    pub(crate) fn new(sql: &str) -> Option<Self> {
        let toks = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize().ok()?;
        let toks = toks
            .into_iter()
            .filter(|t| !matches!(t, Token::Whitespace(_)))
            .collect::<Vec<_>>();
        let mut toks = toks;
        while matches!(toks.last(), Some(Token::SemiColon)) {
            toks.pop();
        }
        Some(Self { toks, pos: 0 })
    }

    pub(crate) fn peek(&self) -> Option<&Token> {
        self.toks.get(self.pos)
    }

    pub(crate) fn next(&mut self) -> Option<Token> {
        let t = self.toks.get(self.pos).cloned();
        self.pos += 1;
        t
    }

    /// The next token is the keyword `kw` (unquoted word, any case): consumes it.
    pub(crate) fn keyword(&mut self, kw: &str) -> bool {
        match self.peek() {
            Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case(kw) => {
                self.pos += 1;
                true
            }
            _ => false,
        }
    }

    pub(crate) fn expect_keyword(&mut self, kw: &str) -> Result<()> {
        if self.keyword(kw) {
            Ok(())
        } else {
            Err(syntax(format!("expected {kw}, found {}", self.found())))
        }
    }

    pub(crate) fn token(&mut self, t: &Token) -> bool {
        if self.peek() == Some(t) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    pub(crate) fn expect(&mut self, t: &Token) -> Result<()> {
        if self.token(t) {
            Ok(())
        } else {
            Err(syntax(format!("expected {t}, found {}", self.found())))
        }
    }

    pub(crate) fn found(&self) -> String {
        match self.peek() {
            Some(t) => format!("\"{t}\""),
            None => "the end of the statement".into(),
        }
    }

    /// A name: an unquoted word is folded to lower case, a quoted one kept.
    pub(crate) fn name(&mut self) -> Result<String> {
        match self.next() {
            Some(Token::Word(w)) if w.quote_style.is_some() => Ok(w.value),
            Some(Token::Word(w)) => Ok(w.value.to_lowercase()),
            other => Err(syntax(format!(
                "expected a name, found {}",
                other.map_or("the end of the statement".into(), |t| format!("\"{t}\""))
            ))),
        }
    }

    pub(crate) fn end(&self) -> Result<()> {
        match self.peek() {
            None => Ok(()),
            Some(_) => Err(syntax(format!("unexpected {}", self.found()))),
        }
    }

    /// The tokens up to the `)` that closes an already consumed `(`, as SQL text.
    pub(crate) fn parenthesized_text(&mut self) -> Result<String> {
        let mut depth = 1;
        let mut text = String::new();
        loop {
            let t = self
                .next()
                .ok_or_else(|| syntax("a parenthesis is not closed"))?;
            match t {
                Token::LParen => depth += 1,
                Token::RParen => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(text.trim().to_string());
                    }
                }
                _ => {}
            }
            text.push_str(&t.to_string());
            text.push(' ');
        }
    }

    /// `( key [[=] value], … )` as (lower-case key, value text) pairs; a key without a
    /// value is `true`.
    pub(crate) fn options(&mut self) -> Result<Vec<(String, String)>> {
        self.expect(&Token::LParen)?;
        let mut out = Vec::new();
        loop {
            let key = self.name()?.to_lowercase();
            // `key = value`, `key value` (COPY's style) or a bare `key` (true).
            let explicit = self.token(&Token::Eq);
            let bare = matches!(self.peek(), Some(Token::Comma | Token::RParen));
            let value = if explicit || !bare {
                match self.next() {
                    Some(Token::SingleQuotedString(s)) => s,
                    Some(Token::Number(n, _)) => n,
                    Some(Token::Word(w)) => w.value.to_lowercase(),
                    other => {
                        return Err(syntax(format!(
                            "expected a value for option {key}, found {}",
                            other.map_or("the end of the statement".into(), |t| format!("\"{t}\""))
                        )));
                    }
                }
            } else {
                "true".into()
            };
            out.push((key, value));
            if self.token(&Token::Comma) {
                continue;
            }
            self.expect(&Token::RParen)?;
            return Ok(out);
        }
    }
}

fn boolean(key: &str, v: &str) -> Result<bool> {
    match v.to_lowercase().as_str() {
        "true" | "on" | "1" | "t" | "yes" => Ok(true),
        "false" | "off" | "0" | "f" | "no" => Ok(false),
        _ => Err(KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("option {key} takes a boolean, not '{v}'"),
        )),
    }
}

/// `SUBSCRIBE …` after the keyword.
fn subscribe_rest(t: &mut Tokens) -> Result<Subscribe> {
    t.keyword("TO");
    let target = if t.token(&Token::LParen) {
        SubscribeTarget::Query(t.parenthesized_text()?)
    } else {
        SubscribeTarget::Relation(t.name()?)
    };
    let mut s = Subscribe {
        target,
        snapshot: true,
        progress: false,
    };
    if t.keyword("WITH") {
        for (k, v) in t.options()? {
            match k.as_str() {
                "snapshot" => s.snapshot = boolean(&k, &v)?,
                "progress" => s.progress = boolean(&k, &v)?,
                _ => {
                    return Err(KappaError::user(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("unknown SUBSCRIBE option \"{k}\" (known: SNAPSHOT, PROGRESS)"),
                    ));
                }
            }
        }
    }
    Ok(s)
}

/// A PostgreSQL-style interval: `'1s'`, `'250ms'`, `'2 minutes'`, or a bare number of
/// seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let bad = || {
        KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("invalid interval '{text}' (write e.g. '1s', '250ms', '2 minutes')"),
        )
    };
    let s = text.trim().to_lowercase();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" | "second" | "seconds" => n,
        "ms" | "msec" | "millisecond" | "milliseconds" => n / 1e3,
        "us" | "microsecond" | "microseconds" => n / 1e6,
        "min" | "mins" | "minute" | "minutes" => n * 60.0,
        "h" | "hour" | "hours" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Parses `sql` if it is one of the change-stream commands.
pub fn parse_stream_command(sql: &str) -> Option<Result<StreamCommand>> {
    let mut t = Tokens::new(sql)?;
    let first = match t.peek() {
        Some(Token::Word(w)) if w.quote_style.is_none() => w.value.to_uppercase(),
        _ => return None,
    };
    match first.as_str() {
        "SUBSCRIBE" => {
            t.pos += 1;
            Some(subscribe_rest(&mut t).and_then(|s| t.end().map(|()| StreamCommand::Subscribe(s))))
        }
        "DECLARE" => {
            // Only a cursor over SUBSCRIBE is ours; other DECLAREs go to the SQL parser.
            let for_at = t.toks.iter().position(
                |x| matches!(x, Token::Word(w) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("FOR")),
            )?;
            match t.toks.get(for_at + 1) {
                Some(Token::Word(w))
                    if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("SUBSCRIBE") => {}
                _ => return None,
            }
            t.pos += 1;
            Some(declare_rest(&mut t))
        }
        "FETCH" => {
            t.pos += 1;
            Some(fetch_rest(&mut t))
        }
        "CLOSE" => {
            t.pos += 1;
            Some(if t.keyword("ALL") {
                t.end().map(|()| StreamCommand::Close(None))
            } else {
                t.name()
                    .and_then(|n| t.end().map(|()| StreamCommand::Close(Some(n))))
            })
        }
        "COPY" => {
            // Only `COPY (SUBSCRIBE …) TO STDOUT` is ours.
            let is_ours = matches!(t.toks.get(1), Some(Token::LParen))
                && matches!(t.toks.get(2), Some(Token::Word(w)) if w.quote_style.is_none() && w.value.eq_ignore_ascii_case("SUBSCRIBE"));
            if !is_ours {
                return None;
            }
            t.pos += 3;
            Some(copy_rest(&mut t))
        }
        _ => None,
    }
}

fn declare_rest(t: &mut Tokens) -> Result<StreamCommand> {
    let cursor = t.name()?;
    // BINARY, INSENSITIVE, SCROLL are PostgreSQL's; a subscription is a forward-only stream.
    t.keyword("NO");
    t.keyword("SCROLL");
    t.expect_keyword("CURSOR")?;
    if t.keyword("WITH") || t.keyword("WITHOUT") {
        t.expect_keyword("HOLD")?;
    }
    t.expect_keyword("FOR")?;
    t.expect_keyword("SUBSCRIBE")?;
    let subscribe = subscribe_rest(t)?;
    t.end()?;
    Ok(StreamCommand::Declare { cursor, subscribe })
}

fn fetch_rest(t: &mut Tokens) -> Result<StreamCommand> {
    t.keyword("FORWARD");
    let count = if t.keyword("ALL") {
        None
    } else if t.keyword("NEXT") {
        Some(1)
    } else {
        match t.peek() {
            Some(Token::Number(n, _)) => {
                let n = n.parse::<u64>().map_err(|_| {
                    KappaError::user(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("FETCH count must be a non-negative integer, not {n}"),
                    )
                })?;
                t.pos += 1;
                Some(n)
            }
            _ => Some(1),
        }
    };
    if !t.keyword("FROM") {
        t.keyword("IN");
    }
    let cursor = t.name()?;
    let mut timeout = None;
    if t.keyword("WITH") {
        for (k, v) in t.options()? {
            match k.as_str() {
                "timeout" => timeout = Some(parse_duration(&v)?),
                _ => {
                    return Err(KappaError::user(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!("unknown FETCH option \"{k}\" (known: TIMEOUT)"),
                    ));
                }
            }
        }
    }
    t.end()?;
    Ok(StreamCommand::Fetch(Fetch {
        cursor,
        count,
        timeout,
    }))
}

fn copy_rest(t: &mut Tokens) -> Result<StreamCommand> {
    let subscribe = subscribe_rest(t)?;
    t.expect(&Token::RParen)?;
    t.expect_keyword("TO")?;
    t.expect_keyword("STDOUT")?;
    let mut format = CopyFormat::Text;
    t.keyword("WITH");
    if t.peek() == Some(&Token::LParen) {
        for (k, v) in t.options()? {
            match (k.as_str(), v.as_str()) {
                ("format", "text") => format = CopyFormat::Text,
                ("format", "csv") => format = CopyFormat::Csv,
                _ => {
                    return Err(KappaError::user(
                        SqlState::INVALID_PARAMETER_VALUE,
                        format!(
                            "COPY (SUBSCRIBE …) TO STDOUT takes only FORMAT text or csv, not {k} {v}"
                        ),
                    ));
                }
            }
        }
    } else if t.keyword("CSV") {
        format = CopyFormat::Csv;
    }
    t.end()?;
    Ok(StreamCommand::CopyOut { subscribe, format })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(sql: &str) -> StreamCommand {
        parse_stream_command(sql)
            .expect("a stream command")
            .expect("parses")
    }

    fn relation(name: &str) -> SubscribeTarget {
        SubscribeTarget::Relation(name.into())
    }

    #[test]
    fn subscribe_forms() {
        assert_eq!(
            parse("SUBSCRIBE TO Spend"),
            StreamCommand::Subscribe(Subscribe {
                target: relation("spend"),
                snapshot: true,
                progress: false
            })
        );
        assert_eq!(
            parse("subscribe \"Spend\" with (snapshot = false, progress);"),
            StreamCommand::Subscribe(Subscribe {
                target: relation("Spend"),
                snapshot: false,
                progress: true
            })
        );
        let StreamCommand::Subscribe(s) = parse("SUBSCRIBE (SELECT a, count(*) FROM t GROUP BY a)")
        else {
            panic!("not a subscribe");
        };
        let SubscribeTarget::Query(q) = s.target else {
            panic!("not a query");
        };
        assert!(
            crate::parse::parse_statements(&q).is_ok(),
            "the query text parses: {q}"
        );
    }

    #[test]
    fn cursors() {
        assert!(matches!(
            parse("DECLARE c CURSOR FOR SUBSCRIBE v WITH (PROGRESS)"),
            StreamCommand::Declare { cursor, subscribe } if cursor == "c" && subscribe.progress
        ));
        assert_eq!(
            parse("FETCH 100 c WITH (timeout = '1s')"),
            StreamCommand::Fetch(Fetch {
                cursor: "c".into(),
                count: Some(100),
                timeout: Some(Duration::from_secs(1))
            })
        );
        assert_eq!(
            parse("fetch all from c"),
            StreamCommand::Fetch(Fetch {
                cursor: "c".into(),
                count: None,
                timeout: None
            })
        );
        assert_eq!(parse("FETCH c"), parse("FETCH NEXT FROM c"));
        assert_eq!(parse("CLOSE c"), StreamCommand::Close(Some("c".into())));
        assert_eq!(parse("CLOSE ALL"), StreamCommand::Close(None));
        assert!(matches!(
            parse("COPY (SUBSCRIBE v WITH (SNAPSHOT = false)) TO STDOUT WITH (FORMAT csv)"),
            StreamCommand::CopyOut { subscribe, format: CopyFormat::Csv } if !subscribe.snapshot
        ));
    }

    #[test]
    fn other_statements_are_not_ours() {
        assert!(parse_stream_command("SELECT 1").is_none());
        assert!(parse_stream_command("DECLARE c CURSOR FOR SELECT 1").is_none());
        assert!(parse_stream_command("COPY t TO STDOUT").is_none());
        assert!(parse_stream_command("COPY t FROM STDIN").is_none());
    }

    #[test]
    fn malformed_commands_are_syntax_errors() {
        for bad in [
            "SUBSCRIBE",
            "SUBSCRIBE v WITH (snapshot = maybe)",
            "SUBSCRIBE v WITH (colour = 1)",
            "FETCH 10 c WITH (timeout = 'soon')",
            "FETCH -1 c",
            "DECLARE c FOR SUBSCRIBE v",
            "SUBSCRIBE (SELECT 1",
            "COPY (SUBSCRIBE v) TO '/tmp/x'",
        ] {
            let e = parse_stream_command(bad)
                .expect("ours")
                .expect_err("malformed");
            assert!(
                e.sqlstate() == SqlState::SYNTAX_ERROR
                    || e.sqlstate() == SqlState::INVALID_PARAMETER_VALUE,
                "{bad}: {e}"
            );
        }
        assert_eq!(
            parse_duration("250ms").ok(),
            Some(Duration::from_millis(250))
        );
        assert_eq!(parse_duration("0").ok(), Some(Duration::ZERO));
        assert_eq!(
            parse_duration("2 minutes").ok(),
            Some(Duration::from_secs(120))
        );
    }
}
