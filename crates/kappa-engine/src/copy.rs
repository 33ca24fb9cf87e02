//! `COPY t [(cols)] FROM STDIN` in PostgreSQL's text and CSV formats.
//!
//! The whole input is checked before anything is applied: a bad record fails the COPY with
//! its line number and no row of it is written.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, StringArray, new_null_array};
use datafusion::sql::sqlparser::ast::{
    CopyLegacyCsvOption, CopyLegacyOption, CopyOption, CopySource, CopyTarget, Statement,
};
use kappa_common::{KappaError, Result, SqlState};
use kappa_runtime::{Table, TableWrite};
use kappa_sql::parse::{normalize_ident, object_name};

use crate::dml::{cast_value, unconstrained};
use crate::{Engine, Output};

#[derive(Clone, Debug)]
pub struct CopyFormat {
    pub csv: bool,
    pub delimiter: u8,
    pub null: String,
    pub header: bool,
    pub quote: u8,
    pub escape: u8,
}

impl CopyFormat {
    fn text() -> Self {
        Self {
            csv: false,
            delimiter: b'\t',
            null: "\\N".into(),
            header: false,
            quote: b'"',
            escape: b'"',
        }
    }

    fn csv() -> Self {
        Self {
            csv: true,
            delimiter: b',',
            null: String::new(),
            header: false,
            quote: b'"',
            escape: b'"',
        }
    }
}

/// A COPY waiting for its data.
pub struct CopyIn {
    runtime: Arc<kappa_runtime::Runtime>,
    table: Arc<Table>,
    /// Target column of each input field, in input order.
    columns: Vec<usize>,
    pub format: CopyFormat,
}

impl CopyIn {
    pub fn num_columns(&self) -> usize {
        self.columns.len()
    }

    /// Parses all the data the client sent and applies it as one write. Returns the number
    /// of rows copied.
    pub async fn finish(self, data: &[u8]) -> Result<usize> {
        let records = if self.format.csv {
            parse_csv(data, &self.format)?
        } else {
            parse_text(data, &self.format)?
        };
        let skip = usize::from(self.format.header);
        let records = records.get(skip..).unwrap_or_default();
        let n = records.len();
        let schema = self.table.schema.clone();
        let mut cells: Vec<Vec<Option<&str>>> = vec![Vec::with_capacity(n); self.columns.len()];
        for (i, (line, rec)) in records.iter().enumerate() {
            if rec.len() != self.columns.len() {
                let what = if rec.len() > self.columns.len() {
                    "extra data after last expected column"
                } else {
                    "missing data for a column"
                };
                return Err(KappaError::user(
                    SqlState::BAD_COPY_FORMAT,
                    format!(
                        "COPY {}, line {line}: {what} (record {} has {} fields, expected {})",
                        self.table.name,
                        i + 1,
                        rec.len(),
                        self.columns.len()
                    ),
                ));
            }
            for (c, v) in cells.iter_mut().zip(rec) {
                c.push(v.as_deref());
            }
        }
        let mut columns: Vec<Option<ArrayRef>> = vec![None; schema.fields().len()];
        for (pos, &target) in self.columns.iter().enumerate() {
            let strings: ArrayRef = Arc::new(StringArray::from(std::mem::take(&mut cells[pos])));
            let field = schema.field(target);
            let arr = cast_value(&strings, field.data_type(), field.name()).map_err(|e| {
                KappaError::user(e.sqlstate(), format!("COPY {}: {e}", self.table.name))
            })?;
            columns[target] = Some(arr);
        }
        let columns: Vec<ArrayRef> = columns
            .into_iter()
            .zip(schema.fields())
            .map(|(c, f)| c.unwrap_or_else(|| new_null_array(f.data_type(), n)))
            .collect();
        let loose = unconstrained(&schema);
        let batch = RecordBatch::try_new_with_options(
            loose,
            columns,
            &datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
        )?;
        let _dml = self.table.lock_dml().await;
        let commit = self.table.apply(TableWrite {
            deletes: None,
            inserts: Some(batch),
        })?;
        drop(_dml);
        crate::acknowledge(&self.runtime, commit, &self.table).await?;
        Ok(n)
    }
}

