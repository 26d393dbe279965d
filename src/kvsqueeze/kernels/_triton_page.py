"""The Triton program behind `triton_attention` (imported only when triton is installed).

One program per (batch, query head, query token) row: online softmax over one packed page.
Keys: planar integer codes (B, Hkv, T, D*bits/8), per-channel scale/zero (B, Hkv, T/gk, D).
Values: planar integer codes, per-token scale/zero (B, Hkv, T, D/gv). Symmetric codes have no
zero tensor; their offset is ``-mid * scale``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..quant.packed import PackedTensor


@triton.jit
def _page_kernel(
    q_ptr, kc_ptr, ks_ptr, kz_ptr, vc_ptr, vs_ptr, vz_ptr, bias_ptr, o_ptr, lse_ptr,
    n_tokens, scaling, k_mid, v_mid,
    sq_b, sq_h, sq_l, skc_b, skc_h, skc_t, sks_b, sks_h, sks_t, svc_b, svc_h, svc_t, svs_b, svs_h, svs_t,
    sbias_b, sbias_h, sbias_l,
    HQ: tl.constexpr, LQ: tl.constexpr, GROUP: tl.constexpr,  # GROUP: query heads per kv head
    KB: tl.constexpr, VB: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr,
    K_ZERO: tl.constexpr, V_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr,
    D: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b, hq, i = row // (HQ * LQ), (row // LQ) % HQ, row % LQ
    h = hq // GROUP
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * sq_b + hq * sq_h + i * sq_l + d).to(tl.float32) * scaling
    # planar codes: channel c sits in byte c % plane at bit (c // plane) * bits, plane = D * bits / 8
    k_byte, k_shift = d % (D * KB // 8), (d // (D * KB // 8)) * KB
    v_byte, v_shift = d % (D * VB // 8), (d // (D * VB // 8)) * VB
    m_i = -float("inf")
    l_i = 0.0
    acc = tl.zeros([D], dtype=tl.float32)
    for t0 in range(0, n_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        live = t < n_tokens
        kc = tl.load(
            kc_ptr + b * skc_b + h * skc_h + t[:, None] * skc_t + k_byte[None, :], mask=live[:, None], other=0
        )
        kcode = ((kc.to(tl.int32) >> k_shift[None, :]) & ((1 << KB) - 1)).to(tl.float32)
        soff = b * sks_b + h * sks_h + (t // KG)[:, None] * sks_t + d[None, :]
        ks = tl.load(ks_ptr + soff, mask=live[:, None], other=0.0).to(tl.float32)
        if K_ZERO:  # noqa: SIM108 (a constexpr branch: Triton compiles only one side)
            kz = tl.load(kz_ptr + soff, mask=live[:, None], other=0.0).to(tl.float32)
        else:
            kz = -k_mid * ks
        s = tl.sum(q[None, :] * (kcode * ks + kz), axis=1)
        if HAS_BIAS:
            s += tl.load(bias_ptr + b * sbias_b + hq * sbias_h + i * sbias_l + t, mask=live, other=0.0)
        s = tl.where(live, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)  # nothing visible yet: weights 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        vc = tl.load(
            vc_ptr + b * svc_b + h * svc_h + t[:, None] * svc_t + v_byte[None, :], mask=live[:, None], other=0
        )
        vcode = ((vc.to(tl.int32) >> v_shift[None, :]) & ((1 << VB) - 1)).to(tl.float32)
        voff = b * svs_b + h * svs_h + t[:, None] * svs_t + (d // VG)[None, :]
        vs = tl.load(vs_ptr + voff, mask=live[:, None], other=0.0).to(tl.float32)
        if V_ZERO:  # noqa: SIM108
            vz = tl.load(vz_ptr + voff, mask=live[:, None], other=0.0).to(tl.float32)
        else:
            vz = -v_mid * vs
        acc = acc * alpha + tl.sum(p[:, None] * (vcode * vs + vz), axis=0)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        m_i = m_new
    out = tl.where(l_i > 0, acc / l_i, 0.0)
    tl.store(o_ptr + row * D + d, out)
    tl.store(lse_ptr + row, tl.where(l_i > 0, m_i + tl.log(l_i), -float("inf")))


def packed_page_attention(
    q: torch.Tensor,
    key: PackedTensor,
    value: PackedTensor,
    n: int,
    bias: torch.Tensor | None,
    scaling: float,
    block_t: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, Hq, Lq, D) float32, lse (B, Hq, Lq)) of q over the first n tokens of a page.

    On CPU tensors this runs only under ``TRITON_INTERPRET=1`` (set before triton is imported)."""
    b, hq, lq, d = q.shape
    hkv = key.codes.shape[1]
    out = torch.empty(b, hq, lq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    if bias is not None:
        bias = bias.float().expand(b, hq, lq, n).contiguous()
    ks, vs = key.spec, value.spec
    kz = key.zero if key.zero is not None else key.scale
    vz = value.zero if value.zero is not None else value.scale
    bias_arg = bias if bias is not None else out
    bias_strides = bias.stride()[:3] if bias is not None else (0, 0, 0)
    k_mid = 2 ** (ks.bits - 1) if ks.symmetric else 0
    v_mid = 2 ** (vs.bits - 1) if vs.symmetric else 0
    args = (
        q,
        key.codes,
        key.scale,
        kz,
        value.codes,
        value.scale,
        vz,
        bias_arg,
        out,
        lse,
        n,
        scaling,
        k_mid,
        v_mid,
    )
    strides = (
        *q.stride()[:3], *key.codes.stride()[:3], *key.scale.stride()[:3],
        *value.codes.stride()[:3], *value.scale.stride()[:3], *bias_strides,
    )  # fmt: skip
    meta = dict(
        HQ=hq, LQ=lq, GROUP=hq // hkv, KB=ks.bits, VB=vs.bits, KG=ks.group_size, VG=vs.group_size,
        K_ZERO=key.zero is not None, V_ZERO=value.zero is not None, HAS_BIAS=bias is not None, D=d, BLOCK_T=block_t,
    )  # fmt: skip
    _page_kernel[(b * hq * lq,)](*args, *strides, **meta)
    return out, lse
