"""Memory-efficient Swin window attention for training, a drop-in for MONAI's ``WindowAttention``.

MONAI's ``WindowAttention`` computes, per window and head, the n x n matrix softmax(q k^T * scale + B + M) (n = 343 for
a 7^3 window; B the relative-position bias, M the shifted-window mask) and autograd keeps it for the backward pass:
125 windows x 3 heads x 343^2 floats = 176 MB per 64^3 crop and Swin block in stage 0, most of a VoCo step's memory and
much of its time (the matrices go through main memory several times). MONAI's ``use_flash_attention`` helps only with
gradients off.

Here the forward pass is PyTorch's fused CPU flash attention (``scaled_dot_product_attention``'s CPU kernel, the bias
and mask as an additive ``attn_mask``), which keeps only the output and the per-row log-sum-exp. The backward pass
recomputes the attention probabilities a few windows at a time (P = exp(S - lse), S = q k^T * scale + B + M) in two
reused cache-sized buffers and from them the gradients of q, k, v and of the bias B (dB = sum over windows of
P * (dP - rowsum(dO * O)), dP = dO v^T) - so no per-window matrix outlives its chunk, in either pass. The core runs
in float32 whatever the autocast dtype. On other devices (CUDA) the forward is the same chunked arithmetic with plain
tensor ops and larger chunks; it has not been measured on a GPU (``benchmarks/gpu_check.sh`` compares it with MONAI's
attention there).

The maths is MONAI's exactly, including its quirks: padded tokens (zeros after ``norm1``) are attended to, the shift
mask is -100 (not -inf), and a window smaller than ``window_size`` indexes ``relative_position_index[:n, :n]``.
Parameters and buffers are MONAI's (same names and shapes): ``EfficientWindowAttention`` is a subclass that only
replaces ``forward``, so state dicts move between MONAI's SwinUNETR and ours unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from monai.networks.nets.swin_unetr import WindowAttention
from torch import nn

from voco.shapes import WINDOW_ATTENTION_IMPLS

#: elements of one chunk of attention probabilities in the backward pass (x 4 bytes, two buffers): about 4 windows x
#: 3 heads x 343^2 - large enough for efficient batched matmuls, small enough to stay in the CPU caches
CHUNK_ELEMENTS = 4 * 3 * 343 * 343

#: in shifted windows, attention logits more than this far below their row's log-sum-exp are treated as exactly that
#: far in the backward pass's exp: their probabilities (< e^-60 ~ 1e-26) change by less than 1e-26, and the exp of the
#: -100 mask entries would otherwise be subnormal numbers, which the vectorised exp computes ~100x slower
LOGIT_FLOOR = 60.0


def _chunk_elements(device: torch.device) -> int:
    """Elements of one chunk of attention matrices: cache-sized on CPU, larger on accelerators."""
    return CHUNK_ELEMENTS if device.type == "cpu" else 64 * CHUNK_ELEMENTS


def _row_chunks(b: int, nw: int, per_window: int, budget: int) -> Iterator[tuple[int, int, int, int]]:
    """Rows ``[r0, r1)`` of the (b = crops * nw) windows, never crossing a crop, with their window indices ``[i0, i1)``.

    ``per_window``: elements of one window's (heads, n, n) matrices; a chunk holds about ``budget`` elements.
    """
    step = max(1, min(nw, budget // max(1, per_window)))
    for c0 in range(0, b, nw):
        for i0 in range(0, nw, step):
            i1 = min(nw, i0 + step)
            yield c0 + i0, c0 + i1, i0, i1


def _forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    fused: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + bias + mask) v without keeping the matrices: (out (b, h, n, d), lse (b, h, n)).

    ``fused`` (default: on CPU) uses PyTorch's CPU flash-attention kernel; otherwise the same maths in chunks of
    windows with plain tensor ops (any device).
    """
    b, h, n, d = q.shape
    fused = q.device.type == "cpu" if fused is None else fused
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if mask is None and fused:
        out, lse = flash(q, k, v, attn_mask=bias.unsqueeze(0), scale=scale)
        return out, lse
    nw = mask.shape[0] if mask is not None else b
    out = torch.empty_like(q)
    lse = torch.empty(b, h, n, dtype=torch.float32, device=q.device)
    buf: torch.Tensor | None = None
    for r0, r1, i0, i1 in _row_chunks(b, nw, h * n * n, _chunk_elements(q.device)):
        c = r1 - r0
        if buf is None:
            buf = q.new_empty(c * h * n * n)
        s = buf[: c * h * n * n].view(c, h, n, n)
        if fused:
            torch.add(bias.unsqueeze(0), mask[i0:i1].unsqueeze(1), out=s)  # type: ignore[index]
            out[r0:r1], lse[r0:r1] = flash(q[r0:r1], k[r0:r1], v[r0:r1], attn_mask=s, scale=scale)
            continue
        s3 = s.view(c * h, n, n)
        torch.baddbmm(s3, q[r0:r1].reshape(c * h, n, d), k[r0:r1].reshape(c * h, n, d).transpose(1, 2), beta=0.0,
                      alpha=scale, out=s3)
        s.add_(bias)
        if mask is not None:
            s.add_(mask[i0:i1].unsqueeze(1))
        ls = torch.logsumexp(s, -1, keepdim=True)
        s.sub_(ls).exp_()
        lse[r0:r1] = ls.squeeze(-1)
        torch.bmm(s3, v[r0:r1].reshape(c * h, n, d), out=out[r0:r1].view(c * h, n, d))
    return out, lse


