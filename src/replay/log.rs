//! One stream's replay log, written by the one body that streams into it, and the budget that
//! bounds all logs of a tracker together.
//!
//! A log holds records in a [`Ring`]: each is an event's exact bytes (what came since the
//! previous blank line that ended an event or only comments, up to and with the blank line that
//! dispatched it), then a trailer that finds the event's own id: where it lies in the event's
//! bytes (three bytes, for an id on one of the event's first lines, as most are), or a copy of
//! it and its length (one byte, or five for ids of 252 bytes and more). An index holds each
//! record's length. The bytes of the event being read (not dispatched yet) follow the records;
//! they become a record at its blank line, or are dropped at a blank line that ends only
//! comments, and when the body ends.

use std::collections::{BinaryHeap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::sync::futures::OwnedNotified;

mod to_store;

use to_store::Stored;
pub(crate) use to_store::{Durable, Reach, StoreBound, StorePoint};

use super::ring::Ring;
use super::{GapReason, Position, ReplayPolicy};
use crate::body::ReadOn;
use crate::key::EventId;
use crate::metrics::{ReplayMetrics, Trim};
use crate::scan::Sink;
use crate::sync::lock;

/// Trailer byte: the record has no id of its own.
const NO_ID: u8 = 0xFD;
/// Trailer byte: the id's length is in the four bytes before it (little-endian).
const LONG_ID: u8 = 0xFE;
/// Trailer byte: the id lies in the event's bytes, at the offset and with the length in the
/// two bytes before it.
const ID_AT: u8 = 0xFC;
/// Ids copied with a one-byte trailer are shorter than this.
const SHORT_ID: usize = ID_AT as usize;

/// The trailer of a record whose event's bytes hold its `id` at `at` (when `Some`), or a copy
/// of `id` written before the trailer: its bytes (little-endian in a word, built whole) and
/// their number.
fn trailer(id: Option<&[u8]>, at: Option<u8>) -> (u64, usize) {
    match (id, at) {
        (None, _) => (u64::from(NO_ID), 1),
        (Some(id), Some(at)) => (
            u64::from(at) | (id.len() as u64) << 8 | u64::from(ID_AT) << 16,
            3,
        ),
        (Some(id), None) if id.len() < SHORT_ID => (id.len() as u64, 1),
        (Some(id), None) => (u64::from(id.len() as u32) | u64::from(LONG_ID) << 32, 5),
    }
}

/// Where `id` lies as the value of an `id` field on one of the first lines of `event`, if
/// it does within its first 255 bytes and is shorter than 256 bytes. Any place that holds the
/// id's bytes would do (the record only needs them); the first lines are where events put it.
fn id_at(event: &[u8], id: &[u8]) -> Option<u8> {
    const LINES: usize = 3;
    if id.len() > usize::from(u8::MAX) {
        return None;
    }
    let head = &event[..event.len().min(usize::from(u8::MAX))];
    let mut line = 0;
    for _ in 0..LINES {
        let rest = &head[line..];
        if let Some(value) = rest.strip_prefix(b"id:") {
            let skip = usize::from(value.first() == Some(&b' '));
            let at = line + 3 + skip;
            if head.len() >= at + id.len() && &head[at..at + id.len()] == id {
                return Some(at as u8);
            }
        }
        line += rest.iter().position(|&b| b == b'\n' || b == b'\r')? + 1;
        if head[line - 1] == b'\r' && head.get(line) == Some(&b'\n') {
            line += 1;
        }
    }
    None
}

/// Why a log's history does not reach back to its epoch's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lost {
    /// It does: every event of the epoch is kept.
    Nothing,
    /// Bounds, the budget or an event too large dropped events.
    Evicted,
    /// A response that did not continue the history restarted it.
    Restarted,
}

#[derive(Debug)]
struct LogInner {
    epoch: u64,
    /// The offset of the first record.
    first: u64,
    ring: Ring,
    /// The length of each record, oldest first.
    records: VecDeque<u32>,
    /// The bytes of the records, at the ring's front; the open event's follow.
    committed: usize,
    lost: Lost,
    /// The open event was dropped (larger than the stream's bound, or taken by the budget):
    /// the rest of it is not logged, and its dispatch restarts the history (counted as this
    /// cause).
    skipping: Option<Trim>,
    /// A body writes into this log: the one whose writer has this number (each writer gets
    /// the next).
    writing: Option<u64>,
    /// Writers made so far.
    writers: u64,
    /// The log has an entry in the budget's heap.
    queued: bool,
    /// Its writer left while other bodies streamed into the stream (a shared one), whose
    /// events from then on are not logged: no replay can be complete until a new history.
    sealed: bool,
    /// The body writing this history goes on without its client ([`Detach`]): reconnects
    /// follow the log instead of going to the application.
    ///
    /// [`Detach`]: crate::Detach
    detachable: bool,
    /// The body that wrote this history reached its end.
    finished: bool,
    /// The writer starts a new history, which replaces this one when it writes its first
    /// bytes (a response that writes nothing, such as an empty answer to a reconnect whose
    /// history is gone, leaves this history as it is); and whether that new history is
    /// detachable.
    restart_pending: bool,
    pending_detachable: bool,
    /// The writing body, when it is marked [`Detach`](crate::Detach) and still attached to
    /// its client's connection: a reconnect that follows the log moves it to a task of its
    /// own (see [`LocalTail::take_from_old_connection`]).
    read_on: Option<ReadOnHandle>,
    /// What the store holds of this log (replay across instances).
    stored: Stored,
    /// Events dropped unlogged so far, wrapping (an event larger than the stream's bound, or
    /// one the budget took while open): with durable replay, a body that sent one ends.
    unlogged: u32,
}

/// A body that can leave its connection for a task of its own: see [`ReadOn`].
#[derive(Clone)]
pub(crate) struct ReadOnHandle(pub(crate) Weak<dyn ReadOn>);

impl std::fmt::Debug for ReadOnHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReadOnHandle")
    }
}

impl LogInner {
    fn heap_bytes(&self) -> usize {
        self.ring.heap_bytes() + self.records.capacity() * size_of::<u32>()
    }

    /// A body writes this history (not one that will replace it with its first bytes).
    fn writes_history(&self) -> bool {
        self.writing.is_some() && !self.restart_pending
    }

    /// Drops the oldest record.
    fn pop_front(&mut self) -> bool {
        let Some(len) = self.records.pop_front() else {
            return false;
        };
        let len = len as usize;
        self.ring.drop_front(len);
        self.committed -= len;
        self.first += 1;
        self.lost = Lost::Evicted;
        if self.records.is_empty() {
            self.records = VecDeque::new();
        }
        true
    }

    /// Drops the open event's bytes.
    fn drop_open(&mut self) {
        self.ring.truncate(self.committed);
    }

    /// Drops the history: a new epoch begins. Returns the records dropped.
    fn restart(&mut self, epoch: u64, lost: Lost) -> usize {
        let dropped = self.records.len();
        self.ring.clear();
        self.records = VecDeque::new();
        self.committed = 0;
        self.first = 0;
        self.epoch = epoch;
        self.lost = lost;
        self.skipping = None;
        self.sealed = false;
        // `detachable` and `finished` belong to the writer, which may go on writing.
        dropped
    }

    /// The record that lies at `start` with length `len`: where its event's bytes end, and
    /// where its own id lies, as ranges in the ring.
    fn parts(&self, start: usize, len: usize) -> (usize, Option<(usize, usize)>) {
        let end = start + len;
        match self.ring.byte(end - 1) {
            NO_ID => (end - 1, None),
            ID_AT => {
                let at = start + usize::from(self.ring.byte(end - 3));
                (
                    end - 3,
                    Some((at, at + usize::from(self.ring.byte(end - 2)))),
                )
            }
            LONG_ID => {
                let mut bytes = [0; 4];
                for (i, b) in bytes.iter_mut().enumerate() {
                    *b = self.ring.byte(end - 5 + i);
                }
                let id_len = u32::from_le_bytes(bytes) as usize;
                (end - 5 - id_len, Some((end - 5 - id_len, end - 5)))
            }
            short => {
                let id_start = end - 1 - usize::from(short);
                (id_start, Some((id_start, end - 1)))
            }
        }
    }

