"""The services' registry on Kubernetes: the hub records each user it starts a pod for, with the pod's uid and
the user's projects, where the services look a pod's caller up (the uid its token names); and it refuses to
give a uid to a second user."""

from __future__ import annotations

import json

import pytest

from paitient.hub.kubernetes import ProfileError, register_pod_user, user_uid
from paitient.registry import Registry
from tests.kubernetes.conftest import spawner_for
from tests.kubernetes.test_pod import profile


async def test_a_pods_user_is_in_the_registry_with_the_pods_uid_and_the_users_projects(site, make_user):
    c = profile(site)
    alice = make_user("alice", ("oncology", "genomics"))
    spawner = spawner_for(alice, c)
    member = spawner.register()
    uid = user_uid(site, alice.id)
    registry = Registry.for_state_dir(site.state_dir)
    # what a service finds for the uid the pod's token names
    found = registry.by_uid(uid)
    assert found is not None and found == member
    assert (found.username, found.uid, found.projects, found.account) == (
        "alice",
        uid,
        ("genomics", "oncology"),
        spawner.pod_name,
    )
    # the file is the registry a host's hub writes: root's, readable by the services, written whole
    assert registry.path.stat().st_mode & 0o777 == 0o644
    assert json.loads(registry.path.read_text())["alice"]["uid"] == uid


async def test_a_users_projects_follow_the_directory_at_each_start(site, make_user, hub_db):
    from jupyterhub import orm

    c = profile(site)
    alice = make_user("alice", ("oncology", "genomics"))
    spawner_for(alice, c).register()
    alice.orm_user.groups = [orm.Group.find(hub_db, "cardiometabolic")]  # the directory moved her
    hub_db.commit()
    spawner_for(alice, c).register()
    found = Registry.for_state_dir(site.state_dir).by_username("alice")
    assert found is not None and found.projects == ("cardiometabolic",)


def test_a_uid_is_never_given_to_a_second_user(site):
    register_pod_user(site, "alice", 61000, projects=("oncology",), roles=(), account="jupyter-alice")
    # a new hub database gave another user alice's old id: her files and budget stay hers
    with pytest.raises(ProfileError, match="uid 61000 belongs to 'alice' in the registry"):
        register_pod_user(site, "bob", 61000, projects=("oncology",), roles=(), account="jupyter-bob")
    # and alice, now with another id, does not leave her uid behind silently
    with pytest.raises(ProfileError, match="gives 'alice' uid 61000, the hub's id for the user gives uid 61007"):
        register_pod_user(site, "alice", 61007, projects=("oncology",), roles=(), account="jupyter-alice")
    registry = Registry.for_state_dir(site.state_dir)
    assert registry.by_uid(61000) is not None and registry.by_uid(61000).username == "alice"
    assert registry.by_username("bob") is None and registry.by_uid(61007) is None
