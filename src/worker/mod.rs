//! The one background worker of a tracker: batches, coalesces, de-duplicates and retries the
//! latest ids on their way to the [`Store`](crate::store::Store).
//!
//! Bodies hand it [`Record`]s through a bounded channel. The loop receives up to `max_batch`
//! records at a time, coalesces them per stream (the highest sequence wins), and on every flush
//! tick (or when the batch is full) writes one batch, leaving out what the store already holds.
//! At most one write is in flight, and records keep being received and coalesced while it is,
//! up to `max_batch` streams: the worker's memory is bounded, and a slow store shows up as
//! backpressure on the channel, never as a wait on the frame path. Failed writes go to a
//! time-ordered retry queue.

pub(crate) mod batch;
pub(crate) mod retry;

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior, sleep_until};

use crate::key::{EventId, StreamKey};
use crate::metrics::Handles;
use crate::registry::{Registry, SessionState, Slot, Version};
use crate::store::{BoxFuture, DynStore, SaveEntry, SessionActivity, StoreError};
use batch::{Batch, Pending};
use retry::{Jitter, RetryPolicy, RetryQueue};

/// The latest id of a stream, handed from a body to the worker.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) slot: Arc<Slot>,
    pub(crate) id: EventId,
    pub(crate) version: Version,
}

/// The worker's settings.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) max_batch: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) retry: RetryPolicy,
}

/// What [`SseTracker::shutdown`](crate::SseTracker::shutdown) reports.
///
/// Every stream whose latest id was not in the store when shutdown began ends up in exactly one
/// of the three: written (`persisted` counts them), `given_up` or `pending`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Streams whose latest id was written during the shutdown.
    pub persisted: usize,
    /// Streams whose write failed more often than the retry policy allows and was not caught up
    /// before the deadline.
    pub given_up: Vec<StreamKey>,
    /// Streams with an id still unwritten at the deadline (waiting, retrying or in flight).
    pub pending: Vec<StreamKey>,
    /// Whether the deadline cut the shutdown short.
    pub deadline_reached: bool,
}

impl ShutdownReport {
    /// Whether every latest id reached the store.
    pub fn is_complete(&self) -> bool {
        self.given_up.is_empty() && self.pending.is_empty()
    }
}

struct ShutdownRequest {
    deadline: Instant,
    reply: oneshot::Sender<ShutdownReport>,
}

/// The bodies' and the tracker's side of the worker.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub(crate) sender: mpsc::Sender<Record>,
    control: Mutex<Option<oneshot::Sender<ShutdownRequest>>>,
}

impl std::fmt::Debug for ShutdownRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownRequest")
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl WorkerHandle {
    /// Spawns the worker on `runtime`.
    pub(crate) fn spawn(
        runtime: &tokio::runtime::Handle,
        capacity: usize,
        config: WorkerConfig,
        registry: Arc<Registry>,
        store: Arc<dyn DynStore>,
        metrics: Handles,
    ) -> Self {
        let (sender, rx) = mpsc::channel(capacity);
        let (control, control_rx) = oneshot::channel();
        let worker = Worker {
            rx,
            registry,
            store,
            metrics,
            config,
            jitter: Jitter::new(),
            batch: Batch::default(),
            retries: RetryQueue::default(),
            given_up: Vec::new(),
            writing_keys: Vec::new(),
            probe_at: None,
        };
        runtime.spawn(worker.run(control_rx));
        Self {
            sender,
            control: Mutex::new(Some(control)),
        }
    }

    /// Stops intake, drains, flushes and retries until `timeout`; a second call returns an
    /// empty report at once.
    pub(crate) async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let control = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let Some(control) = control else {
            return ShutdownReport::default();
        };
        let (reply, report) = oneshot::channel();
        let request = ShutdownRequest {
            deadline: Instant::now() + timeout,
            reply,
        };
        if control.send(request).is_err() {
            return ShutdownReport::default();
        }
        report.await.unwrap_or_default()
    }
}

/// Slots the idle sweep looks at per tick, at most.
const SWEEP_BUDGET: usize = 1024;

