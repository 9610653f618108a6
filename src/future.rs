//! [`ResponseFuture`]: decides, when the response arrives, whether and how to track it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, Uri};
use pin_project_lite::pin_project;

use crate::body::{TrackedBody, Tracking};
use crate::identity::{RequestOwner, StreamKind};
use crate::key::{Owner, StreamName};
use crate::metrics::{REASON_BAD_STREAM_NAME, REASON_ENCODED, REASON_NO_SESSION};
use crate::registry::Slot;
use crate::tracker::Shared;

const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// What the service keeps of a request until its response arrives.
#[derive(Debug)]
pub(crate) struct RequestInfo {
    pub(crate) owner: RequestOwner,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    /// The route stream the request addressed (in its `StreamKey`), which its response's body
    /// takes when it is free.
    pub(crate) addressed: Option<StreamName>,
    /// The span current when the request came in: each tracked stream's span is its child.
    pub(crate) span: tracing::Span,
}

pin_project! {
    /// The response future of [`SseTrackerService`](crate::SseTrackerService).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        info: Option<RequestInfo>,
        shared: Arc<Shared>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, info: RequestInfo, shared: Arc<Shared>) -> Self {
        Self {
            inner,
            info: Some(info),
            shared,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = ready!(this.inner.poll(cx))?;
        let info = this
            .info
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(Ok(track_response(this.shared, info, response)))
    }
}

/// Whether the media type is `text/event-stream` (parameters and case ignored).
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/event-stream"))
}

fn track_response<B: http_body::Body>(
    shared: &Arc<Shared>,
    info: RequestInfo,
    response: Response<B>,
) -> Response<TrackedBody<B>> {
    if !is_event_stream(response.headers()) {
        return response.map(TrackedBody::pass_through);
    }
    if let Some(encoding) = response
        .headers()
        .get(CONTENT_ENCODING)
        .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
    {
        // Compressed bytes can be neither scanned nor given heartbeats: pass them through.
        shared.metrics.untracked_encoded.increment(1);
        if !shared
            .encoded_warned
            .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            tracing::warn!(
                parent: &info.span,
                reason = REASON_ENCODED,
                encoding = ?encoding,
                path = info.uri.path(),
                "SSE response with a Content-Encoding: not tracked and no heartbeats; add the \
                 tracker's layer before (inside) the compression layer, so that it sees the \
                 bytes uncompressed, or leave text/event-stream uncompressed (logged once)"
            );
        }
        return response.map(TrackedBody::pass_through);
    }
    let (mut parts, body) = response.into_parts();
    let config = &shared.config;
    let headers = &mut parts.headers;
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if config.accel_buffering_off && !headers.contains_key(&X_ACCEL_BUFFERING) {
        headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    }
    // Heartbeats add bytes, a dropped BOM or a drain removes some: a declared length would be
    // wrong.
    headers.remove(CONTENT_LENGTH);
    // Untracked bodies are wrapped too: they get heartbeats, and a drain ends them.
    let tracking = tracking(shared, info, &parts);
    Response::from_parts(parts, TrackedBody::sse(body, shared.clone(), tracking))
}

/// How an SSE response is tracked, or `None` (counted, with the reason) when it cannot be.
fn tracking(shared: &Shared, info: RequestInfo, parts: &http::response::Parts) -> Option<Tracking> {
    let metrics = &shared.metrics;
    let owner: Option<Owner> = match &info.owner {
        RequestOwner::Known(owner) => owner.clone(),
        RequestOwner::FromResponse => match shared.config.owner.of_response(&parts.headers) {
            Some(owner) => Some(owner),
            None => return untracked_no_owner(shared, &info),
        },
        RequestOwner::Missing => return untracked_no_owner(shared, &info),
    };
    let explicit = parts.extensions.get::<StreamName>().cloned();
    let route = match explicit.clone() {
        Some(name) => name,
        None => match StreamName::for_request(&info.method, info.uri.path()) {
            Ok(name) => name,
            Err(error) => {
                metrics.untracked_bad_stream_name.increment(1);
                tracing::debug!(
                    parent: &info.span,
                    reason = REASON_BAD_STREAM_NAME,
                    %error,
                    "SSE stream not tracked: the default stream name is invalid"
                );
                return None;
            }
        },
    };
    match shared.config.stream {
        StreamKind::EventId(format) => {
            // The stream of each id is found as ids come; the route's is the fallback.
            let span = tracing::debug_span!(
                parent: &info.span,
                "sse_stream",
                owner = %owner.as_ref().map_or("-", Owner::as_str),
                stream = tracing::field::Empty
            );
            Some(Tracking::per_id(owner, format, route, span))
        }
        StreamKind::Route { shared: share } => {
            let share = share || explicit.is_some();
            let prefer = info.addressed.as_ref().filter(|_| !share);
            let slot = open_route(shared, owner.as_ref(), &route, share, prefer, &info)?;
            let span = tracing::debug_span!(
                parent: &info.span,
                "sse_stream",
                owner = %owner.as_ref().map_or("-", Owner::as_str),
                stream = %slot.key().stream
            );
            span.in_scope(|| tracing::debug!("tracking SSE stream"));
            Some(Tracking::fixed(slot, span))
        }
    }
}

fn untracked_no_owner(shared: &Shared, info: &RequestInfo) -> Option<Tracking> {
    shared.metrics.untracked_no_session.increment(1);
    tracing::debug!(
        parent: &info.span,
        reason = REASON_NO_SESSION,
        method = %info.method,
        path = info.uri.path(),
        "SSE stream not tracked: no valid owner (session id) on the request or response"
    );
    None
}

/// The slot of a route's stream for this response (see [`Registry::open_route`]), counting
/// what cannot be tracked.
///
/// [`Registry::open_route`]: crate::registry::Registry::open_route
fn open_route(
    shared: &Shared,
    owner: Option<&Owner>,
    route: &StreamName,
    share: bool,
    prefer: Option<&StreamName>,
    info: &RequestInfo,
) -> Option<Arc<Slot>> {
    match shared.registry.open_route(owner, route, share, prefer) {
        Ok((slot, _evicted)) => Some(slot),
        Err(refused) => {
            // Counted before the log, whose fields are evaluated only when it is enabled.
            let reason = shared.metrics.untracked(refused);
            tracing::debug!(
                parent: &info.span,
                reason,
                stream = %route,
                "SSE stream not tracked: {}",
                refused.explain()
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_stream_media_type_ignores_case_and_parameters() {
        let mut h = HeaderMap::new();
        for (value, expected) in [
            ("text/event-stream", true),
            ("Text/Event-Stream; charset=utf-8", true),
            (" text/event-stream ;x=y", true),
            ("text/event-streams", false),
            ("application/json", false),
        ] {
            h.insert(CONTENT_TYPE, HeaderValue::from_static(value));
            assert_eq!(is_event_stream(&h), expected, "{value}");
        }
        assert!(!is_event_stream(&HeaderMap::new()));
    }
}
