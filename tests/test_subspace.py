"""The subspace engine's algebra on random matrices, and the engine on a synthetic family."""
import math

import pytest
import torch

from factories import write_family
from safesub_core.errors import SafesubError
from safesub_core.loading import load_model
from safesub_core.family import Family
from safesub_core.linalg import as_matrix, cosine
from safesub_core.projection import ProjectionConfig
from safesub_core.subspace import (
    SubspaceEngine,
    TensorProjection,
    alignment_basis,
)



def projection_of(dA, dT, name="w"):
    """A one-tensor engine for dA, dT."""
    b = alignment_basis(as_matrix(dA), name)
    dA2, dT2 = as_matrix(dA), as_matrix(dT)
    t = TensorProjection(
        name=name, shape=tuple(dT.shape), U=b["U"], s=b["s"], Ur=b["Ur"], perm=b["perm"],
        C=b["U"].T @ dT2, Cr=b["Ur"].T @ dT2, dT=dT2, task_sq=float(dT2.double().pow(2).sum()),
        align_sq=float(dA2.double().pow(2).sum()), dot_align=float((dT2.double() * dA2.double()).sum()),
    )
    return Single(t)


class Single(SubspaceEngine):
    """A one-tensor engine with per-tensor shorthands for the algebra tests."""

    def __init__(self, t):
        super().__init__("f", "v", [t])
        self.t = t
        self.dT, self.U, self.Ur, self.perm = t.dT, t.U, t.Ur, t.perm

    def rank(self, cfg):
        return int(self.ranks(cfg)[0])

    def kept_update(self, cfg):
        return self.t.kept_update(cfg, self.rank(cfg))

    def energy_at(self, subspace, k):
        return float(self.cum[subspace][0, k - 1])


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("shape", [(12, 12), (20, 8), (8, 20)])
def test_projector_is_symmetric_and_idempotent(shape):
    U = alignment_basis(rand(*shape))["U"]
    for k in (1, 3, min(shape)):
        P = U[:, :k] @ U[:, :k].T
        assert torch.allclose(P, P.T, atol=1e-10)
        assert torch.allclose(P @ P, P, atol=1e-10)
        assert torch.linalg.matrix_rank(P) == k


@pytest.mark.parametrize("subspace", ["topk", "randomk", "random"])
def test_parallel_and_orthogonal_sum_to_the_task_update(subspace):
    t = projection_of(rand(16, 10), rand(16, 10, seed=1))
    for rho in (0.1, 0.5, 1.0):
        par = t.kept_update(ProjectionConfig(subspace, "parallel", rho))
        orth = t.kept_update(ProjectionConfig(subspace, "orthogonal", rho))
        assert torch.allclose(par + orth, t.dT, atol=1e-10)
        assert torch.allclose(t.kept_update(ProjectionConfig(subspace, "opposite", rho)), -par)
        assert abs(float((par * orth).sum())) < 1e-8  # orthogonal pieces


@pytest.mark.parametrize("shape", [(16, 10), (10, 16), (12, 12)])
@pytest.mark.parametrize("mode", ["parallel", "opposite", "orthogonal"])
@pytest.mark.parametrize("subspace", ["topk", "randomk", "random"])
def test_compose_writes_start_plus_alpha_times_the_kept_update(subspace, mode, shape):
    """The fused in-place composition (same dtype; past the middle rank, through the complement where the basis
    spans R^M) and the cast path (bfloat16) both give W_start + alpha X."""
    t = projection_of(rand(*shape), rand(*shape, seed=1))
    w_start = rand(*shape, seed=2)
    for rho, alpha in ((0.3, 1.0), (0.7, -0.5), (1.0, 2.5)):
        cfg = ProjectionConfig(subspace, mode, rho, alpha=alpha)
        assert t.t.spans_rows(cfg) == (shape[0] <= shape[1])
        expected = w_start + alpha * t.kept_update(cfg)
        out = torch.full_like(w_start, float("nan"))
        t.t.compose(out, w_start, cfg, t.rank(cfg))
        assert torch.allclose(out, expected, atol=1e-10)
        low = torch.zeros(*shape, dtype=torch.bfloat16)  # a bfloat16 model over float64 bases: X is cast
        t.t.compose(low, w_start.to(torch.bfloat16), cfg, t.rank(cfg))
        assert torch.allclose(low.double(), expected, rtol=2e-2, atol=2e-2)
        if (expected - w_start).abs().max() > 0.1:  # (orthogonal at full rank keeps nothing of a wide dT)
            assert not torch.allclose(low.double(), w_start, rtol=2e-2, atol=2e-2)  # the update did arrive


