//! The one background worker of a tracker: batches, coalesces, de-duplicates and retries the
//! latest ids on their way to the [`Store`](crate::store::Store).
//!
//! Bodies tell it which streams changed (a stream's slot, at most once until the worker has
//! read it) through a bounded channel, which the worker drains continuously into its pending
//! list; the slot itself holds the latest id. On every flush tick the worker starts a *round*:
//! it reads the latest id of every pending stream (however many ids the stream committed since
//! the last round), leaves out what the store already has, adds the retries that are due and
//! the evicted streams still owed a write, and writes all of it in calls of at most `max_batch`
//! entries, one call at a time. Alongside, at each tick, it writes the activity of the sessions
//! active since the last tick the same way. One save and one activity write can be in flight
//! together, so that a hung call of one kind does not hold up the other.
//!
//! Every store call runs under the store timeout with its panics caught: an error, a hang and a
//! panic are each one failed call, counted (`sse_tracker_store_errors_total{op,reason}`),
//! logged, and followed by back-off. After a failed call the rest of the round's calls of that
//! kind wait, and no call of that kind starts again before the retry policy's delay (doubling
//! with each failure in a row): a store that fails at once for ever costs a few calls per
//! second, never a loop. The failed entries go to a time-ordered retry queue; a due retry
//! writes the stream's latest id at that moment, so it never overwrites a newer one.
//!
//! Everything the worker holds is bounded by the registry: each slot is at most once in its
//! pending list, its retry queue and its given-up list, and evicted slots are owned by the
//! registry's bounded FIFO. The worker runs under a supervisor that catches its panics and
//! restarts it from the registry's state, and notices when its task is dropped.

pub(crate) mod batch;
pub(crate) mod guard;
pub(crate) mod retry;

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, sleep_until};

use crate::key::StreamKey;
use crate::metrics::Handles;
use crate::registry::{Registry, SessionState, Slot};
use crate::store::{BoxFuture, DynStore, SaveEntry, SessionActivity};
use batch::{Pending, RoundEntries, chunks};
use guard::{CatchUnwind, StoreFailure, guarded, panic_message};
use retry::{Jitter, RetryPolicy, RetryQueue};

/// The worker's settings.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) max_batch: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) store_timeout: Duration,
}

/// What [`SseTracker::shutdown`](crate::SseTracker::shutdown) reports: which streams' latest
/// ids are in the store, checked stream by stream when the shutdown ends.
///
/// Every stream whose latest id is not in the store at that moment is listed, in `given_up` or
/// in `pending`: ids waiting for a flush, a retry, a write in flight, a hand-off to the worker,
/// and those of evicted streams still waiting for a write. Ids committed after the shutdown
/// began are not written (the worker stops taking new ones), so a stream still publishing then
/// is listed too: drain open streams first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Streams whose latest id this shutdown wrote (each stream counted once).
    pub persisted: usize,
    /// Streams whose write failed more often than the retry policy allows, during the shutdown
    /// too (a shutdown tries given-up streams again, so after a short shutdown against a store
    /// that stays down they are in `pending`).
    pub given_up: Vec<StreamKey>,
    /// Streams whose latest id is not in the store for another reason (not written before the
    /// deadline, or committed after the shutdown began).
    pub pending: Vec<StreamKey>,
    /// Latest ids dropped before they reached the store since the tracker was built (evicted
    /// streams beyond the `max_pending_evicted` bound, or evicted after the worker stopped);
    /// each was counted in `sse_tracker_ids_dropped_total` and logged.
    pub dropped: u64,
    /// Whether the deadline cut the shutdown short.
    pub deadline_reached: bool,
    /// Whether the worker task ended without finishing (its runtime shut down under it): then
    /// nothing was written during this shutdown.
    pub worker_lost: bool,
    /// Whether the worker was still running when this report was made: the report of a second
    /// `shutdown` that stopped waiting for the first at its own deadline, or of a worker that
    /// did not answer by the deadline (its runtime blocked). Its lists are what the store
    /// lacked at that moment, and writes may still land after it; such a report is never
    /// complete.
    pub worker_running: bool,
}

impl ShutdownReport {
    /// Whether every latest id reached the store, none was dropped, and the worker ran to the
    /// end and had finished when the report was made.
    pub fn is_complete(&self) -> bool {
        self.given_up.is_empty()
            && self.pending.is_empty()
            && self.dropped == 0
            && !self.worker_lost
            && !self.worker_running
    }
}

