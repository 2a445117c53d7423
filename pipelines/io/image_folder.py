"""Labelled image folders: the split and class of every file of a folder tree, from paths only.

One layout per folder, detected from the paths relative to its root:

* split folders, when every top-level folder names a split: ``train/``, ``val/`` or
  ``validation/``, ``test/``, or ``split=<s>/`` (this project's export layout). Classes are the
  folders below them: ``train/cat/x.jpg``, ``split=test/label=3/x.png``;
* class folders: ``<class>/<file>`` (the layout Keras' ``image_dataset_from_directory`` and
  Augmentor read);
* flat: files directly under the root, no folders: no labels (augment accepts it, ingest not).

The class of a file is the first folder below the root (or below its split folder), with a
``label=`` prefix removed, so deeper folders belong to their top class folder as in Keras. Hidden
and bookkeeping files (a path part starting with ``.`` or ``_``, as Spark skips them) are
*ignored*; files outside the layout (a file beside the class folders, a file directly in a split
folder) are *bad*. Both are returned with the reason, never dropped silently.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

#: Split folder names -> the split they hold.
SPLIT_FOLDERS = {"train": "train", "val": "validation", "validation": "validation",
                 "test": "test"}
_SPLIT_KEY = re.compile(r"^split=(.+)$")

Layout = Literal["splits", "classes", "flat"]


@dataclass(frozen=True)
class FolderEntry:
    """One file of a folder tree and what its path says about it."""

    #: The path relative to the root, ``/``-separated.
    relative: str
    #: The split its split folder names; None without split folders.
    split: str | None = None
    #: The class folder's name (``label=`` removed); None in a flat folder or when not usable.
    label_name: str | None = None
    #: Why the file is not an image candidate; None when it is one.
    reason: str | None = None
    #: ``ignored`` (hidden or bookkeeping file) or ``bad`` (outside the layout); None when usable.
    kind: Literal["ignored", "bad"] | None = None


def split_of_folder(name: str) -> str | None:
    """The split a top-level folder name stands for (``val`` -> ``validation``), else None."""
    match = _SPLIT_KEY.match(name)
    if match:
        return match[1]
    return SPLIT_FOLDERS.get(name.lower())


def classify(relative_paths: Iterable[str]) -> tuple[Layout, list[FolderEntry]]:
    """The folder's layout and one :class:`FolderEntry` per path, in the order given."""
    paths = list(relative_paths)
    visible = [p for p in paths if not _hidden(p)]
    top = {p.split("/", 1)[0] for p in visible if "/" in p}
    if not top:
        layout: Layout = "flat"
    elif all(split_of_folder(name) is not None for name in top):
        layout = "splits"
    else:
        layout = "classes"
    return layout, [_entry(p, layout) for p in paths]


def _hidden(relative: str) -> bool:
    return any(part.startswith((".", "_")) for part in relative.split("/"))


def _entry(relative: str, layout: Layout) -> FolderEntry:
    if _hidden(relative):
        return FolderEntry(relative, reason="hidden or bookkeeping file (a path part starts "
                           "with '.' or '_')", kind="ignored")
    parts = relative.split("/")
    if layout == "flat":
        return FolderEntry(relative)
    if len(parts) < 2:
        where = "split" if layout == "splits" else "class"
        return FolderEntry(relative, reason=f"outside the layout: beside the {where} folders, "
                           "not in one", kind="bad")
    split = None
    if layout == "splits":
        split = split_of_folder(parts[0])
        parts = parts[1:]
        if len(parts) < 2:
            return FolderEntry(relative, split=split, reason="outside the layout: directly in "
                               "a split folder, not in a class folder below it", kind="bad")
    label = parts[0].removeprefix("label=")
    return FolderEntry(relative, split=split, label_name=label)


def class_names(entries: Iterable[FolderEntry]) -> list[str]:
    """Class names in label order: sorted, or ``0 ... max`` when every name is a number
    (this project's ``label=<int>`` folders keep their labels)."""
    names = {e.label_name for e in entries if e.reason is None and e.label_name is not None}
    if names and all(n.isdigit() for n in names):
        return [str(i) for i in range(max(int(n) for n in names) + 1)]
    return sorted(names)
