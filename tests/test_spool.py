"""The spool, the file protocol between a trainer and its gateway: round trips, atomic
writes, what the gateway sees as pending, and what survives a restart."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

from foldfed import spool as spool_module
from foldfed.deltafile import load_delta, write_delta
from foldfed.errors import StoreError
from foldfed.spool import DeltaRecord, ModelReport, Release, Spool

D1, D2, D3 = bytes(range(32)), bytes(range(1, 33)), bytes(32)


def tensors() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3)}


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_creates_its_folders(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    assert visible(spool.root) == ["inbox", "model", "outbox"]


def test_release_round_trip_without_and_with_update(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_release(1, D1, None)
    write_delta(spool.update_path(2), tensors())
    spool.write_release(2, D2, spool.update_path(2))

    assert spool.next_release(0) == Release(1, D1, None)
    second = spool.next_release(1)
    assert second == Release(2, D2, spool.update_path(2))
    assert second.update_path is not None
    assert torch.equal(load_delta(second.update_path)["w"], tensors()["w"])
    assert spool.next_release(2) is None


def test_next_release_is_the_lowest_step_above(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for step in (7, 3, 5):
        spool.write_release(step, D1, None)
    assert [r.step for r in (spool.next_release(s) for s in (-1, 3, 4, 6)) if r] == [3, 5, 5, 7]
    assert spool.next_release(7) is None


def test_write_release_moves_an_update_into_place(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    elsewhere = tmp_path / "downloaded.safetensors"
    write_delta(elsewhere, tensors())
    spool.write_release(4, D1, elsewhere)
    assert not elsewhere.exists()
    assert spool.update_path(4).is_file()
    release = spool.next_release(0)
    assert release is not None and release.update_path == spool.update_path(4)


def test_release_json_is_versioned_and_plain(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_release(1, D1, None)
    body = json.loads(spool.release_path(1).read_text())
    assert body == {
        "format": 1,
        "step": 1,
        "model_digest": D1.hex(),
        "update": None,
        "final": False,
    }


def test_json_appears_only_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # At the moment of the rename that makes a file visible, the temporary file already
    # holds the whole JSON and the final name does not exist yet.
    spool = Spool(tmp_path)
    real_replace = os.replace
    seen: list[str] = []

    def checking_replace(src: str | Path, dst: str | Path) -> None:
        assert not Path(dst).exists()
        assert Path(src).name.startswith(".")
        json.loads(Path(src).read_text())
        seen.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(spool_module.os, "replace", checking_replace)
    spool.write_release(1, D1, None)
    spool.write_model_report(1, D1, {"eval_loss": 0.5})
    assert seen == ["release-000000000001.json", "model-000000000001.json"]


def test_failed_write_leaves_nothing_visible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = Spool(tmp_path)

    def failing_fsync(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(spool_module.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        spool.write_release(1, D1, None)
    assert visible(spool.inbox) == []
    assert spool.next_release(0) is None


def test_readers_ignore_temporary_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    # What a writer killed before its rename leaves behind: a partial, hidden file.
    (spool.inbox / ".release-000000000001.json.abc.tmp").write_text('{"format": 1, "st')
    (spool.outbox / ".delta-000000000001.json.abc.tmp").write_text("{")
    assert spool.next_release(0) is None
    assert spool.pending_deltas() == []


def test_delta_is_pending_only_once_its_json_exists(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    write_delta(spool.delta_path(3), tensors())
    assert spool.pending_deltas() == []
    assert not spool.has_delta(3)

    record = spool.write_delta(3, spool.delta_path(3), 2560, D1, {"train_loss": 0.25})
    expected = DeltaRecord(
        step=3,
        path=spool.delta_path(3),
        size=spool.delta_path(3).stat().st_size,
        weight=2560.0,
        base_model_digest=D1,
        metrics={"train_loss": 0.25},
    )
    assert record == expected
    assert spool.pending_deltas() == [expected]
    assert spool.has_delta(3)


def test_write_delta_moves_tensors_written_elsewhere(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    scratch = tmp_path / "scratch.safetensors"
    write_delta(scratch, tensors())
    spool.write_delta(1, scratch, 1, D1, {})
    assert not scratch.exists()
    assert spool.pending_deltas()[0].path == spool.delta_path(1)


def test_mark_sent_survives_a_gateway_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for step in (1, 2):
        write_delta(spool.delta_path(step), tensors())
        spool.write_delta(step, spool.delta_path(step), 10, D1, {})
        spool.write_model_report(step, D2, {"eval_loss": 1.0})

    spool.mark_sent("delta", 1)
    spool.mark_sent("model", 2)
    spool.mark_sent("model", 2)  # a second mark is harmless

    restarted = Spool(tmp_path)
    assert [d.step for d in restarted.pending_deltas()] == [2]
    assert restarted.pending_model_reports() == [ModelReport(1, D2, {"eval_loss": 1.0})]
    # Sent is still published: the trainer must not train step 1 again.
    assert restarted.has_delta(1) and restarted.has_model_report(2)
    assert spool.delta_path(1).is_file()


def test_mark_sent_of_nothing_is_an_error(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(StoreError, match="nothing to mark sent"):
        spool.mark_sent("delta", 9)
    with pytest.raises(ValueError, match="kind"):
        spool.mark_sent("chunk", 1)  # type: ignore[arg-type]


def test_non_finite_metrics_travel_as_null(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_model_report(1, D1, {"eval_loss": math.inf, "ok": 2.0})
    body = json.loads((spool.outbox / "model-000000000001.json").read_text())
    assert body["metrics"] == {"eval_loss": None, "ok": 2.0}
    (report,) = spool.pending_model_reports()
    assert math.isnan(report.metrics["eval_loss"]) and report.metrics["ok"] == 2.0


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"format": 2}, "format 2"),
        ({"step": 8}, "says step 8"),
        ({"model_digest": "zz"}, "model_digest"),
        ({"update": "../../etc/passwd"}, "update must be"),
    ],
)
def test_bad_release_files_are_refused(
    tmp_path: Path, patch: dict[str, object], message: str
) -> None:
    spool = Spool(tmp_path)
    spool.write_release(1, D1, None)
    body = {**json.loads(spool.release_path(1).read_text()), **patch}
    spool.release_path(1).write_text(json.dumps(body))
    with pytest.raises(StoreError, match=message):
        spool.next_release(0)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    with pytest.raises(ValueError, match="digest"):
        spool.write_release(1, b"short", None)
    with pytest.raises(ValueError, match="step"):
        spool.write_release(-1, D1, None)
    with pytest.raises(StoreError, match="does not exist"):
        spool.write_release(1, D1, spool.update_path(1))
    write_delta(spool.delta_path(1), tensors())
    with pytest.raises(ValueError, match="weight"):
        spool.write_delta(1, spool.delta_path(1), 0, D1, {})


def test_commit_model_keeps_only_the_current_snapshot(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.current_model() is None
    for step, digest in ((1, D1), (2, D2)):
        write_delta(spool.snapshot_path(step), tensors())
        spool.commit_model(step, digest)
    current = spool.current_model()
    assert current is not None
    assert (current.step, current.model_digest, current.path) == (2, D2, spool.snapshot_path(2))
    assert visible(spool.model_dir) == ["current.json", "model-000000000002.safetensors"]
    with pytest.raises(StoreError, match="does not exist"):
        spool.commit_model(3, D3)


def test_drop_update_removes_consumed_updates_only(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for step in (2, 3, 4):
        write_delta(spool.update_path(step), tensors())
        spool.write_release(step, D1, spool.update_path(step))
    spool.drop_update(3)
    assert [spool.update_path(s).exists() for s in (2, 3, 4)] == [False, False, True]
    assert spool.release_path(3).exists()  # the small record of the release stays


def test_a_release_carries_the_agreed_weight(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.write_release(1, D1, None, weight=2.5)
    assert spool.next_release(0) == Release(1, D1, None, weight=2.5)
    with pytest.raises(ValueError, match="positive finite"):
        spool.write_release(2, D1, None, weight=math.inf)
