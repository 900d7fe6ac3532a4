"""Per-token flow matching: a deterministic map from Gaussian noise to a token drawn from a categorical p.

The teacher's next-token distribution p over a codebook {c_j} (V x C) defines the data law
sum_j p_j delta(c_j). The linear path x_t = (1 - t) x_0 + t eps (t = 1 noise, t = 0 data) towards it has
a closed-form velocity (reference/dd-paper.md section 1.2):

    w_j(x, t) = softmax_j( log p_j - ||x - (1 - t) c_j||^2 / (2 t^2) )    posterior weight of code j
    x0_hat    = sum_j w_j c_j                                             posterior mean of the token
    v         = dx/dt = (x - x0_hat) / t

Integrating dx = v dt from x(1) = eps down to t -> 0 lands on a codebook vector, and the share of the
noise that lands on c_j is exactly p_j. The field is exact, so the only error is the ODE solver's.

Coordinates. With y = x / t and mu = 1/t - 1 the ODE is dy/dmu = x0_hat: the 1/t stiffness sits in the
change of variables and every solver below integrates the bounded x0_hat only (the data-prediction form
of DPM-Solver++). The Euler step in these coordinates, x_s = (s/t) x_t + (1 - s/t) x0_hat, is at the same
time Euler on v and DDIM, and is exact while x0_hat is constant. The posterior is, up to a per-row
constant, log p_j + mu <y, c_j> - mu^2 ||c_j||^2 / 2: one matrix-vector product per evaluation. y is in
noise units (y = eps at t = 1), so an error of size e in y moves a token boundary by e standard
deviations of the noise: the natural scale for the solver's tolerance.

Where the work is. A row's posterior turns one-hot at mu ~ |eps| / (distance between the competing
codes), which depends on the codebook: t ~ 0.5 for a random 32-d codebook with norms ~6 (VAR-like), down
to t ~ 0.01 for 16384 unit vectors in 8-d (LlamaGen). A fixed grid tuned for one wastes its steps on the
other (benchmarks/RESULTS.md, "Flow-map solver"), so the default solver adapts the step per row.

Solvers:
  "adaptive" (default) per-row step control in log t. Each step is a prediction from x0_hat at the
             current and the previous accepted point, x0_hat at the prediction, and a correction
             through all three (variable-step Adams AB2/AM3 in PEC mode: one x0_hat evaluation per
             step, third order; order=2 drops the previous point: Euler + trapezoid, i.e. Heun). The
             difference between prediction and correction, in noise units, is the error estimate; a
             step is accepted when it is <= tol and the next step is sized from it.
  "euler"    fixed grid (see time_grid), one evaluation per step.
  "dpm2m"    fixed grid, DPM-Solver++(2M): x0_hat linear in log mu through this and the previous
             step, integrated exactly; one evaluation per step, second order.

Early exit. A row is decided once its top posterior weight is >= 1 - decided_tol and that code is also
the nearest scaled code, argmin_j ||x - (1 - t) c_j||. From then on x0_hat = c_j (up to decided_tol), the
exact path runs straight to c_j, and the log-odds of j against any code k only grow: along that path they
are log(p_j/p_k) + mu <e, c_j - c_k> + mu^2 ||c_j - c_k||^2 / 2 with e = y - mu c_j constant, a convex
quadratic in mu whose slope is positive exactly when c_j is the nearest code. The row's token is fixed
and the row leaves the batch; most rows leave long before t_min.

Precision. Everything runs in the inputs' float dtype (float32 by default), float64 nowhere. float32
suffices because the posterior is computed from y and mu directly (no 1/t^2 blow-up of a difference of
squares near t = 0) and decided rows leave before mu gets large. Checked while choosing the solver: on
2e4 draws each of 16-code cases with codebook scales 0.01, 1 and 100, float32 and float64 runs had the
same mismatch rates against a float64 reference solve (tol 1e-6).
"""
import math

import torch

SOLVERS = ("adaptive", "euler", "dpm2m")
SCHEDULES = ("log", "uniform", "power")

DEFAULT_SOLVER = "adaptive"
DEFAULT_TOL = 1e-3
DEFAULT_ORDER = 3
DEFAULT_STEPS = 64
DEFAULT_SCHEDULE = "log"
DEFAULT_T_MIN = 1e-6
DEFAULT_DECIDED_TOL = 1e-4
PROBS_SUM_TOL = 1e-3
# First adaptive step and the largest one, in log t. The cap keeps a step from jumping over a whole
# posterior transition (both ends agreeing while the middle does not).
FIRST_STEP = 0.05
MAX_STEP = 0.7
# Smallest log-weight relative to the top code (see _posterior_weights): exp(-60) keeps weights, and their products
# with codes, clear of float32 subnormals.
WEIGHT_FLOOR = -60.0
# Devices where posterior() runs the top-code searches on the candidate rows only (see there).
SELECT_ROWS_ON = ("cpu",)


