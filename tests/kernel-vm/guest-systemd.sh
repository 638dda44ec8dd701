# Runs inside the VM under a real systemd as PID 1 (sh, as root; HOLDFAST_REPO
# is set by ./run): the shipped unit deploy/systemd/holdfast.service, with a
# drop-in naming this build's binaries and two exports, each served by a
# supervised daemon: vol0's FUSE file under hf-verify (file backend),
# vol1's loop device under fio's verify (mem backend: its memfd lives in
# the broker's fd store, and so in systemd's). Then `kill -9` of the main
# pid 20 times (systemd starts the broker again from its fd store) and
# `systemctl reload` 3 times (an upgrade in place): no writer sees an error,
# no block loses its last acknowledged write, and journalctl shows it all.
. "$HOLDFAST_REPO/tests/kernel-vm/guest-common.sh"
echo "kernel $(uname -r), $(systemctl --version | head -1)"

cp deploy/systemd/holdfast.service /run/systemd/system/
mkdir -p /run/systemd/system/holdfast.service.d
cat > /run/systemd/system/holdfast.service.d/test.conf <<EOF
[Service]
ExecStart=
ExecStart=$B/holdfast-broker --export vol0=32MiB --export vol1=32MiB,block \\
    --supervise '$B/holdfast-daemon --export vol0 --backend file:$W/vol0.img' \\
    --supervise '$B/holdfast-daemon --export vol1 --backend mem'
ExecReload=
ExecReload=$B/holdfastctl broker upgrade
EOF
systemctl daemon-reload
ctl() { $B/holdfastctl "$@"; }
cleanup() {
    rc=$?
    set +ex
    guest_end $rc
    [ -n "${writer:-}" ] && kill "$writer" 2>/dev/null || true
    systemctl stop holdfast
    echo "--- systemctl status"; systemctl status holdfast --no-pager -n 0
    echo "--- journal (tail)"; journalctl -u holdfast --no-pager -n 30
    true
}
trap cleanup EXIT
diagnose() { ctl status; }
main_pid() { systemctl show -p MainPID --value holdfast; }
# Both exports served by an active daemon, with epochs above $1 and $2.
served() {
    [ "$(ctl status | awk -v a="$1" -v b="$2" '
        $1 == "vol0" && $8 == "active" && $7 > a { n++ }
        $1 == "vol1" && $8 == "active" && $7 > b { n++ }
        END { print n + 0 }')" = 2 ]
}
epoch() { ctl status | awk -v e="$1" '$1 == e { print $7 }'; }
daemon_pid() { ctl status | awk -v e="$1" '$1 == e { print $6 }'; }

systemctl start holdfast   # Type=notify: returns at READY=1
systemctl is-active holdfast
systemctl show -p StatusText --value holdfast
wait_for 120 served 0 0
ctl status
dev=$(ctl status | awk '$1 == "vol1" { print $5 }')
d0=$(daemon_pid vol0); d1=$(daemon_pid vol1)

$B/hf-verify --file /run/holdfast/mnt/vol0 --seconds 900 --threads 1 --seed 7 \
    --state $W/gens > $W/verify.log 2>&1 &
writer=$!
fio --name=kills --filename=$dev --direct=1 --ioengine=io_uring --iodepth=4 \
    --rw=randwrite --bs=4k --size=32M --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --verify_state_save=0 --output=$W/fio.log > /dev/null 2>&1 &
fio=$!

i=0
while [ $i -lt 20 ]; do
    sleep 0.5
    pid=$(main_pid); e0=$(epoch vol0); e1=$(epoch vol1)
    kill -9 "$pid"
    wait_for 120 sh -c "[ \"\$(systemctl show -p MainPID --value holdfast)\" != $pid ] && systemctl is-active -q holdfast"
    wait_for 120 served "$e0" "$e1"
    kill -0 $writer || { cat $W/verify.log; echo "the writer died"; exit 1; }
    i=$((i + 1))
done
echo "20 SIGKILLs of the broker, each restarted by systemd: ok"

i=0
while [ $i -lt 3 ]; do
    pid=$(main_pid); e0=$(epoch vol0); e1=$(epoch vol1)
    systemctl reload holdfast
    [ "$(main_pid)" = "$pid" ] || { echo "reload changed the main pid"; exit 1; }
    wait_for 60 served "$e0" "$e1"
    i=$((i + 1))
done
echo "3 reloads (upgrades in place): ok"

[ "$(daemon_pid vol0)" = "$d0" ] && [ "$(daemon_pid vol1)" = "$d1" ] ||
    { ctl status; echo "a daemon was restarted ($d0 $d1)"; exit 1; }
echo "the daemons were never restarted: $d0 $d1"

if ! wait $fio; then cat $W/fio.log; echo "fio verify across the broker's restarts: FAILED"; exit 1; fi
grep -E "err=" $W/fio.log | head -2
kill -TERM $writer
wait $writer || { cat $W/verify.log; echo "hf-verify: FAILED"; exit 1; }
writer=
tail -1 $W/verify.log
grep -q '"errors":0' $W/verify.log && grep -q '"verify_failures":0' $W/verify.log
ctl status
failed=$(ctl status --json | grep -o '"failed":[0-9]*' | cut -d: -f2 | sort -u)
[ "$failed" = 0 ] || { echo "requests failed: $failed"; exit 1; }
echo "no I/O error, every block verified"

# What the journal shows of a crash and a reload.
journalctl -u holdfast --no-pager > $W/journal.log
for want in "status=9/KILL" "took over its FUSE connection" "supervised again" "upgraded from pid"; do
    grep -q "$want" $W/journal.log || { echo "the journal has no \"$want\""; exit 1; }
done
grep -m1 "status=9/KILL" $W/journal.log
grep -m1 "upgraded from pid" $W/journal.log
echo "journal: ok"

systemctl stop holdfast
if systemctl is-active -q holdfast; then echo "still active after a stop"; exit 1; fi
[ ! -e /run/holdfast/mnt/vol0 ] || { echo "a stop left the mount"; exit 1; }
# The supervised vol0 daemon detached at the stop: its backing file holds
# every acknowledged write.
$B/hf-verify --file $W/vol0.img --check $W/gens --seed 7 > $W/check.log 2>&1 ||
    { cat $W/check.log; echo "backing file: FAILED"; exit 1; }
echo "backing file after the stop: every block holds its last write"
