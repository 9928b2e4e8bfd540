import numpy as np
import pytest

from unsup.synthetic import make_shapes_image


@pytest.fixture
def shapes_image():
    """A 96x128 synthetic image with 3 shapes and its exact labels."""
    return make_shapes_image((96, 128), n_shapes=3, noise=6.0, seed=1)


@pytest.fixture
def rng():
    return np.random.default_rng(0)
