"""``[database]``: a PostgreSQL URL without a password, checked when the site is read, with what to write."""

import pytest

from paitient.config import ConfigError, parse


def site(**database):
    return parse({"database": database})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://paitient@db/paitient", "scheme 'mysql' is not PostgreSQL"),
        ("/var/lib/paitient/db.sqlite", r"scheme '\(none\)' is not PostgreSQL"),
        (
            "postgresql://paitient:secret@db/paitient",
            r"the URL holds a password; remove it and put it in ~root/.pgpass",
        ),
        ("postgresql://paitient@db/paitient?password=secret", "the URL holds a password"),
        ("postgresql://paitient@db/paitient?passfile=/root/x", "leave passfile and options out of the URL"),
        ("postgresql://paitient@db", "name the database after the host"),
        ("postgresql://db/paitient", "name the role before the host"),
        ("postgresql://paitient@db:port/paitient", "not a URL"),
        ("postgresql://paitient@/paitient", "name the server"),
        ("postgresql://paitient@db/paitient?sslmod=require", "unknown URL parameter\\(s\\) sslmod"),
    ],
)
def test_a_bad_url_is_refused_with_what_to_write(url, message):
    with pytest.raises(ConfigError, match=r"\[database\] url: " + message) as refused:
        site(url=url)
    assert "secret" not in str(refused.value)  # a password is never repeated into a log


def test_urls_an_operator_writes_are_taken():
    assert site().database.url == ""
    for url in (
        "postgresql://paitient@db.hospital.example:5432/paitient?sslmode=verify-full&sslrootcert=/etc/ssl/ca.pem",
        "postgres://paitient@/paitient?host=/run/postgresql",
    ):
        assert site(url=url).database.url == url
    assert site(url=url, passfile="/etc/paitient/pgpass").database.schema("ledger") == "ledger"
    with pytest.raises(ConfigError, match="passfile: must be empty or an absolute path"):
        site(passfile="pgpass")


def test_ledger_url_is_not_taken_with_the_database_url():
    url = "postgresql://paitient@db/paitient"
    with pytest.raises(ConfigError, match="ledger_url.*replaced by \\[database\\] url, which is set too"):
        parse({"workspace": {"ledger_url": url}, "database": {"url": url}})
    assert parse({"workspace": {"ledger_url": url}}).workspace.ledger_url == url
