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