class _WindowAttentionFn(torch.autograd.Function):
    """softmax(q k^T * scale + bias + mask[window]) v with a recomputing, chunked backward (fp32 inside)."""

    @staticmethod
    def forward(ctx, q, k, v, bias, mask, scale, fused):
        out, lse = _forward(q, k, v, bias, mask, scale, fused)
        ctx.save_for_backward(q, k, v, bias, mask, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, bias, mask, out, lse = ctx.saved_tensors
        scale = ctx.scale
        b, h, n, d = q.shape
        dout = dout.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        dbias = torch.zeros_like(bias) if ctx.needs_input_grad[3] else None
        delta = (dout * out).sum(-1, keepdim=True)  # (b, h, n, 1): rowsum(dO * O)
        nw = mask.shape[0] if mask is not None else b
        bufs: tuple[torch.Tensor, torch.Tensor] | None = None
        part = torch.empty_like(bias) if dbias is not None else None
        for r0, r1, i0, i1 in _row_chunks(b, nw, h * n * n, _chunk_elements(q.device)):
            c, m = r1 - r0, (r1 - r0) * h
            if bufs is None:
                bufs = (q.new_empty(m * n * n), q.new_empty(m * n * n))
            p, dp = bufs[0][: m * n * n].view(m, n, n), bufs[1][: m * n * n].view(m, n, n)
            qc, kc = q[r0:r1].reshape(m, n, d), k[r0:r1].reshape(m, n, d)
            vc, doc = v[r0:r1].reshape(m, n, d), dout[r0:r1].reshape(m, n, d)
            # P = exp(q k^T * scale + bias (+ mask) - lse); in shifted windows the exponent is floored (LOGIT_FLOOR)
            p4 = p.view(c, h, n, n)
            torch.sub(bias, lse[r0:r1].unsqueeze(-1), out=p4)
            p.baddbmm_(qc, kc.transpose(1, 2), alpha=scale)
            if mask is not None:
                p4.add_(mask[i0:i1].unsqueeze(1))
                p.clamp_min_(-LOGIT_FLOOR)
            p.exp_()
            torch.bmm(p.transpose(1, 2), doc, out=dv[r0:r1].view(m, n, d))
            # dS = P * (dO v^T - delta), in place of dP
            torch.bmm(doc, vc.transpose(1, 2), out=dp)
            dp.sub_(delta[r0:r1].reshape(m, n, 1)).mul_(p)
            if dbias is not None:
                if c == 1:
                    dbias.add_(dp.view(h, n, n))
                else:
                    dbias.add_(torch.sum(dp.view(c, h, n, n), 0, out=part))
            torch.baddbmm(dq[r0:r1].view(m, n, d), dp, kc, beta=0.0, alpha=scale, out=dq[r0:r1].view(m, n, d))
            torch.baddbmm(dk[r0:r1].view(m, n, d), dp.transpose(1, 2), qc, beta=0.0, alpha=scale,
                          out=dk[r0:r1].view(m, n, d))
        return dq, dk, dv, dbias, None, None, None


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    fused: bool | None = None,
) -> torch.Tensor:
    """Windowed multi-head attention softmax(q k^T * scale + bias + mask[w]) v, memory-efficient in both passes.

    Args:
        q, k, v: ``(b, h, n, d)``: b = crops * nw windows (window index fastest, as MONAI's ``window_partition``),
            h heads, n tokens per window, d channels per head.
        bias: ``(h, n, n)`` relative-position bias (may require a gradient).
        mask: ``(nw, n, n)`` additive shifted-window mask (0 / -100), or None (no shift).
        scale: multiplier of q k^T (head_dim ** -0.5).
        fused: forward with PyTorch's CPU flash-attention kernel (default: on CPU) or with chunked tensor ops.

    Returns:
        ``(b, h, n, d)`` in q's dtype. Computed in float32 (inputs in another dtype are cast, results cast back).
    """
    if mask is not None and q.shape[0] % mask.shape[0]:
        raise ValueError(f"window_attention: {q.shape[0]} windows are not a multiple of the mask's {mask.shape[0]}")
    dtype = q.dtype
    with torch.profiler.record_function("voco::window_attention"):
        q, k, v = (t.float().contiguous() for t in (q, k, v))
        bias = bias.float().contiguous()
        mask = mask.float().contiguous() if mask is not None else None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, bias)):
            out = _WindowAttentionFn.apply(q, k, v, bias, mask, float(scale), fused)
        else:
            out = _forward(q, k, v, bias, mask, float(scale), fused)[0]
        return out.to(dtype)