    /// The events of the records from the one at `index` (which starts at `start`) to the
    /// one before `end` (none when `end` is not above `index`).
    fn events_between(&self, index: usize, end: usize, mut start: usize) -> Events {
        let end = end.clamp(index, self.records.len());
        let held: u64 = self
            .records
            .range(index..end)
            .map(|&len| u64::from(len))
            .sum();
        let mut extra = Events {
            bytes: Vec::with_capacity(held as usize),
            events: end - index,
            last_id: None,
        };
        let mut last_id = None;
        for &len in self.records.iter().take(end).skip(index) {
            let len = len as usize;
            let (event_end, id) = self.parts(start, len);
            self.ring.copy_into(start, event_end, &mut extra.bytes);
            if id.is_some() {
                last_id = id;
            }
            start += len;
        }
        extra.last_id = last_id.map(|range| self.id_in(range));
        extra
    }

    /// The id whose bytes lie at `from..to` in the ring.
    fn id_in(&self, (from, to): (usize, usize)) -> EventId {
        let mut id = Vec::with_capacity(to - from);
        self.ring.copy_into(from, to, &mut id);
        EventId::from_scanned(&id)
    }

    /// Where the record at `index` starts in the ring.
    fn record_start(&self, index: usize) -> usize {
        self.records
            .iter()
            .take(index)
            .map(|&len| len as usize)
            .sum()
    }
}

/// The log of one stream.
#[derive(Debug)]
pub(crate) struct StreamLog {
    inner: Mutex<LogInner>,
    budget: Arc<Budget>,
    /// Where the log's detached histories go in the store (replay across instances).
    store: Option<StoreBound>,
    /// Readers following the log ([`LocalTail`]s), and what wakes them when it changes (made for
    /// the first).
    tailers: AtomicUsize,
    changed: OnceLock<Arc<Notify>>,
}

/// What [`StreamLog::peek`] finds: the number of events after the client's, the newest id
/// among them, and the position of the last; or why there are none to replay.
pub(crate) type Peeked = Result<(usize, Option<EventId>, Position), GapReason>;

/// What a reconnect gets from a log.
#[derive(Debug)]
pub(crate) enum Lookup {
    Found(Box<Found>),
    Gap(GapReason),
}

/// The events after the client's, and where they end.
#[derive(Debug)]
pub(crate) struct Found {
    /// Their bytes, in order, in one buffer.
    pub(crate) bytes: Bytes,
    pub(crate) events: usize,
    /// The newest id among them.
    pub(crate) last_id: Option<EventId>,
    /// The position of the last of them (of the client's event when there are none).
    pub(crate) position: Position,
    /// The log's writer, taken for the response to the request looked up for (see
    /// [`StreamLog::after`]).
    pub(crate) writer: Option<Writer>,
    /// The log is written by a body that goes on without its client, or was and has ended:
    /// the layer answers the request itself, following the log from here.
    pub(crate) tail: Option<LocalTail>,
}

impl StreamLog {
    pub(crate) fn new(budget: Arc<Budget>, store: Option<StoreBound>) -> Self {
        budget.logs.fetch_add(1, Ordering::Relaxed);
        Self {
            inner: Mutex::new(LogInner {
                epoch: budget.next_epoch(),
                first: 0,
                ring: Ring::default(),
                records: VecDeque::new(),
                committed: 0,
                lost: Lost::Nothing,
                skipping: None,
                writing: None,
                writers: 0,
                queued: false,
                sealed: false,
                detachable: false,
                finished: false,
                restart_pending: false,
                pending_detachable: false,
                read_on: None,
                stored: Stored::default(),
                unlogged: 0,
            }),
            budget,
            store,
            tailers: AtomicUsize::new(0),
            changed: OnceLock::new(),
        }
    }

    /// The events after the newest one whose own `id` is `last_event_id`, once each, in order.
    /// Events without an id follow the last id before them: a client whose last id is that
    /// one is sent them again (it may have had them). With an id that several events carried,
    /// the newest counts.
    ///
    /// The log's writer is taken at once for the response to this request, which continues
    /// the history after them, when no body writes the log, and with `take_over` when one
    /// does: that body (its client is gone, and the server has not seen it yet) then writes
    /// nothing more into it, so that the replay and the response's events follow each other
    /// with nothing between. Without `take_over` (a stream several bodies read at once), a
    /// body that writes the log goes on writing it.
    ///
    /// A detached stream is followed (see [`LocalTail`]); with `one_owner` (its reader is its one
    /// client), the [`LocalTail`] may take the body writing this history off its old connection.
    pub(crate) fn after(
        self: &Arc<Self>,
        last_event_id: &[u8],
        take_over: bool,
        one_owner: bool,
    ) -> Lookup {
        let mut inner = lock(&self.inner);
        if self.refused_durable(&inner) {
            // Its events beyond what the store holds reach no client, and never will.
            return Lookup::Gap(GapReason::NoHistory);
        }
        let (index, start) = match locate(&inner, last_event_id) {
            Ok(found) => found,
            Err(reason) => return Lookup::Gap(reason),
        };
        let follow = self.follows_locked(&inner);
        // With durable replay, a reconnect that follows the log gets what the store holds,
        // and the rest from its tail once the store has it.
        let upto = if follow {
            self.visible(&inner)
        } else {
            inner.records.len()
        };
        let events = inner.events_between(index + 1, upto, start);
        let position = Position {
            epoch: inner.epoch,
            offset: inner.first + (index + events.events) as u64,
        };
        let tail = follow.then(|| {
            // The handle is the writer's; it writes this history unless it is about to
            // start its own (a new response of the stream that has written nothing yet).
            let read_on = inner
                .read_on
                .clone()
                .filter(|_| one_owner && inner.writes_history());
            LocalTail::new(self, inner.epoch, position.offset + 1, read_on)
        });
        let writer = (!follow && (take_over || inner.writing.is_none()))
            .then(|| self.take_writer(&mut inner, false));
        Lookup::Found(Box::new(Found {
            bytes: Bytes::from(events.bytes),
            events: events.events,
            last_id: events.last_id,
            position,
            writer,
            tail,
        }))
    }

    /// What [`after`](Self::after) would replay for `last_event_id` now, taking nothing: how
    /// many events, the newest id among them, and the position of the last.
    pub(crate) fn peek(&self, last_event_id: &[u8]) -> Peeked {
        let inner = lock(&self.inner);
        let (index, start) = locate(&inner, last_event_id)?;
        let events = inner.records.len() - index - 1;
        let mut last_id = None;
        let mut at = start;
        for &len in inner.records.iter().skip(index + 1) {
            if let (_, Some((from, to))) = inner.parts(at, len as usize) {
                last_id = Some((from, to));
            }
            at += len as usize;
        }
        let last_id = last_id.map(|range| inner.id_in(range));
        let position = Position {
            epoch: inner.epoch,
            offset: inner.first + (index + events) as u64,
        };
        Ok((events, last_id, position))
    }

    /// Whether reconnects follow this log (the layer answers them): its body goes on without
    /// its client, or went on to its end.
    pub(crate) fn follows(&self) -> bool {
        self.follows_locked(&lock(&self.inner))
    }

    /// [`follows`](Self::follows), with the log locked. With durable replay, reconnects also
    /// follow a history whose body stopped before the store had all of it: its tail sends
    /// the rest once the store has it, then ends, and the client's next reconnect continues
    /// the history (no client gets an event the store does not hold).
    fn follows_locked(&self, inner: &LogInner) -> bool {
        inner.detachable
            && (inner.writing.is_some()
                || inner.finished
                || self.visible(inner) < inner.records.len())
    }

    /// Whether an event of the log carried `id`.
    pub(crate) fn holds_id(&self, id: &[u8]) -> bool {
        let inner = lock(&self.inner);
        !inner.sealed && find(&inner, id).is_some()
    }

    /// The writer of this log for a body that does not continue a replayed history (a new
    /// client, or one whose replay was impossible): the history restarts in a new epoch
    /// (unless the log is new) when the body writes its first bytes; until then, the log
    /// answers for the history it holds. `None` when another body writes the log: this one
    /// is not logged.
    pub(crate) fn writer(self: &Arc<Self>) -> Option<Writer> {
        let mut inner = lock(&self.inner);
        if inner.writing.is_some() {
            return None;
        }
        let fresh = inner.records.is_empty() && inner.lost == Lost::Nothing && !inner.sealed;
        Some(self.take_writer(&mut inner, !fresh))
    }

