"""The profile's NetworkPolicies and Service: users' pods reach the hub's API and the services' gateway in the
hub's pod, nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from traitlets.config import Config

from paitient.hub.kubernetes import (
    GATEWAY_PORT,
    HUB_API_PORT,
    NOTEBOOK_PORT,
    SERVICE_PORTS,
    configure_kubernetes,
    manifests_yaml,
    network_policies,
    service_manifest,
)

COMMITTED = Path(__file__).resolve().parents[2] / "hub_config" / "kubernetes" / "networkpolicies.yaml"


def by_name() -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p["spec"] for p in network_policies()}


def components(peers: list[dict[str, Any]]) -> list[str]:
    return sorted(p["podSelector"]["matchLabels"]["component"] for p in peers if "podSelector" in p)


def test_the_committed_policies_are_the_profiles():
    assert COMMITTED.read_text() == manifests_yaml(), (
        "hub_config/kubernetes/networkpolicies.yaml is stale; run: "
        "python -m paitient.hub.kubernetes > hub_config/kubernetes/networkpolicies.yaml"
    )
    assert list(yaml.safe_load_all(COMMITTED.read_text())) == [*network_policies(), service_manifest()]


def test_users_pods_reach_the_hubs_api_the_services_and_the_clusters_dns_only():
    spec = by_name()["paitient-singleuser"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    rules = spec["egress"]
    # every rule names its destinations and its ports: a rule without either would allow every one
    for rule in rules:
        assert rule.get("to") and rule.get("ports"), rule
        assert not [peer for peer in rule["to"] if "ipBlock" in peer], rule
    allowed = {
        (tuple(components(r["to"])), tuple(sorted((p["port"], p["protocol"]) for p in r["ports"]))) for r in rules
    }
    assert allowed == {
        # the hub's API and the gateway in the hub's pod, not the services' pages there
        (("hub",), ((HUB_API_PORT, "TCP"), (GATEWAY_PORT, "TCP"))),
        ((), ((53, "TCP"), (53, "UDP"))),
    }
    (dns,) = [r for r in rules if not components(r["to"])]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]


def test_without_dns_only_the_hubs_pod_remains():
    spec = network_policies(dns=False)[0]["spec"]
    assert [components(r["to"]) for r in spec["egress"]] == [["hub"]]


def test_only_the_proxy_and_the_hub_reach_a_users_server():
    (rule,) = by_name()["paitient-singleuser"]["ingress"]
    assert components(rule["from"]) == ["hub", "proxy"]
    assert rule["ports"] == [{"port": NOTEBOOK_PORT, "protocol": "TCP"}]


def test_the_hubs_pod_lets_the_proxy_and_hub_reach_the_pages_and_users_pods_the_gateway():
    spec = by_name()["paitient-services"]
    assert spec["podSelector"]["matchLabels"]["component"] == "hub"  # the services are containers of the hub's pod
    # ingress only: the pod's egress is the chart's policy for the hub, which this one must not widen
    assert spec["policyTypes"] == ["Ingress"] and "egress" not in spec
    hub, users = spec["ingress"]
    assert components(hub["from"]) == ["hub", "proxy"]  # the pages, routed by the proxy
    assert sorted(p["port"] for p in hub["ports"]) == sorted(SERVICE_PORTS.values())
    assert components(users["from"]) == ["singleuser-server"]
    assert users["ports"] == [{"port": GATEWAY_PORT, "protocol": "TCP"}]


def test_the_services_host_is_the_hubs_pod_on_the_gateways_and_pages_ports():
    """The Service the relays call (``paitient-services``, the name the gateway's certificate carries) selects
    the pod the policy opens, on exactly the ports the policy opens there."""
    service = service_manifest()
    assert service["metadata"]["name"] == "paitient-services"
    assert service["spec"]["selector"] == by_name()["paitient-services"]["podSelector"]["matchLabels"]
    assert service["spec"]["type"] == "ClusterIP"  # not reachable from outside the cluster
    ports = {p["port"]: p["targetPort"] for p in service["spec"]["ports"]}
    assert ports == {p: p for p in (GATEWAY_PORT, *SERVICE_PORTS.values())}


async def test_the_policy_selects_the_pods_the_spawner_makes(site, make_user, render):
    """A policy whose selector missed the users' pods would leave them open: the labels must match."""
    c = Config()
    configure_kubernetes(c, site, image="paitient-singleuser:0.1.0", kernels_cmd=["paitient-kernels"])
    pod = await render(make_user("alice", ("oncology",)), c)
    labels = pod["metadata"]["labels"]
    selector = by_name()["paitient-singleuser"]["podSelector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert selector["component"] == "singleuser-server"
    assert pod["spec"]["containers"][0]["ports"][0]["containerPort"] == NOTEBOOK_PORT
