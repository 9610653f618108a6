//! [`TrackedBody`]: passes an SSE body through, scanning it and sending heartbeats.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::sync::futures::OwnedNotified;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::{Instant, Sleep, sleep_until};
use tokio_util::sync::PollSender;

use crate::identity::IdStream;
use crate::key::{Owner, StreamName};
use crate::metrics::Untracked;
use crate::protocol::Resumption;
use crate::registry::{Open, Slot};
use crate::scan::{Boundary, Scanner};
use crate::tracker::Shared;

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
    }

    impl PinnedDrop for SseState {
        fn drop(this: Pin<&mut Self>) {
            let resumable = this.is_resumable();
            this.shared.metrics.stream_ended(resumable);
        }
    }
}

const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];

/// How an SSE response is tracked, decided when it starts.
pub(crate) struct Tracking {
    /// The slot ids go to (with a stream per id: the slot of the last id's stream). Already
    /// counted as live by the registry; closed when replaced or when the body goes.
    slot: Option<Arc<Slot>>,
    per_id: Option<PerId>,
    span: tracing::Span,
}

/// The stream of each committed id comes from the id.
struct PerId {
    owner: Option<Owner>,
    format: IdStream,
    /// The stream of ids that name none: the route's.
    route: StreamName,
    /// How ids that name no stream are tracked.
    fallback_kind: Fallback,
    /// The slot of those ids, opened the first time one comes and held until the body goes:
    /// the body's own (`"{route} #2"` when another body holds the route's), or the route's
    /// feed.
    fallback: Option<Arc<Slot>>,
    /// An id was left untracked because the registry was full (counted once per body).
    refused: bool,
}

/// Where a body with a stream per id puts the ids that name no stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fallback {
    /// A stream of the route of the body's own (an owner's).
    Own,
    /// The route's feed, shared (an anonymous `GET`, or a name the handler chose).
    Feed,
    /// Nowhere: an anonymous request of another method, whose stream nothing can address.
    Untracked,
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
        route: StreamName,
        fallback: Fallback,
        span: tracing::Span,
    ) -> Self {
        Self {
            slot: None,
            per_id: Some(PerId {
                owner,
                format,
                route,
                fallback_kind: fallback,
                fallback: None,
                refused: false,
            }),
            span,
        }
    }

    /// The slot `id` goes to: the fixed one, or, with a stream per id, the one its id names
    /// (opened, and the previous one closed, when it changes: a look-up once per stream) or the
    /// body's own fallback. `None` when it cannot be tracked.
    #[inline]
    fn slot_for(&mut self, id: &[u8], shared: &Shared) -> Option<&Arc<Slot>> {
        match &self.per_id {
            None => self.slot.as_ref(),
            Some(per_id) => {
                let format = per_id.format;
                self.slot_named_by(id, format, shared)
            }
        }
    }

    /// [`slot_for`](Self::slot_for) with a stream per id.
    fn slot_named_by(
        &mut self,
        id: &[u8],
        format: IdStream,
        shared: &Shared,
    ) -> Option<&Arc<Slot>> {
        let named = std::str::from_utf8(id)
            .ok()
            .and_then(|id| format.stream_of(id))
            .filter(|name| StreamName::is_valid(name));
        match named {
            None => {
                self.open_fallback(shared)?;
                self.per_id.as_ref()?.fallback.as_ref()
            }
            Some(name) => {
                let current = self.slot.as_ref().is_some_and(|s| s.key().stream == name);
                if !current {
                    self.switch_to(name, shared)?;
                }
                self.slot.as_ref()
            }
        }
    }

    /// Opens the body's fallback slot, once.
    fn open_fallback(&mut self, shared: &Shared) -> Option<()> {
        let per_id = self.per_id.as_mut()?;
        if per_id.fallback.is_some() {
            return Some(());
        }
        let share = match per_id.fallback_kind {
            Fallback::Own => false,
            Fallback::Feed => true,
            Fallback::Untracked => {
                let route = per_id.route.clone();
                refuse(per_id, shared, &self.span, Untracked::Anonymous, &route);
                return None;
            }
        };
        match shared
            .registry
            .open_route(per_id.owner.as_ref(), &per_id.route, share, None)
        {
            Ok((slot, _evicted)) => {
                per_id.fallback = Some(slot);
                Some(())
            }
            Err(refused) => {
                let route = per_id.route.clone();
                refuse(per_id, shared, &self.span, refused.into(), &route);
                None
            }
        }
    }

    /// Makes the slot of stream `name` the current one, closing the previous.
    fn switch_to(&mut self, name: &str, shared: &Shared) -> Option<()> {
        let per_id = self.per_id.as_mut()?;
        let stream = StreamName::new(name).ok()?;
        match shared
            .registry
            .get_or_insert(per_id.owner.as_ref(), &stream, Open::Shared)
        {
            Ok((slot, _evicted)) => {
                if let Some(old) = self.slot.replace(slot) {
                    shared.registry.body_closed(&old);
                }
                self.span.record("stream", stream.as_str());
                tracing::debug!(parent: &self.span, "tracking SSE stream");
                Some(())
            }
            Err(refused) => {
                refuse(per_id, shared, &self.span, refused.into(), &stream);
                None
            }
        }
    }

    /// Every slot this body holds open.
    fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.slot
            .iter()
            .chain(self.per_id.iter().flat_map(|p| p.fallback.iter()))
    }
}

