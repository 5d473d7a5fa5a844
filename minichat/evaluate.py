"""Evaluation: gold-judge scores, win rates, plots and the run's report.md."""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(rows: list[dict], path: str, keys: list[str], *, title: str = "",
                hline: tuple[float, str] | None = None, xkey: str = "step") -> None:
    """One line per metric key against the step; rows missing a key are skipped."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in keys:
        pts = [(r[xkey], r[key]) for r in rows if key in r and xkey in r]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, label=key, marker="o" if len(pts) < 30 else None, markersize=3)
    if hline:
        ax.axhline(hline[0], color="gray", linestyle="--", label=hline[1])
    ax.set_xlabel(xkey)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- generation for evaluation ----------------------------------------------------------
def prompt_batch(tok, examples, width: int):
    """Left-padded prompt ids and mask; a prompt longer than `width` keeps its last tokens."""
    import numpy as np

    from minichat.data import pad_rows
    rows = [tok.render_prompt(ex["messages"])[-width:] for ex in examples]
    tokens = pad_rows(rows, width, tok.pad_id, left=True)
    lengths = np.array([len(r) for r in rows])
    mask = (np.arange(width)[None, :] >= (width - lengths)[:, None]).astype(np.int32)
    return tokens, mask


def sample_replies(model, tok, examples, *, max_new_tokens: int, temperature: float, seed: int,
                   top_p: float = 1.0, batch_size: int = 64, n: int = 1, desc: str = "",
                   shrink: bool | None = False) -> list[dict]:
    """Replies of `model` to each example's conversation: text, ended (emitted <|end|>), length.

    The prompts are batched shortest first, each batch left-padded to its own longest prompt
    rounded up to 32 tokens: ChatWorld prompts average ~28 tokens but reach ~100, and one
    width for all would make the prefill mostly padding (a batch at width 128 samples at
    half the speed of one at 64). Batches keep a fixed row count (the tail is padded with
    copies), so the sampler compiles once per width bucket. Replies come back in the
    examples' order.

    `n` > 1: n replies per example from one prefill (`generate(n_samples=n)`), returned
    example-major (reply j of example i at i * n + j); a batch holds batch_size // n
    prompts. The same replies as the examples each repeated n times with `n=1`.

    `desc`: show a progress bar with that label (prompts done, new tokens/s); "" for none.
    `shrink`: `generate`'s, off by default. An evaluation runs a few batches per prompt
    width, and compiling the second loop costs more than it saves there (the SFT stage's
    held-out evaluation, cold: 15.3 s without, 18.4 s with); the comparisons stage, ~50
    batches per width, turns it on (None: on a CPU).
    """
    import time

    import jax
    import numpy as np
    from tqdm.auto import tqdm

    from minichat.parallel import is_main
    from minichat.sampling import generate

    block = model.config.block_size
    lengths = np.array([len(tok.render_prompt(ex["messages"])) for ex in examples])
    order = np.argsort(lengths, kind="stable")
    key = jax.random.key(seed)
    per_batch = max(1, batch_size // n)
    out: list[dict] = [{}] * (len(examples) * n)
    bar = tqdm(total=len(examples), desc=desc, unit="prompt", disable=not (desc and is_main()),
               dynamic_ncols=True)
    t0, n_new = time.perf_counter(), 0
    for i in range(0, len(examples), per_batch):
        idx = order[i:i + per_batch]
        chunk = [examples[j] for j in idx]
        chunk += [chunk[0]] * (per_batch - len(idx))  # fixed shape: no recompilation on the tail
        width = min(-(-int(lengths[idx].max()) // 32) * 32, block - max_new_tokens)
        tokens, mask = prompt_batch(tok, chunk, width)
        # keyed by the first row's index, so that n > 1 draws what n = 1 on repeats would
        gen = generate(model, tokens, mask, jax.random.fold_in(key, i * n), max_new_tokens=max_new_tokens,
                       temperature=temperature, top_k=0, top_p=top_p, end_id=tok.end_id,
                       pad_id=tok.pad_id, n_samples=n, shrink=shrink)
        toks, gmask = np.asarray(gen.tokens), np.asarray(gen.mask)
        for r, j in enumerate(idx):
            for k in range(n):
                ids = toks[r * n + k][gmask[r * n + k] > 0]
                ended = bool(len(ids) and ids[-1] == tok.end_id)
                out[j * n + k] = {"text": tok.decode(ids).strip(), "ended": ended, "n_tokens": int(len(ids))}
        n_new += int(gmask[:len(idx) * n].sum())
        bar.set_postfix(tok_s=f"{n_new / (time.perf_counter() - t0):,.0f}", refresh=False)
        bar.update(len(idx))
    bar.close()
    return out


def judge_replies(examples, replies) -> tuple[list[float], list[bool]]:
    from minichat.world import is_correct, judge
    scores = [judge(ex, r["text"], ended=r["ended"]) for ex, r in zip(examples, replies)]
    correct = [is_correct(ex, r["text"], ended=r["ended"]) for ex, r in zip(examples, replies)]
    return scores, correct


def family_table(examples, scores, correct, replies=None) -> dict:
    """Per dialogue family: mean gold score, share judged correct, count (and `all`)."""
    import numpy as np
    table = {}
    families = sorted({ex["family"] for ex in examples})
    for fam in families + ["all"]:
        idx = [i for i, ex in enumerate(examples) if fam == "all" or ex["family"] == fam]
        row = {"score": float(np.mean([scores[i] for i in idx])),
               "correct": float(np.mean([correct[i] for i in idx])), "n": len(idx)}
        if replies is not None:
            row["length"] = float(np.mean([replies[i]["n_tokens"] for i in idx]))
            row["ended"] = float(np.mean([replies[i]["ended"] for i in idx]))
        table[fam] = row
    return table


def evaluate_policy(model, tok, examples, *, max_new_tokens: int, temperature: float, seed: int,
                    desc: str = "") -> dict:
    """Gold-judge evaluation, greedy and sampled, with the replies kept for the report.
    `desc`: label of the sampling progress bars ("" for none)."""
    result = {}
    for mode, temp in (("greedy", 0.0), ("sampled", temperature)):
        replies = sample_replies(model, tok, examples, max_new_tokens=max_new_tokens, temperature=temp,
                                 seed=seed, desc=desc and f"{desc} ({mode})")
        scores, correct = judge_replies(examples, replies)
        result[mode] = {"table": family_table(examples, scores, correct, replies),
                        "replies": replies, "scores": scores, "correct": correct}
    return result


def markdown_family_table(tables: dict[str, dict], metric: str = "correct") -> str:
    """Rows = families, columns = the named tables (e.g. SFT greedy, PPO greedy)."""
    names = list(tables)
    families = [f for f in next(iter(tables.values())) if f != "all"] + ["all"]
    lines = ["| family | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for fam in families:
        cells = []
        for n in names:
            row = tables[n].get(fam)
            cells.append("-" if row is None else f"{row[metric]:.2f} (score {row['score']:+.2f})")
        lines.append(f"| {fam} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def conversation_text(example, reply: str) -> str:
    lines = [f"**{m['role']}**: {m['content']}" for m in example["messages"]]
    return "\n".join(lines + [f"**assistant (model)**: {reply}"])


# ---- comparing two policies ---------------------------------------------------------------
def save_eval(path: str, examples, result: dict) -> None:
    """Per-prompt records of an `evaluate_policy` result, so later stages can pair them."""
    from minichat.data import write_jsonl
    rows = []
    for i, ex in enumerate(examples):
        row = {"family": ex["family"], "messages": ex["messages"]}
        for mode in result:
            rep = result[mode]["replies"][i]
            row[mode] = {"reply": rep["text"], "ended": rep["ended"], "n_tokens": rep["n_tokens"],
                         "score": result[mode]["scores"][i], "correct": bool(result[mode]["correct"][i])}
        rows.append(row)
    write_jsonl(path, rows)


def win_rate(a, b, z: float = 1.96) -> dict:
    """How often policy A's reply beats B's on the same prompt (ties count half), with a
    normal-approximation confidence interval over prompts; plus the paired mean score
    difference A - B and its interval. Both intervals treat prompts as i.i.d. draws."""
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores must have the same non-empty shape, got {a.shape} and {b.shape}")
    n = a.size
    outcome = (a > b) + 0.5 * (a == b)
    diff = a - b
    se = lambda x: x.std(ddof=1) / np.sqrt(n) if n > 1 else float("inf")
    rate, d = outcome.mean(), diff.mean()
    return {"win_rate": float(rate), "win_ci": [float(rate - z * se(outcome)), float(rate + z * se(outcome))],
            "wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum()),
            "mean_diff": float(d), "diff_ci": [float(d - z * se(diff)), float(d + z * se(diff))], "n": n}


# ---- the run report ----------------------------------------------------------------------
def policy_stages(run_dir: str) -> list[str]:
    """Finished PPO stages in round order: ppo, ppo_r2, ppo_r3, ..."""
    from minichat.chat import stage_rank  # the one parser of stage names: sft 1, ppo 2, ppo_r2 3

    ranks = {s: stage_rank(s) for s in os.listdir(run_dir)}
    found = [s for s, r in ranks.items() if r is not None and r >= 2
             and os.path.exists(os.path.join(run_dir, s, "DONE.json"))]
    return sorted(found, key=ranks.get)


def compare_evals(run_dir: str, a: str, b: str) -> dict | None:
    """Paired gold-judge comparison of two stages' held-out evaluations (eval.jsonl)."""
    from minichat.checkpoint import MetricsLog
    pa, pb = (os.path.join(run_dir, s, "eval.jsonl") for s in (a, b))
    if not (os.path.exists(pa) and os.path.exists(pb)):
        return None
    ra, rb = MetricsLog.read(pa), MetricsLog.read(pb)
    if [r["messages"] for r in ra] != [r["messages"] for r in rb]:
        raise ValueError(f"{pa} and {pb} were evaluated on different prompts; cannot pair them")
    out = {mode: win_rate([r[mode]["score"] for r in ra], [r[mode]["score"] for r in rb])
           for mode in ("greedy", "sampled") if mode in ra[0] and mode in rb[0]}
    out["examples"] = [(x, y) for x, y in zip(ra, rb)]
    return out


