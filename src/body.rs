//! [`TrackedBody`]: passes an SSE body through, scanning it and sending heartbeats.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::PollSender;

use crate::identity::IdStream;
use crate::key::{Owner, StreamName};
use crate::metrics::REASON_REGISTRY_FULL;
use crate::registry::{Open, Slot};
use crate::scan::{Boundary, Scanner};
use crate::tracker::Shared;

pin_project! {
    /// The response body of [`SseTrackerService`](crate::SseTrackerService).
    ///
    /// Non-SSE bodies pass through with nothing added: the same frames, size hint and end of
    /// stream. SSE bodies pass every byte through unchanged and in the same frames; the layer
    /// only scans them for dispatched ids and, after the heartbeat interval with no frame from
    /// the inner body, inserts a heartbeat comment where it cannot change an event:
    ///
    /// - between events, a whole comment event (`: keep-alive\n\n`);
    /// - at the start of a line inside an event, a comment line only (`: keep-alive\n`);
    /// - in the middle of a line, nothing, until a later frame reaches a boundary.
    ///
    /// When the last byte of the stream was a CR, the heartbeat's lines end with CR instead,
    /// so that a LF that comes next still pairs with a CR, as it would have without it.
    pub struct TrackedBody<B> {
        #[pin]
        inner: B,
        sse: Option<Pin<Box<SseState>>>,
    }
}

pin_project! {
    /// Everything an SSE body needs beyond the inner body, in one allocation per stream.
    struct SseState {
        scanner: Scanner,
        shared: Arc<Shared>,
        tracked: Option<Tracked>,
        // Start of the current quiet period: when the inner body was last found idle after a
        // frame, or the last heartbeat. The clock is read once per idle transition, not per
        // frame: `fresh` says a frame came since.
        quiet_since: Instant,
        fresh: bool,
        // Made the first time the channel is full.
        poll_sender: Option<PollSender<Arc<Slot>>>,
        // The one timer of the stream: heartbeats and the hand-off deadline. Created the first
        // time it is needed, then only reset.
        #[pin]
        sleep: Option<Sleep>,
    }
}

/// How an SSE response is tracked, decided when it starts.
pub(crate) struct Tracking {
    /// The slot ids go to, once known (from the start with a fixed stream; from the first id
    /// with a stream per id). Already counted as live by the registry.
    slot: Option<Arc<Slot>>,
    per_id: Option<PerId>,
    span: tracing::Span,
}

/// The stream of each committed id comes from the id.
struct PerId {
    owner: Option<Owner>,
    format: IdStream,
    /// The stream of ids that name none: the route's.
    fallback: StreamName,
}

impl Tracking {
    pub(crate) fn fixed(slot: Arc<Slot>, span: tracing::Span) -> Self {
        Self {
            slot: Some(slot),
            per_id: None,
            span,
        }
    }

    pub(crate) fn per_id(
        owner: Option<Owner>,
        format: IdStream,
        fallback: StreamName,
        span: tracing::Span,
    ) -> Self {
        Self {
            slot: None,
            per_id: Some(PerId {
                owner,
                format,
                fallback,
            }),
            span,
        }
    }
}

/// A tracked stream's state in its body; counts the stream as active while it lives.
struct Tracked {
    tracking: Tracking,
    shared: Arc<Shared>,
    /// The slot waits for room in the worker's channel (the body holds its queued flag).
    handoff: bool,
    /// Events not yet added to `sse_tracker_events_total`, and committed ids not yet added to
    /// `sse_tracker_records_coalesced_total` (ids that a newer id of the stream replaced before
    /// the worker read the slot): the counters are shared by every stream, so they are updated
    /// once per [`EVENTS_BATCH`] events and when the body ends.
    events: u64,
    coalesced: u64,
}

/// Events a body counts before it adds them to the shared counter.
const EVENTS_BATCH: u64 = 64;

impl Tracked {
    fn new(tracking: Tracking, shared: Arc<Shared>) -> Self {
        shared.metrics.streams_active.increment(1.0);
        Self {
            tracking,
            shared,
            handoff: false,
            events: 0,
            coalesced: 0,
        }
    }

    fn report_counts(&mut self) {
        let metrics = &self.shared.metrics;
        if self.events > 0 {
            metrics.events.increment(std::mem::take(&mut self.events));
        }
        if self.coalesced > 0 {
            metrics
                .records_coalesced
                .increment(std::mem::take(&mut self.coalesced));
        }
    }

