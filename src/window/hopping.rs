//! Hopping (sliding) windows: `[s, s + size)` for every `s` a multiple of `slide`, so an
//! event counts in `size / slide` windows.
//!
//! State is shared between the overlapping windows: values go into *panes* of
//! `gcd(size, slide)` (one pane per slide when the size is a multiple of it). A running
//! aggregate of the window that fired last slides with the windows: the next one is it
//! minus the panes that left plus those that came in (minimum and maximum are recomputed
//! only when a leaving pane held one; the whole aggregate once per `size / pane` slides,
//! so rounding cannot build up). An event costs one pane update whatever `size / slide`
//! is, and a firing a few panes, not `size / pane` of them: a 10 m / 10 s window costs
//! per event about what a tumbling one does (`docs/benchmarks.md`).
//!
//! Lateness is per window, as in Flink: an event counts in every window covering it
//! whose end plus the allowed lateness the watermark has not reached; it is late (and
//! dead-lettered) only when that holds for none of them.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use super::agg::Agg;
use super::{Fired, Late, NO_EVENT, WindowSpec};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Pane {
    start_ms: i64,
    agg: Agg,
}

/// `head_start_ms` when there is no newest pane: no event time reaches it, so the fast
/// path's one comparison sends every event to the slow path.
const NO_HEAD: i64 = i64::MAX;

/// Hopping-window state of one key. What an in-order event touches (the newest pane, the
/// key's clocks, when the next window is due) lives here, inline in the key's entry;
/// the panes the windows share and the running window live behind `cold`, which an
/// event reaches only when a window is due or it starts a new pane (once per pane).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(from = "OwnedWire")]
pub struct HoppingWindows {
    max_event_ms: i64,
    last_ingest_ms: i64,
    /// Start of the newest pane, where in-order events go (`NO_HEAD`: none). It joins
    /// `cold.panes` when a newer one starts or a window needs it.
    head_start_ms: i64,
    /// The newest event time at which `advance` has work (a window due or one closing);
    /// `NO_EVENT`: look at every new newest event.
    due_ms: i64,
    head: Agg,
    cold: Box<Cold>,
}

#[derive(Clone, Debug, PartialEq)]
struct Cold {
    /// Windows starting before this were closed by an idle flush (so events before it
    /// are late: every window covering them is closed).
    closed_before_ms: i64,
    /// Windows starting before this have fired (or were empty when the watermark passed
    /// their end); `NO_EVENT`: none yet.
    next_start_ms: i64,
    /// Panes holding values, by start, but the newest.
    panes: VecDeque<Pane>,
    /// Windows that fired and are still within the allowed lateness: `(start, revision)`
    /// (kept only when the lateness is above 0).
    emitted: SmallVec<[(i64, u16); 2]>,
    /// The panes of `[run_start_ms, run_start_ms + size)` merged (`NO_EVENT`: none).
    run: Agg,
    run_start_ms: i64,
    /// Slides since `run` was last merged from its panes.
    run_age: u32,
    /// The last window start that `purge` found closed (`NO_EVENT`: none yet).
    purged_through_ms: i64,
    /// The running window's candidates for its maximum and minimum: `(pane start,
    /// extreme)` in pane order, each larger (smaller) than every later one. The front is
    /// the window's extreme; a pane leaving takes its entry with it (monotonic queues:
    /// amortised O(1) per slide, whatever the trend of the values).
    maxima: VecDeque<(i64, f64)>,
    minima: VecDeque<(i64, f64)>,
}

impl Default for Cold {
    fn default() -> Self {
        Self {
            closed_before_ms: NO_EVENT,
            next_start_ms: NO_EVENT,
            panes: VecDeque::new(),
            emitted: SmallVec::new(),
            run: Agg::default(),
            run_start_ms: NO_EVENT,
            run_age: 0,
            purged_through_ms: NO_EVENT,
            maxima: VecDeque::new(),
            minima: VecDeque::new(),
        }
    }
}

impl Default for HoppingWindows {
    fn default() -> Self {
        Self {
            max_event_ms: NO_EVENT,
            last_ingest_ms: NO_EVENT,
            head_start_ms: NO_HEAD,
            due_ms: NO_EVENT,
            head: Agg::default(),
            cold: Box::default(),
        }
    }
}

