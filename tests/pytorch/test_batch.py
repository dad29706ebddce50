"""samples_per_second counts the batch where the model says it is, never the sequence."""

from __future__ import annotations

import logging
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from provscope.errors import ConfigError  # noqa: E402
from provscope.pytorch.watch import watch  # noqa: E402
from provscope.records import Point  # noqa: E402

pytestmark = pytest.mark.torch

SEQ, BATCH, WIDTH, VOCAB = 10, 3, 16, 50


def _train(model, inputs, steps=3, **kwargs):
    records = []
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    w = watch(model, every=100, optimizer=opt, emit=records.append, **kwargs)
    for _ in range(steps):
        opt.zero_grad()
        out = model(*inputs)
        out = out[0] if isinstance(out, tuple) else out
        out.float().pow(2).mean().backward()
        opt.step()
    w.unwatch()
    train = [r.fields for r in records if isinstance(r, Point) and r.measurement == "train"]
    assert [f["step"] for f in train] == list(range(steps))
    return w, train


def _samples(train):
    """Samples per step as written (rate x step time), for steps that have a rate."""
    return [round(f["samples_per_second"] * f["step_time_seconds"]) for f in train
            if "samples_per_second" in f]


def test_nn_transformer_default_layout_counts_the_batch_not_the_sequence():
    with warnings.catch_warnings():  # torch's own advice to use batch_first
        warnings.simplefilter("ignore", UserWarning)
        model = nn.Transformer(d_model=WIDTH, nhead=2, num_encoder_layers=1,
                               num_decoder_layers=1, dim_feedforward=32, dropout=0.0)
    src, tgt = torch.randn(SEQ, BATCH, WIDTH), torch.randn(7, BATCH, WIDTH)
    w, train = _train(model, (src, tgt))
    assert _samples(train) == [BATCH] * 3
    assert w.stats()["batch_source"] == "Transformer.batch_first"


def test_lstm_batch_first_counts_dimension_zero():
    model = nn.LSTM(WIDTH, 8, batch_first=True)
    _, train = _train(model, (torch.randn(BATCH, SEQ, WIDTH),))
    assert _samples(train) == [BATCH] * 3


class SeqFirstLM(nn.Module):
    """Takes (seq, batch) token ids, like PyTorch's word_language_model example."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, WIDTH)
        layer = nn.TransformerEncoderLayer(WIDTH, 2, 32, dropout=0.0)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.out = nn.Linear(WIDTH, VOCAB)

    def forward(self, ids):
        return self.out(self.enc(self.emb(ids)))


class BatchFirstIdsSeqFirstInside(SeqFirstLM):
    """Takes (batch, seq) token ids and transposes them for a sequence-first encoder."""

    def forward(self, ids):
        return self.out(self.enc(self.emb(ids.t()))).transpose(0, 1)


@pytest.mark.parametrize(("model_cls", "shape", "tokens_dim"), [
    (SeqFirstLM, (SEQ, BATCH), 0),
    (BatchFirstIdsSeqFirstInside, (BATCH, SEQ), 1),
])
def test_the_layout_inside_the_model_finds_the_batch_dimension_of_its_input(
        model_cls, shape, tokens_dim):
    torch.manual_seed(0)
    model = model_cls()
    ids = torch.randint(0, VOCAB, shape)
    w, train = _train(model, (ids,), steps=4)
    # The first step reads the layout; every later step counts the batch.
    assert _samples(train) == [BATCH] * 3
    for f in train[1:]:
        assert f["tokens_per_second"] == pytest.approx(f["samples_per_second"] * SEQ)
    assert "TransformerEncoderLayer.batch_first=False" in w.stats()["batch_source"]


def test_an_ambiguous_layout_reports_no_rate_and_says_so_once(caplog):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, BATCH))  # batch == seq: no single dimension
    with caplog.at_level(logging.WARNING, logger="provscope.torch"):
        w, train = _train(SeqFirstLM(), (ids,), steps=10)
    assert _samples(train) == []
    lines = [r.getMessage() for r in caplog.records if "batch dimension" in r.getMessage()]
    assert len(lines) == 1 and "batch_size=" in lines[0] and "\n" not in lines[0]
    assert w.stats()["batch_source"] == ""


@pytest.mark.parametrize(("kwargs", "expected"), [
    ({"batch_size": 5}, 5),
    ({"batch_dim": 1}, BATCH),
])
def test_batch_size_or_batch_dim_arguments_settle_it(kwargs, expected):
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (BATCH, BATCH))
    _, train = _train(SeqFirstLM(), (ids,), **kwargs)
    assert _samples(train) == [expected] * 3


def test_models_without_a_declared_layout_count_dimension_zero():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 8, 8))  # materialise the lazy layer
    _, train = _train(model, (torch.randn(BATCH, 3, 8, 8),))
    assert _samples(train) == [BATCH] * 3


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"batch_dim": -1},
                                    {"batch_size": 2, "batch_dim": 0}, {"seq_len": "x"}])
def test_bad_batch_arguments_are_one_clear_line(kwargs):
    with pytest.raises(ConfigError) as info:
        watch(nn.Linear(2, 2), emit=lambda r: None, **kwargs)
    text = str(info.value)
    assert "\n" not in text and any(name in text for name in kwargs)
