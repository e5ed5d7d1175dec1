import robustopt


def test_public_api() -> None:
    for name in ("ThreatModel", "perturb", "load_model", "train", "TrainConfig"):
        assert hasattr(robustopt, name)
