"""Pretraining: the loss, checkpoints, kill-and-resume, data parallelism, the CLI."""

import dataclasses
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, strategies as st

from minichat.checkpoint import Checkpointer, CheckpointError, MetricsLog, read_done, restore_params
from minichat.config import ModelConfig, OptimConfig, ParallelConfig
from minichat.model import GPT
from minichat.parallel import make_mesh, shard_batch, shard_state
from minichat.pretrain import (batch_loss, batch_weight, copy_accuracy, copy_batch, lm_loss, make_optimizer,
                               make_train_step, split_streams, split_value_and_grad, unigram_loss, with_copy_rows)

CFG = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)


@given(st.integers(0, 2**31 - 1))
def test_lm_loss_matches_numpy_reference(seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(2, 5))
    mask = rng.integers(0, 2, size=(2, 5))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
    want = (nll * mask).sum() / max(mask.sum(), 1)
    assert np.allclose(lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)), want, atol=1e-5)


def test_fully_masked_batch_gives_finite_zero_loss_and_grads():
    model = GPT.init(CFG, 0)
    tokens = jnp.ones((2, 9), jnp.int32)
    batch = {"tokens": tokens, "valid": jnp.ones_like(tokens), "loss_mask": jnp.zeros_like(tokens)}
    loss, grads = nnx.value_and_grad(batch_loss)(model, batch)
    assert float(loss) == 0.0
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@functools.cache
def _split_grad_fns(splits: int, dropout: bool):
    """The split gradient and its reference, jitted once per (splits, dropout) rather than
    once per hypothesis example (the eager reference alone took ~90 s of the suite)."""
    graphdef, params = nnx.split(GPT.init(dataclasses.replace(CFG, dropout=0.1 if dropout else 0.0), 0))

    def objective(p, b, k):
        return batch_loss(nnx.merge(graphdef, p), b, dropout_key=k)

    split = jax.jit(lambda p, b, k: split_value_and_grad(objective, p, b, k, splits, batch_weight))
    return params, split, jax.jit(jax.value_and_grad(objective))


