"""Preference pairs (camelid.align.preference): the record forms, their mistakes named by file and
line, rendering with a shared prompt and marked completions, lengths and ties counted, batches of
chosen and rejected rows padded together, and the demo's pairs built from the quiz."""

from __future__ import annotations

import itertools
import json

import pytest

from camelid.align.preference import (FORM_PAIRS, Pair, PairLoader, PairRecord, build_preferences, encode_pair,
                                      fit_pairs, load_hf_pairs, read_pairs)
from camelid.errors import CamelidError
from camelid.finetune.data import IGNORE, Example
from camelid.finetune.records import read_records

USER = {"role": "user", "content": "Which number goes with gold?"}
SYSTEM = {"role": "system", "content": "Answer briefly."}


def answer(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ---- the record forms --------------------------------------------------------------------------

def test_the_record_forms_become_a_prompt_and_two_answers(tmp_path):
    rows = [
        {"prompt": USER["content"], "chosen": "gold 3", "rejected": "gold 4"},                     # text
        {"messages": [SYSTEM, USER], "chosen": answer("gold 3"), "rejected": [answer("gold 4")]},  # dict, list
        {"prompt": [SYSTEM, USER], "chosen": [SYSTEM, USER, answer("gold 3")],                   # UltraFeedback:
         "rejected": [SYSTEM, USER, answer("gold 4")]},                                           # the prompt repeated
        {"chosen": [USER, answer("gold 3")], "rejected": [USER, answer("gold 4")]},              # TRL's implicit prompt
    ]
    pairs = read_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [p.prompt for p in pairs] == [[USER], [SYSTEM, USER], [SYSTEM, USER], [USER]]
    assert all(p.chosen == [answer("gold 3")] and p.rejected == [answer("gold 4")] for p in pairs)
    assert [p.where for p in pairs] == [f"{tmp_path / 'p.jsonl'}:{i}" for i in range(1, 5)]


def test_parquet_and_the_hugging_face_loader(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}] * 2
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    assert [(p.prompt, p.chosen) for p in read_pairs(tmp_path / "p.parquet")] == \
        [([{"role": "user", "content": "Q?"}], [answer("yes")])] * 2
    pytest.importorskip("datasets")
    d = tmp_path / "hf"
    d.mkdir()
    write_jsonl(d / "train.jsonl", rows + [{"prompt": "Q?", "chosen": "yes"}])
    with pytest.raises(CamelidError, match=r"train\] row 3: no 'rejected' field"):
        load_hf_pairs(str(d))
    write_jsonl(d / "train.jsonl", rows)
    assert len(load_hf_pairs(str(d), split="train")) == 2


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q?", "chosen": "yes"}, "no 'rejected' field"),
    ({"prompt": "Q?", "rejected": "no"}, "no 'chosen' field"),
    ({"messages": [USER, answer("x")]}, r"an instruction record \(chat format\) where preference pairs"),
    ({"prompt": "Q?", "chosen": "", "rejected": "no"}, "'chosen' is empty"),
    ({"prompt": "Q?", "chosen": "yes", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "Q?", "chosen": answer(" "), "rejected": "no"}, "'chosen' is empty"),
    ({"prompt": "Q?", "chosen": [], "rejected": "no"}, "'chosen' holds no assistant message"),
    ({"prompt": " ", "chosen": "yes", "rejected": "no"}, "'prompt' is empty"),
    ({"prompt": 3, "chosen": "yes", "rejected": "no"}, "'prompt' must be text or a list of messages"),
    ({"prompt": [USER, answer("a")], "chosen": "yes", "rejected": "no"}, "the prompt ends with an assistant turn"),
    ({"prompt": "Q?", "chosen": {"role": "user", "content": "x"}, "rejected": "no"},
     "'chosen' must be the assistant's answer"),
    ({"prompt": "Q?", "chosen": [USER, answer("yes")], "rejected": "no"}, "not the record's prompt"),
    ({"chosen": [USER, answer("yes")], "rejected": [SYSTEM, USER, answer("no")]}, "different prompts"),
    ({"chosen": "yes", "rejected": "no"}, "no 'prompt' or 'messages' field"),
    ({"messages": [{"role": "human", "content": "hi"}], "chosen": "yes", "rejected": "no"}, "unknown role 'human'"),
    ("[1, 2]", "expected a JSON object"),
    ("not json", r"not valid JSON .*preference data is JSONL"),
])
def test_bad_records_name_the_file_and_line(tmp_path, record, message):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}, "", record])
    with pytest.raises(CamelidError, match=rf"p\.jsonl:3: .*{message}"):
        read_pairs(path)


