//! A partition's table of keys `(sensorId, eventType)` and their state, laid out for
//! memory: entries live densely in a `Vec`, the hash index holds only 4-byte positions,
//! and event types (few) are interned, so an open key costs its state plus ~40 bytes
//! instead of a hash map's half-empty buckets of whole entries (measured in
//! `docs/benchmarks.md`).

use std::hash::{Hash, Hasher};

use compact_str::CompactString;
use hashbrown::HashTable;
use rustc_hash::{FxHashMap, FxHasher};
use serde::{Deserialize, Serialize};

pub struct KeyEntry<V> {
    pub sensor_id: CompactString,
    type_id: u32,
    pub value: V,
}

pub struct KeyTable<V> {
    index: HashTable<u32>,
    entries: Vec<KeyEntry<V>>,
    types: Vec<CompactString>,
    type_ids: FxHashMap<CompactString, u32>,
}

impl<V> Default for KeyTable<V> {
    fn default() -> Self {
        Self { index: HashTable::new(), entries: Vec::new(), types: Vec::new(), type_ids: FxHashMap::default() }
    }
}

#[inline]
fn hash_key(sensor_id: &str, event_type: &str) -> u64 {
    let mut hasher = FxHasher::default();
    sensor_id.hash(&mut hasher);
    event_type.hash(&mut hasher);
    hasher.finish()
}

impl<V> KeyTable<V> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn reserve(&mut self, additional: usize) {
        self.entries.reserve(additional);
        let Self { index, entries, types, .. } = self;
        index.reserve(additional, |&i| {
            let entry = &entries[i as usize];
            hash_key(&entry.sensor_id, &types[entry.type_id as usize])
        });
    }

    fn type_id(&mut self, event_type: &str) -> u32 {
        if let Some(&id) = self.type_ids.get(event_type) {
            return id;
        }
        let id = self.types.len() as u32;
        self.types.push(CompactString::from(event_type));
        self.type_ids.insert(CompactString::from(event_type), id);
        id
    }

    #[inline]
    fn find(&self, hash: u64, sensor_id: &str, event_type: &str) -> Option<u32> {
        let Self { index, entries, types, .. } = self;
        index
            .find(hash, |&i| {
                let entry = &entries[i as usize];
                entry.sensor_id == sensor_id && types[entry.type_id as usize] == event_type
            })
            .copied()
    }

    /// The state of a key, created by `make` on first sight.
    #[inline]
    pub fn get_or_insert_with(&mut self, sensor_id: &str, event_type: &str, make: impl FnOnce() -> V) -> &mut V {
        let hash = hash_key(sensor_id, event_type);
        let position = match self.find(hash, sensor_id, event_type) {
            Some(position) => position,
            None => self.insert_new(hash, sensor_id, event_type, make()),
        };
        &mut self.entries[position as usize].value
    }

    /// Set a key's state (restoring a checkpoint).
    pub fn insert(&mut self, sensor_id: &str, event_type: &str, value: V) {
        let hash = hash_key(sensor_id, event_type);
        match self.find(hash, sensor_id, event_type) {
            Some(position) => self.entries[position as usize].value = value,
            None => {
                self.insert_new(hash, sensor_id, event_type, value);
            }
        }
    }

    fn insert_new(&mut self, hash: u64, sensor_id: &str, event_type: &str, value: V) -> u32 {
        let type_id = self.type_id(event_type);
        let position = self.entries.len() as u32;
        self.entries.push(KeyEntry { sensor_id: CompactString::from(sensor_id), type_id, value });
        let Self { index, entries, types, .. } = self;
        index.insert_unique(hash, position, |&i| {
            let entry = &entries[i as usize];
            hash_key(&entry.sensor_id, &types[entry.type_id as usize])
        });
        position
    }

    /// The state of a key; on first sight `make` decides whether it may open (`None`:
    /// refused, the table is left as it was).
    #[inline]
    pub fn get_or_try_insert_with(
        &mut self,
        sensor_id: &str,
        event_type: &str,
        make: impl FnOnce() -> Option<V>,
    ) -> Option<&mut V> {
        let hash = hash_key(sensor_id, event_type);
        let position = match self.find(hash, sensor_id, event_type) {
            Some(position) => position,
            None => self.insert_new(hash, sensor_id, event_type, make()?),
        };
        Some(&mut self.entries[position as usize].value)
    }

    /// Remove every key `remove` picks and hand it back; memory the table no longer
    /// needs is returned to the allocator.
    pub fn remove_where(&mut self, mut remove: impl FnMut(&V) -> bool) -> Vec<(CompactString, CompactString, V)> {
        let mut removed = Vec::new();
        // Downwards: `swap_remove` brings the last entry, already looked at, into the gap.
        for position in (0..self.entries.len()).rev() {
            if !remove(&self.entries[position].value) {
                continue;
            }
            let last = self.entries.len() - 1;
            let entry = &self.entries[position];
            let hash = hash_key(&entry.sensor_id, &self.types[entry.type_id as usize]);
            if let Ok(slot) = self.index.find_entry(hash, |&i| i as usize == position) {
                slot.remove();
            }
            if position != last {
                let moved = &self.entries[last];
                let moved_hash = hash_key(&moved.sensor_id, &self.types[moved.type_id as usize]);
                if let Some(slot) = self.index.find_mut(moved_hash, |&i| i as usize == last) {
                    *slot = position as u32;
                }
            }
            let entry = self.entries.swap_remove(position);
            removed.push((entry.sensor_id, self.types[entry.type_id as usize].clone(), entry.value));
        }
        if !removed.is_empty() && self.entries.capacity() > 2 * self.entries.len() + 64 {
            self.entries.shrink_to_fit();
            let Self { index, entries, types, .. } = self;
            index.shrink_to_fit(|&i| {
                let entry = &entries[i as usize];
                hash_key(&entry.sensor_id, &types[entry.type_id as usize])
            });
        }
        removed
    }

    /// Every key with its state.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&CompactString, &CompactString, &mut V)> {
        let types = &self.types;
        self.entries.iter_mut().map(move |entry| (&entry.sensor_id, &types[entry.type_id as usize], &mut entry.value))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|entry| &entry.value)
    }
}