    /// Makes the next writer the log's: what a body that wrote before left of an event is
    /// dropped (it is not the new body's), and that body's writes are ignored from now on.
    /// With `restart`, the writer starts a new history at its first bytes; else it continues
    /// this one.
    fn take_writer(self: &Arc<Self>, inner: &mut LogInner, restart: bool) -> Writer {
        let before = inner.heap_bytes();
        inner.drop_open();
        inner.skipping = None;
        inner.writers += 1;
        inner.writing = Some(inner.writers);
        inner.restart_pending = restart;
        inner.pending_detachable = false;
        inner.read_on = None;
        if !restart {
            inner.detachable = false;
            inner.finished = false;
        }
        self.budget.account(before, inner.heap_bytes());
        Writer {
            log: self.clone(),
            number: inner.writers,
            frame: FrameEvents::default(),
            logged: 0,
            written: 0,
            seal: false,
            unlogged: inner.unlogged,
            start: if restart { 0 } else { inner.held() },
        }
    }
}

/// The bytes of consecutive events, their number and the newest id among them.
#[derive(Debug, Default)]
struct Events {
    bytes: Vec<u8>,
    events: usize,
    last_id: Option<EventId>,
}

/// Where a replay after `id` starts: the record's index and where the record after it starts;
/// or why there is none.
fn locate(inner: &LogInner, id: &[u8]) -> Result<(usize, usize), GapReason> {
    if inner.sealed {
        return Err(GapReason::NoHistory);
    }
    find(inner, id).ok_or(match inner.lost {
        Lost::Evicted => GapReason::Evicted,
        Lost::Nothing if inner.records.is_empty() => GapReason::NoHistory,
        Lost::Nothing | Lost::Restarted => GapReason::UnknownId,
    })
}

/// The newest record whose own id is `id`: its index, and where the record after it starts.
fn find(inner: &LogInner, id: &[u8]) -> Option<(usize, usize)> {
    let mut end = inner.committed;
    for (index, &len) in inner.records.iter().enumerate().rev() {
        let start = end - len as usize;
        if let (_, Some((from, to))) = inner.parts(start, len as usize)
            && to - from == id.len()
            && inner.ring.holds_at(from, id)
        {
            return Some((index, end));
        }
        end = start;
    }
    None
}

impl Drop for StreamLog {
    fn drop(&mut self) {
        let inner = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        self.budget.account(inner.heap_bytes(), 0);
        self.budget.logs.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The blank lines of one frame, gathered by the scan and then written to the log under one
/// lock: where each ends, whether it dispatched an event, and that event's own id (in
/// `ids`). Kept by the writer, so that a frame allocates nothing once they have grown.
#[derive(Debug, Default)]
pub(crate) struct FrameEvents {
    marks: Vec<Mark>,
    ids: Vec<u8>,
    /// The id committed for the event being dispatched.
    id: Option<IdRef>,
}

#[derive(Debug)]
struct Mark {
    end: usize,
    event: bool,
    id: Option<IdRef>,
}

/// Where an event's own id lies: as `(start, length)`.
#[derive(Clone, Copy, Debug)]
enum IdRef {
    /// In the frame (its `id` line lay whole in it).
    InFrame(u32, u32),
    /// In the writer's copy of the frame's ids.
    Copied(u32, u32),
}

impl FrameEvents {
    /// Empties the lists, giving back what a frame of many events made them hold.
    pub(crate) fn clear(&mut self) {
        self.marks.clear();
        self.ids.clear();
        self.id = None;
        self.marks.shrink_to(64);
        self.ids.shrink_to(1024);
    }
}

impl Sink for FrameEvents {
    const POSITIONS: bool = true;

    #[inline]
    fn commit(&mut self, id: &[u8]) {
        let start = self.ids.len() as u32;
        self.ids.extend_from_slice(id);
        self.id = Some(IdRef::Copied(start, id.len() as u32));
    }

    #[inline]
    fn commit_at(&mut self, id: &[u8], at: usize) {
        // No copy: the id's bytes are in the frame.
        self.id = Some(IdRef::InFrame(at as u32, id.len() as u32));
    }

    #[inline]
    fn blank_line(&mut self, end: usize, event: bool) {
        let id = self.id.take();
        self.marks.push(Mark { end, event, id });
    }
}

/// A sink that gathers a frame's events and also hands each committed id to `on_commit`.
pub(crate) struct AlsoCommit<'a, F> {
    pub(crate) frame: &'a mut FrameEvents,
    pub(crate) on_commit: F,
}

impl<F: FnMut(&[u8])> Sink for AlsoCommit<'_, F> {
    const POSITIONS: bool = true;

    #[inline]
    fn commit(&mut self, id: &[u8]) {
        self.frame.commit(id);
        (self.on_commit)(id);
    }

    #[inline]
    fn commit_at(&mut self, id: &[u8], at: usize) {
        self.frame.commit_at(id, at);
        (self.on_commit)(id);
    }

    #[inline]
    fn blank_line(&mut self, end: usize, event: bool) {
        self.frame.blank_line(end, event);
    }
}

/// What the body that streams into a log writes with. Dropping it ends the body's writing:
/// the bytes of an event it did not finish are dropped.
#[derive(Debug)]
pub(crate) struct Writer {
    log: Arc<StreamLog>,
    /// This writer's number: it writes while the log's `writing` is this.
    number: u64,
    frame: FrameEvents,
    /// Events logged not yet added to `sse_tracker_replay_events_logged_total`.
    logged: usize,
    /// Bytes of the body written (whether the log kept them or not).
    written: u64,
    /// Seal the log when this writer goes (see [`release`](Self::release)).
    seal: bool,
    /// The log's count of events dropped unlogged when this writer began.
    unlogged: u32,
    /// Where this writer's events begin: the offset after the events of the history it
    /// continues (0 for a history of its own). Its history stays one epoch: another one
    /// would come from an event dropped unlogged, which ends a durable body anyway.
    start: u64,
}

impl Writer {
    /// The sink the body's scan of a frame reports to; [`write`](Self::write) then logs the
    /// frame.
    pub(crate) fn sink(&mut self) -> &mut impl Sink {
        &mut self.frame
    }

    /// Logs the frame `data` that the scan just reported on: each event it ends, and what it
    /// holds of the next one. Never waits but for the log's own lock, which look-ups take
    /// briefly; allocates only the chunks that the bytes fill.
    pub(crate) fn write(&mut self, data: &[u8]) {
        let Writer {
            log,
            number,
            frame,
            logged,
            written,
            ..
        } = self;
        *written += data.len() as u64;
        write_frame(log, *number, logged, frame, data);
    }

    /// Bytes of the body written so far: what the application sent, without what the layer
    /// adds (heartbeats, a replay).
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// [`write`](Self::write), with what a scan reported to `frame` (a body that scans before
    /// it has a writer).
    pub(crate) fn write_with(&mut self, data: &[u8], frame: &mut FrameEvents) {
        self.written += data.len() as u64;
        write_frame(&self.log, self.number, &mut self.logged, frame, data);
    }

    /// Ends this body's writing; with `seal`, no replay from the log is complete until a
    /// new history begins (other bodies of the stream go on, unlogged).
    pub(crate) fn release(mut self, seal: bool) {
        self.seal = seal;
    }

    /// Says whether this body goes on without its client ([`Detach`](crate::Detach)): then
    /// reconnects follow the log.
    pub(crate) fn set_detachable(&self, detachable: bool) {
        let mut inner = lock(&self.log.inner);
        if inner.writing == Some(self.number) {
            if inner.restart_pending {
                inner.pending_detachable = detachable;
            } else {
                inner.detachable = detachable;
            }
        }
        // A history that goes to the store from now on: it may owe the store events already.
        let offer = self.log.owes_store(&mut inner);
        drop(inner);
        if offer {
            self.log.offer_to_store();
        }
    }

    /// Gives the log the way to move this writer's body off its connection, for a reconnect
    /// that follows the log (a body marked [`Detach`](crate::Detach)).
    pub(crate) fn set_read_on(&self, handle: ReadOnHandle) {
        let mut inner = lock(&self.log.inner);
        if inner.writing == Some(self.number) {
            inner.read_on = Some(handle);
        }
    }

    /// Whether this writer still writes its log (no other body took it over).
    pub(crate) fn is_current(&self) -> bool {
        lock(&self.log.inner).writing == Some(self.number)
    }

