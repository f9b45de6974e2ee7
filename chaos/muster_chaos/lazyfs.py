"""A file system that forgets what was not fsynced (F10), as a machine that loses power does.

    python3 -m muster_chaos.lazyfs BACKING MOUNTPOINT CONTROL_SOCKET

Mounts BACKING at MOUNTPOINT through FUSE (fusepy over Debian's libfuse2). File data written
through the mount is held in memory, page by page, and reaches BACKING only when the file is
fsynced (fsync or fdatasync); a file's size changes (writes past the end, truncate) are held the
same way. Reads see what was written, as the page cache would. A client of CONTROL_SOCKET that
sends `crash` has everything not yet fsynced dropped, and is answered with how many bytes were
lost: kill the process that wrote, send `crash`, restart it, and it finds only what it synced.

What it does not model (a real disk can lose more): names — create, unlink, rename, mkdir —
reach BACKING at once and survive without a directory fsync; writes are never torn within a
page or reordered; an fsync that fails keeps what it could not write, for the next one. Calls
that never reach a FUSE file system (sync_file_range, syncfs) make nothing durable here, as on a
disk they do not make the file's size or the drive's cache durable either.

Mounted with direct_io, so the kernel keeps no page cache of its own that could outlive a crash.
"""

import errno
import os
import socket
import sys
import threading

from fuse import FUSE, FuseOSError, Operations

PAGE = 4096


class Pending:
    """A file's writes since its last fsync: whole pages, its size as written, and how much of
    the backing file still holds its content (less than its length after a truncate)."""

    def __init__(self, size):
        self.pages = {}
        self.size = size
        self.valid = size

    def bytes_held(self):
        return len(self.pages) * PAGE