/// The checkpointed form (state format 3 and later), whatever the layout in memory: owned when
/// read, borrowed when written (so a checkpoint does not copy the panes).
#[derive(Serialize, Deserialize)]
struct HoppingWire<Panes, Emitted, Run, Queue> {
    max_event_ms: i64,
    last_ingest_ms: i64,
    closed_before_ms: i64,
    next_start_ms: i64,
    panes: Panes,
    head: Pane,
    emitted: Emitted,
    run: Run,
    run_start_ms: i64,
    run_age: u32,
    purged_through_ms: i64,
    maxima: Queue,
    minima: Queue,
}

type OwnedWire = HoppingWire<VecDeque<Pane>, SmallVec<[(i64, u16); 2]>, Agg, VecDeque<(i64, f64)>>;

impl From<OwnedWire> for HoppingWindows {
    fn from(wire: OwnedWire) -> Self {
        let has_head = wire.head.start_ms != NO_EVENT;
        Self {
            max_event_ms: wire.max_event_ms,
            last_ingest_ms: wire.last_ingest_ms,
            head_start_ms: if has_head { wire.head.start_ms } else { NO_HEAD },
            due_ms: NO_EVENT,
            head: if has_head { wire.head.agg } else { Agg::default() },
            cold: Box::new(Cold {
                closed_before_ms: wire.closed_before_ms,
                next_start_ms: wire.next_start_ms,
                panes: wire.panes,
                emitted: wire.emitted,
                run: wire.run,
                run_start_ms: wire.run_start_ms,
                run_age: wire.run_age,
                purged_through_ms: wire.purged_through_ms,
                maxima: wire.maxima,
                minima: wire.minima,
            }),
        }
    }
}

impl Serialize for HoppingWindows {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let cold = &*self.cold;
        let head = match self.head_start_ms {
            NO_HEAD => Pane { start_ms: NO_EVENT, agg: Agg::default() },
            start_ms => Pane { start_ms, agg: self.head },
        };
        HoppingWire {
            max_event_ms: self.max_event_ms,
            last_ingest_ms: self.last_ingest_ms,
            closed_before_ms: cold.closed_before_ms,
            next_start_ms: cold.next_start_ms,
            panes: &cold.panes,
            head,
            emitted: &cold.emitted,
            run: &cold.run,
            run_start_ms: cold.run_start_ms,
            run_age: cold.run_age,
            purged_through_ms: cold.purged_through_ms,
            maxima: &cold.maxima,
            minima: &cold.minima,
        }
        .serialize(serializer)
    }
}

fn floor_to(value: i64, step: i64) -> i64 {
    value - value.rem_euclid(step)
}

impl HoppingWindows {
    pub fn resumed(max_event_ms: i64, closed_before_ms: i64) -> Self {
        Self { max_event_ms, cold: Box::new(Cold { closed_before_ms, ..Cold::default() }), ..Self::default() }
    }

    pub fn watermark(&self, spec: &WindowSpec) -> Option<i64> {
        (self.max_event_ms != NO_EVENT).then(|| self.max_event_ms.saturating_sub(spec.out_of_orderness_ms))
    }

    pub fn horizon(&self) -> (i64, i64) {
        (self.max_event_ms, self.cold.closed_before_ms)
    }

    pub fn last_ingest_ms(&self) -> i64 {
        self.last_ingest_ms
    }

    /// Panes holding values (windows share them; a key with none holds no window).
    pub fn open_windows(&self) -> usize {
        self.cold.panes.len() + usize::from(self.head_start_ms != NO_HEAD)
    }

    /// Move the newest pane into `panes` if it starts before `end_ms` (a window ending
    /// there needs it).
    fn seal_before(&mut self, end_ms: i64) {
        if self.head_start_ms != NO_HEAD && self.head_start_ms < end_ms {
            let agg = std::mem::take(&mut self.head);
            self.cold.panes.push_back(Pane { start_ms: self.head_start_ms, agg });
            self.head_start_ms = NO_HEAD;
        }
    }

