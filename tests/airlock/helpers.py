"""Helpers for the airlock tests: accounts, files owned by other users, published datasets."""

from __future__ import annotations

import io
import os
import re
import struct
import subprocess
import sys
import tempfile
import textwrap
from http.cookies import SimpleCookie
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pandas as pd
from jupyterhub.services.auth import HubOAuth
from PIL import Image, PngImagePlugin
from tornado.httpclient import AsyncHTTPClient, HTTPClientError
from traitlets import Dict, List

from paitient.channel import Peer
from paitient.registry import Member, Registry
from paitient.services.airlock.service import Airlock
from tests import rootmember, workspacegroup

STEWARD = ["access:services!service=airlock", "custom:airlock:review"]
RESEARCHER = ["access:services!service=airlock", "custom:airlock:request", "custom:airlock:download"]


def register(registry: Registry, username: str, uid: int, projects=(), roles=("researcher",)) -> Member:
    m = Member(username=username, account=f"pt-{username}", uid=uid, projects=tuple(projects), roles=tuple(roles))
    rootmember.put(registry, m)
    return m


def run_as(uid: int, code: str, run_dir: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run Python ``code`` as ``uid`` (a real other account), with the kernel's environment variable."""
    env = {"PATH": "/usr/bin:/bin", "PAITIENT_RUN_DIR": str(run_dir), "HOME": str(cwd or "/")}
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={uid}",
            "--regid=65534",
            workspacegroup.setpriv_groups(),
            sys.executable,
            "-c",
            textwrap.dedent(code),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(cwd or "/"),
        timeout=120,
    )


def give(path: Path, data: bytes, uid: int) -> Path:
    path.write_bytes(data)
    os.chown(path, uid, 65534)
    os.chmod(path, 0o600)
    return path


def csv_bytes(df: pd.DataFrame) -> bytes:
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    return buf.getvalue().encode()


def publish(site, project: str, dataset: str, df: pd.DataFrame, version: int = 1) -> Path:
    """Lay a dataset out as the ingest part publishes it (versions/N/data.parquet, current -> versions/N)."""
    base = site.data_root / project / dataset
    where = base / "versions" / str(version)
    where.mkdir(parents=True, exist_ok=True)
    df.to_parquet(where / "data.parquet")
    (where / "manifest.json").write_text(f'{{"version": {version}}}')
    if not (base / "current").exists():
        os.symlink(f"versions/{version}", base / "current")
    return where


def breast_cancer() -> pd.DataFrame:
    from sklearn.datasets import load_breast_cancer

    df = load_breast_cancer(as_frame=True).frame
    df.columns = [c.replace(" ", "_") for c in df.columns]
    return df


def wait_state(airlock: Airlock, rid: str, *wanted: str) -> None:
    airlock.wait_idle()
    state = airlock.store.get(rid).state
    assert state in wanted, f"request {rid} is {state}, expected {wanted}"


def rng_table(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"g": rng.choice(["a", "b"], 200), "v": rng.normal(size=200)})


# --------------------------------------------------------------------------------------------------
# The web pages

PREFIX = "/services/airlock/"


class KnownUserOAuth(HubOAuth):
    """The hub's OAuth client, except that the user model comes from a test cookie instead of the hub API."""

    users = Dict()

    def get_user(self, handler, *, sync=True):
        model = self.users.get(handler.get_cookie("test-user", ""))
        return {"kind": "user", **model, "scopes": list(model["scopes"])} if model else None


USERS = {
    "alice": {"name": "alice", "scopes": RESEARCHER},
    "carol": {"name": "carol", "scopes": RESEARCHER},
    "bob": {"name": "bob", "scopes": RESEARCHER},
    "dave": {"name": "dave", "scopes": ["access:services!service=airlock", "custom:airlock:request"]},
    "sam": {"name": "sam", "scopes": STEWARD},
    "steph": {"name": "steph", "scopes": [*STEWARD, *RESEARCHER]},
    "rita": {"name": "rita", "scopes": STEWARD},
    "ada": {"name": "ada", "scopes": STEWARD},
    "eve": {"name": "eve", "scopes": ["custom:airlock:review"]},
    "ren": {"name": "ren", "scopes": RESEARCHER},
}


class HubApiDouble(HubOAuth):
    """The hub's OAuth client with the hub's two HTTP endpoints answered locally: code -> token (checking
    the PKCE verifier as the hub does) and token -> user model. Everything else is JupyterHub's own code."""

    codes = Dict(help="code -> user model")
    verifiers_seen = List()

    async def _token_for_code(self, code, code_verifier=None):
        import base64
        import hashlib

        self.verifiers_seen.append(code_verifier)
        if code not in self.codes or code_verifier is None:
            raise RuntimeError("Failed to check authorization: Code verifier required.")
        return "token-" + hashlib.sha256(base64.b64encode(code_verifier.encode())).hexdigest()[:16] + "-" + code

    def user_for_token(self, token, use_cache=True, session_id="", *, sync=True):
        code = token.rsplit("-", 1)[-1] if token.startswith("token-") else None
        model = {"kind": "user", **self.codes[code]} if code in self.codes else None

        async def answer():
            return model

        return model if sync else answer()


def hub_api_double(codes: dict) -> HubApiDouble:
    return HubApiDouble(
        codes=codes,
        api_token="not-used",
        api_url="http://127.0.0.1:9/hub/api",
        hub_prefix="/hub/",
        base_url=PREFIX,
        oauth_client_id="service-airlock",
        access_scopes={"access:services!service=airlock"},
        oauth_redirect_uri="http://127.0.0.1:8000/services/airlock/oauth_callback",
    )


