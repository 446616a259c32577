"""lm-evaluation-harness adapter: `--model linjax`.

Importing this module registers `LinjaxLM` under the name "linjax" in lm-eval's model
registry (lm-eval has no plugin discovery of its own, so something must import it). Three
ways to run it:

  # 1. the harness CLI through linjax's wrapper (imports this module, adds linjax's local
  #    tasks to --include_path, then runs lm-eval; any lm-eval task name works):
  python -m linjax.eval.lm_eval_adapter --model linjax --model_args path=MODEL,batch_size=8 \\
      --tasks linjax_tiny_mc
  # 2. plain `lm_eval`, after a one-time `python -m linjax.eval.lm_eval_adapter --install`
  #    (writes a .pth file that registers "linjax" lazily whenever lm-eval loads its models)
  lm_eval --model linjax --model_args path=MODEL,batch_size=8 --tasks hellaswag
  # 3. Python:
  import lm_eval, linjax.eval.lm_eval_adapter
  lm_eval.simple_evaluate(model="linjax", model_args="path=MODEL", tasks=[...])
  # or with a model already in memory:
  lm_eval.simple_evaluate(model=LinjaxLM(model=m, tokenizer=tok), tasks=[...])

MODEL is anything `linjax.from_pretrained` reads (a linjax checkpoint folder, an HF folder,
a GGUF file). Model args: path, dtype (float32 | bfloat16), batch_size, max_length
(default: the config's max_position_embeddings, capped at 4096), max_gen_toks (256),
add_bos_token, prefix_token_id.

Tokenization follows lm-eval's own HF backend (`TemplateLM._encode_pair`, the same rolling
windows, the same prefix token), so with the same weights the loglikelihoods agree with
`--model hf` (tested on SmolLM2 in tests/test_lm_eval_adapter.py).
"""
from __future__ import annotations

import os
import sys

import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (Collator, _add_special_kwargs, handle_stop_sequences,
                                  has_bos_prefix, normalize_gen_kwargs,
                                  postprocess_generated_text)
from tqdm.auto import tqdm

from linjax.eval.metrics import target_logprobs_fn

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")


