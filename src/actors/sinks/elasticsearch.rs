//! The Elasticsearch sink: window results as bulk `index` operations with deterministic
//! ids (see [`crate::elasticsearch`]).
//!
//! Checkpoints pass through this sink on their way to the store sink (after the Kafka
//! sink, when both run): one is forwarded only when Elasticsearch acknowledged every
//! result sent before it, so a complete checkpoint never refers to a result the cluster
//! lacks, and a replay after a failure re-sends anything it might have missed (same ids:
//! overwritten, never doubled). The bulk answer is read item by item: 429 and 5xx items
//! are sent again with capped backoff, items refused for their content become dead
//! letters with Elasticsearch's reason. While the cluster is unreachable the sink keeps
//! retrying the same request and holds the checkpoints: they stop completing, replay
//! buffers fill and ingestion answers 503 — memory stays bounded by the buffers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::{Gate, PendingResults, SinkHealth, Sinks};
use crate::elasticsearch::{BulkError, EsClient, ItemOutcome, encode_bulk};
use crate::messages::{CheckpointData, DeadLetter, RejectReason, Source, StoreMsg, WindowResult};
use crate::metrics::{Metrics, SinkLabels, SinkResultLabels, SinkRowLabels};
use crate::supervision::policy::RetryBackoff;

const SINK: &str = "elasticsearch";
/// How often an idle sink checks the cluster's health.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

pub enum EsSinkMsg {
    Results(Vec<WindowResult>, Option<crate::telemetry::TraceContext>),
    Checkpoint(Box<CheckpointData>),
    Linger,
    /// Check the cluster's health when nothing was sent for a while, so `/ready` tells an
    /// outage even while no results are due.
    Probe,
    /// Index everything received so far.
    Flush(RpcReplyPort<()>),
}

pub struct EsSinkArgs {
    pub client: Arc<EsClient>,
    pub sinks: Arc<Sinks>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<SinkHealth>,
}

pub struct EsSink;

pub struct EsSinkState {
    args: EsSinkArgs,
    pending: PendingResults,
    linger_armed: bool,
    /// The index template is applied before the first document (it shapes the index the
    /// first document creates), not in `pre_start`: a cluster that is down must not hold
    /// up the start of the pipeline.
    template_applied: bool,
    backoff: RetryBackoff,
}

