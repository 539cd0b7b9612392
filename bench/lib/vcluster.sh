# shellcheck shell=bash disable=SC2034 # vc_* are read by the scripts that source this
# Sourced by the bench scripts that run on a virtual cluster (a2a_nodes.sh,
# group_nodes.sh): the root/namespace check, bring-up, link shaping and
# teardown of launch/vcluster, in one place. Not a benchmark itself (it sits
# in a subfolder, so bench/all.sh does not run it).
#
#   vc_require WHO          exit 77 with a message naming WHO unless this is
#                           root with network namespaces and tc
#   vc_up N SLOTS PREFIX    a cluster of N nodes named PREFIX<pid>; sets vc_cl
#                           and vc_hostfile. The caller's EXIT trap must call
#                           vc_down (it is safe before vc_up and twice)
#   vc_shape RATE [DELAY]   every node's outgoing link: tc netem RATE + DELAY,
#                           or, where the kernel has no sch_netem, tc tbf
#                           RATE alone; sets vc_shape_desc saying which
#   vc_wait CMD [ARGS...]   run CMD in the background and wait for it, so
#                           that a TERM or INT to the script runs its trap at
#                           once (bash defers a trap until a foreground
#                           command ends); returns CMD's status
#   vc_down                 ends a vc_wait command still running (by PID),
#                           `vcluster down` (kills what is left in the
#                           namespaces by PID, deletes them), then checks that
#                           no namespace or process of the cluster remains;
#                           returns non-zero (with a message) if one does
# Needs REPO_DIR (bench/env.sh sets it).

VC=$REPO_DIR/launch/vcluster
vc_cl=
vc_hostfile=
vc_shape_desc=

vc_require() {
  local who=$1 probe=moevcprobe$$
  if [[ $(id -u) -ne 0 ]]; then
    echo "$who: needs root (the virtual cluster uses network namespaces); skipped" >&2
    exit 77
  fi
  if ! command -v tc > /dev/null || ! ip netns add "$probe" 2> /dev/null; then
    echo "$who: no network namespaces or no tc here; skipped" >&2
    exit 77
  fi
  ip netns del "$probe"
}

vc_up() {
  local n=$1 slots=$2 prefix=$3
  vc_cl=$prefix$$
  "$VC" up "$n" --name "$vc_cl" --slots "$slots" > /dev/null
  vc_hostfile=$("$VC" hostfile "$vc_cl")
}

vc_shape() {
  local rate=$1 delay=${2:-} err
  err=$(mktemp)
  if [[ -n $delay ]] && "$VC" shape "$vc_cl" --rate "$rate" --delay "$delay" 2> "$err"; then
    vc_shape_desc="tc netem: $rate, $delay delay"
  else
    # no sch_netem in this kernel (or no delay asked): the rate alone, tc tbf
    if [[ -n $delay ]] && ! grep -q "sch_netem" "$err"; then cat "$err" >&2; rm -f "$err"; return 1; fi
    "$VC" shape "$vc_cl" --rate "$rate"
    vc_shape_desc="tc tbf: $rate${delay:+, no added delay (this kernel has no sch_netem)}"
  fi
  rm -f "$err"
}

vc_child=
vc_wait() {
  "$@" &
  vc_child=$!
  local rc=0
  wait "$vc_child" || rc=$?
  vc_child=
  return "$rc"
}

vc_down() {
  if [[ -n $vc_child ]]; then
    kill -TERM "$vc_child" 2> /dev/null || true
  fi
  [[ -n $vc_cl ]] || return 0
  local rc=0 left
  "$VC" down "$vc_cl" > /dev/null 2>&1 || { echo "bench: 'vcluster down $vc_cl' failed: check 'launch/vcluster list'" >&2; rc=1; }
  left=$(ip netns list 2> /dev/null | awk '{print $1}' | grep -E "^$vc_cl-" || true)
  [[ -z $left ]] || { echo "bench: namespaces left behind: $left" >&2; rc=1; }
  # the rsh agent and the daemons it starts carry the cluster's name
  left=$(ps -eo pid=,args= | grep -F -- "$vc_cl" | grep -v -e "grep -F" || true)
  [[ -z $left ]] || { echo "bench: processes of $vc_cl left behind:" >&2; echo "$left" >&2; rc=1; }
  vc_cl=
  return "$rc"
}
