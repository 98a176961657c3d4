import torch

from trainers.models import MLP, reduced_resnet18, resnet18


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_reduced_resnet18_is_the_gem_one():
    m = reduced_resnet18(100)
    assert 1.0e6 < n_params(m) < 1.3e6  # ~1.1 M (GEM reports 1.09 M for 100 classes)
    assert m(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert m.features(torch.zeros(2, 3, 32, 32)).shape == (2, 160)


def test_full_resnet18_is_the_mammoth_one():
    m = resnet18(10)
    assert 11.0e6 < n_params(m) < 11.3e6
    assert m(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_mlp_for_mnist():
    m = MLP(10)
    assert m(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert n_params(m) == 784 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10
