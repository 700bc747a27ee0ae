#!/usr/bin/env bash
# Run the kill/hang/timeout tests N times in a row on a frozen snapshot of a commit, under whatever load
# the machine has (start a second `make test` beside it for "under load"). Prints one line per run and
# keeps the full output of any failing run as race-loop-fail-N.txt in the current directory.
#
#   bash benchmarks/race_loop.sh [N=20] [COMMIT=HEAD]
set -uo pipefail
n="${1:-20}"; commit="${2:-HEAD}"
repo="$(cd "$(dirname "$0")/.." && pwd)"; py="$repo/.venv/bin/python"
snap="$(mktemp -d)"; git -C "$repo" worktree add -q --detach "$snap/dualfocus" "$commit"
trap 'git -C "$repo" worktree remove --force "$snap/dualfocus"; rm -rf "$snap"' EXIT
tests=(tests/test_extract_resume.py
       tests/test_decode_worker.py::test_hang_becomes_decode_error_and_worker_recovers
       tests/test_decode_worker.py::test_hang_mid_stream_raises_from_the_iterator
       tests/test_decode_worker.py::test_child_killed_mid_stream_is_reported_and_replaced
       tests/test_judge.py::test_timeouts_are_retried
       tests/test_judge.py::test_refused_connection_fails_clearly_and_keeps_cache
       tests/test_judge.py::test_intermittent_failures_are_retried
       tests/test_extract_bad_inputs.py::test_every_video_gets_a_row_and_too_many_failures_exit_1
       tests/test_extract_groups.py::test_kill_during_a_second_group_then_rerun
       tests/test_extract_parallel.py tests/test_train_multirank.py tests/test_cluster.py)
out="$PWD"
for i in $(seq 1 "$n"); do
  start=$(date +%s)
  (cd "$snap/dualfocus" && PYTHONPATH="$snap" DS_ACCELERATOR=cpu "$py" -m pytest -q -p no:cacheprovider "${tests[@]}") \
    > "$out/race-loop-run.txt" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && cp "$out/race-loop-run.txt" "$out/race-loop-fail-$i.txt"
  echo "run $i: rc=$rc $(tail -1 "$out/race-loop-run.txt") ($(( $(date +%s) - start )) s, load $(cut -d' ' -f1-3 /proc/loadavg))"
done
