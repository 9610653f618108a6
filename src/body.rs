//! [`TrackedBody`]: passes an SSE body through, scanning it and sending heartbeats.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use metrics::Gauge;
use pin_project_lite::pin_project;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::PollSender;

use crate::key::EventId;
use crate::registry::Slot;
use crate::scan::{Boundary, Scanner};
use crate::tracker::Shared;
use crate::worker::Record;

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
        // Start of the current quiet period: the last frame, heartbeat or boundary check.
        quiet_since: Instant,
        // A record the worker's channel had no room for: the body waits (at most the send
        // timeout) for room before it pulls the next frame.
        handoff: Option<Record>,
        // Made the first time the channel is full.
        poll_sender: Option<PollSender<Record>>,
        // The one timer of the stream: heartbeats and the hand-off deadline. Created the first
        // time it is needed, then only reset.
        #[pin]
        sleep: Option<Sleep>,
    }
}

/// The registry slot of a tracked stream; counts the stream as active while it lives.
struct Tracked {
    slot: Arc<Slot>,
    active: Gauge,
}

impl Tracked {
    fn new(slot: Arc<Slot>, active: Gauge) -> Self {
        active.increment(1.0);
        slot.body_opened();
        Self { slot, active }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.active.decrement(1.0);
        self.slot.body_closed();
        let key = self.slot.key();
        tracing::debug!(session = %key.session, stream = %key.stream, "SSE stream closed");
    }
}

impl<B> TrackedBody<B> {
    pub(crate) fn pass_through(inner: B) -> Self {
        Self { inner, sse: None }
    }

    pub(crate) fn sse(inner: B, shared: Arc<Shared>, slot: Option<Arc<Slot>>) -> Self {
        let tracked = slot.map(|slot| Tracked::new(slot, shared.metrics.streams_active.clone()));
        let state = SseState {
            scanner: Scanner::with_max_id_len(shared.config.max_id_len),
            shared,
            tracked,
            quiet_since: Instant::now(),
            handoff: None,
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
        if this.shared.config.heartbeat.is_some() {
            *this.quiet_since = Instant::now();
        }
        let Some(tracked) = this.tracked else {
            return;
        };
        // Activity: atomic writes on the session's state; no message, no task.
        this.shared.registry.mark_active(tracked.slot.session());
        let metrics = &this.shared.metrics;
        if feed.events > 0 {
            metrics.events.increment(feed.events as u64);
        }
        if feed.ids_rejected > 0 {
            metrics.ids_rejected.increment(feed.ids_rejected as u64);
            let key = tracked.slot.key();
            tracing::debug!(
                session = %key.session,
                stream = %key.stream,
                count = feed.ids_rejected,
                "ignored SSE id fields holding NUL or longer than max_id_len"
            );
        }
        // Latest only: of the ids committed in one frame, only the last is published.
        let Some(bytes) = this.scanner.last_committed().filter(|_| feed.ids > 0) else {
            return;
        };
        let id = EventId::from_scanned(bytes);
        let version = tracked.slot.publish(id.clone(), &this.shared.registry);
        if tracked.slot.is_dirty() {
            // The worker will write this stream's latest id from the registry anyway; the
            // stream is not made to wait again until the worker has caught up with it.
            return;
        }
        let record = Record {
            slot: tracked.slot.clone(),
            id,
            version,
        };
        match this.shared.worker.sender.try_send(record) {
            Ok(()) => metrics.records_enqueued.increment(1),
            Err(TrySendError::Full(record)) => {
                // The frame is delivered now; the next one waits for room, at most the send
                // timeout.
                *this.handoff = Some(record);
                let deadline = Instant::now() + this.shared.config.send_timeout;
                match this.sleep.as_mut().as_pin_mut() {
                    Some(sleep) => sleep.reset(deadline),
                    None => this.sleep.set(Some(sleep_until(deadline))),
                }
            }
            // Shut down: later ids stay in memory only.
            Err(TrySendError::Closed(_)) => {}
        }
    }

    /// Ready once the pending record is handed over, or its wait timed out (then the key is
    /// marked dirty: the worker persists its latest id from the registry later).
    fn poll_handoff(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let shared = &*this.shared;
        let sender = this
            .poll_sender
            .get_or_insert_with(|| PollSender::new(shared.worker.sender.clone()));
        match sender.poll_reserve(cx) {
            Poll::Ready(Ok(())) => {
                if let Some(record) = this.handoff.take()
                    && sender.send_item(record).is_ok()
                {
                    shared.metrics.records_enqueued.increment(1);
                }
            }
            Poll::Ready(Err(_closed)) => *this.handoff = None,
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
                if let Some(record) = this.handoff.take() {
                    shared.registry.mark_dirty(&record.slot);
                    shared.metrics.backpressure_timeouts.increment(1);
                    let key = record.slot.key();
                    tracing::warn!(
                        session = %key.session,
                        stream = %key.stream,
                        timeout = ?shared.config.send_timeout,
                        "persistence worker's channel full: the stream's latest id will be written from memory"
                    );
                }
            }
        }
        Poll::Ready(())
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
            && sse.handoff.is_some()
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
            Poll::Pending => sse
                .as_mut()
                .poll_heartbeat(cx)
                .map(|bytes| Some(Ok(Frame::data(bytes)))),
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
