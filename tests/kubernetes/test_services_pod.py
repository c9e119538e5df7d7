"""The services in the hub's pod: the values' containers, what each may do, and their commands run here.

No cluster runs here. What runs is each container's own command (:class:`paitient.hub.kubeservices.
ServicesPod`, which the values file holds; a test keeps the two equal) with its security context made real
on this machine: the uid and groups it names, no capability but those it adds, no privilege escalation, a
pid namespace of its own (containers of a pod share none), a read-only root but the folders it mounts
writable, and the ServiceAccount's token out of reach. The pod's paths stand for folders of the test
(:func:`here`), its ports for free loopback ports.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import requests

from paitient import podtokens
from paitient.config import load
from paitient.hub import kubeservices
from paitient.hub.kubernetes import GATEWAY_PORT, SERVICE_PORTS, SERVICES
from paitient.hub.kubeservices import ServicesPod, from_values
from paitient.registry import Member, Registry
from paitient.services.egress import socket_path as egress_socket
from tests import rootmember, workspacegroup
from tests.kubernetes.test_values import VALUES, get_config, values
from tests.relay.conftest import (
    SITE,
    Pod,
    account_process,
    as_account,
    call_as,
    free_port,
    gateway_call,
    make_authority,
    only_child,
)

# -- the values -----------------------------------------------------------------------------------


def pod_of_values() -> ServicesPod:
    return from_values(values())


def test_the_values_hold_the_generated_services_pod():
    generated = pod_of_values().hub_values()
    for key, value in generated.items():
        assert get_config(f"hub.{key}") == value, (
            f"hub.{key} in {VALUES.name} is not what the profile makes; run "
            "python -m paitient.hub.kubeservices hub_config/kubernetes/values.yaml and paste its output"
        )


def containers_of_values() -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in get_config("hub.extraContainers")}


def test_every_service_and_the_gateway_is_a_container_of_the_hubs_pod():
    assert set(containers_of_values()) == {*SERVICE_PORTS, "gateway"}
    assert set(get_config("hub.services")) == set(SERVICE_PORTS)
    # the pages and the gateway on the ports the policy and the Service open
    for name, port in SERVICE_PORTS.items():
        c = containers_of_values()[name]
        assert c["ports"] == [{"name": f"pages-{name}", "containerPort": port}]
        assert f"--port={port}" in c["args"] and "--listen=0.0.0.0" in c["args"]
    assert containers_of_values()["gateway"]["ports"] == [{"name": "gateway", "containerPort": GATEWAY_PORT}]
    assert get_config("custom.paitient.servicesHost") == SERVICES


def test_no_container_but_the_hubs_holds_the_service_account_token():
    """An empty folder over the token's path: the admission controller adds the token to a container only
    where nothing is mounted there, so a service, or a worker that escaped into one, cannot use the API."""
    (empty,) = [v for v in get_config("hub.extraVolumes") if v["name"] == "no-api-token"]
    assert set(empty) == {"name", "emptyDir"}
    for c in [*get_config("hub.extraContainers"), *get_config("hub.initContainers")]:
        covers = [m for m in c["volumeMounts"] if m["mountPath"] == kubeservices.SERVICE_ACCOUNT_TOKEN]
        assert covers == [{"name": "no-api-token", "mountPath": kubeservices.SERVICE_ACCOUNT_TOKEN, "readOnly": True}]
    assert kubeservices.SERVICE_ACCOUNT_TOKEN not in {m["mountPath"] for m in get_config("hub.extraVolumeMounts")}


def test_every_volume_a_container_of_the_hubs_pod_mounts_is_one_of_the_pods():
    """Kubernetes refuses a pod with a mount of a volume the pod does not have, and the hub's Deployment then
    never starts: every mount of the hub's, the services', the gateway's and the init container's names one of
    the generated volumes."""
    volumes = [v["name"] for v in get_config("hub.extraVolumes")]
    assert len(volumes) == len(set(volumes))
    hub = {"name": "hub", "volumeMounts": get_config("hub.extraVolumeMounts")}
    for c in [hub, *get_config("hub.extraContainers"), *get_config("hub.initContainers")]:
        missing = {m["name"] for m in c["volumeMounts"]} - set(volumes)
        assert not missing, f"the container {c['name']} mounts {sorted(missing)}, which the pod does not have"


def test_what_each_container_may_do():
    by_name = containers_of_values()
    for c in by_name.values():
        ctx = c["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["privileged"] is False
        assert ctx["readOnlyRootFilesystem"] is True
        assert ctx["capabilities"]["drop"] == ["ALL"]
        # no container sees another's processes, and none the hub's environment (its proxy token, cookie secret)
        assert {e["name"] for e in c["env"]} == {"PYTHONUNBUFFERED", "PYTHONNOUSERSITE"}
    for name in ("ledger", "audit", "egress"):
        ctx = by_name[name]["securityContext"]
        assert ctx["runAsUser"] == 0 and "add" not in ctx["capabilities"]
        assert ctx["seccompProfile"] == {"type": "RuntimeDefault"} and "procMount" not in ctx
    for name in ("airlock", "jobs"):  # their workers run as accounts of their own, in bubblewrap
        ctx = by_name[name]["securityContext"]
        assert ctx["capabilities"]["add"] == ["CHOWN", "DAC_OVERRIDE", "FOWNER", "KILL", "SETGID", "SETUID"]
        assert ctx["procMount"] == "Unmasked" and ctx["seccompProfile"] == {"type": "Unconfined"}
    gateway = by_name["gateway"]["securityContext"]
    uid = get_config("custom.paitient.gatewayUid")
    assert gateway["runAsUser"] == uid and gateway["runAsNonRoot"] is True and "add" not in gateway["capabilities"]
    # Kubernetes allows an unmasked /proc in a pod with a user namespace only; the gateway's group is every
    # container's, so the hub may give it the token file and the gateway may open the services' sockets
    assert get_config("hub.extraPodSpec.hostUsers") is False
    assert get_config("hub.podSecurityContext.supplementalGroups") == [uid]
    assert get_config("hub.podSecurityContext.fsGroup") is None  # the hub's password files stay root's alone


def test_each_service_mounts_its_own_token_the_state_and_only_the_data_it_reads():
    pod = pod_of_values()
    by_name = containers_of_values()
    projects = sorted(get_config("custom.paitient.projectGids"))
    for name in SERVICE_PORTS:
        mounts = {m["mountPath"]: m for m in by_name[name]["volumeMounts"]}
        token = mounts[kubeservices.SERVICE_TOKEN]
        assert (token["name"], token["subPath"], token["readOnly"]) == ("paitient-service-tokens", name, True)
        assert mounts[pod.state_dir] == {"name": "paitient-state", "mountPath": pod.state_dir}
        data = sorted(p.rsplit("/", 1)[1] for p in mounts if p.startswith(f"{pod.data_root}/"))
        assert data == (projects if name in kubeservices.READS_DATA else [])
        assert all(mounts[f"{pod.data_root}/{p}"]["readOnly"] for p in data)
        assert "paitient-directory" not in {m["name"] for m in mounts.values()}  # the hub's alone
    (tokens,) = [v for v in get_config("hub.extraVolumes") if v["name"] == "paitient-service-tokens"]
    assert tokens["secret"]["secretName"] == "hub" and tokens["secret"]["defaultMode"] == 0o400
    assert {i["key"]: i["path"] for i in tokens["secret"]["items"]} == {
        f"hub.services.{name}.apiToken": name for name in SERVICE_PORTS
    }
    gateway = {m["mountPath"]: m for m in by_name["gateway"]["volumeMounts"]}
    assert gateway[pod.state_dir]["readOnly"] is True  # it reads the token file, it writes nothing there
    assert kubeservices.SERVICE_TOKEN not in gateway and "paitient-database" not in {
        m["name"] for m in gateway.values()
    }


def test_the_image_makes_the_workers_accounts_and_the_workspace_group_with_the_gateways_gid():
    text = (VALUES.parents[2] / "kernels" / "image" / "Containerfile").read_text()
    assert f"ARG GATEWAY_GID={get_config('custom.paitient.gatewayUid')}" in text
    assert 'groupadd --system --gid "${GATEWAY_GID}" paitient-users' in text
    for account in ("paitient-audit", "paitient-jobs"):
        assert f"        {account}" in text


# -- the containers, run here ---------------------------------------------------------------------

LEDGER_BUDGET = {"op": "budget", "args": {"project": "oncology"}}


@dataclass
class World:
    root: Path
    site_file: Path
    state: Path
    pod: ServicesPod
    gateway: Any
    user: Any
    tls_source: Path
    tls: Path
    tokens: Path
    ports: dict[str, int]

    def here(self, text: str) -> str:
        """A word of a container's command with the pod's paths and ports as they are on this machine."""
        for pod_path, path in (
            (kubeservices.SITE_FILE, str(self.site_file)),
            (kubeservices.TLS_SOURCE, str(self.tls_source)),
            (kubeservices.TLS_FOLDER, str(self.tls)),
        ):
            text = text.replace(pod_path, path)
        if text == f"--token-file={kubeservices.SERVICE_TOKEN}":
            raise AssertionError("a service's token is per service: see service_argv")
        for address in ("--listen=0.0.0.0", "--ip=0.0.0.0"):
            text = text.replace(address, address.replace("0.0.0.0", "127.0.0.1"))
        for name, port in self.ports.items():
            text = text.replace(f"--port={self.pod.service_ports.get(name, GATEWAY_PORT)}", f"--port={port}")
        return text


def container_argv(world: World, container: dict[str, Any], *, writable: list[Path], readonly: list[Path]) -> list[str]:
    """``container``'s command as its security context runs it: a mount and pid namespace of its own, the root
    read-only but ``writable``, ``readonly`` bound read-only, then its uid, groups and capabilities."""
    ctx = container["securityContext"]
    binds = "".join(f'mount --bind "{p}" "{p}" && ' for p in [*writable, *readonly])
    binds += "".join(f'mount -o remount,bind,ro "{p}" && ' for p in readonly)
    script = binds + 'mount -o remount,bind,ro / && exec "$@"'
    caps = "-all" + "".join(f",+{c.lower()}" for c in ctx["capabilities"].get("add", []))
    # the pod's supplementalGroups: the gateway's gid, which in the image is the workspace's group too; here
    # the workspace's group has a gid of its own, so both are given
    groups = f"--groups={world.gateway.pw_uid},{workspacegroup.gid()}"
    who = [] if ctx["runAsUser"] == 0 else [f"--reuid={ctx['runAsUser']}", f"--regid={ctx['runAsGroup']}"]
    command = [container.get("command") or [], container.get("args") or []]
    argv = [sys.executable if w == "python" else w for part in command for w in part]
    if container["name"] in SERVICE_PORTS:
        argv = [
            f"--token-file={world.tokens / container['name']}" if w.startswith("--token-file=") else w for w in argv
        ]
    return [
        "unshare",
        "--mount",
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        "sh",
        "-c",
        script,
        "sh",
        "setpriv",
        *who,
        groups,
        "--no-new-privs",
        f"--bounding-set={caps}",
        "--inh-caps=-all",
        *[world.here(w) for w in argv],
    ]


def as_hub(code: str) -> subprocess.CompletedProcess[str]:
    """Python run as the hub's container runs: root with no capability, the pod's supplementary group."""
    return subprocess.run(
        ["setpriv", "--no-new-privs", "--bounding-set=-all", "--inh-caps=-all", *code.split("\0")],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def world(world_tmp, make_system_user) -> World:
    gateway = make_system_user("gateway")
    user = make_system_user("pod")
    # the runner's account, which the services image makes (a container's root is read-only: no useradd)
    runner = make_system_user("jobs", member=False)
    audit = make_system_user("audit", member=False)  # the services image makes paitient-audit
    state = world_tmp / "state"
    state.mkdir(mode=0o755)
    site_file = world_tmp / "site.toml"
    site_file.write_text(
        SITE.format(state=state, gateway_uid=gateway.pw_uid)
        + f'\n[jobs]\naccount = "{runner.pw_name}"\n\n[airlock]\naudit_account = "{audit.pw_name}"\n'
    )
    site_file.chmod(0o644)
    site = load(site_file)
    rootmember.put(
        Registry.for_state_dir(state), Member("alice", user.pw_name, user.pw_uid, ("oncology",), ("researcher",))
    )
    tokens = world_tmp / "service-tokens"
    tokens.mkdir(mode=0o700)
    for name in SERVICE_PORTS:
        (tokens / name).write_text(secrets.token_hex(16))
        (tokens / name).chmod(0o400)
    authority, cert, key = make_authority(world_tmp / "tls-made", "paitient test authority")
    # the Secret paitient-gateway-tls as its volume has it: keys tls.crt and tls.key, root's files, 0400
    source = world_tmp / "tls-source"
    source.mkdir(mode=0o755)
    for made, key_name in ((cert, "tls.crt"), (key, "tls.key"), (authority, "ca.crt")):
        (source / key_name).write_bytes(made.read_bytes())
        (source / key_name).chmod(0o400 if key_name != "ca.crt" else 0o444)
    tls = world_tmp / "tls"
    tls.mkdir(mode=0o755)
    pod = ServicesPod(
        image="paitient-services:test",
        state_dir=str(state),
        data_root=str(site.data_root),
        gateway_uid=gateway.pw_uid,
        projects=("oncology",),
    )
    ports = {name: free_port() for name in [*SERVICE_PORTS, "gateway"]}
    return World(world_tmp, site_file, state, pod, gateway, user, world_tmp / "tls-source", tls, tokens, ports)


def test_the_hub_gives_the_token_file_to_the_gateways_group_with_no_capability_from_the_pods_group(world):
    """The hub's container is root with no capability: chgrp to a group it is not in needs CAP_CHOWN, so
    without the pod's supplementary group minting a pod's token would fail; with it, it works."""
    mint = (
        f"{sys.executable}\0-c\0from paitient import podtokens; "
        f"podtokens.mint({str(podtokens.token_file(world.state))!r}, 'alice', {world.user.pw_uid}, "
        f"group={world.gateway.pw_uid})"
    )
    refused = as_hub("--clear-groups\0" + mint)
    assert (
        refused.returncode != 0 and "PermissionError" in refused.stderr and "Operation not permitted" in refused.stderr
    )
    made = as_hub(f"--groups={world.gateway.pw_uid}\0" + mint)
    assert made.returncode == 0, made.stderr
    st = os.stat(podtokens.token_file(world.state))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, world.gateway.pw_uid, 0o640)


def test_the_init_container_gives_the_gateway_its_key_and_nothing_more(world):
    (init,) = world.pod.init_containers()
    r = subprocess.run(
        container_argv(world, init, writable=[world.tls], readonly=[]), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    key, cert = os.stat(world.tls / "tls.key"), os.stat(world.tls / "tls.crt")
    assert (key.st_uid, key.st_gid, stat.S_IMODE(key.st_mode)) == (world.gateway.pw_uid, world.gateway.pw_uid, 0o400)
    assert (cert.st_uid, stat.S_IMODE(cert.st_mode)) == (0, 0o444)


@contextlib.contextmanager
def services_pod(world: World) -> Iterator[dict[str, subprocess.Popen]]:
    """Every container of :class:`ServicesPod` run here, yielded once each serves."""
    site = load(world.site_file)
    (init,) = world.pod.init_containers()
    subprocess.run(container_argv(world, init, writable=[world.tls], readonly=[]), check=True, timeout=60)
    started: dict[str, subprocess.Popen] = {}
    with contextlib.ExitStack() as stack:
        for c in world.pod.containers():
            name = c["name"]
            if name == "gateway":
                log = world.root / "gateway.log"
                argv = container_argv(world, c, writable=[], readonly=[world.state])
                ready: Any = lambda log=log: log.exists() and b"listening on" in log.read_bytes()  # noqa: E731
            else:
                log = world.root / f"{name}.log"
                ctmp = world.root / f"tmp-{name}"
                ctmp.mkdir(mode=0o700, exist_ok=True)
                argv = container_argv(world, c, writable=[world.state, ctmp], readonly=[])
                argv = ["env", f"TMPDIR={ctmp}", *argv]
                sock = egress_socket(site) if name == "egress" else site.run_dir / f"{name}.sock"
                port = world.ports[name]
                ready = lambda sock=sock, port=port: sock.exists() and listening(port)  # noqa: E731
            # the egress container compiles its row scanner before it listens: its image's read-only root keeps
            # no cache of it here, and a cold compile took 64 s on a 2-core test machine
            within = 240.0 if name == "egress" else 60.0
            started[name] = stack.enter_context(account_process(argv, log, ready, in_namespace=True, within=within))
        yield started


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def minted_pod(world: World) -> Pod:
    """A user's pod as the hub makes it: its token minted as the hub's container mints it, in a file only the
    pod's user reads, and a folder for the relay's sockets."""
    mint = (
        f"{sys.executable}\0-c\0from paitient import podtokens; "
        f"t, who = podtokens.mint({str(podtokens.token_file(world.state))!r}, 'alice', {world.user.pw_uid}, "
        f"group={world.gateway.pw_uid}); print(t, who.pod)"
    )
    minted = as_hub(f"--groups={world.gateway.pw_uid}\0" + mint)
    assert minted.returncode == 0, minted.stderr
    token, pod_id = minted.stdout.split()
    token_dir = world.root / "pod-token"
    token_dir.mkdir(mode=0o700)
    (token_dir / "token").write_text(token)
    (token_dir / "token").chmod(0o400)
    sockets = world.root / "sockets"
    sockets.mkdir(mode=0o755)
    for p in (token_dir, token_dir / "token", sockets):
        os.chown(p, world.user.pw_uid, world.user.pw_gid)
    (world.root / "data").mkdir(mode=0o755, exist_ok=True)
    site = load(world.site_file)
    return Pod(
        site,
        world.user,
        None,
        world.gateway,
        podtokens.PodIdentity("alice", world.user.pw_uid, pod_id),
        token,
        token_dir / "token",
        world.ports["gateway"],
        sockets,
        world.root,
        world.tls_source / "ca.crt",
    )


@pytest.mark.e2e
def test_the_values_containers_run_as_their_contexts_say_and_a_pods_call_reaches_the_services(world):
    """The pod's containers as the values give them: each service and the gateway start (read-only root,
    their own pid namespace, no capability but theirs); a token the hub minted as the hub's container does
    lets a pod's relay reach the ledger as its user, the gateway opens an egress stream for the pod's
    server, and a service's pages answer on the pod network with the hub's sign-in."""
    relay_pod = minted_pod(world)
    with services_pod(world) as running:
        for name, proc in running.items():  # each in a pid namespace of its own: pid 1 there
            status = Path(f"/proc/{only_child(proc.pid)}/status").read_text().splitlines()
            (nspid,) = [line.split()[1:] for line in status if line.startswith("NSpid:")]
            assert len(nspid) == 2 and nspid[-1] == "1", (name, nspid)
        with relay_pod.relay():
            budget = call_as(world.user, relay_pod.sock("ledger"), LEDGER_BUDGET)
            assert "ok" in budget, budget
            # answered for the token's user, found in the registry by the uid the token names
            assert budget["ok"]["user"] == "alice" and list(budget["ok"]["projects"]) == ["oncology"]
        stream = gateway_call(relay_pod, {"token": relay_pod.token, "stream": "egress"})
        assert stream.get("ok") is not None, stream
        refused = gateway_call(relay_pod, {"token": "not-a-token", "stream": "egress"})
        assert refused.get("code") == "forbidden", refused
        # the ledger's pages, on the pod network, send a browser to the hub's sign-in
        page = requests.get(
            f"http://127.0.0.1:{world.ports['ledger']}/services/ledger/", allow_redirects=False, timeout=30
        )
        assert page.status_code == 302 and "/hub/api/oauth2/authorize" in page.headers["Location"]


@pytest.mark.e2e
def test_the_egress_container_indexes_what_ingest_on_a_host_published_into_the_state_claim(world):
    """Ingest runs on a host: it publishes into the data volumes and keeps its row indexes and their key in
    the host's state. The egress container, whose state is the claim, finds the published versions without
    an index there and builds them itself, under its own context (root with no capability, a read-only root),
    with a key of its own; the index finds the rows of a printed slice of the data."""
    from paitient.ops.demodata import publish_demo
    from paitient.rules.edm import Scan
    from paitient.services.data import rowindex

    site = load(world.site_file)
    host_state = world.root / "host-state"
    host_state.mkdir(mode=0o755)
    host = load(
        world.site_file, overrides={"workspace": {"state_dir": str(host_state), "data_root": str(site.data_root)}}
    )
    publish_demo(host)
    where = rowindex.index_dir(site, "oncology", "breast_cancer", 1)
    assert rowindex.index_dir(host, "oncology", "breast_cancer", 1).is_dir()
    assert not where.exists() and not rowindex.key_path(site).exists()
    log = world.root / "egress.log"
    built = "egress: built the row index of oncology/breast_cancer version 1"
    with services_pod(world):
        deadline = time.monotonic() + 240
        while built not in log.read_text(errors="replace") and time.monotonic() < deadline:
            time.sleep(0.5)
        text = log.read_text(errors="replace")
    assert built in text, text[-3000:]
    assert "oncology/breast_cancer has no row index here: building it" in text
    assert where.is_dir()  # renamed into place whole before the line was written
    key = rowindex.load_key(site)  # root's, 0600: load_key refuses anything else
    assert key != rowindex.load_key(host)
    frame = pq.read_table(site.data_root / "oncology" / "breast_cancer" / "current" / "data.parquet").to_pandas()
    found = Scan(frame.iloc[3:8].to_string()).rows(rowindex.load(where, key))
    assert set(range(3, 8)) <= {int(i) for i in found}, found


SUBMIT = """
import json, sys
from torch import nn
from paitient.kernel.jobs import submit
job = submit(nn.Sequential(nn.Linear(30, 2)), dataset="breast_cancer", target="target", epochs=2, batch_size=64,
             max_grad_norm=1.0, target_epsilon=1.0, lr=0.5)