@given(st.sampled_from([2, 3, 4]), st.integers(0, 2**31 - 1), st.booleans())
def test_split_gradient_equals_the_whole_batch_gradient(splits, seed, dropout):
    # SFT-like rows: padding, and loss masks that count different numbers of positions per
    # row (some none at all), so the parts' means must be weighted by their counts.
    rng = np.random.default_rng(seed)
    params, split, value_and_grad = _split_grad_fns(splits, dropout)
    tokens = rng.integers(0, CFG.vocab_size, (12, 10)).astype(np.int32)
    valid = (np.arange(10)[None] >= rng.integers(0, 4, (12, 1))).astype(np.int32)
    loss_mask = valid * (rng.random((12, 10)) < rng.random((12, 1)))
    batch = {"tokens": tokens, "valid": valid, "loss_mask": loss_mask.astype(np.int32)}
    key = jax.random.key(seed % 1000) if dropout else None

    loss, grads = split(params, batch, key)
    if dropout:  # part i draws its masks from fold_in(key, i): the reference does the same
        rows = [slice(i, None, splits) for i in range(splits)]
        outs = [value_and_grad(params, {k: v[r] for k, v in batch.items()}, jax.random.fold_in(key, i))
                for i, r in enumerate(rows)]
        n = np.array([loss_mask[:, 1:][r].sum() for r in rows], np.float64)
        w = n / max(n.sum(), 1.0)
        want = sum(wi * float(l) for wi, (l, _) in zip(w, outs))
        want_g = jax.tree.map(lambda *g: sum(wi * np.asarray(x) for wi, x in zip(w, g)), *[g for _, g in outs])
    else:
        want, want_g = value_and_grad(params, batch, None)
    assert float(loss) == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_split_train_step_matches_one_chain_and_keeps_a_masked_batch_finite():
    import optax  # plain SGD: Adam's normalisation would blow float rounding up on ~0 gradients

    tx = optax.sgd(0.1)
    results = {}
    for splits in (1, 2):
        graphdef, params = nnx.split(GPT.init(CFG, 0), nnx.Param)
        step = make_train_step(graphdef, tx, splits=splits)
        opt_state = tx.init(params)
        params, opt_state, m1 = step(params, opt_state, random_batch(1))
        zero = {**random_batch(2), "loss_mask": np.zeros((8, 17), np.int32)}
        params, opt_state, m2 = step(params, opt_state, zero)
        assert float(m2["loss"]) == 0.0 and np.isfinite(float(m2["grad_norm"]))
        results[splits] = (float(m1["loss"]), params)
    assert results[2][0] == pytest.approx(results[1][0], rel=1e-6)
    for a, b in zip(jax.tree.leaves(results[2][1]), jax.tree.leaves(results[1][1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_unigram_baseline_is_the_entropy_of_a_uniform_stream():
    stream = np.tile(np.arange(8), 1000)
    assert unigram_loss(stream, stream, 8) == pytest.approx(np.log(8), rel=1e-3)


def test_unigram_baseline_is_the_held_out_cross_entropy_of_smoothed_train_counts():
    # train: token 0 six times, token 1 twice, tokens 2 and 3 never; add-one counts 7, 3, 1, 1
    train, val = np.array([0, 0, 0, 0, 0, 0, 1, 1]), np.array([1, 2, 2, 0])
    expected = -(np.log(3 / 12) + 2 * np.log(1 / 12) + np.log(7 / 12)) / 4
    assert unigram_loss(train, val, 4) == pytest.approx(expected, rel=1e-12)
    assert unigram_loss(val, train, 4) != pytest.approx(expected)  # which stream is which matters


class CharTokenizer:
    bos_id = 0

    def encode_batch(self, docs):
        return [[ord(c) for c in d] for d in docs]


def test_held_out_documents_with_a_twin_in_training_are_left_out():
    docs = ["a note", "xy", "zz", "a note", "q"]  # the last two (40%) are held out
    train, val = split_streams(docs, CharTokenizer(), heldout_frac=0.4)
    assert train.tolist() == [0, *map(ord, "a note"), 0, *map(ord, "xy"), 0, *map(ord, "zz")]
    assert val.tolist() == [0, ord("q")]
    with pytest.warns(UserWarning, match="also occur in training"):  # nothing fresh: keep them
        _, val = split_streams(["xy", "xy"], CharTokenizer(), heldout_frac=0.5)
    assert val.tolist() == [0, *map(ord, "xy")]


def random_batch(seed, b=8, t=16):
    tokens = np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(b, t + 1)).astype(np.int32)
    ones = np.ones_like(tokens)
    return {"tokens": tokens, "valid": ones, "loss_mask": ones}


def test_copy_accuracy_tells_an_induction_model_from_a_unigram_one():
    V = 200

    def induction(tokens):  # predicts what followed the previous occurrence of the current token
        tokens = np.asarray(tokens)
        logits = np.zeros((*tokens.shape, V))
        for b, row in enumerate(tokens):
            for t, x in enumerate(row):
                prev = [s for s in range(t) if row[s] == x]
                logits[b, t, row[prev[-1] + 1] if prev else 0] = 1.0
        return logits

    unigram = lambda tokens: np.broadcast_to(np.eye(V)[7], (*np.shape(tokens), V))
    vocab = np.arange(10, 190)
    a = copy_accuracy(induction, vocab, rows=8, length=8, seed=1)
    b = copy_accuracy(unigram, vocab, rows=8, length=8, seed=1)
    assert a["repeat"] > 0.9 and a["first"] < 0.2
    assert b["repeat"] == b["first"] == 0.0  # token 7 is never drawn


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = GPT.init(CFG, 1)
    graphdef, params = nnx.split(model, nnx.Param)
    tx, _ = make_optimizer(OptimConfig(), 10)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx)
    params, opt_state, _ = step(params, opt_state, random_batch(0))
    ckpt = Checkpointer(str(tmp_path / "ck"), keep=2)
    ckpt.save(1, params, opt_state, {"step": 1})
    ckpt.close()
    fresh_params = nnx.split(GPT.init(CFG, 2), nnx.Param)[1]
    p2, o2, meta = Checkpointer(str(tmp_path / "ck")).restore(None, fresh_params, tx.init(fresh_params))
    assert meta == {"step": 1}
    for a, b in zip(jax.tree.leaves((params, opt_state)), jax.tree.leaves((p2, o2))):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def _damage(step_dir) -> None:
    for f in (step_dir / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":  # the array data files
            f.write_bytes(b"")


def test_a_damaged_or_empty_checkpoint_is_one_clear_error_naming_the_way_back(tmp_path):
    """A checkpoint cut off after Orbax finalised it (a full disk, an interrupted copy): the
    error names the step and the one to fall back to, not TensorStore's traceback."""
    params = nnx.split(GPT.init(CFG, 0), nnx.Param)[1]
    directory = tmp_path / "ck"
    ckpt = Checkpointer(str(directory), keep=3)
    for step in (2, 4):
        ckpt.save(step, params, meta={"step": step})
    ckpt.close()
    _damage(directory / "4")
    with pytest.raises(CheckpointError, match=rf"checkpoint {re.escape(str(directory))}/4 is incomplete "
                                              rf"or damaged \(.+\); delete .+/4 to resume from step 2"):
        Checkpointer(str(directory)).restore(None, params)
    assert Checkpointer(str(directory)).restore(2, params)[2] == {"step": 2}  # the one before is fine
    (directory / "6").mkdir()  # a numbered directory with nothing in it
    with pytest.raises(CheckpointError, match=r"/6 is incomplete or damaged .*resume from step 4"):
        Checkpointer(str(directory)).read_meta()


def test_resuming_sets_a_damaged_checkpoint_aside_and_takes_the_one_before(tmp_path):
    """PPO's policy and value checkpoints go back together: a step is only used when both
    read. The damaged files are moved, never deleted, and the step can be saved again."""
    from minichat.checkpoint import restore_newest_readable

    params = nnx.split(GPT.init(CFG, 0), nnx.Param)[1]
    policy, value = Checkpointer(str(tmp_path / "checkpoints"), keep=3), \
        Checkpointer(str(tmp_path / "value_checkpoints"), keep=3)
    for step in (2, 4):
        for c in (policy, value):
            c.save(step, params, meta={"step": step})
        policy.wait(), value.wait()
    _damage(tmp_path / "value_checkpoints" / "4")
    both = {"policy": policy, "value": value}
    restore = lambda step: (policy.restore(step, params)[2], value.restore(step, params)[2])
    with pytest.warns(UserWarning, match=r"value_checkpoints/4 is incomplete or damaged .*moved to .*"
                                         r"damaged_checkpoints/checkpoints_4, .*value_checkpoints_4"):
        assert restore_newest_readable(both, restore, "ppo") == ({"step": 2}, {"step": 2})
    assert policy.manager.all_steps() == value.manager.all_steps() == [2]
    assert sorted(p.name for p in (tmp_path / "damaged_checkpoints").iterdir()) == \
        ["checkpoints_4", "value_checkpoints_4"]
    policy.save(4, params, meta={"step": 4})  # the step number is free again
    policy.wait()
    assert policy.restore(4, params)[2] == {"step": 4}
    _damage(tmp_path / "checkpoints" / "2")
    _damage(tmp_path / "checkpoints" / "4")
    with pytest.warns(UserWarning, match="damaged"):  # nothing readable left: start over
        assert restore_newest_readable({"policy": policy}, lambda s: policy.restore(s, params), "x") is None
    assert len(list((tmp_path / "damaged_checkpoints").iterdir())) == 4
    policy.close(), value.close()


def test_a_half_written_save_is_ignored_and_the_next_save_of_its_step_succeeds(tmp_path):
    """What a kill (or a second Ctrl-C) in the middle of a save leaves: Orbax's temporary
    directory for the step. The resume must take the step before and save over it."""
    import shutil

    params = nnx.split(GPT.init(CFG, 0), nnx.Param)[1]
    directory = tmp_path / "ck"
    ckpt = Checkpointer(str(directory), keep=2)
    ckpt.save(2, params, meta={"step": 2})
    ckpt.close()
    half = directory / "4.orbax-checkpoint-tmp-1234"
    shutil.copytree(directory / "2", half)
    shutil.rmtree(half / "params")
    ckpt = Checkpointer(str(directory), keep=2)
    assert ckpt.latest_step() == 2 and ckpt.read_meta() == {"step": 2}
    ckpt.save(4, params, meta={"step": 4})
    ckpt.close()
    ckpt = Checkpointer(str(directory), keep=2)
    assert ckpt.latest_step() == 4 and ckpt.restore(None, params)[2] == {"step": 4}


def test_restoring_into_a_different_shape_is_a_clear_error(tmp_path):
    model = GPT.init(CFG, 0)
    params = nnx.split(model, nnx.Param)[1]
    ckpt = Checkpointer(str(tmp_path / "pretrain" / "checkpoints"), keep=1)
    ckpt.save(1, params, meta={"step": 1, "model": CFG.__dict__})
    ckpt.close()
    other = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=48)
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 32 vs config 48"):
        restore_params(str(tmp_path), "pretrain", GPT.init(other, 0), other)
    with pytest.raises(CheckpointError, match="stage=sft` first"):
        restore_params(str(tmp_path), "sft", GPT.init(CFG, 0), CFG)


def test_metrics_log_drops_rows_after_the_resumed_step(tmp_path):
    path = str(tmp_path / "m.jsonl")
    log = MetricsLog(path)
    for s in range(1, 6):
        log.log({"step": s, "loss": float(s)})
    assert [r["step"] for r in MetricsLog(path, resume_step=3).rows] == [1, 2, 3]
    assert MetricsLog.read(path) == [{"step": s, "loss": float(s)} for s in (1, 2, 3)]


@pytest.mark.parametrize("dropout", [0.0, 0.2])  # with dropout: the same masks however sharded
def test_data_parallel_step_on_4_devices_equals_one_device(dropout):
    assert jax.device_count() >= 4, "conftest sets 8 fake CPU devices"
    tx, _ = make_optimizer(OptimConfig(), 10)
    batch = random_batch(3)
    cfg = dataclasses.replace(CFG, dropout=dropout)
    key = jax.random.key(3) if dropout else None
    results = []
    for n, fsdp in ((1, 1), (4, 1), (4, 2)):
        mesh = make_mesh(ParallelConfig(data=-1, fsdp=fsdp), devices=jax.devices()[:n])
        graphdef, params = nnx.split(GPT.init(cfg, 0), nnx.Param)
        params = shard_state(params, mesh)
        opt_state = jax.jit(tx.init)(params)
        step = make_train_step(graphdef, tx)
        params, opt_state, metrics = step(params, opt_state, shard_batch(batch, mesh), key)
        if n == 4:
            tokens = shard_batch(batch, mesh)["tokens"]
            assert len({s.device for s in tokens.addressable_shards}) == 4  # really split
        results.append((float(metrics["loss"]), float(metrics["grad_norm"]), params))
    (l1, g1, p1), *others = results
    for loss, gnorm, p in others:
        assert loss == pytest.approx(l1, rel=1e-5) and gnorm == pytest.approx(g1, rel=1e-4)
        for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


# ---- the command line ---------------------------------------------------------------
def cli(args, cwd, env=None, check=True):
    env = {**os.environ, "XLA_FLAGS": "", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "minichat.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return proc


# The whole pipeline at toy sizes: every stage runs for real (~80 s on 2 cores, compiles included).
TOY_PIPELINE = [
    "run_dir=run", "progress=false", "compilation_cache=", "rounds=2",
    "model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=128",
    "model.vocab_size=512", "tokenizer.vocab_size=512",
    "world.n_docs=400", "world.n_dialogues=200", "world.n_heldout=1",
    "pretrain.steps=20", "pretrain.eval_every=10", "pretrain.checkpoint_every=10",
    "pretrain.batch_size=8", "pretrain.seq_len=64", "pretrain.eval_batches=2",
    "pretrain.copy.steps=4", "pretrain.copy.rows=2", "pretrain.copy.batch_size=4", "pretrain.copy.span_min=4",
    "pretrain.copy.span_max=16", "pretrain.copy.eval_every=2", "pretrain.copy.checkpoint_every=2",
    "pretrain.copy.eval_batches=1",
    "sft.steps=10", "sft.eval_every=5", "sft.checkpoint_every=5", "sft.batch_size=8", "sft.max_new_tokens=16",
    "reward.n_prompts=32", "reward.n_heldout=8", "reward.epochs=1", "reward.batch_size=8",
    "reward.eval_every=2", "reward.checkpoint_every=2", "reward.n_norm=16", "reward.sample_batch_size=32",
    "reward.max_new_tokens=16",
    "ppo.iterations=2", "ppo.batch_size=8", "ppo.minibatch_size=4", "ppo.micro_batch_size=4", "ppo.epochs=1",
    "ppo.max_new_tokens=8", "ppo.n_prompts=64", "ppo.best_of_n=[1,2]", "ppo.best_of_n_prompts=8",
    "ppo.checkpoint_every=1",
]


def test_the_main_command_runs_every_stage_and_two_rounds_then_resumes_with_nothing_to_do(tmp_path):
    from minichat.checkpoint import read_done

    cli(TOY_PIPELINE, tmp_path)
    run = str(tmp_path / "run")
    stages = ["tokenizer", "pretrain", "sft", "comparisons", "reward", "ppo",
              "comparisons_r2", "reward_r2", "ppo_r2", "report"]
    done = {s: read_done(run, s) for s in stages}
    # round 2 samples from round 1's policy, goes on from its reward model, and starts PPO
    # from its policy, always with SFT as the KL reference
    assert done["comparisons_r2"]["policy_stage"] == "ppo"
    assert done["reward_r2"]["init_stage"] == "reward"
    assert done["reward_r2"]["comparisons_stage"] == "comparisons_r2"
    # round 2's reward model went on from round 1's: its held-out prompts are new to both rounds
    from minichat.data import read_jsonl
    from minichat.reward import comparison_paths, prompt_key
    prompts = lambda stage, split: {prompt_key(row) for _, row in read_jsonl(
        comparison_paths(run, stage)[split == "heldout"])}
    assert not prompts("comparisons_r2", "heldout") & (prompts("comparisons", "train") | prompts("comparisons_r2", "train"))
    assert {k: done["ppo_r2"][k] for k in ("policy_stage", "reward_stage", "ref_stage")} == \
        {"policy_stage": "ppo", "reward_stage": "reward_r2", "ref_stage": "sft"}
    with open(os.path.join(run, "report.md")) as f:
        report = f.read()
    for heading in ("## Stages", "## Pretraining", "## Gold judge on held-out prompts, by dialogue family",
                    "## PPO (ppo)", "## PPO (ppo_r2)", "### Reward model (reward)",
                    "### Reward model (reward_r2)", "## PPO round 2 against SFT"):
        assert heading in report, heading
    assert "Pretraining began with 4 steps of an in-context copying task" in report
    for png in ("pretrain_loss", "pretrain_copy_loss", "sft_loss", "reward_curves", "reward_r2_reward_vs_gold",
                "ppo_ppo_curves", "ppo_r2_overoptimization"):
        assert os.path.getsize(os.path.join(run, "plots", f"{png}.png")) > 0, png

    again = cli(TOY_PIPELINE, tmp_path)  # re-running resumes: every finished stage is skipped
    for s in stages[:-1]:
        assert f"[{s}] already done" in again.stdout, s
    assert again.stdout.count("finished in") == 1  # the report alone, always rewritten

    # a redo (resume=false) that fails on its input keeps the finished stage it was to replace
    before = read_done(run, "sft")
    typo = cli(TOY_PIPELINE + ["stage=sft", "resume=false", "sft.files=[no_such.jsonl]"], tmp_path, check=False)
    assert typo.returncode == 2 and "no_such.jsonl: no such file" in typo.stderr
    assert read_done(run, "sft") == before and not os.path.exists(os.path.join(run, "sft.old"))


def test_set_aside_restores_the_old_stage_when_the_redo_fails_and_drops_it_when_it_succeeds(tmp_path):
    from minichat.train import set_aside

    stage = tmp_path / "sft"
    stage.mkdir()
    (stage / "DONE.json").write_text("old")
    with pytest.raises(KeyboardInterrupt), set_aside(str(stage), redo=True):
        assert not stage.exists()  # the redo starts from an empty directory
        stage.mkdir()
        (stage / "partial").write_text("new")
        raise KeyboardInterrupt
    assert sorted(os.listdir(tmp_path)) == ["sft"] and os.listdir(stage) == ["DONE.json"]
    with set_aside(str(stage), redo=True):
        stage.mkdir()
        (stage / "DONE.json").write_text("new")
    assert sorted(os.listdir(tmp_path)) == ["sft"] and (stage / "DONE.json").read_text() == "new"
    # a run killed mid-redo left both: the next redo keeps the old one aside, drops the partial
    os.rename(stage, str(stage) + ".old")
    stage.mkdir()
    (stage / "partial").write_text("x")
    with pytest.raises(ValueError), set_aside(str(stage), redo=True):
        assert not stage.exists()
        raise ValueError
    assert sorted(os.listdir(tmp_path)) == ["sft"] and (stage / "DONE.json").read_text() == "new"


@pytest.mark.parametrize("continue_rounds", [True, False])
def test_rounds_expand_the_pipeline_each_from_the_current_policy(continue_rounds):
    from minichat.config import Config
    from minichat.train import pipeline
    cfg = Config(rounds=3)
    cfg.reward.continue_rounds = continue_rounds
    stages = pipeline(cfg)
    assert [name for name, _ in stages] == [
        "tokenizer", "pretrain", "sft", "comparisons", "reward", "ppo", "comparisons_r2", "reward_r2",
        "ppo_r2", "comparisons_r3", "reward_r3", "ppo_r3", "report"]
    kw = {name: fn.keywords for name, fn in stages if hasattr(fn, "keywords")}
    assert [kw[s]["policy_stage"] for s in ("comparisons", "comparisons_r2", "comparisons_r3")] == ["sft", "ppo", "ppo_r2"]
    assert [kw[s]["policy_stage"] for s in ("ppo", "ppo_r2", "ppo_r3")] == ["sft", "ppo", "ppo_r2"]
    assert [kw[s]["reward_stage"] for s in ("ppo", "ppo_r2", "ppo_r3")] == ["reward", "reward_r2", "reward_r3"]
    inits = [kw[s]["init_stage"] for s in ("reward", "reward_r2", "reward_r3")]
    assert inits == (["sft", "reward", "reward_r2"] if continue_rounds else ["sft"] * 3)


@given(st.integers(0, 10**6), st.integers(2, 12), st.integers(0, 12), st.integers(0, 20))
def test_copy_batch_counts_exactly_the_recurrence_of_its_span_after_its_first_token(step, lo, extra, slack):
    hi = lo + extra
    width = 2 * hi + slack
    vocab = np.arange(100, 160)
    b = copy_batch(step, rows=6, width=width, vocab=vocab, span_min=lo, span_max=hi, seed=3)
    assert sorted(b) == ["loss_mask", "tokens"]  # unpadded rows: no "valid", plain causal attention
    assert all(b[k].shape == (6, width) for k in b)
    assert np.isin(b["tokens"], vocab).all()
    for tokens, mask in zip(b["tokens"], b["loss_mask"]):
        counted = np.flatnonzero(mask)
        span, start = len(counted) + 1, counted[0] - 1
        assert lo <= span <= hi and span <= start and start + span <= width
        assert np.array_equal(counted, np.arange(start + 1, start + span))  # one contiguous run
        # the recurrence repeats the row's first span tokens: copying is the only way to it
        assert np.array_equal(tokens[start:start + span], tokens[:span])
    again = copy_batch(step, rows=6, width=width, vocab=vocab, span_min=lo, span_max=hi, seed=3)
    assert all(np.array_equal(b[k], again[k]) for k in b)  # a pure function of the step: resumable


def test_copy_rows_replace_the_last_rows_of_each_batch():
    corpus = lambda step: {"tokens": np.full((4, 9), step, np.int32), "loss_mask": np.ones((4, 9), np.int32)}
    task = lambda step: copy_batch(step, rows=2, width=9, vocab=np.arange(50, 90), span_min=2, span_max=4)
    mixed = with_copy_rows(corpus, 2, task)(5)
    assert np.array_equal(mixed["tokens"][:2], corpus(5)["tokens"][:2])
    assert all(np.array_equal(mixed[k][2:], task(5)[k]) and mixed[k].dtype == np.int32 for k in mixed)


@pytest.mark.parametrize("override, message", [
    ("model.n_layer=abc", "model.n_layer=abc: Value 'abc' of type 'str' could not be converted to Integer"),
    ("model.nlayer=2", "Key 'nlayer' not in 'ModelConfig'"),
    ("stage=fly", "stage='fly' is not one of"),
    ("ppo.temperature=-1", "ppo.temperature=-1.0 must be > 0"),
    ("+model.n_layr=8", "model.n_layr: no such config key"),  # + adds a key: still a typo
    ("pretrain.keep=0", "pretrain.keep=0 must be >= 1"),  # Orbax would keep no checkpoint
])
def test_bad_config_fails_with_one_clear_line(tmp_path, override, message):
    proc = cli([override, "progress=false"], tmp_path, check=False)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_a_missing_earlier_stage_names_the_command_for_this_run(tmp_path):
    from minichat.checkpoint import CheckpointError, restore_params
    from minichat.tokenizer import ChatTokenizer

    run = tmp_path / "myrun"
    with pytest.raises(FileNotFoundError, match=rf"`python -m minichat.train run_dir={run} stage=tokenizer`"):
        ChatTokenizer.load(str(run / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=rf"`python -m minichat.train run_dir={run} stage=pretrain`"):
        restore_params(str(run), "pretrain", None, None)


def test_grad_clip_zero_turns_clipping_off():
    params, grads = {"w": jnp.ones((2, 2))}, {"w": jnp.full((2, 2), 100.0)}
    for clip in (0.0, 1.0):
        tx, _ = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.0, grad_clip=clip), 10)
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -1e-2, rtol=1e-3)  # Adam's first step: -lr * sign(g)


