#!/bin/bash
# A throwaway single-node Ceph cluster on loopback, from Debian's packages (ceph-mon ceph-osd ceph-common):
# one monitor, one memstore OSD (data in RAM), no manager, an initialised `rbd` pool.
#
#   scripts/ceph-single-node.sh start DIR   # makes DIR, starts the daemons, writes DIR/ceph.conf
#   scripts/ceph-single-node.sh stop DIR    # stops them (OSD, then monitor) and removes DIR
#   scripts/ceph-single-node.sh run CMD...  # starts a cluster in a temporary DIR in the background, runs CMD
#                                           # with INSTAR_CEPH_CONF=DIR/ceph.conf (the file appears once the
#                                           # cluster serves; DIR/start-failed if it never will), then stops it
#
# Then: CEPH_CONF=DIR/ceph.conf qemu-img info rbd:rbd/IMAGE, or rbd:rbd/IMAGE:conf=DIR/ceph.conf.
# The monitor listens on two free ports of 127.0.0.1 picked at start (so clusters of several users can coexist).
# Every wait has a deadline (CEPH_SN_TIMEOUT seconds, default 90); nothing sleeps a fixed count.
set -euo pipefail

TIMEOUT=${CEPH_SN_TIMEOUT:-90}

die() { echo "ceph-single-node: $*" >&2; exit 1; }

# Seconds since the epoch with sub-second precision, for deadlines.
now() { date +%s.%N; }
past() { awk -v n="$(now)" -v d="$1" 'BEGIN { exit !(n > d) }'; }
deadline() { awk -v n="$(now)" -v t="$1" 'BEGIN { printf "%.3f", n + t }'; }

