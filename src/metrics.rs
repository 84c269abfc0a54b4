//! Prometheus metrics of one runtime instance (no global registry, so tests can run
//! several instances in one process). Labels carry partitions, sources, reasons and
//! sinks, never a sensor id: their cardinality stays bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub source: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub partition: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PositionLabels {
    pub partition: u32,
    /// `processed`, `dead_lettered` or `skipped`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SeverityLabels {
    pub severity: &'static str,
}

/// An alert rule's transitions (`state`: firing, resolved).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabels {
    pub rule: String,
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    pub sink: &'static str,
}

/// The exemplar of a traced observation: Grafana links it to the trace.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TraceLabels {
    pub trace_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkResultLabels {
    pub sink: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkRowLabels {
    pub sink: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActorLabels {
    pub actor: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(latency_bounds())
}

pub struct Metrics {
    registry: Registry,
    pub events_received: Totalled<SourceLabels>,
    pub events_accepted: Totalled<SourceLabels>,
    pub events_rejected: Totalled<RejectLabels>,
    pub dead_letters_sampled: Family<RejectLabels, Counter>,
    pub ingest_backpressure: Family<SourceLabels, Counter>,
    pub events_processed: Family<PartitionLabels, Counter>,
    pub events_late: Family<PartitionLabels, Counter>,
    pub windows_fired: Family<PartitionLabels, Counter>,
    pub window_updates: Family<PartitionLabels, Counter>,
    pub anomalies: Family<SeverityLabels, Counter>,
    pub alerts: Family<AlertLabels, Counter>,
    pub open_keys: Family<PartitionLabels, Gauge>,
    pub keys_evicted: Family<PartitionLabels, Counter>,
    pub keys_refused: Family<PartitionLabels, Counter>,
    pub buffered_events: Family<PartitionLabels, Gauge>,
    pub checkpoints_completed: Family<PartitionLabels, Counter>,
    pub checkpoint_position: Family<PartitionLabels, Gauge>,
    pub actor_restarts: Family<ActorLabels, Counter>,
    pub events_quarantined: Family<PartitionLabels, Counter>,
    pub sink_batches: Family<SinkResultLabels, Counter>,
    pub sink_rows: Family<SinkRowLabels, Counter>,
    pub sink_write_seconds: Family<SinkLabels, HistogramWithExemplars<TraceLabels>>,
    pub sink_up: Family<SinkLabels, Gauge>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_seconds: Family<RouteLabels, Histogram>,
    pub kafka_consumer_lag: Family<PartitionLabels, Gauge>,
    pub kafka_offsets_skipped: Family<PartitionLabels, Counter>,
    pub kafka_partitions_paused: Family<PartitionLabels, Gauge>,
    pub checkpoints_fenced: Family<PartitionLabels, Counter>,
    pub positions_consumed: Family<PartitionLabels, Gauge>,
    pub positions: Family<PositionLabels, Gauge>,
    pub ingest_to_fire: Latency,
    pub fire_to_ack: Latency,
    pub ingest_log: crate::ingest::log::LogMetrics,
    pub mqtt_connected: Gauge,
    pub mqtt_reconnects: Counter,
    pub mqtt_in_flight: Gauge,
    pub mqtt_duplicates: Counter,
    pub ws_connections: Gauge,
    pub ws_messages_sent: Family<KindLabels, Counter>,
    pub ws_messages_dropped: Family<KindLabels, Counter>,
    pub ws_disconnects: Family<ReasonLabels, Counter>,
    pub ws_fire_to_send: Latency,
}

/// A counter family that also keeps the sum over its labels (the live status shows
/// totals; a family cannot be read back).
pub struct Totalled<L> {
    family: Family<L, Counter>,
    total: Arc<AtomicU64>,
}

impl<L: Clone + std::hash::Hash + Eq> Default for Totalled<L> {
    fn default() -> Self {
        Self { family: Family::default(), total: Arc::default() }
    }
}

impl<L> Totalled<L>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    pub fn get_or_create(&self, labels: &L) -> TotalledCounter {
        TotalledCounter { counter: self.family.get_or_create(labels).clone(), total: Arc::clone(&self.total) }
    }

    /// The sum over every label set.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }
}

/// One counter of a [`Totalled`] family.
#[derive(Clone)]
pub struct TotalledCounter {
    counter: Counter,
    total: Arc<AtomicU64>,
}

impl TotalledCounter {
    pub fn inc(&self) {
        self.inc_by(1);
    }

    pub fn inc_by(&self, n: u64) {
        self.counter.inc_by(n);
        self.total.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.counter.get()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tidemark");
        let metrics = Self {
            events_received: Totalled::default(),
            events_accepted: Totalled::default(),
            events_rejected: Totalled::default(),
            dead_letters_sampled: Family::default(),
            ingest_backpressure: Family::default(),
            events_processed: Family::default(),
            events_late: Family::default(),
            windows_fired: Family::default(),
            window_updates: Family::default(),
            anomalies: Family::default(),
            alerts: Family::default(),
            open_keys: Family::default(),
            keys_evicted: Family::default(),
            keys_refused: Family::default(),
            buffered_events: Family::default(),
            checkpoints_completed: Family::default(),
            checkpoint_position: Family::default(),
            actor_restarts: Family::default(),
            events_quarantined: Family::default(),
            sink_batches: Family::default(),
            sink_rows: Family::default(),
            sink_write_seconds: Family::new_with_constructor(|| HistogramWithExemplars::new(latency_bounds())),
            sink_up: Family::default(),
            http_requests: Family::default(),
            http_request_seconds: Family::new_with_constructor(latency_histogram),
            kafka_consumer_lag: Family::default(),
            kafka_offsets_skipped: Family::default(),
            kafka_partitions_paused: Family::default(),
            checkpoints_fenced: Family::default(),
            positions_consumed: Family::default(),
            positions: Family::default(),
            ingest_to_fire: Latency::default(),
            fire_to_ack: Latency::default(),
            ingest_log: crate::ingest::log::LogMetrics::default(),
            mqtt_connected: Gauge::default(),
            mqtt_reconnects: Counter::default(),
            mqtt_in_flight: Gauge::default(),
            mqtt_duplicates: Counter::default(),
            ws_connections: Gauge::default(),
            ws_messages_sent: Family::default(),
            ws_messages_dropped: Family::default(),
            ws_disconnects: Family::default(),
            ws_fire_to_send: Latency::default(),
            registry: Registry::default(),
        };
        registry.register("events_received", "Events received, valid or not", metrics.events_received.family.clone());
        registry.register("mqtt_connected", "1 while the MQTT connection is up", metrics.mqtt_connected.clone());
        registry.register(
            "mqtt_reconnects",
            "Times the MQTT connection was lost after being up",
            metrics.mqtt_reconnects.clone(),
        );
        registry.register(
            "mqtt_in_flight",
            "MQTT messages received and not yet acknowledged",
            metrics.mqtt_in_flight.clone(),
        );
        registry.register(
            "mqtt_duplicates",
            "MQTT messages recognised as redeliveries of events already taken (acknowledged, not counted again)",
            metrics.mqtt_duplicates.clone(),
        );
        registry.register(
            "ingest_log_syncs",
            "Group commits (fdatasync rounds) of the embedded ingest log",
            metrics.ingest_log.syncs.clone(),
        );
        registry.register(
            "ingest_log_written_bytes",
            "Bytes written to the embedded ingest log",
            metrics.ingest_log.bytes.clone(),
        );
        registry.register(
            "events_accepted",
            "Events accepted into the pipeline",
            metrics.events_accepted.family.clone(),
        );
        registry.register(
            "events_rejected",
            "Events rejected at ingestion, by reason",
            metrics.events_rejected.family.clone(),
        );
        registry.register(
            "ingest_backpressure",
            "Ingestion requests refused with 503 because a partition's replay buffer was full",
            metrics.ingest_backpressure.clone(),
        );
        registry.register(
            "dead_letters_sampled",
            "Rejected events counted but not stored: repeats past dead_letters.sample_limit per client, reason and window",
            metrics.dead_letters_sampled.clone(),
        );
        registry.register("events_processed", "Events processed by partition actors", metrics.events_processed.clone());
        registry.register(
            "events_late",
            "Events later than the allowed lateness (dead-lettered)",
            metrics.events_late.clone(),
        );
        registry.register("windows_fired", "Windows fired for the first time", metrics.windows_fired.clone());
        registry.register("window_updates", "Windows re-fired by late events", metrics.window_updates.clone());
        registry.register("anomalies", "Anomalous windows, by severity", metrics.anomalies.clone());
        registry.register("alerts", "Alert transitions, by rule and state (firing, resolved)", metrics.alerts.clone());
        registry.register("open_keys", "Keys (sensorId, eventType) held by a partition", metrics.open_keys.clone());
        registry.register(
            "keys_evicted",
            "Keys that left memory after pipeline.key_ttl without events",
            metrics.keys_evicted.clone(),
        );
        registry.register(
            "keys_refused",
            "Events refused because their partition holds pipeline.max_keys_per_partition keys (key_limit)",
            metrics.keys_refused.clone(),
        );
        registry.register(
            "buffered_events",
            "Events accepted but not yet covered by a complete checkpoint",
            metrics.buffered_events.clone(),
        );
        registry.register("checkpoints_completed", "Complete checkpoints", metrics.checkpoints_completed.clone());
        registry.register(
            "checkpoint_position",
            "Next source position of the last complete checkpoint",
            metrics.checkpoint_position.clone(),
        );
        registry.register("actor_restarts", "Actor restarts by their supervisor", metrics.actor_restarts.clone());
        registry.register(
            "events_quarantined",
            "Poison events quarantined after crashing their partition repeatedly",
            metrics.events_quarantined.clone(),
        );
        registry.register("sink_batches", "Sink write batches, by result", metrics.sink_batches.clone());
        registry.register("sink_rows", "Rows written by sinks, by kind", metrics.sink_rows.clone());
        registry.register("sink_write_seconds", "Duration of sink write batches", metrics.sink_write_seconds.clone());
        registry.register("sink_up", "1 while the sink's last write succeeded", metrics.sink_up.clone());
        registry.register("http_requests", "HTTP requests served", metrics.http_requests.clone());
        registry.register("http_request_seconds", "HTTP request duration", metrics.http_request_seconds.clone());
        registry.register(
            "ingest_to_fire_seconds",
            "From ingestion of the event that closed a window to the window firing",
            metrics.ingest_to_fire.histogram(),
        );
        registry.register("ws_connections", "Open WebSocket connections (GET /ws)", metrics.ws_connections.clone());
        registry.register(
            "ws_messages_sent",
            "Messages sent to WebSocket clients, by kind",
            metrics.ws_messages_sent.clone(),
        );
        registry.register(
            "ws_messages_dropped",
            "Messages a WebSocket client missed because it fell behind (it is told: lagged), by kind",
            metrics.ws_messages_dropped.clone(),
        );
        registry.register("ws_disconnects", "WebSocket connections ended, by reason", metrics.ws_disconnects.clone());
        registry.register(
            "ws_fire_to_send_seconds",
            "From a window firing to its prediction being sent to a WebSocket client",
            metrics.ws_fire_to_send.histogram(),
        );
        registry.register(
            "fire_to_ack_seconds",
            "From a window firing to the store sink committing it",
            metrics.fire_to_ack.histogram(),
        );
        registry.register(
            "kafka_consumer_lag",
            "Messages of an assigned Kafka partition not yet processed (high watermark - processed offset)",
            metrics.kafka_consumer_lag.clone(),
        );
        registry.register(
            "kafka_offsets_skipped",
            "Kafka offsets that could not be read (deleted by retention before tidemark got to them)",
            metrics.kafka_offsets_skipped.clone(),
        );
        registry.register(
            "kafka_partition_paused",
            "1 while an assigned Kafka partition is paused (backpressure, or waiting for its actor)",
            metrics.kafka_partitions_paused.clone(),
        );
        registry.register(
            "checkpoints_fenced",
            "Checkpoints refused because another owner took the partition since",
            metrics.checkpoints_fenced.clone(),
        );
        registry.register(
            "partition_positions_consumed",
            "Source positions a partition's state covers (next position - first position)",
            metrics.positions_consumed.clone(),
        );
        registry.register(
            "partition_positions",
            "Where a partition's consumed positions went: processed + dead_lettered + skipped = consumed",
            metrics.positions.clone(),
        );
        Self { registry, ..metrics }
    }

    /// A sink write took `seconds`; inside a traced write's span, the observation
    /// carries its trace id as an exemplar (OpenMetrics only).
    pub fn observe_sink_write(&self, sink: &'static str, seconds: f64) {
        let exemplar = crate::telemetry::enabled()
            .then(|| crate::telemetry::TraceContext::of(&tracing::Span::current()))
            .flatten()
            .map(|trace| TraceLabels { trace_id: trace.trace_id.to_string() });
        self.sink_write_seconds.get_or_create(&SinkLabels { sink }).observe(seconds, exemplar, None);
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(error) = encode(&mut out, &self.registry) {
            out.push_str(&format!("# encoding failed: {error}\n"));
        }
        out
    }

    /// The exposition in `format`, with its content type.
    pub fn render_as(&self, format: Exposition) -> (&'static str, String) {
        match format {
            Exposition::OpenMetrics => (Exposition::OPENMETRICS, self.render()),
            Exposition::Text => (Exposition::TEXT, openmetrics_to_text(&self.render())),
        }
    }
}

/// The two formats `/metrics` speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0 (`application/openmetrics-text`): exemplars, `# EOF`.
    OpenMetrics,
    /// Prometheus' classic text format 0.0.4 (`text/plain`).
    Text,
}

