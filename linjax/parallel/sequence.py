"""Sequence parallelism: LASP-2 for the linear recurrences, LASP-2H for softmax layers.

`gla`, `delta_rule` and `attention` take the arguments of the `linjax.ops` functions. When
the active mesh (`linjax.parallel.use_mesh`, or `jax.set_mesh`) has a `seq` axis > 1 they
run under `jax.shard_map` with tokens split over `seq` ([B, T, ...] arrays sharded
(("data", "fsdp"), "seq", "tensor" on heads)); otherwise they call `linjax.ops` directly.

LASP-2 (linear family). The state after shard p is an affine map of the state before it:
S_out = A_p S_in + M_p, with A_p the product of the shard's transitions (a decay vector
exp(sum g) for GLA, the K x K matrix prod exp(g_t)(I - beta_t k_t k_t^T) for the delta rule)
and M_p the shard's final state from a zero start. Each shard
  1. runs the local chunk op once (any `method`, Pallas included) from a zero start,
  2. all-gathers (M_p, A_p) packed in ONE array along `seq` (its size is independent of T),
  3. folds the earlier shards (and the caller's initial_state) into its incoming state
     S_in = sum_{j<p} (prod_{j<i<p} A_i) M_j + (prod_{i<p} A_i) S_0 (an associative fold),
  4. adds what S_in contributes to its outputs: o_t += scale * q_t A_{<=t} S_in.
Step 4 is exact because every op is linear in its initial state, so this equals running the
local op again from S_in (LASP-2's second pass) at the price of one pass. For GLA,
q_t A_{<=t} = q_t * exp(cumsum g) is closed form; for the delta rule the op itself produces
it: the local run uses values [v, 0_K] and initial state [0 | I_K], so its last K output
columns are scale * q_t A_{<=t} and its final state is [M_p | A_p].

Packed sequences (cu_seqlens) crossing shard boundaries: each shard runs the op on its slice
of the layout (offsets clipped to the shard); only the sequence that is already running at
the shard's first token ("continuing") starts from the carried state, others start from the
caller's initial_state; A_p is zero when a sequence starts inside the shard, so a shard's
carried state never leaks across a boundary. Each sequence's final state comes from the
shard holding its last token (one psum, only when output_final_state=True).

Packed rows (segment_ids [B, T], the trainer's packing): each shard runs the segment-aware
local op, and the all-gathered payload also carries each shard's first and last segment id
(bitcast into the float payload, so still ONE all-gather). Shard j's state passes on only
if it continues the previous shard's last segment (cont_j) and holds no boundary (A_j is
zero otherwise); the incoming state reaches only the tokens of the shard's first segment,
and only when that segment continues from the previous shard.

LASP-2H (softmax / sliding-window layers of hybrids): K and V are all-gathered along `seq`
(one all-gather); a causal sliding window of W <= T/P + 1 tokens only needs the previous
shard's last W - 1 tokens (a ppermute), plus the first `num_sinks` tokens (a psum from
shard 0) when sinks are used.

Gradients come from JAX's transposes of the collectives (all_gather -> psum_scatter,
ppermute -> the reverse ppermute); there is no custom backward.
"""
from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from linjax.parallel.mesh import axis_size, current_mesh

SEQ = "seq"
F32 = jnp.float32


def _ops():
  import linjax.ops as ops
  return ops


# ------------------------------------------------------------------------ mesh helpers

def _sp_mesh():
  """The active mesh when its `seq` axis is > 1, else None."""
  mesh = current_mesh()
  return mesh if axis_size(mesh, SEQ) > 1 else None


def _batch_axes(mesh, B):
  axes = tuple(a for a in ("data", "fsdp") if axis_size(mesh, a) > 1)
  while axes and B % math.prod(axis_size(mesh, a) for a in axes):
    axes = axes[:-1]
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _head_axis(mesh, *heads):
  n = axis_size(mesh, "tensor")
  return "tensor" if n > 1 and all(h % n == 0 for h in heads) else None


def _fallback_warn(what, why):
  warnings.warn(f"linjax.parallel.sequence.{what}: {why}; running without sequence "
                "parallelism (XLA inserts the collectives)", stacklevel=3)


def _shard_map(fn, mesh, in_specs, out_specs):
  # check_vma=False: the local ops (and Pallas kernels) start scans from constant carries,
  # which the varying-axes checker rejects inside shard_map. Values and gradients of every
  # wrapper are tested against the single-device ops on 2x4, 4x2, 1x8 and 2x2x2 meshes.
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)


