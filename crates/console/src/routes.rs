//! The console's routes: login and logout, the pages, and the actions.
//!
//! Every page needs a live session (else: a redirect to `/login`). Every
//! POST is checked in this order, and each refusal is audited:
//! 1. the session (else: to `/login`);
//! 2. the form's CSRF token (else: 403);
//! 3. the operator's role (else: 403);
//!
//! then the action runs through the same code as the CLI, and the browser
//! is sent back to the page (303) with the audit row's outcome shown.

use std::{
    net::{IpAddr, SocketAddr},
    num::NonZeroU32,
    time::Duration,
};

use axum::{
    extract::{ConnectInfo, FromRequestParts, Path, Query, State as AxState},
    http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Redirect, Response},
    routing::{get, post},
    Form, Router,
};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use maud::Markup;
use paygate_alert::SqlOutbox;
use paygate_api_log::{JobRuns, ReplicaStatus};
use paygate_core::{masking::mask_text, PaymentId};
use paygate_payments::{
    CancelInput, CancelOutcome, Components, Decision, ResolveError, ResolveRequest, Resolver,
};
use paygate_webhooks::EventStore;
use serde::Deserialize;

use crate::{
    audit::AuditLog,
    operators::{OperatorStore, Role},
    pages,
    sessions::{
        csrf_ok, csrf_token, new_token, Session, SessionStore, LOGIN_COOKIE, SESSION_COOKIE,
    },
    views, ConsoleSettings, Shared,
};

/// Everything the handlers share.
pub struct State {
    pub(crate) settings: ConsoleSettings,
    pub(crate) components: Components,
    pub(crate) operators: OperatorStore,
    pub(crate) sessions: SessionStore,
    pub(crate) audit: AuditLog,
    pub(crate) outbox: SqlOutbox,
    pub(crate) events: EventStore,
    pub(crate) jobs: JobRuns,
    pub(crate) replicas: ReplicaStatus,
    by_name: DefaultKeyedRateLimiter<String>,
    by_addr: DefaultKeyedRateLimiter<IpAddr>,
}

impl State {
    pub(crate) fn new(settings: ConsoleSettings, components: Components) -> Self {
        let db = components.db.clone();
        let per_minute =
            NonZeroU32::new(settings.login_attempts_per_minute).unwrap_or(NonZeroU32::MIN);
        let per_addr = per_minute.saturating_mul(NonZeroU32::new(4).unwrap_or(NonZeroU32::MIN));
        Self {
            operators: OperatorStore::new(db.clone()),
            sessions: SessionStore::new(db.clone()),
            audit: AuditLog::new(db.clone()),
            outbox: SqlOutbox::new(db.clone()),
            events: EventStore::new(db.clone()),
            jobs: JobRuns::new(db.clone()),
            replicas: ReplicaStatus::new(db),
            by_name: RateLimiter::keyed(Quota::per_minute(per_minute)),
            by_addr: RateLimiter::keyed(Quota::per_minute(per_addr)),
            settings,
            components,
        }
    }

    /// Writes an audit row; a failure is logged (the action already ran or
    /// was refused; the page says so either way).
    async fn audit(
        &self,
        operator: &str,
        action: &str,
        payment: Option<&str>,
        outcome: &str,
        detail: &str,
    ) -> Option<i64> {
        match self
            .audit
            .append(operator, action, payment, outcome, detail)
            .await
        {
            Ok(id) => Some(id),
            Err(e) => {
                tracing::error!(error = %e, operator, action, "console audit row not written");
                None
            }
        }
    }
}

impl State {
    /// Audits an action on a payment and sends the browser back to the
    /// payment's page, which shows the row's outcome.
    async fn audited(
        &self,
        who: &str,
        action: &str,
        pid: &PaymentId,
        outcome: &str,
        detail: &str,
    ) -> Response {
        let id = self
            .audit(who, action, Some(pid.as_str()), outcome, detail)
            .await;
        back_to_payment(pid, id)
    }
}

