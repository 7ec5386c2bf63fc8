"""OpenFold3 presets, fine-tuning modes and checkpoints, on the real model (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from foldfed.errors import ConfigError
from foldfed.of3.checkpoint import CheckpointError, load_into, read_checkpoint
from foldfed.of3.finetune import CONFIDENCE_MODULES, FinetuneMode, apply_mode, trainable_names
from foldfed.of3.presets import (
    build_model,
    count_parameters,
    model_config,
    parse_overrides,
    size_of_model,
)
from foldfed.of3.training import load_trainable, trainable_state

FULL_PARAMETERS = 368_293_788


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return build_model(model_config("tiny"), seed=3)


def test_tiny_is_about_a_million_parameters(tiny: torch.nn.Module) -> None:
    n = sum(p.numel() for p in tiny.parameters())
    assert 500_000 < n < 1_500_000
    assert count_parameters(model_config("tiny")) == n


def test_run_settings_make_rounds_deterministic() -> None:
    cfg = model_config("tiny")
    assert cfg.architecture.shared.num_recycles == 0
    assert cfg.settings.memory.eval.use_triton_triangle_kernels is False
    # Shared widths reach every module (FieldReferences).
    assert cfg.architecture.pairformer.c_s == 64
    assert cfg.architecture.heads.pairformer_embedding.pairformer.c_z == 32


def test_the_same_seed_builds_the_same_weights(tiny: torch.nn.Module) -> None:
    again = build_model(model_config("tiny"), seed=3)
    other = build_model(model_config("tiny"), seed=4)
    names = [n for n, _ in tiny.named_parameters()]
    a, b, c = (trainable_state(m, names) for m in (tiny, again, other))
    assert all(torch.equal(a[n], b[n]) for n in names)
    assert any(not torch.equal(a[n], c[n]) for n in names)


@pytest.mark.slow
def test_full_preset_is_the_published_architecture() -> None:
    assert count_parameters(model_config("full")) == FULL_PARAMETERS


def test_overrides_reach_the_config_and_bad_ones_are_named() -> None:
    cfg = model_config("tiny", parse_overrides('{"architecture.pairformer.no_blocks": 2}'))
    assert cfg.architecture.pairformer.no_blocks == 2
    with pytest.raises(ConfigError, match="no such config key"):
        model_config("tiny", {"architecture.pairformer.no_blockz": 2})
    with pytest.raises(ConfigError, match="no config section"):
        model_config("tiny", {"architecture.nope.x": 2})
    with pytest.raises(ConfigError, match="not JSON"):
        parse_overrides("{")
    with pytest.raises(ConfigError, match="JSON object"):
        parse_overrides("[1]")
    with pytest.raises(ConfigError, match="unknown OpenFold3 model"):
        size_of_model("openfold3-huge")


def test_finetune_modes_select_parameters(tiny: torch.nn.Module) -> None:
    names = [n for n, _ in tiny.named_parameters()]
    assert trainable_names(names, FinetuneMode.parse("all")) == names
    conf = trainable_names(names, FinetuneMode.parse("confidence"))
    assert conf and all(n.startswith(CONFIDENCE_MODULES) for n in conf)
    assert not any(n.startswith("aux_heads.distogram") for n in conf)
    chosen = trainable_names(names, FinetuneMode.parse("prefixes:aux_heads.pde,linear_s"))
    assert set(chosen) == {n for n in names if n.startswith(("aux_heads.pde.", "linear_s."))}
    with pytest.raises(ConfigError, match="matches no parameter"):
        trainable_names(names, FinetuneMode.parse("prefixes:aux_heads.nope"))
    with pytest.raises(ConfigError, match="expected all, confidence"):
        FinetuneMode.parse("lora")
    assert FinetuneMode.parse("confidence").confidence_only


def test_apply_mode_freezes_the_rest() -> None:
    model = build_model(model_config("tiny", confidence_only=True), seed=1)
    trainable = apply_mode(model, FinetuneMode.parse("confidence"))
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert grads == set(trainable)
    n_conf = sum(p.numel() for n, p in model.named_parameters() if n in grads)
    assert 0 < n_conf < sum(p.numel() for p in model.parameters())


def test_checkpoint_round_trip_safetensors_and_torch(tmp_path: Path, tiny: torch.nn.Module) -> None:
    source = build_model(model_config("tiny"), seed=11)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    # A released checkpoint stores each shared tensor under both names: keep one of them.
    safe = tmp_path / "weights.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("sample_diffusion.")}, safe)
    target = build_model(model_config("tiny"), seed=12)
    load_into(target, read_checkpoint(safe), "weights")
    names = [n for n, _ in target.named_parameters()]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            trainable_state(target, names).values(),
            trainable_state(source, names).values(),
            strict=True,
        )
    )
    # A Lightning-style checkpoint: EMA weights win, as in OpenFold3's own inference.
    ema = {k: v + 1.0 for k, v in state.items()}
    ckpt = tmp_path / "last.ckpt"
    torch.save(
        {
            "state_dict": {"model." + k: v for k, v in state.items()},
            "ema": {"params": ema, "decay": 0.999},
        },
        ckpt,
    )
    load_into(target, read_checkpoint(ckpt), "last.ckpt")
    first = names[0]
    assert torch.equal(dict(target.named_parameters())[first].detach(), ema[first])


def test_bad_checkpoints_are_refused_with_a_reason(tmp_path: Path, tiny: torch.nn.Module) -> None:
    state = {k: v.clone() for k, v in tiny.state_dict().items()}
    name = next(iter(n for n, _ in tiny.named_parameters()))
    missing = dict(state)
    del missing[name]
    with pytest.raises(CheckpointError, match="missing from it"):
        load_into(tiny, missing, "ckpt")
    with pytest.raises(CheckpointError, match="does not have"):
        load_into(tiny, {**state, "extra.weight": torch.zeros(1)}, "ckpt")
    wrong = dict(state)
    wrong[name] = torch.zeros(7, 7)
    with pytest.raises(CheckpointError, match="has shape"):
        load_into(tiny, wrong, "ckpt")
    # Pickled objects are never unpickled (weights_only=True).
    evil = tmp_path / "evil.pt"
    torch.save({"weights": state, "path": Path("/etc")}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(evil)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        read_checkpoint(junk)
    with pytest.raises(ConfigError, match="not a file"):
        read_checkpoint(tmp_path / "absent.pt")


def test_load_trainable_checks_the_names(tiny: torch.nn.Module) -> None:
    names = [n for n, _ in tiny.named_parameters()][:3]
    state = trainable_state(tiny, names)
    load_trainable(tiny, names, state)
    with pytest.raises(Exception, match="does not match the trainable parameters"):
        load_trainable(tiny, names, {names[0]: state[names[0]]})
