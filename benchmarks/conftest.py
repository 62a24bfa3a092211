"""Benchmark session set-up: case selection, threads, the same-run bandwidth roofline, machine facts.

    pytest benchmarks/ --bench-set goal --benchmark-json=out.json      # measure (see report.py for the report)
    pytest benchmarks/ --benchmark-disable --bench-set smoke -q        # CI smoke: every path once, no timing

Selection (each option also reads an environment variable, FUSED_ATTN_AT_BENCH_<NAME>):
    --bench-set smoke|goal|full (default full)    --bench-backends eager,compile,cpu,cuda,triton
    --bench-shapes 64x256x256,1x16x128            --bench-perturbations none,at,iat,rp
    --bench-modes fwd,bwd,fwdbwd                  --bench-dtypes float32,bfloat16
    --bench-threads 2                              --bench-time 1.0 (seconds of timed rounds per case)
    --bench-min-rounds 7
Files named bench_*.py here are collected like test_*.py.
"""
from __future__ import annotations

import os
import sys
import time

# Before torch is imported anywhere: inductor's compile workers would compete with the timed threads.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402

import benchlib  # noqa: E402  (benchmarks/ is on sys.path: pytest inserts a conftest's folder)

try:  # the installed package (tests and benchmarks run against it), else the checkout it lives in
    import fused_attn_at  # noqa: F401
except ImportError:
    sys.path.insert(0, str(benchlib.REPO))

OPTIONS = {
    # name: (default, help)
    "set": ("full", "named case set: smoke (seconds, for CI), goal (the issue's goal rows), full (the whole grid)"),
    "backends": ("", "comma list of backends to keep: eager,compile,cpu,cuda,triton (default all)"),
    "shapes": ("", "comma list of BxTxH shapes replacing the set's shapes, e.g. 64x256x256,1x16x128"),
    "perturbations": ("", "comma list among none,at,iat,rp (default the set's)"),
    "modes": ("", "comma list among fwd,bwd,fwdbwd (default the set's)"),
    "dtypes": ("", "comma list among float32,bfloat16 (default the set's)"),
    "threads": ("2", "torch threads for every case and the bandwidth measurement (default 2)"),
    "time": ("1.0", "target seconds of timed rounds per case (default 1.0)"),
    "min-rounds": ("7", "least number of timed rounds per case (default 7)"),
}


def _env_name(name: str) -> str:
    return "FUSED_ATTN_AT_BENCH_" + name.upper().replace("-", "_")


def pytest_addoption(parser):
    group = parser.getgroup("fused_attn_at benchmarks")
    for name, (default, help_text) in OPTIONS.items():
        group.addoption(f"--bench-{name}", default=None,
                        help=f"{help_text}; env {_env_name(name)}")


def bench_option(config, name: str) -> str:
    value = config.getoption(f"--bench-{name}")
    if value is None:
        value = os.environ.get(_env_name(name), OPTIONS[name][0])
    return value


def _list_option(config, name: str, allowed) -> tuple | None:
    text = bench_option(config, name)
    if not text:
        return None
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [x for x in items if x not in allowed]
    if bad:
        raise pytest.UsageError(f"--bench-{name}: unknown {bad}; expected a comma list among {', '.join(allowed)}")
    return items


def selected_cases(config) -> list[benchlib.Case]:
    bench_set = bench_option(config, "set")
    try:
        axes = benchlib.set_axes(bench_set)
        shapes_text = bench_option(config, "shapes")
        if shapes_text:
            axes["shapes"] = benchlib.parse_shapes(shapes_text)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None
    for name, allowed in (("perturbations", benchlib.PERTURBATIONS), ("modes", benchlib.MODES),
                          ("dtypes", benchlib.DTYPES)):
        chosen = _list_option(config, name, allowed)
        if chosen is not None:
            axes[name] = chosen
    axes["backends"] = _list_option(config, "backends", sorted({b for _, b in benchlib.BACKENDS}))
    return benchlib.make_cases(smoke=bench_set == "smoke", **axes)


_LOADAVG_START: list = []
_CPU_START: dict = {}


def _cpu_seconds() -> dict:
    """{'machine': busy CPU seconds of all processes (Linux /proc/stat; absent elsewhere), 'own': this
    process's user + system CPU seconds and those of the children it has waited for (the allocator and
    fresh-process memory workers the benchmarks start), 'wall'}. Their difference over the run is what other
    processes took from the timed threads: a direct measure, where the load average lags by minutes."""
    own = os.times()
    out = {"own": own.user + own.system + own.children_user + own.children_system, "wall": time.monotonic()}
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        # user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
        out["machine"] = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return out


