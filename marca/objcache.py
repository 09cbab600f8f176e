#!/usr/bin/env python3
"""A compiler wrapper for Verilator builds that compiles Verilator's run-time library once.

Every Verilator build compiles the same run-time sources (``verilated.cpp``, ``verilated_vpi.cpp``,
``verilated_threads.cpp``, ...: ~30 CPU seconds) next to the design's own C++. :mod:`marca.sim` sets this
script as the makefiles' ``OBJCACHE`` (the hook meant for ccache), so each compile command comes here:

* a command whose source lies in Verilator's ``include/`` folder (the run-time library, which does not
  depend on the design) is looked up by a hash of its whole command line in ``$MARCA_OBJCACHE_DIR``;
  a hit copies the object, a miss compiles it and stores it (atomically: parallel test workers share it);
* every other command (the design, cocotb's ``verilator.cpp``, which includes the design's header) runs as is.

Standard library only, so that it starts fast.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

_DIRECTORY = "MARCA_OBJCACHE_DIR"


def _cacheable(argv: list[str]) -> tuple[str, str] | None:
    """``(source, object)`` of a run-time library compile, else None."""
    if "-c" not in argv or "-o" not in argv:
        return None
    sources = [a for a in argv if a.endswith(".cpp")]
    if len(sources) != 1:
        return None
    source, output = sources[0], argv[argv.index("-o") + 1]
    root = os.environ.get("VERILATOR_ROOT")
    if not root or os.path.dirname(os.path.abspath(source)) != os.path.join(os.path.abspath(root), "include"):
        return None
    return source, output


def main(argv: list[str]) -> int:
    folder = os.environ.get(_DIRECTORY)
    target = _cacheable(argv) if folder else None
    if target is None:
        return subprocess.call(argv)
    source, output = target
    # The command names the output only by its (relative) file name, so the key is the whole command line,
    # with the source's size and time (a reinstalled Verilator is a new key).
    stat = os.stat(source)
    key = hashlib.sha256("\0".join([*argv, str(stat.st_size), str(stat.st_mtime_ns)]).encode()).hexdigest()[:20]
    cached = os.path.join(folder, f"{os.path.basename(output)}-{key}")
    if os.path.exists(cached):
        shutil.copyfile(cached, output)
        return 0
    status = subprocess.call(argv)
    if status == 0:
        os.makedirs(folder, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=folder)
        os.close(handle)
        shutil.copyfile(output, temporary)
        os.replace(temporary, cached)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
