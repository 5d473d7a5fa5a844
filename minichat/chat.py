"""`python -m minichat.chat`: talk to a trained model.

    python -m minichat.chat                          # the newest policy of runs/tiny
    python -m minichat.chat run=small stage=sft      # another run, a chosen stage
    python -m minichat.chat checkpoint=runs/tiny/ppo/checkpoints/40 temperature=0
    python -m minichat.chat --prompt "What is the capital of Dorania?" --prompt "And its population?"
    printf 'hi\\nwhat can you do?\\n' | python -m minichat.chat   # one user turn per line

Which model. With no `stage=` or `checkpoint=`, chat loads the newest policy of the run:
among the run's stages that hold a checkpoint, the latest in the pipeline order
(`ppo_r3` > `ppo_r2` > `ppo` > `sft` > `pretrain`; the reward model is not a policy), from
its newest step. `stage=NAME` forces a stage; `checkpoint=PATH` names a stage's
`checkpoints/` directory or one step directory in it. The model's shape comes from the
checkpoint's metadata (or, failing that, the stage's `config.yaml`), so any preset loads
without re-typing it; the tokenizer is the run's `tokenizer.json`. Without a trained model
the command says which training command to run first and exits with status 2.

The REPL. Each line you type is a user turn; the model's reply is printed token by token
as it is sampled. The whole conversation is kept and sent again each turn (the model has no
memory of its own: the prompt *is* the memory):

    <|bos|> [<|system|> ... <|end|>] <|user|> ... <|end|> <|assistant|> ... <|end|>
            ... <|user|> ... <|end|> <|assistant|>          <- the model continues from here

The model sees at most `block_size` tokens, and the reply needs `max_new_tokens` of them,
so when the conversation grows past `block_size - max_new_tokens` the oldest whole turns
(a user message and its reply) are left out of the prompt, the system message is kept, and
you are told once. (A single message longer than that keeps only its end.) Commands:
`/reset` starts a new conversation, `/quit` leaves, `/temperature 0.7`, `/top_p 0.9`,
`/top_k 50`, `/max_new_tokens 64`, `/seed 1`, `/system TEXT`, `/settings`, `/help`.
Temperature 0 is greedy decoding (deterministic). Without a terminal on stdin (a pipe, a
file) or with `--prompt`, it runs non-interactively: one turn per line or per `--prompt`,
each reply printed on its own line to stdout; notes go to stderr.

How a reply is generated (the KV cache). `minichat.sampling`'s streaming API does the work
one token at a time, so the text can be printed as it arrives:

1. `prefill`: the prompt, left-padded to a bucket length (16, 32, 64, ... tokens, so a
   handful of compiled shapes serve every prompt), runs through the model once. Every
   layer's keys and values land in a fixed-size cache of `block_size` slots (one shape for
   every turn: the decode step compiles once), and the next-token logits come back.
2. `sample_token` picks a token (temperature, top-k, top-p; greedy at temperature 0).
3. `decode_step` feeds that one token: its query attends over the cached keys, its own
   key and value are written into the next slot, and the next logits come back. Each new
   token costs one token's forward pass instead of the whole sequence's.
4. Repeat until `<|end|>` or `max_new_tokens`.

Each turn re-runs the prefill over the whole (possibly truncated) conversation: simple,
and cheap at these sizes. Printing token by token needs care, because byte-level BPE may
split one character (é, 世, an emoji) over several tokens: `StreamDecoder` decodes the
tokens so far and holds back a trailing partial character (U+FFFD) until it is complete,
so the streamed pieces always join to exactly the final reply.

The same machinery is a small API:

    model, tok, stage = load_policy("runs/tiny")            # or stage="sft", checkpoint=...
    text = reply(model, tok, [{"role": "user", "content": "hi"}], temperature=0,
                 on_token=lambda piece: print(piece, end="", flush=True))
    chat = Chat(model, tok, temperature=0.7); chat.send("hi"); chat.send("and then?")
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence

DEFAULT_RUN = "tiny"
MIN_PROMPT = 16  # max_new_tokens is capped so that at least this many prompt tokens fit
BUCKETS_FROM = 16  # prompts are left-padded to 16, 32, 64, ... tokens
DEFAULT_COMPILATION_CACHE = "~/.cache/minichat/jax"  # Config.compilation_cache's default

# Policy stages in pipeline order. PPO rounds: `ppo` is round 1, `ppo_r2`/`ppo_round2` ...
_POLICY_STAGE = re.compile(r"^(?:(pretrain|sft)|ppo(?:_r(?:ound)?_?(\d+))?)$")


class NoModelError(Exception):
    """There is no trained model to load; the message says which command to run first."""


# --------------------------------------------------------------------------- finding a model


def stage_rank(name: str) -> int | None:
    """Pipeline position of a policy stage (higher = newer); None if not a policy stage."""
    m = _POLICY_STAGE.match(name)
    if m is None:
        return None
    if m.group(1):
        return {"pretrain": 0, "sft": 1}[m.group(1)]
    return 1 + int(m.group(2) or 1)  # ppo = round 1 -> 2, ppo_r2 -> 3, ...


def checkpoint_steps(directory: str) -> list[int]:
    """Committed step numbers in an Orbax checkpoints directory (in-progress saves are
    tmp directories with a suffix, so they are not counted), ascending."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(d) for d in os.listdir(directory)
                  if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def policy_stages(run_dir: str) -> list[str]:
    """The run's policy stages that hold a checkpoint, oldest to newest in pipeline order."""
    if not os.path.isdir(run_dir):
        return []
    found = [s for s in os.listdir(run_dir)
             if stage_rank(s) is not None and checkpoint_steps(os.path.join(run_dir, s, "checkpoints"))]
    return sorted(found, key=stage_rank)


