# Runs inside the VM (sh, as root; HOLDFAST_REPO is set by ./run): erofs
# over fscache (cachefiles ondemand) served through the broker's cachefiles
# frontend from a daemon's dir: backend.
#  1. An erofs image of a tree with a 256 MiB file and many small ones,
#     mounted with -o fsid=IMAGE, every file read against known checksums.
#  2. The same from a cold cache while the daemon (delaying each READ) is
#     SIGKILLed 20 times, each kill with reads in flight; no read fails.
#     Then a cold pass across 5 planned handoffs.
#  3. The broker's own upgrade: `holdfastctl broker upgrade` re-executes it
#     with /dev/cachefiles inherited while a read waits in it; `restore`
#     makes the kernel re-send, and the same daemon attaches again.
# Each pass uses a new blob name (a hard link): a new cache cookie, so the
# reads reach the daemon instead of the cache file.
# On a kernel without cachefiles' on-demand mode (GUEST_CACHEFILES=no, from
# ./setup) only the broker's refusal is tested: a clear error, exit 1.
. "$HOLDFAST_REPO/tests/kernel-vm/guest-common.sh"
mkdir -p $W/cache $W/blobs $W/tree
echo "kernel $(uname -r)"
if [ "${GUEST_CACHEFILES:-yes}" != yes ]; then
    trap 'guest_end $?' EXIT
    truncate -s 64M $W/cache.img && mkfs.ext4 -q -F $W/cache.img && mount -o loop $W/cache.img $W/cache
    rc=0
    timeout 30 $B/holdfast-broker --socket $W/s.sock --mountpoint $W/mnt --cachefiles $W/cache,images \
        > $W/broker.log 2>&1 || rc=$?
    cat $W/broker.log
    umount $W/cache
    [ $rc = 1 ] || { echo "the broker exited $rc, not 1"; exit 1; }
    grep -q "has no on-demand mode" $W/broker.log
    echo "no cachefiles on-demand mode in this kernel: the broker refuses it, saying so: ok"
    exit 0
fi

# The cache directory must be on a real file system (tmpfs cannot bind).
truncate -s 3G $W/cache.img
mkfs.ext4 -q -F $W/cache.img
mount -o loop $W/cache.img $W/cache

# The tree: one 256 MiB file and 300 small ones of 1 B to 64 KiB.
head -c 256M /dev/urandom > $W/tree/big
mkdir -p $W/tree/small
i=0
while [ $i -lt 300 ]; do
    head -c $(( (i * 7919) % 65536 + 1 )) /dev/urandom > $W/tree/small/f$i
    i=$((i + 1))
done
(cd $W/tree && find . -type f | sort | xargs md5sum) > $W/sums
mkfs.erofs --quiet $W/blobs/img $W/tree
rm -rf $W/tree
echo "erofs image: $(stat -c %s $W/blobs/img) bytes, $(wc -l < $W/sums) files"

export HOLDFAST_SOCKET=$W/s.sock
broker_cmd="$B/holdfast-broker --socket $W/s.sock --mountpoint $W/mnt --cachefiles $W/cache,images"
$broker_cmd > $W/broker.log 2>&1 &
broker=$!
daemon=
reader=
cleanup() {
    rc=$?
    set +ex
    guest_end $rc
    [ -n "$reader" ] && kill "$reader" 2>/dev/null || true
    [ -n "$daemon" ] && kill -9 "$daemon" 2>/dev/null || true
    for m in $W/m*; do umount -l "$m" 2>/dev/null; done
    kill "$broker" 2>/dev/null || true
    sleep 1
    echo "--- broker log (tail)"; tail -25 $W/broker.log
    echo "--- daemon log (tail)"; tail -8 $W/daemon.log 2>/dev/null
    echo "--- kernel log (tail)"; dmesg | tail -8
    true
}
trap cleanup EXIT
start_daemon() { # start_daemon [DAEMON OPTIONS]
    RUST_BACKTRACE=1 $B/holdfast-daemon --export images --backend dir:$W/blobs "$@" >> $W/daemon.log 2>&1 &
    daemon=$!
}
field() { # field NAME: a number from the status of export images
    $B/holdfastctl status --json | grep -o "\"$1\":[0-9]*" | head -1 | cut -d: -f2
}
check_pass() { # check_pass NAME: mount blob NAME, check every file, unmount
    ln -f $W/blobs/img $W/blobs/$1
    mkdir -p $W/m-$1
    mount -t erofs none -o fsid=$1 $W/m-$1 || return 1
    (cd $W/m-$1 && md5sum -c --quiet $W/sums) > $W/check-$1.log 2>&1
    rc=$?
    umount $W/m-$1
    return $rc
}
wait_for 30 test -S $W/s.sock
start_daemon
$B/holdfastctl status

# 1. Every file, through the broker.
if ! check_pass img1; then cat $W/check-img1.log; echo "read through the broker: FAILED"; exit 1; fi
echo "erofs over fscache through the broker: every file correct"
$B/holdfastctl status

