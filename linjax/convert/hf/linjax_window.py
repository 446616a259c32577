"""Window arithmetic shared by the softmax, LoLCATs and Liger mixers: rings of recent keys
keyed by position (with a front of attention sinks), and blocked window attention.

A ring has `size` slots: positions below `sinks` keep their own slot, every later position
p goes to `sinks + (p - sinks) % (size - sinks)`; pos -1 marks an empty slot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import linjax_ops as ops
from .linjax_ops import F32  # noqa: F401 (a `from .x import` line is how transformers finds x.py)


def _where(mask, x, value=0.0):
  return torch.where(mask, x, torch.full((), value, dtype=x.dtype, device=x.device))



def ring_slots(pos, size, sinks=0):
  """Slot of each position in a ring of `size` slots whose first `sinks` hold the sinks."""
  ring = sinks + torch.remainder(pos - sinks, size - sinks)
  return torch.where(pos < sinks, pos, ring)


def empty_ring(B, size, heads, dim, device, **extra):
  r = {"k": torch.zeros(B, size, heads, dim, dtype=F32, device=device),
       "v": torch.zeros(B, size, heads, dim, dtype=F32, device=device),
       "pos": torch.full((B, size), -1, dtype=torch.long, device=device)}
  r.update(extra)
  return r


def ring_write(ring, k, v, pos, keep, sinks=0):
  """The ring with the kept new tokens written to their slots (slots must be distinct)."""
  B, T = pos.shape
  size = ring["pos"].shape[1]
  slots = torch.where(keep, ring_slots(pos, size, sinks), torch.full_like(pos, size))

  def put(buf, x):
    ext = torch.cat([buf, buf[:, :1]], 1)            # slot `size` collects dropped tokens
    idx = slots.reshape(B, T, *([1] * (x.dim() - 2))).expand_as(x)
    return ext.scatter(1, idx, x.to(ext.dtype))[:, :size]

  return {**ring, "k": put(ring["k"], k), "v": put(ring["v"], v), "pos": put(ring["pos"], pos)}


def last_position(positions, valid):
  """[B] the newest real position of each row (-1 where the row has none)."""
  real = positions if valid is None else _where(valid, positions, -1)
  return real.amax(1)


def contiguous(positions, valid, absolute=False):
  """Do real tokens sit at consecutive positions (index distance == position distance)?
  absolute=True: and position == index. Decides whether the blocked forms apply."""
  d = positions - torch.arange(positions.shape[1], device=positions.device)
  if valid is None:
    ok = (d == d[:, :1]).all()
    return bool(ok and (not absolute or (d == 0).all()))
  ref = _where(valid, d, torch.iinfo(d.dtype).max).amin(1, keepdim=True)
  ok = (~valid | (d == ref)).all()
  return bool(ok and (not absolute or (~valid | (d == 0)).all()))


def blocked_window(q, k, v, *, window, in_window, valid=None, scale, weights=None,
                   return_parts=False, sinks=0):
  """Softmax attention of each query over the keys of its own and the previous block of
  `window` tokens that `in_window(i, j)` (token indices) admits, plus (sinks > 0) the first
  `sinks` tokens, attention sinks, wherever they lie; k, v per query head.
  O(T * (window + sinks)) memory. Same outputs as `ops.masked_attention` over those keys
  (with sinks, token index must equal position: `contiguous(..., absolute=True)`)."""
  B, T, H, D = q.shape
  W = window
  nb = -(-T // W)
  pad = nb * W - T
  padt = lambda a: F.pad(a, (0, 0) * (a.dim() - 2) + (0, pad)) if pad else a
  blocks = lambda a: padt(a).reshape(B, nb, W, *a.shape[2:])
  prev = lambda a: torch.cat([torch.zeros_like(a[:, :1]), a[:, :-1]], 1)
  qb, kb, vb = blocks(q.to(F32)), blocks(k.to(F32)), blocks(v.to(F32))
  k2, v2 = torch.cat([prev(kb), kb], 2), torch.cat([prev(vb), vb], 2)   # [B, nb, 2W, H, *]
  dev = q.device
  i = torch.arange(nb, device=dev)[:, None] * W + torch.arange(W, device=dev)[None]
  j = (torch.arange(nb, device=dev)[:, None] - 1) * W + torch.arange(2 * W, device=dev)[None]
  ok = (j[:, None] >= 0) & (j[:, None] <= i[:, :, None]) & (j[:, None] < T)
  ok = (ok & in_window(i[:, :, None], j[:, None]))[None]                # [1, nb, W, 2W]
  if valid is not None:
    vb_ = blocks(valid)
    ok = ok & torch.cat([prev(vb_), vb_], 2)[:, :, None, :]
  s = torch.einsum("bnihd,bnjhd->bnhij", qb, k2) * scale
  okh = ok[:, :, None]
  s = _where(okh, s, ops.NEG)
  m = s.amax(-1, keepdim=True)                                          # [B, nb, H, W, 1]
  S = min(int(sinks), T)
  if S:  # sinks before the previous block: their own scores, one max shared with the blocks
    ti, sj = torch.arange(T, device=dev)[:, None], torch.arange(S, device=dev)[None]
    far = ((sj < (torch.div(ti, W, rounding_mode="floor") - 1) * W) & (sj <= ti))[None]
    if valid is not None:
      far = far & valid[:, None, :S]
    far = far[:, :, None].expand(B, T, H, S)                            # [B, T, H, S]
    sf = _where(far, torch.einsum("bthd,bshd->bths", q.to(F32), k[:, :S].to(F32)) * scale,
                ops.NEG)
    mf = blocks(sf.amax(-1)).permute(0, 1, 3, 2)[..., None]             # [B, nb, H, W, 1]
    m = torch.maximum(m, mf)
  p = _where(okh, torch.exp(s - m))
  if weights is not None:
    p = p * weights.to(F32)[None, None, :, None, None]
  num = torch.einsum("bnhij,bnjhv->bnihv", p, v2).reshape(B, nb * W, H, -1)[:, :T]
  den = p.sum(-1).transpose(2, 3).reshape(B, nb * W, H)[:, :T]
  if S:
    mt = m[..., 0].permute(0, 1, 3, 2).reshape(B, nb * W, H)[:, :T]     # [B, T, H]
    pf = _where(far, torch.exp(sf - mt[..., None]))
    if weights is not None:
      pf = pf * weights.to(F32)[None, None, :, None]
    num = num + torch.einsum("bths,bshv->bthv", pf, v[:, :S].to(F32))
    den = den + pf.sum(-1)
  if return_parts:
    return num, den
  return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