struct WriteDone {
    entries: Vec<Pending>,
    result: Result<(), StoreError>,
    took: Duration,
    sessions: Vec<Arc<SessionState>>,
    touched: Result<(), StoreError>,
}

struct Worker {
    rx: mpsc::Receiver<Record>,
    registry: Arc<Registry>,
    store: Arc<dyn DynStore>,
    metrics: Handles,
    config: WorkerConfig,
    jitter: Jitter,
    batch: Batch,
    retries: RetryQueue<(Arc<Slot>, u32)>,
    /// Slots whose retries ran out; caught up after the next successful write. Each is here at
    /// most once (its dirty flag guards it).
    given_up: Vec<Arc<Slot>>,
    /// Keys of the write in flight, for the shutdown report.
    writing_keys: Vec<StreamKey>,
    /// When to try the given-up streams again if no write succeeds before.
    probe_at: Option<Instant>,
}

/// Waits for `f` when there is one; never completes otherwise.
async fn maybe<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

impl Worker {
    async fn run(mut self, mut control: oneshot::Receiver<ShutdownRequest>) {
        let mut tick = tokio::time::interval(self.config.flush_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut buf = Vec::with_capacity(self.config.max_batch);
        let mut writing: Option<BoxFuture<'static, WriteDone>> = None;
        let mut flush_due = false;
        let mut open = true;
        let mut control_live = true;
        let mut shutdown: Option<ShutdownRequest> = None;
        let mut persisted_in_shutdown = 0;
        loop {
            let idle = writing.is_none()
                && self.batch.is_empty()
                && self.retries.len() == 0
                && !self.registry.has_dirty()
                && !self.registry.has_active()
                // A shutdown keeps trying given-up streams until its deadline.
                && (shutdown.is_none() || self.given_up.is_empty());
            if !open && idle {
                break;
            }
            if shutdown
                .as_ref()
                .is_some_and(|s| Instant::now() >= s.deadline)
            {
                break;
            }
            if writing.is_none()
                && (flush_due || !open || self.batch.len() >= self.config.max_batch)
            {
                writing = self.start_write();
                // More than one batch waiting: write the next as soon as this one is done.
                flush_due = !self.batch.is_empty();
            }
            self.metrics.queue_depth.set(self.rx.len() as f64);
            self.metrics
                .retry_queue_depth
                .set(self.retries.len() as f64);

            let room = self.config.max_batch.saturating_sub(self.batch.len());
            let receiving = open && room > 0;
            let next_retry = self.retries.next_due();
            let deadline = shutdown.as_ref().map(|s| s.deadline);
            tokio::select! {
                biased;
                request = &mut control, if control_live => {
                    control_live = false;
                    if let Ok(request) = request {
                        // Stop intake now, even though bodies still hold senders.
                        self.rx.close();
                        // Shutdown retries until its deadline, given-up streams included.
                        self.requeue_given_up(0);
                        flush_due = true;
                        shutdown = Some(request);
                    }
                }
                done = maybe(&mut writing) => {
                    writing = None;
                    let written = self.finish_write(done);
                    if shutdown.is_some() {
                        persisted_in_shutdown += written;
                    }
                    flush_due |= !self.batch.is_empty()
                        || self.registry.has_dirty()
                        || self.registry.has_active();
                }
                received = self.rx.recv_many(&mut buf, room), if receiving => {
                    if received == 0 {
                        open = false;
                    } else {
                        self.accept(&mut buf);
                    }
                }
                _ = tick.tick() => {
                    flush_due = true;
                    self.on_tick();
                }
                _ = sleep_until(next_retry.unwrap_or_else(Instant::now)), if next_retry.is_some() => {
                    self.take_due_retries();
                    flush_due = true;
                }
                _ = sleep_until(self.probe_at.unwrap_or_else(Instant::now)), if self.probe_at.is_some() => {
                    // One attempt; if it fails the streams are given up again until the next.
                    self.requeue_given_up(self.config.retry.max_retries());
                    flush_due = true;
                }
                _ = sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {}
            }
        }
        if let Some(request) = shutdown {
            let deadline_reached = Instant::now() >= request.deadline;
            let report = self.report(persisted_in_shutdown, deadline_reached, writing.is_some());
            if !report.is_complete() {
                tracing::warn!(
                    persisted = report.persisted,
                    given_up = report.given_up.len(),
                    pending = report.pending.len(),
                    "SSE tracker shut down with latest ids not in the store"
                );
            }
            let _ = request.reply.send(report);
        }
    }

    /// Advances the activity clock, sweeps idle streams and updates the registry gauges.
    fn on_tick(&mut self) {
        let now = self.registry.now_ms();
        self.registry.advance_clock(now);
        let evicted = self.registry.sweep_idle(now, SWEEP_BUDGET);
        if evicted > 0 {
            self.metrics.evicted_idle.increment(evicted as u64);
            tracing::debug!(evicted, "evicted idle SSE streams from the registry");
        }
        let counts = self.registry.counts();
        self.metrics.streams_tracked.set(counts.streams as f64);
        self.metrics
            .memory_bytes
            .set(counts.estimated_bytes() as f64);
    }

    /// Coalesces received records into the batch.
    fn accept(&mut self, buf: &mut Vec<Record>) {
        let mut coalesced = 0;
        for record in buf.drain(..) {
            coalesced += u64::from(self.batch.add(Pending {
                slot: record.slot,
                id: record.id,
                version: record.version,
                retries: 0,
            }));
        }
        if coalesced > 0 {
            self.metrics.records_coalesced.increment(coalesced);
        }
    }

    /// Adds the latest id of `slot` to the batch, if the store does not have it yet.
    fn add_latest(&mut self, slot: Arc<Slot>, retries: u32) {
        match slot.latest_entry() {
            Some((id, version)) if version.sequence > slot.persisted() => {
                if self.batch.add(Pending {
                    slot,
                    id,
                    version,
                    retries,
                }) {
                    self.metrics.records_coalesced.increment(1);
                }
            }
            _ => self.metrics.duplicates_skipped.increment(1),
        }
    }

    fn start_write(&mut self) -> Option<BoxFuture<'static, WriteDone>> {
        for slot in self.registry.take_dirty() {
            self.add_latest(slot, 0);
        }
        let taken = self.batch.take(self.config.max_batch);
        if taken.skipped > 0 {
            self.metrics
                .duplicates_skipped
                .increment(taken.skipped as u64);
        }
        // Sessions active since the last flush: each once, however many frames it sent.
        let sessions = self.registry.take_active();
        for session in &sessions {
            session.unmark();
        }
        if taken.write.is_empty() && sessions.is_empty() {
            return None;
        }
        self.writing_keys = taken.write.iter().map(|p| p.slot.key().clone()).collect();
        let activity: Vec<SessionActivity> = sessions
            .iter()
            .map(|s| SessionActivity {
                session: s.id().clone(),
                last_active: self.registry.wall_time(s.last_active_ms()),
            })
            .collect();
        let store = self.store.clone();
        let entries = taken.write;
        let batch: Vec<SaveEntry> = entries.iter().map(|p| p.to_save(&self.registry)).collect();
        Some(Box::pin(async move {
            let started = Instant::now();
            let result = if entries.is_empty() {
                Ok(())
            } else {
                store.save(&batch).await
            };
            let took = started.elapsed();
            let touched = if sessions.is_empty() {
                Ok(())
            } else {
                store.touch_sessions(&activity).await
            };
            WriteDone {
                entries,
                result,
                took,
                sessions,
                touched,
            }
        }))
    }