@pytest.mark.parametrize("shape", [(16, 10), (12, 12)])
@pytest.mark.parametrize("mode", ["parallel", "opposite", "orthogonal"])
@pytest.mark.parametrize("subspace", ["topk", "randomk", "random"])
def test_a_rank_move_lands_where_composing_anew_does(subspace, mode, shape):
    """From rank k0 to k (same subspace, mode, alpha) the weights move by |k - k0| directions, up or down; a move
    as costly as composing anew is declined and writes nothing."""
    t = projection_of(rand(*shape), rand(*shape, seed=1))
    w_start = rand(*shape, seed=2)
    out = torch.empty_like(w_start)
    cfg = ProjectionConfig(subspace, mode, 0.5, alpha=-1.5)
    k0 = t.rank(cfg)
    t.t.compose(out, w_start, cfg, k0)
    for k in (k0 + 2, k0 + 1, k0 + 3, k0):  # up two, down one, up two, down three
        assert t.t.move(out, cfg, k0, k)
        fresh = torch.empty_like(w_start)
        t.t.compose(fresh, w_start, cfg, k)
        assert torch.allclose(out, fresh, atol=1e-10)
        k0 = k
    before = out.clone()
    assert not t.t.move(out, cfg, k0, 1)  # more columns than composing rank 1 anew: declined
    assert torch.equal(out, before)
    assert not t.t.move(out.float(), cfg, k0, k0 + 1)  # not the bases' dtype: declined


@pytest.mark.parametrize("subspace", ["topk", "randomk"])
def test_a_zero_alignment_update_keeps_nothing_at_any_rank(subspace):
    """dA = 0 spans nothing: its zero basis must not be taken for a basis of R^M (the complement would keep dT)."""
    t = projection_of(torch.zeros(8, 12, dtype=torch.float64), rand(8, 12, seed=1))
    w_start = rand(8, 12, seed=2)
    for mode, kept in (("parallel", 0.0), ("orthogonal", 1.0)):
        cfg = ProjectionConfig(subspace, mode, 0.9)
        assert not t.t.spans_rows(cfg)
        out = torch.empty_like(w_start)
        t.t.compose(out, w_start, cfg, t.rank(cfg))
        assert torch.allclose(out, w_start + kept * t.dT, atol=1e-12)


def test_cumulative_energy_equals_explicit_projection_and_grows_with_k():
    dA, dT = rand(14, 14), rand(14, 14, seed=3)
    t = projection_of(dA, dT)
    U = torch.linalg.svd(dA)[0]
    energies = []
    for k in range(1, 15):
        explicit = float((U[:, :k] @ U[:, :k].T @ dT).pow(2).sum())
        assert math.isclose(t.energy_at("topk", k), explicit, rel_tol=1e-9)
        energies.append(t.energy_at("topk", k) / t.task_sq)
    assert all(b >= a - 1e-12 for a, b in zip(energies, energies[1:]))
    assert math.isclose(energies[-1], 1.0, rel_tol=1e-9)  # square full-rank update: full rank keeps everything


def test_tall_matrix_keeps_less_than_everything_at_full_rank():
    t = projection_of(rand(40, 4), rand(40, 4, seed=2))
    full = t.energy_at("topk", t.t.r) / t.task_sq
    assert full < 0.5  # span(U) is 4 of 40 dimensions


def test_randomk_uses_singular_vectors_of_the_alignment_update_and_random_does_not():
    t = projection_of(rand(10, 10), rand(10, 10, seed=1))
    k = 3
    Urk = t.U[:, t.perm[:k]]
    # Random-K's subspace is spanned by columns of U: projecting it onto span(U) changes nothing
    assert torch.allclose(t.U @ (t.U.T @ Urk), Urk, atol=1e-10)
    assert sorted(t.perm.tolist()) == list(range(10))
    explicit = float((Urk @ Urk.T @ t.dT).pow(2).sum())
    assert math.isclose(t.energy_at("randomk", k), explicit, rel_tol=1e-9)
    Ur = t.Ur[:, :k]
    assert torch.allclose(Ur.T @ Ur, torch.eye(k, dtype=Ur.dtype), atol=1e-10)
    assert not torch.allclose(Ur.abs(), t.U[:, :k].abs(), atol=1e-3)


