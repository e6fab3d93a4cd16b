//! Timestamps. The store keeps microseconds since the Unix epoch (an integer
//! both SQLite and PostgreSQL index and compare the same way); the API shows
//! RFC 3339.

use chrono::{DateTime, TimeZone, Utc};

/// Microseconds since the Unix epoch, now.
pub fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}

/// Converts stored microseconds to a UTC time. Values outside chrono's range
/// (which the store never writes) clamp to the epoch rather than panic.
pub fn from_micros(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}
