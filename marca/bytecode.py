"""Byte-compile what marca's commands and tests import, once, at set-up (``make setup``).

``make setup`` installs with ``pip install --no-compile``: pip's byte-compilation of every installed file
(torch's thousands included) is half the set-up time, and most of those files are never imported. This
module imports every marca module and the heavy third-party modules they and the tests load, with
bytecode writing on even where the environment turns it off (``PYTHONDONTWRITEBYTECODE``: the Makefile
runs it without), so each later process (test workers, one simulator process per cocotb run) loads
compiled bytecode instead of compiling torch's and transformers' sources again. A module that cannot be
imported (an optional dependency not installed) is skipped.

    python -m marca.bytecode
"""

import importlib
import pkgutil
import sys

PACKAGES = ("marca", "marca.hw", "marca.golden", "marca.tb", "marca.fpga", "marca.reference", "marca.bench",
            "marca.compiler")
THIRD_PARTY = ("transformers.models.mamba.modeling_mamba", "safetensors.torch", "cocotb_tools.runner",
               "cocotbext.axi", "xdist", "pytest")


def main() -> int:
    sys.dont_write_bytecode = False
    names = list(THIRD_PARTY)
    for name in PACKAGES:
        package = importlib.import_module(name)
        names += [module.name for module in pkgutil.iter_modules(package.__path__, name + ".")
                  if not module.name.endswith("__main__")]
    skipped = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as error:
            skipped.append(f"{name} ({error})")
    print(f"[marca] byte-compiled the imports of {len(names) - len(skipped)} modules"
          + (f"; skipped {', '.join(skipped)}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
