//! The users table: the user as the API shows it, creating an account, and
//! finders for the CLI and other crates. Addresses are stored normalized
//! (trimmed, lowercased), which [`EmailAddress`] guarantees.

use chrono::{DateTime, Utc};
use diesel::result::{DatabaseErrorKind, Error as DbError};
use diesel::{
    ExpressionMethods as _, OptionalExtension as _, QueryDsl as _, Queryable, Selectable, SelectableHelper as _,
};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use plinth_mail::EmailAddress;
use plinth_tenants::UserId;
use serde::Serialize;

use crate::error::IdentityError;
use crate::schema::users;

/// The account with this address, if there is one.
pub async fn find_id_by_email(
    conn: &mut AsyncPgConnection,
    email: &EmailAddress,
) -> diesel::QueryResult<Option<UserId>> {
    users::table
        .filter(users::email.eq(email.as_str()))
        .select(users::id)
        .first::<uuid::Uuid>(conn)
        .await
        .optional()
        .map(|id| id.map(UserId))
}

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, Queryable, Selectable, utoipa::ToSchema)]
#[diesel(table_name = users)]
pub struct User {
    pub id: uuid::Uuid,
    #[schema(schema_with = crate::openapi::email)]
    pub email: String,
    /// When the address was proven by the link in the verification mail.
    pub email_verified_at: Option<DateTime<Utc>>,
}

/// Creates an account; [`IdentityError::EmailTaken`] when the address has one.
pub async fn insert_user(
    conn: &AsyncPgConnection,
    email: &EmailAddress,
    password_hash: &str,
) -> Result<User, IdentityError> {
    let mut conn = conn;
    diesel::insert_into(users::table)
        .values((
            users::id.eq(UserId::new().0),
            users::email.eq(email.as_str()),
            users::password_hash.eq(password_hash),
        ))
        .returning(User::as_returning())
        .get_result(&mut conn)
        .await
        .map_err(|e| if unique_violation(&e, "users_email_key") { IdentityError::EmailTaken } else { e.into() })
}

fn unique_violation(err: &DbError, constraint: &str) -> bool {
    matches!(err, DbError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) if info.constraint_name() == Some(constraint))
}

/// The addresses of `ids` (those that still have an account).
pub async fn emails(
    conn: &mut AsyncPgConnection,
    ids: &[uuid::Uuid],
) -> diesel::QueryResult<std::collections::HashMap<uuid::Uuid, String>> {
    let rows: Vec<(uuid::Uuid, String)> =
        users::table.filter(users::id.eq_any(ids)).select((users::id, users::email)).load(conn).await?;
    Ok(rows.into_iter().collect())
}

/// A user as the operator console lists them: address, when they joined,
/// whether sign-in asks for a second factor.
#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub id: uuid::Uuid,
    pub email: String,
    pub created_at: DateTime<Utc>,
    pub second_factor: bool,
}

/// The accounts `ids`, in no particular order.
pub async fn accounts(conn: &mut AsyncPgConnection, ids: &[uuid::Uuid]) -> diesel::QueryResult<Vec<Account>> {
    let rows: Vec<(uuid::Uuid, String, DateTime<Utc>, bool)> = users::table
        .filter(users::id.eq_any(ids))
        .select((users::id, users::email, users::created_at, users::totp_secret.is_not_null()))
        .load(conn)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, email, created_at, second_factor)| Account { id, email, created_at, second_factor })
        .collect())
}
