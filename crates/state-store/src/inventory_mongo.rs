//! `MongoInventoryStore`: inventory and holds on MongoDB (official driver),
//! without multi-document transactions, so it runs the same on a standalone
//! server and on a replica set.
//!
//! - `inventory`: one document per (merchant, SKU), `_id = "<merchant>|<sku>"`,
//!   with `stock`, `sold`, a version `v` and `lines`: one entry per hold on
//!   that SKU (`h` hold id, `q` quantity, `s` state, `e` expires_at). The
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
//! A multi-SKU change writes its SKUs one after the other, in SKU order,
//! and the hold document last. A take that dies half way leaves `pre`
//! lines that expire at the hold's `expires_at` (the timestamp rule cleans
//! up after a crash); a take that finds a SKU short removes the lines it
//! wrote. `during` lines never expire: the payment's settlement (confirm,
//! batch or reconciliation) sells or releases them, and a rerun of any step
//! is guarded by the line's state.

use mongodb::{
    bson::{doc, Bson, Document},
    options::IndexOptions,
    Collection, Database, IndexModel,
};
use paygate_core::{MerchantId, OrderId};

use crate::{
    inventory::{
        is_active, BeginOutcome, Hold, HoldItem, HoldState, InventoryStore, SellOutcome, SetStock,
        StockLevel, TakeOutcome,
    },
    mongo::{is_duplicate, map_err},
    StoreError,
};

const INVENTORY: &str = "inventory";
const HOLDS: &str = "holds";
/// Conditional writes of one SKU document before giving up (each lost try
/// means another writer's change applied: the system made progress).
const SKU_ATTEMPTS: usize = 10_000;

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

fn states(from: &[HoldState]) -> Vec<&'static str> {
    from.iter().map(|s| s.as_str()).collect()
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
                .map(|l| Bson::Document(doc! {"h": &l.h, "q": l.q, "s": l.s.as_str(), "e": l.e}))
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
                        if matches!(l.s, HoldState::During | HoldState::Sold) {
                            return (false, true);
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
            for sku in &wrote {
                self.drop_line(hold, sku, &[HoldState::Pre, HoldState::During], now)
                    .await?;
            }
        }
        Ok(short)
    }

    /// Removes `hold`'s line from `sku` when its state is one of `from`.
    async fn drop_line(
        &self,
        hold: &Hold,
        sku: &str,
        from: &[HoldState],
        now: i64,
    ) -> Result<(), StoreError> {
        self.update_sku(&hold.merchant_id, sku, now, |s| {
            match s.line(&hold.hold_id) {
                Some(l) if from.contains(&l.s) => {}
                _ => return (false, ()),
            }
            s.lines.retain(|l| l.h != hold.hold_id);
            (true, ())
        })
        .await
    }

    async fn set_hold_state(
        &self,
        hold_id: &str,
        from: &[HoldState],
        to: HoldState,
        now: i64,
    ) -> Result<bool, StoreError> {
        let r = self
            .holds()
            .update_one(
                doc! {"_id": hold_id, "state": {"$in": states(from)}},
                doc! {"$set": {"state": to.as_str(), "updated_at": now}, "$inc": {"version": 1_i64}},
            )
            .await
            .map_err(map_err)?;
        Ok(r.matched_count == 1)
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
                    self.drop_line(hold, &item.sku, &[HoldState::Pre], now_ms)
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
        let Some(mut hold) = self.hold_by_order(merchant, order).await? else {
            return Ok(BeginOutcome::NoHold);
        };
        match hold.state {
            HoldState::Sold => return Ok(BeginOutcome::Sold(hold)),
            HoldState::During => {
                // The fence against a stale `release_stuck` (see the trait):
                // one version on.
                let touched = self
                    .holds()
                    .find_one_and_update(
                        doc! {"_id": &hold.hold_id, "state": "during"},
                        doc! {"$max": {"updated_at": now_ms}, "$inc": {"version": 1_i64}},
                    )
                    .return_document(mongodb::options::ReturnDocument::After)
                    .await
                    .map_err(map_err)?;
                if let Some(d) = touched {
                    return Ok(BeginOutcome::During(hold_from_doc(&d)?));
                }
                // Changed meanwhile: read again and decide once more.
                let Some(again) = self.hold_by_order(merchant, order).await? else {
                    return Ok(BeginOutcome::NoHold);
                };
                hold = again;
                match hold.state {
                    HoldState::Sold => return Ok(BeginOutcome::Sold(hold)),
                    // Touched by another confirm of this order just now.
                    HoldState::During => return Ok(BeginOutcome::During(hold)),
                    HoldState::Pre | HoldState::Released => {}
                }
            }
            HoldState::Pre | HoldState::Released => {}
        }
        let short = self.reserve(&hold, HoldState::During, now_ms).await?;
        let to = if short.is_empty() {
            HoldState::During
        } else {
            HoldState::Released
        };
        self.set_hold_state(
            &hold.hold_id,
            &[HoldState::Pre, HoldState::Released],
            to,
            now_ms,
        )
        .await?;
        let Some(now) = self.hold(merchant, &hold.hold_id).await? else {
            return Ok(BeginOutcome::NoHold);
        };
        hold = now;
        Ok(match hold.state {
            HoldState::Sold => BeginOutcome::Sold(hold),
            HoldState::During if short.is_empty() => BeginOutcome::During(hold),
            _ => BeginOutcome::Expired { hold, short },
        })
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
        let from = [HoldState::Pre, HoldState::During, HoldState::Released];
        if !self
            .set_hold_state(&hold.hold_id, &from, HoldState::Sold, now_ms)
            .await?
        {
            return Ok(SellOutcome::AlreadySold);
        }
        let mut hold = hold;
        hold.state = HoldState::Sold;
        hold.updated_at = now_ms;
        hold.version += 1;
        Ok(SellOutcome::Sold { hold, oversold })
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
        if from.contains(&hold.state) {
            // Lines first: a release that dies here leaves a hold document
            // that still says pre/during but holds nothing (safe), never the
            // reverse (units held by nobody).
            for item in &hold.items {
                self.drop_line(&hold, &item.sku, from, now_ms).await?;
            }
            self.set_hold_state(&hold.hold_id, from, HoldState::Released, now_ms)
                .await?;
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
        let guard = doc! {"_id": &seen.hold_id, "state": "during", "version": crate::mongo::version_is(seen.version)};
        if self
            .holds()
            .find_one(guard.clone())
            .await
            .map_err(map_err)?
            .is_none()
        {
            return Ok(false);
        }
        // Lines first, as `release` does: a crash here leaves a `during`
        // hold holding nothing, which a rerun finishes.
        for item in &seen.items {
            self.drop_line(seen, &item.sku, &[HoldState::During], now_ms)
                .await?;
        }
        let r = self
            .holds()
            .update_one(
                guard,
                doc! {"$set": {"state": "released", "updated_at": now_ms}, "$inc": {"version": 1_i64}},
            )
            .await
            .map_err(map_err)?;
        if r.matched_count == 1 {
            return Ok(true);
        }
        // A confirm began on it between the check and now (no transaction
        // spans the SKU documents and the hold's): put its lines back. If
        // the units went to others meanwhile, its approval's sale reports
        // the oversell (an `oversold` alert), as for any lapsed hold.
        let _short = self.reserve(seen, HoldState::During, now_ms).await?;
        Ok(false)
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
