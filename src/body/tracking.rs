//! Where the ids of a tracked body go: the stream's slot (or, with ids that name their stream,
//! the slot each names), and the hand-off of a changed slot to the worker.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep, sleep_until};

use super::SseState;
use crate::identity::IdStream;
use crate::key::{Owner, StreamName};
use crate::metrics::Untracked;
use crate::registry::handoff::Offered;
use crate::registry::{Open, Slot};
use crate::replay::{FrameEvents, ReadOnHandle, Replayer, Writer};
use crate::shared::Shared;

/// How an SSE response is tracked, decided when it starts.
pub(crate) struct Tracking {
    /// The slot ids go to (with a stream per id: the slot of the last id's stream). Already
    /// counted as live by the registry; closed when replaced or when the body goes.
    pub(super) slot: Option<Arc<Slot>>,
    pub(super) per_id: Option<PerId>,
    /// The writer of the slot's replay log (replay on, and no other body writes it).
    pub(super) log: Option<Writer>,
    /// With a stream per id: whether the body has taken its log's writer yet (at the first
    /// id that names a stream).
    log_tried: bool,
    /// The response is marked [`Detach`](crate::Detach): the log's writer says so.
    detach: bool,
    /// How a reconnect moves this body off its connection (a body marked `Detach`): given to
    /// the log's writer.
    read_on: Option<ReadOnHandle>,
    pub(super) span: tracing::Span,
}

/// The stream of each committed id comes from the id.
pub(super) struct PerId {
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
    pub(crate) fn fixed(slot: Arc<Slot>, span: tracing::Span, log: Option<Writer>) -> Self {
        Self {
            slot: Some(slot),
            per_id: None,
            log,
            log_tried: true,
            detach: false,
            read_on: None,
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
            log: None,
            log_tried: false,
            detach: false,
            read_on: None,
            span,
        }
    }

    /// The response is marked [`Detach`](crate::Detach), with replay on: whether its body can
    /// be read on when its client leaves (it writes a log, or will once an id names its
    /// stream).
    pub(crate) fn mark_detachable(&mut self) -> bool {
        self.detach = true;
        match &self.log {
            Some(writer) => {
                writer.set_detachable(true);
                true
            }
            None => self.per_id.is_some() && !self.log_tried,
        }
    }

    /// With a stream per id and replay on: whether this body's frames go to a log (a response
    /// marked [`Detach`](crate::Detach), the only ones whose reconnects the layer answers,
    /// see `SseTrackerService::call`), or may once an id names a stream.
    pub(super) fn logs_per_id(&self) -> bool {
        self.detach && (!self.log_tried || self.log.is_some())
    }

    /// Called after each id is committed: the first time the current slot is one an id
    /// named, the body takes the writer of its log. Every event of the body goes to that log
    /// from then on, whatever stream later ids name.
    pub(super) fn log_from_first_stream(&mut self, replayer: &Replayer) {
        if self.log_tried {
            return;
        }
        let Some(slot) = &self.slot else {
            return;
        };
        self.log_tried = true;
        self.log = replayer.writer_for(slot, None, &self.span);
        if let Some(writer) = &self.log {
            writer.set_detachable(true);
            if let Some(handle) = &self.read_on {
                writer.set_read_on(handle.clone());
            }
        }
    }

    /// The body is held where a reconnect can move it off its connection: see
    /// [`ReadOnHandle`].
    pub(super) fn set_read_on(&mut self, handle: ReadOnHandle) {
        if let Some(writer) = &self.log {
            writer.set_read_on(handle.clone());
        }
        self.read_on = Some(handle);
    }

