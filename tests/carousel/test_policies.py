"""Admission and swap policies: the conformance suites for each, plus what each policy is for."""

import doctest
from collections import Counter

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import carousel.policies
from carousel.policies import (
    CarmBalancedSwapOut,
    CarmSwapOut,
    ClassBalancedAdmission,
    ClassBalancedSwapIn,
    LossSwapOut,
    RandomSwapIn,
    RandomSwapOut,
    ReservoirAdmission,
    SameClassRandomSwapIn,
    make_admission,
    make_swap_in,
    make_swap_out,
    swap_count,
)
from tests.conformance.policy_tests import (
    PROPERTY,
    AdmissionPolicyTests,
    SwapInPolicyTests,
    SwapOutPolicyTests,
    swap_in_inputs,
)


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def run_stream(policy, labels: np.ndarray, em_size: int, batch: int, seed: int) -> np.ndarray:
    """Feed a stream through an admission policy; return the stream index held by each slot."""
    slot_labels = np.full(em_size, -1, dtype=np.int64)
    slot_ids = np.full(em_size, -1, dtype=np.int64)
    gen = rng(seed)
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        slots = policy.admit(chunk, slot_labels, seen=start, rng=gen)
        kept = slots >= 0
        slot_labels[slots[kept]] = chunk[kept]
        slot_ids[slots[kept]] = start + np.flatnonzero(kept)
    return slot_ids


def carm_inputs(correct, entropy, labels=None, loss=None) -> dict:
    n = len(correct)
    return {
        "candidates": np.arange(10, 10 + n),
        "labels": np.zeros(n, np.int64) if labels is None else np.asarray(labels, np.int64),
        "correct": np.asarray(correct, np.int8),
        "entropy": np.asarray(entropy, np.float32),
        "loss": np.full(n, np.nan, np.float32) if loss is None else np.asarray(loss, np.float32),
    }


# ---- admission ---------------------------------------------------------------------------------------
class TestReservoirAdmission(AdmissionPolicyTests):
    def make(self):
        return ReservoirAdmission()

    def test_keeps_each_stream_sample_with_probability_em_size_over_n(self):
        em_size, n, runs = 10, 100, 2000
        kept = np.zeros(n, dtype=np.int64)
        labels = np.zeros(n, dtype=np.int64)
        for seed in range(runs):
            ids = run_stream(self.make(), labels, em_size, batch=7, seed=seed)
            assert (ids >= 0).all() and len(np.unique(ids)) == em_size
            kept[ids] += 1
        expected = runs * em_size / n
        chi2 = float(((kept - expected) ** 2 / expected).sum())
        # 99 degrees of freedom: P(chi2 > 148.2) = 0.001 for a uniform sample. Seeds are fixed.
        assert chi2 < 148.2, (chi2, kept.min(), kept.max())
        # The early samples (written into empty slots) must not be favoured over the late ones.
        assert abs(kept[:50].sum() - kept[50:].sum()) < 0.1 * runs * em_size

    def test_fills_empty_slots_in_order_then_replaces(self):
        out = self.make().admit(np.zeros(3, np.int64), np.array([4, -1, 4, -1]), seen=2, rng=rng(0))
        assert out[:2].tolist() == [1, 3]
        gen = rng(1)
        full = np.zeros(4, np.int64)
        # Sample number 999 is kept with probability 4/1000.
        hits = sum(self.make().admit(np.zeros(1, np.int64), full, seen=999, rng=gen)[0] >= 0 for _ in range(20000))
        assert 40 < hits < 120  # mean 80, sd ~9

    def test_later_write_to_the_same_slot_wins(self):
        # A one-slot memory: sample t is kept w.p. 1/(t+1); several in a batch can be kept, only
        # the last of them may hold the slot.
        for seed in range(50):
            out = self.make().admit(np.zeros(8, np.int64), np.array([0]), seen=1, rng=rng(seed))
            j = rng(seed).integers(0, 1 + np.arange(1, 9))
            hits = np.flatnonzero(j == 0)
            want = np.full(8, -1)
            if len(hits):
                want[hits[-1]] = 0
            assert out.tolist() == want.tolist()


