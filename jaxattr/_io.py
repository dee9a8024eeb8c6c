"""Saving and loading sketches and states, and resumable post-hoc simulation.

On-disk format (format version 1)
---------------------------------

Every save is a directory holding one ``meta.json`` and one ``.npy`` file per
array. A save is written into a hidden temporary directory beside its target
(``.<name>.<random>.tmp``) and renamed into place only when complete, so an
interrupted save never leaves a directory that loads.

``meta.json`` of a sketch (:func:`save_sketch`)::

    format            "jaxattr.sketch"
    format_version    1; a reader refuses versions newer than its own
    library_version   jaxattr version that wrote the files
    kind              "DenseSketch", "LayerLowRankSketch" or "FactoredSketch"
    info              the SketchInfo: param_spec [[path, shape, dtype], ...],
                      measurement, method, settings [[name, value], ...], version
    random            {"key_data": [...], "dim": k} for a random basis, else null
    num_rows          rows of the sketch (training examples or groups)
    ids_sha256        checksum of ids.npy, to compare sketches' example ids
    param_tree        nesting of the parameter tree when it is made of dicts,
                      lists and tuples only, else null (then loading needs params)
    tree              the array fields as nested nodes: {"dict": [[key, node],
                      ...]}, {"list": [...]}, {"tuple": [...]}, {"none": null},
                      {"leaf": name} or {"params": [name, ...]} (leaves of a
                      subtree shaped like the parameters, in jax leaf order)
    arrays            {name: {"dtype", "shape", "sha256"}} for file <name>.npy

Array names follow the field they belong to: ``ids``, ``responses.0``,
``factors.2.1``, ``coefficients``, ``stored.3``. Dtypes numpy cannot name in a
``.npy`` header (``bfloat16`` and other ``ml_dtypes``) are written as unsigned
integers of the same width and viewed back on load; ``dtype`` in ``arrays``
is always the logical one. Checksums are SHA-256 of the whole ``.npy`` file.

Loading checks, in order: the format name and version, the parameters given
against ``param_spec`` (the message of :meth:`DenseSketch.check_params`), each
file's checksum (a mismatch names the file), each array's dtype and shape, and
that every leaf matches ``param_spec`` with a leading ``num_rows`` (or basis
``dim``) axis. With ``mmap_mode="r"`` arrays stay memory-mapped numpy arrays.

A state (:func:`save_state`) has ``format`` ``"jaxattr.state"``, ``leaves``
(one ``{"path", "dtype", "key_impl"}`` per leaf in jax order; ``key_impl`` names
the PRNG implementation of a key leaf, stored as its key data) and ``arrays``
named ``leaf.<i>``.

A simulation checkpoint (``simulate(..., checkpoint_dir=...)``) is a directory
with ``run.json`` (``format`` ``"jaxattr.simulate-checkpoint"``; a
``fingerprint`` of the run's configuration, one SHA-256 per component; the
``cursor`` ``{"pass", "start"}`` of the next chunk; the directory names of the
builder's accumulators ``acc`` and of its ``parts``), written atomically after
each saved chunk, and one subdirectory per saved part (``part-<pass>-<start>``,
written once) and for the latest accumulators (``acc-<serial>``). Each holds a
``meta.json`` with ``tree`` and ``arrays`` as above.
"""

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxattr import _builders, _tree
from jaxattr._builders import BuildState
from jaxattr._sketch import (
    DenseSketch,
    FactoredSketch,
    LayerLowRankSketch,
    RandomBasis,
    SketchInfo,
)
from jaxattr._types import Params
from jaxattr._version import __version__

FORMAT_VERSION = 1
SKETCH_FORMAT = "jaxattr.sketch"
STATE_FORMAT = "jaxattr.state"
CHECKPOINT_FORMAT = "jaxattr.simulate-checkpoint"
TREE_FORMAT = "jaxattr.tree"
_KINDS = {c.__name__: c for c in (DenseSketch, LayerLowRankSketch, FactoredSketch)}
PathLike = str | os.PathLike


# Files: atomic directories, checksummed arrays, versioned JSON ---------------