    /// Start of the pane at `index` of `panes` followed by the newest.
    fn pane_start_at(&self, index: usize) -> Option<i64> {
        match self.cold.panes.get(index) {
            Some(pane) => Some(pane.start_ms),
            None if index == self.cold.panes.len() && self.head_start_ms != NO_HEAD => Some(self.head_start_ms),
            None => None,
        }
    }

    /// Start of the first window covering time `t`.
    fn first_covering(&self, spec: &WindowSpec, t: i64) -> i64 {
        floor_to(t - spec.size_ms, spec.slide_ms) + spec.slide_ms
    }

    fn closed(spec: &WindowSpec, window_start_ms: i64, watermark_ms: Option<i64>) -> bool {
        watermark_ms.is_some_and(|w| window_start_ms + spec.size_ms + spec.allowed_lateness_ms <= w)
    }

    #[inline]
    pub fn add(
        &mut self,
        spec: &WindowSpec,
        timestamp_ms: i64,
        value: f64,
        ingest_ms: i64,
        fired: &mut Vec<Fired>,
    ) -> Result<(), Late> {
        // Fast path, most events: in the newest pane. No window covering it has fired or
        // closed (window ends are pane boundaries, and the watermark is before its end),
        // so nothing is revised and the event cannot be late.
        if timestamp_ms >= self.head_start_ms && timestamp_ms - self.head_start_ms < spec.pane_ms() {
            self.head.add(value);
            self.last_ingest_ms = self.last_ingest_ms.max(ingest_ms);
            if timestamp_ms > self.max_event_ms {
                self.max_event_ms = timestamp_ms;
                if timestamp_ms >= self.due_ms {
                    self.advance(spec, fired);
                }
            }
            return Ok(());
        }
        self.add_slow(spec, timestamp_ms, value, ingest_ms, fired)
    }

    #[inline(never)]
    fn add_slow(
        &mut self,
        spec: &WindowSpec,
        timestamp_ms: i64,
        value: f64,
        ingest_ms: i64,
        fired: &mut Vec<Fired>,
    ) -> Result<(), Late> {
        let pane_ms = spec.pane_ms();
        let pane_start = floor_to(timestamp_ms, pane_ms);
        let last_covering = floor_to(timestamp_ms, spec.slide_ms);
        let watermark = self.watermark(spec);
        if Self::closed(spec, last_covering, watermark) {
            return Err(Late { window_start_ms: last_covering, watermark_ms: watermark.unwrap_or(NO_EVENT) });
        }
        if timestamp_ms < self.cold.closed_before_ms {
            return Err(Late {
                window_start_ms: last_covering,
                watermark_ms: watermark.unwrap_or(self.cold.closed_before_ms),
            });
        }
        self.last_ingest_ms = self.last_ingest_ms.max(ingest_ms);
        // In order, the event's pane is the newest or a new one: look there first (a
        // binary search would touch a cache line per step, for every event).
        if pane_start == self.head_start_ms {
            self.head.add(value);
        } else if (self.head_start_ms != NO_HEAD && pane_start > self.head_start_ms)
            || (self.head_start_ms == NO_HEAD && self.cold.panes.back().is_none_or(|last| last.start_ms < pane_start))
        {
            let mut head = Agg::default();
            head.add(value);
            let previous = std::mem::replace(&mut self.head, head);
            if self.head_start_ms != NO_HEAD {
                self.cold.panes.push_back(Pane { start_ms: self.head_start_ms, agg: previous });
            }
            self.head_start_ms = pane_start;
        } else {
            // Out of order: before the newest pane (or in a pane already sealed).
            let panes = &mut self.cold.panes;
            let index = panes.partition_point(|pane| pane.start_ms < pane_start);
            if panes.get(index).is_none_or(|pane| pane.start_ms != pane_start) {
                panes.insert(index, Pane { start_ms: pane_start, agg: Agg::default() });
            }
            panes[index].agg.add(value);
        }
        let cold = &mut self.cold;
        if cold.run_start_ms != NO_EVENT && (cold.run_start_ms..cold.run_start_ms + spec.size_ms).contains(&pane_start)
        {
            // A late event in the window that fired last (its panes' extremes are
            // queued already): merge that window afresh when the next one fires.
            cold.run_start_ms = NO_EVENT;
        }

        // Windows covering the event that already fired and are still open: revise them.
        if self.cold.next_start_ms != NO_EVENT {
            let mut start = self.first_covering(spec, timestamp_ms).max(self.cold.closed_before_ms);
            while start < self.cold.next_start_ms && start <= last_covering {
                if !Self::closed(spec, start, watermark) {
                    self.seal_before(start + spec.size_ms);
                    let revision = match self.cold.emitted.iter_mut().find(|(s, _)| *s == start) {
                        Some((_, revision)) => {
                            *revision = revision.saturating_add(1);
                            *revision
                        }
                        None => {
                            // Empty when the watermark passed it: this is its first result.
                            self.cold.emitted.push((start, 0));
                            0
                        }
                    };
                    fired.push(Fired {
                        features: self.window(spec, start),
                        revision: u32::from(revision),
                        supersedes: Vec::new(),
                    });
                }
                start += spec.slide_ms;
            }
        }

        if timestamp_ms > self.max_event_ms {
            self.max_event_ms = timestamp_ms;
            self.advance(spec, fired);
        }
        Ok(())
    }

