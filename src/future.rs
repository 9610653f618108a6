//! [`ResponseFuture`]: decides, when the response arrives, whether and how to track it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use http::header::{CACHE_CONTROL, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, Uri};
use pin_project_lite::pin_project;

use crate::body::{Fallback, TrackedBody, Tracking, detacher};
use crate::identity::{RequestOwner, StreamKind};
use crate::key::{EventId, StreamKey};
use crate::key::{Owner, StreamName};
use crate::metrics::Untracked;
use crate::protocol::{Protocol, Resumption};
use crate::registry::Slot;
use crate::replay::{
    Detach, GapReason, Looked, Prepared, REPLAY_HEADER, Replay, StoreReader, TailPermit, lookup,
};
use crate::shared::Shared;
use crate::store::BoxFuture;

const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// What the service keeps of a request until its response arrives.
#[derive(Debug)]
pub(crate) struct RequestInfo {
    pub(crate) owner: RequestOwner,
    pub(crate) protocol: Protocol,
    pub(crate) method: Method,
    pub(crate) uri: Uri,
    /// The route stream the request addressed (in its `StreamKey`), which its response's body
    /// takes when it is free.
    pub(crate) addressed: Option<StreamName>,
    /// The replay prepared for the request (replay on, with a `Last-Event-ID`).
    pub(crate) replay: Option<Prepared>,
    /// The look-up in the store of a reconnect this instance holds no log for (replay across
    /// instances): when the store answers, the layer does, and the inner service's future is
    /// dropped unpolled.
    pub(crate) from_store: Option<StoreLookup>,
    /// The span current when the request came in: each tracked stream's span is its child.
    pub(crate) span: tracing::Span,
}

/// A reconnect's look-up in the store, with what following the store's log then needs.
pub(crate) struct StoreLookup {
    read: BoxFuture<'static, Looked>,
    reader: StoreReader,
    id: EventId,
    permit: TailPermit,
}

impl std::fmt::Debug for StoreLookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLookup")
            .field("key", &self.reader.key)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl StoreLookup {
    /// Starts looking `id` up in the store's log of `key`.
    pub(crate) fn new(shared: &Shared, key: StreamKey, id: EventId, permit: TailPermit) -> Self {
        let limit = shared
            .replay
            .as_ref()
            .map_or(1024, |replayer| replayer.budget.policy.max_events);
        let reader = StoreReader {
            store: shared.store.clone(),
            key,
            timeout: shared.store_timeout,
            limit,
            errors: shared.metrics.store_errors.clone(),
        };
        // A client may name an event its producer has not appended yet (it appends once per
        // flush, after its client got the events): the look-up waits for up to three flushes.
        let every = shared.flush_interval;
        Self {
            read: lookup(reader.clone(), id.clone(), every, every.saturating_mul(3)),
            reader,
            id,
            permit,
        }
    }
}

pin_project! {
    /// The response future of [`SseTrackerService`](crate::SseTrackerService).
    #[derive(Debug)]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
        info: Option<RequestInfo>,
        shared: Arc<Shared>,
    }
}

