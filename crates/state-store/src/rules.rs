//! The state machine as data.
//!
//! A legal change of a payment, a cancel or a hold is a [`Rule`]: its
//! *guard* (conditions on the stored fields, the version among them) and
//! its *effect* (fields set, incremented, the change stamped). Each
//! entity's rules are written once, beside its transition enum
//! ([`crate::Transition::rule`], [`crate::CancelTransition::rule`],
//! [`crate::inventory::HoldTransition::rule`]). The in-memory store and the saga
//! apply a rule to a record with [`Rule::apply_if`] and [`Rule::apply`];
//! the SQL and MongoDB backends compile the same rule into their
//! conditional update with the translators here ([`Rule::to_sql`],
//! [`Rule::to_mongo`]). No backend writes a guard by hand, so the backends
//! cannot drift from each other or from the memory store that the
//! simulation runs on; the conformance suite checks that they agree.
//!
//! Every applied rule adds 1 to `version` (DESIGN.md §1): the version is
//! what a later write that depends on this read is guarded on. `updated_at`
//! is stamped with the writer's clock, for ages and for operators only.

/// A value a rule compares a field with or writes into it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Value {
    /// A boolean column.
    Bool(bool),
    /// An integer column (counts, epoch ms).
    Int(i64),
    /// Text from the caller (a failure code, an error, a timestamp): bound
    /// as a parameter, never spliced into SQL.
    Text(String),
    /// Text fixed in the rules (a status): written into the statement.
    Const(&'static str),
    /// No value (SQL `NULL`, BSON null, `None`).
    Null,
}

impl Value {
    /// Equality across `Text` and `Const` (both are text).
    fn same(&self, other: &Value) -> bool {
        match (self.text(), other.text()) {
            (Some(a), Some(b)) => a == b,
            _ => self == other,
        }
    }

    /// The text of a `Text` or `Const`.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::Text(s) => Some(s),
            Self::Const(s) => Some(s),
            _ => None,
        }
    }
}

impl From<Option<&String>> for Value {
    fn from(v: Option<&String>) -> Self {
        v.map_or(Self::Null, |s| Self::Text(s.clone()))
    }
}

/// A condition of a guard on one stored field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cond<F> {
    /// The field equals the value (`IS NULL` for [`Value::Null`]).
    Is(F, Value),
    /// The field is one of the values.
    OneOf(F, Vec<Value>),
    /// The field is none of the values: how a status guard that includes
    /// the "unrecognised" state is written, so that a stored value the code
    /// does not know matches it as it reads (see
    /// `paygate_core::CardStatus::from_stored`).
    NoneOf(F, Vec<Value>),
    /// The integer field is at most the value.
    AtMost(F, i64),
    /// `version` equals the value; a MongoDB document without a version
    /// reads as 0 and matches 0.
    Version(i64),
    /// At least one of the groups holds (each group: all its conditions).
    AnyOf(Vec<Vec<Cond<F>>>),
}

/// One change of an effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change<F> {
    /// The field takes the value.
    Set(F, Value),
    /// The integer field grows by the amount.
    Add(F, i64),
    /// `updated_at` = the writer's now.
    Stamp,
    /// `updated_at` = the later of its value and the writer's now (a change
    /// that must not move an age backwards when the writer's clock is slow).
    StampForward,
}

/// A guard and its effect. Applying the effect also adds 1 to `version`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule<F> {
    /// All must hold for the rule to apply.
    pub guard: Vec<Cond<F>>,
    /// What the rule changes when it applies.
    pub effect: Vec<Change<F>>,
}

/// An entity the rules read and write: its fields, their stored names (the
/// SQL column and the BSON key are the same), and access for the memory
/// store and the saga.
pub trait Stored {
    /// The fields a rule may name (besides `version` and `updated_at`).
    type Field: Copy + std::fmt::Debug;
    /// The stored name of a field.
    fn column(field: Self::Field) -> &'static str;
    /// The field's value (statuses in their stored spelling).
    fn read(&self, field: Self::Field) -> Value;
    /// Writes a value; a value of the wrong kind leaves the field as it was
    /// (a rule is checked against every backend by the conformance suite).
    fn write(&mut self, field: Self::Field, value: Value);
    /// The record's version.
    fn version(&self) -> i64;
    /// `version` and `updated_at`, for the effect's bookkeeping.
    fn bookkeeping(&mut self) -> (&mut i64, &mut i64);
}

impl<F: Copy + std::fmt::Debug> Cond<F> {
    /// Whether the condition holds of `e`.
    pub fn holds<E: Stored<Field = F>>(&self, e: &E) -> bool {
        match self {
            Self::Is(f, v) => e.read(*f).same(v),
            Self::OneOf(f, vs) => {
                let got = e.read(*f);
                vs.iter().any(|v| got.same(v))
            }
            Self::NoneOf(f, vs) => {
                let got = e.read(*f);
                !vs.iter().any(|v| got.same(v))
            }
            Self::AtMost(f, max) => matches!(e.read(*f), Value::Int(i) if i <= *max),
            Self::Version(v) => e.version() == *v,
            Self::AnyOf(groups) => groups.iter().any(|g| g.iter().all(|c| c.holds(e))),
        }
    }
}

