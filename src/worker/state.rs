//! The worker's state between two turns of its loop: what it owes the store, its rounds of
//! writes, its retries and back-off, and what it does with each finished call.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::batch::{Pending, RoundEntries, chunks};
use super::guard::{StoreFailure, guarded};
use super::retry::{Jitter, RetryPolicy, RetryQueue};
use super::{Io, LEASE_EVERY, LogsToStore, SWEEP_BUDGET, ShutdownRequest, WorkerConfig};
use crate::key::StreamKey;
use crate::metrics::{Handles, StoreOp};
use crate::registry::{Registry, SessionState, Slot};
use crate::replay::StreamLog;
use crate::store::{AppendReport, BoxFuture, DynStore, LogAppend, SaveEntry, SessionActivity};

/// Closes a call kind (save or touch) for a back-off delay after a failure.
#[derive(Debug, Default)]
pub(super) struct Gate {
    pub(super) failures: u32,
    pub(super) open_at: Option<Instant>,
}

impl Gate {
    pub(super) fn is_open(&self, now: Instant) -> bool {
        self.open_at.is_none_or(|at| now >= at)
    }

    pub(super) fn failed(&mut self, now: Instant, policy: &RetryPolicy, jitter: f64) {
        self.failures = self.failures.saturating_add(1);
        self.open_at = Some(now + policy.delay(self.failures, jitter));
    }

    pub(super) fn succeeded(&mut self) {
        self.failures = 0;
        self.open_at = None;
    }
}

/// The calls of a round not started yet.
#[derive(Default)]
pub(super) struct Round {
    pub(super) saves: VecDeque<Vec<Pending>>,
    pub(super) touches: VecDeque<Vec<Arc<SessionState>>>,
    /// Replay-log appends, each with the log it was read from.
    pub(super) appends: VecDeque<Vec<(Arc<StreamLog>, LogAppend)>>,
}

impl Round {
    pub(super) fn is_empty(&self) -> bool {
        self.saves.is_empty() && self.touches.is_empty() && self.appends.is_empty()
    }
}

/// A finished store call, with what it carried.
pub(super) enum CallDone {
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
    /// The logs it was read from are `State::appending`.
    Append {
        appends: Vec<LogAppend>,
        result: Result<AppendReport, StoreFailure>,
        started: Instant,
    },
    Lease {
        result: Result<(), StoreFailure>,
        started: Instant,
    },
}

pub(super) struct ShutdownState {
    pub(super) request: ShutdownRequest,
    /// When the shutdown began: a call started earlier that fails belongs to the earlier
    /// failures, whose back-off the shutdown does not wait for.
    pub(super) began: Instant,
    /// Streams written during the shutdown.
    pub(super) written: HashSet<StreamKey>,
    /// The shutdown's round of activity writes has been made.
    pub(super) touched: bool,
}

pub(super) struct State {
    pub(super) registry: Arc<Registry>,
    pub(super) store: Arc<dyn DynStore>,
    pub(super) metrics: Handles,
    pub(super) config: WorkerConfig,
    pub(super) jitter: Jitter,
    /// Slots that told the worker they changed, each once (their queued flag guards it).
    pub(super) pending: Vec<Arc<Slot>>,
    /// Failed slots, by due time; each once (their `in_retry` flag guards it).
    pub(super) retries: RetryQueue<Arc<Slot>>,
    /// Slots whose retries ran out; caught up after the next successful write, or probed once
    /// per longest retry delay. Each once (their `given_up` flag guards it).
    pub(super) given_up: Vec<Arc<Slot>>,
    pub(super) probe_at: Option<Instant>,
    pub(super) save_gate: Gate,
    pub(super) touch_gate: Gate,
    pub(super) append_gate: Gate,
    /// With replay across instances: this tracker's name in the store, and its counter.
    pub(super) logs: Option<LogsToStore>,
    /// A round of replay-log appends is due (the flush tick, or a shutdown).
    pub(super) append_due: bool,
    /// When the lease is due for renewal.
    pub(super) lease_at: Instant,
    /// The logs of the append call in flight.
    pub(super) appending: Vec<Arc<StreamLog>>,
    /// The number of the last round (see `Slot::take_for_round`).
    pub(super) round_no: u64,
    pub(super) round: Round,
    /// A round of saves is due (the flush tick, or a shutdown).
    pub(super) flush_due: bool,
    /// A round of activity writes is due (the flush tick, or a shutdown).
    pub(super) touch_due: bool,
    pub(super) retry_round_due: bool,
    pub(super) shutdown: Option<ShutdownState>,
    /// `registry.handoff().dropped()` when the last warning was logged.
    pub(super) dropped_reported: u64,
}

