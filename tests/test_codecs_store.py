"""The durable residual file: round trip, atomic replace, torn and corrupt files rejected."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from foldfed.codecs import Residual
from foldfed.codecs_store import MAGIC, ResidualStore
from foldfed.errors import StoreError


def sample(step: int = 3, n: int = 1000) -> Residual:
    values = np.random.default_rng(step).standard_normal(n).astype(np.float32)
    return Residual(cycle=2, step=step, values=values)


def test_round_trip_and_replace(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / "residual.bin")
    assert store.load() is None
    store.save(sample(3))
    got = store.load()
    assert got is not None and (got.cycle, got.step) == (2, 3)
    assert got.values.tobytes() == sample(3).values.tobytes()
    store.save(sample(4, n=10))
    got = store.load()
    assert got is not None and got.step == 4 and got.values.size == 10
    assert [p.name for p in tmp_path.iterdir()] == ["residual.bin"]  # no temporary left


def test_empty_residual(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / "r")
    store.save(Residual(0, 0, np.zeros(0, dtype=np.float32)))
    got = store.load()
    assert got is not None and got.values.size == 0


def test_layout_is_raw_little_endian(tmp_path: Path) -> None:
    path = tmp_path / "r"
    ResidualStore(path).save(Residual(1, 7, np.array([1.0, -2.0], dtype=np.float32)))
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    header_len = int.from_bytes(data[8:12], "little")
    header = data[12 : 12 + header_len]
    assert header == b'{"cycle":1,"dtype":"<f4","elements":2,"format":1,"step":7}'
    assert data[12 + header_len : -32] == np.array([1.0, -2.0], dtype="<f4").tobytes()


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: d[:-1], "torn"),
        (lambda d: d[: len(d) // 2], "torn"),
        (lambda d: d + b"\0", "torn"),
        (lambda d: d[:5], "magic"),
        (lambda d: b"XXXXXXXX" + d[8:], "magic"),
        (lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "digest"),
        (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "digest"),
        (lambda d: d[:12] + b"[" + d[13:], "header"),
    ],
)
def test_damaged_files_are_rejected(tmp_path: Path, damage, reason: str) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "r"
    ResidualStore(path).save(sample())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StoreError, match=reason):
        ResidualStore(path).load()


def test_a_residual_written_in_pieces_is_the_one_save_writes(tmp_path: Path) -> None:
    whole, pieces = ResidualStore(tmp_path / "whole"), ResidualStore(tmp_path / "pieces")
    residual = sample(5, n=1001)
    whole.save(residual)
    writer = pieces.writer(residual.cycle, residual.step, residual.values.size)
    for begin in range(0, 1001, 97):
        writer.write(residual.values[begin : begin + 97])
    assert not pieces.path.exists()  # nothing replaces the stored residual before commit
    writer.commit()
    assert pieces.path.read_bytes() == whole.path.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pieces", "whole"]


def test_an_uncommitted_writer_leaves_the_old_residual(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / "r")
    store.save(sample(3))
    writer = store.writer(2, 4, 1000)
    writer.write(sample(4).values[:500])
    with pytest.raises(ValueError, match="500 of 1000"):
        writer.commit()
    writer.discard()
    got = store.load()
    assert got is not None and got.step == 3
    assert [p.name for p in tmp_path.iterdir()] == ["r"]


def test_a_reader_checks_the_whole_file_then_reads_slices(tmp_path: Path) -> None:
    store = ResidualStore(tmp_path / "r")
    assert store.open() is None
    residual = sample(6, n=3000)
    store.save(residual)
    with store.open() as reader:  # type: ignore[union-attr]
        assert (reader.cycle, reader.step, reader.elements) == (2, 6, 3000)
        assert reader.read(1000, 1234).tobytes() == residual.values[1000:1234].tobytes()
        assert reader.read(0, 0).size == 0
        with pytest.raises(ValueError):
            reader.read(2999, 3001)
    data = bytearray(store.path.read_bytes())
    data[-40] ^= 1  # a value's byte: only the digest over the whole file sees it
    store.path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="digest mismatch"):
        store.open()
