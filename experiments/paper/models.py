"""The paper's models (SPEC "Models", after Jain & Wallace 2019): an embedding, a BiLSTM or CNN encoder, an
additive or scaled-dot attention scorer, and a single-sequence (binary classification) or pair (QA, NLI)
decoder. Every attention pooling goes through fused_attn_at.attention_pool.

The model is split so that a training method can share one encoder pass between its clean and adversarial
losses:
    enc = model.encode(batch)                        # Encoded(h [B,T,H], scores [B,T], mask [B,T], query [B,Hq]|None)
    out = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask)
    logits = model.head(out.context, enc.query)     # [B] (bc) or [B, n_labels] (qa, nli)
    loss = model.loss(logits, batch)                 # scalar
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import fused_attn_at

ENCODERS = ("lstm", "cnn", "transformer")  # transformer: paper.transformer (issue 18)
# How the model's input embeddings are formed from the embedding table: "none" uses the rows as they are;
# "frequency" standardises every row with the frequency-weighted mean and variance of the vocabulary (Miyato
# et al. 2017), recomputed from the current (trainable) table at every forward.
EMBEDDING_NORMS = ("none", "frequency")
# Miyato et al.'s code adds this under the square root of the variance.
NORM_EPS = 1e-6
ATTENTIONS = ("additive", "dot")
KINDS = ("bc", "qa", "nli")
PAD = 0  # the padding index of the vocabulary (paper.data.PAD)


class Encoded(NamedTuple):
    h: torch.Tensor  # [B, T, H] encoder states, zero at padded positions
    scores: torch.Tensor  # [B, T] attention scores before the softmax
    mask: torch.Tensor  # [B, T] bool, True at real tokens
    query: torch.Tensor | None  # [B, Hq] question/hypothesis encoding (pair tasks), else None


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # [B] (bc) or [B, n_labels]
    attention: torch.Tensor  # [B, T]


def reverse_valid(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each row's first lengths[b] positions along dim 1, leaving the padding after them in place.
    Its own inverse.  [B, T, ...] -> [B, T, ...]"""
    T = x.shape[1]
    t = torch.arange(T, device=x.device)[None, :]  # [1, T]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)  # [B, T]
    return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand_as(x))


