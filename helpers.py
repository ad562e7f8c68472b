"""Command-line and file helpers every other module may use: user errors, the CLI runner, atomic writes,
staged folders, stream seeds, and --device / --amp resolution (and the precision losses run in). Imports no
project module."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

# --amp: the autocast dtype of each mode (None: full precision)
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class UserError(Exception):
    """A problem the user can fix (a flag, a file, a folder); the message names it and the fix."""


class DataError(UserError):
    """A problem with the user's data or data flags; the message names the file or flag and the fix."""


# The OS's file errors are user errors too: a missing input, an output path that is a file, no permission.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# torch's error for an operation without a deterministic kernel on its device, under --deterministic
_NOT_DETERMINISTIC = " does not have a deterministic implementation"


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run an entry point; user errors become one 'error: ...' line on stderr and exit code 2.

    Anything else (a bug) keeps its traceback."""
    try:
        main(argv)
    except (UserError, *_FILE_ERRORS) as err:
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO):
            raise
        print(f"error: {error_line(err)}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as err:
        if _NOT_DETERMINISTIC not in str(err):
            raise
        operation = str(err).partition(_NOT_DETERMINISTIC)[0].split()[-1]
        print(
            f"error: --deterministic: {operation} has no deterministic kernel on this device in torch "
            f"{torch.__version__}; run without --deterministic (GPU reruns then differ)",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def error_line(err: BaseException) -> str:
    """The one-line message of a user error (a loader worker's re-raise keeps the original's last line)."""
    message = str(err.args[0]) if len(err.args) == 1 else str(err)
    if "Original Traceback" in message:
        message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def atomic_save(write: Callable[[Path], object], path: str | os.PathLike) -> None:
    """Write a file through `write(tmp_path)` beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        if error.filename is not None:
            raise
        # a failed write() names no file (a full disk, a quota): say which one could not be written
        raise type(error)(error.errno, f"{error.strerror or error} while writing {path}") from error
    finally:
        tmp.unlink(missing_ok=True)


def save_file(save: Callable[[BinaryIO], object], path: str | os.PathLike) -> None:
    """atomic_save for writers of an open binary file (torch.save, np.save): the file is flushed to disk and
    closed before it is renamed, and a full disk is an OSError naming `path` (torch.save given a path would
    raise a RuntimeError from its own writer instead)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as file:
            save(file)
            file.flush()
            os.fsync(file.fileno())  # a node that dies after the rename still has the whole file

    atomic_save(write, path)


def replace_dir(new: Path, dest: Path) -> None:
    """Move the finished folder `new` to `dest`, replacing an old `dest` without a half-written moment."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        dest.rename(old)
        new.rename(dest)
        shutil.rmtree(old)
    else:
        new.rename(dest)


@contextlib.contextmanager
def staged_dir(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """A fresh hidden folder in `parent` to write into; removed on exit (move what is finished out with
    replace_dir first), so an interrupted write leaves nothing half-written in place."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{prefix}-", dir=parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def stream_seed(stream: str, *keys: int) -> int:
    """A 64-bit seed for one named random stream and integer keys (seed, epoch, rank, ...).

    Each consumer has its own stream name, so no two consumers ever replay the same numbers."""
    tag = int.from_bytes(stream.encode()[:16].ljust(16, b"\0"), "little")
    entropy = [len(keys), *(k % 2**63 for k in keys), tag]  # the count keeps (1,) and (1, 0) apart
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0])


def read_torch_file(path: str | os.PathLike, what: str, fix: str, map_location: torch.device | str = "cpu"):
    """torch.load(weights_only=True); a file it cannot read is a one-line UserError naming it and the fix."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file
        # torch's own message spans lines and opens with generic advice; keep the line with the cause
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        cause = next((line for line in lines if line.startswith("Unsupported")), lines[0])
        raise UserError(f"{what} {path} cannot be read ({type(error).__name__}: {cause}); {fix}") from None


def write_json(path: str | os.PathLike, content: object, indent: int = 2) -> None:
    """Write `content` as indented JSON, atomically."""
    text = json.dumps(content, indent=indent) + "\n"
    atomic_save(lambda tmp: tmp.write_text(text, encoding="utf-8"), path)


def resolve_device(name: str | None) -> torch.device:
    """--device as a torch.device (None: cuda if available, else cpu); UserError naming the flag otherwise."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def autocast_for(device: torch.device, amp: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of autocast contexts for --amp off|bf16|fp16 on this device."""
    dtype = AMP_DTYPES[amp]
    return functools.partial(torch.autocast, device.type, dtype=dtype, enabled=dtype is not None)


def full_precision(x: torch.Tensor) -> torch.Tensor:
    """x in float32 when autocast made it half or bfloat16; float32 and float64 are kept as they are."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()
