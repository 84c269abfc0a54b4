//! Event-time windows with per-key watermarks, allowed lateness and idle flushing:
//! tumbling (this file), [`hopping`] and [`session`], chosen per event type.
//!
//! Pure logic, no I/O: the partition actor calls it and the benches measure it alone.
//!
//! Tumbling semantics (documented in `docs/architecture.md`; the other kinds follow the
//! same watermark, lateness and idle rules):
//! - windows are `[start, start + size)`, aligned to the epoch;
//! - a key's watermark is the largest event time it has seen minus the out-of-orderness;
//! - a window fires (revision 0) once the watermark reaches its end;
//! - until the watermark reaches `end + allowed_lateness`, a late event updates the
//!   window and fires it again with the next revision; after that the window is purged
//!   and events for it are *late* (counted and dead-lettered by the caller);
//! - a key idle for `idle_timeout` (ingestion time) fires its open windows and closes
//!   them, so sensors that stop reporting still produce their last results.

mod agg;
pub mod hopping;
pub mod session;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

pub use agg::Agg;
pub use hopping::HoppingWindows;
pub use session::SessionWindows;

use crate::config::{PipelineConfig, millis};

/// What kind of window an event type uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    Tumbling,
    Hopping,
    Session,
}

impl WindowKind {
    pub const ALL: [WindowKind; 3] = [Self::Tumbling, Self::Hopping, Self::Session];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tumbling => "tumbling",
            Self::Hopping => "hopping",
            Self::Session => "session",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// Window and watermark settings in milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub kind: WindowKind,
    /// Tumbling and hopping: the window size. Session: the gap.
    pub size_ms: i64,
    /// Hopping: the distance between window starts. Others: the size.
    pub slide_ms: i64,
    pub out_of_orderness_ms: i64,
    pub allowed_lateness_ms: i64,
    pub idle_timeout_ms: i64,
}

impl WindowSpec {
    /// The default tumbling windows of `pipeline.window`.
    pub fn from_config(pipeline: &PipelineConfig) -> Self {
        let size_ms = millis(pipeline.window).max(1);
        Self {
            kind: WindowKind::Tumbling,
            size_ms,
            slide_ms: size_ms,
            out_of_orderness_ms: millis(pipeline.max_out_of_orderness),
            allowed_lateness_ms: millis(pipeline.allowed_lateness),
            idle_timeout_ms: millis(pipeline.idle_timeout).max(1),
        }
    }

    /// Tumbling windows of `size_ms` with the other settings of `self`.
    pub const fn tumbling(self, size_ms: i64) -> Self {
        Self { kind: WindowKind::Tumbling, size_ms, slide_ms: size_ms, ..self }
    }

    /// Hopping windows of `size_ms` every `slide_ms` with the other settings of `self`.
    pub const fn hopping(self, size_ms: i64, slide_ms: i64) -> Self {
        Self { kind: WindowKind::Hopping, size_ms, slide_ms, ..self }
    }

    /// Session windows closed by a gap of `gap_ms` with the other settings of `self`.
    pub const fn session(self, gap_ms: i64) -> Self {
        Self { kind: WindowKind::Session, size_ms: gap_ms, slide_ms: gap_ms, ..self }
    }

    /// Hopping: the pane the windows share, `gcd(size, slide)`.
    pub fn pane_ms(&self) -> i64 {
        let (mut a, mut b) = (self.size_ms, self.slide_ms);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a.max(1)
    }

    /// Start of the window holding `timestamp_ms`.
    #[inline]
    pub fn start_of(&self, timestamp_ms: i64) -> i64 {
        timestamp_ms - timestamp_ms.rem_euclid(self.size_ms)
    }
}

/// Running aggregate of one window (48 bytes: a partition may hold millions).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowAcc {
    pub start_ms: i64,
    /// Sum of values, in arrival order: the average is `sum / count`, exactly what a
    /// straightforward reference computation gives.
    pub sum: f64,
    /// Sum of squared deviations from the running mean (Welford), for the stddev.
    pub m2: f64,
    pub min: f64,
    pub max: f64,
    pub count: u32,
    /// Late updates so far (saturates at 65,535).
    pub revision: u16,
    pub fired: bool,
}

impl WindowAcc {
    fn new(start_ms: i64) -> Self {
        Self {
            start_ms,
            sum: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            count: 0,
            revision: 0,
            fired: false,
        }
    }

