"""The stacked benchmark (bench/dit_schedule.py) on the CPU with its tiny Wan config: it runs its
four stacks, classifies every forward, and the cache did what its simulated rule says (the script
checks that itself and fails otherwise). The numbers are the GPU run's business (docs/torch.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_stacked_schedule_smoke():
    result = subprocess.run([sys.executable, str(BENCH / "dit_schedule.py"), "--model", "tiny", "--device", "cpu",
                             "--steps", "6"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    stacks = {r["stack"]: r for r in rows if "stack" in r}
    assert list(stacks) == ["stock", "cache", "svg2", "both"]
    assert all(r["finite"] and r["forwards"] == 12 and r["total_ms"] > 0 for r in stacks.values())
    # Per step, cond then uncond: D dense, S sparse, I first sparse call (50 k-means iterations), - skipped.
    assert stacks["stock"]["pattern"] == "DD DD DD DD DD DD"
    assert stacks["cache"]["pattern"] == "DD -- DD -- DD --"  # MagCache, unit ratios: retention 1 step, skip 1
    assert stacks["svg2"]["pattern"] == "DD II SS SS SS SS"  # floor(0.2 * 6) = 1 dense step
    assert stacks["both"]["pattern"] == "DD -- II -- SS --"  # the states stay warm across skipped steps
    (projection,) = [r for r in rows if "projection_steps" in r]
    assert projection["projection_steps"] == 50 and projection["dense_steps"] == 10
    assert projection["cache_computes"] == 30  # 10 retained + every other step of the 40 after
    assert set(projection["seconds"]) == {"stock", "cache", "svg2", "both"}
    assert "| both |" in result.stdout


def test_magcache_rule_matches_diffusers():
    """The benchmark's simulation of MagCache's decisions is diffusers' rule: a tiny Wan run with the
    same config skips exactly the steps it predicts, for several lengths."""
    sys.path.insert(0, str(BENCH))
    import dit_schedule
    import tiny_models
    from denoise import Generation, spy_on
    from diffusers.hooks import MagCacheConfig
    from sapattn.diffusers import wan

    for steps in (5, 8, 12):
        model = tiny_models.wan_transformer(layers=2)
        cond, uncond = tiny_models.wan_inputs(seed=0), tiny_models.wan_inputs(seed=1)
        for inputs in (cond, uncond):
            del inputs["timestep"], inputs["return_dict"]
        generation = Generation(model, cond, uncond)
        model.enable_cache(MagCacheConfig(threshold=0.06, max_skip_steps=dit_schedule.MAX_SKIP_STEPS,
                                          retention_ratio=dit_schedule.RETENTION_RATIO, num_inference_steps=steps,
                                          mag_ratios=[1.0] * steps))
        calls = spy_on(wan.self_attention_modules(model)[-1:], generation)
        generation(steps)
        computed = [any(s == step and b == "cond" for s, b, _ in calls) for step in range(steps)]
        assert computed == dit_schedule.magcache_pattern(steps), steps
