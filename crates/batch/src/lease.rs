//! A lease in the SQL database so that one sweep runs at a time across
//! replicas. A lease has an owner and an expiry; the holder renews it while
//! it works; a lease past its expiry (its holder died) is taken over.
//! [`MemoryLeases`] keeps the same rules in memory, for the deterministic
//! simulation (one process, many actors).

use std::time::Duration;

use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use sqlx::Row;

/// Where leases are kept.
#[derive(Clone, Debug)]
enum Leases {
    Sql(SqlDatabase),
    Memory(std::sync::Arc<MemoryLeases>),
}

/// Leases in memory: `name -> (owner, expires_at)`, with the SQL table's
/// rules (free, expired or ours: taken; otherwise held).
#[derive(Debug, Default)]
pub struct MemoryLeases(std::sync::Mutex<std::collections::BTreeMap<String, (String, i64)>>);

impl MemoryLeases {
    fn with<T>(
        &self,
        f: impl FnOnce(&mut std::collections::BTreeMap<String, (String, i64)>) -> T,
    ) -> T {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// A lease on the SQL database (or in [`MemoryLeases`]).
#[derive(Clone, Debug)]
pub struct Lease {
    db: Leases,
    name: String,
    owner: String,
    ttl: Duration,
    /// Expiries are this process's clock plus `ttl`. Another process's
    /// clock judges them: a lease only keeps runs from overlapping (their
    /// writes are guarded on versions), so skew costs at most an overlap.
    clock: paygate_core::Clock,
}

/// Who holds a lease another process wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    /// The holder.
    pub owner: String,
    /// Until when, epoch ms.
    pub expires_at: i64,
}

impl Lease {
    /// A lease `name` for `owner`, valid `ttl` after each acquire or renew.
    pub fn new(db: SqlDatabase, name: &str, owner: &str, ttl: Duration) -> Self {
        Self {
            db: Leases::Sql(db),
            name: name.to_owned(),
            owner: owner.to_owned(),
            ttl,
            clock: paygate_core::Clock::system(),
        }
    }

