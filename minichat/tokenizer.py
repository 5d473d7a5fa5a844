"""Byte-level BPE tokenizer and the chat template.

Byte-level BPE (GPT-2, Radford et al. 2019) can encode any unicode string: the base
alphabet is the 256 bytes, merges are learned on the corpus with HF `tokenizers`.

A conversation is rendered as

    <|bos|> <|system|> ... <|end|> <|user|> ... <|end|> <|assistant|> ... <|end|> ...

and `render_conversation` returns a loss mask that is 1 exactly on the assistant's
content tokens and on the `<|end|>` that closes each assistant turn: the model learns to
say what the assistant says, and to stop. `<|pad|>` is distinct from `<|end|>` (padding
masked out of the loss must never hide the end token, or the model never learns to stop).

Control tokens are only ever inserted by the template: text typed by a user that looks
like `<|end|>` is encoded as plain bytes (`encode_special_tokens = True`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minichat.data import first_line

BOS, SYSTEM, USER, ASSISTANT, END, PAD = (
    "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>")
SPECIAL_TOKENS = [PAD, BOS, SYSTEM, USER, ASSISTANT, END]  # PAD gets id 0
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used (named in the message)."""


class ChatTokenizer:
    """A trained byte-level BPE plus the ids of the chat control tokens."""

    def __init__(self, tokenizer: Tokenizer):
        self.tok = tokenizer
        self.tok.encode_special_tokens = True  # user text never becomes a control token
        ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"tokenizer lacks the chat special tokens {missing}")
        self.pad_id, self.bos_id = ids[PAD], ids[BOS]
        self.end_id, self.user_id = ids[END], ids[USER]
        self.assistant_id, self.system_id = ids[ASSISTANT], ids[SYSTEM]
        self.role_ids = {role: ids[tok] for role, tok in ROLES.items()}
        self.special_ids = frozenset(ids.values())

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    # -- plain text ---------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special:
            ids = [i for i in ids if i not in self.special_ids]
        return self.tok.decode(ids, skip_special_tokens=False)

    # -- chat template ------------------------------------------------------------------
    def render_conversation(self, messages: Sequence[dict],
                            exclude: Iterable[int] = ()) -> tuple[list[int], list[int]]:
        """Token ids of a conversation and its loss mask (1 on assistant content + end).

        `exclude` lists message indices kept as context but not trained on (e.g. a
        deliberately wrong assistant turn that the user then corrects)."""
        exclude = set(exclude)
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(messages):
            role, content = m["role"], m["content"]
            if role not in self.role_ids:
                raise ValueError(f"unknown role {role!r}; expected one of {sorted(ROLES)}")
            body = self.encode(content) + [self.end_id]
            target = 1 if role == "assistant" and i not in exclude else 0
            ids += [self.role_ids[role]] + body
            mask += [0] + [target] * len(body)
        return ids, mask

    def render_prompt(self, messages: Sequence[dict]) -> list[int]:
        """A conversation ending with a user turn, plus `<|assistant|>`: ready to generate."""
        ids, _ = self.render_conversation(messages)
        return ids + [self.assistant_id]

    def render_reply(self, reply: str, ended: bool = True) -> list[int]:
        return self.encode(reply) + ([self.end_id] if ended else [])

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str) -> None:
        tmp = f"{path}.tmp"
        self.tok.save(tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a tokenizer

    @classmethod
    def load(cls, path: str, *, given: str | None = None) -> "ChatTokenizer":
        """The tokenizer saved at `path`. `given` names the option the path came from (e.g.
        "tokenizer.path"): a missing file is then the user's typo, not a stage to run."""
        if not os.path.exists(path):
            if given:
                raise FileNotFoundError(f"{given}={path}: no such file")
            from minichat.chat import train_command  # an error path: the import costs nothing else
            raise FileNotFoundError(f"no tokenizer at {path}; run "
                                    f"`{train_command(os.path.dirname(path) or '.', 'tokenizer')}` first")
        if os.path.isdir(path):
            raise TokenizerError(f"{path}: a directory, not a tokenizer.json file")
        try:
            tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the Rust library's errors: "expected ',' or '}' at line 1 ..."
            raise TokenizerError(f"{path}: not a readable tokenizer file "
                             f"({first_line(e)})") from None
        try:
            return cls(tokenizer)
        except ValueError as e:
            raise TokenizerError(f"{path}: {e}") from None


FINGERPRINT = "tokenizer.sha256"  # in each stage directory: the tokenizer it was trained with


def fingerprint(path: str) -> str:
    """The first 16 hex digits of the tokenizer file's SHA-256: a stage records the one it
    trained with, so that a model is never read with another tokenizer's ids."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def recorded_fingerprint(stage_dir: str) -> str | None:
    path = os.path.join(stage_dir, FINGERPRINT)
    if not os.path.isfile(path):
        return None  # a stage from before the fingerprints, or the tokenizer stage
    with open(path) as f:
        return f.read().strip() or None


def fingerprint_change(stage_dir: str, path: str) -> tuple[str, str] | None:
    """(recorded, now) when the stage in `stage_dir` was trained with another tokenizer than
    the file at `path`; None when they match or there is nothing to compare."""
    then = recorded_fingerprint(stage_dir)
    if not then or not os.path.isfile(path):
        return None
    now = fingerprint(path)
    return None if now == then else (then, now)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> ChatTokenizer:
    """Learn byte-level BPE merges on `texts`; the special tokens take the first ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return ChatTokenizer(tok)
