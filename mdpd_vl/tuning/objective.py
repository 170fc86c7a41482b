"""The training objective of a run, in words (for model cards and tables).

Config keys alone can read as contradictions (`distill.logits: mse` next to
`retrieval.backbone_task: true`); `describe_objective` states what is actually optimised: which path
the task loss trains, how the backbone path learns from the side path, which feature losses run,
what trains in the backbone, the teacher, the schedule, the frozen-backbone mode and what is served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from mdpd_vl.tuning.config import MethodConfig

_NAMES = {"linear": "linear probe", "full": "full fine-tuning", "partial": "norm-only tuning (partial)",
          "bitfit": "BitFit", "lora": "LoRA", "adalora": "AdaLoRA", "ia3": "IA3", "adapter": "Houlsby adapters",
          "unipt": "UniPT (side kept)", "sherl": "SHERL (side kept)", "lst": "LST (side kept)", "mdpd": "MDPD"}
_TRAINABLE = {"head": "only the backbone head W_B (no backward through the backbone)",
              "norms_last_k": "W_B and the norm layers of the last {k} backbone block(s)",
              "norms_all": "W_B and the norm layers of every backbone block (the paper)",
              "norms_biases": "W_B, the norm layers and every bias inside the backbone blocks",
              "lowrank": "W_B and low-rank deltas (rank {r}, scale {alpha:g}/{r}) on the backbone blocks' linear layers"}


def _as_dict(extra: Any) -> dict[str, Any]:
    if extra is None:
        return {}
    if dataclasses.is_dataclass(extra) and not isinstance(extra, type):
        return dataclasses.asdict(extra)
    return dict(extra) if isinstance(extra, Mapping) else {}


def _task_phrase(task: dict[str, Any]) -> str:
    """The task loss in words, from a task config's keys (retrieval: loss / margin / temperatures)."""
    if "task_loss" in task:
        return str(task["task_loss"])
    if task.get("loss") == "infonce":
        return f"the symmetric InfoNCE loss (temperature {task.get('infonce_temperature', '?')})"
    if task.get("loss") == "vse":
        return f"the VSE hinge triplet loss (margin {task.get('margin', '?')}, hardest negative after warm-up)"
    return "the task loss"


def _weight(w: float) -> str:
    return f"{w:g}"


