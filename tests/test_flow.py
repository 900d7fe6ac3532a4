"""The per-token flow map (dd.flow): exact in distribution, deterministic, row-independent, safe inputs.

Exactness check: the total variation (TV) between the token frequencies of n noise draws and p must not
exceed the 99.9th percentile of the TV of n draws taken from p directly (simulated multinomial, fixed
seed). A solver with a visible bias fails it: test_coarse_solver_is_detected shows the check catching
8 uniform Euler steps.
"""
import numpy as np
import pytest
import torch

from dd.flow import time_grid, tokens_from_noise


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The solver runs many small batched matrix-vector products; on a busy 2-core machine thread
    # hand-offs made them ~30x slower than one thread. Restored for the other test modules.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_codebook(v, c, unit, seed):
    gen = torch.Generator().manual_seed(seed)
    codebook = torch.randn(v, c, generator=gen)
    if unit:  # LlamaGen: l2-normalised codes
        return codebook / codebook.norm(dim=1, keepdim=True)
    return codebook * torch.exp(0.5 * torch.randn(v, 1, generator=gen))  # VAR: arbitrary norms


def make_probs(v, scale, top_k, seed):
    logits = scale * torch.randn(v, generator=torch.Generator().manual_seed(seed))
    if top_k is not None:
        logits[logits < logits.topk(top_k).values[-1]] = -float("inf")
    return torch.softmax(logits.double(), 0).float()


def noise(n, c, seed):
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed))


def tv_to(index, p):
    freq = torch.bincount(index, minlength=p.numel()).double() / index.numel()
    return 0.5 * float((freq - p.double()).abs().sum())


def tv_threshold(p, n, reps=2000, quantile=0.999):
    """The `quantile` of TV(empirical, p) over `reps` simulated samples of n draws from p itself."""
    p64 = p.double().numpy()
    counts = np.random.default_rng(0).multinomial(n, p64 / p64.sum(), size=reps)
    return float(np.quantile(0.5 * np.abs(counts / n - p64).sum(axis=1), quantile))


def assert_exact(p, codebook, n, seed=1, **solver):
    index, embedding = tokens_from_noise(noise(n, codebook.shape[1], seed), p.expand(n, -1), codebook, **solver)
    assert index.dtype == torch.int64 and index.shape == (n,)
    assert torch.equal(embedding, codebook[index])
    assert (p[index] > 0).all(), "a code with p_j = 0 was returned"
    tv, limit = tv_to(index, p), tv_threshold(p, n)
    assert tv <= limit, f"TV {tv:.5f} above the sampling-noise limit {limit:.5f} for n = {n}"


@pytest.mark.parametrize("unit,c", [pytest.param(False, 32, id="c32-random"), pytest.param(True, 8, id="c8-unit")])
def test_exact_near_uniform_16_codes(unit, c):
    assert_exact(make_probs(16, 0.1, None, seed=2), make_codebook(16, c, unit, seed=3), n=100_000)


def test_exact_peaked():
    p = make_probs(32, 3.0, None, seed=4)
    assert p.max() > 0.3
    assert_exact(p, make_codebook(32, 8, True, seed=5), n=50_000)


def test_exact_sparse_top_k():
    assert_exact(make_probs(1024, 1.0, 20, seed=6), make_codebook(1024, 32, False, seed=7), n=50_000)


def test_exact_llamagen_size_unit_codebook_top_k():
    assert_exact(make_probs(16384, 1.0, 32, seed=8), make_codebook(16384, 8, True, seed=9), n=20_000)


def test_exact_var_size_random_codebook_top_k():
    assert_exact(make_probs(4096, 1.0, 32, seed=10), make_codebook(4096, 32, False, seed=11), n=30_000)


