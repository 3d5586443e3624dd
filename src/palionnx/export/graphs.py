"""The three exportable pieces of PaliGemma, as small torch modules over a loaded transformers model.

- `VisionEncoder`: pixel_values -> image_features (SigLIP + projector, not scaled).
- `TokenEmbedder`: input_ids -> inputs_embeds (embedding * sqrt(hidden)).
- `Decoder`: the Gemma / Gemma 2 stack with a KV cache and the tied lm_head on the last position only.

The decoder is written out here rather than traced through transformers' generation code, so that the
exported graph has one plain contract (see `Decoder`) and fp16 exports can keep fp32 where Gemma overflows.
It reproduces transformers' semantics (checked token for token against `generate()` in the tests):
bidirectional attention over the whole prompt, causal afterwards, Gemma 2 soft-capping and sliding window.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FP16_MAX = 65504.0


class VisionEncoder(nn.Module):
    """pixel_values [b, 3, H, W] -> image_features [b, image_seq_length, hidden] in float32."""

    def __init__(self, model: Any):
        super().__init__()
        self.vision_tower = model.model.vision_tower
        self.projector = model.model.multi_modal_projector

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = self.projector.linear.weight.dtype
        hidden = self.vision_tower(pixel_values.to(dtype)).last_hidden_state
        return self.projector(hidden).float()


class TokenEmbedder(nn.Module):
    """input_ids [b, s] -> inputs_embeds [b, s, hidden] in float32, scaled by sqrt(hidden) as in Gemma."""

    def __init__(self, model: Any):
        super().__init__()
        embed = model.model.language_model.embed_tokens
        self.weight = embed.weight
        self.scale = float(model.config.text_config.hidden_size) ** 0.5

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.weight).float() * self.scale


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma RMSNorm in float32: x / rms(x) * (1 + w)."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + weight.float())


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    return x if cap is None else torch.tanh(x / cap) * cap


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoder(nn.Module):
    """Gemma / Gemma 2 decoder over a preallocated KV cache.

    Inputs: inputs_embeds [b, s, hidden] float32; attention_mask [b, max_len] int64 (1 = a real token
    already in the cache or being fed now, 0 = left padding or a free slot); position_ids [b, s] int64
    (1-indexed, counting real tokens only); past_length [] int64 (slots filled before this call); then per
    layer past_key_values.N.key / .value [b, kv_heads, max_len, head_dim].
    Outputs: logits [b, vocab] float32 for the last position, next_token [b] int64 (its argmax, so a
    greedy loop reads back 8 bytes per sequence), present.N.key / .value [b, kv, max_len, hd]: the cache
    with this call's keys written at slots past_length .. past_length + s - 1.

    The cache has a fixed size, so a runtime can bind two buffers once and swap them every step (no
    allocation, and on CUDA no host round-trip).

    Contract: the first call (past_length 0) feeds the whole prompt, which attends bidirectionally as
    PaliGemma's prefix does; every later call feeds exactly one token per sequence, which then sees all
    earlier tokens (causal) without a per-query mask.
    """

    def __init__(self, model: Any):
        super().__init__()
        config = model.config.text_config
        lm = model.model.language_model
        self.layers = lm.layers
        self.final_norm = lm.norm
        self.embed_weight = lm.embed_tokens.weight  # tied lm_head
        self.eps = config.rms_norm_eps
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.is_gemma2 = config.model_type == "gemma2"
        if self.is_gemma2:
            self.scaling = config.query_pre_attn_scalar**-0.5
            self.attn_cap = config.attn_logit_softcapping
            self.final_cap = config.final_logit_softcapping
            self.sliding = [t == "sliding_attention" for t in config.layer_types]
            self.window = config.sliding_window
        else:
            self.scaling = self.head_dim**-0.5
            self.attn_cap = self.final_cap = None
            self.sliding = [False] * config.num_hidden_layers
            self.window = 0
        theta = config.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_weight.dtype

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                past_length: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dtype = self.dtype
        new = inputs_embeds.shape[1]

        freqs = position_ids.float()[..., None] * self.inv_freq  # [b, s, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [b, 1, s, hd]
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)

        # Cache slots written by this call, as a scatter index [b, kv, s, hd].
        slots = (past_length + torch.arange(new, device=inputs_embeds.device))[None, None, :, None]
        slots = slots.expand(inputs_embeds.shape[0], self.kv_heads, new, self.head_dim)

        key_idx = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        valid = attention_mask[:, None, None, :].bool()  # [b, 1, 1, max_len]
        full_bias = torch.where(valid, 0.0, torch.finfo(torch.float32).min)
        # Sliding layers: the new token sees the last `window` slots; the prompt (all new at prefill) sees all.
        last = past_length + new - 1
        in_window = (key_idx > last - self.window) | (key_idx >= past_length)
        sliding_bias = torch.where(valid & in_window, 0.0, torch.finfo(torch.float32).min)

        hidden = inputs_embeds.float()  # the residual stream stays float32 (Gemma 2 overflows fp16 there)
        presents = []
        for i, layer in enumerate(self.layers):
            bias = sliding_bias if self.sliding[i] else full_bias
            attn_out, k, v = self._attention(layer, hidden, cos, sin, bias, past[2 * i], past[2 * i + 1], slots)
            presents += [k, v]
            if self.is_gemma2:
                attn_out = _rms_norm(attn_out, layer.post_attention_layernorm.weight, self.eps)
                hidden = hidden + attn_out
                mlp_in = _rms_norm(hidden, layer.pre_feedforward_layernorm.weight, self.eps).to(dtype)
                mlp_out = _rms_norm(self._mlp(layer.mlp, mlp_in), layer.post_feedforward_layernorm.weight, self.eps)
            else:
                hidden = hidden + attn_out.float()
                mlp_in = _rms_norm(hidden, layer.post_attention_layernorm.weight, self.eps).to(dtype)
                mlp_out = self._mlp(layer.mlp, mlp_in).float()
            hidden = hidden + mlp_out

        last_hidden = _rms_norm(hidden[:, -1, :], self.final_norm.weight, self.eps)
        logits = _softcap((last_hidden.to(dtype) @ self.embed_weight.t()).float(), self.final_cap)
        return (logits, logits.argmax(-1), *presents)

    def _attention(self, layer: Any, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                   past_k: torch.Tensor, past_v: torch.Tensor, slots: torch.Tensor,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attn = layer.self_attn
        dtype = self.dtype
        b, s, _ = hidden.shape
        x = _rms_norm(hidden, layer.input_layernorm.weight, self.eps).to(dtype)
        q = attn.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        k = past_k.scatter(2, slots, k.to(past_k.dtype))
        v = past_v.scatter(2, slots, v.to(past_v.dtype))

        # Grouped attention without repeating K/V: queries [b, kv, group, s, hd] against keys [b, kv, 1, T, hd].
        # Scores and softmax in float32, as transformers upcasts the softmax.
        group = self.heads // self.kv_heads
        qg = q.reshape(b, self.kv_heads, group, s, self.head_dim).float()
        scores = qg @ k[:, :, None].float().transpose(-1, -2) * self.scaling
        scores = _softcap(scores, self.attn_cap) + bias[:, :, None]
        probs = torch.softmax(scores, dim=-1)
        out = (probs @ v[:, :, None].float()).to(dtype)  # [b, kv, group, s, hd]
        out = out.reshape(b, self.heads, s, self.head_dim).transpose(1, 2).reshape(b, s, -1)
        return attn.o_proj(out), k, v

    @staticmethod
    def _mlp(mlp: Any, x: torch.Tensor) -> torch.Tensor:
        """Gemma's gated GELU MLP; the product is formed in float32 and clamped to the fp16 range."""
        gate = nn.functional.gelu(mlp.gate_proj(x).float(), approximate="tanh")
        product = (gate * mlp.up_proj(x).float()).clamp(-FP16_MAX, FP16_MAX)
        return mlp.down_proj(product.to(x.dtype))
