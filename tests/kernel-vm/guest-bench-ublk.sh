# Runs inside the VM (sh, as root; HOLDFAST_REPO is set by ./run): the ublk
# benchmark. fio (io_uring, O_DIRECT) on a 64 MiB ublk device, 4 KiB random
# reads and writes at queue depth 1 and 32, on each path back to back:
#   relay     holdfast-broker serving the device, holdfast-daemon (file)
#   direct    the same with ,direct: the daemon serves the device's queue
#   baseline  hf-ublk-baseline: the daemon library's queue server, no broker
# Software emulation (TCG): compare the ratios, not the figures.
# Then handoff stalls and crash restores on each export. Prints Markdown
# tables. BENCH_SECONDS (default 5) per fio run.
. "$HOLDFAST_REPO/tests/kernel-vm/guest-common.sh"
SECS=${BENCH_SECONDS:-5}
echo "kernel $(uname -r)"
head -c 64M /dev/urandom > $W/relay.img
cp $W/relay.img $W/base.img
cp $W/relay.img $W/direct.img
broker= daemon= base= ddaemon=
cleanup() {
    rc=$?
    set +x
    guest_end $rc
    for p in $daemon $ddaemon $base $broker; do kill "$p" 2>/dev/null || true; done
    true
}
trap cleanup EXIT
export HOLDFAST_SOCKET=$W/s.sock
$B/holdfast-broker --socket $W/s.sock --mountpoint $W/mnt --export vol0=64MiB,ublk \
    --export vol1=64MiB,ublk,direct > $W/broker.log 2>&1 &
broker=$!
wait_for 30 test -S $W/s.sock
$B/holdfast-daemon --export vol0 --backend file:$W/relay.img > $W/daemon.log 2>&1 &
daemon=$!
wait_for 60 test -b /dev/ublkb0
relay=/dev/ublkb0
$B/holdfast-daemon --export vol1 --backend file:$W/direct.img > $W/ddaemon.log 2>&1 &
ddaemon=$!
wait_for 60 test -b /dev/ublkb1
direct=/dev/ublkb1
$B/hf-ublk-baseline --backend file:$W/base.img --size $((64 << 20)) > $W/base.log 2>&1 &
base=$!
wait_for 30 grep -q '^ready' $W/base.log
baseline=$(sed -n 's/^ready //p' $W/base.log)

iops() { # iops DEV RW QD: fio's IOPS
    fio --name=b --filename=$1 --direct=1 --ioengine=io_uring --rw=$2 --bs=4k --iodepth=$3 \
        --time_based --runtime=$SECS --ramp_time=1 --size=64M --output-format=terse \
        --terse-version=3 2>/dev/null |
        awk -F';' -v rw=$2 '{ print (rw == "randread") ? $8 : $49 }'
}
ratio() { awk -v a=$1 -v b=$2 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }'; }
echo "| workload | relay IOPS | direct IOPS | baseline IOPS | relay / baseline | direct / baseline |"
echo "|---|---|---|---|---|---|"
for rw in randread randwrite; do
    for qd in 1 32; do
        r=$(iops $relay $rw $qd)
        d=$(iops $direct $rw $qd)
        b=$(iops $baseline $rw $qd)
        echo "| 4k $rw qd$qd | $r | $d | $b | $(ratio $r $b) | $(ratio $d $b) |"
    done
done

# Handoff stalls and crash restores, relay and direct: 5 of each per
# export under a light reader. A handoff's stall is the broker's report's;
# a crash restore is from the daemon's SIGKILL until a 4 KiB read of the
# device returns, with the next daemon started at once (TCG: its start-up
# dominates).
fio --name=light --filename=$relay --direct=1 --ioengine=io_uring --rw=randread --bs=4k \
    --iodepth=1 --rate_iops=50 --time_based --runtime=600 --size=64M > /dev/null 2>&1 &
light1=$!
fio --name=light --filename=$direct --direct=1 --ioengine=io_uring --rw=randread --bs=4k \
    --iodepth=1 --rate_iops=50 --time_based --runtime=600 --size=64M > /dev/null 2>&1 &
light2=$!
median() { sort -n | awk '{ a[NR] = $1 } END { printf "%.1f", a[int((NR + 1) / 2)] }'; }
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
daemon_of() { $B/holdfastctl status | awk -v e=$1 '$1 == e { print $6 }'; }
echo
echo "| path | handoff stall, median of 5 (ms) | crash restore, median of 5 (ms) |"
echo "|---|---|---|"
for e in vol0 vol1; do
    img=$W/relay.img dev=$relay mode=relay
    [ $e = vol1 ] && img=$W/direct.img dev=$direct mode=direct
    : > $W/stalls
    for i in 1 2 3 4 5; do
        $B/holdfastctl handoff $e --exec "$B/holdfast-daemon --export $e --backend file:$img 2>>$W/handoffs.log" > $W/handoff.log 2>&1 ||
            { cat $W/handoff.log; exit 1; }
        sed -n 's/.*stall \([0-9.]*\) ms.*/\1/p' $W/handoff.log >> $W/stalls
        sleep 1
    done
    : > $W/restores
    for i in 1 2 3 4 5; do
        pid=$(daemon_of $e)
        t0=$(now_ms)
        kill -9 $pid
        $B/holdfast-daemon --export $e --backend file:$img >> $W/restarts.log 2>&1 &
        dd if=$dev of=/dev/null bs=4k count=1 skip=$i iflag=direct status=none
        echo $(($(now_ms) - t0)) >> $W/restores
        wait_for 60 sh -c "[ \"\$($B/holdfastctl status | awk -v e=$e '\$1 == e { print \$8 }')\" = active ]"
        sleep 1
    done
    echo "| $mode | $(median < $W/stalls) | $(median < $W/restores) |"
done
kill $light1 $light2 2>/dev/null || true
# Direct mode's stall goes on until the successor's END_USER_RECOVERY
# returns, after its RESTORE (the report ends there).
echo
echo "direct: END_USER_RECOVERY returned, after the RESTORE, median of 10 (ms): $(
    sed -n 's/.*vol1: ublk device [0-9]* recovered, served by pid [0-9]* (\([0-9.]*\) ms.*/\1/p' $W/broker.log | median)"
