"""The public API: one argument order, typed results, one truth for a run (issues 16 and 17)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import robustopt
from robustopt import ConfigError, DataError, RunDirError, ThreatModel, TrainConfig, evaluate, fit, load_model, robust_loss

THREAT = ThreatModel("linf", 0.1)


def _data(n: int = 64, d: int = 20, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    return x, (x[:, 0] > 0.5).long() % k


def _mlp(d: int = 20, k: int = 2) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, k))


def test_every_function_that_takes_a_threat_takes_it_fourth_after_model_x_y() -> None:
    for fn in (robustopt.perturb, robustopt.robust_loss, robustopt.evaluate, robustopt.run_attack, robustopt.certify,
               robustopt.minimal_perturbations):  # fmt: skip
        assert list(inspect.signature(fn).parameters)[:4] == ["model", "x", "y", "threat"], fn.__name__
    assert list(inspect.signature(fit).parameters)[:3] == ["model", "train_data", "threat"]
    assert not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(fit).parameters.values())  # no catch-all


def test_results_are_frozen_dataclasses_with_json_ready_to_dict(tmp_path: Path) -> None:
    x, y = _data()
    model = _mlp()
    summary = fit(model, (x, y), THREAT, out=tmp_path, epochs=1, batch_size=32, log=lambda s: None)
    with pytest.raises(AttributeError):
        summary.epochs = 3  # type: ignore[misc]
    assert json.loads(json.dumps(summary.to_dict()))["epochs"] == 1
    res = evaluate(model, x, y, THREAT, "pgd", steps=3, sanity=False, progress=False)
    with pytest.raises(AttributeError):
        res.n = 3  # type: ignore[misc]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["n"] == 64 and "robust_mask" not in d and res.robust_mask.shape == (64,)


def test_fit_with_a_threat_trains_robustly_by_default_and_says_so_first(tmp_path: Path) -> None:
    lines: list[str] = []
    x, y = _data()
    fit(_mlp(), (x, y), THREAT, out=tmp_path, epochs=1, batch_size=32, log=lines.append)
    assert lines[0].startswith(f"training {tmp_path}: method robust, threat linf ε=0.1, augmentation off, 1 epochs")
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train"]["method"] == "robust" and cfg["train"]["augment"] is False
    assert cfg["model"] == "custom" and cfg["normalization"] is None and cfg["dataset"] == "tensors"
    assert cfg["threat"] == {"norm": "linf", "eps": 0.1, "bounds": [0.0, 1.0]} and len(cfg["data"]["sha256"]) == 64
    with pytest.raises(RunDirError, match="load_model\\(run_dir, model=MyNet\\(\\)\\)"):
        load_model(tmp_path)  # a module handed to fit is rebuilt by the caller, never guessed
    assert isinstance(load_model(tmp_path, model=_mlp()), nn.Module)


def test_the_threat_has_one_source_and_conflicts_are_errors(tmp_path: Path) -> None:
    x, y = _data()
    with pytest.raises(ConfigError, match="give the threat once"):
        fit(_mlp(), (x, y), ThreatModel("l2", 0.5), config=TrainConfig(norm="linf", eps=0.1), out=tmp_path / "a")
    with pytest.raises(TypeError):
        fit(_mlp(), (x, y), ThreatModel("l2", 0.5), eps=0.5, out=tmp_path / "b")  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="needs a threat"):
        fit(_mlp(), (x, y), out=tmp_path / "c", method="pgd")
    fit(_mlp(), (x, y), ThreatModel("l2", 0.5), config=TrainConfig(epochs=1), out=tmp_path / "d", log=lambda s: None)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (cfg["train"]["norm"], cfg["train"]["eps"], cfg["threat"]["norm"], cfg["threat"]["eps"]) == ("l2", 0.5, "l2", 0.5)
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_resume_refuses_changed_data(tmp_path: Path) -> None:
    x, y = _data(600)
    kw = {"out": tmp_path, "epochs": 2, "batch_size": 50, "log": lambda s: None}
    fit(_mlp(), (x, y), THREAT, config=TrainConfig(epochs=2, checkpoint_minutes=1e-9), **kw)
    (tmp_path / "summary.json").unlink()  # pretend it stopped before the end
    x2, y2 = _data(900, seed=1)
    with pytest.raises(RunDirError, match="data_fingerprint"):
        fit(_mlp(), (x2, y2), THREAT, config=TrainConfig(epochs=2, checkpoint_minutes=1e-9), resume=True, **kw)


def test_robust_loss_in_a_validation_step_and_its_bad_input() -> None:
    x, y = _data(16)
    model = _mlp()
    with torch.no_grad():
        loss = robust_loss(model, x, y, THREAT, "pgd", steps=2)  # the inner max still gets its gradients
    assert torch.isfinite(loss) and not loss.requires_grad
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        robust_loss(model, x, y, THREAT)
    with pytest.raises(DataError, match="labels go up to"):
        robust_loss(model, x, y + 5, THREAT)
    with pytest.raises(ConfigError, match="threat must be a ThreatModel"):
        robust_loss(model, x, y, None)  # type: ignore[arg-type]
    with torch.no_grad():
        res = evaluate(model, x, y, THREAT, "apgd-dlr", steps=3, sanity=False, progress=False)  # two classes, no_grad
    assert res.adversarial_accuracy <= res.clean_accuracy
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        evaluate(model, x, y, THREAT)


def test_a_model_with_nan_outputs_fails_a_check_and_advice_names_the_api() -> None:
    x, y = _data(16)

    class NaNNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(20, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * float("nan")

    lines: list[str] = []
    res = evaluate(NaNNet(), x, y, THREAT, "fgsm", progress=False, log=lines.append)
    assert res.sanity is not None and res.sanity["finite"]["passed"] is False
    assert any("SANITY CHECK FAILED: finite" in line for line in lines)
    assert not any("--attack" in line for line in lines)  # Python users get the API's words


def test_one_image_in_sixteen_is_noise_not_a_failed_check() -> None:
    from robustopt.evaluation.sanity import count_above, paired_worse

    fewer = torch.tensor([True] * 12 + [False] * 4)
    more = fewer.clone()
    more[12] = True  # the stronger attack left one more image robust: 0.8125 vs 0.75 on n = 16
    assert paired_worse(fewer, more)["passed"]
    many_fewer = torch.tensor([True] * 700 + [False] * 300)
    many_more = many_fewer.clone()
    many_more[700:740] = True  # 40 of 1000 images: a real difference
    assert not paired_worse(many_fewer, many_more)["passed"]
    assert count_above(1, 16, 0.02)["passed"] and not count_above(30, 500, 0.02)["passed"]


def test_a_recorded_factory_is_code_and_needs_consent(tmp_path: Path) -> None:
    run = tmp_path / "run"
    x, y = _data()
    fit(_mlp(), (x, y), THREAT, out=run, epochs=1, log=lambda s: None)
    cfg = json.loads((run / "config.json").read_text())
    cfg.update(model="os:system", model_kwargs={"command": "touch " + str(tmp_path / "pwned")})
    (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunDirError, match="trust_code=True"):
        load_model(run)
    assert not (tmp_path / "pwned").exists()
