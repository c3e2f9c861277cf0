//! Console operators (`operators`): accounts created with `paygate
//! operators create NAME --role viewer|operator|admin`, their argon2id
//! password hashes, and the roles that decide what each may do.
//!
//! Roles are ordered: a viewer reads every page; an operator also resolves,
//! rechecks, cancels and resends; an admin also manages operators. The role
//! is read from the database on every request (with the session), so a
//! disabled operator or a changed role takes effect at once.

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Argon2,
};
use paygate_state_store::{sql::map_err, with_pool, SqlDatabase, StoreError};
use sqlx::Row;

use crate::ConsoleError;

/// What an operator may do; ordered, each role can do what the ones below it
/// can.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// Reads every page; changes nothing.
    Viewer,
    /// Also resolves, rechecks, cancels and resends.
    Operator,
    /// Also creates and disables operators.
    Admin,
}

impl Role {
    /// `viewer`, `operator` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Viewer => "viewer",
            Self::Operator => "operator",
            Self::Admin => "admin",
        }
    }

    /// Parses the stored or typed spelling.
    ///
    /// # Errors
    /// [`ConsoleError::Invalid`] for anything else.
    pub fn parse(s: &str) -> Result<Self, ConsoleError> {
        match s {
            "viewer" => Ok(Self::Viewer),
            "operator" => Ok(Self::Operator),
            "admin" => Ok(Self::Admin),
            other => Err(ConsoleError::Invalid(format!(
                "role {other:?}: must be viewer, operator or admin"
            ))),
        }
    }
}

/// An operator as stored (without the password hash).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Operator {
    /// The login name (1-64 of `a-z 0-9 . _ -`).
    pub name: String,
    /// What the operator may do.
    pub role: Role,
    /// Epoch ms.
    pub created_at: i64,
    /// When an admin disabled the account (epoch ms); a disabled operator
    /// cannot log in and its sessions stop working.
    pub disabled_at: Option<i64>,
}

/// The least password length accepted, in characters.
pub const MIN_PASSWORD_CHARS: usize = 12;

/// Checks an operator name: 1-64 characters of `a-z`, `0-9`, `.`, `_`, `-`.
///
/// # Errors
/// [`ConsoleError::Invalid`].
pub fn check_name(name: &str) -> Result<(), ConsoleError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(ConsoleError::Invalid(
            "an operator name is 1-64 characters of a-z, 0-9, '.', '_' and '-'".into(),
        ))
    }
}

/// Hashes `password` with argon2id (the crate's default parameters: 19 MiB,
/// 2 passes) and a random salt, as a PHC string.
///
/// # Errors
/// [`ConsoleError::Invalid`] when the password is shorter than
/// [`MIN_PASSWORD_CHARS`]; [`ConsoleError::Internal`] if hashing fails.
pub fn hash_password(password: &str) -> Result<String, ConsoleError> {
    if password.chars().count() < MIN_PASSWORD_CHARS {
        return Err(ConsoleError::Invalid(format!(
            "a password has at least {MIN_PASSWORD_CHARS} characters"
        )));
    }
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| ConsoleError::Internal(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| ConsoleError::Internal(e.to_string()))
}

/// A PHC string of a password nobody has: verified against when the name
/// is unknown, so a wrong name costs the same time as a wrong password.
fn decoy_hash() -> &'static str {
    static DECOY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DECOY.get_or_init(|| {
        let mut random = [0u8; 24];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
        hash_password(&hex::encode(random)).unwrap_or_default()
    })
}

