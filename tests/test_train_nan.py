"""A run whose loss becomes NaN/inf stops at once, naming the iteration and the loss term(s)."""

from __future__ import annotations

import re

import pytest
import train_helpers

from dinat_m2f.engine import NonFiniteLossError


def test_diverging_run_stops_naming_iteration_and_term(tmp_path):
    import train_net

    train_helpers.make_tiny_dataset(str(tmp_path / "datasets"))
    argv = ["--config-file", train_helpers.DEMO_CONFIG, *train_helpers.TINY_OPTS]
    # An absurd learning rate without clipping: the first step blows the weights up, the next loss is not finite.
    argv += ["SOLVER.BASE_LR", "1e8", "SOLVER.WARMUP_ITERS", "0", "SOLVER.CLIP_GRADIENTS.ENABLED", "False"]
    argv += ["SOLVER.MAX_ITER", "20", "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", str(tmp_path / "out")]
    with pytest.raises(NonFiniteLossError) as info:
        train_net.main(train_net.argument_parser().parse_args(argv))
    message = str(info.value)
    match = re.search(r"non-finite (?:loss|predictions) at iteration (\d+): ", message)
    assert match, message
    assert int(match.group(1)) >= 1  # iteration 0 was finite: the guard names the one that was not
    assert re.search(r"loss_(ce|mask|dice)", message), message  # names the loss term(s) affected
    assert not (tmp_path / "out" / "model_final.pth").exists()
