"""Training and evaluation of the paper's models: the loop, checkpoints (atomic, resumable, loadable with
torch.load(weights_only=True)), DistributedDataParallel, and the test-time measurements.

A run directory holds:
    config.json    the resolved configuration (every value the run depends on)
    metrics.json   per-epoch dev metrics, the best epoch, test metrics (task metrics, attention-vs-gradient
                   correlation, robustness), times
    best.pt        the model of the best dev epoch (+ vocabulary and config, plain data)
    last.pt        everything needed to resume after the last finished epoch (model, optimizer, RNG states)
    heatmaps/      attention and gradient importance of a few fixed test sentences (.html and .png)
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import hf_finetune, interpret, methods, transformer
from .data import Vocab, load_embeddings, load_task, make_batches
from .heatmaps import write_heatmaps
from .metrics import attention_gradient_correlation, classification_metrics, mean_total_variation
from .models import AttentionClassifier

EXPERIMENTS = Path(__file__).resolve().parents[1]
# GloVe 6B 50d restricted to the SST training vocabulary (see experiments/data/glove/README.md): the default
# vectors before issue 15 (kept so that older runs' configs still point at a file).
EMBEDDED_GLOVE = EXPERIMENTS / "data" / "glove" / "glove.6B.50d.sst.txt.gz"
# The 20,000 most frequent words of GloVe 6B 50d (a superset of EMBEDDED_GLOVE's lines): every task's default.
SHIPPED_GLOVE = EXPERIMENTS / "data" / "glove" / "glove.6B.50d.top20k.txt.gz"
SHIPPED_GLOVE_NAME = "GloVe 6B 50d, top 20k words (experiments/data/glove)"
# --embeddings keywords: the shipped vectors (also the default) and random initialisation
EMBEDDING_KEYWORDS = ("glove", "none")
# Training budget per task kind (train.py's defaults): at most `epochs` epochs; with a patience, training stops
# once the dev accuracy has not improved for `patience` epochs (Jain & Wallace's QA/NLI set-up). None: no
# early stop. The best dev-accuracy epoch (best.pt) is evaluated either way. QA gets 30: a bAbI model sits on a
# dev-accuracy plateau for several epochs before it learns the task (vanilla seed 1 on bAbI 1: 4 epochs; with
# patience 10 an attention_at run was stopped at epoch 11, still on it, its training loss still falling).
DEFAULT_EPOCHS = {"bc": 8, "qa": 100, "nli": 100}
DEFAULT_PATIENCE = {"bc": None, "qa": 30, "nli": 10}
# Jain & Wallace's bAbI models: batch 50, LSTM hidden size 32 (the other tasks keep batch 32, hidden 128).
TASK_BATCH_SIZE = {"babi1": 50, "babi2": 50, "babi3": 50}
TASK_HIDDEN_SIZE = {"babi1": 32, "babi2": 32, "babi3": 32}
CHECKPOINT_FORMAT = 1
HEATMAP_SENTENCES = 6
EVAL_BATCH_SIZE = 128


class UsageError(Exception):
    """Bad input from the user: reported as one line, without a traceback, with a non-zero exit."""


# ----------------------------------------------------------------------------------------------- set-up

def resolve_embeddings(value: str | None, dataset: str) -> str | None:
    """--embeddings: a path, 'none' (random initialisation), or None / 'glove' = the default: the shipped
    GloVe 6B 50d top-20k file for every task (for SST it gives exactly the vectors of the older SST subset,
    whose lines it contains)."""
    if value is None or value.lower() == "glove":
        if not SHIPPED_GLOVE.is_file():
            raise UsageError(f"the shipped vectors {SHIPPED_GLOVE} are missing (a damaged checkout?); pass "
                             "--embeddings PATH or --embeddings none")
        return str(SHIPPED_GLOVE)
    if value.lower() == "none":
        return None
    if not Path(value).is_file():
        raise UsageError(f"--embeddings {value}: no such file (a GloVe or fastText text file, optionally .gz; "
                         "e.g. glove.6B.300d.txt from https://nlp.stanford.edu/data/glove.6B.zip)")
    return str(Path(value).resolve())


def load_data(config: dict):
    """The task after the paper's recipe, truncated as the config asks, and its vocabulary."""
    limits = [n for n in (config["max_train_examples"], config["max_eval_examples"]) if n is not None]
    # load_task's max_examples cuts every split; load enough for both limits and cut each below.
    cut_all = max(limits) if len(limits) == 2 else None
    task = load_task(config["dataset"], config["data_dir"], max_examples=cut_all,
                     recipe=config.get("sst_recipe") or "ours")
    if config["max_train_examples"] is not None:
        task.train = task.train[:config["max_train_examples"]]
    if config["max_eval_examples"] is not None:
        n = config["max_eval_examples"]
        task.dev = task.dev[:n]
        task.tests = {name: examples[:n] for name, examples in task.tests.items()}
    if not task.train or not task.dev:
        raise UsageError(f"task {config['dataset']!r} has no training or dev examples in {task.source}")
    return task, Vocab.build_for_task(task)


