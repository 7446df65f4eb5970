"""A directory provisioning Plinth over SCIM 2.0, driven by scim2-client.

`tests/scim.rs` runs one step at a time and checks in Plinth what each did:

    python directory.py <step> <scim base url> <token> [arguments...]

Each step prints one JSON object. The requests are the ones Okta and
Entra ID send (their documented shapes, verbatim where it matters: Okta's
PATCH without a path, Entra ID's capitalised ops and "False" as a string);
scim2-client checks every answer against the schemas the server publishes.
"""

import json
import sys

from httpx2 import Client
from scim2_client.engines.httpx2 import SyncSCIMClient
from scim2_models import Error, SCIMException, SearchRequest

PATCH = "urn:ietf:params:scim:api:messages:2.0:PatchOp"


def connect(base, token):
    client = Client(base_url=base, headers={"Authorization": f"Bearer {token}"})
    scim = SyncSCIMClient(client)
    scim.discover()
    return scim, scim.get_resource_model("User"), scim.get_resource_model("Group")


def patch(scim, model, id, operations):
    """A PATCH sent exactly as written."""
    body = {"schemas": [PATCH], "Operations": operations}
    return scim.modify(model, id, body, check_request_payload=False)


def found(scim, model, filter):
    return scim.query(model, query_parameters=SearchRequest(filter=filter))


def error_status(call):
    """The status of the SCIM error `call` raises (it must raise one)."""
    try:
        result = call()
    except SCIMException as exc:
        return int(exc.to_error().status)
    if isinstance(result, Error):
        return int(result.status)
    raise AssertionError(f"expected an error, got {result!r}")


def discover(scim, User, Group):
    assert User is not None and Group is not None
    assert scim.service_provider_config.patch.supported
    assert not scim.service_provider_config.bulk.supported
    return {"types": sorted(t.id for t in scim.resource_types)}


def okta_create(scim, User, Group, email, given, family):
    # Okta looks the user up first, then creates them.
    assert found(scim, User, f'userName eq "{email}"').total_results == 0
    user = scim.create(
        User(
            user_name=email,
            name=User.Name(given_name=given, family_name=family),
            emails=[User.Emails(value=email, type="work", primary=True)],
            display_name=f"{given} {family}",
            active=True,
        )
    )
    assert user.user_name == email and user.active is True, user
    again = scim.query(User, user.id)
    assert again.name.given_name == given and again.display_name == f"{given} {family}", again
    assert found(scim, User, f'userName eq "{email.upper()}"').total_results == 1
    return {"id": user.id}


def okta_active(scim, User, Group, id, active):
    # Okta's deactivation and reactivation: a replace with no path.
    user = patch(scim, User, id, [{"op": "replace", "value": {"active": active == "true"}}])
    assert user.active is (active == "true"), user
    return {"active": user.active}


def okta_push_group(scim, User, Group, name, member):
    # Okta's group push: the group, then its members by PATCH.
    assert found(scim, Group, f'displayName eq "{name}"').total_results == 0
    group = scim.create(Group(display_name=name))
    group = patch(scim, Group, group.id, [{"op": "add", "path": "members", "value": [{"value": member, "display": "x"}]}])
    assert [m.value for m in group.members] == [member], group
    user = scim.query(User, member)
    assert [g.display for g in user.groups] == [name], user
    return {"id": group.id}


def okta_unassign(scim, User, Group, group, member):
    group = patch(scim, Group, group, [{"op": "remove", "path": f'members[value eq "{member}"]'}])
    assert not group.members, group
    return {"members": 0}


def entra_create(scim, User, Group, email, external_id):
    # Entra ID: a lookup by userName, a create with its externalId, then
    # lookups by externalId.
    assert found(scim, User, f'userName eq "{email}"').total_results == 0
    user = scim.create(User(user_name=email, external_id=external_id, active=True, display_name="Bob"))
    by_external = found(scim, User, f'externalId eq "{external_id}"')
    assert [u.id for u in by_external.resources] == [user.id], by_external
    user = patch(
        scim,
        User,
        user.id,
        [
            {"op": "Add", "path": "name.givenName", "value": "Robert"},
            {"op": "Replace", "path": "displayName", "value": "Robert B."},
            {"op": "Replace", "path": 'emails[type eq "work"].value', "value": email},
        ],
    )
    assert user.name.given_name == "Robert" and user.display_name == "Robert B.", user
    return {"id": user.id}