class TestClassBalancedAdmission(AdmissionPolicyTests):
    def make(self):
        return ClassBalancedAdmission()

    @pytest.mark.parametrize("em_size", [80, 83])
    def test_imbalanced_stream_ends_balanced(self, em_size):
        labels = np.repeat([0, 1, 2, 3], [400, 120, 60, 25])
        rng(7).shuffle(labels)
        ids = run_stream(self.make(), labels, em_size, batch=16, seed=3)
        histogram = np.bincount(labels[ids], minlength=4)
        assert histogram.sum() == em_size
        assert histogram.max() - histogram.min() <= 1, histogram

    def test_rare_class_keeps_all_its_samples(self):
        labels = np.repeat([0, 1], [300, 5])
        rng(1).shuffle(labels)
        ids = run_stream(self.make(), labels, 40, batch=10, seed=0)
        assert np.bincount(labels[ids]).tolist() == [35, 5]

    def test_updates_its_view_within_a_batch(self):
        # Ten class-1 samples into a memory full of class 0: balance is reached after five, so a
        # policy that looked only at the slots before the batch would admit all ten.
        out = self.make().admit(np.ones(10, np.int64), np.zeros(10, np.int64), seen=10, rng=rng(0))
        assert (out[:5] >= 0).all() and (out[5:] == -1).all()
        assert len(set(out[:5].tolist())) == 5

    def test_replaces_a_slot_of_the_largest_class(self):
        slot_labels = np.array([0, 0, 0, 1, 1, 2])
        for seed in range(30):
            out = self.make().admit(np.array([2]), slot_labels, seen=6, rng=rng(seed))
            assert out[0] in (0, 1, 2)


# ---- swap-out ----------------------------------------------------------------------------------------
class TestCarmSwapOut(SwapOutPolicyTests):
    def make(self):
        return CarmSwapOut()

    def test_confident_correct_leave_first_confident_mistakes_stay(self):
        inputs = carm_inputs(correct=[1, 0, 1, -1, 0, 1], entropy=[0.5, 0.1, 0.05, 0.3, 2.0, 1.2])
        # slots:                     10  11  12    13  14   15
        full = self.make().select(**inputs, ratio=1.0, rng=rng(0))
        # correct by rising entropy (12, 10, 15), wrong by falling entropy (14, 11), unknown (13).
        assert full.tolist() == [12, 10, 15, 14, 11, 13]
        assert self.make().select(**inputs, ratio=0.5, rng=rng(0)).tolist() == [12, 10, 15]
        # 11 is a confident mistake (entropy 0.1): the last known sample to leave.
        assert self.make().select(**inputs, ratio=0.8, rng=rng(0)).tolist() == [12, 10, 15, 14, 11]

    def test_unknown_predictions_go_last_in_random_order(self):
        inputs = carm_inputs(correct=[-1, -1, -1, 0], entropy=[0, 0, 0, 3])
        orders = {tuple(self.make().select(**inputs, ratio=1.0, rng=rng(s)).tolist()) for s in range(30)}
        assert all(order[0] == 13 for order in orders) and len(orders) > 1


