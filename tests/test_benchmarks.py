"""The benchmark harness (benchmarks/): structure of its outputs and its failure modes.

No test here asserts a timing: the machine is shared and noisy. They check that a run produces
well-formed results.json/results.md, that the reported ratios are the ones the timings imply, and
that variants which disagree fail the run instead of being timed.
"""

import json
import math

import numpy as np
import pytest

from benchmarks import harness, run

TORCH = harness.import_torch() is not None
FAST = ["--quick", "--repeats", "2", "--warmup", "0", "--min-time", "0", "--gemm-n", "128"]


def _quiet(_msg):
    pass


def _load(tmp_path):
    with open(tmp_path / "results.json") as f:
        return json.load(f)


def test_cross_entropy_quick_run_writes_results(tmp_path):
    rc = run.main([*FAST, "--out-dir", str(tmp_path), "cross_entropy"], log=_quiet)
    res = _load(tmp_path)
    assert res["import_errors"] == []       # every benchmarks/bench_*.py module imports
    assert rc == 0
    for key in ("cpu", "cpu_count", "numpy", "numba", "torch", "python"):
        assert key in res["machine"]
    assert res["threads"]["threads"] >= 1
    assert res["threads"]["numba"] == res["threads"]["threads"]
    if TORCH:
        assert res["threads"]["torch"] == res["threads"]["threads"]
    gp = res["gemm_peak"]
    assert gp["n"] == 128 and math.isfinite(gp["gflops"])
    assert [b["name"] for b in res["benchmarks"]] == ["cross_entropy/fwd", "cross_entropy/fwd+bwd"]
    expected = {"refimpl-numpy", "refimpl-numba"} | ({"torch"} if TORCH else set())
    for b in res["benchmarks"]:
        assert b["status"] == "ok"
        assert b["params"]["N"] == 512 and b["params"]["V"] == 4096
        assert set(b["variants"]) == expected
        assert ("torch" in b["skipped"]) == (not TORCH)
        for name, v in b["variants"].items():
            assert len(v["times_s"]) == 2 and v["best_s"] == min(v["times_s"])
            assert v["best_s"] <= v["median_s"]
            assert v["first_call_s"] > 0 and v["warmup_calls"] == 0 and v["number"] >= 1
            assert {"user_s_per_call", "sys_s_per_call", "minor_faults_per_call"} <= set(v)
            if v["kind"] == "numpy":
                assert isinstance(v["peak_mem_bytes"], int) and v["peak_mem_bytes"] > 0
            else:   # tracemalloc cannot see numba/torch memory: reported as unmeasured, not as 0
                assert v["peak_mem_bytes"] is None and "tracemalloc" in v["peak_mem_note"]
            if name == "refimpl-numba":
                assert set(v["jit"]) == {"cache_hits", "cache_misses"}
                # 0 + 0 when an earlier test in this process already loaded the kernel
                assert min(v["jit"].values()) >= 0
        pairs = {f"{a} vs {b_}" for a, b_ in harness.RATIO_PAIRS if {a, b_} <= expected}
        assert set(b["ratios"]) == pairs
        for pair, r in b["ratios"].items():
            a, b_ = pair.split(" vs ")
            assert r == pytest.approx(b["variants"][b_]["best_s"] / b["variants"][a]["best_s"])
    md = (tmp_path / "results.md").read_text()
    assert "## cross_entropy/fwd+bwd" in md and "GEMM peak" in md


def _tiny_registry(bad: bool):
    reg = harness.Registry()

    @reg.register("tiny/matmul")
    def tiny(quick):
        a = np.arange(12.0).reshape(3, 4)
        b = np.ones((4, 2))
        case = harness.Case(params={"M": 3, "K": 4, "N": 2}, flops=2 * 3 * 4 * 2)
        case.add("refimpl-numpy", lambda: a @ b)
        case.add("refimpl-numba", lambda: a @ b + (1e-3 if bad else 0.0), jit=())
        case.skip("torch", "not needed here")
        case.check = lambda outs: harness.assert_outputs_close(outs, rtol=1e-12)
        return case

    return reg