impl State {
    /// Whether the loop is done: the shutdown deadline passed, or intake is closed and no id
    /// is owed (given-up streams included). Activity marks made after the shutdown began do
    /// not keep it going: open streams make them all the time.
    pub(super) fn finished(&self, io: &Io, now: Instant) -> bool {
        if let Some(shutdown) = &self.shutdown
            && now >= shutdown.request.deadline
        {
            return true;
        }
        !io.open
            && io.saving.is_none()
            && io.touching.is_none()
            && io.appending.is_none()
            && self.round.is_empty()
            && self.pending.is_empty()
            && self.retries.len() == 0
            && self.given_up.is_empty()
            && !self.registry.handoff().has_dirty()
            && self.registry.handoff().evicted_pending_len() == 0
    }

    pub(super) fn begin_shutdown(&mut self, request: ShutdownRequest) {
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
    pub(super) fn waive_back_off(&mut self, now: Instant) {
        self.requeue_given_up(0, now);
        self.retries.reschedule_all(now);
        self.save_gate.open_at = None;
        self.touch_gate.open_at = None;
        self.append_gate.open_at = None;
        self.flush_due = true;
        self.touch_due = true;
        self.append_due = true;
    }

    /// Whether ids wait for a round: received, handed over late, or evicted.
    pub(super) fn owes_writes(&self) -> bool {
        !self.pending.is_empty()
            || self.registry.handoff().has_dirty()
            || self.registry.handoff().evicted_pending_len() > 0
    }

    /// When the worker must wake for retries or probes (not before the save gate opens).
    pub(super) fn next_wake(&self) -> Option<Instant> {
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

    pub(super) fn on_wake(&mut self, now: Instant) {
        if self.probe_at.is_some_and(|at| now >= at) {
            // One attempt; if it fails the streams are given up again until the next probe.
            self.requeue_given_up(self.config.retry.max_retries(), now);
        }
        if self.retries.next_due().is_some_and(|due| now >= due) {
            self.retry_round_due = true;
        }
    }

    /// Advances the clock, sweeps idle streams, reports drops and updates the gauges.
    pub(super) fn on_tick(&mut self) {
        let now = self.registry.now_us();
        self.registry.advance_clock(now);
        let evicted = self.registry.sweep_idle(now, SWEEP_BUDGET);
        if evicted > 0 {
            self.metrics.evicted_idle.increment(evicted as u64);
            tracing::debug!(evicted, "evicted idle SSE streams from the registry");
        }
        let dropped = self.registry.handoff().dropped();
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
    pub(super) fn list_bound(&self) -> usize {
        self.registry.limits().list_bound()
    }

    /// Takes received slots into the pending list.
    pub(super) fn accept(&mut self, buf: &mut Vec<Arc<Slot>>) {
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
    pub(super) fn assemble(&mut self, now: Instant, fresh: bool) {
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
                slot.marks().leave_retry();
                taken.take(slot, round, false);
            }
            if fresh {
                let dirty = self.registry.handoff().take_dirty();
                for slot in std::mem::take(&mut self.pending).into_iter().chain(dirty) {
                    taken.take(slot, round, false);
                }
            }
            // Evicted slots stay in the registry's FIFO, visible to lookups and to the
            // report, until their id is in the store: a failed write leaves them there.
            for slot in self.registry.handoff().evicted_owed() {
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
    pub(super) fn assemble_touches(&mut self, now: Instant) {
        // After the first round of a shutdown, activity is no longer written: open streams make
        // marks all the time, and they do not decide whether a stream can be resumed.
        let touch = match &mut self.shutdown {
            Some(shutdown) => !std::mem::replace(&mut shutdown.touched, true),
            None => true,
        };
        if touch && self.touch_gate.is_open(now) {
            let sessions = self.registry.handoff().take_active();
            for session in &sessions {
                session.unmark();
            }
            self.round.touches = chunks(sessions, self.config.max_batch);
        }
    }

    /// Starts a round of replay-log appends (replay across instances): the events of every
    /// queued log that the store lacks, read from the logs now; unless the append gate is
    /// closed after a failure (the logs wait in the queue).
    pub(super) fn assemble_appends(&mut self, now: Instant) {
        let Some(logs) = &self.logs else { return };
        if !self.append_gate.is_open(now) {
            return;
        }
        let mut taken = Vec::new();
        for log in self.registry.handoff().log_queue().take() {
            if let Some(append) = log.unstored(&logs.producer) {
                taken.push((log, append));
            }
        }
        self.round.appends = chunks(taken, self.config.max_batch);
    }

    /// The round's next replay-log append, if the append gate is open.
    pub(super) fn next_append(&mut self, now: Instant) -> Option<BoxFuture<'static, CallDone>> {
        self.logs.as_ref()?;
        if !self.append_gate.is_open(now) {
            return None;
        }
        let (logs, appends): (Vec<_>, Vec<_>) = self.round.appends.pop_front()?.into_iter().unzip();
        // Kept here until the call is done: a panic of the loop meanwhile offers them again.
        self.appending = logs;
        let timeout = self.config.store_timeout;
        let store = self.store.clone();
        Some(Box::pin(async move {
            let started = Instant::now();
            let result = guarded(timeout, async { store.append_logs(&appends).await }).await;
            CallDone::Append {
                appends,
                result,
                started,
            }
        }))
    }

    /// The renewal of this instance's lease, when it is due: each renewal interval (or flush,
    /// when longer), a call of its own, whatever the appends do; none once a shutdown has
    /// begun (the lease is left to run out).
    pub(super) fn next_lease(&mut self, now: Instant) -> Option<BoxFuture<'static, CallDone>> {
        let logs = self.logs.as_ref()?;
        if now < self.lease_at || self.shutdown.is_some() {
            return None;
        }
        self.lease_at = now + LEASE_EVERY.max(self.config.flush_interval);
        let (producer, ttl) = (logs.producer.clone(), logs.lease_ttl);
        let timeout = self.config.store_timeout;
        let store = self.store.clone();
        Some(Box::pin(async move {
            let started = Instant::now();
            let result = guarded(timeout, async { store.renew_lease(&producer, ttl).await }).await;
            CallDone::Lease { result, started }
        }))
    }

    /// The round's next save, if the save gate is open.
    pub(super) fn next_save(&mut self, now: Instant) -> Option<BoxFuture<'static, CallDone>> {
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
    pub(super) fn next_touch(&mut self, now: Instant) -> Option<BoxFuture<'static, CallDone>> {
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

    pub(super) fn finish_call(&mut self, done: CallDone) {
        let now = Instant::now();
        let (started, failed) = match &done {
            CallDone::Save {
                started, result, ..
            }
            | CallDone::Touch {
                started, result, ..
            }
            | CallDone::Lease { started, result } => (*started, result.is_err()),
            CallDone::Append {
                started, result, ..
            } => (*started, result.is_err()),
        };
        // A call sent before the shutdown began that fails after it is one of the earlier
        // failures: the shutdown does not wait for its back-off either.
        let earlier_failure = failed
            && self
                .shutdown
                .as_ref()
                .is_some_and(|shutdown| started < shutdown.began);
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
                            slot.marks().set_persisted(version.sequence);
                            slot.marks().set_retries(0);
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
                        .count(StoreOp::Touch, failure.reason());
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
                    self.registry.handoff().requeue_active(back);
                }
            },
            CallDone::Append {
                appends, result, ..
            } => self.append_done(appends, result, now),
            CallDone::Lease { result, .. } => {
                if let Err(failure) = result {
                    self.metrics
                        .store_errors
                        .count(StoreOp::Append, failure.reason());
                    tracing::warn!(
                        error = %failure,
                        "SSE tracker could not renew its lease in the store; readers elsewhere \
                         take its streams for lost once the lease runs out"
                    );
                }
            }
        }
        if earlier_failure {
            self.waive_back_off(now);
        }
    }

