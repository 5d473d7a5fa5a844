"""`python -m minichat.train`: one stage of the recipe, or the whole pipeline.

    python -m minichat.train                         # tokenizer -> pretrain -> sft -> comparisons -> reward -> ppo -> report
    python -m minichat.train stage=pretrain          # one stage (earlier ones must be done)
    python -m minichat.train model=small run_name=s  # another preset, another run directory

Every stage writes into runs/<run_name>/<stage>/ and is skipped once its DONE.json
exists, so re-running the same command after an interruption resumes where it stopped
(inside a stage, from its newest checkpoint).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial

import hydra
from omegaconf import OmegaConf

from minichat.config import Config, check  # Config: registers the structured configs  # noqa: F401
from minichat.data import first_line


def configure_jax(cfg) -> None:
    """Persistent compilation cache: the second run does not pay compile time again."""
    import jax
    if cfg.compilation_cache:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cfg.compilation_cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def run_dir_of(cfg) -> str:
    return cfg.run_dir or os.path.join("runs", cfg.run_name)


def tokenizer_path(cfg) -> str:
    return cfg.tokenizer.path or os.path.join(run_dir_of(cfg), "tokenizer.json")


def run_tokenizer(cfg, run_dir: str, tok, mesh) -> dict:
    """Train byte-level BPE on the pretraining corpus.

    Only on the corpus, as GPT-2's BPE was fixed before any fine-tuning: the tokenizer belongs
    to the pretrained model, so new demonstrations (ChatWorld's or the user's `sft.files`)
    change the SFT stage and nothing before it, and two SFT data sets can be compared on one
    pretrained model. Words that only the demonstrations use still encode, byte by byte."""
    from minichat.pretrain import corpus_documents
    from minichat.tokenizer import train_tokenizer
    from minichat.checkpoint import mark_done

    texts = corpus_documents(cfg)
    tok = train_tokenizer(texts, cfg.tokenizer.vocab_size)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer.vocab_size={tok.vocab_size} exceeds model.vocab_size="
                         f"{cfg.model.vocab_size}")
    tok.save(os.path.join(run_dir, "tokenizer.json"))
    summary = {"vocab_size": tok.vocab_size, "n_texts": len(texts)}
    mark_done(run_dir, "tokenizer", summary)
    print(f"[tokenizer] {tok.vocab_size} tokens learned from {len(texts):,} texts")
    return summary


def round_suffix(r: int) -> str:
    return "" if r == 1 else f"_r{r}"


def pipeline(cfg) -> list[tuple[str, Callable]]:
    """The stages of the recipe in order, RLHF rounds expanded.

    Round r samples comparisons from the current policy (SFT in round 1, then the previous
    round's PPO policy), trains the reward model on them (going on from the previous
    round's with `reward.continue_rounds`, else afresh from SFT), and runs PPO from that
    policy, always with the SFT model as the KL reference (InstructGPT)."""
    from minichat import evaluate, ppo, pretrain, reward, sft

    stages = [("tokenizer", run_tokenizer), ("pretrain", pretrain.run), ("sft", sft.run)]
    policy, rm_init = "sft", "sft"
    for r in range(1, cfg.rounds + 1):
        sfx = round_suffix(r)
        stages += [
            (f"comparisons{sfx}", partial(reward.run_comparisons, policy_stage=policy, stage=f"comparisons{sfx}",
                                          earlier=tuple(f"comparisons{round_suffix(q)}" for q in range(1, r)))),
            (f"reward{sfx}", partial(reward.run, policy_stage=policy, stage=f"reward{sfx}",
                                     comparisons_stage=f"comparisons{sfx}", init_stage=rm_init)),
            (f"ppo{sfx}", partial(ppo.run, policy_stage=policy, reward_stage=f"reward{sfx}", stage=f"ppo{sfx}")),
        ]
        policy = f"ppo{sfx}"
        rm_init = f"reward{sfx}" if cfg.reward.continue_rounds else "sft"
    return stages + [("report", evaluate.run_report)]


# Settings that do not change a stage's results, and the sections each stage reads besides
# the shared model / world / seed: a finished stage done with other values is stale.
_NO_EFFECT = {"stage", "resume", "progress", "compilation_cache", "run_name", "run_dir",
              "parallel", "rounds"}
_NO_EFFECT_LEAVES = {"checkpoint_every", "keep"}
# How a stage computes, not what a finished stage's checkpoint is: pretrain in float32 on a
# laptop, fine-tune in bfloat16 with cuDNN attention on a GPU; and, as nanoGPT allows when
# fine-tuning, a later stage may train with another dropout rate than an earlier one did.
_HOW_NOT_WHAT = {"model.attention", "model.dtype", "model.remat", "model.dropout"}
# reward.* keys that only the reward model's training reads (the comparisons stage does not)
_RM_TRAINING = tuple(f"reward.{k}" for k in ("optim.", "epochs", "batch_size", "eval_every", "n_norm",
                                              "continue_rounds", "heldout_frac", "heldout_files"))
# world.* keys that only the dialogues read (demonstrations and evaluation prompts), not the
# corpus: the tokenizer and pretraining stand when they change
_DIALOGUES_ONLY = {"world.n_dialogues", "world.n_heldout"}
_ORDER = ("tokenizer", "pretrain", "sft", "comparisons", "reward", "ppo")
_SECTION = {"tokenizer": "tokenizer", "pretrain": "pretrain", "sft": "sft",
            "comparisons": "reward", "reward": "reward", "ppo": "ppo"}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def changed_settings(cfg, run_dir: str, stage: str) -> list[str]:
    """The settings a finished `stage` depends on whose value its `config.yaml` records
    differently from `cfg`: its own section, the earlier stages' ones, model, world and seed
    (the tokenizer: tokenizer, world, seed and the pretraining files). Settings of how a stage
    runs (`_HOW_NOT_WHAT`, `_NO_EFFECT`) do not count."""
    path = os.path.join(run_dir, stage, "config.yaml")
    base = stage.split("_r")[0]
    if base not in _ORDER or not os.path.exists(path):
        return []
    try:
        then = _flat(OmegaConf.to_container(OmegaConf.load(path)))
    except Exception as e:  # a hand-edited or cut-off file
        raise ValueError(f"{path}: unreadable ({first_line(e)}); "
                         f"run with resume=false to redo the stage") from None
    now = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    if base == "tokenizer":
        reads = lambda k: k.split(".")[0] in ("tokenizer", "world", "seed") or k == "pretrain.files"
    elif base == "comparisons":  # sampling and labelling: not how the reward model trains
        reads = lambda k: (k.split(".")[0] in {"model", "world", "seed", "tokenizer", "pretrain", "sft"}
                           or (k.startswith("reward.") and not k.startswith(_RM_TRAINING)))
    else:
        sections = {"model", "world", "seed"} | {_SECTION[s] for s in _ORDER[:_ORDER.index(base) + 1]}
        reads = lambda k: k.split(".")[0] in sections
    unread = _DIALOGUES_ONLY if base in ("tokenizer", "pretrain") else set()
    return [f"{k}={then.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(then) | set(now))
            if reads(k) and k not in unread and k.split(".")[0] not in _NO_EFFECT and k not in _HOW_NOT_WHAT
            and k.split(".")[-1] not in _NO_EFFECT_LEAVES and then.get(k) != now.get(k)]


def refuse_stale(cfg, run_dir: str, stage: str) -> None:
    """A finished stage is reused only if nothing it depends on changed since: its settings
    (`changed_settings`) and the tokenizer it was trained with (`tokenizer.sha256`)."""
    from minichat.tokenizer import fingerprint_change
    changed = changed_settings(cfg, run_dir, stage)
    swapped = fingerprint_change(os.path.join(run_dir, stage), tokenizer_path(cfg))
    if swapped:
        changed.append(f"tokenizer {tokenizer_path(cfg)} (sha256 {swapped[0]}, now {swapped[1]})")
    if changed:  # reusing it would mix results of two configs without a word
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ValueError(f"{run_dir}/{stage} was done with other settings: "
                         f"{'; '.join(changed[:3])}{more}. Run with resume=false to redo "
                         f"it and the stages after it, or choose another run_name")


@contextlib.contextmanager
def set_aside(path: str, redo: bool):
    """`resume=false`: the stage starts from an empty directory, but its old one is only
    moved aside (`<stage>.old`) until the new run finishes. If the new run fails (a typo in a
    data path, a bad file, Ctrl-C), the old one comes back: a redo never loses results."""
    from minichat.parallel import barrier
    old = path + ".old"
    if redo:
        if os.path.isdir(old):  # left by a run killed mid-redo: the partial new one goes
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):  # multi-host: one process moves it
                os.replace(path, old)
        barrier(f"set_aside/{path}")  # nobody writes the new stage before the move
    try:
        yield
    except BaseException:
        if redo and os.path.isdir(old):
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def run(cfg) -> None:
    from minichat.checkpoint import is_done, stage_dir
    from minichat.parallel import init_distributed, make_mesh
    from minichat.tokenizer import FINGERPRINT, ChatTokenizer, fingerprint

    check(cfg)
    configure_jax(cfg)
    init_distributed(cfg.parallel)
    run_dir = run_dir_of(cfg)
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"run_dir={run_dir} is a file, not a directory")
    os.makedirs(run_dir, exist_ok=True)
    fns = dict(pipeline(cfg))
    if cfg.stage == "all":
        stages = list(fns)
    elif cfg.stage in fns:
        stages = [cfg.stage]
    else:
        raise ValueError(f"stage={cfg.stage!r} is not one of {['all', *fns]} (rounds={cfg.rounds})")
    mesh = make_mesh(cfg.parallel)
    t0 = time.perf_counter()
    for stage in stages:
        if stage == "report" and cfg.stage == "all":
            shutil.rmtree(os.path.join(run_dir, stage), ignore_errors=True)  # always rewritten
        redo = not cfg.resume and (cfg.stage == stage or stage != "tokenizer")
        if not redo and is_done(run_dir, stage):
            refuse_stale(cfg, run_dir, stage)
            print(f"[{stage}] already done in {run_dir}/{stage} (resume=false to redo it)")
            continue
        if stage == cfg.stage:  # one stage on its own: the finished ones it builds on must fit
            # (not the tokenizer: fine-tuning an existing run on your own sft.files keeps its
            # tokenizer, which was trained without them)
            for earlier in list(fns)[1:list(fns).index(stage)]:
                if is_done(run_dir, earlier):
                    refuse_stale(cfg, run_dir, earlier)
        with set_aside(os.path.join(run_dir, stage), redo):
            with open(os.path.join(stage_dir(run_dir, stage), "config.yaml"), "w") as f:
                f.write(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
            if stage != "tokenizer" and os.path.isfile(tokenizer_path(cfg)):
                with open(os.path.join(run_dir, stage, FINGERPRINT), "w") as f:
                    f.write(fingerprint(tokenizer_path(cfg)) + "\n")
            tok = (ChatTokenizer.load(tokenizer_path(cfg), given="tokenizer.path" if cfg.tokenizer.path else None)
                   if stage != "tokenizer" else None)
            if tok is not None and tok.vocab_size > cfg.model.vocab_size:
                raise ValueError(f"the tokenizer {tokenizer_path(cfg)} has {tok.vocab_size} tokens but "
                                 f"model.vocab_size={cfg.model.vocab_size}; raise model.vocab_size")
            t = time.perf_counter()
            fns[stage](cfg, run_dir, tok, mesh)
        print(f"[{stage}] finished in {time.perf_counter() - t:.0f}s")
    print(f"done in {time.perf_counter() - t0:.0f}s: {run_dir}")



@hydra.main(config_path="configs", config_name="config", version_base="1.3")
def _hydra_main(dcfg) -> None:
    from minichat.checkpoint import CheckpointError, close_all
    from minichat.data import DataError

    cfg = OmegaConf.to_object(dcfg)
    try:
        run(cfg)
    except (DataError, CheckpointError, FileNotFoundError, ValueError, FloatingPointError) as e:
        close_all()
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: letting the checkpoint in flight commit (Ctrl-C again quits without it)",
              file=sys.stderr, flush=True)
        try:
            close_all(interruptible=True)  # the save in flight commits; the run resumes from it
        except KeyboardInterrupt:
            # Orbax's save threads may still run, and Python's exit would wait for them: leave
            # now. The half-written step is a temporary directory that the resume ignores.
            print(f"interrupted again: run the same command to resume {run_dir_of(cfg)} from its newest "
                  f"complete checkpoint", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(130)
        print(f"interrupted: run the same command again to resume {run_dir_of(cfg)}", file=sys.stderr)
        sys.exit(130)


def check_overrides(argv: list[str]) -> None:
    """Compose the config once before Hydra does, so that a wrong key or type is one line:
    `error: model.n_layer=abc: Value 'abc' of type 'str' could not be converted to Integer`."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    if len(overrides) != len(argv):
        return  # Hydra flags (--cfg, --multirun, ...): let Hydra handle the command line
    try:
        with initialize_config_module("minichat.configs", version_base="1.3"):
            cfg = OmegaConf.to_object(compose("config", overrides=overrides))
    except (HydraException, OmegaConfBaseException) as e:
        msg = first_line(e, limit=1000).replace("Error merging override ", "").rstrip(".:")
        if e.__cause__ is not None:
            msg += f": {first_line(e.__cause__, limit=1000)}"
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    # `+model.n_layr=8` adds a key instead of failing, and the run would quietly use n_layer's
    # default: a key that no config dataclass declares is a typo
    stray = next(_undeclared(cfg), None)
    if stray is not None:
        print(f"error: {stray}: no such config key (a leading + adds a key; minichat's configs "
              f"declare every key they read)", file=sys.stderr)
        sys.exit(2)


def _undeclared(obj, prefix: str = ""):
    """Dotted names of attributes of config dataclasses that are not their fields."""
    if dataclasses.is_dataclass(obj):
        fields = {f.name for f in dataclasses.fields(obj)}
        for name, value in vars(obj).items():
            if name in fields:
                yield from _undeclared(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"


def main() -> None:
    from minichat.checkpoint import quiet_orbax_reads
    quiet_orbax_reads()
    check_overrides(sys.argv[1:])
    _hydra_main()


if __name__ == "__main__":
    main()
