"""OpenFold3 training data from real protein-ligand complexes (plinder 0.2.27's mmCIFs).

One session fixture fetches the plinder sdist (PyPI once, then cached in ~/.cache/foldfed
or $FOLDFED_CACHE_DIR) and prepares a small real sample (three complexes, one entry
without a ligand, one truncated file); the tests share it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from foldfed.errors import CodecError, ConfigError, StoreError
from foldfed.of3.data import plinder
from foldfed.of3.data.cache import featurize_cached
from foldfed.of3.data.cachekey import cache_key
from foldfed.of3.data.ccd import OfflineCcd
from foldfed.of3.data.example import (
    FeatureSettings,
    FeaturizationError,
    LigandInfo,
    NoLigandError,
)
from foldfed.of3.data.features import (
    encode_feature_file,
    load_batch,
    load_features,
    read_feature_info,
)
from foldfed.of3.data.featurize import build_features
from foldfed.of3.data.pocket import pocket_crop, select_primary_ligand
from foldfed.of3.data.sample import Sample, open_sample, prepare_sample
from foldfed.of3.data.sample_split import summary_table

BUDGET = 48
ENTRIES = ("7bqu", "2hyy", "3g32")  # EF2 + zinc; imatinib (STI) on ABL; a small ligand
NO_LIGAND = "6i41"  # a real entry with no ligand at all


@pytest.fixture(scope="session")
def cifs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    sdist = plinder.fetch_sdist(plinder.default_cache_dir())
    return plinder.extract_entries(sdist, tmp_path_factory.mktemp("plinder-cif"))


@pytest.fixture(scope="session")
def ccd() -> OfflineCcd:
    return OfflineCcd()


@pytest.fixture(scope="session")
def sample(cifs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Sample:
    src = tmp_path_factory.mktemp("inputs")
    broken = src / "brok.cif"  # a real file cut in the middle of its atom records
    data = cifs["7bqu"].read_bytes()
    broken.write_bytes(data[: len(data) * 2 // 3])
    chosen = {e: cifs[e] for e in (*ENTRIES, NO_LIGAND)} | {"brok": broken}
    out = tmp_path_factory.mktemp("sample")
    return prepare_sample(out, 2, token_budget=BUDGET, cifs=chosen).sample


def _entry(sample: Sample, entry_id: str):
    return next(e for e in sample.entries if e.entry_id == entry_id)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread: on a machine shared by several jobs, two threads spinning on two
    cores made a tiny step ~10x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _tiny_model() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The project's tiny OpenFold3 preset (~0.8 M parameters, no recycles)."""
    from openfold3.core.loss.loss_module import OpenFold3Loss

    from foldfed.of3.presets import build_model, model_config

    cfg = model_config("tiny")
    return build_model(cfg, seed=0).train(), OpenFold3Loss(cfg.architecture.loss_module)


# Loss terms that real ground truth must switch on. OpenFold3 zeroes every loss weight
# (loss 0.0, tests still green) when the ground truth cannot be aligned.
EXPECTED_TERMS = (
    "mse_loss",
    "smooth_lddt_loss",
    "diffusion_loss",
    "distogram_loss",
    "plddt_loss",
    "pde_loss",
    "pae_loss",
    "experimentally_resolved_loss",
    "confidence_loss",
)


@pytest.mark.slow
@pytest.mark.parametrize("entry_id", ["7bqu", "2hyy"])
def test_tiny_openfold3_trains_on_a_real_complex(
    sample: Sample, entry_id: str, one_thread: None
) -> None:
    model, loss_fn = _tiny_model()
    batch = load_batch(_entry(sample, entry_id).features)
    assert batch["token_mask"].shape == (1, BUDGET)
    assert batch["ground_truth"]["atom_resolved_mask"].sum() > 0
    assert all(float(w) > 0 for k, w in batch["loss_weights"].items() if k != "bond")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        batch, outputs = model(batch)
        loss, breakdown = loss_fn(batch, outputs, _return_breakdown=True)
    assert torch.isfinite(loss) and float(loss) > 0.1
    terms = {k: float(v) for k, v in breakdown.items()}
    print(f"loss terms ({entry_id}, tiny model):", {k: round(v, 4) for k, v in terms.items()})
    for term in EXPECTED_TERMS:
        assert term in terms, f"{term} missing from the loss breakdown"
        assert math.isfinite(terms[term]) and terms[term] > 0, f"{term} = {terms[term]}"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)