def test_random_subspaces_are_seeded():
    a, b = alignment_basis(rand(8, 6), "x", seed=0), alignment_basis(rand(8, 6), "x", seed=0)
    c = alignment_basis(rand(8, 6), "x", seed=1)
    assert torch.equal(a["Ur"], b["Ur"]) and torch.equal(a["perm"], b["perm"])
    assert not torch.equal(a["Ur"], c["Ur"])


def test_vector_tensors_project_on_the_line_of_the_alignment_update():
    dA, dT = rand(9), rand(9, seed=4)
    t = projection_of(dA, dT)
    expected = (dT @ dA) / (dA @ dA) * dA
    for rho in (0.01, 1.0):
        assert torch.allclose(t.kept_update(ProjectionConfig("topk", "parallel", rho)), expected, atol=1e-10)
    zero = projection_of(torch.zeros(9, dtype=torch.float64), dT)
    assert zero.rank(ProjectionConfig(rank_fraction=None, energy=0.5)) == 1
    assert torch.count_nonzero(zero.kept_update(ProjectionConfig("topk", "parallel", 1.0))) == 0


def test_rank_by_energy_is_the_smallest_k_reaching_the_fraction():
    dA = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64))
    t = projection_of(dA, rand(4, 4))
    total = 9 + 4 + 1 + 0.25
    assert t.rank(ProjectionConfig(energy=9 / total, rank_fraction=None)) == 1
    assert t.rank(ProjectionConfig(energy=(9 + 4) / total + 1e-6, rank_fraction=None)) == 3
    assert t.rank(ProjectionConfig(energy=1.0, rank_fraction=None)) == 4
    assert t.rank(ProjectionConfig(rank_fraction=0.01)) == 1  # k = max(1, round(rho r))
    assert t.rank(ProjectionConfig(rank_fraction=0.5)) == 2


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(rank_fraction=0.0), "rank fraction 0.0"),
        (dict(rank_fraction=1.5), "rank fraction 1.5"),
        (dict(rank_fraction=None, energy=0.0), "energy fraction 0.0"),
        (dict(rank_fraction=None, energy=1.2), "energy fraction 1.2"),
        (dict(rank_fraction=None), "exactly one"),
        (dict(mode="sideways"), "mode 'sideways'"),
        (dict(subspace="bottomk"), "subspace 'bottomk'"),
    ],
)
def test_bad_projection_settings_get_one_line_errors(kw, message):
    with pytest.raises(SafesubError, match=message) as err:
        ProjectionConfig(**kw)
    assert "\n" not in str(err.value)


def test_cos_task_align_handles_a_negative_dot_product():
    # the study's code divided by sqrt(sum <dT, dA>), which is complex when the dot product is negative
    dA, dT = rand(6, 6), -rand(6, 6) * 0.5
    dT = dT - 2 * dA  # strongly anti-aligned
    expected = float((dT * dA).sum() / (dT.norm() * dA.norm()))
    t = projection_of(dA, dT)
    assert expected < 0
    assert math.isclose(t.diagnostics(ProjectionConfig()).cos_task_align, expected, rel_tol=1e-9)
    assert cosine(-3.0, 4.0, 9.0) == -0.5


# ------------------------------------------------------------------------------------------ the engine


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return Family.from_file(write_family(tmp_path_factory.mktemp("fam")))


@pytest.fixture(scope="module")
def engine(synthetic, tmp_path_factory):
    from safesub_core.cache import DiskCache

    return SubspaceEngine.build(synthetic, "harmful", cache=DiskCache(tmp_path_factory.mktemp("cache")))