def train_command(run_dir: str, stage: str | None = None) -> str:
    """The command that trains `stage` (default: the whole pipeline) into `run_dir`."""
    parts = ["python -m minichat.train"]
    norm = os.path.normpath(run_dir)
    if norm != os.path.join("runs", DEFAULT_RUN):
        name = os.path.basename(norm)
        same = os.path.normpath(os.path.join("runs", name)) == norm
        parts.append(f"run_name={name}" if same else f"run_dir={run_dir}")
    rank = stage_rank(stage) if stage else None
    if rank is not None and rank > 2:  # ppo_r<N>: the pipeline of N rounds makes it
        parts.append(f"rounds={rank - 1}")
    elif stage in ("tokenizer", "pretrain", "sft", "reward", "ppo"):
        parts.append(f"stage={stage}")
    return " ".join(parts)


@dataclasses.dataclass
class Located:
    """Where a policy checkpoint lives."""

    directory: str  # the stage's checkpoints/ directory
    step: int
    stage: str
    stage_dir: str
    run_dir: str


def locate(run_dir: str, stage: str | None = None, checkpoint: str | None = None) -> Located:
    """Find the checkpoint to load (see the module docstring); NoModelError if none."""
    if checkpoint:
        path = os.path.normpath(checkpoint)
        if not os.path.isdir(path):
            raise NoModelError(f"no checkpoint at {checkpoint}")
        if os.path.basename(path).isdigit() and checkpoint_steps(os.path.dirname(path)):
            directory, step = os.path.dirname(path), int(os.path.basename(path))
        else:
            if not checkpoint_steps(path) and checkpoint_steps(os.path.join(path, "checkpoints")):
                path = os.path.join(path, "checkpoints")  # a stage directory: be forgiving
            steps = checkpoint_steps(path)
            if not steps:
                raise NoModelError(f"no checkpoint at {checkpoint}: expected a stage's "
                                   f"checkpoints/ directory or one of its step directories")
            directory, step = path, steps[-1]
        sdir = os.path.dirname(directory)
        return Located(directory, step, os.path.basename(sdir), sdir, os.path.dirname(sdir))
    if stage:
        if stage_rank(stage) is None:  # reward, comparisons, a typo: nothing to talk to
            raise NoModelError(f"stage={stage} is not a policy: choose pretrain, sft, ppo or "
                               f"ppo_r<N> (a later RLHF round)")
        directory = os.path.join(run_dir, stage, "checkpoints")
        steps = checkpoint_steps(directory)
        if not steps:
            available = policy_stages(run_dir)
            hint = f" (stages with a model: {', '.join(available)})" if available else ""
            raise NoModelError(f"no {stage} checkpoint in {directory}{hint}: run "
                               f"`{train_command(run_dir, stage)}` first")
        return Located(directory, steps[-1], stage, os.path.join(run_dir, stage), run_dir)
    stages = policy_stages(run_dir)
    if not stages:
        raise NoModelError(f"no trained model in {run_dir} yet: run `{train_command(run_dir)}` "
                           f"first (there is a model to chat with once its SFT stage is done)")
    best = stages[-1]
    directory = os.path.join(run_dir, best, "checkpoints")
    return Located(directory, checkpoint_steps(directory)[-1], best, os.path.join(run_dir, best),
                   run_dir)


