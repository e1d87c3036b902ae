"""`specdec bench`'s CPU time per process: what it reports as each tier's CPU ms per committed token."""

import os
import subprocess
import sys
import time

from specdec.bench import cpu_seconds


def test_cpu_seconds_counts_another_process_busy_time_not_its_idle_time():
    spin = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", spin])
    try:
        deadline = time.monotonic() + 20
        while cpu_seconds(child.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.1)
        busy = cpu_seconds(child.pid)
        time.sleep(0.5)  # now sleeping: its CPU time stays put
        assert 0.6 <= busy <= cpu_seconds(child.pid) < busy + 0.1
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) == 0.0  # gone: nothing to read
    assert abs(cpu_seconds() - cpu_seconds(os.getpid())) < 0.05  # this process, both ways


def test_a_modes_drafter_and_the_layers_its_verifier_warms():
    from specdec.bench import mode_drafter
    from specdec.drafter_model import feature_layers

    assert mode_drafter("off") is None and mode_drafter("ngram") == "ngram"
    assert mode_drafter("model", "drafters/x") == "drafters/x"
    assert mode_drafter("model=drafters/smollm2-135m-instruct-fused@4x4") == "drafters/smollm2-135m-instruct-fused"
    assert feature_layers(mode_drafter("model=drafters/smollm2-135m-instruct-fused@4x4")) == [2, 15, 29]
    assert feature_layers("drafters/smollm2-135m-instruct-feature") is None  # the last layer only: no extra graphs
    assert feature_layers("ngram") is None


def test_bench_compares_every_requests_greedy_tokens_with_speculation_offs_first_answer(capsys):
    """compare_with_off: each row's requests against off's first answer to the same prompt (its first level), the
    reference answers themselves left out; a difference is reported at the first token that differs (a shorter
    answer that agrees so far differs where it ends)."""
    from specdec.bench import RequestResult, Row, compare_with_off

    def result(prompt, tokens):
        return RequestResult(len(tokens), 1.0, 0.1, [], 0, 0, 0, [], [], 0, prompt=prompt, token_ids=tokens)

    def row(mode, concurrency):
        return Row(mode, concurrency, 0, 0, 1.0, 0, 0, 0, 0, 0, 0, 1.0)

    off1 = [result(0, [1, 2, 3]), result(1, [4, 5]), result(0, [1, 2, 3])]
    spec1 = [result(0, [1, 2, 3]), result(1, [4, 6]), result(2, [7])]  # prompt 2: off never answered it
    off4 = [result(0, [1, 2, 9]), result(1, [4, 5])]  # off itself at another batch size is compared too
    spec4 = [result(0, [1, 2]), result(1, [4, 5])]
    levels = [(row("ngram", 1), spec1), (row("off", 1), off1), (row("off", 4), off4), (row("ngram", 4), spec4)]
    compare_with_off(levels)
    got = [(r.mode, r.concurrency, r.same_as_off, r.compared_with_off, r.first_differences) for r, _ in levels]
    assert got == [("ngram", 1, 1, 2, [1]), ("off", 1, 1, 1, []), ("off", 4, 1, 2, [2]), ("ngram", 4, 1, 2, [2])]
    lone = [(row("ngram", 1), spec1)]
    compare_with_off(lone)  # no off row: nothing to compare with
    assert lone[0][0].same_as_off is None and lone[0][0].compared_with_off == 0

    # the report: each row's count, and in bf16 (a GPU's default) what the differences are and how to be exact
    from specdec.bench import report_agreement

    rows = [r for r, _ in levels]
    report_agreement(rows, "float32")
    printed = capsys.readouterr().out
    assert "ngram x1    1 of 2 the same (first differing token at [1])" in printed and "--dtype" not in printed
    report_agreement(rows, "bfloat16")
    assert "--dtype float32 gives speculation off's tokens exactly" in capsys.readouterr().out
