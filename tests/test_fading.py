"""python -m mdpd_vl.tasks.fading: the rows file, skipping finished runs, the report (table, target,
ranking check, chart, card) on synthetic results.json files, and one tiny end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mdpd_vl.errors import UserError
from mdpd_vl.tasks import fading
from mdpd_vl.tasks import fading_latency as latency
from mdpd_vl.tasks import fading_report as rep

ROOT = Path(__file__).resolve().parents[1]
RANKED = ["linear", "partial", "lora", "unipt", "mdpd_norms_all"]


def rows_file(tmp_path: Path, **extra: object) -> Path:
    data = {
        "protocol": str(ROOT / "configs/itr/research.yaml"), "seeds": [0, 1, 2],
        "output_dir": str(tmp_path / "runs"), "card": str(tmp_path / "card.md"), "chart": str(tmp_path / "chart.png"),
        "reference": "lora", "ranking": RANKED,
        "full_protocol": {"config": str(ROOT / "configs/itr/shapes_mdpd.yaml"), "set": ["train.epochs=2"]},
        "rows": [{"name": "linear", "set": ["method.name=linear"]},
                 {"name": "partial", "set": ["method.name=partial"]},
                 {"name": "lora", "set": ["method.name=lora"]},
                 {"name": "unipt", "set": ["method.name=unipt"]},
                 {"name": "mdpd_norms_all", "set": ["method.name=mdpd", "method.distill.backbone_trainable=norms_all"]},
                 {"name": "mdpd_lowrank_ckpt", "note": "merged", "set": [
                     "method.name=mdpd", "method.distill.backbone_trainable=lowrank",
                     "method.distill.checkpointing=every_2"]}],
    }
    data.update(extra)
    path = tmp_path / "rows.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def fake_results(fr: fading.Frontier, kind: str, row: str, seed: int, *, rsum: float, peak_gib: float,
                 qps: float = 100.0, bare: float = 100.0, side: float | None = None, steps: int = 50,
                 seconds: float = 100.0) -> None:
    """A results.json as the ITR recipe writes it (only the keys the report reads), with its command."""
    folder = fading.run_dir(fr, kind, row, seed)
    folder.mkdir(parents=True, exist_ok=True)
    argv = fading.run_argv(fr, kind, fr.row(row), seed)
    method = next(o.split("=")[1] for o in fr.row(row).overrides if o.startswith("method.name="))
    results = {
        "method": method, "metrics": {"rsum": rsum}, "metrics_side_kept": {"rsum": side} if side else None,
        "efficiency": {"train_peak_bytes": peak_gib * 2**30, "train_state_bytes": 1, "trainable_params": 2e6,
                       "infer_qps": qps, "infer_qps_bare": bare},
        "train_seconds": seconds, "train_steps": steps, "command": fading.command(argv),
        "config": fading.run_config(fr, kind, fr.row(row), seed),
    }
    (folder / "results.json").write_text(json.dumps(results))


# ----------------------------------------------------------------------------- the rows file
def test_shipped_rows_file_resolves_every_row() -> None:
    fr = fading.load_frontier(ROOT / "configs/itr/frontier.yaml")
    names = [r.name for r in fr.rows]
    assert set(RANKED) <= set(names) and fr.reference == "lora" and fr.ranking == RANKED
    assert fr.protocol == "configs/itr/research.yaml" and fr.seeds == [0, 1, 2]
    first = (ROOT / "configs/itr/frontier.yaml").read_text().splitlines()[0]
    assert first == "# python -m mdpd_vl.tasks.fading --rows configs/itr/frontier.yaml"


def test_cost_cut_rows_share_the_default_row_with_the_frontier() -> None:
    # issue 17's accuracy checks: the same protocol and output folder as the frontier, so the mdpd_head
    # runs are shared (same command -> same run folder, run once), and each cut differs by one setting
    cuts, frontier = (fading.load_frontier(ROOT / f"configs/itr/{n}.yaml") for n in ("cost_cuts", "frontier"))
    assert cuts.protocol == frontier.protocol and cuts.output_dir == frontier.output_dir and cuts.seeds == [0, 1, 2]
    assert cuts.row("mdpd_head").overrides == frontier.row("mdpd_head").overrides and cuts.reference == "mdpd_head"
    base = set(cuts.row("mdpd_head").overrides)
    for row in cuts.rows[1:]:
        assert len(set(row.overrides) - base) == 1 and base <= set(row.overrides), row.name


@pytest.mark.parametrize("change,field", [
    ({"rows": [{"name": "a", "set": ["method.distill.backbone_trainable=everything"]}]}, "row a"),
    ({"rows": [{"name": "a", "set": ["method.nme=lora"]}]}, "row a"),
    ({"rows": [{"name": "a"}, {"name": "a"}]}, "repeated"),
    ({"rows": [{"name": "a/b"}]}, "rows\\[0\\].name"),
    ({"rows": [{"name": "a", "set": "method.name=lora"}]}, "rows\\[0\\].set"),
    ({"reference": "nobody"}, "reference"),
    ({"ranking": ["linear", "nobody"]}, "ranking"),
    ({"seeds": []}, "seeds"),
    ({"colour": "red"}, "unknown key"),
    ({"full_protocol": {"config": 3}}, "full_protocol"),
])
def test_bad_rows_files_are_one_error_naming_the_place(tmp_path: Path, change: dict, field: str) -> None:
    path = rows_file(tmp_path, **change)
    if "rows" in change:  # the checks refer to the default rows
        data = yaml.safe_load(path.read_text())
        data.update(reference=None, ranking=[])
        path.write_text(yaml.safe_dump(data))
    with pytest.raises(UserError, match=field):
        fading.load_frontier(path)


def test_cli_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    path = rows_file(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mdpd_vl.tasks.fading", "--rows", str(path), "--only", "nobody"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--only" in proc.stderr


# ----------------------------------------------------------------------------- runs
def test_finished_runs_are_skipped_and_stale_ones_rerun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fr = fading.load_frontier(rows_file(tmp_path, seeds=[0, 1]))
    fake_results(fr, "research", "linear", 0, rsum=300.0, peak_gib=0.01)
    stale = fading.run_dir(fr, "research", "linear", 1)
    stale.mkdir(parents=True)
    (stale / "results.json").write_text(json.dumps({"command": "python -m mdpd_vl.tasks.itr --set train.lr=1"}))
    calls = []

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 3)

    monkeypatch.setattr(fading.subprocess, "run", fake_run)
    failed = fading.execute(fr, "research", [fr.row("linear")], [0, 1], None)
    assert len(calls) == 1 and calls[0][calls[0].index("--output-dir") + 1] == str(stale)
    assert failed == ["linear seed1"] and not (stale / "results.json").exists()  # the stale run was cleared
    assert (fading.run_dir(fr, "research", "linear", 0) / "results.json").exists()


def test_records_keep_finished_runs_without_their_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh clone has no run folders: the committed records rebuild the card and skip the runs."""
    import shutil

    fr = fading.load_frontier(rows_file(tmp_path, seeds=[0, 1]))
    assert Path(fr.records) == tmp_path / "card" / "records"
    fake_results(fr, "research", "linear", 0, rsum=300.0, peak_gib=0.01, side=None)
    fake_results(fr, "research", "linear", 1, rsum=310.0, peak_gib=0.01)
    (fading.run_dir(fr, "research", "linear", 0) / fading.latency.LATENCY_FILE).write_text(json.dumps({"ratio": 1.01}))
    before = fading.write_report(fr).read_text()
    rec = json.loads(fading.record_path(fr, "research", "linear", 0).read_text())
    assert rec["metrics"] == {"rsum": 300.0} and rec["latency_retimed"] == {"ratio": 1.01}
    assert set(rec["efficiency"]) <= set(fading.RECORD_EFFICIENCY) and "export_dir" not in rec
    shutil.rmtree(tmp_path / "runs")
    after = fading.write_report(fr).read_text()
    assert after == before and "| linear | linear | - | 2 | 305.0 ± 7.1 |" in after and "| 1.010 | - | yes |" in after
    monkeypatch.setattr(fading.subprocess, "run", lambda *a, **k: pytest.fail("a recorded run was rerun"))
    assert fading.execute(fr, "research", [fr.row("linear")], [0, 1], None) == []
    # a record written by another command (the row's overrides changed since) does not count
    path = fading.record_path(fr, "research", "linear", 1)
    path.write_text(json.dumps({**json.loads(path.read_text()), "command": "python -m mdpd_vl.tasks.itr --set x=1"}))
    assert "| linear | linear | - | 1 | 300.0 ± 0.0 |" in fading.write_report(fr).read_text()
    path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable record"):
        fading.write_report(fr)


