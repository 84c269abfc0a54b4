//! The embedded ingest log: what makes a `202` durable without Kafka.
//!
//! The partitions append their accepted batches (and ingest-clock ticks) as records
//! tagged with the partition to one sequence of segment files in `ingest.log_dir`.
//! Appends go to an in-memory buffer while the partition's lock is held (so each
//! partition's records are in position order); one writer thread takes the buffer,
//! writes it and, with `durability = "fsync"`, calls `fdatasync` once — a group commit:
//! the requests that arrived during one sync share the next. A request is answered
//! once the writer reports its bytes written (and synced).
//!
//! Records are `[length u32][crc32 u32][postcard payload]`; at start-up the log is read
//! back, a torn or corrupt tail is cut off (logged with how much), and the router
//! replays what the partitions' checkpoints do not cover. A segment is deleted once
//! complete checkpoints cover every record in it, of every partition.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use compact_str::CompactString;
use parking_lot::{Condvar, Mutex};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};

use crate::config::Durability;
use crate::messages::{Event, PartitionId, Position};

/// Format of the records; bumped when the payload changes (older versions stay readable).
const FORMAT_VERSION: u8 = 1;
const HEADER: usize = 8;
/// Largest record accepted when reading back (a corrupt length is not an allocation).
const MAX_RECORD: usize = 256 << 20;

/// One entry read back from the log.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovered {
    Events(Vec<Event>),
    Tick { position: Position, now_ms: i64 },
}

/// A record's head; an events record continues with the events (`Vec<EventRef>`).
#[derive(Serialize, Deserialize)]
enum Head {
    Events { partition: PartitionId, first: Position, ingest_ms: i64 },
    Tick { partition: PartitionId, position: Position, now_ms: i64 },
}

#[derive(Serialize)]
struct EventRef<'a> {
    sensor_id: &'a str,
    event_type: &'a str,
    value: f64,
    timestamp_ms: i64,
}

#[derive(Deserialize)]
struct StoredEvent {
    sensor_id: CompactString,
    event_type: CompactString,
    value: f64,
    timestamp_ms: i64,
}

/// A batch's events encoded ahead of the partition's lock (the costly part of an
/// append, done on the request's own thread).
pub struct EncodedEvents {
    bytes: Vec<u8>,
    crc: crc32fast::Hasher,
}