/// The router over `shared`.
pub(crate) fn router(shared: Shared) -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/problems") }))
        .route("/console.css", get(css))
        .route("/healthz", get(|| async { "ok" }))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/problems", get(problems))
        .route("/search", get(search))
        .route("/payments/{id}", get(payment))
        .route("/payments/{id}/resolve", post(resolve))
        .route("/payments/{id}/recheck", post(recheck))
        .route("/payments/{id}/cancel", post(cancel))
        .route("/alerts", get(alerts))
        .route("/alerts/{id}/resend", post(resend_alert))
        .route("/reconciliation", get(reconciliation))
        .route("/health", get(health))
        .route("/operators", get(operators).post(create_operator))
        .route("/operators/{name}/disable", post(disable_operator))
        .layer(axum::middleware::map_response(security_headers))
        // Every console form is small (a reason is at most 500 characters):
        // a larger body is refused before it is read.
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(shared)
}

/// The largest request body the console reads, bytes.
const BODY_LIMIT: usize = 16 * 1024;

/// Forgets, every minute, the login rate limiter's entries whose minute has
/// passed (the keyed limiters keep one per name and address seen), until
/// the console is dropped.
pub(crate) async fn sweep_limiters(state: std::sync::Weak<State>) {
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let Some(s) = state.upgrade() else { return };
        s.by_name.retain_recent();
        s.by_addr.retain_recent();
    }
}

/// No caching, no framing, no referrer, no script, nothing from elsewhere.
async fn security_headers(mut res: Response) -> Response {
    let h = res.headers_mut();
    let set = |h: &mut HeaderMap, k: header::HeaderName, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::CACHE_CONTROL, "no-store");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(
        h,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    res
}

async fn css() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::CSS,
    )
        .into_response()
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn set_cookie(name: &str, value: &str, path: &str, max_age_s: u64, secure: bool) -> HeaderValue {
    let secure = if secure { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path={path}; Max-Age={max_age_s}; HttpOnly; SameSite=Strict{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static(""))
}

fn page(status: StatusCode, markup: Markup) -> Response {
    (status, markup).into_response()
}

fn see_other(to: &str) -> Response {
    Redirect::to(to).into_response()
}

/// A store failure, logged with its cause, shown without it.
fn unavailable(session: Option<&Session>, e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "console: store read failed");
    page(
        StatusCode::SERVICE_UNAVAILABLE,
        pages::message(
            "Unavailable",
            session,
            "The database did not answer; try again shortly.",
        ),
    )
}

/// Where a request without a live session goes: a POST to the login page
/// (303); a page to `/login?next=<that page>` by a same-site hop (a
/// `meta refresh`), because the session cookie is `SameSite=Strict`: a
/// link followed from Discord arrives without it, and the hop, made by a
/// page of the console itself, carries it, so a logged-in operator lands
/// on the payment and one not logged in comes back to it after the login.
fn no_session(parts: &Parts) -> Response {
    if parts.method != axum::http::Method::GET {
        return see_other("/login");
    }
    let next = parts
        .uri
        .path_and_query()
        .map_or("/problems", |pq| pq.as_str());
    let to = match safe_next(Some(next)) {
        Some(n) => format!("/login?next={}", pages::percent(n)),
        None => "/login".to_owned(),
    };
    page(StatusCode::OK, pages::hop(&to))
}

impl FromRequestParts<Shared> for Session {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, Response> {
        let Some(token) = cookie(&parts.headers, SESSION_COOKIE) else {
            return Err(no_session(parts));
        };
        match state.sessions.get(token).await {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(no_session(parts)),
            Err(e) => Err(unavailable(None, &e)),
        }
    }
}

/// `next` when it is a page of this console (a path under one of its
/// pages, printable ASCII only), else `None`: never a place elsewhere.
fn safe_next(next: Option<&str>) -> Option<&str> {
    const PAGES: &[&str] = &[
        "/problems",
        "/search",
        "/payments/",
        "/alerts",
        "/reconciliation",
        "/health",
        "/operators",
    ];
    next.filter(|n| {
        n.len() <= 2_048
            && n.bytes().all(|b| b.is_ascii_graphic())
            && !n.contains('\\')
            && PAGES.iter().any(|p| n.starts_with(p))
    })
}

