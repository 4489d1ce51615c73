import pytest

from edgecompress.compress.methods import severity
from edgecompress.core.errors import BudgetError, UsageError
from edgecompress.costmodel.cost import predict_cost
from edgecompress.costmodel.kernels import model_graph
from edgecompress.models import get_model, list_models, load_model
from edgecompress.plan.planner import Budget, check_reachable, plan
from edgecompress.targets import get_target


@pytest.fixture(scope="module")
def facts():
    profiles, accuracies = {}, {}
    for name in list_models():
        entry = get_model(name)
        profiles[name] = model_graph(load_model(entry, 10), (1, 3, 32, 32))
        accuracies[name] = entry.test_accuracy
    return profiles, accuracies


def test_cost_model_directions(facts):
    profiles, _ = facts
    layers = profiles["resnet10t"]
    t = get_target("openvino-cpu")
    dense = predict_cost(layers, t, "fp32")
    assert predict_cost(layers, t, "fp32", channel_keep=0.5).latency_ms < dense.latency_ms
    assert predict_cost(layers, t, "int8").latency_ms < dense.latency_ms
    assert predict_cost(layers, t, "int8").memory_mb < dense.memory_mb
    assert predict_cost(layers, t, "fp32", channel_keep=0.5).params < 0.35 * dense.params


@pytest.mark.parametrize("target_name", ["ort-cpu", "openvino-cpu", "jetson-orin-nano"])
@pytest.mark.parametrize("latency_ms", [0.1, 0.3, 1.0])
def test_plan_respects_budget_and_ranks(facts, target_name, latency_ms):
    profiles, accuracies = facts
    p = plan(get_target(target_name), Budget(latency_ms=latency_ms), profiles, accuracies)
    fits = [e for e in p.ranked if e.fits]
    assert p.ranked[: len(fits)] == tuple(fits)  # everything inside the budget comes first
    assert all(e.cost.latency_ms <= latency_ms for e in fits)
    assert all(e.cost.latency_ms > latency_ms for e in p.ranked[len(fits):])
    keys = [(-e.accuracy, severity(e.candidate)) for e in fits]
    assert keys == sorted(keys)


def test_plan_memory_budget(facts):
    profiles, accuracies = facts
    p = plan(get_target("ort-cpu"), Budget(memory_mb=30.0), profiles, accuracies)
    fits = [e for e in p.ranked if e.fits]
    assert fits and len(fits) < len(p.ranked)
    assert all(e.cost.memory_mb <= 30.0 for e in fits)


def test_unreachable_budget_names_fastest(facts):
    profiles, accuracies = facts
    p = plan(get_target("openvino-cpu"), Budget(latency_ms=0.0001), profiles, accuracies)
    with pytest.raises(BudgetError, match="out of reach.*fastest candidate.*predicted at"):
        check_reachable(p)


def test_budget_over_ram(facts):
    profiles, accuracies = facts
    with pytest.raises(BudgetError, match="exceeds jetson-orin-nano's RAM"):
        plan(get_target("jetson-orin-nano"), Budget(latency_ms=1, memory_mb=9000), profiles, accuracies)


def test_no_budget(facts):
    with pytest.raises(UsageError, match="give a budget"):
        plan(get_target("ort-cpu"), Budget(), *facts)


def test_jetson_int8_and_sparsity_model(facts):
    """Unstructured sparsity is free of speed-up on dense kernels; int8 helps compute-bound convs."""
    from edgecompress.compress.methods import get_method

    profiles, accuracies = facts
    p = plan(get_target("jetson-orin-agx"), Budget(latency_ms=1.0), profiles, accuracies)
    by_id = {e.candidate.id: e for e in p.ranked}
    dense = by_id["resnet10t__dense__fp32"].cost.latency_ms
    assert by_id["resnet10t__nncf.magnitude_global-0.90__fp32"].cost.latency_ms == pytest.approx(dense)
    assert get_method("nncf.magnitude_global").channel_keep(0.9) == 1.0


