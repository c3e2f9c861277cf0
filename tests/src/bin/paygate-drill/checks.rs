//! The drill's checks: every answer the merchants got, judged against the
//! card company's own record of approvals and refunds (`GET
//! /sandbox/approvals`), the ledger's entries and reversals (`GET
//! /sandbox/ledger`), the database (records, cancels, stock samples, the
//! outbox) and the merchant API's OpenAPI document; never against paygate's
//! answers alone. One [`Check`] per property; each names its first
//! counterexamples.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use anyhow::Context;
use paygate_core::{CardStatus, Partition, PaymentRecord};
use paygate_sandbox::Approval;
use paygate_state_store::{CancelRecord, CancelStatus, StateStore, StockLevel};
use serde_json::Value;

use crate::{
    cluster::{Cluster, Down},
    load::{Answer, Op},
};

/// One check's verdict.
pub struct Check {
    /// What it checks.
    pub name: &'static str,
    /// Passed.
    pub ok: bool,
    /// Counts, or the first counterexamples.
    pub detail: String,
}

/// The stock seen at one moment (units).
#[derive(Clone, Copy, Debug)]
pub struct StockSample {
    stock: i64,
    sold: i64,
    held: i64,
}

impl StockSample {
    /// A sample of a level read from the database.
    pub fn of(level: &StockLevel) -> Self {
        Self {
            stock: level.stock,
            sold: level.sold,
            held: level.held,
        }
    }
}

/// What the checks read.
pub struct Sources<'a> {
    /// The processes (for the CLI and the down spans).
    pub cluster: &'a Cluster,
    /// An HTTP client.
    pub http: &'a reqwest::Client,
    /// The card simulator.
    pub card_url: &'a str,
    /// The ledger simulator.
    pub ledger_url: &'a str,
    /// The state store.
    pub store: &'a dyn StateStore,
    /// The merchant API's OpenAPI document.
    pub spec: &'a Value,
    /// Every answer.
    pub answers: Vec<Answer>,
    /// Every order started.
    pub orders: Vec<String>,
    /// The stock samples.
    pub samples: Vec<StockSample>,
    /// The messages the fake Discord accepted.
    pub discord: Vec<Value>,
}

