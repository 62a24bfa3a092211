"""One training step (forward + backward + optimizer) of the experiments' BiLSTM model, per training method.

Everything is what `python experiments/train.py --method M` builds with its defaults (its own parser and
config, paper.training.build_model / make_optimizer: SST, BiLSTM 128 per direction, additive attention,
the embedded GloVe vectors, Adam 1e-3 amsgrad with weight decay except on the attention). The batch is
fixed: of the trainer's seeded batches of 32 over the SST training set, the one whose padded length is the
median, i.e. a typical step. With --bench-set smoke the batch is synthetic (SST-like lengths, small
vocabulary, random embeddings) so that smoke runs in seconds.

    vanilla                L_clean
    attention_at           L_clean + L_adv sharing ONE encoder pass (fused_attn_at.adversarial_attention_loss)
    attention_at_released  the released code's way: three full network passes (compat="released")
    attention_iat          as attention_at with the iAT perturbation
    word_at                embeddings perturbed: two encoder passes
The report divides each median by vanilla's.
"""
from __future__ import annotations

import functools
import math
import statistics
import time

import pytest
import torch

import benchlib

EXPERIMENTS = benchlib.REPO / "experiments"
BATCH_SIZE = 32
STEP_METHODS = {
    # case name: (method, compat, what runs)
    "vanilla": ("vanilla", None, "1 encoder pass"),
    "attention_at": ("attention_at", None, "1 encoder pass, pooling twice"),
    "attention_at_released": ("attention_at", "released", "3 full network passes (released code)"),
    "attention_iat": ("attention_iat", None, "1 encoder pass, pooling twice, iAT"),
    "word_at": ("word_at", None, "2 encoder passes"),
}


@functools.lru_cache(maxsize=1)
def _experiments():
    """(train.py module, paper package modules), or the reason they cannot be used. experiments/ goes on
    sys.path, never the repository root: the installed fused_attn_at must stay the one imported."""
    import sys

    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    try:
        import train as train_cli
        from paper import data, methods, training
    except Exception as exc:  # noqa: BLE001 - any failure means the case cannot run yet
        return None, (f"experiments/ (train.py, paper/models.py + methods.py + training.py) is not importable: "
                      f"{type(exc).__name__}: {exc}")
    return (train_cli, data, methods, training), None


def _default_config(train_cli, method: str = "vanilla", compat: str | None = None) -> dict:
    parser = train_cli.build_parser()
    argv = ["--method", method] + (["--compat", compat] if compat else [])
    config = train_cli.resolve_config(parser.parse_args(argv), parser)
    config["n_labels"] = 1  # as the trainer sets for binary classification (one logit)
    return config


def _real_setup(train_cli, data, training):
    config = _default_config(train_cli)
    task, vocab = training.load_data(config)
    pretrained = None
    if config["embeddings"] is not None:
        pretrained, _ = data.load_embeddings(config["embeddings"], vocab, seed=config["seed"])
    batches = data.make_batches(task.train, vocab, config["batch_size"], shuffle=True,
                                generator=torch.Generator().manual_seed(config["seed"]), num_labels=1)
    full = sorted((b for b in batches if len(b) == config["batch_size"]), key=lambda b: b.tokens.shape[1])
    source = "SST train: the median-length batch of the trainer's seeded batching"
    return full[len(full) // 2], len(vocab), pretrained, source


def _synthetic_setup(data):
    gen = torch.Generator().manual_seed(0)
    # SST's sentence lengths are ~19 tokens on average with a long tail to ~50.
    lengths = [max(2, min(50, round(19 + 9 * x))) for x in torch.randn(BATCH_SIZE, generator=gen).tolist()]
    vocab_size = 1000
    examples = [data.Example(tokens=[f"w{int(i)}" for i in torch.randint(2, vocab_size, (n,), generator=gen)],
                             label=k % 2) for k, n in enumerate(lengths)]
    vocab = data.Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(2, vocab_size)])
    batch = data.make_batches(examples, vocab, BATCH_SIZE, shuffle=False, sort_by_length=False)[0]
    return batch, len(vocab), None, "synthetic SST-like lengths, random embeddings (smoke)"


def load_step_setup(smoke: bool):
    """(batch, vocabulary size, pretrained vectors or None, where the batch comes from); raises RuntimeError
    with the reason when experiments/ cannot be imported. Also used by allocator.py's worker processes."""
    modules, reason = _experiments()
    if modules is None:
        raise RuntimeError(reason)
    train_cli, data, _, training = modules
    if smoke:
        return _synthetic_setup(data)
    return _real_setup(train_cli, data, training)


@pytest.fixture(scope="session")
def step_setup(bench_settings):
    """(batch, vocabulary size, pretrained vectors or None, where the batch comes from)."""
    try:
        return load_step_setup(bench_settings["set"] == "smoke")
    except RuntimeError as exc:
        pytest.skip(str(exc))


def make_step(name: str, step_setup):
    """(step callable: zero_grad, objective, backward, optimizer step -> detached loss; model, config)."""
    (train_cli, _, methods, training), _ = _experiments()
    batch, vocab_size, pretrained, _ = step_setup
    method, compat, _ = STEP_METHODS[name]
    config = _default_config(train_cli, method, compat)
    if pretrained is not None:
        config["embed_size"] = pretrained.shape[1]
    torch.manual_seed(config["seed"])
    model = training.build_model(config, vocab_size, pretrained)
    model.train()
    optimizer = training.make_optimizer(model, config)
    objective = methods.Objective(model, method, eps=config["eps"], lam=config["lam"], compat=compat,
                                  generator=torch.Generator().manual_seed(config["seed"] + 1))

    def step():
        optimizer.zero_grad(set_to_none=True)
        result = objective(batch)
        result.loss.backward()
        optimizer.step()
        return result.loss.detach()

    return step, model, config


def _pool_backend() -> str:
    import fused_attn_at

    try:
        return fused_attn_at.resolve_backend(None, torch.device("cpu"))
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


@pytest.mark.filterwarnings("ignore:fused_attn_at. no fused kernel")
@pytest.mark.parametrize("name", list(STEP_METHODS))
def test_training_step(benchmark, name, step_setup, bench_settings):
    batch, vocab_size, pretrained, batch_source = step_setup
    description = STEP_METHODS[name][2]
    step, model, config = make_step(name, step_setup)

    benchmark.group = "training step (experiments/train.py defaults: BiLSTM, SST, batch 32)"
    info = benchmark.extra_info
    info.update(kind="training_step", method=name, description=description, batch=BATCH_SIZE,
                padded_length=int(batch.tokens.shape[1]), lengths=f"{int(batch.lengths.min())}-{int(batch.lengths.max())}"
                f" (mean {float(batch.lengths.float().mean()):.1f}), padded to {int(batch.tokens.shape[1])}",
                batch_source=batch_source, vocab_size=vocab_size, embed_size=config["embed_size"],
                pool_backend=_pool_backend(),
                parameters=sum(p.numel() for p in model.parameters()))
    info.update(benchlib.software_info())
    info["threads"] = torch.get_num_threads()

    if bench_settings["disabled"]:
        loss = benchmark(step)  # one untimed step
        assert math.isfinite(float(loss)), f"{name}: the training loss is not finite"
        return
    loss = step()  # also the warm-up: Adam's state is allocated on the first step
    assert math.isfinite(float(loss)), f"{name}: the training loss is not finite"
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    rounds = max(bench_settings["min_rounds"], min(500, round(2 * bench_settings["time"] / statistics.median(samples))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info["pct"] = benchlib.round_percentiles(benchmark.stats.stats)