fn verify(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc).is_ok_and(|h| {
        Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
}

/// `operators` on the SQL database.
#[derive(Clone, Debug)]
pub struct OperatorStore {
    db: SqlDatabase,
}

fn operator_from<R: Row>(row: &R) -> Result<Operator, StoreError>
where
    for<'r> String: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'a> &'a str: sqlx::ColumnIndex<R>,
{
    let c = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let role: String = row.try_get("role").map_err(c)?;
    Ok(Operator {
        name: row.try_get("name").map_err(c)?,
        role: Role::parse(&role).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        created_at: row.try_get("created_at").map_err(c)?,
        disabled_at: row.try_get("disabled_at").map_err(c)?,
    })
}

impl OperatorStore {
    /// Over `db` (migrated).
    pub fn new(db: SqlDatabase) -> Self {
        Self { db }
    }

    /// Creates an operator; `Ok(false)` when the name is taken.
    ///
    /// # Errors
    /// [`ConsoleError::Invalid`] for a bad name or a short password;
    /// [`ConsoleError::Store`].
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        password: &str,
    ) -> Result<bool, ConsoleError> {
        check_name(name)?;
        let hash = hash_password(password)?;
        let sql = "INSERT INTO operators (name, role, password_hash, created_at) \
                   VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO NOTHING";
        let now = paygate_core::time::now_ms();
        let done = with_pool!(&self.db, pool => {
            sqlx::query(sql)
                .bind(name)
                .bind(role.as_str())
                .bind(&hash)
                .bind(now)
                .execute(pool)
                .await
                .map_err(map_err)?
                .rows_affected()
        });
        Ok(done == 1)
    }

    /// Every operator, by name.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn list(&self) -> Result<Vec<Operator>, StoreError> {
        let sql = "SELECT name, role, created_at, disabled_at FROM operators ORDER BY name";
        with_pool!(&self.db, pool => {
            let rows = sqlx::query(sql).fetch_all(pool).await.map_err(map_err)?;
            rows.iter().map(operator_from).collect()
        })
    }

    /// Disables an operator (its sessions stop working at once); `Ok(false)`
    /// when there is no such enabled operator.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn disable(&self, name: &str) -> Result<bool, StoreError> {
        let sql = "UPDATE operators SET disabled_at = $1 WHERE name = $2 AND disabled_at IS NULL";
        let now = paygate_core::time::now_ms();
        let n = with_pool!(&self.db, pool => {
            sqlx::query(sql).bind(now).bind(name).execute(pool).await.map_err(map_err)?.rows_affected()
        });
        Ok(n == 1)
    }

    /// The enabled operator `name` when `password` is theirs. An unknown or
    /// disabled name is verified against a decoy hash, so the answer takes
    /// as long as for a wrong password.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn verify(&self, name: &str, password: &str) -> Result<Option<Operator>, StoreError> {
        let sql = "SELECT name, role, created_at, disabled_at, password_hash FROM operators \
                   WHERE name = $1";
        let found = with_pool!(&self.db, pool => {
            match sqlx::query(sql).bind(name).fetch_optional(pool).await.map_err(map_err)? {
                Some(row) => {
                    let hash: String = row
                        .try_get("password_hash")
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?;
                    Some((operator_from(&row)?, hash))
                }
                None => None,
            }
        });
        let password = password.to_owned();
        // argon2 takes tens of ms of CPU: off the async workers.
        let checked = tokio::task::spawn_blocking(move || match found {
            Some((op, hash)) if op.disabled_at.is_none() => verify(&password, &hash).then_some(op),
            _ => {
                let _ = verify(&password, decoy_hash());
                None
            }
        })
        .await
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(checked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_verify_only_against_their_own_hash() {
        let h = hash_password("correct horse battery").unwrap_or_default();
        assert!(h.starts_with("$argon2id$"));
        assert!(verify("correct horse battery", &h));
        assert!(!verify("correct horse batterY", &h));
        assert!(!verify("anything", "not a phc string"));
        assert!(matches!(
            hash_password("short"),
            Err(ConsoleError::Invalid(_))
        ));
    }

    #[test]
    fn names_and_roles_are_checked() {
        assert!(check_name("ops.alice-1").is_ok());
        for bad in ["", "Alice", "a b", "<script>", &"a".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert!(Role::Admin > Role::Operator && Role::Operator > Role::Viewer);
        assert_eq!(Role::parse("operator").ok(), Some(Role::Operator));
        assert!(Role::parse("root").is_err());
    }
}