/// Counts an id left untracked, once per body.
fn refuse(
    per_id: &mut PerId,
    shared: &Shared,
    span: &tracing::Span,
    why: Untracked,
    stream: &StreamName,
) {
    if std::mem::replace(&mut per_id.refused, true) {
        return;
    }
    // Counted before the log, whose fields are evaluated only when it is enabled.
    let reason = shared.metrics.untracked(why);
    tracing::debug!(
        parent: span,
        reason,
        stream = %stream,
        "SSE ids not tracked: no slot for their stream"
    );
}

/// A tracked stream's state in its body; counts the stream as active while it lives.
struct Tracked {
    tracking: Tracking,
    shared: Arc<Shared>,
    /// The worker's channel was full at a hand-off: the slot went to the registry's dirty
    /// list at once (the worker reads it at its next flush, whether or not this body is
    /// polled again), and the body waits for room, at most the send timeout, before it
    /// pulls its next frame, so that producers cannot outrun a worker that cannot run.
    waiting: bool,
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
            waiting: false,
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

    /// Publishes a committed id into its stream's slot, and tells the worker the stream
    /// changed when it does not know yet. When the channel is full, the body will wait for room
    /// (the timer is armed).
    #[inline]
    fn commit(&mut self, id: &[u8], mut sleep: Pin<&mut Option<Sleep>>) {
        let shared = &*self.shared;
        let Some(slot) = self.tracking.slot_for(id, shared) else {
            return;
        };
        // Activity: atomic operations on the owner's state; no message, no task.
        shared.registry.mark_active(slot.session());
        let (_version, hand_over) = slot.publish(id, shared.registry.coarse_us());
        if !hand_over {
            // The worker already owes this stream a look (once per flush at most): it reads the
            // latest id from the slot then.
            self.coalesced += 1;
            return;
        }
        match shared.worker.sender.try_send(slot.clone()) {
            Ok(()) => shared.metrics.records_enqueued.increment(1),
            Err(TrySendError::Full(slot)) => {
                // The registry's dirty list takes the slot now: the hand-off never depends on
                // this body being polled again.
                shared.registry.push_dirty(slot);
                shared.metrics.records_enqueued.increment(1);
                if !self.waiting {
                    // The frame is delivered now; the next one waits for room, at most the
                    // send timeout.
                    self.waiting = true;
                    let deadline = Instant::now() + shared.config.send_timeout;
                    match sleep.as_mut().as_pin_mut() {
                        Some(sleep) => sleep.reset(deadline),
                        None => sleep.set(Some(sleep_until(deadline))),
                    }
                }
            }
            // Shut down: ids committed from now on stay in memory (the shutdown report lists
            // their streams).
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.report_counts();
        let shared = &self.shared;
        shared.metrics.streams_active.decrement(1.0);
        for slot in self.tracking.slots() {
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
    pub(crate) fn sse(
        inner: B,
        shared: Arc<Shared>,
        tracking: Option<Tracking>,
        resumption: Resumption,
        span: tracing::Span,
    ) -> Self {
        let tracked = tracking.map(|tracking| Tracked::new(tracking, shared.clone()));
        let state = SseState {
            scanner: Scanner::with_max_id_len(shared.config.max_id_len),
            shared,
            tracked,
            quiet_since: Instant::now(),
            fresh: false,
            poll_sender: None,
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
        };
        Self {
            inner,
            sse: Some(Box::pin(state)),
        }
    }

    /// Whether this body is an SSE body that the layer scans (tracked, or for heartbeats and
    /// draining only).
    pub fn is_scanned(&self) -> bool {
        self.sse.is_some()
    }

    /// Whether this body's ids are recorded in the tracker.
    pub fn is_tracked(&self) -> bool {
        self.sse.as_ref().is_some_and(|s| s.tracked.is_some())
    }

    /// Whether the client can resume this stream now: its last event id is one it reconnects
    /// with (an event carried an id, and the last id is not the empty reset), and its request
    /// does not say the protocol has no resumption (MCP 2026-07-28 and later). Whatever the
    /// method: an answer streamed on a POST whose events carry ids counts, its client resuming
    /// with a GET that carries `Last-Event-ID` (as MCP 2025-11-25 clients do). A stream that
    /// cannot be resumed is never ended early by a drain: it runs to its end, or to the drain
    /// timeout (see [`SseTracker::drain`](crate::SseTracker::drain)).
    pub fn is_resumable(&self) -> bool {
        self.sse.as_ref().is_some_and(|s| s.is_resumable())
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
            // Every committed id goes to the stream it names.
            this.scanner
                .feed_with(data, |id| tracked.commit(id, sleep.as_mut()))
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

    /// Ready once the worker's channel has room again, or the send timeout has passed (counted
    /// and logged), or the worker has stopped. The slot that found the channel full is in the
    /// registry's dirty list already: this wait only paces the body.
    fn poll_room(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let shared = &*this.shared;
        let Some(tracked) = this.tracked.as_mut() else {
            return Poll::Ready(());
        };
        if !tracked.waiting {
            return Poll::Ready(());
        }
        let sender = this
            .poll_sender
            .get_or_insert_with(|| PollSender::new(shared.worker.sender.clone()));
        match sender.poll_reserve(cx) {
            // Room (the reserved place is given back: there is nothing to send), or shut down.
            Poll::Ready(_) => {
                sender.abort_send();
            }
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
                shared.metrics.backpressure_timeouts.increment(1);
                tracing::warn!(
                    parent: &tracked.tracking.span,
                    timeout = ?shared.config.send_timeout,
                    "persistence worker's channel full for the whole send timeout: the worker is not running (is its runtime blocked?); the stream goes on, its latest id waits in memory"
                );
            }
        }
        tracked.waiting = false;
        Poll::Ready(())
    }

    /// The inner body has nothing now: a quiet period starts, unless one already runs.
    fn went_quiet(self: Pin<&mut Self>) {
        let this = self.project();
        if std::mem::take(this.fresh) {
            *this.quiet_since = Instant::now();
        }
    }

    fn is_resumable(&self) -> bool {
        self.resumption == Resumption::ByIds && self.has_last_id
    }

    /// Whether a drain ends this stream at its next event boundary: one its client resumes
    /// (ids), or an MCP `subscriptions/listen` stream (its client re-issues the listen). Any
    /// other stream runs to its end, and only the drain timeout cuts it: ending it early would
    /// lose its request.
    fn cut_by_drain(&self) -> bool {
        match self.resumption {
            Resumption::ByIds => self.has_last_id,
            Resumption::Reissued => true,
            Resumption::Never => false,
        }
    }

    fn waiting_for_room(&self) -> bool {
        self.tracked.as_ref().is_some_and(|t| t.waiting)
    }

    /// Drops a leading byte order mark of the inner body after a heartbeat went out first
    /// (see `strip_bom`). `None`: nothing of the frame goes out now (all withheld so far, or
    /// exactly the mark).
    #[inline]
    fn strip_bom(self: Pin<&mut Self>, data: Bytes) -> Option<Bytes> {
        if self.started && self.strip_bom.is_none() || data.is_empty() {
            // Once a byte went out and no byte order mark is watched for: nothing to do.
            return Some(data);
        }
        self.strip_bom_slow(data)
    }

    fn strip_bom_slow(self: Pin<&mut Self>, data: Bytes) -> Option<Bytes> {
        let this = self.project();
        // Any byte of the inner body, withheld or not, ends the time before the first byte: a
        // later heartbeat must not start watching for a byte order mark again.
        *this.started = true;
        let Some(matched) = *this.strip_bom else {
            return Some(data);
        };
        let want = &BOM[usize::from(matched)..];
        let common = want.len().min(data.len());
        if data[..common] != want[..common] {
            // Not a byte order mark: what was withheld is content.
            *this.strip_bom = None;
            if matched == 0 {
                return Some(data);
            }
            let mut joined = Vec::with_capacity(usize::from(matched) + data.len());
            joined.extend_from_slice(&BOM[..usize::from(matched)]);
            joined.extend_from_slice(&data);
            return Some(Bytes::from(joined));
        }
        if common == want.len() {
            // The whole mark: dropped, as a client would have dropped it.
            *this.strip_bom = None;
            return Some(data.slice(common..)).filter(|rest| !rest.is_empty());
        }
        *this.strip_bom = Some(matched + common as u8);
        None
    }

    /// The BOM bytes withheld when the inner body ends (they were content after all).
    fn take_withheld_bom(self: Pin<&mut Self>) -> Option<Bytes> {
        let this = self.project();
        match this.strip_bom.take() {
            Some(matched) if matched > 0 => {
                Some(Bytes::copy_from_slice(&BOM[..usize::from(matched)]))
            }
            _ => None,
        }
    }

    /// Whether the tracker is draining; registers the body to be woken when it starts.
    fn poll_drain(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let mut this = self.project();
        let drain = &this.shared.drain;
        if drain.is_draining() {
            return true;
        }
        if this.drain_wait.is_none() {
            this.drain_wait
                .set(Some(drain.notify.clone().notified_owned()));
        }
        if let Some(wait) = this.drain_wait.as_mut().as_pin_mut()
            && wait.poll(cx).is_ready()
        {
            this.drain_wait.set(None);
        }
        // Checked again after registering, so that a drain that started in between is seen.
        drain.is_draining()
    }

    /// While draining, scans `data` up to the end of the first event after which the drain
    /// ends the stream, and returns that length (all of it when there is none): the body ends
    /// there. For a stream the drain cuts, that is the frame's first event; for one it lets run
    /// (no id yet), the first event after which it can be resumed, so that a client is never
    /// sent an event past the id it will resume from.
    fn on_data_while_draining(mut self: Pin<&mut Self>, data: &[u8]) -> usize {
        let mut from = 0;
        while from < data.len() {
            // An event can only end right after a line end.
            let end =
                memchr::memchr2(b'\r', b'\n', &data[from..]).map_or(data.len(), |p| from + p + 1);
            self.as_mut().on_data(&data[from..end]);
            from = end;
            if self.scanner.boundary() == Boundary::Event && self.cut_by_drain() {
                break;
            }
        }
        from
    }

    /// While draining (a stream inside an event, or one the drain lets run): whether the drain
    /// timeout has passed. Polls (and makes, the first time) the deadline's timer when `cx` is
    /// given, so that an idle body is woken.
    fn drain_overdue(self: Pin<&mut Self>, cx: Option<&mut Context<'_>>) -> bool {
        let this = self.project();
        let Some(deadline) = this.shared.drain.deadline() else {
            return false;
        };
        match cx {
            None => Instant::now() >= deadline,
            Some(cx) => this
                .drain_timer
                .get_or_insert_with(|| Box::pin(sleep_until(deadline)))
                .as_mut()
                .poll(cx)
                .is_ready(),
        }
    }

    /// Ends the body inside an event at the drain timeout.
    fn end_overdue(self: Pin<&mut Self>) {
        let this = self.project();
        *this.ended = true;
        this.shared.metrics.streams_drained_late.increment(1);
        let parent = &*this.span;
        let timeout = this.shared.config.drain_timeout;
        if this.scanner.boundary() != Boundary::Event {
            tracing::warn!(
                parent: parent,
                ?timeout,
                "SSE stream still inside an event at the drain timeout: ended there (the \
                 client discards the incomplete event)"
            );
        } else {
            tracing::warn!(
                parent: parent,
                ?timeout,
                "SSE stream that its client cannot resume still open at the drain timeout: \
                 ended there (a request it answers is lost)"
            );
        }
    }

    /// While draining, at an event boundary: the `retry` frame (once, when configured), then the
    /// end of the body. `None` otherwise: the body goes on (to the next boundary).
    fn drain_step(self: Pin<&mut Self>) -> Option<Option<Bytes>> {
        let this = self.project();
        let drain = &this.shared.drain;
        if !drain.is_draining() || this.scanner.boundary() != Boundary::Event {
            return None;
        }
        if !*this.retry_sent {
            *this.retry_sent = true;
            if let Some(retry) = drain.retry() {
                return Some(Some(Bytes::from(format!(
                    "retry: {}\n\n",
                    retry.as_millis()
                ))));
            }
        }
        *this.ended = true;
        this.shared.metrics.streams_drained.increment(1);
        if let Some(tracked) = this.tracked {
            tracing::debug!(parent: &tracked.tracking.span, "SSE stream drained");
        }
        Some(None)
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
            if !*this.started && this.strip_bom.is_none() {
                *this.strip_bom = Some(0);
            }
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
        let mut this = self.project();
        let Some(sse) = this.sse.as_mut() else {
            return this
                .inner
                .poll_frame(cx)
                .map(|frame| frame.map(|r| r.map(into_bytes)));
        };
        if sse.ended {
            return Poll::Ready(None);
        }
        if let Some(trailers) = sse.as_mut().project().trailers.take() {
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
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
            match this.inner.as_mut().poll_frame(cx) {
                // The data is taken out before it becomes `Bytes`: a `Frame` is large (it may
                // hold trailers), and every move of one costs on small frames.
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(mut data) => {
                        let data = data.copy_to_bytes(data.remaining());
                        // `None`: all withheld so far, or exactly a dropped BOM.
                        let Some(mut data) = sse.as_mut().strip_bom(data) else {
                            continue;
                        };
                        if draining && sse.resumption != Resumption::Never {
                            // The body ends after the first event after which the drain ends
                            // it (see `on_data_while_draining`): cut it there.
                            let end = sse.as_mut().on_data_while_draining(&data);
                            data.truncate(end);
                        } else {
                            sse.as_mut().on_data(&data);
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
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
                    return Poll::Ready(withheld.map(|bytes| Ok(Frame::data(bytes))));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
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

    fn is_end_stream(&self) -> bool {
        match &self.sse {
            None => self.inner.is_end_stream(),
            Some(sse) if sse.trailers.is_some() => false,
            Some(sse) => sse.ended || self.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let hint = self.inner.size_hint();
        if self.sse.is_none() {
            return hint;
        }
        // Heartbeats may add bytes, a dropped BOM or a drain remove some: no bound is known.
        SizeHint::new()
    }
}
