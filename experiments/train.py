#!/usr/bin/env python
"""Train one of the paper's models with one of its six training methods (Kitada & Iyatomi 2021).

    python experiments/train.py --method attention_at                 # SST (embedded), BiLSTM, additive attention
    python experiments/train.py --method attention_iat --dataset imdb --data-dir ~/data/aclImdb --embeddings glove.840B.300d.txt
    torchrun --nproc_per_node 2 experiments/train.py --method attention_at   # DistributedDataParallel

Writes config.json, metrics.json, best.pt, last.pt and heatmaps/ into --output-dir.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from paper.cli import ArgumentParser, given_options, non_negative_float, positive_float, positive_int
from paper.data import TASKS, DataFormatError, MissingDataError
from paper.data_tasks import SST_RECIPES
from paper.methods import COMPAT_METHODS, DEFAULT_EPS, METHODS, WORD_IAT_NORMS
from paper.models import ATTENTIONS, EMBEDDING_NORMS, ENCODERS
from paper.transformer_cli import RESULT_KEYS as TRANSFORMER_KEYS

DESCRIPTION = __doc__.split("\n\n")[0]

# The values a run's results depend on. --resume keeps the saved ones: given again with another value, each
# is refused by name, except --epochs, which may extend the run (or stop it earlier, not before the epochs it
# has finished). --device, --threads, --malloc and --no-progress may change freely.
RESULT_KEYS = ("dataset", "data_dir", "method", "encoder", "attention", "eps", "lam", "compat", "epochs",
               "patience", "sst_recipe", "word_embedding_norm", "word_iat_norm", "batch_size", "lr", "weight_decay", "seed", "embeddings", "embed_size", "hidden_size",
               "cnn_channels", "kernel_sizes", "decoder_size", "dropout", "max_train_examples",
               "max_eval_examples", "robustness_eps") + TRANSFORMER_KEYS


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=DESCRIPTION,
        epilog="Datasets: " + "; ".join(f"{name} ({info.kind})" for name, info in TASKS.items())
        + ". Only sst ships with the repository; the others need --data-dir (an error names the download).")
    what = parser.add_argument_group("what to train")
    what.add_argument("--method", choices=METHODS, default="attention_at",
                      help="training method: vanilla (no perturbation); word_at / word_iat (adversarial "
                           "perturbation of the word embeddings, Miyato et al. 2017 / Sato et al. 2018); "
                           "attention_rp (random perturbation of the attention scores); attention_at / "
                           "attention_iat (the paper's adversarial perturbation of the attention scores)")
    what.add_argument("--dataset", choices=list(TASKS), default="sst",
                      help="task; sst is embedded in the repository, the others read --data-dir")
    what.add_argument("--data-dir", default=None,
                      help="folder with the task's original files (default: the embedded SST; required for "
                           "every other dataset)")
    what.add_argument("--embeddings", default=None,
                      help="pretrained word vectors to initialise the (trainable) embedding: 'glove' (the default, "
                           "for every task: the shipped GloVe 6B 50d top-20k words, experiments/data/glove), a "
                           "GloVe or fastText text file (.gz allowed) such as a fuller or 300-d set, or 'none' for "
                           "random initialisation (--embed-size). config.json records the vectors and their "
                           "coverage of the vocabulary and of the training tokens")
    what.add_argument("--sst-recipe", choices=SST_RECIPES, default="ours",
                      help="SST preprocessing: 'ours' (experiments/data/README.md) or 'released', the authors' "
                           "released code: non-word characters deleted, no qqq rule, sentences of 5 tokens or "
                           "fewer dropped from every split (they used 300-d fastText vectors; the default GloVe "
                           "vectors are used here unless --embeddings says otherwise)")
    what.add_argument("--encoder", choices=ENCODERS, default="lstm",
                      help="BiLSTM (128 per direction), CNN (kernels 1,3,5,7 x 32 channels) or a Transformer "
                           "trained from scratch (--transformer-* sizes; --perturb-layers)")
    what.add_argument("--attention", choices=ATTENTIONS, default="additive",
                      help="additive (tanh) or scaled dot-product attention scores")

    adv = parser.add_argument_group("perturbation")
    adv.add_argument("--eps", type=non_negative_float, default=None,
                     help="norm of the perturbation (of the attention scores or of the embeddings). Default per "
                          "method, picked on the SST dev set (RESULTS.md section 3): "
                          + ", ".join(f"{m} {e:g}" for m, e in DEFAULT_EPS.items() if m != "vanilla"))
    adv.add_argument("--lam", type=non_negative_float, default=1.0,
                     help="weight of the adversarial loss: L = L_clean + lam * L_adv")
    adv.add_argument("--compat", choices=["released"], default=None,
                     help="'released' reproduces the authors' released code for attention_at/attention_iat: "
                          "three network passes per step, gradient of 2 L_clean + lam L_adv, and iAT "
                          "stepping along -g (see SPEC.md); default: the paper's method")
    adv.add_argument("--word-embedding-norm", choices=EMBEDDING_NORMS, default=None,
                     help="'frequency': the model reads each embedding standardised with the training-set "
                          "frequency-weighted mean and variance of the vocabulary (Miyato et al. 2017), in the clean "
                          "and the adversarial pass; 'none': the raw embeddings (word methods before issue 15). "
                          "Default: frequency for word_at/word_iat, none for the other methods")
    adv.add_argument("--word-iat-norm", choices=WORD_IAT_NORMS, default="coefficients",
                     help="word_iat only: 'coefficients' (Sato et al. 2018's public code): each token's "
                          "coefficients of its neighbour directions have unit norm, then the perturbation has norm "
                          "eps per example; 'perturbation': only the latter (before issue 15)")
    adv.add_argument("--robustness-eps", type=non_negative_float, default=None,
                     help="size of the test-time AT perturbation of the attention scores for the robustness "
                          "numbers (default: --eps)")

    import paper.transformer_cli
    paper.transformer_cli.add_arguments(parser)  # --encoder transformer's sizes, --perturb-layers, --hf-model

    opt = parser.add_argument_group("optimisation (defaults of the paper)")
    opt.add_argument("--epochs", "--max-epochs", dest="epochs", type=positive_int, default=None,
                     help="the most epochs to train (default: 8 for binary classification; 100 for QA and NLI, "
                          "which stop earlier by --patience)")
    opt.add_argument("--patience", type=int, default=None,
                     help="stop when the dev accuracy has not improved for N epochs (0: never stop early, train "
                          "--epochs). Default: 10 for QA and NLI (Jain & Wallace), 0 for binary classification. "
                          "The best dev-accuracy epoch is evaluated either way")
    opt.add_argument("--batch-size", type=positive_int, default=None,
                     help="examples per step, per process with torchrun (default: 50 for bAbI as Jain & Wallace, "
                          "else 32)")
    opt.add_argument("--lr", type=positive_float, default=None,
                     help="Adam (amsgrad) learning rate; with --hf-model AdamW at 2e-5 unless given (default: 0.001)")
    opt.add_argument("--weight-decay", type=non_negative_float, default=1e-5,
                     help="L2 weight decay of every parameter except the attention's")
    opt.add_argument("--dropout", type=float, default=0.0,
                     help="dropout on the embeddings and the context vector (the paper uses none)")
    opt.add_argument("--seed", type=int, default=1, help="random seed (initialisation, shuffling, noise)")

    size = parser.add_argument_group("model size")
    size.add_argument("--embed-size", type=positive_int, default=300,
                      help="embedding size when no pretrained vectors are used (else the vectors' size)")
    size.add_argument("--hidden-size", type=positive_int, default=None,
                      help="LSTM hidden size per direction (default: 32 for bAbI as Jain & Wallace, else 128)")
    size.add_argument("--cnn-channels", type=positive_int, default=32, help="CNN channels per kernel size")
    size.add_argument("--kernel-sizes", type=positive_int, nargs="+", default=[1, 3, 5, 7],
                      help="CNN kernel sizes (odd)")
    size.add_argument("--decoder-size", type=positive_int, default=128, help="hidden size of the pair decoder")

    run = parser.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, default=None,
                     help="run directory (default: runs/<dataset>_<method>_<encoder>_<timestamp>)")
    run.add_argument("--resume", action="store_true",
                     help="continue the run in --output-dir from its last finished epoch, with its saved "
                          "configuration (a resumed run ends with the metrics of an uninterrupted one). An option "
                          "given with another value than the saved run's is an error, except --epochs, which "
                          "extends the run")
    run.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    run.add_argument("--threads", type=positive_int, default=None,
                     help="torch intra-op CPU threads per process (default 1 on the CPU: the models are small, "
                          "and extra threads slow down badly when other processes share the cores)")
    run.add_argument("--malloc", choices=("tuned", "as-is"), default="tuned",
                     help="on the CPU, tuned: raise glibc malloc's mmap/trim thresholds for this process "
                          "(fused_attn_at.tune_glibc_malloc: freed memory is reused instead of faulting in again; "
                          "no effect under another allocator); as-is: leave malloc alone")
    run.add_argument("--max-train-examples", type=positive_int, default=None,
                     help="keep only the first N training examples (quick tests)")
    run.add_argument("--max-eval-examples", type=positive_int, default=None,
                     help="keep only the first N examples of dev and of each test set (quick tests)")
    run.add_argument("--no-progress", action="store_true",
                     help="no tqdm progress bar, even on a terminal (it is drawn only when stderr is a terminal; "
                          "a log file gets one line per epoch either way)")
    return parser


def resolve_config(args, parser) -> dict:
    from paper.training import UsageError, resolve_embeddings

    if args.compat is not None and args.method not in COMPAT_METHODS:
        parser.error(f"--compat {args.compat} applies to {' and '.join(COMPAT_METHODS)} only, not --method {args.method}")
    if not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if any(k % 2 == 0 for k in args.kernel_sizes):
        parser.error(f"--kernel-sizes must be odd, got {args.kernel_sizes}")
    info = TASKS[args.dataset]
    if args.data_dir is None and args.dataset != "sst":
        raise UsageError(f"--dataset {args.dataset} needs --data-dir: {info} (expected layout: {info.layout})")
    if args.data_dir is not None and not Path(args.data_dir).is_dir():
        raise UsageError(f"--data-dir {args.data_dir} is not a folder. {info} (expected layout: {info.layout})")
    if args.patience is not None and args.patience < 0:
        parser.error(f"--patience must be >= 0, got {args.patience}")
    if args.sst_recipe != "ours" and args.dataset != "sst":
        parser.error(f"--sst-recipe {args.sst_recipe} applies to --dataset sst only")
    from paper.training import DEFAULT_EPOCHS, DEFAULT_PATIENCE, TASK_BATCH_SIZE, TASK_HIDDEN_SIZE

    eps = DEFAULT_EPS[args.method] if args.eps is None else args.eps
    patience = DEFAULT_PATIENCE[info.kind] if args.patience is None else (args.patience or None)
    word_norm = args.word_embedding_norm or ("frequency" if args.method.startswith("word_") else "none")
    config = {
        "dataset": args.dataset, "kind": info.kind,
        "data_dir": None if args.data_dir is None else str(Path(args.data_dir).resolve()),
        "method": args.method, "encoder": args.encoder, "attention": args.attention,
        "eps": eps, "lam": args.lam, "compat": args.compat,
        "robustness_eps": eps if args.robustness_eps is None else args.robustness_eps,
        "epochs": args.epochs or DEFAULT_EPOCHS[info.kind], "patience": patience,
        "sst_recipe": args.sst_recipe if args.dataset == "sst" else None,
        "word_embedding_norm": word_norm,
        "word_iat_norm": args.word_iat_norm if args.method == "word_iat" else None,
        "batch_size": args.batch_size or TASK_BATCH_SIZE.get(args.dataset, 32), "lr": args.lr, "weight_decay": args.weight_decay, "dropout": args.dropout,
        "seed": args.seed, "embeddings": resolve_embeddings(args.embeddings, args.dataset),
        "embed_size": args.embed_size,
        "hidden_size": args.hidden_size or TASK_HIDDEN_SIZE.get(args.dataset, 128), "cnn_channels": args.cnn_channels,
        "kernel_sizes": list(args.kernel_sizes), "decoder_size": args.decoder_size,
        "max_train_examples": args.max_train_examples, "max_eval_examples": args.max_eval_examples,
    }
    import paper.transformer_cli
    return paper.transformer_cli.resolve(config, args, parser)  # Transformer settings (issue 18)


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def _as_configured(key: str, value, saved: dict):
    """An option's command-line value as the config would hold it (resolved paths, lists)."""
    from paper.training import resolve_embeddings

    if key == "data_dir":
        return str(Path(value).resolve())
    if key == "embeddings":
        return resolve_embeddings(value, saved.get("dataset", "sst"))
    if key == "kernel_sizes":
        return list(value)
    if key == "patience":
        return value or None
    if key in TRANSFORMER_KEYS:
        import paper.transformer_cli
        return paper.transformer_cli.as_configured(key, value)
    return value


