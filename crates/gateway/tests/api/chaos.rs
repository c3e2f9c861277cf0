//! Stores that die mid-request: the merchant gets 503 or a correct answer,
//! never a panic, and the record and the log stay consistent.

use std::sync::{Arc, Mutex};

use paygate_sandbox::{CallObserver, FaultProfile, ObservedCall, SimTarget};
use paygate_state_store::{testing::Backend, SqlDatabase};

use crate::helpers::{backends, confirm_body, spawn_app};

/// Terminates every PostgreSQL connection of the app (found by its
/// `application_name`) when a call of `target` reaches the simulator.
struct Terminator {
    admin: SqlDatabase,
    application_name: String,
    target: SimTarget,
    killed: Mutex<Vec<i64>>,
}

#[async_trait::async_trait]
impl CallObserver for Terminator {
    async fn on_call(&self, call: ObservedCall) {
        if call.target != self.target {
            return;
        }
        if let SqlDatabase::Postgres(pool) = &self.admin {
            let rows: Vec<(bool,)> = sqlx::query_as(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(&self.application_name)
            .fetch_all(pool)
            .await
            .unwrap();
            self.killed.lock().unwrap().push(rows.len() as i64);
        }
    }
}

/// PostgreSQL only, so it is ignored by default rather than passing without
/// running; `.ci/run` runs it with `--ignored` (it fails without the URL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL: set PAYGATE_TEST_POSTGRES_URL and run with --ignored (.ci/run does)"]
async fn postgres_connections_terminated_mid_confirm() {
    let url = std::env::var("PAYGATE_TEST_POSTGRES_URL")
        .expect("this test needs PAYGATE_TEST_POSTGRES_URL (a PostgreSQL the test may terminate connections on)");
    let admin_url = &url;
    let backend = Backend::Postgres(url.clone());
    {
        for target in [SimTarget::Card, SimTarget::Ledger] {
            let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
            let url = app.config.database_url.expose().clone();
            let application_name = url.split("application_name=").nth(1).unwrap().to_owned();
            let admin = SqlDatabase::connect(admin_url, 1).await.unwrap();
            let terminator = Arc::new(Terminator {
                admin,
                application_name,
                target,
                killed: Mutex::new(Vec::new()),
            });
            app.sandbox.card.set_observer(terminator.clone());
            app.sandbox.ledger.set_observer(terminator.clone());

            let order = format!("order-kill-{target:?}").to_lowercase();
            let resp = app.confirm(&confirm_body(&order, 8_000)).await;
            let status = resp.status().as_u16();
            assert!(
                [200, 202, 503].contains(&status),
                "{target:?}: unexpected {status}"
            );
            assert!(
                terminator.killed.lock().unwrap().iter().sum::<i64>() >= 1,
                "connections were terminated"
            );

            eprintln!(
                "killed {:?} at the {target:?} call: merchant got {status}",
                terminator.killed.lock().unwrap()
            );
            // Whatever the answer, the approval is not lost and not doubled:
            // the record is paid, or left PENDING/UNKNOWN for the batch.
            let card = app.sandbox.card.stats();
            assert_eq!(card.approvals, 1, "{target:?}");
            let got: serde_json::Value = app
                .get(&app.key, &format!("/v1/payments/orders/{order}"))
                .await
                .json()
                .await
                .unwrap();
            let state = got["status"].as_str().unwrap().to_owned();
            assert!(
                ["DONE", "IN_PROGRESS", "UNKNOWN"].contains(&state.as_str()),
                "{target:?}: {got}"
            );
            if status == 200 {
                assert_eq!(state, "DONE");
            }
            // The card call was logged before it was made.
            let pid = paygate_core::PaymentId::from_stored(got["paymentId"].as_str().unwrap());
            let rows = app.log().for_payment(&pid).await.unwrap();
            assert_eq!(
                rows.first().map(|r| (r.target.as_str(), r.kind.as_str())),
                Some(("card_api", "REQUEST"))
            );
            // A ledger record exists only for a paid payment, and once.
            assert!(app.sandbox.ledger.stats().records <= 1);
            if got["saved"] == true {
                assert_eq!(app.sandbox.ledger.stats().records, 1);
            }
            // The merchant's retry replays the same payment, never a new charge.
            let again: serde_json::Value = app
                .confirm(&confirm_body(&order, 8_000))
                .await
                .json()
                .await
                .unwrap();
            assert_eq!(again["paymentId"], got["paymentId"]);
            assert_eq!(app.sandbox.card.stats().approvals, 1);
            app.teardown().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_goes_away_makes_readyz_fail_and_confirms_503() {
    for backend in backends() {
        let app = spawn_app(&backend, FaultProfile::none(), |_| {}).await;
        assert_eq!(
            app.client
                .get(format!("{}/readyz", app.base))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        app.app_db.close().await;
        let ready = app
            .client
            .get(format!("{}/readyz", app.base))
            .send()
            .await
            .unwrap();
        assert_eq!(ready.status(), 503, "{}", backend.name());
        let resp = app.confirm(&confirm_body("order-store-gone", 1_000)).await;
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["content-type"], "application/problem+json");
        assert_eq!(
            app.sandbox.card.stats().confirm_calls,
            0,
            "nothing is charged without a record"
        );
        assert_eq!(
            app.client
                .get(format!("{}/healthz", app.base))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
        app.teardown().await;
    }
}
