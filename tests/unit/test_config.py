"""Job config: every recipe loads, overrides of every kind apply with the right type, bad input says which field.

Order of precedence: dataclass defaults < TOML file < --section.field=value overrides (later wins).
"""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from lcron_dist.config import JobConfig, load_config, to_dict
from lcron_dist.data import schema

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "configs").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------
# Recipes
# ------------------------------------------------------------------------------------------------


def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    assert {f"{size}-{n}stage.toml" for size in ("tiny", "small", "recflow") for n in (2, 3)} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_validates(recipe: Path) -> None:
    config = load_config(recipe)
    config.validate()
    # Every value written in the file made it into the config with its type.
    with open(recipe, "rb") as f:
        data = tomllib.load(f)
    resolved = to_dict(config)
    for section, fields in data.items():
        for key, value in fields.items():
            assert resolved[section][key] == value, f"{recipe.name}: {section}.{key}"
            assert type(resolved[section][key]) is type(value)
    # The file name says the cascade setting.
    assert config.model.num_stages == (3 if "3stage" in recipe.stem else 2)
    assert config.model.num_stages in schema.SERVING_QUOTAS
    if config.data.train_days:
        days = schema.parse_days(config.data.train_days)
        assert dt.date.fromisoformat(config.data.test_day) > days[-1]


def test_defaults_without_file() -> None:
    config = load_config(None)
    assert config == JobConfig()
    assert config.loss.name == "lcron" and config.loss.options == {}
    assert config.optim.lr == 0.01 and config.model.emb_dim == 8


# ------------------------------------------------------------------------------------------------
# Overrides of each kind
# ------------------------------------------------------------------------------------------------


def test_overrides_typed() -> None:
    config = load_config(
        REPO / "configs" / "tiny-2stage.toml",
        [
            "--data.batch_size=32",
            "--optim.lr=0.005",
            "--optim.weight_decay=1e-4",
            "--run.progress=false",
            "--model.compile=True",
            "--run.dir=/tmp/some run",
            "--loss.name=bce",
            "--model.dssm_hidden=64,32,8",
            "--model.mlp_hidden=16",
            "--data.train_days=2024-01-13:2024-02-03",
            "--data.test_day=2024-02-04",
            "--model.num_stages=3",
        ],
    )
    assert config.data.batch_size == 32 and type(config.data.batch_size) is int
    assert config.optim.lr == 0.005 and type(config.optim.lr) is float
    assert config.optim.weight_decay == 1e-4
    assert config.run.progress is False
    assert config.model.compile is True
    assert config.run.dir == "/tmp/some run"
    assert config.loss.name == "bce"
    assert config.model.dssm_hidden == [64, 32, 8] and all(type(v) is int for v in config.model.dssm_hidden)
    assert config.model.mlp_hidden == [16]
    assert config.data.train_days == "2024-01-13:2024-02-03"
    assert len(schema.parse_days(config.data.train_days)) == 22
    assert config.data.test_day == "2024-02-04"
    assert config.model.num_stages == 3
    # Fields not overridden keep the file's values.
    assert config.data.eval_batch_size == 256 and config.model.din_hidden == [32, 16]


def test_float_field_accepts_integer_text() -> None:
    config = load_config(None, ["--optim.lr=1", "--optim.grad_clip=5"])
    assert config.optim.lr == 1.0 and type(config.optim.lr) is float
    assert config.optim.grad_clip == 5.0 and type(config.optim.grad_clip) is float


def test_loss_options_typed() -> None:
    config = load_config(
        None,
        [
            "--loss.options.tau=20",
            "--loss.options.q=0.5",
            "--loss.options.scale=1e-3",
            "--loss.options.normalize=true",
            "--loss.options.weighting=uncertainty",
            "--loss.options.grid=1,2.5,x",
        ],
    )
    options = config.loss.options
    assert options["tau"] == 20 and type(options["tau"]) is int
    assert options["q"] == 0.5 and type(options["q"]) is float
    assert options["scale"] == pytest.approx(1e-3)
    assert options["normalize"] is True
    assert options["weighting"] == "uncertainty"
    assert options["grid"] == [1, 2.5, "x"]
    float_tau = load_config(None, ["--loss.options.tau=20.0"]).loss.options["tau"]
    assert float_tau == 20.0 and type(float_tau) is float


def test_loss_options_merge_file_and_cli(tmp_path: Path) -> None:
    path = write(tmp_path, '[loss]\nname = "lcron"\n[loss.options]\ntau = 50.0\nq = 0.1\n')
    assert load_config(path).loss.options == {"tau": 50.0, "q": 0.1}
    config = load_config(path, ["--loss.options.tau=20"])
    assert config.loss.options == {"tau": 20, "q": 0.1}  # tau replaced, q kept from the file
    # The default options dict is not shared between configs.
    assert load_config(None).loss.options == {}


def test_override_order_file_then_cli(tmp_path: Path) -> None:
    path = write(tmp_path, "[data]\nbatch_size = 7\neval_batch_size = 9\n[optim]\nlr = 0.5\n")
    from_file = load_config(path)
    assert (from_file.data.batch_size, from_file.data.eval_batch_size, from_file.optim.lr) == (7, 9, 0.5)
    assert from_file.data.batch_size != JobConfig().data.batch_size  # the file beats the default
    config = load_config(path, ["--data.batch_size=3"])
    assert config.data.batch_size == 3  # the command line beats the file
    assert config.data.eval_batch_size == 9 and config.optim.lr == 0.5  # the rest of the file stays
    # The last of two overrides of one field wins.
    assert load_config(path, ["--data.batch_size=3", "--data.batch_size=4"]).data.batch_size == 4
    # An override may fix a value the file gets wrong: validation runs after the overrides.
    bad = write(tmp_path, "[data]\nbatch_size = 0\n")
    with pytest.raises(ValueError, match="data.batch_size"):
        load_config(bad)
    assert load_config(bad, ["--data.batch_size=2"]).data.batch_size == 2


