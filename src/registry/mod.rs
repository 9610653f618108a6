//! The registry: one slot per tracked stream, found by (owner, stream), with its bounds.
//!
//! - [`slot`]: a stream's latest id with its version, and its subscribers;
//! - this module: the map of slots, its LRU and eviction, its clock, and admission of new
//!   streams;
//! - [`routes`]: the names of a route's concurrent streams, and which one a request addresses;
//! - [`handoff`]: how changed streams, evicted ones and active sessions reach the worker.
//!
//! A response body looks its slot up once, when the response starts, then publishes into it
//! (one uncontended lock, no allocation once the buffer has grown to the ids' size) and marks
//! its session active with atomic operations: the map is never touched per frame.
//!
//! Memory is bounded:
//! - at most `max_streams` slots. Slots with an open body ("live") are never evicted; the others
//!   sit in an LRU list, and a new stream in a full registry evicts the least recently used of
//!   them. When every slot is live, a new stream is refused (served untracked, and counted);
//! - slots idle for `idle_ttl` (no open body, no activity) are evicted by the worker's sweep,
//!   which looks at a bounded number of the least recently used slots per tick, never the whole
//!   map;
//! - strings are shared: all slots of a session share its id, and stream names are interned
//!   through a bounded LRU table, so thousands of streams on one path share one name;
//! - the hand-off's lists are bounded (see [`handoff`]).
//!
//! The map is two-level, session then stream, because a session has few streams, callers ask
//! for all the streams of one session, and look-ups by `&str` need no allocation.

pub(crate) mod handoff;
pub(crate) mod routes;
pub(crate) use routes::route_of;
pub(crate) mod slot;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use lru::LruCache;
use metrics::Counter;

use crate::key::{EventId, Owner, StreamKey, StreamName};
use crate::sync::lock;
pub(crate) use handoff::LogQueue;
use handoff::{Handoff, HandoffMetrics};
use routes::{LostRoutes, MAX_LOST_OWNERS};
pub(crate) use slot::{SessionState, Slot, Version};

#[derive(Debug)]
struct SessionEntry {
    state: Arc<SessionState>,
    streams: Vec<Arc<Slot>>,
}

impl SessionEntry {
    fn new(owner: &Owner) -> Self {
        Self {
            state: Arc::new(SessionState::new(Some(owner.clone()))),
            // Most owners have one stream.
            streams: Vec::with_capacity(1),
        }
    }
}

#[derive(Debug)]
struct Map {
    /// Streams with an owner: an owner has few streams, and callers list them.
    sessions: HashMap<Owner, SessionEntry>,
    /// Sessionless streams, which can be many: by name.
    unowned: HashMap<StreamName, Arc<Slot>>,
    /// Owners that lost one of several streams of a route to eviction, and those routes
    /// (rare: kept apart from the entries, so that an entry costs nothing for it; kept after
    /// the owner's entry goes, since the owner's clients may come back). At most
    /// [`MAX_LOST_OWNERS`].
    lost: LruCache<Owner, LostRoutes>,
    /// Every slot without an open body, least recently used first; keyed by the slot's address
    /// (unique while the list holds the slot). Live slots are counted in `live` instead.
    lru: LruCache<usize, Arc<Slot>>,
    live: usize,
    /// Interned stream names.
    names: LruCache<StreamName, ()>,
    /// The highest sequence of any evicted slot: a slot made after it starts above it.
    sequence_floor: u64,
}

impl Map {
    fn streams(&self) -> usize {
        self.lru.len() + self.live
    }

    /// Removes `slot` from its owner's entry (and the entry when it was the last stream).
    fn unlink(&mut self, slot: &Arc<Slot>) {
        let Some(owner) = &slot.key.owner else {
            if self
                .unowned
                .get(slot.key.stream.as_str())
                .is_some_and(|s| Arc::ptr_eq(s, slot))
            {
                self.unowned.remove(slot.key.stream.as_str());
            }
            slot.session.resident.store(false, Ordering::Relaxed);
            return;
        };
        if let Some(entry) = self.sessions.get_mut(owner.as_str()) {
            entry.streams.retain(|s| !Arc::ptr_eq(s, slot));
            // One of several streams of its route: a second one exists, or this one is one.
            let route = route_of(&slot.key.stream);
            let one_of_several = route != slot.key.stream.as_str()
                || entry
                    .streams
                    .iter()
                    .any(|s| route_of(&s.key.stream) == route);
            if entry.streams.is_empty() {
                entry.state.resident.store(false, Ordering::Relaxed);
                self.sessions.remove(owner.as_str());
            }
            if one_of_several {
                self.lost_one_of_several(owner, &slot.key.stream);
            }
        }
    }