/// Whether every condition of `guard` holds of `e`.
pub fn all_hold<E: Stored>(guard: &[Cond<E::Field>], e: &E) -> bool {
    guard.iter().all(|c| c.holds(e))
}

impl<F: Copy + std::fmt::Debug> Rule<F> {
    /// Whether the guard holds of `e`.
    pub fn holds<E: Stored<Field = F>>(&self, e: &E) -> bool {
        all_hold(&self.guard, e)
    }

    /// Applies the effect to `e` (and `version += 1`) without checking the
    /// guard: for a caller whose store has just applied the rule and who
    /// keeps its own copy of the record in step.
    pub fn apply<E: Stored<Field = F>>(&self, e: &mut E, now_ms: i64) {
        for change in &self.effect {
            match change {
                Change::Set(f, v) => e.write(*f, v.clone()),
                Change::Add(f, n) => {
                    if let Value::Int(i) = e.read(*f) {
                        e.write(*f, Value::Int(i + n));
                    }
                }
                Change::Stamp => *e.bookkeeping().1 = now_ms,
                Change::StampForward => {
                    let (_, at) = e.bookkeeping();
                    *at = (*at).max(now_ms);
                }
            }
        }
        *e.bookkeeping().0 += 1;
    }

    /// Applies the rule when its guard holds; `true` when it applied. The
    /// reference semantics of every backend's conditional update.
    pub fn apply_if<E: Stored<Field = F>>(&self, e: &mut E, now_ms: i64) -> bool {
        if !self.holds(e) {
            return false;
        }
        self.apply(e, now_ms);
        true
    }
}

/// The SQL translator.
pub mod sql {
    use super::{Change, Cond, Rule, Stored, Value};

    /// A parameter of a translated statement, bound in order.
    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Bind {
        /// Bound as text.
        Text(String),
        /// Bound as a 64-bit integer.
        Int(i64),
    }

    /// Collects the parameters of a statement: `$first`, `$first + 1`, ...
    #[derive(Debug)]
    pub struct Binds {
        next: usize,
        /// The parameters in placeholder order.
        pub values: Vec<Bind>,
    }

    impl Binds {
        /// Parameters numbered from `$first` (the statement's own come before).
        pub fn from(first: usize) -> Self {
            Self {
                next: first,
                values: Vec::new(),
            }
        }

        fn push(&mut self, b: Bind) -> String {
            let p = format!("${}", self.next);
            self.next += 1;
            self.values.push(b);
            p
        }

        /// The SQL for `v`: a literal for booleans, null and fixed text
        /// (quotes doubled), a placeholder for everything from a caller.
        fn value(&mut self, v: &Value) -> String {
            match v {
                Value::Bool(true) => "TRUE".to_owned(),
                Value::Bool(false) => "FALSE".to_owned(),
                Value::Null => "NULL".to_owned(),
                Value::Const(s) => format!("'{}'", s.replace('\'', "''")),
                Value::Text(s) => self.push(Bind::Text(s.clone())),
                Value::Int(i) => self.push(Bind::Int(*i)),
            }
        }
    }

    /// The `WHERE` form of a guard (`TRUE` when it is empty).
    pub fn guard<E: Stored>(conds: &[Cond<E::Field>], binds: &mut Binds) -> String {
        if conds.is_empty() {
            return "TRUE".to_owned();
        }
        let parts: Vec<String> = conds.iter().map(|c| cond::<E>(c, binds)).collect();
        parts.join(" AND ")
    }

