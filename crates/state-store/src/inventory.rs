//! Guards I7 (no oversell): stock per merchant and SKU, and the holds that
//! reserve it while a buyer pays (DESIGN.md §3, seed 004, the timestamp rule).
//!
//! Availability is `stock - sold - Σ quantity of the active holds`, where a
//! hold is *active* while it is `during` (a confirm for its order is at the
//! card company; it does not expire until that payment settles) or `pre`
//! with `expires_at > now`. An expired hold therefore frees its stock the
//! instant it expires, and no job has to run for it.
//!
//! Every write that can make a hold count again (taking it, a confirm that
//! moves it to `during`, a sale) runs under the SKU's lock and checks the
//! availability *without* the hold itself, so no interleaving of takers,
//! confirms and clocks can oversell: `SELECT … FOR UPDATE` on the inventory
//! row on PostgreSQL, the write transaction on SQLite, a version-guarded
//! update of the SKU's document on MongoDB, a mutex in memory. Time is
//! always passed in (`now_ms`, epoch ms), so callers read it from
//! `paygate_core::ambient` and tests and the simulation control it.
//!
//! Backends: [`crate::sql::SqlInventoryStore`] (SQLite, PostgreSQL),
//! `MongoInventoryStore`, `MemoryInventoryStore`. One conformance suite
//! (`tests/inventory.rs`) runs on all of them.

use paygate_core::{MerchantId, OrderId};

use crate::{
    rules::{Change, Cond, Rule, Stored, Value},
    StoreError,
};

/// Where a hold is in its life (DESIGN.md §3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HoldState {
    /// Held while the buyer is in checkout; counts until `expires_at`.
    Pre,
    /// A confirm for the order is at the card company; counts until the
    /// payment settles, whatever `expires_at` says.
    During,
    /// The payment was approved; its units are in the SKU's `sold`.
    Sold,
    /// Given back: decline, no-call abort, `DELETE`, or a confirm that found
    /// it expired and could not take it again.
    Released,
}

impl HoldState {
    /// `pre`, `during`, `sold` or `released` (the stored and API spelling).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pre => "pre",
            Self::During => "during",
            Self::Sold => "sold",
            Self::Released => "released",
        }
    }

    /// Parses [`HoldState::as_str`].
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] on any other text.
    pub fn parse(s: &str) -> Result<Self, StoreError> {
        match s {
            "pre" => Ok(Self::Pre),
            "during" => Ok(Self::During),
            "sold" => Ok(Self::Sold),
            "released" => Ok(Self::Released),
            other => Err(StoreError::Corrupt(format!("hold state {other:?}"))),
        }
    }
}

/// One line of a hold: `quantity` units (>= 1) of `sku`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HoldItem {
    /// The merchant's SKU.
    pub sku: String,
    /// Units, >= 1.
    pub quantity: i64,
}

/// A hold on stock for one order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hold {
    /// `hold_` + ULID.
    pub hold_id: String,
    /// The merchant that took it.
    pub merchant_id: MerchantId,
    /// The order it is for; one hold per `(merchant, orderId)`.
    pub order_id: OrderId,
    /// Its lines, one per SKU, sorted by SKU.
    pub items: Vec<HoldItem>,
    /// Stored state (see [`Hold::is_active`] for what counts).
    pub state: HoldState,
    /// When a `pre` hold stops counting, epoch ms.
    pub expires_at: i64,
    /// Hash of the request that took it (idempotent replays compare it).
    pub fingerprint: String,
    /// Epoch ms.
    pub created_at: i64,
    /// Epoch ms of the last transition (the writer's clock: for ages only).
    pub updated_at: i64,
    /// +1 on every applied change (DESIGN.md §1); a guarded release
    /// compares it. A new hold is version 0.
    pub version: i64,
}

impl Hold {
    /// A new `pre` hold with its items merged per SKU and sorted.
    pub fn new_pre(
        merchant_id: MerchantId,
        order_id: OrderId,
        items: Vec<HoldItem>,
        expires_at: i64,
        fingerprint: String,
        now_ms: i64,
    ) -> Self {
        let mut merged: std::collections::BTreeMap<String, i64> = Default::default();
        for i in items {
            *merged.entry(i.sku).or_default() += i.quantity;
        }
        Self {
            hold_id: format!("hold_{}", paygate_core::ambient::ulid()),
            merchant_id,
            order_id,
            items: merged
                .into_iter()
                .map(|(sku, quantity)| HoldItem { sku, quantity })
                .collect(),
            state: HoldState::Pre,
            expires_at,
            fingerprint,
            created_at: now_ms,
            updated_at: now_ms,
            version: 0,
        }
    }

