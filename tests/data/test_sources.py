"""Document sources: indexing, validation errors and formats."""

import json
import pickle

import grain
import pytest

from llmjax.data import sources
from llmjax.errors import ConfigError, DataError


def _write(path, text):
  path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
  return str(path)


def test_text_source_paragraphs(tmp_path):
  a = _write(tmp_path / "a.txt", "\n\nfirst para\nsecond line\n\n\n  \nsecond\r\n\r\nthird  \n")
  b = _write(tmp_path / "b.txt", "ünïcode 漢字 only one")
  src = sources.TextSource([a, b])
  assert len(src) == 4
  assert list(sources.iter_texts(src)) == ["first para\nsecond line", "second", "third",
                                           "ünïcode 漢字 only one"]
  assert src[-1] == "ünïcode 漢字 only one"
  with pytest.raises(IndexError):
    src[4]
  assert isinstance(src, grain.sources.RandomAccessDataSource)
  assert list(sources.iter_texts(pickle.loads(pickle.dumps(src)))) == list(
      sources.iter_texts(src))


def test_text_source_custom_separator(tmp_path):
  path = _write(tmp_path / "a.txt", "one<END>two<END> <END>three")
  assert list(sources.iter_texts(sources.TextSource([path], separator="<END>"))) == [
      "one", "two", "three"]


def test_text_source_errors(tmp_path):
  with pytest.raises(DataError, match="missing.txt: no such file"):
    sources.TextSource([str(tmp_path / "missing.txt")])
  empty = _write(tmp_path / "empty.txt", "")
  with pytest.raises(DataError, match="empty.txt is empty"):
    sources.TextSource([empty])
  blank = _write(tmp_path / "blank.txt", "\n \n\n\t\n")
  with pytest.raises(DataError, match="blank.txt is empty"):
    sources.TextSource([blank])
  bad = _write(tmp_path / "bad.txt", b"ok\n\nline two\n\xff\xfe bad")
  with pytest.raises(DataError, match=r"bad.txt:4: not valid UTF-8"):
    sources.TextSource([bad])


def test_jsonl_source(tmp_path):
  lines = [{"text": "hello"}, {"text": "wörld", "id": 2}, {"text": ""}]
  path = _write(tmp_path / "a.jsonl",
                "\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n\n  \n")
  src = sources.JsonlSource([path])
  assert list(sources.iter_texts(src)) == ["hello", "wörld", ""]
  assert src.num_skipped == 0 and src.problems == []
  assert pickle.loads(pickle.dumps(src))[1] == "wörld"
  other = _write(tmp_path / "b.jsonl", '{"body": "x"}\n')
  assert sources.JsonlSource([other], field="body")[0] == "x"


@pytest.mark.parametrize("line,problem", [
    ("not json", "not valid JSON"),
    ('{"text": "cut off', "not valid JSON (Invalid control character at column 18)"),  # no 'at at'
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"body": "x"}', "no 'text' key"),
    ('{"text": 5}', "'text' is int, expected a string"),
    ('{"text": null}', "'text' is NoneType"),
])
def test_jsonl_bad_line_names_path_and_line(tmp_path, line, problem):
  path = _write(tmp_path / "data.jsonl", '{"text": "ok"}\n\n' + line + '\n{"text": "ok"}\n')
  with pytest.raises(DataError) as e:
    sources.JsonlSource([path])
  msg = str(e.value)
  assert f"{path}:3: {problem}" in msg
  assert "skip_bad_lines=True" in msg


def test_jsonl_skip_bad_lines_counts_exactly(tmp_path):
  good = [json.dumps({"text": f"doc {i}"}) for i in range(5)]
  bad = ["{", "3", '{"text": []}', b"\xff".decode("latin-1"), '{"x": 1}', "nope", "[]"]
  body = [good[0], bad[0], good[1], bad[1], bad[2], "", good[2], bad[3], good[3], bad[4],
          bad[5], bad[6], good[4]]
  path = _write(tmp_path / "a.jsonl", "\n".join(body))
  src = sources.JsonlSource([path], skip_bad_lines=True)
  assert src.num_skipped == 7
  assert list(sources.iter_texts(src)) == [f"doc {i}" for i in range(5)]
  assert src.problems[0].startswith(f"{path}:2: not valid JSON")
  assert src.problems[1].startswith(f"{path}:4: expected a JSON object")
  assert len(src.problems) == 7


