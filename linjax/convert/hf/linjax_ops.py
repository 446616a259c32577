"""Plain-torch ops of the linjax mixers: feature maps, the gated linear / delta-rule
recurrences (token by token and chunkwise), masked softmax attention, rotary.

Layout [B, T, H, D] (linjax's and fla's); states [B, H, K, V]; everything in float32.

  gla:        S_t = exp(g_t) * S_{t-1} + k_t^T v_t                            o_t = scale q_t S_t
  delta_rule: S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t^T v_t      o_t = scale q_t S_t

g (log decay, <= 0): None, [B, T, H] (per head) or [B, T, H, K] (per key channel).
The chunked forms keep gate cumsums chunk-local and only ever take exp of values <= 0
(masked before the exp); the delta rule's chunks use the UT transform (a triangular solve).
With `fla` importable (it needs triton) and CUDA tensors, `gla` / `delta_rule` call fla's
chunk kernels instead (`use_fla=False` turns that off).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG = -1e30
F32 = torch.float32


# --- feature maps ----------------------------------------------------------------------

def l2norm(x, eps=1e-6):
  return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


def feature_dim(kind: str, head_dim: int) -> int:
  return 2 * head_dim if kind in ("hedgehog", "dpfp") else head_dim


LEARNED_MAPS = ("t2r", "hedgehog")
FEATURE_MAPS = ("identity", "elu", "relu", "softmax", "silu_l2", "l2", "dpfp", "t2r", "hedgehog")


def feature_map(kind: str, x, weight=None, bias=None):
  """phi(x) for x [..., H, D] in float32; weight [H, D, D'] / bias [H, D'] (learned kinds)."""
  x = x.to(F32)
  if kind == "identity":
    return x
  if kind == "elu":
    return F.elu(x) + 1.0
  if kind == "relu":
    return F.relu(x)
  if kind == "softmax":
    return torch.softmax(x, -1)
  if kind == "silu_l2":
    return l2norm(F.silu(x))
  if kind == "l2":
    return l2norm(x)
  if kind == "dpfp":
    r = torch.cat([F.relu(x), F.relu(-x)], -1)
    return r * torch.roll(r, 1, dims=-1)
  if kind in LEARNED_MAPS:
    z = torch.einsum("...hd,hdf->...hf", x, weight.to(F32))
    if bias is not None:
      z = z + bias.to(F32)
    if kind == "t2r":
      return F.relu(z)
    # LoLCATs' fullspace Hedgehog map, clamped like linjax (and LoLCATs) so no feature is 0
    return torch.clamp(torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1), min=1e-12)
  raise ValueError(f"unknown feature map {kind!r}; one of {FEATURE_MAPS}")


# --- rotary (HF rotate_half layout; cos / sin from transformers' LlamaRotaryEmbedding) ---

def rotate(x, cos, sin):
  """x [B, T, H, D]; cos, sin [B, T, D] (cast to x's dtype, as linjax does)."""
  cos, sin = cos.to(x.dtype)[:, :, None], sin.to(x.dtype)[:, :, None]
  h = x.shape[-1] // 2
  return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def repeat_kv(x, rep):
  """[B, T, Hkv, D] -> [B, T, Hkv * rep, D], each kv head repeated for its query heads."""
  return x if rep == 1 else torch.repeat_interleave(x, rep, dim=2)


# --- token-by-token recurrences (decode steps and the reference for the chunked forms) ----

def recurrent_gla(q, k, v, g=None, *, scale, initial_state=None):
  B, T, H, K = q.shape
  S = (torch.zeros(B, H, K, v.shape[-1], dtype=F32, device=q.device) if initial_state is None
       else initial_state.to(F32))
  q, k, v = q.to(F32), k.to(F32), v.to(F32)
  out = []
  for t in range(T):
    if g is not None:
      d = torch.exp(g[:, t].to(F32))
      S = S * (d[..., None, None] if d.dim() == 2 else d[..., None])
    S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
    out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
  return torch.stack(out, 1), S


def recurrent_delta_rule(q, k, v, beta, g=None, *, scale, initial_state=None):
  B, T, H, K = q.shape
  S = (torch.zeros(B, H, K, v.shape[-1], dtype=F32, device=q.device) if initial_state is None
       else initial_state.to(F32))
  q, k, v, beta = q.to(F32), k.to(F32), v.to(F32), beta.to(F32)
  out = []
  for t in range(T):
    if g is not None:
      S = S * torch.exp(g[:, t].to(F32))[..., None, None]
    pred = torch.einsum("bhk,bhkv->bhv", k[:, t], S)
    S = S + beta[:, t, :, None, None] * k[:, t, :, :, None] * (v[:, t] - pred)[:, :, None, :]
    out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
  return torch.stack(out, 1), S


# --- chunked forms ------------------------------------------------------------------------

def _chunks(x, C):
  """[B, T, H, *] -> [B, H, N, C, *] (zero-padded to N * C tokens)."""
  B, T = x.shape[:2]
  N = -(-T // C)
  if N * C != T:
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, N * C - T))
  x = x.reshape(B, N, C, *x.shape[2:])
  return x.permute(0, 3, 1, 2, *range(4, x.dim())).to(F32)