    /// Whether it counts against availability at `now_ms`: `during`, or
    /// `pre` and not expired.
    pub fn is_active(&self, now_ms: i64) -> bool {
        is_active(self.state, self.expires_at, now_ms)
    }

    /// Whether it is a `pre` hold past its `expires_at`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.state == HoldState::Pre && self.expires_at <= now_ms
    }

    /// The state a merchant sees: the stored one, or `expired` for a `pre`
    /// hold past its time.
    pub fn shown_state(&self, now_ms: i64) -> &'static str {
        if self.is_expired(now_ms) {
            "expired"
        } else {
            self.state.as_str()
        }
    }
}

/// The timestamp rule for one hold (or one hold line).
pub fn is_active(state: HoldState, expires_at: i64, now_ms: i64) -> bool {
    match state {
        HoldState::During => true,
        HoldState::Pre => expires_at > now_ms,
        HoldState::Sold | HoldState::Released => false,
    }
}

/// The stored fields of a hold a [`Rule`] may name (besides `version` and
/// `updated_at`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HoldField {
    /// `state`: `pre`, `during`, `sold` or `released`.
    State,
}

impl Stored for Hold {
    type Field = HoldField;

    fn column(field: HoldField) -> &'static str {
        match field {
            HoldField::State => "state",
        }
    }

    fn read(&self, field: HoldField) -> Value {
        match field {
            HoldField::State => Value::Const(self.state.as_str()),
        }
    }

    fn write(&mut self, field: HoldField, value: Value) {
        match field {
            HoldField::State => {
                if let Some(Ok(s)) = value.text().map(HoldState::parse) {
                    self.state = s;
                }
            }
        }
    }

    fn version(&self) -> i64 {
        self.version
    }

    fn bookkeeping(&mut self) -> (&mut i64, &mut i64) {
        (&mut self.version, &mut self.updated_at)
    }
}

/// A legal change of a hold's state (DESIGN.md §3), defined once: the
/// memory store applies [`HoldTransition::rule`], the SQL and MongoDB
/// stores compile it into their conditional update of the hold. What a
/// change does to the SKUs' numbers (checked under the SKU's lock) stays
/// with each store; the rule decides whether the hold may move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldTransition {
    /// A confirm on a hold already `during`: one version on and
    /// `updated_at` forward (never back, whatever the writer's clock), so
    /// an actor that read the hold earlier and is about to release it
    /// ([`HoldTransition::ReleaseStuck`]) fails its guard.
    Refence,
    /// A confirm begins on a `pre` or `released` hold: to `during` when
    /// its units are available without it, else to `released`. With
    /// `seen_version`, only at that version (MongoDB writes the hold's
    /// lines first, for the version it read).
    Begin {
        /// `during` or `released`.
        to: HoldState,
        /// The version the confirm read, when its lines depend on it.
        seen_version: Option<i64>,
    },
    /// An approval sells the hold, from any state but `sold` (a charge
    /// sells even an expired or released hold; the store reports the
    /// oversell).
    Sell,
    /// Given back from one of `from` (a merchant's `DELETE`, a decline, an
    /// end the payment's record already shows).
    Release {
        /// The states it may be released from.
        from: Vec<HoldState>,
    },
    /// A `during` hold released at the version the releaser read (the
    /// stuck-hold pass, an abort releasing the hold it moved itself): a
    /// confirm that began on it since moved the version and keeps it.
    ReleaseStuck {
        /// The version read.
        seen_version: i64,
    },
    /// One version on, state unchanged, at the state and version read:
    /// MongoDB's line repair fences off a confirm between its two steps.
    Fence {
        /// The state read.
        state: HoldState,
        /// The version read.
        seen_version: i64,
    },
}

