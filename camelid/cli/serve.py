"""Serve a model over an OpenAI-compatible HTTP API, with a chat page at /.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`"stream": true` answers with server-sent events), POST /tokenize ({"prompt"} or {"messages"}:
the token ids) and /detokenize ({"tokens"}: the text), GET /metrics (Prometheus's text format),
and GET / for a chat page in the browser.
Requests are batched continuously: up to --max-batch of them decode together, one token each
per step, and a new request joins between two steps. A request takes a free slot if there is
one; when all are taken, up to --max-queue more wait for one, and beyond that the server
answers 503. The KV cache is a pool of blocks of --block-size tokens (16), allocated once at
start-up and lent to requests as they grow: as many blocks as --max-batch requests of a whole
--context hold, or as --kv-memory GiB hold (`camelid plan MODEL --memory SIZE` says what a card
leaves for it beside the weights). Requests that start with the same tokens (a system prompt,
a chat's earlier turns) share the blocks that hold them, so a follow-up computes only its new
tokens. Should the pool run out, the newest request waits and resumes later, its answer
unchanged.
A request's max_tokens must be below --context; text that is not valid UTF-8 is read as U+FFFD.

examples:
  camelid serve --model smollm2-135m-instruct
  camelid serve --model model.gguf --host 0.0.0.0 --port 8080 --max-batch 16 --context 4096
  camelid serve --model llama-7b --max-batch 32 --kv-memory 6.39   # `camelid plan 7B --memory 24GB`, bfloat16
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64}'
  python -c 'import openai; c = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="x");
             print(c.completions.create(model="smollm2-135m-instruct", prompt="Paris is").choices[0].text)'
"""

from __future__ import annotations

import argparse
import errno
import logging
import math
import signal
import socket
import sys
import threading
from pathlib import Path

from camelid.cli.common import DTYPES, add_model_arguments, load_llm
from camelid.errors import CamelidError
from camelid.plan import DEFAULT_BLOCK_SIZE, gib_bytes, kv_pool

DEFAULT_CONTEXT = 2048  # the paper's context; longer ones cost cache memory for every slot


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, named_adapters=True)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--model-name", default=None, metavar="ID",
                   help="the model id in /v1/models and the one requests must name (default: the file's stem)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="requests decoded together (default 8); the KV cache holds this many whole contexts")
    p.add_argument("--max-queue", type=int, default=64, metavar="N",
                   help="requests that may wait when every slot is taken; more get HTTP 503 (default 64)")
    p.add_argument("--context", type=int, default=None, metavar="TOKENS",
                   help=f"tokens per request, prompt plus reply (default: the model's, at most {DEFAULT_CONTEXT})")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on every route but / and /health (401 otherwise); "
                        "OpenAI clients send it as their api_key")
    p.add_argument("--prefill-chunk", type=int, default=512, metavar="TOKENS",
                   help="prompt tokens prefilled per step (default 512): a longer prompt is prefilled over several "
                        "steps, the other requests decoding between them")
    p.add_argument("--kv-memory", type=float, default=None, metavar="GIB",
                   help="GiB (2^30 bytes; e.g. 4 or 0.5) for the KV cache's pool of blocks (default: what "
                        "--max-batch requests of a whole --context take); more keeps more shared prefixes cached, "
                        "less makes requests that grow long wait their turn and resume; at least one request of the whole "
                        "--context. `camelid plan MODEL --memory SIZE` says what a card leaves for it")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, metavar="TOKENS",
                   help=f"tokens per block of the KV pool (default {DEFAULT_BLOCK_SIZE}): requests share whole blocks "
                        "of a common prefix, and a request's last block is partly empty")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="server log level (default info: one line per request)")


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from camelid.serve import Batcher, create_app

    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue),
                        ("--prefill-chunk", args.prefill_chunk), ("--block-size", args.block_size)):
        if value < 1:
            raise CamelidError(f"{flag} must be >= 1 (got {value})")
    if args.kv_memory is not None and not (math.isfinite(args.kv_memory) and args.kv_memory > 0):
        raise CamelidError(f"--kv-memory {args.kv_memory:g}: must be a number of GiB above 0 (e.g. 4 or 0.5), or "
                           "left out for --max-batch whole contexts")
    if args.api_key is not None and not args.api_key.strip():
        raise CamelidError("--api-key is empty; give the key clients must send, or leave the option out")
    if args.context is not None and args.context < 2:  # the model's own bound is checked once it is loaded
        raise CamelidError(f"--context {args.context}: must be at least 2 tokens")
    _check_port_free(args.host, args.port)
    model_name = args.model_name or Path(args.model).stem
    named, args.adapter = _adapters(args.adapter or [], model_name)
    llm = load_llm(args)
    adapters = _attach(llm, named, args.max_batch)
    context = _context(args.context, llm.config.max_seq_len)
    batcher = Batcher(llm.engine, llm.tokenizer, max_batch=args.max_batch, context=context,
                      max_queue=args.max_queue, prefill_chunk=args.prefill_chunk, block_size=args.block_size,
                      num_blocks=_num_blocks(args.kv_memory, llm, context, args.block_size))
    print(f"camelid serve: {model_name} on http://{args.host}:{args.port} (chat page at /, API at /v1); "
          f"{args.max_batch} slots of up to {context} tokens, KV cache {batcher.cache.nbytes() / 2**20:.0f} MiB "
          f"({batcher.pool.capacity} blocks of {batcher.pool.block_size} tokens)",
          file=sys.stderr, flush=True)
    _log_like_uvicorn(args.log_level)
    if adapters:
        print(f"camelid serve: LoRA adapters served beside {model_name}: {', '.join(adapters)}", file=sys.stderr)
    app = create_app(llm, batcher, model_name, api_key=args.api_key, adapters=adapters, start_worker=False)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=5)
    return _run(_server(config, batcher), batcher)


