//! Wall-clock helpers. Timestamps in the stores are integers: milliseconds
//! since the Unix epoch, UTC. Timestamps in JSON are RFC 3339 strings.

/// Milliseconds since the Unix epoch (UTC) now.
pub fn now_ms() -> i64 {
    crate::ambient::now_ms()
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

/// Korea Standard Time, UTC+9: the zone the card company (Toss) dates its
/// transactions in and reads offset-less date-times in.
const KST: ::time::UtcOffset = ::time::macros::offset!(+9);

fn kst(ms: i64) -> ::time::OffsetDateTime {
    ::time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(::time::OffsetDateTime::UNIX_EPOCH)
        .to_offset(KST)
}

/// Formats epoch milliseconds as a KST local date-time to the second, the
/// form of Toss `GET /v1/transactions` `startDate`/`endDate`
/// (`2024-02-13T12:18:14`). Sub-second parts are dropped (floor).
pub fn kst_local_from_ms(ms: i64) -> String {
    let format =
        ::time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    kst(ms.div_euclid(1000) * 1000)
        .format(&format)
        .unwrap_or_else(|_| "1970-01-01T09:00:00".to_owned())
}

/// Formats epoch milliseconds as RFC 3339 in KST to the second, as the card
/// company writes `approvedAt` and `transactionAt`
/// (`2024-02-13T12:18:14+09:00`).
pub fn kst_rfc3339_from_ms(ms: i64) -> String {
    kst(ms.div_euclid(1000) * 1000)
        .format(&::time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T09:00:00+09:00".to_owned())
}

/// Parses an RFC 3339 timestamp or, as Toss reads its query dates, a local
/// date-time without offset taken as KST; epoch ms, `None` when neither parses.
pub fn ms_from_rfc3339_or_kst(s: &str) -> Option<i64> {
    ms_from_rfc3339(s).or_else(|| ms_from_rfc3339(&format!("{s}+09:00")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kst_forms_round_trip_at_second_precision() {
        let ms = 1_707_794_294_123;
        assert_eq!(kst_local_from_ms(ms), "2024-02-13T12:18:14");
        assert_eq!(kst_rfc3339_from_ms(ms), "2024-02-13T12:18:14+09:00");
        assert_eq!(
            ms_from_rfc3339_or_kst(&kst_local_from_ms(ms)),
            Some(1_707_794_294_000)
        );
        assert_eq!(ms_from_rfc3339_or_kst("not a date"), None);
    }

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
