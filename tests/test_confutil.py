"""Tests of the generic config engine (cat_titan/confutil.py) on small local schemas."""

from __future__ import annotations

import enum
import pickle
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest
import yaml

from cat_titan import confutil
from cat_titan.confutil import (
    ABSENT,
    ConfigError,
    apply_overrides,
    check,
    describe,
    diff,
    dump_yaml,
    field_docs,
    from_dict,
    load,
    read_yaml,
    replace_path,
    to_dict,
    undocumented,
)


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


@dataclass
class Optim:
    """Optimizer settings."""

    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple[float, ...] = (0.9, 0.95)
    """Adam betas."""
    groups: dict[str, float] = field(default_factory=dict)
    """Per-group learning-rate multipliers."""


@dataclass
class Inner:
    depth: int = 2
    """How deep the inner section goes."""


@dataclass
class Model:
    """Model shape."""

    dim: int = 64
    """Width of the residual stream.
    Must be divisible by n_heads."""
    n_heads: int = 4
    """Attention heads."""
    layer_pattern: list[str] = field(default_factory=lambda: ["cat", "dense"])
    """Layer kinds, bottom to top."""
    kind: Literal["cat", "dense"] = "cat"
    """Architecture family."""
    mode: Mode = Mode.FAST
    """An enum field."""
    inner: Inner = field(default_factory=Inner)
    """A section two levels down."""

    def validate(self) -> list[str]:
        out = []
        if self.dim % self.n_heads:
            out.append(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        return out


@dataclass
class Training:
    steps: int = 10
    """Optimizer steps."""
    warmup: int = 0
    """Warmup steps."""
    compile: bool = False
    """Use torch.compile."""
    seed: Optional[int] = None
    """Seed; None picks one."""

    def validate(self) -> list[str]:
        # Uses a full dotted name: must not be prefixed twice.
        return ["training.warmup must not exceed steps"] if self.warmup > self.steps else []


@dataclass
class Job:
    name: str = "run"
    """Run name."""
    run_dir: Optional[str] = None
    """Where everything goes."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags."""


@dataclass
class Config:
    """Root."""

    job: Job = field(default_factory=Job)
    """Job identity and output."""
    model: Model = field(default_factory=Model)
    """Model architecture."""
    training: Training = field(default_factory=Training)
    """Training loop."""
    optimizer: Optim = field(default_factory=Optim)
    """Optimizer."""

    def validate(self) -> list[str]:
        return ["training.steps must be > 0"] if self.training.steps <= 0 else []


def errors_of(excinfo: pytest.ExceptionInfo[ConfigError]) -> list[str]:
    return excinfo.value.errors


# ------------------------------------------------------------------ from_dict


def test_defaults_and_nested_values() -> None:
    cfg = from_dict(Config, {"model": {"dim": 128, "inner": {"depth": 5}}, "optimizer": {"lr": 1}})
    assert cfg.model.dim == 128 and cfg.model.n_heads == 4
    assert cfg.model.inner.depth == 5
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)  # int accepted for float
    assert cfg.training == Training()
    assert cfg.optimizer.betas == (0.9, 0.95)


def test_all_errors_at_once_numbered() -> None:
    data = {
        "training": {"stpes": 3, "steps": "ten", "compile": 1},
        "model": {"dim": True, "kind": "catt", "mode": "medium"},
        "job": {"name": None},
        "optimzer": {},
    }
    with pytest.raises(ConfigError) as ei:
        from_dict(Config, data)
    errs = errors_of(ei)
    assert "unknown key 'training.stpes' (did you mean 'training.steps'?)" in errs
    assert "training.steps: expected int, got str 'ten'" in errs
    assert "training.compile: expected bool, got int 1" in errs  # int-for-bool rejected
    assert "model.dim: expected int, got bool True" in errs  # bool-for-int rejected
    assert "model.kind: expected one of 'cat', 'dense', got str 'catt' (did you mean 'cat'?)" in errs
    assert any(e.startswith("model.mode: expected one of 'fast', 'slow'") for e in errs)
    assert "job.name: expected str, got null; remove the key to use the default run" in errs
    assert "unknown key 'optimzer' (did you mean 'optimizer'?)" in errs
    assert len(errs) == 8
    msg = str(ei.value)
    assert msg.startswith("8 problems in config:")
    assert "\n  1. " in msg and "\n  8. " in msg


