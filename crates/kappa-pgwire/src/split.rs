//! Splitting a query string into statements at top-level semicolons (not inside quotes,
//! identifiers or comments), and recognising Kappa's own commands.

pub fn split_statements(sql: &str) -> Vec<String> {
    let b = sql.as_bytes();
    let mut out = vec![];
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            q @ (b'\'' | b'"') => {
                i += 1;
                while i < b.len() {
                    if b[i] == q {
                        if b.get(i + 1) == Some(&q) {
                            i += 2;
                            continue;
                        }
                        break;
                    }
                    i += 1;
                }
            }
            b'-' if b.get(i + 1) == Some(&b'-') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    i += 1;
                }
                i += 1;
            }
            b';' => {
                push(&mut out, &sql[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if start < sql.len() {
        push(&mut out, &sql[start..]);
    }
    out
}

fn push(out: &mut Vec<String>, part: &str) {
    let t = part.trim();
    // A part that is only comments is empty too.
    let meaningful = t
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with("--"));
    if meaningful {
        out.push(t.to_string());
    }
}

/// Kappa's own commands that the SQL parser does not know.
pub fn is_extension(sql: &str) -> bool {
    if kappa_sql::subscribe::parse_stream_command(sql).is_some() {
        return true;
    }
    let upper = sql.trim().to_uppercase();
    let words: Vec<&str> = upper.split_whitespace().collect();
    matches!(
        words.as_slice(),
        ["FLUSH"]
            | ["SHOW", "MATERIALIZED", "VIEWS"]
            | ["SHOW", "RELATIONS"]
            | ["EXPLAIN", "MATERIALIZED", "VIEW", _]
            | ["DESCRIBE", _]
            | ["DESC", _]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_at_top_level_semicolons_only() {
        let s = split_statements("select 'a;b'; select \"x;\" -- c;\n; /* ; */ select 3;;");
        assert_eq!(
            s,
            vec!["select 'a;b'", "select \"x;\" -- c;", "/* ; */ select 3"]
        );
        assert!(split_statements(" ; -- nothing\n").is_empty());
    }
}
