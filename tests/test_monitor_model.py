"""The monitor's model, store, renderers and /metrics, without a broker: a synthetic cycle
with a participant 4 s slower each step, fed as the wire messages the services send."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from foldfed.domain import AnyMessage, DeliveryReceipt, Event, Heartbeat, ModelReport
from foldfed.messages import decode, encode
from foldfed.monitor import metrics, render
from foldfed.monitor.attribution import StragglerRule
from foldfed.monitor.model import MonitorModel
from foldfed.monitor.senders import check_sender
from foldfed.monitor.state import MonitorConfig
from foldfed.monitor.store import MonitorStore

NAMES = ("org-a", "org-b", "org-c")
STEPS = 6
T0 = 1_700_000_000_000
STEP_MS = 10_000
DELAY_MS = 4_000  # org-c's extra time per step
DIGEST = bytes(32)


def config() -> MonitorConfig:
    return MonitorConfig(NAMES, STEPS, rule=StragglerRule(window=5, needed=3))


def released(step: int) -> int:
    return T0 + (step - 1) * STEP_MS


def delivered(step: int, p: str) -> int:
    base = {"org-a": 2_000, "org-b": 2_300, "org-c": 2_400 + DELAY_MS}[p]
    return released(step) + base + 37 * step  # a little drift so steps differ


def step_messages(step: int) -> list[tuple[AnyMessage, int]]:
    """Everything foldfed.events carries for one step, with its arrival time."""
    r = released(step)
    out: list[tuple[AnyMessage, int]] = [
        (Event("step_released", "barrier", "", step, "abc", {}, r), r + 5)
    ]
    for p in NAMES:
        wait = {"wait_s": 1.0} if step > 1 else {}
        out.append((Event("release_received", "uploader", p, step, "", wait, r + 50), r + 55))
        start = delivered(step, p) - 700
        out.append(
            (
                Event("upload_started", "uploader", p, step, "", {"bytes_total": 1e6}, start),
                start + 5,
            )
        )
        d = delivered(step, p)
        receipt = DeliveryReceipt(step, p, DIGEST, DIGEST, 1, 1_000_000, 0, d)
        out.append((receipt, d + 3))
        metrics = {"upload_s": 0.7, "bytes_sent": 1e6, "compute_s": 1.2, "train_loss": 0.5}
        out.append((Event("upload_finished", "uploader", p, step, "", metrics, d + 9), d + 12))
        out.append((Heartbeat("uploader", p, step, "waiting", d + 20), d + 21))
    return out


def feed(model: MonitorModel, messages: list[tuple[AnyMessage, int]]) -> list:
    alerts = []
    for msg, at in sorted(messages, key=lambda item: item[1]):
        alerts += model.apply(msg, at)
    return alerts


def run(steps: int) -> tuple[MonitorModel, list]:
    model = MonitorModel(config(), started_ms=T0 - 1000)
    alerts = feed(model, [m for s in range(1, steps + 1) for m in step_messages(s)])
    return model, alerts


def test_idle_is_attributed_to_the_slow_participant_step_by_step() -> None:
    model, _ = run(4)
    snap = model.snapshot(released(4) + 9_000)
    closed = [s for s in snap["steps"] if s["closed"]]
    assert [s["step"] for s in closed] == [1, 2, 3, 4]
    for step in closed:
        assert step["holder"] == "org-c"
        # org-c delivered 4.1 s after the runner-up (org-b) every step.
        assert step["held_s"] == pytest.approx((DELAY_MS + 100) / 1e3)
        # Wall time is release to release; the last step's next release is not known yet.
    assert [s["wall_s"] for s in closed] == [10.0, 10.0, 10.0, None]
    row = {r["participant"]: r for r in snap["table"]}
    assert row["org-c"]["idle_s"] == pytest.approx(4 * 4.1)
    assert row["org-c"]["idle_participant_s"] == pytest.approx(2 * 4 * 4.1)
    assert row["org-a"]["idle_s"] == row["org-b"]["idle_s"] == 0.0
    # Two steps remain: the projection is the median hold times two.
    assert snap["cycle"]["remaining"] == 2
    assert row["org-c"]["projected_idle_s"] == pytest.approx(2 * 4.1)
    assert row["org-a"]["projected_idle_s"] == 0.0


def test_timeline_phases_come_from_the_participants_own_durations() -> None:
    model, _ = run(3)
    snap = model.snapshot(released(4))
    phases = snap["steps"][0]["participants"]["org-c"]
    # Release received (r + 50) to upload start (delivered - 700).
    assert phases["compute_s"] == pytest.approx((2_400 + DELAY_MS + 37 - 700 - 50) / 1e3)
    assert phases["train_s"] == 1.2
    assert phases["upload_s"] == 0.7
    # Hub clock: delivery to the next release.
    assert phases["wait_s"] == pytest.approx((STEP_MS - 2_400 - DELAY_MS - 37) / 1e3)
    assert phases["lag_s"] == pytest.approx((2_400 + DELAY_MS + 37) / 1e3)


def test_a_straggler_alert_is_raised_once_when_it_becomes_one() -> None:
    model, alerts = run(STEPS)
    assert [(a.kind, a.participant, a.step) for a in alerts] == [("straggler", "org-c", 3)]
    (alert,) = alerts
    assert "org-c is a straggler" in alert.detail
    assert alert.metrics["excess_s"] == pytest.approx(4.2 - 0.05, abs=0.1)
    assert alert.metrics["projected_idle_s"] == pytest.approx(3 * 4.1)
    snap = model.snapshot(released(STEPS) + STEP_MS)
    assert {r["participant"]: r["straggler"] for r in snap["table"]} == {
        "org-a": False,
        "org-b": False,
        "org-c": True,
    }


def test_open_step_shows_who_delivered_and_the_bytes_still_to_come() -> None:
    model = MonitorModel(config(), started_ms=T0)
    partial = [m for m in step_messages(1) if not _about(m[0], "org-c", after_start=False)]
    feed(model, partial)
    snap = model.snapshot(released(1) + 3_000)
    assert snap["current_step"] == 1
    assert snap["open"]["delivered"] == ["org-a", "org-b"]
    assert snap["open"]["waiting"] == ["org-c"]
    assert snap["open"]["uploading"] == ["org-c"]
    assert snap["open"]["bytes_to_come"] == 1e6
    assert snap["open"]["elapsed_s"] == pytest.approx(3.0)
    assert snap["eta_s"] is None  # no step measured yet


def test_a_snapshot_only_reads_the_state() -> None:
    model = MonitorModel(config(), started_ms=T0)
    # org-c sent nothing at all for step 1: the state holds no record of it.
    feed(model, [m for m in step_messages(1) if getattr(m[0], "participant", "") != "org-c"])
    before = copy.deepcopy(model.steps)
    assert "org-c" not in before[1].participants
    snap = model.snapshot(released(1) + 3_000)
    assert snap["open"]["waiting"] == ["org-c"]
    assert snap["open"]["bytes_to_come_known"] is False  # nothing known of org-c
    assert model.steps == before


def _about(msg: AnyMessage, p: str, after_start: bool) -> bool:
    """org-c's receipt, its upload_finished and its heartbeat (but not its upload_started)."""
    if isinstance(msg, DeliveryReceipt | Heartbeat):
        return msg.participant == p
    return isinstance(msg, Event) and msg.participant == p and msg.kind == "upload_finished"


