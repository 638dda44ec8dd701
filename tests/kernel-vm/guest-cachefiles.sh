# Runs inside the VM (sh, as root; HOLDFAST_REPO is set by ./run).
# So far only the environment the cachefiles frontend will need: the
# rebuilt module binds in ondemand mode on a real file system, and
# /dev/cachefiles opens once only. The frontend's tests come with it.
set -eu
echo "kernel $(uname -r)"
truncate -s 64M /tmp/cache.img
mkfs.ext4 -q -F /tmp/cache.img
mkdir -p /tmp/cache
mount -o loop /tmp/cache.img /tmp/cache
exec 3<>/dev/cachefiles
if (exec 4<>/dev/cachefiles) 2>/dev/null; then
    echo "a second open of /dev/cachefiles succeeded; expected EBUSY"
    exit 1
fi
echo "dir /tmp/cache" >&3
echo "tag holdfast" >&3
echo "bind ondemand" >&3
echo "cachefiles: bound in ondemand mode; a second open is refused"
exec 3>&-
umount /tmp/cache
