"""Every fenced ```python block of the README and docs/ is run here, or listed below with the reason it is not.

A block is named ``<file>#<heading slug>:<n>``: the page, the slug of the heading it sits under and its index
among that heading's Python blocks (0 first). :data:`RUN` names the blocks executed as written (``exec`` in a fresh
namespace, in a temporary working directory, offline); :data:`CHAINS` the consecutive blocks of one page that build
on each other and run in order in one namespace; :data:`LISTED` every other block with a one-line reason.
``test_every_block_is_triaged`` fails for a new block that is in none of them and for a stale name, so a docs
change that adds, moves or removes a block has to be triaged here.

A page that shows a block's printed output right after it (a ```text block) is compared to it only where the
output is deterministic structure (:data:`EXACT_OUTPUT`: names, reprs, messages, counts); training figures depend
on threads and machines, so there running without an error is the check. Absolute ``/tmp/...`` paths that a block
writes and reads are redirected into the test's temporary directory, so runs leave nothing behind and never meet
another user's files.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "docs" / "formulations").glob("*.md")),
]

_FENCE = re.compile(r"^(`{3,}|~{3,})\s*(\S*)")
_HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$")


@dataclass(frozen=True)
class Block:
    id: str
    page: Path
    line: int  # 1-based line of the block's first code line
    code: str
    output: str | None  # the ```text block right after it (only blank lines between), if the page shows one


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def collect_blocks() -> dict[str, Block]:
    blocks: dict[str, Block] = {}
    for page in PAGES:
        lines = page.read_text(encoding="utf-8").splitlines()
        name = page.relative_to(ROOT).as_posix()
        heading, counts = "", {}
        pending: tuple[str, int, str] | None = None  # the last python block, while only blank lines follow it
        i = 0
        while i < len(lines):
            fence = _FENCE.match(lines[i])
            if fence is None:
                if title := _HEADING.match(lines[i]):
                    heading = _slug(title.group(1))
                if lines[i].strip() and pending is not None:
                    blocks[pending[0]] = Block(pending[0], page, pending[1], pending[2], None)
                    pending = None
                i += 1
                continue
            end = i + 1
            while end < len(lines) and not lines[end].startswith(fence.group(1)):
                end += 1
            body = "\n".join(lines[i + 1 : end]) + "\n"
            if pending is not None:
                output = body if fence.group(2) == "text" else None
                blocks[pending[0]] = Block(pending[0], page, pending[1], pending[2], output)
                pending = None
            if fence.group(2) in ("python", "py"):
                n = counts.get(heading, 0)
                counts[heading] = n + 1
                pending = (f"{name}#{heading}:{n}", i + 2, body)
            i = end + 1
        if pending is not None:
            blocks[pending[0]] = Block(pending[0], page, pending[1], pending[2], None)
    return blocks


BLOCKS = collect_blocks()

# Run alone, each in a fresh namespace: most take well under 0.1 s on one core; the slowest is the tiny-BERT loop of
# own-loop.md (~3.5 s), then api.md's `run` and index.md's quick start (~1.5 s).
RUN = (
    "docs/add-a-feasible-set.md#the-worked-example-blocksparse-block-rxc:1",
    "docs/api.md#make-and-the-hyperparameters:0",
    "docs/api.md#the-lifecycle:0",
    "docs/api.md#calls-out-of-order:0",
    "docs/api.md#the-split-step-backward-and-post-step:0",
    "docs/api.md#the-split-step-backward-and-post-step:1",
    "docs/api.md#l0-s-gates-in-your-optimizer:0",
    "docs/api.md#prune-layerwise:0",
    "docs/api.md#run-and-runconfig:0",
    "docs/custom-constraints.md#userconstraint-fn-sense-restarts:0",
    "docs/custom-constraints.md#a-constraint-must-have-a-gradient:0",
    "docs/custom-constraints.md#own-step-sizes-and-proxy-measurements-dual-lr-strict-fn:0",
    "docs/custom-constraints.md#example-an-l2-budget-on-the-first-layer:0",
    "docs/custom-constraints.md#example-an-l2-budget-on-the-first-layer:1",
    "docs/custom-constraints.md#example-slr-with-a-user-constraint:0",
    "docs/index.md#quick-start:0",
    "docs/one-shot.md#from-python-prune-layerwise:1",
    "docs/one-shot.md#fine-tuning-after-one-shot-pruning:0",
    "docs/own-loop.md#a-transformers-model-dict-batches-compute-loss-amp-accumulation:0",
    "docs/own-loop.md#masked-fine-tuning-afterwards:0",
    "docs/problem-files.md#a-minimal-example-iris:0",
    "docs/problem-files.md#batches-that-are-not-x-y-compute-loss-and-predict:0",
    "docs/problem-files.md#targets:0",
    "docs/sets.md#the-lmo:0",
    "docs/sets.md#tie-breaking:0",
    "docs/formulations/magnitude.md#the-math-and-the-code-that-implements-it:0",
)

# Consecutive blocks of one page that continue each other: run in order, in one namespace.
CHAINS = (
    ("docs/api.md#targets-and-patterns:0", "docs/api.md#targets-and-patterns:1"),  # the joined list of the model above
    (
        "docs/own-loop.md#checkpoint-and-resume:0",
        "docs/own-loop.md#saving-the-pruned-model:0",  # "Continuing the script above"
        "docs/own-loop.md#saving-the-pruned-model:1",  # loads the file the block before saved
    ),
)

# Blocks that are not run, each with its reason. The text before the first colon is the kind:
#   excerpt     a fragment of a file (names it does not define, `...`), not a program
#   needs-files a user's own files or models, or the folder of a `constrainedsparse run` shown on the page
#   gpu         needs CUDA
#   slow        self-contained but well over ~3 s on one core
#   tested      run by another test module (named in the reason)
#   STALE       the docs are wrong: fix the page, then move the block to RUN
LISTED = {
    "README.md#your-own-loop-your-optimizer-a-constraint-of-yours:0": "tested: run and its output checked by "
    "tests/test_readme.py",
    "README.md#one-shot-pruning-of-a-pretrained-model:0": "slow: SmolLM2-135M, ~2 min on 2 cores",
    "docs/add-a-feasible-set.md#the-worked-example-blocksparse-block-rxc:0": (
        "excerpt: the BlockSparse class of constrainedsparse/sets/groups.py without the module's imports "
        "(re-registering the pattern would replace the library's class)"
    ),
    "docs/add-a-feasible-set.md#its-tests-joined-the-common-table:0": "excerpt: of tests/test_sets.py",
    "docs/add-a-feasible-set.md#its-tests-joined-the-common-table:1": "excerpt: of tests/test_sets.py",
    "docs/add-a-feasible-set.md#its-tests-joined-the-common-table:2": "excerpt: of tests/test_sets.py",
    "docs/add-a-feasible-set.md#from-the-command-line-at-once:0": (
        "needs-files: reads /tmp/docs-runs/block, written by the page's `constrainedsparse run` (console)"
    ),
    "docs/add-a-solver.md#the-worked-example-wanda-p:0": (
        "excerpt: of docs/examples/wanda_p.py, without its imports (tests/test_custom_solver.py runs the file)"
    ),
    "docs/add-a-solver.md#from-the-cli:0": "needs-files: a user's my_problem.py importing the user's my_solvers module",
    "docs/causal-lm.md#the-saved-model-loads-the-standard-way:0": (
        "needs-files: runs/smollm2-wanda/model and runs/minilm-fw/model from CLI runs"
    ),
    "docs/causal-lm.md#compressed-2-4-export:0": "needs-files: runs/smollm2-2of4/compressed from a CLI export",
    "docs/causal-lm.md#2-4-on-the-gpu-semi-structured-sparsity:0": "gpu: .cuda() and semi-structured sparse kernels",
    "docs/custom-constraints.md#a-macs-budget-next-to-the-density-constraint:0": (
        "excerpt: of constrainedsparse/problems/mnist1d_mlp_macs.py, with a `...` argument"
    ),
    "docs/one-shot.md#from-python-prune-layerwise:0": (
        "slow: SparseGPT 2:4 on all-MiniLM-L6-v2 and two SentenceTransformer encodes, ~13 s on one core"
    ),
    "docs/one-shot.md#the-saved-model:0": (
        "needs-files: /tmp/docs-runs/smollm2-24/model, written by the page's `constrainedsparse run smollm2-wiki`"
    ),
    "docs/own-loop.md#problems-own-loop-py-a-plain-pytorch-loop:0": (
        "excerpt: of problems/own_loop.py after its dense training"
    ),
    "docs/own-loop.md#evaluating-and-logging-during-training:0": (
        "excerpt: a loop over the user's model, problem, f, opt, epochs, batches, x_test, y_test"
    ),
    "docs/own-loop.md#transformers-trainer:0": (
        "excerpt: of docs/examples/hf_trainer.py (model, args, train, OUT, ... defined there; tests run the file)"
    ),
    "docs/problem-files.md#an-example-with-a-constraint-of-its-own-problems-breast-cancer-py:0": (
        "excerpt: of problems/breast_cancer.py"
    ),
    "docs/problem-files.md#errors-in-your-code:0": "excerpt: of the page's /tmp/cs-err/broken.py, without its imports",
    "docs/sets.md#the-fast-path-for-tensors-of-2-entries:0": (
        "slow: 16.8 M-entry tensors against a stable full sort, ~4 s on one core and ~1 GB"
    ),
    "docs/formulations/admm-layerwise.md#layer-wise-admm-mask-and-kept-weights-together:0": (
        "excerpt: the user's model and batches"
    ),
    "docs/formulations/l0.md#purging-structured-models:0": "excerpt: model is a hard-pruned model of the user's",
    "docs/formulations/l0.md#purging-structured-models:1": "needs-files: RUN/ stands for the --out folder of a CLI run",
}
KINDS = ("excerpt", "needs-files", "gpu", "slow", "tested", "STALE")

# Blocks whose printed output is deterministic structure (names, reprs, messages, counts): it must equal the page's.
EXACT_OUTPUT = {
    "docs/add-a-feasible-set.md#the-worked-example-blocksparse-block-rxc:1",
    "docs/api.md#targets-and-patterns:0",
    "docs/api.md#targets-and-patterns:1",
    "docs/api.md#make-and-the-hyperparameters:0",
    "docs/api.md#the-lifecycle:0",
    "docs/api.md#calls-out-of-order:0",
    "docs/api.md#l0-s-gates-in-your-optimizer:0",
    "docs/custom-constraints.md#userconstraint-fn-sense-restarts:0",
    "docs/custom-constraints.md#a-constraint-must-have-a-gradient:0",
    "docs/custom-constraints.md#own-step-sizes-and-proxy-measurements-dual-lr-strict-fn:0",
    "docs/own-loop.md#masked-fine-tuning-afterwards:0",
    "docs/problem-files.md#targets:0",
    "docs/sets.md#the-lmo:0",
    "docs/sets.md#tie-breaking:0",
}

_TMP_PATH = re.compile(r"""(["'])/tmp/""")


@pytest.fixture
def docs_env(tmp_path, monkeypatch):
    """A scratch working directory, offline hubs, one thread, and the global random state restored afterwards."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pages' timings (OMP_NUM_THREADS=1); more threads thrash on 2 shared cores
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield tmp_path / "abs"
    torch.set_num_threads(threads)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])


def _run(block: Block, namespace: dict, scratch: Path) -> None:
    code = _TMP_PATH.sub(lambda m: f"{m.group(1)}{scratch.as_posix()}/", block.code)
    scratch.mkdir(exist_ok=True)
    # padded so that a traceback names the page and the line of the page
    exec(compile("\n" * (block.line - 1) + code, str(block.page), "exec"), namespace)


def _check_output(block: Block, printed: str) -> None:
    if block.id in EXACT_OUTPUT:
        assert block.output is not None, f"{block.id}: the page shows no output block after it"
        assert printed.strip() == block.output.strip(), f"{block.id} printed other output than the page shows"


def _losses(printed: str) -> list[str]:
    return re.findall(r"last loss (\S+)", printed)


@pytest.mark.parametrize("block_id", RUN)
def test_block_runs(block_id, docs_env, capsys):
    assert block_id in BLOCKS, f"stale RUN entry {block_id}: no such block"
    block = BLOCKS[block_id]
    _run(block, {"__name__": "docs_block"}, docs_env)
    _check_output(block, capsys.readouterr().out)


@pytest.mark.parametrize("chain", CHAINS, ids=lambda chain: f"{chain[0]}+{len(chain) - 1}")
def test_chain_runs(chain, docs_env, capsys):
    namespace: dict = {"__name__": "docs_block"}
    printed = []
    for block_id in chain:
        assert block_id in BLOCKS, f"stale CHAINS entry {block_id}: no such block"
        _run(BLOCKS[block_id], namespace, docs_env)
        printed.append(capsys.readouterr().out)
        _check_output(BLOCKS[block_id], printed[-1])
    if chain[0] == "docs/own-loop.md#checkpoint-and-resume:0":
        uninterrupted, resumed = _losses(printed[0])
        assert uninterrupted == resumed, printed[0]  # the page's claim: resuming reproduces the run exactly
        assert printed[1].splitlines()[-1] == printed[2].splitlines()[-1]  # the saved file gives the same outputs


def test_every_block_is_triaged():
    chained = [block_id for chain in CHAINS for block_id in chain]
    triaged = [*RUN, *chained, *LISTED]
    assert len(triaged) == len(set(triaged)), "a block is named twice in RUN, CHAINS and LISTED"
    untriaged = sorted(set(BLOCKS) - set(triaged))
    assert not untriaged, "new docs blocks: add each to RUN, CHAINS or LISTED (with a reason):\n" + "\n".join(untriaged)
    stale = sorted(set(triaged) - set(BLOCKS))
    assert not stale, "no such docs block (moved, renamed or removed?):\n" + "\n".join(stale)
    assert EXACT_OUTPUT <= set(RUN) | set(chained)
    for block_id, reason in LISTED.items():
        kind, _, why = reason.partition(":")
        assert kind in KINDS and why.strip(), f"{block_id}: a reason is '<kind>: <why>' with kind in {KINDS}"


def test_the_collector_sees_every_python_fence():
    """Cross-check the fence parser: as many blocks as lines that open a python fence."""
    opening = sum(
        1 for page in PAGES for line in page.read_text(encoding="utf-8").splitlines() if re.match(r"^`{3,}py", line)
    )
    assert len(BLOCKS) == opening >= 50


def test_the_blocksparse_page_shows_the_class_as_it_is_in_the_code():
    """add-a-feasible-set.md says "This is the whole class, as it is in the code, under the module's imports"."""
    import inspect

    from constrainedsparse.sets import groups

    shown = BLOCKS["docs/add-a-feasible-set.md#the-worked-example-blocksparse-block-rxc:0"].code
    imports, _, cls = shown.partition("\n\n\n")
    assert cls == inspect.getsource(groups.BlockSparse)
    module = inspect.getsource(groups).splitlines()
    assert all(line in module for line in imports.splitlines() if line.startswith("from "))


def test_the_set_help_example_in_the_cli_reference_is_what_the_cli_prints(capsys):
    """docs/cli.md's `--set help` console block went stale when the help texts changed."""
    from constrainedsparse.cli import main

    command = "$ constrainedsparse run mnist1d-mlp-macs --formulation magnitude --set help\n"
    page = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    shown = page.split(command, 1)[1].split("```", 1)[0]
    assert main(["run", "mnist1d-mlp-macs", "--formulation", "magnitude", "--set", "help"]) == 0
    assert capsys.readouterr().out == shown
