"""python -m sapattn.generate on a small random Wan pipeline saved to disk, as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sapattn
import tiny_models

# The subprocess imports the same sapattn as the tests (installed, or a source checkout).
PACKAGE_PARENT = Path(sapattn.__file__).resolve().parents[1]


def generate(*args, cwd):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(PACKAGE_PARENT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "sapattn.generate", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_generate_writes_video_telemetry_and_timing(tmp_path):
    model = tmp_path / "tiny-wan"
    tiny_models.wan_pipeline(layers=2).save_pretrained(model)
    common = ["--model", str(model), "--prompt", "a red cat runs", "--steps", "4", "--height", "64", "--width", "64",
              "--frames", "9", "--device", "cpu", "--dtype", "fp32", "--max-sequence-length", "16"]
    sparse = generate(*common, "--out", str(tmp_path / "svg2.mp4"), "--q-clusters", "4", "--k-clusters", "8",
                      "--first-times-fp", "0.5", "--first-layers-fp", "0.5", cwd=tmp_path)
    assert sparse.returncode == 0, sparse.stderr
    assert (tmp_path / "svg2.mp4").stat().st_size > 0
    summary = json.loads((tmp_path / "svg2.json").read_text())
    assert summary["mode"] == "svg2" and summary["frames"] == 9 and summary["wall_seconds"] > 0
    assert 0.0 < summary["mean_sparse_density"] <= 1.0
    rows = [json.loads(line) for line in (tmp_path / "svg2.telemetry.jsonl").read_text().splitlines()]
    assert len(rows) == 4 * 2 * 2  # steps x CFG branches x layers
    assert {r["mode"] for r in rows if r["step"] >= 2 and r["layer"] >= 1} == {"sparse"}

    dense = generate(*common, "--out", str(tmp_path / "dense.mp4"), "--dense", cwd=tmp_path)
    assert dense.returncode == 0, dense.stderr
    assert json.loads((tmp_path / "dense.json").read_text())["mode"] == "dense"
    assert not (tmp_path / "dense.telemetry.jsonl").exists()


def test_generate_rejects_a_folder_that_is_not_a_pipeline(tmp_path):
    result = generate("--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "v.mp4"), cwd=tmp_path)
    assert result.returncode == 2 and "model_index.json" in result.stderr
