//! The hand-off: every way a changed stream reaches the worker, in one type.
//!
//! - A body that published an id into a slot the worker does not know of yet (the slot's
//!   queued flag) **offers** it: into the bounded channel, or, when the channel is full, into
//!   the dirty list at once, so that the hand-off never depends on the body being polled
//!   again (the body then only waits for room, at most the send timeout, to pace itself).
//! - A slot evicted from the registry with its id not in the store goes to the **evicted
//!   FIFO** (bounded by `max_pending_evicted`; beyond, the oldest is dropped and counted),
//!   where it stays, visible to lookups and to the shutdown report, until its id is stored.
//! - A session marked active goes to the **active list**, once per flush.
//! - A replay log with events its store lacks (replay across instances) goes to the **log
//!   queue**, once per flush: the worker reads the events from the log itself.
//!
//! The worker drains all of it, through [`Handoff`] alone; once it has stopped, the hand-off is
//! closed and takes nothing more.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};

use metrics::Counter;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::PollSender;

use super::routes::concurrent_index;
use super::slot::{SessionState, Slot};
use crate::key::{Owner, StreamName};
use crate::replay::StreamLog;
use crate::sync::lock;

/// The hand-off's counters.
#[derive(Debug, Clone)]
pub(crate) struct HandoffMetrics {
    /// Changed streams handed to the worker (through the channel or the dirty list).
    pub(crate) enqueued: Counter,
    /// Unpersisted ids of evicted streams dropped because the evicted FIFO was full.
    pub(crate) dropped_overflow: Counter,
    /// Unpersisted ids of evicted streams dropped because the worker no longer runs.
    pub(crate) dropped_stopped: Counter,
    /// Activity marks dropped (sessions evicted while their write was failing, or after the
    /// worker stopped).
    pub(crate) activity_dropped: Counter,
    /// Replay logs not queued for the store (the log queue was full, or the worker stopped).
    pub(crate) logs_dropped: Counter,
}

impl HandoffMetrics {
    #[cfg(test)]
    pub(crate) fn noop() -> Self {
        Self {
            enqueued: Counter::noop(),
            dropped_overflow: Counter::noop(),
            dropped_stopped: Counter::noop(),
            activity_dropped: Counter::noop(),
            logs_dropped: Counter::noop(),
        }
    }
}

/// What became of a slot a body offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Offered {
    /// Through the channel.
    Sent,
    /// The channel was full: through the dirty list (the body may pace itself, see
    /// [`Room`]).
    Full,
    /// The worker has stopped: the id stays in memory (the shutdown report lists it).
    Closed,
}

#[derive(Debug)]
pub(crate) struct Handoff {
    /// The bodies' end of the channel to the worker, and the worker's (only the worker
    /// receives, so its lock is never contended).
    sender: mpsc::Sender<Arc<Slot>>,
    receiver: tokio::sync::Mutex<mpsc::Receiver<Arc<Slot>>>,
    metrics: HandoffMetrics,
    /// The most entries a list holds before it is purged of evicted ones (see
    /// [`Limits::list_bound`](super::Limits::list_bound)).
    list_bound: usize,
    max_pending_evicted: usize,
    /// Slots that found the channel full. A slot is in it at most once (its queued flag
    /// guards it).
    dirty: Mutex<Vec<Arc<Slot>>>,
    /// Evicted slots whose latest id is not in the store yet, oldest first; at most
    /// `max_pending_evicted`.
    evicted: Mutex<VecDeque<Arc<Slot>>>,
    /// Ids dropped unpersisted, for the shutdown report.
    dropped: AtomicU64,
    /// Drops after the worker stopped have been logged (once: they can come by the thousand).
    warned_stopped: AtomicBool,
    /// Sessions active since the last flush, each at most once (its mark guards it).
    active: Mutex<Vec<Arc<SessionState>>>,
    /// Set when the worker has stopped: nothing is queued for it any more.
    closed: AtomicBool,
    /// Replay logs owing the store events (replay across instances).
    logs: Arc<LogQueue>,
}

