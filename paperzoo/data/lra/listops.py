"""LRA ListOps: random nested MIN / MAX / MED / SM expressions and their values.

The Long Range Arena task (Tay et al., 2021, after Nangia & Bowman, 2018): read a long prefix
expression in bracket syntax and output its value, a digit (10 classes):

    [MAX 4 3 [MIN 2 3 ] 1 0 ]          -> 4
    [SM [MED 1 2 3 4 ] 9 ]             -> (2 + 9) % 10 = 1

Operators: MIN, MAX, MED (LRA's `int(np.median(args))`: the middle value, or for an even count
the mean of the two middle values rounded down, `[MED 1 2 3 4 ]` -> 2) and SM (sum modulo 10).

Definition (LRA's generator). A tree is grown from the root at depth 1. A node at depth < 10 is
an operator with probability 0.25, else a leaf; a node at depth 10 is always a leaf. An operator
is uniform over the four, its arity uniform in 2..10, its children grown the same way one level
deeper; a leaf is a digit uniform in 0..9. So a tree is at most 10 levels deep (operators nest at
most 9 deep). An expression is kept when its token count lies in [min_len, max_len] (LRA: 500 to
2,000 tokens; 96,000 / 2,000 / 2,000 train / val / test); label = its value.

Tokens (LRA's tokenization): whitespace-separated, an operator with its opening bracket (`[MAX`)
is one token and `]` is one token. `VOCAB` holds the padding token at id 0, the digits 0..9 (ids
1..10), `[MIN [MAX [MED [SM` (11..14) and `]` (15); `tokenize` pads with 0 at the end.

Sampling. Rejection sampling from LRA's distribution itself, made cheap in three ways:
  * The root is always an operator. LRA's root is a bare digit with probability 0.75, one token,
    which any min_len >= 2 rejects; skipping those attempts is exact conditioning, not a change
    of distribution. Conditioned on an operator root, 34% of trees land in [500, 2000], 10% in
    [50, 250] and 19% in [10, 60] (measured).
  * Phase 1 draws only the shape, breadth first, for a whole batch of attempts at once (numpy,
    one level of every tree per step, at most 10 steps): each node's kind, operator, arity and
    digit come from one uniform integer (see _CHOICES). A tree is dropped as soon as its tokens
    so far plus one per child still to draw exceed max_len, so oversized trees (5% of
    operator-rooted trees exceed 2,000 tokens, about half exceed 250) are never built out; a
    rejected attempt costs a few numpy operations per node drawn, nothing more.
  * Phase 2 runs on the accepted trees only, still level by level: subtree sizes and values
    bottom-up (each operator's value is read off a 10-bin histogram of its children's values,
    as all values are digits), then each node's position in the prefix-order token sequence
    top-down, and the tokens are scattered into place. No Python loop runs per node or token
    except the final " ".join per expression.
The operator probability is deliberately not tuned to the target length: a different
probability p re-weights the trees of a given length (by (p / (9 (1 - p)^2))^operators), so it
would change the task, and with LRA's own the sampler is fast enough (timings below). The test
suite compares its statistics with a plain recursive implementation of LRA's generator.

Accepted trees are kept in attempt order and the batch size depends on max_len only, so
`generate(n, seed=s)` is a prefix of `generate(m, seed=s)` for n < m with the same lengths.

Labels are imbalanced, as in LRA (not rebalanced here); percent of 20,000 samples per value:
  lengths 500..2000   0: 17  1: 9  2: 8  3: 8  4: 9  5: 8  6: 8  7: 7  8: 9  9: 17
  lengths 50..250     0: 15  1: 9  2: 8  3: 9  4: 9  5: 9  6: 8  7: 8  8: 9  9: 16
(0 and 9 are frequent because MIN and MAX of up to ten digits are mostly 0 and 9.) Lengths at
500..2000: mean 1,035, median 953, 10% / 90% quantiles 576 / 1,643.

Timings (one core of a shared 2-core machine): `generate` of 20,000 samples at lengths 50..250
~1.6 s; of 20,000 at 500..2000 ~5 s, so LRA's 100,000 in ~25 s. `load(96_000, 2_000, 2_000,
min_len=500, max_len=2_000)` ~30 s the first time (82 MB cache file), ~2.3 s from the cache;
`tokenize` of its 96,000 training expressions ~14 s. `load` caches the three splits in one
`.npz` (each split's expressions as newline-joined ASCII bytes, zlib level 1, and its labels
int32) under `cache_dir("lra", "listops")`, named by every argument, so a second call reads it.

    splits = load(96_000, 2_000, 2_000, min_len=500, max_len=2_000, seed=0)
    expressions, labels = splits["train"]
    tokens = tokenize(expressions, 2_000)  # int32 [96000, 2000], 0 = padding
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from paperzoo.data import files

PAD = "<pad>"
DIGITS = tuple(str(d) for d in range(10))
OPERATORS = ("[MIN", "[MAX", "[MED", "[SM")
CLOSE = "]"
VOCAB = (PAD, *DIGITS, *OPERATORS, CLOSE)

MAX_DEPTH = 10  # Levels of the tree, root = 1; leaves only at the last level.
MIN_ARGS, MAX_ARGS = 2, 10
OPERATOR_PROB = 0.25  # LRA's VALUE_P: a node above the last level is an operator this often.
SPLITS = ("train", "val", "test")

_DIGIT_ID = 1  # Id of "0"; digit d is _DIGIT_ID + d.
_OPERATOR_ID = _DIGIT_ID + len(DIGITS)  # Id of "[MIN"; operator k is _OPERATOR_ID + k.
_CLOSE_ID = _OPERATOR_ID + len(OPERATORS)
# Only real tokens map to ids: a literal "<pad>" in an expression is an error, not padding.
_TOKEN_IDS = {token: i for i, token in enumerate(VOCAB) if i}
_VOCAB_ARRAY = np.array(VOCAB, dtype=object)

# One uniform integer in [0, _CHOICES) per child: x < _OPEN_CHOICES (probability OPERATOR_PROB)
# opens operator x % 4 with arity MIN_ARGS + x // 4 % 9, else the child is digit x % 10. Both
# ranges are whole multiples of their outcome counts (180 = 5 * 4 * 9, 540 = 54 * 10), so every
# operator, arity and digit is exactly uniform; a forced leaf uses x % 10 of all 720 (= 72 * 10).
_ARITIES = MAX_ARGS - MIN_ARGS + 1
_OPEN_CHOICES = 180
_CHOICES = 720
assert _OPEN_CHOICES == OPERATOR_PROB * _CHOICES and _OPEN_CHOICES % (4 * _ARITIES) == 0
assert (_CHOICES - _OPEN_CHOICES) % 10 == 0 and _CHOICES % 10 == 0

# Raise instead of looping forever when a length range is (nearly) unreachable.
_MAX_EMPTY_BATCHES = 50
_CACHE_VERSION = 1  # Bump when the generator's output for given arguments changes.


def generate(num_samples: int, *, min_len: int, max_len: int, seed: int
             ) -> tuple[list[str], np.ndarray]:
  """`num_samples` expressions with min_len <= tokens <= max_len, and their int32 values.

  Deterministic in (`seed`, `min_len`, `max_len`); fewer samples give a prefix of more.
  """
  if num_samples < 0:
    raise ValueError(f"num_samples must be >= 0, got {num_samples}")
  if not 1 <= min_len <= max_len:
    raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
  if max_len < 4:
    raise ValueError(f"max_len={max_len} is too short: the shortest expression, e.g. "
                     "'[SM 1 2 ]', has 4 tokens")
  rng = np.random.default_rng(seed)
  expressions: list[str] = []
  labels: list[np.ndarray] = []
  empty_batches = 0
  batch = _batch_size(max_len)
  while len(expressions) < num_samples:
    tokens, lengths, values = _grow_batch(rng, batch, min_len, max_len)
    if not len(values):
      empty_batches += 1
      if empty_batches >= _MAX_EMPTY_BATCHES:
        raise ValueError(
            f"no expression with {min_len} to {max_len} tokens in "
            f"{_MAX_EMPTY_BATCHES * batch} attempts: the range is (nearly) unreachable under "
            f"max depth {MAX_DEPTH} and arity {MIN_ARGS}..{MAX_ARGS}")
      continue
    take = min(len(values), num_samples - len(expressions))
    expressions.extend(" ".join(_VOCAB_ARRAY[row[:length]].tolist())
                       for row, length in zip(tokens[:take], lengths[:take]))
    labels.append(values[:take])
  label_array = np.concatenate(labels) if labels else np.zeros(0, np.int32)
  return expressions, label_array.astype(np.int32)


def _batch_size(max_len: int) -> int:
  """Attempts grown together: about 4M tokens' worth, so memory stays ~100 MB at any length.
  A function of max_len only, so that fewer samples are a prefix of more."""
  return int(np.clip((1 << 22) // max_len, 1 << 10, 1 << 16))


def _grow_batch(rng: np.random.Generator, batch: int, min_len: int, max_len: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Samples `batch` operator-rooted trees; returns the accepted ones in attempt order as token
  ids uint8 [k, max_len] (0 after the end), lengths [k] and values [k].

  Phase 1 draws the trees level by level (breadth first), every tree of the batch at once, and
  drops a tree as soon as its tokens so far plus one per child still to draw exceed max_len.
  Phase 2, on the accepted trees only, computes sizes and values bottom-up and each node's
  position in the prefix-order token sequence top-down, and writes the tokens.
  """
  # Phase 1. Per level, for every node: its tree, its parent (index into the level above; the
  # children of an operator are consecutive, in order) and its choice (see _CHOICES).
  levels: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
  tree = np.arange(batch)
  parent = np.full(batch, -1)
  choice = rng.integers(0, _CHOICES, batch)
  # The root is always an operator; its choice picks operator and arity uniformly too (720
  # is a multiple of the 4 * 9 pairs).
  opens = np.ones(batch, bool)
  size = np.zeros(batch, np.int64)  # Tokens of the levels drawn so far, "]" included.
  alive = np.ones(batch, bool)
  for depth in range(1, MAX_DEPTH + 1):
    levels.append((tree, parent, choice, opens))
    size += np.bincount(tree, weights=1 + opens, minlength=batch).astype(np.int64)
    operator = np.flatnonzero(opens)
    arity = MIN_ARGS + choice[operator] // len(OPERATORS) % _ARITIES
    children = np.bincount(tree[operator], weights=arity, minlength=batch).astype(np.int64)
    alive &= size + children <= max_len  # Every child is at least one more token.
    expand = alive[tree[operator]]
    if not expand.any():
      break
    parent = np.repeat(operator[expand], arity[expand])
    tree = tree[parent]
    choice = rng.integers(0, _CHOICES, len(parent))
    # A child at the last level is a leaf: it reads its digit from the same choice.
    opens = (choice < _OPEN_CHOICES) & (depth + 1 < MAX_DEPTH)
  accepted = alive & (size >= min_len)
  num_accepted = int(accepted.sum())
  if not num_accepted:
    return np.zeros((0, max_len), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64)

  # Keep the accepted trees' nodes, renumbering trees and parents to the kept ones.
  renumber = np.cumsum(accepted) - 1
  kept = []
  parent_index = None
  for tree, parent, choice, opens in levels:
    keep = accepted[tree]
    if not keep.any():
      break
    new_parent = parent_index[parent[keep]] if parent_index is not None else parent[keep]
    kept.append((renumber[tree[keep]], new_parent, choice[keep], opens[keep]))
    parent_index = np.cumsum(keep) - 1

  # Phase 2, bottom-up: sizes (tokens of each subtree) and values.
  sizes: list[np.ndarray] = [None] * len(kept)
  values: list[np.ndarray] = [None] * len(kept)
  for depth in reversed(range(len(kept))):
    _, _, choice, opens = kept[depth]
    num_nodes = len(choice)
    value = choice % 10
    size = np.ones(num_nodes, np.int64)
    if depth + 1 < len(kept):
      child_parent = kept[depth + 1][1]
      child_tokens = np.bincount(child_parent, weights=sizes[depth + 1], minlength=num_nodes)
      size += opens * (1 + child_tokens.astype(np.int64))
      # Histogram of the children's values, per node (zero rows for leaves).
      hist = np.bincount(child_parent * 10 + values[depth + 1],
                         minlength=num_nodes * 10).reshape(num_nodes, 10)
      operator = np.flatnonzero(opens)
      value[operator] = _reduce(choice[operator] % len(OPERATORS), hist[operator])
    sizes[depth], values[depth] = size, value

  # Top-down: a child starts after its parent's token and its earlier siblings' subtrees.
  out = np.zeros(num_accepted * max_len, np.uint8)
  position = np.zeros(num_accepted, np.int64)
  for depth, (tree, parent, choice, opens) in enumerate(kept):
    size = sizes[depth]
    if depth:
      before = np.cumsum(size) - size  # Tokens of the level's earlier nodes.
      first = np.r_[True, parent[1:] != parent[:-1]]  # First child of its parent.
      group_start = np.maximum.accumulate(np.where(first, np.arange(len(parent)), 0))
      position = position[parent] + 1 + before - before[group_start]
    at = tree * max_len + position
    out[at] = np.where(opens, _OPERATOR_ID + choice % len(OPERATORS), _DIGIT_ID + choice % 10)
    out[at[opens] + size[opens] - 1] = _CLOSE_ID
  return out.reshape(num_accepted, max_len), sizes[0], values[0]


