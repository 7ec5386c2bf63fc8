"""An offline chemical-components dictionary (CCD) for OpenFold3's preprocessing.

OpenFold3 reads the CCD as a `CIFFile` with one block per component
(`ccd["ATP"]["chem_comp_atom"]["atom_id"]`) and, for reference molecules, serializes a
component's block to text for pdbeccdutils (`ccd["ATP"].serialize()`). Its own route to a
CCD downloads `components.cif` from the PDB, which this project never does. biotite ships
the whole CCD offline (`biotite/structure/info/components.bcif`) as one BinaryCIF block with
a row index per component; `biotite.structure.info.get_from_ccd` reads one component's rows.

`OfflineCcd` regroups those rows on demand: indexing it with a component id builds that
component's block (chem_comp, chem_comp_atom, chem_comp_bond, as text columns) and keeps
it in memory. Measured here: the first lookup of a process loads biotite's file (~3.3 s
CPU); each block after that takes ~3 ms. Nothing is cached on disk: regrouping the whole
dictionary up front (~18 s) or reading it back would cost more than the few dozen
components an entry uses, and the per-process cost is paid once per `foldfed data sample`.

The CCD version is biotite's; `ccd_version()` names it (it is part of the feature cache
key, so features made with another CCD are never reused).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

CATEGORIES = ("chem_comp", "chem_comp_atom", "chem_comp_bond")


def ccd_version() -> str:
    """The CCD in use: biotite's version (biotite bundles one CCD per release)."""
    import biotite

    return f"biotite-{biotite.__version__}"


class OfflineCcd:
    """`ccd[component_id][category]`, like a per-component CCD `CIFFile`, from biotite.

    Unknown component ids raise `KeyError` (as OpenFold3 expects of a CIFFile); `get`
    returns a default instead. Not thread-safe (one per worker).
    """

    def __init__(self) -> None:
        self._blocks: dict[str, Any] = {}

    @cached_property
    def _known(self) -> frozenset[str]:
        from biotite.structure import info

        return frozenset(info.all_residues())

    def __contains__(self, component_id: object) -> bool:
        return isinstance(component_id, str) and component_id in self._known

    def __getitem__(self, component_id: str) -> Any:
        block = self._blocks.get(component_id)
        if block is None:
            if component_id not in self:
                raise KeyError(f"component {component_id!r} is not in the CCD ({ccd_version()})")
            block = _component_block(component_id)
            self._blocks[component_id] = block
        return block

    def get(self, component_id: str, default: Any = None) -> Any:
        try:
            return self[component_id]
        except KeyError:
            return default


def _component_block(component_id: str) -> Any:
    from biotite.structure import info
    from biotite.structure.io import pdbx

    block = pdbx.CIFBlock()
    for name in CATEGORIES:
        binary = info.get_from_ccd(name, component_id)
        if binary is not None:
            block[name] = _text_category(binary)
    return block


def _text_category(binary: Any) -> Any:
    """A BinaryCIF category as a text CIF category (masks kept: '.' and '?' stay)."""
    from biotite.structure.io import pdbx

    columns = {}
    for name in binary.keys():
        column = binary[name]
        mask = None if column.mask is None else pdbx.CIFData(column.mask.array)
        columns[name] = pdbx.CIFColumn(pdbx.CIFData(column.as_array(str)), mask)
    return pdbx.CIFCategory(columns)
