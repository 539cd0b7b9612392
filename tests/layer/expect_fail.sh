#!/usr/bin/env bash
# Runs a command that must FAIL cleanly: non-zero exit within a time bound
# (no hang), and stderr containing PATTERN at least COUNT times (e.g. once
# per rank).
#   expect_fail.sh SECONDS PATTERN COUNT -- command...
set -u
limit=$1 pattern=$2 count=$3
shift 4
err=$(mktemp)
timeout --kill-after=5 "$limit" "$@" > /dev/null 2> "$err"
rc=$?
cat "$err" >&2
n=$(grep -c -- "$pattern" "$err" || true)
rm -f "$err"
if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then echo "FAIL: timed out after ${limit}s (hang)" >&2; exit 1; fi
if [ "$rc" -eq 0 ]; then echo "FAIL: command succeeded, expected an error" >&2; exit 1; fi
if [ "$n" -lt "$count" ]; then echo "FAIL: '$pattern' printed $n times, expected >= $count" >&2; exit 1; fi
echo "ok: exit $rc, '$pattern' x$n"
