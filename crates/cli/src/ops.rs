//! What the operator commands (`payments`, `alerts`, `prune`) share: opening
//! the SQL database and the state store without the downstreams, and
//! printing times (in the operator's zone and UTC) and ages.

use std::sync::Arc;

use chrono::TimeZone;
use paygate_state_store::{SqlDatabase, StateStore};

/// The SQL database (migrated when `migrate_on_start`, else checked; see
/// [`paygate_payments::wiring::open_database`]) and the state store
/// the config selects; no card API, ledger or sandbox is started.
///
/// # Errors
/// The database or the store cannot be opened.
pub async fn open_stores(
    config: &paygate_core::Config,
) -> anyhow::Result<(SqlDatabase, Arc<dyn StateStore>)> {
    let db = paygate_payments::wiring::open_database(config, 2).await?;
    let store = paygate_payments::wiring::state_store(config, &db).await?;
    Ok((db, store))
}

/// The operator's time zone (`time_zone`, validated at load; UTC if it
/// somehow is not a zone).
pub fn zone(config: &paygate_core::Config) -> chrono_tz::Tz {
    config.time_zone.parse().unwrap_or(chrono_tz::UTC)
}

/// `2026-11-21 13:00:00 KST (04:00:00 UTC)`.
pub fn local_time(ms: i64, zone: chrono_tz::Tz) -> String {
    match chrono::Utc.timestamp_millis_opt(ms).single() {
        Some(t) => format!(
            "{} ({} UTC)",
            t.with_timezone(&zone).format("%Y-%m-%d %H:%M:%S %Z"),
            t.format("%H:%M:%S")
        ),
        None => ms.to_string(),
    }
}

/// How long ago `ms` was, coarsely: `42s`, `17m`, `5h`, `3d` (the
/// console shows ages the same way).
pub use paygate_console::pages::age;

/// `text` cut to `max` characters, with `…` when cut.
pub fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_show_the_zone_and_utc() {
        // 2023-11-14T22:13:20Z is 07:13:20 the next day in Seoul.
        let shown = local_time(1_700_000_000_000, chrono_tz::Asia::Seoul);
        assert_eq!(shown, "2023-11-15 07:13:20 KST (22:13:20 UTC)");
    }

    #[test]
    fn long_text_is_cut() {
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
    }
}
