"""The reduction-alternative PE array (MARCA idea 1): one grid of PEs for linear and element-wise work.

``R`` rows × ``C`` columns of PEs. Each PE has one multiplier, one adder and one comparator in the compute
format (``marca.hw.fp``). In **linear** mode the adders of a row are wired as that row's balanced pairwise
adder tree over the row's ``C`` products (the contract's order, docs/numerics.md) plus the row's
accumulator; in **element-wise** mode the same adders serve the ``R·C`` independent lanes. No adder is
dedicated to the tree: a row has exactly ``C`` adders, ``C − 1`` tree nodes and one accumulator. See
docs/pe_array.md for the design, the hazards this sharing creates and how they are resolved.

Each lane's own logic (held operand, input registers, float units, element-wise operand selection, lane
extension) is a :class:`ProcessingElement`; each row's PEs with what depends on a lane's place in the row
(operand broadcast, the row's tree and accumulator wiring) is an :class:`ArrayRow`; the array keeps the
control that all rows share. So all ``R·C`` PEs emit as one Verilog module and all ``R`` rows as another
(marca/verilog.py merges identical modules).

Payload layouts are built in one place, :func:`pe_array_layouts`; the opcodes live in :mod:`marca.ops`.
"""

from collections.abc import Callable
from typing import NamedTuple

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from ..formats import FloatFormat
from ..ops import ArrayMode, Broadcast, ElementwiseOp

__all__ = ["PEArrayLayouts", "pe_array_layouts", "PEArray", "ArrayRow", "ProcessingElement", "tree_node_column",
           "MAX_ROWS", "MAX_COLS"]

MAX_ROWS = 64
MAX_COLS = 64


def _control_ports(function_bits: int) -> dict:
    """The per-beat control inputs a row and a PE share (the array's decoded operation)."""
    ports = {name: In(1) for name in ("enable", "hold", "use_held", "product_uses_b", "min_max", "is_min",
                                      "select_or_keep_a", "function_sel")}
    ports |= {"op": In(ElementwiseOp)}
    if function_bits:
        ports["function"] = In(function_bits)
    return ports


def _delayed(m: Module, enable, value, cycles: int, name: str):
    """``value`` as it was ``cycles`` cycles with ``enable`` high ago (a chain of registers)."""
    for index in range(cycles):
        register = Signal(value.shape(), name=f"{name}_d{index + 1}")
        with m.If(enable):
            m.d.sync += register.eq(value)
        value = register
    return value