/// The replay logs whose events the store lacks, each at most once (its own flag, under its
/// lock, guards it), for the worker to append at its next flush. Its writers offer a log when
/// they log its first event since the worker last read it, and when its body ends.
#[derive(Debug)]
pub(crate) struct LogQueue {
    logs: Mutex<Vec<Arc<StreamLog>>>,
    /// The most logs it holds; an offer beyond is dropped (counted): its events reach the
    /// store with the log's next offer, those trimmed from it meanwhile never do.
    bound: usize,
    dropped: Counter,
    closed: AtomicBool,
}

impl LogQueue {
    pub(crate) fn new(bound: usize, dropped: Counter) -> Self {
        Self {
            logs: Mutex::default(),
            bound,
            dropped,
            closed: AtomicBool::new(false),
        }
    }

    /// Queues `log` (whose queued flag the caller set); false when it was not (the queue is
    /// full, or the worker has stopped): the caller clears the flag.
    pub(crate) fn offer(&self, log: Arc<StreamLog>) -> bool {
        let mut logs = lock(&self.logs);
        if self.closed.load(Ordering::Acquire) || logs.len() >= self.bound {
            self.dropped.increment(1);
            return false;
        }
        logs.push(log);
        true
    }

    /// Takes every queued log (their flags stay set until the worker reads them).
    pub(crate) fn take(&self) -> Vec<Arc<StreamLog>> {
        std::mem::take(&mut *lock(&self.logs))
    }

    fn close(&self) {
        let mut logs = lock(&self.logs);
        self.closed.store(true, Ordering::Release);
        logs.clear();
    }
}

/// A body's wait for room in the hand-off's channel, to pace itself after the channel was
/// found full.
pub(crate) struct Room(PollSender<Arc<Slot>>);

