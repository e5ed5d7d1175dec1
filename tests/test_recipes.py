"""Recipes: every shipped TOML validates and says its paper, anchor and device; bad names and keys are one-line errors
that leave nothing behind; every CIFAR-10 recipe starts and finishes a CPU smoke run on synthetic CIFAR-10 files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from _datafiles import tiny_arrays, write_cifar_bin
from robustopt.cli.app import main
from robustopt.errors import ConfigError
from robustopt.recipes import list_recipes, load_recipe, resolve

ROOT = Path(__file__).resolve().parents[1]
NAMES = {"mnist-linf-0.3", "mnist-linf-0.3-strong", "mnist-linf-0.3-certified"}
NAMES |= {"cifar10-fast-preact18", "cifar10-pgd-preact18", "cifar10-trades-wrn34"}


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return (info.value.code or 0), out, err


def test_every_recipe_validates_and_names_its_paper_anchor_and_device() -> None:
    recipes = {r.name: r for r in list_recipes()}
    assert set(recipes) == NAMES
    for r in recipes.values():
        assert r.paper != "?" and "arXiv" in r.paper, r
        assert "%" in r.anchor and ("AutoAttack" in r.anchor or "PGD" in r.anchor), r
        assert "GPU" in r.device or "CPU" in r.device, r
        assert r.measured != "not run by this project" or "cifar10" in r.name, r  # every MNIST recipe was run here
        cfg = load_recipe(r.name)  # every key is a TrainConfig key and every value validates
        assert cfg.norm == "linf" and cfg.method != "standard"
    wong, rice, trades = (load_recipe(n) for n in ("cifar10-fast-preact18", "cifar10-pgd-preact18", "cifar10-trades-wrn34"))
    assert (wong.method, wong.epochs, wong.lr, wong.schedule, wong.batch_size) == ("fast", 15, 0.2, "onecycle", 128)
    assert wong.eps == pytest.approx(8 / 255) and wong.step_size == pytest.approx(10 / 255) and wong.amp != "off"
    assert (rice.method, rice.inner_steps, rice.milestones, rice.epochs) == ("pgd", 10, [100, 150], 200)
    assert rice.step_size == pytest.approx(2 / 255) and rice.eval_pgd > 0 and rice.early_stop
    assert (trades.model, trades.method, trades.beta, trades.inner_steps) == ("wrn-34-10", "trades", 6.0, 10)
    assert (trades.eps, trades.step_size, trades.weight_decay, trades.milestones[0]) == (0.031, 0.007, 2e-4, 75)


def test_recipe_names_and_clone_paths_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # a clone: recipes/NAME.toml at the repository root, as the issue writes it
    assert resolve("recipes/cifar10-fast-preact18.toml").read_text() == resolve("cifar10-fast-preact18").read_text()
    with pytest.raises(ConfigError, match="unknown recipe 'nope'.*cifar10-fast-preact18"):
        resolve("nope")


def test_recipes_command_lists_and_shows(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run_cli(["recipes"], capsys)
    assert code == 0
    for r in list_recipes():
        assert r.name in out and r.anchor in out and r.device in out and r.measured in out
    code, out, _ = run_cli(["recipes", "cifar10-trades-wrn34", "--path"], capsys)
    assert code == 0 and Path(out.strip()).read_text().startswith("# paper:")
    code, _, err = run_cli(["recipes", "cifar10-wrn-9000"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "mnist-linf-0.3" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [("seed = 0", "seed = 0\ncolour = 1", "unknown keys colour; allowed:"), ('method = "trades"', 'method = "trade"', "'trade'")],
)
def test_bad_recipe_is_one_line_and_leaves_no_run(
    tmp_path: Path, capsys: pytest.CaptureFixture, old: str, new: str, expect: str
) -> None:
    bad = tmp_path / "bad.toml"
    text = resolve("mnist-linf-0.3").read_text()
    assert old in text
    bad.write_text(text.replace(old, new))
    code, _, err = run_cli(["train", "--config", bad, "--out", tmp_path / "run", "--no-progress"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and expect in err, err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError):
        load_recipe(bad)


# ----------------------------------------------------------------------------- CPU smoke runs

# Budget keys overridden for CPU (the recipe's every other key is used as written): one epoch on 64 synthetic images;
# WRN-34-10 with one inner step on 16 images (10 steps of its 46M-parameter net would take minutes on one core).
SMOKE = {
    "cifar10-fast-preact18": ["--subset", "64", "--batch-size", "32"],
    "cifar10-pgd-preact18": ["--subset", "64", "--batch-size", "32", "--steps", "2", "--eval-pgd", "16", "--eval-pgd-steps", "1"],
    "cifar10-trades-wrn34": ["--subset", "16", "--batch-size", "16", "--steps", "1"],
}


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic CIFAR-10 in the binary format (five training batches and a test batch) in a data directory."""
    root = tmp_path_factory.mktemp("data")
    write_cifar_bin(root / "cifar-10-batches-bin", tiny_arrays((32, 32, 3), n_train=100, n_test=20))
    return root


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_cifar_recipe_smoke_run_on_cpu(
    name: str, cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, one_thread: None
) -> None:
    out = tmp_path / name  # fast's overfitting guard holds out a quarter of so small a training set
    argv = ["train", "--config", resolve(name), "--data-dir", cifar_dir, "--epochs", "1", "--test-subset", "16"]
    t0 = time.monotonic()
    code, _, err = run_cli([*argv, *SMOKE[name], "--out", out, "--no-progress"], capsys)
    seconds = time.monotonic() - t0
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())["train"]
    recipe = load_recipe(name)
    assert (config["model"], config["method"], config["schedule"]) == (recipe.model, recipe.method, recipe.schedule)
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
    print(f"{name}: smoke run {seconds:.1f} s")


def test_small_cnn_is_the_trades_mnist_net() -> None:
    import torch

    from robustopt.models.zoo import build_model

    net = build_model("small-cnn", mean=(0.1307,), std=(0.3081,), num_classes=10, input_shape=(1, 28, 28))
    sizes = [tuple(p.shape) for p in net.parameters()]
    assert sizes[::2] == [(32, 1, 3, 3), (32, 32, 3, 3), (64, 32, 3, 3), (64, 64, 3, 3), (200, 1024), (200, 200), (10, 200)]
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    net.eval()
    assert net(x).shape == (4, 10)
    # the first layer's fast CPU input gradient equals plain conv2d's
    conv = net.features[0]
    g = torch.autograd.grad(conv(x).square().sum(), x)[0]
    ref = torch.autograd.grad(torch.nn.functional.conv2d(x, conv.weight, conv.bias).square().sum(), x)[0]
    torch.testing.assert_close(g, ref)
    with pytest.raises(ConfigError, match="small-cnn"):
        build_model("small-cnn", mean=(0.5,), std=(0.5,), num_classes=10, input_shape=(1, 32, 32))