impl Exposition {
    pub const OPENMETRICS: &'static str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    pub const TEXT: &'static str = "text/plain; version=0.0.4; charset=utf-8";

    /// The format an `Accept` header asks for, as Prometheus' own client libraries
    /// decide: OpenMetrics when it is named and weighted at least as high as
    /// `text/plain`; the classic text format otherwise (no header, `*/*`, `text/plain`).
    pub fn negotiate(accept: Option<&str>) -> Self {
        let mut openmetrics = 0.0_f64;
        let mut text = 0.0_f64;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let q = parts
                .filter_map(|param| param.split_once('='))
                .find(|(name, _)| name.trim().eq_ignore_ascii_case("q"))
                .map_or(1.0, |(_, value)| value.trim().parse::<f64>().unwrap_or(0.0));
            match media.as_str() {
                "application/openmetrics-text" => openmetrics = openmetrics.max(q),
                "text/plain" => text = text.max(q),
                _ => {}
            }
        }
        if openmetrics > 0.0 && openmetrics >= text { Self::OpenMetrics } else { Self::Text }
    }
}

/// OpenMetrics text (as `prometheus-client` writes it) in the classic text format:
/// counter families are named with their `_total` suffix, `info` families become
/// gauges named `_info`, `unknown` becomes `untyped`; `# UNIT`, `# EOF`, `_created`
/// samples and exemplars are dropped; HELP text is re-escaped (`\"` is not an escape
/// there).
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut help: Option<(&str, &str)> = None;
    let mut counter_family: Option<String> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (suffix, classic) = match kind {
                "counter" => ("_total", "counter"),
                "info" => ("_info", "gauge"),
                "gauge" | "stateset" => ("", "gauge"),
                "histogram" | "gaugehistogram" => ("", "histogram"),
                "summary" => ("", "summary"),
                _ => ("", "untyped"),
            };
            counter_family = (kind == "counter").then(|| name.to_string());
            if let Some((help_name, text)) = help.take()
                && help_name == name
            {
                out.push_str(&format!("# HELP {name}{suffix} {}\n", text.replace("\\\"", "\"")));
            }
            out.push_str(&format!("# TYPE {name}{suffix} {classic}\n"));
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        if let Some(family) = &counter_family
            && line.strip_prefix(family.as_str()).is_some_and(|rest| rest.starts_with("_created"))
        {
            continue;
        }
        // An exemplar follows the value as ` # {labels} value [timestamp]`.
        let sample = match line.find(" # {") {
            Some(at) => &line[..at],
            None => line,
        };
        out.push_str(sample);
        out.push('\n');
    }
    out
}

