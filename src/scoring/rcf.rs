//! Random Cut Forest (the `rcf3` crate): an ensemble of random trees over shingles of
//! the last few window means; a point that is easy to isolate (that would change the
//! trees a lot if inserted) is anomalous. Model-free and good at shape changes, at the
//! price of the largest state: the forest's sample of past shingles.

use rcf3::Forest;
use serde::{Deserialize, Serialize};

use super::{Detector, DetectorState, Raw};
use crate::window::WindowFeatures;

/// Window means per shingle (the forest's dimensions).
const SHINGLE: usize = 4;
const TREES: usize = 30;
/// Shingles each tree samples.
const CAPACITY: usize = 128;
/// Fixed seed: the same stream gives the same scores, run after run.
const SEED: u64 = 0x7469_6465_6d61_726b;

/// A forest and the shingles it learned from. Equality compares the serialised forest.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RcfState {
    forest: Forest,
}

impl PartialEq for RcfState {
    fn eq(&self, other: &Self) -> bool {
        match (postcard::to_allocvec(&self.forest), postcard::to_allocvec(&other.forest)) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

pub struct RcfDetector {
    warmup_windows: u32,
}

impl RcfDetector {
    pub fn new(warmup_windows: u32) -> Self {
        Self { warmup_windows }
    }

    fn new_forest(&self) -> Option<Forest> {
        Forest::builder(1)
            .shingle_size(SHINGLE)
            .internal_shingling(true)
            .num_trees(TREES)
            .capacity(CAPACITY)
            .output_after(self.warmup_windows.max(SHINGLE as u32) as usize)
            .seed(SEED)
            .build()
            .ok()
    }
}

impl Detector for RcfDetector {
    fn name(&self) -> &'static str {
        "rcf"
    }

    fn new_state(&self) -> DetectorState {
        match self.new_forest() {
            Some(forest) => DetectorState::Rcf(Box::new(RcfState { forest })),
            // The settings above are constants the crate accepts; should it ever refuse
            // them, the key falls back to the baseline model rather than failing.
            None => DetectorState::Ewma(super::EwmaScorer::new_ewma_state()),
        }
    }

    fn owns(&self, state: &DetectorState) -> bool {
        matches!(state, DetectorState::Rcf(_))
    }

    fn evaluate(&self, state: &DetectorState, window: &WindowFeatures) -> Raw {
        let DetectorState::Rcf(state) = state else { return Raw::mismatch() };
        if !state.forest.is_ready() {
            return Raw {
                value: 0.0,
                explanation: format!("forest learning: {} windows seen", state.forest.entries_seen()),
                floor: 0.0,
            };
        }
        match state.forest.score(&[window.mean as f32]) {
            // RCF scores hover around 1 for usual points and grow with isolation;
            // x / (x + 2) maps them into [0, 1) keeping the order (1 → 0.33, 6 → 0.75).
            Ok(score) if score.is_finite() => Raw {
                value: (score / (score + 2.0)).clamp(0.0, 1.0),
                explanation: format!("forest isolation score {score:.2} for the last {SHINGLE} window means"),
                floor: 0.0,
            },
            Ok(_) | Err(_) => {
                Raw { value: 0.0, explanation: "forest could not score this window".to_string(), floor: 0.0 }
            }
        }
    }

    fn learn(&self, state: &mut DetectorState, window: &WindowFeatures) {
        if let DetectorState::Rcf(state) = state
            && window.mean.is_finite()
        {
            // An error here means the point was refused (e.g. a non-finite value); the
            // forest stays as it was.
            let _ = state.forest.update(&[window.mean as f32]);
        }
    }
}