def describe_objective(method_cfg: MethodConfig, extra: Any = None) -> str:
    """One paragraph stating the run's objective in words.

    `extra` is the task's config (a dataclass or mapping), read for the task-level terms: `loss`,
    `margin`, `infonce_temperature` or a ready `task_loss` phrase, and for two-tower MDPD
    `backbone_task`, `cross_relational`, `rel_temperature`, and `answer_distillation` (a phrase: the
    term by which the backbone path learns from the side path when the task computes it itself).
    """
    cfg, task = method_cfg, _as_dict(extra)
    loss = _task_phrase(task)
    name = _NAMES.get(cfg.name, cfg.name)
    mode = (f"Frozen backbone parts run in {cfg.backbone_mode} mode"
            + (" (dropout off, BatchNorm statistics frozen)." if cfg.backbone_mode == "eval"
               else " (dropout as in training, BatchNorm statistics frozen)."))
    if cfg.name != "mdpd":
        what = {"lora": f"rank {cfg.lora_r}, scale {cfg.lora_alpha:g}/{cfg.lora_r}",
                "adapter": f"bottleneck {cfg.adapter_dim}",
                "unipt": f"r={cfg.r}", "sherl": f"r={cfg.r}", "lst": f"r={cfg.r}"}.get(cfg.name)
        served = {"lora": "merged into the weights", "adalora": "merged into the weights",
                  "ia3": "merged into the weights", "adapter": "with the adapters (they cannot merge)",
                  "unipt": "with the side network kept", "sherl": "with the side network kept",
                  "lst": "with the side network kept"}.get(cfg.name, "as the bare architecture + head")
        head = f"{name}{f' ({what})' if what else ''}: {loss} on the model's own output; served {served}."
        return head if cfg.name == "full" else f"{head} {mode}"
    d = cfg.distill
    side_name = {"unipt": "UniPT", "sherl": "SHERL", "lst": "LST"}.get(cfg.side_network, cfg.side_network)
    side = f"a {side_name} side network (r={cfg.r}{f', d={cfg.d}' if cfg.d else ''})"
    two_tower = "backbone_task" in task or "cross_relational" in task
    backbone_task = bool(task.get("backbone_task")) if two_tower else d.task_on_backbone
    w = "" if two_tower else f" (weight {_weight(d.task_weight)})"  # two-tower tasks add it unweighted
    parts = [f"MDPD with {side}. Task loss: {loss} on the side path{w}"
             + (f" and on the backbone path{w}." if backbone_task else "; the backbone path gets no task loss.")]
    teacher = (f"an EMA copy of the side path (decay {d.ema_teacher:g}, updated every optimiser step)"
               if d.ema_teacher is not None else "the live side path (detached)")
    learns = []
    rel = float(task.get("cross_relational", 0) or 0)
    if two_tower and rel > 0:
        learns.append(f"the cross-modal relational KL of the image-text similarity distributions (weight "
                      f"{_weight(rel)}, temperature {task.get('rel_temperature', '?')})")
    if task.get("answer_distillation"):  # a task that computes its own logits term (VQA's answer KL)
        learns.append(str(task["answer_distillation"]))
    if d.logits == "mse":
        learns.append(f"the per-tower logits MSE of paper eq. 3 (weight {_weight(d.logits_weight)}, sum-reduced)")
    elif d.logits == "relational":
        learns.append(f"the per-tower in-batch relational KL (weight {_weight(d.logits_weight)}, "
                      f"temperature {d.temperature:g})")
    if d.feature_logits > 0:
        learns.append(f"the last-layer feature regression of b_L onto the side network's output tokens (weight "
                      f"{_weight(d.feature_logits)}, sum-reduced, through a regressor dropped at fading)")
    if learns:
        parts.append(f"The backbone path learns from {teacher} by " + " and ".join(learns) + ".")
    else:
        parts.append("The backbone path gets no distillation term from the side path.")
    layers = "every layer" if d.feature_layers == "all" else f"layers {d.feature_layers}"
    parts.append(f"Feature distillation (backbone teaches side) over {layers}: the shallowest {d.split:.0%} "
                 f"imitate (weight {_weight(d.shallow_weight)}), the rest regenerate masked tokens (mask ratio "
                 f"{d.mask_ratio:g}, weight {_weight(d.deep_weight)}).")
    trains = _TRAINABLE[d.backbone_trainable].format(k=d.last_k, r=d.lowrank_r, alpha=d.lowrank_alpha)
    parts.append(f"In the backbone, {trains} train{'s' if d.backbone_trainable == 'head' else ''}"
                 + (f", with activation checkpointing ({'all' if d.checkpointing is True else d.checkpointing})"
                    if d.checkpointing not in (False, None, "none") else "")
                 + (" (the deltas are merged into the weights when faded: the bare architecture)"
                    if d.backbone_trainable == "lowrank" else "") + ".")
    warmup = (f"the first {d.side_warmup_steps} optimiser steps train the side path only, then "
              if d.side_warmup_steps else "")
    parts.append("Schedule: " + warmup + ("joint (every loss every step)." if d.schedule == "joint" else
                                          "alternate (even optimiser steps train the side path, odd steps the "
                                          "backbone path)."))
    hl = d.head_layers
    reads = ("; ".join(f"{tower} tower: {_reads(spec)}" for tower, spec in hl.items())
             + "; other towers: W_B reads the last layer" if isinstance(hl, dict) else _reads(hl))
    parts.append(mode + f" Served faded: the backbone + W_B only; {reads}.")
    return " ".join(parts)


def _reads(hl: str | list[int]) -> str:
    """What W_B reads under one `head_layers` value, in words."""
    which = (f"the {int(hl[5:]) - 1} layer(s) before it" if isinstance(hl, str) and hl.startswith("last_") else
             "every earlier layer" if hl == "all" else f"layers {hl}")
    return ("W_B reads the last layer" if hl == "last" else
            f"W_B reads the last layer plus the pooled features of {which} (head_layers: {hl})")
