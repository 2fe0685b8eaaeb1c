"""The benchmark's machinery: variants that must agree do, a disagreement is caught, the table is built."""

import itertools
import sys
import time

import pytest
import torch
from torch import nn

from privfast import throughput
from privfast.models import ConvNet
from privfast.throughput import Family, check_same_update, compare_family, format_markdown


def _tiny_cnn():
    return ConvNet(in_channels=3, num_classes=4, width=4, image_size=8, groups=2)


def _images(k, g):
    return torch.rand(3 * k, 3, 8, 8, generator=g), torch.randint(0, 4, (3 * k,), generator=g)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)

    def forward(self, ids):
        return self.head(torch.tanh(self.embed(ids)))


@pytest.mark.parametrize("k", [1, 2])
def test_variants_compute_the_same_update(k, one_thread):
    x, y = _images(k, torch.Generator().manual_seed(0))
    check_same_update(_tiny_cnn, x, y, augmult=k, variants=throughput.VARIANTS)


def test_a_variant_that_computes_another_update_is_caught(one_thread):
    counter = itertools.count()

    def drifting():  # every build differs, as a variant with a wrong update would
        torch.manual_seed(next(counter))
        return _tiny_cnn()

    x, y = _images(1, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="compute different updates"):
        check_same_update(drifting, x, y, augmult=1, variants=["privfast-materialize", "privfast-ghost"])


def test_token_families_and_the_table(monkeypatch, one_thread):
    ids = lambda k, g: (torch.randint(0, 7, (2 * k, 5), generator=g), torch.randint(0, 7, (2 * k, 5), generator=g))
    monkeypatch.setitem(throughput.FAMILIES, "tiny-lm", Family(TinyLM, ids, (1,), "tiny"))
    rows = compare_family("tiny-lm", rounds=1, memory=False, progress=False)
    by_variant = {r["variant"]: r for r in rows}
    assert set(by_variant) == set(throughput.VARIANTS)
    assert by_variant["non-private"]["vs_nonprivate"] == 1.0 == by_variant["non-private"]["paired_vs_nonprivate"]
    timed = [r for r in rows if "min_s" in r]
    assert all(r["min_s"] > 0 and r["opacus_best_over_this"] > 0 for r in timed)
    table = format_markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| tiny-lm | 1 | privfast-ghost |" in table


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        compare_family("nope")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from Linux's /proc")
def test_peak_memory_is_measured_away_from_the_timings(monkeypatch, one_thread):
    """Measuring peaks switches glibc to mmap for every block above 64 KiB, which would make the timed
    steps fault in fresh pages: the peaks come from a child process, never from this one."""

    def in_this_process(step):
        raise AssertionError("peak_bytes ran in the timing process")

    monkeypatch.setattr(throughput, "peak_bytes", in_this_process)
    rows = compare_family(
        "cnn", augmults=[1], variants=["non-private", "privfast-materialize"], rounds=1, progress=False
    )
    assert all(isinstance(r["peak_bytes"], int) and r["peak_bytes"] > 0 for r in rows)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="peak memory is read from Linux's /proc")
def test_a_variants_peak_does_not_depend_on_the_variants_measured_before_it():
    """Each variant's peak comes from a process of its own. In one shared process, materialize measured
    after auto read a third of its peak alone: auto had left memory behind and initialized what
    materialize would otherwise allocate in its first step."""
    after_auto = throughput._peaks_in_child("cnn", 1, ["privfast-auto", "privfast-materialize"], 0)
    alone = throughput._peaks_in_child("cnn", 1, ["privfast-materialize"], 0)
    assert after_auto["privfast-materialize"] == pytest.approx(alone["privfast-materialize"], rel=0.15)


