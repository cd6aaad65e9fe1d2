"""Collectives and kernels of a compiled XLA program, read from its HLO text (`compiled.as_text()`).

`collective_bytes(hlo, num_devices)` sums, per chip and per run of the program, the
bytes of all-gather / reduce-scatter / all-reduce / all-to-all / collective-permute,
counting an op inside a while loop (scanned layers, the microbatch scan) once per
trip, nested loops multiplied. Used by aot/compile_report.py.
"""
from __future__ import annotations

import math
import re
import sys

import numpy as np

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_ARRAY_DTYPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[")
_INSTR = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s+\(.*\{\s*$")
# kind of each counted opcode; the -start halves of async pairs are skipped (the -done carries the result)
_KINDS = {"all-gather": "all-gather", "all-gather-done": "all-gather", "all-reduce": "all-reduce",
          "all-reduce-start": "all-reduce", "reduce-scatter": "reduce-scatter", "all-to-all": "all-to-all",
          "ragged-all-to-all": "all-to-all", "collective-permute": "collective-permute",
          "collective-permute-done": "collective-permute"}
COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_CONTINUATION = re.compile(r'"async_collective_fusion_config":\{"flag_start":"(-?\d+)"')
# Transfers between TPU slices (multi-slice programs): host-transfer sends the megascale runtime carries.
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="([A-Z_]+)"')
_MEGASCALE_KINDS = {"ALL_REDUCE": "all-reduce", "ALL_GATHER": "all-gather", "REDUCE_SCATTER": "reduce-scatter",
                    "ALL_TO_ALL": "all-to-all"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuples summed: 'bf16[8,128]{1,0}' -> 2048."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        size = _DTYPE_BYTES.get(dtype, 1 if dtype.startswith("f8") else 0)
        total += size * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def _split_instruction(rest: str) -> tuple[str, str, str, str]:
    """'SHAPE opcode(operands), attrs' -> (shape, opcode, operands, attrs)."""
    if rest.startswith("("):  # tuple shape
        depth = 0
        for i, ch in enumerate(rest):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = rest[:i + 1], rest[i + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    opcode, _, rest = rest.partition("(")
    depth = 1
    for i, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            break
    return shape, opcode.strip(), rest[:i], rest[i + 1:]


def _iota(spec: str) -> np.ndarray:
    """Device ids of an iota list `<=[d0,d1,...]` with an optional transpose `T(p0,p1,...)`, flattened."""
    dims = [int(d) for d in re.match(r"<=\[([\d,]*)\]", spec).group(1).split(",") if d]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if m := re.match(r"<=\[[\d,]*\]T\(([\d,]*)\)", spec):
        ids = ids.transpose([int(p) for p in m.group(1).split(",")])
    return ids.reshape(-1)


def replica_groups(attrs: str, num_devices: int) -> list[list[int]]:
    """The device groups of a collective: iota `[G,S]<=[dims]T(perm)`, `mesh['a'=n,...]<=[...] {axes}`
    (groups vary along the named axes), explicit `{{0,1,..},...}`, or one group of all devices."""
    if m := re.search(r"replica_groups=\[(\d+),(\d+)\](<=\[[\d,]*\](?:T\([\d,]*\))?)", attrs):
        return _iota(m.group(3)).reshape(int(m.group(1)), int(m.group(2))).tolist()
    if m := re.search(r"replica_groups=mesh\[([^\]]*)\]\s*(<=\[[\d,]*\](?:T\([\d,]*\))?)?\s*\{([^}]*)\}", attrs):
        axes = [(k.strip("' "), int(v)) for k, v in re.findall(r"([^,=]+)=(\d+)", m.group(1))]
        sizes = [n for _, n in axes]
        ids = (_iota(m.group(2)) if m.group(2) else np.arange(math.prod(sizes))).reshape(sizes)
        names = [a.strip("' ") for a in m.group(3).split(",") if a.strip()]
        inner = [i for i, (a, _) in enumerate(axes) if a in names]
        outer = [i for i in range(len(axes)) if i not in inner]
        return ids.transpose(outer + inner).reshape(-1, math.prod(sizes[i] for i in inner)).tolist()
    if m := re.search(r"replica_groups=\{(\{[\d,{}\s]*\})\}", attrs):
        return [[int(i) for i in g.split(",") if i.strip()] for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
    return [list(range(num_devices))]


def _group_size(attrs: str, num_devices: int) -> int:
    """Participants per replica group."""
    return len(replica_groups(attrs, num_devices)[0])


def _dcn_share(kind: str, op: str, attrs: str, num_devices: int, slice_of) -> float:
    """Share of this collective's wire bytes that goes over the DCN. A permute: the pairs whose two ends
    lie in different slices. A group spanning s slices with k chips in each runs hierarchically (as
    Multislice collectives do): within each slice on the ICI, and only a 1/k share of the buffer per chip
    across the s slices, so its DCN bytes are those of a group of s on 1/k of the buffer."""
    if slice_of is None:
        return 0.0
    if op.startswith("collective-permute"):
        listed = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
        pairs = [(int(a), int(b)) for a, b in re.findall(r"\{(\d+),(\d+)\}", listed.group(1) if listed else "")]
        return sum(slice_of[a] != slice_of[b] for a, b in pairs) / max(len(pairs), 1)
    groups = replica_groups(attrs, num_devices)
    dcn = 0.0
    for g in groups:
        s = len({slice_of[d] for d in g})
        if s > 1:
            dcn += len(g) * _wire_factor(kind, s) * s / len(g) / _wire_factor(kind, len(g))
    return dcn / max(sum(len(g) for g in groups), 1)


def _wire_factor(kind: str, n: int) -> float:
    """Bytes each chip sends per byte of the buffer, ring algorithms (all-reduce = reduce-scatter + all-gather)."""
    if kind == "collective-permute":
        return 1.0
    return (2.0 if kind == "all-reduce" else 1.0) * (n - 1) / max(n, 1)


def _parse_module(hlo: str):
    """{computation: [(name, shape, opcode, operands, attrs)]} and the entry computation's name.

    A computation ends at a line that is just "}"; an attribute may span lines (a Pallas
    kernel's backend_config holds newlines), so other lines continue the instruction above.
    """
    raw, entry, current = {}, None, None
    for line in hlo.splitlines():
        if current is None:
            if m := _HEADER.match(line):
                current = m.group(1)
                raw[current] = []
                entry = current if line.startswith("ENTRY") else entry
        elif line.rstrip() == "}":
            current = None
        elif line[:1].isspace() and _INSTR.match(line):
            raw[current].append(line)
        elif raw[current]:
            raw[current][-1] += " " + line
    comps = {}
    for comp, lines in raw.items():
        comps[comp] = []
        for line in lines:
            m = _INSTR.match(line)
            comps[comp].append((m.group(1), *_split_instruction(m.group(2))))
    return comps, entry


def _trip_count(attrs: str, operands: str, cond: list, comps: dict, by_name: dict) -> int | None:
    """A while loop's trip count: XLA's known_trip_count, else `i < N` in the condition (the compare
    itself or a fusion wrapping it, as on CPU), with i starting from the constant the loop is given."""
    if m := re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs):
        return int(m.group(1))
    const = lambda name: (int(by_name[name][3]) if name in by_name and by_name[name][2] == "constant"
                          and by_name[name][3].lstrip("-").isdigit() else None)
    for _, _, op, ops, at in cond:
        names = re.findall(r"%([\w.\-]+)", ops)
        if op == "fusion" and (callee := re.search(r"calls=%?([\w.\-]+)", at)):
            at = " ".join(i[4] for i in comps.get(callee.group(1), []) if i[2] == "compare")
        elif op != "compare":
            continue
        if "direction=LT" in at and len(names) == 2 and const(names[1]) is not None:
            start = None
            if (init := re.findall(r"%([\w.\-]+)", operands)) and init[0] in by_name and by_name[init[0]][2] == "tuple":
                first = re.findall(r"%([\w.\-]+)", by_name[init[0]][3])
                start = const(first[0]) if first else None
            return const(names[1]) - (start or 0)
    return None


def collective_bytes(hlo: str, num_devices: int, slice_of=None, num_slices: int = 1) -> dict:
    """Bytes moved by collectives in one run of a compiled HLO module, per chip.

    Per kind: `ops` (executions), `bytes` (the whole buffer: an all-gather's result,
    a reduce-scatter's operand, an all-reduce's / all-to-all's / permute's result),
    `wire_bytes` (what a chip sends with ring algorithms: bytes x (n-1)/n, twice for
    all-reduce), `by_dtype` ({dtype: wire_bytes}) and `dcn_wire_bytes` (the share of
    wire bytes of groups that span slices). Ops inside while loops count trip-count times
    (nested loops multiply); TPU's reduce-scatter (a fusion calling `all-reduce-scatter*`)
    counts as reduce-scatter. `unknown_trip_counts`: loops counted once because their
    count could not be read.

    DCN: a multi-slice TPU program is compiled per slice (its replica groups hold one slice's
    devices) and moves data between slices by host-transfer `send`s tagged
    `_xla_megascale_transfer_type` (ALL_REDUCE, ...): each counts as that collective over
    `num_slices` participants, all of it DCN. slice_of (device id -> slice index) also counts
    as DCN the groups of ordinary collectives that span slices; None: none do.
    """
    comps, entry = _parse_module(hlo)
    by_name = {i[0]: i for instrs in comps.values() for i in instrs}
    edges: dict[str, list[tuple[str, int]]] = {c: [] for c in comps}
    unknown = 0
    for comp, instrs in comps.items():
        for name, shape, op, ops, attrs in instrs:
            if op == "while":
                body = re.search(r"body=%?([\w.\-]+)", attrs).group(1)
                cond = re.search(r"condition=%?([\w.\-]+)", attrs).group(1)
                trips = _trip_count(attrs, ops, comps.get(cond, []), comps, by_name)
                unknown += trips is None
                edges[comp].append((body, trips or 1, True))
            elif op not in ("async-done", "async-update"):  # their calls= is the start's computation
                for callee in re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)",
                                         attrs):
                    edges[comp].append((callee, 1, False))
                for group in re.findall(r"(?:branch_computations|called_computations)=\{([^}]*)\}", attrs):
                    edges[comp] += [(c, 1, False) for c in re.findall(r"%?([\w.\-]+)", group)]
    # executions per computation: reverse postorder of the call graph from the entry
    order, seen = [], set()

    def visit(c):
        seen.add(c)
        for callee, _, _ in edges.get(c, ()):
            if callee not in seen and callee in comps:
                visit(callee)
        order.append(c)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(comps) + 100))
    visit(entry)
    runs, loop_trips = dict.fromkeys(comps, 0), dict.fromkeys(comps, 1)  # loop_trips: of the innermost loop
    runs[entry] = 1
    for c in reversed(order):
        for callee, mult, is_loop in edges[c]:
            if callee in runs:
                runs[callee] += runs[c] * mult
                loop_trips[callee] = mult if is_loop else loop_trips[c]
    out = {k: {"ops": 0, "bytes": 0, "wire_bytes": 0, "dcn_wire_bytes": 0, "by_dtype": {}} for k in COLLECTIVE_KINDS}
    for comp, instrs in comps.items():
        if not runs[comp]:
            continue
        in_rs = comp.startswith("all-reduce-scatter")
        for name, shape, op, ops, attrs in instrs:
            kind, dcn_share = _KINDS.get(op), None
            if op == "send" and (m := _MEGASCALE.search(attrs)):  # a DCN transfer between slices
                kind, dcn_share = _MEGASCALE_KINDS.get(m.group(1), "collective-permute"), 1.0
                shape = _ARRAY.search(shape).group(0)  # the data, not the (data, u32, token) tuple
            if kind is None:
                continue
            if op.endswith("-done"):  # the group is on the matching -start
                start = re.findall(r"%([\w.\-]+)", ops)
                attrs = by_name[start[0]][4] if start and start[0] in by_name else attrs
            kind = "reduce-scatter" if in_rs and kind == "all-reduce" else kind
            n = num_slices if dcn_share else _group_size(attrs, num_devices)
            size = shape_bytes(shape) * (n if op == "reduce-scatter" else 1)
            row = out[kind]
            # A continuation (TPU async collective fusion over loop steps start..end) moves its buffer once
            # per run of the loop it is spread over, in pieces, not once per trip.
            spread = _CONTINUATION.search(attrs)
            count = runs[comp] // loop_trips[comp] if spread and int(spread.group(1)) >= 0 else runs[comp]
            wire = int(count * size * _wire_factor(kind, n))
            row["ops"] += count
            row["bytes"] += count * size
            row["wire_bytes"] += wire
            share = dcn_share if dcn_share is not None else _dcn_share(kind, op, attrs, num_devices, slice_of)
            row["dcn_wire_bytes"] += int(wire * share)
            for dtype in sorted(set(_ARRAY_DTYPE.findall(shape))):
                row["by_dtype"][dtype] = row["by_dtype"].get(dtype, 0) + wire
    out["total_bytes"] = sum(out[k]["bytes"] for k in COLLECTIVE_KINDS)
    out["total_wire_bytes"] = sum(out[k]["wire_bytes"] for k in COLLECTIVE_KINDS)
    out["dcn_wire_bytes"] = sum(out[k]["dcn_wire_bytes"] for k in COLLECTIVE_KINDS)
    out["ici_wire_bytes"] = out["total_wire_bytes"] - out["dcn_wire_bytes"]
    out["unknown_trip_counts"] = unknown
    return out


def count_pallas_kernels(hlo: str) -> int:
    """Mosaic (Pallas TPU) kernel call sites in a compiled program."""
    return hlo.count('custom_call_target="tpu_custom_call"')
