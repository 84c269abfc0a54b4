//! Alert rules: conditions operators write in the configuration (`[rules.<name>]`),
//! evaluated per key on the windows as they fire (and, for `absence`, on the clocks).
//!
//! Pure logic, no I/O, like [`crate::window`]: the partition actor owns each sensor's
//! [`SensorRules`] next to its windows, checkpoints it with them and replays into it, so
//! a restarted partition raises exactly the alerts an uninterrupted one raises.
//!
//! An alert is a *condition that lasts*: it fires once when the condition starts to hold
//! (`firing`, with the event time it started) and resolves once when it stops (`resolved`,
//! with the event time it cleared); windows in between raise nothing new. An alert is
//! identified by `(rule, sensorId, eventType, startedAt)`, so a replay rewrites the same
//! alert instead of adding one.
//!
//! | kind | fires when | resolves when |
//! |------|-----------|---------------|
//! | `anomaly` | a window is anomalous | a window is not |
//! | `threshold` | a window's `stat` is `above` / `below` a value | a window's is not |
//! | `consecutive` | `count` windows in a row are anomalous (or meet `stat`/`above`/`below`) | a window does not |
//! | `rate_of_change` | `stat` changed from the previous window by more than `change` (absolute) or `fraction` (relative) | a change is within it |
//! | `absence` | a key sent no event for `after`, by event time (while other keys of its partition advance) or by ingest time (when all are silent) | the key sends again |
//! | `pattern` | windows meeting `steps` in order (each of its event type, at or after the previous) all fall within `within` on one sensor | a window of the last step's type does not meet it |
//!
//! Rules evaluate the first result of a window; a late revision does not re-evaluate.

use std::collections::BTreeMap;
use std::time::Duration;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::messages::{Severity, WindowResult};

/// What a rule looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleKind {
    Anomaly,
    Threshold,
    Consecutive,
    RateOfChange,
    Absence,
    Pattern,
}

impl RuleKind {
    pub const ALL: [RuleKind; 6] =
        [Self::Anomaly, Self::Threshold, Self::Consecutive, Self::RateOfChange, Self::Absence, Self::Pattern];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Anomaly => "anomaly",
            Self::Threshold => "threshold",
            Self::Consecutive => "consecutive",
            Self::RateOfChange => "rate_of_change",
            Self::Absence => "absence",
            Self::Pattern => "pattern",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// A window statistic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stat {
    #[default]
    Avg,
    Min,
    Max,
    Count,
    Stddev,
    /// The anomaly score.
    Score,
}

impl Stat {
    pub fn of(self, result: &WindowResult) -> f64 {
        match self {
            Self::Avg => result.avg_value,
            Self::Min => result.min_value,
            Self::Max => result.max_value,
            Self::Count => result.event_count as f64,
            Self::Stddev => result.stddev,
            Self::Score => result.prediction_score,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Avg => "avg",
            Self::Min => "min",
            Self::Max => "max",
            Self::Count => "count",
            Self::Stddev => "stddev",
            Self::Score => "score",
        }
    }
}

fn enabled() -> bool {
    true
}

/// `[rules.<name>]`. Which fields apply depends on `kind` (see the module table);
/// [`RuleConfig::problems`] names any that does not.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleConfig {
    pub kind: RuleKind,
    #[serde(default = "enabled")]
    pub enabled: bool,
    /// Event types it applies to (empty: all). Not for `pattern` (its steps name them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<String>,
    /// Sensor ids it applies to, exact or a prefix ending in `*` (empty: all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensors: Vec<String>,
    /// `low`, `medium`, `high` or `critical`; `anomaly` rules default to the window's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<String>,
    /// With `{placeholders}` (see [`PLACEHOLDERS`]); each kind has a default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<Stat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub change: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub after: Option<Duration>,
    #[serde(default, with = "humantime_serde::option", skip_serializing_if = "Option::is_none")]
    pub within: Option<Duration>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<StepConfig>,
}

/// One step of a `pattern`: a condition on a window of `event_type`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepConfig {
    pub event_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat: Option<Stat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub above: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    /// `true`: the window is anomalous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<bool>,
}

/// The placeholders a message may use.
pub const PLACEHOLDERS: &[&str] = &[
    "rule",
    "kind",
    "sensorId",
    "eventType",
    "severity",
    "value",
    "stat",
    "threshold",
    "count",
    "change",
    "after",
    "within",
    "score",
    "explanation",
    "windowStart",
    "windowEnd",
];

fn default_message(kind: RuleKind) -> &'static str {
    match kind {
        RuleKind::Anomaly => "{sensorId} {eventType}: anomalous window (score {score}): {explanation}",
        RuleKind::Threshold => "{sensorId} {eventType}: {stat} {value} crossed {threshold}",
        RuleKind::Consecutive => "{sensorId} {eventType}: {count} windows in a row",
        RuleKind::RateOfChange => "{sensorId} {eventType}: {stat} changed by {change} between windows",
        RuleKind::Absence => "{sensorId} {eventType}: no event for {after}",
        RuleKind::Pattern => "{sensorId}: {rule} matched within {within}",
    }
}

/// A condition on one window: `anomaly`, or `stat` above / below values.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Condition {
    anomaly: bool,
    stat: Stat,
    above: Option<f64>,
    below: Option<f64>,
}

impl Condition {
    fn of(anomaly: Option<bool>, stat: Option<Stat>, above: Option<f64>, below: Option<f64>) -> Self {
        Self {
            anomaly: anomaly.unwrap_or(above.is_none() && below.is_none()),
            stat: stat.unwrap_or_default(),
            above,
            below,
        }
    }

    fn holds(&self, result: &WindowResult) -> bool {
        if self.anomaly && !result.anomaly {
            return false;
        }
        let value = self.stat.of(result);
        match (self.above, self.below) {
            (None, None) => true,
            (above, below) => above.is_some_and(|a| value > a) || below.is_some_and(|b| value < b),
        }
    }

