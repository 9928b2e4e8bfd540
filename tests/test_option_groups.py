"""Nested option groups: scikit-learn nested parameters, saved as JSON objects."""

import json

import numpy as np
import pytest
from sklearn.base import clone

from unsup.base import OptionGroup, Segmentation, SegmentationMethod


class _Optim(OptionGroup):
    def __init__(self, *, lr: float = 1e-3, epochs: int = 5):
        self.lr = lr
        self.epochs = epochs


class _Method(SegmentationMethod):
    name = ""  # not registered

    def __init__(self, *, k: int = 2, optim=None):
        self.k = k
        self.optim = _Optim.coerce(optim, name="optim")

    def predict(self, image):
        return Segmentation(np.zeros(image.shape[:2], dtype=np.int32))


def test_nested_params_are_visible_and_settable():
    method = _Method()
    params = method.get_params(deep=True)
    assert params["optim__lr"] == 1e-3 and params["optim__epochs"] == 5
    method.set_params(optim__lr=0.01)
    assert method.optim.lr == 0.01
    # the default group is created per instance: another method keeps its own default
    assert _Method().optim.lr == 1e-3


def test_clone_copies_the_group():
    method = _Method(optim={"lr": 0.5})
    copy = clone(method)
    assert copy.optim.lr == 0.5 and copy.optim is not method.optim


def test_unknown_option_names_the_group_and_its_options():
    with pytest.raises(ValueError, match=r"optim has no option\(s\) momentum; its options are: "
                                         r"epochs, lr"):
        _Method(optim={"momentum": 0.9})
    with pytest.raises(ValueError, match="must be a _Optim or a dict"):
        _Method(optim=[1, 2])


def test_saved_model_stores_the_group_as_an_object(tmp_path):
    _Method(k=3, optim={"epochs": 9}).save(tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["params"] == {"k": 3, "optim": {"epochs": 9, "lr": 1e-3}}
    loaded = _Method.load(tmp_path)
    assert loaded.k == 3 and loaded.optim.epochs == 9


def test_create_method_sets_nested_options_and_names_bad_ones():
    from unsup.registry import create_method

    method = create_method("supervised", network__lr=0.01, augment__crop_size=96, max_side=128)
    assert method.network.lr == 0.01 and method.augment.crop_size == 96
    assert method.max_side == 128 and method.network.decoder == "unet"  # others keep defaults
    with pytest.raises(ValueError, match="network has no option 'learning_rate'"):
        create_method("supervised", network__learning_rate=0.01)
    with pytest.raises(ValueError, match="no parameter\\(s\\) optimiser__lr"):
        create_method("supervised", optimiser__lr=0.01)
    with pytest.raises(ValueError, match="max_side is not a group of options"):
        create_method("supervised", max_side__x=1)


def test_unsup_methods_lists_each_group_on_its_own_line(capsys):
    from unsup.cli import main

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("supervised "))
    block = lines[start + 1:start + 4]
    network = [line for line in block if line.strip().startswith("network__: ")]
    augment = [line for line in block if line.strip().startswith("augment__: ")]
    assert len(network) == 1 and "decoder='unet'" in network[0] and "lr=0.001" in network[0]
    assert len(augment) == 1 and "crop_size=224" in augment[0]
