//! The baseline scorer: exponentially weighted mean and variance of two window
//! features, the mean (level shifts, spikes, drift) and the log of the spread (a stuck
//! sensor's spread collapses, a failing one's explodes). The window's score is the more
//! unusual of the two.

use serde::{Deserialize, Serialize};

use super::{Detector, DetectorState, Raw, tail_score};
use crate::window::WindowFeatures;

/// Deviations are clipped to this many standard deviations before the baseline learns
/// from them, so one spike does not inflate the variance and hide the next one, while a
/// lasting level shift is still followed within a few spans.
const LEARN_CLIP_SIGMAS: f64 = 3.0;
/// A window of at least this many identical readings can be a stuck sensor.
const STUCK_MIN_READINGS: u64 = super::DECISIVE_MIN_READINGS;
/// ...when its spread is at least this many σ below the key's usual spread.
const STUCK_Z: f64 = 10.0;
/// A stuck window's least final score on the likelihood scale (it alerts at the default
/// threshold).
const STUCK_FLOOR: f64 = super::DECISIVE_FLOOR;

/// Running mean and variance of one feature.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub mean: f64,
    pub variance: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EwmaState {
    pub level: Baseline,
    pub spread: Baseline,
    pub windows: u32,
}

/// log of the window's standard deviation, with a floor relative to the level so a
/// perfectly flat window is finite (and far below any noisy one).
fn log_spread(window: &WindowFeatures) -> f64 {
    (window.stddev + 1e-6 * window.mean.abs() + 1e-9).ln()
}

fn direction(z: f64) -> &'static str {
    if z >= 0.0 { "above" } else { "below" }
}

pub struct EwmaScorer {
    alpha: f64,
    warmup_windows: u32,
}

impl EwmaScorer {
    /// `span` in windows: alpha = 2 / (span + 1), as pandas' `ewm(span=…)`.
    pub fn new(span: f64, warmup_windows: u32) -> Self {
        Self { alpha: 2.0 / (span.max(1.0) + 1.0), warmup_windows: warmup_windows.max(2) }
    }

    /// Standard deviation with floors, inflated while few windows are known (a small
    /// sample underestimates the spread; this stands in for Student's t).
    fn sigma(baseline: &Baseline, windows: u32, floor: f64) -> f64 {
        let inflation = 1.0 + 3.0 / f64::from(windows.max(1));
        baseline.variance.max(0.0).sqrt().max(floor).max(1e-9) * inflation
    }

    pub(super) fn evaluate_state(&self, state: &EwmaState, window: &WindowFeatures) -> Raw {
        if state.windows < self.warmup_windows {
            return Raw {
                value: 0.0,
                explanation: format!("warming up: {} of {} windows seen", state.windows, self.warmup_windows),
                floor: 0.0,
            };
        }
        // A window mean varies at least by its own sampling error (stddev / √count):
        // a baseline estimated tighter than that would flag ordinary noise.
        let sampling_error = window.stddev / (window.count.max(1) as f64).sqrt();
        let level_sigma = Self::sigma(&state.level, state.windows, (1e-3 * state.level.mean.abs()).max(sampling_error));
        let level_z = (window.mean - state.level.mean) / level_sigma;
        match self.spread_only(state, window) {
            Some((spread_z, raw)) if spread_z.abs() > level_z.abs() || raw.floor > 0.0 => raw,
            _ => Raw {
                value: tail_score(level_z),
                explanation: format!(
                    "mean {:.1}σ {} baseline {:.3} (σ {:.3})",
                    level_z.abs(),
                    direction(level_z),
                    state.level.mean,
                    level_sigma
                ),
                floor: super::shift_floor(level_z, window, state.windows.into(), state.windows.into()),
            },
        }
    }

    fn learn(&self, baseline: &mut Baseline, x: f64, windows: u32, floor: f64) {
        let limit = |b: &Baseline| LEARN_CLIP_SIGMAS * Self::sigma(b, windows, floor);
        baseline.learn(x, windows, self.warmup_windows, self.alpha, limit);
    }
}