def test_a_protocol_edit_makes_runs_and_records_stale(tmp_path: Path) -> None:
    """The command of a run does not name the protocol file's values: the resolved config must match."""
    import shutil

    protocol = tmp_path / "research.yaml"
    shutil.copy(ROOT / "configs/itr/research.yaml", protocol)
    fr = fading.load_frontier(rows_file(tmp_path, protocol=str(protocol), seeds=[0]))
    fake_results(fr, "research", "linear", 0, rsum=300.0, peak_gib=0.01)
    assert fading.finished(fr, "research", fr.row("linear"), 0)
    assert fading.load_record(fr, "research", fr.row("linear"), 0) is not None
    # another data root or output folder is the same run
    moved = json.loads(fading.record_path(fr, "research", "linear", 0).read_text())
    assert "root" not in moved["config"]["data"] and "output_dir" not in moved["config"]
    # a field the run's config lacks (added since, with its default) does not make it stale
    results = fading.run_dir(fr, "research", "linear", 0) / "results.json"
    held = json.loads(results.read_text())
    del held["config"]["method"]["distill"]["head_layers"]
    results.write_text(json.dumps(held))
    assert fading.finished(fr, "research", fr.row("linear"), 0)
    protocol.write_text(protocol.read_text().replace("  lr: 0.0005", "  lr: 0.001"))
    assert not fading.finished(fr, "research", fr.row("linear"), 0)
    shutil.rmtree(tmp_path / "runs")
    assert fading.load_record(fr, "research", fr.row("linear"), 0) is None