    fn threshold_text(&self) -> String {
        match (self.above, self.below) {
            (Some(a), Some(b)) => format!("above {a} or below {b}"),
            (Some(a), None) => format!("above {a}"),
            (None, Some(b)) => format!("below {b}"),
            (None, None) => "anomalous".to_string(),
        }
    }
}

fn any_set<T>(values: &[(&'static str, bool)], _: Option<T>) -> Vec<&'static str> {
    values.iter().filter(|(_, set)| *set).map(|(key, _)| *key).collect()
}

impl RuleConfig {
    /// What is wrong with this rule: `(key, problem)`, keys relative to the rule.
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut problems: Vec<(String, String)> = Vec::new();
        let mut problem = |key: &str, text: String| problems.push((key.to_string(), text));
        if let Some(severity) = &self.severity
            && Severity::parse(severity).is_none()
        {
            problem("severity", format!("{severity:?} is not one of low, medium, high, critical"));
        }
        if let Some(message) = &self.message {
            for name in placeholders(message) {
                if !PLACEHOLDERS.contains(&name) {
                    problem(
                        "message",
                        format!("unknown placeholder {{{name}}}; the placeholders are {}", PLACEHOLDERS.join(", ")),
                    );
                }
            }
        }
        for (key, value) in
            [("above", self.above), ("below", self.below), ("change", self.change), ("fraction", self.fraction)]
        {
            if value.is_some_and(|v| !v.is_finite()) {
                problem(key, "must be a finite number".into());
            }
        }
        for sensor in &self.sensors {
            if sensor.is_empty() || sensor.trim_end_matches('*').contains('*') {
                problem("sensors", format!("{sensor:?}: give an id, or a prefix ending in *"));
            }
        }
        // Fields that belong to other kinds.
        let allowed: &[&str] = match self.kind {
            RuleKind::Anomaly => &[],
            RuleKind::Threshold => &["stat", "above", "below"],
            RuleKind::Consecutive => &["stat", "above", "below", "count"],
            RuleKind::RateOfChange => &["stat", "change", "fraction"],
            RuleKind::Absence => &["after"],
            RuleKind::Pattern => &["steps", "within"],
        };
        let given = any_set::<()>(
            &[
                ("stat", self.stat.is_some()),
                ("above", self.above.is_some()),
                ("below", self.below.is_some()),
                ("count", self.count.is_some()),
                ("change", self.change.is_some()),
                ("fraction", self.fraction.is_some()),
                ("after", self.after.is_some()),
                ("within", self.within.is_some()),
                ("steps", !self.steps.is_empty()),
            ],
            None,
        );
        for key in given {
            if !allowed.contains(&key) {
                let kinds: Vec<&str> = RuleKind::ALL
                    .into_iter()
                    .filter(|kind| rule_fields(*kind).contains(&key))
                    .map(RuleKind::as_str)
                    .collect();
                problem(key, format!("does not apply to {} rules (only to {})", self.kind.as_str(), kinds.join(", ")));
            }
        }
        match self.kind {
            RuleKind::Anomaly => {}
            RuleKind::Threshold => {
                if self.above.is_none() && self.below.is_none() {
                    problem("above", "a threshold rule needs above = <value>, below = <value> or both".into());
                }
            }
            RuleKind::Consecutive => {
                if self.count.is_none_or(|count| count < 2) {
                    problem("count", "a consecutive rule needs count = <windows in a row>, at least 2".into());
                }
                if self.stat.is_some() && self.above.is_none() && self.below.is_none() {
                    problem("stat", "give above or below with it (without them the windows must be anomalous)".into());
                }
            }
            RuleKind::RateOfChange => {
                if self.change.is_none() && self.fraction.is_none() {
                    problem(
                        "change",
                        "a rate_of_change rule needs change = <absolute> or fraction = <relative>".into(),
                    );
                }
                for (key, value) in [("change", self.change), ("fraction", self.fraction)] {
                    if value.is_some_and(|v| v <= 0.0) {
                        problem(key, "must be above 0".into());
                    }
                }
            }
            RuleKind::Absence => {
                if self.after.is_none_or(|after| after < Duration::from_millis(1)) {
                    problem("after", "an absence rule needs after = <duration>, e.g. after = \"30s\"".into());
                }
            }
            RuleKind::Pattern => {
                if self.steps.len() < 2 {
                    problem("steps", "a pattern needs at least 2 steps, e.g. steps = [{ event_type = \"temperature\", stat = \"max\", above = 90 }, { event_type = \"pressure\", stat = \"min\", below = 2 }]".into());
                }
                if self.steps.len() > 8 {
                    problem("steps", "at most 8 steps".into());
                }
                if self.within.is_none_or(|within| within.is_zero()) {
                    problem("within", "a pattern needs within = <duration>, e.g. within = \"2m\"".into());
                }
                if !self.event_types.is_empty() {
                    problem("event_types", "a pattern's steps name their event types".into());
                }
                for (i, step) in self.steps.iter().enumerate() {
                    if step.event_type.is_empty() {
                        problem(&format!("steps[{i}].event_type"), "must name an event type".into());
                    }
                    if step.anomaly != Some(true) && step.above.is_none() && step.below.is_none() {
                        problem(&format!("steps[{i}]"), "needs above, below or anomaly = true".into());
                    }
                }
            }
        }
        problems
    }
}

fn rule_fields(kind: RuleKind) -> &'static [&'static str] {
    match kind {
        RuleKind::Anomaly => &[],
        RuleKind::Threshold => &["stat", "above", "below"],
        RuleKind::Consecutive => &["stat", "above", "below", "count"],
        RuleKind::RateOfChange => &["stat", "change", "fraction"],
        RuleKind::Absence => &["after"],
        RuleKind::Pattern => &["steps", "within"],
    }
}

/// The `{names}` in a template.
fn placeholders(template: &str) -> impl Iterator<Item = &str> {
    template.split('{').skip(1).filter_map(|part| part.split_once('}').map(|(name, _)| name))
}

/// A rule ready to evaluate.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub name: CompactString,
    pub config: RuleConfig,
    severity: Option<Severity>,
    condition: Condition,
    steps: Vec<(CompactString, Condition)>,
    /// Changes when the definition does: state kept for another definition is dropped.
    fingerprint: u64,
}