    #[inline]
    fn add(&mut self, value: f64) {
        let previous_mean = if self.count == 0 { 0.0 } else { self.sum / f64::from(self.count) };
        self.count = self.count.saturating_add(1);
        self.sum += value;
        let mean = self.sum / f64::from(self.count);
        self.m2 += (value - previous_mean) * (value - mean);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
    }

    pub fn features(&self, spec: &WindowSpec) -> WindowFeatures {
        let count = f64::from(self.count.max(1));
        WindowFeatures {
            start_ms: self.start_ms,
            end_ms: self.start_ms + spec.size_ms,
            count: u64::from(self.count),
            mean: self.sum / count,
            min: self.min,
            max: self.max,
            stddev: (self.m2 / count).max(0.0).sqrt(),
        }
    }
}

/// What a fired window hands to scoring and the sinks.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WindowFeatures {
    pub start_ms: i64,
    pub end_ms: i64,
    pub count: u64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    /// Population standard deviation of the window's values.
    pub stddev: f64,
}

/// A window that fired: first time (revision 0) or updated by a late event.
#[derive(Clone, Debug, PartialEq)]
pub struct Fired {
    pub features: WindowFeatures,
    pub revision: u32,
    /// Session windows: starts of earlier results this one replaces (sessions merged
    /// into it). Empty otherwise.
    pub supersedes: Vec<i64>,
}

impl Fired {
    pub fn is_update(&self) -> bool {
        self.revision > 0
    }
}

/// An event that arrived after its window closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Late {
    pub window_start_ms: i64,
    pub watermark_ms: i64,
}

/// Sentinel for "no event seen yet".
const NO_EVENT: i64 = i64::MIN;

/// Window state of one key `(sensorId, eventType)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyWindows {
    max_event_ms: i64,
    last_ingest_ms: i64,
    /// Windows starting before this were closed by an idle flush.
    closed_before_ms: i64,
    /// Open windows (fired ones are kept until `end + allowed_lateness`), by start. One
    /// inline: a second one is open only during the out-of-orderness after a boundary.
    windows: SmallVec<[WindowAcc; 1]>,
}

impl Default for KeyWindows {
    fn default() -> Self {
        Self { max_event_ms: NO_EVENT, last_ingest_ms: NO_EVENT, closed_before_ms: NO_EVENT, windows: SmallVec::new() }
    }
}

impl KeyWindows {
    pub fn watermark(&self, spec: &WindowSpec) -> Option<i64> {
        (self.max_event_ms != NO_EVENT).then(|| self.max_event_ms.saturating_sub(spec.out_of_orderness_ms))
    }

    pub fn open_windows(&self) -> usize {
        self.windows.len()
    }

    pub fn last_ingest_ms(&self) -> i64 {
        self.last_ingest_ms
    }

    /// Where the windows stand, for a key that leaves memory: its maximum event time and
    /// the start before which windows are closed.
    pub fn horizon(&self) -> (i64, i64) {
        (self.max_event_ms, self.closed_before_ms)
    }

    /// A key coming back: no window open, closed ones still closed.
    pub fn resumed(max_event_ms: i64, closed_before_ms: i64) -> Self {
        Self { max_event_ms, closed_before_ms, ..Self::default() }
    }

    /// Add one event; windows that fire because of it are appended to `fired` in order.
    pub fn add(
        &mut self,
        spec: &WindowSpec,
        timestamp_ms: i64,
        value: f64,
        ingest_ms: i64,
        fired: &mut Vec<Fired>,
    ) -> Result<(), Late> {
        let start_ms = spec.start_of(timestamp_ms);
        let watermark = self.watermark(spec);
        if let Some(watermark_ms) = watermark
            && start_ms + spec.size_ms + spec.allowed_lateness_ms <= watermark_ms
        {
            return Err(Late { window_start_ms: start_ms, watermark_ms });
        }
        if start_ms < self.closed_before_ms {
            return Err(Late { window_start_ms: start_ms, watermark_ms: watermark.unwrap_or(self.closed_before_ms) });
        }
        self.last_ingest_ms = self.last_ingest_ms.max(ingest_ms);

        let index = match self.windows.binary_search_by_key(&start_ms, |acc| acc.start_ms) {
            Ok(index) => index,
            Err(index) => {
                self.windows.insert(index, WindowAcc::new(start_ms));
                index
            }
        };
        let acc = &mut self.windows[index];
        acc.add(value);
        if acc.fired {
            // Late but within the allowed lateness: fire the updated window again.
            acc.revision = acc.revision.saturating_add(1);
            fired.push(Fired {
                features: acc.features(spec),
                revision: u32::from(acc.revision),
                supersedes: Vec::new(),
            });
        }

        if timestamp_ms > self.max_event_ms {
            self.max_event_ms = timestamp_ms;
            self.advance(spec, fired);
        }
        Ok(())
    }

