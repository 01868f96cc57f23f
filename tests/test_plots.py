"""The step's plots: loss_curve.png (training loss, learning rate on a second axis, eval loss when there is one, a
title naming the run and profile) and token_lengths.png (a log axis when lengths span orders of magnitude)."""
import types

import pytest

from steps import harmony, train

pytestmark = pytest.mark.unit


def test_loss_curve_draws_loss_learning_rate_and_eval_loss(tmp_path, monkeypatch):
    import matplotlib.figure

    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: saved.append(fig))
    progress = types.SimpleNamespace(loss_curve=[[1, 12.0], [2, 6.0], [3, 3.0]], lr_curve=[[1, 0.0], [2, 1e-2], [3, 5e-3]],
                                     eval_curve=[[3, 3.5]])
    train._plot_loss(progress, tmp_path / "loss_curve.png", title="x/train, profile configs/tiny-cpu.yaml: full fine-tune of random")
    loss_ax, lr_ax = saved[0].axes
    assert [line.get_label() for line in loss_ax.lines] == ["training loss", "eval loss"]
    assert list(loss_ax.lines[1].get_ydata()) == [3.5] and list(lr_ax.lines[0].get_ydata()) == [0.0, 1e-2, 5e-3]
    assert lr_ax.get_ylabel() == "learning rate" and "profile configs/tiny-cpu.yaml" in loss_ax.get_title()
    progress.eval_curve = []
    train._plot_loss(progress, tmp_path / "loss_curve.png", title="t")
    assert [line.get_label() for line in saved[1].axes[0].lines] == ["training loss"]


@pytest.mark.parametrize("lengths, log", [([120, 140, 180, 300], False), ([40, 60, 90, 2500, 12000], True)])
def test_token_lengths_on_a_log_axis_when_they_span_orders_of_magnitude(tmp_path, lengths, log):
    assert harmony.uses_log_scale(lengths) is log
    harmony._histogram(lengths, 2048, tmp_path / "token_lengths.png")
    assert (tmp_path / "token_lengths.png").stat().st_size > 1000
