"""Training is deterministic for a seed and learns; evaluation and the ensemble are correct."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from qapfuse.fusion import trace
from qapfuse.fusion.data import load_digits
from qapfuse.fusion.models import SmallCNN
from qapfuse.fusion.training import evaluate, predict_ensemble, seeded, train


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


def small_cnn(seed: int) -> SmallCNN:
    return seeded(lambda: SmallCNN(input_size=8, channels=(8, 16)), seed)


def test_small_cnn_traces_and_fits_both_input_sizes():
    for size in (8, 28):
        model = SmallCNN(input_size=size)
        assert model(torch.zeros(2, 1, size, size)).shape == (2, 10)
        spec = trace(model, torch.zeros(1, 1, size, size))
        assert spec.free_groups == ("conv1", "conv2")
        side = size // 4
        assert spec.axes["fc.weight"][1][0].block == side * side
    with pytest.raises(ValueError, match="'input_size' parameter of SmallCNN"):
        SmallCNN(input_size=2)


def test_train_is_deterministic_for_a_seed_and_learns(digits):
    data = digits.train
    kw = {"epochs": 2, "lr": 1e-2, "batch_size": 64, "progress": False}
    a = train(small_cnn(0), data, seed=5, **kw)
    b = train(small_cnn(0), data, seed=5, **kw)
    c = train(small_cnn(0), data, seed=6, **kw)
    for (k, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), k
    assert not torch.equal(a.fc.weight, c.fc.weight)
    before = evaluate(small_cnn(0), digits.test)
    after = evaluate(a, digits.test)
    assert after[0] > 0.7 and after[0] > before[0] + 0.4
    assert after[1] < before[1]
    assert not a.training


def test_train_leaves_the_global_random_state_alone(digits):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train(small_cnn(0), (digits.x_train[:64], digits.y_train[:64]), seed=9, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_evaluate_matches_a_manual_computation(digits):
    model = small_cnn(3)
    x, y = digits.x_test, digits.y_test
    with torch.no_grad():
        logits = model(x)
    acc, loss = evaluate(model, (x, y), batch_size=7)
    assert acc == pytest.approx((logits.argmax(1) == y).double().mean().item())
    assert loss == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)


def test_ensemble_of_copies_equals_the_model_and_averages_softmax(digits):
    x, y = digits.x_test, digits.y_test
    a, b = small_cnn(1), small_cnn(2)
    assert predict_ensemble([a, a, a], (x, y)) == pytest.approx(evaluate(a, (x, y))[0])
    with torch.no_grad():
        probs = torch.softmax(a(x), 1) + torch.softmax(b(x), 1)
    expected = (probs.argmax(1) == y).double().mean().item()
    assert predict_ensemble([a, b], (x, y)) == pytest.approx(expected)


def test_training_arguments_are_checked(digits):
    with pytest.raises(ValueError, match="'epochs' parameter of train"):
        train(small_cnn(0), digits.train, epochs=0)
    with pytest.raises(TypeError, match="'model' parameter of train"):
        train("net", digits.train)
    with pytest.raises(TypeError, match="'data' parameter of evaluate"):
        evaluate(small_cnn(0), digits.x_test)
    with pytest.raises(TypeError, match="'models' parameter of predict_ensemble"):
        predict_ensemble(small_cnn(0), digits.test)


def test_progress_bar_goes_to_stderr_only_when_asked(digits, capsys):
    data = (digits.x_train[:64], digits.y_train[:64])
    train(small_cnn(0), data, batch_size=32, progress=False)
    assert capsys.readouterr().err == ""
    train(small_cnn(0), data, batch_size=32, progress=True)
    captured = capsys.readouterr()
    assert "train:" in captured.err and "/2 " in captured.err and captured.out == ""
