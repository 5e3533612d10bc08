"""The docs say what the code does: every count or rule the code can answer is checked here.

Facts that a test reads from a page are marked there with an HTML comment, ``<!-- fact-table: NAME -->``,
followed by a Markdown table; the test parses that table and compares each row with the code:

* docs/kernels.md, ``launches-per-step``: the Triton launches of one forward and backward, counted
  by wrapping the ``run`` of Triton's kernel objects (every ``kernel[grid](...)`` goes through it; on
  a GPU, direct launches are switched off for the count);
* docs/tuning.md, ``auto-h200``: what ``backend="auto"`` runs at given shapes, asked of
  ``tuning.auto_backend`` with a fake GPU and a table holding the entries the page names (and the
  committed H200 table holds exactly those);
* docs/design.md, ``saved-for-backward``: what each backend keeps for backward, seen through
  ``saved_tensors_hooks``.

Single values are marked ``<!-- fact: NAME = VALUE -->`` (docs/kernels.md: the most candidate
configs a kernel family has). And across README.md and docs/: the README's API table against the
signatures, the set-up facts (extras, versions) against pyproject.toml, every repository path,
module and test named (and a row in docs/testing.md for every test file), every relative link and
anchor, every ``python -m benchmarks.X`` command with its flags, every other ``--flag`` named, and
the README's usage block, run on the CPU.

Recorded figures: every figure quoted in the same sentence or table row as a link to a file under
benchmarks/results/ appears in that file; the kernels docs/kernels.md lists as not yet run on a GPU
are those whose source differs from benchmarks/results/gpu_kernels.json, the record of the last GPU
run (``python tests/test_docs.py record benchmarks/results/<run>/summary.md`` writes it).
"""
import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rslora_kernels as rk
from rslora_kernels import _runtime

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _page(name: str) -> str:
    return (ROOT / name).read_text()


def fact_table(page: str, name: str):
    """The rows (dicts keyed by the header cells) of the Markdown table after ``<!-- fact-table: name -->``."""
    text = _page(page)
    marker = f"<!-- fact-table: {name} -->"
    assert text.count(marker) == 1, f"{page} must hold the marker {marker!r} once, above its table"
    lines = text.split(marker, 1)[1].lstrip("\n").splitlines()
    table = []
    for line in lines:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert len(table) >= 3 and set("".join(table[1])) <= set("-: "), f"{page}: no table after {marker}"
    header = [h.replace("`", "") for h in table[0]]
    return [dict(zip(header, row)) for row in table[2:]]


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


# ----------------------------------------------------------------------------------------------
# docs/kernels.md: launches per step
# ----------------------------------------------------------------------------------------------
# case of the table -> (M, K, N, r, p, bias, op). On the GPU in bf16, in the interpreter in fp32;
# at these sizes B3 splits M at M = 300 and not at M = 100 on both (4 nominal SMs in the
# interpreter, >= 100 on a GPU), and r = 200 is beyond F1's rank tile on both.
LAUNCH_CASES = {
    "p = 0": (100, 96, 80, 16, 0.0, True, "lora"),
    "p > 0, F1 draws the mask": (100, 96, 80, 16, 0.1, True, "lora"),
    "p > 0, keep-bits pass before F1": (100, 96, 80, 200, 0.1, True, "lora"),
    "B3 split over M, bias": (300, 96, 80, 16, 0.0, True, "lora"),
    "B3 split over M, no bias": (300, 96, 80, 16, 0.0, False, "lora"),
    "DoRA, p > 0": (100, 96, 80, 16, 0.1, True, "dora"),
    "group of three members, p = 0": (100, 96, 80, 16, 0.0, True, "group"),
    "plan rank_mm, p = 0": (100, 96, 80, 16, 0.0, True, "rank_mm"),
    "plan rank_mm, p > 0 (keep-bits pass, drop(x) formed)": (100, 96, 80, 16, 0.1, True, "rank_mm"),
    "F1 and B1 split over K and N, p > 0": (100, 256, 256, 16, 0.1, True, "split-K"),
}


def _split_shrinks(request):
    """Shrink configs that split the reduction (32-wide steps, 8 programs a SM): F1 and B1 over K = N = 256."""
    if request.family in ("shrink", "shrink_masked"):
        return dict(BLOCK_M=64, BLOCK_F=0, BLOCK_RED=32, BLOCK_R=64, SPLIT_PER_SM=8)
    return None


def test_launch_table_lists_the_cases_counted_here():
    assert [row["case"] for row in fact_table("docs/kernels.md", "launches-per-step")] == list(LAUNCH_CASES)


