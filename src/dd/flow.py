"""Per-token flow matching: a deterministic map from Gaussian noise to a token of a categorical p.

The teacher's next-token distribution p over a codebook {c_j} (V x C) defines the data law
sum_j p_j delta(c_j). The linear path x_t = (1 - t) x_0 + t eps (t = 1 noise, t = 0 data) towards it has
a closed-form velocity (reference/dd-paper.md section 1.2):

    w_j(x, t) = softmax_j( log p_j - ||x - (1 - t) c_j||^2 / (2 t^2) )    posterior weight of code j
    x0_hat    = sum_j w_j c_j                                             posterior mean of the token
    v         = dx/dt = (x - x0_hat) / t

Integrating dx = v dt from x(1) = eps down to t -> 0 lands on a codebook vector, and the share of
noise that lands on c_j is exactly p_j. The field is exact, so the only error is the ODE solver's.

Solver coordinates. With y = x / t and mu = 1/t - 1 the ODE becomes dy/dmu = x0_hat: all of the
stiffness of 1/t is in the change of variables and the solvers below integrate x0_hat only (the
"data prediction" form of DPM-Solver++). In these coordinates

    log posterior_j = log p_j + mu * <y, c_j> - mu^2 ||c_j||^2 / 2 + (terms equal for all j),

one matrix-vector product per step. The posterior turns one-hot at mu ~ 1/(distance between codes),
so a grid uniform in log t spends the same number of steps on every distance scale.

Solvers (chosen by measurement; see benchmarks/flow_solver.py and benchmarks/RESULTS.md):
  "euler"  x_s = (s/t) x_t + (1 - s/t) x0_hat(x_t): Euler on the velocity, which for this path is
           also DDIM / DPM-Solver++(1); exact when x0_hat is constant over the step.
  "dpm2m"  DPM-Solver++(2M): x0_hat linear in log mu through this and the previous step, integrated
           exactly; one x0_hat evaluation per step, second order.
  "heun"   second-order predictor-corrector in mu; two x0_hat evaluations per step.

Early exit. A row is decided once its top posterior weight exceeds 1 - decided_tol and that code is
also the nearest scaled code, argmin_j ||x - (1 - t) c_j||. From then on x0_hat = c_j up to decided_tol,
the exact path goes straight to c_j, and the log-odds of j against every other code only grow (they
are a convex quadratic in mu whose slope is positive exactly when c_j is the nearest code). The row's
token is fixed and the row leaves the batch. Most rows decide long before t_min.
"""
import math

import torch
import torch.nn.functional as F

SOLVERS = ("euler", "dpm2m", "heun", "adaptive")
SCHEDULES = ("log", "uniform", "power")

DEFAULT_SOLVER = "dpm2m"
DEFAULT_SCHEDULE = "log"
DEFAULT_STEPS = 64
DEFAULT_T_MIN = 1e-4
DEFAULT_DECIDED_TOL = 1e-4
# Rows per chunk are chosen so the per-row support codebook (rows x K x C floats) stays this small.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
PROBS_SUM_TOL = 1e-3


