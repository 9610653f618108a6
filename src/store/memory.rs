//! [`InMemoryStore`]: the default store, for a single server instance.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use std::time::{Duration, Instant, SystemTime};

use super::{
    AppendReport, LogAppend, LogEnd, LogEvent, SaveEntry, SessionActivity, Store, StoreError,
    StoredId, StoredLog, check_appends,
};
use crate::key::{Owner, StreamKey};

/// Default limit of [`InMemoryStore::new`]: one million keys.
pub(crate) const DEFAULT_MAX_KEYS: usize = 1_000_000;
/// Default limits of a replay log in a store: events, and bytes of events.
pub(crate) const DEFAULT_LOG_MAX_EVENTS: usize = 1024;
pub(crate) const DEFAULT_LOG_MAX_BYTES: usize = 1 << 20;
/// Default bound on the bytes of events in all replay logs of an [`InMemoryStore`]: 64 MiB.
const DEFAULT_MAX_LOG_BYTES: usize = 64 << 20;

/// A stream's replay log in an [`InMemoryStore`].
#[derive(Debug)]
struct Log {
    epoch: u64,
    producer: String,
    events: VecDeque<LogEvent>,
    bytes: usize,
    next: u64,
    end: Option<LogEnd>,
    stamp: u64,
}

#[derive(Debug)]
struct Entry {
    stored: StoredId,
    /// When the entry was last written, in write order; the least recently written key is the
    /// first to go when the store is full.
    stamp: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<StreamKey, Entry>,
    by_stamp: BTreeMap<u64, StreamKey>,
    next_stamp: u64,
    evicted: u64,
    /// Last activity of each session, bounded like the keys (oldest touch goes first).
    sessions: HashMap<Owner, (SystemTime, u64)>,
    sessions_by_stamp: BTreeMap<u64, Owner>,
    /// Replay logs, bounded like the keys (the least recently appended goes first).
    logs: HashMap<StreamKey, Log>,
    logs_by_stamp: BTreeMap<u64, StreamKey>,
    /// Bytes of events in all logs.
    log_bytes: usize,
    /// When each producer's lease runs out.
    leases: HashMap<String, Instant>,
}

/// The default [`Store`]: a map in memory, safe for concurrent use, bounded by a number of keys
/// (the least recently written key is dropped first).
///
/// It also keeps replay logs ([`Store::append_logs`]): each of at most 1 024 events and 1 MiB of
/// them (the oldest going first), all of them at most as many as keys and 64 MiB of events
/// (whole logs going then, the least recently appended first), none expiring; and producers'
/// leases.
///
/// It keeps ids across reconnects for as long as the process lives; use a shared store (Redis)
/// when several server instances must resume each other's streams.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use tower_sse_tracker::store::{InMemoryStore, SaveEntry, Store};
/// use tower_sse_tracker::{EventId, SessionId, StreamKey, StreamName};
///
/// let store = InMemoryStore::new();
/// let key = StreamKey::new(SessionId::new("s1").unwrap(), StreamName::new("GET /mcp").unwrap());
/// let now = std::time::SystemTime::now();
/// let entry = |id: &str, sequence| SaveEntry {
///     key: key.clone(),
///     id: EventId::new(id).unwrap(),
///     sequence,
///     published_at: now,
/// };
/// store.save(&[entry("7", 2)]).await.unwrap();
/// store.save(&[entry("6", 1)]).await.unwrap(); // older: refused
/// assert_eq!(store.load(&key).await.unwrap().unwrap().id, "7");
/// # }
/// ```
#[derive(Debug)]
pub struct InMemoryStore {
    max_keys: usize,
    max_log_bytes: usize,
    inner: Mutex<Inner>,
}

