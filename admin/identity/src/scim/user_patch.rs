//! What Plinth keeps of a directory user, and how a PATCH changes it: the
//! forms Okta sends (a `replace` with no path and an object of attributes)
//! and Entra ID's (capitalised ops, a path per attribute, `"False"` as a
//! string), RFC 7644 3.5.2.

use super::{Op, Operation, ScimError, USER_SCHEMA, text};

/// What Plinth keeps of a directory user in an organization.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Kept {
    pub external_id: Option<String>,
    pub given_name: Option<String>,
    pub family_name: Option<String>,
    pub display_name: Option<String>,
    pub active: bool,
}

/// 400 `mutability` unless `user_name` is the account's address `email`.
pub(super) fn same_address(email: &str, user_name: &str) -> Result<(), ScimError> {
    if !email.eq_ignore_ascii_case(user_name.trim()) {
        return Err(ScimError::bad("mutability", "userName is the account's address and cannot change through SCIM"));
    }
    Ok(())
}

/// A text value of a PATCH operation: a string, or null to clear.
fn text_value(name: &str, value: Option<&serde_json::Value>) -> Result<Option<String>, ScimError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => text(name, Some(s)),
        Some(_) => Err(ScimError::bad("invalidValue", format!("{name} must be a string"))),
    }
}

