//! The filters a directory sends before it creates or links a resource:
//! `userName eq "alice@example.com"`, `externalId eq "00u1"`,
//! `displayName eq "Engineering"` (RFC 7644 3.4.2.2). Only `eq` on one
//! attribute is supported; anything else is 400 `invalidFilter`.
//!
//! Written here rather than taken from a crate: this one comparison is
//! all Okta and Entra ID send, and a full filter grammar would have to be
//! translated to SQL attribute by attribute anyway.

use super::ScimError;

/// `attribute eq value`, the attribute lowercased (SCIM attribute names
/// are case-insensitive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Equals {
    pub attribute: String,
    pub value: String,
}

/// Parses `filter`; `attributes` are the (lowercase) ones it may name.
pub fn parse(filter: &str, attributes: &[&str]) -> Result<Equals, ScimError> {
    let invalid = |why: &str| ScimError::bad("invalidFilter", format!("unsupported filter: {why}"));
    let filter = filter.trim();
    let (attribute, rest) =
        filter.split_once(char::is_whitespace).ok_or_else(|| invalid("expected `attribute eq \"value\"`"))?;
    let (op, value) = rest.trim_start().split_once(char::is_whitespace).ok_or_else(|| invalid("expected a value"))?;
    if !op.eq_ignore_ascii_case("eq") {
        return Err(invalid("only the eq operator is supported"));
    }
    // `urn:...:User:userName` names the same attribute.
    let attribute = attribute.rsplit(':').next().unwrap_or(attribute).to_ascii_lowercase();
    if !attributes.contains(&attribute.as_str()) {
        return Err(invalid(&format!("filtering by {attribute} is not supported")));
    }
    let value = value.trim();
    let value = match serde_json::from_str::<serde_json::Value>(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Bool(b)) => b.to_string(),
        _ => return Err(invalid("the value must be a quoted string")),
    };
    Ok(Equals { attribute, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERS: &[&str] = &["username", "externalid", "id"];

    #[test]
    fn what_directories_send_is_understood() {
        let okta = parse(r#"userName eq "alice@example.com""#, USERS).ok();
        assert_eq!(okta, Some(Equals { attribute: "username".into(), value: "alice@example.com".into() }));
        let entra = parse(r#"externalId EQ "a \"quoted\" id""#, USERS).ok();
        assert_eq!(entra, Some(Equals { attribute: "externalid".into(), value: r#"a "quoted" id"#.into() }));
        let urn = parse(r#"urn:ietf:params:scim:schemas:core:2.0:User:userName eq "b@example.com""#, USERS).ok();
        assert_eq!(urn.map(|e| e.attribute), Some("username".into()));
    }

    #[test]
    fn anything_else_is_an_invalid_filter() {
        for filter in [
            "",
            "userName",
            r#"userName sw "a""#,
            r#"emails.value eq "a@example.com""#,
            r#"userName eq a@example.com"#,
            r#"userName eq "a" and active eq true"#,
        ] {
            match parse(filter, USERS) {
                Err(ScimError::Scim { scim_type: Some("invalidFilter"), .. }) => {}
                other => panic!("{filter:?}: {other:?}"),
            }
        }
    }
}
