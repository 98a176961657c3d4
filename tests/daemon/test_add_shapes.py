"""A badly shaped add through the daemon names the tensor at fault, and stores nothing."""

from __future__ import annotations

import pytest
import torch

import carousel
from tests.daemon.harness import start_daemon


@pytest.mark.parametrize("y, match", [
    (torch.zeros(2, 2, dtype=torch.int64), r"'y' must be 1-D .* got shape \(2, 2\)"),
    (torch.tensor(3), r"'y' must be 1-D .* got shape \(\)"),
    (torch.zeros(3, dtype=torch.int64), r"'x' must be uint8 of shape \(n, 3, 8, 8\) with n = len\(y\)"),
    (torch.zeros(2, dtype=torch.float32), r"'y' must be int64"),
])
def test_bad_label_shapes_are_named(tmp_path, y, match):
    d = start_daemon(tmp_path, tiers=None)
    try:
        with carousel.connect(d.socket) as c:
            with pytest.raises(carousel.RemoteError, match=match) as err:
                c.add(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), y, task=0)
            assert err.value.kind == "input"
            assert c.stats()["added"] == 0  # and the connection still serves
    finally:
        d.stop()
