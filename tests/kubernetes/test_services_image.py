"""The hub's pod's services, run from the ``services`` image as the values give them.

``tests/kubernetes/test_services_pod.py`` runs each container's command on this machine's environment under
its security context. Here the same containers (:class:`paitient.hub.kubeservices.ServicesPod`, which the
values hold) run from the image ``bash scripts/setup test`` built, on podman, with the pod's security
context merged into each container's (:class:`~tests.kubernetes.test_images.Pod`). A user's side stands in
beside them: a container of the ``singleuser`` image as the user's uid, with no capability, holding the pod
token the hub minted and the gateway's authority, that runs the relay and calls through it: the ledger; a
model it submits, which the jobs container trains in bubblewrap as the image's runner account; that job's
weights asked for through the airlock, and weights from the kernel, which the airlock container audits in
bubblewrap as the image's audit account. It shares the
hub pod's network namespace (only a loopback), since no pod network joins two podman pods here, and so
the pod's supplementary group too (it mounts nothing of the state that group opens); the policies that let
users' pods reach the gateway's port are tested in ``test_network.py``.

Left out, as in ``test_images.py``: ``hostUsers: false`` (Debian 12's runc cannot give the pod a user
namespace with idmapped mounts), and the hub's own container (no hub image is built here). So the services'
pages are only shown to send a browser to the hub's sign-in.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from paitient import podtokens
from paitient.config import load
from paitient.hub.kubernetes import GATEWAY_CA_FOLDER, GATEWAY_PORT, SERVICE_PORTS, data_volume_name
from paitient.hub.kubeservices import GATEWAY, ServicesPod
from paitient.ops.demodata import publish_demo
from paitient.ops.images import image_tag
from paitient.registry import Member, Registry
from paitient.rules import training_record
from paitient.services.egress import socket_path as egress_socket
from paitient.services.jobs import keys
from paitient.services.jobs.store import JobStore
from paitient.services.relay import TOKEN_FILE
from tests import rootmember
from tests.airlock.test_service import LINEAR
from tests.kubernetes.test_images import Pod, builder, podman  # noqa: F401 - builder is a fixture
from tests.kubernetes.test_services_pod import CHECKED, ONE_STEWARD, SELF_REPORTED_ALLOWED
from tests.kubernetes.test_values import get_config
from tests.relay.conftest import SITE, make_authority

pytestmark = pytest.mark.e2e

STATE = "/var/lib/paitient"
USER_UID = 20001  # a user's uid as the profile gives it: uid_min + the hub's id
SERVICES_GID = 60090  # the workspace's group in the services image, and the gateway's uid
ACCOUNTS = '\n[jobs]\naccount = "paitient-jobs"\n\n[airlock]\naudit_account = "paitient-audit"\n'

CLIENT = """
import http.client, json, os, socket, ssl, subprocess, sys, time
from pathlib import Path
from paitient import channel

tmp = Path("/tmp")
for d in ("home", "data", "sockets"):
    (tmp / d).mkdir(mode=0o700)
relay = subprocess.Popen(
    [sys.executable, "-I", "-m", "paitient.services.relay", "--run-dir=/tmp/sockets/services",
     "--home=/tmp/home", "--data-root=/tmp/data", "--token-file=%(token)s",
     "--gateway=127.0.0.1:%(gateway)d", "--report-seconds=0.3", "--egress-socket=/tmp/sockets/egress.sock",
     "--gateway-ca=%(ca)s/ca.crt"],
    stdout=open("/tmp/relay.log", "wb"), stderr=subprocess.STDOUT)
sock = "/tmp/sockets/services/ledger.sock"
deadline = time.monotonic() + 60
while not Path(sock).exists():
    assert relay.poll() is None and time.monotonic() < deadline, open("/tmp/relay.log").read()
    time.sleep(0.2)
answer = {"budget": channel.call(sock, "budget", {"project": "oncology"}, timeout=60)}

