"""Atomic writes and safe loading of weight files.

Every file condkit writes goes through :func:`atomic_path`: it is written under a
temporary name in the same folder and renamed into place, so an interruption never
leaves a half-written file under the final name and never clobbers the previous one.
Weight files are read by :func:`load_state_dict`: safetensors first, pickles only
through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from condkit.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are handled, so `condkit preprocess` stays light
    import torch

# A safetensors header larger than this is refused before it is read: real headers are
# a few MB at most (SDXL: ~0.2 MB), so a bigger claim is a corrupt or hostile file.
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pth", ".pt")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` on success.

    Args:
        final: where the file should end up. Its folder is created if missing.
        durable: fsync the data before the rename, so even a power loss cannot leave an
            empty file under ``final``. Without it the rename still protects against an
            interrupted process (use for outputs that are cheap to remake, e.g. maps).

    On an exception the temporary file is removed and ``final`` is left untouched.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise UserError(f"{final}: cannot write ({exc.strerror or exc})") from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if durable:
            with open(tmp_path, "rb+") as handle:  # flush to disk before the rename
                os.fsync(handle.fileno())
        os.replace(tmp_path, final)
    except OSError as exc:  # e.g. a full disk: the previous file under `final` is untouched
        tmp_path.unlink(missing_ok=True)
        raise UserError(f"{final}: cannot write ({exc.strerror or exc}); any previous version is untouched") from None
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


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
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        _put_back(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{final}: cannot write ({exc.strerror or exc}); any previous version is untouched") from None
    except BaseException:
        _put_back(old, final)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    """Read and sanity-check a safetensors header without loading any tensor.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        The parsed header (tensor name -> info, plus ``__metadata__`` if present).

    Raises:
        UserError: the file is truncated, claims an absurd header size, or its tensor
            offsets point past the end of the file.
    """
    path = Path(path)
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
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: safetensors header is not valid JSON ({exc})") from None
    data_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        end = info.get("data_offsets", [0, 0])[1] if isinstance(info, dict) else None
        if not isinstance(end, int) or end > data_len:
            raise UserError(f"{path}: tensor {name!r} lies past the end of the file (truncated?)")
    return header


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the ``__metadata__`` of a safetensors file (empty if none).

    Args:
        path: a ``.safetensors`` file.
    """
    return dict(check_safetensors_header(path).get("__metadata__") or {})


def load_state_dict(path: str | os.PathLike) -> dict[str, "torch.Tensor"]:
    """Load tensors from a weight file, safely.

    Args:
        path: a ``.safetensors`` file, or a pickle (``.bin``/``.ckpt``/``.pth``/``.pt``) that
            is read with ``torch.load(weights_only=True)`` so it cannot run code.

    Returns:
        A flat dict name -> tensor on CPU. Nested pickles (``{"state_dict": ...}``,
        ``{"image_proj": {...}, "ip_adapter": {...}}``) are flattened with dots.

    Raises:
        UserError: the file is missing, of an unknown type, or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        check_safetensors_header(path)
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own types for corrupt data
            raise UserError(f"{path}: cannot read safetensors ({exc})") from None
    if path.suffix in PICKLE_SUFFIXES:
        import torch

        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path}: cannot load as weights-only torch file ({first_line})") from None
        return _flatten(obj, path)
    raise UserError(f"{path}: unknown weight file type {path.suffix!r} (use .safetensors, .bin, .ckpt or .pth)")


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