    /// Handles a finished write; returns how many streams it persisted.
    fn finish_write(&mut self, done: WriteDone) -> usize {
        self.writing_keys.clear();
        match done.touched {
            Ok(()) if !done.sessions.is_empty() => {
                let n = done.sessions.len();
                self.metrics.activity_updates.increment(n as u64);
                self.metrics.activity_batch_size.record(n as f64);
            }
            Ok(()) => {}
            Err(error) => {
                self.metrics.store_errors.increment(1);
                tracing::warn!(%error, sessions = done.sessions.len(), "SSE tracker activity write failed; retrying at the next flush");
                self.registry.requeue_active(done.sessions);
            }
        }
        let n = done.entries.len();
        if n == 0 {
            return 0;
        }
        self.metrics.batch_size.record(n as f64);
        self.metrics
            .store_write_seconds
            .record(done.took.as_secs_f64());
        match done.result {
            Ok(()) => {
                for pending in &done.entries {
                    pending.slot.set_persisted(pending.version.sequence);
                }
                self.metrics.store_writes.increment(n as u64);
                // The store works again: catch up the keys given up on earlier.
                self.requeue_given_up(0);
                n
            }
            Err(error) => {
                self.metrics.store_errors.increment(1);
                tracing::warn!(%error, streams = n, "SSE tracker store write failed; retrying");
                let now = Instant::now();
                let mut given_up = 0;
                for pending in done.entries {
                    given_up += usize::from(self.retry_or_give_up(pending, now));
                }
                if given_up > 0 {
                    tracing::error!(
                        streams = given_up,
                        %error,
                        "giving up writing the latest id of streams after the last retry; they stay dirty and are tried again after the next successful write"
                    );
                }
                0
            }
        }
    }

