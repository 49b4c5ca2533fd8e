"""Optimal transport by IPOT, batched: the solver behind UNITER's word-region alignment (WRA).

    [IPOT] Yujia Xie, Xiangfeng Wang, Ruijia Wang, Hongyuan Zha, "A Fast Proximal Point Method
    for Computing Exact Wasserstein Distance", UAI 2019 (PMLR 115), arXiv 1802.04307.

The solver is another paper's algorithm, so it lives here; uniter.py imports it (uniter.ipot is
this function) and writes the WRA distance and loss on top of it. [code] = the official UNITER
code, github.com/ChenRocks/UNITER, model/ot.py (`ipot`, `optimal_transport_dist`).

Tests: tests/test_losses.py, `test_uniter_ipot_*` (marginals, zeros on padding, the batched plan against a loop, and
POT's exact EMD). Timing: `python bench.py --ipot`.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def ipot(cost: Tensor, x_mask: Tensor, y_mask: Tensor, beta: float = 0.5, iters: int = 50,
         k: int = 1) -> Tensor:
    """Transport plans between text tokens and regions by IPOT [IPOT], batched, as the WRA of
    [UNITER §3.2, Eq. 3; §A.7, Eq. 6, Algorithm 1; code] uses it. Computed without gradient, in
    cost's dtype (fp32 or fp64). The defaults β = 0.5, iters = 50, k = 1 are [code]'s
    (optimal_transport_dist); k = 1 is also Algorithm 1's "K = 1 in practice".

    The exact problem, for each example b with n_x real tokens and n_y real regions:

        T* = argmin_{T >= 0} Σ_ij C_ij T_ij   such that   Σ_j T_ij = 1/n_x,  Σ_i T_ij = 1/n_y

    IPOT is a proximal-point method: each outer step solves the problem with a KL penalty
    β · KL(T ‖ T_prev) towards the previous plan, approximately, by k Sinkhorn scalings of the
    kernel Q = exp(-C/β) ⊙ T_prev:

        Q = G ⊙ T          G = exp(-C / β), 0 on padded pairs;  T starts at 1 on real pairs
        b = ν / (Qᵀ a)     region scaling,  ν = 1/n_y on real regions, 0 on padding
        a = μ / (Q b)      token scaling,   μ = 1/n_x on real tokens,  0 on padding
        T = diag(a) Q diag(b)

    Unlike plain Sinkhorn, the penalty is towards T_prev, not towards uniform, so the plans
    converge to the exact T* as iters grows, for any β. As [code], a starts at μ and is updated
    last, so the token marginals (rows) are exact after any number of iterations and the region
    marginals (columns) are approximate; after 50 iterations at β = 0.5 they are close.
    [paper ≠ code]: Algorithm 1 of [UNITER §A.7] updates the other scaling last (the regions'),
    which makes the column marginals the exact ones; both converge to T*, and after 50
    iterations the distances Σ C ⊙ T differ by a median 1.6e-5 (at most 3.1e-4) on 200 random
    cosine costs of 5-29 tokens and 10-36 regions (fp64).

    β must keep exp(-C/β) a normal float: for WRA's costs (C <= 2) in fp32 a row of costs 2
    leaves the normal range (e^-87) below β ≈ 0.023 and its plan turns NaN (measured: β 0.0225
    NaN, 0.023 finite); uniter.Config asks for ipot_beta >= 0.03, a margin above that.

        symbol   variable / shape
        C        cost (B, T, N); values on padded pairs are ignored (they may be anything)
        real     x_mask (B, T) and y_mask (B, N), True = a real token / region
        μ, ν     built here from the masks: 1/n_x and 1/n_y on the real entries
        T        the returned plan (B, T, N): >= 0, exact zeros on padded rows and columns
                 (in the equations T is the plan, as in [code]; in shapes, the text length)

    An example with no real token or no real region gets an all-zero plan. exp(-C/β) must neither
    overflow nor underflow: for the cosine costs of WRA (C in [0, 2]) and β = 0.5 it lies in
    [e^-4, 1].
    """
    if cost.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"ipot computes in fp32 or fp64; cost is {cost.dtype} "
                         f"(cast it with .float() first)")
    if cost.dim() != 3:
        raise ValueError(f"cost must be (B, T, N), got shape {tuple(cost.shape)}")
    B, T, N = cost.shape
    if x_mask.shape != (B, T) or y_mask.shape != (B, N):
        raise ValueError(f"for cost {tuple(cost.shape)} x_mask must be {(B, T)} and y_mask "
                         f"{(B, N)}, got {tuple(x_mask.shape)} and {tuple(y_mask.shape)}")
    if x_mask.dtype != torch.bool or y_mask.dtype != torch.bool:
        raise ValueError(f"x_mask and y_mask must be bool (True = real), "
                         f"got {x_mask.dtype} and {y_mask.dtype}")
    if not beta > 0 or iters < 1 or k < 1:
        raise ValueError(f"need beta > 0, iters >= 1 and k >= 1, got {beta}, {iters}, {k}")

    with torch.autocast(cost.device.type, enabled=False):  # bmm in cost's dtype, not bf16
        # an example with no real token or no real region counts as having neither: all-zero plan
        x_real = x_mask & y_mask.any(dim=1, keepdim=True)  # (B, T)
        y_real = y_mask & x_mask.any(dim=1, keepdim=True)  # (B, N)
        real_pair = x_real[:, :, None] & y_real[:, None, :]  # (B, T, N)
        mu = x_real.to(cost.dtype)  # (B, T), then 1/n_x on real tokens, 0 on padding
        nu = y_real.to(cost.dtype)  # (B, N), then 1/n_y on real regions, 0 on padding
        mu = (mu / mu.sum(dim=1, keepdim=True).clamp(min=1))[:, None, :]  # (B, 1, T), a row for bmm
        nu = (nu / nu.sum(dim=1, keepdim=True).clamp(min=1))[:, None, :]  # (B, 1, N)
        x_pad = (~x_real).to(cost.dtype)[:, None, :]  # (B, 1, T): 1 on padding, so 0/1 = 0 there
        y_pad = (~y_real).to(cost.dtype)[:, None, :]  # (B, 1, N)
        kernel = torch.where(real_pair, torch.exp(-cost / beta), 0.0)  # (B, T, N): G
        plan = real_pair.to(cost.dtype)  # (B, T, N): T starts at 1 on real pairs
        a = mu  # (B, 1, T)
        floor = torch.finfo(cost.dtype).tiny * 1e8  # 1.2e-30 in fp32, 2.2e-300 in fp64: see below
        for i in range(iters):
            Q = plan.mul_(kernel)  # (B, T, N): G ⊙ T, in place (this T is not needed again)
            for _ in range(k):
                b = nu / (torch.bmm(a, Q) + y_pad)  # (B, 1, N): ν / (Qᵀ a), exact 0 on padding
                a = mu / (torch.bmm(b, Q.transpose(1, 2)) + x_pad)  # (B, 1, T): μ / (Q b)
            plan = Q.mul_(a.transpose(1, 2)).mul_(b)  # (B, T, N): diag(a) Q diag(b), in place
            # DEVIATION (speed only): entries below `floor` become exact zeros. The entries that the
            # exact plan sets to 0 shrink geometrically (by up to e^-4 an iteration when C = 2 and
            # β = 0.5); in fp32 they reach denormal numbers (below 1.2e-38) within a few dozen
            # iterations, and CPU arithmetic on denormals is several times slower. The floor sits
            # 1e8 (~e^18) above them, so an entry just above it needs more than 4 iterations to
            # become denormal: clearing every 3rd iteration (and after the last) is enough, and
            # costs a third of clearing every time. What is dropped moves d by less than
            # 2·T·N·floor. (torch.set_flush_denormal is process-wide state, not ours to flip.)
            if i % 3 == 2 or i == iters - 1:
                F.threshold(plan, floor, 0.0, inplace=True)  # (B, T, N)
    return plan
