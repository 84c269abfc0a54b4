//! `tidemark score-csv`: run `timestamp,value` CSV files through a scorer, one value per
//! window, exactly as the pipeline scores a key's windows, and write the same tree with
//! an `anomaly_score` column (the layout the Numenta Anomaly Benchmark scorer reads).
//!
//! Streaming: row i is scored from rows 0..=i only, in file order, with one
//! configuration for every file.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Instant;

use chrono::NaiveDateTime;

use crate::scoring::{Score, Scorer};
use crate::window::WindowFeatures;

#[derive(Debug, thiserror::Error)]
pub enum ScoreCsvError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error("{path}, line {line}: {reason}")]
    Row { path: PathBuf, line: u64, reason: String },
    #[error("{0}: no CSV files found")]
    Empty(PathBuf),
}

/// One row of a series: the timestamp (epoch milliseconds, UTC) and the value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Row {
    pub timestamp_ms: i64,
    pub value: f64,
}

/// The window the pipeline would fire for one row: one value, starting at the row's time.
pub fn window_of(row: Row) -> WindowFeatures {
    WindowFeatures {
        start_ms: row.timestamp_ms,
        end_ms: row.timestamp_ms,
        count: 1,
        mean: row.value,
        min: row.value,
        max: row.value,
        stddev: 0.0,
    }
}

/// Score a series from a fresh state.
pub fn score_series(scorer: &Scorer, rows: &[Row]) -> Vec<Score> {
    let mut state = scorer.new_state();
    rows.iter().map(|&row| scorer.score(&mut state, &window_of(row))).collect()
}

/// Parse `2014-04-01 00:05:00` (with optional fraction, NAB's format) or RFC 3339.
fn parse_timestamp(text: &str) -> Option<i64> {
    let text = text.trim();
    if let Ok(time) = chrono::DateTime::parse_from_rfc3339(text) {
        return Some(time.timestamp_millis());
    }
    NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok().map(|time| time.and_utc().timestamp_millis())
}

/// Read a `timestamp,value` CSV (header first; other columns ignored).
pub fn read_series(path: &Path) -> Result<Vec<Row>, ScoreCsvError> {
    let csv_error = |source| ScoreCsvError::Csv { path: path.to_path_buf(), source };
    let mut reader = csv::Reader::from_path(path).map_err(csv_error)?;
    let headers = reader.headers().map_err(csv_error)?.clone();
    let column = |name: &str| headers.iter().position(|h| h.trim() == name);
    let (Some(time_column), Some(value_column)) = (column("timestamp"), column("value")) else {
        return Err(ScoreCsvError::Row {
            path: path.to_path_buf(),
            line: 1,
            reason: format!("expected columns timestamp and value, found {:?}", headers.iter().collect::<Vec<_>>()),
        });
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record.map_err(csv_error)?;
        let line = record.position().map_or(0, |p| p.line());
        let row_error = |reason: String| ScoreCsvError::Row { path: path.to_path_buf(), line, reason };
        let time = record.get(time_column).unwrap_or_default();
        let timestamp_ms =
            parse_timestamp(time).ok_or_else(|| row_error(format!("timestamp {time:?} is not a date-time")))?;
        let text = record.get(value_column).unwrap_or_default();
        let value = text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| row_error(format!("value {text:?} is not a finite number")))?;
        rows.push(Row { timestamp_ms, value });
    }
    Ok(rows)
}

#[derive(Debug, Default)]
pub struct Report {
    pub files: usize,
    pub rows: usize,
    pub seconds: f64,
}

fn csv_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ScoreCsvError> {
    let entries = fs::read_dir(dir).map_err(|source| ScoreCsvError::Io { path: dir.to_path_buf(), source })?;
    let mut paths: Vec<PathBuf> = entries.filter_map(|entry| entry.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        if path.is_dir() {
            csv_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "csv") {
            out.push(path);
        }
    }
    Ok(())
}

/// Score every CSV under `input` into the same relative path under `output`, with the
/// columns `timestamp,value,anomaly_score,explanation`.
pub fn run(scorer: &Scorer, input: &Path, output: &Path) -> Result<Report, ScoreCsvError> {
    let mut files = Vec::new();
    csv_files(input, &mut files)?;
    if files.is_empty() {
        return Err(ScoreCsvError::Empty(input.to_path_buf()));
    }
    let started = Instant::now();
    let mut report = Report::default();
    for file in files {
        let rows = read_series(&file)?;
        let relative = file.strip_prefix(input).unwrap_or(&file);
        let target = output.join(relative);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|source| ScoreCsvError::Io { path: parent.to_path_buf(), source })?;
        }
        let csv_error = |source| ScoreCsvError::Csv { path: target.clone(), source };
        let mut writer = csv::Writer::from_path(&target).map_err(csv_error)?;
        writer.write_record(["timestamp", "value", "anomaly_score", "explanation"]).map_err(csv_error)?;
        let scores = score_series(scorer, &rows);
        for (row, score) in rows.iter().zip(scores) {
            let time = chrono::DateTime::from_timestamp_millis(row.timestamp_ms)
                .map(|t| t.naive_utc().format("%Y-%m-%d %H:%M:%S").to_string())
                .unwrap_or_default();
            writer
                .write_record([time, row.value.to_string(), format!("{:.6}", score.value), score.explanation])
                .map_err(csv_error)?;
        }
        writer.flush().map_err(|source| ScoreCsvError::Io { path: target.clone(), source })?;
        report.files += 1;
        report.rows += rows.len();
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}