def entra_active(scim, User, Group, id, active):
    value = "True" if active == "true" else "False"
    user = patch(scim, User, id, [{"op": "Replace", "path": "active", "value": value}])
    assert user.active is (active == "true"), user
    return {"active": user.active}


def entra_group(scim, User, Group, name, member):
    lookup = scim.query(
        Group, query_parameters={"filter": f'displayName eq "{name}"', "excludedAttributes": "members"}
    )
    assert lookup.total_results == 0
    group = scim.create(Group(display_name=name, external_id=f"ext-{name}"))
    group = patch(scim, Group, group.id, [{"op": "Add", "path": "members", "value": [{"value": member}]}])
    assert [m.value for m in group.members] == [member], group
    listed = scim.query(Group, query_parameters={"filter": f'displayName eq "{name}"', "excludedAttributes": "members"})
    assert listed.total_results == 1 and not listed.resources[0].members, listed
    return {"id": group.id}


def entra_leave(scim, User, Group, group, member):
    group = patch(scim, Group, group, [{"op": "Remove", "path": "members", "value": [{"value": member}]}])
    assert not group.members, group
    return {"members": 0}


def isolation(scim, User, Group, user, group, email):
    """Another organization's token: acme's user and group are not there."""
    assert error_status(lambda: scim.query(User, user)) == 404
    assert error_status(lambda: scim.query(Group, group)) == 404
    assert found(scim, User, f'userName eq "{email}"').total_results == 0
    assert found(scim, User, f'id eq "{user}"').total_results == 0
    assert all(u.id != user for u in scim.query(User).resources or [])
    assert all(g.id != group for g in scim.query(Group).resources or [])
    assert error_status(lambda: patch(scim, User, user, [{"op": "replace", "value": {"active": False}}])) == 404
    assert error_status(lambda: patch(scim, Group, group, [{"op": "add", "path": "displayName", "value": "x"}])) == 404
    assert error_status(lambda: scim.delete(User, user)) == 404
    assert error_status(lambda: scim.delete(Group, group)) == 404
    # Nor can it provision acme's domain, or put acme's user in its group.
    assert error_status(lambda: scim.create(User(user_name=email))) == 400
    own = scim.create(Group(display_name="Globex staff"))
    members = [{"op": "add", "path": "members", "value": [{"value": user}]}]
    assert error_status(lambda: patch(scim, Group, own.id, members)) == 400
    return {"refused": True}


def link(scim, User, Group, email):
    user = scim.create(User(user_name=email, active=True))
    return {"id": user.id}


def refused_deactivation(scim, User, Group, id):
    status = error_status(lambda: patch(scim, User, id, [{"op": "replace", "value": {"active": False}}]))
    return {"status": status, "active": scim.query(User, id).active}


def delete(scim, User, Group, id):
    assert scim.delete(User, id) is None
    assert error_status(lambda: scim.query(User, id)) == 404
    return {"deleted": True}


STEPS = {
    "discover": discover,
    "okta-create": okta_create,
    "okta-active": okta_active,
    "okta-push-group": okta_push_group,
    "okta-unassign": okta_unassign,
    "entra-create": entra_create,
    "entra-active": entra_active,
    "entra-group": entra_group,
    "entra-leave": entra_leave,
    "isolation": isolation,
    "link": link,
    "refused-deactivation": refused_deactivation,
    "delete": delete,
}

if __name__ == "__main__":
    step, base, token, *args = sys.argv[1:]
    scim, User, Group = connect(base, token)
    print(json.dumps(STEPS[step](scim, User, Group, *args)))
