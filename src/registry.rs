//! Per-stream slots: the latest committed id of every tracked (session, stream).
//!
//! Each slot owns a `tokio::sync::watch` channel holding the newest committed [`EventId`]
//! (latest only: a reader never sees a backlog) and a per-key sequence number that orders the
//! ids of one key. A response body looks its slot up once, when the response starts, and then
//! publishes into it without touching the map again.
//!
//! The map is two-level, session then stream, because a session has few streams and callers
//! ask for all the streams of one session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::key::{EventId, SessionId, StreamKey, StreamName};

/// One tracked stream.
#[derive(Debug)]
pub(crate) struct Slot {
    key: StreamKey,
    latest: watch::Sender<Option<EventId>>,
    /// Sequence number of the id in `latest`; written only under the watch's write lock.
    sequence: AtomicU64,
    /// Highest sequence known to be in the store.
    persisted: AtomicU64,
    /// The worker owes this slot a write of its latest id (see `Registry::mark_dirty`).
    dirty: AtomicBool,
    /// The slot has an entry in the worker's retry queue.
    in_retry: AtomicBool,
}

impl Slot {
    fn new(key: StreamKey) -> Self {
        Self {
            key,
            latest: watch::Sender::new(None),
            sequence: AtomicU64::new(0),
            persisted: AtomicU64::new(0),
            dirty: AtomicBool::new(false),
            in_retry: AtomicBool::new(false),
        }
    }

    pub(crate) fn key(&self) -> &StreamKey {
        &self.key
    }

    /// Makes `id` the latest id of this stream and returns its sequence number, taken from the
    /// tracker-wide `counter`: it increases with every id of the key and never repeats, even
    /// for a key whose slot was dropped and created again.
    pub(crate) fn publish(&self, id: EventId, counter: &AtomicU64) -> u64 {
        let mut sequence = 0;
        // The sequence is taken while the watch's write lock is held, so that id order and
        // sequence order agree when several bodies publish to one key at once.
        self.latest.send_modify(|latest| {
            sequence = counter.fetch_add(1, Ordering::Relaxed) + 1;
            self.sequence.store(sequence, Ordering::Relaxed);
            *latest = Some(id);
        });
        sequence
    }

    pub(crate) fn latest(&self) -> Option<EventId> {
        self.latest.borrow().clone()
    }

    /// The latest id with its sequence number, read together.
    pub(crate) fn latest_entry(&self) -> Option<(EventId, u64)> {
        let latest = self.latest.borrow();
        let id = latest.clone()?;
        Some((id, self.sequence.load(Ordering::Relaxed)))
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<EventId>> {
        self.latest.subscribe()
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

/// The registry was full: it tracks `max_streams` streams already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryFull {
    /// The configured limit.
    pub max_streams: usize,
}

impl std::fmt::Display for RegistryFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the tracker already tracks its maximum of {} streams",
            self.max_streams
        )
    }
}

impl std::error::Error for RegistryFull {}

#[derive(Debug, Default)]
struct Map {
    sessions: HashMap<SessionId, Vec<Arc<Slot>>>,
    streams: usize,
}

#[derive(Debug)]
pub(crate) struct Registry {
    max_streams: usize,
    map: Mutex<Map>,
    /// Source of sequence numbers for every slot.
    pub(crate) sequence: AtomicU64,
    /// Slots whose latest id the worker must persist from here (their record was not handed
    /// over). A slot is in it at most once (its dirty flag guards it), so it is bounded by the
    /// number of slots.
    dirty: Mutex<Vec<Arc<Slot>>>,
}

impl Registry {
    pub(crate) fn new(max_streams: usize) -> Self {
        Self {
            max_streams,
            map: Mutex::new(Map::default()),
            sequence: AtomicU64::new(0),
            dirty: Mutex::default(),
        }
    }

    /// Queues `slot` for the worker, which will persist its latest id at the next flush.
    pub(crate) fn mark_dirty(&self, slot: &Arc<Slot>) {
        if slot.set_dirty() {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(slot.clone());
        }
    }

