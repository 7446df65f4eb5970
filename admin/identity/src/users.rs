//! The users table's finders for everyone outside identity (the CLI, other
//! crates). Addresses are stored normalized (trimmed, lowercased), which
//! [`EmailAddress`] guarantees.

use diesel::{ExpressionMethods as _, OptionalExtension as _, QueryDsl as _};
use diesel_async::{AsyncPgConnection, RunQueryDsl as _};
use plinth_mail::EmailAddress;
use plinth_tenants::UserId;

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
