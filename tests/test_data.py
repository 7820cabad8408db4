"""Data pipeline stages, sources, malformed input, the loader's mixture and resume."""

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import zstandard

from camelid.data import PackedLoader, load_recipe, prepare
from camelid.data.dedup import ExactDedup, ExactDedupConfig, LineDedup, LineDedupConfig, NearDedup, NearDedupConfig
from camelid.data.filters import (Code, CodeConfig, Drop, LangId, LangIdConfig, Normalize, NormalizeConfig, Quality,
                                  QualityConfig)
from camelid.data.shards import Manifest
from camelid.data.sources import expand_paths, read_documents
from camelid.errors import CamelidError
from helpers import CORPUS

ENGLISH = ("The quick brown fox jumps over the lazy dog, and the dog was not amused with the fox at all. " * 8).strip()


def words(n, seed=0):
    rng = random.Random(seed)
    vocab = ["the", "and", "of", "to", "with", "that", "have", "be"] + [f"w{i}" for i in range(500)]
    return " ".join(rng.choice(vocab) for _ in range(n))


# ---- sources -----------------------------------------------------------------------------------------

def test_formats_compression_dirs_and_globs(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("alpha\n\nbeta paragraph\nstill beta")
    (tmp_path / "d" / "b.txt.gz").write_bytes(gzip.compress(b"gamma"))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        b'{"text": "delta", "license": "mit"}\n\n{"text": "epsilon"}\n'))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["zeta", "eta"]}), tmp_path / "e.parquet")
    files = expand_paths(["d", "*.jsonl.zst"], tmp_path, "s")
    assert [f.name for f in files] == ["a.txt", "b.txt.gz", "c.jsonl.zst"]
    docs = [d.text for f in files for d in read_documents(f, "s")]
    assert docs == ["alpha\n\nbeta paragraph\nstill beta", "gamma", "delta", "epsilon"]
    paras = [d for d in read_documents(files[0], "s", split="paragraph")]
    assert [p.text for p in paras] == ["alpha", "beta paragraph\nstill beta"] and paras[1].where.endswith("a.txt:3")
    assert [d.text for d in read_documents(tmp_path / "e.parquet", "s", text_field="content")] == ["zeta", "eta"]
    meta = list(read_documents(files[2], "s"))[0].meta
    assert meta == {"license": "mit"}


def test_malformed_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(CamelidError, match=r"bad\.jsonl:2: not valid JSON"):
        list(read_documents(bad, "s"))
    assert [d.text for d in read_documents(bad, "s", errors="skip")] == ["fine"]
    nofield = tmp_path / "nofield.jsonl"
    nofield.write_text('{"body": "x"}\n')
    with pytest.raises(CamelidError, match=r"nofield\.jsonl:1: no string field 'text'"):
        list(read_documents(nofield, "s"))
    binary = tmp_path / "latin1.txt"
    binary.write_bytes(b"ok line\ncaf\xe9\n")
    with pytest.raises(CamelidError, match=r"latin1\.txt:2: not valid UTF-8"):
        list(read_documents(binary, "s", split="line"))
    assert [d.text for d in read_documents(binary, "s", split="line", errors="replace")][1] == "caf\ufffd"
    with pytest.raises(CamelidError, match=r"source 'books': path .*missing\.txt does not exist"):
        expand_paths(["missing.txt"], tmp_path, "books")
    with pytest.raises(CamelidError, match=r"matches no files"):
        expand_paths(["*.nothing"], tmp_path, "books")
    truncated = tmp_path / "cut.txt.gz"
    data = gzip.compress(random.Random(0).randbytes(20000))
    truncated.write_bytes(data[:500])
    with pytest.raises(CamelidError, match=r"cut\.txt\.gz: truncated gzip file"):
        list(read_documents(truncated, "s"))


