"""Stateful property test: each store against a dict, after every step (zarr's ``stateful.py`` way).

Hypothesis drives random sequences of put (new and replacing), delete, get, reopen and flush on a
real store on disk and on a trivially correct model; any divergence is a bug, shrunk to a minimal
sequence.
"""

import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from storage_backends import MissingIdsError, open_store
from tests.conformance.store_tests import SCHEMA, assert_batch_equal, make_batch

ID_POOL = st.integers(min_value=0, max_value=60)


class StoreVersusDict(RuleBasedStateMachine):
    url_template = ""

    @initialize()
    def open(self):
        self.dir = tempfile.mkdtemp(prefix="carousel-stateful-")
        self.url = self.url_template.format(path=f"{self.dir}/s")
        self.store = open_store(self.url, SCHEMA)
        self.model: dict[int, int] = {}  # id -> seed its content was made with
        self.version = 0

    def teardown(self):
        if hasattr(self, "store"):
            self.store.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    @rule(ids=st.lists(ID_POOL, min_size=1, max_size=20, unique=True))
    def put(self, ids):
        self.version += 1
        self.store.put_many(ids, make_batch(ids, seed=self.version))
        for i in ids:
            self.model[i] = self.version

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def delete(self, data):
        ids = data.draw(st.lists(st.sampled_from(sorted(self.model)), min_size=1, unique=True))
        self.store.delete_many(ids)
        for i in ids:
            del self.model[i]

    @rule(ids=st.lists(ID_POOL, min_size=1, max_size=10))
    def get(self, ids):
        missing = [i for i in ids if i not in self.model]
        if missing:
            try:
                self.store.get_many(ids)
            except MissingIdsError as err:
                assert sorted(set(err.ids.tolist())) == sorted(set(missing))
            else:
                raise AssertionError(f"get_many({ids}) did not raise for {missing}")
            return
        want = {k: np.concatenate([make_batch([i], seed=self.model[i])[k] for i in ids]) for k in SCHEMA}
        assert_batch_equal(self.store.get_many(ids), want)

    @rule()
    def reopen(self):
        self.store.close()
        self.store = open_store(self.url)

    @rule()
    def flush(self):
        self.store.flush()

    @invariant()
    def same_ids(self):
        if hasattr(self, "store"):
            assert self.store.ids().tolist() == sorted(self.model)
            assert len(self.store) == len(self.model)
            probe = np.arange(0, 61)
            assert self.store.contains(probe).tolist() == [int(i) in self.model for i in probe]


def _machine(template: str):
    cls = type(f"StoreVersusDict_{template.split(':')[0]}", (StoreVersusDict,), {"url_template": template})
    cls.TestCase.settings = settings(max_examples=50, stateful_step_count=25, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])
    return cls.TestCase


TestLMDBAgainstDict = _machine("lmdb://{path}?map_size=64KiB")
TestZarrAgainstDict = _machine("zarr://{path}?chunk=4&sync=0")
TestZarrZstdAgainstDict = _machine("zarr://{path}?chunk=8&codec=zstd")
TestFlatAgainstDict = _machine("flat://{path}?chunk=4&sync=0")
TestFilesAgainstDict = _machine("files://{path}?chunk=4&sync=0&inflight=4")
# Fewer examples: every reopen of a files store starts its own read loop and threads.
TestFilesAgainstDict.settings = settings(max_examples=25, stateful_step_count=25, deadline=None,
                                         suppress_health_check=[HealthCheck.too_slow])