def test_load_batch_is_fresh_every_call(sample: Sample) -> None:
    path = _entry(sample, "7bqu").features
    first = load_batch(path)
    first["ground_truth"]["atom_positions"].add_(100.0)
    first.pop("token_mask")
    second = load_batch(path)
    assert "token_mask" in second
    assert not torch.equal(
        first["ground_truth"]["atom_positions"], second["ground_truth"]["atom_positions"]
    )
    perms = second["ref_space_uid_to_perm"]
    assert isinstance(perms, list) and len(perms) == 1
    assert perms[0] and all(isinstance(k, int) for k in perms[0])


def test_every_crop_holds_its_ligand_and_the_budget(sample: Sample) -> None:
    for entry in sample.entries:
        info = read_feature_info(entry.features)
        batch = load_batch(entry.features)
        n_ligand = int((batch["is_ligand"] * batch["token_mask"]).sum())
        print(
            f"{entry.entry_id}: {info.full_tokens} tokens -> {info.n_tokens} in the crop; "
            f"ligand {info.primary_ligand.component} {info.primary_ligand.heavy_atoms} heavy "
            f"atoms, {info.ligand_tokens_in_crop} in the crop"
        )
        assert info.n_tokens == entry.n_tokens <= BUDGET
        assert info.primary_ligand.qualifies and info.primary_ligand.heavy_atoms >= 6
        # the whole ligand is in the crop when it fits in the budget
        assert info.ligand_tokens_in_crop == min(info.primary_ligand.heavy_atoms, BUDGET)
        assert n_ligand >= info.ligand_tokens_in_crop


def test_bad_entries_are_reported_and_skipped(sample: Sample) -> None:
    assert sorted(e.entry_id for e in sample.entries) == sorted(ENTRIES)
    skipped = {row["entry_id"]: row["reason"] for row in sample.skipped}
    failures = {row["entry_id"]: row["reason"] for row in sample.failures}
    print("skipped:", skipped, "failures:", failures)
    assert "no non-solvent ligand" in skipped[NO_LIGAND]
    assert set(failures) == {"brok"} and failures["brok"].strip()
    table = summary_table(sample)
    assert "brok" in table and NO_LIGAND in table


def test_a_skip_is_remembered_by_key(sample: Sample, cifs: dict[str, Path]) -> None:
    settings = FeatureSettings(token_budget=BUDGET, seed=0)
    key = cache_key(cifs[NO_LIGAND].read_bytes(), settings)
    notes = list((sample.root / "features").glob("*.skipped.json"))
    assert [n.name for n in notes] == [f"{key}.skipped.json"]
    with pytest.raises(NoLigandError, match="no non-solvent ligand"):
        featurize_cached(cifs[NO_LIGAND], sample.root / "features", OfflineCcd(), settings)


def test_a_truncated_file_raises_a_reason(sample: Sample, tmp_path: Path, ccd: OfflineCcd) -> None:
    cif = tmp_path / "cut.cif"
    cif.write_text("data_CUT\n#\nloop_\n_atom_site.group_PDB\n")
    with pytest.raises(FeaturizationError) as err:
        build_features(cif, ccd, token_budget=BUDGET, seed=0)
    assert str(err.value)
    with pytest.raises(FeaturizationError, match="cannot read"):
        build_features(tmp_path / "absent.cif", ccd, token_budget=BUDGET, seed=0)


def test_limit_and_bad_options(tmp_path: Path) -> None:
    bad = tmp_path / "in"
    bad.mkdir()
    for name in ("aaaa", "zzzz"):
        (bad / f"{name}.cif").write_text(f"data_{name.upper()}\n#\n")
    cifs = {n: bad / f"{n}.cif" for n in ("aaaa", "zzzz")}
    report = prepare_sample(tmp_path / "out", 3, cifs=cifs, limit=1)
    assert [row["entry_id"] for row in report.sample.failures] == ["aaaa"]
    assert report.sample.entries == () and report.featurized == 0
    with pytest.raises(ConfigError, match="companies"):
        prepare_sample(tmp_path / "out", 0, cifs=cifs)
    with pytest.raises(ConfigError, match="not in the source"):
        prepare_sample(tmp_path / "out", 3, cifs=cifs, only=["9xyz"])
    with pytest.raises(ConfigError, match="token_budget"):
        prepare_sample(tmp_path / "out", 3, cifs=cifs, token_budget=4)


