"""The settings registry: every variable declared once, bad values named, the defaults the
code had before the registry, environments built back from typed values."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from foldfed import settings
from foldfed.config import (
    AggregatorSettings,
    BarrierSettings,
    BusSettings,
    IngestSettings,
    ServerOptimizerSettings,
    UploaderSettings,
)
from foldfed.errors import ConfigError
from foldfed.settings.registry import ROLES, Settings

REPO = Path(__file__).resolve().parents[1]
# FOLDFED_ words in the repository that are not variables foldfed reads.
NOT_SETTINGS = {
    "FOLDFED_CLI": "a constant of the benchmarks (the command line they start)",
    "FOLDFED_IMAGE": "compose's own interpolation: which image to run",
    "FOLDFED_FUZZ_SCALE": "the fuzz tests' example multiplier (make fuzz), not a service's",
    "FOLDFED_FUZZ_SEED": "the fuzz tests' seed, not a service's",
    "FOLDFED_FUZZ_REPORT": "the fuzz tests' summary switch, not a service's",
    "FOLDFED_MONITOR_STRAGGLER_WINDOW": "README's old name of FOLDFED_MONITOR_WINDOW, never read",
}
FIELDS = Settings.model_fields


def spelled_names() -> dict[str, set[str]]:
    """Every FOLDFED_* name in tracked files (not README's generated table, not `X_*`
    wildcards), with the files that spell it."""
    files = subprocess.run(
        ["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    names: dict[str, set[str]] = {}
    for name in files:
        if name == "README.md" or name.startswith("services/foldfed/v1/"):
            continue
        try:
            text = (REPO / name).read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for word in re.findall(r"FOLDFED_[A-Z0-9_]*[A-Z0-9](?![A-Za-z0-9_])", text):
            names.setdefault(word, set()).add(name)
    return names


def test_every_variable_in_the_repository_is_declared() -> None:
    declared = {settings.variable(f) for f in FIELDS}
    undeclared = {n: sorted(files) for n, files in spelled_names().items() if n not in declared}
    assert set(undeclared) <= set(NOT_SETTINGS), undeclared
    assert not declared & set(NOT_SETTINGS)


def test_each_variable_is_declared_once_with_its_doc_and_roles() -> None:
    names = [settings.variable(f) for f in FIELDS]
    assert len(names) == len(set(names))
    for field, info in FIELDS.items():
        name = settings.variable(field)
        if name.startswith("FOLDFED_"):
            assert name == f"FOLDFED_{field.upper()}"
        assert info.description and "|" not in info.description, name
        extra = info.json_schema_extra
        assert isinstance(extra, dict) and extra["roles"], name
        assert set(extra["roles"]) <= set(ROLES), name  # type: ignore[arg-type]


def test_defaults_are_those_the_code_used_before_the_registry() -> None:
    s = settings.load({})
    before = {
        "amqp_url": None,
        "participants": None,
        "participant": None,
        "participant_index": None,
        "state_dir": Path("var/hub"),
        "spool_dir": None,
        "initial_model": None,
        "steps": 5,
        "first_step": 1,
        "cycle": 1,
        "chunk_size": 4 << 20,
        "rate_limit_bps": 0,
        "download_rate_limit_bps": 0,
        "inflight_window": 8,
        "publish_timeout_s": 30.0,
        "reply_timeout_s": 30.0,
        "receipt_timeout_s": 120.0,
        "poll_s": 0.2,
        "uploader_extra_delay_s": 0.0,
        "prefetch": 8,
        "ingest_batch": 0,
        "max_payload_bytes": 8 << 30,
        "require_sender_identity": True,
        "server_optimizer": "fedavg",
        "server_lr": None,
        "server_momentum": 0.9,
        "model": "mlp",
        "local_steps": 10,
        "grad_accum": 8,
        "micro_batch": 32,
        "lr": 1e-3,
        "optimizer": "adamw",
        "seed": 0,
        "samples": 2048,
        "of3_sample": None,
        "of3_company": None,
        "of3_finetune": "all",
        "of3_checkpoint": None,
        "of3_overrides": None,
        "of3_lr": 1.8e-3,
        "of3_warmup": 1000,
        "of3_eval": "heldout",
        "eval_every": 10,
        "eval_local_model": None,
        "ddp_backend": None,
        "cache_dir": None,
        "test_cache": None,
        "monitor_host": "0.0.0.0",
        "monitor_port": 8090,
        "monitor_url": None,
        "monitor_silent_s": 30.0,
        "monitor_straggler_margin": 0.2,
        "monitor_straggler_min_s": 1.0,
        "monitor_window": 5,
        "monitor_straggler_steps": 3,
        "monitor_tick_s": 1.0,
        "monitor_refresh_s": 5,
        "heartbeat_s": 5.0,
        "tracing": True,
        "trace_dir": Path("var/traces"),
        "otlp_endpoint": None,
        "otlp_traces_endpoint": None,
        "health_port": None,
        "health_host": "0.0.0.0",
        "health_cache_s": 5.0,
        "crash_at": None,
        "broker_dir": Path("var/broker"),
        "broker_disk_free_limit": "1GB",
        "localbroker_dir": None,
        "loadtest_dir": Path("var/loadtest"),
        "loadtest_sim": None,
        # Added with the codecs: the defaults are the exact reference.
        "codec": "fp32:v1",
        "downlink_codec": "fp32:v1",
        "codec_seed": 0,
        "codec_choices": (),
        # Added with the per-site codec choice: off.
        "upload_budget_s": 0.0,
        # Added with agreed weights (issue 14): none listed = 4096 for every member.
        "member_weights": (),
        # Added with update bounds (issue 14): no bound, no clip.
        "update_norm_bound": 0.0,
        "update_clip": False,
        "secure_aggregation": False,
        "secagg_ring_bits": 32,
        # Added with retention (docs/retention.md): disk bounded by the policy, not steps.
        "retain_steps": 1,
        "retain_checkpoint_every": 50,
        # Added with progressive finalize (docs/format.md 9.8): on; the bytes are the same.
        "progressive_finalize": True,
        # Added with gated cycles (issue 15): off, so the settings start cycles as before.
        "gated_cycles": False,
        "consortium_keyring": None,
        "gate_window_s": 3600.0,
        "gate_min_members": 2,
        # Added with the blind-split reference hash (issue 15): not checked.
        "split_reference_hash": "",
        # Added with signed manifests and records (issue 14): no keys, nothing signed.
        "signing_key": None,
        "member_keys": None,
        # Added with the local cluster (docs/rabbitmq.md): classic queues, as before.
        "queue_type": "classic",
    }
    assert set(before) == set(FIELDS)
    assert {k: getattr(s, k) for k in before} == before


def test_the_service_settings_keep_their_defaults(tmp_path: Path) -> None:
    theta = tmp_path / "theta.safetensors"
    theta.write_bytes(b"")
    env = {
        "FOLDFED_AMQP_URL": "amqp://hub:pw@localhost:5672/",
        "FOLDFED_PARTICIPANTS": "org-b,org-a",
        "FOLDFED_PARTICIPANT": "org-a",
        "FOLDFED_INITIAL_MODEL": str(theta),
    }
    bus = BusSettings("amqp://hub:pw@localhost:5672/", 30.0, 8)
    assert BusSettings.from_env(env) == bus
    assert UploaderSettings.from_env(env) == UploaderSettings(
        bus, "org-a", Path("var/spool/org-a"), 4 << 20, 0, 30.0, 120.0, 0.2
    )
    # The group commit's batch: the prefetch count unless FOLDFED_INGEST_BATCH says.
    ingest = IngestSettings(bus, ("org-a", "org-b"), Path("var/hub"), 1, 8 << 30, True, 8, 8)
    assert IngestSettings.from_env(env) == ingest
    assert IngestSettings.from_env({**env, "FOLDFED_INGEST_BATCH": "1"}).batch == 1
    assert AggregatorSettings.from_env(env) == AggregatorSettings(
        ingest, theta, ServerOptimizerSettings("fedavg", 1.0, 0.9), 4 << 20
    )
    assert BarrierSettings.from_env(env) == BarrierSettings(
        bus, ("org-a", "org-b"), Path("var/hub"), theta, 5, 1, 1
    )
    adam = ServerOptimizerSettings.from_env({"FOLDFED_SERVER_OPTIMIZER": "fedadam"})
    assert adam == ServerOptimizerSettings("fedadam", 1e-3, 0.9)
    off = IngestSettings.from_env({**env, "FOLDFED_REQUIRE_SENDER_IDENTITY": "0"})
    assert not off.require_sender_identity


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("FOLDFED_STEPS", "abc", "FOLDFED_STEPS='abc' is not an integer"),
        ("FOLDFED_STEPS", "1.5", "FOLDFED_STEPS='1.5' is not an integer"),
        ("FOLDFED_STEPS", "0", "FOLDFED_STEPS='0' must be >= 1"),
        ("FOLDFED_PUBLISH_TIMEOUT_S", "soon", "FOLDFED_PUBLISH_TIMEOUT_S='soon' is not a number"),
        ("FOLDFED_PUBLISH_TIMEOUT_S", "nan", "FOLDFED_PUBLISH_TIMEOUT_S='nan' must be >= 0.1"),
        ("FOLDFED_LR", "0", "FOLDFED_LR='0' must be > 0"),
        ("FOLDFED_MONITOR_PORT", "70000", "FOLDFED_MONITOR_PORT='70000' must be <= 65535"),
        ("FOLDFED_TRACING", "maybe", "FOLDFED_TRACING='maybe': must be on or off"),
        ("FOLDFED_SERVER_OPTIMIZER", "sgd", "FOLDFED_SERVER_OPTIMIZER='sgd': expected 'fedavg'"),
        ("FOLDFED_PARTICIPANT", "Org A", "FOLDFED_PARTICIPANT='Org A': 'Org A' is not a valid"),
        ("FOLDFED_PARTICIPANTS", "org-a,hub", "FOLDFED_PARTICIPANTS='org-a,hub': 'hub' is not"),
        ("FOLDFED_PARTICIPANTS", " , ", "FOLDFED_PARTICIPANTS=' , ': names no participant"),
        ("FOLDFED_CHUNK_SIZE", "1048577", "FOLDFED_CHUNK_SIZE='1048577': chunk size 1048577"),
        ("FOLDFED_CRASH_AT", "barrier", "FOLDFED_CRASH_AT='barrier': expected <service>:<point>"),
        ("FOLDFED_BROKER_DISK_FREE_LIMIT", "1GB\nx", "FOLDFED_BROKER_DISK_FREE_LIMIT='1GB\\nx'"),
        ("FOLDFED_OF3_FINETUNE", "some", "FOLDFED_OF3_FINETUNE='some': expected all, confidence"),
    ],
)
def test_a_bad_value_is_named_with_the_variable(variable: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings.load({variable: value})
    assert str(caught.value).startswith(message), str(caught.value)


def test_every_bad_variable_is_named_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        settings.load({"FOLDFED_STEPS": "x", "FOLDFED_SEED": "-1"})
    assert "FOLDFED_STEPS='x'" in str(caught.value)
    assert "FOLDFED_SEED='-1' must be >= 0" in str(caught.value)


def test_values_are_parsed_as_before() -> None:
    s = settings.load(
        {
            "FOLDFED_PARTICIPANTS": " org-b, org-a ,org-b,",
            "FOLDFED_TRACING": " OFF ",
            "FOLDFED_STEPS": " 7 ",
            "FOLDFED_SEED": "",  # empty is unset
            "FOLDFED_BROKER_DISK_FREE_LIMIT": " 2GiB ",
            "FOLDFED_CRASH_AT": "barrier:before-release@2",
            "OTHER": "ignored",
        }
    )
    assert s.participants == ("org-a", "org-b")
    assert (s.tracing, s.steps, s.seed) == (False, 7, 0)
    assert s.broker_disk_free_limit == "2GiB" and s.crash_at == "barrier:before-release@2"
    for word, on in (("on", True), ("1", True), ("true", True), ("0", False), ("false", False)):
        s = settings.load({"FOLDFED_REQUIRE_SENDER_IDENTITY": word})
        assert s.require_sender_identity is on


def test_parsing_reads_only_the_mapping_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOLDFED_STEPS", "9")
    assert settings.load({}).steps == 5
    assert settings.load().steps == 9  # os.environ only when no mapping is given


def test_a_dotenv_file_sits_beneath_the_environment(tmp_path: Path) -> None:
    env_file = tmp_path / "foldfed.env"
    env_file.write_text("FOLDFED_STEPS=7\nFOLDFED_SEED=3\n")
    s = settings.load({"FOLDFED_SEED": "4"}, env_file=env_file)
    assert (s.steps, s.seed) == (7, 4)
    env_file.write_text("FOLDFED_STEPS=seven\n")
    with pytest.raises(ConfigError, match="FOLDFED_STEPS='seven' is not an integer"):
        settings.load({}, env_file=env_file)


def test_settings_are_frozen() -> None:
    s = settings.load({})
    with pytest.raises(ValueError, match="frozen"):
        s.steps = 3  # type: ignore[misc]


def test_a_role_demands_what_only_it_needs() -> None:
    s = settings.load({})
    with pytest.raises(ConfigError, match=r"^FOLDFED_AMQP_URL is not set$"):
        settings.required(s.amqp_url, "amqp_url")
    with pytest.raises(ConfigError, match="FOLDFED_PARTICIPANTS is not set"):
        IngestSettings.from_env({"FOLDFED_AMQP_URL": "amqp://x/"})
    assert settings.required(settings.load({"FOLDFED_STEPS": "3"}).steps, "steps") == 3


def test_env_for_writes_what_load_reads() -> None:
    env = settings.env_for(
        steps=3,
        tracing=False,
        participants=("org-b", "org-a"),
        trace_dir=Path("/tmp/traces"),
        poll_s=0.01,
        server_lr=None,
    )
    assert env == {
        "FOLDFED_STEPS": "3",
        "FOLDFED_TRACING": "off",
        "FOLDFED_PARTICIPANTS": "org-b,org-a",
        "FOLDFED_TRACE_DIR": "/tmp/traces",
        "FOLDFED_POLL_S": "0.01",
    }
    s = settings.load(env)
    assert (s.steps, s.tracing, s.participants) == (3, False, ("org-a", "org-b"))
    assert (s.trace_dir, s.poll_s) == (Path("/tmp/traces"), 0.01)


def test_env_for_refuses_what_load_would_refuse() -> None:
    with pytest.raises(ConfigError, match="FOLDFED_STEPS='0' must be >= 1"):
        settings.env_for(steps=0)
    with pytest.raises(ConfigError, match="FOLDFED_PARTICIPANTS"):
        settings.env_for(participants=["Org A"])
    with pytest.raises(TypeError, match="stepz"):
        settings.env_for(stepz=3)


def test_a_default_and_whether_the_environment_gave_a_value() -> None:
    assert settings.default("model") == "mlp" and settings.default("amqp_url") is None
    s = settings.load({"FOLDFED_SPOOL_DIR": "/spool", "FOLDFED_STATE_DIR": ""})
    assert settings.was_given(s, "spool_dir")
    # Empty is unset: the default applies and was not given.
    assert not settings.was_given(s, "state_dir") and s.state_dir == Path("var/hub")


def test_member_weights_are_agreed_for_every_participant(tmp_path: Path) -> None:
    theta = tmp_path / "theta.safetensors"
    theta.write_bytes(b"")
    env = {
        "FOLDFED_AMQP_URL": "amqp://hub:pw@localhost:5672/",
        "FOLDFED_PARTICIPANTS": "org-a,org-b",
        "FOLDFED_INITIAL_MODEL": str(theta),
    }
    default = BarrierSettings.from_env(env)
    assert default.agreed_weights(("org-a", "org-b")) == (4096.0, 4096.0)
    given = BarrierSettings.from_env({**env, "FOLDFED_MEMBER_WEIGHTS": "org-b=3, org-a=0.5"})
    assert given.agreed_weights(("org-a", "org-b")) == (0.5, 3.0)
    with pytest.raises(ConfigError, match=r"unknown \['org-x'\], missing \['org-b'\]"):
        BarrierSettings.from_env({**env, "FOLDFED_MEMBER_WEIGHTS": "org-a=1,org-x=1"})
    for bad in ("org-a", "org-a=0", "org-a=nan", "org-a=1,org-a=2"):
        with pytest.raises(ConfigError, match="FOLDFED_MEMBER_WEIGHTS"):
            settings.load({"FOLDFED_MEMBER_WEIGHTS": bad})


def test_the_update_bound_is_the_cycles_and_the_clip_a_switch(tmp_path: Path) -> None:
    theta = tmp_path / "theta.safetensors"
    theta.write_bytes(b"")
    env = {
        "FOLDFED_AMQP_URL": "amqp://hub:pw@localhost:5672/",
        "FOLDFED_PARTICIPANTS": "org-a,org-b",
        "FOLDFED_INITIAL_MODEL": str(theta),
    }
    assert BarrierSettings.from_env(env).update_norm_bound == 0.0
    bounded = BarrierSettings.from_env({**env, "FOLDFED_UPDATE_NORM_BOUND": "2.5"})
    assert bounded.update_norm_bound == 2.5
    assert settings.load({"FOLDFED_UPDATE_CLIP": "on"}).update_clip is True
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="FOLDFED_UPDATE_NORM_BOUND"):
            settings.load({"FOLDFED_UPDATE_NORM_BOUND": bad})