    /// Fire windows the watermark has passed; purge those past their lateness.
    fn advance(&mut self, spec: &WindowSpec, fired: &mut Vec<Fired>) {
        let Some(watermark_ms) = self.watermark(spec) else {
            return;
        };
        for acc in self.windows.iter_mut() {
            let end_ms = acc.start_ms + spec.size_ms;
            if end_ms > watermark_ms {
                break; // sorted by start: later windows are not due either
            }
            if !acc.fired {
                acc.fired = true;
                fired.push(Fired {
                    features: acc.features(spec),
                    revision: u32::from(acc.revision),
                    supersedes: Vec::new(),
                });
            }
        }
        self.windows.retain(|acc| acc.start_ms + spec.size_ms + spec.allowed_lateness_ms > watermark_ms);
    }

    /// Whether the key has seen no events for the idle timeout at ingest clock `clock_ms`.
    pub fn is_idle(&self, spec: &WindowSpec, clock_ms: i64) -> bool {
        !self.windows.is_empty()
            && self.last_ingest_ms != NO_EVENT
            && clock_ms.saturating_sub(self.last_ingest_ms) >= spec.idle_timeout_ms
    }

    /// Fire every window that has not fired and close them all (idle key, end of input).
    /// Later events for these windows are late.
    pub fn flush(&mut self, spec: &WindowSpec, fired: &mut Vec<Fired>) {
        for acc in self.windows.iter_mut() {
            if !acc.fired {
                acc.fired = true;
                fired.push(Fired {
                    features: acc.features(spec),
                    revision: u32::from(acc.revision),
                    supersedes: Vec::new(),
                });
            }
        }
        if let Some(last) = self.windows.last() {
            self.closed_before_ms = self.closed_before_ms.max(last.start_ms + spec.size_ms);
        }
        self.windows.clear();
        self.windows.shrink_to_fit();
    }
}

/// The windows of every event type: `[pipeline.event_types.<type>]` or the default.
#[derive(Clone, Debug, PartialEq)]
pub struct Windowing {
    pub default: WindowSpec,
    pub by_event_type: BTreeMap<String, WindowSpec>,
}

impl Windowing {
    /// From a validated configuration.
    pub fn from_config(pipeline: &PipelineConfig) -> Self {
        let default = WindowSpec::from_config(pipeline);
        let by_event_type = pipeline
            .event_types
            .iter()
            .map(|(event_type, windows)| {
                let size = windows.size.map_or(default.size_ms, |size| millis(size).max(1));
                let spec = match windows.window {
                    WindowKind::Tumbling => default.tumbling(size),
                    WindowKind::Hopping => {
                        default.hopping(size, windows.slide.map_or(size, |slide| millis(slide).max(1)))
                    }
                    WindowKind::Session => default.session(windows.gap.map_or(size, |gap| millis(gap).max(1))),
                };
                (event_type.clone(), spec)
            })
            .collect();
        Self { default, by_event_type }
    }

    /// Every event type on the default windows.
    pub fn uniform(default: WindowSpec) -> Self {
        Self { default, by_event_type: BTreeMap::new() }
    }

    #[inline]
    pub fn spec(&self, event_type: &str) -> &WindowSpec {
        if self.by_event_type.is_empty() {
            return &self.default;
        }
        self.by_event_type.get(event_type).unwrap_or(&self.default)
    }
}

/// The window state of one key, of its event type's kind.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Windows {
    Tumbling(KeyWindows),
    Hopping(HoppingWindows),
    Session(Box<SessionWindows>),
}

impl Windows {
    /// Empty state for `spec`, resuming at a tombstone's horizon when there is one.
    pub fn new(spec: &WindowSpec, horizon: Option<(i64, i64)>) -> Self {
        let (max_event_ms, closed_before_ms) = horizon.unwrap_or((NO_EVENT, NO_EVENT));
        match spec.kind {
            WindowKind::Tumbling => Self::Tumbling(KeyWindows::resumed(max_event_ms, closed_before_ms)),
            WindowKind::Hopping => Self::Hopping(HoppingWindows::resumed(max_event_ms, closed_before_ms)),
            WindowKind::Session => Self::Session(Box::new(SessionWindows::resumed(max_event_ms, closed_before_ms))),
        }
    }

