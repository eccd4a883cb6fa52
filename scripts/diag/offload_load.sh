# scripts/diag/offload_load.sh [DIT_MODES...] [-- OVERRIDES...]: issue 12's offload=block load targets on the user's
# job. For each DiT mode (default: fp8-triton none), python -m lightq on Wan2.1-14B (random weights, 4 distilled
# steps, no quality stage) with offload=none, then offload=block, each a fresh process (scripts/diag/job_numbers.sh),
# then per mode: load seconds of both and their ratio (target <= 1.5x), offload=block's peak host memory against the
# offloaded weights (every component's weight_bytes; target <= weights + 3 GiB), its peak GPU memory.
# Outputs stay in /tmp/j/<mode>-<offload>/ and /tmp/j-<mode>-<offload>.log. docs/BENCHMARKS.md cites the numbers.
# The GPU machine's memory grows on first touch (KINDS.md; what that costs a job: docs/BENCHMARKS.md), so that
# whichever job first needs the packs' memory does not pay for it, GROW_GIB GiB (default 48, 0 to skip) are
# touched once before the jobs.
modes=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do modes+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#modes[@]} -eq 0 ] && modes=(fp8-triton none)
here=$(dirname "$0")
python -c "
import time, numpy as np
t = time.time()
for _ in range(int(${GROW_GIB:-48}) // 8):
    np.ones(8 << 30, np.uint8)
print(f'host memory grown by ${GROW_GIB:-48} GiB in {time.time() - t:.1f} s')"
for mode in "${modes[@]}"; do
  for off in none block; do
    bash "$here/job_numbers.sh" "$mode-$off" model=wan2.1-t2v-14b model.weights=random sampler=distill \
      quality.compare=false "dit_quant=$mode" "offload=$off" "$@"
  done
done
python - "${modes[@]}" <<'PY'
import json, sys

G = 2**30
for mode in sys.argv[1:]:
    r = {off: json.load(open(f"/tmp/j/{mode}-{off}/result.json")) for off in ("none", "block")}
    load = {off: d.get("timings_s", {}).get("load") for off, d in r.items()}
    mem = r["block"].get("memory", {})
    weights = sum(c.get("weight_bytes", 0) for c in r["block"].get("components", {}).values() if isinstance(c, dict))
    host, gpu = mem.get("peak_host_bytes", 0), mem.get("peak_gpu_bytes", 0)
    ratio = load["block"] / load["none"] if load["none"] and load["block"] else float("nan")
    print(f"{mode}: load none {load['none']} s, block {load['block']} s: {ratio:.2f}x (target <= 1.5x: "
          f"{'met' if ratio <= 1.5 else 'MISSED'}); block peak host {host / G:.2f} GiB for {weights / G:.2f} GiB "
          f"of offloaded weights: +{(host - weights) / G:.2f} GiB (target <= +3: "
          f"{'met' if host - weights <= 3 * G else 'MISSED'}); peak GPU {gpu / G:.2f} GiB; "
          f"status none={r['none'].get('status')} block={r['block'].get('status')}")
PY