/// Checks a POST's CSRF token and the operator's role; a refusal is
/// audited and answered 403.
async fn allowed(
    s: &State,
    session: &Session,
    csrf: Option<&str>,
    needs: Role,
    action: &str,
    payment: Option<&str>,
) -> Result<(), Response> {
    if !csrf_ok(&session.token, csrf) {
        s.audit(
            &session.operator.name,
            action,
            payment,
            "refused",
            "the form's CSRF token is missing or wrong",
        )
        .await;
        return Err(page(
            StatusCode::FORBIDDEN,
            pages::message("Refused", Some(session), "Refused: the form's CSRF token is missing or wrong. Reload the page and try again."),
        ));
    }
    if !session.may(needs) {
        let why = format!(
            "your role ({}) may not {action}; it needs {}",
            session.operator.role.as_str(),
            needs.as_str()
        );
        s.audit(&session.operator.name, action, payment, "refused", &why)
            .await;
        return Err(page(
            StatusCode::FORBIDDEN,
            pages::message("Refused", Some(session), &format!("Refused: {why}.")),
        ));
    }
    Ok(())
}

// ---- login ----

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    password: String,
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    next: Option<String>,
}

#[derive(Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: Option<String>,
}

async fn login_page(
    AxState(s): AxState<Shared>,
    headers: HeaderMap,
    Query(q): Query<LoginQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref()).unwrap_or("/problems");
    if let Some(t) = cookie(&headers, SESSION_COOKIE) {
        if matches!(s.sessions.get(t).await, Ok(Some(_))) {
            return see_other(next);
        }
    }
    login_form(&s, StatusCode::OK, None, "", next)
}

/// The login form with a fresh login cookie (its CSRF token's key).
fn login_form(
    s: &State,
    status: StatusCode,
    error: Option<&str>,
    name: &str,
    next: &str,
) -> Response {
    let nonce = new_token();
    let mut res = page(status, pages::login(&csrf_token(&nonce), error, name, next));
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(
            LOGIN_COOKIE,
            &nonce,
            "/login",
            900,
            s.settings.secure_cookie,
        ),
    );
    res
}