    fn lost_one_of_several(&mut self, owner: &Owner, name: &StreamName) {
        match self.lost.get_mut(owner.as_str()) {
            Some(lost) => lost.add(name),
            None => {
                let mut lost = LostRoutes::default();
                lost.add(name);
                self.lost.put(owner.clone(), lost);
                if self.lost.len() > MAX_LOST_OWNERS {
                    self.lost.pop_lru();
                }
            }
        }
    }

    fn find(&self, owner: Option<&str>, stream: &str) -> Option<&Arc<Slot>> {
        match owner {
            None => self.unowned.get(stream),
            Some(owner) => self
                .sessions
                .get(owner)?
                .streams
                .iter()
                .find(|slot| slot.key.stream == stream),
        }
    }

    /// Takes `slot` out of the map for good.
    fn evict(&mut self, slot: &Arc<Slot>) {
        self.unlink(slot);
        slot.evicted.store(true, Ordering::Release);
        self.sequence_floor = self.sequence_floor.max(slot.sequence());
    }
}

/// Sizes of the registry, for the memory gauge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub(crate) streams: usize,
    pub(crate) live: usize,
    pub(crate) sessions: usize,
    pub(crate) names: usize,
    pub(crate) evicted_pending: usize,
    /// Owners remembered losing one of several streams of a route.
    pub(crate) lost_owners: usize,
}

/// Heap bytes of one tracked stream (its slot, id buffer, LRU and session-list entries), of one
/// session (its map entry, state and id) and of one interned name, as the counting allocator of
/// `tests/memory.rs` sees them (the sizes asked for, without the allocator's own overhead per
/// block): a stream with a session of its own measures 375 to 396 bytes there (`cargo test
/// session::memory_usage -- --nocapture`, which asserts the gauge within 10 %); the split
/// between the stream and its session follows the sizes of their parts. A stream that has
/// subscribers also has a `watch` channel, about 350 bytes more (with its holder, which a stream with a replay log has too).
pub(crate) const STREAM_BYTES: usize = 250;
pub(crate) const SESSION_BYTES: usize = 135;
pub(crate) const NAME_BYTES: usize = 96;
/// Heap bytes of one owner remembered losing streams (its LRU entry and one route name);
/// estimated from the sizes of its parts, as few registries hold any.
pub(crate) const LOST_OWNER_BYTES: usize = 160;

impl Counts {
    /// The registry's estimated heap size.
    pub(crate) fn estimated_bytes(&self) -> usize {
        (self.streams + self.evicted_pending) * STREAM_BYTES
            + self.sessions * SESSION_BYTES
            + self.names * NAME_BYTES
            + self.lost_owners * LOST_OWNER_BYTES
    }
}

/// Why a stream could not get a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `max_streams` streams, every one with an open body.
    Full,
    /// Asked for with [`Open::Exclusive`], and a body streams into it already.
    Busy,
}

impl Refused {
    /// Why a stream refused a slot is left untracked, for logs.
    pub(crate) fn explain(self) -> &'static str {
        match self {
            Refused::Full => "every tracked stream has an open body (max_streams)",
            Refused::Busy => "too many concurrent responses on this route for one owner",
        }
    }
}

/// How [`Registry::get_or_insert`] opens a slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Open {
    /// No body (a subscription).
    No,
    /// For a body, sharing the slot with bodies already open on it.
    Shared,
    /// For a body, only when no other body streams into the slot.
    Exclusive,
}

/// The registry's counters.
#[derive(Debug, Clone)]
pub(crate) struct RegistryMetrics {
    /// Streams evicted as the least recently used to make room for a new one.
    pub(crate) evicted_lru: Counter,
    pub(crate) handoff: HandoffMetrics,
}

impl RegistryMetrics {
    #[cfg(test)]
    pub(crate) fn noop() -> Self {
        Self {
            evicted_lru: Counter::noop(),
            handoff: HandoffMetrics::noop(),
        }
    }
}

/// The registry's bounds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_streams: usize,
    pub(crate) idle_ttl: Option<Duration>,
    pub(crate) max_names: usize,
    pub(crate) max_pending_evicted: usize,
}

impl Limits {
    /// The most entries a list of slots or sessions the worker drains can hold with resident
    /// entries only: every stream, and every evicted one waiting for a write (saturating, for
    /// settings that mean "no bound").
    pub(crate) fn list_bound(&self) -> usize {
        self.max_streams.saturating_add(self.max_pending_evicted)
    }
}

#[derive(Debug)]
pub(crate) struct Registry {
    limits: Limits,
    metrics: RegistryMetrics,
    map: Mutex<Map>,
    /// Coarse clock for activity marks and versions (registry µs), advanced by the worker's
    /// tick and by every new request, so a frame reads it instead of the system clock.
    clock: AtomicU64,
    /// Start of the registry's clock: a Tokio instant (so tests can pause time) and the wall
    /// time it stands for (for the times written to stores).
    epoch: tokio::time::Instant,
    epoch_wall: SystemTime,
    /// Everything on its way to the worker.
    handoff: Handoff,
}

