import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from constrainedsparse import make
from constrainedsparse.formulations.l0 import L0Config
from constrainedsparse.masks import hard_prune
from constrainedsparse.postprune import purge_stage
from constrainedsparse.problem import SparsityProblem
from constrainedsparse.purge import (
    SelectFeatures,
    chain_purged_params,
    count_params_and_macs,
    linear_chain,
    load_purged,
    purge,
)
from constrainedsparse.spec import load_problem
from constrainedsparse.targets import SparsityConfig, Targets


def _cnn():
    """The bundled mnist1d-cnn model, built as a run builds it."""
    return load_problem("mnist1d-cnn").model({})


def _structured_l0(model, example, sparsity=0.6, seed=0):
    """Gates on every weight, random median-rule gates, finalize + hard prune (as the engine does)."""
    torch.manual_seed(seed)
    targets = Targets().resolve(model, SparsityConfig(sparsity))
    problem = SparsityProblem(model, nn.functional.cross_entropy, targets)
    f = make("l0", problem, L0Config(grouping="structured"))
    f.setup(1, 1)
    for gate in f.gates.values():
        gate.log_alpha.data = torch.where(torch.rand_like(gate.log_alpha) < 0.5, 3.0, -5.0)
        gate.log_alpha.data[0] = 3.0
    masks = f.hard_masks()
    model.eval()
    f.finalize()
    hard_prune(targets, masks)
    for m in model.modules():  # nonzero BN statistics so that slicing them matters
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model


MODELS = {
    "digits-mlp": (
        lambda: nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10)),
        (64,),
    ),
    "mlp-bn": (
        lambda: nn.Sequential(nn.Linear(40, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 10)),
        (40,),
    ),
    "mnist1d-cnn": (_cnn, (40,)),
    "conv2d-bn": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 12, 3),
            nn.BatchNorm2d(12),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(12 * 4 * 4, 5),
        ),
        (3, 6, 6),
    ),
    "lenet-pools-logsoftmax": (
        lambda: nn.Sequential(
            nn.Conv2d(1, 6, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 8, 3),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * 2 * 2, 16),
            nn.ReLU(),
            nn.Linear(16, 10),
            nn.LogSoftmax(dim=1),
        ),
        (1, 14, 14),
    ),
    "conv-flatten-bn1d-activation": (  # per-position constants after the Flatten (BatchNorm1d, then Tanh)
        lambda: nn.Sequential(
            nn.Conv2d(3, 6, 3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.BatchNorm1d(6 * 2 * 2),
            nn.Tanh(),
            nn.Linear(6 * 2 * 2, 5),
        ),
        (3, 8, 8),
    ),
    "conv1d-adaptive-pool": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 6, 3, padding=1),
            nn.GELU(),
            nn.AdaptiveMaxPool1d(5),
            nn.Conv1d(6, 4, 3),
            nn.AdaptiveAvgPool1d(2),
            nn.Flatten(),
            nn.Linear(8, 3),
            nn.Softmax(dim=-1),
        ),  # fmt: skip
        (2, 12),
    ),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_purged_model_matches_the_pruned_one_and_is_smaller(name):
    build, shape = MODELS[name]
    model = _structured_l0(build(), None)
    x = torch.randn(7, *shape)
    small = purge(model)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-5)
    (params, macs), (small_params, small_macs) = count_params_and_macs(model, x), count_params_and_macs(small, x)
    assert small_params < params and small_macs < macs
    assert sum(p.numel() for p in model.parameters()) == params  # the input model is untouched
    # saved and loaded back on a fresh dense model of the same architecture, as a user does
    loaded = load_purged(build(), small.state_dict())
    assert repr(loaded) == repr(small)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), small(x))


def test_mlp_purge_drops_columns_rows_and_input_features():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:, [1, 4]] = 0
        model[2].weight[:, [0, 2, 5]] = 0
    small = purge(model)
    assert isinstance(small[0], SelectFeatures) and small[0].index.tolist() == [0, 2, 3, 5]
    assert repr(small[0]) == "SelectFeatures(4 of 6 features)"  # of the original input width
    assert list(small.state_dict()) == ["select.index", "0.weight", "0.bias", "2.weight", "2.bias"]
    assert small[1].weight.shape == (5, 4) and small[3].weight.shape == (3, 5)
    x = torch.randn(4, 6)
    torch.testing.assert_close(small(x), model(x))
    assert count_params_and_macs(model, x) == (6 * 8 + 8 + 8 * 3 + 3, 6 * 8 + 8 * 3)
    assert count_params_and_macs(small, x) == (4 * 5 + 5 + 5 * 3 + 3, 4 * 5 + 5 * 3)


def test_conv_macs_per_sample():
    model = nn.Sequential(nn.Conv1d(2, 4, 3, stride=2), nn.Flatten(), nn.Linear(4 * 4, 3))
    # Conv: 4 out x 2 in x 3 kernel x 4 positions; Linear: 16 x 3.
    assert count_params_and_macs(model, torch.randn(5, 2, 9)) == (2 * 4 * 3 + 4 + 16 * 3 + 3, 96 + 48)