def test_coarse_solver_is_detected():
    # The same check must fail for a solver known to be biased: 8 Euler steps on a uniform grid.
    p, codebook, n = make_probs(16, 0.1, None, seed=2), make_codebook(16, 32, False, seed=3), 100_000
    index, _ = tokens_from_noise(noise(n, 32, 1), p.expand(n, -1), codebook, solver="euler", schedule="uniform", steps=8)
    assert tv_to(index, p) > 2 * tv_threshold(p, n)


def test_fixed_grid_solvers_converge():
    p, codebook, n = make_probs(16, 0.1, None, seed=2), make_codebook(16, 8, True, seed=3), 5000
    eps = noise(n, 8, 1)
    reference, _ = tokens_from_noise(eps, p.expand(n, -1), codebook, tol=1e-4)
    for solver in ("euler", "dpm2m"):
        index, _ = tokens_from_noise(eps, p.expand(n, -1), codebook, solver=solver, steps=512, t_min=1e-4)
        assert (index != reference).double().mean() < 2e-3, solver


def test_order_3_takes_fewer_evaluations_than_order_2(monkeypatch):
    """The default adaptive solver (order 3, Adams AB2/AM3) against the trapezoid rule without history
    (order 2) at the same tol: both agree with a tight reference solve of the same noise, and order 3 needs
    well under 0.7 of the posterior evaluations (about half in benchmarks/RESULTS.md)."""
    import dd.flow as flow

    p, codebook, n = make_probs(2048, 1.0, 1000, seed=40), make_codebook(2048, 8, True, seed=41), 2000
    eps, probs = noise(n, 8, 42), p.expand(n, -1)
    reference, _ = tokens_from_noise(eps, probs, codebook, tol=1e-6)
    real_posterior, row_evaluations = flow._Rows.posterior, {}
    for order in (2, 3):
        count = [0]

        def counting(self, y, mu, need_top=None, count=count):
            count[0] += y.shape[0]
            return real_posterior(self, y, mu, need_top)

        monkeypatch.setattr(flow._Rows, "posterior", counting)
        index, _ = tokens_from_noise(eps, probs, codebook, order=order)
        row_evaluations[order] = count[0]
        assert (index != reference).double().mean() < 5e-3, order
    assert row_evaluations[3] < 0.7 * row_evaluations[2], row_evaluations


def test_deterministic_and_chunk_independent():
    p, codebook = make_probs(512, 1.0, 40, seed=12), make_codebook(512, 8, True, seed=13)
    eps, probs = noise(3000, 8, 14), p.expand(3000, -1)
    first, _ = tokens_from_noise(eps, probs, codebook)
    again, _ = tokens_from_noise(eps.clone(), probs.clone(), codebook.clone())
    chunked, _ = tokens_from_noise(eps[:300], probs[:300], codebook, chunk_elements=40 * 9 * 7)  # 7 rows a chunk: K (C + 1) elements a row
    assert torch.equal(first, again) and torch.equal(first[:300], chunked)


def test_gpu_style_full_searches_give_the_same_tokens(monkeypatch):
    """posterior() searches the top code on candidate rows only on the CPU and on every row elsewhere (no
    sync on a GPU); both ways must give the same tokens, for the adaptive and the fixed-grid solvers. Run
    here on the CPU by switching the row selection off."""
    import dd.flow as flow

    p, codebook = make_probs(512, 1.0, 40, seed=30), make_codebook(512, 8, True, seed=31)
    eps, probs = noise(2000, 8, 32), p.expand(2000, -1)
    selected = [tokens_from_noise(eps, probs, codebook, solver=s)[0] for s in ("adaptive", "dpm2m")]
    monkeypatch.setattr(flow, "SELECT_ROWS_ON", ())
    full = [tokens_from_noise(eps, probs, codebook, solver=s)[0] for s in ("adaptive", "dpm2m")]
    assert all(torch.equal(a, b) for a, b in zip(selected, full))


