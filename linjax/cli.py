"""The `linjax` command.

  linjax convert SRC DST [--to linjax|hf] [--dtype bfloat16] [--max-shard-size 2GB]
  linjax generate --model PATH --prompt "..." [--prompt "..." ...] [--max-new-tokens 64
                  --temperature 0 --top-p 1.0 --seed 0]   (one prompt streams; several
                  run as one left-padded batch)
  linjax train --config experiments/x.py:arg --workdir DIR     (forwards to linjax.train)
  linjax linearize --config experiments/lolcats_smollm2.py:demo --workdir DIR
                  (the same training loop; a linearization recipe is a train config whose
                  `linearize` field swaps the mixers before its stages run)
  linjax eval ...                                               (forwards to linjax.eval.cli)

SRC / --model: anything `linjax.from_pretrained` reads (HF dir, .gguf, state_dict file with a
config.json beside it, linjax checkpoint dir). `convert` writes a linjax (orbax) checkpoint
unless `--to hf` (or DST ending in "-hf" / "_hf").

A user error (a missing or damaged file, a bad config or override, a value out of range)
prints one line, `error: ...`, and exits with status 2; `--debug` (anywhere on the line)
shows the Python traceback instead.
"""
from __future__ import annotations

import argparse
import sys
import time


def _error(msg) -> int:
  print("error: " + " ".join(str(msg).split()), file=sys.stderr)
  return 2


def _progress(msg):
  print(msg, file=sys.stderr, flush=True)


def _load(path, dtype):
  """from_pretrained with a line before (GGUF dequantization / orbax restore take seconds)
  and one after; the text of `generate` stays alone on stdout."""
  from linjax.layers.params import param_count
  from linjax.convert import from_pretrained
  t0 = time.time()
  _progress(f"loading {path} ...")
  model, tok = from_pretrained(path, dtype=dtype)   # bad input: one line (main)
  _progress(f"loaded {param_count(model) / 1e6:.1f}M parameters ({model.config.num_hidden_layers} layers) "
            f"in {time.time() - t0:.1f}s")
  return model, tok


def _convert(args):
  from linjax.convert import save_linjax, save_pretrained
  t0 = time.time()
  to = args.to or ("hf" if args.dst.rstrip("/").endswith(("-hf", "_hf")) else "linjax")
  model, tok = _load(args.src, args.dtype)
  _progress(f"writing the {to} checkpoint ...")
  if to == "hf":
    save_pretrained(model, args.dst, tokenizer=tok, max_shard_size=args.max_shard_size)
  else:
    save_linjax(model, args.dst, tokenizer=tok)
  print(f"wrote {to} checkpoint to {args.dst} in {time.time() - t0:.1f}s", file=sys.stderr)
  return 0


def _generate(args):
  from linjax.generate import generate_text
  model, tok = _load(args.model, args.dtype)
  if tok is None:
    print(f"error: no tokenizer found with {args.model}", file=sys.stderr)
    return 2
  if args.method or args.attention_method:
    from linjax.linearize import set_method
    model = set_method(model, args.method, softmax=args.attention_method)
  prompts = args.prompt
  if args.chat and getattr(tok, "chat_template", None):
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True) for p in prompts]
  kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_p=args.top_p, seed=args.seed)
  _progress("compiling prefill and decode, then generating ...")
  if len(prompts) == 1:  # one prompt: stream the text as it comes
    if args.echo:
      sys.stdout.write(args.prompt[0])
    generate_text(model, tok, prompts[0],
                  stream=lambda _, s: (sys.stdout.write(s), sys.stdout.flush()), **kw)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0
  # several prompts: one left-padded batch, printed in order when done
  texts = generate_text(model, tok, prompts, **kw)
  for i, text in enumerate(texts):
    print(f"--- [{i}]")
    print((args.prompt[i] if args.echo else "") + text, flush=True)
  return 0


def _parser():
  p = argparse.ArgumentParser(prog="linjax", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  from linjax import __version__
  p.add_argument("--version", action="version", version=f"linjax {__version__}")
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("convert", help="convert a checkpoint (to linjax/orbax or to HF)")
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--to", choices=("linjax", "hf"), default=None)
  c.add_argument("--dtype", default=None, help="e.g. float32, bfloat16")
  c.add_argument("--max-shard-size", default=None, help="HF export: e.g. 2GB")
  g = sub.add_parser("generate", help="sample text, streamed to stdout")
  g.add_argument("--model", required=True)
  g.add_argument("--prompt", required=True, action="append")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0)
  g.add_argument("--top-p", type=float, default=1.0)
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--dtype", default=None)
  g.add_argument("--method", default=None,
                 help="linear / hybrid mixers' method: auto, pallas, chunk, assoc_scan, "
                      "parallel, recurrent (default: as saved)")
  g.add_argument("--attention-method", default=None,
                 help="softmax layers' method: auto, chunk, cudnn, pallas, parallel")
  g.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
  g.add_argument("--echo", action="store_true", help="print the prompt first")
  sub.add_parser("train", help="run a config of the training loop: --config FILE.py:ARG "
                 "--workdir DIR [--config.FIELD=VALUE ...] (linjax train --help: every flag)",
                 add_help=False)
  sub.add_parser("linearize", help="run a linearization recipe (a train config with a "
                 "`linearize` field): --config experiments/RECIPE.py:ARG --workdir DIR",
                 add_help=False)
  sub.add_parser("eval", help="held-out perplexity ratio, top-1, KL and recall of models "
                 "against a teacher and untrained baselines: --model M --teacher T --suite S",
                 add_help=False)
  return p


# What a user can get wrong (paths, file contents, config fields and values) raises these;
# anything else is a bug and keeps its traceback.
USER_ERRORS = (OSError, ValueError, KeyError)


def _user_error_message(e) -> str:
  if isinstance(e, FileNotFoundError) and e.filename:
    return f"no such file or folder: {e.filename}"
  if isinstance(e, KeyError) and e.args:
    return str(e.args[0]).strip("'\"")   # ml_collections' "did you mean" text, unquoted
  return str(e) or type(e).__name__


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv
  argv = [a for a in argv if a != "--debug"]
  try:
    return _main(argv)
  except USER_ERRORS as e:
    if debug:
      raise
    _error(_user_error_message(e) + "  (--debug shows the traceback)")
    return 2


def _main(argv) -> int:
  if argv and argv[0] in ("train", "linearize"):
    from linjax.train.__main__ import run
    return run([f"linjax {argv[0]}"] + argv[1:])
  if argv and argv[0] == "eval":
    from linjax.eval.cli import main as eval_main
    return eval_main(argv[1:])
  args = _parser().parse_args(argv)
  return {"convert": _convert, "generate": _generate}[args.cmd](args)


if __name__ == "__main__":
  sys.exit(main())