impl EncodedEvents {
    pub fn new(batch: &[Event]) -> Self {
        let events: Vec<EventRef<'_>> = batch
            .iter()
            .map(|e| EventRef {
                sensor_id: &e.sensor_id,
                event_type: &e.event_type,
                value: e.value,
                timestamp_ms: e.timestamp_ms,
            })
            .collect();
        // Serialising these types into a Vec cannot fail; an empty payload decodes as
        // no events if it ever did.
        let bytes = postcard::to_allocvec(&events).unwrap_or_else(|_| vec![0]);
        let mut crc = crc32fast::Hasher::new();
        crc.update(&bytes);
        Self { bytes, crc }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("ingest log {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(
        "ingest log {path} was written with {found} partitions and pipeline.partitions is {expected}: start once \
         with the old count so the log drains into checkpoints, or remove the directory (its unconfirmed events \
         are lost)"
    )]
    Partitions { path: PathBuf, found: u32, expected: u32 },
    #[error("ingest log {path} is in use by another tidemark process (ingest.log_dir must be one per process)")]
    Locked { path: PathBuf },
    #[error("the ingest log cannot be written: {0}")]
    Failed(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io { path: path.to_path_buf(), source }
}

/// Counters the log reports on `/metrics`.
#[derive(Clone, Default)]
pub struct LogMetrics {
    pub syncs: Counter,
    pub bytes: Counter,
}

struct Pending {
    buf: Vec<u8>,
    /// Highest position per partition among the records in `buf`.
    max_positions: Vec<Option<Position>>,
    /// Bytes ever appended (the tickets).
    appended: u64,
    /// `buf` holds events (ticks alone need no sync of their own: the next synced
    /// event record after them makes them durable too).
    events: bool,
}

struct Segment {
    path: PathBuf,
    /// Highest position of each partition in the segment.
    max_positions: Vec<Option<Position>>,
}

/// The writer thread's files.
struct Files {
    dir: PathBuf,
    segments: VecDeque<Segment>,
    current: Option<(File, u64)>,
    next_segment: u64,
    released: Vec<Position>,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Bytes written (and synced, with `fsync`).
    durable: AtomicU64,
    /// Per partition: positions below this are covered by a complete checkpoint.
    release_to: Vec<AtomicU64>,
    durability: Durability,
    segment_bytes: u64,
    work: Mutex<bool>,
    wake: Condvar,
    written: tokio::sync::watch::Sender<u64>,
    failed: Mutex<Option<String>>,
    shutdown: AtomicBool,
    metrics: LogMetrics,
}

pub struct IngestLog {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    dir: PathBuf,
    /// Held for the life of the log: one process per directory.
    _lock: File,
}

impl IngestLog {
    /// Open (or create) the log in `dir` and read back what it holds, per partition.
    pub fn open(
        dir: &Path,
        partitions: u32,
        durability: Durability,
        segment_bytes: u64,
        metrics: LogMetrics,
    ) -> Result<(Self, Vec<Vec<Recovered>>), LogError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let lock_path = dir.join("LOCK");
        let lock =
            OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LogError::Locked { path: dir.to_path_buf() }),
            Err(std::fs::TryLockError::Error(error)) => return Err(io(&lock_path)(error)),
        }
        let meta = dir.join("PARTITIONS");
        let (segments, has_data) = list_segments(dir)?;
        match std::fs::read_to_string(&meta) {
            Ok(text) => {
                let found: u32 = text.trim().parse().unwrap_or(0);
                if found != partitions && has_data {
                    return Err(LogError::Partitions { path: dir.to_path_buf(), found, expected: partitions });
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(io(&meta)(error)),
        }
        std::fs::write(&meta, format!("{partitions}\n")).map_err(io(&meta))?;
        let (recovered, files) = recover(dir, segments, partitions)?;
        let (written, _) = tokio::sync::watch::channel(0);
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                buf: Vec::new(),
                max_positions: vec![None; partitions as usize],
                appended: 0,
                events: false,
            }),
            durable: AtomicU64::new(0),
            release_to: (0..partitions).map(|_| AtomicU64::new(0)).collect(),
            durability,
            segment_bytes: segment_bytes.max(4096),
            work: Mutex::new(false),
            wake: Condvar::new(),
            written,
            failed: Mutex::new(None),
            shutdown: AtomicBool::new(false),
            metrics,
        });
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("ingest-log".into())
            .spawn(move || writer_loop(&writer_shared, files))
            .map_err(io(dir))?;
        Ok((Self { shared, writer: Mutex::new(Some(writer)), dir: dir.to_path_buf(), _lock: lock }, recovered))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append a batch (consecutive positions, one ingest time) whose events were
    /// encoded by [`EncodedEvents::new`]. Call in position order per partition, then
    /// [`Self::commit`]. Returns the ticket to wait for.
    pub fn append_events(&self, partition: PartitionId, batch: &[Event], encoded: &EncodedEvents) -> u64 {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return self.shared.pending.lock().appended;
        };
        let head = Head::Events { partition, first: first.position, ingest_ms: first.ingest_ms };
        self.append(partition, last.position, &head, Some(encoded))
    }

    /// Append an ingest-clock tick at `position` (no one waits for it).
    pub fn append_tick(&self, partition: PartitionId, position: Position, now_ms: i64) {
        self.append(partition, position, &Head::Tick { partition, position, now_ms }, None);
    }

    fn append(&self, partition: PartitionId, last: Position, head: &Head, events: Option<&EncodedEvents>) -> u64 {
        let mut head_bytes = [0u8; 48];
        head_bytes[0] = FORMAT_VERSION;
        let head_len = match postcard::to_slice(head, &mut head_bytes[1..]) {
            Ok(used) => used.len() + 1,
            // A head always fits; if it ever did not, nothing is appended.
            Err(_) => return self.shared.pending.lock().appended,
        };
        let head_bytes = &head_bytes[..head_len];
        let mut crc = crc32fast::Hasher::new();
        crc.update(head_bytes);
        let payload_len = head_len + events.map_or(0, |e| e.bytes.len());
        if let Some(events) = events {
            crc.combine(&events.crc);
        }
        let crc = crc.finalize();
        let mut pending = self.shared.pending.lock();
        pending.buf.reserve(HEADER + payload_len);
        pending.buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
        pending.buf.extend_from_slice(&crc.to_le_bytes());
        pending.buf.extend_from_slice(head_bytes);
        if let Some(events) = events {
            pending.buf.extend_from_slice(&events.bytes);
        }
        let max = &mut pending.max_positions[partition as usize];
        *max = Some(max.map_or(last, |m| m.max(last)));
        pending.appended += (HEADER + payload_len) as u64;
        pending.events |= events.is_some();
        pending.appended
    }

    /// Start writing what was appended (call once after the appends of one request, so
    /// they share one write and sync). Ticks alone are written with the next round, at
    /// the latest a second later.
    pub fn commit(&self) {
        let mut work = self.shared.work.lock();
        *work = true;
        self.shared.wake.notify_one();
    }

    /// Wait until everything up to `ticket` is written (and synced with `fsync`).
    pub async fn wait(&self, ticket: u64) -> Result<(), LogError> {
        let mut written = self.shared.written.subscribe();
        loop {
            if let Some(reason) = self.shared.failed.lock().clone() {
                return Err(LogError::Failed(reason));
            }
            if self.shared.durable.load(Ordering::Acquire) >= ticket {
                return Ok(());
            }
            if written.changed().await.is_err() {
                return Err(LogError::Failed("the ingest log writer stopped".into()));
            }
        }
    }

    /// A complete checkpoint covers positions below `next_position`.
    pub fn release(&self, partition: PartitionId, next_position: Position) {
        self.shared.release_to[partition as usize].fetch_max(next_position, Ordering::AcqRel);
    }

    /// Why the log cannot be written, if it cannot.
    pub fn failure(&self) -> Option<String> {
        self.shared.failed.lock().clone()
    }

    /// Write what is pending and stop the writer.
    pub fn close(&self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let mut work = self.shared.work.lock();
            *work = true;
            self.shared.wake.notify_one();
        }
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for IngestLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}.log"))
}