def test_row_result_does_not_depend_on_other_rows():
    v, c, n = 256, 32, 200
    codebook = make_codebook(v, c, False, seed=15)
    gen = torch.Generator().manual_seed(16)
    # Every row its own p with its own support size, so batch padding differs from a single row's.
    probs = torch.stack([make_probs(v, 2.0, int(k), seed=100 + i)
                         for i, k in enumerate(torch.randint(1, 60, (n,), generator=gen))])
    eps = noise(n, c, 17)
    together, _ = tokens_from_noise(eps, probs, codebook)
    alone = torch.cat([tokens_from_noise(eps[i:i + 1], probs[i:i + 1], codebook)[0] for i in range(n)])
    shuffled = torch.randperm(n, generator=gen)
    reordered, _ = tokens_from_noise(eps[shuffled], probs[shuffled], codebook)
    assert torch.equal(together, alone)
    assert torch.equal(together[shuffled], reordered)
    assert (probs.gather(1, together.unsqueeze(1)) > 0).all()


def test_zero_probability_codes_never_chosen():
    v, n = 64, 20_000
    codebook = make_codebook(v, 8, True, seed=18)
    p = torch.zeros(v)
    p[::7] = 1.0  # every 7th code, interleaved with p = 0 codes that lie closer to much of the noise
    p /= p.sum()
    for scale in (1.0, 30.0):
        index, _ = tokens_from_noise(scale * noise(n, 8, 19), p.expand(n, -1), codebook)
        assert (index % 7 == 0).all()


@pytest.mark.parametrize("solver", ["adaptive", "euler", "dpm2m"])
def test_one_hot_probs_return_that_code(solver):
    v, n = 4096, 500
    codebook = make_codebook(v, 32, False, seed=20)
    target = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(21))
    probs = torch.nn.functional.one_hot(target, v).float()
    for scale in (1.0, 1e3):
        index, embedding = tokens_from_noise(scale * noise(n, 32, 22), probs, codebook, solver=solver)
        assert torch.equal(index, target) and torch.equal(embedding, codebook[target])


def test_posterior_weights_are_the_softmax_floored_clear_of_subnormals():
    """The posterior weights equal torch.softmax wherever a logit is within 60 nats of the row's top; below that,
    -inf logits (zero-probability codes) included, they sit at exp(-60) of the top weight, never a float32
    subnormal (whose arithmetic is slow on x86); the top code keeps the top weight, which is returned."""
    from dd.flow import WEIGHT_FLOOR, _posterior_weights

    gen = torch.Generator().manual_seed(30)
    logits = torch.randn(4, 5000, generator=gen) * 60.0  # spans about 500 nats: most softmax weights subnormal or 0
    logits[1, 7] = -float("inf")  # a padding slot / zero-probability code
    reference = torch.softmax(logits, dim=-1)
    assert (reference[(reference > 0) & (reference < torch.finfo(torch.float32).tiny)]).numel() > 0  # the hard case
    w, top = _posterior_weights(logits.clone())
    near = logits >= logits.amax(dim=-1, keepdim=True) + WEIGHT_FLOOR
    assert torch.allclose(w[near], reference[near], rtol=1e-5, atol=0)
    assert torch.allclose(w[~near], (top * np.exp(WEIGHT_FLOOR)).unsqueeze(1).expand_as(w)[~near], rtol=1e-5)
    assert (w >= torch.finfo(torch.float32).tiny).all()  # normal numbers only
    assert torch.equal(top, w.amax(dim=-1)) and torch.equal(w.argmax(dim=-1), logits.argmax(dim=-1))
    assert torch.allclose(w.sum(dim=-1), torch.ones(4))


def test_float32_stable_down_to_tiny_t():
    # Two pairs of codes 1e-6 apart can only be told apart at t ~ 1e-6; float32 must stay finite there,
    # and each pair as a whole must still receive its probability mass.
    codebook = make_codebook(4, 8, True, seed=23)
    codebook = torch.cat([codebook[:2], codebook[:2] + 1e-6 * codebook[2:]])  # codes i and i + 2 are twins
    p = torch.tensor([0.3, 0.2, 0.1, 0.4])
    n = 20_000
    index, embedding = tokens_from_noise(noise(n, 8, 24), p.expand(n, -1), codebook, t_min=1e-12)
    assert torch.isfinite(embedding).all() and ((index >= 0) & (index < 4)).all()
    pair_p = torch.tensor([p[0] + p[2], p[1] + p[3]])
    assert tv_to(index % 2, pair_p) <= tv_threshold(pair_p, n)


