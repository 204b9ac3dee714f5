"""The O(1)-memory conversion recipe (issue 14): a pretrained residual LLM -> a reversible model whose
backward memory is flat in depth, plus a constant number of stored layers.

Pieces:
  * ``calibrate``: a few batches through the teacher measure each layer's update against the mean
    update (massive activations: SmolLM2's layer 11 writes ~30x a typical update). ``auto_hard_layers``
    picks the few layers a reversible rule cannot carry; they become ``stored_layers`` (the plain residual
    step, input kept: one stream each), every other layer runs the O(1) rule.
  * ``O1DistillLoss``: distillation of the free-running student (KL on logits, as ``DistillLoss``) plus a
    per-layer hidden-state term: after every layer j, the per-token relative squared error between the
    student's newest stream and the teacher's residual stream after layer j. The term goes through the
    memory-free backward (``layer_loss``, revllm.engine.function). Its weight decays linearly from
    ``layer_weight`` to ``layer_weight_end`` over the run (stage 1: follow the teacher's trajectory;
    end: the logits alone).
  * The teacher's states are recomputed per batch under no_grad (held for one batch only, L x B x T x D:
    the conversion run's cost, not the converted model's); there is no teacher-state cache to go stale.
  * ``recipe_state``: the recipe (weights, schedule, hard layers) is written to RUN/o1.json; ``--resume``
    continues it from the checkpoint's step, so a killed run resumes exactly whatever its stage.
Shape legend: B batch, T tokens, D width, L layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..data.tokens import TokenData, read_meta
from ..errors import RevLLMError
from ..io import atomic_write, latest_good, list_checkpoints, tokenizer_identity, verify
from .distill import DistillLoss, _run_with_final_hidden, _unwrap

O1_RULES = ("midpoint", "leapfrog", "hamiltonian")  # rules that hold no per-layer buffer


def decoder_layers(model):
    """The decoder layers of an HF Llama/Qwen2/GPT-2 model or of a RevLLM model."""
    m = _unwrap(model)
    backbone = getattr(m, "model", None) or getattr(m, "transformer", None)
    layers = getattr(backbone, "layers", None) or getattr(backbone, "h", None)
    if layers is None:
        raise ValueError(f"cannot find the decoder layers of {type(m).__name__}")
    return layers


class LayerStates:
    """Context manager: the residual stream after every decoder layer of an HF model, captured by hooks.

    ``inputs`` (optional) also keeps each layer's input, for the calibration's update norms."""

    def __init__(self, model, inputs: bool = False):
        self.layers, self.want_inputs = decoder_layers(model), inputs
        self.outputs: list = [None] * len(self.layers)
        self.inputs: list = [None] * len(self.layers)

    def __enter__(self):
        def hook(j):
            def fn(mod, args, kwargs, out):
                self.outputs[j] = (out[0] if isinstance(out, tuple) else out).detach()
                if self.want_inputs:
                    self.inputs[j] = (args[0] if args else kwargs["hidden_states"]).detach()

            return fn

        self.handles = [layer.register_forward_hook(hook(j), with_kwargs=True) for j, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def calibrate(teacher, batches) -> list[float]:
    """Per layer: the largest per-token update norm max_t ||f_j(t)|| (f_j = out_j - in_j) over the batches,
    divided by its median over layers. A massive activation is written to a few tokens, so a max, not a mean."""
    teacher.eval()
    peak = None
    for ids in batches:
        with LayerStates(teacher, inputs=True) as st:
            teacher(input_ids=ids, logits_to_keep=1)
        now = torch.stack([(o.float() - i.float()).norm(dim=-1).amax() for o, i in zip(st.outputs, st.inputs)])
        peak = now if peak is None else torch.maximum(peak, now)
    return (peak / peak.median()).tolist()


def auto_hard_layers(scores, max_layers: int = 2, ratio: float = 4.0) -> list[int]:
    """The (at most ``max_layers``) layers whose update is over ``ratio`` times the mean update."""
    order = sorted(range(len(scores)), key=lambda j: -scores[j])
    return sorted(j for j in order[:max_layers] if scores[j] > ratio)


def parse_hard_layers(spec: str, num_layers: int):
    """``auto`` | ``none`` | comma list of layer indices -> "auto" or a sorted list; refused in one line."""
    spec = spec.strip().lower()
    if spec == "auto":
        return "auto"
    if spec in ("none", ""):
        return []
    try:
        layers = [int(v) for v in spec.split(",")]
    except ValueError:
        raise RevLLMError(f"--hard-layers {spec!r}: give 'auto', 'none' or comma-separated layer indices") from None
    bad = [j for j in layers if not 0 <= j < num_layers]
    if bad:
        raise RevLLMError(f"--hard-layers names layer {bad[0]}, but the model's layers are 0..{num_layers - 1}")
    if len(set(layers)) != len(layers):
        raise RevLLMError(f"--hard-layers {spec!r} names a layer twice")
    return sorted(layers)


def relative_state_error(z, t):
    """Mean over tokens of ||z_t - t_t||^2 / ||t_t||^2: scale-free, so a massive-activation token or layer
    does not drown the others."""
    dt = torch.promote_types(z.dtype, torch.float32)  # at least fp32 (bf16 streams), float64 kept
    z, t = z.to(dt), t.to(dt)
    return ((z - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-6)).mean()


class O1DistillLoss(DistillLoss):
    """``DistillLoss`` plus per-layer hidden-state matching through the memory-free backward.

    The per-layer term is averaged over layers and weighted by w(step), linear from ``layer_weight`` at
    step 0 to ``layer_weight_end`` at ``steps``; ``start_step`` continues a resumed run's schedule."""

    def __init__(
        self,
        teacher,
        layer_weight: float = 1.0,
        layer_weight_end: float = 0.0,
        steps: int = 1,
        start_step: int = 0,
        grad_accum: int = 1,
        progressive: ProgressiveConversion | None = None,
        **kw,
    ):
        super().__init__(teacher, **kw)
        self.progressive = progressive
        self.residual = None if progressive is None else len(progressive.pending(start_step))
        if layer_weight < 0 or layer_weight_end < 0:
            raise ValueError(f"layer weights must be >= 0, got {layer_weight}, {layer_weight_end}")
        self.w0, self.w1, self.steps, self.grad_accum = (
            float(layer_weight),
            float(layer_weight_end),
            max(int(steps), 1),
            grad_accum,
        )
        self.calls = start_step * grad_accum
        self.metric_names = (*self.metric_names, "layer_err", "layer_weight")
        self.metric_names += ("residual_layers",) if progressive is not None else ()

    def weight_at(self, step: int) -> float:
        frac = min(step / self.steps, 1.0)
        return self.w0 + frac * (self.w1 - self.w0)

    def __call__(self, model, batch):
        if not self._checked:
            self.check(model)
            self._checked = True
        step = self.calls // self.grad_accum
        w = self.weight_at(step)
        if model.training:  # evaluation calls leave the schedule alone
            self.calls += 1
            if self.progressive is not None:
                self.residual = self.progressive.apply(model, step)
        ids = batch["input_ids"]
        with torch.no_grad(), LayerStates(self.teacher) as st:
            _, t_hidden = _run_with_final_hidden(self.teacher, ids, logits_to_keep=1)
        targets = st.outputs
        fn = (lambda j, z: relative_state_error(z, targets[j])) if w else None
        out, s_hidden = _run_with_final_hidden(model, ids, logits_to_keep=1, layer_loss=fn)
        loss, metrics = self._terms(model, ids, s_hidden, t_hidden)
        if fn is not None:
            err = out.layer_loss / len(targets)
            loss = loss + w * err
            metrics["layer_err"] = err.item()
        metrics["layer_weight"] = w
        if self.progressive is not None:
            metrics["residual_layers"] = self.residual
        return loss, metrics