def build_model(config: dict, vocab_size: int, pretrained: torch.Tensor | None = None,
                word_frequency: torch.Tensor | None = None) -> AttentionClassifier:
    """The run's model. A config without word_embedding_norm (runs before issue 15) uses the raw embeddings.
    word_frequency: the training-set counts for "frequency" (None when a checkpoint will supply them)."""
    return AttentionClassifier(
        vocab_size, kind=config["kind"], n_labels=config["n_labels"], embed_size=config["embed_size"],
        encoder=config["encoder"], attention=config["attention"], hidden_size=config["hidden_size"],
        cnn_channels=config["cnn_channels"], kernel_sizes=tuple(config["kernel_sizes"]),
        decoder_size=config["decoder_size"], dropout=config["dropout"], pretrained=pretrained,
        embedding_norm=config.get("word_embedding_norm") or "none", word_frequency=word_frequency,
        encoder_options=transformer.encoder_options(config) if config["encoder"] == "transformer" else None)


def embedding_coverage(vocab: Vocab, examples, vectors_found: set[int] | None) -> dict:
    """How much of the vocabulary and of the training tokens have a pretrained vector."""
    counts = vocab.token_counts(examples)
    words = len(vocab) - 2  # without <pad> and <unk>
    found = sorted(vectors_found or ())
    tokens = float(counts.sum())
    covered = float(counts[found].sum()) if found else 0.0
    return {"words": len(found), "vocabulary_words": words,
            "vocabulary_fraction": len(found) / words if words else None,
            "train_token_fraction": covered / tokens if tokens else None}


def make_optimizer(model: AttentionClassifier, config: dict) -> torch.optim.Optimizer:
    """Adam with amsgrad; weight decay on every parameter except the attention's (as in the paper)."""
    attention = {id(p) for p in model.attention_parameters()}
    groups = [
        {"params": [p for p in model.parameters() if id(p) not in attention], "weight_decay": config["weight_decay"]},
        {"params": [p for p in model.parameters() if id(p) in attention], "weight_decay": 0.0},
    ]
    # The fused (single-kernel) update is ~6x faster than the default per-parameter loop on the CPU, where
    # the whole embedding matrix is updated every step.
    try:
        return torch.optim.Adam(groups, lr=config["lr"], amsgrad=True, fused=True)
    except (RuntimeError, TypeError):  # a device or an older torch without the fused kernel
        return torch.optim.Adam(groups, lr=config["lr"], amsgrad=True)


class Distributed:
    """rank / world size from torchrun's environment; a single process otherwise."""

    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--device {device_arg}: this torch ({torch.__version__}) sees no CUDA device")
            if self.world > 1 or device.index is None:
                device = torch.device("cuda", local_rank if self.world > 1 else torch.cuda.current_device())
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def shard(self, batches: list) -> list:
        """This rank's batches: every world-th batch, wrapping around so that every rank takes the same
        number of steps (DDP needs them in lockstep)."""
        if self.world == 1:
            return batches
        steps = math.ceil(len(batches) / self.world)
        return [batches[(self.rank + k * self.world) % len(batches)] for k in range(steps)]

    def replicas_identical(self, model: torch.nn.Module) -> bool:
        """Whether every process holds rank 0's parameters, bit for bit."""
        flat = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        differs = torch.tensor([float(not torch.equal(flat, reference))], dtype=torch.float64, device=flat.device)
        dist.all_reduce(differs)
        return bool(differs.item() == 0)

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- checkpoints

def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary file, then os.replace: a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path}: not a checkpoint of this version (format {checkpoint.get('format')!r})")
    return checkpoint