def test_flops_give_gemm_fraction(tmp_path):
    rc = run.main([*FAST, "--out-dir", str(tmp_path)], registry=_tiny_registry(bad=False), log=_quiet)
    assert rc == 0
    res = _load(tmp_path)
    (b,) = res["benchmarks"]
    for v in b["variants"].values():
        assert v["gflops"] == pytest.approx(48 / v["best_s"] / 1e9)
        assert v["peak_fraction"] == pytest.approx(v["gflops"] / res["gemm_peak"]["gflops"])
        assert "peak_mem_bytes" not in v      # memory not requested by this case
    assert set(b["ratios"]) == {"refimpl-numba vs refimpl-numpy"}
    assert b["skipped"] == {"torch": "not needed here"}


def test_disagreeing_variants_fail_the_run_and_are_not_timed(tmp_path):
    reg = _tiny_registry(bad=True)
    rc = run.main([*FAST, "--out-dir", str(tmp_path)], registry=reg, log=_quiet)
    assert rc == 1
    (b,) = _load(tmp_path)["benchmarks"]
    assert b["status"] == "mismatch" and "refimpl-numba" in b["error"]
    assert b["variants"] == {} and b["ratios"] == {}
    assert "MISMATCH" in (tmp_path / "results.md").read_text()
    with pytest.raises(harness.MismatchError, match="tiny/matmul"):
        harness.run_case("tiny/matmul", reg.factories["tiny/matmul"](True), log=_quiet)


def test_scaled_atol_catches_errors_in_tiny_values():
    # A mean-reduced gradient has entries ~1/(N V); a fixed atol such as 1e-6 would pass anything.
    ref = np.full(1000, 3e-9)
    ok = ref * (1 + 1e-7)
    bad = ref.copy()
    bad[17] *= 1.1
    harness.assert_outputs_close({"refimpl-numpy": ref, "refimpl-numba": ok}, rtol=2e-5, atol_scale=1e-6)
    with pytest.raises(harness.MismatchError, match=r"1 of 1000 .*worst at \(17,\)"):
        harness.assert_outputs_close({"refimpl-numpy": ref, "refimpl-numba": bad}, rtol=2e-5, atol_scale=1e-6)
    with pytest.raises(harness.MismatchError, match="NaN|nan"):
        harness.assert_outputs_close({"refimpl-numpy": ref, "refimpl-numba": ref * np.nan}, rtol=1.0)


def test_registry_selection_and_errors():
    reg = harness.Registry()
    for name in ("ce/fwd", "ce/fwd+bwd", "mla/decode"):
        reg.register(name)(lambda quick, _n=name: harness.Case(params={}))
    assert reg.select(None) == ["ce/fwd", "ce/fwd+bwd", "mla/decode"]
    assert reg.select(["ce/"]) == ["ce/fwd", "ce/fwd+bwd"]
    assert reg.select(["*/fwd"]) == ["ce/fwd"]

    def other_factory(quick):
        return harness.Case(params={})

    with pytest.raises(ValueError, match="already registered"):
        reg.register("ce/fwd")(other_factory)
    case = harness.Case(params={})
    with pytest.raises(ValueError, match="kind"):
        case.add("my-variant", lambda: None)
    case.add("my-variant", lambda: None, kind="other")
    with pytest.raises(ValueError, match="already registered"):
        case.add("my-variant", lambda: None, kind="other")


def test_thread_limits_are_restored():
    numba = pytest.importorskip("numba")
    before = numba.get_num_threads()
    with harness.thread_limits(1) as info:
        assert info["threads"] == 1 and numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


def test_machine_info_names_the_measured_commit(tmp_path, monkeypatch):
    """The saved run says which code it measured: HEAD's short hash, ``+changes`` when refimpl/ or
    benchmarks/ differ from it; None outside a git checkout."""
    import shutil
    import subprocess
    from pathlib import Path

    from benchmarks import machine
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    (repo / "refimpl").mkdir()
    (repo / "refimpl" / "a.py").write_text("x = 1\n")
    shutil.copy(machine.__file__, repo / "benchmarks" / "machine.py")
    git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo,  # noqa: E731
                                    check=True, capture_output=True, text=True).stdout.strip()
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    head = git("rev-parse", "--short=12", "HEAD")
    monkeypatch.setattr(machine, "__file__", str(repo / "benchmarks" / "machine.py"))
    assert machine.git_commit() == head
    (repo / "refimpl" / "a.py").write_text("x = 2\n")
    assert machine.git_commit() == head + "+changes"
    assert machine.machine_info()["commit"] == head + "+changes"
    monkeypatch.setattr(machine, "__file__", str(Path(tmp_path / "elsewhere" / "benchmarks" / "machine.py")))
    assert machine.git_commit() is None
