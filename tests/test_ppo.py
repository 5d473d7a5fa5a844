"""Stage-level tests of PPO (minichat/ppo.py): real rollouts through the real jitted sampler,
experience pass and update, on a tiny model. The pure losses have their golden tests in
test_ppo_losses.py; here the point is that the pipeline around them keeps the conventions.
"""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minichat import ppo
from minichat.config import Config, ModelConfig, PPOConfig
from minichat.model import GPT, ScalarGPT
from minichat.reward import last_token_index
from minichat.sampling import Generation

from minichat.reward import score as rm_score

MC = ModelConfig(vocab_size=64, block_size=48, n_layer=2, n_head=2, n_embd=32)
END, PAD, X = 1, 0, 7  # end and pad ids of the fake vocabulary; X: the toy reward's token
P, N = 8, 8  # prompt width, new tokens
PCFG = PPOConfig(batch_size=16, minibatch_size=8, micro_batch_size=4, epochs=2, max_new_tokens=N,
                 temperature=0.7, kl_coef=0.05)


def prompts(seed=0, b=16):
    rng = np.random.default_rng(seed)
    q = rng.integers(2, 64, (b, P)).astype(np.int32)
    q[q == X] = 3  # the toy token never appears in a prompt
    lengths = rng.integers(3, P + 1, b)
    m = (np.arange(P)[None, :] >= (P - lengths)[:, None]).astype(np.int32)  # left padding
    return np.where(m > 0, q, PAD), m


def toy_reward(params, tokens, mask):
    """1 if the reply contains token X (prompts never do), else 0."""
    return jnp.any((tokens[:, P:] == X) & (mask[:, P:] > 0), axis=1).astype(jnp.float32)


def rm_reward(params, tokens, mask):
    graphdef, state, bias = params
    return rm_score(nnx.merge(graphdef, state), tokens, mask, bias)


def make_trainer(reward="rm", pcfg=PCFG, iterations=10, seed=0, splits=1):
    policy = GPT.init(MC, seed)
    if pcfg.value_model == "shared":
        value = ppo.value_head(MC.n_embd)
        # a random head, not the stage's zeros: its values and its gradient into the trunk
        # are then not trivially 0
        value.kernel.value = jax.random.normal(jax.random.key(seed + 1), value.kernel.value.shape) * 0.3
    else:
        value = ScalarGPT.from_gpt(policy, seed + 1)
    if reward == "rm":
        rm = ScalarGPT.from_gpt(policy, seed + 2)
        graphdef, state = nnx.split(rm)
        params, fn = (graphdef, state, jnp.float32(0.25)), rm_reward
        # the graphdef is static: close over it, keep arrays as the reward params
        params, fn = (state, jnp.float32(0.25)), (lambda p, t, m: rm_score(nnx.merge(graphdef, p[0]),
                                                                            t, m, p[1]))
    else:
        params, fn = (), toy_reward
    return ppo.PPOTrainer(policy, policy, value, params, fn, pcfg, end_id=END, pad_id=PAD,
                          total_iterations=iterations, splits=splits)


@pytest.fixture(scope="module")
def trainer():
    return make_trainer("rm")


