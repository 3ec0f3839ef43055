"""Chat templates, the assistant-only loss mask, truncation and packing of SFT data."""

import json

import grain
import jinja2.sandbox
import numpy as np
import pytest

from llmjax.data import chat, instructions
from llmjax.errors import ConfigError, DataError

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does Alice live?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "5"},
]
EXPECTED = {
    # Qwen2.5's format (without its default system prompt).
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n"
               "<|im_start|>user\nWhere does Alice live?<|im_end|>\n"
               "<|im_start|>assistant\nParis<|im_end|>\n"
               "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
               "<|im_start|>assistant\n5<|im_end|>\n"),
    # Llama 3 Instruct's format (after <|begin_of_text|>).
    "llama3": ("<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhere does Alice live?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nParis<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2 + 3?<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n5<|eot_id|>"),
}
END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
def test_template_renders_known_conversation(name, tokenizer):
  assert chat.render_text(CONVERSATION, name) == EXPECTED[name]
  ids, _ = chat.render_chat(CONVERSATION, name, tokenizer)
  assert ids[0] == tokenizer.bos_id
  assert tokenizer.decode(ids) == EXPECTED[name]  # bos decodes to nothing


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_jinja_for_export_renders_the_same_text(name, generation_prompt):
  # What transformers' apply_chat_template would render from the exported template.
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  text = env.from_string(chat.chat_template_jinja(name)).render(
      messages=CONVERSATION[:-1], bos_token="<s>", add_generation_prompt=generation_prompt)
  assert text == chat.render_text(CONVERSATION[:-1], name, bos="<s>",
                                  add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("name", sorted(chat.TEMPLATES))
@pytest.mark.parametrize("turns", [1, 2])
def test_loss_mask_covers_exactly_the_assistant_tokens(name, turns, tokenizer):
  messages = CONVERSATION[:1 + 2 * turns]
  ids, mask = chat.render_chat(messages, name, tokenizer)
  replies = [m["content"] + END[name] for m in messages if m["role"] == "assistant"]
  assert [tokenizer.decode(s) for s in chat.masked_spans(ids, mask)] == replies
  # Every unmasked token is template or prompt: removing the masked spans leaves the prompt.
  unmasked = tokenizer.decode([i for i, m in zip(ids, mask) if not m])
  assert "Paris" not in unmasked and "Where does Alice live?" in unmasked


def test_generation_prompt_is_the_training_prefix(tokenizer):
  # The prompt at inference must be token-for-token what preceded the reply in training.
  ids, mask = chat.render_chat(CONVERSATION[:3], "chatml", tokenizer)
  prompt = chat.prompt_ids(CONVERSATION[:2], "chatml", tokenizer)
  assert ids[:len(prompt)] == prompt and mask[len(prompt)] == 1 and not any(mask[:len(prompt)])


def test_unknown_template_and_missing_special_tokens(tokenizer):
  with pytest.raises(ConfigError, match="unknown chat template 'vicuna'"):
    chat.render_chat(CONVERSATION, "vicuna", tokenizer)


def _long_conversation(tokenizer, n_turns=6):
  conv = []
  for i in range(n_turns):
    conv += [{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"},
             {"role": "assistant", "content": f"The answer is {2 * i}."}]
  return conv


def test_truncate_prompt_keeps_the_last_reply_and_bos(tokenizer):
  conv = _long_conversation(tokenizer)
  ids, mask = chat.render_chat(conv, "chatml", tokenizer)
  max_len = len(ids) // 2
  out_ids, out_mask = instructions.truncate(ids, mask, max_len, "truncate_prompt",
                                            tokenizer.bos_id)
  assert len(out_ids) == max_len and out_ids[0] == tokenizer.bos_id
  assert out_ids[1:] == ids[len(ids) - max_len + 1:]  # the most recent context, whole reply
  assert tokenizer.decode(chat.masked_spans(out_ids, out_mask)[-1]) == "The answer is 10.<|im_end|>"
  end_ids, _ = instructions.truncate(ids, mask, max_len, "truncate_end", tokenizer.bos_id)
  assert end_ids == ids[:max_len]
  assert instructions.truncate(ids, mask, max_len, "drop", tokenizer.bos_id) is None


def test_overlong_examples_are_counted_never_silently_dropped(tokenizer):
  short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
  no_reply = [{"role": "user", "content": "Hi?"}]
  convs = [short, _long_conversation(tokenizer), no_reply]
  seq_len = len(chat.render_chat(convs[1], "chatml", tokenizer)[0]) // 2
  _, stats = instructions.tokenize_conversations(convs, tokenizer, "chatml", seq_len,
                                                 "truncate_prompt")
  assert stats.as_dict() == {"examples": 3, "truncated": 1, "dropped_overlong": 0,
                             "dropped_no_reply": 1}
  kept, stats = instructions.tokenize_conversations(convs, tokenizer, "chatml", seq_len, "drop")
  assert len(kept) == 1 and stats.dropped_overlong == 1 and stats.dropped_no_reply == 1


def test_packing_keeps_examples_whole_and_carries_the_mask(tokenizer):
  convs = instructions.builtin_conversations("train", 64)
  examples, _ = instructions.tokenize_conversations(convs, tokenizer, "chatml", 64,
                                                    "truncate_prompt")
  replies = sorted(m["content"] + "<|im_end|>" for c in convs for m in c
                   if m["role"] == "assistant")
  seen, segments = [], 0
  # The packer itself, batched without dropping: train_batches drops a short last batch,
  # which would make "every example once" depend on how this data happens to pack.
  ds = grain.MapDataset.source(examples).shuffle(seed=0).to_iter_dataset()
  for batch in instructions.pack_examples(ds, 64, 4).batch(4, drop_remainder=False):
    for row in range(batch["tokens"].shape[0]):
      seg, pos = batch["segment_ids"][row], batch["positions"][row]
      for s in set(seg.tolist()) - {0}:
        cols = np.flatnonzero(seg == s)
        segments += 1
        assert batch["tokens"][row, cols[0]] == tokenizer.bos_id and pos[cols[0]] == 0
        spans = chat.masked_spans(batch["targets"][row, cols], batch["loss_mask"][row, cols])
        seen += [tokenizer.decode(span) for span in spans]
      assert not batch["loss_mask"][row][seg == 0].any()
  assert segments == len(examples)  # every example exactly once (one epoch, whole)
  assert sorted(seen) == replies


def test_builtin_instruction_set():
  train = instructions.builtin_conversations("train", 400)
  evals = instructions.builtin_conversations("eval", 100)
  assert sum(len(c) >= 4 and c[-1]["role"] == "assistant" for c in train) > 20  # multi-turn
  assert any(c[0]["role"] == "system" for c in train)
  items = instructions.reference_items(evals)
  assert len(items) == 100
  train_questions = {m["content"] for c in train for m in c if m["role"] == "user"}
  assert not train_questions & {it["messages"][-1]["content"] for it in items}
  assert any(it["answer"].isdigit() for it in items) and any(
      not it["answer"].isdigit() for it in items)


def _write(path, lines):
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_jsonl_alpaca_and_chat_forms(tmp_path):
  path = _write(tmp_path / "d.jsonl", [
      json.dumps({"instruction": "Add", "input": "2 and 3", "output": "5"}),
      json.dumps({"instruction": "Greet", "output": "Hi"}),
      "",
      json.dumps({"messages": CONVERSATION}),
  ])
  convs, skipped = instructions.read_jsonl([path])
  assert skipped == 0 and len(convs) == 3
  assert convs[0] == [{"role": "user", "content": "Add\n\n2 and 3"},
                      {"role": "assistant", "content": "5"}]
  assert convs[1][0]["content"] == "Greet" and convs[2] == CONVERSATION


@pytest.mark.parametrize("line, message", [
    ("{not json", r"d.jsonl:2: not valid JSON"),
    ('{"output": "cut off', r"d.jsonl:2: not valid JSON \(Invalid control character at column 20"),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), r"d.jsonl:2: .*role 'bot'"),
    (json.dumps({"prompt": "x"}), r"d.jsonl:2: neither chat form"),
    (json.dumps({"messages": [{"role": "user", "content": "a"},
                              {"role": "system", "content": "b"}]}), r"d.jsonl:2: .*system"),
])
def test_bad_jsonl_lines_name_file_and_line(tmp_path, line, message):
  good = json.dumps({"instruction": "a", "output": "b"})
  path = _write(tmp_path / "d.jsonl", [good, line, good])
  with pytest.raises(DataError, match=message):
    instructions.read_jsonl([path])
  convs, skipped = instructions.read_jsonl([path], skip_bad_lines=True)
  assert len(convs) == 2 and skipped == 1