class EfficientWindowAttention(WindowAttention):
    """MONAI ``WindowAttention`` (same parameters, buffers and maths) whose forward is ``window_attention``.

    Made from an existing MONAI module in place by ``from_monai`` (its class is switched; nothing is re-initialised),
    so a model built with a seed has exactly the weights MONAI's would have. Attention dropout > 0 in training falls
    back to MONAI's forward (it needs the probabilities).
    """

    @classmethod
    def from_monai(cls, module: WindowAttention) -> EfficientWindowAttention:
        if not isinstance(module, WindowAttention):
            raise TypeError(f"expected a MONAI WindowAttention, got {type(module).__name__}")
        module.__class__ = cls
        return module  # type: ignore[return-value]

    def to_monai(self) -> WindowAttention:
        """Switch back to MONAI's own forward (in place)."""
        self.__class__ = WindowAttention
        return self

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x ``(b, n, C)`` windows of tokens, mask ``(nw, n, n)`` or None -> ``(b, n, C)``."""
        if self.training and self.attn_drop.p > 0:
            return super().forward(x, mask)
        b, n, c = x.shape
        h = self.num_heads
        qkv = self.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        index = self.relative_position_index[:n, :n].reshape(-1)  # type: ignore[index]
        bias = self.relative_position_bias_table[index].view(n, n, h).permute(2, 0, 1)
        out = window_attention(q, k, v, bias, mask, self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


def set_window_attention(model: nn.Module, impl: str = "efficient") -> int:
    """Switch every Swin ``WindowAttention`` in ``model`` to ``impl`` (``efficient`` | ``monai``) in place.

    Returns:
        how many attention modules ``model`` has.
    Raises:
        ValueError: unknown ``impl``.
    """
    if impl not in WINDOW_ATTENTION_IMPLS:
        raise ValueError(f"window attention {impl!r} unknown; choose from {', '.join(WINDOW_ATTENTION_IMPLS)}")
    count = 0
    for m in model.modules():
        if isinstance(m, WindowAttention):
            count += 1
            if impl == "efficient" and not isinstance(m, EfficientWindowAttention):
                EfficientWindowAttention.from_monai(m)
            elif impl == "monai" and isinstance(m, EfficientWindowAttention):
                m.to_monai()
    return count
