"""Communication read from compiled HLO: which collectives, over which mesh axes.

``jax.jit(f).lower(...).compile()`` (or its ``as_text()``) in, a count of
collective instructions out, each attributed to the mesh axes its replica
groups span::

    collective_summary(compiled, mesh)  ->  {"all-reduce@model": 1}

Async ``-start`` / ``-done`` pairs count once; collectives over a single device
(trivial groups) are left out of the summary. Used by the sharding tests, the
main job and ``experiments/head_parallel.py``; re-exported by
:mod:`attention_jax.sharding`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import numpy as np
from jax.sharding import Mesh

COLLECTIVE_OPS = (
    "all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
    "collective-broadcast",
)
_OP_RE = re.compile(r"=\s*(?P<shape>.*?)\s(?P<op>" + "|".join(COLLECTIVE_OPS) + r")(?:-start)?\(")
_GROUPS_RE = re.compile(
    r"replica_groups=(?:(?P<list>\{(?:\{[\d,]*\},?)*\})"
    r"|\[(?P<shape>[\d,]+)\]<=\[(?P<iota>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?)"
)


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of an HLO module.

    Attributes:
      op: e.g. ``"all-reduce"`` (async ``-start``/``-done`` pairs count once).
      shape: the result shape as HLO prints it, e.g. ``"f32[4,4,32]{2,1,0}"``.
      groups: device groups (ids are positions in the mesh's flattened device
        array), None when the instruction has no ``replica_groups``.
    """

    op: str
    shape: str
    groups: tuple[tuple[int, ...], ...] | None

    @property
    def num_operands(self) -> int:
        """How many arrays it moves (XLA's combiner fuses psums into one tuple op)."""
        return self.shape.count("[") if self.shape.startswith("(") else 1

    @property
    def trivial(self) -> bool:
        """Every group is one device: no data moves (e.g. a psum over a size-1 axis)."""
        return self.groups is not None and all(len(g) <= 1 for g in self.groups)


def _hlo_text(compiled_or_text: Any) -> str:
    if isinstance(compiled_or_text, str):
        return compiled_or_text
    if hasattr(compiled_or_text, "compile"):  # jax.stages.Lowered
        compiled_or_text = compiled_or_text.compile()
    return compiled_or_text.as_text()


def _parse_groups(line: str) -> tuple[tuple[int, ...], ...] | None:
    """Replica groups of one HLO instruction, in any of XLA's three spellings.

    ``{{0,1},{2,3}}`` (explicit), ``[2,2]<=[4]`` / ``[2,2]<=[2,2]T(1,0)`` (iota),
    ``mesh['x'=2,'y'=2] {'y'}`` (mesh axes, sub-axes written ``'y':(pre)size``).
    """
    m = _MESH_GROUPS_RE.search(line)
    if m is not None:
        return _mesh_axes_groups(m)
    m = _GROUPS_RE.search(line)
    if m is None:
        return None
    if m["list"] is not None:
        return tuple(
            tuple(int(i) for i in g.split(",") if i)
            for g in re.findall(r"\{([\d,]*)\}", m["list"][1:-1])
        )
    shape = [int(i) for i in m["shape"].split(",")]
    iota = [int(i) for i in m["iota"].split(",")]
    ids = np.arange(int(np.prod(iota))).reshape(iota)
    if m["perm"]:
        ids = ids.transpose([int(i) for i in m["perm"].split(",")])
    return tuple(tuple(int(i) for i in row) for row in ids.reshape(shape))


_MESH_GROUPS_RE = re.compile(
    r"replica_groups=mesh\[(?P<axes>[^\]]*)\](?:,\s*device_ids=\((?P<ids>[^)]*)\))?"
    r"\s*\{(?P<grouped>[^}]*)\}"
)
_AXIS_RE = re.compile(r"'?(?P<name>[\w.]+)'?(?::\((?P<pre>\d+)\)(?P<size>\d+))?")


