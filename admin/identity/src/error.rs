//! Identity's errors: why signing up, signing in, a session, a key, a
//! membership or an invitation failed, with the cause kept. Routes turn them
//! into [`ApiError`] at the edge (the `From` below); the CLI and background
//! work print them with their cause chain.

use std::time::Duration;

use plinth_access::AccessError;
use plinth_http::{ApiError, FieldError, ratelimit};
use plinth_tenants::db::PoolError;
use plinth_tenants::registry::CreateError;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A wrong password, or an address without an account.
    #[error("the email address or password is wrong")]
    InvalidCredentials,
    /// The password was right; the account's second factor is missing.
    #[error("a one-time code from the authenticator app is required")]
    TotpRequired,
    /// The account exists and no proof of it was given.
    #[error("authentication required")]
    Unauthenticated,
    /// The caller may not do this (a role, a cap, another account's session).
    #[error("not allowed")]
    Forbidden,
    /// A token from a mail (verification, reset, invitation) that is unknown,
    /// used or expired.
    #[error("the token is invalid, used or expired")]
    InvalidToken,
    #[error("an account with this email address exists")]
    EmailTaken,
    #[error("this address is already a member")]
    AlreadyMember,
    /// Input refused by a policy (a password too short, say), by field.
    #[error("invalid fields")]
    Invalid(Vec<FieldError>),
    /// Too many failed attempts; retry after this long.
    #[error("too many failed attempts")]
    RateLimited(Duration),
    /// The shared rate-limit table could not be read or written.
    #[error("checking a rate limit failed")]
    Limits(#[source] ApiError),
    /// Every password hashing slot stayed busy for the configured wait.
    #[error("every password hashing slot stayed busy")]
    HashingBusy,
    #[error("creating the organization failed")]
    Organization(#[from] CreateError),
    #[error("the access policy refused or failed")]
    Access(#[from] AccessError),
    #[error("the operating system gave no randomness")]
    Random(#[from] getrandom::Error),
    #[error("database query failed")]
    Database(#[from] diesel::result::Error),
    #[error("no database connection available")]
    Pool(#[from] PoolError),
    /// Anything else that should not happen, with its context.
    #[error(transparent)]
    Internal(anyhow::Error),
}

impl From<IdentityError> for ApiError {
    fn from(err: IdentityError) -> Self {
        match err {
            IdentityError::InvalidCredentials => Self::InvalidCredentials,
            IdentityError::TotpRequired => Self::TotpRequired { passkey: None },
            IdentityError::Unauthenticated => Self::Unauthenticated,
            IdentityError::Forbidden => Self::Forbidden,
            IdentityError::InvalidToken => {
                Self::invalid_fields(vec![FieldError::new("token", "invalid", "is invalid, used or expired")])
            }
            IdentityError::EmailTaken => {
                Self::Conflict("an account with this email address exists; sign in to add an organization".into())
            }
            IdentityError::AlreadyMember => Self::Conflict("this address is already a member".into()),
            IdentityError::Invalid(fields) => Self::invalid_fields(fields),
            IdentityError::RateLimited(wait) => ratelimit::limited(wait),
            IdentityError::Limits(err) => err,
            IdentityError::HashingBusy => Self::Unavailable(err.into()),
            IdentityError::Organization(CreateError::NoOpenShard | CreateError::ShardNotOpen(_)) => {
                Self::Unavailable(err.into())
            }
            IdentityError::Organization(CreateError::SlugTaken) => Self::Conflict("the slug is already taken".into()),
            IdentityError::Organization(CreateError::Moving) => Self::Conflict(err.to_string()),
            IdentityError::Organization(CreateError::InvalidName(why)) => {
                Self::invalid_fields(vec![FieldError::new("organization", "invalid", why)])
            }
            IdentityError::Organization(CreateError::Db(db)) | IdentityError::Database(db) => db.into(),
            IdentityError::Organization(CreateError::Pool(pool)) | IdentityError::Pool(pool) => pool.into(),
            IdentityError::Access(access) => access.into(),
            IdentityError::Random(_) | IdentityError::Internal(_) => Self::Internal(err.into()),
        }
    }
}

impl From<ratelimit::Refused> for IdentityError {
    fn from(refused: ratelimit::Refused) -> Self {
        match refused {
            ratelimit::Refused::Limited(wait) => Self::RateLimited(wait),
            ratelimit::Refused::Unavailable(err) => Self::Limits(err),
        }
    }
}

impl From<IdentityError> for AccessError {
    /// For the gate's authentication question: the database's own errors
    /// stay what they are (a lost connection answers 503), anything else is
    /// a failed check with identity's error as its cause.
    fn from(err: IdentityError) -> Self {
        match err {
            IdentityError::Database(db) => Self::Database(db),
            IdentityError::Pool(pool) => Self::Pool(pool),
            IdentityError::Access(access) => access,
            IdentityError::RateLimited(wait) => Self::RateLimited(wait),
            other => Self::Authentication(other.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use actix_web::ResponseError as _;
    use actix_web::http::StatusCode;
    use diesel::result::{DatabaseErrorKind, Error as DbError};

    use super::*;

    fn db_error(kind: DatabaseErrorKind, message: &str) -> DbError {
        DbError::DatabaseError(kind, Box::new(message.to_owned()))
    }

    #[test]
    fn the_edge_answers_as_before() {
        let cases: [(IdentityError, StatusCode, &str); 8] = [
            (IdentityError::InvalidToken, StatusCode::BAD_REQUEST, "invalid_request"),
            (IdentityError::EmailTaken, StatusCode::CONFLICT, "conflict"),
            (IdentityError::Organization(CreateError::SlugTaken), StatusCode::CONFLICT, "conflict"),
            (IdentityError::HashingBusy, StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            (IdentityError::RateLimited(Duration::from_secs(30)), StatusCode::TOO_MANY_REQUESTS, "rate_limited"),
            (
                IdentityError::Database(db_error(DatabaseErrorKind::ClosedConnection, "connection closed")),
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
            ),
            (
                IdentityError::Access(AccessError::QuotaExceeded { quota: "members", limit: 3, used: 3 }),
                StatusCode::PAYMENT_REQUIRED,
                "quota_exceeded",
            ),
            (
                IdentityError::Database(db_error(DatabaseErrorKind::Unknown, "relation \"users\" does not exist")),
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
            ),
        ];
        for (err, status, code) in cases {
            let shown = err.to_string();
            let api = ApiError::from(err);
            assert_eq!((api.status_code(), api.code()), (status, code), "{shown}");
        }
    }

    #[test]
    fn a_database_failure_keeps_its_cause() {
        let err = IdentityError::Database(db_error(DatabaseErrorKind::Unknown, "relation \"users\" does not exist"));
        let chain = format!("{:#}", anyhow::Error::new(err));
        assert_eq!(chain, "database query failed: relation \"users\" does not exist");
        let ApiError::Internal(inner) =
            ApiError::from(IdentityError::Database(db_error(DatabaseErrorKind::Unknown, "disk full")))
        else {
            panic!("not a 500");
        };
        assert!(format!("{inner:#}").ends_with("disk full"), "{inner:#}");
    }

    #[test]
    fn the_gate_still_sees_a_lost_connection() {
        let lost = IdentityError::Database(db_error(DatabaseErrorKind::ClosedConnection, "connection closed"));
        let access = AccessError::from(lost);
        assert!(matches!(access, AccessError::Database(_)));
        assert_eq!(ApiError::from(access).status_code(), StatusCode::SERVICE_UNAVAILABLE);
        let other = AccessError::from(IdentityError::HashingBusy);
        assert_eq!(
            format!("{:#}", anyhow::Error::new(other)),
            "checking the credential failed: every password hashing slot stayed busy"
        );
    }
}