    /// The body reached its end: a reconnect after it gets the rest and a clean end.
    pub(crate) fn finish(&self) {
        let mut inner = lock(&self.log.inner);
        // A body that wrote nothing ends no history of its own.
        if inner.writing == Some(self.number) && !inner.restart_pending {
            inner.finished = true;
            // The store gets the end mark.
            let offer = self.log.owes_store(&mut inner);
            drop(inner);
            if offer {
                self.log.offer_to_store();
            }
        }
    }
}

/// What [`Writer::write`] does, for the writer numbered `number` of `log`.
fn write_frame(
    log: &Arc<StreamLog>,
    number: u64,
    logged: &mut usize,
    frame: &mut FrameEvents,
    data: &[u8],
) {
    let log_arc = log;
    let log = &**log_arc;
    let budget = &*log.budget;
    let policy = &budget.policy;
    let mut age = || budget.ages.fetch_add(1, Ordering::Relaxed);
    let mut trimmed = [0usize; Trim::ALL.len()];
    let mut inner = lock(&log.inner);
    if inner.writing != Some(number) {
        // Another body took the log over.
        frame.clear();
        return;
    }
    let before = inner.heap_bytes();
    if inner.restart_pending && !data.is_empty() {
        // The body's first bytes: its history replaces the one the log held.
        trimmed[Trim::Restart as usize] += inner.restart(budget.next_epoch(), Lost::Restarted);
        inner.restart_pending = false;
        inner.detachable = inner.pending_detachable;
        inner.finished = false;
    }
    let mut start = 0;
    for mark in frame.marks.drain(..) {
        let piece_start = start;
        let piece = &data[start..mark.end];
        start = mark.end;
        if !mark.event {
            // Comments and blank lines between events belong to no event.
            inner.drop_open();
            inner.skipping = None;
            continue;
        }
        if let Some(cause) = inner.skipping {
            // The end of an event that was not kept: no replay may run across it.
            trimmed[cause as usize] += inner.restart(budget.next_epoch(), Lost::Evicted) + 1;
            inner.unlogged = inner.unlogged.wrapping_add(1);
            continue;
        }
        let id = mark.id.map(|id| match id {
            IdRef::InFrame(from, len) => &data[from as usize..(from + len) as usize],
            IdRef::Copied(from, len) => &frame.ids[from as usize..(from + len) as usize],
        });
        let open = inner.ring.len() - inner.committed;
        let at = match (mark.id, id) {
            // The event's bytes are the piece: where the scan found its id is known.
            (Some(IdRef::InFrame(from, len)), _) if open == 0 => {
                let at = (from as usize).wrapping_sub(piece_start);
                (at <= usize::from(u8::MAX) && len <= u32::from(u8::MAX)).then_some(at as u8)
            }
            (_, Some(id)) if open == 0 => id_at(piece, id),
            _ => None,
        };
        let copied = if at.is_some() { None } else { id };
        let (trailer, trailer_len) = trailer(id, at);
        let size = open + piece.len() + copied.map_or(0, <[u8]>::len) + trailer_len;
        if size > policy.max_stream_bytes {
            inner.drop_open();
            trimmed[Trim::TooLarge as usize] +=
                inner.restart(budget.next_epoch(), Lost::Evicted) + 1;
            inner.unlogged = inner.unlogged.wrapping_add(1);
            continue;
        }
        make_room(&mut inner, policy, size - open, 1, &mut trimmed);
        inner.ring.push(piece, &mut age);
        if let Some(id) = copied {
            inner.ring.push(id, &mut age);
        }
        inner.ring.push_word(trailer, trailer_len, &mut age);
        inner.records.push_back(size as u32);
        inner.committed = inner.ring.len();
        *logged += 1;
    }
    frame.clear();
    let rest = &data[start..];
    if !rest.is_empty() && inner.skipping.is_none() {
        let open = inner.ring.len() - inner.committed;
        if open + rest.len() > policy.max_stream_bytes {
            // Larger than the stream's bound: the event is not kept.
            inner.drop_open();
            inner.skipping = Some(Trim::TooLarge);
        } else {
            make_room(&mut inner, policy, rest.len(), 0, &mut trimmed);
            inner.ring.push(rest, &mut age);
        }
    }
    let after = inner.heap_bytes();
    if after != before {
        budget.account(before, after);
    }
    let queue = match inner.ring.front_age() {
        Some(age) if !inner.queued => {
            inner.queued = true;
            Some(age)
        }
        _ => None,
    };
    let offer = log.owes_store(&mut inner);
    drop(inner);
    if offer {
        log_arc.offer_to_store();
    }
    log.tell_tails();
    if *logged >= LOGGED_BATCH {
        budget.metrics.logged(std::mem::take(logged));
    }
    if trimmed.iter().any(|&n| n > 0) {
        for cause in Trim::ALL {
            budget.metrics.trimmed(cause, trimmed[cause as usize]);
        }
    }
    if let Some(age) = queue {
        budget.enqueue(age, Arc::downgrade(log_arc));
    }
    budget.enforce();
}

/// Microseconds since the Unix epoch (0 for a clock before it).
fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Events a writer logs before it adds them to the shared counter.
const LOGGED_BATCH: usize = 64;

/// Drops the oldest records until `bytes` more bytes and `events` more records fit the
/// stream's bounds (or none is left).
fn make_room(
    inner: &mut LogInner,
    policy: &ReplayPolicy,
    bytes: usize,
    events: usize,
    trimmed: &mut [usize; Trim::ALL.len()],
) {
    loop {
        let cause = if inner.records.len() + events > policy.max_events {
            Trim::Events
        } else if inner.ring.len() + bytes > policy.max_stream_bytes {
            Trim::Bytes
        } else {
            return;
        };
        if !inner.pop_front() {
            return;
        }
        trimmed[cause as usize] += 1;
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let log = &*self.log;
        log.budget.metrics.logged(std::mem::take(&mut self.logged));
        let mut inner = lock(&log.inner);
        if inner.writing != Some(self.number) {
            return;
        }
        let before = inner.heap_bytes();
        inner.drop_open();
        inner.ring.release_spare();
        inner.skipping = None;
        inner.writing = None;
        inner.read_on = None;
        // A writer that wrote nothing leaves the history it found as it was.
        inner.restart_pending = false;
        inner.sealed |= self.seal;
        log.budget.account(before, inner.heap_bytes());
        // The store gets the end mark: this history stopped, or finished.
        let offer = log.owes_store(&mut inner);
        drop(inner);
        if offer {
            self.log.offer_to_store();
        }
        log.tell_tails();
    }
}

impl StreamLog {
    /// How many of the log's records clients may get now: all, unless [durable
    /// replay](ReplayPolicy::durable) holds back those of a history going to the store that
    /// the store does not hold yet.
    fn visible(&self, inner: &LogInner) -> usize {
        if !self.durable(inner) {
            return inner.records.len();
        }
        let (stored, _) = inner.stored.of(inner.epoch);
        stored
            .saturating_sub(inner.first)
            .min(inner.records.len() as u64) as usize
    }

    /// Wakes whatever waits on the log's changes: readers following it, and with durable
    /// replay its writer's body waiting for the store.
    pub(super) fn tell_all(&self) {
        if let Some(changed) = self.changed.get() {
            changed.notify_waiters();
        }
    }

    /// Wakes the readers following the log, if any.
    fn tell_tails(&self) {
        if self.tailers.load(Ordering::Relaxed) > 0
            && let Some(changed) = self.changed.get()
        {
            changed.notify_waiters();
        }
    }

    /// What a reader following history `epoch` from offset `next` gets now.
    fn tail_step(&self, epoch: u64, next: &mut u64) -> TailStep {
        let inner = lock(&self.inner);
        if inner.epoch != epoch || *next < inner.first {
            // The history restarted, or dropped events the reader has not sent: the response
            // ends, and the client's reconnect is told of the gap.
            return TailStep::End;
        }
        if self.refused_durable(&inner) {
            // The store refused this history: what it lacks never goes out.
            return TailStep::End;
        }
        let visible = inner.first + self.visible(&inner) as u64;
        if *next < visible {
            let index = (*next - inner.first) as usize;
            let end = (visible - inner.first) as usize;
            let events = inner.events_between(index, end, inner.record_start(index));
            *next = visible;
            return TailStep::Events(Bytes::from(events.bytes));
        }
        if visible < inner.held() {
            // Durable replay: the next events wait for the store.
            return TailStep::Unconfirmed;
        }
        if !inner.writes_history() {
            if inner.finished && self.held_back(&inner) {
                // Durable replay: the clean end waits for the store's end mark, as the
                // body's does.
                return TailStep::EndUnconfirmed;
            }
            // No body writes this history any more (a new response that has written nothing
            // yet will replace it).
            return TailStep::End;
        }
        TailStep::Wait
    }

