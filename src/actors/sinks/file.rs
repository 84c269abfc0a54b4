//! The file sink of `tidemark replay`: writes each window result as one JSON line (or
//! only counts them), keeps dead letters in an NDJSON file, and acknowledges
//! checkpoints at once (a file replay has no store to restore from).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use serde::Serialize;

use crate::messages::{DeadLetter, SinkStatus, StoreMsg, WindowResult};

/// What the file sink has seen; shared with the replay driver.
#[derive(Debug, Default)]
pub struct FileSinkCounts {
    pub results: AtomicU64,
    pub anomalies: AtomicU64,
    /// Alerts raised (firing transitions).
    pub alerts: AtomicU64,
    pub dead_letters: AtomicU64,
}

pub struct FileSink;

pub struct FileSinkArgs {
    pub output: Option<PathBuf>,
    pub dead_letters: Option<PathBuf>,
    pub counts: Arc<FileSinkCounts>,
}

pub struct FileSinkState {
    output: Option<BufWriter<File>>,
    dead_letters: Option<BufWriter<File>>,
    counts: Arc<FileSinkCounts>,
}

/// One line of `--output`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultLine<'a> {
    pub sensor_id: &'a str,
    pub event_type: &'a str,
    pub window_start: i64,
    pub window_end: i64,
    pub event_count: u64,
    pub avg_value: f64,
    pub min_value: f64,
    pub max_value: f64,
    pub stddev: f64,
    pub prediction_score: f64,
    pub anomaly: bool,
    pub severity: &'static str,
    pub revision: u32,
}

impl<'a> From<&'a WindowResult> for ResultLine<'a> {
    fn from(result: &'a WindowResult) -> Self {
        Self {
            sensor_id: &result.sensor_id,
            event_type: &result.event_type,
            window_start: result.window_start_ms,
            window_end: result.window_end_ms,
            event_count: result.event_count,
            avg_value: result.avg_value,
            min_value: result.min_value,
            max_value: result.max_value,
            stddev: result.stddev,
            prediction_score: result.prediction_score,
            anomaly: result.anomaly,
            severity: result.severity.as_str(),
            revision: result.revision,
        }
    }
}

fn create(path: &Option<PathBuf>) -> Result<Option<BufWriter<File>>, ActorProcessingErr> {
    match path {
        Some(path) => {
            let file = File::create(path).map_err(|error| format!("cannot create {}: {error}", path.display()))?;
            Ok(Some(BufWriter::with_capacity(1 << 20, file)))
        }
        None => Ok(None),
    }
}

impl Actor for FileSink {
    type Msg = StoreMsg;
    type State = FileSinkState;
    type Arguments = FileSinkArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<StoreMsg>,
        args: FileSinkArgs,
    ) -> Result<FileSinkState, ActorProcessingErr> {
        Ok(FileSinkState {
            output: create(&args.output)?,
            dead_letters: create(&args.dead_letters)?,
            counts: args.counts,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<StoreMsg>,
        message: StoreMsg,
        state: &mut FileSinkState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            StoreMsg::Results(results, _) => {
                let anomalies = results.iter().filter(|r| r.anomaly).count() as u64;
                state.counts.results.fetch_add(results.len() as u64, Ordering::Relaxed);
                state.counts.anomalies.fetch_add(anomalies, Ordering::Relaxed);
                if let Some(out) = state.output.as_mut() {
                    for result in &results {
                        serde_json::to_writer(&mut *out, &ResultLine::from(result))?;
                        out.write_all(b"\n")?;
                    }
                }
            }
            StoreMsg::Alerts(alerts) => {
                let firing = alerts.iter().filter(|a| a.state == crate::rules::AlertState::Firing).count() as u64;
                state.counts.alerts.fetch_add(firing, Ordering::Relaxed);
            }
            StoreMsg::DeadLetters(letters) => {
                state.counts.dead_letters.fetch_add(letters.len() as u64, Ordering::Relaxed);
                if let Some(out) = state.dead_letters.as_mut() {
                    for letter in &letters {
                        write_dead_letter(out, letter)?;
                    }
                }
            }
            StoreMsg::Checkpoint(_) | StoreMsg::Linger => {}
            StoreMsg::Flush(reply) => {
                for out in [state.output.as_mut(), state.dead_letters.as_mut()].into_iter().flatten() {
                    out.flush()?;
                }
                let _ = reply.send(());
            }
            StoreMsg::Status(reply) => {
                let _ = reply.send(SinkStatus {
                    name: "file".into(),
                    rows_written: state.counts.results.load(Ordering::Relaxed),
                    ..SinkStatus::default()
                });
            }
        }
        Ok(())
    }
}

fn write_dead_letter(out: &mut BufWriter<File>, letter: &DeadLetter) -> std::io::Result<()> {
    let line = serde_json::json!({
        "reason": letter.reason.as_str(),
        "error": letter.error,
        "sensorId": letter.sensor_id.as_deref(),
        "position": letter.position,
        "payload": letter.payload,
    });
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}
