#!/usr/bin/env bash
# test_vcluster.sh REPO_ROOT: launch/vcluster itself.
#   - two clusters at once get their own subnets and names; nodes resolve
#     and reach each other, never the other cluster; the root namespace
#     gains no interface, address or route;
#   - each node has its hostname; the rsh agent runs a command on the named
#     node with a bare environment, like ssh;
#   - link down/up cuts and restores a node; traffic shaping is applied;
#   - down kills by PID every process left in the namespaces (a daemonised
#     one and one that ignores SIGTERM included), then removes namespaces,
#     hosts files and state; a second down is harmless;
#   - usage errors are named.
# Exit 77 (skip) only when not root or network namespaces are unavailable.
set -euo pipefail
(( $# == 1 )) || { echo "usage: $0 REPO_ROOT" >&2; exit 2; }
# shellcheck source=lib.sh
source "$(dirname "$0")/lib.sh"
vc_skip_unless_netns
vc_setup "$(realpath "$1")"

root_links_before=$(ip -o link show | awk -F': ' '{print $2}' | sort)
root_addrs_before=$(ip -o addr show | awk '{print $2, $4}' | sort)
root_routes_before=$(ip route show table all | sort)

vc_up 3 --slots 2
a=$cl a_host=$hostfile
vc_up 2
b=$cl
net_of() { sed -n 's/^net=//p' "/run/moevc/$1/env"; }
[[ $(net_of "$a") != "$(net_of "$b")" ]] || fail "two clusters share the subnet $(net_of "$a")"
[[ $(ip -o link show | awk -F': ' '{print $2}' | sort) == "$root_links_before" ]] \
    || fail "the root namespace gained or lost an interface"
[[ $(ip -o addr show | awk '{print $2, $4}' | sort) == "$root_addrs_before" ]] || fail "root addresses changed"
[[ $(ip route show table all | sort) == "$root_routes_before" ]] || fail "root routes changed"
[[ $(cat "$a_host") == "$a-n1 slots=2"$'\n'"$a-n2 slots=2"$'\n'"$a-n3 slots=2" ]] || fail "hostfile of $a: $(cat "$a_host")"

# reach I HOST: a TCP connect from node I of $a to HOST answers (or is refused).
reach() {
    local out
    out=$("$vc" run "$a" --node "$1" -- timeout 4 bash -c "exec 3<> /dev/tcp/$2/9" 2>&1) && return 0
    [[ $out == *refused* ]]
}
for i in 1 2 3; do
    [[ $("$vc" run "$a" --node "$i" -- hostname) == "$a-n$i" ]] || fail "node $i of $a has hostname '$("$vc" run "$a" --node "$i" -- hostname)'"
done
reach 1 "$a-n3" || fail "node 1 cannot reach node 3 by name"
reach 3 "$a-n2" || fail "node 3 cannot reach node 2 by name"
reach 1 "$(net_of "$b").1" && fail "a node of $a reaches cluster $b"
grep -qx "$a $(net_of "$a").0/24" <<< "$("$vc" run "$a" --node 2 -- sh -c 'echo "$MOE_VCLUSTER $OMPI_MCA_btl_tcp_if_include"')" \
    || fail "vcluster run does not set the cluster's Open MPI environment"
log "2 clusters: own subnets, names resolve, no cross-talk, root namespace untouched"

# The agent: like `ssh HOST CMD`: the named node, $HOME, a bare environment.
out=$(MOE_SECRET=1 OPENBLAS_CORETYPE=Haswell "$vc" agent "$a" "$a-n2" 'echo $(hostname) $PWD; env')
[[ $(head -1 <<< "$out") == "$a-n2 /root" || $(head -1 <<< "$out") == "$a-n2 $HOME" ]] || fail "agent ran '$(head -1 <<< "$out")'"
grep -q '^MOE_SECRET=\|^OPENBLAS_CORETYPE=' <<< "$out" && fail "the agent passed the caller's environment on"
grep -q '^PATH=' <<< "$out" || fail "the agent gave no PATH"
rc=0
"$vc" agent "$a" no-such-host true 2> "$tmp/agent.err" || rc=$?
(( rc == 255 )) && grep -q "unknown host 'no-such-host'" "$tmp/agent.err" || fail "agent to an unknown host: exit $rc, $(cat "$tmp/agent.err")"

# Link down and up.
"$vc" link "$a" 2 down
reach 1 "$a-n2" && fail "node 2 still answers with its link down"
grep -q "node 2: $a-n2 .* link down" <<< "$("$vc" status "$a")" || fail "status does not show node 2's link down"
"$vc" link "$a" 2 up
end=$(( SECONDS + 15 ))
until reach 1 "$a-n2"; do (( SECONDS < end )) || fail "node 2 unreachable after link up"; sleep 0.5; done
log "agent: bare environment on the named node; link down cuts a node, up restores it"

# Traffic shaping: a token bucket (and netem when the kernel has it).
"$vc" shape "$a" --rate 100mbit
for i in 1 2 3; do
    grep -q "tbf .*rate 100Mbit" <<< "$(ip netns exec "$a-n$i" tc qdisc show dev eth0)" || fail "no tbf on node $i"
done
if "$vc" shape "$a" --rate 1gbit --delay 100us 2> "$tmp/netem.err"; then
    grep -q "netem .*delay 100us" <<< "$(ip netns exec "$a-n1" tc qdisc show dev eth0)" || fail "netem not applied"
else
    grep -q "netem" "$tmp/netem.err" || fail "shape --delay failed without naming netem: $(cat "$tmp/netem.err")"
    log "shape --delay: $(cat "$tmp/netem.err")"
fi
"$vc" shape "$a" --clear
grep -q "tbf\|netem" <<< "$(ip netns exec "$a-n1" tc qdisc show dev eth0)" && fail "shape --clear left a qdisc"
log "shaping: tbf rate applied and cleared"

# Stray processes: daemonised (reparented to init), and deaf to SIGTERM.
"$vc" run "$a" --node 2 -- setsid sh -c 'sleep 1000 & exit 0'
"$vc" run "$a" --node 3 -- setsid sh -c 'trap "" TERM; sleep 1000 & wait' < /dev/null > /dev/null 2>&1 &
end=$(( SECONDS + 10 ))
until [[ $(ip netns pids "$a-n2" | wc -l) -ge 1 && $(ip netns pids "$a-n3" | wc -l) -ge 1 ]]; do
    (( SECONDS < end )) || fail "stray processes did not start"
    sleep 0.2
done
t0=$SECONDS
"$vc" down "$a" || fail "vcluster down $a failed"
"$vc" down "$b" || fail "vcluster down $b failed"
vc_assert_gone || fail "vcluster down left something behind"
log "down: stray processes killed in $(( SECONDS - t0 )) s; namespaces, hosts files, state gone"
"$vc" down "$a" || fail "a second down failed"
wait

# Usage errors.
expect_usage() {
    local want=$1 rc=0
    shift
    "$vc" "$@" > /dev/null 2> "$tmp/usage.err" || rc=$?
    (( rc == 2 )) && grep -q "$want" "$tmp/usage.err" || fail "vcluster $*: exit $rc, '$(cat "$tmp/usage.err")', want '$want'"
}
expect_usage "N must be 2..200" up 1
expect_usage "no cluster 'nosuch'" run nosuch -- true
expect_usage "unknown command 'frob'" frob
expect_usage "bad cluster name" down '../etc'
log "usage errors named"
echo "PASS: launch/vcluster"