def test_to_dict_round_trip() -> None:
    config = load_config(REPO / "configs" / "tiny-3stage.toml", ["--loss.options.tau=20"])
    data = to_dict(config)
    assert data["model"]["num_stages"] == 3 and data["loss"]["options"] == {"tau": 20}
    assert JobConfig(**{k: type(getattr(config, k))(**v) for k, v in data.items()}) == config


# ------------------------------------------------------------------------------------------------
# Bad input: ValueError naming the field
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides,field",
    [
        (["--nosuch.x=1"], "nosuch"),
        (["--data.nosuch=1"], "data.nosuch"),
        (["--data.batch_size=abc"], "data.batch_size"),
        (["--data.batch_size=1.5"], "data.batch_size"),
        (["--optim.lr=fast"], "optim.lr"),
        (["--run.progress=maybe"], "run.progress"),
        (["--model.dssm_hidden=64,x"], "model.dssm_hidden"),
        (["--loss.options=5"], "loss.options"),
        (["--run.dir.sub=5"], "run.dir"),
        (["--data.batch_size=0"], "data.batch_size"),
        (["--data.eval_batch_size=-1"], "data.eval_batch_size"),
        (["--model.num_stages=4"], "model.num_stages"),
        (["--model.num_stages=1"], "model.num_stages"),
        (["--model.emb_dim=0"], "model.emb_dim"),
        (["--model.din_hidden=32,0"], "model.din_hidden"),
        (["--run.log_every=0"], "run.log_every"),
        (["--optim.lr=0"], "optim.lr"),
        (["--optim.name=sgd"], "optim.name"),
        (["--optim.grad_clip=-1"], "optim.grad_clip"),
        (["--train.max_steps_per_day=-1"], "train.max_steps_per_day"),
        (["--parallelism.zero_stage=4"], "parallelism.zero_stage"),
        (["--parallelism.sharding=row_wyse"], "parallelism.sharding"),
        (["--parallelism.table_sharding.video_id=rows"], "parallelism.table_sharding.video_id"),
        (["--parallelism.table_optimizer=lamb"], "parallelism.table_optimizer"),
        (["--data.reader=s3"], "data.reader"),
        (["--data.train_days=2024-13-01"], "data.train_days"),
        (["--data.train_days=2024-02-03:2024-01-13"], "data.train_days"),
        (["--data.test_day=yesterday"], "data.test_day"),
        (["--checkpoint.keep=1"], "checkpoint.keep"),
        (["--checkpoint.every_steps=-5"], "checkpoint.every_steps"),
        (["--checkpoint.resume="], "checkpoint.resume"),
    ],
)
def test_bad_override_names_field(overrides: list[str], field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(None, overrides)


@pytest.mark.parametrize("override", ["--data.batch_size", "data.batch_size=3", "--batch_size=3", "-x=1"])
def test_malformed_override(override: str) -> None:
    with pytest.raises(ValueError, match="section"):
        load_config(None, [override])


def test_malformed_override_names_it() -> None:
    with pytest.raises(ValueError, match="--data.batch_size"):
        load_config(None, ["--data.batch_size"])


@pytest.mark.parametrize(
    "text,field",
    [
        ("[nosuch]\nx = 1\n", "nosuch"),
        ("[data]\nbatchsize = 64\n", "data.batchsize"),
        ('[data]\nbatch_size = "many"\n', "data.batch_size"),
        ("[data]\nbatch_size = 1.5\n", "data.batch_size"),  # no silent truncation to 1
        ("[data]\nbatch_size = true\n", "data.batch_size"),  # a bool is not an int
        ("[optim]\nlr = true\n", "optim.lr"),
        ("[run]\ndir = 5\n", "run.dir"),  # not silently "5"
        ('[run]\nprogress = "sometimes"\n', "run.progress"),
        ("[model]\ndssm_hidden = 64\n", "model.dssm_hidden"),
        ('[model]\ndssm_hidden = ["a"]\n', "model.dssm_hidden"),
        ("[loss]\noptions = 3\n", "loss.options"),
        ("run = 5\n", "run"),  # a section must be a table
        ("[data]\nbatch_size = 0\n", "data.batch_size"),
        ("[model]\nnum_stages = 4\n", "model.num_stages"),
    ],
)
def test_bad_file_names_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(write(tmp_path, text))


def test_bad_file_itself(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ValueError, match="not valid TOML"):
        load_config(write(tmp_path, "[data\nbatch_size = 1\n"))


def test_sections_validate_on_construction() -> None:
    from lcron_dist.config.job_config import DataConfig, ModelConfig

    with pytest.raises(ValueError, match=r"model\.num_stages"):
        ModelConfig(num_stages=4)
    with pytest.raises(ValueError, match=r"data\.batch_size"):
        DataConfig(batch_size=0)
    # JobConfig.validate catches a value set after construction.
    config = JobConfig()
    config.model.num_stages = 5
    with pytest.raises(ValueError, match=r"model\.num_stages"):
        config.validate()