def test_optimizer_matches_a_numpy_adamw_with_clipping_decay_mask_and_schedule():
    """Three steps of `make_optimizer` against AdamW written out: global-norm clipping,
    bias-corrected moments, decoupled weight decay on matrices only (not biases or LayerNorm),
    and the linear-warmup + cosine schedule read at each update's count."""
    cfg = OptimConfig(lr=1e-2, warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1, grad_clip=1.0,
                      b1=0.9, b2=0.95, eps=1e-8)
    total = 10
    tx, schedule = make_optimizer(cfg, total)
    end = cfg.lr * cfg.min_lr_ratio
    lr_ref = lambda c: (cfg.lr * c / cfg.warmup_steps if c < cfg.warmup_steps else
                        end + (cfg.lr - end) * 0.5 * (1 + np.cos(np.pi * (c - cfg.warmup_steps) /
                                                               (total - cfg.warmup_steps))))
    for c in (0, 1, 2, 5, total):
        np.testing.assert_allclose(float(schedule(c)), lr_ref(c), rtol=1e-6, atol=1e-12)

    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
    grads = [{"w": rng.normal(size=(3, 2)) * 40, "b": rng.normal(size=(2,)) * 40} for _ in range(3)]
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    state = tx.init(p)
    ref = {k: v.copy() for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in params.items()}
    for t, g in enumerate(grads):
        updates, state = tx.update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state, p)
        p = jax.tree.map(lambda a, b: a + b, p, updates)
        norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
        for k in ref:
            gk = g[k] * min(1.0, cfg.grad_clip / norm)
            m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * gk
            v[k] = cfg.b2 * v[k] + (1 - cfg.b2) * gk ** 2
            step = (m[k] / (1 - cfg.b1 ** (t + 1))) / (np.sqrt(v[k] / (1 - cfg.b2 ** (t + 1))) + cfg.eps)
            decay = cfg.weight_decay * ref[k] if ref[k].ndim >= 2 else 0.0
            ref[k] = ref[k] - lr_ref(t) * (step + decay)
        for k in ref:
            np.testing.assert_allclose(np.asarray(p[k]), ref[k], rtol=1e-5, atol=1e-6)
    assert not np.allclose(ref["w"], params["w"])  # moved, although the first update's lr is 0


