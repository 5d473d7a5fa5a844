"""Data files: bad lines fail with file, line and reason; batches depend only on the step."""

import json

import numpy as np
import pytest

from hypothesis import given, settings
from hypothesis import strategies as st

from minichat.data import (DataError, epoch_batch_indices, first_fit, lm_batch, load_comparisons,
                           load_conversations, load_prompts, load_texts, pack_documents, pad_rows)


def write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(p)


USER = {"role": "user", "content": "hi"}
BOT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize("bad, reason", [
    ("{not json", "invalid JSON"),
    ([1, 2], "expected a JSON object"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"messages": [USER]}, "at least one assistant turn"),
])
def test_sft_bad_line_names_file_line_and_reason(tmp_path, bad, reason):
    path = write(tmp_path, "sft.jsonl", [{"messages": [USER, BOT]}, bad])
    with pytest.raises(DataError, match=rf"sft.jsonl:2: .*{reason}"):
        load_conversations([path])


def test_prompts_must_end_with_user(tmp_path):
    path = write(tmp_path, "p.jsonl", [{"messages": [USER]}, {"messages": [USER, BOT]}])
    with pytest.raises(DataError, match="p.jsonl:2: the last message must be a user turn"):
        load_prompts([path])


def test_comparisons_kway_and_pairwise(tmp_path):
    path = write(tmp_path, "c.jsonl", [
        {"messages": [USER], "completions": ["a", "b", "c"], "ranking": [2, 0, 1]},
        {"prompt": "hi", "chosen": "good", "rejected": "bad"},
    ])
    rows = load_comparisons([path])
    assert rows[0]["ranking"] == [2, 0, 1]
    assert rows[1] == {"messages": [USER], "completions": ["good", "bad"], "ranking": [0, 1]}
    bad = write(tmp_path, "d.jsonl", [{"messages": [USER], "completions": ["a", "b"], "ranking": [0, 0]}])
    with pytest.raises(DataError, match="d.jsonl:1: field 'ranking' must be a permutation"):
        load_comparisons([bad])


K3 = {"messages": [USER], "completions": ["a", "b", "c"]}


@pytest.mark.parametrize("bad, reason", [
    ({**K3, "ranking": [0, "1", 2]}, "'ranking' must be a permutation"),
    ({**K3, "ranking": [None, 0, 1]}, "'ranking' must be a permutation"),
    ({**K3, "ranking": [True, False, 2]}, "'ranking' must be a permutation"),
    ({**K3, "ranking": [0.0, 1.0, 2.0]}, "'ranking' must be a permutation"),
    ({**K3, "ranking": [0, 1, 2], "gold": [1.0, float("nan"), 0.0]}, "'gold' must be a list of 3 finite"),
    ({**K3, "ranking": [0, 1, 2], "family": ["fact"]}, "'family' must be a string"),
    ({"prompt": "hi", "chosen": "a", "rejected": "b", "family": None}, "'family' must be a string"),
    ({**K3, "ranking": [0, 1, 2], "chosen": "a", "rejected": "b"}, "either pairwise .* or K-way"),
])
def test_comparison_bad_line_names_file_line_and_reason(tmp_path, bad, reason):
    path = write(tmp_path, "c.jsonl", [{**K3, "ranking": [2, 0, 1]}, bad])
    with pytest.raises(DataError, match=rf"c.jsonl:2: .*{reason}"):
        load_comparisons([path])