    pub fn kind(&self) -> WindowKind {
        match self {
            Self::Tumbling(_) => WindowKind::Tumbling,
            Self::Hopping(_) => WindowKind::Hopping,
            Self::Session(_) => WindowKind::Session,
        }
    }

    #[inline]
    pub fn add(
        &mut self,
        spec: &WindowSpec,
        timestamp_ms: i64,
        value: f64,
        ingest_ms: i64,
        fired: &mut Vec<Fired>,
    ) -> Result<(), Late> {
        match self {
            Self::Tumbling(windows) => windows.add(spec, timestamp_ms, value, ingest_ms, fired),
            Self::Hopping(windows) => windows.add(spec, timestamp_ms, value, ingest_ms, fired),
            Self::Session(windows) => windows.add(spec, timestamp_ms, value, ingest_ms, fired),
        }
    }

    pub fn is_idle(&self, spec: &WindowSpec, clock_ms: i64) -> bool {
        match self {
            Self::Tumbling(windows) => windows.is_idle(spec, clock_ms),
            Self::Hopping(windows) => windows.is_idle(spec, clock_ms),
            Self::Session(windows) => windows.is_idle(spec, clock_ms),
        }
    }

    pub fn flush(&mut self, spec: &WindowSpec, fired: &mut Vec<Fired>) {
        match self {
            Self::Tumbling(windows) => windows.flush(spec, fired),
            Self::Hopping(windows) => windows.flush(spec, fired),
            Self::Session(windows) => windows.flush(spec, fired),
        }
    }

    /// Open windows (hopping: the panes they share).
    pub fn open_windows(&self) -> usize {
        match self {
            Self::Tumbling(windows) => windows.open_windows(),
            Self::Hopping(windows) => windows.open_windows(),
            Self::Session(windows) => windows.open_windows(),
        }
    }

    pub fn last_ingest_ms(&self) -> i64 {
        match self {
            Self::Tumbling(windows) => windows.last_ingest_ms(),
            Self::Hopping(windows) => windows.last_ingest_ms(),
            Self::Session(windows) => windows.last_ingest_ms(),
        }
    }