# Two free TCP ports on 127.0.0.1 (msgr2 and msgr1).
free_ports() {
    python3 - <<'EOF'
import socket
socks = []
for _ in range(2):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

start() {
    local d=$1
    for t in ceph-mon ceph-osd ceph ceph-authtool monmaptool rbd uuidgen; do
        command -v "$t" >/dev/null || die "$t not found (install ceph-mon ceph-osd ceph-common uuid-runtime)"
    done
    [ -e "$d/ceph.conf" ] && die "$d already holds a cluster (stop it first)"
    mkdir -p "$d"
    d=$(cd "$d" && pwd)
    mkdir -p "$d/mon" "$d/osd/ceph-0" "$d/run" "$d/log"
    touch "$d/.ceph-single-node"
    local fsid ports v2 v1 addrs
    fsid=$(uuidgen)
    read -r v2 v1 <<<"$(free_ports)"
    addrs="[v2:127.0.0.1:$v2,v1:127.0.0.1:$v1]"
    # Written to a temporary name first: DIR/ceph.conf appears only once the cluster serves requests.
    cat >"$d/ceph.conf.new" <<EOF
[global]
fsid = $fsid
mon host = $addrs
public network = 127.0.0.0/8
public addr = 127.0.0.1
cluster addr = 127.0.0.1
keyring = $d/keyring
run dir = $d/run
admin socket = $d/run/\$name.asok
pid file = $d/run/\$name.pid
log file = $d/log/\$name.log
mon cluster log file = $d/log/cluster.log
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
mon data avail warn = 2
mon data avail crit = 1
[mon]
mon data = $d/mon/\$cluster-\$id
[osd]
osd data = $d/osd/\$cluster-\$id
osd objectstore = memstore
memstore device bytes = 4294967296
osd memory target = 1073741824
EOF
    local c="$d/ceph.conf.new" end
    end=$(deadline "$TIMEOUT")
    ceph-authtool --create-keyring "$d/keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
    ceph-authtool "$d/keyring" --gen-key -n client.admin --cap mon 'allow *' --cap osd 'allow *' \
        --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
    ceph-authtool "$d/keyring" --gen-key -n osd.0 --cap mon 'allow profile osd' --cap mgr 'allow profile osd' \
        --cap osd 'allow *' >/dev/null
    monmaptool --create --fsid "$fsid" --addv a "$addrs" "$d/monmap" >/dev/null
    ceph-mon -c "$c" --mkfs -i a --monmap "$d/monmap" --keyring "$d/keyring" 2>>"$d/log/setup.log"
    ceph-mon -c "$c" -i a 2>>"$d/log/setup.log"
    local uuid id
    uuid=$(uuidgen)
    # Each ceph command gets the time left before the deadline (a command to an absent monitor blocks).
    id=$(cephc "$c" "$end" osd new "$uuid" 0) || die "osd new failed (log: $d/log)"
    [ "$id" = 0 ] || die "osd new returned '$id'"
    ceph-osd -c "$c" -i 0 --mkfs --osd-uuid "$uuid" >>"$d/log/setup.log" 2>&1
    ceph-osd -c "$c" -i 0 >>"$d/log/setup.log" 2>&1
    until cephc "$c" "$end" osd stat 2>/dev/null | grep -q ' 1 up'; do
        past "$end" && die "the OSD did not come up within ${TIMEOUT}s (log: $d/log)"
        sleep 0.1
    done
    cephc "$c" "$end" osd pool create rbd 8 >/dev/null 2>&1 || die "pool create failed (log: $d/log)"
    local left
    left=$(awk -v n="$(now)" -v d="$end" 'BEGIN { t = d - n; printf "%d", (t < 1 ? 1 : t) }')
    timeout "$left" rbd -c "$c" pool init rbd || die "rbd pool init failed (log: $d/log)"
    mv "$c" "$d/ceph.conf"
    echo "$d/ceph.conf"
}

# ceph -c CONF ARGS... bounded by the deadline END.
cephc() {
    local c=$1 end=$2 left
    shift 2
    left=$(awk -v n="$(now)" -v d="$end" 'BEGIN { t = d - n; printf "%d", (t < 1 ? 1 : t) }')
    timeout "$left" ceph -c "$c" --connect-timeout "$left" "$@"
}

# Sends TERM to the daemon whose pid file is $1 and waits, until the deadline, for it to exit (KILL after that).
stop_daemon() {
    local pidfile=$1 pid end
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    end=$(deadline "$TIMEOUT")
    while kill -0 "$pid" 2>/dev/null; do
        if past "$end"; then
            echo "ceph-single-node: $pidfile ($pid) ignored TERM for ${TIMEOUT}s; killing it" >&2
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.05
    done
}

stop() {
    local d=$1
    [ -e "$d/.ceph-single-node" ] || die "$d was not made by this script"
    stop_daemon "$d/run/mgr.x.pid"
    stop_daemon "$d/run/osd.0.pid"
    stop_daemon "$d/run/mon.a.pid"
    rm -rf "$d"
}

# Runs "$@" beside a cluster that starts in the background; the command's exit code is kept.
run_with() {
    local d pid rc=0
    d=$(mktemp -d /tmp/ceph-sn.XXXXXX)
    if command -v ceph-mon >/dev/null && command -v ceph-osd >/dev/null && command -v rbd >/dev/null; then
        bash "$0" start "$d" >"$d.log" 2>&1 || touch "$d/start-failed" &
        pid=$!
        # shellcheck disable=SC2064
        trap "wait $pid; bash '$0' stop '$d' || true; rm -f '$d.log'" EXIT
    else
        touch "$d/no-ceph"
        # shellcheck disable=SC2064
        trap "rm -rf '$d' '$d.log'" EXIT
    fi
    export INSTAR_CEPH_CONF="$d/ceph.conf"
    "$@" || rc=$?
    if [ -e "$d/start-failed" ]; then
        echo "ceph-single-node: the cluster did not start:" >&2
        cat "$d.log" >&2 || true
    fi
    return $rc
}

case "${1:-}" in
    run) shift; [ $# -ge 1 ] || die "usage: $0 run CMD..."; run_with "$@"; exit $? ;;
    start) [ $# -eq 2 ] || die "usage: $0 start DIR"; start "$2" ;;
    stop) [ $# -eq 2 ] || die "usage: $0 stop DIR"; stop "$2" ;;
    *) die "usage: $0 start DIR | stop DIR" ;;
esac