/// The rate limiter's key of a client address: an IPv6 client is keyed by
/// its /64 (one subscriber's whole prefix), an IPv4 one by its address.
fn addr_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_none() => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Passwords longer than this are refused unread (argon2 hashes any
/// length; this bounds the work one request can ask for).
const MAX_PASSWORD_BYTES: usize = 1_024;

/// `POST /login`. The rate limiter is asked first, so an attempt beyond
/// it costs no hash and writes no row: rate-limited attempts are logged,
/// not audited (the audit cannot be pruned, and an unauthenticated client
/// must not be able to grow it at will). Within the limit, every failure
/// is audited with the name typed.
async fn login(
    AxState(s): AxState<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let name = form.name.trim().to_owned();
    let next = safe_next(form.next.as_deref()).unwrap_or("/problems");
    // A name that cannot exist is shown and audited cut, and keys no
    // limiter entry of its own.
    let valid_name = crate::operators::check_name(&name).is_ok();
    let shown_name: String = name.chars().take(64).collect();
    let limited = s.by_addr.check_key(&addr_key(peer.ip())).is_err()
        || (valid_name && s.by_name.check_key(&name).is_err());
    if limited {
        metrics::counter!("paygate_console_logins_rate_limited_total").increment(1);
        // Only a name that could be an operator's is logged: a password
        // typed into the name field must not reach the log.
        let logged = if valid_name {
            name.as_str()
        } else {
            "(not a valid name)"
        };
        tracing::warn!(name = logged, from = %peer.ip(), "console login rate limited");
        return login_form(
            &s,
            StatusCode::TOO_MANY_REQUESTS,
            Some("Too many login attempts; wait a minute and try again."),
            &shown_name,
            next,
        );
    }
    let nonce = cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
    if nonce.is_empty() || !csrf_ok(nonce, form.csrf.as_deref()) {
        s.audit(
            &shown_name,
            "login_failed",
            None,
            "refused",
            "the login form's CSRF token is missing or wrong",
        )
        .await;
        return login_form(
            &s,
            StatusCode::FORBIDDEN,
            Some("The login form expired; log in again."),
            &shown_name,
            next,
        );
    }
    let verified = if valid_name && form.password.len() <= MAX_PASSWORD_BYTES {
        s.operators.verify(&name, &form.password).await
    } else {
        Ok(None)
    };
    match verified {
        Ok(Some(op)) => match s.sessions.create(&op.name, s.settings.session_ttl_ms).await {
            Ok(token) => {
                s.audit(
                    &op.name,
                    "login",
                    None,
                    "ok",
                    &format!("from {}", peer.ip()),
                )
                .await;
                let mut res = see_other(next);
                let max_age = s.settings.session_ttl_ms / 1000;
                res.headers_mut().append(
                    header::SET_COOKIE,
                    set_cookie(
                        SESSION_COOKIE,
                        &token,
                        "/",
                        max_age.max(1),
                        s.settings.secure_cookie,
                    ),
                );
                res.headers_mut().append(
                    header::SET_COOKIE,
                    set_cookie(LOGIN_COOKIE, "", "/login", 0, s.settings.secure_cookie),
                );
                res
            }
            Err(e) => unavailable(None, &e),
        },
        Ok(None) => {
            s.audit(
                &shown_name,
                "login_failed",
                None,
                "refused",
                &format!("wrong name or password (from {})", peer.ip()),
            )
            .await;
            login_form(
                &s,
                StatusCode::UNAUTHORIZED,
                Some("Wrong name or password."),
                &shown_name,
                next,
            )
        }
        Err(e) => unavailable(None, &e),
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    back: Option<String>,
}

async fn logout(
    AxState(s): AxState<Shared>,
    session: Session,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Err(r) = allowed(
        &s,
        &session,
        form.csrf.as_deref(),
        Role::Viewer,
        "log out",
        None,
    )
    .await
    {
        return r;
    }
    if let Err(e) = s.sessions.delete(&session.token).await {
        return unavailable(Some(&session), &e);
    }
    s.audit(&session.operator.name, "logout", None, "ok", "")
        .await;
    let mut res = see_other("/login");
    res.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(SESSION_COOKIE, "", "/", 0, s.settings.secure_cookie),
    );
    res
}

// ---- pages ----

async fn problems(AxState(s): AxState<Shared>, session: Session) -> Response {
    let c = &s.components;
    match paygate_payments::problems(&c.db, &c.store, None, s.settings.stale_pending).await {
        Ok(rows) => page(
            StatusCode::OK,
            pages::problems(&session, &rows, s.settings.stale_pending.as_secs() / 60),
        ),
        Err(e) => unavailable(Some(&session), &e),
    }
}

async fn search(
    AxState(s): AxState<Shared>,
    session: Session,
    Query(form): Query<pages::SearchForm>,
) -> Response {
    match views::search(&s, &form).await {
        Ok(result) => page(
            StatusCode::OK,
            pages::search(&session, &form, &result, s.settings.zone),
        ),
        Err(e) => unavailable(Some(&session), &e),
    }
}

#[derive(Deserialize)]
struct PaymentQuery {
    #[serde(default)]
    audit: Option<i64>,
}

async fn payment(
    AxState(s): AxState<Shared>,
    session: Session,
    Path(id): Path<String>,
    Query(q): Query<PaymentQuery>,
) -> Response {
    let pid = PaymentId::from_stored(id.as_str());
    // The outcome of the action that sent the browser here: its audit row,
    // when it is about this payment.
    let banner = match q.audit {
        Some(audit_id) => s
            .audit
            .for_payment(pid.as_str())
            .await
            .ok()
            .and_then(|rows| rows.into_iter().find(|r| r.id == audit_id))
            .map(|r| (r.outcome, r.detail)),
        None => None,
    };
    match views::payment(&s, &pid, banner).await {
        Ok(Some(view)) => page(
            StatusCode::OK,
            pages::payment(&session, &view, s.settings.zone),
        ),
        Ok(None) => page(
            StatusCode::NOT_FOUND,
            pages::message(
                "Not found",
                Some(&session),
                &format!("No payment {}.", mask_text(&id)),
            ),
        ),
        Err(e) => unavailable(Some(&session), &e),
    }
}

#[derive(Deserialize)]
struct AlertsQuery {
    #[serde(default)]
    show: Option<String>,
}

async fn alerts(
    AxState(s): AxState<Shared>,
    session: Session,
    Query(q): Query<AlertsQuery>,
) -> Response {
    let which = match q.show.as_deref() {
        Some("unsent") => "unsent",
        Some("parked") => "parked",
        _ => "all",
    };
    let rows = views::alerts(&s, which).await;
    let counts = async {
        Ok::<_, paygate_state_store::StoreError>((
            s.outbox.unsent_count().await?,
            s.outbox.parked_count().await?,
        ))
    }
    .await;
    match (rows, counts) {
        (Ok(rows), Ok(counts)) => page(
            StatusCode::OK,
            pages::alerts(&session, which, &rows, counts, s.settings.zone),
        ),
        (Err(e), _) | (_, Err(e)) => unavailable(Some(&session), &e),
    }
}

async fn reconciliation(AxState(s): AxState<Shared>, session: Session) -> Response {
    let runs = async {
        Ok::<_, paygate_state_store::StoreError>((
            s.jobs.history("reconcile", 30).await?,
            s.jobs.history("batch", 30).await?,
        ))
    }
    .await;
    match runs {
        Ok((reconcile, batch)) => page(
            StatusCode::OK,
            pages::reconciliation(&session, &reconcile, &batch, s.settings.zone),
        ),
        Err(e) => unavailable(Some(&session), &e),
    }
}

async fn health(AxState(s): AxState<Shared>, session: Session) -> Response {
    match views::health(&s).await {
        Ok(v) => page(StatusCode::OK, pages::health(&session, &v, s.settings.zone)),
        Err(e) => unavailable(Some(&session), &e),
    }
}

async fn operators(AxState(s): AxState<Shared>, session: Session) -> Response {
    if !session.may(Role::Admin) {
        return page(
            StatusCode::FORBIDDEN,
            pages::message(
                "Refused",
                Some(&session),
                "Refused: only admins manage operators.",
            ),
        );
    }
    operators_page(&s, &session, None).await
}

/// The Operators page with `note` (what the last change did).
async fn operators_page(s: &State, session: &Session, note: Option<&str>) -> Response {
    match s.operators.list().await {
        Ok(rows) => page(
            StatusCode::OK,
            pages::operators(session, &rows, note, s.settings.zone),
        ),
        Err(e) => unavailable(Some(session), &e),
    }
}

// ---- actions ----

/// Back to the payment's page, showing audit row `audit`.
fn back_to_payment(pid: &PaymentId, audit: Option<i64>) -> Response {
    let href = pages::payment_href(pid.as_str());
    match audit {
        Some(id) => see_other(&format!("{href}?audit={id}")),
        None => see_other(&href),
    }
}

/// Delivers what the action raised or queued, in the background (the
/// serving replicas' senders would within seconds; the CLI flushes too).
fn flush_alerts(s: &State) {
    let alerter = s.components.alerter.clone();
    tokio::spawn(async move {
        let _ = alerter.flush().await;
    });
}

#[derive(Deserialize)]
struct ResolveForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    decision: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    version: Option<i64>,
    #[serde(default)]
    force: Option<String>,
}

