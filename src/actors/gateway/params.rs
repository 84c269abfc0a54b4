//! Query-string parsing that names the offending parameter. Unknown parameters are
//! refused, so a misspelt filter never silently returns unfiltered data.

use super::error::ApiError;
use crate::store::Cursor;

pub struct Params {
    pairs: Vec<(String, String)>,
}

impl Params {
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = match raw {
            Some(raw) => serde_urlencoded::from_str(raw)
                .map_err(|error| ApiError::parameter("query", format!("cannot be decoded: {error}")))?,
            None => Vec::new(),
        };
        Ok(Self { pairs })
    }

    /// Remove and return the value of the first of `names` present (camelCase and
    /// snake_case spellings). An empty value is a value (only [`Params::string`] filters
    /// read it as absent).
    pub fn take(&mut self, names: &[&str]) -> Result<Option<String>, ApiError> {
        let mut found: Option<String> = None;
        let mut index = 0;
        while index < self.pairs.len() {
            if names.contains(&self.pairs[index].0.as_str()) {
                let (name, value) = self.pairs.remove(index);
                if found.is_some() {
                    return Err(ApiError::parameter(&name, "given more than once"));
                }
                found = Some(value);
            } else {
                index += 1;
            }
        }
        Ok(found)
    }

    /// Fail on any parameter not taken.
    pub fn finish(self, allowed: &[&str]) -> Result<(), ApiError> {
        match self.pairs.first() {
            None => Ok(()),
            Some((name, _)) => {
                Err(ApiError::parameter(name, format!("unknown parameter; this endpoint takes {}", allowed.join(", "))))
            }
        }
    }

    /// A text filter; empty means no filter (a dashboard's "All").
    pub fn string(&mut self, names: &[&str], max_len: usize) -> Result<Option<String>, ApiError> {
        match self.take(names)?.filter(|value| !value.is_empty()) {
            Some(value) if value.len() > max_len => {
                Err(ApiError::parameter(names[0], format!("longer than {max_len} bytes")))
            }
            other => Ok(other),
        }
    }

    pub fn number(&mut self, names: &[&str], min: u32, max: u32, default: u32) -> Result<u32, ApiError> {
        match self.take(names)? {
            None => Ok(default),
            Some(value) => match value.parse::<u32>() {
                Ok(n) if (min..=max).contains(&n) => Ok(n),
                _ => Err(ApiError::parameter(
                    names[0],
                    format!("expected a whole number from {min} to {max}, got {value:?}"),
                )),
            },
        }
    }

    pub fn boolean(&mut self, names: &[&str]) -> Result<Option<bool>, ApiError> {
        match self.take(names)?.as_deref() {
            None => Ok(None),
            Some("true" | "1") => Ok(Some(true)),
            Some("false" | "0") => Ok(Some(false)),
            Some(other) => Err(ApiError::parameter(names[0], format!("expected true or false, got {other:?}"))),
        }
    }

    /// An instant: RFC 3339 or epoch milliseconds.
    pub fn time(&mut self, names: &[&str]) -> Result<Option<i64>, ApiError> {
        match self.take(names)? {
            None => Ok(None),
            Some(value) => parse_time(&value).map(Some).ok_or_else(|| {
                ApiError::parameter(names[0], format!("expected RFC 3339 or epoch milliseconds, got {value:?}"))
            }),
        }
    }

    pub fn cursor(&mut self) -> Result<Option<Cursor>, ApiError> {
        match self.take(&["cursor"])? {
            None => Ok(None),
            Some(value) => decode_cursor(&value)
                .map(Some)
                .ok_or_else(|| ApiError::parameter("cursor", "not a cursor returned by this API")),
        }
    }
}

pub fn parse_time(value: &str) -> Option<i64> {
    if let Ok(ms) = value.parse::<i64>() {
        return Some(ms);
    }
    chrono::DateTime::parse_from_rfc3339(value).ok().map(|time| time.timestamp_millis())
}

/// A page position, `<windowStartMs>.<id>` of the last row seen: any such pair is a
/// valid keyset position, so a cursor is either well-formed or refused (400).
pub fn encode_cursor(cursor: Cursor) -> String {
    format!("{}.{}", cursor.window_start_ms, cursor.id)
}

pub fn decode_cursor(text: &str) -> Option<Cursor> {
    let (start, id) = text.split_once('.')?;
    let number = |part: &str| {
        let digits = part.strip_prefix('-').unwrap_or(part);
        (!digits.is_empty() && digits.len() <= 18 && digits.bytes().all(|b| b.is_ascii_digit()))
            .then(|| part.parse::<i64>().ok())
            .flatten()
    };
    Some(Cursor { window_start_ms: number(start)?, id: number(id)? })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor { window_start_ms: 1_700_000_000_000, id: 42 };
        assert_eq!(decode_cursor(&encode_cursor(cursor)), Some(cursor));
        assert_eq!(decode_cursor("garbage!"), None);
    }

    #[test]
    fn unknown_and_duplicate_parameters_are_named() {
        let mut params = Params::parse(Some("sensorId=a&limt=5")).unwrap();
        assert_eq!(params.take(&["sensorId", "sensor_id"]).unwrap().as_deref(), Some("a"));
        let error = params.finish(&["sensorId"]).unwrap_err();
        assert!(error.message.starts_with("limt:"), "{}", error.message);

        let mut params = Params::parse(Some("sensorId=a&sensor_id=b")).unwrap();
        assert!(params.take(&["sensorId", "sensor_id"]).is_err());
    }

    #[test]
    fn numbers_and_times_are_validated() {
        let mut params = Params::parse(Some("limit=5000&from=2026-01-01T00:00:00Z&to=12")).unwrap();
        let error = params.number(&["limit"], 1, 1000, 100).unwrap_err();
        assert!(error.message.starts_with("limit:"));
        assert_eq!(params.time(&["from"]).unwrap(), Some(1_767_225_600_000));
        assert_eq!(params.time(&["to"]).unwrap(), Some(12));
        let mut params = Params::parse(Some("from=yesterday")).unwrap();
        assert!(params.time(&["from"]).unwrap_err().message.starts_with("from:"));
    }
}
