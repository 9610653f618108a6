//! [`TrackedBody`]: passes an SSE body through, scanning it and sending heartbeats.
//!
//! - this module: the body, its frame loop and its scan of each frame;
//! - [`tracking`]: where the ids of a tracked body go (its slot or slots), and their hand-off to
//!   the worker;
//! - [`heartbeat`]: comments sent while the inner body is idle, and a BOM after one;
//! - [`drain`]: ending a body for a deploy, by whether its client can resume it.

mod detach;
mod drain;
mod durable;
mod heartbeat;
mod tracking;

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use crate::protocol::Resumption;
use crate::registry::handoff::Room;
use crate::replay::{AlsoCommit, FrameEvents, Tail, Writer};
use crate::scan::{Boundary, Scanner};
use crate::shared::Shared;
use detach::{Detacher, Held};
pub(crate) use detach::{ReadOn, detacher};
use durable::{Hold, poll_durable};
use tracking::{EVENTS_BATCH, Tracked};
pub(crate) use tracking::{Fallback, Tracking};

pin_project! {
    /// The response body of [`SseTrackerService`](crate::SseTrackerService).
    ///
    /// Non-SSE bodies pass through with nothing added: the same frames, size hint and end of
    /// stream. SSE bodies pass every byte through in the same frames; the layer scans them for
    /// dispatched ids and adds or removes bytes only where a client reads the same events:
    ///
    /// - after the heartbeat interval with no frame from the inner body, a heartbeat comment:
    ///   between events a whole comment event (`: keep-alive\n\n`), at the start of a line
    ///   inside an event a comment line only (`: keep-alive\n`), in the middle of a line
    ///   nothing until a later frame reaches a boundary. When the last byte of the stream was a
    ///   CR, the heartbeat's lines end with CR instead, so that a LF that comes next still pairs
    ///   with a CR, as it would have without it;
    /// - when a heartbeat went out before the inner body's first byte, a leading byte order
    ///   mark of the inner body is dropped (a client drops one only as the very first bytes it
    ///   reads); its bytes may be held back until the next frame says whether they are one;
    /// - while [draining](crate::SseTracker::drain), for a stream its client can resume (see
    ///   [`is_resumable`](Self::is_resumable)), a `retry` field and the end of the body at the
    ///   next event boundary (the frame holding it is cut after it); any stream ends at the
    ///   drain timeout.
    ///
    /// An SSE body has no declared length (the layer removes `Content-Length`).
    ///
    /// With replay on, a body whose response is marked [`Detach`](crate::Detach) is read on
    /// by a task of its own when it is dropped before its end (its client left), or when its
    /// client reconnects first; and a reconnect to such a stream gets a body that the layer
    /// makes from the stream's log, with no inner body (see [`get_ref`](Self::get_ref)).
    pub struct TrackedBody<B> {
        #[pin]
        inner: Inner<B>,
        sse: Option<Pin<Box<SseState>>>,
    }

    impl<B> PinnedDrop for TrackedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let InnerProj::Detachable { held } = this.project().inner.project() {
                held.client_left();
            }
        }
    }
}

