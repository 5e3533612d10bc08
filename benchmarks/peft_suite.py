"""PEFT's own LoRA tests with every created model patched, against the same tests unpatched.

    OMP_NUM_THREADS=1 python -m benchmarks.peft_suite --peft-tests /tmp/peft-0.21.2/tests \
        [--select custom_models initialization extra] [--mode patch|enable] [--backend auto] \
        [--out /tmp/peft_suite] [--unpatched PREVIOUS_OUT/unpatched.jsonl] [--only-fused PREVIOUS_OUT/patched.jsonl] \
        [--results benchmarks/results/DATE_peft_suite.md] [--keyword EXPR] [--quiet]

Runs the selected tests of PEFT's repository twice with pytest, each in a subprocess with
``HF_HUB_OFFLINE=1``: once as they are ("unpatched"), once with this module loaded as a pytest
plugin that switches every LoRA layer PEFT creates to the fused op ("patched"). Then prints, per
test, the two outcomes, and the list of tests that pass unpatched and fail patched ("pass ->
fail"). Not part of the project's CI: it needs PEFT's tests (``--peft-tests``, see
docs/integrations.md for how to get them for the installed PEFT) and their dependencies
(diffusers, datasets, scipy, parameterized, attrs besides PEFT's own).

How models get patched (``--mode``):

* ``patch`` (default): ``peft.tuners.tuners_utils.BaseTuner.inject_adapter`` -- the one place where
  ``get_peft_model``, ``PeftModel(...)``, ``PeftModel.from_pretrained``, ``inject_adapter_in_model``,
  ``add_adapter`` and ``load_adapter`` create LoRA layers -- is wrapped to call
  ``rslora_kernels.peft.patch`` on the model it just injected into.
* ``enable``: ``rslora_kernels.peft.enable()`` once at start-up (the process-wide switch), when the
  installed rslora_kernels has it.

Warnings of ``patch`` itself (layers it leaves on PEFT's forward) are silenced so that tests that
count warnings see PEFT's; warnings the patched forward raises are not.

Tests that need the Hugging Face Hub fail offline with the hub's own errors (an offline-mode or
"not in the local cache" error); such a test is counted as "hub" in that run and left out of every
count. A test's outcome is passed / failed / error (in setup or teardown) / skipped / xfailed /
xpassed. Per test, the patched run also records how many layers ``patch`` switched (``fused``):
a test that switched none ran PEFT's forward throughout. ``--only-fused`` re-runs only the tests
that switched at least one layer in an earlier patched run (their ids from its jsonl), with the
earlier ``--unpatched`` results reused: the others cannot change outcome, having never patched.

Selections (``--select``), paths relative to PEFT's repository root:

    custom_models    tests/test_custom_models.py -k lora
    initialization   tests/test_initialization.py, the LoRA classes (TestLoraInitialization,
                     TestHotSwapping, TestScaling, TestLowCpuMemUsage, TestLoadPeftKeyMapping,
                     TestWeightTying, TestNamingConflictWarning, TestCordaInitialization,
                     TestEvaInitialization, TestLoadAdapterOfflineMode)
    extra            the LoRA/DoRA cases of test_other.py, test_lora_variants.py, test_mixed.py,
                     test_low_level_api.py, test_tuners_utils.py, test_target_parameters.py,
                     test_torch_compile.py, test_decoder_models.py, test_encoder_decoder_models.py,
                     test_feature_extraction_models.py (-k "lora or dora")
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional

_ENV_MODE = "RK_PEFT_SUITE_MODE"      # "off" | "patch" | "enable": read by the plugin hooks below
_ENV_LOG = "RK_PEFT_SUITE_LOG"        # jsonl file the plugin appends one record per test to
_ENV_BACKEND = "RK_PEFT_SUITE_BACKEND"

_INIT_CLASSES = ("TestLoraInitialization", "TestHotSwapping", "TestScaling", "TestLowCpuMemUsage",
                 "TestLoadPeftKeyMapping", "TestWeightTying", "TestNamingConflictWarning", "TestCordaInitialization",
                 "TestEvaInitialization", "TestLoadAdapterOfflineMode")
_EXTRA_FILES = ("test_other.py", "test_lora_variants.py", "test_mixed.py", "test_low_level_api.py",
                "test_tuners_utils.py", "test_target_parameters.py", "test_torch_compile.py", "test_decoder_models.py",
                "test_encoder_decoder_models.py", "test_feature_extraction_models.py")
SELECTIONS = {
    "custom_models": (["tests/test_custom_models.py"], "lora"),
    "initialization": (["tests/test_initialization.py"], " or ".join(_INIT_CLASSES)),
    "extra": ([f"tests/{f}" for f in _EXTRA_FILES], "lora or dora"),
}

# what the hub's errors say offline (huggingface_hub / transformers messages): such a failure means
# "needs the hub", not a result
_HUB_MARKERS = ("OfflineModeIsEnabled", "LocalEntryNotFoundError", "offline mode is enabled",
                "outgoing traffic has been disabled", "Cannot find the requested files in the local cache",
                "couldn't connect to 'https://huggingface.co'", "We couldn't connect to",
                "HF_HUB_OFFLINE", "is not a local folder and is not a valid model identifier")


# ----------------------------------------------------------------------------------------------
# The pytest plugin (loaded with -p benchmarks.peft_suite in the subprocesses)
# ----------------------------------------------------------------------------------------------
class _State:
    fused = 0                 # layers switched by patch during the current test
    models: list = []         # models patched during the current test, held until its teardown (rk.peft.report)
    phases: Dict[str, dict] = {}


def _patch_model(model) -> None:
    import rslora_kernels as rk

    with warnings.catch_warnings():  # patch's own "kept PEFT's forward" warnings: not the tests' business
        warnings.simplefilter("ignore")
        _State.fused += rk.peft.patch(model, backend=os.environ.get(_ENV_BACKEND, "auto"))
    if not any(m is model for m in _State.models):
        _State.models.append(model)


def _install(mode: str) -> None:
    import rslora_kernels as rk
    from peft.tuners import tuners_utils

    if mode == "enable":
        if not hasattr(rk.peft, "enable"):
            raise SystemExit("rslora_kernels.peft.enable does not exist in this version; use --mode patch")
        rk.peft.enable(backend=os.environ.get(_ENV_BACKEND, "auto"))
    else:
        _prime(rk)
    original = tuners_utils.BaseTuner.inject_adapter

    @functools.wraps(original)
    def inject_adapter(self, model, *args, **kwargs):
        out = original(self, model, *args, **kwargs)
        if mode == "patch":
            _patch_model(model)
        elif not any(m is model for m in _State.models):  # enable: only held for rk.peft.report
            _State.models.append(model)
        return out

    tuners_utils.BaseTuner.inject_adapter = inject_adapter


class _AlwaysSeen(dict):
    """PEFT's testing_utils._HUB_MODEL_ACCESSES stand-in: every model id counts as fetched before."""

    def __contains__(self, key):
        return True

    def __missing__(self, key):
        return 0


