# Runs inside the VM (sh, as root; HOLDFAST_REPO is set by ./run).
# So far the broker's typed ublk interface against the real driver: the
# ublk frontend's own tests (round trip, crash restore, handoff, broker
# --recover) come with it.
set -eu
cd "$HOLDFAST_REPO"
echo "kernel $(uname -r)"
ls -l /dev/ublk-control
target/debug/hf-ublk-probe features
target/debug/hf-ublk-probe add-del
