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