/// The segment files in order, and whether any holds data.
fn list_segments(dir: &Path) -> Result<(Vec<(u64, PathBuf)>, bool), LogError> {
    let mut segments: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let number = path.file_name()?.to_str()?.strip_suffix(".log")?.parse().ok()?;
            Some((number, path))
        })
        .collect();
    segments.sort();
    let has_data = segments.iter().any(|(_, path)| std::fs::metadata(path).map(|m| m.len() > 0).unwrap_or(true));
    Ok((segments, has_data))
}

/// Read the segments back, per partition; cut a torn or corrupt tail.
fn recover(
    dir: &Path,
    segments: Vec<(u64, PathBuf)>,
    partitions: u32,
) -> Result<(Vec<Vec<Recovered>>, Files), LogError> {
    let mut entries: Vec<Vec<Recovered>> = (0..partitions).map(|_| Vec::new()).collect();
    let mut kept = VecDeque::new();
    let mut current = None;
    let mut corrupt = false;
    let count = segments.len();
    let mut next_segment = 0;
    for (index, (number, path)) in segments.into_iter().enumerate() {
        next_segment = number + 1;
        if corrupt {
            tracing::error!(path = %path.display(), "removing an ingest log segment after a corrupt one");
            std::fs::remove_file(&path).map_err(io(&path))?;
            continue;
        }
        let mut data = Vec::new();
        File::open(&path).and_then(|mut f| f.read_to_end(&mut data)).map_err(io(&path))?;
        let mut max_positions = vec![None; partitions as usize];
        let (good, read) = read_records(&data, &mut entries, &mut max_positions);
        if good < data.len() {
            if index + 1 == count {
                tracing::warn!(
                    path = %path.display(),
                    cut_bytes = data.len() - good,
                    records = read,
                    "the ingest log ends in a torn record (a crash mid-write); cutting it off"
                );
            } else {
                tracing::error!(
                    path = %path.display(),
                    offset = good,
                    "corrupt record in the ingest log; keeping what precedes it"
                );
                corrupt = true;
            }
            let file = OpenOptions::new().write(true).open(&path).map_err(io(&path))?;
            file.set_len(good as u64).map_err(io(&path))?;
            file.sync_all().map_err(io(&path))?;
        }
        if index + 1 == count || corrupt {
            let file = OpenOptions::new().append(true).open(&path).map_err(io(&path))?;
            current = Some((file, good as u64));
        }
        kept.push_back(Segment { path, max_positions });
    }
    let files =
        Files { dir: dir.to_path_buf(), segments: kept, current, next_segment, released: vec![0; partitions as usize] };
    Ok((entries, files))
}

