//! The baseline scorer: an exponentially weighted mean and variance of window means.

use serde::{Deserialize, Serialize};

use super::{Score, Scorer, ScorerState, tail_score};
use crate::window::WindowFeatures;

/// Deviations are clipped to this many standard deviations before the baseline learns
/// from them, so one spike does not inflate the variance and hide the next one, while a
/// lasting level shift is still followed within a few spans.
const LEARN_CLIP_SIGMAS: f64 = 3.0;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EwmaState {
    pub mean: f64,
    pub variance: f64,
    pub windows: u32,
}

pub struct EwmaScorer {
    alpha: f64,
    warmup_windows: u32,
}

impl EwmaScorer {
    /// `span` in windows: alpha = 2 / (span + 1), as pandas' `ewm(span=…)`.
    pub fn new(span: f64, warmup_windows: u32) -> Self {
        Self {
            alpha: 2.0 / (span.max(1.0) + 1.0),
            warmup_windows: warmup_windows.max(2),
        }
    }

    fn state(state: &ScorerState) -> &EwmaState {
        match state {
            ScorerState::Ewma(state) => state,
        }
    }

    /// Standard deviation with a floor, so a perfectly flat history does not turn the
    /// smallest wobble into an infinite deviation.
    fn sigma(state: &EwmaState) -> f64 {
        state.variance.max(0.0).sqrt().max(1e-3 * state.mean.abs()).max(1e-9)
    }

    fn evaluate(&self, state: &EwmaState, window: &WindowFeatures) -> Score {
        if state.windows < self.warmup_windows {
            return Score {
                value: 0.0,
                explanation: format!(
                    "warming up: {} of {} windows seen",
                    state.windows, self.warmup_windows
                ),
            };
        }
        let sigma = Self::sigma(state);
        let z = (window.mean - state.mean) / sigma;
        let direction = if z >= 0.0 { "above" } else { "below" };
        Score {
            value: tail_score(z),
            explanation: format!(
                "mean {:.1}σ {direction} baseline {:.3} (σ {:.3})",
                z.abs(),
                state.mean,
                sigma
            ),
        }
    }
}

impl Scorer for EwmaScorer {
    fn name(&self) -> &'static str {
        "ewma"
    }

    fn new_state(&self) -> ScorerState {
        ScorerState::Ewma(EwmaState {
            mean: 0.0,
            variance: 0.0,
            windows: 0,
        })
    }

    fn score(&self, state: &mut ScorerState, window: &WindowFeatures) -> Score {
        let ScorerState::Ewma(state) = state;
        let score = self.evaluate(state, window);
        let x = window.mean;
        if state.windows == 0 {
            state.mean = x;
            state.variance = 0.0;
        } else if state.windows < self.warmup_windows {
            // Plain running mean and variance while warming up: the first windows count equally.
            let n = f64::from(state.windows) + 1.0;
            let delta = x - state.mean;
            state.mean += delta / n;
            state.variance += (delta * (x - state.mean) - state.variance) / n;
        } else {
            let sigma = Self::sigma(state);
            let limit = LEARN_CLIP_SIGMAS * sigma;
            let delta = (x - state.mean).clamp(-limit, limit);
            let increment = self.alpha * delta;
            state.mean += increment;
            state.variance = (1.0 - self.alpha) * (state.variance + delta * increment);
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
        WindowFeatures {
            start_ms: 0,
            end_ms: 30_000,
            count: 10,
            mean,
            min: mean,
            max: mean,
            stddev: 0.0,
        }
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