impl Baseline {
    /// Learn `x` as the baseline's window number `seen`: a plain running mean and
    /// variance while `seen < warmup` (the first windows count equally), then an
    /// exponentially weighted update with weight `alpha`, the deviation clipped to
    /// `limit(self)` so one spike does not inflate the variance.
    pub(super) fn learn(&mut self, x: f64, seen: u32, warmup: u32, alpha: f64, limit: impl FnOnce(&Baseline) -> f64) {
        if seen == 0 {
            *self = Baseline { mean: x, variance: 0.0 };
        } else if seen < warmup {
            let n = f64::from(seen) + 1.0;
            let delta = x - self.mean;
            self.mean += delta / n;
            self.variance += (delta * (x - self.mean) - self.variance) / n;
        } else {
            let limit = limit(self);
            let delta = (x - self.mean).clamp(-limit, limit);
            let increment = alpha * delta;
            self.mean += increment;
            self.variance = (1.0 - alpha) * (self.variance + delta * increment);
        }
    }
}

impl EwmaScorer {
    pub(super) fn new_ewma_state() -> EwmaState {
        EwmaState { level: Baseline::default(), spread: Baseline::default(), windows: 0 }
    }

    pub(super) fn learn_state(&self, state: &mut EwmaState, window: &WindowFeatures) {
        let level_floor = 1e-3 * state.level.mean.abs();
        self.learn(&mut state.level, window.mean, state.windows, level_floor);
        if window.count > 1 {
            self.learn(&mut state.spread, log_spread(window), state.windows, 0.05);
        }
        state.windows = state.windows.saturating_add(1);
    }

    /// The spread feature alone, with its deviation in σ: how unusual is the window's
    /// spread (`None` while warming up and for single-value windows). The context detector
    /// uses it for stuck and failing sensors.
    pub(super) fn spread_only(&self, state: &EwmaState, window: &WindowFeatures) -> Option<(f64, Raw)> {
        if state.windows < self.warmup_windows || window.count <= 1 {
            return None;
        }
        let spread_z = (log_spread(window) - state.spread.mean) / Self::sigma(&state.spread, state.windows, 0.05);
        // Many identical readings from a sensor whose readings vary by far more than a
        // rounding step (its usual spread is steady, so the flat window is ≥ STUCK_Z σ
        // below it; a coarsely quantised sensor's flat windows are common, widen its
        // spread baseline and stay below): stuck, whatever its history of raw scores.
        if window.count >= STUCK_MIN_READINGS && window.max == window.min && spread_z <= -STUCK_Z {
            let raw = Raw {
                value: tail_score(spread_z),
                explanation: format!(
                    "stuck: {} identical readings ({:.3}) where the spread is usually {:.3} ({:.1}σ below baseline)",
                    window.count,
                    window.mean,
                    state.spread.mean.exp(),
                    spread_z.abs()
                ),
                floor: STUCK_FLOOR,
            };
            return Some((spread_z, raw));
        }
        let hint = if spread_z < 0.0 { " (stuck sensor?)" } else { "" };
        let raw = Raw {
            value: tail_score(spread_z),
            explanation: format!(
                "spread {:.1}σ {} baseline: stddev {:.3} vs usual {:.3}{hint}",
                spread_z.abs(),
                direction(spread_z),
                window.stddev,
                state.spread.mean.exp()
            ),
            floor: 0.0,
        };
        Some((spread_z, raw))
    }
}

