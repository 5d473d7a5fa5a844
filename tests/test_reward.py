"""Stage 2 (reward model) at the stage level: where the reward is read, padding, the
normalisation bias on a real model, comparison files, and tiny end-to-end stage runs.
The pure losses have their golden tests in test_reward_losses.py."""

import json
import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from minichat.checkpoint import Checkpointer, read_done
from minichat.config import Config, ModelConfig, ParallelConfig
from minichat.data import DataError, load_comparisons, write_jsonl
from minichat.model import GPT, ScalarGPT
from minichat.parallel import make_mesh
from minichat.reward import (
    Scorer,
    batch_loss,
    batch_rewards,
    comparison_data,
    comparison_prompts,
    encode_comparisons,
    epoch_batches,
    label,
    load_reward_model,
    normalisation_bias,
    pack,
    prompt_key,
    rm_loss,
    run,
    run_comparisons,
    score,
    spearman,
)
from minichat.tokenizer import train_tokenizer
from minichat.world import FAMILIES, build_world, generate_dialogues, to_prompt

WORLD = build_world(0)
PROMPTS = [to_prompt(d) for d in generate_dialogues(WORLD, 44, "train", seed=3)]


@pytest.fixture(scope="module")
def tok():
    texts = [m["content"] for d in generate_dialogues(WORLD, 300, "train", seed=0) for m in d["messages"]]
    return train_tokenizer(texts + ["good bad fine"], 512)


def model_cfg(tok):
    return ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def rm(tok):
    return ScalarGPT.init(model_cfg(tok), 3)


def one_device_mesh():
    return make_mesh(ParallelConfig(), devices=jax.devices()[:1])


# ---- where the reward is read ----------------------------------------------------------------
def test_reward_is_read_at_the_end_token(tok, rm):
    ids = tok.render_prompt(PROMPTS[0]["messages"]) + tok.render_reply("The capital is Tamsk.")
    n, T = len(ids), len(ids) + 7
    tokens = np.full((1, T), tok.pad_id, np.int32)
    tokens[0, :n] = ids
    mask = (np.arange(T) < n).astype(np.int32)[None]
    values = rm(jnp.asarray(tokens), jnp.asarray(mask))
    assert ids[-1] == tok.end_id
    r = score(rm, tokens, mask)
    # the <|end|> position (computed there alone, `at`: equal up to rounding), not T - 1
    assert abs(float(r[0]) - float(values[0, n - 1])) < 1e-6
    for other in (T - 1, n - 2):  # the last column, the token before the end: other numbers
        assert abs(float(values[0, other]) - float(r[0])) > 1e-4
    # whatever sits in the padding does not matter
    noisy = tokens.copy()
    noisy[0, n:] = np.arange(7) + 11
    np.testing.assert_allclose(score(rm, noisy, mask), r, rtol=0, atol=1e-6)
    # the bias is added as is
    np.testing.assert_allclose(score(rm, tokens, mask, 0.75), r + 0.75, atol=1e-6)


def test_left_right_and_split_padding_give_the_same_reward(tok, rm):
    """Prompt left-padded + reply right-padded (PPO's layout), all left, all right, none."""
    prompt = tok.render_prompt(PROMPTS[1]["messages"])
    reply = tok.render_reply("I checked again, and it is blue.")
    P, N = len(prompt) + 5, len(reply) + 4
    seq = prompt + reply

    def layout(rows):
        T = max(len(r) for r in rows)
        return (np.array([[t if t is not None else tok.pad_id for t in r] for r in rows], np.int32),
                np.array([[int(t is not None) for t in r] for r in rows], np.int32), T)

    pad = [None]
    rows = [pad * (P - len(prompt)) + prompt + reply + pad * (N - len(reply)),  # split
            pad * (P + N - len(seq)) + seq,  # left
            seq + pad * (P + N - len(seq))]  # right
    tokens, mask, _ = layout(rows)
    r = np.asarray(score(rm, tokens, mask))
    unpadded = float(score(rm, np.array([seq], np.int32), np.ones((1, len(seq)), np.int32))[0])
    np.testing.assert_allclose(r, unpadded, rtol=1e-5, atol=1e-5)


