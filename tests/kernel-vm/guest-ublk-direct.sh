# Runs inside the VM (sh, as root; HOLDFAST_REPO is set by ./run): a ublk
# export in direct mode. The daemon opens /dev/ublkcN and serves the queue
# itself; the broker keeps the control side and never opens /dev/ublkcN.
# A round trip; fio's verify across 20 daemon SIGKILLs (the kernel
# re-issues what the dead daemon held to the next one, after the broker's
# START/END_USER_RECOVERY) and across 10 handoffs (QUIESCE_DEV where the
# driver has it, the old daemon closes its queue, the successor recovers
# the device), with the stall of each; the
# device compared with the daemon's file; the broker's SIGKILL under fio
# (the daemon serves on and attaches to the next broker, which takes the
# device over from its record); a reader blocked across the broker's and
# the daemon's SIGKILL; a write re-issued after its daemon died
# between the backend's write and the COMMIT (REISSUE's double write, which
# the file backend's writes at an offset make harmless); a hung daemon
# fenced at the request bound; a daemon with --relay refused.
. "$HOLDFAST_REPO/tests/kernel-vm/guest-common.sh"

echo "kernel $(uname -r)"
export HOLDFAST_SOCKET=$W/s.sock
broker_args="--socket $W/s.sock --mountpoint $W/mnt --export vol0=64MiB,ublk,direct --request-timeout 10s"
$B/holdfast-broker $broker_args > $W/broker.log 2>&1 &
broker=$!
daemon=
fio=
cleanup() {
    rc=$?
    set +x
    guest_end $rc
    [ -n "$fio" ] && kill -9 "$fio" 2>/dev/null || true
    [ -n "$daemon" ] && kill -9 "$daemon" 2>/dev/null || true
    kill "$broker" 2>/dev/null || true
    sleep 1
    echo "--- broker log (tail)"; tail -15 $W/broker.log
    echo "--- daemon log (tail)"; tail -15 $W/daemon.log
    true
}
trap cleanup EXIT
start_daemon() { # start_daemon [ENV=VALUE...]
    env "$@" $B/holdfast-daemon --export vol0 --backend file:$W/vol0.img >> $W/daemon.log 2>&1 &
    daemon=$!
}
diagnose() { tail -20 $W/broker.log; tail -10 $W/daemon.log; }
status_of() { $B/holdfastctl status | awk -v f=$1 '$1 == "vol0" { print $f }'; }
wait_for 30 test -S $W/s.sock
start_daemon
wait_for 60 test -b /dev/ublkb0
dev=/dev/ublkb0
$B/holdfastctl status
[ "$(status_of 4)" = direct ] || { echo "the daemon is not in direct mode"; exit 1; }
if ls -l /proc/$broker/fd | grep -q ublkc; then
    ls -l /proc/$broker/fd; echo "the broker holds /dev/ublkcN in direct mode"; exit 1
fi
ls -l /proc/$daemon/fd | grep -q ublkc0 || { echo "the daemon does not hold /dev/ublkc0"; exit 1; }
echo "direct mode: the daemon holds /dev/ublkc0, the broker does not: ok"

# Round trip: 8 MiB in 4 MiB writes (a tag's buffer is 1 MiB), read back.
head -c 8M /dev/urandom > $W/pattern
dd if=$W/pattern of=$dev bs=4M oflag=direct status=none
dd if=$dev of=$W/back bs=3M count=3 iflag=direct status=none
head -c 8M $W/back | cmp - $W/pattern
cmp -n 8388608 $W/vol0.img $W/pattern
echo "round trip: ok"