def find_tokenizer(loc: Located) -> str:
    """The run's tokenizer.json: next to the stage directory, else the stage's config's
    `tokenizer.path`."""
    path = os.path.join(loc.run_dir, "tokenizer.json")
    if os.path.exists(path):
        return path
    cfg = _stage_config(loc.stage_dir)
    configured = (cfg.get("tokenizer") or {}).get("path") if cfg else None
    if configured and os.path.exists(configured):
        return configured
    raise NoModelError(f"no tokenizer at {path}: run `{train_command(loc.run_dir, 'tokenizer')}` "
                       f"first, or pass tokenizer=PATH")


def _stage_config(stage_dir: str) -> dict | None:
    path = os.path.join(stage_dir, "config.yaml")
    if not os.path.exists(path):
        return None
    import yaml
    with open(path) as f:
        return yaml.safe_load(f)


def _model_config(meta: dict, loc: Located):
    from minichat.config import ModelConfig

    saved = meta.get("model")
    if saved is None:
        saved = (_stage_config(loc.stage_dir) or {}).get("model")
    if saved is None:
        from minichat.checkpoint import CheckpointError
        raise CheckpointError(f"{loc.directory}/{loc.step} has no model metadata and "
                              f"{loc.stage_dir}/config.yaml is missing: cannot tell the model shape")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in dict(saved).items() if k in names})
    import jax
    if cfg.attention == "cudnn" and jax.default_backend() != "gpu":
        cfg.attention = "manual"  # trained on a GPU with cuDNN attention, chatting on a CPU
    return cfg


def load_policy(run_dir: str = os.path.join("runs", DEFAULT_RUN), stage: str | None = None,
                checkpoint: str | None = None, tokenizer: str | None = None):
    """Load a trained policy: returns (model, tok, stage_name).

    Raises NoModelError when there is nothing to load (the message names the command to
    run), CheckpointError when the checkpoint does not fit its own metadata."""
    from flax import nnx

    from minichat.checkpoint import Checkpointer
    from minichat.model import GPT
    from minichat.tokenizer import ChatTokenizer, TokenizerError, fingerprint_change

    loc = locate(run_dir, stage, checkpoint)
    tok_path = tokenizer or find_tokenizer(loc)
    tok = ChatTokenizer.load(tok_path, given="tokenizer" if tokenizer else None)
    swapped = fingerprint_change(loc.stage_dir, tok_path)
    if swapped:
        raise TokenizerError(f"{tok_path} is not the tokenizer {loc.stage} was trained with "
                             f"(sha256 {swapped[1]}, trained with {swapped[0]})")
    ckpt = Checkpointer(loc.directory, async_save=False)
    try:
        meta = ckpt.read_meta(loc.step)
        cfg = _model_config(meta or {}, loc)
        if tok.vocab_size > cfg.vocab_size:
            from minichat.checkpoint import CheckpointError
            raise CheckpointError(f"the tokenizer has {tok.vocab_size} tokens but the model in "
                                  f"{loc.directory} only {cfg.vocab_size}: wrong tokenizer?")
        model = GPT.init(cfg)  # jit-compiled init; the values are replaced just below
        _, params, *_ = nnx.split(model, nnx.Param, ...)
        params, _, _ = ckpt.restore(loc.step, params, model_cfg=cfg)
    finally:
        ckpt.close()
    nnx.update(model, params)
    return model, tok, loc.stage