    /// The same lease kept in `leases` (the simulation's).
    pub fn in_memory(
        leases: std::sync::Arc<MemoryLeases>,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Self {
        Self {
            db: Leases::Memory(leases),
            name: name.to_owned(),
            owner: owner.to_owned(),
            ttl,
            clock: paygate_core::Clock::system(),
        }
    }

    /// The same lease timed by `clock` instead of the process clock.
    #[must_use]
    pub fn with_clock(mut self, clock: paygate_core::Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The owner id.
    pub fn owner(&self) -> &str {
        &self.owner
    }

    fn expiry(&self) -> i64 {
        self.clock.now_ms() + self.ttl.as_millis() as i64
    }

    /// Takes the lease when it is free, expired, or already ours.
    ///
    /// # Errors
    /// `Ok(Err(Held))` when another owner holds it; [`StoreError`] when the
    /// database cannot be reached.
    pub async fn acquire(&self) -> Result<Result<(), Held>, StoreError> {
        let sql = "INSERT INTO batch_leases (name, owner, expires_at) VALUES ($1, $2, $3) \
                   ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at \
                   WHERE batch_leases.expires_at < $4 OR batch_leases.owner = excluded.owner";
        let now = self.clock.now_ms();
        let db = match &self.db {
            Leases::Sql(db) => db,
            Leases::Memory(m) => {
                return Ok(m.with(|t| match t.get(&self.name) {
                    Some((owner, expires_at)) if *expires_at >= now && *owner != self.owner => {
                        Err(Held {
                            owner: owner.clone(),
                            expires_at: *expires_at,
                        })
                    }
                    _ => {
                        t.insert(self.name.clone(), (self.owner.clone(), self.expiry()));
                        Ok(())
                    }
                }))
            }
        };
        let taken = with_pool!(db, pool => sqlx::query(sql)
            .bind(&self.name)
            .bind(&self.owner)
            .bind(self.expiry())
            .bind(now)
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(map_err))?;
        if taken {
            return Ok(Ok(()));
        }
        let held = with_pool!(db, pool => {
            let row = sqlx::query("SELECT owner, expires_at FROM batch_leases WHERE name = $1")
                .bind(&self.name)
                .fetch_one(pool)
                .await
                .map_err(map_err)?;
            let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            Held { owner: row.try_get("owner").map_err(c)?, expires_at: row.try_get("expires_at").map_err(c)? }
        });
        Ok(Err(held))
    }

    /// Extends the lease; `Ok(false)` when it is no longer ours.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn renew(&self) -> Result<bool, StoreError> {
        let sql = "UPDATE batch_leases SET expires_at = $3 WHERE name = $1 AND owner = $2";
        let db = match &self.db {
            Leases::Sql(db) => db,
            Leases::Memory(m) => {
                return Ok(m.with(|t| match t.get_mut(&self.name) {
                    Some((owner, expires_at)) if *owner == self.owner => {
                        *expires_at = self.expiry();
                        true
                    }
                    _ => false,
                }))
            }
        };
        with_pool!(db, pool => sqlx::query(sql)
            .bind(&self.name)
            .bind(&self.owner)
            .bind(self.expiry())
            .execute(pool)
            .await
            .map(|r| r.rows_affected() == 1)
            .map_err(map_err))
    }

    /// Gives the lease up (only if still ours).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn release(&self) -> Result<(), StoreError> {
        let db = match &self.db {
            Leases::Sql(db) => db,
            Leases::Memory(m) => {
                m.with(|t| {
                    if t.get(&self.name).is_some_and(|(o, _)| *o == self.owner) {
                        t.remove(&self.name);
                    }
                });
                return Ok(());
            }
        };
        with_pool!(db, pool => sqlx::query("DELETE FROM batch_leases WHERE name = $1 AND owner = $2")
            .bind(&self.name)
            .bind(&self.owner)
            .execute(pool)
            .await
            .map(|_| ())
            .map_err(map_err))
    }
}

/// A held lease being renewed in the background (every third of its time to
/// live) until [`Renewal::finish`]. See [`Lease::keep_alive`].
#[derive(Debug)]
pub struct Renewal {
    lease: Lease,
    lost: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Starts renewing a lease this owner holds. When a renewal finds the
    /// lease taken over by another owner, [`Renewal::lost`] turns true and
    /// the work under it should stop. A failed renewal (database trouble) is
    /// logged and tried again at the next tick, until `ttl` has passed since
    /// the last renewal that succeeded: from then on another process may
    /// have taken the lease over, so it counts as lost too (two sweeps must
    /// never overlap, even after a database outage longer than the lease).
    pub fn keep_alive(&self, ttl: Duration) -> Renewal {
        let lost = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let task = {
            let (lease, lost, every) = (self.clone(), lost.clone(), ttl / 3);
            tokio::spawn(async move {
                let mut renewed = tokio::time::Instant::now();
                loop {
                    tokio::time::sleep(every).await;
                    match lease.renew().await {
                        Ok(true) => renewed = tokio::time::Instant::now(),
                        Ok(false) => {
                            tracing::error!(lease = %lease.name, "lease lost to another process; stopping");
                            lost.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                        Err(e) if renewed.elapsed() >= ttl => {
                            tracing::error!(lease = %lease.name, error = %e,
                                "could not renew the lease within its time to live; it may be another's now: stopping");
                            lost.store(true, std::sync::atomic::Ordering::SeqCst);
                            return;
                        }
                        Err(e) => {
                            tracing::warn!(lease = %lease.name, error = %e, "could not renew the lease")
                        }
                    }
                }
            })
        };
        Renewal {
            lease: self.clone(),
            lost,
            task,
        }
    }
}

/// A renewal whose work was dropped (its task cancelled, its process
/// stopping) stops renewing: the lease then expires by itself rather than
/// being held forever by a task nobody owns. (Found by the simulation: a
/// sweep killed mid-run kept the lease for good.)
impl Drop for Renewal {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Renewal {
    /// True once the lease was found taken over.
    pub fn lost(&self) -> bool {
        self.lost.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The flag [`Renewal::lost`] reads, to share with workers.
    pub fn lost_flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.lost.clone()
    }

    /// Stops renewing and releases the lease (unless it was lost). A failed
    /// release is logged: the lease then expires by itself.
    pub async fn finish(self) {
        self.task.abort();
        if !self.lost() {
            if let Err(e) = self.lease.release().await {
                tracing::warn!(lease = %self.lease.name, error = %e, "could not release the lease; it expires by itself");
            }
        }
    }
}
