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
  "adaptive" (default) per-row step control in log t. Each step is an Euler prediction plus a
             trapezoid correction that reuses x0_hat at the prediction (Heun in PEC mode: one x0_hat
             evaluation per step, second order). The difference between the two, in noise units, is
             the error estimate; a step is accepted when it is <= tol and the next step is sized from it.
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
DEFAULT_STEPS = 64
DEFAULT_SCHEDULE = "log"
DEFAULT_T_MIN = 1e-6
DEFAULT_DECIDED_TOL = 1e-4
PROBS_SUM_TOL = 1e-3
# First adaptive step and the largest one, in log t. The cap keeps a step from jumping over a whole
# posterior transition (both ends agreeing while the middle does not).
FIRST_STEP = 0.05
MAX_STEP = 0.7
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


class _Rows:
    """The rows still being integrated, with their support: log p (n, K), codes (n, K, C), ||c||^2 (n, K).

    The gathered codes are kept in two layouts, (n, K, C) and (n, C, K), because each of the two batched
    products of an evaluation is 2-3x faster on CPU with its own contiguous layout (measured at K = 8000,
    C = 8: benchmarks/RESULTS.md, "Pairs throughput"); the memory is counted in tokens_from_noise's chunks.
    """

    def __init__(self, log_p, codes, code_sq, decided_tol):
        self.decided_tol = decided_tol
        self.index = torch.arange(log_p.shape[0], device=log_p.device)  # row in the chunk
        self.log_p, self.codes, self.code_sq = log_p, codes, code_sq
        self.codes_t = codes.transpose(1, 2).contiguous()
        self.padding = log_p == -math.inf  # support slots of rows with fewer than K codes

    def keep(self, mask):
        for name in ("index", "log_p", "codes", "codes_t", "code_sq", "padding"):
            setattr(self, name, getattr(self, name)[mask])

    def posterior(self, y, mu, need_top=None):
        """At (y, mu), mu (n, 1): x0_hat (n, C), and the top code (n,) and whether the row is decided, or
        None, None when no row needs them.

        The top code is searched only where it can matter: rows whose top weight is >= 1 - decided_tol
        (candidates for deciding) and rows in need_top (n,) bool; elsewhere it is -1. On a CPU the argmax and
        the nearest-code search over all K slots cost as much as the softmax, and most evaluations have no
        candidate row at all.
        """
        # log w_j + const = log p_j - mu^2 ||c_j||^2 / 2 + <mu y, c_j>: one fused multiply-add, one batched product
        base = torch.addcmul(self.log_p, self.code_sq, mu * mu, value=-0.5)
        logits = torch.baddbmm(base.unsqueeze(1), (mu * y).unsqueeze(1), self.codes_t).squeeze(1)
        w = torch.softmax(logits, dim=-1)
        x0_hat = torch.bmm(w.unsqueeze(1), self.codes).squeeze(1)
        candidate = w.amax(dim=-1) >= 1.0 - self.decided_tol
        look = candidate if need_top is None else candidate | need_top
        if y.device.type not in SELECT_ROWS_ON:  # on a GPU the full searches are cheap, selecting rows costs a sync
            top = w.argmax(dim=-1)
            nearest = (logits - self.log_p).masked_fill(self.padding, -math.inf).argmax(dim=-1)
            return x0_hat, torch.where(look, top, -1), candidate & (top == nearest)
        if not look.any():
            return x0_hat, None, None
        top = torch.full((y.shape[0],), -1, dtype=torch.long, device=y.device)
        decided = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
        rows = look.nonzero().squeeze(1)
        top_rows = w[rows].argmax(dim=-1)
        # nearest scaled code = the largest likelihood term (logits - log p; padding slots give nan -> -inf)
        nearest = (logits[rows] - self.log_p[rows]).masked_fill(self.padding[rows], -math.inf).argmax(dim=-1)
        top[rows] = top_rows
        decided[rows] = candidate[rows] & (top_rows == nearest)
        return x0_hat, top, decided


