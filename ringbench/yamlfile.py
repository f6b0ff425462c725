"""One YAML input file (an experiment, a Slurm profile, a machine description): its values and the line of every key.

:class:`Source` reads a regular UTF-8 file with ``yaml.safe_load`` (never another loader), refuses alias bombs and
deep nesting before any tree is built, and indexes the composed nodes so that every problem names
``file:line: key.path: what is wrong``. Used by ringbench.sweeps.experiment and ringbench.analysis.advise.
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path

import yaml

MAX_YAML_NODES = 200_000  # the most values (keys, scalars, lists, mappings) a file may hold once aliases are expanded
MAX_YAML_DEPTH = 32  # the deepest nesting of lists and mappings a file may have
MAX_YAML_BYTES = 16 * 2**20  # the largest experiment, profile or machine file read (16 MiB; the values cap is far below)


class ExperimentError(Exception):
    """A problem in an experiment or profile file; the text is one line naming file, line and key path."""


# ---------------------------------------------------------------------------------------------
# YAML with line numbers
# ---------------------------------------------------------------------------------------------
def read_regular_file(path, name: str, limit: int = MAX_YAML_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; ExperimentError (one line, naming ``name``)
    otherwise. Opened without blocking and checked on the open descriptor: a FIFO (whose open or read would wait for
    a writer forever), a device such as /dev/zero (endless), a directory or a socket is refused before any read, and
    at most ``limit`` + 1 bytes are ever read (a file that grows while it is read is refused too)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise ExperimentError(f"{name}: is a directory, not a YAML file") from None
    except OSError as exc:
        raise ExperimentError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ExperimentError(f"{name}: is a directory, not a YAML file")
        if not stat.S_ISREG(st.st_mode):
            raise ExperimentError(f"{name}: is {_file_kind(st.st_mode)}, not a regular file; a YAML file is needed")
        if st.st_size > limit:
            raise ExperimentError(f"{name}: is {st.st_size} bytes; a YAML file may have at most {_size(limit)}")
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise ExperimentError(f"{name}: is more than {limit} bytes; a YAML file may have at most {_size(limit)}")
        return b"".join(chunks)
    except OSError as exc:
        raise ExperimentError(f"{name}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _size(nbytes: int) -> str:
    return f"{nbytes} bytes ({nbytes / 2**20:g} MiB)" if nbytes >= 2**20 else f"{nbytes} bytes"


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return kind
    return "not a regular file"


class Source:
    """One YAML file: its values (safe_load) and the line of every key path (from the composed nodes). The file must
    be a regular file of at most MAX_YAML_BYTES (:func:`read_regular_file`)."""

    def __init__(self, path, text: str | None = None):
        self.path = Path(path)
        self.name = str(path)
        if text is None:
            text = self._read()
        try:
            self._check_shape(text)
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise ExperimentError(f"{self.name}{where}: not valid YAML: {problem}") from None
        self.lines: dict[tuple, int] = {}
        if node is not None:
            self._index(node, ())

    def _read(self) -> str:
        raw = read_regular_file(self.path, self.name)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            raise ExperimentError(
                f"{self.name}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); save the file as UTF-8"
            ) from None

    def _check_shape(self, text: str) -> None:
        """Refuse, from the event stream and before any tree is built, a file nested deeper than MAX_YAML_DEPTH
        or holding more than MAX_YAML_NODES values once its aliases are expanded (an alias bomb): the node tree
        and every walk over it stay small, and the composer's recursion stays shallow."""
        total, anchors, open_ = 0, {}, []  # open_: (total before the collection, its anchor) per open collection
        for ev in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(ev, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                open_.append((total, ev.anchor))
                total += 1
                if len(open_) > MAX_YAML_DEPTH:
                    raise ExperimentError(f"{self.name}:{ev.start_mark.line + 1}: nested deeper than {MAX_YAML_DEPTH} levels")
            elif isinstance(ev, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                before, anchor = open_.pop()
                if anchor is not None:
                    anchors[anchor] = total - before
            elif isinstance(ev, yaml.ScalarEvent):
                total += 1
                if ev.anchor is not None:
                    anchors[ev.anchor] = 1
            elif isinstance(ev, yaml.AliasEvent):
                total += anchors.get(ev.anchor, 1)
            else:
                continue
            if total > MAX_YAML_NODES:
                raise ExperimentError(
                    f"{self.name}:{ev.start_mark.line + 1}: more than {MAX_YAML_NODES} values once aliases are expanded; "
                    f"an experiment file may hold at most {MAX_YAML_NODES}"
                )

    def _index(self, node, path: tuple) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for knode, vnode in node.value:
                key = knode.value
                if key in seen:
                    raise ExperimentError(f"{self.name}:{knode.start_mark.line + 1}: {fmt_path(path + (key,))}: duplicate key")
                seen.add(key)
                self._index(vnode, path + (key,))
                self.lines[path + (key,)] = knode.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,))

    def error(self, path: tuple, message: str) -> ExperimentError:
        line = None
        for n in range(len(path), -1, -1):
            line = self.lines.get(tuple(path[:n]))
            if line is not None:
                break
        where = f"{self.name}:{line}" if line else self.name
        return ExperimentError(f"{where}: {fmt_path(path)}: {message}" if path else f"{where}: {message}")


def fmt_path(path: tuple) -> str:
    """A key path as a user writes it: ``matrix.seq_len[2]``; a key holding a control character is shown escaped
    (``'a\\nb'``), so that an error message stays one line."""
    out = ""
    for part in path:
        if isinstance(part, str) and any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in part):
            part = ascii(part)
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