def test_files_that_are_not_preference_data(tmp_path):
    (tmp_path / "p.csv").write_text("prompt,chosen,rejected\nQ?,yes,no\n")
    with pytest.raises(CamelidError, match=r"p\.csv:1: not valid JSON .*preference data is JSONL .* or Parquet"):
        read_pairs(tmp_path / "p.csv")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(CamelidError, match="no records"):
        read_pairs(tmp_path / "e.jsonl")
    with pytest.raises(CamelidError, match="no such file"):
        read_pairs(tmp_path / "none.jsonl")
    # and the other way round: pairs where instructions are expected say which objective takes them
    write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "yes", "rejected": "no"}])
    with pytest.raises(CamelidError, match=r"p\.jsonl:1: a preference pair .* model.objective = \"reward\" or \"dpo\""):
        read_records(tmp_path / "p.jsonl")


# ---- rendering, lengths and ties ---------------------------------------------------------------

def test_the_prompt_is_shared_and_the_completions_marked_with_their_end_of_turn(spm_tokenizer):
    record = PairRecord([SYSTEM, USER, answer("gold 3"), USER], [answer("gold 6")], [answer("no idea at all")], "x:1")
    pair = encode_pair(record, spm_tokenizer)
    c, r = pair.chosen, pair.rejected
    assert c.ids[:pair.prompt_len] == r.ids[:pair.prompt_len] and c.ids[pair.prompt_len] != r.ids[pair.prompt_len]
    for ex, text in ((c, "gold 6"), (r, "no idea at all")):
        marked = [t for t, keep in zip(ex.ids, ex.trainable) if keep]
        assert ex.trainable == [False] * pair.prompt_len + [True] * (len(ex.ids) - pair.prompt_len)
        assert marked[-1] == spm_tokenizer.eos_id                  # Llama-2's end of turn: the model learns to stop
        assert spm_tokenizer.decode(marked[:-1]).strip() == text   # the earlier answer in the prompt is not marked
    whole = spm_tokenizer.encode_chat(record.prompt + record.chosen, add_generation_prompt=False)
    assert c.ids == whole


def test_a_template_error_names_the_record(spm_tokenizer):
    record = PairRecord([USER], [answer("a"), answer("b")], [answer("c")], "p.jsonl:7")
    with pytest.raises(CamelidError, match=r"p\.jsonl:7: .*alternating"):
        encode_pair(record, spm_tokenizer)


def test_fit_pairs_truncates_the_completions_drops_and_counts_ties(spm_tokenizer):
    def pair(prompt, chosen, rejected):
        return encode_pair(PairRecord([{"role": "user", "content": prompt}], [answer(chosen)], [answer(rejected)],
                                      "x:1"), spm_tokenizer)

    short = pair("Q?", "yes", "no")
    tie = pair("Q?", "same", " same ")          # the template strips contents: the same tokens
    long = pair("Q?", "summer " * 30, "winds " * 40)
    long_prompt = pair("summer " * 60, "yes", "no")
    n = long.prompt_len + 12
    kept, counts = fit_pairs([short, tie, long, long_prompt], n, "truncate")
    assert counts == {"kept": 2, "truncated": 1, "dropped": 1, "ties": 1}
    assert kept[0] is short and len(kept[1].chosen.ids) == len(kept[1].rejected.ids) == n
    assert kept[1].chosen.ids[:n] == long.chosen.ids[:n] and kept[1].chosen.trainable[-1]
    kept, counts = fit_pairs([short, tie, long, long_prompt], n, "drop")
    assert counts == {"kept": 1, "truncated": 0, "dropped": 2, "ties": 1} and kept == [short]
    same_start = pair("Q?", "summer " * 30 + "gold", "summer " * 30 + "time")   # alike until past the cut
    assert fit_pairs([same_start], n, "truncate")[1]["dropped"] == 1


# ---- batches --------------------------------------------------------------------------------------

def example(ids, prompt):
    return Example(ids, [False] * prompt + [True] * (len(ids) - prompt))