    fn list(vs: &[Value], binds: &mut Binds) -> String {
        vs.iter()
            .map(|v| binds.value(v))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn cond<E: Stored>(c: &Cond<E::Field>, binds: &mut Binds) -> String {
        match c {
            Cond::Is(f, Value::Null) => format!("{} IS NULL", E::column(*f)),
            Cond::Is(f, v) => format!("{} = {}", E::column(*f), binds.value(v)),
            // `IN ()` is not SQL: an empty list matches nothing.
            Cond::OneOf(_, vs) if vs.is_empty() => "FALSE".to_owned(),
            Cond::NoneOf(_, vs) if vs.is_empty() => "TRUE".to_owned(),
            Cond::OneOf(f, vs) => format!("{} IN ({})", E::column(*f), list(vs, binds)),
            Cond::NoneOf(f, vs) => {
                format!("{} NOT IN ({})", E::column(*f), list(vs, binds))
            }
            Cond::AtMost(f, max) => {
                format!("{} <= {}", E::column(*f), binds.value(&Value::Int(*max)))
            }
            Cond::Version(v) => format!("version = {}", binds.value(&Value::Int(*v))),
            Cond::AnyOf(groups) => {
                let parts: Vec<String> = groups
                    .iter()
                    .map(|g| format!("({})", guard::<E>(g, binds)))
                    .collect();
                format!("({})", parts.join(" OR "))
            }
        }
    }

    impl<F: Copy + std::fmt::Debug> Rule<F> {
        /// The `SET` list and the `WHERE` guard of the rule's conditional
        /// `UPDATE`, the `SET` list first in parameter order. `now` is the
        /// placeholder of the writer's now (epoch ms); the rule's own
        /// parameters are numbered from `first`. The caller adds the key
        /// (`WHERE payment_id = $1 AND ...`).
        pub fn to_sql<E: Stored<Field = F>>(
            &self,
            now: &str,
            first: usize,
        ) -> (String, String, Vec<Bind>) {
            let mut binds = Binds::from(first);
            let mut set: Vec<String> = self
                .effect
                .iter()
                .map(|c| match c {
                    Change::Set(f, v) => format!("{} = {}", E::column(*f), binds.value(v)),
                    Change::Add(f, n) => {
                        let col = E::column(*f);
                        format!("{col} = {col} + {n}")
                    }
                    Change::Stamp => format!("updated_at = {now}"),
                    Change::StampForward => {
                        format!("updated_at = CASE WHEN updated_at > {now} THEN updated_at ELSE {now} END")
                    }
                })
                .collect();
            set.push("version = version + 1".to_owned());
            let guard = guard::<E>(&self.guard, &mut binds);
            (set.join(", "), guard, binds.values)
        }
    }
}

/// The MongoDB translator.
#[cfg(feature = "mongodb")]
pub mod mongo {
    use mongodb::bson::{doc, Bson, Document};

    use super::{Change, Cond, Rule, Stored, Value};

    fn bson(v: &Value) -> Bson {
        match v {
            Value::Bool(b) => Bson::Boolean(*b),
            Value::Int(i) => Bson::Int64(*i),
            Value::Text(s) => Bson::String(s.clone()),
            Value::Const(s) => Bson::String((*s).to_owned()),
            Value::Null => Bson::Null,
        }
    }

    /// The filter of a guard (without the key); conditions on one field
    /// are joined with `$and`.
    pub fn filter<E: Stored>(conds: &[Cond<E::Field>]) -> Document {
        let mut d = Document::new();
        let mut and: Vec<Bson> = Vec::new();
        for c in conds {
            let (key, value) = match c {
                Cond::Is(f, v) => (E::column(*f).to_owned(), bson(v)),
                Cond::OneOf(f, vs) => (
                    E::column(*f).to_owned(),
                    Bson::Document(doc! {"$in": vs.iter().map(bson).collect::<Vec<_>>()}),
                ),
                Cond::NoneOf(f, vs) => (
                    E::column(*f).to_owned(),
                    Bson::Document(doc! {"$nin": vs.iter().map(bson).collect::<Vec<_>>()}),
                ),
                Cond::AtMost(f, max) => (
                    E::column(*f).to_owned(),
                    Bson::Document(doc! {"$lte": *max}),
                ),
                Cond::Version(v) => ("version".to_owned(), crate::mongo::version_is(*v)),
                Cond::AnyOf(groups) => {
                    let ors: Vec<Bson> = groups
                        .iter()
                        .map(|g| Bson::Document(filter::<E>(g)))
                        .collect();
                    and.push(Bson::Document(doc! {"$or": ors}));
                    continue;
                }
            };
            if d.contains_key(&key) {
                and.push(Bson::Document(doc! {key: value}));
            } else {
                d.insert(key, value);
            }
        }
        if !and.is_empty() {
            d.insert("$and", and);
        }
        d
    }

    impl<F: Copy + std::fmt::Debug> Rule<F> {
        /// The filter (without the key) and the update document of the
        /// rule's conditional update, stamped with `now_ms`.
        pub fn to_mongo<E: Stored<Field = F>>(&self, now_ms: i64) -> (Document, Document) {
            let mut set = Document::new();
            let mut inc = doc! {"version": 1_i64};
            let mut max = Document::new();
            for c in &self.effect {
                match c {
                    Change::Set(f, v) => {
                        set.insert(E::column(*f), bson(v));
                    }
                    Change::Add(f, n) => {
                        inc.insert(E::column(*f), *n);
                    }
                    Change::Stamp => {
                        set.insert("updated_at", now_ms);
                    }
                    Change::StampForward => {
                        max.insert("updated_at", now_ms);
                    }
                }
            }
            let mut update = doc! {"$inc": inc};
            if !set.is_empty() {
                update.insert("$set", set);
            }
            if !max.is_empty() {
                update.insert("$max", max);
            }
            (filter::<E>(&self.guard), update)
        }
    }
}