pin_project! {
    /// What a [`TrackedBody`] reads from.
    #[project = InnerProj]
    enum Inner<B> {
        /// The application's body.
        Body { #[pin] body: B },
        /// The application's body and its state, held where a task can take them to read on
        /// when the client leaves (the response's `sse` is `None`).
        Detachable { held: Arc<Held<B>> },
        /// A stream's log, followed (no inner body).
        Tail { tail: Option<Tail> },
    }
}

/// What an SSE body reads: the application's body, or a stream's log.
pub(crate) enum Src<'a, B> {
    Body(Pin<&'a mut B>),
    Tail(&'a mut Option<Tail>),
}

impl<B> Inner<B> {
    fn get_ref(&self) -> Option<&B> {
        match self {
            Inner::Body { body } => Some(body),
            Inner::Detachable { .. } | Inner::Tail { .. } => None,
        }
    }
}

pin_project! {
    /// Everything an SSE body needs beyond the inner body, in one allocation per stream.
    pub(crate) struct SseState {
        scanner: Scanner,
        shared: Arc<Shared>,
        tracked: Option<Tracked>,
        // Start of the current quiet period: when the inner body was last found idle after a
        // frame, or the last heartbeat. The clock is read once per idle transition, not per
        // frame: `fresh` says a frame came since.
        quiet_since: Instant,
        fresh: bool,
        // The wait for room in the worker's channel, made the first time it is full.
        room: Option<Room>,
        // The one timer of the stream: heartbeats and the wait for room in the worker's
        // channel. Created the first time it is needed, then only reset.
        #[pin]
        sleep: Option<Sleep>,
        // Wakes an idle body when the tracker starts draining; made the first time the body
        // is idle.
        #[pin]
        drain_wait: Option<OwnedNotified>,
        // Draining: the timer of the drain deadline, made when a body is idle inside an event.
        drain_timer: Option<Pin<Box<Sleep>>>,
        // Trailers of the inner body held back while withheld bytes went out first.
        trailers: Option<http::HeaderMap>,
        // Draining: the `retry` field has been sent; the body has ended.
        retry_sent: bool,
        ended: bool,
        // The inner body has sent a byte.
        started: bool,
        // A heartbeat went out before the first byte: a leading byte order mark of the inner
        // body is dropped (a client drops it only as the very first bytes it reads). `Some(n)`:
        // watching, `n` bytes of it matched and withheld so far.
        strip_bom: Option<u8>,
        // Whether the request lets the client resume the stream (with ids), and whether the
        // client's last event id is one it would reconnect with (not none, not empty):
        // together, whether a drain may end the stream at a boundary.
        resumption: Resumption,
        has_last_id: bool,
        // The stream's span, tracked or not: `resumable` and `mcp_method` in it.
        span: tracing::Span,
        // The replay (or gap event), sent before the inner body's first byte.
        replay: Option<Bytes>,
        // The inner body reached its end (not a drain's cut).
        finished: bool,
        // With a stream per id and replay on: what the scan of a frame found, for the log.
        frame: Option<Box<FrameEvents>>,
        // Durable replay, for a body marked `Detach` while its client reads it: its frames
        // waiting for the store.
        hold: Option<Box<Hold>>,
    }

    impl PinnedDrop for SseState {
        fn drop(this: Pin<&mut Self>) {
            let resumable = this.is_resumable();
            this.shared.metrics.stream_ended(resumable);
        }
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn pass_through(inner: B) -> Self {
        Self {
            inner: Inner::Body { body: inner },
            sse: None,
        }
    }

    /// An empty body, with nothing to scan.
    pub(crate) fn empty() -> Self {
        Self {
            inner: Inner::Tail { tail: None },
            sse: None,
        }
    }

    /// An SSE body, tracked as `tracking` says (or scanned for heartbeats only); `detach`:
    /// read on by a task of its own if it is dropped before its end.
    pub(crate) fn sse(
        inner: B,
        shared: Arc<Shared>,
        tracking: Option<Tracking>,
        resumption: Resumption,
        span: tracing::Span,
        replay: Option<Bytes>,
        detach: Option<Detacher<B>>,
    ) -> Self {
        let durable = shared.replay.as_ref().and_then(|r| r.budget.durable);
        let mut state = SseState::new(shared, tracking, resumption, span, replay);
        if let Some(limit) = durable.filter(|_| detach.is_some() && state.tracked.is_some()) {
            *state.as_mut().project().hold = Some(Hold::new(limit));
        }
        match detach {
            Some(hold) => Self {
                inner: Inner::Detachable {
                    held: hold(inner, state),
                },
                sse: None,
            },
            None => Self {
                inner: Inner::Body { body: inner },
                sse: Some(state),
            },
        }
    }

    /// A body that follows a stream's log after its `replay`: see [`Tail`].
    pub(crate) fn tail(
        tail: Tail,
        shared: Arc<Shared>,
        resumption: Resumption,
        span: tracing::Span,
        replay: Bytes,
    ) -> Self {
        Self {
            inner: Inner::Tail { tail: Some(tail) },
            sse: Some(SseState::new(shared, None, resumption, span, Some(replay))),
        }
    }
}

impl SseState {
    fn new(
        shared: Arc<Shared>,
        tracking: Option<Tracking>,
        resumption: Resumption,
        span: tracing::Span,
        replay: Option<Bytes>,
    ) -> Pin<Box<Self>> {
        let tracked = tracking.map(|tracking| Tracked::new(tracking, shared.clone()));
        let mut state = SseState {
            scanner: Scanner::with_max_id_len(shared.config.max_id_len),
            shared,
            tracked,
            quiet_since: Instant::now(),
            fresh: false,
            room: None,
            sleep: None,
            drain_wait: None,
            drain_timer: None,
            trailers: None,
            retry_sent: false,
            ended: false,
            started: false,
            strip_bom: None,
            resumption,
            has_last_id: false,
            span,
            replay: None,
            finished: false,
            frame: None,
            hold: None,
        };
        if let Some(replay) = replay {
            // After a replay, what the inner body sends is in the middle of the client's
            // stream (and of the stream's log): a leading byte order mark of it is dropped,
            // as after a heartbeat.
            state.scanner.comment_inserted();
            state.strip_bom = Some(0);
            state.replay = Some(replay).filter(|bytes| !bytes.is_empty());
        }
        Box::pin(state)
    }
}

impl<B> TrackedBody<B> {
    /// What `f` says of the body's SSE state; `None` when it has none (not an SSE body, or a
    /// detached body gone to its task).
    fn state<R>(&self, f: impl FnOnce(&SseState) -> R) -> Option<R> {
        match (&self.inner, &self.sse) {
            (Inner::Detachable { held }, _) => held.state(|sse, _| f(sse)),
            (_, Some(sse)) => Some(f(sse)),
            (_, None) => None,
        }
    }

    /// Whether this body is an SSE body that the layer scans (tracked, or for heartbeats and
    /// draining only).
    pub fn is_scanned(&self) -> bool {
        self.sse.is_some() || matches!(self.inner, Inner::Detachable { .. })
    }

    /// Whether this body's ids are recorded in the tracker.
    pub fn is_tracked(&self) -> bool {
        self.state(|s| s.tracked.is_some()).unwrap_or(false)
    }

    /// Whether the client can resume this stream now: its last event id is one it reconnects
    /// with (an event carried an id, and the last id is not the empty reset), and its request
    /// does not say the protocol has no resumption (MCP 2026-07-28 and later). Whatever the
    /// method: an answer streamed on a POST whose events carry ids counts, its client resuming
    /// with a GET that carries `Last-Event-ID` (as MCP 2025-11-25 clients do). A stream that
    /// cannot be resumed is never ended early by a drain: it runs to its end, or to the drain
    /// timeout (see [`SseTracker::drain`](crate::SseTracker::drain)).
    pub fn is_resumable(&self) -> bool {
        self.state(SseState::is_resumable).unwrap_or(false)
    }

    /// The wrapped body: `None` for a body the layer makes from a stream's log (a reconnect
    /// to a [detached](crate::Detach) stream), which has none, and for a body marked
    /// [`Detach`](crate::Detach) (with replay on), which the layer holds where a task can take
    /// it when its client leaves or comes back on a new connection.
    pub fn get_ref(&self) -> Option<&B> {
        self.inner.get_ref()
    }
}

impl<B: fmt::Debug> fmt::Debug for TrackedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedBody")
            .field("inner", &self.inner.get_ref())
            .field("scanned", &self.is_scanned())
            .field("tracked", &self.is_tracked())
            .finish()
    }
}

fn into_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    // Zero-copy when `D` is `Bytes`, which is what hyper and axum bodies produce.
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

/// After ids were committed: whether the client's last event id is one it reconnects with (an
/// empty id resets it, and an `EventSource` then sends no `Last-Event-ID`); recorded in the
/// span when that changes.
#[inline]
fn note_last_id(
    scanner: &Scanner,
    has_last_id: &mut bool,
    resumption: &Resumption,
    span: &tracing::Span,
) {
    let now = scanner.last_committed().is_some_and(|id| !id.is_empty());
    if std::mem::replace(has_last_id, now) != now && *resumption == Resumption::ByIds {
        span.record("resumable", now);
    }
}

impl SseState {
    #[inline]
    fn on_data(self: Pin<&mut Self>, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let this = self.project();
        // `started` is set by `strip_bom`, which sees every byte of the inner body first.
        *this.fresh = true;
        let Some(tracked) = this.tracked else {
            if this.scanner.feed(data).ids > 0 {
                note_last_id(this.scanner, this.has_last_id, this.resumption, this.span);
            }
            return;
        };
        let mut sleep = this.sleep;
        let feed = if tracked.tracking.per_id.is_some() {
            // Every committed id goes to the stream it names; with replay on, for a response
            // marked `Detach`, the frame's events to the log of the first stream an id names.
            match &this.shared.replay {
                Some(replayer) if tracked.tracking.logs_per_id() => {
                    let frame = this.frame.get_or_insert_with(Box::default);
                    let feed = this.scanner.feed_sink(
                        data,
                        &mut AlsoCommit {
                            frame,
                            on_commit: |id: &[u8]| {
                                tracked.commit(id, sleep.as_mut());
                                tracked.tracking.log_from_first_stream(replayer);
                            },
                        },
                    );
                    tracked.tracking.write_per_id(data, frame);
                    feed
                }
                _ => this
                    .scanner
                    .feed_with(data, |id| tracked.commit(id, sleep.as_mut())),
            }
        } else if let Some(log) = &mut tracked.tracking.log {
            // Replay on: the frame's events go to the stream's log, then the latest id to its
            // slot, as below.
            let feed = this.scanner.feed_sink(data, log.sink());
            log.write(data);
            match this.scanner.last_committed().filter(|_| feed.ids > 0) {
                Some(id) => {
                    tracked.coalesced += feed.ids as u64 - 1;
                    tracked.commit(id, sleep.as_mut());
                }
                None => {
                    if let Some(slot) = &tracked.tracking.slot {
                        this.shared.registry.mark_active(slot.session());
                    }
                }
            }
            feed
        } else {
            // Latest only: of the ids committed in one frame, only the last is published. Its
            // bytes are copied into the slot's buffer: no allocation, no tracker-wide counter.
            let feed = this.scanner.feed(data);
            match this.scanner.last_committed().filter(|_| feed.ids > 0) {
                Some(id) => {
                    tracked.coalesced += feed.ids as u64 - 1;
                    tracked.commit(id, sleep.as_mut());
                }
                None => {
                    if let Some(slot) = &tracked.tracking.slot {
                        this.shared.registry.mark_active(slot.session());
                    }
                }
            }
            feed
        };
        if feed.ids > 0 {
            note_last_id(this.scanner, this.has_last_id, this.resumption, this.span);
        }
        if feed.events > 0 {
            tracked.events += feed.events as u64;
            if tracked.events >= EVENTS_BATCH {
                tracked.report_counts();
            }
        }
        if feed.ids_rejected > 0 {
            this.shared
                .metrics
                .ids_rejected
                .increment(feed.ids_rejected as u64);
            tracing::debug!(
                parent: &tracked.tracking.span,
                count = feed.ids_rejected,
                "ignored SSE id fields holding NUL, not valid UTF-8, or longer than max_id_len"
            );
        }
    }

    /// A frame's `data` on its way out: scanned, tracked and logged, or cut by a drain;
    /// `None` when nothing of it goes out yet (all withheld so far, or exactly a dropped BOM).
    #[inline(always)]
    fn data_out(mut self: Pin<&mut Self>, data: Bytes, draining: bool) -> Option<Bytes> {
        let mut data = self.as_mut().strip_bom(data)?;
        if draining && self.resumption != Resumption::Never {
            // The body ends after the first event after which the drain ends it (see
            // `on_data_while_draining`): cut it there.
            let end = self.as_mut().on_data_while_draining(&data);
            data.truncate(end);
        } else {
            self.on_data(&data);
        }
        Some(data)
    }

    /// The replay, the first time: it goes out before the inner body's first byte, as a
    /// heartbeat can (a byte order mark of the inner body is then dropped: see `sse`).
    fn take_replay(self: Pin<&mut Self>) -> Option<Bytes> {
        let this = self.project();
        let replay = this.replay.take()?;
        if this.tracked.is_none() && this.scanner.feed(&replay).ids > 0 {
            // A body the layer makes from a log: the client's last id is the replay's (for a
            // drain, which ends a stream the client can resume at a boundary).
            note_last_id(this.scanner, this.has_last_id, this.resumption, this.span);
        }
        Some(replay)
    }

    fn is_resumable(&self) -> bool {
        self.resumption == Resumption::ByIds && self.has_last_id
    }

    /// The writer of the body's log, if it has one.
    fn writer(&self) -> Option<&Writer> {
        self.tracked.as_ref().and_then(|t| t.tracking.log.as_ref())
    }
}

impl<B: Body> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        match (this.inner.project(), this.sse.as_mut()) {
            (InnerProj::Detachable { held }, _) => held.poll_frame(cx),
            (InnerProj::Body { body }, Some(sse)) => poll_sse(Src::Body(body), sse, cx),
            (InnerProj::Body { body }, None) => body
                .poll_frame(cx)
                .map(|frame| frame.map(|r| r.map(into_bytes))),
            (InnerProj::Tail { tail }, Some(sse)) => poll_sse(Src::<B>::Tail(tail), sse, cx),
            (InnerProj::Tail { .. }, None) => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        let ended = |sse: &SseState, inner_ended: bool| {
            sse.trailers.is_none()
                && sse.replay.is_none()
                && sse.hold.as_ref().is_none_or(|hold| hold.is_idle())
                && (sse.ended || inner_ended)
        };
        match (&self.inner, &self.sse) {
            (Inner::Detachable { held }, _) => held
                .state(|sse, body| ended(sse, body.is_end_stream()))
                .unwrap_or(true),
            (Inner::Body { body }, None) => body.is_end_stream(),
            (Inner::Body { body }, Some(sse)) => ended(sse, body.is_end_stream()),
            (Inner::Tail { tail }, None) => tail.is_none(),
            (Inner::Tail { tail }, Some(sse)) => ended(sse, tail.is_none()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.inner, &self.sse) {
            (Inner::Body { body }, None) => body.size_hint(),
            // Heartbeats may add bytes, a dropped BOM or a drain remove some: no bound is
            // known.
            _ => SizeHint::new(),
        }
    }
}

impl<B> Src<'_, B> {
    fn reborrow(&mut self) -> Src<'_, B> {
        match self {
            Src::Body(body) => Src::Body(body.as_mut()),
            Src::Tail(tail) => Src::Tail(tail),
        }
    }
}

