//! What a request says of its protocol: whether the client can resume its stream, which decides
//! what a drain does to it.
//!
//! - Plain SSE, and MCP up to 2025-11-25: a client resumes a stream whose events carry ids by
//!   reconnecting with `Last-Event-ID`. A stream whose events carry none cannot be resumed: for
//!   a request stream (an LLM answer on a POST, a tool call) the cut loses the request.
//! - MCP 2026-07-28 and later (`MCP-Protocol-Version`) removed resumption: a broken response
//!   stream loses its request, and closing one cancels it. The exception is the
//!   `subscriptions/listen` stream (`Mcp-Method`), whose client re-issues the listen.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The MCP protocol version header.
const MCP_PROTOCOL_VERSION: HeaderName = HeaderName::from_static("mcp-protocol-version");
/// The MCP method header of MCP 2026-07-28 requests.
const MCP_METHOD: HeaderName = HeaderName::from_static("mcp-method");
/// The first MCP version without stream resumption.
const NO_RESUMPTION_SINCE: &str = "2026-07-28";
/// The MCP 2026-07-28 method whose stream carries long-lived notifications.
const LISTEN: &str = "subscriptions/listen";

/// Whether a stream's client can resume it, as far as its request says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resumption {
    /// Resumable once its events carry ids.
    ByIds,
    /// Never resumable: an MCP 2026-07-28 (or later) request stream, whose end cancels the
    /// request.
    Never,
    /// An MCP 2026-07-28 (or later) `subscriptions/listen` stream: its client re-issues the
    /// listen when it ends.
    Reissued,
}

/// What the layer reads of a request's protocol.
#[derive(Clone, Debug)]
pub(crate) struct Protocol {
    pub(crate) resumption: Resumption,
    /// `Mcp-Method`, for the stream's span.
    pub(crate) mcp_method: Option<HeaderValue>,
}

impl Protocol {
    pub(crate) fn of_request(headers: &HeaderMap) -> Self {
        let mcp_method = headers.get(MCP_METHOD).cloned();
        let without_resumption = headers
            .get(MCP_PROTOCOL_VERSION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| is_date(v) && v[..10] >= *NO_RESUMPTION_SINCE);
        let resumption = match &mcp_method {
            _ if !without_resumption => Resumption::ByIds,
            Some(method) if method.as_bytes() == LISTEN.as_bytes() => Resumption::Reissued,
            _ => Resumption::Never,
        };
        Self {
            resumption,
            mcp_method,
        }
    }
}

/// Whether `v` starts with a `YYYY-MM-DD` date, as MCP versions are named.
fn is_date(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() >= 10
        && b[..10].iter().enumerate().all(|(i, c)| {
            if i == 4 || i == 7 {
                *c == b'-'
            } else {
                c.is_ascii_digit()
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resumption(version: Option<&'static str>, method: Option<&'static str>) -> Resumption {
        let mut headers = HeaderMap::new();
        if let Some(v) = version {
            headers.insert(MCP_PROTOCOL_VERSION, HeaderValue::from_static(v));
        }
        if let Some(m) = method {
            headers.insert(MCP_METHOD, HeaderValue::from_static(m));
        }
        Protocol::of_request(&headers).resumption
    }

    #[test]
    fn mcp_2026_07_28_and_later_streams_are_never_resumed_but_a_listen_is_reissued() {
        assert_eq!(resumption(None, None), Resumption::ByIds);
        assert_eq!(resumption(Some("2025-11-25"), None), Resumption::ByIds);
        assert_eq!(
            resumption(Some("2025-06-18"), Some(LISTEN)),
            Resumption::ByIds
        );
        assert_eq!(resumption(Some("2026-07-28"), None), Resumption::Never);
        assert_eq!(
            resumption(Some("2026-07-28"), Some("tools/call")),
            Resumption::Never
        );
        assert_eq!(resumption(Some("2027-01-01"), None), Resumption::Never);
        assert_eq!(
            resumption(Some("2026-07-28"), Some(LISTEN)),
            Resumption::Reissued
        );
        // Not a date: read as an older protocol.
        assert_eq!(resumption(Some("DRAFT-2026"), None), Resumption::ByIds);
        assert_eq!(resumption(Some("2026-7-28"), None), Resumption::ByIds);
    }
}