@pytest.fixture(scope="module")
def accuracy_model(facts):
    from edgecompress.build import resolve_models
    from edgecompress.data.datasets import load_digits
    from edgecompress.meta.predictor import AccuracyModel

    data = load_digits(32)
    model = AccuracyModel.shipped(resolve_models((), data), data, facts[1])
    assert model is not None, "the trained predictor must ship with the package (edgecompress/zoo/predictor)"
    return model


def test_plan_with_the_meta_predictor(facts, accuracy_model):
    profiles, accuracies = facts
    p = plan(get_target("openvino-cpu"), Budget(latency_ms=0.3), profiles, accuracies, accuracy_model=accuracy_model)
    assert "meta-predictor" in p.accuracy_basis
    fits = [e for e in p.ranked if e.fits]
    assert fits
    for e in p.ranked:
        assert 0 <= e.accuracy_low <= e.accuracy <= 1
        assert e.accuracy <= e.parent_accuracy + 1e-9  # no promised gains over the parent
    keys = [(-e.accuracy, severity(e.candidate), e.cost.latency_ms) for e in fits]
    assert keys == sorted(keys)


@pytest.mark.parametrize("max_drop", [0.001, 0.01, 0.05])
def test_plan_keeps_the_accuracy_promise(facts, accuracy_model, max_drop):
    """With --max-accuracy-drop, 'fits' means the lower bound is inside it; the rest of the budget follows."""
    profiles, accuracies = facts
    p = plan(get_target("openvino-cpu"), Budget(latency_ms=0.3, max_accuracy_drop=max_drop), profiles, accuracies,
             accuracy_model=accuracy_model)
    fits = [e for e in p.ranked if e.fits]
    inside_untrusted = [e for e in p.ranked if not e.fits and e.cost.latency_ms <= 0.3]
    assert all(e.parent_accuracy - e.accuracy_low <= max_drop + 1e-9 for e in fits)
    assert all(e.parent_accuracy - e.accuracy_low > max_drop for e in inside_untrusted)
    assert p.ranked[:len(fits) + len(inside_untrusted)] == tuple(fits + inside_untrusted)
    loose = plan(get_target("openvino-cpu"), Budget(latency_ms=0.3), profiles, accuracies, accuracy_model=accuracy_model)
    assert len(fits) <= sum(e.fits for e in loose.ranked)


def test_plan_scores_an_unseen_model_from_its_features(tmp_path, facts):
    """A user's model (not in the meta-dataset) is featurized on the spot and scored by the same predictor."""
    import torch

    from edgecompress.build import model_facts, resolve_models
    from edgecompress.data.datasets import load_digits
    from edgecompress.meta.predictor import AccuracyModel

    data = load_digits(32)
    weights = tmp_path / "mine.pth"
    torch.save(load_model(get_model("lcnet_050"), 10).state_dict(), weights)
    entries = resolve_models((f"timm:lcnet_050={weights}",), data)
    profiles, accuracies = model_facts(entries, data)
    model = AccuracyModel.shipped(entries, data, accuracies)
    sweep = {"none": (0.0,), "torch_pruning.l1": (0.3,)}
    p = plan(get_target("openvino-cpu"), Budget(latency_ms=10), profiles, accuracies, sweep=sweep, accuracy_model=model)
    assert len(p.ranked) == 6 and all(0 < e.accuracy <= 1 for e in p.ranked)
    dense = {e.candidate.quant.precision: e for e in p.ranked if e.candidate.prune.method == "none"}
    pruned = {e.candidate.quant.precision: e for e in p.ranked if e.candidate.prune.method != "none"}
    assert all(pruned[k].accuracy_low <= dense[k].accuracy_low + 1e-9 for k in dense)


