"""Splitting the example axis over the devices of a ``jax.sharding.Mesh``.

Simulation and scoring both work row by row: a training example's response
depends on no other example, and a sketch row's score on no other row. So the
row axis is split over one named axis of a mesh with ``jax.shard_map``: each
device works on its share of rows while parameters, curvature data, bases and
queries are replicated. Row counts are padded to a multiple of the devices
along that axis; callers drop or mask the padding.
"""

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxattr._sketch import FactoredSketch


@dataclasses.dataclass(frozen=True)
class Rows:
    """A mesh and the name of its axis that splits rows (hashable, for jit).

    Attributes:
      mesh: the ``jax.sharding.Mesh``.
      axis: the mesh axis the rows are split over; other mesh axes replicate.
    """

    mesh: Mesh
    axis: str

    @property
    def size(self) -> int:
        """Devices along ``axis``: the number of row shards."""
        return int(self.mesh.shape[self.axis])

    def padded(self, num_rows: int) -> int:
        """``num_rows`` rounded up to a multiple of :attr:`size`."""
        return -(-num_rows // self.size) * self.size

    def map(self, fn: Callable, in_specs: Any, out_specs: Any) -> Callable:
        """``fn`` run once per device on its shards, by ``jax.shard_map``.

        Each device differentiates its own copy of the replicated inputs:
        with ``check_vma=True``, the gradient of a per-example loss with
        respect to replicated parameters would be summed over devices.
        """
        return jax.shard_map(
            fn,
            mesh=self.mesh,
            in_specs=in_specs,
            out_specs=out_specs,
            check_vma=False,
        )


def layout(mesh: Mesh | None, axis: str | None) -> Rows | None:
    """Checks a ``mesh`` / ``mesh_axis`` pair; ``None`` when there is no mesh.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
      ValueError: ``axis`` is not an axis of ``mesh``, or is needed (several
        mesh axes) and missing, or is given without a mesh.
    """
    if mesh is None:
        if axis is not None:
            raise ValueError(
                f"mesh_axis={axis!r} was given without a mesh; pass "
                "mesh=jax.sharding.Mesh(...) too, or drop mesh_axis."
            )
        return None
    if not isinstance(mesh, Mesh):
        raise TypeError(
            f"mesh must be a jax.sharding.Mesh (e.g. jax.make_mesh((4,), "
            f"('rows',))), got {type(mesh).__name__}."
        )
    names = tuple(mesh.axis_names)
    if axis is None:
        if len(names) != 1:
            raise ValueError(
                f"The mesh has axes {names}; name the one that splits training "
                "examples with mesh_axis=."
            )
        axis = names[0]
    if axis not in names:
        raise ValueError(
            f"mesh_axis={axis!r} is not an axis of the mesh, whose axes are "
            f"{names}. Pass one of them."
        )
    # Results are sliced and concatenated eagerly, which arrays typed as split
    # over an Explicit axis refuse; the same devices with Auto axes accept it.
    auto = (AxisType.Auto,) * len(names)
    return Rows(Mesh(mesh.devices, names, axis_types=auto), axis)


def rows_map(fn: Callable, rows: Rows | None) -> Callable:
    """``fn(rows, *rest)`` with ``rows`` split over devices, ``rest`` replicated.

    The output's leaves are split along their leading axis too. Without a
    mesh, ``fn`` itself. Call inside ``jax.jit``; the leading size of
    ``rows`` must be a multiple of ``rows.size``.
    """
    if rows is None:
        return fn

    def split(first, *rest):
        specs = (PartitionSpec(rows.axis),) + (PartitionSpec(),) * len(rest)
        return rows.map(fn, specs, PartitionSpec(rows.axis))(first, *rest)

    return split


def sketch_specs(sketch: Any, axis: str) -> Any:
    """Partition specs of a sketch: rows and ids split, a stored basis whole."""
    split = jax.tree.map(lambda _: PartitionSpec(axis), sketch)
    if isinstance(sketch, FactoredSketch):
        whole = jax.tree.map(lambda _: PartitionSpec(), sketch.stored)
        split = dataclasses.replace(split, stored=whole)
    return split


def place_sketch(sketch: Any, rows: Rows) -> Any:
    """``sketch`` with its arrays placed as :func:`sketch_specs` says."""
    specs = sketch_specs(sketch, rows.axis)
    to_sharding = lambda spec: NamedSharding(rows.mesh, spec)
    is_spec = lambda x: isinstance(x, PartitionSpec)
    return jax.device_put(sketch, jax.tree.map(to_sharding, specs, is_leaf=is_spec))


def shard_sketch(sketch: Any, mesh: Mesh, mesh_axis: str | None = None) -> Any:
    """Places a sketch's rows split over the devices of ``mesh``.

    Each device then holds ``num_train / devices`` rows (and their ids); the
    stored basis of a :class:`jaxattr.FactoredSketch` is copied to every
    device. Scores do not change: a scorer built with the same ``mesh`` reads
    each device's rows there. Use it to spread a large sketch over devices
    before scoring; :func:`jaxattr.scorer` with ``mesh=`` places (and pads) an
    unplaced sketch itself.

    Args:
      sketch: a :class:`jaxattr.DenseSketch`, :class:`jaxattr.LayerLowRankSketch`
        or :class:`jaxattr.FactoredSketch`.
      mesh: a ``jax.sharding.Mesh``.
      mesh_axis: the mesh axis that splits rows; may be omitted when the mesh
        has one axis.

    Returns:
      The same sketch, its arrays placed with ``NamedSharding``.

    Raises:
      ValueError: the sketch's rows are not a multiple of the devices along
        ``mesh_axis`` (arrays split evenly only), or a bad ``mesh_axis``.
    """
    rows = layout(mesh, mesh_axis)
    if rows is None:
        raise TypeError("shard_sketch needs a jax.sharding.Mesh, got None.")
    n = int(np.shape(sketch.ids)[0])
    if n % rows.size:
        raise ValueError(
            f"The sketch has {n} rows, not a multiple of the {rows.size} devices "
            f"along mesh axis {rows.axis!r}, so its rows cannot be split evenly. "
            "Pass the sketch to jaxattr.scorer(..., mesh=mesh), which pads it."
        )
    return place_sketch(sketch, rows)


def place_if_even(sketch: Any, rows: Rows | None) -> Any:
    """The sketch split over ``rows`` if its rows divide evenly, else as is."""
    if rows is None or int(np.shape(sketch.ids)[0]) % rows.size:
        return sketch
    return place_sketch(sketch, rows)
