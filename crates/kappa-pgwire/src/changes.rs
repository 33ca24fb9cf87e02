//! Streaming a subscription to the client: `SUBSCRIBE …` as rows, `COPY (SUBSCRIBE …) TO
//! STDOUT` as COPY data. Each epoch's rows are flushed as soon as they are ready (pgwire's
//! own response path buffers a response until it ends, and these never end on their own).
//! A stream ends when the subscription does (the view failed or was dropped, the client fell
//! behind: the error is returned for the caller to send) or when the client goes away (a
//! failed write: the connection ends, and with it the subscription and its listener). So
//! that a client that left is noticed while nothing changes, a second without rows sends a
//! heartbeat: a ParameterStatus message (`kappa_heartbeat`), which clients accept at any
//! time, also in the middle of a result or a COPY.

use std::fmt::Debug;
use std::sync::Arc;

use futures::{Sink, SinkExt};
use kappa_common::KappaError;
use kappa_engine::{Output, StreamCopyFormat, Subscription};
use pgwire::api::portal::Format;
use pgwire::api::results::{FieldInfo, Response};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyOutResponse};
use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
use pgwire::messages::startup::ParameterStatus;

/// How long a stream waits for rows before it sends a heartbeat.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(1);

/// The next rows, or `None` once the subscription ended (its reason in `ended`); sends a
/// heartbeat for every second without rows.
async fn next_rows<C>(
    client: &mut C,
    sub: &mut Subscription,
    ended: &mut Option<KappaError>,
) -> PgWireResult<Option<Vec<datafusion::arrow::array::RecordBatch>>>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    loop {
        match sub.fetch(None, Some(HEARTBEAT)).await {
            Ok(b) if b.is_empty() => {
                client
                    .send(PgWireBackendMessage::ParameterStatus(ParameterStatus::new(
                        "kappa_heartbeat".into(),
                        "1".into(),
                    )))
                    .await?;
            }
            Ok(b) => return Ok(Some(b)),
            Err(e) => {
                *ended = Some(e);
                return Ok(None);
            }
        }
    }
}

use crate::encode;

/// Sends responses that came before a stream in the same query string.
pub async fn send_responses<C>(client: &mut C, responses: Vec<Response>) -> PgWireResult<()>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    for r in responses {
        match r {
            Response::Query(q) => pgwire::api::query::send_query_response(client, q, true).await?,
            Response::Execution(tag)
            | Response::TransactionStart(tag)
            | Response::TransactionEnd(tag) => {
                pgwire::api::query::send_execution_response(client, tag).await?
            }
            _ => {}
        }
    }
    Ok(())
}

/// Streams `out` (a [`Output::Subscribe`] or [`Output::CopyOut`]) until it ends; returns why
/// it ended. `describe`: send the row description first (the simple protocol; the extended
/// one sent it with Describe).
pub async fn stream<C>(client: &mut C, out: Output, describe: bool) -> PgWireResult<KappaError>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    match out {
        Output::Subscribe(sub) => rows(client, *sub, describe).await,
        Output::CopyOut {
            subscription,
            format,
        } => copy(client, *subscription, format).await,
        _ => Ok(KappaError::internal("not a subscription")),
    }
}

async fn rows<C>(client: &mut C, mut sub: Subscription, describe: bool) -> PgWireResult<KappaError>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let fields = Arc::new(encode::fields(&sub.schema(), &Format::UnifiedText));
    if describe {
        let desc = RowDescription::new(fields.iter().map(FieldDescription::from).collect());
        client
            .send(PgWireBackendMessage::RowDescription(desc))
            .await?;
    }
    let mut ended = None;
    while let Some(batches) = next_rows(client, &mut sub, &mut ended).await? {
        for row in encode::encode_rows(fields.clone(), &batches)? {
            client.feed(PgWireBackendMessage::DataRow(row)).await?;
        }
        client.flush().await?;
    }
    Ok(ended.unwrap_or_else(|| KappaError::internal("the subscription ended without a reason")))
}

