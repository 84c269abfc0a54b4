//! Anomaly scoring of fired windows.
//!
//! A [`Scorer`] is the model's logic and settings, shared by a partition; the model's
//! memory for one key is a [`ScorerState`], owned by the partition actor next to the
//! key's windows and saved in its checkpoints, so a restart does not make a model forget.

mod ewma;

pub use ewma::{EwmaScorer, EwmaState};

use serde::{Deserialize, Serialize};

use crate::config::ScoringConfig;
use crate::messages::Severity;
use crate::window::WindowFeatures;

/// Names accepted by `scoring.model`.
pub const MODELS: &[&str] = &["ewma"];

/// The outcome of scoring one window.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// In [0, 1]; higher is more unusual.
    pub value: f64,
    /// What drove the score, e.g. "mean 4.2σ above baseline".
    pub explanation: String,
}

/// Per-key model memory; one variant per model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ScorerState {
    Ewma(EwmaState),
}

/// A scoring model.
pub trait Scorer: Send + Sync {
    fn name(&self) -> &'static str;

    /// Memory for a key seen for the first time.
    fn new_state(&self) -> ScorerState;

    /// Score a window that fired for the first time, and learn from it.
    fn score(&self, state: &mut ScorerState, window: &WindowFeatures) -> Score;

    /// Score an updated (late) revision of a window already learned from, without
    /// learning again.
    fn rescore(&self, state: &ScorerState, window: &WindowFeatures) -> Score;
}

/// The scoring settings a partition applies.
pub struct Scoring {
    pub scorer: Box<dyn Scorer>,
    pub threshold: f64,
}

impl Scoring {
    pub fn from_config(config: &ScoringConfig) -> Self {
        // `Config::validate` admits only names in MODELS; "ewma" is the only one so far.
        let scorer: Box<dyn Scorer> = Box::new(EwmaScorer::new(config.ewma_span, config.warmup_windows));
        Self { scorer, threshold: config.threshold }
    }

    pub fn classify(&self, score: f64) -> (bool, Severity) {
        (score >= self.threshold, Severity::from_score(score, self.threshold))
    }
}

/// Two-sided tail probability of a standard normal deviate, as a score in [0, 1]:
/// `1 - p^(1/4)`. The fourth root spreads the scores (|z| = 2 → 0.54, 3 → 0.77,
/// 3.2 → 0.80, 4 → 0.91) so one threshold separates usual from unusual windows, and the
/// tail is computed in log space so large deviations still order correctly.
pub fn tail_score(z: f64) -> f64 {
    let z = z.abs();
    if !z.is_finite() {
        return 1.0;
    }
    let ln_p = ln_two_sided_tail(z);
    (1.0 - (ln_p / 4.0).exp()).clamp(0.0, 1.0)
}

/// ln(P(|Z| > z)) for a standard normal Z, accurate far into the tail.
pub fn ln_two_sided_tail(z: f64) -> f64 {
    let z = z.abs();
    let x = z / std::f64::consts::SQRT_2;
    if x < 25.0 {
        libm::erfc(x).max(f64::MIN_POSITIVE).ln()
    } else {
        // Asymptotic erfc(x) ≈ exp(-x²) / (x √π).
        -x * x - (x * std::f64::consts::PI.sqrt()).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_score_is_monotone_and_bounded() {
        let mut previous = -1.0;
        for step in 0..200 {
            let z = step as f64 * 0.25;
            let score = tail_score(z);
            assert!((0.0..=1.0).contains(&score));
            assert!(score >= previous, "z={z}: {score} < {previous}");
            previous = score;
        }
        assert!(tail_score(0.0) < 0.01);
        assert!((tail_score(3.2) - 0.80).abs() < 0.01, "{}", tail_score(3.2));
        assert!(tail_score(2.0) < 0.6);
    }

    #[test]
    fn log_tail_is_continuous_at_the_switch() {
        let below = ln_two_sided_tail(25.0 * std::f64::consts::SQRT_2 - 1e-9);
        let above = ln_two_sided_tail(25.0 * std::f64::consts::SQRT_2 + 1e-9);
        assert!((below - above).abs() < 0.01 * below.abs(), "{below} vs {above}");
    }
}
