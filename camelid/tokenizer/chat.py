"""Chat formats: the model's own Jinja template (GGUF `tokenizer.chat_template`, Hugging Face
`tokenizer_config.json`), else a built-in format chosen from the vocabulary: ChatML,
Llama-3 headers, or Llama-2's `[INST]` format (Meta's `chat_completion`).

Rendering needs the template and the special tokens' text, not the tokenizer: the tokenizer
passes them in (`Tokenizer.apply_chat_template`).
"""

from __future__ import annotations

import datetime
import functools
import json
from typing import Collection

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from camelid.errors import CamelidError
from camelid.tokenizer.text import replace_invalid

ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages: object) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise CamelidError("chat messages: expected a non-empty list of {'role': ..., 'content': ...}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or m.get("role") not in ROLES:
            raise CamelidError(f"chat messages[{i}]: expected {{'role': one of {ROLES}, 'content': str}}, got {m!r}")
    return messages


def render(messages: list[dict[str, str]], add_generation_prompt: bool, template: str | None,
           bos: str | None, eos: str | None, specials: Collection[str] = ()) -> str:
    """The conversation as text: with `template` (Jinja) if given, else in the built-in format
    that the special tokens (`specials`, the vocabulary's markup) point to. `bos` and `eos` are
    the text of those tokens, None where the tokenizer has none."""
    check_messages(messages)
    # the rendered text goes to tokenizers and to clients (the server's prompt echo): cleaned once here
    if template:
        text = render_jinja(template, messages, add_generation_prompt, bos_token=bos or "", eos_token=eos or "")
    elif builtin_format(specials) == "ChatML":
        text = chatml(messages, add_generation_prompt)
    elif builtin_format(specials) == "Llama-3":
        text = llama3(messages, add_generation_prompt, bos or "")
    else:
        text = llama2(messages, bos or "<s>", eos or "</s>", add_generation_prompt)
    return replace_invalid(text)


def builtin_format(specials: Collection[str]) -> str:
    """The built-in format for a vocabulary without a template: "ChatML", "Llama-3" or "Llama-2"."""
    if "<|im_start|>" in specials:
        return "ChatML"
    return "Llama-3" if "<|start_header_id|>" in specials else "Llama-2"


# ---- Jinja templates, rendered as transformers does ---------------------------------------------

def _raise(message: str) -> None:
    raise CamelidError(f"chat template: {message}")


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise CamelidError(f"chat template: cannot parse it ({e})") from None


def render_jinja(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                 bos_token: str, eos_token: str) -> str:
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as e:
        raise CamelidError(f"chat template: rendering failed ({e})") from None


# ---- built-in formats -------------------------------------------------------------------------

def chatml(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def llama3(messages: list[dict[str, str]], add_generation_prompt: bool, bos: str) -> str:
    text = bos + "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                         for m in messages)
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def llama2(messages: list[dict[str, str]], bos: str, eos: str, add_generation_prompt: bool = True) -> str:
    """Meta's Llama-2 chat format: every exchange `BOS[INST] user [/INST] answer EOS`, the system
    prompt folded into the first user turn, contents stripped; ends with an open [INST] turn for
    the answer to come. Without a generation prompt a conversation may also end with the
    assistant's answer: the whole exchanges, as Meta's finetuning data has them."""
    msgs = list(messages)
    if msgs[0]["role"] == "system":
        if len(msgs) < 2:
            raise CamelidError("chat messages: a system message must be followed by a user message")
        msgs = [{"role": "user", "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}] + msgs[2:]
    if [m["role"] for m in msgs[::2]] != ["user"] * len(msgs[::2]) or \
            [m["role"] for m in msgs[1::2]] != ["assistant"] * len(msgs[1::2]):
        raise CamelidError("chat messages: Llama-2 format needs user/assistant turns alternating, user first")
    if msgs[-1]["role"] != "user" and add_generation_prompt:
        raise CamelidError("chat messages: the last message must come from the user")
    text = ""
    for user, answer in zip(msgs[::2], msgs[1::2]):
        text += f"{bos}{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} {eos}"
    if msgs[-1]["role"] == "assistant":
        return text
    return text + f"{bos}{B_INST} {msgs[-1]['content'].strip()} {E_INST}"
