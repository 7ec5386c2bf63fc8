"""deploy/podman/up.py's pure parts: the start order and the fixed addresses and hosts
entries that replace DNS on the project's network (no podman needed)."""

from __future__ import annotations

import importlib.util
import ipaddress
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def load_up() -> ModuleType:
    """deploy/podman/up.py (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("podman_up", REPO / "deploy/podman/up.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


up = load_up()
SERVICES = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]


def test_networked_services_leave_out_the_no_network_containers() -> None:
    names = up.networked_services(SERVICES, "all")
    assert "rabbitmq" in names and "company-a-uploader" in names
    assert "company-a-trainer" not in names and "company-b-initial-model" not in names
    assert names == sorted(names)


def test_networked_services_follow_the_profile() -> None:
    names = up.networked_services(SERVICES, "company-a")
    assert names == ["company-a-uploader"]


def test_every_service_keeps_its_address_whatever_is_started() -> None:
    """The hub and the gateways are started by two calls: both must agree."""
    names = up.networked_services(SERVICES, "all")
    first = up.fixed_addresses("10.89.7.0/24", names)
    assert first == up.fixed_addresses("10.89.7.0/24", names)
    assert len(set(first.values())) == len(names)
    subnet = ipaddress.ip_network("10.89.7.0/24")
    for address in first.values():
        assert ipaddress.ip_address(address) in subnet
        assert int(ipaddress.ip_address(address)) - int(subnet.network_address) >= up.FIRST_HOST


def test_a_subnet_too_small_is_refused() -> None:
    with pytest.raises(up.StartError):
        up.fixed_addresses("10.89.7.0/29", ["a", "b", "c"])


def test_create_args_name_every_running_service_but_itself() -> None:
    addresses = {"aggregator": "10.0.0.10", "jaeger": "10.0.0.11", "rabbitmq": "10.0.0.12"}
    args = up.create_args("aggregator", addresses, without={"jaeger"})
    assert args == ["--ip", "10.0.0.10", "--add-host", "rabbitmq:10.0.0.12"]


def test_start_order_puts_dependencies_first() -> None:
    order = up.start_order(SERVICES, ["barrier"], {"jaeger", "prometheus"})
    assert order.index("broker-definitions") < order.index("rabbitmq")
    assert order.index("rabbitmq") < order.index("aggregator") < order.index("barrier")
    assert "jaeger" not in order
