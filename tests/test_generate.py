import os
import subprocess
import sys

import pytest
import torch

from camelid.errors import CamelidError
from camelid.generate import LLM, Engine, SamplingParams, TokenGenerator, sample
from camelid.generate.sampling import top_p_probs
from camelid.tokenizer import StreamDecoder
from test_model import tiny


@pytest.fixture(scope="module")
def tiny_llm(bpe_tokenizer):
    model = tiny("tiny")
    return LLM(model, bpe_tokenizer, compile=False)


def test_top_p_follows_metas_rule():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    # cumulative before each token (sorted): 0, 0.5, 0.8, 0.95 -> with p=0.7 keep 0.5 and 0.3
    torch.testing.assert_close(top_p_probs(probs, 0.7), torch.tensor([[0.0, 0.625, 0.0, 0.375]]))
    # the most likely token always survives, even when it alone exceeds p
    torch.testing.assert_close(top_p_probs(probs, 0.49), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    # p=1 keeps everything
    torch.testing.assert_close(top_p_probs(probs, 1.0), probs)


def test_sampling_is_seeded_and_greedy_is_argmax():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(temperature=0)), logits.argmax(-1))
    p = SamplingParams(temperature=1.0, top_p=0.95)
    a = sample(logits, p, torch.Generator().manual_seed(5))
    b = sample(logits, p, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    draws = torch.stack([sample(logits, SamplingParams(1.0, 1.0, top_k=3), torch.Generator().manual_seed(s))
                         for s in range(50)])
    top3 = logits.topk(3).indices
    assert all(torch.isin(draws[:, r], top3[r]).all() for r in range(4))


def test_sampling_frequencies_match_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]]))
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(logits, SamplingParams(1.0, 1.0), gen) for _ in range(4000)]).flatten()
    freq = torch.bincount(draws, minlength=3).float() / 4000
    torch.testing.assert_close(freq, torch.tensor([0.6, 0.3, 0.1]), atol=0.03, rtol=0)


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(tiny_llm):
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12, 13, 14, 15], [99]]
    batched = tiny_llm.generate_batch(prompts, max_new_tokens=12, temperature=0)
    for p, b in zip(prompts, batched):
        single = tiny_llm.generate_batch([p], max_new_tokens=12, temperature=0)[0]
        assert single.tokens == b.tokens


def test_batched_logits_equal_single_logits():
    engine = Engine(tiny("tiny"))
    prompts = [[5, 17, 42], [7, 8, 9, 10, 11, 12]]
    seen = []
    prefill, decode = engine.prefill, engine.decode
    engine.prefill = lambda *a, **k: seen.append(prefill(*a, **k)) or seen[-1]
    engine.decode = lambda *a, **k: seen.append(decode(*a, **k)) or seen[-1]
    list(TokenGenerator(engine, prompts, 5, SamplingParams(0)))
    batched = torch.stack(seen)                                          # [steps, B, V]
    for row, p in enumerate(prompts):
        seen.clear()
        list(TokenGenerator(engine, [p], 5, SamplingParams(0)))
        torch.testing.assert_close(batched[:, row], torch.stack(seen)[:, 0], atol=1e-5, rtol=1e-5)


def test_sampling_params_and_keywords_are_one_setting():
    params = SamplingParams(temperature=0, max_new_tokens=7, stop="\n")
    assert params.stop == ("\n",) and params.updated(max_new_tokens=3).max_new_tokens == 3
    with pytest.raises(CamelidError, match="unknown generation setting.*max_tokens"):
        params.updated(max_tokens=3)
    with pytest.raises(CamelidError, match="max_new_tokens must be >= 0"):
        SamplingParams(max_new_tokens=-1)


def test_llm_methods_take_sampling_params_or_keywords(tiny_llm):
    params = SamplingParams(temperature=0, max_new_tokens=9)
    by_params = tiny_llm.generate_batch(["Shall I"], params)[0]
    assert len(by_params.tokens) == 9
    assert tiny_llm.generate("Shall I", params) == by_params.text
    assert tiny_llm.generate("Shall I", max_new_tokens=9, temperature=0) == by_params.text
    assert tiny_llm.generate("Shall I", params, max_new_tokens=4) == tiny_llm.generate("Shall I", params.updated(
        max_new_tokens=4))
    assert "".join(tiny_llm.stream("Shall I", params)) == by_params.text
    with pytest.raises(CamelidError, match="SamplingParams"):
        tiny_llm.generate("Shall I", 9)


def test_stop_token_and_stop_string(tiny_llm, bpe_tokenizer):
    free = tiny_llm.generate_batch(["Shall I"], max_new_tokens=10, temperature=0)[0]
    assert free.finish_reason == "length" and len(free.tokens) == 10
    stop_token = free.tokens[3]
    tok = bpe_tokenizer
    saved = tok.extra_stop_ids
    tok.extra_stop_ids = frozenset({stop_token})
    try:
        stopped = tiny_llm.generate_batch(["Shall I"], max_new_tokens=10, temperature=0)[0]
    finally:
        tok.extra_stop_ids = saved
    assert stopped.finish_reason == "stop"
    assert stopped.tokens[: free.tokens.index(stop_token)] == free.tokens[: free.tokens.index(stop_token)]
    assert stopped.text == tok.decode(free.tokens[: free.tokens.index(stop_token)])
    # a stop string cuts the text where it starts, even mid-token
    full = free.text
    cut = full[3:6]
    res = tiny_llm.generate_batch(["Shall I"], max_new_tokens=10, temperature=0, stop=[cut])[0]
    assert res.text == full[: full.index(cut)] and res.finish_reason == "stop"


