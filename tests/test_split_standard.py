"""The blind-split reference hash (of3/data/split_standard.py) and the gate's `split`
check: the same configuration and key give the same hash at every party; another key,
fraction or rule gives another, and the check names the field or the key that differs;
the readiness record carries the reference, never the key."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from foldfed.errors import ConfigError
from foldfed.gate import checks
from foldfed.gate.checks import Result, SplitProbe, SplitTerms, Terms
from foldfed.gate.record import readiness_statement, sign_record, verify_record
from foldfed.of3.data import partition
from foldfed.of3.data.split_standard import (
    REFERENCE_SET,
    SplitConfig,
    config_from_partition,
    consortium_table,
    expected_from_consortium,
    reference_assignment,
    split_reference,
)
from foldfed.signing import SigningKey

KEY = "consortium-secret-split-key"
CONFIG = SplitConfig(split_by="entries", heldout_fraction=0.3, companies=3)


def test_the_same_configuration_and_key_give_the_same_hash() -> None:
    a, b = split_reference(CONFIG, KEY), split_reference(replace(CONFIG), KEY)
    assert a == b and len(a.reference_hash) == 64
    rows = reference_assignment(CONFIG, KEY)
    assert [r[0] for r in rows] == sorted(e for e, _, _ in REFERENCE_SET)
    assert {r[3] for r in rows} == {"train", "heldout"}  # the set exercises both sides


def test_another_key_changes_the_assignment_not_the_configuration() -> None:
    ours, theirs = split_reference(CONFIG, KEY), split_reference(CONFIG, KEY + "!")
    assert ours.config_digest == theirs.config_digest
    assert ours.assignment_digest != theirs.assignment_digest
    assert ours.reference_hash != theirs.reference_hash


@pytest.mark.parametrize(
    "change",
    [
        {"heldout_fraction": 0.25},
        {"companies": 4},
        {"split_by": "clusters"},
        {"standard": "foldfed.split/0"},
        {"schema_version": "foldfed.data/0"},
    ],
)
def test_any_configuration_field_changes_the_hash(change: dict) -> None:
    other = split_reference(replace(CONFIG, **change), KEY)
    assert other.config_digest != split_reference(CONFIG, KEY).config_digest
    assert other.reference_hash != split_reference(CONFIG, KEY).reference_hash


def test_the_scaffold_rule_counts_only_for_the_clusters_rule() -> None:
    assert (
        split_reference(replace(CONFIG, scaffold="murcko/x"), KEY).reference_hash
        == split_reference(replace(CONFIG, scaffold="murcko/y"), KEY).reference_hash
    )
    clusters = replace(CONFIG, split_by="clusters")
    assert (
        split_reference(replace(clusters, scaffold="murcko/x"), KEY).reference_hash
        != split_reference(replace(clusters, scaffold="murcko/y"), KEY).reference_hash
    )


def test_the_published_reference_never_holds_the_key() -> None:
    published = json.dumps(split_reference(CONFIG, KEY).to_json())
    assert KEY not in published and "key" not in split_reference(CONFIG, KEY).config.to_json()


def test_a_sample_manifest_and_the_consortium_table_read_alike() -> None:
    block = {
        "key": KEY,
        "heldout_fraction": 0.3,
        "companies": list(partition.company_names(3)),
        "cluster": "minhash8",
        "split_by": "entries",
        "scaffold": "murcko/rdkit-2025.09.6",
    }
    config, key = config_from_partition(block)
    assert key == KEY and config.to_json() == CONFIG.to_json()
    reference = split_reference(config, key)
    import tomllib

    expected = expected_from_consortium(tomllib.loads(consortium_table(reference)))
    assert expected is not None
    assert expected[0].to_json() == config.to_json()
    assert expected[1] == reference.reference_hash
    assert expected_from_consortium({}) is None


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ({"heldout_fraction": 0.3, "companies": 3}, "partition.key"),
        ({"key": KEY, "companies": "three"}, "companies"),
        ({"key": KEY, "companies": 3, "split_by": "families"}, "split by must be one of"),
    ],
)
def test_a_bad_local_configuration_is_named(block: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        config_from_partition(block)


def test_a_bad_consortium_table_is_named() -> None:
    with pytest.raises(ConfigError, match="reference_hash"):
        expected_from_consortium({"split": {"companies": 3, "reference_hash": "ab"}})


# ---------------------------------------------------------------- the gate's check


def terms(reference_hash: str, config: SplitConfig = CONFIG) -> Terms:
    split = SplitTerms(config.to_json(), reference_hash)
    return Terms(cycle=1, theta0_digest="ab" * 32, schema_version="foldfed.data/1", split=split)


def probe(config: SplitConfig = CONFIG, key: str = KEY) -> SplitProbe:
    reference = split_reference(config, key)
    return SplitProbe(True, reference.reference_hash, reference.to_json()["config"])


def test_the_split_check_passes_on_the_consortium_hash() -> None:
    expected = split_reference(CONFIG, KEY).reference_hash
    result = checks.judge_split(probe(), terms(expected))
    assert result.result is Result.PASS and expected[:16] in result.value


def test_another_key_fails_naming_the_key() -> None:
    expected = split_reference(CONFIG, KEY).reference_hash
    result = checks.judge_split(probe(key="a leaked old key"), terms(expected))
    assert result.result is Result.FAIL
    assert "same configuration, so the split key differs" in result.value
    assert "split key again" in result.fix


def test_another_configuration_fails_naming_the_field_and_both_values() -> None:
    expected = split_reference(CONFIG, KEY).reference_hash
    result = checks.judge_split(probe(replace(CONFIG, heldout_fraction=0.25)), terms(expected))
    assert result.result is Result.FAIL
    assert "heldout_fraction: 0.25 here, 0.3 in the consortium's config" in result.value
    assert "[split] table" in result.fix


def test_without_consortium_terms_it_skips_and_without_a_configuration_it_fails() -> None:
    plain = Terms(cycle=1, theta0_digest="ab" * 32, schema_version="foldfed.data/1")
    assert checks.judge_split(SplitProbe(False), plain).result is Result.SKIP
    missing = checks.judge_split(SplitProbe(False), terms("00" * 32))
    assert missing.result is Result.FAIL and "--split" in missing.fix
    broken = checks.judge_split(SplitProbe(True, error="no such file"), terms("00" * 32))
    assert broken.result is Result.FAIL and "no such file" in broken.value


def test_the_record_carries_the_reference_and_a_mismatch_makes_it_not_ready() -> None:
    key = SigningKey(name="org-c", seed=bytes(range(32)))
    reference = split_reference(replace(CONFIG, heldout_fraction=0.25), KEY)
    t = terms(split_reference(CONFIG, KEY).reference_hash)
    results = [
        checks.judge_theta0("ab" * 32, t),
        checks.judge_split(probe(replace(CONFIG, heldout_fraction=0.25)), t),
    ]
    statement = readiness_statement("org-c", t, results, "ab" * 32, "now", reference.to_json())
    document = sign_record(statement, key).to_json()
    record = verify_record(document, [key.verify_key()])
    assert not record.ready and record.failed_checks() == ["split"]
    assert statement["predicate"]["split"]["reference_hash"] == reference.reference_hash
    assert KEY not in json.dumps(statement)


def test_the_gate_reads_a_sample_manifest(tmp_path: Path) -> None:
    from foldfed.gate.probes import probe_split

    sample = tmp_path / "sample.json"
    sample.write_text(
        json.dumps({"partition": {"key": KEY, "heldout_fraction": 0.3, "companies": 3}})
    )
    found, published = probe_split(sample)
    assert found.reference_hash == split_reference(CONFIG, KEY).reference_hash
    assert published is not None and published["config"] == CONFIG.to_json()
    assert probe_split(None) == (SplitProbe(False), None)
    missing, none = probe_split(tmp_path / "absent.json")
    assert missing.given and missing.error and none is None
