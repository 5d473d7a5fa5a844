"""Run directory layout, Orbax checkpoints and the metrics log.

    runs/<run_name>/
      tokenizer.json
      <stage>/checkpoints/<step>/{params,opt_state,meta}   Orbax, atomic (tmp dir + rename)
      <stage>/metrics.jsonl                                one JSON object per line
      <stage>/config.yaml                                  the resolved config of the run
      <stage>/DONE.json                                    written last: the stage finished

Checkpoints never go through pickle: arrays go through Orbax/TensorStore, metadata is
JSON. A save that is killed half-way leaves the previous checkpoint intact, so a killed
run restarted with the same command resumes from the newest complete step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import warnings
import weakref
from dataclasses import asdict
from typing import Any

import jax
import orbax.checkpoint as ocp

from minichat.data import first_line, write_jsonl


class CheckpointError(RuntimeError):
    """A checkpoint is missing or does not fit the model it is restored into."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint's files are incomplete or unreadable (a cut-off copy, a bad disk)."""

    def __init__(self, message: str, what: str | None = None):
        super().__init__(message)
        # "checkpoint <dir>/<step> is incomplete or damaged (<why>)", without the advice
        self.what = what or message


def stage_dir(run_dir: str, stage: str) -> str:
    path = os.path.join(run_dir, stage)
    os.makedirs(path, exist_ok=True)
    return path


def is_done(run_dir: str, stage: str) -> bool:
    return os.path.exists(os.path.join(run_dir, stage, "DONE.json"))


def mark_done(run_dir: str, stage: str, summary: dict) -> None:
    if jax.process_index() != 0:
        return  # multi-host: process 0 speaks for the run
    write_json(os.path.join(stage_dir(run_dir, stage), "DONE.json"), summary)


def read_done(run_dir: str, stage: str) -> dict:
    path = os.path.join(run_dir, stage, "DONE.json")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e}); delete it to redo the stage") from None


def write_json(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=float)
    os.replace(tmp, path)


_OPEN: weakref.WeakSet = weakref.WeakSet()  # Checkpointers not yet closed


@contextlib.contextmanager
def interrupt_after():
    """Hold a Ctrl-C until the block ends. One that lands inside Orbax's `save` can leave a
    save thread that the manager does not wait for, cut off (with tracebacks) at exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda *args: pending.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and callable(previous):
            previous(*pending[0])  # the default handler raises KeyboardInterrupt here


def close_all(interruptible: bool = False) -> None:
    """Let every open Checkpointer finish its in-flight save and close: on Ctrl-C or an
    error, so the newest save is committed (not left half-written) before the process ends.

    `interruptible`: wait in another thread, polling, so that a Ctrl-C during the wait
    raises KeyboardInterrupt here. The kernel may deliver SIGINT to any of the process's
    threads (JAX runs many), and Python raises it only when the main thread next runs
    bytecode: a main thread blocked in one long lock wait would never see it."""
    if not interruptible:
        for ckpt in list(_OPEN):
            ckpt.close()
        return
    failed = []

    def close():
        try:
            close_all()
        except BaseException as e:  # re-raised in the waiting thread
            failed.append(e)

    worker = threading.Thread(target=close, daemon=True, name="minichat-close")
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if failed:
        raise failed[0]


class Checkpointer:
    """Keeps the newest `keep` checkpoints of one stage: params, optimizer state, metadata."""

    def __init__(self, directory: str, keep: int = 2, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
        )
        _OPEN.add(self)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state=None, meta: dict | None = None) -> None:
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta or {})}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        with interrupt_after():
            self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int | None, params_like, opt_state_like=None, model_cfg=None):
        """Restore into the shapes/shardings of `params_like` (arrays or ShapeDtypeStructs).

        With `model_cfg`, the saved model shape is checked first, so a mismatch is a
        readable error rather than an array-shape error from deep inside Orbax."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        meta = self.read_meta(step)
        if model_cfg is not None:
            check_model_config(meta, model_cfg, self.directory)
        items = {"params": ocp.args.StandardRestore(abstract(params_like))}
        if opt_state_like is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract(opt_state_like))
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # TensorStore raises plain Exceptions for damaged files
            first = first_line(e, root=True)
            if isinstance(e, (KeyError, TypeError)) or "structure" in first or "shape" in first:
                raise CheckpointError(
                    f"checkpoint {self.directory}/{step} does not fit the model being restored "
                    f"(saved with model {meta.get('model')}): {first}") from None
            raise self._unreadable(step, first) from None
        return out.params, out.get("opt_state"), meta

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON metadata saved with a step (the newest by default)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as e:  # an empty step directory (a cut-off copy), a damaged file
            raise self._unreadable(step, first_line(e, root=True)) from None

    def _unreadable(self, step: int, why: str) -> DamagedCheckpointError:
        """A damaged checkpoint: say which, and how to go back to the one before it."""
        earlier = [s for s in self.manager.all_steps() if s < step]
        way = (f"delete {self.directory}/{step} to resume from step {max(earlier)}" if earlier
               else f"delete {self.directory}/{step}")
        what = f"checkpoint {self.directory}/{step} is incomplete or damaged ({why})"
        return DamagedCheckpointError(f"{what}; {way}, or redo the stage with resume=false", what)

    def set_aside(self, step: int) -> str:
        """Move a damaged step out of the way (to `damaged_checkpoints/` beside this
        directory, never deleted) so that the stage resumes from the one before it and can
        later save that step number again. Returns where it went."""
        where = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints",
                             f"{os.path.basename(self.directory)}_{step}")
        n, target = 1, where
        while os.path.exists(target):
            n, target = n + 1, f"{where}.{n}"
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        _OPEN.discard(self)
        self.manager.wait_until_finished()
        self.manager.close()


