//! Wall-clock helpers. Timestamps in the stores are integers: milliseconds
//! since the Unix epoch, UTC. Timestamps in JSON are RFC 3339 strings.

/// Milliseconds since the Unix epoch (UTC) now.
pub fn now_ms() -> i64 {
    let now = ::time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Formats epoch milliseconds as RFC 3339 in UTC (`2024-02-13T03:18:14.123Z`).
/// Out-of-range input formats as the epoch.
pub fn rfc3339_from_ms(ms: i64) -> String {
    let dt = ::time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(::time::OffsetDateTime::UNIX_EPOCH);
    dt.format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}

/// Parses an RFC 3339 timestamp (as the card company sends `approvedAt`) into
/// epoch milliseconds; `None` when it does not parse.
pub fn ms_from_rfc3339(s: &str) -> Option<i64> {
    ::time::OffsetDateTime::parse(s, &::time::format_description::well_known::Rfc3339)
        .ok()
        .map(|dt| (dt.unix_timestamp_nanos() / 1_000_000) as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let ms = 1_707_794_294_123;
        let s = rfc3339_from_ms(ms);
        assert_eq!(ms_from_rfc3339(&s), Some(ms));
        assert_eq!(
            ms_from_rfc3339("2024-02-13T12:18:14+09:00"),
            Some(1_707_794_294_000)
        );
    }
}
