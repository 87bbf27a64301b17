"""An allowlisting unpickler for the release's Lightning checkpoints and ``nn_memory`` pickles.

A pickle is a program: each ``GLOBAL`` opcode imports a name and ``REDUCE`` calls it, so
``pickle.load`` on a foreign file runs whatever the file names (``os.system``, ``Path.touch``, a
Lightning class's import side effects). Here :meth:`_Unpickler.find_class` hands out only

- the tensor rebuilders of ``torch.save`` (reimplemented here over the zip's raw storages, so no
  torch loader runs either) and torch's storage / dtype names,
- plain containers (``collections.OrderedDict``, ``set``, ...), and
- numpy's array / scalar / dtype reconstructors under both their numpy < 2 (``numpy.core``) and
  numpy >= 2 (``numpy._core``) spellings, as the release's ``nn_memory.p`` needs.

Every other global (e.g. ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``, a key
of the release's ``ckpt["callbacks"]``) becomes an inert :class:`Stub` subclass named after it:
calling it records its arguments, nothing is imported or executed. The loaders return the names
they stubbed so that callers can say so.

``torch.load(weights_only=True)`` is not used for the checkpoint because it refuses the whole file
at the first unknown global (torch >= 2.6 on the release's ``ModelCheckpoint``), and allowlisting
placeholders through it needs every foreign name known in advance.
"""

from __future__ import annotations

import _codecs
import collections
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

from rdm.errors import RdmError


class UnpickleError(RdmError):
    """A checkpoint or pickle that cannot be read; the message names the file and the fix."""


class Stub:
    """Placeholder for a global outside the allowlist: it records what the pickle passed it.

    Subclasses are made per name by :func:`_stub_class` (``stub_of`` = "module.qualname"). Calling
    one (``REDUCE`` / ``NEWOBJ``) makes an instance holding the arguments; ``BUILD`` state and
    list / dict items are kept too; calling an instance gives another. None of it is ever
    interpreted."""

    stub_of = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Stub:
        obj = object.__new__(cls)
        obj._stub_args, obj._stub_kwargs = args, kwargs
        obj._stub_state, obj._stub_items = None, []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # everything is recorded in __new__

    def __call__(self, *args: Any, **kwargs: Any) -> Stub:
        # e.g. getattr(Path, "touch") stubbed, then called: record, never resolve
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self._stub_state = state

    def append(self, item: Any) -> None:
        self._stub_items.append(item)

    def extend(self, items: Any) -> None:
        self._stub_items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self._stub_items.append((key, value))

    def __repr__(self) -> str:
        return f"<stub of {self.stub_of}>"


def is_stub(obj: Any) -> bool:
    """Whether ``obj`` is a stubbed global (a class) or what calling one produced."""
    return isinstance(obj, Stub) or (isinstance(obj, type) and issubclass(obj, Stub))


def _stub_class(module: str, name: str) -> type[Stub]:
    qualified = f"{module}.{name}"
    short = name.rsplit(".", 1)[-1] or "stub"
    return type(short, (Stub,), {"__module__": module, "__qualname__": name, "stub_of": qualified})


# --- the allowlist --------------------------------------------------------------------------------

_BUILTINS = {
    name: getattr(__import__("builtins"), name)
    for name in (
        "set",
        "frozenset",
        "complex",
        "bytearray",
        "slice",
        "tuple",
        "list",
        "dict",
        "int",
        "float",
        "bool",
        "str",
        "range",
    )
}
_COLLECTIONS = {"OrderedDict": collections.OrderedDict, "defaultdict": collections.defaultdict}


