"""PPO iteration benchmark: one iteration of minichat's PPO at the tiny shape, split into
generation, scoring and update, against TRL 1.12's PPOTrainer measured in the same run
(`--trl`) or, without it, the figure quoted in issue 5.

    python benchmarks/bench_ppo.py                 # minichat only; TRL's quoted figure as reference
    python benchmarks/bench_ppo.py --trl           # TRL's PPOTrainer measured side by side
    python benchmarks/bench_ppo.py --trl --repeats 7
    python benchmarks/bench_ppo.py --trl --value-model both   # + the shared-trunk value head

Shape (the issue's): 64 prompts of 32 tokens, 48 new tokens each (a freshly initialised model
practically never samples the end token, so every reply is 48 tokens), 4 epochs x 4 minibatches
of 16 (micro-batch 16), the tiny GPT (4 layers, 128 wide, vocab 2048); four models: policy,
frozen reference, value model (own trunk) and frozen reward model. `--value-model shared`
measures `ppo.value_model=shared` instead (the value a head on the policy's trunk: one trunk
fewer in scoring and in the update), `both` the two side by side, interleaved with the peer.
Each micro-batch runs as `--splits` concurrent sub-batches (default `parallel.cpu_splits`, as
the stage does on a CPU; `--splits 1` for one chain).

  generation  `minichat.sampling.generate` (the jitted KV-cache sampler), temperature 0.7
  scoring     the jitted experience pass: policy + reference logprobs, values, reward, KL-shaped
              rewards, GAE, whitening
  update      the jitted update: 4 epochs x 4 minibatches, policy and value AdamW steps

The peer (`--trl`) is `trl.experimental.ppo.PPOTrainer` itself, run unmodified: HF GPT-2
models of the same shape (`GPT2LMHeadModel` policy, TRL's own copy of it as the reference,
`GPT2ForSequenceClassification` value and reward models with separate trunks), fp32 on the
CPU, dropout off, TRL's defaults otherwise (its fused AdamW). `total_episodes=64` makes one
`trainer.train()` call one PPO iteration, so the two frameworks' iterations are interleaved
(the machine is shared and its speed drifts). The phases are timed by wrapping what TRL's
`train()` calls, not by re-implementing it:
  generation  TRL's `batch_generation` (HF `generate` with `output_scores`)
  scoring     from its return to the first forward with gradients: policy logprobs from the
              kept generation logits, reference / value / reward forwards, KL-shaped rewards,
              GAE, whitening (and TRL's own `gc.collect()` there)
  update      from that forward to the `log` call after the 4 x 4 optimizer steps
`train_call_s` is the whole `train()` call (adds TRL's logging, callbacks and `gc.collect()`).
TRL generates exactly 48 tokens: no stop token (HF `generate` has no end token to stop at),
and the pad id is 2048, outside the vocabulary, so no sampled token is taken for padding (TRL
ends a reply at its first pad token; it maps pads to 0 before the embedding). Torch runs with
the faster of 1 thread and all cores, one trial iteration each after a warm-up.

Prints one JSON object: medians over `--repeats` iterations (after a compile / warm-up
iteration) of each phase in wall seconds and in process CPU seconds (on a shared machine the
wall clock depends on the other jobs; CPU seconds / cores is what an idle machine would take at
best), the load average, and the ratio TRL / minichat per phase and end to end. Without `--trl`
(or when trl is not importable) TRL's figure is the one quoted in issue 5, not re-measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from minichat.config import ModelConfig, ParallelConfig, PPOConfig  # noqa: E402
from minichat.model import GPT, ScalarGPT  # noqa: E402
from minichat.ppo import PPOTrainer, value_head  # noqa: E402
from minichat.reward import score as rm_score  # noqa: E402

# TRL 1.12 PPOTrainer at this shape on this class of machine (2 CPU cores), as quoted in issue 5.
TRL_QUOTED = {"generation": 0.6, "scoring": 0.56, "update": 3.3, "total": 4.7}
B, P, N, V = 64, 32, 48, 2048
PHASES = ("generation", "scoring", "update")


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def now() -> tuple[float, float]:
    return time.perf_counter(), cpu_seconds()


def since(mark: tuple[float, float], end: tuple[float, float] | None = None) -> tuple[float, float]:
    end = end or now()
    return end[0] - mark[0], end[1] - mark[1]


def prompts() -> np.ndarray:
    return np.random.default_rng(0).integers(4, V, (B, P))


def build(model_cfg: ModelConfig, pcfg: PPOConfig, splits: int = 1):
    policy = GPT.init(model_cfg, 0)
    rm = ScalarGPT.from_gpt(policy, 1)
    value = value_head(model_cfg.n_embd) if pcfg.value_model == "shared" else ScalarGPT.from_gpt(policy, 2)
    graphdef, state = nnx.split(rm)

    def reward_fn(params, tokens, mask):
        return rm_score(nnx.merge(graphdef, params[0]), tokens, mask, params[1])

    return PPOTrainer(policy, policy, value, (state, jnp.float32(0.0)), reward_fn, pcfg,
                      end_id=1, pad_id=0, total_iterations=100, splits=splits)


def minichat_runner(value_model: str = "separate", splits: int = 1):
    """Returns `iteration(i) -> {phase: (wall s, cpu s)}` and the list of mean reply lengths."""
    model_cfg = ModelConfig(vocab_size=V, block_size=256, n_layer=4, n_head=4, n_embd=128)
    pcfg = PPOConfig(batch_size=B, minibatch_size=16, micro_batch_size=16, epochs=4, max_new_tokens=N,
                     temperature=0.7, value_model=value_model)
    trainer = build(model_cfg, pcfg, splits)
    query = jnp.asarray(prompts(), jnp.int32)
    qmask = jnp.ones((B, P), jnp.int32)
    lengths = []

    def iteration(i: int) -> dict:
        phases, t = {}, now()
        gen = jax.block_until_ready(trainer.generate(query, qmask, jax.random.key(i)))
        phases["generation"], t = since(t), now()
        rollout, rows, _ = jax.block_until_ready(trainer.score(query, qmask, gen))
        phases["scoring"], t = since(t), now()
        jax.block_until_ready(trainer.train(rollout, jax.random.key(1000 + i)))
        phases["update"] = since(t)
        lengths.append(float(np.mean(np.asarray(rows["length"]))))
        return phases

    return iteration, lengths


def trl_runner():
    """Returns `iteration(i) -> {phase: (wall s, cpu s), "train_call": ...}` running one
    `trainer.train()` of TRL's PPOTrainer, and an info dict (versions, thread count)."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    import transformers
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_trainer
    from datasets import Dataset
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    out_dir = tempfile.TemporaryDirectory(prefix="bench_ppo_trl_")
    shape = dict(vocab_size=V, n_positions=256, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                 embd_pdrop=0.0, attn_pdrop=0.0,
                 bos_token_id=None, eos_token_id=None)  # no end token: generate never stops early
    policy = GPT2LMHeadModel(GPT2Config(**shape))
    value = GPT2ForSequenceClassification(GPT2Config(**shape, num_labels=1))
    reward = GPT2ForSequenceClassification(GPT2Config(**shape, num_labels=1))
    args = ppo_trainer.PPOConfig(
        output_dir=out_dir.name, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        use_cpu=True, bf16=False,  # TRL's default is bf16 autocast, also on the CPU
        # The rollout batch is per_device_train_batch_size x gradient_accumulation_steps; each
        # minibatch of 64 / 4 = 16 is then one micro-batch and one optimizer step.
        per_device_train_batch_size=B, gradient_accumulation_steps=1, num_mini_batches=4,
        num_ppo_epochs=4, local_rollout_forward_batch_size=B, response_length=N, temperature=0.7,
        stop_token=None, stop_token_id=None,
        total_episodes=B,  # one train() call = one iteration
        lr_scheduler_type="constant",  # the trainer is reused: a schedule would reach 0 after one call
        num_sample_generations=0)
    # TRL's train() reads only these two ids from its processing class (the collator is given).
    ids = types.SimpleNamespace(pad_token_id=V, eos_token_id=1)
    trainer = ppo_trainer.PPOTrainer(
        args=args, processing_class=ids, model=policy, ref_model=None, reward_model=reward,
        value_model=value, train_dataset=Dataset.from_dict({"input_ids": prompts().tolist()}),
        data_collator=transformers.default_data_collator)
    out_dir.cleanup()  # TRL creates it here; with save_strategy="no" it writes nothing there
    assert trainer.accelerator.mixed_precision == "no"

    # Phase marks, set by wrappers around the functions TRL's train() calls.
    marks = {}
    batch_generation, forward, log = ppo_trainer.batch_generation, ppo_trainer.forward, trainer.log

    def timed_generation(*a, **k):
        marks["generation"] = now()
        query_responses, logits = batch_generation(*a, **k)
        assert query_responses.shape == (B, P + N), query_responses.shape  # no early stop
        marks["scoring"] = now()
        return query_responses, logits

    def timed_forward(*a, **k):
        if torch.is_grad_enabled():  # only the update's forwards take gradients
            marks.setdefault("update", now())
            marks["steps"] = marks.get("steps", 0) + 1
        return forward(*a, **k)

    def timed_log(*a, **k):
        marks.setdefault("end", now())  # the first log call of train() follows the update
        return log(*a, **k)

    ppo_trainer.batch_generation, ppo_trainer.forward, trainer.log = timed_generation, timed_forward, timed_log

    def iteration(i: int = 0) -> dict:
        marks.clear()
        t = now()
        with contextlib.redirect_stdout(sys.stderr):  # TRL prints its banner and logs
            trainer.train()
        call = since(t)
        assert marks["steps"] == 16, marks
        return {"generation": since(marks["generation"], marks["scoring"]),
                "scoring": since(marks["scoring"], marks["update"]),
                "update": since(marks["update"], marks["end"]), "train_call": call}

    # Warm up, then the faster of 1 thread and all cores: on a busy machine torch's OpenMP
    # threads can spin-wait on each other and run several times slower with 2 than with 1.
    cores = torch.get_num_threads()
    torch.set_num_threads(1)
    iteration()
    trial = {}
    for n in sorted({1, cores}):
        torch.set_num_threads(n)
        trial[n] = iteration()["train_call"][0]
    threads = min(trial, key=trial.get)
    torch.set_num_threads(threads)
    info = {"version": trl.__version__, "torch_version": torch.__version__,
            "transformers_version": transformers.__version__, "threads": threads,
            "thread_trial_s": {str(n): round(s, 3) for n, s in trial.items()}}
    return iteration, info


