# Runs inside the VM (sh, as root; HOLDFAST_REPO is set by ./run): the ublk
# benchmark. fio (io_uring, O_DIRECT) on a 64 MiB ublk device, 4 KiB random
# reads and writes at queue depth 1 and 32, on each path back to back:
#   relay     holdfast-broker serving the device, holdfast-daemon (file)
#   direct    the same with ,direct: the daemon serves the device's queue
#   baseline  hf-ublk-baseline: the daemon library's queue server, no broker
# Software emulation (TCG): compare the ratios, not the figures.
# Prints a Markdown table. BENCH_SECONDS (default 5) per run.
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
