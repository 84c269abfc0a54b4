//! The store sink: batches window results, dead letters and checkpoints into one
//! transaction each, by size (`store.batch_size`) and time (`store.linger`).
//!
//! A checkpoint arrives behind every result its partition emitted before it, and is
//! written in the same transaction as the results pending ahead of it; only after the
//! commit is it reported complete, so a complete checkpoint never refers to results that
//! are not stored. Retriable errors are retried with backoff and jitter, holding the
//! batch: while the store is down checkpoints stop completing, the replay buffers fill
//! and ingestion backpressures. Rows the database rejects for their content go to the
//! dead-letter store.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::{CheckpointListener, PendingResults, SinkHealth};
use crate::config::{ChaosConfig, StoreConfig};
use crate::messages::{CheckpointData, DeadLetter, RejectReason, Source, StoreMsg};
use crate::metrics::{Metrics, PartitionLabels, SinkLabels, SinkResultLabels, SinkRowLabels};
use crate::store::{Store, StoreError, WriteBatch};
use crate::supervision::policy::RetryBackoff;

const SINK: &str = "store";

pub struct StoreSink;

pub struct StoreSinkArgs {
    pub store: Arc<dyn Store>,
    pub config: StoreConfig,
    pub listener: Arc<dyn CheckpointListener>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<SinkHealth>,
    /// Told what each commit stored (the WebSocket feed).
    pub live: Arc<crate::live::LiveHub>,
    pub chaos: ChaosConfig,
}

pub struct StoreSinkState {
    args: StoreSinkArgs,
    results: PendingResults,
    alerts: Vec<crate::rules::Alert>,
    dead_letters: Vec<DeadLetter>,
    checkpoints: Vec<CheckpointData>,
    linger_armed: bool,
    backoff: RetryBackoff,
    #[cfg(feature = "chaos")]
    chaos_rng: rand_chacha::ChaCha8Rng,
}

impl Actor for StoreSink {
    type Msg = StoreMsg;
    type State = StoreSinkState;
    type Arguments = StoreSinkArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<StoreMsg>,
        args: StoreSinkArgs,
    ) -> Result<StoreSinkState, ActorProcessingErr> {
        args.metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(1);
        #[cfg(feature = "chaos")]
        let chaos_rng = {
            use rand::SeedableRng;
            rand_chacha::ChaCha8Rng::seed_from_u64(args.chaos.seed ^ 0x5157)
        };
        Ok(StoreSinkState {
            args,
            results: PendingResults::default(),
            alerts: Vec::new(),
            dead_letters: Vec::new(),
            checkpoints: Vec::new(),
            linger_armed: false,
            backoff: RetryBackoff::new(Duration::from_millis(50), Duration::from_secs(5)),
            #[cfg(feature = "chaos")]
            chaos_rng,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<StoreMsg>,
        message: StoreMsg,
        state: &mut StoreSinkState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            StoreMsg::Results(results, trace) => {
                state.results.push_all(results, trace);
                state.after_push(&myself).await?;
            }
            StoreMsg::Alerts(alerts) => {
                state.alerts.extend(alerts);
                state.after_push(&myself).await?;
            }
            StoreMsg::DeadLetters(letters) => {
                state.dead_letters.extend(letters);
                state.after_push(&myself).await?;
            }
            StoreMsg::Checkpoint(checkpoint) => {
                state.checkpoints.push(*checkpoint);
                // Checkpoints release replay buffers: write them without lingering.
                state.flush().await?;
            }
            StoreMsg::Linger => {
                state.linger_armed = false;
                state.flush().await?;
            }
            StoreMsg::Flush(reply) => {
                state.flush().await?;
                let _ = reply.send(());
            }
            StoreMsg::Status(reply) => {
                let _ = reply.send(crate::messages::SinkStatus {
                    name: SINK.to_string(),
                    pending_results: state.results.len(),
                    pending_dead_letters: state.dead_letters.len(),
                    pending_checkpoints: state.checkpoints.len(),
                    batches_written: state.args.health.batches.load(Ordering::Relaxed),
                    rows_written: state.args.health.rows.load(Ordering::Relaxed),
                    failures: state.args.health.failures.load(Ordering::Relaxed),
                    consecutive_failures: state.args.health.consecutive_failures.load(Ordering::Relaxed),
                    last_error: state.args.health.last_error.lock().clone(),
                });
            }
        }
        Ok(())
    }
}

impl StoreSinkState {
    async fn after_push(&mut self, myself: &ActorRef<StoreMsg>) -> Result<(), ActorProcessingErr> {
        self.publish_pending();
        if self.results.len() + self.alerts.len() + self.dead_letters.len() >= self.args.config.batch_size {
            self.flush().await?;
        } else if !self.linger_armed {
            self.linger_armed = true;
            myself.send_after(self.args.config.linger, || StoreMsg::Linger);
        }
        Ok(())
    }

    fn publish_pending(&self) {
        let health = &self.args.health;
        health.pending_results.store(self.results.len() as u64, Ordering::Relaxed);
        health.pending_checkpoints.store(self.checkpoints.len() as u64, Ordering::Relaxed);
    }

    /// Write everything pending, retrying retriable errors until it succeeds.
    async fn flush(&mut self) -> Result<(), ActorProcessingErr> {
        if self.results.is_empty()
            && self.alerts.is_empty()
            && self.dead_letters.is_empty()
            && self.checkpoints.is_empty()
        {
            return Ok(());
        }
        self.publish_pending();
        let span = self.results.write_span(SINK);
        tracing::Instrument::instrument(self.write_pending(), span).await
    }