def _other_load() -> dict:
    """CPU time other processes used during the run, as a fraction of the machine's capacity."""
    end = _cpu_seconds()
    if "machine" not in end or "machine" not in _CPU_START:
        return {}
    wall = end["wall"] - _CPU_START["wall"]
    other = max(0.0, (end["machine"] - _CPU_START["machine"]) - (end["own"] - _CPU_START["own"]))
    cores = os.cpu_count() or 1
    return {"other_cpu_s": other, "wall_s": wall, "cores": cores, "fraction": other / (wall * cores) if wall > 0 else 0.0}


def pytest_configure(config):
    import torch

    _LOADAVG_START[:] = os.getloadavg()
    _CPU_START.update(_cpu_seconds())

    threads = int(bench_option(config, "threads"))
    torch.set_num_threads(threads)
    # torch.compile's first use imports torch.jit code that warns about its own deprecation.
    config.addinivalue_line("filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


def pytest_collect_file(file_path, parent):
    # bench_*.py are benchmark modules; a file named on the command line is already collected by pytest.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


_CASES: dict[str, benchlib.Case] = {}


def pytest_generate_tests(metafunc):
    # Parametrised by the case id (a string, so that the JSON's params stay readable); `case` maps it back.
    if "case_id" in metafunc.fixturenames:
        params = []
        for case in selected_cases(metafunc.config):
            _CASES[case.id] = case
            reason = benchlib.unavailable_reason(case.device, case.backend, case.dtype)
            marks = [pytest.mark.skip(reason=f"{case.device}/{case.backend}: {reason}")] if reason else []
            params.append(pytest.param(case.id, id=case.id, marks=marks))
        metafunc.parametrize("case_id", params)


@pytest.fixture
def case(case_id) -> benchlib.Case:
    return _CASES[case_id]


_SKIPPED: list[dict] = []


def pytest_runtest_logreport(report):
    # Skip reasons go into the JSON too, so that the report can say why a column is empty.
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"test": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


# ------------------------------------------------------------------------------------ session fixtures
_BANDWIDTH: dict = {}


def _benchmark_disabled(config) -> bool:
    return bool(getattr(config.option, "benchmark_disable", False))


def measure_roofline(config, device: str, when: str) -> dict:
    import bandwidth

    threads = int(bench_option(config, "threads"))
    if device == "cuda":  # a GPU's cache is not the roofline question here: one large copy, as gpu_check.py
        result = bandwidth.measure_bandwidth(threads=threads, mib=256, reps=15, device=device)
    elif _benchmark_disabled(config):
        # Nothing is timed: small arrays exercise the code in a fraction of a second.
        result = bandwidth.measure_profile(threads=threads, sizes_mib=(1, 4), reps=3, device=device, first_touch_mib=4)
    else:
        # Read/write/copy at sizes in L2, L3 and DRAM: each case is judged at its own working-set size.
        result = bandwidth.measure_profile(threads=threads, sizes_mib=bandwidth.DEFAULT_SIZES_MIB, reps=15,
                                           device=device)
    _BANDWIDTH.setdefault(device, {})[when] = result
    return result


@pytest.fixture(scope="session")
def roofline(request):
    """device -> bandwidth profile measured at the start of this session (measured on first use per device;
    bandwidth.measure_profile on the CPU: per size, read/write/copy; bandwidth.bandwidth_at reads it)."""
    cache = {}

    def get(device: str) -> dict:
        if device not in cache:
            cache[device] = measure_roofline(request.config, device, "start")
        return cache[device]

    return get


@pytest.fixture(scope="session")
def compiled_reference():
    return benchlib.CompiledReference()


@pytest.fixture(scope="session")
def bench_settings(request):
    config = request.config
    return {
        "set": bench_option(config, "set"),
        "threads": int(bench_option(config, "threads")),
        "time": float(bench_option(config, "time")),
        "min_rounds": int(bench_option(config, "min-rounds")),
        "disabled": _benchmark_disabled(config),
    }


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fused_attn_at"] = dict(benchlib.software_info())
    machine_info["fused_attn_at"]["bench_set"] = bench_option(config, "set")


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # The bandwidth again at the end: if it moved a lot, the machine was busy during the run.
    for device in list(_BANDWIDTH):
        if "end" not in _BANDWIDTH[device]:
            measure_roofline(config, device, "end")
    output_json["fused_attn_at_bandwidth"] = _BANDWIDTH
    output_json["fused_attn_at_skipped"] = _SKIPPED
    output_json["fused_attn_at_loadavg"] = {"start": _LOADAVG_START, "end": list(os.getloadavg())}
    output_json["fused_attn_at_other_load"] = _other_load()
    output_json["fused_attn_at_extras"] = benchlib.RUN_EXTRAS
