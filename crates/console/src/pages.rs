//! The console's HTML: one function per page, rendered with maud (every
//! interpolated value is escaped). Plain links and forms, no script: each
//! page works with a keyboard alone (a skip link, the browser's own focus
//! order, visible focus rings) and fits a laptop screen.
//!
//! Nothing secret reaches these functions: records arrive masked, log
//! bodies scrubbed (I6), and no page is given the configuration, a
//! merchant's API key or webhook URL, or the card company's key.

use chrono::TimeZone;
use maud::{html, Markup, DOCTYPE};
use paygate_core::PaymentRecord;
use serde_json::Value;

use crate::{operators::Role, sessions::Session};

/// The style sheet, served at `/console.css`.
pub const CSS: &str = r#"
:root { color-scheme: light; --fg:#1b1f24; --muted:#57606a; --line:#d0d7de; --bg:#ffffff; --tint:#f6f8fa; --bad:#b42318; --ok:#1a7f37; --warn:#9a6700; --link:#0550ae; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color:var(--fg); background:var(--bg); }
a { color:var(--link); }
a:focus, button:focus, input:focus, select:focus, textarea:focus { outline:3px solid #fb8c00; outline-offset:2px; }
.skip { position:absolute; left:-999px; } .skip:focus { left:8px; top:8px; background:#fff; padding:4px 8px; }
header { background:#24292f; color:#fff; padding:8px 20px; display:flex; align-items:center; gap:24px; flex-wrap:wrap; }
header a { color:#fff; text-decoration:none; padding:4px 6px; border-radius:4px; }
header a[aria-current=page] { background:#57606a; }
header nav ul { list-style:none; display:flex; gap:6px; margin:0; padding:0; flex-wrap:wrap; }
.brand { font-weight:700; }
.who { margin-left:auto; display:flex; gap:8px; align-items:center; }
main { padding:16px 20px 40px; max-width:1400px; }
h1 { font-size:1.4em; margin:4px 0 12px; } h2 { font-size:1.1em; margin:20px 0 8px; }
table { border-collapse:collapse; width:100%; margin:6px 0 12px; }
th, td { border-bottom:1px solid var(--line); padding:5px 8px; text-align:left; vertical-align:top; }
th { background:var(--tint); font-weight:600; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
code, pre, .mono { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size:0.92em; }
pre { background:var(--tint); border:1px solid var(--line); padding:6px 8px; overflow:auto; max-height:240px; margin:4px 0; white-space:pre-wrap; word-break:break-all; }
dl.facts { display:grid; grid-template-columns: max-content 1fr; gap:2px 16px; margin:0; }
dl.facts dt { color:var(--muted); } dl.facts dd { margin:0; }
.badge { display:inline-block; padding:0 6px; border-radius:10px; border:1px solid var(--line); font-size:0.85em; background:var(--tint); }
.badge.bad { color:var(--bad); border-color:var(--bad); } .badge.ok { color:var(--ok); border-color:var(--ok); } .badge.warn { color:var(--warn); border-color:var(--warn); }
.cols { display:grid; grid-template-columns: repeat(auto-fit, minmax(360px, 1fr)); gap:16px; }
.card { border:1px solid var(--line); border-radius:6px; padding:10px 14px; }
form.inline { display:inline; }
form.stack { display:grid; gap:6px; max-width:520px; align-content:start; }
label { font-weight:600; }
input[type=text], input[type=password], input[type=search], input[type=date], input[type=number], select, textarea { font:inherit; padding:4px 6px; border:1px solid var(--line); border-radius:4px; }
textarea { min-height:3.2em; }
button { font:inherit; padding:4px 12px; border-radius:4px; border:1px solid #8c959f; background:#f6f8fa; cursor:pointer; }
button.primary { background:#1f883d; color:#fff; border-color:#1a7f37; } button.danger { background:#fff; color:var(--bad); border-color:var(--bad); }
.note { padding:8px 12px; border-left:4px solid var(--link); background:var(--tint); margin:8px 0; }
.note.bad { border-color:var(--bad); } .note.ok { border-color:var(--ok); }
.muted { color:var(--muted); }
ol.timeline { list-style:none; padding:0; margin:0; }
ol.timeline li { border-left:3px solid var(--line); padding:4px 0 6px 12px; margin-left:4px; }
ol.timeline li.event { border-color:#0550ae; } ol.timeline li.alert { border-color:var(--bad); } ol.timeline li.operator { border-color:var(--ok); }
.search { display:flex; flex-wrap:wrap; gap:8px 12px; align-items:end; } .search div { display:grid; }
"#;

/// Where a page sits in the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    /// The Problems page.
    Problems,
    /// Search.
    Search,
    /// Alerts.
    Alerts,
    /// Reconciliation.
    Reconciliation,
    /// Health.
    Health,
    /// Operators (admins).
    Operators,
    /// Not in the navigation (a payment, login).
    None,
}

const NAV: &[(Nav, &str, &str)] = &[
    (Nav::Problems, "/problems", "Problems"),
    (Nav::Search, "/search", "Search"),
    (Nav::Alerts, "/alerts", "Alerts"),
    (Nav::Reconciliation, "/reconciliation", "Reconciliation"),
    (Nav::Health, "/health", "Health"),
    (Nav::Operators, "/operators", "Operators"),
];

/// `2026-12-08 13:00:00 KST` in the operator's zone.
pub fn when(ms: i64, zone: chrono_tz::Tz) -> String {
    match chrono::Utc.timestamp_millis_opt(ms).single() {
        Some(t) => t
            .with_timezone(&zone)
            .format("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
        None => ms.to_string(),
    }
}

/// How long ago `ms` was: `42s`, `17m`, `5h`, `3d`.
pub fn age(ms: i64) -> String {
    let secs = (paygate_core::time::now_ms() - ms).max(0) / 1000;
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7_200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3_600),
        s => format!("{}d", s / 86_400),
    }
}

/// `15,000` (minor units, grouped).
pub fn amount(v: i64) -> String {
    let digits = v.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if v < 0 {
        format!("-{out}")
    } else {
        out
    }
}

/// The link to a payment's page.
pub fn payment_href(id: &str) -> String {
    format!("/payments/{}", percent(id))
}

/// Percent-encodes `s` for a path segment or a query value (everything
/// but RFC 3986's unreserved characters), as the alert links do.
pub fn percent(s: &str) -> String {
    paygate_alert::discord::percent(s)
}

fn status_class(status: &str) -> &'static str {
    match status {
        "DONE" | "delivered" | "sent" | "closed" | "ok" => "ok",
        "UNKNOWN" | "ABORTED" | "parked" | "failed" | "open" | "forced_open" | "refused" => "bad",
        "PENDING" | "pending" | "half_open" => "warn",
        _ => "",
    }
}

/// A status badge.
pub fn badge(status: &str) -> Markup {
    html! { span class=(format!("badge {}", status_class(status))) { (status) } }
}

/// The page around `body`: navigation for a logged-in operator, the
/// operator's name and role, and a logout form.
pub fn layout(title: &str, session: Option<&Session>, current: Nav, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · paygate console" }
                link rel="stylesheet" href="/console.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    span.brand { "paygate console" }
                    @if let Some(s) = session {
                        nav aria-label="Console" {
                            ul {
                                @for (nav, href, label) in NAV {
                                    @if *nav != Nav::Operators || s.may(Role::Admin) {
                                        li { a href=(href) aria-current=[(current == *nav).then_some("page")] { (label) } }
                                    }
                                }
                            }
                        }
                        form.who method="post" action="/logout" {
                            span { (s.operator.name) " · " (s.operator.role.as_str()) }
                            input type="hidden" name="csrf" value=(s.csrf());
                            button type="submit" { "Log out" }
                        }
                    }
                }
                main id="main" tabindex="-1" {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// A page that sends the browser on to `to` at once (a same-site hop; see
/// the routes' `no_session`), with a link for a browser that does not.
pub fn hop(to: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta http-equiv="refresh" content=(format!("0;url={to}"));
                title { "paygate console" }
            }
            body { p { a href=(to) { "Log in to the console" } } }
        }
    }
}

/// The login page; `error` is shown above the form; `next` is where a
/// successful login goes.
pub fn login(csrf: &str, error: Option<&str>, name: &str, next: &str) -> Markup {
    layout(
        "Log in",
        None,
        Nav::None,
        html! {
            @if let Some(e) = error { p.note.bad role="alert" { (e) } }
            form.stack method="post" action="/login" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                label for="name" { "Operator name" }
                input #name type="text" name="name" value=(name) autocomplete="username" required autofocus;
                label for="password" { "Password" }
                input #password type="password" name="password" autocomplete="current-password" required;
                div { button.primary type="submit" { "Log in" } }
            }
        },
    )
}

/// A refusal or failure page (403, 404, 429, 503).
pub fn message(title: &str, session: Option<&Session>, text: &str) -> Markup {
    layout(
        title,
        session,
        Nav::None,
        html! { p.note.bad role="alert" { (text) } p { a href="/problems" { "Back to Problems" } } },
    )
}

/// The most problems one page shows (an outage can leave thousands; the
/// page stays readable and small, and says how many there are).
pub const PROBLEMS_SHOWN: usize = 500;

/// A replica that has not reported for this long is left off the Health
/// page (it was scaled away or renamed), ms; the page counts them.
pub const GONE_AFTER_MS: i64 = 86_400_000;

/// The Problems page (see [`paygate_payments::Problem`]).
pub fn problems(
    session: &Session,
    rows: &[paygate_payments::Problem],
    stale_minutes: u64,
) -> Markup {
    layout(
        "Problems",
        Some(session),
        Nav::Problems,
        html! {
            p.muted {
                "Unknown outcomes, paid but unsaved, PENDING with no change for " (stale_minutes)
                " minutes, and unresolved mismatch, oversold and stuck-cancel alerts; newest first."
            }
            @if rows.is_empty() {
                p.note.ok { "No problems." }
            } @else {
                @if rows.len() > PROBLEMS_SHOWN {
                    p.note.bad role="status" {
                        (rows.len()) " problems; the newest " (PROBLEMS_SHOWN) " are shown ("
                        code { "paygate payments list --problems --limit " (rows.len()) } " lists all)."
                    }
                }
                table {
                    thead { tr { th { "Kind" } th { "Age" } th { "Payment" } th { "Merchant" } th { "Order" } th.num { "Amount" } th { "Status" } th { "Reason" } } }
                    tbody {
                        @for p in rows.iter().take(PROBLEMS_SHOWN) {
                            tr {
                                td { (badge(p.kind)) }
                                td title=(p.since_ms.to_string()) { (age(p.since_ms)) }
                                td.mono {
                                    @if p.payment_id.starts_with("pay_") {
                                        a href=(payment_href(&p.payment_id)) { (p.payment_id) }
                                    } @else { (p.payment_id) }
                                }
                                td.mono { (p.merchant_id) }
                                td.mono { (p.order_id) }
                                td.num { (p.amount.map(amount).unwrap_or_default()) }
                                td { (p.status) }
                                td { (p.detail) }
                            }
                        }
                    }
                }
            }
        },
    )
}

/// The values of the search form, as typed.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct SearchForm {
    /// `pay_...`.
    #[serde(default)]
    pub payment_id: String,
    /// The merchant's orderId.
    #[serde(default)]
    pub order_id: String,
    /// The card company's paymentKey.
    #[serde(default)]
    pub payment_key: String,
    /// `mer_...`.
    #[serde(default)]
    pub merchant: String,
    /// A card status (`PENDING`, `DONE`, ...) or empty.
    #[serde(default)]
    pub status: String,
    /// First day (`YYYY-MM-DD`, operator's zone), inclusive.
    #[serde(default)]
    pub from: String,
    /// Last day (`YYYY-MM-DD`), inclusive.
    #[serde(default)]
    pub to: String,
    /// The page cursor (`<created ms>.<paymentId>` of the last row shown).
    #[serde(default)]
    pub after: String,
}

impl SearchForm {
    /// The query string of this search, for the next page's link.
    pub fn query_after(&self, after: &str) -> String {
        let pairs = [
            ("payment_id", &self.payment_id),
            ("order_id", &self.order_id),
            ("payment_key", &self.payment_key),
            ("merchant", &self.merchant),
            ("status", &self.status),
            ("from", &self.from),
            ("to", &self.to),
        ];
        let mut q: Vec<String> = pairs
            .iter()
            .filter(|(_, v)| !v.is_empty())
            .map(|(k, v)| format!("{k}={}", percent(v)))
            .collect();
        q.push(format!("after={}", percent(after)));
        q.join("&")
    }
}

/// A search's result page.
pub struct SearchPage {
    /// Rows, `(partition table, record)`.
    pub rows: Vec<(String, PaymentRecord)>,
    /// The cursor of the next page, when there is one.
    pub next: Option<String>,
    /// A note (the range read, a cap reached, a bad input).
    pub note: Option<String>,
}

const STATUSES: &[&str] = &["PENDING", "UNKNOWN", "DONE", "ABORTED", "CANCELED"];

/// The Search page.
pub fn search(
    session: &Session,
    form: &SearchForm,
    page: &SearchPage,
    zone: chrono_tz::Tz,
) -> Markup {
    layout(
        "Search",
        Some(session),
        Nav::Search,
        html! {
            form.search method="get" action="/search" role="search" {
                div { label for="payment_id" { "Payment id" } input #payment_id type="search" name="payment_id" value=(form.payment_id) placeholder="pay_…"; }
                div { label for="order_id" { "Order id" } input #order_id type="search" name="order_id" value=(form.order_id); }
                div { label for="payment_key" { "Payment key" } input #payment_key type="search" name="payment_key" value=(form.payment_key); }
                div { label for="merchant" { "Merchant" } input #merchant type="search" name="merchant" value=(form.merchant) placeholder="mer_…"; }
                div {
                    label for="status" { "Status" }
                    select #status name="status" {
                        option value="" selected[form.status.is_empty()] { "any" }
                        @for s in STATUSES { option value=(s) selected[form.status == *s] { (s) } }
                    }
                }
                div { label for="from" { "From" } input #from type="date" name="from" value=(form.from); }
                div { label for="to" { "To" } input #to type="date" name="to" value=(form.to); }
                div { button.primary type="submit" { "Search" } }
            }
            @if let Some(n) = &page.note { p.note { (n) } }
            @if page.rows.is_empty() {
                p.muted { "No payment matches." }
            } @else {
                table {
                    thead { tr { th { "Created" } th { "Payment" } th { "Merchant" } th { "Order" } th { "Payment key" } th.num { "Amount" } th { "Status" } th { "Paid" } th { "Saved" } th { "Where" } } }
                    tbody {
                        @for (part, r) in &page.rows {
                            tr {
                                td { (when(r.created_at, zone)) }
                                td.mono { a href=(payment_href(r.payment_id.as_str())) { (r.payment_id.as_str()) } }
                                td.mono { (r.merchant_id.as_str()) }
                                td.mono { (r.order_id.as_str()) }
                                td.mono { (r.payment_key) }
                                td.num { (amount(r.amount)) " " (r.currency) }
                                td { (badge(r.card_status.as_str())) }
                                td { (yes(r.is_paid)) }
                                td { (yes(r.is_saved)) }
                                td { (part) }
                            }
                        }
                    }
                }
                @if let Some(next) = &page.next {
                    p { a href=(format!("/search?{}", form.query_after(next))) rel="next" { "Next page →" } }
                }
            }
        },
    )
}

fn yes(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// One entry of a payment's timeline.
#[derive(Clone, Debug)]
pub struct TimelineEntry {
    /// Epoch ms.
    pub at: i64,
    /// `event`, `log`, `alert`, `resolution` or `operator`.
    pub source: &'static str,
    /// One line.
    pub title: String,
    /// The log body or the detail (masked), shown preformatted.
    pub detail: Option<String>,
}

/// Everything the payment page shows.
pub struct PaymentView {
    /// The record's partition table.
    pub partition: String,
    /// The record (its free text masked).
    pub record: PaymentRecord,
    /// Its cancels: `(n, amount, status, reason, canceled at)`.
    pub cancels: Vec<(i64, i64, String, String, Option<String>)>,
    /// What is left to cancel, minor units.
    pub balance: i64,
    /// Its hold: `(hold id, state, lines "sku×qty")`.
    pub hold: Option<(String, String, String)>,
    /// Alerts that may be resent: `(id, reason, state)`.
    pub alerts: Vec<(i64, String, String)>,
    /// In time order.
    pub timeline: Vec<TimelineEntry>,
    /// The outcome of the action just taken (an audit row's outcome and
    /// detail).
    pub banner: Option<(String, String)>,
    /// How many cancels the page shows (the cancel form carries it, with
    /// the balance: a cancel of a payment changed since is refused).
    pub cancels_seen: usize,
}

/// The Payment page: state, amounts, cancels, hold, the actions the state
/// and the role allow, and the timeline.
pub fn payment(session: &Session, v: &PaymentView, zone: chrono_tz::Tz) -> Markup {
    let r = &v.record;
    let pid = r.payment_id.as_str();
    let open = v.partition == "realtime_payments"
        && !r.is_paid
        && matches!(r.card_status.as_str(), "PENDING" | "UNKNOWN");
    let may_act = session.may(Role::Operator);
    let cancelable = r.is_paid && v.balance > 0;
    let body = html! {
            @if let Some((outcome, detail)) = &v.banner {
                p class=(format!("note {}", if outcome == "ok" { "ok" } else { "bad" })) role="status" { (outcome) ": " (detail) }
            }
            div.cols {
                section.card aria-labelledby="state" {
                    h2 #state { "State" }
                    dl.facts {
                        dt { "Status" } dd { (badge(r.card_status.as_str())) " paid " (yes(r.is_paid)) ", saved " (yes(r.is_saved)) }
                        dt { "Where" } dd { (v.partition) }
                        dt { "Merchant" } dd.mono { (r.merchant_id.as_str()) }
                        dt { "Order" } dd.mono { (r.order_id.as_str()) }
                        dt { "Payment key" } dd.mono { (r.payment_key) }
                        dt { "Amount" } dd { (amount(r.amount)) " " (r.currency) " (minor units)" }
                        dt { "Left to cancel" } dd { (amount(v.balance)) }
                        dt { "Approved at" } dd { (r.approved_at.clone().unwrap_or_else(|| "-".into())) }
                        dt { "Failure" } dd { (r.failure_code.clone().unwrap_or_else(|| "-".into())) }
                        dt { "Last error" } dd { (r.last_error.clone().unwrap_or_else(|| "-".into())) }
                        dt { "Ledger tries" } dd { (r.save_attempts) " (batch " (r.batch_attempts) ")" }
                        dt { "Created" } dd { (when(r.created_at, zone)) }
                        dt { "Updated" } dd { (when(r.updated_at, zone)) " (" (age(r.updated_at)) " ago)" }
                        dt { "Version" } dd { (r.version) }
                    }
                }
                section.card aria-labelledby="money" {
                    h2 #money { "Cancels and hold" }
                    @if v.cancels.is_empty() { p.muted { "No cancels." } } @else {
                        table {
                            thead { tr { th { "#" } th.num { "Amount" } th { "Status" } th { "Reason" } th { "Canceled at" } } }
                            tbody { @for (n, amt, status, reason, at) in &v.cancels {
                                tr { td { (n) } td.num { (amount(*amt)) } td { (badge(status)) } td { (reason) } td { (at.clone().unwrap_or_else(|| "-".into())) } }
                            } }
                        }
                    }
                    @match &v.hold {
                        Some((id, state, lines)) => { p { "Hold " code { (id) } " " (badge(state)) " " (lines) } }
                        None => { p.muted { "No inventory hold." } }
                    }
                }
            }
            section aria-labelledby="actions" {
                h2 #actions { "Actions" }
                @if !may_act {
                    p.muted { "Your role (" (session.operator.role.as_str()) ") reads only." }
                } @else {
                    div.cols {
                        @if v.partition == "realtime_payments" {
                            form.card.stack method="post" action=(format!("{}/recheck", payment_href(pid))) {
                                input type="hidden" name="csrf" value=(session.csrf());
                                strong { "Recheck at the card company" }
                                span.muted { "Settles it now by lookup, exactly as the batch would." }
                                div { button type="submit" { "Recheck" } }
                            }
                        }
                        @if open {
                            form.card.stack #resolve method="post" action=(format!("{}/resolve", payment_href(pid))) {
                                input type="hidden" name="csrf" value=(session.csrf());
                                input type="hidden" name="version" value=(r.version);
                                strong { "Resolve by hand" }
                                span.muted { "After checking the card company's console. A decision the card company's lookup contradicts is refused unless overridden." }
                                label for="resolve-reason" { "Reason" }
                                textarea #resolve-reason name="reason" required maxlength="500" {}
                                label { input type="checkbox" name="force" value="on"; " Override a contradicting lookup" }
                                div {
                                    button.primary type="submit" name="decision" value="approved" { "Resolve: approved" }
                                    " "
                                    button.danger type="submit" name="decision" value="not_charged" { "Resolve: not charged" }
                                }
                            }
                        }
                        @if cancelable {
                            form.card.stack method="post" action=(format!("{}/cancel", payment_href(pid))) {
                                input type="hidden" name="csrf" value=(session.csrf());
                                input type="hidden" name="seen_cancels" value=(v.cancels_seen);
                                input type="hidden" name="seen_balance" value=(v.balance);
                                strong { "Cancel (refund)" }
                                label for="cancel-amount" { "Amount (minor units; empty cancels all " (amount(v.balance)) ")" }
                                input #cancel-amount type="number" name="amount" min="1" max=(v.balance);
                                label for="cancel-reason" { "Reason" }
                                input #cancel-reason type="text" name="reason" required maxlength="200";
                                div { button.danger type="submit" { "Cancel payment" } }
                            }
                        }
                        @if !v.alerts.is_empty() {
                            div.card {
                                strong { "Alerts" }
                                ul { @for (id, reason, state) in &v.alerts {
                                    li {
                                        "#" (id) " " (reason) " " (badge(state)) " "
                                        form.inline method="post" action=(format!("/alerts/{id}/resend")) {
                                            input type="hidden" name="csrf" value=(session.csrf());
                                            input type="hidden" name="back" value=(payment_href(pid));
                                            button type="submit" { "Resend" }
                                        }
                                    }
                                } }
                            }
                        }
                    }
                }
            }
            section aria-labelledby="timeline" {
                h2 #timeline { "Timeline" }
                ol.timeline {
                    @for e in &v.timeline {
                        li class=(e.source) {
                            span.muted { (when(e.at, zone)) } " " span.badge { (e.source) } " " (e.title)
                            @if let Some(d) = &e.detail { pre { (d) } }
                        }
                    }
                }
            }
    };
    layout(&format!("Payment {pid}"), Some(session), Nav::None, body)
}

/// One row of the Alerts page.
pub struct AlertLine {
    /// Outbox id.
    pub id: i64,
    /// `pending`, `sent`, `parked` or `resolved`.
    pub state: String,
    /// The alert's reason.
    pub reason: String,
    /// The payment, if any.
    pub payment_id: Option<String>,
    /// Epoch ms.
    pub raised_at: i64,
    /// Delivery tries.
    pub attempts: i32,
    /// The detail, masked.
    pub detail: String,
    /// Why the last try failed, masked.
    pub last_error: Option<String>,
}

/// The Alerts page: the outbox, newest first, with resend.
pub fn alerts(
    session: &Session,
    which: &str,
    rows: &[AlertLine],
    counts: (i64, i64),
    zone: chrono_tz::Tz,
) -> Markup {
    let may_act = session.may(Role::Operator);
    layout(
        "Alerts",
        Some(session),
        Nav::Alerts,
        html! {
            p {
                "Pending " strong { (counts.0) } ", parked " strong { (counts.1) } ". Show: "
                @for (key, label) in [("all", "all"), ("unsent", "not delivered"), ("parked", "parked")] {
                    a href=(format!("/alerts?show={key}")) aria-current=[(which == key).then_some("true")] { (label) } " "
                }
            }
            @if rows.is_empty() { p.muted { "No alerts." } } @else {
                table {
                    thead { tr { th { "#" } th { "State" } th { "Reason" } th { "Payment" } th { "Raised" } th.num { "Tries" } th { "Detail" } @if may_act { th { "" } } } }
                    tbody { @for a in rows {
                        tr {
                            td { (a.id) }
                            td { (badge(&a.state)) }
                            td { (a.reason) }
                            td.mono { @match &a.payment_id {
                                Some(p) if p.starts_with("pay_") => { a href=(payment_href(p)) { (p) } }
                                Some(p) => { (p) }
                                None => { "-" }
                            } }
                            td { (when(a.raised_at, zone)) }
                            td.num { (a.attempts) }
                            td { (a.detail) @if let Some(e) = &a.last_error { br; span.muted { "last error: " (e) } } }
                            @if may_act { td {
                                form.inline method="post" action=(format!("/alerts/{}/resend", a.id)) {
                                    input type="hidden" name="csrf" value=(session.csrf());
                                    input type="hidden" name="back" value=(format!("/alerts?show={which}"));
                                    button type="submit" { "Resend" }
                                }
                            } }
                        }
                    } }
                }
            }
        },
    )
}

fn summary_cells(keys: &[&str], summary: &Value) -> Markup {
    html! {
        @for k in keys {
            td.num { (summary.get(*k).map(|v| v.to_string()).unwrap_or_else(|| "-".into())) }
        }
    }
}

/// The reconciliation columns shown (the run summary's keys).
const RECONCILE_KEYS: &[&str] = &[
    "transactions",
    "matched",
    "recovered",
    "cancelled",
    "alerts",
    "failures",
    "deferred",
    "duration_ms",
];
/// The batch columns shown.
const BATCH_KEYS: &[&str] = &[
    "scanned",
    "completed",
    "unpaid",
    "settled",
    "saved",
    "alerts",
    "failures",
    "deferred",
];

/// The Reconciliation page: the last runs of the reconciliation and of the
/// batch, with their counts.
pub fn reconciliation(
    session: &Session,
    reconcile: &[(i64, Value)],
    batch: &[(i64, Value)],
    zone: chrono_tz::Tz,
) -> Markup {
    layout(
        "Reconciliation",
        Some(session),
        Nav::Reconciliation,
        html! {
            p.muted { "Each run matches paygate's records against the card company's transaction list: recovered approvals paygate had not recorded, cancelled approvals nobody ordered, and alerted what needs a person." }
            h2 { "Reconciliation runs" }
            @if reconcile.is_empty() { p.muted { "No run yet." } } @else {
                table {
                    thead { tr { th { "Finished" } @for k in RECONCILE_KEYS { th.num { (k) } } } }
                    tbody { @for (at, s) in reconcile { tr { td { (when(*at, zone)) } (summary_cells(RECONCILE_KEYS, s)) } } }
                }
            }
            h2 { "Batch runs" }
            @if batch.is_empty() { p.muted { "No run yet." } } @else {
                table {
                    thead { tr { th { "Finished" } @for k in BATCH_KEYS { th.num { (k) } } } }
                    tbody { @for (at, s) in batch { tr { td { (when(*at, zone)) } (summary_cells(BATCH_KEYS, s)) } } }
                }
            }
        },
    )
}

/// What the Health page shows.
pub struct HealthView {
    /// `(replica, reported at, snapshot)`.
    pub replicas: Vec<(String, i64, Value)>,
    /// Alert outbox: pending, parked.
    pub outbox: (i64, i64),
    /// Merchant events: unnumbered, pending delivery.
    pub events: (i64, i64),
    /// Last runs: `(job, finished at, summary)`.
    pub jobs: Vec<(String, i64, Value)>,
}

/// A replica whose last report is older than this is shown as silent, ms.
pub const SILENT_AFTER_MS: i64 = 30_000;

/// The Health page.
pub fn health(session: &Session, v: &HealthView, zone: chrono_tz::Tz) -> Markup {
    let now = paygate_core::time::now_ms();
    layout(
        "Health",
        Some(session),
        Nav::Health,
        html! {
            h2 { "Replicas" }
            p.muted { "Each serve replica reports its circuit breakers and bulkheads every few seconds; one silent for 30 s is marked." }
            @let gone = v.replicas.iter().filter(|(_, at, _)| now - at > GONE_AFTER_MS).count();
            @if gone > 0 {
                p.muted { (gone) " replica(s) silent for over a day are not shown (" code { "replica_status" } " keeps their last report)." }
            }
            @if v.replicas.len() == gone { p.muted { "No replica has reported in the last day." } } @else {
                table {
                    thead { tr { th { "Replica" } th { "Last report" } th { "Downstream" } th { "Circuit breaker" } th.num { "Bulkhead in use" } th.num { "Ledger retries pending" } } }
                    tbody {
                        @for (name, at, snap) in v.replicas.iter().filter(|(_, at, _)| now - at <= GONE_AFTER_MS) {
                            @let silent = now - at > SILENT_AFTER_MS;
                            @let downstreams = snap.get("downstreams").and_then(Value::as_array).cloned().unwrap_or_default();
                            @for d in &downstreams {
                                tr {
                                    td.mono { (name) }
                                    td { (age(*at)) " ago" @if silent { " " (badge("silent")) } }
                                    td { (d.get("name").and_then(Value::as_str).unwrap_or("-")) }
                                    td { (badge(d.get("breaker").and_then(Value::as_str).unwrap_or("-"))) }
                                    td.num { (d.get("bulkheadInUse").map(Value::to_string).unwrap_or_default()) " / " (d.get("bulkheadMax").map(Value::to_string).unwrap_or_default()) }
                                    td.num { (snap.get("ledgerRetriesPending").map(Value::to_string).unwrap_or_default()) }
                                }
                            }
                        }
                    }
                }
            }
            div.cols {
                section.card {
                    h2 { "Alert outbox" }
                    p { "Pending " strong { (v.outbox.0) } ", parked " strong { (v.outbox.1) } ". " a href="/alerts?show=unsent" { "See them" } }
                }
                section.card {
                    h2 { "Merchant events" }
                    p { "Not numbered yet " strong { (v.events.0) } ", pending delivery " strong { (v.events.1) } "." }
                }
                section.card {
                    h2 { "Last jobs" }
                    @if v.jobs.is_empty() { p.muted { "No batch or reconciliation run yet." } }
                    ul { @for (job, at, _) in &v.jobs { li { (job) ": " (when(*at, zone)) " (" (age(*at)) " ago)" } } }
                }
            }
        },
    )
}

/// The Operators page (admins): the accounts, a form to create one, and
/// a disable button per enabled account.
pub fn operators(
    session: &Session,
    rows: &[crate::operators::Operator],
    note: Option<&str>,
    zone: chrono_tz::Tz,
) -> Markup {
    layout(
        "Operators",
        Some(session),
        Nav::Operators,
        html! {
            @if let Some(n) = note { p.note role="status" { (n) } }
            table {
                thead { tr { th { "Name" } th { "Role" } th { "Created" } th { "State" } th { "" } } }
                tbody { @for o in rows {
                    tr {
                        td.mono { (o.name) }
                        td { (o.role.as_str()) }
                        td { (when(o.created_at, zone)) }
                        td { @if let Some(at) = o.disabled_at { "disabled " (when(at, zone)) } @else { "enabled" } }
                        td { @if o.disabled_at.is_none() && o.name != session.operator.name {
                            form.inline method="post" action=(format!("/operators/{}/disable", percent(&o.name))) {
                                input type="hidden" name="csrf" value=(session.csrf());
                                button.danger type="submit" { "Disable" }
                            }
                        } }
                    }
                } }
            }
            h2 { "Create an operator" }
            form.stack method="post" action="/operators" {
                input type="hidden" name="csrf" value=(session.csrf());
                label for="op-name" { "Name" }
                input #op-name type="text" name="name" required pattern="[a-z0-9._-]{1,64}";
                label for="op-role" { "Role" }
                select #op-role name="role" { option value="viewer" { "viewer" } option value="operator" { "operator" } option value="admin" { "admin" } }
                label for="op-password" { "Password (12 characters or more)" }
                input #op-password type="password" name="password" required minlength="12" autocomplete="new-password";
                div { button.primary type="submit" { "Create" } }
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_are_grouped_and_ids_encoded() {
        assert_eq!(amount(15_000), "15,000");
        assert_eq!(amount(999), "999");
        assert_eq!(amount(-1_234_567), "-1,234,567");
        assert_eq!(payment_href("pay_01"), "/payments/pay_01");
        assert_eq!(percent("a b&c"), "a%20b%26c");
    }

    fn session(role: Role) -> Session {
        Session {
            operator: crate::operators::Operator {
                name: "kim".into(),
                role,
                created_at: 0,
                disabled_at: None,
            },
            token: "t".into(),
            expires_at: i64::MAX,
        }
    }

    #[test]
    fn a_long_problem_list_is_cut_and_says_so() {
        let p = paygate_payments::Problem {
            kind: "unknown",
            since_ms: 0,
            payment_id: "pay_1".into(),
            merchant_id: "mer_1".into(),
            order_id: "o".into(),
            amount: Some(1),
            status: "UNKNOWN".into(),
            detail: String::new(),
        };
        let rows = vec![p; PROBLEMS_SHOWN + 100];
        let html = problems(&session(Role::Viewer), &rows, 10).into_string();
        assert_eq!(
            html.matches("<tr>").count(),
            PROBLEMS_SHOWN + 1,
            "the header and 500 rows"
        );
        assert!(html.contains(&format!("{} problems", PROBLEMS_SHOWN + 100)));
        let short = problems(&session(Role::Viewer), &rows[..3], 10).into_string();
        assert_eq!(short.matches("<tr>").count(), 4);
        assert!(!short.contains("are shown"));
    }

    #[test]
    fn replicas_gone_for_a_day_are_counted_not_listed() {
        let now = paygate_core::time::now_ms();
        let snap = serde_json::json!({"downstreams": [{"name": "card_api", "breaker": "closed", "bulkheadInUse": 0, "bulkheadMax": 100}]});
        let v = HealthView {
            replicas: vec![
                ("live:8080".into(), now, snap.clone()),
                ("old:8080".into(), now - GONE_AFTER_MS - 1, snap),
            ],
            outbox: (0, 0),
            events: (0, 0),
            jobs: vec![],
        };
        let html = health(&session(Role::Viewer), &v, chrono_tz::UTC).into_string();
        assert!(html.contains("live:8080") && !html.contains("old:8080"));
        assert!(html.contains("1 replica(s) silent for over a day"));
    }

    #[test]
    fn interpolated_text_is_escaped() {
        let page = message("x", None, "<script>alert(1)</script>").into_string();
        assert!(!page.contains("<script>alert"));
        assert!(page.contains("&lt;script&gt;"));
    }
}
