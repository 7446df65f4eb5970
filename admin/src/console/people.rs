//! Platform admins (grant, revoke, who has a second factor) and the
//! operator log.

use actix_web::{HttpResponse, web};
use plinth_access::grants;
use plinth_http::{ApiError, FieldError};
use plinth_identity::users;
use plinth_mail::EmailAddress;
use plinth_tenants::{Db, UserId};
use serde::Deserialize;

use super::auth::{ConsoleUser, Empty, Posted};
use super::{ConsoleError, notice, see_other, show};
use crate::operator_log;

#[derive(Deserialize)]
pub(super) struct NoticeQuery {
    notice: Option<String>,
}

/// `GET /console/admins`.
pub(super) async fn admins(
    who: ConsoleUser,
    db: web::Data<Db>,
    query: web::Query<NoticeQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let mut admins = db
        .platform(async |c| {
            let ids: Vec<uuid::Uuid> = grants::all(c).await?.into_iter().map(|u| u.0).collect();
            Ok::<_, ApiError>(users::accounts(c, &ids).await?)
        })
        .await?;
    admins.sort_by(|a, b| a.email.cmp(&b.email));
    show(
        &who,
        "admins",
        "admins.html",
        minijinja::context! { admins, me => who.user.0, notice => notice(query.notice.as_deref()) },
    )
}

#[derive(Deserialize)]
pub(super) struct GrantForm {
    #[serde(default)]
    email: String,
}

/// `POST /console/admins/grant`: to an existing account.
pub(super) async fn grant(db: web::Data<Db>, posted: Posted<GrantForm>) -> Result<HttpResponse, ConsoleError> {
    let invalid = |why: &str| ApiError::invalid_fields(vec![FieldError::new("email", "invalid", why)]);
    let email = EmailAddress::parse(&posted.form.email).map_err(|_| invalid("is not an email address"))?;
    let operator = &posted.who.operator;
    db.platform(async |c| {
        let user = users::find_id_by_email(c, &email).await?.ok_or_else(|| invalid("no account has this address"))?;
        grants::grant(c, user.0).await?;
        operator_log::record(c, operator.log("admin.granted").target(user)).await?;
        Ok::<_, ApiError>(())
    })
    .await?;
    Ok(see_other("/console/admins?notice=granted"))
}

/// `POST /console/admins/{user}/revoke`: never your own (someone else must
/// take it away), so the last admin cannot lock everyone out.
pub(super) async fn revoke(
    db: web::Data<Db>,
    path: web::Path<String>,
    posted: Posted<Empty>,
) -> Result<HttpResponse, ConsoleError> {
    let user = uuid::Uuid::parse_str(&path).map_err(|_| ApiError::NotFound("platform admin"))?;
    if user == posted.who.user.0 {
        return Err(ApiError::Conflict("you cannot take your own platform admin role away".into()).into());
    }
    let operator = &posted.who.operator;
    db.platform(async |c| {
        if !grants::revoke(c, user).await? {
            return Err(ApiError::NotFound("platform admin"));
        }
        operator_log::record(c, operator.log("admin.revoked").target(UserId(user))).await?;
        Ok(())
    })
    .await?;
    Ok(see_other("/console/admins?notice=revoked"))
}

#[derive(Deserialize)]
pub(super) struct LogQuery {
    before: Option<uuid::Uuid>,
}

/// `GET /console/log`: the operator log, newest first, 50 a page.
pub(super) async fn log(
    who: ConsoleUser,
    db: web::Data<Db>,
    query: web::Query<LogQuery>,
) -> Result<HttpResponse, ConsoleError> {
    let before = query.before;
    let entries = db.platform(async |c| Ok::<_, ApiError>(operator_log::recent(c, None, before, 50).await?)).await?;
    let next = (entries.len() == 50).then(|| entries.last().map(|e| e.id)).flatten();
    show(&who, "log", "log.html", minijinja::context! { entries, next })
}