def _bucket(n: int, cap: int) -> int:
  """Padded length: the next multiple of 64 (fewer recompilations), at most cap."""
  return min(cap, -(-n // 64) * 64)


def _register(cls):
  """register_model("linjax") for the importable module only: run as a script
  (`python -m linjax.eval.lm_eval_adapter`), this file is `__main__`, whose class lm-eval would
  see as a second, different "linjax" beside the .pth plugin's placeholder; the script then
  imports the real module, which registers (or upgrades the placeholder) once."""
  return cls if __name__ == "__main__" else register_model("linjax")(cls)


@_register
class LinjaxLM(TemplateLM):
  """lm-eval `LM` for linjax models (softmax teachers and linearized students alike).

  Args:
    path: a checkpoint `linjax.from_pretrained` reads; or pass `model` and `tokenizer`.
    model, tokenizer: an in-memory linjax model and its HF tokenizer.
    batch_size: requests per forward pass (int; "auto" means 8).
    max_length: longest sequence fed to the model; longer inputs are left-truncated.
    max_gen_toks: default generation length for generate_until.
    dtype: "float32" or "bfloat16", passed to `linjax.from_pretrained`.
  Raises ValueError when neither `path` nor `model` + `tokenizer` is given.
  """

  @classmethod
  def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
    """`--model_args k=v,...` plus the CLI's own settings (`--batch_size`, `--device`, ...);
    a key given in both (`batch_size=8` in model_args and lm-eval's default --batch_size)
    takes the model_args value instead of raising "multiple values for keyword argument"."""
    return cls.create_from_arg_obj(lm_utils.simple_parse_args_string(arg_string),
                                   additional_config)

  @classmethod
  def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
    """The same for `--model_args` that lm-eval's CLI has already parsed into a dict."""
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  def __init__(self, path: str | None = None, model=None, tokenizer=None, batch_size=8,
               max_length: int | None = None, max_gen_toks: int = 256,
               dtype: str = "float32", add_bos_token: bool | None = None,
               prefix_token_id: int | None = None, **kwargs):
    super().__init__()
    if model is None:
      if path is None:
        raise ValueError("LinjaxLM needs path=... (or model= and tokenizer=)")
      import linjax
      model, tokenizer = linjax.from_pretrained(path, dtype=dtype)
    if tokenizer is None:
      raise ValueError("LinjaxLM needs the model's tokenizer")
    self.model, self.tokenizer = model, tokenizer
    self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)
    cfg = getattr(model, "config", None)
    cap = getattr(cfg, "max_position_embeddings", None) or 2048
    self._max_length = int(max_length) if max_length else min(int(cap), 4096)
    self._max_gen_toks = int(max_gen_toks)
    self.add_bos_token = None if add_bos_token is None else bool(add_bos_token)
    self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
    self._generate = None

  # -- properties lm-eval reads ------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return self.tokenizer.eos_token_id

  @property
  def prefix_token_id(self) -> int:
    if self.custom_prefix_token_id is not None:
      return self.custom_prefix_token_id
    if self.tokenizer.bos_token_id is not None:
      return self.tokenizer.bos_token_id
    return self.tokenizer.eos_token_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
    kw = _add_special_kwargs(add_special_tokens, self.add_bos_token)
    if add_special_tokens is None and has_bos_prefix(
        string, self.tokenizer.decode(self.prefix_token_id)):
      kw["add_special_tokens"] = False
    return list(self.tokenizer.encode(string, **kw))

  def tok_decode(self, tokens, skip_special_tokens=True):
    return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

  # -- scoring -----------------------------------------------------------------------
  def _score_rows(self, rows, disable_tqdm=True):
    """rows: list of (input tokens, number of continuation tokens at the end, targets).
    Returns [(sum logprob, all greedy)] in order, one padded forward pass per batch."""
    out = []
    for s in tqdm(range(0, len(rows), self.batch_size), disable=disable_tqdm,
                  desc="linjax loglikelihood"):
      chunk = rows[s:s + self.batch_size]
      T = _bucket(max(len(r[0]) for r in chunk), self.max_length)
      B = self.batch_size
      tok = np.zeros((B, T), np.int32)
      tgt = np.zeros((B, T), np.int32)
      seg = np.zeros((B, T), np.int32)
      for b, (inp, _, targets) in enumerate(chunk):
        tok[b, :len(inp)], tgt[b, :len(inp)], seg[b, :len(inp)] = inp, targets, 1
      pos = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
      lp, greedy = target_logprobs_fn(self.model)(tok, np.ascontiguousarray(pos), seg, tgt)
      lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
      for b, (inp, n_cont, _) in enumerate(chunk):
        sl = slice(len(inp) - n_cont, len(inp))
        out.append((float(lp[b, sl].sum()), bool(greedy[b, sl].all())))
    return out

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
    # Longest first (like the HF backend), so batches hold similar lengths.
    order = sorted(range(len(requests)),
                   key=lambda i: (-len(requests[i][1] + requests[i][2]),
                                  tuple(requests[i][1] + requests[i][2])))
    rows = []
    for i in order:
      _, context_enc, continuation_enc = requests[i]
      assert len(context_enc) > 0 and len(continuation_enc) > 0
      whole = (context_enc + continuation_enc)[-(self.max_length + 1):]
      rows.append((whole[:-1], len(continuation_enc), whole[1:]))
    res = [None] * len(requests)
    for i, r in zip(order, self._score_rows(rows, disable_tqdm)):
      res[i] = r
      if requests[i][0] is not None:
        self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
    return res

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    windows, counts = [], []
    for (string,) in [req.args for req in requests]:
      ws = list(map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1)))
      windows += [(None,) + w for w in ws]
      counts.append(len(ws))
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    out, i = [], 0
    for req, n in zip(requests, counts):
      total = sum(s[0] for s in scores[i:i + n])
      i += n
      out.append(total)
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return out

  # -- generation --------------------------------------------------------------------
  def generate_until(self, requests, disable_tqdm: bool = False):
    re_ords = Collator([r.args for r in requests],
                       sort_fn=lambda x: (-len(self.tok_encode(x[0])), x[0]),
                       group_by="gen_kwargs", group_fn=lambda x: x[1])
    eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
    res = []
    pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="linjax generate_until")
    for chunk in re_ords.get_batched(n=self.batch_size):
      contexts, all_kwargs = zip(*chunk)
      kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_gen = int(kwargs.pop("max_gen_toks"))
      max_ctx = self.max_length - max_gen
      if max_ctx <= 0:
        raise ValueError(f"max_gen_toks={max_gen} >= max_length={self.max_length}")
      prompts = [self.tok_encode(c)[-max_ctx:] for c in contexts]
      temperature = float(kwargs.get("temperature", 0.0) or 0.0)
      if not kwargs.get("do_sample", False):
        temperature = 0.0
      outs = self._generate_tokens(prompts, max_gen, temperature=temperature,
                                   top_p=float(kwargs.get("top_p", 1.0) or 1.0))
      for ctx, toks in zip(contexts, outs):
        s = postprocess_generated_text(generation=self.tok_decode(toks), stop=until,
                                       think_end_token=None)
        res.append(s)
        self.cache_hook.add_partial("generate_until", (ctx, all_kwargs[0]), s)
        pbar.update(1)
    pbar.close()
    return re_ords.get_original(res)

  def _generate_tokens(self, prompts, max_new_tokens, *, temperature=0.0, top_p=1.0):
    """New tokens for each prompt (lists of ids), via `linjax.generate`, stopping at EOS."""
    from linjax.generate import generate
    out = generate(self.model, prompts, max_new_tokens=max_new_tokens,
                   temperature=temperature, top_p=top_p, eos_token_id=self.eot_token_id)
    return [list(map(int, o)) for o in out]