    /// The features of window `[start, start + size)` from its panes.
    fn window(&self, spec: &WindowSpec, start_ms: i64) -> super::WindowFeatures {
        self.cold.merged(start_ms, start_ms + spec.size_ms).features(start_ms, start_ms + spec.size_ms)
    }

    /// Fire the windows the watermark has passed, in start order, skipping empty ones;
    /// drop panes no open window covers.
    fn advance(&mut self, spec: &WindowSpec, fired: &mut Vec<Fired>) {
        let Some(watermark_ms) = self.watermark(spec) else {
            return;
        };
        // The last window whose end the watermark reached.
        self.fire_through(spec, floor_to(watermark_ms - spec.size_ms, spec.slide_ms), fired);
        self.purge(spec, watermark_ms);
        // Nothing changes until the watermark reaches the next window's end (then it
        // fires) or the next closing (then `purge` drops panes): both once per slide.
        let cold = &self.cold;
        self.due_ms = if cold.next_start_ms == NO_EVENT || cold.purged_through_ms == NO_EVENT {
            NO_EVENT
        } else {
            let fire = cold.next_start_ms.saturating_add(spec.size_ms);
            let close = cold.purged_through_ms.saturating_add(spec.slide_ms + spec.size_ms + spec.allowed_lateness_ms);
            fire.min(close).saturating_add(spec.out_of_orderness_ms)
        };
    }

    /// Fire the windows holding values that start at or before `last_start` and have not
    /// fired; afterwards every window up to `last_start` counts as handled.
    fn fire_through(&mut self, spec: &WindowSpec, last_start: i64, fired: &mut Vec<Fired>) {
        if self.cold.next_start_ms != NO_EVENT && self.cold.next_start_ms > last_start {
            return; // handled already (most events: windows fire once per slide)
        }
        // The windows firing end by the watermark, before the newest pane (it holds the
        // newest event): it is needed only by a flush, which seals it first.
        self.seal_before(last_start + spec.size_ms);
        let Some(first_pane) = self.pane_start_at(0) else {
            return;
        };
        let mut start = self.first_covering(spec, first_pane);
        if self.cold.next_start_ms != NO_EVENT {
            start = start.max(self.cold.next_start_ms);
        }
        while start <= last_start {
            // The first pane at or after `start`: if the window holds none, jump to the
            // first window that covers that pane (never past `last_start`).
            let index = self.cold.first_at_or_after(start);
            let Some(pane_start) = self.pane_start_at(index) else {
                start = last_start + spec.slide_ms; // every window left is empty
                break;
            };
            if pane_start >= start + spec.size_ms {
                start =
                    self.first_covering(spec, pane_start).max(start + spec.slide_ms).min(last_start + spec.slide_ms);
                continue;
            }
            let features = self.cold.fire_window(spec, start);
            fired.push(Fired { features, revision: 0, supersedes: Vec::new() });
            if spec.allowed_lateness_ms > 0 {
                self.cold.emitted.push((start, 0));
            }
            start += spec.slide_ms;
        }
        // Never past the first window not handled (an empty window the watermark has
        // not passed yet may still receive an out-of-order event).
        let handled = start.min(last_start + spec.slide_ms);
        if self.cold.next_start_ms == NO_EVENT || handled > self.cold.next_start_ms {
            self.cold.next_start_ms = handled;
        }
    }