def test_global_diagnostics_are_ratios_of_sums(engine):
    d = engine.diagnostics(ProjectionConfig("topk", "parallel", 0.25))
    df = d.per_tensor
    assert math.isclose(d.energy_kept, df.kept_energy.sum() / df.task_energy.sum(), rel_tol=1e-12)
    for row in df.itertuples():  # the vectorised lookup agrees with the cumulative sum of each tensor
        t = next(x for x in engine.tensors if x.name == row.tensor)
        assert math.isclose(row.kept_energy, float(t.cumulative_energy("topk")[row.rank - 1]), rel_tol=1e-12)
        assert row.rank == max(1, min(t.r, math.floor(0.25 * t.r + 0.5)))
    assert d.energy_kept != pytest.approx(df.energy_kept.mean(), rel=1e-3)  # not a mean of ratios
    assert math.isclose(d.cos_task_kept, math.sqrt(d.energy_kept), rel_tol=1e-9)  # <dT, P dT> = ||P dT||^2
    blocks = d.grouped("block")
    assert set(blocks["block"].dropna()) == {0, 1}
    assert math.isclose(blocks.task_energy.sum(), df.task_energy.sum(), rel_tol=1e-12)
    assert set(d.grouped("module")["module"]) >= {"q", "k", "v", "o", "gate", "up", "down", "embed", "norm"}


def test_orthogonal_mode_keeps_the_complement(engine):
    for sub in ("topk", "randomk", "random"):
        par = engine.diagnostics(ProjectionConfig(sub, "parallel", 0.3)).energy_kept
        orth = engine.diagnostics(ProjectionConfig(sub, "orthogonal", 0.3)).energy_kept
        assert math.isclose(par + orth, 1.0, rel_tol=1e-9)


def test_curves_match_pointwise_diagnostics_and_topk_beats_random_on_low_rank_updates(engine):
    curves = engine.curves([0.1, 0.5, 1.0])
    for _, row in curves.iterrows():
        d = engine.diagnostics(ProjectionConfig(row.subspace, row["mode"], row.rank_fraction))
        assert math.isclose(row.energy_kept, d.energy_kept, rel_tol=1e-9, abs_tol=1e-12)
    par = curves[curves["mode"] == "parallel"].set_index(["subspace", "rank_fraction"]).energy_kept
    for sub in ("topk", "randomk", "random"):
        values = [par[(sub, r)] for r in (0.1, 0.5, 1.0)]
        assert values == sorted(values)


def test_apply_composes_the_projected_model_in_memory(synthetic, engine):
    model = _load(synthetic, "aligned")
    reference = _load(synthetic, "aligned")
    cfg = ProjectionConfig("topk", "orthogonal", 0.5, alpha=0.7)
    engine.apply(model, reference, cfg)
    p = dict(model.named_parameters())
    r = dict(reference.named_parameters())
    for t, k in zip(engine.tensors, engine.ranks(cfg).tolist()):
        assert torch.allclose(p[t.name], r[t.name] + 0.7 * t.kept_update(cfg, k).float(), atol=1e-6)
    # alpha = 1 in orthogonal mode at full rank of a square update recovers most of the fine-tune
    full = ProjectionConfig("topk", "parallel", 1.0)
    engine.apply(model, reference, ProjectionConfig("topk", "orthogonal", 1.0, alpha=0.0))
    assert all(torch.equal(p[n], r[n]) for n in r)
    assert engine.diagnostics(full).energy_kept > 0.5


def test_apply_from_a_nearby_rank_moves_the_weights_to_the_same_model(synthetic, engine, monkeypatch):
    model, reference = _load(synthetic, "aligned"), _load(synthetic, "aligned")
    at = ProjectionConfig("randomk", "orthogonal", 0.3, alpha=0.7)
    engine.apply(model, reference, at)
    composed = []
    monkeypatch.setattr(type(engine.tensors[0]), "compose",
                        lambda self, *a, real=type(engine.tensors[0]).compose: composed.append(1) or real(self, *a))
    to = ProjectionConfig("randomk", "orthogonal", 0.35, alpha=0.7)
    engine.apply(model, reference, to, applied=at)
    moved = len(engine.tensors) - len(composed)
    assert moved > 0  # the matrices whose rank changed by fewer columns than composing costs were moved
    fresh = engine.apply(_load(synthetic, "aligned"), reference, to)
    for (n, p), q in zip(model.named_parameters(), fresh.parameters()):
        assert torch.allclose(p, q, atol=1e-6), n
    composed.clear()
    engine.apply(model, reference, ProjectionConfig("randomk", "orthogonal", 0.35, alpha=0.2), applied=to)
    assert len(composed) == len(engine.tensors)  # another alpha: composed anew


