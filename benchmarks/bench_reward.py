"""Reward-model benchmark: one optimizer step of minichat's RM (InstructGPT K-way loss,
`minichat.reward.make_step`) against a PyTorch peer of identical shape, measured in the
same run.

    python benchmarks/bench_reward.py                 # 16 pairs x 64 tokens, tiny GPT-2
    python benchmarks/bench_reward.py --k 4 --prompts 16 --seq 144   # the tiny stage's shape
    python benchmarks/bench_reward.py --k 7 --seq 192 --lengths chatworld --pack --share-prefix
                                      # the stage's batches: ChatWorld lengths, packed with
                                      # each prompt laid out once for its K replies

Shape: `--prompts` prompts x `--k` completions x `--seq` tokens (K = 2: pairs), right
padded with random lengths in [seq/2, seq], on the tiny preset (4 layers, 4 heads, 128 wide,
vocab 2048, 256 positions). `--lengths chatworld` draws lengths like the reward stage's
comparisons instead: one prompt length per prompt (mean ~28 tokens, up to 100) plus a reply
length per completion (mean ~20, up to 91), as measured on the default run. `--pack` lays
minichat's sequences end to end (`minichat.reward.pack`); with `--share-prefix` the K
completions of a prompt (which then start with the same prompt tokens) are laid out as the
prompt once and K branches, what the stage does. The peer, like TRL's collator, pads every
row to the longest sequence of the batch.

The peer is what TRL's `RewardTrainer` runs per step (Hugging Face
`GPT2ForSequenceClassification` with one label, chosen and rejected concatenated into one
forward, loss = -log sigmoid(r_chosen - r_rejected), backward, gradient clipping at 1,
`torch.optim.AdamW`), written out so that the benchmark needs only torch + transformers;
for K > 2 the peer scores all K rows and uses the same C(K, 2) pair loss. TRL itself adds
data-collator and Trainer overhead on top. Reference figure from the issue: TRL's
RewardTrainer takes ~0.12 s/step at 16 pairs x 64 tokens on 2 CPU cores.

Prints one JSON object: jax.step_s, torch.step_s (if torch is installed), ratio
(torch / jax: > 1 means minichat is faster), ratio_vs_trl_reference (0.12 / jax).
Medians over `--repeats` rounds; JAX and torch rounds are interleaved because the machine
is shared and its speed drifts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minichat.config import ModelConfig, OptimConfig
from minichat.model import ScalarGPT
from minichat.pretrain import make_optimizer
from minichat.reward import make_step, pack

TINY = ModelConfig(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128)
TRL_REFERENCE_S = 0.12


def make_batch(prompts: int, k: int, seq: int, seed: int = 0, lengths: str = "uniform") -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(6, TINY.vocab_size, size=(prompts, k, seq)).astype(np.int32)
    if lengths == "chatworld":  # lognormal fits of the default run's prompt / reply lengths
        prompt = np.clip(np.round(rng.lognormal(np.log(25), 0.45, (prompts, 1))), 6, 100)
        reply = np.clip(np.round(rng.lognormal(np.log(17), 0.6, (prompts, k))), 3, 91)
        lengths = np.minimum(prompt + reply, seq).astype(int)
        shared = np.arange(seq)[None, :] < prompt  # the K completions share their prompt
        tokens = np.where(shared[:, None, :], tokens[:, :1, :], tokens)
    else:
        lengths = rng.integers(seq // 2, seq + 1, size=(prompts, k))
    mask = (np.arange(seq)[None, None, :] < lengths[..., None]).astype(np.int32)
    tokens = np.where(mask > 0, tokens, 0)
    ranking = np.stack([rng.permutation(k) for _ in range(prompts)]).astype(np.int32)
    return {"tokens": tokens, "mask": mask, "ranking": ranking, "valid": np.ones((prompts, k), bool)}


def jax_runner(batch: dict, steps: int, packed: bool = False, share_prefix: bool = False):
    if packed:
        batch = {"ranking": batch["ranking"], "valid": batch["valid"],
                 **pack(batch["tokens"], batch["mask"], row_multiple=4, share_prefix=share_prefix)}
        print(f"packed into {len(batch['tokens'])} rows of {batch['tokens'].shape[1]}", flush=True)
    model = ScalarGPT.init(TINY, 0)
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = make_optimizer(OptimConfig(lr=3e-4, warmup_steps=0), 1000)
    state = {"params": params, "opt": tx.init(params)}
    step = make_step(graphdef, tx)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def run(n):
        for _ in range(n):
            state["params"], state["opt"], m = step(state["params"], state["opt"], batch)
        float(m["loss"])  # the training loop syncs once per step too

    run(2)  # compile + warm up
    return run


def torch_runner(batch: dict, steps: int):
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=TINY.vocab_size, n_positions=TINY.block_size, n_embd=TINY.n_embd,
                     n_layer=TINY.n_layer, n_head=TINY.n_head, pad_token_id=0, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, num_labels=1)
    model = GPT2ForSequenceClassification(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    P, K, _ = batch["tokens"].shape
    T = int(batch["mask"].sum(-1).max())  # padded to the longest sequence, as TRL's collator
    ids = torch.from_numpy(batch["tokens"][..., :T].reshape(P * K, T).astype(np.int64))
    att = torch.from_numpy(batch["mask"][..., :T].reshape(P * K, T).astype(np.int64))
    rank = torch.from_numpy(np.argsort(batch["ranking"], axis=1))  # rank of each completion
    above = (rank[:, :, None] < rank[:, None, :]).float()  # i ranked above j

    def run(n):
        for _ in range(n):
            r = model(input_ids=ids, attention_mask=att).logits.view(P, K)
            diff = r[:, :, None] - r[:, None, :]
            loss = -(torch.nn.functional.logsigmoid(diff) * above).sum((1, 2)) / above.sum((1, 2))
            loss = loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        float(loss.detach())

    run(2)
    return run


def timed(run, steps: int) -> float:
    t = time.perf_counter()
    run(steps)
    return (time.perf_counter() - t) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", choices=["uniform", "chatworld"], default="uniform")
    ap.add_argument("--pack", action="store_true", help="pack minichat's batch end to end")
    ap.add_argument("--share-prefix", action="store_true",
                    help="with --pack: each prompt once for its K completions (as the stage does)")
    args = ap.parse_args()
    batch = make_batch(args.prompts, args.k, args.seq, lengths=args.lengths)
    runners = {"jax": jax_runner(batch, args.steps, packed=args.pack, share_prefix=args.share_prefix)}
    try:
        runners["torch"] = torch_runner(batch, args.steps)
    except ImportError:
        pass
    times = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, run in runners.items():
            times[name].append(timed(run, args.steps))
    out = {"shape": {"prompts": args.prompts, "k": args.k, "seq": args.seq, "model": "tiny",
                     "lengths": args.lengths, "pack": args.pack, "share_prefix": args.share_prefix,
                     "real_tokens": int(batch["mask"].sum())},
           "backend": jax.default_backend()}
    for name, ts in times.items():
        out[name] = {"step_s": statistics.median(ts), "rounds": [round(t, 4) for t in ts]}
    if "torch" in out:
        out["ratio"] = out["torch"]["step_s"] / out["jax"]["step_s"]
    out["ratio_vs_trl_reference"] = TRL_REFERENCE_S / out["jax"]["step_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