async fn resolve(
    AxState(s): AxState<Shared>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<ResolveForm>,
) -> Response {
    let pid = PaymentId::from_stored(id.as_str());
    let who = session.operator.name.clone();
    if let Err(r) = allowed(
        &s,
        &session,
        form.csrf.as_deref(),
        Role::Operator,
        "resolve",
        Some(pid.as_str()),
    )
    .await
    {
        return r;
    }
    let decision = match form.decision.as_str() {
        "approved" => Decision::Approved,
        "not_charged" => Decision::NotCharged,
        _ => {
            return s
                .audited(
                    &who,
                    "resolve",
                    &pid,
                    "refused",
                    "choose approved or not charged",
                )
                .await;
        }
    };
    let Some(version) = form.version else {
        return s
            .audited(
                &who,
                "resolve",
                &pid,
                "refused",
                "the form carries no version; reload the page",
            )
            .await;
    };
    let reason = form.reason.trim();
    if reason.is_empty() || reason.chars().count() > 500 {
        return s
            .audited(
                &who,
                "resolve",
                &pid,
                "refused",
                "a reason (1-500 characters) is required",
            )
            .await;
    }
    let c = &s.components;
    let resolver = Resolver::new(
        c.store.clone(),
        c.saga.clone(),
        c.db.clone(),
        s.settings.ledger_alert_threshold,
    );
    let req = ResolveRequest {
        payment_id: pid.clone(),
        decision,
        reason: reason.to_owned(),
        operator: who.clone(),
        force: form.force.as_deref() == Some("on"),
        seen_version: Some(version),
    };
    let (outcome, detail) = match resolver.resolve(&req).await {
        Ok(report) => {
            let (part, r) = &report.after;
            let mut d = format!(
                "resolved as {} (decision #{}): {}; now {} in {}, paid {}, saved {}",
                req.decision.as_str(),
                report.resolution_id,
                report.evidence,
                r.card_status.as_str(),
                part.table(),
                r.is_paid,
                r.is_saved,
            );
            if let Some(e) = &report.follow_up_error {
                d.push_str(&format!("; not finished ({e}): the batch finishes it"));
            }
            ("ok", d)
        }
        Err(e @ ResolveError::Store(_)) => {
            tracing::error!(error = %e, payment_id = %pid, "console resolve failed on the store");
            ("failed", format!("as {}: the database failed; nothing is known to have changed, look at the payment again", req.decision.as_str()))
        }
        Err(e @ ResolveError::NotAudited { .. }) => {
            ("failed", format!("as {}: {e}", req.decision.as_str()))
        }
        Err(e) => ("refused", format!("as {}: {e}", req.decision.as_str())),
    };
    flush_alerts(&s);
    s.audited(
        &who,
        "resolve",
        &pid,
        outcome,
        &format!("{detail}; reason: {reason}"),
    )
    .await
}