/// Trims `log` to `max_events` events and `max_bytes` bytes of them, the oldest first.
fn trim(log: &mut Log, max_events: usize, max_bytes: usize) {
    while log.events.len() > max_events || log.bytes > max_bytes {
        let Some(oldest) = log.events.pop_front() else {
            break;
        };
        log.bytes -= oldest.bytes.len();
    }
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    /// A store of at most 1 000 000 keys.
    pub fn new() -> Self {
        Self::with_max_keys(DEFAULT_MAX_KEYS)
    }

    /// A store of at most `max_keys` keys (at least 1).
    pub fn with_max_keys(max_keys: usize) -> Self {
        Self {
            max_keys: max_keys.max(1),
            max_log_bytes: DEFAULT_MAX_LOG_BYTES,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        crate::sync::lock(&self.inner)
    }

    /// The stored entry of `key`, without going through the async trait.
    pub fn get(&self, key: &StreamKey) -> Option<StoredId> {
        self.lock().entries.get(key).map(|e| e.stored.clone())
    }

    /// How many keys the store holds.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the store holds no key.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// When `owner` (a session id, with the default owner source) was last active, as last
    /// written by the worker.
    pub fn last_active(&self, owner: &str) -> Option<SystemTime> {
        self.lock().sessions.get(owner).map(|(t, _)| *t)
    }

    /// How many owners have an activity time.
    pub fn sessions(&self) -> usize {
        self.lock().sessions.len()
    }

    fn touch_now(&self, sessions: &[SessionActivity]) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for activity in sessions {
            let stamp = inner.next_stamp;
            inner.next_stamp += 1;
            if let Some((_, old)) = inner
                .sessions
                .insert(activity.owner.clone(), (activity.last_active, stamp))
            {
                inner.sessions_by_stamp.remove(&old);
            }
            inner
                .sessions_by_stamp
                .insert(stamp, activity.owner.clone());
            while inner.sessions.len() > self.max_keys {
                let Some((_, oldest)) = inner.sessions_by_stamp.pop_first() else {
                    break;
                };
                inner.sessions.remove(&oldest);
            }
        }
    }

    /// How many keys were dropped because the store was full.
    pub fn evicted(&self) -> u64 {
        self.lock().evicted
    }

    fn save_now(&self, batch: &[SaveEntry]) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for entry in batch {
            let stamp = inner.next_stamp;
            match inner.entries.get_mut(&entry.key) {
                Some(old) if !entry.supersedes(&old.stored) => continue,
                Some(old) => {
                    inner.by_stamp.remove(&old.stamp);
                    old.stored = entry.to_stored();
                    old.stamp = stamp;
                }
                None => {
                    inner.entries.insert(
                        entry.key.clone(),
                        Entry {
                            stored: entry.to_stored(),
                            stamp,
                        },
                    );
                }
            }
            inner.by_stamp.insert(stamp, entry.key.clone());
            inner.next_stamp += 1;
            while inner.entries.len() > self.max_keys {
                let Some((_, oldest)) = inner.by_stamp.pop_first() else {
                    break;
                };
                inner.entries.remove(&oldest);
                inner.evicted += 1;
            }
        }
    }
}

impl InMemoryStore {
    fn append_now(&self, batch: &[LogAppend]) -> Result<AppendReport, StoreError> {
        check_appends(batch)?;
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut refused = Vec::new();
        for (at, append) in batch.iter().enumerate() {
            let stamp = inner.next_stamp;
            inner.next_stamp += 1;
            let log = match inner.logs.get_mut(&append.key) {
                // An older history, or the same epoch of another producer: refused.
                Some(log)
                    if log.epoch > append.epoch
                        || (log.epoch == append.epoch && log.producer != append.producer) =>
                {
                    refused.push(at);
                    continue;
                }
                Some(log) => {
                    inner.logs_by_stamp.remove(&log.stamp);
                    if log.epoch < append.epoch {
                        inner.log_bytes -= log.bytes;
                        *log = Log::new(append.epoch, append.producer.clone(), stamp);
                    }
                    log
                }
                None => inner
                    .logs
                    .entry(append.key.clone())
                    .or_insert_with(|| Log::new(append.epoch, append.producer.clone(), stamp)),
            };
            log.stamp = stamp;
            let before = log.bytes;
            for event in &append.events {
                // Nothing follows the end; offsets already appended are a retry.
                if log.end.is_none() && event.offset >= log.next {
                    log.next = event.offset + 1;
                    log.bytes += event.bytes.len();
                    log.events.push_back(event.clone());
                    trim(log, DEFAULT_LOG_MAX_EVENTS, DEFAULT_LOG_MAX_BYTES);
                }
            }
            log.end = log.end.or(append.end);
            inner.log_bytes = inner.log_bytes + log.bytes - before;
            inner.logs_by_stamp.insert(stamp, append.key.clone());
            // Whole logs go, the least recently appended first, past either bound.
            while inner.logs.len() > self.max_keys || inner.log_bytes > self.max_log_bytes {
                let Some((_, oldest)) = inner.logs_by_stamp.pop_first() else {
                    break;
                };
                if let Some(log) = inner.logs.remove(&oldest) {
                    inner.log_bytes -= log.bytes;
                }
            }
        }
        Ok(AppendReport::refusing(refused))
    }

    fn read_now(&self, key: &StreamKey, after: Option<u64>, limit: usize) -> Option<StoredLog> {
        let inner = self.lock();
        let log = inner.logs.get(key)?;
        let events = log
            .events
            .iter()
            .filter(|e| after.is_none_or(|after| e.offset > after))
            .take(limit.min(DEFAULT_LOG_MAX_EVENTS))
            .cloned()
            .collect();
        Some(StoredLog::new(
            log.epoch,
            log.producer.clone(),
            events,
            log.next,
            log.end,
        ))
    }

