//! The demo's sensors, scored offline exactly as `tidemark demo` scores them (its
//! configuration presets, 5 s windows of the simulator's readings), through a restart:
//! the model state carries over, and the simulator starts again and injects the same
//! anomalies a few minutes later, on keys whose models are only minutes old.
//!
//! Checks what a new user sees: no anomaly score at or above the threshold on a healthy
//! sensor, and the spike, drift and stuck sensor raising exactly one alert each in the
//! first run *and* again after the restart (a new incident after the previous one
//! cleared is an alert, however young the key; one incident is one alert). The dropout is the absence rule's, not the scorer's
//! (no window to score), and is tested with the rules.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use tidemark::config::{Config, ConfigSources};
use tidemark::scoring::{ScorerState, Scoring};
use tidemark::sim::{Anomaly, AnomalyKind, Generator, SimConfig, demo_presets};
use tidemark::window::Agg;

const WINDOW_MS: i64 = 5_000;

/// The scoring settings `tidemark demo` presets.
fn demo_scoring() -> Scoring {
    let config = Config::load(&demo_presets(ConfigSources::default())).expect("the demo's configuration is valid");
    Scoring::from_config(&config.scoring)
}

/// The demo's simulator (as `tidemark demo` configures it), run for `run` from `start_ms`.
fn demo_sim(start_ms: i64, run: Duration, seed: u64) -> SimConfig {
    SimConfig { duration: Some(run), ..SimConfig::demo(20, 200.0, seed, start_ms) }
}

/// Score and explanation per (sensor, window start).
type Scores = BTreeMap<(String, i64), (f64, String)>;

/// The anomalies the simulator injected in one run and the score of every window
/// (model states carried in `states`, as a restart restores them from the checkpoint).
fn run(scoring: &Scoring, states: &mut HashMap<String, ScorerState>, sim: SimConfig) -> (Vec<Anomaly>, Scores) {
    let generator = Generator::new(sim);
    let anomalies = generator.anomalies().to_vec();
    let mut windows: BTreeMap<(String, String, i64), Agg> = BTreeMap::new();
    for event in generator {
        let start = event.timestamp_ms.div_euclid(WINDOW_MS) * WINDOW_MS;
        windows.entry((event.sensor_id.to_string(), event.event_type.to_string(), start)).or_default().add(event.value);
    }
    let mut scores = BTreeMap::new();
    for ((sensor, event_type, start), agg) in windows {
        let scorer = scoring.scorer(&event_type);
        let state = states.entry(sensor.clone()).or_insert_with(|| scorer.new_state());
        let score = scorer.score(state, &agg.features(start, start + WINDOW_MS));
        scores.insert((sensor, start), (score.value, score.explanation));
    }
    (anomalies, scores)
}

#[test]
fn the_demo_alerts_on_its_anomalies_before_and_after_a_restart_and_on_nothing_else() {
    let scoring = demo_scoring();
    let mut problems = Vec::new();
    // The demo starts at whatever millisecond the user runs it (windows cut an anomaly
    // at different points) and is restarted whenever the user likes: here 30 s after a
    // first run of 400 s or 900 s.
    for (offset_ms, first_secs) in [(0, 400), (1_300, 400), (2_700, 900), (4_100, 900)] {
        let first_run = Duration::from_secs(first_secs);
        let mut states = HashMap::new();
        let first_start = 1_767_225_600_000 + 3_600_000 * 13 + offset_ms;
        for (run_name, start_ms) in
            [("first run", first_start), ("after a restart", first_start + first_run.as_millis() as i64 + 30_000)]
        {
            let label = format!("{run_name} (offset {offset_ms} ms)");
            let (anomalies, scores) = run(&scoring, &mut states, demo_sim(start_ms, first_run, 42));
            for anomaly in &anomalies {
                if anomaly.kind == AnomalyKind::Dropout {
                    continue;
                }
                let around: Vec<f64> = scores
                    .range(
                        (anomaly.sensor_id.clone(), anomaly.start_ms - 2 * WINDOW_MS)
                            ..(anomaly.sensor_id.clone(), anomaly.end_ms + 5 * WINDOW_MS),
                    )
                    .map(|(_, (value, _))| *value)
                    .collect();
                let highest = around.iter().copied().fold(0.0, f64::max);
                // Alerts the anomaly rule raises: windows at the threshold after one below.
                let alerts = around
                    .windows(2)
                    .filter(|pair| pair[0] < scoring.threshold && pair[1] >= scoring.threshold)
                    .count();
                println!(
                    "{label}: {:?} on {}: highest score {highest:.3}, {alerts} alert(s)",
                    anomaly.kind, anomaly.sensor_id
                );
                if alerts != 1 {
                    problems.push(format!(
                        "{label}: {:?} on {} raised {alerts} alerts (highest score {highest:.3})",
                        anomaly.kind, anomaly.sensor_id
                    ));
                }
            }
            for ((sensor, start), (value, explanation)) in &scores {
                let perturbed = anomalies.iter().any(|a| {
                    a.sensor_id == *sensor && *start >= a.start_ms - 2 * WINDOW_MS && *start < a.end_ms + 5 * WINDOW_MS
                });
                if !perturbed && *value >= scoring.threshold {
                    problems.push(format!("{label}: healthy {sensor} at {start}: {value:.3} ({explanation})"));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