async fn recheck(
    AxState(s): AxState<Shared>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let pid = PaymentId::from_stored(id.as_str());
    let who = session.operator.name.clone();
    if let Err(r) = allowed(
        &s,
        &session,
        form.csrf.as_deref(),
        Role::Operator,
        "recheck",
        Some(pid.as_str()),
    )
    .await
    {
        return r;
    }
    let c = &s.components;
    let sweeper = paygate_batch::Sweeper::new(c.store.clone(), c.saga.clone(), c.db.clone());
    let opts = paygate_batch::SweepOptions {
        grace: Duration::ZERO,
        ledger_alert_threshold: s.settings.ledger_alert_threshold,
        ..paygate_batch::SweepOptions::default()
    };
    let (outcome, detail) = match sweeper.recheck(&pid, &opts).await {
        Ok(Some(done)) => {
            let now = done.after.as_ref().map_or("gone".to_owned(), |(p, r)| {
                format!(
                    "{} in {}, paid {}, saved {}",
                    r.card_status.as_str(),
                    p.table(),
                    r.is_paid,
                    r.is_saved
                )
            });
            let t = &done.summary;
            ("ok", format!(
                "was {} in {}; now {now} (completed {}, unpaid {}, settled {}, ledger tries {}, saved {}, alerts {}, failures {})",
                done.before.1.card_status.as_str(), done.before.0.table(),
                t.completed, t.unpaid, t.settled, t.retried, t.saved, t.alerts, t.failures
            ))
        }
        Ok(None) => ("refused", "no such payment".to_owned()),
        Err(e) => {
            tracing::error!(error = %e, payment_id = %pid, "console recheck failed");
            (
                "failed",
                "the recheck could not finish (store or card company unavailable); try again"
                    .to_owned(),
            )
        }
    };
    flush_alerts(&s);
    s.audited(&who, "recheck", &pid, outcome, &detail).await
}

#[derive(Deserialize)]
struct CancelForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    amount: String,
    /// How many cancels the page showed.
    #[serde(default)]
    seen_cancels: Option<usize>,
    /// What the page showed left to cancel, minor units.
    #[serde(default)]
    seen_balance: Option<i64>,
}

