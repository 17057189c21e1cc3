"""The naming rules of a model repository, shared by the server, the exporter and the clients.

One rule each, so that what ``onnxserve export`` publishes is what ``onnxserve serve`` serves,
and a name or number that a request carries is read the way the repository's folders are.

Model names (a folder of the repository, a gRPC ``model_name``, a segment of an HTTP path
``/v2/models/{name}``): 1 to 128 ASCII letters, digits, ``_``, ``.`` or ``-``, not starting
with ``.`` or ``-``. These are RFC 3986's unreserved characters (an HTTP path segment needs
no percent-encoding for them) less ``~``; as one path component the name can never be
``.``, ``..``, a hidden folder, a path with a separator, or an option to a command line.
Triton and KServe take any folder name; this rule is the part of theirs that is safe
everywhere a name goes (file system, URL, Prometheus label, shell).

Version numbers: Triton's model repository layout ("subdirectories that are not numerically
named, or have names that start with the character "0" will be ignored",
docs/user_guide/model_repository.md) with Triton's int64 versions. A version folder is named
by ASCII digits not starting with ``0`` (1 to 2**63 - 1); any other folder inside a model
folder is not a version. A request names a version by ASCII digits (``01`` is version 1, as
Triton's ``std::stoll`` reads it); anything else (``²``, ``٣``, ``+1``, `` 1``, ``1_0``, a
sign, an empty string where a number is required) names no version. Python's ``int()`` and
``str.isdigit()`` accept several of those, and ``int()`` raises on ``²`` and on strings of
more than 4300 digits: parse with ``plain_int`` instead.
"""

from __future__ import annotations

import re

MAX_MODEL_NAME = 128
#: Triton's model versions are int64
MAX_VERSION = 2**63 - 1
MODEL_NAME_RULE = ("1 to 128 ASCII letters, digits, '_', '.' or '-', not starting with '.' "
                   "or '-'")
VERSION_FOLDER_RULE = "a version number: ASCII digits not starting with '0', as Triton"

_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_DIGITS = re.compile(r"[0-9]+")


def plain_int(text: str, max_value: int) -> int | None:
    """``text`` as a whole number 0..``max_value`` written in ASCII digits only; None for
    anything else (a sign, spaces, ``_``, other scripts' digits such as ``²`` or ``٣``, an
    empty string, a value over ``max_value``).

    Never raises: the length is checked before ``int()`` sees the text.
    """
    if not _DIGITS.fullmatch(text):
        return None
    significant = text.lstrip("0") or "0"
    if len(significant) > len(str(max_value)):
        return None
    value = int(significant)
    return value if value <= max_value else None


def model_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a model name (a phrase to follow the name), or None when it
    can. See the module docstring for the rule and its source."""
    if not name:
        return "is empty"
    if len(name) > MAX_MODEL_NAME:
        return f"is {len(name)} characters long, over {MAX_MODEL_NAME}"
    if name[0] == ".":
        return ("starts with '.' (a hidden folder, or a path out of its folder when it is "
                "'.' or '..')")
    if name[0] == "-":
        return "starts with '-' (a command line would read it as an option)"
    bad = next((c for c in name if c not in _NAME_CHARS), None)
    if bad is not None:
        return f"has {bad!r}, which is not an ASCII letter, digit, '_', '.' or '-'"
    return None


def valid_model_name(name: str) -> bool:
    """Whether ``name`` can be a model name (see the module docstring)."""
    return model_name_problem(name) is None


def check_model_name(name: str) -> str:
    """``name`` when it can be a model name.

    Raises:
        ValueError: naming the model name, what is wrong with it and the rule.
    """
    problem = model_name_problem(name)
    if problem is not None:
        raise ValueError(f"model name {name[:MAX_MODEL_NAME + 2]!r} {problem}; a model name "
                         f"is {MODEL_NAME_RULE}")
    return name


def safe_model_name(text: str, fallback: str = "model") -> str:
    """A model name made from ``text`` (a file name, say): each character the rule does not
    allow becomes '_', leading '.' and '-' go, and the result is cut to the length
    limit; ``fallback`` when nothing is left."""
    name = "".join(c if c in _NAME_CHARS else "_" for c in text).lstrip(".-")
    return name[:MAX_MODEL_NAME] or fallback


def parse_version(text: str) -> int | None:
    """The version a request names (ASCII digits, 1 to 2**63 - 1), or None when ``text``
    names no version (see the module docstring)."""
    value = plain_int(text, MAX_VERSION)
    return value if value else None


def version_folder(name: str) -> int | None:
    """The version a folder inside a model folder holds, or None when the folder is not a
    version (Triton ignores those: not numerically named, or starting with '0')."""
    return None if name.startswith("0") else parse_version(name)