    fn purge(&mut self, spec: &WindowSpec, watermark_ms: i64) {
        // Windows close once per slide: between two closings there is nothing to drop
        // (and the oldest pane, a cache miss away, need not be looked at).
        let closing = floor_to(watermark_ms - spec.size_ms - spec.allowed_lateness_ms, spec.slide_ms);
        if closing == self.cold.purged_through_ms {
            return;
        }
        self.cold.purged_through_ms = closing;
        if self.cold.panes.is_empty() {
            self.seal_before(i64::MAX); // the newest pane may be the one to go
        }
        let pane_ms = spec.pane_ms();
        while let Some(&Pane { start_ms: pane_start, agg }) = self.cold.panes.front() {
            let last_covering = floor_to(pane_start + pane_ms - 1, spec.slide_ms);
            if Self::closed(spec, last_covering, Some(watermark_ms)) {
                let cold = &mut *self.cold;
                if cold.run_start_ms != NO_EVENT && pane_start >= cold.run_start_ms {
                    if pane_start < cold.run_start_ms + spec.size_ms {
                        // A pane of the running window goes: take it out now (the next
                        // window does not cover it), so the window can still slide.
                        cold.run.subtract(&agg);
                    } else {
                        cold.run_start_ms = NO_EVENT; // merge afresh next time
                    }
                }
                cold.panes.pop_front();
            } else {
                break;
            }
        }
        self.cold.emitted.retain(|(start, _)| !Self::closed(spec, *start, Some(watermark_ms)));
    }

    pub fn is_idle(&self, spec: &WindowSpec, clock_ms: i64) -> bool {
        self.open_windows() > 0
            && self.last_ingest_ms != NO_EVENT
            && clock_ms.saturating_sub(self.last_ingest_ms) >= spec.idle_timeout_ms
    }

    /// Fire every window holding values that has not fired, and close them all.
    pub fn flush(&mut self, spec: &WindowSpec, fired: &mut Vec<Fired>) {
        self.seal_before(i64::MAX);
        if let Some(last) = self.cold.panes.back().map(|pane| pane.start_ms) {
            let last_covering = floor_to(last + spec.pane_ms() - 1, spec.slide_ms);
            self.fire_through(spec, last_covering, fired);
            self.cold.closed_before_ms = self.cold.closed_before_ms.max(last_covering + spec.slide_ms);
        }
        self.cold.panes.clear();
        self.cold.panes.shrink_to_fit();
        self.cold.emitted.clear();
        self.cold.run_start_ms = NO_EVENT;
        self.cold.maxima.clear();
        self.cold.minima.clear();
        self.due_ms = NO_EVENT;
    }
}

impl Cold {
    /// Index of the first pane starting at or after `from`. The windows fire from the
    /// oldest panes, so it is usually among the first few: look there before searching.
    fn first_at_or_after(&self, from_ms: i64) -> usize {
        for (index, pane) in self.panes.iter().take(4).enumerate() {
            if pane.start_ms >= from_ms {
                return index;
            }
        }
        self.panes.partition_point(|pane| pane.start_ms < from_ms)
    }

    /// The panes of `[from, to)` merged.
    fn merged(&self, from_ms: i64, to_ms: i64) -> Agg {
        let first = self.first_at_or_after(from_ms);
        let mut agg = Agg::default();
        for pane in self.panes.range(first..) {
            if pane.start_ms >= to_ms {
                break;
            }
            agg.merge(&pane.agg);
        }
        agg
    }