async fn cancel(
    AxState(s): AxState<Shared>,
    session: Session,
    Path(id): Path<String>,
    Form(form): Form<CancelForm>,
) -> Response {
    let pid = PaymentId::from_stored(id.as_str());
    let who = session.operator.name.clone();
    if let Err(r) = allowed(
        &s,
        &session,
        form.csrf.as_deref(),
        Role::Operator,
        "cancel",
        Some(pid.as_str()),
    )
    .await
    {
        return r;
    }
    let reason = form.reason.trim();
    let amount = match form.amount.trim() {
        "" => Ok(None),
        a => a.parse::<i64>().ok().filter(|v| *v > 0).map(Some).ok_or(()),
    };
    let bad = if reason.is_empty() || reason.chars().count() > 200 {
        Some("a reason (1-200 characters) is required")
    } else if amount.is_err() {
        Some("the amount must be a whole number of minor units above 0, or empty for all")
    } else if form.seen_cancels.is_none() || form.seen_balance.is_none() {
        Some("the form is stale; reload the page")
    } else {
        None
    };
    if let Some(why) = bad {
        return s.audited(&who, "cancel", &pid, "refused", why).await;
    }
    let c = &s.components;
    let record = match c.store.get(&pid).await {
        Ok(Some((_, r))) => r,
        Ok(None) => {
            return s
                .audited(&who, "cancel", &pid, "refused", "no such payment")
                .await;
        }
        Err(e) => return unavailable(Some(&session), &e),
    };
    // The cancel the operator asked for is the one after what the page
    // showed. A payment whose cancels changed since (another operator, the
    // merchant, the batch) is refused: the operator looks again. Two
    // submits of pages showing the same state share one idempotency key,
    // so the second replays the first (or is refused as another cancel
    // under that key) and never refunds twice; the claim behind the key is
    // the store's atomic one.
    let cancels = match c.store.cancels_of(&pid).await {
        Ok(k) => k,
        Err(e) => return unavailable(Some(&session), &e),
    };
    let balance = views::balance(&record, &cancels);
    if form.seen_cancels != Some(cancels.len()) || form.seen_balance != Some(balance) {
        return s.audited(&who, "cancel", &pid,
                "refused",
                &format!(
                    "the payment's cancels changed since the page was drawn (now {} cancels, {balance} left); nothing was done, look at it again",
                    cancels.len()
                ),
            ).await;
    }
    let input = CancelInput {
        merchant_id: record.merchant_id.clone(),
        payment_id: pid.clone(),
        reason: reason.to_owned(),
        amount: amount.ok().flatten(),
        idempotency_key: Some(format!("console-after-{}", cancels.len())),
    };
    let (outcome, detail) = match c.saga.cancel(input).await {
        CancelOutcome::Canceled(p) => (
            "ok",
            format!(
                "canceled; {} cancel(s), status {}",
                p.cancels.len(),
                p.record.card_status.as_str()
            ),
        ),
        CancelOutcome::Unknown(_) => (
            "ok",
            "the card company's answer was lost; the batch settles the cancel".to_owned(),
        ),
        CancelOutcome::NotFound => ("refused", "no such payment".to_owned()),
        CancelOutcome::NotApproved => ("refused", "the payment is not approved".to_owned()),
        CancelOutcome::InProgress => (
            "refused",
            "another cancel of this payment is in flight".to_owned(),
        ),
        CancelOutcome::ExceedsBalance { balance } => (
            "refused",
            format!("more than is left to cancel ({balance})"),
        ),
        CancelOutcome::KeyReused => (
            "refused",
            "the form was used for another cancel; reload the page".to_owned(),
        ),
        CancelOutcome::Refused { code } => ("refused", format!("the card company refused: {code}")),
        CancelOutcome::Unavailable { detail, .. } => {
            ("failed", format!("nothing was canceled: {detail}"))
        }
    };
    flush_alerts(&s);
    let amount_text = amount
        .ok()
        .flatten()
        .map_or("all".to_owned(), |a| a.to_string());
    s.audited(
        &who,
        "cancel",
        &pid,
        outcome,
        &format!("{amount_text}: {detail}; reason: {reason}"),
    )
    .await
}

/// Only a path of this console is a place to go back to.
/// Where a resend goes back to: the alert's payment page (`to_payment`)
/// or one of the Alerts page's listings; nothing else is accepted.
enum Back {
    Payment,
    Alerts(&'static str),
}

fn back_of(back: Option<&str>) -> Back {
    match back {
        Some(b) if b.starts_with("/payments/") => Back::Payment,
        Some("/alerts?show=unsent") => Back::Alerts("/alerts?show=unsent"),
        Some("/alerts?show=parked") => Back::Alerts("/alerts?show=parked"),
        _ => Back::Alerts("/alerts?show=all"),
    }
}

async fn resend_alert(
    AxState(s): AxState<Shared>,
    session: Session,
    Path(id): Path<i64>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let who = session.operator.name.clone();
    let alert = match s.outbox.get(id).await {
        Ok(a) => a,
        Err(e) => return unavailable(Some(&session), &e),
    };
    let payment = alert.as_ref().and_then(|a| a.payment_id.clone());
    if let Err(r) = allowed(
        &s,
        &session,
        form.csrf.as_deref(),
        Role::Operator,
        "resend an alert",
        payment.as_deref(),
    )
    .await
    {
        return r;
    }
    let (outcome, detail) = match &alert {
        None => ("refused", format!("no alert #{id}")),
        Some(a) => match s.outbox.requeue(id).await {
            Ok(false) => ("refused", format!("alert #{id} is gone (pruned)")),
            Ok(true) => (
                "ok",
                format!(
                    "alert #{id} ({}) was {}; queued to be sent again",
                    a.reason,
                    a.state()
                ),
            ),
            Err(e) => {
                tracing::error!(error = %e, id, "console resend failed");
                (
                    "failed",
                    format!("alert #{id} could not be queued; try again"),
                )
            }
        },
    };
    flush_alerts(&s);
    let audit = s
        .audit(&who, "resend_alert", payment.as_deref(), outcome, &detail)
        .await;
    match (payment, back_of(form.back.as_deref())) {
        (Some(p), Back::Payment) => back_to_payment(&PaymentId::from_stored(p.as_str()), audit),
        (None, Back::Payment) => see_other("/alerts?show=all"),
        (_, Back::Alerts(to)) => see_other(to),
    }
}

#[derive(Deserialize)]
struct OperatorForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    password: String,
}

