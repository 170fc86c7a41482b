"""Houlsby-style adapters (peft has none): x + up(GELU(down(x))), inserted by module replacement.

Where they go, found by module type in each backbone block:
- transformer blocks: after the output projection of the attention sub-layer and of the MLP
  sub-layer, i.e. before the residual addition (and, in post-LN BERT, before dropout + residual +
  LayerNorm, exactly where Houlsby et al. put them). open_clip's `nn.MultiheadAttention` is
  wrapped whole; see `_transformer_sites`;
- CNN stages (timm ResNet / EfficientNet): after each block of the stage, on channels. A layer
  that is not a sequence of blocks (EfficientNet's final `bn2`) gets none.
The up projection starts at zero, so the tuned model starts equal to the backbone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from mdpd_vl.backbones.base import Backbone
from mdpd_vl.errors import UserError


class Adapter(nn.Module):
    """Bottleneck adapter on the last (token) or channel (map) axis, identity at initialisation."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.down = nn.Linear(width, dim)
        self.act = nn.GELU()
        self.up = nn.Linear(dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    @staticmethod
    def num_params(width: int, dim: int) -> int:
        """2 * width * dim + dim + width."""
        return 2 * width * dim + dim + width

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:  # B x C x H x W: adapt channels
            return x + self.up(self.act(self.down(x.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2)
        return x + self.up(self.act(self.down(x)))


class Adapted(nn.Module):
    """`module` followed by an adapter; a tuple output (attention) adapts its first element."""

    def __init__(self, module: nn.Module, adapter: Adapter):
        super().__init__()
        self.module = module
        self.adapter = adapter

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:  # code that reads attributes of the wrapped module keeps working
            return getattr(self._modules["module"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.module(*args, **kwargs)
        if isinstance(out, tuple):
            return (self.adapter(out[0]), *out[1:])
        return self.adapter(out)


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


def _transformer_sites(block: nn.Module, width: int) -> list[tuple[nn.Module, str, int]]:
    """(parent, attribute, width) of each sub-layer output that gets an adapter.

    Per direct child of the block (the attention and the MLP sub-layers): an
    `nn.MultiheadAttention` is wrapped whole (its output projection is not a called module);
    otherwise the child's last Linear that writes the block width (its output projection:
    BERT `attention.output.dense` / `output.dense`, open_clip `mlp.c_proj`, CLIP `out_proj` /
    `fc2`). Children without such a Linear (BERT's `intermediate`, norms) get none.
    """
    sites: list[tuple[nn.Module, str, int]] = []
    for name, child in block.named_children():
        if isinstance(child, nn.MultiheadAttention):
            sites.append((block, name, child.embed_dim))
            continue
        in_mha = {id(m) for a in child.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules()}
        found = [
            (n, m)
            for n, m in child.named_modules()
            if isinstance(m, nn.Linear) and m.out_features == width and id(m) not in in_mha
        ]
        if not found:
            continue
        path = found[-1][0]
        if not path:  # the child is itself the Linear
            sites.append((block, name, width))
            continue
        parent_name, _, attr = path.rpartition(".")
        sites.append((child.get_submodule(parent_name) if parent_name else child, attr, width))
    return sites


def insert_adapters(backbone: Backbone, dim: int) -> list[nn.Parameter]:
    """Insert adapters (bottleneck `dim`, capped at each site's width) in place; return their parameters."""
    params: list[nn.Parameter] = []
    for index, block in enumerate(backbone.blocks):
        width = backbone.layer_specs[index].width
        if backbone.layer_specs[index].grid is not None and not _linears(block):
            # a CNN stage: adapt the output of each of its blocks (all have the stage's width)
            blocks = block.named_children() if isinstance(block, nn.Sequential) else []
            sites = [(block, name, width) for name, _ in blocks]
        else:
            sites = _transformer_sites(block, width)
            if not sites:
                raise UserError(
                    f"cannot find attention/MLP sub-layers for adapters in {type(block).__name__}",
                    field="method.name",
                )
        for parent, name, site_width in sites:
            adapter = Adapter(site_width, min(dim, site_width))
            setattr(parent, name, Adapted(getattr(parent, name), adapter))
            params.extend(adapter.parameters())
    return params