def rng_state(shuffle: torch.Generator, noise: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "shuffle": shuffle.get_state(), "noise": noise.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict, shuffle: torch.Generator, noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    shuffle.set_state(state["shuffle"])
    noise.set_state(state["noise"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- evaluation

def predict(model: AttentionClassifier, examples, vocab: Vocab, config: dict, device) -> dict:
    """Task metrics on `examples` (forward passes only)."""
    model.eval()
    labels, logits = [], []
    with torch.no_grad():
        for batch in make_batches(examples, vocab, EVAL_BATCH_SIZE, shuffle=False, device=device,
                                  num_labels=config["n_labels"]):
            labels.append(batch.labels.cpu())
            logits.append(model(batch).logits.float().cpu())
    return classification_metrics(torch.cat(labels), torch.cat(logits), config["kind"], logits=True)


def evaluate_test(model: AttentionClassifier, examples, vocab: Vocab, config: dict, device) -> dict:
    """Task metrics, the attention-vs-gradient-importance correlation and the robustness to an AT
    perturbation of the test scores (SPEC "Evaluation")."""
    model.eval()
    labels, logits, perturbed_logits = [], [], []
    attentions, perturbed_attentions = [], []
    importances: dict[str, list] = {name: [] for name in interpret.IMPORTANCE_DEFINITIONS}
    eps = config["robustness_eps"]
    for batch in make_batches(examples, vocab, EVAL_BATCH_SIZE, shuffle=False, device=device,
                              num_labels=config["n_labels"]):
        definitions, found = interpret.importance_definitions(model, batch)
        attacked = interpret.perturbed_predictions(model, batch, eps)
        mask = batch.mask.cpu()
        labels.append(batch.labels.cpu())
        logits.append(found.logits.float().cpu())
        perturbed_logits.append(attacked.logits.float().cpu())
        for row, keep in enumerate(mask):
            attentions.append(found.attention[row].cpu()[keep].double().numpy())
            for name, values in definitions.items():
                importances[name].append(values[row].cpu()[keep].double().numpy())
            perturbed_attentions.append(attacked.attention[row].cpu()[keep].double().numpy())
    labels = torch.cat(labels)
    result = classification_metrics(labels, torch.cat(logits), config["kind"], logits=True)
    # "correlation": the default definition (as before issue 15); "correlations": every definition by name
    result["correlations"] = {name: attention_gradient_correlation(attentions, values)
                              for name, values in importances.items()}
    result["correlation"] = result["correlations"]["gradient_x_input"]
    attacked_metrics = classification_metrics(labels, torch.cat(perturbed_logits), config["kind"], logits=True)
    result["robustness"] = {"eps": eps, "accuracy": attacked_metrics["accuracy"],
                            "attention_tv_mean": mean_total_variation(attentions, perturbed_attentions)}
    return result


def heatmap_sentences(examples, count: int = HEATMAP_SENTENCES) -> list:
    """The first `count` test examples of 6 to 30 tokens: fixed sentences, comparable across runs."""
    chosen = [e for e in examples if 6 <= len(e.tokens) <= 30][:count]
    return chosen or list(examples[:count])


def write_run_heatmaps(model, examples, vocab, config, device, out_dir: Path, title: str):
    chosen = heatmap_sentences(examples)
    batch = make_batches(chosen, vocab, len(chosen), shuffle=False, sort_by_length=False, device=device,
                         num_labels=config["n_labels"])[0]
    model.eval()
    found = interpret.gradient_importance(model, batch)
    rows = []
    for row, example in enumerate(chosen):
        n = len(example.tokens)
        rows.append((example.tokens, {"attention": found.attention[row, :n].cpu().tolist(),
                                      "gradient x input": found.importance[row, :n].cpu().tolist()}))
    return write_heatmaps(rows, out_dir, title, stem="heatmaps")


def test_metrics(model, task, vocab, config, device) -> dict:
    return {name: evaluate_test(model, examples, vocab, config, device) for name, examples in task.tests.items()}


# ----------------------------------------------------------------------------------------------- training

def default_output_dir(config: dict) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config['dataset']}_{config['method']}_{config['encoder']}_{stamp}"


def _log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def train(config: dict, output_dir: Path, *, resume: bool, device_arg: str = "auto", threads: int | None = None,
          progress: bool = True, malloc: str = "tuned") -> dict | None:
    """Train as `config` says, writing the run directory; returns metrics (rank 0) or None (other ranks).
    malloc="tuned" on the CPU: fused_attn_at.tune_glibc_malloc() first (freed blocks stay in the process instead
    of faulting in again; benchmarks/RESULTS.md "Allocator" has what it does on each machine measured). The
    setting that took effect is recorded in metrics.json ("malloc")."""
    started, cpu_started = time.time(), time.process_time()
    ddp = Distributed(device_arg)
    try:
        malloc_used = "as-is"
        if malloc == "tuned" and ddp.device.type == "cpu":
            from fused_attn_at import tune_glibc_malloc

            malloc_used = "tuned" if tune_glibc_malloc() else "as-is (the C library is not glibc)"
        if threads is None and ddp.device.type == "cpu":
            # The paper's models are small (B=32, H=256): a second intra-op thread gains little, and when
            # other processes share the cores, OpenMP threads waiting for a descheduled peer burn CPU: on a
            # shared 2-core machine an SST epoch took ~40 s with 1 thread and had not finished after 440 s with 2.
            threads = 1
        if threads is not None:
            torch.set_num_threads(threads)
        return _train(config, output_dir, resume, ddp, progress, started, cpu_started, malloc_used)
    finally:
        ddp.close()


def _train(config, output_dir: Path, resume: bool, ddp: Distributed, progress: bool, started, cpu_started,
           malloc_used: str = "as-is"):
    device = ddp.device
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    checkpoint = load_checkpoint(last_path) if resume and last_path.is_file() else None

    torch.manual_seed(config["seed"])
    task, vocab = load_data(config)
    hf = bool(config.get("hf_model_path"))  # --hf-model: a pretrained encoder, word-pieced (paper.hf_finetune)
    if hf:
        vocab = hf_finetune.WordPieceVocab(config["hf_model_path"])
    config["label_names"] = list(task.label_names)
    config["n_labels"] = 1 if config["kind"] == "bc" else task.num_labels  # bc: one logit
    pretrained = None
    if checkpoint is None:
        found: set[int] = set()
        if config["embeddings"] is not None:
            pretrained, n_found = load_embeddings(config["embeddings"], vocab, seed=config["seed"],
                                                  found_indices=found)
            config["embeddings_found"] = n_found
        # which vectors (a name, not only a path) and how much of the vocabulary and training text they cover
        config["embeddings_name"] = (None if config["embeddings"] is None else SHIPPED_GLOVE_NAME
                                     if Path(config["embeddings"]) == SHIPPED_GLOVE else Path(config["embeddings"]).name)
        config["embeddings_coverage"] = embedding_coverage(vocab, task.train, found)
    if pretrained is not None:
        config["embed_size"] = pretrained.shape[1]
    config["vocab_size"] = len(vocab)
    frequency = vocab.token_counts(task.train) if config.get("word_embedding_norm") == "frequency" else None
    model = (hf_finetune.build_model(config, vocab) if hf else
             build_model(config, len(vocab), pretrained, frequency)).to(device)
    optimizer = (hf_finetune.make_optimizer if hf else make_optimizer)(model, config)
    shuffle_gen = torch.Generator().manual_seed(config["seed"])
    # attention_rp's noise; each process of a distributed run draws its own
    noise_gen = torch.Generator(device=device).manual_seed(config["seed"] + 1 + 1000 * ddp.rank)
    # --hf-model and --perturb-layers self/all: objectives that run their own backward (backward_in_step)
    objective = (hf_finetune.make_objective(model, config, noise_gen, vocab, task, ddp.world) if hf else
                 transformer.make_objective(model, config, noise_gen, ddp.world)) or methods.Objective(
        model, config["method"], eps=config["eps"], lam=config["lam"], compat=config["compat"], generator=noise_gen,
        word_iat_norm=config.get("word_iat_norm") or "perturbation")
    history, best, start_epoch = [], {"epoch": None, "dev": None}, 0
    if checkpoint is not None:
        if vocab.to_dict() != checkpoint["vocab"]:
            raise UsageError(f"{last_path}: the data gives a different vocabulary than the checkpoint's")
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        restore_rng(checkpoint["rng"], shuffle_gen, noise_gen)
        history, best, start_epoch = checkpoint["history"], checkpoint["best"], checkpoint["epoch"]
        if ddp.main:
            _log(f"resuming {output_dir} after epoch {start_epoch}")
    if ddp.main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config, output_dir / "config.json")
        _log(f"{config['dataset']}: {len(task.train)} train / {len(task.dev)} dev / "
             + " / ".join(f"{len(v)} {k}" for k, v in task.tests.items())
             + f", vocabulary {len(vocab)}, device {device}, {torch.get_num_threads()} threads"
             + (f", {ddp.world} processes" if ddp.world > 1 else ""))
    trainer = objective
    if ddp.world > 1:
        trainer = DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)

    patience = config.get("patience")  # None (runs before issue 15, binary tasks): a fixed number of epochs
    for epoch in range(start_epoch, config["epochs"]):
        if patience_exhausted(best, epoch, patience):
            break  # a resumed run that had already stopped early (killed before its test evaluation)
        epoch_started = time.time()
        model.train()
        objective.refresh_neighbours()
        batches = ddp.shard(make_batches(task.train, vocab, config["batch_size"], shuffle=True,
                                         generator=shuffle_gen, device=device, num_labels=config["n_labels"]))
        sums = [0.0, 0.0, 0.0, 0]  # loss, clean loss, adversarial loss, examples
        # disable=None: tqdm draws the bar only when stderr is a terminal; redirected to a file, the log holds
        # the per-epoch lines below and no carriage-return updates
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{config['epochs']}",
                   disable=None if progress and ddp.main else True, leave=False, dynamic_ncols=True)
        for batch in bar:
            optimizer.zero_grad(set_to_none=True)
            step = trainer(batch)
            if not getattr(objective, "backward_in_step", False):
                step.loss.backward()
            optimizer.step()
            n = len(batch)
            sums[0] += step.loss.item() * n
            sums[1] += step.clean_loss.item() * n
            sums[2] += (0.0 if step.adversarial_loss is None else step.adversarial_loss.item()) * n
            sums[3] += n
            bar.set_postfix(loss=f"{sums[0] / sums[3]:.4f}")
        sums = ddp.sum(sums)
        record = {"epoch": epoch + 1, "train_loss": sums[0] / sums[3], "train_clean_loss": sums[1] / sums[3],
                  "train_adversarial_loss": sums[2] / sums[3] if config["method"] != "vanilla" else None}
        if ddp.main:
            record["dev"] = predict(model, task.dev, vocab, config, device)
            record["seconds"] = time.time() - epoch_started
            history.append(record)
            if best["dev"] is None or record["dev"]["accuracy"] > best["dev"]["accuracy"]:
                best = {"epoch": epoch + 1, "dev": record["dev"]}
                save_atomic({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "epoch": epoch + 1,
                             "config": config, "vocab": vocab.to_dict(), "dev": record["dev"]}, best_path)
            # best (its epoch and dev metrics) is the patience state: epochs without improvement = epoch - best
            save_atomic({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "rng": rng_state(shuffle_gen, noise_gen), "history": history,
                         "best": best, "epochs_without_improvement": epoch + 1 - best["epoch"],
                         "config": config, "vocab": vocab.to_dict()}, last_path)
            _log(f"epoch {epoch + 1}: train loss {record['train_loss']:.4f}, dev " + _short(record["dev"])
                 + f" ({record['seconds']:.1f} s)" + ("  *best*" if best["epoch"] == epoch + 1 else ""))
        # every rank takes the same decision: rank 0's best, broadcast through the sum of a one-hot
        best_epoch = int(ddp.sum([float(best["epoch"] or 0) if ddp.main else 0.0])[0])
        if patience_exhausted({"epoch": best_epoch}, epoch + 1, patience):
            if ddp.main:
                _log(f"early stop after epoch {epoch + 1}: dev accuracy has not improved for {patience} epochs "
                     f"(best epoch {best_epoch})")
            break
        ddp.barrier()

    replicas_identical = ddp.replicas_identical(model) if ddp.world > 1 else None
    if not ddp.main:
        return None
    train_seconds, train_cpu = time.time() - started, time.process_time() - cpu_started
    model.load_state_dict(load_checkpoint(best_path)["model"])
    tests = (hf_finetune.test_metrics if hf else test_metrics)(model, task, vocab, config, device)
    first_test = next(iter(task.tests))
    html, png = (hf_finetune.write_run_heatmaps if hf else write_run_heatmaps)(model, task.tests[first_test], vocab, config, device, output_dir / "heatmaps",
                                   f"{config['dataset']} {config['method']} ({config['encoder']}, "
                                   f"{config['attention']}): best epoch {best['epoch']}, {first_test} sentences")
    metrics = {
        "dataset": config["dataset"], "method": config["method"], "kind": config["kind"],
        "epochs": history, "best_epoch": best["epoch"], "best_dev": best["dev"], "test": tests,
        "patience": patience, "max_epochs": config["epochs"],
        "stopped_early": bool(patience) and len(history) < config["epochs"],
        "heatmaps": {"html": str(html.relative_to(output_dir)), "png": str(png.relative_to(output_dir))},
        # times of this invocation (a resumed run counts from its restart), rank 0's CPU time
        "train_seconds": train_seconds, "train_cpu_seconds": train_cpu,
        "total_seconds": time.time() - started, "total_cpu_seconds": time.process_time() - cpu_started,
        "threads": torch.get_num_threads(), "world_size": ddp.world, "malloc": malloc_used,
        # DDP keeps the replicas equal by averaging gradients; checked on the trained weights
        "ddp_replicas_identical": replicas_identical,
        "backend": fused_backend(device),
    }
    write_json_atomic(metrics, output_dir / "metrics.json")
    for name, result in tests.items():
        _log(f"test ({name}): " + _short(result) + f"; attention/gradient Pearson "
             f"{_fmt(result['correlation']['pearson_mean'])} +- {_fmt(result['correlation']['pearson_std'])}; "
             f"robust accuracy {_fmt(result['robustness']['accuracy'])}")
    _log(f"done in {metrics['total_seconds']:.1f} s ({metrics['total_cpu_seconds']:.1f} s CPU): {output_dir}")
    return metrics


