# Sourced by perf/gpu_tune.sh and perf/gpu_suite.sh, from the repository root: the GPU's short name ($DEVICE), the
# working tree's packages copied to a temporary folder on PYTHONPATH (nothing is installed: what runs is the tree
# as it is, as ../shared/gpu/check.sh does), and `provenance`, the lines each log begins with.
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
ROOT=$(pwd)
DEVICE=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
PKG=$(mktemp -d)
python3 - "$ROOT" "$PKG" <<'PY'
import shutil, sys, tomllib
root, pkg = sys.argv[1:]
dirs = tomllib.load(open(f"{root}/pyproject.toml", "rb"))["tool"]["setuptools"]["package-dir"]
for name, src in sorted(dirs.items()):  # parents first
    shutil.copytree(f"{root}/{src}", f"{pkg}/" + name.replace(".", "/"), dirs_exist_ok=True)
PY
export PYTHONPATH=$PKG

provenance() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  git -C "$ROOT" log -1 --format='commit %h %s' 2>/dev/null || true
}