def test_low_rank_candidates_are_costed_from_the_factorized_graph(facts):
    from edgecompress.compress.methods import sweep_for

    profiles, accuracies = facts
    p = plan(get_target("openvino-cpu"), Budget(latency_ms=1.0), {"resnet10t": profiles["resnet10t"]}, accuracies,
             sweep=sweep_for(["lowrank"]), precisions=("fp32",))
    by_id = {e.candidate.id: e for e in p.ranked}
    dense = by_id["resnet10t__dense__fp32"].cost
    strong = by_id["resnet10t__lowrank-0.90__fp32"].cost
    assert strong.macs < 0.2 * dense.macs and strong.params < dense.params
    assert strong.latency_ms < dense.latency_ms


def test_low_rank_estimate_of_a_linear_layer_over_tokens():
    """50 tokens (not a square): the factorized pair keeps about the share of MACs asked for, from the element
    counts, not from in_hw (round(sqrt(50)) = 7, 49 positions)."""
    from edgecompress.costmodel.kernels import Kernel, ModelGraph

    rows, i, o = 50, 512, 512
    token_mlp = Kernel(name="mlp", kind="pointwise", in_channels=i, out_channels=o, kernel=1, stride=1, groups=1,
                       in_hw=7, out_hw=7, macs=rows * i * o, weights=i * o, in_elements=rows * i, out_elements=rows * o)
    head = Kernel(name="head", kind="linear", in_channels=o, out_channels=10, kernel=1, stride=1, groups=1, in_hw=1,
                  out_hw=1, macs=o * 10, weights=o * 10, in_elements=o, out_elements=10)
    first, last, _ = ModelGraph((token_mlp, head), rows * o).low_rank(0.5).kernels
    assert first.out_channels == last.in_channels == 128  # 0.5 * 50 * 512 * 512 / (50 * 1024); 130 from 49 positions
    assert first.macs + last.macs == token_mlp.macs // 2


def test_budget_is_one_check():
    """Budget.violation is the one budget check: each limit, only the figures given, and the reason in one line."""
    budget = Budget(latency_ms=1.0, memory_mb=10.0, max_accuracy_drop=0.02)
    assert budget.admits(latency_ms=1.0, memory_mb=10.0, accuracy_drop=0.02)
    assert budget.violation(latency_ms=1.2) == "latency (p90) 1.200 ms > budget 1 ms"
    assert Budget(latency_ms=1.0, latency_stat="p99").measured_latency_ms({"latency_ms_p99": 2.0, "latency_ms_p90": 1.0}) == 2.0
    with pytest.raises(UsageError, match="latency statistic"):
        Budget(latency_ms=1.0, latency_stat="mean")
    assert budget.violation(memory_mb=12.0) == "memory 12.0 MB > budget 10 MB"
    assert budget.violation(accuracy_drop=0.03) == "accuracy drop 3.00 pp > allowed 2.00 pp"
    assert budget.admits(latency_ms=None, memory_mb=None)  # nothing given, nothing checked
    assert Budget(latency_ms=1.0).admits(memory_mb=1e9, accuracy_drop=1.0)  # no memory or accuracy limit


def test_faster_leads_among_accuracies_the_test_split_cannot_tell_apart():
    """resnet10t dense fp32 and fp16 are predicted equal to a few digits: the faster must lead, and a faster
    candidate more than one test image less accurate must not."""
    from edgecompress.compress.methods import Candidate, PruneSpec, QuantSpec
    from edgecompress.costmodel.cost import CostPrediction
    from edgecompress.plan.planner import Budget, Estimate, rank

    def est(precision, accuracy, latency, method="none", ratio=0.0):
        cand = Candidate(model="m", prune=PruneSpec(method=method, ratio=ratio), quant=QuantSpec(precision=precision))
        return Estimate(cand, CostPrediction(latency, 1.0, 1.0, 1, 1), accuracy, False, accuracy, 0.9972)

    estimates = [est("fp32", 0.99720001, 0.24), est("fp16", 0.9972, 0.186),
                 est("fp16", 0.9900, 0.10, "torch_pruning.l1", 0.7)]
    budget = Budget(latency_ms=10.0)
    assert [e.candidate.quant.precision for e in rank(estimates, budget)][:2] == ["fp32", "fp16"]  # exact order
    ranked = rank(estimates, budget, accuracy_resolution=1 / 360)
    assert [(e.candidate.quant.precision, e.candidate.prune.method) for e in ranked] == [
        ("fp16", "none"), ("fp32", "none"), ("fp16", "torch_pruning.l1")]


