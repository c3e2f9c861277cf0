//! Console sessions and CSRF tokens.
//!
//! A login creates a random 256-bit token, sent to the browser in an
//! `HttpOnly`, `SameSite=Strict` cookie (`Secure` when the console's public
//! URL is `https`); the database keeps only its SHA-256, so a read of
//! `console_sessions` cannot be replayed. A session lasts
//! `console_session_ttl_ms` from the login (absolute: an operator's laptop
//! left open does not stay logged in for ever) and ends at logout, when the
//! operator is disabled, or when it expires.
//!
//! Every form carries a CSRF token derived from the session token,
//! `HMAC-SHA256(token, "csrf")`, and a POST is refused unless its token
//! matches (checked in constant time). `SameSite=Strict` already keeps
//! other sites' forms from carrying the cookie; the token also stops a
//! request forged from a page of the console's own origin. The login form,
//! which has no session yet, uses a short-lived random cookie the same way.

use hmac::{Hmac, Mac};
use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use sha2::{Digest, Sha256};
use sqlx::Row;

use crate::operators::{Operator, Role};

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "paygate_console";
/// The login form's CSRF cookie's name.
pub const LOGIN_COOKIE: &str = "paygate_console_login";

/// A fresh random token: 32 bytes, hex.
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
    hex::encode(b)
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn mac(token: &str) -> Option<Hmac<Sha256>> {
    // HMAC accepts keys of every length: `None` never happens in practice,
    // and then no token verifies (a refusal, never a panic).
    let mut m = <Hmac<Sha256> as Mac>::new_from_slice(token.as_bytes()).ok()?;
    m.update(b"csrf");
    Some(m)
}

/// The CSRF token of the session (or login cookie) `token`, hex.
pub fn csrf_token(token: &str) -> String {
    mac(token)
        .map(|m| hex::encode(m.finalize().into_bytes()))
        .unwrap_or_default()
}

/// True when `presented` is the CSRF token of `token` (constant time).
pub fn csrf_ok(token: &str, presented: Option<&str>) -> bool {
    let Some(bytes) = presented.and_then(|p| hex::decode(p.trim()).ok()) else {
        return false;
    };
    !bytes.is_empty() && mac(token).is_some_and(|m| m.verify_slice(&bytes).is_ok())
}

/// A logged-in operator, as a request sees it.
#[derive(Clone, Debug)]
pub struct Session {
    /// The operator.
    pub operator: Operator,
    /// The session's cookie token (to derive the CSRF token of its forms).
    pub token: String,
    /// When it expires, epoch ms.
    pub expires_at: i64,
}

impl Session {
    /// The CSRF token every form of this session carries.
    pub fn csrf(&self) -> String {
        csrf_token(&self.token)
    }

    /// True when the operator may do what `needs` allows.
    pub fn may(&self, needs: Role) -> bool {
        self.operator.role >= needs
    }
}

/// `console_sessions` on the SQL database.
#[derive(Clone, Debug)]
pub struct SessionStore {
    db: SqlDatabase,
}

impl SessionStore {
    /// Over `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Starts a session for `operator` lasting `ttl_ms`; returns its token.
    /// Expired sessions are deleted on the way.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn create(&self, operator: &str, ttl_ms: u64) -> Result<String, StoreError> {
        let token = new_token();
        let now = paygate_core::time::now_ms();
        let expires = now.saturating_add(i64::try_from(ttl_ms).unwrap_or(i64::MAX));
        let sql = "INSERT INTO console_sessions (token_hash, operator, created_at, expires_at) \
                   VALUES ($1, $2, $3, $4)";
        with_pool!(&self.db, pool => {
            sqlx::query("DELETE FROM console_sessions WHERE expires_at <= $1")
                .bind(now)
                .execute(pool)
                .await
                .map_err(map_err)?;
            sqlx::query(sql)
                .bind(token_hash(&token))
                .bind(operator)
                .bind(now)
                .bind(expires)
                .execute(pool)
                .await
                .map_err(map_err)?;
        });
        Ok(token)
    }

    /// The live session of `token`: not expired, its operator enabled.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn get(&self, token: &str) -> Result<Option<Session>, StoreError> {
        let sql = "SELECT o.name, o.role, o.created_at, o.disabled_at, s.expires_at \
                   FROM console_sessions s JOIN operators o ON o.name = s.operator \
                   WHERE s.token_hash = $1 AND s.expires_at > $2 AND o.disabled_at IS NULL";
        let now = paygate_core::time::now_ms();
        with_pool!(&self.db, pool => {
            let Some(row) = sqlx::query(sql)
                .bind(token_hash(token))
                .bind(now)
                .fetch_optional(pool)
                .await
                .map_err(map_err)?
            else {
                return Ok(None);
            };
            let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
            let role: String = row.try_get("role").map_err(c)?;
            Ok(Some(Session {
                operator: Operator {
                    name: row.try_get("name").map_err(c)?,
                    role: Role::parse(&role).map_err(|e| StoreError::Corrupt(e.to_string()))?,
                    created_at: row.try_get("created_at").map_err(c)?,
                    disabled_at: row.try_get("disabled_at").map_err(c)?,
                },
                token: token.to_owned(),
                expires_at: row.try_get("expires_at").map_err(c)?,
            }))
        })
    }

    /// Ends the session of `token` (logout).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn delete(&self, token: &str) -> Result<(), StoreError> {
        with_pool!(&self.db, pool => {
            sqlx::query("DELETE FROM console_sessions WHERE token_hash = $1")
                .bind(token_hash(token))
                .execute(pool)
                .await
                .map_err(map_err)?;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_csrf_token_belongs_to_its_session_only() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert!(csrf_ok(&a, Some(&csrf_token(&a))));
        assert!(!csrf_ok(&a, Some(&csrf_token(&b))));
        assert!(!csrf_ok(&a, None));
        assert!(!csrf_ok(&a, Some("")));
        assert!(!csrf_ok(&a, Some("zz")));
    }
}
