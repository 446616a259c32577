"""Structured FFNs (linjax.layers.structured_mlp, linjax.compress) against independent
references: the dense LlamaMLP with the factors multiplied by hand, explicit index loops for
the block shuffle, the HF torch model for the SVD path, and reloaded checkpoints."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linjax
from linjax.layers import structured_mlp as sm
from linjax.layers.mlp import LlamaMLP
from linjax.models.llama import Llama, LlamaConfig, UnsupportedConfigError
from tests.helpers import assert_rel, rel_err

H, M = 24, 40


def tiny(**kw):
  base = dict(vocab_size=64, hidden_size=H, intermediate_size=M, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
  base.update(kw)
  return LlamaConfig(**base)


def _x(shape=(2, 7, H), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _dense_mlp_with(cfg, kernels):
  """A LlamaMLP whose kernels are set by hand (the independent reference)."""
  ref = LlamaMLP(cfg, rngs=nnx.Rngs(0))
  for p, w in kernels.items():
    getattr(ref, p).kernel[...] = jnp.asarray(w, jnp.float32)
  return ref


def test_lowrank_full_rank_equals_dense_mlp():
  cfg = tiny(mlp="lowrank", mlp_rank=1.0)
  assert cfg.mlp_rank == (H, H)
  mlp = sm.StructuredMLP(cfg, 0, rngs=nnx.Rngs(1))
  # random factors, the dense reference gets their product computed here
  rng = np.random.RandomState(0)
  kernels = {}
  for p in ("gate_proj", "up_proj", "down_proj"):
    lin = getattr(mlp, p)
    v = rng.randn(*lin.v.kernel.shape) * 0.3
    u = rng.randn(*lin.u.kernel.shape) * 0.3
    lin.v.kernel[...], lin.u.kernel[...] = jnp.asarray(v, jnp.float32), jnp.asarray(u, jnp.float32)
    kernels[p] = v @ u
  ref = _dense_mlp_with(cfg.replace(mlp="dense", mlp_rank=None), kernels)
  x = _x()
  assert_rel(ref(x), mlp(x), 1e-5, "lowrank MLP vs dense MLP of V @ U")


def test_svd_of_dense_mlp_at_full_rank_equals_it():
  cfg = tiny()
  dense = LlamaMLP(cfg, rngs=nnx.Rngs(2))
  for p in ("gate_proj", "up_proj", "down_proj"):
    w = np.asarray(getattr(dense, p).kernel[...])
    v, u, err, _ = sm.lowrank_project(w, min(H, M))
    assert err < 1e-6
    assert_rel(w, v @ u, 1e-5, p)          # the SVD runs in float32


def _block_shuffle_by_loops(w1, w2, n_in, n_out):
  """The dense matrix of BlockShuffle written index by index from the paper's definition:
  z[a*q + c] = sum_j x[a*p + j] w1[a, j, c]; the k*q features read as an [r, l] grid
  (f = rho*l + lam) feed block lam of w2; y[sigma*l + lam] = sum_rho z[rho*l + lam] w2[lam, rho, sigma]."""
  k, p, q = w1.shape
  l, r, s = w2.shape
  w = np.zeros((n_in, n_out))
  for a in range(k):
    for j in range(p):
      for lam in range(l):
        for rho in range(r):
          f = rho * l + lam
          if f // q != a:
            continue
          for sig in range(s):
            w[a * p + j, sig * l + lam] += w1[a, j, f % q] * w2[lam, rho, sig]
  return w


@pytest.mark.parametrize("n_in,n_out,nb", [(24, 40, 4), (40, 24, 4), (24, 40, 2), (24, 24, 3)])
def test_block_shuffle_matches_index_loops_and_projection_is_exact(n_in, n_out, nb):
  lin = sm.BlockShuffleLinear(n_in, n_out, nb, ("embed", "mlp"), rngs=nnx.Rngs(0))
  rng = np.random.RandomState(1)
  w1 = rng.randn(*lin.v.kernel.shape)
  w2 = rng.randn(*lin.u.kernel.shape)
  lin.v.kernel[...], lin.u.kernel[...] = jnp.asarray(w1, jnp.float32), jnp.asarray(w2, jnp.float32)
  ref = _block_shuffle_by_loops(w1, w2, n_in, n_out)
  x = np.asarray(_x((5, n_in)))
  assert_rel(x @ ref, lin(jnp.asarray(x)), 1e-5, "BlockShuffle forward vs index loops")
  assert_rel(ref, lin.to_dense(), 1e-5, "to_dense")
  # a matrix that is a BlockShuffle is recovered by the projection (to float32 rounding)
  v, u, err = sm.block_shuffle_project(ref, nb)
  assert err < 1e-5
  assert_rel(ref, _block_shuffle_by_loops(v, u, n_in, n_out), 1e-5, "projection")
  # and a generic matrix is fit no worse than by the random structured matrix above
  g = rng.randn(n_in, n_out)
  _, _, e = sm.block_shuffle_project(g, nb)
  scale = np.sum(g * ref) / np.sum(ref * ref)
  assert e <= rel_err(g, scale * ref) + 1e-6


def test_block_with_one_block_equals_dense():
  lin = sm.BlockShuffleLinear(H, M, 1, ("embed", "mlp"), rngs=nnx.Rngs(0))
  w = np.random.RandomState(2).randn(H, M)
  v, u, err = sm.block_shuffle_project(w, 1)
  assert err < 1e-5
  lin.v.kernel[...], lin.u.kernel[...] = jnp.asarray(v, jnp.float32), jnp.asarray(u, jnp.float32)
  x = _x((3, H))
  assert_rel(np.asarray(x) @ w, lin(x), 1e-5, "block nb=1 vs dense")


def test_blockdense_forward_equals_its_matrices():
  lin = sm.BlockDenseLinear(H, M, 12, 3, ("embed", "mlp"), rngs=nnx.Rngs(0))
  k = np.asarray(lin.v.kernel[...])                      # [3, 8, 4]
  bd = np.zeros((H, 12))
  for a in range(3):
    bd[a * 8:(a + 1) * 8, a * 4:(a + 1) * 4] = k[a]
  x = _x((3, H))
  assert_rel(np.asarray(x) @ bd @ np.asarray(lin.u.kernel[...]), lin(x), 1e-5, "blockdense")


def test_param_counts_match_the_modules():
  for kind, kw in [("lowrank", dict(rank=8)), ("block", dict(blocks=4)),
                   ("blockdense", dict(rank=8, blocks=4)), ("dense", {})]:
    cfg = tiny(mlp=kind, mlp_rank=kw.get("rank"), mlp_blocks=kw.get("blocks"))
    mlp = sm.build_mlp(cfg, 0, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(mlp, nnx.Param)))
    assert n == sm.mlp_param_count(kind, H, M, **kw), kind


# ----------------------------------------------------------------- the SVD path on HF models

@pytest.mark.parametrize("name", ["gqa_llama3_bias", "mha_tied_linear"])
def test_svd_init_of_hf_llama_reproduces_torch_logits_at_full_rank(name):
  from tests.test_llama_common import hf_model, linjax_model, tokens, torch_logits
  model = linjax_model(name)
  toks = tokens(length=33)
  ref = torch_logits(hf_model(name), toks)
  small, report = linjax.compress_ffn(model, rank_fraction=1.0)
  assert small.config.mlp == ("lowrank",) * 2
  assert all(e < 1e-6 for r in report["layers"] for e in r["rel_error"].values())
  assert_rel(ref, small(jnp.asarray(toks))[0], 1e-5, "full-rank SVD model vs torch")
  blk, _ = linjax.compress_ffn(model, kind="block", blocks=1)
  assert_rel(ref, blk(jnp.asarray(toks))[0], 1e-5, "one-block model vs torch")
  # the input model is untouched
  assert model.config.mlp == ("dense", "dense")


def test_reported_errors_equal_a_recomputation_from_the_weights():
  from tests.test_llama_common import linjax_model
  model = linjax_model("gqa_llama3_bias")
  for kw in (dict(rank=20), dict(kind="block", blocks=4)):
    small, report = linjax.compress_ffn(model, **kw)
    for row in report["layers"]:
      i = row["layer"]
      for p, e in row["rel_error"].items():
        w = np.asarray(getattr(model.layers[i].mlp, p).kernel[...], np.float64)
        w_r = np.asarray(getattr(small.layers[i].mlp, p).to_dense(), np.float64)
        assert abs(rel_err(w, w_r) - e) < 1e-5, (kw, i, p)
        assert 0.05 < e < 1.0
  # the truncated SVD beats a random rank-20 factorisation fit by least squares
  w = np.asarray(model.layers[0].mlp.up_proj.kernel[...], np.float64)
  q = np.linalg.qr(np.random.RandomState(0).randn(w.shape[0], 20))[0]
  assert report and rel_err(w, q @ (q.T @ w)) > linjax.compress_ffn(model, rank=20)[1][
      "layers"][0]["rel_error"]["up_proj"]


def _ffn_inputs_by_hand(model, toks):
  """Per layer (x, silu(gate x) * up x) [positions, width] float64: what each FFN's
  projections see, by a loop over the decoder layers' own modules."""
  pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
  x, out = model.embed_tokens(toks), []
  for layer in model.layers:
    h = x + layer.self_attn(layer.input_layernorm(x), positions=pos)[0]
    f = layer.post_attention_layernorm(h)
    mlp = layer.mlp
    mid = jax.nn.silu(mlp.gate_proj(f)) * mlp.up_proj(f)
    out.append(tuple(np.asarray(a, np.float64).reshape(-1, a.shape[-1]) for a in (f, mid)))
    x = layer(x, positions=pos)[0]
  return out


