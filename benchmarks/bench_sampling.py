"""Sampling replies that end at different lengths: `generate(shrink=True)` against the same
sampler decoding the whole batch to the end (`shrink=False`), measured in the same run.

    python benchmarks/bench_sampling.py --run runs/tiny     # a finished run's SFT model
    python benchmarks/bench_sampling.py --vocab 8           # no run: a random model (smoke)

With `--run`, the workload is the comparisons stage's: `--prompts` ChatWorld prompts (the
stage's own draw), K = 4 replies per prompt at temperature 1, 48 new tokens at most, in
batches of 128 rows (`reward.sample_batch_size`), through `evaluate.sample_replies`. A
ChatWorld reply is ~16 tokens, but a batch runs until its longest row ends, ~44 steps.
With `--vocab V` (no run) the model is a random tiny GPT with a V-token vocabulary whose
token 3 ends a reply, so that about one row in V ends at each step.

Each mode runs in a fresh subprocess, first cold (the time includes compiling one sampler
per prompt-width bucket, as a first pipeline run pays it) and then warm (`--repeats` more
passes, median), one mode after the other. The replies are checked to be identical.

Prints one JSON object: per mode cold_s and warm_s, new tokens, and the ratios
off / on (> 1: shrinking is faster).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def worker(args) -> dict:
    import jax
    import numpy as np

    from minichat.config import Config, ModelConfig
    from minichat.evaluate import sample_replies
    from minichat.model import GPT
    from minichat.sampling import generate

    shrink = args.mode == "on"
    if args.run:
        from minichat.checkpoint import restore_params
        from minichat.reward import comparison_prompts
        from minichat.tokenizer import ChatTokenizer
        cfg = Config()
        tok = ChatTokenizer.load(os.path.join(args.run, "tokenizer.json"))
        model = restore_params(args.run, "sft", GPT.init(cfg.model, 0), cfg.model)
        prompts = comparison_prompts(cfg, "train", args.prompts, "comparisons/train")

        def one_pass(seed):
            replies = sample_replies(model, tok, prompts, max_new_tokens=48, temperature=1.0, seed=seed,
                                     batch_size=128, n=4, shrink=shrink)
            return [r["text"] for r in replies], sum(r["n_tokens"] for r in replies)
    else:
        config = ModelConfig(vocab_size=args.vocab, block_size=128, n_layer=4, n_head=4, n_embd=128)
        model = GPT.init(config, 0)
        rng = np.random.default_rng(0)
        tokens = rng.integers(4, args.vocab, (args.prompts, 32)).astype(np.int32)

        def one_pass(seed):
            texts, n_new = [], 0
            for i in range(0, args.prompts, 32):
                gen = generate(model, tokens[i:i + 32], np.ones((32, 32), np.int32), jax.random.key(seed + i),
                               max_new_tokens=48, temperature=1.0, end_id=3, pad_id=0, n_samples=4, shrink=shrink)
                texts += np.asarray(gen.tokens).tolist()
                n_new += int(np.asarray(gen.mask).sum())
            return texts, n_new

    t = time.perf_counter()
    texts, n_new = one_pass(0)
    cold = time.perf_counter() - t
    warm = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        one_pass(0)
        warm.append(time.perf_counter() - t)
    return {"cold_s": cold, "warm_s": statistics.median(warm), "warm_rounds": warm, "new_tokens": n_new,
            "replies_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="", help="a run directory whose sft stage finished")
    ap.add_argument("--vocab", type=int, default=8, help="without --run: the random model's vocabulary")
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=2, help="warm passes per mode")
    ap.add_argument("--mode", choices=["on", "off"], help=argparse.SUPPRESS)  # worker
    args = ap.parse_args()
    if args.mode:
        print(json.dumps(worker(args)))
        return
    out = {"prompts": args.prompts, "run": args.run or None, "vocab": None if args.run else args.vocab,
           "load_avg": os.getloadavg()}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--mode", mode, "--prompts", str(args.prompts),
               "--repeats", str(args.repeats), "--vocab", str(args.vocab)] + (["--run", args.run] if args.run else [])
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-3000:])
        out[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    if out["on"].pop("replies_sha256") != out["off"].pop("replies_sha256"):
        sys.exit("shrink changed the replies")
    out["ratio_cold"] = out["off"]["cold_s"] / out["on"]["cold_s"]
    out["ratio_warm"] = out["off"]["warm_s"] / out["on"]["warm_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
