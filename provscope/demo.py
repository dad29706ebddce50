"""The ``provscope demo`` training job: a tiny character-level transformer on the CPU.

It trains on ``provscope/data/corpus.txt`` (shipped with the package; no downloads) and
uses the in-job API the way a real training script would: a workflow with its config,
the corpus as a dataset entity, epochs and sampled step tasks, ``run.log`` scalars every
step, an ``eval`` task per epoch, a checkpoint entity at the end and, when the PyTorch
hooks are installed, ``provscope.watch(model, every=10)`` layer statistics.

torch is imported only when ``train`` runs.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import provscope
from provscope.config import Config

__all__ = ["DemoResult", "Hyper", "corpus_path", "train"]


@dataclass(frozen=True)
class Hyper:
    """The demo model and its training schedule."""

    context: int = 64
    d_model: int = 64
    n_heads: int = 4
    n_layers: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 20
    steps_per_epoch: int = 100
    eval_batches: int = 4
    seed: int = 0


@dataclass
class DemoResult:
    """What ``train`` did: ids, counts and timings for the summary table."""

    run_id: str
    steps: int
    epochs: int
    final_loss: float
    eval_loss: float | None
    wall_s: float
    train_s: float
    checkpoint: str
    counts: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    flushed: bool = True
    sink_mode: str = ""
    errors: int = 0
    watched: bool = False


def corpus_path() -> Path:
    """Path of the shipped training text."""
    return Path(str(resources.files("provscope.data").joinpath("corpus.txt")))


def _model(torch: Any, vocab: int, h: Hyper) -> Any:
    nn: Any = torch.nn  # torch is imported lazily: the demo's CLI must start without it

    class CharTransformer(nn.Module):
        """Token + position embeddings, a causal Transformer encoder, a linear head."""

        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(vocab, h.d_model)
            self.pos = nn.Embedding(h.context, h.d_model)
            layer = nn.TransformerEncoderLayer(
                h.d_model, h.n_heads, dim_feedforward=4 * h.d_model, dropout=0.0,
                batch_first=True, norm_first=True,
            )
            self.blocks = nn.TransformerEncoder(layer, h.n_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(h.d_model)
            self.head = nn.Linear(h.d_model, vocab)
            self.register_buffer(
                "mask", nn.Transformer.generate_square_subsequent_mask(h.context),
                persistent=False,
            )

        def forward(self, idx: Any) -> Any:
            t = idx.shape[1]
            pos = torch.arange(t, device=idx.device)
            x = self.tok(idx) + self.pos(pos)
            x = self.blocks(x, mask=self.mask[:t, :t], is_causal=True)
            return self.head(self.norm(x))

    return CharTransformer()


def _torch_hooks() -> Any:
    """``provscope.pytorch.watch`` (layer hooks) when installed, else None."""
    try:
        from provscope.pytorch import watch as hooks
    except ImportError:
        return None
    return hooks


def train(settings: Config, *, seconds: float = 30.0, steps: int | None = None,
          out_dir: str | os.PathLike[str] = "provscope-demo", hyper: Hyper | None = None,
          progress: bool = True, watch: bool = True,
          flush_timeout_s: float = 20.0) -> DemoResult:
    """Train the demo model for ``seconds`` of wall time (or exactly ``steps`` steps).

    Records everything through the in-job API with ``settings`` (destinations), saves
    ``model.pt`` under ``out_dir``, flushes (blocking up to ``flush_timeout_s``) and
    returns the summary. Raises ImportError when torch is missing.
    """
    import torch
    from tqdm import tqdm

    wall0 = time.perf_counter()
    h = hyper or Hyper()
    torch.manual_seed(h.seed)
    # One intra-op thread: on a small shared machine, OpenMP threads that wait for each
    # other at every op cost 10x when another process holds a core; one thread degrades
    # gracefully and loses little on a model this small.
    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = corpus_path()
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    split = int(len(data) * 0.9)
    train_data, val_data = data[:split], data[split:]
    gen = torch.Generator().manual_seed(h.seed)

    def batch(source: Any) -> tuple[Any, Any]:
        starts = torch.randint(len(source) - h.context - 1, (h.batch_size,), generator=gen)
        x = torch.stack([source[s: s + h.context] for s in starts.tolist()])
        y = torch.stack([source[s + 1: s + 1 + h.context] for s in starts.tolist()])
        return x, y

    model = _model(torch, len(chars), h)
    optimizer = torch.optim.AdamW(model.parameters(), lr=h.lr)
    loss_fn = torch.nn.functional.cross_entropy
    total_steps = steps
    budget = None if steps is not None else float(seconds)
    max_epochs = math.ceil(steps / h.steps_per_epoch) if steps is not None else 1_000_000
    config = {**asdict(h), "vocab": len(chars), "corpus_chars": len(text),
              "seconds": budget, "steps": steps,
              "parameters": sum(p.numel() for p in model.parameters())}

    def lr_at(step: int) -> float:
        if step < h.warmup_steps:
            return h.lr * (step + 1) / h.warmup_steps
        if total_steps:
            progress_ = min(1.0, step / max(1, total_steps))
            return h.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_)))
        return h.lr

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = []
        for _ in range(h.eval_batches):
            x, y = batch(val_data)
            logits = model(x)
            losses.append(loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item())
        model.train()
        return sum(losses) / len(losses)

    bar = tqdm(total=steps if steps is not None else round(budget or 0),
               unit="step" if steps is not None else "s", disable=not progress,
               desc="provscope demo", mininterval=0.5, dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}<{remaining}"
                          "{postfix}]")
    watched = False
    final_loss = float("nan")
    eval_loss: float | None = None
    done_steps = 0
    epochs = 0
    with provscope.workflow("provscope-demo", config=config, settings=settings) as run:
        run.use(corpus, kind="dataset", name="corpus.txt", chars=len(text), vocab=len(chars))
        _hooks = _torch_hooks() if watch else None
        if _hooks is not None:
            try:
                _hooks.watch(model, every=10, optimizer=optimizer, scalars=False, run=run)
            except TypeError:  # an older hooks module without these options
                _hooks.watch(model, every=10)
            watched = True
        train0 = time.perf_counter()
        stop = False
        for epoch in run.epochs(max_epochs):
            epochs += 1
            remaining = (total_steps - done_steps) if total_steps is not None else None
            n = h.steps_per_epoch if remaining is None else min(h.steps_per_epoch, remaining)
            for step, (x, y) in run.steps(batch(train_data) for _ in range(n)):
                t0 = time.perf_counter()
                lr = lr_at(step)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                logits = model(x)
                loss = loss_fn(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                final_loss = loss.item()
                dt = time.perf_counter() - t0
                run.log(loss=final_loss, lr=lr, grad_norm=grad_norm,
                        tokens_per_second=x.numel() / dt, samples_per_second=x.shape[0] / dt)
                done_steps += 1
                elapsed = time.perf_counter() - train0
                if budget is not None:
                    shown = min(round(budget), int(elapsed))
                    if shown != bar.n:  # redraw once a second, not every step
                        bar.n = shown
                        bar.set_postfix(loss=f"{final_loss:.3f}", step=step)
                    if elapsed >= budget:
                        stop = True
                        break
                else:
                    bar.update(1)
                    bar.set_postfix(loss=f"{final_loss:.3f}", refresh=False)
            with run.task("eval", kind="eval", epoch=epoch):
                eval_loss = evaluate()
                run.log(eval_loss=eval_loss)
            if stop or (total_steps is not None and done_steps >= total_steps):
                break
        train_s = time.perf_counter() - train0
        bar.n = bar.total
        bar.close()
        checkpoint = out / "model.pt"
        with run.task("save checkpoint", kind="checkpoint"):
            torch.save({"model": model.state_dict(), "chars": "".join(chars),
                        "config": config}, checkpoint)
            run.produce(checkpoint, kind="checkpoint", step=run.step, loss=final_loss)
        if _hooks is not None:
            with contextlib.suppress(Exception):
                _hooks.unwatch(model)
    flushed = run.flush(flush_timeout_s)
    return DemoResult(
        run_id=run.run_id, steps=done_steps, epochs=epochs, final_loss=final_loss,
        eval_loss=eval_loss, wall_s=time.perf_counter() - wall0, train_s=train_s,
        checkpoint=str(checkpoint.resolve()), counts=dict(run.counts), written=run.written(),
        flushed=flushed, sink_mode=run.sink_mode, errors=run.errors, watched=watched,
    )