def time_grid(steps, schedule=DEFAULT_SCHEDULE, t_min=DEFAULT_T_MIN):
    """Times 1 = t_0 > t_1 > ... > t_steps = t_min of a fixed-grid solver, as Python floats.

    "log": uniform in log t; "uniform": uniform in t; "power": t = t_min + (1 - t_min) u^3 for u uniform
    in [0, 1], a polynomial grid concentrated near the data end (EDM-style, rho = 3).
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
            f"tokens_from_noise: noise, probs and codebook must be on one device, got "
            f"{noise.device}, {probs.device}, {codebook.device}"
        )
    # probs is (N, V) with V up to 16384: check it in two passes, a NaN or inf shows in the row sums.
    sums = probs.sum(dim=1)  # torch sums blockwise: float32 is far inside PROBS_SUM_TOL even for V = 16384
    for name, finite in (("noise", torch.isfinite(noise).all()), ("probs", torch.isfinite(sums).all()),
                         ("codebook", torch.isfinite(codebook).all())):
        if not finite:
            raise ValueError(f"tokens_from_noise: {name} contains NaN or inf; check the step that produced it")
    if n > 0 and probs.min() < 0:
        row = int((probs < 0).any(dim=1).nonzero()[0])
        raise ValueError(f"tokens_from_noise: probs has negative entries (first in row {row}); pass probabilities")
    bad = (sums - 1).abs() > PROBS_SUM_TOL
    if bad.any():
        row = int(bad.nonzero()[0])
        raise ValueError(
            f"tokens_from_noise: probs rows must sum to 1 (tolerance {PROBS_SUM_TOL}); row {row} sums to "
            f"{float(sums[row]):.6g}. Pass softmax outputs renormalised after top-k/top-p, not logits."
        )


def _posterior_weights(logits):
    """softmax(logits) over the last dim, with every weight floored at exp(WEIGHT_FLOOR) of the top one, and the
    top weight (n,) (free: the top code's unnormalised weight is exp(0) = 1).

    Why not torch.softmax: once a posterior concentrates, most of its K weights fall below float32's smallest
    normal number (exp(-87.3)), and arithmetic on subnormals is many times slower on x86 CPUs. The softmax and
    the x0_hat product then took two thirds of the flow map's time at LlamaGen's size (benchmarks/RESULTS.md,
    "Flow-map cost per token"). Flooring at exp(-60) keeps every weight and every product with a code normal.
    The floor changes x0_hat by at most K exp(-60) max||c|| (about 1e-22 for 16384 unit codes), far below float32
    resolution; a code of zero probability still never has the top weight, and the nearest-code test reads the
    logits, not the weights.
    """
    w = torch.sub(logits, logits.amax(dim=-1, keepdim=True)).clamp_(min=WEIGHT_FLOOR).exp_()
    top_weight = w.sum(dim=-1, keepdim=True).reciprocal_()
    return w.mul_(top_weight), top_weight.squeeze(-1)


class _Rows:
    """The rows still being integrated, with their support: log p (n, K), the gathered codes and a padding mask.

    The codes are gathered as (n, C + 1, K), with -||c||^2 / 2 as the extra row: the log-weights are then
    one batched product (no separate pass for the ||c||^2 term), and x0_hat is the product of the weights with
    the transposed view, which on a CPU is faster than with a (n, K, C) copy (57 vs 98 us at 8 rows,
    K = 8000, C = 8, one thread).
    """

    def __init__(self, log_p, codes_aug_t, padding, decided_tol):
        self.decided_tol = decided_tol
        self.index = torch.arange(log_p.shape[0], device=log_p.device)  # row in the chunk
        self.log_p, self.codes_aug_t = log_p, codes_aug_t
        self.padding = padding if bool(padding.any()) else None  # support slots of rows with fewer than K codes

    def keep(self, mask):
        rows = mask.nonzero().squeeze(1)
        for name in ("index", "log_p", "codes_aug_t", "padding"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.index_select(0, rows))

    def posterior(self, y, mu, need_top=None):
        """At (y, mu), mu (n, 1): x0_hat (n, C), and the top code (n,) and whether the row is decided, or
        None, None when no row needs them.

        The top code is searched only where it can matter: rows whose top weight is >= 1 - decided_tol
        (candidates for deciding) and rows in need_top (n,) bool; elsewhere it is -1. On a CPU the argmax and
        the nearest-code search over all K slots cost as much as the softmax, and most evaluations have no
        candidate row at all.
        """
        # log w_j + const = log p_j + <mu y, c_j> + mu^2 (-||c_j||^2 / 2): one batched product
        coeffs = torch.cat([mu * y, mu * mu], dim=1).unsqueeze(1)
        logits = torch.baddbmm(self.log_p.unsqueeze(1), coeffs, self.codes_aug_t).squeeze(1)
        w, top_weight = _posterior_weights(logits)
        x0_hat = torch.bmm(w.unsqueeze(1), self.codes_aug_t.transpose(1, 2)).squeeze(1)[:, :-1]
        candidate = top_weight >= 1.0 - self.decided_tol
        look = candidate if need_top is None else candidate | need_top
        if y.device.type not in SELECT_ROWS_ON:  # on a GPU the full searches are cheap, selecting rows costs a sync
            top = w.argmax(dim=-1)
            return x0_hat, torch.where(look, top, -1), candidate & (top == self._nearest(logits, self.log_p, self.padding))
        if not look.any():
            return x0_hat, None, None
        top = torch.full((y.shape[0],), -1, dtype=torch.long, device=y.device)
        decided = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        rows = look.nonzero().squeeze(1)
        top_rows = w.index_select(0, rows).argmax(dim=-1)
        padding = None if self.padding is None else self.padding.index_select(0, rows)
        nearest = self._nearest(logits.index_select(0, rows), self.log_p.index_select(0, rows), padding)
        top[rows] = top_rows
        decided[rows] = candidate[rows] & (top_rows == nearest)
        return x0_hat, top, decided

    @staticmethod
    def _nearest(logits, log_p, padding):
        """The nearest scaled code: the largest likelihood term, logits - log p (padding slots: nan -> -inf)."""
        likelihood = logits - log_p
        if padding is not None:
            likelihood = likelihood.masked_fill(padding, -math.inf)
        return likelihood.argmax(dim=-1)


def _integrate_adaptive(noise, rows, tol, t_min, order):
    """Per-row adaptive Adams PEC, steps sized in log t; returns each row's token as a position in its support.

    In the coordinates of the module docstring, dy/dmu = x0_hat. Each step from mu to mu + H is one
    posterior evaluation: a prediction, x0_hat there (d_p), and a correction that reuses it. With d the
    current x0_hat, d_b the one at the previous accepted point (mu - H_b), D_p = d_p - d and D_b = d - d_b:

        prediction  y_p = y + H d + H^2 / (2 H_b) D_b                          (line through d_b, d: AB2)
        correction  y_c = y + H d + (H/2 - q) D_p + q H / H_b D_b,  q = H^2 / (6 (H + H_b))
                                                                  (parabola through d_b, d, d_p: AM3)

    i.e. x0_hat interpolated as a polynomial in mu and integrated exactly. H_b = inf (the first step, and
    every step of order 2) turns them into Euler and the trapezoid rule (Heun). |y_c - y_p|, in noise
    units, is the error estimate; a step is accepted when it is <= tol and the next step is sized from it,
    in lam = -log t (the posterior moves at a steady pace in log t, not in mu). Order 3 takes about half
    the evaluations of order 2 for a smaller error (benchmarks/RESULTS.md, "Flow-map solver"). The step
    bookkeeping is (rows, 1) columns: at LlamaGen's batch sizes per AR step the loop's small operations
    cost as much as the posterior itself.
    """
    n = noise.shape[0]
    result = torch.empty(n, dtype=torch.long, device=noise.device)
    y = noise  # = x / t at t = 1
    lam = torch.zeros(n, 1, dtype=noise.dtype, device=noise.device)
    mu = torch.zeros_like(lam)
    h = torch.full_like(lam, FIRST_STEP)
    back = torch.full_like(lam, math.inf)  # H_b of the docstring; inf: no previous point
    lam_end = -math.log(t_min)
    exponent = 1.0 / order  # the estimate is the local error of the order-(order - 1) prediction
    active = torch.ones(n, dtype=torch.bool, device=noise.device)
    d = rows.posterior(y, mu)[0]
    diff_back = torch.zeros_like(d)  # D_b
    # Step control: h <- h * clamp(0.9 (tol / err)^(1/order), 0.2, 4), as one power of err.
    err_scale = 1.0 / (tol * 0.9 ** order)
    while True:
        lam_s = torch.clamp(lam + h, max=lam_end)
        mu_s = torch.expm1(lam_s)
        big_h = mu_s - mu
        ratio = big_h / back  # H / H_b
        y_pred = torch.addcmul(torch.addcmul(y, big_h, d), big_h * ratio, diff_back, value=0.5)
        at_end = lam_s.squeeze(1) >= lam_end
        d_pred, top, decided = rows.posterior(y_pred, mu_s, need_top=at_end)
        diff_pred = d_pred - d
        # y_c - y_p = (H/2 - q) D_p + (q H / H_b - H^2 / (2 H_b)) D_b = k (D_p - (H / H_b) D_b), k = H/2 - q
        k = big_h * (0.5 - ratio / (6.0 * ratio + 6.0))
        correction = k * torch.addcmul(diff_pred, ratio, diff_back, value=-1.0)
        err = correction.norm(dim=-1, keepdim=True)
        # A step that rounds to zero length (h below float precision of lam) is not taken: it would make
        # H_b = 0. Rows parked at t_min after finishing take no step either.
        accept = (err <= tol) & (big_h > 0)
        y = torch.where(accept, y_pred + correction, y)
        diff_back = torch.where(accept, diff_pred, diff_back)
        d = torch.where(accept, d_pred, d)
        if order == 3:  # order 2 keeps H_b = inf: no previous point enters
            back = torch.where(accept, big_h, back)
        lam = torch.where(accept, lam_s, lam)
        mu = torch.where(accept, mu_s, mu)
        h = torch.clamp(h * torch.clamp(torch.pow(err * err_scale, -exponent), 0.2, 4.0), max=MAX_STEP)
        if top is None:  # no row is a candidate for deciding, none is at t_min
            continue
        # Decided at the prediction, within tol of the accepted point: the criterion has a wide margin.
        done = active & accept.squeeze(1) & (decided | at_end)
        if done.any():
            result[rows.index[done]] = top[done]
            active &= ~done
            n_active = int(active.sum())
            if n_active == 0:
                return result
            # Finished rows ride along (their results are ignored) until compacting pays for the copy.
            if n_active < 0.75 * active.shape[0]:
                keep = active
                y, d, diff_back, lam, mu, back, h = (x[keep] for x in (y, d, diff_back, lam, mu, back, h))
                rows.keep(keep)
                active = active[keep]


def _integrate_grid(noise, rows, grid, solver):
    """Fixed-grid Euler or DPM-Solver++(2M); returns each row's token as a position in its support."""
    n = noise.shape[0]
    result = torch.empty(n, dtype=torch.long, device=noise.device)
    y = noise  # = x / t at t = 1
    prev = None  # (log mu, x0_hat) of the previous step, for dpm2m

    def mu_column(mu):
        return torch.full((y.shape[0], 1), mu, dtype=y.dtype, device=y.device)

    for t, s in zip(grid[:-1], grid[1:]):
        mu_t, mu_s = 1.0 / t - 1.0, 1.0 / s - 1.0
        d, top, decided = rows.posterior(y, mu_column(mu_t))
        if decided is not None and decided.any():
            result[rows.index[decided]] = top[decided]
            keep = ~decided
            if not keep.any():
                return result
            y, d = y[keep], d[keep]
            prev = None if prev is None else (prev[0], prev[1][keep])
            rows.keep(keep)
        incr = d
        if solver == "dpm2m" and prev is not None:
            # x0_hat(lam) = d + (lam - lam_t) d1 with lam = log mu, integrated exactly over mu.
            lam_t, lam_s = math.log(mu_t), math.log(mu_s)
            d1 = (d - prev[1]) / (lam_t - prev[0])
            incr = d + d1 * ((lam_s - lam_t) * mu_s / (mu_s - mu_t) - 1.0)
        prev = (math.log(mu_t), d) if mu_t > 0.0 else None
        y = y + (mu_s - mu_t) * incr
    everyone = torch.ones(y.shape[0], dtype=torch.bool, device=y.device)
    result[rows.index] = rows.posterior(y, mu_column(1.0 / grid[-1] - 1.0), need_top=everyone)[1]
    return result


def tokens_from_noise(
    noise,
    probs,
    codebook,
    *,
    solver=DEFAULT_SOLVER,
    tol=DEFAULT_TOL,
    steps=DEFAULT_STEPS,
    schedule=DEFAULT_SCHEDULE,
    t_min=DEFAULT_T_MIN,
    decided_tol=DEFAULT_DECIDED_TOL,
    order=DEFAULT_ORDER,
    chunk_elements=None,
):
    """Map per-token Gaussian noise to tokens distributed exactly as probs.

    noise (N, C), probs (N, V) with rows summing to 1 (zeros allowed: top-k/top-p), codebook (V, C).
    Returns (index (N,) int64, embedding (N, C) = codebook[index]).

    Deterministic: the same noise and probs give the same token, and a row's token does not depend on
    the other rows. Only the support of each row's p enters (a code with p_j = 0 is never returned): rows
    are padded to the largest support size K in the batch and run in chunks of chunk_elements / (K (C + 1))
    rows, which bounds the gathered codebook ((rows, C + 1, K)). chunk_elements defaults to 2**25 on CPU and
    2**28 on CUDA (128 MiB and 1 GiB of float32; peak use is up to about twice that).

    Solver kwargs, defaults chosen by measurement (benchmarks/RESULTS.md, "Flow-map solver"):
      solver      "adaptive" (default), "euler" (= DDIM) or "dpm2m" (DPM-Solver++(2M)); module docstring
      tol         1e-3: adaptive only, the local error allowed per step in noise units
      order       3: adaptive only, 3 (Adams AB2/AM3 on the previous accepted point) or 2 (no history)
      steps       64: fixed-grid solvers only, the number of grid steps from t = 1 to t_min
      schedule    "log": fixed-grid solvers only, "log", "uniform" or "power" (see time_grid)
      t_min       1e-6: the smallest time; a row still undecided there takes its argmax posterior
      decided_tol 1e-4: a row leaves once its top posterior weight is >= 1 - decided_tol (and nearest)
    Runs in float32, or float64 if any input is float64.
    """
    _check_inputs(noise, probs, codebook)
    if solver not in SOLVERS:
        raise ValueError(f"tokens_from_noise: solver must be one of {SOLVERS}, got {solver!r}")
    if not 0.0 < decided_tol < 0.5:
        raise ValueError(f"tokens_from_noise: decided_tol must lie in (0, 0.5), got {decided_tol!r}")
    if order not in (2, 3):
        raise ValueError(f"tokens_from_noise: order must be 2 or 3, got {order!r}")
    if not tol > 0.0:
        raise ValueError(f"tokens_from_noise: tol must be > 0, got {tol!r}")
    grid = time_grid(steps, schedule, t_min)
    if chunk_elements is None:
        chunk_elements = 1 << 28 if noise.device.type == "cuda" else 1 << 25
    dtype = torch.float64 if torch.float64 in (noise.dtype, probs.dtype, codebook.dtype) else torch.float32
    n, c = noise.shape
    index = torch.empty(n, dtype=torch.long, device=noise.device)
    if n == 0:
        return index, codebook[index]
    support_sizes = (probs > 0).sum(dim=1)
    support = int(support_sizes.max())
    rows_per_chunk = max(1, chunk_elements // ((c + 1) * support))
    codebook_work = codebook.to(dtype)
    half_sq = codebook_work.square().sum(dim=1, keepdim=True).mul_(-0.5)
    codebook_aug_t = torch.cat([codebook_work, half_sq], dim=1).t().contiguous()  # (C + 1, V)
    slots = torch.arange(support, device=noise.device)
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        chunk, m = probs[start:stop], stop - start
        # Each row's support in codebook order: code j goes to slot (number of support codes before j);
        # codes outside the support go to a spare last slot, dropped. Slots past a row's support size are
        # padding (code 0 with log p = -inf: zero weight).
        in_support = chunk > 0
        slot = in_support.cumsum(dim=1).sub_(1).masked_fill_(~in_support, support)
        idx = torch.zeros(m, support + 1, dtype=torch.long, device=noise.device)
        idx = idx.scatter_(1, slot, torch.arange(chunk.shape[1], device=noise.device).expand(m, -1))[:, :support]
        padding = slots >= support_sizes[start:stop, None]
        log_p = chunk.gather(1, idx).to(dtype).log_().masked_fill_(padding, -math.inf)
        codes_aug_t = codebook_aug_t.unsqueeze(0).expand(m, -1, -1).gather(2, idx.unsqueeze(1).expand(-1, c + 1, -1))
        rows = _Rows(log_p, codes_aug_t, padding, decided_tol)
        x = noise[start:stop].to(dtype)
        if solver == "adaptive":
            pos = _integrate_adaptive(x, rows, tol, t_min, order)
        else:
            pos = _integrate_grid(x, rows, grid, solver)
        index[start:stop] = idx.gather(1, pos.unsqueeze(1)).squeeze(1)
    return index, codebook[index]