    /// The features of window `start`, from the running aggregate moved there: by
    /// sliding it when the window is the next one, by merging its panes otherwise.
    fn fire_window(&mut self, spec: &WindowSpec, start_ms: i64) -> super::WindowFeatures {
        let end_ms = start_ms + spec.size_ms;
        let panes_per_window = u32::try_from(spec.size_ms / spec.pane_ms()).unwrap_or(u32::MAX);
        let next = self.run_start_ms != NO_EVENT && start_ms == self.run_start_ms + spec.slide_ms;
        if self.run_start_ms == start_ms {
            // Already there.
        } else if next && self.run_age < panes_per_window {
            let (old_start, old_end) = (self.run_start_ms, self.run_start_ms + spec.size_ms);
            let leaving = self.merged(old_start, start_ms);
            self.run.subtract(&leaving);
            for queue in [&mut self.maxima, &mut self.minima] {
                while queue.front().is_some_and(|(pane, _)| *pane < start_ms) {
                    queue.pop_front();
                }
            }
            // The entering panes, oldest first.
            let first = self.panes.len() - self.panes.iter().rev().take_while(|pane| pane.start_ms >= old_end).count();
            self.take_in(first, end_ms);
            self.run_age += 1;
        } else {
            self.run = Agg::default();
            self.maxima.clear();
            self.minima.clear();
            self.take_in(self.first_at_or_after(start_ms), end_ms);
            self.run_age = 0;
        }
        if let (Some((_, max)), Some((_, min))) = (self.maxima.front(), self.minima.front()) {
            (self.run.max, self.run.min) = (*max, *min);
        }
        if self.run.min == self.run.max {
            self.run.m2 = 0.0; // equal values: no rounding residue
        }
        self.run_start_ms = start_ms;
        self.run.features(start_ms, end_ms)
    }

    /// Merge the panes from index `first` that start before `end_ms` into the running
    /// aggregate, queueing their extremes.
    fn take_in(&mut self, first: usize, end_ms: i64) {
        for index in first..self.panes.len() {
            let (pane_start, agg) = (self.panes[index].start_ms, self.panes[index].agg);
            if pane_start >= end_ms {
                break;
            }
            self.run.merge(&agg);
            Self::enqueue(&mut self.maxima, &mut self.minima, pane_start, &agg);
        }
    }