class ArrayRow(wiring.Component):
    """One row of :class:`PEArray`: ``C`` PEs, their operand broadcast, the row's adder tree and accumulators.

    Nothing in a row depends on which row it is: the array hands each row the operand elements a row can
    read (its own ``C`` lanes, its ``ROW`` element, the ``C`` elements a ``COLUMN`` broadcast reads, whose
    first is also the ``SCALAR`` one), so all ``R`` rows are one Verilog module (marca/verilog.py) and the
    position-dependent wiring (broadcast, tree, accumulators) is emitted once per array, not once per row.
    Control decoded once for all rows (the pipeline's stage terms, the accumulators' operand choice) comes
    from the array; every register advances with ``enable``. Timing as :class:`PEArray`'s.

    Ports
    -----
    enable, hold, use_held, product_uses_b, min_max, is_min, select_or_keep_a, function_sel, op, function : In
        As :class:`ProcessingElement`'s, the same for every PE of the array.
    broadcast_a, broadcast_b, broadcast_c : In(Broadcast)
        The beat's broadcast mode per operand.
    a_lanes, b_lanes, c_lanes : In(C·width)
        The row's own ``C`` lanes of each operand field (``LANE`` broadcast), column 0 in the low bits.
    a_row, b_row, c_row : In(width)
        Element ``r`` of each field (``r`` the row's index) while that operand's broadcast is ``ROW``, else 0.
    a_columns, b_columns, c_columns : In(C·width)
        Elements ``0 .. C−1`` of each field while its broadcast is ``COLUMN`` or ``SCALAR`` (element 0 is
        the ``SCALAR`` one), else 0.
    tree_turn : In(depth)
        Bit ``k``: a linear beat is at tree level ``k``'s adders (else they add element-wise ``x + y``).
    accumulator_turn : In(1)
        A linear beat is at the accumulator stage A (the accumulator adder adds the tree's sum).
    accumulator_write, write_slot : In(1), In(slot bits)
        Store the accumulator adder's sum in accumulator ``write_slot``.
    b_takes_bias, b_takes_elementwise, b_takes_forward, b_takes_slot : In
        One-hot choice of the accumulator adder's second operand (registered in the array); ``b_takes_forward``
        only when the adder has a latency, ``b_takes_slot`` one bit per accumulator.
    lane_results : Out(C·width)
        The lanes' element-wise results at the output stage.
    row_result : Out(width)
        The row's accumulator sum at the linear output stage.
    """

    def __init__(self, *, cols: int, fmt: FloatFormat, unit_classes, input_stage: int, compare_stage: int,
                 adder_stage: int, accumulator_stage: int, adder_latency: int, linear_latency: int,
                 elementwise_latency: int, accumulators: int, slot_bits: int, extensions=(),
                 function_bits: int = 0, _fault: str | None = None):
        self.cols, self.fmt = cols, fmt
        self._unit_classes = unit_classes
        self._stages = (input_stage, compare_stage, adder_stage, accumulator_stage, linear_latency,
                        elementwise_latency)
        self._adder_latency = adder_latency
        self._accumulators = accumulators
        self._extensions = list(extensions)
        self._function_bits = function_bits
        self._fault = _fault
        self.depth = (cols - 1).bit_length()
        width = fmt.width
        ports = _control_ports(function_bits)
        for name in "abc":
            ports |= {f"broadcast_{name}": In(Broadcast), f"{name}_lanes": In(cols * width),
                      f"{name}_row": In(width), f"{name}_columns": In(cols * width)}
        if self.depth:
            ports["tree_turn"] = In(self.depth)
        ports |= {"accumulator_turn": In(1), "accumulator_write": In(1), "write_slot": In(max(slot_bits, 1)),
                  "b_takes_bias": In(1), "b_takes_elementwise": In(1)}
        if adder_latency >= 1:
            ports["b_takes_forward"] = In(1)
        ports |= {"b_takes_slot": In(accumulators), "lane_results": Out(cols * width), "row_result": Out(width)}
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        cols, fmt = self.cols, self.fmt
        width = fmt.width
        stage_i, stage_c, stage_s, stage_a, lat_lin, lat_ew = self._stages
        lat_add = self._adder_latency

        def delayed(value, cycles, name):
            return _delayed(m, self.enable, value, cycles, name)

        def element(value, index):
            return value[index * width:(index + 1) * width]

        def broadcast(name, col):
            lane = Signal(width, name=f"{name}_port_{col}")
            with m.Switch(getattr(self, f"broadcast_{name}")):
                with m.Case(Broadcast.LANE):
                    m.d.comb += lane.eq(element(getattr(self, f"{name}_lanes"), col))
                with m.Case(Broadcast.ROW):
                    m.d.comb += lane.eq(getattr(self, f"{name}_row"))
                with m.Case(Broadcast.COLUMN):
                    m.d.comb += lane.eq(element(getattr(self, f"{name}_columns"), col))
                with m.Case(Broadcast.SCALAR):
                    m.d.comb += lane.eq(element(getattr(self, f"{name}_columns"), 0))
            return lane

        pes = []
        c_last = None
        for col in range(cols):
            pe = m.submodules[f"pe_{col}"] = ProcessingElement(
                fmt=fmt, unit_classes=self._unit_classes, input_stage=stage_i, compare_stage=stage_c,
                adder_stage=stage_s, elementwise_latency=lat_ew,
                extension=self._extensions[col] if self._extensions else None,
                function_bits=self._function_bits)
            pes.append(pe)
            c_port = broadcast("c", col)
            m.d.comb += [
                pe.a.eq(broadcast("a", col)),
                pe.b.eq(broadcast("b", col)),
                pe.c.eq(c_port),
            ]
            m.d.comb += [getattr(pe, name).eq(getattr(self, name))
                         for name in ("enable", "hold", "use_held", "product_uses_b", "op", "min_max", "is_min",
                                      "select_or_keep_a", "function_sel")]
            if self._function_bits:
                m.d.comb += pe.function.eq(self.function)
            c_last = c_port
        # The row's bias: lane C-1's c at stage A. Delayed here from the port rather than from the PE's
        # input register, so that every PE uses the same outputs and all are one module (Amaranth drops
        # unused outputs from a module's ports); synthesis merges the duplicate first register.
        bias_a = delayed(c_last, stage_a, "bias")

        # Adder tree: the node at (level, first_leaf) is the adder of column tree_node_column(...).
        node_result = {}   # (level, first_leaf) -> adder result value

        def operand(level, first_leaf):
            if level < 0:
                return pes[first_leaf].product
            return node_result[(level, first_leaf)]

        for level in range(self.depth):
            span = 1 << (level + 1)
            for first_leaf in range(0, cols, span):
                pe = pes[tree_node_column(level, first_leaf)]
                left = operand(level - 1, first_leaf)
                right = operand(level - 1, first_leaf + span // 2)
                if self._fault == "tree_order" and level == 0 and cols >= 4:
                    # Deliberately broken order: pairs (p0 + p2), (p1 + p3) instead of (p0 + p1), ...
                    base = first_leaf - first_leaf % 4
                    offset = first_leaf % 4 // 2
                    left = pes[base + offset].product
                    right = pes[base + offset + 2].product
                tree_turn = self.tree_turn[level]
                m.d.comb += [
                    pe.adder_a.eq(Mux(tree_turn, left, pe.x)),
                    pe.adder_b.eq(Mux(tree_turn, right, pe.y)),
                ]
                node_result[(level, first_leaf)] = pe.sum

        tree_sum = operand(self.depth - 1, 0)
        accumulator_pe = pes[cols - 1]
        slots = Array(Signal(width, name=f"accumulator_{slot}") for slot in range(self._accumulators))
        with m.If(self.accumulator_write):
            m.d.sync += slots[self.write_slot].eq(accumulator_pe.sum)
        # Second operand: bias (first beat), the slot's running sum (forwarded when the same slot's
        # previous sum leaves the adder right now), or the element-wise y. The one-hot choice is the
        # same for every row and registered in the array, so here it is an AND-OR of registers.
        choices = [(self.b_takes_bias, bias_a), (self.b_takes_elementwise, accumulator_pe.y)]
        if lat_add >= 1:
            choices.append((self.b_takes_forward, accumulator_pe.sum))
        choices += [(self.b_takes_slot[slot], slots[slot]) for slot in range(self._accumulators)]
        accumulator_b = Signal(width, name="accumulator_b")
        m.d.comb += accumulator_b.eq(_any_of(Mux(select, value, 0) for select, value in choices))
        m.d.comb += [
            accumulator_pe.adder_a.eq(Mux(self.accumulator_turn, tree_sum, accumulator_pe.x)),
            accumulator_pe.adder_b.eq(accumulator_b),
            self.row_result.eq(delayed(accumulator_pe.sum, lat_lin - (stage_a + lat_add), "row_result")),
            self.lane_results.eq(Cat(*(pe.lane_result for pe in pes))),
        ]
        return m


class PEArrayLayouts(NamedTuple):
    """Payload layouts of the array's streams: ``operands`` (input beat) and ``results`` (output beat)."""

    operands: data.StructLayout
    results: data.StructLayout


def pe_array_layouts(*, rows: int, cols: int, fmt: FloatFormat, function_bits: int = 0,
                     slot_bits: int = 0) -> PEArrayLayouts:
    """The array's payload layouts; every producer and consumer of the array's streams builds them here.

    Operand beat (``operands``):

    ``mode`` (:class:`~marca.ops.ArrayMode`), ``op`` (:class:`~marca.ops.ElementwiseOp`, element-wise
    mode), ``function`` (``function_bits`` wide; only present when the array has a lane extension: the
    extension's sub-operation for ``op = FUNCTION``), ``broadcast_a``/``broadcast_b``/``broadcast_c``
    (:class:`~marca.ops.Broadcast`, one per operand), ``first``/``last`` (linear mode: start the
    accumulators from the bias / send them out), ``slot`` (``slot_bits`` wide, only present when the
    array has more than one accumulator per row: which of the rows' accumulators this linear beat
    uses), ``hold_a`` (store this beat's lane ``a`` values in the array's held tile), ``use_held_a``
    (lanes read ``a`` from the held tile instead of the beat; ignored when ``hold_a`` is set),
    ``a``/``b``/``c`` (``R·C`` values each, row-major lane order).

    Result beat (``results``): ``mode`` of the beat that produced it and ``result`` (``R·C`` values;
    element-wise: lane results; linear: row ``r``'s accumulator in element ``r``, the rest +0).
    """
    lanes = rows * cols
    values = data.ArrayLayout(unsigned(fmt.width), lanes)
    fields = {"mode": ArrayMode, "op": ElementwiseOp}
    if function_bits:
        fields["function"] = unsigned(function_bits)
    fields |= {"broadcast_a": Broadcast, "broadcast_b": Broadcast, "broadcast_c": Broadcast,
               "first": unsigned(1), "last": unsigned(1)}
    if slot_bits:
        fields["slot"] = unsigned(slot_bits)
    fields |= {"hold_a": unsigned(1), "use_held_a": unsigned(1), "a": values, "b": values, "c": values}
    return PEArrayLayouts(operands=data.StructLayout(fields),
                          results=data.StructLayout({"mode": ArrayMode, "result": values}))


def tree_node_column(level: int, first_leaf: int) -> int:
    """Column whose adder computes the tree node at ``level`` covering leaves from ``first_leaf``.

    Level ``k`` node covering leaves ``[first_leaf, first_leaf + 2^(k+1))`` sits at the in-order position
    ``first_leaf + 2^k − 1`` (between its two halves), so the ``C − 1`` nodes take columns ``0 .. C−2``
    once each and column ``C − 1`` is left for the row's accumulator.
    """
    return first_leaf + (1 << level) - 1


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unit_latency(unit_class, fmt: FloatFormat) -> int:
    """A float unit's latency: its class attribute, or a probe instance's where it depends on ``fmt``."""
    latency = getattr(unit_class, "latency", None)
    if not _is_int(latency):
        probe = unit_class(fmt=fmt)
        probe._MustUse__silence = True    # built only to read its latency, never elaborated
        latency = probe.latency
    return latency


def _control_layout(slot_bits: int) -> data.StructLayout:
    """Per-stage control: which beat (if any) occupies a pipeline stage."""
    return data.StructLayout({"valid": 1, "mode": ArrayMode, "op": ElementwiseOp, "first": 1, "last": 1,
                              "slot": max(slot_bits, 1)})


class ProcessingElement(wiring.Component):
    """One PE of :class:`PEArray`: the lane's logic that does not depend on where the lane sits.

    The array elaborates ``R·C`` of these; being one module, they are one definition in the emitted
    Verilog (marca/verilog.py merges identical modules). Everything that depends on the lane's position
    stays in its :class:`ArrayRow`: operand broadcast, the tree's wiring of the adder inputs, the row's
    accumulators.
    The timing parameters are the array's (see :class:`PEArray`, "Timing"); every register advances with
    ``enable``, except the held ``a`` value, which is written on ``hold``.

    Ports
    -----
    enable, hold, use_held, product_uses_b, min_max, is_min, select_or_keep_a, function_sel : In(1)
        Pipeline enable; write the held tile (a beat accepted with ``hold_a``); read ``a`` from it;
        control decoded once for all PEs (input stage: the multiplier's ``b`` is the operand, not 1;
        comparator stage: op is MIN/MAX, MIN, CMP_SELECT; an element-wise FUNCTION beat at the stage where
        the extension's result joins: the input stage for a combinational extension, the comparator stage
        when the extension answers by then, else the output stage).
    op : In(ElementwiseOp)
        The op at the input stage (chooses the adder's second element-wise operand).
    function : In(function_bits)
        The lane extension's sub-operation at the input stage (only with an extension).
    a, b, c : In(width)
        The lane's operands after broadcast.
    adder_a, adder_b : In(width)
        The adder's inputs, chosen by the array (tree node, accumulator, or this PE's ``x``/``y``).
    product, x, y, sum, lane_result : Out(width)
        The product and the element-wise adder operands at the adder stage; the adder's result; the lane's
        element-wise result at the output stage.
    """

    def __init__(self, *, fmt: FloatFormat, unit_classes, input_stage: int, compare_stage: int,
                 adder_stage: int, elementwise_latency: int, extension: wiring.Component | None = None,
                 function_bits: int = 0):
        self.fmt = fmt
        self._unit_classes = unit_classes
        self._stages = (input_stage, compare_stage, adder_stage, elementwise_latency)
        self._extension = extension
        width = fmt.width
        ports = _control_ports(function_bits)
        ports |= {name: In(width) for name in ("a", "b", "c", "adder_a", "adder_b")}
        ports |= {name: Out(width) for name in ("product", "x", "y", "sum", "lane_result")}
        super().__init__(ports)

    def elaborate(self, platform):
        m = Module()
        fmt = self.fmt
        width = fmt.width
        FloatMultiplier, FloatAdder, FloatCompare = self._unit_classes
        stage_i, stage_c, stage_s, lat_ew = self._stages
        one = Const(fmt.one, width)
        negative_zero = Const(fmt.sign_bit, width)   # add(x, −0) = x for every contract output x

        def delayed(value, cycles, name):
            return _delayed(m, self.enable, value, cycles, name)

        held = Signal(width, name="held_a")
        with m.If(self.hold):
            m.d.sync += held.eq(self.a)
        a_port = Signal(width, name="a_port")
        m.d.comb += a_port.eq(Mux(self.use_held, held, self.a))
        a_lane = delayed(a_port, stage_i, "a")
        b_lane = delayed(self.b, stage_i, "b")
        c_lane = delayed(self.c, stage_i, "c")

        multiplier = m.submodules.multiplier = FloatMultiplier(fmt=fmt)
        comparator = m.submodules.comparator = FloatCompare(fmt=fmt)
        adder = m.submodules.adder = FloatAdder(fmt=fmt)
        # ADD, SUB, PASS, CMP_SELECT run a through the multiplier as mul(a, 1) = read(a).
        multiplier_a = a_lane
        multiplier_b = Mux(self.product_uses_b, b_lane, one)
        # A combinational lane extension (latency 0) gives the multiplier's operands of a FUNCTION beat:
        # its result (and its factor, when it has one, else 1), so FUNCTION is mul(result, factor), then
        # add(·, −0), like PASS: the extension's results are read as any operand and need no register.
        extension = self._extension
        join_at_input = extension is not None and extension.latency == 0
        if join_at_input:
            m.submodules.extension = extension
            m.d.comb += [extension.a.eq(a_lane), extension.b.eq(b_lane)]
            if "function" in self.signature.members:
                m.d.comb += extension.function.eq(self.function)
            multiplier_a = Mux(self.function_sel, extension.result, a_lane)
            if "factor" in extension.signature.members:
                multiplier_b = Mux(self.function_sel, extension.factor, multiplier_b)
        m.d.comb += [
            multiplier.enable.eq(self.enable), comparator.enable.eq(self.enable), adder.enable.eq(self.enable),
            multiplier.a.eq(multiplier_a),
            multiplier.b.eq(multiplier_b),
            comparator.a.eq(a_lane),
            comparator.b.eq(b_lane),
            adder.subtract.eq(0),
            adder.a.eq(self.adder_a),
            adder.b.eq(self.adder_b),
            self.sum.eq(adder.result),
        ]
        # The adder's second element-wise operand, chosen at the input stage and carried on.
        addend = Signal(width, name="addend")
        with m.Switch(self.op):
            with m.Case(ElementwiseOp.MULADD, ElementwiseOp.CMP_SELECT):
                m.d.comb += addend.eq(c_lane)
            with m.Case(ElementwiseOp.ADD):
                m.d.comb += addend.eq(b_lane)
            with m.Case(ElementwiseOp.SUB):
                m.d.comb += addend.eq(b_lane ^ fmt.sign_bit)
            with m.Default():
                m.d.comb += addend.eq(negative_zero)
        addend_c = delayed(addend, stage_c - stage_i, "addend")
        product_s = delayed(multiplier.result, stage_s - stage_i - multiplier.latency, "product")
        m.d.comb += self.product.eq(product_s)

        # Element-wise adder operands at stage S: every op is add(x, y), see docs/pe_array.md.
        # x is the product unless the op is MIN/MAX (the chosen operand) or CMP_SELECT with
        # a < b (−0); y is the addend unless the op is CMP_SELECT with a >= b (−0). Both
        # alternatives are known at stage C, when the comparator answers.
        # A registered lane extension that answers by stage C joins here as x, so its result needs no
        # registers of its own: FUNCTION's y is −0 and add(x, −0) = x for every contract output (which the
        # extension's results must be). A slower extension is delayed to the output stage and selected there.
        join_at_c = extension is not None and not join_at_input and stage_i + extension.latency <= stage_c
        if extension is not None and not join_at_input:
            m.submodules.extension = extension
            m.d.comb += [
                extension.enable.eq(self.enable),
                extension.a.eq(a_lane), extension.b.eq(b_lane), extension.c.eq(c_lane),
            ]
            if "function" in self.signature.members:
                m.d.comb += extension.function.eq(self.function)
        x_other = Signal(width, name="x_other")
        x_is_other = Signal(name="x_is_other")
        y_c = Signal(width, name="y")
        min_max_value = Mux(self.min_max, Mux(self.is_min, comparator.minimum, comparator.maximum), negative_zero)
        if join_at_c:
            extension_c = delayed(extension.result, stage_c - stage_i - extension.latency, "extension")
            x_takes_extension = self.function_sel
            m.d.comb += x_other.eq(Mux(x_takes_extension, extension_c, min_max_value))
        else:
            x_takes_extension = Const(0, 1)
            m.d.comb += x_other.eq(min_max_value)
        m.d.comb += [
            x_is_other.eq(x_takes_extension | self.min_max | (self.select_or_keep_a & comparator.lt)),
            y_c.eq(Mux(self.select_or_keep_a & ~comparator.lt, negative_zero, addend_c)),
        ]
        x_other_s = delayed(x_other, stage_s - stage_c, "x_other")
        x_is_other_s = delayed(x_is_other, stage_s - stage_c, "x_is_other")
        m.d.comb += [
            self.x.eq(Mux(x_is_other_s, x_other_s, product_s)),
            self.y.eq(delayed(y_c, stage_s - stage_c, "y")),
        ]

        lane_sum = delayed(adder.result, lat_ew - (stage_s + adder.latency), "lane_result")
        if extension is not None and not join_at_c and not join_at_input:
            extension_result = delayed(extension.result, lat_ew - stage_i - extension.latency, "extension")
            lane_sum = Mux(self.function_sel, extension_result, lane_sum)
        m.d.comb += self.lane_result.eq(lane_sum)
        return m


class PEArray(wiring.Component):
    """Reduction-alternative PE array: ``rows`` × ``cols`` PEs in the compute format ``fmt``.

    Parameters
    ----------
    rows : int
        PE rows ``R`` (output features in linear mode), 1 to ``MAX_ROWS``.
    cols : int
        PE columns ``C`` (a chunk of the input dimension in linear mode), a power of two, 1 to ``MAX_COLS``.
    fmt : FloatFormat
        Compute format of the PEs, trees and accumulators.
    accumulators : int, optional
        Accumulators per row (a power of two, 1 to 64; default: the adder latency rounded up to a power
        of two). A linear beat names its accumulator in the payload's ``slot`` field, so up to
        ``accumulators`` independent accumulation chains (e.g. row tiles of a GEMV) can be interleaved
        at one beat per cycle.
    lane_extension : callable, optional
        Returns a new :class:`~amaranth.lib.wiring.Component` per lane with int attributes
        ``function_bits`` and ``latency``, ports ``function`` (``In(function_bits)``), ``a``, ``b``
        (``In(width)``) and ``result`` (``Out(width)``), and, by latency: a **combinational** extension
        (latency 0, the nonlinear units of issues #4 and 13) may have ``factor`` (``Out(width)``); its
        ``result`` and ``factor`` (else 1) are the multiplier's operands of a ``FUNCTION`` beat, whose
        result is then ``add(mul(result, factor), −0)``: read as any operands (any NaN, subnormals as
        zeros), no registers of its own. A registered one (latency ≥ 1) has ``c`` (``In(width)``) and
        ``enable`` (``In(1)``); at most the comparator's latency, it feeds the adder's ``x`` (with
        ``y = −0``, an identity on the contract's outputs: its results must be such, canonical NaN and no
        subnormals); a slower one is delayed to the output stage and can return any bits.

    Ports
    -----
    i : In(stream.Signature(layouts.operands))
        Operand beats (see :func:`pe_array_layouts`).
    o : Out(stream.Signature(layouts.results))
        One result beat per element-wise beat and per linear beat flagged ``last``, in input order.

    Semantics (docs/pe_array.md, marca/ops.py)
    ------------------------------------------
    Lane ``(r, c)`` reads its operands through each operand's broadcast mode; ``a`` may come from the held
    tile. Element-wise: ``result[r·C + c] = op(a, b, c)``. Linear: ``p[r, c] = mul(a, b)``; row ``r``
    computes ``acc[s][r] = add(first ? bias[r] : acc[s][r], tree_sum(p[r, :]))`` (``s`` the beat's slot)
    where ``bias[r]`` is lane ``(r, C−1)``'s ``c`` operand (give ``c`` with ``Broadcast.ROW`` for a
    per-row bias or partial sum, ``Broadcast.SCALAR`` with +0 to start from zero); ``last`` sends
    ``acc[s]`` out.

    Timing
    ------
    ``linear_latency`` / ``elementwise_latency``: a beat accepted in cycle ``T`` (``i.valid & i.ready``)
    has its result beat valid in cycle ``T + latency`` when the output is not stalled. The first
    ``input_stage`` (1) cycle registers every lane's operands after broadcast and held-tile selection;
    the float units and lane extensions start from those registers (docs/pe_array.md, "Timing"). Throughput: one
    beat per cycle, with these exceptions (hazards of the shared adders, resolved by holding ``i.ready``
    low, never by losing data):

    * a linear beat that continues an accumulation (``first = 0``) waits until the previous linear beat
      on the same slot is at least ``accumulator_interval`` (the adder latency) cycles ahead; chains of
      ``first = 1`` beats (the bias carrying a partial sum) and round-robins over at least
      ``accumulator_interval`` slots run at one beat per cycle;
    * an element-wise beat waits until the last linear beat has left the adder tree
      (``linear_to_elementwise_gap`` cycles after it, less than a pipeline drain);
    * a linear beat waits ``elementwise_to_linear_gap`` cycles after an element-wise beat (0 unless the
      lane extension is slower than the linear path).

    Stream rules: ``o.valid`` depends only on registers (it never waits on ``o.ready``); ``i.ready``
    depends on ``o.ready``, on the pipeline's contents and on ``i.payload`` (mode, ``first``, ``slot``).
    The whole pipeline advances when ``o`` is empty or accepted (``enable = ~o.valid | o.ready``), so a stall
    anywhere loses, duplicates and reorders nothing.
    """

    def __init__(self, *, rows: int, cols: int, fmt: FloatFormat, accumulators: int | None = None,
                 lane_extension: Callable[[], wiring.Component] | None = None, _fault: str | None = None):
        # An array whose parameters are rejected is not an unused design: no "never elaborated" warning.
        self._MustUse__silence = True
        if not _is_int(rows) or not 1 <= rows <= MAX_ROWS:
            raise ValueError(f"rows must be an integer in [1, {MAX_ROWS}], not {rows!r}")
        if not _is_int(cols) or not 1 <= cols <= MAX_COLS or cols & (cols - 1):
            raise ValueError(f"cols must be a power of two in [1, {MAX_COLS}], not {cols!r}")
        if not isinstance(fmt, FloatFormat):
            raise ValueError(f"fmt must be a FloatFormat, not {fmt!r}")
        if lane_extension is not None and not callable(lane_extension):
            raise ValueError(f"lane_extension must be a callable returning a Component, "
                             f"not {lane_extension!r}")
        if _fault not in (None, "tree_order", "drop_beat", "no_stall"):
            raise ValueError(f"_fault must be None, 'tree_order', 'drop_beat' or 'no_stall', not {_fault!r}")
        from .fp import FloatAdder, FloatCompare, FloatMultiplier

        self.rows, self.cols, self.fmt = rows, cols, fmt
        self._fault = _fault
        self._unit_classes = (FloatMultiplier, FloatAdder, FloatCompare)
        self.multiplier_latency = _unit_latency(FloatMultiplier, fmt)
        self.adder_latency = _unit_latency(FloatAdder, fmt)
        self.compare_latency = _unit_latency(FloatCompare, fmt)

        if accumulators is None:
            accumulators = 1 << (max(self.adder_latency, 1) - 1).bit_length()
        if not _is_int(accumulators) or not 1 <= accumulators <= 64 or accumulators & (accumulators - 1):
            raise ValueError(f"accumulators must be a power of two in [1, 64], not {accumulators!r}")
        self.accumulators = accumulators
        self.slot_bits = (accumulators - 1).bit_length()

        self._extensions = []
        self.function_bits = 0
        self.extension_latency = 0
        if lane_extension is not None:
            self._extensions = [lane_extension() for _ in range(rows * cols)]
            for extension in self._extensions:
                # Owned by the array: whether the design is used is the array's own "never elaborated" check.
                extension._MustUse__silence = True
            probe = self._extensions[0]
            for name in ("function_bits", "latency"):
                if not _is_int(getattr(probe, name, None)) or getattr(probe, name) < 0:
                    raise ValueError(f"lane_extension components must have a non-negative int attribute "
                                     f"{name!r}, not {getattr(probe, name, None)!r}")
            self.function_bits = probe.function_bits
            self.extension_latency = probe.latency

        self.layouts = pe_array_layouts(rows=rows, cols=cols, fmt=fmt, function_bits=self.function_bits,
                                        slot_bits=self.slot_bits)

        # Pipeline schedule (stage = enabled cycles since the beat was accepted). Stage 1 holds every
        # lane's operands in registers (after broadcast and held-tile selection), so no float unit or lane
        # extension starts from the input port's logic.
        self.input_stage = 1
        self.depth = (cols - 1).bit_length()             # tree levels
        self.adder_stage = self.input_stage + max(self.multiplier_latency, self.compare_latency)   # "S"
        self.accumulator_stage = self.adder_stage + self.depth * self.adder_latency   # "A"
        self.linear_latency = self.accumulator_stage + self.adder_latency
        self.elementwise_latency = max(self.adder_stage + self.adder_latency,
                                       self.input_stage + self.extension_latency)
        self.accumulator_interval = max(self.adder_latency, 1)
        self.linear_to_elementwise_gap = self.depth * self.adder_latency
        self.elementwise_to_linear_gap = max(self.elementwise_latency - self.linear_latency, 0)

        super().__init__({
            "i": In(stream.Signature(self.layouts.operands)),
            "o": Out(stream.Signature(self.layouts.results)),
        })
        self._MustUse__silence = False

    @property
    def lanes(self) -> int:
        return self.rows * self.cols

    def elaborate(self, platform):
        m = Module()
        rows, cols, fmt = self.rows, self.cols, self.fmt
        width = fmt.width
        lat_add, lat_cmp = self.adder_latency, self.compare_latency
        stage_s, stage_a = self.adder_stage, self.accumulator_stage
        lat_lin, lat_ew = self.linear_latency, self.elementwise_latency
        stage_i = self.input_stage
        payload = self.i.payload

        enable = Signal()          # the whole pipeline advances
        accept = Signal()          # a beat enters this cycle

        def delayed(value, cycles, name):
            """``value`` as it was ``cycles`` enabled cycles ago."""
            for index in range(cycles):
                register = Signal.like(value, name=f"{name}_d{index + 1}") if isinstance(value, Signal) \
                    else Signal(value.shape(), name=f"{name}_d{index + 1}")
                with m.If(enable):
                    m.d.sync += register.eq(value)
                value = register
            return value

        # Control pipeline -------------------------------------------------------------------------------
        last_stage = max(lat_lin, lat_ew)
        control_layout = _control_layout(self.slot_bits)
        # Plain signals viewed through the layout: a Signal(control_layout) per stage would put a named wire
        # per field and stage in the Verilog.
        control = [control_layout(Signal(control_layout.size, name="control_0"))]
        if self.slot_bits:
            m.d.comb += control[0].slot.eq(payload.slot)
        m.d.comb += [
            control[0].valid.eq(accept),
            control[0].mode.eq(payload.mode),
            control[0].op.eq(payload.op),
            control[0].first.eq(payload.first),
            control[0].last.eq(payload.last),
        ]
        for stage in range(1, last_stage + 1):
            register = control_layout(Signal(control_layout.size, name=f"control_{stage}"))
            with m.If(enable):
                m.d.sync += register.eq(control[stage - 1])
            control.append(register)

        def linear_at(stage):
            return control[stage].valid & (control[stage].mode == ArrayMode.LINEAR)

        def elementwise_at(stage):
            return control[stage].valid & (control[stage].mode == ArrayMode.ELEMENTWISE)

        # Hazards of the shared adders (docs/pe_array.md, "Hazards").
        accumulator_busy = _any_of(linear_at(s) & (control[s].slot == control[0].slot)
                                   for s in range(1, self.accumulator_interval))
        tree_busy = _any_of(linear_at(s) for s in range(1, self.linear_to_elementwise_gap + 1))
        elementwise_ahead = _any_of(elementwise_at(s) for s in range(1, self.elementwise_to_linear_gap + 1))
        blocked = Signal()
        with m.If(payload.mode == ArrayMode.LINEAR):
            m.d.comb += blocked.eq((~payload.first & accumulator_busy) | elementwise_ahead)
        with m.Else():
            m.d.comb += blocked.eq(tree_busy)

        m.d.comb += [
            self.i.ready.eq(enable & ~blocked),
            accept.eq(self.i.valid & self.i.ready),
        ]
        if self._fault == "no_stall":   # deliberately broken: ignores back-pressure
            m.d.comb += enable.eq(1)
        else:
            m.d.comb += enable.eq(~self.o.valid | self.o.ready)

        # Lane control ------------------------------------------------------------------------------------
        def registered(value, name):
            """``value`` one enabled cycle later (the input stage's registers)."""
            return delayed(value, stage_i, name)

        def registered_early(select, name):
            """``select`` one enabled cycle later: a control term decoded a stage early."""
            register = Signal(name=name)
            with m.If(enable):
                m.d.sync += register.eq(select)
            return register

        op = payload.op
        product_uses_b = Signal()
        m.d.comb += product_uses_b.eq((payload.mode == ArrayMode.LINEAR)
                                      | (op == ElementwiseOp.MUL) | (op == ElementwiseOp.MULADD))
        product_uses_b_i = registered(product_uses_b, "product_uses_b")
        op_i = control[stage_i].op
        if self.function_bits:
            function_i = registered(payload.function, "function")
        # Element-wise adder operand selects, decided once the comparator has answered and carried to
        # stage S in registers, so the adders' inputs are one register-selected mux away from registers.
        stage_c = stage_i + lat_cmp
        op_c = control[stage_c].op
        min_max_c = (op_c == ElementwiseOp.MIN) | (op_c == ElementwiseOp.MAX)
        select_c_or_keep_a = op_c == ElementwiseOp.CMP_SELECT
        # Whether the lanes take the extension's result: at stage C as the adder's x when the extension
        # answers by then (ProcessingElement), else at the output stage (decoded one stage early and
        # registered).
        if self._extensions and self.extension_latency == 0:
            # The multiplier's operands come from the extension: element-wise FUNCTION beats only (a linear
            # beat's op field means nothing).
            function_sel = (control[stage_i].mode == ArrayMode.ELEMENTWISE) & (op_i == ElementwiseOp.FUNCTION)
        elif self._extensions and stage_i + self.extension_latency <= stage_c:
            function_sel = op_c == ElementwiseOp.FUNCTION
        else:
            function_sel = registered_early(control[lat_ew - 1].op == ElementwiseOp.FUNCTION, "function_out")

        # The rows: each holds its PEs, their operand broadcast, its adder tree and accumulators, and is the
        # same module wherever it sits (ArrayRow); here only what all rows share.
        hold = Signal()
        use_held = Signal()
        m.d.comb += [hold.eq(accept & payload.hold_a), use_held.eq(payload.use_held_a & ~payload.hold_a)]
        # Which value the accumulator adders read as their second operand, decided one stage before the
        # accumulator stage A and registered: every control term below is the one-cycle-early view of
        # the same term at stage A (the pipeline moves as one, so they stay aligned under stalls).
        early_turn = linear_at(stage_a - 1)
        early_first = control[stage_a - 1].first
        early_slot = control[stage_a - 1].slot
        if lat_add >= 1:
            early_forward = linear_at(stage_a + lat_add - 1) & (control[stage_a + lat_add - 1].slot == early_slot)
            b_takes_forward = registered_early(early_turn & ~early_first & early_forward, "b_takes_forward")
        else:
            early_forward = Const(0, 1)
            b_takes_forward = None
        b_takes_bias = registered_early(early_turn & early_first, "b_takes_bias")
        b_takes_elementwise = registered_early(~early_turn, "b_takes_elementwise")
        b_takes_slot = [registered_early(early_turn & ~early_first & ~early_forward & (early_slot == slot),
                                         f"b_takes_slot_{slot}") for slot in range(self.accumulators)]
        tree_turn = Signal(max(self.depth, 1))
        m.d.comb += tree_turn.eq(Cat(*(linear_at(stage_s + level * lat_add) for level in range(self.depth))))
        accumulator_write = Signal()
        m.d.comb += accumulator_write.eq(enable & linear_at(stage_a + lat_add))
        shared = {
            "enable": enable, "hold": hold, "use_held": use_held, "product_uses_b": product_uses_b_i, "op": op_i,
            "min_max": min_max_c, "is_min": op_c == ElementwiseOp.MIN, "select_or_keep_a": select_c_or_keep_a,
            "function_sel": function_sel,
            "accumulator_turn": linear_at(stage_a), "accumulator_write": accumulator_write,
            "write_slot": control[stage_a + lat_add].slot,   # the linear beat whose sum leaves the adder now
            "b_takes_bias": b_takes_bias, "b_takes_elementwise": b_takes_elementwise,
            "b_takes_slot": Cat(*b_takes_slot),
        }
        if self.function_bits:
            shared["function"] = function_i
        if self.depth:
            shared["tree_turn"] = tree_turn
        if b_takes_forward is not None:
            shared["b_takes_forward"] = b_takes_forward
        row_bits = cols * width
        # A row's ROW element and the COLUMN/SCALAR elements reach it masked by the broadcast mode: Amaranth
        # connects a module's inputs by net, so an unmasked field[r] would be a bit range of the columns
        # input (r < C) and row 0's lanes would be the columns themselves, and those rows would become
        # modules of their own, with fewer ports. The masks (an AND with the mode, used only in that mode)
        # make every row's inputs distinct nets.
        columns = {}
        for name in "abc":
            mode = getattr(payload, f"broadcast_{name}")
            columns[name] = Mux((mode == Broadcast.COLUMN) | (mode == Broadcast.SCALAR),
                                getattr(payload, name).as_value()[:row_bits], 0)
        lane_results, row_results = [], []
        for row in range(rows):
            array_row = m.submodules[f"row_{row}"] = ArrayRow(
                cols=cols, fmt=fmt, unit_classes=self._unit_classes, input_stage=stage_i, compare_stage=stage_c,
                adder_stage=stage_s, accumulator_stage=stage_a, adder_latency=lat_add, linear_latency=lat_lin,
                elementwise_latency=lat_ew, accumulators=self.accumulators, slot_bits=self.slot_bits,
                extensions=self._extensions[row * cols:(row + 1) * cols], function_bits=self.function_bits,
                _fault=self._fault)
            m.d.comb += [getattr(array_row, name).eq(value) for name, value in shared.items()]
            for name in "abc":
                field, mode = getattr(payload, name), getattr(payload, f"broadcast_{name}")
                m.d.comb += [
                    getattr(array_row, f"broadcast_{name}").eq(mode),
                    getattr(array_row, f"{name}_lanes").eq(field.as_value()[row * row_bits:(row + 1) * row_bits]),
                    getattr(array_row, f"{name}_row").eq(Mux(mode == Broadcast.ROW, field[row], 0)),
                    getattr(array_row, f"{name}_columns").eq(columns[name]),
                ]
            lane_results.append(array_row.lane_results)
            row_results.append(array_row.row_result)

        # Output ----------------------------------------------------------------------------------------
        # Decoded one stage early and registered (the same terms at the output stage): o.valid, and
        # with it the pipeline enable that every register waits on, comes straight from flip-flops.
        linear_out = registered_early(linear_at(lat_lin - 1) & control[lat_lin - 1].last, "linear_out")
        elementwise_out = registered_early(elementwise_at(lat_ew - 1), "elementwise_out")
        if self._fault == "drop_beat":   # deliberately broken: loses every 8th element-wise result
            dropped = Signal(3)
            with m.If(enable & elementwise_out):
                m.d.sync += dropped.eq(dropped + 1)
            elementwise_out = elementwise_out & (dropped != 7)
        m.d.comb += self.o.valid.eq(linear_out | elementwise_out)
        result = self.o.payload.result.as_value()
        with m.If(linear_out):
            m.d.comb += [self.o.payload.mode.eq(ArrayMode.LINEAR), result[:rows * width].eq(Cat(*row_results))]
        with m.Else():
            m.d.comb += [self.o.payload.mode.eq(ArrayMode.ELEMENTWISE), result.eq(Cat(*lane_results))]
        return m


def _any_of(terms):
    result = Const(0, 1)
    for term in terms:
        result = result | term
    return result
