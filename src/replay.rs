//! `tidemark replay`: run an NDJSON file of events through the real pipeline (parsing,
//! router, partition actors, windows, scoring; optionally the store sink) as fast as it
//! goes, then fire every open window. Backfills, backtests, and the throughput benchmark.
//!
//! The file is read in blocks cut at line ends; blocks are parsed (and their events
//! hashed to partitions) on parser threads in parallel and handed to the router in file
//! order, so positions — and results — are exactly those of a sequential read. The
//! router bounds the events in flight per partition, so memory does not depend on the
//! file's size.

use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::{Duration, Instant};

use anyhow::Context;
use ractor::{Actor, ActorRef};
use serde::Serialize;

use crate::actors::partition::PartitionContext;
use crate::actors::sinks::Sinks;
use crate::actors::sinks::file::{FileSink, FileSinkArgs, FileSinkCounts};
use crate::actors::sinks::store::{StoreSink, StoreSinkArgs};
use crate::config::Config;
use crate::ingest::{BodyFormat, ParseLimits, Rejection, parse_body};
use crate::messages::{DeadLetter, Event, PartitionMsg, Source, StoreMsg};
use crate::metrics::Metrics;
use crate::router::{LogMode, PartitionRouter};
use crate::routing::partition_for;
use crate::scoring::Scoring;
use crate::store::{self, Store};
use crate::supervision::partition::{PartitionSupervisor, PartitionSupervisorArgs};
use crate::supervision::policy::RestartBudget;

/// Size of a read block; a block ends at its last newline.
const BLOCK_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SinkKind {
    /// Results are counted (and written to `--output`), nothing is stored.
    None,
    /// Results go through the store sink to `store.url`.
    Store,
}

pub struct ReplayOptions {
    pub input: PathBuf,
    pub output: Option<PathBuf>,
    pub dead_letters: Option<PathBuf>,
    pub sink: SinkKind,
    /// Parser threads (default: available cores).
    pub parsers: usize,
}

#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplayReport {
    pub events: u64,
    pub rejected: u64,
    pub late: u64,
    pub windows: u64,
    pub anomalies: u64,
    pub bytes: u64,
    /// From the call to a pipeline ready for input.
    pub startup_ms: f64,
    /// From the first byte read to every result handed to the sink.
    pub wall_seconds: f64,
    pub events_per_second: f64,
    pub partitions: u32,
    pub parsers: usize,
    /// Resident set when all events were processed and before the windows were flushed
    /// (what the open keys hold), and the peak over the run.
    pub rss_before_input_bytes: u64,
    pub rss_after_input_bytes: u64,
    pub peak_rss_bytes: u64,
    pub open_keys: u64,
    /// (RSS after input − RSS before input) / open keys: what one key's state costs.
    pub bytes_per_open_key: f64,
}

struct Block {
    bytes: Vec<u8>,
    /// Line number of the block's first line in the file.
    first_line: u64,
}

struct ParsedBlock {
    groups: Vec<Vec<Event>>,
    rejected: Vec<Rejection>,
    first_line: u64,
}

