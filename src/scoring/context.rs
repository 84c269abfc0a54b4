//! The contextual detector: what is usual depends on the context a value appears in.
//!
//! Two contexts, both learned online from the key's own windows:
//!
//! - **Time of day.** Each hour of the (UTC) day has its own baseline of window means,
//!   so a daily cycle is expected, not alarming, and a missing peak or a flat stretch
//!   where the day usually moves stands out ("mean 5.1σ below usual for 14:00").
//! - **Short patterns.** Window means are quantised into a few levels of the range seen
//!   so far; the detector counts which transitions (previous level → level, at this hour)
//!   it has seen. A transition never or rarely seen before is novel ("unusual pattern").
//!
//! The spread of multi-value windows is scored as by `ewma` (a stuck sensor's spread
//! collapses). The raw score is the most unusual of the three. Memory per key is fixed:
//! 24 hourly baselines, a 600-cell transition table, the range and the spread baseline
//! ([`ContextState`]: about 620 bytes once the key's first window was learned).

use serde::{Deserialize, Serialize};

use super::ewma::{Baseline, EwmaScorer, EwmaState};
use super::{Detector, DetectorState, Raw, tail_score};
use crate::window::WindowFeatures;

pub(super) const HOURS: usize = 24;
const LEVELS: usize = 5;
/// Windows an hour's baseline learns before it scores.
const HOUR_WARMUP: u32 = 3;
/// Weight of a new window in an hour's baseline once warmed up.
const HOUR_ALPHA: f64 = 0.2;
/// Deviations beyond this many σ are clipped before the baseline learns them.
const LEARN_CLIP_SIGMAS: f64 = 3.0;
/// σ of an hour's baseline is widened by 1 + this / windows learned.
const YOUNG_INFLATION: f64 = 3.0;
/// A never-seen transition scores this much (one seen n times: this / (n + 1)).
const NOVELTY_WEIGHT: f64 = 0.5;

/// Per-key memory. A key's hourly baselines and transition counts are allocated when
/// its first window is learned (a sensor that sent one event costs a small box), and
/// are kept compact: f32 hourly means and variances (the σ floor of 1e-3 × |mean| is
/// far above f32's rounding) and 4-bit transition counts (a cell seen 15 times is
/// ordinary: its novelty is at most 0.5 / 16).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContextState {
    pub previous_level: Option<u8>,
    pub low: f64,
    pub high: f64,
    pub windows: u64,
    /// Spread of multi-value windows (and the recent level), as the ewma detector keeps it.
    pub spread: EwmaState,
    pub tables: Option<Box<Tables>>,
}

/// The hourly baselines and the transition counts of one key (540 bytes).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tables {
    pub(super) mean: [f32; HOURS],
    pub(super) variance: [f32; HOURS],
    /// Windows each hour's baseline learned (saturating).
    pub(super) windows: [u16; HOURS],
    /// Transition counts, indexed by (hour, previous level, level), two per byte.
    pub(super) transitions: Nibbles,
}

const CELLS: usize = HOURS * LEVELS * LEVELS;

/// CELLS counts of 4 bits, saturating at 15.
#[derive(Clone, Debug, PartialEq)]
pub struct Nibbles([u8; CELLS / 2]);

impl Default for Nibbles {
    fn default() -> Self {
        Nibbles([0; CELLS / 2])
    }
}

impl Nibbles {
    /// Counts of any size, saturated to 4 bits (a shorter list is padded with zeros).
    pub(super) fn saturating(counts: &[u16]) -> Self {
        let mut packed = Nibbles::default();
        for (cell, &count) in counts.iter().take(CELLS).enumerate() {
            packed.0[cell / 2] |= (count.min(0xF) as u8) << ((cell % 2) * 4);
        }
        packed
    }

    /// Every cell's count (for tests of the conversion from checkpoint format 3).
    #[cfg(test)]
    pub(super) fn counts(&self) -> Vec<u16> {
        (0..CELLS).map(|cell| u16::from(self.get(cell))).collect()
    }

