//! The SQLite group-commit writer (issue 18): concurrent writes share
//! commits, each caller is answered after the commit that carried its
//! write, and one failing write is undone alone.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use paygate_state_store::{LogRow, SqlDatabase};

async fn fresh(name: &str) -> (SqlDatabase, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!(
        "paygate-group-commit-{name}-{}-{}.db",
        std::process::id(),
        paygate_core::time::now_ms()
    ));
    let url = format!("sqlite://{}", path.display());
    let db = SqlDatabase::connect(&url, 8).await.unwrap();
    db.migrate().await.unwrap();
    (db, path)
}

fn row(payment_id: &str, attempt: i32) -> LogRow<'_> {
    LogRow {
        payment_id,
        target: "card_api",
        kind: "REQUEST",
        attempt,
        method: "POST",
        path: "/v1/payments/confirm",
        status_code: None,
        body: Some("{}".to_owned()),
        latency_ms: None,
        created_at: 1,
    }
}

async fn count(db: &SqlDatabase) -> i64 {
    let SqlDatabase::Sqlite(s) = db else {
        panic!("SQLite")
    };
    sqlx::query_scalar("SELECT COUNT(*) FROM api_logs")
        .fetch_one(&s.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits_and_every_answered_write_is_durable() {
    let (db, path) = fresh("shared").await;
    let SqlDatabase::Sqlite(s) = &db else {
        panic!("SQLite")
    };
    let writer = s.writer().expect("a file database has a writer").clone();
    let (commits_before, writes_before) = writer.committed();
    let tasks: Vec<_> = (0..256)
        .map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                let id = format!("pay_{i}");
                db.append_log_row(&row(&id, 1)).await.unwrap();
                // Answered after its commit: a read on another connection sees it.
                let SqlDatabase::Sqlite(s) = &db else {
                    panic!("SQLite")
                };
                let n: i64 =
                    sqlx::query_scalar("SELECT COUNT(*) FROM api_logs WHERE payment_id = $1")
                        .bind(&id)
                        .fetch_one(&s.pool)
                        .await
                        .unwrap();
                assert_eq!(n, 1, "{id} answered before it was readable");
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(count(&db).await, 256);
    let (commits, writes) = writer.committed();
    let (commits, writes) = (commits - commits_before, writes - writes_before);
    assert_eq!(writes, 256, "every write went through the writer");
    assert!(
        commits < writes,
        "256 concurrent writes took {commits} commits: none was shared"
    );
    db.close().await;
    let _ = std::fs::remove_file(path);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_is_undone_alone_and_its_batch_commits() {
    let (db, path) = fresh("alone").await;
    let SqlDatabase::Sqlite(s) = &db else {
        panic!("SQLite")
    };
    // Each write inserts a row, then some fail after it: their row must
    // not survive, the others' must.
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.write(move |c| {
                    Box::pin(async move {
                        sqlx::query("INSERT INTO api_logs (payment_id, target, kind, attempt, method, path, created_at) VALUES ($1, 'card_api', 'REQUEST', 1, 'POST', '/x', 1)")
                            .bind(format!("pay_{i}"))
                            .execute(&mut *c)
                            .await
                            .map_err(paygate_state_store::sql::map_err)?;
                        if i % 4 == 0 {
                            // A statement that fails: no such table.
                            sqlx::query("INSERT INTO no_such_table VALUES (1)")
                                .execute(&mut *c)
                                .await
                                .map_err(paygate_state_store::sql::map_err)?;
                        }
                        // Asked to roll back, without an error.
                        Ok(((), i % 4 != 1))
                    })
                })
                .await
            })
        })
        .collect();
    let mut failed = 0;
    for t in tasks {
        if t.await.unwrap().is_err() {
            failed += 1;
        }
    }
    assert_eq!(
        failed, 16,
        "the failing writes, and only they, report an error"
    );
    assert_eq!(
        count(&db).await,
        32,
        "kept: 64 - 16 failed - 16 rolled back"
    );
    db.close().await;
    assert!(
        db.append_log_row(&row("pay_after", 1)).await.is_err(),
        "a closed database refuses writes"
    );
    let _ = std::fs::remove_file(path);
}
