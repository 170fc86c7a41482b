"""Run a CLI of the project with a fault injected, in a child process of the fault tests.

    python tests/_faults_worker.py [--kill-fsync GLOB] [--kill-call MODULE:FUNC] [--fsize BYTES]
                                   (--module NAME | --script PATH) -- ARGS...

- `--kill-fsync GLOB`: SIGKILL this process inside the first `os.fsync` of a file whose path matches
  GLOB (fnmatch on the full path): the file is written but not yet renamed into place, the worst
  moment for a writer that is not atomic.
- `--kill-call MODULE:FUNC`: SIGKILL this process when FUNC is called (e.g. halfway through
  generating a dataset).
- `--fsize BYTES`: no file may grow beyond BYTES (RLIMIT_FSIZE, SIGXFSZ ignored): every larger write
  fails with EFBIG as on a full disk, for any writer, including libraries' own.
- `--user-errors`: for a target that is not a CLI (a test script), report a UserError as the CLIs do
  (`error: <line>`, exit status 2). Never used for the project's CLIs, which must do it themselves.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import os
import resource
import runpy
import signal
import sys


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    argv = sys.argv[1:]
    cut = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-fsync")
    parser.add_argument("--kill-call")
    parser.add_argument("--fsize", type=int)
    parser.add_argument("--module")
    parser.add_argument("--script")
    parser.add_argument("--user-errors", action="store_true")
    args = parser.parse_args(argv[:cut])
    if args.fsize is not None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (args.fsize, args.fsize))
    if args.kill_fsync:
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = ""
            if fnmatch.fnmatch(path, args.kill_fsync):
                print(f"KILLED in fsync of {path}", file=sys.stderr)
                _kill()
            real_fsync(fd)

        os.fsync = fsync
    if args.kill_call:
        module_name, _, func = args.kill_call.partition(":")
        module = importlib.import_module(module_name)
        real = getattr(module, func)

        def killing(*a: object, **k: object) -> object:
            print(f"KILLED in {args.kill_call}", file=sys.stderr)
            _kill()
            return real(*a, **k)

        setattr(module, func, killing)
    sys.argv = [args.module or args.script, *argv[cut + 1 :]]
    from mdpd_vl.errors import UserError

    try:
        if args.module:
            runpy.run_module(args.module, run_name="__main__", alter_sys=True)
        else:
            sys.path.insert(0, os.path.dirname(os.path.abspath(args.script)))
            runpy.run_path(args.script, run_name="__main__")
    except UserError as err:
        if not args.user_errors:
            raise
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
