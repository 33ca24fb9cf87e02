//! Parsing the sink commands, which sqlparser does not know:
//!
//! ```text
//! CREATE SINK [IF NOT EXISTS] name FROM relation WITH ( key = value, … )
//! DROP SINK [IF EXISTS] name
//! ```
//!
//! Each returns `None` when the text is not that command, and a syntax error (42601) when
//! it is one but malformed. Option keys are lower-cased; values are kept as written.

use std::collections::BTreeMap;

use kappa_common::{KappaError, Result, SqlState};

use crate::subscribe::Tokens;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkCommand {
    Create {
        name: String,
        if_not_exists: bool,
        /// The relation whose changes it writes.
        from: String,
        options: BTreeMap<String, String>,
    },
    Drop {
        name: String,
        if_exists: bool,
    },
}

/// Parses `sql` if it is `CREATE SINK …` or `DROP SINK …`.
pub fn parse_sink_command(sql: &str) -> Option<Result<SinkCommand>> {
    let mut t = Tokens::new(sql)?;
    let create = if t.keyword("CREATE") {
        true
    } else if t.keyword("DROP") {
        false
    } else {
        return None;
    };
    if !t.keyword("SINK") {
        return None;
    }
    Some(if create {
        create_rest(&mut t)
    } else {
        drop_rest(&mut t)
    })
}

fn create_rest(t: &mut Tokens) -> Result<SinkCommand> {
    let if_not_exists = if t.keyword("IF") {
        t.expect_keyword("NOT")?;
        t.expect_keyword("EXISTS")?;
        true
    } else {
        false
    };
    let name = t.name()?;
    t.expect_keyword("FROM")?;
    let from = t.name()?;
    let mut options = BTreeMap::new();
    if t.keyword("WITH") {
        for (k, v) in t.options()? {
            if options.insert(k.clone(), v).is_some() {
                return Err(KappaError::user(
                    SqlState::SYNTAX_ERROR,
                    format!("option \"{k}\" given twice"),
                ));
            }
        }
    }
    t.end()?;
    Ok(SinkCommand::Create {
        name,
        if_not_exists,
        from,
        options,
    })
}

fn drop_rest(t: &mut Tokens) -> Result<SinkCommand> {
    let if_exists = if t.keyword("IF") {
        t.expect_keyword("EXISTS")?;
        true
    } else {
        false
    };
    let name = t.name()?;
    t.end()?;
    Ok(SinkCommand::Drop { name, if_exists })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_commands() {
        let c = parse_sink_command(
            "CREATE SINK out FROM Spend WITH (connector = 'file', path = '/tmp/a b.jsonl', snapshot = false)",
        )
        .expect("ours")
        .expect("parses");
        let SinkCommand::Create {
            name,
            from,
            options,
            if_not_exists,
        } = c
        else {
            panic!("not a create");
        };
        assert_eq!(
            (name.as_str(), from.as_str(), if_not_exists),
            ("out", "spend", false)
        );
        assert_eq!(
            options.get("path").map(String::as_str),
            Some("/tmp/a b.jsonl")
        );
        assert_eq!(options.get("snapshot").map(String::as_str), Some("false"));
        assert_eq!(
            parse_sink_command("drop sink if exists out;").and_then(|r| r.ok()),
            Some(SinkCommand::Drop {
                name: "out".into(),
                if_exists: true
            })
        );
        assert!(parse_sink_command("CREATE TABLE t (a INT)").is_none());
        assert!(parse_sink_command("DROP TABLE t").is_none());
        assert!(
            parse_sink_command("CREATE SINK out WITH (path = 'x')").is_some_and(|r| r.is_err())
        );
        assert!(
            parse_sink_command("CREATE SINK o FROM v WITH (path = 'x', path = 'y')")
                .is_some_and(|r| r.is_err())
        );
    }
}
