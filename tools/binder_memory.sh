#!/usr/bin/env bash
# Run each lesson under strict nbval inside a 2 GiB memory cgroup (mybinder's limit): a lesson that
# needs more is OOM-killed there and fails. Needs root and the cgroup v1 memory controller.
#
#   sudo bash tools/binder_memory.sh                       # every lesson
#   sudo bash tools/binder_memory.sh notebooks/02_*.ipynb  # some
#
# Prints, per lesson: nbval's exit status, seconds, the cgroup's peak usage (page cache included,
# which the kernel reclaims before it kills) and OOM kills.
set -u
cd "$(dirname "$0")/.."
CG=/sys/fs/cgroup/memory/peftlab-binder-2g
mkdir -p "$CG" && echo 2G > "$CG/memory.limit_in_bytes" || { echo "cannot create $CG (root and cgroup v1 needed)"; exit 2; }
echo $$ > "$CG/cgroup.procs"
kills() { awk '$1 == "oom_kill" {print $2}' "$CG/memory.oom_control"; }
status=0
for nb in "${@:-notebooks/[0-9][0-9]_*.ipynb}"; do
  for path in $nb; do
    echo 0 > "$CG/memory.max_usage_in_bytes"
    before=$(kills); start=$(date +%s)
    TQDM_DISABLE=1 HF_HUB_OFFLINE=1 timeout 400 .venv/bin/pytest "$path" --nbval --nbval-current-env \
      --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider -q >/dev/null 2>&1
    rc=$?
    [ "$rc" = 0 ] || status=1
    echo "$(basename "$path") rc=$rc $(( $(date +%s) - start ))s" \
      "peak=$(( $(cat "$CG/memory.max_usage_in_bytes") / 1048576 ))MiB oom_kills=$(( $(kills) - before ))"
  done
done
exit $status