def _load(family, name):
    return load_model(family.checkpoint(name), family, tokenizer=False)[0]


def test_engine_reuses_the_cached_alignment_basis(synthetic, tmp_path, monkeypatch):
    import safesub_core.subspace as sub
    from safesub_core.cache import DiskCache

    cache = DiskCache(tmp_path)
    a = SubspaceEngine.build(synthetic, "useful", cache=cache)
    monkeypatch.setattr(sub, "_svd_basis", lambda *a, **k: pytest.fail("recomputed an SVD of dA"))
    b = SubspaceEngine.build(synthetic, "harmful", cache=cache)
    assert torch.equal(a.tensors[3].U, b.tensors[3].U) and torch.equal(a.tensors[3].Ur, b.tensors[3].Ur)
    entries = cache.info().set_index("namespace")["entries"]
    assert entries["alignment_basis"] == 1 and entries["task_coords"] == 2  # one group per variant: a small model
    assert entries["random_basis"] == 1 and entries["random_coords"] == 2


def test_a_new_draw_reuses_what_no_draw_changes(synthetic, tmp_path, monkeypatch):
    """A second seed computes its random basis and coordinates only: the SVD of dA and the Top-K coordinates
    come from the cache, and its Top-K numbers are those of the first draw while its random ones differ."""
    import safesub_core.subspace as sub
    from safesub_core.cache import DiskCache

    cache = DiskCache(tmp_path)
    a = SubspaceEngine.build(synthetic, "useful", cache=cache, seed=0)
    monkeypatch.setattr(sub, "_svd_basis", lambda *a, **k: pytest.fail("recomputed an SVD of dA"))
    b = SubspaceEngine.build(synthetic, "useful", cache=cache, seed=1)
    entries = cache.info().set_index("namespace")["entries"]
    assert entries["alignment_basis"] == 1 and entries["task_coords"] == 1
    assert entries["random_basis"] == 2 and entries["random_coords"] == 2
    for ta, tb in zip(a.tensors, b.tensors):
        assert torch.equal(ta.U, tb.U) and torch.equal(ta.C, tb.C)
    top, rnd = ProjectionConfig("topk", "parallel", 0.3), ProjectionConfig("random", "parallel", 0.3)
    assert a.diagnostics(top).energy_kept == b.diagnostics(top).energy_kept
    assert a.diagnostics(rnd).energy_kept != b.diagnostics(rnd).energy_kept


def test_random_basis_is_orthonormal_and_uniform_in_distribution():
    """Q of a Gaussian's QR with R's diagonal made positive is Haar: the squared norm of a fixed unit vector's
    projection on a random k-subspace of R^M has mean k / M (averaged over many draws)."""
    from safesub_core.subspace import random_basis

    M, N, k = 12, 5, 3
    draws = [random_basis(M, N, "w", seed, dtype=torch.float64)["Ur"] for seed in range(400)]
    for Ur in draws[:5]:
        assert Ur.shape == (M, N) and torch.allclose(Ur.T @ Ur, torch.eye(N, dtype=Ur.dtype), atol=1e-12)
    e = torch.zeros(M, dtype=torch.float64)
    e[0] = 1.0
    kept = torch.tensor([float((Ur[:, :k].T @ e).pow(2).sum()) for Ur in draws])
    assert abs(float(kept.mean()) - k / M) < 4 * float(kept.std()) / 400 ** 0.5
    wide = random_basis(4, 9, "w", 0)
    assert wide["Ur"].shape == (4, 4) and sorted(wide["perm"].tolist()) == [0, 1, 2, 3]


def test_groups_of_tensors_respect_the_byte_limit():
    from safesub_core.subspace import _chunks

    shapes = {"a": (10, 10), "b": (10, 10), "c": (40, 10), "d": (7,)}
    assert _chunks(list(shapes), shapes.get, 1 << 30) == [["a", "b", "c", "d"]]
    one = 4 * 2 * (10 * 10 + 10 * 10)
    assert _chunks(list(shapes), shapes.get, one) == [["a"], ["b"], ["c"], ["d"]]  # c alone exceeds: its own group