    fn get(&self, cell: usize) -> u8 {
        (self.0[cell / 2] >> ((cell % 2) * 4)) & 0xF
    }

    fn increment(&mut self, cell: usize) {
        if self.get(cell) < 0xF {
            self.0[cell / 2] += 1 << ((cell % 2) * 4);
        }
    }
}

impl Serialize for Nibbles {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.as_slice().serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Nibbles {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes = Vec::<u8>::deserialize(deserializer)?;
        let length = bytes.len();
        bytes.try_into().map(Nibbles).map_err(|_| {
            serde::de::Error::invalid_length(length, &"the transition counts of 24 hours × 5 × 5 levels, packed")
        })
    }
}

impl Tables {
    pub(super) fn new() -> Box<Self> {
        Box::new(Tables {
            mean: [0.0; HOURS],
            variance: [0.0; HOURS],
            windows: [0; HOURS],
            transitions: Nibbles::default(),
        })
    }

    pub(super) fn baseline(&self, hour: usize) -> Baseline {
        Baseline { mean: f64::from(self.mean[hour]), variance: f64::from(self.variance[hour]) }
    }
}

pub struct ContextDetector {
    spread: EwmaScorer,
}

fn hour_of(window: &WindowFeatures) -> usize {
    (window.start_ms.rem_euclid(86_400_000) / 3_600_000) as usize % HOURS
}

fn level_of(x: f64, low: f64, high: f64) -> usize {
    let range = high - low;
    if range > 0.0 && range.is_finite() { (((x - low) / range * LEVELS as f64) as usize).min(LEVELS - 1) } else { 0 }
}

fn transition(hour: usize, previous: u8, level: usize) -> usize {
    (hour * LEVELS + usize::from(previous)) * LEVELS + level
}

impl ContextDetector {
    pub fn new(ewma_span: f64, warmup_windows: u32) -> Self {
        Self { spread: EwmaScorer::new(ewma_span, warmup_windows) }
    }

    fn evaluate_state(&self, state: &ContextState, window: &WindowFeatures) -> Raw {
        let x = window.mean;
        let hour = hour_of(window);
        let windows = state.tables.as_ref().map_or(0, |tables| tables.windows[hour]);
        let mut best =
            Raw { value: 0.0, explanation: format!("learning {hour:02}:00 ({windows} windows)"), floor: 0.0 };
        let Some(tables) = &state.tables else { return best };
        if u32::from(windows) >= HOUR_WARMUP {
            let baseline = tables.baseline(hour);
            // A window mean varies at least by its sampling error (stddev / √count), and
            // a baseline from few windows underestimates the spread: widen it while young.
            let sampling_error = window.stddev / (window.count.max(1) as f64).sqrt();
            let inflation = 1.0 + YOUNG_INFLATION / f64::from(windows);
            let sigma = baseline.variance.max(0.0).sqrt().max(1e-3 * baseline.mean.abs()).max(sampling_error).max(1e-9)
                * inflation;
            let z = (x - baseline.mean) / sigma;
            best = Raw {
                value: tail_score(z),
                explanation: format!(
                    "mean {:.1}σ {} usual {:.3} for {hour:02}:00 UTC",
                    z.abs(),
                    if z >= 0.0 { "above" } else { "below" },
                    baseline.mean
                ),
                floor: super::shift_floor(z, window, windows.into(), state.windows),
            };
        }
        if let Some(previous) = state.previous_level {
            let level = level_of(x, state.low.min(x), state.high.max(x));
            let seen = tables.transitions.get(transition(hour, previous, level));
            let novelty = NOVELTY_WEIGHT / (f64::from(seen) + 1.0);
            if novelty > best.value {
                best = Raw {
                    value: novelty,
                    explanation: format!(
                        "unusual pattern: level {} → {} of {LEVELS} at {hour:02}:00 seen {seen} times before",
                        previous + 1,
                        level + 1
                    ),
                    floor: 0.0,
                };
            }
        }
        if let Some((_, spread)) = self.spread.spread_only(&state.spread, window)
            && (spread.value > best.value || spread.floor > best.floor)
        {
            best = spread;
        }
        best
    }