def quiet_orbax_reads() -> None:
    """For the command-line tools: a damaged checkpoint fails several of Orbax's concurrent
    reads, and asyncio logs each unretrieved one (80 lines of TensorStore spec) beside our
    one-line error. Nothing else in minichat uses asyncio."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)


def restore_newest_readable(checkpointers: dict, restore, stage: str):
    """`restore(step)` at the newest step that every checkpointer in `checkpointers` (name ->
    Checkpointer) holds, going back a step whenever one of them is damaged: that step is
    set aside (`Checkpointer.set_aside`) with a warning, so a copy cut off mid-file costs the
    steps since the save before it, never the run. Returns restore's result, or None when no
    step is left. A checkpoint that does not fit the model is still an error."""
    while True:
        steps = set.intersection(*(set(c.manager.all_steps()) for c in checkpointers.values()))
        if not steps:
            return None
        step = max(steps)
        try:
            return restore(step)
        except DamagedCheckpointError as e:
            moved = [c.set_aside(step) for c in checkpointers.values()]
            warnings.warn(f"[{stage}] {e.what}; moved to {', '.join(moved)}, "
                          f"resuming from the checkpoint before it", stacklevel=2)


def abstract(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def check_model_config(meta: dict, model_cfg, where: str) -> None:
    """Fail with a readable message when a checkpoint was trained with another shape."""
    saved = meta.get("model")
    if saved is None:
        return
    want = asdict(model_cfg)
    keys = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd")
    diff = {k: (saved.get(k), want.get(k)) for k in keys if saved.get(k) != want.get(k)}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
        raise CheckpointError(f"{where} was trained with a different model shape ({detail}); "
                              f"pass the same model preset, or start a new run_name")


class MetricsLog:
    """Append-only JSONL. On resume, rows after the restored step are dropped so that a
    resumed run's log is identical to an uninterrupted one's."""

    def __init__(self, path: str, resume_step: int | None = None):
        self.path = path
        self.write = jax.process_index() == 0  # multi-host: one writer
        rows = self.read(path) if os.path.exists(path) else []
        if resume_step is None:
            rows = []
        else:
            rows = [r for r in rows if r.get("step", 0) <= resume_step]
        if self.write:  # atomically: a kill here must not lose the rows kept
            write_jsonl(path, rows)
        self.rows = rows

    def log(self, row: dict) -> None:
        row = {k: (float(v) if hasattr(v, "dtype") else v) for k, v in row.items()}
        self.rows.append(row)
        if self.write:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    @staticmethod
    def read(path: str) -> list[dict]:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]


def restore_params(run_dir: str, stage: str, model, model_cfg, *, with_meta: bool = False):
    """Load the newest checkpoint of `stage` into `model` (parameters only), in place.
    Returns the model, or (model, the checkpoint's metadata) with `with_meta`."""
    from flax import nnx

    directory = os.path.join(run_dir, stage, "checkpoints")
    if not os.path.isdir(directory) or not os.listdir(directory):
        from minichat.chat import train_command  # an error path: the import costs nothing else
        raise CheckpointError(f"no {stage} checkpoint in {directory}; run "
                              f"`{train_command(run_dir, stage)}` first")
    ckpt = Checkpointer(directory, async_save=False)
    try:
        _, params, *_ = nnx.split(model, nnx.Param, ...)
        params, _, meta = ckpt.restore(None, params, model_cfg=model_cfg)
    finally:
        ckpt.close()
    nnx.update(model, params)
    return (model, meta) if with_meta else model