/// Run the replay. Must be called on a multi-threaded tokio runtime.
pub async fn run(config: Config, options: ReplayOptions) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let partitions = config.pipeline.partitions;
    let metrics = Arc::new(Metrics::new());
    let router = Arc::new(PartitionRouter::new(
        partitions,
        config.pipeline.max_buffered_events,
        LogMode::InFlight,
        Arc::clone(&metrics),
    ));
    let sinks = Arc::new(Sinks::new());
    let counts = Arc::new(FileSinkCounts::default());
    let store: Option<Arc<dyn Store>> = match options.sink {
        SinkKind::Store => Some(store::open(&config.store).await.context("cannot open the store")?),
        SinkKind::None => None,
    };
    let sink: ActorRef<StoreMsg> = match &store {
        Some(store) => {
            let args = StoreSinkArgs {
                store: Arc::clone(store),
                config: config.store.clone(),
                listener: Arc::clone(&router) as Arc<dyn crate::actors::sinks::CheckpointListener>,
                metrics: Arc::clone(&metrics),
                health: Arc::clone(&sinks.store_health),
                live: Arc::clone(sinks.live()),
                chaos: config.chaos.clone(),
            };
            Actor::spawn(None, StoreSink, args).await.map_err(|e| anyhow::anyhow!("store sink: {e}"))?.0
        }
        None => {
            let args = FileSinkArgs {
                output: options.output.clone(),
                dead_letters: options.dead_letters.clone(),
                counts: Arc::clone(&counts),
            };
            Actor::spawn(None, FileSink, args).await.map_err(|e| anyhow::anyhow!("file sink: {e}"))?.0
        }
    };
    sinks.set_store(Some(sink.clone()));
    let rules = Arc::new(crate::rules::RulesHandle::new(crate::rules::Rules::from_config(&config.rules)));
    let context = Arc::new(PartitionContext {
        limits: ParseLimits::from_config(&config),
        raw_source: None,
        partitions,
        windowing: crate::window::Windowing::from_config(&config.pipeline),
        rules: Arc::clone(&rules),
        scoring: Scoring::from_config(&config.scoring),
        // No replay log to release: checkpoints would only cost time.
        checkpoint_interval: Duration::from_secs(24 * 3600),
        checkpoint_max_events: 0,
        metrics: Arc::clone(&metrics),
        sinks: Arc::clone(&sinks),
        chaos: config.chaos.clone(),
        key_limits: crate::actors::partition::KeyLimits::from_config(&config.pipeline),
    });
    let args = PartitionSupervisorArgs {
        context,
        router: Arc::clone(&router),
        store: None,
        owner: crate::runtime::instance_name(),
        // Without a replay log a restart would lose events: fail the replay instead.
        budget: RestartBudget { max_restarts: 0, ..RestartBudget::from_config(&config.supervision) },
        max_event_attempts: u32::MAX,
        feed: Arc::clone(&router) as Arc<dyn crate::supervision::partition::PartitionFeed>,
        assignment: crate::supervision::partition::Assignment::All,
    };
    let (supervisor, supervisor_handle) =
        Actor::spawn(None, PartitionSupervisor, args).await.map_err(|e| anyhow::anyhow!("partitions: {e}"))?;
    let startup = started.elapsed();

    let input =
        std::fs::File::open(&options.input).with_context(|| format!("cannot open {}", options.input.display()))?;
    let limits = ParseLimits::from_config(&config);
    let parsers = options.parsers.max(1);
    let rss_before_input = resident_bytes();
    let feed_router = Arc::clone(&router);
    let feed_sinks = Arc::clone(&sinks);
    let reading = Instant::now();
    let (events, rejected, bytes) =
        tokio::task::spawn_blocking(move || feed(input, parsers, partitions, limits, &feed_router, &feed_sinks))
            .await
            .context("the reader thread failed")??;

    // Wait until every partition processed all its events, measure, then flush.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let done = (0..partitions).all(|p| {
            let status = router.status(p);
            status.processed_position >= status.next_position
        });
        anyhow::ensure!(!supervisor_handle.is_finished(), "a partition failed; see the log");
        if done {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "partitions did not finish within 10 minutes");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let rss_after_input = resident_bytes();
    let mut open_keys = 0;
    let mut late = 0;
    for partition in 0..partitions {
        let actor = router.actor(partition).context("partition actor missing")?;
        let status = actor
            .call(PartitionMsg::Status, Some(Duration::from_secs(60)))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .success_or(())
            .map_err(|_| anyhow::anyhow!("partition {partition} did not answer"))?;
        open_keys += status.open_keys as u64;
        late += status.counters.events_late;
        let flushed = actor.call(PartitionMsg::FlushAll, Some(Duration::from_secs(600))).await;
        anyhow::ensure!(flushed.map(|r| r.is_success()).unwrap_or(false), "partition {partition} did not flush");
    }
    let drained = sink.call(StoreMsg::Flush, Some(Duration::from_secs(600))).await;
    anyhow::ensure!(drained.map(|r| r.is_success()).unwrap_or(false), "the sink did not drain");
    let wall = reading.elapsed();

    let windows = match options.sink {
        SinkKind::None => counts.results.load(Ordering::Relaxed),
        SinkKind::Store => sinks.store_health.rows.load(Ordering::Relaxed),
    };
    supervisor.stop(None);
    sink.stop(None);
    if let Some(store) = store {
        store.close().await;
    }
    Ok(ReplayReport {
        events,
        rejected,
        late,
        windows,
        anomalies: counts.anomalies.load(Ordering::Relaxed),
        bytes,
        startup_ms: startup.as_secs_f64() * 1000.0,
        wall_seconds: wall.as_secs_f64(),
        events_per_second: events as f64 / wall.as_secs_f64().max(1e-9),
        partitions,
        parsers,
        rss_before_input_bytes: rss_before_input,
        rss_after_input_bytes: rss_after_input,
        peak_rss_bytes: peak_resident_bytes(),
        open_keys,
        bytes_per_open_key: rss_after_input.saturating_sub(rss_before_input) as f64 / open_keys.max(1) as f64,
    })
}