pub(crate) fn start(engine: &Engine, stmt: Statement) -> Result<Output> {
    let Statement::Copy {
        source,
        to,
        target,
        options,
        legacy_options,
        ..
    } = stmt
    else {
        return Err(KappaError::internal("not a COPY"));
    };
    let CopySource::Table {
        table_name,
        columns,
    } = source
    else {
        return Err(KappaError::not_supported("COPY (query)"));
    };
    if to || !matches!(target, CopyTarget::Stdin) {
        return Err(KappaError::not_supported("COPY other than FROM STDIN"));
    }
    let name = object_name(&table_name)?;
    let table = engine.writable_table(&name)?;
    let mut format = CopyFormat::text();
    let set_csv = |f: &mut CopyFormat| {
        let mut c = CopyFormat::csv();
        c.header = f.header;
        *f = c;
    };
    for o in options {
        match o {
            CopyOption::Format(id) => match id.value.to_lowercase().as_str() {
                "csv" => set_csv(&mut format),
                "text" => {}
                other => return Err(KappaError::not_supported(format!("COPY format {other}"))),
            },
            CopyOption::Delimiter(c) => format.delimiter = ascii(c)?,
            CopyOption::Null(s) => format.null = s,
            CopyOption::Header(h) => format.header = h,
            CopyOption::Quote(c) => format.quote = ascii(c)?,
            CopyOption::Escape(c) => format.escape = ascii(c)?,
            CopyOption::Encoding(e)
                if e.eq_ignore_ascii_case("utf8") || e.eq_ignore_ascii_case("utf-8") => {}
            other => {
                return Err(KappaError::not_supported(format!(
                    "the COPY option {other}"
                )));
            }
        }
    }
    for o in legacy_options {
        match o {
            CopyLegacyOption::Csv(opts) => {
                set_csv(&mut format);
                for c in opts {
                    match c {
                        CopyLegacyCsvOption::Header => format.header = true,
                        CopyLegacyCsvOption::Quote(q) => format.quote = ascii(q)?,
                        CopyLegacyCsvOption::Escape(e) => format.escape = ascii(e)?,
                        other => {
                            return Err(KappaError::not_supported(format!(
                                "the COPY option {other}"
                            )));
                        }
                    }
                }
            }
            CopyLegacyOption::Delimiter(c) => format.delimiter = ascii(c)?,
            CopyLegacyOption::Null(s) => format.null = s,
            CopyLegacyOption::Header => format.header = true,
            other => {
                return Err(KappaError::not_supported(format!(
                    "the COPY option {other}"
                )));
            }
        }
    }
    let targets = if columns.is_empty() {
        (0..table.schema.fields().len()).collect()
    } else {
        columns
            .iter()
            .map(|c| {
                let n = normalize_ident(c);
                table.schema.index_of(&n).map_err(|_| {
                    KappaError::user(
                        SqlState::UNDEFINED_COLUMN,
                        format!("column \"{n}\" of relation \"{name}\" does not exist"),
                    )
                })
            })
            .collect::<Result<Vec<_>>>()?
    };
    Ok(Output::CopyIn(CopyIn {
        runtime: engine.runtime().clone(),
        table,
        columns: targets,
        format,
    }))
}

fn ascii(c: char) -> Result<u8> {
    u8::try_from(c).ok().filter(u8::is_ascii).ok_or_else(|| {
        KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            "COPY delimiter, quote and escape must be one ASCII character",
        )
    })
}

type Record = (usize, Vec<Option<String>>);

fn utf8(bytes: &[u8], line: usize) -> Result<String> {
    String::from_utf8(bytes.to_vec()).map_err(|_| {
        KappaError::user(
            SqlState("22021"),
            format!("COPY, line {line}: invalid UTF-8"),
        )
    })
}