# ----------------------------------------------------------------- LASP-2 building blocks

def _fold(Ms, As, S0, p, apply_A):
  """Incoming state of shard p: fold (M_j, A_j) for j < p over S0 (a masked scan over j)."""
  n = Ms.shape[0]

  def body(S, xs):
    j, M, A = xs
    return jnp.where(j < p, apply_A(A, S) + M, S), None

  S, _ = lax.scan(body, S0, (jnp.arange(n), Ms, As))
  return S


def _varlen_layout(cu, off, L):
  """Local view of a packed layout on the shard holding global tokens [off, off + L)."""
  cu = cu.astype(jnp.int32)
  N = cu.shape[0] - 1
  local_cu = jnp.clip(cu - off, 0, L)
  n_first = jnp.searchsorted(cu[1:], off, side="right").astype(jnp.int32)
  n_last = jnp.searchsorted(cu[1:], off + L - 1, side="right").astype(jnp.int32)
  nf = jnp.minimum(n_first, N - 1)
  cont = (n_first < N) & (cu[nf] < off)             # a sequence runs in from the left
  e = jnp.where(cont, jnp.minimum(cu[nf + 1] - off, L), 0)   # its local end
  own = jnp.clip((cu[1:] - 1) // L, 0, None)        # shard holding each sequence's last token
  return dict(local_cu=local_cu, n_first=nf, cont=cont, e=e, n_last=n_last, N=N, own=own)


def _gather(payload, seg):
  """ONE all-gather along seq of the shard's payload and, for packed rows, of its first and
  last segment ids (bitcast to float32 and appended, exact for any int32 id). Returns
  (gathered [P, *payload.shape], cont [P, B] or None): cont_j says shard j's first segment
  continues shard j-1's last (always true for j = 0, which the caller's state feeds)."""
  if seg is None:
    return lax.all_gather(payload, SEQ), None
  Bl = payload.shape[0]
  ends = jnp.stack([seg[:, 0], seg[:, -1]], axis=-1).astype(jnp.int32)
  flat = jnp.concatenate([payload.reshape(Bl, -1).astype(F32),
                          lax.bitcast_convert_type(ends, F32)], axis=-1)
  gathered = lax.all_gather(flat, SEQ)                        # [P, B, n + 2]
  ids = lax.bitcast_convert_type(lax.stop_gradient(gathered[..., -2:]), jnp.int32)
  cont = jnp.concatenate([jnp.ones((1, Bl), bool), ids[1:, :, 0] == ids[:-1, :, 1]], axis=0)
  return gathered[..., :-2].reshape((-1,) + payload.shape), cont


def _first_run(seg):
  """[B, L] bool: the token is in the shard's first segment (no id change before it)."""
  from linjax.ops._common import segment_runs
  return segment_runs(seg) == 0


def _select_owner(F, own, p):
  """Per-sequence final state from the shard that owns it (psum over seq)."""
  mask = (own == p).reshape((-1,) + (1,) * (F.ndim - 1))
  return lax.psum(jnp.where(mask, F, 0.0), SEQ)


# --------------------------------------------------------------------------- GLA (LASP-2)

def _gla_local(q, k, v, g, init, cu, seg, *, scale, P_, gate_kind, op_kw):
  """Body of the shard_map for gla. Returns (o, final_state or None)."""
  ops = _ops()
  p = lax.axis_index(SEQ)
  B, L, H, K = q.shape
  V = v.shape[-1]
  off = p * L
  if g is not None:
    G = jnp.cumsum(g.astype(F32), axis=1)               # <= 0, shard-local
  varlen = cu is not None
  if varlen:
    lay = _varlen_layout(cu, off, L)
    N = lay["N"]
    base = jnp.zeros((N, H, K, V), F32) if init is None else init.astype(F32)
    row = jnp.arange(N) == lay["n_first"]
    local_init = jnp.where((row & lay["cont"])[:, None, None, None], 0.0, base)
    o0, F = ops.gla(q, k, v, g, scale=scale, initial_state=local_init, output_final_state=True,
                    cu_seqlens=lay["local_cu"], **op_kw)
    tmask = jnp.arange(L) < lay["e"]                     # tokens of the continuing sequence
    n_last = lay["n_last"]
    has_last = n_last < N
    M = jnp.where(has_last, F[jnp.minimum(n_last, N - 1)], 0.0)[None]   # [1, H, K, V]
    through = lay["cont"] & (lay["e"] == L)
  else:
    o0, F = ops.gla(q, k, v, g, scale=scale, initial_state=None, output_final_state=True,
                    segment_ids=seg, **op_kw)
    M = F                                                # [B, H, K, V]
    through = True if seg is None else jnp.all(seg[:, 1:] == seg[:, :-1], axis=1)[:, None, None]

  # total transition A_p: ones (no gate), [B, H] or [B, H, K]; zero across a boundary.
  if gate_kind is None:
    A = jnp.ones(M.shape[:2] + (1,), F32)
  elif gate_kind == "head":
    A = jnp.exp(G[:, -1])[..., None]                     # [B, H, 1]
  else:
    A = jnp.exp(G[:, -1])                                # [B, H, K]
  A = jnp.broadcast_to(jnp.where(through, A, 0.0), M.shape[:2] + (K,))   # [B|1, H, K]
  with_A = gate_kind is not None or varlen or seg is not None
  payload = jnp.concatenate([M, A[..., None]], axis=-1) if with_A else M
  gathered, cont = _gather(payload, seg)                 # ONE all-gather: [P, B, H, K, V(+1)]
  Ms = gathered[..., :V]
  As = gathered[..., V] if with_A else jnp.zeros((P_,), F32)
  if cont is not None:
    As = jnp.where(cont[:, :, None, None], As, 0.0)
  apply_A = (lambda A_, S: A_[..., None] * S) if with_A else (lambda A_, S: S)
  if varlen or init is None:
    S0 = jnp.zeros(M.shape, F32)
  else:
    S0 = init.astype(F32)
  S_in = _fold(Ms, As, S0, p, apply_A)                   # [B|1, H, K, V]
  if cont is not None:  # the incoming state belongs to the previous shard's last segment
    S_in = jnp.where(cont[p][:, None, None, None], S_in, 0.0)

  # outputs: o_t += scale * (q_t * exp(G_t)) S_in on the tokens that continue into the shard
  qd = q.astype(F32)
  if gate_kind == "head":
    qd = qd * jnp.exp(G)[..., None]
  elif gate_kind == "channel":
    qd = qd * jnp.exp(G)
  if varlen:
    qd = jnp.where(tmask[None, :, None, None], qd, 0.0)
  elif seg is not None:  # only the shard's first segment continues from the left
    qd = jnp.where(_first_run(seg)[:, :, None, None], qd, 0.0)
  corr = scale * jnp.einsum("blhk,bhkv->blhv", qd, S_in)
  o = (o0.astype(F32) + corr).astype(o0.dtype)

  if varlen:
    # the continuing sequence's final state gains A_{<e} S_in (decay over its local part)
    if gate_kind is None:
      dec = jnp.ones((H, K), F32)
    else:
      Ge = jnp.exp(G[0, jnp.maximum(lay["e"] - 1, 0)])  # [H] or [H, K]
      dec = jnp.broadcast_to(Ge[:, None] if gate_kind == "head" else Ge, (H, K))
    add = dec[..., None] * S_in[0]
    F = F.at[lay["n_first"]].add(jnp.where(lay["cont"], add, 0.0))
    final = _select_owner(F, lay["own"], p)
  else:
    final = apply_A(A, S_in) + M
    final = lax.psum(jnp.where(p == P_ - 1, final, 0.0), SEQ)
  return o, final


# -------------------------------------------------------------------- delta rule (LASP-2)

def _delta_local(q, k, v, beta, g, init, cu, seg, *, scale, P_, op_kw):
  ops = _ops()
  p = lax.axis_index(SEQ)
  B, L, H, K = q.shape
  V = v.shape[-1]
  off = p * L
  eye = jnp.eye(K, dtype=F32)
  v_aug = jnp.concatenate([v, jnp.zeros(v.shape[:-1] + (K,), v.dtype)], axis=-1)
  if cu is not None:
    lay = _varlen_layout(cu, off, L)
    N = lay["N"]
    base = jnp.zeros((N, H, K, V), F32) if init is None else init.astype(F32)
    cont_row = ((jnp.arange(N) == lay["n_first"]) & lay["cont"])[:, None, None, None]
    init_aug = jnp.concatenate([jnp.where(cont_row, 0.0, base),
                                jnp.where(cont_row, jnp.broadcast_to(eye, (N, H, K, K)), 0.0)],
                               axis=-1)                                      # [N, H, K, V+K]
    o_aug, F = ops.delta_rule(q, k, v_aug, beta, g, scale=scale, initial_state=init_aug,
                              output_final_state=True, cu_seqlens=lay["local_cu"], **op_kw)
    n_last = lay["n_last"]
    payload = jnp.where(n_last < N, F[jnp.minimum(n_last, N - 1)], 0.0)[None]  # [1,H,K,V+K]
    S0 = jnp.zeros((1, H, K, V), F32)
  else:
    init_aug = jnp.concatenate([jnp.zeros((B, H, K, V), F32),
                                jnp.broadcast_to(eye, (B, H, K, K))], axis=-1)
    # packed rows: the identity start feeds only the first segment, so A_p (the last
    # segment's transition) is zero when the shard holds a boundary, and the last K output
    # columns are zero past the first segment.
    o_aug, F = ops.delta_rule(q, k, v_aug, beta, g, scale=scale, initial_state=init_aug,
                              output_final_state=True, segment_ids=seg, **op_kw)
    payload = F                                          # [B, H, K, V+K] = [M_p | A_p]
    S0 = jnp.zeros((B, H, K, V), F32) if init is None else init.astype(F32)

  gathered, cont = _gather(payload, None if cu is not None else seg)  # ONE all-gather
  As = gathered[..., V:]                                 # [P, B, H, K, K]
  if cont is not None:
    As = jnp.where(cont[:, :, None, None, None], As, 0.0)
  apply_A = lambda A_, S: jnp.einsum("bhij,bhjv->bhiv", A_, S)
  S_in = _fold(gathered[..., :V], As, S0, p, apply_A)
  if cont is not None:
    S_in = jnp.where(cont[p][:, None, None, None], S_in, 0.0)

  o = o_aug[..., :V].astype(F32) + jnp.einsum("blhk,bhkv->blhv", o_aug[..., V:].astype(F32),
                                                S_in)
  o = o.astype(v.dtype)
  if cu is not None:
    Fin = F[..., :V] + jnp.einsum("nhij,hjv->nhiv", F[..., V:], S_in[0])
    final = _select_owner(Fin, lay["own"], p)
  else:
    final = F[..., :V] + apply_A(F[..., V:], S_in)
    final = lax.psum(jnp.where(p == P_ - 1, final, 0.0), SEQ)
  return o, final


# --------------------------------------------------------------------- public wrappers

def _lasp2(family, mesh, q, k, v, beta, g, *, scale, initial_state, output_final_state,
           cu_seqlens, op_kw, segment_ids=None):
  B, T, H, K = q.shape
  P_ = axis_size(mesh, SEQ)
  varlen = cu_seqlens is not None
  b = None if varlen else _batch_axes(mesh, B)
  h = _head_axis(mesh, H)
  tok = P(b, SEQ, h, None)
  tok3 = P(b, SEQ, h)
  state = P(None if varlen else b, h, None, None)
  names = ["q", "k", "v", "beta", "g", "init", "cu", "seg"]
  vals = [q, k, v, beta, g, initial_state, cu_seqlens, segment_ids]
  specs = [tok, tok, tok, tok3, tok3 if g is None or g.ndim == 3 else tok, state, P(None),
           P(b, SEQ)]
  present = [i for i, x in enumerate(vals) if x is not None]

  def body(*args):
    a = dict.fromkeys(names)
    for i, x in zip(present, args):
      a[names[i]] = x
    if family == "gla":
      gk = None if a["g"] is None else ("head" if a["g"].ndim == 3 else "channel")
      return _gla_local(a["q"], a["k"], a["v"], a["g"], a["init"], a["cu"], a["seg"],
                        scale=scale, P_=P_, gate_kind=gk, op_kw=op_kw)
    return _delta_local(a["q"], a["k"], a["v"], a["beta"], a["g"], a["init"], a["cu"],
                        a["seg"], scale=scale, P_=P_, op_kw=op_kw)

  fn = _shard_map(body, mesh, tuple(specs[i] for i in present), (tok, state))
  o, final = fn(*(vals[i] for i in present))
  return o, (final if output_final_state else None)


def _lasp2_ok(what, mesh, q, cu_seqlens, op_kw, segment_ids=None):
  if mesh is None:
    return False
  if segment_ids is not None and cu_seqlens is not None:
    return False  # the op itself names the conflict
  P_ = axis_size(mesh, SEQ)
  if q.shape[1] % P_:
    if q.shape[1] > P_:  # decode steps (T = 1) fall back silently
      _fallback_warn(what, f"T={q.shape[1]} is not divisible by the seq axis ({P_})")
    return False
  if cu_seqlens is not None and op_kw.get("max_seqlen") is not None:
    op_kw.pop("max_seqlen")  # a global bound; local slices are at most T / P anyway
  return True


def gla(q, k, v, g=None, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, normalize=False, eps=1e-6, segment_ids=None, **op_kw):
  """`linjax.ops.gla`, sequence-parallel (LASP-2) under a mesh with seq > 1."""
  mesh = _sp_mesh()
  if not _lasp2_ok("gla", mesh, q, cu_seqlens, op_kw, segment_ids):
    return _ops().gla(q, k, v, g, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      normalize=normalize, eps=eps, segment_ids=segment_ids, **op_kw)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  V = v.shape[-1]
  if normalize:  # the key-sum denominator rides along as an extra value column
    v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
  o, S = _lasp2("gla", mesh, q, k, v, None, g, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, op_kw=op_kw,
                segment_ids=segment_ids)
  if normalize:
    o = (o[..., :V].astype(F32) / (o[..., V:].astype(F32) + eps)).astype(o.dtype)
  return o, S


def delta_rule(q, k, v, beta, g=None, *, scale=None, initial_state=None,
               output_final_state=False, cu_seqlens=None, segment_ids=None, **op_kw):
  """`linjax.ops.delta_rule`, sequence-parallel (LASP-2) under a mesh with seq > 1."""
  mesh = _sp_mesh()
  if not _lasp2_ok("delta_rule", mesh, q, cu_seqlens, op_kw, segment_ids):
    return _ops().delta_rule(q, k, v, beta, g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                             segment_ids=segment_ids, **op_kw)
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _lasp2("delta", mesh, q, k, v, beta, g, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, op_kw=op_kw,
                segment_ids=segment_ids)


# -------------------------------------------------------------------- attention (LASP-2H)

def attention(q, k, v, *, causal=True, window=None, num_sinks=0, segment_ids=None,
              kv_segment_ids=None, q_positions=None, kv_positions=None, scale=None,
              mask=None, method="auto", return_stats=False, window_kind="sliding",
              block_size=64):
  """`linjax.ops.attention`, sequence-parallel (LASP-2H) under a mesh with seq > 1.

  Self-attention over the whole sequence (as many keys as queries; no extra `mask`, no
  separate `kv_segment_ids`); anything else runs the plain op. Full / long-window layers
  all-gather K and V along seq. A causal window with window - 1 <= T / P takes only the
  previous shard's last window - 1 tokens (one collective-permute); this assumes positions
  grow along T inside a segment (true for every Llama batch, packed or not). The shard's
  own tokens then run `method` (the blocked form on CPU: O(L * window)) and the previous
  shard's tail plus the sinks the masked form, merged by log-sum-exp. Sinks with default
  positions are the sequence's first tokens (a psum from shard 0); with explicit positions
  (packed documents restart them) sink layers use the all-gather form.
  """
  ops = _ops()
  kw = dict(causal=causal, window=window, num_sinks=num_sinks, segment_ids=segment_ids,
            kv_segment_ids=kv_segment_ids, q_positions=q_positions, kv_positions=kv_positions,
            scale=scale, mask=mask, method=method, return_stats=return_stats,
            window_kind=window_kind, block_size=block_size)
  mesh = _sp_mesh()
  if mesh is None:
    return ops.attention(q, k, v, **kw)
  B, T, Hq, D = q.shape
  P_ = axis_size(mesh, SEQ)
  if (k.shape[1] != T or mask is not None or kv_segment_ids is not None
      or (q_positions is None) != (kv_positions is None)):
    return ops.attention(q, k, v, **kw)
  if T % P_:
    if T > P_:
      _fallback_warn("attention", f"T={T} is not divisible by the seq axis ({P_})")
    return ops.attention(q, k, v, **kw)
  L = T // P_
  Hkv = k.shape[2]
  scale = D ** -0.5 if scale is None else scale
  b = _batch_axes(mesh, B)
  h = _head_axis(mesh, Hq, Hkv)
  tok, tok2 = P(b, SEQ, h, None), P(b, SEQ)
  positions = q_positions is not None
  span = None if window is None else (window if window_kind == "sliding" else 2 * window)
  sliding = (causal and window is not None and span - 1 <= L
             and (num_sinks == 0 or (not positions and num_sinks <= L)))
  if not sliding and (return_stats or window_kind != "sliding"):
    return ops.attention(q, k, v, **kw)     # stats / block windows: the sliding form only
  perm = [(i, i + 1) for i in range(P_ - 1)]
  same = v.dtype == k.dtype
  local_method = "parallel" if method == "parallel" else "chunk"

  def pack(k, v):  # K and V travel in one collective when they share a dtype
    return jnp.concatenate([k, v], axis=-1) if same else (k, v)

  def unpack(x):
    return (x[..., :D], x[..., D:]) if same else x

  def body(q, k, v, seg, qpos, kpos):
    p = lax.axis_index(SEQ)
    Bl = q.shape[0]
    off = p * L
    if qpos is None:
      qpos = kpos = jnp.broadcast_to(off + jnp.arange(L, dtype=jnp.int32), (Bl, L))
    if not sliding:
      k_all, v_all = unpack(jax.tree.map(lambda x: lax.all_gather(x, SEQ, axis=1, tiled=True),
                                         pack(k, v)))
      kpos_all = (jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (Bl, T)) if not positions
                  else lax.all_gather(kpos, SEQ, axis=1, tiled=True))
      kseg = None if seg is None else lax.all_gather(seg, SEQ, axis=1, tiled=True)
      return ops.attention(q, k_all, v_all, causal=causal, window=window,
                           num_sinks=num_sinks, segment_ids=seg, kv_segment_ids=kseg,
                           q_positions=qpos, kv_positions=kpos_all, scale=scale,
                           method="parallel")
    W1 = span - 1
    qseg = jnp.zeros((Bl, L), jnp.int32) if seg is None else seg
    ks, vs, ps, ss = [], [], [], []
    if num_sinks:  # default positions: the sinks are global tokens [0, num_sinks)
      ns = num_sinks
      first = p == 0
      sk, sv = unpack(jax.tree.map(lambda x: lax.psum(jnp.where(first, x[:, :ns], 0), SEQ),
                                   pack(k, v)))
      sseg = lax.psum(jnp.where(first, qseg[:, :ns], 0), SEQ) if seg is not None else 0
      spos = jnp.broadcast_to(jnp.arange(ns, dtype=jnp.int32), (Bl, ns))
      fresh = spos < off - W1                     # not already among the tail / local keys
      ks.append(sk), vs.append(sv), ps.append(spos), ss.append(jnp.where(fresh, sseg, -1))
    if W1:
      tk, tv = unpack(jax.tree.map(lambda x: lax.ppermute(x[:, L - W1:], SEQ, perm),
                                   pack(k, v)))
      tpos = (lax.ppermute(kpos[:, L - W1:], SEQ, perm) if positions else
              jnp.broadcast_to(off - W1 + jnp.arange(W1, dtype=jnp.int32), (Bl, W1)))
      tseg = (jnp.zeros((Bl, W1), jnp.int32) if seg is None
              else lax.ppermute(qseg[:, L - W1:], SEQ, perm))
      ks.append(tk), vs.append(tv), ps.append(tpos), ss.append(jnp.where(p == 0, -1, tseg))
    akw = dict(causal=True, window=window, num_sinks=num_sinks, segment_ids=qseg,
               q_positions=qpos, scale=scale, return_stats=True, window_kind=window_kind)
    o, lse, m = ops.attention(q, k, v, kv_positions=kpos, method=local_method,
                              block_size=block_size, **akw)
    if ks:  # the previous shard's tail and the sinks: a few keys, the masked form
      cat = lambda xs: jnp.concatenate(xs, axis=1)
      o2, lse2, m2 = ops.attention(q, cat(ks), cat(vs), kv_segment_ids=cat(ss),
                                   kv_positions=cat(ps), method="parallel", **akw)
      o, lse = ops.merge_attention([(o, lse), (o2, lse2)])
      m = jnp.maximum(m, m2)
    o = o.astype(v.dtype)
    return (o, lse, m) if return_stats else o

  args = (q, k, v, segment_ids, q_positions, kv_positions)
  specs = (tok, tok, tok, tok2, tok2, tok2)
  present = [i for i, x in enumerate(args) if x is not None]

  def wrapped(*xs):
    full = [None] * len(args)
    for i, x in zip(present, xs):
      full[i] = x
    return body(*full)

  out_specs = (tok, P(b, SEQ, h), P(b, SEQ, h)) if return_stats else tok
  fn = _shard_map(wrapped, mesh, tuple(specs[i] for i in present), out_specs)
  return fn(*(args[i] for i in present))
