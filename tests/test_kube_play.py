"""`podman play kube` on the rendered kustomize output (deploy/podman/kube.py): how the
rendered objects are adapted to podman 4.3 (fast, no podman), and, marked `containers`,
a whole 2-step cycle of the hub overlay and both company overlays in podman that ends
with the same final model at the hub and at each gateway, leaving nothing behind.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


def load(name: str) -> ModuleType:
    """deploy/podman/<name>.py (scripts, not a package: they run outside the project)."""
    spec = importlib.util.spec_from_file_location(
        f"podman_{name}", REPO / "deploy" / "podman" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


kube = load("kube")

IMAGES = {"registry.example.org/foldfed": "localhost/foldfed:t", "rabbitmq": "localhost/b:t"}
HOW = kube.Adaptation("r1-hub-", IMAGES, {"localhost/b:t": (101, 103)})


def has_renderer() -> bool:
    try:
        kube.renderer()
    except kube.PlayError:
        return False
    return True


needs_kustomize = pytest.mark.skipif(not has_renderer(), reason="no kubectl nor kustomize")


@pytest.fixture(scope="module")
def hub() -> list[dict[str, Any]]:
    return list(kube.render("hub"))


def pods(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objects
        if o["kind"] == "Deployment"
    }


@needs_kustomize
def test_what_podman_does_not_run_is_listed_and_left_out(hub: list[dict[str, Any]]) -> None:
    assert kube.skipped(hub) == [
        "Service/foldfed-monitor",
        "Service/foldfed-rabbitmq",
        "Service/foldfed-rabbitmq-public",
        "NetworkPolicy/foldfed-rabbitmq",
    ]
    kinds = {o["kind"] for o in kube.for_podman(hub, HOW)}
    assert kinds == {"ConfigMap", "PersistentVolumeClaim", "Deployment"}


@needs_kustomize
def test_statefulset_is_a_deployment_with_its_claim(hub: list[dict[str, Any]]) -> None:
    played = kube.for_podman(hub, HOW)
    broker = pods(played)["r1-hub-foldfed-rabbitmq"]
    claims = {o["metadata"]["name"] for o in played if o["kind"] == "PersistentVolumeClaim"}
    assert "r1-hub-data-foldfed-rabbitmq-0" in claims  # Kubernetes' name, prefixed
    data = [v for v in broker["volumes"] if v.get("persistentVolumeClaim")]
    assert data == [
        {
            "name": "data",
            "persistentVolumeClaim": {"claimName": "r1-hub-data-foldfed-rabbitmq-0"},
        }
    ]
    # The local broker image's user, not the official image's 999.
    assert broker["securityContext"]["runAsUser"] == 101
    assert broker["securityContext"]["fsGroup"] == 103


@needs_kustomize
def test_every_pod_is_adapted_to_podman_4_3(hub: list[dict[str, Any]]) -> None:
    played = kube.for_podman(hub, HOW)
    names = {o["metadata"]["name"] for o in played}
    assert all(n.startswith("r1-hub-") for n in names)
    assert all("namespace" not in o["metadata"] for o in played)
    empty_dirs: list[str] = []
    for pod in pods(played).values():
        assert pod["restartPolicy"] == "OnFailure"
        volumes = {v["name"]: v for v in pod["volumes"]}
        empty_dirs += [v for v in volumes if "emptyDir" in volumes[v]]
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["image"] in IMAGES.values()
            assert "ports" not in container
            for probe in kube.PROBE_PORT_NAMES:
                get = container.get(probe, {}).get("httpGet")
                assert get is None or get["port"] == 8081
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes and "subPath" not in mount
            for ref in [e["configMapRef"]["name"] for e in container.get("envFrom", [])]:
                assert ref in names
        for volume in volumes.values():
            if "secret" in volume:
                assert volume["secret"]["secretName"].startswith("r1-hub-")
                assert volume["secret"]["secretName"].endswith(".volume")
                assert volume["secret"]["optional"] is False
    # podman 4.3 names an emptyDir's volume after it: each pod's own.
    assert len(empty_dirs) == len(set(empty_dirs)) > 0
    rabbitmq = pods(played)["r1-hub-foldfed-rabbitmq"]["containers"][0]
    conf = [m for m in rabbitmq["volumeMounts"] if m["name"] == "config"]
    assert conf[0]["mountPath"] == "/etc/rabbitmq/conf.d"


def test_the_rendered_objects_are_left_unchanged() -> None:
    objects = [
        {"kind": "ConfigMap", "metadata": {"name": "c", "namespace": "n"}, "data": {}},
        {"kind": "Service", "metadata": {"name": "s"}},
    ]
    before = json.dumps(objects)
    assert kube.for_podman(objects, HOW) == [
        {"kind": "ConfigMap", "metadata": {"name": "r1-hub-c"}, "data": {}}
    ]
    assert json.dumps(objects) == before


def test_an_image_without_a_local_one_is_refused() -> None:
    with pytest.raises(kube.PlayError, match="no local image"):
        kube.local_image("quay.io/other:1", IMAGES)
    assert kube.local_image("rabbitmq:3.13-management", IMAGES) == "localhost/b:t"


def test_secrets_in_podman_4_3s_two_formats() -> None:
    data = {"url": b"amqps://u:p@h:5671/"}
    assert json.loads(kube.env_secret(data)) == {"url": base64.b64encode(data["url"]).decode()}
    body = json.loads(kube.volume_secret("n", data))
    assert body["kind"] == "Secret" and body["data"] == {"url": "amqps://u:p@h:5671/"}


def test_a_subpath_mount_that_is_not_its_file_name_is_refused() -> None:
    with pytest.raises(kube.PlayError, match="not adaptable"):
        kube.whole_volume({"mountPath": "/etc/x/a.conf", "subPath": "b.conf"})


# ---------------------------------------------------------------- in podman


def run_names(run: str) -> list[str]:
    env = {"CONTAINERS_CONF": str(kube.CONTAINERS_CONF), "PATH": "/usr/bin:/bin"}
    found: list[str] = []
    for what in (["pod", "ls"], ["ps", "-a"], ["volume", "ls"], ["secret", "ls"]):
        out = subprocess.run(
            ["podman", *what, "--format", "{{.Names}}" if what[0] == "ps" else "{{.Name}}"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        found += [n for n in out if n.startswith(run)]
    return found


@pytest.mark.slow
@pytest.mark.containers
@pytest.mark.timeout(1800)
def test_rendered_overlays_complete_a_cycle_in_podman() -> None:
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed: run `make containers-prereqs`")
    companies = ["company-a", "company-b"]
    with kube.federation(companies, timeout_s=300) as fed:
        run = fed.run
        hub, gateways = fed.final_models(kube.hub_steps(), timeout_s=300)
        assert gateways == {c: hub for c in companies}
        assert fed.skipped["hub"] and all(
            s == ["NetworkPolicy/foldfed-gateway"] for c, s in fed.skipped.items() if c != "hub"
        )
    assert run_names(run) == []  # pods, containers, volumes, secrets: all removed