/// Everything gathered after healing.
pub struct Facts {
    answers: Vec<Answer>,
    orders: Vec<String>,
    samples: Vec<StockSample>,
    downs: Vec<Down>,
    spec: Value,
    approvals: Vec<Approval>,
    /// orderId -> index in `approvals` (the first approval of it).
    approval_index: BTreeMap<String, usize>,
    ledger_entries: BTreeMap<String, i64>,
    /// Reversal key -> (paymentId, amount).
    reversals: BTreeMap<String, (String, i64)>,
    /// orderId -> every record of it.
    records: BTreeMap<String, Vec<(Partition, PaymentRecord)>>,
    cancels: BTreeMap<String, Vec<CancelRecord>>,
    problems: BTreeSet<String>,
    alerted: BTreeSet<String>,
    check_report: Value,
    check_exit_ok: bool,
    discord_messages: usize,
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

impl Facts {
    /// Reads the simulators, the database and the CLI's listings.
    pub async fn gather(s: Sources<'_>) -> anyhow::Result<Self> {
        let approvals: Vec<Approval> = s
            .http
            .get(format!("{}/sandbox/approvals", s.card_url))
            .basic_auth(paygate_e2e::SIM_SECRET, Some(""))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
            .context("the card simulator's approvals")?;
        let ledger: Value = s
            .http
            .get(format!("{}/sandbox/ledger", s.ledger_url))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
            .context("the ledger simulator's records")?;
        let ledger_entries = ledger["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| Some((e["paymentId"].as_str()?.to_owned(), e["amount"].as_i64()?)))
            .collect();
        let reversals = ledger["reversals"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| {
                Some((
                    r["key"].as_str()?.to_owned(),
                    (
                        r["reversal"]["paymentId"].as_str()?.to_owned(),
                        r["reversal"]["cancelAmount"].as_i64()?,
                    ),
                ))
            })
            .collect();
        let mut records: BTreeMap<String, Vec<(Partition, PaymentRecord)>> = BTreeMap::new();
        for chunk in s.orders.chunks(200) {
            for (p, r) in s.store.find_by_order_ids(chunk).await? {
                records
                    .entry(r.order_id.to_string())
                    .or_default()
                    .push((p, r));
            }
        }
        // Only the drill's cancel requests make cancels.
        let cancelled: BTreeSet<&str> = s
            .answers
            .iter()
            .filter(|a| a.op == Op::Cancel)
            .map(|a| a.order.as_str())
            .collect();
        let mut cancels = BTreeMap::new();
        for (_, r) in cancelled.iter().filter_map(|o| records.get(*o)).flatten() {
            let c = s.store.cancels_of(&r.payment_id).await?;
            if !c.is_empty() {
                cancels.insert(r.payment_id.to_string(), c);
            }
        }
        let problems = json_lines(&s.cluster.run_ok(&[
            "payments",
            "list",
            "--problems",
            "--older-than",
            "0s",
            "--limit",
            "1000000",
            "--json",
        ])?)
        .iter()
        .filter_map(|p| p["paymentId"].as_str().map(str::to_owned))
        .collect();
        let alerted = json_lines(
            &s.cluster
                .run_ok(&["alerts", "list", "--limit", "1000000", "--json"])?,
        )
        .iter()
        .filter_map(|a| a["paymentId"].as_str().map(str::to_owned))
        .collect();
        let check = s.cluster.run(&["check", "--json"])?;
        let mut approval_index = BTreeMap::new();
        for (i, a) in approvals.iter().enumerate() {
            approval_index.entry(a.order_id.clone()).or_insert(i);
        }
        Ok(Self {
            approval_index,
            answers: s.answers,
            orders: s.orders,
            samples: s.samples,
            downs: s.cluster.downs(),
            spec: s.spec.clone(),
            approvals,
            ledger_entries,
            reversals,
            records,
            cancels,
            problems,
            alerted,
            check_report: serde_json::from_slice(&check.stdout).unwrap_or_default(),
            check_exit_ok: check.status.success(),
            discord_messages: s.discord.len(),
        })
    }

    fn record(&self, order: &str) -> Option<&PaymentRecord> {
        self.records
            .get(order)
            .and_then(|v| v.first())
            .map(|(_, r)| r)
    }

    fn approval_of(&self, order: &str) -> Option<&Approval> {
        self.approval_index
            .get(order)
            .and_then(|i| self.approvals.get(*i))
    }

    fn done_cancels(&self, pid: &str) -> impl Iterator<Item = &CancelRecord> {
        self.cancels
            .get(pid)
            .into_iter()
            .flatten()
            .filter(|c| c.status == CancelStatus::Done)
    }

    fn in_front_of_operator(&self, pid: &str) -> bool {
        self.problems.contains(pid) || self.alerted.contains(pid)
    }
}

/// Collects counterexamples; passes when there are none.
struct Verdict {
    name: &'static str,
    bad: Vec<String>,
}

impl Verdict {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            bad: Vec::new(),
        }
    }

    fn fail(&mut self, what: String) {
        self.bad.push(what);
    }

    fn done(self, counted: String) -> Check {
        let ok = self.bad.is_empty();
        let detail = if ok {
            counted
        } else {
            let first: Vec<_> = self.bad.iter().take(5).cloned().collect();
            format!(
                "{} counterexamples ({counted}); first: {}",
                self.bad.len(),
                first.join("; ")
            )
        };
        Check {
            name: self.name,
            ok,
            detail,
        }
    }
}

/// The statuses that do not settle anything by themselves and so may hide
/// the request that got the approval: anything but a promise that nothing
/// was charged (503, 429, 409 `HOLD_EXPIRED`) or a decline (402) or a
/// refusal (4xx).
fn may_have_charged(a: &Answer) -> bool {
    match a.status {
        0 | 200 | 202 => true,
        409 => a.code() != "HOLD_EXPIRED",
        500..=599 => a.status != 503,
        _ => false,
    }
}