def test_eta_after_some_steps_is_median_step_times_what_remains() -> None:
    model, _ = run(3)
    snap = model.snapshot(released(4) + 2_000)  # step 4 released? not yet: open is 3
    assert snap["cycle"]["closed"] == 3
    # Walls of steps 1, 2 known (10 s); step 3's next release not seen: open step 3 is
    # closed, so the ETA is 3 more steps of 10 s.
    assert snap["eta_s"] == pytest.approx(30.0)
    assert snap["step_wall_s"] == pytest.approx(10.0)


def test_applying_a_message_twice_changes_nothing() -> None:
    model, _ = run(4)
    again = MonitorModel(config(), started_ms=T0 - 1000)
    messages = [m for s in range(1, 5) for m in step_messages(s)]
    feed(again, messages + messages)
    now = released(5)
    assert again.snapshot(now) == model.snapshot(now)


def test_silence_is_flagged_once_and_says_the_barrier_waits() -> None:
    model = MonitorModel(MonitorConfig(NAMES, STEPS, silent_after_s=15.0), started_ms=T0)
    feed(model, [m for m in step_messages(1) if not _about(m[0], "org-c", after_start=False)])
    for p in ("org-a", "org-b"):
        model.apply(Heartbeat("uploader", p, 1, "waiting", 0), released(1) + 20_000)
    assert model.check_silence(released(1) + 10_000) == []
    alerts = model.check_silence(released(1) + 21_000)
    assert [(a.kind, a.participant) for a in alerts] == [("silent", "org-c")]
    assert "step 1 is waiting for it" in alerts[0].detail
    assert model.check_silence(released(1) + 22_000) == []  # once per silence
    snap = model.snapshot(released(1) + 22_000)
    assert [r["participant"] for r in snap["table"] if r["silent"]] == ["org-c"]
    # Heard from again, then silent again: a new alert.
    model.apply(Heartbeat("uploader", "org-c", 1, "uploading", 0), released(1) + 23_000)
    assert model.check_silence(released(1) + 24_000) == []
    again = [a for a in model.check_silence(released(1) + 40_000) if a.participant == "org-c"]
    assert len(again) == 1 and again[0].key != alerts[0].key


