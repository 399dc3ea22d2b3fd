"""Names of a user's NumPy dataset files, ``npz:PATH[#sha256:HEX]``, without
TensorFlow (the apps' flags use them before it loads).

A run saves the file by its absolute path and a fingerprint of its content,
so that a resume or an export that finds another file there (rewritten,
replaced) says so instead of reading other images or normalising with
other statistics than the run's.
"""

from __future__ import annotations

import functools
import hashlib
import os

PREFIX = "npz:"
_MARK = "#sha256:"
#: Hex digits of the content hash kept in a name.
FINGERPRINT_DIGITS = 16


def is_npz_name(name) -> bool:
  """Whether ``name`` asks for a NumPy file (``npz:PATH``)."""
  return isinstance(name, str) and name.startswith(PREFIX)


def split_name(name: str) -> tuple[str, str | None]:
  """``(path, fingerprint)`` of ``npz:PATH[#sha256:HEX]`` (fingerprint None
  when the name has none); the path as written."""
  rest = name[len(PREFIX):]
  path, mark, fingerprint = rest.rpartition(_MARK)
  if mark and len(fingerprint) == FINGERPRINT_DIGITS and all(
      c in "0123456789abcdef" for c in fingerprint):
    return path, fingerprint
  return rest, None


def fingerprint_of(name) -> str | None:
  """The content fingerprint in ``npz:PATH#sha256:HEX`` (None for a name
  without one, or not an npz name)."""
  return split_name(name)[1] if is_npz_name(name) else None


def npz_name(path: str, fingerprint: str | None = None) -> str:
  """``npz:PATH``, with ``#sha256:FINGERPRINT`` when one is given (the
  inverse of `split_name`)."""
  return PREFIX + path + (_MARK + fingerprint if fingerprint else "")


def flag_name(name: str) -> str:
  """A dataset name as a flag would give it: an npz file's saved name
  without its fingerprint, any other name as it is."""
  return npz_name(file_path(name)) if is_npz_name(name) else name


def file_path(name: str) -> str:
  """The absolute path of the file that ``npz:PATH[#sha256:HEX]`` names."""
  return absolute(split_name(name)[0])


def absolute(path: str) -> str:
  """``path`` with ``~`` expanded, absolute and normalised (a trailing
  slash dropped)."""
  return os.path.abspath(os.path.expanduser(path))


def file_fingerprint(path: str) -> str:
  """The first `FINGERPRINT_DIGITS` hex digits of the SHA-256 of the file's
  content (cached per file version: size, times and inode)."""
  status = os.stat(path)
  return _fingerprint(path, status.st_size, status.st_mtime_ns,
                      status.st_ctime_ns, status.st_ino)


@functools.lru_cache(maxsize=8)
def _fingerprint(path: str, *unused_version) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      digest.update(block)
  return digest.hexdigest()[:FINGERPRINT_DIGITS]


#: `file_state`'s states other than ``"same"``, as a sentence's end.
FILE_STATES = {"absent": "is not there",
               "unreadable": "cannot be read",
               "changed": "changed since the run read it"}


def file_state(name: str) -> str:
  """Whether the file of ``npz:PATH#sha256:HEX`` (a run's saved name) is
  still there as the run read it: ``"same"``, or a key of `FILE_STATES`."""
  path = file_path(name)
  if not os.path.isfile(path):
    return "absent"
  try:
    now = file_fingerprint(path)
  except OSError:
    return "unreadable"
  return "same" if now == split_name(name)[1] else "changed"


def by_content(config: dict) -> dict:
  """A config dict with an npz ``dataset`` that holds a fingerprint named by
  its content alone: a run resumed with its data file moved or copied
  elsewhere (same content, another path) compares equal to the saved run."""
  fingerprint = fingerprint_of(config.get("dataset"))
  if fingerprint is None:
    return config
  return {**config, "dataset": npz_name("", fingerprint)}


def saved_name(name: str) -> str:
  """The name a run saves for ``npz:PATH``: the absolute path and the
  fingerprint of the file there now (OSError when it cannot be read).

  Raises:
    ValueError: ``name`` holds a fingerprint (copied from a run) that the
      file's content no longer has.
  """
  path, given = split_name(name)
  path = absolute(path)
  now = file_fingerprint(path)
  if given is not None and given != now:
    raise ValueError(f"{path} changed since the run that saved this name "
                     f"read it (content sha256 {given}..., now {now}...); "
                     "put back that file, or drop the #sha256 part to use "
                     "the file as it is")
  return npz_name(path, now)
