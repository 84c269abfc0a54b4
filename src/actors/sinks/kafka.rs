//! The Kafka sink: window results to `kafka.results_topic`, the alert rules' alerts
//! (firing, then resolved) to `kafka.alerts_topic`, as JSON keyed by sensorId.
//!
//! Checkpoints travel through this sink on their way to the store sink: one is forwarded
//! only after the broker acknowledged every result sent before it. A checkpoint is thus
//! complete only when the topics have the results too, and a replay after a failure
//! re-sends anything the topics might have missed (at-least-once; consumers key results
//! by `(sensorId, eventType, windowStart)` and alerts by `(rule, sensorId, eventType,
//! startedAt, state)` to drop repeats).

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::Serialize;

use super::Sinks;
use crate::messages::{CheckpointData, WindowResult};
use crate::metrics::{Metrics, SinkResultLabels, SinkRowLabels};
use crate::store::ser::rfc3339;

const SINK: &str = "kafka";

pub enum KafkaSinkMsg {
    Results(Vec<WindowResult>, Option<crate::telemetry::TraceContext>),
    /// Alerts the rules raised or resolved (to the alerts topic).
    Alerts(Vec<crate::rules::Alert>),
    Checkpoint(Box<CheckpointData>),
    /// Wait for every delivery so far.
    Flush(RpcReplyPort<()>),
}

pub struct KafkaSinkArgs {
    pub producer: FutureProducer,
    pub results_topic: Option<String>,
    pub alerts_topic: Option<String>,
    pub timeout: Duration,
    pub sinks: Arc<Sinks>,
    pub metrics: Arc<Metrics>,
}

pub struct KafkaSink;

pub struct KafkaSinkState {
    args: KafkaSinkArgs,
    pending: Vec<DeliveryFuture>,
}

/// A result as the output topics carry it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultRecord<'a> {
    pub sensor_id: &'a str,
    pub event_type: &'a str,
    pub window_start: String,
    pub window_end: String,
    pub event_count: u64,
    pub avg_value: f64,
    pub min_value: f64,
    pub max_value: f64,
    pub stddev: f64,
    pub prediction_score: f64,
    pub anomaly: bool,
    pub severity: &'static str,
    pub revision: u32,
    pub explanation: &'a str,
    /// Absent for tumbling windows (the records written before window kinds existed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_kind: Option<&'static str>,
    /// Session windows: starts of this key's earlier results this one replaces.
    #[serde(skip_serializing_if = "<[i64]>::is_empty")]
    pub supersedes: &'a [i64],
}

impl<'a> From<&'a WindowResult> for ResultRecord<'a> {
    fn from(r: &'a WindowResult) -> Self {
        Self {
            sensor_id: &r.sensor_id,
            event_type: &r.event_type,
            window_start: rfc3339(r.window_start_ms),
            window_end: rfc3339(r.window_end_ms),
            event_count: r.event_count,
            avg_value: r.avg_value,
            min_value: r.min_value,
            max_value: r.max_value,
            stddev: r.stddev,
            prediction_score: r.prediction_score,
            anomaly: r.anomaly,
            severity: r.severity.as_str(),
            revision: r.revision,
            explanation: &r.explanation,
            window_kind: (r.window_kind != crate::window::WindowKind::Tumbling).then(|| r.window_kind.as_str()),
            supersedes: &r.supersedes,
        }
    }
}

impl KafkaSinkState {
    /// Queue one record; waits (briefly, repeatedly) while the producer's queue is full.
    async fn send(
        &mut self,
        topic: &str,
        key: &str,
        payload: &[u8],
        headers: Option<&rdkafka::message::OwnedHeaders>,
    ) -> Result<(), ActorProcessingErr> {
        let deadline = tokio::time::Instant::now() + self.args.timeout;
        loop {
            let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key).payload(payload);
            if let Some(headers) = headers {
                record = record.headers(headers.clone());
            }
            match self.args.producer.send_result(record) {
                Ok(delivery) => {
                    self.pending.push(delivery);
                    return Ok(());
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err((error, _)) => return Err(format!("cannot produce to {topic}: {error}").into()),
            }
        }
    }

    /// Wait until the broker acknowledged everything queued; a failure fails the sink
    /// (its supervisor restarts it and rewinds the partitions, which re-emit).
    async fn drain(&mut self) -> Result<(), ActorProcessingErr> {
        let pending = std::mem::take(&mut self.pending);
        let count = pending.len() as u64;
        let outcome = tokio::time::timeout(self.args.timeout, futures::future::join_all(pending)).await;
        let metrics = &self.args.metrics;
        let failure = match outcome {
            Err(_) => Some("deliveries not acknowledged within kafka.produce_timeout".to_string()),
            Ok(results) => results.into_iter().find_map(|result| match result {
                Ok(Ok(_)) => None,
                Ok(Err((error, _))) => Some(error.to_string()),
                Err(_) => Some("delivery cancelled".to_string()),
            }),
        };
        match failure {
            None => {
                if count > 0 {
                    metrics.sink_batches.get_or_create(&SinkResultLabels { sink: SINK, result: "ok" }).inc();
                    metrics.sink_rows.get_or_create(&SinkRowLabels { sink: SINK, kind: "result" }).inc_by(count);
                }
                Ok(())
            }
            Some(reason) => {
                metrics.sink_batches.get_or_create(&SinkResultLabels { sink: SINK, result: "error" }).inc();
                Err(reason.into())
            }
        }
    }
}

impl Actor for KafkaSink {
    type Msg = KafkaSinkMsg;
    type State = KafkaSinkState;
    type Arguments = KafkaSinkArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<KafkaSinkMsg>,
        args: KafkaSinkArgs,
    ) -> Result<KafkaSinkState, ActorProcessingErr> {
        Ok(KafkaSinkState { args, pending: Vec::new() })
    }

    async fn handle(
        &self,
        _myself: ActorRef<KafkaSinkMsg>,
        message: KafkaSinkMsg,
        state: &mut KafkaSinkState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            KafkaSinkMsg::Results(results, trace) => {
                // A traced batch: its records carry the produce span's traceparent.
                let span = trace.map_or_else(tracing::Span::none, |trace| {
                    let span = tracing::info_span!(
                        target: crate::telemetry::TARGET,
                        "kafka.produce",
                        trace_id = tracing::field::Empty,
                        otel.kind = "producer",
                        messaging.system = "kafka",
                        messaging.batch.message_count = results.len(),
                    );
                    crate::telemetry::follow(&span, &[trace]);
                    span
                });
                let headers = crate::telemetry::TraceContext::of(&span).map(crate::kafka::trace_headers);
                let produce = async {
                    for result in &results {
                        let payload = serde_json::to_vec(&ResultRecord::from(result))?;
                        if let Some(topic) = state.args.results_topic.clone() {
                            state.send(&topic, &result.sensor_id, &payload, headers.as_ref()).await?;
                        }
                    }
                    Ok::<(), ActorProcessingErr>(())
                };
                tracing::Instrument::instrument(produce, span).await?;
            }
            KafkaSinkMsg::Alerts(alerts) => {
                if let Some(topic) = state.args.alerts_topic.clone() {
                    for alert in &alerts {
                        let payload = serde_json::to_vec(&crate::rules::AlertRecord::from(alert))?;
                        state.send(&topic, &alert.sensor_id, &payload, None).await?;
                    }
                }
            }
            KafkaSinkMsg::Checkpoint(checkpoint) => {
                state.drain().await?;
                state.args.sinks.forward_checkpoint(super::Gate::Kafka, checkpoint)?;
            }
            KafkaSinkMsg::Flush(reply) => {
                state.drain().await?;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}