    fn append_done(
        &mut self,
        appends: Vec<LogAppend>,
        result: Result<AppendReport, StoreFailure>,
        now: Instant,
    ) {
        let logs = std::mem::take(&mut self.appending);
        match result {
            Ok(report) => {
                self.append_gate.succeeded();
                let mut refused = vec![false; appends.len()];
                for &at in report.refused() {
                    if let Some(flag) = refused.get_mut(at) {
                        *flag = true;
                    }
                }
                let mut events = 0;
                for ((log, append), refused) in logs.iter().zip(&appends).zip(&refused) {
                    if *refused {
                        // A newer history holds the stream's log: this one goes no further.
                        log.refused(append);
                        continue;
                    }
                    events += append.events.len();
                    log.appended(append);
                    // What it logged meanwhile (a restart, an end) is offered again.
                    log.offer_if_owed();
                }
                let streams = refused.iter().filter(|&&r| r).count();
                if let Some(to_store) = &self.logs {
                    to_store.events.increment(events as u64);
                    to_store.refused.increment(streams as u64);
                }
                if streams > 0 {
                    tracing::warn!(
                        streams,
                        "the store refused replay-log appends: a newer history holds those \
                         streams' logs (an instance whose clock is ahead?); their histories are \
                         not replayable from other instances"
                    );
                }
            }
            Err(failure) => {
                self.metrics
                    .store_errors
                    .count(StoreOp::Append, failure.reason());
                let jitter = self.jitter.next();
                self.append_gate.failed(now, &self.config.retry, jitter);
                // The logs go back to the queue, with the round's others: read again (with
                // what they logged since) once the gate opens.
                let untried = std::mem::take(&mut self.round.appends);
                let mut streams = 0;
                for log in logs
                    .into_iter()
                    .chain(untried.into_iter().flatten().map(|(log, _)| log))
                {
                    streams += 1;
                    log.offer_if_owed();
                }
                tracing::warn!(
                    error = %failure,
                    streams,
                    retry_in = ?self.append_gate.open_at.map(|at| at - now),
                    "SSE tracker replay-log append failed; retrying after back-off"
                );
            }
        }
    }