    fn learn_state(&self, state: &mut ContextState, window: &WindowFeatures) {
        let x = window.mean;
        if !x.is_finite() {
            return;
        }
        let hour = hour_of(window);
        let tables = state.tables.get_or_insert_with(Tables::new);
        let mut baseline = tables.baseline(hour);
        let limit = |b: &Baseline| LEARN_CLIP_SIGMAS * b.variance.max(0.0).sqrt().max(1e-3 * b.mean.abs()).max(1e-9);
        baseline.learn(x, u32::from(tables.windows[hour]), HOUR_WARMUP, HOUR_ALPHA, limit);
        tables.mean[hour] = baseline.mean as f32;
        tables.variance[hour] = baseline.variance as f32;
        tables.windows[hour] = tables.windows[hour].saturating_add(1);

        if state.windows == 0 {
            state.low = x;
            state.high = x;
        } else {
            state.low = state.low.min(x);
            state.high = state.high.max(x);
        }
        let level = level_of(x, state.low, state.high);
        if let Some(previous) = state.previous_level {
            tables.transitions.increment(transition(hour, previous, level));
        }
        state.previous_level = Some(level as u8);
        state.windows += 1;
        self.spread.learn_state(&mut state.spread, window);
    }
}

impl Detector for ContextDetector {
    fn name(&self) -> &'static str {
        "context"
    }

    fn new_state(&self) -> DetectorState {
        DetectorState::Context(Box::new(ContextState {
            previous_level: None,
            low: 0.0,
            high: 0.0,
            windows: 0,
            spread: EwmaScorer::new_ewma_state(),
            tables: None,
        }))
    }

    fn owns(&self, state: &DetectorState) -> bool {
        matches!(state, DetectorState::Context(_))
    }

    fn evaluate(&self, state: &DetectorState, window: &WindowFeatures) -> Raw {
        match state {
            DetectorState::Context(state) => self.evaluate_state(state, window),
            _ => Raw::mismatch(),
        }
    }

    fn learn(&self, state: &mut DetectorState, window: &WindowFeatures) {
        if let DetectorState::Context(state) = state {
            self.learn_state(state, window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(hour: i64, day: i64, mean: f64) -> WindowFeatures {
        let start_ms = day * 86_400_000 + hour * 3_600_000;
        WindowFeatures { start_ms, end_ms: start_ms + 30_000, count: 1, mean, min: mean, max: mean, stddev: 0.0 }
    }

    fn daily(hour: i64) -> f64 {
        if (9..17).contains(&hour) { 100.0 } else { 10.0 }
    }

    #[test]
    fn a_daily_cycle_is_usual_and_a_missing_peak_is_not() {
        let detector = ContextDetector::new(20.0, 5);
        let mut state = detector.new_state();
        for day in 0..10 {
            for hour in 0..24 {
                let window = at(hour, day, daily(hour) + (day % 3) as f64);
                let raw = detector.evaluate(&state, &window);
                if day >= 6 {
                    assert!(raw.value < 0.7, "day {day} hour {hour}: {raw:?}");
                }
                detector.learn(&mut state, &window);
            }
        }
        let missing = detector.evaluate(&state, &at(12, 10, 10.0));
        assert!(missing.value > 0.9, "{missing:?}");
        assert!(missing.explanation.contains("below usual") && missing.explanation.contains("12:00"), "{missing:?}");
    }

    #[test]
    fn an_unseen_transition_is_novel() {
        let detector = ContextDetector::new(20.0, 5);
        let mut state = detector.new_state();
        for i in 0..100 {
            detector.learn(&mut state, &at(0, 0, if i % 2 == 0 { 0.0 } else { 1.0 }));
        }
        let DetectorState::Context(inner) = &state else { unreachable!() };
        assert_eq!(inner.previous_level, Some(4));
        let repeat = detector.evaluate(&state, &at(0, 0, 1.0));
        assert!(repeat.explanation.starts_with("unusual pattern: level 5 → 5"), "{repeat:?}");
        assert_eq!(repeat.value, NOVELTY_WEIGHT);
    }
}
