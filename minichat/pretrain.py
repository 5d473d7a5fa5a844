"""Stage 0 of the recipe: pretrain a GPT on next-token prediction.

The model maximises the log-likelihood of its corpus (Radford et al. 2018/2019):

    L(theta) = -1/|M| sum_{t in M} log p_theta(x_{t+1} | x_{<=t})                  (1)

where M is the set of positions whose target counts. Pretraining counts every position;
supervised fine-tuning (sft.py) is the same loss with M = the assistant's tokens, which
is why `lm_loss` takes a mask and why `fit`, the loop below, serves both stages.

Optimisation follows GPT-2/nanoGPT: AdamW (Loshchilov & Hutter 2019) with weight decay
on matrices only, linear warmup then cosine decay, global-norm gradient clipping. The
train step is one `jax.jit`-compiled pure function of (params, opt_state, batch) with
donated buffers; under a device mesh (parallel.py) the same step runs data-parallel.
"""

from __future__ import annotations

import math
import os
import signal
import time
import warnings
import zlib
from collections.abc import Callable
from typing import NamedTuple
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from minichat.checkpoint import Checkpointer, MetricsLog, mark_done, restore_newest_readable, stage_dir
from minichat.data import lm_batch, load_texts, pack_documents
from minichat.model import logprobs_from_logits
from minichat.parallel import device_peak_flops, is_main, mesh_size, mfu, require_divisible, shard_batch, shard_state, to_host

# {"tokens": (B, T+1) int32, "loss_mask": (B, T+1) 0/1}; rows with padding add "valid":
# (B, T+1) 0/1, and packed rows (SFT) "segments": (B, T+1) int32 ids of the sequences
# sharing a row. Without "valid" the model runs plain causal attention (faster kernels).
Batch = dict


# ---- the loss (pure) -------------------------------------------------------------------
def lm_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Eq. (1): mean negative log-likelihood of `targets` over positions where mask = 1.

    Computed in float32 whatever the compute dtype. A batch with no counted position
    gives 0 (not NaN): the denominator is clamped at 1.
    """
    nll = -logprobs_from_logits(logits, targets)  # float32 log softmax at the targets
    mask = mask.astype(jnp.float32)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def batch_loss(model, batch: Batch, dropout_key=None) -> jax.Array:
    """Next-token loss of a batch: inputs are tokens[:, :-1], targets tokens[:, 1:]."""
    tokens = batch["tokens"]
    segments = batch["segments"][:, :-1] if "segments" in batch else None
    valid = batch["valid"][:, :-1] if "valid" in batch else None  # None: unpadded rows, plain causal
    logits, _ = model(tokens[:, :-1], valid, segments=segments,
                      dropout_key=dropout_key)
    return lm_loss(logits, tokens[:, 1:], batch["loss_mask"][:, 1:])


def batch_weight(batch: Batch) -> jax.Array:
    """The number of positions `batch_loss` averages over: a sub-batch's share of the mean."""
    return jnp.sum(batch["loss_mask"][:, 1:])