def _hub_stays_offline() -> None:
    """PEFT's ``hub_online_once`` lets a test's first access of a model id go online (switching
    HF_HUB_OFFLINE off inside it), which offline means minutes of connection retries per test:
    every id is made to count as fetched before, so the context stays offline and the test fails
    at once with the hub's offline error (counted as "hub")."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        from tests import testing_utils  # PEFT's, imported under the name its tests import it by
    except ImportError:
        return
    if hasattr(testing_utils, "_HUB_MODEL_ACCESSES"):
        testing_utils._HUB_MODEL_ACCESSES = _AlwaysSeen()


def _prime(rk) -> None:
    """Patch (and unpatch) a throwaway model once, before our wrapper goes on: whatever rk.peft
    installs on its first patch (its own ``inject_adapter`` wrapper, which patches adapters added to
    a patched model) then sits under ours, so a model PEFT creates is patched by us after it, with
    patch's warnings silenced, and never patched a second time outside the silence."""
    import peft
    from torch import nn

    model = peft.get_peft_model(nn.Sequential(nn.Linear(2, 2)), peft.LoraConfig(r=1, target_modules=["0"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rk.peft.patch(model)
        rk.peft.unpatch(model)


def pytest_configure(config):
    _hub_stays_offline()
    mode = os.environ.get(_ENV_MODE, "off")
    if mode != "off":
        _install(mode)


def pytest_runtest_setup(item):
    _State.fused, _State.models, _State.phases = 0, [], {}


def _report_counts() -> Optional[dict]:
    """``"<kind>: <what>" -> calls`` summed over the LoRA layers of the models patched in this test
    (kind: fused, peft (a fallback to PEFT's forward) or base), when rk.peft.report exists."""
    import rslora_kernels as rk

    report = getattr(rk.peft, "report", None)
    if report is None:
        return None
    total: Counter = Counter()
    for model in _State.models:
        try:
            rep = report(model, verbose=False)
        except Exception as e:  # noqa: BLE001 - the count is informative, never a test result
            total[f"report raised {type(e).__name__}"] += 1
            continue
        for layer in rep.values():
            for kind, counts in layer.items():
                for what, n in counts.items():
                    total[f"{kind}: {what}"] += n
    return dict(total)


def _phase_outcome(report) -> Optional[str]:
    """The test's outcome as one phase's report gives it; None: this phase says nothing (a passed
    setup or teardown)."""
    text = str(report.longrepr) if report.longrepr is not None else ""
    if report.skipped:
        return "xfailed" if hasattr(report, "wasxfail") else "skipped"
    if report.failed:
        if any(m in text for m in _HUB_MARKERS):
            return "hub"
        return "failed" if report.when == "call" else "error"
    if report.when == "call":
        return "xpassed" if hasattr(report, "wasxfail") else "passed"
    return None


def pytest_runtest_logreport(report):
    st = _State.phases.setdefault(report.nodeid, {})
    outcome = _phase_outcome(report)
    if outcome is not None and st.get("outcome") in (None, "passed"):  # the first bad phase decides
        st["outcome"] = outcome
        st["message"] = _last_line(str(report.longrepr)) if outcome in ("failed", "error") else ""
    if report.when != "teardown":
        return
    record = {"test": report.nodeid, "outcome": st.get("outcome", "error"), "fused": _State.fused,
              "message": st.get("message", "")}
    if os.environ.get(_ENV_MODE, "off") != "off":
        counts = _report_counts()
        if counts is not None:
            record["report"] = counts
    _State.models = []
    path = os.environ.get(_ENV_LOG)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _last_line(text: str) -> str:
    """The exception line of a failure (the first line starting with "E ", else the last line)."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errs = [ln[1:].strip() for ln in lines if ln.startswith("E ")]
    return (errs[0] if errs else (lines[-1] if lines else ""))[:300]


# ----------------------------------------------------------------------------------------------
# The driver
# ----------------------------------------------------------------------------------------------
def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _run(peft_root: Path, args: List[str], mode: str, log: Path, backend: str, timeout: float) -> float:
    log.unlink(missing_ok=True)
    env = dict(os.environ)
    env.update({_ENV_MODE: mode, _ENV_LOG: str(log), _ENV_BACKEND: backend, "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "PYTHONPATH": os.pathsep.join(p for p in (str(_repo_root()), env.get("PYTHONPATH", "")) if p)})
    cmd = [sys.executable, "-m", "pytest", "-o", "addopts=", "-p", "no:cacheprovider", "-p", "benchmarks.peft_suite",
           "-q", "--no-header", "-rN", "--tb=short", *args]
    print(f"[{mode}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=peft_root, env=env, timeout=timeout, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def load(path: Path) -> Dict[str, dict]:
    """test id -> its record (the last one, if a test was recorded twice)."""
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[rec["test"]] = rec
    return out


_COUNTED = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")


def compare(unpatched: Dict[str, dict], patched: Dict[str, dict]) -> dict:
    """Counts and transitions over the tests both runs recorded, hub tests (in either run) left out."""
    common = sorted(set(unpatched) & set(patched))
    hub = [t for t in common if "hub" in (unpatched[t]["outcome"], patched[t]["outcome"])]
    tests = [t for t in common if t not in set(hub)]
    pairs = {t: (unpatched[t]["outcome"], patched[t]["outcome"]) for t in tests}
    good = ("passed", "xfailed", "skipped")
    pass_fail = [t for t, (u, p) in pairs.items() if u == "passed" and p != "passed"]
    fail_pass = [t for t, (u, p) in pairs.items() if u in ("failed", "error") and p == "passed"]
    fused = [t for t in tests if patched[t].get("fused", 0) > 0]
    reports: Counter = Counter()
    for t in tests:
        reports.update(patched[t].get("report", {}))
    return {
        "tests": len(tests), "hub": len(hub),
        "only_unpatched": len(set(unpatched) - set(patched)), "only_patched": len(set(patched) - set(unpatched)),
        "unpatched": Counter(u for u, _ in pairs.values()), "patched": Counter(p for _, p in pairs.values()),
        "pass_fail": pass_fail, "fail_pass": fail_pass, "fused_tests": len(fused),
        "fused_layers": sum(patched[t].get("fused", 0) for t in tests),
        "changed": {t: pr for t, pr in pairs.items() if pr[0] != pr[1] and not (pr[0] in good and pr[1] in good)},
        "report": dict(reports), "pairs": pairs,
    }


def _counts(c: Counter) -> str:
    return ", ".join(f"{k} {c[k]}" for k in _COUNTED if c.get(k))


def write_results(path: Path, res: dict, patched: Dict[str, dict], meta: dict) -> None:
    lines = [f"# PEFT's own LoRA tests, patched vs unpatched ({meta['date']})", "",
             f"rslora_kernels commit {meta['commit']}; peft {meta['peft']}; torch {meta['torch']}; "
             f"transformers {meta['transformers']}; {meta['machine']}.",
             f"Made with `{meta['command']}` (benchmarks/peft_suite.py; mode `{meta['mode']}`, backend "
             f"`{meta['backend']}`, HF_HUB_OFFLINE=1). Selections: {', '.join(meta['select'])}"
             + (f"; `-k {meta['keyword']}`" if meta.get("keyword") else "") + f". Unpatched outcomes: {meta['unpatched_from']}.",
             ""]
    if meta.get("only_fused"):
        lines += [f"Patched run restricted to the tests that switched at least one layer in {meta['only_fused']} "
                  "(the others never left PEFT's forward); unpatched outcomes from " + meta["unpatched_from"] + ".", ""]
    lines += [f"- tests compared: {res['tests']} (hub tests left out: {res['hub']})",
              f"- unpatched: {_counts(res['unpatched'])}",
              f"- patched: {_counts(res['patched'])}",
              f"- tests in which patch switched at least one layer: {res['fused_tests']} "
              f"({res['fused_layers']} layer switches in all)",
              f"- pass -> fail: {len(res['pass_fail'])}; fail -> pass: {len(res['fail_pass'])}",
              f"- run time: unpatched {meta['t_unpatched']}, patched {meta['t_patched']}", ""]
    if res["report"]:
        lines += ["Summed `rk.peft.report` counts over the patched models (per test, at teardown):", ""]
        lines += [f"- {k}: {v}" for k, v in sorted(res["report"].items())] + [""]
    lines += ["## pass -> fail", ""]
    lines += [f"- `{t}`: {patched[t]['outcome']}: {patched[t].get('message', '')}" for t in res["pass_fail"]] or ["none"]
    lines += ["", "## other changes (outcome unpatched -> patched)", ""]
    other = [t for t in res["changed"] if t not in set(res["pass_fail"])]
    lines += [f"- `{t}`: {res['changed'][t][0]} -> {res['changed'][t][1]}" for t in other] or ["none"]
    path.write_text("\n".join(lines) + "\n")


def _tree_state() -> str:
    """HEAD's short hash, and whether rslora_kernels/ has uncommitted edits."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=_repo_root(), capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "rslora_kernels"],
                           cwd=_repo_root(), capture_output=True, text=True).stdout.strip()
    return commit + (" (+ uncommitted edits)" if dirty else "")


def _version(mod: str) -> str:
    try:
        return __import__(mod).__version__
    except Exception:  # noqa: BLE001
        return "?"


def _fmt_time(seconds: Optional[float]) -> str:
    return "reused" if seconds is None else f"{seconds / 60:.1f} min"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peft-tests", required=True, type=Path,
                    help="PEFT's tests/ directory for the installed PEFT version (see docs/integrations.md)")
    ap.add_argument("--select", nargs="+", default=["custom_models", "initialization"], choices=sorted(SELECTIONS))
    ap.add_argument("--keyword", default=None, help="an extra pytest -k expression ANDed with each selection's")
    ap.add_argument("--mode", choices=("patch", "enable"), default="patch")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--out", type=Path, default=Path("/tmp/peft_suite"))
    ap.add_argument("--unpatched", type=Path, nargs="+", default=None,
                    help="reuse these unpatched jsonl files (merged) instead of running the unpatched tests")
    ap.add_argument("--only-fused", type=Path, default=None,
                    help="a patched.jsonl: re-run only its tests that switched at least one layer")
    ap.add_argument("--results", type=Path, default=None, help="write a markdown results file here")
    ap.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per pytest run")
    ap.add_argument("--quiet", action="store_true", help="print only the changed tests, not every test")
    args = ap.parse_args(argv)
    commit = _tree_state()  # the tree the runs import, read before they start

    tests_dir = args.peft_tests.resolve()
    if not (tests_dir / "test_custom_models.py").exists():
        raise SystemExit(f"{tests_dir} does not hold PEFT's tests (no test_custom_models.py)")
    peft_root = tests_dir.parent
    if not (tests_dir / "__init__.py").exists():  # the tests import each other relatively (from .testing_common)
        (tests_dir / "__init__.py").touch()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []  # (pytest args) per selection
    for name in args.select:
        files, kw = SELECTIONS[name]
        files = [f for f in files if (peft_root / f).exists()]
        expr = f"({kw}) and ({args.keyword})" if args.keyword else kw
        runs.append([*files, "-k", expr])
    only = None
    if args.only_fused is not None:
        only = sorted(t for t, r in load(args.only_fused).items() if r.get("fused", 0) > 0)
        ids_file = args.out / "only_fused_ids.txt"
        ids_file.write_text("\n".join(only) + "\n")
        runs = [[*only]]  # node ids, run as one session
    un_log, pa_log = args.out / "unpatched.jsonl", args.out / "patched.jsonl"
    t_un = None
    if args.unpatched is None:
        t_un = 0.0
        for i, r in enumerate(runs):
            part = args.out / f"unpatched.{i}.jsonl"
            t_un += _run(peft_root, r, "off", part, args.backend, args.timeout)
        un_log.write_text("".join((args.out / f"unpatched.{i}.jsonl").read_text() for i in range(len(runs))
                                  if (args.out / f"unpatched.{i}.jsonl").exists()))
    else:
        un_log = args.out / "unpatched.reused.jsonl"
        un_log.write_text("".join(p.read_text() for p in args.unpatched))
    t_pa = 0.0
    for i, r in enumerate(runs):
        part = args.out / f"patched.{i}.jsonl"
        t_pa += _run(peft_root, r, args.mode, part, args.backend, args.timeout)
    pa_log.write_text("".join((args.out / f"patched.{i}.jsonl").read_text() for i in range(len(runs))
                              if (args.out / f"patched.{i}.jsonl").exists()))

    unpatched, patched = load(un_log), load(pa_log)
    res = compare(unpatched, patched)
    for t, (u, p) in sorted(res["pairs"].items()):
        if not args.quiet or u != p:
            print(f"{u:>8} {p:>8}  {t}")
    print(f"\ncompared {res['tests']} tests (hub tests left out: {res['hub']})")
    print(f"unpatched: {_counts(res['unpatched'])}\npatched:   {_counts(res['patched'])}")
    print(f"tests with at least one fused layer: {res['fused_tests']}")
    print(f"pass -> fail ({len(res['pass_fail'])}):")
    for t in res["pass_fail"]:
        print(f"  {t}: {patched[t].get('message', '')}")
    if args.results is not None:
        import peft
        import torch
        import transformers

        meta = {"date": datetime.date.today().isoformat(), "commit": commit,
                "peft": peft.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                "machine": f"{platform.machine()} CPU", "mode": args.mode, "backend": args.backend,
                "select": args.select, "keyword": args.keyword,
                "command": "python -m benchmarks.peft_suite " + " ".join(argv if argv is not None else sys.argv[1:]),
                "t_unpatched": _fmt_time(t_un), "t_patched": _fmt_time(t_pa),
                "only_fused": str(args.only_fused) if args.only_fused else None,
                "unpatched_from": " ".join(map(str, args.unpatched)) if args.unpatched else "this run"}
        write_results(args.results, res, patched, meta)
        print(f"wrote {args.results}")
    return 1 if res["pass_fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