def test_score_is_jittable_with_split_and_merge(tok, rm):
    graphdef, state = nnx.split(rm)
    fn = jax.jit(lambda s, t, m, b: score(nnx.merge(graphdef, s), t, m, b))
    tokens = jnp.asarray([tok.render_prompt(PROMPTS[2]["messages"]) + tok.render_reply("Hi.")])
    mask = jnp.ones_like(tokens)
    np.testing.assert_allclose(fn(state, tokens, mask, 0.5), score(rm, tokens, mask, 0.5), atol=1e-6)


# ---- batches and the K-way loss on a model -----------------------------------------------------
def kway_rows(k_per_row):
    rng = np.random.default_rng(0)
    rows = []
    for i, k in enumerate(k_per_row):
        p = PROMPTS[i]
        comps = [f"{p['ideal']} {'again ' * j}".strip() for j in range(k)]
        rows.append({"messages": p["messages"], "completions": comps,
                     "ranking": [int(x) for x in rng.permutation(k)], "family": p["family"]})
    return rows


def test_encode_comparisons_variable_k_right_padded(tok):
    rows = kway_rows([2, 4, 3])
    d = encode_comparisons(tok, rows, 160)
    assert d["tokens"].shape == (3, 4, 160) and d["mask"].shape == (3, 4, 160)
    np.testing.assert_array_equal(d["valid"], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    for n, row in enumerate(rows):
        assert sorted(d["ranking"][n]) == list(range(4))
        assert list(d["ranking"][n][:len(row["ranking"])]) == row["ranking"]
        for k in range(len(row["completions"])):
            m = d["mask"][n, k]
            last = int(m.sum()) - 1
            assert m[:last + 1].all() and not m[last + 1:].any()  # right padded
            assert d["tokens"][n, k, last] == tok.end_id
    # too long: the prompt is cut from the left, the reply and its end token stay
    with pytest.warns(UserWarning, match="cut from the left"):
        short = encode_comparisons(tok, rows[:1], 12)
    assert short["tokens"][0, 0, -1] == tok.end_id and short["mask"][0, 0].all()


def test_unended_reply_has_no_end_token(tok):
    row = dict(kway_rows([2])[0], ended=[True, False])
    d = encode_comparisons(tok, [row], 160)
    last = d["mask"][0].sum(-1) - 1
    assert d["tokens"][0, 0, last[0]] == tok.end_id and d["tokens"][0, 1, last[1]] != tok.end_id


def test_batch_loss_is_rm_loss_of_each_sequence_scored_alone(tok, rm):
    rows = kway_rows([3, 2])
    d = encode_comparisons(tok, rows, 160)
    loss, metrics = batch_loss(rm, {k: jnp.asarray(v) for k, v in d.items()})
    alone = np.zeros((2, 3), np.float32)
    for n in range(2):
        for k in range(len(rows[n]["completions"])):
            L = int(d["mask"][n, k].sum())
            alone[n, k] = float(score(rm, d["tokens"][n, k][None, :L], d["mask"][n, k][None, :L])[0])
    np.testing.assert_allclose(batch_rewards(rm, d), np.where(d["valid"], alone, batch_rewards(rm, d)),
                               atol=1e-5)
    want, want_m = rm_loss(alone, d["ranking"], d["valid"])
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    assert int(metrics["num_pairs"]) == 3 + 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 24), min_size=1, max_size=30), st.integers(1, 4))
def test_pack_places_every_sequence_whole_and_once(lengths, row_multiple):
    T = 24
    mask = (np.arange(T) < np.array(lengths)[:, None]).astype(np.int32)
    tokens = np.where(mask, np.arange(1, len(lengths) + 1)[:, None] * 100 + np.arange(T), 0)
    p = pack(tokens.reshape(len(lengths), 1, T), mask.reshape(len(lengths), 1, T), row_multiple)
    R = len(p["tokens"])
    assert p["tokens"].shape == p["mask"].shape == p["segments"].shape == (R, T)
    assert R % row_multiple == 0 and p["ends"].shape == (len(lengths), 1)
    assert p["mask"].sum() == sum(lengths)  # every real token placed, none twice
    flat = p["tokens"].reshape(-1)
    for i, n in enumerate(lengths):
        if n:  # the whole sequence, in order, in one row, ending at `ends`
            e = int(p["ends"][i, 0])
            assert e // T == (e - n + 1) // T
            np.testing.assert_array_equal(flat[e - n + 1:e + 1], tokens[i, :n])
            assert (p["segments"].reshape(-1)[e - n + 1:e + 1] == i + 1).all()
    _check_read_positions(p, T)
    # first fit decreasing never needs more rows than twice the tokens' share, plus one
    assert R <= row_multiple * -(-max(1, 2 * -(-sum(lengths) // T) + 1) // row_multiple)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 12), st.lists(st.integers(0, 12), min_size=1, max_size=4)),
                min_size=1, max_size=5), st.integers(1, 3), st.integers(0, 99))
def test_pack_with_shared_prefixes_rebuilds_every_sequence(groups, row_multiple, seed):
    """Each group's sequences share a prompt (some with a longer common start, some empty,
    some longer than a row's free space so the group splits): following `branches` back
    from `ends` rebuilds every sequence exactly, from its prefix (branch 0) and its own
    branch, in one segment."""
    T, K = 24, max(len(replies) for _, replies in groups)
    rng = np.random.default_rng(seed)
    tokens = np.zeros((len(groups), K, T), np.int64)
    mask = np.zeros((len(groups), K, T), np.int32)
    for g, (P, replies) in enumerate(groups):
        prompt = rng.integers(1, 5, P)  # a small alphabet: replies often share first tokens
        for k, n in enumerate(replies):
            seq = np.concatenate([prompt, rng.integers(1, 5, n)])[:T]
            tokens[g, k, :len(seq)], mask[g, k, :len(seq)] = seq, 1
    p = pack(tokens, mask, row_multiple, share_prefix=True)
    assert len(p["tokens"]) % row_multiple == 0 and p["mask"].sum() <= mask.sum()
    _check_read_positions(p, T)
    for g in range(len(groups)):
        for k in range(K):
            n = mask[g, k].sum()
            if not n:
                continue
            e = int(p["ends"][g, k])
            r, c = divmod(e, T)
            seg, br = p["segments"][r], p["branches"][r]
            assert br[c] > 0  # every sequence keeps its last token in its own branch
            own = (seg == seg[c]) & ((br == 0) | (br == br[c])) & (np.arange(T) <= c)
            np.testing.assert_array_equal(p["tokens"][r][own], tokens[g, k, :n])


def _check_read_positions(p, T):
    """`at`/`at_index` point at exactly the `ends`, each distinct end read once."""
    R, E = p["at"].shape
    assert R == len(p["tokens"]) and E % 8 == 0 and p["at_index"].shape == p["ends"].shape
    rows, slots = np.divmod(p["at_index"], E)
    np.testing.assert_array_equal(rows * T + p["at"][rows, slots], p["ends"])
    assert len(np.unique(p["at_index"])) == len(np.unique(p["ends"]))


def test_pack_rejects_left_padding():
    with pytest.raises(ValueError, match="right-padded"):
        pack(np.ones((1, 4), np.int32), np.array([[0, 1, 1, 1]]))


@pytest.mark.parametrize("share_prefix", [False, True])
def test_packed_batch_gives_the_padded_rewards_loss_and_gradient(tok, rm, share_prefix):
    rows = kway_rows([3, 2, 4])
    d = encode_comparisons(tok, rows, 192)
    packed = {**{k: d[k] for k in ("ranking", "valid")},
              **pack(d["tokens"], d["mask"], share_prefix=share_prefix)}
    assert len(packed["tokens"]) < d["valid"].sum()  # the point of packing: fewer rows
    if share_prefix:  # each prompt once: fewer tokens than the sequences hold
        assert packed["mask"].sum() < d["mask"].sum() - 2 * len(rows)
    padded_r, packed_r = batch_rewards(rm, d), batch_rewards(rm, packed)
    np.testing.assert_allclose(np.where(d["valid"], packed_r, 0), np.where(d["valid"], padded_r, 0), atol=1e-5)
    # the head read at `at` only equals the full forward's head read at the ends
    full = rm(packed["tokens"], packed["mask"], segments=packed["segments"],
              branches=packed.get("branches"))
    np.testing.assert_allclose(packed_r, np.asarray(full).reshape(-1)[packed["ends"]], atol=1e-5)
    graphdef, params = nnx.split(rm)

    def loss(p, batch):
        return batch_loss(nnx.merge(graphdef, p), {k: jnp.asarray(v) for k, v in batch.items()})[0]

    (l1, g1), (l2, g2) = jax.value_and_grad(loss)(params, d), jax.value_and_grad(loss)(params, packed)
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-3)


