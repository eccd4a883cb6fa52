#!/usr/bin/env bash
# Run every GPU test on the GPU machine (after the kit is unpacked into /tmp/site; see ../shared/gpu/README.md):
#   bash scripts/gpu-tests.sh <out-dir> [pytest args...]
# Installs lightq and all plugins without dependencies (the machine has no package index), then runs pytest
# without xdist over the GPU tests of the core, the models and every plugin; the log and a JUnit XML go to <out-dir>.
set -uo pipefail
out=${1:?usage: gpu-tests.sh OUT_DIR [pytest args]}; shift
mkdir -p "$out"
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
python -m pip install -q --no-deps --no-build-isolation -e . $(for p in plugins/lightq-*/; do printf -- '-e %s ' "$p"; done) \
  > "$out/pip.log" 2>&1 || { tail -20 "$out/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1
python -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" >> "$out/device.txt"
# the log streams to stdout as well, so a run cut off by a time limit still shows how far it got
python -m pytest -o addopts="" -q -p no:cacheprovider -rs --durations=25 --junitxml="$out/junit.xml" "$@" 2>&1 \
  | tee "$out/pytest.log"