    /// Queue a pane entering the running window as a candidate extreme.
    fn enqueue(maxima: &mut VecDeque<(i64, f64)>, minima: &mut VecDeque<(i64, f64)>, pane_start: i64, agg: &Agg) {
        if agg.count == 0 {
            return;
        }
        while maxima.back().is_some_and(|(_, max)| *max <= agg.max) {
            maxima.pop_back();
        }
        maxima.push_back((pane_start, agg.max));
        while minima.back().is_some_and(|(_, min)| *min >= agg.min) {
            minima.pop_back();
        }
        minima.push_back((pane_start, agg.min));
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::window::{WindowFeatures, WindowKind};

    const SPEC: WindowSpec = WindowSpec {
        kind: WindowKind::Hopping,
        size_ms: 30_000,
        slide_ms: 10_000,
        out_of_orderness_ms: 5_000,
        allowed_lateness_ms: 0,
        idle_timeout_ms: 60_000,
    };

    #[test]
    fn an_event_counts_in_every_window_covering_it() {
        let mut key = HoppingWindows::default();
        let mut fired = Vec::new();
        key.add(&SPEC, 25_000, 2.0, 0, &mut fired).unwrap();
        key.add(&SPEC, 100_000, 1.0, 0, &mut fired).unwrap();
        // 25 s is in [0, 30), [10, 40) and [20, 50): all fired by watermark 95 s.
        let starts: Vec<(i64, i64, u64)> =
            fired.iter().map(|f| (f.features.start_ms, f.features.end_ms, f.features.count)).collect();
        assert_eq!(starts, vec![(0, 30_000, 1), (10_000, 40_000, 1), (20_000, 50_000, 1)]);
        assert!(fired.iter().all(|f| f.revision == 0 && f.features.mean == 2.0));
        assert_eq!(key.open_windows(), 1, "the 25 s pane is purged, the 100 s one remains");
    }

    #[test]
    fn windows_fire_once_their_end_is_passed_and_merge_panes() {
        let mut key = HoppingWindows::default();
        let mut fired = Vec::new();
        for (t, v) in [(1_000, 1.0), (12_000, 3.0), (24_000, 5.0), (34_000, 7.0)] {
            key.add(&SPEC, t, v, 0, &mut fired).unwrap();
        }
        // Watermark 29 s: [0, 30) is not due yet.
        assert!(fired.iter().all(|f| f.features.end_ms <= 29_000), "{fired:?}");
        let before = fired.len();
        key.add(&SPEC, 35_000, 9.0, 0, &mut fired).unwrap();
        let new: Vec<_> =
            fired[before..].iter().map(|f| (f.features.start_ms, f.features.count, f.features.mean)).collect();
        assert_eq!(new, vec![(0, 3, 3.0)], "watermark 30 s fires [0, 30) with the three panes merged");
        let f = fired[before].features;
        assert_eq!((f.min, f.max), (1.0, 5.0));
        assert!((f.stddev - (8.0f64 / 3.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn allowed_lateness_revises_only_the_windows_still_open() {
        let spec = WindowSpec { allowed_lateness_ms: 10_000, ..SPEC };
        let mut key = HoppingWindows::default();
        let mut fired = Vec::new();
        key.add(&spec, 25_000, 1.0, 0, &mut fired).unwrap();
        key.add(&spec, 50_000, 1.0, 0, &mut fired).unwrap(); // watermark 45 s
        fired.clear();
        // 26 s: [0, 30) closed at 30 + 10 = 40 ≤ 45; [10, 40) fired and open; [20, 50) not due.
        key.add(&spec, 26_000, 3.0, 0, &mut fired).unwrap();
        let revised: Vec<_> = fired.iter().map(|f| (f.features.start_ms, f.revision, f.features.count)).collect();
        assert_eq!(revised, vec![(10_000, 1, 2)]);
        // An event only in closed windows is late.
        assert!(key.add(&spec, 9_000, 1.0, 0, &mut fired).is_err());
    }

    #[test]
    fn idle_flush_fires_every_window_holding_values_and_closes_them() {
        let mut key = HoppingWindows::default();
        let mut fired = Vec::new();
        key.add(&SPEC, 25_000, 1.0, 0, &mut fired).unwrap();
        assert!(key.is_idle(&SPEC, 60_000));
        key.flush(&SPEC, &mut fired);
        let starts: Vec<i64> = fired.iter().map(|f| f.features.start_ms).collect();
        assert_eq!(starts, vec![0, 10_000, 20_000]);
        assert!(key.add(&SPEC, 29_000, 1.0, 0, &mut fired).is_err(), "its windows are closed");
        fired.clear();
        key.add(&SPEC, 31_000, 1.0, 0, &mut fired).unwrap();
        key.add(&SPEC, 90_000, 1.0, 0, &mut fired).unwrap();
        let starts: Vec<(i64, u64)> = fired.iter().map(|f| (f.features.start_ms, f.features.count)).collect();
        // 31 s is covered by [10, 40), [20, 50) (closed by the flush) and [30, 60).
        assert_eq!(starts, vec![(30_000, 1)], "only windows after the flush");
    }

    #[test]
    fn a_silent_key_skips_empty_windows_without_walking_them() {
        let spec = WindowSpec { size_ms: 600_000, slide_ms: 10_000, ..SPEC };
        let mut key = HoppingWindows::default();
        let mut fired = Vec::new();
        key.add(&spec, 0, 1.0, 0, &mut fired).unwrap();
        key.add(&spec, 86_400_000 * 365, 1.0, 0, &mut fired).unwrap();
        assert_eq!(fired.len(), 60, "the 60 windows covering the first event, none of the empty ones");
    }

    /// A checkpoint taken mid-stream (any layout in memory, the same bytes on disk)
    /// restores a key that goes on exactly as the one that was not stopped.
    #[test]
    fn a_restored_key_continues_exactly() {
        let spec = WindowSpec { size_ms: 60_000, slide_ms: 10_000, allowed_lateness_ms: 7_000, ..SPEC };
        let events: Vec<(i64, f64)> =
            (0..400).map(|i| (i * 997 - (i % 5) * 3_000, ((i * 7919) % 101) as f64)).collect();
        for cut in [0, 1, 37, 150, 399] {
            let mut key = HoppingWindows::default();
            let mut fired = Vec::new();
            for &(t, v) in &events[..cut] {
                let _ = key.add(&spec, t, v, t, &mut fired);
            }
            let bytes = postcard::to_allocvec(&key).unwrap();
            let mut restored: HoppingWindows = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(postcard::to_allocvec(&restored).unwrap(), bytes);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for &(t, v) in &events[cut..] {
                assert_eq!(key.add(&spec, t, v, t, &mut a).is_ok(), restored.add(&spec, t, v, t, &mut b).is_ok());
            }
            key.flush(&spec, &mut a);
            restored.flush(&spec, &mut b);
            assert_eq!(a, b, "cut at {cut}");
        }
    }

    proptest::proptest! {
        /// Every event counts in exactly the windows covering it that were open when it
        /// arrived (end + lateness above the watermark); an event is late only when no
        /// such window exists; no window fires before the watermark passes its end.
        #[test]
        fn counts_match_a_direct_computation(
            events in proptest::collection::vec((0i64..200_000, -1000i64..1000), 0..300),
            size_slide in proptest::sample::select(vec![(30_000i64, 10_000i64), (30_000, 30_000), (20_000, 15_000), (60_000, 5_000)]),
            lateness in proptest::sample::select(vec![0i64, 7_000, 20_000]),
        ) {
            let spec = WindowSpec { size_ms: size_slide.0, slide_ms: size_slide.1, allowed_lateness_ms: lateness, ..SPEC };
            let mut key = HoppingWindows::default();
            let mut expected: HashMap<i64, Vec<f64>> = HashMap::new();
            let mut latest: HashMap<i64, (u32, WindowFeatures)> = HashMap::new();
            let mut max_t = i64::MIN;
            let mut fired = Vec::new();
            for &(t, value) in &events {
                let watermark = (max_t != i64::MIN).then(|| max_t - spec.out_of_orderness_ms);
                let mut open = Vec::new();
                let mut start = floor_to(t - spec.size_ms, spec.slide_ms) + spec.slide_ms;
                while start <= t {
                    if watermark.is_none_or(|w| start + spec.size_ms + spec.allowed_lateness_ms > w) {
                        open.push(start);
                    }
                    start += spec.slide_ms;
                }
                let accepted = key.add(&spec, t, value as f64, 0, &mut fired).is_ok();
                proptest::prop_assert_eq!(accepted, !open.is_empty(), "late iff no covering window is open");
                if accepted {
                    for start in open {
                        expected.entry(start).or_default().push(value as f64);
                    }
                }
                max_t = max_t.max(t);
                let watermark = max_t - spec.out_of_orderness_ms;
                for f in fired.drain(..) {
                    proptest::prop_assert!(f.features.end_ms <= watermark, "fired early: {:?}", f);
                    let entry = latest.entry(f.features.start_ms).or_insert((0, f.features));
                    proptest::prop_assert!(f.revision >= entry.0, "revisions only grow");
                    *entry = (f.revision, f.features);
                }
            }
            key.flush(&spec, &mut fired);
            for f in fired.drain(..) {
                latest.insert(f.features.start_ms, (f.revision, f.features));
            }
            let counted: HashMap<i64, u64> = latest.iter().map(|(start, (_, f))| (*start, f.count)).collect();
            let expected_counts: HashMap<i64, u64> = expected.iter().map(|(start, v)| (*start, v.len() as u64)).collect();
            proptest::prop_assert_eq!(counted, expected_counts);
            // The running aggregate gives what merging the window's values directly gives.
            for (start, (_, f)) in &latest {
                let values = &expected[start];
                let mean = values.iter().sum::<f64>() / values.len() as f64;
                let variance = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
                let min = values.iter().copied().fold(f64::INFINITY, f64::min);
                let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                proptest::prop_assert_eq!((f.min, f.max), (min, max), "window {}", start);
                proptest::prop_assert!((f.mean - mean).abs() < 1e-9 * mean.abs().max(1.0), "window {}: mean {} vs {}", start, f.mean, mean);
                // Taking panes out of a sum of squares cancels: the error is relative to
                // the values' magnitude, not to the variance.
                let magnitude = values.iter().map(|v| v * v).fold(1.0, f64::max);
                proptest::prop_assert!((f.stddev.powi(2) - variance).abs() <= 1e-9 * magnitude, "window {}: stddev {} vs {}", start, f.stddev, variance.sqrt());
            }
        }
    }
}
