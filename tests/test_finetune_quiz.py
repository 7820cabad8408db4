"""The demo's instruction set (camelid/finetune/quiz.py): deterministic, disjoint splits, files
that the chat readers and `camelid eval` accept, four choices of the gold's kind, atomic."""

import json
from pathlib import Path

import pytest

from camelid.errors import CamelidError
from camelid.eval.tasks import get_task
from camelid.eval.tasks.generic import JsonlChatGeneration, JsonlChatMultipleChoice
from camelid.finetune import quiz
from camelid.tokenizer.chat import check_messages


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return quiz.build_quiz(tmp_path_factory.mktemp("quiz") / "q", seed=0)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def question(record: dict) -> str:
    return record["messages"][0]["content"]


def test_the_build_is_deterministic(built, tmp_path):
    again = quiz.build_quiz(tmp_path / "again", seed=0)
    other = quiz.build_quiz(tmp_path / "other", seed=1)
    for name in ("train", "val", "heldout", "heldout-answers"):
        assert again[name].read_bytes() == built[name].read_bytes()
        assert other[name].read_bytes() != built[name].read_bytes()


def test_sizes_fit_a_short_finetune(built):
    sizes = {name: len(rows(path)) for name, path in built.items()}
    assert 2000 <= sizes["train"] <= 5000 and 100 <= sizes["val"] <= 500 and 200 <= sizes["heldout"] <= 600
    kinds = {q.split("\n")[0] for q in map(question, rows(built["heldout"]))}
    assert kinds == {quiz.PASSAGE_QUESTION.split("\n")[0], quiz.FUNCTION_QUESTION.split("\n")[0]}


def test_splits_share_no_passage_or_function(built):
    questions = {name: [question(r) for r in rows(path)] for name, path in built.items()}
    for name, qs in questions.items():
        assert len(set(qs)) == len(qs), f"{name} repeats a question"
    assert not set(questions["heldout"]) & (set(questions["train"]) | set(questions["val"]))
    assert not set(questions["val"]) & set(questions["train"])
    # functions by name too: the same function never appears twice, whatever its snippet
    names = {name: {q.split("def ", 1)[1].split("(")[0] for q in qs if q.startswith(quiz.FUNCTION_QUESTION[:20])}
             for name, qs in questions.items()}
    assert not names["heldout"] & (names["train"] | names["val"]) and not names["val"] & names["train"]


def test_chat_records_validate(built):
    for name in ("train", "val"):
        for r in rows(built[name]):
            assert set(r) == {"messages"}
            check_messages(r["messages"])
            assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
            assert all(m["content"].strip() for m in r["messages"])


def bare(answer: str) -> str:
    """The label an answer gives, in either form."""
    for label, author in quiz.AUTHOR_OF.items():
        if answer == f"{label}, by {author}.":
            return label
    return answer[len("The "):-len(" module.")] if answer.startswith("The ") and answer.endswith(" module.") else answer


def test_demonstrations_answer_in_two_forms(built):
    """Mostly the bare label, in about FULL_FORM_SHARE of them the full form (the author named,
    a module called a module), drawn independently of the question's kind."""
    answers = [(question(r), r["messages"][1]["content"]) for r in rows(built["train"])]
    full = [(q, a) for q, a in answers if bare(a) != a]
    assert abs(len(full) / len(answers) - quiz.FULL_FORM_SHARE) < 0.04
    assert {a.endswith(("Shakespeare.", "Milton.")) for q, a in full if q.startswith(quiz.PASSAGE_QUESTION[:20])} \
        == {True}
    assert any(a.endswith(" module.") for _, a in full)
    assert quiz.full_answer("Paradise Lost", "work") == "Paradise Lost, by John Milton."
    assert quiz.full_answer("Hamlet", "work") == "Hamlet, by William Shakespeare."
    assert quiz.full_answer("json", "module") == "The json module."


def test_heldout_is_four_choices_of_the_gold_kind(built):
    train = rows(built["train"])
    labels = {kind: {bare(r["messages"][1]["content"]) for r in train if question(r).startswith(prefix[:20])}
              for kind, prefix in (("work", quiz.PASSAGE_QUESTION), ("module", quiz.FUNCTION_QUESTION))}
    assert len(labels["work"]) == len(quiz.WORKS) and len(labels["module"]) >= 8
    golds = []
    for r in rows(built["heldout"]):
        assert set(r) == {"messages", "choices", "gold"} and [m["role"] for m in r["messages"]] == ["user"]
        assert len(r["choices"]) == 4 == len(set(r["choices"])) and 0 <= r["gold"] < 4
        kind = "work" if question(r).startswith(quiz.PASSAGE_QUESTION[:20]) else "module"
        assert set(r["choices"]) <= labels[kind]   # distractors of the same kind, every label trained on
        golds.append(r["gold"])
    assert {0, 1, 2, 3} == set(golds)              # the gold's position varies
    task = get_task(str(built["heldout"]))         # what `camelid eval --tasks heldout.jsonl` reads
    assert isinstance(task, JsonlChatMultipleChoice) and len(task.docs()) == len(golds)


def test_the_build_is_all_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "q"
    quiz.build_quiz(target, seed=0, passages_per_work=2, functions_per_module=2, heldout_per_label=1)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    writes, original = [], Path.write_text

    def failing_write(self, *args, **kwargs):   # the second file of the new build cannot be written
        writes.append(self.name)
        if len(writes) == 2:
            raise OSError("disk full")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_write)
    with pytest.raises(OSError, match="disk full"):
        quiz.build_quiz(target, seed=1, passages_per_work=2, functions_per_module=2, heldout_per_label=1)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["q"]   # no temporary directory left behind


def test_a_directory_with_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CamelidError, match=r"holds other files \(notes\.txt\)"):
        quiz.build_quiz(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_heldout_answers_ask_the_heldout_questions_for_the_gold_label_preferring_its_full_form(built):
    choices, answers = rows(built["heldout"]), rows(built["heldout-answers"])
    assert len(answers) == len(choices)
    for c, a in zip(choices, answers):
        assert set(a) == {"messages", "answers", "preferred"} and a["messages"] == c["messages"]
        gold = c["choices"][c["gold"]]
        kind = "work" if question(c).startswith(quiz.PASSAGE_QUESTION[:20]) else "module"
        assert a["answers"] == [gold, quiz.full_answer(gold, kind)] and a["preferred"] == [quiz.full_answer(gold, kind)]
    task = get_task(str(built["heldout-answers"]))   # chat generation, graded by exact match and preference
    assert isinstance(task, JsonlChatGeneration) and len(task.docs()) == len(answers)
    assert task.preferred(task.docs()[0]) == answers[0]["preferred"]