def test_calibrated_truncation_is_the_best_rank_r_fit_of_the_outputs():
  """With calibration tokens each projection is the rank-r W_r minimising ||X (W - W_r)||_F
  for the activations X it sees: checked against R^-1 (R W)_r with X = Q R (numpy QR and SVD
  in float64), and better on those outputs than the plain truncated SVD."""
  model = Llama(tiny(), rngs=nnx.Rngs(3))
  toks = np.random.RandomState(0).randint(0, 64, (4, 32)).astype(np.int32)   # 128 > M rows
  r = 8
  small, rep = linjax.compress_ffn(model, rank=r, calibration=toks, damping=0.0)
  plain, _ = linjax.compress_ffn(model, rank=r)
  assert rep["error"] == "calibration outputs" and rep["calibration_tokens"] == toks.size
  for i, (f, mid) in enumerate(_ffn_inputs_by_hand(model, jnp.asarray(toks))):
    for p in ("gate_proj", "up_proj", "down_proj"):
      x = mid if p == "down_proj" else f
      w = np.asarray(getattr(model.layers[i].mlp, p).kernel[...], np.float64)
      rr = np.linalg.qr(x, mode="r")
      u, s, vh = np.linalg.svd(rr @ w, full_matrices=False)
      best = np.linalg.solve(rr, (u[:, :r] * s[:r]) @ vh[:r])
      out_err = lambda w_r: np.linalg.norm(x @ (w - w_r)) / np.linalg.norm(x @ w)
      ours = np.asarray(getattr(small.layers[i].mlp, p).to_dense(), np.float64)
      assert abs(out_err(ours) - out_err(best)) < 1e-4, (i, p, out_err(ours), out_err(best))
      assert abs(rep["layers"][i]["rel_error"][p] - out_err(ours)) < 1e-4, (i, p)
      base = np.asarray(getattr(plain.layers[i].mlp, p).to_dense(), np.float64)
      assert out_err(ours) < out_err(base) - 1e-3, (i, p, out_err(ours), out_err(base))