class TestCarmBalancedSwapOut(SwapOutPolicyTests):
    def make(self):
        return CarmBalancedSwapOut()

    def test_quotas_per_class_and_remainder_to_a_random_class(self):
        # 5 of class 0, 3 of class 1, ratio 0.5: quotas floor(2.5)=2 and floor(1.5)=1, k=ceil(4)=4,
        # the 1 left over goes to class 0 or 1. Entropy rises with the slot, so CarM order = slot order.
        inputs = carm_inputs(correct=[1] * 8, entropy=np.arange(8) / 10, labels=[0, 0, 0, 0, 0, 1, 1, 1])
        seen = Counter()
        for seed in range(40):
            out = self.make().select(**inputs, ratio=0.5, rng=rng(seed)).tolist()
            assert out == sorted(out)  # eviction order is CarM order overall
            seen[tuple(out)] += 1
        assert set(seen) == {(10, 11, 12, 15), (10, 11, 15, 16)}, seen

    def test_remainder_goes_to_distinct_classes(self):
        # 3 classes x 3 candidates, ratio 0.5: quotas 1 each, k = ceil(4.5) = 5, so two classes get
        # one more each; giving both to one class would take 3 of its 3.
        inputs = carm_inputs(correct=[1] * 9, entropy=np.zeros(9), labels=np.repeat([0, 1, 2], 3))
        for seed in range(30):
            out = self.make().select(**inputs, ratio=0.5, rng=rng(seed))
            per_class = sorted(Counter(inputs["labels"][out - 10].tolist()).values())
            assert per_class == [1, 2, 2]

    def test_protects_a_class_carm_would_empty(self):
        # Class 1 is all confident and correct, class 0 all wrong: plain CarM would take class 1 only.
        inputs = carm_inputs(correct=[1, 1, 0, 0], entropy=[0.1, 0.2, 1.0, 2.0], labels=[1, 1, 0, 0])
        assert CarmSwapOut().select(**inputs, ratio=0.5, rng=rng(0)).tolist() == [10, 11]
        assert self.make().select(**inputs, ratio=0.5, rng=rng(0)).tolist() == [10, 13]


class TestRandomSwapOut(SwapOutPolicyTests):
    def make(self):
        return RandomSwapOut()

    def test_uniform_over_candidates(self):
        inputs = carm_inputs(correct=[1] * 10, entropy=np.arange(10))
        counts = np.zeros(10)
        runs = 3000
        for seed in range(runs):
            counts[self.make().select(**inputs, ratio=0.3, rng=rng(seed)) - 10] += 1
        # Each candidate is a victim with probability 3/10: mean 900, sd ~25.
        assert np.abs(counts - 0.3 * runs).max() < 125, counts


class TestLossSwapOut(SwapOutPolicyTests):
    def make(self):
        return LossSwapOut()

    def test_lowest_loss_first_unknown_last(self):
        inputs = carm_inputs(correct=[-1] * 5, entropy=np.zeros(5), loss=[0.3, np.nan, 0.1, 2.0, np.nan])
        assert self.make().select(**inputs, ratio=0.6, rng=rng(0)).tolist() == [12, 10, 13]
        tails = {tuple(self.make().select(**inputs, ratio=1.0, rng=rng(s)).tolist()[3:]) for s in range(30)}
        assert tails == {(11, 14), (14, 11)}


# ---- swap-in -----------------------------------------------------------------------------------------
class TestSameClassRandomSwapIn(SwapInPolicyTests):
    def make(self):
        return SameClassRandomSwapIn()

    @PROPERTY
    @given(inputs=swap_in_inputs(), seed=st.integers(0, 2**32 - 1))
    def test_gives_up_only_when_nothing_is_left(self, inputs, seed):
        # Replaces the any-class rule: -1 exactly when the victim's own class has run out.
        out = self.make().choose(**inputs, rng=rng(seed))
        victims = inputs["victim_labels"]
        for i, cls in enumerate(victims.tolist()):
            left = inputs["available"].get(cls, 0) - int((out[:i] == cls).sum())
            assert out[i] == (cls if left > 0 else -1), (i, out, inputs)

    def test_keeps_the_em_class_histogram(self):
        gen = rng(0)
        em = np.repeat([0, 1, 2, 3], [12, 9, 6, 3])
        before = np.bincount(em, minlength=4)
        for _ in range(50):
            candidates = gen.choice(len(em), size=8, replace=False)
            victims = RandomSwapOut().select(
                candidates, em[candidates], np.ones(8, np.int8), np.zeros(8, np.float32),
                np.zeros(8, np.float32), ratio=0.5, rng=gen,
            )
            counts = dict(enumerate(np.bincount(em, minlength=4).tolist()))
            classes = self.make().choose(em[victims], {c: 100 for c in range(4)}, counts, gen)
            assert classes.tolist() == em[victims].tolist()
            em[victims] = classes
        assert np.bincount(em, minlength=4).tolist() == before.tolist()

    def test_gives_up_when_its_own_class_runs_out(self):
        out = self.make().choose(np.array([0, 0, 1, 0, 2]), {0: 1, 1: 5, 2: 0}, {0: 3, 1: 1, 2: 1}, rng(0))
        assert out.tolist() == [0, -1, 1, -1, -1]


