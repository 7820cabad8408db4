"""Judges (camelid.eval.judges): a causal LM asked GPT-judge's question, camelid's and
transformers' sequence classifiers, and the Perspective API client against a local stand-in of
its HTTP interface. Every probability is checked against one computed by hand from the model's
own logits; the client's requests, rate bound, retries and refusals are read off the stand-in."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import torch

from camelid.align.reward_model import RewardModel
from camelid.atomic import atomic_dir
from camelid.checkpoint.native import write_native
from camelid.errors import CamelidError
from camelid.eval.judges import (CamelidClassifier, HFClassifier, LMJudge, PerspectiveScorer, check_judge,
                                 open_judge)
from camelid.eval.requests import encode_pair
from camelid.eval.scoring import Scorer
from camelid.generate import LLM
from test_model import tiny
from test_reward_model import native_scorer

TEXTS = ["Q: Shall I compare thee to a summer's day?\nA: Thou art more lovely.\nTrue:",
         "Q: What is 1609?\nA: A year.\nTrue:",
         "Q: Who wrote the sonnet?\nA: I have no comment.\nTrue:"]


# ---- shared builders (the task tests use them too) --------------------------------------------------

def native_lm(directory: Path, tokenizer, seed: int = 0):
    """A tiny random camelid language model written as a camelid checkpoint."""
    model = tiny("tiny", seed=seed)
    with atomic_dir(directory) as tmp:
        write_native(tmp, model.config, tokenizer, model.state_dict().items())
    return model


def continuation_logprob(model, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) from one plain forward pass of the model."""
    pair = encode_pair(tokenizer, context, continuation)
    ids = pair.context + pair.continuation
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([ids]))[0].float(), dim=-1)
    return sum(float(logp[i - 1, ids[i]]) for i in range(len(pair.context), len(ids)))


def yes_probability(model, tokenizer, text: str) -> float:
    """GPT-judge's answer, by hand: P(" yes") / (P(" yes") + P(" no"))."""
    yes, no = (math.exp(continuation_logprob(model, tokenizer, text, a)) for a in (" yes", " no"))
    return yes / (yes + no)


def classifier_logits(model, tokenizer, text: str) -> torch.Tensor:
    """The scorer's head at the last token of the text, one text at a time."""
    ids = tokenizer.encode(text, bos=tokenizer.add_bos)
    with torch.inference_mode():
        return model.head(model.hidden(torch.tensor([ids]))[0, -1]).float()


class Standin:
    """A local stand-in of Perspective's comments:analyze: answers from `replies` in turn (then
    200s), TOXICITY = score(text); records each request's time, path, query and body."""

    def __init__(self, score=lambda text: min(1.0, len(text) / 100), replies=()):
        self.score, self.replies, self.seen = score, list(replies), []
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                url = urlparse(self.path)
                standin.seen.append({"t": time.monotonic(), "path": url.path, "query": parse_qs(url.query),
                                     "body": body})
                status = standin.replies.pop(0) if standin.replies else 200
                if status == 200:
                    answer = {"attributeScores": {"TOXICITY": {"summaryScore": {
                        "value": standin.score(body["comment"]["text"]), "type": "PROBABILITY"}}},
                        "languages": ["en"]}
                else:
                    answer = {"error": {"code": status, "message": f"stand-in says {status}"}}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1alpha1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def standin():
    servers = []

    def start(**kwargs):
        servers.append(Standin(**kwargs))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


# ---- a causal LM as the judge ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory, bpe_tokenizer):
    d = tmp_path_factory.mktemp("judge") / "lm"
    native_lm(d, bpe_tokenizer, seed=3)
    return d


def test_lm_judge_is_yes_against_no_from_the_models_logits(bpe_tokenizer):
    model = tiny("tiny", seed=3)
    judge = LMJudge(Scorer(LLM(model, bpe_tokenizer, compile=False)))
    got = judge.probabilities(TEXTS)
    want = [yes_probability(model, bpe_tokenizer, t) for t in TEXTS]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(round(p, 6) for p in got)) == len(TEXTS)   # the texts matter


def test_a_language_model_path_opens_as_an_lm_judge(lm_dir, bpe_tokenizer):
    assert check_judge(str(lm_dir), "truth") == "lm"
    judge = open_judge(str(lm_dir), "truth")
    assert isinstance(judge, LMJudge)
    model = tiny("tiny", seed=3)
    assert judge.probabilities(TEXTS[:1]) == pytest.approx([yes_probability(model, bpe_tokenizer, TEXTS[0])],
                                                           abs=1e-5)


