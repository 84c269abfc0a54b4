//! A partition's table of keys `(sensorId, eventType)` and their state, laid out for
//! memory: entries live densely in a `Vec`, the hash index holds only 4-byte positions,
//! and event types (few) are interned, so an open key costs its state plus ~40 bytes
//! instead of a hash map's half-empty buckets of whole entries (measured in
//! `docs/benchmarks.md`).

use std::hash::{Hash, Hasher};

use compact_str::CompactString;
use hashbrown::HashTable;
use rustc_hash::{FxHashMap, FxHasher};

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

    /// Every key with its state.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&CompactString, &CompactString, &mut V)> {
        let types = &self.types;
        self.entries.iter_mut().map(move |entry| (&entry.sensor_id, &types[entry.type_id as usize], &mut entry.value))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.entries.iter().map(|entry| &entry.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