/// Runs every check.
pub fn run(f: &Facts) -> Vec<Check> {
    vec![
        paygate_check(f),
        no_lost_approval(f),
        one_approval_per_order_and_key(f),
        one_payment_id_per_order(f),
        every_200_matches_its_approval(f),
        no_402_for_an_approved_order(f),
        every_503_accounted_for(f),
        refunds_equal_done_cancels(f),
        one_reversal_per_done_cancel(f),
        stock_never_oversold(f),
        every_answer_documented(f),
        transport_errors_only_while_down(f),
        open_orders_in_front_of_an_operator(f),
        the_drill_exercised_everything(f),
    ]
}

fn paygate_check(f: &Facts) -> Check {
    let r = &f.check_report;
    let mut v = Verdict::new("paygate check (I1 no lost approval, I2 no double charge)");
    if !f.check_exit_ok || r["lost"] != 0 || r["double_charges"] != 0 {
        v.fail(format!("report {r}"));
    }
    v.done(format!(
        "approvals {}, completed {}, lost {}, double charges {}",
        r["approvals"], r["completed"], r["lost"], r["double_charges"]
    ))
}

fn no_lost_approval(f: &Facts) -> Check {
    let mut v =
        Verdict::new("no lost approval: every approval has a paid record saved in the ledger");
    let mut saved = 0;
    for a in &f.approvals {
        match f.record(&a.order_id) {
            None => v.fail(format!("{}: approved, no record", a.order_id)),
            Some(r) if !r.is_paid => v.fail(format!(
                "{}: approved, record {} {} not paid",
                a.order_id,
                r.payment_id,
                r.card_status.as_str()
            )),
            Some(r) => match f.ledger_entries.get(r.payment_id.as_str()) {
                Some(&amount) if amount == a.amount => saved += 1,
                Some(&amount) => v.fail(format!(
                    "{}: ledger has {amount}, approved {}",
                    r.payment_id, a.amount
                )),
                None if f.in_front_of_operator(r.payment_id.as_str()) => {}
                None => v.fail(format!(
                    "{}: paid, not in the ledger, no operator told",
                    r.payment_id
                )),
            },
        }
    }
    v.done(format!(
        "{} approvals, {saved} in the ledger",
        f.approvals.len()
    ))
}

fn one_approval_per_order_and_key(f: &Facts) -> Check {
    let mut v = Verdict::new("at most one approval per orderId and per paymentKey");
    let mut orders = BTreeMap::<&str, usize>::new();
    let mut keys = BTreeMap::<&str, usize>::new();
    for a in &f.approvals {
        *orders.entry(&a.order_id).or_default() += 1;
        *keys.entry(&a.payment_key).or_default() += 1;
    }
    for (o, n) in orders.iter().filter(|(_, n)| **n > 1) {
        v.fail(format!("order {o} approved {n} times"));
    }
    for (k, n) in keys.iter().filter(|(_, n)| **n > 1) {
        v.fail(format!("paymentKey {k} approved {n} times"));
    }
    v.done(format!(
        "{} approvals of {} orders",
        f.approvals.len(),
        orders.len()
    ))
}

fn one_payment_id_per_order(f: &Facts) -> Check {
    let mut v = Verdict::new("one paymentId per order across every answer of every replica");
    let mut seen = BTreeMap::<&str, BTreeSet<&str>>::new();
    for a in &f.answers {
        if let Some(pid) = a.body["paymentId"].as_str() {
            seen.entry(&a.order).or_default().insert(pid);
        }
    }
    for (order, records) in &f.records {
        if records.len() > 1 {
            v.fail(format!("{order}: {} records", records.len()));
        }
        if let Some((_, r)) = records.first() {
            seen.entry(order).or_default().insert(r.payment_id.as_str());
        }
    }
    for (order, pids) in seen.iter().filter(|(_, p)| p.len() > 1) {
        v.fail(format!("{order}: {pids:?}"));
    }
    v.done(format!("{} orders with a paymentId", seen.len()))
}

