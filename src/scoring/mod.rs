//! Anomaly scoring of fired windows.
//!
//! Scoring has two stages. A [`Detector`] (the model: `ewma`, `context`, `rcf`) turns a
//! window into a raw score in [0, 1] with an explanation. The shared post-processing of
//! [`post`] then asks how unusual that raw score is given the key's recent raw scores
//! (an anomaly likelihood), adds a "new extreme" rule for values outside the range seen
//! so far, and damps repeats of an alert that was just raised. A [`Scorer`] is one
//! detector with that post-processing; [`Scoring`] picks the scorer of an event type.
//!
//! The model's memory for one key is a [`ScorerState`], owned by the partition actor next
//! to the key's windows and saved in its checkpoints, so a restart does not make a model
//! forget. Every score uses the windows up to and including the current one only.

mod context;
mod ewma;
pub mod legacy;
pub mod post;
mod rcf;

use std::collections::BTreeMap;

pub use context::{ContextDetector, ContextState};
pub use ewma::{EwmaScorer, EwmaState};
pub use post::PostState;
pub use rcf::{RcfDetector, RcfState};

use serde::{Deserialize, Serialize};

use crate::config::ScoringConfig;
use crate::messages::Severity;
use crate::window::WindowFeatures;

/// Names accepted by `scoring.model` and `scoring.event_types`.
pub const MODELS: &[&str] = &["ewma", "context", "rcf"];

/// The outcome of scoring one window.
#[derive(Clone, Debug, PartialEq)]
pub struct Score {
    /// In [0, 1]; higher is more unusual.
    pub value: f64,
    /// What drove the score, e.g. "mean 4.2σ above baseline".
    pub explanation: String,
}

/// A detector's raw score of one window, before post-processing.
#[derive(Clone, Debug, PartialEq)]
pub struct Raw {
    /// In [0, 1]; higher is more unusual.
    pub value: f64,
    pub explanation: String,
    /// The least final score (on the likelihood scale) this window gets, whatever the
    /// key's history of raw scores: non-zero for evidence that needs no comparison with
    /// the key's usual raw scores (a stuck sensor), 0 otherwise.
    pub floor: f64,
}

impl Raw {
    /// The state belongs to another model (the configuration changed since the
    /// checkpoint): [`Scorer::score`] resets such state before it gets here.
    fn mismatch() -> Self {
        Raw { value: 0.0, explanation: "model state of another model".to_string(), floor: 0.0 }
    }
}

/// Per-key detector memory; one variant per model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DetectorState {
    Ewma(EwmaState),
    Context(Box<ContextState>),
    Rcf(Box<RcfState>),
}

/// Per-key memory of a scorer: the detector's and the post-processing's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScorerState {
    pub detector: DetectorState,
    pub post: PostState,
}

/// An anomaly model. `evaluate` must not change the state; `learn` folds the window in
/// after it was scored, so a window is never compared with itself.
pub trait Detector: Send + Sync {
    fn name(&self) -> &'static str;

    /// Memory for a key seen for the first time.
    fn new_state(&self) -> DetectorState;

    /// Whether `state` is this model's (a checkpoint may hold another model's state
    /// after a configuration change).
    fn owns(&self, state: &DetectorState) -> bool;

    /// The raw score of a window, from what the state learned so far.
    fn evaluate(&self, state: &DetectorState, window: &WindowFeatures) -> Raw;

    /// Learn from a window that was just scored.
    fn learn(&self, state: &mut DetectorState, window: &WindowFeatures);
}

/// A detector followed by the shared post-processing.
pub struct Scorer {
    detector: Box<dyn Detector>,
    post: post::PostConfig,
}

impl Scorer {
    pub fn new(detector: Box<dyn Detector>, post: post::PostConfig) -> Self {
        Self { detector, post }
    }

    /// The scorer `name` (one of [`MODELS`]) with the settings of `config`.
    pub fn from_name(name: &str, config: &ScoringConfig) -> Option<Self> {
        let detector: Box<dyn Detector> = match name {
            "ewma" => Box::new(EwmaScorer::new(config.ewma_span, config.warmup_windows)),
            "context" => Box::new(ContextDetector::new(config.ewma_span, config.warmup_windows)),
            "rcf" => Box::new(RcfDetector::new(config.warmup_windows)),
            _ => return None,
        };
        Some(Self::new(detector, post::PostConfig::from_config(config)))
    }

    pub fn name(&self) -> &'static str {
        self.detector.name()
    }

    /// Memory for a key seen for the first time.
    pub fn new_state(&self) -> ScorerState {
        ScorerState { detector: self.detector.new_state(), post: PostState::default() }
    }

    /// Score a window that fired for the first time, and learn from it.
    pub fn score(&self, state: &mut ScorerState, window: &WindowFeatures) -> Score {
        if !self.detector.owns(&state.detector) {
            *state = self.new_state();
        }
        let raw = self.detector.evaluate(&state.detector, window);
        self.detector.learn(&mut state.detector, window);
        self.post.score(&mut state.post, raw, window)
    }

    /// Score an updated (late) revision of a window already learned from, without
    /// learning again.
    pub fn rescore(&self, state: &ScorerState, window: &WindowFeatures) -> Score {
        if !self.detector.owns(&state.detector) {
            return Score { value: 0.0, explanation: "model changed since this window was first scored".to_string() };
        }
        let raw = self.detector.evaluate(&state.detector, window);
        self.post.rescore(&state.post, raw, window)
    }
}

