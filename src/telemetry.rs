//! Logging and traces.
//!
//! Logs: `tracing` with an env filter (`RUST_LOG` wins over `log.level`), as text or JSON
//! lines. Traces: OpenTelemetry over OTLP (`[telemetry]`), through
//! `tracing-opentelemetry`, only for spans of target [`TARGET`].
//!
//! Traces cross actors as a [`TraceContext`] carried beside a batch (never inside an
//! event): an HTTP request's span hands its context to the router, the router's to the
//! partition, the partition's to the sinks with the results it fired. A batch gathered
//! from many parents (a sink write, a Kafka poll) continues the first and links the
//! others. With no endpoint configured nothing creates a context, so no span is ever
//! built: the cost is a check of an empty `Option` per batch.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter};
use smallvec::SmallVec;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::config::{LogConfig, TelemetryConfig};

/// The `tracing` target of the spans exported as traces.
pub const TARGET: &str = "tidemark::trace";

/// Links one span carries at most (a sink batch of many requests).
pub const MAX_LINKS: usize = 64;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported (`telemetry.otlp_endpoint` set and initialised).
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Flushes the exporter when the process ends.
#[must_use = "dropping the guard without `shutdown` may lose the last spans"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export what is buffered and stop the exporter.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            ENABLED.store(false, Ordering::Relaxed);
            let result = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(error)) = result {
                eprintln!("traces: exporter shutdown: {error}");
            }
        }
    }
}

/// Install the global subscriber: logs, and traces when configured. Call once, from a
/// binary, inside the Tokio runtime (the exporter runs on it).
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in a file or a collector's input.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi);
    let fmt = if log.format == "json" { fmt.json().boxed() } else { fmt.boxed() };
    let (provider, traces) = match tracer_provider(telemetry) {
        Ok(Some(provider)) => {
            let tracer = provider.tracer("tidemark");
            let only_pipeline_spans =
                tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE);
            let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(only_pipeline_spans);
            (Some(provider), Some(layer))
        }
        Ok(None) => (None, None),
        Err(error) => {
            eprintln!("traces are off: {error}");
            (None, None)
        }
    };
    let result = tracing_subscriber::registry().with(fmt.with_filter(filter)).with(traces).try_init();
    match result {
        Ok(()) => ENABLED.store(provider.is_some(), Ordering::Relaxed),
        Err(error) => eprintln!("logging already initialised: {error}"),
    }
    if let Some(_provider) = &provider {
        tracing::info!(
            endpoint = %telemetry.otlp_endpoint,
            protocol = %telemetry.otlp_protocol,
            sampling_ratio = telemetry.sampling_ratio,
            "exporting traces"
        );
    }
    Telemetry { provider }
}

fn tracer_provider(config: &TelemetryConfig) -> Result<Option<SdkTracerProvider>, String> {
    if !config.enabled() {
        return Ok(None);
    }
    let runtime = tokio::runtime::Handle::try_current().map_err(|_| "no Tokio runtime to export on".to_string())?;
    let endpoint = config.otlp_endpoint.trim_end_matches('/');
    let exporter = match config.otlp_protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(config.export_timeout)
            .build(),
        _ => {
            let url =
                if endpoint.ends_with("/v1/traces") { endpoint.to_string() } else { format!("{endpoint}/v1/traces") };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(config.export_timeout)
                .build()
        }
    }
    .map_err(|error| format!("OTLP exporter for {endpoint}: {error}"))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attributes(resource_attributes(&config.resource_attributes))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime { inner: Arc::new(exporter), runtime })
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sampling_ratio))))
        .with_resource(resource)
        .build();
    Ok(Some(provider))
}

fn resource_attributes(attributes: &BTreeMap<String, String>) -> Vec<KeyValue> {
    let mut all = vec![KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))];
    all.extend(attributes.iter().map(|(key, value)| KeyValue::new(key.clone(), value.clone())));
    all
}

/// Runs each export on the Tokio runtime: the SDK's batch processor calls the exporter
/// from a thread of its own, and the OTLP clients (tonic, hyper) need a runtime.
#[derive(Debug)]
struct OnRuntime<E> {
    inner: Arc<E>,
    runtime: tokio::runtime::Handle,
}

impl<E: SpanExporter + 'static> SpanExporter for OnRuntime<E> {
    fn export(&self, batch: Vec<SpanData>) -> impl Future<Output = OTelSdkResult> + Send {
        let inner = Arc::clone(&self.inner);
        let task = self.runtime.spawn(async move { inner.export(batch).await });
        async move { task.await.unwrap_or_else(|error| Err(OTelSdkError::InternalFailure(error.to_string()))) }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.set_resource(resource);
        }
    }
}