fn every_200_matches_its_approval(f: &Facts) -> Check {
    let mut v = Verdict::new("every approved answer matches the card company's approval");
    let mut n = 0;
    for a in &f.answers {
        let status = a.body["status"].as_str().unwrap_or("");
        let approved_answer =
            a.status == 200 && (a.op == Op::Confirm || matches!(status, "DONE" | "CANCELED"));
        if !approved_answer {
            continue;
        }
        n += 1;
        let Some(ap) = f.approval_of(&a.order) else {
            v.fail(format!(
                "{}: {:?} answered {status}, no approval",
                a.order, a.op
            ));
            continue;
        };
        let same = a.body["paymentKey"].as_str() == Some(ap.payment_key.as_str())
            && a.body["amount"].as_i64() == Some(ap.amount)
            && a.body["approvedAt"].as_str() == Some(ap.approved_at.as_str());
        if !same {
            v.fail(format!(
                "{}: answer {} vs approval {:?}",
                a.order, a.body, ap
            ));
        }
    }
    v.done(format!("{n} approved answers"))
}

fn no_402_for_an_approved_order(f: &Facts) -> Check {
    let mut v = Verdict::new("no 402 for an order that ends approved");
    let mut n = 0;
    for a in f.answers.iter().filter(|a| a.status == 402) {
        n += 1;
        if f.approval_of(&a.order).is_some() {
            v.fail(format!(
                "{}: 402 {} at replica {}, approved",
                a.order,
                a.code(),
                a.replica
            ));
        }
    }
    v.done(format!("{n} declines"))
}

fn every_503_accounted_for(f: &Facts) -> Check {
    let mut v = Verdict::new(
        "no 503 \"nothing was charged\" that no other request of its order accounts for",
    );
    let mut n = 0;
    let mut by_order = BTreeMap::<&str, Vec<&Answer>>::new();
    for a in f.answers.iter().filter(|a| a.op == Op::Confirm) {
        by_order.entry(&a.order).or_default().push(a);
    }
    for order in f.approvals.iter().map(|a| a.order_id.as_str()) {
        let confirms = by_order.get(order).cloned().unwrap_or_default();
        let nothing_charged = confirms.iter().filter(|a| a.status == 503).count();
        n += nothing_charged;
        if nothing_charged > 0 && !confirms.iter().any(|a| may_have_charged(a)) {
            v.fail(format!(
                "{order}: approved, its confirms answered {:?}",
                confirms.iter().map(|a| a.status).collect::<Vec<_>>()
            ));
        }
    }
    let all_503 = f.answers.iter().filter(|a| a.status == 503).count();
    v.done(format!(
        "{all_503} answers 503, {n} of them of orders that end approved"
    ))
}

fn refunds_equal_done_cancels(f: &Facts) -> Check {
    let mut v = Verdict::new(
        "refunds at the card company equal paygate's DONE cancels, never above the approval",
    );
    let mut refunded = 0;
    for a in &f.approvals {
        let done: i64 = f
            .record(&a.order_id)
            .map(|r| {
                f.done_cancels(r.payment_id.as_str())
                    .map(|c| c.amount)
                    .sum()
            })
            .unwrap_or(0);
        if a.canceled_amount != done {
            v.fail(format!(
                "{}: card refunded {}, paygate DONE cancels {done}",
                a.order_id, a.canceled_amount
            ));
        }
        if a.canceled_amount > a.amount {
            v.fail(format!(
                "{}: refunded {} of {}",
                a.order_id, a.canceled_amount, a.amount
            ));
        }
        refunded += a.canceled_amount;
    }
    let done = f
        .cancels
        .values()
        .flatten()
        .filter(|c| c.status == CancelStatus::Done)
        .count();
    v.done(format!(
        "{done} DONE cancels, {refunded} refunded (minor units)"
    ))
}

