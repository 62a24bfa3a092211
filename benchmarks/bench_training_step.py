"""One training step (forward + backward + optimizer) of the experiments' BiLSTM model, per training method.

The model, objective and optimizer are the experiments' own (experiments/paper/models.py, methods.py; Adam
lr 1e-3 amsgrad, weight decay 1e-5 except on the attention, as the paper). The batch is fixed: the embedded
SST training set, vocabulary min_df 1, batched as the trainer does (seeded shuffle, length buckets, 32 per
batch), and of those batches the one whose padded length is the median, i.e. a typical step. With
--bench-set smoke the batch is synthetic (SST-like lengths, small vocabulary) so that smoke runs in seconds.

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
def _paper():
    """The experiments' package, or the reason it cannot be used (experiments/ goes on sys.path, never the
    repository root: the installed fused_attn_at must stay the one imported)."""
    import sys

    if str(EXPERIMENTS) not in sys.path:
        sys.path.insert(0, str(EXPERIMENTS))
    try:
        from paper import data, methods, models  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure means the case cannot run yet
        return None, (f"experiments/paper (models.py + methods.py) is not importable: "
                      f"{type(exc).__name__}: {exc}")
    return (data, models, methods), None


def _real_batch(data):
    task = data.load_task("sst")
    vocab = data.Vocab.build_for_task(task)
    batches = data.make_batches(task.train, vocab, BATCH_SIZE, shuffle=True,
                                generator=torch.Generator().manual_seed(0))
    full = [b for b in batches if len(b) == BATCH_SIZE]
    full.sort(key=lambda b: b.tokens.shape[1])
    return full[len(full) // 2], len(vocab), "SST train, the median-length batch of the trainer's seeded batching"


def _synthetic_batch(data):
    gen = torch.Generator().manual_seed(0)
    # SST's sentence lengths are ~19 tokens on average with a long tail to ~50.
    lengths = [max(2, min(50, round(19 + 9 * x))) for x in torch.randn(BATCH_SIZE, generator=gen).tolist()]
    vocab_size = 1000
    examples = [data.Example(tokens=[f"w{int(i)}" for i in torch.randint(2, vocab_size, (n,), generator=gen)],
                             label=k % 2) for k, n in enumerate(lengths)]
    vocab = data.Vocab(["<pad>", "<unk>"] + [f"w{i}" for i in range(2, vocab_size)])
    batch = data.make_batches(examples, vocab, BATCH_SIZE, shuffle=False, sort_by_length=False)[0]
    return batch, len(vocab), "synthetic SST-like lengths (smoke)"


@pytest.fixture(scope="session")
def step_batch(bench_settings):
    modules, reason = _paper()
    if modules is None:
        pytest.skip(reason)
    data = modules[0]
    return _synthetic_batch(data) if bench_settings["set"] == "smoke" else _real_batch(data)


def _optimizer(model):
    attention = {id(p) for p in model.attention_parameters()}
    rest = [p for p in model.parameters() if id(p) not in attention]
    return torch.optim.Adam([{"params": rest, "weight_decay": 1e-5},
                             {"params": model.attention_parameters(), "weight_decay": 0.0}], lr=1e-3, amsgrad=True)


def _pool_backend() -> str:
    import fused_attn_at

    try:
        return fused_attn_at.resolve_backend(None, torch.device("cpu"))
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


@pytest.mark.filterwarnings("ignore:fused_attn_at. no fused kernel")
@pytest.mark.parametrize("name", list(STEP_METHODS))
def test_training_step(benchmark, name, step_batch, bench_settings):
    (data, models, methods), _ = _paper()
    batch, vocab_size, batch_source = step_batch
    method, compat, description = STEP_METHODS[name]
    torch.manual_seed(0)
    model = models.AttentionClassifier(vocab_size, kind="bc", encoder="lstm", attention="additive")
    objective = methods.Objective(model, method, eps=1.0, lam=1.0, compat=compat)
    optimizer = _optimizer(model)

    def step():
        optimizer.zero_grad(set_to_none=True)
        result = objective(batch)
        result.loss.backward()
        optimizer.step()
        return result.loss.detach()

    benchmark.group = "training step (BiLSTM, SST batch 32)"
    info = benchmark.extra_info
    info.update(kind="training_step", method=name, description=description, batch=BATCH_SIZE,
                padded_length=int(batch.tokens.shape[1]), lengths=f"{int(batch.lengths.min())}-{int(batch.lengths.max())}"
                f" (mean {float(batch.lengths.float().mean()):.1f}), padded to {int(batch.tokens.shape[1])}",
                batch_source=batch_source, vocab_size=vocab_size, pool_backend=_pool_backend(),
                parameters=sum(p.numel() for p in model.parameters()))
    info.update(benchlib.software_info())
    info["threads"] = torch.get_num_threads()

    loss = step()  # also the warm-up: Adam's state is allocated on the first step
    assert math.isfinite(float(loss)), f"{name}: the training loss is not finite"
    if bench_settings["disabled"]:
        benchmark(step)
        return
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        samples.append(time.perf_counter() - t0)
    rounds = max(bench_settings["min_rounds"], min(500, round(2 * bench_settings["time"] / statistics.median(samples))))
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
