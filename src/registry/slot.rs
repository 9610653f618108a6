//! One tracked stream's slot: its latest id with the id's version, its subscribers, and the
//! worker's marks on it (kept here so that neither the worker nor the frame path looks
//! anything up).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::watch;

use crate::key::{EventId, Owner, StreamKey};
use crate::replay::StreamLog;
use crate::sync::lock;

/// A tracked owner: its id, shared by all its slots, and when it was last active. A sessionless
/// stream has a state of its own, with no owner, whose activity is never written to the store.
#[derive(Debug)]
pub(crate) struct SessionState {
    pub(super) id: Option<Owner>,
    /// Registry microseconds (see `Registry::now_us`) of the last request or frame, from the
    /// registry's coarse clock.
    pub(super) last_active: AtomicU64,
    /// In the hand-off's list of sessions active since the last flush.
    pub(super) marked: AtomicBool,
    /// Still in the registry's map (false once its last stream is evicted).
    pub(super) resident: AtomicBool,
}

impl SessionState {
    pub(super) fn new(id: Option<Owner>) -> Self {
        Self {
            id,
            last_active: AtomicU64::new(0),
            marked: AtomicBool::new(false),
            resident: AtomicBool::new(true),
        }
    }

    /// The owner; `None` for a sessionless stream.
    pub(crate) fn id(&self) -> Option<&Owner> {
        self.id.as_ref()
    }

    pub(crate) fn last_active_us(&self) -> u64 {
        self.last_active.load(Ordering::Relaxed)
    }

    pub(crate) fn unmark(&self) {
        self.marked.store(false, Ordering::Release);
    }

    pub(crate) fn is_resident(&self) -> bool {
        self.resident.load(Ordering::Relaxed)
    }
}

/// The version of a published id: its sequence number and when it was published (registry
/// µs). Within a slot both grow together; a slot made again for an evicted key starts above the
/// evicted slot's sequence, so the sequence never goes back for a key within one tracker. Across
/// instances sharing a store, the time orders first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Version {
    pub(crate) at_us: u64,
    pub(crate) sequence: u64,
}

/// Ids up to this many bytes are kept inside the slot, with no allocation of their own.
const INLINE_ID: usize = 22;

/// The bytes of an id: inline when short (counters, rmcp's `{index}/{request}`), else in a heap
/// buffer that later ids reuse.
#[derive(Debug)]
pub(super) enum IdBytes {
    Inline { len: u8, bytes: [u8; INLINE_ID] },
    Heap(Vec<u8>),
}

impl Default for IdBytes {
    fn default() -> Self {
        IdBytes::Inline {
            len: 0,
            bytes: [0; INLINE_ID],
        }
    }
}

impl IdBytes {
    fn set(&mut self, id: &[u8]) {
        match self {
            IdBytes::Heap(buf) => {
                buf.clear();
                buf.extend_from_slice(id);
            }
            IdBytes::Inline { len, bytes } if id.len() <= INLINE_ID => {
                bytes[..id.len()].copy_from_slice(id);
                *len = id.len() as u8;
            }
            IdBytes::Inline { .. } => *self = IdBytes::Heap(id.to_vec()),
        }
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        match self {
            IdBytes::Inline { len, bytes } => &bytes[..usize::from(*len)],
            IdBytes::Heap(buf) => buf,
        }
    }
}

#[derive(Debug, Default)]
pub(super) struct Latest {
    /// The bytes of the latest id.
    pub(super) id: IdBytes,
    has_id: bool,
    version: Version,
    /// The worker owes this slot a look: a message is in the channel or on its way, or the slot
    /// is in the worker's pending list, the hand-off's dirty list, the retry queue or the
    /// given-up list. While it is set, bodies send nothing more for this slot. Kept under the
    /// same lock as the id, so that a body's publish and the worker's read can never both miss
    /// each other's update.
    queued: bool,
}

/// The parts of a slot that most streams never need.
#[derive(Debug, Default)]
struct Extras {
    /// The latest-only `watch` channel of subscribers, made on the first `subscribe`: a
    /// `watch::Sender` costs about 300 bytes and its send locks eight wait lists, which most
    /// streams (nobody subscribed) do not need on every frame.
    ///
    /// Subscribers are told with `latest`'s lock released: a subscriber may hold `borrow()` on
    /// its receiver (which a send waits for) while it reads the latest id (which takes
    /// `latest`'s lock). Each send reads the latest id under the channel's own lock, so the
    /// last one leaves the newest in the channel.
    watch: OnceLock<watch::Sender<Option<EventId>>>,
    /// The stream's replay log, made when the first body streams into it with replay on; it
    /// goes with the slot (a stream evicted loses its history).
    log: OnceLock<Arc<StreamLog>>,
}

