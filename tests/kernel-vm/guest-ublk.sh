# Runs inside the VM (sh, as root; HOLDFAST_REPO is set by ./run): the
# broker's typed ublk interface against the real driver, the daemon
# library's ublk queue server without a broker (hf-ublk-baseline), then an export
# served through a ublk device: a data round trip with O_DIRECT (requests
# larger than a tag's buffer are split by the kernel), fio's verify across
# 20 daemon kills and across 10 handoffs, the device compared with the
# daemon's backing file, a blocked reader across the broker's own SIGKILL
# and restart (no flag: the next broker finds the device's record), fio's
# verify across 5 broker upgrades (`holdfastctl broker upgrade`, the daemon
# never restarted), a stale device record removed, a mem daemon refused on
# a recovered device (its memfd died with the old broker), the ublk queue
# thread and every daemon thread IO flushers, and an orderly stop (SIGTERM)
# with dirty ext4 on a device that loses nothing; recoveries cut short
# (fault points) and a FETCH the driver refuses.
. "$HOLDFAST_REPO/tests/kernel-vm/guest-common.sh"
echo "kernel $(uname -r)"
$B/hf-ublk-probe features
$B/hf-ublk-probe add-del

# The daemon library's ublk queue server (direct mode's data path), with no
# broker: hf-ublk-baseline. fio's verify, then the device against its file.
$B/hf-ublk-baseline --backend file:$W/base.img --size $((16 << 20)) > $W/base.log 2>&1 &
base=$!
wait_for 30 grep -q '^ready' $W/base.log || { cat $W/base.log; exit 1; }
bdev=$(sed -n 's/^ready //p' $W/base.log)
fio --name=base --filename=$bdev --direct=1 --ioengine=io_uring --iodepth=8 --rw=randwrite \
    --bs=4k --size=8M --verify=crc32c --do_verify=1 --verify_fatal=1 --verify_state_save=0 \
    --output=$W/fio-base.log > /dev/null 2>&1 || { cat $W/fio-base.log $W/base.log; exit 1; }
dd if=$bdev bs=1M count=16 iflag=direct status=none | cmp - $W/base.img
kill -TERM $base
wait $base || { cat $W/base.log; exit 1; }
grep '^served' $W/base.log
echo "the daemon library's ublk queue server, daemon-less: fio verify, device = file: ok"

export HOLDFAST_SOCKET=$W/s.sock
$B/holdfast-broker --socket $W/s.sock --mountpoint $W/mnt --export vol0=64MiB,ublk > $W/broker.log 2>&1 &
broker=$!
daemon=
cleanup() {
    rc=$?
    set +x
    guest_end $rc
    [ -n "$daemon" ] && kill -9 "$daemon" 2>/dev/null || true
    kill "$broker" 2>/dev/null || true
    sleep 1
    echo "--- broker log (tail)"; tail -12 $W/broker.log
    [ -f $W/broker2.log ] && { echo "--- recovered broker log (tail)"; tail -12 $W/broker2.log; }
    true
}
trap cleanup EXIT
start_daemon() {
    $B/holdfast-daemon --export vol0 --backend file:$W/vol0.img >> $W/daemon.log 2>&1 &
    daemon=$!
}
diagnose() { cat $W/broker.log; }
wait_for 30 test -S $W/s.sock
start_daemon
wait_for 60 test -b /dev/ublkb0
dev=/dev/ublkb0
$B/holdfastctl status

# Round trip: 8 MiB in 4 MiB writes (a tag's buffer is 1 MiB), read back.
head -c 8M /dev/urandom > $W/pattern
dd if=$W/pattern of=$dev bs=4M oflag=direct status=none
dd if=$dev of=$W/back bs=3M count=3 iflag=direct status=none
head -c 8M $W/back | cmp - $W/pattern
cmp -n 8388608 $W/vol0.img $W/pattern
echo "round trip: ok"
io_flushers $broker ublk-vol0
io_flushers $daemon
echo "the broker's ublk queue thread and the daemon's threads are IO flushers: ok"

