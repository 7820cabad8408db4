"""Score texts, conversations or preference pairs with a reward model.

The model is a scorer: a camelid checkpoint from `camelid finetune` with model.objective =
"reward", or a Hugging Face LlamaForSequenceClassification directory. Each record is scored at
its last token; conversations are rendered with the model's chat template, as in finetuning.

--input is JSONL (.gz/.zst too), one record per line, all of one kind (the first line's):
  preference pairs  {"prompt": str, "chosen": str, "rejected": str}
                    {"messages": [{"role", "content"}, ...], "chosen": ..., "rejected": ...}
                    (chosen and rejected: text, or a list of assistant messages)
      prints the accuracy (the share of pairs whose chosen scores higher than its rejected) and
      the mean margin (chosen - rejected); --output gets {"line", "chosen", "rejected", "margin"}
      per pair. A pair whose chosen equals its rejected says nothing: it is skipped and counted.
  texts to score    {"text": str}, {"messages": [...]} or {"prompt": str, "completion": str}
      writes {"line", "score"} per record to --output, or to stdout without it.

examples:
  camelid reward --model runs/rm/model --input pairs.jsonl
  camelid reward --model runs/rm/model-hf --input pairs.jsonl --output scores.jsonl --batch-size 32
  camelid reward --model runs/rm/model --input answers.jsonl > scores.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterator

from camelid.atomic import atomic_file, check_destination
from camelid.cli.common import add_model_arguments, check_model_arguments, model_dtype
from camelid.errors import CamelidError

PAIR = '{"prompt" | "messages", "chosen", "rejected"}'
PLAIN = '{"text"}, {"messages"} or {"prompt", "completion"}'


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, decoding=False)
    p.add_argument("--input", required=True, metavar="FILE.jsonl", help="records to score (see above)")
    p.add_argument("--output", default=None, metavar="OUT.jsonl",
                   help="scores, one JSON object per record (pairs: per pair); without it texts' scores go to "
                        "stdout and pairs print only the summary")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="rows per forward pass (default 16)")


# ---- records ------------------------------------------------------------------------------------
# A thin reader of the published pair keys; the preference data of camelid.align.preference
# should take its place once both exist.

def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    from camelid.data.sources import json_problem, open_binary

    with open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise CamelidError(f"{where}: not UTF-8 text (byte {e.start}); --input is JSONL") from None
            except json.JSONDecodeError as e:
                raise CamelidError(f"{where}: not valid JSON ({json_problem(e)}); --input is JSONL, one JSON "
                                   "object per line") from None
            if not isinstance(record, dict):
                raise CamelidError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield number, record


def record_kind(record: dict, where: str) -> str:
    if "chosen" in record or "rejected" in record:
        return "pair"
    for kind, keys in (("text", ("text",)), ("chat", ("messages",)), ("prompt_completion", ("prompt", "completion"))):
        if all(k in record for k in keys):
            return kind
    raise CamelidError(f"{where}: a record of no known shape (keys: {sorted(record)}); expected a preference pair "
                       f"{PAIR} or a text to score {PLAIN}")


def _turns(value: Any, role: str, key: str, where: str) -> list[dict]:
    """A pair's prompt or completion as messages: text becomes one message of `role`."""
    if isinstance(value, str):
        if not value.strip():
            raise CamelidError(f"{where}: {key!r} is empty; remove the record or fill it in")
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise CamelidError(f"{where}: {key!r} must be text or a non-empty list of {{'role', 'content'}} messages")
    return value


def pair_conversations(record: dict, where: str) -> tuple[list[dict], list[dict]]:
    """(prompt + chosen, prompt + rejected) of a pair record, unchecked."""
    prompt_keys = [k for k in ("prompt", "messages") if k in record]
    missing = [k for k in ("chosen", "rejected") if k not in record]
    missing += [] if prompt_keys else ['"prompt" or "messages"']
    if missing:
        raise CamelidError(f"{where}: a preference pair without {', '.join(missing)}; a pair is {PAIR}")
    if len(prompt_keys) == 2:
        raise CamelidError(f"{where}: both 'prompt' and 'messages'; give the conversation before the answers once")
    prompt = _turns(record[prompt_keys[0]], "user", prompt_keys[0], where)
    return (prompt + _turns(record["chosen"], "assistant", "chosen", where),
            prompt + _turns(record["rejected"], "assistant", "rejected", where))


