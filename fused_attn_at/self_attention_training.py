"""One Attention AT / iAT / RP training step for a whole model whose attention goes through
fused_attn_at.perturbed_attention (SPEC "Self-attention", last items):

    at = fused_attn_at.SelfAttentionAT(model, "at", eps=1.0, lam=1.0, layers=None)
    for batch in loader:
        optimizer.zero_grad()
        step = at.step(lambda: loss_fn(model(**batch)))   # clean fwd+bwd, adversarial fwd+bwd
        optimizer.step()                                  # the .grad's hold d(L_clean + lam * L_adv)

The clean pass runs with every chosen layer's attention call recording what its perturbation needs (the
reference backend: G = dL_clean/dS, caught by a hook on S when the clean loss is back-propagated, and the clean
scores for iAT); the adversarial pass re-runs the model with every chosen layer perturbed at once by the r of
the same clean pass; the records are freed when the step ends. Layers are the model's attention calls in the
order of the forward pass: choose them by index (0 = first call) or by name (the qualified name of the module
passed as `layer=`, e.g. "bert.encoder.layer.0.attention.self"; fnmatch patterns such as "*.layer.1.*").

Under DistributedDataParallel the clean backward runs inside `model.no_sync()` and the adversarial backward
all-reduces the accumulated gradient of L_clean + lam * L_adv once. G, and so r, are each rank's own (the
normalisation makes r independent of the loss's scale; iAT takes differences within the rank's batch).

Activation checkpointing (torch.utils.checkpoint, reentrant or not; a Hugging Face model's
gradient_checkpointing_enable()) re-runs parts of the forward during a backward. Such a recomputed attention call
is matched to its forward call by its `layer=` module (which must then make one call per forward) and runs as that
call ran: the clean call with its record, the adversarial call with the same r (RP: with `generator` at the state
the forward call found; the global generator is restored by torch.utils.checkpoint itself).
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
import warnings
from typing import Any, Callable, Iterable, NamedTuple

import torch

from .self_attention import CleanPassRecord, _pop_interceptor, _push_interceptor

PERTURBATIONS = (None, "at", "iat", "rp")


class SelfAttentionATStep(NamedTuple):
    loss: torch.Tensor  # L_clean + lam * L_adv, detached (its gradient is already in the parameters' .grad)
    clean_loss: torch.Tensor  # detached
    adversarial_loss: torch.Tensor | None  # detached; None for perturbation=None
    clean_output: Any  # what forward() returned besides the loss in the clean pass (None if only a loss)
    adversarial_output: Any
    layers: tuple  # the names of the perturbed attention calls, in call order


def _split(result):
    if isinstance(result, torch.Tensor):
        return result, None
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0], (result[1] if len(result) == 2 else tuple(result[1:]))
    raise TypeError("forward() must return the scalar loss, or (loss, anything), got "
                    f"{type(result).__name__}")


def _rng_state(devices: set):
    cpu = torch.get_rng_state()
    cuda = {d: torch.cuda.get_rng_state(d) for d in devices if d.type == "cuda"}
    return cpu, cuda


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in cuda.items():
        torch.cuda.set_rng_state(s, d)


class SelfAttentionAT:
    """Attention AT ("at"), iAT ("iat") or random perturbation ("rp") of a Transformer's attention maps.

    model: the module (or DDP wrapper) whose attention calls fused_attn_at.perturbed_attention; used to name
    the layers (the module passed as `layer=`) and for DDP's no_sync. perturbation: "at" | "iat" | "rp" | None
    (None: a plain step, L = L_clean). eps: the norm of r per example and layer (norm="row": per query row).
    lam: weight of L_adv. layers: None (every attention call), or an iterable of call indices (int) and names /
    fnmatch patterns (str). same_dropout: replay the clean pass's random state in the adversarial pass, so that
    dropout masks agree and r is the only difference. generator: for RP's noise (None: a generator of the step's
    own, seeded from the global generator before its state is saved; RP drawing from the global generator
    inside the adversarial pass would shift every later dropout mask off the clean pass's).
    """

    def __init__(self, model: torch.nn.Module | None = None, perturbation: str | None = "at", *, eps: float = 1.0,
                 lam: float = 1.0, layers: Iterable[int | str] | int | str | None = None, norm: str = "example",
                 same_dropout: bool = True, generator: torch.Generator | None = None,
                 iat_max_bytes: int | None = None):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be None, 'at', 'iat' or 'rp', got {perturbation!r}")
        if norm not in ("example", "row"):
            raise ValueError(f"norm must be 'example' or 'row', got {norm!r}")
        if isinstance(layers, (int, str)):
            layers = [layers]
        if layers is not None and not isinstance(layers, Iterable):
            raise ValueError(f"layers must be None, a call index, a name/pattern or an iterable of them, got "
                             f"{layers!r}")
        self.layers = None if layers is None else list(layers)
        if self.layers == []:
            raise ValueError("layers=[] chooses no attention call (the adversarial pass would be the clean pass "
                             "again): pass None for every call")
        for name, value in (("eps", eps), ("lam", lam)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for sel in self.layers or ():
            if isinstance(sel, bool) or not isinstance(sel, (int, str)) or (isinstance(sel, int) and sel < 0):
                raise ValueError(f"layers must hold call indices >= 0 or names/patterns, got {sel!r}")
        self.model, self.perturbation, self.eps, self.lam, self.norm = model, perturbation, eps, lam, norm
        self.same_dropout, self.generator, self.iat_max_bytes = same_dropout, generator, iat_max_bytes
        self._phase: str | None = None
        self._count = 0
        self._names: list[str] = []
        self._chosen: list[bool] = []
        self._records: dict[int, CleanPassRecord] = {}
        self._layer_ids: list = []  # id() of each clean-pass call's layer= module (matches recomputed calls)
        self._generator_states: dict[int, torch.Tensor] = {}  # RP: the generator's state at each adversarial call
        self._rp_seed = 0  # RP without a generator: the step's seed for its own generators, one per device
        self._rp_generators: dict = {}
        self._module_names: dict[int, str] = {}
        self._devices: set = set()

    # -- naming and choosing the layers ------------------------------------------------------------------
    def _refresh_names(self) -> None:
        self._module_names = {}
        model = self.model
        if model is None:
            return
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        for name, module in model.named_modules():
            self._module_names.setdefault(id(module), name)

    def _name(self, layer, index: int) -> str:
        if isinstance(layer, str):
            return layer
        if isinstance(layer, torch.nn.Module) and id(layer) in self._module_names:
            return self._module_names[id(layer)]
        if isinstance(layer, torch.nn.Module):
            return f"{type(layer).__name__}#{index}"
        return f"#{index}"

    def _is_chosen(self, index: int, name: str) -> bool:
        if self.layers is None:
            return True
        return any(sel == index if isinstance(sel, int) else (sel == name or fnmatch.fnmatchcase(name, sel))
                   for sel in self.layers)

    def _check_selection(self) -> None:
        if self.layers is None:
            return
        for sel in self.layers:
            hit = any(self._is_chosen_by(sel, i, n) for i, n in enumerate(self._names))
            if not hit:
                raise ValueError(f"layers: {sel!r} matches none of the model's {len(self._names)} attention calls "
                                 f"(indices 0..{len(self._names) - 1}, names {self._names})")

    @staticmethod
    def _is_chosen_by(sel, index, name) -> bool:
        return sel == index if isinstance(sel, int) else (sel == name or fnmatch.fnmatchcase(name, sel))

    # -- the interceptor ---------------------------------------------------------------------------------
    def _recomputed_index(self, layer) -> int:
        """The forward call that an attention call made during a backward (activation checkpointing recomputes
        the forward) repeats: the one call of the same `layer=` module (or name)."""
        if isinstance(layer, torch.nn.Module):  # by identity: a module outside `model` has no stable name
            name = self._name(layer, -1)
            hits = [i for i, m in enumerate(self._layer_ids) if m == id(layer)]
        else:
            name = layer if isinstance(layer, str) else None
            hits = [i for i, n in enumerate(self._names) if n == name]
        if len(hits) != 1:
            raise RuntimeError(
                f"an attention call ran during the backward ({self._phase}: activation checkpointing recomputes the "
                f"forward) and cannot be matched to one call of the forward ({name!r} is called {len(hits)} times "
                f"among {self._names}): SelfAttentionAT needs each checkpointed attention call to pass a module as "
                f"layer= that makes one call per forward, or no activation checkpointing")
        return hits[0]

    def _adversarial_call(self, run: Callable, index: int, recomputed: bool = False):
        if not self._chosen[index]:
            return run()
        grad = None if self.perturbation == "rp" else self._records[index]
        generator = self._generator_for(getattr(run, "device", None)) if self.perturbation == "rp" else None
        if generator is not None:
            if recomputed:  # draw the forward call's seed again, from a copy at the state it found
                generator = torch.Generator(device=generator.device)
                generator.set_state(self._generator_states[index])
            else:
                self._generator_states[index] = generator.get_state()
        return run(perturbation=self.perturbation, grad=grad, eps=self.eps, norm=self.norm,
                   generator=generator, iat_max_bytes=self.iat_max_bytes)

    def _generator_for(self, device) -> torch.Generator | None:
        """RP's generator: the user's, else one of the step's own per device (the reference draws RP's noise on
        the scores' device), seeded from the seed the step drew and the device."""
        if self.generator is not None:
            return self.generator
        device = torch.device("cpu") if device is None else torch.device(device)
        if device not in self._rp_generators:
            seed = (self._rp_seed + 1_000_003 * (0 if device.index is None else device.index + 1)) % 2**63
            self._rp_generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self._rp_generators[device]

    def _intercept(self, run: Callable, layer):
        if self._phase == "clean backward":  # a recomputed clean call: as it ran, with the same record
            index = self._recomputed_index(layer)
            rec = self._records.get(index)
            if rec is None:
                return run()
            rec.replaying = True
            return run(record=rec)
        if self._phase == "adversarial backward":
            return self._adversarial_call(run, self._recomputed_index(layer), recomputed=True)
        index = self._count
        self._count += 1
        if self._phase == "clean":
            name = self._name(layer, index)
            chosen = self._is_chosen(index, name)
            self._names.append(name)
            self._chosen.append(chosen)
            self._layer_ids.append(id(layer) if isinstance(layer, torch.nn.Module) else None)
            if not chosen or self.perturbation == "rp":
                return run()
            rec = CleanPassRecord(keep_scores=self.perturbation == "iat")
            self._records[index] = rec
            return run(record=rec)
        # adversarial pass
        if index >= len(self._names) or self._name(layer, index) != self._names[index]:
            raise RuntimeError(
                f"attention call {index} ({self._name(layer, index)}) of the adversarial pass does not match the "
                f"clean pass's calls {self._names}: forward() must run the model the same way twice")
        return self._adversarial_call(run, index)

    @contextlib.contextmanager
    def _pass(self, phase: str):
        self._phase, self._count = phase, 0
        _push_interceptor(self._intercept)
        try:
            yield
        finally:
            _pop_interceptor(self._intercept)
            self._phase = None

    def _no_sync(self):
        model = self.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return model.no_sync()
        return contextlib.nullcontext()

    def clear(self) -> None:
        """Frees what the clean pass recorded (step() does this itself)."""
        for rec in self._records.values():
            rec.clear()
        self._records, self._names, self._chosen, self._generator_states = {}, [], [], {}
        self._layer_ids, self._rp_generators = [], {}

    # -- the step ----------------------------------------------------------------------------------------
    def step(self, forward: Callable[[], Any]) -> SelfAttentionATStep:
        """Runs forward() twice (clean, then perturbed) and back-propagates L_clean + lam * L_adv into the
        parameters' .grad (accumulating, like loss.backward()). forward() runs the model and returns the scalar
        loss, or (loss, output). Returns the detached losses, the outputs and the perturbed layers' names."""
        self.clear()
        self._refresh_names()
        if not torch.is_grad_enabled():
            raise RuntimeError("SelfAttentionAT.step back-propagates two losses: call it with gradients enabled "
                               "(not under torch.no_grad() or torch.inference_mode())")
        if self.perturbation is None:
            loss, out = _split(forward())
            loss.backward()
            loss = loss.detach()
            return SelfAttentionATStep(loss, loss, None, out, None, ())
        devices = {p.device for p in self.model.parameters()} if self.model is not None else set()
        if self.perturbation == "rp" and self.generator is None:  # before the global state is saved
            self._rp_seed = int(torch.randint(0, 2**62, (1,)).item())
        state = _rng_state(devices) if self.same_dropout else None
        try:
            with self._pass("clean"):
                clean_loss, clean_out = _split(forward())
            if not self._names:
                raise RuntimeError("forward() made no call to fused_attn_at.perturbed_attention: is the model's "
                                   "attention implementation fused_attn_at (fused_attn_at.hf.register(), "
                                   "attn_implementation='fused_attn_at')?")
            self._check_selection()
            with self._no_sync(), self._pass("clean backward"):
                clean_loss.backward()
            if self._records and not any(rec.has_gradient() for rec in self._records.values()):
                warnings.warn(f"the clean loss reached none of the perturbed attention calls' scores ({self._names}): "
                              "G = 0 and r = 0 in every layer, so L_adv = L_clean", RuntimeWarning, stacklevel=2)
            for rec in self._records.values():
                rec.mark_backward_done()
                if rec.fused is not None:
                    # one adversarial call per record, then clear(): the fused backend may drop its copy of the
                    # clean Q, K, V for the adversarial call's inputs where they are equal (the first layer)
                    rec.fused.share = True
            if state is not None:  # the adversarial pass draws the clean pass's dropout masks again
                _set_rng_state(state)
            with self._pass("adversarial"):
                adv_loss, adv_out = _split(forward())
            if self._count != len(self._names):
                raise RuntimeError(f"the adversarial pass made {self._count} attention calls, the clean pass "
                                   f"{len(self._names)}: forward() must run the model the same way twice")
            with self._pass("adversarial backward"):
                (self.lam * adv_loss).backward()
            names = tuple(n for n, c in zip(self._names, self._chosen) if c)
        finally:
            self.clear()
        clean_loss, adv_loss = clean_loss.detach(), adv_loss.detach()
        return SelfAttentionATStep(clean_loss + self.lam * adv_loss, clean_loss, adv_loss, clean_out, adv_out, names)