# ---- optimiser and the jitted step -----------------------------------------------------
def make_optimizer(cfg, total_steps: int):
    """AdamW + warmup/cosine schedule + clipping; decay only matrices (not biases, LN)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=min(cfg.warmup_steps, max(total_steps - 1, 1)),
        decay_steps=max(total_steps, 2), end_value=cfg.lr * cfg.min_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        # 0 = no clipping, as in nanoGPT (optax would scale every gradient to 0)
        optax.clip_by_global_norm(cfg.grad_clip) if cfg.grad_clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask),
    )
    return tx, schedule


def make_train_step(graphdef, tx, loss_fn: Callable = batch_loss, rest=None, *, splits: int = 1,
                    weight_fn: Callable = batch_weight):
    """A jitted `step(params, opt_state, batch, dropout_key=None) -> (params, opt_state,
    metrics)`.

    Pure over arrays: the graph definition is static, params/opt_state are donated so
    XLA updates them in place. `rest` holds the model's non-parameter state, if any.
    `dropout_key` (see `step_dropout_key`) turns the model's dropout on for this step.
    `splits` > 1 computes the gradient as that many sub-batches (`split_value_and_grad`),
    weighted by `weight_fn`, the count that `loss_fn` averages over.
    """
    rest = () if rest is None else (rest,)

    def step(params, opt_state, batch, dropout_key=None):
        def objective(p, b, key):
            return loss_fn(nnx.merge(graphdef, p, *rest), b, dropout_key=key)

        if splits > 1 and batch["tokens"].shape[0] % splits == 0:
            loss, grads = split_value_and_grad(objective, params, batch, dropout_key, splits, weight_fn)
        else:
            loss, grads = jax.value_and_grad(objective)(params, batch, dropout_key)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


def sub_batch(x, i: int, splits: int):
    """Rows i, i + splits, ... of x: sub-batch i of `splits`. Strided, so each device's shard
    of a data-parallel batch keeps its rows on that device."""
    return x.reshape(x.shape[0] // splits, splits, *x.shape[1:])[:, i]


def split_value_and_grad(objective: Callable, params, batch: Batch, key, splits: int, weight_fn: Callable):
    """`objective(params, batch, key)`'s value and gradient, computed as `splits` sub-batches
    (rows i, i + splits, ...) in one program and weighted back into the whole batch's mean.

    The sub-batches share no work, so XLA:CPU runs them concurrently on its threads, where a
    tiny model's one chain of small matmuls leaves part of the machine idle: on 2 cores the
    tiny preset's step trains 11% more tokens/s with two halves (docs 01). The strided rows
    keep each device's shard of a data-parallel batch on that device. Sub-batch i's dropout
    key is `fold_in(key, i)`.
    """
    parts = [jax.tree.map(lambda x: sub_batch(x, i, splits), batch) for i in range(splits)]
    keys = [None if key is None else jax.random.fold_in(key, i) for i in range(splits)]
    # each part's mean weighted by its share of the counted positions is the whole batch's
    # mean; the clamp is lm_loss's (with nothing counted, every part's loss is 0 anyway)
    counts = jnp.stack([weight_fn(b) for b in parts]).astype(jnp.float32)
    weights = counts / jnp.maximum(jnp.sum(counts), 1.0)
    outs = [jax.value_and_grad(objective)(params, b, k) for b, k in zip(parts, keys)]
    loss = sum(w * l for w, (l, _) in zip(weights, outs))
    grads = jax.tree.map(lambda *g: sum(w * x for w, x in zip(weights, g)), *[g for _, g in outs])
    return loss, grads


def cpu_splits(cfg, mesh) -> int:
    """`parallel.cpu_splits` on a CPU mesh, 1 on accelerators (whose kernels want the whole
    batch in one matmul)."""
    return cfg.parallel.cpu_splits if all(d.platform == "cpu" for d in mesh.devices.flat) else 1


def step_dropout_key(cfg, stage: str, step: int):
    """The dropout key of one training step, or None when `model.dropout` is 0.

    A function of (seed, stage, step) only, so a resumed run draws the same masks as an
    uninterrupted one, and no random state needs checkpointing."""
    if cfg.model.dropout <= 0:
        return None
    stage_key = jax.random.fold_in(jax.random.key(cfg.seed), zlib.crc32(stage.encode()))
    return jax.random.fold_in(stage_key, step)


def throughput(count: bool, tokens: int, seconds: float, n_tok: int, t_train: float):
    """(tokens/s, n_tok, t_train) after a step of `tokens` in `seconds`: the running rate
    over counted steps (all but a run's first, which is mostly compilation); the first
    step's own rate until there is one."""
    if count:
        n_tok, t_train = n_tok + tokens, t_train + seconds
    return (n_tok / t_train if t_train > 0 else tokens / max(seconds, 1e-9)), n_tok, t_train


def make_eval_step(graphdef, loss_fn: Callable = batch_loss, rest=None):
    rest = () if rest is None else (rest,)
    return jax.jit(lambda params, batch: loss_fn(nnx.merge(graphdef, params, *rest), batch))


# ---- the loop shared by pretraining and SFT --------------------------------------------
class TrainStart(NamedTuple):
    graphdef: object
    rest: object  # non-parameter model state, or None
    tx: optax.GradientTransformation
    schedule: Callable
    params: object
    opt_state: object
    ckpt: Checkpointer
    start: int  # first step to run (0, or the resumed checkpoint's step)
    log: MetricsLog


def start_training(model, optim_cfg, total_steps: int, mesh, sdir: str, *, keep: int, cfg,
                   stage: str) -> TrainStart:
    """Everything a training loop needs before its first step: parameters and optimizer
    state on the mesh, restored from the stage's newest checkpoint when resuming, and the
    metrics log cut back to that step. Shared by `fit` and the reward model's loop."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    rest = rest[0] if rest and jax.tree.leaves(rest[0]) else None
    tx, schedule = make_optimizer(optim_cfg, total_steps)
    params = shard_state(params, mesh)
    # Place the optimizer state on the mesh too (Adam's step count would otherwise be
    # committed to device 0, and a restored one would not match the sharded params).
    opt_state = shard_state(jax.jit(tx.init)(params), mesh)
    ckpt = Checkpointer(os.path.join(sdir, "checkpoints"), keep=keep)
    start = 0
    restored = restore_newest_readable(
        {"checkpoints": ckpt}, lambda step: ckpt.restore(step, params, opt_state, model_cfg=cfg.model),
        stage) if cfg.resume else None
    if restored is not None:
        params, opt_state, meta = restored
        start = int(meta["step"])
        print(f"[{stage}] resuming from step {start}")
    log = MetricsLog(os.path.join(sdir, "metrics.jsonl"), resume_step=start if start else None)
    return TrainStart(graphdef, rest, tx, schedule, params, opt_state, ckpt, start, log)


def fit(model, *, stage: str, run_dir: str, cfg, scfg, mesh, get_batch: Callable[[int], Batch],
        eval_batches: list[Batch], tokens_per_step: int, loss_fn: Callable = batch_loss):
    """Train `model` for `scfg.steps` steps; resumable, logged, checkpointed.

    `get_batch(step)` must be a pure function of the step so that a resumed run sees the
    same data as an uninterrupted one. Returns the trained model.
    """
    sdir = stage_dir(run_dir, stage)
    st = start_training(model, scfg.optim, scfg.steps, mesh, sdir, keep=scfg.keep, cfg=cfg, stage=stage)
    graphdef, rest, tx, schedule = st.graphdef, st.rest, st.tx, st.schedule
    params, opt_state, ckpt, start, log = st.params, st.opt_state, st.ckpt, st.start, st.log

    # batch_weight is batch_loss's count: another loss would need its own weights to split
    splits = cpu_splits(cfg, mesh) if loss_fn is batch_loss else 1
    step_fn = make_train_step(graphdef, tx, loss_fn, rest, splits=splits)
    eval_fn = make_eval_step(graphdef, loss_fn, rest)
    evaluate = lambda p: float(np.mean([to_host(eval_fn(p, shard_batch(b, mesh))) for b in eval_batches]))
    meta = lambda s: {"step": s, "model": asdict(cfg.model), "stage": stage}

    fault_step = int(os.environ.get("MINICHAT_SIGKILL_AT_STEP", "0"))
    if start == 0 and eval_batches:
        log.log({"step": 0, "eval_loss": evaluate(params)})
    bar = tqdm(range(start, scfg.steps), initial=start, total=scfg.steps, desc=stage,
               disable=not (cfg.progress and is_main()), dynamic_ncols=True)
    # tokens/s: training steps only (no evaluation), without the first (mostly compilation)
    n_tok, t_train = 0, 0.0
    peak, fpt = device_peak_flops(cfg.parallel.peak_flops), None
    for step in bar:
        batch = get_batch(step)
        if fpt is None:  # model FLOPs per token at this batch's sequence length (for MFU)
            from minichat.model import flops_per_token
            fpt = flops_per_token(cfg.model, batch["tokens"].shape[1] - 1)
        t0 = time.perf_counter()
        params, opt_state, metrics = step_fn(params, opt_state, shard_batch(batch, mesh),
                                             step_dropout_key(cfg, stage, step))
        loss = to_host(metrics["loss"])  # a host sync per step: keeps the log exact and cheap
        tok_s, n_tok, t_train = throughput(step > start, tokens_per_step, time.perf_counter() - t0,
                                           n_tok, t_train)
        if not math.isfinite(loss):
            raise FloatingPointError(f"[{stage}] loss became {loss} at step {step + 1}; "
                                     f"lower {stage}.optim.lr or check the data")
        row = {"step": step + 1, "loss": loss, "grad_norm": to_host(metrics["grad_norm"]),
               "lr": float(schedule(step)), "tokens_per_s": tok_s,
               "mfu": mfu(tok_s, fpt, mesh_size(mesh), peak)}
        if eval_batches and ((step + 1) % scfg.eval_every == 0 or step + 1 == scfg.steps):
            row["eval_loss"] = evaluate(params)
        log.log(row)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        if (step + 1) % scfg.checkpoint_every == 0 or step + 1 == scfg.steps:
            ckpt.save(step + 1, params, opt_state, meta(step + 1))
        if fault_step == step + 1:  # fault injection for the kill-and-resume test:
            ckpt.wait()  # let the last async save commit, so the resume point is deterministic
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    ckpt.close()
    return nnx.merge(graphdef, params, *([rest] if rest is not None else [])), log.rows


# ---- stage 0 -------------------------------------------------------------------------
def corpus_documents(cfg) -> list[str]:
    """The user's files if given, else the ChatWorld corpus."""
    if cfg.pretrain.files:
        return load_texts(list(cfg.pretrain.files))
    from minichat.world import world_from_config, generate_corpus
    return generate_corpus(world_from_config(cfg.world), n_docs=cfg.world.n_docs, seed=cfg.world.seed)


def split_streams(docs: list[str], tok, heldout_frac: float = 0.05):
    """(train, held-out) token streams: the last `heldout_frac` of the documents are held
    out, less those that also occur among the training documents. A generated corpus
    repeats itself (16% of ChatWorld's held-out documents, mostly short notes, have a
    verbatim twin in training), and a loss on those would partly measure memory."""
    n_val = max(1, int(len(docs) * heldout_frac))
    train, val = docs[:-n_val], docs[-n_val:]
    seen = set(train)
    fresh = [d for d in val if d not in seen]
    if not fresh:
        warnings.warn(f"all {len(val)} held-out documents also occur in training; the held-out "
                      f"loss will measure memory", stacklevel=2)
        fresh = val
    return (pack_documents(tok.encode_batch(train), tok.bos_id),
            pack_documents(tok.encode_batch(fresh), tok.bos_id))


def unigram_loss(train: np.ndarray, val: np.ndarray, vocab_size: int) -> float:
    """Cross-entropy of the held-out stream under the train unigram (add-one smoothed):
    the baseline that a language model must clearly beat to have learned any context."""
    counts = np.bincount(train, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val].mean())