def test_repeated_replies_are_laid_out_once_and_tie_exactly(tok, rm):
    """A policy often samples the same reply twice: with shared prefixes, the copy is not
    laid out again and gets the bit-identical reward (so it ties, as in the padded batch)."""
    row = kway_rows([3])[0]
    row["completions"] = [row["completions"][0], row["completions"][1], row["completions"][0]]
    d = encode_comparisons(tok, [row], 160)
    p = pack(d["tokens"], d["mask"], share_prefix=True)
    n = d["mask"].sum(-1)[0]
    prompt = len(tok.render_prompt(row["messages"]))
    assert p["mask"].sum() <= n[0] + n[1] - prompt and p["ends"][0, 0] == p["ends"][0, 2]
    r = np.asarray(batch_rewards(rm, {**p, "ranking": d["ranking"], "valid": d["valid"]}))
    assert r[0, 0] == r[0, 2] and r[0, 0] != r[0, 1]


@settings(max_examples=25)
@given(st.integers(1, 200), st.integers(1, 17), st.integers(1, 3), st.integers(0, 99))
def test_epoch_batches_are_full_and_cover_every_prompt_each_epoch(n, batch_size, epochs, seed):
    batches = epoch_batches(n, batch_size, epochs, seed)
    per_epoch = -(-n // batch_size)
    assert len(batches) == epochs * per_epoch and all(len(b) == batch_size for b in batches)
    for e in range(epochs):
        seen = np.concatenate(batches[e * per_epoch:(e + 1) * per_epoch])
        assert set(seen.tolist()) == set(range(n))  # every prompt, topped up with repeats
        assert len(seen) - n < batch_size


# ---- normalisation on a real model --------------------------------------------------------------
def test_normalisation_bias_makes_demonstrations_average_zero(tok, rm):
    demos = [{"messages": p["messages"], "completions": [p["ideal"]], "ranking": [0]} for p in PROMPTS[:20]]
    d = encode_comparisons(tok, demos, 160)
    graphdef, params, rest = nnx.split(rm, nnx.Param, ...)
    scorer = Scorer(graphdef, None, 8, one_device_mesh())  # 20 rows: 3 calls, the last padded
    raw = scorer(params, d["tokens"], d["mask"])[:, 0]
    assert raw.shape == (20,) and np.std(raw) > 0
    bias = float(normalisation_bias(raw))
    assert abs(bias) > 1e-3
    normalised = score(rm, d["tokens"][:, 0], d["mask"][:, 0], bias)
    assert float(jnp.mean(normalised)) == pytest.approx(0.0, abs=1e-5)


# ---- comparison files ----------------------------------------------------------------------------
def test_comparison_files_round_trip(tmp_path):
    rows = label(PROMPTS[:6], [[{"text": f"{p['ideal']}", "ended": True}, {"text": "No idea.", "ended": True},
                                {"text": "Something", "ended": False}] for p in PROMPTS[:6]],
                 noise=0.0, length_bias=0.0, seed=0)
    for r in rows:  # a perfect labeler sorts by gold score
        assert [r["gold"][i] for i in r["ranking"]] == sorted(r["gold"], reverse=True)
    path = tmp_path / "kway.jsonl"
    write_jsonl(str(path), rows)
    back = load_comparisons([str(path)])
    for a, b in zip(rows, back):
        for key in ("messages", "completions", "ranking", "gold", "ended", "family", "meta"):
            assert a[key] == b[key]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away.", "family": "x"}) + "\n"
                     + json.dumps({"messages": PROMPTS[0]["messages"], "chosen": "a", "rejected": "b"}) + "\n")
    p = load_comparisons([str(pairs)])
    assert p[0]["completions"] == ["Hello.", "Go away."] and p[0]["ranking"] == [0, 1]
    assert p[0]["messages"] == [{"role": "user", "content": "Hi?"}] and p[0]["family"] == "x"