def _integrate_adaptive(noise, rows, tol, t_min):
    """Per-row adaptive Heun (PEC) in log t; returns each row's token as a position in its support.

    Runs in the coordinates of the module docstring, y = x / t and mu = 1 / t - 1, with lam = -log t the
    variable the step h is taken in: each step is a few (rows, 1) and (rows, C) operations besides the
    posterior, because at LlamaGen's batch sizes per AR step the loop's small operations cost as much as
    the posterior itself.
    """
    n = noise.shape[0]
    result = torch.empty(n, dtype=torch.long, device=noise.device)
    y = noise  # = x / t at t = 1
    lam = torch.zeros(n, 1, dtype=noise.dtype, device=noise.device)
    mu = torch.zeros_like(lam)
    h = torch.full_like(lam, FIRST_STEP)
    lam_end = -math.log(t_min)
    active = torch.ones(n, dtype=torch.bool, device=noise.device)
    d = rows.posterior(y, mu)[0]
    while True:
        lam_s = torch.clamp(lam + h, max=lam_end)
        mu_s = torch.expm1(lam_s)
        dmu = mu_s - mu
        y_euler = torch.addcmul(y, dmu, d)
        at_end = lam_s.squeeze(1) >= lam_end
        d_pred, top, decided = rows.posterior(y_euler, mu_s, need_top=at_end)
        change = d_pred - d
        # Euler and trapezoid differ by dmu |d_pred - d| / 2 in y, i.e. in noise units.
        err = dmu * change.norm(dim=-1, keepdim=True) * 0.5
        accept = err <= tol
        y = torch.where(accept, torch.addcmul(y_euler, dmu, change, value=0.5), y)  # the trapezoid rule
        d = torch.where(accept, d_pred, d)
        lam = torch.where(accept, lam_s, lam)
        mu = torch.where(accept, mu_s, mu)
        h = torch.clamp(h * torch.clamp(0.9 * torch.sqrt(tol / err), 0.2, 4.0), max=MAX_STEP)
        if top is None:  # no row is a candidate for deciding, none is at t_min
            continue
        # Decided at the Euler prediction, within tol of the accepted point: the criterion has a wide margin.
        done = active & accept.squeeze(1) & (decided | at_end)
        if done.any():
            result[rows.index[done]] = top[done]
            active &= ~done
            n_active = int(active.sum())
            if n_active == 0:
                return result
            # Finished rows ride along (their results are ignored) until compacting pays for the copy.
            if n_active < 0.75 * active.shape[0]:
                y, d, lam, mu, h, keep = y[active], d[active], lam[active], mu[active], h[active], active
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
    chunk_elements=None,
):
    """Map per-token Gaussian noise to tokens distributed exactly as probs.

    noise (N, C), probs (N, V) with rows summing to 1 (zeros allowed: top-k/top-p), codebook (V, C).
    Returns (index (N,) int64, embedding (N, C) = codebook[index]).

    Deterministic: the same noise and probs give the same token, and a row's token does not depend on
    the other rows. Only the support of each row's p enters (a code with p_j = 0 is never returned): rows
    are padded to the largest support size K in the batch and run in chunks of chunk_elements / (2 K C)
    rows, which bounds the gathered codebook (two layouts of (rows, K, C)). chunk_elements defaults to 2**25
    on CPU and 2**28 on CUDA (128 MiB and 1 GiB of float32; peak use is about 1.5 times that).

    Solver kwargs, defaults chosen by measurement (benchmarks/RESULTS.md, "Flow-map solver"):
      solver      "adaptive" (default), "euler" (= DDIM) or "dpm2m" (DPM-Solver++(2M)); module docstring
      tol         1e-3: adaptive only, the local error allowed per step in noise units
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
    support = int((probs > 0).sum(dim=1).max())
    rows_per_chunk = max(1, chunk_elements // (2 * support * c))
    codebook_work = codebook.to(dtype)
    code_sq = codebook_work.square().sum(dim=1)
    for start in range(0, n, rows_per_chunk):
        stop = min(n, start + rows_per_chunk)
        chunk = probs[start:stop]
        # Each row's support first, in codebook order, padded with p = 0 slots (log 0 = -inf: zero weight).
        # A stable sort of the zero mask: 3x cheaper than topk(support) at V = 16384, K = 8000.
        idx = (chunk == 0).to(torch.uint8).sort(dim=1, stable=True).indices[:, :support]
        rows = _Rows(chunk.gather(1, idx).to(dtype).log(), codebook_work[idx], code_sq[idx], decided_tol)
        x = noise[start:stop].to(dtype)
        if solver == "adaptive":
            pos = _integrate_adaptive(x, rows, tol, t_min)
        else:
            pos = _integrate_grid(x, rows, grid, solver)
        index[start:stop] = idx.gather(1, pos.unsqueeze(1)).squeeze(1)
    return index, codebook[index]