impl Detector for EwmaScorer {
    fn name(&self) -> &'static str {
        "ewma"
    }

    fn new_state(&self) -> DetectorState {
        DetectorState::Ewma(Self::new_ewma_state())
    }

    fn owns(&self, state: &DetectorState) -> bool {
        matches!(state, DetectorState::Ewma(_))
    }

    fn evaluate(&self, state: &DetectorState, window: &WindowFeatures) -> Raw {
        match state {
            DetectorState::Ewma(state) => self.evaluate_state(state, window),
            _ => Raw::mismatch(),
        }
    }

    fn learn(&self, state: &mut DetectorState, window: &WindowFeatures) {
        if let DetectorState::Ewma(state) = state {
            self.learn_state(state, window);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn score(scorer: &EwmaScorer, state: &mut DetectorState, window: &WindowFeatures) -> Raw {
        let raw = scorer.evaluate(state, window);
        Detector::learn(scorer, state, window);
        raw
    }

    fn window(mean: f64) -> WindowFeatures {
        window_with_spread(mean, 1.0)
    }

    fn window_with_spread(mean: f64, stddev: f64) -> WindowFeatures {
        WindowFeatures { start_ms: 0, end_ms: 30_000, count: 10, mean, min: mean - stddev, max: mean + stddev, stddev }
    }

    #[test]
    fn warms_up_then_flags_a_spike() {
        let scorer = EwmaScorer::new(20.0, 5);
        let mut state = scorer.new_state();
        let mut scores = Vec::new();
        for i in 0..40 {
            let mean = 20.0 + if i % 2 == 0 { 0.5 } else { -0.5 };
            scores.push(score(&scorer, &mut state, &window(mean)).value);
        }
        assert!(scores[..5].iter().all(|&s| s == 0.0), "warm-up scores are 0");
        assert!(scores[5..].iter().all(|&s| s < 0.8), "{scores:?}");
        let spike = score(&scorer, &mut state, &window(35.0));
        assert!(spike.value > 0.95, "{spike:?}");
        assert!(spike.explanation.contains("above baseline"), "{}", spike.explanation);
        let after = score(&scorer, &mut state, &window(20.0));
        assert!(after.value < 0.8, "one spike does not poison the baseline: {after:?}");
    }

    #[test]
    fn a_collapsed_spread_is_flagged() {
        let scorer = EwmaScorer::new(20.0, 5);
        let mut state = scorer.new_state();
        for i in 0..40 {
            let stddev = 1.0 + 0.1 * f64::from(i % 3);
            score(&scorer, &mut state, &window_with_spread(20.0 + 0.1 * f64::from(i % 2), stddev));
        }
        let stuck = score(&scorer, &mut state, &window_with_spread(20.0, 0.0));
        assert!(stuck.value > 0.95, "{stuck:?}");
        assert!(stuck.explanation.starts_with("stuck: 10 identical readings (20.000)"), "{}", stuck.explanation);
        assert_eq!(stuck.floor, STUCK_FLOOR, "identical readings need no comparison with past raw scores");
        // Few readings are not enough to call it stuck.
        let few = WindowFeatures { count: 3, ..window_with_spread(20.0, 0.0) };
        assert_eq!(scorer.evaluate(&state, &few).floor, 0.0);
    }

    #[test]
    fn a_coarse_sensor_with_flat_windows_is_not_stuck() {
        // Readings in whole degrees: one window in four has every reading equal.
        let scorer = EwmaScorer::new(20.0, 5);
        let mut state = scorer.new_state();
        for i in 0..400 {
            let stddev = if i % 4 == 0 { 0.0 } else { 0.4 };
            score(&scorer, &mut state, &window_with_spread(21.0, stddev));
        }
        let flat = scorer.evaluate(&state, &window_with_spread(21.0, 0.0));
        assert_eq!(flat.floor, 0.0, "{flat:?}");
        assert!(!flat.explanation.starts_with("stuck:"), "{}", flat.explanation);
    }

    #[test]
    fn rescore_does_not_learn() {
        let scorer = EwmaScorer::new(10.0, 2);
        let mut state = scorer.new_state();
        for mean in [1.0, 2.0, 1.5, 1.2] {
            score(&scorer, &mut state, &window(mean));
        }
        let before = state.clone();
        scorer.evaluate(&state, &window(9.0));
        assert_eq!(before, state);
    }
}
