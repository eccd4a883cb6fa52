# scripts/diag/job_numbers.sh NAME OVERRIDES...: the user's job (python -m lightq) in a fresh process, then its wall time and
# result.json's stages, steps, memory and components (docs/BENCHMARKS.md, runs of one job outside bench pipeline)
name=$1; shift
s=$(date +%s.%N)
python -m lightq "$@" hydra.run.dir=/tmp/j/$name > /tmp/j-$name.log 2>&1; rc=$?
e=$(date +%s.%N)
tail -3 /tmp/j-$name.log
python - "$name" "$rc" "$s" "$e" <<'PY'
import json, sys
name, rc, wall = sys.argv[1], sys.argv[2], float(sys.argv[4]) - float(sys.argv[3])
d = json.load(open(f"/tmp/j/{name}/result.json"))
t, m = d.get("timings_s", {}), d.get("memory", {})
G = 2**30
print(f"{name}: rc={rc} status={d.get('status')} wall={wall:.1f}s before_job={d.get('process', {}).get('before_job_s')}")
print("  stages:", {k: v for k, v in t.items() if k != "denoise_steps"})
print("  steps:", t.get("denoise_steps"))
print(f"  peak GPU {m.get('peak_gpu_bytes', 0) / G:.2f} GiB, host {m.get('peak_host_bytes', 0) / G:.2f} GiB, by stage",
      {k: round(v / G, 2) for k, v in (m.get("peak_host_bytes_by_stage") or {}).items()})
print("  components:", {c: (v.get("mode"), v.get("backend")) for c, v in d.get("components", {}).items() if isinstance(v, dict)})
if d.get("offload") or d.get("prefetch"): print("  offload:", d.get("offload"), d.get("prefetch"))
PY