/// Polls an SSE body's next frame: from `src` through the layer, with its state `sse`; with
/// durable replay, once the store holds its events.
#[inline(always)]
pub(crate) fn poll_sse<B: Body>(
    src: Src<'_, B>,
    sse: &mut Pin<Box<SseState>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    if sse.hold.is_some() {
        return poll_durable(src, sse, cx);
    }
    poll_frames(src, sse, cx)
}

/// [`poll_sse`] without durable replay's wait.
#[inline(always)]
fn poll_frames<B: Body>(
    mut src: Src<'_, B>,
    sse: &mut Pin<Box<SseState>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    if sse.ended {
        return Poll::Ready(None);
    }
    if let Some(trailers) = sse.as_mut().project().trailers.take() {
        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
    }
    if sse.replay.is_some()
        && let Some(replay) = sse.as_mut().take_replay()
    {
        return Poll::Ready(Some(Ok(Frame::data(replay))));
    }
    if sse.waiting_for_room() {
        ready!(sse.as_mut().poll_room(cx));
    }
    loop {
        let draining = sse.shared.drain.is_draining();
        // Draining, and this stream ends at its next event boundary.
        let cutting = draining && sse.cut_by_drain();
        if draining {
            if cutting && let Some(step) = sse.as_mut().drain_step() {
                return Poll::Ready(step.map(|bytes| Ok(Frame::data(bytes))));
            }
            if sse.as_mut().drain_overdue(None) {
                sse.as_mut().end_overdue();
                return Poll::Ready(None);
            }
        }
        // The source's poll is matched where it is made: a `Frame` is large (it may hold
        // trailers), and every move of one costs on small frames.
        let polled = match &mut src {
            Src::Body(body) => body.as_mut().poll_frame(cx),
            Src::Tail(tail) => match tail.as_mut().map(|tail| tail.poll_next(cx)) {
                Some(Poll::Ready(Some(data))) => match sse.as_mut().data_out(data, draining) {
                    Some(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    None => continue,
                },
                Some(Poll::Pending) => Poll::Pending,
                Some(Poll::Ready(None)) | None => Poll::Ready(None),
            },
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(mut data) => {
                    let data = data.copy_to_bytes(data.remaining());
                    match sse.as_mut().data_out(data, draining) {
                        Some(data) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        None => continue,
                    }
                }
                Err(trailers) => {
                    let trailers = into_bytes(trailers);
                    let Some(withheld) = sse.as_mut().take_withheld_bom() else {
                        return Poll::Ready(Some(Ok(trailers)));
                    };
                    // The withheld bytes were content: they go before the trailers.
                    sse.as_mut().on_data(&withheld);
                    *sse.as_mut().project().trailers = trailers.into_trailers().ok();
                    return Poll::Ready(Some(Ok(Frame::data(withheld))));
                }
            },
            // End of stream: an event cut off here is never committed.
            Poll::Ready(None) => {
                if draining {
                    // A stream the drain let run: it finished by itself.
                    sse.shared.metrics.streams_drained_completed.increment(1);
                }
                let withheld = sse.as_mut().take_withheld_bom();
                // Whatever goes out now, the inner body is not polled again.
                *sse.as_mut().project().ended = true;
                sse.as_mut().finish();
                return Poll::Ready(withheld.map(|bytes| Ok(Frame::data(bytes))));
            }
            Poll::Ready(Some(Err(error))) => {
                // The inner body failed: it is not polled again, nor read on detached (its
                // stream did not finish, and must not look finished).
                *sse.as_mut().project().ended = true;
                return Poll::Ready(Some(Err(error)));
            }
            Poll::Pending => {
                sse.as_mut().went_quiet();
                if sse.as_mut().poll_drain(cx) {
                    if sse.cut_by_drain() && sse.scanner.boundary() == Boundary::Event {
                        // The drain started while the body was idle between events.
                        continue;
                    }
                    if sse.as_mut().drain_overdue(Some(cx)) {
                        sse.as_mut().end_overdue();
                        return Poll::Ready(None);
                    }
                }
                return sse
                    .as_mut()
                    .poll_heartbeat(cx)
                    .map(|bytes| Some(Ok(Frame::data(bytes))));
            }
        }
    }
}
