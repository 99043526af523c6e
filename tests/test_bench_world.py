"""Tests of bench_world.py, bench.py's --world mode (CPU, seconds): two gloo processes, timed, and the
collectives of one iteration counted, ours against the released schedule's."""
import json

import bench
from helpers import BENCH_TINY as TINY


def test_world_times_synchronised_processes_and_counts_their_collectives(capsys):
    # Two gloo processes, one iteration per side. Our per-slot BatchNorm makes one collective per layer
    # and direction for all N slots; the released schedule, one call per slot, N times as many.
    result = bench.main([*TINY, "--img_size", "16", "--world", "2", "--steps", "1", "--repeats", "1", "--warmup", "0"])
    assert result["mode"] == "world" and result["single_ms"] > 0 and result["world_ms"] > 0
    ours, released = (result["collectives_per_iteration"][k] for k in ("ours", "released"))
    assert ours["batchnorm"] > 0 and released["batchnorm"] == 2 * ours["batchnorm"]          # N = 2
    # NT-Xent's gathers, forward and backward (the masker step's clean side has no gradient). Released: 2 per
    # slot and step forward, 2 per slot back in the encoder step, 1 in the masker step: 7N. Ours: the clean
    # side once per step: N + 1 per step forward, N + 1 back in the encoder step, N in the masker step: 4N + 3.
    assert released["simclr_negatives"] == 7 * 2 and ours["simclr_negatives"] == 4 * 2 + 3
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["collectives_per_iteration"] == result["collectives_per_iteration"]
