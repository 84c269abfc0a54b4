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
//! 24 hourly baselines, a 600-cell transition table, the range and the spread baseline.

use serde::{Deserialize, Serialize};

use super::ewma::{Baseline, EwmaScorer, EwmaState};
use super::{Detector, DetectorState, Raw, tail_score};
use crate::window::WindowFeatures;

const HOURS: usize = 24;
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

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HourBaseline {
    pub windows: u32,
    pub level: Baseline,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContextState {
    pub hours: Vec<HourBaseline>,
    /// Transition counts, indexed by (hour, previous level, level).
    pub transitions: Vec<u16>,
    pub previous_level: Option<u8>,
    pub low: f64,
    pub high: f64,
    pub windows: u64,
    /// Spread of multi-value windows, as the ewma detector keeps it.
    pub spread: EwmaState,
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
        let baseline = &state.hours[hour];
        let mut best = Raw { value: 0.0, explanation: format!("learning {hour:02}:00 ({} windows)", baseline.windows) };
        if baseline.windows >= HOUR_WARMUP {
            // A window mean varies at least by its sampling error (stddev / √count), and
            // a baseline from few windows underestimates the spread: widen it while young.
            let sampling_error = window.stddev / (window.count.max(1) as f64).sqrt();
            let inflation = 1.0 + YOUNG_INFLATION / f64::from(baseline.windows);
            let sigma = baseline
                .level
                .variance
                .max(0.0)
                .sqrt()
                .max(1e-3 * baseline.level.mean.abs())
                .max(sampling_error)
                .max(1e-9)
                * inflation;
            let z = (x - baseline.level.mean) / sigma;
            best = Raw {
                value: tail_score(z),
                explanation: format!(
                    "mean {:.1}σ {} usual {:.3} for {hour:02}:00 UTC",
                    z.abs(),
                    if z >= 0.0 { "above" } else { "below" },
                    baseline.level.mean
                ),
            };
        }
        if let Some(previous) = state.previous_level {
            let level = level_of(x, state.low.min(x), state.high.max(x));
            let seen = state.transitions[transition(hour, previous, level)];
            let novelty = NOVELTY_WEIGHT / (f64::from(seen) + 1.0);
            if novelty > best.value {
                best = Raw {
                    value: novelty,
                    explanation: format!(
                        "unusual pattern: level {} → {} of {LEVELS} at {hour:02}:00 seen {seen} times before",
                        previous + 1,
                        level + 1
                    ),
                };
            }
        }
        if let Some((_, spread)) = self.spread.spread_only(&state.spread, window)
            && spread.value > best.value
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
        let baseline = &mut state.hours[hour];
        let limit = |b: &Baseline| LEARN_CLIP_SIGMAS * b.variance.max(0.0).sqrt().max(1e-3 * b.mean.abs()).max(1e-9);
        baseline.level.learn(x, baseline.windows, HOUR_WARMUP, HOUR_ALPHA, limit);
        baseline.windows = baseline.windows.saturating_add(1);

        if state.windows == 0 {
            state.low = x;
            state.high = x;
        } else {
            state.low = state.low.min(x);
            state.high = state.high.max(x);
        }
        let level = level_of(x, state.low, state.high);
        if let Some(previous) = state.previous_level {
            let cell = &mut state.transitions[transition(hour, previous, level)];
            *cell = cell.saturating_add(1);
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
            hours: vec![HourBaseline::default(); HOURS],
            transitions: vec![0; HOURS * LEVELS * LEVELS],
            previous_level: None,
            low: 0.0,
            high: 0.0,
            windows: 0,
            spread: EwmaScorer::new_ewma_state(),
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
