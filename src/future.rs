//! [`ResponseFuture`]: decides, when the response arrives, whether and how to track it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, Uri};
use pin_project_lite::pin_project;

use crate::body::TrackedBody;
use crate::key::{SessionId, StreamName};
use crate::metrics::{REASON_BAD_STREAM_NAME, REASON_NO_SESSION, REASON_REGISTRY_FULL};
use crate::registry::Slot;
use crate::tracker::Shared;

const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// What the service keeps of a request until its response arrives.
#[derive(Debug)]
pub(crate) struct RequestInfo {
    pub(crate) session: Option<SessionId>,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
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
    let (mut parts, body) = response.into_parts();
    let config = &shared.config;
    let headers = &mut parts.headers;
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    }
    if config.accel_buffering_off && !headers.contains_key(&X_ACCEL_BUFFERING) {
        headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    }
    if config.heartbeat.is_some() {
        // Heartbeats add bytes, so a declared length would be wrong.
        headers.remove(CONTENT_LENGTH);
    }
    let slot = find_slot(shared, info, &parts);
    if slot.is_none() && config.heartbeat.is_none() {
        return Response::from_parts(parts, TrackedBody::pass_through(body));
    }
    Response::from_parts(parts, TrackedBody::sse(body, shared.clone(), slot))
}

/// The registry slot of an SSE response, or `None` (counted, with the reason) when it cannot be
/// tracked.
fn find_slot(
    shared: &Shared,
    info: RequestInfo,
    parts: &http::response::Parts,
) -> Option<Arc<Slot>> {
    let metrics = &shared.metrics;
    let session = info.session.or_else(|| {
        parts
            .headers
            .get(&shared.config.session_header)
            .and_then(|v| SessionId::from_bytes(v.as_bytes()).ok())
    });
    let Some(session) = session else {
        metrics.untracked_no_session.increment(1);
        tracing::debug!(
            reason = REASON_NO_SESSION,
            method = %info.method,
            path = info.uri.path(),
            "SSE stream not tracked: no valid session id"
        );
        return None;
    };
    let stream = match parts.extensions.get::<StreamName>() {
        Some(name) => name.clone(),
        None => match StreamName::for_request(&info.method, info.uri.path()) {
            Ok(name) => name,
            Err(error) => {
                metrics.untracked_bad_stream_name.increment(1);
                tracing::debug!(
                    reason = REASON_BAD_STREAM_NAME,
                    session = %session,
                    %error,
                    "SSE stream not tracked: the default stream name is invalid"
                );
                return None;
            }
        },
    };
    let Ok((slot, evicted)) = shared.registry.get_or_insert(&session, &stream, true) else {
        metrics.untracked_registry_full.increment(1);
        tracing::debug!(
            reason = REASON_REGISTRY_FULL,
            session = %session,
            stream = %stream,
            "SSE stream not tracked: every tracked stream has an open body (max_streams)"
        );
        return None;
    };
    if let Some(evicted) = evicted {
        metrics.evicted_lru.increment(1);
        let key = evicted.key();
        tracing::debug!(
            session = %key.session,
            stream = %key.stream,
            "registry full: evicted the least recently used stream"
        );
    }
    tracing::debug!(session = %session, stream = %stream, "tracking SSE stream");
    Some(slot)
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