/// Bucket bounds (seconds) shared by the latency histograms: 0.1 ms .. ~26 s.
fn latency_bounds() -> impl Iterator<Item = f64> {
    exponential_buckets(0.0001, 2.0, 19)
}

/// A latency histogram exported to Prometheus (coarse buckets) that also keeps an HDR
/// histogram (3 significant digits) for the quantiles `/api/status` reports.
pub struct Latency {
    histogram: Histogram,
    precise: parking_lot::Mutex<hdrhistogram::Histogram<u64>>,
}

impl Default for Latency {
    fn default() -> Self {
        Self {
            histogram: latency_histogram(),
            // microseconds, 1 µs .. 1 h
            precise: parking_lot::Mutex::new(
                hdrhistogram::Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant bounds are valid"),
            ),
        }
    }
}

impl Latency {
    pub fn observe(&self, seconds: f64) {
        let seconds = seconds.max(0.0);
        self.histogram.observe(seconds);
        let micros = (seconds * 1e6) as u64;
        self.precise.lock().saturating_record(micros.max(1));
    }

    pub fn histogram(&self) -> Histogram {
        self.histogram.clone()
    }

    /// Observation count and the value (seconds) at each quantile (`None` when empty).
    pub fn quantiles(&self, quantiles: &[f64]) -> (u64, Vec<Option<f64>>) {
        let precise = self.precise.lock();
        let count = precise.len();
        let answers =
            quantiles.iter().map(|&q| (count > 0).then(|| precise.value_at_quantile(q) as f64 / 1e6)).collect();
        (count, answers)
    }

