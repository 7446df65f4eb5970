//! The platform admin grant: a row in `public.platform_admins`, separate
//! from any tenant role. A trigger tells every instance's engine.

use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use plinth_tenants::ids::UserId;

diesel::table! {
    public.platform_admins (user_id) {
        user_id -> Uuid,
        granted_at -> Timestamptz,
    }
}

/// Grants the platform admin role to `user` (idempotent).
pub async fn grant(conn: &mut AsyncPgConnection, user: uuid::Uuid) -> QueryResult<()> {
    diesel::insert_into(platform_admins::table)
        .values(platform_admins::user_id.eq(user))
        .on_conflict_do_nothing()
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes the platform admin role away; false if `user` did not hold it.
pub async fn revoke(conn: &mut AsyncPgConnection, user: uuid::Uuid) -> QueryResult<bool> {
    let deleted =
        diesel::delete(platform_admins::table.filter(platform_admins::user_id.eq(user))).execute(conn).await?;
    Ok(deleted > 0)
}

/// Whether `user` holds the grant.
pub async fn is_admin(conn: &mut AsyncPgConnection, user: UserId) -> QueryResult<bool> {
    diesel::select(diesel::dsl::exists(platform_admins::table.filter(platform_admins::user_id.eq(user.0))))
        .get_result(conn)
        .await
}

/// Everyone who holds the grant.
pub async fn all(conn: &mut AsyncPgConnection) -> QueryResult<Vec<UserId>> {
    let users: Vec<uuid::Uuid> = platform_admins::table.select(platform_admins::user_id).load(conn).await?;
    Ok(users.into_iter().map(UserId).collect())
}