def test_each_training_step_draws_its_own_dropout_masks_from_seed_stage_and_step():
    from minichat.config import Config
    from minichat.pretrain import step_dropout_key

    cfg = Config()
    assert step_dropout_key(cfg, "pretrain", 3) is None  # dropout 0: no key, no masks
    cfg.model.dropout = 0.1
    keys = [step_dropout_key(cfg, stage, step) for stage in ("pretrain", "sft") for step in (0, 1)]
    data = {tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}
    assert len(data) == 4
    assert np.array_equal(jax.random.key_data(step_dropout_key(cfg, "sft", 1)), jax.random.key_data(keys[3]))
    # and the step uses the key: one step with and one without give different losses
    mcfg = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, dropout=0.5)
    graphdef, params = nnx.split(GPT.init(mcfg, 0), nnx.Param)
    tx, _ = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)
    step = make_train_step(graphdef, tx)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    batch = {"tokens": tokens, "valid": jnp.ones_like(tokens), "loss_mask": jnp.ones_like(tokens)}
    copy = lambda: jax.tree.map(jnp.copy, (params, tx.init(params)))  # the step donates its inputs
    losses = [float(step(*copy(), batch, key)[2]["loss"]) for key in (None, keys[0], keys[0], keys[1])]
    assert losses[1] == losses[2] and len({losses[0], losses[1], losses[3]}) == 3


