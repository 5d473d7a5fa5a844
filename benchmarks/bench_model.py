"""Model benchmark: training and sampling throughput of minichat's GPT against a PyTorch
GPT-2 of identical shape (Hugging Face `GPT2LMHeadModel`), measured in the same run.

    python benchmarks/bench_model.py                      # tiny and small presets
    python benchmarks/bench_model.py --presets tiny --repeats 5
    python benchmarks/bench_model.py --cpus 1             # pin both frameworks to one core
    python benchmarks/bench_model.py --dtype bfloat16     # bf16 matmuls; torch under autocast

Prints one JSON object:
  peak_matmul_gflops          jnp.dot of two 2048x2048 matrices in --dtype (the machine's
                              peak: the best of a measurement before every round)
  <preset>.jax.train_tok_s    tokens/s of a full jitted train step (fwd + bwd + AdamW with
                              clipping, donated buffers; `minichat.pretrain.make_train_step`)
  <preset>.jax.mfu            train_tok_s * flops_per_token / peak
  <preset>.jax.sample_tok_s   new tokens/s, 32 prompts x 32 tokens -> 64 new tokens, KV cache,
                              temperature 1 (`minichat.sampling.generate`, no early stop)
  <preset>.torch.*            the same for torch (torch.optim.AdamW + clip_grad_norm_;
                              `generate(do_sample=True, use_cache=True)`), if torch is installed;
                              torch runs with its faster thread count (1 or all cores),
                              chosen per task at start-up (`threads`)
  <preset>.ratio.*            jax / torch (of the medians)
  <preset>.ratio_paired_median  median over rounds of the jax / torch ratio within a round
  <preset>.torch_nanogpt      training only: a nanoGPT-style torch GPT-2 (nn.Linear blocks,
                              causal SDPA; written in this file), the issue's named peer;
                              `ratio_nanogpt` as above
Figures are medians over `--repeats` rounds; JAX and torch rounds are interleaved, because
the machine is shared and its speed drifts. On an oversubscribed machine both frameworks'
thread pools lose a lot to waiting on each other; `--cpus 1` pins the whole process to one
core (both frameworks then run single-threaded), which measures per-core efficiency.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

if __name__ == "__main__" and "--cpus" in sys.argv:  # before JAX/torch size their pools
    _n = int(sys.argv[sys.argv.index("--cpus") + 1])
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:_n])

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minichat.config import ModelConfig, ParallelConfig
from minichat.model import GPT, count_params, flops_per_token
from minichat.sampling import generate

PRESETS = {
    "tiny": dict(model=ModelConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4,
                                   n_embd=128), batch=16),
    "small": dict(model=ModelConfig(vocab_size=8192, block_size=512, n_layer=6, n_head=6,
                                    n_embd=384), batch=8),
}
SAMPLE_B, SAMPLE_P, SAMPLE_N = 32, 32, 64


def _timeit(fn, steps):
    t = time.perf_counter()
    fn(steps)
    return time.perf_counter() - t


def peak_matmul_gflops(n=2048, reps=5, rounds=3, dtype="float32"):
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    # float32 accumulation and result, as the model's matmuls (a bf16 result takes another,
    # much slower path on XLA:CPU: ~200 against ~1,300 GFLOP/s on AMX)
    dot = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
    dot(a, a).block_until_ready()
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            out = dot(a, a)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - t) / reps)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------------------- JAX


class JaxBench:
    def __init__(self, cfg: ModelConfig, batch: int, splits: int = 1):
        from minichat.config import OptimConfig
        from minichat.pretrain import make_optimizer, make_train_step

        self.cfg, self.B, self.T = cfg, batch, cfg.block_size
        model = GPT.init(cfg, 0)
        self.n_params = count_params(model)
        self.graphdef, self.params = nnx.split(model, nnx.Param)
        self.state = nnx.state(model)
        tx, _ = make_optimizer(OptimConfig(lr=3e-4, warmup_steps=0), 1_000_000)
        self.opt_state = jax.jit(tx.init)(self.params)
        self.step = make_train_step(self.graphdef, tx, splits=splits)  # as `fit` runs it on CPU
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, cfg.vocab_size, (batch, self.T + 1))
        # as pretraining's batches: unpadded rows, so no "valid" (plain causal attention)
        self.batch = {k: jnp.asarray(v, jnp.int32) for k, v in
                      dict(tokens=tokens, loss_mask=np.ones_like(tokens)).items()}
        self.prompts = jnp.asarray(rng.integers(0, cfg.vocab_size, (SAMPLE_B, SAMPLE_P)),
                                   jnp.int32)
        self.key = jax.random.key(0)
        self.train(2)  # compile
        self.sample(1)

    def train(self, steps):
        for _ in range(steps):
            self.params, self.opt_state, metrics = self.step(self.params, self.opt_state,
                                                             self.batch)
        float(metrics["loss"])

    def sample(self, calls):
        for i in range(calls):
            gen = generate((self.graphdef, self.params), self.prompts,
                           jnp.ones_like(self.prompts), jax.random.fold_in(self.key, i),
                           max_new_tokens=SAMPLE_N, temperature=1.0, end_id=None, pad_id=0)
        gen.tokens.block_until_ready()


# ---------------------------------------------------------------------------- torch


def _best_threads(torch, fn) -> int:
    """The faster of 1 thread and all cores for `fn(steps)`: on a busy machine torch's
    OpenMP threads can spin-wait on each other and run many times slower with 2 than 1."""
    best, chosen = float("inf"), torch.get_num_threads()
    for n in sorted({1, torch.get_num_threads()}):
        torch.set_num_threads(n)
        fn(1)  # warm up
        t = _timeit(fn, 1)
        if t < best:
            best, chosen = t, n
    return chosen


class TorchTrainPeer:
    """A torch training peer around a module mapping tokens to logits (`logits` reads them
    from its output): AdamW with decay on matrices only, clip_grad_norm_, its best thread
    count."""

    def __init__(self, model, cfg: ModelConfig, batch: int, logits=lambda out: out):
        import contextlib

        import torch
        self.torch, self.model, self.logits = torch, model, logits
        # bf16 compute: torch's own mixed precision on CPU (bf16 matmuls, fp32 weights)
        self.precision = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)
                          if cfg.dtype == "bfloat16" else contextlib.nullcontext())
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=3e-4, betas=(0.9, 0.95))
        g = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, cfg.vocab_size, (batch, cfg.block_size + 1), generator=g)
        self.threads = {"train": _best_threads(torch, self._train)}

    def _train(self, steps):
        torch, F = self.torch, self.torch.nn.functional
        self.model.train()
        for _ in range(steps):
            with self.precision():
                logits = self.logits(self.model(self.tokens[:, :-1]))
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), self.tokens[:, 1:].reshape(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
        float(loss.detach())

    def train(self, steps):
        self.torch.set_num_threads(self.threads["train"])
        self._train(steps)


class TorchBench(TorchTrainPeer):
    """HF `GPT2LMHeadModel` of the same shape: training as above, and sampling with
    `generate(do_sample=True, use_cache=True)`."""

    def __init__(self, cfg: ModelConfig, batch: int):
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
            n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, activation_function="gelu_new"))
        super().__init__(model, cfg, batch, logits=lambda out: out.logits)
        g = torch.Generator().manual_seed(1)
        self.prompts = torch.randint(0, cfg.vocab_size, (SAMPLE_B, SAMPLE_P), generator=g)
        self.threads["sample"] = _best_threads(torch, self._sample)

    def _sample(self, calls):
        self.model.eval()
        with self.torch.no_grad(), self.precision():
            for _ in range(calls):
                self.model.generate(self.prompts, attention_mask=self.torch.ones_like(
                    self.prompts), do_sample=True, top_k=0, temperature=1.0,
                    max_new_tokens=SAMPLE_N, min_new_tokens=SAMPLE_N, use_cache=True,
                    pad_token_id=0)

    def sample(self, calls):
        self.torch.set_num_threads(self.threads["sample"])
        self._sample(calls)


def nanogpt_style(cfg: ModelConfig):
    """The issue's other peer: a GPT-2 written the nanoGPT way (one nn.Module per block,
    nn.Linear layers, fused causal SDPA, tanh GELU, tied embeddings), written here. It has no
    KV cache, so it is a training peer only; sampling is compared with HF `generate`."""
    import torch
    from torch import nn
    F = nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            C = cfg.n_embd
            self.ln_1, self.ln_2 = nn.LayerNorm(C), nn.LayerNorm(C)
            self.c_attn, self.attn_proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
            self.c_fc, self.mlp_proj = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
            q, k, v = (t.view(B, T, cfg.n_head, C // cfg.n_head).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
            return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))

    class GPTPeer(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
            self.h = nn.ModuleList(Block() for _ in range(cfg.n_layer))
            self.ln_f = nn.LayerNorm(cfg.n_embd)
            for m in self.modules():
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, std=0.02)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied unembedding

    torch.manual_seed(0)
    return GPTPeer()


# ---------------------------------------------------------------------------- main


def run_preset(name, repeats, train_steps, sample_calls, with_torch, peaks, dtype="float32", splits=1):
    spec = PRESETS[name]
    cfg, B = dataclasses.replace(spec["model"], dtype=dtype), spec["batch"]
    benches = {"jax": JaxBench(cfg, B, splits)}
    if with_torch:
        benches["torch"] = TorchBench(cfg, B)
        benches["torch_nanogpt"] = TorchTrainPeer(nanogpt_style(cfg), cfg, B)
    times = {k: {"train": [], "sample": []} for k in benches}
    for _ in range(repeats):  # interleave the frameworks, round by round
        peaks.append(peak_matmul_gflops(rounds=1, dtype=dtype))
        for k, bench in benches.items():
            times[k]["train"].append(_timeit(bench.train, train_steps))
            if hasattr(bench, "sample"):
                times[k]["sample"].append(_timeit(bench.sample, sample_calls))
    fpt = flops_per_token(cfg, cfg.block_size)
    out = {"config": dict(n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          vocab_size=cfg.vocab_size, block_size=cfg.block_size, batch=B,
                          dtype=dtype),
           "params": benches["jax"].n_params, "flops_per_token": fpt}
    for k in benches:
        train_tok = B * cfg.block_size * train_steps / statistics.median(times[k]["train"])
        out[k] = {"train_tok_s": round(train_tok, 1),
                  "train_tok_s_all": [round(B * cfg.block_size * train_steps / t, 1)
                                      for t in times[k]["train"]]}
        if times[k]["sample"]:
            out[k]["sample_tok_s"] = round(SAMPLE_B * SAMPLE_N * sample_calls
                                           / statistics.median(times[k]["sample"]), 1)
            out[k]["sample_tok_s_all"] = [round(SAMPLE_B * SAMPLE_N * sample_calls / t, 1)
                                          for t in times[k]["sample"]]
    if "torch_nanogpt" in out:
        out["torch_nanogpt"]["threads"] = benches["torch_nanogpt"].threads
        out["ratio_nanogpt"] = {
            "train_tok_s": round(out["jax"]["train_tok_s"] / out["torch_nanogpt"]["train_tok_s"], 3),
            "train_tok_s_paired_median": round(statistics.median(
                t / j for j, t in zip(times["jax"]["train"], times["torch_nanogpt"]["train"])), 3)}
    if "torch" in out:
        out["torch"]["threads"] = benches["torch"].threads
        out["ratio"] = {m: round(out["jax"][m] / out["torch"][m], 3)
                        for m in ("train_tok_s", "sample_tok_s")}
        # per round (JAX and torch ran back to back), then the median: robust to drift
        out["ratio_paired_median"] = {
            f"{m}_tok_s": round(statistics.median(
                t / j for j, t in zip(times["jax"][m], times["torch"][m])), 3)
            for m in ("train", "sample")}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--train-steps", type=int, default=5)
    ap.add_argument("--sample-calls", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="compute dtype: minichat's model.dtype, torch.autocast for the peers")
    ap.add_argument("--splits", type=int, default=ParallelConfig().cpu_splits,
                    help="sub-batches per train step (parallel.cpu_splits; 1 = one chain)")
    ap.add_argument("--cpus", type=int, default=None,
                    help="pin the process to this many cores (applied at start-up)")
    args = ap.parse_args(argv)
    with_torch = not args.no_torch
    if with_torch:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            print("torch/transformers not installed: JAX figures only", file=sys.stderr)
            with_torch = False
    # The machine is shared: the peak is the best of a measurement before every round.
    peaks = [peak_matmul_gflops(dtype=args.dtype)]
    result = {"device": str(jax.devices()[0]), "cpu_count": os.cpu_count(),
              "cpus_used": len(os.sched_getaffinity(0)),
              "load_avg_at_start": [round(x, 2) for x in os.getloadavg()], "presets": {}}
    if with_torch:
        import torch
        result["torch_version"] = torch.__version__
    result["jax_version"] = jax.__version__
    result["splits"] = args.splits
    for name in args.presets:
        r = run_preset(name, args.repeats, args.train_steps, args.sample_calls, with_torch, peaks,
                       args.dtype, args.splits)
        result["presets"][name] = r
        print(json.dumps({name: r}), file=sys.stderr)
    peak = max(peaks)
    result["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["peak_matmul_gflops"] = round(peak, 2)
    result["peak_matmul_gflops_all"] = [round(p, 1) for p in peaks]
    for r in result["presets"].values():
        r["jax"]["mfu"] = round(r["jax"]["train_tok_s"] * r["flops_per_token"] / (peak * 1e9), 4)
        for k in ("torch", "torch_nanogpt"):
            if k in r:
                r[k]["mfu"] = round(r[k]["train_tok_s"] * r["flops_per_token"] / (peak * 1e9), 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
