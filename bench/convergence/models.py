"""Models for the workloads.

- ``make_lm``: a LLaMA-architecture causal LM from ``transformers`` (``LlamaConfig`` /
  ``LlamaForCausalLM`` built from a config, random init, no weights downloaded). If
  ``transformers`` is missing, a small pure-torch LLaMA-like transformer (RMSNorm, RoPE-free
  learned positions, SwiGLU, causal attention) is used instead and ``kind`` says so.
- ``ResNetDigits``: a small residual CNN for 8x8 digits (3x3 convs, GroupNorm), whose conv
  kernels are compressed as out x (in*kh*kw) matrices.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LM_PRESETS = {
    # name: hidden, layers, heads, ffn
    "tiny": dict(hidden=32, layers=1, heads=2, ffn=64),
    "small": dict(hidden=128, layers=4, heads=4, ffn=344),
    "base": dict(hidden=256, layers=4, heads=4, ffn=688),
}


class _RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class _Block(nn.Module):
    def __init__(self, d, h, ffn):
        super().__init__()
        self.h = h
        self.input_layernorm = _RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.post_attention_layernorm = _RMSNorm(d)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)

    def forward(self, x):
        B, T, D = x.shape
        y = self.input_layernorm(x)
        q, k, v = (p(y).view(B, T, self.h, D // self.h).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(a.transpose(1, 2).reshape(B, T, D))
        y = self.post_attention_layernorm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))


class TorchLlamaLike(nn.Module):
    """Fallback LM when ``transformers`` is not installed (same parameter naming style)."""

    def __init__(self, vocab, hidden, layers, heads, ffn, max_len):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.embed_positions = nn.Embedding(max_len, hidden)
        self.layers = nn.ModuleList(_Block(hidden, heads, ffn) for _ in range(layers))
        self.norm = _RMSNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, input_ids):
        T = input_ids.shape[1]
        x = self.embed_tokens(input_ids) + self.embed_positions(torch.arange(T))
        for b in self.layers:
            x = b(x)
        return self.lm_head(self.norm(x))


class LMWrapper(nn.Module):
    """Uniform interface: ``forward(ids) -> mean next-byte cross-entropy``."""

    def __init__(self, inner, hf: bool):
        super().__init__()
        self.inner = inner
        self.hf = hf

    def forward(self, ids):
        if self.hf:
            logits = self.inner(input_ids=ids, use_cache=False).logits
        else:
            logits = self.inner(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                               ids[:, 1:].reshape(-1))


def make_lm(preset="small", seq=128, vocab=256, seed=0, force_fallback=False):
    """Return (model, kind) where kind names the architecture actually used."""
    cfg = LM_PRESETS[preset] if isinstance(preset, str) else dict(preset)
    torch.manual_seed(seed)
    if not force_fallback:
        try:
            from transformers import LlamaConfig, LlamaForCausalLM
            import transformers
            c = LlamaConfig(vocab_size=vocab, hidden_size=cfg["hidden"],
                            intermediate_size=cfg["ffn"], num_hidden_layers=cfg["layers"],
                            num_attention_heads=cfg["heads"], num_key_value_heads=cfg["heads"],
                            max_position_embeddings=max(seq, 64), tie_word_embeddings=False,
                            attn_implementation="sdpa")
            m = LlamaForCausalLM(c)
            return LMWrapper(m, hf=True), f"transformers {transformers.__version__} LlamaForCausalLM"
        except ImportError:
            pass
    m = TorchLlamaLike(vocab, cfg["hidden"], cfg["layers"], cfg["heads"], cfg["ffn"], max(seq, 64))
    return LMWrapper(m, hf=False), "pure-torch LLaMA-like fallback (transformers not installed)"


class _ResBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(4, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(4, cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(4, cout))

    def forward(self, x):
        y = F.relu(self.gn1(self.conv1(x)))
        y = self.gn2(self.conv2(y))
        return F.relu(y + (x if self.short is None else self.short(x)))


class ResNetDigits(nn.Module):
    """Residual CNN for 1x8x8 inputs: stem, 2 stages x 2 blocks, global pool, linear head."""

    def __init__(self, width=32, num_classes=10):
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 1, 1, bias=False), nn.GroupNorm(4, w), nn.ReLU())
        self.layer1 = nn.Sequential(_ResBlock(w, w, 1), _ResBlock(w, w, 1))
        self.layer2 = nn.Sequential(_ResBlock(w, 2 * w, 2), _ResBlock(2 * w, 2 * w, 1))
        self.fc = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(x.mean((2, 3)))


def count_params(model):
    return sum(p.numel() for p in model.parameters())