def test_calibrated_compression_at_full_rank_keeps_the_logits():
  model = Llama(tiny(), rngs=nnx.Rngs(1))
  toks = np.random.RandomState(1).randint(0, 64, (2, 16)).astype(np.int32)
  small, rep = linjax.compress_ffn(model, rank_fraction=1.0, calibration=toks)
  assert max(e for row in rep["layers"] for e in row["rel_error"].values()) < 1e-5
  assert_rel(model(jnp.asarray(toks))[0], small(jnp.asarray(toks))[0], 1e-4,
             "calibrated full-rank FFNs vs dense")


def test_allocate_by_error_moves_rank_to_the_harder_layer():
  cfg = tiny(hidden_size=32, intermediate_size=48)
  model = Llama(cfg, rngs=nnx.Rngs(0))
  rng = np.random.RandomState(0)
  for p in ("gate_proj", "up_proj", "down_proj"):   # layer 0 is rank 4, layer 1 full rank
    lin0, lin1 = getattr(model.layers[0].mlp, p), getattr(model.layers[1].mlp, p)
    shp = lin0.kernel.shape
    lin0.kernel[...] = jnp.asarray(rng.randn(shp[0], 4) @ rng.randn(4, shp[1]), jnp.float32)
    lin1.kernel[...] = jnp.asarray(rng.randn(*shp), jnp.float32)
  small, report = linjax.compress_ffn(model, rank=12, allocate="error", rank_step=4)
  ranks = [r["rank"] for r in report["layers"]]
  assert sum(ranks) == 24 and ranks[0] == 4 and ranks[1] == 20, ranks
  errs = [max(r["rel_error"].values()) for r in report["layers"]]
  assert errs[0] < 1e-5                               # rank 4 covers layer 0 exactly
  uni = linjax.compress_ffn(model, rank=12)[1]["layers"][1]["rel_error"]
  assert max(report["layers"][1]["rel_error"].values()) < min(uni.values())