def test_stream_equals_generate(tiny_llm):
    whole = tiny_llm.generate("Shall I compare", max_new_tokens=16, temperature=0.9, seed=3)
    pieces = list(tiny_llm.stream("Shall I compare", max_new_tokens=16, temperature=0.9, seed=3))
    assert "".join(pieces) == whole and len(pieces) > 1


def test_seed_reproducibility(tiny_llm):
    a = tiny_llm.generate("Shall I", max_new_tokens=12, temperature=1.0, seed=11)
    b = tiny_llm.generate("Shall I", max_new_tokens=12, temperature=1.0, seed=11)
    c = tiny_llm.generate("Shall I", max_new_tokens=12, temperature=1.0, seed=12)
    assert a == b and a != c


def test_stream_decoder_keeps_spaces_and_whole_characters(spm_tokenizer):
    tok = spm_tokenizer
    text = "Shall I compare thee \U0001f999 to a summer's day?"
    ids = tok.encode(text)
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    # the llama is spelled with byte tokens: nothing comes out until its last byte
    byte_ids = [i for i in ids if tok.id_to_piece(i).startswith("<0x")]
    assert len(byte_ids) == 4
    # a continuation streamed after a prompt keeps its leading spaces
    prompt, whole = tok.encode("Shall I"), tok.encode("Shall I compare thee")
    assert whole[: len(prompt)] == prompt
    dec = StreamDecoder(tok, prompt)
    assert "".join(dec.push(i) for i in whole[len(prompt):]) == " compare thee"
    # while decoding those tokens alone loses the first space
    assert tok.decode(whole[len(prompt):]) == "compare thee"


@pytest.mark.slow
def test_compiled_decode_equals_eager_and_is_kept_on_disk(bpe_tokenizer, tmp_path):
    eager = LLM(tiny("tiny"), bpe_tokenizer, compile=False)
    compiled = LLM(tiny("tiny"), bpe_tokenizer, compile=False).compile(background=False, cache_dir=tmp_path)
    prompts = ["Shall I compare thee", "Rough"]
    a = eager.generate_batch(prompts, max_new_tokens=8, temperature=0)
    b = compiled.generate_batch(prompts, max_new_tokens=8, temperature=0)
    assert [r.tokens for r in a] == [r.tokens for r in b]
    assert compiled.decoder.counts == {"compiled": 1, "loaded": 0} and not compiled.decoder.failed
    # another process (here: another decoder of an equal model) loads the step instead of compiling
    again = LLM(tiny("tiny"), bpe_tokenizer, compile=False).compile(background=False, cache_dir=tmp_path)
    assert [r.tokens for r in again.generate_batch(prompts, max_new_tokens=8, temperature=0)] == [r.tokens for r in a]
    assert again.decoder.counts == {"compiled": 0, "loaded": 1}
    # a model of another structure (tied head) does not pick up that step
    tied = LLM(tiny("tiny-tied"), bpe_tokenizer, compile=False).compile(background=False, cache_dir=tmp_path)
    tied.generate_batch(prompts, max_new_tokens=4, temperature=0)
    assert tied.decoder.counts == {"compiled": 1, "loaded": 0}
    assert len(list(tmp_path.glob("decode-*.bin"))) == 2


@pytest.mark.slow
@pytest.mark.multiproc
def test_background_compilation_never_holds_up_decoding(bpe_tokenizer, tmp_path):
    llm = LLM(tiny("tiny-tied"), bpe_tokenizer, compile=False).compile(cache_dir=tmp_path)
    eager = LLM(tiny("tiny-tied"), bpe_tokenizer, compile=False)
    reference = eager.generate("Shall I", max_new_tokens=40, temperature=0)
    short = llm.generate("Shall I", max_new_tokens=8, temperature=0)   # below COMPILE_AFTER: nothing starts
    assert not llm.decoder.building and not llm.decoder.steps and reference.startswith(short)
    assert llm.generate("Shall I", max_new_tokens=40, temperature=0) == reference  # eager: asks for the step
    assert len(llm.decoder.building) == 1 and llm.engine.decode_steps["compiled"] == 0  # built once it ended
    llm.decoder.wait()                                     # the compiling process saved the step: taken
    assert len(llm.decoder.steps) == 1 and not llm.decoder.failed, [p.read_text() for p in tmp_path.glob("*.log")]
    assert llm.decoder.counts == {"compiled": 0, "loaded": 1}
    assert llm.generate("Shall I", max_new_tokens=40, temperature=0) == reference  # compiled now
    assert llm.engine.decode_steps["compiled"] == 39


