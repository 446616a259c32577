"""linjax.linearize.select (which layers stay softmax) and the trainer's keep_softmax field."""
import json

import jax
import numpy as np
import pytest

from linjax.linearize import linearize
from linjax.linearize.select import restore_one_gains, step0_transfer_losses, worst_layers
from tests.test_linearize import tiny_llama, tokens


def _np_window_error(teacher, x, window, sinks):
  """Per layer: relative MSE of sliding window + sinks softmax heads vs full causal softmax,
  in float64 numpy from each layer's q, k, v on the teacher's own hidden states."""
  T = x.shape[1]
  pos = np.broadcast_to(np.arange(T), x.shape)
  hs = teacher.hidden_states(x, positions=pos)["mixer_inputs"]
  student = linearize(teacher, "lolcats", window=window, num_sinks=sinks,
                      init_linear_factor=0.0)
  i, j = np.arange(T)[:, None], np.arange(T)[None, :]
  full = j <= i
  win = full & ((i - j < window) | (j < sinks))
  out = []
  for layer, h in zip(student.layers, hs):
    q, k, v = (np.asarray(a, np.float64) for a in layer.self_attn.teacher_qkv(h, pos))
    s = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])

    def heads(mask):
      z = np.where(mask, s, -np.inf)
      p = np.exp(z - z.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      return np.einsum("bhij,bjhv->bihv", p, v)
    t, w = heads(full), heads(win)
    out.append(((w - t) ** 2).mean() / (t ** 2).mean())
  return np.array(out)


def test_step0_losses_are_the_window_error_by_hand():
  """The step-0 LoLCATs hybrid (linear factor 0) loses exactly what window + sinks loses."""
  teacher = tiny_llama(layers=3)
  x = tokens(B=3, T=40)
  got = step0_transfer_losses(teacher, x, "lolcats", window=8, num_sinks=2,
                              init_linear_factor=0.0, batch_size=2)
  want = _np_window_error(teacher, np.asarray(x), 8, 2)
  np.testing.assert_allclose(got, want, rtol=2e-4)
  assert (want > 1e-4).all()
  # a window covering every token loses nothing
  none = step0_transfer_losses(teacher, x, "lolcats", window=64, init_linear_factor=0.0)
  assert np.abs(none).max() < 1e-10


def test_restore_one_gains_equal_whole_models_with_one_layer_restored():
  """Each layer's KL gain = KL(teacher || all linearized) - KL(teacher || all but that layer),
  both from whole-model forwards of models built by `linearize` (the incremental residual
  stream checked against them); layers outside the candidates gain 0."""
  from linjax.train.objectives import token_kl
  teacher = tiny_llama(layers=3)
  x = tokens(B=3, T=40)
  kw = dict(window=8, num_sinks=2, init_linear_factor=0.0)
  got = restore_one_gains(teacher, x, "lolcats", batch_size=2, **kw)
  zt = teacher(x)[0]
  kl = lambda layers: float(token_kl(zt, linearize(teacher, "lolcats", layers, **kw)(x)[0]).mean())
  base = kl(None)
  want = [base - kl([j for j in range(3) if j != i]) for i in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
  assert base > 1e-4 and np.abs(want).max() > 1e-5     # the windows do change the output
  sub = restore_one_gains(teacher, x, "lolcats", layers=[0, 2], **kw)
  assert sub[1] == 0.0
  np.testing.assert_allclose(sub[[0, 2]], [kl([0, 2]) - kl([2]), kl([0, 2]) - kl([0])],
                             rtol=1e-4, atol=1e-7)


def test_worst_layers_order_ties_and_range():
  assert worst_layers([0.1, 0.5, 0.2, 0.5], 3) == [1, 3, 2]
  assert worst_layers([0.1, 0.2], 0) == []
  with pytest.raises(ValueError, match="cannot keep 3 of 2"):
    worst_layers([0.1, 0.2], 3)


@pytest.mark.parametrize("criterion", ["transfer", "kl"])
def test_trainer_keeps_the_worst_layers_and_the_kept_baseline(tmp_path, criterion):
  """keep_softmax through the training loop: the saved choice is the largest step-0 errors
  (or KL gains), the student keeps those layers softmax, the ':kept' baseline keeps the same
  ones."""
  from linjax.eval.suite import baseline_models
  from linjax.train import base_config, stage, stages, train
  c = base_config()
  c.model.tiny = dict(c.model.tiny.to_dict(), num_hidden_layers=3)
  c.data.embedded_split, c.data.max_rows = "pydoc", 8
  c.linearize = {"mixer": "lolcats", "window": 8, "num_sinks": 2, "init_linear_factor": 0.0}
  c.keep_softmax = {"layers": 1, "tokens": 128, "seq_len": 64, "criterion": criterion}
  c.stages = stages(transfer=stage(steps=1, seq_len=64, batch_size=2,
                                   trainable="feature_maps", objective={"attention_mse": 1.0}))
  c.progress = False
  out = train(c, str(tmp_path))
  saved = json.load(open(tmp_path / "keep_softmax.json"))
  assert saved["criterion"] == criterion
  losses = np.array([saved["losses"][str(i)] for i in range(3)])
  assert saved["kept"] == [int(np.argmax(losses))]
  mixers = out["model"].config.mixers
  assert [i for i, m in enumerate(mixers) if m == "softmax"] == saved["kept"]
  (name, base), = baseline_models(out["model"], ["sliding_window:8:2:kept"], out["model"]).items()
  assert f"softmax in layers {saved['kept']}" in name
  assert [i for i, m in enumerate(base.config.mixers) if m == "softmax"] == saved["kept"]
  with pytest.raises(ValueError, match="baseline spec"):
    baseline_models(out["model"], ["sliding_window:8"], out["model"])


def test_trainer_refuses_to_keep_every_layer_softmax(tmp_path):
  """keep_softmax.layers as large as the layer count would train a model with no linear
  layer (the transfer stage then finds no loss): a config error that names the field."""
  from linjax.train import ConfigError, base_config, stage, stages, train
  c = base_config()
  c.data.embedded_split, c.data.max_rows, c.progress = "pydoc", 8, False
  c.linearize = {"mixer": "lolcats", "window": 8}
  c.keep_softmax = {"layers": 2, "tokens": 128, "seq_len": 64}
  c.stages = stages(transfer=stage(steps=1, seq_len=64, batch_size=2,
                                   trainable="feature_maps", objective={"attention_mse": 1.0}))
  with pytest.raises(ConfigError, match=r"'keep_softmax.layers' = 2 keeps all 2 candidate"):
    train(c, str(tmp_path))