def _codecs_encode(obj: Any, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes`` (``(str, "latin1")``)."""
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode is allowed only for (str, 'latin1')")
    return _codecs.encode(obj, encoding)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """``copyreg._reconstructor`` (protocol 0/1 objects), restricted to allowlisted bases."""
    import copyreg

    if base is not object and base not in _BUILTINS.values() and base not in _COLLECTIONS.values():
        raise pickle.UnpicklingError(f"copyreg._reconstructor with base {base!r} is not allowed")
    return copyreg._reconstructor(cls, base, state)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """numpy's array, scalar and dtype reconstructors, under both module spellings."""
    import numpy as np

    try:  # numpy >= 2 keeps them in numpy._core; importing numpy.core there warns
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core import multiarray, numeric

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        if subtype is not np.ndarray:  # a subclass would run its own code
            raise pickle.UnpicklingError(f"numpy _reconstruct of {subtype!r} is not allowed")
        return multiarray._reconstruct(subtype, shape, dtype)

    table = {}
    for prefix in ("numpy.core", "numpy._core"):
        table[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        table[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    table[("numpy", "ndarray")] = np.ndarray
    table[("numpy", "dtype")] = np.dtype
    # numpy >= 1.25 pickles dtypes by their class, e.g. numpy.dtypes.Int64DType
    for name in dir(np.dtypes) if hasattr(np, "dtypes") else ():
        obj = getattr(np.dtypes, name)
        if isinstance(obj, type) and issubclass(obj, np.dtype):
            table[("numpy.dtypes", name)] = obj
    return table


# --- torch's zip format, read without torch.load ---------------------------------------------------

# torch.save names each typed storage by its legacy class; the element type of its bytes
_STORAGE_DTYPES = {
    "DoubleStorage": "float64",
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "uint8",
}


class _StorageType:
    """What ``find_class("torch", "FloatStorage")`` returns: only the element type."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _Storage:
    """One storage of the archive: a flat tensor over its bytes, (numel,) of its dtype."""

    def __init__(self, flat: Any):
        self.flat = flat


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any = None) -> Any:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("a tensor rebuilder was given something other than a storage")
    try:
        flat = storage.flat if dtype is None else storage.flat.view(dtype)
        return flat.as_strided(tuple(size), tuple(stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise pickle.UnpicklingError(f"tensor view outside its storage ({exc})") from None


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, dtype)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data  # a state dict needs the values, not the nn.Parameter wrapper


def _torch_globals() -> dict[tuple[str, str], Any]:
    import torch

    rebuilders = {_rebuild_tensor_v2, _rebuild_tensor_v3}

    def rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
        # torch's wrapper for tensor subclasses; the subclass itself is not restored
        if func not in rebuilders:
            raise pickle.UnpicklingError(f"_rebuild_from_type_v2 of {func!r} is not allowed")
        return func(*args)

    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): rebuild_from_type_v2,
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,  # only ever a marker for _rebuild_from_type_v2
        ("torch.nn.parameter", "Parameter"): torch.Tensor,
    }
    for name in _STORAGE_DTYPES:
        table[("torch", name)] = _StorageType(name)
        table[("torch.storage", name)] = table[("torch", name)]
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            table[("torch", name)] = getattr(torch, name)
    return table


class _Unpickler(pickle.Unpickler):
    """``find_class`` answers from the allowlist; everything else is a recorded :class:`Stub`."""

    def __init__(self, file: Any, allowed: dict[tuple[str, str], Any], storages=None):
        super().__init__(file)
        self.allowed = allowed
        self.stubs: dict[str, type[Stub]] = {}  # first-use order: what was stubbed
        self.storages = storages  # key -> _Storage loader for torch's persistent ids

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is not None:
            return found
        key = f"{module}.{name}"
        if key not in self.stubs:
            self.stubs[key] = _stub_class(module, name)
        return self.stubs[key]

    def persistent_load(self, pid: Any) -> Any:
        if self.storages is None:
            raise pickle.UnpicklingError("a persistent id in a plain pickle (not a torch file)")
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unknown storage type {storage_type!r}")
        return self.storages(str(key), storage_type.dtype, int(numel))


def _damaged(path: Path, what: str, detail: str, stubbed: list[str] = ()) -> UnpickleError:
    if stubbed:  # the failure may come from a placeholder standing in for a foreign object
        detail += f"; it names globals outside the allowlist: {', '.join(stubbed)}"
    return UnpickleError(
        f"{what} {path} cannot be read ({detail}); the file is truncated or damaged, or not "
        "what rdm reads: download it again and compare its size / checksum with the release's"
    )


# --- public API ------------------------------------------------------------------------------------


def load_pickle(path: str | Path, what: str = "pickle") -> tuple[Any, list[str]]:
    """(object, stubbed global names) of a plain pickle such as the release's ``nn_memory.p``.

    numpy arrays, numpy scalars, plain containers are rebuilt; any other global is an inert
    :class:`Stub` and its name is returned. ``what`` names the file in error messages."""
    path = Path(path)
    unpickler = None
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                raise UnpickleError(
                    f"{what} {path} is a zip archive (a torch checkpoint?), not a plain pickle"
                )
            f.seek(0)
            unpickler = _Unpickler(f, _numpy_globals() | _plain_globals())
            obj = unpickler.load()
    except UnpickleError:
        raise
    except FileNotFoundError:
        raise UnpickleError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UnpickleError(f"{what} {path} is a directory; give the pickle file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        stubbed = list(unpickler.stubs) if unpickler else []
        raise _damaged(path, what, f"{type(exc).__name__}: {exc}", stubbed) from None
    except OSError as exc:
        raise UnpickleError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    return obj, list(unpickler.stubs)


def load_torch_zip(path: str | Path, what: str = "torch checkpoint") -> tuple[Any, list[str]]:
    """(object, stubbed global names) of a ``torch.save`` file in the zip format (torch >= 1.6).

    Tensors are rebuilt from the archive's storages (CPU, no torch loader involved); non-tensor
    objects as in :func:`load_pickle`."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise UnpickleError(f"{what} {path} is a directory; give the .ckpt file")
    try:
        archive = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise UnpickleError(f"{what} {path} does not exist") from None
    except zipfile.BadZipFile as exc:
        raise _not_zip(path, what, exc) from None
    except OSError as exc:
        raise UnpickleError(f"{what} {path} cannot be read ({exc.strerror or exc})") from None
    with archive:
        names = archive.namelist()
        pickles = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise UnpickleError(
                f"{what} {path} is a zip archive but not a torch.save file "
                f"({len(pickles)} data.pkl entries, expected 1)"
            )
        prefix = pickles[0][: -len("data.pkl")]
        big_endian = _read_member(archive, f"{prefix}byteorder", path, what, missing=b"little")
        swap = (big_endian.strip() == b"big") != (sys.byteorder == "big")
        cache: dict[str, _Storage] = {}

        def storage(key: str, dtype: str, numel: int) -> _Storage:
            if key not in cache:
                raw = _read_member(archive, f"{prefix}data/{key}", path, what)
                torch_dtype = getattr(torch, dtype)
                itemsize = torch.empty((), dtype=torch_dtype).element_size()
                if len(raw) != numel * itemsize:
                    raise pickle.UnpicklingError(
                        f"storage {key} holds {len(raw)} bytes, expected {numel} x {itemsize}"
                    )
                flat = torch.empty(0, dtype=torch_dtype)
                if numel:
                    flat = torch.frombuffer(bytearray(raw), dtype=torch_dtype)
                    if swap and itemsize > 1:  # written on a machine of the other byte order
                        flat = flat.view(torch.uint8).view(-1, itemsize).flip(1).reshape(-1)
                        flat = flat.view(torch_dtype).clone()
                cache[key] = _Storage(flat)
            return cache[key]

        allowed = _numpy_globals() | _plain_globals() | _torch_globals()
        unpickler = None
        try:
            with archive.open(pickles[0]) as f:
                unpickler = _Unpickler(f, allowed, storages=storage)
                obj = unpickler.load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
            stubbed = list(unpickler.stubs) if unpickler else []
            raise _damaged(path, what, f"{type(exc).__name__}: {exc}", stubbed) from None
        except zipfile.BadZipFile as exc:
            raise _damaged(path, what, str(exc)) from None
    return obj, list(unpickler.stubs)


def load_lightning_checkpoint(path: str | Path) -> tuple[dict, list[str]]:
    """(checkpoint dict, stubbed global names) of a PyTorch Lightning ``.ckpt``.

    The dict is the file's top level (``epoch``, ``global_step``, ``state_dict``, ``callbacks``,
    ...); its ``state_dict`` maps names to CPU tensors. Lightning's callback classes come back as
    :class:`Stub` s and are listed in the second element."""
    path = Path(path)
    ckpt, stubbed = load_torch_zip(path, what="checkpoint")
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        kind = type(ckpt).__name__
        raise UnpickleError(
            f"checkpoint {path} is a torch file but not a Lightning checkpoint (its top level is "
            f"a {kind} without a 'state_dict' dict); give the release's model.ckpt"
        )
    return ckpt, stubbed


def _plain_globals() -> dict[tuple[str, str], Any]:
    table = {("builtins", n): v for n, v in _BUILTINS.items()}
    table |= {("__builtin__", n): v for n, v in _BUILTINS.items()}  # protocol-2 / Python 2 names
    table |= {("collections", n): v for n, v in _COLLECTIONS.items()}
    table[("_codecs", "encode")] = _codecs_encode
    table[("copyreg", "_reconstructor")] = _reconstructor
    table[("copy_reg", "_reconstructor")] = _reconstructor
    return table


def _read_member(
    archive: zipfile.ZipFile, name: str, path: Path, what: str, missing: bytes | None = None
) -> bytes:
    try:
        return archive.read(name)
    except KeyError:
        if missing is not None:
            return missing
        raise pickle.UnpicklingError(f"the archive has no entry {name}") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise _damaged(path, what, f"entry {name}: {exc}") from None


def _not_zip(path: Path, what: str, exc: Exception) -> UnpickleError:
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:1] == b"\x80":  # a pickle stream: torch.save before 1.6, or a plain pickle
        return UnpickleError(
            f"{what} {path} is a plain pickle stream, not the zip format torch >= 1.6 writes; "
            "the legacy torch format is not supported (re-save it with a current torch in an "
            "environment you trust)"
        )
    return _damaged(path, what, f"not a zip archive: {exc}")