def gateway(token):
    tls = ssl.create_default_context(cafile="%(ca)s/ca.crt")
    with socket.create_connection(("127.0.0.1", %(gateway)d), timeout=30) as raw:
        with tls.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            s.sendall(json.dumps({"token": token, "stream": "egress"}).encode() + b"\\n")
            return json.loads(s.makefile("rb").readline())

answer["stream"] = gateway(open("%(token)s").read().strip())
answer["forged"] = gateway("not-a-token")
pages = http.client.HTTPConnection("127.0.0.1", %(ledger)d, timeout=30)
pages.request("GET", "/services/ledger/")
reply = pages.getresponse()
answer["pages"] = [reply.status, reply.getheader("Location")]

# a model submitted as the kernel submits it, through the relay
os.environ.update(HOME="/tmp/home", PAITIENT_RUN_DIR="/tmp/sockets/services")
from torch import nn
from paitient.kernel.jobs import submit
job = submit(nn.Sequential(nn.Linear(30, 2)), dataset="breast_cancer", target="target", epochs=2, batch_size=64,
             max_grad_norm=1.0, target_epsilon=1.0, lr=0.5)
job.wait(timeout=300, widget=False, poll=0.5)
answer["job"] = {"id": job.id, "state": job.state, "reason": job.reason,
                 "record": job.record if job.state == "done" else None}

# its weights asked for, and weights trained in the kernel: the airlock's checks, read back the same way
from paitient import airlock
from safetensors.torch import save_file
%(checked)s
if job.state == "done":
    answer["certified"] = checked(airlock.request(job, justification="for the paper"))
# weights of LINEAR's shape, on the features the runner trained on (its record names them)
save_file({f"lin.{k}": v for k, v in nn.Linear(30, 2).state_dict().items()}, "/tmp/model.safetensors")
answer["self_reported"] = checked(airlock.request(
    "/tmp/model.safetensors", kind="weights", confirm=True, justification="for the paper",
    model_source=%(linear)s, target="target", features=answer["job"]["record"]["record"]["features"],
    split={"holdout": 0.3, "seed": 0}, dataset="breast_cancer"))
relay.terminate()
relay.wait(timeout=30)
print(json.dumps(answer))
"""


def manifest(services: ServicesPod, client: dict[str, Any]) -> dict[str, Any]:
    """The hub's pod as the chart makes it from the values: the pod's security context, the generated
    volumes, init containers and containers; and the user's side (``client``) with two volumes of its own."""
    volumes = [
        *services.volumes(),
        {"name": "pod-token", "secret": {"secretName": "pod-token", "defaultMode": 0o440}},
        {"name": "gateway-ca", "configMap": {"name": "gateway-ca", "defaultMode": 0o444}},
        {"name": "client-tmp", "emptyDir": {}},
    ]
    spec = {
        "securityContext": get_config("hub.podSecurityContext"),
        "volumes": volumes,
        "initContainers": services.init_containers(),
        "containers": [*services.containers(), client],
    }
    return {"metadata": {"name": "paitient-hub"}, "spec": spec}


def client_container() -> dict[str, Any]:
    return {
        "name": "user-side",
        "image": image_tag("singleuser"),
        "command": ["python", "-I", "-c"],
        "args": [
            CLIENT
            % {
                "gateway": GATEWAY_PORT,
                "ledger": SERVICE_PORTS["ledger"],
                "token": TOKEN_FILE,
                "ca": GATEWAY_CA_FOLDER,
                "linear": json.dumps(LINEAR),
                "checked": CHECKED,
            }
        ],
        "securityContext": {
            "runAsUser": USER_UID,
            "runAsGroup": USER_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            # where the profile's kernels container mounts them
            {"name": "pod-token", "mountPath": str(Path(TOKEN_FILE).parent), "readOnly": True},
            {"name": "gateway-ca", "mountPath": GATEWAY_CA_FOLDER, "readOnly": True},
            {"name": "client-tmp", "mountPath": "/tmp"},
        ],
    }