    /// Makes `tracking.slot` the slot of the stream `id` goes to: with a stream per id, the
    /// one it names (opened, and the previous one closed, when it changes). False when the id
    /// cannot be tracked.
    fn select_slot(&mut self, id: &[u8]) -> bool {
        let Some(per_id) = &self.tracking.per_id else {
            return self.tracking.slot.is_some();
        };
        let named = std::str::from_utf8(id)
            .ok()
            .and_then(|id| per_id.format.stream_of(id));
        let name = named.unwrap_or(per_id.fallback.as_str());
        if self
            .tracking
            .slot
            .as_ref()
            .is_some_and(|slot| slot.key().stream == name)
        {
            return true;
        }
        // The stream changed (or this is the first id): a look-up, once per stream.
        let stream = match named.map(StreamName::new) {
            Some(Ok(stream)) => stream,
            Some(Err(_)) | None => per_id.fallback.clone(),
        };
        let shared = &*self.shared;
        match shared
            .registry
            .get_or_insert(per_id.owner.as_ref(), &stream, Open::Shared)
        {
            Ok((slot, evicted)) => {
                if evicted.is_some() {
                    shared.metrics.evicted_lru.increment(1);
                }
                if let Some(old) = self.tracking.slot.replace(slot) {
                    shared.registry.body_closed(&old);
                }
                self.tracking.span.record("stream", stream.as_str());
                tracing::debug!(parent: &self.tracking.span, "tracking SSE stream");
                true
            }
            Err(_) => {
                shared.metrics.untracked_registry_full.increment(1);
                tracing::debug!(
                    parent: &self.tracking.span,
                    reason = REASON_REGISTRY_FULL,
                    stream = %stream,
                    "SSE id not tracked: every tracked stream has an open body (max_streams)"
                );
                false
            }
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.report_counts();
        let shared = &self.shared;
        shared.metrics.streams_active.decrement(1.0);
        if let Some(slot) = &self.tracking.slot {
            if self.handoff {
                // The body goes while its slot waits for room in the channel: the registry's
                // dirty list takes the slot instead, so the worker still writes its latest id.
                shared.registry.push_dirty(slot.clone());
            }
            shared.registry.body_closed(slot);
        }
        tracing::debug!(parent: &self.tracking.span, "SSE stream closed");
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn pass_through(inner: B) -> Self {
        Self { inner, sse: None }
    }

    /// An SSE body, tracked as `tracking` says (or scanned for heartbeats only).
    pub(crate) fn sse(inner: B, shared: Arc<Shared>, tracking: Option<Tracking>) -> Self {
        let tracked = tracking.map(|tracking| Tracked::new(tracking, shared.clone()));
        let state = SseState {
            scanner: Scanner::with_max_id_len(shared.config.max_id_len),
            shared,
            tracked,
            quiet_since: Instant::now(),
            fresh: false,
            poll_sender: None,
            sleep: None,
        };
        Self {
            inner,
            sse: Some(Box::pin(state)),
        }
    }

    /// Whether this body is an SSE body that the layer scans (tracked or for heartbeats only).
    pub fn is_scanned(&self) -> bool {
        self.sse.is_some()
    }

    /// Whether this body's ids are recorded in the tracker.
    pub fn is_tracked(&self) -> bool {
        self.sse.as_ref().is_some_and(|s| s.tracked.is_some())
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: fmt::Debug> fmt::Debug for TrackedBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrackedBody")
            .field("inner", &self.inner)
            .field("scanned", &self.is_scanned())
            .field("tracked", &self.is_tracked())
            .finish()
    }
}

fn into_bytes<D: Buf>(frame: Frame<D>) -> Frame<Bytes> {
    // Zero-copy when `D` is `Bytes`, which is what hyper and axum bodies produce.
    frame.map_data(|mut data| data.copy_to_bytes(data.remaining()))
}

impl SseState {
    fn on_data(self: Pin<&mut Self>, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let mut this = self.project();
        let feed = this.scanner.feed(data);
        *this.fresh = true;
        let Some(tracked) = this.tracked else {
            return;
        };
        let shared = &**this.shared;
        if feed.events > 0 {
            tracked.events += feed.events as u64;
            if tracked.events >= EVENTS_BATCH {
                tracked.report_counts();
            }
        }
        if feed.ids_rejected > 0 {
            shared
                .metrics
                .ids_rejected
                .increment(feed.ids_rejected as u64);
            tracing::debug!(
                parent: &tracked.tracking.span,
                count = feed.ids_rejected,
                "ignored SSE id fields holding NUL or longer than max_id_len"
            );
        }
        // Latest only: of the ids committed in one frame, only the last is published. Its bytes
        // are copied into the slot's buffer: no allocation, no tracker-wide counter.
        let Some(bytes) = this.scanner.last_committed().filter(|_| feed.ids > 0) else {
            if let Some(slot) = &tracked.tracking.slot {
                shared.registry.mark_active(slot.session());
            }
            return;
        };
        if !tracked.select_slot(bytes) {
            return;
        }
        let slot = tracked.tracking.slot.as_ref().expect("a slot was selected");
        // Activity: atomic operations on the owner's state; no message, no task.
        shared.registry.mark_active(slot.session());
        let (_version, hand_over) = slot.publish(bytes, shared.registry.coarse_us());
        tracked.coalesced += feed.ids as u64 - u64::from(hand_over);
        if !hand_over {
            // The worker already owes this stream a look (once per flush at most): it reads the
            // latest id from the slot then.
            return;
        }
        match shared.worker.sender.try_send(slot.clone()) {
            Ok(()) => shared.metrics.records_enqueued.increment(1),
            Err(TrySendError::Full(_)) => {
                // The frame is delivered now; the next one waits for room, at most the send
                // timeout.
                tracked.handoff = true;
                let deadline = Instant::now() + shared.config.send_timeout;
                match this.sleep.as_mut().as_pin_mut() {
                    Some(sleep) => sleep.reset(deadline),
                    None => this.sleep.set(Some(sleep_until(deadline))),
                }
            }
            // Shut down: later ids stay in memory only (the shutdown report lists them).
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Ready once the slot is handed over, or its wait timed out (then the slot goes to the
    /// registry's dirty list: the worker persists its latest id at the next flush).
    fn poll_handoff(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let shared = &*this.shared;
        let Some(tracked) = this.tracked.as_mut() else {
            return Poll::Ready(());
        };
        let Some(slot) = tracked.tracking.slot.clone() else {
            tracked.handoff = false;
            return Poll::Ready(());
        };
        let sender = this
            .poll_sender
            .get_or_insert_with(|| PollSender::new(shared.worker.sender.clone()));
        match sender.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                tracked.handoff = false;
                if sender.send_item(slot).is_ok() {
                    shared.metrics.records_enqueued.increment(1);
                }
            }
            Poll::Ready(Err(_closed)) => tracked.handoff = false,
            Poll::Pending => {
                let sleep = this
                    .sleep
                    .as_mut()
                    .as_pin_mut()
                    .expect("the hand-off armed the timer");
                if sleep.poll(cx).is_pending() {
                    return Poll::Pending;
                }
                sender.abort_send();
                tracked.handoff = false;
                shared.registry.push_dirty(slot);
                shared.metrics.backpressure_timeouts.increment(1);
                tracing::warn!(
                    parent: &tracked.tracking.span,
                    timeout = ?shared.config.send_timeout,
                    "persistence worker's channel full: the stream's latest id will be written from memory"
                );
            }
        }
        Poll::Ready(())
    }

    /// The inner body has nothing now: a quiet period starts, unless one already runs.
    fn went_quiet(self: Pin<&mut Self>) {
        let this = self.project();
        if std::mem::take(this.fresh) {
            *this.quiet_since = Instant::now();
        }
    }

    fn handoff_pending(&self) -> bool {
        self.tracked.as_ref().is_some_and(|t| t.handoff)
    }

    /// Ready with a heartbeat when the inner body has been quiet for the interval and the
    /// stream is at a boundary; pending otherwise (with the timer armed).
    fn poll_heartbeat(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Bytes> {
        let mut this = self.project();
        let Some(heartbeat) = &this.shared.config.heartbeat else {
            return Poll::Pending;
        };
        loop {
            // The timer is never reset on the frame path: it may fire early (frames moved the
            // quiet period on), and is then pushed to the real due time here. That keeps the
            // per-frame cost to one clock read.
            let mut sleep = match this.sleep.as_mut().as_pin_mut() {
                Some(sleep) => sleep,
                None => {
                    this.sleep
                        .set(Some(sleep_until(*this.quiet_since + heartbeat.interval)));
                    this.sleep.as_mut().as_pin_mut().expect("just set")
                }
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let due = *this.quiet_since + heartbeat.interval;
            if now < due {
                sleep.reset(due);
                continue;
            }
            *this.quiet_since = now;
            let bytes = match (this.scanner.boundary(), this.scanner.after_cr()) {
                // Mid-line: inserting anything would corrupt the line. Wait another interval.
                (Boundary::Inside, _) => continue,
                (Boundary::Event, false) => heartbeat.event.clone(),
                (Boundary::Event, true) => heartbeat.event_cr.clone(),
                (Boundary::Line, false) => heartbeat.line.clone(),
                (Boundary::Line, true) => heartbeat.line_cr.clone(),
            };
            this.scanner.comment_inserted();
            this.shared.metrics.heartbeats.increment(1);
            return Poll::Ready(bytes);
        }
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
        if let Some(sse) = this.sse.as_mut()
            && sse.handoff_pending()
        {
            ready!(sse.as_mut().poll_handoff(cx));
        }
        let polled = this.inner.poll_frame(cx);
        let Some(sse) = this.sse.as_mut() else {
            return polled.map(|frame| frame.map(|r| r.map(into_bytes)));
        };
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = into_bytes(frame);
                if let Some(data) = frame.data_ref() {
                    sse.as_mut().on_data(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // End of stream or error: an event cut off here is never committed.
            Poll::Ready(other) => Poll::Ready(other.map(|r| r.map(into_bytes))),
            Poll::Pending => {
                sse.as_mut().went_quiet();
                sse.as_mut()
                    .poll_heartbeat(cx)
                    .map(|bytes| Some(Ok(Frame::data(bytes))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        match &self.sse {
            Some(sse) if sse.shared.config.heartbeat.is_some() => {
                // Heartbeats may add bytes: keep the lower bound, drop the upper one.
                let mut open = SizeHint::new();
                open.set_lower(hint.lower());
                open
            }
            _ => hint,
        }
    }
}
