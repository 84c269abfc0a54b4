//! The baseline scorer: exponentially weighted mean and variance of two window
//! features, the mean (level shifts, spikes, drift) and the log of the spread (a stuck
//! sensor's spread collapses, a failing one's explodes). The window's score is the more
//! unusual of the two.

use serde::{Deserialize, Serialize};

use super::{Score, Scorer, ScorerState, tail_score};
use crate::window::WindowFeatures;

/// Deviations are clipped to this many standard deviations before the baseline learns
/// from them, so one spike does not inflate the variance and hide the next one, while a
/// lasting level shift is still followed within a few spans.
const LEARN_CLIP_SIGMAS: f64 = 3.0;

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

pub struct EwmaScorer {
    alpha: f64,
    warmup_windows: u32,
}

impl EwmaScorer {
    /// `span` in windows: alpha = 2 / (span + 1), as pandas' `ewm(span=…)`.
    pub fn new(span: f64, warmup_windows: u32) -> Self {
        Self { alpha: 2.0 / (span.max(1.0) + 1.0), warmup_windows: warmup_windows.max(2) }
    }

    fn state(state: &ScorerState) -> &EwmaState {
        match state {
            ScorerState::Ewma(state) => state,
        }
    }

    /// Standard deviation with floors, inflated while few windows are known (a small
    /// sample underestimates the spread; this stands in for Student's t).
    fn sigma(baseline: &Baseline, windows: u32, floor: f64) -> f64 {
        let inflation = 1.0 + 3.0 / f64::from(windows.max(1));
        baseline.variance.max(0.0).sqrt().max(floor).max(1e-9) * inflation
    }

    fn evaluate(&self, state: &EwmaState, window: &WindowFeatures) -> Score {
        if state.windows < self.warmup_windows {
            return Score {
                value: 0.0,
                explanation: format!("warming up: {} of {} windows seen", state.windows, self.warmup_windows),
            };
        }
        // A window mean varies at least by its own sampling error (stddev / √count):
        // a baseline estimated tighter than that would flag ordinary noise.
        let sampling_error = window.stddev / (window.count.max(1) as f64).sqrt();
        let level_sigma = Self::sigma(&state.level, state.windows, (1e-3 * state.level.mean.abs()).max(sampling_error));
        let level_z = (window.mean - state.level.mean) / level_sigma;
        let spread_sigma = Self::sigma(&state.spread, state.windows, 0.05);
        let spread_z = (log_spread(window) - state.spread.mean) / spread_sigma;
        let direction = |z: f64| if z >= 0.0 { "above" } else { "below" };
        if spread_z.abs() > level_z.abs() && window.count > 1 {
            let hint = if spread_z < 0.0 { " (stuck sensor?)" } else { "" };
            Score {
                value: tail_score(spread_z),
                explanation: format!(
                    "spread {:.1}σ {} baseline: stddev {:.3} vs usual {:.3}{hint}",
                    spread_z.abs(),
                    direction(spread_z),
                    window.stddev,
                    state.spread.mean.exp()
                ),
            }
        } else {
            Score {
                value: tail_score(level_z),
                explanation: format!(
                    "mean {:.1}σ {} baseline {:.3} (σ {:.3})",
                    level_z.abs(),
                    direction(level_z),
                    state.level.mean,
                    level_sigma
                ),
            }
        }
    }

    fn learn(&self, baseline: &mut Baseline, x: f64, windows: u32, floor: f64) {
        if windows == 0 {
            *baseline = Baseline { mean: x, variance: 0.0 };
        } else if windows < self.warmup_windows {
            // Plain running mean and variance while warming up: the first windows count equally.
            let n = f64::from(windows) + 1.0;
            let delta = x - baseline.mean;
            baseline.mean += delta / n;
            baseline.variance += (delta * (x - baseline.mean) - baseline.variance) / n;
        } else {
            let limit = LEARN_CLIP_SIGMAS * Self::sigma(baseline, windows, floor);
            let delta = (x - baseline.mean).clamp(-limit, limit);
            let increment = self.alpha * delta;
            baseline.mean += increment;
            baseline.variance = (1.0 - self.alpha) * (baseline.variance + delta * increment);
        }
    }
}

impl Scorer for EwmaScorer {
    fn name(&self) -> &'static str {
        "ewma"
    }

    fn new_state(&self) -> ScorerState {
        ScorerState::Ewma(EwmaState { level: Baseline::default(), spread: Baseline::default(), windows: 0 })
    }

    fn score(&self, state: &mut ScorerState, window: &WindowFeatures) -> Score {
        let ScorerState::Ewma(state) = state;
        let score = self.evaluate(state, window);
        let level_floor = 1e-3 * state.level.mean.abs();
        self.learn(&mut state.level, window.mean, state.windows, level_floor);
        if window.count > 1 {
            self.learn(&mut state.spread, log_spread(window), state.windows, 0.05);
        }
        state.windows = state.windows.saturating_add(1);
        score
    }

    fn rescore(&self, state: &ScorerState, window: &WindowFeatures) -> Score {
        self.evaluate(Self::state(state), window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            scores.push(scorer.score(&mut state, &window(mean)).value);
        }
        assert!(scores[..5].iter().all(|&s| s == 0.0), "warm-up scores are 0");
        assert!(scores[5..].iter().all(|&s| s < 0.8), "{scores:?}");
        let spike = scorer.score(&mut state, &window(35.0));
        assert!(spike.value > 0.95, "{spike:?}");
        assert!(spike.explanation.contains("above baseline"), "{}", spike.explanation);
        let after = scorer.score(&mut state, &window(20.0));
        assert!(after.value < 0.8, "one spike does not poison the baseline: {after:?}");
    }

    #[test]
    fn a_collapsed_spread_is_flagged() {
        let scorer = EwmaScorer::new(20.0, 5);
        let mut state = scorer.new_state();
        for i in 0..40 {
            let stddev = 1.0 + 0.1 * f64::from(i % 3);
            scorer.score(&mut state, &window_with_spread(20.0 + 0.1 * f64::from(i % 2), stddev));
        }
        let stuck = scorer.score(&mut state, &window_with_spread(20.0, 0.0));
        assert!(stuck.value > 0.95, "{stuck:?}");
        assert!(stuck.explanation.contains("stuck"), "{}", stuck.explanation);
    }

    #[test]
    fn rescore_does_not_learn() {
        let scorer = EwmaScorer::new(10.0, 2);
        let mut state = scorer.new_state();
        for mean in [1.0, 2.0, 1.5, 1.2] {
            scorer.score(&mut state, &window(mean));
        }
        let before = state.clone();
        scorer.rescore(&state, &window(9.0));
        assert_eq!(before, state);
    }
}