class TestClassBalancedSwapIn(SwapInPolicyTests):
    def make(self):
        return ClassBalancedSwapIn()

    def test_refills_the_smallest_classes(self):
        # Without the 4 victims the EM holds {0: 6, 1: 2, 2: 5}: class 1 three times, then a tie 1/2.
        victims = np.zeros(4, np.int64)
        outs = set()
        for seed in range(30):
            out = self.make().choose(victims, {0: 100, 1: 100, 2: 100}, {0: 10, 1: 2, 2: 5}, rng(seed))
            assert out[:3].tolist() == [1, 1, 1]
            outs.add(int(out[3]))
        assert outs == {1, 2}

    def test_skips_classes_with_nothing_stored(self):
        out = self.make().choose(np.zeros(3, np.int64), {0: 50, 1: 1, 2: 50}, {0: 10, 1: 2, 2: 5}, rng(0))
        assert out.tolist() == [1, 2, 2]
        # A class the EM has never held counts as 0 samples.
        assert self.make().choose(np.array([0]), {0: 5, 9: 5}, {0: 5}, rng(0)).tolist() == [9]

    def test_moves_the_histogram_toward_balance(self):
        gen = rng(2)
        em = np.repeat([0, 1, 2], [40, 15, 5])
        spread = [np.ptp(np.bincount(em, minlength=3))]
        for _ in range(30):
            candidates = gen.choice(len(em), size=10, replace=False)
            victims = CarmSwapOut().select(
                candidates, em[candidates], np.full(10, -1, np.int8), np.zeros(10, np.float32),
                np.zeros(10, np.float32), ratio=0.5, rng=gen,
            )
            counts = dict(enumerate(np.bincount(em, minlength=3).tolist()))
            em[victims] = self.make().choose(em[victims], {0: 100, 1: 100, 2: 100}, counts, gen)
            spread.append(np.ptp(np.bincount(em, minlength=3)))
        assert all(b <= a for a, b in zip(spread, spread[1:])), spread
        assert spread[-1] <= 1, spread


class TestRandomSwapIn(SwapInPolicyTests):
    def make(self):
        return RandomSwapIn()

    def test_proportional_to_availability(self):
        n = 10000
        available = {0: 100_000, 1: 300_000, 2: 600_000}
        out = self.make().choose(np.zeros(n, np.int64), available, {0: n}, rng(0))
        share = np.bincount(out, minlength=3) / n
        # sd of each share is below 0.005; drawing without replacement barely changes it here.
        np.testing.assert_allclose(share, [0.1, 0.3, 0.6], atol=0.02)

    def test_stops_at_what_is_stored(self):
        out = self.make().choose(np.zeros(5, np.int64), {0: 2, 1: 1, 2: 0}, {0: 5}, rng(0))
        assert sorted(out[:3].tolist()) == [0, 0, 1] and out[3:].tolist() == [-1, -1]


# ---- registry and shared arithmetic ------------------------------------------------------------------
@pytest.mark.parametrize(
    "factory, known", [(make_admission, "reservoir"), (make_swap_out, "carm"), (make_swap_in, "same_class_random")]
)
def test_unknown_name_raises_naming_it_and_the_known_ones(factory, known):
    with pytest.raises(ValueError, match="no_such_policy") as err:
        factory("no_such_policy")
    assert known in str(err.value)


def test_unknown_option_raises_value_error():
    with pytest.raises(ValueError, match="carm"):
        make_swap_out("carm", temperature=2.0)


@pytest.mark.parametrize(
    "n, ratio, k", [(10, 0.3, 3), (100, 0.55, 55), (3, 1 / 3, 1), (7, 0.5, 4), (5, 0.0, 0), (5, 1.0, 5)]
)
def test_swap_count_reads_the_ratio_as_written(n, ratio, k):
    assert swap_count(n, ratio) == k


def test_docstring_examples_run():
    # pytest's testpaths leave carousel/ out of --doctest-modules, so run them from here.
    result = doctest.testmod(carousel.policies)
    assert result.attempted > 0 and result.failed == 0