fio_verify() { # fio_verify NAME [FIO-ARG...]: random 4 KiB writes over 32 MiB, verified
    name=$1; shift
    fio --name=$name --filename=$dev --direct=1 --ioengine=io_uring --iodepth=8 \
        --rw=randwrite --bs=4k --size=32M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --verify_state_save=0 --output=$W/fio-$name.log "$@" > /dev/null 2>&1
}
fio_wait() { # fio_wait NAME (bounded: where the block layer holds what hangs)
    n=400
    while kill -0 $fio 2>/dev/null && [ $n -gt 0 ]; do sleep 1; n=$((n - 1)); done
    if kill -0 $fio 2>/dev/null; then
        mount -t debugfs none /sys/kernel/debug 2>/dev/null || true
        for f in requeue_list state hctx0/busy hctx0/dispatch hctx0/state; do
            echo "--- /sys/kernel/debug/block/ublkb0/$f"; cat /sys/kernel/debug/block/ublkb0/$f || true
        done
        echo "--- inflight: $(cat /sys/block/ublkb0/inflight)"
        for t in /proc/$(status_of 6)/task/*; do echo "--- $t $(cat $t/comm) $(cat $t/wchan)"; cat $t/stack; done
        echo "fio ($1): hangs"; exit 1
    fi
    if ! wait $fio; then cat $W/fio-$1.log; echo "fio ($1): FAILED"; exit 1; fi
    fio=
    grep -E "err=|write:|read:" $W/fio-$1.log | head -3
}

# Daemon kills under fio, each once the daemon serves the queue; a kill
# hits requests in flight when the block layer has some started
# (/sys/block/ublkb0/inflight) just before it.
# Serving: restored, and its START_DEV or END_USER_RECOVERY has returned.
serving() {
    [ "$(status_of 6)" = "$daemon" ] && [ "$(status_of 8)" = active ] &&
        grep -qE "served by pid $daemon( |$)" $W/broker.log
}
in_flight() { awk '{ print $1 + $2 }' /sys/block/ublkb0/inflight; }
fio_verify kills &
fio=$!
i=0
hits=0
while [ $i -lt ${KILLS:-20} ]; do
    wait_for 60 serving
    sleep 0.3
    [ "$(in_flight)" -gt 0 ] && hits=$((hits + 1))
    kill -9 $daemon; wait $daemon 2>/dev/null || true
    start_daemon
    i=$((i + 1))
done
fio_wait kills
wait_for 60 serving  # the last daemon's recovery, if fio ended before it
left=$(grep -o 'recovered, served by pid [0-9]* ([0-9.]* ms' $W/broker.log | wc -l)
echo "recoveries after kills: $left"
grep -o 'recovered, served by pid [0-9]* ([0-9.]* ms after its RESTORE' $W/broker.log |
    sed 's/.*(\([0-9.]*\) ms.*/\1/' | sort -n | awk '{ a[NR] = $1 } END { print "RESTORE to END_USER_RECOVERY, ms: median " a[int((NR + 1) / 2)] ", max " a[NR] }'
[ "$left" -ge ${KILLS:-20} ] || { echo "fewer recoveries than kills"; exit 1; }
echo "kills with requests in flight: $hits"
[ "$hits" -gt 0 ] || { echo "no kill hit a request in flight"; exit 1; }
echo "fio across 20 daemon kills: ok"

# Handoffs under fio.
wait_for 60 serving
fio_verify handoffs &
fio=$!
i=0
while [ $i -lt 10 ]; do
    sleep 0.3
    $B/holdfastctl handoff vol0 --exec "$B/holdfast-daemon --export vol0 --backend file:$W/vol0.img 2>>$W/daemon.log" > $W/handoff.log 2>&1 ||
        { cat $W/handoff.log; echo "handoff $i: FAILED"; exit 1; }
    sed -n 's/.*stall \([0-9.]*\) ms.*/\1/p' $W/handoff.log >> $W/stalls
    i=$((i + 1))
done
daemon=$(status_of 6)
fio_wait handoffs
$B/holdfastctl status
sort -n $W/stalls | awk '{ a[NR] = $1 } END { print "handoff stalls (to END_USER_RECOVERY), ms: median " a[int((NR + 1) / 2)] ", min " a[1] ", max " a[NR] }'
# Where the driver has QUIESCE (GET_FEATURES), each handoff began with
# QUIESCE_DEV; the old daemon's stop then leaves the kernel little or
# nothing to re-issue.
quiesces=$(grep -c "quiesced by the kernel" $W/broker.log || true)
left=$(sed -n 's/.*stopped after [0-9]* answers ([0-9]* failed, \([0-9]*\) left.*/\1/p' $W/daemon.log | awk '{ n += $1 } END { print n + 0 }')
if grep "ublk driver features" $W/broker.log | grep -q QUIESCE; then
    [ "$quiesces" -eq 10 ] || { grep QUIESCE $W/broker.log; echo "$quiesces QUIESCE_DEVs for 10 handoffs"; exit 1; }
    echo "QUIESCE_DEV before each handoff: ok; requests the old daemons left to re-issue: $left"
else
    [ "$quiesces" -eq 0 ] || { echo "QUIESCE_DEV on a driver without QUIESCE"; exit 1; }
    echo "no QUIESCE in this driver: the old daemons stopped by themselves, leaving $left requests to re-issue"
fi
echo "fio across 10 handoffs: ok"

cmp $dev $W/vol0.img
echo "device and backing file: identical"

# The broker's SIGKILL under fio: the daemon serves on (the broker is not
# on the data path), attaches to the next broker, and is not restarted.
# Four passes: one (16384 I/Os) can end within the 4 s below in direct mode.
wait_for 60 serving
fio_verify broker --loops=4 &
fio=$!
sleep 2
kill -9 $broker; wait $broker 2>/dev/null || true
sleep 2
kill -0 $fio 2>/dev/null || { # still writing, with no broker
    wait $fio && echo "fio ended within 4 s: its run was too short" || echo "fio failed with no broker"
    cat $W/fio-broker.log; exit 1
}
$B/holdfast-broker $broker_args >> $W/broker.log 2>&1 &
broker=$!
wait_for 60 serving
fio_wait broker
grep "taken over in state" $W/broker.log
cmp $dev $W/vol0.img
echo "fio across the broker's SIGKILL, the same daemon serving on: ok"

# The broker's SIGKILL with a reader blocked (its daemon stopped, then
# killed too): the next broker takes the device over, the next daemon's
# RESTORE recovers it, the kernel re-issues the reader's requests, and the
# reader gets the right data.
kill -STOP $daemon
dd if=$dev of=$W/rb bs=1M count=8 iflag=direct status=none &
reader=$!
sleep 1
kill -0 $reader  # still blocked
kill -9 $broker
kill -9 $daemon
kill -CONT $daemon 2>/dev/null || true
wait $broker 2>/dev/null || true
wait $daemon 2>/dev/null || true
$B/holdfast-broker $broker_args >> $W/broker.log 2>&1 &
broker=$!
wait_for 30 test -S $W/s.sock
start_daemon
if ! wait_for 60 sh -c "! kill -0 $reader 2>/dev/null" || ! wait $reader; then
    echo "reader across the broker's and the daemon's SIGKILL: FAILED"; exit 1
fi
head -c 8M $W/vol0.img | cmp - $W/rb
wait_for 60 serving
echo "reader across the broker's and the daemon's SIGKILL and restart: ok"

# REISSUE's double write: a daemon that dies after its backend wrote and
# before the COMMIT; the write waits, the next daemon gets it again.
kill -TERM $daemon; wait $daemon 2>/dev/null || true
start_daemon HOLDFAST_FAULT=ublk-write-before-commit
wait_for 60 serving
head -c 4096 /dev/urandom > $W/block
dd if=$W/block of=$dev bs=4096 seek=100 oflag=direct conv=notrunc status=none &
writer=$!
wait_for 60 sh -c "! kill -0 $daemon 2>/dev/null"
wait $daemon 2>/dev/null || true
grep -q "crashing at ublk-write-before-commit" $W/daemon.log
kill -0 $writer  # not completed: the kernel holds it
dd if=$W/vol0.img bs=4096 skip=100 count=1 status=none | cmp - $W/block  # the first write
start_daemon
wait_for 60 sh -c "! kill -0 $writer 2>/dev/null"
wait $writer
dd if=$dev bs=4096 skip=100 count=1 iflag=direct status=none | cmp - $W/block
dd if=$W/vol0.img bs=4096 skip=100 count=1 status=none | cmp - $W/block
echo "a write re-issued after its daemon died before the COMMIT: written twice, the same bytes: ok"

# A hung daemon (stopped under a reader): its progress shows no answer
# while the kernel has a request started, so the broker fences it at
# --request-timeout, and the kernel re-issues the read to the next daemon.
wait_for 60 serving
hung=$daemon
kill -STOP $hung
dd if=$dev of=$W/rh bs=1M count=4 skip=8 iflag=direct status=none &
reader=$!
wait_for 60 grep -q "daemon pid $hung (epoch [0-9]*) declared lost: a request has waited" $W/broker.log
wait_for 30 sh -c "! kill -0 $hung 2>/dev/null"
wait $hung 2>/dev/null || true
kill -0 $reader  # still waiting: the kernel holds its request
start_daemon
if ! wait_for 60 sh -c "! kill -0 $reader 2>/dev/null" || ! wait $reader; then
    echo "reader across a hung daemon's fencing: FAILED"; exit 1
fi
dd if=$W/vol0.img bs=1M skip=8 count=4 status=none | cmp - $W/rh
grep "daemon pid $hung (epoch [0-9]*) declared lost" $W/broker.log
echo "a hung daemon fenced at the request bound, its read re-issued to the next: ok"

# A daemon that cannot serve the queue is refused, with the reason.
if $B/holdfast-daemon --export vol0 --backend file:$W/vol0.img --relay > $W/relay.log 2>&1; then
    cat $W/relay.log; echo "a relay daemon attached to a direct-only ublk export"; exit 1
fi
grep "direct mode only" $W/relay.log
echo "a --relay daemon on a direct ublk export: refused"

# An orderly stop: the daemon detaches, the broker stops and deletes the
# device.
kill -TERM $broker
wait $broker
wait_for 30 sh -c "! test -b $dev"
echo "SIGTERM: device deleted: ok"
