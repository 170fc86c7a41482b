"""The engine: config dataclasses, the one training loop, checkpoints, memory measurement.

See mdpd_vl/README.md for the contracts. Names load lazily so that `import mdpd_vl.engine` does
not import torch until a training or memory function is used. The loop itself is
`from mdpd_vl.engine.train import train` (`mdpd_vl.engine.train` is the module).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "config",
    "load_config": "config",
    "dump_config": "config",
    "save_config": "config",
    "config_to_yaml": "config",
    "add_config_arguments": "config",
    "TrainResult": "train",
    "NonFiniteLossError": "train",
    "lr_multiplier": "train",
    "latest_checkpoint": "checkpoint",
    "SavedTensorsMeter": "memory",
    "PeakMemory": "memory",
    "measure_train_state": "memory",
    "gib": "memory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mdpd_vl.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mdpd_vl.engine.{_EXPORTS[name]}"), name)
