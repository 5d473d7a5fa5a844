"""`python -m minichat.chat`: model discovery, streaming == greedy generate, multi-turn
history, context truncation, stdin / --prompt modes, REPL commands, the no-model message.

A tiny run directory is built once per module: a tokenizer trained on a few sentences and
a 1-layer GPT briefly trained to answer "hi" with "hello there", saved as the run's `sft`
checkpoint exactly as the training stages save theirs.
"""

import builtins
import os
import subprocess
import sys
from dataclasses import asdict

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minichat import chat
from minichat.checkpoint import Checkpointer
from minichat.config import ModelConfig
from minichat.model import GPT
from minichat.sampling import generate
from minichat.tokenizer import ChatTokenizer, train_tokenizer

SENTENCES = [
    "hello there, how are you today?",
    "the capital of Dorania is Tamsk.",
    "cats have four legs and say meow.",
    "who are you? I am a small assistant.",
    "hi! what can you do for me?",
] * 4
CFG = ModelConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32)
HI = [{"role": "user", "content": "hi"}]
TEST_CACHE = os.path.expanduser("~/.cache/minichat/jax-tests")  # conftest's cache


def _overfit(model, tok, steps=120):
    """Teach the model one exchange: hi -> hello there <|end|> (a few hundred ms)."""
    ids, mask = tok.render_conversation(HI + [{"role": "assistant", "content": "hello there"}])
    x, y, m = (jnp.asarray([a]) for a in (ids[:-1], ids[1:], mask[1:]))
    graphdef, params = nnx.split(model)
    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt):
        def loss(p):
            logits, _ = nnx.merge(graphdef, p)(x)
            nll = optax.softmax_cross_entropy_with_integer_labels(logits, y)
            return jnp.sum(nll * m) / jnp.sum(m)
        grads = jax.grad(loss)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt

    opt = tx.init(params)
    for _ in range(steps):
        params, opt = step(params, opt)
    return nnx.merge(graphdef, params)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("run") / "tiny"
    run.mkdir()
    tok = train_tokenizer(SENTENCES, 300)
    assert tok.vocab_size <= CFG.vocab_size
    tok.save(str(run / "tokenizer.json"))
    model = _overfit(GPT.init(CFG, 0), tok)
    ckpt = Checkpointer(str(run / "sft" / "checkpoints"), async_save=False)
    ckpt.save(1, nnx.state(model, nnx.Param), meta={"step": 1, "model": asdict(CFG)})
    ckpt.close()
    return str(run)


@pytest.fixture(scope="module")
def policy(run_dir):
    return chat.load_policy(run_dir)


def _main(capsys, *argv):
    rc = chat.main(["compilation_cache=", *argv])  # keep conftest's cache settings
    out, err = capsys.readouterr()
    return rc, out, err


# --------------------------------------------------------------------------- loading


def test_load_policy_restores_the_saved_model(run_dir, policy):
    model, tok, stage = policy
    assert stage == "sft"
    assert model.config.block_size == CFG.block_size and model.config.n_embd == CFG.n_embd
    assert tok.vocab_size == ChatTokenizer.load(os.path.join(run_dir, "tokenizer.json")).vocab_size
    # a step directory works as checkpoint=PATH, and gives the same weights
    again, _, _ = chat.load_policy(run_dir, checkpoint=os.path.join(run_dir, "sft", "checkpoints", "1"))
    a, b = nnx.state(model, nnx.Param), nnx.state(again, nnx.Param)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_tokenizer_other_than_the_one_the_stage_recorded_is_refused(run_dir, tmp_path):
    import shutil

    from minichat.tokenizer import FINGERPRINT, TokenizerError, fingerprint

    run = tmp_path / "copy"
    shutil.copytree(run_dir, run)
    (run / "sft" / FINGERPRINT).write_text(fingerprint(str(run / "tokenizer.json")) + "\n")
    chat.load_policy(str(run))  # the one it was trained with: fine
    other = tmp_path / "other.json"
    train_tokenizer(SENTENCES[::-1] + ["something else entirely"], 290).save(str(other))
    with pytest.raises(TokenizerError, match=r"other\.json is not the tokenizer sft was trained with"):
        chat.load_policy(str(run), tokenizer=str(other))


def test_model_shape_from_the_stage_config_when_meta_lacks_it(run_dir, policy, tmp_path):
    import yaml

    model, _, _ = policy
    run = tmp_path / "r"
    ckpt = Checkpointer(str(run / "pretrain" / "checkpoints"), async_save=False)
    ckpt.save(7, nnx.state(model, nnx.Param), meta={"step": 7})
    ckpt.close()
    (run / "pretrain" / "config.yaml").write_text(yaml.safe_dump({"model": asdict(CFG), "seed": 0}))
    with pytest.raises(chat.NoModelError, match="no tokenizer"):
        chat.load_policy(str(run))
    tokenizer = os.path.join(run_dir, "tokenizer.json")
    loaded, _, stage = chat.load_policy(str(run), tokenizer=tokenizer)
    assert stage == "pretrain" and loaded.config.block_size == CFG.block_size