fio_verify() { # fio_verify NAME: random 4 KiB writes over 32 MiB, verified
    fio --name=$1 --filename=$dev --direct=1 --ioengine=io_uring --iodepth=8 \
        --rw=randwrite --bs=4k --size=32M --verify=crc32c --do_verify=1 \
        --verify_fatal=1 --verify_state_save=0 --output=$W/fio-$1.log > /dev/null 2>&1
}

# Daemon kills under fio. Each kill waits until the daemon has attached:
# a daemon killed while it is still starting (the debug build with the S3
# SDK takes seconds to load over 9p) never held a request, and 20 such
# kills once left nothing to replay.
attached() { [ "$($B/holdfastctl status | awk '$1 == "vol0" { print $6 }')" = "$daemon" ]; }
fio_verify kills &
fio=$!
i=0
while [ $i -lt 20 ]; do
    wait_for 60 attached
    sleep 0.3
    kill -9 $daemon; wait $daemon 2>/dev/null || true
    start_daemon
    i=$((i + 1))
done
if ! wait $fio; then cat $W/fio-kills.log; echo "fio across kills: FAILED"; exit 1; fi
grep -E "err=|write:|read:" $W/fio-kills.log | head -3
replayed=$($B/holdfastctl status --json | grep -o '"replayed":[0-9]*' | cut -d: -f2)
echo "requests replayed after kills: $replayed"
[ "$replayed" -gt 0 ] || { echo "no kill hit a request in flight"; exit 1; }
echo "fio across 20 daemon kills: ok"

# Handoffs under fio, from the last daemon once it has restored (a handoff
# of a daemon still starting is refused: nothing to hand off).
active() { [ "$($B/holdfastctl status | awk '$1 == "vol0" { print $8 }')" = active ]; }
wait_for 60 active
fio_verify handoffs &
fio=$!
i=0
while [ $i -lt 10 ]; do
    sleep 0.3
    $B/holdfastctl handoff vol0 --exec "$B/holdfast-daemon --export vol0 --backend file:$W/vol0.img 2>>$W/daemon.log" > $W/handoff.log 2>&1 ||
        { cat $W/handoff.log; echo "handoff $i: FAILED"; exit 1; }
    i=$((i + 1))
done
daemon=
if ! wait $fio; then cat $W/fio-handoffs.log; echo "fio across handoffs: FAILED"; exit 1; fi
$B/holdfastctl status
echo "fio across 10 handoffs: ok"

# Second oracle: the device shows exactly what the daemon's file holds.
cmp $dev $W/vol0.img
echo "device and backing file: identical"

# The broker's own restart. Stop the daemon so that a reader's requests
# wait in the broker, SIGKILL the broker (and the daemon), start a broker
# with the same options (it takes the device over from its record) and a
# new daemon: the kernel re-issues the reader's requests to the new broker
# and the reader finishes.
daemon=$($B/holdfastctl status | awk '$1 == "vol0" { print $6 }')
kill -STOP "$daemon"
dd if=$dev of=$W/rb bs=1M count=8 iflag=direct status=none &
reader=$!
sleep 1
kill -0 $reader  # still blocked
kill -9 $broker
kill -9 "$daemon"
kill -CONT "$daemon" 2>/dev/null || true
wait $broker 2>/dev/null || true
$B/holdfast-broker --socket $W/s.sock --mountpoint $W/mnt --export vol0=64MiB,ublk > $W/broker2.log 2>&1 &
broker=$!
wait_for 30 test -S $W/s.sock
start_daemon
if ! wait_for 60 sh -c "! kill -0 $reader 2>/dev/null" || ! wait $reader; then
    cat $W/broker2.log; echo "reader across the broker's restart: FAILED"; exit 1
fi
head -c 8M $W/vol0.img | cmp - $W/rb
$B/holdfastctl status
grep -E "recovered" $W/broker2.log
echo "reader across the broker's SIGKILL and restart: ok"

# A mem daemon on the recovered device is refused: its memfd died with the
# old broker's fd store, and the device's users hold what they read of it.
if $B/holdfast-daemon --export vol0 --backend mem --takeover > $W/mem.log 2>&1; then
    cat $W/mem.log; echo "a mem daemon served a recovered device on a fresh memfd"; exit 1