def crafted_generation(lengths, ended, seed=0):
    """Replies with a known end: row b has lengths[b] real tokens, the last being END if ended[b]."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(2, 64, (len(lengths), N)).astype(np.int32)
    mask = (np.arange(N)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    for b, (n, e) in enumerate(zip(lengths, ended)):
        if e:
            toks[b, n - 1] = END
    toks = np.where(mask > 0, toks, PAD)
    return Generation(jnp.asarray(toks), jnp.zeros((len(lengths), N), jnp.float32), jnp.asarray(mask))


# ---------------------------------------------------------------- the first update


@pytest.mark.parametrize("splits", [1, 2])
def test_step0_ratio_is_one_and_approx_kl_zero_on_a_real_rollout(trainer, splits):
    """Also with each micro-batch computed as two concurrent sub-batches (the CPU default):
    the experience pass then runs the same sub-batch shapes, so the ratio is still 1 exactly."""
    trainer = trainer if splits == 1 else make_trainer("rm", splits=splits)
    assert trainer.hp.splits == splits
    q, m = prompts(0)
    _, rows, row, upd = trainer.step(q, m, jax.random.key(0))
    # the first minibatch of the first epoch sees the policy that produced the rollout
    assert float(upd["ratio_mean"][0, 0]) == 1.0
    assert float(upd["approx_kl"][0, 0]) == 0.0
    assert float(upd["approx_kl_k3"][0, 0]) == 0.0
    assert float(upd["clipfrac"][0, 0]) == 0.0
    assert float(upd["ratio_var"][0, 0]) == 0.0
    # the sampler's logprobs (KV cache) agree with the recomputed full forward at the same T
    assert row["debug/sampler_logprob_gap"] < 1e-4
    # policy == reference at the start: KL exactly 0
    assert row["objective/kl"] == 0.0 and np.all(rows["kl_tokens"] == 0)
    assert np.all(np.isfinite([v for v in row.values()]))


# ---------------------------------------------------------------- masking and the reward index


def test_masked_positions_are_zero_and_score_on_last_real_token(trainer):
    q, qm = prompts(1)
    lengths = [1, 3, 8, 8, 5, 2, 8, 6, 4, 7, 8, 1, 2, 3, 4, 5]
    ended = [True, True, True, False, True, False, True, True, True, True, False, True, True, True,
             True, True]
    gen = crafted_generation(lengths, ended)
    rollout, rows, stats = trainer.score(jnp.asarray(q), jnp.asarray(qm), gen)
    mask = np.asarray(gen.mask) > 0
    for name in ("logprobs", "values", "advantages", "returns"):
        a = np.asarray(getattr(rollout, name))
        assert np.all(a[~mask] == 0), name
        assert np.all(np.isfinite(a)), name
    for name in ("rewards", "kl_tokens"):
        assert np.all(np.asarray(rows[name])[~mask] == 0), name
    assert list(np.asarray(rows["ended"])) == ended
    # the score sits on the last real token only (<|end|> for rows that ended) ...
    kl_coef = trainer.kl_coef
    score_part = np.asarray(rows["rewards"]) + kl_coef * np.asarray(rows["kl_tokens"])
    scores = np.asarray(rows["scores"])
    for b, n in enumerate(lengths):
        expect = np.zeros(N, np.float32)
        expect[n - 1] = scores[b] if ended[b] else PCFG.no_end_penalty
        np.testing.assert_allclose(score_part[b], expect, atol=1e-6)
    # ... and is the reward model read at the end of the UNPADDED sequence
    state, bias = trainer.reward_params
    rm = nnx.merge(nnx.graphdef(ScalarGPT.init(MC, 0)), state)
    for b in (0, 2, 3, 5):
        seq = np.concatenate([q[b][qm[b] > 0], np.asarray(gen.tokens)[b][:lengths[b]]])[None]
        alone = float(rm(jnp.asarray(seq))[0, -1]) + float(bias)
        np.testing.assert_allclose(scores[b], alone, rtol=1e-4, atol=1e-5)
    assert np.all(last_token_index(gen.mask) == np.asarray(lengths) - 1)
    # the value of reply token t is V(the state before it): the value model at position
    # P_real - 1 + t of the unpadded sequence (N-details: values of the *state*, not the action)
    values = np.asarray(rollout.values)
    for b in (0, 2, 3, 9):
        prompt = q[b][qm[b] > 0]
        seq = np.concatenate([prompt, np.asarray(gen.tokens)[b][:lengths[b]]])[None]
        alone = values_of(trainer, jnp.asarray(seq))[0, len(prompt) - 1:-1]
        np.testing.assert_allclose(values[b, :lengths[b]], alone, rtol=1e-4, atol=1e-5)
        # and the logprob of reply token t: the policy's full forward over the unpadded
        # sequence at the same position, at the sampling temperature
        logits = np.asarray(_policy(trainer)(jnp.asarray(seq))[0])[0, len(prompt) - 1:-1] / PCFG.temperature
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        reply = seq[0, len(prompt):]
        np.testing.assert_allclose(np.asarray(rollout.logprobs)[b, :lengths[b]],
                                   logp[np.arange(len(reply)), reply], rtol=1e-4, atol=1e-5)


def _value_model(trainer):
    rest = () if trainer.value_rest is None else (trainer.value_rest,)
    return nnx.merge(trainer.value_graphdef, trainer.value, *rest)


def values_of(trainer, seq, mask=None):
    """The values of full sequences (B, T) at every position, from the value model
    (`separate`) or from the head on the policy's full-forward hidden states (`shared`)."""
    value = _value_model(trainer)
    if trainer.hp.value_model == "shared":
        hidden = _policy(trainer).hidden_states(seq, mask)
        return np.asarray(value(hidden)[..., 0])
    return np.asarray(value(seq, mask))