impl Actor for EsSink {
    type Msg = EsSinkMsg;
    type State = EsSinkState;
    type Arguments = EsSinkArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<EsSinkMsg>,
        args: EsSinkArgs,
    ) -> Result<EsSinkState, ActorProcessingErr> {
        myself.send_interval(PROBE_INTERVAL, || EsSinkMsg::Probe);
        let max_backoff = args.client.config().max_backoff.max(Duration::from_millis(100));
        args.metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(1);
        Ok(EsSinkState {
            args,
            pending: PendingResults::default(),
            linger_armed: false,
            template_applied: false,
            backoff: RetryBackoff::new(Duration::from_millis(100), max_backoff),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<EsSinkMsg>,
        message: EsSinkMsg,
        state: &mut EsSinkState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EsSinkMsg::Results(results, trace) => {
                state.pending.push_all(results, trace);
                if state.pending.len() >= state.args.client.config().batch_size {
                    state.flush().await?;
                } else if !state.linger_armed {
                    state.linger_armed = true;
                    myself.send_after(state.args.client.config().linger, || EsSinkMsg::Linger);
                }
            }
            EsSinkMsg::Linger => {
                state.linger_armed = false;
                state.flush().await?;
            }
            EsSinkMsg::Checkpoint(checkpoint) => {
                state.flush().await?;
                state.args.sinks.forward_checkpoint(Gate::Elasticsearch, checkpoint)?;
            }
            EsSinkMsg::Probe => state.probe().await,
            EsSinkMsg::Flush(reply) => {
                state.flush().await?;
                let _ = reply.send(());
            }
        }
        state.args.health.pending_results.store(state.pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}

impl EsSinkState {
    /// `_cluster/health` when no request succeeded for a probe interval: an unreachable
    /// cluster or a `red` one counts as a failure (`/ready` says so); a reachable one ends
    /// a failure seen by an earlier probe.
    async fn probe(&mut self) {
        let health = &self.args.health;
        let last_ms = health.last_success_ms.load(std::sync::atomic::Ordering::Relaxed) as i64;
        let idle = chrono::Utc::now().timestamp_millis() - last_ms >= PROBE_INTERVAL.as_millis() as i64;
        if !idle || !self.pending.is_empty() {
            return;
        }
        let outcome = tokio::time::timeout(Duration::from_secs(3), self.args.client.health()).await;
        let metrics = &self.args.metrics;
        match outcome {
            Ok(Ok(status)) if status != "red" => {
                metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(1);
                health.record_reachable();
            }
            Ok(Ok(status)) => {
                metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(0);
                health.record_failure(format!("cluster health is {status}"));
            }
            Ok(Err(error)) => {
                metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(0);
                health.record_failure(error);
            }
            Err(_) => {
                metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(0);
                health.record_failure("_cluster/health: no answer within 3 s".into());
            }
        }
    }

    /// Index everything pending, in requests of at most `batch_size` documents and
    /// `batch_bytes` bytes, retrying until every item is indexed or dead-lettered.
    async fn flush(&mut self) -> Result<(), ActorProcessingErr> {
        let batch_size = self.args.client.config().batch_size.max(1);
        let span = self.pending.write_span(SINK);
        let mut pending = self.pending.take();
        self.args.health.pending_results.store(pending.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let send_all = async {
            while !pending.is_empty() {
                let rest = pending.split_off(pending.len().min(batch_size));
                self.send(pending).await?;
                pending = rest;
            }
            Ok(())
        };
        tracing::Instrument::instrument(send_all, span).await
    }

    /// One chunk: split while its body is over `batch_bytes` or the cluster refuses the
    /// request as a whole (a single refused document is a dead letter); items answered
    /// 429/5xx and failed requests are sent again after a backoff.
    async fn send(&mut self, chunk: Vec<WindowResult>) -> Result<(), ActorProcessingErr> {
        while !self.template_applied {
            match self.args.client.apply_template().await {
                Ok(()) => self.template_applied = true,
                Err(BulkError::Retriable(error)) => self.wait_before_retry(&error, "applying the index template").await,
                Err(BulkError::Refused(error)) => {
                    return Err(format!("elasticsearch refused the index template: {error}").into());
                }
            }
        }
        let mut work = vec![chunk];
        while let Some(mut chunk) = work.pop() {
            loop {
                let refs: Vec<&WindowResult> = chunk.iter().collect();
                let body = encode_bulk(&self.args.client.index, &refs, chrono::Utc::now().timestamp_millis())?;
                if body.bytes.len() > self.args.client.config().batch_bytes && chunk.len() > 1 {
                    let second = chunk.split_off(chunk.len() / 2);
                    work.push(second);
                    continue;
                }
                let started = Instant::now();
                match self.args.client.bulk(body).await {
                    Ok(outcomes) => {
                        let took = started.elapsed();
                        let mut retry = Vec::new();
                        let mut rejected = Vec::new();
                        let mut retry_reason = None;
                        let mut indexed = 0u64;
                        for (result, outcome) in chunk.into_iter().zip(outcomes) {
                            match outcome {
                                ItemOutcome::Indexed => indexed += 1,
                                ItemOutcome::Retry(reason) => {
                                    retry_reason.get_or_insert(reason);
                                    retry.push(result);
                                }
                                ItemOutcome::Rejected(reason) => rejected.push(dead_letter(&result, reason)),
                            }
                        }
                        self.on_written(took, indexed, &rejected, retry_reason.is_none());
                        if !rejected.is_empty() {
                            self.args.sinks.send_store(StoreMsg::DeadLetters(rejected))?;
                        }
                        match retry_reason {
                            None => break,
                            Some(reason) => {
                                let what = format!("{} bulk items", retry.len());
                                self.wait_before_retry(&reason, &what).await;
                                chunk = retry;
                            }
                        }
                    }
                    Err(BulkError::Retriable(error)) => self.wait_before_retry(&error, "a bulk request").await,
                    Err(BulkError::Refused(error)) if chunk.len() > 1 => {
                        tracing::warn!(sink = SINK, documents = chunk.len(), %error, "bulk request refused; splitting it");
                        let second = chunk.split_off(chunk.len() / 2);
                        work.push(second);
                    }
                    Err(BulkError::Refused(error)) => {
                        let letters: Vec<DeadLetter> =
                            chunk.iter().map(|result| dead_letter(result, error.clone())).collect();
                        self.on_written(started.elapsed(), 0, &letters, true);
                        self.args.sinks.send_store(StoreMsg::DeadLetters(letters))?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    async fn wait_before_retry(&mut self, error: &str, what: &str) {
        let metrics = &self.args.metrics;
        metrics.sink_batches.get_or_create(&SinkResultLabels { sink: SINK, result: "error" }).inc();
        metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(0);
        self.args.health.record_failure(error.to_string());
        let delay = self.backoff.next_delay();
        tracing::warn!(sink = SINK, attempt = self.backoff.attempts(), retry_in_ms = delay.as_millis() as u64, %error, "retrying {what}");
        tokio::time::sleep(delay).await;
    }

    /// `complete`: no item is left to retry (the backoff starts afresh).
    fn on_written(&mut self, took: Duration, indexed: u64, rejected: &[DeadLetter], complete: bool) {
        let metrics = &self.args.metrics;
        metrics.sink_batches.get_or_create(&SinkResultLabels { sink: SINK, result: "ok" }).inc();
        metrics.observe_sink_write(SINK, took.as_secs_f64());
        if indexed > 0 {
            metrics.sink_rows.get_or_create(&SinkRowLabels { sink: SINK, kind: "result" }).inc_by(indexed);
        }
        if !rejected.is_empty() {
            metrics
                .sink_rows
                .get_or_create(&SinkRowLabels { sink: SINK, kind: "rejected" })
                .inc_by(rejected.len() as u64);
            for letter in rejected {
                tracing::error!(sink = SINK, sensor_id = ?letter.sensor_id, error = %letter.error, "elasticsearch refused a document");
            }
        }
        if complete {
            metrics.sink_up.get_or_create(&SinkLabels { sink: SINK }).set(1);
            self.args.health.record_success(indexed);
            self.backoff.reset();
        }
    }
}

fn dead_letter(result: &WindowResult, reason: String) -> DeadLetter {
    DeadLetter {
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        source: Source::Pipeline,
        reason: RejectReason::ElasticsearchRejected,
        error: reason,
        sensor_id: Some(result.sensor_id.clone()),
        event_type: Some(result.event_type.clone()),
        event_time_ms: Some(result.window_start_ms),
        partition: None,
        position: None,
        payload: serde_json::to_string(result).unwrap_or_default(),
    }
}