/// Lists every stream whose latest id the store does not have. An evicted slot of a key whose
/// slot in the registry has an id of its own in the store is covered by it: that id is newer.
fn report(
    registry: &Registry,
    persisted: usize,
    deadline_reached: bool,
    worker_lost: bool,
    worker_running: bool,
) -> ShutdownReport {
    let mut covered: BTreeSet<StreamKey> = BTreeSet::new();
    let mut owed: Vec<Arc<Slot>> = Vec::new();
    for slot in registry.all_slots() {
        if slot.is_evicted() || slot.unpersisted() {
            owed.push(slot);
        } else if slot.latest().is_some() {
            covered.insert(slot.key().clone());
        }
    }
    let mut pending = BTreeSet::new();
    let mut given_up = BTreeSet::new();
    for slot in owed {
        if !slot.unpersisted() || (slot.is_evicted() && covered.contains(slot.key())) {
            continue;
        }
        if slot.is_given_up() {
            given_up.insert(slot.key().clone());
        } else {
            pending.insert(slot.key().clone());
        }
    }
    pending.retain(|key| !given_up.contains(key));
    ShutdownReport {
        persisted,
        given_up: given_up.into_iter().collect(),
        pending: pending.into_iter().collect(),
        dropped: registry.dropped(),
        deadline_reached,
        worker_lost,
        worker_running,
    }
}

struct ShutdownRequest {
    deadline: Instant,
    /// `None` when the worker shuts itself down: every tracker, layer and body is gone.
    reply: Option<oneshot::Sender<ShutdownReport>>,
}

/// `timeout` from now, or far in the future when that is beyond what an instant can hold.
fn far_instant(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// How long the worker keeps trying to write what it holds once every tracker, layer and body
/// is gone without a `shutdown()`.
const ABANDONED_DEADLINE: Duration = Duration::from_secs(10);

/// The tracker's background worker: a future to run on a Tokio runtime (spawn it), made by
/// [`SseTrackerBuilder::build_with_worker`](crate::SseTrackerBuilder::build_with_worker). It
/// runs until the tracker is shut down, or every tracker, layer and body is gone.
#[must_use = "the worker does nothing until it is spawned"]
pub struct WorkerTask(BoxFuture<'static, ()>);

impl std::fmt::Debug for WorkerTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerTask")
    }
}

impl Future for WorkerTask {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// What the tracker knows of its worker task.
#[derive(Debug)]
struct Status {
    /// True once the worker has stopped (normally or not).
    finished: watch::Sender<bool>,
    /// The task ended without finishing.
    lost: AtomicBool,
}

/// The bodies' and the tracker's side of the worker.
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    pub(crate) sender: mpsc::Sender<Arc<Slot>>,
    control: Mutex<Option<oneshot::Sender<ShutdownRequest>>>,
    status: Arc<Status>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for ShutdownRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownRequest")
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl WorkerHandle {
    /// The handle and the worker's task (its supervisor), for the caller to spawn.
    pub(crate) fn new(
        capacity: usize,
        config: WorkerConfig,
        registry: Arc<Registry>,
        store: Arc<dyn DynStore>,
        metrics: Handles,
    ) -> (Self, WorkerTask) {
        let (sender, rx) = mpsc::channel(capacity);
        let (control, control_rx) = oneshot::channel();
        let status = Arc::new(Status {
            finished: watch::Sender::new(false),
            lost: AtomicBool::new(false),
        });
        let io = Io {
            rx,
            control: Some(control_rx),
            saving: None,
            touching: None,
            open: true,
        };
        let state = State {
            registry: registry.clone(),
            store,
            metrics,
            jitter: Jitter::new(),
            pending: Vec::new(),
            retries: RetryQueue::default(),
            given_up: Vec::new(),
            probe_at: None,
            save_gate: Gate::default(),
            touch_gate: Gate::default(),
            round_no: 0,
            round: Round::default(),
            flush_due: false,
            touch_due: false,
            retry_round_due: false,
            shutdown: None,
            dropped_reported: 0,
            config,
        };
        // Made here and moved into the task, so that it notices the task being dropped even
        // before its first poll.
        let guard = LostGuard {
            status: status.clone(),
            registry: registry.clone(),
            metrics: state.metrics.clone(),
            armed: true,
        };
        let task = Box::pin(supervise(io, state, status.clone(), guard));
        (
            Self {
                sender,
                control: Mutex::new(Some(control)),
                status,
                registry,
            },
            WorkerTask(task),
        )
    }

    /// Stops intake, flushes and retries until `timeout`, then reports. A second call (or a
    /// call after the worker was lost) writes nothing and reports what the store still lacks.
    pub(crate) async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let deadline = far_instant(timeout);
        let control = self
            .control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(control) = control {
            let (reply, report) = oneshot::channel();
            if control
                .send(ShutdownRequest {
                    deadline,
                    reply: Some(reply),
                })
                .is_ok()
            {
                // The worker answers by its deadline; this one only guards against a worker
                // that cannot run (its runtime blocked), a little later.
                let guard = deadline
                    .checked_add(Duration::from_secs(1))
                    .unwrap_or(deadline);
                if let Ok(Ok(report)) = tokio::time::timeout_at(guard, report).await {
                    return report;
                }
            }
        } else {
            // Another shutdown is running or done: wait for it (up to our own deadline).
            let mut finished = self.status.finished.subscribe();
            let _ = tokio::time::timeout_at(deadline, finished.wait_for(|done| *done)).await;
        }
        report(
            &self.registry,
            0,
            Instant::now() >= deadline,
            self.status.lost.load(Ordering::Acquire),
            !*self.status.finished.borrow(),
        )
    }
}

