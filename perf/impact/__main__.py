"""`python -m tritonbn.perf.impact [flags]` runs `tritonbn-perf impact [flags]`."""

import sys

from tritonbn.perf.cli import main

raise SystemExit(main(["impact", *sys.argv[1:]]))