def test_store_replay_rebuilds_the_same_state(tmp_path: Path) -> None:
    path = tmp_path / "monitor.sqlite3"
    store = MonitorStore(path)
    live = MonitorModel(config(), started_ms=T0)
    for n, (msg, at) in enumerate(
        sorted([m for s in range(1, 5) for m in step_messages(s)], key=lambda item: item[1])
    ):
        type_name, body = encode(msg)
        if isinstance(msg, Heartbeat):
            store.put_heartbeat(msg.service, msg.participant, at, body)
        else:
            assert store.add_message(f"id-{n}", at, type_name, body)
            assert not store.add_message(f"id-{n}", at, type_name, body)  # redelivery
        live.apply(msg, at)
    store.close()
    reopened = MonitorStore(path)
    rebuilt = MonitorModel(config(), started_ms=T0)
    for at, type_name, body in reopened.messages():
        rebuilt.apply(decode(type_name, body), at)
    for at, body in reopened.heartbeats():
        rebuilt.apply(decode("foldfed.v1.Heartbeat", body), at)
    assert len(list(reopened.heartbeats())) == 3  # the latest per sender only
    now = released(5)
    assert rebuilt.snapshot(now) == live.snapshot(now)
    assert not reopened.published("straggler:org-c:3")
    reopened.mark_published("straggler:org-c:3", now)
    assert reopened.published("straggler:org-c:3")
    reopened.close()


def test_a_foreign_store_is_refused(tmp_path: Path) -> None:
    from foldfed.errors import StoreError

    bad = tmp_path / "bad.sqlite3"
    bad.write_bytes(b"not a database at all" * 100)
    with pytest.raises(StoreError, match="not a usable monitor store"):
        MonitorStore(bad)


@pytest.mark.parametrize(
    ("msg", "user", "believed"),
    [
        (DeliveryReceipt(1, "org-a", DIGEST, DIGEST, 1, 1, 0, 0), "hub-admin", True),
        (DeliveryReceipt(1, "org-a", DIGEST, DIGEST, 1, 1, 0, 0), "org-a", False),
        (Event("step_released", "barrier", "", 1), "hub-admin", True),
        (Event("step_released", "barrier", "", 1), "org-b", False),
        (Event("straggler", "monitor", "org-b", 1), "org-a", False),
        (Event("upload_finished", "uploader", "org-a", 1), "org-a", True),
        (Event("upload_finished", "uploader", "org-b", 1), "org-a", False),
        (Heartbeat("uploader", "org-b", 1, "idle"), "org-a", False),
        (Heartbeat("uploader", "org-a", 1, "idle"), "org-a", True),
        (ModelReport(1, "org-c", DIGEST), "org-a", False),
        (Event("rejected", "ingest", "org-a", 0, "bad"), "org-a", False),
    ],
)
def test_only_the_identity_a_fact_is_about_is_believed(
    msg: AnyMessage, user: str, believed: bool
) -> None:
    reason = check_sender(msg, user, "hub-admin")
    assert (reason is None) == believed, reason


