"""Stage 2 of the recipe: reward model from ranked comparisons (InstructGPT, Ouyang et al. 2022,
eq. 1; Stiennon et al. 2020).

A labeler ranks K replies to one prompt. Every one of the C(K, 2) pairs (y_w ranked above y_l)
gives a term -log sigmoid(r(x, y_w) - r(x, y_l)); the pairs of one prompt are ONE batch element
(InstructGPT trains on all pairs of a prompt together, which avoids the overfitting seen when the
pairs are shuffled across the dataset). Pairwise data is the special case K = 2.

The reward is a scalar read at the reply's last real token, i.e. its end token (Stiennon et al.
2020). After training, a bias is added so that the SFT demonstrations score 0 on average
(InstructGPT section 3.5), which makes the PPO reward scale interpretable.

Conventions
-----------
* ``rewards[b, k]``: reward of completion ``k`` of prompt ``b``, in the order the completions are
  *listed* (the order they were fed to the model).
* ``ranking[b, r]``: index (into the listing) of the completion at rank ``r``; ``r = 0`` is the
  best. Each row must be a permutation of ``range(K)``; padding completions may sit anywhere in
  it (typically at the end) because they are removed by ``valid``.
* ``valid[b, k]``: completion ``k`` of prompt ``b`` is real (prompts may have fewer than K
  completions). Indexed by listing position, like ``rewards``.

The stage (below the losses)
----------------------------
* ``run_comparisons(cfg, run_dir, tok, mesh, policy_stage="sft", stage="comparisons")``: K
  replies per ChatWorld prompt sampled from the policy checkpoint, ranked by a simulated
  labeler (Bradley-Terry / Gumbel noise, optional length bias), written as K-way JSONL
  (``<stage>/comparisons_{train,heldout}.jsonl``, with ``gold``/``ended``/``family``/``meta``).
* ``run(cfg, run_dir, tok, mesh, stage="reward", comparisons_stage="comparisons")``: the
  RM = SFT trunk + scalar head (``ScalarGPT.from_gpt``), two epochs of ``rm_loss`` with a
  decaying learning rate, the [prompt | reply | <|end|>] sequences of each batch ``pack``ed
  end to end into rows;
  then the normalisation bias, the held-out evaluation (pairwise accuracy beside the labelers'
  agreement ceiling, per family; Spearman with the gold judge) and plots. Users' K-way or
  pairwise files (``reward.files``) replace the sampled comparisons.
* For PPO: ``load_reward_model(run_dir, cfg, stage) -> (ScalarGPT, bias)`` and
  ``score(model, tokens, mask, bias) -> (B,)``, the head read at ``last_token_index(mask)``.
"""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import time
import warnings
import zlib
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np

from minichat.config import K_RANGE
from minichat.data import DataError, load_comparisons, read_jsonl, write_jsonl

__all__ = [
    "rm_loss",
    "pair_matrix",
    "last_token_index",
    "gather_at",
    "normalisation_bias",
    "run_comparisons",
    "run",
    "load_reward_model",
    "score",
    "encode_comparisons",
    "batch_rewards",
    "batch_loss",
    "spearman",
]


# ---- losses (pure functions) ----


