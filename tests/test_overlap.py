"""Mode subspace overlap: its algebra and the weight-space tables on a synthetic family."""
import math

import pytest
import torch

import yaml

from factories import random_model, write_family
from safesub_core.errors import SafesubError
from safesub_core.family import Family
from safesub_core.linalg import Basis, LazyRows, as_matrix, energy_rank
from safesub_core.overlap import (
    overlap_curve,
    no_pairs_message,
    overlap_summary,
    random_subspace_overlap,
    reference_pairs,
    seed_pairs,
    subspace_overlap,
    weight_overlap,
)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_overlap_of_a_subspace_with_itself_is_one_and_with_an_orthogonal_one_zero():
    X = rand(20, 7)
    assert subspace_overlap(X, X, 0.9) == pytest.approx(1.0, abs=1e-9)
    assert subspace_overlap(X, 3 * X @ rand(7, 5, seed=1), 0.99) == pytest.approx(1.0, abs=1e-9)
    Y = torch.zeros(20, 7, dtype=torch.float64)
    Y[10:] = rand(10, 7, seed=2)
    X[10:] = 0
    assert subspace_overlap(X, Y, 0.9) == pytest.approx(0.0, abs=1e-12)


def test_random_subspaces_overlap_near_the_baseline_max_k_over_d():
    d, kx, ky = 64, 8, 16
    values = [random_subspace_overlap(d, kx, ky, seed=s) for s in range(200)]
    assert sum(values) / len(values) == pytest.approx(max(kx, ky) / d, rel=0.08)


def test_curve_reports_ranks_and_baseline_and_stays_in_unit_interval():
    a, b = Basis.of(rand(30, 30)), Basis.of(rand(30, 30, seed=1))
    curve = overlap_curve(a, b, [0.1, 0.5, 0.99])
    assert list(curve.columns) == ["energy", "k_x", "k_y", "mso", "random_baseline"]
    assert ((curve.mso >= 0) & (curve.mso <= 1 + 1e-12)).all()
    for _, row in curve.iterrows():
        assert row.k_x == energy_rank(a.s, row.energy)
        assert row.random_baseline == max(row.k_x, row.k_y) / 30
        explicit = (a.U[:, : int(row.k_x)].T @ b.U[:, : int(row.k_y)]).pow(2).sum() / min(row.k_x, row.k_y)
        assert row.mso == pytest.approx(float(explicit), rel=1e-9)


def test_bases_in_different_spaces_are_refused():
    with pytest.raises(SafesubError, match="not the same space"):
        overlap_curve(Basis.of(rand(5, 3)), Basis.of(rand(6, 3)))
    with pytest.raises(SafesubError, match="energy fraction 0"):
        energy_rank(torch.ones(3), 0)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return Family.from_file(write_family(tmp_path_factory.mktemp("fam")))


def test_weight_overlap_tables(family, tmp_path):
    from safesub_core.cache import DiskCache

    cache = DiskCache(tmp_path)
    table = weight_overlap(family, "aligned", energies=(0.5, 0.9), cache=cache)
    assert set(table.scope) == {"tensor", "block-write", "block-read"}
    assert set(table.pair) == {"harmful-A vs useful-A", "harmful-A vs base-A", "useful-A vs base-A"}
    assert ((table.mso >= 0) & (table.mso <= 1 + 1e-9)).all()
    write = table[(table.scope == "block-write") & (table.unit == "0")]
    assert (write.random_baseline * 32 == write[["k_x", "k_y"]].max(axis=1)).all()  # d = hidden = 32
    # the harmful and contaminated updates share nothing by construction (independent random updates)
    summary = overlap_summary(table)
    assert len(summary) == 3 * 3 * 2
    again = weight_overlap(family, "aligned", energies=(0.5, 0.9), cache=cache,
                           progress=lambda *a: pytest.fail("recomputed a cached overlap"))
    assert again.equals(table)
    s_table = weight_overlap(family, "safety_tuned", energies=(0.9,), cache=cache)
    assert set(s_table.pair) == {"harmful-S vs useful-S", "harmful-S vs base-S", "useful-S vs base-S"}


def test_weight_overlap_of_an_update_with_itself_is_one(family, tmp_path):
    from safesub_core.cache import DiskCache

    table = weight_overlap(family, "aligned", energies=(0.9,), pairs=[("useful", "useful")], cache=DiskCache(tmp_path))
    assert table.mso.to_numpy() == pytest.approx(1.0, abs=1e-9)
    assert math.isfinite(table.mso.sum())


