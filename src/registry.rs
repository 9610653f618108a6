//! Per-stream slots: the latest committed id of every tracked (session, stream), and the
//! activity of every tracked session.
//!
//! Each slot holds the newest committed [`EventId`] and its version (latest only: a reader
//! never sees a backlog), and a `tokio::sync::watch` channel for subscribers, made when the
//! first one subscribes. A response body looks its slot up once, when the response starts,
//! then publishes into it (one uncontended lock) and marks its session active with atomic
//! operations: the map is never touched per frame.
//!
//! Memory is bounded three ways:
//! - at most `max_streams` slots: a new stream evicts the least recently used one (O(1), an LRU
//!   list);
//! - slots idle for `idle_ttl` (no open body, no activity) are evicted by the worker's sweep,
//!   which looks at a bounded number of the least recently used slots per tick, never the whole
//!   map;
//! - strings are shared: all slots of a session share its id, and stream names are interned
//!   through a bounded LRU table, so thousands of streams on one path share one name.
//!
//! An evicted slot whose latest id is not in the store yet is handed to the worker (marked
//! dirty), so its id still reaches the store.
//!
//! The map is two-level, session then stream, because a session has few streams, callers ask
//! for all the streams of one session, and look-ups by `&str` need no allocation.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use lru::LruCache;
use tokio::sync::watch;

use crate::key::{EventId, SessionId, StreamKey, StreamName};

/// A tracked session: its id, shared by all its slots, and when it was last active.
#[derive(Debug)]
pub(crate) struct SessionState {
    id: SessionId,
    /// Registry milliseconds (see `Registry::now_ms`) of the last request or frame, from the
    /// registry's coarse clock.
    last_active: AtomicU64,
    /// In the registry's list of sessions active since the last flush.
    marked: AtomicBool,
}

impl SessionState {
    pub(crate) fn id(&self) -> &SessionId {
        &self.id
    }

    pub(crate) fn last_active_ms(&self) -> u64 {
        self.last_active.load(Ordering::Relaxed)
    }

    pub(crate) fn unmark(&self) {
        self.marked.store(false, Ordering::Release);
    }
}

/// The version of a published id: its sequence number and when it was published (registry
/// ms). Within a tracker both grow together; across instances sharing a store, the time
/// orders first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Version {
    pub(crate) sequence: u64,
    pub(crate) at_ms: u64,
}

#[derive(Debug, Default)]
struct Latest {
    id: Option<EventId>,
    version: Version,
}

/// One tracked stream.
#[derive(Debug)]
pub(crate) struct Slot {
    key: StreamKey,
    session: Arc<SessionState>,
    /// Bodies streaming into this slot now; a slot with open bodies is never idle.
    open: AtomicU32,
    /// The latest id and its version.
    latest: Mutex<Latest>,
    /// The latest-only `watch` channel of subscribers, made on the first `subscribe`: a
    /// `watch::Sender` costs about 300 bytes and its send locks eight wait lists, which most
    /// streams (nobody subscribed) do not need on every frame.
    watch: OnceLock<watch::Sender<Option<EventId>>>,
    /// Copy of `latest.version.sequence`, for lock-free checks.
    sequence: AtomicU64,
    /// Highest sequence known to be in the store.
    persisted: AtomicU64,
    /// The worker owes this slot a write of its latest id (see `Registry::mark_dirty`).
    dirty: AtomicBool,
    /// The slot has an entry in the worker's retry queue.
    in_retry: AtomicBool,
}

impl Slot {
    fn new(key: StreamKey, session: Arc<SessionState>) -> Self {
        Self {
            key,
            session,
            open: AtomicU32::new(0),
            latest: Mutex::default(),
            watch: OnceLock::new(),
            sequence: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            in_retry: AtomicBool::new(false),
        }
    }

    pub(crate) fn key(&self) -> &StreamKey {
        &self.key
    }

    pub(crate) fn session(&self) -> &Arc<SessionState> {
        &self.session
    }

    pub(crate) fn body_opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn body_closed(&self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }

    fn is_idle(&self, now_ms: u64, ttl_ms: u64) -> bool {
        self.open.load(Ordering::Relaxed) == 0
            && now_ms.saturating_sub(self.session.last_active_ms()) >= ttl_ms
    }

    fn unpersisted(&self) -> bool {
        self.sequence.load(Ordering::Relaxed) > self.persisted()
    }