/// Decode records from `data`; returns the length of the valid prefix and the count.
fn read_records(data: &[u8], out: &mut [Vec<Recovered>], max_positions: &mut [Option<Position>]) -> (usize, usize) {
    let mut offset = 0;
    let mut count = 0;
    while data.len() - offset >= HEADER {
        let len = u32::from_le_bytes([data[offset], data[offset + 1], data[offset + 2], data[offset + 3]]) as usize;
        let crc = u32::from_le_bytes([data[offset + 4], data[offset + 5], data[offset + 6], data[offset + 7]]);
        if len == 0 || len > MAX_RECORD || data.len() - offset - HEADER < len {
            break;
        }
        let payload = &data[offset + HEADER..offset + HEADER + len];
        if crc32fast::hash(payload) != crc || payload[0] != FORMAT_VERSION {
            break;
        }
        let (partition, last, entry) = match postcard::take_from_bytes::<Head>(&payload[1..]) {
            Ok((Head::Events { partition, first, ingest_ms }, rest)) => {
                let Ok(events) = postcard::from_bytes::<Vec<StoredEvent>>(rest) else { break };
                let last = first + events.len().saturating_sub(1) as u64;
                let events = events
                    .into_iter()
                    .enumerate()
                    .map(|(i, e)| Event {
                        sensor_id: e.sensor_id,
                        event_type: e.event_type,
                        value: e.value,
                        timestamp_ms: e.timestamp_ms,
                        ingest_ms,
                        position: first + i as u64,
                    })
                    .collect();
                (partition, last, Recovered::Events(events))
            }
            Ok((Head::Tick { partition, position, now_ms }, _)) => {
                (partition, position, Recovered::Tick { position, now_ms })
            }
            Err(_) => break,
        };
        let Some(slot) = out.get_mut(partition as usize) else { break };
        slot.push(entry);
        let max = &mut max_positions[partition as usize];
        *max = Some(max.map_or(last, |m| m.max(last)));
        offset += HEADER + len;
        count += 1;
    }
    (offset, count)
}

fn writer_loop(shared: &Shared, mut files: Files) {
    let mut buf = Vec::new();
    let mut max_positions = Vec::new();
    loop {
        {
            let mut work = shared.work.lock();
            if !*work && !shared.shutdown.load(Ordering::Acquire) {
                shared.wake.wait_for(&mut work, Duration::from_secs(1));
            }
            *work = false;
        }
        let (sync, appended) = {
            let mut pending = shared.pending.lock();
            // Swap buffers: the next appends reuse last round's allocation.
            std::mem::swap(&mut buf, &mut pending.buf);
            max_positions.clear();
            max_positions.extend(pending.max_positions.iter_mut().map(Option::take));
            (std::mem::take(&mut pending.events), pending.appended)
        };
        if !buf.is_empty() && shared.failed.lock().is_none() {
            match write_round(shared, &mut files, &buf, &max_positions, sync) {
                Ok(()) => {
                    shared.durable.fetch_max(appended, Ordering::AcqRel);
                }
                Err(error) => {
                    tracing::error!(%error, "the ingest log cannot be written; refusing ingestion");
                    *shared.failed.lock() = Some(error.to_string());
                }
            }
            shared.written.send_modify(|round| *round += 1);
        }
        buf.clear();
        let mut released = false;
        for (release_to, done) in shared.release_to.iter().zip(files.released.iter_mut()) {
            let release_to = release_to.load(Ordering::Acquire);
            if release_to > *done {
                *done = release_to;
                released = true;
            }
        }
        if released {
            delete_covered(&mut files);
        }
        if shared.shutdown.load(Ordering::Acquire) && shared.pending.lock().buf.is_empty() {
            return;
        }
    }
}