# ----------------------------------------------------------------------------- the report
def _fill(fr: fading.Frontier, full_order: list[str]) -> None:
    research = {"linear": 300.0, "partial": 390.0, "lora": 480.0, "unipt": 380.0, "mdpd_norms_all": 400.0,
                "mdpd_lowrank_ckpt": 460.0}
    memory = {"linear": 0.01, "partial": 0.8, "lora": 1.0, "unipt": 0.1, "mdpd_norms_all": 0.9,
              "mdpd_lowrank_ckpt": 0.35}
    for name, rsum in research.items():
        for seed in (0, 1, 2):
            fake_results(fr, "research", name, seed, rsum=rsum + 10 * (seed - 1), peak_gib=memory[name],
                         qps=60.0 if name == "unipt" else 100.0, side=470.0 if name.startswith("mdpd") else None,
                         seconds=50.0 * (1 + seed))
    for i, name in enumerate(full_order):
        fake_results(fr, "full", name, 0, rsum=500.0 - 20 * i, peak_gib=memory[name])


def test_report_on_synthetic_results(tmp_path: Path) -> None:
    fr = fading.load_frontier(rows_file(tmp_path))
    _fill(fr, ["lora", "mdpd_norms_all", "partial", "unipt", "linear"])  # the research order
    card = fading.write_report(fr)
    text = card.read_text()
    assert text.startswith("# The fading frontier") and rep.BEGIN in text and "## Defaults chosen" in text
    assert "| mdpd_lowrank_ckpt | mdpd |" in text
    assert "460.0 ± 10.0" in text and "470.0 ± 0.0" in text  # mean ± sample sd over 3 seeds
    assert "| 2.00 |" in text  # step time: mean of 50/50, 100/50, 150/50 s
    assert "0.600" not in text and "1.667" in text  # unipt: latency = bare / deployed QPS
    assert "**met** by `mdpd_lowrank_ckpt`" in text  # 0.35 <= 0.4 x 1.0 GiB, 460 >= 0.95 x 480
    assert "Kendall tau = 1.000; the same order" in text
    assert "--set method.distill.backbone_trainable=lowrank --set method.distill.checkpointing=every_2" in text
    assert "seed$S --set train.seed=$S" in text and "`mdpd_lowrank_ckpt` — merged:" in text
    assert "full protocol, `lora`: `python -m mdpd_vl.tasks.itr --config" in text
    assert (tmp_path / "chart.png").stat().st_size > 1000 and "](chart.png)" in text

    # a different full-protocol order, a missed target; text outside the block survives a rewrite
    card.write_text(text.replace("## Defaults chosen", "## Defaults chosen\n\nOur words."))
    fake_results(fr, "full", "linear", 0, rsum=999.0, peak_gib=0.01)
    for seed in (0, 1, 2):
        fake_results(fr, "research", "mdpd_lowrank_ckpt", seed, rsum=400.0, peak_gib=0.35)
    text = fading.write_report(fr).read_text()
    assert "Our words." in text and text.count(rep.BEGIN) == 1
    assert "a different order" in text and "Kendall tau = 0.200" in text
    assert "**missed**; best within the memory and latency bounds: `mdpd_lowrank_ckpt`" in text
    bare, anyhow = ("Best deployed Rsum at any memory below `lora`'s, deployed at the bare backbones' cost: ",
                    "Best deployed Rsum at any memory below `lora`'s, at any inference cost: ")
    # lowrank_ckpt ties norms_all at 400.0 and needs less memory (0.35 vs 0.9 GiB): it wins both lines
    assert bare + "`mdpd_lowrank_ckpt`" in text and anyhow + "`mdpd_lowrank_ckpt`" in text
    # unipt keeps its side network (1.667 x bare): it can win the second line only
    for seed in (0, 1, 2):
        fake_results(fr, "research", "unipt", seed, rsum=900.0, peak_gib=0.2, qps=60.0)
    text = fading.write_report(fr).read_text()
    assert bare + "`mdpd_lowrank_ckpt`" in text and anyhow + "`unipt`" in text and "latency 1.667 x bare" in text