def copy_accuracy(logits_fn: Callable, vocab: np.ndarray, *, rows: int = 16, length: int = 32,
                  seed: int = 0) -> dict:
    """Olsson et al. (2022)'s test for induction heads: a random sequence of `length` tokens
    drawn from `vocab`, then the same sequence again. Returns the next-token top-1 accuracy
    on the first copy (nothing to go on but the unigram) and on the repeat (a model that can
    find the earlier occurrence and copy what followed it gets it right). A repeat no better
    than the first copy means no induction heads: replies that must quote the conversation
    (summaries, premises, corrections) are then out of reach. `logits_fn`: (B, T) -> (B, T, V)."""
    rng = np.random.default_rng(seed)
    seq = rng.choice(np.asarray(vocab), size=(rows, length))
    tokens = np.concatenate([seq, seq], axis=1).astype(np.int32)
    hit = np.asarray(logits_fn(jnp.asarray(tokens))).argmax(-1)[:, :-1] == tokens[:, 1:]
    # position length - 1 predicts the repeat's first token, which nothing announces: left out
    return {"first": float(hit[:, :length - 1].mean()), "repeat": float(hit[:, length:].mean())}


# ---- optional: a copying task for induction heads (CopyConfig) --------------------------
def copy_batch(step: int, *, rows: int, width: int, vocab: np.ndarray, span_min: int, span_max: int,
               seed: int = 0) -> Batch:
    """`rows` rows of `width` random tokens from `vocab` in which the first `span` tokens
    recur after a gap: span ~ U[span_min, span_max], gap ~ U[0, width - 2 span]. The loss
    counts only the recurrence after its first token, the one place where a model that
    copies (an induction head: find the earlier occurrence of the current token, predict
    what followed it) beats chance. Random tokens leave no other way to lower that loss,
    so the task teaches copying and nothing else. A pure function of `step` (resumable)."""
    rng = np.random.default_rng([seed, 0xC0B1, step])
    tokens = rng.choice(np.asarray(vocab), size=(rows, width)).astype(np.int32)
    loss_mask = np.zeros((rows, width), np.int32)
    for r in range(rows):
        span = int(rng.integers(span_min, span_max + 1))
        start = span + int(rng.integers(0, width - 2 * span + 1))
        tokens[r, start:start + span] = tokens[r, :span]
        loss_mask[r, start + 1:start + span] = 1  # targets: the recurrence less its first token
    return {"tokens": tokens, "loss_mask": loss_mask}