fn write_round(
    shared: &Shared,
    files: &mut Files,
    buf: &[u8],
    max_positions: &[Option<Position>],
    sync: bool,
) -> Result<(), LogError> {
    let rotate = match &files.current {
        None => true,
        Some((_, size)) => *size >= shared.segment_bytes,
    };
    if rotate {
        let path = segment_path(&files.dir, files.next_segment);
        files.next_segment += 1;
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
        if shared.durability == Durability::Fsync {
            // The new file's directory entry must survive a crash too.
            File::open(&files.dir).and_then(|d| d.sync_all()).map_err(io(&files.dir))?;
        }
        files.segments.push_back(Segment { path, max_positions: vec![None; max_positions.len()] });
        files.current = Some((file, 0));
    }
    let (Some((file, size)), Some(segment)) = (files.current.as_mut(), files.segments.back_mut()) else {
        return Err(LogError::Failed("no open segment".into()));
    };
    file.write_all(buf).map_err(io(&files.dir))?;
    *size += buf.len() as u64;
    for (max, new) in segment.max_positions.iter_mut().zip(max_positions) {
        if let Some(new) = *new {
            *max = Some(max.map_or(new, |m| m.max(new)));
        }
    }
    shared.metrics.bytes.inc_by(buf.len() as u64);
    if sync && shared.durability == Durability::Fsync {
        file.sync_data().map_err(io(&files.dir))?;
        shared.metrics.syncs.inc();
    }
    Ok(())
}