async fn create_operator(
    AxState(s): AxState<Shared>,
    session: Session,
    Form(form): Form<OperatorForm>,
) -> Response {
    let who = session.operator.name.clone();
    if let Err(r) = allowed(
        &s,
        &session,
        form.csrf.as_deref(),
        Role::Admin,
        "manage operators",
        None,
    )
    .await
    {
        return r;
    }
    let name = form.name.trim();
    let note = match Role::parse(form.role.trim()) {
        Err(e) => e.to_string(),
        Ok(role) => match s.operators.create(name, role, &form.password).await {
            Ok(true) => {
                s.audit(
                    &who,
                    "operator_create",
                    None,
                    "ok",
                    &format!("{name} as {}", role.as_str()),
                )
                .await;
                format!("Created {name} ({}).", role.as_str())
            }
            Ok(false) => format!("{name} exists already."),
            Err(crate::ConsoleError::Invalid(why)) => why,
            Err(e) => return unavailable(Some(&session), &e),
        },
    };
    operators_page(&s, &session, Some(&note)).await
}

async fn disable_operator(
    AxState(s): AxState<Shared>,
    session: Session,
    Path(name): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    let who = session.operator.name.clone();
    if let Err(r) = allowed(
        &s,
        &session,
        form.csrf.as_deref(),
        Role::Admin,
        "manage operators",
        None,
    )
    .await
    {
        return r;
    }
    let note = if name == who {
        "You cannot disable yourself.".to_owned()
    } else {
        match s.operators.disable(&name).await {
            Ok(true) => {
                s.audit(&who, "operator_disable", None, "ok", &name).await;
                format!("Disabled {name}; their sessions ended.")
            }
            Ok(false) => format!("No enabled operator {name}."),
            Err(e) => return unavailable(Some(&session), &e),
        }
    };
    operators_page(&s, &session, Some(&note)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found_by_name() {
        let mut h = HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; paygate_console=tok; b=2"),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("tok"));
        assert_eq!(cookie(&h, "c"), None);
        let v = set_cookie("n", "v", "/", 60, true);
        assert_eq!(
            v.to_str().ok(),
            Some("n=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict; Secure")
        );
    }

    #[test]
    fn only_console_pages_are_places_to_go() {
        assert_eq!(safe_next(Some("/payments/pay_1")), Some("/payments/pay_1"));
        assert_eq!(
            safe_next(Some("/search?order_id=a")),
            Some("/search?order_id=a")
        );
        for bad in [
            "//evil.example",
            "https://evil.example",
            "/\t/evil.example",
            "/\\evil",
            "/login",
            "/problems\t",
        ] {
            assert_eq!(safe_next(Some(bad)), None, "{bad:?}");
        }
        assert!(matches!(
            back_of(Some("/alerts?show=parked")),
            Back::Alerts("/alerts?show=parked")
        ));
        assert!(matches!(
            back_of(Some("//evil.example")),
            Back::Alerts("/alerts?show=all")
        ));
        assert!(matches!(back_of(Some("/payments/pay_1")), Back::Payment));
    }

    #[test]
    fn ipv6_clients_are_limited_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 4]));
        let b: IpAddr = "2001:db8:1:2:bbbb::9"
            .parse()
            .unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(addr_key(a), addr_key(b));
        let v4: IpAddr = "10.0.0.7".parse().unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(addr_key(v4), v4);
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap_or(IpAddr::from([0u8; 4]));
        assert_eq!(addr_key(mapped), v4);
    }
}
