//! Usage export, streamed: pages of records are read from the store and written to the client
//! as they come, so an export of any size never sits whole in memory. JSON lines or CSV, one
//! record per request, columns in [`EXPORT_COLUMNS`] order.

use super::{UsageRecord, EXPORT_COLUMNS};
use crate::store::{Store, StoreError, UsageFilter};
use bytes::Bytes;
use chrono::{DateTime, NaiveDate, Utc};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use serde_json::{json, Value};

/// Records per store read.
const PAGE: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Csv,
}

/// The query of an export request: `from`, `to` (RFC 3339 or `YYYY-MM-DD`), `format`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    pub format: Format,
}

fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, String> {
    let value = value
        .replace("%3A", ":")
        .replace("%3a", ":")
        .replace("%2B", "+")
        .replace("%2b", "+");
    if let Ok(t) = DateTime::parse_from_rfc3339(&value) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(&value, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|t| t.and_utc())
        .ok_or_else(|| format!("`{name}` must be an RFC 3339 time or a YYYY-MM-DD date"))
}

impl ExportQuery {
    pub fn parse(query: Option<&str>) -> Result<ExportQuery, String> {
        let mut q = ExportQuery {
            from: None,
            to: None,
            format: Format::Jsonl,
        };
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "from" => q.from = Some(parse_time("from", v)?),
                "to" => q.to = Some(parse_time("to", v)?),
                "format" => {
                    q.format = match v {
                        "jsonl" | "ndjson" | "json" => Format::Jsonl,
                        "csv" => Format::Csv,
                        other => return Err(format!("`format` must be jsonl or csv, not `{other}`")),
                    }
                }
                other => return Err(format!("unknown parameter `{other}`")),
            }
        }
        if let (Some(from), Some(to)) = (q.from, q.to) {
            if from > to {
                return Err("`from` is after `to`".into());
            }
        }
        Ok(q)
    }
}

fn values(r: &UsageRecord) -> [Value; 20] {
    [
        json!(r.request_id),
        json!(r.created_at),
        json!(r.key_id),
        json!(r.route),
        json!(r.requested_model),
        json!(r.routed_model),
        json!(r.provider),
        json!(r.task),
        json!(r.status),
        json!(r.input_tokens),
        json!(r.output_tokens),
        json!(r.cached_tokens),
        json!(r.reasoning_tokens),
        json!(r.cost_nano_usd),
        json!(r.unbilled_nano_usd),
        json!(r.estimated),
        json!(r.latency_ms),
        json!(r.ttfb_ms),
        json!(r.cache_hit),
        json!(r.end_user),
    ]
}

/// One record as an export line.
pub fn line(r: &UsageRecord, format: Format) -> String {
    let values = values(r);
    match format {
        Format::Jsonl => {
            let map: serde_json::Map<String, Value> =
                EXPORT_COLUMNS.iter().map(|c| c.to_string()).zip(values).collect();
            let mut s = Value::Object(map).to_string();
            s.push('\n');
            s
        }
        Format::Csv => {
            let cells: Vec<String> = values
                .iter()
                .map(|v| match v {
                    Value::Null => String::new(),
                    Value::String(s) => csv_cell(s),
                    other => other.to_string(),
                })
                .collect();
            let mut s = cells.join(",");
            s.push_str("\r\n");
            s
        }
    }
}

/// A text cell. One that a spreadsheet would read as a formula (it begins with `=`, `+`, `-`,
/// `@`, a tab or a carriage return: OWASP's CSV injection list) gets a leading `'`, so a model
/// or user name a client chose can never run in the account holder's spreadsheet.
fn csv_cell(s: &str) -> String {
    let formula = s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let s: std::borrow::Cow<str> = if formula { format!("'{s}").into() } else { s.into() };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

/// Stream the records matching `filter` to the client. A store failure after the first byte
/// ends the body without its terminator, so the client sees a truncated export, never a
/// silently short one.
pub async fn stream(
    session: &mut Session,
    store: &dyn Store,
    filter: UsageFilter,
    format: Format,
) -> Result<(), StoreError> {
    let (content_type, name) = match format {
        Format::Jsonl => ("application/x-ndjson", "usage.jsonl"),
        Format::Csv => ("text/csv; charset=utf-8", "usage.csv"),
    };
    // The first page before the header, so that a store that is down gets a proper error.
    let mut page = store.usage_page(&filter, None, PAGE).await?;
    let mut resp = ResponseHeader::build(200, Some(4)).map_err(|e| StoreError::Internal(e.to_string()))?;
    let _ = resp.insert_header(http::header::CONTENT_TYPE, content_type);
    let _ = resp.insert_header(
        http::header::CONTENT_DISPOSITION,
        format!("attachment; filename=\"{name}\""),
    );
    crate::proxy::frame_unknown_length(session, &mut resp);
    let gone = |_| StoreError::Unavailable("the client went away".into());
    session
        .write_response_header(Box::new(resp), false)
        .await
        .map_err(gone)?;
    if format == Format::Csv {
        let mut header = EXPORT_COLUMNS.join(",");
        header.push_str("\r\n");
        session
            .write_response_body(Some(Bytes::from(header)), false)
            .await
            .map_err(gone)?;
    }
    while let Some(last) = page.last() {
        let after = Some((last.created_at, last.request_id.clone()));
        let chunk: String = page.iter().map(|r| line(r, format)).collect();
        session
            .write_response_body(Some(Bytes::from(chunk)), false)
            .await
            .map_err(gone)?;
        if page.len() < PAGE as usize {
            break;
        }
        page = match store.usage_page(&filter, after, PAGE).await {
            Ok(p) => p,
            Err(e) => {
                session.set_keepalive(None);
                return Err(e);
            }
        };
    }
    session.write_response_body(None, true).await.map_err(gone)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_strictly() {
        let q = ExportQuery::parse(Some("from=2026-01-01&to=2026-02-01T00%3A00%3A00Z&format=csv")).unwrap();
        assert_eq!(q.format, Format::Csv);
        assert_eq!(q.from.unwrap().to_rfc3339(), "2026-01-01T00:00:00+00:00");
        assert!(ExportQuery::parse(Some("format=xml")).is_err());
        assert!(ExportQuery::parse(Some("from=yesterday")).is_err());
        assert!(ExportQuery::parse(Some("from=2026-02-01&to=2026-01-01")).is_err());
        assert!(ExportQuery::parse(Some("colour=red")).is_err());
        assert_eq!(ExportQuery::parse(None).unwrap().format, Format::Jsonl);
    }

    #[test]
    fn csv_cells_are_quoted_when_needed() {
        assert_eq!(csv_cell("plain"), "plain");
        assert_eq!(csv_cell("a,b"), "\"a,b\"");
        assert_eq!(csv_cell("say \"hi\""), "\"say \"\"hi\"\"\"");
        // Formulas stay text in a spreadsheet.
        assert_eq!(
            csv_cell("=HYPERLINK(\"http://x\")"),
            "\"'=HYPERLINK(\"\"http://x\"\")\""
        );
        assert_eq!(csv_cell("+1"), "'+1");
        assert_eq!(csv_cell("-2+3"), "'-2+3");
        assert_eq!(csv_cell("@SUM(A1)"), "'@SUM(A1)");
        assert_eq!(csv_cell("\tx"), "'\tx");
        assert_eq!(csv_cell("gpt-4o"), "gpt-4o", "a dash inside is fine");
    }
}
