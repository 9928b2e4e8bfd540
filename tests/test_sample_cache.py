"""The training sample cache is reused only for the same data."""

from unsup.datasets import open_dataset
from unsup.nn.data import SampleCache
from unsup.synthetic import make_shapes_dataset


def _prepare(sample, index, shape, directory, small):
    return {"max_label": int(sample.label_map.max())}


def test_cache_is_rebuilt_for_other_images_and_reused_for_the_same(tmp_path):
    root_a = make_shapes_dataset(tmp_path / "a", n_images=2, shape=(32, 40), n_shapes=2)
    root_b = make_shapes_dataset(tmp_path / "b", n_images=3, shape=(32, 40), n_shapes=2)
    data_a = open_dataset(f"masks:{root_a}/images:{root_a}/masks")
    data_b = open_dataset(f"masks:{root_b}/images:{root_b}/masks")
    cache_dir = tmp_path / "cache"
    fingerprint = {"kind": "masks", "max_side": None}

    first = SampleCache.build(data_a, cache_dir, max_side=None, fingerprint=fingerprint,
                              prepare=_prepare, progress=False)
    assert len(first) == 2
    stamp = (cache_dir / "meta.json").stat().st_mtime_ns
    again = SampleCache.build(data_a, cache_dir, max_side=None, fingerprint=fingerprint,
                              prepare=_prepare, progress=False)
    assert len(again) == 2 and (cache_dir / "meta.json").stat().st_mtime_ns == stamp

    other = SampleCache.build(data_b, cache_dir, max_side=None, fingerprint=fingerprint,
                              prepare=_prepare, progress=False)
    assert len(other) == 3  # not the stale 2-image cache of the first dataset