def test_unknown_key_without_close_match_lists_valid_keys() -> None:
    with pytest.raises(ConfigError) as ei:
        from_dict(Config, {"training": {"zzz": 1}})
    assert errors_of(ei) == [
        "unknown key 'training.zzz' "
        "(valid keys of section 'training': steps, warmup, compile, seed)"
    ]


def test_container_and_section_type_errors() -> None:
    with pytest.raises(ConfigError) as ei:
        from_dict(
            Config,
            {
                "model": {"layer_pattern": ["cat", 3]},
                "optimizer": {"betas": "0.9", "groups": {"emb": "x"}},
                "training": 5,
                "job": {"tags": "a"},
            },
        )
    errs = errors_of(ei)
    assert (
        "model.layer_pattern[1]: expected str, got int 3 (quote it in YAML to make it a string)"
        in errs
    )
    assert "optimizer.betas: expected tuple[float, ...], got str '0.9'" in errs
    assert "optimizer.groups.emb: expected float, got str 'x'" in errs
    assert "training: expected a mapping (section Training), got int 5" in errs
    assert "job.tags: expected list[str], got str 'a'" in errs


def test_enum_by_value_or_name_and_optional_none() -> None:
    assert from_dict(Model, {"mode": "slow"}).mode is Mode.SLOW
    assert from_dict(Model, {"mode": "SLOW"}).mode is Mode.SLOW
    assert from_dict(Training, {"seed": None}).seed is None


def test_required_fields_and_path_prefix() -> None:
    @dataclass
    class Req:
        a: int
        """Required."""
        b: int = 1
        """Optional."""

    with pytest.raises(ConfigError) as ei:
        from_dict(Req, {}, path="sec")
    assert errors_of(ei) == ["sec.a: missing required key (int)"]
    assert from_dict(Req, {"a": 3}) == Req(a=3, b=1)


def test_fixed_tuple_and_union() -> None:
    @dataclass
    class U:
        pair: tuple[int, str] = (1, "a")
        """A pair."""
        either: int | Literal["auto"] = "auto"
        """An int or 'auto'."""

    assert from_dict(U, {"pair": [2, "b"], "either": 4}) == U((2, "b"), 4)
    with pytest.raises(ConfigError) as ei:
        from_dict(U, {"pair": [1, "a", 3], "either": "never"})
    assert errors_of(ei) == [
        "pair: expected 2 items (tuple[int, str]), got 3",
        "either: expected int | 'auto', got str 'never'",
    ]


# ------------------------------------------------------------------ overrides


def test_override_parsing_per_type() -> None:
    data = apply_overrides(
        {},
        [
            "optimizer.lr=3e-4",
            "model.layer_pattern=[cat,cat,dense]",
            "model.kind=dense",
            "model.mode=SLOW",
            "training.compile=yes",
            "training.seed=null",
            "job.name=123",
            "job.run_dir=/tmp/x",
            "model.inner.depth=7",
            "optimizer.betas=[0.8, 1e-2]",
            "optimizer.groups.emb=0.5",
            "job.tags=[1, yes, x]",
        ],
        Config,
    )
    cfg = from_dict(Config, data)
    assert cfg.optimizer.lr == pytest.approx(3e-4) and isinstance(cfg.optimizer.lr, float)
    assert cfg.model.layer_pattern == ["cat", "cat", "dense"]
    assert cfg.model.kind == "dense"
    assert cfg.model.mode is Mode.SLOW
    assert cfg.training.compile is True
    assert cfg.training.seed is None
    assert cfg.job.name == "123"  # str fields keep the raw text
    assert cfg.job.run_dir == "/tmp/x"
    assert cfg.model.inner.depth == 7
    assert cfg.optimizer.betas == (0.8, 0.01)
    assert cfg.optimizer.groups == {"emb": 0.5}
    assert cfg.job.tags == ["1", "yes", "x"]  # scalar text kept for list[str] items


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("true", True), ("False", False), ("1", True), ("0", False), ("yes", True), ("no", False)],
)
def test_override_bool_words(raw: str, expected: bool) -> None:
    data = apply_overrides({}, [f"training.compile={raw}"], Config)
    assert from_dict(Config, data).training.compile is expected