def test_streamed_engine_matches_the_resident_one(synthetic, engine, tmp_path, monkeypatch):
    from safesub_core.cache import DiskCache

    import safesub_core.subspace as sub

    monkeypatch.setattr(sub, "CHUNK_BYTES", 20_000)  # several groups, streamed one at a time
    streamed = SubspaceEngine.build(synthetic, "harmful", cache=DiskCache(tmp_path), resident_bytes=0)
    assert DiskCache(tmp_path).info().set_index("namespace")["entries"]["alignment_basis"] > 3
    assert not any(t.resident for t in streamed.tensors)
    for cfg in (ProjectionConfig("topk", "parallel", 0.3), ProjectionConfig("random", "orthogonal", None, 0.9)):
        assert streamed.diagnostics(cfg).summary() == engine.diagnostics(cfg).summary()
    cfg = ProjectionConfig("randomk", "orthogonal", 0.4, alpha=1.5)
    m1, m2, ref = (_load(synthetic, "aligned") for _ in range(3))
    engine.apply(m1, ref, cfg)
    streamed.apply(m2, ref, cfg)
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters()):
        assert torch.equal(p1, p2), n


def test_unknown_variant_is_named(synthetic):
    with pytest.raises(SafesubError, match="no fine-tuned variant 'nope'"):
        SubspaceEngine.build(synthetic, "nope")


def test_checkpoints_are_read_in_blocks_of_rows_with_the_same_values(synthetic, monkeypatch):
    """Block reading (TensorReader.get, get_rows, difference; the engine's sums) gives exactly the whole-tensor values."""
    from safetensors import safe_open

    import safesub_core.linalg as linalg
    from safesub_core.subspace import _update_sums

    monkeypatch.setattr(linalg, "READ_BLOCK", 50)  # several blocks per tensor, most of them not whole rows of a vector
    ft, start, base = synthetic.reader("harmful"), synthetic.reader("aligned"), synthetic.reader("base")
    with safe_open(synthetic.aligned.weight_files()[0], framework="pt") as fh:
        whole = {n: fh.get_tensor(n).float() for n in start.names()}
    for n in start.names():
        w_ft, w_start, w_base = ft.get(n), start.get(n), base.get(n)
        assert torch.equal(w_start, whole[n]), n
        assert torch.equal(start.get_rows(n, 1, 3), whole[n][1:3]), n
        assert torch.equal(ft.difference(start, n), w_ft - w_start), n
        # the sums over `step` elements at a time, as computed from whole tensors
        f, a, b = w_ft.reshape(-1), w_start.reshape(-1), w_base.reshape(-1)
        task = align = dot = 0.0
        for i in range(0, a.numel(), 37):
            x, y = (f[i:i + 37] - a[i:i + 37]).double(), (a[i:i + 37] - b[i:i + 37]).double()
            task, align, dot = task + float(x.pow(2).sum()), align + float(y.pow(2).sum()), dot + float((x * y).sum())
        dT = torch.empty(w_ft.shape)
        assert _update_sums(ft, start, base, n, dT, step=37) == (task, align, dot), n
        assert torch.equal(dT, w_ft - w_start), n


def test_the_build_never_reads_a_whole_tensor(synthetic, engine, tmp_path, monkeypatch):
    """Memory: the checkpoints are read a block of rows at a time, never as whole tensors, and the result is the same."""
    from safesub_core.cache import DiskCache
    from safesub_core.checkpoints import TensorReader

    monkeypatch.setattr(TensorReader, "get", lambda self, name: pytest.fail(f"read {name} whole"))
    again = SubspaceEngine.build(synthetic, "harmful", cache=DiskCache(tmp_path))
    for cfg in (ProjectionConfig("topk", "parallel", 0.3), ProjectionConfig("random", "orthogonal", None, 0.9)):
        assert again.diagnostics(cfg).summary() == engine.diagnostics(cfg).summary()
    for a, b in zip(again.tensors, engine.tensors):
        assert all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("U", "Ur", "C", "Cr", "dT")), a.name
