"""Stage 1 of the recipe: supervised fine-tuning on demonstrations (SFT).

"Human AI trainers provided conversations in which they played both sides -- the user
and an AI assistant" (ChatGPT, 2022); here ChatWorld plays the trainers. The loss is
pretraining's next-token loss, eq. (1) of pretrain.py, restricted to the assistant:

    L_SFT(theta) = -1/|A| sum_{t in A} log p_theta(x_{t+1} | x_{<=t})

where A is the set of positions whose target is assistant content or the `<|end|>` that
closes an assistant turn (`ChatTokenizer.render_conversation`'s loss mask). The model is
conditioned on the user's turns but never trained to produce them. Multi-turn
conversations are trained on every assistant turn at once.
"""

from __future__ import annotations

import os
import time
import warnings

import jax
import numpy as np

from minichat.checkpoint import mark_done, restore_params, stage_dir
from minichat.data import epoch_batch_indices, first_fit, lm_batch, load_conversations, pad_rows
from minichat.parallel import batch_divisor, require_divisible
from minichat.pretrain import fit


def demonstrations(cfg, split: str) -> list[dict]:
    """The user's JSONL files if given (train split), else ChatWorld's dialogues."""
    if cfg.sft.files:
        convs = load_conversations(list(cfg.sft.files))
        if len(convs) < 2:
            raise ValueError(f"sft.files: {len(convs)} demonstration; at least 2 are needed "
                             f"(one in 20 is held out for the evaluation loss)")
        n_val = max(1, len(convs) // 20)
        return convs[:-n_val] if split == "train" else convs[-n_val:]
    from minichat.world import world_from_config, generate_dialogues
    n = cfg.world.n_dialogues if split == "train" else max(cfg.world.n_dialogues // 20, 50)
    return generate_dialogues(world_from_config(cfg.world), n, split, seed=cfg.world.seed + (split != "train"),
                              augment=cfg.sft.augment)


def heldout_prompts(cfg) -> list[dict]:
    """Held-out prompts (entities and phrasings never seen in SFT), n_heldout per family."""
    from minichat.world import FAMILIES, world_from_config, generate_dialogues, to_prompt
    dialogues = generate_dialogues(world_from_config(cfg.world), cfg.world.n_heldout * len(FAMILIES),
                                   "heldout", seed=cfg.world.seed + 7)
    return [to_prompt(d) for d in dialogues]


def batch_maker(arrays: dict, batch_size: int, seed: int, stream=None, n_lm: int = 0):
    """`get_batch(step)`: `batch_size - n_lm` rows of demonstrations (reshuffled each epoch)
    plus `n_lm` windows of pretraining text whose every position counts in the loss.
    `arrays`: {"tokens", "valid", "loss_mask"} and, for packed rows, "segments"."""
    n_rows, width = arrays["tokens"].shape

    def get_batch(step: int) -> dict:
        idx = epoch_batch_indices(n_rows, step, batch_size - n_lm, seed)
        batch = {k: v[idx] for k, v in arrays.items()}
        if n_lm:
            text = lm_batch(stream, step, n_lm, width - 1, seed + 17)
            ones = np.ones_like(text)  # one segment per row, every position real and counted
            batch = {k: np.concatenate([v, text if k == "tokens" else ones]) for k, v in batch.items()}
        return batch

    return get_batch


def lm_stream(cfg, tok) -> np.ndarray:
    """The pretraining corpus as one token stream (for `sft.lm_mix`)."""
    from minichat.pretrain import corpus_documents, split_streams
    return split_streams(corpus_documents(cfg), tok)[0]


def render_batchable(tok, convs: list[dict], block_size: int):
    """(tokens, valid, loss_mask) arrays of shape (N, L) with L <= block_size + 1.

    A conversation longer than the context is truncated to it, with a warning: the
    assistant turns past the cut are not trained on, but nothing is dropped silently.
    """
    rendered = _render(tok, convs, block_size)
    width = _width(rendered, block_size)
    tokens = pad_rows([ids for ids, _ in rendered], width, tok.pad_id)
    loss_mask = pad_rows([m for _, m in rendered], width, 0)
    valid = pad_rows([[1] * len(ids) for ids, _ in rendered], width, 0)
    return tokens, valid, loss_mask


def pack_conversations(tok, convs: list[dict], block_size: int, seed: int = 0) -> dict:
    """Conversations packed into rows as wide as the longest one (<= block_size + 1):
    {"tokens", "valid", "loss_mask", "segments"}, segment ids 1, 2, ... per row, 0 = pad.

    Demonstrations are short (ChatWorld's average 45 tokens, longest ~140), so padding
    each to the longest wastes two thirds of every step; packed with segment ids, the
    model attends within each conversation and restarts its positions, so each one gets
    exactly the loss it would get alone (tests/test_model.py), at a third of the cost.
    Rows are filled in a shuffled order (seeded), first fit, truncating like
    `render_batchable`.
    """
    rendered = _render(tok, convs, block_size)
    width = _width(rendered, block_size)
    order = np.random.default_rng(seed).permutation(len(rendered))
    where, n_rows = first_fit([min(len(rendered[i][0]), width) for i in order], width, window=8)
    rows: list[list[int]] = [[] for _ in range(n_rows)]  # conversation indices per row
    for i, (r, _) in zip(order, where):
        rows[r].append(i)
    out = {"tokens": np.full((len(rows), width), tok.pad_id, np.int32),
           "valid": np.zeros((len(rows), width), np.int32),
           "loss_mask": np.zeros((len(rows), width), np.int32),
           "segments": np.zeros((len(rows), width), np.int32)}
    for r, members in enumerate(rows):
        at = 0
        for seg, i in enumerate(members, start=1):
            ids, mask = rendered[i][0][:width], rendered[i][1][:width]
            out["tokens"][r, at:at + len(ids)] = ids
            out["loss_mask"][r, at:at + len(ids)] = mask
            out["valid"][r, at:at + len(ids)] = 1
            out["segments"][r, at:at + len(ids)] = seg
            at += len(ids)
    return out


def _render(tok, convs, block_size):
    rendered = [tok.render_conversation(c["messages"], exclude=c.get("meta", {}).get("wrong_turns", ()))
                for c in convs]
    limit = block_size + 1
    too_long = sum(len(ids) > limit for ids, _ in rendered)
    if too_long:
        warnings.warn(f"{too_long} of {len(rendered)} conversations are longer than the context "
                      f"({limit} tokens) and were truncated to it", stacklevel=3)
    return rendered


def _width(rendered, block_size):
    """Row width: the longest conversation rounded up to 16, at most the context + 1."""
    return min(block_size + 1, -(-max(len(ids) for ids, _ in rendered) // 16) * 16)


def run(cfg, run_dir: str, tok, mesh) -> dict:
    from minichat.evaluate import markdown_family_table, plot_curves
    from minichat.model import GPT

    t0 = time.perf_counter()
    bsz = cfg.sft.batch_size
    require_divisible("sft.batch_size", bsz, mesh)
    train = demonstrations(cfg, "train")
    if cfg.sft.pack:
        arrays = pack_conversations(tok, train, cfg.model.block_size, cfg.seed)
    else:
        arrays = dict(zip(("tokens", "valid", "loss_mask"), render_batchable(tok, train, cfg.model.block_size)))
    v_tokens, v_valid, v_mask = render_batchable(tok, demonstrations(cfg, "heldout"), cfg.model.block_size)
    n_rows, width = arrays["tokens"].shape
    print(f"[sft] {len(train):,} demonstrations in {n_rows:,} rows of {width} tokens, "
          f"{int(arrays['loss_mask'].sum()):,} assistant tokens")
    if not arrays["loss_mask"].any():
        raise ValueError(f"sft: no assistant token is left to train on: every demonstration's "
                         f"assistant turns lie beyond the context (model.block_size="
                         f"{cfg.model.block_size}) once it is cut to fit")

    n_lm = min(int(round(bsz * cfg.sft.lm_mix)), bsz - 1)  # at least one demonstration a batch
    get_batch = batch_maker(arrays, bsz, cfg.seed, lm_stream(cfg, tok) if n_lm else None, n_lm)

    # up to 8 batches of held-out demonstrations; fewer than a batch of them (a small
    # sft.files) make one smaller batch, still a multiple of the devices
    div = batch_divisor(mesh)
    eb = bsz if len(v_tokens) >= bsz else len(v_tokens) // div * div
    if eb == 0:
        raise ValueError(f"sft: {len(v_tokens)} held-out demonstrations are fewer than the "
                         f"{div} devices; give sft.files more lines")
    eval_batches = [{"tokens": v_tokens[i:i + eb], "valid": v_valid[i:i + eb], "loss_mask": v_mask[i:i + eb]}
                    for i in range(0, len(v_tokens) - eb + 1, eb)][:8]
    model = restore_params(run_dir, "pretrain", GPT.init(cfg.model, cfg.seed), cfg.model)
    model, rows = fit(model, stage="sft", run_dir=run_dir, cfg=cfg, scfg=cfg.sft, mesh=mesh,
                      get_batch=get_batch, eval_batches=eval_batches,
                      tokens_per_step=bsz * width)
    sdir = stage_dir(run_dir, "sft")
    plot_curves(rows, os.path.join(sdir, "loss.png"), ["loss", "eval_loss"], title="SFT loss (assistant tokens)")

    summary = {"eval_loss": next(r["eval_loss"] for r in reversed(rows) if "eval_loss" in r),
               "seconds_train": time.perf_counter() - t0}
    if not cfg.sft.files and jax.process_count() == 1:  # sampling reads whole params: one host
        summary.update(evaluate_sft(model, tok, cfg, sdir))
        print(markdown_family_table({"SFT greedy": summary["eval"]["greedy"],
                                     "SFT sampled": summary["eval"]["sampled"]}))
    summary["seconds"] = time.perf_counter() - t0
    mark_done(run_dir, "sft", summary)
    return summary


def evaluate_sft(model, tok, cfg, sdir: str) -> dict:
    """Gold-judge scores by family on held-out prompts; a few sample conversations."""
    from minichat.checkpoint import MetricsLog
    from minichat.evaluate import conversation_text, evaluate_policy, markdown_family_table, save_eval

    prompts = heldout_prompts(cfg)
    result = evaluate_policy(model, tok, prompts, max_new_tokens=cfg.sft.max_new_tokens,
                             temperature=cfg.sft.eval_temperature, seed=cfg.seed,
                             desc="sft eval" if cfg.progress else "")
    save_eval(os.path.join(sdir, "eval.jsonl"), prompts, result)
    log = MetricsLog(os.path.join(sdir, "metrics.jsonl"), resume_step=cfg.sft.steps)
    for mode in ("greedy", "sampled"):
        for fam, row in result[mode]["table"].items():
            log.log({"step": cfg.sft.steps, "eval": mode, "family": fam, **row})
    samples = []
    seen = set()
    for ex, rep in zip(prompts, result["greedy"]["replies"]):
        if ex["family"] not in seen:
            seen.add(ex["family"])
            samples.append(conversation_text(ex, rep["text"]))
    for s in samples[:4]:
        print("\n" + s)
    tables = generalisation_tables(model, tok, cfg)
    tables["entities held out, phrasings held out"] = result["greedy"]["table"]
    for name, table in tables.items():
        log.log({"step": cfg.sft.steps, "eval": "greedy", "split": name, "correct": table["all"]["correct"]})
    report_md = ("### Where held-out prompts fail (SFT, greedy)\n\nShare judged correct when only the "
                 "entities, only the user's phrasings, both or neither are unseen in SFT "
                 f"({max(1, cfg.world.n_heldout // 2)} prompts per family in the first three columns; "
                 "the last is the main evaluation above).\n\n"
                 + markdown_family_table({k.replace("entities", "ent.").replace("phrasings", "phr."): v
                                          for k, v in tables.items()}))
    return {"eval": {m: result[m]["table"] for m in ("greedy", "sampled")}, "samples": samples,
            "generalisation": {k: v["all"]["correct"] for k, v in tables.items()}, "report_md": report_md}


def generalisation_tables(model, tok, cfg) -> dict[str, dict]:
    """Greedy family tables on prompts whose entities, phrasings or neither are held out.

    The main evaluation holds out both at once; these three tell an SFT model that cannot
    use a fact it learned in pretraining (unseen entities) from one that does not
    recognise a question worded differently (unseen phrasings).
    """
    from minichat.evaluate import family_table, judge_replies, sample_replies
    from minichat.world import FAMILIES, generate_dialogues, to_prompt, world_from_config

    world = world_from_config(cfg.world)
    n = max(1, cfg.world.n_heldout // 2) * len(FAMILIES)
    out = {}
    for entities, phrasings in (("train", "train"), ("heldout", "train"), ("train", "heldout")):
        prompts = [to_prompt(d) for d in generate_dialogues(world, n, entities, seed=cfg.world.seed + 7,
                                                            phrasing_split=phrasings)]
        replies = sample_replies(model, tok, prompts, max_new_tokens=cfg.sft.max_new_tokens,
                                 temperature=0.0, seed=cfg.seed)
        name = f"entities {'held out' if entities == 'heldout' else 'seen'}, " \
               f"phrasings {'held out' if phrasings == 'heldout' else 'seen'}"
        out[name] = family_table(prompts, *judge_replies(prompts, replies))
    return out