impl Rule {
    fn new(name: &str, config: &RuleConfig) -> Self {
        let text = serde_json::to_string(config).unwrap_or_default();
        Self {
            name: name.into(),
            config: config.clone(),
            severity: config.severity.as_deref().and_then(Severity::parse),
            condition: Condition::of(None, config.stat, config.above, config.below),
            steps: config
                .steps
                .iter()
                .map(|step| {
                    (step.event_type.as_str().into(), Condition::of(step.anomaly, step.stat, step.above, step.below))
                })
                .collect(),
            fingerprint: crate::keys::stable_key_hash(name, &text),
        }
    }

    fn applies_to(&self, sensor_id: &str, event_type: &str) -> bool {
        let types = &self.config.event_types;
        let sensors = &self.config.sensors;
        (types.is_empty() || types.iter().any(|t| t == event_type))
            && (sensors.is_empty()
                || sensors.iter().any(|s| match s.strip_suffix('*') {
                    Some(prefix) => sensor_id.starts_with(prefix),
                    None => s == sensor_id,
                }))
    }

    fn within_ms(&self) -> i64 {
        self.config.within.map_or(0, crate::config::millis)
    }

    fn after_ms(&self) -> i64 {
        self.config.after.map_or(0, crate::config::millis)
    }
}

/// The enabled rules, by name.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Rules {
    rules: Vec<Rule>,
}

/// Whether a key's last event is old enough for `absence` rules, by either clock.
#[derive(Clone, Copy, Debug)]
pub struct Silence {
    /// Event time of the key's latest event.
    pub last_event_ms: i64,
    /// How far the partition's event time is past it.
    pub by_event_time_ms: i64,
    /// How long ago (ingest clock) the key's latest event arrived.
    pub by_ingest_time_ms: i64,
}