impl Room {
    /// Ready once the channel has room (the place is given back at once: there is nothing
    /// to send) or the worker has stopped.
    pub(crate) fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.0.poll_reserve(cx) {
            Poll::Ready(_) => {
                self.0.abort_send();
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Stops waiting.
    pub(crate) fn give_up(&mut self) {
        self.0.abort_send();
    }
}

impl Handoff {
    /// A hand-off whose channel holds `capacity` slots.
    pub(crate) fn new(capacity: usize, limits: &super::Limits, metrics: HandoffMetrics) -> Self {
        let (sender, receiver) = mpsc::channel(capacity);
        let logs = Arc::new(LogQueue::new(
            limits.list_bound(),
            metrics.logs_dropped.clone(),
        ));
        Self {
            logs,
            sender,
            receiver: tokio::sync::Mutex::new(receiver),
            metrics,
            list_bound: limits.list_bound(),
            max_pending_evicted: limits.max_pending_evicted,
            dirty: Mutex::default(),
            evicted: Mutex::default(),
            dropped: AtomicU64::new(0),
            warned_stopped: AtomicBool::new(false),
            active: Mutex::default(),
            closed: AtomicBool::new(false),
        }
    }

    /// Hands `slot` (whose queued flag the caller holds) to the worker, which will persist its
    /// latest id at the next flush: through the channel, else the dirty list. Never waits.
    #[inline]
    pub(crate) fn offer(&self, slot: Arc<Slot>) -> Offered {
        match self.sender.try_send(slot) {
            Ok(()) => {
                self.metrics.enqueued.increment(1);
                Offered::Sent
            }
            Err(TrySendError::Full(slot)) => {
                self.push_dirty(slot);
                self.metrics.enqueued.increment(1);
                Offered::Full
            }
            Err(TrySendError::Closed(_)) => Offered::Closed,
        }
    }

    /// The replay logs owing the store events.
    pub(crate) fn log_queue(&self) -> &Arc<LogQueue> {
        &self.logs
    }

    /// A wait for room in the channel.
    pub(crate) fn room(&self) -> Room {
        Room(PollSender::new(self.sender.clone()))
    }

    /// For the worker: receives up to `limit` offered slots into `buf`; 0 once the channel
    /// is closed and emptied.
    pub(crate) async fn recv_many(&self, buf: &mut Vec<Arc<Slot>>, limit: usize) -> usize {
        self.receiver.lock().await.recv_many(buf, limit).await
    }

    /// For the worker: the channel takes nothing more (what is in it is still received).
    pub(crate) async fn close_channel(&self) {
        self.receiver.lock().await.close();
    }

    /// Slots waiting in the channel.
    pub(crate) fn queued(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }

    pub(super) fn push_active(&self, session: Arc<SessionState>) {
        let mut active = lock(&self.active);
        if self.is_closed() {
            self.metrics.activity_dropped.increment(1);
            return;
        }
        active.push(session);
        self.purge_if_grown(
            &mut active,
            |s| s.is_resident(),
            |dropped| {
                self.metrics.activity_dropped.increment(dropped as u64);
            },
        );
    }

    /// Keeps a list the worker drains within the registry's bound: once it is longer than
    /// the registry could make it with resident entries, the evicted ones go (amortized O(1)).
    fn purge_if_grown<T>(
        &self,
        list: &mut Vec<T>,
        resident: impl Fn(&T) -> bool,
        on_dropped: impl FnOnce(usize),
    ) {
        if list.len() > self.list_bound {
            let before = list.len();
            list.retain(resident);
            on_dropped(before - list.len());
        }
    }

    /// Counts activity marks the worker dropped.
    pub(crate) fn count_activity_dropped(&self, n: usize) {
        self.metrics.activity_dropped.increment(n as u64);
    }

    /// Takes the sessions marked active since the last call; the caller unmarks them.
    pub(crate) fn take_active(&self) -> Vec<Arc<SessionState>> {
        std::mem::take(&mut *lock(&self.active))
    }

    /// Puts sessions whose activity write failed or was not tried back in the active list.
    /// Sessions no longer in the registry are dropped (counted): their activity no longer
    /// matters to anyone but the store, and keeping them would let a flood grow the list.
    pub(crate) fn requeue_active(&self, sessions: Vec<Arc<SessionState>>) {
        let mut dropped = 0;
        let mut active = lock(&self.active);
        for session in sessions {
            if !session.is_resident() || self.is_closed() {
                dropped += 1;
            } else if !session.marked.swap(true, Ordering::AcqRel) {
                active.push(session);
            }
        }
        if dropped > 0 {
            self.metrics.activity_dropped.increment(dropped);
        }
    }

    /// Queues `slot` (whose queued flag the caller holds) for the worker, which will persist
    /// its latest id at the next flush.
    fn push_dirty(&self, slot: Arc<Slot>) {
        let mut dirty = lock(&self.dirty);
        // Checked under the list's lock, which `close` takes too.
        if self.is_closed() {
            return;
        }
        dirty.push(slot);
        self.purge_if_grown(&mut dirty, |s| !s.is_evicted(), |_| {});
    }

    /// Takes the dirty slots (their queued flags stay set: the worker now holds them).
    pub(crate) fn take_dirty(&self) -> Vec<Arc<Slot>> {
        std::mem::take(&mut *lock(&self.dirty))
    }

    pub(crate) fn has_dirty(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    /// The evicted slots still waiting for a write, oldest first. They stay in the FIFO while
    /// the worker writes them, so that lookups, the shutdown report and the gauge see them;
    /// each leaves it once its id is in the store (or a newer id of its key is).
    pub(crate) fn evicted_owed(&self) -> Vec<Arc<Slot>> {
        let mut evicted = lock(&self.evicted);
        evicted.retain(|s| s.unpersisted());
        evicted.iter().cloned().collect()
    }

    /// Evicted slots whose latest id is not in the store yet.
    pub(crate) fn evicted_pending_len(&self) -> usize {
        let mut evicted = lock(&self.evicted);
        evicted.retain(|s| s.unpersisted());
        evicted.len()
    }

    /// Latest ids dropped unpersisted so far.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Counts unpersisted ids of evicted streams dropped because the worker no longer runs, and
    /// warns the first time.
    fn dropped_stopped(&self, lost: u64) {
        if lost == 0 {
            return;
        }
        self.dropped.fetch_add(lost, Ordering::Relaxed);
        self.metrics.dropped_stopped.increment(lost);
        if !self.warned_stopped.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dropped = lost,
                "the SSE tracker's worker has stopped: the unpersisted latest ids of evicted streams are dropped from now on, counted in sse_tracker_ids_dropped_total{{reason=\"stopped\"}} (logged once)"
            );
        }
    }

    fn trim_evicted(&self, fifo: &mut VecDeque<Arc<Slot>>) {
        while fifo.len() > self.max_pending_evicted {
            let Some(oldest) = fifo.pop_front() else {
                break;
            };
            if oldest.unpersisted() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.metrics.dropped_overflow.increment(1);
            }
        }
    }

