"""One real local Ray cluster for the tests in this folder (started once, shut down after them)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def ray_cluster():
    """``ray.init`` of a local cluster: 4 logical CPUs (2 shard actors + 2 trainer actors fit on a
    2-core machine), no dashboard, a small object store. Shut down after the last test here, so
    no Ray process outlives the folder's tests."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'carousel[ray]')")
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, object_store_memory=256 * 2**20,
             namespace="carousel-tests")
    try:
        yield ray
    finally:
        ray.shutdown()
