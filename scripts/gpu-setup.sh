#!/usr/bin/env bash
# Source on the GPU machine after the kit is unpacked into /tmp/site (../shared/gpu/README.md):
#   source scripts/gpu-setup.sh
# Installs lightq and every plugin without dependencies (no package index there) once per machine, and puts the
# kit on the path. scripts/gpu-tests.sh and the benchmarks' documented commands start with it.
export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
if ! python -c "import lightq, lightq_vllm" 2>/dev/null || [ "$(python -c 'import lightq, os; print(os.path.dirname(lightq.__file__))')" != "$PWD/lightq" ]; then
  python -m pip install -q --no-deps --no-build-isolation -e . $(for p in plugins/lightq-*/; do printf -- '-e %s ' "$p"; done) \
    > /tmp/lightq-pip.log 2>&1 || { tail -20 /tmp/lightq-pip.log; return 1; }
fi