def _server(config, batcher):
    """uvicorn's server (built here, not at import, so that `camelid --help` does not import uvicorn)."""
    import uvicorn

    return uvicorn.Server(config)


def _run(server, batcher) -> int:
    """HTTP on a thread of its own, the batcher on this one, the thread that loaded the model
    (why: `Batcher.run`). Ctrl-C or SIGTERM stops the batcher, which ends every request in
    flight (503), so that the HTTP server's graceful shutdown does not wait on long streams."""

    def http() -> None:
        try:
            server.run()
        finally:  # stopped, or failed to start: the batcher stops too
            batcher.stop(timeout=0)

    thread = threading.Thread(target=http, name="camelid-http", daemon=True)
    previous = {sig: signal.signal(sig, lambda *_: batcher.stop(timeout=0)) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        thread.start()
        batcher.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.should_exit = True
        thread.join(10)
    if not getattr(server, "started", True):
        print("camelid serve: the HTTP server did not start (see the messages above)", file=sys.stderr)
        return 1
    print("camelid serve: stopped", file=sys.stderr)
    return 0


def _log_like_uvicorn(level: str) -> None:
    """The server's own messages (a client that went away, a failed step) beside uvicorn's."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    log = logging.getLogger("camelid.serve")
    log.addHandler(handler)
    log.setLevel(level.upper())
    log.propagate = False


def _num_blocks(kv_memory: float | None, llm, context: int, block_size: int) -> int | None:
    """The blocks (scratch included) that --kv-memory GiB hold for the model's KV cache; None,
    the Batcher's default, without it."""
    if kv_memory is None:
        return None
    dtype = {v: k for k, v in DTYPES.items()}[llm.engine.dtype]
    pool = kv_pool(llm.config, gib_bytes(kv_memory), context, dtype, block_size)
    if pool.requests < 1:
        least = _gib_up(pool.min_bytes)
        raise CamelidError(f"--kv-memory {kv_memory:g}: too small for one request of the whole context ({context} "
                           f"tokens in {dtype} need {least:g} GiB, the scratch block included); give --kv-memory "
                           f"{least:g} or more, lower --context, or leave --kv-memory out")
    return pool.num_blocks


def _gib_up(n: int) -> float:
    """n bytes in GiB to three significant digits, rounded up: given as --kv-memory, it holds n."""
    digits = max(0, 2 - math.floor(math.log10(n / 2**30)))
    least = math.ceil(n / 2**30 * 10**digits) / 10**digits
    return least if gib_bytes(least) >= n else least + 10**-digits


def _adapters(values: list[str], model_name: str) -> tuple[dict[str, str], str | None]:
    """--adapter values as the named adapters served beside the base ({NAME: DIR}) and the one
    adapter applied to the base itself (a DIR without NAME=), checked before the model loads."""
    from camelid.lora import check_adapter_dir

    def is_named(value: str) -> bool:   # a directory such as runs/lr=3e-4/adapter is not NAME=DIR
        return "=" in value and "/" not in value.partition("=")[0]

    named, plain = {}, [v for v in values if not is_named(v)]
    for value in values:
        if not is_named(value):
            continue
        name, _, directory = value.partition("=")
        if not name or not directory:
            raise CamelidError(f"--adapter {value}: expected NAME=DIR (a model name for requests, then the adapter's "
                               "directory)")
        if name == model_name or name in named:
            raise CamelidError(f"--adapter {value}: the name {name!r} is taken (by the base model or another "
                               "adapter); give each adapter its own name")
        try:
            check_adapter_dir(directory)
        except CamelidError as e:
            raise CamelidError(f"--adapter {name}: {e}") from None
        named[name] = directory
    if len(plain) > 1 or (plain and named):
        raise CamelidError("--adapter: one adapter may be applied to the base (DIR) when no others are served "
                           "beside it; give every adapter as NAME=DIR instead")
    return named, (plain[0] if plain else None)


def _attach(llm, named: dict[str, str], max_batch: int) -> dict[str, int]:
    """The named adapters attached to the loaded model, each's index by name."""
    if not named:
        return {}
    from camelid.lora import attach_adapters

    indexes = attach_adapters(llm.model, named, max_rows=max_batch)
    llm.engine.modules_changed()
    return indexes


def _context(requested: int | None, model_max: int) -> int:
    if requested is None:
        return min(model_max, DEFAULT_CONTEXT)
    if not 2 <= requested <= model_max:
        raise CamelidError(f"--context {requested}: must be between 2 and the model's context, {model_max}")
    return requested


def _check_port_free(host: str, port: int) -> None:
    """Fail before loading the model, not after, when the address cannot be used."""
    if not 0 <= port <= 65535:
        raise CamelidError(f"--port {port}: must be between 0 and 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CamelidError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            hint = "; pick another with --port" if e.errno == errno.EADDRINUSE else ""
            raise CamelidError(f"--host {host} --port {port}: cannot listen there ({e.strerror}){hint}") from None