impl HoldTransition {
    /// The guard and the effect (see [`Rule`]).
    pub fn rule(&self) -> Rule<HoldField> {
        let state = |s: HoldState| Value::Const(s.as_str());
        let is = |s: HoldState| Cond::Is(HoldField::State, state(s));
        let to = |s: HoldState| Change::Set(HoldField::State, state(s));
        let (guard, effect) = match self {
            Self::Refence => (vec![is(HoldState::During)], vec![Change::StampForward]),
            Self::Begin {
                to: t,
                seen_version,
            } => {
                let mut guard = vec![Cond::OneOf(
                    HoldField::State,
                    vec![state(HoldState::Pre), state(HoldState::Released)],
                )];
                guard.extend(seen_version.map(Cond::Version));
                (guard, vec![to(*t), Change::Stamp])
            }
            Self::Sell => (
                vec![Cond::NoneOf(HoldField::State, vec![state(HoldState::Sold)])],
                vec![to(HoldState::Sold), Change::Stamp],
            ),
            Self::Release { from } => (
                vec![Cond::OneOf(
                    HoldField::State,
                    from.iter().map(|s| state(*s)).collect(),
                )],
                vec![to(HoldState::Released), Change::Stamp],
            ),
            Self::ReleaseStuck { seen_version } => (
                vec![is(HoldState::During), Cond::Version(*seen_version)],
                vec![to(HoldState::Released), Change::Stamp],
            ),
            Self::Fence {
                state: s,
                seen_version,
            } => (vec![is(*s), Cond::Version(*seen_version)], vec![]),
        };
        Rule { guard, effect }
    }

    /// Applies the rule to `hold` when its guard holds; `true` when it did.
    pub fn apply_if(&self, hold: &mut Hold, now_ms: i64) -> bool {
        self.rule().apply_if(hold, now_ms)
    }
}

/// One SKU's numbers at an instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StockLevel {
    /// The SKU.
    pub sku: String,
    /// Units the merchant has (set by `PUT /v1/inventory/{sku}`).
    pub stock: i64,
    /// Units held by active holds.
    pub held: i64,
    /// Units sold (approved payments with a hold).
    pub sold: i64,
    /// `stock - sold - held`; negative only after an oversell (I7 broken).
    pub available: i64,
}

impl StockLevel {
    /// The level from its parts.
    pub fn new(sku: &str, stock: i64, sold: i64, held: i64) -> Self {
        Self {
            sku: sku.to_owned(),
            stock,
            held,
            sold,
            available: stock - sold - held,
        }
    }
}

/// Result of [`InventoryStore::set_stock`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SetStock {
    /// Stock set; the level after.
    Set(StockLevel),
    /// Refused: the stock asked is below `sold + held` (it would break I7);
    /// the level as it stands.
    BelowCommitted(StockLevel),
}

/// Result of [`InventoryStore::take`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TakeOutcome {
    /// The hold was written, `pre`.
    Taken(Hold),
    /// The order already has a hold (compare fingerprints before replaying).
    Exists(Hold),
    /// Not enough available; these SKUs are short (nothing was written).
    OutOfStock(Vec<String>),
}

/// Result of [`InventoryStore::begin_payment`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BeginOutcome {
    /// The order has no hold: the confirm goes on as without inventory.
    NoHold,
    /// The hold is `during` now (or already was): the card call may go.
    During(Hold),
    /// The hold is already sold (a replay): nothing to do.
    Sold(Hold),
    /// The hold had expired or been released and the stock is gone: these
    /// SKUs are short; the hold is `released` and no card call may go.
    Expired {
        /// The hold as it stands.
        hold: Hold,
        /// The short SKUs.
        short: Vec<String>,
    },
}

/// Result of [`InventoryStore::sell`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SellOutcome {
    /// The order has no hold.
    NoHold,
    /// The hold was already sold (a replay): nothing changed.
    AlreadySold,
    /// The hold is sold now and its units added to `sold`; `oversold` names
    /// the SKUs where `sold + active holds > stock` after the sale (an
    /// approval recovered after its hold expired: raise an alert).
    Sold {
        /// The hold after the sale.
        hold: Hold,
        /// SKUs now over their stock (empty when I7 holds).
        oversold: Vec<String>,
    },
}