impl Rules {
    /// From a validated configuration (disabled rules left out).
    pub fn from_config(rules: &BTreeMap<String, RuleConfig>) -> Self {
        Self {
            rules: rules
                .iter()
                .filter(|(_, config)| config.enabled)
                .map(|(name, config)| Rule::new(name, config))
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    pub fn has_absence(&self) -> bool {
        self.rules.iter().any(|rule| rule.config.kind == RuleKind::Absence)
    }

    /// A window of `(result.sensor_id, result.event_type)` fired for the first time:
    /// evaluate every rule on it. Whether the state changed.
    pub fn on_window(&self, state: &mut SensorRules, result: &WindowResult, now_ms: i64, out: &mut Vec<Alert>) -> bool {
        let mut changed = state.forget_stale(self, &result.sensor_id, result.window_start_ms, now_ms, out);
        for rule in &self.rules {
            let kind = rule.config.kind;
            if kind == RuleKind::Absence {
                continue;
            }
            if kind == RuleKind::Pattern {
                let touches = rule.steps.iter().any(|(event_type, _)| *event_type == result.event_type);
                if touches && rule.applies_to(&result.sensor_id, &result.event_type) {
                    changed |= self.pattern(rule, state, result, now_ms, out);
                }
                continue;
            }
            if !rule.applies_to(&result.sensor_id, &result.event_type) {
                continue;
            }
            let value = rule.condition.stat.of(result);
            let entry = state.entry(rule, &result.event_type);
            let holds = match kind {
                RuleKind::Anomaly => result.anomaly,
                RuleKind::Threshold => rule.condition.holds(result),
                RuleKind::Consecutive => {
                    let run = match entry.progress {
                        Progress::Run(run) => run,
                        _ => 0,
                    };
                    let run = if rule.condition.holds(result) { run.saturating_add(1) } else { 0 };
                    entry.progress = if run > 0 { Progress::Run(run) } else { Progress::None };
                    run >= rule.config.count.unwrap_or(2)
                }
                RuleKind::RateOfChange => {
                    let previous = match entry.progress {
                        Progress::Last(previous) => Some(previous),
                        _ => None,
                    };
                    entry.progress = Progress::Last(value);
                    previous.is_some_and(|previous| {
                        let change = (value - previous).abs();
                        rule.config.change.is_some_and(|limit| change > limit)
                            || rule.config.fraction.is_some_and(|limit| change > limit * previous.abs())
                    })
                }
                RuleKind::Absence | RuleKind::Pattern => false,
            };
            let detail = Detail::window(result, rule, value);
            changed |=
                transition(rule, entry, holds, result.window_start_ms, &detail, now_ms, out) || kind_has_progress(kind);
        }
        state.compact();
        changed
    }

    /// A pattern rule on a window of one of its steps' types.
    fn pattern(
        &self,
        rule: &Rule,
        state: &mut SensorRules,
        result: &WindowResult,
        now_ms: i64,
        out: &mut Vec<Alert>,
    ) -> bool {
        let last_type = rule.steps.last().map(|(event_type, _)| event_type.clone()).unwrap_or_default();
        let entry = state.entry(rule, &last_type);
        let mut lists = match std::mem::take(&mut entry.progress) {
            Progress::Matches(lists) if lists.len() == rule.steps.len() => lists,
            _ => vec![SmallVec::new(); rule.steps.len()],
        };
        let start = result.window_start_ms;
        let within = rule.within_ms();
        let mut matched = false;
        for (i, (event_type, condition)) in rule.steps.iter().enumerate() {
            if *event_type == result.event_type && condition.holds(result) {
                let list = &mut lists[i];
                if !list.contains(&start) {
                    let at = list.partition_point(|t| *t < start);
                    list.insert(at, start);
                    if list.len() > 4 {
                        list.remove(0);
                    }
                }
                matched = true;
            }
        }
        // Forget matches too old to be part of a sequence ending now or later.
        let newest = lists.iter().filter_map(|list| list.last().copied()).max().unwrap_or(start);
        for list in &mut lists {
            list.retain(|t| *t >= newest - within);
        }
        let chain = matched.then(|| chain(&lists, &rule.steps, within, start)).flatten();
        let mut changed = matched;
        let detail = Detail::window(result, rule, rule.steps.last().map_or(0.0, |(_, c)| c.stat.of(result)));
        match chain {
            Some(first) => {
                lists.iter_mut().for_each(SmallVec::clear);
                changed |= transition(rule, entry, true, first, &detail, now_ms, out);
            }
            None => {
                // The last step's condition cleared: the pattern's alert resolves.
                if result.event_type == last_type
                    && let Some((_, condition)) = rule.steps.last()
                    && !condition.holds(result)
                {
                    changed |= transition(rule, entry, false, start, &detail, now_ms, out);
                }
            }
        }
        entry.progress = if lists.iter().all(SmallVec::is_empty) { Progress::None } else { Progress::Matches(lists) };
        changed
    }

    /// An event of `(sensor_id, event_type)` arrived at event time `timestamp_ms`: its
    /// `absence` alerts resolve. Whether the state changed.
    pub fn on_event(
        &self,
        state: &mut SensorRules,
        sensor_id: &str,
        event_type: &str,
        timestamp_ms: i64,
        now_ms: i64,
        out: &mut Vec<Alert>,
    ) -> bool {
        let mut changed = false;
        for rule in self.rules.iter().filter(|rule| rule.config.kind == RuleKind::Absence) {
            if let Some(entry) = state.find(rule, event_type)
                && entry.firing.is_some()
            {
                let detail = Detail::absence(sensor_id, event_type, rule, timestamp_ms);
                changed |= transition(rule, entry, false, timestamp_ms, &detail, now_ms, out);
            }
        }
        if changed {
            state.compact();
        }
        changed
    }

    /// The clocks moved: raise `absence` alerts for a silent key. Whether the state changed.
    pub fn on_silence(
        &self,
        state: &mut SensorRules,
        sensor_id: &str,
        event_type: &str,
        silence: Silence,
        now_ms: i64,
        out: &mut Vec<Alert>,
    ) -> bool {
        let newest_event_ms = silence.last_event_ms.saturating_add(silence.by_event_time_ms);
        let mut changed = state.forget_stale(self, sensor_id, newest_event_ms, now_ms, out);
        for rule in self.rules.iter().filter(|rule| rule.config.kind == RuleKind::Absence) {
            let after = rule.after_ms();
            if !rule.applies_to(sensor_id, event_type)
                || (silence.by_event_time_ms < after && silence.by_ingest_time_ms < after)
            {
                continue;
            }
            if state.find(rule, event_type).is_some_and(|entry| entry.firing.is_some()) {
                continue;
            }
            let entry = state.entry(rule, event_type);
            let started = silence.last_event_ms.saturating_add(after);
            let detail = Detail::absence(sensor_id, event_type, rule, started);
            changed |= transition(rule, entry, true, started, &detail, now_ms, out);
        }
        changed
    }
}

fn kind_has_progress(kind: RuleKind) -> bool {
    matches!(kind, RuleKind::Consecutive | RuleKind::RateOfChange)
}

/// The earliest first-step time of a chain through every step's matches, in order and
/// within `within`, that uses the window starting at `newest` (so old chains do not fire
/// again).
fn chain(lists: &[SmallVec<[i64; 4]>], steps: &[(CompactString, Condition)], within: i64, newest: i64) -> Option<i64> {
    let first = lists.first()?;
    'candidates: for &t1 in first.iter() {
        let mut t = t1;
        let mut uses_newest = t1 == newest;
        for (i, list) in lists.iter().enumerate().skip(1) {
            let same_type = steps[i].0 == steps[i - 1].0;
            let next = list.iter().copied().find(|&candidate| if same_type { candidate > t } else { candidate >= t });
            match next {
                Some(next) if next - t1 <= within => {
                    uses_newest |= next == newest;
                    t = next;
                }
                _ => continue 'candidates,
            }
        }
        if uses_newest {
            return Some(t1);
        }
    }
    None
}

/// Move an entry's alert to `holds`: fire (not firing and it holds) or resolve (firing
/// and it does not), appending the alert. Whether anything changed.
fn transition(
    rule: &Rule,
    entry: &mut Entry,
    holds: bool,
    at_ms: i64,
    detail: &Detail,
    now_ms: i64,
    out: &mut Vec<Alert>,
) -> bool {
    match (&entry.firing, holds) {
        (None, true) => {
            let severity = rule.severity.or(detail.severity).unwrap_or(Severity::Medium);
            entry.firing = Some(Firing { started_at_ms: at_ms, severity, kind: rule.config.kind });
            out.push(detail.alert(rule, severity, at_ms, None, now_ms));
            true
        }
        (Some(firing), false) => {
            let firing = *firing;
            entry.firing = None;
            out.push(detail.alert(rule, firing.severity, firing.started_at_ms, Some(at_ms), now_ms));
            true
        }
        _ => false,
    }
}

/// What an alert says about the window or silence behind it.
struct Detail {
    sensor_id: CompactString,
    event_type: CompactString,
    value: Option<f64>,
    score: Option<f64>,
    severity: Option<Severity>,
    explanation: String,
    window: Option<(i64, i64)>,
}

impl Detail {
    fn window(result: &WindowResult, rule: &Rule, value: f64) -> Self {
        let event_type = match rule.config.kind {
            RuleKind::Pattern => rule.steps.last().map(|(t, _)| t.clone()).unwrap_or_default(),
            _ => result.event_type.clone(),
        };
        Self {
            sensor_id: result.sensor_id.clone(),
            event_type,
            value: Some(value),
            score: Some(result.prediction_score),
            severity: result.anomaly.then_some(result.severity),
            explanation: result.explanation.clone(),
            window: Some((result.window_start_ms, result.window_end_ms)),
        }
    }