def test_dashboard_and_status_show_step_straggler_and_timeline() -> None:
    model, _ = run(4)
    snap = json.loads(json.dumps(model.snapshot(released(5) - 4_000)))  # as /api/state
    page = render.html_page(snap, refresh_s=3)
    assert '<meta http-equiv="refresh" content="3">' in page
    assert 'id="current-step">4<' in page
    assert '<tr data-participant="org-c"><td>org-c</td><td class=bad>STRAGGLER</td>' in page
    assert page.count("<rect") >= 4 * 3 * 3  # compute, upload, wait per step and participant
    assert "http" not in page.replace("http-equiv", "").replace("http://www.w3.org/2000/svg", "")
    text = render.status_text(snap)
    assert "step 4 of 1..6" in text
    assert "org-c" in text and "STRAGGLER" in text
    assert "held by org-c 4.1 s" in text


def test_html_escapes_what_participants_and_events_say() -> None:
    model = MonitorModel(config(), started_ms=T0)
    model.apply(Event("model_mismatch", "barrier", "org-a", 1, "<script>x</script>"), T0)
    page = render.html_page(model.snapshot(T0), 5)
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_metrics_are_valid_prometheus_text() -> None:
    model, _ = run(4)
    body = metrics.exposition(lambda: model.snapshot(released(5) - 4_000)).decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert families["foldfed_current_step"].samples[0].value == 4
    idle = {
        s.labels["participant"]: s.value
        for s in families["foldfed_participant_idle_seconds"].samples
    }
    assert idle["org-c"] == pytest.approx(4 * 4.1) and idle["org-a"] == 0
    straggler = {
        s.labels["participant"]: s.value for s in families["foldfed_participant_straggler"].samples
    }
    assert straggler == {"org-a": 0.0, "org-b": 0.0, "org-c": 1.0}
    phases = {
        (s.labels["participant"], s.labels["phase"])
        for s in families["foldfed_participant_phase_seconds"].samples
    }
    assert ("org-c", "wait") in phases and ("org-a", "compute") in phases


def test_settings_name_the_bad_variable() -> None:
    from foldfed.errors import ConfigError
    from foldfed.monitor.settings import MonitorSettings

    env = {"FOLDFED_AMQP_URL": "amqp://hub:pw@localhost:5672/", "FOLDFED_PARTICIPANTS": "org-a"}
    settings = MonitorSettings.from_env(env)
    assert settings.port == 8090 and settings.model.rule.needed == 3
    with pytest.raises(ConfigError, match="FOLDFED_MONITOR_STRAGGLER_STEPS"):
        MonitorSettings.from_env({**env, "FOLDFED_MONITOR_STRAGGLER_STEPS": "7"})
    with pytest.raises(ConfigError, match="FOLDFED_MONITOR_PORT"):
        MonitorSettings.from_env({**env, "FOLDFED_MONITOR_PORT": "70000"})
    with pytest.raises(ConfigError, match="FOLDFED_MONITOR_SILENT_S"):
        MonitorSettings.from_env({**env, "FOLDFED_MONITOR_SILENT_S": "soon"})


def test_status_says_why_when_the_monitor_cannot_be_reached() -> None:
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    result = subprocess.run(
        [sys.executable, "-m", "foldfed.cli", "status", "--url", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert f"cannot read the monitor at http://127.0.0.1:{port}/" in result.stderr


def test_status_asks_the_monitor_the_settings_name() -> None:
    from foldfed.monitor.commands import default_url
    from foldfed.settings import load

    assert default_url(load({})) == "http://127.0.0.1:8090/"
    assert default_url(load({"FOLDFED_MONITOR_PORT": "9100"})) == "http://127.0.0.1:9100/"
    hub = {"FOLDFED_MONITOR_URL": "http://hub:8090/", "FOLDFED_MONITOR_PORT": "9100"}
    assert default_url(load(hub)) == "http://hub:8090/"
