//! `MongoInventoryStore`: inventory and holds on MongoDB (official driver),
//! without multi-document transactions, so it runs the same on a standalone
//! server and on a replica set.
//!
//! - `inventory`: one document per (merchant, SKU), `_id = "<merchant>|<sku>"`,
//!   with `stock`, `sold`, a version `v` and `lines`: one entry per hold on
//!   that SKU (`h` hold id, `q` quantity, `s` state, `e` expires_at, `hv`
//!   the version of the hold document its writer read). The
//!   SKU's document *is* its lock: every change reads it, decides, and
//!   replaces it with a filter on `{_id, v}` (a single-document conditional
//!   write, atomic by the driver's documented semantics); a lost race reads
//!   again. Availability is therefore one read by `_id`: `stock - sold - Σ q`
//!   of the lines `during`, or `pre` with `e > now`. Expired and released
//!   lines are dropped on the next write; `sold` lines stay, so a replayed
//!   sale finds them and adds nothing twice.
//! - `holds`: one document per hold (`_id = hold_id`, unique index on
//!   `(merchant_id, order_id)`, index on `(state, expires_at)` for
//!   housekeeping), what `GET /v1/holds/{id}` reads.
//!
//! No transaction spans the SKU documents and the hold's, so every change
//! is ordered so that a writer dying half way leaves units held by nobody
//! only in a shape a later pass can find and free, never units sold twice:
//!
//! - a take writes its `pre` lines, then the hold; dying half way leaves
//!   `pre` lines that expire at the hold's `expires_at`;
//! - a confirm's `begin_payment` writes `during` lines carrying the hold
//!   version it read (`hv`), then moves the hold to `during` guarded on that
//!   version (a lost race reads again and starts over);
//! - a release or a stuck-hold release moves the hold first (guarded), then
//!   drops the lines written for an earlier version of the hold (`hv` below
//!   the version the release left), so a confirm that began on the hold
//!   since (its lines carry the newer version) keeps its units;
//! - a sale turns the lines `sold`, then the hold.
//!
//! `during` lines never expire. One whose hold is not `during` (its
//! `begin_payment` died before moving the hold, or its release died after
//! moving it) is freed by [`InventoryStore::repair_lines`], which the
//! batch runs: it fences the hold (one version on, state unchanged) and
//! then drops the lines written for a version at or below the one it
//! fenced, so a confirm still between its two steps loses its guarded move
//! and starts over rather than calling the card on units it no longer
//! holds.

use mongodb::{
    bson::{doc, Bson, Document},
    options::IndexOptions,
    Collection, Database, IndexModel,
};
use paygate_core::{MerchantId, OrderId};

use crate::{
    inventory::{
        is_active, BeginOutcome, Hold, HoldItem, HoldState, HoldTransition, InventoryStore,
        SellOutcome, SetStock, StockLevel, TakeOutcome,
    },
    mongo::{is_duplicate, map_err},
    StoreError,
};

const INVENTORY: &str = "inventory";
const HOLDS: &str = "holds";
/// Conditional writes of one SKU document before giving up (each lost try
/// means another writer's change applied: the system made progress).
const SKU_ATTEMPTS: usize = 10_000;
/// Tries of a `begin_payment` whose guarded move of the hold lost a race
/// (each lost try means another writer changed the hold).
const BEGIN_ATTEMPTS: usize = 16;

/// Inventory and holds on MongoDB.
#[derive(Clone, Debug)]
pub struct MongoInventoryStore {
    db: Database,
}

#[derive(Clone, Debug)]
struct Line {
    h: String,
    q: i64,
    s: HoldState,
    e: i64,
    /// The version of the hold document the line's writer read (-1 for a
    /// line written before lines carried it).
    hv: i64,
}

#[derive(Clone, Debug)]
struct Sku {
    stock: i64,
    sold: i64,
    lines: Vec<Line>,
}