/// One tracked stream.
#[derive(Debug)]
pub(crate) struct Slot {
    pub(super) key: StreamKey,
    pub(super) session: Arc<SessionState>,
    /// Bodies streaming into this slot now; changed only under the registry's map lock. A slot
    /// with open bodies is live: it is not in the LRU list and is never evicted.
    pub(super) open: AtomicU32,
    /// The latest id and its version.
    pub(super) latest: Mutex<Latest>,
    /// What few streams need, made the first time one of its parts is: one pointer in the slot.
    extras: OnceLock<Box<Extras>>,
    /// Removed from the registry (its unpersisted id, if any, is in the hand-off's evicted
    /// FIFO); set by the registry.
    pub(super) evicted: AtomicBool,
    /// What the worker knows of this slot, kept here so that nothing looks the slot up.
    marks: Marks,
}

impl Slot {
    pub(super) fn new(key: StreamKey, session: Arc<SessionState>, sequence: u64) -> Self {
        Self {
            key,
            session,
            open: AtomicU32::new(0),
            latest: Mutex::new(Latest {
                id: IdBytes::default(),
                has_id: false,
                version: Version { at_us: 0, sequence },
                queued: false,
            }),
            extras: OnceLock::new(),
            evicted: AtomicBool::new(false),
            marks: Marks::new(sequence),
        }
    }

    pub(crate) fn key(&self) -> &StreamKey {
        &self.key
    }

    fn extras(&self) -> &Extras {
        self.extras.get_or_init(Box::default)
    }

    /// The stream's replay log, made by `make` the first time.
    pub(crate) fn replay_log(&self, make: impl FnOnce() -> Arc<StreamLog>) -> &Arc<StreamLog> {
        self.extras().log.get_or_init(make)
    }

    /// The stream's replay log, if it has one.
    pub(crate) fn existing_replay_log(&self) -> Option<&Arc<StreamLog>> {
        self.extras.get()?.log.get()
    }

    #[inline]
    pub(crate) fn session(&self) -> &Arc<SessionState> {
        &self.session
    }

    /// How many bodies stream into this slot now (a moment's figure: it changes under the
    /// registry's lock).
    pub(crate) fn open_bodies(&self) -> u32 {
        self.open.load(Ordering::Relaxed)
    }

    pub(super) fn is_live(&self) -> bool {
        self.open.load(Ordering::Relaxed) > 0
    }

    pub(super) fn is_idle(&self, now_us: u64, ttl_us: u64) -> bool {
        !self.is_live() && now_us.saturating_sub(self.session.last_active_us()) >= ttl_us
    }

    /// Whether the slot's latest id is newer than what the store is known to hold.
    pub(crate) fn unpersisted(&self) -> bool {
        self.sequence() > self.marks.persisted()
    }

    /// The worker's marks on this slot.
    pub(crate) fn marks(&self) -> &Marks {
        &self.marks
    }

    /// Makes `id` (bytes the scanner accepted) the latest id of this stream, published at
    /// `at_us`. No allocation once the slot's buffer has grown to the ids' size; subscribers, if
    /// any, get a new [`EventId`]. Returns the id's version and whether the caller must hand the
    /// slot to the worker (it was not queued; it is now).
    pub(crate) fn publish(&self, id: &[u8], at_us: u64) -> (Version, bool) {
        // The version is taken under the slot's lock, so that id order and version order
        // agree when several bodies publish to one key at once.
        let (version, hand_over) = {
            let mut latest = lock(&self.latest);
            let version = Version {
                at_us: at_us.max(latest.version.at_us),
                sequence: latest.version.sequence + 1,
            };
            latest.id.set(id);
            latest.has_id = true;
            latest.version = version;
            let hand_over = !std::mem::replace(&mut latest.queued, true);
            (version, hand_over)
        };
        if let Some(watch) = self.extras.get().and_then(|extras| extras.watch.get())
            && watch.receiver_count() > 0
        {
            self.tell(watch);
        }
        (version, hand_over)
    }

    /// Sends the latest id to subscribers when it is not what they have. The id is read
    /// inside the send, under the channel's lock (`latest`'s lock is never held while that one
    /// is taken), so that two bodies telling at once cannot leave the older id in it.
    fn tell(&self, watch: &watch::Sender<Option<EventId>>) {
        watch.send_if_modified(|value| {
            let current = self.latest();
            let changed = *value != current;
            if changed {
                *value = current;
            }
            changed
        });
    }