# 2. Reads across 20 daemon kills. Each kill stops the daemon first and
# goes ahead only if it holds reads (inflight > 0, which cannot drop while
# it is stopped): every kill hits requests in flight. And only once the
# daemon has answered something since it started: a daemon slow to start
# (the debug build pages itself in over 9p) would otherwise be killed
# holding the same first request each time, and the reads never go on.
kill -9 $daemon; wait $daemon 2>/dev/null || true
start_daemon --read-delay-ms 10
done0=$(field completed)
replayed0=$(field replayed)
( pass=0
  while [ ! -e $W/kills-done ]; do
      pass=$((pass + 1))
      # Each pass fills the cache with another copy of the image.
      [ $pass -le 6 ] || { echo "20 kills took more than 6 passes"; exit 1; }
      check_pass kill$pass || { echo "pass kill$pass failed"; cat $W/check-kill$pass.log; exit 1; }
      echo "pass kill$pass: every file correct"
  done ) > $W/reader.log 2>&1 &
reader=$!
kills=0
tries=0
while [ $kills -lt 20 ]; do
    tries=$((tries + 1))
    [ $tries -lt 2000 ] || { cat $W/reader.log; echo "reads stopped reaching the daemon"; exit 1; }
    sleep 0.1
    kill -STOP $daemon
    if [ "$(field inflight)" -gt 0 ] && [ "$(field completed)" -gt "$done0" ]; then
        kill -9 $daemon; kill -CONT $daemon 2>/dev/null || true; wait $daemon 2>/dev/null || true
        kill -0 $broker || { echo "the broker died"; exit 1; }
        kills=$((kills + 1))
        done0=$(field completed)
        start_daemon --read-delay-ms 10
    else
        kill -CONT $daemon
    fi
done
touch $W/kills-done
if ! wait $reader; then cat $W/reader.log; echo "reads across 20 daemon kills: FAILED"; exit 1; fi
reader=
cat $W/reader.log
replayed=$(( $(field replayed) - replayed0 ))
$B/holdfastctl status
echo "requests replayed after 20 kills: $replayed"
[ "$replayed" -ge 20 ] || { echo "fewer replays than kills"; exit 1; }
echo "erofs reads across 20 daemon kills: every file correct, none failed"

# 2b. Reads across 5 handoffs: each successor is told the open blobs
# before it gets the reads.
( check_pass handoff || { cat $W/check-handoff.log; exit 1; } ) > $W/reader.log 2>&1 &
reader=$!
i=0
while [ $i -lt 5 ]; do
    sleep 1
    $B/holdfastctl handoff images --exec "$B/holdfast-daemon --export images --backend dir:$W/blobs --read-delay-ms 10 2>>$W/daemon.log" > $W/handoff.log 2>&1 ||
        { cat $W/handoff.log; echo "handoff $i: FAILED"; exit 1; }
    i=$((i + 1))
done
if ! wait $reader; then cat $W/reader.log; echo "reads across 5 handoffs: FAILED"; exit 1; fi
reader=
daemon=$($B/holdfastctl status | awk '$1 == "images" { print $6 }')
echo "erofs reads across 5 handoffs: every file correct"

# 3. The broker's upgrade with /dev/cachefiles inherited. The daemon is
# stopped so that a read waits in the broker across the exec; it goes on
# once the upgrade runs, and attaches to the new broker by itself.
ln -f $W/blobs/img $W/blobs/reexec
mkdir -p $W/m-reexec
mount -t erofs none -o fsid=reexec $W/m-reexec
kill -STOP $daemon
(cd $W/m-reexec && md5sum -c --quiet $W/sums) > $W/check-reexec.log 2>&1 &
reader=$!
wait_for 30 sh -c "[ \"\$($B/holdfastctl status --json | grep -o '\"inflight\":[0-9]*' | head -1 | cut -d: -f2)\" -gt 0 ]"
$B/holdfastctl broker upgrade > $W/upgrade.log 2>&1 &
upgrade=$!
wait_for 30 grep -q "took over the cache" $W/broker.log || { echo "the broker did not re-execute"; exit 1; }
kill -CONT $daemon
if ! wait $upgrade; then cat $W/upgrade.log; echo "holdfastctl broker upgrade: FAILED"; exit 1; fi
cat $W/upgrade.log
kill -0 $broker || { echo "the broker's pid is gone after the re-exec"; exit 1; }
if ! wait $reader; then cat $W/check-reexec.log; echo "reads across the broker's upgrade: FAILED"; exit 1; fi
reader=
umount $W/m-reexec
[ "$($B/holdfastctl status | awk '$1 == "images" { print $6 }')" = "$daemon" ] ||
    { $B/holdfastctl status; echo "the daemon was restarted"; exit 1; }
grep -E "upgrading|took over" $W/broker.log
$B/holdfastctl status
echo "erofs reads across the broker's upgrade: every file correct, the same daemon"

kill $daemon; wait $daemon 2>/dev/null || true
daemon=
umount $W/cache 2>/dev/null || true
