//! Repeats of one rejection from one client are sampled, so a client that sends a flood
//! of the same invalid event cannot fill the dead-letter store with copies: per client
//! and reason, the first `dead_letters.sample_limit` rejected events of each
//! `dead_letters.sample_window` are stored whole; the rest are counted
//! (`tidemark_dead_letters_sampled_total`) and one summary dead letter per client, reason
//! and window records how many were not stored, with the last one's payload.

use std::collections::HashMap;

use parking_lot::Mutex;

use crate::messages::{DeadLetter, RejectReason};

struct Bucket {
    minute: i64,
    kept: u32,
    dropped: u64,
    first_dropped_ms: i64,
    last_dropped: Option<DeadLetter>,
}

pub struct DeadLetterSampler {
    per_window: u32,
    window_ms: i64,
    buckets: Mutex<HashMap<(String, RejectReason), Bucket>>,
}

impl DeadLetterSampler {
    /// `None` when `per_window` is 0 (every rejected event is stored).
    pub fn new(per_window: u32, window: std::time::Duration) -> Option<Self> {
        let window_ms = i64::try_from(window.as_millis()).unwrap_or(i64::MAX).max(1);
        (per_window > 0).then(|| Self { per_window, window_ms, buckets: Mutex::new(HashMap::new()) })
    }

    /// The letters of one request from `client` to store: those within the sample, plus
    /// the summaries of this client's windows that have ended. Also returns how many
    /// were counted and not stored, per reason.
    pub fn sample(
        &self,
        client: &str,
        letters: Vec<DeadLetter>,
        now_ms: i64,
    ) -> (Vec<DeadLetter>, Vec<(RejectReason, u64)>) {
        let minute = now_ms.div_euclid(self.window_ms);
        let mut kept = Vec::with_capacity(letters.len().min(self.per_window as usize));
        let mut dropped: Vec<(RejectReason, u64)> = Vec::new();
        let mut buckets = self.buckets.lock();
        for letter in letters {
            let bucket = buckets.entry((client.to_string(), letter.reason)).or_insert_with(|| Bucket {
                minute,
                kept: 0,
                dropped: 0,
                first_dropped_ms: now_ms,
                last_dropped: None,
            });
            if bucket.minute != minute {
                if let Some(summary) = self.summary(client, letter.reason, bucket) {
                    kept.push(summary);
                }
                *bucket = Bucket { minute, kept: 0, dropped: 0, first_dropped_ms: now_ms, last_dropped: None };
            }
            if bucket.kept < self.per_window {
                bucket.kept += 1;
                kept.push(letter);
            } else {
                if bucket.dropped == 0 {
                    bucket.first_dropped_ms = now_ms;
                }
                bucket.dropped += 1;
                match dropped.iter_mut().find(|(reason, _)| *reason == letter.reason) {
                    Some((_, count)) => *count += 1,
                    None => dropped.push((letter.reason, 1)),
                }
                bucket.last_dropped = Some(letter);
            }
        }
        (kept, dropped)
    }

    /// Summaries of every window that ended before `now_ms`; those buckets are forgotten.
    pub fn flush(&self, now_ms: i64) -> Vec<DeadLetter> {
        let minute = now_ms.div_euclid(self.window_ms);
        let mut summaries = Vec::new();
        self.buckets.lock().retain(|(client, reason), bucket| {
            if bucket.minute >= minute {
                return true;
            }
            summaries.extend(self.summary(client, *reason, bucket));
            false
        });
        summaries
    }

    fn summary(&self, client: &str, reason: RejectReason, bucket: &mut Bucket) -> Option<DeadLetter> {
        let mut letter = bucket.last_dropped.take()?;
        let until = (bucket.minute + 1).saturating_mul(self.window_ms);
        letter.error = format!(
            "{} more events from {client} rejected as {} between {} and {} were counted, not stored \
             (dead_letters.sample_limit = {} per {}); the payload is the last of them: {}",
            bucket.dropped,
            reason.as_str(),
            crate::store::ser::rfc3339(bucket.first_dropped_ms),
            crate::store::ser::rfc3339(until),
            self.per_window,
            humantime::format_duration(std::time::Duration::from_millis(u64::try_from(self.window_ms).unwrap_or(0))),
            letter.error
        );
        letter.received_at_ms = letter.received_at_ms.max(bucket.first_dropped_ms);
        Some(letter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Source;

    fn letter(reason: RejectReason, n: usize) -> DeadLetter {
        DeadLetter {
            received_at_ms: 0,
            source: Source::Http,
            reason,
            error: format!("event {n}: bad"),
            sensor_id: None,
            event_type: None,
            event_time_ms: None,
            partition: None,
            position: None,
            payload: format!("{{\"n\":{n}}}"),
        }
    }

    #[test]
    fn the_first_of_each_minute_are_kept_and_the_rest_summarised() {
        let sampler = DeadLetterSampler::new(10, std::time::Duration::from_secs(60)).expect("on");
        const MINUTE_MS: i64 = 60_000;
        let t0 = 1_767_225_600_000;
        let flood: Vec<_> = (0..25).map(|n| letter(RejectReason::WrongType, n)).collect();
        let (kept, dropped) = sampler.sample("client 10.0.0.1", flood, t0);
        assert_eq!(kept.len(), 10);
        assert_eq!(dropped, vec![(RejectReason::WrongType, 15)]);
        // Another client and another reason have their own samples.
        let (kept, _) = sampler.sample("API key \"b\"", vec![letter(RejectReason::WrongType, 0)], t0);
        assert_eq!(kept.len(), 1);
        let (kept, _) = sampler.sample("client 10.0.0.1", vec![letter(RejectReason::Late, 0)], t0);
        assert_eq!(kept.len(), 1);
        assert!(sampler.flush(t0 + 1_000).is_empty(), "the minute is still running");
        let summaries = sampler.flush(t0 + MINUTE_MS);
        assert_eq!(summaries.len(), 1, "one summary for the client and reason that overflowed");
        assert!(summaries[0].error.starts_with("15 more events from client 10.0.0.1 rejected as wrong_type"));
        assert_eq!(summaries[0].payload, "{\"n\":24}");
        let (kept, dropped) =
            sampler.sample("client 10.0.0.1", vec![letter(RejectReason::WrongType, 0)], t0 + MINUTE_MS);
        assert_eq!((kept.len(), dropped.len()), (1, 0), "a new minute, a new sample");
    }
}
