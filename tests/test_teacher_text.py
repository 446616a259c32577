"""Teacher-generated training text (`linjax.data.teacher_text`, the trainer's
`data.teacher_text`): prompts from the training split, continuations that are the teacher's own
samples, seeded, cached, decontaminated against the held-out split, and joined to the training
documents."""
import pytest
from flax import nnx

from linjax.data import teacher_text
from linjax.data.corpus import embedded_corpus
from linjax.data.tokenizers import ByteTokenizer
from linjax.models.llama import Llama, LlamaConfig

KW = dict(prompt_tokens=12, new_tokens=6, temperature=0.8, top_p=0.95, batch_size=3)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """Each test's generated files in its own folder (the real corpus cache stays as it is)."""
  monkeypatch.setattr(teacher_text, "_path",
                      lambda key, s: str(tmp_path / f"{key}_{s['seed']}_{s['n_tokens']}.jsonl"))
  return tmp_path


def tiny_teacher():
  cfg = LlamaConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                    max_position_embeddings=64)
  return Llama(cfg, rngs=nnx.Rngs(0))


def test_prompts_come_from_training_text_and_continuations_are_the_teachers(cache):
  tok, model = ByteTokenizer(), tiny_teacher()
  n_tokens = 5 * (KW["prompt_tokens"] + KW["new_tokens"])    # 5 rows, the last batch padded
  docs = teacher_text.generate_corpus(model, tok, n_tokens=n_tokens, cache_key="t", seed=4, **KW)
  assert [d["id"] for d in docs] == [f"teacher:4:{i}" for i in range(5)]
  heads = {tok.decode(tok.encode(t["text"])[:KW["prompt_tokens"]]):
           tok.encode(t["text"])[:KW["prompt_tokens"]] for t in embedded_corpus("train")}
  prompts = []
  for d in docs:       # each opens with the first prompt_tokens tokens of a training document
    match = [h for h in heads if d["text"].startswith(h)]
    assert match, d["text"]
    prompts.append(heads[max(match, key=len)])
  assert len({tuple(p) for p in prompts}) == 5        # five different documents
  # the first batch's continuations are the teacher's samples at that seed
  from linjax.generate import generate
  new = generate(model, prompts[:3], max_new_tokens=KW["new_tokens"], temperature=0.8,
                 top_p=0.95, seed=4, eos_token_id=tok.eos_token_id)
  for d, p, n in zip(docs, prompts, new):
    assert d["text"] == tok.decode(p + list(n))


def test_seeded_cached_and_a_new_seed_gives_new_text(cache, monkeypatch):
  tok, model = ByteTokenizer(), tiny_teacher()
  a = teacher_text.generate_corpus(model, tok, n_tokens=40, cache_key="t", seed=1, **KW)
  assert list(cache.glob("*.jsonl"))
  import linjax.generate

  def no_sampling(*a, **k):
    raise AssertionError("a cached corpus was sampled again")
  monkeypatch.setattr(linjax.generate, "generate", no_sampling)
  assert teacher_text.generate_corpus(model, tok, n_tokens=40, cache_key="t", seed=1, **KW) == a
  monkeypatch.undo()
  monkeypatch.setattr(teacher_text, "_path",
                      lambda key, s: str(cache / f"again_{s['seed']}.jsonl"))
  again = teacher_text.generate_corpus(model, tok, n_tokens=40, cache_key="t", seed=1, **KW)
  assert [d["text"] for d in again] == [d["text"] for d in a]       # the seed decides
  other = teacher_text.generate_corpus(model, tok, n_tokens=40, cache_key="t", seed=2, **KW)
  assert [d["text"] for d in other] != [d["text"] for d in a]


def test_memorised_held_out_text_is_dropped(cache, monkeypatch):
  """A teacher that recites a held-out passage: those paragraphs never reach training."""
  tok, model = ByteTokenizer(), tiny_teacher()
  held = embedded_corpus("heldout")[0]["text"]
  passage = max(held.split("\n\n"), key=len)
  recited = tok.encode(passage)[:400]
  import linjax.generate
  monkeypatch.setattr(linjax.generate, "generate",
                      lambda m, prompts, **k: [recited for _ in prompts])
  docs = teacher_text.generate_corpus(model, tok, n_tokens=60, cache_key="t", seed=0,
                                      **dict(KW, new_tokens=400))
  assert len(passage.split()) >= 13 and "\n\n" not in tok.decode(recited)
  assert docs == []         # the one row was the prompt + the passage: one paragraph, dropped


def test_the_trainer_joins_teacher_text_to_the_training_documents(cache):
  from linjax.train.config import ConfigError, base_config
  from linjax.train.trainer import Data
  c = base_config()
  c.data.embedded_split = "pydoc"
  c.data.teacher_text.update(tokens=36, prompt_tokens=12, new_tokens=6, batch_size=2)
  tok, model = ByteTokenizer(), tiny_teacher()
  plain = Data(c, tok)
  n_plain = len(plain._tokenized("eval"))           # the validation split gets none
  with pytest.raises(ConfigError, match="teacher_text.tokens' > 0 needs a teacher"):
    plain._tokenized("train")
  data = Data(c, tok, teacher=model)
  base = len(embedded_corpus("pydoc"))
  assert len(data._tokenized("train")) == base + 2
  assert len(data._tokenized("eval")) == n_plain
  from linjax.data.corpus import read_jsonl
  files = list(cache.glob("*.jsonl"))
  assert len(files) == 1
  gen = read_jsonl(str(files[0]))                                # what the sampler wrote
  texts = list(data._tokenized("train")["input_ids"])[base:]
  assert [t[:len(tok.encode(g["text"]))] for t, g in zip(texts, gen)] == \
      [tok.encode(g["text"]) for g in gen]                       # the same documents
  none = base_config()
  none.data.embedded_split = "pydoc"
  real = lambda d: int((d.rows("train", 16).segment_ids > 0).sum())
  assert real(data) > real(Data(none, tok))


def test_only_process_zero_reports(cache, monkeypatch, capsys):
  """Every process samples (the teacher is one sharded model); one prints."""
  import jax
  tok, model = ByteTokenizer(), tiny_teacher()
  a = teacher_text.generate_corpus(model, tok, n_tokens=20, cache_key="t", seed=0, **KW)
  err = capsys.readouterr().err
  assert "teacher text: sampling 2 continuations" in err and "teacher text: 2 documents" in err
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(teacher_text, "_path", lambda key, s: str(cache / "process1.jsonl"))
  b = teacher_text.generate_corpus(model, tok, n_tokens=20, cache_key="t", seed=0, **KW)
  assert b == a                                         # the same samples, written the same way
  assert capsys.readouterr().err == ""                  # and not a word, nor a progress bar
