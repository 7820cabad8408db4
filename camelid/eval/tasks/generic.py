"""Tasks from files: multiple-choice and generation JSONL (each plain, or chat: a conversation
rendered with the model's chat template), BIG-bench task.json, and plain text for perplexity.
Every malformed record is reported with its file and line."""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

from camelid.data.sources import json_problem
from camelid.errors import CamelidError
from camelid.eval.requests import Loglikelihood, chat_requests
from camelid.eval.scoring import Scorer
from camelid.eval.tasks.base import Doc, GenerationTask, MultipleChoiceTask, PerplexityTask, Settings
from camelid.tokenizer.chat import check_messages


def jsonl_records(path: Path) -> list[tuple[int, dict]]:
    """A JSONL file's objects, each with its line number; a bad line is named in the error."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CamelidError(f"{path}:{number}: not valid JSON ({json_problem(e)})") from None
            if not isinstance(record, dict):
                raise CamelidError(f"{path}:{number}: expected a JSON object")
            out.append((number, record))
    if not out:
        raise CamelidError(f"{path}: no records")
    return out


def _require(path: Path, number: int, record: dict, key: str, kind: type | tuple) -> object:
    if key not in record:
        raise CamelidError(f"{path}:{number}: missing field {key!r}")
    if not isinstance(record[key], kind) or isinstance(record[key], bool) and kind is int:
        raise CamelidError(f"{path}:{number}: field {key!r} must be {getattr(kind, '__name__', kind)}")
    return record[key]


def _choices_and_gold(path: Path, number: int, r: dict) -> None:
    choices = _require(path, number, r, "choices", list)
    gold = _require(path, number, r, "gold", int)
    if not choices or not all(isinstance(c, str) for c in choices):
        raise CamelidError(f"{path}:{number}: 'choices' must be a non-empty list of strings")
    if not 0 <= gold < len(choices):
        raise CamelidError(f"{path}:{number}: gold {gold} is out of range for {len(choices)} choices")


class JsonlMultipleChoice(MultipleChoiceTask):
    """{"query": str, "choices": [str], "gold": int}: each choice is scored as " " + choice, or
    as written when it already starts with whitespace (lm-evaluation-harness style " Paris")."""

    keep_leading_whitespace = True

    def __init__(self, path: Path):
        self.path, self.name = path, path.stem

    @cached_property
    def _docs(self) -> list[Doc]:
        docs = []
        for number, r in jsonl_records(self.path):
            self.check(number, r)
            _choices_and_gold(self.path, number, r)
            docs.append(r)
        return docs

    def check(self, number: int, r: dict) -> None:
        _require(self.path, number, r, "query", str)

    def docs(self):
        return self._docs

    def prompt(self, doc):
        return doc["query"]

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return doc["gold"]


def _check_chat(path: Path, number: int, r: dict, answer_key: str) -> None:
    """A chat record's messages: valid, and ending before the answer (the field `answer_key` holds it)."""
    messages = _require(path, number, r, "messages", list)
    try:
        check_messages(messages)
    except CamelidError as e:
        raise CamelidError(f"{path}:{number}: {e}") from None
    if messages[-1]["role"] == "assistant":
        raise CamelidError(f"{path}:{number}: the last message is the assistant's; leave the answer "
                           f"out (the field {answer_key!r} holds it)")


def _answers(path: Path, number: int, r: dict) -> dict:
    """The record with its 'answers' (a string or a list of strings) as a list, and its optional
    'preferred' (the same: right answers that the rule ranks above the other right answers) as a
    list that 'answers' holds too."""
    def strings(key: str) -> list[str]:
        value = _require(path, number, r, key, (list, str))
        value = [value] if isinstance(value, str) else value
        if not value or not all(isinstance(a, str) for a in value):
            raise CamelidError(f"{path}:{number}: {key!r} must be a string or a non-empty list of strings")
        return value

    answers = strings("answers")
    preferred = strings("preferred") if "preferred" in r else []
    answers = answers + [a for a in preferred if a not in answers]
    return dict(r, answers=answers, preferred=preferred)


def _chat_shots(task, doc: Doc, index: int, k: int, seed: int, pool: list[Doc]) -> list[dict[str, str]]:
    """k solved examples as earlier user/assistant turns."""
    return [m for e in task.fewshot_examples(doc, index, k, seed, pool)
            for m in (*e["messages"], {"role": "assistant", "content": task.target(e)})]


class JsonlChatMultipleChoice(JsonlMultipleChoice):
    """{"messages": [{"role", "content"}, ...], "choices": [str], "gold": int}: the context is
    the conversation rendered with the model's chat template and its generation prompt, and
    each choice is the assistant's answer, scored as the template writes one (see
    `chat_requests`). Few-shot examples become earlier user/assistant turns."""

    keep_leading_whitespace = False

    def check(self, number: int, r: dict) -> None:
        _check_chat(self.path, number, r, "choices")

    def prompt(self, doc):
        return doc["messages"][-1]["content"]

    def choice_requests(self, doc: Doc, index: int, k: int, settings: Settings, pool: list[Doc],
                        scorer: Scorer) -> list[Loglikelihood]:
        shots = _chat_shots(self, doc, index, k, settings.seed, pool)
        return chat_requests(scorer.tok, shots + doc["messages"], self.choices(doc))