def with_copy_rows(get_batch: Callable[[int], Batch], n: int, copy: Callable[[int], Batch]):
    """`get_batch` with its last `n` rows replaced by `copy(step)`'s (same width), so that
    pretraining keeps the heads the warm-up gave: without these rows, 1,600 steps of
    ChatWorld text erased them (copy test 0.91 -> 0.00, docs 02)."""
    def mixed(step):
        batch, extra = get_batch(step), copy(step)
        return {k: np.concatenate([batch[k][:-n], extra[k][:n].astype(batch[k].dtype)]) for k in batch}
    return mixed


def copy_warmup(model, cfg, run_dir: str, mesh, vocab: np.ndarray, width: int):
    """`pretrain.copy.steps` steps of the copying task alone, as its own resumable stage
    (`pretrain/copy`, with its optimizer), so that pretraining starts from induction heads.
    Its loss sits at ln |vocab| for about a thousand steps, then falls in a few hundred: the
    phase change of Olsson et al. (2022), plotted in pretrain/copy_loss.png. Returns the
    model and a summary for the report."""
    ccfg = cfg.pretrain.copy
    task = dict(width=width, vocab=vocab, span_min=ccfg.span_min, span_max=ccfg.span_max)
    get_batch = lambda step: copy_batch(step, rows=ccfg.batch_size, seed=cfg.seed, **task)
    eval_batches = [copy_batch(i, rows=ccfg.batch_size, seed=cfg.seed + 1, **task)
                    for i in range(ccfg.eval_batches)]
    model, rows = fit(model, stage="pretrain/copy", run_dir=run_dir, cfg=cfg, scfg=ccfg, mesh=mesh,
                      get_batch=get_batch, eval_batches=eval_batches,
                      tokens_per_step=ccfg.batch_size * (width - 1))
    chance = math.log(len(vocab))
    if is_main():
        from minichat.evaluate import plot_curves
        plot_curves(rows, os.path.join(stage_dir(run_dir, "pretrain"), "copy_loss.png"), ["loss", "eval_loss"],
                    title="copying warm-up: loss on the recurrence", hline=(chance, "chance (ln |vocab|)"))
    evals = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return model, {"steps": ccfg.steps, "rows": ccfg.rows, "chance": chance,
                   "eval_loss": evals[-1] if evals else None}