def logs_of(b: Any, container: str) -> str:
    r = podman(b, "logs", container, check=False)
    return (r.stdout + r.stderr)[-2000:]


def status_of(b: Any, container: str) -> dict[str, str]:
    """The container's first process's ``/proc/PID/status`` fields, read from the host."""
    pid = podman(b, "container", "inspect", "--format", "{{.State.Pid}}", container).stdout.strip()
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)}


def test_the_services_run_from_their_image_as_the_values_say_and_a_users_job_and_requests_go_through_them(
    builder,  # noqa: F811 - the fixture
    tmp_path,
):
    services = ServicesPod(
        image=image_tag("services"),
        state_dir=STATE,
        data_root=f"{STATE}/data",
        gateway_uid=SERVICES_GID,
        projects=("oncology",),
    )
    # weights trained in a kernel are refused unless the project allows them, with two stewards' approval
    site = SITE.format(state=STATE, gateway_uid=SERVICES_GID)
    site_text = site.replace(ONE_STEWARD, SELF_REPORTED_ALLOWED, 1) + ACCOUNTS
    assert SELF_REPORTED_ALLOWED in site_text
    authority, cert, key = make_authority(tmp_path / "ca", "paitient test gateway authority")
    tokens = {name: secrets.token_hex(16) for name in SERVICE_PORTS}
    files = {
        "paitient-site": {"site.toml": site_text},
        "paitient-directory": {},
        "paitient-database": {},
        "paitient-service-tokens": tokens,
        "paitient-gateway-tls-source": {"tls.crt": cert.read_text(), "tls.key": key.read_text()},
        "gateway-ca": {"ca.crt": authority.read_text()},
        "pod-token": {},  # written once the hub's side has minted it, below
    }
    owners = {"paitient-state": (0, 0, 0o755), "data-oncology": (0, 0, 0o750)}
    rendered = manifest(services, client_container())
    pod = Pod(builder, rendered, tmp_path, files, owners)
    names = [c["name"] for c in services.containers()]
    try:
        pod.setup()
        # what the hub does on the claim before a user's pod starts: the member in the registry, the pod's
        # token minted into the token file, given to the gateway's group
        state = pod.volume("paitient-state")
        alice = Member("alice", "alice", USER_UID, ("oncology",), ("researcher",))
        rootmember.put(Registry.for_state_dir(state), alice)
        token, _ = podtokens.mint(podtokens.token_file(state), "alice", USER_UID, group=SERVICES_GID)
        token_file = Path(pod.volumes["pod-token"]) / "token"
        token_file.write_text(token)
        # as a user's pod has its Secret: root's and the pod's fsGroup's (the user's gid), 0440
        token_file.chmod(0o440)
        os.chown(token_file, 0, USER_UID)
        # a dataset ingested on a host into the claims: its catalogue in the state, its files in the
        # project's data claim
        here_file = tmp_path / "site-host.toml"
        here_file.write_text(SITE.format(state=state, gateway_uid=SERVICES_GID))
        here = load(here_file)
        publish_demo(here)
        data = pod.volume(data_volume_name("oncology"))
        for item in (here.data_root / "oncology").iterdir():
            subprocess.run(["cp", "-a", str(item), str(data)], check=True)

        (init,) = rendered["spec"]["initContainers"]
        pod.run(init, detach=False)
        for c in services.containers():
            pod.run(c, detach=True)
        # each service is up once its socket is in the state claim (the same files as the host's site names)
        sockets = {n: here.run_dir / f"{n}.sock" for n in SERVICE_PORTS}
        sockets["egress"] = egress_socket(here)
        deadline = time.monotonic() + 120
        while not all(s.is_socket() for s in sockets.values()):
            for n in names:
                running = podman(builder, "container", "inspect", "--format", "{{.State.Running}}", f"{pod.name}-{n}")
                assert running.stdout.strip() == "true", (n, logs_of(builder, f"{pod.name}-{n}"))
            assert time.monotonic() < deadline, {n: s.exists() for n, s in sockets.items()}
            time.sleep(0.5)

        seen = {n: status_of(builder, f"{pod.name}-{n}") for n in names}
        out = pod.run(rendered["spec"]["containers"][-1], detach=False)
        answer = json.loads(out.strip().splitlines()[-1])
        public_key = keys.load_public_key(keys.public_key_path(here))
        audit_left = sorted(p.name for p in (state / "airlock-audit").iterdir())
        store = JobStore(state)
        try:
            weights = {answer["job"]["id"]: store.released(answer["job"]["id"])[0]} if answer.get("job") else {}
        finally:
            store.close()
    finally:
        logs = {n: logs_of(builder, f"{pod.name}-{n}") for n in names}
        pod.remove()
    # each container as its context says: root with only the workers' capabilities (airlock, jobs) or none,
    # the gateway as its own uid with none; none may gain privileges
    for name, fields in seen.items():
        ctx = next(c for c in services.containers() if c["name"] == name)["securityContext"]
        uids = fields["Uid"].split()
        assert set(uids) == {str(ctx["runAsUser"])}, (name, uids)
        assert str(SERVICES_GID) in fields["Groups"].split(), (name, fields["Groups"])  # supplementalGroups
        wanted = set(ctx["capabilities"].get("add") or [])
        assert capabilities(fields["CapEff"]) == wanted and capabilities(fields["CapBnd"]) == wanted, name
        assert fields["NoNewPrivs"] == "1", name
    assert set(seen) == {*SERVICE_PORTS, GATEWAY}
    # the user's side: the relay, with the minted token, reaches the ledger through the gateway and is
    # answered as the registry's member; a token the hub did not mint is refused; the pages send a
    # browser to the hub's sign-in
    budget = answer["budget"]
    assert budget["user"] == "alice" and list(budget["projects"]) == ["oncology"], (answer, logs)
    assert answer["stream"].get("ok") is not None, answer
    assert answer["forged"].get("code") == "forbidden", answer
    status, location = answer["pages"]
    assert status == 302 and "/hub/api/oauth2/authorize" in location, answer
    # the model trained in the jobs container, in bubblewrap as the image's runner account, and the record
    # it signed verifies with the workspace's public key over the weights it released
    done = answer["job"]
    assert done["state"] == "done", (done, logs["jobs"])
    record = training_record.verify(done["record"], public_key, weights[done["id"]])
    assert record["epsilon"] <= 1.0 + 1e-6 and record["dataset"] == "breast_cancer"
    # the airlock container took the job's weights and record from the runner and verified the signature
    certified = answer["certified"]
    checks = {c["check"]: c for c in certified["checks"]}
    assert certified["state"] == "in_review" and checks["training_record"]["status"] == "pass", certified
    # weights from the kernel: the airlock container ran the membership-inference audit in bubblewrap as
    # the image's audit account over the dataset's 569 rows; no runner signed them
    reported = answer["self_reported"]
    checks = {c["check"]: c for c in reported["checks"]}
    assert reported["state"] == "in_review", (reported, logs["airlock"])
    mia = checks["membership_inference"]
    assert mia["status"] == "pass" and "the airlock's audit of the model's outputs" in mia["reason"], mia
    assert (mia["details"]["members"], mia["details"]["nonmembers"]) == (398, 171)  # 30 % held out
    assert checks["training_record"]["status"] == "fail"
    assert audit_left == []  # the audit's scratch folder taken back from its account and emptied


CAPABILITY_BITS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "FOWNER": 3, "KILL": 5, "SETGID": 6, "SETUID": 7}


def capabilities(mask: str) -> set[str]:
    """The names of the capabilities a ``/proc`` status mask holds; one this test does not name fails it."""
    bits = int(mask, 16)
    named = {name for name, bit in CAPABILITY_BITS.items() if bits >> bit & 1}
    others = bits & ~sum(1 << bit for bit in CAPABILITY_BITS.values())
    assert not others, f"capabilities this test does not name: {others:#x}"
    return named