@pytest.mark.parametrize("row", fact_table("docs/kernels.md", "launches-per-step"), ids=lambda row: row["case"])
def test_launches_per_step_match_kernels_md(row, kernel_launches):
    import contextlib

    from rslora_kernels.ops import tuning

    M, K, N, r, p, with_bias, op = LAUNCH_CASES[row["case"]]
    plan = {"rank_mm": lambda: tuning.forced_plan("rank_mm"),
            "split-K": lambda: tuning.forced_configs(_split_shrinks)}.get(op, contextlib.nullcontext)
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(11)
    make = lambda *shape: (torch.randn(*shape, generator=g) / shape[-1] ** 0.5).to(DEVICE, dtype)  # noqa: E731
    x, W, A, B = make(M, K).requires_grad_(), make(N, K), make(r, K).requires_grad_(), make(N, r).requires_grad_()
    bias = make(N).requires_grad_() if with_bias else None
    if op == "dora":
        magnitude = (torch.rand(N, generator=g) + 0.5).to(DEVICE, dtype).requires_grad_()
        y = rk.dora_linear(x, W, A, B, magnitude, 0.5, bias=bias, dropout_p=p, seed=5, backend="triton")
    elif op in ("rank_mm", "split-K"):
        with plan():
            y = rk.lora_linear(x, W, A, B, 0.5, bias=bias, dropout_p=p, seed=5, backend="triton")
            forward = [launch.name for launch in kernel_launches]
            y.float().square().sum().backward()
    elif op == "group":  # members of N, N/2 and N/4 features (q, k, v), one bias each
        Ns = (N, N // 2, N // 4)
        Ws = [W[:n] for n in Ns]
        As = [make(r, K).requires_grad_() for _ in Ns]
        Bs = [make(n, r).requires_grad_() for n in Ns]
        biases = [make(n).requires_grad_() for n in Ns]
        y = torch.cat(rk.lora_linear_group(x, Ws, As, Bs, 0.5, biases=biases, dropout_ps=p, backend="triton"), dim=1)
    else:
        y = rk.lora_linear(x, W, A, B, 0.5, bias=bias, dropout_p=p, seed=5, backend="triton")
    if op not in ("rank_mm", "split-K"):
        forward = [launch.name for launch in kernel_launches]
        y.float().square().sum().backward()
    backward = [launch.name for launch in kernel_launches[len(forward):]]

    # each row's condition holds, so the row is counted where it claims to be
    assert ("_keep_bits_kernel" in forward) == ("keep-bits pass" in row["case"]), forward
    assert ("_sum_splits_kernel" in backward) == ("split over" in row["case"]), backward
    assert ("_sum_splits_kernel" in forward) == ("split over K" in row["case"]), forward
    assert ("_shrink_kernel" in forward + backward) == ("rank_mm" not in row["case"]), forward + backward
    got = {"forward": len(forward), "backward": len(backward), "step": len(forward) + len(backward)}
    stated = {k: int(row[k]) for k in got}
    assert got == stated, (f"docs/kernels.md, Launches per step, '{row['case']}': the page says {stated}, "
                           f"the code launches {got}: forward {forward}, backward {backward}")


# ----------------------------------------------------------------------------------------------
# docs/tuning.md: what backend="auto" runs
# ----------------------------------------------------------------------------------------------
H200_ENTRIES = [(8192, 4096, 4096, 16), (8192, 4096, 4096, 256)]  # (M, N, K, r), bf16, triton faster


def _values(cell: str):
    """'8192' -> [8192]; '5 to 32' -> 5..32 (every integer)."""
    m = re.fullmatch(r"(\d+)(?: to (\d+))?", cell.strip())
    assert m, f"docs/tuning.md, auto table: cannot read {cell!r} (a number or 'A to B')"
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    return range(lo, hi + 1)


@pytest.fixture
def fake_h200(monkeypatch, tmp_path):
    import json

    from rslora_kernels.ops import tuning

    table = {"format": tuning.FORMAT_VERSION, "dry_run": False, "gpu": "NVIDIA H200", "arch": 90, "configs": [],
             "backends": [{"dtype": "bfloat16", "M": M, "N": N, "K": K, "r": r, "backend": "triton",
                           "ms": {"triton": 1.0, "composite": 1.1}} for M, N, K, r in H200_ENTRIES]}
    if hasattr(tuning, "kernel_hash"):  # entries measured on the running kernels
        for entry in table["backends"]:
            entry["kernels"] = tuning.kernel_hash()
    (tmp_path / "nvidia-h200.json").write_text(json.dumps(table))
    monkeypatch.setattr(tuning, "TUNED_DIR", tmp_path)
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    monkeypatch.setattr(_runtime, "gpu_name", lambda device=None: "NVIDIA H200")
    tuning.reload_tables()
    yield tuning
    monkeypatch.undo()
    tuning.reload_tables()


def test_auto_backend_matches_tuning_md(fake_h200):
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    rows = fact_table("docs/tuning.md", "auto-h200")
    assert rows
    for row in rows:
        want = row["auto runs"]
        for M in _values(row["M"]):
            for KN in _values(row["K = N"]):
                for r in _values(row["r"]):
                    got = fake_h200.auto_backend(cuda, torch.bfloat16, M, KN, KN, r)
                    assert got == want, f"docs/tuning.md says auto runs {want} at M={M}, K=N={KN}, r={r}; the rule gives {got}"
    # "fp16 and fp32 calls run composite there"
    for dtype in (torch.float16, torch.float32):
        assert fake_h200.auto_backend(cuda, dtype, 8192, 4096, 4096, 16) == "composite"


def test_auto_with_the_committed_h200_table_as_tuning_md_says(monkeypatch):
    """What `auto` runs on an H200 with the committed table (stale entries answer nothing)."""
    from rslora_kernels.ops import tuning

    stated = fact("docs/tuning.md", "h200-committed-table-auto")
    monkeypatch.delenv(tuning.TABLE_ENV, raising=False)
    monkeypatch.setattr(_runtime, "gpu_name", lambda device=None: "NVIDIA H200")
    tuning.reload_tables()
    try:
        for M, N, K, r in H200_ENTRIES:
            assert tuning.auto_backend(torch.device("cuda"), torch.bfloat16, M, N, K, r) == stated
    finally:
        monkeypatch.undo()
        tuning.reload_tables()


def test_the_committed_h200_table_holds_the_entries_tuning_md_names():
    import json

    from rslora_kernels.ops import tuning

    table = json.loads((tuning.TUNED_DIR / "nvidia-h200.json").read_text())
    got = sorted((e["M"], e["N"], e["K"], e["r"], e["dtype"], e["backend"]) for e in table["backends"])
    assert got == sorted((*e, "bfloat16", "triton") for e in H200_ENTRIES)
    text = _page("docs/tuning.md")
    assert "M = 8192, r = 16 and 256" in text and "7b-attn" in text


# ----------------------------------------------------------------------------------------------
# docs/design.md: what each backend saves for backward
# ----------------------------------------------------------------------------------------------
SAVED_WORDS = {  # phrase in the "saves" cell -> the kind of tensor the hook classifies
    "x (a view": "x", "T [M, r]": "T", ", T": "T", "keep-bits": "keep-bits", "the seed": "seed",
    "dropped copy of x": "dropped x", "the mask": "mask",
}


def _stated_saves(cell: str):
    return {kind for phrase, kind in SAVED_WORDS.items() if phrase in cell.replace("`", "")}


@pytest.mark.parametrize("backend", ["triton", "composite", "reference"])
def test_saved_for_backward_matches_design_md(backend):
    rows = {row["path"].strip("`"): row for row in fact_table("docs/design.md", "saved-for-backward")}
    row = rows[backend]
    M, K, N, r, p = 40, 70, 20, 6, 0.25
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(DEVICE).requires_grad_()
    W, A, B = (torch.randn(*s, generator=g).to(DEVICE) for s in ((N, K), (r, K), (N, r)))
    A.requires_grad_(), B.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rk.lora_linear(x, W, A, B, 0.5, dropout_p=p, seed=9, backend=backend)
    mask = rk.dropout_mask(9, (M, K), p, device=DEVICE)
    kinds, x_sized = set(), set()
    for t in saved:
        if any(t.untyped_storage().data_ptr() == q.untyped_storage().data_ptr() for q in (W, A, B)):
            continue  # parameters and views of them (W^T): references, no memory
        if t.dtype.is_floating_point and t.numel() == M * K:
            x_sized.add(t.data_ptr())
        if t.data_ptr() == x.data_ptr() and t.shape == x.shape:
            kinds.add("x")
        elif t.dtype == torch.int32 and tuple(t.shape) == (M, -(-K // 32)):
            kinds.add("keep-bits")
        elif t.dtype == torch.int64 and t.dim() == 0:
            kinds.add("seed")
        elif tuple(t.shape) == (M, r):
            kinds.add("T")
        elif tuple(t.shape) == (M, K) and torch.equal(t, mask.to(t.dtype)):
            kinds.add("mask")
        elif tuple(t.shape) == (M, K) and torch.allclose(t, x.detach() * mask / (1 - p)):
            kinds.add("dropped x")
        else:
            kinds.add(f"unexpected {t.dtype} {tuple(t.shape)}")
    assert kinds == _stated_saves(row["saves"]), f"docs/design.md, Memory, {backend}: says {row['saves']!r}"
    stated_x_sized = int(re.match(r"\d+", row["[M, K]-sized tensors"]).group())
    assert len(x_sized) == stated_x_sized


# ----------------------------------------------------------------------------------------------
# README set-up: extras and versions against pyproject.toml
# ----------------------------------------------------------------------------------------------
def _pyproject():
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads(_page("pyproject.toml"))


def _requirement_name(req: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", req).group()


def test_readme_extras_match_pyproject():
    extras = _pyproject()["project"]["optional-dependencies"]
    setup = _page("README.md").split("## Set-up", 1)[1].split("\n## ", 1)[0]
    sentence = " ".join(setup.split("Extras:", 1)[1].split(";", 1)[0].split())
    stated = dict(re.findall(r"`([\w-]+)` \(([^)]*)\)", sentence))
    assert set(stated) == set(extras), f"README's extras {sorted(stated)}, pyproject's {sorted(extras)}"
    all_of = re.fullmatch(r"rslora-kernels\[([\w,-]+)\]", extras["all"][0]).group(1).split(",")
    assert len(extras["all"]) == 1 and set(all_of) == set(extras) - {"all"}, "the `all` extra is every other extra"
    for name, reqs in extras.items():
        if name == "all":
            continue
        items = [item.strip() for item in stated[name].split(",")]
        assert {i for i in items if re.fullmatch(r"[\w.-]+", i)} == {_requirement_name(q) for q in reqs}, name
        needs_310 = any("python_version >= '3.10'" in q for q in reqs)
        assert needs_310 == ("Python 3.10+" in stated[name]), name


def test_readme_versions_match_pyproject():
    project = _pyproject()["project"]
    readme = " ".join(_page("README.md").split())
    deps = {_requirement_name(d): d for d in project["dependencies"]}
    assert f"Python {project['requires-python'].lstrip('>=')}+" in readme
    assert re.search(r"torch>=(\d+\.\d+)", deps["torch"]).group(1) == re.search(r"torch (\d+\.\d+)\+", readme).group(1)
    lo, hi = re.search(r"Triton (\d+\.\d+) to (\d+\.\d+)", readme).groups()
    assert f"triton>={lo},<3.{int(hi.split('.')[1]) + 1}" in deps["triton"]


# ----------------------------------------------------------------------------------------------
# Links
# ----------------------------------------------------------------------------------------------
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: markup dropped, lower case, punctuation removed, spaces -> '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(path: Path):
    text = _without_code_blocks(path.read_text())
    slugs, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, flags=re.M):
        slug = _slug(heading)
        slugs.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return slugs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    text = re.sub(r"`[^`\n]*`", "", _without_code_blocks(page.read_text()))  # code is not a link
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


# ----------------------------------------------------------------------------------------------
# Commands and flags
# ----------------------------------------------------------------------------------------------
class _Parser(Exception):
    def __init__(self, parser):
        self.parser = parser


def _flags_of_module(module: str):
    """The option strings of ``python -m <module>``'s argparse parser: its ``main`` is called with
    ``parse_args`` replaced by a trap that hands back the parser (nothing runs); modules without
    ``main`` are asked for ``--help`` in a subprocess."""
    mod = importlib.import_module(module)
    if hasattr(mod, "main"):
        def trap(self, *args, **kwargs):
            raise _Parser(self)

        original = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
        argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = trap
        try:
            mod.main([])
        except _Parser as caught:
            return set(caught.parser._option_string_actions)
        finally:
            argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = original
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(re.findall(r"(?<![\w-])--?[\w-]+", out.stdout))


def _doc_lines():
    """(page, line) for every line of README and docs/, backslash continuations joined."""
    for page in PAGES:
        text = page.read_text().replace("\\\n", " ")
        for line in text.splitlines():
            yield page.relative_to(ROOT), line


# flags of tools other than this project's: pytest-benchmark, compute-sanitizer, ptxas
EXTERNAL_FLAGS = {"--benchmark-only", "--benchmark-autosave", "--benchmark-compare", "--tool", "--error-exitcode",
                  "--gpu-name", "--index-url"}


def _named_commands():
    """{command: {flags given with it}} for `python -m benchmarks.X` (or `rslora_kernels.X`), `python examples/X.py` and
    `bash benchmarks/X.sh` in README and docs/ (the flags up to the end of the code span or comment)."""
    commands = {}
    pattern = r"(?:python -m ((?:benchmarks|rslora_kernels)\.\w+)|python (examples/\w+\.py)|bash (benchmarks/\w+\.sh))([^`#|]*)"
    for page, line in _doc_lines():
        for module, script, shell, rest in re.findall(pattern, line):
            flags = {f.split("=")[0] for f in re.findall(r"(?<![\w-])--[\w-]+(?:=\S*)?", rest)}
            commands.setdefault(module or script or shell, set()).update(flags)
    return commands


def test_every_named_command_and_its_flags_exist():
    missing = []
    for command, flags in sorted(_named_commands().items()):
        if command.endswith(".sh"):
            text = (ROOT / command).read_text()
            missing += [f"{command} {f}" for f in flags if f not in text]
            continue
        if command.endswith(".py"):
            module = command[:-3].replace("/", ".")
        else:
            module = command
            assert (ROOT / (module.replace(".", "/") + ".py")).exists(), f"{command}: no such module"
        known = _flags_of_module(module)
        missing += [f"{command} {f}" for f in flags if f not in known]
    assert not missing, "flags named in the docs that the command does not take: " + ", ".join(missing)


def test_every_flag_named_in_the_docs_exists():
    """Flags named in prose (`--timing graph`) belong to one of the project's commands (or to a tool
    the docs name: pytest-benchmark, compute-sanitizer, ptxas, pip)."""
    known = set(EXTERNAL_FLAGS)
    for command in _named_commands():
        if command.endswith(".sh"):
            known |= set(re.findall(r"--[\w-]+", (ROOT / command).read_text()))
        else:
            known |= _flags_of_module(command[:-3].replace("/", ".") if command.endswith(".py") else command)
    unknown = sorted({f"{page}: {flag}" for page, line in _doc_lines() for span in re.findall(r"`([^`]+)`", line)
                      + ([line] if line.startswith("    ") else [])
                      for flag in re.findall(r"(?<![\w-])--[A-Za-z][\w-]*", span) if flag not in known})
    assert not unknown, unknown


# ----------------------------------------------------------------------------------------------
# The README's usage block
# ----------------------------------------------------------------------------------------------
def test_readme_usage_block_runs_on_the_cpu():
    """The first Python block of README's Usage, with device="cuda" replaced by device="cpu" (the
    only change), runs on the CPU (``auto`` picks the composite backend there) and gives what its
    comments say: y bf16 [M, N], x.grad bf16, A.grad and B.grad fp32."""
    usage = _page("README.md").split("## Usage", 1)[1]
    block = re.search(r"```python\n(.*?)```", usage, flags=re.S).group(1)
    assert 'device="cuda"' in block
    namespace = {}
    exec(compile(block.replace('device="cuda"', 'device="cpu"'), "README.md usage", "exec"), namespace)
    y, x, A, B = (namespace[k] for k in ("y", "x", "A", "B"))
    M, N = namespace["M"], namespace["N"]
    assert y.dtype == torch.bfloat16 and tuple(y.shape) == (M, N)
    assert x.grad.dtype == torch.bfloat16 and A.grad.dtype == B.grad.dtype == torch.float32
    assert torch.isfinite(y.float()).all() and B.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# The README's API table
# ----------------------------------------------------------------------------------------------
def _api_signatures():
    """(call, [argument texts]) for every `rk.name(...)` in the first column of README's API table."""
    api = _page("README.md").split("## API", 1)[1].split("\n## ", 1)[0]
    calls = []
    for line in api.splitlines():
        if line.startswith("| `rk."):
            first = line.split(" | ", 1)[0]
            calls += [(name, [a.strip() for a in args.split(",") if a.strip()])
                      for name, args in re.findall(r"`(rk\.[\w.]+)\(([^)]*)\)`", first)]
    return calls


def test_readme_api_table_matches_the_signatures():
    """Each parameter the table names exists, in the stated order, with the stated default."""
    import ast
    import inspect

    calls = _api_signatures()
    assert len(calls) >= 10
    for call, args in calls:
        obj = rk
        for part in call.split(".")[1:]:
            obj = getattr(obj, part)
        params = inspect.signature(obj).parameters
        names = list(params)
        at = -1
        for arg in args:
            if arg in ("...", "*"):
                continue
            name, _, default = arg.partition("=")
            assert name in params, f"README API: {call} has no parameter {name!r} ({names})"
            assert names.index(name) > at, f"README API: {call}'s {name!r} is out of order ({names})"
            at = names.index(name)
            stated = ast.literal_eval(default) if default and default != "..." else inspect.Parameter.empty
            if default != "...":
                assert params[name].default == stated, f"README API: {call}({name}={params[name].default!r}), not {default}"


def fact(page: str, name: str) -> str:
    """The value of ``<!-- fact: name = value -->`` on ``page``."""
    found = re.findall(rf"<!--\s*fact:\s*{re.escape(name)}\s*=\s*(.+?)\s*-->", _page(page), flags=re.S)
    assert len(found) == 1, f"{page} must hold <!-- fact: {name} = ... --> once"
    return found[0].strip()


def test_candidate_configs_per_family_as_kernels_md_says(monkeypatch):
    import collections

    from rslora_kernels.ops import configs

    monkeypatch.setattr(configs, "interpreting", lambda: False)  # the GPU's configs, not the interpreter's
    stated = int(fact("docs/kernels.md", "candidate-configs-per-family-at-most"))
    families, most = set(), 0
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for arch in (80, 90):
            counts = collections.Counter(family for family, _ in configs.candidate_configs(dtype, arch))
            families |= set(counts)
            most = max(most, *counts.values())
    assert most == stated, f"docs/kernels.md: at most {stated} configs a family; the most is {most}"
    text = _page("docs/kernels.md").split("`candidate_configs(dtype, arch)` lists", 1)[1].split("\n\n", 1)[0]
    assert all(f"`{family}`" in text for family in families), f"docs/kernels.md names the families {sorted(families)}"


# ----------------------------------------------------------------------------------------------
# Names: files, folders, modules and tests the docs name
# ----------------------------------------------------------------------------------------------
REPO_DIRS = ("rslora_kernels/", "benchmarks/", "tests/", "csrc/", "examples/", ".ci/")


def _code_spans():
    for page in PAGES:
        for span in re.findall(r"`([^`\n]+)`", _without_code_blocks(page.read_text())):
            yield page.relative_to(ROOT), span.strip()


def test_named_paths_and_modules_exist():
    """Every repository path (`benchmarks/timing.py`, `tests/test_x.py::test_y`) and every dotted
    name under `rslora_kernels.` in a code span of README or docs/ exists."""
    missing = []
    for page, span in _code_spans():
        if span.startswith(REPO_DIRS) and re.fullmatch(r"[\w./-]+(::\w+)?", span):
            path, _, test = span.partition("::")
            if not (ROOT / path).exists():
                missing.append(f"{page}: {span}")
            elif test and not re.search(rf"^def {test}\(", (ROOT / path).read_text(), flags=re.M):
                missing.append(f"{page}: {span} (no such test)")
        elif re.fullmatch(r"rslora_kernels(\.\w+)+", span):
            parts = span.split(".")
            for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    continue
                try:
                    for attr in parts[i:]:
                        obj = getattr(obj, attr)
                except AttributeError:
                    missing.append(f"{page}: {span}")
                break
    assert not missing, missing


def test_testing_md_has_a_row_for_every_test_file():
    rows = re.findall(r"^\| `(tests/test_\w+\.py)` \|", _page("docs/testing.md"), flags=re.M)
    files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
    assert sorted(rows) == files, f"docs/testing.md's per-file table: rows {sorted(set(rows) ^ set(files))} differ"


# ----------------------------------------------------------------------------------------------
# Figures quoted next to a recorded measurement
# ----------------------------------------------------------------------------------------------
RESULTS = ROOT / "benchmarks" / "results"
_NUM = r"\d+(?:\.\d+)?"
# a ratio (1.18x), a range (0.81-0.89x, 1.05x to 1.16x) or a decimal (0.23 ms, 0.515); not a tile
# (128x256), a version inside a name, a commit id or a number glued to a word
_FIGURE = re.compile(rf"(?<![\w.\-/=^])({_NUM})(x?)(?:(?:-| to )({_NUM})(x?))?(?![\w])")
# a figure computed from two quoted ones, written out: "1.172 / 0.851 = 1.38x"
_QUOTIENT = re.compile(rf"(?<![\w.])({_NUM}) / ({_NUM}) = ({_NUM})(x?)(?![\w])")
# targets and bounds are not measurements: "at least 1.3x", "the goal, 0.6x"
_NOT_MEASURED = re.compile(rf"(?:at least|at most|goal,?|target,?) ({_NUM})x?|"
                           rf"(?:Triton|torch|Python|CUDA|peft|bitsandbytes|numpy) {_NUM}(?:\.\d+)*\+?")


def _figures(text: str):
    """The measured figures of a sentence or table row: ratios keep their x (so 1.18x must appear
    as a ratio), decimals are bare numbers; code spans and link targets are not read. Returns the
    figures and the errors of the quotients written out."""
    text = re.sub(r"`[^`]*`", " ", text)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = _NOT_MEASURED.sub(" ", text)
    figures, errors = [], []
    for m in _QUOTIENT.finditer(text):
        a, b, c, _ = m.groups()
        figures += [a, b]
        decimals = len(c.partition(".")[2])
        if round(float(a) / float(b), decimals) != float(c):
            errors.append(f"{m.group()} (it is {float(a) / float(b):.{decimals + 2}f})")
    for m in _FIGURE.finditer(_QUOTIENT.sub(" ", text)):
        a, ax, b, bx = m.groups()
        ratio = bool(ax or bx)
        figures += [n + "x" if ratio else n for n in (a, b) if n is not None and (ratio or "." in n)]
    return figures, errors


def _appears(figure: str, text: str) -> bool:
    """A ratio as a ratio (1.18x) or as a bare table cell (| 1.18 |); a decimal as itself."""
    if figure.endswith("x"):
        return re.search(rf"(?<![\d.]){re.escape(figure[:-1])}(?:x(?!\w)|\s*\|)", text) is not None
    return re.search(rf"(?<![\d.]){re.escape(figure)}(?!\d)", text) is not None


def _units(text: str):
    """(unit, context): every table row with the paragraph above its table when that paragraph ends
    with ':' (it introduces the table, and its links are the rows' sources), and every sentence of
    prose (paragraphs and list items); code blocks are skipped."""
    previous = ""
    for block in re.split(r"\n[ \t]*\n", _without_code_blocks(text)):
        lines = block.strip("\n").splitlines()
        if not lines or all(line.startswith("    ") for line in lines):
            continue
        if lines[0].startswith("|"):
            for row in lines[2:]:
                yield row, previous if previous.rstrip().endswith(":") else ""
        else:
            items, item = [], []
            for line in lines:
                if re.match(r"\s{0,3}(?:[-*]|\d+\.) ", line) and item:
                    items.append(" ".join(item))
                    item = []
                item.append(line.strip())
            items.append(" ".join(item))
            for one in items:
                for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z*\[`(])", one):
                    yield sentence, ""
        previous = block


def _result_files(page: Path, text: str):
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path = (page.parent / target.split("#")[0]).resolve()
        if RESULTS in path.parents and path.is_file() and path.suffix in (".md", ".json", ".csv"):
            yield path


def _sources(page: Path, unit: str, context: str):
    return sorted(set(_result_files(page, unit)) or set(_result_files(page, context)))


def figure_problems(pages, read=lambda path: path.read_text()):
    """Each figure quoted in a sentence or table row that links a file under benchmarks/results/,
    missing from every results file linked there; ``read`` reads a results file (a test swaps it)."""
    problems = []
    for page in pages:
        for unit, context in _units(page.read_text()):
            files = _sources(page, unit, context)
            if not files:
                continue
            figures, errors = _figures(unit)
            recorded = "\n".join(read(f) for f in files)
            missing = [f for f in figures if not _appears(f, recorded)]
            if missing or errors:
                problems.append(f"{page.relative_to(ROOT)}: {', '.join(missing + errors)} not in "
                                f"{', '.join(f.name for f in files)}: {unit.strip()[:160]}")
    return problems


FIGURE_PAGES = [*PAGES, RESULTS / "README.md"]


def test_results_index_links_every_recorded_file():
    index = (RESULTS / "README.md").read_text()
    linked = {target.split("/")[0] for target in re.findall(r"\]\(([^)#\s]+)\)", index)}
    unlisted = sorted(p.name for p in RESULTS.iterdir() if p.name != "README.md" and p.name not in linked)
    assert not unlisted, f"benchmarks/results/README.md does not link {unlisted}"
    rows = [line for line in index.split("| file |", 1)[1].splitlines()[2:]]
    table = rows[:next((i for i, line in enumerate(rows) if not line.startswith("|")), len(rows))]
    assert all(line.startswith("| [") for line in table) and len(table) == len(re.findall(r"^\| \[", index, flags=re.M)), \
        "the index is one table: no blank line or other text between its rows"


def test_figures_next_to_a_results_link_are_the_recorded_ones():
    problems = figure_problems(FIGURE_PAGES)
    assert not problems, "\n".join(problems)


def test_a_changed_recorded_figure_is_caught():
    """The check above fails when a results file no longer holds a figure a page quotes: every
    quoted ratio, changed by 0.01 in its results file, is reported."""
    train_step = RESULTS / "2026-12-06_train_step_cpu.md"
    original = train_step.read_text()
    quoted = [f for unit, context in _units(_page("README.md")) if train_step in _sources(ROOT / "README.md", unit, context)
              for f in _figures(unit)[0] if f.endswith("x")]
    assert quoted, "README quotes the training step's ratios next to its results file"
    before = set(figure_problems([ROOT / "README.md"]))
    for figure in quoted:
        changed = f"{float(figure[:-1]) + 0.01:.{len(figure[:-1].partition('.')[2])}f}x"
        altered = re.sub(rf"(?<![\d.]){re.escape(figure)}(?!\w)", changed, original)
        read = lambda path, altered=altered: altered if path == train_step else path.read_text()  # noqa: E731
        new = set(figure_problems([ROOT / "README.md"], read)) - before
        assert any(figure in problem for problem in new), f"{figure} changed in the results file went unnoticed"
    assert _figures("speedup 1.172 / 0.851 = 1.50x")[1], "a wrong quotient is reported"


# ----------------------------------------------------------------------------------------------
# Which kernels have run on a GPU
# ----------------------------------------------------------------------------------------------
GPU_RECORD = RESULTS / "gpu_kernels.json"


def _is_jit(decorator) -> bool:
    f = decorator.func if hasattr(decorator, "func") else decorator
    return getattr(f, "attr", getattr(f, "id", None)) == "jit"


def kernel_source_hashes(root: Path):
    """{kernel: 16 hex digits of SHA-256} for every Triton kernel (a ``triton.jit`` function named
    ``*_kernel``) under ``root/rslora_kernels``: its code and the code of every ``triton.jit``
    function and module-level assignment it reaches by name, transitively, across the package (the
    stream's helpers and constants included), read through ``ast.unparse`` without docstrings, so
    comments and formatting do not count and moving a kernel to another module does not either.
    (``tuning.kernel_hash`` hashes whole files, one hash for all kernels: it cannot say which kernel
    changed.)"""
    import ast
    import hashlib

    defs, kernels = {}, []
    for path in sorted((root / "rslora_kernels").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(getattr(first, "value", None), ast.Constant) \
                        and isinstance(first.value.value, str):
                    node.body = node.body[1:] or [ast.Pass()]
                defs.setdefault(node.name, []).append(node)
                kernels += [node.name] if node.name.endswith("_kernel") else []
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for name in ast.walk(target):
                        if isinstance(name, ast.Name):
                            defs.setdefault(name.id, []).append(node)
    hashes = {}
    for kernel in kernels:
        reached, todo = set(), [kernel]
        while todo:
            name = todo.pop()
            if name in reached or name not in defs:
                continue
            reached.add(name)
            todo += [getattr(n, "id", None) or getattr(n, "attr", None) for node in defs[name] for n in ast.walk(node)
                     if isinstance(n, (ast.Name, ast.Attribute))]
        digest = hashlib.sha256()
        for name in sorted(reached):
            for node in defs[name]:
                digest.update(ast.unparse(node).encode() + b"\0")
        hashes[kernel] = digest.hexdigest()[:16]
    return hashes


def gpu_run_record(summary: Path, root: Path = ROOT):
    """The record of a GPU run: the kernels its ``summary.md`` names (every kernel it compiled and
    ran; its steps all passed) with their source hashes in the tree at ``root``, which must be the
    run's commit."""
    import json

    ran = sorted(set(re.findall(r"\b(_\w+_kernel)\b", summary.read_text())))
    hashes = kernel_source_hashes(root)
    return json.dumps({"run": str(summary.relative_to(RESULTS)), "kernels": {k: hashes[k] for k in ran}}, indent=1) + "\n"


def not_yet_run_on_a_gpu(root: Path = ROOT):
    import json

    record = json.loads(GPU_RECORD.read_text())["kernels"]
    return {kernel for kernel, digest in kernel_source_hashes(root).items() if record.get(kernel) != digest}


_GPU_LIST_MARKER = "<!-- fact-list: not-yet-run-on-a-gpu -->"


def test_the_gpu_record_names_the_kernels_its_run_ran():
    import json

    record = json.loads(GPU_RECORD.read_text())
    summary = RESULTS / record["run"]
    assert summary.is_file(), f"{GPU_RECORD.name}: no run {record['run']}"
    assert set(record["kernels"]) == set(re.findall(r"\b(_\w+_kernel)\b", summary.read_text()))
    assert "FAIL" not in summary.read_text().split("## Environment")[0], "the recorded run's steps all passed"


def test_not_yet_run_on_a_gpu_lists_the_kernels_changed_since_the_last_gpu_run():
    """docs/kernels.md's list is the kernels whose source differs from the last GPU run's record
    (or that it lacks), and every other page that says so links to that list instead of naming kernels."""
    text = _page("docs/kernels.md")
    assert text.count(_GPU_LIST_MARKER) == 1
    paragraph = text.split(_GPU_LIST_MARKER, 1)[1].lstrip("\n").split("\n\n", 1)[0]
    stated = set(re.findall(r"`(_\w+_kernel)`", paragraph))
    changed = not_yet_run_on_a_gpu()
    assert stated == changed, (f"docs/kernels.md, not yet run on a GPU: the page lists {sorted(stated)}; the kernels "
                               f"changed since {GPU_RECORD.name}'s run are {sorted(changed)}")
    elsewhere = []
    for page in PAGES:
        body = _without_code_blocks(page.read_text())
        if page.name == "kernels.md":  # the list's own section
            body = re.sub(r"^### Run on a GPU\n.*?(?=^#)", "", body, flags=re.M | re.S)
        body = re.sub(r"\s+", " ", body)
        for m in re.finditer(r"(?i)\b(?:not (?:yet )?(?:been )?run on an? (?:GPU|H100|H200)|not yet GPU-run)", body):
            if not re.match(r"\]\((?:[\w./]*kernels\.md)?#run-on-a-gpu\)", body[m.end():]):
                elsewhere.append(f"{page.relative_to(ROOT)}: ...{body[max(0, m.start() - 60):m.end() + 40]}...")
    assert not elsewhere, "say 'not yet run on a GPU' as a link to docs/kernels.md#run-on-a-gpu: " + "; ".join(elsewhere)


def test_kernel_hashes_follow_the_code_a_kernel_reaches(tmp_path):
    """Changing a helper changes the hash of exactly the kernels that call it; a comment changes nothing."""
    import shutil

    shutil.copytree(ROOT / "rslora_kernels", tmp_path / "rslora_kernels", ignore=shutil.ignore_patterns("__pycache__"))
    before = kernel_source_hashes(tmp_path)
    kernels = tmp_path / "rslora_kernels" / "dropout" / "kernels.py"
    source = kernels.read_text()
    kernels.write_text(source.replace("def apply_keep(x, keep):\n", "def apply_keep(x, keep):\n    # a comment\n", 1))
    assert kernel_source_hashes(tmp_path) == before
    kernels.write_text(source.replace("return tl.where(keep, x, x * 0.0)", "return tl.where(keep, x, 0.0)", 1))
    after = kernel_source_hashes(tmp_path)
    changed = {k for k in before if before[k] != after[k]}
    assert {"_shrink_kernel", "_dual_gemm_kernel", "_m_reduce_kernel"} <= changed, changed  # they call apply_keep
    assert not changed & {"_merge_kernel", "_dequant_4bit_kernel", "_mask_kernel", "_sum_splits_kernel"}, changed


if __name__ == "__main__":  # python tests/test_docs.py record benchmarks/results/<run>/summary.md (at the run's commit)
    if sys.argv[1:2] == ["record"]:
        GPU_RECORD.write_text(gpu_run_record(Path(sys.argv[2]).resolve()))
    else:
        print(sorted(not_yet_run_on_a_gpu()))


def test_section_references_in_the_code_name_existing_headings():
    """Comments and docstrings cite pages by section (docs/design.md, Numerics rule; docs/kernels.md,
    "Host work per launch"): a quoted section begins one of the page's headings; unquoted, the words
    after the page name begin with one of its headings (up to the heading's colon)."""
    headings = {page.name: [re.sub(r"[`*]", "", h).strip().lower()
                            for h in re.findall(r"^#{1,6} (.+)$", _without_code_blocks(page.read_text()), flags=re.M)]
                for page in (ROOT / "docs").glob("*.md")}
    broken = []
    for path in sorted({*ROOT.glob("rslora_kernels/**/*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("benchmarks/*.py"),
                        *ROOT.glob("benchmarks/*.sh"), *ROOT.glob("examples/*.py")}):
        text = re.sub(r"\s*\n\s*(?:#\s*)?", " ", path.read_text())
        for m in re.finditer(r"docs/([\w-]+\.md),? \(?([\"']?)(?=[A-Z])", text):
            page_headings = headings.get(m.group(1), [])
            after = text[m.end():m.end() + 100].lower()
            if m.group(2):  # "Section": the quoted words begin a heading
                quoted = after.split(m.group(2), 1)[0]
                ok = any(h.startswith(quoted) for h in page_headings)
            else:
                ok = any(after.startswith(h.split(":")[0].strip()) for h in page_headings)
            if not ok:
                broken.append(f"{path.relative_to(ROOT)}: {m.group()}{text[m.end():m.end() + 40]}...")
    assert not broken, broken


def test_tuning_md_names_the_hashed_kernel_sources():
    from rslora_kernels.ops import tuning

    paragraph = _page("docs/tuning.md").split("**Only entries of the running kernels count.**", 1)[1].split("\n\n", 1)[0]
    assert set(re.findall(r"`([\w/]+\.py)`", paragraph)) == set(tuning.KERNEL_SOURCES), \
        f"docs/tuning.md lists the files kernel_hash() reads: {tuning.KERNEL_SOURCES}"


def test_readme_documentation_table_lists_every_page():
    table = _page("README.md").split("## Documentation", 1)[1]
    listed = set(re.findall(r"^\| \[docs/([\w-]+\.md)\]", table, flags=re.M)) | set(re.findall(r"\[docs/([\w-]+\.md)\]", table))
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    assert listed == pages, f"README's Documentation table: missing {sorted(pages - listed)}, extra {sorted(listed - pages)}"