/// A stable 64-bit hash of a key (FNV-1a), for what is persisted: unlike the table's
/// hasher it does not change with a dependency's version.
pub fn stable_key_hash(sensor_id: &str, event_type: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sensor_id.bytes().chain(std::iter::once(0xff)).chain(event_type.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// What is kept of a key that left memory after `pipeline.key_ttl`: where its windows
/// stood, so an event that comes back for a window already fired is still late (the
/// result in the store is not replaced by one counting only the newcomer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub max_event_ms: i64,
    pub closed_before_ms: i64,
    /// Ingest clock at eviction; the tombstone goes `pipeline.key_tombstone_ttl` later.
    pub evicted_at_ms: i64,
}

/// Number of checkpoint blobs the tombstones are spread over, so a checkpoint rewrites
/// only the shards that changed.
pub const TOMBSTONE_SHARDS: usize = 16;

/// The tombstones of a partition's evicted keys, by [`stable_key_hash`] (24 bytes each,
/// against a kilobyte or more for a live key).
#[derive(Default)]
pub struct Tombstones {
    shards: [FxHashMap<u64, Tombstone>; TOMBSTONE_SHARDS],
    dirty: u32,
    /// No tombstone was evicted before this (`expire` has nothing to do until it passes).
    oldest_ms: Option<i64>,
}

impl Tombstones {
    fn shard_of(hash: u64) -> usize {
        (hash >> 60) as usize % TOMBSTONE_SHARDS
    }

    pub fn len(&self) -> usize {
        self.shards.iter().map(FxHashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(FxHashMap::is_empty)
    }

    pub fn insert(&mut self, hash: u64, tombstone: Tombstone) {
        let shard = Self::shard_of(hash);
        self.shards[shard].insert(hash, tombstone);
        self.dirty |= 1 << shard;
        self.oldest_ms = Some(self.oldest_ms.map_or(tombstone.evicted_at_ms, |o| o.min(tombstone.evicted_at_ms)));
    }

    /// The tombstone of a key coming back, removed.
    pub fn take(&mut self, hash: u64) -> Option<Tombstone> {
        if self.is_empty() {
            return None;
        }
        let shard = Self::shard_of(hash);
        let tombstone = self.shards[shard].remove(&hash)?;
        self.dirty |= 1 << shard;
        Some(tombstone)
    }

    /// Forget tombstones of keys evicted before `before_ms` (ingest clock).
    pub fn expire(&mut self, before_ms: i64) {
        // Called at every sweep: a no-op until the oldest tombstone is due.
        if self.oldest_ms.is_none_or(|oldest| oldest >= before_ms) {
            return;
        }
        self.oldest_ms = None;
        for (index, shard) in self.shards.iter_mut().enumerate() {
            let len = shard.len();
            shard.retain(|_, tombstone| tombstone.evicted_at_ms >= before_ms);
            if let Some(oldest) = shard.values().map(|t| t.evicted_at_ms).min() {
                self.oldest_ms = Some(self.oldest_ms.map_or(oldest, |o| o.min(oldest)));
            }
            if shard.len() != len {
                self.dirty |= 1 << index;
                if shard.capacity() > 2 * shard.len() + 64 {
                    shard.shrink_to_fit();
                }
            }
        }
    }

    /// Shards changed since the last call: their index and their entries.
    pub fn take_dirty(&mut self) -> Vec<(usize, Vec<(u64, Tombstone)>)> {
        let dirty = std::mem::take(&mut self.dirty);
        (0..TOMBSTONE_SHARDS)
            .filter(|shard| dirty & (1 << shard) != 0)
            .map(|shard| (shard, self.shards[shard].iter().map(|(&hash, &t)| (hash, t)).collect()))
            .collect()
    }

    /// Restore one shard from a checkpoint.
    pub fn restore(&mut self, entries: Vec<(u64, Tombstone)>) {
        for (hash, tombstone) in entries {
            self.insert(hash, tombstone);
        }
        self.dirty = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removed_keys_leave_and_the_rest_are_still_found() {
        let mut table: KeyTable<u32> = KeyTable::default();
        for i in 0..5_000u32 {
            table.get_or_insert_with(&format!("s-{i}"), "t", || i);
        }
        let removed = table.remove_where(|&v| v % 3 == 0);
        assert_eq!(removed.len(), 1_667);
        assert!(removed.iter().all(|(sensor, kind, v)| v % 3 == 0 && *sensor == format!("s-{v}") && kind == "t"));
        assert_eq!(table.len(), 5_000 - 1_667);
        for i in 0..5_000u32 {
            let found = table.get_or_try_insert_with(&format!("s-{i}"), "t", || None).copied();
            assert_eq!(found, (i % 3 != 0).then_some(i), "s-{i}");
        }
        assert!(table.get_or_try_insert_with("s-3", "t", || Some(7)).is_some(), "a removed key can come back");
        assert_eq!(table.len(), 5_000 - 1_666);
    }

    #[test]
    fn tombstones_are_taken_expired_and_sharded() {
        let mut tombstones = Tombstones::default();
        for i in 0..100 {
            let t = Tombstone { max_event_ms: i, closed_before_ms: i, evicted_at_ms: i };
            tombstones.insert(stable_key_hash(&format!("s-{i}"), "t"), t);
        }
        let dirty = tombstones.take_dirty();
        assert_eq!(dirty.iter().map(|(_, entries)| entries.len()).sum::<usize>(), 100);
        assert!(tombstones.take_dirty().is_empty(), "clean after a checkpoint");
        assert_eq!(tombstones.take(stable_key_hash("s-7", "t")).map(|t| t.max_event_ms), Some(7));
        assert_eq!(tombstones.take(stable_key_hash("s-7", "t")), None);
        tombstones.expire(50);
        assert_eq!(tombstones.len(), 50);
        assert_ne!(stable_key_hash("ab", "c"), stable_key_hash("a", "bc"));
    }

    #[test]
    fn finds_inserts_and_iterates() {
        let mut table: KeyTable<u32> = KeyTable::default();
        for i in 0..10_000u32 {
            *table.get_or_insert_with(&format!("s-{i}"), if i % 2 == 0 { "t" } else { "h" }, || 0) += i;
        }
        for i in 0..10_000u32 {
            *table.get_or_insert_with(&format!("s-{i}"), if i % 2 == 0 { "t" } else { "h" }, || 0) += 1;
        }
        assert_eq!(table.len(), 10_000);
        assert_eq!(*table.get_or_insert_with("s-7", "h", || 99), 8);
        assert_eq!(*table.get_or_insert_with("s-7", "t", || 99), 99, "another event type is another key");
        table.insert("s-7", "t", 5);
        assert_eq!(*table.get_or_insert_with("s-7", "t", || 0), 5);
        let total: u64 = table.iter_mut().map(|(_, _, v)| u64::from(*v)).sum();
        assert_eq!(total, (0..10_000u64).sum::<u64>() + 10_000 + 5);
        assert!(table.iter_mut().all(|(sensor, kind, _)| sensor.starts_with("s-") && (kind == "t" || kind == "h")));
    }
}