def test_jsonl_problems_are_capped(tmp_path):
  path = _write(tmp_path / "a.jsonl", "x\n" * 50 + '{"text": "ok"}\n')
  src = sources.JsonlSource([path], skip_bad_lines=True)
  assert src.num_skipped == 50 and len(src.problems) == sources.MAX_REPORTED_PROBLEMS


def test_jsonl_empty_and_all_bad(tmp_path):
  empty = _write(tmp_path / "empty.jsonl", "\n\n")
  with pytest.raises(DataError, match="empty.jsonl is empty"):
    sources.JsonlSource([empty])
  bad = _write(tmp_path / "bad.jsonl", "x\ny\n")
  with pytest.raises(DataError, match="bad.jsonl is empty.*skipped"):
    sources.JsonlSource([bad], skip_bad_lines=True)


def test_array_record_round_trip(tmp_path):
  texts = ["one", "twö", "", "three\nlines"]
  a = str(tmp_path / "a.array_record")
  b = str(tmp_path / "b.array_record")
  assert sources.write_array_record(a, texts) == 4
  sources.write_array_record(b, [json.dumps({"text": "json doc"})])
  src = sources.ArrayRecordSource([a, b])
  assert len(src) == 5
  assert list(sources.iter_texts(src))[:4] == texts
  assert pickle.loads(pickle.dumps(src))[1] == "twö"
  assert sources.ArrayRecordSource([b], field="text")[0] == "json doc"


def test_array_record_errors(tmp_path):
  with pytest.raises(DataError, match="nope.array_record: no such file"):
    sources.ArrayRecordSource([str(tmp_path / "nope.array_record")])
  a = str(tmp_path / "a.array_record")
  b = str(tmp_path / "b.array_record")
  sources.write_array_record(a, [json.dumps({"text": "fine"})])
  sources.write_array_record(b, [json.dumps({"text": "fine"}), "not json"])
  src = sources.ArrayRecordSource([a, b], field="text")
  assert src[1] == "fine"
  with pytest.raises(DataError, match=r"b.array_record: record 1: .*field=None"):
    src[2]
  # The first record is checked at construction, so a wrong field fails early.
  with pytest.raises(DataError, match=r"a.array_record: record 0: .*'body'"):
    sources.ArrayRecordSource([a], field="body")
  empty = str(tmp_path / "empty.array_record")
  sources.write_array_record(empty, [])
  with pytest.raises(DataError, match="empty.array_record is empty"):
    sources.ArrayRecordSource([empty])
  garbage = _write(tmp_path / "g.array_record", "this is not an array record file" * 10)
  with pytest.raises(DataError, match="g.array_record"):
    sources.ArrayRecordSource([garbage])


def test_make_source_globs(tmp_path):
  for name, text in [("b.txt", "two"), ("a.txt", "one"), ("c.md", "skip")]:
    _write(tmp_path / name, text)
  src = sources.make_source("text", [str(tmp_path / "*.txt")])
  assert list(sources.iter_texts(src)) == ["one", "two"]  # sorted
  src = sources.make_source("text", str(tmp_path / "c.md"))
  assert src[0] == "skip"
  with pytest.raises(DataError, match=r"\*.jsonl: the pattern matches no files"):
    sources.make_source("jsonl", [str(tmp_path / "*.jsonl")])


def test_make_source_config_errors(tmp_path):
  with pytest.raises(ConfigError, match="text, jsonl, arrayrecord, builtin"):
    sources.make_source("parquet", ["x"])
  with pytest.raises(ConfigError, match="needs input files"):
    sources.make_source("jsonl", [])
  path = _write(tmp_path / "a.txt", "x")
  with pytest.raises(ConfigError, match="bad options"):
    sources.make_source("text", [path], field="text")


def test_builtin_source():
  src = sources.make_source("builtin", split="eval", num_documents=20)
  assert len(src) == 20 and isinstance(src[0], str)
  assert list(sources.iter_texts(src)) == list(
      sources.iter_texts(sources.BuiltinSource("eval", 20)))
  ds = grain.MapDataset.source(sources.BuiltinSource("train", 100)).shuffle(seed=0)
  assert sorted(ds) == sorted(sources.iter_texts(sources.BuiltinSource("train", 100)))