    fn renew_now(&self, producer: &str, ttl: Duration) {
        let now = Instant::now();
        let mut inner = self.lock();
        let ends = now
            .checked_add(ttl)
            .unwrap_or(now + Duration::from_secs(100 * 365 * 24 * 3600));
        inner.leases.insert(producer.to_owned(), ends);
        if inner.leases.len() > self.max_keys {
            inner.leases.retain(|_, ends| *ends > now);
        }
        while inner.leases.len() > self.max_keys {
            let Some(first) = inner
                .leases
                .iter()
                .min_by_key(|(_, ends)| **ends)
                .map(|(p, _)| p.clone())
            else {
                break;
            };
            inner.leases.remove(&first);
        }
    }
}

impl Log {
    fn new(epoch: u64, producer: String, stamp: u64) -> Self {
        Self {
            epoch,
            producer,
            events: VecDeque::new(),
            bytes: 0,
            next: 0,
            end: None,
            stamp,
        }
    }
}

impl Store for InMemoryStore {
    async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
        self.save_now(batch);
        Ok(())
    }

    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        Ok(self.get(key))
    }

    async fn touch_sessions(&self, sessions: &[SessionActivity]) -> Result<(), StoreError> {
        self.touch_now(sessions);
        Ok(())
    }

    async fn append_logs(&self, batch: &[LogAppend]) -> Result<AppendReport, StoreError> {
        self.append_now(batch)
    }

    async fn read_log(
        &self,
        key: &StreamKey,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Option<StoredLog>, StoreError> {
        Ok(self.read_now(key, after, limit))
    }

    async fn renew_lease(&self, producer: &str, ttl: Duration) -> Result<(), StoreError> {
        self.renew_now(producer, ttl);
        Ok(())
    }

    async fn lease_alive(&self, producer: &str) -> Result<bool, StoreError> {
        Ok(self
            .lock()
            .leases
            .get(producer)
            .is_some_and(|ends| *ends > Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::EventId;

    fn entry(session: &str, id: &str, sequence: u64) -> SaveEntry {
        SaveEntry {
            key: StreamKey::try_new(session, "GET /s").unwrap(),
            id: EventId::new(id).unwrap(),
            sequence,
            published_at: SystemTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn a_later_publish_time_wins_over_a_higher_sequence() {
        let store = InMemoryStore::new();
        let mut older = entry("a", "from-b", 50);
        older.published_at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1);
        let mut newer = entry("a", "from-a", 3);
        newer.published_at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(2);
        store.save_now(&[newer]);
        store.save_now(&[older]);
        assert_eq!(store.get(&entry("a", "", 0).key).unwrap().id, "from-a");
    }

    #[test]
    fn an_older_sequence_never_replaces_a_newer_one() {
        let store = InMemoryStore::new();
        store.save_now(&[entry("a", "2", 2)]);
        store.save_now(&[entry("a", "1", 1), entry("b", "9", 9)]);
        assert_eq!(store.get(&entry("a", "", 0).key).unwrap().id, "2");
        assert_eq!(store.get(&entry("b", "", 0).key).unwrap().id, "9");
        store.save_now(&[entry("a", "3", 3)]);
        assert_eq!(store.get(&entry("a", "", 0).key).unwrap().sequence, 3);
    }

    #[test]
    fn whole_logs_go_past_the_byte_budget_least_recently_appended_first() {
        use bytes::Bytes;
        let store = InMemoryStore {
            max_log_bytes: 250,
            ..InMemoryStore::with_max_keys(3)
        };
        let append = |owner: &str, bytes: usize| {
            LogAppend::new(StreamKey::try_new(owner, "GET /s").unwrap(), 1, "p")
                .event(LogEvent::new(0, None, Bytes::from(vec![b'x'; bytes])))
        };
        let held = |owner: &str| {
            store
                .read_now(&StreamKey::try_new(owner, "GET /s").unwrap(), None, 10)
                .is_some()
        };
        store
            .append_now(&[append("a", 100), append("b", 100)])
            .unwrap();
        store.append_now(&[append("c", 100)]).unwrap();
        assert!(
            !held("a") && held("b") && held("c"),
            "300 bytes > 250: a goes"
        );
        store
            .append_now(&[append("d", 10), append("e", 10)])
            .unwrap();
        assert!(
            !held("b") && held("c") && held("d") && held("e"),
            "3 logs at most"
        );
        assert_eq!(store.lock().log_bytes, 120);
    }

    #[test]
    fn a_full_store_drops_the_least_recently_written_key() {
        let store = InMemoryStore::with_max_keys(2);
        store.save_now(&[entry("a", "1", 1), entry("b", "2", 2)]);
        store.save_now(&[entry("a", "3", 3)]); // a is now newer than b
        store.save_now(&[entry("c", "4", 4)]);
        assert_eq!(store.len(), 2);
        assert_eq!(store.evicted(), 1);
        assert!(store.get(&entry("b", "", 0).key).is_none());
        assert!(store.get(&entry("a", "", 0).key).is_some());
    }
}
