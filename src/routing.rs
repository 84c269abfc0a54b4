//! Which partition a sensor belongs to: Kafka's default partitioner (murmur2 of the key,
//! made positive, modulo the partition count).
//!
//! Using Kafka's function means a sensor lands on the same partition whether its events
//! arrive over HTTP (embedded router) or through a Kafka topic keyed by `sensorId` and
//! produced with the default partitioner of the Java client or librdkafka's
//! `murmur2_random`, so embedded checkpoints and Kafka partitions agree.

use crate::messages::PartitionId;

/// MurmurHash2 as Kafka computes it (seed 0x9747b28c, little-endian words).
pub fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= u32::from(tail[2]) << 16;
    }
    if tail.len() >= 2 {
        h ^= u32::from(tail[1]) << 8;
    }
    if !tail.is_empty() {
        h ^= u32::from(tail[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

/// The partition of `sensor_id` among `partitions`.
#[inline]
pub fn partition_for(sensor_id: &str, partitions: u32) -> PartitionId {
    (murmur2(sensor_id.as_bytes()) & 0x7fff_ffff) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Vectors from librdkafka's `unittest_murmur2`, which match the Java client.
    #[test]
    fn matches_kafka_vectors() {
        let cases: [(&str, u32); 11] = [
            ("kafka", 0xd067cf64),
            ("giberish123456789", 0x8f552b0c),
            ("1234", 0x9fc97b14),
            ("234", 0xe7c009ca),
            ("34", 0x873930da),
            ("4", 0x5a4b5ca1),
            ("PreAmbleWillBeRemoved,ThePrePartThatIs", 0x78424f1c),
            ("reAmbleWillBeRemoved,ThePrePartThatIs", 0x4a62b377),
            ("eAmbleWillBeRemoved,ThePrePartThatIs", 0xe0e4e09e),
            ("AmbleWillBeRemoved,ThePrePartThatIs", 0x62b8b43f),
            ("", 0x106e08d9),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2(key.as_bytes()), expected, "key {key:?}");
        }
    }

    #[test]
    fn partitions_are_in_range_and_spread() {
        let mut counts = [0u32; 4];
        for i in 0..4000 {
            counts[partition_for(&format!("sensor-{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (800..1200).contains(&c)), "{counts:?}");
    }
}
