"""`camelid data prepare` on Ray writes what the local run writes, byte for byte."""

import json
import random
import sys

import pytest

from camelid.data import load_recipe, prepare
from camelid.errors import CamelidError
from helpers import CORPUS

LINES = [ln for ln in CORPUS.splitlines() if ln.strip()]
SHORT = "The fox and the dog sat in the sun all day, and that was the end of the story."
GERMAN = "Der schnelle braune Fuchs springt über den faulen Hund, und der Hund war darüber nicht erfreut. " * 4


def corpus(d):
    """The corpus of tests/test_data.py, with something for every stage to do: exact and near
    copies, another language, short pages, code under licences that are not allowed."""
    rng = random.Random(0)
    prose = [" ".join(rng.sample(LINES, 8)) + f" {i}" for i in range(160)]
    prose += [prose[3].upper(), "  " + prose[7] + "\u00a0", prose[11].replace(" ", " x ", 1), GERMAN, SHORT]
    rng.shuffle(prose)
    (d / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in prose))
    code = [{"text": f"# Copyright {i}\n# MIT licence\n\ndef f{i}(x):\n    return x * {i}\n",
             "license": "gpl-3.0" if i % 9 == 0 else "mit"} for i in range(300)]
    (d / "b.jsonl").write_text("".join(json.dumps(c) + "\n" for c in code))


def recipe_text(d, out, backend):
    return f'''
budget_tokens = 100000
[output]
dir = "{out}"
val_fraction = 0.1
workers = 2
shard_tokens = 4000
backend = "{backend}"
[tokenizer]
vocab_size = 512
[[sources]]
name = "prose"
paths = ["{d / 'a.jsonl'}"]
weight = 3
stages = ["normalize", "exact_dedup", "near_dedup", "langid", "quality"]
quality = {{ min_words = 20 }}
near_dedup = {{ threshold = 0.8 }}
[[sources]]
name = "code"
paths = ["{d / 'b.jsonl'}"]
weight = 1
stages = ["normalize", "exact_dedup", "code"]
'''


def files(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "report.json"}


@pytest.mark.slow
@pytest.mark.multiproc
def test_ray_writes_what_the_local_run_writes(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray", reason="needs Ray: pip install 'camelid[ray]'")
    from camelid.data.ray_backend import RayExecutor

    corpus(tmp_path)
    runs = {b: tmp_path / b for b in ("local", "ray")}
    for backend, out in runs.items():
        (tmp_path / f"{backend}.toml").write_text(recipe_text(tmp_path, out, backend))
    prepare(load_recipe(tmp_path / "local.toml"), progress=False)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=256 << 20)
    try:
        monkeypatch.setattr(RayExecutor, "batch", 7)  # many small tasks in flight, finishing out of order
        prepare(load_recipe(tmp_path / "ray.toml"), progress=False)
        assert ray.is_initialized()  # a Ray the caller started is left running for the caller
    finally:
        ray.shutdown()
    local, remote = files(runs["local"]), files(runs["ray"])
    assert sorted(local) == sorted(remote)
    assert any(k.startswith("tokens/prose/val_") for k in local) and len([k for k in local if "train_" in k]) > 2
    for name in local:  # token shards, manifest, tokenizer, cleaned text
        assert local[name] == remote[name], name
    reports = [json.loads((runs[b] / "report.json").read_text()) for b in ("local", "ray")]
    assert reports[0]["stages"] == reports[1]["stages"]
    dropped = {(r["source"], r["stage"]): r["dropped"] for r in reports[0]["stages"]}
    # every stage had something to do
    assert dropped[("prose", "exact_dedup")] == {"duplicate": 2} and dropped[("prose", "langid")] == {"language_de": 1}
    assert dropped[("prose", "near_dedup")] == {"near_duplicate": 1}
    assert dropped[("prose", "quality")] == {"too_few_words": 1}
    assert dropped[("code", "code")] == {"license": 34}
    for r in reports:  # the recipes differ only where they must
        r["recipe"]["output"].pop("dir"), r["recipe"]["output"].pop("backend")
    assert reports[0]["recipe"] == reports[1]["recipe"]


def test_without_ray_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # "import ray" now fails as if it were missing
    corpus(tmp_path)
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tmp_path, tmp_path / "out", "ray"))
    with pytest.raises(CamelidError, match=r"pip install 'camelid\[ray\]'"):
        prepare(load_recipe(path), progress=False)
    path.write_text(recipe_text(tmp_path, tmp_path / "out", "spark"))
    with pytest.raises(CamelidError, match=r"output\.backend must be one of \['local', 'ray'\]"):
        load_recipe(path)


def test_the_ray_flag_sets_the_backend(tmp_path, monkeypatch):
    from camelid.cli import data
    from camelid.cli.main import main

    corpus(tmp_path)
    path = tmp_path / "r.toml"
    path.write_text(recipe_text(tmp_path, tmp_path / "out", "local"))
    seen = []
    monkeypatch.setattr(data, "prepare", lambda recipe, **kw: seen.append(recipe.output))
    assert main(["data", "prepare", str(path), "--ray"]) == 0
    assert main(["data", "prepare", str(path), "--ray", "ray://head:10001", "--output.workers=3"]) == 0
    assert main(["data", "prepare", str(path)]) == 0
    assert [(o.backend, o.ray_address) for o in seen] == [("ray", ""), ("ray", "ray://head:10001"), ("local", "")]
    assert seen[1].workers == 3