fn one_reversal_per_done_cancel(f: &Facts) -> Check {
    let mut v = Verdict::new("one ledger reversal per DONE cancel, none for another");
    let mut expected = BTreeMap::<String, i64>::new();
    for (pid, cancels) in &f.cancels {
        for c in cancels {
            let key = format!("{pid}:cancel:{}", c.n);
            match (c.status, f.reversals.get(&key)) {
                (CancelStatus::Done, Some(&(_, amount))) if amount == c.amount => {}
                (CancelStatus::Done, Some(&(_, amount))) => {
                    v.fail(format!("{key}: reversed {amount}, canceled {}", c.amount));
                }
                (CancelStatus::Done, None) if !c.is_saved && f.in_front_of_operator(pid) => {}
                (CancelStatus::Done, None) => v.fail(format!("{key}: DONE, no reversal")),
                (status, Some(_)) => v.fail(format!("{key}: {}, reversed", status.as_str())),
                (_, None) => {}
            }
            expected.insert(key, c.amount);
        }
    }
    for key in f.reversals.keys().filter(|k| !expected.contains_key(*k)) {
        v.fail(format!("{key}: reversed, no such cancel"));
    }
    v.done(format!("{} reversals", f.reversals.len()))
}

fn stock_never_oversold(f: &Facts) -> Check {
    let mut v = Verdict::new(
        "sold + active holds never above stock (sampled during the run and at the end)",
    );
    let mut peak = 0;
    let mut max_sold = 0;
    for s in &f.samples {
        peak = peak.max(s.sold + s.held);
        max_sold = max_sold.max(s.sold);
        if s.sold + s.held > s.stock {
            v.fail(format!(
                "sold {} + held {} > stock {}",
                s.sold, s.held, s.stock
            ));
        }
    }
    v.done(format!(
        "{} samples, peak sold+held {peak}, sold {max_sold} of {}",
        f.samples.len(),
        f.samples.last().map_or(0, |s| s.stock)
    ))
}

fn every_answer_documented(f: &Facts) -> Check {
    let mut v = Verdict::new("every answer a documented status; every error problem+json");
    let mut statuses = BTreeMap::<u16, usize>::new();
    for a in f.answers.iter().filter(|a| a.status != 0) {
        *statuses.entry(a.status).or_default() += 1;
        let (path, method) = a.op.operation();
        let documented = &f.spec["paths"][path][method]["responses"];
        if documented.is_null() {
            v.fail(format!("{method} {path}: not in the OpenAPI document"));
            continue;
        }
        if documented.get(a.status.to_string()).is_none() {
            v.fail(format!("{method} {path}: {} is not documented", a.status));
        }
        if a.status >= 400 {
            let problem = a.content_type.starts_with("application/problem+json")
                && a.body["status"].as_u64() == Some(u64::from(a.status))
                && a.body["title"].is_string()
                && a.body["type"].is_string();
            if !problem {
                v.fail(format!(
                    "{method} {path}: {} as {:?}: {}",
                    a.status, a.content_type, a.body
                ));
            }
        } else if !a.content_type.starts_with("application/json") {
            v.fail(format!(
                "{method} {path}: {} as {:?}",
                a.status, a.content_type
            ));
        }
    }
    v.done(format!("statuses {statuses:?}"))
}

fn transport_errors_only_while_down(f: &Facts) -> Check {
    let mut v = Verdict::new("transport errors only while the replica was down");
    let mut n = 0;
    let overlaps = |a: &Answer, d: &Down| {
        d.replica == a.replica && d.from <= a.ended && d.to.is_none_or(|to| to >= a.started)
    };
    for a in f.answers.iter().filter(|a| a.status == 0) {
        n += 1;
        if !f.downs.iter().any(|d| overlaps(a, d)) {
            v.fail(format!(
                "{:?} {} at replica {} ({} ms): {}",
                a.op,
                a.order,
                a.replica,
                a.ended.saturating_duration_since(a.started).as_millis(),
                a.error.as_deref().unwrap_or("")
            ));
        }
    }
    let down: Duration = f
        .downs
        .iter()
        .map(|d| {
            d.to.unwrap_or_else(Instant::now)
                .saturating_duration_since(d.from)
        })
        .sum();
    v.done(format!(
        "{n} transport errors, {} down spans, {} ms down in all",
        f.downs.len(),
        down.as_millis()
    ))
}

