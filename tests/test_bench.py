"""The efficiency benchmark: row planning, target arithmetic, exact byte counts, JSON schema, CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mdpd_vl import bench, bench_worker
from mdpd_vl.heads.pooling import GAPLinear

TINY = ["--backbone", "quick", "--image-size", "32", "--batch-size", "4"]


def _job(method: str, **extra) -> dict:
    """A worker job for the tiny --quick ViT at 32 px (2 warm-up, 2 timed steps)."""
    row = next(r for r in bench.plan_rows([method], list(bench.MDPD_VARIANTS)) if r["method"] == method)
    job = {**row, "backbone": "quick", "image_size": 32, "seq_len": None, "batch_size": 4, "device": "cpu",
           "precision": "fp32", "warmup": 2, "steps": 2, "infer_steps": 3, "num_classes": 5, "seed": 0,
           "threads": 1}  # fmt: skip
    job.update(extra)
    return job


# -- planning and CLI errors --------------------------------------------------------------------
def test_plan_rows_expands_mdpd_variants_in_order():
    from mdpd_vl.distill.config import RECOMMENDED_CHECKPOINTING

    rows = bench.plan_rows(["none", "lora", "mdpd", "lora"], ["head", "norms_all+ckpt"], last_k=2)
    assert [r["name"] for r in rows] == ["none", "lora", "mdpd[head]", "mdpd[norms_all+ckpt]"]
    assert rows[2]["backbone_trainable"] == "head" and rows[2]["checkpointing"] is False
    assert rows[3]["backbone_trainable"] == "norms_all" and rows[3]["checkpointing"] == RECOMMENDED_CHECKPOINTING
    assert "last_k" not in rows[3]
    assert bench.plan_rows(["mdpd"], ["norms_last_k"], last_k=2)[0]["last_k"] == 2
    alt = bench.plan_rows(["mdpd"], ["head+alt", "norms_all+ckpt+alt"])
    assert [r["schedule"] for r in alt] == ["alternate", "alternate"] and alt[1]["checkpointing"]
    named = bench.plan_rows(["mdpd"], ["norms_all+ckpt=sqrt", "norms_all+ckpt=all", "norms_all+ckpt=every_3"])
    assert [r["checkpointing"] for r in named] == ["sqrt", "all", "every_3"]
    assert named[0]["name"] == "mdpd[norms_all+ckpt=sqrt]"


def test_distill_overrides_reach_the_mdpd_rows_and_bad_ones_name_the_field():
    assert bench._distill_overrides(["gen_width=bottleneck", "share_phi=true", "d=32"]) == {
        "gen_width": "bottleneck", "share_phi": True, "d": 32}  # fmt: skip
    job = _job("mdpd", distill_extra={"gen_width": "bottleneck"})
    assert bench_worker._method_config(job).distill.gen_width == "bottleneck"
    with pytest.raises(bench.UserError) as err:
        bench._distill_overrides(["gen_width=side"])
    assert err.value.field == "--distill gen_width"
    with pytest.raises(bench.UserError, match="expected key=value"):
        bench._distill_overrides(["gen_width"])


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--methods", "linear,dora"], "--methods: unknown method 'dora'; valid: none, linear"),
        (["--mdpd-variants", "head+ckpt"], "--mdpd-variants: unknown mdpd variant 'head+ckpt'"),
        (["--mdpd-variants", "norms_all+ckpt=half"], "--mdpd-variants: unknown mdpd variant 'norms_all+ckpt=half'"),
        (["--distill", "mask_ratio=2"], "--distill mask_ratio: lambda must lie in [0, 1)"),
        (["--backbone", "open_clip:NoSuchNet"], "--backbone: unknown backbone 'open_clip:NoSuchNet'; valid:"),
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--scaling", "batch", "--batch-sizes", "4"], "--batch-sizes: needs at least two"),
    ],
)
def test_user_errors_exit_2_with_one_line(argv, needle, capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        bench.main([*argv, "--json", str(tmp_path / "b.json")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_resolve_backbone_names():
    assert bench_worker.resolve_backbone("ViT-B-32")["spec"] == {
        "kind": "open_clip_image", "name": "ViT-B-32", "kwargs": {}}  # fmt: skip
    bert = bench_worker.resolve_backbone("bert-base")
    assert bert["kind"] == "hf_text" and bert["spec"]["config"] == {"model_type": "bert"}
    assert bench_worker.resolve_backbone("hf:vit", image_size=64)["spec"]["config"]["image_size"] == 64
    quick = bench_worker.resolve_backbone("quick", image_size=48)["spec"]
    assert quick["kwargs"]["vision_cfg"]["image_size"] == 48
    assert bench_worker.QUICK_SPEC["kwargs"]["vision_cfg"]["image_size"] == 64  # not mutated


# -- analysis -----------------------------------------------------------------------------------
def _row(name: str, **values) -> dict:
    row = {k: None for k in bench.RESULT_KEYS}
    row.update(name=name, method=name.split("[")[0], **values)
    return row


def test_targets_are_ratios_and_misses_say_by_how_much():
    results = [
        _row("none", infer_qps=100.0),
        _row("lora", train_peak_bytes=1000, train_step_s=1.0, infer_qps=99.0),
        _row("unipt", train_peak_bytes=260, train_step_s=0.5, infer_qps=80.0),
        _row("sherl", infer_qps=120.0),
        _row("mdpd[head]", train_peak_bytes=280, train_state_bytes=5, train_step_s=0.6, infer_qps=99.5),
        _row("mdpd[norms_all+ckpt]", train_peak_bytes=460, train_step_s=0.9, infer_qps=99.0),
    ]
    slopes = {"mdpd[head]": {"train_peak_bytes": 10.0}, "lora": {"train_peak_bytes": 20.0}}
    checks = {c["target"].split(" = ")[0]: c for c in bench.check_targets(results, slopes)}
    mem = checks["mdpd[head] train_peak_bytes / lora"]  # every memory target uses the peak
    assert mem["ok"] and mem["ratio"] == pytest.approx(0.28) and mem["bound"] == 0.3
    side = checks["mdpd[head] train_peak_bytes / unipt"]
    assert side["ok"] and side["ratio"] == pytest.approx(280 / 260) and side["bound"] == 1.15
    step = checks["mdpd[head] train_step_s / unipt"]
    assert step["ok"] is False and step["miss"].startswith("misses by 4.3%")  # 1.2 vs <= 1.15
    assert checks["mdpd[head] train_step_s / lora"]["ok"] is False  # 0.6 vs <= 0.5
    norms = checks["mdpd[norms_all+ckpt] train_peak_bytes / lora"]
    assert norms["ok"] is False and norms["bound"] == 0.45 and "2.2%" in norms["miss"]  # 0.46
    assert checks["mdpd[norms_all+ckpt] train_step_s / lora"]["ok"]  # 0.9 <= 1.0
    assert checks["mdpd[head] infer_qps / none (bare backbone)"]["ok"]  # 0.995 >= 0.99
    assert checks["mdpd[head] infer_qps / unipt (side kept)"]["ok"]
    sherl = checks["mdpd[head] infer_qps / sherl (side kept)"]
    assert sherl["ok"] is False and "17.1%" in sherl["miss"]  # 99.5/120 = 0.829
    slope = checks["mdpd[head] memory slope / lora (train_peak_bytes per sample)"]
    assert slope["ok"] is False and slope["ratio"] == pytest.approx(0.5)
    text = bench.markdown({"results": results, "targets": list(checks.values()), "backbone": "b",
                           "batch_size": 4, "device": "cpu", "device_type": "cpu", "torch": "x",
                           "precision": "fp32", "command": "python -m mdpd_vl.bench"})  # fmt: skip
    assert "**MISS** mdpd[head] train_step_s / lora = 0.600 (target <= 0.5); misses by 20.0%" in text
    assert "mdpd[head] infer_qps / none" in text  # no paired ratios here: raw QPS is compared
    # a named granularity row stands in for norms_all+ckpt when that row is absent
    named = [r for r in results if r["name"] != "mdpd[norms_all+ckpt]"]
    named.append(_row("mdpd[norms_all+ckpt=sqrt]", train_peak_bytes=400, train_step_s=1.1))
    got = {c["target"].split(" = ")[0]: c for c in bench.check_targets(named, None)}
    assert got["mdpd[norms_all+ckpt=sqrt] train_step_s / lora"]["ok"] is False


def test_speed_targets_use_the_paired_ratios_when_every_row_has_one():
    results = [
        _row("none", infer_qps=100.0, infer_speed_vs_bare=1.01),
        _row("unipt", infer_qps=200.0, infer_speed_vs_bare=0.8),  # fast only because load dropped
        _row("mdpd[head]", infer_qps=90.0, infer_speed_vs_bare=0.995),
    ]
    checks = bench.check_targets(results, None)
    bare = next(c for c in checks if "/ none" in c["target"])
    assert bare["target"].endswith("inference speed, paired / none (bare backbone)")
    assert bare["ok"] and bare["ratio"] == pytest.approx(0.995)  # the bare row is 1 by definition
    side = next(c for c in checks if "/ unipt (side kept)" in c["target"])
    assert side["ok"] and side["ratio"] == pytest.approx(0.995 / 0.8)


def test_unmeasured_targets_are_reported_not_passed():
    checks = bench.check_targets([_row("mdpd[head]", train_peak_bytes=1)], None)
    assert all(c["ok"] is None and c["miss"] == "not measured" for c in checks)


def test_slope_is_least_squares_bytes_per_sample():
    assert bench.slope([2, 4, 8], [120, 220, 420]) == pytest.approx(50.0)
    assert bench.slope([4], [1]) is None
    rows = [_row("lora", batch_size=b, train_state_bytes=100 + 7 * b, train_peak_bytes=None) for b in (2, 4)]
    assert bench.scaling_slopes(rows) == {
        "lora": {"train_peak_bytes": None, "train_state_bytes": pytest.approx(7.0)}
    }


# -- exact byte counts --------------------------------------------------------------------------
def test_train_state_bytes_of_a_linear_probe_equals_the_hand_count():
    """Frozen backbone + GAP/linear head, cross-entropy, AdamW: every byte is known in advance."""
    torch.manual_seed(0)
    b, n, d_in, d, c = 6, 5, 8, 16, 3
    backbone = nn.Linear(d_in, d).requires_grad_(False)
    head = GAPLinear(d, c)
    model = nn.ModuleDict({"backbone": backbone, "head": head})
    x, y = torch.randn(b, n, d_in), torch.randint(0, c, (b,))
    params = list(head.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    job = {"device": "cpu", "warmup": 2, "steps": 3, "precision": "fp32"}
    out = bench_worker.measure_training(
        model, lambda: F.cross_entropy(head(backbone(x)), y), params, opt, job
    )
    f32, i64 = 4, 8
    saved = b * d * f32 + b * c * f32 + b * i64 + f32  # head input, log-softmax out, targets, total weight
    grads = (d * c + c) * f32
    adamw = 2 * grads + 2 * f32  # exp_avg + exp_avg_sq per parameter, plus one float32 step per tensor
    assert (out["saved_bytes"], out["grad_bytes"], out["optimizer_bytes"]) == (saved, grads, adamw)
    assert out["train_state_bytes"] == saved + grads + adamw
    assert out["train_step_s"] > 0 and out["train_peak_bytes"] >= 0


def _tiny_width() -> int:
    from mdpd_vl.backbones import build_backbone

    return build_backbone(bench_worker.resolve_backbone("quick", image_size=32)["spec"]).widths[-1]


def test_worker_linear_probe_bytes_match_the_hand_count_on_a_real_backbone():
    job = _job("linear", infer_steps=0)
    row = bench_worker.run_job(job)
    b, c, d = job["batch_size"], job["num_classes"], _tiny_width()
    grads = (d * c + c) * 4
    # frozen backbone runs without grad: only the head's pooled input, log-softmax, targets, total weight
    assert row["saved_bytes"] == b * d * 4 + b * c * 4 + b * 8 + 4
    assert (row["grad_bytes"], row["optimizer_bytes"]) == (grads, 2 * grads + 2 * 4)
    assert row["trainable_params"] == d * c + c
    assert row["infer_qps"] is None and row["error"] is None


def test_alternate_rows_time_and_measure_both_phases():
    row = bench_worker.run_job(_job("mdpd", backbone_trainable="head", checkpointing=False, schedule="alternate",
                                    steps=2, warmup=1, infer_steps=0))
    assert row["error"] is None and row["schedule"] == "alternate"
    assert set(row["train_step_s_by_phase"]) == set(row["train_peak_by_phase"]) == {"side", "backbone"}
    assert row["train_step_s"] == pytest.approx(sum(row["train_step_s_by_phase"].values()) / 2)
    assert row["train_peak_bytes"] == max(row["train_peak_by_phase"].values())
    assert row["peak_kind"] == "live_tensor_bytes"


def test_lora_is_served_merged_and_adapter_unmerged():
    none, lora, adapter = (bench_worker.run_job(_job(m, steps=1, warmup=1, infer_steps=2))
                           for m in ("none", "lora", "adapter"))
    assert lora["inference_params"] == none["inference_params"] < adapter["inference_params"]
    assert lora["deployment"].startswith("merged") and adapter["deployment"].startswith("unmerged")
    assert lora["train_peak_bytes"] > lora["train_state_bytes"]  # the peak holds the weights too


def test_bare_backbone_and_faded_mdpd_agree_in_inference_params():
    none = bench_worker.run_job(_job("none"))
    mdpd = bench_worker.run_job(_job("mdpd", steps=1, warmup=1))
    assert none["inference_params"] == mdpd["inference_params"]
    assert none["trainable_params"] == 0 and none["train_state_bytes"] is None
    assert mdpd["trainable_params"] > 0 and mdpd["train_state_bytes"] > mdpd["saved_bytes"] > 0
    assert none["infer_qps"] > 0 and mdpd["infer_latency_ms"] > 0


# -- the CLI's outputs --------------------------------------------------------------------------
def _check_schema(report: dict, rows: list[str]) -> None:
    for key, kind in {"device": str, "device_type": str, "backbone": str, "batch_size": int, "torch": str,
                      "results": list, "targets": list, "command": str}.items():  # fmt: skip
        assert isinstance(report[key], kind), key
    assert report["torch"] == torch.__version__
    assert [r["name"] for r in report["results"]] == rows
    for r in report["results"]:
        assert set(bench.RESULT_KEYS) <= set(r) and r["error"] is None, r
        assert isinstance(r["inference_params"], int) and r["infer_qps"] > 0 and r["infer_latency_ms"] > 0
        assert r["infer_speed_vs_bare"] > 0  # paired against a fresh bare backbone in the same process
        if r["method"] != "none":
            for key in ("trainable_params", "train_state_bytes", "train_peak_bytes"):
                assert isinstance(r[key], int) and r[key] >= 0, key
            assert r["train_step_s"] > 0
    assert {"target", "ratio", "op", "bound", "ok", "miss"} <= set(report["targets"][0])


def test_json_markdown_and_charts_with_in_process_rows(tmp_path, monkeypatch, capsys):
    """main() end to end, rows run in this process (the fresh-process launch is the slow test's job)."""
    monkeypatch.setattr(bench.Launcher, "run", lambda self, job: bench_worker.run_job(job))
    out = tmp_path / "res" / "b.json"
    argv = [*TINY, "--methods", "none,linear,mdpd", "--mdpd-variants", "head", "--warmup", "1", "--steps", "1",
            "--infer-steps", "2", "--threads", "1", "--scaling", "batch", "--batch-sizes", "2,4", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    _check_schema(report, ["none", "linear", "mdpd[head]"])
    sc = report["scaling"]
    assert sc["batch_sizes"] == [2, 4] and set(sc["slopes"]) == {"linear", "mdpd[head]"}
    assert sorted((r["name"], r["batch_size"]) for r in sc["rows"]) == [
        ("linear", 2), ("linear", 4), ("mdpd[head]", 2), ("mdpd[head]", 4)]  # fmt: skip
    assert sc["slopes"]["linear"]["train_state_bytes"] > 0  # saved activations grow with the batch
    md = out.with_suffix(".md").read_text()
    assert md == capsys.readouterr().out and "| mdpd[head] |" in md and "memory slope" in md
    for png in (out.with_suffix(".png"), out.with_name("b_scaling.png")):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["b.json", "b.md", "b.png", "b_scaling.png"]


@pytest.mark.slow
def test_quick_run_finishes_with_every_method_in_fresh_processes(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "mdpd_vl.bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    expected = [m for m in bench.METHODS if m != "mdpd"] + [f"mdpd[{v}]" for v in bench.MDPD_VARIANTS]
    _check_schema(report, expected)
    assert report["settings"]["launcher"] == "fork"
    assert proc.stderr.count("] ") >= len(expected)  # one progress line per row
    assert out.with_suffix(".png").stat().st_size > 10_000 and "Targets" in out.with_suffix(".md").read_text()
    print(f"--quick took {time.perf_counter() - t0:.0f} s")


@pytest.mark.slow
def test_subprocess_launcher_and_worker_entry(tmp_path):
    out = tmp_path / "b.json"
    argv = [*TINY, "--methods", "none,mdpd", "--mdpd-variants", "head", "--launcher", "subprocess",
            "--warmup", "1", "--steps", "1", "--infer-steps", "2", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "mdpd_vl.bench", *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_schema(json.loads(out.read_text()), ["none", "mdpd[head]"])


def test_cpu_clock_ignores_time_the_process_is_not_running():
    """`--clock cpu` counts CPU seconds: a sleeping (descheduled) call costs ~0, unlike wall time."""
    wall = bench_worker._timed(lambda: time.sleep(0.2), {"device": "cpu", "clock": "wall"})
    cpu = bench_worker._timed(lambda: time.sleep(0.2), {"device": "cpu", "clock": "cpu"})
    assert wall >= 0.19 and cpu < 0.05