def _reduce(ops: np.ndarray, hist: np.ndarray) -> np.ndarray:
  """The value of each operator `ops` [k] over children with value histograms `hist` [k, 10]."""
  hist = hist.astype(np.int64)
  present = hist > 0
  smallest = np.argmax(present, axis=1)
  largest = 9 - np.argmax(present[:, ::-1], axis=1)
  total = hist @ np.arange(10)
  # The j-th smallest child (0-based) is the number of digits whose cumulative count is <= j.
  count = hist.sum(1)
  cumulative = np.cumsum(hist, axis=1)
  lower = (cumulative <= ((count - 1) // 2)[:, None]).sum(1)
  upper = (cumulative <= (count // 2)[:, None]).sum(1)
  by_op = np.stack([smallest, largest, (lower + upper) // 2, total % 10])
  return by_op[ops.astype(np.int64), np.arange(len(ops))]


_FUNCTIONS = {
    "[MIN": min,
    "[MAX": max,
    "[MED": lambda args: int(np.median(args)),
    "[SM": lambda args: sum(args) % 10,
}


def evaluate(expression: str) -> int:
  """The value of one bracket-syntax expression (a bare digit is its own value).

  Written apart from the generator (a stack of argument lists, `np.median` for MED) so that it
  checks the generator's labels. Raises ValueError on malformed input.
  """
  stack: list[tuple[str, list[int]]] = []
  result: int | None = None
  for token in expression.split():
    if result is not None:
      raise ValueError(f"tokens after the end of the expression at {token!r}: {expression!r}")
    if token in _FUNCTIONS:
      stack.append((token, []))
      continue
    if token == CLOSE:
      if not stack:
        raise ValueError(f"unmatched ']' in {expression!r}")
      op, args = stack.pop()
      if not args:
        raise ValueError(f"{op} without arguments in {expression!r}")
      value = int(_FUNCTIONS[op](args))
    elif token in DIGITS:
      value = int(token)
    else:
      raise ValueError(f"unknown token {token!r} in {expression!r}; tokens: {VOCAB[1:]}")
    if stack:
      stack[-1][1].append(value)
    else:
      result = value
  if stack or result is None:
    raise ValueError(f"incomplete expression {expression!r}")
  return result


def tokenize(expressions: Sequence[str], max_len: int) -> np.ndarray:
  """Token ids int32 [N, max_len] of `expressions` in `VOCAB`, padded with 0 at the end."""
  out = np.zeros((len(expressions), max_len), np.int32)
  for i, expression in enumerate(expressions):
    tokens = expression.split()
    if len(tokens) > max_len:
      raise ValueError(f"expression {i} has {len(tokens)} tokens, more than max_len={max_len} "
                       f"(starts {expression[:40]!r})")
    try:
      out[i, :len(tokens)] = [_TOKEN_IDS[token] for token in tokens]
    except KeyError as error:
      raise ValueError(f"unknown token {error.args[0]!r} in expression {i}; the vocabulary is "
                       f"{VOCAB[1:]} (padding {PAD!r} is not a token)") from None
  return out


def split_seed(seed: int, split: str) -> int:
  """The generator seed of one split of `load(..., seed=seed)`: distinct per split."""
  state = np.random.SeedSequence([seed, SPLITS.index(split)]).generate_state(2, np.uint32)
  return int(state[0]) << 32 | int(state[1])


def load(num_train: int, num_val: int, num_test: int, *, min_len: int, max_len: int, seed: int
         ) -> dict[str, tuple[list[str], np.ndarray]]:
  """{"train", "val", "test"}: (expressions, int32 labels), generated once and cached on disk.

  Split k is `generate(num_k, min_len=..., max_len=..., seed=split_seed(seed, k))`.
  """
  sizes = dict(zip(SPLITS, (num_train, num_val, num_test)))
  path = files.cache_dir("lra", "listops") / (
      f"listops_v{_CACHE_VERSION}_train{num_train}_val{num_val}_test{num_test}"
      f"_len{min_len}-{max_len}_seed{seed}.npz")

  def build() -> dict[str, np.ndarray]:
    arrays = {}
    for name, size in sizes.items():
      expressions, labels = generate(size, min_len=min_len, max_len=max_len,
                                     seed=split_seed(seed, name))
      arrays[f"{name}_text"] = np.frombuffer("\n".join(expressions).encode("ascii"), np.uint8)
      arrays[f"{name}_labels"] = labels
    return arrays

  # Deflate level 1: numpy's default level 6 takes longer than generating the full LRA set
  # (35 s vs 25 s).
  arrays = files.cached_arrays(path, build, compresslevel=1)
  splits = {}
  for name in SPLITS:
    labels = arrays[f"{name}_labels"]
    text = arrays[f"{name}_text"].tobytes().decode("ascii")
    expressions = text.split("\n") if len(labels) else []
    if len(expressions) != len(labels):
      raise ValueError(f"{path}: {len(expressions)} {name} expressions, {len(labels)} labels")
    splits[name] = (expressions, labels.astype(np.int32))
  return splits