    /// Makes `id` the latest id of this stream and returns its version: a sequence number
    /// from the registry's counter (it increases with every id of the key and never repeats,
    /// even for a key whose slot was dropped and created again) and the registry's coarse time.
    pub(crate) fn publish(&self, id: EventId, registry: &Registry) -> Version {
        // The version is taken under the slot's lock, so that id order and version order
        // agree when several bodies publish to one key at once; subscribers are told under it
        // too, so they can never be left with an older id than the slot's.
        let mut latest = lock(&self.latest);
        let version = Version {
            sequence: registry.sequence.fetch_add(1, Ordering::Relaxed) + 1,
            at_ms: registry.clock.load(Ordering::Relaxed),
        };
        self.sequence.store(version.sequence, Ordering::Relaxed);
        if let Some(watch) = self.watch.get()
            && watch.receiver_count() > 0
        {
            watch.send_replace(Some(id.clone()));
        }
        *latest = Latest {
            id: Some(id),
            version,
        };
        version
    }

    pub(crate) fn latest(&self) -> Option<EventId> {
        lock(&self.latest).id.clone()
    }

    /// The latest id with its version, read together.
    pub(crate) fn latest_entry(&self) -> Option<(EventId, Version)> {
        let latest = lock(&self.latest);
        Some((latest.id.clone()?, latest.version))
    }

    /// A receiver of this stream's latest ids, starting at the current one (marked seen).
    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<EventId>> {
        let watch = self.watch.get_or_init(|| watch::Sender::new(None));
        let latest = lock(&self.latest);
        watch.send_if_modified(|value| {
            let changed = *value != latest.id;
            if changed {
                value.clone_from(&latest.id);
            }
            changed
        });
        watch.subscribe()
    }

    pub(crate) fn persisted(&self) -> u64 {
        self.persisted.load(Ordering::Acquire)
    }

    pub(crate) fn set_persisted(&self, sequence: u64) {
        self.persisted.fetch_max(sequence, Ordering::AcqRel);
    }