# --------------------------------------------------------------------------- the prompt


def fit_context(tok, messages: Sequence[dict], block_size: int, max_new_tokens: int):
    """Render `messages` (ending with a user turn) as a prompt that leaves room for
    `max_new_tokens` within `block_size`. Returns (ids, dropped, clipped): the oldest whole
    turns are dropped first (`dropped` messages; a leading system message is kept); if the
    newest user turn alone still does not fit, only the end of its text is kept (`clipped`)."""
    budget = block_size - max_new_tokens
    messages = list(messages)
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    # every message costs role + content + end; plus <|bos|> and the final <|assistant|>
    cost = [len(tok.encode(m["content"])) + 2 for m in rest]
    fixed = 2 + sum(len(tok.encode(m["content"])) + 2 for m in system)
    starts = [i for i, m in enumerate(rest) if m["role"] == "user"] or [0]
    if starts[0] != 0:
        starts = [0] + starts
    for s in starts:
        if fixed + sum(cost[s:]) <= budget:
            return tok.render_prompt(system + rest[s:]), s, False
    # The newest turn alone is too long: keep the end of its text (and the system message
    # if it leaves room for at least a few tokens of it).
    last = rest[starts[-1]:]
    head = tok.render_conversation(system)[0] if fixed + 8 <= budget else [tok.bos_id]
    prefix, suffix = [], [tok.end_id, tok.assistant_id]
    for m in last[:-1]:  # normally nothing: the newest turn is one user message
        prefix += [tok.role_ids[m["role"]]] + tok.encode(m["content"]) + [tok.end_id]
    room = budget - len(head) - len(prefix) - 1 - len(suffix)
    content = tok.encode(last[-1]["content"])[-room:] if room > 0 else []
    ids = head + prefix + [tok.role_ids[last[-1]["role"]]] + content + suffix
    dropped = len(messages) - len(last) - (len(system) if len(head) > 1 else 0)
    return ids, dropped, True


