"""Hidden (implicit) attention of a selective scan, and token scores read from it.

Glossary: utrc_lib/GLOSSARY.md (B batch, N tokens, Di inner width, H heads, G groups, S state size,
K conv width). Here Ch is the width of the timescale: H heads (Mamba-2) or Di channels (Mamba-1);
g(c) is the group channel c reads B and C from (Mamba-1: one group).

The scan h_t = exp(Delta_t A) h_{t-1} + Delta_t B_t x_t, y_t = C_t . h_t (mamba-ssm's
`selective_scan_ref`, and SSD for Mamba-2) unrolls into a lower-triangular matrix per channel
(Ali, Zimerman, Wolf, "The Hidden Attention of Mamba Models", arXiv 2403.01590; docs/ssm_methods.md §2):

    alpha_c[i, j] = Delta_j[c] * sum_n C_i[g(c), n] B_j[g(c), n] exp(A[c, n] * sum_{k=j+1..i} Delta_k[c]),  j <= i

so that y_i[c] = sum_{j <= i} alpha_c[i, j] x_j[c] (+ the D skip). For Mamba-2 A is one scalar per
head (`ScanParams.scalar_a`) and the sum over n factors into (C_i . B_j) exp(A_h ...).

Token scores (larger = more important), each over a query set Q taken from the context, never from
the protected tail (choosing what to keep from the scored continuation would leak it):

    hattn_window   s_j = sum_{i in Q, i >= j} sum_c |alpha_c[i, j]|, Q = the last `window` reducible tokens
    hattn_last     the same with Q = the last reducible token (q = 1)
    hattn_colsum   s_j = sum_c |sum_{i >= j, i reducible} alpha_c[i, j]|, in one reverse scan
                   G_j = C_j + exp(A Delta_{j+1}) G_{j+1}, colsum_c[j] = Delta_j[c] (B_j . G_j[c]) (signed
                   inside a channel: rows can cancel)
    hattn_nodecay  s_j = sum_{i in Q, i >= j} sum_c Delta_j[c] |C_i . B_j| (the decay dropped)

Numerics: decay exponents are differences of float32 cumulative sums of Delta taken from the last query
backwards (both >= 0, times A <= 0); exp(A cum_i) is never divided by exp(A cum_j). Cost: the full
matrix is O(Ch S N^2): `hidden_attention_matrix` builds it for tests only. The window scores take
O(q N Ch S) in chunks of tokens (no N x N buffer); the column sums one O(N Ch S) reverse scan.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

CHUNK_ELEMENTS = 1 << 24  # float32 elements of the largest intermediate of one chunk (64 MiB)


@dataclass
class ScanParams:
    """The per-token inputs of one layer's selective scan that the hidden attention needs.

    delta: (B, N, Ch) float32 softplus timescale. Bm, Cm: (B, N, G, S) input / output projections
    (after the conv and its activation for Mamba-2; from x_proj for Mamba-1). A: (Ch, S) float32,
    -exp(A_log) (Mamba-2: each head's scalar repeated over S). scalar_a: A is constant over S.
    """

    delta: Tensor
    Bm: Tensor
    Cm: Tensor
    A: Tensor
    scalar_a: bool = False

    def __post_init__(self):
        if self.delta.dim() != 3 or self.Bm.dim() != 4 or self.Cm.shape != self.Bm.shape:
            raise ValueError(f"ScanParams: delta must be (B, N, Ch) and Bm, Cm (B, N, G, S), got "
                             f"{tuple(self.delta.shape)}, {tuple(self.Bm.shape)}, {tuple(self.Cm.shape)}")
        B, N, Ch = self.delta.shape
        G, S = self.Bm.shape[2:]
        if self.Bm.shape[:2] != (B, N) or tuple(self.A.shape) != (Ch, S) or Ch % G:
            raise ValueError(f"ScanParams: inconsistent shapes delta {tuple(self.delta.shape)}, B/C "
                             f"{tuple(self.Bm.shape)}, A {tuple(self.A.shape)} (A must be (Ch, S), Ch a multiple of G)")

    @property
    def group_of(self) -> Tensor:
        """(Ch,) long: the group each channel reads B and C from (contiguous blocks of Ch / G)."""
        Ch, G = self.delta.shape[-1], self.Bm.shape[2]
        return torch.arange(Ch, device=self.delta.device) // (Ch // G)

    def carry(self, plan, sizes: Tensor) -> "ScanParams":
        """The same parameters for the tokens after `plan` (the residual branch's rule: merged tokens
        average their members, size-weighted); used between matching rounds of one anchor."""
        B, N = self.delta.shape[:2]
        G, S = self.Bm.shape[2:]

        def go(x):
            return plan.apply(x.reshape(B, N, -1), "residual", sizes).reshape(B, plan.num_out, *x.shape[2:])

        return ScanParams(go(self.delta), go(self.Bm), go(self.Cm), self.A, self.scalar_a)


# -- readers: the captured projections -> ScanParams (pure torch; the hosts hook the modules) ------------

def from_mamba1(x_dbl: Tensor, dt_proj_weight: Tensor, dt_proj_bias, rank: int, A_log: Tensor,
                shape=None) -> ScanParams:
    """Mamba-1: x_proj's output (B, N, Rdt + 2 S) (or flattened with shape=(B, N)) -> ScanParams.

    Delta = softplus(dt_proj(dt)) (B, N, Di); B, C = the next two S-wide slices, one group; A = -exp(A_log) (Di, S).
    """
    if shape is not None:
        x_dbl = x_dbl.reshape(*shape, -1)
    S = (x_dbl.shape[-1] - rank) // 2
    dt = F.linear(x_dbl[..., :rank].float(), dt_proj_weight.float(),
                  None if dt_proj_bias is None else dt_proj_bias.float())
    delta = F.softplus(dt)  # (B, N, Di)
    Bm = x_dbl[..., rank:rank + S].float()[:, :, None, :]  # (B, N, 1, S)
    Cm = x_dbl[..., rank + S:rank + 2 * S].float()[:, :, None, :]
    return ScanParams(delta, Bm, Cm, -torch.exp(A_log.float()), scalar_a=False)


def from_mamba2(zxbcdt: Tensor, conv_weight: Tensor, conv_bias, dt_bias: Tensor, A_log: Tensor, *, heads: int,
                groups: int, state: int, limit=(0.0, float("inf")), mask=None, shape=None) -> ScanParams:
    """Mamba-2: in_proj's output (B, N, d_in_proj) -> ScanParams.

    The last H channels are dt (Delta = softplus(dt + dt_bias), clamped to `limit`); the 2 G S channels
    before them are the B and C inputs of the depthwise conv, whose last 2 G S filters (conv_weight
    (conv_dim, 1, K)) and SiLU this function applies itself (the fused kernels never expose their
    output). mask: (B, N) 0/1 of valid tokens (padding zeroed before and after the conv, as the hosts do).
    """
    if shape is not None:
        zxbcdt = zxbcdt.reshape(*shape, -1)
    H, G, S = heads, groups, state
    Bsz, N = zxbcdt.shape[:2]
    dt = F.softplus(zxbcdt[..., -H:].float() + dt_bias.float())
    lo, hi = limit
    if lo > 0.0 or hi != float("inf"):
        dt = dt.clamp(lo, hi)
    bc = zxbcdt[..., -(H + 2 * G * S):-H].float()  # (B, N, 2 G S) conv inputs of B and C
    if mask is not None:
        bc = bc * mask[..., None].to(bc.dtype)
    w = conv_weight[-2 * G * S:].float()  # (2 G S, 1, K)
    b = None if conv_bias is None else conv_bias[-2 * G * S:].float()
    K = w.shape[-1]
    out = F.conv1d(bc.transpose(1, 2), w, b, padding=K - 1, groups=2 * G * S)[..., :N]  # causal
    out = F.silu(out).transpose(1, 2)  # (B, N, 2 G S)
    if mask is not None:
        out = out * mask[..., None].to(out.dtype)
    Bm = out[..., :G * S].reshape(Bsz, N, G, S)
    Cm = out[..., G * S:].reshape(Bsz, N, G, S)
    A = (-torch.exp(A_log.float()))[:, None].expand(H, S).contiguous()
    return ScanParams(dt, Bm, Cm, A, scalar_a=True)


# -- query sets ------------------------------------------------------------------------------------------

def query_positions(reducible: Tensor, window: int) -> tuple[Tensor, Tensor]:
    """The last `window` reducible tokens of each sample: (positions (B, w) descending, ok (B, w) bool);
    samples with fewer reducible tokens have ok False on the rest."""
    B, N = reducible.shape
    w = max(1, min(int(window), N))
    ar = torch.arange(N, device=reducible.device).expand(B, N)
    key = torch.where(reducible, ar, torch.full_like(ar, -1))
    top = key.sort(dim=1, descending=True).values[:, :w]
    return top.clamp_min(0), top >= 0


# -- vectorised scores -----------------------------------------------------------------------------------

def window_scores(scan: ScanParams, reducible: Tensor, window: int, *, decay: bool = True,
                  chunk_elements: int = CHUNK_ELEMENTS) -> Tensor:
    """(B, N) float32 s_j = sum_{i in Q, i >= j} sum_c |alpha_c[i, j]| (decay=False: the decay-free
    form sum_c Delta_j[c] |C_i . B_j|), Q = the last `window` reducible tokens; chunks of tokens j,
    each intermediate at most `chunk_elements` elements. Scores of non-reducible tokens are 0."""
    delta = scan.delta.float()
    B, N, Ch = delta.shape
    G, S = scan.Bm.shape[2:]
    dev = delta.device
    qpos, qok = query_positions(reducible, window)  # (B, w)
    w = qpos.shape[1]
    ar = torch.arange(N, device=dev)
    # Delta summed from the last query backwards, exclusive of the token itself: rev[j] = sum_{k=j+1..q_max} Delta_k
    d_upto = delta * (ar[None, :] <= qpos[:, :1])[..., None]
    rev = d_upto.flip(1).cumsum(1).flip(1) - d_upto  # (B, N, Ch), >= 0
    rev_q = rev.gather(1, qpos[..., None].expand(B, w, Ch))  # (B, w, Ch)
    Cq = scan.Cm.float().gather(1, qpos[:, :, None, None].expand(B, w, G, S))  # (B, w, G, S)
    gof = scan.group_of
    general = decay and not scan.scalar_a
    if general:
        Cq_c = Cq[:, :, gof]  # (B, w, Ch, S)
        per_token = B * w * Ch * S
    else:
        per_token = B * w * (Ch + G)
    nc = max(1, min(N, chunk_elements // max(1, per_token)))
    scores = torch.zeros(B, N, dtype=torch.float32, device=dev)
    for j0 in range(0, N, nc):
        j1 = min(N, j0 + nc)
        Bj = scan.Bm[:, j0:j1].float()  # (B, nc, G, S)
        dj = delta[:, j0:j1]  # (B, nc, Ch)
        ok = qok[:, :, None] & (qpos[:, :, None] >= ar[None, None, j0:j1])  # (B, w, nc): causal rows only
        if general:  # Mamba-1: per channel and state, sum over n before the absolute value
            seg = (rev[:, None, j0:j1] - rev_q[:, :, None]).clamp_min(0)  # (B, w, nc, Ch)
            e = torch.exp(scan.A[None, None, None] * seg[..., None])  # (B, w, nc, Ch, S)
            alpha = (e * Cq_c[:, :, None] * Bj[:, None][:, :, :, gof]).sum(-1) * dj[:, None]  # (B, w, nc, Ch)
            contrib = alpha.abs().sum(-1)
        else:
            cb = torch.einsum("bwgs,bjgs->bwjg", Cq, Bj)[..., gof]  # (B, w, nc, Ch)
            if decay:  # Mamba-2: one scalar A per head
                seg = (rev[:, None, j0:j1] - rev_q[:, :, None]).clamp_min(0)
                contrib = (cb * torch.exp(scan.A[:, 0] * seg) * dj[:, None]).abs().sum(-1)
            else:
                contrib = (cb.abs() * dj[:, None]).sum(-1)
        scores[:, j0:j1] = (contrib * ok).sum(1)
    return scores * reducible


def colsum_scores(scan: ScanParams, reducible: Tensor) -> Tensor:
    """(B, N) float32 s_j = sum_c |sum_{i >= j, i reducible} alpha_c[i, j]| by one reverse scan over
    the tokens (state (B, Ch, S)): G_j = m_j C_j + exp(A Delta_{j+1}) G_{j+1}, colsum_c[j] =
    Delta_j[c] (B_j . G_j[c]), m the reducible mask (rows from the context only). Non-reducible: 0."""
    delta = scan.delta.float()
    B, N, Ch = delta.shape
    S = scan.Bm.shape[3]
    gof = scan.group_of
    m = reducible.float()
    state = torch.zeros(B, Ch, S, dtype=torch.float32, device=delta.device)
    scores = torch.zeros(B, N, dtype=torch.float32, device=delta.device)
    for t in range(N - 1, -1, -1):
        if t < N - 1:
            state = state * torch.exp(scan.A[None] * delta[:, t + 1, :, None])
        state = state + m[:, t, None, None] * scan.Cm[:, t].float()[:, gof]
        col = delta[:, t] * (scan.Bm[:, t].float()[:, gof] * state).sum(-1)  # (B, Ch) signed column sums
        scores[:, t] = col.abs().sum(-1)
    return scores * reducible


def hattn_scores(variant: str, scan: ScanParams, reducible: Tensor, window: int = 8) -> Tensor:
    """Scores of one variant: "window", "last", "colsum" or "nodecay" (see the module docstring)."""
    if scan is None:
        raise ValueError(f"hidden-attention metric 'hattn_{variant}' needs the scan parameters (Delta, B, C, A); "
                         f"this host or call did not provide them (reduce_tokens(..., scan=ScanParams(...)))")
    if reducible is None:
        raise ValueError("hidden-attention metrics need the reducible mask (to take queries from the context)")
    if variant == "window":
        return window_scores(scan, reducible, window)
    if variant == "last":
        return window_scores(scan, reducible, 1)
    if variant == "nodecay":
        return window_scores(scan, reducible, window, decay=False)
    if variant == "colsum":
        return colsum_scores(scan, reducible)
    raise ValueError(f"unknown hidden-attention variant {variant!r}; valid: window, last, colsum, nodecay")


# -- slow twins (tests) ----------------------------------------------------------------------------------

def hidden_attention_matrix(scan: ScanParams, *, decay: bool = True) -> Tensor:
    """(B, Ch, N, N) float64 alpha_c[i, j] by the definition, with plain loops over i and j (tests only:
    O(Ch S N^2)). decay=False drops the exp factor."""
    delta = scan.delta.double()
    B, N, Ch = delta.shape
    gof = scan.group_of
    A = scan.A.double()
    Bm, Cm = scan.Bm.double()[:, :, gof], scan.Cm.double()[:, :, gof]  # (B, N, Ch, S)
    out = torch.zeros(B, Ch, N, N, dtype=torch.float64, device=delta.device)
    for i in range(N):
        for j in range(i + 1):
            seg = delta[:, j + 1:i + 1].sum(1)  # (B, Ch): sum_{k=j+1..i} Delta_k
            e = torch.exp(A[None] * seg[..., None]) if decay else torch.ones_like(Bm[:, 0])
            out[:, :, i, j] = delta[:, j] * (Cm[:, i] * Bm[:, j] * e).sum(-1)
    return out


def scores_loop(variant: str, scan: ScanParams, reducible: Tensor, window: int = 8) -> Tensor:
    """Twin of `hattn_scores`: the scores read from the full matrix, one sample and one token at a time."""
    B, N = reducible.shape
    out = torch.zeros(B, N, dtype=torch.float64)
    mat = hidden_attention_matrix(scan, decay=variant != "nodecay")
    for b in range(B):
        red = [t for t in range(N) if bool(reducible[b, t])]
        if not red:
            continue
        if variant == "colsum":
            for j in red:
                col = sum(mat[b, :, i, j] for i in red if i >= j)
                out[b, j] = float(col.abs().sum())
            continue
        w = 1 if variant == "last" else window
        queries = red[-w:]
        for j in red:
            out[b, j] = sum(float(mat[b, :, i, j].abs().sum()) for i in queries if i >= j)
    return out


def selective_scan_loop(x: Tensor, scan: ScanParams) -> Tensor:
    """Reference scan (tests): x (B, N, Ch, P) -> y (B, N, Ch, P), h_t = exp(Delta_t A) h_{t-1} +
    Delta_t B_t x_t, y_t = C_t . h_t (no D skip, no gate), float64, one token at a time."""
    delta = scan.delta.double()
    B, N, Ch = delta.shape
    P, S = x.shape[-1], scan.Bm.shape[3]
    gof = scan.group_of
    A = scan.A.double()
    h = torch.zeros(B, Ch, P, S, dtype=torch.float64)
    ys = []
    for t in range(N):
        dA = torch.exp(A[None] * delta[:, t, :, None])  # (B, Ch, S)
        Bt, Ct = scan.Bm[:, t].double()[:, gof], scan.Cm[:, t].double()[:, gof]  # (B, Ch, S)
        h = dA[:, :, None] * h + (delta[:, t, :, None, None] * x[:, t].double()[..., None] * Bt[:, :, None])
        ys.append((h * Ct[:, :, None]).sum(-1))
    return torch.stack(ys, 1)