def test_merge_ffn_is_exact_and_dense():
  from tests.test_llama_common import linjax_model, tokens
  model = linjax_model("mha_tied_linear")            # has MLP biases
  toks = jnp.asarray(tokens(length=21))
  for kw in (dict(rank=16), dict(kind="block", blocks=2)):
    small, _ = linjax.compress_ffn(model, **kw)
    merged = linjax.merge_ffn(small)
    assert merged.config.all_dense_mlp
    assert_rel(small(toks)[0], merged(toks)[0], 1e-5, f"merge_ffn {kw}")


def test_compress_some_layers_and_scan_layers():
  from tests.test_llama_common import linjax_model, tokens
  model = linjax_model("gqa_llama3_bias")
  part, rep = linjax.compress_ffn(model, rank=16, layers=[1])
  assert part.config.mlp == ("dense", "lowrank") and [r["layer"] for r in rep["layers"]] == [1]
  toks = jnp.asarray(tokens(length=17))
  np.testing.assert_array_equal(np.asarray(part.layers[0].mlp.gate_proj.kernel[...]),
                                np.asarray(model.layers[0].mlp.gate_proj.kernel[...]))
  small, _ = linjax.compress_ffn(model, rank=16)
  loop = small(toks)[0]
  small.config.scan_layers = True
  assert_rel(loop, small(toks)[0], 1e-5, "scan_layers vs loop")


# ----------------------------------------------------------------- checkpoints, export, LoRA

def test_save_load_round_trip(tmp_path):
  from linjax.convert import save_linjax
  cfg = tiny(num_hidden_layers=3, mlp=("lowrank", "block", "blockdense"), mlp_rank=(0.5, None, 8),
             mlp_blocks=(None, 4, 4), mlp_bias=True)
  model = Llama(cfg, rngs=nnx.Rngs(3))
  toks = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 13)), jnp.int32)
  save_linjax(model, tmp_path / "ck")
  back, _ = linjax.from_pretrained(tmp_path / "ck", tokenizer=False)
  assert back.config.mlp == cfg.mlp and back.config.mlp_rank == (12, None, 8)
  assert back.config.mlp_blocks == (None, 4, 4)
  np.testing.assert_array_equal(np.asarray(model(toks)[0]), np.asarray(back(toks)[0]))