    pub(crate) fn is_dirty(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Sets the dirty flag; true when it was not set.
    pub(crate) fn set_dirty(&self) -> bool {
        !self.dirty.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn clear_dirty(&self) {
        self.dirty.store(false, Ordering::Release);
    }

    /// Marks the slot as queued for a retry; true when it was not.
    pub(crate) fn enter_retry(&self) -> bool {
        !self.in_retry.swap(true, Ordering::AcqRel)
    }

    pub(crate) fn leave_retry(&self) {
        self.in_retry.store(false, Ordering::Release);
    }
}

#[derive(Debug)]
struct SessionEntry {
    state: Arc<SessionState>,
    streams: Vec<Arc<Slot>>,
}

#[derive(Debug)]
struct Map {
    sessions: HashMap<SessionId, SessionEntry>,
    /// Every slot, least recently used first; keyed by the slot's address (unique while the
    /// LRU holds the slot).
    lru: LruCache<usize, Arc<Slot>>,
    /// Interned stream names.
    names: LruCache<StreamName, ()>,
}

impl Map {
    /// Removes `slot` from its session's entry (and the entry when it was the last stream).
    fn unlink(&mut self, slot: &Arc<Slot>) {
        let session = slot.key.session.as_str();
        if let Some(entry) = self.sessions.get_mut(session) {
            entry.streams.retain(|s| !Arc::ptr_eq(s, slot));
            if entry.streams.is_empty() {
                self.sessions.remove(session);
            }
        }
    }
}

/// Sizes of the registry, for the memory gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) streams: usize,
    pub(crate) sessions: usize,
    pub(crate) names: usize,
}

/// Heap bytes of one tracked stream (its slot, LRU and session-list entries), of one session
/// (its map entry, state and id) and of one interned name. Calibrated on the counting
/// allocator of `tests/memory.rs` (`cargo test session::memory_usage -- --nocapture`): a stream
/// with a session of its own measures 370-390 bytes in 5 allocations, about 460 with the
/// allocator's own overhead per block, which `STREAM_BYTES + SESSION_BYTES` gives. A stream
/// that has subscribers also has a `watch` channel, about 300 bytes more.
pub(crate) const STREAM_BYTES: usize = 288;
pub(crate) const SESSION_BYTES: usize = 176;
pub(crate) const NAME_BYTES: usize = 96;

impl Counts {
    /// The registry's estimated heap size.
    pub(crate) fn estimated_bytes(&self) -> usize {
        self.streams * STREAM_BYTES + self.sessions * SESSION_BYTES + self.names * NAME_BYTES
    }
}

#[derive(Debug)]
pub(crate) struct Registry {
    max_streams: usize,
    idle_ttl: Option<Duration>,
    map: Mutex<Map>,
    /// Source of sequence numbers for every slot.
    pub(crate) sequence: AtomicU64,
    /// Coarse clock for activity marks (registry ms), advanced by the worker's tick and by
    /// every new request, so a frame reads it instead of the system clock.
    clock: AtomicU64,
    /// Start of the registry's clock: a Tokio instant (so tests can pause time) and the wall
    /// time it stands for (for the activity written to stores).
    epoch: tokio::time::Instant,
    epoch_wall: SystemTime,
    /// Slots whose latest id the worker must persist from here (their record was not handed
    /// over, or they were evicted unpersisted). A slot is in it at most once (its dirty flag
    /// guards it), so it is bounded by the number of slots.
    dirty: Mutex<Vec<Arc<Slot>>>,
    /// Sessions active since the last flush, each at most once (its mark guards it).
    active: Mutex<Vec<Arc<SessionState>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks leaves the data consistent before anything can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Registry {
    pub(crate) fn new(max_streams: usize, idle_ttl: Option<Duration>, max_names: usize) -> Self {
        let max_names = NonZeroUsize::new(max_names).unwrap_or(NonZeroUsize::MIN);
        Self {
            max_streams,
            idle_ttl,
            map: Mutex::new(Map {
                sessions: HashMap::new(),
                lru: LruCache::unbounded(),
                names: LruCache::new(max_names),
            }),
            sequence: AtomicU64::new(0),
            clock: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            epoch_wall: SystemTime::now(),
            dirty: Mutex::default(),
            active: Mutex::default(),
        }
    }

    /// Milliseconds since the registry was made, on Tokio's clock.
    pub(crate) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// The wall time of a registry time.
    pub(crate) fn wall_time(&self, ms: u64) -> SystemTime {
        self.epoch_wall + Duration::from_millis(ms)
    }

    /// Moves the coarse clock to `now_ms` (never backwards).
    pub(crate) fn advance_clock(&self, now_ms: u64) {
        self.clock.fetch_max(now_ms, Ordering::Relaxed);
    }

    /// Marks `session` active now: two atomic writes, and a push to the active list only the
    /// first time after a flush.
    pub(crate) fn mark_active(&self, session: &Arc<SessionState>) {
        session
            .last_active
            .store(self.clock.load(Ordering::Relaxed), Ordering::Relaxed);
        if !session.marked.load(Ordering::Relaxed) && !session.marked.swap(true, Ordering::AcqRel) {
            lock(&self.active).push(session.clone());
        }
    }

    /// Takes the sessions marked active since the last call; the caller unmarks them.
    pub(crate) fn take_active(&self) -> Vec<Arc<SessionState>> {
        std::mem::take(&mut *lock(&self.active))
    }

    /// Puts sessions whose activity write failed back in the active list.
    pub(crate) fn requeue_active(&self, sessions: Vec<Arc<SessionState>>) {
        let mut active = lock(&self.active);
        for session in sessions {
            if !session.marked.swap(true, Ordering::AcqRel) {
                active.push(session);
            }
        }
    }

    pub(crate) fn has_active(&self) -> bool {
        !lock(&self.active).is_empty()
    }

    /// Queues `slot` for the worker, which will persist its latest id at the next flush.
    pub(crate) fn mark_dirty(&self, slot: &Arc<Slot>) {
        if slot.set_dirty() {
            lock(&self.dirty).push(slot.clone());
        }
    }

    pub(crate) fn has_dirty(&self) -> bool {
        !lock(&self.dirty).is_empty()
    }

    /// Takes the dirty slots, clearing their flags.
    pub(crate) fn take_dirty(&self) -> Vec<Arc<Slot>> {
        let slots = std::mem::take(&mut *lock(&self.dirty));
        for slot in &slots {
            slot.clear_dirty();
        }
        slots
    }

    pub(crate) fn get(&self, session: &str, stream: &str) -> Option<Arc<Slot>> {
        let map = lock(&self.map);
        map.sessions
            .get(session)?
            .streams
            .iter()
            .find(|slot| slot.key.stream == stream)
            .cloned()
    }

    /// The slot of (`session`, `stream`), created when absent; marks the session active.
    /// Creating a slot in a full registry evicts the least recently used one, which is
    /// returned so the caller can count it.
    pub(crate) fn get_or_insert(
        &self,
        session: &SessionId,
        stream: &StreamName,
    ) -> (Arc<Slot>, Option<Arc<Slot>>) {
        self.advance_clock(self.now_ms());
        let mut guard = lock(&self.map);
        let map = &mut *guard;
        if let Some(entry) = map.sessions.get(session.as_str())
            && let Some(slot) = entry.streams.iter().find(|s| s.key.stream == *stream)
        {
            let slot = slot.clone();
            map.lru.promote(&(Arc::as_ptr(&slot) as usize));
            drop(guard);
            self.mark_active(slot.session());
            return (slot, None);
        }
        let evicted = if map.lru.len() >= self.max_streams {
            map.lru.pop_lru().map(|(_, old)| {
                map.unlink(&old);
                old
            })
        } else {
            None
        };
        // Interned name: one allocation per distinct name, however many streams use it.
        let stream = match map.names.get_key_value(stream.as_str()) {
            Some((name, ())) => name.clone(),
            None => {
                map.names.put(stream.clone(), ());
                stream.clone()
            }
        };
        let entry = map
            .sessions
            .entry(session.clone())
            .or_insert_with(|| SessionEntry {
                state: Arc::new(SessionState {
                    id: session.clone(),
                    last_active: AtomicU64::new(0),
                    marked: AtomicBool::new(false),
                }),
                streams: Vec::new(),
            });
        let state = entry.state.clone();
        let slot = Arc::new(Slot::new(
            StreamKey {
                session: state.id.clone(),
                stream,
            },
            state,
        ));
        entry.streams.push(slot.clone());
        map.lru.put(Arc::as_ptr(&slot) as usize, slot.clone());
        drop(guard);
        if let Some(old) = &evicted {
            self.evicted(old);
        }
        self.mark_active(slot.session());
        (slot, evicted)
    }

    /// Hands an evicted slot's unpersisted id to the worker.
    fn evicted(&self, slot: &Arc<Slot>) {
        if slot.unpersisted() {
            self.mark_dirty(slot);
        }
    }

    /// Evicts up to `budget` idle slots, looking at no more than `budget` of the least recently
    /// used ones (those found busy move to the front). Returns how many were evicted.
    pub(crate) fn sweep_idle(&self, now_ms: u64, budget: usize) -> usize {
        let Some(ttl) = self.idle_ttl else {
            return 0;
        };
        let ttl_ms = ttl.as_millis() as u64;
        let mut evicted = Vec::new();
        {
            let mut guard = lock(&self.map);
            let map = &mut *guard;
            for _ in 0..budget {
                let Some((&addr, slot)) = map.lru.peek_lru() else {
                    break;
                };
                if slot.is_idle(now_ms, ttl_ms) {
                    if let Some((_, slot)) = map.lru.pop_lru() {
                        map.unlink(&slot);
                        evicted.push(slot);
                    }
                } else {
                    map.lru.promote(&addr);
                }
            }
        }
        for slot in &evicted {
            self.evicted(slot);
        }
        evicted.len()
    }

    /// Every stream of `session` with its latest id, in the order they were first seen.
    pub(crate) fn session_streams(&self, session: &str) -> Vec<(StreamName, Option<EventId>)> {
        let map = lock(&self.map);
        map.sessions
            .get(session)
            .map(|entry| {
                entry
                    .streams
                    .iter()
                    .map(|slot| (slot.key.stream.clone(), slot.latest()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.map).lru.len()
    }

    pub(crate) fn counts(&self) -> Counts {
        let map = lock(&self.map);
        Counts {
            streams: map.lru.len(),
            sessions: map.sessions.len(),
            names: map.names.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(s: &str, n: &str) -> (SessionId, StreamName) {
        (SessionId::new(s).unwrap(), StreamName::new(n).unwrap())
    }

    #[test]
    fn streams_of_one_session_have_separate_slots() {
        let registry = Registry::new(10, None, 100);
        let (s, a) = key("s", "GET /a");
        let (_, b) = key("s", "GET /b");
        let slot_a = registry.get_or_insert(&s, &a).0;
        let slot_b = registry.get_or_insert(&s, &b).0;
        slot_a.publish(EventId::new("1").unwrap(), &registry);
        assert_eq!(registry.get("s", "GET /a").unwrap().latest().unwrap(), "1");
        assert_eq!(registry.get("s", "GET /b").unwrap().latest(), None);
        assert_eq!(
            slot_b
                .publish(EventId::new("x").unwrap(), &registry)
                .sequence,
            2
        );
        assert_eq!(registry.session_streams("s").len(), 2);
    }

    #[test]
    fn sequence_numbers_increase_per_key_and_never_repeat() {
        let registry = Registry::new(10, None, 100);
        let (s, a) = key("s", "GET /a");
        let (_, b) = key("s", "GET /b");
        let slot = registry.get_or_insert(&s, &a).0;
        let other = registry.get_or_insert(&s, &b).0;
        let mut seqs: Vec<u64> = (0..3)
            .map(|i| {
                slot.publish(EventId::new(&i.to_string()).unwrap(), &registry)
                    .sequence
            })
            .collect();
        seqs.push(
            other
                .publish(EventId::new("x").unwrap(), &registry)
                .sequence,
        );
        seqs.push(slot.publish(EventId::new("y").unwrap(), &registry).sequence);
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        let (id, version) = slot.latest_entry().unwrap();
        assert_eq!((id.as_str(), version.sequence), ("y", 5));
    }

    #[test]
    fn a_slot_is_queued_dirty_once_until_taken() {
        let registry = Registry::new(10, None, 100);
        let (s, a) = key("s", "GET /a");
        let slot = registry.get_or_insert(&s, &a).0;
        registry.mark_dirty(&slot);
        registry.mark_dirty(&slot);
        assert!(slot.is_dirty());
        assert_eq!(registry.take_dirty().len(), 1);
        assert!(!slot.is_dirty());
        assert!(registry.take_dirty().is_empty());
    }

    #[test]
    fn a_full_registry_evicts_the_least_recently_used_stream() {
        let registry = Registry::new(2, None, 100);
        let (s, a) = key("s", "GET /a");
        let (t, b) = key("t", "GET /b");
        let (u, c) = key("u", "GET /c");
        let slot_a = registry.get_or_insert(&s, &a).0;
        registry.get_or_insert(&t, &b);
        // Using A again makes B the least recently used.
        registry.get_or_insert(&s, &a);
        slot_a.publish(EventId::new("1").unwrap(), &registry);
        let (_, evicted) = registry.get_or_insert(&u, &c);
        assert_eq!(evicted.unwrap().key().stream, "GET /b");
        assert_eq!(registry.len(), 2);
        assert!(registry.get("t", "GET /b").is_none());
        assert_eq!(registry.counts().sessions, 2, "t had no other stream");
        // A's unpersisted id goes to the worker when A is evicted in turn.
        let (_, evicted) = registry.get_or_insert(&t, &b);
        assert!(Arc::ptr_eq(&evicted.unwrap(), &slot_a));
        assert_eq!(registry.take_dirty().len(), 1);
    }

    #[test]
    fn the_sweep_evicts_idle_slots_only_and_looks_at_a_bounded_number() {
        let registry = Registry::new(100, Some(Duration::from_secs(300)), 100);
        let (s, a) = key("s", "GET /a");
        let (t, b) = key("t", "GET /b");
        let busy = registry.get_or_insert(&s, &a).0;
        busy.body_opened();
        registry.get_or_insert(&t, &b);
        let now = registry.now_ms();
        assert_eq!(
            registry.sweep_idle(now, 10),
            0,
            "nothing is 5 minutes old yet"
        );
        let later = now + 300_000;
        assert_eq!(
            registry.sweep_idle(later, 1),
            0,
            "the first looked at is busy"
        );
        assert_eq!(registry.sweep_idle(later, 10), 1);
        assert!(registry.get("t", "GET /b").is_none());
        assert!(registry.get("s", "GET /a").is_some());
        busy.body_closed();
        assert_eq!(registry.sweep_idle(later, 10), 1);
        let counts = registry.counts();
        assert_eq!((counts.streams, counts.sessions), (0, 0));
        // Interned names stay, bounded by their own table.
        assert_eq!(counts.names, 2);
    }

    #[test]
    fn stream_names_are_interned_and_session_ids_shared() {
        let registry = Registry::new(100, None, 100);
        let slots: Vec<Arc<Slot>> = (0..3)
            .map(|i| {
                let (s, n) = key(&format!("s{i}"), "GET /mcp");
                registry.get_or_insert(&s, &n).0
            })
            .collect();
        let name = |slot: &Arc<Slot>| slot.key().stream.as_str().as_ptr();
        assert!(slots.iter().all(|s| name(s) == name(&slots[0])));
        let (s0, other) = key("s0", "GET /other");
        let more = registry.get_or_insert(&s0, &other).0;
        assert_eq!(
            more.key().session.as_str().as_ptr(),
            slots[0].key().session.as_str().as_ptr()
        );
        assert_eq!(registry.counts().names, 2);
    }

    #[test]
    fn activity_is_marked_once_per_flush() {
        let registry = Registry::new(10, None, 100);
        let (s, a) = key("s", "GET /a");
        let slot = registry.get_or_insert(&s, &a).0;
        for _ in 0..1000 {
            registry.mark_active(slot.session());
        }
        let active = registry.take_active();
        assert_eq!(active.len(), 1);
        active[0].unmark();
        registry.mark_active(slot.session());
        assert_eq!(registry.take_active().len(), 1);
    }
}