async fn copy<C>(
    client: &mut C,
    mut sub: Subscription,
    format: StreamCopyFormat,
) -> PgWireResult<KappaError>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    // COPY text and CSV are the text forms of the values, so the rows are encoded as text.
    let fields: Arc<Vec<FieldInfo>> = Arc::new(encode::fields(&sub.schema(), &Format::UnifiedText));
    let columns = fields.len();
    client
        .send(PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(
            0,
            columns as i16,
            vec![0; columns],
        )))
        .await?;
    let mut ended = None;
    while let Some(batches) = next_rows(client, &mut sub, &mut ended).await? {
        for row in encode::encode_rows(fields.clone(), &batches)? {
            let line = copy_line(&row, format);
            client
                .feed(PgWireBackendMessage::CopyData(CopyData::new(line.into())))
                .await?;
        }
        client.flush().await?;
    }
    Ok(ended.unwrap_or_else(|| KappaError::internal("the subscription ended without a reason")))
}

/// A text-format DataRow as one line of COPY text (tab-separated, `\N` for NULL, with
/// backslash escapes) or CSV (comma-separated, NULL unquoted and empty, a value quoted when
/// it holds a delimiter, quote or line break, or is empty).
fn copy_line(row: &DataRow, format: StreamCopyFormat) -> Vec<u8> {
    let mut out = Vec::with_capacity(row.data.len() + 8);
    let data = &row.data[..];
    let mut pos = 0;
    for i in 0..row.field_count.max(0) as usize {
        if i > 0 {
            out.push(match format {
                StreamCopyFormat::Text => b'\t',
                StreamCopyFormat::Csv => b',',
            });
        }
        let Some(len) = data
            .get(pos..pos + 4)
            .map(|b| i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            break;
        };
        pos += 4;
        if len < 0 {
            if format == StreamCopyFormat::Text {
                out.extend_from_slice(b"\\N");
            }
            continue;
        }
        let end = (pos + len as usize).min(data.len());
        let value = &data[pos..end];
        pos = end;
        match format {
            StreamCopyFormat::Text => {
                for &b in value {
                    match b {
                        b'\\' => out.extend_from_slice(b"\\\\"),
                        b'\t' => out.extend_from_slice(b"\\t"),
                        b'\n' => out.extend_from_slice(b"\\n"),
                        b'\r' => out.extend_from_slice(b"\\r"),
                        _ => out.push(b),
                    }
                }
            }
            StreamCopyFormat::Csv => {
                let quote = value.is_empty()
                    || value
                        .iter()
                        .any(|&b| matches!(b, b',' | b'"' | b'\n' | b'\r'));
                if quote {
                    out.push(b'"');
                    for &b in value {
                        if b == b'"' {
                            out.push(b'"');
                        }
                        out.push(b);
                    }
                    out.push(b'"');
                } else {
                    out.extend_from_slice(value);
                }
            }
        }
    }
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;

    fn row(fields: &[Option<&str>]) -> DataRow {
        let mut data = BytesMut::new();
        for f in fields {
            match f {
                None => data.extend_from_slice(&(-1i32).to_be_bytes()),
                Some(v) => {
                    data.extend_from_slice(&(v.len() as i32).to_be_bytes());
                    data.extend_from_slice(v.as_bytes());
                }
            }
        }
        DataRow::new(data, fields.len() as i16)
    }

    #[test]
    fn copy_lines_escape_like_postgres() {
        let r = row(&[Some("1"), None, Some("a\tb\\c\nd"), Some("")]);
        assert_eq!(
            String::from_utf8_lossy(&copy_line(&r, StreamCopyFormat::Text)),
            "1\t\\N\ta\\tb\\\\c\\nd\t\n"
        );
        let r = row(&[Some("1"), None, Some("x,\"y\""), Some("")]);
        assert_eq!(
            String::from_utf8_lossy(&copy_line(&r, StreamCopyFormat::Csv)),
            "1,,\"x,\"\"y\"\"\",\"\"\n"
        );
    }
}
