"""The asv suites import and declare their benchmarks (asv discovers them by importing each module;
a module that fails to import fails the whole asv run)."""

import importlib
import pkgutil

import pytest

import suites

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