pin_project! {
    #[project = StateProj]
    #[derive(Debug)]
    enum State<F> {
        /// The inner service's response is awaited.
        Called { #[pin] future: F },
        /// The layer answers from a stream's log, without calling the inner service.
        Answered,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(inner: F, info: RequestInfo, shared: Arc<Shared>) -> Self {
        Self {
            state: State::Called { future: inner },
            info: Some(info),
            shared,
        }
    }

    /// The layer's own answer: `info` holds a replay that follows a stream's log.
    pub(crate) fn answered(info: RequestInfo, shared: Arc<Shared>) -> Self {
        Self {
            state: State::Answered,
            info: Some(info),
            shared,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    B: http_body::Body + Send + 'static,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Some(info) = this.info.as_mut()
            && let Some(lookup) = &mut info.from_store
        {
            let looked = ready!(lookup.read.as_mut().poll(cx));
            let lookup = info.from_store.take().expect("a look-up");
            let replayer = this.shared.replay.as_ref().expect("replay is on");
            let every = this.shared.flush_interval;
            match replayer.prepare_from_store(
                looked,
                &lookup.id,
                lookup.reader,
                every,
                lookup.permit,
            ) {
                Ok(prepared) => {
                    // The store answers: the application's future is dropped, never polled.
                    info.replay = Some(prepared);
                    let info = this.info.take().expect("the request's info");
                    return Poll::Ready(Ok(tail_response(this.shared, info)));
                }
                // The application answers; the client is told why nothing was replayed.
                Err(Some(reason)) => {
                    if let Some(prepared) = &mut info.replay {
                        replayer.cancel(prepared, reason);
                    }
                }
                Err(None) => {}
            }
        }
        let response = match this.state.project() {
            StateProj::Called { future } => Some(ready!(future.poll(cx))?),
            StateProj::Answered => None,
        };
        let info = this
            .info
            .take()
            .expect("ResponseFuture polled after completion");
        Poll::Ready(Ok(match response {
            Some(response) => track_response(this.shared, info, response),
            None => tail_response(this.shared, info),
        }))
    }
}

/// The layer's answer to a reconnect to a [detached](crate::Detach) stream: the events the
/// client missed, then the stream's as they come, until it ends; `204 No Content` when it has
/// ended and the client missed nothing (an `EventSource` then stops reconnecting).
fn tail_response<B>(shared: &Arc<Shared>, mut info: RequestInfo) -> Response<TrackedBody<B>> {
    let replayer = shared
        .replay
        .as_ref()
        .expect("a tail comes from a replay log");
    let mut prepared = info.replay.take().expect("a tail comes with its replay");
    let header = replayer.sent(&prepared);
    let mut tail = prepared.tail.take().expect("a tail");
    // The client is back: a body still attached to its old connection leaves it.
    tail.take_from_old_connection();
    let events = prepared.events;
    let lost = matches!(prepared.replay, Replay::Gap(_));
    let span = stream_span(&info, if lost { "producer_lost" } else { "complete" });
    let mut response = if events == 0 && tail.is_finished() {
        span.in_scope(|| {
            tracing::debug!("the detached stream has ended, and the client missed nothing")
        });
        let mut response = Response::new(TrackedBody::empty());
        *response.status_mut() = http::StatusCode::NO_CONTENT;
        response
    } else {
        span.in_scope(|| {
            tracing::debug!(
                events,
                bytes = prepared.bytes.len(),
                "replayed the events the client missed; following the detached stream"
            )
        });
        let body = TrackedBody::tail(
            tail,
            shared.clone(),
            info.protocol.resumption,
            span,
            prepared.bytes,
        );
        let mut response = Response::new(body);
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        response
    };
    let headers = response.headers_mut();
    headers.insert(REPLAY_HEADER, header);
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if shared.config.accel_buffering_off {
        headers.insert(X_ACCEL_BUFFERING, HeaderValue::from_static("no"));
    }
    response
}

/// The span of an SSE body: whether its client can resume it, what was replayed, and the MCP
/// method of its request.
fn stream_span(info: &RequestInfo, replay: &'static str) -> tracing::Span {
    let span = tracing::debug_span!(
        parent: &info.span,
        "sse_stream",
        owner = tracing::field::Empty,
        stream = tracing::field::Empty,
        // Recorded when known: `true` once the client's last event id is one it can resume
        // from (and `false` if an empty id resets it), for a stream whose request allows
        // resumption; `false` from the start for one whose request does not (see
        // `Resumption`).
        resumable = tracing::field::Empty,
        // With replay on, for a request with a `Last-Event-ID`: `complete`, or the reason the
        // replay was impossible.
        replay = tracing::field::Empty,
        mcp_method = info
            .protocol
            .mcp_method
            .as_ref()
            .and_then(|m| m.to_str().ok()),
    );
    if !replay.is_empty() {
        span.record("replay", replay);
    }
    if info.protocol.resumption != Resumption::ByIds {
        span.record("resumable", false);
    }
    span
}

/// Whether the media type is `text/event-stream` (parameters and case ignored).
fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("text/event-stream"))
}

fn track_response<B: http_body::Body + Send + 'static>(
    shared: &Arc<Shared>,
    mut info: RequestInfo,
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
        let reason = shared.metrics.untracked(Untracked::Encoded);
        tracing::debug!(
            parent: &info.span,
            reason,
            encoding = ?encoding,
            path = info.uri.path(),
            "SSE response with a Content-Encoding passed through: not tracked, no heartbeats"
        );
        let mut response = response.map(TrackedBody::pass_through);
        // A replay cannot go into compressed bytes: the client is told none was sent.
        if let (Some(replayer), Some(mut prepared)) = (&shared.replay, info.replay.take()) {
            replayer.cancel(&mut prepared, GapReason::Encoded);
            response
                .headers_mut()
                .insert(REPLAY_HEADER, replayer.sent(&prepared));
            tracing::warn!(
                parent: &info.span,
                path = info.uri.path(),
                "replay not sent: the SSE response has a Content-Encoding (put the tracker \
                 inside the compression layer, or do not compress event streams)"
            );
        }
        return response;
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
    // Every SSE body has a span, tracked or not: whether its client can resume it, and the
    // MCP method of its request.
    let span = stream_span(&info, "");
    // Untracked bodies are wrapped too: they get heartbeats, and a drain ends them.
    let resumption = info.protocol.resumption;
    // The body continues the log its request was replayed from (which may add to the
    // replay), then the replay goes first; the header says what it is.
    let mut replay = info.replay.take();
    let mut tracking = tracking(shared, info, &parts, &span, replay.as_mut());
    if let (Some(replayer), Some(prepared)) = (&shared.replay, &replay) {
        parts.headers.insert(REPLAY_HEADER, replayer.sent(prepared));
        span.record(
            "replay",
            match &prepared.replay {
                Replay::Complete { .. } => "complete",
                Replay::Gap(reason) => reason.as_str(),
            },
        );
        span.in_scope(|| match &prepared.replay {
            Replay::Complete {
                events, position, ..
            } => tracing::debug!(
                events,
                bytes = prepared.bytes.len(),
                epoch = position.epoch,
                offset = position.offset,
                "replayed the events the client missed"
            ),
            Replay::Gap(reason) => tracing::debug!(
                reason = reason.as_str(),
                "replay impossible: the client's events are not in the stream's log"
            ),
        });
    }
    let prefix = replay.map(|prepared| prepared.bytes);
    // A stream that goes on without its client: its body can go to a task of its own.
    let marked = shared.replay.is_some() && parts.extensions.get::<Detach>().is_some();
    let detach = tracking
        .as_mut()
        .filter(|_| marked)
        .is_some_and(Tracking::mark_detachable)
        .then(detacher::<B>);
    Response::from_parts(
        parts,
        TrackedBody::sse(
            body,
            shared.clone(),
            tracking,
            resumption,
            span,
            prefix,
            detach,
        ),
    )
}