def test_hf_export_refuses_structured_and_exports_merged(tmp_path):
  from tests.test_llama_common import hf_model, linjax_model, tokens, torch_logits
  model = linjax_model("gqa_llama3_bias")
  small, _ = linjax.compress_ffn(model, rank=16)
  with pytest.raises(linjax.convert.UnsupportedExportError, match="merge_ffn"):
    linjax.save_pretrained(small, tmp_path / "hf")
  assert not os.path.exists(tmp_path / "hf")
  linjax.save_pretrained(linjax.merge_ffn(small), tmp_path / "hf")
  import transformers
  back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
  toks = tokens(length=19)
  assert_rel(np.asarray(small(jnp.asarray(toks))[0]), torch_logits(back, toks), 1e-5,
             "exported merged model in torch")
  del hf_model


def test_structured_config_on_a_dense_checkpoint_names_the_field():
  from tests.test_llama_common import saved_hf_dir
  with pytest.raises(UnsupportedConfigError, match="'mlp'.*compress_ffn"):
    linjax.from_pretrained(saved_hf_dir("gqa_llama3_bias"), tokenizer=False, mlp="lowrank",
                           mlp_rank=8)


@pytest.mark.parametrize("kw,field", [
    (dict(mlp="lowrank", mlp_rank=25), "mlp_rank"),          # > min(hidden, intermediate)
    (dict(mlp="lowrank", mlp_rank=0), "mlp_rank"),
    (dict(mlp="lowrank", mlp_rank=1.5), "mlp_rank"),
    (dict(mlp="lowrank"), "mlp_rank"),
    (dict(mlp="lowrank", mlp_rank=(4, 4, 4)), "mlp_rank"),    # 3 entries for 2 layers
    (dict(mlp="block", mlp_blocks=5), "mlp_blocks"),
    (dict(mlp="block"), "mlp_blocks"),
    (dict(mlp="blockdense", mlp_rank=10, mlp_blocks=4), "mlp_blocks"),   # 4 does not divide 10
    (dict(mlp="sparse"), "mlp"),
])
def test_bad_configs_name_the_field(kw, field):
  with pytest.raises(UnsupportedConfigError, match=f"'{field}'"):
    tiny(**kw)


def test_compress_ffn_bad_arguments():
  model = Llama(tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="'rank'.*larger than"):
    linjax.compress_ffn(model, rank=25)
  with pytest.raises(ValueError, match="exactly one of"):
    linjax.compress_ffn(model, rank=4, rank_fraction=0.5)
  with pytest.raises(ValueError, match="blockdense"):
    linjax.compress_ffn(model, kind="blockdense", rank=8, blocks=2)
  with pytest.raises(ValueError, match="'blocks'"):
    linjax.compress_ffn(model, kind="block", blocks=7)
  small, _ = linjax.compress_ffn(model, rank=4)
  with pytest.raises(ValueError, match="already structured"):
    linjax.compress_ffn(small, rank=2)
  toks = np.zeros((2, 8), np.int32)
  with pytest.raises(ValueError, match="`calibration`.*kind='lowrank'"):
    linjax.compress_ffn(model, kind="block", blocks=2, calibration=toks)
  with pytest.raises(ValueError, match="`calibration` must be integer token ids"):
    linjax.compress_ffn(model, rank=4, calibration=toks.astype(np.float32))
  with pytest.raises(ValueError, match="`calibration` must be integer token ids"):
    linjax.compress_ffn(model, rank=4, calibration=toks[0])
  with pytest.raises(ValueError, match="outside \\[0, 64\\)"):
    linjax.compress_ffn(model, rank=4, calibration=toks + 64)
  with pytest.raises(ValueError, match="second moment is singular"):   # 1 position < width
    linjax.compress_ffn(model, rank=4, calibration=toks[:1, :1], damping=0.0)