def test_padded_conv_keeps_a_dead_channel_with_a_nonzero_constant():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv1d(3, 2, 3, padding=1))
    with torch.no_grad():
        model[0].weight[1] = 0
        model[0].bias[1] = 0.5  # relu(0.5) != 0 feeds a padded conv: not foldable, kept
        model[0].weight[2] = 0
        model[0].bias[2] = -0.5  # relu(-0.5) = 0: dropped
    small = purge(model)
    assert small[0].out_channels == 2 and small[2].in_channels == 2
    x = torch.randn(3, 1, 10)
    torch.testing.assert_close(small(x), model(x))


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Linear(3, 2), "flat nn.Sequential"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=1), nn.Linear(4, 2)), "layer 1 is a Softmax"),
        (nn.Sequential(nn.Conv1d(4, 4, 3, groups=2)), "groups != 1"),
        (nn.Sequential(nn.Linear(3, 4), nn.Conv1d(4, 2, 1)), "a Linear .layer 0. feeding a Conv"),
        (nn.Sequential(nn.Conv1d(3, 4, 1), nn.Conv1d(5, 2, 1)), "do not connect channel to channel"),
        (nn.Sequential(nn.Conv1d(1, 4, 3), nn.AvgPool1d(2, padding=1), nn.Conv1d(4, 2, 1)), "averages zero padding"),
        (nn.Sequential(nn.Linear(3, 4), nn.Sequential(nn.ReLU()), nn.Linear(4, 2)), "layer 1 is a Sequential"),
        (nn.Sequential(nn.Conv1d(1, 4, 3), nn.Flatten(), nn.MaxPool1d(2), nn.Linear(8, 2)), "pools after a Flatten"),
        (nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(2), nn.Linear(4, 2)), "keeps a dimension apart"),
    ],
)
def test_unhandled_architectures(model, message):
    with pytest.raises(ValueError, match=message):
        purge(model)


def test_purge_refuses_parametrized_weights_and_batch_statistics_norms_and_load_purged_a_wrong_state(tmp_path):
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    targets = Targets().resolve(model, SparsityConfig(0.5))
    f = make("l0", SparsityProblem(model, nn.functional.cross_entropy, targets), L0Config(grouping="structured"))
    with pytest.raises(ValueError, match=r"^purge: layer 0 \(Linear\) still carries a parametrization .* finalize\(\)"):
        purge(model)
    f.finalize()
    no_stats = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 2))
    with pytest.raises(ValueError, match=r"^purge: layer 1 is a BatchNorm1d without running statistics"):
        purge(no_stats)
    with pytest.raises(ValueError, match=r"^load_purged: the state has no 2\.bias$"):
        load_purged(model, {"0.weight": torch.zeros(8, 6), "0.bias": torch.zeros(8), "2.weight": torch.zeros(3, 8)})
    from safetensors.torch import save_file

    small = purge(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)))
    save_file(small.state_dict(), tmp_path / "purged.safetensors")
    assert repr(load_purged(model, tmp_path / "purged.safetensors")) == repr(small)  # from a file's path


def test_purge_stage_reports_an_unhandled_model(tmp_path):
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    model = Wrapped()
    targets = Targets().resolve(model, SparsityConfig(0.5))
    f = make("l0", SparsityProblem(model, nn.functional.cross_entropy, targets), L0Config(grouping="structured"))
    batch = (torch.randn(1, 4), torch.zeros(1, dtype=torch.long))
    assert f.purges
    assert purge_stage(model, targets, batch) == (
        None,
        {"purge_skipped": "purge handles flat nn.Sequential models, got Wrapped"},
    )
    model2 = Wrapped()
    targets2 = Targets().resolve(model2, SparsityConfig(0.5))
    assert not make("l0", SparsityProblem(model2, nn.functional.cross_entropy, targets2)).purges


# --- the purged size of a Linear chain (l0 density_of=purged) ----------------------------------


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=7, max_size=7), min_size=3, max_size=3), st.integers(0, 2**16))
def test_chain_purged_params_is_the_purged_models_target_size(kept_columns, seed):
    torch.manual_seed(seed)
    widths = [5, 7, 6]  # input columns of the three Linear layers; the last one has 4 outputs
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4))
    keeps = [torch.tensor(k[:w]) for k, w in zip(kept_columns, widths)]
    for keep in keeps:  # every layer keeps >= 1 input (the formula's exactness condition)
        keep[seed % keep.numel()] = True
    assert linear_chain(model) == ["0", "2", "4"]
    with torch.no_grad():
        for name, keep in zip(("0", "2", "4"), keeps):
            model.get_submodule(name).weight[:, ~keep] = 0
    small = purge(model)
    purged = sum(small.get_parameter(f"{n}.weight").numel() for n in ("0", "2", "4"))
    assert purged == chain_purged_params([int(k.sum()) for k in keeps], 4)
    x = torch.randn(3, 5)
    torch.testing.assert_close(small(x), model(x))


def test_chain_purged_params_of_expected_counts():
    p = [torch.tensor(0.5), torch.tensor(0.25)]
    # Linear 4 -> 8 -> 3: E[k_1] E[k_2] + E[k_2] * 3 = (4 * 0.5)(8 * 0.25) + (8 * 0.25) * 3
    assert float(chain_purged_params([4 * p[0], 8 * p[1]], 3)) == pytest.approx(2 * 2 + 2 * 3)


@pytest.mark.parametrize(
    "model, message",
    [
        (nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 2)), r"^layer 0 is a Conv1d; the purged size"),
        (nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), r"^layer 0 \(Flatten\) precedes the first Linear"),
        (nn.Sequential(nn.Linear(4, 6), nn.Flatten(), nn.Linear(6, 2)), r"^layers 0 and 2 do not connect unit to unit"),
        (nn.Sequential(nn.ReLU()), r"^the model has no Linear layer"),
        (nn.Linear(3, 2), "flat nn.Sequential"),
    ],
)
def test_linear_chain_rejects_what_the_formula_does_not_model(model, message):
    with pytest.raises(ValueError, match=message):
        linear_chain(model)