    /// The latest id of an evicted stream still waiting for a write (the newest, should there
    /// be several slots of the key).
    pub(super) fn evicted_entry(&self, owner: Option<&str>, stream: &str) -> Option<Arc<Slot>> {
        lock(&self.evicted)
            .iter()
            .rev()
            .find(|s| s.key.owner.as_ref().map(Owner::as_str) == owner && s.key.stream == stream)
            .cloned()
    }

    /// Hands an evicted slot's unpersisted id to the worker through the bounded FIFO (the
    /// registry calls it with its map locked: a slot is never in neither).
    pub(super) fn evicted(&self, slot: Arc<Slot>) {
        if !slot.unpersisted() {
            return;
        }
        let mut fifo = lock(&self.evicted);
        if self.is_closed() {
            self.dropped_stopped(1);
            return;
        }
        fifo.push_back(slot);
        self.trim_evicted(&mut fifo);
    }

    /// Stops queueing anything for the worker (it has stopped). The flag is set under each
    /// list's lock, so that nothing is pushed after the list is emptied.
    pub(crate) fn close(&self) {
        // The channel too, so that bodies see the worker gone (nobody receives any more: the
        // worker has ended, so its lock on the receiver is free).
        if let Ok(mut receiver) = self.receiver.try_lock() {
            receiver.close();
        }
        let mut dirty = lock(&self.dirty);
        let mut evicted = lock(&self.evicted);
        let mut active = lock(&self.active);
        self.closed.store(true, Ordering::Release);
        self.logs.close();
        // What is still unpersisted stays visible to the shutdown report through the map; the
        // evicted ones are no longer anywhere, so they count as dropped.
        let lost = evicted.iter().filter(|s| s.unpersisted()).count() as u64;
        evicted.clear();
        self.dropped_stopped(lost);
        dirty.clear();
        if !active.is_empty() {
            self.metrics.activity_dropped.increment(active.len() as u64);
            active.clear();
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The evicted slots of `route` of `owner` whose latest id, `id`, is not in the store yet.
    pub(super) fn evicted_with_latest(
        &self,
        owner: &str,
        route: &StreamName,
        id: &[u8],
    ) -> Vec<Arc<Slot>> {
        lock(&self.evicted)
            .iter()
            .filter(|slot| {
                slot.key.owner.as_ref().map(Owner::as_str) == Some(owner)
                    && concurrent_index(route, &slot.key.stream).is_some()
                    && slot.unpersisted()
                    && slot.latest_is(id)
            })
            .cloned()
            .collect()
    }

    /// Every evicted slot waiting for a write.
    pub(super) fn evicted_slots(&self) -> Vec<Arc<Slot>> {
        lock(&self.evicted).iter().cloned().collect()
    }
}
