"""The profile's NetworkPolicies: users' pods reach the hub's API and the services, nothing else."""

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
    network_policies,
    network_policies_yaml,
)

COMMITTED = Path(__file__).resolve().parents[2] / "hub_config" / "kubernetes" / "networkpolicies.yaml"


def by_name() -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p["spec"] for p in network_policies()}


def components(peers: list[dict[str, Any]]) -> list[str]:
    return sorted(p["podSelector"]["matchLabels"]["component"] for p in peers if "podSelector" in p)


def test_the_committed_policies_are_the_profiles():
    assert COMMITTED.read_text() == network_policies_yaml(), (
        "hub_config/kubernetes/networkpolicies.yaml is stale; run: "
        "python -m paitient.hub.kubernetes > hub_config/kubernetes/networkpolicies.yaml"
    )
    assert list(yaml.safe_load_all(COMMITTED.read_text())) == network_policies()


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
        (("hub",), ((HUB_API_PORT, "TCP"),)),
        (("paitient-services",), ((GATEWAY_PORT, "TCP"),)),  # the gateway only, not the services' own ports
        ((), ((53, "TCP"), (53, "UDP"))),
    }
    (dns,) = [r for r in rules if not components(r["to"])]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]


def test_without_dns_only_the_hub_and_the_services_remain():
    spec = network_policies(dns=False)[0]["spec"]
    assert [components(r["to"]) for r in spec["egress"]] == [["hub"], ["paitient-services"]]


def test_only_the_proxy_and_the_hub_reach_a_users_server():
    (rule,) = by_name()["paitient-singleuser"]["ingress"]
    assert components(rule["from"]) == ["hub", "proxy"]
    assert rule["ports"] == [{"port": NOTEBOOK_PORT, "protocol": "TCP"}]


def test_the_services_pod_answers_the_proxy_and_hub_and_users_pods_gateway_and_calls_only_the_hub():
    spec = by_name()["paitient-services"]
    hub, users = spec["ingress"]
    assert components(hub["from"]) == ["hub", "proxy"]  # the pages, routed by the proxy
    assert sorted(p["port"] for p in hub["ports"]) == sorted(SERVICE_PORTS.values())
    assert components(users["from"]) == ["singleuser-server"]
    assert users["ports"] == [{"port": GATEWAY_PORT, "protocol": "TCP"}]
    (egress,) = spec["egress"]
    assert components(egress["to"]) == ["hub"]
    assert egress["ports"] == [{"port": HUB_API_PORT, "protocol": "TCP"}]


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