    /// Schedules a retry of `pending`'s stream, or gives it up; true when given up.
    fn retry_or_give_up(&mut self, pending: Pending, now: Instant) -> bool {
        let retries = pending.retries + 1;
        let slot = pending.slot;
        if retries > self.config.retry.max_retries() {
            self.metrics.retries_exhausted.increment(1);
            let key = slot.key();
            tracing::debug!(
                session = %key.session,
                stream = %key.stream,
                retries = pending.retries,
                "gave up writing the latest id of a stream"
            );
            if slot.set_dirty() {
                self.given_up.push(slot);
            }
            // Given-up streams are tried again after the next successful write, or, while the
            // store stays down, with one attempt per longest retry delay: progress without
            // hammering.
            self.probe_at.get_or_insert(now + self.config.retry.max());
            return true;
        } else if slot.enter_retry() {
            // One queue entry per slot: when due it writes the slot's latest id, so a retry is
            // coalesced with anything newer and never writes an old id over a new one.
            self.metrics.retries.increment(1);
            let delay = self.config.retry.delay(retries, self.jitter.next());
            self.retries.push(now + delay, (slot, retries));
        }
        false
    }

    /// Puts the given-up streams back in the batch, with `retries` already spent: 0 for a
    /// fresh round (the store works again, or shutdown), the maximum for a single probe.
    fn requeue_given_up(&mut self, retries: u32) {
        self.probe_at = None;
        for slot in std::mem::take(&mut self.given_up) {
            slot.clear_dirty();
            self.add_latest(slot, retries);
        }
    }

    fn take_due_retries(&mut self) {
        let now = Instant::now();
        while let Some((slot, retries)) = self.retries.pop_due(now) {
            slot.leave_retry();
            self.add_latest(slot, retries);
        }
    }

    fn report(
        &mut self,
        persisted: usize,
        deadline_reached: bool,
        writing: bool,
    ) -> ShutdownReport {
        let mut pending = BTreeSet::new();
        if writing {
            pending.extend(self.writing_keys.drain(..));
        }
        pending.extend(self.batch.slots().map(|s| s.key().clone()));
        pending.extend(self.retries.drain().map(|(s, _)| s.key().clone()));
        pending.extend(self.registry.take_dirty().iter().map(|s| s.key().clone()));
        while let Ok(record) = self.rx.try_recv() {
            pending.insert(record.slot.key().clone());
        }
        let given_up: BTreeSet<StreamKey> = self.given_up.iter().map(|s| s.key().clone()).collect();
        pending.retain(|key| !given_up.contains(key));
        ShutdownReport {
            persisted,
            given_up: given_up.into_iter().collect(),
            pending: pending.into_iter().collect(),
            deadline_reached,
        }
    }
}