fi
grep "is lost" $W/mem.log
wait "$daemon" 2>/dev/null || true  # fenced by the takeover
start_daemon
wait_for 60 attached
echo "mem daemon on a recovered device: refused"

# Upgrades in place under fio: the device is recovered by the new broker
# in the same process, and the daemon attaches to it again by itself.
daemon=$($B/holdfastctl status | awk '$1 == "vol0" { print $6 }')
fio_verify upgrades &
fio=$!
i=0
while [ $i -lt 5 ]; do
    sleep 1
    $B/holdfastctl broker upgrade > $W/upgrade.log 2>&1 || { cat $W/upgrade.log; echo "upgrade $i: FAILED"; exit 1; }
    cat $W/upgrade.log
    i=$((i + 1))
done
if ! wait $fio; then cat $W/fio-upgrades.log; echo "fio across broker upgrades: FAILED"; exit 1; fi
[ "$($B/holdfastctl status | awk '$1 == "vol0" { print $6 }')" = "$daemon" ] ||
    { $B/holdfastctl status; echo "the daemon was restarted"; exit 1; }
kill -0 $broker
cmp $dev $W/vol0.img
echo "fio across 5 broker upgrades, the same daemon: ok"

# A record of a device that is gone is removed, with a line in the log,
# and a new device is made.
echo 57 > $W/ublk-vol9.id
$B/holdfastctl export add vol9 16MiB --frontend ublk
grep "ublk device 57 of .* is gone; removed the stale record" $W/broker2.log
$B/holdfast-daemon --export vol9 --backend file:$W/vol9.img >> $W/daemon.log 2>&1 &
wait_for 60 sh -c "$B/holdfastctl status | grep -q '^vol9 .* active'"
$B/holdfastctl export rm vol9
echo "stale ublk record: removed"

# An export added and removed at run time.
$B/holdfastctl export add vol1 16MiB --frontend ublk
$B/holdfast-daemon --export vol1 --backend file:$W/vol1.img >> $W/daemon.log 2>&1 &
wait_for 60 test -b /dev/ublkb1
head -c 1M /dev/urandom > $W/p1
dd if=$W/p1 of=/dev/ublkb1 bs=1M oflag=direct status=none
dd if=/dev/ublkb1 bs=1M count=1 iflag=direct status=none | cmp - $W/p1
$B/holdfastctl export rm vol1
wait_for 10 test ! -e /dev/ublkb1
echo "export add/rm with --frontend ublk: ok"

# An orderly stop (SIGTERM) with ext4 mounted on a device and dirty pages
# in it: the broker writes them back through the daemon, which still
# serves, then stops and deletes the device; the daemon's file then holds
# the file system with every byte.
$B/holdfastctl export add vol2 64MiB --frontend ublk
$B/holdfast-daemon --export vol2 --backend file:$W/vol2.img >> $W/daemon.log 2>&1 &
d2=$!
id2=$(cat $W/ublk-vol2.id)
wait_for 60 test -b /dev/ublkb$id2
mkfs.ext4 -q /dev/ublkb$id2
mkdir -p $W/m2 $W/m2back
mount /dev/ublkb$id2 $W/m2
head -c 16M /dev/urandom > $W/dirty
cp $W/dirty $W/m2/dirty  # no sync: dirty in the page cache
kill -TERM $broker
wait $broker || { echo "broker exit $?"; exit 1; }
umount -l $W/m2
grep "vol2: ublk device $id2: wrote back 1 file systems" $W/broker2.log
[ ! -e $W/ublk-vol2.id ] || { echo "the record of a stopped device is left"; exit 1; }
[ ! -e /dev/ublkb$id2 ] || { echo "/dev/ublkb$id2 is left after the stop"; exit 1; }
cp $W/vol2.img $W/vol2-copy.img  # the journal may need replaying
mount -o loop $W/vol2-copy.img $W/m2back
cmp $W/m2back/dirty $W/dirty
umount $W/m2back
echo "SIGTERM with dirty ext4 on a ublk device: written back, device deleted: ok"