def test_a_source_never_vanishes_silently(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    recipe_path = tmp_path / "r.toml"
    recipe_path.write_text(f'[output]\ndir = "{tmp_path / "out"}"\n[[sources]]\nname = "x"\npaths = ["{tmp_path}/empty.txt"]\n')
    with pytest.raises(CamelidError, match=r"source 'x': its files \(1\) hold no documents"):
        prepare(load_recipe(recipe_path), progress=False)
    assert "empty.txt: no documents" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("too short")
    recipe_path.write_text(f'[output]\ndir = "{tmp_path / "out"}"\n[[sources]]\nname = "x"\n'
                           f'paths = ["{tmp_path}/short.txt"]\nstages = ["quality"]\n')
    with pytest.raises(CamelidError, match=r"stage 'quality' dropped every document \(too_few_words: 1\)"):
        prepare(load_recipe(recipe_path), progress=False)


def test_recipe_errors_name_the_key(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text('[[sources]]\nname = "x"\npaths = ["a"]\nstages = ["normalise"]\n')
    with pytest.raises(CamelidError, match="unknown stage"):
        load_recipe(p)
    p.write_text('[[sources]]\nname = "x"\npaths = ["a"]\nquality = { min_wordz = 3 }\n')
    with pytest.raises(CamelidError, match=r"sources\[0\]\.quality: unknown key\(s\) \['min_wordz'\]"):
        load_recipe(p)


# ---- per-document stages ---------------------------------------------------------------------------------

def test_normalize():
    n = Normalize(NormalizeConfig())
    assert n("cafe\u0301\u00a0ok  \r\nline two   \n\n\n\n\nend\x00") == "caf\u00e9 ok\nline two\n\n\nend"
    assert n(" \n\t\n") == Drop("empty")


@pytest.mark.parametrize("text,reason", [
    ("few words here", "too_few_words"),
    (" ".join(["extraordinarilylongword"] * 60), "mean_word_length"),
    (" ".join(["the #tag and ..."] * 30), "symbol_ratio"),
    ("\n".join(["- the item and with that"] * 30), "bullet_lines"),
    ("\n".join(["the end and with that of the story we told you so ..."] * 30), "ellipsis_lines"),
    (" ".join(["the", "123", "456", "789", "and"] * 20), "alpha_words"),
    (" ".join(["alpha", "beta", "gamma", "delta"] * 20), "stop_words"),
    (ENGLISH + " lorem ipsum dolor", "lorem_ipsum"),
])
def test_quality_heuristics_each_reason(text, reason):
    assert Quality(QualityConfig()).__call__(text) == Drop(reason)


def test_quality_keeps_good_text_and_c4_line_filter():
    assert Quality(QualityConfig())(ENGLISH) == ENGLISH
    c4 = Quality(QualityConfig(c4_lines=True, min_words=5))
    text = ENGLISH + "\nMenu\nEnable javascript to see the site and the rest.\nThe end of it all is near."
    out = c4(text)
    assert "Menu" not in out and "javascript" not in out and out.endswith("The end of it all is near.")


def test_code_filters():
    c = Code(CodeConfig())
    header = "# Copyright 2020 Someone\n# Licensed under the MIT License\n\n"
    assert c(header + "def f(x):\n    return x\n") == "def f(x):\n    return x\n"
    assert c("x = 1\n", {"license": "gpl-3.0"}) == Drop("license")
    assert c("x = 1\n", {"license": "MIT"}) == "x = 1\n"
    assert c("# Generated by protoc. DO NOT EDIT.\nx = 1\n") == Drop("autogenerated")
    assert c("x = '" + "a" * 2000 + "'\n") == Drop("long_line")
    assert c("{}[]();;;,,,..." * 5 + "\n") == Drop("alphanumeric_fraction")


def test_language_identification():
    lid = LangId(LangIdConfig(languages=["en"]))
    assert lid(ENGLISH) == ENGLISH
    german = "Der schnelle braune Fuchs springt über den faulen Hund, und der Hund war darüber nicht erfreut. " * 3
    assert lid(german) == Drop("language_de")
    french = "Le renard brun rapide saute par-dessus le chien paresseux, qui n'en est pas content du tout. " * 3
    assert lid(french) == Drop("language_fr")


# ---- global stages --------------------------------------------------------------------------------------

def run_global(stage, texts):
    for i, t in enumerate(texts):
        stage.observe(i, t)
    stage.finish()
    return [stage(i, t) for i, t in enumerate(texts)]


def test_exact_dedup_keeps_the_first_copy(tmp_path):
    texts = ["Alpha beta", "gamma", "alpha   BETA", "gamma", "delta"]
    out = run_global(ExactDedup(ExactDedupConfig(shards=3), tmp_path), texts)
    assert out == ["Alpha beta", "gamma", Drop("duplicate"), Drop("duplicate"), "delta"]


def test_line_dedup_spills_to_shards_and_removes_boilerplate(tmp_path):
    names = [a + b for a in "abcdefghij" for b in "klmno"]  # no digits: CCNet maps digits to 0
    docs = [f"Cookie notice: we use cookies 2024\nunique line {n}" for n in names]
    docs.append("Cookie notice: we use cookies 1999")  # digits normalised: the same line
    stage = LineDedup(LineDedupConfig(shards=4), tmp_path)
    out = run_global(stage, docs)
    assert out[:50] == [f"unique line {n}" for n in names]
    assert out[50] == Drop("all_lines_duplicate")
    assert len(list((tmp_path / "lines").iterdir())) == 4
    keep = run_global(LineDedup(LineDedupConfig(keep_first=True), tmp_path / "k"), docs[:3])
    assert keep[0].startswith("Cookie notice") and keep[1] == "unique line al"


def test_near_duplicates_at_the_threshold(tmp_path):
    base = words(2000, seed=1).split()

    def variant(fraction, seed):
        w = list(base)
        rng = random.Random(seed)
        for i in rng.sample(range(len(w)), int(len(w) * fraction)):
            w[i] = f"x{rng.randrange(10**9)}"
        return " ".join(w)

    # changing 0.5% of the words keeps ~97% of the 5-grams; 5% keeps ~77%
    texts = [" ".join(base), variant(0.005, 2), variant(0.05, 3), words(2000, seed=9)]
    stage = NearDedup(NearDedupConfig(threshold=0.9, num_perm=256))
    out = run_global(stage, texts)
    assert out[1] == Drop("near_duplicate")
    assert isinstance(out[0], str) and isinstance(out[2], str) and isinstance(out[3], str)


# ---- tokenizer training, shards and the loader ------------------------------------------------------

def test_prepared_shards_and_tokenizer(prepared):
    import sentencepiece

    m = Manifest.load(prepared.directory)
    assert m.dtype == "uint16" and set(m.sources) == {"prose", "code"}
    sp = sentencepiece.SentencePieceProcessor(model_file=str(m.directory / m.tokenizer / "tokenizer.model"))
    assert sp.get_piece_size() == m.vocab_size and sp.bos_id() == 1 and sp.eos_id() == 2
    train = np.concatenate([m.array(s) for s in m.sources["prose"].train])
    assert train[0] == 1 and (train == 2).sum() == (train == 1).sum()  # every document BOS ... EOS
    val_docs = sum(s.documents for s in m.sources["prose"].val)
    assert 0 < val_docs < 120 * 0.3
    assert 0 < m.unigram_entropy() < np.log(m.vocab_size)
    report = json.loads((m.directory / "report.json").read_text())
    assert {r["stage"] for r in report["stages"]} == {"read", "normalize", "exact_dedup"}


def test_mixture_proportions_and_determinism(prepared):
    loader = PackedLoader(prepared, "train", seq_len=16, batch_size=1, seed=3)
    picks = [loader.source_of(i) for i in range(10_000)]
    share = np.bincount(picks) / len(picks)
    assert abs(share[0] - 0.75) < 0.02 and abs(share[1] - 0.25) < 0.02
    a = [PackedLoader(prepared, "train", 16, 4, seed=3).next_batch()[0] for _ in range(2)]
    assert all(torch_equal(x, a[0]) for x in a)


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


def test_loader_resumes_exactly_and_shards_across_ranks(prepared):
    import torch

    ref = PackedLoader(prepared, "train", 16, 4, seed=1)
    batches = [ref.next_batch() for _ in range(30)]
    first = PackedLoader(prepared, "train", 16, 4, seed=1)
    for _ in range(12):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives serialisation
    second = PackedLoader(prepared, "train", 16, 4, seed=1)
    second.load_state_dict(state)
    for k in range(12, 30):
        x, y = second.next_batch()
        assert torch.equal(x, batches[k][0]) and torch.equal(y, batches[k][1])
    assert torch.equal(batches[0][0][0, 1:], batches[0][1][0, :-1])  # targets are inputs shifted
    # two ranks together see exactly what one rank sees, split by draw
    whole = PackedLoader(prepared, "train", 16, 2, seed=5)
    rows = torch.cat([whole.next_batch()[0] for _ in range(4)])
    r0 = PackedLoader(prepared, "train", 16, 1, seed=5, rank=0, world_size=2)
    r1 = PackedLoader(prepared, "train", 16, 1, seed=5, rank=1, world_size=2)
    split = torch.stack([torch.cat([r0.next_batch()[0], r1.next_batch()[0]]) for _ in range(4)]).flatten(0, 1)
    assert torch.equal(rows, split)


def test_epochs_cover_every_window_once(prepared):
    loader = PackedLoader(prepared, "train", 16, 1, seed=0, weights={"prose": 1.0, "code": 1e-9})
    stream = loader.streams[0]
    seen = []
    read = stream.window
    stream.window = lambda k, length: seen.append(k) or read(k, length)
    for _ in range(stream.windows):
        loader.next_batch()
    assert sorted(seen) == list(range(stream.windows)) and loader.epochs()["prose"] == 1.0


def test_table1_is_printed(prepared, capsys):
    from camelid.data.shards import table1

    text = table1(prepared, 100_000)
    assert "Sampling prop." in text and "75.0%" in text and "Epochs" in text