def _finished_epochs(output_dir: Path) -> int:
    from paper.training import load_checkpoint

    last = output_dir / "last.pt"
    return int(load_checkpoint(last)["epoch"]) if last.is_file() else 0


def resume_config(args, given: set[str], saved: dict, output_dir: Path) -> tuple[dict, list[str]]:
    """The saved configuration of the run to resume, with the changes the command line may make, and a line
    for each change made. Options given with the saved value are no change. Raises UsageError naming every
    option that contradicts the saved run."""
    from paper.training import UsageError

    config, conflicts, notes = dict(saved), [], []
    for key in RESULT_KEYS:
        if key not in given:
            continue
        flag = "--" + key.replace("_", "-")
        raw = getattr(args, key)
        value = _as_configured(key, raw, saved)
        if value == saved.get(key):
            continue
        if key == "embed_size" and saved.get("embeddings") is not None:
            continue  # the pretrained vectors' size wins, as in a fresh run with this --embed-size
        if key == "epochs":
            finished = _finished_epochs(output_dir)
            if value < finished:
                conflicts.append(f"{flag} {value} contradicts the saved run: it has already finished {finished} "
                                 "epochs")
            else:
                config["epochs"] = value
                notes.append(f"--resume: --epochs {value} (the saved run had {saved.get('epochs')}): "
                             f"training {'continues to' if value > finished else 'ends with'} epoch {value}")
            continue
        hint = " (evaluate.py --robustness-eps measures at another size)" if key == "robustness_eps" else ""
        conflicts.append(f"{flag} {_shown(raw)} contradicts the saved run ({_shown(saved.get(key))}){hint}")
    if conflicts:
        raise UsageError("--resume: " + "; ".join(conflicts) + f". Leave them out to continue {output_dir} "
                         "as it was saved, or start a new run with another --output-dir")
    return config, notes


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from paper.training import UsageError, default_output_dir, train

    try:
        if args.resume:
            if args.output_dir is None:
                raise UsageError("--resume needs --output-dir (the run directory to continue)")
            saved = args.output_dir / "config.json"
            if not saved.is_file():
                raise UsageError(f"--resume: {saved} does not exist (nothing to resume)")
            config, notes = resume_config(args, given_options(parser, argv),
                                          json.loads(saved.read_text(encoding="utf-8")), args.output_dir)
            for note in notes:
                print(f"train.py: {note}", file=sys.stderr)
            output_dir = args.output_dir
        else:
            config = resolve_config(args, parser)
            output_dir = args.output_dir or default_output_dir(config)
            if (output_dir / "last.pt").exists() or (output_dir / "metrics.json").exists():
                raise UsageError(f"{output_dir} already holds a run: pass --resume to continue it, or choose "
                                 "another --output-dir")
        train(config, output_dir, resume=args.resume, device_arg=args.device, threads=args.threads,
              progress=not args.no_progress, malloc=args.malloc)
    except (UsageError, MissingDataError, DataFormatError) as error:
        print(f"train.py: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