def test_time_grid():
    for schedule in ("log", "uniform", "power"):
        grid = time_grid(16, schedule, 1e-4)
        assert len(grid) == 17 and grid[0] == pytest.approx(1.0) and grid[-1] == pytest.approx(1e-4)
        assert all(a > b for a, b in zip(grid, grid[1:]))


@pytest.mark.parametrize(
    "noise_shape,probs_shape,codebook_shape,match",
    [
        ((5, 8), (4, 16), (16, 8), "rows"),
        ((5, 8), (5, 16), (15, 8), r"\(V, C\)"),
        ((5, 4), (5, 16), (16, 8), r"\(V, C\)"),
        ((5,), (5, 16), (16, 8), "2-D"),
    ],
)
def test_shape_errors(noise_shape, probs_shape, codebook_shape, match):
    probs = torch.full(probs_shape, 1.0 / probs_shape[-1])
    with pytest.raises(ValueError, match=match):
        tokens_from_noise(torch.randn(noise_shape), probs, torch.randn(codebook_shape))


def test_value_errors():
    eps, codebook = torch.randn(3, 8), torch.randn(16, 8)
    probs = torch.full((3, 16), 1.0 / 16)
    bad_sum = probs.clone()
    bad_sum[1] *= 2
    with pytest.raises(ValueError, match="sum to 1"):
        tokens_from_noise(eps, bad_sum, codebook)
    with pytest.raises(ValueError, match="sum to 1"):
        tokens_from_noise(eps, torch.rand(3, 16), codebook)  # scores that were never normalised
    negative = probs.clone()
    negative[2, 0], negative[2, 1] = -0.1, 0.1 + 2.0 / 16
    with pytest.raises(ValueError, match="negative"):
        tokens_from_noise(eps, negative, codebook)
    for name in ("noise", "probs", "codebook"):
        args = {"noise": eps.clone(), "probs": probs.clone(), "codebook": codebook.clone()}
        args[name][0, 0] = float("nan")
        with pytest.raises(ValueError, match=f"{name} contains NaN"):
            tokens_from_noise(args["noise"], args["probs"], args["codebook"])
    with pytest.raises(ValueError, match="solver"):
        tokens_from_noise(eps, probs, codebook, solver="rk4")
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        tokens_from_noise(eps, probs, codebook, order=4)
    with pytest.raises(ValueError, match="schedule"):
        tokens_from_noise(eps, probs, codebook, solver="euler", schedule="cosine")
    with pytest.raises(ValueError, match="float"):
        tokens_from_noise(eps, probs, codebook.long())


def test_empty_batch():
    index, embedding = tokens_from_noise(torch.randn(0, 8), torch.zeros(0, 16), torch.randn(16, 8))
    assert index.shape == (0,) and embedding.shape == (0, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu_and_is_exact():
    p, codebook, n = make_probs(16, 0.1, None, seed=2), make_codebook(16, 32, False, seed=3), 100_000
    eps = noise(n, 32, 1)
    index_gpu, embedding_gpu = tokens_from_noise(eps.cuda(), p.cuda().expand(n, -1), codebook.cuda())
    assert index_gpu.device.type == "cuda" and embedding_gpu.device.type == "cuda"
    assert tv_to(index_gpu.cpu(), p) <= tv_threshold(p, n)
    index_cpu, _ = tokens_from_noise(eps[:5000], p.expand(5000, -1), codebook)
    # Different kernels round differently; only rows on a token boundary may differ.
    assert (index_gpu[:5000].cpu() != index_cpu).double().mean() < 1e-3