# ---- camelid's classifiers ---------------------------------------------------------------------------

@pytest.mark.parametrize("labels, label, index", [(1, None, 0), (2, None, 1), (3, "LABEL_2", 2), (3, "0", 0)])
def test_camelid_classifier_sigmoid_or_softmax(tmp_path, bpe_tokenizer, labels, label, index):
    model = native_scorer(tmp_path / "clf", bpe_tokenizer, num_labels=labels)
    judge = open_judge(str(tmp_path / "clf"), "toxicity", label)
    assert isinstance(judge, CamelidClassifier) and judge.index == index
    got = judge.probabilities(TEXTS)
    for text, p in zip(TEXTS, got):
        logits = classifier_logits(model, bpe_tokenizer, text)
        want = torch.sigmoid(logits[0]) if labels == 1 else torch.softmax(logits, -1)[index]
        assert p == pytest.approx(float(want), abs=1e-5)


def test_a_camelid_classifier_with_many_labels_needs_one_named(tmp_path, bpe_tokenizer):
    native_scorer(tmp_path / "clf", bpe_tokenizer, num_labels=3)
    with pytest.raises(CamelidError, match="--toxicity-label"):
        check_judge(str(tmp_path / "clf"), "toxicity")
    with pytest.raises(CamelidError, match="no label 'LABEL_7'"):
        check_judge(str(tmp_path / "clf"), "toxicity", "LABEL_7")


def test_a_long_text_keeps_its_end(tmp_path, bpe_tokenizer):
    native_scorer(tmp_path / "clf", bpe_tokenizer)
    judge = CamelidClassifier(RewardModel.load(tmp_path / "clf"))
    long = "thee " * 200 + "summer"
    (p,) = judge.probabilities([long])
    ids = bpe_tokenizer.encode(long, bos=bpe_tokenizer.add_bos)[-64:]
    with torch.inference_mode():
        want = torch.sigmoid(judge.model.model.head(judge.model.model.hidden(torch.tensor([ids]))[0, -1]))
    assert p == pytest.approx(float(want), abs=1e-5)


# ---- transformers classifiers ---------------------------------------------------------------------------

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "q", "a", "true", ":", "?", ".", "'", "s", "shall", "i",
         "compare", "thee", "to", "summer", "day", "thou", "art", "more", "lovely", "what", "is", "1609", "year",
         "who", "wrote", "the", "sonnet", "have", "no", "comment"]


def hf_bert(directory: Path, id2label: dict[int, str], multi_label: bool = False, seed: int = 0):
    """A tiny transformers BertForSequenceClassification and its WordPiece tokenizer."""
    transformers = pytest.importorskip("transformers")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64,
                                     id2label=id2label, label2id={v: k for k, v in id2label.items()},
                                     problem_type="multi_label_classification" if multi_label else None)
    model = transformers.BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


@pytest.mark.parametrize("id2label, multi, label, index", [
    ({0: "non-toxic", 1: "toxic"}, False, None, 1),
    ({0: "LABEL_0", 1: "LABEL_1"}, False, None, 1),
    ({0: "insult", 1: "threat", 2: "toxic"}, True, None, 2),
    ({0: "insult", 1: "threat", 2: "toxic"}, True, "threat", 1),
])
def test_hf_classifier_probability_by_hand(tmp_path, id2label, multi, label, index):
    model, tokenizer = hf_bert(tmp_path / "bert", id2label, multi)
    assert check_judge(str(tmp_path / "bert"), "toxicity", label) == "hf-classifier"
    judge = open_judge(str(tmp_path / "bert"), "toxicity", label)
    assert isinstance(judge, HFClassifier)
    got = judge.probabilities(TEXTS)   # one padded batch
    for text, p in zip(TEXTS, got):
        with torch.inference_mode():
            logits = model(**tokenizer(text, return_tensors="pt")).logits[0]   # alone, unpadded
        want = torch.sigmoid(logits[index]) if multi else torch.softmax(logits, -1)[index]
        assert p == pytest.approx(float(want), abs=1e-5)


def test_hf_classifier_without_a_toxic_label_asks_for_one(tmp_path):
    hf_bert(tmp_path / "bert", {0: "joy", 1: "anger", 2: "fear"})
    with pytest.raises(CamelidError, match=r"joy, anger, fear.*--toxicity-label"):
        check_judge(str(tmp_path / "bert"), "toxicity")


def test_without_transformers_the_message_says_install_it(tmp_path, monkeypatch):
    hf_bert(tmp_path / "bert", {0: "ok", 1: "toxic"})
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(CamelidError, match="pip install transformers"):
        open_judge(str(tmp_path / "bert"), "toxicity")