def _mesh_axes_groups(m: re.Match) -> tuple[tuple[int, ...], ...]:
    """Groups of a ``mesh[...] {axes}`` replica group list: devices differing only on ``axes``."""
    names, sizes = [], []
    for a in re.finditer(r"'?([\w.]+)'?=(\d+)", m["axes"]):
        names.append(a[1])
        sizes.append(int(a[2]))
    ids = np.arange(int(np.prod(sizes)))
    if m["ids"]:
        ids = np.array([int(i) for i in re.findall(r"\d+", m["ids"])])
    # Split each mesh dim n that a sub-axis (pre p, size s) refers to into (n/(p*s), s, p).
    dims: list[int] = []
    grouped: list[int] = []
    refs = {}
    for a in _AXIS_RE.finditer(m["grouped"]):
        refs[a["name"]] = (int(a["pre"]), int(a["size"])) if a["size"] else None
    for name, n in zip(names, sizes, strict=True):
        if name in refs and refs[name] is not None:
            p, s = refs[name]
            grouped.append(len(dims) + 1)
            dims += [n // (p * s), s, p]
        else:
            if name in refs:
                grouped.append(len(dims))
            dims.append(n)
    ids = np.moveaxis(ids.reshape(dims), grouped, range(-len(grouped), 0))
    size = int(np.prod([dims[g] for g in grouped]))
    return tuple(tuple(int(i) for i in row) for row in ids.reshape(-1, size))


def collectives(compiled_or_text: Any) -> list[Collective]:
    """Every collective in a compiled function's HLO (``Compiled``, ``Lowered`` or text)."""
    found = []
    for line in _hlo_text(compiled_or_text).splitlines():
        m = _OP_RE.search(line)
        if m is not None:
            found.append(Collective(m["op"], m["shape"].strip(), _parse_groups(line)))
    return found


def collective_counts(compiled_or_text: Any, *, include_trivial: bool = False) -> dict[str, int]:
    """``{op: count}`` for every op of :data:`COLLECTIVE_OPS` (zeros included).

    Trivial collectives (every replica group a single device, which XLA keeps
    for a psum over a size-1 mesh axis) move no data and are left out unless
    ``include_trivial``.

    >>> collective_counts("%a = f32[4]{0} all-reduce(%x), replica_groups={{0,1}}")["all-reduce"]
    1
    """
    counts = dict.fromkeys(COLLECTIVE_OPS, 0)
    for c in collectives(compiled_or_text):
        if include_trivial or not c.trivial:
            counts[c.op] += 1
    return counts


def group_axes(
    groups: tuple[tuple[int, ...], ...] | None, mesh: Mesh
) -> tuple[str, ...] | None:
    """Mesh axes a collective communicates over, read from its replica groups.

    ``{}`` (one group of everything) is every axis of size > 1; None (no
    replica groups, e.g. a collective-permute) gives None.

    >>> import jax
    >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    >>> group_axes(((0,),), mesh)
    ()
    """
    shape = mesh.devices.shape
    if groups is None:
        return None
    if not groups:
        return tuple(a for a, s in zip(mesh.axis_names, shape, strict=True) if s > 1)
    axes = set()
    for group in groups:
        coords = np.array(np.unravel_index(np.array(group), shape))  # [ndim, len(group)]
        axes |= {a for a, c in zip(mesh.axis_names, coords, strict=True) if len(set(c)) > 1}
    return tuple(a for a in mesh.axis_names if a in axes)


def axis_groups(mesh: Mesh, axis: str) -> tuple[tuple[int, ...], ...]:
    """Replica groups of a collective over one mesh axis (positions in ``mesh.devices.flat``).

    >>> import jax
    >>> axis_groups(Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model")), "model")
    ((0,),)
    """
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    ids = np.moveaxis(ids, mesh.axis_names.index(axis), -1)
    return tuple(tuple(int(i) for i in row) for row in ids.reshape(-1, ids.shape[-1]))


def collective_summary(compiled_or_text: Any, mesh: Mesh) -> dict[str, int]:
    """``{"op@axes": count}`` of the non-trivial collectives, e.g. ``{"all-reduce@model": 1}``.

    ``axes`` are the mesh axes the op's groups span (``data,model`` for all devices).
    """
    summary: dict[str, int] = {}
    for c in collectives(compiled_or_text):
        if c.trivial:
            continue
        axes = group_axes(c.groups, mesh)
        key = f"{c.op}@{'?' if axes is None else ','.join(axes)}"
        summary[key] = summary.get(key, 0) + 1
    return summary