/// The scoring settings a partition applies: a scorer per event type.
pub struct Scoring {
    pub default: Scorer,
    pub by_event_type: BTreeMap<String, Scorer>,
    pub threshold: f64,
}

impl Scoring {
    pub fn from_config(config: &ScoringConfig) -> Self {
        // `Config::validate` admits only names in MODELS.
        let scorer = |name: &str| {
            Scorer::from_name(name, config).unwrap_or_else(|| {
                Scorer::new(
                    Box::new(EwmaScorer::new(config.ewma_span, config.warmup_windows)),
                    post::PostConfig::from_config(config),
                )
            })
        };
        Self {
            default: scorer(&config.model),
            by_event_type: config
                .event_types
                .iter()
                .map(|(event_type, model)| (event_type.clone(), scorer(model)))
                .collect(),
            threshold: config.threshold,
        }
    }

    /// The scorer of `event_type`: its override in `scoring.event_types`, else the default.
    pub fn scorer(&self, event_type: &str) -> &Scorer {
        self.by_event_type.get(event_type).unwrap_or(&self.default)
    }

    pub fn classify(&self, score: f64) -> (bool, Severity) {
        (score >= self.threshold, Severity::from_score(score, self.threshold))
    }
}

/// The floor (on the likelihood scale) of evidence that stands on its own: it alerts at
/// the default threshold whatever the key's history of raw scores.
const DECISIVE_FLOOR: f64 = 0.5;
/// Readings a window needs before its own evidence can be decisive.
const DECISIVE_MIN_READINGS: u64 = 10;
/// A shift of the window mean by this many σ of its baseline is decisive...
const SHIFT_Z: f64 = 20.0;
/// ...when the baseline has learned at least this many windows...
const SHIFT_MIN_BASELINE: u64 = 10;
/// ...and the key's likelihood statistics are still young (they weigh a window 1/n
/// until about this many windows, so one incident widens them for a long time).
const SHIFT_YOUNG_WINDOWS: u64 = post::LONG_RUN_WINDOWS;

/// The floor of a window whose mean is `z` σ from a baseline of `baseline_windows`
/// windows, on a key that has seen `key_windows`: [`DECISIVE_FLOOR`] for a decisive
/// shift, 0 otherwise.
///
/// The likelihood compares the average of a key's last raw scores with their long-run
/// distribution. A raw score saturates at 1 beyond |z| ≈ 8, so it cannot tell a 10σ
/// window from an 80σ one, and on a key a few hundred windows old that distribution has
/// learned its first incident at weight 1/n: a repeat of a 15-second 80σ spike (three
/// 5 s windows) then stayed below the threshold (the demo, re-injected after a restart).
/// A window of many readings whose mean moved 20σ from a baseline that has seen enough
/// windows is an incident on any sensor. On single-reading series (NAB) such a floor
/// cost 7 points — heavy-tailed metrics jump 20σ in normal operation — so it needs
/// [`DECISIVE_MIN_READINGS`] readings, and it applies only while the likelihood is young:
/// once it has seen [`SHIFT_YOUNG_WINDOWS`] windows it judges on its own.
fn shift_floor(z: f64, window: &WindowFeatures, baseline_windows: u64, key_windows: u64) -> f64 {
    let decisive = z.abs() >= SHIFT_Z
        && window.count >= DECISIVE_MIN_READINGS
        && baseline_windows >= SHIFT_MIN_BASELINE
        && key_windows < SHIFT_YOUNG_WINDOWS;
    if decisive { DECISIVE_FLOOR } else { 0.0 }
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
    fn only_a_large_shift_of_many_readings_on_a_young_key_is_decisive() {
        let window =
            |count| WindowFeatures { start_ms: 0, end_ms: 5_000, count, mean: 1.0, min: 0.0, max: 2.0, stddev: 0.5 };
        assert_eq!(shift_floor(25.0, &window(50), 40, 120), DECISIVE_FLOOR);
        assert_eq!(shift_floor(-25.0, &window(50), 40, 120), DECISIVE_FLOOR, "either direction");
        assert_eq!(shift_floor(15.0, &window(50), 40, 120), 0.0, "not large enough");
        assert_eq!(shift_floor(25.0, &window(1), 40, 120), 0.0, "a single reading (heavy-tailed metrics jump so)");
        assert_eq!(shift_floor(25.0, &window(50), 5, 120), 0.0, "a baseline of 5 windows");
        assert_eq!(shift_floor(25.0, &window(50), 40, 5_000), 0.0, "the likelihood is mature and judges alone");
    }

    #[test]
    fn log_tail_is_continuous_at_the_switch() {
        let below = ln_two_sided_tail(25.0 * std::f64::consts::SQRT_2 - 1e-9);
        let above = ln_two_sided_tail(25.0 * std::f64::consts::SQRT_2 + 1e-9);
        assert!((below - above).abs() < 0.01 * below.abs(), "{below} vs {above}");
    }
}
