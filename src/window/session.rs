//! Session windows: a key's events closer than `gap` to each other form one session,
//! `[first event, last event + gap)`. A session fires when the watermark passes its end.
//!
//! An event whose own window `[t, t + gap)` overlaps sessions merges them, as in Flink.
//! When the merged sessions had fired already (an event within the allowed lateness
//! bridged them or extended one), the merged session fires again with the next revision
//! and names the starts of the results it replaces (`Fired::supersedes`), so the sinks
//! remove those rows: the result of a session is keyed by its start, which a merge can
//! move.

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use super::agg::Agg;
use super::{Fired, Late, NO_EVENT, WindowSpec};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Session {
    start_ms: i64,
    /// Time of its latest event: the session ends at `last_ms + gap`.
    last_ms: i64,
    agg: Agg,
    /// The revision its next result gets (above every revision emitted for its start).
    next_revision: u16,
    /// Whether its current content was emitted.
    fired: bool,
    /// Starts of emitted results this session replaces (sessions merged into it).
    supersedes: SmallVec<[i64; 0]>,
}

/// Session-window state of one key (`WindowSpec::size_ms` is the gap).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionWindows {
    max_event_ms: i64,
    last_ingest_ms: i64,
    /// Events before this are late: the sessions there were closed (past the allowed
    /// lateness, or by an idle flush). A new session never starts before it, so it cannot
    /// take the start (the key of the stored result) of one already closed.
    closed_before_ms: i64,
    /// Sessions by start, not overlapping.
    sessions: SmallVec<[Session; 1]>,
}

impl Default for SessionWindows {
    fn default() -> Self {
        Self { max_event_ms: NO_EVENT, last_ingest_ms: NO_EVENT, closed_before_ms: NO_EVENT, sessions: SmallVec::new() }
    }
}

impl SessionWindows {
    pub fn resumed(max_event_ms: i64, closed_before_ms: i64) -> Self {
        Self { max_event_ms, closed_before_ms, ..Self::default() }
    }

    pub fn watermark(&self, spec: &WindowSpec) -> Option<i64> {
        (self.max_event_ms != NO_EVENT).then(|| self.max_event_ms.saturating_sub(spec.out_of_orderness_ms))
    }

    pub fn horizon(&self) -> (i64, i64) {
        (self.max_event_ms, self.closed_before_ms)
    }

    pub fn last_ingest_ms(&self) -> i64 {
        self.last_ingest_ms
    }

    pub fn open_windows(&self) -> usize {
        self.sessions.len()
    }

    fn emit(session: &mut Session, gap_ms: i64, fired: &mut Vec<Fired>) {
        let features = session.agg.features(session.start_ms, session.last_ms + gap_ms);
        fired.push(Fired {
            features,
            revision: u32::from(session.next_revision),
            supersedes: std::mem::take(&mut session.supersedes).into_vec(),
        });
        session.fired = true;
        session.next_revision = session.next_revision.saturating_add(1);
    }

    pub fn add(
        &mut self,
        spec: &WindowSpec,
        timestamp_ms: i64,
        value: f64,
        ingest_ms: i64,
        fired: &mut Vec<Fired>,
    ) -> Result<(), Late> {
        let gap = spec.size_ms;
        let watermark = self.watermark(spec);
        // The sessions the event's window [t, t + gap) overlaps: a contiguous run.
        let first = self.sessions.partition_point(|s| s.last_ms + gap <= timestamp_ms);
        let mut last = first;
        while last < self.sessions.len() && self.sessions[last].start_ms < timestamp_ms + gap {
            last += 1;
        }
        let merged_start =
            self.sessions.get(first).filter(|_| last > first).map_or(timestamp_ms, |s| s.start_ms.min(timestamp_ms));
        let merged_last = if last > first { self.sessions[last - 1].last_ms.max(timestamp_ms) } else { timestamp_ms };
        if let Some(watermark_ms) = watermark
            && merged_last + gap + spec.allowed_lateness_ms <= watermark_ms
        {
            return Err(Late { window_start_ms: merged_start, watermark_ms });
        }
        if timestamp_ms < self.closed_before_ms {
            return Err(Late {
                window_start_ms: merged_start,
                watermark_ms: watermark.unwrap_or(self.closed_before_ms),
            });
        }
        self.last_ingest_ms = self.last_ingest_ms.max(ingest_ms);

        let mut session = if last > first {
            let mut parts = self.sessions.drain(first..last);
            let mut merged = parts.next().unwrap_or_else(|| unreachable!("a non-empty range"));
            let mut starts: SmallVec<[i64; 2]> = SmallVec::new();
            if merged.next_revision > 0 {
                starts.push(merged.start_ms);
            }
            for part in parts {
                merged.agg.merge(&part.agg);
                merged.last_ms = merged.last_ms.max(part.last_ms);
                merged.next_revision = merged.next_revision.max(part.next_revision);
                merged.supersedes.extend(part.supersedes);
                if part.next_revision > 0 {
                    starts.push(part.start_ms);
                }
            }
            merged.start_ms = merged_start;
            merged.last_ms = merged_last;
            merged.supersedes.extend(starts.into_iter().filter(|start| *start != merged_start));
            merged.supersedes.sort_unstable();
            merged.supersedes.dedup();
            merged.fired = false;
            merged
        } else {
            Session {
                start_ms: timestamp_ms,
                last_ms: timestamp_ms,
                agg: Agg::default(),
                next_revision: 0,
                fired: false,
                supersedes: SmallVec::new(),
            }
        };
        session.agg.add(value);
        // A session whose end the watermark passed already (revised within the allowed
        // lateness, or opened by an out-of-order event): its result goes out now.
        if watermark.is_some_and(|w| session.last_ms + gap <= w) {
            Self::emit(&mut session, gap, fired);
        }
        self.sessions.insert(first, session);

        if timestamp_ms > self.max_event_ms {
            self.max_event_ms = timestamp_ms;
            self.advance(spec, fired);
        }
        Ok(())
    }

