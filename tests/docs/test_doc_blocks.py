"""Every Python block of README.md and docs/*.md runs as written; every docs page is linked from the README, and
every relative link points to a file.

Each block runs on its own, in a fresh namespace, from the repository's root: a reader copies one block, so
each must define every name it uses. In this suite, on a CPU, the kernels run under Triton's interpreter; the
README's quickstart also runs in a fresh process without TRITON_INTERPRET, as a new user on a CPU runs it.
A block marked `<!-- needs: cuda -->` on the line before it runs where CUDA is and is skipped elsewhere; one
marked `<!-- needs: multiprocess -->` is a script for several processes, run under torchrun with two of them
on the CPU (docs/development.md).
"""

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
NEEDS = re.compile(r"<!-- needs: ([a-z]+) -->")
KNOWN_NEEDS = {None, "cuda", "multiprocess"}


@dataclass(frozen=True)
class Block:
    page: Path
    line: int
    code: str
    needs: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def page_blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line_before = text[:match.start()].rstrip("\n").rpartition("\n")[2]
        needs = NEEDS.fullmatch(line_before.strip())
        found.append(Block(page, text.count("\n", 0, match.start()) + 1, match.group(1),
                           needs.group(1) if needs else None))
    return found


BLOCKS = [block for page in PAGES for block in page_blocks(page)]
IN_PROCESS = [block for block in BLOCKS if block.needs != "multiprocess"]
MULTIPROCESS = [block for block in BLOCKS if block.needs == "multiprocess"]


def test_every_docs_page_is_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    assert len(PAGES) > 1
    for page in PAGES[1:]:
        assert f"(docs/{page.name})" in readme, page.name


def test_every_relative_link_points_to_a_file():
    for page in PAGES:
        prose = re.sub(r"^```.*?^```|`[^`\n]*`", "", page.read_text(), flags=re.DOTALL | re.MULTILINE)  # no code
        for target in re.findall(r"\]\(([^)#\s]+)\)", prose):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.name}: {target}"


def test_blocks_are_found_and_their_needs_known():
    assert any(block.page.name == "README.md" for block in BLOCKS)
    assert MULTIPROCESS and {block.needs for block in BLOCKS} <= KNOWN_NEEDS


@pytest.mark.parametrize("block", IN_PROCESS, ids=[block.name for block in IN_PROCESS])
def test_block_runs(block, monkeypatch):
    if block.needs == "cuda" and not torch.cuda.is_available():
        pytest.skip("the block needs a GPU (<!-- needs: cuda -->)")
    monkeypatch.chdir(ROOT)
    exec(compile(block.code, block.name, "exec"), {"__name__": "__main__"})


def fresh_env() -> dict:
    """The environment of a new user's shell: no TRITON_INTERPRET, which the suite sets on a CPU."""
    return {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}


def test_readme_quickstart_runs_as_a_new_user_runs_it(tmp_path):
    quickstart = next(block for block in BLOCKS if block.page.name == "README.md")
    proc = subprocess.run([sys.executable, "-c", quickstart.code], cwd=tmp_path, env=fresh_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = "ran on cuda, through the Triton kernels" if torch.cuda.is_available() else \
        "ran on cpu, through the PyTorch reference path"
    assert expected in proc.stdout


@pytest.mark.parametrize("block", MULTIPROCESS, ids=[block.name for block in MULTIPROCESS])
def test_multiprocess_block_runs_under_torchrun(block, tmp_path):
    """Two ranks: enough for the block to synchronise anything, on any machine (Gloo on the CPU)."""
    script = tmp_path / "block.py"
    script.write_text(block.code)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = dict(re.findall(r"rank (\d): running mean (tensor\(\[[^]]*\]\))", proc.stdout))
    assert set(ranks) == {"0", "1"} and ranks["0"] == ranks["1"], proc.stdout  # the whole batch's statistics