def test_override_str_keeps_yaml_looking_text() -> None:
    data = apply_overrides({}, ["job.name=a: b #c", "job.run_dir=null"], Config)
    assert data == {"job": {"name": "a: b #c", "run_dir": None}}


def test_override_errors_collected() -> None:
    errs: list[str] = []
    apply_overrides(
        {},
        [
            "foo",
            "=3",
            "training.stpes=3",
            "training.steps.x=1",
            "model.layer_pattern=[a,",
            "training.steps=5",
        ],
        Config,
        errors=errs,
    )
    assert errs[0] == "bad override 'foo': expected key.path=value, e.g. training.steps=100"
    assert errs[1] == "bad override '=3': expected key.path=value, e.g. training.steps=100"
    assert errs[2] == (
        "override 'training.stpes=3': "
        "unknown key 'training.stpes' (did you mean 'training.steps'?)"
    )
    assert errs[3] == (
        "override 'training.steps.x=1': "
        "'training.steps' is a value (int), not a section; it has no key 'x'"
    )
    assert errs[4].startswith(
        "override 'model.layer_pattern=[a,': cannot parse the value at line 1"
    )
    assert len(errs) == 5
    with pytest.raises(ConfigError):
        apply_overrides({}, ["foo"], Config)


def test_override_bad_values_reported_by_build() -> None:
    overrides = ["training.steps=ten", "training.compile=maybe", "model.kind=mlp"]
    data = apply_overrides({}, overrides, Config)
    with pytest.raises(ConfigError) as ei:
        from_dict(Config, data)
    assert errors_of(ei) == [
        "model.kind: expected one of 'cat', 'dense', got str 'mlp'",
        "training.steps: expected int, got str 'ten'",
        "training.compile: expected bool, got str 'maybe'",
    ]


def test_override_does_not_mutate_input_and_last_wins() -> None:
    data = {"training": {"steps": 1}}
    out = apply_overrides(data, ["training.steps=2", "training.steps=3"], Config)
    assert data == {"training": {"steps": 1}}
    assert out == {"training": {"steps": 3}}


# ------------------------------------------------------------------ load


def test_precedence_override_beats_file_beats_default(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  steps: 100\n  warmup: 5\noptimizer:\n  lr: 3e-4\n")
    cfg = load(Config, path, ["training.steps=200"])
    assert cfg.training.steps == 200  # override > file
    assert cfg.training.warmup == 5  # file > default
    assert cfg.training.compile is False  # default
    assert cfg.optimizer.lr == pytest.approx(3e-4)  # YAML 1.1 would read the string "3e-4"
    assert load(Config, None, []) == Config()


def test_validate_hooks_aggregate_across_sections() -> None:
    with pytest.raises(ConfigError) as ei:
        load(Config, None, ["model.dim=65", "training.warmup=20", "model.inner.depth=x"])
    # Type problem in model.inner taints model (and the root): their hooks are skipped,
    # but training's still runs; type problems come first.
    assert errors_of(ei) == [
        "model.inner.depth: expected int, got str 'x'",
        "training.warmup must not exceed steps",
    ]
    with pytest.raises(ConfigError) as ei:
        load(Config, None, ["model.dim=65", "training.warmup=20", "training.steps=0"])
    assert errors_of(ei) == [
        "model: dim (65) must be divisible by n_heads (4)",  # prefixed with its section
        "training.warmup must not exceed steps",  # already dotted: not prefixed
        "training.steps must be > 0",  # root hook runs last
    ]


def test_check_reruns_types_and_hooks() -> None:
    cfg = Config()
    check(cfg)
    cfg.model.dim = 65
    cfg.training.steps = "many"  # type: ignore[assignment]
    with pytest.raises(ConfigError) as ei:
        check(cfg)
    assert errors_of(ei) == [
        "training.steps: expected int, got str 'many'",
        "model: dim (65) must be divisible by n_heads (4)",
    ]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "config file not found: "),
        ("a: [1, 2\n", "invalid YAML at line 2"),
        ("- 1\n- 2\n", "the top level must be a mapping of sections, got list [1, 2]"),
        (
            "training:\n  steps: 1\n  steps: 2\n",
            "invalid YAML at line 3, column 3: found duplicate key 'steps'",
        ),
    ],
)
def test_yaml_file_errors(tmp_path, text: str | None, fragment: str) -> None:
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load(Config, path, [])
    (only,) = errors_of(ei)
    assert str(path) in only and fragment in only


