"""Atomic writes and safe loading of weight files.

Every file condkit writes goes through :func:`atomic_path`: it is written under a
temporary name in the same folder and renamed into place, so an interruption never
leaves a half-written file under the final name and never clobbers the previous one.
Weight files are read by :func:`load_state_dict`: safetensors first, pickles only
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import secrets
import shutil
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from condkit.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are handled, so `condkit preprocess` stays light
    import torch

# A safetensors header larger than this is refused before it is read: real headers are
# a few MB at most (SDXL: ~0.2 MB), so a bigger claim is a corrupt or hostile file.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
# Bytes per element of the safetensors dtypes whose size is a whole number of bytes; a
# tensor entry whose offsets span another size is refused (sub-byte dtypes are not checked).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pth", ".pt")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    Args:
        final: where the file should end up. Its folder is created if missing.
        durable: fsync the data before the rename, so even a power loss cannot leave an
            empty file under ``final``. Without it the rename still protects against an
            interrupted process (use for outputs that are cheap to remake, e.g. maps).

    On an exception the temporary file is removed and ``final`` is left untouched. A
    failed write (a full disk, a read-only folder; see :func:`write_failure_reason`)
    becomes a :class:`UserError` naming ``final``.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = _create_temp_file(final)
        mode = tmp_path.stat().st_mode & 0o777  # 0666 minus the umask
    except OSError as exc:
        raise UserError(f"{final}: cannot write ({exc.strerror or exc})") from None
    try:
        yield tmp_path
        if tmp_path.stat().st_mode & 0o777 != mode:  # some writers (safetensors) make their file 0600
            os.chmod(tmp_path, mode)
        if durable:
            with open(tmp_path, "rb+") as handle:  # flush to disk before the rename
                os.fsync(handle.fileno())
        os.replace(tmp_path, final)
    except Exception as exc:  # e.g. a full disk: the previous file under `final` is untouched
        tmp_path.unlink(missing_ok=True)
        reason = write_failure_reason(exc)
        if reason is None:
            raise
        raise UserError(f"{final}: cannot write ({reason}); any previous version is untouched") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _create_temp_file(final: Path) -> Path:
    """Create an empty hidden file ``.NAME.XXXXXXXX.tmp`` beside ``final``.

    Unlike ``tempfile.mkstemp`` (always mode 0600) the file is created with mode 0666
    minus the umask, like any other tool's output, so the renamed result is e.g. 0644.

    Args:
        final: the file the temporary one will replace.
    """
    for _ in range(100):
        candidate = final.parent / f".{final.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final))


def write_failure_reason(exc: BaseException) -> str | None:
    """Why writing a file failed, if ``exc`` is a failed write; None for anything else.

    Writers report I/O failures in their own types: Python raises ``OSError``;
    ``torch.save`` into a file object raises a ``RuntimeError`` whose context is the
    ``OSError``; safetensors raises ``SafetensorError("... I/O error: ...")``. Anything
    else (a bug) is not a write failure and keeps its traceback.

    Args:
        exc: the exception raised while writing.
    """
    seen: BaseException | None = exc
    while seen is not None and not isinstance(seen, UserError):
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        if type(seen).__name__ == "SafetensorError" and "I/O error" in str(seen):
            return str(seen).split("I/O error:", 1)[1].strip()
        seen = seen.__cause__ or (None if seen.__suppress_context__ else seen.__context__)
    return None


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; swap it in for ``final`` on success.

    For writers that produce several files (``save_pretrained``, checkpoints): an
    interruption leaves either the old folder or the complete new one under ``final``.

    Args:
        final: the folder to create or replace.
    """
    final = Path(final)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    old = final.parent / f".{final.name}.old-{os.getpid()}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as exc:
        raise UserError(f"{final}: cannot write ({exc.strerror or exc})") from None
    try:
        yield tmp
        _apply_umask_modes(tmp)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except Exception as exc:
        _put_back(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure_reason(exc)
        if reason is None:
            raise
        raise UserError(f"{final}: cannot write ({reason}); any previous version is untouched") from None
    except BaseException:
        _put_back(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _apply_umask_modes(folder: Path) -> None:
    """Give every file under ``folder`` mode 0666 minus the umask (writers may make 0600 files).

    Args:
        folder: a folder created by ``mkdir`` (mode 0777 minus the umask, from which the
            file mode follows).
    """
    file_mode = folder.stat().st_mode & 0o666
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != file_mode:
            os.chmod(path, file_mode)


# What interrupted atomic writes leave: .NAME.XXXXXXXX.tmp files (atomic_path; tempfile.mkstemp
# before it), .NAME.tmp-PID and .NAME.old-PID folders (atomic_folder).
_STALE_NAME = re.compile(r"\.(?P<name>.+?)\.(?:[A-Za-z0-9_]{8}\.tmp|(?P<folder>tmp|old)-\d+)")


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what interrupted atomic writes in ``folder`` left behind (not recursive).

    A process killed during :func:`atomic_path` or :func:`atomic_folder` leaves hidden
    ``.NAME.XXXXXXXX.tmp`` files and ``.NAME.tmp-PID`` folders; they are deleted. A
    ``.NAME.old-PID`` folder is a previous version moved aside for a swap: it is put back
    when ``NAME`` is missing (the swap never completed), else deleted. Only call this
    while no other process writes into ``folder`` (e.g. holding the run's lock).

    Args:
        folder: the folder to clean (a missing one is fine).

    Returns:
        The paths removed or put back.
    """
    cleaned = []
    for path in sorted(Path(folder).glob(".*")):
        match = _STALE_NAME.fullmatch(path.name)
        if match is None:
            continue
        if match["folder"] is None:
            if path.is_file():
                path.unlink(missing_ok=True)
                cleaned.append(path)
            continue
        if not path.is_dir():
            continue
        if match["folder"] == "old":
            _put_back(path, path.parent / match["name"])
        shutil.rmtree(path, ignore_errors=True)
        cleaned.append(path)
    return cleaned


def _put_back(old: Path, final: Path) -> None:
    # The previous folder was moved aside but the new one never arrived: restore it.
    if old.exists() and not final.exists():
        os.replace(old, final)


def write_bytes_atomic(final: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``final`` atomically.

    Args:
        final: destination file.
        data: the bytes to write.
    """
    with atomic_path(final) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``final`` atomically.

    Args:
        final: destination file.
        text: the text to write.
    """
    write_bytes_atomic(final, text.encode("utf-8"))


def write_json_atomic(final: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as indented JSON to ``final`` atomically.

    Args:
        final: destination file.
        obj: anything ``json.dumps`` accepts.
    """
    write_text_atomic(final, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors_atomic(
    tensors: dict[str, "torch.Tensor"], final: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Save a state dict as safetensors, atomically.

    Args:
        tensors: name -> tensor; tensors are made contiguous and moved to CPU.
        final: destination ``.safetensors`` file.
        metadata: optional string metadata stored in the header.
    """
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(final) as tmp:
        save_file(cpu, str(tmp), metadata=metadata)


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """Read and fully check a safetensors header without loading any tensor.

    The header is validated here, before the file is handed to the safetensors library,
    so a hostile header (a JSON list, nested brackets, offsets that are not a pair of
    integers) is one line naming the file and the key rather than a traceback.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The parsed header (tensor name -> info, plus ``__metadata__`` if present).

    Raises:
        UserError: the file is truncated, claims an absurd header size, its header is not a
            JSON object of tensor entries (``dtype``, ``shape``, ``data_offsets``), or its
            tensor offsets point past the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            raw_len = handle.read(8)
            if len(raw_len) < 8:
                raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > MAX_SAFETENSORS_HEADER_BYTES or 8 + header_len > size:
                raise UserError(
                    f"{path}: safetensors header claims {header_len} bytes but the file has {size}; refusing to read it"
                )
            raw_header = handle.read(header_len)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw_header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    except RecursionError:  # e.g. 400 KB of "[": the JSON parser recurses per bracket
        raise UserError(f"{path}: safetensors header nests too deeply to be a safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: safetensors header is a JSON {type(header).__name__}, not an object of tensors")
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            _check_safetensors_metadata(path, info)
        else:
            _check_safetensors_entry(path, name, info, data_len)
    return header


def _check_safetensors_metadata(path: Path, metadata: object) -> None:
    # safetensors allows only string -> string metadata; anything else is a forged header.
    if metadata is None:
        return
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise UserError(f"{path}: safetensors header key '__metadata__' must map strings to strings")


def _check_safetensors_entry(path: Path, name: str, info: object, data_len: int) -> None:
    """Check one tensor entry of a safetensors header.

    Args:
        path: the file, for messages.
        name: the tensor name.
        info: its header entry: ``{"dtype": str, "shape": [int, ...], "data_offsets": [begin, end]}``.
        data_len: bytes after the header, where the offsets must point.
    """
    if not isinstance(info, dict):
        raise UserError(f"{path}: safetensors header entry {name!r} is a JSON {type(info).__name__}, not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        raise UserError(f"{path}: tensor {name!r} has dtype {dtype!r}, not a dtype name")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise UserError(f"{path}: tensor {name!r} has shape {_short(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise UserError(f"{path}: tensor {name!r} has data_offsets {_short(offsets)}, not a pair of non-negative integers")
    begin, end = offsets
    if begin > end or end > data_len:
        raise UserError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
    item_bytes = SAFETENSORS_DTYPE_BYTES.get(dtype)
    if item_bytes is not None and math.prod(shape) * item_bytes != end - begin:
        raise UserError(
            f"{path}: tensor {name!r} ({dtype} {shape}) needs {math.prod(shape) * item_bytes} bytes "
            f"but its data_offsets span {end - begin}"
        )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the ``__metadata__`` of a safetensors file (empty if none).

    Args:
        path: a ``.safetensors`` file.
    """
    return dict(check_safetensors_header(path).get("__metadata__") or {})


def load_state_dict(path: str | os.PathLike, allow_nonfinite: bool = False) -> dict[str, "torch.Tensor"]:
    """Load tensors from a weight file, safely.

    Args:
        path: a ``.safetensors`` file, or a pickle (``.bin``/``.ckpt``/``.pth``/``.pt``) that
            is read with ``torch.load(weights_only=True)`` so it cannot run code.
        allow_nonfinite: accept NaN/inf values. By default a floating-point tensor holding
            one is refused: such weights only ever produce black or noise images.

    Returns:
        A flat dict name -> tensor on CPU. Nested pickles (``{"state_dict": ...}``,
        ``{"image_proj": {...}, "ip_adapter": {...}}``) are flattened with dots.

    Raises:
        UserError: the file is missing, of an unknown type, cannot be read, or (unless
            ``allow_nonfinite``) holds NaN/inf values (naming the first such tensor).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors_header(path)
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own types for corrupt data
            raise UserError(f"{path}: cannot read safetensors ({exc})") from None
    elif path.suffix in PICKLE_SUFFIXES:
        tensors = _flatten(_torch_load_weights_only(path, map_location="cpu"), path)
    else:
        raise UserError(f"{path}: unknown weight file type {path.suffix!r} (use .safetensors, .bin, .ckpt or .pth)")
    if not allow_nonfinite:
        check_finite(tensors, str(path))
    return tensors


def check_finite(tensors: dict[str, "torch.Tensor"], source: str) -> None:
    """Refuse NaN/inf in floating-point tensors, naming the first tensor that holds one.

    Args:
        tensors: name -> tensor.
        source: the file (or model) the tensors came from, for the message.

    Raises:
        UserError: a tensor holds a NaN or an infinite value.
    """
    import torch

    for name, tensor in tensors.items():
        if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UserError(
                f"{source}: tensor {name!r} holds {bad} NaN/inf value(s) of {tensor.numel()}; "
                "a broken file gives black or noise images, so it is refused"
            )


def check_weight_file(path: str | os.PathLike) -> None:
    """Check that a weight file can be read, without loading its tensors.

    Safetensors: the header is checked (:func:`check_safetensors_header`). Pickles: they
    are unpickled weights-only onto the meta device (no tensor data is read), so a
    pickle that holds code, or a truncated archive, is refused with the real reason.

    Args:
        path: a ``.safetensors`` file or a ``.bin``/``.ckpt``/``.pth``/``.pt`` pickle.

    Raises:
        UserError: naming the file and why it cannot be read.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        check_safetensors_header(path)
    elif path.suffix in PICKLE_SUFFIXES:
        _torch_load_weights_only(path, map_location="meta")


def _torch_load_weights_only(path: Path, map_location: str) -> object:
    """``torch.load(weights_only=True)``, failures as one line giving the real reason."""
    import pickle

    import torch

    try:
        return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message suggests weights_only=False, which would run the file's code;
        # show only the line that says what the unpickler refused.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reasons = [line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file an issue"))]
        reason = reasons[0] if reasons else (lines[0] if lines else "not plain tensors")
        raise UserError(f"{path}: refused: this pickle holds more than tensors ({reason})") from None
    except Exception as exc:  # truncated archives, garbage: RuntimeError, KeyError, EOFError, ...
        text = str(exc).strip()
        first_sentence = text.splitlines()[0].split(". ")[0] if text else ""
        raise UserError(
            f"{path}: cannot load as weights-only torch file, truncated or not a torch file "
            f"({type(exc).__name__}: {first_sentence})"
        ) from None


def _flatten(obj: object, path: Path, prefix: str = "") -> dict[str, "torch.Tensor"]:
    import torch

    if isinstance(obj, torch.Tensor):
        return {prefix[:-1]: obj}
    if isinstance(obj, dict):
        if not prefix and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        out: dict[str, torch.Tensor] = {}
        for key, value in obj.items():
            if isinstance(value, (torch.Tensor, dict)):
                out.update(_flatten(value, path, f"{prefix}{key}."))
        return out
    raise UserError(f"{path}: does not hold a dict of tensors")
