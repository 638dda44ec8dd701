# Sourced first by every guest-KIND.sh (sh, as root, inside the VM;
# HOLDFAST_REPO is set by ./run): strict mode, the paths, wait_for, and a
# trace of every command in a file that also takes stderr; a failing script
# prints the trace's end from its cleanup (guest_failed), so the console
# log shows what failed.
set -eu
cd "$HOLDFAST_REPO"
B=$HOLDFAST_REPO/target/debug
W=/tmp/hf
mkdir -p $W
exec 2>>$W/trace
set -x

guest_failed() { # guest_failed RC: from a cleanup trap, with the script's $?
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
