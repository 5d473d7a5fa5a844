"""Write ChatWorld data in every format the stages read (JSONL, one object per line).

    pretrain.jsonl       {"text": ...}                 one document per line
    corpus.txt           the same documents as plain text, blank-line separated
    sft_{train,heldout}.jsonl      {"messages": [...], "family", "split", "meta"}
    prompts_{train,rl,heldout}.jsonl  {"messages": [... ending with a user turn], "family",
                                    "split", "meta", "ideal"}; "rl": train entities asked in
                                    the phrasings only the RL stages use (the PPO prompts)
    reward_{train,heldout}.jsonl   K-way: {"messages", "completions", "ranking", "scores", "family"}
    reward_pairs_{train,heldout}.jsonl  TRL style: {"messages", "chosen", "rejected", "family"}
    world.json           the knowledge base itself

The comparison files are a bootstrap: completions are the ideal reply plus generated
flawed replies, ranked by a simulated labeler (labelers.rank) from the gold judge's scores,
before any policy samples exist.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from minichat.config import WorldConfig

import numpy as np

from .corpus import generate_corpus
from .dialogues import FAMILIES, generate_dialogues, to_prompt
from .judge import flawed_replies, judge, tokens
from .kb import World, world_from_config
from .labelers import rank


def write_jsonl(path: Path, rows) -> int:
    with open(path, "w", encoding="utf-8") as f:
        n = 0
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def comparisons(world: World, prompts: list[dict], k: int, seed: int, *, noise: float,
                length_bias: float) -> list[dict]:
    """K-way ranked comparisons: the ideal and K-1 flawed replies, ranked by a labeler."""
    rng, gen = random.Random(seed), np.random.default_rng(seed)
    rows = []
    for p in prompts:
        flaws = list(flawed_replies(p, world, rng).values())
        completions = [p["ideal"]] + rng.sample(flaws, min(k - 1, len(flaws)))
        rng.shuffle(completions)
        scores = [judge(p, c) for c in completions]
        order = rank(scores, [len(tokens(c)) for c in completions], gen, noise=noise,
                     length_bias=length_bias)
        rows.append({"messages": p["messages"], "completions": completions, "ranking": order,
                     "scores": [round(s, 4) for s in scores], "family": p["family"]})
    return rows


def pairs(kway: list[dict], seed: int) -> list[dict]:
    """One TRL-style pair per K-way row: the top-ranked reply against a lower-ranked one."""
    rng = random.Random(seed)
    out = []
    for row in kway:
        best, other = row["ranking"][0], rng.choice(row["ranking"][1:])
        out.append({"messages": row["messages"], "chosen": row["completions"][best],
                    "rejected": row["completions"][other], "family": row["family"]})
    return out


def export(out: str | Path, *, seed: int = 0, n_docs: int = WorldConfig.n_docs,
           n_dialogues: int = WorldConfig.n_dialogues, n_heldout: int = 1100, n_prompts: int = 2200,
           n_comparisons: int = 2200, k: int = 4, label_noise: float = 0.1,
           length_bias: float = 0.0) -> dict[str, int]:
    """Write every file into ``out``; returns {file name: number of lines}. The world is
    the pipeline's (`WorldConfig`'s sizes, with ``seed``), so the files hold the facts that
    `python -m minichat.train` would train on."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    world = world_from_config(WorldConfig(seed=seed))
    counts = {}
    docs = generate_corpus(world, n_docs, seed)
    counts["pretrain.jsonl"] = write_jsonl(out / "pretrain.jsonl", ({"text": d} for d in docs))
    (out / "corpus.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    counts["corpus.txt"] = len(docs)
    for split, n in (("train", n_dialogues), ("heldout", n_heldout)):
        sft = generate_dialogues(world, n, split, seed)
        counts[f"sft_{split}.jsonl"] = write_jsonl(out / f"sft_{split}.jsonl", sft)
        n_p = n_prompts if split == "train" else max(len(FAMILIES), n_prompts // 4)
        prompts = [to_prompt(d) for d in generate_dialogues(world, n_p, split, seed + 1)]
        counts[f"prompts_{split}.jsonl"] = write_jsonl(out / f"prompts_{split}.jsonl", prompts)
        n_c = n_comparisons if split == "train" else max(len(FAMILIES), n_comparisons // 4)
        cmp_prompts = [to_prompt(d) for d in generate_dialogues(world, n_c, split, seed + 2)]
        kway = comparisons(world, cmp_prompts, k, seed + 3, noise=label_noise,
                           length_bias=length_bias)
        counts[f"reward_{split}.jsonl"] = write_jsonl(out / f"reward_{split}.jsonl", kway)
        counts[f"reward_pairs_{split}.jsonl"] = write_jsonl(
            out / f"reward_pairs_{split}.jsonl", pairs(kway, seed + 4))
    rl = [to_prompt(d) for d in generate_dialogues(world, n_prompts, "train", seed + 5, phrasing_split="rl")]
    counts["prompts_rl.jsonl"] = write_jsonl(out / "prompts_rl.jsonl", rl)
    (out / "world.json").write_text(json.dumps(world.to_dict(), indent=1) + "\n", encoding="utf-8")
    return counts


SMALL = dict(n_docs=12, n_dialogues=22, n_heldout=11, n_prompts=11, n_comparisons=11)