job.wait(timeout=300, widget=False, poll=0.5)
print(json.dumps({"id": job.id, "state": job.state, "record": job.record}))
"""


@pytest.mark.e2e
def test_a_job_submitted_in_a_pod_trains_in_the_jobs_container_and_its_record_verifies(world):
    """The jobs container as the values give it (root with setuid and setgid only, no privilege escalation,
    a read-only root) takes a model submitted from a user's pod through the relay and the gateway, trains it
    in bubblewrap as the runner's account, and signs a record that verifies with the workspace's key."""
    from paitient.ops.demodata import publish_demo
    from paitient.rules import training_record
    from paitient.services.jobs import keys
    from paitient.services.jobs.store import JobStore

    publish_demo(load(world.site_file))
    relay_pod = minted_pod(world)
    with services_pod(world), relay_pod.relay():
        r = subprocess.run(
            [*as_account(world.user, groups="--clear-groups"), sys.executable, "-c", SUBMIT],
            capture_output=True,
            text=True,
            timeout=600,
            env={"PATH": "/usr/bin:/bin", "HOME": world.user.pw_dir, "PAITIENT_RUN_DIR": str(relay_pod.run_dir)},
        )
        assert r.returncode == 0, r.stderr[-3000:] + (world.root / "jobs.log").read_text(errors="replace")[-3000:]
        done = json.loads(r.stdout.strip().splitlines()[-1])
    assert done["state"] == "done", done
    store = JobStore(world.state)
    try:
        weights, published = store.released(done["id"])
        job = store.get(done["id"])
    finally:
        store.close()
    assert published == done["record"] and job.username == "alice"
    record = training_record.verify(
        done["record"], keys.load_public_key(keys.public_key_path(load(world.site_file))), weights
    )
    assert record["epsilon"] <= 1.0 + 1e-6 and record["dataset"] == "breast_cancer"


AUDIT = """
import json, sys
import torch
from safetensors.torch import save
from paitient.rules.split import split_indices
from paitient.services.airlock.mia import AuditJob, prepare_work_root, run_audit
from tests.airlock.helpers import breast_cancer