class LSTMEncoder(nn.Module):
    """One-layer BiLSTM, `hidden_size` per direction.  [B, T, E] -> states [B, T, 2*hidden], final [B, 2*hidden]

    The two directions run as two unidirectional LSTMs over right-padded rows: the forward one reads the
    padding only after a row's last token, and the backward one reads each row reversed within its length.
    This is the packed BiLSTM's result, about 3x faster on the CPU than PackedSequence, whose per-step
    slicing makes the backward quadratic in T."""

    def __init__(self, embed_size: int, hidden_size: int = 128):
        super().__init__()
        self.forward_rnn = nn.LSTM(embed_size, hidden_size, batch_first=True)
        self.backward_rnn = nn.LSTM(embed_size, hidden_size, batch_first=True)
        self.output_size = 2 * hidden_size

    def forward(self, embedded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lengths = mask.sum(dim=1)  # [B]; rows are right-padded (mask True on a prefix)
        forward_states, _ = self.forward_rnn(embedded)
        backward_states, _ = self.backward_rnn(reverse_valid(embedded, lengths))
        # Each direction's final state sits at position length-1 of its own reading order.
        last = (lengths - 1).clamp_min(0)[:, None, None].expand(-1, 1, forward_states.shape[-1])  # [B, 1, hidden]
        final = torch.cat([forward_states.gather(1, last), backward_states.gather(1, last)], dim=-1).squeeze(1)
        states = torch.cat([forward_states, reverse_valid(backward_states, lengths)], dim=-1)
        return states * mask[..., None], final * (lengths > 0)[:, None]


class CNNEncoder(nn.Module):
    """Convolutions of widths `kernel_sizes`, `channels` each, ReLU, "same" padding; states at padded positions
    are zeroed. The final state (the query of pair tasks) is the max over the valid positions.
    [B, T, E] -> states [B, T, channels*len(kernel_sizes)], final [B, same]"""

    def __init__(self, embed_size: int, channels: int = 32, kernel_sizes: tuple[int, ...] = (1, 3, 5, 7)):
        super().__init__()
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd (so 'same' padding keeps T), got {kernel_sizes}")
        self.convs = nn.ModuleList(nn.Conv1d(embed_size, channels, k, padding=k // 2) for k in kernel_sizes)
        self.output_size = channels * len(kernel_sizes)

    def forward(self, embedded: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (embedded * mask[..., None]).transpose(1, 2)  # [B, E, T]; padding must not leak into the windows
        states = torch.cat([torch.relu(conv(x)) for conv in self.convs], dim=1).transpose(1, 2)  # [B, T, H]
        states = states * mask[..., None]
        final = states.amax(dim=1)  # ReLU outputs are >= 0, so the zeroed padding never wins the max
        return states, final


def normalize_embeddings(weight: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Miyato et al. (2017): v_bar = (v - E[v]) / sqrt(Var[v] + 1e-6), E[v] = sum_j f_j v_j and
    Var[v] = sum_j f_j (v_j - E[v])^2 per dimension, f the word frequencies normalised to sum 1.
    weight [V, E], frequency [V] (counts; any scale) -> [V, E]; differentiable in weight."""
    mean, std = embedding_moments(weight, frequency)
    return (weight - mean) / std


def embedding_moments(weight: torch.Tensor, frequency: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize_embeddings' E[v] and sqrt(Var[v] + 1e-6): weight [V, E], frequency [V] -> ([1, E], [1, E])."""
    f = (frequency / frequency.sum().clamp_min(torch.finfo(frequency.dtype).tiny)).to(weight.dtype)[:, None]  # [V, 1]
    mean = (f * weight).sum(0, keepdim=True)  # [1, E]
    var = (f * (weight - mean) ** 2).sum(0, keepdim=True)  # [1, E]
    return mean, torch.sqrt(var + NORM_EPS)


def make_encoder(kind: str, embed_size: int, hidden_size: int, cnn_channels: int,
                 kernel_sizes: tuple[int, ...], encoder_options: dict | None = None) -> nn.Module:
    if kind == "lstm":
        return LSTMEncoder(embed_size, hidden_size)
    if kind == "cnn":
        return CNNEncoder(embed_size, cnn_channels, kernel_sizes)
    if kind == "transformer":  # layers/heads/width/ff_size/dropout from encoder_options (train.py --transformer-*)
        from .transformer import TransformerEncoder
        return TransformerEncoder(embed_size, **(encoder_options or {}))
    raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}")


class AttentionClassifier(nn.Module):
    """Embedding -> encoder -> attention -> decoder (SPEC "Models").

    kind "bc": single sequence, logit = Wo c + bo, BCE with logits (pos_weight optional).
    kind "qa"/"nli": the question/hypothesis (batch.query) is encoded by a second encoder of the same type into
    q; the scores use q; logits = Wy tanh(Wp c + Wq q); where the batch has a candidate_mask (QA on CNN news)
    non-candidate answers are masked out; cross entropy.
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        kind: str = "bc",
        n_labels: int = 2,
        embed_size: int = 300,
        encoder: str = "lstm",
        attention: str = "additive",
        hidden_size: int = 128,
        cnn_channels: int = 32,
        kernel_sizes: tuple[int, ...] = (1, 3, 5, 7),
        decoder_size: int = 128,
        dropout: float = 0.0,
        pretrained: torch.Tensor | None = None,
        pos_weight: float | None = None,
        embedding_norm: str = "none",
        word_frequency: torch.Tensor | None = None,
        encoder_options: dict | None = None,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if embedding_norm not in EMBEDDING_NORMS:
            raise ValueError(f"embedding_norm must be one of {EMBEDDING_NORMS}, got {embedding_norm!r}")
        self.kind, self.n_labels = kind, n_labels
        self.embedding_norm = embedding_norm
        if pretrained is not None:
            if pretrained.dim() != 2 or pretrained.shape[0] != vocab_size:
                raise ValueError(f"pretrained must be [vocab_size={vocab_size}, E], got {tuple(pretrained.shape)}")
            embed_size = pretrained.shape[1]
        self.embedding = nn.Embedding(vocab_size, embed_size, padding_idx=PAD)
        if pretrained is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(pretrained)
                self.embedding.weight[PAD].zero_()
        if embedding_norm == "frequency":
            # [V] training-set counts (paper.data.Vocab.token_counts); a buffer, so checkpoints carry it.
            # Without it (a model about to load a checkpoint) every word weighs the same until then.
            if word_frequency is None:
                word_frequency = torch.ones(vocab_size)
            if word_frequency.shape != (vocab_size,):
                raise ValueError(f"word_frequency must be [{vocab_size}], got {tuple(word_frequency.shape)}")
            frequency = word_frequency.detach().to(torch.float32).clone()
            frequency[PAD] = 0.0
            self.register_buffer("word_frequency", frequency)
        self.dropout = nn.Dropout(dropout)
        self.encoder = make_encoder(encoder, embed_size, hidden_size, cnn_channels, kernel_sizes, encoder_options)
        H = self.encoder.output_size
        pair = kind != "bc"
        self.query_encoder = make_encoder(encoder, embed_size, hidden_size, cnn_channels, kernel_sizes,
                                          encoder_options) if pair else None
        if attention == "additive":
            self.scorer = fused_attn_at.AdditiveScorer(H, query_size=H if pair else 0)
        else:  # the pair form scores h_t . q, which needs q of size H: the question encoder has the same type
            self.scorer = fused_attn_at.DotScorer(H, learned_query=not pair)
        if pair:
            self.context_proj = nn.Linear(H, decoder_size)  # Wp
            self.query_proj = nn.Linear(H, decoder_size, bias=False)  # Wq
            self.output = nn.Linear(decoder_size, n_labels)  # Wy
        else:
            self.output = nn.Linear(H, 1)  # Wo, bo
        self.register_buffer("pos_weight", None if pos_weight is None else torch.tensor(float(pos_weight)),
                             persistent=False)

    def attention_parameters(self) -> list[nn.Parameter]:
        """The attention's own parameters (the paper applies no weight decay to them)."""
        return list(self.scorer.parameters())

    def embedding_table(self) -> torch.Tensor:
        """The vectors the model reads for each vocabulary word [V, E]: the embedding table, standardised
        with the frequency-weighted mean and variance when embedding_norm is "frequency" (padding row 0)."""
        weight = self.embedding.weight
        if self.embedding_norm == "none":
            return weight
        table = normalize_embeddings(weight, self.word_frequency)
        keep = torch.ones(table.shape[0], 1, dtype=table.dtype, device=table.device)
        keep[PAD] = 0.0
        return table * keep

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B, T, E]
        if self.embedding_norm == "none":
            return self.embedding(tokens)
        return F.embedding(tokens, self.embedding_table())

    def encode(self, batch, embedded: torch.Tensor | None = None) -> Encoded:
        """One encoder pass. `embedded` [B, T, E] replaces the embedding of batch.tokens (word-level
        perturbations); the query, if any, is always embedded from batch.query."""
        mask = batch.mask
        if embedded is None:
            embedded = self.embed(batch.tokens)
        h, _ = self.encoder(self.dropout(embedded), mask)
        query = None
        if self.query_encoder is not None:
            if batch.query is None:
                raise ValueError(f"a {self.kind!r} model needs batch.query (the question/hypothesis tokens)")
            _, query = self.query_encoder(self.dropout(self.embed(batch.query)), batch.query_mask)
        scores = self.scorer(h, query)
        return Encoded(h, scores, mask, query)

    def head(self, context: torch.Tensor, query: torch.Tensor | None = None,
             candidate_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder: context [B, H] (and query [B, Hq]) -> logits [B] (bc) or [B, n_labels]."""
        context = self.dropout(context)
        if self.query_encoder is None:
            return self.output(context).squeeze(-1)
        logits = self.output(torch.tanh(self.context_proj(context) + self.query_proj(query)))
        if candidate_mask is not None:
            logits = logits.masked_fill(~candidate_mask, torch.finfo(logits.dtype).min)
        return logits

    def loss(self, logits: torch.Tensor, batch) -> torch.Tensor:
        if self.kind == "bc":
            return F.binary_cross_entropy_with_logits(logits, batch.labels.to(logits.dtype), pos_weight=self.pos_weight)
        return F.cross_entropy(logits, batch.labels)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """P(positive) [B] for bc, class probabilities [B, n_labels] otherwise."""
        return torch.sigmoid(logits) if self.kind == "bc" else torch.softmax(logits, dim=-1)

    def predicted_probability(self, logits: torch.Tensor) -> torch.Tensor:
        """The probability of the predicted class [B] (the y of gradient importance)."""
        p = self.probabilities(logits)
        if self.kind == "bc":
            return torch.where(p >= 0.5, p, 1.0 - p)
        return p.max(dim=-1).values

    def forward(self, batch, embedded: torch.Tensor | None = None) -> ModelOutput:
        enc = self.encode(batch, embedded)
        pooled = fused_attn_at.attention_pool(enc.h, enc.scores, enc.mask)
        return ModelOutput(self.head(pooled.context, enc.query, batch.candidate_mask), pooled.attention)
