"""The protos lint clean with buf; every command teaches through --help; flags read SPECDEC_* variables."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from drafter_service.drafters import NgramDrafter
from specdec.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def test_protos_are_buf_lint_clean():
    buf = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert buf, "buf (PyPI buf-bin) is installed by make install"
    result = subprocess.run([buf, "lint"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "argv", [[], ["serve"], ["serve", "router"], ["serve", "drafter"], ["serve", "verifier"], ["generate"],
             ["prepare-models"]],
)
def test_every_command_has_help(argv):
    result = subprocess.run([sys.executable, "-m", "specdec.cli", *argv, "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "usage: specdec" in result.stdout
    if argv:
        assert "[env SPECDEC_" in " ".join(result.stdout.split())


def test_flags_default_from_environment(monkeypatch):
    monkeypatch.setenv("SPECDEC_PORT", "6000")
    monkeypatch.setenv("SPECDEC_VERIFIER", "a:1,b:2")
    args = build_parser().parse_args(["serve", "router"])
    assert args.port == 6000
    assert args.verifier == ["a:1", "b:2"]


def test_engine_dtype_follows_the_device_unless_specdec_dtype_says(monkeypatch):
    import torch

    from verifier_service.app import default_dtype

    monkeypatch.delenv("SPECDEC_DTYPE", raising=False)
    assert default_dtype("cpu") == torch.float32 and default_dtype("cuda:1") == torch.bfloat16
    monkeypatch.setenv("SPECDEC_DTYPE", "BFloat16")
    assert default_dtype("cpu") == torch.bfloat16
    monkeypatch.setenv("SPECDEC_DTYPE", "auto")
    assert default_dtype("cuda:0") == torch.bfloat16
    monkeypatch.setenv("SPECDEC_DTYPE", "fp8")
    with pytest.raises(ValueError, match="auto or one of float32, bfloat16, float16"):
        default_dtype("cpu")


def test_dtype_flag_sets_every_engine_of_the_process_and_its_children(monkeypatch, capsys):
    """`--dtype float32` on serve (all-in-one or a tier) and bench: the engines of that process and of the servers
    bench starts (SPECDEC_DTYPE, inherited) use it; a format the engines lack is refused with the choices."""
    from specdec import cli, settings

    monkeypatch.delenv("SPECDEC_DTYPE", raising=False)
    assert build_parser().parse_args(["serve", "verifier"]).dtype == "auto"
    assert build_parser().parse_args(["serve", "drafter", "--dtype", "Float32"]).dtype == "float32"
    assert build_parser().parse_args(["serve", "--dtype", "bfloat16"]).dtype == "bfloat16"
    assert build_parser("bench").parse_args(["bench", "--dtype", "float32"]).dtype == "float32"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "verifier", "--dtype", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err

    from specdec import bench

    # what the command then runs (here bench's sweep, which starts the servers) sees the engines' dtype it asked for
    monkeypatch.setattr(bench, "run", lambda args: 0 if settings.dtype_name("cuda:0") == "float32" else 1)
    assert cli.main(["bench", "--dtype", "float32"]) == 0
    monkeypatch.setenv("SPECDEC_DTYPE", "auto")
    assert cli.main(["bench"]) == 1


def test_draft_tree_flags_take_auto_branch_x_beam_or_off_and_explain_a_bad_one(monkeypatch, capsys):
    from specdec.draft_tree import FOLLOW_VERIFIER, TreeShape

    monkeypatch.delenv("SPECDEC_ADVISE_DRAFT_TREE", raising=False)
    assert build_parser().parse_args(["serve", "drafter", "--draft-tree", "4x2"]).draft_tree == TreeShape(4, 2)
    assert build_parser().parse_args(["serve", "drafter", "--draft-tree", "off"]).draft_tree is None
    defaults = build_parser().parse_args(["serve"])  # drafters follow the verifier's advice, which it measures
    assert defaults.draft_tree == FOLLOW_VERIFIER and defaults.advise_draft_tree == "auto"
    assert build_parser().parse_args(["serve", "verifier", "--advise-draft-tree", "3X1"]).advise_draft_tree == "3x1"
    monkeypatch.setenv("SPECDEC_DRAFT_TREE", "2x1")
    assert build_parser().parse_args(["serve"]).draft_tree == TreeShape(2, 1)
    assert TreeShape(4, 4).nodes(5) == 68 and TreeShape(2, 1).nodes(5) == 10 and TreeShape(3, 3).nodes(0) == 0
    for flag, bad in [("--draft-tree", b) for b in ("4", "4x", "0x2", "axb")] + [("--advise-draft-tree", "2y2")]:
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", flag, bad])
        err = capsys.readouterr().err
        assert "BRANCHxBEAM" in err or "at least 1" in err


def test_router_without_verifier_says_what_to_do():
    env = {**os.environ, "SPECDEC_VERIFIER": ""}
    result = subprocess.run([sys.executable, "-m", "specdec.cli", "serve", "router"], capture_output=True,
                            text=True, env=env)
    assert result.returncode == 2
    assert "--verifier" in result.stderr


def test_unknown_model_spec_is_a_clear_error():
    result = subprocess.run([sys.executable, "-m", "specdec.cli", "prepare-models", "--model", "no/such/model"],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "not found" in result.stderr and "Traceback" not in result.stderr


def test_ngram_drafter_proposes_what_followed_the_latest_match():
    drafter = NgramDrafter()
    context = [5, 6, 7, 8, 9, 1, 2, 5, 6, 7, 3, 4, 5, 6, 7]
    assert drafter.lookup(context, 3) == [3, 4, 5]  # the latest earlier "5 6 7" was followed by 3 4 5
    assert drafter.lookup([1, 2, 3], 4) == []


def test_threads_follow_the_container_cpu_quota():
    from specdec.compute import cpu_limit

    cores = cpu_limit("max 100000")  # no quota: the usable cores
    assert cores >= 1
    assert cpu_limit("100000 100000") == 1
    assert cpu_limit("150000 100000") == min(2, cores)  # 1.5 CPUs: two threads, never more than the cores
    assert cpu_limit(f"{100000 * (cores + 8)} 100000") == cores


def test_a_gpu_serving_process_keeps_a_small_cpu_team_unless_told_otherwise(monkeypatch):
    import torch

    from specdec import compute

    before = compute.call(torch.get_num_threads)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        assert compute.set_threads(gpu=True) == min(compute.cpu_limit(), compute.GPU_SERVING_THREADS)
        assert compute.call(torch.get_num_threads) == min(compute.cpu_limit(), compute.GPU_SERVING_THREADS)
        assert compute.set_threads(gpu=False) == compute.cpu_limit()
        assert compute.set_threads(3, gpu=True) == 3  # --threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "5")
        assert compute.set_threads(gpu=True) == 5
    finally:
        compute.set_threads(before)


def test_light_commands_start_without_loading_torch():
    import subprocess
    import sys

    code = ("import sys; from specdec.cli import build_parser; "
            "build_parser('generate').parse_args(['generate', 'hi']); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert "bench" in build_parser().format_help()  # the heavy commands are still listed and built on demand
    args = build_parser("bench").parse_args(["bench", "--modes", "off"])
    assert args.modes == "off"


def test_a_server_slow_to_start_is_waited_for_with_progress_and_a_limit_the_user_can_raise(monkeypatch):
    """A started server gets SPECDEC_START_TIMEOUT seconds to serve (1800 when compiling: a compiled verifier took
    ~5 min to capture its graphs on an H200), says every so often what its log last said, and the error names the
    setting; a process that exits is reported at once."""
    from specdec.launch import free_port, start_timeout, wait_serving

    monkeypatch.delenv("SPECDEC_START_TIMEOUT", raising=False)
    monkeypatch.setenv("SPECDEC_COMPILE", "no")
    assert start_timeout() == 300
    monkeypatch.setenv("SPECDEC_COMPILE", "yes")
    assert start_timeout() == 1800
    monkeypatch.setenv("SPECDEC_START_TIMEOUT", "7.5")
    assert start_timeout() == 7.5
    monkeypatch.setenv("SPECDEC_START_TIMEOUT", "10m")
    with pytest.raises(ValueError, match="give the seconds"):
        start_timeout()

    silent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    waited: list[float] = []
    try:
        with pytest.raises(TimeoutError, match="SPECDEC_START_TIMEOUT"):
            wait_serving(f"127.0.0.1:{free_port()}", silent, timeout=1.6, waiting=waited.append, every=0.5)
    finally:
        silent.kill()
        silent.wait()
    assert len(waited) >= 2 and waited == sorted(waited)
    exits = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    with pytest.raises(RuntimeError, match="exited with 3"):
        wait_serving(f"127.0.0.1:{free_port()}", exits, timeout=30)


def test_the_wait_for_a_server_reads_only_the_end_of_its_log(tmp_path, capsys):
    """What a slow server's log last said, from its last few KB however long the log has grown."""
    from types import SimpleNamespace

    from specdec.launch import ServerProcess

    log = tmp_path / "verifier.log"
    log.write_text("x" * 100 + "\n" + "warming up\n" * 200_000 + "captured 5 of 21 CUDA graphs (64 s)\n\n")
    ServerProcess._waiting(SimpleNamespace(role="verifier", address="127.0.0.1:1"), 61.0, log)
    said = capsys.readouterr().err
    assert said.startswith("still waiting for the verifier at 127.0.0.1:1 to serve (61 s; its log (")
    assert said.rstrip().endswith("last said: captured 5 of 21 CUDA graphs (64 s))")
    log.write_text("")
    ServerProcess._waiting(SimpleNamespace(role="drafter", address="a:2"), 120.0, log)
    assert capsys.readouterr().err.rstrip().endswith(f"(120 s; its log: {log})")