class LazyFs(Operations):
    use_ns = True

    def __init__(self, backing):
        self.backing = os.path.realpath(backing)
        self.guard = threading.Lock()
        # Backing path -> Pending, for files written since their last fsync.
        self.pending = {}

    def _path(self, path):
        return os.path.join(self.backing, path.lstrip("/"))

    # --- Data: held until fsync ---

    def _pending(self, real):
        held = self.pending.get(real)
        if held is None:
            held = self.pending[real] = Pending(os.path.getsize(real))
        return held

    def _read_backing(self, real, offset, size):
        with open(real, "rb", buffering=0) as f:
            return os.pread(f.fileno(), size, offset)

    def _page(self, real, held, index):
        page = held.pages.get(index)
        if page is None:
            start = index * PAGE
            page = bytearray(PAGE)
            if start < held.valid:
                old = self._read_backing(real, start, min(PAGE, held.valid - start))
                page[:len(old)] = old
            held.pages[index] = page
        return page

    def read(self, path, size, offset, fh):
        real = self._path(path)
        with self.guard:
            held = self.pending.get(real)
            if held is None:
                return os.pread(fh, size, offset)
            end = min(offset + size, held.size)
            if end <= offset:
                return b""
            backed = max(0, min(end, held.valid) - offset)
            out = bytearray(self._read_backing(real, offset, backed).ljust(end - offset, b"\0"))
            for index in range(offset // PAGE, (end - 1) // PAGE + 1):
                page = held.pages.get(index)
                if page is None:
                    continue
                start = max(offset, index * PAGE)
                stop = min(end, (index + 1) * PAGE)
                out[start - offset:stop - offset] = page[start - index * PAGE:stop - index * PAGE]
            return bytes(out)

    def write(self, path, data, offset, fh):
        real = self._path(path)
        with self.guard:
            held = self._pending(real)
            at = offset
            while at < offset + len(data):
                index = at // PAGE
                page = self._page(real, held, index)
                start = at - index * PAGE
                take = min(PAGE - start, offset + len(data) - at)
                page[start:start + take] = data[at - offset:at - offset + take]
                at += take
            held.size = max(held.size, offset + len(data))
            return len(data)

    def truncate(self, path, length, fh=None):
        real = self._path(path)
        with self.guard:
            held = self._pending(real)
            for index in [i for i in held.pages if i * PAGE >= length]:
                del held.pages[index]
            last = held.pages.get(length // PAGE)
            if last is not None:
                last[length % PAGE:] = bytes(PAGE - length % PAGE)
            # What lies past the new end reads as zeros if the file grows again.
            held.valid = min(held.valid, length)
            held.size = length

    def fsync(self, path, datasync, fh):
        real = self._path(path)
        with self.guard:
            self._sync(real)

    def _sync(self, real):
        held = self.pending.get(real)
        if held is None:
            return
        fd = os.open(real, os.O_WRONLY)
        try:
            if os.fstat(fd).st_size > held.valid:
                os.ftruncate(fd, held.valid)
            for index in sorted(held.pages):
                start = index * PAGE
                if start < held.size:
                    os.pwrite(fd, bytes(held.pages[index][:min(PAGE, held.size - start)]), start)
            os.ftruncate(fd, held.size)
            os.fsync(fd)
        except OSError as e:
            raise FuseOSError(e.errno)
        finally:
            os.close(fd)
        del self.pending[real]

    def crash(self):
        """Drops every write not fsynced; returns the bytes lost."""
        with self.guard:
            lost = sum(held.bytes_held() for held in self.pending.values())
            self.pending.clear()
            return lost

    def getattr(self, path, fh=None):
        real = self._path(path)
        # Under the lock: an fsync between the stat and the lookup would show the old size.
        with self.guard:
            st = os.lstat(real)
            held = self.pending.get(real)
            size = held.size if held is not None else st.st_size
        attrs = {key: getattr(st, key) for key in (
            "st_mode", "st_nlink", "st_uid", "st_gid", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
        for key in ("atime", "mtime", "ctime"):
            attrs[f"st_{key}"] = attrs.pop(f"st_{key}_ns")
        attrs["st_size"] = size
        return attrs

    # --- Names and the rest: passed through at once ---

    def open(self, path, flags):
        return os.open(self._path(path), flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))

    def create(self, path, mode, fi=None):
        real = self._path(path)
        with self.guard:
            self.pending.pop(real, None)
        return os.open(real, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

    def release(self, path, fh):
        os.close(fh)

    def flush(self, path, fh):
        pass

    def unlink(self, path):
        real = self._path(path)
        with self.guard:
            os.unlink(real)
            self.pending.pop(real, None)

    def rename(self, old, new):
        old_real, new_real = self._path(old), self._path(new)
        with self.guard:
            os.rename(old_real, new_real)
            self.pending.pop(new_real, None)
            moved = {p: h for p, h in self.pending.items() if p == old_real or p.startswith(old_real + "/")}
            for p, held in moved.items():
                del self.pending[p]
                self.pending[new_real + p[len(old_real):]] = held

    def mkdir(self, path, mode):
        os.mkdir(self._path(path), mode)

    def rmdir(self, path):
        os.rmdir(self._path(path))

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._path(path))

    def chmod(self, path, mode):
        os.chmod(self._path(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._path(path), uid, gid)

    def utimens(self, path, times=None):
        if times is None:
            os.utime(self._path(path))
        else:
            os.utime(self._path(path), ns=times)

    def access(self, path, amode):
        if not os.access(self._path(path), amode):
            raise FuseOSError(errno.EACCES)

    def statfs(self, path):
        st = os.statvfs(self._path(path))
        return {key: getattr(st, key) for key in (
            "f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
            "f_flag", "f_frsize", "f_namemax")}

    def fsyncdir(self, path, datasync, fh):
        pass

    def link(self, target, source):
        raise FuseOSError(errno.ENOTSUP)

    def symlink(self, target, source):
        raise FuseOSError(errno.ENOTSUP)


def serve_control(fs, control):
    """Answers `crash` on the control socket, one client at a time."""
    if os.path.exists(control):
        os.remove(control)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(control)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn:
            command = conn.recv(64).decode().strip()
            if command == "crash":
                conn.sendall(f"lost {fs.crash()}\n".encode())
            else:
                conn.sendall(f"unknown command {command!r}\n".encode())


def crash(control, timeout=10):
    """Tells the lazyfs behind `control` to drop what was not fsynced; returns the bytes lost."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(control)
        conn.sendall(b"crash\n")
        answer = conn.recv(64).decode().split()
    if len(answer) != 2 or answer[0] != "lost":
        raise RuntimeError(f"lazyfs at {control} answered {answer}")
    return int(answer[1])


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    backing, mountpoint, control = sys.argv[1:]
    fs = LazyFs(backing)
    threading.Thread(target=serve_control, args=(fs, control), daemon=True).start()
    FUSE(fs, mountpoint, foreground=True, nothreads=False, direct_io=True,
         attr_timeout=0, entry_timeout=0, negative_timeout=0, fsname="muster-lazyfs")


if __name__ == "__main__":
    main()