/// How an SSE response is tracked, or `None` (counted, with the reason) when it cannot be.
fn tracking(
    shared: &Shared,
    info: RequestInfo,
    parts: &http::response::Parts,
    span: &tracing::Span,
    replay: Option<&mut Prepared>,
) -> Option<Tracking> {
    let owner: Option<Owner> = match &info.owner {
        RequestOwner::Known(owner) => owner.clone(),
        // No session on the response either: anonymous.
        RequestOwner::FromResponse => shared.config.owner.of_response(&parts.headers),
        RequestOwner::Missing => return untracked(shared, &info, Untracked::NoOwner),
    };
    let explicit = parts.extensions.get::<StreamName>().cloned();
    let route = match explicit.clone() {
        Some(name) => name,
        None => match StreamName::for_request(&info.method, info.uri.path()) {
            Ok(name) => name,
            Err(error) => {
                tracing::debug!(parent: &info.span, %error, "invalid default stream name");
                return untracked(shared, &info, Untracked::BadStreamName);
            }
        },
    };
    span.record("owner", owner.as_ref().map_or("-", Owner::as_str));
    // Without an owner, a GET on a route is its feed, one stream for every reader; another
    // request's stream is its client's alone, and nothing names the client. A request of a
    // protocol without resumption (MCP 2026-07-28) has no ids to track either way.
    let anonymous_request = owner.is_none() && info.method != http::Method::GET;
    let anonymous = || {
        if info.protocol.resumption == Resumption::ByIds {
            Untracked::Anonymous
        } else {
            Untracked::NotResumable
        }
    };
    match shared.config.stream {
        // The stream of each id is found as ids come; the route's (or the feed) is where ids
        // that name no stream go.
        StreamKind::EventId(format) => {
            let fallback = if owner.is_some() {
                Fallback::Own
            } else if explicit.is_some() || !anonymous_request {
                Fallback::Feed
            } else {
                Fallback::Untracked
            };
            Some(Tracking::per_id(
                owner,
                format,
                route,
                fallback,
                span.clone(),
            ))
        }
        StreamKind::Route { shared: share } => {
            let feed = owner.is_none() && explicit.is_none() && !share;
            if feed && anonymous_request {
                return untracked(shared, &info, anonymous());
            }
            let share = share || explicit.is_some() || feed;
            let prefer = info.addressed.as_ref().filter(|_| !share);
            let slot = open_route(shared, owner.as_ref(), &route, share, prefer, &info)?;
            span.record("stream", slot.key().stream.as_str());
            span.in_scope(|| tracing::debug!("tracking SSE stream"));
            let log = match (&shared.replay, replay) {
                (None, _) => None,
                // A stream the handler named: its request was looked up as the route's, whose
                // log is not this stream's. Not replayed, nor logged (yet).
                (Some(replayer), Some(prepared)) if explicit.is_some() => {
                    replayer.cancel(prepared, GapReason::NoHistory);
                    None
                }
                (Some(_), None) if explicit.is_some() => None,
                (Some(replayer), replay) => replayer.writer_for(&slot, replay, span),
            };
            Some(Tracking::fixed(slot, span.clone(), log))
        }
    }
}

/// Counts an SSE response left untracked (logged once per reason).
fn untracked(shared: &Shared, info: &RequestInfo, why: Untracked) -> Option<Tracking> {
    let reason = shared.metrics.untracked(why);
    tracing::debug!(
        parent: &info.span,
        reason,
        method = %info.method,
        path = info.uri.path(),
        "SSE stream not tracked"
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
            let reason = shared.metrics.untracked(refused.into());
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