    fn absence(sensor_id: &str, event_type: &str, _rule: &Rule, _at_ms: i64) -> Self {
        Self {
            sensor_id: sensor_id.into(),
            event_type: event_type.into(),
            value: None,
            score: None,
            severity: None,
            explanation: String::new(),
            window: None,
        }
    }

    fn alert(
        &self,
        rule: &Rule,
        severity: Severity,
        started_at_ms: i64,
        resolved_at_ms: Option<i64>,
        now_ms: i64,
    ) -> Alert {
        let template = rule.config.message.as_deref().unwrap_or(default_message(rule.config.kind));
        Alert {
            rule: rule.name.clone(),
            kind: rule.config.kind,
            sensor_id: self.sensor_id.clone(),
            event_type: self.event_type.clone(),
            severity,
            state: if resolved_at_ms.is_some() { AlertState::Resolved } else { AlertState::Firing },
            started_at_ms,
            resolved_at_ms,
            message: self.render(template, rule, severity),
            value: self.value.filter(|v| v.is_finite()),
            window_start_ms: self.window.map(|(start, _)| start),
            window_end_ms: self.window.map(|(_, end)| end),
            fired_at_ms: now_ms,
        }
    }

    fn render(&self, template: &str, rule: &Rule, severity: Severity) -> String {
        let config = &rule.config;
        let number = |v: Option<f64>| v.map(|v| format!("{}", (v * 1000.0).round() / 1000.0)).unwrap_or_default();
        let duration = |d: Option<Duration>| d.map(|d| humantime::format_duration(d).to_string()).unwrap_or_default();
        let mut out = String::with_capacity(template.len() + 32);
        let mut rest = template;
        while let Some(open) = rest.find('{') {
            out.push_str(&rest[..open]);
            let Some(close) = rest[open..].find('}') else {
                break;
            };
            let name = &rest[open + 1..open + close];
            let value = match name {
                "rule" => rule.name.to_string(),
                "kind" => config.kind.as_str().to_string(),
                "sensorId" => self.sensor_id.to_string(),
                "eventType" => self.event_type.to_string(),
                "severity" => severity.as_str().to_string(),
                "value" => number(self.value),
                "stat" => rule.condition.stat.as_str().to_string(),
                "threshold" => rule.condition.threshold_text(),
                "count" => config.count.map(|c| c.to_string()).unwrap_or_default(),
                "change" => match (config.change, config.fraction) {
                    (Some(change), _) => format!("more than {change}"),
                    (None, Some(fraction)) => format!("more than {}%", fraction * 100.0),
                    _ => String::new(),
                },
                "after" => duration(config.after),
                "within" => duration(config.within),
                "score" => number(self.score),
                "explanation" => self.explanation.clone(),
                "windowStart" => self.window.map(|(s, _)| crate::store::ser::rfc3339(s)).unwrap_or_default(),
                "windowEnd" => self.window.map(|(_, e)| crate::store::ser::rfc3339(e)).unwrap_or_default(),
                other => format!("{{{other}}}"),
            };
            out.push_str(&value);
            rest = &rest[open + close + 1..];
        }
        out.push_str(rest);
        out
    }
}

/// Whether an alert's condition holds (`firing`) or stopped (`resolved`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Firing => "firing",
            Self::Resolved => "resolved",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        [Self::Firing, Self::Resolved].into_iter().find(|state| state.as_str().eq_ignore_ascii_case(text))
    }
}

/// An alert as a rule raised or resolved it: what the sinks write (keyed by
/// `(rule, sensor_id, event_type, started_at_ms)`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub rule: CompactString,
    pub kind: RuleKind,
    pub sensor_id: CompactString,
    pub event_type: CompactString,
    pub severity: Severity,
    pub state: AlertState,
    /// Event time the condition started to hold.
    pub started_at_ms: i64,
    /// Event time it stopped (resolved alerts).
    pub resolved_at_ms: Option<i64>,
    pub message: String,
    /// The statistic the rule looked at, in the window that raised or resolved it.
    pub value: Option<f64>,
    pub window_start_ms: Option<i64>,
    pub window_end_ms: Option<i64>,
    /// Wall-clock time of the transition, epoch milliseconds.
    pub fired_at_ms: i64,
}

/// An alert as the alerts topic carries it (the REST shape without the store's id and
/// times). Keyed by sensorId; `firing` then `resolved` for one alert share `rule`,
/// `sensorId`, `eventType` and `startedAt`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertRecord<'a> {
    pub rule: &'a str,
    pub kind: &'static str,
    pub sensor_id: &'a str,
    pub event_type: &'a str,
    pub severity: &'static str,
    pub state: &'static str,
    pub started_at: String,
    pub resolved_at: Option<String>,
    pub message: &'a str,
    pub value: Option<f64>,
    pub window_start: Option<String>,
    pub window_end: Option<String>,
}

impl<'a> From<&'a Alert> for AlertRecord<'a> {
    fn from(alert: &'a Alert) -> Self {
        use crate::store::ser::rfc3339;
        Self {
            rule: &alert.rule,
            kind: alert.kind.as_str(),
            sensor_id: &alert.sensor_id,
            event_type: &alert.event_type,
            severity: alert.severity.as_str(),
            state: alert.state.as_str(),
            started_at: rfc3339(alert.started_at_ms),
            resolved_at: alert.resolved_at_ms.map(rfc3339),
            message: &alert.message,
            value: alert.value,
            window_start: alert.window_start_ms.map(rfc3339),
            window_end: alert.window_end_ms.map(rfc3339),
        }
    }
}