/// Inventory and holds. Every method takes `now_ms` (epoch ms) instead of
/// reading a clock.
#[async_trait::async_trait]
pub trait InventoryStore: Send + Sync + 'static {
    /// Sets a SKU's stock (creating the SKU with `sold = 0`), refused when
    /// below `sold + held`.
    ///
    /// # Errors
    /// [`StoreError`]; nothing changed.
    async fn set_stock(
        &self,
        merchant: &MerchantId,
        sku: &str,
        stock: i64,
        now_ms: i64,
    ) -> Result<SetStock, StoreError>;

    /// A SKU's level at `now_ms`; `None` for a SKU never stocked.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn level(
        &self,
        merchant: &MerchantId,
        sku: &str,
        now_ms: i64,
    ) -> Result<Option<StockLevel>, StoreError>;

    /// Takes `hold` (state `pre`) when every SKU has its quantity available
    /// at `now_ms`, under the SKUs' locks; idempotent per `(merchant, order)`.
    ///
    /// # Errors
    /// [`StoreError`]; nothing was written (a MongoDB take that died half
    /// way leaves reservations that expire at the hold's `expires_at`).
    async fn take(&self, hold: &Hold, now_ms: i64) -> Result<TakeOutcome, StoreError>;

    /// A hold by id, for its merchant only.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn hold(&self, merchant: &MerchantId, hold_id: &str) -> Result<Option<Hold>, StoreError>;

    /// The hold of an order.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn hold_by_order(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
    ) -> Result<Option<Hold>, StoreError>;

    /// Before the card call of a confirm: moves the order's hold to
    /// `during`. A `pre` hold in time, or one expired or released, moves
    /// when its units are available without it (checked under the SKUs'
    /// locks); otherwise it is `released` and [`BeginOutcome::Expired`]
    /// names the short SKUs. A hold already `during` moves one version on
    /// (and its `updated_at` forward): that fences off an actor that read
    /// it earlier and is about to release it ([`InventoryStore::release_stuck`]),
    /// so a retry that reopens a no-call abort makes its hold its own.
    /// [`BeginOutcome::During`] carries the hold at the version this call
    /// left it: the confirm releases that version only.
    ///
    /// # Errors
    /// [`StoreError`]; the caller makes no card call.
    async fn begin_payment(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<BeginOutcome, StoreError>;

    /// After an approval (the confirm's, or one recovered by the batch or
    /// the reconciliation): the hold turns `sold` and each SKU's `sold`
    /// grows by its quantity, in one transaction; from any state but
    /// `sold` (an approval is a charge: it sells even an expired or
    /// released hold, and reports the oversell). A replay changes nothing.
    ///
    /// # Errors
    /// [`StoreError`]; a rerun finishes the sale.
    async fn sell(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        now_ms: i64,
    ) -> Result<SellOutcome, StoreError>;

    /// Releases the order's hold when its state is one of `from` (`DELETE`
    /// passes `pre`; a decline or a no-call abort `pre` and `during`).
    /// Returns the hold as it stands after, `None` when there is none.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn release(
        &self,
        merchant: &MerchantId,
        order: &OrderId,
        from: &[HoldState],
        now_ms: i64,
    ) -> Result<Option<Hold>, StoreError>;

    /// Holds left `during` whose `updated_at` is at or before
    /// `updated_before_ms`, in `hold_id` order after `after_hold_id`, at
    /// most `limit`: the candidates of the batch's pass over holds whose
    /// confirm died before it sold or released them (DESIGN.md §3).
    ///
    /// # Errors
    /// [`StoreError`].
    async fn stuck_during(
        &self,
        updated_before_ms: i64,
        after_hold_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<Hold>, StoreError>;

    /// Releases `seen`, a hold read `during`, only if it is still `during`
    /// at the same `version` (no confirm began on it since it was read):
    /// `Ok(true)` when released. The batch calls it for a hold whose
    /// payment ended unpaid, a confirm for the hold it moved itself; a
    /// concurrent retry's [`InventoryStore::begin_payment`] moves the
    /// version first, so the release cannot take units from a card call
    /// in flight.
    ///
    /// # Errors
    /// [`StoreError`]; on MongoDB a release that dies half way leaves the
    /// hold `during` holding nothing (never the reverse), and a rerun
    /// finishes it.
    async fn release_stuck(&self, seen: &Hold, now_ms: i64) -> Result<bool, StoreError>;

    /// Frees units held by `during` lines whose hold is not `during` (up to
    /// `limit` SKU documents a run): what a writer that died between its
    /// steps leaves on a store without transactions spanning a hold and its
    /// SKUs (MongoDB; see `MongoInventoryStore`). Returns the lines freed.
    /// A confirm still between its steps on such a hold loses its guarded
    /// move and starts over; it never calls the card on units freed here.
    /// The SQL and memory stores change a hold and its lines atomically and
    /// have nothing to repair.
    ///
    /// # Errors
    /// [`StoreError`]; what was freed stays freed, a rerun goes on.
    async fn repair_lines(&self, now_ms: i64, limit: u32) -> Result<u64, StoreError> {
        let _ = (now_ms, limit);
        Ok(0)
    }

    /// Housekeeping: deletes holds that are `released`, or `pre` and
    /// expired, whose `updated_at` / `expires_at` is before `before_ms`;
    /// the number deleted. Correctness never depends on it.
    ///
    /// # Errors
    /// [`StoreError`].
    async fn purge(&self, before_ms: i64) -> Result<u64, StoreError>;
}