def _row(name: str, rsum: float, peak: float, flops: float = 1.01) -> dict:
    """One row as `rep.summarise` gives it, with the fields the target and the chart read."""
    return {"name": name, "method": "lora" if name == "lora" else "mdpd", "rsum": (rsum, 0.0),
            "peak_gib": (peak, 0.0), "latency": (1.0, 0.0), "flops": (flops, 0.0)}


def test_target_ties_go_to_the_lower_peak() -> None:
    """A checkpointed row repeats its row's Rsum to the decimal: the lines name the one that needs less memory."""
    ref = _row("lora", 100.0, 1.0)
    rows = [ref, _row("plain", 120.0, 0.9), _row("ckpt", 120.0, 0.35), _row("ckpt_all", 120.0, 0.36)]
    lines = rep.target(rows, ref)
    assert "**met** by `ckpt`, `ckpt_all`; best `ckpt` " in lines[0]
    assert all("`ckpt`, 120.0" in line for line in lines[1:]) and len(lines) == 3


def test_chart_names_the_bare_cost_front() -> None:
    """The chart labels the MDPD rows that beat every cheaper bare-cost MDPD row, never a row over the cost bound."""
    rows = [_row("cheap", 100.0, 0.2), _row("beaten", 90.0, 0.3), _row("better", 150.0, 0.4),
            _row("costly", 300.0, 0.3, flops=1.05), _row("tie_more_memory", 150.0, 0.5)]
    assert rep.frontier_names(rows) == {"cheap", "better"}