source = "import torch\\nclass Model(torch.nn.Module):\\n    def __init__(self):\\n        super().__init__()\\n" \\
    "        self.net = torch.nn.Linear(30, 2)\\n    def forward(self, x):\\n        return self.net(x)\\n"
ns = {}
exec(source, ns)
df = breast_cancer()
train, _ = split_indices(len(df), holdout=0.5, seed=0)
job = AuditJob(model_source=source, weights=save(ns["Model"]().state_dict()), data=df,
               members=[int(i) for i in train], features=[c for c in df.columns if c != "target"],
               target="target", preprocess="standardize")
print(json.dumps(run_audit(job, account=sys.argv[1], timeout=300, work_root=prepare_work_root(sys.argv[2]))))
"""


@pytest.mark.e2e
def test_the_airlock_containers_context_runs_the_membership_inference_audit(world):
    """The airlock's membership-inference audit, as the airlock's container runs it (root with the workers'
    capabilities only, no privilege escalation, a read-only root, its own pid namespace): the model runs in
    bubblewrap as the audit's account, and the numbers come back."""
    account = pwd.getpwnam(load(world.site_file).airlock.audit_account)
    (airlock,) = [c for c in world.pod.containers() if c["name"] == "airlock"]
    work = world.state / "airlock-audit"  # as the airlock names it (Airlock.audit_work_root)
    ctmp = world.root / "tmp-airlock"
    ctmp.mkdir(mode=0o700)
    container = {**airlock, "args": ["python", "-c", AUDIT, account.pw_name, str(work)]}
    r = subprocess.run(
        [
            "env",
            f"TMPDIR={ctmp}",
            f"PYTHONPATH={Path(__file__).resolve().parents[2]}",
            *container_argv(world, container, writable=[world.state, ctmp], readonly=[]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    answer = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in answer, answer
    assert {"mia_loss", "mia_calibrated", "mia_advantage", "holdout_accuracy"} <= set(answer), answer
    assert not any(work.iterdir())  # the worker's scratch taken back and removed


CHECKED = """
def checked(rid):
    # the request's status once the airlock's checks have run on it (or after 400 s)
    end = time.monotonic() + 400
    while time.monotonic() < end:
        status = airlock.status(rid)
        if status["state"] not in ("submitted", "checking"):
            break
        time.sleep(1)
    return status
"""
"""A kernel's wait for a request's checks: ``checked(rid)``, in code that has imported ``time`` and
:mod:`paitient.airlock`."""

REQUEST = (
    """
import json, sys, time
from paitient import airlock
"""
    + CHECKED
    + """
rid = airlock.request(sys.argv[1], kind="weights", confirm=True, justification="for the paper",
                      model_source=sys.argv[2], target="target", split={"holdout": 0.3, "seed": 0},
                      dataset="breast_cancer")
print(json.dumps(checked(rid)))
"""
)

ONE_STEWARD = 'stewards = ["sam"]\nbudget = { epsilon = 10.0, delta = 1e-5 }'
"""The oncology project of :data:`tests.relay.conftest.SITE`: one steward, weights from a kernel refused."""
SELF_REPORTED_ALLOWED = (
    'stewards = ["sam", "kim"]\nbudget = { epsilon = 10.0, delta = 1e-5 }\n'
    'self_reported_weights = "two-person"\nself_reported_reason = "an audit of the request path"'
)
"""The same project allowing weights trained in a kernel, with two stewards' approval."""


@pytest.mark.e2e
def test_a_weights_request_from_a_pod_is_audited_by_the_airlock_container(world):
    """The whole request path of the membership-inference audit in the hub's pod: a researcher's kernel in
    their pod asks for weights through the relay and the gateway; the airlock container (its own command,
    under its context) takes the file, runs the audit in bubblewrap as the audit's account over the dataset,
    and the researcher reads the checks back the same way."""
    from safetensors.torch import save
    from torch import nn

    from tests.airlock.helpers import breast_cancer, give, publish
    from tests.airlock.test_service import LINEAR

    # weights trained in a kernel are refused unless the project allows them, with two stewards' approval
    assert ONE_STEWARD in world.site_file.read_text()
    world.site_file.write_text(world.site_file.read_text().replace(ONE_STEWARD, SELF_REPORTED_ALLOWED, 1))
    publish(load(world.site_file), "oncology", "breast_cancer", breast_cancer())
    untrained = {f"lin.{k}": v for k, v in nn.Linear(30, 2).state_dict().items()}  # LINEAR's parameters
    weights = give(world.root / "model.safetensors", save(untrained), world.user.pw_uid)
    relay_pod = minted_pod(world)
    with services_pod(world), relay_pod.relay():
        r = subprocess.run(
            [*as_account(world.user, groups="--clear-groups"), sys.executable, "-c", REQUEST, str(weights), LINEAR],
            capture_output=True,
            text=True,
            timeout=600,
            env={"PATH": "/usr/bin:/bin", "HOME": world.user.pw_dir, "PAITIENT_RUN_DIR": str(relay_pod.run_dir)},
        )
        airlock_log = (world.root / "airlock.log").read_text(errors="replace")
    assert r.returncode == 0, r.stderr[-3000:] + airlock_log[-3000:]
    status = json.loads(r.stdout.strip().splitlines()[-1])
    assert status["state"] == "in_review", (status, airlock_log[-3000:])
    checks = {c["check"]: c for c in status["checks"]}
    # an untrained linear model does not memorise: the audit ran over the dataset's 569 rows and passed
    mia = checks["membership_inference"]
    assert mia["status"] == "pass" and "the airlock's audit of the model's outputs" in mia["reason"], mia
    assert (mia["details"]["members"], mia["details"]["nonmembers"]) == (398, 171)  # 569 rows, 30 % held out
    assert checks["training_record"]["status"] == "fail"  # no runner signed it, and no kernel's record
    work = world.state / "airlock-audit"
    assert work.is_dir() and not any(work.iterdir())  # the worker's scratch taken back and removed
