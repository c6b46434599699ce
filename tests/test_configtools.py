from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import pytest
import yaml

from sdlora.configtools import ConfigError, apply_overrides, diff, dump_yaml, from_dict, load_yaml, to_dict


@dataclass(frozen=True)
class Adapter:
    rank: int = 10
    init_magnitude: float = 1.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"rank must be positive, got {self.rank}")


@dataclass(frozen=True)
class Method:
    name: Literal["sdlora", "seq_lora"] = "sdlora"
    adapter: Adapter = field(default_factory=Adapter)
    ranks: list[int] | None = None
    extra: dict[str, int | float | str | bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Experiment:
    seed: int  # required
    lr: float = 0.01
    amp: bool = False
    method: Method = field(default_factory=Method)
    schedule: dict[str, Method] = field(default_factory=dict)
    anything: Any = None
    pair: tuple[int, str] = (0, "a")
    teacher: Adapter | None = None
    derived: int = field(default=0, init=False)


# ---------------------------------------------------------------------------------------------------- from_dict


def test_from_dict_nested_and_conversions():
    cfg = from_dict(
        Experiment,
        {
            "seed": 1,
            "lr": 1,  # int accepted for float
            "method": {"name": "seq_lora", "adapter": {"rank": 4, "targets": ["q"]}, "ranks": [3, 2]},
            "pair": [5, "b"],
            "anything": {"free": [1]},
        },
    )
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.method.name == "seq_lora"
    assert cfg.method.adapter == Adapter(rank=4, targets=("q",))
    assert isinstance(cfg.method.adapter.targets, tuple)
    assert cfg.method.ranks == [3, 2]
    assert cfg.pair == (5, "b")
    assert cfg.anything == {"free": [1]}
    assert cfg.method.adapter.init_magnitude == 1.0  # default kept


def test_union_of_scalars_keeps_exact_type():
    cfg = from_dict(Method, {"extra": {"a": 3, "b": 0.5, "c": "x", "d": True}})
    assert [type(v) for v in cfg.extra.values()] == [int, float, str, bool]
    with pytest.raises(ConfigError, match=r"extra\.e: expected int \| float \| str \| bool"):
        from_dict(Method, {"extra": {"e": [1]}})


def test_unknown_key_names_full_path_and_suggests():
    with pytest.raises(ConfigError) as exc:
        from_dict(Experiment, {"seed": 0, "method": {"adapter": {"rnak": 4}}})
    err = exc.value
    assert err.path == "method.adapter.rnak"
    msg = str(err)
    assert msg.startswith("method.adapter.rnak: unknown key 'rnak'")
    assert "did you mean 'rank'" in msg
    assert "init_magnitude" in msg  # lists the valid keys


def test_init_false_field_is_not_a_key():
    with pytest.raises(ConfigError, match="unknown key 'derived'"):
        from_dict(Experiment, {"seed": 0, "derived": 3})


@pytest.mark.parametrize(
    ("data", "path", "expected"),
    [
        ({"seed": "1"}, "seed", "expected int, got '1' (str)"),
        ({"seed": True}, "seed", "expected int, got True (bool)"),
        ({"seed": 1.0}, "seed", "expected int, got 1.0 (float)"),
        ({"seed": 0, "amp": 1}, "amp", "expected bool, got 1 (int)"),
        ({"seed": 0, "amp": "true"}, "amp", "expected bool"),
        ({"seed": 0, "lr": True}, "lr", "expected float, got True (bool)"),
        ({"seed": 0, "lr": "1e-3"}, "lr", "expected float"),
        ({"seed": 0, "method": {"name": "ewc"}}, "method.name", "expected one of 'sdlora', 'seq_lora', got 'ewc'"),
        ({"seed": 0, "method": {"ranks": [1, "x"]}}, "method.ranks[1]", "expected int"),
        ({"seed": 0, "method": {"ranks": 5}}, "method.ranks", "expected list[int] | null, got 5 (int)"),
        ({"seed": 0, "method": 3}, "method", "expected a mapping for section Method"),
        ({"seed": 0, "pair": [1]}, "pair", "with 2 items"),
        ({"seed": 0, "teacher": 3}, "teacher", "expected mapping (Adapter) | null, got 3 (int)"),
        ({"seed": 0, "teacher": {"rank": 1.5}}, "teacher.rank", "expected int, got 1.5 (float)"),
        ({"seed": 0, "schedule": {"t1": {"adapter": {"rank": "r"}}}}, "schedule.t1.adapter.rank", "expected int"),
    ],
)
def test_wrong_types_report_path_expected_and_received(data, path, expected):
    with pytest.raises(ConfigError) as exc:
        from_dict(Experiment, data)
    assert exc.value.path == path
    assert expected in str(exc.value)


def test_missing_required_field():
    with pytest.raises(ConfigError) as exc:
        from_dict(Experiment, {"lr": 0.1})
    assert exc.value.path == "seed"
    assert "missing required key" in str(exc.value)


def test_post_init_error_is_prefixed_with_section_path():
    with pytest.raises(ConfigError) as exc:
        from_dict(Experiment, {"seed": 0, "method": {"adapter": {"rank": 0}}})
    assert exc.value.path == "method.adapter"
    assert str(exc.value) == "method.adapter: rank must be positive, got 0"
    assert isinstance(exc.value, ValueError)
    # same inside an optional section: the __post_init__ message must not be replaced by a generic type error
    with pytest.raises(ConfigError) as exc:
        from_dict(Experiment, {"seed": 0, "teacher": {"rank": -1}})
    assert str(exc.value) == "teacher: rank must be positive, got -1"


def test_from_dict_rejects_non_mapping_and_non_dataclass():
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(Experiment, [1, 2])
    with pytest.raises(TypeError):
        from_dict(dict, {})


def test_unsupported_annotation_is_a_type_error():
    @dataclass
    class Bad:
        s: set[int] = field(default_factory=set)

    with pytest.raises(TypeError, match="unsupported annotation"):
        from_dict(Bad, {"s": [1]})


# ---------------------------------------------------------------------------------------------------- to_dict


def test_to_dict_round_trip_and_plain_types():
    cfg = Experiment(
        seed=3,
        method=Method(name="seq_lora", adapter=Adapter(rank=2, targets=("q", "k")), ranks=[1], extra={"a": 1.5}),
        schedule={"t2": Method(adapter=Adapter(rank=7))},
        pair=(9, "z"),
        teacher=Adapter(rank=1),
    )
    data = to_dict(cfg)
    assert data["method"]["adapter"]["targets"] == ["q", "k"]  # tuple -> list
    assert data["pair"] == [9, "z"]
    assert "derived" not in data
    assert from_dict(Experiment, data) == cfg
    # through YAML text too, as the run directory stores it
    assert from_dict(Experiment, load_yaml_text(dump_yaml(data))) == cfg


def load_yaml_text(text: str) -> dict:
    # plain safe_load: the dumped YAML must be readable by any YAML tool, not only by our loader
    return yaml.safe_load(text)


# ---------------------------------------------------------------------------------------------------- overrides


def test_overrides_parse_yaml_values():
    out = apply_overrides(
        {"method": {"adapter": {"rank": 10}}},
        ["lr=1e-3", "amp=true", "method.ranks=[10,8,6]", "anything=null", "seed=5E-4", "method.name=seq_lora"],
    )
    assert out["lr"] == 0.001 and isinstance(out["lr"], float)
    assert out["seed"] == 0.0005
    assert out["amp"] is True
    assert out["method"]["ranks"] == [10, 8, 6]
    assert out["anything"] is None
    assert out["method"]["name"] == "seq_lora"
    assert out["method"]["adapter"] == {"rank": 10}


def test_overrides_do_not_mutate_input_and_create_intermediate_dicts():
    data = {"method": {"adapter": {"rank": 10}}}
    out = apply_overrides(data, ["method.adapter.rank=4", "schedule.t1.adapter.rank=2"], cls=Experiment)
    assert data == {"method": {"adapter": {"rank": 10}}}
    assert out["method"]["adapter"]["rank"] == 4
    assert out["schedule"] == {"t1": {"adapter": {"rank": 2}}}
    cfg = from_dict(Experiment, {"seed": 0, **out})
    assert cfg.schedule["t1"].adapter.rank == 2


def test_override_later_wins_and_replaces_null_section():
    out = apply_overrides({"method": None}, ["method.adapter.rank=3", "method.adapter.rank=4"], cls=Experiment)
    assert out == {"method": {"adapter": {"rank": 4}}}


def test_override_unknown_key_with_schema_suggests():
    with pytest.raises(ConfigError) as exc:
        apply_overrides({}, ["method.adapter.rnak=4"], cls=Experiment)
    assert exc.value.path == "method.adapter.rnak"
    assert "did you mean 'rank'" in str(exc.value)
    # without a schema the same key is accepted (from_dict will catch it later)
    assert apply_overrides({}, ["method.adapter.rnak=4"]) == {"method": {"adapter": {"rnak": 4}}}


def test_override_type_checked_with_schema():
    with pytest.raises(ConfigError, match=r"method\.adapter\.rank: expected int, got 'four' \(str\)"):
        apply_overrides({}, ["method.adapter.rank=four"], cls=Experiment)
    with pytest.raises(ConfigError, match="'seed' is a value of type int"):
        apply_overrides({}, ["seed.x=1"], cls=Experiment)


@pytest.mark.parametrize("item", ["lr", "=3", "a..b=1", "method.=1"])
def test_malformed_override(item):
    with pytest.raises(ConfigError, match="malformed override"):
        apply_overrides({}, [item])


def test_override_through_scalar_and_bad_yaml():
    with pytest.raises(ConfigError, match="'lr' holds 0.1"):
        apply_overrides({"lr": 0.1}, ["lr.x=1"])
    with pytest.raises(ConfigError, match="cannot parse the value"):
        apply_overrides({}, ["ranks=[1,2"])


# ---------------------------------------------------------------------------------------------------- YAML files


def test_load_yaml_floats_and_mapping(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("seed: 1\nlr: 1e-3\nwd: 5E-4\nneg: -2e+2\nname: 1e3x\nmethod:\n  ranks: [10, 8]\n")
    data = load_yaml(p)
    assert data["lr"] == 0.001 and isinstance(data["lr"], float)
    assert data["wd"] == 0.0005
    assert data["neg"] == -200.0
    assert data["name"] == "1e3x"  # not a number: stays a string
    assert data["method"] == {"ranks": [10, 8]}


def test_load_yaml_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found.*nope.yaml"):
        load_yaml(missing)

    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid YAML at line \d+"):
        load_yaml(bad)

    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: top level must be a mapping"):
        load_yaml(top)

    dup = tmp_path / "dup.yaml"
    dup.write_text("lr: 0.1\nseed: 0\nlr: 0.2\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml.*line 3.*duplicate key 'lr'"):
        load_yaml(dup)

    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    assert load_yaml(empty) == {}


def test_dump_yaml_keeps_order_and_round_trips(tmp_path):
    data = {"seed": 0, "lr": 1e-05, "method": {"name": "sdlora", "ranks": [10, 8, 6], "adapter": {"rank": 10}}}
    text = dump_yaml(data, tmp_path / "out.yaml")
    assert text.splitlines()[:3] == ["seed: 0", "lr: 1.0e-05", "method:"]
    assert "ranks: [10, 8, 6]" in text
    assert load_yaml(tmp_path / "out.yaml") == data
    assert (tmp_path / "out.yaml").read_text() == text
    # dataclass instances are accepted directly
    assert load_yaml_text(dump_yaml(Experiment(seed=2)))["seed"] == 2


# ---------------------------------------------------------------------------------------------------- diff


def test_diff_lists_changed_paths():
    a = {"seed": 0, "lr": 0.1, "method": {"adapter": {"rank": 10}, "ranks": [1, 2]}, "amp": False, "gone": 1}
    b = {"seed": 0, "lr": 0.01, "method": {"adapter": {"rank": 8}, "ranks": [1, 2]}, "amp": 0, "new": "x"}
    assert diff(a, b) == [
        "lr: 0.1 -> 0.01",
        "method.adapter.rank: 10 -> 8",
        "amp: False -> 0",
        "gone: 1 -> <missing>",
        "new: <missing> -> 'x'",
    ]


def test_diff_equal_configs_and_values():
    a = to_dict(Experiment(seed=1))
    assert diff(a, to_dict(Experiment(seed=1))) == []
    assert diff({"x": 1}, {"x": 1.0}) == []
    assert diff({"x": float("nan")}, {"x": float("nan")}) == []
    assert diff({"r": [1, 2]}, {"r": [1, 3]}) == ["r: [1, 2] -> [1, 3]"]
    assert diff({"s": {"a": 1}}, {"s": None}) == ["s: {a: 1} -> null"]


def test_config_error_is_value_error_with_path():
    err = ConfigError("boom", "a.b")
    assert isinstance(err, ValueError)
    assert (err.path, str(err)) == ("a.b", "a.b: boom")


@dataclass
class _Floats:
    lr: float = 0.1
    clip: float | None = None
    either: int | float = 1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_are_refused_in_every_float_field(bad):
    for key, message in (
        ("lr", "expected a finite number, got"),
        ("clip", "expected a finite number or null, got"),
        ("either", "expected a finite number, got"),
    ):
        with pytest.raises(ConfigError, match=rf"^{key}: {message}"):
            from_dict(_Floats, {key: bad})
    with pytest.raises(ConfigError, match=r"^method\.extra\.x: "):  # inside a union of scalars in a mapping
        from_dict(Experiment, {"seed": 1, "method": {"extra": {"x": bad}}})
    assert from_dict(_Floats, {"lr": 3, "clip": 1e-3, "either": 2.5}) == _Floats(3.0, 1e-3, 2.5)
