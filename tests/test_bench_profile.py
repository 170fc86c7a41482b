"""`python -m mdpd_vl.bench --profile mdpd`: the phases add up to the step, the exact peak per phase."""

from __future__ import annotations

import json

import pytest
import torch

from mdpd_vl import bench, bench_profile
from mdpd_vl.distill.phases import phase, recording
from mdpd_vl.engine.memory import train_peak_bytes

TINY = ["--backbone", "quick", "--image-size", "32", "--batch-size", "4"]


def _job(**extra: object) -> dict:
    row = bench.plan_rows(["mdpd"], ["head"])[0]
    return {**row, "variant": "head", "device": "cpu", "precision": "fp32", "warmup": 1, "steps": 2,
            "clock": "cpu", "num_classes": 5, "backbone_mode": "eval", **extra}  # fmt: skip


class FakeClock:
    """Advances one tick per reading: every interval between two boundaries is exactly 1."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        self.t += 1.0
        return self.t


def test_time_between_boundaries_goes_to_the_innermost_phase_and_adds_up() -> None:
    rec = bench_profile.StepRecorder(FakeClock())
    with recording(rec):
        with phase("forward"):
            with phase("side"):
                pass
            with phase("phi"), phase("G"):
                pass
        with phase("backward"):
            pass
    # every interval between two boundaries is one tick here; the 8 intervals inside phases all count
    assert sum(rec.seconds.values()) == 8.0
    assert rec.seconds["side"] == rec.seconds["G"] == rec.seconds["backward"] == 1.0
    assert rec.seconds["phi"] == 2.0 and rec.seconds["forward"] == 3.0  # between its children too
    assert rec.stack == []


def test_no_recorder_no_cost() -> None:
    with phase("side"):  # nothing installed: a plain context
        x = 1
    assert x == 1


def test_phases_sum_to_the_step_and_each_part_is_seen() -> None:
    torch.manual_seed(0)
    out = bench_profile.profile_one("quick", "quick", 4, 32, 32, None, _job())
    phases = out["phases"]
    assert set(phases) == set(bench_profile.PHASES)
    # the interval between consecutive boundaries always goes somewhere: the phases are the step
    assert out["phase_seconds_sum"] == pytest.approx(out["step_seconds"], rel=0.05, abs=2e-3)
    for name in ("backbone", "side", "phi", "G", "losses", "backward", "optimizer"):
        assert phases[name]["seconds"] > 0, name
        assert phases[name]["peak_bytes"] >= out["baseline_bytes"] > 0, name
    assert phases["backbone"]["saved_bytes"] == 0  # head: the backbone runs without a graph
    assert phases["side"]["saved_bytes"] > 0 and phases["G"]["saved_bytes"] > 0
    assert phases["backward"]["end_bytes"] < phases["losses"]["end_bytes"]  # the graph is freed
    assert out["train_peak_bytes"] == max(p["peak_bytes"] for p in phases.values())


@pytest.mark.parametrize("variant", ["head", "norms_all"])
def test_largest_phase_peak_is_the_steps_exact_peak(variant: str) -> None:
    """The same step (same masks: the step counter is rewound) metered by phases and as a whole."""
    torch.manual_seed(0)
    job = _job(backbone_trainable=variant)
    tuned, step_loss, _params, optimizer, inputs = bench_profile.build_target("quick", 4, 32, 32, None, job)
    bench_profile._step(tuned, step_loss, optimizer, bench_profile.StepRecorder(FakeClock()))  # AdamW state
    optimizer.zero_grad(set_to_none=True)
    counter = tuned.core.step
    with bench_profile.PhaseBytes(bench_profile._state_tensors(tuned, optimizer, inputs)) as meter:
        rec = bench_profile.StepRecorder(FakeClock(), meter, tuple(tuned.parameters()))
        bench_profile._step(tuned, step_loss, optimizer, rec)
    tuned.core.step = counter
    optimizer.zero_grad(set_to_none=True)

    def whole() -> None:
        optimizer.zero_grad(set_to_none=True)
        step_loss().backward()
        optimizer.step()

    peak, kind = train_peak_bytes(tuned, whole, optimizer, inputs)
    assert kind == "live_tensor_bytes" and max(rec.peak.values()) == peak
    if variant == "norms_all":
        assert rec.saved["backbone"] > 0  # norm tuning keeps the backbone's graph


def test_cli_writes_json_and_markdown(tmp_path, capsys) -> None:
    out = tmp_path / "p.json"
    argv = ["--profile", "mdpd", *TINY, "--steps", "1", "--warmup", "0", "--threads", "1", "--clock", "cpu",
            "--distill", "gen_width=bottleneck", "--json", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    report = json.loads(out.read_text())
    assert report["format"] == "mdpd_vl.bench_profile" and len(report["targets"]) == 1
    target = report["targets"][0]
    assert target["distill"]["gen_width"] == "bottleneck" and target["variant"] == "head"
    md = out.with_suffix(".md").read_text()
    assert md in capsys.readouterr().out and "| generation blocks G" in md and "| backward |" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.json", "p.md"]
