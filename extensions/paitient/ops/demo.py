"""The people of the embedded demo directory (the site itself is ``paitient/embedded_site.toml``).

``paitient up`` with no site configuration runs on this. The directory is a private slapd on loopback;
passwords are generated per state directory and printed at start (see :mod:`paitient.ops.directory`).
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
    ("tina", "Tina Thiel", (), True),
)
