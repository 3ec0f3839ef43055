"""`llmjax-generate`: continue prompts, or chat, with the latest checkpoint of a run.

  llmjax-generate --workdir=runs/tiny --prompt="Alice has a" --prompt="3 + 4 ="
  llmjax-generate --workdir=runs/tiny_chat --chat          # interactive, one turn per line
  echo "Where does Alice live?" | llmjax-generate --workdir=runs/tiny_chat --chat

In chat mode the template is the one the SFT stage recorded in the checkpoint (or
--chat_template); each line read from stdin is a user turn, and the reply joins the history.
An empty line or end of input ends the chat; `/reset` clears the history.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from absl import app, flags

from llmjax.cli import common
from llmjax.errors import LlmjaxError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A training run's directory.")
flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable); all run as one batch.")
flags.DEFINE_bool("chat", False, "Interactive chat on stdin with the run's chat template.")
flags.DEFINE_string("chat_template", None, "Template for --chat (default: the checkpoint's).")
flags.DEFINE_string("system", None, "A system message for --chat.")
flags.DEFINE_string("stage", None, "Which stage's checkpoint (default: the last stage of "
                    "the run's pipeline, in run.json).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_integer("max_new_tokens", 48, "Tokens to generate per prompt.")
flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0 = all).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = all).")
flags.DEFINE_multi_string("stop", [], "Stop strings (repeatable).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def _sample_kwargs() -> dict[str, Any]:
  return dict(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
              top_k=FLAGS.top_k, top_p=FLAGS.top_p, stop_strings=FLAGS.stop, seed=FLAGS.seed)


def chat_loop(sampler: Any, tokenizer: Any, template: str, lines: TextIO, out: TextIO,
              system: str | None = None, **sample_kwargs) -> list[dict[str, str]]:
  """Reads user turns from `lines`, writes replies to `out`; returns the conversation."""
  from llmjax.data import chat
  start = [{"role": "system", "content": system}] if system else []
  messages = list(start)
  for line in lines:
    text = line.rstrip("\n")
    if not text.strip():
      break
    if text.strip() == "/reset":
      messages = list(start)
      continue
    messages.append({"role": "user", "content": text})
    prompt = chat.prompt_ids(messages, template, tokenizer)
    reply = sampler.sample([prompt], **sample_kwargs).texts[0][0]
    messages.append({"role": "assistant", "content": reply})
    print(f"assistant: {reply}", file=out, flush=True)
  return messages


def main(argv):
  if not FLAGS.workdir or not (FLAGS.prompt or FLAGS.chat):
    raise app.UsageError("--workdir and either --chat or at least one --prompt are required")
  from llmjax.runs.load import load_run
  from llmjax.data import chat
  from llmjax.sample.sampler import Sampler
  from llmjax.model.reward import refuse_generation
  run = load_run(FLAGS.workdir, FLAGS.stage, FLAGS.step)
  refuse_generation(run.model_cfg, f"{FLAGS.workdir} (stage {run.stage}, step {run.step})")
  tokenizer = run.tokenizer
  if tokenizer is None:
    raise LlmjaxError(f"{FLAGS.workdir} has no tokenizer: re-import with its tokenizer")
  print(f"# {run.stage} checkpoint, step {run.step}", file=sys.stderr)
  if FLAGS.chat:
    template = FLAGS.chat_template or run.meta.get("chat_template_name")
    if not template:
      raise LlmjaxError(f"the {run.stage} checkpoint records no chat template (it is not "
                        "an SFT checkpoint): pass --chat_template=chatml or llama3")
    sampler = Sampler(run.graphdef, run.params, tokenizer,
                      eos_ids=chat.stop_token_ids(tokenizer, template))
    if sys.stdin.isatty():
      print(f"# chat ({template}); an empty line ends, /reset clears", file=sys.stderr)
    chat_loop(sampler, tokenizer, template, sys.stdin, sys.stdout, FLAGS.system,
              **_sample_kwargs())
    return
  sampler = Sampler(run.graphdef, run.params, tokenizer)
  prompts = [tokenizer.encode(p, add_bos=True) for p in FLAGS.prompt]
  out = sampler.sample(prompts, num_samples=FLAGS.num_samples, **_sample_kwargs())
  for prompt, texts in zip(FLAGS.prompt, out.texts):
    for text in texts:
      print(f"{prompt}{text}")


def run_main():
  common.run(main)


if __name__ == "__main__":
  run_main()