@pytest.mark.slow
def test_features_are_deterministic_and_cached_by_content(
    sample: Sample, cifs: dict[str, Path], ccd: OfflineCcd, tmp_path: Path
) -> None:
    cached = _entry(sample, "7bqu").features
    again = build_features(cifs["7bqu"], ccd, token_budget=BUDGET, seed=0)
    assert encode_feature_file(again) == cached.read_bytes()
    _assert_same(again.features, load_features(cached), "features")

    settings = FeatureSettings(token_budget=BUDGET, seed=0)
    data = cifs["7bqu"].read_bytes()
    assert cached.name == f"{cache_key(data, settings)}.safetensors"
    assert cache_key(data, FeatureSettings(token_budget=BUDGET + 16)) != cache_key(data, settings)
    assert cache_key(data, FeatureSettings(token_budget=BUDGET, seed=1)) != cache_key(
        data, settings
    )
    assert cache_key(data + b"\n", settings) != cache_key(data, settings)

    shutil.copy(cached, tmp_path / cached.name)
    hit = featurize_cached(cifs["7bqu"], tmp_path, ccd, settings)
    assert hit.hit and hit.path == tmp_path / cached.name


def _assert_same(a: object, b: object, where: str) -> None:
    """Exact equality of nested feature dicts (keys, dtypes, shapes, values)."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(map(str, a)) == sorted(map(str, b)), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    else:
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape) == (b.dtype, b.shape) and torch.equal(a, b), where


def test_all_zero_tensors_are_declared_not_stored(sample: Sample, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = _entry(sample, "3g32").features
    with safe_open(str(path), framework="pt") as f:
        header = json.loads(f.metadata()["foldfed"])
        stored = set(f.keys())
    assert "template_distogram" in header["zeros"] and "template_distogram" not in stored
    assert load_features(path)["template_distogram"].shape == (4, BUDGET, BUDGET, 39)
    assert path.stat().st_size < 1_500_000

    bomb = tmp_path / "bomb.safetensors"
    header["zeros"]["template_distogram"]["shape"] = [1 << 20, 1 << 20]
    save_file({"x": torch.zeros(1)}, str(bomb), metadata={"foldfed": json.dumps(header)})
    with pytest.raises(CodecError, match="too many"):
        load_batch(bomb)


def test_foreign_or_damaged_feature_files_are_refused(sample: Sample, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(CodecError, match="not a foldfed feature file"):
        load_batch(plain)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(_entry(sample, "3g32").features.read_bytes()[:1000])
    with pytest.raises(CodecError):
        load_batch(cut)
    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(2)}, str(other), metadata={"foldfed": '{"format": "v0"}'})
    with pytest.raises(CodecError, match="format 'v0'"):
        read_feature_info(other)


def test_open_sample_validates(sample: Sample, tmp_path: Path) -> None:
    assert open_sample(sample.root).entries == sample.entries
    with pytest.raises(StoreError, match="does not exist"):
        open_sample(tmp_path)
    manifest = json.loads((sample.root / "sample.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for mutate, reason in (
        (lambda m: m["entries"][0].update(split="test"), "split"),
        (lambda m: m["entries"][0].update(company="company-z"), "unknown company"),
        (lambda m: m["entries"][0].update(features="../../etc/passwd"), "outside"),
        (lambda m: m["entries"][0].pop("n_tokens"), "malformed"),
        (lambda m: m.update(format="other/9"), "format"),
    ):
        copy = json.loads(json.dumps(manifest))
        for e in copy["entries"]:
            e["features"] = str(sample.root / e["features"])
        mutate(copy)
        (bad / "sample.json").write_text(json.dumps(copy))
        with pytest.raises(StoreError, match=reason):
            open_sample(bad)
    with pytest.raises(ConfigError):
        sample.of("company-a", "test")


# ---------------------------------------------------------------------------------------
# Pure parts


def test_pocket_crop_keeps_the_ligand_then_the_nearest_tokens() -> None:
    rng = np.random.default_rng(0)
    protein = rng.normal(0.0, 10.0, size=(200, 3))
    ligand = np.array([[0.0, 0.0, 0.0], [1.5, 0.0, 0.0], [3.0, 0.0, 0.0]])
    centers = np.concatenate([protein, ligand])
    chosen = pocket_crop(centers, ligand, 20)
    assert len(chosen) == 20 and list(chosen) == sorted(chosen)
    assert {200, 201, 202} <= set(chosen.tolist())
    dist = np.sqrt(((protein[:, None] - ligand[None]) ** 2).sum(-1)).min(1)
    kept = [i for i in chosen if i < 200]
    assert dist[kept].max() <= np.delete(dist, kept).min()
    # a ligand larger than the budget keeps its middle
    assert pocket_crop(centers, ligand, 1).tolist() == [201]
    with pytest.raises(ValueError):
        pocket_crop(centers, ligand[:0], 5)


# ---------------------------------------------------------------------------------------
# The command


@pytest.mark.slow
def test_data_sample_command_reuses_the_cache(sample: Sample, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    shutil.copytree(sample.root / "features", out / "features")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "services"))
    args = ["data", "sample", "--out", str(out), "--companies", "3"]
    args += ["--token-budget", str(BUDGET), "--key", "test-key", "--entries", ",".join(ENTRIES)]
    done = subprocess.run(
        [sys.executable, "-m", "foldfed.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "featurized 0, reused 3" in done.stdout
    assert "company-a" in done.stdout and "failures: 0" in done.stdout
    prepared = open_sample(out)
    assert sorted(e.entry_id for e in prepared.entries) == sorted(ENTRIES)
    assert prepared.manifest["partition"]["key"] == "test-key"
    assert prepared.manifest["source"]["requirement"] == "plinder==0.2.27"
    summary = subprocess.run(
        [sys.executable, "-m", "foldfed.cli", "data", "summary", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert summary.returncode == 0 and "total" in summary.stdout


def test_primary_ligand_rule() -> None:
    def lig(chain: str, heavy: int, ok: bool = True) -> LigandInfo:
        return LigandInfo(chain, f"L{chain}", (f"L{chain}",), heavy, ok)

    # the largest that fits in half the budget; ties to the first chain
    assert select_primary_ligand([lig("1", 20), lig("2", 30), lig("3", 30)], 64).chain_id == "2"
    assert select_primary_ligand([lig("1", 20), lig("2", 40)], 64).chain_id == "1"
    # none fits: the smallest
    assert select_primary_ligand([lig("1", 50), lig("2", 40)], 64).chain_id == "2"
    # solvents and ions never count
    assert select_primary_ligand([lig("1", 60, False), lig("2", 7)], 64).chain_id == "2"
    with pytest.raises(FeaturizationError):
        select_primary_ligand([lig("1", 9, False)], 64)


def test_extract_entries_reads_only_entry_files(tmp_path: Path) -> None:
    import gzip
    import io
    import tarfile

    sdist = tmp_path / "plinder.tar.gz"
    good = "plinder-0.2.27/tests/test_data/xx/pdb_00001abc/pdb_00001abc_xyz-enrich.cif.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, body in (
            (good, b"data_1ABC\n"),
            ("plinder-0.2.27/tests/test_data/xx/pdb_00001abc/../../../../x.cif.gz", b"no"),
            ("plinder-0.2.27/README.md", b"readme"),
        ):
            data = gzip.compress(body)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(good.replace("1abc", "2abc"))
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    out = plinder.extract_entries(sdist, tmp_path / "cif")
    assert out == {"1abc": tmp_path / "cif" / "1abc.cif"}
    assert out["1abc"].read_bytes() == b"data_1ABC\n"
    assert sorted(p.name for p in (tmp_path / "cif").iterdir()) == ["1abc.cif"]
    (tmp_path / "bad.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(plinder.SourceError):
        plinder.extract_entries(tmp_path / "bad.tar.gz", tmp_path / "cif2")