    async fn write_pending(&mut self) -> Result<(), ActorProcessingErr> {
        loop {
            let started = Instant::now();
            let outcome = match self.injected_failure() {
                Some(error) => Err(error),
                None => {
                    let batch = WriteBatch {
                        results: self.results.as_slice(),
                        alerts: &self.alerts,
                        dead_letters: &self.dead_letters,
                        checkpoints: &self.checkpoints,
                    };
                    self.args.store.write(&batch).await
                }
            };
            match outcome {
                Ok(outcome) => {
                    self.on_written(started.elapsed(), &outcome);
                    return Ok(());
                }
                Err(error) if error.is_retriable() => self.wait_before_retry(&error).await,
                Err(StoreError::Rejected(reason)) if !self.results.is_empty() => {
                    // The content was refused: find the rows at fault one by one.
                    self.record_failure(&format!("rejected: {reason}"));
                    self.isolate_rejected_rows().await?;
                }
                Err(error) => {
                    // Incompatible: retrying cannot help; fail so the supervisor decides.
                    self.record_failure(&error.to_string());
                    return Err(Box::new(error));
                }
            }
        }
    }

    fn injected_failure(&mut self) -> Option<StoreError> {
        #[cfg(feature = "chaos")]
        {
            use rand::Rng;
            let rate = self.args.chaos.store_batch_failure_rate;
            if rate > 0.0 && self.chaos_rng.random::<f64>() < rate {
                return Some(StoreError::Unavailable("chaos: injected store batch failure".into()));
            }
        }
        None
    }

    async fn wait_before_retry(&mut self, error: &StoreError) {
        self.record_failure(&error.to_string());
        let delay = self.backoff.next_delay();
        tracing::warn!(
            sink = SINK,
            attempt = self.backoff.attempts(),
            retry_in_ms = delay.as_millis() as u64,
            pending_results = self.results.len(),
            pending_checkpoints = self.checkpoints.len(),
            error = %error,
            "store write failed, retrying"
        );
        tokio::time::sleep(delay).await;
    }

    fn record_failure(&self, error: &str) {
        let metrics = &self.args.metrics;
        metrics.sink_batches.get_or_create(&SinkResultLabels { sink: SINK, result: "error" }).inc();
        metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(0);
        self.args.health.record_failure(error.to_string());
    }

    fn on_written(&mut self, took: Duration, outcome: &crate::store::WriteOutcome) {
        let fenced = &outcome.fenced;
        let results = &self.results;
        self.args
            .live
            .publish_written(&outcome.written, |row| results.get(&row.sensor_id, &row.event_type, row.window_start_ms));
        self.args.live.publish_alerts(&outcome.alerts, &self.alerts);
        let metrics = &self.args.metrics;
        let rows = (self.results.len() + self.alerts.len() + self.dead_letters.len()) as u64;
        metrics.sink_batches.get_or_create(&SinkResultLabels { sink: SINK, result: "ok" }).inc();
        metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(1);
        metrics.observe_sink_write(SINK, took.as_secs_f64());
        for (kind, count) in [
            ("result", self.results.len()),
            ("alert", self.alerts.len()),
            ("dead_letter", self.dead_letters.len()),
            ("checkpoint", self.checkpoints.len()),
        ] {
            if count > 0 {
                metrics.sink_rows.get_or_create(&SinkRowLabels { sink: SINK, kind }).inc_by(count as u64);
            }
        }
        let now_ms = chrono::Utc::now().timestamp_millis();
        for result in self.results.as_slice() {
            metrics.fire_to_ack.observe((now_ms - result.fired_at_ms) as f64 / 1000.0);
        }
        let written = self.dead_letters.len() as u64;
        let _ = self
            .args
            .health
            .pending_dead_letters
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pending| Some(pending.saturating_sub(written)));
        self.args.health.record_success(rows);
        self.backoff.reset();
        for checkpoint in self.checkpoints.drain(..) {
            if fenced.contains(&(checkpoint.partition, checkpoint.checkpoint_id)) {
                // Another instance owns the partition now: this owner's state is stale and
                // its checkpoint must not complete (nor commit a Kafka offset).
                tracing::error!(
                    partition = checkpoint.partition,
                    epoch = checkpoint.owner_epoch,
                    position = checkpoint.next_position,
                    "checkpoint refused: another owner took the partition since"
                );
                metrics.checkpoints_fenced.get_or_create(&PartitionLabels { partition: checkpoint.partition }).inc();
                continue;
            }
            self.args.listener.checkpoint_complete(
                checkpoint.partition,
                checkpoint.next_position,
                checkpoint.checkpoint_id,
            );
        }
        self.results.take();
        self.alerts.clear();
        self.dead_letters.clear();
        self.publish_pending();
    }

    /// Write results one at a time; those the database refuses become dead letters.
    async fn isolate_rejected_rows(&mut self) -> Result<(), ActorProcessingErr> {
        let results = self.results.take();
        for result in results {
            loop {
                let batch = WriteBatch { results: std::slice::from_ref(&result), ..WriteBatch::default() };
                match self.args.store.write(&batch).await {
                    Ok(_) => break,
                    Err(error) if error.is_retriable() => self.wait_before_retry(&error).await,
                    Err(error) => {
                        tracing::error!(sink = SINK, sensor_id = %result.sensor_id, error = %error, "store refused a result row");
                        self.dead_letters.push(DeadLetter {
                            received_at_ms: chrono::Utc::now().timestamp_millis(),
                            source: Source::Pipeline,
                            reason: RejectReason::StoreRejected,
                            error: error.to_string(),
                            sensor_id: Some(result.sensor_id.clone()),
                            event_type: Some(result.event_type.clone()),
                            event_time_ms: Some(result.window_start_ms),
                            partition: None,
                            position: None,
                            payload: serde_json::to_string(&result).unwrap_or_default(),
                        });
                        break;
                    }
                }
            }
        }
        Ok(())
    }
}
