"""Side networks (UniPT, SHERL, LST). See README.md here and mdpd_vl/README.md for the contracts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mdpd_vl.backbones.base import Backbone, LayerSpec
from mdpd_vl.registry import Registry
from mdpd_vl.side.base import SideNetwork, SideOutput
from mdpd_vl.side.blocks import BlockRunner
from mdpd_vl.side.config import LSTConfig, SHERLConfig, SideConfig, SideConfigError, UniPTConfig
from mdpd_vl.side.lst import LST
from mdpd_vl.side.sherl import SHERL
from mdpd_vl.side.unipt import UniPT

SIDE_NETWORKS: Registry[tuple[type[SideConfig], type[SideNetwork]]] = Registry("side network")
SIDE_NETWORKS.register("unipt", (UniPTConfig, UniPT))
SIDE_NETWORKS.register("sherl", (SHERLConfig, SHERL))
SIDE_NETWORKS.register("lst", (LSTConfig, LST))


def side_config(name: str, cfg: SideConfig | Mapping[str, Any] | None = None) -> SideConfig:
    """The config object of side network `name` from a dict, an instance or None (defaults)."""
    cfg_cls, _ = SIDE_NETWORKS.get(name, field="side")
    if cfg is None:
        return cfg_cls()
    if isinstance(cfg, Mapping):
        unknown = sorted(set(cfg) - set(cfg_cls.field_names()))
        if unknown:
            raise SideConfigError(f"unknown keys {unknown}; valid: {', '.join(cfg_cls.field_names())}",
                                  field=cfg_cls.__name__)
        return cfg_cls(**cfg)
    if not isinstance(cfg, cfg_cls):
        raise SideConfigError(f"side network {name!r} needs a {cfg_cls.__name__}, got {type(cfg).__name__}",
                              field="side")
    return cfg


def build_side(name: str, specs: list[LayerSpec], cfg: SideConfig | Mapping[str, Any] | None = None,
               backbone: Backbone | None = None) -> SideNetwork:
    """Build side network `name` over layers `specs` (e.g. `backbone.layer_specs`)."""
    _, net_cls = SIDE_NETWORKS.get(name, field="side")
    return net_cls(list(specs), side_config(name, cfg), backbone)  # type: ignore[call-arg]


__all__ = [
    "LST", "SHERL", "BlockRunner", "SIDE_NETWORKS", "LSTConfig", "SHERLConfig", "SideConfig", "SideConfigError",
    "SideNetwork", "SideOutput", "UniPT", "UniPTConfig", "build_side", "side_config",
]
