"""Distillation from the frozen original model, and a-annealing for near-Euler conversions.

``DistillLoss(teacher, ...)`` is a ``loss_fn(model, batch) -> (loss, metrics)`` (the training loop's loss
interface). Per position t, with student logits s_t, teacher logits u_t and temperature T:

    loss = T^2 * KL(softmax(u_t / T) || softmax(s_t / T))      (Hinton et al.; T^2 keeps gradient scale)
         + ce_weight * CE(s_t, x_{t+1})                          (optional: the text itself)
         + hidden_weight * mean((n_s - n_u)^2)                   (optional: final-norm hidden states)

The teacher runs in eval mode without grad (its activations are never kept). The student runs its
usual training path (memory-free for reversible rules). Neither model's full (B, T, V) logits are ever
held: both run with ``logits_to_keep=1`` and their final hidden states are kept; the two heads and the KL
are evaluated a chunk of tokens at a time under activation checkpointing, as the model's own chunked
cross-entropy does (teacher logits for 4 x 1024 tokens of a 49k vocabulary would be 800 MB).
Shape legend: B batch, T tokens, D width, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..errors import RevLLMError
from ..parallel.wrap import base_model as _unwrap


def final_norm(model):
    """The final normalization module of a RevLLM or HF GPT-2 / Llama / Qwen2 model."""
    m = _unwrap(model)
    backbone = getattr(m, "model", None) or getattr(m, "transformer", None)
    for name in ("final_norm", "norm", "ln_f"):
        if hasattr(backbone, name):
            return getattr(backbone, name)
    raise ValueError(f"cannot find the final norm of {type(m).__name__}")


def _run_with_final_hidden(model, ids, **kw):
    """Forward pass that also returns the final-norm output (B, T, D), captured by a hook."""
    box = {}
    handle = final_norm(model).register_forward_hook(lambda mod, inp, out: box.__setitem__("h", out))
    try:
        out = model(input_ids=ids, **kw)
    finally:
        handle.remove()
    return out, box["h"]


def _chunk_terms(h, weight, bias, t_h, t_weight, t_bias, labels, temperature: float):
    """Summed KL(teacher || student) at temperature T and summed CE, for one chunk of positions."""
    s = F.linear(h, weight, bias).float()  # (N, V)
    with torch.no_grad():  # the teacher's head: recomputed per chunk, never stored, no gradient
        t_logits = F.linear(t_h, t_weight, t_bias).float()
    log_q = F.log_softmax(s / temperature, -1)
    log_p = F.log_softmax(t_logits / temperature, -1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum")
    ce = F.cross_entropy(s, labels, ignore_index=-100, reduction="sum")
    return kl, ce


class DistillLoss:
    """KL-to-teacher loss (plus optional CE and hidden-state terms); a ``loss_fn(model, batch)``."""

    def __init__(
        self,
        teacher,
        temperature: float = 1.0,
        ce_weight: float = 0.0,
        hidden_weight: float = 0.0,
        chunk_tokens: int = 1024,
    ):
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} must be > 0")
        if ce_weight < 0 or hidden_weight < 0:
            raise ValueError(f"ce_weight={ce_weight!r} and hidden_weight={hidden_weight!r} must be >= 0")
        self.teacher = teacher.eval().requires_grad_(False)
        self.T, self.ce_weight, self.hidden_weight, self.chunk = (
            float(temperature),
            ce_weight,
            hidden_weight,
            chunk_tokens,
        )
        self._checked = False
        self.metric_names = ("kl", "ce") + (("hidden_mse",) if hidden_weight else ())  # logged by the training loop

    def check(self, model) -> None:
        """Refuse a teacher whose vocabulary (or, with hidden matching, width) differs from the student's."""
        s, t = _unwrap(model).get_output_embeddings().weight, _unwrap(self.teacher).get_output_embeddings().weight
        if s.shape[0] != t.shape[0]:
            raise RevLLMError(
                f"the teacher's vocabulary ({t.shape[0]} tokens) differs from the student's ({s.shape[0]}): "
                "distill from the model the student was converted from"
            )
        if self.hidden_weight and s.shape[1] != t.shape[1]:
            raise RevLLMError(f"hidden-state matching needs equal widths: teacher {t.shape[1]}, student {s.shape[1]}")

    def __call__(self, model, batch):
        if not self._checked:
            self.check(model)
            self._checked = True
        ids = batch["input_ids"]
        with torch.no_grad():
            _, t_hidden = _run_with_final_hidden(self.teacher, ids, logits_to_keep=1)
        _, s_hidden = _run_with_final_hidden(model, ids, logits_to_keep=1)
        return self._terms(model, ids, s_hidden, t_hidden)

    def _terms(self, model, ids, s_hidden, t_hidden):
        """(loss, metrics) from the two final hidden states: chunked KL (+ CE, + final-hidden MSE)."""
        head = _unwrap(model).get_output_embeddings()
        t_head = _unwrap(self.teacher).get_output_embeddings()
        B, T, D = s_hidden.shape
        h = s_hidden.reshape(-1, D)
        th = t_hidden.reshape(B * T, -1)
        labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1).reshape(-1)  # next token; last: none
        kl = h.new_zeros((), dtype=torch.float32)
        ce = h.new_zeros((), dtype=torch.float32)
        for s in range(0, h.shape[0], self.chunk):
            args = (
                h[s : s + self.chunk],
                head.weight,
                head.bias,
                th[s : s + self.chunk],
                t_head.weight,
                t_head.bias,
                labels[s : s + self.chunk],
                self.T,
            )
            k_, c_ = (
                checkpoint(_chunk_terms, *args, use_reentrant=False) if torch.is_grad_enabled() else _chunk_terms(*args)
            )
            kl, ce = kl + k_, ce + c_
        kl = kl / (B * T) * self.T**2
        ce = ce / (B * (T - 1))
        loss = kl + self.ce_weight * ce if self.ce_weight else kl
        metrics = {"kl": kl.item(), "ce": ce.item()}
        if self.hidden_weight:
            mse = F.mse_loss(s_hidden.float(), t_hidden.float())
            loss = loss + self.hidden_weight * mse
            metrics["hidden_mse"] = mse.item()
        return loss, metrics


