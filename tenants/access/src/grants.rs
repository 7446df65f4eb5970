//! The platform admin grant: a row in `public.platform_admins`, separate
//! from any tenant role. A trigger tells every instance's engine.

use diesel::sql_types::Uuid as SqlUuid;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

/// Grants the platform admin role to `user` (idempotent).
pub async fn grant(conn: &mut AsyncPgConnection, user: uuid::Uuid) -> diesel::QueryResult<()> {
    diesel::sql_query("INSERT INTO public.platform_admins (user_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind::<SqlUuid, _>(user)
        .execute(conn)
        .await?;
    Ok(())
}

/// Takes the platform admin role away; false if `user` did not hold it.
pub async fn revoke(conn: &mut AsyncPgConnection, user: uuid::Uuid) -> diesel::QueryResult<bool> {
    Ok(diesel::sql_query("DELETE FROM public.platform_admins WHERE user_id = $1")
        .bind::<SqlUuid, _>(user)
        .execute(conn)
        .await?
        > 0)
}