def _set(cfg, key: str, value):
    import dataclasses

    *parents, leaf = key.split(".")
    node = cfg
    for part in parents:
        node = getattr(node, part)
    assert dataclasses.is_dataclass(node) and hasattr(node, leaf), key
    setattr(node, leaf, value)


def test_config_check_names_every_value_out_of_range():
    from minichat.config import _RULES, Config, check

    check(Config())  # the defaults pass
    for key, (ok, _) in _RULES.items():
        cfg = Config()
        _set(cfg, key, next(v for v in (0, -1, 1.5, 10, "nope") if not ok(v)))
        with pytest.raises(ValueError, match=f"^{re.escape(key)}="):
            check(cfg)


@pytest.mark.parametrize("values, message", [
    ({"pretrain.copy.steps": 10, "pretrain.copy.span_max": 65},  # a span and its copy need 130 > 129
     r"^pretrain\.copy\.span_max=65 must be in \[span_min=8, 64\]"),
    ({"pretrain.copy.rows": 16}, r"^pretrain\.copy\.rows=16 must be < pretrain\.batch_size=16"),
    ({"pretrain.copy.optim.lr": 0.0}, r"^pretrain\.copy\.optim\.lr=0\.0 must be > 0"),
    ({"reward.optim.min_lr_ratio": 2.0}, r"^reward\.optim\.min_lr_ratio=2\.0 must be in \[0, 1\]"),
    ({"model.n_head": 3}, r"^model\.n_embd=128 must be a multiple of model\.n_head=3"),
    ({"pretrain.seq_len": 512}, r"^pretrain\.seq_len=512 must be <= model\.block_size=256"),
    ({"ppo.batch_size": 60}, r"^ppo\.batch_size=60 must be a multiple of ppo\.minibatch_size=16"),
    ({"ppo.advantage": "rloo"}, r"needs ppo\.samples_per_prompt >= 2"),
    ({"reward.k": 7}, r"^reward\.k=7 \+ reward\.with_ideal=1 \+ reward\.n_flawed=2 = 10 replies per prompt"),
])
def test_config_check_names_values_out_of_range_of_one_another_and_optimizer_settings(values, message):
    from minichat.config import Config, check

    cfg = Config()
    for key, value in values.items():
        _set(cfg, key, value)
    with pytest.raises(ValueError, match=message):
        check(cfg)