def test_compiled_decoder_reuses_its_cache_and_falls_back_to_eager(bpe_tokenizer):
    llm = LLM(tiny("tiny-tied"), bpe_tokenizer, compile=False).compile(background=False, cache_dir=None)
    llm.generate_batch(["Shall I compare thee"], max_new_tokens=4, temperature=0)
    cache = llm.engine._cache
    assert cache.max_len == 256
    llm.generate_batch(["Rough"], max_new_tokens=8, temperature=0)
    assert llm.engine._cache is cache                      # a shorter request: same shapes, no recompile
    assert len(llm.decoder.steps) == 1
    assert "output.weight" not in llm.model.state_dict()   # the tied head stays tied

    def broken(*args):
        raise RuntimeError("inductor is unavailable")

    reference = LLM(tiny("tiny-tied"), bpe_tokenizer, compile=False).generate_batch(
        ["Rough winds"], max_new_tokens=6, temperature=0)
    llm.decoder.steps = dict.fromkeys(llm.decoder.steps, broken)
    with pytest.warns(UserWarning, match="continuing without compilation"):
        again = llm.generate_batch(["Rough winds"], max_new_tokens=6, temperature=0)
    assert again[0].tokens == reference[0].tokens


def test_generations_in_flight_together_never_share_a_cache(bpe_tokenizer):
    """Two generations interleaved on one engine (two threads, or a stream not read to the
    end): each gets its own KV cache, also when compilation keeps one cache for reuse."""
    engine = Engine(tiny("tiny"))
    engine.compile(cache_dir=None)        # keeps a cache between calls; short runs build nothing
    prompts = [[5, 17, 42], [7, 8, 9, 10]]
    alone = [[t[0] for t in TokenGenerator(engine, [p], 10, SamplingParams(0))] for p in prompts]
    a, b = (iter(TokenGenerator(engine, [p], 10, SamplingParams(0))) for p in prompts)
    together = [[], []]
    for step_a, step_b in zip(a, b):
        together[0].append(step_a[0])
        together[1].append(step_b[0])
    assert together == alone


def test_a_model_changed_after_compile_gets_a_new_compiled_decoder(bpe_tokenizer):
    from camelid.quant import quantize_model

    llm = LLM(tiny("tiny"), bpe_tokenizer, compile=False).compile(cache_dir=None)
    before = llm.decoder
    quantize_model(llm.model, "int8")
    expected = LLM(quantize_model(tiny("tiny"), "int8"), bpe_tokenizer, compile=False).generate(
        "Shall I", max_new_tokens=6, temperature=0)
    assert llm.generate("Shall I", max_new_tokens=6, temperature=0) == expected
    assert llm.decoder is not before and llm.decoder.matches(llm.model)


def test_a_build_lock_of_a_dead_process_is_taken_over(tmp_path):
    from camelid.generate.compiled import _alive

    lock = tmp_path / "decode-x.lock"
    assert not _alive(lock)
    lock.write_text(str(os.getpid()))
    assert _alive(lock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))
    assert not _alive(lock)


# ---- speculative decoding ---------------------------------------------------------------------

def test_rejection_rule_samples_the_target_distribution():
    from camelid.generate.speculative import accept_or_resample

    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.6, 0.1, 0.2])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    n = 20000
    for _ in range(n):
        drafted = int(torch.multinomial(q, 1, generator=gen))
        counts[accept_or_resample(p, q, drafted, gen)[1]] += 1
    assert torch.allclose(counts / n, p, atol=0.015), counts / n


@pytest.mark.parametrize("num_draft", [1, 3, 5])
def test_speculative_greedy_equals_the_target_alone(bpe_tokenizer, num_draft):
    target = LLM(tiny("tiny", seed=0), bpe_tokenizer, compile=False)
    prompt = "Shall I compare thee"
    expected = target.generate(prompt, max_new_tokens=24, temperature=0)
    # a draft that is often wrong (other weights) and one that is always right (the target)
    for draft in (LLM(tiny("tiny-tied", seed=7), bpe_tokenizer, compile=False), target):
        target.use_draft(draft, num_draft)
        assert target.generate(prompt, max_new_tokens=24, temperature=0) == expected
        rounds = target.generator.rounds
        assert rounds.drafted > 0 and (draft is not target or rounds.acceptance == 1.0)
    target.use_draft(None)


def test_speculative_sampling_is_seeded_and_checks_the_vocabulary(bpe_tokenizer, spm_tokenizer):
    target = LLM(tiny("tiny"), bpe_tokenizer, compile=False).use_draft(
        LLM(tiny("tiny", seed=3), bpe_tokenizer, compile=False), 3)
    a = target.generate("Hello", max_new_tokens=16, temperature=0.9, seed=11)
    assert a == target.generate("Hello", max_new_tokens=16, temperature=0.9, seed=11)
    other = LLM(tiny("tiny"), spm_tokenizer.with_added_tokens({512: ("<|extra|>", True)}),  # vocabulary of 513
                compile=False)
    with pytest.raises(CamelidError, match="vocabulary"):
        target.use_draft(other)
