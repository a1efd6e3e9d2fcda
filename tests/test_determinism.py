"""The same inputs give identical results from run to run (seeds fixed: subspaces seed 0, maps seed 0)."""
import torch

from factories import write_family
from safesub_core.cache import DiskCache
from safesub_core.family import Family
from safesub_core.overlap import weight_overlap
from safesub_core.projection import ProjectionConfig
from safesub_core.subspace import SubspaceEngine


def test_engine_and_overlap_are_bitwise_reproducible_with_fresh_caches(tmp_path):
    family = Family.from_file(write_family(tmp_path / "fam"))
    runs = []
    for i in range(2):
        cache = DiskCache(tmp_path / f"cache{i}")
        engine = SubspaceEngine.build(family, "harmful", cache=cache)
        diag = [engine.diagnostics(ProjectionConfig(s, "parallel", 0.3)).summary()
                for s in ("topk", "randomk", "random")]
        runs.append((engine, diag, weight_overlap(family, energies=(0.5, 0.9), cache=cache)))
    (e1, d1, o1), (e2, d2, o2) = runs
    assert d1 == d2
    assert o1.equals(o2)
    for t1, t2 in zip(e1.tensors, e2.tensors):
        assert torch.equal(t1.Ur, t2.Ur) and torch.equal(t1.perm, t2.perm) and torch.equal(t1.C, t2.C)


def test_a_different_seed_gives_different_random_subspaces(tmp_path):
    family = Family.from_file(write_family(tmp_path / "fam"))
    a = SubspaceEngine.build(family, "harmful", cache=DiskCache(tmp_path / "a"), seed=0)
    b = SubspaceEngine.build(family, "harmful", cache=DiskCache(tmp_path / "b"), seed=1)
    assert torch.equal(a.tensors[2].U, b.tensors[2].U)  # Top-K does not depend on the seed
    assert not torch.equal(a.tensors[2].Ur, b.tensors[2].Ur)
