//! Deterministic sensor simulator: the same seed and settings give the same events,
//! byte for byte. Sensors follow a daily cycle plus noise; anomalies (spike, drift,
//! stuck value, dropout) are injected at known times and written as ground-truth labels.

pub mod es_double;
pub mod http;
pub mod kafka;
pub mod load;
pub mod mqtt;
pub mod ws;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Serialize;

/// Event types the simulator produces, with their base value, spread and daily swing.
const PROFILES: [(&str, f64, f64, f64); 4] = [
    ("temperature", 21.0, 0.4, 3.0),
    ("humidity", 45.0, 1.5, 8.0),
    ("pressure", 1013.0, 0.8, 2.0),
    ("vibration", 0.50, 0.03, 0.05),
];

const DAY_MS: f64 = 86_400_000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AnomalyKind {
    /// Values jump far above normal for the anomaly's duration.
    Spike,
    /// Values ramp away from normal over the duration.
    Drift,
    /// The sensor repeats one value (no noise) for the duration.
    Stuck,
    /// The sensor sends nothing for the duration.
    Dropout,
}

impl AnomalyKind {
    pub const ALL: [AnomalyKind; 4] = [Self::Spike, Self::Drift, Self::Stuck, Self::Dropout];

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "spike" => Some(Self::Spike),
            "drift" => Some(Self::Drift),
            "stuck" => Some(Self::Stuck),
            "dropout" => Some(Self::Dropout),
            _ => None,
        }
    }
}

/// A ground-truth label: one injected anomaly.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Anomaly {
    pub sensor_id: String,
    pub event_type: String,
    pub kind: AnomalyKind,
    /// Epoch milliseconds, start inclusive, end exclusive.
    pub start_ms: i64,
    pub end_ms: i64,
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub sensors: u32,
    /// Events per second over all sensors.
    pub rate: f64,
    /// How long the simulated stream runs; `None` forever.
    pub duration: Option<Duration>,
    pub seed: u64,
    /// Event time of the first event, epoch milliseconds.
    pub start_ms: i64,
    /// Share of events whose timestamp is moved back (out of order).
    pub disorder: f64,
    /// How far back at most.
    pub max_disorder: Duration,
    /// Number of anomalies to inject.
    pub anomalies: u32,
    /// No anomaly starts before this much stream time (models need a baseline).
    pub anomalies_after: Duration,
    /// Time between anomaly starts; `None`: spread over the duration.
    pub anomaly_spacing: Option<Duration>,
    /// How long each anomaly lasts.
    pub anomaly_duration: Duration,
    /// Kinds to cycle through.
    pub anomaly_kinds: Vec<AnomalyKind>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            sensors: 20,
            rate: 200.0,
            duration: Some(Duration::from_secs(60)),
            seed: 42,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            disorder: 0.0,
            max_disorder: Duration::from_secs(3),
            anomalies: 4,
            anomalies_after: Duration::from_secs(30),
            anomaly_spacing: None,
            anomaly_duration: Duration::from_secs(30),
            anomaly_kinds: AnomalyKind::ALL.to_vec(),
        }
    }
}

impl SimConfig {
    /// The simulator `tidemark demo` runs: `sensors` sensors at `rate` events/s from
    /// `start_ms`, forever, 2 % of events up to 800 ms out of order, and four 15 s
    /// anomalies (spike, drift, stuck, dropout) 200 s after the start, 4 s apart.
    pub fn demo(sensors: u32, rate: f64, seed: u64, start_ms: i64) -> Self {
        Self {
            sensors,
            rate,
            seed,
            duration: None,
            start_ms,
            disorder: 0.02,
            max_disorder: Duration::from_millis(800),
            anomalies: 4,
            anomalies_after: Duration::from_secs(200),
            anomaly_spacing: Some(Duration::from_secs(4)),
            anomaly_duration: Duration::from_secs(15),
            ..Self::default()
        }
    }
}