fn open_orders_in_front_of_an_operator(f: &Facts) -> Check {
    let mut v = Verdict::new("every order still open after healing is in front of an operator");
    let mut open = 0;
    for (order, records) in &f.records {
        for (partition, r) in records {
            let pid = r.payment_id.as_str();
            let payment_open = *partition == Partition::Realtime
                && (matches!(r.card_status, CardStatus::Pending | CardStatus::Unknown)
                    || (r.is_paid && !r.is_saved));
            let cancel_open = f.cancels.get(pid).into_iter().flatten().any(|c| {
                matches!(c.status, CancelStatus::Pending | CancelStatus::Unknown)
                    || (c.status == CancelStatus::Done && !c.is_saved)
            });
            if payment_open || cancel_open {
                open += 1;
                if !f.in_front_of_operator(pid) {
                    v.fail(format!(
                        "{order} {pid}: {} paid={} saved={} in {partition:?}, cancels open={cancel_open}, no alert and not listed",
                        r.card_status.as_str(),
                        r.is_paid,
                        r.is_saved
                    ));
                }
            }
        }
    }
    v.done(format!(
        "{open} open, {} listed as problems, {} alerted, {} Discord messages",
        f.problems.len(),
        f.alerted.len(),
        f.discord_messages
    ))
}

