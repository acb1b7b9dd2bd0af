//! Timestamps as the spec writes them: RFC 3339 UTC with millisecond precision.

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};

/// The current time as an RFC 3339 UTC string.
pub fn now_rfc3339() -> String {
    to_rfc3339(Utc::now())
}

/// Formats a UTC time the way every Taproom timestamp is written.
pub fn to_rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Milliseconds since the Unix epoch for an RFC 3339 string (0 when unparseable).
pub fn rfc3339_to_ms(s: &str) -> i64 {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .unwrap_or(0)
}

/// RFC 3339 for milliseconds since the epoch.
pub fn ms_to_rfc3339(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(to_rfc3339)
        .unwrap_or_default()
}
