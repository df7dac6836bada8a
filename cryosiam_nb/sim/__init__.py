"""Synthetic cryo-ET tomograms with complete ground truth (a CryoETSim-like simulator).

>>> from cryosiam_nb import sim
>>> s = sim.simulate((64, 128, 128), voxel_size=10.0, sample="general", seed=0)
>>> s.volumes            # xarray.Dataset: clean, noisy, semantic, instances, lamella
>>> s.particles          # pandas.DataFrame: id, species, size_category, z, y, x, ...
>>> sim.write_dataset("data/sim", n=8, shape=(64, 128, 128), seed=0)

Arrays are (z, y, x); voxel sizes and coordinates in Å; particle centres in voxels.
"""

from cryosiam_nb.constants import KDA_CATEGORIES, SEMANTIC_CLASSES, SIZE_CATEGORIES, size_category

from .core import MODES, SAMPLES, Simulation, simulate
from .dataset import dataset_table, read_dataset, write_dataset
from .shapes import SPECIES, species_table

__all__ = [
    "simulate",
    "Simulation",
    "write_dataset",
    "read_dataset",
    "dataset_table",
    "SEMANTIC_CLASSES",
    "SIZE_CATEGORIES",
    "KDA_CATEGORIES",
    "SPECIES",
    "SAMPLES",
    "MODES",
    "size_category",
    "species_table",
]