def test_weight_overlap_reads_blocks_of_rows_and_matches_whole_tensors(family, tmp_path, monkeypatch):
    """Memory: the updates are formed a block of rows at a time (never a whole tensor read), with the same values."""
    from safesub_core.cache import DiskCache
    from safesub_core.checkpoints import TensorReader

    ref, useful, base = family.reader("aligned"), family.reader("useful"), family.reader("base")
    whole = {n: (as_matrix(useful.get(n) - ref.get(n)), as_matrix(base.get(n) - ref.get(n)))
             for n in ref.names() if len(ref.shape(n)) == 2}
    monkeypatch.setattr(TensorReader, "get", lambda self, name: pytest.fail(f"read {name} whole"))
    table = weight_overlap(family, "aligned", pairs=[("useful", "base")], cache=DiskCache(tmp_path))
    for n, (x, y) in whole.items():
        rows = table[(table.scope == "tensor") & (table.unit == n)].reset_index(drop=True)
        expected = overlap_curve(Basis.of(x), Basis.of(y))
        assert rows[list(expected.columns)].equals(expected), n


@pytest.mark.parametrize("shape", [(300, 20), (30, 20)])  # tall (one-sided route) and not (full SVD)
def test_a_basis_of_lazily_read_rows_equals_the_basis_of_the_matrix(shape):
    """The overlap reads a tensor of its own a block of rows at a time (float64 blocks); the basis is the same."""
    X = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    reads = []
    lazy = LazyRows(shape, lambda i, j: reads.append((i, j)) or X[i:j].double())
    a, b = Basis.of(lazy), Basis.of(X)
    assert torch.equal(a.U, b.U) and torch.equal(a.s, b.s)
    assert reads and all(j <= shape[0] for _, j in reads)


@pytest.mark.parametrize("rank", [None, 3])  # full rank, and rank-deficient (no conditioning needed)
def test_a_wide_basis_by_the_qr_route_equals_the_svd(rank, monkeypatch):
    """A wide X (d < n) takes U from the SVD of R^T, X^T = Q R, read a block of columns at a time: the same
    singular values and subspaces as torch.linalg.svd of X, whether X is a tensor or read lazily by rows."""
    import safesub_core.linalg as linalg

    d, n = 24, 500
    X = rand(d, n) if rank is None else rand(d, rank) @ rand(rank, n, seed=1)
    k = d if rank is None else rank  # the spanned directions, compared sign-free through their projectors
    monkeypatch.setattr(linalg, "_block", lambda width: 4 * width)  # 96 columns a block: several blocks
    U, s, _ = torch.linalg.svd(X, full_matrices=False)
    svd, shapes = torch.linalg.svd, []
    monkeypatch.setattr(torch.linalg, "svd", lambda A, **kw: shapes.append(tuple(A.shape)) or svd(A, **kw))
    for basis in (Basis.of(X), Basis.of(X.float()), Basis.of(LazyRows((d, n), lambda i, j: X[i:j]))):
        assert basis.U.shape == (d, d) and basis.s.shape == (d,) and basis.U.dtype == torch.float64
        assert torch.allclose(basis.s, s, atol=1e-5 * float(s[0]))
        assert torch.allclose(basis.U.T @ basis.U, torch.eye(d, dtype=torch.float64), atol=1e-10)
        assert torch.allclose(basis.U[:, :k] @ basis.U[:, :k].T, U[:, :k] @ U[:, :k].T, atol=1e-5)
    assert shapes == [(d, d)] * 3  # only R^T's SVD: X's right singular vectors are never formed
    exact = Basis.of(X)
    assert torch.allclose(exact.s, s, atol=1e-10 * float(s[0]))
    assert torch.allclose(exact.U[:, :k] @ exact.U[:, :k].T, U[:, :k] @ U[:, :k].T, atol=1e-9)


