"""The end of a run: text generated from the recipe's [sample] prompts by the model just
written, with camelid's one generation path (the same load and generate a user's
`camelid generate` takes), printed and kept in the run directory as samples.json."""

from __future__ import annotations

import json
from pathlib import Path

import camelid
from camelid.atomic import write_text_atomic
from camelid.train.config import SampleSection

SAMPLES = "samples.json"


def write_samples(model_dir: Path, sample: SampleSection, run_dir: Path, seed: int = 0,
                  device: str = "cpu") -> list[dict[str, str]]:
    """{"prompt", "text"} for each of sample.prompts (none: nothing is loaded or written), also
    written to run_dir/samples.json with the settings that made them."""
    if not sample.prompts:
        return []
    llm = camelid.load(model_dir, device=device, compile=False)  # a few short samples: not worth compiling
    # one prompt at a time, so that each sample depends on its prompt and the seed only
    settings = {"max_new_tokens": sample.max_new_tokens, "temperature": sample.temperature, "seed": seed}
    samples = [{"prompt": p, "text": llm.chat([{"role": "user", "content": p}], **settings) if sample.chat
                else llm.generate(p, **settings)} for p in sample.prompts]
    record = {"model": str(model_dir), **settings, "chat": sample.chat, "samples": samples}
    write_text_atomic(Path(run_dir) / SAMPLES, json.dumps(record, indent=2, allow_nan=False) + "\n")
    return samples


def format_samples(samples: list[dict[str, str]], chat: bool = False) -> str:
    """The samples as the terminal shows them: each prompt followed by its continuation, or
    (chat) by the assistant's answer on the next line."""
    return "".join(f"\n--- {s['prompt']}{chr(10) if chat else ''}{s['text']}\n" for s in samples)
