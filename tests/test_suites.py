"""The asv suites import and declare their benchmarks (asv discovers them by importing each module;
a module that fails to import fails the whole asv run)."""

import importlib
import pkgutil

import pytest
import torch

import suites
from bk.model import LanguageModel, ModelConfig
from tests.strategies import FakeClock

MODULES = sorted(m.name for m in pkgutil.iter_modules(suites.__path__))


def test_every_suite_module_is_found():
    assert {"bench_ceilings", "bench_core", "bench_decode", "bench_model",
            "bench_techniques"} <= set(MODULES)


@pytest.mark.parametrize("name", MODULES)
def test_a_suite_module_imports_and_every_parameterised_class_names_its_parameters(name):
    module = importlib.import_module(f"suites.{name}")
    classes = [v for v in vars(module).values()
               if isinstance(v, type) and v.__module__ == module.__name__]
    for cls in classes:
        if hasattr(cls, "params"):
            params = cls.params if isinstance(cls.params[0], list) else [cls.params]
            assert len(params) == len(cls.param_names), cls.__name__
            assert all(len(p) > 0 for p in params), f"{cls.__name__} has an empty parameter"


def test_the_forward_anatomy_gives_each_part_exactly_its_time_and_the_residual_sum_to_rest():
    """Each method the anatomy times costs a known time on a fake clock (the fused combine, run
    with a residual, would cost far more than its gated part alone): every share is exact, the
    residual sum is no part of the dispatch, and the instrumented logits are the model's."""
    bench_model = importlib.import_module("suites.bench_model")
    torch.manual_seed(0)
    net = LanguageModel(ModelConfig(n_layers=2)).eval()
    clock = FakeClock()

    def costing(owner, name, cost, fused_cost=None):
        method = getattr(owner, name)

        def call(*args, **kwargs):
            fused = fused_cost is not None and (len(args) > 2 or "residual" in kwargs)
            clock.advance(fused_cost if fused else cost)
            return method(*args, **kwargs)

        setattr(owner, name, call)

    for block in net.blocks:
        for name, cost in (("route", 1.0), ("sort", 5.0), ("stacked_weights", 19.0),
                           ("expert_outputs", 7.0), ("resolvent", 13.0)):
            costing(block.moe if name != "resolvent" else block, name, cost)
        costing(block.moe, "combine", 5.0, fused_cost=100.0)
        costing(block.potential, "forward", 11.0)
        costing(block.readout, "forward", 17.0)
    shares = bench_model.anatomy(net, torch.randint(0, 128, (2, 16)), repeats=2, timer=clock)
    total = 2 * (1 + 5 + 5 + 7 + 11 + 13 + 17 + 19)
    assert shares == pytest.approx({"router": 100 * 2 / total, "dispatch": 100 * 58 / total,
                                    "experts": 100 * 14 / total, "bk_path": 100 * 82 / total,
                                    "rest": 0.0})