/// The settings `tidemark demo` presets (an environment variable or a file still
/// overrides them): 5 s windows, models judging after 3 minutes, dropouts as alerts.
pub fn demo_presets(sources: crate::config::ConfigSources) -> crate::config::ConfigSources {
    sources
        .preset("pipeline.window", "5s")
        .preset("pipeline.max_out_of_orderness", "1s")
        .preset("pipeline.idle_timeout", "10s")
        .preset("checkpoint.interval", "2s")
        .preset("scoring.warmup_windows", 6)
        // A key's anomaly scores count after 3 minutes of 5 s windows, as likelihoods
        // (raw scores of young models alert on healthy sensors); the simulator's
        // anomalies start after that.
        .preset("scoring.learning_windows", 36)
        .preset("scoring.likelihood_windows", 36)
        // The simulator's dropouts (a sensor silent for 15 s) are alerts.
        .preset("rules.sensor_silent.kind", "absence")
        .preset("rules.sensor_silent.after", "10s")
        .preset("rules.sensor_silent.severity", "high")
}

/// One generated reading.
#[derive(Clone, Debug, PartialEq)]
pub struct SimEvent {
    pub sensor_id: Arc<str>,
    pub event_type: &'static str,
    pub value: f64,
    pub timestamp_ms: i64,
    /// When the simulator emits it (its position in the stream's own clock).
    pub emit_ms: i64,
}

impl SimEvent {
    /// Append the event as one NDJSON line.
    pub fn write_json(&self, out: &mut String) {
        let _ = writeln!(
            out,
            r#"{{"sensorId":"{}","eventType":"{}","value":{},"timestamp":{}}}"#,
            self.sensor_id, self.event_type, self.value, self.timestamp_ms
        );
    }
}

struct Sensor {
    id: Arc<str>,
    profile: usize,
    phase: f64,
    offset: f64,
}

/// The event stream of a [`SimConfig`], in emission order.
pub struct Generator {
    config: SimConfig,
    rng: ChaCha8Rng,
    sensors: Vec<Sensor>,
    anomalies: Vec<Anomaly>,
    /// Value a stuck sensor repeats, per anomaly.
    stuck_values: Vec<Option<f64>>,
    index: u64,
    interval_ms: f64,
    end_ms: Option<i64>,
}

impl Generator {
    pub fn new(config: SimConfig) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let sensors: Vec<Sensor> = (0..config.sensors.max(1))
            .map(|i| Sensor {
                id: Arc::from(format!("sensor-{i:04}")),
                profile: i as usize % PROFILES.len(),
                phase: rng.random::<f64>(),
                offset: rng.random::<f64>() * 2.0 - 1.0,
            })
            .collect();
        let end_ms = config.duration.map(|d| config.start_ms + d.as_millis() as i64);
        let anomalies = plan_anomalies(&config, &sensors, &mut rng, end_ms);
        Self {
            stuck_values: vec![None; anomalies.len()],
            interval_ms: 1000.0 / config.rate.max(0.001),
            rng,
            sensors,
            anomalies,
            index: 0,
            end_ms,
            config,
        }
    }

    /// The injected anomalies (ground truth).
    pub fn anomalies(&self) -> &[Anomaly] {
        &self.anomalies
    }

    fn normal_value(&mut self, sensor: usize, t_ms: i64) -> f64 {
        let s = &self.sensors[sensor];
        let (_, base, spread, swing) = PROFILES[s.profile];
        let daily = swing * (std::f64::consts::TAU * (t_ms as f64 / DAY_MS + s.phase)).sin();
        let noise: f64 = StandardNormal.sample(&mut self.rng);
        base + s.offset * spread * 2.0 + daily + spread * noise
    }
}

impl Iterator for Generator {
    type Item = SimEvent;

    fn next(&mut self) -> Option<SimEvent> {
        loop {
            let emit_ms = self.config.start_ms + (self.index as f64 * self.interval_ms) as i64;
            if self.end_ms.is_some_and(|end| emit_ms >= end) {
                return None;
            }
            let sensor = (self.index % self.sensors.len() as u64) as usize;
            self.index += 1;
            let mut value = self.normal_value(sensor, emit_ms);
            let (_, _, spread, _) = PROFILES[self.sensors[sensor].profile];
            let mut dropped = false;
            for (i, anomaly) in self.anomalies.iter().enumerate() {
                if *anomaly.sensor_id != *self.sensors[sensor].id
                    || emit_ms < anomaly.start_ms
                    || emit_ms >= anomaly.end_ms
                {
                    continue;
                }
                let progress = (emit_ms - anomaly.start_ms) as f64 / (anomaly.end_ms - anomaly.start_ms).max(1) as f64;
                match anomaly.kind {
                    AnomalyKind::Spike => value += 12.0 * spread,
                    AnomalyKind::Drift => value += 20.0 * spread * progress,
                    AnomalyKind::Stuck => value = *self.stuck_values[i].get_or_insert(value),
                    AnomalyKind::Dropout => dropped = true,
                }
            }
            if dropped {
                continue;
            }
            let mut timestamp_ms = emit_ms;
            if self.config.disorder > 0.0 && self.rng.random::<f64>() < self.config.disorder {
                timestamp_ms -= self.rng.random_range(0..=self.config.max_disorder.as_millis() as i64);
            }
            let s = &self.sensors[sensor];
            return Some(SimEvent {
                sensor_id: Arc::clone(&s.id),
                event_type: PROFILES[s.profile].0,
                value: (value * 1000.0).round() / 1000.0,
                timestamp_ms,
                emit_ms,
            });
        }
    }
}