    pub(crate) fn has_dirty(&self) -> bool {
        !self
            .dirty
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Takes the dirty slots, clearing their flags.
    pub(crate) fn take_dirty(&self) -> Vec<Arc<Slot>> {
        let slots = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        for slot in &slots {
            slot.clear_dirty();
        }
        slots
    }

    fn lock(&self) -> MutexGuard<'_, Map> {
        // A panic while the lock is held cannot leave the map inconsistent (every change is a
        // single insert or push), so a poisoned lock is still usable.
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, session: &str, stream: &str) -> Option<Arc<Slot>> {
        let map = self.lock();
        map.sessions
            .get(session)?
            .iter()
            .find(|slot| slot.key.stream == stream)
            .cloned()
    }

    /// The slot of `key`, created when absent and the registry has room.
    pub(crate) fn get_or_insert(
        &self,
        session: &SessionId,
        stream: &StreamName,
    ) -> Result<Arc<Slot>, RegistryFull> {
        let mut map = self.lock();
        let map = &mut *map;
        if let Some(slots) = map.sessions.get(session.as_str())
            && let Some(slot) = slots.iter().find(|slot| slot.key.stream == *stream)
        {
            return Ok(slot.clone());
        }
        if map.streams >= self.max_streams {
            return Err(RegistryFull {
                max_streams: self.max_streams,
            });
        }
        let slot = Arc::new(Slot::new(StreamKey {
            session: session.clone(),
            stream: stream.clone(),
        }));
        map.sessions
            .entry(session.clone())
            .or_default()
            .push(slot.clone());
        map.streams += 1;
        Ok(slot)
    }

    /// Every stream of `session` with its latest id, in the order they were first seen.
    pub(crate) fn session_streams(&self, session: &str) -> Vec<(StreamName, Option<EventId>)> {
        let map = self.lock();
        map.sessions
            .get(session)
            .map(|slots| {
                slots
                    .iter()
                    .map(|slot| (slot.key.stream.clone(), slot.latest()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(crate) fn len(&self) -> usize {
        self.lock().streams
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
        let registry = Registry::new(10);
        let (s, a) = key("s", "GET /a");
        let (_, b) = key("s", "GET /b");
        let slot_a = registry.get_or_insert(&s, &a).unwrap();
        let slot_b = registry.get_or_insert(&s, &b).unwrap();
        slot_a.publish(EventId::new("1").unwrap(), &registry.sequence);
        assert_eq!(registry.get("s", "GET /a").unwrap().latest().unwrap(), "1");
        assert_eq!(registry.get("s", "GET /b").unwrap().latest(), None);
        assert_eq!(
            slot_b.publish(EventId::new("x").unwrap(), &registry.sequence),
            2
        );
        assert_eq!(registry.session_streams("s").len(), 2);
    }

    #[test]
    fn sequence_numbers_increase_per_key_and_never_repeat() {
        let registry = Registry::new(10);
        let (s, a) = key("s", "GET /a");
        let (_, b) = key("s", "GET /b");
        let slot = registry.get_or_insert(&s, &a).unwrap();
        let other = registry.get_or_insert(&s, &b).unwrap();
        let mut seqs: Vec<u64> = (0..3)
            .map(|i| slot.publish(EventId::new(&i.to_string()).unwrap(), &registry.sequence))
            .collect();
        seqs.push(other.publish(EventId::new("x").unwrap(), &registry.sequence));
        seqs.push(slot.publish(EventId::new("y").unwrap(), &registry.sequence));
        assert_eq!(seqs, [1, 2, 3, 4, 5]);
        assert_eq!(
            slot.latest_entry().unwrap(),
            (EventId::new("y").unwrap(), 5)
        );
    }

    #[test]
    fn a_slot_is_queued_dirty_once_until_taken() {
        let registry = Registry::new(10);
        let (s, a) = key("s", "GET /a");
        let slot = registry.get_or_insert(&s, &a).unwrap();
        registry.mark_dirty(&slot);
        registry.mark_dirty(&slot);
        assert!(slot.is_dirty());
        assert_eq!(registry.take_dirty().len(), 1);
        assert!(!slot.is_dirty());
        assert!(registry.take_dirty().is_empty());
    }

    #[test]
    fn a_full_registry_refuses_new_keys_but_serves_known_ones() {
        let registry = Registry::new(1);
        let (s, a) = key("s", "GET /a");
        let (t, b) = key("t", "GET /b");
        registry.get_or_insert(&s, &a).unwrap();
        assert_eq!(
            registry.get_or_insert(&t, &b).unwrap_err(),
            RegistryFull { max_streams: 1 }
        );
        assert!(registry.get_or_insert(&s, &a).is_ok());
        assert_eq!(registry.len(), 1);
    }
}