# ----------------------------------------------------------------------------- plugin

_PTH_NAME = "linjax_lm_eval.pth"


def install_plugin(site_dir: str | None = None) -> str:
  """Write a .pth file into site-packages so a plain `lm_eval --model linjax` finds this
  adapter. The hook it installs is tiny (no jax import): when lm-eval imports
  `lm_eval.models`, it registers "linjax" as a lazy placeholder for `LinjaxLM`.
  Returns the path written."""
  import site
  import sysconfig
  site_dir = site_dir or sysconfig.get_paths()["purelib"] or site.getsitepackages()[0]
  path = os.path.join(site_dir, _PTH_NAME)
  with open(path, "w") as f:
    f.write("import linjax.eval._lm_eval_hook\n")
  return path


def main(argv=None):
  """`python -m linjax.eval.lm_eval_adapter [lm-eval args]`: lm-eval's CLI with "linjax"
  registered and linjax's local tasks (`linjax_tiny_mc`, in TASKS_DIR) included unless an
  `--include_path` is given. Extra flags: `--install` (write the .pth plugin), `--tasks-dir`
  (print the folder of linjax's local task YAMLs, for `--include_path`)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv[:1] == ["--install"]:
    print(install_plugin())
    return 0
  if argv[:1] == ["--tasks-dir"]:
    print(TASKS_DIR)
    return 0
  from lm_eval.__main__ import cli_evaluate
  if not any(a == "--include_path" or a.startswith("--include_path=") for a in argv):
    argv += ["--include_path", TASKS_DIR]
  sys.argv = ["lm_eval"] + argv
  cli_evaluate()
  return 0


if __name__ == "__main__":
  from linjax.eval import lm_eval_adapter as _adapter   # the registered module, not __main__
  sys.exit(_adapter.main())