def read_input(path: Path) -> tuple[str, list[tuple[int, list]]]:
    """("pair" | "plain", [(line, items)]): a pair's items are its two conversations, a plain
    record's its one text or conversation. Pairs whose chosen equals rejected are left out."""
    from camelid.finetune.records import check_conversation, to_messages

    if path.is_dir():
        raise CamelidError(f"--input {path}: is a directory; give a JSONL file")
    if not path.is_file():
        raise CamelidError(f"--input {path}: no such file")
    first, out, ties = None, [], []
    for line, record in jsonl_records(path):
        where = f"{path}:{line}"
        kind = record_kind(record, where)
        group = "pair" if kind == "pair" else "plain"
        if first is None:
            first = group
        elif group != first:
            raise CamelidError(f"{where}: a {'preference pair' if group == 'pair' else 'text to score'} in a file "
                               f"of {'preference pairs' if first == 'pair' else 'texts to score'} (its first "
                               "record's kind); score them in separate files")
        if kind == "pair":
            chosen, rejected = (check_conversation(c, f"{where} ({k})")
                                for c, k in zip(pair_conversations(record, where), ("chosen", "rejected")))
            if chosen == rejected:
                ties.append(line)
                continue
            out.append((line, [chosen, rejected]))
        elif kind == "text":
            if not isinstance(record["text"], str) or not record["text"].strip():
                raise CamelidError(f"{where}: 'text' must be non-empty text")
            out.append((line, [record["text"]]))
        else:
            out.append((line, [check_conversation(record["messages"], where) if kind == "chat"
                               else to_messages(record, kind, where)]))
    if first is None:
        raise CamelidError(f"--input {path}: no records (empty file?)")
    if not out:
        raise CamelidError(f"--input {path}: every pair's chosen equals its rejected; nothing to score")
    if ties:
        shown = ", ".join(map(str, ties[:5])) + (", ..." if len(ties) > 5 else "")
        print(f"camelid reward: warning: skipped {len(ties)} pair(s) whose chosen equals rejected (line {shown})",
              file=sys.stderr)
    return first, out


# ---- the command ----------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> int:
    from camelid.align.reward_model import RewardModel

    # everything that can be checked is, before the model loads
    if args.batch_size < 1:
        raise CamelidError(f"--batch-size must be >= 1 (got {args.batch_size})")
    device = check_model_arguments(args)
    path = Path(args.input)
    if args.output is not None:
        out_path = check_destination(args.output, "--output")
        if out_path.exists() and out_path.resolve() == path.resolve():
            raise CamelidError(f"--output {out_path}: is the --input file; write the scores elsewhere")
    kind, records = read_input(path)
    rm = RewardModel.load(args.model, device=device, dtype=model_dtype(args, device), quantize=args.quantize,
                          group_size=args.group_size, adapter=args.adapter, progress=sys.stderr.isatty())
    if kind == "pair" and rm.config.num_labels != 1:
        raise CamelidError(f"--model {args.model}: a scorer of {rm.config.num_labels} labels; preference pairs need "
                           "a reward model of one")
    rows = []
    for line, items in records:
        for k, item in enumerate(items):
            where = f"{path}:{line}" + ((" (chosen)", " (rejected)")[k] if kind == "pair" else "")
            ids = rm.encode(item, where)
            rm.check_row(ids, where)
            rows.append(ids)
    scores = rm.score_tokens(rows, args.batch_size, progress=sys.stderr.isatty() and len(rows) > args.batch_size)
    if kind == "pair":
        return _report_pairs(args, [line for line, _ in records], scores.view(-1, 2))
    lines = [json.dumps({"line": line, "score": s}) for (line, _), s in zip(records, scores.tolist())]
    _emit(args, lines)
    mean = scores.mean(0).tolist()
    print(f"scored {len(lines)} record(s), mean score {mean:.4f}" if isinstance(mean, float) else
          f"scored {len(lines)} record(s), mean scores {[round(m, 4) for m in mean]}", file=sys.stderr)
    return 0


def _report_pairs(args: argparse.Namespace, lines: list[int], scores) -> int:
    chosen, rejected = scores[:, 0], scores[:, 1]
    margin = chosen - rejected
    correct = int((margin > 0).sum())
    n = len(lines)
    print(f"{n} pair(s): accuracy {correct / n:.4f} (chosen scored higher in {correct}), mean margin "
          f"{margin.mean().item():.4f} (chosen {chosen.mean().item():.4f}, rejected {rejected.mean().item():.4f})")
    if args.output is not None:
        _emit(args, [json.dumps({"line": line, "chosen": c, "rejected": r, "margin": c - r})
                     for line, c, r in zip(lines, chosen.tolist(), rejected.tolist())])
    return 0


def _emit(args: argparse.Namespace, lines: list[str]) -> None:
    text = "".join(line + "\n" for line in lines)
    if args.output is None:
        sys.stdout.write(text)
        return
    with atomic_file(args.output, "w") as f:
        f.write(text)  # type: ignore[attr-defined]
    print(f"wrote {args.output}", file=sys.stderr)