/// An alert whose condition holds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Firing {
    started_at_ms: i64,
    severity: Severity,
    /// The rule's kind, to resolve the alert if a reload removes the rule.
    kind: RuleKind,
}

/// What a rule remembers between windows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
enum Progress {
    #[default]
    None,
    /// `consecutive`: windows in a row that met the condition.
    Run(u32),
    /// `rate_of_change`: the previous window's statistic.
    Last(f64),
    /// `pattern`: recent matching window starts, per step.
    Matches(Vec<SmallVec<[i64; 4]>>),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Entry {
    rule: CompactString,
    fingerprint: u64,
    event_type: CompactString,
    firing: Option<Firing>,
    progress: Progress,
}

/// The rule state of one sensor (all its event types): checkpointed with its keys.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SensorRules {
    entries: Vec<Entry>,
}

impl SensorRules {
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Alerts firing now: `(rule, event type)`.
    pub fn firing(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().filter(|e| e.firing.is_some()).map(|e| (e.rule.as_str(), e.event_type.as_str()))
    }

    fn find(&mut self, rule: &Rule, event_type: &str) -> Option<&mut Entry> {
        self.entries
            .iter_mut()
            .find(|e| e.rule == rule.name && e.event_type == event_type && e.fingerprint == rule.fingerprint)
    }

    fn entry(&mut self, rule: &Rule, event_type: &str) -> &mut Entry {
        let at = match self.entries.iter().position(|e| e.rule == rule.name && e.event_type == event_type) {
            Some(at) => {
                if self.entries[at].fingerprint != rule.fingerprint {
                    // The rule's definition changed since: start it afresh.
                    self.entries[at] = Entry::new(rule, event_type);
                }
                at
            }
            None => {
                self.entries.push(Entry::new(rule, event_type));
                self.entries.len() - 1
            }
        };
        &mut self.entries[at]
    }

    /// Drop the state of rules a reload removed or changed; their firing alerts resolve
    /// at event time `at_ms` (a changed rule starts afresh).
    fn forget_stale(&mut self, rules: &Rules, sensor_id: &str, at_ms: i64, now_ms: i64, out: &mut Vec<Alert>) -> bool {
        let before = self.entries.len();
        self.entries.retain(|e| {
            let current = rules.rules.iter().any(|r| r.name == e.rule && r.fingerprint == e.fingerprint);
            if !current && let Some(firing) = e.firing {
                out.push(Alert {
                    rule: e.rule.clone(),
                    kind: firing.kind,
                    sensor_id: sensor_id.into(),
                    event_type: e.event_type.clone(),
                    severity: firing.severity,
                    state: AlertState::Resolved,
                    started_at_ms: firing.started_at_ms,
                    resolved_at_ms: Some(at_ms.max(firing.started_at_ms)),
                    message: format!("{sensor_id} {}: rule {} was removed or changed", e.event_type, e.rule),
                    value: None,
                    window_start_ms: None,
                    window_end_ms: None,
                    fired_at_ms: now_ms,
                });
            }
            current
        });
        self.entries.len() != before
    }

    /// Drop entries that remember nothing.
    fn compact(&mut self) {
        self.entries.retain(|e| e.firing.is_some() || e.progress != Progress::None);
    }
}

impl Entry {
    fn new(rule: &Rule, event_type: &str) -> Self {
        Self {
            rule: rule.name.clone(),
            fingerprint: rule.fingerprint,
            event_type: event_type.into(),
            firing: None,
            progress: Progress::None,
        }
    }
}

/// The rules in force, replaced by a reload while partitions read them.
#[derive(Debug, Default)]
pub struct RulesHandle(parking_lot::RwLock<std::sync::Arc<Rules>>);

impl RulesHandle {
    pub fn new(rules: Rules) -> Self {
        Self(parking_lot::RwLock::new(std::sync::Arc::new(rules)))
    }

    pub fn current(&self) -> std::sync::Arc<Rules> {
        std::sync::Arc::clone(&self.0.read())
    }