/// Read, parse in parallel, and submit in file order. Returns (events, rejected, bytes).
fn feed(
    mut input: std::fs::File,
    parsers: usize,
    partitions: u32,
    limits: ParseLimits,
    router: &PartitionRouter,
    sinks: &Sinks,
) -> anyhow::Result<(u64, u64, u64)> {
    // Block i goes to parser i % n; results are taken back in the same order.
    let mut to_parsers: Vec<SyncSender<Block>> = Vec::with_capacity(parsers);
    let mut from_parsers: Vec<Receiver<ParsedBlock>> = Vec::with_capacity(parsers);
    let mut workers = Vec::with_capacity(parsers);
    for _ in 0..parsers {
        let (block_tx, block_rx) = sync_channel::<Block>(2);
        let (parsed_tx, parsed_rx) = sync_channel::<ParsedBlock>(2);
        to_parsers.push(block_tx);
        from_parsers.push(parsed_rx);
        workers.push(std::thread::spawn(move || {
            for block in block_rx {
                let parsed = parse_block(block, partitions, limits);
                if parsed_tx.send(parsed).is_err() {
                    break;
                }
            }
        }));
    }
    let (events, rejected, bytes) = std::thread::scope(|scope| -> anyhow::Result<(u64, u64, u64)> {
        let reader = scope.spawn(move || -> anyhow::Result<(u64, u64)> {
            let mut carry: Vec<u8> = Vec::new();
            let mut line = 0u64;
            let mut index = 0usize;
            let mut bytes = 0u64;
            loop {
                let mut block = std::mem::take(&mut carry);
                block.reserve(BLOCK_BYTES);
                // `take` + `read_to_end` fills spare capacity without zeroing it first.
                let read =
                    (&mut input).take(BLOCK_BYTES as u64).read_to_end(&mut block).context("cannot read the input")?;
                bytes += read as u64;
                let end = if read == 0 { block.len() } else { memchr::memrchr(b'\n', &block).map_or(0, |i| i + 1) };
                carry = block.split_off(end);
                if !block.is_empty() {
                    let lines = memchr::memchr_iter(b'\n', &block).count() as u64;
                    let first_line = line;
                    line += lines;
                    if to_parsers[index % parsers].send(Block { bytes: block, first_line }).is_err() {
                        break;
                    }
                    index += 1;
                }
                if read == 0 {
                    break;
                }
            }
            drop(to_parsers);
            Ok((index as u64, bytes))
        });
        let mut events = 0u64;
        let mut rejected = 0u64;
        let mut index = 0usize;
        while let Ok(parsed) = from_parsers[index % parsers].recv() {
            index += 1;
            rejected += parsed.rejected.len() as u64;
            if !parsed.rejected.is_empty() {
                dead_letter(sinks, parsed.rejected, parsed.first_line);
            }
            for (partition, group) in parsed.groups.into_iter().enumerate() {
                if group.is_empty() {
                    continue;
                }
                events += group.len() as u64;
                while !router.has_room(partition as u32, group.len()) {
                    std::thread::sleep(Duration::from_micros(100));
                }
                router.submit_to(partition as u32, group);
            }
        }
        let (_, bytes) = reader.join().map_err(|_| anyhow::anyhow!("the reader thread panicked"))??;
        Ok((events, rejected, bytes))
    })?;
    for worker in workers {
        let _ = worker.join();
    }
    Ok((events, rejected, bytes))
}

fn parse_block(block: Block, partitions: u32, limits: ParseLimits) -> ParsedBlock {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let parsed = match parse_body(&block.bytes, BodyFormat::Ndjson, limits, now_ms) {
        Ok(parsed) => parsed,
        Err(error) => {
            // Only invalid UTF-8 fails a whole NDJSON block: report it as one rejection.
            return ParsedBlock {
                groups: Vec::new(),
                rejected: vec![Rejection {
                    index: 0,
                    field: None,
                    reason: crate::messages::RejectReason::Unparsable,
                    message: format!("block of {} bytes: {error}", block.bytes.len()),
                    raw: String::new(),
                    sensor_id: None,
                    event_time_ms: None,
                }],
                first_line: block.first_line,
            };
        }
    };
    let mut groups: Vec<Vec<Event>> = (0..partitions).map(|_| Vec::new()).collect();
    for mut event in parsed.events {
        // A backfill runs on event time: the ingest clock (idle flushing) follows it.
        event.ingest_ms = event.timestamp_ms;
        let partition = if partitions == 1 { 0 } else { partition_for(&event.sensor_id, partitions) as usize };
        groups[partition].push(event);
    }
    ParsedBlock { groups, rejected: parsed.rejected, first_line: block.first_line }
}

fn dead_letter(sinks: &Sinks, rejected: Vec<Rejection>, first_line: u64) {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let letters = rejected
        .into_iter()
        .map(|r| DeadLetter {
            received_at_ms: now_ms,
            source: Source::File,
            reason: r.reason,
            error: format!("line {}: {}", first_line + r.index as u64 + 1, r.message),
            sensor_id: r.sensor_id,
            event_type: None,
            event_time_ms: r.event_time_ms,
            partition: None,
            position: None,
            payload: r.raw,
        })
        .collect();
    let _ = sinks.send_store(StoreMsg::DeadLetters(letters));
}

/// Current resident set size of this process.
pub fn resident_bytes() -> u64 {
    status_kib("VmRSS:") * 1024
}

/// Peak resident set size of this process.
pub fn peak_resident_bytes() -> u64 {
    status_kib("VmHWM:") * 1024
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with(field))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}