class JsonlGeneration(GenerationTask):
    """{"prompt": str, "answers": [str] or str, "preferred"?: [str] or str}: greedy until a line
    break, exact match; "preferred" names the right answers a grading rule ranks first (they are
    right answers too), reported as the `preferred` metric."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.stem

    @cached_property
    def _docs(self) -> list[Doc]:
        docs = []
        for number, r in jsonl_records(self.path):
            _require(self.path, number, r, "prompt", str)
            docs.append(_answers(self.path, number, r))
        return docs

    def docs(self):
        return self._docs

    def prompt(self, doc):
        return doc["prompt"]

    def answers(self, doc):
        return doc["answers"]

    def preferred(self, doc):
        return doc["preferred"]


class JsonlChatGeneration(JsonlGeneration):
    """{"messages": [{"role", "content"}, ...], "answers": [str] or str, "preferred"?: ...}: the
    conversation rendered with the model's chat template and its generation prompt, answered
    greedily until the model ends its turn (its end-of-turn tokens stop generation), exact match
    against any answer (and `preferred` as JsonlGeneration's). Few-shot examples become earlier
    user/assistant turns."""

    chat = True
    stop = ()

    @cached_property
    def _docs(self) -> list[Doc]:
        docs = []
        for number, r in jsonl_records(self.path):
            _check_chat(self.path, number, r, "answers")
            docs.append(_answers(self.path, number, r))
        return docs

    def prompt(self, doc):
        return doc["messages"][-1]["content"]

    def generation_context(self, doc: Doc, index: int, k: int, seed: int, pool: list[Doc], scorer: Scorer) -> str:
        shots = _chat_shots(self, doc, index, k, seed, pool)
        return scorer.tok.apply_chat_template(shots + doc["messages"], add_generation_prompt=True)


class BigBench:
    """A BIG-bench task.json: multiple choice when examples carry target_scores, else exact
    match against target(s); formatted with the file's prefixes (BIG-bench's defaults)."""

    def __new__(cls, path: Path):
        try:
            spec = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CamelidError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        examples = spec.get("examples")
        if not isinstance(examples, list) or not examples:
            raise CamelidError(f"{path}: no 'examples' list")
        prefix = spec.get("task_prefix", "")
        q = spec.get("example_input_prefix", "\nQ: ")
        a = spec.get("example_output_prefix", "\nA: ").rstrip(" ")
        docs = []
        for i, ex in enumerate(examples):
            if "input" not in ex:
                raise CamelidError(f"{path}: examples[{i}] has no 'input'")
            doc = {"query": (prefix + q + ex["input"] + a).lstrip("\n")}
            if "target_scores" in ex:
                doc["choices"] = list(ex["target_scores"])
                scores = list(ex["target_scores"].values())
                doc["gold"] = scores.index(max(scores))
            elif "target" in ex:
                target = ex["target"]
                doc["answers"] = [target] if isinstance(target, str) else list(target)
            else:
                raise CamelidError(f"{path}: examples[{i}] has neither 'target_scores' nor 'target'")
            docs.append(doc)
        multiple_choice = "choices" in docs[0]
        if any(("choices" in d) != multiple_choice for d in docs):
            raise CamelidError(f"{path}: mixes multiple-choice and generative examples")
        task = _BigBenchChoice() if multiple_choice else _BigBenchGenerate()
        task.name, task._docs = spec.get("name", path.parent.name if path.name == "task.json" else path.stem), docs
        return task


class _BigBenchChoice(MultipleChoiceTask):
    keep_leading_whitespace = True

    def docs(self):
        return self._docs

    def prompt(self, doc):
        return doc["query"]

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return doc["gold"]


class _BigBenchGenerate(GenerationTask):
    def docs(self):
        return self._docs

    def prompt(self, doc):
        return doc["query"]

    def answers(self, doc):
        return doc["answers"]


class TextPerplexity(PerplexityTask):
    """Plain text files (a file, a directory, or .gz/.zst), one document per file."""

    def __init__(self, path: Path):
        self.path, self.name = path, path.stem

    def docs(self):
        from camelid.data.sources import expand_paths, read_documents

        return [{"text": d.text} for f in expand_paths([str(self.path)], Path.cwd(), self.name)
                for d in read_documents(f, self.name)]


def task_from_file(path: Path):
    name = path.name.lower()
    if name.endswith(".jsonl"):
        first = jsonl_records(path)[0][1]
        if "messages" in first:
            return JsonlChatGeneration(path) if "answers" in first else JsonlChatMultipleChoice(path)
        multiple_choice = bool({"query", "choices", "gold"} & set(first))
        return JsonlMultipleChoice(path) if multiple_choice else JsonlGeneration(path)
    if name.endswith(".json"):
        return BigBench(path)
    return TextPerplexity(path)