class ProgressiveConversion:
    """Progressive conversion: the boundary between residual and reversible layers moves through the stack.

    The student starts as the teacher (every layer the plain residual step, ``stored_layers``) and the layers
    in ``order`` switch to the O(1) rule one by one, evenly over the first ``steps`` optimizer steps; from
    then on only ``hard`` stays stored, as the converted model's config says. Each switch perturbs a model
    already close to the teacher, instead of starting all layers at once from a perplexity of ~10^4.
    ``order="up"`` switches layer 0 first, ``"down"`` the last layer first."""

    def __init__(self, num_layers: int, hard, steps: int, order: str = "up"):
        if order not in ("up", "down"):
            raise RevLLMError(f"progressive order must be 'up' or 'down', got {order!r}")
        if steps < 1:
            raise RevLLMError(f"progressive conversion needs at least one step, got {steps}")
        self.hard = frozenset(hard or ())
        layers = [j for j in range(num_layers) if j not in self.hard]
        self.order, self.steps = layers if order == "up" else layers[::-1], int(steps)

    def pending(self, step: int) -> list[int]:
        """Layers still on the residual step at optimizer step ``step`` (0-based): none from step
        ``steps - 1`` on; at step -1 (before training) all of them."""
        n = len(self.order)
        switched = min(n, -(-(step + 1) * n // self.steps))  # ceil: the first layer switches at step 0
        return sorted(self.order[switched:])

    def apply(self, model, step: int) -> int:
        """Set the model's stored layers for ``step``; returns how many layers are still residual."""
        pending = self.pending(step)
        _unwrap(model).dynamics.stored_layers = self.hard | frozenset(pending)
        return len(pending)


def recipe_state(run: Path, recipe: dict | None, resume: bool) -> tuple[dict, int]:
    """(recipe, first step). A new run writes RUN/o1.json; ``--resume`` reads it back and continues from the
    latest good checkpoint's step (step 0 when none was written yet)."""
    path = run / "o1.json"
    if not resume:
        run.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(recipe, indent=1))
        return recipe, 0
    if not path.is_file():
        raise RevLLMError(f"--resume --memory o1: {path} is missing; {run} is not an O(1) conversion run")
    recipe = json.loads(path.read_text())
    ckpt = latest_good(run)
    step = 0 if ckpt is None else json.loads((verify(ckpt) / "trainer_state.json").read_text())["step"]
    return recipe, step


def check_tokens_match(data, tokenizer, source: str) -> None:
    """Refuse a token dir made with another tokenizer than the source model's, naming both."""
    meta = read_meta(Path(data))["tokenizer"]
    ours = tokenizer_identity(tokenizer, source)
    if meta.get("sha256") and meta["sha256"] != ours["sha256"]:
        raise RevLLMError(
            f"{data} was tokenized with {meta.get('name')!r}, not with the source's tokenizer "
            f"{ours['name'] or source!r}: run `revllm data` with the source's tokenizer"
        )


def calibration_batches(data, seq_len: int, rows: int = 4, batches: int = 2) -> list[torch.Tensor]:
    """The first ``rows x batches`` windows of DATA's training tokens (deterministic)."""
    train = TokenData(data).train
    need = rows * batches * seq_len
    if len(train) < need:
        raise RevLLMError(f"{data} has {len(train)} training tokens; the calibration needs {need} (lower --seq-len)")
    ids = torch.from_numpy(np.asarray(train[:need], dtype=np.int64)).view(batches, rows, seq_len)
    return list(ids)


def prepare(teacher, tokenizer, args, run: Path):
    """For ``revllm convert --memory o1``: checks, calibration, the recipe file, the loss.

    Returns (stored layers, O1DistillLoss, report dict). Nothing is written when the loop would refuse the run."""
    if tokenizer is not None:
        check_tokens_match(args.distill, tokenizer, str(args.src))
    n = len(decoder_layers(teacher))
    if args.resume:
        recipe, start = recipe_state(run, None, resume=True)
        args.dynamics = recipe["dynamics"]  # the run's own rule (the student comes from its checkpoint)
    else:
        spec = parse_hard_layers(args.hard_layers, n)
        recipe = {
            "dynamics": args.dynamics,
            "hard_layers": spec,
            "layer_weight": args.layer_weight,
            "layer_weight_end": args.layer_weight_end,
            "steps": args.steps,
        }
        if spec == "auto":
            scores = calibrate(teacher, calibration_batches(args.distill, args.seq_len))
            recipe["hard_layers"], recipe["calibration"] = auto_hard_layers(scores), [round(v, 3) for v in scores]
        start = 0
        if not list_checkpoints(run):  # else the loop refuses the run: keep that run's own recipe file
            recipe_state(run, recipe, resume=False)
    loss = O1DistillLoss(
        teacher,
        recipe["layer_weight"],
        recipe["layer_weight_end"],
        recipe["steps"],
        start,
        temperature=args.temperature,
        ce_weight=args.ce_weight,
        hidden_weight=args.hidden_weight,
    )
    return recipe["hard_layers"], loss, recipe