def test_lora_on_lowrank_factors_and_refusal_on_blocks():
  from linjax.layers.lora import LoRALinear, apply_lora, merge_lora
  model = Llama(tiny(mlp="lowrank", mlp_rank=8), rngs=nnx.Rngs(0))
  toks = jnp.asarray(np.arange(12).reshape(2, 6) % 64, jnp.int32)
  before = np.asarray(model(toks)[0])
  done = apply_lora(model, rank=2, targets=sm.lora_targets(("q_proj", "gate_proj")),
                    rngs=nnx.Rngs(1))
  assert "layers.0.mlp.gate_proj.u" in done and "layers.0.mlp.gate_proj.v" in done
  assert isinstance(model.layers[1].mlp.gate_proj.v, LoRALinear)
  np.testing.assert_allclose(before, np.asarray(model(toks)[0]), rtol=1e-6)   # B = 0
  lin = model.layers[0].mlp.gate_proj.u
  lin.lora_b[...] = jnp.ones_like(lin.lora_b[...]) * 0.1
  after = np.asarray(model(toks)[0])
  merge_lora(model)
  assert not isinstance(model.layers[0].mlp.gate_proj.u, LoRALinear)
  np.testing.assert_allclose(after, np.asarray(model(toks)[0]), rtol=1e-5, atol=1e-6)
  blk = Llama(tiny(mlp="block", mlp_blocks=2), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="2-D kernel"):
    apply_lora(blk, rank=2, targets=sm.lora_targets(("gate_proj",)))


def test_logical_axes_of_the_factors():
  from jax.sharding import PartitionSpec as P
  from linjax.parallel.rules import param_specs
  model = Llama(tiny(mlp="lowrank", mlp_rank=8), rngs=nnx.Rngs(0))
  flat = dict(nnx.to_flat_state(param_specs(model)))
  spec = lambda *p: flat[("layers", 0, "mlp") + p].get_value()
  assert spec("gate_proj", "v", "kernel") == P("fsdp", None)      # embed x mlp_rank
  assert spec("gate_proj", "u", "kernel") == P(None, "tensor")    # mlp_rank x mlp
  assert spec("down_proj", "v", "kernel") == P("tensor", None)
  assert spec("down_proj", "u", "kernel") == P(None, "fsdp")


