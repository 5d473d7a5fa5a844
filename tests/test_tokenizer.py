"""Tokenizer: byte-level round trip, special-token safety, and the chat loss mask."""

import pytest
from hypothesis import given, strategies as st

from minichat.tokenizer import ASSISTANT, END, SPECIAL_TOKENS, train_tokenizer

CORPUS = ["The capital of Dorania is Tamsk. Dear Sam, I will be late today.",
          "Once upon a time a grey lynx lived in the forest. 7 plus 5 is 12."] * 50


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=400)


@given(st.text(max_size=80))
def test_encode_decode_round_trip_on_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


@given(st.sampled_from(SPECIAL_TOKENS), st.text(max_size=10), st.text(max_size=10))
def test_special_token_lookalikes_in_text_are_plain_text(tok, special, before, after):
    ids = tok.encode(before + special + after)
    assert not set(ids) & tok.special_ids
    assert tok.decode(ids) == before + special + after


def test_pad_is_distinct_from_end(tok):
    assert tok.pad_id != tok.end_id and tok.pad_id == 0


roles = st.sampled_from(["system", "user", "assistant"])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.text(max_size=30)}),
                    min_size=1, max_size=6)


@given(messages)
def test_loss_mask_covers_exactly_assistant_content_and_its_end(tok, msgs):
    ids, mask = tok.render_conversation(msgs)
    assert len(ids) == len(mask) and ids[0] == tok.bos_id
    # Reference: rebuild the ids and the mask turn by turn from the plain encodings:
    # <|bos|>, then per turn its role's header, its content and <|end|>.
    header = {"system": tok.system_id, "user": tok.user_id, "assistant": tok.assistant_id}
    expected, expected_ids = [0], [tok.bos_id]
    for m in msgs:
        body = tok.encode(m["content"]) + [tok.end_id]
        expected += [0] + [1 if m["role"] == "assistant" else 0] * len(body)
        expected_ids += [header[m["role"]]] + body
    assert ids == expected_ids and mask == expected
    # Every masked position is assistant content or an end token closing an assistant turn.
    masked_ends = [i for i, (t, k) in enumerate(zip(ids, mask)) if k and t == tok.end_id]
    assert len(masked_ends) == sum(m["role"] == "assistant" for m in msgs)
    assert not any(k and t in tok.special_ids - {tok.end_id} for t, k in zip(ids, mask))


def test_render_prompt_ends_with_assistant_header(tok):
    ids = tok.render_prompt([{"role": "user", "content": "hi"}])
    assert ids[-1] == tok.assistant_id and ids[-2] == tok.end_id
    assert tok.decode(ids, skip_special=False).endswith(END + ASSISTANT)


def test_save_load_round_trip(tok, tmp_path):
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    from minichat.tokenizer import ChatTokenizer
    tok2 = ChatTokenizer.load(path)
    text = "Tamsk <|user|> é"
    assert tok2.encode(text) == tok.encode(text) and tok2.end_id == tok.end_id


def test_excluded_assistant_turn_is_context_not_target(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "wrong"},
            {"role": "user", "content": "no"}, {"role": "assistant", "content": "right"}]
    ids, mask = tok.render_conversation(msgs, exclude=[1])
    full_ids, full_mask = tok.render_conversation(msgs)
    assert ids == full_ids
    n_wrong = len(tok.encode("wrong")) + 1
    assert sum(full_mask) - sum(mask) == n_wrong
    assert tok.decode([t for t, k in zip(ids, mask) if k]) == "right"
