"""StartTLS against a real slapd with test certificates: the bind happens only with a certificate that is
trusted and names the server; otherwise the login page says the directory cannot be reached."""

import subprocess
from pathlib import Path

import pytest
from tornado import web

from paitient.ops.demo import DEMO_BASE_DN, DEMO_PEOPLE
from paitient.ops.directory import demo_ldif, ssha

PASSWORDS = {name: f"{name}-tls-pw" for name, *_ in DEMO_PEOPLE}


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-subj",
        f"/CN=paitient test {name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )


def make_server_cert(d: Path, name: str, ca: str, san: str) -> tuple[Path, Path]:
    openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
        cwd=d,
    )
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=d,
    )
    return d / f"{name}.pem", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "hospital-ca")
    make_ca(d, "rogue-ca")
    return {
        "ca": d / "hospital-ca.pem",
        "good": make_server_cert(d, "good", "hospital-ca", "IP:127.0.0.1,DNS:localhost"),
        "rogue": make_server_cert(d, "rogue", "rogue-ca", "IP:127.0.0.1,DNS:localhost"),
        "wrong-host": make_server_cert(d, "wrong-host", "hospital-ca", "DNS:dc1.elsewhere.example"),
    }


@pytest.fixture
def tls_directory(make_slapd):
    def start(cert_and_key):
        ldif = demo_ldif(DEMO_BASE_DN, DEMO_PEOPLE, {n: ssha(p) for n, p in PASSWORDS.items()})
        return make_slapd(DEMO_BASE_DN, ldif, tls_files=cert_and_key, name="tls")

    return start


async def sign_in(auth, username, password):
    return await auth.get_authenticated_user(None, {"username": username, "password": password})


async def test_starttls_with_a_trusted_certificate_signs_in(pki, tls_directory, demo_site, make_authenticator):
    server = tls_directory(pki["good"])
    auth = make_authenticator(demo_site(url=server.url, tls="starttls", ca_file=str(pki["ca"])))
    assert auth.tls_strategy.name == "before_bind"
    model = await sign_in(auth, "alice", PASSWORDS["alice"])
    assert model["groups"] == ["oncology"]


@pytest.mark.parametrize(
    ("cert", "trust"),
    [("rogue", "ca"), ("wrong-host", "ca"), ("good", None)],
    ids=["untrusted-issuer", "certificate-for-another-host", "private-ca-not-given"],
)
async def test_certificate_that_does_not_verify_is_refused(
    pki, tls_directory, demo_site, make_authenticator, cert, trust
):
    server = tls_directory(pki[cert])
    directory = {"url": server.url, "tls": "starttls"}
    if trust:
        directory["ca_file"] = str(pki[trust])
    auth = make_authenticator(demo_site(**directory))
    with pytest.raises(web.HTTPError) as e:
        await sign_in(auth, "alice", PASSWORDS["alice"])
    assert e.value.status_code == 503
    assert e.value.log_message == "The hospital directory cannot be reached; try again in a few minutes."