/// Closes a call kind (save or touch) for a back-off delay after a failure.
#[derive(Debug, Default)]
struct Gate {
    failures: u32,
    open_at: Option<Instant>,
}

impl Gate {
    fn is_open(&self, now: Instant) -> bool {
        self.open_at.is_none_or(|at| now >= at)
    }

    fn failed(&mut self, now: Instant, policy: &RetryPolicy, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        self.open_at = Some(now + policy.delay(self.failures, jitter));
    }

    fn succeeded(&mut self) {
        self.failures = 0;
        self.open_at = None;
    }
}

/// The calls of a round not started yet.
#[derive(Default)]
struct Round {
    saves: VecDeque<Vec<Pending>>,
    touches: VecDeque<Vec<Arc<SessionState>>>,
}

impl Round {
    fn is_empty(&self) -> bool {
        self.saves.is_empty() && self.touches.is_empty()
    }
}

/// A finished store call, with what it carried.
enum CallDone {
    Save {
        entries: Vec<Pending>,
        result: Result<(), StoreFailure>,
        started: Instant,
        took: Duration,
    },
    Touch {
        sessions: Vec<Arc<SessionState>>,
        result: Result<(), StoreFailure>,
        started: Instant,
    },
}

/// What the worker's loop waits on; survives a restart of the loop.
struct Io {
    rx: mpsc::Receiver<Arc<Slot>>,
    control: Option<oneshot::Receiver<ShutdownRequest>>,
    /// The save call in flight, and the activity call in flight: one of each kind at most, so
    /// that a hung call of one kind does not hold up the other.
    saving: Option<BoxFuture<'static, CallDone>>,
    touching: Option<BoxFuture<'static, CallDone>>,
    /// The channel is open (not closed by shutdown, and senders remain).
    open: bool,
}

struct ShutdownState {
    request: ShutdownRequest,
    /// When the shutdown began: a call started earlier that fails belongs to the earlier
    /// failures, whose back-off the shutdown does not wait for.
    began: Instant,
    /// Streams written during the shutdown.
    written: HashSet<StreamKey>,
    /// The shutdown's round of activity writes has been made.
    touched: bool,
}

struct State {
    registry: Arc<Registry>,
    store: Arc<dyn DynStore>,
    metrics: Handles,
    config: WorkerConfig,
    jitter: Jitter,
    /// Slots that told the worker they changed, each once (their queued flag guards it).
    pending: Vec<Arc<Slot>>,
    /// Failed slots, by due time; each once (their `in_retry` flag guards it).
    retries: RetryQueue<Arc<Slot>>,
    /// Slots whose retries ran out; caught up after the next successful write, or probed once
    /// per longest retry delay. Each once (their `given_up` flag guards it).
    given_up: Vec<Arc<Slot>>,
    probe_at: Option<Instant>,
    save_gate: Gate,
    touch_gate: Gate,
    /// The number of the last round (see `Slot::take_for_round`).
    round_no: u64,
    round: Round,
    /// A round of saves is due (the flush tick, or a shutdown).
    flush_due: bool,
    /// A round of activity writes is due (the flush tick, or a shutdown).
    touch_due: bool,
    retry_round_due: bool,
    shutdown: Option<ShutdownState>,
    /// `registry.dropped()` when the last warning was logged.
    dropped_reported: u64,
}