def time_grid(steps, schedule=DEFAULT_SCHEDULE, t_min=DEFAULT_T_MIN):
    """Times 1 = t_0 > t_1 > ... > t_steps = t_min as a list of Python floats (float64).

    "log": uniform in log t (geometric); "uniform": uniform in t; "power": t = t_min + (1 - t_min) u^3 for
    u uniform in [0, 1], a polynomial grid concentrated near the data end (EDM-style rho = 3).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"flow solver: steps must be a positive int, got {steps!r}")
    if not 0.0 < t_min < 1.0:
        raise ValueError(f"flow solver: t_min must lie in (0, 1), got {t_min!r}")
    if schedule == "log":
        return [t_min ** (i / steps) for i in range(steps + 1)]
    if schedule == "uniform":
        return [1.0 - (1.0 - t_min) * i / steps for i in range(steps + 1)]
    if schedule == "power":
        return [t_min + (1.0 - t_min) * (1.0 - i / steps) ** 3 for i in range(steps + 1)]
    raise ValueError(f"flow solver: schedule must be one of {SCHEDULES}, got {schedule!r}")


def _check_inputs(noise, probs, codebook):
    for name, tensor in (("noise", noise), ("probs", probs), ("codebook", codebook)):
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"tokens_from_noise: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"tokens_from_noise: {name} must be 2-D, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"tokens_from_noise: {name} must be a float tensor, got {tensor.dtype}")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tokens_from_noise: {name} contains NaN or inf; check the tensor that produced it")
    (n, c), (n_p, v), (v_c, c_c) = noise.shape, probs.shape, codebook.shape
    if n_p != n:
        raise ValueError(f"tokens_from_noise: noise has {n} rows but probs has {n_p}; pass one p per noise row")
    if (v_c, c_c) != (v, c):
        raise ValueError(
            f"tokens_from_noise: codebook must be (V, C) = ({v}, {c}) to match probs (N, V) and noise (N, C), "
            f"got {tuple(codebook.shape)}"
        )
    if not (noise.device == probs.device == codebook.device):
        raise ValueError(
            f"tokens_from_noise: noise, probs and codebook must share a device, got "
            f"{noise.device}, {probs.device}, {codebook.device}"
        )
    if (probs < 0).any():
        row = int((probs < 0).any(dim=1).nonzero()[0])
        raise ValueError(f"tokens_from_noise: probs has negative entries (first in row {row}); pass probabilities")
    sums = probs.double().sum(dim=1)
    bad = (sums - 1).abs() > PROBS_SUM_TOL
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"tokens_from_noise: probs rows must sum to 1 (tolerance {PROBS_SUM_TOL}); row {row} sums to "
            f"{float(sums[row]):.6g}. Pass softmax outputs after top-k/top-p renormalisation, not logits."
        )


def _posterior_logits(y, mu, log_p, codes, code_sq):
    """log w up to a per-row constant: log p_j + mu <y, c_j> - mu^2 ||c_j||^2 / 2, and the likelihood part."""
    likelihood = mu * torch.bmm(codes, y.unsqueeze(-1)).squeeze(-1) - (0.5 * mu * mu) * code_sq
    return log_p + likelihood, likelihood


def _integrate_chunk(noise, log_p, codes, code_sq, grid, solver, decided_tol):
    """Integrate one chunk of rows; returns the position (into the support) of each row's token."""
    n = noise.shape[0]
    device = noise.device
    result = torch.empty(n, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)  # original row of each active row
    x = noise.clone()
    prev = None  # (lambda, x0_hat) of the previous step, for dpm2m

    padding = log_p == -math.inf  # codes outside a row's support (its p_j = 0)

    def x0_hat(x_now, t_now):
        mu = 1.0 / t_now - 1.0
        logits, likelihood = _posterior_logits(x_now / t_now, mu, log_p, codes, code_sq)
        w = torch.softmax(logits, dim=-1)
        return torch.bmm(w.unsqueeze(1), codes).squeeze(1), w, likelihood

    for i in range(len(grid) - 1):
        t, s = grid[i], grid[i + 1]
        d, w, likelihood = x0_hat(x, t)
        # A decided row's token can no longer change (module docstring); it leaves the batch.
        top_w, top = w.max(dim=-1)
        nearest = likelihood.masked_fill(padding, -math.inf).argmax(dim=-1)
        decided = (top_w >= 1.0 - decided_tol) & (top == nearest)
        if decided.any():
            result[rows[decided]] = top[decided]
            keep = ~decided
            if not keep.any():
                return result
            rows, x, d = rows[keep], x[keep], d[keep]
            log_p, codes, code_sq, padding = log_p[keep], codes[keep], code_sq[keep], padding[keep]
            if prev is not None:
                prev = (prev[0], prev[1][keep])
        mu_t, mu_s = 1.0 / t - 1.0, 1.0 / s - 1.0
        if solver == "euler" or (solver == "dpm2m" and (prev is None or mu_t == 0.0)):
            incr = d
        elif solver == "dpm2m":
            # x0_hat(lambda) = d + (lambda - lambda_t) d1 with lambda = log mu, integrated exactly in mu.
            lam_t, lam_s = math.log(mu_t), math.log(mu_s)
            d1 = (d - prev[1]) / (lam_t - prev[0])
            incr = d + d1 * ((lam_s - lam_t) * mu_s / (mu_s - mu_t) - 1.0)
        else:  # heun: trapezoid in mu between x0_hat at t and at the Euler prediction at s
            x_pred = (s / t) * x + (1.0 - s / t) * d
            d_pred = x0_hat(x_pred, s)[0]
            incr = 0.5 * (d + d_pred)
        if solver == "dpm2m" and mu_t > 0.0:
            prev = (math.log(mu_t), d)
        elif solver == "dpm2m":
            prev = None
        # y_s = y_t + (mu_s - mu_t) * incr, written in x = t * y.
        x = (s / t) * x + (1.0 - s / t) * incr

    logits, _ = _posterior_logits(x / grid[-1], 1.0 / grid[-1] - 1.0, log_p, codes, code_sq)
    result[rows] = logits.argmax(dim=-1)
    return result


