//! The console over HTTP, on every SQL backend: the login rate limit,
//! session expiry and logout, the role and CSRF checks on every action,
//! and that no page's HTML carries a secret of the configuration.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod support;

use std::time::Duration;

use paygate_core::crypto;
use paygate_state_store::testing::sql_backends;
use support::{csrf_in, env, Answer, Client, PASSWORD};

/// A page without a live session hops (same-site) to the login page, with
/// itself as `next`.
fn to_login(a: &Answer) -> bool {
    a.status == 200 && a.body.contains("url=/login?next=")
}

async fn audit_rows(
    db: &paygate_state_store::SqlDatabase,
) -> Vec<paygate_console::audit::AuditRow> {
    paygate_console::audit::AuditLog::new(db.clone())
        .recent(1_000)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_are_rate_limited_per_name_and_every_failure_is_audited() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, |_| {}).await;
        let mut c = Client::new(&e.base);
        for i in 0..5 {
            let a = c.login("alice", "not the password at all").await;
            assert_eq!(a.status, 401, "{name}: try {i}: {}", a.body);
            assert!(a.body.contains("Wrong name or password"), "{name}");
        }
        // The sixth attempt in the minute is refused, right password or not.
        let a = c.login("alice", PASSWORD).await;
        assert_eq!(a.status, 429, "{name}: {}", a.body);
        assert!(
            !c.cookies.contains_key("paygate_console"),
            "{name}: no session"
        );
        // Another name is not limited by alice's failures.
        let mut v = Client::new(&e.base);
        let a = v.login("victor", PASSWORD).await;
        assert_eq!(
            (a.status, a.location.as_deref()),
            (303, Some("/problems")),
            "{name}"
        );
        let rows = audit_rows(&e.db).await;
        let failed: Vec<_> = rows
            .iter()
            .filter(|r| r.action == "login_failed" && r.operator == "alice")
            .collect();
        // Each failure within the limit is audited; the refused sixth costs
        // no hash and no row (an unauthenticated client cannot grow the
        // append-only table at will).
        assert_eq!(failed.len(), 5, "{name}: {rows:?}");
        assert!(rows
            .iter()
            .any(|r| r.action == "login" && r.operator == "victor"));
        // The audit cannot be rewritten.
        let edit = paygate_state_store::with_pool!(&e.db, pool => {
            sqlx::query("UPDATE console_audit SET operator = 'nobody'").execute(pool).await.map(|_| ())
        });
        assert!(edit.is_err(), "{name}: the audit is append-only");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_expires_ends_at_logout_and_when_its_operator_is_disabled() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, |c| c.console_session_ttl_ms = 1_500).await;
        // No session: every page goes to the login.
        let mut anon = Client::new(&e.base);
        let a = anon.get("/problems").await;
        assert!(to_login(&a), "{name}: {}", a.body);
        assert!(a.body.contains("next=%2Fproblems"), "{name}: {}", a.body);
        let a = anon.post("/payments/pay_x/recheck", &[]).await;
        assert_eq!(
            (a.status, a.location.as_deref()),
            (303, Some("/login")),
            "{name}"
        );

        let mut c = Client::new(&e.base);
        let a = c.login("alice", PASSWORD).await;
        assert_eq!(a.status, 303, "{name}: {}", a.body);
        assert_eq!(c.get("/problems").await.status, 200, "{name}");
        tokio::time::sleep(Duration::from_millis(1_700)).await;
        let a = c.get("/problems").await;
        assert!(to_login(&a), "{name}: expired: {}", a.body);

        // Logout ends a live session.
        let mut c = Client::new(&e.base);
        c.login("alice", PASSWORD).await;
        let page = c.get("/problems").await;
        let csrf = csrf_in(&page.body);
        let token = c.cookies.get("paygate_console").cloned().unwrap();
        let a = c.post("/logout", &[("csrf", &csrf)]).await;
        assert_eq!(a.status, 303, "{name}");
        let mut replay = Client::new(&e.base);
        replay.cookies.insert("paygate_console".into(), token);
        assert!(
            to_login(&replay.get("/problems").await),
            "{name}: logged out"
        );

        // Disabling an operator ends its sessions at once.
        let mut alice = Client::new(&e.base);
        alice.login("alice", PASSWORD).await;
        assert_eq!(alice.get("/problems").await.status, 200);
        let mut ada = Client::new(&e.base);
        ada.login("ada", PASSWORD).await;
        let page = ada.get("/operators").await;
        assert_eq!(page.status, 200, "{name}");
        let a = ada
            .post(
                "/operators/alice/disable",
                &[("csrf", &csrf_in(&page.body))],
            )
            .await;
        assert!(a.body.contains("Disabled alice"), "{name}: {}", a.body);
        assert!(to_login(&alice.get("/problems").await), "{name}: disabled");
        assert_eq!(
            Client::new(&e.base).login("alice", PASSWORD).await.status,
            401
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_cannot_act_and_no_action_runs_without_its_csrf_token() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, |_| {}).await;
        let pid = e.unknown.payment_id.as_str().to_owned();
        let path = format!("/payments/{pid}");
        let before = e.sandbox.card.stats().lookup_calls;

        // The viewer's page has no action forms; its own token, forged
        // into a resolve, is refused by role.
        let mut viewer = Client::new(&e.base);
        viewer.login("victor", PASSWORD).await;
        let page = viewer.get(&path).await;
        assert_eq!(page.status, 200, "{name}");
        assert!(
            !page.body.contains("/resolve"),
            "{name}: no resolve form for a viewer"
        );
        assert!(page.body.contains("reads only"), "{name}");
        let csrf = csrf_in(&page.body);
        for action in ["resolve", "recheck", "cancel"] {
            let a = viewer
                .post(
                    &format!("{path}/{action}"),
                    &[
                        ("csrf", &csrf),
                        ("decision", "approved"),
                        ("reason", "forged"),
                        ("amount", ""),
                        ("idempotency_key", "console-x"),
                    ],
                )
                .await;
            assert_eq!(a.status, 403, "{name}: {action}: {}", a.body);
            assert!(a.body.contains("your role (viewer)"), "{name}: {}", a.body);
        }
        // The operator without the token, or with another session's, is
        // refused before anything runs.
        let mut alice = Client::new(&e.base);
        alice.login("alice", PASSWORD).await;
        let page = alice.get(&path).await;
        assert!(
            page.body.contains("/resolve"),
            "{name}: the operator sees the resolve form"
        );
        for token in [None, Some(csrf.as_str())] {
            let mut form = vec![("decision", "approved"), ("reason", "no token")];
            if let Some(t) = token {
                form.push(("csrf", t));
            }
            let a = alice.post(&format!("{path}/resolve"), &form).await;
            assert_eq!(a.status, 403, "{name}: {}", a.body);
            assert!(a.body.contains("CSRF token"), "{name}: {}", a.body);
        }
        // Nothing happened: no lookup, the record as it was.
        assert_eq!(e.sandbox.card.stats().lookup_calls, before, "{name}");
        let (_, now) = e.store.get(&e.unknown.payment_id).await.unwrap().unwrap();
        assert_eq!(
            (now.card_status.as_str(), now.version),
            ("UNKNOWN", e.unknown.version),
            "{name}"
        );
        let refused = audit_rows(&e.db)
            .await
            .into_iter()
            .filter(|r| r.outcome == "refused" && r.payment_id.as_deref() == Some(pid.as_str()))
            .count();
        assert_eq!(refused, 5, "{name}: every refusal is audited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_page_shows_a_secret_of_the_configuration() {
    use base64::Engine as _;
    let discord = "https://discord.com/api/webhooks/1234567890/s3cr3tDiscordToken";
    let hash_key = "console-test-hash-key-do-not-show-0123";
    let secrets_key = base64::engine::general_purpose::STANDARD.encode([7u8; 32]);
    for backend in sql_backends() {
        let name = backend.name();
        let sk = secrets_key.clone();
        let e = env(&backend, |c| {
            c.discord_webhook_url = Some(paygate_core::Secret::new(discord.into()));
            c.api_key_hash_key = paygate_core::Secret::new(hash_key.into());
            c.secrets_key = Some(paygate_core::Secret::new(sk));
            c.console_public_url = Some("https://console.example".into());
        })
        .await;
        // The payment's merchant, with an API key and a webhook endpoint.
        let key = crypto::generate_api_key();
        paygate_state_store::SqlMerchantStore::new(e.db.clone())
            .create(
                &paygate_state_store::Merchant {
                    merchant_id: e.merchant.clone(),
                    name: "shop".into(),
                    api_key_prefix: key.expose()[..crypto::API_KEY_DISPLAY_LEN].to_owned(),
                    created_at: paygate_core::time::now_ms(),
                    revoked_at: None,
                },
                &crypto::hash_api_key(&e.config.api_key_hash_key, key.expose()),
            )
            .await
            .unwrap();
        let hook = "https://merchant-hooks.example/paygate/s3cr3t-hook-path";
        paygate_webhooks::EventStore::new(e.db.clone())
            .put_endpoint(
                &e.merchant,
                &paygate_webhooks::store::Endpoint {
                    url: hook.into(),
                    secret_sealed: "sealed-secret-not-for-pages".into(),
                },
                paygate_core::time::now_ms(),
            )
            .await
            .unwrap();
        let pid = e.unknown.payment_id.as_str().to_owned();
        // Secrets where a careless writer could have left them: a log row
        // written raw (not scrubbed on the way in) that echoes the card key
        // and the merchant's key, and an alert whose detail quotes the
        // Discord URL. The pages must mask them as they show them.
        let raw = format!(
            r#"{{"secretKey":"{}","message":"key {} refused","apiKey":"{}"}}"#,
            support::CARD_SECRET,
            support::CARD_SECRET,
            key.expose()
        );
        let sql = match &e.db {
            paygate_state_store::SqlDatabase::Sqlite(_) => "INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, status_code, body, created_at) VALUES ($1, 'card_api', 'RESPONSE', 1, 'POST', '/v1/payments/confirm', 500, $2, $3)",
            paygate_state_store::SqlDatabase::Postgres(_) => "INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, status_code, body, created_at) VALUES ($1, 'card_api', 'RESPONSE', 1, 'POST', '/v1/payments/confirm', 500, CAST($2 AS JSONB), $3)",
        };
        paygate_state_store::with_pool!(&e.db, pool => sqlx::query(sql).bind(&pid).bind(&raw).bind(paygate_core::time::now_ms()).execute(pool).await.map(|_| ()).unwrap());
        let alerter =
            paygate_alert::OutboxAlerter::new(paygate_alert::SqlOutbox::new(e.db.clone()), None);
        paygate_alert::Alerter::raise(
            &*alerter,
            paygate_alert::Alert {
                reason: paygate_alert::AlertReason::CardMismatch,
                payment_id: pid.clone(),
                merchant_id: e.merchant.as_str().to_owned(),
                order_id: e.unknown.order_id.as_str().to_owned(),
                amount: 15_000,
                detail: format!("posting to {discord} failed"),
            },
        )
        .await;
        let mut ada = Client::new(&e.base);
        ada.login("ada", PASSWORD).await;
        // A resend makes the console try Discord (unreachable here), so the
        // alert carries a delivery error to show.
        let alerts = ada.get("/alerts").await;
        let id = paygate_alert::SqlOutbox::new(e.db.clone())
            .for_payment(&pid)
            .await
            .unwrap()[0]
            .id;
        ada.post(
            &format!("/alerts/{id}/resend"),
            &[("csrf", &csrf_in(&alerts.body)), ("back", "/alerts")],
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let order = e.unknown.order_id.as_str().to_owned();
        let mut pages = vec![Client::new(&e.base).get("/login").await.body];
        for path in [
            "/problems".to_owned(),
            format!("/payments/{pid}"),
            format!("/search?order_id={order}"),
            format!("/search?merchant={}", e.merchant.as_str()),
            "/alerts".to_owned(),
            "/alerts?show=unsent".to_owned(),
            "/reconciliation".to_owned(),
            "/health".to_owned(),
            "/operators".to_owned(),
        ] {
            let a = ada.get(&path).await;
            assert_eq!(a.status, 200, "{name}: {path}: {}", a.body);
            pages.push(a.body);
        }
        assert!(
            pages[2].contains(&pid),
            "{name}: the payment page shows the payment"
        );
        assert!(
            pages[4].contains(&pid),
            "{name}: the search finds it by merchant"
        );
        let secrets = [
            support::CARD_SECRET,
            discord,
            "s3cr3tDiscordToken",
            hash_key,
            &secrets_key,
            key.expose(),
            hook,
            "s3cr3t-hook-path",
            "sealed-secret-not-for-pages",
            e.config.database_url.expose(),
            support::PASSWORD,
        ];
        for (i, html) in pages.iter().enumerate() {
            for s in secrets {
                assert!(
                    !html.contains(s),
                    "{name}: page {i} shows a secret ({} chars)",
                    s.len()
                );
            }
        }
        assert!(
            pages[2].contains("test_sk_***") && pages[2].contains("[REDACTED]"),
            "{name}: the raw row is shown masked"
        );
        assert!(
            pages[1].contains("card_mismatch"),
            "{name}: the alert is a problem"
        );
    }
}

/// A link from an alert (`/payments/<id>`) comes back to that page after
/// the login, and a live session goes straight there; `next` never leaves
/// the console.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_from_an_alert_lands_on_its_payment_after_the_login() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, |_| {}).await;
        let path = format!("/payments/{}", e.unknown.payment_id.as_str());
        let mut c = Client::new(&e.base);
        let hop = c.get(&path).await;
        assert!(to_login(&hop), "{name}");
        let login = c
            .get(&format!("/login?next={}", path.replace('/', "%2F")))
            .await;
        assert!(
            login
                .body
                .contains(&format!(r#"name="next" value="{path}""#)),
            "{name}: {}",
            login.body
        );
        let a = c
            .post(
                "/login",
                &[
                    ("name", "alice"),
                    ("password", PASSWORD),
                    ("csrf", &csrf_in(&login.body)),
                    ("next", &path),
                ],
            )
            .await;
        assert_eq!(
            (a.status, a.location.as_deref()),
            (303, Some(path.as_str())),
            "{name}"
        );
        let again = c.get(&format!("/login?next={path}")).await;
        assert_eq!(
            again.location.as_deref(),
            Some(path.as_str()),
            "{name}: a live session goes straight there"
        );
        for bad in [
            "//evil.example/x",
            "https://evil.example",
            "/%09/evil.example",
        ] {
            let a = c.get(&format!("/login?next={bad}")).await;
            assert_eq!(a.location.as_deref(), Some("/problems"), "{name}: {bad}");
        }
    }
}

/// A cancel from the console refunds once: a page submitted twice, or a
/// page drawn before another cancel, is refused or replayed, never sent to
/// the card company a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_from_a_stale_or_twice_submitted_page_refunds_once() {
    for backend in sql_backends() {
        let name = backend.name();
        let e = env(&backend, |_| {}).await;
        let pid = e.unknown.payment_id.as_str().to_owned();
        let path = format!("/payments/{pid}");
        let mut alice = Client::new(&e.base);
        alice.login("alice", PASSWORD).await;
        // Settle it approved first (the card company approved it).
        let page = alice.get(&path).await;
        let version = e.unknown.version.to_string();
        let a = alice
            .post(
                &format!("{path}/resolve"),
                &[
                    ("csrf", &csrf_in(&page.body)),
                    ("decision", "approved"),
                    ("reason", "DONE in the card console"),
                    ("version", &version),
                ],
            )
            .await;
        assert_eq!(a.status, 303, "{name}: {}", a.body);
        let page = alice.get(a.location.as_deref().unwrap()).await;
        assert!(
            page.body.contains("resolved as approved"),
            "{name}: {}",
            page.body
        );
        assert!(
            page.body.contains(r#"name="seen_balance" value="15000""#),
            "{name}"
        );
        let form = |csrf: &str| {
            vec![
                ("csrf", csrf.to_owned()),
                ("amount", "5000".to_owned()),
                ("reason", "customer returned one item".to_owned()),
                ("seen_cancels", "0".to_owned()),
                ("seen_balance", "15000".to_owned()),
            ]
        };
        let csrf = csrf_in(&page.body);
        let fields = form(&csrf);
        let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        // The same page submitted twice at once, then once more later.
        let mut bob = Client::new(&e.base);
        bob.cookies = alice.cookies.clone();
        let cancel = format!("{path}/cancel");
        let (first, second) =
            tokio::join!(alice.post(&cancel, &fields), bob.post(&cancel, &fields));
        assert_eq!((first.status, second.status), (303, 303), "{name}");
        let third = alice.post(&cancel, &fields).await;
        assert_eq!(third.status, 303, "{name}");
        let page = alice.get(third.location.as_deref().unwrap()).await;
        assert!(
            page.body.contains("changed since the page was drawn"),
            "{name}: {}",
            page.body
        );
        let cancels = e.store.cancels_of(&e.unknown.payment_id).await.unwrap();
        assert_eq!(cancels.len(), 1, "{name}: one cancel: {cancels:?}");
        assert_eq!(cancels[0].amount, 5_000);
        assert_eq!(
            e.sandbox.card.stats().cancel_calls,
            1,
            "{name}: one call to the card company"
        );
        assert!(
            page.body.contains(r#"name="seen_balance" value="10000""#),
            "{name}: the fresh page"
        );
    }
}