/// Records taken from the channel per receive, at most; the loop goes round between two.
const RECEIVE_LIMIT: usize = 1024;
/// Slots the idle sweep looks at per tick, at most.
const SWEEP_BUDGET: usize = 1024;

/// Waits for `f` when there is one; never completes otherwise.
async fn maybe<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Marks the worker lost when its task is dropped before it finished.
struct LostGuard {
    status: Arc<Status>,
    registry: Arc<Registry>,
    metrics: Handles,
    armed: bool,
}

impl Drop for LostGuard {
    fn drop(&mut self) {
        if self.armed {
            self.status.lost.store(true, Ordering::Release);
            self.metrics.worker_lost.increment(1);
            tracing::error!(
                "SSE tracker worker task ended before it finished (its runtime shut down?): \
                 latest ids are no longer persisted"
            );
            self.registry.close();
            self.status.finished.send_replace(true);
        }
    }
}

/// Runs the worker, restarting it after a panic (with back-off, so that a panic on every
/// round costs bounded CPU), until it finishes.
async fn supervise(mut io: Io, mut state: State, status: Arc<Status>, mut guard: LostGuard) {
    let mut panics = 0;
    loop {
        match CatchUnwind::new(AssertUnwindSafe(run(&mut io, &mut state))).await {
            Ok(()) => break,
            Err(payload) => {
                panics += 1;
                state.metrics.worker_panics.increment(1);
                tracing::error!(
                    panic = %panic_message(&*payload),
                    restarts = panics,
                    "SSE tracker worker panicked; restarting it from the registry's state"
                );
                io.saving = None;
                io.touching = None;
                state.recover();
                let pause = state.config.retry.delay(panics, state.jitter.next());
                let resume = far_instant(pause);
                let until = match &state.shutdown {
                    Some(shutdown) => resume.min(shutdown.request.deadline),
                    None => resume,
                };
                tokio::time::sleep_until(until).await;
            }
        }
    }
    let report = state.shutdown.take().map(|shutdown| {
        let deadline_reached = Instant::now() >= shutdown.request.deadline;
        let report = report(
            &state.registry,
            shutdown.written.len(),
            deadline_reached,
            false,
            false,
        );
        (shutdown.request.reply, report)
    });
    state.registry.close();
    guard.armed = false;
    status.finished.send_replace(true);
    if let Some((reply, report)) = report {
        if !report.is_complete() {
            tracing::warn!(
                persisted = report.persisted,
                given_up = report.given_up.len(),
                pending = report.pending.len(),
                dropped = report.dropped,
                "SSE tracker shut down with latest ids not in the store"
            );
        }
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
    }
}