def _policy(trainer):
    return nnx.merge(trainer.graphdef, trainer.policy, *(() if trainer.rest is None else (trainer.rest,)))


@pytest.mark.parametrize("value_model", ["separate", "shared"])
def test_updates_fit_the_value_model_to_the_returns(value_model):
    """GAE's critic learns: a few updates on one rollout move the values toward its returns
    (the value loss falls), and the reward model it started from is left as it was."""
    # value clipping off and a larger step: with clip_value 0.2 a value moves at most 0.2
    # from the rollout's own per update, which is the point of it but slows this test
    pcfg = dataclasses.replace(PCFG, clip_value=1e3, optim=dataclasses.replace(PCFG.optim, lr=1e-3),
                               value_model=value_model)
    trainer = make_trainer("rm", pcfg=pcfg)
    q, qm = prompts(4)
    gen = crafted_generation([8, 3, 5, 8, 2, 6, 8, 4] * 2, [True, False] * 8, seed=4)
    rollout, _, _ = trainer.score(jnp.asarray(q), jnp.asarray(qm), gen)
    rm_before = jax.tree.map(np.asarray, trainer.reward_params)
    seq = jnp.concatenate([rollout.query, rollout.response], axis=1)
    full = jnp.concatenate([rollout.query_mask, rollout.mask], axis=1)
    m = np.asarray(rollout.mask) > 0

    def value_error():
        v = values_of(trainer, seq, full)[:, P - 1:-1]
        return float(np.mean((v - np.asarray(rollout.returns))[m] ** 2))

    before = value_error()
    for i in range(5):
        trainer.train(rollout, jax.random.key(i))
    assert value_error() < 0.5 * before, (before, value_error())
    for a, b in zip(jax.tree.leaves(rm_before), jax.tree.leaves(trainer.reward_params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_shared_value_head_reads_the_policys_trunk_and_its_loss_trains_it():
    """ppo.value_model=shared (PPO eq. 9's one network): the rollout's values are the head on
    the policy's own final hidden states, the first update still starts at ratio 1, and the
    value loss's gradient reaches the policy's parameters in proportion to vf_coef (with a
    separate value model it never does)."""
    pcfg = dataclasses.replace(PCFG, value_model="shared")
    tr = make_trainer("rm", pcfg=pcfg)
    q, qm = prompts(3)
    lengths = [8, 3, 5, 8, 2, 6, 8, 4] * 2
    gen = crafted_generation(lengths, [True, False] * 8, seed=3)
    rollout, _, _ = tr.score(jnp.asarray(q), jnp.asarray(qm), gen)
    values = np.asarray(rollout.values)
    assert np.abs(values).max() > 0.05  # a random head: values that a test can tell apart
    for b in (0, 1, 4, 9):
        prompt = q[b][qm[b] > 0]
        seq = np.concatenate([prompt, np.asarray(gen.tokens)[b][:lengths[b]]])[None]
        alone = values_of(tr, jnp.asarray(seq))[0, len(prompt) - 1:-1]
        np.testing.assert_allclose(values[b, :lengths[b]], alone, rtol=1e-4, atol=1e-5)

    def policy_after_one_update(trainer, vf_coef):
        hp = dataclasses.replace(trainer.hp, vf_coef=vf_coef, epochs=1)
        update = ppo.make_update_fn(trainer.graphdef, trainer.value_graphdef, trainer.policy_tx,
                                    trainer.value_tx, hp, trainer.rest, trainer.value_rest)
        copy = lambda t: jax.tree.map(jnp.copy, t)
        out = update(copy(trainer.policy), copy(trainer.value), copy(trainer.policy_opt),
                     copy(trainer.value_opt), rollout, jax.random.key(0), None)
        assert float(out[4]["ratio_mean"][0, 0]) == 1.0
        return [np.asarray(x) for x in jax.tree.leaves(out[0])]

    def gap(trainer):
        a, b = policy_after_one_update(trainer, 0.0), policy_after_one_update(trainer, 1.0)
        return max(float(np.abs(x - y).max()) for x, y in zip(a, b))

    assert gap(tr) > 1e-6
    separate = make_trainer("rm", pcfg=dataclasses.replace(PCFG, value_model="separate"))
    rollout, _, _ = separate.score(jnp.asarray(q), jnp.asarray(qm), gen)
    assert gap(separate) == 0.0


def test_update_ignores_garbage_at_masked_positions(trainer):
    q, qm = prompts(2)
    gen = crafted_generation([2, 8, 5, 1, 8, 3, 6, 4] * 2, [True, False] * 8, seed=2)
    rollout, _, _ = trainer.score(jnp.asarray(q), jnp.asarray(qm), gen)
    mask = rollout.mask > 0
    junk = lambda a: jnp.where(mask, a, 1e6)
    dirty = rollout._replace(logprobs=junk(rollout.logprobs), values=junk(rollout.values),
                             advantages=junk(rollout.advantages), returns=junk(rollout.returns))
    outs = []
    for ro in (rollout, dirty):
        copy = lambda t: jax.tree.map(jnp.copy, t)
        outs.append(trainer.update(copy(trainer.policy), copy(trainer.value), copy(trainer.policy_opt),
                                   copy(trainer.value_opt), ro, jax.random.key(3), None))
    for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(outs[0][4]))


def test_adaptive_kl_follows_ziegler():
    pcfg = PPOConfig(**{**PCFG.__dict__, "adaptive_kl": True, "kl_target": 0.5, "kl_horizon": 100})
    tr = make_trainer("toy", pcfg, seed=3)
    tr.policy = jax.tree.map(lambda p: p * 1.5, tr.policy)  # policy != reference: KL > 0
    q, qm = prompts(3)
    beta = tr.kl_coef
    _, _, row, _ = tr.step(q, qm, jax.random.key(1))
    e = np.clip(row["objective/kl"] / 0.5 - 1, -0.2, 0.2)
    np.testing.assert_allclose(tr.kl_coef, beta * (1 + e * 16 / 100), rtol=1e-6)
    assert tr.kl_coef != beta


def test_ptx_mixes_the_pretraining_loss_into_the_update():
    """PPO-ptx: with ptx_coef > 0 every micro-batch also pays ptx_coef * LM loss on pretraining
    tokens (epochs, minibatches, micro-batches, b, L + 1), and it is logged."""
    pcfg = PPOConfig(**{**PCFG.__dict__, "ptx_coef": 0.5})
    tr = make_trainer("toy", pcfg, seed=5)
    q, qm = prompts(5)
    n_mb, n_micro = 16 // 8, 8 // 4
    ptx = jax.random.randint(jax.random.key(0), (2, n_mb, n_micro, 2, 9), 2, 64)
    _, _, row, upd = tr.step(q, qm, jax.random.key(0), ptx)
    assert upd["ptx_loss"].shape == (2, n_mb)
    assert np.all(np.asarray(upd["ptx_loss"]) > np.log(64) - 1.0)  # ~ log V for a random model
    # the loss includes ptx_coef * ptx_loss on top of the PPO terms
    assert np.allclose(upd["loss"], upd["pg_loss"] + 0.1 * upd["vf_loss"] + 0.5 * upd["ptx_loss"], atol=1e-5)
    assert np.isfinite(row["ppo/ptx_loss"])


@pytest.mark.parametrize("micro, splits", [(2, 1), (8, 2), (2, 2)])
def test_micro_batches_give_the_token_mean_of_the_whole_minibatch(micro, splits):
    """micro_batch_size is a memory setting and `splits` a CPU-speed one: with replies of very
    different lengths, 4 micro-batches of 2, or one of 8 as two concurrent sub-batches of 4,
    give the same losses, gradients and PPO-ptx term as one of 8. (With micro 2 and splits 2
    the one PPO-ptx row per micro-batch does not split: each part takes it whole.)"""
    q, qm = prompts(6)
    gen = crafted_generation([1, 8, 2, 8, 1, 1, 8, 7] * 2, [True, False] * 8, seed=6)
    ptx = jax.random.randint(jax.random.key(1), (2, 2, 1, 4, 9), 2, 64)
    outs = []
    for mb, sp in ((8, 1), (micro, splits)):
        pcfg = PPOConfig(**{**PCFG.__dict__, "micro_batch_size": mb, "ptx_coef": 0.5})
        tr = make_trainer("rm", pcfg, seed=6, splits=sp)
        assert tr.hp.splits == sp
        rollout, _, _ = tr.score(jnp.asarray(q), jnp.asarray(qm), gen)
        *_, stats = tr.update(tr.policy, tr.value, tr.policy_opt, tr.value_opt, rollout,
                              jax.random.key(2), ptx.reshape(2, 2, 8 // mb, mb // 2, 9))
        outs.append(stats)
    for name in ("loss", "pg_loss", "vf_loss", "ptx_loss", "entropy", "approx_kl",
                 "policy_grad_norm", "value_grad_norm"):
        np.testing.assert_allclose(outs[1][name], outs[0][name], rtol=2e-4, atol=1e-6,
                                   err_msg=name)


def test_sub_batches_only_where_they_keep_whole_rows():
    """A micro-batch of 1 row cannot be split in two: the trainer falls back to one chain."""
    pcfg = PPOConfig(**{**PCFG.__dict__, "micro_batch_size": 1})
    assert make_trainer("toy", pcfg, splits=2).hp.splits == 1
    assert make_trainer("toy", splits=2).hp.splits == 2


def test_batch_sizes_are_checked():
    with pytest.raises(ValueError, match="minibatch_size"):
        ppo.check_batch_sizes(64, 24, 8)
    with pytest.raises(ValueError, match="micro_batch_size"):
        ppo.check_batch_sizes(64, 16, 3)
    with pytest.raises(ValueError, match="samples_per_prompt=3"):
        ppo.check_batch_sizes(64, 16, 8, samples_per_prompt=3)
    with pytest.raises(ValueError, match="needs ppo.samples_per_prompt >= 2"):
        ppo.check_batch_sizes(64, 16, 8, samples_per_prompt=1, advantage="rloo")
    with pytest.raises(ValueError, match="expected 'gae' or 'rloo'"):
        ppo.check_batch_sizes(64, 16, 8, advantage="grpo")


# ---------------------------------------------------------------- learning


def test_short_ppo_run_raises_a_toy_reward():
    """Reward 1 for a reply containing token X (about 1 reply in 8 at the start): twenty PPO
    iterations on the real sampler, experience pass and update make it the usual reply.
    Few replies end within 8 tokens, so the no-end cap is set to 1, where min(score, 1) leaves
    every 0/1 score as it is (a cap of 0 would pay only the ~1 in 60 replies that contain X
    and end, and whether PPO found them in 20 iterations was down to the seed)."""
    pcfg = PPOConfig(**{**PCFG.__dict__, "kl_coef": 0.01, "epochs": 4, "no_end_penalty": 1.0,
                        "temperature": 1.0,
                        "optim": PCFG.optim.__class__(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                                                      weight_decay=0.0)})
    tr = make_trainer("toy", pcfg, iterations=20, seed=4)
    q, qm = prompts(4)
    scores = []
    for it in range(20):
        _, _, row, _ = tr.step(q, qm, jax.random.key(100 + it))
        scores.append(row["objective/scores"])
    first, last = np.mean(scores[:3]), np.mean(scores[-3:])
    assert last > first + 0.5, np.round(scores, 2)


# ---------------------------------------------------------------- the stage: files and resume


MC_STAGE = ModelConfig(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=32)
PCFG_STAGE = PPOConfig(iterations=2, batch_size=8, minibatch_size=4, micro_batch_size=2, epochs=1,
                       max_new_tokens=8, n_prompts=64, best_of_n=[1, 2], best_of_n_prompts=8,
                       checkpoint_every=1, evaluate=True, prompt_width=48)


def stage_run_dir(run_dir):
    """A run directory holding an (untrained) SFT policy and reward model, and the tokenizer."""
    from dataclasses import asdict

    from minichat.checkpoint import Checkpointer
    from minichat.tokenizer import train_tokenizer
    from minichat.world import build_world, generate_dialogues

    texts = [m["content"] for d in generate_dialogues(build_world(0), 400, "train", seed=0)
             for m in d["messages"]]
    tok = train_tokenizer(texts, 512)
    sft = GPT.init(MC_STAGE, 0)
    rm = ScalarGPT.from_gpt(sft, 1)
    for stage, model, extra in (("sft", sft, {}), ("reward", rm, {"bias": 0.5})):
        ck = Checkpointer(os.path.join(run_dir, stage, "checkpoints"), async_save=False)
        ck.save(1, nnx.state(model, nnx.Param), meta={"step": 1, "model": asdict(MC_STAGE), **extra})
        ck.close()
    return tok, sft


def test_stage_writes_checkpoints_metrics_plots_and_resumes_as_if_never_stopped(tmp_path, capsys):
    from dataclasses import replace

    from minichat.checkpoint import MetricsLog, read_done, restore_params
    from minichat.config import WorldConfig
    from minichat.parallel import make_mesh
    from minichat.world import FAMILIES

    run_dir = str(tmp_path)
    tok, sft = stage_run_dir(run_dir)
    mc, pcfg = MC_STAGE, PCFG_STAGE
    cfg = Config(model=mc, world=WorldConfig(n_heldout=1), ppo=pcfg, progress=False)
    mesh = make_mesh(cfg.parallel, jax.devices()[:2])  # two of conftest's fake devices: a sharded batch
    summary = ppo.run(cfg, run_dir, tok, mesh)
    sdir = os.path.join(run_dir, "ppo")
    for f in ("ppo_curves.png", "overoptimization.png", "bon.json", "DONE.json", "metrics.jsonl"):
        assert os.path.exists(os.path.join(sdir, f)), f
    rows = MetricsLog.read(os.path.join(sdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("gold", "objective/scores", "objective/kl", "objective/entropy", "ppo/clipfrac",
                "ppo/approxkl", "ppo/value_loss", "val/explained_variance", "length", "ended",
                "time/generation", "time/scoring", "time/update"):
        assert key in rows[0], key
    assert rows[0]["ppo/ratio_first"] == pytest.approx(1.0, abs=1e-6)
    assert "report_md" in read_done(run_dir, "ppo") and summary["iterations"] == 2
    # evaluation against SFT: held out (greedy and sampled) and on prompts of the rollout pool
    n = len(FAMILIES)  # world.n_heldout = 1 prompt per family
    assert {m: summary["gold_vs_sft"][m]["n"] for m in ("greedy", "sampled")} == {"greedy": n, "sampled": n}
    seen = summary["gold_vs_sft_seen"]
    assert seen["n"] == n and seen["ci95"][0] <= seen["mean"] <= seen["ci95"][1]
    report = read_done(run_dir, "ppo")["report_md"]
    assert "held-out gold, PPO - SFT (greedy)" in report and "PPO's own rollout pool" in report
    assert [b["n"] for b in summary["best_of_n"]] == [1, 2]
    # the policy checkpoint loads for chat; the value model lives apart
    policy = restore_params(run_dir, "ppo", GPT.init(mc, 0), mc)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(nnx.state(policy, nnx.Param)),
                                                       jax.tree.leaves(nnx.state(sft, nnx.Param)))]
    assert any(changed)
    assert os.listdir(os.path.join(sdir, "value_checkpoints"))

    # resume: two more iterations continue from iteration 2, the first rows untouched
    os.remove(os.path.join(sdir, "DONE.json"))
    ppo.run(replace(cfg, ppo=replace(pcfg, iterations=4)), run_dir, tok, mesh)
    assert "resuming from iteration 2" in capsys.readouterr().out
    rows2 = MetricsLog.read(os.path.join(sdir, "metrics.jsonl"))
    assert [r["step"] for r in rows2] == [1, 2, 3, 4]
    assert rows2[:2] == rows[:2]
    # and the resumed run is the uninterrupted one: the same metrics, the same policy
    straight = tmp_path / "straight"
    for stage in ("sft", "reward"):
        shutil.copytree(os.path.join(run_dir, stage), straight / stage)
    ppo.run(replace(cfg, ppo=replace(pcfg, iterations=4)), str(straight), tok, mesh)
    clock = ("time/", "mfu", "tokens_per_s")  # everything else is exact
    untimed = lambda rows: [{k: v for k, v in r.items() if not k.startswith(clock)} for r in rows]
    assert untimed(MetricsLog.read(straight / "ppo" / "metrics.jsonl")) == untimed(rows2)
    resumed, uninterrupted = (jax.tree.leaves(nnx.state(restore_params(d, "ppo", GPT.init(mc, 0), mc), nnx.Param))
                              for d in (run_dir, str(straight)))
    assert all(np.array_equal(a, b) for a, b in zip(resumed, uninterrupted, strict=True))


@pytest.mark.parametrize("advantage, k", [("gae", 1), ("rloo", 4)])
def test_gold_reward_source_pays_the_gold_judge_score(tmp_path, advantage, k):
    """`ppo.reward_source=gold`: the score in the jitted experience pass (a host callback on a
    sharded batch) is the gold judge's verdict that the loop computes apart on the same
    rollouts; with `samples_per_prompt` the batch holds k replies to each prompt. The
    held-out evaluation, whose KL goes through the same pass, runs too."""
    from dataclasses import replace

    from minichat.checkpoint import MetricsLog
    from minichat.config import WorldConfig
    from minichat.parallel import make_mesh

    tok, _ = stage_run_dir(str(tmp_path))
    pcfg = replace(PCFG_STAGE, reward_source="gold", advantage=advantage, samples_per_prompt=k,
                   best_of_n=[])
    cfg = Config(model=MC_STAGE, world=WorldConfig(n_heldout=2), ppo=pcfg, progress=False)
    summary = ppo.run(cfg, str(tmp_path), tok, make_mesh(cfg.parallel, jax.devices()[:2]))
    assert np.isfinite(summary["kl_to_sft"])  # the held-out prompts go through it too
    assert "The reward was the gold judge itself" in summary["report_md"]
    rows = MetricsLog.read(os.path.join(tmp_path, "ppo", "metrics.jsonl"))
    assert len(rows) == 2
    for r in rows:
        assert r["objective/scores"] == pytest.approx(r["gold"], abs=1e-5)


def test_rloo_groups_replies_by_prompt_and_leaves_the_value_model_alone():
    """advantage=rloo on k replies per prompt: every reply's advantage is one number on all of
    its tokens, the k advantages of a prompt sum to 0 before whitening (so the whitened ones
    share a sum), and the update does not move the value model."""
    pcfg = PPOConfig(**{**PCFG.__dict__, "advantage": "rloo", "samples_per_prompt": 4})
    tr = make_trainer("rm", pcfg)
    q, qm = prompts(2, b=4)
    q, qm = np.repeat(q, 4, axis=0), np.repeat(qm, 4, axis=0)
    value_before = jax.tree.map(np.asarray, tr.value)
    rollout, rows, _, _ = tr.step(q, qm, jax.random.key(3))
    adv, m = np.asarray(rollout.advantages), np.asarray(rollout.mask) > 0
    per_reply = np.array([a[mm][0] if mm.any() else 0.0 for a, mm in zip(adv, m)])
    assert np.allclose(np.where(m, adv, per_reply[:, None]), per_reply[:, None])
    assert np.all(adv[~m] == 0)
    group_sums = per_reply.reshape(4, 4).sum(1)
    assert np.allclose(group_sums, group_sums[0], atol=1e-4)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(value_before),
                                                     jax.tree.leaves(jax.tree.map(np.asarray, tr.value))))


def test_a_micro_batch_that_does_not_split_over_the_mesh_is_a_config_error(tmp_path):
    from minichat.config import ParallelConfig
    from minichat.parallel import make_mesh

    mesh = make_mesh(ParallelConfig(data=-1), devices=jax.devices()[:4])
    cfg = Config(ppo=PPOConfig(batch_size=12, minibatch_size=6, micro_batch_size=6))
    with pytest.raises(ValueError, match=r"^ppo\.micro_batch_size=6 must be divisible by the 4 devices"):
        ppo.run(cfg, str(tmp_path), tok=None, mesh=mesh)


def test_best_of_n_keeps_the_reward_models_choice_in_each_group():
    rng = np.random.default_rng(0)
    K, n_max = 5, 8
    rm, gold = rng.normal(size=(K, n_max)), rng.normal(size=(K, n_max))
    table = ppo.best_of_n_table(rm, gold, [1, 2, 3, 4, 8])
    assert [row["n"] for row in table] == [1, 2, 4, 8]  # 3 does not divide 8: left out
    for row in table:
        n = row["n"]
        chosen_rm, chosen_gold = [], []
        for k in range(K):
            for start in range(0, n_max, n):
                j = start + int(np.argmax(rm[k, start:start + n]))
                chosen_rm.append(rm[k, j])
                chosen_gold.append(gold[k, j])
        assert row["rm"] == pytest.approx(np.mean(chosen_rm))
        assert row["gold"] == pytest.approx(np.mean(chosen_gold))
        assert row["kl"] == pytest.approx(np.log(n) - (n - 1) / n, abs=1e-6)
    assert table[0]["rm"] == pytest.approx(rm.mean()) and table[0]["kl"] == 0.0
    rms = [row["rm"] for row in table]
    assert rms == sorted(rms)  # nested groups: the best of more is never worse on the RM


def test_updates_leave_the_reference_policy_frozen():
    trainer = make_trainer("rm")
    ref_before = jax.tree.map(np.array, trainer.ref)
    policy_before = jax.tree.map(np.array, trainer.policy)
    q, qm = prompts(5)
    trainer.step(jnp.asarray(q), jnp.asarray(qm), jax.random.key(5))
    for a, b in zip(jax.tree.leaves(ref_before), jax.tree.leaves(trainer.ref)):
        np.testing.assert_array_equal(a, np.asarray(b))
    assert any(not np.array_equal(a, np.asarray(b))
               for a, b in zip(jax.tree.leaves(policy_before), jax.tree.leaves(trainer.policy)))


class _LengthTok:
    """render_prompt gives one id per word: prompt lengths chosen by the test."""

    def render_prompt(self, messages):
        return messages[0]["content"].split()


def test_prompt_width_holds_95_percent_in_a_multiple_of_16_and_drops_the_rest():
    lengths = list(range(1, 101))  # 95th percentile 95.05 -> width 96
    examples = [{"messages": [{"role": "user", "content": "w " * n}]} for n in lengths]
    width, keep = ppo.choose_prompt_width(_LengthTok(), examples, PPOConfig(prompt_width=0, max_new_tokens=8), 256)
    assert width == 96 and keep == [i for i, n in enumerate(lengths) if n <= 96]
    # capped by the context left after the reply; an explicit width wins over the percentile
    width, _ = ppo.choose_prompt_width(_LengthTok(), examples, PPOConfig(prompt_width=0, max_new_tokens=200), 256)
    assert width == 56
    width, keep = ppo.choose_prompt_width(_LengthTok(), examples, PPOConfig(prompt_width=20, max_new_tokens=8), 256)
    assert width == 20 and len(keep) == 20
    with pytest.raises(ValueError, match="leaves no room for prompts"):
        ppo.choose_prompt_width(_LengthTok(), examples, PPOConfig(max_new_tokens=255), 256)