impl Sku {
    fn held(&self, now: i64, except: &str) -> i64 {
        self.lines
            .iter()
            .filter(|l| l.h != except && is_active(l.s, l.e, now))
            .map(|l| l.q)
            .sum()
    }

    fn line(&self, h: &str) -> Option<&Line> {
        self.lines.iter().find(|l| l.h == h)
    }

    fn put(&mut self, line: Line) {
        self.lines.retain(|l| l.h != line.h);
        self.lines.push(line);
    }
}

fn int(d: &Document, k: &str) -> Result<i64, StoreError> {
    match d.get(k) {
        Some(Bson::Int64(v)) => Ok(*v),
        Some(Bson::Int32(v)) => Ok(i64::from(*v)),
        _ => Err(StoreError::Corrupt(format!("field {k} is not an integer"))),
    }
}

fn text(d: &Document, k: &str) -> Result<String, StoreError> {
    d.get_str(k)
        .map(str::to_owned)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn sku_from_doc(d: &Document) -> Result<(i64, Sku), StoreError> {
    let mut lines = Vec::new();
    if let Ok(arr) = d.get_array("lines") {
        for l in arr {
            let Bson::Document(l) = l else {
                return Err(StoreError::Corrupt("inventory line".to_owned()));
            };
            lines.push(Line {
                h: text(l, "h")?,
                q: int(l, "q")?,
                s: HoldState::parse(&text(l, "s")?)?,
                e: int(l, "e")?,
                hv: int(l, "hv").unwrap_or(-1),
            });
        }
    }
    Ok((
        int(d, "v")?,
        Sku {
            stock: int(d, "stock")?,
            sold: int(d, "sold")?,
            lines,
        },
    ))
}

fn hold_to_doc(h: &Hold) -> Document {
    let items: Vec<Bson> = h
        .items
        .iter()
        .map(|i| Bson::Document(doc! {"sku": &i.sku, "quantity": i.quantity}))
        .collect();
    doc! {
        "_id": &h.hold_id, "merchant_id": h.merchant_id.as_str(), "order_id": h.order_id.as_str(),
        "items": items, "state": h.state.as_str(), "expires_at": h.expires_at,
        "fingerprint": &h.fingerprint, "created_at": h.created_at, "updated_at": h.updated_at,
        "version": h.version,
    }
}

fn hold_from_doc(d: &Document) -> Result<Hold, StoreError> {
    let mut items = Vec::new();
    if let Ok(arr) = d.get_array("items") {
        for i in arr {
            let Bson::Document(i) = i else {
                return Err(StoreError::Corrupt("hold item".to_owned()));
            };
            items.push(HoldItem {
                sku: text(i, "sku")?,
                quantity: int(i, "quantity")?,
            });
        }
    }
    Ok(Hold {
        hold_id: text(d, "_id")?,
        merchant_id: MerchantId::from_stored(text(d, "merchant_id")?),
        order_id: OrderId::from_stored(text(d, "order_id")?),
        items,
        state: HoldState::parse(&text(d, "state")?)?,
        expires_at: int(d, "expires_at")?,
        fingerprint: text(d, "fingerprint")?,
        created_at: int(d, "created_at")?,
        updated_at: int(d, "updated_at")?,
        version: crate::mongo::version_of(d),
    })
}

fn sku_id(m: &MerchantId, sku: &str) -> String {
    format!("{}|{sku}", m.as_str())
}

impl MongoInventoryStore {
    /// The instant a hold's expiry is judged at: the earlier of the
    /// caller's clock and the server's (`localTime` of `hello`), so a
    /// replica whose clock runs ahead cannot free a hold before its time by
    /// the database's clock (the SQL stores do the same in their query).
    /// One round trip; a server that reports no `localTime` leaves the
    /// caller's clock.
    ///
    /// # Errors
    /// [`StoreError`] when the server does not answer.
    async fn judged_now(&self, caller_ms: i64) -> Result<i64, StoreError> {
        let hello = self
            .db
            .run_command(doc! {"hello": 1})
            .await
            .map_err(map_err)?;
        Ok(match hello.get_datetime("localTime") {
            Ok(at) => caller_ms.min(at.timestamp_millis()),
            Err(_) => caller_ms,
        })
    }

    /// The store on `db`; creates its indexes.
    ///
    /// # Errors
    /// [`StoreError`] when an index cannot be built.
    pub async fn new(db: Database) -> Result<Self, StoreError> {
        let store = Self { db };
        let holds = store.holds();
        for (keys, unique, name) in [
            (
                doc! {"merchant_id": 1, "order_id": 1},
                true,
                "merchant_order",
            ),
            (doc! {"state": 1, "expires_at": 1}, false, "state_expires"),
        ] {
            let index = IndexModel::builder()
                .keys(keys)
                .options(
                    IndexOptions::builder()
                        .unique(unique)
                        .name(name.to_owned())
                        .build(),
                )
                .build();
            holds.create_index(index).await.map_err(map_err)?;
        }
        Ok(store)
    }

    fn inventory(&self) -> Collection<Document> {
        self.db.collection(INVENTORY)
    }

    fn holds(&self) -> Collection<Document> {
        self.db.collection(HOLDS)
    }

    /// Reads the SKU's document (a missing one is empty: stock 0), lets `f`
    /// decide on it, and when `f` says to write, replaces it guarded on the
    /// version read (inserting it when missing); a lost race starts over.
    /// Lines that no longer count and are not `sold` are dropped on write.
    async fn update_sku<T>(
        &self,
        m: &MerchantId,
        sku: &str,
        now: i64,
        mut f: impl FnMut(&mut Sku) -> (bool, T),
    ) -> Result<T, StoreError> {
        let id = sku_id(m, sku);
        for _ in 0..SKU_ATTEMPTS {
            let found = self
                .inventory()
                .find_one(doc! {"_id": &id})
                .await
                .map_err(map_err)?;
            let (v, mut s) = match &found {
                Some(d) => sku_from_doc(d)?,
                None => (
                    0,
                    Sku {
                        stock: 0,
                        sold: 0,
                        lines: Vec::new(),
                    },
                ),
            };
            let (write, out) = f(&mut s);
            if !write {
                return Ok(out);
            }
            s.lines
                .retain(|l| l.s == HoldState::Sold || is_active(l.s, l.e, now));
            let lines: Vec<Bson> = s
                .lines
                .iter()
                .map(|l| {
                    Bson::Document(
                        doc! {"h": &l.h, "q": l.q, "s": l.s.as_str(), "e": l.e, "hv": l.hv},
                    )
                })
                .collect();
            let new = doc! {
                "_id": &id, "merchant_id": m.as_str(), "sku": sku, "stock": s.stock,
                "sold": s.sold, "v": v + 1, "lines": lines, "updated_at": now,
            };
            let applied = if found.is_some() {
                self.inventory()
                    .replace_one(doc! {"_id": &id, "v": v}, new)
                    .await
                    .map_err(map_err)?
                    .matched_count
                    == 1
            } else {
                match self.inventory().insert_one(new).await {
                    Ok(_) => true,
                    Err(e) if is_duplicate(&e) => false,
                    Err(e) => return Err(map_err(e)),
                }
            };
            if applied {
                return Ok(out);
            }
            tokio::task::yield_now().await;
        }
        Err(StoreError::Unavailable(format!(
            "SKU {sku} too contended; retry"
        )))
    }

    /// Puts a line for `hold` in state `s` on each of its SKUs where its
    /// quantity is available without it (a line already `during` or `sold`
    /// stays as it is). Returns the short SKUs; when there are any, the lines
    /// this call wrote are removed again.
    async fn reserve(
        &self,
        hold: &Hold,
        s: HoldState,
        now: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut short = Vec::new();
        let mut wrote = Vec::new();
        for item in &hold.items {
            let ok = self
                .update_sku(&hold.merchant_id, &item.sku, now, |sku| {
                    if let Some(l) = sku.line(&hold.hold_id) {
                        match l.s {
                            HoldState::Sold => return (false, true),
                            // The hold's own units, already counted: kept,
                            // and marked as written for the version this
                            // writer read, so a release or repair of an
                            // earlier version leaves them.
                            HoldState::During if s == HoldState::During => {
                                if l.hv == hold.version {
                                    return (false, true);
                                }
                                let mut l = l.clone();
                                l.hv = hold.version;
                                sku.put(l);
                                return (true, true);
                            }
                            _ => {}
                        }
                    }
                    if !short.is_empty()
                        || sku.stock - sku.sold - sku.held(now, &hold.hold_id) < item.quantity
                    {
                        let fits =
                            sku.stock - sku.sold - sku.held(now, &hold.hold_id) >= item.quantity;
                        return (false, fits);
                    }
                    sku.put(Line {
                        h: hold.hold_id.clone(),
                        q: item.quantity,
                        s,
                        e: hold.expires_at,
                        hv: hold.version,
                    });
                    (true, true)
                })
                .await?;
            if !ok {
                short.push(item.sku.clone());
            } else if short.is_empty() {
                wrote.push(item.sku.clone());
            }
        }
        if !short.is_empty() {
            let version = hold.version;
            for sku in &wrote {
                self.drop_line(&hold.merchant_id, &hold.hold_id, sku, now, |l| {
                    l.hv == version && matches!(l.s, HoldState::Pre | HoldState::During)
                })
                .await?;
            }
        }
        Ok(short)
    }

    /// Removes the line of hold `hold_id` from `(merchant, sku)` when
    /// `drop` says so of it; `true` when one was removed.
    async fn drop_line(
        &self,
        merchant: &MerchantId,
        hold_id: &str,
        sku: &str,
        now: i64,
        drop: impl Fn(&Line) -> bool,
    ) -> Result<bool, StoreError> {
        self.update_sku(merchant, sku, now, |s| {
            match s.line(hold_id) {
                Some(l) if drop(l) => {}
                _ => return (false, false),
            }
            s.lines.retain(|l| l.h != hold_id);
            (true, true)
        })
        .await
    }

    /// Drops the lines of `hold` (on each of its SKUs) that are not sold and
    /// were written for a version of the hold below `below`: what a release
    /// that left the hold at `below` frees. A line a confirm wrote for that
    /// version or a later one (it began on the hold since) stays.
    async fn drop_lines_before(
        &self,
        hold: &Hold,
        below: i64,
        now: i64,
    ) -> Result<u64, StoreError> {
        let mut dropped = 0;
        for item in &hold.items {
            if self
                .drop_line(&hold.merchant_id, &hold.hold_id, &item.sku, now, |l| {
                    l.s != HoldState::Sold && l.hv < below
                })
                .await?
            {
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Applies `t` to the hold `hold_id`, its rule compiled into one
    /// conditional update; the hold as it was left, `None` when the guard
    /// did not hold.
    async fn apply_hold(
        &self,
        hold_id: &str,
        t: &HoldTransition,
        now: i64,
    ) -> Result<Option<Hold>, StoreError> {
        let (mut filter, update) = t.rule().to_mongo::<Hold>(now);
        filter.insert("_id", hold_id);
        self.holds()
            .find_one_and_update(filter, update)
            .return_document(mongodb::options::ReturnDocument::After)
            .await
            .map_err(map_err)?
            .map(|d| hold_from_doc(&d))
            .transpose()
    }
}

impl MongoInventoryStore {
    /// Drops the `during` lines of `hold_id`, a hold with no document, from
    /// the SKU documents in `docs` of `merchant`.
    async fn drop_orphan_lines(
        &self,
        merchant: &MerchantId,
        hold_id: &str,
        docs: &[Document],
        now_ms: i64,
    ) -> Result<u64, StoreError> {
        let mut dropped = 0;
        for d in docs {
            let sku = text(d, "sku")?;
            if text(d, "merchant_id")? != merchant.as_str() {
                continue;
            }
            let gone = self
                .drop_line(merchant, hold_id, &sku, now_ms, |l| {
                    l.s == HoldState::During
                })
                .await?;
            if gone {
                dropped += 1;
            }
        }
        Ok(dropped)
    }
}

#[async_trait::async_trait]
impl InventoryStore for MongoInventoryStore {
    async fn set_stock(
        &self,
        merchant: &MerchantId,
        sku: &str,
        stock: i64,
        now_ms: i64,
    ) -> Result<SetStock, StoreError> {
        let now_ms = self.judged_now(now_ms).await?;
        self.update_sku(merchant, sku, now_ms, |s| {
            let held = s.held(now_ms, "");
            if stock < s.sold + held {
                return (
                    false,
                    SetStock::BelowCommitted(StockLevel::new(sku, s.stock, s.sold, held)),
                );
            }
            s.stock = stock;
            (
                true,
                SetStock::Set(StockLevel::new(sku, stock, s.sold, held)),
            )
        })
        .await
    }

    async fn level(
        &self,
        merchant: &MerchantId,
        sku: &str,
        now_ms: i64,
    ) -> Result<Option<StockLevel>, StoreError> {
        let now_ms = self.judged_now(now_ms).await?;
        let found = self
            .inventory()
            .find_one(doc! {"_id": sku_id(merchant, sku)})
            .await
            .map_err(map_err)?;
        found
            .map(|d| {
                let (_, s) = sku_from_doc(&d)?;
                Ok(StockLevel::new(sku, s.stock, s.sold, s.held(now_ms, "")))
            })
            .transpose()
    }

    async fn take(&self, hold: &Hold, now_ms: i64) -> Result<TakeOutcome, StoreError> {
        let now_ms = self.judged_now(now_ms).await?;
        if let Some(existing) = self
            .hold_by_order(&hold.merchant_id, &hold.order_id)
            .await?
        {
            return Ok(TakeOutcome::Exists(existing));
        }
        let short = self.reserve(hold, HoldState::Pre, now_ms).await?;
        if !short.is_empty() {
            return Ok(
                match self
                    .hold_by_order(&hold.merchant_id, &hold.order_id)
                    .await?
                {
                    Some(existing) => TakeOutcome::Exists(existing),
                    None => TakeOutcome::OutOfStock(short),
                },
            );
        }
        match self.holds().insert_one(hold_to_doc(hold)).await {
            Ok(_) => Ok(TakeOutcome::Taken(hold.clone())),
            Err(e) if is_duplicate(&e) => {
                for item in &hold.items {
                    self.drop_line(&hold.merchant_id, &hold.hold_id, &item.sku, now_ms, |l| {
                        l.s == HoldState::Pre
                    })
                    .await?;
                }
                match self
                    .hold_by_order(&hold.merchant_id, &hold.order_id)
                    .await?
                {
                    Some(existing) => Ok(TakeOutcome::Exists(existing)),
                    None => Err(StoreError::Unavailable(
                        "a hold claimed its order and vanished; retry".to_owned(),
                    )),
                }
            }
            Err(e) => Err(map_err(e)),
        }
    }

    async fn hold(&self, merchant: &MerchantId, hold_id: &str) -> Result<Option<Hold>, StoreError> {
        self.holds()
            .find_one(doc! {"_id": hold_id, "merchant_id": merchant.as_str()})
            .await
            .map_err(map_err)?
            .map(|d| hold_from_doc(&d))
            .transpose()
    }

    async fn hold_by_order(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
    ) -> Result<Option<Hold>, StoreError> {
        self.holds()
            .find_one(doc! {"merchant_id": merchant.as_str(), "order_id": order.as_str()})
            .await
            .map_err(map_err)?
            .map(|d| hold_from_doc(&d))
            .transpose()
    }

    async fn begin_payment(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<BeginOutcome, StoreError> {
        let now_ms = self.judged_now(now_ms).await?;
        for _ in 0..BEGIN_ATTEMPTS {
            let Some(hold) = self.hold_by_order(merchant, order).await? else {
                return Ok(BeginOutcome::NoHold);
            };
            match hold.state {
                HoldState::Sold => return Ok(BeginOutcome::Sold(hold)),
                HoldState::During => {
                    // The fence against a stale `release_stuck` (see the
                    // trait): one version on.
                    let touched = self
                        .apply_hold(&hold.hold_id, &HoldTransition::Refence, now_ms)
                        .await?;
                    if let Some(h) = touched {
                        return Ok(BeginOutcome::During(h));
                    }
                    // Sold or released meanwhile: read again.
                }
                HoldState::Pre | HoldState::Released => {
                    // Lines first (written for the version read), then the
                    // hold, guarded on that version: a release, a repair or
                    // another confirm that changed the hold in between makes
                    // this move fail, and this confirm starts over.
                    let short = self.reserve(&hold, HoldState::During, now_ms).await?;
                    let to = if short.is_empty() {
                        HoldState::During
                    } else {
                        HoldState::Released
                    };
                    let begin = HoldTransition::Begin {
                        to,
                        seen_version: Some(hold.version),
                    };
                    let moved = self.apply_hold(&hold.hold_id, &begin, now_ms).await?;
                    match moved {
                        Some(hold) if short.is_empty() => return Ok(BeginOutcome::During(hold)),
                        Some(hold) => return Ok(BeginOutcome::Expired { hold, short }),
                        None => {}
                    }
                }
            }
            tokio::task::yield_now().await;
        }
        Err(StoreError::Unavailable(format!(
            "the hold of order {order} changed {BEGIN_ATTEMPTS} times while a confirm began; retry"
        )))
    }

    async fn sell(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<SellOutcome, StoreError> {
        let now_ms = self.judged_now(now_ms).await?;
        let Some(hold) = self.hold_by_order(merchant, order).await? else {
            return Ok(SellOutcome::NoHold);
        };
        if hold.state == HoldState::Sold {
            return Ok(SellOutcome::AlreadySold);
        }
        let mut oversold = Vec::new();
        for item in &hold.items {
            let over = self
                .update_sku(merchant, &item.sku, now_ms, |s| {
                    let write = match s.line(&hold.hold_id) {
                        Some(l) if l.s == HoldState::Sold => false,
                        _ => {
                            s.sold += item.quantity;
                            s.put(Line {
                                h: hold.hold_id.clone(),
                                q: item.quantity,
                                s: HoldState::Sold,
                                e: hold.expires_at,
                                hv: hold.version,
                            });
                            true
                        }
                    };
                    (write, s.stock - s.sold - s.held(now_ms, "") < 0)
                })
                .await?;
            if over {
                oversold.push(item.sku.clone());
            }
        }
        match self
            .apply_hold(&hold.hold_id, &HoldTransition::Sell, now_ms)
            .await?
        {
            Some(hold) => Ok(SellOutcome::Sold { hold, oversold }),
            None => Ok(SellOutcome::AlreadySold),
        }
    }

    async fn release(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        from: &[HoldState],
        now_ms: i64,
    ) -> Result<Option<Hold>, StoreError> {
        let Some(hold) = self.hold_by_order(merchant, order).await? else {
            return Ok(None);
        };
        // The hold first, then the lines written for earlier versions of
        // it: a release that dies in between leaves lines of a released
        // hold, which `repair_lines` frees.
        let release = HoldTransition::Release {
            from: from.to_vec(),
        };
        if from.contains(&hold.state) {
            if let Some(released) = self.apply_hold(&hold.hold_id, &release, now_ms).await? {
                self.drop_lines_before(&hold, released.version, now_ms)
                    .await?;
            }
        }
        self.hold(merchant, &hold.hold_id).await
    }

    async fn stuck_during(
        &self,
        updated_before_ms: i64,
        after_hold_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Hold>, StoreError> {
        use futures_util::TryStreamExt;
        let docs: Vec<Document> = self
            .holds()
            .find(doc! {
                "state": "during",
                "updated_at": {"$lte": updated_before_ms},
                "_id": {"$gt": after_hold_id.unwrap_or("")},
            })
            .sort(doc! {"_id": 1})
            .limit(i64::from(limit))
            .await
            .map_err(map_err)?
            .try_collect()
            .await
            .map_err(map_err)?;
        docs.iter().map(hold_from_doc).collect()
    }

    async fn release_stuck(&self, seen: &Hold, now_ms: i64) -> Result<bool, StoreError> {
        // The hold first, guarded on the version read: a confirm that began
        // on it since moved the version and keeps it. Then the lines written
        // for a version below the one this release left; a confirm that
        // begins on the released hold from now on writes its lines for the
        // newer version, and they stay. A release that dies in between
        // leaves lines of a released hold, which `repair_lines` frees.
        let release = HoldTransition::ReleaseStuck {
            seen_version: seen.version,
        };
        let Some(released) = self.apply_hold(&seen.hold_id, &release, now_ms).await? else {
            return Ok(false);
        };
        self.drop_lines_before(seen, released.version, now_ms)
            .await?;
        Ok(true)
    }

    async fn repair_lines(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError> {
        use futures_util::TryStreamExt;
        let docs: Vec<Document> = self
            .inventory()
            .find(doc! {"lines.s": HoldState::During.as_str()})
            .limit(i64::from(limit.max(1)))
            .await
            .map_err(map_err)?
            .try_collect()
            .await
            .map_err(map_err)?;
        let mut held_by: Vec<(MerchantId, String)> = Vec::new();
        for d in &docs {
            let (_, sku) = sku_from_doc(d)?;
            let merchant = MerchantId::from_stored(text(d, "merchant_id")?);
            for l in sku.lines.iter().filter(|l| l.s == HoldState::During) {
                if !held_by.iter().any(|(_, h)| *h == l.h) {
                    held_by.push((merchant.clone(), l.h.clone()));
                }
            }
        }
        let mut freed = 0;
        for (merchant, hold_id) in held_by {
            let found = self
                .holds()
                .find_one(doc! {"_id": &hold_id})
                .await
                .map_err(map_err)?;
            let hold = match found {
                Some(d) => hold_from_doc(&d)?,
                // No hold document (a purged hold whose confirm died half
                // way): its lines hold units for nobody; no confirm can
                // begin on a hold that does not exist.
                None => {
                    freed += self
                        .drop_orphan_lines(&merchant, &hold_id, &docs, now_ms)
                        .await?;
                    continue;
                }
            };
            if matches!(hold.state, HoldState::During | HoldState::Sold) {
                continue;
            }
            // Fence: one version on, state unchanged. A confirm between its
            // two steps (lines written for the version read, the hold not
            // moved yet) then fails its guarded move and starts over; its
            // lines are written for a version this fence passed, so they
            // are dropped below and written again by its next try.
            let fence = HoldTransition::Fence {
                state: hold.state,
                seen_version: hold.version,
            };
            let Some(fenced) = self.apply_hold(&hold.hold_id, &fence, now_ms).await? else {
                continue; // changed meanwhile: the next run looks again
            };
            let dropped = self
                .drop_lines_before(&fenced, fenced.version, now_ms)
                .await?;
            if dropped > 0 {
                tracing::warn!(hold_id = %fenced.hold_id, lines = dropped, "freed units held by lines of a hold that is not during (a writer died between its steps)");
            }
            freed += dropped;
        }
        Ok(freed)
    }

    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError> {
        let r = self
            .holds()
            .delete_many(doc! {"$or": [
                {"state": "released", "updated_at": {"$lt": before_ms}},
                {"state": "pre", "expires_at": {"$lt": before_ms}},
            ]})
            .await
            .map_err(map_err)?;
        Ok(r.deleted_count)
    }
}