def _integrate_chunk_adaptive(noise, log_p, codes, code_sq, tol, t_min, decided_tol, heun, h_init=0.05, h_max=0.7):
    """Per-row adaptive Euler in (y, mu) with an embedded trapezoid error estimate (noise units)."""
    n = noise.shape[0]
    device, dtype = noise.device, noise.dtype
    result = torch.empty(n, dtype=torch.long, device=device)
    rows = torch.arange(n, device=device)
    padding = log_p == -math.inf
    x = noise.clone()
    t = torch.ones(n, 1, dtype=dtype, device=device)
    h = torch.full((n, 1), h_init, dtype=dtype, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)

    def x0_hat(x_now, t_now):
        mu = 1.0 / t_now - 1.0
        logits, likelihood = _posterior_logits(x_now / t_now, mu, log_p, codes, code_sq)
        w = torch.softmax(logits, dim=-1)
        return torch.bmm(w.unsqueeze(1), codes).squeeze(1), w, likelihood

    d = x0_hat(x, t)[0]
    evals = 1
    while True:
        s = torch.clamp(t * torch.exp(-h), min=t_min)
        ratio = s / t
        x_p = ratio * x + (1.0 - ratio) * d
        d_p, w_p, lik_p = x0_hat(x_p, s)
        evals += 1
        err = (1.0 / s - 1.0 / t) * (d_p - d).norm(dim=-1, keepdim=True) * 0.5
        accept = (err <= tol).squeeze(1) & active
        if heun:
            x_new = ratio * x + (1.0 - ratio) * 0.5 * (d + d_p)
        else:
            x_new = x_p
        a = accept.unsqueeze(1)
        x = torch.where(a, x_new, x)
        d = torch.where(a, d_p, d)
        t = torch.where(a, s, t)
        factor = torch.clamp(0.9 * torch.sqrt(tol / err.clamp_min(1e-30)), 0.2, 4.0)
        h = torch.clamp(h * factor, max=h_max)
        top_w, top = w_p.max(dim=-1)
        nearest = lik_p.masked_fill(padding, -math.inf).argmax(dim=-1)
        done = accept & (((top_w >= 1.0 - decided_tol) & (top == nearest)) | (s.squeeze(1) <= t_min))
        if done.any():
            result[rows[done]] = top[done]
            active = active & ~done
            n_active = int(active.sum())
            if n_active == 0:
                return result, evals
            if n_active < 0.75 * active.shape[0]:
                keep = active
                rows, x, d, t, h, active = rows[keep], x[keep], d[keep], t[keep], h[keep], active[keep]
                log_p, codes, code_sq, padding = log_p[keep], codes[keep], code_sq[keep], padding[keep]


def tokens_from_noise(
    noise,
    probs,
    codebook,
    *,
    solver=DEFAULT_SOLVER,
    steps=DEFAULT_STEPS,
    schedule=DEFAULT_SCHEDULE,
    t_min=DEFAULT_T_MIN,
    decided_tol=DEFAULT_DECIDED_TOL,
    chunk_elements=DEFAULT_CHUNK_ELEMENTS,
    tol=1e-3,
    heun=False,
):
    """Map per-token Gaussian noise to tokens distributed exactly as probs.

    noise (N, C), probs (N, V) rows summing to 1 (zeros allowed: top-k/top-p), codebook (V, C).
    Returns (index (N,) int64, embedding (N, C) = codebook[index] in codebook's dtype).

    Deterministic: the same noise and probs give the same token, and a row's token does not depend on
    the other rows. Only the support of each row's p enters: the rows are padded to the largest support
    size K and processed in chunks of about chunk_elements / (K * C) rows, the memory bound.

    Solver kwargs (defaults measured in benchmarks/RESULTS.md, "Flow-map solver"):
      solver      "dpm2m" (default), "euler" (= DDIM) or "heun"
      steps       64 steps of the grid from t = 1 to t_min (an upper bound: rows leave once decided)
      schedule    "log" (default, uniform in log t), "uniform" or "power"
      t_min       1e-4, the last grid time; rows still undecided there take the argmax posterior
      decided_tol 1e-4, a row exits once its top posterior weight is >= 1 - decided_tol (and nearest)
    Computation runs in float32 unless the inputs are float64 (see the module docstring for the
    coordinates that keep float32 accurate near t = 0).
    """
    _check_inputs(noise, probs, codebook)
    if solver not in SOLVERS:
        raise ValueError(f"tokens_from_noise: solver must be one of {SOLVERS}, got {solver!r}")
    if not 0.0 < decided_tol < 0.5:
        raise ValueError(f"tokens_from_noise: decided_tol must lie in (0, 0.5), got {decided_tol!r}")
    grid = time_grid(steps, schedule, t_min)
    dtype = torch.float64 if torch.float64 in (noise.dtype, probs.dtype, codebook.dtype) else torch.float32
    n, c = noise.shape
    index = torch.empty(n, dtype=torch.long, device=noise.device)
    if n == 0:
        return index, codebook[index]
    support = int((probs > 0).sum(dim=1).max())
    rows_per_chunk = max(1, chunk_elements // (support * c))
    codebook_work = codebook.to(dtype)
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        p_top, idx = probs[start:stop].topk(support, dim=1)  # the support, padded with zeros
        log_p = p_top.to(dtype).log()  # -inf on padding: those codes get zero weight
        codes = codebook_work[idx]  # (rows, K, C)
        code_sq = codes.square().sum(dim=-1)
        if solver == "adaptive":
            pos, evals = _integrate_chunk_adaptive(noise[start:stop].to(dtype), log_p, codes, code_sq, tol, t_min, decided_tol, heun)
            tokens_from_noise.evals = evals
        else:
            pos = _integrate_chunk(noise[start:stop].to(dtype), log_p, codes, code_sq, grid, solver, decided_tol)
        index[start:stop] = idx.gather(1, pos.unsqueeze(1)).squeeze(1)
    return index, codebook[index]