    /// The sequence number of the latest id.
    pub(super) fn sequence(&self) -> u64 {
        lock(&self.latest).version.sequence
    }

    /// Whether the latest id is `id`, compared in place.
    pub(crate) fn latest_is(&self, id: &[u8]) -> bool {
        let latest = lock(&self.latest);
        latest.has_id && latest.id.as_slice() == id
    }

    pub(crate) fn latest(&self) -> Option<EventId> {
        let latest = lock(&self.latest);
        latest
            .has_id
            .then(|| EventId::from_scanned(latest.id.as_slice()))
    }

    /// For the worker: clears the queued flag and reads the latest id with its version, under
    /// one lock. A body that publishes after this hands the slot over again, so no id is missed.
    pub(crate) fn take_latest(&self) -> Option<(EventId, Version)> {
        let mut latest = lock(&self.latest);
        latest.queued = false;
        latest
            .has_id
            .then(|| (EventId::from_scanned(latest.id.as_slice()), latest.version))
    }

    /// The latest id with its version, read together.
    pub(crate) fn latest_entry(&self) -> Option<(EventId, Version)> {
        let latest = lock(&self.latest);
        latest
            .has_id
            .then(|| (EventId::from_scanned(latest.id.as_slice()), latest.version))
    }

    /// A receiver of this stream's latest ids, starting at the current one (marked seen).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<EventId>> {
        let watch = self.extras().watch.get_or_init(|| watch::Sender::new(None));
        // Subscribed first, so that a body publishing from now on tells this receiver too;
        // then the ids published while nobody subscribed, which were not sent.
        let mut rx = watch.subscribe();
        self.tell(watch);
        rx.mark_unchanged();
        rx
    }

    /// Sets the queued flag; true when it was not set (the caller must then get the slot to
    /// the worker).
    pub(crate) fn mark_queued(&self) -> bool {
        !std::mem::replace(&mut lock(&self.latest).queued, true)
    }

    pub(crate) fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::Acquire)
    }
}

/// The worker's marks on one slot: what it knows of the stream's place in the store and in its
/// lists. Written by the worker only.
#[derive(Debug)]
pub(crate) struct Marks {
    /// Highest sequence known to be in the store.
    persisted: AtomicU64,
    /// The slot has an entry in the worker's retry queue.
    in_retry: AtomicBool,
    /// The worker gave up retrying this slot's write (it is caught up later).
    given_up: AtomicBool,
    /// Failed writes of this slot's id in a row.
    retries: AtomicU32,
    /// The worker's round that last took this slot, so that one round writes a slot once.
    /// Rounds are numbered from 1 by a `u64` that cannot wrap (at one round per millisecond,
    /// not in 500 million years), so a slot's 0 never matches a round.
    round: AtomicU64,
}

impl Marks {
    /// The marks of a new slot whose sequences start above `sequence` (all below are stored, as
    /// far as this slot is concerned).
    pub(crate) fn new(sequence: u64) -> Self {
        Self {
            persisted: AtomicU64::new(sequence),
            in_retry: AtomicBool::new(false),
            given_up: AtomicBool::new(false),
            retries: AtomicU32::new(0),
            round: AtomicU64::new(0),
        }
    }

    pub(crate) fn persisted(&self) -> u64 {
        self.persisted.load(Ordering::Acquire)
    }

    pub(crate) fn set_persisted(&self, sequence: u64) {
        self.persisted.fetch_max(sequence, Ordering::AcqRel);
    }

    pub(crate) fn is_in_retry(&self) -> bool {
        self.in_retry.load(Ordering::Acquire)
    }

    /// Marks the slot as queued for a retry; true when it was not.
    pub(crate) fn enter_retry(&self) -> bool {
        !self.in_retry.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn leave_retry(&self) {
        self.in_retry.store(false, Ordering::Release);
    }

    pub(crate) fn is_given_up(&self) -> bool {
        self.given_up.load(Ordering::Acquire)
    }

    /// Sets whether the slot is given up; true when that changed.
    pub(crate) fn set_given_up(&self, given_up: bool) -> bool {
        self.given_up.swap(given_up, Ordering::AcqRel) != given_up
    }

    pub(crate) fn retries(&self) -> u32 {
        self.retries.load(Ordering::Relaxed)
    }

    pub(crate) fn set_retries(&self, retries: u32) {
        self.retries.store(retries, Ordering::Relaxed);
    }

    /// Marks the slot as taken by `round` (the worker's round number); false when that round
    /// already took it.
    pub(crate) fn take_for_round(&self, round: u64) -> bool {
        self.round.swap(round, Ordering::Relaxed) != round
    }
}