def _unchunk(o, T):
  """[B, H, N, C, V] -> [B, T, H, V]."""
  B, H, N, C, V = o.shape
  return o.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]


def chunk_gla(q, k, v, g=None, *, scale, initial_state=None, chunk_size=None):
  """Chunkwise gated linear attention; returns (o [B, T, H, V] f32, final state)."""
  B, T, H, K = q.shape
  V = v.shape[-1]
  per_channel = g is not None and g.dim() == 4
  C = chunk_size or (16 if per_channel else 64)
  qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)       # [B, H, N, C, *]
  N = qc.shape[2]
  if g is None:
    G = torch.zeros(B, H, N, C, 1, dtype=F32, device=q.device)
  else:
    gc = _chunks(g if per_channel else g[..., None], C)           # [B, H, N, C, K | 1]
    G = torch.cumsum(gc, 3)                                      # chunk-local, <= 0
  causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
  if per_channel:
    diff = G[:, :, :, :, None, :] - G[:, :, :, None, :, :]         # [B, H, N, C, C, K]
    dec = torch.exp(torch.where(causal[:, :, None], diff, torch.full_like(diff, -torch.inf)))
    A = torch.einsum("bhnik,bhnjk,bhnijk->bhnij", qc, kc, dec)
  else:
    Gs = G[..., 0]
    diff = Gs[..., :, None] - Gs[..., None, :]
    dec = torch.exp(torch.where(causal, diff, torch.full_like(diff, -torch.inf)))
    A = torch.einsum("bhnik,bhnjk->bhnij", qc, kc) * dec
  o_intra = A @ vc
  S = (torch.zeros(B, H, K, V, dtype=F32, device=q.device) if initial_state is None
       else initial_state.to(F32))
  outs = []
  for n in range(N):
    Gn = G[:, :, n]                                               # [B, H, C, K | 1]
    Gl = Gn[:, :, -1:]                                            # [B, H, 1, K | 1]
    outs.append(scale * ((qc[:, :, n] * torch.exp(Gn)) @ S + o_intra[:, :, n]))
    kd = kc[:, :, n] * torch.exp(Gl - Gn)
    S = S * torch.exp(Gl).transpose(-1, -2) + kd.transpose(-1, -2) @ vc[:, :, n]
  return _unchunk(torch.stack(outs, 2), T), S


def chunk_delta_rule(q, k, v, beta, g=None, *, scale, initial_state=None, chunk_size=64):
  """Chunkwise (gated) delta rule (UT transform); returns (o [B, T, H, V] f32, final state).

  Inside a chunk S_t = e^{G_t} S_0 + sum_{s<=t} e^{G_t - G_s} k_s u_s^T with
  (I + L) u = beta v - beta e^{G} k S_0, L_ts = beta_t e^{G_t - G_s} k_t.k_s (s < t).
  """
  B, T, H, K = q.shape
  V = v.shape[-1]
  C = chunk_size
  qc, kc, vc = _chunks(q, C), _chunks(k, C), _chunks(v, C)
  bc = _chunks(beta[..., None], C)                                # [B, H, N, C, 1]
  N = qc.shape[2]
  G = (torch.zeros(B, H, N, C, 1, dtype=F32, device=q.device) if g is None
       else torch.cumsum(_chunks(g[..., None], C), 3))
  Gs = G[..., 0]
  lower = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
  diff = Gs[..., :, None] - Gs[..., None, :]
  dec = torch.exp(torch.where(lower, diff, torch.full_like(diff, -torch.inf)))
  kb = kc * bc
  strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
  L = torch.where(strict, (kb @ kc.transpose(-1, -2)) * dec,
                  torch.zeros((), dtype=F32, device=q.device))
  eye = torch.eye(C, dtype=F32, device=q.device)
  Tm = torch.linalg.solve_triangular(eye + L, eye.expand_as(L), upper=False)
  u0 = Tm @ (vc * bc)                                             # [B, H, N, C, V]
  w = Tm @ (kb * torch.exp(G))                                    # [B, H, N, C, K]
  attn = (qc @ kc.transpose(-1, -2)) * dec                         # zero above the diagonal
  S = (torch.zeros(B, H, K, V, dtype=F32, device=q.device) if initial_state is None
       else initial_state.to(F32))
  outs = []
  for n in range(N):
    u = u0[:, :, n] - w[:, :, n] @ S
    Gn = G[:, :, n]
    Gl = Gn[:, :, -1:]
    outs.append(scale * ((qc[:, :, n] * torch.exp(Gn)) @ S + attn[:, :, n] @ u))
    S = S * torch.exp(Gl) + (kc[:, :, n] * torch.exp(Gl - Gn)).transpose(-1, -2) @ u
  return _unchunk(torch.stack(outs, 2), T), S