def test_unreadable_files_fail_with_their_name(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(json.dumps({"messages": [USER, BOT]}).encode() + b"\n" + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 14\)"):
        load_conversations([str(p)])
    with pytest.raises(DataError, match="a directory, not a file"):
        load_prompts([str(tmp_path)])
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(DataError, match="empty.jsonl: no data"):
        load_comparisons([str(tmp_path / "empty.jsonl")])


def test_texts_from_txt_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("first doc\nstill first\n\nsecond doc\n")
    js = write(tmp_path, "b.jsonl", [{"text": "third"}])
    assert load_texts([str(txt), js]) == ["first doc\nstill first", "second doc", "third"]
    with pytest.raises(DataError, match="b2.jsonl:1: missing string field 'text'"):
        load_texts([write(tmp_path, "b2.jsonl", [{"txt": "x"}])])
    with pytest.raises(DataError, match="no such file"):
        load_texts([str(tmp_path / "missing.txt")])
    (tmp_path / "dir.txt").mkdir()
    with pytest.raises(DataError, match=r"dir\.txt: a directory, not a file"):
        load_texts([str(tmp_path / "dir.txt")])
    (tmp_path / "latin.txt").write_bytes(b"fine\n\ncaf\xe9\n")
    with pytest.raises(DataError, match=r"latin\.txt:3: not UTF-8 \(byte 0xe9\)"):
        load_texts([str(tmp_path / "latin.txt")])
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(DataError, match=r"blank\.txt: no data"):
        load_texts([str(tmp_path / "blank.txt")])
    with pytest.raises(DataError, match=r"empty\.jsonl: no data"):
        load_texts([write(tmp_path, "empty.jsonl", [])])


def test_lm_batches_are_a_pure_function_of_the_step():
    stream = pack_documents([list(range(1, 50))] * 40, bos_id=0)
    a = lm_batch(stream, 7, batch_size=4, seq_len=16, seed=3)
    b = lm_batch(stream, 7, batch_size=4, seq_len=16, seed=3)
    assert a.shape == (4, 17) and np.array_equal(a, b)
    assert not np.array_equal(a, lm_batch(stream, 8, batch_size=4, seq_len=16, seed=3))
    # windows are contiguous slices of the stream
    for row in a:
        start = np.flatnonzero((np.lib.stride_tricks.sliding_window_view(stream, 17) == row).all(1))
        assert len(start) >= 1


def test_epoch_indices_cover_each_example_once_per_epoch():
    seen = np.concatenate([epoch_batch_indices(20, s, 5, seed=0) for s in range(4)])
    assert sorted(seen) == list(range(20))


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), batch=st.integers(1, 16), seed=st.integers(0, 99))
def test_every_epoch_draws_distinct_examples_and_all_it_can(n, batch, seed):
    """In each of three epochs, the n // batch full batches hold distinct examples; when the
    batch is larger than the data, the one batch per epoch holds every example."""
    per_epoch = max(n // batch, 1)
    for epoch in range(3):
        idx = np.concatenate([epoch_batch_indices(n, epoch * per_epoch + i, batch, seed)
                              for i in range(per_epoch)])
        assert idx.min() >= 0 and idx.max() < n
        if batch <= n:
            assert len(set(idx.tolist())) == per_epoch * batch
        else:
            assert set(idx.tolist()) == set(range(n))


@settings(max_examples=40, deadline=None)
@given(length=st.integers(20, 400), batch=st.integers(1, 8), seq_len=st.integers(1, 32),
       seed=st.integers(0, 99))
def test_lm_windows_start_at_multiples_of_seq_len_and_each_epoch_sees_distinct_ones(
        length, batch, seq_len, seed):
    stream = np.arange(length)  # every token its own position: a row tells where it starts
    n_windows = (length - 1) // seq_len
    if n_windows < 1:
        return
    per_epoch = max(n_windows // batch, 1)
    for epoch in range(3):
        starts = []
        for i in range(per_epoch):
            rows = lm_batch(stream, epoch * per_epoch + i, batch, seq_len, seed)
            assert rows.shape == (batch, seq_len + 1)
            assert (np.diff(rows, axis=1) == 1).all()  # contiguous
            assert (rows[:, 0] % seq_len == 0).all() and (rows[:, -1] < length).all()
            starts += (rows[:, 0] // seq_len).tolist()
        if batch <= n_windows:  # distinct windows, as many as full batches fit
            assert len(set(starts)) == per_epoch * batch
        else:
            assert set(starts) == set(range(n_windows))


def test_pad_rows_left_and_right():
    assert pad_rows([[1, 2], [3]], 3, 0).tolist() == [[1, 2, 0], [3, 0, 0]]
    assert pad_rows([[1, 2], [3]], 3, 0, left=True).tolist() == [[0, 1, 2], [0, 0, 3]]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 16), max_size=40), st.sampled_from([None, 1, 3]))
def test_first_fit_places_sequences_without_overlap_in_the_first_row_with_room(lengths, window):
    width = 16
    where, rows = first_fit(lengths, width, window)
    grid = np.zeros((max(rows, 1), width), int)
    free = []
    for i, ((r, c), n) in enumerate(zip(where, lengths)):
        if n == 0:
            continue
        assert 0 <= r < rows and c + n <= width
        grid[r, c:c + n] += 1
        # the reference: the first of the last `window` rows with room, else a new row
        lo = 0 if window is None else max(0, len(free) - window)
        want = next((j for j in range(lo, len(free)) if free[j] >= n), len(free))
        if want == len(free):
            free.append(width)
        assert r == want and c == width - free[want]
        free[want] -= n
    assert grid.max(initial=0) <= 1 and grid.sum() == sum(lengths)  # no overlap, nothing lost
    assert rows == len(free)


def test_first_line_is_one_readable_line():
    from minichat.data import first_line

    try:
        try:
            raise OSError("OUT_OF_RANGE: offset 8 is not valid\nfor value of size 0")
        except OSError as inner:
            raise RuntimeError("\n  Failed to restore.\nmore detail") from inner
    except RuntimeError as e:
        assert first_line(e) == "Failed to restore."  # blank first lines skipped
        assert first_line(e, root=True) == "OUT_OF_RANGE: offset 8 is not valid"
    assert first_line(KeyError()) == "KeyError"  # no message: the type
    assert first_line(ValueError("x" * 300)) == "x" * 200 + "..."
