//! Identifiers: typed newtypes over UUIDs, and tenant slugs and schema names
//! that can only be built valid.

use std::fmt;

use serde::{Deserialize, Serialize};

#[doc(hidden)]
pub use utoipa; // For `uuid_id!` in other crates.

/// Declares a typed UUID identifier usable in diesel queries and JSON.
#[macro_export]
macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            ::serde::Serialize, ::serde::Deserialize,
            ::diesel::expression::AsExpression, ::diesel::deserialize::FromSqlRow,
        )]
        #[diesel(sql_type = ::diesel::sql_types::Uuid)]
        #[serde(transparent)]
        pub struct $name(pub ::uuid::Uuid);

        impl $name {
            /// A new time-ordered (v7) identifier.
            pub fn new() -> Self {
                Self(::uuid::Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl $crate::ids::utoipa::PartialSchema for $name {
            fn schema() -> $crate::ids::utoipa::openapi::RefOr<$crate::ids::utoipa::openapi::schema::Schema> {
                use $crate::ids::utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat, Type};
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Uuid)))
                    .into()
            }
        }

        impl $crate::ids::utoipa::ToSchema for $name {}

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = ::uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                ::uuid::Uuid::parse_str(s).map(Self)
            }
        }

        impl ::diesel::serialize::ToSql<::diesel::sql_types::Uuid, ::diesel::pg::Pg> for $name {
            fn to_sql<'b>(
                &'b self,
                out: &mut ::diesel::serialize::Output<'b, '_, ::diesel::pg::Pg>,
            ) -> ::diesel::serialize::Result {
                <::uuid::Uuid as ::diesel::serialize::ToSql<::diesel::sql_types::Uuid, ::diesel::pg::Pg>>::to_sql(&self.0, out)
            }
        }

        impl ::diesel::deserialize::FromSql<::diesel::sql_types::Uuid, ::diesel::pg::Pg> for $name {
            fn from_sql(bytes: ::diesel::pg::PgValue<'_>) -> ::diesel::deserialize::Result<Self> {
                <::uuid::Uuid as ::diesel::deserialize::FromSql<::diesel::sql_types::Uuid, ::diesel::pg::Pg>>::from_sql(bytes).map(Self)
            }
        }
    };
}

uuid_id!(
    /// Identifies a tenant (customer organization).
    TenantId
);

uuid_id!(
    /// Identifies a user (global: users belong to tenants through memberships).
    UserId
);

/// Words that can never be tenant slugs: they collide with hosts the platform
/// itself serves or would confuse users.
pub const RESERVED_SLUGS: &[&str] = &[
    "www",
    "api",
    "admin",
    "app",
    "mail",
    "email",
    "smtp",
    "imap",
    "pop",
    "ftp",
    "ssh",
    "static",
    "assets",
    "cdn",
    "media",
    "files",
    "status",
    "help",
    "support",
    "docs",
    "blog",
    "billing",
    "auth",
    "login",
    "logout",
    "signup",
    "register",
    "account",
    "accounts",
    "dashboard",
    "console",
    "public",
    "internal",
    "system",
    "root",
    "plinth",
    "health",
    "metrics",
    "webhooks",
    "dev",
    "staging",
    "test",
    "demo",
    "localhost",
    "ns1",
    "ns2",
    "mx",
];

/// Why a slug was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlugError {
    #[error("must be between 3 and 40 characters")]
    Length,
    #[error("must start with a lowercase letter and contain only a-z, 0-9 and '-', not ending in '-'")]
    Charset,
    #[error("is reserved")]
    Reserved,
    #[error("must not contain '--' (IDN labels such as xn-- can spell look-alikes of other names)")]
    DoubleHyphen,
}

impl SlugError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Length => "length",
            Self::Charset => "format",
            Self::Reserved => "reserved",
            Self::DoubleHyphen => "format",
        }
    }
}

/// A tenant's URL name: lowercase, 3–40 chars, `[a-z][a-z0-9-]*`, not ending in
/// `-`, no `--` (so no `xn--` punycode label that a browser would show as a
/// look-alike of another tenant's name), not reserved. The only way to get one is [`Slug::parse`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Slug(String);

