"""Load-test scenarios that compare codecs: parsing, wire sizes, and the transfer model."""

from __future__ import annotations

from pathlib import Path

import pytest

from foldfed.errors import CodecError
from foldfed.loadtest.commands import SCENARIO_DIR, SMOKE
from foldfed.loadtest.predict import burst_real_seconds, download_seconds, plan_run
from foldfed.loadtest.runner import size_codecs
from foldfed.loadtest.scenario import MIB, CodecPair, ScenarioError, load_scenario, parse_scenario

SHARED2 = (
    "rotated:v1;bits=2;block=4096;floor=0.01;init=0.001;mult=2.0;rounding=stochastic;scale=shared"
)
BLOCK1 = "rotated:v1;bits=1;block=4096;mult=1.0;rounding=nearest;scale=block"


def _raw(**extra: object) -> dict[str, object]:
    return {
        "name": "c",
        "steps": 3,
        "time_scale": 10,
        "delta_mib": 40,
        "defaults": {"compute": 100, "bandwidth_mbps": 10},
        "participants": [{"name": "site-a"}, {"name": "site-b"}],
        **extra,
    }


def test_codecs_parse_as_specs_or_pairs() -> None:
    s = parse_scenario(
        _raw(codecs=["fp32:v1", {"name": "r", "uplink": SHARED2, "downlink": BLOCK1}])
    )
    assert s.codecs == (CodecPair(), CodecPair(SHARED2, BLOCK1, name="r"))
    assert s.codec == CodecPair() and s.with_codec(1).codec.label == "r"
    assert s.with_codec(1).name == "c-codec1"
    assert parse_scenario(_raw()).codec == CodecPair()  # no codecs: fp32 both ways


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"codecs": []}, "codecs: expected a non-empty list"),
        ({"codecs": [{"uplink": "fp32:v1", "bits": 2}]}, "unknown key"),
        ({"expect": {"comm_within_compute": True}}, "needs `codecs`"),
        ({"expect": {"comm_within_compute": 1}}, "expected true/false"),
        ({"smoke_time_scale": 0.5}, "smoke_time_scale"),
    ],
)
def test_bad_codec_keys_are_named(extra: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario(_raw(**extra))


def test_the_smoke_version_runs_at_its_own_time_scale() -> None:
    s = parse_scenario(_raw(smoke_time_scale=40))
    assert s.smoke().time_scale == 40 and s.time_scale == 10
    assert parse_scenario(_raw()).smoke().time_scale == 10


def test_codecs_are_sized_and_checked_before_running() -> None:
    s = size_codecs(
        parse_scenario(_raw(codecs=["fp32:v1", {"uplink": SHARED2, "downlink": BLOCK1}]))
    )
    fp32, coded = s.with_codec(0), s.with_codec(1)
    assert fp32.uplink_bytes_run == fp32.downlink_bytes_run == fp32.delta_bytes_run
    n = s.delta_elements
    # 2 bits and 1 bit per element, plus a float32 range per block of 4096 for scale=block.
    assert coded.uplink_bytes_run == pytest.approx(n / 4, rel=0.01)
    assert coded.downlink_bytes_run == pytest.approx(n / 8 + 4 * n / 4096, rel=0.01)
    with pytest.raises(CodecError, match="downlink shares ranges"):
        size_codecs(parse_scenario(_raw(codecs=[SHARED2])))
    with pytest.raises(CodecError, match=r"codecs\[0\].uplink"):
        size_codecs(parse_scenario(_raw(codecs=["nonsense:v1"])))


def test_transfers_in_real_seconds() -> None:
    s = size_codecs(parse_scenario(_raw(codecs=[{"uplink": SHARED2, "downlink": BLOCK1}])))
    p = s.participants[0]  # 10 Mb/s = 1.25 MB/s
    rate = 1.25e6
    assert download_seconds(p, s) == pytest.approx(s.downlink_bytes_run / rate * 10)
    burst = min(MIB, s.uplink_bytes_run)
    assert burst_real_seconds(p, s) == pytest.approx(burst / rate * 10)
    up = plan_run(s)[0].upload_s["site-a"]
    assert up == pytest.approx(max(0, s.uplink_bytes_run - MIB) / rate * 10)


def test_the_shipped_consortium_scenario() -> None:
    s = size_codecs(load_scenario((SCENARIO_DIR / "seed-consortium.yaml").read_text()))
    assert "seed-consortium" in SMOKE
    assert s.delta_elements * 4 * s.time_scale == pytest.approx(1_473_175_152, rel=1e-6)
    assert [p.compute.seconds for p in s.participants] == [120, 120, 120, 120, 144]
    assert {p.bandwidth_mbps for p in s.participants} == {10}
    assert s.codecs[0] == CodecPair(uplink_bytes_run=0, downlink_bytes_run=0)
    # The recommended codec is about 16x fewer bytes than fp32 (before zstd's gain).
    ratio = s.delta_bytes_run / s.with_codec(1).uplink_bytes_run
    assert 15 < ratio < 17
    assert Path(SCENARIO_DIR / "seed-consortium.yaml").is_file()