/// A sampled span's identity, as it travels beside a batch between actors and in
/// `traceparent` headers and properties.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
}

impl TraceContext {
    /// A W3C `traceparent` value (`00-<trace id>-<span id>-<flags>`); `None` when it is
    /// malformed or has a zero id. Later versions are read as version 00, as the
    /// specification asks.
    pub fn parse(traceparent: &str) -> Option<Self> {
        let value = traceparent.trim();
        let mut parts = value.splitn(5, '-');
        let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let extra = parts.next();
        let hex =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex(version, 2) || version == "ff" || (version == "00" && extra.is_some()) {
            return None;
        }
        if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace_id).ok()?;
        let span_id = SpanId::from_hex(span_id).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        (trace_id != TraceId::INVALID && span_id != SpanId::INVALID).then_some(Self { trace_id, span_id, flags })
    }

    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{:02x}", self.trace_id, self.span_id, self.flags)
    }

    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// The context of an exported span, if it is sampled (an unsampled trace is not
    /// carried further: its children would not be kept either).
    pub fn of(span: &tracing::Span) -> Option<Self> {
        if span.is_disabled() {
            return None;
        }
        let context = span.context();
        let otel = context.span();
        let span_context = otel.span_context();
        (span_context.is_valid() && span_context.is_sampled()).then(|| Self {
            trace_id: span_context.trace_id(),
            span_id: span_context.span_id(),
            flags: span_context.trace_flags().to_u8(),
        })
    }

    pub fn span_context(&self) -> SpanContext {
        SpanContext::new(self.trace_id, self.span_id, TraceFlags::new(self.flags), true, TraceState::default())
    }
}

/// Make `span` continue the first of `parents` and link the others (at most
/// [`MAX_LINKS`]), then record its trace id in its `trace_id` field (when it declares
/// one), so log lines written inside it name their trace. Call before the span is entered.
pub fn follow(span: &tracing::Span, parents: &[TraceContext]) {
    if let Some((first, others)) = parents.split_first() {
        let _ = span.set_parent(Context::new().with_remote_span_context(first.span_context()));
        for link in others.iter().take(MAX_LINKS) {
            span.add_link(link.span_context());
        }
    }
    if let Some(context) = TraceContext::of(span) {
        span.record("trace_id", tracing::field::display(context.trace_id));
    }
}

/// The span of the windows a traced batch fired (scoring ran as they fired, inside the
/// batch's span), with the first anomalies as span events; its context goes on to the
/// sinks with the results.
pub fn window_fire(
    batch: &tracing::Span,
    partition: u32,
    results: &[crate::messages::WindowResult],
    anomalies: u64,
) -> Option<TraceContext> {
    use opentelemetry::KeyValue;
    let span = tracing::info_span!(
        target: TARGET,
        parent: batch,
        "window.fire",
        partition,
        windows = results.len(),
        anomalies,
    );
    for result in results.iter().filter(|result| result.anomaly).take(16) {
        span.add_event(
            "anomaly",
            vec![
                KeyValue::new("sensor.id", result.sensor_id.to_string()),
                KeyValue::new("event.type", result.event_type.to_string()),
                KeyValue::new("window.start_ms", result.window_start_ms),
                KeyValue::new("score", result.prediction_score),
                KeyValue::new("severity", result.severity.as_str()),
            ],
        );
    }
    TraceContext::of(&span)
}

/// The distinct trace contexts a batch gathered from its inputs (bounded).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parents(SmallVec<[TraceContext; 1]>);

impl Parents {
    pub fn push(&mut self, context: TraceContext) {
        if self.0.len() <= MAX_LINKS && !self.0.contains(&context) {
            self.0.push(context);
        }
    }

    pub fn extend(&mut self, contexts: impl IntoIterator<Item = TraceContext>) {
        for context in contexts {
            self.push(context);
        }
    }

    pub fn as_slice(&self) -> &[TraceContext] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_rejects_malformed_values() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(value).expect("valid");
        assert!(context.sampled());
        assert_eq!(context.traceparent(), value);
        // A later version with more fields is read as 00.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra").is_some());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn parents_are_distinct_and_bounded() {
        let mut parents = Parents::default();
        let context = |n: u64| TraceContext {
            trace_id: TraceId::from(u128::from(n) + 1),
            span_id: SpanId::from(n + 1),
            flags: 1,
        };
        parents.push(context(1));
        parents.push(context(1));
        assert_eq!(parents.as_slice().len(), 1);
        parents.extend((0..500).map(context));
        assert_eq!(parents.as_slice().len(), MAX_LINKS + 1);
    }
}