impl Slug {
    pub fn parse(input: &str) -> Result<Self, SlugError> {
        if !(3..=40).contains(&input.len()) {
            return Err(SlugError::Length);
        }
        let bytes = input.as_bytes();
        let ok_first = bytes[0].is_ascii_lowercase();
        let ok_rest = bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-');
        if !ok_first || !ok_rest || input.ends_with('-') {
            return Err(SlugError::Charset);
        }
        if input.contains("--") {
            return Err(SlugError::DoubleHyphen);
        }
        if RESERVED_SLUGS.contains(&input) {
            return Err(SlugError::Reserved);
        }
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Slug {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Slug::parse(&s).map_err(|e| serde::de::Error::custom(format!("slug {e}")))
    }
}

impl fmt::Display for Slug {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The PostgreSQL schema holding one tenant's tables: `t_<32 hex digits>`,
/// generated from the tenant id, never from input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SchemaName(String);

impl SchemaName {
    pub fn for_tenant(id: TenantId) -> Self {
        Self(format!("t_{}", id.0.simple()))
    }

    /// Accepts a stored name only if it has the generated shape.
    pub fn from_stored(name: String) -> Result<Self, String> {
        let valid = name.len() == 34
            && name.starts_with("t_")
            && name[2..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid { Ok(Self(name)) } else { Err(name) }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name quoted as an SQL identifier. The generated shape has no quote
    /// characters, but quoting is kept so the rule is never "sometimes".
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0.replace('"', "\"\""))
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A PostgreSQL server that holds tenant schemas (`public.shards`):
/// `[a-z][a-z0-9_-]*`, at most 40 characters. [`ShardName::primary`] is the
/// platform database itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardName(String);

impl ShardName {
    pub const PRIMARY: &'static str = "primary";

    pub fn primary() -> Self {
        Self(Self::PRIMARY.to_owned())
    }

    pub fn parse(input: &str) -> Result<Self, &'static str> {
        let bytes = input.as_bytes();
        let ok = (1..=40).contains(&bytes.len())
            && bytes[0].is_ascii_lowercase()
            && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-' || *b == b'_');
        if ok {
            Ok(Self(input.to_owned()))
        } else {
            Err("a shard's name is 1 to 40 characters of a-z, 0-9, '-' and '_', starting with a letter")
        }
    }

    pub fn is_primary(&self) -> bool {
        self.0 == Self::PRIMARY
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ShardName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names() {
        for ok in ["primary", "eu-2", "b", "shard_3"] {
            assert!(ShardName::parse(ok).is_ok(), "{ok}");
        }
        for bad in ["", "2eu", "Eu", "a b", "a'b", &"a".repeat(41)] {
            assert!(ShardName::parse(bad).is_err(), "{bad}");
        }
        assert!(ShardName::primary().is_primary());
    }

    #[test]
    fn slugs() {
        for ok in ["acme", "a-1", "abc", "x23456789012345678901234567890123456789a"] {
            assert!(Slug::parse(ok).is_ok(), "{ok}");
        }
        assert_eq!(Slug::parse("ab"), Err(SlugError::Length));
        assert_eq!(Slug::parse(&"a".repeat(41)), Err(SlugError::Length));
        for bad in ["Acme", "1abc", "-abc", "abc-", "a_bc", "a bc", "ab'; drop table x;--", "ﬁabc", "abç"] {
            assert!(Slug::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Slug::parse("admin"), Err(SlugError::Reserved));
        assert_eq!(Slug::parse("www"), Err(SlugError::Reserved));
    }

    #[test]
    fn schema_names_are_generated_and_checked() {
        let id = TenantId::new();
        let s = SchemaName::for_tenant(id);
        assert!(SchemaName::from_stored(s.as_str().to_owned()).is_ok());
        assert_eq!(s.quoted(), format!("\"{s}\""));
        assert!(SchemaName::from_stored("public".into()).is_err());
        assert!(SchemaName::from_stored("t_\"; drop schema public; --aaaaaaa".into()).is_err());
    }
}