async fn run(io: &mut Io, state: &mut State) {
    let mut tick: Interval = tokio::time::interval(state.config.flush_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut buf = Vec::with_capacity(RECEIVE_LIMIT);
    loop {
        let now = Instant::now();
        if state.finished(io, now) {
            return;
        }
        if io.saving.is_none() && state.round.saves.is_empty() {
            if state.shutdown.is_some() && state.owes_writes() && state.save_gate.is_open(now) {
                // A shutdown writes what it owes as soon as it can, not at the next tick.
                state.flush_due = true;
            }
            if state.flush_due {
                state.flush_due = false;
                state.retry_round_due = false;
                state.assemble(now, true);
            } else if state.retry_round_due {
                state.retry_round_due = false;
                state.assemble(now, false);
            }
        }
        if io.touching.is_none() && state.round.touches.is_empty() && state.touch_due {
            state.touch_due = false;
            state.assemble_touches(now);
        }
        if io.saving.is_none() {
            io.saving = state.next_save(now);
        }
        if io.touching.is_none() {
            io.touching = state.next_touch(now);
        }
        state.metrics.queue_depth.set(io.rx.len() as f64);
        state
            .metrics
            .retry_queue_depth
            .set(state.retries.len() as f64);

        // Retries, probes and the shutdown's writes are saves: they wait for the save in
        // flight, whose end wakes the loop. Activity writes start at the flush tick.
        let wake = if io.saving.is_none() && state.round.saves.is_empty() {
            state.next_wake()
        } else {
            None
        };
        let deadline = state.shutdown.as_ref().map(|s| s.request.deadline);
        tokio::select! {
            biased;
            request = maybe_control(&mut io.control) => {
                io.control = None;
                if let Ok(request) = request {
                    state.begin_shutdown(request);
                    // Stop intake now, even though bodies still hold senders; what is already
                    // in the channel is still received.
                    io.rx.close();
                }
            }
            done = maybe(&mut io.saving) => {
                io.saving = None;
                state.finish_call(done);
                // A store that answers at once must not keep this task from yielding.
                tokio::task::yield_now().await;
            }
            done = maybe(&mut io.touching) => {
                io.touching = None;
                state.finish_call(done);
                tokio::task::yield_now().await;
            }
            received = io.rx.recv_many(&mut buf, RECEIVE_LIMIT), if io.open => {
                if received == 0 {
                    io.open = false;
                    if state.shutdown.is_none() {
                        // Every tracker, layer and body is gone: write what is held, for a
                        // while, then stop.
                        state.begin_shutdown(ShutdownRequest {
                            deadline: far_instant(ABANDONED_DEADLINE),
                            reply: None,
                        });
                    }
                } else {
                    state.accept(&mut buf);
                }
            }
            _ = tick.tick() => {
                state.flush_due = true;
                state.touch_due = true;
                state.on_tick();
            }
            _ = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {
                state.on_wake(Instant::now());
            }
            _ = sleep_until(deadline.unwrap_or(now)), if deadline.is_some() => {}
        }
    }
}

async fn maybe_control(
    control: &mut Option<oneshot::Receiver<ShutdownRequest>>,
) -> Result<ShutdownRequest, oneshot::error::RecvError> {
    match control {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}

impl State {
    /// Whether the loop is done: the shutdown deadline passed, or intake is closed and no id
    /// is owed (given-up streams included). Activity marks made after the shutdown began do
    /// not keep it going: open streams make them all the time.
    fn finished(&self, io: &Io, now: Instant) -> bool {
        if let Some(shutdown) = &self.shutdown
            && now >= shutdown.request.deadline
        {
            return true;
        }
        !io.open
            && io.saving.is_none()
            && io.touching.is_none()
            && self.round.is_empty()
            && self.pending.is_empty()
            && self.retries.len() == 0
            && self.given_up.is_empty()
            && !self.registry.has_dirty()
            && self.registry.evicted_pending_len() == 0
    }

    fn begin_shutdown(&mut self, request: ShutdownRequest) {
        let now = Instant::now();
        self.waive_back_off(now);
        self.shutdown = Some(ShutdownState {
            request,
            began: now,
            written: HashSet::new(),
            touched: false,
        });
    }

    /// Shutdown retries until its deadline, given-up streams included, and waits for no
    /// back-off of earlier failures: every retry is due now and both gates are open. Called
    /// when the shutdown begins, and again when a call started before it fails after it.
    fn waive_back_off(&mut self, now: Instant) {
        self.requeue_given_up(0, now);
        self.retries.reschedule_all(now);
        self.save_gate.open_at = None;
        self.touch_gate.open_at = None;
        self.flush_due = true;
        self.touch_due = true;
    }

    /// Whether ids wait for a round: received, handed over late, or evicted.
    fn owes_writes(&self) -> bool {
        !self.pending.is_empty()
            || self.registry.has_dirty()
            || self.registry.evicted_pending_len() > 0
    }

    /// When the worker must wake for retries or probes (not before the save gate opens).
    fn next_wake(&self) -> Option<Instant> {
        if self.retry_round_due || self.flush_due {
            // A round starts at the top of the loop.
            return None;
        }
        // A shutdown that owes writes wakes when the save gate opens.
        let owed = (self.shutdown.is_some() && self.owes_writes()).then(Instant::now);
        let due = [self.retries.next_due(), self.probe_at, owed]
            .into_iter()
            .flatten()
            .min()?;
        Some(match self.save_gate.open_at {
            Some(open) => due.max(open),
            None => due,
        })
    }

    fn on_wake(&mut self, now: Instant) {
        if self.probe_at.is_some_and(|at| now >= at) {
            // One attempt; if it fails the streams are given up again until the next probe.
            self.requeue_given_up(self.config.retry.max_retries(), now);
        }
        if self.retries.next_due().is_some_and(|due| now >= due) {
            self.retry_round_due = true;
        }
    }

    /// Advances the clock, sweeps idle streams, reports drops and updates the gauges.
    fn on_tick(&mut self) {
        let now = self.registry.now_us();
        self.registry.advance_clock(now);
        let evicted = self.registry.sweep_idle(now, SWEEP_BUDGET);
        if evicted > 0 {
            self.metrics.evicted_idle.increment(evicted as u64);
            tracing::debug!(evicted, "evicted idle SSE streams from the registry");
        }
        let dropped = self.registry.dropped();
        if dropped > self.dropped_reported {
            tracing::warn!(
                dropped = dropped - self.dropped_reported,
                total = dropped,
                bound = self.registry.limits().max_pending_evicted,
                "dropped the unpersisted latest ids of evicted SSE streams: the store is not keeping up and the bound on evicted streams waiting for a write is full"
            );
            self.dropped_reported = dropped;
        }
        let counts = self.registry.counts();
        self.metrics.streams_tracked.set(counts.streams as f64);
        self.metrics
            .memory_bytes
            .set(counts.estimated_bytes() as f64);
        self.metrics
            .evicted_pending
            .set(counts.evicted_pending as f64);
    }

    /// The most entries any list of the worker holds before it is purged of evicted slots.
    fn list_bound(&self) -> usize {
        self.registry.limits().list_bound()
    }

    /// Takes received slots into the pending list.
    fn accept(&mut self, buf: &mut Vec<Arc<Slot>>) {
        self.pending.append(buf);
        if self.pending.len() > self.list_bound() {
            // Evicted slots are the registry's FIFO's; dropping them here keeps this list
            // within the registry's bound (amortized O(1) per slot).
            self.pending.retain(|s| !s.is_evicted());
        }
    }

    /// Starts a round: the latest ids of the pending streams (with `fresh`), the due retries
    /// and the evicted streams owed a write, and the activity of the sessions active since the
    /// last round. A kind whose gate is closed after a failure waits (its entries coalesce).
    fn assemble(&mut self, now: Instant, fresh: bool) {
        self.round_no = self.round_no.wrapping_add(1);
        let round = self.round_no;
        let mut taken = RoundEntries::default();
        if self.save_gate.is_open(now) {
            if self.retries.len() > self.list_bound() {
                self.retries.retain(|s| !s.is_evicted());
            }
            if self.given_up.len() > self.list_bound() {
                self.given_up.retain(|s| !s.is_evicted());
            }
            while let Some(slot) = self.retries.pop_due(now) {
                slot.leave_retry();
                taken.take(slot, round, false);
            }
            if fresh {
                let dirty = self.registry.take_dirty();
                for slot in std::mem::take(&mut self.pending).into_iter().chain(dirty) {
                    taken.take(slot, round, false);
                }
            }
            // Evicted slots stay in the registry's FIFO, visible to lookups and to the
            // report, until their id is in the store: a failed write leaves them there.
            for slot in self.registry.evicted_owed() {
                taken.take(slot, round, true);
            }
            // A key evicted and made again has two slots: one entry per key, the newest. Only
            // then can a key come twice (a round takes a slot once), and the evicted one can
            // come from any list (evicted after it was taken from the retry queue, say).
            if taken.entries.iter().any(|p| p.slot.is_evicted()) {
                taken.one_per_key();
            }
        }
        if taken.duplicates > 0 {
            self.metrics.duplicates_skipped.increment(taken.duplicates);
        }
        self.round.saves = chunks(taken.entries, self.config.max_batch);
    }

    /// Starts a round of activity writes: the sessions active since the last one, unless the
    /// touch gate is closed after a failure (their marks wait in the registry).
    fn assemble_touches(&mut self, now: Instant) {
        // After the first round of a shutdown, activity is no longer written: open streams make
        // marks all the time, and they do not decide whether a stream can be resumed.
        let touch = match &mut self.shutdown {
            Some(shutdown) => !std::mem::replace(&mut shutdown.touched, true),
            None => true,
        };
        if touch && self.touch_gate.is_open(now) {
            let sessions = self.registry.take_active();
            for session in &sessions {
                session.unmark();
            }
            self.round.touches = chunks(sessions, self.config.max_batch);
        }
    }

    /// The round's next save, if the save gate is open.
    fn next_save(&mut self, now: Instant) -> Option<BoxFuture<'static, CallDone>> {
        let timeout = self.config.store_timeout;
        if !self.round.saves.is_empty() && self.save_gate.is_open(now) {
            let entries = self.round.saves.pop_front()?;
            let batch: Vec<SaveEntry> = entries.iter().map(|p| p.to_save(&self.registry)).collect();
            let store = self.store.clone();
            return Some(Box::pin(async move {
                let started = Instant::now();
                let result = guarded(timeout, async { store.save(&batch).await }).await;
                CallDone::Save {
                    entries,
                    result,
                    started,
                    took: started.elapsed(),
                }
            }));
        }
        None
    }

    /// The round's next activity write, if the touch gate is open.
    fn next_touch(&mut self, now: Instant) -> Option<BoxFuture<'static, CallDone>> {
        let timeout = self.config.store_timeout;
        if !self.round.touches.is_empty() && self.touch_gate.is_open(now) {
            let sessions = self.round.touches.pop_front()?;
            let activity: Vec<SessionActivity> = sessions
                .iter()
                .filter_map(|s| {
                    Some(SessionActivity {
                        owner: s.id()?.clone(),
                        last_active: self.registry.wall_time(s.last_active_us()),
                    })
                })
                .collect();
            let store = self.store.clone();
            return Some(Box::pin(async move {
                let started = Instant::now();
                let result =
                    guarded(timeout, async { store.touch_sessions(&activity).await }).await;
                CallDone::Touch {
                    sessions,
                    result,
                    started,
                }
            }));
        }
        None
    }

    fn finish_call(&mut self, done: CallDone) {
        let now = Instant::now();
        let (CallDone::Save {
            started, result, ..
        }
        | CallDone::Touch {
            started, result, ..
        }) = &done;
        // A call sent before the shutdown began that fails after it is one of the earlier
        // failures: the shutdown does not wait for its back-off either.
        let earlier_failure = result.is_err()
            && self
                .shutdown
                .as_ref()
                .is_some_and(|shutdown| *started < shutdown.began);
        match done {
            CallDone::Save {
                entries,
                result,
                took,
                ..
            } => {
                let n = entries.len();
                self.metrics.batch_size.record(n as f64);
                self.metrics.store_write_seconds.record(took.as_secs_f64());
                match result {
                    Ok(()) => {
                        for (slot, version) in entries.iter().flat_map(Pending::slots) {
                            slot.set_persisted(version.sequence);
                            slot.set_retries(0);
                        }
                        if let Some(shutdown) = &mut self.shutdown {
                            shutdown
                                .written
                                .extend(entries.iter().map(|p| p.slot.key().clone()));
                        }
                        self.metrics.store_writes.increment(n as u64);
                        self.save_gate.succeeded();
                        // The store works again: catch up the streams given up on earlier.
                        self.requeue_given_up(0, now);
                    }
                    Err(failure) => self.save_failed(entries, failure, now),
                }
            }
            CallDone::Touch {
                sessions, result, ..
            } => match result {
                Ok(()) => {
                    let n = sessions.len();
                    self.metrics.activity_updates.increment(n as u64);
                    self.metrics.activity_batch_size.record(n as f64);
                    self.touch_gate.succeeded();
                }
                Err(failure) => {
                    self.metrics
                        .store_errors
                        .get(1, failure.reason_index())
                        .increment(1);
                    let jitter = self.jitter.next();
                    self.touch_gate.failed(now, &self.config.retry, jitter);
                    // The rest of the round's activity waits for the gate too.
                    let mut back = sessions;
                    back.extend(
                        std::mem::take(&mut self.round.touches)
                            .into_iter()
                            .flatten(),
                    );
                    tracing::warn!(
                        error = %failure,
                        sessions = back.len(),
                        retry_in = ?self.touch_gate.open_at.map(|at| at - now),
                        "SSE tracker session activity write failed; retrying after back-off"
                    );
                    self.registry.requeue_active(back);
                }
            },
        }
        if earlier_failure {
            self.waive_back_off(now);
        }
    }

    fn save_failed(&mut self, entries: Vec<Pending>, failure: StoreFailure, now: Instant) {
        self.metrics
            .store_errors
            .get(0, failure.reason_index())
            .increment(1);
        let jitter = self.jitter.next();
        self.save_gate.failed(now, &self.config.retry, jitter);
        let n = entries.len();
        let mut given_up = 0;
        for pending in entries {
            let covered = pending.covers.into_iter().map(|(slot, _)| slot);
            for slot in std::iter::once(pending.slot).chain(covered) {
                given_up += usize::from(self.retry_or_give_up(slot, now));
            }
        }
        // The round's other writes were not tried: their streams wait for the next round.
        let untried: Vec<Pending> = std::mem::take(&mut self.round.saves)
            .into_iter()
            .flatten()
            .collect();
        let untried_n = untried.len();
        for pending in untried {
            if !pending.slot.is_evicted() && pending.slot.mark_queued() {
                self.pending.push(pending.slot);
            }
        }
        tracing::warn!(
            error = %failure,
            streams = n,
            waiting = untried_n,
            retry_in = ?self.save_gate.open_at.map(|at| at - now),
            "SSE tracker store write failed; retrying after back-off"
        );
        if given_up > 0 {
            tracing::error!(
                streams = given_up,
                error = %failure,
                "giving up writing the latest id of streams after the last retry; they are written again after the next successful write, or probed once per longest retry delay"
            );
        }
    }

    /// Schedules a retry of `slot`'s write, or gives it up; true when given up.
    fn retry_or_give_up(&mut self, slot: Arc<Slot>, now: Instant) -> bool {
        if slot.is_evicted() {
            // The registry's evicted FIFO owns it now (when its id is unpersisted).
            return false;
        }
        let retries = slot.retries().saturating_add(1);
        slot.set_retries(retries);
        // Keep the slot queued while the retry queue or the given-up list holds it, so bodies
        // send nothing more for it: its latest id is read again when it is retried.
        slot.mark_queued();
        if retries > self.config.retry.max_retries() {
            self.metrics.retries_exhausted.increment(1);
            tracing::debug!(
                key = %slot.key(),
                retries = retries - 1,
                "gave up writing the latest id of a stream"
            );
            if slot.set_given_up(true) {
                self.given_up.push(slot);
            }
            self.probe_at.get_or_insert(now + self.config.retry.max());
            true
        } else {
            if slot.enter_retry() {
                self.metrics.retries.increment(1);
                let delay = self.config.retry.delay(retries, self.jitter.next());
                self.retries.push(now + delay, slot);
            }
            false
        }
    }

    /// Moves the given-up streams to the retry queue, due now, with `retries` already spent: 0
    /// for a fresh round (the store works again, or shutdown), the maximum for a single probe.
    fn requeue_given_up(&mut self, retries: u32, now: Instant) {
        self.probe_at = None;
        for slot in std::mem::take(&mut self.given_up) {
            slot.set_given_up(false);
            if slot.is_evicted() {
                continue;
            }
            slot.set_retries(retries);
            if slot.enter_retry() {
                self.retries.push(now, slot);
            }
        }
        if self.retries.next_due().is_some_and(|due| due <= now) {
            self.retry_round_due = true;
        }
    }

    /// After a panic of the loop: nothing the worker held can be trusted, so every list is
    /// rebuilt from the registry, where the state that matters lives (each slot's latest id and
    /// persisted sequence).
    fn recover(&mut self) {
        self.round = Round::default();
        self.pending.clear();
        self.retries = RetryQueue::default();
        self.given_up.clear();
        self.probe_at = None;
        for slot in self.registry.all_slots() {
            if slot.is_evicted() {
                continue;
            }
            slot.leave_retry();
            slot.set_given_up(false);
            slot.session().unmark();
            if slot.unpersisted() {
                slot.mark_queued();
                self.pending.push(slot);
            } else {
                // Let bodies hand it over again on their next id.
                slot.take_latest();
            }
        }
        let active = self.registry.take_active();
        for session in &active {
            session.unmark();
        }
        if !active.is_empty() {
            // Their marks are made again by their next frame; these are not written.
            self.registry.count_activity_dropped(active.len());
        }
        self.flush_due = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_gate_stays_closed_for_the_policys_delay_doubling_per_failure() {
        let policy =
            RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1), 3);
        let mut gate = Gate::default();
        let now = Instant::now();
        assert!(gate.is_open(now));
        gate.failed(now, &policy, 0.999);
        assert!(!gate.is_open(now + Duration::from_millis(49)));
        assert!(gate.is_open(now + Duration::from_millis(100)));
        gate.failed(now, &policy, 0.999);
        assert!(!gate.is_open(now + Duration::from_millis(99)));
        for _ in 0..10 {
            gate.failed(now, &policy, 0.999);
        }
        assert!(gate.is_open(now + Duration::from_secs(1)), "capped at max");
        gate.succeeded();
        assert!(gate.is_open(now));
    }
}