    pub fn replace(&self, rules: Rules) {
        *self.0.write() = std::sync::Arc::new(rules);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::WindowKind;

    fn rules(toml: &str) -> Rules {
        let map: BTreeMap<String, RuleConfig> = toml::from_str(toml).expect("rules parse");
        for (name, rule) in &map {
            assert!(rule.problems().is_empty(), "{name}: {:?}", rule.problems());
        }
        Rules::from_config(&map)
    }

    /// A 10 s window of `event_type` starting at `start_s` seconds.
    fn window(event_type: &str, start_s: i64, avg: f64, anomaly: bool) -> WindowResult {
        WindowResult {
            sensor_id: "s-1".into(),
            event_type: event_type.into(),
            window_kind: WindowKind::Tumbling,
            window_start_ms: start_s * 1000,
            window_end_ms: start_s * 1000 + 10_000,
            event_count: 10,
            avg_value: avg,
            min_value: avg - 1.0,
            max_value: avg + 1.0,
            stddev: 0.5,
            prediction_score: if anomaly { 0.99 } else { 0.1 },
            anomaly,
            severity: if anomaly { Severity::High } else { Severity::Low },
            revision: 0,
            explanation: "mean 4.1σ above baseline".into(),
            fired_at_ms: 0,
            supersedes: Vec::new(),
        }
    }

    /// Feed windows; the alerts as `(rule, state, startedAt s, resolvedAt s)`.
    fn run(
        rules: &Rules,
        state: &mut SensorRules,
        windows: &[WindowResult],
    ) -> Vec<(String, &'static str, i64, Option<i64>)> {
        let mut out = Vec::new();
        for w in windows {
            rules.on_window(state, w, 0, &mut out);
        }
        out.iter()
            .map(|a| (a.rule.to_string(), a.state.as_str(), a.started_at_ms / 1000, a.resolved_at_ms.map(|t| t / 1000)))
            .collect()
    }

    fn a(
        rule: &str,
        state: &'static str,
        started: i64,
        resolved: Option<i64>,
    ) -> (String, &'static str, i64, Option<i64>) {
        (rule.to_string(), state, started, resolved)
    }

    #[test]
    fn anomaly_alerts_last_while_windows_are_anomalous() {
        let rules = rules("[anomaly]\nkind = \"anomaly\"");
        let t = "temperature";
        let windows = [
            window(t, 0, 20.0, false),
            window(t, 10, 40.0, true),
            window(t, 20, 41.0, true),
            window(t, 30, 20.0, false),
            window(t, 40, 40.0, true),
        ];
        let got = run(&rules, &mut SensorRules::default(), &windows);
        assert_eq!(
            got,
            vec![
                a("anomaly", "firing", 10, None),
                a("anomaly", "resolved", 10, Some(30)),
                a("anomaly", "firing", 40, None)
            ]
        );
    }

    #[test]
    fn threshold_fires_above_and_resolves_below_with_its_message() {
        let rules = rules(
            "[overheat]\nkind = \"threshold\"\nevent_types = [\"temperature\"]\nstat = \"max\"\nabove = 80.0\n\
             severity = \"critical\"\nmessage = \"{sensorId} too hot: {stat} {value} {threshold}\"",
        );
        let mut out = Vec::new();
        let mut state = SensorRules::default();
        for w in [
            window("temperature", 0, 70.0, false),
            window("pressure", 0, 95.0, false),
            window("temperature", 10, 85.0, false),
        ] {
            rules.on_window(&mut state, &w, 0, &mut out);
        }
        assert_eq!(out.len(), 1, "pressure is not in event_types; 71 is not above 80");
        assert_eq!(out[0].message, "s-1 too hot: max 86 above 80");
        assert_eq!(out[0].severity, Severity::Critical);
        assert_eq!(out[0].value, Some(86.0));
        rules.on_window(&mut state, &window("temperature", 20, 85.0, false), 0, &mut out);
        assert_eq!(out.len(), 1, "still above: no second alert");
        rules.on_window(&mut state, &window("temperature", 30, 60.0, false), 0, &mut out);
        assert_eq!((out[1].state, out[1].resolved_at_ms), (AlertState::Resolved, Some(30_000)));
        assert_eq!(out[1].started_at_ms, 10_000);
        assert!(state.is_empty(), "nothing left to remember");
    }

    #[test]
    fn consecutive_needs_count_windows_in_a_row() {
        let rules = rules("[streak]\nkind = \"consecutive\"\ncount = 3");
        let t = "vibration";
        let flags = [true, true, false, true, true, true, true, false];
        let windows: Vec<_> = flags.iter().enumerate().map(|(i, f)| window(t, i as i64 * 10, 1.0, *f)).collect();
        let got = run(&rules, &mut SensorRules::default(), &windows);
        assert_eq!(got, vec![a("streak", "firing", 50, None), a("streak", "resolved", 50, Some(70))]);
    }

    #[test]
    fn rate_of_change_absolute_and_relative() {
        let absolute = rules("[jump]\nkind = \"rate_of_change\"\nchange = 5.0");
        let avgs = [10.0, 12.0, 20.0, 21.0, 10.0, 10.5];
        let windows: Vec<_> = avgs.iter().enumerate().map(|(i, v)| window("t", i as i64 * 10, *v, false)).collect();
        let got = run(&absolute, &mut SensorRules::default(), &windows);
        assert_eq!(
            got,
            vec![
                a("jump", "firing", 20, None),
                a("jump", "resolved", 20, Some(30)),
                a("jump", "firing", 40, None),
                a("jump", "resolved", 40, Some(50))
            ]
        );
        let relative = rules("[drift]\nkind = \"rate_of_change\"\nfraction = 0.5");
        let got = run(&relative, &mut SensorRules::default(), &windows);
        // 12 → 20 is +67 %, 21 → 10 is −52 %: both above half.
        assert_eq!(
            got,
            vec![
                a("drift", "firing", 20, None),
                a("drift", "resolved", 20, Some(30)),
                a("drift", "firing", 40, None),
                a("drift", "resolved", 40, Some(50))
            ]
        );
    }

    #[test]
    fn absence_by_either_clock_and_back() {
        let rules = rules("[silent]\nkind = \"absence\"\nafter = \"30s\"\nseverity = \"high\"");
        let mut state = SensorRules::default();
        let mut out = Vec::new();
        let silence = |event: i64, ingest: i64| Silence {
            last_event_ms: 100_000,
            by_event_time_ms: event,
            by_ingest_time_ms: ingest,
        };
        assert!(!rules.on_silence(&mut state, "s-1", "t", silence(29_999, 29_999), 0, &mut out));
        assert!(rules.on_silence(&mut state, "s-1", "t", silence(30_000, 0), 0, &mut out), "others advanced");
        assert!(!rules.on_silence(&mut state, "s-1", "t", silence(60_000, 60_000), 0, &mut out), "deduplicated");
        let mut other_sensor = SensorRules::default();
        assert!(
            rules.on_silence(&mut other_sensor, "s-2", "t", silence(0, 45_000), 0, &mut out),
            "all silent: ingest time"
        );
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].started_at_ms, out[0].severity), (130_000, Severity::High));
        assert_eq!(out[0].message, "s-1 t: no event for 30s");
        assert!(rules.on_event(&mut state, "s-1", "t", 140_000, 0, &mut out));
        assert_eq!(
            (out[2].state, out[2].resolved_at_ms, out[2].started_at_ms),
            (AlertState::Resolved, Some(140_000), 130_000)
        );
        assert!(!rules.on_event(&mut state, "s-1", "t", 141_000, 0, &mut out), "resolved once");
    }

    const SPIKE_THEN_DROP: &str = "[spike_then_drop]\nkind = \"pattern\"\nwithin = \"2m\"\nseverity = \"critical\"\n\
        steps = [{ event_type = \"temperature\", stat = \"max\", above = 90.0 }, { event_type = \"pressure\", stat = \"min\", below = 2.0 }]";

    #[test]
    fn pattern_a_spike_then_a_drop_within_the_span() {
        let rules = rules(SPIKE_THEN_DROP);
        let windows = [
            window("pressure", 0, 1.5, false),      // a drop with no spike before it: nothing
            window("temperature", 10, 95.0, false), // spike
            window("pressure", 10, 5.0, false),
            window("pressure", 70, 1.0, false), // drop 60 s after the spike: the pattern
            window("pressure", 80, 1.2, false), // still low: no second alert
            window("pressure", 90, 5.0, false), // recovered: resolved
            window("temperature", 200, 95.0, false),
            window("pressure", 330, 1.0, false), // 130 s after the spike: too late
        ];
        let got = run(&rules, &mut SensorRules::default(), &windows);
        assert_eq!(got, vec![a("spike_then_drop", "firing", 10, None), a("spike_then_drop", "resolved", 10, Some(90))]);
    }

    #[test]
    fn pattern_follows_event_time_not_arrival_order() {
        let rules = rules(SPIKE_THEN_DROP);
        // The pressure window fires first (its key's watermark is ahead), the earlier
        // temperature spike after it.
        let got = run(
            &rules,
            &mut SensorRules::default(),
            &[window("pressure", 60, 1.0, false), window("temperature", 30, 99.0, false)],
        );
        assert_eq!(got, vec![a("spike_then_drop", "firing", 30, None)]);
        // The other order in event time is not the pattern.
        let got = run(
            &rules,
            &mut SensorRules::default(),
            &[window("pressure", 20, 1.0, false), window("temperature", 30, 99.0, false)],
        );
        assert!(got.is_empty(), "{got:?}");
    }

    #[test]
    fn state_survives_a_checkpoint_and_a_changed_rule_starts_afresh() {
        let streak = rules("[streak]\nkind = \"consecutive\"\ncount = 3");
        let mut state = SensorRules::default();
        let mut out = Vec::new();
        for i in 0..2 {
            streak.on_window(&mut state, &window("t", i * 10, 1.0, true), 0, &mut out);
        }
        let bytes = postcard::to_allocvec(&state).expect("encoded");
        let mut restored: SensorRules = postcard::from_bytes(&bytes).expect("decoded");
        assert_eq!(restored, state);
        streak.on_window(&mut restored, &window("t", 20, 1.0, true), 0, &mut out);
        assert_eq!(out.len(), 1, "the third in a row after the restore fires");
        // The rule's count changes (a reload): its run starts again.
        let longer = rules("[streak]\nkind = \"consecutive\"\ncount = 4");
        longer.on_window(&mut state, &window("t", 20, 1.0, true), 0, &mut out);
        assert_eq!(out.len(), 1, "one in a row under the new definition");
        // The rule is removed: its state goes.
        let none = Rules::default();
        none.on_window(&mut state, &window("t", 30, 1.0, true), 0, &mut out);
        assert!(state.is_empty());
    }

    #[test]
    fn a_firing_alert_resolves_when_a_reload_removes_or_changes_its_rule() {
        let hot = rules("[hot]\nkind = \"threshold\"\nabove = 5.0\nseverity = \"high\"");
        let mut state = SensorRules::default();
        let mut out = Vec::new();
        hot.on_window(&mut state, &window("t", 10, 9.0, false), 0, &mut out);
        assert_eq!(out.len(), 1);
        let changed = rules("[hot]\nkind = \"threshold\"\nabove = 50.0");
        changed.on_window(&mut state, &window("t", 20, 9.0, false), 0, &mut out);
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(
            (out[1].state, out[1].started_at_ms, out[1].resolved_at_ms),
            (AlertState::Resolved, 10_000, Some(20_000))
        );
        assert_eq!((out[1].kind, out[1].severity), (RuleKind::Threshold, Severity::High));
        assert!(out[1].message.contains("removed or changed"), "{}", out[1].message);
        // Under the new definition 9 is not hot: nothing fires, nothing is left.
        assert!(state.is_empty());
    }

    #[test]
    fn problems_name_the_field_and_what_is_valid() {
        let bad: BTreeMap<String, RuleConfig> = toml::from_str(
            "[a]\nkind = \"threshold\"\nstat = \"max\"\n\
             [b]\nkind = \"absence\"\nabove = 3.0\nafter = \"10s\"\n\
             [c]\nkind = \"pattern\"\nwithin = \"1m\"\nsteps = [{ event_type = \"t\" }]\n\
             [d]\nkind = \"anomaly\"\nseverity = \"loud\"\nmessage = \"{sensor}\"",
        )
        .expect("parses");
        let problems: Vec<String> = bad
            .iter()
            .flat_map(|(name, rule)| {
                rule.problems().into_iter().map(move |(key, text)| format!("{name}.{key}: {text}"))
            })
            .collect();
        let text = problems.join("\n");
        assert!(text.contains("a.above: a threshold rule needs above"), "{text}");
        assert!(text.contains("b.above: does not apply to absence rules (only to threshold, consecutive)"), "{text}");
        assert!(text.contains("c.steps: a pattern needs at least 2 steps"), "{text}");
        assert!(text.contains("c.steps[0]: needs above, below or anomaly = true"), "{text}");
        assert!(text.contains("d.severity: \"loud\" is not one of"), "{text}");
        assert!(text.contains("d.message: unknown placeholder {sensor}"), "{text}");
    }
}