@contextlib.contextmanager
def _atomic_dir(path: PathLike, overwrite: bool) -> Iterator[pathlib.Path]:
    """Yields a temporary directory that is renamed to ``path`` on success."""
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} already exists. Pass overwrite=True to replace it, or choose "
            "another path."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(".tmp", f".{path.name}.", path.parent))
    try:
        yield tmp
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(new: pathlib.Path, path: pathlib.Path) -> None:
    """Renames ``new`` to ``path``, replacing an earlier jaxattr save there."""
    if not path.exists():
        os.replace(new, path)
        return
    if not (path / "meta.json").is_file():
        raise FileExistsError(
            f"{path} exists and is not a jaxattr save (it has no meta.json); "
            "refusing to replace it. Remove it yourself or choose another path."
        )
    old = pathlib.Path(tempfile.mkdtemp(".old", f".{path.name}.", path.parent))
    os.replace(path, old / "replaced")
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: pathlib.Path, obj: dict) -> None:
    """Writes JSON through a temporary file and an atomic rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: pathlib.Path, expected_format: str) -> dict:
    """Reads a ``meta.json``/``run.json`` and checks its format and version."""
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path} not found: {path.parent} is not a complete jaxattr save "
            f"({expected_format}). Check the path, or save again."
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is corrupted, not valid JSON ({err}).") from None
    _check_format(meta, path, expected_format)
    return meta


def _check_format(meta: Any, path: pathlib.Path, expected: str) -> None:
    got = meta.get("format") if isinstance(meta, dict) else None
    if got != expected:
        raise ValueError(
            f"{path} holds format {got!r}, but {expected!r} was expected. Load it "
            "with the function that matches what was saved."
        )
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path} was written in {expected} format version {version!r} by "
            f"jaxattr {meta.get('library_version')}; this jaxattr ({__version__}) "
            f"reads versions up to {FORMAT_VERSION}. Upgrade jaxattr to load it."
        )


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_arrays(directory: pathlib.Path, arrays: list) -> dict:
    """Writes ``(name, array)`` pairs as ``<name>.npy``; returns their entries."""
    entries = {}
    for name, value in arrays:
        arr = np.asarray(value)
        stored = arr.view(f"u{arr.dtype.itemsize}") if arr.dtype.kind == "V" else arr
        file = directory / f"{name}.npy"
        with open(file, "wb") as f:
            np.save(f, stored, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        entries[name] = dict(
            dtype=arr.dtype.name, shape=list(arr.shape), sha256=_sha256(file)
        )
    return entries


def _read_arrays(
    directory: pathlib.Path, entries: dict, mmap_mode: str | None, verify: bool
) -> dict:
    """Reads and checks the arrays listed in ``entries``; returns name -> array."""
    return {
        name: _read_array(directory / f"{name}.npy", entry, mmap_mode, verify)
        for name, entry in entries.items()
    }


def _read_array(file: pathlib.Path, entry: dict, mmap_mode, verify: bool) -> Any:
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} is missing; the save in {file.parent} is incomplete. Save again."
        )
    if verify and _sha256(file) != entry["sha256"]:
        raise ValueError(
            f"{file} is corrupted: its SHA-256 checksum differs from the one recorded "
            "in meta.json when it was written. Restore the file or save again."
        )
    dtype = jnp.dtype(entry["dtype"])
    arr = np.load(file, mmap_mode=mmap_mode, allow_pickle=False)
    arr = arr.view(dtype) if dtype.kind == "V" else arr
    if arr.dtype != dtype or list(arr.shape) != entry["shape"]:
        raise ValueError(
            f"{file} holds a {arr.dtype} array of shape {arr.shape} but meta.json "
            f"records {dtype} {tuple(entry['shape'])}; the save is inconsistent."
        )
    return arr if mmap_mode is not None else _to_device(arr, file)


def _to_device(arr: np.ndarray, file: pathlib.Path) -> jax.Array:
    if arr.dtype.itemsize == 8 and not jax.config.jax_enable_x64:
        raise ValueError(
            f"{file} holds {arr.dtype} values but 64-bit jax types are off, so "
            "loading would round them. Set jax.config.update('jax_enable_x64', "
            "True) first, or load with mmap_mode='r' to keep numpy arrays."
        )
    return jnp.asarray(arr)


# Trees of arrays as JSON nodes ------------------------------------------------


class _Unencodable(TypeError):
    """A tree node that the JSON encoding cannot describe."""


def _encode(tree: Any, name: str, out: list, params_def: Any) -> dict:
    """JSON node describing ``tree``; appends its ``(name, leaf)`` pairs to out."""
    if params_def is not None and _is_params_shaped(tree, params_def):
        names = [_join(name, i) for i in range(params_def.num_leaves)]
        out.extend(zip(names, jax.tree.leaves(tree), strict=True))
        return {"params": names}
    if tree is None:
        return {"none": None}
    if type(tree) is dict:
        items = enumerate(sorted(tree.items()))
        return {
            "dict": [
                [k, _encode(v, _join(name, _file_key(k, i)), out, params_def)]
                for i, (k, v) in items
            ]
        }
    if type(tree) in (list, tuple):
        nodes = [
            _encode(v, _join(name, i), out, params_def) for i, v in enumerate(tree)
        ]
        return {type(tree).__name__: nodes}
    if not jax.tree_util.treedef_is_leaf(jax.tree.structure(tree)):
        raise _Unencodable(f"cannot describe a {type(tree).__name__} node")
    out.append((name, tree))
    return {"leaf": name}


def _is_params_shaped(tree: Any, params_def: Any) -> bool:
    return params_def.num_nodes > 1 and jax.tree.structure(tree) == params_def


def _file_key(key: Any, position: int) -> str:
    """A dict key as part of a file name: itself if plain, else ``@position``."""
    return str(key) if re.fullmatch(r"[A-Za-z0-9_]+", str(key)) else f"@{position}"


def _join(name: str, key: Any) -> str:
    return str(key) if not name else f"{name}.{key}"


def _decode(node: dict, arrays: dict, params_def: Any) -> Any:
    """The tree that :func:`_encode` described, with leaves from ``arrays``."""
    ((kind, value),) = node.items()
    if kind == "params":
        if params_def is None:
            raise _Unencodable("a parameter-shaped subtree needs the parameter tree")
        return jax.tree.unflatten(params_def, [arrays[n] for n in value])
    if kind == "dict":
        return {k: _decode(v, arrays, params_def) for k, v in value}
    if kind in ("list", "tuple"):
        items = [_decode(v, arrays, params_def) for v in value]
        return items if kind == "list" else tuple(items)
    return None if kind == "none" else arrays[value]


def _structure(params_def: Any) -> dict | None:
    """JSON nesting of a parameter treedef, or None if it has custom nodes."""
    try:
        return _encode(
            jax.tree.unflatten(params_def, [0] * params_def.num_leaves), "", [], None
        )
    except _Unencodable:
        return None


def _save_tree(path: pathlib.Path, tree: Any, params_def: Any) -> None:
    """Saves a tree of arrays (dicts, lists, tuples, parameter-shaped subtrees)."""
    with _atomic_dir(path, overwrite=True) as tmp:
        arrays = []
        node = _encode(tree, "tree", arrays, params_def)
        entries = _write_arrays(tmp, arrays)
        meta = _header(TREE_FORMAT, tree=node, arrays=entries)
        _write_json(tmp / "meta.json", meta)


def _load_tree(path: pathlib.Path, params_def: Any) -> Any:
    meta = _read_json(path / "meta.json", TREE_FORMAT)
    arrays = _read_arrays(path, meta["arrays"], None, verify=True)
    return _decode(meta["tree"], arrays, params_def)


def _header(fmt: str, **fields) -> dict:
    return dict(
        format=fmt, format_version=FORMAT_VERSION, library_version=__version__, **fields
    )


# Sketches ---------------------------------------------------------------------


def save_sketch(path: PathLike, sketch: Any, *, overwrite: bool = False) -> None:
    """Saves a sketch as a directory of ``.npy`` files and a ``meta.json``.

    The format is described in the docstring of ``jaxattr._io``; the write is
    atomic (a temporary directory renamed into place).

    Args:
      path: directory to create.
      sketch: a :class:`DenseSketch` (plain, grouped or in a smaller float
        dtype), :class:`LayerLowRankSketch` or :class:`FactoredSketch`.
      overwrite: replace an earlier jaxattr save at ``path``.

    Raises:
      TypeError: ``sketch`` is not a jaxattr sketch.
      FileExistsError: ``path`` exists and ``overwrite`` is false, or it is not
        a jaxattr save.

    Example:
      >>> import tempfile
      >>> task = jaxattr.classification(lambda w, x: x @ w)
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> params = jnp.zeros((3, 2))
      >>> sketch = jaxattr.simulate(task, params, (x, jnp.arange(8) % 2),
      ...                           key=jax.random.key(1), horizon=5)
      >>> with tempfile.TemporaryDirectory() as tmp:
      ...     jaxattr.save_sketch(tmp + "/sketch", sketch)
      ...     jaxattr.load_sketch(tmp + "/sketch", params).num_train
      8
    """
    if type(sketch) not in _KINDS.values():
        raise TypeError(
            "save_sketch needs a jaxattr.DenseSketch, LayerLowRankSketch or "
            f"FactoredSketch, got {type(sketch).__name__}."
        )
    fields = _array_fields(sketch)
    like = fields.get("responses", fields.get("stored"))
    params_def = None if like is None else jax.tree.structure(like)
    with _atomic_dir(path, overwrite) as tmp:
        arrays = []
        tree = _encode(fields, "", arrays, params_def)
        entries = _write_arrays(tmp, arrays)
        meta = _sketch_meta(sketch, params_def, tree, entries)
        _write_json(tmp / "meta.json", meta)


def _array_fields(sketch: Any) -> dict:
    return {
        f.name: getattr(sketch, f.name)
        for f in dataclasses.fields(sketch)
        if not f.metadata.get("static")
    }


def _sketch_meta(sketch: Any, params_def: Any, tree: dict, entries: dict) -> dict:
    random = getattr(sketch, "random", None)
    return _header(
        SKETCH_FORMAT,
        kind=type(sketch).__name__,
        info=_info_to_json(sketch.info),
        random=random and dict(key_data=list(random.key_data), dim=random.dim),
        num_rows=sketch.num_train,
        ids_sha256=entries["ids"]["sha256"],
        param_tree=None if params_def is None else _structure(params_def),
        tree=tree,
        arrays=entries,
    )


def load_sketch(
    path: PathLike,
    params: Params | None = None,
    *,
    mmap_mode: str | None = None,
    verify: bool = True,
) -> Any:
    """Loads a sketch saved by :func:`save_sketch`, checking its integrity.

    Args:
      path: the directory :func:`save_sketch` wrote.
      params: the parameters the sketch will be scored with. When given they
        are checked against the sketch's parameter spec, and their tree
        structure is used for the responses (needed when the parameter tree
        has custom nodes, e.g. a Flax ``FrozenDict`` or a dataclass).
      mmap_mode: ``None`` loads arrays into jax arrays; ``"r"`` keeps read-only
        memory-mapped numpy arrays (for sketches larger than memory).
      verify: check each file's SHA-256 (reads every byte once).

    Returns:
      The sketch, bitwise equal to the one saved.

    Raises:
      ValueError: wrong parameters, a corrupted or inconsistent file (named),
        or a format version newer than this jaxattr reads.
      FileNotFoundError: ``path`` is not a complete save.
    """
    directory = pathlib.Path(path)
    meta = _read_json(directory / "meta.json", SKETCH_FORMAT)
    cls = _sketch_class(meta, directory)
    info = _info_from_json(meta["info"])
    if params is not None:
        DenseSketch(None, None, info).check_params(params)
    arrays = _read_arrays(directory, meta["arrays"], mmap_mode, verify)
    fields = _sketch_fields(meta, arrays, params, directory)
    sketch = cls(**fields, info=info)
    _check_leaves(sketch, directory)
    return sketch


def _sketch_fields(meta: dict, arrays: dict, params: Any, directory: Any) -> dict:
    """The array fields (and random basis) of a sketch, in the right tree shapes."""
    try:
        fields = _decode(meta["tree"], arrays, _params_def(meta, params))
    except _Unencodable:
        raise ValueError(
            f"The sketch in {directory} was made for a parameter tree with custom "
            "nodes, which meta.json cannot rebuild. Pass params= (the model's "
            "parameters) to load_sketch."
        ) from None
    if meta["random"] is not None:
        random = meta["random"]
        fields["random"] = RandomBasis(tuple(random["key_data"]), random["dim"])
    return fields


def _sketch_class(meta: dict, directory: pathlib.Path) -> type:
    if meta.get("kind") not in _KINDS:
        raise ValueError(
            f"{directory} holds a sketch of kind {meta.get('kind')!r}; this jaxattr "
            f"knows {sorted(_KINDS)}. Upgrade jaxattr to load it."
        )
    return _KINDS[meta["kind"]]


def _params_def(meta: dict, params: Params | None) -> Any:
    """The treedef of parameter-shaped fields: from ``params`` or from meta.json."""
    if params is not None:
        return jax.tree.structure(params)
    if meta["param_tree"] is None:
        return None
    zeros = collections.defaultdict(int)
    return jax.tree.structure(_decode(meta["param_tree"], zeros, None))


def _info_to_json(info: SketchInfo) -> dict:
    return dict(
        param_spec=[[p, list(s), d] for p, s, d in info.param_spec],
        measurement=info.measurement,
        method=info.method,
        settings=[[k, _plain(k, v)] for k, v in info.settings],
        version=info.version,
    )


def _plain(name: str, value: Any) -> Any:
    """A setting value as JSON (numpy scalars to Python, tuples to lists)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (tuple, list)):
        return [_plain(name, v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(
        f"Sketch setting {name}={value!r} cannot be written to JSON; settings must "
        "be numbers, strings, booleans, None or tuples of them."
    )


def _info_from_json(d: dict) -> SketchInfo:
    tuples = lambda v: tuple(tuples(x) for x in v) if isinstance(v, list) else v
    return SketchInfo(
        tuple((p, tuple(s), dtype) for p, s, dtype in d["param_spec"]),
        d["measurement"],
        d["method"],
        tuple((k, tuples(v)) for k, v in d["settings"]),
        d["version"],
    )


def _check_leaves(sketch: Any, directory: pathlib.Path) -> None:
    """Raises ValueError unless every array fits the parameter spec and row count."""
    n, spec = sketch.num_train, sketch.info.param_spec
    expected = [("ids", np.shape(sketch.ids), (n,))]
    if isinstance(sketch, DenseSketch):
        expected += _leaf_shapes(sketch.responses, spec, n)
    elif isinstance(sketch, LayerLowRankSketch):
        expected += _factor_shapes(sketch.factors, spec, n)
    else:
        dim = sketch.random.dim if sketch.stored is None else sketch.dim
        expected.append(("coefficients", np.shape(sketch.coefficients), (n, dim)))
        if sketch.stored is not None:
            expected += _leaf_shapes(sketch.stored, spec, dim)
    for what, got, want in expected:
        if tuple(got) != tuple(want):
            raise ValueError(
                f"The sketch in {directory} is inconsistent: {what} has shape "
                f"{tuple(got)} where its parameter spec and {n} rows need "
                f"{tuple(want)}. The files were altered; save the sketch again."
            )


def _leaf_shapes(tree: Any, spec: tuple, rows: int) -> list:
    leaves = jax.tree.leaves(tree)
    if len(leaves) != len(spec):
        return [("the number of leaves", (len(leaves),), (len(spec),))]
    return [
        (p, np.shape(a), (rows, *s)) for (p, s, _), a in zip(spec, leaves, strict=True)
    ]


def _factor_shapes(factors: list, spec: tuple, rows: int) -> list:
    if len(factors) != len(spec):
        return [("the number of factors", (len(factors),), (len(spec),))]
    out = []
    for (p, s, _), f in zip(spec, factors, strict=True):
        if not isinstance(f, tuple):
            out.append((p, np.shape(f), (rows, *s)))
            continue
        rank = np.shape(f[0])[-1]
        out.append((f"{p} (U)", np.shape(f[0]), (rows, s[0], rank)))
        out.append((f"{p} (V)", np.shape(f[1]), (rows, s[-1], rank)))
    return out


# States -------------------------------------------------------------------------


def save_state(path: PathLike, state: Any, *, overwrite: bool = False) -> None:
    """Saves a pytree of arrays, e.g. an :class:`InTrainingState`.

    Any pytree works: save ``(params, opt_state, sim_state)`` together to
    resume a training loop with in-training simulation. PRNG key leaves are
    stored as their key data. The write is atomic.

    Args:
      path: directory to create.
      state: the pytree.
      overwrite: replace an earlier jaxattr save at ``path``.

    Raises:
      FileExistsError: ``path`` exists and ``overwrite`` is false, or it is not
        a jaxattr save.
    """
    flat = jax.tree_util.tree_leaves_with_path(state)
    leaves = [_leaf_meta(p, x) for p, x in flat]
    arrays = [(f"leaf.{i}", _key_data(x)) for i, (_, x) in enumerate(flat)]
    with _atomic_dir(path, overwrite) as tmp:
        entries = _write_arrays(tmp, arrays)
        meta = _header(STATE_FORMAT, leaves=leaves, arrays=entries)
        _write_json(tmp / "meta.json", meta)


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _key_data(x: Any) -> Any:
    """The array to write for a leaf: key data for keys, jax dtypes for scalars."""
    if _is_key(x):
        return jax.random.key_data(x)
    return x if hasattr(x, "dtype") else jnp.asarray(x)


def _leaf_meta(path: Any, x: Any) -> dict:
    impl = str(jax.random.key_impl(x)) if _is_key(x) else None
    return dict(path=jax.tree_util.keystr(path), dtype=_dtype_name(x), key_impl=impl)


def _dtype_name(x: Any) -> str:
    return str(x.dtype if hasattr(x, "dtype") else jnp.asarray(x).dtype)


def load_state(
    path: PathLike, like: Any, *, mmap_mode: str | None = None, verify: bool = True
) -> Any:
    """Loads a pytree saved by :func:`save_state` into the structure of ``like``.

    Args:
      path: the directory :func:`save_state` wrote.
      like: a pytree with the saved structure, shapes and dtypes, e.g. a fresh
        ``sim.init(params, opt_state, num_train)`` or its ``jax.eval_shape``.
      mmap_mode: ``None`` for jax arrays, ``"r"`` for memory-mapped numpy arrays.
      verify: check each file's SHA-256.

    Returns:
      The saved pytree, with the tree structure of ``like``; bitwise equal to
      what was saved.

    Raises:
      ValueError: ``like`` differs from the saved tree (the message names the
        first differing leaf), a file is corrupted, or the format is too new.
    """
    directory = pathlib.Path(path)
    meta = _read_json(directory / "meta.json", STATE_FORMAT)
    flat, treedef = jax.tree_util.tree_flatten_with_path(like)
    _check_like(meta, flat, directory)
    arrays = _read_arrays(directory, meta["arrays"], mmap_mode, verify)
    leaves = [
        _wrap_key(arrays[f"leaf.{i}"], leaf["key_impl"])
        for i, leaf in enumerate(meta["leaves"])
    ]
    return jax.tree.unflatten(treedef, leaves)


def _key_data_ndim(impl: str) -> int:
    return np.ndim(jax.random.key_data(jax.random.key(0, impl=impl)))


def _wrap_key(arr: Any, impl: str | None) -> Any:
    return arr if impl is None else jax.random.wrap_key_data(arr, impl=impl)


def _check_like(meta: dict, flat: list, directory: pathlib.Path) -> None:
    """Raises ValueError naming the first leaf where ``like`` differs from disk."""
    saved = meta["leaves"]
    if len(saved) != len(flat):
        raise ValueError(
            f"The state in {directory} has {len(saved)} leaves but `like` has "
            f"{len(flat)}. Build `like` the way the saved state was built."
        )
    for i, (leaf, (path, x)) in enumerate(zip(saved, flat, strict=True)):
        shape = tuple(meta["arrays"][f"leaf.{i}"]["shape"])
        if leaf["key_impl"] is not None:
            shape = shape[: len(shape) - _key_data_ndim(leaf["key_impl"])]
        got = (jax.tree_util.keystr(path), tuple(np.shape(x)), _dtype_name(x))
        if (leaf["path"], shape, leaf["dtype"]) != got:
            raise ValueError(
                f"The state in {directory} does not match `like`: saved leaf "
                f"{leaf['path']} {leaf['dtype']}{list(shape)}, `like` has {got[0]} "
                f"{got[2]}{list(got[1])}. Build `like` with the same settings "
                "(e.g. num_train, horizon, batch_size) as the saved state."
            )


# Resumable simulation -----------------------------------------------------------


def run(
    builder: Any,
    chunks_fn: Callable,
    params: Params,
    num_rows: int,
    ids: np.ndarray,
    info: SketchInfo,
    directory: PathLike | None = None,
    config: dict | None = None,
    every: int = 1,
) -> Any:
    """:func:`jaxattr._builders.run`, checkpointing into ``directory`` if given.

    ``chunks_fn(pass_index, first)`` must yield the ``(start, responses)``
    chunks of a pass from row ``first`` on, at the same starts as from row 0.
    Progress is saved after every ``every`` chunks and at the end of each
    pass; a later call with the same configuration continues after the last
    saved chunk, and returns a sketch bitwise equal to an uninterrupted run.

    Args:
      builder, chunks_fn, params, num_rows, ids, info: as for ``_builders.run``.
      directory: the checkpoint directory (created if missing); ``None``
        writes nothing and is exactly ``_builders.run``.
      config: further values the result depends on (data, key, curvature...),
        fingerprinted with the builder, parameters, ids and sketch metadata.
      every: chunks between saves.

    Returns:
      The finished sketch.

    Raises:
      ValueError: ``directory`` holds a checkpoint of another configuration
        (the message lists what differs) or is not a checkpoint.
    """
    if directory is None:
        return _builders.run(builder, chunks_fn, params, num_rows, ids, info)
    components = dict(
        config or {},
        sketch=builder,
        settings=info.settings,
        measurement=info.measurement,
        params=params,
        ids=ids,
        num_train=num_rows,
        jaxattr_version=__version__,
    )
    store = _Checkpoint(directory, fingerprint(components), params, every)
    ctx = builder.context(params, num_rows)
    state = _resume(builder, ctx, chunks_fn, store)
    return builder.finish(ctx, state, ids, info)


def _resume(builder: Any, ctx: Any, chunks_fn: Callable, store: Any) -> BuildState:
    """Runs the passes from the saved cursor on, saving as it goes."""
    state, (first_pass, first_row) = store.restore(builder.start(ctx))
    for p in range(first_pass, builder.passes):
        row = first_row if p == first_pass else 0
        for k, (start, responses) in enumerate(chunks_fn(p, row), 1):
            state = builder.add(ctx, state, p, responses, start)
            if k % store.every == 0:
                store.save(state, p, start + _tree.leading_size(responses))
        state = builder.end_pass(ctx, state, p)
        store.save(state, p + 1, 0)
    return state


def fingerprint(components: dict) -> dict:
    """One SHA-256 per named component of a run's configuration."""
    return {name: _digest(value) for name, value in sorted(components.items())}


def _digest(value: Any) -> str:
    h = hashlib.sha256()
    _feed(h, value)
    return h.hexdigest()


def _feed(h: Any, x: Any) -> None:
    """Hashes ``x`` by content, deterministically across processes.

    Arrays by dtype, shape and bytes; keys by their data; dataclasses, dicts,
    lists, tuples and partials by their parts; functions by qualified name
    (their code is not seen); other pytrees by structure and leaves.
    """
    if _is_key(x):
        h.update(f"key:{jax.random.key_impl(x)}".encode())
        x = jax.random.key_data(x)
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        arr = np.ascontiguousarray(np.asarray(x))
        h.update(f"array:{arr.dtype.name}{arr.shape}".encode())
        h.update(arr.tobytes())
    elif x is None or isinstance(x, (bool, int, float, str)):
        h.update(f"{type(x).__name__}:{x!r};".encode())
    elif dataclasses.is_dataclass(x):
        h.update(f"dataclass:{type(x).__qualname__}".encode())
        _feed(h, {f.name: getattr(x, f.name) for f in dataclasses.fields(x)})
    elif isinstance(x, (dict, list, tuple)):
        _feed_container(h, x)
    elif isinstance(x, functools.partial):
        _feed(h, ("partial", x.func, x.args, x.keywords))
    elif callable(x):
        name = getattr(x, "__qualname__", type(x).__qualname__)
        h.update(f"fn:{getattr(x, '__module__', '')}.{name};".encode())
    else:
        _feed_other(h, x)


def _feed_other(h: Any, x: Any) -> None:
    """Hashes a pytree by structure and leaves, anything else by its repr."""
    leaves, treedef = jax.tree.flatten(x)
    if jax.tree_util.treedef_is_leaf(treedef):
        text = re.sub(r" at 0x[0-9a-fA-F]+", "", repr(x))  # no memory addresses
        h.update(f"other:{type(x).__qualname__}:{text};".encode())
        return
    h.update(f"tree:{treedef}".encode())
    for leaf in leaves:
        _feed(h, leaf)


def _feed_container(h: Any, x: Any) -> None:
    h.update(f"{type(x).__qualname__}:{len(x)}(".encode())
    items = sorted(x.items(), key=lambda kv: repr(kv[0])) if isinstance(x, dict) else x
    for item in items:
        _feed(h, item)
    h.update(b")")


class _Checkpoint:
    """The files of one resumable run: ``run.json``, parts and accumulators."""

    def __init__(self, directory: PathLike, prints: dict, params: Params, every: int):
        self.dir = pathlib.Path(directory)
        self.every = every
        self.prints = prints
        self.params_def = jax.tree.structure(params)
        self.run = self._open()
        self.parts: list = []  # (part object, directory name) already on disk
        self.acc: tuple = ([], None)  # (leaves, directory name) already on disk

    def _open(self) -> dict | None:
        run_file = self.dir / "run.json"
        if run_file.is_file():
            run = _read_json(run_file, CHECKPOINT_FORMAT)
            _compare(run["fingerprint"], self.prints, self.dir)
            return run
        if self.dir.exists() and any(self.dir.iterdir()):
            raise ValueError(
                f"checkpoint_dir {self.dir} is not empty and holds no jaxattr "
                "checkpoint (run.json). Give a new or empty directory."
            )
        self.dir.mkdir(parents=True, exist_ok=True)
        return None

    def restore(self, fresh: BuildState) -> tuple:
        """The saved builder state and cursor, or ``fresh`` at ``(0, 0)``."""
        if self.run is None:
            return fresh, (0, 0)
        names, acc_name = self.run["parts"], self.run["acc"]
        parts = [_load_tree(self.dir / n, self.params_def) for n in names]
        acc = (
            fresh.acc
            if acc_name is None
            else _load_tree(self.dir / acc_name, self.params_def)
        )
        self.parts = list(zip(parts, names, strict=True))
        self.acc = (jax.tree.leaves(acc), acc_name)
        cursor = self.run["cursor"]
        return BuildState(acc, parts), (cursor["pass"], cursor["start"])

    def save(self, state: BuildState, pass_index: int, start: int) -> None:
        """Writes new parts and changed accumulators, then commits ``run.json``."""
        names = self._save_parts(state.parts, pass_index)
        acc_name = self._save_acc(state.acc)
        serial = (self.run or {}).get("serial", 0) + 1
        self.run = _header(
            CHECKPOINT_FORMAT,
            fingerprint=self.prints,
            cursor={"pass": pass_index, "start": start},
            acc=acc_name,
            parts=names,
            serial=serial,
        )
        _write_json(self.dir / "run.json", self.run)
        self._remove_unreferenced({acc_name, *names})

    def _save_parts(self, parts: list, pass_index: int) -> list:
        kept = 0
        while kept < min(len(parts), len(self.parts)) and (
            parts[kept] is self.parts[kept][0]
        ):
            kept += 1
        self.parts = self.parts[:kept]
        for i, part in enumerate(parts[kept:], kept):
            name = f"part-{pass_index}-{i:06d}"
            _save_tree(self.dir / name, part, self.params_def)
            self.parts.append((part, name))
        return [name for _, name in self.parts]

    def _save_acc(self, acc: dict) -> str | None:
        new, (old, name) = jax.tree.leaves(acc), self.acc
        if not new:
            return None
        if len(new) == len(old) and all(a is b for a, b in zip(new, old, strict=True)):
            return name
        name = f"acc-{(self.run or {}).get('serial', 0) + 1:06d}"
        _save_tree(self.dir / name, acc, self.params_def)
        self.acc = (new, name)
        return name

    def _remove_unreferenced(self, keep: set) -> None:
        for entry in self.dir.iterdir():
            stale = entry.name.startswith(("part-", "acc-")) and entry.name not in keep
            temporary = entry.name.startswith(".") and entry.name.endswith(".tmp")
            if entry.is_dir() and (stale or temporary):
                shutil.rmtree(entry, ignore_errors=True)


def _compare(saved: dict, current: dict, directory: pathlib.Path) -> None:
    """Raises ValueError naming the configuration components that differ."""
    differ = sorted(
        k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)
    )
    if differ:
        raise ValueError(
            f"checkpoint_dir {directory} holds a simulation with a different "
            f"configuration (differing: {', '.join(differ)}). Call again with the "
            "arguments of that run to resume it, or pass a new checkpoint_dir "
            f"(or delete {directory}) to start over."
        )