def test_phase_times_puts_each_phase_where_it_runs(monkeypatch, one_thread):
    """A delay planted in the clipping, then in the noise, shows up in that phase of the private step only."""
    from privfast.grad_sample import GradSampleModule
    from privfast.optim import DPOptimizer

    monkeypatch.setitem(throughput.FAMILIES, "tiny-cnn", Family(_tiny_cnn, _images, (1,), "tiny"))
    for target, phase in ((GradSampleModule, "clip"), (DPOptimizer, "noise")):
        method = "clipped_sum" if phase == "clip" else "add_noise"
        real = getattr(target, method)

        def slow(*args, real=real, **kwargs):
            time.sleep(0.05)
            return real(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setattr(target, method, slow)
            times = throughput.phase_times("tiny-cnn", augmult=2, mode="materialize", rounds=2)
        assert set(times) == {"non-private", "privfast-materialize"}
        assert set(times["non-private"]) == {"forward", "backward", "update"}
        private = times["privfast-materialize"]
        assert set(private) == set(throughput.PHASES)
        assert private[phase] >= 0.05 and all(t < 0.05 for p, t in private.items() if p != phase)
    table = throughput.format_phases(times)
    assert table.count("\n") == len(throughput.PHASES) + 2 and "| total |" in table


def test_op_times_puts_each_operator_in_the_step_that_runs_it(monkeypatch, one_thread):
    """An operator planted in the clipping shows up in the private step's operators only, and a sleep planted
    in its forward (no operator) outside any operator, as extra time of the private step."""
    from privfast.grad_sample import GradSampleModule

    monkeypatch.setitem(throughput.FAMILIES, "tiny-cnn", Family(_tiny_cnn, _images, (1,), "tiny"))
    clipped_sum, forward = GradSampleModule.clipped_sum, GradSampleModule.forward

    def planted_op(*args, **kwargs):
        torch.linalg.cholesky(torch.eye(64, dtype=torch.float64))
        return clipped_sum(*args, **kwargs)

    def planted_sleep(*args, **kwargs):
        time.sleep(0.05)
        return forward(*args, **kwargs)

    monkeypatch.setattr(GradSampleModule, "clipped_sum", planted_op)
    monkeypatch.setattr(GradSampleModule, "forward", planted_sleep)
    times = throughput.op_times("tiny-cnn", augmult=2, mode="materialize", rounds=2)
    plain, private = times["non-private"], times["privfast-materialize"]
    assert "aten::linalg_cholesky_ex" in private and "aten::linalg_cholesky_ex" not in plain
    assert "aten::convolution_backward" in plain and "aten::convolution_backward" in private
    assert private[throughput.OUTSIDE_OPS] - plain[throughput.OUTSIDE_OPS] >= 0.05
    assert plain[throughput.OUTSIDE_OPS] < 0.05 and private["step"] >= 0.05
    table = throughput.format_op_times(times, top=3)
    lines = table.splitlines()
    assert len(lines) == 2 + 3 + 3 and lines[-1].startswith("| step |")
    assert any(line.startswith(f"| {throughput.OUTSIDE_OPS} |") and "+5" in line for line in lines)
    # By category, every operator counted once: the categories add up to the step, the sleep is Python's.
    rows = [line.split(" | ") for line in throughput.format_op_categories(times).splitlines()[2:]]
    extras = {row[0].lstrip("| "): float(row[-1].rstrip(" |")) for row in rows}
    assert len(extras) == len(throughput.OP_CATEGORIES) + 1
    step = extras.pop("step")
    assert sum(extras.values()) == pytest.approx(step, abs=0.05)
    python = next(label for label in extras if label.startswith("Python"))
    assert extras[python] >= 50 and extras[python] > 0.8 * step


def test_op_times_refuses_an_unknown_family_and_no_rounds():
    with pytest.raises(ValueError, match="unknown family"):
        throughput.op_times("nope")
    with pytest.raises(ValueError, match="rounds >= 1"):
        throughput.op_times("cnn", rounds=0)


def test_phase_times_refuses_an_unknown_family():
    with pytest.raises(ValueError, match="unknown family"):
        throughput.phase_times("nope")


def test_the_paired_ratio_compares_rounds_not_fastest_times():
    """One round in which the machine happened to be fast for the non-private step only: the ratio of
    fastest times takes that moment for the norm, the paired ratio (round by round) does not."""
    rows = [
        {"family": "f", "k": 1, "variant": "non-private", "min_s": 1.0, "times_s": [2.0, 1.0, 2.0, 2.0, 2.0]},
        {"family": "f", "k": 1, "variant": "privfast-auto", "min_s": 3.0, "times_s": [3.0, 3.0, 3.0, 3.0, 3.0]},
    ]
    throughput._add_ratios(rows)
    assert rows[1]["vs_nonprivate"] == pytest.approx(3.0)
    assert rows[1]["paired_vs_nonprivate"] == pytest.approx(1.5)
