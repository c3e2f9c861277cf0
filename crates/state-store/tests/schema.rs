//! Opening the SQL database: a process that only checks the schema waits
//! for the migrations another applies, and one that applies them retries a
//! connection terminated under it, instead of exiting on the first error.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::time::Duration;

use paygate_state_store::{
    testing::{fresh_sql_url, sql_backends, Backend},
    SchemaStep, SqlDatabase, StoreError,
};

#[tokio::test]
async fn a_checking_process_waits_for_the_migrations_and_names_what_is_missing() {
    for backend in sql_backends() {
        let name = backend.name();
        let (url, cleanup) = fresh_sql_url(&backend).await;
        // Nothing applied, and nobody applies it: refused once the wait is
        // over, naming the step to take.
        match SqlDatabase::open(&url, 2, SchemaStep::Check, Duration::from_millis(500)).await {
            Err(StoreError::Rejected(m)) => {
                assert!(
                    m.contains("paygate migrate") && m.contains("0001"),
                    "{name}: {m}"
                )
            }
            Err(e) => panic!("{name}: {e}"),
            Ok(_) => panic!("{name}: an unmigrated schema passed the check"),
        }
        // A replica starting while the migration job runs: it waits, then
        // serves.
        let waiting = tokio::spawn({
            let url = url.clone();
            async move { SqlDatabase::open(&url, 2, SchemaStep::Check, Duration::from_secs(30)).await }
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !waiting.is_finished(),
            "{name}: the check passed before the migrations"
        );
        let migrator = SqlDatabase::open(&url, 1, SchemaStep::Migrate, Duration::from_secs(30))
            .await
            .unwrap();
        let checked = waiting.await.unwrap().unwrap();
        checked.check_schema().await.unwrap();
        checked.close().await;
        migrator.close().await;
        cleanup.run().await;
    }
}

/// `pg_terminate_backend` on every connection of the test's database while
/// the migrations run: `paygate migrate` (and a process that migrates on
/// start) tries again and ends with the schema applied.
#[tokio::test]
async fn a_migration_whose_connection_is_terminated_is_tried_again() {
    for backend in sql_backends() {
        let Backend::Postgres(admin_url) = &backend else {
            continue;
        };
        let (url, cleanup) = fresh_sql_url(&backend).await;
        let app = url.rsplit("application_name=").next().unwrap().to_owned();
        let admin = SqlDatabase::connect(admin_url, 1).await.unwrap();
        let SqlDatabase::Postgres(pool) = &admin else {
            unreachable!()
        };
        let killer = {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut killed = 0u64;
                let until = tokio::time::Instant::now() + Duration::from_millis(1_500);
                while tokio::time::Instant::now() < until {
                    let n: Vec<bool> = sqlx::query_scalar(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                    )
                    .bind(&app)
                    .fetch_all(&pool)
                    .await
                    .unwrap();
                    killed += n.iter().filter(|k| **k).count() as u64;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                killed
            })
        };
        let db = SqlDatabase::open(&url, 1, SchemaStep::Migrate, Duration::from_secs(60))
            .await
            .expect("the migration is tried again until it lands");
        let killed = killer.await.unwrap();
        // The check connects anew: the killer has stopped by now.
        let fresh = SqlDatabase::open(&url, 1, SchemaStep::Check, Duration::from_secs(10))
            .await
            .unwrap();
        println!("{} connections terminated during the migration", killed);
        assert!(killed > 0, "the test terminated no connection");
        fresh.close().await;
        db.close().await;
        admin.close().await;
        cleanup.run().await;
    }
}