    fn advance(&mut self, spec: &WindowSpec, fired: &mut Vec<Fired>) {
        let Some(watermark_ms) = self.watermark(spec) else {
            return;
        };
        let gap = spec.size_ms;
        for session in self.sessions.iter_mut() {
            if session.last_ms + gap > watermark_ms {
                break;
            }
            if !session.fired {
                Self::emit(session, gap, fired);
            }
        }
        let closed_before = &mut self.closed_before_ms;
        self.sessions.retain(|s| {
            let open = s.last_ms + gap + spec.allowed_lateness_ms > watermark_ms;
            if !open {
                *closed_before = (*closed_before).max(s.last_ms + gap);
            }
            open
        });
    }

    pub fn is_idle(&self, spec: &WindowSpec, clock_ms: i64) -> bool {
        !self.sessions.is_empty()
            && self.last_ingest_ms != NO_EVENT
            && clock_ms.saturating_sub(self.last_ingest_ms) >= spec.idle_timeout_ms
    }

    /// Fire every session that has not fired and close them all.
    pub fn flush(&mut self, spec: &WindowSpec, fired: &mut Vec<Fired>) {
        let gap = spec.size_ms;
        for session in self.sessions.iter_mut() {
            if !session.fired {
                Self::emit(session, gap, fired);
            }
        }
        // An event after the last one flushed starts a new session (it would have
        // extended the flushed one: dropping it as late would lose it for nothing, and a
        // new session cannot take the start, the stored key, of a closed one).
        if let Some(last) = self.sessions.last() {
            self.closed_before_ms = self.closed_before_ms.max(last.last_ms + 1);
        }
        self.sessions.clear();
        self.sessions.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::window::WindowKind;

    const SPEC: WindowSpec = WindowSpec {
        kind: WindowKind::Session,
        size_ms: 10_000,
        slide_ms: 10_000,
        out_of_orderness_ms: 2_000,
        allowed_lateness_ms: 0,
        idle_timeout_ms: 60_000,
    };

    fn feed(key: &mut SessionWindows, spec: &WindowSpec, events: &[i64]) -> (Vec<Fired>, usize) {
        let mut fired = Vec::new();
        let mut late = 0;
        for &t in events {
            if key.add(spec, t, t as f64, 0, &mut fired).is_err() {
                late += 1;
            }
        }
        (fired, late)
    }

    #[test]
    fn sessions_fire_when_the_watermark_passes_last_event_plus_gap() {
        let mut key = SessionWindows::default();
        let (fired, _) = feed(&mut key, &SPEC, &[1_000, 5_000, 14_000]);
        assert!(fired.is_empty());
        let (fired, _) = feed(&mut key, &SPEC, &[26_000]); // watermark 24 s = end of [1, 24)
        let got: Vec<_> = fired.iter().map(|f| (f.features.start_ms, f.features.end_ms, f.features.count)).collect();
        assert_eq!(got, vec![(1_000, 24_000, 3)]);
    }

    #[test]
    fn a_late_event_bridging_two_fired_sessions_merges_them_and_supersedes_one() {
        // Watermark 48 s after the third event: [1, 11) stays revisable until 11 + 40 s.
        let spec = WindowSpec { allowed_lateness_ms: 40_000, ..SPEC };
        let mut key = SessionWindows::default();
        let (fired, _) = feed(&mut key, &spec, &[1_000, 20_000, 50_000]);
        let got: Vec<_> = fired.iter().map(|f| (f.features.start_ms, f.features.count, f.revision)).collect();
        assert_eq!(got, vec![(1_000, 1, 0), (20_000, 1, 0)]);
        // 10.5 s: its window [10.5, 20.5) touches both [1, 11) and [20, 30).
        let (fired, late) = feed(&mut key, &spec, &[10_500]);
        assert_eq!(late, 0);
        assert_eq!(fired.len(), 1);
        let merged = &fired[0];
        assert_eq!((merged.features.start_ms, merged.features.end_ms, merged.features.count), (1_000, 30_000, 3));
        assert_eq!(merged.revision, 1);
        assert_eq!(merged.supersedes, vec![20_000]);
        // Extending the start backwards moves the key of the result.
        let (fired, _) = feed(&mut key, &spec, &[-5_000]);
        assert_eq!(fired[0].features.start_ms, -5_000);
        assert_eq!(fired[0].supersedes, vec![1_000]);
        assert_eq!(fired[0].revision, 2);
    }

    #[test]
    fn idle_flush_fires_and_closes() {
        let mut key = SessionWindows::default();
        let (_, _) = feed(&mut key, &SPEC, &[1_000, 3_000]);
        let mut fired = Vec::new();
        assert!(key.is_idle(&SPEC, 60_000));
        key.flush(&SPEC, &mut fired);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].features.end_ms, 13_000);
        assert!(key.add(&SPEC, 2_000, 1.0, 0, &mut fired).is_err(), "inside the closed session");
        assert!(key.add(&SPEC, 3_000, 1.0, 0, &mut fired).is_err(), "its last event's time");
        // After its last event: a new session (it would have extended the flushed one).
        assert!(key.add(&SPEC, 5_000, 1.0, 0, &mut fired).is_ok());
        key.flush(&SPEC, &mut fired);
        assert_eq!((fired[1].features.start_ms, fired[1].features.count), (5_000, 1));
    }

    /// Sessions of sorted timestamps, computed directly: `(start, end, count)`.
    fn sessions_of(sorted: &[i64], gap: i64) -> Vec<(i64, i64, u64)> {
        let mut out: Vec<(i64, i64, u64)> = Vec::new();
        for &t in sorted {
            match out.last_mut() {
                Some((_, end, count)) if t < *end => {
                    *end = (*end).max(t + gap);
                    *count += 1;
                }
                _ => out.push((t, t + gap, 1)),
            }
        }
        out
    }

    proptest::proptest! {
        /// In order, the sessions are exactly the gap-separated runs of the events.
        #[test]
        fn in_order_sessions_are_the_gap_separated_runs(mut times in proptest::collection::vec(0i64..300_000, 0..200)) {
            times.sort_unstable();
            let mut key = SessionWindows::default();
            let (mut fired, late) = feed(&mut key, &SPEC, &times);
            proptest::prop_assert_eq!(late, 0);
            key.flush(&SPEC, &mut fired);
            let got: Vec<_> = fired.iter().map(|f| (f.features.start_ms, f.features.end_ms, f.features.count)).collect();
            proptest::prop_assert_eq!(got, sessions_of(&times, SPEC.size_ms));
        }

        /// Out of order and with lateness: once superseded results are removed, every
        /// event is counted in exactly one session or reported late, and no two final
        /// sessions overlap within the lateness.
        #[test]
        fn every_event_is_in_one_session_or_late(
            events in proptest::collection::vec((0i64..200_000, -8_000i64..1_000), 0..300),
            lateness in proptest::sample::select(vec![0i64, 5_000, 40_000]),
        ) {
            let spec = WindowSpec { allowed_lateness_ms: lateness, ..SPEC };
            let mut key = SessionWindows::default();
            let times: Vec<i64> = events.iter().map(|(t, jitter)| t + jitter).collect();
            let (mut fired, late) = feed(&mut key, &spec, &times);
            key.flush(&spec, &mut fired);
            let mut rows: BTreeMap<i64, (u32, u64)> = BTreeMap::new();
            for f in &fired {
                for start in &f.supersedes {
                    rows.remove(start);
                }
                let entry = rows.entry(f.features.start_ms).or_insert((0, 0));
                proptest::prop_assert!(f.revision >= entry.0, "revisions only grow: {:?}", f);
                *entry = (f.revision, f.features.count);
            }
            let counted: u64 = rows.values().map(|(_, count)| count).sum();
            proptest::prop_assert_eq!(counted as usize + late, times.len());
        }
    }
}