# --- fla's kernels (optional) -----------------------------------------------------------

def _fla_ops():
  """fla's chunk kernels, or None (fla not installed, or no triton)."""
  try:
    from fla.ops.delta_rule import chunk_delta_rule as fla_delta
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_gated_delta
    from fla.ops.gla import chunk_gla as fla_gla
    from fla.ops.simple_gla import chunk_simple_gla as fla_simple_gla
  except Exception:  # ImportError, or triton failing to initialise
    return None
  return {"gla": fla_gla, "simple_gla": fla_simple_gla, "delta_rule": fla_delta,
          "gated_delta_rule": fla_gated_delta}


_FLA = "unset"


def fla_ops():
  global _FLA
  if _FLA == "unset":
    _FLA = _fla_ops()
  return _FLA


def _use_fla(q, use_fla):
  """fla's kernels for multi-token CUDA calls (a decode step runs the recurrence)."""
  return bool(use_fla) and q.is_cuda and q.shape[1] > 1 and fla_ops() is not None


def gla(q, k, v, g=None, *, scale, initial_state=None, use_fla=True):
  """(o, final state) of the gated linear recurrence; T == 1 runs the decode step."""
  if _use_fla(q, use_fla):
    ops = fla_ops()
    args = dict(scale=scale, initial_state=initial_state, output_final_state=True)
    dt = q.dtype
    if g is not None and g.dim() == 4:
      o, S = ops["gla"](q, k, v.to(dt), g.to(F32), **args)
    else:
      o, S = ops["simple_gla"](q, k, v.to(dt), g=None if g is None else g.to(F32), **args)
    return o.to(F32), S.to(F32)
  if q.shape[1] == 1:
    return recurrent_gla(q, k, v, g, scale=scale, initial_state=initial_state)
  return chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state)


def delta_rule(q, k, v, beta, g=None, *, scale, initial_state=None, use_fla=True):
  """(o, final state) of the (gated) delta rule; T == 1 runs the decode step."""
  if _use_fla(q, use_fla):
    ops = fla_ops()
    args = dict(scale=scale, initial_state=initial_state, output_final_state=True)
    if g is None:
      o, S = ops["delta_rule"](q, k, v.to(q.dtype), beta.to(q.dtype), **args)
    else:
      o, S = ops["gated_delta_rule"](q, k, v.to(q.dtype), g.to(F32), beta.to(q.dtype), **args)
    return o.to(F32), S.to(F32)
  if q.shape[1] == 1:
    return recurrent_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state)
  return chunk_delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state)


# --- softmax attention with an explicit visibility mask ------------------------------------

def masked_attention(q, k, v, vis, scale, *, weights=None, return_parts=False):
  """q [B, T, H, D]; k, v [B, S, H, D] (already per query head); vis [B, T, S] bool.

  Rows with no visible key give 0. `weights` [H] multiply the unnormalized probabilities
  (LoLCATs' window factors); return_parts=True returns (numerator, denominator) with the
  row max m subtracted (exp(s - m)) instead of the normalized output.
  """
  s = torch.einsum("bthd,bshd->bhts", q.to(F32), k.to(F32)) * scale
  vis = vis[:, None]
  s = torch.where(vis, s, torch.full_like(s, NEG))
  m = s.amax(-1, keepdim=True)
  p = torch.where(vis, torch.exp(s - m), torch.zeros_like(s))
  if weights is not None:
    p = p * weights.to(F32)[None, :, None, None]
  num = torch.einsum("bhts,bshv->bthv", p, v.to(F32))
  den = p.sum(-1).transpose(1, 2)                                  # [B, T, H]
  if return_parts:
    return num, den
  return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
