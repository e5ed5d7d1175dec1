"""Soundness of robustopt.certify: bounds against sampled points, PGD and the exact worst case of tiny nets."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from scipy.optimize import linprog
from torch import nn

from robustopt import perturb
from robustopt.certify import Residual, certify, margin_bounds
from robustopt.certify.bounds import InputSet, crown_margins, ibp_margins, interval_bounds, margin_spec
from robustopt.certify.layers import build_graph
from robustopt.errors import ConfigError
from robustopt.models.zoo import MLP, Normalized, PaperMNIST, SmallCNN
from robustopt.threat.model import ThreatModel

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")  # two spinning OpenMP threads on a shared machine are ~10x slower


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-0.3, 0.3)
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(-1.5, 1.5)  # negative scales too
    bn.bias.data.uniform_(-0.2, 0.2)
    return bn


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 20), nn.ReLU(), nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 4))
    return Normalized(net, mean=[0.4], std=[0.3]).eval()


def conv_net(seed: int) -> nn.Module:
    """Conv + BatchNorm (eval) + AvgPool + a residual block, inside Normalized."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), _bn(4), nn.ReLU(), nn.AvgPool2d(2),  # 6x6 -> 3x3 -> 1x1? no: 6->3->1
        Residual(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1))), nn.ReLU(),
        nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4),
    )  # fmt: skip
    return Normalized(net, mean=[0.5], std=[0.25]).eval()


def wide_conv_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), _bn(3), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(),
        Residual(nn.Conv2d(4, 4, 3, padding=1), shortcut=nn.Conv2d(4, 4, 1)), nn.ReLU(), nn.AvgPool2d(3),
        nn.Flatten(), nn.Linear(4, 4),
    )  # fmt: skip
    return Normalized(net, mean=[0.5], std=[0.25]).eval()


NETS = {"mlp": mlp, "conv": conv_net, "wide_conv": wide_conv_net}


def _data(n: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = model(x)
    return z.gather(1, y[:, None]) - z  # (N, K), z_y − z_j


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("norm,eps", [("linf", 0.03), ("l2", 0.3)])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown"])
def test_sampled_and_pgd_points_never_cross_the_margin_bounds(net: str, norm: str, eps: float, method: str) -> None:
    model, (x, y) = NETS[net](0), _data()
    threat = ThreatModel(norm, eps)
    with torch.no_grad():
        bound = margin_bounds(model, x, y, threat, method)
        g = torch.Generator().manual_seed(0)
        for _ in range(100):
            x_s = threat.random_init(x, g)
            assert bool(threat.contains(x_s, x).all())
            assert bool((_margins(model, x_s, y) >= bound - TOL).all())
        corners = threat.project(x + eps * torch.randint(0, 2, x.shape, generator=g) * 2 - eps, x)
        assert bool((_margins(model, corners, y) >= bound - TOL).all())
    x_pgd = perturb(model, x, y, threat, steps=20, random_start=True, generator=g)
    with torch.no_grad():
        assert bool((_margins(model, x_pgd, y) >= bound - TOL).all())


@pytest.mark.parametrize("net", list(NETS))
def test_interval_bounds_contain_every_node_on_sampled_points(net: str) -> None:
    """Every intermediate IBP/CROWN box contains the node's value at sampled points of the ball."""
    model, (x, _) = NETS[net](3), _data()
    threat = ThreatModel("linf", 0.05)
    with torch.no_grad():
        graph = build_graph(model, x)
        for slope in (None, "adaptive"):
            boxes = interval_bounds(graph, InputSet.around(x, threat), crown_slope=slope)
            for _ in range(30):
                values = _node_values(graph, threat.random_init(x))
                for (lo, hi), v in zip(boxes, values, strict=True):
                    assert bool((v >= lo - TOL).all()) and bool((v <= hi + TOL).all())


def _node_values(graph, x: torch.Tensor) -> list[torch.Tensor]:
    from robustopt.certify.layers import AddOp, MaxPoolOp, ReluOp

    values = [x]
    for node in graph[1:]:
        ins = [values[j] for j in node.inputs]
        if isinstance(node.op, AddOp):
            values.append(ins[0] + ins[1])
        elif isinstance(node.op, ReluOp):
            values.append(ins[0].clamp_min(0))
        elif isinstance(node.op, MaxPoolOp):
            values.append(node.op.module(ins[0]))
        else:
            values.append(node.op.forward(ins[0]))
    return values


@pytest.mark.parametrize("net", list(NETS))
def test_graph_reproduces_the_model(net: str) -> None:
    model, (x, _) = NETS[net](5), _data()
    with torch.no_grad():
        assert torch.allclose(_node_values(build_graph(model, x), x)[-1], model(x), atol=1e-5)


def test_zoo_models_are_read_and_paper_mnist_maxpool_is_ibp_only() -> None:
    torch.manual_seed(0)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([3, 7])
    threat = ThreatModel("linf", 0.002)
    for model in (MLP([0.13], [0.31]), SmallCNN([0.13], [0.31]), PaperMNIST([0.13], [0.31])):
        model.eval()
        with torch.no_grad():
            assert torch.allclose(_node_values(build_graph(model, x), x)[-1], model(x), atol=1e-4)
            bound = margin_bounds(model, x, y, threat, "ibp")
            assert bool((_margins(model, threat.random_init(x), y) >= bound - TOL).all())
    with pytest.raises(ConfigError, match="MaxPool2d is supported by interval bounds only"):
        certify(PaperMNIST([0.13], [0.31]), x, y, threat, "crown")


# ------------------------------------------------------------------ exact worst case of tiny nets


def _tiny(seed: int, hidden: int = 5, k: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, k)).double().eval()