def test_judge_paths_that_cannot_serve(tmp_path, lm_dir):
    with pytest.raises(CamelidError, match=r"--judge .*gone: no such file"):
        check_judge(str(tmp_path / "gone"), "truth")
    with pytest.raises(CamelidError, match="a language model, not a classifier"):
        check_judge(str(lm_dir), "toxicity")
    with pytest.raises(CamelidError, match="scores toxicity only"):
        check_judge("perspective", "truth")


# ---- the Perspective API --------------------------------------------------------------------------------

def test_perspective_request_shape_scores_and_rate(standin):
    server = standin()
    scorer = PerspectiveScorer("k3y", rate=10.0, url=server.url)
    sent, post = [], scorer.client.post

    def timed_post(*args, **kwargs):   # when each request leaves (arrival adds the network's jitter)
        sent.append(time.monotonic())
        return post(*args, **kwargs)
    scorer.client.post = timed_post
    texts = ["a", "bb cc", "dd ee ff", "g" * 30]
    assert scorer.probabilities(texts) == pytest.approx([len(t) / 100 for t in texts])
    assert len(server.seen) == 4
    first = server.seen[0]
    assert first["path"] == "/v1alpha1/comments:analyze" and first["query"] == {"key": ["k3y"]}
    assert first["body"] == {"comment": {"text": "a"}, "requestedAttributes": {"TOXICITY": {}}, "languages": ["en"]}
    gaps = [b - a for a, b in zip(sent, sent[1:])]
    assert len(sent) == 4 and min(gaps) >= 0.1 - 1e-3, gaps      # at most 10 a second


def test_perspective_retries_429_and_503_then_succeeds(standin):
    server = standin(replies=[429, 503])
    scorer = PerspectiveScorer("k", rate=100.0, url=server.url, backoff=0.01)
    assert scorer.probabilities(["hello"]) == pytest.approx([0.05])
    assert len(server.seen) == 3 and all(s["body"]["comment"]["text"] == "hello" for s in server.seen)


def test_perspective_gives_up_after_its_retries(standin):
    server = standin(replies=[429] * 3)
    scorer = PerspectiveScorer("k", rate=100.0, url=server.url, retries=2, backoff=0.01)
    with pytest.raises(CamelidError, match=r"still HTTP 429 after 3 tries \(stand-in says 429\)"):
        scorer.probabilities(["x"])


@pytest.mark.parametrize("status, words", [(400, ["HTTP 400", "stand-in says 400", "check the key"]),
                                           (403, ["HTTP 403", "stand-in says 403", "Comment Analyzer API"])])
def test_perspective_refusals_are_one_clear_error(standin, status, words):
    server = standin(replies=[status])
    with pytest.raises(CamelidError) as e:
        PerspectiveScorer("bad", url=server.url, backoff=0.01).probabilities(["x"])
    message = str(e.value)
    assert server.url in message and all(w in message for w in words), message
    assert len(server.seen) == 1   # never retried


def test_perspective_unreachable(standin):
    server = standin()
    url = server.url
    server.close()   # nothing listens there any more
    with pytest.raises(CamelidError, match=r"Perspective API at http://127\.0\.0\.1:\d+/v1alpha1/comments:analyze: "
                                           r"cannot reach it \(ConnectError\) after 2 tries"):
        PerspectiveScorer("k", url=url, retries=1, backoff=0.01).probabilities(["x"])


def test_perspective_needs_a_key():
    with pytest.raises(CamelidError, match="PERSPECTIVE_API_KEY"):
        PerspectiveScorer("")


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_judge_matches_transformers(smollm2, smollm2_hf):
    """A real model as the judge: its yes-probabilities equal those computed from transformers'
    own reading of the same GGUF, on the same token ids. (An untuned 135M model is no judge of
    truth: it is not asked here which answer is right.)"""
    hf_model, _ = smollm2_hf
    texts = [f"Q: What is the capital of France?\nA: {a}\nTrue:" for a in ("Paris.", "London.")]
    got = LMJudge(Scorer(smollm2)).probabilities(texts)
    for text, p in zip(texts, got):
        logps = []
        for answer in (" yes", " no"):
            pair = encode_pair(smollm2.tokenizer, text, answer)
            ids = pair.context + pair.continuation
            with torch.inference_mode():
                logp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), dim=-1)
            logps.append(sum(float(logp[i - 1, ids[i]]) for i in range(len(pair.context), len(ids))))
        assert p == pytest.approx(1 / (1 + math.exp(logps[1] - logps[0])), abs=2e-3)