    pub fn horizon(&self) -> (i64, i64) {
        match self {
            Self::Tumbling(windows) => windows.horizon(),
            Self::Hopping(windows) => windows.horizon(),
            Self::Session(windows) => windows.horizon(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: WindowSpec = WindowSpec {
        kind: WindowKind::Tumbling,
        size_ms: 30_000,
        slide_ms: 30_000,
        out_of_orderness_ms: 5_000,
        allowed_lateness_ms: 0,
        idle_timeout_ms: 60_000,
    };

    fn feed(key: &mut KeyWindows, spec: &WindowSpec, events: &[(i64, f64)]) -> (Vec<Fired>, Vec<Late>) {
        let mut fired = Vec::new();
        let mut late = Vec::new();
        for &(ts, value) in events {
            if let Err(l) = key.add(spec, ts, value, 0, &mut fired) {
                late.push(l);
            }
        }
        (fired, late)
    }

    #[test]
    fn state_stays_small() {
        assert_eq!(std::mem::size_of::<WindowAcc>(), 48);
        assert!(std::mem::size_of::<KeyWindows>() <= 80, "{}", std::mem::size_of::<KeyWindows>());
        // A hopping key's hot state is inline, within a tumbling key's size.
        assert!(std::mem::size_of::<HoppingWindows>() <= std::mem::size_of::<KeyWindows>());
        assert_eq!(std::mem::size_of::<Windows>(), std::mem::size_of::<KeyWindows>() + 8);
    }

    #[test]
    fn windows_align_to_the_epoch() {
        assert_eq!(SPEC.start_of(0), 0);
        assert_eq!(SPEC.start_of(29_999), 0);
        assert_eq!(SPEC.start_of(30_000), 30_000);
        assert_eq!(SPEC.start_of(-1), -30_000);
    }

    #[test]
    fn fires_when_watermark_reaches_the_end() {
        let mut key = KeyWindows::default();
        let (fired, _) = feed(&mut key, &SPEC, &[(1_000, 1.0), (10_000, 3.0), (34_999, 7.0)]);
        assert!(fired.is_empty(), "watermark 29_999 < end 30_000");
        let (fired, _) = feed(&mut key, &SPEC, &[(35_000, 9.0)]);
        assert_eq!(fired.len(), 1);
        let f = fired[0].features;
        assert_eq!((f.start_ms, f.end_ms, f.count), (0, 30_000, 2));
        assert_eq!((f.mean, f.min, f.max), (2.0, 1.0, 3.0));
        assert_eq!(f.stddev, 1.0);
        assert_eq!(fired[0].revision, 0);
    }

    #[test]
    fn out_of_order_within_bound_is_counted_later_is_late() {
        let mut key = KeyWindows::default();
        // 31s moves the watermark to 26s; 20s is out of order but its window is open.
        let (fired, late) = feed(&mut key, &SPEC, &[(31_000, 1.0), (20_000, 2.0), (40_000, 1.0)]);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].features.count, 1);
        assert_eq!(fired[0].features.mean, 2.0);
        assert!(late.is_empty());
        // Watermark is now 35s: the [0, 30s) window is closed.
        let (_, late) = feed(&mut key, &SPEC, &[(29_000, 5.0)]);
        assert_eq!(late, vec![Late { window_start_ms: 0, watermark_ms: 35_000 }]);
    }

    #[test]
    fn allowed_lateness_refires_with_a_higher_revision() {
        let spec = WindowSpec { allowed_lateness_ms: 10_000, ..SPEC };
        let mut key = KeyWindows::default();
        let (fired, _) = feed(&mut key, &spec, &[(1_000, 1.0), (36_000, 1.0)]);
        assert_eq!(fired.len(), 1);
        let (fired, late) = feed(&mut key, &spec, &[(2_000, 3.0)]);
        assert!(late.is_empty());
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].revision, 1);
        assert_eq!(fired[0].features.count, 2);
        // Watermark 40s = end 30s + lateness 10s: closed.
        let (_, late) = feed(&mut key, &spec, &[(45_000, 1.0), (3_000, 1.0)]);
        assert_eq!(late.len(), 1);
    }

    #[test]
    fn idle_flush_fires_and_closes() {
        let mut key = KeyWindows::default();
        let mut fired = Vec::new();
        key.add(&SPEC, 1_000, 4.0, 100, &mut fired).unwrap();
        assert!(!key.is_idle(&SPEC, 100 + 59_999));
        assert!(key.is_idle(&SPEC, 100 + 60_000));
        key.flush(&SPEC, &mut fired);
        assert_eq!(fired.len(), 1);
        assert_eq!(key.open_windows(), 0);
        assert!(key.add(&SPEC, 2_000, 1.0, 200, &mut fired).is_err(), "closed by the flush");
        assert!(key.add(&SPEC, 30_000, 1.0, 200, &mut fired).is_ok(), "next window is open");
    }

    #[test]
    fn checkpoint_round_trip_preserves_state() {
        let mut key = KeyWindows::default();
        feed(&mut key, &SPEC, &[(1_000, 1.5), (31_000, 2.5)]);
        let bytes = postcard::to_allocvec(&key).unwrap();
        let restored: KeyWindows = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(restored, key);
    }

    proptest::proptest! {
        /// Every event is either counted in exactly one window (its final revision) or
        /// reported late; out-of-order arrival never loses or duplicates one.
        #[test]
        fn counts_add_up(
            events in proptest::collection::vec((0u8..4, 0i64..200_000, -1000i64..1000), 0..400),
            lateness in 0i64..20_000,
        ) {
            let spec = WindowSpec { allowed_lateness_ms: lateness, ..SPEC };
            let mut keys: std::collections::HashMap<u8, KeyWindows> = Default::default();
            let mut latest: std::collections::HashMap<(u8, i64), (u32, u64)> = Default::default();
            let mut late = 0usize;
            let mut fired = Vec::new();
            let mut record = |key: u8, fired: &mut Vec<Fired>| {
                for f in fired.drain(..) {
                    let entry = latest.entry((key, f.features.start_ms)).or_insert((0, 0));
                    proptest::prop_assert!(f.revision >= entry.0, "revisions only grow");
                    *entry = (f.revision, f.features.count);
                }
                Ok(())
            };
            for &(key, ts, value) in &events {
                let windows = keys.entry(key).or_default();
                if windows.add(&spec, ts, value as f64, 0, &mut fired).is_err() {
                    late += 1;
                }
                record(key, &mut fired)?;
            }
            for (key, windows) in keys.iter_mut() {
                windows.flush(&spec, &mut fired);
                record(*key, &mut fired)?;
            }
            let counted: u64 = latest.values().map(|(_, count)| count).sum();
            proptest::prop_assert_eq!(counted as usize + late, events.len());
        }
    }
}