GOOD = {"messages": [{"role": "user", "content": "Hi?"}], "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}


@pytest.mark.parametrize("line, reason", [
    ("{not json", "invalid JSON"),
    (json.dumps(dict(GOOD, ranking=[0, 0, 1])), "'ranking' must be a permutation"),
    (json.dumps(dict(GOOD, completions=["a"], ranking=[0])), "'completions' must be a list of >= 2"),
    (json.dumps(dict(GOOD, gold=[1.0, 0.5])), "'gold' must be a list of 3 finite numbers"),
    (json.dumps(dict(GOOD, ended=[True, 1, False])), "'ended' must be a list of 3 booleans"),
    (json.dumps(dict(GOOD, messages=[{"role": "assistant", "content": "x"}])), "must be a user turn"),
    (json.dumps({"prompt": "Hi?", "chosen": "a"}), "'rejected' must be a string"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_comparison_line_names_file_line_and_reason(tmp_path, line, reason):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + line + "\n")
    with pytest.raises(DataError, match=reason) as e:
        load_comparisons([str(path)])
    assert f"{path}:3:" in str(e.value)


# ---- evaluation helpers ---------------------------------------------------------------------------
@settings(deadline=None, max_examples=25)
@given(st.lists(st.integers(-3, 3), min_size=3, max_size=30), st.integers(0, 2**31 - 1))
def test_spearman_matches_scipy(xs, seed):
    scipy_stats = pytest.importorskip("scipy.stats")
    ys = np.random.default_rng(seed).integers(-2, 3, size=len(xs))
    want = scipy_stats.spearmanr(xs, ys).statistic
    got = spearman(xs, ys)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, abs=1e-9)


# ---- the stage end to end on a tiny model --------------------------------------------------------
def tiny_run(tmp_path, tok, **reward):
    cfg = Config(run_name="t", run_dir=str(tmp_path), progress=False, compilation_cache="",
                 model=model_cfg(tok))
    cfg.world.n_dialogues = 60
    cfg.reward.n_norm = 24
    for k, v in reward.items():
        setattr(cfg.reward, k, v)
    tok.save(str(tmp_path / "tokenizer.json"))
    gpt = GPT.init(cfg.model, 0)
    ckpt = Checkpointer(str(tmp_path / "sft" / "checkpoints"), async_save=False)
    ckpt.save(1, nnx.state(gpt, nnx.Param), None, {"step": 1})
    ckpt.close()
    return cfg


def synthetic_preference_file(path, n):
    """Labelers who like replies saying `good` and dislike `bad`: a rule the RM can learn.
    One row per prompt, so that held-out prompts (split by prompt) are new to the RM."""
    rng = np.random.default_rng(1)
    rows = []
    for p in (to_prompt(d) for d in generate_dialogues(WORLD, n, "train", seed=4)):
        words = rng.permutation(["good", "bad", "fine"])
        comps = [f"{p['ideal']} {w}." for w in words]
        gold = [{"good": 1.0, "fine": 0.0, "bad": -1.0}[w] for w in words]
        rows.append({"messages": p["messages"], "completions": comps,
                     "ranking": [int(j) for j in np.argsort(gold)[::-1]], "gold": gold, "family": p["family"]})
    write_jsonl(str(path), rows)


def test_reward_stage_learns_a_synthetic_preference(tmp_path, tok):
    data = tmp_path / "prefs.jsonl"
    synthetic_preference_file(data, 240)
    cfg = tiny_run(tmp_path, tok, files=[str(data)], batch_size=8, eval_every=10, checkpoint_every=10,
                   heldout_frac=0.2, epochs=2)
    cfg.reward.optim.lr = 3e-3
    summary = run(cfg, str(tmp_path), tok, one_device_mesh())
    assert summary["accuracy"] >= 0.9, summary["report_md"]
    assert summary["ceiling"] == pytest.approx(1.0, abs=1e-3)
    assert summary["spearman"] > 0.7  # pooled over prompts: each new prompt shifts its rewards
    assert abs(summary["demo_mean_after_bias"]) < 1e-4
    assert set(summary["families"]) <= set(FAMILIES)
    done = read_done(str(tmp_path), "reward")
    assert done["bias"] == summary["bias"] and "report_md" in done
    for p in summary["plots"].values():
        assert os.path.getsize(tmp_path / p) > 1000
    rows = [json.loads(x) for x in open(tmp_path / "reward" / "metrics.jsonl")]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == summary["steps"] == 2 * 192 // 8
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.1 * max(lrs)  # the learning rate decays (to 0 at the end)
    model, bias = load_reward_model(str(tmp_path), cfg)
    assert bias == pytest.approx(summary["bias"])
    d = encode_comparisons(tok, [{"messages": PROMPTS[0]["messages"], "ranking": [0, 1],
                                  "completions": [f"{PROMPTS[0]['ideal']} good.", f"{PROMPTS[0]['ideal']} bad."]}],
                           summary["width"])
    r = score(model, d["tokens"][0], d["mask"][0], bias)
    assert float(r[0]) > float(r[1])


def test_reward_stage_resumed_from_a_checkpoint_ends_as_if_never_stopped(tmp_path, tok, capsys):
    data = tmp_path / "prefs.jsonl"
    synthetic_preference_file(data, 48)
    cfg = tiny_run(tmp_path, tok, files=[str(data)], batch_size=8, eval_every=2, checkpoint_every=2,
                   heldout_frac=0.25, epochs=2, keep=3)
    first = run(cfg, str(tmp_path), tok, one_device_mesh())
    sdir = tmp_path / "reward"
    rows = [json.loads(x) for x in open(sdir / "metrics.jsonl")]
    params = lambda: jax.tree.leaves(nnx.state(load_reward_model(str(tmp_path), cfg)[0], nnx.Param))
    done = params()
    # a run killed after step 6 of 10: its last checkpoint is step 6, the log goes further
    shutil.rmtree(sdir / "checkpoints" / "8")
    shutil.rmtree(sdir / "checkpoints" / "10")
    os.remove(sdir / "DONE.json")
    capsys.readouterr()
    second = run(cfg, str(tmp_path), tok, one_device_mesh())
    assert "[reward] resuming from step 6" in capsys.readouterr().out
    clock = ("tokens_per_s", "mfu")
    untimed = lambda rows: [{k: v for k, v in r.items() if k not in clock} for r in rows]
    assert untimed(json.loads(x) for x in open(sdir / "metrics.jsonl")) == untimed(rows)
    assert second["bias"] == first["bias"] and second["accuracy"] == first["accuracy"]
    assert all(np.array_equal(a, b) for a, b in zip(params(), done, strict=True))


def test_user_comparisons_are_held_out_by_prompt_not_by_line(tmp_path):
    """TRL-style files list several pairs per prompt: a prompt goes to one side of the split."""
    rows = [{"prompt": f"question {i}", "chosen": f"good {j}", "rejected": f"bad {j}"}
            for i in range(20) for j in range(i % 4 + 1)]
    write_jsonl(str(tmp_path / "pairs.jsonl"), rows)
    cfg = Config()
    cfg.reward.files, cfg.reward.heldout_frac = [str(tmp_path / "pairs.jsonl")], 0.25
    train, held = comparison_data(cfg, str(tmp_path), "reward")
    assert len(train) + len(held) == len(rows)
    train_keys, held_keys = {prompt_key(r) for r in train}, {prompt_key(r) for r in held}
    assert len(held_keys) == 5 and len(train_keys) == 15 and not train_keys & held_keys
    cfg.reward.heldout_frac = 0.99
    with pytest.raises(DataError, match="20 distinct prompts are too few to hold 20 out"):
        comparison_data(cfg, str(tmp_path), "reward")


def test_held_out_comparison_prompts_are_fresh_and_keep_the_family_shares():
    from collections import Counter
    cfg = Config()
    train = comparison_prompts(cfg, "train", 1500, "comparisons/train")
    keys = {prompt_key(p) for p in train}
    assert len(keys) < len(train)  # the train split is finite: fresh draws do repeat
    plain = comparison_prompts(cfg, "train", 110, "comparisons/heldout")
    assert any(prompt_key(p) in keys for p in plain)  # so without `exclude`, held-out repeats train
    held = comparison_prompts(cfg, "train", 110, "comparisons/heldout", exclude=frozenset(keys))
    held_keys = [prompt_key(p) for p in held]
    assert len(set(held_keys)) == 110 and not set(held_keys) & keys
    assert Counter(p["family"] for p in held) == Counter(p["family"] for p in plain)
    # a family whose prompts are all excluded comes back short, with a warning
    # (its largest draw is 32 x 110 prompts, the first of which are the smaller draws')
    capability = {prompt_key(p) for p in comparison_prompts(cfg, "train", 32 * 110, "comparisons/heldout")
                  if p["family"] == "capability"}
    with pytest.warns(UserWarning, match="capability"):
        short = comparison_prompts(cfg, "train", 110, "comparisons/heldout", exclude=frozenset(capability))
    assert len(short) == 100 and "capability" not in {p["family"] for p in short}


def test_comparisons_then_reward_from_a_policy(tmp_path, tok):
    cfg = tiny_run(tmp_path, tok, n_prompts=16, n_heldout=8, k=4, max_new_tokens=8, sample_batch_size=32,
                   batch_size=4, eval_every=2, checkpoint_every=2)
    mesh = one_device_mesh()
    s = run_comparisons(cfg, str(tmp_path), tok, mesh, policy_stage="sft", stage="comparisons_r9")
    rows = load_comparisons([s["train"]["path"]])
    # 4 policy samples, then the demonstration, then 2 of the world's flawed replies
    assert len(rows) == 16 and all(len(r["completions"]) == 7 and len(r["gold"]) == 7 for r in rows)
    raw = [json.loads(line) for line in open(s["train"]["path"])]
    assert all(r["completions"][4] == r["ideal"] and r["gold"][4] >= 0.9 for r in raw)
    assert all(max(r["gold"][5:]) < r["gold"][4] for r in raw)  # flawed replies score below it
    held = [json.loads(line) for line in open(s["heldout"]["path"])]
    assert all(len(r["completions"]) == 4 for r in held)  # held out: the policy's samples only
    assert not {prompt_key(r) for r in held} & {prompt_key(r) for r in raw}  # and its prompts are new
    assert os.path.exists(tmp_path / "comparisons_r9" / "comparisons_heldout.jsonl")
    assert 0.5 <= s["heldout"]["ceiling"] <= 1.0
    summary = run(cfg, str(tmp_path), tok, mesh, stage="reward_r9", comparisons_stage="comparisons_r9")
    assert summary["steps"] == 4 * cfg.reward.epochs and summary["pairs"] == 8 * 6
    assert {"bias", "accuracy", "ceiling", "spearman", "families", "plots", "report_md",
            "expected_accuracy", "bayes"} <= set(summary)
    assert summary["bayes"] >= max(summary["ceiling"], summary["expected_accuracy"]) - 1e-9
    assert "| family | accuracy | expected | labeler ceiling | best possible | pairs |" in summary["report_md"]
    # a later RLHF round goes on from this reward model (reward.continue_rounds)
    run(cfg, str(tmp_path), tok, mesh, stage="reward_r10", comparisons_stage="comparisons_r9",
        init_stage="reward_r9")
    first = [json.loads(x) for x in open(tmp_path / "reward_r9" / "metrics.jsonl")]
    second = [json.loads(x) for x in open(tmp_path / "reward_r10" / "metrics.jsonl")]
    assert second[0]["step"] == 0 and second[0]["eval_loss"] == pytest.approx(first[-1]["eval_loss"], abs=1e-5)
    assert first[0]["eval_loss"] != pytest.approx(first[-1]["eval_loss"], abs=1e-5)  # it did train


def test_evaluate_expected_accuracy_of_the_gold_order_is_the_best_possible():
    from types import SimpleNamespace

    from minichat.reward import evaluate
    from minichat.world import rank
    gen = np.random.default_rng(0)
    lcfg = SimpleNamespace(noise=0.3, length_bias=0.0)
    gold = gen.choice([-1.0, -0.5, 0.0, 1.0], size=(200, 4))  # many ties, as in ChatWorld
    rows = [{"completions": ["a", "b", "c", "d"], "gold": list(g), "family": "fact",
             "ranking": rank(g, [1] * 4, gen, noise=lcfg.noise)} for g in gold]
    data = {"ranking": np.array([r["ranking"] for r in rows]), "valid": np.ones((200, 4), bool)}
    best = evaluate(gold.copy(), data, rows, lcfg)
    assert best["expected_accuracy"] == pytest.approx(best["bayes"])
    assert best["bayes"] >= best["ceiling"]
    # the measured accuracy is one labeling's draw of the expected one (1,200 pairs: sd ~0.014)
    assert abs(best["accuracy"] - best["expected_accuracy"]) < 0.05
    worst = evaluate(-gold, data, rows, lcfg)
    assert worst["expected_accuracy"] == pytest.approx(1 - best["expected_accuracy"])
    assert worst["families"]["fact"]["expected_accuracy"] == pytest.approx(worst["expected_accuracy"])


@pytest.mark.parametrize("phrasings", ["rl", "train"])
def test_rl_stages_prompts_are_asked_in_their_configured_phrasings(phrasings):
    """Comparisons and PPO rollouts ask about SFT's entities in `phrasings`; the held-out
    comparisons with `heldout_split=heldout` keep the evaluation's own phrasings."""
    from minichat.ppo import prompt_pool
    cfg = Config()
    cfg.reward.phrasings = cfg.ppo.phrasings = phrasings
    cfg.ppo.n_prompts = 110
    for prompts in (comparison_prompts(cfg, "train", 110, "comparisons/train"), prompt_pool(cfg)):
        ids = [t for p in prompts for t in p["meta"]["templates"]]
        assert len(prompts) == 110 and ids
        assert all(("#rl" in t) == (phrasings == "rl") for t in ids)
        assert {p["split"] for p in prompts} == {"train"}
    held = comparison_prompts(cfg, "heldout", 110, "comparisons/heldout")
    assert {p["split"] for p in held} == {"heldout"}
    assert not any("#rl" in t for p in held for t in p["meta"]["templates"])