def known_user_auth() -> KnownUserOAuth:
    return KnownUserOAuth(
        users=USERS,
        api_token="not-used",
        api_url="http://127.0.0.1:9/hub/api",
        hub_prefix="/hub/",
        base_url=PREFIX,
        oauth_client_id="service-airlock",
        access_scopes={"access:services!service=airlock"},
        oauth_redirect_uri="http://127.0.0.1:8000/services/airlock/oauth_callback",
    )


def submit(airlock, registry, username: str, data: bytes, kind="table", name="t.csv", **args) -> str:
    """Submit through the service's own request operation (the socket layer is tested in test_service)."""
    member = registry.by_username(username)
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        fd = os.open(f.name, os.O_RDONLY)
        try:
            answer = airlock.op_request(
                Peer(pid=1, uid=member.uid, gid=65534),
                {"kind": kind, "justification": args.pop("justification", "needed"), "filename": name, **args},
                [fd],
            )
        finally:
            os.close(fd)
    return answer["id"]


GOOD = csv_bytes(pd.DataFrame({"stage": ["I", "II"], "patients": [120, 48]}))


class Client:
    """An HTTP client of the pages; ``user`` picks the identity :class:`KnownUserOAuth` gives the request."""

    def __init__(self, base: str):
        self.base = base
        self.http = AsyncHTTPClient()

    async def fetch(self, user: str | None, path: str, *, method="GET", body=None, cookies=None):
        jar = dict(cookies or {})
        if user:
            jar["test-user"] = user
        headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in jar.items())} if jar else {}
        try:
            return await self.http.fetch(
                self.base + PREFIX + path,
                method=method,
                headers=headers,
                body=urlencode(body) if body is not None else None,
                follow_redirects=False,
                raise_error=True,
            )
        except HTTPClientError as e:
            if e.response is None:
                raise
            return e.response

    async def decide(self, user: str, rid: str, action: str, comment: str):
        return await self.decide_with(user, rid, action=action, comment=comment)

    async def decide_with(self, user: str, rid: str, **form: str):
        """Post the decision form with these fields (action, comment, override, confirm_override)."""
        page = await self.fetch(user, f"requests/{rid}")
        assert page.code == 200
        token = re.search(r'name="_xsrf" value="([^"]+)"', page.body.decode())
        cookie = SimpleCookie(page.headers.get("Set-Cookie", ""))
        assert token, f"{user} sees no decision form"
        return await self.fetch(
            user,
            f"requests/{rid}/decision",
            method="POST",
            body={**form, "_xsrf": token.group(1)},
            cookies={"_xsrf": cookie["_xsrf"].value},
        )


# --------------------------------------------------------------------------------------------------
# Figures that carry more than pixels

SECRET = "patient 4711 born 1961-02-03 HIV+"


def png_chunks(data: bytes) -> tuple[list[bytes], bytes]:
    """The chunk types of a PNG in order, and whatever follows IEND."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while True:
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        kinds.append(kind)
        pos += 12 + length
        if kind == b"IEND":
            return kinds, data[pos:]


def figure_with_payload() -> tuple[Image.Image, bytes]:
    """A real figure whose text chunks, EXIF and the bytes after IEND carry a table."""
    im = Image.new("RGB", (64, 48), (20, 120, 200))
    im.putpixel((3, 5), (255, 0, 0))
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", SECRET)
    info.add_itxt("Description", SECRET, zip=True)
    exif = Image.Exif()
    exif[0x010E] = SECRET  # ImageDescription
    buf = io.BytesIO()
    im.save(buf, "PNG", pnginfo=info, exif=exif, dpi=(300, 300))
    return im, buf.getvalue() + csv_bytes(pd.DataFrame({"age": [87, 91], "sex": ["F", "M"]}))


def publish_indexed(site, project: str, dataset: str, df: pd.DataFrame, categories: dict | None = None) -> Path:
    """Publish ``df`` as version 1 with a manifest naming its columns (and ``categories`` per column, as the
    catalogue lists them) and build its exact-data-match index with the site's row-detection key."""
    import json

    from paitient.services.data import rowindex

    where = publish(site, project, dataset, df)
    columns = [
        {"name": c, "action": "keep", **({"categories": categories[c]} if c in (categories or {}) else {})}
        for c in df.columns
    ]
    (where / "manifest.json").write_text(json.dumps({"version": 1, "columns": columns}))
    rowindex.reindex_version(site, project, dataset, 1, rowindex.ensure_key(site))
    return where


AGES = np.concatenate([np.arange(20, 90).repeat(4), [91, 94]])  # 282 patients, two of them over 90


def registry_counts(site) -> pd.DataFrame:
    """Publish project registry's ``counts`` dataset (age, age band, sex of 282 patients, two over 90)."""
    band = pd.cut(AGES, [0, 45, 65, 200], right=False, labels=["0-44", "45-64", "65+"]).astype(str)
    df = pd.DataFrame({"age": AGES, "age_band": band, "sex": np.where(np.arange(len(AGES)) % 2, "F", "M")})
    publish_indexed(
        site, "registry", "counts", df, categories={"age_band": ["0-44", "45-64", "65+"], "sex": ["F", "M"]}
    )
    return df