    /// Whether [durable replay](ReplayPolicy::durable) holds the log's current history: it
    /// is on, and the history goes to the store.
    fn durable(&self, inner: &LogInner) -> bool {
        self.budget.durable.is_some() && self.store.is_some() && inner.detachable
    }

    /// With durable replay, whether the store refused this history (a newer one holds the
    /// stream's log): no client gets what the store lacks of it.
    fn refused_durable(&self, inner: &LogInner) -> bool {
        self.durable(inner) && inner.stored.refused(inner.epoch)
    }

    /// With durable replay, whether the end of this finished history waits for the store: it
    /// goes to the store, and the store has not its end mark yet.
    fn held_back(&self, inner: &LogInner) -> bool {
        self.durable(inner) && !inner.stored.of(inner.epoch).1
    }
}

enum TailStep {
    Events(Bytes),
    Wait,
    /// Events are logged that the store does not hold yet (durable replay).
    Unconfirmed,
    /// Every event is read, and the stream finished: the store has not its end mark yet
    /// (durable replay).
    EndUnconfirmed,
    End,
}

/// A reader following a log: the events written after a position, as the body that writes
/// the log writes them, until it stops writing (its end, its bound, a drain), the history
/// restarts, or the log drops events the reader has not read.
pub(crate) struct LocalTail {
    log: Arc<StreamLog>,
    changed: Arc<Notify>,
    epoch: u64,
    /// The offset of the next event to read.
    next: u64,
    waiting: Option<Pin<Box<OwnedNotified>>>,
    /// Durable replay: how long the next events may wait for the store, from when the wait
    /// began.
    unconfirmed: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The body writing the log, while still attached to its old connection.
    read_on: Option<ReadOnHandle>,
}

impl LocalTail {
    fn new(log: &Arc<StreamLog>, epoch: u64, next: u64, read_on: Option<ReadOnHandle>) -> Self {
        log.tailers.fetch_add(1, Ordering::Relaxed);
        Self {
            log: log.clone(),
            changed: log.changed.get_or_init(|| Arc::new(Notify::new())).clone(),
            epoch,
            next,
            waiting: None,
            unconfirmed: None,
            read_on,
        }
    }

    /// The client is back on a new connection: the body that writes the log, if it is still
    /// attached to the old one, leaves it for a task of its own (within
    /// [`max_detached`](crate::ReplayPolicy::max_detached)), and the old response ends. The
    /// server may not have seen yet that the old client left (a phone that changed networks
    /// leaves no trace until TCP gives up), and hyper polls a body only while its connection
    /// takes bytes: without this, a fast stream would stall on a connection nobody reads,
    /// and this reader with it.
    pub(crate) fn take_from_old_connection(&mut self) {
        if let Some(body) = self.read_on.take().and_then(|handle| handle.0.upgrade()) {
            body.read_on_now();
        }
    }

    /// Whether the stream finished (its body reached its end) and the reader has read all of
    /// it: nothing will follow, ever. Not when its writer stopped for another reason (a bound,
    /// a drain, an error): a reconnect may then get more from the application.
    pub(crate) fn is_finished(&self) -> bool {
        let inner = lock(&self.log.inner);
        inner.finished
            && !inner.writes_history()
            && inner.epoch == self.epoch
            && self.next == inner.first + inner.records.len() as u64
            && !self.log.held_back(&inner)
    }

    /// The next events, or `None` once nothing more will come.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            let waiting = self.waiting.get_or_insert_with(|| {
                let mut waiting = Box::pin(self.changed.clone().notified_owned());
                // Registered before the log is read: a write after the read wakes it.
                waiting.as_mut().enable();
                waiting
            });
            match self.log.tail_step(self.epoch, &mut self.next) {
                TailStep::Events(bytes) => {
                    self.waiting = None;
                    self.unconfirmed = None;
                    return Poll::Ready(Some(bytes));
                }
                TailStep::End => return Poll::Ready(None),
                step @ (TailStep::Unconfirmed | TailStep::EndUnconfirmed) => {
                    let wait = self.log.budget.durable.unwrap_or_default();
                    let deadline = self
                        .unconfirmed
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep(wait)));
                    if deadline.as_mut().poll(cx).is_ready() {
                        if matches!(step, TailStep::Unconfirmed) {
                            // The store did not take them in time: the response ends before
                            // them, and the client's reconnect gets what the store holds.
                            self.log.budget.metrics.durable_cut(
                                "not confirmed by the store in time (a tail of the stream's log)",
                            );
                        }
                        // Else every event went out: only the end mark is late.
                        return Poll::Ready(None);
                    }
                    if waiting.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.waiting = None;
                }
                TailStep::Wait => {
                    if waiting.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    self.waiting = None;
                }
            }
        }
    }
}

impl Drop for LocalTail {
    fn drop(&mut self) {
        self.log.tailers.fetch_sub(1, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for LocalTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTail")
            .field("epoch", &self.epoch)
            .field("next", &self.next)
            .finish()
    }
}

/// The budget of every log of one tracker: the heap they hold together, and which log holds
/// the oldest history (by the age of each log's front chunk), so that it goes first when the
/// budget is full.
#[derive(Debug)]
pub(crate) struct Budget {
    pub(crate) policy: ReplayPolicy,
    pub(crate) metrics: ReplayMetrics,
    /// With [durable](ReplayPolicy::durable) replay: how long an event waits for the store
    /// before the response that holds it ends.
    pub(crate) durable: Option<Duration>,
    held: AtomicUsize,
    /// Ages given to chunks, in order.
    ages: AtomicU64,
    epochs: AtomicU64,
    /// Logs alive.
    logs: AtomicUsize,
    /// Each log holding chunks, by the age of its front chunk (oldest on top); entries go
    /// stale as logs change, and are fixed when they come up.
    heap: Mutex<BinaryHeap<Oldest>>,
}

#[derive(Debug)]
struct Oldest {
    age: u64,
    log: Weak<StreamLog>,
}

impl PartialEq for Oldest {
    fn eq(&self, other: &Self) -> bool {
        self.age == other.age
    }
}

impl Eq for Oldest {}

impl PartialOrd for Oldest {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Oldest {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        // The smallest age on top of the max-heap.
        other.age.cmp(&self.age)
    }
}

impl Budget {
    pub(crate) fn new(policy: ReplayPolicy, metrics: ReplayMetrics) -> Self {
        // Epochs come from the clock, so that a restarted process does not reuse them.
        let start = unix_micros();
        Self {
            policy,
            metrics,
            durable: None,
            held: AtomicUsize::new(0),
            ages: AtomicU64::new(0),
            epochs: AtomicU64::new(start),
            logs: AtomicUsize::new(0),
            heap: Mutex::new(BinaryHeap::new()),
        }
    }

    /// With `wait`: events of logs that go to the store reach clients once the store holds
    /// them, waiting at most that long (see [`ReplayPolicy::durable`]).
    pub(crate) fn durable(mut self, wait: Option<Duration>) -> Self {
        self.durable = wait;
        self
    }

    /// Heap bytes held by every log.
    pub(crate) fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// A new epoch: the clock's microseconds, or one above the last epoch when that is
    /// higher, so that epochs grow within a process and, clocks agreeing, across the
    /// instances that share a store (whose logs keep the history of the highest epoch).
    fn next_epoch(&self) -> u64 {
        let now = unix_micros();
        let mut epoch = now;
        let _ = self
            .epochs
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |last| {
                epoch = now.max(last + 1);
                Some(epoch)
            });
        epoch
    }

    /// A log went from `before` heap bytes to `after`. Called with the log locked, so that a
    /// log's decrements never come before the increments they undo.
    fn account(&self, before: usize, after: usize) {
        let held = if after >= before {
            self.held.fetch_add(after - before, Ordering::Relaxed) + (after - before)
        } else {
            self.held.fetch_sub(before - after, Ordering::Relaxed) - (before - after)
        };
        self.metrics.log_bytes.set(held as f64);
    }