/// Delete the closed segments every record of which a checkpoint covers.
fn delete_covered(files: &mut Files) {
    while files.segments.len() > 1 {
        let covered = files.segments[0]
            .max_positions
            .iter()
            .zip(&files.released)
            .all(|(max, released)| max.is_none_or(|max| max < *released));
        if !covered {
            break;
        }
        if let Some(segment) = files.segments.pop_front()
            && let Err(error) = std::fs::remove_file(&segment.path)
        {
            tracing::warn!(path = %segment.path.display(), %error, "cannot delete a checkpointed ingest log segment");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(sensor: &str, position: Position, ingest_ms: i64) -> Event {
        Event {
            sensor_id: sensor.into(),
            event_type: "temperature".into(),
            value: position as f64 * 0.5,
            timestamp_ms: 1_700_000_000_000 + position as i64,
            ingest_ms,
            position,
        }
    }

    fn open(dir: &Path, segment_bytes: u64) -> (IngestLog, Vec<Vec<Recovered>>) {
        match IngestLog::open(dir, 2, Durability::Fsync, segment_bytes, LogMetrics::default()) {
            Ok(opened) => opened,
            Err(error) => panic!("{error}"),
        }
    }

    #[tokio::test]
    async fn what_was_acknowledged_reads_back_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let batch: Vec<Event> = (0..100).map(|p| event("s-1", p, 42)).collect();
        {
            let (log, recovered) = open(dir.path(), 1 << 20);
            assert!(recovered.iter().all(Vec::is_empty));
            let ticket = log.append_events(1, &batch[..60], &EncodedEvents::new(&batch[..60]));
            log.commit();
            log.append_tick(1, 60, 99);
            let ticket2 = log.append_events(1, &batch[60..], &EncodedEvents::new(&batch[60..]));
            log.commit();
            log.wait(ticket.max(ticket2)).await.expect("durable");
        }
        let (_log, recovered) = open(dir.path(), 1 << 20);
        assert!(recovered[0].is_empty());
        assert_eq!(
            recovered[1],
            vec![
                Recovered::Events(batch[..60].to_vec()),
                Recovered::Tick { position: 60, now_ms: 99 },
                Recovered::Events(batch[60..].to_vec())
            ]
        );
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().expect("dir");
        let batch: Vec<Event> = (0..10).map(|p| event("s-2", p, 1)).collect();
        {
            let (log, _) = open(dir.path(), 1 << 20);
            let ticket = log.append_events(0, &batch[..5], &EncodedEvents::new(&batch[..5]));
            log.commit();
            log.wait(ticket).await.expect("durable");
            let ticket = log.append_events(0, &batch[5..], &EncodedEvents::new(&batch[5..]));
            log.commit();
            log.wait(ticket).await.expect("durable");
        }
        let segment = segment_path(dir.path(), 0);
        let length = std::fs::metadata(&segment).expect("segment").len();
        // A crash in the middle of the second record.
        OpenOptions::new().write(true).open(&segment).expect("open").set_len(length - 7).expect("truncate");
        {
            let (log, recovered) = open(dir.path(), 1 << 20);
            assert_eq!(recovered[0], vec![Recovered::Events(batch[..5].to_vec())]);
            let ticket = log.append_events(0, &batch[5..], &EncodedEvents::new(&batch[5..]));
            log.commit();
            log.wait(ticket).await.expect("durable");
        }
        let (_log, recovered) = open(dir.path(), 1 << 20);
        assert_eq!(recovered[0], vec![Recovered::Events(batch[..5].to_vec()), Recovered::Events(batch[5..].to_vec())]);
    }

    #[tokio::test]
    async fn covered_segments_are_deleted_and_one_process_owns_the_directory() {
        let dir = tempfile::tempdir().expect("dir");
        let (log, _) = open(dir.path(), 4096);
        let mut position = 0;
        for _ in 0..50 {
            let batch: Vec<Event> = (position..position + 20).map(|p| event("s-3", p, 1)).collect();
            position += 20;
            let ticket = log.append_events(0, &batch, &EncodedEvents::new(&batch));
            log.commit();
            log.wait(ticket).await.expect("durable");
        }
        let segments = || {
            std::fs::read_dir(dir.path())
                .expect("dir")
                .filter(|e| e.as_ref().is_ok_and(|e| e.path().extension().is_some_and(|x| x == "log")))
                .count()
        };
        let before = segments();
        assert!(before > 3, "rotated into {before} segments");
        assert!(matches!(
            IngestLog::open(dir.path(), 2, Durability::Fsync, 4096, LogMetrics::default()),
            Err(LogError::Locked { .. })
        ));
        log.release(0, position);
        // Partition 1 has no records: it holds nothing back.
        let last = [event("s-3", position, 1)];
        let ticket = log.append_events(0, &last, &EncodedEvents::new(&last));
        log.commit();
        log.wait(ticket).await.expect("durable");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while segments() > 1 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(segments(), 1, "every segment below the checkpoint is gone");
        drop(log);
        assert!(matches!(
            IngestLog::open(dir.path(), 3, Durability::Fsync, 4096, LogMetrics::default()),
            Err(LogError::Partitions { found: 2, expected: 3, .. })
        ));
    }

    #[tokio::test]
    async fn a_segment_stays_while_any_partition_still_needs_it() {
        let dir = tempfile::tempdir().expect("dir");
        let (log, _) = open(dir.path(), 4096);
        let early = [event("s-4", 0, 1)];
        let ticket = log.append_events(1, &early, &EncodedEvents::new(&early));
        log.commit();
        log.wait(ticket).await.expect("durable");
        let mut position = 0;
        for _ in 0..30 {
            let batch: Vec<Event> = (position..position + 20).map(|p| event("s-5", p, 1)).collect();
            position += 20;
            let ticket = log.append_events(0, &batch, &EncodedEvents::new(&batch));
            log.commit();
            log.wait(ticket).await.expect("durable");
        }
        log.release(0, position);
        let last = [event("s-5", position, 1)];
        let ticket = log.append_events(0, &last, &EncodedEvents::new(&last));
        log.commit();
        log.wait(ticket).await.expect("durable");
        std::thread::sleep(Duration::from_millis(200));
        drop(log);
        // Partition 1's event (in the first segment) is not checkpointed: it survives.
        let (_log, recovered) = open(dir.path(), 4096);
        assert_eq!(recovered[1], vec![Recovered::Events(early.to_vec())]);
    }
}