fn the_drill_exercised_everything(f: &Facts) -> Check {
    let mut v =
        Verdict::new("the drill exercised approvals, declines, cancels, holds and failovers");
    let count = |p: &dyn Fn(&Answer) -> bool| f.answers.iter().filter(|a| p(a)).count();
    let approvals = f.approvals.len();
    let declines = count(&|a| a.status == 402);
    let cancels = f
        .cancels
        .values()
        .flatten()
        .filter(|c| c.status == CancelStatus::Done)
        .count();
    let holds = count(&|a| a.op == Op::Hold && matches!(a.status, 200 | 201));
    let out_of_stock = count(&|a| a.op == Op::Hold && a.code() == "OUT_OF_STOCK");
    let sold = f.samples.last().map_or(0, |s| s.sold);
    for (what, n) in [
        ("approvals", approvals),
        ("declines", declines),
        ("DONE cancels", cancels),
        ("holds", holds),
        ("units sold", sold as usize),
        ("replica restarts", f.downs.len()),
    ] {
        if n == 0 {
            v.fail(format!("no {what}"));
        }
    }
    v.done(format!(
        "{} orders: {approvals} approvals, {declines} declines, {cancels} DONE cancels, {holds} holds ({out_of_stock} out of stock), {sold} units sold, {} down spans",
        f.orders.len(),
        f.downs.len()
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

    use paygate_core::{MerchantId, OrderId, PaymentId};
    use serde_json::json;

    use super::*;

    const APPROVED_AT: &str = "2026-12-07T13:00:00+09:00";

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    fn answer(base: Instant, op: Op, order: &str, status: u16, body: Value) -> Answer {
        Answer {
            op,
            order: order.to_owned(),
            replica: 0,
            started: at(base, 100),
            ended: at(base, 120),
            status,
            content_type: if status >= 400 {
                "application/problem+json".into()
            } else {
                "application/json".into()
            },
            body,
            error: None,
        }
    }

    fn problem(status: u16, code: &str) -> Value {
        json!({"type": "urn:paygate:problem:x", "title": "t", "status": status, "code": code})
    }

    fn paid(order: &str, pid: &str, amount: i64) -> PaymentRecord {
        let mut r = PaymentRecord::new_pending(
            MerchantId::from_stored("mer_1"),
            OrderId::parse(order).unwrap(),
            format!("pk_{order}"),
            amount,
            "KRW".into(),
            "fp".into(),
            None,
            0,
        );
        r.payment_id = PaymentId::from_stored(pid);
        r.is_paid = true;
        r.is_saved = true;
        r.card_status = CardStatus::Done;
        r.approved_at = Some(APPROVED_AT.into());
        r
    }

    fn cancel(pid: &str, n: i64, amount: i64) -> CancelRecord {
        CancelRecord {
            payment_id: PaymentId::from_stored(pid),
            n,
            merchant_id: MerchantId::from_stored("mer_1"),
            amount,
            reason: "r".into(),
            idempotency_key: None,
            request_fingerprint: "fp".into(),
            status: CancelStatus::Done,
            is_saved: true,
            save_attempts: 0,
            batch_attempts: 0,
            failure_code: None,
            last_error: None,
            canceled_at: None,
            created_at: 0,
            updated_at: 0,
            version: 1,
        }
    }

    /// A small history where everything holds: order A approved (200) and
    /// half refunded, order B declined (402), one restart with a transport
    /// error inside it, stock never short.
    fn clean() -> Facts {
        let base = Instant::now();
        let responses = |codes: &[u16]| {
            Value::Object(codes.iter().map(|c| (c.to_string(), json!({}))).collect())
        };
        let spec = json!({"paths": {
            "/v1/payments/confirm": {"post": {"responses": responses(&[200, 202, 402, 409, 503])}},
            "/v1/payments/{payment_id}/cancel": {"post": {"responses": responses(&[200, 409, 422])}},
        }});
        let body_a = json!({"paymentId": "pay_A", "orderId": "order-A", "paymentKey": "pk_order-A",
            "amount": 1000, "status": "DONE", "approvedAt": APPROVED_AT});
        let mut lost = answer(base, Op::Confirm, "order-A", 0, Value::Null);
        lost.started = at(base, 10);
        lost.ended = at(base, 30);
        let mut f = Facts {
            answers: vec![
                lost,
                answer(base, Op::Confirm, "order-A", 200, body_a),
                answer(
                    base,
                    Op::Cancel,
                    "order-A",
                    200,
                    json!({"paymentId": "pay_A"}),
                ),
                answer(
                    base,
                    Op::Confirm,
                    "order-B",
                    402,
                    problem(402, "REJECT_CARD_PAYMENT"),
                ),
            ],
            orders: vec!["order-A".into(), "order-B".into()],
            samples: vec![StockSample {
                stock: 5,
                sold: 3,
                held: 2,
            }],
            downs: vec![Down {
                replica: 0,
                from: at(base, 0),
                to: Some(at(base, 50)),
            }],
            spec,
            approvals: vec![Approval {
                order_id: "order-A".into(),
                payment_key: "pk_order-A".into(),
                amount: 1000,
                idempotency_key: None,
                approved_at: APPROVED_AT.into(),
                canceled_amount: 500,
            }],
            approval_index: BTreeMap::new(),
            ledger_entries: [("pay_A".to_owned(), 1000)].into(),
            reversals: [("pay_A:cancel:1".to_owned(), ("pay_A".to_owned(), 500))].into(),
            records: [(
                "order-A".to_owned(),
                vec![(Partition::Completed, paid("order-A", "pay_A", 1000))],
            )]
            .into(),
            cancels: [("pay_A".to_owned(), vec![cancel("pay_A", 1, 500)])].into(),
            problems: BTreeSet::new(),
            alerted: BTreeSet::new(),
            check_report: json!({"lost": 0, "double_charges": 0, "approvals": 1}),
            check_exit_ok: true,
            discord_messages: 0,
        };
        reindex(&mut f);
        f
    }

    fn reindex(f: &mut Facts) {
        f.approval_index.clear();
        for (i, a) in f.approvals.iter().enumerate() {
            f.approval_index.entry(a.order_id.clone()).or_insert(i);
        }
    }

    fn failing(f: &Facts) -> Vec<&'static str> {
        run(f)
            .into_iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect()
    }

    #[test]
    fn a_clean_history_passes_every_check_but_the_coverage_one() {
        // Coverage wants holds and units sold; this history has none.
        let failed = failing(&clean());
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].starts_with("the drill exercised"), "{failed:?}");
    }

    #[test]
    fn each_planted_fault_fails_its_own_check() {
        let base = Instant::now();
        type Plant = Box<dyn Fn(&mut Facts)>;
        let cases: Vec<(&str, Plant)> = vec![
            (
                "at most one approval",
                Box::new(|f| {
                    let again = f.approvals[0].clone();
                    f.approvals.push(again);
                }),
            ),
            (
                "no 402",
                Box::new(move |f| {
                    f.answers.push(answer(
                        base,
                        Op::Confirm,
                        "order-A",
                        402,
                        problem(402, "REJECT_CARD_PAYMENT"),
                    ));
                }),
            ),
            (
                "no lost approval",
                Box::new(|f| {
                    f.records.get_mut("order-A").unwrap()[0].1.is_paid = false;
                }),
            ),
            (
                "no lost approval",
                Box::new(|f| {
                    f.ledger_entries.clear();
                }),
            ),
            (
                "refunds at the card company",
                Box::new(|f| f.approvals[0].canceled_amount = 1000),
            ),
            ("one ledger reversal", Box::new(|f| f.reversals.clear())),
            (
                "one ledger reversal",
                Box::new(|f| {
                    f.reversals
                        .insert("pay_A:cancel:2".into(), ("pay_A".into(), 1));
                }),
            ),
            (
                "sold + active holds",
                Box::new(|f| {
                    f.samples.push(StockSample {
                        stock: 5,
                        sold: 4,
                        held: 2,
                    })
                }),
            ),
            (
                "every answer a documented status",
                Box::new(move |f| {
                    f.answers.push(answer(
                        base,
                        Op::Confirm,
                        "order-A",
                        418,
                        problem(418, "TEAPOT"),
                    ));
                }),
            ),
            (
                "every answer a documented status",
                Box::new(move |f| {
                    let mut a = answer(
                        base,
                        Op::Confirm,
                        "order-A",
                        409,
                        problem(409, "PAYMENT_IN_PROGRESS"),
                    );
                    a.content_type = "text/plain".into();
                    f.answers.push(a);
                }),
            ),
            (
                "transport errors only",
                Box::new(move |f| {
                    let mut a = answer(base, Op::Confirm, "order-A", 0, Value::Null);
                    a.started = at(base, 60);
                    a.ended = at(base, 70);
                    f.answers.push(a);
                }),
            ),
            (
                "every order still open",
                Box::new(|f| {
                    let r = &mut f.records.get_mut("order-A").unwrap()[0];
                    r.0 = Partition::Realtime;
                    r.1.is_saved = false;
                }),
            ),
            (
                "every approved answer matches",
                Box::new(|f| {
                    f.answers[1].body["amount"] = json!(999);
                }),
            ),
            (
                "no 503",
                Box::new(move |f| {
                    f.answers
                        .retain(|a| !(a.order == "order-A" && a.op == Op::Confirm));
                    f.answers.push(answer(
                        base,
                        Op::Confirm,
                        "order-A",
                        503,
                        problem(503, "SERVICE_UNAVAILABLE"),
                    ));
                }),
            ),
            (
                "one paymentId per order",
                Box::new(move |f| {
                    f.answers.push(answer(
                        base,
                        Op::GetByOrder,
                        "order-A",
                        200,
                        json!({"paymentId": "pay_Z"}),
                    ));
                }),
            ),
            (
                "paygate check",
                Box::new(|f| f.check_report["lost"] = json!(1)),
            ),
        ];
        for (expected, plant) in cases {
            let mut f = clean();
            plant(&mut f);
            reindex(&mut f);
            let failed = failing(&f);
            assert!(
                failed.iter().any(|n| n.starts_with(expected)),
                "planting a fault for {expected:?} failed only {failed:?}"
            );
        }
    }

    #[test]
    fn an_open_order_in_front_of_an_operator_passes() {
        let mut f = clean();
        let r = &mut f.records.get_mut("order-A").unwrap()[0];
        r.0 = Partition::Realtime;
        r.1.is_saved = false;
        f.alerted.insert("pay_A".into());
        assert!(!failing(&f)
            .iter()
            .any(|n| n.starts_with("every order still open")));
    }
}
