"""The embedded default: a demo hospital directory and two demo projects.

``paitient up`` with no site configuration runs on this. The directory is a private slapd on loopback;
passwords are generated per state directory and printed at start (see :mod:`paitient.hub.directory`).
"""

from __future__ import annotations

DEMO_BASE_DN = "dc=hospital,dc=example"

# name, full name, projects (directory groups), steward?
DEMO_PEOPLE: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("alice", "Alice Adler", ("oncology",), False),
    ("bob", "Bob Brandt", ("cardiometabolic",), False),
    ("carol", "Carol Claussen", ("oncology", "cardiometabolic"), False),
    ("dave", "Dave Dorn", (), False),
    ("sam", "Sam Steiner", (), True),
)

DEMO_SITE = f"""
[workspace]
state_dir = "/var/lib/paitient"

[directory]
# Empty url: paitient starts an embedded demo directory on loopback.
url = ""
bind_dn_template = ["uid={{username}},ou=people,{DEMO_BASE_DN}"]
group_base = "ou=groups,{DEMO_BASE_DN}"
steward_group = "cn=data-stewards,ou=groups,{DEMO_BASE_DN}"
admin_group = "cn=workspace-admins,ou=groups,{DEMO_BASE_DN}"

[[projects]]
name = "oncology"
group = "cn=oncology,ou=groups,{DEMO_BASE_DN}"
description = "Tumour classification and survival after breast cancer"
datasets = ["breast_cancer", "gbsg2"]
stewards = ["sam"]
approvals = 1
budget = {{ epsilon = 10.0, delta = 1e-5 }}

[[projects]]
name = "cardiometabolic"
group = "cn=cardiometabolic,ou=groups,{DEMO_BASE_DN}"
description = "Disease progression in diabetes"
datasets = ["diabetes"]
stewards = ["sam"]
approvals = 1
budget = {{ epsilon = 10.0, delta = 1e-5 }}
"""