def test_a_candidate_the_meta_dataset_measured_exactly_is_planned_with_its_measurement(facts):
    """The plan reads the meta-dataset's measured accuracy where a row measured exactly what the build would make:
    same data, zoo checkpoint, method settings and fine-tuning recipe, and for int8 the target's own preset. Anything
    else is predicted."""
    import dataclasses

    from edgecompress.build import resolve_models
    from edgecompress.compress.methods import Candidate, FinetuneSpec, PruneSpec, QuantSpec
    from edgecompress.data.datasets import load_digits
    from edgecompress.meta.collect import current_rows, read_rows
    from edgecompress.meta.predictor import MEASURED_REBUILD_MARGIN, AccuracyModel, shipped_meta_dataset

    data = load_digits(32)
    entries, accuracies = resolve_models((), data), facts[1]
    fingerprint = data.fingerprint()
    rows = [r for r in current_rows(read_rows(shipped_meta_dataset())) if r["dataset"] == fingerprint
            and r["method"] == "torch_pruning.l1" and r["model"] == "resnet10t" and r["ratio"] == 0.5]
    by_precision = {r["precision"]: r for r in rows}
    assert {"fp32", "int8"} <= set(by_precision), "the shipped meta-dataset measures resnet10t L1 0.5 on the digits"
    cand = lambda precision: Candidate(model="resnet10t", prune=PruneSpec(method="torch_pruning.l1", ratio=0.5),  # noqa: E731
                                       quant=QuantSpec(precision=precision))
    parent = accuracies["resnet10t"]

    openvino = AccuracyModel.shipped(entries, data, accuracies, target=get_target("openvino-cpu"))
    assert openvino.measured(cand("fp32")) == min(by_precision["fp32"]["accuracy"], parent)
    assert openvino.measured(cand("int8")) == min(by_precision["int8"]["accuracy"], parent)  # the row's preset
    expected, lower = openvino([cand("fp32")])
    assert expected[0] == openvino.measured(cand("fp32"))
    assert lower[0] == pytest.approx(expected[0] - MEASURED_REBUILD_MARGIN)
    assert "1 of 1 candidates measured exactly" in openvino.basis

    # Not the same build: another int8 preset (ONNX Runtime's), another recipe, a user's copy of the checkpoint.
    ort = AccuracyModel.shipped(entries, data, accuracies, target=get_target("ort-cpu"))
    assert ort.measured(cand("fp32")) is not None and ort.measured(cand("int8")) is None
    short = AccuracyModel.shipped(entries, data, accuracies, finetune=FinetuneSpec(steps=10),
                                  target=get_target("openvino-cpu"))
    assert short.measured(cand("fp32")) is None
    short([cand("fp32")])
    assert "measured exactly" not in short.basis
    user = {**entries, "resnet10t": dataclasses.replace(entries["resnet10t"], source="user")}
    assert AccuracyModel.shipped(user, data, accuracies, target=get_target("openvino-cpu")).measured(cand("fp32")) is None
    # Another checkpoint under the zoo's name: its parent accuracy is not the row's.
    other = {**accuracies, "resnet10t": parent - 0.01}
    assert AccuracyModel.shipped(entries, data, other, target=get_target("openvino-cpu")).measured(cand("fp32")) is None
