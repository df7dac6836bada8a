"""CryoSiam networks, presets, losses and checkpoints.

>>> from cryosiam_nb import models
>>> model = models.build("semantic", preset="tiny")          # untrained
>>> model = models.load("published_semantic.ckpt")          # CryoSiam v1.0 or ours
>>> out = model(x)          # x: (N, 1, Z, Y, X) float32 in [0, 1]; dict of raw head outputs
>>> emb = model.backbone(x) # (N, D, Z, Y, X) dense embedding
>>> models.save(model, "my.pt", voxel_size=10.0, metrics={"dice": 0.8})
"""

from cryosiam_nb.constants import TASKS

from . import losses
from .checkpoints import (
    WEIGHTS_DIR,
    export_lightning,
    list_models,
    load,
    load_checkpoint_dict,
    save,
)
from .networks import CryoSiamModel, DenseSimSiam, MultiTaskHeads, SimSiam, TaskHeads
from .presets import PRESETS, build, build_from_config, combine

__all__ = [
    "export_lightning",
    "build",
    "build_from_config",
    "combine",
    "load",
    "save",
    "list_models",
    "load_checkpoint_dict",
    "CryoSiamModel",
    "DenseSimSiam",
    "SimSiam",
    "TaskHeads",
    "MultiTaskHeads",
    "PRESETS",
    "TASKS",
    "WEIGHTS_DIR",
    "losses",
]