def test_empty_file_is_empty_mapping(tmp_path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert read_yaml(path) == {}


def test_load_reports_file_and_override_problems_together(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("training:\n  steps: ten\n  bogus: 1\n")
    with pytest.raises(ConfigError) as ei:
        load(Config, path, ["model.dimm=3"])
    assert len(errors_of(ei)) == 3
    assert str(path) in str(ei.value).splitlines()[0]


# ------------------------------------------------------------------ docs


def test_field_docs_from_source() -> None:
    docs = field_docs(Model)
    assert docs["dim"] == "Width of the residual stream.\nMust be divisible by n_heads."
    assert docs["kind"] == "Architecture family."
    assert "validate" not in docs
    assert field_docs(Config)["model"] == "Model architecture."


def test_field_docs_inherited_and_undocumented() -> None:
    @dataclass
    class Base:
        a: int = 1
        """From the base."""

    @dataclass
    class Child(Base):
        b: int = 2
        c: int = 3
        """From the child."""

    assert field_docs(Child) == {"a": "From the base.", "c": "From the child."}
    assert undocumented(Child) == ["b"]
    assert undocumented(Config) == []


def test_describe_lists_every_key() -> None:
    text = describe(Config)
    lines = text.splitlines()
    assert "model:" in lines[lines.index("job:") + 5 :]  # sections as headers
    assert "  model.dim: int = 64" in lines
    assert "      Width of the residual stream." in lines
    assert "  model.layer_pattern: list[str] = [cat, dense]" in lines
    assert "  model.kind: 'cat' | 'dense' = cat" in lines
    assert "  model.mode: 'fast' | 'slow' = fast" in lines
    assert "    model.inner.depth: int = 2" in lines
    assert "  training.seed: int | None = null" in lines
    assert "  optimizer.lr: float = 0.001" in lines
    # every leaf key appears
    keys = ["job.name", "job.run_dir", "job.tags", "training.steps", "optimizer.groups"]
    for key in keys:
        assert any(line.strip().startswith(key + ":") for line in lines), key


# ------------------------------------------------------------------ to_dict / YAML


def test_round_trip_dict_and_yaml(tmp_path) -> None:
    cfg = Config()
    cfg.model.mode = Mode.SLOW
    cfg.optimizer.groups = {"emb": 0.1}
    cfg.optimizer.lr = 3e-4
    cfg.job.name = "3e-4"  # a string that our loader would read as a float unless quoted
    cfg.job.run_dir = "yes"
    plain = to_dict(cfg)
    assert plain["model"]["mode"] == "slow"
    assert plain["optimizer"]["betas"] == [0.9, 0.95]
    assert list(plain) == ["job", "model", "training", "optimizer"]
    assert from_dict(Config, plain) == cfg
    yaml.safe_dump(plain)  # YAML-safe

    path = tmp_path / "config.yaml"
    text = dump_yaml(cfg, path)
    assert path.read_text() == text
    assert "# Width of the residual stream." in text
    assert "  layer_pattern: [cat, dense]" in text
    assert text.index("job:") < text.index("model:") < text.index("training:")  # field order
    assert load(Config, path, []) == cfg
    assert "#" not in dump_yaml(cfg, comments=False)


def test_to_dict_rejects_non_dataclass() -> None:
    with pytest.raises(TypeError):
        to_dict({"a": 1})


# ------------------------------------------------------------------ diff / replace_path


def test_diff() -> None:
    a = Config()
    b = replace_path(replace_path(a, "model.dim", 128), "training.steps", 99)
    assert diff(a, b) == {"model.dim": (64, 128), "training.steps": (10, 99)}
    assert diff(a, b, fields=["model"]) == {"model.dim": (64, 128)}
    assert diff(a, a) == {}
    # against a plain dict, e.g. a checkpoint's stored model config
    stored = {"dim": 64, "n_heads": 4, "extra": 1}
    d = diff(a.model, stored)
    assert d["extra"] == (ABSENT, 1)
    assert d["kind"] == ("cat", ABSENT)
    assert "dim" not in d
    assert diff({"x": 1}, {"x": True}) == {"x": (1, True)}


def test_replace_path() -> None:
    a = Config()
    b = replace_path(a, "optimizer.lr", 1)
    assert b.optimizer.lr == 1.0 and isinstance(b.optimizer.lr, float)
    assert a.optimizer.lr == 1e-3  # original untouched
    assert b.model is not a.model  # no aliasing between the copies
    assert replace_path(a, "model.mode", "slow").model.mode is Mode.SLOW
    assert replace_path(a, "model.inner", {"depth": 9}).model.inner == Inner(9)
    assert replace_path(a, "optimizer.groups.emb", 2).optimizer.groups == {"emb": 2.0}
    with pytest.raises(ConfigError) as ei:
        replace_path(a, "model.dimm", 3)
    assert errors_of(ei) == ["unknown key 'model.dimm' (did you mean 'model.dim'?)"]
    with pytest.raises(ConfigError) as ei:
        replace_path(a, "model.dim", "big")
    assert errors_of(ei) == ["model.dim: expected int, got str 'big'"]


def test_config_error_pickles() -> None:
    err = ConfigError(["a", "b"], "f.yaml")
    back = pickle.loads(pickle.dumps(err))
    assert back.errors == ["a", "b"] and str(back) == str(err)
    assert str(ConfigError(["only"])) == "1 problem in config:\n  1. only"


@dataclass
class Positive:
    n: int = 1
    """Positive."""

    def __post_init__(self) -> None:
        if self.n <= 0:
            raise ValueError("n must be positive")


@dataclass
class PostInitRoot:
    p: Positive = field(default_factory=Positive)
    """A section with a __post_init__ check."""
    q: int = 0
    """Another key."""


def test_post_init_errors_are_collected() -> None:
    with pytest.raises(ConfigError) as ei:
        from_dict(PostInitRoot, {"p": {"n": 0}, "q": "x"})
    assert errors_of(ei) == ["p: n must be positive", "q: expected int, got str 'x'"]


def test_unresolvable_annotation_is_a_clear_type_error() -> None:
    @dataclass
    class Local:
        x: int = 1

    @dataclass
    class UsesLocal:
        loc: Local = field(default_factory=Local)  # a string annotation naming a local class

    with pytest.raises(TypeError, match="define config classes at module level"):
        from_dict(UsesLocal, {})


def test_module_exports_exist() -> None:
    for name in confutil.__all__:
        assert hasattr(confutil, name), name


def test_yaml_boolean_words_map_back_to_word_choices(tmp_path) -> None:
    """metrics.progress=off: YAML 1.1 reads `off` as False; the choice 'off' is meant."""
    from cat_titan.config import load_config

    cfg = load_config(None, ["metrics.progress=off", "job.run_dir=x"])
    assert cfg.metrics.progress == "off"
    cfg = load_config(None, ["metrics.progress=on", "job.run_dir=x"])
    assert cfg.metrics.progress == "on"