def test_a_batch_holds_the_chosen_rows_then_the_rejected_rows_padded_together():
    pairs = [Pair(example([1, 5, 6, 7, 2], 3), example([1, 5, 6, 9, 9, 9, 9, 2], 3), 3),
             Pair(example([1, 4, 8, 2], 2), example([1, 4, 3, 2], 2), 2)]
    loader = PairLoader(pairs, seq_len=64, batch_size=2, shuffle=False, split="val")
    b = next(loader.one_pass())
    assert b.inputs.shape == (4, 8) and b.index.tolist() == [0, 1] and b.lengths.tolist() == [5, 4, 8, 4]
    assert b.inputs[0].tolist() == [1, 5, 6, 7, 2, 0, 0, 0] and b.inputs[2].tolist() == [1, 5, 6, 9, 9, 9, 9, 2]
    # targets: the next token where it is a completion token, else IGNORE (the prompt, the end, padding)
    assert b.targets[0].tolist() == [IGNORE, IGNORE, 7, 2] + [IGNORE] * 4
    assert b.targets[3].tolist() == [IGNORE, 3, 2] + [IGNORE] * 5
    assert b.last().tolist() == [4, 3, 7, 3]
    # validation's last batch is topped up with empty slots
    loader = PairLoader(pairs, seq_len=64, batch_size=3, shuffle=False, split="val")
    b = next(loader.one_pass())
    assert b.index.tolist() == [0, 1, -1] and b.real.tolist() == [True, True, False] and b.lengths[2] == 0


def test_the_loader_resumes_exactly():
    pairs = [Pair(example([1] + [3 + i % 5] * (2 + i % 7) + [2], 1), example([1] + [9] * (1 + i % 4) + [2], 1), 1)
             for i in range(30)]
    a = PairLoader(pairs, seq_len=32, batch_size=4, seed=5)
    for _ in range(5):
        a.next_batch()
    b = PairLoader(pairs, seq_len=32, batch_size=4, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(12):   # across the epoch's end
        x, y = a.next_batch(), b.next_batch()
        assert x.index.tolist() == y.index.tolist() and x.inputs.equal(y.inputs)
    with pytest.raises(CamelidError, match="no train pairs"):
        PairLoader([], seq_len=32, batch_size=4)


# ---- the demo's pairs -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_preferences(tmp_path_factory.mktemp("pref") / "data", seed=0)


def rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_demo_prefers_the_right_attribution_then_the_full_answer(built, tmp_path):
    from camelid.finetune import quiz

    splits = quiz.collect(0)    # the instruction demo's questions
    answers = {i.question: i for i in quiz.collect(0, 120, 60)["train"]}
    train, val = rows(built["train"]), rows(built["val"])

    def asked(r):
        return r["messages"][0]["content"]

    assert [asked(r) for r in val] == [i.question for i in splits["val"]]
    assert 2000 < len(train) <= 40 * 60 + 30 * 20
    seen = {i.question for i in splits["train"] + splits["val"] + splits["heldout"]}
    assert not seen & {asked(r) for r in train}       # questions the instruction demo never trained on
    known = quiz.labels(splits)
    kinds = []
    for r, item in [(r, answers[asked(r)]) for r in train] + list(zip(val, splits["val"])):
        full = quiz.full_answer(item.answer, item.kind)
        if r["rejected"] == item.answer:                 # the rule's second preference: the full form
            assert r["chosen"] == full
            kinds.append("form")
        else:                                            # its first: the right label over a wrong one, any forms
            assert r["chosen"] in (item.answer, full)
            wrong = [x for x in known[item.kind] if x != item.answer]
            assert r["rejected"] in wrong + [quiz.full_answer(x, item.kind) for x in wrong]
            kinds.append((r["chosen"] == full, r["rejected"] in wrong))
    share = kinds.count("form") / len(kinds)
    assert abs(share - FORM_PAIRS) < 0.04
    for forms in itertools.product((True, False), repeat=2):   # a bare right answer beats a full wrong one too
        assert abs(kinds.count(forms) / len(kinds) - (1 - FORM_PAIRS) / 4) < 0.04
    sft = quiz.build_quiz(tmp_path / "quiz", seed=0)
    assert built["heldout-choices"].read_bytes() == sft["heldout"].read_bytes()
    assert built["heldout-answers"].read_bytes() == sft["heldout-answers"].read_bytes()   # the win rate's questions
    choices, held = rows(built["heldout-choices"]), rows(built["heldout"])
    assert len(held) == len(choices) == len(splits["heldout"]) > 100
    for pair, mc, item in zip(held, choices, splits["heldout"]):
        assert pair["messages"] == mc["messages"] and pair["chosen"] in (item.answer, quiz.full_answer(item.answer, item.kind))
        if pair["rejected"] != item.answer:
            wrong = [x for i, x in enumerate(mc["choices"]) if i != mc["gold"]]
            assert pair["rejected"] in wrong + [quiz.full_answer(x, item.kind) for x in wrong]
    assert all(len(read_pairs(built[name])) == len(rows(built[name])) for name in ("train", "val", "heldout"))


def test_the_demo_build_is_deterministic(built, tmp_path):
    again = build_preferences(tmp_path / "again", seed=0)
    assert all(again[name].read_bytes() == path.read_bytes() for name, path in built.items())
