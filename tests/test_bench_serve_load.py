"""benchmarks/serve_load.py's parts that need neither model nor peer: the prompts it builds, the
figures it computes from streamed requests, its table, and that a server it starts is stopped."""

import os
import sys
from pathlib import Path

import pytest

from helpers import load_benchmark

@pytest.fixture(scope="module")
def bench():
    return load_benchmark("serve_load")


def test_prompts_share_the_system_prompt_and_differ_in_the_question(bench, bpe_tokenizer):
    # the test's tokenizer has a small vocabulary: the question's fixed part alone is ~55 tokens
    prompts = bench.Prompts(bpe_tokenizer, system_tokens=200, question_tokens=120)
    assert 170 <= prompts.count(prompts.system) <= 200
    questions = [prompts.question(n) for n in range(50)]
    assert len(set(questions)) == 50
    assert all(100 <= prompts.count(q) <= 120 for q in questions)
    a, b = prompts.messages(0), prompts.messages(1)
    assert a[0] == b[0] == {"role": "system", "content": prompts.system} and a[1] != b[1]


def test_warm_up_questions_never_meet_the_measured_ones(bench):
    q = bench.Questions(first=1000)
    assert [q.take(1), q.take(4), q.take(16), q.take(1)] == [1000, 1001, 1005, 1021]
    assert q.first - 1 >= 16 * 4 * 3   # the prompt-count question is outside the measured range too


def test_figures_from_streamed_requests(bench):
    assert bench.percentile([4, 1, 3, 2], 50) == 2.5
    assert bench.percentile([1, 2, 3, 4, 5], 95) == pytest.approx(4.8)
    records = [{"start": 0.0, "end": 2.0, "ttft": 0.5, "gaps": [0.1, 0.1, 0.3], "tokens": 4, "finish": "length",
                "counted": "usage", "text": "a"},
               {"start": 1.0, "end": 4.0, "ttft": 1.5, "gaps": [0.2], "tokens": 2, "finish": "stop",
                "counted": "usage", "text": "b"}]
    row = bench.summarize(records, failures=1, wall=5.0)
    assert row["tokens_per_s"] == pytest.approx(6 / 4.0)   # all tokens over first start .. last end
    assert row["ttft_p50_s"] == pytest.approx(1.0) and row["token_p50_ms"] == pytest.approx(150.0)
    assert (row["requests"], row["failures"], row["stopped_early"]) == (2, 1, 1)
    other = dict(row, tokens_per_s=row["tokens_per_s"] / 2, ttft_p50_s=2.0)
    text = bench.table({"camelid": {"levels": {4: row}}, "llama.cpp": {"levels": {4: other}}}, [4])
    lines = text.splitlines()
    assert len(lines) == 5 and lines[2].startswith("| 4 | 2, 1 failed | camelid |")
    assert "**2.00x**" in lines[4] and "0.50x /" in lines[4]


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads Linux's /proc")
def test_other_work_on_the_cpus_is_measured(bench):
    before = bench.cpu_times(os.getpid())
    sum(i * i for i in range(2_000_000))   # this process's own work is not "other"
    after = bench.cpu_times(os.getpid())
    assert after[0] >= before[0] and after[1] > before[1] and after[2] > before[2]
    assert 0.0 <= bench.other_cpu(before, after) <= 1.0
    assert bench.other_cpu(before, None) is None


def test_a_started_server_is_stopped_with_its_group(bench, tmp_path):
    (tmp_path / "www" / "v1").mkdir(parents=True)
    (tmp_path / "www" / "v1" / "models").write_text("{}")
    port = bench.free_port()
    cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path / "www")]
    with bench.Server("fake", cmd, dict(os.environ), port, tmp_path) as server:
        pid = server.proc.pid
        os.kill(pid, 0)   # running
    assert server.proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


def test_a_server_that_dies_at_start_is_reported_with_its_log(bench, tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('no model here'); sys.exit(3)"]
    with pytest.raises(SystemExit, match="exited with code 3(.|\n)*no model here"):
        with bench.Server("fake", cmd, dict(os.environ), bench.free_port(), tmp_path):
            pass
