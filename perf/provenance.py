"""What a results folder's provenance.json says about the run its files come from.

The harness records the package's commit in every row (`git_commit`), but a run made from an exported
tree (no git checkout) can only write "unknown" there. A folder of committed results may then hold a
provenance.json beside its CSVs: `label` (what the run was, for headings), `commit` (the package's
commit), and optionally `date`, `device`, `versions` and `source` (where the files were copied from).
`tritonbn-perf readme` and `tritonbn-perf report` take the commit from it where the CSV has none.
"""

import json
from pathlib import Path

UNKNOWN = "unknown"
FILE = "provenance.json"


def read(folder: Path) -> dict:
    path = Path(folder) / FILE
    return json.loads(path.read_text()) if path.exists() else {}


def commit(rows, provenance: dict) -> str:
    """The commit the rows were measured at, and where that comes from: the CSV's `git_commit` column where
    it names one, else provenance.json's, else "unknown"."""
    recorded = ", ".join(sorted({r["git_commit"] for r in rows} - {UNKNOWN, ""}))
    if recorded:
        return recorded
    if "commit" in provenance:
        return f"{provenance['commit']} (from {FILE}; the CSV has none)"
    return UNKNOWN
