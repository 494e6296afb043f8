import pytest

from mtkd.registry import Registry


def test_register_get_list():
    reg = Registry("thing")
    reg.register("b", 2)
    reg.register("a", 1)
    assert reg.get("a") == 1
    assert reg.list() == ["b", "a"]  # in the order registered (the order --help lists the choices in)
    assert "a" in reg and "c" not in reg
    assert len(reg) == 2 and list(reg) == ["b", "a"]


def test_register_as_a_decorator():
    reg = Registry("method")

    @reg.register("double")
    def double(x):
        return 2 * x

    assert reg.get("double") is double and double(2) == 4


def test_duplicate_name_raises():
    reg = Registry("thing")
    reg.register("a", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)


def test_unknown_name_lists_known_ones():
    reg = Registry("thing")
    reg.register("alpha", 1)
    reg.register("beta", 2)
    with pytest.raises(KeyError, match="unknown thing 'gamma'; known: alpha, beta"):
        reg.get("gamma")
