//! What the pages show, read from the stores: a payment with its timeline,
//! a search, the alerts, the health. Every piece of free text is masked
//! here (I6), before a page sees it.

use chrono::TimeZone;
use futures_util::TryStreamExt;
use paygate_alert::Listing;
use paygate_core::{
    masking::{mask_text, scrub_json_for_display},
    Partition, PaymentId, PaymentRecord,
};
use paygate_state_store::StoreError;
use serde_json::Value;

use crate::{
    pages::{AlertLine, HealthView, PaymentView, SearchForm, SearchPage, TimelineEntry},
    routes::State,
};

/// Rows per search page.
pub const PAGE_SIZE: usize = 50;
/// A search without an id reads at most this many records of its date
/// range (per partition) before it stops and asks for a narrower range.
pub const SEARCH_READ_CAP: usize = 20_000;
/// The default search range when no date is given, ms.
const DEFAULT_RANGE_MS: i64 = 86_400_000;

/// The record with its free text masked for display.
pub fn masked(mut r: PaymentRecord) -> PaymentRecord {
    r.payment_key = mask_text(&r.payment_key);
    r.last_error = r.last_error.as_deref().map(mask_text);
    r.failure_code = r.failure_code.as_deref().map(mask_text);
    r
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

/// A payment's page, or `None` when no record has this id.
///
/// # Errors
/// [`StoreError`] of any store read.
pub async fn payment(
    s: &State,
    pid: &PaymentId,
    banner: Option<(String, String)>,
) -> Result<Option<PaymentView>, StoreError> {
    let c = &s.components;
    let Some((part, record)) = c.store.get(pid).await? else {
        return Ok(None);
    };
    let id = pid.as_str();
    let cancels = c.store.cancels_of(pid).await?;
    let balance = balance(&record, &cancels);
    let hold = c
        .inventory
        .hold_by_order(&record.merchant_id, &record.order_id)
        .await?
        .map(|h| {
            let lines: Vec<String> = h
                .items
                .iter()
                .map(|i| format!("{}×{}", mask_text(&i.sku), i.quantity))
                .collect();
            (
                h.hold_id.clone(),
                h.shown_state(paygate_core::time::now_ms()).to_owned(),
                lines.join(", "),
            )
        });
    let logs = paygate_api_log::SqlApiLog::new(c.db.clone())
        .for_payment(pid)
        .await?;
    let alerts = s.outbox.for_payment(id).await?;
    let resolutions = paygate_api_log::ResolutionLog::new(c.db.clone())
        .for_payment(id)
        .await?;
    let audit = s.audit.for_payment(id).await?;
    let mut events = s.events.for_payment(id).await?;
    // A MongoDB state store keeps an event in the payment's document until
    // the relay copies it into the table: show those too, once.
    for e in c.store.events_of(pid).await? {
        if !events.iter().any(|r| r.event.event_id == e.event_id) {
            events.push(paygate_webhooks::EventRow {
                event: e,
                seq: 0,
                delivery: "not relayed yet".into(),
                attempts: 0,
                next_at: 0,
                last_status: None,
                last_error: None,
            });
        }
    }

    let mut timeline = vec![TimelineEntry {
        at: record.created_at,
        source: "event",
        title: format!(
            "payment created for order {} ({} {})",
            record.order_id.as_str(),
            record.amount,
            record.currency
        ),
        detail: None,
    }];
    for e in &events {
        let mut title = format!(
            "{} (version {}",
            e.event.event_type.as_str(),
            e.event.version
        );
        if e.event.cancel_n > 0 {
            title.push_str(&format!(", cancel {}", e.event.cancel_n));
        }
        title.push_str(&format!(") · webhook {}", e.delivery));
        if e.attempts > 0 {
            title.push_str(&format!(" after {} tries", e.attempts));
        }
        timeline.push(TimelineEntry {
            at: e.event.created_at,
            source: "event",
            title,
            detail: e.last_error.as_deref().map(mask_text),
        });
    }
    for l in &logs {
        let mut body = l.body.clone();
        if let Some(b) = body.as_mut() {
            scrub_json_for_display(b);
        }
        let status = l
            .status_code
            .map_or_else(|| "-".to_owned(), |c| c.to_string());
        let latency = l
            .latency_ms
            .map(|ms| format!(" in {ms} ms"))
            .unwrap_or_default();
        timeline.push(TimelineEntry {
            at: l.created_at,
            source: "log",
            title: format!(
                "{} {} attempt {}: {} {} → {status}{latency}",
                l.target,
                l.kind,
                l.attempt,
                l.method,
                mask_text(&l.path)
            ),
            detail: body.as_ref().map(pretty),
        });
    }
    for a in &alerts {
        timeline.push(TimelineEntry {
            at: a.created_at,
            source: "alert",
            title: format!("alert #{} {} raised", a.id, a.reason),
            detail: Some(mask_text(&a.detail())),
        });
        for (at, what) in [
            (a.sent_at, "sent to Discord"),
            (a.parked_at, "parked (Discord refused it)"),
            (a.resolved_at, "resolved"),
        ] {
            if let Some(at) = at {
                timeline.push(TimelineEntry {
                    at,
                    source: "alert",
                    title: format!("alert #{} {what}", a.id),
                    detail: None,
                });
            }
        }
    }
    for r in &resolutions {
        let mut evidence = Value::String(r.entry.card_evidence.clone());
        scrub_json_for_display(&mut evidence);
        timeline.push(TimelineEntry {
            at: r.created_at,
            source: "operator",
            title: format!(
                "resolved {} by {}{}: {}",
                r.entry.action,
                r.entry.operator,
                if r.entry.forced { " (forced)" } else { "" },
                mask_text(&r.entry.reason)
            ),
            detail: evidence.as_str().map(str::to_owned),
        });
    }
    for a in &audit {
        timeline.push(TimelineEntry {
            at: a.created_at,
            source: "operator",
            title: format!("console {} by {}: {}", a.action, a.operator, a.outcome),
            detail: Some(a.detail.clone()),
        });
    }
    // Stable: entries of one millisecond keep the order they were added in
    // (the record, its events, the log, alerts, decisions).
    timeline.sort_by_key(|e| e.at);

    Ok(Some(PaymentView {
        partition: part.table().to_owned(),
        record: masked(record),
        cancels: cancels
            .iter()
            .map(|k| {
                (
                    k.n,
                    k.amount,
                    k.status.as_str().to_owned(),
                    mask_text(&k.reason),
                    k.canceled_at.clone(),
                )
            })
            .collect(),
        balance,
        hold,
        alerts: alerts
            .iter()
            .map(|a| (a.id, a.reason.clone(), a.state().to_owned()))
            .collect(),
        timeline,
        banner,
        cancels_seen: cancels.len(),
    }))
}

/// What is left to cancel of a paid payment, minor units: its amount less
/// every cancel not failed (a pending or unknown one may have happened);
/// 0 for one not paid.
pub fn balance(record: &PaymentRecord, cancels: &[paygate_state_store::CancelRecord]) -> i64 {
    if !record.is_paid {
        return 0;
    }
    let taken: i64 = cancels
        .iter()
        .filter(|k| k.status != paygate_state_store::CancelStatus::Failed)
        .map(|k| k.amount)
        .sum();
    (record.amount - taken).max(0)
}

/// `YYYY-MM-DD` at midnight in `zone`, epoch ms.
fn day_start(day: &str, zone: chrono_tz::Tz) -> Option<i64> {
    let date = chrono::NaiveDate::parse_from_str(day.trim(), "%Y-%m-%d").ok()?;
    let midnight = date.and_hms_opt(0, 0, 0)?;
    zone.from_local_datetime(&midnight)
        .earliest()
        .map(|t| t.timestamp_millis())
}

/// The page cursor `<created ms>.<paymentId>`.
fn cursor(r: &PaymentRecord) -> String {
    format!("{}.{}", r.created_at, r.payment_id.as_str())
}

fn parse_cursor(c: &str) -> Option<(i64, String)> {
    let (ms, id) = c.split_once('.')?;
    Some((ms.parse().ok()?, id.to_owned()))
}

/// Runs a search. A payment id or an order id is looked up directly (in
/// every partition, whatever the other fields say); otherwise the date
/// range (default: the last 24 hours) is read in creation order, filtered by
/// merchant, status and payment key, [`PAGE_SIZE`] rows a page.
///
/// # Errors
/// [`StoreError`].
pub async fn search(s: &State, form: &SearchForm) -> Result<SearchPage, StoreError> {
    let store = &s.components.store;
    let zone = s.settings.zone;
    let by_id = |found: Vec<(Partition, PaymentRecord)>| SearchPage {
        rows: found
            .into_iter()
            .map(|(p, r)| (p.table().to_owned(), masked(r)))
            .collect(),
        next: None,
        note: None,
    };
    let payment_id = form.payment_id.trim();
    if !payment_id.is_empty() {
        let found = store.get(&PaymentId::from_stored(payment_id)).await?;
        return Ok(by_id(found.into_iter().collect()));
    }
    let order_id = form.order_id.trim();
    if !order_id.is_empty() {
        let found = store.find_by_order_ids(&[order_id.to_owned()]).await?;
        let merchant = form.merchant.trim();
        return Ok(by_id(
            found
                .into_iter()
                .filter(|(_, r)| merchant.is_empty() || r.merchant_id.as_str() == merchant)
                .collect(),
        ));
    }
    let now = paygate_core::time::now_ms();
    let mut note = None;
    let to_ms = match form.to.trim() {
        "" => now + 1,
        day => match day_start(day, zone) {
            Some(ms) => ms + 86_400_000,
            None => {
                note = Some(format!(
                    "{day:?} is not a date (YYYY-MM-DD); searching up to now"
                ));
                now + 1
            }
        },
    };
    let from_ms = match form.from.trim() {
        "" => to_ms - DEFAULT_RANGE_MS,
        day => day_start(day, zone).unwrap_or_else(|| {
            note = Some(format!(
                "{day:?} is not a date (YYYY-MM-DD); searching the last 24 hours"
            ));
            to_ms - DEFAULT_RANGE_MS
        }),
    };
    let after = parse_cursor(form.after.trim());
    let merchant = form.merchant.trim();
    let status = form.status.trim();
    let key = form.payment_key.trim();
    let mut rows: Vec<(Partition, PaymentRecord)> = Vec::new();
    let mut capped = false;
    for part in Partition::ALL {
        let start = after.as_ref().map_or(from_ms, |(ms, _)| (*ms).max(from_ms));
        let mut stream = store.scan_created(part, start, to_ms, 500);
        let mut read = 0usize;
        let mut kept = 0usize;
        while let Some(r) = stream.try_next().await? {
            read += 1;
            if read > SEARCH_READ_CAP {
                capped = true;
                break;
            }
            if let Some((ms, id)) = &after {
                if (r.created_at, r.payment_id.as_str()) <= (*ms, id.as_str()) {
                    continue;
                }
            }
            let hit = (merchant.is_empty() || r.merchant_id.as_str() == merchant)
                && (status.is_empty() || r.card_status.as_str() == status)
                && (key.is_empty() || r.payment_key == key);
            if hit {
                rows.push((part, r));
                kept += 1;
                if kept > PAGE_SIZE {
                    break;
                }
            }
        }
    }
    rows.sort_by(|a, b| {
        (a.1.created_at, a.1.payment_id.as_str()).cmp(&(b.1.created_at, b.1.payment_id.as_str()))
    });
    let more = rows.len() > PAGE_SIZE;
    rows.truncate(PAGE_SIZE);
    let next = if more {
        rows.last().map(|(_, r)| cursor(r))
    } else {
        None
    };
    if capped {
        note = Some(format!(
            "stopped after reading {SEARCH_READ_CAP} records of one partition: narrow the dates or add a payment id or order id"
        ));
    }
    Ok(SearchPage {
        rows: rows
            .into_iter()
            .map(|(p, r)| (p.table().to_owned(), masked(r)))
            .collect(),
        next,
        note: note.or_else(|| {
            Some(format!(
                "Created {} to {}, oldest first.",
                crate::pages::when(from_ms, zone),
                crate::pages::when(to_ms - 1, zone)
            ))
        }),
    })
}

/// The Alerts page's rows: `which` is `all`, `unsent` or `parked`.
///
/// # Errors
/// [`StoreError`].
pub async fn alerts(s: &State, which: &str) -> Result<Vec<AlertLine>, StoreError> {
    let listing = match which {
        "unsent" => Listing::Unsent,
        "parked" => Listing::Parked,
        _ => Listing::All,
    };
    Ok(s.outbox
        .list_newest(listing, 200)
        .await?
        .into_iter()
        .map(|a| AlertLine {
            id: a.id,
            state: a.state().to_owned(),
            detail: mask_text(&a.detail()),
            reason: a.reason,
            payment_id: a.payment_id.as_deref().map(mask_text),
            raised_at: a.created_at,
            attempts: a.attempts,
            last_error: a.last_error.as_deref().map(mask_text),
        })
        .collect())
}

/// The Health page's data.
///
/// # Errors
/// [`StoreError`].
pub async fn health(s: &State) -> Result<HealthView, StoreError> {
    Ok(HealthView {
        replicas: s.replicas.all().await?,
        outbox: (
            s.outbox.unsent_count().await?,
            s.outbox.parked_count().await?,
        ),
        events: s.events.backlog().await?,
        jobs: s.jobs.latest().await?,
    })
}
