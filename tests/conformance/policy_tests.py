"""The conformance suites every admission, swap-out and swap-in policy must pass.

A policy's test class subclasses :class:`AdmissionPolicyTests`, :class:`SwapOutPolicyTests` or
:class:`SwapInPolicyTests` and implements :meth:`make` (zarr-python's ``StoreTests`` pattern): the
whole contract of :mod:`carousel.policies` is then checked for it with hypothesis over random inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carousel.policies import (
    ADMISSION_POLICIES,
    SWAP_IN_POLICIES,
    SWAP_OUT_POLICIES,
    AdmissionPolicy,
    SwapInPolicy,
    SwapOutPolicy,
    make_admission,
    make_swap_in,
    make_swap_out,
    swap_count,
)

# Policies are microsecond-cheap; 60 examples per property keep the whole policy suite ~seconds.
# differing_executors: one base-class test running once per policy subclass is the point of a
# conformance suite; the tests keep no state on ``self``, so sharing examples between subclasses
# (through hypothesis' database) only adds cases, it cannot make a result depend on another class.
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.differing_executors])
SEEDS = st.integers(min_value=0, max_value=2**32 - 1)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---- strategies --------------------------------------------------------------------------------------
@st.composite
def admission_inputs(draw) -> dict:
    em_size = draw(st.integers(0, 24))
    n_classes = draw(st.integers(1, 6))
    slot_labels = draw(st.lists(st.integers(-1, n_classes - 1), min_size=em_size, max_size=em_size))
    labels = draw(st.lists(st.integers(0, n_classes), max_size=40))
    return {
        "labels": np.array(labels, dtype=np.int64),
        "slot_labels": np.array(slot_labels, dtype=np.int64),
        "seen": draw(st.integers(0, 500)),
    }


@st.composite
def swap_out_inputs(draw) -> dict:
    n = draw(st.integers(0, 30))
    size = {"min_size": n, "max_size": n}
    # Few distinct values too, so ties in entropy and loss are common.
    numbers = st.one_of(st.floats(0, 5, width=32), st.sampled_from([0.0, 0.5, 1.0]))
    return {
        "candidates": np.array(draw(st.lists(st.integers(0, 200), unique=True, **size)), np.int64),
        "labels": np.array(draw(st.lists(st.integers(0, 4), **size)), np.int64),
        "correct": np.array(draw(st.lists(st.sampled_from([-1, 0, 1]), **size)), np.int8),
        "entropy": np.array(draw(st.lists(st.one_of(numbers, st.just(np.nan)), **size)), np.float32),
        "loss": np.array(draw(st.lists(st.one_of(numbers, st.just(np.nan)), **size)), np.float32),
        "ratio": draw(st.one_of(st.floats(0, 1), st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))),
    }


@st.composite
def swap_in_inputs(draw) -> dict:
    n_classes = draw(st.integers(1, 6))
    victims = draw(st.lists(st.integers(0, n_classes - 1), max_size=20))
    # One class more than the EM knows of, and keys left out at random: both happen in a stream.
    available = {
        c: draw(st.integers(0, 6)) for c in range(n_classes + 1) if draw(st.booleans()) or c in victims
    }
    em_class_counts = {c: victims.count(c) + draw(st.integers(0, 10)) for c in range(n_classes)}
    return {
        "victim_labels": np.array(victims, dtype=np.int64),
        "available": available,
        "em_class_counts": em_class_counts,
    }


def _copy(inputs: dict) -> dict:
    return {k: (v.copy() if isinstance(v, (np.ndarray, dict)) else v) for k, v in inputs.items()}


def _assert_same_inputs(before: dict, after: dict) -> None:
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(after[key], value, err_msg=f"{key} was modified")
        else:
            assert after[key] == value, f"{key} was modified"


# ---- admission ---------------------------------------------------------------------------------------
class AdmissionPolicyTests:
    """Subclass and implement :meth:`make`; every test below then runs for that admission policy."""

    def make(self) -> AdmissionPolicy:
        raise NotImplementedError("a policy's test class returns a fresh instance of it")

    def test_is_registered_by_name(self):
        policy = self.make()
        assert ADMISSION_POLICIES[policy.name] is type(policy)
        assert type(make_admission(policy.name)) is type(policy)

    @PROPERTY
    @given(inputs=admission_inputs(), seed=SEEDS)
    def test_returns_unique_slots_in_range(self, inputs, seed):
        out = self.make().admit(**inputs, rng=rng(seed))
        assert out.dtype == np.int64 and out.shape == inputs["labels"].shape
        em_size = len(inputs["slot_labels"])
        assert ((out >= -1) & (out < em_size)).all()
        taken = out[out >= 0]
        assert len(np.unique(taken)) == len(taken), f"slot given twice: {out}"

    @PROPERTY
    @given(inputs=admission_inputs(), seed=SEEDS)
    def test_empty_slots_are_used_before_anything_is_replaced(self, inputs, seed):
        out = self.make().admit(**inputs, rng=rng(seed))
        empty = set(np.flatnonzero(inputs["slot_labels"] == -1).tolist())
        written = set(out[out >= 0].tolist())
        # The last write to a slot is the one kept, so ``written`` is every slot the batch wrote.
        # Once an occupied slot was replaced, no empty slot may have been left unwritten.
        if written - empty:
            assert empty <= written, f"replaced {sorted(written - empty)} with {sorted(empty - written)} empty"

    @PROPERTY
    @given(inputs=admission_inputs(), seed=SEEDS)
    def test_same_seed_same_result_and_inputs_untouched(self, inputs, seed):
        before = _copy(inputs)
        first = self.make().admit(**inputs, rng=rng(seed))
        _assert_same_inputs(before, inputs)
        np.testing.assert_array_equal(self.make().admit(**inputs, rng=rng(seed)), first)

    def test_empty_batch(self):
        out = self.make().admit(np.empty(0, np.int64), np.array([-1, 0]), seen=5, rng=rng(0))
        assert out.dtype == np.int64 and out.shape == (0,)

    @pytest.mark.parametrize(
        "labels, slot_labels, seen",
        [
            (np.array([[0, 1]]), np.array([-1, -1]), 0),  # 2-D labels
            (np.array([-1]), np.array([-1, -1]), 0),  # a label that reads as "empty"
            (np.array([0]), np.array([-2, 0]), 0),  # slot label below -1
            (np.array([0.5]), np.array([-1]), 0),  # not integers
            (np.array([0]), np.array([-1]), -1),  # negative seen
        ],
    )
    def test_rejects_bad_inputs(self, labels, slot_labels, seen):
        with pytest.raises(ValueError):
            self.make().admit(labels, slot_labels, seen, rng(0))


# ---- swap-out ----------------------------------------------------------------------------------------
class SwapOutPolicyTests:
    """Subclass and implement :meth:`make`; every test below then runs for that swap-out policy."""

    def make(self) -> SwapOutPolicy:
        raise NotImplementedError("a policy's test class returns a fresh instance of it")

    def test_is_registered_by_name(self):
        policy = self.make()
        assert SWAP_OUT_POLICIES[policy.name] is type(policy)
        assert type(make_swap_out(policy.name)) is type(policy)

    @PROPERTY
    @given(inputs=swap_out_inputs(), seed=SEEDS)
    def test_returns_exactly_k_distinct_candidates(self, inputs, seed):
        out = self.make().select(**inputs, rng=rng(seed))
        k = swap_count(len(inputs["candidates"]), inputs["ratio"])
        assert out.dtype == np.int64 and out.shape == (k,)
        assert len(np.unique(out)) == k
        assert set(out.tolist()) <= set(inputs["candidates"].tolist())

    @PROPERTY
    @given(inputs=swap_out_inputs(), seed=SEEDS)
    def test_same_seed_same_result_and_inputs_untouched(self, inputs, seed):
        before = _copy(inputs)
        first = self.make().select(**inputs, rng=rng(seed))
        _assert_same_inputs(before, inputs)
        np.testing.assert_array_equal(self.make().select(**inputs, rng=rng(seed)), first)

    @pytest.mark.parametrize("ratio, n, k", [(0.0, 5, 0), (1.0, 5, 5), (0.3, 10, 3), (0.01, 3, 1), (0.5, 0, 0)])
    def test_k_is_ceil_of_ratio_times_candidates(self, ratio, n, k):
        out = self.make().select(
            np.arange(n), np.zeros(n, np.int64), np.ones(n, np.int8), np.zeros(n, np.float32),
            np.zeros(n, np.float32), ratio, rng(0),
        )
        assert len(out) == k

    @pytest.mark.parametrize(
        "change",
        [
            {"ratio": 1.5},
            {"ratio": -0.1},
            {"ratio": float("nan")},
            {"candidates": np.array([1, 1, 2])},  # a slot twice
            {"labels": np.zeros(2, np.int64)},  # misaligned
            {"entropy": np.zeros(4, np.float32)},
            {"loss": np.zeros((3, 1), np.float32)},
            {"correct": np.array([1, 2, 0], np.int8)},
        ],
    )
    def test_rejects_bad_inputs(self, change):
        inputs = {
            "candidates": np.array([1, 2, 3]), "labels": np.zeros(3, np.int64),
            "correct": np.ones(3, np.int8), "entropy": np.zeros(3, np.float32),
            "loss": np.zeros(3, np.float32), "ratio": 0.5,
        }
        with pytest.raises(ValueError):
            self.make().select(**{**inputs, **change}, rng=rng(0))


# ---- swap-in -----------------------------------------------------------------------------------------
class SwapInPolicyTests:
    """Subclass and implement :meth:`make`; every test below then runs for that swap-in policy.

    A policy that may draw only from some classes (CarM's same-class rule) overrides
    :meth:`test_gives_up_only_when_nothing_is_left` with its own rule for when -1 is allowed.
    """

    def make(self) -> SwapInPolicy:
        raise NotImplementedError("a policy's test class returns a fresh instance of it")

    def test_is_registered_by_name(self):
        policy = self.make()
        assert SWAP_IN_POLICIES[policy.name] is type(policy)
        assert type(make_swap_in(policy.name)) is type(policy)

    @PROPERTY
    @given(inputs=swap_in_inputs(), seed=SEEDS)
    def test_never_draws_more_than_available(self, inputs, seed):
        out = self.make().choose(**inputs, rng=rng(seed))
        assert out.dtype == np.int64 and out.shape == inputs["victim_labels"].shape
        classes, drawn = np.unique(out[out >= 0], return_counts=True)
        for cls, n in zip(classes.tolist(), drawn.tolist()):
            assert n <= inputs["available"].get(cls, 0), f"class {cls} drawn {n} times: {out}"
        assert (out >= -1).all()

    @PROPERTY
    @given(inputs=swap_in_inputs(), seed=SEEDS)
    def test_gives_up_only_when_nothing_is_left(self, inputs, seed):
        out = self.make().choose(**inputs, rng=rng(seed))
        total = sum(inputs["available"].values())
        served = min(len(out), total)
        # Earlier victims are served first: every -1 comes after the supply ran out.
        assert (out[:served] >= 0).all() and (out[served:] == -1).all(), (out, inputs["available"])

    @PROPERTY
    @given(inputs=swap_in_inputs(), seed=SEEDS)
    def test_same_seed_same_result_and_inputs_untouched(self, inputs, seed):
        before = _copy(inputs)
        first = self.make().choose(**inputs, rng=rng(seed))
        _assert_same_inputs(before, inputs)
        np.testing.assert_array_equal(self.make().choose(**inputs, rng=rng(seed)), first)

    def test_no_victims(self):
        out = self.make().choose(np.empty(0, np.int64), {0: 3}, {0: 1}, rng(0))
        assert out.dtype == np.int64 and out.shape == (0,)

    @pytest.mark.parametrize(
        "victims, available, em_class_counts",
        [
            (np.array([[0]]), {0: 1}, {0: 1}),  # 2-D
            (np.array([0]), {0: -1}, {0: 1}),  # negative availability
            (np.array([0, 0]), {0: 5}, {0: 1}),  # more victims of class 0 than the EM holds
            (np.array([0]), {0: 5}, {0: -3}),
        ],
    )
    def test_rejects_bad_inputs(self, victims, available, em_class_counts):
        with pytest.raises(ValueError):
            self.make().choose(victims, available, em_class_counts, rng(0))