# --------------------------------------------------------------------------- generation


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new text (maybe ""), holding back a
    character whose bytes are split across tokens; `flush()` returns whatever is left.
    The pieces always join to `tok.decode(ids)`."""

    def __init__(self, tok):
        self.tok = tok
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""  # (probably) an incomplete multi-byte character: wait for the rest
        return self._take(text)

    def flush(self) -> str:
        return self._take(self.tok.decode(self.ids))

    def _take(self, text: str) -> str:
        if not text.startswith(self.emitted):  # cannot happen with byte-level BPE; be safe
            return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def _bucket(n: int, cap: int) -> int:
    size = BUCKETS_FROM
    while size < n:
        size *= 2
    return max(n, min(size, cap))


def sample_tokens(model, prompt_ids: Sequence[int], *, end_id: int | None, pad_id: int = 0,
                  max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0, seed=0) -> Iterator[int]:
    """Yield sampled token ids one at a time (the end token is not yielded; stops after it
    or after `max_new_tokens`). `prompt_ids + max_new_tokens` must fit in block_size.
    `seed`: an int or a PRNG key. Uses the KV cache: one prefill, then one decode step per
    token."""
    import jax
    import numpy as np

    from minichat.sampling import decode_step, prefill, sample_token

    block_size = model.config.block_size
    n, N = len(prompt_ids), int(max_new_tokens)
    if n + N > block_size:
        raise ValueError(f"prompt ({n} tokens) + max_new_tokens ({N}) exceeds block_size={block_size}")
    P = _bucket(n, block_size - N)
    prompts = np.full((1, P), pad_id, np.int32)
    mask = np.zeros((1, P), np.int32)
    prompts[0, P - n:] = prompt_ids
    mask[0, P - n:] = 1
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    settings = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))
    # one cache shape for every prompt: the decode step compiles once
    logits, cache = prefill(model, prompts, mask, max_len=block_size)
    for step in range(N):
        token, _ = sample_token(logits, jax.random.fold_in(key, step), **settings)
        t = int(token[0])
        if t == end_id:
            return
        yield t
        if step + 1 < N:
            logits, cache = decode_step(model, token, cache)


def clamp_max_new_tokens(max_new_tokens: int, block_size: int) -> int:
    """At most block_size - MIN_PROMPT (and at least 1)."""
    return max(1, min(int(max_new_tokens), block_size - min(MIN_PROMPT, block_size // 2)))


@dataclasses.dataclass
class Reply:
    text: str
    ids: list[int]  # sampled tokens, without the end token
    ended: bool  # stopped at <|end|> (not at max_new_tokens)
    prompt_ids: list[int]
    dropped: int  # messages left out of the prompt to fit the context
    clipped: bool  # the newest message itself was cut to fit


def respond(model, tok, messages: Sequence[dict], *, temperature: float = 0.7, top_p: float = 0.95,
            top_k: int = 0, max_new_tokens: int = 128, seed=0,
            on_token: Callable[[str], None] | None = None) -> Reply:
    """`reply`, with the details (ids, whether it ended, what was truncated)."""
    N = clamp_max_new_tokens(max_new_tokens, model.config.block_size)
    prompt_ids, dropped, clipped = fit_context(tok, messages, model.config.block_size, N)
    stream = StreamDecoder(tok)
    count = 0
    for t in sample_tokens(model, prompt_ids, end_id=tok.end_id, pad_id=tok.pad_id,
                           max_new_tokens=N, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed):
        count += 1
        piece = stream.push(t)
        if piece and on_token is not None:
            on_token(piece)
    ended = count < N
    piece = stream.flush()
    if piece and on_token is not None:
        on_token(piece)
    return Reply(stream.emitted, stream.ids, ended, prompt_ids, dropped, clipped)


def reply(model, tok, messages: Sequence[dict], *, temperature: float = 0.7, top_p: float = 0.95,
          top_k: int = 0, max_new_tokens: int = 128, seed=0,
          on_token: Callable[[str], None] | None = None) -> str:
    """The assistant's reply to `messages` (a conversation ending with a user turn).

    Truncates the oldest turns to fit the context; `on_token(piece)` is called with each
    new piece of text as it is sampled (the pieces join to the returned string).
    temperature 0 = greedy."""
    return respond(model, tok, messages, temperature=temperature, top_p=top_p, top_k=top_k,
                   max_new_tokens=max_new_tokens, seed=seed, on_token=on_token).text


# --------------------------------------------------------------------------- a conversation


class Chat:
    """A conversation with a model: `send(text)` adds a user turn and returns the reply.

    Turn i samples with seed `seed + i` (reproducible, yet not the same draw every turn).
    `notify(message)` is told once per conversation when old turns stop fitting."""

    def __init__(self, model, tok, *, system: str | None = None, temperature: float = 0.7,
                 top_p: float = 0.95, top_k: int = 0, max_new_tokens: int = 128, seed: int = 0,
                 notify: Callable[[str], None] | None = None):
        self.model, self.tok = model, tok
        self.system = system
        self.temperature, self.top_p, self.top_k = temperature, top_p, top_k
        self.max_new_tokens, self.seed = max_new_tokens, seed
        self.notify = notify or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.turns = 0  # over the whole session: /reset does not replay the same samples
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.last: Reply | None = None
        self._told_dropped = self._told_clipped = False

    def send(self, text: str, on_token: Callable[[str], None] | None = None) -> str:
        messages = self.messages + [{"role": "user", "content": text}]
        out = respond(self.model, self.tok, messages, temperature=self.temperature,
                      top_p=self.top_p, top_k=self.top_k, max_new_tokens=self.max_new_tokens,
                      seed=self.seed + self.turns, on_token=on_token)
        self.turns += 1
        self.last = out
        self.messages = messages + [{"role": "assistant", "content": out.text}]
        block = self.model.config.block_size
        if out.dropped and not self._told_dropped:
            self._told_dropped = True
            self.notify(f"(note: the conversation no longer fits the model's {block}-token context "
                        f"with room for {clamp_max_new_tokens(self.max_new_tokens, block)} new "
                        f"tokens; the oldest turns are left out from now on. /reset starts over)")
        if out.clipped and not self._told_clipped:
            self._told_clipped = True
            self.notify("(note: that message is longer than the model's context; "
                        "it sees only its end)")
        return out.text


# --------------------------------------------------------------------------- command line

_SETTINGS = {  # key -> (type, default)
    "temperature": (float, 0.7),
    "top_p": (float, 0.95),
    "top_k": (int, 0),
    "max_new_tokens": (int, 128),
    "seed": (int, 0),
}
_PATHS = ("run", "run_name", "run_dir", "stage", "checkpoint", "tokenizer", "system",
          "compilation_cache")

SETTINGS_HELP = """settings (key=value):
  run=NAME            the run runs/NAME (default tiny); run_dir=PATH for another place
  stage=NAME          a stage of the run (default: the newest policy, ppo_rN > ppo > sft > pretrain)
  checkpoint=PATH     a stage's checkpoints/ directory or one step directory in it
  tokenizer=PATH      default: the run's tokenizer.json
  system=TEXT         a system message
  temperature=0.7 top_p=0.95 top_k=0 max_new_tokens=128 seed=0
  compilation_cache=DIR   JAX's persistent compilation cache (empty = off)