fn plan_anomalies(config: &SimConfig, sensors: &[Sensor], rng: &mut ChaCha8Rng, end_ms: Option<i64>) -> Vec<Anomaly> {
    if config.anomalies == 0 || config.anomaly_kinds.is_empty() {
        return Vec::new();
    }
    let first = config.start_ms + config.anomalies_after.as_millis() as i64;
    let length = config.anomaly_duration.as_millis() as i64;
    let spacing = match (config.anomaly_spacing, end_ms) {
        (Some(spacing), _) => spacing.as_millis() as i64,
        (None, Some(end)) => ((end - length - first) / i64::from(config.anomalies)).max(0),
        (None, None) => length * 2,
    };
    let mut chosen: Vec<usize> = Vec::new();
    (0..config.anomalies)
        .map(|i| {
            // Distinct sensors while there are enough, so labels do not overlap.
            let mut sensor = rng.random_range(0..sensors.len());
            while chosen.len() < sensors.len() && chosen.contains(&sensor) {
                sensor = (sensor + 1) % sensors.len();
            }
            chosen.push(sensor);
            let start_ms = first + i64::from(i) * spacing;
            Anomaly {
                sensor_id: sensors[sensor].id.to_string(),
                event_type: PROFILES[sensors[sensor].profile].0.to_string(),
                kind: config.anomaly_kinds[i as usize % config.anomaly_kinds.len()],
                start_ms,
                end_ms: start_ms + length,
            }
        })
        .collect()
}

/// The labels as NDJSON.
pub fn labels_ndjson(anomalies: &[Anomaly]) -> String {
    let mut out = String::new();
    for anomaly in anomalies {
        if let Ok(line) = serde_json::to_string(anomaly) {
            out.push_str(&line);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> SimConfig {
        SimConfig {
            sensors: 8,
            rate: 80.0,
            duration: Some(Duration::from_secs(120)),
            anomalies: 4,
            disorder: 0.1,
            ..SimConfig::default()
        }
    }

    #[test]
    fn same_seed_same_stream() {
        let a: Vec<_> = Generator::new(small()).collect();
        let b: Vec<_> = Generator::new(small()).collect();
        assert_eq!(a, b);
        let c: Vec<_> = Generator::new(SimConfig { seed: 7, ..small() }).collect();
        assert_ne!(a, c);
    }

    #[test]
    fn anomalies_show_in_the_values() {
        let generator = Generator::new(small());
        let anomalies = generator.anomalies().to_vec();
        assert_eq!(anomalies.len(), 4);
        let events: Vec<_> = generator.collect();
        for anomaly in &anomalies {
            let inside: Vec<_> = events
                .iter()
                .filter(|e| {
                    *e.sensor_id == *anomaly.sensor_id && e.emit_ms >= anomaly.start_ms && e.emit_ms < anomaly.end_ms
                })
                .collect();
            match anomaly.kind {
                AnomalyKind::Dropout => assert!(inside.is_empty()),
                AnomalyKind::Stuck => {
                    assert!(inside.len() > 10);
                    assert!(inside.windows(2).all(|w| w[0].value == w[1].value));
                }
                AnomalyKind::Spike | AnomalyKind::Drift => assert!(!inside.is_empty()),
            }
        }
    }

    #[test]
    fn disorder_moves_timestamps_back_within_the_bound() {
        let events: Vec<_> = Generator::new(small()).collect();
        let moved = events.iter().filter(|e| e.timestamp_ms < e.emit_ms).count();
        assert!(moved > events.len() / 20, "{moved} of {}", events.len());
        assert!(events.iter().all(|e| e.emit_ms - e.timestamp_ms <= 3000));
    }
}