def set_midpoint_a(model, a: float) -> None:
    """Set every layer's midpoint_a coefficient to ``a`` (buffer, config and the dynamics' cache)."""
    m = _unwrap(model)
    dyn = m.dynamics
    if m.config.dynamics != "midpoint_a":
        raise ValueError(f"a-annealing needs dynamics='midpoint_a', not {m.config.dynamics!r}")
    with torch.no_grad():
        dyn.a.fill_(a)
    dyn._a_cache = None
    m.config.midpoint_a = float(a)
    if getattr(m.config, "midpoint_a_floor", 0) > a:
        m.config.midpoint_a_floor = float(a)


class AnnealA:
    """a = 2^-k with k stepped linearly from ``k_start`` down to ``k_end`` over ``steps`` steps (dyadic a stays
    exactly representable, so exact reversal keeps working; the k-bit buffer shrinks as k falls)."""

    def __init__(self, k_start: int, k_end: int, steps: int):
        if not (isinstance(k_start, int) and isinstance(k_end, int) and 0 <= k_end <= k_start):
            raise ValueError(f"anneal needs integers 0 <= k_end <= k_start, got {k_start}, {k_end}")
        self.k_start, self.k_end, self.steps = k_start, k_end, max(int(steps), 1)

    def k_at(self, step: int) -> int:
        frac = 1.0 if self.steps == 1 else min(step / (self.steps - 1), 1.0)  # k_end is reached on the last step
        return round(self.k_start - frac * (self.k_start - self.k_end))

    def __call__(self, model, step: int) -> int:
        k = self.k_at(step)
        set_midpoint_a(model, 2.0**-k)
        return k
