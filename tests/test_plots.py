import numpy as np
import pytest
import torch
from matplotlib.image import imread
from torch.utils.data import DataLoader, Subset

from encodenet_timm import EncodeNetConfig, EncodeNetWrapper
from encodenet_timm.data import stratified_subset
from encodenet_timm.data import digits_datasets
from encodenet_timm.plots import save_run_plots
from conftest import make_model

NAMES = {"representatives.png", "reconstructions.png", "curves.png"}


@pytest.fixture(scope="module", params=[pytest.param(3, marks=pytest.mark.slow), 1], ids=["rgb", "grey"])  # rgb: slow run
def fitted(request):
    """(wrapper fitted for one epoch per stage on 120 digits, its training set) at in_chans 3 or 1."""
    in_chans = request.param
    train, _ = digits_datasets(size=32, in_chans=in_chans, seed=0)
    train = Subset(train, stratified_subset(train.tensors[1].numpy(), 12, seed=0).tolist())
    config = EncodeNetConfig(device="cpu", progress=False, input_size=(in_chans, 32, 32))
    config.representatives.clusters_per_class = 2
    for stage in (config.baseline, config.autoencoder, config.transfer, config.finetune):
        stage.epochs = 1
    wrapper = EncodeNetWrapper(make_model("resnet20_cifar", in_chans=in_chans), config)
    loader = DataLoader(train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0))
    wrapper.fit(loader, DataLoader(train, batch_size=64))
    return wrapper, train


def _check_png(path):
    image = imread(path)  # (H, W, 3 or 4) float in [0, 1]
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 50 and image.shape[1] > 50
    assert image[..., :3].std() > 0.01  # something is drawn


def test_pictures_of_a_fitted_run(fitted, tmp_path):
    wrapper, train = fitted
    paths = save_run_plots(wrapper, tmp_path / "run", train, classes=[f"digit {d}" for d in range(10)])
    assert {p.name for p in paths} == NAMES
    for path in paths:
        assert path.parent == tmp_path / "run" and path.stat().st_size > 0
        _check_png(path)


def test_denormalize_and_no_dataset(fitted, tmp_path):
    wrapper, _ = fitted
    calls = []

    def denormalize(x):
        calls.append(tuple(x.shape))
        return (x * 0.3 + 0.5).clamp(0, 1)

    paths = save_run_plots(wrapper, tmp_path, denormalize=denormalize, per_class=1, max_classes=3)
    assert {p.name for p in paths} == NAMES  # the representatives stand in for the inputs
    c = wrapper.input_size[0]
    assert calls[0] == (wrapper.representatives.num_clusters, c, 32, 32)  # the representatives grid
    assert calls[1:] == [(3, c, 32, 32)] * 3  # input, output, target: one image for each of 3 classes
    for path in paths:
        _check_png(path)


def test_dataset_must_be_the_training_set(fitted, tmp_path):
    wrapper, train = fitted
    with pytest.raises(ValueError, match="representatives were selected on"):
        save_run_plots(wrapper, tmp_path, Subset(train, range(10)))


def test_only_what_has_run_is_drawn(tmp_path):
    wrapper = EncodeNetWrapper(make_model("resnet20_cifar"), EncodeNetConfig(device="cpu", progress=False))
    assert save_run_plots(wrapper, tmp_path) == []
    wrapper.history = {"transfer": [{"epoch": e, "loss": 1.0 / (e + 1), "accuracy": 0.5 + 0.1 * e,
                                     "val_accuracy": 0.4 + 0.1 * e, "val_loss": 1.2} for e in range(3)],
                       "representatives": {"seconds": 1.0}}
    paths = save_run_plots(wrapper, tmp_path)
    assert [p.name for p in paths] == ["curves.png"]
    _check_png(paths[0])
    assert not np.isnan(imread(paths[0])).any()


def test_curves_keep_the_legend_off_the_lines_and_one_accuracy_scale():
    """Issue #25.5: the legend covered the lines, loss and val_loss shared a colour, and each panel zoomed
    its accuracy axis (one validation image looked like a cliff)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from encodenet_timm.plots import _curves_figure
    stages = {"baseline": [{"epoch": e, "loss": 2.0 - 0.5 * e, "accuracy": 0.5 + 0.1 * e, "val_loss": 2.2 - 0.4 * e,
                            "val_accuracy": 0.900 + 0.002 * e} for e in range(3)],
              "autoencoder": [{"epoch": e, "loss": 0.5 - 0.1 * e} for e in range(2)]}
    fig = _curves_figure(stages)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    axes = fig.axes
    assert all(ax.get_legend() is None for ax in axes) and len(fig.legends) == 1
    legend = fig.legends[0].get_window_extent(renderer)
    assert not any(legend.overlaps(ax.get_tightbbox(renderer)) for ax in axes)  # below every panel
    loss, accuracy = axes[0], axes[2]  # (row, column) order: baseline's loss, then its accuracy below
    assert loss.get_title() == "baseline" and len(loss.lines) == len(accuracy.lines) == 2
    assert len({line.get_color() for line in loss.lines}) == 2  # training and validation: two colours
    assert [line.get_color() for line in loss.lines] == [line.get_color() for line in accuracy.lines]
    assert all(ax.get_ylim() == (0, 100) for ax in (axes[2], axes[3]))  # every accuracy panel: 0-100%
    assert list(loss.lines[0].get_xdata()) == [1, 2, 3]  # epochs from 1, as the log and summary.csv count
    assert accuracy.lines[1].get_ydata()[-1] == pytest.approx(90.4)