PRESETS = sorted(f.stem for f in (Path(__file__).parents[1] / "minichat/configs/experiment").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_experiment_preset_composes_and_passes_the_range_checks(preset):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from minichat.config import check

    with initialize_config_module("minichat.configs", version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[f"+experiment={preset}"]))
    check(cfg)
    if preset == "induction":
        assert cfg.pretrain.copy.steps > 0 and cfg.pretrain.copy.rows > 0


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    words = ["lynx", "river", "Tamsk", "Dorania", "is", "the", "capital", "of", "grey", "a"]
    (d / "c.txt").write_text("\n\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(400)))
    from minichat.tokenizer import train_tokenizer
    train_tokenizer([(d / "c.txt").read_text()], 300).save(str(d / "tokenizer.json"))
    return d


TINY = ["stage=pretrain", "progress=false", "model.n_layer=1", "model.n_head=2", "model.n_embd=32",
        "model.block_size=32", "model.vocab_size=320", "pretrain.batch_size=8", "pretrain.steps=24",
        "pretrain.checkpoint_every=8", "pretrain.eval_every=8", "pretrain.eval_batches=2",
        "pretrain.samples=0", "pretrain.seq_len=0", "compilation_cache=", "parallel.data=1"]


def test_tokenizer_larger_than_the_model_vocab_is_a_clear_error(tiny_corpus, tmp_path):
    args = TINY + [f"pretrain.files=[{tiny_corpus}/c.txt]", f"tokenizer.path={tiny_corpus}/tokenizer.json",
                   "model.vocab_size=128"]
    proc = cli(args, tmp_path, check=False)
    assert proc.returncode == 2 and "raise model.vocab_size" in proc.stderr


def test_sigkill_and_resume_reproduces_the_uninterrupted_run(tiny_corpus, tmp_path):
    # with dropout: the masks after the resume must be those of the uninterrupted run
    common = TINY + [f"pretrain.files=[{tiny_corpus}/c.txt]", f"tokenizer.path={tiny_corpus}/tokenizer.json",
                     "model.dropout=0.1"]
    cli(common + ["run_dir=full"], tmp_path)
    killed = cli(common + ["run_dir=killed"], tmp_path, env={"MINICHAT_SIGKILL_AT_STEP": "13"}, check=False)
    assert killed.returncode == -9  # really killed, after the step-8 checkpoint, mid-interval
    assert not (tmp_path / "killed/pretrain/DONE.json").exists()
    resumed = cli(common + ["run_dir=killed"], tmp_path)
    assert "resuming from step 8" in resumed.stdout
    full = MetricsLog.read(str(tmp_path / "full/pretrain/metrics.jsonl"))
    again = MetricsLog.read(str(tmp_path / "killed/pretrain/metrics.jsonl"))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]
    assert strip(full) == strip(again) and len(full) == 24 + 1
    cfg = ModelConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
    a = nnx.state(restore_params(str(tmp_path / "full"), "pretrain", GPT.init(cfg, 5), cfg), nnx.Param)
    b = nnx.state(restore_params(str(tmp_path / "killed"), "pretrain", GPT.init(cfg, 6), cfg), nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # a checkpoint damaged after it was written (a cut-off copy): the resume sets it aside,
    # goes back to the one before and still ends exactly where the uninterrupted run did
    killed = cli(common + ["run_dir=damaged"], tmp_path, env={"MINICHAT_SIGKILL_AT_STEP": "21"}, check=False)
    assert killed.returncode == -9
    _damage(tmp_path / "damaged/pretrain/checkpoints/16")
    resumed = cli(common + ["run_dir=damaged"], tmp_path)
    assert "resuming from step 8" in resumed.stdout and "/16 is incomplete or damaged" in resumed.stderr
    assert strip(full) == strip(MetricsLog.read(str(tmp_path / "damaged/pretrain/metrics.jsonl")))
    c = nnx.state(restore_params(str(tmp_path / "damaged"), "pretrain", GPT.init(cfg, 7), cfg), nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    copy = read_done(str(tmp_path / "killed"), "pretrain")["copy_accuracy"]
    assert set(copy) == {"first", "repeat"} and all(0.0 <= v <= 1.0 for v in copy.values())
    # a finished stage is skipped when the command is run again ...
    assert "already done" in cli(common + ["run_dir=killed"], tmp_path).stdout
    # ... but not reused when a setting it depends on has changed since (a later stage's may)
    stale = cli(common + ["run_dir=killed", "pretrain.steps=30", "sft.steps=3"], tmp_path, check=False)
    assert stale.returncode == 2, stale.stderr
    assert "was done with other settings: pretrain.steps=24 (now 30). Run with resume=false" in stale.stderr
    assert "already done" in cli(common + ["run_dir=killed", "sft.steps=3"], tmp_path).stdout
    # how a later stage computes is its own choice: another dtype, attention or dropout rate
    how = ["model.dtype=bfloat16", "model.attention=xla", "model.remat=true", "model.dropout=0.0"]
    same = [a for a in common if not a.startswith("model.dropout=")]
    assert "already done" in cli(same + ["run_dir=killed"] + how, tmp_path).stdout


def test_a_finished_stage_trained_with_another_tokenizer_or_settings_is_not_reused(tiny_corpus, tmp_path):
    import shutil

    from minichat.tokenizer import train_tokenizer

    tokenizer = tmp_path / "tok.json"
    shutil.copy(tiny_corpus / "tokenizer.json", tokenizer)
    common = TINY + [f"pretrain.files=[{tiny_corpus}/c.txt]", f"tokenizer.path={tokenizer}",
                     "pretrain.steps=2", "run_dir=run"]
    cli(common, tmp_path)
    assert "already done" in cli(common, tmp_path).stdout
    # a stage run on its own checks the finished stages it builds on too
    proc = cli(common + ["stage=sft", "pretrain.optim.lr=0.01"], tmp_path, check=False)
    assert proc.returncode == 2 and "run/pretrain was done with other settings: pretrain.optim.lr" in proc.stderr
    train_tokenizer([(tiny_corpus / "c.txt").read_text()[::-1]], 300).save(str(tokenizer))  # swapped
    proc = cli(common, tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"run/pretrain was done with other settings: tokenizer {tokenizer} (sha256" in proc.stderr


def test_a_run_killed_in_its_copying_warm_up_resumes_to_the_uninterrupted_run(tiny_corpus, tmp_path):
    common = TINY + [f"pretrain.files=[{tiny_corpus}/c.txt]", f"tokenizer.path={tiny_corpus}/tokenizer.json",
                     "pretrain.steps=8", "pretrain.copy.steps=16", "pretrain.copy.rows=2",
                     "pretrain.copy.batch_size=4", "pretrain.copy.span_min=2", "pretrain.copy.span_max=8",
                     "pretrain.copy.checkpoint_every=8", "pretrain.copy.eval_every=8",
                     "pretrain.copy.eval_batches=1"]
    cli(common + ["run_dir=full"], tmp_path)
    killed = cli(common + ["run_dir=killed"], tmp_path, env={"MINICHAT_SIGKILL_AT_STEP": "13"}, check=False)
    assert killed.returncode == -9 and not (tmp_path / "killed/pretrain/metrics.jsonl").exists()
    assert "resuming from step 8" in cli(common + ["run_dir=killed"], tmp_path).stdout
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "mfu")} for r in rows]
    for part in ("pretrain/copy", "pretrain"):
        full = MetricsLog.read(str(tmp_path / "full" / part / "metrics.jsonl"))
        assert strip(full) == strip(MetricsLog.read(str(tmp_path / "killed" / part / "metrics.jsonl")))
    warm_up = MetricsLog.read(str(tmp_path / "full/pretrain/copy/metrics.jsonl"))
    assert [r["step"] for r in warm_up if "eval_loss" in r] == [0, 8, 16]
    assert (tmp_path / "full/pretrain/copy_loss.png").stat().st_size > 0
    warm = read_done(str(tmp_path / "killed"), "pretrain")["copy_warmup"]
    assert warm["steps"] == 16 and warm["eval_loss"] == warm_up[-1]["eval_loss"]
    cfg = ModelConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.1)
    a = nnx.state(restore_params(str(tmp_path / "full"), "pretrain", GPT.init(cfg, 5), cfg), nnx.Param)
    b = nnx.state(restore_params(str(tmp_path / "killed"), "pretrain", GPT.init(cfg, 6), cfg), nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(np.asarray(x), np.asarray(y))


# This test was marked xfail from session 9 to 13: in four fresh-clone CI runs of session 9
# the run was "still running 120 s after Ctrl-C", with a thread inside Orbax's save. Session
# 13 found the cause in how those CI runs were started: in the background by a
# non-interactive shell, which passes SIGINT on ignored, so the Ctrl-C never reached Python
# and training simply went on (saving every 2 steps). AS_IN_A_TERMINAL restores the handler;
# since then the test has passed in every run (3 fresh-clone CI runs of session 13, and 4 of
# 4 in session 14 beside a training job on both cores). A second Ctrl-C still ends a run
# whose save does hang (the test below).
# Ctrl-C as in a terminal, whatever the test runner's own disposition: a process started
# in the background by a non-interactive shell inherits SIGINT *ignored*, and Python then
# installs no KeyboardInterrupt handler at all (so the signal did nothing in such a CI run).
AS_IN_A_TERMINAL = "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
RUN_TRAIN = "import runpy, sys; sys.argv[0] = 'minichat.train'; runpy.run_module('minichat.train', run_name='__main__')\n"


def test_ctrl_c_commits_the_save_in_flight_and_says_how_to_resume(tiny_corpus, tmp_path):
    import signal
    import time

    from minichat.chat import checkpoint_steps

    common = TINY + [f"pretrain.files=[{tiny_corpus}/c.txt]", f"tokenizer.path={tiny_corpus}/tokenizer.json",
                     "pretrain.checkpoint_every=2", "run_dir=run"]
    proc = subprocess.Popen([sys.executable, "-c", AS_IN_A_TERMINAL + RUN_TRAIN, *common, "pretrain.steps=1000000"],
                            cwd=tmp_path, env={**os.environ, "XLA_FLAGS": "", "PYTHONFAULTHANDLER": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckpts = str(tmp_path / "run/pretrain/checkpoints")
    deadline = time.time() + 300
    while not checkpoint_steps(ckpts) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # mid-training, saves every 2 steps: likely one in flight
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # show where it hangs: faulthandler dumps every thread on SIGABRT
        proc.send_signal(signal.SIGABRT)
        pytest.fail(f"still running 120 s after Ctrl-C:\n{proc.communicate(timeout=60)[1][-6000:]}")
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("interrupted: run the same command")
    last = checkpoint_steps(ckpts)[-1]
    assert sorted(os.listdir(ckpts)) == sorted(map(str, checkpoint_steps(ckpts)))  # nothing half-written
    resumed = cli(common + [f"pretrain.steps={last + 2}"], tmp_path)
    assert f"resuming from step {last}" in resumed.stdout


# The fake training loop returns to Python every 50 ms, as a real one does after every
# step: the kernel may hand SIGINT to any of JAX's threads, and Python raises
# KeyboardInterrupt only when the main thread next runs bytecode. The stuck commit blocks
# in one endless lock wait, as a real hung save would: close_all(interruptible=True) must
# still hear the second Ctrl-C.
SAVE_THAT_NEVER_COMMITS = AS_IN_A_TERMINAL + """
import sys, threading, time
import minichat.checkpoint as checkpoint, minichat.train as train

class Stuck:  # an in-flight save whose commit hangs, and a save thread that never ends
    def close(self):
        threading.Thread(target=threading.Event().wait).start()
        threading.Event().wait()

stuck = Stuck()
checkpoint._OPEN.add(stuck)

def training(cfg):
    print("training", flush=True)
    while True:
        time.sleep(0.05)

train.run = training
sys.argv = ["minichat.train", "run_dir=r"]
train.main()
"""


def _sigint_to_a_thread_other_than_main(proc) -> None:
    """SIGINT to one of the process's other threads (Linux tgkill), where the kernel may
    deliver a terminal's Ctrl-C; elsewhere, to the process."""
    import ctypes
    import platform
    import signal

    tgkill = {"x86_64": 234, "aarch64": 131}.get(platform.machine())
    tasks = f"/proc/{proc.pid}/task"
    others = sorted(int(t) for t in os.listdir(tasks) if int(t) != proc.pid) if os.path.isdir(tasks) else []
    if tgkill is None or not others:
        proc.send_signal(signal.SIGINT)
        return
    assert ctypes.CDLL(None, use_errno=True).syscall(tgkill, proc.pid, others[0], signal.SIGINT) == 0


def test_a_second_ctrl_c_quits_even_when_the_save_in_flight_never_commits(tmp_path):
    import signal
    import threading
    import time

    proc = subprocess.Popen([sys.executable, "-c", SAVE_THAT_NEVER_COMMITS], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # a hung run ends the reads below with EOF; generous, since the start-up alone (JAX,
    # Hydra) took most of 90 s once under CI's load, and the kill then read as a failure
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    assert proc.stdout.readline().strip() == "training"
    proc.send_signal(signal.SIGINT)
    line = ""
    while "interrupted" not in line:
        line = proc.stderr.readline()
        assert line, f"the run ended without saying that it was interrupted (exit {proc.poll()})"
    assert "letting the checkpoint in flight commit (Ctrl-C again quits without it)" in line
    time.sleep(0.5)  # now inside close_all, waiting forever
    _sigint_to_a_thread_other_than_main(proc)  # the hard case, which used to hang
    _, err = proc.communicate()
    watchdog.cancel()
    assert proc.returncode == 130, f"a second Ctrl-C did not end the run (exit {proc.returncode}):\n{err[-3000:]}"
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("interrupted again: run the same command to resume r from")


def test_fit_resumes_on_a_multi_device_mesh_to_the_same_parameters(tmp_path):
    import shutil

    from minichat.config import Config, PretrainConfig
    from minichat.pretrain import fit

    cfg = Config(model=CFG, progress=False, pretrain=PretrainConfig(steps=6, checkpoint_every=3, batch_size=8))
    mesh = make_mesh(ParallelConfig(data=-1, fsdp=2), devices=jax.devices()[:4])
    kwargs = dict(stage="pretrain", cfg=cfg, scfg=cfg.pretrain, mesh=mesh, get_batch=random_batch,
                  eval_batches=[], tokens_per_step=8 * 16)
    full, _ = fit(GPT.init(CFG, 0), run_dir=str(tmp_path / "a"), **kwargs)
    fit(GPT.init(CFG, 0), run_dir=str(tmp_path / "b"), **kwargs)
    shutil.rmtree(tmp_path / "b/pretrain/checkpoints/6")  # as if killed after step 3's save
    resumed, rows = fit(GPT.init(CFG, 0), run_dir=str(tmp_path / "b"), **kwargs)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(jax.tree.leaves(nnx.state(full, nnx.Param)), jax.tree.leaves(nnx.state(resumed, nnx.Param))):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_on_localhost_train_like_one_process_with_the_same_devices(tiny_corpus, tmp_path):
    """Multi-host data parallelism (jax.distributed + gloo) on one machine: 2 processes x 2
    CPU devices must give the loss curve of 1 process x 4 devices."""
    common = TINY + [f"pretrain.files=[{tiny_corpus}/c.txt]", f"tokenizer.path={tiny_corpus}/tokenizer.json",
                     "pretrain.steps=8", "pretrain.checkpoint_every=4", "pretrain.eval_every=4",
                     "parallel.data=-1"]
    cli(common + ["run_dir=single"], tmp_path, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "minichat.train", *common, "run_dir=multi", "parallel.distributed=true",
         f"parallel.coordinator_address=127.0.0.1:{port}", "parallel.num_processes=2",
         f"parallel.process_id={i}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True) for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"{out[-2000:]}\n{err[-3000:]}"
    single = MetricsLog.read(str(tmp_path / "single/pretrain/metrics.jsonl"))
    multi = MetricsLog.read(str(tmp_path / "multi/pretrain/metrics.jsonl"))
    assert [r["step"] for r in multi] == [r["step"] for r in single]
    for a, b in zip(single, multi):
        for key in ("loss", "eval_loss", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5), (a, b)
    # the checkpoint written by 2 processes restores in a single process
    cfg = ModelConfig(vocab_size=320, block_size=32, n_layer=1, n_head=2, n_embd=32)
    restore_params(str(tmp_path / "multi"), "pretrain", GPT.init(cfg, 0), cfg)


@pytest.mark.parametrize("key", ["pretrain.batch_size", "pretrain.copy.batch_size"])
def test_a_batch_that_does_not_split_over_the_mesh_is_a_config_error(key, tmp_path):
    from minichat import pretrain
    from minichat.config import Config, CopyConfig, PretrainConfig

    sizes = {"pretrain.batch_size": 8, "pretrain.copy.batch_size": 8, key: 6}
    cfg = Config(model=CFG, pretrain=PretrainConfig(
        batch_size=sizes["pretrain.batch_size"], seq_len=16,
        copy=CopyConfig(steps=4, batch_size=sizes["pretrain.copy.batch_size"])))
    mesh = make_mesh(ParallelConfig(data=-1), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=rf"^{re.escape(key)}=6 must be divisible by the 4 devices"):
        pretrain.run(cfg, str(tmp_path), tok=None, mesh=mesh)


def test_comparisons_do_not_go_stale_when_only_the_reward_models_training_changes(tmp_path):
    from omegaconf import OmegaConf

    from minichat.config import Config
    from minichat.train import changed_settings

    for stage in ("comparisons", "reward"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(Config())))
    cfg = Config()
    cfg.reward.optim.lr, cfg.reward.epochs = 1e-3, 2
    assert changed_settings(cfg, str(tmp_path), "comparisons") == []  # the samples and labels stand
    assert changed_settings(cfg, str(tmp_path), "reward") == ["reward.epochs=1 (now 2)",
                                                              "reward.optim.lr=0.0003 (now 0.001)"]
    cfg.reward.k, cfg.reward.labeler.noise = 5, 2.0
    changed = changed_settings(cfg, str(tmp_path), "comparisons")
    assert [c.split("=")[0] for c in changed] == ["reward.k", "reward.labeler.noise"]


def test_new_demonstrations_leave_the_tokenizer_and_pretraining_standing(tmp_path):
    """The tokenizer is trained on the pretraining corpus alone (it belongs to the pretrained
    model), so new demonstrations make only SFT stale; a corpus of the user's own makes all."""
    from omegaconf import OmegaConf

    from minichat.config import Config
    from minichat.train import changed_settings

    for stage in ("tokenizer", "pretrain", "sft"):
        (tmp_path / stage).mkdir()
        (tmp_path / stage / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(Config())))
    cfg = Config()
    cfg.sft.files = ["mine.jsonl"]
    cfg.world.n_dialogues = 12000  # ChatWorld's own demonstrations, more of them
    assert changed_settings(cfg, str(tmp_path), "tokenizer") == []
    assert changed_settings(cfg, str(tmp_path), "pretrain") == []
    assert changed_settings(cfg, str(tmp_path), "sft") == ["sft.files=[] (now ['mine.jsonl'])",
                                                           "world.n_dialogues=6000 (now 12000)"]
    cfg = Config()
    cfg.pretrain.files = ["corpus.txt"]
    assert all(changed_settings(cfg, str(tmp_path), s) for s in ("tokenizer", "pretrain", "sft"))


def test_a_run_dir_that_is_a_file_or_a_cut_off_stage_record_is_one_clear_error(tmp_path):
    from minichat.checkpoint import read_done
    from minichat.config import Config
    from minichat import train

    afile = tmp_path / "notadir"
    afile.write_text("")
    cfg = Config(run_dir=str(afile))
    with pytest.raises(ValueError, match=r"run_dir=.*notadir is a file, not a directory"):
        train.run(cfg)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "DONE.json").write_text('{"eval_loss": 0.2,\n')  # cut off
    with pytest.raises(CheckpointError, match=r"sft/DONE\.json: not valid JSON .*delete it to redo"):
        read_done(str(tmp_path), "sft")
    (tmp_path / "sft" / "config.yaml").write_text("model: {n_layer: [\n")
    with pytest.raises(ValueError, match=r"sft/config\.yaml: unreadable .*resume=false"):
        train.changed_settings(Config(), str(tmp_path), "sft")
