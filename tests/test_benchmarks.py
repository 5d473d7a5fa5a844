"""The benchmark scripts stay runnable: `bench_gpu.py --tiny` end to end on CPU.

The GPU benchmark is run only where a GPU is lent, and it once failed there on an import
that a PPO refactor had renamed; this smoke test would have caught it on any machine.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def test_bench_gpu_tiny_runs_end_to_end():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it
    proc = subprocess.run([sys.executable, "benchmarks/bench_gpu.py", "--tiny", "--steps", "2", "--warmup", "1",
                           "--repeats", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    pre, ppo = out["pretrain"], out["ppo"]
    assert pre["tokens_per_s"] > 0 and 0 < pre["mfu"] < 1.5
    assert pre["tokens_per_s"] == pre["global_batch"] * pre["seq_len"] / pre["step_s"]
    assert out["sampling"]["new_tokens_per_s"] > 0
    assert all(ppo[k] > 0 for k in ("generation_s", "scoring_s", "update_s"))