    /// Forget the recorded quantiles (benchmarks measure a phase at a time).
    pub fn reset(&self) {
        self.precise.lock().reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_quantiles_come_from_buckets() {
        let latency = Latency::default();
        assert_eq!(latency.quantiles(&[0.5]).1, vec![None]);
        for _ in 0..90 {
            latency.observe(0.00005);
        }
        for _ in 0..10 {
            latency.observe(0.05);
        }
        let (count, q) = latency.quantiles(&[0.5, 0.99]);
        assert_eq!(count, 100);
        assert!((q[0].unwrap() - 0.00005).abs() < 1e-6, "{q:?}");
        assert!((q[1].unwrap() - 0.05).abs() < 0.0001, "{q:?}");
    }

    #[test]
    fn accept_headers_choose_the_format() {
        use Exposition::*;
        // What Prometheus 2.x sends.
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Exposition::negotiate(Some(prometheus)), OpenMetrics);
        assert_eq!(
            Exposition::negotiate(Some("text/plain;version=0.0.4;q=1,application/openmetrics-text;q=0.5")),
            Text
        );
        assert_eq!(Exposition::negotiate(Some("text/plain")), Text);
        assert_eq!(Exposition::negotiate(Some("*/*")), Text);
        assert_eq!(Exposition::negotiate(None), Text);
        assert_eq!(Exposition::negotiate(Some("application/openmetrics-text; q=0")), Text);
        assert_eq!(Exposition::negotiate(Some("Application/OpenMetrics-Text")), OpenMetrics);
    }