def test_ffn_experiment_compresses_a_linearized_student(tmp_path, monkeypatch):
  """experiments/ffn_compress_smollm2.py --student: the student's FFNs are compressed (the
  r2low10 rule: rank 1/2 in the layers with the lowest SVD error), its linear mixers and
  their weights are kept as they were, and its decode state does not change size."""
  from linjax.convert import save_linjax
  from linjax.generate import decode_state_mib
  from tests.helpers import load_module
  monkeypatch.setenv("LINJAX_CACHE", str(tmp_path / "cache"))
  exp = load_module("experiments/ffn_compress_smollm2.py", "ffn_exp")
  monkeypatch.setitem(exp.VARIANTS, "r2low3", dict(rank_fraction=1 / 2, lowest_error_layers=3))
  student = linjax.linearize(Llama(tiny(num_hidden_layers=5), rngs=nnx.Rngs(0)),
                             mixer="lolcats", window=4, num_sinks=1)
  save_linjax(student, tmp_path / "run" / "model")
  (tmp_path / "run" / "stages").mkdir()          # a trainer workdir: stages/ and model/
  path, report = exp.prepare("r2low3", student=str(tmp_path / "run"))
  _, every = linjax.compress_ffn(student, rank_fraction=1 / 2)
  err = {r["layer"]: sum(r["rel_error"].values()) for r in every["layers"]}
  best = sorted(sorted(err, key=err.get)[:3])
  small, _ = linjax.from_pretrained(path, tokenizer=False)
  assert [i for i, k in enumerate(small.config.mlp) if k == "lowrank"] == best
  assert [r["layer"] for r in report["layers"]] == best
  assert small.config.mixers == student.config.mixers == ("lolcats",) * 5
  for a, b in zip(student.layers, small.layers):
    for x, y in zip(jax.tree.leaves(nnx.state(a.self_attn)), jax.tree.leaves(nnx.state(b.self_attn))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert decode_state_mib(small, 256) == decode_state_mib(student, 256)
  again, _ = exp.prepare("r2low3", student=str(tmp_path / "run" / "model"))
  assert again == path          # a workdir and its model folder are the same student


def test_ffn_experiment_report_keeps_each_students_rows(tmp_path, monkeypatch, capsys):
  """Rows of two --student runs sit in one table, each beside its own student's dense-FFN row
  (results written before students had tags hold one student as res["lolcats"])."""
  from tests.helpers import load_module
  exp = load_module("experiments/ffn_compress_smollm2.py", "ffn_exp_report")
  score = lambda ppl, top1: {"ppl": ppl, "ppl_ratio": ppl / 10.0, "top1": top1}
  student = lambda note, ppl: {"note": note, "params": 90, "ffn_params": 60, "decode_mib": 2.0,
                               "decode_growing_mib": 1.0, "before": score(ppl, 0.8)}
  row = lambda ppl: {"params": 70, "ffn_params": 40, "decode_mib": 2.0,
                     "decode_growing_mib": 1.0, "mean_rel_error": 0.2,
                     "error_measure": "calibration outputs", "ranks": {"3": 8},
                     "before": score(ppl, 0.5), "after": score(ppl / 2, 0.6),
                     "distill": {"steps": 3, "tokens": 300}}
  res = {"teacher": {"ppl": 10.0, "params": 100, "ffn_params": 80, "decode_mib": 4.0,
                     "decode_growing_mib": 4.0},
         "lolcats": student("the old student", 11.0), "lolcats+r2low10": row(40.0),
         "students": {"s60": student("the 60-minute student", 10.5)}, "s60+r2a": row(30.0),
         "s60+r2a@1200s": row(20.0), "s60+r2a@600s": row(25.0)}
  exp.write_report(res, str(tmp_path / "ffn"))
  md = (tmp_path / "ffn.md").read_text()
  table = [line for line in md.splitlines() if line.startswith("| ")]
  names = [line.split(" | ")[0][2:] for line in table[1:]]
  assert names == ["teacher (dense FFN, softmax)", "LoLCATs student (dense FFN)",
                   "LoLCATs student `s60` (dense FFN)",
                   "LoLCATs student + lowrank 1/2 in the 10 best-reconstructed layers",
                   "LoLCATs student `s60` + lowrank 1/2 (r 288), activation-aware",
                   "LoLCATs student `s60` + lowrank 1/2 (r 288), activation-aware, 600 s of "
                   "distillation",
                   "LoLCATs student `s60` + lowrank 1/2 (r 288), activation-aware, 1200 s of "
                   "distillation"]
  assert "| 11.00 | 1.100 |" in table[2] and "| 10.50 | 1.050 |" in table[3]
  assert "| 30.00 | 3.000 | 50.0% | 3 (300) | 15.00 | 1.500 | 60.0% |" in table[5]
  assert "--student-tag s60`, the 60-minute student" in md
  assert "--student-tag lolcats`, the old student" in md
  assert (tmp_path / "ffn.png").exists()
  # the distillation budget reaches the trainer's stage (and nothing else changes)
  monkeypatch.setattr(exp, "prepare", lambda v, student=None: (str(tmp_path), {}))
  monkeypatch.setattr(exp, "teacher_dir", lambda: str(tmp_path))
  short, longer = exp.get_config("cpu_r2a"), exp.get_config("cpu_r2a", budget_s=1200)
  assert float(short.stages.distill.time_budget_s) == exp.TIME_BUDGET_S
  assert float(longer.stages.distill.time_budget_s) == 1200.0
  longer.stages.distill.time_budget_s = exp.TIME_BUDGET_S
  assert longer.to_dict() == short.to_dict()
  with pytest.raises(SystemExit):
    exp.main(["--workdir", str(tmp_path), "--budget-s", "0"])
  assert "--budget-s must be > 0 seconds, got 0.0" in capsys.readouterr().err