def patience_exhausted(best: dict, epochs_done: int, patience: int | None) -> bool:
    """Whether training stops after `epochs_done` epochs: the best dev accuracy is `patience` or more epochs
    old. False without a patience, or before any epoch."""
    if not patience or best.get("epoch") is None or epochs_done == 0:
        return False
    return epochs_done - best["epoch"] >= patience


def fused_backend(device) -> str:
    import fused_attn_at

    return fused_attn_at.resolve_backend(None, torch.device(device))


def _fmt(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _short(result: dict) -> str:
    return ", ".join(f"{k} {_fmt(result[k])}" for k in ("accuracy", "f1", "roc_auc") if k in result)


# ----------------------------------------------------------------------------------------------- re-evaluation

def evaluate_run(run_dir: Path, *, data_dir: str | None = None, device_arg: str = "auto",
                 robustness_eps: float | None = None, heatmaps: bool = False) -> dict:
    """Recompute the test metrics of a saved run from its best checkpoint (its own vocabulary and config)."""
    best_path = run_dir / "best.pt"
    if not best_path.is_file():
        raise UsageError(f"{best_path} does not exist: {run_dir} is not a finished or started run directory")
    checkpoint = load_checkpoint(best_path)
    config = dict(checkpoint["config"])
    if config.get("hf_model_path"):
        raise UsageError(f"{run_dir} is a --hf-model run: its metrics.json already holds every measure")
    if data_dir is not None:
        if not Path(data_dir).is_dir():
            raise UsageError(f"--data-dir {data_dir} is not a folder")
        config["data_dir"] = str(Path(data_dir).resolve())
    if robustness_eps is not None:
        config["robustness_eps"] = robustness_eps
    device = Distributed(device_arg).device
    vocab = Vocab.from_dict(checkpoint["vocab"])
    task = load_task(config["dataset"], config["data_dir"], max_examples=config["max_eval_examples"],
                     require_train=False, recipe=config.get("sst_recipe") or "ours")
    model = build_model(config, len(vocab)).to(device)
    model.load_state_dict(checkpoint["model"])
    result = {"run": str(run_dir), "best_epoch": checkpoint["epoch"], "robustness_eps": config["robustness_eps"],
              "backend": fused_backend(device),
              "test": test_metrics(model, task, vocab, config, device)}
    if heatmaps:
        first = next(iter(task.tests))
        html, png = write_run_heatmaps(model, task.tests[first], vocab, config, device, run_dir / "heatmaps",
                                       f"{config['dataset']} {config['method']}: best epoch {checkpoint['epoch']}")
        result["heatmaps"] = {"html": str(html), "png": str(png)}
    write_json_atomic(result, run_dir / "evaluation.json")
    return result