@torch.no_grad()
def _offset_family(root, offset_scale: float):
    """base; safety = base + S; aligned = safety + O (the offset A - S, rank 4); harmful = aligned + H,
    useful = aligned + U (independent rank-8 updates); harmful_s = safety + H, useful_s = safety + U."""
    base = random_model(0)
    sd = {n: p.clone() for n, p in base.state_dict().items()}
    g = torch.Generator().manual_seed(7)

    def low_rank(shape, rank=8):
        return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / rank

    mats = [n for n, p in sd.items() if p.dim() == 2]
    O = {n: offset_scale * low_rank(sd[n].shape, rank=4) for n in mats}  # the offset A - S
    H = {n: low_rank(sd[n].shape) for n in mats}
    U = {n: low_rank(sd[n].shape) for n in mats}
    S = {n: low_rank(sd[n].shape, rank=4) for n in mats}
    A = {n: S[n] + O[n] for n in mats}
    models = dict(base={}, aligned=A, safety=S, harmful={n: A[n] + H[n] for n in mats},
                  useful={n: A[n] + U[n] for n in mats}, harmful_s={n: S[n] + H[n] for n in mats},
                  useful_s={n: S[n] + U[n] for n in mats})
    for name, delta in models.items():
        m = random_model(0)
        m.load_state_dict({n: p + delta.get(n, 0) for n, p in sd.items()})
        m.save_pretrained(root / name, safe_serialization=True)
    (root / "family.yaml").write_text(yaml.safe_dump(dict(
        name="offset", base="base", aligned="aligned", safety_tuned="safety", variants=dict(harmful="harmful",
        useful="useful"), safety_variants=dict(harmful_s="harmful_s", useful_s="useful_s"))))
    return Family.from_file(root / "family.yaml"), H, U, O


def test_the_s_pairs_use_the_s_started_variants_and_avoid_the_shared_offset(tmp_path):
    """Two independent rank-8 updates overlap little; add the same offset of about their norm to both and their
    overlap jumps. Measured from S, variants fine-tuned from A carry A - S: the S panel must pair the S-started
    variants instead, and pairing the A-started ones relative to S is refused."""
    from safesub_core.cache import DiskCache

    family, H, U, A = _offset_family(tmp_path, offset_scale=1.0)
    name = "model.layers.0.self_attn.o_proj.weight"
    clean = subspace_overlap(H[name], U[name], 0.9)
    confounded = subspace_overlap(H[name] + A[name], U[name] + A[name], 0.9)
    assert confounded > clean + 0.3  # the offset inflates the overlap by construction

    assert reference_pairs(family, "safety_tuned") == [("harmful_s", "useful_s"), ("harmful_s", "base"),
                                                       ("useful_s", "base")]
    assert reference_pairs(family, "aligned") == [("harmful", "useful"), ("harmful", "base"), ("useful", "base")]
    cache = DiskCache(tmp_path / "cache")
    s_table = weight_overlap(family, "safety_tuned", energies=(0.9,), cache=cache)
    assert set(s_table.pair) == {"harmful-S vs useful-S", "harmful-S vs base-S", "useful-S vs base-S"}
    a_table = weight_overlap(family, "aligned", energies=(0.9,), cache=cache)
    tensor = lambda t: t[(t.scope == "tensor") & (t.pair.str.startswith("harmful")) & (t.pair.str.contains("useful"))]
    s_mso = tensor(s_table).set_index("unit").mso
    a_mso = tensor(a_table).set_index("unit").mso
    # harmful_s - S = H and useful_s - S = U, the same updates as harmful - A and useful - A: the same overlap
    assert s_mso.to_numpy() == pytest.approx(a_mso.loc[s_mso.index].to_numpy(), abs=1e-6)
    assert s_mso[name] == pytest.approx(clean, abs=1e-6) and s_mso[name] < confounded - 0.3
    with pytest.raises(SafesubError, match="harmful is fine-tuned from aligned, not safety_tuned.*offset "
                                           "aligned - safety_tuned") as err:
        weight_overlap(family, "safety_tuned", energies=(0.9,), pairs=[("harmful", "useful")], cache=cache)
    assert "\n" not in str(err.value)


def test_a_family_without_s_started_variants_has_no_s_panel(tmp_path):
    family = Family.from_file(write_family(tmp_path, safety_variants=()))
    assert reference_pairs(family, "safety_tuned") == []
    with pytest.raises(SafesubError, match="S panels need variants fine-tuned from the safety-tuned model"):
        weight_overlap(family, "safety_tuned", energies=(0.9,))
    assert no_pairs_message("safety_tuned").startswith("S panels need variants fine-tuned from the safety-tuned")


def test_seed_pairs_pair_each_task_with_its_second_seed(tmp_path):
    family = Family.from_file(write_family(tmp_path, variants=("useful", "harmful", "useful_seed1", "harmful_seed1"),
                                           safety=False))
    assert seed_pairs(family, "aligned") == [("harmful", "harmful_seed1"), ("useful", "useful_seed1"),
                                             ("harmful_seed1", "useful_seed1")]
    assert seed_pairs(family, "safety_tuned") == []
