//! How identity's fields look in the OpenAPI document: the constraints its
//! handlers check, as schemas, beside the constants that define them.

use plinth_http::openapi::text;
use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};

use crate::password::{MAX_CHARS, MIN_CHARS};

/// An email address: at most 254 characters, a domain with a dot and a
/// name (not an address literal); compared without case.
pub fn email() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Email)))
        .max_length(Some(254))
}

/// A new password: 10 to 256 characters, not one of the most common.
pub fn new_password() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Password)))
        .min_length(Some(MIN_CHARS))
        .max_length(Some(MAX_CHARS))
}

/// A password given to sign in (any text; a wrong one is 401).
pub fn password() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).format(Some(SchemaFormat::KnownFormat(KnownFormat::Password)))
}

/// An organization's display name.
pub fn organization() -> ObjectBuilder {
    text(1, 200, false)
}

/// A tenant's URL name: 3 to 40 of `a-z`, `0-9` and `-`, starting with a
/// letter, not ending with `-`, no `--`, not a reserved word.
pub fn slug() -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(3))
        .max_length(Some(40))
        .pattern(Some(r"^[a-z](?:[a-z0-9]|-(?!-))*[a-z0-9]$"))
}

/// A single-use token from a mail.
pub fn mail_token() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::String).min_length(Some(1))
}
