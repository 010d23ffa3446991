"""python -m sapattn.generate on a small random Wan pipeline saved to disk, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import sapattn
import tiny_models
from sapattn.generate import build_parser

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
    assert f"{tmp_path / 'svg2.json'}, {tmp_path / 'svg2.telemetry.jsonl'}" in sparse.stdout  # says where they went
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


def test_generate_refuses_an_out_that_names_the_summary(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    result = generate("--model", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "v.json"), cwd=tmp_path)
    assert result.returncode == 2 and "name the video" in result.stderr


def test_help_explains_every_option_and_shows_its_default(tmp_path):
    parser = build_parser()
    for action in parser._actions:
        assert action.help, f"{action.option_strings} has no help text"
    result = generate("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for option, default in (("--steps N", "50"), ("--fps N", "16"), ("--seed N", "0"),
                            ("--dtype {bf16,fp16,fp32}", "bf16")):
        assert re.search(re.escape(option) + r" [^-]*\(default: " + default + r"\)", text), option
    assert "default: None" not in text
    # The SVG2 options' defaults are the presets' own values.
    config = sapattn.SVG2Config
    wan, wan480, hunyuan = config.wan_t2v_720p(), config.wan_480p(), config.hunyuan_720p()
    assert wan.q_clusters is None  # scales with the tokens: the table says so
    assert f"--q-clusters scaled* {wan480.q_clusters} {hunyuan.q_clusters}" in text
    assert "* one query cluster per 252 video tokens (at most 300)" in text
    assert f"--first-times-fp {wan.first_times_fp} {wan480.first_times_fp} {hunyuan.first_times_fp}" in text
    # HunyuanVideo 1.5's columns: HunyuanVideo's settings, 200 query clusters below 720p.
    assert f"--q-clusters scaled* {wan480.q_clusters} {hunyuan.q_clusters} {hunyuan.q_clusters} 200" in text
    assert "HY 1.5 720p" in text and "HY 1.5 480p" in text


def test_version_is_the_cmake_project_version(tmp_path):
    checkout = Path(__file__).resolve().parents[2]
    cmake_version = re.search(r"project\(sapattn VERSION ([0-9.]+)", (checkout / "CMakeLists.txt").read_text())[1]
    assert sapattn.__version__ == cmake_version
    from importlib.metadata import version
    assert version("sapattn") == cmake_version  # the installed distribution's metadata
    result = generate("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"sapattn {cmake_version}"