def summarise(rounds: list[dict]) -> dict:
    """Medians over rounds of each phase and of their sum, in wall and CPU seconds."""
    out = {}
    for j, unit in enumerate(("seconds", "cpu_seconds")):
        med = {k: statistics.median(r[k][j] for r in rounds) for k in PHASES}
        med["total"] = statistics.median(sum(r[k][j] for k in PHASES) for r in rounds)
        out[unit] = med
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trl", action="store_true", help="measure TRL's PPOTrainer in the same run")
    ap.add_argument("--value-model", choices=["separate", "shared", "both"], default="both",
                    help="minichat's ppo.value_model (both: the two, interleaved)")
    ap.add_argument("--splits", type=int, default=ParallelConfig().cpu_splits,
                    help="concurrent sub-batches per micro-batch (parallel.cpu_splits, what the "
                         "stage uses on a CPU; 1 = one chain)")
    args = ap.parse_args()
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/minichat/jax"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    runners, trl_info = {}, None
    if args.trl:
        try:
            runners["trl"], trl_info = trl_runner()
        except ImportError as e:
            trl_info = f"trl not importable ({e})"
            print(f"{trl_info}: using the quoted figure", file=sys.stderr)
    variants = ["separate", "shared"] if args.value_model == "both" else [args.value_model]
    names = {"separate": "minichat", "shared": "minichat_shared_value"}  # keys of the output
    lengths = {}
    for v in variants:
        runners[names[v]], lengths[v] = minichat_runner(v, args.splits)
    rounds = {name: [] for name in runners}
    first = {}
    for i in range(args.repeats + 1):  # interleaved; round 0 compiles / warms up and is dropped
        for name, run in runners.items():
            t = time.perf_counter()
            phases = run(i)
            if i == 0:
                first[name] = time.perf_counter() - t
            else:
                rounds[name].append(phases)
    ours = {}
    for v in variants:
        name = names[v]
        ours[name] = {**summarise(rounds[name]), "first_iteration_with_compile_s": first[name],
                      "mean_reply_tokens": float(np.mean(lengths[v][1:])), "repeats": args.repeats,
                      "value_model": v, "splits": args.splits}
        ours[name]["rollout_tokens_per_s"] = (B * ours[name]["mean_reply_tokens"]
                                              / ours[name]["seconds"]["generation"])
    if "trl" in runners:
        trl = {**summarise(rounds["trl"]), **trl_info, "repeats": args.repeats,
               "train_call_s": statistics.median(r["train_call"][0] for r in rounds["trl"]),
               "source": "measured in this run", "quoted_in_issue": TRL_QUOTED}
    else:
        why = trl_info or "--trl not given"
        trl = {"seconds": TRL_QUOTED,
               "source": f"quoted in issue 5 (trl 1.12 PPOTrainer), not re-measured: {why}"}
    out = {
        "shape": {"prompts": B, "prompt_tokens": P, "new_tokens": N, "epochs": 4, "minibatches": 4,
                  "model": "tiny (4 x 128, vocab 2048)"},
        "devices": [str(d) for d in jax.devices()][:1], "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        **ours,
        "trl": trl,
    }
    for name, o in ours.items():  # ratio_trl_over_minichat, ..._minichat_shared_value
        out[f"ratio_trl_over_{name}"] = {k: trl["seconds"][k] / o["seconds"][k] for k in trl["seconds"]}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