/// PostgreSQL's text format: one row per line, fields split by the delimiter, `\N` is NULL,
/// backslash escapes. A line `\.` ends the data.
fn parse_text(data: &[u8], f: &CopyFormat) -> Result<Vec<Record>> {
    let mut out = vec![];
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    if body.is_empty() {
        return Ok(out);
    }
    for (i, raw) in body.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw == b"\\." {
            break;
        }
        let mut fields = vec![];
        for field in raw.split(|&b| b == f.delimiter) {
            if field == f.null.as_bytes() {
                fields.push(None);
                continue;
            }
            let mut v = Vec::with_capacity(field.len());
            let mut it = field.iter().copied().peekable();
            while let Some(b) = it.next() {
                if b != b'\\' {
                    v.push(b);
                    continue;
                }
                match it.next() {
                    Some(b'n') => v.push(b'\n'),
                    Some(b't') => v.push(b'\t'),
                    Some(b'r') => v.push(b'\r'),
                    Some(b'b') => v.push(8),
                    Some(b'f') => v.push(12),
                    Some(b'v') => v.push(11),
                    Some(d @ b'0'..=b'7') => {
                        let mut n = u32::from(d - b'0');
                        for _ in 0..2 {
                            match it.peek() {
                                Some(&d @ b'0'..=b'7') => {
                                    n = n * 8 + u32::from(d - b'0');
                                    it.next();
                                }
                                _ => break,
                            }
                        }
                        v.push((n & 0xFF) as u8);
                    }
                    Some(other) => v.push(other),
                    None => v.push(b'\\'),
                }
            }
            fields.push(Some(utf8(&v, line_no)?));
        }
        out.push((line_no, fields));
    }
    Ok(out)
}

/// CSV as PostgreSQL reads it: quoted fields may hold delimiters, quotes (doubled) and
/// newlines; an unquoted field equal to the NULL string is NULL, a quoted one never is.
fn parse_csv(data: &[u8], f: &CopyFormat) -> Result<Vec<Record>> {
    let mut out = vec![];
    let mut line = 1usize;
    let mut pos = 0usize;
    while pos < data.len() {
        let start_line = line;
        let mut fields: Vec<Option<String>> = vec![];
        loop {
            // one field
            let mut v = Vec::new();
            let mut quoted = false;
            if data.get(pos) == Some(&f.quote) {
                quoted = true;
                pos += 1;
                loop {
                    match data.get(pos) {
                        None => {
                            return Err(KappaError::user(
                                SqlState::BAD_COPY_FORMAT,
                                format!("COPY, line {start_line}: unterminated CSV quoted field"),
                            ));
                        }
                        Some(&b) if b == f.escape && data.get(pos + 1) == Some(&f.quote) => {
                            v.push(f.quote);
                            pos += 2;
                        }
                        Some(&b) if b == f.quote => {
                            pos += 1;
                            break;
                        }
                        Some(&b) => {
                            if b == b'\n' {
                                line += 1;
                            }
                            v.push(b);
                            pos += 1;
                        }
                    }
                }
            }
            while let Some(&b) = data.get(pos) {
                if b == f.delimiter || b == b'\n' || b == b'\r' {
                    break;
                }
                v.push(b);
                pos += 1;
            }
            let s = utf8(&v, start_line)?;
            fields.push(if !quoted && s == f.null {
                None
            } else {
                Some(s)
            });
            match data.get(pos) {
                Some(&b) if b == f.delimiter => {
                    pos += 1;
                }
                _ => break,
            }
        }
        if data.get(pos) == Some(&b'\r') {
            pos += 1;
        }
        if data.get(pos) == Some(&b'\n') {
            pos += 1;
            line += 1;
        }
        if fields.len() == 1 && fields[0].as_deref() == Some("\\.") {
            break;
        }
        out.push((start_line, fields));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_format_escapes_and_nulls() {
        let r = parse_text(b"1\ta\\tb\t\\N\n2\tx\\\\y\tz\n\\.\n", &CopyFormat::text()).unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, vec![Some("1".into()), Some("a\tb".into()), None]);
        assert_eq!(
            r[1].1,
            vec![Some("2".into()), Some("x\\y".into()), Some("z".into())]
        );
    }

    #[test]
    fn csv_quotes_and_nulls() {
        let r = parse_csv(
            b"1,\"a,b\",\n2,\"say \"\"hi\"\"\",\"\"\n3,\"two\nlines\",x\n",
            &CopyFormat::csv(),
        )
        .unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].1, vec![Some("1".into()), Some("a,b".into()), None]);
        assert_eq!(
            r[1].1,
            vec![Some("2".into()), Some("say \"hi\"".into()), Some("".into())]
        );
        assert_eq!(r[2].1[1], Some("two\nlines".into()));
        assert!(parse_csv(b"1,\"open", &CopyFormat::csv()).is_err());
    }
}