    /// Logs the frame `data`, whose scan `frame` holds (see
    /// [`logs_per_id`](Self::logs_per_id)).
    pub(super) fn write_per_id(&mut self, data: &[u8], frame: &mut FrameEvents) {
        match &mut self.log {
            Some(writer) => writer.write_with(data, frame),
            None => frame.clear(),
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
pub(super) struct Tracked {
    pub(super) tracking: Tracking,
    shared: Arc<Shared>,
    /// The worker's channel was full at a hand-off: the slot went to the registry's dirty
    /// list at once (the worker reads it at its next flush, whether or not this body is
    /// polled again), and the body waits for room, at most the send timeout, before it
    /// pulls its next frame, so that producers cannot outrun a worker that cannot run.
    pub(super) waiting: bool,
    /// Events not yet added to `sse_tracker_events_total`, and committed ids not yet added to
    /// `sse_tracker_records_coalesced_total` (ids that a newer id of the stream replaced before
    /// the worker read the slot): the counters are shared by every stream, so they are updated
    /// once per [`EVENTS_BATCH`] events and when the body ends.
    pub(super) events: u64,
    pub(super) coalesced: u64,
}

/// Events a body counts before it adds them to the shared counter.
pub(super) const EVENTS_BATCH: u64 = 64;

impl Tracked {
    pub(super) fn new(tracking: Tracking, shared: Arc<Shared>) -> Self {
        shared.metrics.streams_active.increment(1.0);
        Self {
            tracking,
            shared,
            waiting: false,
            events: 0,
            coalesced: 0,
        }
    }

    pub(super) fn report_counts(&mut self) {
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
    pub(super) fn commit(&mut self, id: &[u8], mut sleep: Pin<&mut Option<Sleep>>) {
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
        // Never waits; a full channel puts the slot on the hand-off's dirty list at once.
        if shared.registry.handoff().offer(slot.clone()) == Offered::Full && !self.waiting {
            // The frame is delivered now; the next one waits for room, at most the send
            // timeout, so that producers cannot outrun a worker that cannot run.
            self.waiting = true;
            let deadline = Instant::now() + shared.config.send_timeout;
            match sleep.as_mut().as_pin_mut() {
                Some(sleep) => sleep.reset(deadline),
                None => sleep.set(Some(sleep_until(deadline))),
            }
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.report_counts();
        let shared = &self.shared;
        // The log's writer goes first, while this body still counts as open in its slot: a
        // body that takes the slot once it is free finds the log free too. When other bodies
        // stream into the slot (a shared stream), they go on unlogged: the log is sealed.
        if let Some(writer) = self.tracking.log.take() {
            let others = self
                .tracking
                .slot
                .as_ref()
                .is_some_and(|slot| slot.open_bodies() > 1);
            writer.release(others);
        }
        shared.metrics.streams_active.decrement(1.0);
        for slot in self.tracking.slots() {
            shared.registry.body_closed(slot);
        }
        tracing::debug!(parent: &self.tracking.span, "SSE stream closed");
    }
}

impl SseState {
    /// Ready once the worker's channel has room again, or the send timeout has passed (counted
    /// and logged), or the worker has stopped. The slot that found the channel full is in the
    /// hand-off's dirty list already: this wait only paces the body.
    pub(super) fn poll_room(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut this = self.project();
        let shared = &*this.shared;
        let Some(tracked) = this.tracked.as_mut() else {
            return Poll::Ready(());
        };
        if !tracked.waiting {
            return Poll::Ready(());
        }
        let room = this
            .room
            .get_or_insert_with(|| shared.registry.handoff().room());
        if room.poll_ready(cx).is_pending() {
            let sleep = this
                .sleep
                .as_mut()
                .as_pin_mut()
                .expect("the hand-off armed the timer");
            if sleep.poll(cx).is_pending() {
                return Poll::Pending;
            }
            room.give_up();
            shared.metrics.backpressure_timeouts.increment(1);
            tracing::warn!(
                parent: &tracked.tracking.span,
                timeout = ?shared.config.send_timeout,
                "persistence worker's channel full for the whole send timeout: the worker is not running (is its runtime blocked?); the stream goes on, its latest id waits in memory"
            );
        }
        tracked.waiting = false;
        Poll::Ready(())
    }

    pub(super) fn waiting_for_room(&self) -> bool {
        self.tracked.as_ref().is_some_and(|t| t.waiting)
    }
}