def run(cfg, run_dir: str, tok, mesh) -> dict:
    from minichat.model import GPT
    from minichat.sampling import generate

    t_start = time.perf_counter()
    seq_len, bsz = cfg.pretrain.seq_len or cfg.model.block_size, cfg.pretrain.batch_size
    if seq_len > cfg.model.block_size:
        raise ValueError(f"pretrain.seq_len={seq_len} exceeds model.block_size={cfg.model.block_size}")
    batches = {"pretrain.batch_size": bsz}
    if cfg.pretrain.copy.steps:
        batches["pretrain.copy.batch_size"] = cfg.pretrain.copy.batch_size
    for key, size in batches.items():
        require_divisible(key, size, mesh)
    train, val = split_streams(corpus_documents(cfg), tok)
    for name, stream in (("training", train), ("held-out", val)):
        if len(stream) < seq_len + 1:  # the held-out part is the last 5% of the documents
            raise ValueError(f"pretrain: the {name} text has {len(stream):,} tokens, fewer than one "
                             f"window of pretrain.seq_len + 1 = {seq_len + 1}; give pretrain.files "
                             f"more text or lower pretrain.seq_len")
    baseline = unigram_loss(train, val, tok.vocab_size)
    print(f"[pretrain] {len(train):,} train / {len(val):,} held-out tokens; "
          f"unigram baseline {baseline:.3f} nats")

    def as_batch(tokens):  # full windows of the token stream: no "valid" (no padding)
        return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}

    get_batch = lambda step: as_batch(lm_batch(train, step, bsz, seq_len, cfg.seed))
    specials = np.asarray(sorted(tok.special_ids))
    # The copying task draws from every ordinary token. With only the ~900 the corpus uses,
    # a row of 129 repeats a token by chance far more often, and the warm-up never left its
    # plateau in 1,500 steps (twice); with all 2,042 the phase change came at ~1,350.
    task_vocab = np.setdiff1d(np.arange(tok.vocab_size), specials)
    ccfg = cfg.pretrain.copy
    if ccfg.rows:
        get_batch = with_copy_rows(get_batch, ccfg.rows, lambda step: copy_batch(
            step, rows=ccfg.rows, width=seq_len + 1, vocab=task_vocab, span_min=ccfg.span_min,
            span_max=ccfg.span_max, seed=cfg.seed + 2))
    n_eval = min(cfg.pretrain.eval_batches, max(1, (len(val) - 1) // (seq_len * bsz)))
    eval_batches = [as_batch(lm_batch(val, i, bsz, seq_len, cfg.seed + 1)) for i in range(n_eval)]

    model = GPT.init(cfg.model, cfg.seed)
    warmup = {}
    if ccfg.steps:
        model, warmup = copy_warmup(model, cfg, run_dir, mesh, task_vocab, seq_len + 1)
    model, rows = fit(model, stage="pretrain", run_dir=run_dir, cfg=cfg, scfg=cfg.pretrain, mesh=mesh,
                      get_batch=get_batch, eval_batches=eval_batches, tokens_per_step=bsz * seq_len)

    from minichat.evaluate import plot_curves
    sdir = stage_dir(run_dir, "pretrain")
    if is_main():
        plot_curves(rows, os.path.join(sdir, "loss.png"), ["loss", "eval_loss"],
                    title="pretraining loss", hline=(baseline, "unigram baseline"))

    # Sampling runs on one host's devices; a multi-host run leaves it to `minichat.chat`.
    samples = sample_texts(model, tok, cfg, generate) if jax.process_count() == 1 else []
    for s in samples:
        print(f"[pretrain sample] {s}")
    eval_loss = next(r["eval_loss"] for r in reversed(rows) if "eval_loss" in r)
    vocab = np.setdiff1d(np.unique(train), specials)  # the test uses trained embeddings only
    copy = copy_accuracy(lambda x: model(x)[0], vocab, length=min(32, cfg.model.block_size // 2),
                         seed=cfg.seed) if jax.process_count() == 1 else {}
    summary = {"eval_loss": eval_loss, "unigram_loss": baseline, "train_loss": rows[-1].get("loss"),
               "steps": cfg.pretrain.steps, "seconds": time.perf_counter() - t_start, "samples": samples,
               "copy_accuracy": copy, "copy_warmup": warmup}
    mark_done(run_dir, "pretrain", summary)
    print(f"[pretrain] held-out loss {eval_loss:.3f} nats vs unigram {baseline:.3f}")
    if copy:
        print(f"[pretrain] in-context copying: top-1 {copy['repeat']:.2f} on a repeated random sequence "
              f"vs {copy['first']:.2f} on its first copy")
    return summary


def sample_texts(model, tok, cfg, generate, starts=("The capital of", "Dear", "Once upon a time")) -> list[str]:
    from minichat.data import pad_rows
    starts = list(starts)[: max(cfg.pretrain.samples, 0)]
    if not starts:
        return []
    rows = [[tok.bos_id] + tok.encode(s) for s in starts]
    width = max(map(len, rows))
    prompts = pad_rows(rows, width, tok.pad_id, left=True)
    mask = (np.arange(width)[None, :] >= (width - np.array([len(r) for r in rows]))[:, None]).astype(np.int32)
    out = generate(model, prompts, mask, jax.random.key(cfg.seed), max_new_tokens=48, temperature=0.8,
                   top_k=0, top_p=0.95, end_id=tok.bos_id, pad_id=tok.pad_id)
    toks, gen_mask = np.asarray(out.tokens), np.asarray(out.mask)
    return [s + tok.decode(toks[i][gen_mask[i] > 0]) for i, s in enumerate(starts)]
