//! Coalescing: the records of one flush, at most one per stream, the newest winning.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use crate::key::EventId;
use crate::registry::{Registry, Slot, Version};
use crate::store::SaveEntry;

/// The latest id of one stream, waiting to be written.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) slot: Arc<Slot>,
    pub(crate) id: EventId,
    pub(crate) version: Version,
    /// Failed writes so far of this key's entry.
    pub(crate) retries: u32,
}

impl Pending {
    pub(crate) fn to_save(&self, registry: &Registry) -> SaveEntry {
        SaveEntry {
            key: self.slot.key().clone(),
            id: self.id.clone(),
            sequence: self.version.sequence,
            published_at: registry.wall_time(self.version.at_ms),
        }
    }
}

/// Records keyed by their slot (an O(1) pointer-keyed look-up, no string hashing).
#[derive(Debug, Default)]
pub(crate) struct Batch {
    entries: HashMap<usize, Pending>,
}

/// What [`Batch::take`] hands over.
#[derive(Debug, Default)]
pub(crate) struct Taken {
    /// Entries newer than what the store holds.
    pub(crate) write: Vec<Pending>,
    /// Entries already persisted (a duplicate, or older than the persisted id).
    pub(crate) skipped: usize,
}

impl Batch {
    /// Adds a record; true when it was merged into one already here (coalesced).
    pub(crate) fn add(&mut self, pending: Pending) -> bool {
        match self.entries.entry(Arc::as_ptr(&pending.slot) as usize) {
            Entry::Occupied(mut here) => {
                let here = here.get_mut();
                if pending.version.sequence > here.version.sequence {
                    here.id = pending.id;
                    here.version = pending.version;
                }
                here.retries = here.retries.max(pending.retries);
                true
            }
            Entry::Vacant(slot) => {
                slot.insert(pending);
                false
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Takes up to `limit` entries, leaving out those the store already has: an O(1) check per
    /// entry against the slot's persisted sequence.
    pub(crate) fn take(&mut self, limit: usize) -> Taken {
        let mut taken = Taken::default();
        let keys: Vec<usize> = self.entries.keys().take(limit).copied().collect();
        for key in keys {
            let pending = self.entries.remove(&key).expect("key just listed");
            if pending.version.sequence <= pending.slot.persisted() {
                taken.skipped += 1;
            } else {
                taken.write.push(pending);
            }
        }
        taken
    }

    pub(crate) fn slots(&self) -> impl Iterator<Item = &Arc<Slot>> {
        self.entries.values().map(|p| &p.slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{SessionId, StreamName};
    use crate::registry::Registry;

    #[test]
    fn test_event_coalescing() {
        let registry = Registry::new(10, None, 100);
        let s = SessionId::new("s").unwrap();
        let a = registry.get_or_insert(&s, &StreamName::new("A").unwrap()).0;
        let b = registry.get_or_insert(&s, &StreamName::new("B").unwrap()).0;
        let mut batch = Batch::default();
        let mut coalesced = 0;
        for (slot, id, sequence) in [(&a, "1", 1), (&a, "2", 2), (&a, "3", 3), (&b, "4", 4)] {
            coalesced += usize::from(batch.add(Pending {
                slot: slot.clone(),
                id: EventId::new(id).unwrap(),
                version: Version { sequence, at_ms: 0 },
                retries: 0,
            }));
        }
        assert_eq!(coalesced, 2);
        let mut writes: Vec<(String, String)> = batch
            .take(10)
            .write
            .iter()
            .map(|p| (p.slot.key().stream.to_string(), p.id.to_string()))
            .collect();
        writes.sort();
        assert_eq!(
            writes,
            [
                ("A".to_owned(), "3".to_owned()),
                ("B".to_owned(), "4".to_owned())
            ]
        );
    }

    #[test]
    fn an_older_record_never_replaces_a_newer_one_and_persisted_ones_are_skipped() {
        let registry = Registry::new(10, None, 100);
        let s = SessionId::new("s").unwrap();
        let a = registry.get_or_insert(&s, &StreamName::new("A").unwrap()).0;
        let b = registry.get_or_insert(&s, &StreamName::new("B").unwrap()).0;
        let mut batch = Batch::default();
        let rec = |slot: &Arc<Slot>, id: &str, sequence| Pending {
            slot: slot.clone(),
            id: EventId::new(id).unwrap(),
            version: Version { sequence, at_ms: 0 },
            retries: 1,
        };
        batch.add(rec(&a, "new", 9));
        batch.add(rec(&a, "old", 3)); // a late retry of an older id
        b.set_persisted(5);
        batch.add(rec(&b, "dup", 5));
        let taken = batch.take(10);
        assert_eq!(taken.skipped, 1);
        assert_eq!(taken.write.len(), 1);
        assert_eq!(taken.write[0].id, "new");
        assert!(batch.is_empty());
    }
}
