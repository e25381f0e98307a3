"""Warnings of the libraries under the data loaders that say nothing to fovlm's user, silenced one by one.

Each filter names the warning's message, its category and the module it is attributed to, so every other warning,
of the same libraries and the same modules included, still shows (tests/test_quiet_fit.py):

- torch deprecates ``torch.set_vital``, which torchdata's ``StatefulDataLoader`` calls each time one is built
  ("'set_vital' is deprecated, please do not call").
- Lightning warns that an ``IterableDataset`` with ``__len__`` may give a wrong length with several workers. A
  :class:`~fovlm.data.stream.ShardStream`'s length is the planned number of batches of this rank, which its
  workers share out exactly (and under a frame budget it has no length, so Lightning does not ask).
- Lightning's ``CombinedLoader`` builds torch's deprecated ``LeafSpec`` (a ``FutureWarning`` about
  ``isinstance(treespec, LeafSpec)``) for every loader it is given.
- Lightning warns that the total length of a ``list`` of loaders is zero: the DataModule's validation loaders
  when no validation shards are configured, which is the plain way to train without validation.

A DataModule installs the filters as it builds its loaders (:func:`quiet_loaders`); Lightning's warnings come
later, when the Trainer sets its loops up, so the filters stay installed for the process.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class LibraryWarning:
    """One warning of a library, as a filter matches it.

    Attributes:
        message: a regular expression the start of the message must match.
        category: the warning's class (subclasses match too).
        module: a regular expression the start of the module the warning is attributed to must match.
    """

    message: str
    category: type[Warning]
    module: str

    def ignore(self) -> None:
        """Add a filter that ignores this warning, and only it (in front of the others)."""
        warnings.filterwarnings("ignore", message=self.message, category=self.category, module=self.module)


SET_VITAL = LibraryWarning(r"'set_vital' is deprecated", UserWarning, r"torchdata\.stateful_dataloader\b")
ITERABLE_LEN = LibraryWarning(r"Your `IterableDataset` has `__len__` defined", UserWarning,
                              r"lightning\.pytorch\.utilities\.data\b")
LEAF_SPEC = LibraryWarning(r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
                           r"lightning\.pytorch\.utilities\._pytree\b")
EMPTY_LIST = LibraryWarning(r"Total length of `list` across ranks is zero\.", UserWarning,
                            r"lightning\.pytorch\.utilities\.data\b")


def quiet_loaders(empty_list: bool = False) -> None:
    """Silence, for the rest of the process, the warnings about building a loader and handing it to Lightning
    (``empty_list``: also the one about an empty list of loaders)."""
    for warning in (SET_VITAL, ITERABLE_LEN, LEAF_SPEC) + ((EMPTY_LIST,) if empty_list else ()):
        warning.ignore()