/// The owner of a state made for an owner (shares its allocation).
fn owner_of(state: &SessionState) -> Owner {
    state.id.clone().expect("an owner's state has an owner")
}

impl Registry {
    /// A registry whose hand-off's channel holds `capacity` slots.
    pub(crate) fn new(limits: Limits, metrics: RegistryMetrics, capacity: usize) -> Self {
        let handoff = Handoff::new(capacity, &limits, metrics.handoff.clone());
        Self {
            limits,
            metrics,
            map: Mutex::new(Map {
                sessions: HashMap::new(),
                unowned: HashMap::new(),
                lost: LruCache::unbounded(),
                lru: LruCache::unbounded(),
                live: 0,
                // Bounded in `get_or_insert`, not by the cache, which would allocate its
                // whole table up front.
                names: LruCache::unbounded(),
                sequence_floor: 0,
            }),
            clock: AtomicU64::new(0),
            epoch: tokio::time::Instant::now(),
            epoch_wall: SystemTime::now(),
            handoff,
        }
    }

    /// Everything on its way to the worker.
    pub(crate) fn handoff(&self) -> &Handoff {
        &self.handoff
    }

    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Microseconds since the registry was made, on Tokio's clock.
    pub(crate) fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The coarse clock: the last `now_us` the worker or a request saw.
    #[inline]
    pub(crate) fn coarse_us(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// The wall time of a registry time.
    pub(crate) fn wall_time(&self, us: u64) -> SystemTime {
        self.epoch_wall + Duration::from_micros(us)
    }

    /// Moves the coarse clock to `now_us` (never backwards).
    pub(crate) fn advance_clock(&self, now_us: u64) {
        self.clock.fetch_max(now_us, Ordering::Relaxed);
    }

    /// Marks `session` active now: an atomic load and store, and a push to the active list
    /// only the first time after a flush (never for a sessionless stream, whose activity is
    /// not written).
    #[inline]
    pub(crate) fn mark_active(&self, session: &Arc<SessionState>) {
        let now = self.clock.load(Ordering::Relaxed);
        if session.last_active.load(Ordering::Relaxed) != now {
            session.last_active.store(now, Ordering::Relaxed);
        }
        if session.id.is_some()
            && !session.marked.load(Ordering::Relaxed)
            && !session.marked.swap(true, Ordering::AcqRel)
        {
            self.handoff.push_active(session.clone());
        }
    }

    pub(crate) fn get(&self, owner: Option<&str>, stream: &str) -> Option<Arc<Slot>> {
        lock(&self.map).find(owner, stream).cloned()
    }

    /// The slot of a key in the registry, else an evicted one still waiting for its write:
    /// the id in memory that the store may not have.
    pub(crate) fn get_or_evicted(&self, owner: Option<&str>, stream: &str) -> Option<Arc<Slot>> {
        let resident = self.get(owner, stream);
        match resident {
            Some(slot) if slot.latest().is_some() => Some(slot),
            other => self.handoff.evicted_entry(owner, stream).or(other),
        }
    }

    /// The slot of (`owner`, `stream`), created when absent; marks its owner active. With a
    /// body ([`Open::Shared`], [`Open::Exclusive`]) the slot becomes live (the caller must call
    /// [`body_closed`](Self::body_closed) when the body goes). Creating a slot in a full
    /// registry evicts the least recently used slot that is not live (counted and logged here;
    /// returned too); when every slot is live, nothing is created.
    pub(crate) fn get_or_insert(
        &self,
        owner: Option<&Owner>,
        stream: &StreamName,
        open: Open,
    ) -> Result<(Arc<Slot>, Option<Arc<Slot>>), Refused> {
        self.advance_clock(self.now_us());
        let mut guard = lock(&self.map);
        let map = &mut *guard;
        if let Some(slot) = map.find(owner.map(Owner::as_str), stream.as_str()) {
            let slot = slot.clone();
            let addr = Arc::as_ptr(&slot) as usize;
            match open {
                Open::No => {
                    map.lru.promote(&addr);
                }
                Open::Exclusive if slot.is_live() => return Err(Refused::Busy),
                Open::Shared | Open::Exclusive => {
                    if slot.open.fetch_add(1, Ordering::Relaxed) == 0 {
                        map.lru.pop(&addr);
                        map.live += 1;
                    }
                }
            }
            drop(guard);
            self.mark_active(slot.session());
            return Ok((slot, None));
        }
        let evicted = if map.streams() >= self.limits.max_streams {
            let Some((_, old)) = map.lru.pop_lru() else {
                return Err(Refused::Full);
            };
            map.evict(&old);
            // Into the FIFO before the map's lock is released: a stream is never in neither.
            self.handoff.evicted(old.clone());
            Some(old)
        } else {
            None
        };
        // Interned name: one allocation per distinct name, however many streams use it.
        let stream = match map.names.get_key_value(stream.as_str()) {
            Some((name, ())) => name.clone(),
            None => {
                map.names.put(stream.clone(), ());
                if map.names.len() > self.limits.max_names.max(1) {
                    map.names.pop_lru();
                }
                stream.clone()
            }
        };
        let floor = map.sequence_floor;
        let slot = match owner {
            None => {
                let slot = Arc::new(Slot::new(
                    StreamKey::unowned(stream.clone()),
                    Arc::new(SessionState::new(None)),
                    floor,
                ));
                map.unowned.insert(stream, slot.clone());
                slot
            }
            Some(owner) => {
                let entry = map
                    .sessions
                    .entry(owner.clone())
                    .or_insert_with(|| SessionEntry::new(owner));
                let state = entry.state.clone();
                let key = StreamKey::new(owner_of(&state), stream);
                let slot = Arc::new(Slot::new(key, state, floor));
                entry.streams.push(slot.clone());
                slot
            }
        };
        if open != Open::No {
            slot.open.store(1, Ordering::Relaxed);
            map.live += 1;
        } else {
            map.lru.put(Arc::as_ptr(&slot) as usize, slot.clone());
        }
        drop(guard);
        if let Some(old) = &evicted {
            self.metrics.evicted_lru.increment(1);
            tracing::debug!(
                evicted = %old.key(),
                "registry full: evicted the least recently used stream"
            );
        }
        self.mark_active(slot.session());
        Ok((slot, evicted))
    }

    /// A body of `slot` went away; the last one makes the slot evictable again (most recently
    /// used).
    pub(crate) fn body_closed(&self, slot: &Arc<Slot>) {
        let mut map = lock(&self.map);
        if slot.open.fetch_sub(1, Ordering::Relaxed) == 1 {
            map.live -= 1;
            map.lru.put(Arc::as_ptr(slot) as usize, slot.clone());
        }
    }

    /// Evicts up to `budget` idle slots, looking at no more than `budget` of the least recently
    /// used ones (those found busy move to the front). Returns how many were evicted.
    pub(crate) fn sweep_idle(&self, now_us: u64, budget: usize) -> usize {
        let Some(ttl) = self.limits.idle_ttl else {
            return 0;
        };
        let ttl_us = ttl.as_micros() as u64;
        let mut evicted = 0;
        {
            let mut guard = lock(&self.map);
            let map = &mut *guard;
            for _ in 0..budget {
                let Some((&addr, slot)) = map.lru.peek_lru() else {
                    break;
                };
                if slot.is_idle(now_us, ttl_us) {
                    if let Some((_, slot)) = map.lru.pop_lru() {
                        map.evict(&slot);
                        // Into the FIFO under the map's lock, as in `get_or_insert`.
                        self.handoff.evicted(slot);
                        evicted += 1;
                    }
                } else {
                    map.lru.promote(&addr);
                }
            }
        }
        evicted
    }

    /// Every stream of `owner` with its latest id, in the order they were first seen.
    pub(crate) fn owner_streams(&self, owner: &str) -> Vec<(StreamName, Option<EventId>)> {
        let map = lock(&self.map);
        map.sessions
            .get(owner)
            .map(|entry| {
                entry
                    .streams
                    .iter()
                    .map(|slot| (slot.key.stream.clone(), slot.latest()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every slot in the registry, then every evicted slot still waiting for a write.
    pub(crate) fn all_slots(&self) -> Vec<Arc<Slot>> {
        let mut slots: Vec<Arc<Slot>> = {
            let map = lock(&self.map);
            map.sessions
                .values()
                .flat_map(|entry| entry.streams.iter().cloned())
                .chain(map.unowned.values().cloned())
                .collect()
        };
        slots.extend(self.handoff.evicted_slots());
        slots
    }

    pub(crate) fn len(&self) -> usize {
        lock(&self.map).streams()
    }

    pub(crate) fn counts(&self) -> Counts {
        let evicted_pending = self.handoff.evicted_pending_len();
        let map = lock(&self.map);
        Counts {
            streams: map.streams(),
            live: map.live,
            sessions: map.sessions.len() + map.unowned.len(),
            names: map.names.len(),
            evicted_pending,
            lost_owners: map.lost.len(),
        }
    }
}

#[cfg(test)]
impl Registry {
    /// A registry for unit tests: no metrics, and a hand-off channel of one slot that nobody
    /// reads (a second offer finds it full).
    pub(crate) fn for_tests(
        max_streams: usize,
        idle_ttl: Option<Duration>,
        max_pending_evicted: usize,
    ) -> Self {
        let limits = Limits {
            max_streams,
            idle_ttl,
            max_names: 100,
            max_pending_evicted,
        };
        Self::new(limits, RegistryMetrics::noop(), 1)
    }
}

#[cfg(test)]
mod tests {
    use super::handoff::Offered;
    use super::slot::IdBytes;
    use super::*;

    fn key(s: &str, n: &str) -> (Owner, StreamName) {
        (Owner::new(s).unwrap(), StreamName::new(n).unwrap())
    }

    fn registry(max_streams: usize, idle_ttl: Option<Duration>) -> Registry {
        Registry::for_tests(max_streams, idle_ttl, 2)
    }

    fn insert(r: &Registry, s: &str, n: &str, open: bool) -> Arc<Slot> {
        let (s, n) = key(s, n);
        let open = if open { Open::Shared } else { Open::No };
        r.get_or_insert(Some(&s), &n, open).unwrap().0
    }

    /// The route's stream `n` of `owner`, opened for a body.
    fn open_nth(registry: &Registry, owner: &str, route: &StreamName) -> Arc<Slot> {
        let owner = Owner::new(owner).unwrap();
        registry
            .open_route(Some(&owner), route, false, None)
            .unwrap()
            .0
    }

    /// Failed on `ecccf3c`: the lowest index was named, though either stream could be the
    /// client's.
    #[test]
    fn an_id_that_is_the_latest_of_two_closed_streams_names_neither() {
        let registry = registry(10, None);
        let route = StreamName::new("GET /e").unwrap();
        let first = open_nth(&registry, "s", &route);
        let second = open_nth(&registry, "s", &route);
        assert_eq!(second.key.stream, "GET /e #2");
        // Each connection counts its own ids.
        first.publish(b"5", 1);
        second.publish(b"5", 1);
        registry.body_closed(&first);
        registry.body_closed(&second);
        assert_eq!(registry.address_route("s", &route, Some("5")), None);
        // One of them moves on: the id names the other one alone.
        let again = registry
            .get_or_insert(Some(&first.key.owner.clone().unwrap()), &route, Open::No)
            .unwrap()
            .0;
        again.publish(b"6", 2);
        assert_eq!(
            registry.address_route("s", &route, Some("5")),
            Some(StreamName::new("GET /e #2").unwrap())
        );
    }

    /// Failed on `ecccf3c`: the client's own stream `#2` was evicted, and the owner's only
    /// closed stream, another client's, was named instead.
    #[test]
    fn a_client_whose_stream_was_evicted_is_never_given_another_clients_stream() {
        let registry = registry(2, None);
        let route = StreamName::new("GET /e").unwrap();
        let theirs = open_nth(&registry, "s", &route);
        let mine = open_nth(&registry, "s", &route);
        theirs.publish(b"y3", 1);
        mine.publish(b"x5", 1);
        // Mine closes first, so it is the least recently used.
        registry.body_closed(&mine);
        registry.body_closed(&theirs);
        insert(&registry, "t", "GET /other", false);
        assert!(mine.is_evicted() && !theirs.is_evicted());
        // Its id waits for the store: the registry still knows it is `#2`'s.
        assert_eq!(
            registry.address_route("s", &route, Some("x5")),
            Some(StreamName::new("GET /e #2").unwrap())
        );
        // Once written, nothing here says which stream `x5` was: no key, rather than `#1`.
        mine.marks().set_persisted(u64::MAX);
        assert!(registry.handoff().evicted_owed().is_empty());
        assert_eq!(registry.address_route("s", &route, Some("x5")), None);
        // The other client still finds its own stream, behind or not.
        assert_eq!(
            registry.address_route("s", &route, Some("y3")),
            Some(route.clone())
        );
    }

    /// From review: an evicted stream's id names its stream only while no other client holds
    /// that name again, and an owner that lost one of several streams is in doubt even after
    /// its entry went and came back.
    #[test]
    fn an_evicted_stream_names_the_client_only_while_nobody_holds_its_name_again() {
        let registry = registry(3, None);
        let route = StreamName::new("GET /e").unwrap();
        let c = open_nth(&registry, "s", &route);
        let a = open_nth(&registry, "s", &route);
        c.publish(b"c1", 1);
        a.publish(b"x5", 1);
        registry.body_closed(&a);
        insert(&registry, "t", "GET /other", false);
        insert(&registry, "u", "GET /other", false);
        assert!(a.is_evicted() && !c.is_evicted());
        // B opens a response: it gets `#2` again, and publishes there.
        let b = open_nth(&registry, "s", &route);
        assert_eq!(b.key.stream, "GET /e #2");
        b.publish(b"b1", 2);
        registry.body_closed(&b);
        // A comes back with its id: `#2` is B's now, and A's own stream is gone.
        assert_eq!(registry.address_route("s", &route, Some("x5")), None);
        assert_eq!(
            registry.address_route("s", &route, Some("b1")),
            Some(StreamName::new("GET /e #2").unwrap())
        );
    }

    #[test]
    fn an_owner_that_lost_one_of_several_streams_stays_in_doubt_after_its_entry_went() {
        let registry = registry(2, None);
        let route = StreamName::new("GET /e").unwrap();
        let b = open_nth(&registry, "s", &route);
        let a = open_nth(&registry, "s", &route);
        b.publish(b"y3", 1);
        a.publish(b"x5", 1);
        registry.body_closed(&a);
        registry.body_closed(&b);
        // Both evicted (and written): the owner's entry goes.
        insert(&registry, "t", "GET /other", false);
        insert(&registry, "u", "GET /other", false);
        a.marks().set_persisted(u64::MAX);
        b.marks().set_persisted(u64::MAX);
        assert!(registry.owner_streams("s").is_empty());
        // B comes back and closes; A's reconnect must not be given B's stream.
        let again = open_nth(&registry, "s", &route);
        again.publish(b"y4", 2);
        registry.body_closed(&again);
        assert_eq!(registry.address_route("s", &route, Some("x5")), None);
        assert_eq!(
            registry.address_route("s", &route, Some("y4")),
            Some(route.clone())
        );
    }

    /// An owner with one stream per route (an MCP session) is never in doubt: after its
    /// stream was evicted (idle), a reconnect behind or current still gets the route.
    #[test]
    fn an_owner_with_one_stream_gets_its_route_back_after_eviction() {
        let registry = registry(1, None);
        let route = StreamName::new("GET /mcp").unwrap();
        let mine = open_nth(&registry, "s", &route);
        mine.publish(b"7", 1);
        registry.body_closed(&mine);
        insert(&registry, "t", "GET /mcp", false);
        mine.marks().set_persisted(u64::MAX);
        assert!(mine.is_evicted());
        assert_eq!(
            registry.address_route("s", &route, Some("5")),
            Some(route.clone())
        );
        let again = open_nth(&registry, "s", &route);
        again.publish(b"8", 2);
        registry.body_closed(&again);
        assert_eq!(
            registry.address_route("s", &route, Some("7")),
            Some(route.clone()),
            "behind its own stream, the only one"
        );
    }

    /// Failed on `ecccf3c` (a deadlock): a body published while holding the slot's lock and
    /// waited there for the `watch`, which a subscriber's `borrow()` held while it asked for
    /// the latest id, which needs the slot's lock.
    #[test]
    fn a_subscriber_holding_a_borrow_can_read_the_latest_id_while_a_body_publishes() {
        let registry = registry(10, None);
        let slot = insert(&registry, "s", "GET /a", false);
        let rx = slot.subscribe();
        let borrowed = rx.borrow();
        let publisher = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                slot.publish(b"1", 1);
            })
        };
        // Time for the publisher to reach the watch, which waits for the borrow to end.
        std::thread::sleep(Duration::from_millis(200));
        let (tx, done) = std::sync::mpsc::channel();
        let reader = {
            let slot = slot.clone();
            std::thread::spawn(move || {
                let _ = tx.send(slot.latest());
            })
        };
        let read = done.recv_timeout(Duration::from_secs(5));
        drop(borrowed);
        publisher.join().unwrap();
        reader.join().unwrap();
        assert!(read.is_ok(), "reading the latest id waited for the borrow");
        assert_eq!(*rx.borrow(), Some(EventId::new("1").unwrap()));
    }

    #[test]
    fn streams_of_one_session_have_separate_slots() {
        let registry = registry(10, None);
        let slot_a = insert(&registry, "s", "GET /a", false);
        let slot_b = insert(&registry, "s", "GET /b", false);
        slot_a.publish(b"1", 0);
        assert_eq!(
            registry.get(Some("s"), "GET /a").unwrap().latest().unwrap(),
            "1"
        );
        assert_eq!(registry.get(Some("s"), "GET /b").unwrap().latest(), None);
        assert_eq!(slot_b.publish(b"x", 0).0.sequence, 1);
        assert_eq!(registry.owner_streams("s").len(), 2);
    }

    #[test]
    fn sequence_numbers_grow_per_key_and_a_remade_slot_starts_above_the_evicted_one() {
        let registry = registry(1, None);
        let slot = insert(&registry, "s", "GET /a", false);
        let seqs: Vec<u64> = [b"1", b"2", b"3"]
            .iter()
            .map(|id| slot.publish(*id, 0).0.sequence)
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        let (id, version) = slot.latest_entry().unwrap();
        assert_eq!((id.as_str(), version.sequence), ("3", 3));
        // Evict it (registry of one), then make the key again: its sequence continues above.
        insert(&registry, "t", "GET /b", false);
        assert!(slot.is_evicted());
        let again = insert(&registry, "s", "GET /a", false);
        assert_eq!(again.publish(b"4", 0).0.sequence, 4);
    }

    #[test]
    fn publishing_keeps_short_ids_inline_and_reuses_the_heap_buffer_of_long_ones() {
        let registry = registry(10, None);
        let slot = insert(&registry, "s", "GET /a", false);
        slot.publish(b"12/345", 5);
        assert!(matches!(lock(&slot.latest).id, IdBytes::Inline { .. }));
        assert_eq!(slot.latest().unwrap(), "12/345");
        slot.publish(b"0123456789-0123456789-0123456789", 6);
        let ptr = lock(&slot.latest).id.as_slice().as_ptr();
        slot.publish(b"short", 3);
        assert_eq!(lock(&slot.latest).id.as_slice().as_ptr(), ptr);
        let (id, version) = slot.latest_entry().unwrap();
        assert_eq!(id, "short");
        assert_eq!(version.at_us, 6, "time never goes back within a slot");
    }

    #[test]
    fn a_full_registry_evicts_the_least_recently_used_idle_stream() {
        let registry = registry(2, None);
        let slot_a = insert(&registry, "s", "GET /a", false);
        insert(&registry, "t", "GET /b", false);
        // Using A again makes B the least recently used.
        insert(&registry, "s", "GET /a", false);
        slot_a.publish(b"1", 0);
        let (u, c) = key("u", "GET /c");
        let (_, evicted) = registry.get_or_insert(Some(&u), &c, Open::No).unwrap();
        assert_eq!(evicted.unwrap().key().stream, "GET /b");
        assert_eq!(registry.len(), 2);
        assert!(registry.get(Some("t"), "GET /b").is_none());
        assert_eq!(registry.counts().sessions, 2, "t had no other stream");
        // A's unpersisted id waits in the evicted FIFO when A is evicted in turn.
        let (t, b) = key("t", "GET /b");
        let (_, evicted) = registry.get_or_insert(Some(&t), &b, Open::No).unwrap();
        assert!(Arc::ptr_eq(&evicted.unwrap(), &slot_a));
        assert_eq!(registry.handoff().evicted_pending_len(), 1);
    }

    #[test]
    fn live_streams_are_never_evicted_and_a_registry_full_of_them_refuses() {
        let registry = registry(2, None);
        let a = insert(&registry, "s", "GET /a", true);
        let b = insert(&registry, "t", "GET /b", true);
        let (u, c) = key("u", "GET /c");
        assert_eq!(
            registry
                .get_or_insert(Some(&u), &c, Open::Shared)
                .unwrap_err(),
            Refused::Full
        );
        assert_eq!(registry.len(), 2);
        // A second body on a live slot shares it; closing one keeps it live.
        let (s, n) = key("s", "GET /a");
        assert_eq!(
            registry
                .get_or_insert(Some(&s), &n, Open::Exclusive)
                .unwrap_err(),
            Refused::Busy,
            "an exclusive open refuses a live slot"
        );
        let (again, _) = registry.get_or_insert(Some(&s), &n, Open::Shared).unwrap();
        assert!(Arc::ptr_eq(&again, &a));
        registry.body_closed(&a);
        assert!(registry.get_or_insert(Some(&u), &c, Open::Shared).is_err());
        registry.body_closed(&a);
        // A is evictable now; B is still live.
        let (slot, evicted) = registry.get_or_insert(Some(&u), &c, Open::No).unwrap();
        assert!(Arc::ptr_eq(&evicted.unwrap(), &a));
        assert!(!b.is_evicted());
        assert_eq!(registry.counts().live, 1);
        assert!(!slot.is_evicted());
    }

    #[test]
    fn the_evicted_fifo_is_bounded_and_counts_what_it_drops() {
        let registry = registry(1, None);
        for i in 0..5 {
            let slot = insert(&registry, &format!("s{i}"), "GET /a", false);
            slot.publish(b"1", 0);
        }
        // Four evicted, unpersisted; the FIFO keeps two.
        assert_eq!(registry.handoff().evicted_pending_len(), 2);
        assert_eq!(registry.handoff().dropped(), 2);
        // Persisted ones leave it.
        let owed = registry.handoff().evicted_owed();
        assert_eq!(owed.len(), 2);
        owed[0].marks().set_persisted(u64::MAX);
        assert_eq!(registry.handoff().evicted_owed().len(), 1);
        assert_eq!(registry.handoff().evicted_pending_len(), 1);
    }

    #[test]
    fn the_sweep_evicts_idle_slots_only_and_looks_at_a_bounded_number() {
        let registry = registry(100, Some(Duration::from_secs(300)));
        let busy = insert(&registry, "s", "GET /a", true);
        insert(&registry, "t", "GET /b", false);
        let now = registry.now_us();
        assert_eq!(
            registry.sweep_idle(now, 10),
            0,
            "nothing is 5 minutes old yet"
        );
        let later = now + 300_000_000;
        assert_eq!(registry.sweep_idle(later, 10), 1);
        assert!(registry.get(Some("t"), "GET /b").is_none());
        assert!(
            registry.get(Some("s"), "GET /a").is_some(),
            "a live slot stays"
        );
        registry.body_closed(&busy);
        assert_eq!(registry.sweep_idle(later, 10), 1);
        let counts = registry.counts();
        assert_eq!((counts.streams, counts.sessions), (0, 0));
        // Interned names stay, bounded by their own table.
        assert_eq!(counts.names, 2);
    }

    #[test]
    fn stream_names_are_interned_and_session_ids_shared() {
        let registry = registry(100, None);
        let slots: Vec<Arc<Slot>> = (0..3)
            .map(|i| insert(&registry, &format!("s{i}"), "GET /mcp", false))
            .collect();
        let name = |slot: &Arc<Slot>| slot.key().stream.as_str().as_ptr();
        assert!(slots.iter().all(|s| name(s) == name(&slots[0])));
        let more = insert(&registry, "s0", "GET /other", false);
        assert_eq!(
            more.key().owner.as_ref().unwrap().as_str().as_ptr(),
            slots[0].key().owner.as_ref().unwrap().as_str().as_ptr()
        );
        assert_eq!(registry.counts().names, 2);
    }

    #[test]
    fn activity_is_marked_once_per_flush() {
        let registry = registry(10, None);
        let slot = insert(&registry, "s", "GET /a", false);
        registry.handoff().take_active();
        slot.session().unmark();
        for _ in 0..1000 {
            registry.mark_active(slot.session());
        }
        let active = registry.handoff().take_active();
        assert_eq!(active.len(), 1);
        active[0].unmark();
        registry.mark_active(slot.session());
        assert_eq!(registry.handoff().take_active().len(), 1);
    }

    #[test]
    fn a_slot_is_handed_to_the_worker_once_until_the_worker_takes_it() {
        let registry = registry(10, None);
        let slot = insert(&registry, "s", "GET /a", false);
        assert!(slot.publish(b"1", 0).1, "the first id hands the slot over");
        assert!(
            !slot.publish(b"2", 0).1,
            "later ones do not, until the worker reads"
        );
        assert!(!slot.mark_queued());
        assert_eq!(slot.take_latest().unwrap().0, "2");
        assert!(slot.publish(b"3", 0).1);
    }

    #[test]
    fn after_close_nothing_is_queued_and_evicted_ids_count_as_dropped() {
        let registry = registry(2, None);
        let first = insert(&registry, "s", "GET /a", false);
        let slot = insert(&registry, "s", "GET /b", false);
        // The channel (of one) is full, then the worker stops: the hand-off says so, and
        // queues nothing more anywhere.
        assert_eq!(registry.handoff().offer(first), Offered::Sent);
        registry.handoff().close();
        slot.publish(b"1", 0);
        assert_eq!(registry.handoff().offer(slot.clone()), Offered::Closed);
        assert!(
            !registry.handoff().has_dirty(),
            "nothing queued after close"
        );
        registry.handoff().take_active();
        slot.session().unmark();
        registry.mark_active(slot.session());
        assert!(registry.handoff().take_active().is_empty());
        insert(&registry, "t", "GET /c", false);
        insert(&registry, "u", "GET /d", false);
        assert_eq!(registry.handoff().dropped(), 1);
        assert_eq!(registry.handoff().evicted_pending_len(), 0);
    }

    /// A slot offered while the worker's channel is full goes to the dirty list at once, so
    /// that the worker learns of it whether or not its body is polled again.
    #[test]
    fn an_offer_that_finds_the_channel_full_goes_to_the_dirty_list() {
        let registry = registry(10, None);
        let a = insert(&registry, "s", "GET /a", false);
        let b = insert(&registry, "s", "GET /b", false);
        assert_eq!(registry.handoff().offer(a), Offered::Sent);
        assert_eq!(registry.handoff().queued(), 1);
        assert!(!registry.handoff().has_dirty());
        assert_eq!(registry.handoff().offer(b.clone()), Offered::Full);
        let dirty = registry.handoff().take_dirty();
        assert_eq!(dirty.len(), 1);
        assert!(Arc::ptr_eq(&dirty[0], &b));
    }
}

#[cfg(test)]
mod unowned_tests {
    use super::*;

    #[test]
    fn sessionless_streams_are_kept_apart_by_name_and_write_no_activity() {
        let registry = Registry::for_tests(10, None, 10);
        let a = StreamName::new("stream-a").unwrap();
        let b = StreamName::new("stream-b").unwrap();
        let slot_a = registry.get_or_insert(None, &a, Open::Shared).unwrap().0;
        let slot_b = registry.get_or_insert(None, &b, Open::Shared).unwrap().0;
        slot_a.publish(b"1", 0);
        assert_eq!(
            registry.get(None, "stream-a").unwrap().latest().unwrap(),
            "1"
        );
        assert_eq!(registry.get(None, "stream-b").unwrap().latest(), None);
        assert!(registry.get(Some("stream-a"), "stream-a").is_none());
        assert!(
            registry.handoff().take_active().is_empty(),
            "no owner, no activity to write"
        );
        assert_eq!(slot_b.key().owner, None);
        registry.body_closed(&slot_a);
        registry.body_closed(&slot_b);
        assert_eq!(registry.all_slots().len(), 2);
    }
}
