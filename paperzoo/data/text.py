"""Text data sets (kind "text"): character-level Shakespeare and two synthetic recall probes.

Every loader here is registered in `DATASETS` with kind "text" and called as
`loader(config.data) -> TextData`. The task (`paperzoo.tasks.language_model`) reads three splits;
each has `__len__` and `get_batch(indices)`, which returns for the examples `indices`:

  inputs     int32 [B, seq_len]   the tokens the model reads
  targets    int32 [B, seq_len]   what it must predict at each position (the next token; at an
                                  MQAR query, the value paired with the key)
  weights    float32 [B, seq_len] 1 where a prediction counts, 0 elsewhere (padding, or the
                                  positions a probe does not score)
  depth_bin  int32 [B]            passkey only: how deep the key line sits in the filler, as one
                                  of `num_depth_bins` equal bins (0 = at the start)

The data sets:

  tinyshakespeare  Karpathy's tiny Shakespeare (`tinyshakespeare/input.txt`, sha256-checked),
                   one character a token; the vocabulary is the sorted set of its characters
                   (65) and the split nanoGPT's `data/shakespeare_char/prepare.py` makes: the
                   first int(0.9 n) characters train, the rest validate. Train example i is the
                   window text[i : i + seq_len + 1] (inputs its first seq_len characters,
                   targets its last seq_len), i < n_train - seq_len, exactly the windows nanoGPT
                   samples with `randint(len(data) - block_size)`: the trainer's `DataOrder`
                   makes every batch a random set of windows, a pure function of (seed, step).
                   The validation text is cut into non-overlapping windows of seq_len
                   predictions that predict every character after the first exactly once
                   (window j predicts characters j seq_len + 1 .. (j + 1) seq_len; the last
                   window is partial, its padding weighted 0), so the validation loss is exact
                   and deterministic instead of nanoGPT's estimate from random batches.
                   nanoGPT selects on its validation split and reports the same split: so does
                   this data set (`test` is the validation split; it selects on val and reports
                   val, and `selection` says so in results.json).
                   With `passkey_fraction` > 0, that fraction of the training windows (chosen
                   by a hash of the window index and `data_seed`, so a pure function of the
                   index) becomes a passkey example (below) whose filler is the window's own
                   Shakespeare text: a long-context model learns retrieval while it learns the
                   text. Validation stays plain text; after training, `passkey_probe` (250
                   evenly spaced windows of the validation text, each a passkey example, the
                   5 answer characters scored) measures retrieval by depth in real text, and
                   the `passkey` data set in Landmark Attention's filler.
  mqar             multi-query associative recall (Arora et al. 2023, "Zoology", Sec. 3 and
                   HazyResearch/zoology's `multiquery_ar`). Each example starts with
                   num_kv_pairs key-value pairs k_1 v_1 k_2 v_2 ..., keys drawn without
                   replacement from [1, vocab_size / 2) and values from [vocab_size / 2,
                   vocab_size); every key is then queried once, at position 2 num_kv_pairs +
                   2 g, where the gaps g are drawn without replacement from
                   [0, (seq_len - 2 num_kv_pairs) / 2) with Zoology's power law
                   p(g) ~ (g + 1)^(power_a - 1) (queries tend to follow the pairs closely, as a
                   repeated bigram does in text). The target at a query is the value paired
                   with its key, and only there is the weight 1. Every other position holds the
                   filler token 0 (Zoology's paper configs, `random_non_queries=False`) or, with
                   `random_filler`, a uniform random token. Its targets elsewhere are the next
                   input, weighted 0.
  passkey          passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention", the test
                   of epfml/landmark-attention's `run_test.py`), at the character level with
                   tiny Shakespeare's vocabulary, so that a model trained on Shakespeare can be
                   probed (the vocabulary is read from the Shakespeare file, so ids match). An
                   example is exactly seq_len + 1 characters:
                     <filler prefix>\\n
                     The pass key is K. Remember it. K is the pass key.\\n
                     <filler suffix>\\n
                     What is the pass key? The pass key is K.
                   joined by newlines as in Landmark Attention (without its task description:
                   the model is trained, not prompted). K is 5 random lowercase letters (the
                   vocabulary's only digit is '3'); the filler is Landmark's "The grass is
                   green. The sky is blue. The sun is yellow. Here we go. There and back again."
                   repeated, prefix and suffix each cut from its start, together F = seq_len + 1
                   - 105 characters. Example i of a split has depth bin i mod num_depth_bins,
                   and its prefix length P is uniform among the lengths of that bin
                   (bin = P num_depth_bins // (F + 1)), so every bin is scored equally often.
                   Only the predictions of the 5 answer characters at the end are weighted.

Config keys (`config.data`), by data set:
  all              name; root ("" = $PAPERZOO_DATA_DIR or ../shared/data, for the Shakespeare
                   file that tinyshakespeare and passkey read)
  tinyshakespeare  seq_len (64); passkey_fraction (0.0, in [0, 1); > 0 needs seq_len >= 104);
                   data_seed (0: which windows become passkey examples, and their keys)
  mqar             seq_len (64), num_kv_pairs (4; 4 num_kv_pairs <= seq_len), vocab_size
                   (8192, Zoology's in every MQAR experiment of the paper; it notes that
                   vocabularies above 1k separate architectures), num_train (20,000), num_val
                   (1,000), num_test (1,000) (Zoology's Figure 2 uses 100,000 and 3,000),
                   power_a (0.01, Zoology's), random_filler (False), data_seed (0)
  passkey          seq_len (256), num_depth_bins (5), num_train (20,000), num_val (1,000),
                   num_test (1,000), data_seed (0)
Synthetic splits are generated from SeedSequence([data_seed, split]) (split 0, 1, 2 for train,
val, test), in numpy, deterministically, in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import numpy as np

from paperzoo.data import files
from paperzoo.registry import DATASETS

SHAKESPEARE_FILE = "tinyshakespeare/input.txt"
TRAIN_FRACTION = 0.9  # nanoGPT's shakespeare_char split

# Landmark Attention's passkey test (epfml/landmark-attention, llama/run_test.py).
PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                  "There and back again.")
PASSKEY_LENGTH = 5
PASSKEY_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
# Text with passkeys in training is probed on this many passkey windows of the validation text
# after training, in this many depth bins.
PASSKEY_PROBE_EXAMPLES = 250
PASSKEY_PROBE_BINS = 5

_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
_MQAR_CHUNK = 4096  # examples generated at a time: bounded memory, same result for any size


def _get(data: Any, key: str, default: Any) -> Any:
  return data.get(key, default)


# --------------------------------------------------------------------------------------------
# Characters <-> ids.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _ascii_table(vocab: str) -> np.ndarray | None:
  """byte -> id (-1 where not in `vocab`), or None for a vocabulary beyond ASCII."""
  if not vocab.isascii():
    return None
  table = np.full(128, -1, np.int32)
  table[np.frombuffer(vocab.encode("ascii"), np.uint8)] = np.arange(len(vocab), dtype=np.int32)
  return table


def encode_chars(text: str, vocab: str) -> np.ndarray:
  """int32 ids of `text`'s characters in `vocab` (index = id); a ValueError names characters
  that `vocab` lacks."""
  table = _ascii_table(vocab)
  if table is not None and text.isascii():
    ids = table[np.frombuffer(text.encode("ascii"), np.uint8)]
  else:
    index = {c: i for i, c in enumerate(vocab)}
    ids = np.asarray([index.get(c, -1) for c in text], np.int32)
  if np.any(ids < 0):
    missing = sorted(set(text) - set(vocab))
    raise ValueError(f"characters {''.join(missing)!r} are not in the {len(vocab)}-character "
                     f"vocabulary")
  return ids.astype(np.int32)


def decode_chars(ids: Any, vocab: str) -> str:
  """The text of `ids` (ints in [0, len(vocab)))."""
  return "".join(vocab[int(i)] for i in np.asarray(ids).reshape(-1))


# --------------------------------------------------------------------------------------------
# What a loader returns.
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SequenceSplit:
  """Examples held in memory: `arrays` has "inputs", "targets", "weights" [N, seq_len] (stored
  in small dtypes) and optionally per-example ints [N] (e.g. "depth_bin")."""

  arrays: dict[str, np.ndarray]

  def __post_init__(self):
    sizes = {name: len(array) for name, array in self.arrays.items()}
    if len(set(sizes.values())) != 1 or not {"inputs", "targets", "weights"} <= set(sizes):
      raise ValueError(f"a split needs 'inputs', 'targets' and 'weights' arrays of equal "
                       f"leading sizes, got {sizes}")

  def __len__(self) -> int:
    return len(self.arrays["inputs"])

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {name: array[indices].astype(np.float32 if name == "weights" else np.int32)
            for name, array in self.arrays.items()}


class WindowSplit:
  """Training windows of a token stream: example i is ids[i : i + seq_len + 1], optionally
  turned into a passkey example (module docstring) for a `passkey_fraction` of the indices."""

  def __init__(self, ids: np.ndarray, seq_len: int, *, passkey_fraction: float = 0.0,
               passkey: PasskeyFormat | None = None, seed: int = 0):
    if len(ids) <= seq_len:
      raise ValueError(f"a stream of {len(ids)} tokens has no window of seq_len={seq_len} + 1")
    if passkey_fraction > 0 and passkey is None:
      raise ValueError("passkey_fraction > 0 needs a PasskeyFormat")
    self.ids, self.seq_len = ids, seq_len
    self.passkey_fraction, self.passkey, self.seed = passkey_fraction, passkey, seed

  def __len__(self) -> int:
    return len(self.ids) - self.seq_len

  def is_passkey(self, indices: np.ndarray) -> np.ndarray:
    """Which of the windows `indices` are passkey examples (a pure function of the index)."""
    if self.passkey_fraction <= 0:
      return np.zeros(len(indices), bool)
    return hash_uniform(self.seed, indices, 0) < self.passkey_fraction

  def prefix_lengths(self, indices: np.ndarray) -> np.ndarray:
    """The filler before the key line of passkey windows `indices` (uniform in [0, F])."""
    return (hash_bits(self.seed, np.asarray(indices, np.int64), PASSKEY_LENGTH + 1)
            % np.uint64(self.passkey.filler_length + 1)).astype(np.int64)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    windows = self.ids[indices[:, None] + np.arange(self.seq_len + 1)]
    chosen = np.flatnonzero(self.is_passkey(indices))
    if len(chosen):
      fmt = self.passkey
      rows = indices[chosen]
      keys = (hash_bits(self.seed, rows[:, None], np.arange(1, PASSKEY_LENGTH + 1))
              % np.uint64(len(PASSKEY_ALPHABET))).astype(np.int64)
      prefix_lens = self.prefix_lengths(rows)
      filler = windows[chosen]
      # The suffix continues the text where the prefix stopped: the key line is spliced in.
      suffix = np.take_along_axis(
          filler, np.minimum(prefix_lens[:, None] + np.arange(fmt.filler_length),
                             self.seq_len), axis=1)
      windows[chosen] = fmt.build(filler[:, :fmt.filler_length], suffix, prefix_lens, keys)
    return {"inputs": windows[:, :-1].astype(np.int32),
            "targets": windows[:, 1:].astype(np.int32),
            "weights": np.ones((len(indices), self.seq_len), np.float32)}


class ChunkSplit:
  """A token stream cut into non-overlapping windows of `seq_len` predictions: window j
  predicts ids[j seq_len + 1 .. (j + 1) seq_len], so every token after the first is predicted
  exactly once; the last window's padding has weight 0."""

  def __init__(self, ids: np.ndarray, seq_len: int):
    if len(ids) < 2:
      raise ValueError(f"a stream of {len(ids)} tokens has nothing to predict")
    self.ids, self.seq_len = ids, seq_len

  def __len__(self) -> int:
    return -(-(len(self.ids) - 1) // self.seq_len)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    positions = np.asarray(indices, np.int64)[:, None] * self.seq_len + np.arange(self.seq_len)
    valid = positions + 1 < len(self.ids)  # the target exists
    last = len(self.ids) - 1
    inputs = np.where(valid, self.ids[np.minimum(positions, last)], 0)
    targets = np.where(valid, self.ids[np.minimum(positions + 1, last)], 0)
    return {"inputs": inputs.astype(np.int32), "targets": targets.astype(np.int32),
            "weights": valid.astype(np.float32)}


class PasskeyProbeSplit:
  """Passkey retrieval in real text: every window of `windows` (a WindowSplit of held-out text
  with passkey_fraction 1) at `num_examples` evenly spaced starts, scored only on the 5 answer
  characters, with each example's "depth_bin" (how deep the key line sits in the text)."""

  def __init__(self, windows: WindowSplit, num_examples: int, num_bins: int):
    self.windows, self.num_bins = windows, num_bins
    self.starts = np.linspace(0, len(windows) - 1, num_examples).astype(np.int64)

  def __len__(self) -> int:
    return len(self.starts)

  def get_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    rows = self.starts[np.asarray(indices, np.int64)]
    batch = self.windows.get_batch(rows)
    fmt = self.windows.passkey
    batch["weights"] = np.zeros_like(batch["weights"])
    batch["weights"][:, fmt.answer_slice] = 1.0
    batch["depth_bin"] = fmt.depth_bin(self.windows.prefix_lengths(rows), self.num_bins)
    return batch


@dataclasses.dataclass
class TextData:
  """Three splits and what a model and the task need to know about them."""

  name: str
  train: Any
  val: Any
  test: Any
  vocab: str | None  # the characters, index = id (character data); None for synthetic tokens
  vocab_size: int
  seq_len: int
  # A synthetic probe (mqar, passkey): scored and selected by the accuracy of its weighted
  # tokens; no samples are drawn from a model trained on it.
  probe: bool = False
  num_depth_bins: int = 0  # > 0: examples carry "depth_bin" (passkey)
  # How model selection was done, for reports.
  selection: str = "validation"
  # Text with passkeys mixed into training: passkey examples in held-out text, scored after
  # training (final_metrics) by depth bin.
  passkey_probe: Any = None

  def encode(self, text: str) -> np.ndarray:
    if self.vocab is None:
      raise ValueError(f"data set {self.name!r} has token ids, not characters")
    return encode_chars(text, self.vocab)

  def decode(self, ids: Any) -> str:
    if self.vocab is None:
      raise ValueError(f"data set {self.name!r} has token ids, not characters")
    return decode_chars(ids, self.vocab)


# --------------------------------------------------------------------------------------------
# Counter-based randomness: a draw that is a pure function of (seed, index, stream).
# --------------------------------------------------------------------------------------------
def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer (Steele et al. 2014): a bijection of uint64 that mixes every bit."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_bits(seed: int, index: Any, stream: Any) -> np.ndarray:
  """64 random bits for each (seed, index, stream), broadcast over index and stream."""
  x = _splitmix64(np.uint64(seed) ^ np.uint64(0x5DEECE66D))
  x = _splitmix64(x ^ np.asarray(index).astype(np.uint64))
  return _splitmix64(x ^ np.asarray(stream).astype(np.uint64))


def hash_uniform(seed: int, index: Any, stream: Any) -> np.ndarray:
  """A float64 in [0, 1) for each (seed, index, stream)."""
  return (hash_bits(seed, index, stream) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# --------------------------------------------------------------------------------------------
# The passkey example.
# --------------------------------------------------------------------------------------------
class PasskeyFormat:
  """Lays out passkey examples of exactly `seq_len + 1` characters (module docstring) in the
  ids of a character vocabulary.

  `filler_length` F characters of filler are split into a prefix of P and a suffix of F - P;
  `build` puts the key line between them and the question with its answer at the end, where
  the answer always takes characters seq_len - 5 .. seq_len - 1, i.e. the targets
  `answer_slice` (seq_len - 6 .. seq_len - 2).
  """

  def __init__(self, vocab: str, seq_len: int):
    self.vocab, self.seq_len = vocab, seq_len
    key = "\0" * PASSKEY_LENGTH  # placeholder, replaced by the key's letters
    self.key_line_text = f"The pass key is {key}. Remember it. {key} is the pass key."
    self.tail_text = f"What is the pass key? The pass key is {key}."
    encode = lambda s: encode_chars(s.replace("\0", PASSKEY_ALPHABET[0]), vocab)
    self.newline = int(encode_chars("\n", vocab)[0])
    self.key_line = encode(self.key_line_text)
    self.key_line_slots = np.flatnonzero(np.frombuffer(self.key_line_text.encode(), np.uint8)
                                         == 0)
    self.tail = np.concatenate([[self.newline], encode(self.tail_text)]).astype(np.int32)
    self.tail_slots = 1 + np.flatnonzero(np.frombuffer(self.tail_text.encode(), np.uint8) == 0)
    self.letters = encode_chars(PASSKEY_ALPHABET, vocab)
    self.fixed_length = len(self.key_line) + len(self.tail) + 2  # + the two other newlines
    self.filler_length = seq_len + 1 - self.fixed_length
    if self.filler_length < 0:
      raise ValueError(f"seq_len={seq_len} is too short for a passkey example: its fixed lines "
                       f"take {self.fixed_length} characters, so seq_len must be >= "
                       f"{self.fixed_length - 1}")
    self.answer_slice = slice(seq_len - 1 - PASSKEY_LENGTH, seq_len - 1)

  def build(self, prefix: np.ndarray, suffix: np.ndarray, prefix_lens: np.ndarray,
            keys: np.ndarray) -> np.ndarray:
    """int32 [N, seq_len + 1]: prefix[:P] \\n key line \\n suffix[:F - P] \\n question + answer.

    prefix, suffix: ids [N, F] (only their first P and F - P are used); prefix_lens: P [N] in
    [0, F]; keys: letter indices [N, PASSKEY_LENGTH] into PASSKEY_ALPHABET.
    """
    n, f = len(keys), self.filler_length
    key_ids = self.letters[np.asarray(keys, np.int64)]
    key_line = np.tile(self.key_line, (n, 1))
    key_line[:, self.key_line_slots] = np.tile(key_ids, 2)
    tail = np.tile(self.tail, (n, 1))
    tail[:, self.tail_slots] = key_ids
    p = np.asarray(prefix_lens, np.int64)[:, None]
    k = len(self.key_line)
    j = np.arange(f + k + 2)[None]  # the positions before the tail
    head = np.where(
        j < p, np.take_along_axis(prefix, np.minimum(j, max(f - 1, 0)), axis=1) if f else 0,
        np.where(j == p, self.newline,
                 np.where(j <= p + k, np.take_along_axis(key_line, np.clip(j - p - 1, 0, k - 1),
                                                         axis=1),
                          np.where(j == p + k + 1, self.newline,
                                   np.take_along_axis(suffix, np.clip(j - p - k - 2, 0,
                                                                      max(f - 1, 0)), axis=1)
                                   if f else 0))))
    return np.concatenate([head, tail], axis=1).astype(np.int32)

  def depth_bin(self, prefix_lens: np.ndarray, num_bins: int) -> np.ndarray:
    """The depth bin of prefix lengths P in [0, F]: P num_bins // (F + 1)."""
    return (np.asarray(prefix_lens, np.int64) * num_bins // (self.filler_length + 1)
            ).astype(np.int32)

  def prefix_lengths_for_bins(self, bins: np.ndarray, num_bins: int, rng: np.random.Generator
                              ) -> np.ndarray:
    """A uniform prefix length among those of each depth bin in `bins`."""
    size = self.filler_length + 1
    low = -(-np.asarray(bins, np.int64) * size // num_bins)  # the first P of the bin
    high = -(-(np.asarray(bins, np.int64) + 1) * size // num_bins)
    return low + np.floor(rng.random(len(low)) * (high - low)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Tiny Shakespeare.
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=2)
def _read_shakespeare(path: str) -> tuple[str, str, np.ndarray]:
  text = pathlib.Path(path).read_text(encoding="utf-8")
  vocab = "".join(sorted(set(text)))
  return text, vocab, encode_chars(text, vocab).astype(np.uint8 if len(vocab) <= 256
                                                       else np.int32)


def shakespeare(root: str | None = None) -> tuple[str, str, np.ndarray]:
  """(text, vocabulary, ids) of tiny Shakespeare; the vocabulary is the sorted set of its
  characters (nanoGPT's), index = id."""
  return _read_shakespeare(str(files.data_file(SHAKESPEARE_FILE, root=root or None)))


def _check_seq_len(seq_len: int, minimum: int = 2) -> None:
  if seq_len < minimum:
    raise ValueError(f"data.seq_len={seq_len} must be >= {minimum}")


@DATASETS.register("tinyshakespeare", kind="text")
def load_tinyshakespeare(data: Any) -> TextData:
  seq_len = int(_get(data, "seq_len", 64))
  passkey_fraction = float(_get(data, "passkey_fraction", 0.0))
  seed = int(_get(data, "data_seed", 0))
  _check_seq_len(seq_len)
  if not 0.0 <= passkey_fraction < 1.0:
    raise ValueError(f"data.passkey_fraction={passkey_fraction} must be in [0, 1)")
  text, vocab, ids = shakespeare(_get(data, "root", ""))
  n_train = int(len(text) * TRAIN_FRACTION)
  passkey = None
  if passkey_fraction > 0:
    try:
      passkey = PasskeyFormat(vocab, seq_len)
    except ValueError as error:
      raise ValueError(f"data.passkey_fraction={passkey_fraction}: data.{error}") from None
  val = ChunkSplit(ids[n_train:], seq_len)
  probe = None
  if passkey is not None:
    probe = PasskeyProbeSplit(WindowSplit(ids[n_train:], seq_len, passkey_fraction=1.0,
                                          passkey=passkey, seed=seed + 1),
                              PASSKEY_PROBE_EXAMPLES, PASSKEY_PROBE_BINS)
  return TextData(
      name="tinyshakespeare",
      train=WindowSplit(ids[:n_train], seq_len, passkey_fraction=passkey_fraction,
                        passkey=passkey, seed=seed),
      val=val, test=val, vocab=vocab, vocab_size=len(vocab), seq_len=seq_len,
      selection="validation (nanoGPT's split; the same split is reported)",
      passkey_probe=probe)


# --------------------------------------------------------------------------------------------
# Passkey retrieval.
# --------------------------------------------------------------------------------------------
def _split_rng(seed: int, split: str) -> np.random.Generator:
  return np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_IDS[split]]))


def passkey_split(fmt: PasskeyFormat, num_examples: int, num_bins: int,
                  rng: np.random.Generator) -> SequenceSplit:
  """`num_examples` passkey examples with Landmark Attention's filler; example i in depth bin
  i mod num_bins."""
  filler = encode_chars(" ".join([PASSKEY_FILLER] * (fmt.filler_length // len(PASSKEY_FILLER)
                                                     + 1)), fmt.vocab)[:fmt.filler_length]
  bins = np.arange(num_examples) % num_bins
  prefix_lens = fmt.prefix_lengths_for_bins(bins, num_bins, rng)
  keys = rng.integers(0, len(PASSKEY_ALPHABET), (num_examples, PASSKEY_LENGTH))
  # Both parts of the filler start at its beginning, as in Landmark Attention.
  stream = np.broadcast_to(filler, (num_examples, fmt.filler_length))
  tokens = fmt.build(stream, stream, prefix_lens, keys)
  weights = np.zeros((num_examples, fmt.seq_len), np.uint8)
  weights[:, fmt.answer_slice] = 1
  return SequenceSplit({"inputs": tokens[:, :-1].astype(np.uint8),
                        "targets": tokens[:, 1:].astype(np.uint8), "weights": weights,
                        "depth_bin": fmt.depth_bin(prefix_lens, num_bins)})


@DATASETS.register("passkey", kind="text")
def load_passkey(data: Any) -> TextData:
  seq_len = int(_get(data, "seq_len", 256))
  num_bins = int(_get(data, "num_depth_bins", 5))
  seed = int(_get(data, "data_seed", 0))
  sizes = {split: int(_get(data, f"num_{split}", 20000 if split == "train" else 1000))
           for split in ("train", "val", "test")}
  if num_bins < 1 or min(sizes.values()) < 1:
    raise ValueError(f"data.num_depth_bins={num_bins} and data.num_train/num_val/num_test="
                     f"{list(sizes.values())} must be >= 1")
  _, vocab, _ = shakespeare(_get(data, "root", ""))
  try:
    fmt = PasskeyFormat(vocab, seq_len)
  except ValueError as error:
    raise ValueError(f"data.{error}") from None
  if fmt.filler_length + 1 < num_bins:
    raise ValueError(f"data.seq_len={seq_len} leaves {fmt.filler_length} filler characters, "
                     f"too few for data.num_depth_bins={num_bins} depth bins")
  splits = {split: passkey_split(fmt, size, num_bins, _split_rng(seed, split))
            for split, size in sizes.items()}
  return TextData(name="passkey", **splits, vocab=vocab, vocab_size=len(vocab),
                  seq_len=seq_len, probe=True, num_depth_bins=num_bins)


# --------------------------------------------------------------------------------------------
# Multi-query associative recall.
# --------------------------------------------------------------------------------------------
def _distinct(rng: np.random.Generator, n: int, k: int, low: int, high: int) -> np.ndarray:
  """[n, k] ints from [low, high), distinct within each row, in random order: Floyd's subset
  sampling, vectorized over rows (memory O(n k), not O(n (high - low)))."""
  m = high - low
  chosen = np.empty((n, k), np.int64)
  for j, top in enumerate(range(m - k, m)):
    t = rng.integers(0, top + 1, size=n)
    taken = (chosen[:, :j] == t[:, None]).any(axis=1)
    chosen[:, j] = np.where(taken, top, t)
  order = np.argsort(rng.random((n, k)), axis=1)  # Floyd's sets come out in a biased order
  return low + np.take_along_axis(chosen, order, axis=1)


def mqar_examples(rng: np.random.Generator, num_examples: int, *, seq_len: int,
                  num_kv_pairs: int, vocab_size: int, power_a: float = 0.01,
                  random_filler: bool = False) -> dict[str, np.ndarray]:
  """Zoology's MQAR layout (module docstring): {"inputs", "targets", "weights"} [N, seq_len]."""
  k = num_kv_pairs
  context = 2 * k
  space = (seq_len - context) // 2
  log_p = (power_a - 1.0) * np.log(np.arange(1, space + 1))  # p(g) ~ (g + 1)^(a - 1)
  dtype = np.uint16 if vocab_size <= 1 << 16 else np.int32
  parts = []
  for start in range(0, num_examples, _MQAR_CHUNK):
    n = min(_MQAR_CHUNK, num_examples - start)
    rows = np.arange(n)[:, None]
    keys = _distinct(rng, n, k, 1, vocab_size // 2)
    values = _distinct(rng, n, k, vocab_size // 2, vocab_size)
    # Weighted sampling without replacement, in draw order: the Gumbel top-k trick.
    gumbel = log_p - np.log(-np.log(rng.random((n, space))))
    gaps = np.argsort(-gumbel, axis=1)[:, :k]
    if random_filler:
      stream = rng.integers(0, vocab_size, (n, seq_len + 1))
    else:
      stream = np.zeros((n, seq_len + 1), np.int64)
    stream[:, 0:context:2] = keys
    stream[:, 1:context:2] = values
    queries = context + 2 * gaps
    stream[rows, queries] = keys
    targets = stream[:, 1:].copy()
    targets[rows, queries] = values
    weights = np.zeros((n, seq_len), np.uint8)
    weights[rows, queries] = 1
    parts.append({"inputs": stream[:, :-1].astype(dtype), "targets": targets.astype(dtype),
                  "weights": weights})
  return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


@DATASETS.register("mqar", kind="text")
def load_mqar(data: Any) -> TextData:
  seq_len = int(_get(data, "seq_len", 64))
  k = int(_get(data, "num_kv_pairs", 4))
  vocab_size = int(_get(data, "vocab_size", 8192))
  power_a = float(_get(data, "power_a", 0.01))
  random_filler = bool(_get(data, "random_filler", False))
  seed = int(_get(data, "data_seed", 0))
  sizes = {split: int(_get(data, f"num_{split}", 20000 if split == "train" else 1000))
           for split in ("train", "val", "test")}
  _check_seq_len(seq_len)
  if k < 1:
    raise ValueError(f"data.num_kv_pairs={k} must be >= 1")
  if 4 * k > seq_len:
    raise ValueError(f"data.num_kv_pairs={k} pairs do not fit data.seq_len={seq_len}: the "
                     f"2 x num_kv_pairs pair tokens and num_kv_pairs queries at even offsets "
                     f"of the rest need 4 x num_kv_pairs <= seq_len")
  if k > vocab_size // 2 - 1:
    raise ValueError(f"data.vocab_size={vocab_size} has {max(vocab_size // 2 - 1, 0)} keys "
                     f"(ids 1 .. vocab_size / 2 - 1), fewer than data.num_kv_pairs={k}")
  if power_a <= 0 or min(sizes.values()) < 1:
    raise ValueError(f"data.power_a={power_a} must be > 0 and data.num_train/num_val/num_test="
                     f"{list(sizes.values())} >= 1")
  def make(split: str) -> SequenceSplit:
    return SequenceSplit(mqar_examples(
        _split_rng(seed, split), sizes[split], seq_len=seq_len, num_kv_pairs=k,
        vocab_size=vocab_size, power_a=power_a, random_filler=random_filler))

  return TextData(name="mqar", train=make("train"), val=make("val"), test=make("test"),
                  vocab=None, vocab_size=vocab_size, seq_len=seq_len, probe=True)
