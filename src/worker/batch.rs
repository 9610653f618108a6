//! Coalescing: what one round of the worker writes, at most one entry per stream, its latest.
//!
//! Bodies never send ids to the worker, only "this stream changed" (its slot), at most once
//! until the worker reads the slot again. However many ids a stream commits between two
//! flushes, the round reads the latest of them from the slot, once, and leaves it out when the
//! store already holds it.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use crate::key::{EventId, StreamKey};
use crate::registry::{Registry, Slot, Version};
use crate::store::SaveEntry;

/// The latest id of one stream, on its way to the store.
#[derive(Debug)]
pub(crate) struct Pending {
    pub(crate) slot: Arc<Slot>,
    pub(crate) id: EventId,
    pub(crate) version: Version,
    /// Older slots of the same key (evicted, the key made again since) whose ids this entry
    /// supersedes: once it is stored, so are they, as far as the store is concerned.
    pub(crate) covers: Vec<(Arc<Slot>, Version)>,
}

impl Pending {
    /// Every slot this entry writes for, with the version it writes: the entry's own, then
    /// those it covers.
    pub(crate) fn slots(&self) -> impl Iterator<Item = (&Arc<Slot>, Version)> {
        std::iter::once((&self.slot, self.version))
            .chain(self.covers.iter().map(|(slot, version)| (slot, *version)))
    }
}

impl Pending {
    pub(crate) fn to_save(&self, registry: &Registry) -> SaveEntry {
        SaveEntry {
            key: self.slot.key().clone(),
            id: self.id.clone(),
            sequence: self.version.sequence,
            published_at: registry.wall_time(self.version.at_us),
        }
    }
}

/// What a round takes of one slot.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Take {
    /// Its latest id goes into the round.
    Write,
    /// The store already has its latest id.
    Duplicate,
    /// The round already took it, or another list owns it (retry, given up, evicted).
    Skip,
}

/// The entries of one round.
#[derive(Debug, Default)]
pub(crate) struct RoundEntries {
    pub(crate) entries: Vec<Pending>,
    pub(crate) duplicates: u64,
}

impl RoundEntries {
    /// Takes the latest id of `slot` into the round (see [`Take`]). A slot from a list that
    /// holds its queued flag (pending, dirty, retry) has the flag cleared as its id is read; a
    /// slot from the evicted FIFO (`evicted_fifo`) is the FIFO's whatever the flag.
    pub(crate) fn take(&mut self, slot: Arc<Slot>, round: u64, evicted_fifo: bool) -> Take {
        if !evicted_fifo
            && (slot.is_evicted() || slot.marks().is_in_retry() || slot.marks().is_given_up())
        {
            return Take::Skip;
        }
        if !slot.marks().take_for_round(round) {
            return Take::Skip;
        }
        let latest = if evicted_fifo {
            slot.latest_entry()
        } else {
            slot.take_latest()
        };
        match latest {
            Some((id, version)) if version.sequence > slot.marks().persisted() => {
                self.entries.push(Pending {
                    slot,
                    id,
                    version,
                    covers: Vec::new(),
                });
                Take::Write
            }
            _ => {
                self.duplicates += 1;
                Take::Duplicate
            }
        }
    }
}

impl RoundEntries {
    /// Keeps one entry per key, the newest by version, as [`Store::save`](crate::store::Store::save)
    /// promises: the others become what it covers. Only keys with an evicted slot can have
    /// two (a slot is taken once per round), so the worker calls this only for rounds that
    /// took evicted slots.
    pub(crate) fn one_per_key(&mut self) {
        let mut index: HashMap<StreamKey, usize> = HashMap::with_capacity(self.entries.len());
        let mut kept: Vec<Pending> = Vec::with_capacity(self.entries.len());
        for entry in std::mem::take(&mut self.entries) {
            match index.entry(entry.slot.key().clone()) {
                Entry::Vacant(vacant) => {
                    vacant.insert(kept.len());
                    kept.push(entry);
                }
                Entry::Occupied(occupied) => {
                    let held = &mut kept[*occupied.get()];
                    let older = if entry.version > held.version {
                        std::mem::replace(held, entry)
                    } else {
                        entry
                    };
                    held.covers.push((older.slot, older.version));
                    held.covers.extend(older.covers);
                }
            }
        }
        self.entries = kept;
    }
}

/// Splits `entries` into writes of at most `max` entries, in order.
pub(crate) fn chunks<T>(entries: Vec<T>, max: usize) -> VecDeque<Vec<T>> {
    let mut out = VecDeque::with_capacity(entries.len().div_ceil(max.max(1)));
    let mut chunk = Vec::with_capacity(max.min(entries.len()));
    for entry in entries {
        chunk.push(entry);
        if chunk.len() == max {
            out.push_back(std::mem::replace(
                &mut chunk,
                Vec::with_capacity(max.min(1024)),
            ));
        }
    }
    if !chunk.is_empty() {
        out.push_back(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{Owner, StreamName};
    use crate::registry::Open;

    fn registry() -> Registry {
        Registry::for_tests(10, None, 10)
    }

    fn slot(r: &Registry, name: &str) -> Arc<Slot> {
        let s = Owner::new("s").unwrap();
        r.get_or_insert(Some(&s), &StreamName::new(name).unwrap(), Open::No)
            .unwrap()
            .0
    }

    #[test]
    fn test_event_coalescing() {
        let registry = registry();
        let a = slot(&registry, "A");
        let b = slot(&registry, "B");
        // A:1, A:2, A:3, B:4: the worker is told of A once and of B once.
        let mut told = Vec::new();
        for (slot, id) in [(&a, "1"), (&a, "2"), (&a, "3"), (&b, "4")] {
            if slot.publish(id.as_bytes(), 0).1 {
                told.push(slot.clone());
            }
        }
        assert_eq!(told.len(), 2);
        let mut round = RoundEntries::default();
        for slot in told {
            assert_eq!(round.take(slot, 1, false), Take::Write);
        }
        let mut writes: Vec<(String, String)> = round
            .entries
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
    fn a_round_takes_a_slot_once_and_skips_what_the_store_has() {
        let registry = registry();
        let a = slot(&registry, "A");
        let b = slot(&registry, "B");
        a.publish(b"new", 0);
        b.publish(b"dup", 0);
        b.marks().set_persisted(1);
        let mut round = RoundEntries::default();
        assert_eq!(round.take(a.clone(), 7, false), Take::Write);
        assert_eq!(round.take(a.clone(), 7, false), Take::Skip);
        assert_eq!(round.take(b, 7, false), Take::Duplicate);
        assert_eq!(round.entries.len(), 1);
        assert_eq!(round.entries[0].id, "new");
        assert_eq!(round.duplicates, 1);
        // A slot waiting for its retry is the retry queue's.
        a.publish(b"newer", 0);
        a.marks().enter_retry();
        assert_eq!(round.take(a, 8, false), Take::Skip);
    }

    #[test]
    fn chunks_are_at_most_max_and_keep_order() {
        let c = chunks((0..7).collect(), 3);
        assert_eq!(c, [vec![0, 1, 2], vec![3, 4, 5], vec![6]]);
        assert!(chunks(Vec::<u8>::new(), 3).is_empty());
    }
}
