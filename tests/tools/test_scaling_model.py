"""The scaling model runs on the real presets and its figures are sane (the figures themselves are benchmarks)."""

from __future__ import annotations

import math

import pytest

from tools import scaling_model as sm


@pytest.fixture(scope="module")
def aag():
    return sm.workload("aag", None)


def test_table_is_monotone_and_starts_at_one(aag, capsys):
    rows = sm.table(aag, sm.Cluster(), 2 / 3)
    out = capsys.readouterr().out
    assert "ASSUMED" in out and "efficiency" in out and "SyncBN" in out
    assert [r["gpus"] for r in rows] == list(sm.GPUS)
    assert rows[0]["efficiency"] == 1.0 and rows[0]["comm_s"] == 0.0
    eff = [r["efficiency"] for r in rows]
    assert all(0 < b <= a for a, b in zip(eff, eff[1:]))
    assert all(0 <= r["exposed_s"] <= r["comm_s"] + 1e-12 for r in rows)
    for r in rows:
        assert r["grad_wire_bytes"] == pytest.approx(2 * (r["gpus"] - 1) / r["gpus"] * r["grad_bytes"])


def test_preset_sizes_come_from_the_real_models(aag):
    aasae = sm.workload("aasae", 0.05)
    assert 25e6 < aag.params < 27e6  # ResNet-50 + a linear 128-d head + the online probe
    assert aasae.params > aag.params + 10e6  # the decoder
    assert aag.zero_stage == 2 and aag.grad_bytes_per_param == 2 and aag.overlap_comm
    assert aag.contrastive_floats_per_rank == 3 * aag.micro_batch * 129 and aasae.contrastive_floats_per_rank == 0
    assert aag.step_assumed and not aasae.step_assumed and aasae.step_s == 0.05


def test_ring_cost_and_overlap():
    ring = sm.Cluster(algorithm="ring")
    alpha, bw = ring.link(4)
    assert sm.collective_s("all_reduce", 4, 1e9, ring) == pytest.approx(6 * alpha + 1.5e9 / bw)
    assert sm.collective_s("all_gather", 4, 1e9, ring) == pytest.approx(3 * alpha + 0.75e9 / bw)
    assert ring.link(16)[1] < ring.link(8)[1]  # across nodes InfiniBand bounds the ring
    tree = sm.Cluster(algorithm="tree")
    assert sm.collective_s("all_reduce", 256, 8, tree) == pytest.approx(2 * math.log2(256) * tree.link(256)[0]
                                                                        + 16 / tree.link(256)[1])
    w = sm.workload("aasae", 1.0)
    assert sm.exposed_gradient_s(w, 0.3, 0.6) == pytest.approx(0.3 / math.ceil(w.params / w.bucket_params))
    assert sm.exposed_gradient_s(w, 2.0, 0.6) > 2.0 - 0.6


@pytest.mark.slow
def test_validation_against_gloo(capsys):
    fit = sm.validate(ranks=(1, 2), sizes=(4096, 1_000_000))
    out = capsys.readouterr().out
    assert "model/meas." in out and fit["bandwidth_bytes_s"] > 0
    assert {n for n, _, _ in fit["points"]} == {1, 2}


def test_batchnorm_groups_come_from_the_presets(aag):
    """AAG shares BatchNorm statistics within a node of 8, AASAE not at all: the SyncBatchNorm term stops growing
    at one node, or is never there; over all GPUs it grows with every node added."""
    assert aag.syncbn_group == 8 and sm.workload("aasae", 0.05).syncbn_group == 1
    per_node = {r["gpus"]: r["syncbn_s"] for r in sm.table(aag, sm.Cluster(), 2 / 3)}
    assert 0 < per_node[8] == per_node[256]
    assert all(r["syncbn_s"] == 0 for r in sm.table(sm.workload("aasae", 0.05), sm.Cluster(), 2 / 3))
    everywhere = {r["gpus"]: r["syncbn_s"] for r in sm.table(sm.replace(aag, syncbn_group=0), sm.Cluster(), 2 / 3)}
    assert everywhere[8] == per_node[8] and everywhere[256] > 10 * per_node[256]


def test_what_ifs_override_every_preset(capsys):
    """--zero-stage 0: gradients all-reduced during backward and no parameter all-gather after the step, so less is
    exposed than under the presets' ZeRO 2; --syncbn-group 0 puts AASAE's BatchNorm on the critical path again."""
    presets = sm.run(["--step-time", "aag=0.0988", "--step-time", "aasae=0.0444"])
    zero0 = sm.run(["--step-time", "aag=0.0988", "--step-time", "aasae=0.0444", "--zero-stage", "0"])
    synced = sm.run(["--presets", "aasae", "--step-time", "aasae=0.0444", "--syncbn-group", "0"])
    capsys.readouterr()
    for name in ("aag", "aasae"):
        assert zero0[name][-1]["grads_exposed_s"] < presets[name][-1]["grads_exposed_s"]
        assert zero0[name][-1]["efficiency"] > presets[name][-1]["efficiency"]
    assert presets["aasae"][-1]["syncbn_s"] == 0 < synced["aasae"][-1]["syncbn_s"]
