//! [`SseTrackerService`]: reads the owner, the session and the `Last-Event-ID` of a request.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderName, Method, Request, Response};
use tower::Service;

use crate::body::TrackedBody;
use crate::future::{RequestInfo, ResponseFuture, StoreLookup};
use crate::identity::{RequestOwner, StreamKind};
use crate::key::{EventId, LastEventId, Owner, StreamKey, StreamName};
use crate::protocol::Protocol;
use crate::replay::Replay;
use crate::shared::Shared;

/// Put in the request extensions by the layer, so that extractors can tell "no value" from
/// "no layer".
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerMarker;

/// The `Last-Event-ID` request header.
const LAST_EVENT_ID: HeaderName = HeaderName::from_static("last-event-id");

/// The tower [`Service`] made by [`SseTrackerLayer`](crate::SseTrackerLayer).
///
/// For each request it reads the owner (see [`OwnerSource`](crate::OwnerSource); invalid values
/// count as absent) and the `Last-Event-ID` header, and puts in the request extensions:
///
/// - [`SessionId`](crate::SessionId), with the default owner source, when the request carries a
///   valid session id;
/// - [`LastEventId`], when the header is valid;
/// - [`StreamKey`]: the key of the stream the request addresses: `(owner, "{METHOD} {path}")`,
///   or `(no owner, "GET {path}")` for the feed an anonymous `GET` reads (see
///   [`OwnerSource::session_header`](crate::OwnerSource::session_header): a `GET` whose
///   response assigns a session is keyed as anonymous); with a `Last-Event-ID`, the stream it
///   names (with [`StreamSource::event_id`](crate::StreamSource::event_id)). None for an
///   anonymous request of another method (its stream is its own, and not tracked), nor for
///   one whose response may still name its owner. With the default
///   [`StreamSource::route`](crate::StreamSource::route), whose concurrent responses get
///   streams `"{METHOD} {path} #2"`…: without a `Last-Event-ID`, the first of the route's
///   streams with no open body, which the response then gets (unless another response of the
///   route starts in between). With one: the route's stream whose latest id it is (one with no
///   open body first, an evicted one whose id is not written yet among them); else the
///   owner's only stream of the route with no open body (the client's, closed when it
///   dropped); else, when all have open bodies, the stream the response will get. The key is
///   left out rather than naming another client's stream: when the id is the latest of
///   several streams, when several closed streams could be the client's, when the owner lost
///   one of several streams of the route to eviction (the client's could be that one), and
///   when all [`MAX_CONCURRENT_STREAMS`](crate::MAX_CONCURRENT_STREAMS) streams of the route
///   have open bodies. The response's
///   body streams into the stream its request addressed whenever it is free. A handler resumes
///   with the key instead of writing names.
///
/// The response is checked for `Content-Type: text/event-stream`: other responses pass through
/// untouched; SSE responses get their body wrapped in a [`TrackedBody`] that records ids and
/// sends heartbeats, and the headers `Cache-Control: no-cache` and `X-Accel-Buffering: no` when
/// they do not set them.
///
/// ```
/// use tower::ServiceBuilder;
/// use tower_sse_tracker::SseTracker;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let tracker = SseTracker::builder().build().unwrap();
/// let service = ServiceBuilder::new()
///     .layer(tracker.layer())
///     .service_fn(|_req: http::Request<String>| async {
///         Ok::<_, std::convert::Infallible>(http::Response::new(String::from("hi")))
///     });
/// # let _ = service;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SseTrackerService<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> SseTrackerService<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Self { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for SseTrackerService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    ResBody: http_body::Body + Send + 'static,
{
    type Response = Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let config = &self.shared.config;
        let (owner, session) = config.owner.of_request(req.headers(), req.extensions());
        let last_event_id = req
            .headers()
            .get(&LAST_EVENT_ID)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            .filter(|v| v.len() <= config.max_id_len)
            .and_then(|v| EventId::new(v).ok());
        let mut addressed = None;
        let mut key = None;
        let mut ambiguous = false;
        // The owner the key is made with: known, or none (a request the session header does
        // not name is anonymous, unless its response names a session).
        let (key_owner, from_response) = match &owner {
            RequestOwner::Known(owner) => (Some(owner.clone()), false),
            RequestOwner::FromResponse => (Some(None), true),
            RequestOwner::Missing => (None, false),
        };
        if let Some(owner) = key_owner {
            let get = req.method() == Method::GET;
            // The stream the request addresses: the one its Last-Event-ID names (with ids that
            // name their stream); the route's stream it reads, for an owner (see
            // `Registry::address_route`: concurrent responses give a route several); the
            // route's feed, for an anonymous GET; else the route's.
            let route = StreamName::for_request(req.method(), req.uri().path()).ok();
            let stream = match (config.stream, &last_event_id, route, &owner) {
                // Its response may name the owner (MCP assigns sessions there): no key rather
                // than one of the wrong owner.
                (_, _, _, None) if from_response && !get => None,
                (StreamKind::EventId(format), Some(id), route, _) => format
                    .stream_of(id.as_str())
                    .and_then(|name| StreamName::new(name).ok())
                    .or(route),
                // Anonymous, not a GET: a stream of its own, which nothing addresses (and
                // which is not tracked).
                (StreamKind::EventId(_), None, _, None)
                | (StreamKind::Route { shared: false }, _, _, None)
                    if !get =>
                {
                    None
                }
                (StreamKind::Route { shared: false }, id, Some(route), Some(owner)) => {
                    // With replay on, the stream whose log holds the id is the client's, if
                    // one alone does; else the registry addresses it as without replay (and,
                    // when several logs hold the id, nothing is replayed).
                    let logged = match &id {
                        Some(id) if self.shared.replay.is_some() => {
                            self.shared.registry.logged_route_stream(owner, &route, id)
                        }
                        _ => Ok(None),
                    };
                    ambiguous = logged.is_err();
                    let stream = logged.ok().flatten().or_else(|| {
                        self.shared.registry.address_route(
                            owner.as_str(),
                            &route,
                            id.as_ref().map(|id| id.as_str()),
                        )
                    });
                    if stream.is_none() {
                        tracing::debug!(
                            %route,
                            "no stream key for the request: its Last-Event-ID could name several \
                             of the route's concurrent streams, or every one has an open body"
                        );
                    }
                    addressed.clone_from(&stream);
                    stream
                }
                (_, _, route, _) => route,
            };
            if let Some(stream) = stream {
                key = Some(StreamKey { owner, stream });
            }
        }
        // The replay, prepared now so that the application knows what its response follows.
        // A reconnect this instance cannot replay (it holds no log of the stream, or its log
        // lacks the client's event) may be answered from the store's log.
        let mut local_gap = false;
        let replay = match (&self.shared.replay, &last_event_id, config.stream) {
            (Some(replayer), Some(id), kind) => {
                // A stream of one owner is read by one client at a time: its reconnect's
                // response continues its history. Feeds and shared routes are read by several
                // at once, and their history by whichever body writes it. A stream named by
                // its ids is the one the client's id names.
                let own = matches!(kind, StreamKind::Route { shared: false })
                    && key.as_ref().is_some_and(|key| key.owner.is_some());
                let slot = key.as_ref().and_then(|key| {
                    self.shared
                        .registry
                        .get(key.owner.as_ref().map(Owner::as_str), key.stream.as_str())
                });
                let log = slot.as_ref().and_then(|s| s.existing_replay_log());
                local_gap = log.is_none() && !ambiguous;
                // A stream named by its ids: only a log the layer follows is looked up (a
                // look-up takes nothing from any other).
                let per_id = matches!(kind, StreamKind::EventId(_));
                // A reconnect to a stream of one owner is its client's: a body still attached
                // to the old connection leaves it (see `LocalTail::take_from_old_connection`).
                let one_owner = own || (per_id && key.as_ref().is_some_and(|k| k.owner.is_some()));
                let prepared = (!per_id || log.is_some_and(|log| log.follows()))
                    .then(|| replayer.prepare(log.filter(|_| !ambiguous), id, own, one_owner));
                local_gap |= !ambiguous
                    && prepared
                        .as_ref()
                        .is_some_and(|p| matches!(p.replay, Replay::Gap(_)));
                match (kind, prepared) {
                    (_, None) => None,
                    // A stream named by its ids: the layer answers only a reconnect to a
                    // detached stream, which it follows; any other goes to the application as
                    // without replay (MCP SDKs replay from their own event stores: one of
                    // them answers, never both).
                    (StreamKind::EventId(_), Some(prepared)) if prepared.tail.is_none() => None,
                    (_, Some(prepared)) => {
                        req.extensions_mut().insert(prepared.replay.clone());
                        Some(prepared)
                    }
                }
            }
            (None, _, _) | (_, None, _) => None,
        };
        let from_store = match (&self.shared.replay, &last_event_id, &key) {
            (Some(replayer), Some(id), Some(key))
                if local_gap && key.owner.is_some() && replayer.across_instances() =>
            {
                replayer
                    .store_permit()
                    .map(|permit| StoreLookup::new(&self.shared, key.clone(), id.clone(), permit))
            }
            _ => None,
        };
        if let Some(key) = key {
            req.extensions_mut().insert(key);
        }
        if let Some(id) = last_event_id {
            req.extensions_mut().insert(LastEventId(id));
        }
        if let Some(session) = session {
            req.extensions_mut().insert(session);
        }
        req.extensions_mut().insert(LayerMarker);
        let info = RequestInfo {
            owner,
            protocol: Protocol::of_request(req.headers()),
            method: req.method().clone(),
            uri: req.uri().clone(),
            addressed,
            replay,
            from_store,
            span: tracing::Span::current(),
        };
        if info.replay.as_ref().is_some_and(|p| p.tail.is_some()) {
            // A reconnect to a detached stream: the layer answers from its log; the
            // application, which handed the stream over, is not called.
            return ResponseFuture::answered(info, self.shared.clone());
        }
        ResponseFuture::new(self.inner.call(req), info, self.shared.clone())
    }
}