"""

HELP = """commands:
  /reset              start a new conversation
  /quit               leave (also /exit, Ctrl-D)
  /temperature T      sampling temperature (0 = greedy)
  /top_p P            nucleus sampling: keep the most likely tokens carrying P of the mass
  /top_k K            keep the K most likely tokens (0 = off)
  /max_new_tokens N   longest reply, in tokens
  /seed S             random seed
  /system TEXT        set the system message (starts a new conversation; /system alone clears it)
  /settings           show the settings
  /help               this text
anything else is your message to the model."""


class UsageError(Exception):
    pass


def _convert(key: str, value: str):
    kind = _SETTINGS[key][0]
    try:
        out = kind(value)
    except ValueError:
        raise UsageError(f"{key}={value}: expected {'a number' if kind is float else 'an integer'}") from None
    if kind is float and not math.isfinite(out):  # nan would pass every range check below
        raise UsageError(f"{key}={value}: must be a finite number")
    if key == "temperature" and out < 0:
        raise UsageError(f"temperature={value}: must be >= 0")
    if key == "top_p" and not 0 < out <= 1:
        raise UsageError(f"top_p={value}: must be in (0, 1]")
    if key in ("top_k", "seed") and out < 0:
        raise UsageError(f"{key}={value}: must be >= 0")
    if key == "max_new_tokens" and out < 1:
        raise UsageError(f"max_new_tokens={value}: must be >= 1")
    return out


def parse_args(argv: Sequence[str]):
    parser = argparse.ArgumentParser(
        prog="python -m minichat.chat",
        description="Chat with a trained minichat model (the newest policy of runs/tiny by default).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=SETTINGS_HELP + "\nin the chat, " + HELP,
    )
    parser.add_argument("settings", nargs="*", metavar="key=value")
    parser.add_argument("--prompt", action="append", default=[],
                        help="a user turn: print the reply and exit (repeat for several turns)")
    args = parser.parse_intermixed_args(argv)  # key=value and --prompt in any order
    opts = {k: v for k, (_, v) in _SETTINGS.items()}
    opts.update(run=None, run_dir=None, stage=None, checkpoint=None, tokenizer=None, system=None,
                compilation_cache=DEFAULT_COMPILATION_CACHE)
    for item in args.settings:
        key, eq, value = item.partition("=")
        if not eq:
            raise UsageError(f"expected key=value, got {item!r} (a message goes in --prompt)")
        if key in _SETTINGS:
            opts[key] = _convert(key, value)
        elif key in _PATHS:
            opts["run" if key == "run_name" else key] = value
        else:
            known = ", ".join(list(_SETTINGS) + list(_PATHS))
            raise UsageError(f"unknown setting {key!r}; expected one of {known}")
    opts["run_dir"] = opts["run_dir"] or os.path.join("runs", opts["run"] or DEFAULT_RUN)
    return args, opts


def _command(chat: Chat, line: str, out) -> bool:
    """Handle a /command. Returns False to quit."""
    name, _, arg = line[1:].strip().partition(" ")
    arg = arg.strip()
    err = lambda msg: print(msg, file=sys.stderr, flush=True)
    if name in ("quit", "exit", "q"):
        return False
    if name == "reset":
        chat.reset()
        err("(new conversation)")
    elif name == "help":
        print(HELP, file=out, flush=True)
    elif name in _SETTINGS:
        if not arg:
            err(f"{name} = {getattr(chat, name)}")
        else:
            try:
                setattr(chat, name, _convert(name, arg))
                err(f"({name} = {getattr(chat, name)})")
            except UsageError as e:
                err(f"error: {e}")
    elif name == "system":
        chat.system = arg or None
        chat.reset()
        err("(system message set; new conversation)" if arg else "(system message cleared; new conversation)")
    elif name == "settings":
        err(" ".join(f"{k}={getattr(chat, k)}" for k in _SETTINGS) + f" system={chat.system!r}")
    else:
        err(f"unknown command /{name}; /help lists them")
    return True


def _turn(chat: Chat, text: str, out) -> None:
    # bytes that are not UTF-8 reach us as lone surrogates (Python's stdin decoding): the
    # tokenizer takes valid text only, so they become U+FFFD
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    write = lambda piece: (out.write(piece), out.flush())
    try:
        chat.send(text, on_token=write)
    except KeyboardInterrupt:  # stop this reply; the conversation stays as it was before the turn
        out.write(" [interrupted]")
    out.write("\n")
    out.flush()


def repl(chat: Chat, banner: str, out=None) -> None:
    out = out or sys.stdout
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(banner + "\ntype a message, /help for commands, /quit to leave", file=out, flush=True)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not _command(chat, line, out):
                return
            continue
        _turn(chat, line, out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from minichat.checkpoint import quiet_orbax_reads
    quiet_orbax_reads()
    try:
        args, opts = parse_args(argv)
        locate(opts["run_dir"], opts["stage"], opts["checkpoint"])  # fail fast, before JAX loads
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NoModelError as e:
        print(e, file=sys.stderr)
        return 2

    from minichat.checkpoint import CheckpointError
    from minichat.model import count_params
    from minichat.tokenizer import TokenizerError
    from minichat.train import configure_jax

    configure_jax(argparse.Namespace(compilation_cache=opts["compilation_cache"]))
    try:
        model, tok, stage = load_policy(opts["run_dir"], opts["stage"], opts["checkpoint"],
                                        opts["tokenizer"])
    except (NoModelError, CheckpointError, FileNotFoundError, TokenizerError) as e:
        print(f"error: {e}" if not isinstance(e, NoModelError) else e, file=sys.stderr)
        return 2
    chat = Chat(model, tok, system=opts["system"], **{k: opts[k] for k in _SETTINGS})
    where = opts["checkpoint"] or os.path.join(opts["run_dir"], stage)
    cfg = model.config
    banner = (f"minichat: {where} ({stage}, {count_params(model) / 1e6:.2f}M parameters, "
              f"{cfg.block_size}-token context)")
    if args.prompt:
        turns: Sequence[str] = args.prompt
    elif not sys.stdin.isatty():
        if hasattr(sys.stdin, "reconfigure"):  # a stray non-UTF-8 byte must not end the session
            sys.stdin.reconfigure(errors="surrogateescape")
        turns = sys.stdin  # one user turn per line; /commands work too
    else:
        repl(chat, banner)
        return 0
    print(banner, file=sys.stderr, flush=True)
    for line in turns:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if not args.prompt and line.startswith("/"):
            if not _command(chat, line, sys.stdout):
                break
            continue
        _turn(chat, line, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