    fn enqueue(&self, age: u64, log: Weak<StreamLog>) {
        let mut heap = lock(&self.heap);
        heap.push(Oldest { age, log });
        // Entries of logs that are gone are dropped when they come up; when many pile up
        // without coming up (the budget is not full), they are purged.
        if heap.len() > 2 * self.logs.load(Ordering::Relaxed) + 1024 {
            heap.retain(|entry| entry.log.strong_count() > 0);
        }
    }

    /// While the logs hold more than the budget, drops the oldest history: the front of the
    /// log whose front chunk is the oldest, up to that chunk's end. Locks the heap, then one
    /// log at a time (a writer never takes the heap while it holds its log).
    fn enforce(&self) {
        if self.held() <= self.policy.max_total_bytes {
            return;
        }
        let mut heap = lock(&self.heap);
        let mut dropped = 0;
        while self.held() > self.policy.max_total_bytes {
            let Some(entry) = heap.pop() else {
                break;
            };
            let Some(log) = entry.log.upgrade() else {
                continue;
            };
            let mut inner = lock(&log.inner);
            match inner.ring.front_age() {
                None => {
                    inner.queued = false;
                    continue;
                }
                Some(age) if age != entry.age => {
                    heap.push(Oldest {
                        age,
                        log: entry.log,
                    });
                    continue;
                }
                Some(_) => {}
            }
            let before = inner.heap_bytes();
            let over = self.held().saturating_sub(self.policy.max_total_bytes);
            while inner.ring.front_age() == Some(entry.age) && before - inner.heap_bytes() < over {
                if inner.pop_front() {
                    dropped += 1;
                } else {
                    // Only the open event is left: it is not kept, and its dispatch restarts
                    // the history.
                    inner.drop_open();
                    inner.skipping = Some(Trim::Budget);
                }
            }
            inner.ring.release_spare();
            self.account(before, inner.heap_bytes());
            // Readers behind the trimmed events, and a durable body waiting for the store to
            // hold them, learn it now.
            log.tell_all();
            match inner.ring.front_age() {
                Some(age) => heap.push(Oldest {
                    age,
                    log: entry.log,
                }),
                None => inner.queued = false,
            }
        }
        drop(heap);
        // An open event dropped is counted when it ends (its dispatch restarts the history).
        self.metrics.trimmed(Trim::Budget, dropped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::StreamKey;
    use crate::registry::LogQueue;
    use crate::scan::Scanner;
    use crate::store::LogEnd;
    use std::num::NonZeroUsize;

    fn policy(events: usize, stream: usize, total: usize) -> ReplayPolicy {
        ReplayPolicy::new()
            .max_events(NonZeroUsize::new(events).unwrap())
            .max_stream_bytes(NonZeroUsize::new(stream).unwrap())
            .max_total_bytes(NonZeroUsize::new(total).unwrap())
    }

    fn budget(events: usize, stream: usize, total: usize) -> Arc<Budget> {
        Arc::new(Budget::new(
            policy(events, stream, total),
            ReplayMetrics::register(),
        ))
    }

    /// A writer with its scanner, as a body holds them.
    struct Body {
        scanner: Scanner,
        writer: Writer,
    }

    impl Body {
        fn new(log: &Arc<StreamLog>) -> Self {
            Self {
                scanner: Scanner::with_max_id_len(64),
                writer: log.writer().expect("no other writer"),
            }
        }

        /// A body that continues the history after `id`, taking the writer at the look-up.
        fn continuing(log: &Arc<StreamLog>, id: &[u8]) -> (Self, Found) {
            let mut found = found(log.after(id, true, true));
            let writer = found.writer.take().expect("taken");
            (
                Self {
                    scanner: Scanner::with_max_id_len(64),
                    writer,
                },
                found,
            )
        }

        fn send(&mut self, frame: &[u8]) {
            self.scanner.feed_sink(frame, self.writer.sink());
            self.writer.write(frame);
        }
    }

    trait AfterNoTake {
        fn after_(&self, id: &[u8]) -> Lookup;
    }

    impl AfterNoTake for Arc<StreamLog> {
        fn after_(&self, id: &[u8]) -> Lookup {
            self.after(id, false, false)
        }
    }

    fn found_after(log: &Arc<StreamLog>, id: &[u8]) -> Found {
        found(log.after(id, true, true))
    }

    fn found(lookup: Lookup) -> Found {
        match lookup {
            Lookup::Found(found) => *found,
            Lookup::Gap(reason) => panic!("gap: {reason:?}"),
        }
    }

    fn gap(lookup: Lookup) -> GapReason {
        match lookup {
            Lookup::Found(found) => panic!("found {found:?}"),
            Lookup::Gap(reason) => reason,
        }
    }

    #[test]
    fn a_log_replays_the_exact_bytes_after_the_clients_id_split_anywhere_without_comments_between_events()
     {
        let log = Arc::new(StreamLog::new(budget(100, 1 << 20, 1 << 20), None));
        let mut body = Body::new(&log);
        let stream: &[u8] = b"\xEF\xBB\xBFid: 1\ndata: a\n\n: ping\n\nid: 2\r\ndata: b\r\n\r\ndata: no id\n\nid: 3\nevent: x\ndata: c\n\n";
        // Every split of the stream into two frames gives the same log.
        for cut in 0..stream.len() {
            let log = Arc::new(StreamLog::new(budget(100, 1 << 20, 1 << 20), None));
            let mut body = Body::new(&log);
            body.send(&stream[..cut]);
            body.send(&stream[cut..]);
            let after_1 = found(log.after_(b"1"));
            assert_eq!(
                &after_1.bytes[..],
                b"id: 2\r\ndata: b\r\n\r\ndata: no id\n\nid: 3\nevent: x\ndata: c\n\n",
                "cut at {cut}"
            );
            assert_eq!(after_1.events, 3);
            assert_eq!(after_1.last_id.unwrap().as_str(), "3");
            assert_eq!(after_1.position.offset, 3);
        }
        body.send(stream);
        let after_2 = found(log.after_(b"2"));
        assert_eq!(
            &after_2.bytes[..],
            b"data: no id\n\nid: 3\nevent: x\ndata: c\n\n"
        );
        let after_3 = found(log.after_(b"3"));
        assert_eq!(after_3.events, 0);
        assert!(after_3.bytes.is_empty());
        assert_eq!(after_3.last_id, None);
        assert_eq!(gap(log.after_(b"4")), GapReason::UnknownId);
    }

    #[test]
    fn each_events_own_id_is_found_wherever_it_lies_and_however_long_it_is() {
        let log = Arc::new(StreamLog::new(budget(100, 1 << 20, 1 << 20), None));
        let mut body = Body::new(&log);
        body.scanner = Scanner::with_max_id_len(1024);
        let long = "L".repeat(300);
        let events: Vec<(String, Vec<&[u8]>)> = vec![
            ("a".into(), vec![b"id: a\ndata: 1\n\n"]),
            ("b".into(), vec![b"event: x\r\nid:b\r\ndata: 2\r\n\r\n"]),
            ("c".into(), vec![b"data: 1\ndata: 2\nevent: y\nid: c\n\n"]),
            ("e".into(), vec![b"id: e", b"\n\n"]),
            ("g".into(), vec![b"id: ff\nid: g\n\n"]),
            ("".into(), vec![b"id\ndata: reset\n\n"]),
        ];
        let long_event = format!("id: {long}\ndata: long\n\n");
        body.send(b"id: 0\n\n");
        let mut previous = "0".to_string();
        let mut all = |id: &str, frames: &[&[u8]], body: &mut Body| {
            for frame in frames {
                body.send(frame);
            }
            let after = found(log.after_(previous.as_bytes()));
            assert_eq!(&after.bytes[..], &frames.concat()[..], "after {previous}");
            assert_eq!(after.last_id.unwrap().as_str(), id);
            previous = id.to_string();
        };
        all(&long, &[long_event.as_bytes()], &mut body);
        for (id, frames) in &events[..events.len() - 1] {
            all(id, frames, &mut body);
        }
        // An empty id (a reset) is an id too, found as such.
        let (id, frames) = &events[events.len() - 1];
        all(id, frames, &mut body);
        assert_eq!(found(log.after_(b"a")).events, 5);
        assert_eq!(found(log.after_(long.as_bytes())).events, 6);
        // Past the first 255 bytes of its event, and events after the first of a frame.
        let far = format!("data: {}\nid: h\n\n", "x".repeat(300));
        all("h", &[far.as_bytes()], &mut body);
        all("j", &[b"id: i\ndata: 1\n\nid: j\ndata: 2\n\n"], &mut body);
        assert_eq!(&found(log.after_(b"i")).bytes[..], b"id: j\ndata: 2\n\n");
        assert_eq!(found(log.after_(b"h")).events, 2);
    }

    #[test]
    fn an_event_cut_off_by_the_end_of_its_body_is_not_logged() {
        let log = Arc::new(StreamLog::new(budget(100, 1 << 20, 1 << 20), None));
        let mut body = Body::new(&log);
        body.send(b"id: 1\ndata: a\n\nid: 2\ndata: cut");
        drop(body);
        assert_eq!(found(log.after_(b"1")).events, 0);
        // A body that continues the history after the replay writes after event 1.
        let (mut body, replay) = Body::continuing(&log, b"1");
        assert_eq!(replay.events, 0);
        body.send(b"id: 2\ndata: whole\n\n");
        assert_eq!(
            &found(log.after_(b"1")).bytes[..],
            b"id: 2\ndata: whole\n\n"
        );
    }

    #[test]
    fn a_body_that_does_not_continue_the_replayed_history_restarts_it_in_a_new_epoch() {
        let log = Arc::new(StreamLog::new(budget(100, 1 << 20, 1 << 20), None));
        let mut body = Body::new(&log);
        body.send(b"id: 1\n\nid: 2\n\n");
        let old = found(log.after_(b"1"));
        assert!(
            log.writer().is_none(),
            "one writer at a time: a second body of the stream does not write"
        );
        drop(body);
        let mut body = Body::new(&log);
        body.send(b"id: 3\n\n");
        assert_eq!(gap(log.after_(b"1")), GapReason::UnknownId);
        let new = found(log.after_(b"3"));
        assert_ne!(new.position.epoch, old.position.epoch);
        assert_eq!(new.position.offset, 0);
    }

    #[test]
    fn a_reconnect_takes_the_log_over_from_a_body_still_writing_it_at_its_look_up() {
        let log = Arc::new(StreamLog::new(budget(100, 1 << 20, 1 << 20), None));
        let mut old = Body::new(&log);
        old.send(b"id: 1\n\nid: 2\n\nid: 3\ndata: half");
        // The client reconnects after 1 before the server saw its connection end.
        let (mut new, replay) = Body::continuing(&log, b"1");
        assert_eq!(&replay.bytes[..], b"id: 2\n\n");
        // From its look-up on, the old body's writes are not logged.
        old.send(b" of it\n\nid: 4\n\n");
        new.send(b"id: 3\ndata: whole\n\n");
        drop(old);
        new.send(b"id: 4\n\n");
        assert_eq!(
            &found(log.after_(b"2")).bytes[..],
            b"id: 3\ndata: whole\n\nid: 4\n\n"
        );
    }

    #[test]
    fn a_writer_that_leaves_other_bodies_streaming_seals_the_log_until_a_new_history() {
        let log = Arc::new(StreamLog::new(budget(100, 1 << 20, 1 << 20), None));
        let mut first = Body::new(&log);
        first.send(b"id: 1\n\nid: 2\n\n");
        // Other readers of the stream go on, unlogged: no replay from it is complete.
        first.writer.release(true);
        assert_eq!(gap(log.after_(b"1")), GapReason::NoHistory);
        assert!(!log.holds_id(b"1"));
        let mut next = Body::new(&log);
        next.send(b"id: 7\n\nid: 8\n\n");
        assert_eq!(found(log.after_(b"7")).events, 1);
        assert_eq!(gap(log.after_(b"1")), GapReason::UnknownId);
    }

    #[test]
    fn bounds_drop_the_oldest_events_and_a_dropped_id_is_a_gap_never_a_partial_replay() {
        let log = Arc::new(StreamLog::new(budget(3, 1 << 20, 1 << 20), None));
        let mut body = Body::new(&log);
        for n in 1..=5 {
            body.send(format!("id: {n}\ndata: x\n\n").as_bytes());
        }
        assert_eq!(gap(log.after_(b"2")), GapReason::Evicted);
        assert_eq!(found(log.after_(b"3")).events, 2);
        // A repeated id: the newest counts.
        body.send(b"id: 3\ndata: x\n\n");
        assert_eq!(found(log.after_(b"3")).events, 0);
        // Bytes: 40 bytes keep two 15-byte events (18 each with the trailer that finds the id).
        let log = Arc::new(StreamLog::new(budget(100, 40, 1 << 20), None));
        let mut body = Body::new(&log);
        for n in 1..=5 {
            body.send(format!("id: {n}\ndata: x\n\n").as_bytes());
        }
        assert_eq!(gap(log.after_(b"3")), GapReason::Evicted);
        assert_eq!(found(log.after_(b"4")).events, 1);
    }

    #[test]
    fn an_event_larger_than_the_stream_bound_restarts_the_history_after_it() {
        let log = Arc::new(StreamLog::new(budget(100, 64, 1 << 20), None));
        let mut body = Body::new(&log);
        body.send(b"id: 1\ndata: x\n\n");
        let epoch = found(log.after_(b"1")).position.epoch;
        body.send(b"id: 2\ndata: ");
        body.send(&[b'y'; 100]);
        // Before its dispatch, the log still answers for event 1.
        assert_eq!(found(log.after_(b"1")).events, 0);
        body.send(b"\n\nid: 3\ndata: z\n\n");
        assert_eq!(gap(log.after_(b"1")), GapReason::Evicted);
        assert_eq!(gap(log.after_(b"2")), GapReason::Evicted);
        let after_3 = found(log.after_(b"3"));
        assert_ne!(after_3.position.epoch, epoch);
        assert_eq!(after_3.position.offset, 0);
    }

    #[test]
    fn the_budget_drops_the_oldest_history_of_all_logs_first_and_holds_its_bound() {
        let budget = budget(1000, 8 << 10, 8 << 10);
        let a = Arc::new(StreamLog::new(budget.clone(), None));
        let b = Arc::new(StreamLog::new(budget.clone(), None));
        let (mut wa, mut wb) = (Body::new(&a), Body::new(&b));
        let event = |n: u32| format!("id: {n}\ndata: {}\n\n", "x".repeat(200));
        for n in 0..10 {
            wa.send(event(n).as_bytes());
        }
        for n in 0..100 {
            wb.send(event(n).as_bytes());
            assert!(budget.held() <= 8 << 10, "{} held", budget.held());
        }
        // a's history was the oldest: it is all gone; b keeps its newest.
        assert_eq!(gap(a.after_(b"9")), GapReason::Evicted);
        assert_eq!(found(b.after_(b"90")).events, 9);
        drop((wa, wb));
        drop(a);
        let held = budget.held();
        drop(b);
        assert!(held > 0);
        assert_eq!(budget.held(), 0, "dropped logs give their bytes back");
    }

    #[test]
    fn the_budget_heap_stays_bounded_when_logs_come_and_go() {
        let budget = budget(10, 1 << 20, 1 << 30);
        for n in 0..5_000 {
            let log = Arc::new(StreamLog::new(budget.clone(), None));
            Body::new(&log).send(format!("id: {n}\n\n").as_bytes());
        }
        assert!(lock(&budget.heap).len() <= 1024 + 1);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn heap_per_log_is_within_fifteen_percent_of_the_bytes_held() {
        // The benchmark's case: 256 events of 100 bytes.
        let budget = budget(256, 1 << 20, 1 << 30);
        let log = Arc::new(StreamLog::new(budget.clone(), None));
        let mut body = Body::new(&log);
        let mut held = 0;
        for n in 0..256 {
            let head = format!("id: {n}\ndata: ");
            let event = format!("{head}{}\n\n", "x".repeat(100 - head.len() - 2));
            assert_eq!(event.len(), 100);
            body.send(event.as_bytes());
            held += 100;
        }
        let ratio = budget.held() as f64 / held as f64;
        assert!(
            ratio <= 1.15,
            "heap {} for {held} bytes: {ratio:.3}",
            budget.held()
        );
    }

    /// A log that goes to the store with durable replay, its queue, and a body writing it,
    /// marked detachable; `events` the log's bound.
    fn durable_log(events: usize) -> (Arc<StreamLog>, Arc<LogQueue>, Body) {
        let budget = Arc::new(
            Budget::new(policy(events, 1 << 20, 1 << 20), ReplayMetrics::register())
                .durable(Some(Duration::from_secs(1))),
        );
        let queue = Arc::new(LogQueue::new(16, metrics::counter!("test_dropped")));
        let store = StoreBound {
            key: StreamKey::try_new("s1", "GET /answer").unwrap(),
            queue: queue.clone(),
        };
        let log = Arc::new(StreamLog::new(budget, Some(store)));
        let body = Body::new(&log);
        (log, queue, body)
    }

    fn event(n: u32) -> String {
        format!("id: {n}\ndata: {n}\n\n")
    }

    /// The store got events 0 and 1, then the log dropped event 2 before the store had it,
    /// then the store got events 3 on: a frame that completed events 2 to 4 must never go
    /// out, though the store's cursor passed it.
    #[test]
    fn a_durable_point_past_events_trimmed_before_the_store_got_them_is_lost() {
        let (log, _queue, mut body) = durable_log(6);
        body.writer.set_detachable(true);
        for n in 0..5 {
            body.send(event(n).as_bytes());
        }
        let Durable::At(point, unstored) = body.writer.store_point() else {
            panic!("durable applies");
        };
        assert_eq!(unstored, 5);
        let mut first = log.unstored("p").expect("owed");
        first.events.truncate(2);
        log.appended(&first);
        assert_eq!(body.writer.store_reach(point, false), Reach::Waiting);
        // Four more events: the log keeps six, and drops events 0 to 2.
        for n in 5..9 {
            body.send(event(n).as_bytes());
        }
        let rest = log.unstored("p").expect("owed");
        assert_eq!(rest.events.first().map(|e| e.offset), Some(3));
        log.appended(&rest);
        assert_eq!(body.writer.store_reach(point, false), Reach::Lost);
    }

    /// A body whose history becomes detachable after it logged events offers the log to the
    /// store at once: what it logged before is owed too.
    #[test]
    fn a_history_made_detachable_is_offered_to_the_store_at_once() {
        let (_log, queue, mut body) = durable_log(16);
        body.send(event(1).as_bytes());
        assert!(queue.take().is_empty(), "not detachable: nothing owed");
        body.writer.set_detachable(true);
        assert_eq!(queue.take().len(), 1);
    }

    /// With durable replay, a reconnect to a history whose writer stopped before the store
    /// had all of it gets what the store holds, then follows the log: the rest once the store
    /// has it, then the end (its next reconnect continues the history).
    #[test]
    fn a_reconnect_to_a_stopped_durable_history_gets_what_the_store_holds_then_the_rest_once_stored()
     {
        let (log, _queue, mut body) = durable_log(16);
        body.writer.set_detachable(true);
        for n in 0..5 {
            body.send(event(n).as_bytes());
        }
        let mut stored = log.unstored("p").expect("owed");
        stored.events.truncate(3);
        log.appended(&stored);
        // The body stops (a bound, a drain) before the store has events 3 and 4.
        drop(body);
        let found = found(log.after(b"0", true, true));
        assert_eq!(
            &found.bytes[..],
            format!("{}{}", event(1), event(2)).as_bytes()
        );
        assert_eq!(found.position.offset, 2);
        assert!(found.writer.is_none(), "no body continues the history yet");
        let mut tail = found.tail.expect("the reconnect follows the log");
        assert!(matches!(
            log.tail_step(tail.epoch, &mut tail.next),
            TailStep::Unconfirmed
        ));
        let rest = log.unstored("p").expect("owed");
        log.appended(&rest);
        match log.tail_step(tail.epoch, &mut tail.next) {
            TailStep::Events(bytes) => {
                assert_eq!(&bytes[..], format!("{}{}", event(3), event(4)).as_bytes())
            }
            _ => panic!("events 3 and 4 once stored"),
        }
        assert!(matches!(
            log.tail_step(tail.epoch, &mut tail.next),
            TailStep::End
        ));
        // Everything stored: the next reconnect continues the history.
        let next = found_after(&log, b"4");
        assert!(next.writer.is_some() && next.tail.is_none());
    }

    /// A hole the store got before a body continued the history (events trimmed before they
    /// were appended, while the store was down, say) is not this body's: its own events, once
    /// stored, count as confirmed.
    #[test]
    fn a_hole_before_a_continuing_body_does_not_cut_it() {
        let (log, _queue, mut body) = durable_log(4);
        body.writer.set_detachable(true);
        for n in 0..3 {
            body.send(event(n).as_bytes());
        }
        let mut first = log.unstored("p").expect("owed");
        first.events.truncate(1);
        log.appended(&first);
        // Three more events: the log keeps four, and drops event 1 before the store has it.
        for n in 3..6 {
            body.send(event(n).as_bytes());
        }
        let rest = log.unstored("p").expect("owed");
        assert_eq!(rest.events.first().map(|e| e.offset), Some(2));
        log.appended(&rest);
        drop(body);
        let found = found_after(&log, b"5");
        let mut next = Body {
            scanner: Scanner::with_max_id_len(64),
            writer: found.writer.expect("the history goes on with a new body"),
        };
        next.writer.set_detachable(true);
        next.send(event(6).as_bytes());
        let Durable::At(point, _) = next.writer.store_point() else {
            panic!("durable applies");
        };
        log.appended(&log.unstored("p").expect("owed"));
        assert_eq!(next.writer.store_reach(point, false), Reach::Reached);
    }

    /// With durable replay, a reader following a finished history ends once the store has
    /// its end mark, as the body does: a client told the stream ended cleanly finds it ended
    /// on any instance.
    #[test]
    fn a_durable_tail_ends_once_the_store_has_the_end_mark() {
        let (log, _queue, mut body) = durable_log(16);
        body.writer.set_detachable(true);
        for n in 0..3 {
            body.send(event(n).as_bytes());
        }
        log.appended(&log.unstored("p").expect("owed"));
        body.writer.finish();
        drop(body);
        let found = found_after(&log, b"0");
        assert_eq!(
            &found.bytes[..],
            format!("{}{}", event(1), event(2)).as_bytes()
        );
        let mut tail = found.tail.expect("the reconnect follows the log");
        assert!(matches!(
            log.tail_step(tail.epoch, &mut tail.next),
            TailStep::EndUnconfirmed
        ));
        assert!(!tail.is_finished(), "no 204 before the store has the end");
        let end = log.unstored("p").expect("the end mark is owed");
        assert!(end.events.is_empty() && end.end == Some(LogEnd::Finished));
        log.appended(&end);
        assert!(matches!(
            log.tail_step(tail.epoch, &mut tail.next),
            TailStep::End
        ));
        assert!(tail.is_finished());
    }

    /// A history the store refused (a newer one holds the stream's log) is owed nothing
    /// more, whatever it logs next; with durable replay what waits for the store is lost, a
    /// reader following it ends, and a reconnect to it is told of the gap. A newer history
    /// of the log goes to the store again.
    #[test]
    fn a_history_the_store_refused_is_owed_nothing_and_never_reaches_a_durable_client() {
        let (log, queue, mut body) = durable_log(16);
        body.writer.set_detachable(true);
        body.send(event(0).as_bytes());
        body.send(event(1).as_bytes());
        let Durable::At(point, _) = body.writer.store_point() else {
            panic!("durable applies");
        };
        let refused = log.unstored("p").expect("owed");
        log.refused(&refused);
        assert_eq!(body.writer.store_reach(point, false), Reach::Lost);
        queue.take();
        body.send(event(2).as_bytes());
        assert!(
            queue.take().is_empty(),
            "a refused history is offered no more"
        );
        assert!(log.unstored("p").is_none());
        assert_eq!(gap(log.after(b"0", true, true)), GapReason::NoHistory);
        // A new history (another body, from its first bytes) goes to the store again.
        drop(body);
        let mut next = Body::new(&log);
        next.writer.set_detachable(true);
        next.send(event(9).as_bytes());
        let fresh = log.unstored("p").expect("the new history is owed");
        assert_ne!(fresh.epoch, refused.epoch);
        log.appended(&fresh);
        assert!(log.unstored("p").is_none());
    }
}
