//! Model state as checkpoint format versions 1 to 3 wrote it, read and converted to
//! today's. Version 4 packs the `context` model's tables and adds the start of a key's
//! first window to the post-processing state; the other models' states are carried over
//! as they are.

use serde::{Deserialize, Serialize};

use super::context::{ContextState, HOURS, Nibbles, Tables};
use super::ewma::{Baseline, EwmaState};
use super::post::PostStateV3;
use super::{DetectorState, RcfState, ScorerState};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HourBaselineV3 {
    pub windows: u32,
    pub level: Baseline,
}

/// The `context` model's state up to format version 3: f64 baselines and u16 counts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ContextStateV3 {
    pub hours: Vec<HourBaselineV3>,
    pub transitions: Vec<u16>,
    pub previous_level: Option<u8>,
    pub low: f64,
    pub high: f64,
    pub windows: u64,
    pub spread: EwmaState,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DetectorStateV3 {
    Ewma(EwmaState),
    Context(Box<ContextStateV3>),
    Rcf(Box<RcfState>),
}

/// A key's scorer state up to format version 3.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScorerStateV3 {
    pub detector: DetectorStateV3,
    pub post: PostStateV3,
}

impl From<ContextStateV3> for ContextState {
    fn from(old: ContextStateV3) -> Self {
        let tables = (old.windows > 0).then(|| {
            let mut tables = Tables::new();
            for (hour, baseline) in old.hours.iter().take(HOURS).enumerate() {
                tables.mean[hour] = baseline.level.mean as f32;
                tables.variance[hour] = baseline.level.variance as f32;
                tables.windows[hour] = u16::try_from(baseline.windows).unwrap_or(u16::MAX);
            }
            tables.transitions = Nibbles::saturating(&old.transitions);
            tables
        });
        ContextState {
            previous_level: old.previous_level,
            low: old.low,
            high: old.high,
            windows: old.windows,
            spread: old.spread,
            tables,
        }
    }
}

impl From<ScorerStateV3> for ScorerState {
    fn from(old: ScorerStateV3) -> Self {
        let detector = match old.detector {
            DetectorStateV3::Ewma(state) => DetectorState::Ewma(state),
            DetectorStateV3::Context(state) => DetectorState::Context(Box::new(ContextState::from(*state))),
            DetectorStateV3::Rcf(state) => DetectorState::Rcf(state),
        };
        ScorerState { detector, post: old.post.into() }
    }
}

/// Today's state written the old way (for tests of the conversion and of restores).
#[cfg(test)]
impl From<&ScorerState> for ScorerStateV3 {
    fn from(state: &ScorerState) -> Self {
        let detector = match &state.detector {
            DetectorState::Ewma(state) => DetectorStateV3::Ewma(state.clone()),
            DetectorState::Rcf(state) => DetectorStateV3::Rcf(state.clone()),
            DetectorState::Context(state) => {
                let (hours, transitions) = match &state.tables {
                    Some(tables) => (
                        (0..HOURS)
                            .map(|hour| HourBaselineV3 {
                                windows: u32::from(tables.windows[hour]),
                                level: tables.baseline(hour),
                            })
                            .collect(),
                        tables.transitions.counts(),
                    ),
                    None => (vec![HourBaselineV3::default(); HOURS], Nibbles::default().counts()),
                };
                DetectorStateV3::Context(Box::new(ContextStateV3 {
                    hours,
                    transitions,
                    previous_level: state.previous_level,
                    low: state.low,
                    high: state.high,
                    windows: state.windows,
                    spread: state.spread.clone(),
                }))
            }
        };
        ScorerStateV3 { detector, post: PostStateV3::from(&state.post) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigSources};
    use crate::scoring::Scorer;
    use crate::window::WindowFeatures;

    /// A context state learned from real-looking windows, written as version 3 and read
    /// back, is the same state, and scores the next windows the same.
    #[test]
    fn a_version_3_context_state_converts_exactly() {
        let config = Config::load(&ConfigSources::default()).expect("defaults");
        let scorer = Scorer::from_name("context", &config.scoring).expect("context");
        let mut state = scorer.new_state();
        let window = |i: i64| {
            let mean = 20.0 + (i as f64 * 0.37).sin() * 3.0 + if i % 97 == 0 { 9.0 } else { 0.0 };
            let start_ms = 1_767_225_600_000 + i * 300_000;
            WindowFeatures {
                start_ms,
                end_ms: start_ms + 300_000,
                count: 3,
                mean,
                min: mean - 1.0,
                max: mean + 1.0,
                stddev: 0.8,
            }
        };
        let converted = ScorerState::from(ScorerStateV3::from(&state));
        assert_eq!(converted, state, "a new key");
        for i in 0..2_000 {
            scorer.score(&mut state, &window(i));
        }
        let old = ScorerStateV3::from(&state);
        let bytes = postcard::to_allocvec(&old).expect("encoded");
        let mut restored = ScorerState::from(postcard::from_bytes::<ScorerStateV3>(&bytes).expect("decoded"));
        // Equal but for the first window's start, which version 3 did not keep.
        assert_eq!(ScorerStateV3::from(&restored), old);
        for i in 2_000..2_300 {
            assert_eq!(scorer.score(&mut restored, &window(i)), scorer.score(&mut state, &window(i)), "window {i}");
        }
        // Counts above 15 saturate.
        let DetectorStateV3::Context(mut context) = old.detector.clone() else { panic!("context") };
        context.transitions[7] = 900;
        let packed = ContextState::from(*context);
        assert_eq!(packed.tables.expect("tables").transitions.counts()[7], 15);
    }
}
