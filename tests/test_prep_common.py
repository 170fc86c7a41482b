"""The shared data_prep machinery: registry, options, media checks, atomic writes, the scripts as programs."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from prep_helpers import ROOT, garbage, jpeg, truncate, written

from mdpd_vl.data.prep import DATASETS, prepare
from mdpd_vl.data.prep.common import commit_files, parse_options, read_json
from mdpd_vl.data.prep.karpathy import INFO
from mdpd_vl.data.prep.media import check_features, check_image
from mdpd_vl.errors import UserError

SCRIPTS = ["flickr30k", "coco", "msrvtt", "msvd", "refcoco", "vqav2", "gqa"]


def test_registry_lists_every_dataset():
    assert DATASETS.names() == sorted(SCRIPTS)
    with pytest.raises(UserError, match="unknown dataset 'imagenet'; valid: coco, flickr30k"):
        prepare("imagenet", ROOT, ROOT)


def test_unknown_option_names_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="unknown option 'frames'; valid: .*min_frames"):
        prepare("msvd", tmp_path, tmp_path / "out", frames=3)
    assert parse_options({"min_frames": None}, {"min_frames": 1}, "x")["min_frames"] == 1


def test_check_image(tmp_path):
    good = jpeg(tmp_path / "a.jpg", size=(64, 48))
    assert check_image(good) is None
    assert check_image(tmp_path / "none.jpg") == "missing"
    assert check_image(garbage(tmp_path / "b.jpg")).startswith("does not decode")
    truncate(good, 0.6)  # headers intact, pixel data cut: verify() alone would pass
    assert check_image(good).startswith("does not decode")


def test_check_features(tmp_path):
    np.save(tmp_path / "f.npy", np.zeros((3, 2, 4), np.float32))
    assert check_features(tmp_path / "f.npy", 3) is None
    assert "has 3 rows" in check_features(tmp_path / "f.npy", 4)
    np.save(tmp_path / "g.npy", np.zeros((3, 4), np.float32))
    assert "expected (images, regions, dim)" in check_features(tmp_path / "g.npy", 3)
    assert check_features(garbage(tmp_path / "h.npy"), 3).startswith("does not load")


def test_commit_is_all_or_nothing(tmp_path):
    commit_files(tmp_path, {"a.index.json": {"v": 1}, "b.index.json": {"v": 1}})
    with pytest.raises(TypeError):  # the second file cannot be serialised
        commit_files(tmp_path, {"a.index.json": {"v": 2}, "b.index.json": {"v": object()}})
    assert (tmp_path / "a.index.json").read_text() == '{"v": 1}'
    assert written(tmp_path) == ["a.index.json", "b.index.json"]  # no temp file left behind


def test_read_json_truncated(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"images": [1, 2')
    with pytest.raises(UserError, match=r"x.json: not valid JSON .* line 1, column 17.*published at"):
        read_json(path, INFO["coco"])


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_help(name):
    done = subprocess.run([sys.executable, f"data_prep/{name}.py", "--help"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=60)
    assert done.returncode == 0 and "--raw" in done.stdout and "--skip-bad" in done.stdout


def test_script_exit_status_2_and_one_line(tmp_path):
    done = subprocess.run([sys.executable, "data_prep/gqa.py", "--raw", str(tmp_path / "nowhere"), "--out",
                           str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere" in lines[0]
    assert "dorarad/gqa" in lines[0] and written(tmp_path / "out") == []