def test_stage_selection_prefers_the_newest_policy(tmp_path):
    run = tmp_path / "r"
    for stage, step in [("pretrain", "5"), ("sft", "3"), ("ppo", "2"), ("ppo_r2", "1"),
                        ("reward", "9"), ("reward_r2", "9"),
                        ("ppo_r3", "1.orbax-checkpoint-tmp-17")]:  # an unfinished save
        (run / stage / "checkpoints" / step).mkdir(parents=True)
    (run / "comparisons").mkdir()
    assert chat.policy_stages(str(run)) == ["pretrain", "sft", "ppo", "ppo_r2"]
    loc = chat.locate(str(run))
    assert (loc.stage, loc.step) == ("ppo_r2", 1)
    assert chat.locate(str(run), stage="sft").stage == "sft"
    loc = chat.locate(str(run), checkpoint=str(run / "pretrain" / "checkpoints"))
    assert (loc.stage, loc.step, loc.run_dir) == ("pretrain", 5, str(run))
    loc = chat.locate(str(run), checkpoint=str(run / "ppo" / "checkpoints" / "2"))
    assert (loc.stage, loc.step) == ("ppo", 2)
    assert [chat.stage_rank(s) for s in ("pretrain", "sft", "ppo", "ppo_r2", "ppo_round3")] == [0, 1, 2, 3, 4]
    assert chat.stage_rank("reward") is None
    with pytest.raises(chat.NoModelError, match="stage=sft"):
        chat.locate(str(tmp_path / "empty"), stage="sft")
    with pytest.raises(chat.NoModelError, match=r"stages with a model: pretrain, sft, ppo, ppo_r2\): run "
                                                r"`python -m minichat.train run_dir=\S+ rounds=3` first"):
        chat.locate(str(run), stage="ppo_r3")  # made by the pipeline of three rounds


