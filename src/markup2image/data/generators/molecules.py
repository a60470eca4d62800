"""SMILES drawn from real molecule sets: MOSES (shipped in the ``molsets`` wheel) or RDKit's bundled NCI set.

The MOSES CSVs are read straight from the installed wheel's data folder (``moses/dataset/data/*.csv.gz``) through
``importlib.metadata``; the ``moses`` package itself is never imported (it pulls old dependencies). Without
``molsets`` the pool falls back to the first 5,000 NCI molecules that ship with RDKit, with a logged line saying so.
"""

from __future__ import annotations

import functools
import gzip
import importlib.metadata
import logging
import random
from pathlib import Path

log = logging.getLogger(__name__)

MOSES_FILES = ("moses/dataset/data/train.csv.gz", "moses/dataset/data/test.csv.gz")


def moses_csv_paths() -> list[Path]:
    """The MOSES CSV files of the installed ``molsets`` wheel ([] when it is not installed)."""
    try:
        dist = importlib.metadata.distribution("molsets")
    except importlib.metadata.PackageNotFoundError:
        return []
    files = {str(f): f for f in dist.files or []}
    return [Path(files[name].locate()) for name in MOSES_FILES if name in files]


def nci_smiles() -> list[str]:
    """RDKit's bundled NCI sample (``Data/NCI/first_5K.smi``): small, always there, used by the tests."""
    from rdkit import RDConfig

    path = Path(RDConfig.RDDataDir) / "NCI" / "first_5K.smi"
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _read_smiles_csv(path: Path) -> list[str]:
    with gzip.open(path, "rt") as fh:
        header = fh.readline().strip().split(",")
        col = header.index("SMILES") if "SMILES" in header else 0
        return [row.split(",")[col].strip() for row in fh if row.strip()]


@functools.lru_cache(maxsize=1)
def smiles_pool() -> tuple[str, ...]:
    """All SMILES to draw from, in file order (MOSES train then test; NCI if molsets is missing)."""
    paths = moses_csv_paths()
    if not paths:
        log.warning(
            "molsets is not installed: molecules come from RDKit's 5,000-molecule NCI sample instead of MOSES "
            "(pip install --no-deps molsets==0.3.1 for the MOSES SMILES)"
        )
        return tuple(nci_smiles())
    pool: list[str] = []
    for path in paths:
        pool += _read_smiles_csv(path)
    return tuple(pool)


def generate_molecule(rng: random.Random) -> str:
    """One SMILES drawn uniformly from :func:`smiles_pool`."""
    pool = smiles_pool()
    return pool[rng.randrange(len(pool))]
