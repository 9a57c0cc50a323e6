"""The estimate tools refuse numbers that make no sense with argparse's one line and exit 2, instead of a
ZeroDivisionError or a table of negative times: tools/scaling_model.py and tools/knn_memory.py."""

import pytest

from pipeline.arg_types import positive_int
from tools import knn_memory, scaling_model


@pytest.mark.parametrize(("argv", "says"), [
    (["--step-time", "aag=bar"], "--step-time: 'aag=bar': expected PRESET=SECONDS"),
    (["--step-time", "aag"], "--step-time: 'aag': expected PRESET=SECONDS"),
    (["--step-time", "FOO=1"], "--step-time: 'FOO=1': PRESET is one of"),
    (["--step-time", "aag=0"], "--step-time: 'aag=0': SECONDS must be a number above 0"),
    (["--step-time", "aag=inf"], "--step-time: 'aag=inf': SECONDS must be a number above 0"),
    (["--gpus-per-node", "0"], "--gpus-per-node: invalid positive int value: '0'"),
    (["--nvlink-gbs", "-1"], "--nvlink-gbs: invalid positive number value: '-1'"),
    (["--ib-gbs-per-node", "nan"], "--ib-gbs-per-node: invalid positive number value: 'nan'"),
    (["--ib-latency-us", "-3"], "--ib-latency-us: invalid number at least 0 value: '-3'"),
    (["--backward-fraction", "1.5"], "--backward-fraction: invalid fraction between 0 and 1 value: '1.5'"),
    (["--syncbn-group", "-1"], "--syncbn-group: invalid int at least 0 value: '-1'"),
])
def test_scaling_model_refuses_numbers_that_make_no_sense(argv, says, capsys):
    with pytest.raises(SystemExit) as exit:
        scaling_model.parse_args(argv)
    assert exit.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("option", ["--bank", "--queries", "--dim", "--world", "--k", "--chunk-size"])
@pytest.mark.parametrize("value", ["0", "-3", "x"])
def test_knn_memory_refuses_sizes_below_1(option, value, capsys):
    with pytest.raises(SystemExit) as exit:
        knn_memory.main([option, value])
    assert exit.value.code == 2 and f"{option}: invalid positive int value: '{value}'" in capsys.readouterr().err


def test_an_int_beyond_the_float_range_is_checked_without_overflowing():
    """math.isfinite(10**400) would raise OverflowError, which argparse shows as a traceback."""
    assert positive_int("1" + "0" * 400) == 10**400
    with pytest.raises(ValueError):
        positive_int("-1" + "0" * 400)