def stage_title(stage: str) -> str:
    """"ppo" -> "PPO", "ppo_r2" -> "PPO round 2" (the stage names of `rounds`)."""
    from minichat.chat import stage_rank  # the one parser of stage names: ppo 2, ppo_r2 3
    rank = stage_rank(stage) or 0
    return f"PPO round {rank - 1}" if rank > 2 else stage.upper()


def run_report(cfg, run_dir: str, tok=None, mesh=None) -> dict:
    """Write runs/<run>/report.md and collect the plots into runs/<run>/plots/."""
    import json
    import shutil

    from minichat.checkpoint import is_done, mark_done, read_done

    finished = [s for s in os.listdir(run_dir)  # not a `<stage>.old` set aside by resume=false
                if "." not in s and os.path.isdir(os.path.join(run_dir, s)) and is_done(run_dir, s)
                and s != "report"]
    finished.sort(key=lambda s: os.path.getmtime(os.path.join(run_dir, s, "DONE.json")))  # run order
    done = {s: read_done(run_dir, s) for s in finished}
    plots = os.path.join(run_dir, "plots")
    os.makedirs(plots, exist_ok=True)
    for stage in done:
        for f in sorted(os.listdir(os.path.join(run_dir, stage))):
            if f.endswith(".png"):
                shutil.copy(os.path.join(run_dir, stage, f), os.path.join(plots, f"{stage}_{f}"))

    md = [f"# minichat report: `{run_dir}`", ""]
    m = cfg.model
    md += [f"Model: {m.n_layer} layers x {m.n_embd} wide, {m.n_head} heads, context {m.block_size}, "
           f"vocab {m.vocab_size}. Seed {cfg.seed}.", "", "## Stages", "", "| stage | seconds | result |",
           "|---|---|---|"]
    for stage, s in done.items():
        md.append(f"| {stage} | {s.get('seconds', 0):.0f} | {stage_headline(stage, s)} |")
    md.append(f"| **total** | {sum(s.get('seconds', 0) for s in done.values()):.0f} | |")

    if "pretrain" in done:
        p = done["pretrain"]
        md += ["", "## Pretraining", "",
               f"Held-out loss {p['eval_loss']:.3f} nats/token against {p['unigram_loss']:.3f} for the "
               "unigram baseline.", "", "![pretraining loss](plots/pretrain_loss.png)", ""]
        if p.get("copy_warmup"):
            w = p["copy_warmup"]
            end = (f" Its held-out loss on the recurrence ended at {w['eval_loss']:.2f} nats against "
                   f"{w['chance']:.2f} for chance; a fall far below chance is the phase change in which "
                   "induction heads form." if w.get("eval_loss") is not None else "")
            md += [f"Pretraining began with {w['steps']} steps of an in-context copying task (random "
                   f"tokens, a span that recurs after a gap; `pretrain.copy`), and kept {w['rows']} rows "
                   f"of every batch on it.{end}", "", "![copying warm-up](plots/pretrain_copy_loss.png)", ""]
        if p.get("copy_accuracy"):
            c = p["copy_accuracy"]
            md += [f"In-context copying (the induction-head test of Olsson et al. 2022): next-token "
                   f"top-1 accuracy {c['repeat']:.2f} on the second copy of a random token sequence, "
                   f"{c['first']:.2f} on the first"
                   + (": no induction heads yet, so replies that must quote the conversation "
                      "(summaries, premises, corrections) are out of reach." if c["repeat"] < c["first"] + 0.2
                      else "."), ""]
        md += ["Samples:", ""]
        md += [f"- `{x}`" for x in p.get("samples", [])]
    tables = {}
    if "sft" in done and "eval" in done["sft"]:
        tables["SFT greedy"] = done["sft"]["eval"]["greedy"]
        tables["SFT sampled"] = done["sft"]["eval"]["sampled"]
    for stage in policy_stages(run_dir):
        if "eval" in done[stage]:
            tables[f"{stage_title(stage)} greedy"] = done[stage]["eval"]["greedy"]
            tables[f"{stage_title(stage)} sampled"] = done[stage]["eval"]["sampled"]
    if tables:
        md += ["", "## Gold judge on held-out prompts, by dialogue family", "",
               "Share of replies judged correct (mean gold score in brackets, range [-1, 1]); held-out "
               "prompts use entities and phrasings never seen in SFT.", "", markdown_family_table(tables)]
    for stage in sorted(done):
        if done[stage].get("report_md"):
            md += ["", done[stage]["report_md"]]

    comparison = {}
    final = (policy_stages(run_dir) or [None])[-1]
    if final and "sft" in done:
        cmp_ = compare_evals(run_dir, final, "sft")
        if cmp_:
            md += ["", f"## {stage_title(final)} against SFT", "",
                   "Per held-out prompt, the gold judge scores both replies; a win is a higher score "
                   "(ties count half). Intervals are 95% normal approximations over prompts.", "",
                   "| decoding | win rate | mean score difference | wins / ties / losses |", "|---|---|---|---|"]
            for mode in ("greedy", "sampled"):
                if mode in cmp_:
                    w = cmp_[mode]
                    comparison[mode] = w
                    md.append(f"| {mode} | {w['win_rate']:.3f} [{w['win_ci'][0]:.3f}, {w['win_ci'][1]:.3f}] | "
                              f"{w['mean_diff']:+.3f} [{w['diff_ci'][0]:+.3f}, {w['diff_ci'][1]:+.3f}] | "
                              f"{w['wins']} / {w['ties']} / {w['losses']} |")
            if "kl_to_sft" in done[final]:
                md += ["", f"KL({final} || SFT) on held-out prompts: {done[final]['kl_to_sft']:.3f} nats per reply."]
            md += ["", "### Sample conversations (greedy)", ""]
            for ppo_row, sft_row in pick_samples(cmp_["examples"]):
                turns = "\n".join(f"> **{t['role']}**: {t['content']}  " for t in ppo_row["messages"])
                md += [f"*{ppo_row['family']}*", "", turns, f"> **SFT**: {sft_row['greedy']['reply']}  ",
                       f"> **{stage_title(final)}**: {ppo_row['greedy']['reply']}", ""]
    elif "sft" in done and done["sft"].get("samples"):
        md += ["", "## Sample conversations (SFT, greedy)", ""]
        md += ["\n".join("> " + ln + "  " for ln in s.splitlines()) + "\n" for s in done["sft"]["samples"][:6]]

    path = os.path.join(run_dir, "report.md")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(md) + "\n")
    os.replace(path + ".tmp", path)
    summary = {"report": path, "comparison": {k: {kk: vv for kk, vv in v.items()} for k, v in comparison.items()}}
    mark_done(run_dir, "report", summary)
    print(f"[report] {path}")
    if comparison.get("greedy"):
        w = comparison["greedy"]
        print(f"[report] {final} vs SFT (greedy): win rate {w['win_rate']:.3f} "
              f"[{w['win_ci'][0]:.3f}, {w['win_ci'][1]:.3f}], score diff {w['mean_diff']:+.3f} "
              f"[{w['diff_ci'][0]:+.3f}, {w['diff_ci'][1]:+.3f}]")
    json.dumps(summary)  # the summary must be plain JSON
    return summary


def stage_headline(stage: str, s: dict) -> str:
    if stage == "pretrain":
        return f"held-out loss {s['eval_loss']:.3f} (unigram {s['unigram_loss']:.3f})"
    if stage == "tokenizer":
        return f"{s['vocab_size']} tokens"
    if "eval" in s:
        g = s["eval"]["greedy"]["all"]
        return f"held-out correct {g['correct']:.2f}, gold {g['score']:+.3f} (greedy)"
    for key in ("accuracy", "n_comparisons", "eval_loss"):
        if key in s and isinstance(s[key], (int, float)):
            return f"{key} {s[key]:.3f}" if isinstance(s[key], float) else f"{key} {s[key]}"
    return ""


def pick_samples(pairs, per_family: int = 1, limit: int = 8):
    """One pair per family, preferring prompts where the two policies differ."""
    chosen, seen = [], {}
    ordered = sorted(pairs, key=lambda p: p[0]["greedy"]["reply"] == p[1]["greedy"]["reply"])
    for a, b in ordered:
        if seen.get(a["family"], 0) < per_family:
            seen[a["family"]] = seen.get(a["family"], 0) + 1
            chosen.append((a, b))
    return chosen[:limit]
