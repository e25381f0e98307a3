"""Library warnings that do not concern the user are silenced precisely (fovlm/data/quiet.py): a tiny stage-3 run
shows none of them, while a warning about the user's own configuration still comes through."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from fitkit import fit_args, subprocess_env, synthetic_data
from lightning.pytorch.strategies import SingleDeviceStrategy
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.data import has_len_all_ranks
from torch.utils.data import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from fovlm.data.quiet import EMPTY_LIST, ITERABLE_LEN, LEAF_SPEC, SET_VITAL, quiet_loaders

SILENCED = ("'set_vital' is deprecated", "has `__len__` defined", "LeafSpec", "Total length of `list`",
            "in eval mode at the start of training")


class SizedStream(IterableDataset):
    def __iter__(self):
        return iter(range(4))

    def __len__(self):
        return 4


def _loaders_handed_to_lightning() -> None:
    strategy = SingleDeviceStrategy(torch.device("cpu"))
    loader = StatefulDataLoader(SizedStream(), batch_size=None)
    has_len_all_ranks(loader, strategy)
    has_len_all_ranks([], strategy)
    CombinedLoader(loader)


def shown(action, quiet: bool) -> list[str]:
    """The messages of the warnings ``action`` gives under Python's ``-W always`` (after the filters if ``quiet``)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        if quiet:
            quiet_loaders(empty_list=True)
        action()
    return [str(w.message) for w in seen]


def test_the_libraries_give_the_warnings_and_the_filters_catch_exactly_them():
    loud = shown(_loaders_handed_to_lightning, quiet=False)
    for needle in SILENCED[:4]:  # each filter has a warning to silence (a library update may drop one)
        assert any(needle in message for message in loud), (needle, loud)
    assert not shown(_loaders_handed_to_lightning, quiet=True)


# Each silenced warning as its library gives it: message, category and module.
GIVEN = [
    (SET_VITAL, "'set_vital' is deprecated, please do not call", "torchdata.stateful_dataloader.stateful_dataloader"),
    (ITERABLE_LEN, "Your `IterableDataset` has `__len__` defined. In combination with ...",
     "lightning.pytorch.utilities.data"),
    (LEAF_SPEC, "`isinstance(treespec, LeafSpec)` is deprecated, use ...", "lightning.pytorch.utilities._pytree"),
    (EMPTY_LIST, "Total length of `list` across ranks is zero. Please make sure ...",
     "lightning.pytorch.utilities.data"),
]


@pytest.mark.parametrize(("warning", "message", "module"), GIVEN, ids=["set_vital", "len", "leaf_spec", "empty"])
def test_a_filter_lets_other_messages_categories_and_modules_through(warning, message, module):
    other = RuntimeWarning  # a subclass of neither UserWarning nor FutureWarning

    def emit():
        warnings.warn_explicit(message, warning.category, "library.py", 1, module=module)  # silenced
        warnings.warn_explicit("Another warning: " + message, warning.category, "library.py", 2, module=module)
        warnings.warn_explicit(message, other, "library.py", 3, module=module)
        warnings.warn_explicit(message, warning.category, "data.py", 4, module="my_project.data")

    assert shown(emit, quiet=True) == ["Another warning: " + message, message, message]


def test_the_list_warning_is_silenced_only_without_validation():
    def empty_list():
        has_len_all_ranks([], SingleDeviceStrategy(torch.device("cpu")))

    with warnings.catch_warnings(record=True) as seen:
        warnings.resetwarnings()
        warnings.simplefilter("always")
        quiet_loaders()
        empty_list()
    assert [str(w.message) for w in seen if "Total length of `list`" in str(w.message)]


@pytest.mark.slow
def test_a_tiny_stage3_start_shows_no_library_warning_but_a_real_one(tmp_path_factory, tmp_path):
    data = synthetic_data(tmp_path_factory.getbasetemp() / "synthetic")

    def fit(args: list[str]) -> str:
        command = [sys.executable, "-W", "always", "-m", "fovlm", *args]
        result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout + result.stderr

    fit(fit_args(2, data, tmp_path / "sft", 1, extra=["--model.init_args.init_from", "null"]))
    init = tmp_path / "sft" / "stage2" / "checkpoints" / "last.ckpt"
    # The preference set gives 3 batches an epoch: logging every 50 steps is the user's own mistake, and says so.
    output = fit(fit_args(3, data, tmp_path / "dpo", 1, extra=[
        "--model.init_args.init_from", str(init), "--trainer.log_every_n_steps", "50"]))
    assert "Started from the weights of init_from" in output
    assert not [needle for needle in SILENCED if needle in output], output
    assert "is smaller than the logging interval Trainer(log_every_n_steps=50)" in output
