"""Checks of `mdpd_vl.dist` on two processes; run by test_multiproc_dist.py under
`torchrun --standalone --nproc_per_node 2 tests/_dist_worker.py OUT`.

Each process writes `OUT/rank-<r>.json` with what it measured; the test compares. The references
are computed by every process on the whole batch, as one process would."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import nn

from mdpd_vl import dist
from mdpd_vl.errors import UserError
from mdpd_vl.heads.retrieval import relational_kl_2d
from mdpd_vl.heads.vse_loss import info_nce, vse_loss
from mdpd_vl.side.unipt import TokenBatchNorm

B, D = 8, 6  # global batch, width


def _mean_grads(params: list[nn.Parameter], world: int) -> list[torch.Tensor]:
    """What the engine (or DDP) does with the gradients: average over processes."""
    out = []
    for p in params:
        g = p.grad.clone()
        torch.distributed.all_reduce(g)
        out.append(g / world)
    return out


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def _losses(img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """VSE (hardest negatives), InfoNCE and the relational KL: every in-batch term ITR uses."""
    sim = nn.functional.normalize(img, dim=-1) @ nn.functional.normalize(txt, dim=-1).t()
    return vse_loss(img, txt, 0.2, max_violation=True, image_ids=ids) + info_nce(img, txt, 0.05, ids) + \
        relational_kl_2d(sim.detach() * 0.5, sim, 0.05)


def check_gather(rank: int, world: int) -> dict[str, float]:
    """Loss on the gathered batch + averaged gradients == one process on the whole batch."""
    torch.manual_seed(0)
    enc_i, enc_t = nn.Linear(D, 4), nn.Linear(D, 4)
    x_i, x_t = torch.randn(B, D), torch.randn(B, D)
    ids = torch.tensor([0, 1, 1, 2, 3, 4, 4, 5])  # two captions of one image inside and across shards
    params = [*enc_i.parameters(), *enc_t.parameters()]
    ref = _losses(enc_i(x_i), enc_t(x_t), ids)
    ref.backward()
    ref_grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    part = slice(rank * B // world, (rank + 1) * B // world)
    img, txt, gids = dist.gather_batch(enc_i(x_i[part]), enc_t(x_t[part]), ids[part])
    loss = _losses(img, txt, gids)
    loss.backward()
    grads = _mean_grads(params, world)
    return {"loss_diff": abs(float(loss) - float(ref)), "grad_diff": _max_diff(grads, ref_grads),
            "gathered_rows": img.shape[0], "ids_equal": float(torch.equal(gids, ids))}


def check_batchnorm(rank: int, world: int) -> dict[str, float]:
    """BatchNorm1d / 2d / the side networks' TokenBatchNorm: outputs, running statistics and averaged
    gradients over the global batch == one process on the whole batch; the classes come back."""
    out: dict[str, float] = {}
    cases = {"bn1d": (lambda: nn.BatchNorm1d(D), (B, D)), "bn2d": (lambda: nn.BatchNorm2d(D), (B, D, 3, 3)),
             "token": (lambda: TokenBatchNorm(D), (B, 5, D))}
    for name, (make, shape) in cases.items():
        torch.manual_seed(1)
        ref_bn, bn = make(), make()
        with torch.no_grad():
            for m in (ref_bn, bn):
                m.weight.copy_(torch.linspace(0.5, 1.5, D))
                m.bias.copy_(torch.linspace(-0.2, 0.2, D))
        x = torch.randn(*shape) * 3 + 1
        w = torch.randn(*shape)  # a loss that weighs every output differently
        xr = x.clone().requires_grad_(True)
        ref_y = ref_bn(xr)  # once: a second call would move the running statistics again
        ((ref_y * w).sum() / B).backward()
        part = slice(rank * B // world, (rank + 1) * B // world)
        xl = x[part].clone().requires_grad_(True)
        with dist.synced_batchnorm(bn) as switched:
            y = bn(xl)
            # a per-sample mean over the local rows: the average over processes is the global mean
            ((y * w[part]).sum() / (B // world)).backward()
        grads = _mean_grads([bn.weight, bn.bias], world)
        out[f"{name}_switched"] = switched
        out[f"{name}_out_diff"] = float((y - ref_y[part]).abs().max())
        # this process's loss reaches the others' statistics too (the all-reduce's backward sums):
        # its input gradient is `world` x the one-process gradient of the mean objective
        out[f"{name}_input_grad_diff"] = float((xl.grad / world - xr.grad[part]).abs().max())
        out[f"{name}_param_grad_diff"] = _max_diff(grads, [ref_bn.weight.grad, ref_bn.bias.grad])
        out[f"{name}_running_diff"] = max(float((bn.running_mean - ref_bn.running_mean).abs().max()),
                                          float((bn.running_var - ref_bn.running_var).abs().max()))
        out[f"{name}_class_restored"] = float(type(bn) is type(ref_bn))
    return out


def check_sections(rank: int, out: Path) -> dict[str, object]:
    """main_first orders, on_main runs once (local batch inside), a failure reaches the others."""
    marker = out / "built.txt"
    seen = {}
    with dist.main_first():
        if not marker.exists():
            assert dist.is_main(), "the main process runs the block first"
            marker.write_text("built by the main process")
        seen["marker"] = marker.read_text()
    seen["on_main"] = dist.on_main(lambda: f"ran on {dist.rank()}")
    # inside on_main the other process is waiting: gathering must not wait for it
    seen["inside"] = dist.on_main(lambda: dist.gather_batch(torch.ones(3, 2))[0].shape[0])
    try:
        dist.on_main(_fail)
        seen["failure"] = "none"
    except dist.PeerFailed as err:
        seen["failure"] = f"peer failed {err.code}"
    except UserError as err:
        seen["failure"] = f"user error: {err}"
    seen["gathered"] = [int(v) for v in dist.all_gather_object(rank)]
    return seen


def check_engine(rank: int, out: Path) -> dict[str, object]:
    """The engine inside a section trains as one process (the whole batch, no collectives: a stage the
    main process runs alone), and outside it every process starts from rank 0's tensors: models
    initialised from different seeds on the two processes end identical."""
    from _train_worker import build, collate, make_data, step_fn

    from mdpd_vl.engine.config import TrainConfig
    from mdpd_vl.engine.train import train

    cfg = TrainConfig(epochs=1, batch_size=8, lr=1e-2, log_every=1, ckpt_every=0, warmup_ratio=0.0)
    seen: dict[str, object] = {"alone": None}
    with dist.main_first():
        if dist.is_main():
            model, groups = build(seed=0)
            res = train(model, step_fn, make_data(), collate, groups, cfg, out / "alone", progress=False)
            seen["alone"] = [res.batch["processes"], res.step]
    model, groups = build(seed=10 + rank)  # a different initialisation on each process
    res = train(model, step_fn, make_data(), collate, groups, cfg, out / "together", progress=False)
    seen["together_steps"] = res.step
    seen["together_digests"] = res.weights_digests
    return seen


def _fail() -> None:
    raise UserError("the main process stops here", field="x")


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init()
    rank, world = dist.rank(), dist.world_size()
    record = {"rank": rank, "world": world, **check_gather(rank, world), **check_batchnorm(rank, world),
              **check_sections(rank, out), **check_engine(rank, out)}
    (out / f"rank-{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
