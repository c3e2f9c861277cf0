//! paygate-core: the domain types every other paygate crate shares.
//!
//! Nothing here does I/O. Use it for identifiers ([`ids`]), the realtime
//! payment state record ([`payment`]), secrets that must never reach a log
//! ([`masking`]), request fingerprints and API key hashing ([`crypto`]) and
//! the process configuration ([`config`]), the [`Clock`] passed to what
//! decides by time ([`clock`]), and the randomness a deterministic
//! simulation can replace ([`ambient`]).

pub mod ambient;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod ids;
pub mod masking;
pub mod payment;
pub mod time;

pub use clock::Clock;
pub use config::Config;
pub use ids::{MerchantId, OrderId, PaymentId};
pub use masking::Secret;
pub use payment::{CardStatus, Partition, PaymentRecord, PaymentStatus};