# Recoveries cut short (fault points of the debug build, HOLDFAST_FAULT): a
# broker that dies just after START_USER_RECOVERY, before any FETCH, and one
# that dies after its FETCHes, before END_USER_RECOVERY, each leave the
# device to the next broker, which recovers it (6.12 refuses a second
# START_USER_RECOVERY after the first: the broker goes on from it). A
# reader blocked since before the first crash gets its data at the end.
start_broker() { # start_broker LOG
    $B/holdfast-broker --socket $W/s.sock --mountpoint $W/mnt --export vol0=64MiB,ublk > $W/$1 2>&1 &
    broker=$!
    wait_for 30 test -S $W/s.sock
}
crash() { # crash: SIGKILL the broker (and the daemon, if one runs)
    kill -9 $broker ${daemon:-}
    wait $broker 2>/dev/null || true
    [ -z "${daemon:-}" ] || { kill -CONT $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true; }
    daemon=
}
cut_short() { # cut_short POINT: a broker that dies at POINT
    rc=0
    HOLDFAST_FAULT=$1 timeout 60 $B/holdfast-broker --socket $W/s.sock --mountpoint $W/mnt \
        --export vol0=64MiB,ublk > $W/broker-$1.log 2>&1 || rc=$?
    [ $rc = 86 ] || { cat $W/broker-$1.log; echo "fault point $1: the broker exited $rc, not 86"; exit 1; }
}
# The daemons of the stopped broker would attach to the next one.
kill -9 $daemon $d2 2>/dev/null || true
wait $daemon $d2 2>/dev/null || true
daemon=
start_broker broker3.log
start_daemon
wait_for 60 attached
id0=$(cat $W/ublk-vol0.id)
dev=/dev/ublkb$id0
wait_for 60 test -b $dev
dd if=$W/pattern of=$dev bs=4M oflag=direct status=none
kill -STOP $daemon
dd if=$dev of=$W/rc bs=1M count=8 iflag=direct status=none &
reader=$!
sleep 1
crash
cut_short ublk-recovery-started
start_broker broker4.log
wait_for 60 grep -q "ublk device $id0 recovered" $W/broker4.log
# 6.12 leaves the queues reset and unready (the next START_USER_RECOVERY
# is EINVAL, taken up by the broker); 6.15 and later reset them when the
# dead broker's /dev/ublkcN is released, so it is an ordinary recovery.
if grep "going on from where it stopped" $W/broker4.log; then
    echo "recovery cut short after START_USER_RECOVERY: taken up where it stopped"
else
    echo "recovery cut short after START_USER_RECOVERY: an ordinary recovery on this kernel"
fi
kill -0 $reader  # still blocked: no daemon
crash
cut_short ublk-fetched
start_broker broker5.log
wait_for 60 grep -q "ublk device $id0 recovered" $W/broker5.log
if grep "cut short" $W/broker5.log; then echo "an ordinary recovery was taken for one cut short"; exit 1; fi
start_daemon
if ! wait_for 60 sh -c "! kill -0 $reader 2>/dev/null" || ! wait $reader; then
    cat $W/broker5.log; echo "reader across two recoveries cut short: FAILED"; exit 1
fi
head -c 8M $W/pattern | cmp - $W/rc
echo "recoveries cut short after START_USER_RECOVERY and after the FETCHes: recovered, reader served: ok"

# A FETCH the driver refuses (the fault point sends one without a buffer)
# fails the export at once, with the reason, and leaves no device behind
# (before, START_DEV waited for ever for the refused tag).
before=$(ls /dev | grep -c '^ublkc' || true)
rc=0
HOLDFAST_FAULT=ublk-fetch-refused timeout 60 $B/holdfast-broker --socket $W/f.sock \
    --mountpoint $W/fmnt --export vol5=16MiB,ublk > $W/broker-refused.log 2>&1 || rc=$?
[ $rc != 0 ] && [ $rc != 124 ] || { cat $W/broker-refused.log; echo "refused FETCH: broker exit $rc"; exit 1; }
grep "the driver refused FETCH_REQ for 1 of 32 tags" $W/broker-refused.log
wait_for 10 sh -c "[ \$(ls /dev | grep -c '^ublkc' || true) = $before ]"
[ ! -e $W/ublk-vol5.id ] || { echo "the record of a device never started is left"; exit 1; }
echo "a FETCH the driver refuses: the export fails with the reason, no device left: ok"
