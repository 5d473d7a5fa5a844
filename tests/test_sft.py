"""SFT data: truncation is loud, packing loses nothing and changes no loss, batches mix
demonstrations and pretraining text as asked."""

import numpy as np
import pytest

from minichat.sft import batch_maker, pack_conversations, render_batchable
from minichat.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["The capital of Dorania is Tamsk. hello there"] * 20, 300)


def conv(n_words):
    return {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": " ".join(["Tamsk"] * n_words)}]}


def test_conversations_longer_than_the_context_are_truncated_with_a_warning(tok):
    with pytest.warns(UserWarning, match="1 of 2 conversations are longer than the context"):
        tokens, valid, mask = render_batchable(tok, [conv(3), conv(200)], block_size=32)
    assert tokens.shape == (2, 33) and valid[1].all()  # kept, cut to the context: not dropped
    assert mask[1].sum() > 0


def test_short_conversations_pad_on_the_right_with_no_loss(tok):
    tokens, valid, mask = render_batchable(tok, [conv(1), conv(5)], block_size=64)
    n = int(valid[0].sum())
    assert (tokens[0, n:] == tok.pad_id).all() and not mask[0, n:].any()


def test_batches_mix_demonstrations_and_pretraining_text():
    rng = np.random.default_rng(0)
    arrays = {"tokens": rng.integers(5, 50, (40, 17)), "valid": np.ones((40, 17), int),
              "loss_mask": (rng.random((40, 17)) < 0.3).astype(int)}
    stream = np.arange(1000) % 97 + 100  # text ids >= 100, demonstrations < 50
    batch = batch_maker(arrays, 8, seed=0, stream=stream, n_lm=3)(5)
    assert batch["tokens"].shape == (8, 17)
    demo, text = batch["tokens"][:5], batch["tokens"][5:]
    assert (demo < 50).all() and (text >= 100).all()
    assert batch["loss_mask"][5:].all() and batch["valid"][5:].all()  # text: every position counts
    assert (batch["loss_mask"][:5].sum() < 5 * 17)  # demonstrations: only their masked tokens
    pure = batch_maker(arrays, 8, seed=0)(5)
    assert pure["tokens"].shape == (8, 17) and (pure["tokens"] < 50).all()


def _dialogue(i, n_turns):
    msgs = [{"role": "system", "content": "Be brief."}]
    for t in range(n_turns):
        msgs += [{"role": "user", "content": f"hello {i} {t}"},
                 {"role": "assistant", "content": " ".join(["Tamsk"] * (1 + (i + t) % 4))}]
    return {"messages": msgs}


def test_packing_keeps_every_conversation_once_and_the_same_loss(tok):
    """Packed rows hold each conversation exactly once (tokens and loss mask intact), and
    the SFT loss over packed rows equals the loss over one padded row per conversation."""
    import jax.numpy as jnp

    from minichat.config import ModelConfig
    from minichat.model import GPT
    from minichat.pretrain import batch_loss

    convs = [_dialogue(i, 1 + i % 3) for i in range(13)]
    packed = pack_conversations(tok, convs, block_size=64, seed=3)
    tokens, valid, mask = render_batchable(tok, convs, block_size=64)
    assert len(packed["tokens"]) < len(convs)  # several per row
    pieces = []
    for r in range(len(packed["tokens"])):
        for seg in range(1, packed["segments"][r].max() + 1):
            at = packed["segments"][r] == seg
            assert packed["valid"][r, at].all()
            pieces.append((tuple(packed["tokens"][r, at]), tuple(packed["loss_mask"][r, at])))
    alone = [(tuple(tokens[i, valid[i] > 0]), tuple(mask[i, valid[i] > 0])) for i in range(len(convs))]
    assert sorted(pieces) == sorted(alone)
    assert not packed["valid"][packed["segments"] == 0].any()

    model = GPT.init(ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, n_embd=32), 0)
    as_jnp = lambda d: {k: jnp.asarray(v) for k, v in d.items()}
    a = batch_loss(model, as_jnp(packed))
    b = batch_loss(model, as_jnp({"tokens": tokens, "valid": valid, "loss_mask": mask}))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-5)


def _sft_run(tok, tmp_path, convs, **sft):
    """The SFT stage for real on `convs` (as sft.files), from a saved random 'pretrained' model."""
    import json

    import jax
    from flax import nnx

    from minichat import sft as sft_module
    from minichat.checkpoint import Checkpointer
    from minichat.config import Config, ModelConfig, ParallelConfig, SFTConfig
    from minichat.model import GPT
    from minichat.parallel import make_mesh

    mcfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=16)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "demos.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in convs))
    run_dir = tmp_path / "run"
    ckpt = Checkpointer(str(run_dir / "pretrain" / "checkpoints"))
    ckpt.save(1, nnx.state(GPT.init(mcfg, 0), nnx.Param), meta={"step": 1})
    ckpt.close()
    cfg = Config(model=mcfg, progress=False, sft=SFTConfig(
        files=[str(path)], lm_mix=0.0, **{"steps": 2, "eval_every": 1, "checkpoint_every": 1, **sft}))
    mesh = make_mesh(ParallelConfig(data=1), devices=jax.devices()[:1])
    return sft_module.run(cfg, str(run_dir), tok, mesh)


def test_a_small_demonstration_file_is_evaluated_in_one_smaller_batch(tok, tmp_path):
    # 30 demonstrations: 1 held out, fewer than a batch of 16 (it used to train, then fail)
    summary = _sft_run(tok, tmp_path, [conv(3)] * 30, batch_size=16)
    assert np.isfinite(summary["eval_loss"]) and summary["eval_loss"] > 0


def test_unusable_demonstration_files_are_clear_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="sft.files: 1 demonstration; at least 2 are needed"):
        _sft_run(tok, tmp_path / "one", [conv(3)])
    long_user = {"messages": [{"role": "user", "content": "hello " * 60},
                              {"role": "assistant", "content": "Tamsk"}]}
    with pytest.warns(UserWarning, match="longer than the context"):
        with pytest.raises(ValueError, match="no assistant token is left to train on"):
            _sft_run(tok, tmp_path / "long", [long_user] * 40, batch_size=2)
