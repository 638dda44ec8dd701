# Sourced first by every guest-KIND.sh (sh, as root, inside the VM;
# HOLDFAST_REPO and GUEST_TIMEOUT are set by ./run): strict mode, the paths,
# wait_for, a trace of every command in a file that also takes stderr (a
# failing script prints its end from its cleanup: guest_end), and a
# watchdog that, GUEST_TIMEOUT s in (before the VM's own bound), prints
# what each process waits on and ends the script: a hang shows its cause.
set -eu
cd "$HOLDFAST_REPO"
B=$HOLDFAST_REPO/target/debug
W=/tmp/hf
mkdir -p $W
exec 2>>$W/trace
set -x

guest_watchdog() {
    sleep "$GUEST_TIMEOUT"
    set +x
    echo "--- still running after $GUEST_TIMEOUT s; the last commands:"
    tail -25 $W/trace
    echo "--- processes"
    ps -eo pid,ppid,stat,wchan:28,etime,args | grep -v ' \[.*\]$'
    for pid in $(ps -eo pid,stat | awk '$2 ~ /^D/ { print $1 }'); do
        echo "--- kernel stack of $pid ($(cat /proc/$pid/comm))"; cat /proc/$pid/stack
    done
    for log in $W/*.log; do echo "--- $log (tail)"; tail -15 "$log"; done
    echo "--- kernel log (tail)"; dmesg | tail -30
    kill -TERM $$
}
guest_watchdog &
watchdog=$!
guest_end() { # guest_end RC: from a cleanup trap, with the script's $?
    kill $watchdog 2>/dev/null || true
    [ "$1" = 0 ] && return 0
    echo "--- failed (exit $1); the last commands:"
    tail -25 $W/trace
}
diagnose() { :; } # what a timed-out wait_for prints; a script may redefine it
wait_for() { # wait_for SECONDS TEST...
    n=$(($1 * 10)); shift
    while ! "$@"; do
        n=$((n - 1)); [ $n -gt 0 ] || { echo "timed out waiting for: $*"; diagnose; return 1; }
        sleep 0.1
    done
}
io_flushers() { # io_flushers PID [NAME]: every thread (named NAME...) has PR_SET_IO_FLUSHER's flags
    for stat in /proc/$1/task/*/stat; do
        case "$(cat ${stat%stat}comm)" in "${2:-}"*) ;; *) continue ;; esac
        flags=$(sed 's/.*) //' "$stat" | awk '{ print $7 }')
        # PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE (include/linux/sched.h)
        [ $((flags & 0x180000)) = $((0x180000)) ] || { echo "$stat: flags $flags: not an IO flusher"; return 1; }
    done
}
