# lib.sh: shared by the tests/cluster scripts (sourced, not run).
#
# vc_setup REPO: sets $vc (launch/vcluster), makes a temp dir $tmp, and
#   installs the EXIT trap that tears down every cluster made with vc_up,
#   asserts the teardown (vc_assert_gone) and removes $tmp.
# vc_up N [vcluster up options]: a cluster named moevc<pid>x<k>; sets $cl
#   (its name) and $hostfile.
# vc_skip_unless_netns: exits 77 (ctest SKIP_RETURN_CODE) unless root with
#   working network namespaces.
# $py: the Python with h5py and numpy (MOE_PYTHON3 from CMake, else Debian's).
# run_for LIMIT_S LOG CMD...: CMD under `timeout`, stdout+stderr to LOG;
#   returns CMD's status (124: timed out). run_for_json: stderr to LOG.err.
# Every wait is bounded; cleanup runs on every exit path.

py=${MOE_PYTHON3:-/usr/bin/python3}

fail() { echo "FAIL: $*" >&2; exit 1; }
log() { echo "-- $*"; }

vc_skip_unless_netns() {
    if [[ $(id -u) -ne 0 ]]; then
        echo "SKIP: needs root for network namespaces (the virtual cluster)"
        exit 77
    fi
    local probe=moevcprobe$$
    if ! command -v ip > /dev/null || ! command -v unshare > /dev/null; then
        echo "SKIP: ip (iproute2) or unshare (util-linux) not installed"
        exit 77
    fi
    if ! ip netns add "$probe" 2> /dev/null; then
        echo "SKIP: 'ip netns add' does not work here (no network namespaces)"
        exit 77
    fi
    ip netns del "$probe"
}

vc_clusters=()
vc_ns_inodes=() # inode of every namespace made, to look for survivors

vc_up() {
    local n=$1
    shift
    cl=moevc$$x${#vc_clusters[@]}
    vc_clusters+=("$cl")
    "$vc" up "$n" --name "$cl" "$@" > /dev/null || fail "vcluster up $n failed"
    hostfile=$("$vc" hostfile "$cl")
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep "^$cl-"); do
        vc_ns_inodes+=("$(stat -L -c %i "/run/netns/$ns")")
    done
    log "cluster $cl: $n nodes ($(awk '{print $1}' "$hostfile" | tr '\n' ' '))"
}

# The teardown left nothing: no namespace, hosts file or state of the
# clusters, and no process whose network namespace was one of theirs.
vc_assert_gone() {
    local c p ino left=()
    for c in "${vc_clusters[@]}"; do
        grep -q "^$c-" <<< "$(ip netns list | awk '{print $1}')" && left+=("namespaces of $c")
        compgen -G "/etc/netns/$c-*" > /dev/null && left+=("/etc/netns/$c-*")
        [[ -e /run/moevc/$c ]] && left+=("/run/moevc/$c")
    done
    for p in /proc/[0-9]*; do
        ino=$(stat -L -c %i "$p/ns/net" 2> /dev/null) || continue
        for c in "${vc_ns_inodes[@]}"; do
            [[ $ino == "$c" ]] && left+=("process ${p#/proc/} ($(tr '\0' ' ' < "$p/cmdline" 2> /dev/null | cut -c1-80))")
        done
    done
    (( ${#left[@]} == 0 )) || { printf 'FAIL: left behind after teardown: %s\n' "${left[@]}" >&2; return 1; }
}

vc_setup() {
    repo=$1
    vc=$repo/launch/vcluster
    [[ -x $vc ]] || fail "no $vc"
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/moe-cluster.XXXXXX")
    chmod 755 "$tmp"
    trap vc_cleanup EXIT
    trap 'exit 130' INT TERM
}

vc_cleanup() {
    local rc=$? c
    set +e
    trap - EXIT INT TERM
    for c in "${vc_clusters[@]}"; do "$vc" down "$c" || rc=1; done
    if (( ${#vc_clusters[@]} )); then
        if vc_assert_gone; then log "teardown: no namespace, hosts file or process left"; else rc=1; fi
    fi
    if (( rc != 0 )); then
        local f
        for f in "$tmp"/*.log "$tmp"/*.log.err; do [[ -f $f ]] && { echo "==== tail of $f"; tail -n 25 "$f"; }; done
    fi
    if [[ ${MOE_CLUSTER_TEST_KEEP:-0} == 1 ]]; then echo "kept $tmp"; else rm -rf "$tmp"; fi
    exit "$rc"
}

run_for() {
    local limit=$1 out=$2
    shift 2
    timeout -k 10 "$limit" "$@" > "$out" 2>&1
}
# run_for_json LIMIT OUT CMD...: the same with stderr apart in OUT.err, so
# that OUT holds the command's JSON alone (ranks' stderr lines, forwarded
# by mpirun, may land anywhere in a merged stream).
run_for_json() {
    local limit=$1 out=$2
    shift 2
    timeout -k 10 "$limit" "$@" > "$out" 2> "$out.err"
}
