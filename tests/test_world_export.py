"""Export CLI: every file in the documented format; the checked-in samples are current."""

import json
from pathlib import Path

from minichat.world.__main__ import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data"
FILES = ["pretrain.jsonl", "corpus.txt", "world.json"] + [
    f"{kind}_{split}.jsonl" for kind in ("sft", "prompts", "reward", "reward_pairs")
    for split in ("train", "heldout")] + ["prompts_rl.jsonl"]


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_messages(msgs, last_role):
    assert msgs and all(m["role"] in ("system", "user", "assistant") and isinstance(m["content"], str)
                        for m in msgs)
    assert msgs[-1]["role"] == last_role


def test_small_export_formats(tmp_path):
    assert main(["export", "--out", str(tmp_path), "--small", "--seed", "0"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)
    assert all(isinstance(r["text"], str) and r["text"] for r in _rows(tmp_path / "pretrain.jsonl"))
    for r in _rows(tmp_path / "prompts_rl.jsonl"):
        _check_messages(r["messages"], "user")
        assert r["ideal"] and r["split"] == "train" and any("#rl" in t for t in r["meta"]["templates"])
    for split in ("train", "heldout"):
        for r in _rows(tmp_path / f"sft_{split}.jsonl"):
            _check_messages(r["messages"], "assistant")
        for r in _rows(tmp_path / f"prompts_{split}.jsonl"):
            _check_messages(r["messages"], "user")
            assert r["ideal"] and r["family"] and "meta" in r
        for r in _rows(tmp_path / f"reward_{split}.jsonl"):
            _check_messages(r["messages"], "user")
            assert sorted(r["ranking"]) == list(range(len(r["completions"]))) and len(r["completions"]) >= 2
        for r in _rows(tmp_path / f"reward_pairs_{split}.jsonl"):
            _check_messages(r["messages"], "user")
            assert r["chosen"] != r["rejected"]


def test_checked_in_examples_are_up_to_date(tmp_path):
    main(["export", "--out", str(tmp_path), "--small"])
    for name in FILES:
        assert (EXAMPLES / name).read_text() == (tmp_path / name).read_text(), name
    assert (EXAMPLES / "README.md").exists()
    lines = [len((EXAMPLES / n).read_text().splitlines()) for n in FILES if n.endswith(".jsonl")]
    assert all(10 <= n <= 25 for n in lines)


def test_export_to_an_unusable_path_is_one_line(tmp_path, capsys):
    from minichat.world.__main__ import main

    afile = tmp_path / "a.jsonl"
    afile.write_text("")
    assert main(["export", "--out", str(afile), "--small"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {afile}: File exists"
    assert main(["export", "--out", str(afile / "sub"), "--small"]) == 2
    assert "Not a directory" in capsys.readouterr().err