def test_missing_run_is_a_clear_message_not_a_traceback(tmp_path):
    missing = tmp_path / "runs" / "nothing"
    proc = subprocess.run([sys.executable, "-m", "minichat.chat", f"run_dir={missing}", "--prompt", "hi"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"no trained model in {missing} yet" in proc.stderr
    assert f"`python -m minichat.train run_dir={missing}` first" in proc.stderr
    assert "stage=sft" not in proc.stderr  # it would fail: nothing before SFT is trained yet
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_default_run_and_bad_arguments(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = _main(capsys)
    assert rc == 2 and "no trained model in runs/tiny yet: run `python -m minichat.train` first" in err
    rc, out, err = _main(capsys, "run=other")
    assert rc == 2 and "run_name=other" in err
    rc, out, err = _main(capsys, "temprature=0")
    assert rc == 2 and "unknown setting 'temprature'" in err
    rc, out, err = _main(capsys, "top_p=2")
    assert rc == 2 and "top_p" in err
    for bad in ("temperature=nan", "temperature=inf", "top_p=nan"):
        rc, out, err = _main(capsys, bad)
        assert rc == 2 and f"{bad}: must be a finite number" in err
    rc, out, err = _main(capsys, "stage=reward")
    assert rc == 2 and "stage=reward is not a policy: choose pretrain, sft, ppo" in err


# --------------------------------------------------------------------------- generation


def test_stream_decoder_holds_back_split_characters(policy):
    _, tok, _ = policy
    text = "héllo → 世界 😀 ok"
    dec = chat.StreamDecoder(tok)
    pieces = [dec.push(t) for t in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert len(tok.encode(text)) > len([p for p in pieces if p])  # some characters did span tokens


def test_streamed_reply_equals_greedy_reply_and_generate(policy):
    model, tok, _ = policy
    pieces = []
    out = chat.respond(model, tok, HI, temperature=0, max_new_tokens=16, on_token=pieces.append)
    assert out.text == "hello there" and out.ended  # the model learned its one line
    assert "".join(pieces) == out.text
    assert chat.reply(model, tok, HI, temperature=0, max_new_tokens=16) == out.text
    # ... and equals minichat.sampling.generate, greedy, for the same prompt
    for messages in (HI, [{"role": "user", "content": "the capital of Dorania?"}]):
        got = chat.respond(model, tok, messages, temperature=0, max_new_tokens=12)
        ids = tok.render_prompt(messages)
        gen = generate(model, np.asarray([ids]), np.ones((1, len(ids))), jax.random.key(0),
                       max_new_tokens=12, temperature=0, end_id=tok.end_id, pad_id=tok.pad_id)
        want = [int(t) for t, m in zip(gen.tokens[0], gen.mask[0]) if m and t != tok.end_id]
        assert got.ids == want
        assert got.text == tok.decode(want)


def test_sampling_is_seeded_and_respects_max_new_tokens(policy):
    model, tok, _ = policy
    q = [{"role": "user", "content": "cats have"}]
    a = chat.respond(model, tok, q, temperature=1.5, top_p=0.9, max_new_tokens=6, seed=3)
    b = chat.respond(model, tok, q, temperature=1.5, top_p=0.9, max_new_tokens=6, seed=3)
    assert a.ids == b.ids and len(a.ids) <= 6
    assert chat.clamp_max_new_tokens(10_000, 64) == 48


# --------------------------------------------------------------------------- conversations


def test_truncation_drops_oldest_turns_keeps_system_and_newest(policy):
    _, tok, _ = policy
    system = {"role": "system", "content": "be brief."}
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"question {i} about cats"},
                  {"role": "assistant", "content": f"answer {i}: cats say meow"}]
    newest = {"role": "user", "content": "who are you?"}
    messages = [system] + turns + [newest]
    ids, dropped, clipped = chat.fit_context(tok, messages, block_size=64, max_new_tokens=16)
    assert len(ids) <= 64 - 16 and not clipped
    assert dropped > 0 and dropped % 2 == 0  # whole turns
    assert ids == tok.render_prompt([system] + turns[dropped:] + [newest])
    # everything fits: nothing dropped
    ids, dropped, _ = chat.fit_context(tok, [system, newest], 64, 16)
    assert dropped == 0 and ids == tok.render_prompt([system, newest])
    # one message longer than the context keeps its end
    long = {"role": "user", "content": "cats have four legs " * 20 + "the end"}
    ids, dropped, clipped = chat.fit_context(tok, [system, long], 64, 16)
    assert clipped and len(ids) == 64 - 16
    assert ids[-2:] == [tok.end_id, tok.assistant_id] and tok.decode(ids).endswith("the end")


def test_chat_keeps_history_and_tells_once_about_truncation(policy):
    model, tok, _ = policy
    notes = []
    c = chat.Chat(model, tok, temperature=0, max_new_tokens=8, notify=notes.append)
    first = c.send("hi")
    assert first == "hello there"
    c.send("cats have four legs")
    first_turn = tok.render_conversation(HI + [{"role": "assistant", "content": first}])[0][1:]
    prompt = c.last.prompt_ids
    assert any(prompt[i:i + len(first_turn)] == first_turn for i in range(len(prompt)))
    for _ in range(6):
        c.send("the capital of Dorania is Tamsk")
    assert c.last.dropped > 0 and len(c.last.prompt_ids) <= 64 - 8
    newest = tok.encode("the capital of Dorania is Tamsk") + [tok.end_id, tok.assistant_id]
    assert c.last.prompt_ids[-len(newest):] == newest  # the newest user turn is kept
    assert len(notes) == 1 and "context" in notes[0]  # told once
    c.reset()
    assert c.messages == [] and c.send("hi") == "hello there"


def test_multi_turn_prompts_keep_the_history(run_dir, monkeypatch, capsys):
    seen = []
    real = chat.fit_context

    def spy(tok, messages, *a):
        out = real(tok, messages, *a)
        seen.append((tok, list(messages), out[0]))
        return out

    monkeypatch.setattr(chat, "fit_context", spy)
    rc, out, err = _main(capsys, f"run_dir={run_dir}", "temperature=0", "--prompt", "hi",
                         "max_new_tokens=8", "--prompt", "who are you?")  # in any order
    assert rc == 0, err
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0] == "hello there"
    tok, messages, ids = seen[1]
    first_turn = tok.render_conversation(HI + [{"role": "assistant", "content": lines[0]}])[0]
    assert ids[:len(first_turn)] == first_turn  # the second prompt starts with the first turn
    assert messages[-1] == {"role": "user", "content": "who are you?"}
    assert "sft" in err  # the banner names the stage


def test_stdin_mode_subprocess(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "minichat.chat", f"run_dir={run_dir}", "temperature=0",
         "max_new_tokens=8", f"compilation_cache={TEST_CACHE}"],
        input="hi\n\n/reset\nhi\n", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["hello there", "hello there"]
    assert "new conversation" in proc.stderr and "Traceback" not in proc.stderr


def test_stdin_bytes_that_are_not_utf8_are_replaced_not_a_traceback(run_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "minichat.chat", f"run_dir={run_dir}", "temperature=0",
         "max_new_tokens=8", f"compilation_cache={TEST_CACHE}"],
        input=b"caf\xe9\nhi\n", capture_output=True, timeout=120,
        env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"Traceback" not in proc.stderr and len(proc.stdout.decode().splitlines()) == 2  # two replies


def test_repl_commands(policy, monkeypatch, capsys):
    model, tok, _ = policy
    c = chat.Chat(model, tok, temperature=0.7, max_new_tokens=8)
    lines = iter(["/temperature 0", "/top_p 0.5", "/top_k 3", "/top_p 7", "hi", "/help",
                  "/system be brief", "/nope", "/quit", "never read"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    chat.repl(c, "banner")
    out, err = capsys.readouterr()
    assert (c.temperature, c.top_p, c.top_k) == (0.0, 0.5, 3)
    assert "hello there" in out and "/reset" in out  # the reply, then /help
    assert "error: top_p=7" in err and "unknown command /nope" in err
    assert c.system == "be brief" and c.messages == [{"role": "system", "content": "be brief"}]
    assert next(lines) == "never read"  # /quit stopped the loop