    #[test]
    fn the_text_format_names_counters_with_their_suffix_and_drops_openmetrics_only_lines() {
        let openmetrics = "# HELP a_events Events \\\"in\\\".\n# TYPE a_events counter\na_events_total{x=\"1\"} 3 # {trace_id=\"ab\"} 1.0\na_events_created 17.0\n\
# HELP b_seconds Time.\n# TYPE b_seconds histogram\n# UNIT b_seconds seconds\nb_seconds_bucket{le=\"+Inf\"} 1\nb_seconds_sum 0.5\nb_seconds_count 1\n\
# HELP c Build.\n# TYPE c info\nc_info{v=\"1\"} 1\n# HELP d Other.\n# TYPE d unknown\nd 2\n# EOF\n";
        let text = openmetrics_to_text(openmetrics);
        assert_eq!(
            text,
            "# HELP a_events_total Events \"in\".\n# TYPE a_events_total counter\na_events_total{x=\"1\"} 3\n\
# HELP b_seconds Time.\n# TYPE b_seconds histogram\nb_seconds_bucket{le=\"+Inf\"} 1\nb_seconds_sum 0.5\nb_seconds_count 1\n\
# HELP c_info Build.\n# TYPE c_info gauge\nc_info{v=\"1\"} 1\n# HELP d Other.\n# TYPE d untyped\nd 2\n"
        );
    }

    #[test]
    fn render_lists_registered_metrics() {
        let metrics = Metrics::new();
        metrics.events_accepted.get_or_create(&SourceLabels { source: "http" }).inc();
        let text = metrics.render();
        assert!(text.contains("tidemark_events_accepted_total{source=\"http\"} 1"), "{text}");
    }
}
