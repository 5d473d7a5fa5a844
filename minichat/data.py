"""Data formats, validation and batching.

Every stage reads JSONL (one object per line) in these formats (also in docs/00_overview.md, "Your own data"):

    pretrain  plain .txt files, or {"text": ...}
    sft       {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    reward    K-way {"messages": [...], "completions": [str, ...], "ranking": [best, ..., worst]}
              or pairwise {"messages"|"prompt": ..., "chosen": str, "rejected": str}
    ppo       {"messages": [...]} ending with a user turn

A malformed line raises `DataError` naming the file, the line and what is wrong.
Batches are a pure function of (seed, step), so a resumed run sees exactly the batches
an uninterrupted one would have seen.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """A data file is malformed; the message says where and why."""


def first_line(e: BaseException, *, root: bool = False, limit: int = 200) -> str:
    """An exception's message as one line for a one-line error: its first non-empty line
    (the type's name if none), cut at `limit`. `root`: of the innermost exception behind
    `e` (Orbax wraps TensorStore's "OUT_OF_RANGE: ... value of size 0" in generic ones)."""
    seen = set()
    while root and (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line if len(line) <= limit else line[:limit] + "..."


# ---- reading and validating ----------------------------------------------------------
def read_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    """Yield (`file:line` location, object) for each non-blank line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: {'a directory, not a file' if os.path.isdir(path) else 'no such file'}")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def check_messages(messages, where: str, *, last_role: str | None = None) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object")
        if m.get("role") not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {list(ROLES)}, got {m.get('role')!r}")
        if not isinstance(m.get("content"), str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
    if last_role is not None and messages[-1]["role"] != last_role:
        raise DataError(f"{where}: the last message must be a {last_role} turn, got {messages[-1]['role']!r}")
    return messages


def load_texts(paths: Sequence[str]) -> list[str]:
    """Pretraining documents: a .txt file is split on blank lines; JSONL needs "text"."""
    docs: list[str] = []
    for path in paths:
        n = len(docs)
        if path.endswith(".txt"):
            if not os.path.isfile(path):
                raise DataError(f"{path}: {'a directory, not a file' if os.path.isdir(path) else 'no such file'}")
            with open(path, "rb") as f:
                raw = f.read()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                line = raw.count(b"\n", 0, e.start) + 1
                raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x})") from None
            docs += [d.strip() for d in text.split("\n\n") if d.strip()]
        else:
            for where, obj in read_jsonl(path):
                if not isinstance(obj.get("text"), str):
                    raise DataError(f"{where}: missing string field 'text'")
                docs.append(obj["text"])
        if len(docs) == n:
            raise DataError(f"{path}: no data (the file is empty or blank)")
    return docs


def _load(paths: Sequence[str], parse) -> list[dict]:
    """Every line of every file through `parse(obj, where)`, which raises `DataError`."""
    rows = []
    for path in paths:
        n = len(rows)
        rows += [parse(obj, where) for where, obj in read_jsonl(path)]
        if len(rows) == n:
            raise DataError(f"{path}: no data (the file is empty or blank)")
    return rows


def _check_family(obj: dict, where: str) -> dict:
    if "family" in obj and not isinstance(obj["family"], str):
        raise DataError(f"{where}: field 'family' must be a string, got {obj['family']!r}")
    return {"family": obj["family"]} if "family" in obj else {}


def parse_conversation(obj: dict, where: str) -> dict:
    """An SFT demonstration: it must contain at least one assistant turn."""
    msgs = check_messages(obj.get("messages"), where)
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{where}: a demonstration needs at least one assistant turn")
    return obj


def parse_prompt(obj: dict, where: str) -> dict:
    check_messages(obj.get("messages"), where, last_role="user")
    return obj


def parse_comparison(obj: dict, where: str) -> dict:
    """K-way rankings or TRL-style pairs, both returned in the K-way form. The optional
    per-completion lists `gold` (numbers) and `ended` (booleans) are checked too."""
    if "chosen" in obj or "rejected" in obj:
        if "completions" in obj or "ranking" in obj:
            raise DataError(f"{where}: a line is either pairwise (chosen/rejected) or K-way "
                            f"(completions/ranking), not both")
        prompt = obj.get("messages", obj.get("prompt"))
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        msgs = check_messages(prompt, where, last_role="user")
        for key in ("chosen", "rejected"):
            if not isinstance(obj.get(key), str):
                raise DataError(f"{where}: field '{key}' must be a string")
        row = {"messages": msgs, "completions": [obj["chosen"], obj["rejected"]], "ranking": [0, 1]}
        return {**row, **_check_family(obj, where)}
    msgs = check_messages(obj.get("messages"), where, last_role="user")
    comps, ranking = obj.get("completions"), obj.get("ranking")
    if not isinstance(comps, list) or len(comps) < 2 or not all(isinstance(c, str) for c in comps):
        raise DataError(f"{where}: field 'completions' must be a list of >= 2 strings")
    if (not isinstance(ranking, list) or not all(type(r) is int for r in ranking)
            or sorted(ranking) != list(range(len(comps)))):
        raise DataError(f"{where}: field 'ranking' must be a permutation of 0..{len(comps) - 1} (best first)")
    _check_family(obj, where)
    for key, what, ok in (("gold", "finite numbers",
                           lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)),
                          ("ended", "booleans", lambda x: isinstance(x, bool))):
        v = obj.get(key)
        if key in obj and not (isinstance(v, list) and len(v) == len(comps) and all(map(ok, v))):
            raise DataError(f"{where}: field '{key}' must be a list of {len(comps)} {what}, one per completion")
    if len(comps) > 9:
        warnings.warn(f"{where}: {len(comps)} completions; InstructGPT ranks at most 9", stacklevel=3)
    return {**obj, "messages": msgs, "completions": comps, "ranking": ranking}


def load_conversations(paths: Sequence[str]) -> list[dict]:
    return _load(paths, parse_conversation)


def load_prompts(paths: Sequence[str]) -> list[dict]:
    return _load(paths, parse_prompt)


def load_comparisons(paths: Sequence[str]) -> list[dict]:
    return _load(paths, parse_comparison)


def write_jsonl(path: str, rows: Sequence[dict]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# ---- batching -------------------------------------------------------------------------
def pack_documents(docs_ids: Sequence[Sequence[int]], bos_id: int) -> np.ndarray:
    """One token stream: <|bos|> doc <|bos|> doc ... (GPT-2 style packing)."""
    total = sum(len(d) + 1 for d in docs_ids)
    stream = np.empty(total, dtype=np.int32)
    i = 0
    for d in docs_ids:
        stream[i] = bos_id
        stream[i + 1:i + 1 + len(d)] = d
        i += len(d) + 1
    return stream


def lm_batch(stream: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """(B, seq_len + 1) windows of the stream: a pure function of (seed, step)."""
    n_windows = (len(stream) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"the corpus has {len(stream)} tokens, fewer than one window of {seq_len + 1}")
    per_epoch = max(n_windows // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_windows)
    idx = order[np.arange(i * batch_size, (i + 1) * batch_size) % n_windows]
    offsets = idx[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return stream[offsets]


def first_fit(lengths: Sequence[int], width: int, window: int | None = None) -> tuple[np.ndarray, int]:
    """Sequences of `lengths` (each <= width), in the order given, placed end to end into
    rows of `width` tokens: ((N, 2) array of each one's (row, first column), rows used).

    Each goes into the first row with room for it among the last `window` rows opened (all
    rows when None; a small window keeps packing thousands of sequences linear); zero-length
    sequences are not placed (row and column 0).
    """
    free: list[int] = []  # free columns left in each row
    where = np.zeros((len(lengths), 2), np.int64)
    for i, n in enumerate(lengths):
        if n <= 0:
            continue
        lo = 0 if window is None else max(0, len(free) - window)
        j = next((j for j in range(lo, len(free)) if free[j] >= n), len(free))
        if j == len(free):
            free.append(width)
        where[i] = (j, width - free[j])
        free[j] -= n
    return where, len(free)


def pad_rows(rows: Sequence[Sequence[int]], length: int, pad: int, *, left: bool = False) -> np.ndarray:
    out = np.full((len(rows), length), pad, dtype=np.int32)
    for r, row in enumerate(rows):
        row = list(row)[:length]
        if left:
            out[r, length - len(row):] = row
        else:
            out[r, :len(row)] = row
    return out


def epoch_batch_indices(n: int, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Indices of the examples in batch `step`, reshuffled every epoch."""
    per_epoch = max(n // batch_size, 1)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[np.arange(i * batch_size, (i + 1) * batch_size) % n]