    pub(super) fn save_failed(
        &mut self,
        entries: Vec<Pending>,
        failure: StoreFailure,
        now: Instant,
    ) {
        self.metrics
            .store_errors
            .count(StoreOp::Save, failure.reason());
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
    pub(super) fn retry_or_give_up(&mut self, slot: Arc<Slot>, now: Instant) -> bool {
        if slot.is_evicted() {
            // The registry's evicted FIFO owns it now (when its id is unpersisted).
            return false;
        }
        let retries = slot.marks().retries().saturating_add(1);
        slot.marks().set_retries(retries);
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
            if slot.marks().set_given_up(true) {
                self.given_up.push(slot);
            }
            self.probe_at.get_or_insert(now + self.config.retry.max());
            true
        } else {
            if slot.marks().enter_retry() {
                self.metrics.retries.increment(1);
                let delay = self.config.retry.delay(retries, self.jitter.next());
                self.retries.push(now + delay, slot);
            }
            false
        }
    }

    /// Moves the given-up streams to the retry queue, due now, with `retries` already spent: 0
    /// for a fresh round (the store works again, or shutdown), the maximum for a single probe.
    pub(super) fn requeue_given_up(&mut self, retries: u32, now: Instant) {
        self.probe_at = None;
        for slot in std::mem::take(&mut self.given_up) {
            slot.marks().set_given_up(false);
            if slot.is_evicted() {
                continue;
            }
            slot.marks().set_retries(retries);
            if slot.marks().enter_retry() {
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
    pub(super) fn recover(&mut self) {
        // The logs read for appends not made go back to the queue (with what they logged
        // since), or their last events and end would wait for a change that may not come.
        let unwritten = std::mem::take(&mut self.round.appends);
        let in_flight = std::mem::take(&mut self.appending);
        for log in in_flight
            .into_iter()
            .chain(unwritten.into_iter().flatten().map(|(log, _)| log))
        {
            log.offer_if_owed();
        }
        self.round = Round::default();
        self.pending.clear();
        self.retries = RetryQueue::default();
        self.given_up.clear();
        self.probe_at = None;
        for slot in self.registry.all_slots() {
            if slot.is_evicted() {
                continue;
            }
            slot.marks().leave_retry();
            slot.marks().set_given_up(false);
            slot.session().unmark();
            if slot.unpersisted() {
                slot.mark_queued();
                self.pending.push(slot);
            } else {
                // Let bodies hand it over again on their next id.
                slot.take_latest();
            }
        }
        let active = self.registry.handoff().take_active();
        for session in &active {
            session.unmark();
        }
        if !active.is_empty() {
            // Their marks are made again by their next frame; these are not written.
            self.registry.handoff().count_activity_dropped(active.len());
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
