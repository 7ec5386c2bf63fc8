# Every target does its own set-up on a fresh Debian/Ubuntu machine: a virtual
# environment with the CPU build of torch (installed first, pinned, so nothing pulls a
# CUDA build), the project, and Debian's rabbitmq-server for the private local broker.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.foldfed-installed
# Extras, each installed only by the targets that use it: the demo needs neither.
STAMP_OF3 := $(VENV)/.foldfed-of3
STAMP_DEV := $(VENV)/.foldfed-dev

.PHONY: fuzz test-long test-containers test-kube setup chromium chromium-for-tests containers-prereqs image demo demo-of3 of3-sample loadtest test lint proto settings-doc broker-start broker-stop clean bench

setup: $(STAMP)
	@$(PY) -c "from foldfed.localbroker import ensure_rabbitmq_installed as e; e()"

# Debian's headless chromium, for the tests only: the monitor dashboard's test drives a real
# browser. Not part of `setup`, so `make demo` installs nothing the demo does not use.
chromium-for-tests:
	@command -v chromium >/dev/null || $(MAKE) --no-print-directory chromium

chromium:
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium

# podman and what its images need (deploy/README.md, "Containers"): runc (crun refuses this
# host's cgroups), debootstrap (the base image: no registry is reachable), catatonit
# (compose's `init: true`). The two host settings are in deploy/podman/containers.conf.
containers-prereqs:
	@command -v podman >/dev/null && command -v runc >/dev/null && \
		command -v debootstrap >/dev/null && command -v catatonit >/dev/null || \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
			podman runc debootstrap catatonit)

# The container images (podman, on a debootstrap base; reused when their inputs are
# unchanged): foldfed:<version> (hub, slim), foldfed:<version>-of3 (participant, OpenFold3),
# foldfed-broker:<version>. Prints their names and sizes. IMAGES=slim builds one.
IMAGES ?= all
image: $(STAMP) containers-prereqs
	$(PY) deploy/podman/images.py build $(IMAGES)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e .
	touch $@

# OpenFold3 and its featurization stack (~1.9 GB): the OpenFold3 demo, sample and tests.
$(STAMP_OF3): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[of3]'
	touch $@

# Test, lint and deployment-check tools.
$(STAMP_DEV): $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/foldfed demo

# OpenFold3 (tiny) on the real plinder sample; prepares var/of3-sample on first use.
# OpenFold3 (tiny preset) on the real sample, 3 global steps; ends with the federated
# evaluation table (every other release and the final one against θ₀ on each company's
# held-out set: docs/federated_evaluation.md) and writes evaluation.png beside the report.
demo-of3: setup $(STAMP_OF3)
	$(VENV)/bin/foldfed demo --model openfold3-tiny --steps 3

# Every load-test scenario against the real services (under 25 min); reports in var/loadtest/.
loadtest: setup
	$(VENV)/bin/foldfed loadtest all

of3-sample: setup $(STAMP_OF3)
	$(VENV)/bin/foldfed data sample --out var/of3-sample --companies 3

# Everything but the podman tests, then the compose federation in containers
# (tests/test_containers.py: builds or reuses the slim and broker images). `podman play
# kube` (tests/test_kube_play.py) stays out: `make test-kube`.
test: setup $(STAMP_DEV) $(STAMP_OF3) chromium-for-tests containers-prereqs
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/pytest -q -m 'not containers and not long'
	$(VENV)/bin/pytest -q -m containers tests/test_containers.py

lint: setup $(STAMP_DEV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The long fuzzing campaign: tests/test_fuzz_*.py (the decoders) and
# tests/test_hostile_services.py (hostile messages against the running hub services, over
# 10,000 at scale 20) with each test's example count times FUZZ_SCALE (make test runs them
# at scale 1). Ends with `RESULT fuzz_inputs=...` (stderr);
# FOLDFED_FUZZ_SEED=N draws another fixed sequence than the derandomized default.
FUZZ_SCALE ?= 20
fuzz: setup $(STAMP_DEV)
	FOLDFED_FUZZ_SCALE=$(FUZZ_SCALE) $(VENV)/bin/pytest -q -p no:cacheprovider \
		tests/test_fuzz_*.py tests/test_hostile_services.py

# Regenerate services/foldfed/v1 from proto/ with the pinned generator (grpcio-tools in
# the dev extra); tests/test_contract.py fails when the committed code drifts.
proto: $(STAMP_DEV)
	$(PY) -m grpc_tools.protoc -I proto --python_out=services --pyi_out=services \
		proto/foldfed/v1/*.proto

# README's table of variables, rewritten from the settings registry (services/foldfed/
# settings/registry.py); tests/test_settings_readme.py fails when README drifts from it.
settings-doc: $(STAMP)
	$(PY) -m foldfed.settings --write README.md

broker-start: setup
	$(VENV)/bin/foldfed broker start

broker-stop: $(STAMP)
	$(VENV)/bin/foldfed broker stop

bench: setup
	$(PY) bench/transfer.py --size-mib 1024

clean:
	rm -rf $(VENV) var build *.egg-info

# The container images and a compose federation in podman (tests/test_containers.py), the
# last step of `make test`, alone.
# The long scenarios make test leaves out (pytest marker `long`): the federation on a 3-node
# cluster and a node killed mid-upload, the hostile member's full run against live services.
test-long: setup $(STAMP_DEV)
	$(VENV)/bin/pytest -q -m long

test-containers: setup $(STAMP_DEV) containers-prereqs
	$(VENV)/bin/pytest -q -m containers tests/test_containers.py

# The rendered kustomize overlays (hub, company-a, company-b) under `podman play kube`
# through a 2-step cycle (deploy/podman/kube.py; deploy/README.md, "Containers").
test-kube: setup $(STAMP_DEV) containers-prereqs
	$(VENV)/bin/pytest -q -m containers tests/test_kube_play.py