def test_report_without_runs_lists_every_command(tmp_path: Path) -> None:
    fr = fading.load_frontier(rows_file(tmp_path))
    assert "no run has finished yet" in fading.write_report(fr).read_text() and not (tmp_path / "chart.png").exists()
    fake_results(fr, "research", "linear", 0, rsum=300.0, peak_gib=0.01)
    fake_results(fr, "research", "linear", 1, rsum=300.0, peak_gib=0.01)
    (fading.run_dir(fr, "research", "linear", 1) / "results.json").write_text(
        json.dumps({"command": "something else"}))  # another command: not counted
    text = fading.write_report(fr).read_text()
    assert "| linear | linear | - | 1 | 300.0 ± 0.0 |" in text
    assert "the reference row has no finished run yet" in text and "Ranking check of" in text and "missing" in text
    assert text.count("python -m mdpd_vl.tasks.itr --config") == len(fr.rows) + len(RANKED)


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_tiny_end_to_end(tmp_path: Path) -> None:
    tiny = ["data.shapes_scale=tiny", "data.image_size=32", "data.max_train_pairs=null", "train.batch_size=8",
            "train.epochs=1", "data.eval_batch_size=16", f"data.cache_dir={tmp_path / 'cache'}"]
    path = rows_file(tmp_path, seeds=[0], ranking=[], reference="mdpd_lowrank_ckpt", full_protocol=None, rows=[
        {"name": "linear", "set": [*tiny, "method.name=linear"]},
        {"name": "mdpd_lowrank_ckpt", "set": [*tiny, "method.name=mdpd", "method.distill.backbone_trainable=lowrank",
                                              "method.distill.checkpointing=every_2",
                                              "method.distill.head_layers=last_2"]}])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "mdpd_vl.tasks.fading", "--rows", str(path), "--data-root", str(tmp_path / "data")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    fr = fading.load_frontier(path)
    results = rep.load(fading.run_dir(fr, "research", "mdpd_lowrank_ckpt", 0))
    linear = rep.load(fading.run_dir(fr, "research", "linear", 0))
    assert results is not None and linear is not None and results["export_dir"]
    from mdpd_vl.export import load_exported
    from mdpd_vl.heads.pooling import LayerPoolHead

    exported = load_exported(results["export_dir"])  # merged: the bare backbones + heads
    mix = sum(p.numel() for tower in (exported.image, exported.text) for m in tower.modules()
              if isinstance(m, LayerPoolHead) for p in m.mix.parameters())
    assert mix > 0  # the towers read their last 2 layers
    assert results["efficiency"]["inference_params"] == linear["efficiency"]["inference_params"] + mix
    text = (tmp_path / "card.md").read_text()
    assert "| mdpd_lowrank_ckpt | mdpd | lowrank +ckpt every_2, W_B reads last_2 | 1 |" in text
    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 0 and again.stdout.count("done already") == 2

    # --retime: every finished export against its bare backbones, one process, and the card reads it
    retimed = subprocess.run([*cmd, "--retime"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert retimed.returncode == 0, retimed.stdout + retimed.stderr
    assert "done already" not in retimed.stdout and retimed.stdout.count("deployed / bare") == 2
    for name in ("linear", "mdpd_lowrank_ckpt"):
        rec = latency.load_latency(fading.run_dir(fr, "research", name, 0))
        assert rec is not None and rec["rounds"] >= 1 and rec["ratio"] > 0 and rec["bare_s"] > 0
    linear_ratio = latency.load_latency(fading.run_dir(fr, "research", "linear", 0))["ratio"]
    assert fading.collect(fr, "research", ["linear"], [0])["linear"]["latency"][0] == pytest.approx(linear_ratio)


def test_paired_ratio_reads_the_slower_callable() -> None:
    import time

    out = latency.paired_ratio(lambda: time.sleep(0.02), lambda: time.sleep(0.01), rounds=3)
    assert 1.5 < out["ratio"] < 2.6 and out["deployed_s"] > out["bare_s"]


def test_flops_decide_the_bare_cost_where_counted(tmp_path: Path) -> None:
    """A timed ratio within 2% but 30% more FLOPs is not the bare cost; the FLOPs are counted exactly."""
    fr = fading.load_frontier(rows_file(tmp_path, seeds=[0]))
    fake_results(fr, "research", "linear", 0, rsum=300.0, peak_gib=0.01)
    (fading.run_dir(fr, "research", "linear", 0) / latency.LATENCY_FILE).write_text(
        json.dumps({"ratio": 1.01, "flops_ratio": 1.3}))
    assert "| 1.010 | 1.3000 | no |" in fading.write_report(fr).read_text()

    import torch

    lin = torch.nn.Linear(8, 4, bias=False)
    x = torch.zeros(5, 8)
    assert latency.count_flops(lambda: lin(x)) == 2 * 5 * 8 * 4  # one multiply-add per weight and row