def _exact_worst_margins(net: nn.Sequential, x: np.ndarray, y: int, eps: float) -> np.ndarray:
    """min over box ∩ ℓ∞ ball of z_y − z_j, per j: one LP per activation pattern of the hidden layer."""
    w1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    w2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    box = [(max(v - eps, 0.0), min(v + eps, 1.0)) for v in x]
    k = w2.shape[0]
    worst = np.full(k, np.inf)
    for pattern in itertools.product([0.0, 1.0], repeat=w1.shape[0]):
        d = np.array(pattern)
        sign = 1 - 2 * d  # active: −(W1 x + b1) ≤ 0; inactive: W1 x + b1 ≤ 0
        a_ub, b_ub = sign[:, None] * w1, -sign * b1
        for j in range(k):
            c = (w2[y] - w2[j]) * d  # margin = c·(W1 x + b1) + b2_y − b2_j on this region
            res = linprog(c @ w1, A_ub=a_ub, b_ub=b_ub, bounds=box, method="highs")
            if res.status == 0:
                worst[j] = min(worst[j], res.fun + c @ b1 + b2[y] - b2[j])
    return worst


@pytest.mark.parametrize("seed", range(6))
def test_tiny_nets_bounds_are_below_the_exact_worst_case_and_crown_is_tight(seed: int) -> None:
    net = _tiny(seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(4, 2, generator=g, dtype=torch.float64)
    y = net(x).argmax(1)
    threat = ThreatModel("linf", 0.15)
    with torch.no_grad():
        ibp = margin_bounds(net, x, y, threat, "ibp").numpy()
        crown = margin_bounds(net, x, y, threat, "crown").numpy()
    exact = np.stack([_exact_worst_margins(net, x[i].numpy(), int(y[i]), 0.15) for i in range(len(x))])
    assert np.all(ibp <= exact + 1e-9) and np.all(crown <= exact + 1e-9)
    assert np.all(crown >= ibp - 1e-12)
    gap_crown, gap_ibp = (exact - crown).mean(), (exact - ibp).mean()
    assert gap_crown <= gap_ibp
    scale = np.abs(exact).mean()
    assert gap_crown <= 0.5 * scale  # one hidden layer: CROWN's only looseness is the chord of unstable ReLUs


def test_tiny_net_with_no_unstable_neuron_is_exact() -> None:
    """ε = 0 leaves every ReLU stable, so every bound equals the margin itself."""
    net = _tiny(0)
    x = torch.rand(5, 2, dtype=torch.float64)
    y = net(x).argmax(1)
    with torch.no_grad():
        for method in ("ibp", "crown"):
            assert torch.allclose(margin_bounds(net, x, y, ThreatModel("linf", 0.0), method), _margins(net, x, y))


# ------------------------------------------------------------------ orderings


@pytest.mark.parametrize("seed", range(4))
def test_crown_ibp_with_zero_slope_is_never_looser_than_ibp(seed: int) -> None:
    """Proven for a chain of affine maps and ReLUs under ℓ∞ (the ball ∩ box is a box): with lower slope 0
    every ReLU relaxation stays inside [relu(l), relu(u)], and minimising the back-substituted linear
    function over a set is at least minimising it over that set's IBP bounding box. The raw bound, not
    the max(CROWN, IBP) that certify reports."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 10), nn.ReLU(), nn.Linear(10, 4)).eval()
    model, (x, y) = Normalized(net, [0.5], [0.3]), _data()
    inp = InputSet.around(x, ThreatModel("linf", 0.05))
    with torch.no_grad():
        graph = build_graph(model, x)
        boxes = interval_bounds(graph, inp)
        spec = margin_spec(y, 4, x.dtype)
        ibp, crown = ibp_margins(graph, boxes, spec), crown_margins(graph, boxes, spec, inp, slope="zero")
    assert bool((crown >= ibp - TOL).all())
    assert float((crown - ibp).mean()) > 0  # and strictly tighter on average


@pytest.mark.parametrize("net", list(NETS))
def test_reported_bounds_tighten_from_ibp_to_crown_ibp_to_crown(net: str) -> None:
    model, (x, y) = NETS[net](2), _data()
    threat = ThreatModel("linf", 0.03)
    res = {m: certify(model, x, y, threat, m) for m in ("ibp", "crown-ibp", "crown")}
    assert bool((res["crown-ibp"].margin_lower >= res["ibp"].margin_lower).all())
    assert res["crown"].verified_accuracy >= res["ibp"].verified_accuracy


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_verified_examples_survive_pgd(method: str) -> None:
    """Per example: verified ⇒ correct under PGD, so verified accuracy ≤ PGD accuracy ≤ clean accuracy."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.rand(300, 2)
    y = (x[:, 0] > x[:, 1]).long()
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    threat = ThreatModel("linf", 0.02)
    res = certify(net, x, y, threat, method)
    with torch.no_grad():
        pgd_ok = net(perturb(net, x, y, threat, steps=20, random_start=True)).argmax(1) == y
    assert 0.3 < res.verified_accuracy  # the check is not vacuous
    assert bool((pgd_ok | ~res.verified).all())
    assert res.verified_accuracy <= float(pgd_ok.float().mean()) <= res.clean_accuracy + 1e-9


# ------------------------------------------------------------------ API behaviour


def test_unsupported_layer_is_named() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(36, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = _data()
    with pytest.raises(ConfigError, match=r"unsupported layer Sequential\.2 \(Tanh\)"):
        certify(model, x, y, ThreatModel("linf", 0.1))


def test_certify_restores_mode_and_batchnorm_statistics_and_result_is_json() -> None:
    model, (x, y) = conv_net(0), _data()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = certify(model, x, y, ThreatModel("l2", 0.1), "crown", batch_size=4)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    out = json.loads(json.dumps(res.to_dict()))
    assert out["method"] == "crown" and out["n"] == 6 and out["threat"]["norm"] == "l2"
    assert all(out["margin_lower"][i][int(y[i])] is None for i in range(6))
    assert res.verified.shape == (6,) and res.margin_lower.shape == (6, 4)
    with pytest.raises(ConfigError, match="unknown certify method"):
        certify(model, x, y, ThreatModel("linf", 0.1), "deepz")
