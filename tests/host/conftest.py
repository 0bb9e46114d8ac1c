"""Fixtures of the host tier (ComfyUI imported in process)."""
import pytest

from idf_testlib import models


@pytest.fixture(scope="session")
def sd15(host):
    """A tiny SD1.5-layout UNet (shared: tests patch clones of it, never the model itself)."""
    return models.tiny_sd15()


@pytest.fixture(autouse=True)
def fresh_cache(host):
    """Every host test starts with an empty feature cache and zeroed counters."""
    from IDFusion.models.feature_cache import FEATURE_CACHE
    FEATURE_CACHE.reset()
