"""Scaling on CPU: pretraining tokens/s from 1 to 2 processes, and the cost of the sharded step.

    python benchmarks/bench_scale.py                    # both measurements, 3 interleaved rounds
    python benchmarks/bench_scale.py --rounds 5 --steps 30

1. **Processes** (`scaling`): the same global batch trained by
   - 1 process with 1 CPU device (the plain laptop run), and
   - 2 processes on localhost with 1 CPU device each, joined by `jax.distributed` over gloo
     (exactly what `parallel.distributed=true` does, see docs/05_laptop_to_pod.md): each
     process feeds its half of every batch and XLA all-reduces the gradients.
   Reported: global tokens/s of each and the ratio 2-process / 1-process. On a 2-core machine
   one process already uses both cores for its matmuls, so the ideal is ~1.0 (no speed-up, no
   loss): the figure measures what the gloo all-reduce and the second process cost. On a
   machine with 2 x more cores per process, or 2 hosts, the ideal is 2.0.

2. **Overhead** (`overhead`): one process, one device, the same jitted train step run
   - plain: parameters, optimizer state and batch as ordinary device arrays, and
   - sharded: everything placed with `shard_state` / `shard_batch` on a 1 x 1 mesh, the batch
     put through `shard_batch` every step (what `pretrain.fit` does).
   Reported: seconds per step of each and `sharded / plain - 1` (target: under 5%).

Rounds are interleaved (A, B, A, B, ...) because the machine is shared: each round's ratio
compares neighbours in time; the JSON gives every round, the medians and the load average.
Each worker process compiles once (persistent cache off, so rounds are comparable), runs
`--warmup` steps, then times `--steps` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def model_config(args):
    from minichat.config import ModelConfig
    return ModelConfig(vocab_size=2048, block_size=args.seq_len, n_layer=args.n_layer, n_head=4,
                       n_embd=args.n_embd)


def batch(step: int, args):
    import numpy as np
    rng = np.random.default_rng(step)
    tokens = rng.integers(0, 2048, (args.batch_size, args.seq_len + 1)).astype(np.int32)
    return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}  # as pretraining: unpadded rows


# ---- worker: one process of the scaling measurement --------------------------------------
def worker(args) -> None:
    import jax
    if args.num_processes > 1:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.num_processes,
                                   process_id=args.process_id)
    from flax import nnx

    from minichat.config import OptimConfig, ParallelConfig
    from minichat.model import GPT
    from minichat.parallel import make_mesh, shard_batch, shard_state, to_host
    from minichat.pretrain import make_optimizer, make_train_step

    mesh = make_mesh(ParallelConfig(data=-1))
    graphdef, params = nnx.split(GPT.init(model_config(args), 0), nnx.Param)
    tx, _ = make_optimizer(OptimConfig(), 1000)
    params = shard_state(params, mesh)
    opt_state = shard_state(jax.jit(tx.init)(params), mesh)
    step = make_train_step(graphdef, tx)
    for i in range(args.warmup):
        params, opt_state, m = step(params, opt_state, shard_batch(batch(i, args), mesh))
        to_host(m["loss"])
    t = time.perf_counter()
    for i in range(args.steps):
        params, opt_state, m = step(params, opt_state, shard_batch(batch(args.warmup + i, args), mesh))
        to_host(m["loss"])  # a host sync per step, as in fit
    dt = time.perf_counter() - t
    if jax.process_index() == 0:
        print(json.dumps({"tokens_per_s": args.steps * args.batch_size * args.seq_len / dt,
                          "devices": jax.device_count(), "processes": jax.process_count()}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(n: int, args) -> float:
    common = [sys.executable, os.path.abspath(__file__), "--worker", f"--num-processes={n}",
              f"--port={free_port()}", *passthrough(args)]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(common + [f"--process-id={i}"], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}):\n{err[-3000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])["tokens_per_s"]


def passthrough(args) -> list[str]:
    return [f"--steps={args.steps}", f"--warmup={args.warmup}", f"--batch-size={args.batch_size}",
            f"--seq-len={args.seq_len}", f"--n-layer={args.n_layer}", f"--n-embd={args.n_embd}"]


# ---- the sharded-vs-plain overhead (in this process) ------------------------------------
def overhead(args, rounds: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minichat.config import OptimConfig, ParallelConfig
    from minichat.model import GPT
    from minichat.parallel import make_mesh, shard_batch, shard_state
    from minichat.pretrain import make_optimizer, make_train_step

    graphdef, params0 = nnx.split(GPT.init(model_config(args), 0), nnx.Param)
    tx, _ = make_optimizer(OptimConfig(), 1000)
    mesh = make_mesh(ParallelConfig(data=1, fsdp=1), devices=jax.devices()[:1])
    plain = {"params": jax.tree.map(jnp.copy, params0)}
    plain["opt"] = jax.jit(tx.init)(plain["params"])
    sharded = {"params": shard_state(jax.tree.map(jnp.copy, params0), mesh)}
    sharded["opt"] = shard_state(jax.jit(tx.init)(sharded["params"]), mesh)
    step_plain, step_sharded = make_train_step(graphdef, tx), make_train_step(graphdef, tx)
    put = {"plain": lambda b: {k: jnp.asarray(v) for k, v in b.items()},
           "sharded": lambda b: shard_batch(b, mesh)}

    def timed(name, state, step_fn, n):
        t = time.perf_counter()
        for i in range(n):
            state["params"], state["opt"], m = step_fn(state["params"], state["opt"], put[name](batch(i, args)))
            float(m["loss"])
        return (time.perf_counter() - t) / n

    timed("plain", plain, step_plain, args.warmup)
    timed("sharded", sharded, step_sharded, args.warmup)
    per_round = []
    for _ in range(rounds):
        a = timed("plain", plain, step_plain, args.steps)
        b = timed("sharded", sharded, step_sharded, args.steps)
        c = timed("plain", plain, step_plain, args.steps)
        per_round.append({"plain_s": (a + c) / 2, "sharded_s": b, "overhead": b / ((a + c) / 2) - 1})
    return {"rounds": per_round,
            "median_plain_s_per_step": statistics.median(r["plain_s"] for r in per_round),
            "median_sharded_s_per_step": statistics.median(r["sharded_s"] for r in per_round),
            "median_overhead": statistics.median(r["overhead"] for r in per_round)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16, help="global batch (split over processes)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--only", choices=["scaling", "overhead"], default=None)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    out = {"shape": {"n_layer": args.n_layer, "n_embd": args.n_embd, "seq_len": args.seq_len,
                     "global_batch": args.batch_size, "steps": args.steps},
           "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    if args.only in (None, "scaling"):
        rounds = []
        for r in range(args.rounds):  # interleaved: 1, 2, 1, 2, ...
            one = run_processes(1, args)
            two = run_processes(2, args)
            rounds.append({"1_process_tok_s": one, "2_processes_tok_s": two, "ratio": two / one})
            print(f"[scaling] round {r + 1}: 1 process {one:,.0f} tok/s, 2 processes {two:,.0f} tok/s "
                  f"(x{two / one:.2f})", file=sys.stderr)
        out["scaling"] = {"rounds": rounds,
                          "median_1_process_tok_s": statistics.median(r["1_process_tok_s"] for r in rounds),
                          "median_2_processes_tok_s": statistics.median(r["2_processes_tok_s"] for r in rounds),
                          "median_ratio": statistics.median(r["ratio"] for r in rounds)}
    if args.only in (None, "overhead"):
        os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
        out["overhead"] = overhead(args, args.rounds)
        print(f"[overhead] sharded vs plain step: {out['overhead']['median_overhead']:+.1%}", file=sys.stderr)
    out["load_after"] = os.getloadavg()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