def pair_matrix(ranking: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """The (B, K, K) bool matrix ``above[b, i, j]``: completion i is ranked above completion j.

    Built from the inverse permutation of ``ranking``: ``rank[b, k]`` is the rank of completion
    k, and i beats j iff ``rank[i] < rank[j]``. Both completions must be valid. Each prompt with
    K_b valid completions has exactly C(K_b, 2) True entries (InstructGPT eq. 1's pairs).
    """
    ranking = jnp.asarray(ranking)
    rank = jnp.argsort(ranking, axis=-1)  # inverse permutation: rank of each listed completion
    above = rank[:, :, None] < rank[:, None, :]
    if valid is not None:
        valid = jnp.asarray(valid, dtype=bool)
        above = above & valid[:, :, None] & valid[:, None, :]
    return above


def rm_loss(
    rewards: jax.Array, ranking: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """K-way reward-model loss of InstructGPT (Ouyang et al. 2022, eq. 1).

        loss(theta) = -1/C(K,2) * E_{(x, y_w, y_l) ~ D} [ log sigmoid(r(x, y_w) - r(x, y_l)) ]

    All C(K_b, 2) pairs of prompt b form one batch element: the per-pair losses are averaged
    within the prompt, then the prompts are averaged (each prompt weighs the same whatever its
    K_b). Prompts with fewer than 2 valid completions have no pair and are left out of the mean.
    A pair of identical replies (the policy often samples one twice) gets identical rewards, so
    it adds log 2 and no gradient: a prompt with d such pairs of its C trains with weight
    (C - d) / C, as in InstructGPT's loss taken literally.
    Computed with ``jax.nn.log_sigmoid`` (stable for large margins) and a (K, K) pair matrix, no
    Python loop over pairs.

    Args:
      rewards: (B, K) float, reward of each listed completion.
      ranking: (B, K) int, ``ranking[b, 0]`` = index of the best completion, ..., last = worst.
      valid: optional (B, K) bool, real completions (by listing index). ``None`` = all real.

    Returns:
      ``(loss, metrics)`` with scalar metrics, each prompt weighted equally as in the loss:
        * ``accuracy``: fraction of pairs with r_w > r_l, a tie counting half (identical
          replies get identical rewards: a coin flip, not a mistake);
        * ``margin``: mean of r_w - r_l over pairs;
        * ``chosen`` / ``rejected``: mean reward of the BEST / WORST valid completion of each
          prompt (for K = 2: the chosen and the rejected reply);
        * ``num_pairs``: total number of pairs in the batch (sum of C(K_b, 2)).
    """
    rewards = jnp.asarray(rewards)
    B, K = rewards.shape
    if valid is None:
        valid = jnp.ones((B, K), dtype=bool)
    valid = jnp.asarray(valid, dtype=bool)
    above = pair_matrix(ranking, valid)  # (B, K, K)
    # Sanitize padded rewards so garbage (NaN/inf) there cannot leak through 0 * NaN.
    r = jnp.where(valid, rewards, 0.0)
    diff = r[:, :, None] - r[:, None, :]  # diff[b, i, j] = r_i - r_j
    pair_loss = -jax.nn.log_sigmoid(diff)

    n_pairs = above.sum(axis=(1, 2))  # (B,) = C(K_b, 2)
    has_pairs = n_pairs > 0
    denom = jnp.maximum(n_pairs, 1).astype(r.dtype)
    n_prompts = jnp.maximum(has_pairs.sum(), 1).astype(r.dtype)

    def per_prompt_mean(x):
        s = jnp.where(above, x, 0.0).sum(axis=(1, 2)) / denom
        return jnp.where(has_pairs, s, 0.0).sum() / n_prompts

    loss = per_prompt_mean(pair_loss)

    rank = jnp.argsort(jnp.asarray(ranking), axis=-1)
    best = jnp.argmin(jnp.where(valid, rank, K), axis=-1)
    worst = jnp.argmax(jnp.where(valid, rank, -1), axis=-1)
    chosen = jnp.take_along_axis(r, best[:, None], axis=1)[:, 0]
    rejected = jnp.take_along_axis(r, worst[:, None], axis=1)[:, 0]
    metrics = {
        "accuracy": per_prompt_mean((diff > 0).astype(r.dtype) + 0.5 * (diff == 0).astype(r.dtype)),
        "margin": per_prompt_mean(diff),
        "chosen": jnp.where(has_pairs, chosen, 0.0).sum() / n_prompts,
        "rejected": jnp.where(has_pairs, rejected, 0.0).sum() / n_prompts,
        "num_pairs": n_pairs.sum(),
    }
    return loss, metrics


def last_token_index(mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row of a (B, T) attention mask -> (B,) int32.

    This is where the reward model's scalar is read (Stiennon et al. 2020): the reply's last
    token, i.e. its end token. Works for right padding (``[1 1 1 0 0]`` -> 2), left padding
    (``[0 0 1 1 1]`` -> 4) and prompt-left-padded + reply-right-padded rows alike, because it
    is the largest t with ``mask[t] != 0``. A row with no real token gives 0 (callers that care
    must check ``mask.any(-1)``).
    """
    mask = jnp.asarray(mask) != 0
    T = mask.shape[-1]
    t = jnp.arange(T, dtype=jnp.int32)
    return jnp.max(jnp.where(mask, t, 0), axis=-1)


def gather_at(x: jax.Array, idx: jax.Array) -> jax.Array:
    """``out[b] = x[b, idx[b]]`` for x (B, T) and idx (B,) -> (B,)."""
    x = jnp.asarray(x)
    idx = jnp.asarray(idx)
    return jnp.take_along_axis(x, idx[:, None].astype(jnp.int32), axis=1)[:, 0]


def normalisation_bias(rewards_on_demos: jax.Array) -> jax.Array:
    """Bias to add to the reward head so SFT demonstrations score 0 on average.

    InstructGPT section 3.5: "the reward model is normalized using a bias so that the labeler
    demonstrations achieve a mean score of 0 before doing RL". It is simply ``-mean(rewards)``
    over the demonstrations' rewards (any shape); returned as a 0-d array (``float()`` it to
    store it).
    """
    return -jnp.mean(jnp.asarray(rewards_on_demos))


# =========================================================================================
# The stage: comparison data -> reward model -> evaluation. Everything below is I/O and
# loops around the pure functions above.
# =========================================================================================


# ---- comparison data: sample K replies from the policy, let the labelers rank them ----
def prompt_key(row: dict) -> str:
    """A prompt's identity: its messages, exactly."""
    return json.dumps(row["messages"], sort_keys=True)


def comparison_prompts(cfg, split: str, n: int, stage: str, exclude=frozenset()) -> list[dict]:
    """ChatWorld prompts for comparisons from the world's `split`: its entities, asked in the
    phrasings `cfg.reward.phrasings` ("train" split) or the held-out ones. Each stage (one per
    RLHF round, and its train/held-out halves) draws its own fresh prompts through `stage`.

    `exclude`: `prompt_key`s that must not come back, with no prompt twice either. The
    train split is finite, so fresh draws repeat training prompts (28% of 256 held-out
    prompts in the default run, mostly refusals, clarifications and facts); a held-out
    accuracy on those would partly measure memory. Each family keeps its share of `n`;
    one whose prompts run out is left short, with a warning."""
    from minichat.world import world_from_config, generate_dialogues, to_prompt
    seed = cfg.world.seed + 1000 + zlib.crc32(stage.encode()) % 100_000  # not SFT's seeds
    world = world_from_config(cfg.world)
    phrasings = cfg.reward.phrasings if split == "train" else split
    draw = lambda m: [to_prompt(d) for d in generate_dialogues(world, m, split, seed=seed, phrasing_split=phrasings)]
    if not exclude:
        return draw(n)
    quota = collections.Counter(p["family"] for p in draw(n))
    for m in (2 * n, 8 * n, 32 * n):
        picked, seen, left = [], set(exclude), collections.Counter(quota)
        for p in draw(m):
            k = prompt_key(p)
            if left[p["family"]] > 0 and k not in seen:
                seen.add(k)
                left[p["family"]] -= 1
                picked.append(p)
        if not +left:
            break
    if +left:
        warnings.warn(f"{stage}: only {len(picked)} of {n} prompts are not among the excluded ones "
                      f"(short: {dict(+left)})", stacklevel=2)
    return picked


def sample_completions(policy, tok, prompts: list[dict], *, k: int, max_new_tokens: int,
                       temperature: float, seed: int, batch_size: int, desc: str = "") -> list[list[dict]]:
    """K replies per prompt from `policy` (`evaluate.sample_replies` with n = K, one prefill
    per prompt: {"text", "ended", "n_tokens"}), as lists in the prompts' order."""
    from minichat.evaluate import sample_replies

    replies = sample_replies(policy, tok, prompts, max_new_tokens=max_new_tokens,
                             temperature=temperature, seed=seed, batch_size=batch_size, n=k, desc=desc,
                             shrink=None)  # thousands of prompts: worth the second loop (sampling.py)
    return [replies[i * k:(i + 1) * k] for i in range(len(prompts))]


def add_reference_replies(cfg, prompts: list[dict], replies: list[list[dict]], *, seed: int):
    """Append the demonstration and `reward.n_flawed` flawed replies (wrong fact, needless
    refusal, padding, ...) to each prompt's policy samples (`reward.with_ideal`)."""
    import random

    from minichat.world import flawed_replies, world_from_config
    rcfg = cfg.reward
    if not (rcfg.with_ideal or rcfg.n_flawed):
        return replies
    if rcfg.k + rcfg.with_ideal + rcfg.n_flawed > K_RANGE[1]:  # config.check says so at start-up
        raise ValueError(f"reward.k + with_ideal + n_flawed = {rcfg.k + rcfg.with_ideal + rcfg.n_flawed}; "
                         f"at most {K_RANGE[1]} completions are ranked per prompt")
    world, rng = world_from_config(cfg.world), random.Random(seed)
    out = []
    for p, reps in zip(prompts, replies):
        extra = [p["ideal"]] if rcfg.with_ideal and p.get("ideal") else []
        if rcfg.n_flawed and "meta" in p:
            flaws = sorted(flawed_replies(p, world, rng).items())
            extra += [text for _, text in rng.sample(flaws, min(rcfg.n_flawed, len(flaws)))]
        out.append(list(reps) + [{"text": t, "ended": True} for t in extra])
    return out


def label(prompts: list[dict], replies: list[list[dict]], *, noise: float, length_bias: float,
          seed: int) -> list[dict]:
    """Gold-score every reply, let one simulated labeler rank each prompt's K replies, and
    return K-way rows in the format of `minichat.data` (plus `ended`, `gold`, `family`, `meta`)."""
    from minichat.world import judge, rank
    from minichat.world.judge import tokens as words
    gen = np.random.default_rng(seed)
    rows = []
    for p, reps in zip(prompts, replies):
        texts = [r["text"] for r in reps]
        gold = [judge(p, r["text"], ended=r["ended"]) for r in reps]
        ranking = rank(gold, [len(words(t)) for t in texts], gen, noise=noise, length_bias=length_bias)
        rows.append({"messages": p["messages"], "completions": texts, "ranking": ranking,
                     "ended": [r["ended"] for r in reps], "gold": [round(g, 4) for g in gold],
                     "family": p["family"], "meta": p["meta"], "ideal": p.get("ideal", "")})
    return rows


def _word_lengths(rows: list[dict]) -> list[list[int]]:
    from minichat.world.judge import tokens as words
    return [[len(words(c)) for c in r["completions"]] for r in rows]


def labeler_ceiling(rows: list[dict], lcfg) -> float:
    """The labelers' own pairwise agreement on these rows (needs their `gold` scores)."""
    from minichat.world import agreement_ceiling
    rows = [r for r in rows if "gold" in r]
    if not rows:
        return float("nan")
    return agreement_ceiling([r["gold"] for r in rows], _word_lengths(rows), noise=lcfg.noise,
                             length_bias=lcfg.length_bias)


def labeler_expectations(rows: list[dict], rewards: np.ndarray, lcfg) -> dict:
    """With the simulated labelers' win probabilities known (rows with `gold`): the rewards'
    accuracy in expectation over labelings (the measured accuracy without its label noise)
    and the best expected accuracy any scorer can reach (`bayes`)."""
    from minichat.world import bayes_accuracy, expected_accuracy
    gold, lengths = [r["gold"] for r in rows], _word_lengths(rows)
    kw = dict(noise=lcfg.noise, length_bias=lcfg.length_bias)
    return {"expected_accuracy": expected_accuracy(gold, [rewards[i, :len(g)] for i, g in enumerate(gold)],
                                                   lengths, **kw),
            "bayes": bayes_accuracy(gold, lengths, **kw)}


def comparison_paths(run_dir: str, stage: str) -> tuple[str, str]:
    d = os.path.join(run_dir, stage)
    return os.path.join(d, "comparisons_train.jsonl"), os.path.join(d, "comparisons_heldout.jsonl")


def run_comparisons(cfg, run_dir: str, tok, mesh, *, policy_stage: str = "sft",
                    stage: str = "comparisons", earlier: tuple[str, ...] = ()) -> dict:
    """Stage `comparisons`: sample K replies per ChatWorld prompt from the `policy_stage`
    checkpoint, rank them with the simulated labelers, write K-way JSONL. The held-out
    prompts are none of this stage's training prompts, nor of the `earlier` comparisons
    stages' (earlier rounds, whose data the reward model may have trained on)."""
    from minichat.checkpoint import mark_done, restore_params, stage_dir
    from minichat.model import GPT
    from minichat.parallel import barrier, is_main

    t0 = time.perf_counter()
    rcfg = cfg.reward
    lo, hi = K_RANGE  # config.check says so at start-up; this guards direct calls
    if not lo <= rcfg.k <= hi:
        raise ValueError(f"reward.k={rcfg.k}: InstructGPT ranks 4 to 9 replies; use {lo}..{hi}")
    stage_dir(run_dir, stage)
    policy = restore_params(run_dir, policy_stage, GPT.init(cfg.model, cfg.seed), cfg.model)
    summary = {"policy_stage": policy_stage, "k": rcfg.k}
    train_keys = frozenset()
    for split, n, path in zip(("train", "heldout"), (rcfg.n_prompts, rcfg.n_heldout),
                              comparison_paths(run_dir, stage)):
        world_split = "train" if split == "train" else rcfg.heldout_split
        # held-out prompts never repeat a training one
        prompts = comparison_prompts(cfg, world_split, n, f"{stage}/{split}", exclude=train_keys)
        if split == "train":
            train_keys = frozenset(map(prompt_key, prompts)).union(
                *({prompt_key(row) for _, row in read_jsonl(comparison_paths(run_dir, s)[0])} for s in earlier))
        seed = cfg.seed + zlib.crc32(f"{stage}/{split}".encode()) % 100_000
        replies = sample_completions(policy, tok, prompts, k=rcfg.k, max_new_tokens=rcfg.max_new_tokens,
                                     temperature=rcfg.sample_temperature, seed=seed,
                                     batch_size=rcfg.sample_batch_size,
                                     desc=f"{stage} ({split})" if cfg.progress else "")
        if split == "train":  # held out: the policy's own samples, the pairs PPO needs ranked
            replies = add_reference_replies(cfg, prompts, replies, seed=seed)
        rows = label(prompts, replies, noise=rcfg.labeler.noise, length_bias=rcfg.labeler.length_bias,
                     seed=seed)
        if is_main():  # multi-host: every process sampled the same rows; one writes them
            write_jsonl(path, rows)
        gold = np.array([g for r in rows for g in r["gold"]])
        summary[split] = {"path": path, "rows": len(rows), "gold_mean": float(gold.mean()),
                          "ended": float(np.mean([e for r in rows for e in r["ended"]])),
                          "tied_pairs": tied_share(rows), "ceiling": labeler_ceiling(rows, rcfg.labeler)}
        print(f"[{stage}] {split}: {len(rows)} prompts x {rcfg.k} replies, gold mean {gold.mean():+.3f}, "
              f"{summary[split]['tied_pairs']:.0%} of pairs tied in gold, labeler agreement "
              f"{summary[split]['ceiling']:.3f} -> {path}")
    summary["seconds"] = time.perf_counter() - t0
    mark_done(run_dir, stage, summary)
    barrier(f"{stage}/written")  # the other processes read these files next
    return summary


def tied_share(rows: list[dict]) -> float:
    """Share of pairs whose replies have the same gold score (only noise can order them)."""
    ties = [abs(g[i] - g[j]) < 1e-9 for g in (r["gold"] for r in rows)
            for i in range(len(g)) for j in range(i + 1, len(g))]
    return float(np.mean(ties)) if ties else float("nan")


def comparison_data(cfg, run_dir: str, stage: str) -> tuple[list[dict], list[dict]]:
    """(train, held-out) K-way rows: the user's files if given, else the stage's files."""
    rcfg = cfg.reward
    if rcfg.files:
        rows = load_comparisons(list(rcfg.files))
        if rcfg.heldout_files:
            return rows, load_comparisons(list(rcfg.heldout_files))
        # held out by prompt, not by line: a prompt the reward model trained on (say, another
        # of its TRL pairs) would make the held-out accuracy a training accuracy
        prompts = sorted({prompt_key(r) for r in rows})
        n_val = max(1, int(round(len(prompts) * rcfg.heldout_frac)))
        if len(prompts) - n_val < 1:
            raise DataError(f"{rcfg.files}: {len(prompts)} distinct prompts are too few to hold "
                            f"{n_val} out")
        order = np.random.default_rng(cfg.seed).permutation(len(prompts))
        held = {prompts[i] for i in order[:n_val]}
        return ([r for r in rows if prompt_key(r) not in held],
                [r for r in rows if prompt_key(r) in held])
    train_path, heldout_path = comparison_paths(run_dir, stage)
    return load_comparisons([train_path]), load_comparisons([heldout_path])


# ---- batches: one prompt = K rows [prompt | reply <|end|> | pad] -------------------------
def encode_comparisons(tok, rows: list[dict], width: int) -> dict:
    """(N, K, T) right-padded token ids and masks, (N, K) ranking and valid.

    K is the largest number of completions of any row; a row with fewer gets padding
    completions (mask all 0, `valid` False) listed after the real ones, and its ranking is
    completed with their indices so it stays a permutation. A sequence longer than `width`
    keeps its last `width` tokens: the prompt's start is cut, the reply and its end token
    (where the reward is read) are kept.
    """
    K = max(len(r["completions"]) for r in rows)
    N = len(rows)
    tokens = np.full((N, K, width), tok.pad_id, np.int32)
    mask = np.zeros((N, K, width), np.int32)
    ranking = np.tile(np.arange(K, dtype=np.int32), (N, 1))
    valid = np.zeros((N, K), bool)
    cut = 0
    for n, row in enumerate(rows):
        prompt = tok.render_prompt(row["messages"])
        ended = row.get("ended") or [True] * len(row["completions"])
        for k, (text, e) in enumerate(zip(row["completions"], ended)):
            ids = prompt + tok.render_reply(text, ended=e)
            cut += len(ids) > width
            ids = ids[-width:]
            tokens[n, k, :len(ids)] = ids
            mask[n, k, :len(ids)] = 1
        kb = len(row["completions"])
        valid[n, :kb] = True
        ranking[n] = list(row["ranking"]) + list(range(kb, K))
    if cut:
        warnings.warn(f"{cut} prompt+reply sequences are longer than {width} tokens; their prompts "
                      f"were cut from the left", stacklevel=2)
    return {"tokens": tokens, "mask": mask, "ranking": ranking, "valid": valid}


def sequence_width(tok, rows: list[dict], block_size: int) -> int:
    """Longest prompt + reply + end, rounded up to the attention's query block (64, so the
    causal attention's blocks are all whole; the batches are `pack`ed, so a wider row simply
    holds more sequences), capped at the context."""
    from minichat.model import QUERY_BLOCK
    longest = max(len(tok.render_prompt(r["messages"])) + len(tok.render_reply(c)) + 1
                  for r in rows for c in r["completions"])
    return int(min(block_size, -(-longest // QUERY_BLOCK) * QUERY_BLOCK))


# ---- the reward: the scalar head read at the reply's end token --------------------------
def score(model, tokens: jax.Array, mask: jax.Array, bias=0.0, dropout_key=None) -> jax.Array:
    """r(x, y) + bias, (B,) float32: the head's output at the last real token.

    `tokens`, `mask` (B, T): [left-padded prompt | right-padded reply ending in <|end|>] or
    any other padding: positions come from the mask, so the reward does not depend on where
    the padding sits. Pure: usable inside `jax.jit` after `nnx.merge`.
    """
    # the head at the last real token only: the last block runs its queries there alone
    values = model(tokens, mask, dropout_key=dropout_key, at=last_token_index(mask)[:, None])
    return values[:, 0] + jnp.asarray(bias, jnp.float32)


def shared_prefix(tokens: np.ndarray, lengths: np.ndarray) -> int:
    """Length of the longest common prefix of right-padded sequences (N, T) of `lengths`,
    at most min(lengths) - 1, so that every sequence keeps its own last token."""
    n = int(lengths.min()) - 1
    if n <= 0:
        return 0
    same = (tokens[:, :n] == tokens[:1, :n]).all(0)
    return n if same.all() else int(np.argmin(same))


def _prefix_groups(flat_t: np.ndarray, lengths: np.ndarray, K: int):
    """Consecutive groups of K sequences as (prefix length, sequences to lay out), and
    {repeated sequence: its first copy in the group} (K = 1: no prefix, no repeats)."""
    groups, same_as = [], {}
    for g in range(0, len(flat_t), K):
        seqs, first = [], {}
        for i in range(g, g + K):
            if lengths[i]:
                key = flat_t[i, :lengths[i]].tobytes()
                if K > 1 and key in first:
                    same_as[i] = first[key]
                else:
                    first[key] = i
                    seqs.append(i)
        if seqs:
            groups.append((shared_prefix(flat_t[seqs], lengths[seqs]) if K > 1 else 0, seqs))
    return groups, same_as


def _first_fit_groups(groups: list, lengths: np.ndarray, T: int):
    """First fit decreasing of prefix groups into rows of T: a group goes whole into the
    first row with room for it; else the first row with room for its prefix and its
    shortest sequence takes the prefix and as many sequences as fit, and the rest goes on.
    Returns ([(row, column, prefix length, sequences)], rows used)."""
    size = lambda L, seqs: L + sum(int(lengths[i]) - L for i in seqs)
    free: list[int] = []  # free columns left in each row
    units = []
    for L, todo in sorted(groups, key=lambda g: -size(*g)):
        todo = sorted(todo, key=lambda i: -lengths[i])
        while todo:
            whole, least = size(L, todo), size(L, todo[-1:])  # the group; prefix + shortest
            j = next((j for j in range(len(free)) if free[j] >= whole), None)
            if j is None:
                j = next((j for j in range(len(free)) if free[j] >= least), len(free))
                if j == len(free):
                    free.append(T)
            take, room = [], free[j] - L
            for i in todo:
                if lengths[i] - L <= room:
                    take.append(i)
                    room -= lengths[i] - L
            units.append((j, T - free[j], L, take))
            free[j], todo = room, [i for i in todo if i not in take]
    return units, len(free)


def pack(tokens: np.ndarray, mask: np.ndarray, row_multiple: int = 1,
         share_prefix: bool = False) -> dict:
    """Right-padded sequences (..., T) laid end to end in rows of T tokens.

    Returns {"tokens", "mask", "segments"} (R, T), segment ids unique per sequence (0 =
    padding), "ends" (...,), the flat index ``row * T + column`` of each sequence's last
    token, where its reward is read (0 for an empty sequence), and the same as the model's
    `at` wants it (`read_positions`): "at" (R, E), the columns to read in each row, and
    "at_index" (...,), each sequence's flat index into (R, E). A comparison batch is mostly
    padding: replies of ten to twenty tokens padded to the longest prompt + reply of the
    batch (a `repetition` flaw, a long summary); ChatWorld's batches are a third real
    tokens. Packed with segment ids, each sequence attends only to itself and its positions
    restart at 0 (`GPT.hidden_states`), so it gets the reward it would get alone
    (tests/test_reward.py). First fit decreasing; R is rounded up to `row_multiple` so that
    the steps share few shapes (few compiles).

    `share_prefix`: the K sequences of each (..., K, T) group are [prompt | reply k], so
    their common prefix (the prompt) is laid out once, followed by each one's own tokens,
    with "branches" (R, T) (0 = the prefix, then 1, 2, ... for the sequences in the order
    they are laid out; see `GPT.__call__`). On
    ChatWorld's comparisons that is half the tokens (a 30-token prompt, 7 replies of ~19)
    and 0.55x the rows, and every sequence still gets the reward it would get alone. A
    repeated sequence of a group (a small policy often samples the same reply twice) is
    laid out once and shares its copy's end: identical replies get bit-identical rewards,
    which a tie-aware accuracy relies on. A group that does not fit in a row's free space
    is split, each part with its own copy of the prefix.
    """
    T = tokens.shape[-1]
    K = tokens.shape[-2] if share_prefix else 1
    flat_t, flat_m = tokens.reshape(-1, T), mask.reshape(-1, T) != 0
    lengths = flat_m.sum(-1)
    if (flat_m != (np.arange(T) < lengths[:, None])).any():
        raise ValueError("pack: every sequence must be right-padded (real tokens first)")
    groups, same_as = _prefix_groups(flat_t, lengths, K)
    units, rows = _first_fit_groups(groups, lengths, T)
    R = max(-(-rows // row_multiple), 1) * row_multiple
    out = {"tokens": np.zeros((R, T), flat_t.dtype), "mask": np.zeros((R, T), np.int32),
           "segments": np.zeros((R, T), np.int32)}
    branches = np.zeros((R, T), np.int32)
    ends = np.zeros(len(lengths), np.int32)
    for r, c, L, seqs in units:  # segment id: the unit's first sequence + 1
        n = L + sum(int(lengths[i]) - L for i in seqs)
        out["mask"][r, c:c + n] = 1
        out["segments"][r, c:c + n] = seqs[0] + 1
        out["tokens"][r, c:c + L] = flat_t[seqs[0], :L]
        c += L
        for k, i in enumerate(seqs):
            out["tokens"][r, c:c + lengths[i] - L] = flat_t[i, L:lengths[i]]
            branches[r, c:c + lengths[i] - L] = k + 1
            c += lengths[i] - L
            ends[i] = r * T + c - 1
    for i, j in same_as.items():
        ends[i] = ends[j]
    if share_prefix:
        out["branches"] = branches
    out["ends"] = ends.reshape(tokens.shape[:-1])
    out["at"], at_index = read_positions(ends, T, R)
    out["at_index"] = at_index.reshape(tokens.shape[:-1])
    return out


def read_positions(ends: np.ndarray, T: int, R: int):
    """Flat end indices ``row * T + column`` (N,) of rows of T -> ("at" (R, E) int32, the
    distinct columns read in each row, padded with column 0; "at_index" (N,) int32, each
    end's flat index into (R, E)).

    E is a multiple of 8 and at least T / 8: the stage's batches (rows of 256 holding 9 to
    24 replies) then all read 32 positions per row. Their exact counts, rounded to 8, made
    7 step shapes instead of 3, each compiled for about 5 s, to save a few queries per row."""
    distinct, inverse = np.unique(ends, return_inverse=True)
    rows = distinct // T
    slot = np.arange(len(distinct)) - np.searchsorted(rows, rows)  # rank within its row
    E = -(-max(int(slot.max(initial=0)) + 1, T // 8) // 8) * 8
    at = np.zeros((R, E), np.int32)
    at[rows, slot] = distinct % T
    return at, (rows * E + slot)[inverse.reshape(-1)].astype(np.int32)


def batch_rewards(model, batch: dict, dropout_key=None) -> jax.Array:
    """(B, K) rewards of a comparison batch (K rows per prompt, one forward): (B, K, T)
    right-padded rows, or the same `pack`ed (then with "segments", "at", "at_index" and,
    with shared prompts, "branches")."""
    if "at_index" in batch:
        values = model(batch["tokens"], batch["mask"], segments=batch["segments"],
                       branches=batch.get("branches"), dropout_key=dropout_key, at=batch["at"])
        return values.reshape(-1)[batch["at_index"]]
    B, K, T = batch["tokens"].shape
    r = score(model, batch["tokens"].reshape(B * K, T), batch["mask"].reshape(B * K, T),
              dropout_key=dropout_key)
    return r.reshape(B, K)


def batch_loss(model, batch: dict, dropout_key=None):
    """InstructGPT eq. 1 on a batch: (loss, metrics)."""
    return rm_loss(batch_rewards(model, batch, dropout_key), batch["ranking"], batch["valid"])


def make_step(graphdef, tx, rest=None):
    """Jitted `step(params, opt_state, batch, dropout_key=None) -> (params, opt_state,
    metrics)` with the loss's metrics (accuracy, margin, chosen, rejected) as aux; buffers
    donated."""
    import optax
    from flax import nnx
    rest = () if rest is None else (rest,)

    def step(params, opt_state, batch, dropout_key=None):
        def objective(p):
            return batch_loss(nnx.merge(graphdef, p, *rest), batch, dropout_key)

        (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}

    return jax.jit(step, donate_argnums=(0, 1))


class Scorer:
    """Rewards of many right-padded (N, K, T) sequences (K replies per prompt), `pack`ed
    with their prompts shared and scored in chunks of `rows_per_call` rows: one compile in
    all."""

    def __init__(self, graphdef, rest, rows_per_call: int, mesh):
        from flax import nnx
        rest = () if rest is None else (rest,)
        self.fn = jax.jit(lambda p, t, m, s, b, a: nnx.merge(graphdef, p, *rest)(
            t, m, segments=s, branches=b, at=a))
        self.rows, self.mesh = rows_per_call, mesh

    def __call__(self, params, tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        from minichat.parallel import gather, shard_batch
        packed = pack(tokens, mask, self.rows, share_prefix=True)
        keys, values = ("tokens", "mask", "segments", "branches", "at"), []
        for i in range(0, len(packed["tokens"]), self.rows):
            b = shard_batch({k: packed[k][i:i + self.rows] for k in keys}, self.mesh)
            values.append(gather(self.fn(params, *(b[k] for k in keys))))
        return np.concatenate(values).reshape(-1)[packed["at_index"]]


# ---- evaluation metrics (NumPy) ----------------------------------------------------------
def pairwise_accuracy(rewards: np.ndarray, ranking: np.ndarray, valid: np.ndarray) -> tuple[int, int]:
    """(pairs the model orders as the labeler did, pairs): every pair counts once, the same
    unit as the labelers' agreement ceiling. A tie in reward counts half, as a tie in the
    labelers' utilities does in the ceiling."""
    above = np.asarray(pair_matrix(ranking, valid))
    diff = rewards[:, :, None] - rewards[:, None, :]
    return float(np.sum(above & (diff > 0)) + 0.5 * np.sum(above & (diff == 0))), int(np.sum(above))


def gold_accuracy(rewards: np.ndarray, gold: np.ndarray, valid: np.ndarray) -> float:
    """Accuracy against the gold judge's order, on pairs whose gold scores differ."""
    v = valid[:, :, None] & valid[:, None, :]
    better = (gold[:, :, None] - gold[:, None, :] > 1e-9) & v
    right = better & (rewards[:, :, None] - rewards[:, None, :] > 0)
    return float(right.sum() / max(better.sum(), 1))


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, weights=ranks) / counts)[inverse]


def spearman(x, y) -> float:
    """Spearman's rank correlation (Pearson on average ranks); NaN if either is constant."""
    x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def evaluate(rewards: np.ndarray, data: dict, rows: list[dict], lcfg) -> dict:
    """Held-out accuracy (all, per family), beside the labelers' ceiling; gold metrics."""
    right, total = pairwise_accuracy(rewards, data["ranking"], data["valid"])
    out = {"accuracy": right / max(total, 1), "pairs": total, "ceiling": labeler_ceiling(rows, lcfg)}
    has_gold = all("gold" in r for r in rows)
    if has_gold:
        K = data["valid"].shape[1]
        gold = np.array([list(r["gold"]) + [0.0] * (K - len(r["gold"])) for r in rows])
        v = data["valid"]
        out["gold_accuracy"] = gold_accuracy(rewards, gold, v)
        out["spearman"] = spearman(rewards[v], gold[v])
        out.update(labeler_expectations(rows, rewards, lcfg))
    families = {}
    for fam in sorted({r.get("family", "all") for r in rows}):
        idx = np.array([i for i, r in enumerate(rows) if r.get("family", "all") == fam])
        sub = {k: data[k][idx] for k in ("ranking", "valid")}
        right, total = pairwise_accuracy(rewards[idx], sub["ranking"], sub["valid"])
        fam_rows = [rows[i] for i in idx]
        families[fam] = {"accuracy": right / max(total, 1), "pairs": total,
                         "ceiling": labeler_ceiling(fam_rows, lcfg)}
        if has_gold:
            families[fam].update(labeler_expectations(fam_rows, rewards[idx], lcfg))
    out["families"] = families
    out["family_accuracy"] = {fam: row["accuracy"] for fam, row in families.items()}
    return out


# ---- normalisation: SFT demonstrations average 0 ----------------------------------------
def demonstration_rows(cfg, n: int) -> list[dict]:
    """The first `n` SFT demonstrations as one-completion rows: the conversation up to its
    last assistant turn, and that turn as the reply."""
    from minichat.sft import demonstrations
    rows = []
    for conv in demonstrations(cfg, "train")[:n]:
        msgs = conv["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        if last == 0 or msgs[last - 1]["role"] != "user":
            continue  # a reply needs a user turn before it
        rows.append({"messages": msgs[:last], "completions": [msgs[last]["content"]], "ranking": [0]})
    return rows


# ---- the training loop ------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, epochs: int, seed: int) -> list[np.ndarray]:
    """Every prompt once per epoch (each prompt carries all its C(K, 2) pairs), shuffled
    per epoch; the last partial batch is topped up by cycling through the epoch's order.

    Batches are NOT grouped by length: sorting prompts by length within groups of batches
    (to cut padding further) made batches family-homogeneous, and the reward model then
    ranked across prompts measurably worse (Spearman 0.75 against 0.8+ on the synthetic
    preference of tests/test_reward.py). Each batch is `pack`ed instead.
    """
    out = []
    per_epoch = max(-(-n // batch_size), 1)
    for e in range(epochs):
        order = np.resize(np.random.default_rng([seed, e]).permutation(n), per_epoch * batch_size)
        out += [order[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
    return out


def train(model, *, stage: str, run_dir: str, cfg, mesh, data: dict, heldout: dict, scorer_rows: int,
          demo_data: dict):
    """`reward.epochs` epochs (2 by default) of the K-way loss with a decaying learning rate; resumable,
    logged, checkpointed. The final checkpoint is written after the normalisation bias is
    known, with the bias in its metadata. Returns (model, bias, metrics rows,
    {"heldout": (N, K) and "demos": normalised rewards})."""
    from flax import nnx
    from tqdm.auto import tqdm

    from minichat.checkpoint import stage_dir
    from minichat.model import flops_per_token
    from minichat.parallel import device_peak_flops, is_main, mesh_size, mfu, shard_batch, to_host
    from minichat.pretrain import start_training, step_dropout_key, throughput

    rcfg = cfg.reward
    sdir = stage_dir(run_dir, stage)
    batches = epoch_batches(len(data["tokens"]), rcfg.batch_size, rcfg.epochs, cfg.seed)
    steps = len(batches)
    st = start_training(model, rcfg.optim, steps, mesh, sdir, keep=rcfg.keep, cfg=cfg, stage=stage)
    graphdef, rest, tx, schedule = st.graphdef, st.rest, st.tx, st.schedule
    params, opt_state, ckpt, start, log = st.params, st.opt_state, st.ckpt, st.start, st.log
    step_fn = make_step(graphdef, tx, rest)
    scorer = Scorer(graphdef, rest, scorer_rows, mesh)

    last = {}

    def held_out(p) -> dict:
        last["rewards"] = r = scorer(p, heldout["tokens"], heldout["mask"])
        loss, m = rm_loss(r, heldout["ranking"], heldout["valid"])
        return {"eval_loss": float(loss), "eval_accuracy": float(m["accuracy"])}

    meta = lambda s, **kw: {"step": s, "model": asdict(cfg.model), "stage": stage, **kw}
    fault_step = int(os.environ.get("MINICHAT_SIGKILL_AT_STEP", "0"))
    if start == 0:
        log.log({"step": 0, **held_out(params)})
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=stage,
               disable=not (cfg.progress and is_main()), dynamic_ncols=True)
    # MFU: every step runs forward + backward over packed rows of `width` tokens (tokens/s
    # counts the rows, padding included); the scalar head replaces the vocabulary
    # projection (6·V·C FLOPs per token), and the last block's query, projection and MLP
    # (10·C² weights) run at the ends alone (`at`).
    width, C = data["tokens"].shape[-1], cfg.model.n_embd
    fpt = flops_per_token(cfg.model, width) - 6.0 * cfg.model.vocab_size * C - 6.0 * 10 * C * C
    peak, n_tokens, t_train = device_peak_flops(cfg.parallel.peak_flops), 0, 0.0
    row_multiple = math.lcm(4, mesh_size(mesh))  # few shapes; rows split evenly over devices
    for step in bar:
        batch = {k: v[batches[step]] for k, v in data.items()}
        batch.update(pack(batch.pop("tokens"), batch.pop("mask"), row_multiple, share_prefix=True))
        t0 = time.perf_counter()
        params, opt_state, m = step_fn(params, opt_state, shard_batch(batch, mesh),
                                       step_dropout_key(cfg, stage, step))
        loss = to_host(m["loss"])
        tok_s, n_tokens, t_train = throughput(step > start, batch["tokens"].size,
                                              time.perf_counter() - t0, n_tokens, t_train)
        if not math.isfinite(loss):
            raise FloatingPointError(f"[{stage}] loss became {loss} at step {step + 1}; lower "
                                     f"reward.optim.lr or check the comparisons")
        row = {"step": step + 1, "loss": loss, "lr": float(schedule(step)),
               **{k: to_host(m[k]) for k in ("accuracy", "margin", "chosen", "rejected", "grad_norm")},
               "tokens_per_s": tok_s, "mfu": mfu(tok_s, fpt, mesh_size(mesh), peak)}
        if (step + 1) % rcfg.eval_every == 0 or step + 1 == steps:
            row.update(held_out(params))
        log.log(row)
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{row['accuracy']:.2f}")
        if (step + 1) % rcfg.checkpoint_every == 0 and step + 1 < steps:
            ckpt.save(step + 1, params, opt_state, meta(step + 1))
        if fault_step == step + 1:  # fault injection, as in pretrain.fit
            ckpt.wait()
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    if start == steps:  # resumed after the last step: nothing was evaluated yet
        held_out(params)

    # InstructGPT 3.5: a bias so that the SFT demonstrations score 0 on average.
    demo_rewards = scorer(params, demo_data["tokens"], demo_data["mask"])[demo_data["valid"]]
    bias = float(normalisation_bias(demo_rewards))
    if ckpt.latest_step() != steps:
        ckpt.save(steps, params, opt_state, meta(steps, bias=bias))
    ckpt.close()
    model = nnx.merge(graphdef, params, *([rest] if rest is not None else []))
    return model, bias, log.rows, {"heldout": last["rewards"] + bias, "demos": demo_rewards + bias}


# ---- plots and the report snippet --------------------------------------------------------
def plot_reward_vs_gold(rewards: np.ndarray, gold: np.ndarray, families: list[str], path: str,
                        title: str) -> None:
    """Scatter of the reward model's score against the gold judge's, one colour per family."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    jitter = np.random.default_rng(0).uniform(-0.02, 0.02, size=len(gold))  # gold has few values
    fams = sorted(set(families))
    cmap = plt.get_cmap("tab20")
    for i, fam in enumerate(fams):
        sel = np.array([f == fam for f in families])
        ax.scatter(gold[sel] + jitter[sel], rewards[sel], s=8, alpha=0.6, color=cmap(i % 20), label=fam)
    ax.axhline(0.0, color="gray", linewidth=0.8)
    ax.set_xlabel("gold judge score")
    ax.set_ylabel("reward (normalised: demonstrations average 0)")
    ax.set_title(title)
    ax.legend(fontsize=7, markerscale=2, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_markdown(stage: str, ev: dict, bias: float, plots: dict) -> str:
    def fmt(x):
        return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"

    acc, ceil = ev["accuracy"], ev.get("ceiling", float("nan"))
    exp = ev.get("expected_accuracy")
    # The share of the way is read off the expected accuracy where the labelers are known:
    # one labeling's accuracy moves by about ±0.013 on 1,536 pairs from label noise alone.
    ref = acc if exp is None else exp
    lines = [f"### Reward model ({stage})", "",
             f"Held-out pairwise accuracy **{fmt(acc)}** against the labelers' own agreement "
             f"ceiling **{fmt(ceil)}** ({ev['pairs']} pairs)"
             + (f"; in expectation over the labelers' noise **{fmt(exp)}**" if exp is not None else "")
             + (f", i.e. {(ref - 0.5) / (ceil - 0.5):.0%} of the way from chance to the ceiling"
                if math.isfinite(ceil) and ceil > 0.5 else "") + "."]
    if exp is not None:
        lines.append(f"A scorer that knew the gold judge would reach {fmt(ev['bayes'])} in "
                     f"expectation (it always picks the likelier winner); on pairs whose replies "
                     f"score the same, every scorer is at chance.")
    if "spearman" in ev:
        lines.append(f"Against the gold judge: Spearman rank correlation **{fmt(ev['spearman'])}** "
                     f"between reward and gold score over all held-out replies; accuracy "
                     f"{fmt(ev['gold_accuracy'])} on pairs whose gold scores differ.")
    lines += [f"Normalisation bias {bias:+.3f} (SFT demonstrations average 0).", ""]
    cols = [("accuracy", "accuracy"), ("ceiling", "labeler ceiling")]
    if exp is not None:
        cols = [("accuracy", "accuracy"), ("expected_accuracy", "expected"),
                ("ceiling", "labeler ceiling"), ("bayes", "best possible")]
    lines += ["| family | " + " | ".join(h for _, h in cols) + " | pairs |",
              "|---|" + "---|" * len(cols) + "---|"]
    for fam, row in ev["families"].items():
        lines.append(f"| {fam} | " + " | ".join(fmt(row[k]) for k, _ in cols) + f" | {row['pairs']} |")
    lines.append("| **all** | " + " | ".join(f"**{fmt(ev[k])}**" for k, _ in cols) + f" | {ev['pairs']} |")
    lines.append("")
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines)


# ---- the stage -----------------------------------------------------------------------
def run(cfg, run_dir: str, tok, mesh, *, policy_stage: str = "sft", stage: str = "reward",
        comparisons_stage: str = "comparisons", init_stage: str = "sft") -> dict:
    """Stage `reward`: train the RM on `comparisons_stage`'s rankings (sampled first from
    `policy_stage` if missing), normalise it on the demonstrations, evaluate it held out."""
    from minichat.checkpoint import is_done, mark_done, read_done, restore_params, stage_dir
    from minichat.evaluate import plot_curves
    from minichat.model import GPT, ScalarGPT
    from minichat.parallel import require_divisible

    t0 = time.perf_counter()
    rcfg = cfg.reward
    require_divisible("reward.batch_size", rcfg.batch_size, mesh)
    if not rcfg.files and not is_done(run_dir, comparisons_stage):
        run_comparisons(cfg, run_dir, tok, mesh, policy_stage=policy_stage, stage=comparisons_stage)
    train_rows, heldout_rows = comparison_data(cfg, run_dir, comparisons_stage)
    demo_rows = demonstration_rows(cfg, rcfg.n_norm)
    width = sequence_width(tok, train_rows + heldout_rows + demo_rows, cfg.model.block_size)
    data = encode_comparisons(tok, train_rows, width)
    heldout = encode_comparisons(tok, heldout_rows, width)
    demos = encode_comparisons(tok, demo_rows, width)
    n_pairs = sum(math.comb(len(r["completions"]), 2) for r in train_rows)
    print(f"[{stage}] {len(train_rows):,} prompts ({n_pairs:,} pairs) for training, "
          f"{len(heldout_rows):,} held out; sequences of {width} tokens")

    if is_done(run_dir, init_stage) and "bias" in read_done(run_dir, init_stage):
        # a later RLHF round: go on from the previous reward model (its raw head; the
        # normalisation bias is recomputed after training)
        model, _ = load_reward_model(run_dir, cfg, init_stage)
    else:
        sft = restore_params(run_dir, init_stage, GPT.init(cfg.model, cfg.seed), cfg.model)
        model = ScalarGPT.from_gpt(sft, cfg.seed + 1)  # fresh head N(0, 1/sqrt(d+1)), bias 0
    t_train = time.perf_counter()
    model, bias, rows, rewards = train(
        model, stage=stage, run_dir=run_dir, cfg=cfg, mesh=mesh, data=data, heldout=heldout,
        scorer_rows=rcfg.batch_size * data["tokens"].shape[1], demo_data=demos)
    seconds_train = time.perf_counter() - t_train

    ev = evaluate(rewards["heldout"], heldout, heldout_rows, rcfg.labeler)
    sdir = stage_dir(run_dir, stage)
    plots = {"curves": f"{stage}/curves.png"}
    ceiling = ev["ceiling"]
    plot_curves(rows, os.path.join(run_dir, plots["curves"]),
                ["loss", "eval_loss", "accuracy", "eval_accuracy"],
                title="reward model: K-way loss and pairwise accuracy",
                hline=(ceiling, "labeler agreement ceiling") if math.isfinite(ceiling) else None)
    if "spearman" in ev:
        plots["reward_vs_gold"] = f"{stage}/reward_vs_gold.png"
        v = heldout["valid"]
        gold = np.array([g for r in heldout_rows for g in r["gold"]])
        fams = [r.get("family", "all") for r in heldout_rows for _ in r["gold"]]
        plot_reward_vs_gold(rewards["heldout"][v], gold, fams, os.path.join(run_dir, plots["reward_vs_gold"]),
                            f"held-out replies: Spearman {ev['spearman']:.3f}")
    summary = {"bias": bias, **ev, "comparisons_stage": comparisons_stage, "init_stage": init_stage,
               "steps": len(rows) - 1 if rows and rows[0]["step"] == 0 else len(rows),
               "train_prompts": len(train_rows), "train_pairs": n_pairs,
               "heldout_prompts": len(heldout_rows), "width": width,
               "demo_mean_after_bias": float(np.mean(rewards["demos"])),
               "plots": plots, "seconds_train": seconds_train}
    summary["report_md"] = report_markdown(stage, ev, bias, plots)
    summary["seconds"] = time.perf_counter() - t0
    mark_done(run_dir, stage, summary)
    print(summary["report_md"])
    print(f"[{stage}] done in {summary['seconds']:.0f}s ({sdir})")
    return summary


# ---- for PPO --------------------------------------------------------------------------
def load_reward_model(run_dir: str, cfg, stage: str = "reward"):
    """(ScalarGPT with the trained parameters, normalisation bias) of a finished RM stage.
    Use as `score(model, tokens, mask, bias)`."""
    from minichat.checkpoint import CheckpointError, read_done, restore_params
    from minichat.model import ScalarGPT

    model, meta = restore_params(run_dir, stage, ScalarGPT.init(cfg.model, cfg.seed), cfg.model, with_meta=True)
    if "bias" in meta:
        return model, float(meta["bias"])
    try:
        return model, float(read_done(run_dir, stage)["bias"])
    except (OSError, KeyError):
        raise CheckpointError(f"{run_dir}/{stage} holds no normalisation bias: the stage did "
                              f"not finish; run it again") from None