/// `active`'s value: a boolean, or (as Entra ID sends it) `"True"` or
/// `"False"`.
fn active_value(value: Option<&serde_json::Value>) -> Result<bool, ScimError> {
    match value {
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
        Some(serde_json::Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(ScimError::bad("invalidValue", "active must be true or false")),
    }
}

/// Applies one attribute of a PATCH to `kept`: `path` is lowercase, its
/// schema prefix removed; `value` is `None` for a removal.
fn patch_attribute(
    email: &str,
    kept: &mut Kept,
    path: &str,
    value: Option<&serde_json::Value>,
) -> Result<(), ScimError> {
    let removal = value.is_none();
    match path {
        "active" if removal => return Err(ScimError::bad("mutability", "active cannot be removed")),
        "active" => kept.active = active_value(value)?,
        "username" => match value {
            Some(serde_json::Value::String(name)) => same_address(email, name)?,
            _ => return Err(ScimError::bad("mutability", "userName cannot be removed or changed")),
        },
        "externalid" => kept.external_id = text_value("externalId", value)?,
        "displayname" => kept.display_name = text_value("displayName", value)?,
        "name.givenname" => kept.given_name = text_value("name.givenName", value)?,
        "name.familyname" => kept.family_name = text_value("name.familyName", value)?,
        "name" => match value {
            None | Some(serde_json::Value::Null) => (kept.given_name, kept.family_name) = (None, None),
            Some(serde_json::Value::Object(parts)) => {
                for (part, v) in parts {
                    patch_attribute(email, kept, &format!("name.{}", part.to_ascii_lowercase()), Some(v))?;
                }
            }
            Some(_) => return Err(ScimError::bad("invalidValue", "name must be an object")),
        },
        // What Plinth does not keep (emails: the address is userName).
        _ => {}
    }
    Ok(())
}

/// `kept` with a PATCH's operations applied, for the account `email`.
pub(super) fn patched(email: &str, mut kept: Kept, operations: &[Operation]) -> Result<Kept, ScimError> {
    for operation in operations {
        let op = operation.op()?;
        let path = operation.path.as_deref().map(|p| {
            let p = p.trim();
            p.strip_prefix(USER_SCHEMA).map(|rest| rest.trim_start_matches(':')).unwrap_or(p).to_ascii_lowercase()
        });
        match (op, path) {
            (Op::Remove, None) => return Err(ScimError::bad("noTarget", "a remove operation needs a path")),
            (Op::Remove, Some(path)) => patch_attribute(email, &mut kept, &path, None)?,
            (Op::Add | Op::Replace, Some(path)) => {
                let value = operation.value.as_ref().unwrap_or(&serde_json::Value::Null);
                patch_attribute(email, &mut kept, &path, Some(value))?;
            }
            // No path: the value is an object of attributes (Okta's form).
            (Op::Add | Op::Replace, None) => match &operation.value {
                Some(serde_json::Value::Object(attributes)) => {
                    for (name, value) in attributes {
                        let name = name.strip_prefix(USER_SCHEMA).map(|r| r.trim_start_matches(':')).unwrap_or(name);
                        patch_attribute(email, &mut kept, &name.to_ascii_lowercase(), Some(value))?;
                    }
                }
                _ => return Err(ScimError::bad("invalidValue", "without a path, the value must be an object")),
            },
        }
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const EMAIL: &str = "alice@example.com";

    fn operations(value: serde_json::Value) -> Vec<Operation> {
        serde_json::from_value(value).unwrap_or_default()
    }

    fn active() -> Kept {
        Kept { active: true, given_name: Some("Alice".into()), ..Kept::default() }
    }

    #[test]
    fn oktas_replace_without_a_path_deactivates_and_reactivates() -> Result<(), ScimError> {
        let off = patched(EMAIL, active(), &operations(json!([{ "op": "replace", "value": { "active": false } }])))?;
        assert_eq!(off, Kept { active: false, ..active() });
        let on = patched(EMAIL, off, &operations(json!([{ "op": "replace", "value": { "active": true } }])))?;
        assert_eq!(on, active());
        Ok(())
    }

    #[test]
    fn entra_ids_capitalised_ops_and_string_booleans_are_understood() -> Result<(), ScimError> {
        let ops = operations(json!([
            { "op": "Replace", "path": "active", "value": "False" },
            { "op": "Add", "path": "name.givenName", "value": "Robert" },
            { "op": "Replace", "path": "urn:ietf:params:scim:schemas:core:2.0:User:displayName", "value": "Bob" },
            { "op": "Replace", "path": "emails[type eq \"work\"].value", "value": EMAIL },
            { "op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department", "value": "R&D" },
            { "op": "Remove", "path": "externalId" },
        ]));
        let kept = Kept { external_id: Some("ext".into()), ..active() };
        let want = Kept {
            active: false,
            given_name: Some("Robert".into()),
            display_name: Some("Bob".into()),
            external_id: None,
            family_name: None,
        };
        assert_eq!(patched(EMAIL, kept, &ops)?, want);
        Ok(())
    }

    #[test]
    fn a_name_object_sets_its_parts_and_null_clears_them() -> Result<(), ScimError> {
        let ops = operations(json!([{ "op": "replace", "path": "name", "value": { "familyName": "Liddell" } }]));
        let named = patched(EMAIL, active(), &ops)?;
        assert_eq!((named.given_name.as_deref(), named.family_name.as_deref()), (Some("Alice"), Some("Liddell")));
        let cleared = patched(EMAIL, named, &operations(json!([{ "op": "remove", "path": "name" }])))?;
        assert_eq!((cleared.given_name, cleared.family_name), (None, None));
        Ok(())
    }

    #[test]
    fn what_cannot_change_is_refused() {
        let refused = |ops: serde_json::Value| match patched(EMAIL, active(), &operations(ops)) {
            Err(ScimError::Scim { scim_type, .. }) => scim_type,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            refused(json!([{ "op": "replace", "path": "userName", "value": "eve@example.com" }])),
            Some("mutability")
        );
        assert_eq!(refused(json!([{ "op": "remove", "path": "active" }])), Some("mutability"));
        assert_eq!(refused(json!([{ "op": "replace", "path": "active", "value": "maybe" }])), Some("invalidValue"));
        assert_eq!(refused(json!([{ "op": "remove" }])), Some("noTarget"));
        assert_eq!(refused(json!([{ "op": "move", "path": "active", "value": true }])), Some("invalidSyntax"));
        assert_eq!(refused(json!([{ "op": "replace", "value": "active" }])), Some("invalidValue"));
        // The same address, in another case, is no change.
        let same = json!([{ "op": "replace", "path": "userName", "value": "Alice@Example.com" }]);
        assert!(patched(EMAIL, active(), &operations(same)).is_ok());
    }
}
