"""Config: YAML presets, dotted overrides, round-tripping and key-naming errors."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from jaxsae import activations
from jaxsae.checks import check_run
from jaxsae.config import (
    UNIT_ROW_L1,
    Config,
    DataConfig,
    changed_keys,
    config_from_dict,
    is_mutable_on_resume,
    load_config,
)
from jaxsae.errors import ConfigError
from jaxsae.parsing import read_yaml_mapping


def base_tree() -> dict:
    """A valid preset: 24 steps of 256 tokens, relu, mse + l1 (l1 with a warm-up)."""
    return {
        "name": "cfgtest",
        "data": {"path": "/nonexistent/activations", "eval_tokens": 1024},
        "sae": {"d_sae": 64, "activation": "relu", "k": 8, "decoder_norm": "free"},
        "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 5.0, "warmup_steps": 10}],
        "optim": {"lr": 3.0e-4, "batch_size": 256, "total_tokens": 256 * 24, "warmup_steps": 2,
                  "decay_fraction": 0.25},
        "checkpoint": {"every_steps": 8, "keep": 2},
        "log": {"every_steps": 4},
    }


def write_yaml(tmp_path: Path, tree: dict, name: str = "preset.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture
def preset(tmp_path) -> Path:
    return write_yaml(tmp_path, base_tree())


# ---------------------------------------------------------------------------------------------
# Loading and overrides


def test_load_config_reads_yaml_values(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, Config)
    assert cfg.name == "cfgtest"
    assert cfg.data.path == "/nonexistent/activations"
    assert cfg.data.eval_tokens == 1024
    assert cfg.data.shuffle_buffer == DataConfig().shuffle_buffer  # default kept
    assert cfg.sae.d_sae == 64 and cfg.sae.activation == "relu" and cfg.sae.k == 8
    assert cfg.sae.decoder_norm == "free"
    assert [t.term for t in cfg.loss] == ["mse", "l1"]
    assert cfg.loss[0].coefficient == 1.0 and cfg.loss[0].warmup_steps == 0
    assert cfg.loss[1].coefficient == 5.0 and cfg.loss[1].warmup_steps == 10
    assert cfg.optim.total_steps == 24
    assert cfg.checkpoint.keep == 2 and cfg.log.every_steps == 4


def test_load_config_without_file_gives_defaults():
    cfg = load_config(None, ["data.path=/some/dir"])
    assert cfg == Config(data=DataConfig(path="/some/dir"))


@pytest.mark.parametrize("activation", activations.registered())
def test_auto_settings_resolve_by_activation(activation):
    """`auto` decoder_norm and normalize resolve when the config is read, to values each
    registered activation accepts: unit rows for the k activations (sparsify's recipe) and
    matching pursuit, free for the others; normalisation wherever codes are scale invariant
    (the tables in jaxsae.config agree with the registry)."""
    kind = activations.get(activation)
    cfg = load_config(None, ["data.path=/d", f"sae.activation={activation}"])
    assert cfg.sae.decoder_norm == ("unit" if kind.has_k or activation == "relu" else "free")
    assert cfg.sae.init_l0 == "auto"  # (what it gives follows from the rest: jaxsae.sae)
    assert cfg.data.normalize == ("unit_mean_squared_norm" if kind.scale_invariant else "none")
    # k sets the sparsity: no L1 by default (fault testing: TopK trained with L1 at 5.0); the
    # L1 ramps up over 5 % of the run (1000 steps at most), resolved for the run's length
    assert [(t.term, t.warmup_steps) for t in cfg.loss] == (
        [("mse", 0)] if kind.has_k else [("mse", 0), ("l1", "auto")])
    assert [t.warmup_steps for t in cfg.resolved_loss] == ([0] if kind.has_k else [0, 1000])
    short = load_config(None, ["data.path=/d", f"sae.activation={activation}",
                               "optim.total_tokens=1600000"])
    assert short.resolved_loss[-1].warmup_steps == (0 if kind.has_k else 19)  # 390 steps
    assert cfg.defaulted == ("sae.decoder_norm", "sae.init_l0", "loss", "data.normalize")
    # the L1 for unit rows (relu's since 0.3.0) is at their scale, free rows' at theirs
    if not kind.has_k:
        assert cfg.loss[1].coefficient == (UNIT_ROW_L1 if activation == "relu" else 5.0)
    kind.check(cfg.sae)  # (matching pursuit refuses free rows)
    assert load_config(None, ["data.path=/d", f"sae.activation={activation}",
                              "sae.decoder_norm=auto", "data.normalize=auto"]) == cfg


def test_keys_set_are_not_defaulted():
    cfg = load_config(None, ["data.path=/d", "sae.decoder_norm=unit", "data.normalize=none",
                             "loss=[{term: mse}, {term: l1}]"])
    assert (cfg.sae.decoder_norm, cfg.data.normalize, cfg.defaulted) == ("unit", "none",
                                                                          ("sae.init_l0",))
    cfg = load_config(None, ["data.path=/d", "sae.decoder_norm=free", "sae.init_l0=null"])
    assert cfg.defaulted == ("loss", "data.normalize")
    # a config made from another is resolved already: nothing is left to auto
    assert replace(cfg, seed=1).defaulted == () and replace(cfg, seed=1).sae == cfg.sae
    everything = load_config(None, ["data.path=/d"])
    assert replace(everything, seed=1).defaulted == ()  # (review: the SAE's record remained)
    tree = cfg.to_dict()
    assert (tree["sae"]["decoder_norm"], tree["data"]["normalize"]) == ("free",
                                                                       "unit_mean_squared_norm")


def test_dotted_overrides(preset):
    cfg = load_config(preset, ["optim.lr=1e-3", "loss.1.coefficient=2", "sae.d_sae=128"])
    assert cfg.optim.lr == pytest.approx(1e-3) and type(cfg.optim.lr) is float
    assert cfg.loss[1].coefficient == 2.0 and type(cfg.loss[1].coefficient) is float
    assert cfg.loss[1].warmup_steps == 10  # the rest of the item is kept
    assert cfg.loss[0].coefficient == 1.0
    assert cfg.sae.d_sae == 128 and type(cfg.sae.d_sae) is int
    # a list item also as errors name it (fault testing: `loss[1].coefficient`, copied from
    # an error, was an unknown key)
    assert load_config(preset, ["loss[1].coefficient=3"]).loss[1].coefficient == 3.0
    # also of the default terms, and in a sweep (fault testing: "loss: expected a list, got
    # dict"; "sweep.loss[1].coefficient: unknown key")
    assert load_config(None, ["data.path=d", "loss[1].coefficient=3"]).loss[1].coefficient == 3
    assert load_config(None, ["data.path=d", "sweep.loss[1].coefficient=[1, 2]"]).sweep.points \
        == ({"loss.1.coefficient": 1.0}, {"loss.1.coefficient": 2.0})
    # the default terms are the activation's, whatever the order of the overrides
    assert load_config(None, ["loss.0.coefficient=2", "data.path=d", "sae.activation=topk"]
                       ).loss[0].coefficient == 2.0
    with pytest.raises(ConfigError, match="loss"):  # (a TopK config's default has no term 1)
        load_config(None, ["loss.1.coefficient=2", "data.path=d", "sae.activation=topk"])
    assert cfg.sae.activation == "relu"  # siblings in the section are kept
    assert cfg.optim.batch_size == 256


@pytest.mark.parametrize("overrides", [
    ["optim.lr=1e-3", "sae.d_sae=128", "optim.lr=3e-3"],
    ["sweep.optim.lr=[1e-3]", " sweep.optim.lr=[-1]"]])
def test_an_override_given_twice_is_refused(preset, overrides):
    """(fault testing: the last one was taken, silently), as a flag or a YAML key given
    twice is refused"""
    key = overrides[0].split("=")[0]
    want = f"override {key}: given twice ({overrides[0]} and {overrides[-1].strip()}); give it once"
    with pytest.raises(ConfigError, match=f"^{re.escape(want)}$"):
        load_config(preset, overrides)


@pytest.mark.parametrize("overrides", [
    ["sweep.loss.l1.coefficient=[1, 2]", "loss.l1.coefficient=3"],
    ["loss.1.coefficient=3", "sweep.loss.l1.coefficient=[1, 2]"],
    ["sweep.optim.lr=[1e-3, 2e-3]", "optim={lr: 5e-3, batch_size: 512}"],
    ["sweep=[{seed: 1, optim.lr: 1e-3}, {seed: 2}]", "seed=3"]])
def test_an_override_of_a_swept_key_is_refused(overrides):
    """(fault testing: `loss.l1.coefficient=3` beside a sweep of it was dropped unseen, and
    config.yaml recorded the 3 that no SAE trained with)"""
    plain = next(o for o in overrides if not o.startswith("sweep")).split("=")[0]
    with pytest.raises(ConfigError, match=f"^override {re.escape(plain)}: the sweep sets "):
        load_config(None, ["data.path=d", *overrides])
    # what the sweep leaves alone is the base of every SAE
    cfg = load_config(None, ["data.path=d", "sweep.optim.lr=[1e-3, 2e-3]",
                             "optim={batch_size: 512}", "loss=[{term: mse}, {term: l1, "
                             "coefficient: 2}]", "sweep.loss.l1.coefficient=[1, 3]"])
    assert [c.optim.batch_size for c in cfg.sweep_configs()] == [512] * 4
    cfg = load_config(None, ["data.path=d", "sweep=[{optim.lr: 1e-3}, {seed: 2}]",
                             "seed=3"])  # (a point that leaves it out trains it)
    assert [c.seed for c in cfg.sweep_configs()] == [3, 2]


@pytest.mark.parametrize("overrides, why", [
    (["loss.l1.coefficient=2", "loss.1.coefficient=3"], "sets what loss.l1.coefficient=2"),
    (["loss.-1.coefficient=2", "loss[1].coefficient=3"], "sets what loss.-1.coefficient=2"),
    (["optim.lr=1e-3", "optim={lr: 2e-3}"], "replaces what optim.lr=1e-3"),
    (["sae.d_sae=64", "sae={d_sae: 32}"], "replaces what sae.d_sae=64"),
    (["optim={lr: 2e-3}", "optim.lr=1e-3"], "sets what optim={lr: 2e-3}"),
    (["sweep.loss.1.coefficient=[1, 2]", "sweep.loss[1].coefficient=[3]"],
     "sets what sweep.loss.1.coefficient=[1, 2]"),
    (["sweep={optim.lr: [2e-3]}", "sweep.optim.lr=[1e-3]"], "sets what sweep={optim.lr: [2e-3]}"),
    (["loss.0.coefficient=2", "loss=[{term: mse}]"], "replaces what loss.0.coefficient=2")])
def test_a_setting_given_twice_under_two_spellings_is_refused(overrides, why):
    """(fault testing: the last one was taken, silently: the same term by its name and its
    position, a section replaced whole after one of its keys or before it, a sweep's axis
    spelt twice; a term's override before `loss=`, applied after it, won over it)"""
    key = overrides[1]
    with pytest.raises(ConfigError, match=f"^override {re.escape(key.split('=')[0])}"
                                          f": {re.escape(why)} set; give each setting once$"):
        load_config(None, ["data.path=d", *overrides])
    # a section or a list given whole before it is edited where it did not set the key
    assert load_config(None, ["data.path=d", "optim={batch_size: 512}", "optim.lr=1e-3"]
                       ).optim.lr == 1e-3
    assert load_config(None, ["data.path=d", "loss=[{term: mse}, {term: l1}]",
                              "loss.1.coefficient=2"]).loss[1].coefficient == 2.0


def test_negative_list_index_override(preset):
    cfg = load_config(preset, ["loss.-1.coefficient=7"])
    assert cfg.loss[1].coefficient == 7.0


def test_yaml11_exponent_without_dot_is_a_float(preset, tmp_path):
    # YAML 1.1 reads `3e-4` as a string; it is accepted as the number.
    assert yaml.safe_load("3e-4") == "3e-4"
    cfg = load_config(preset, ["optim.lr=3e-4"])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == pytest.approx(3e-4)
    path = tmp_path / "exp.yaml"
    path.write_text(preset.read_text().replace("lr: 0.0003", "lr: 5e-4"))
    assert "lr: 5e-4" in path.read_text()
    assert load_config(path).optim.lr == pytest.approx(5e-4)


def test_integer_written_as_float_notation(preset):
    cfg = load_config(preset, ["optim.total_tokens=1e6"])
    assert cfg.optim.total_tokens == 1_000_000 and type(cfg.optim.total_tokens) is int
    cfg = load_config(preset, ["optim.total_tokens=2_000_000"])
    assert cfg.optim.total_tokens == 2_000_000


def test_resolved_config_round_trips(tmp_path):
    tree = base_tree()
    tree["run_dir"] = str(tmp_path / "run")
    tree["sae"] = {"d_sae": 64, "activation": "topk", "k": 8, "tied": True}
    tree["loss"] = [{"term": "mse"},
                    {"term": "auxk", "coefficient": 0.03125, "k_aux": 16, "dead_tokens": 5000}]
    tree["data"]["generate"] = {"kind": "superposition", "n_features": 32, "d_in": 8}
    path = write_yaml(tmp_path, tree)
    cfg = load_config(path, ["optim.lr=1e-5", "optim.total_tokens=1e6", "seed=3"])
    assert cfg.loss[1].params == {"k_aux": 16, "dead_tokens": 5000}

    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(cfg.to_yaml())
    again = load_config(resolved)
    assert again == cfg
    assert again.to_yaml() == cfg.to_yaml()
    assert changed_keys(cfg, again) == []


def test_default_config_round_trips(tmp_path):
    cfg = Config(data=DataConfig(path="/d"))
    path = tmp_path / "defaults.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


# ---------------------------------------------------------------------------------------------
# Errors name the key


def raises_naming(*fragments: str):
    """pytest.raises(ConfigError) whose message contains every fragment (in order)."""
    return pytest.raises(ConfigError, match=".*".join(re.escape(f) for f in fragments))


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        (["optimizer.lr=1e-3"], ("optimizer", "unknown key", "did you mean 'optim'")),
        (["sae.d_sea=128"], ("sae.d_sea", "unknown key", "did you mean 'd_sae'")),
        (["optim.lr.x=1"], ("optim.lr", "not a mapping")),
        (["sae.d_sae=many"], ("sae.d_sae", "integer")),
        (["sae.d_sae=true"], ("sae.d_sae", "integer")),
        (["sae.d_sae=12.5"], ("sae.d_sae", "integer")),
        (["optim.lr=fast"], ("optim.lr", "number")),
        (["optim.lr=.inf"], ("optim.lr", "finite")),
        (["sae.tied=1"], ("sae.tied", "true or false")),
        (["name=3"], ("name", "string")),
        (["sae.activation=gelu"], ("sae.activation", "relu", "gelu")),
        (["sae.decoder_norm=none"], ("sae.decoder_norm",)),
        (["sae.activation=topk", "sae.k=65"], ("sae.k", "64", "65")),
        (["sae.activation=batchtopk", "sae.k=0"], ("sae.k",)),
        # (fault testing: a negative one trained, its L0 penalty counting latents that
        # never fired until the first update set θ to 0)
        (["sae.activation=jumprelu", "sae.jumprelu_init_threshold=-1"],
         ("sae.jumprelu_init_threshold", ">= 0", "-1")),
        (["sae.d_sae=0"], ("sae.d_sae",)),
        (["loss.1.term=l0"], ("loss[1]", "l0", "jumprelu", "relu")),
        (["loss.1.term=auxk"], ("loss[1]", "auxk", "topk")),
        (["sae.activation=jumprelu", "loss.1.term=auxk"], ("loss[1]", "auxk")),
        (["sae.activation=matching_pursuit", "sae.k=4", "sae.decoder_norm=unit",
          "loss.1.term=auxk"], ("loss[1]", "auxk", "encoder")),  # (it was a KeyError)
        (["loss.1.term=l2"], ("loss[1].term", "unknown loss term", "l2")),
        (["loss.1.foo=3"], ("loss[1].foo", "unknown key")),
        (["loss.0.coefficient=big"], ("loss[0].coefficient", "number")),
        (["loss.1.warmup_steps=-1"], ("loss[1].warmup_steps",)),
        # (fault testing: these trained to exit 0 with the penalty or Adam doing nonsense)
        (["loss.1.warmup_steps=25"], ("loss.l1.warmup_steps", "exceeds the run's 24")),
        # (fault testing: each of two l1 terms was named loss.l1, which addresses neither)
        (["loss=[{term: mse}, {term: l1}, {term: l1, warmup_steps: 25}]"],
         ("loss.2.warmup_steps: the l1 term's", "(e.g. loss.2.warmup_steps=0)")),
        (["loss.1.coefficient=-1"], ("loss[1].coefficient", ">= 0")),
        (["optim.adam_b1=2"], ("optim.adam_b1", "[0, 1)")),
        (["optim.adam_b2=1.0"], ("optim.adam_b2", "[0, 1)")),
        (["sae.activation=topk", "loss.1.term=auxk", "loss.1.k_au=4"],
         ("loss[1].k_au", "did you mean 'k_aux'")),
        (["sae.activation=topk", "loss.1.term=auxk", "loss.1.k_aux=abc"],
         ("loss[1].k_aux", "integer")),
        (["sae.activation=topk", "loss.1.term=auxk", "loss.1.k_aux=65"], ("loss[1].k_aux",)),
        (["sae.activation=jumprelu", "loss.1.term=l0", "loss.1.bandwidth=0"],
         ("loss[1].bandwidth",)),
        # (fault testing: these trained, toward an L0 no token can have)
        (["sae.activation=jumprelu", "loss=[{term: mse}, {term: target_l0, target: 65}]"],
         ("loss[1].target: must be at most sae.d_sae (64)", "got 65")),
        (["sae.activation=jumprelu", "loss.1={term: l0, mode: quadratic, target_l0: 100}"],
         ("loss[1].target_l0: must be at most sae.d_sae (64)", "got 100")),
        (["loss=[]"], ("loss", "at least one")),
        (["data.seed=-1"], ("data.seed", "[0, 2^63)")),
        (["seed=99999999999999999999"], ("seed", "64-bit")),
        (["optim.warmup_steps=20"], ("optim.warmup_steps", "24")),
        (["optim.decay_fraction=0.5", "optim.warmup_steps=13"], ("optim.warmup_steps",)),
        (["optim.total_tokens=100"], ("optim.total_tokens",)),
        (["mesh.model=3"], ("mesh.model",)),
        (["mesh.data=-1", "mesh.model=-1"], ("mesh",)),
        (["data.path="], ("data.path",)),
        (["data.path=''"], ("data.path", "required")),
        (["optim.lr"], ("optim.lr", "key=value")),
        (["loss.5.coefficient=2"], ("loss.5", "out of range")),
        (["loss.2=2"], ("loss.2", "out of range")),
        (["loss.x.coefficient=2"], ("loss.x",)),
        (["sae..d_sae=3"], ("sae..d_sae", "empty")),
        # (fault testing: the next five were a traceback, exit 1, or silently accepted)
        (["data.path=2024"], ("data.path: expected a string, got 2024", "quote it",
                              "data.path=\"'2024'\"")),
        (["optim.lr=\x01"], ("override optim.lr: value is not valid YAML",
                              "unacceptable character")),
        (["optim={lr: 1e-3, lr: 2e-3}"], ("override optim: value is not valid YAML",
                                          "key 'lr' given twice")),
        (["sweep.optim.lr=[1, 2, {a: 1, a: 2}]"], ("override sweep.optim.lr", "given twice")),
        (["sweep={1: [1]}"], ("sweep.1: expected a dotted config key (text)",)),
        (["sweep=[{seed: 1}, {2: 3}]"], ("sweep[1].2: expected a dotted config key",)),
        (["sweep={}"], ("sweep: no SAEs to train (empty sweep)",)),
        (["loss.0.coefficient=0", "loss.1.coefficient=0"],
         ("loss: every term's coefficient is 0",)),
        (["loss=[{term: matryoshka, prefixes: [8, 64], weights: [0, 0]}]"],
         ("loss[0].weights", "not all 0")),
        (["data.drop_norm_above=0.5"], ("data.drop_norm_above: must be >= 1",)),
        # values as YAML spells them (fault testing: None, True, datetime.date(2024, 1, 1))
        (["optim.lr="], ("optim.lr: expected a finite number, got null",)),
        (["optim.lr=yes"], ("optim.lr: expected a number, got true",)),
        (["name=2024-01-01"], ("name: expected a string, got 2024-01-01 (YAML reads 2024-01-01 "
                               "as a date: quote it)",)),
        (["name=yes"], ("name: expected a string, got true (YAML reads yes, no, on, off as "
                        "true or false: quote it)",)),
        # a choice that null turns off names null too (fault testing: "an integer or auto")
        (["sae.init_l0=1.5"], ("sae.init_l0: expected an integer, auto or null, got 1.5",)),
        (["data.lanes=1.5"], ("data.lanes: expected an integer or auto, got 1.5",)),
        (["checkpoint.every_steps=1.5"], ("checkpoint.every_steps: expected an integer or "
                                          "null, got 1.5",)),
        (["data.drop_norm_above=abc"], ("data.drop_norm_above: expected a finite number or "
                                        "null, got 'abc'",)),
        (["log.wandb.mode=foo"], ("log.wandb.mode: must be one of online, offline, disabled "
                                  "or null; got 'foo'",)),
        (["init_from=5"], ("init_from: expected a string or null, got 5 (YAML reads 5 as a "
                           "number: quote it, init_from=\"'5'\")",)),
    ],
)
def test_errors_name_the_key(preset, overrides, fragments):
    with raises_naming(*fragments):  # the schema's checks, then the run's (as `jaxsae train`)
        check_run(load_config(preset, overrides))


def test_valid_combinations_are_accepted(preset):
    # The counterparts of the combination errors above.
    cfg = load_config(preset, ["sae.activation=topk", "sae.k=64", "loss.1.term=auxk",
                               "loss.1.k_aux=32", "loss.1.dead_tokens=100"])
    assert cfg.loss[1].term == "auxk" and cfg.loss[1].params == {"k_aux": 32, "dead_tokens": 100}
    cfg = load_config(preset, ["sae.activation=jumprelu", "loss.1.term=l0",
                               "loss.1.bandwidth=0.01"])
    assert cfg.loss[1].params == {"bandwidth": 0.01}
    assert type(cfg.loss[1].params["bandwidth"]) is float
    cfg = load_config(preset, ["optim.warmup_steps=18"])  # 18 + 6 decay == 24 steps
    assert cfg.optim.warmup_steps == 18


def test_missing_data_path(tmp_path):
    tree = base_tree()
    del tree["data"]
    with raises_naming("data.path", "required"):
        load_config(write_yaml(tmp_path, tree))


def test_missing_file_and_a_directory(tmp_path):
    with raises_naming("nope.yaml", "not found"):
        load_config(tmp_path / "nope.yaml")
    with raises_naming(str(tmp_path), "is a directory; give the config file"):
        load_config(tmp_path)
    fifo = tmp_path / "pipe.yaml"  # (fault testing: a FIFO and /dev/null were "not found")
    os.mkfifo(fifo)
    for path in (fifo, Path(os.devnull)):
        with raises_naming(str(path), "not a regular file (a device or a pipe)"):
            load_config(path)


@pytest.mark.parametrize("text, fragment", [
    ("sae: {d_sae: [\n", "YAML"),
    ("- 1\n- 2\n", "mapping"),
    # plain YAML keeps the second silently
    ("optim:\n  lr: 1.0e-3\n  batch_size: 256\n  lr: 3.0e-4\n",
     "line 4, column 3: key 'lr' given twice (first on line 2)"),
])
def test_bad_yaml_is_refused_naming_the_file(tmp_path, text, fragment):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with raises_naming("bad.yaml", fragment):
        load_config(bad)


def test_a_merges_keys_may_be_overridden(tmp_path):
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: &b {d_sae: 64, k: 4}\nsae:\n  <<: *b\n  k: 8\n")
    assert read_yaml_mapping(merged)["sae"] == {"d_sae": 64, "k": 8}


def test_wrong_type_in_yaml_file(tmp_path):
    tree = base_tree()
    tree["sae"]["d_sae"] = "wide"
    with raises_naming("sae.d_sae", "integer"):
        load_config(write_yaml(tmp_path, tree))
    tree = base_tree()
    tree["sae"] = "topk"
    with raises_naming("sae", "mapping"):
        load_config(write_yaml(tmp_path, tree))
    tree = base_tree()
    tree["loss"] = {"term": "mse"}
    with raises_naming("loss", "list"):
        load_config(write_yaml(tmp_path, tree))
    tree = base_tree()
    tree["loss"] = [{"coefficient": 1.0}]
    with raises_naming("loss[0].term", "missing"):
        load_config(write_yaml(tmp_path, tree))


def test_a_config_built_in_python_takes_paths_and_numpy_scalars(tmp_path):
    """(fault testing, library use: Path("data") was "expected a string", np.int64(64) "an
    integer", np.float32(1e-3) "a finite number")"""
    import numpy as np

    tree = base_tree()
    tree["data"]["path"] = tmp_path / "data"
    tree["run_dir"] = tmp_path / "run"
    tree["sae"]["d_sae"] = np.int64(64)
    tree["optim"] = {**tree.get("optim", {}), "lr": np.float32(1e-3)}
    cfg = config_from_dict(tree)
    assert cfg.data.path == str(tmp_path / "data") and cfg.run_dir == str(tmp_path / "run")
    assert cfg.sae.d_sae == 64 and type(cfg.sae.d_sae) is int
    assert cfg.optim.lr == pytest.approx(1e-3) and type(cfg.optim.lr) is float
    assert "numpy" not in cfg.to_yaml() and "Path" not in cfg.to_yaml()
    # inside settings the schema does not type (a loss term's, data.generate), and arrays
    tree["loss"] = [{"term": "matryoshka", "prefixes": list(np.arange(16, 65, 16))}]
    tree["data"]["generate"] = {"kind": "superposition", "tokens": np.int64(1000)}
    tree["sweep"] = {"optim.lr": np.logspace(-4, -3, 2)}
    cfg = config_from_dict(tree)
    assert cfg.loss[0].to_dict()["prefixes"] == [16, 32, 48, 64]
    assert type(cfg.data.generate["tokens"]) is int
    assert "numpy" not in cfg.to_yaml() and load_config(write_yaml(tmp_path, cfg.to_dict())) == cfg


def test_config_error_is_raised_by_config_from_dict():
    tree = base_tree()
    tree["sae"]["d_sae"] = 0
    with raises_naming("sae.d_sae"):
        config_from_dict(tree)
    tree["sae"]["d_sae"] = 64
    tree["sae"]["activation"] = "gelu"  # the registry's business: checked where a run starts
    with raises_naming("sae.activation", "gelu", "unknown activation"):
        check_run(config_from_dict(tree))


# ---------------------------------------------------------------------------------------------
# Resumption


def test_changed_keys(preset):
    old = load_config(preset)
    assert changed_keys(old, old) == []
    assert changed_keys(old, load_config(preset)) == []
    new = load_config(preset, ["optim.lr=1e-3", "log.every_steps=2", "data.path=/elsewhere"])
    assert changed_keys(old, new) == ["data.path", "optim.lr", "log.every_steps"]
    assert changed_keys(new, old) == ["data.path", "optim.lr", "log.every_steps"]
    coef = load_config(preset, ["loss.1.coefficient=2"])
    assert changed_keys(old, coef) == ["loss.1.coefficient"]  # named as the override names it
    assert not is_mutable_on_resume("loss.1.coefficient")
    fewer = load_config(preset, ["loss=[{term: mse}]"])
    assert changed_keys(old, fewer) == ["loss"]  # another number of terms: the list itself
    gen = load_config(preset, ["data.generate.kind=superposition"])
    assert changed_keys(old, gen) == ["data.generate"]


@pytest.mark.parametrize(
    ("key", "mutable"),
    [
        ("name", True),
        ("run_dir", True),
        ("data.path", True),
        ("data.generate", True),
        ("data.check_finite", True),
        ("log", True),
        ("log.every_steps", True),
        ("checkpoint.keep", True),
        ("optim.total_tokens", True),
        ("optim.lr", False),
        ("optim.batch_size", False),
        ("sae.d_sae", False),
        ("loss", False),
        ("seed", False),
        ("data.seed", False),
        ("data.pathology", False),
        ("logging", False),
        ("optim.total_tokens_x", False),
    ],
)
def test_is_mutable_on_resume(key, mutable):
    assert is_mutable_on_resume(key) is mutable


def test_resume_with_longer_run_only_changes_mutable_keys(preset):
    old = load_config(preset)
    new = load_config(preset, ["optim.total_tokens=12288", "checkpoint.keep=5", "name=other"])
    changed = changed_keys(old, new)
    assert changed == ["name", "optim.total_tokens", "checkpoint.keep"]
    assert all(is_mutable_on_resume(k) for k in changed)
    lr = changed_keys(old, load_config(preset, ["optim.lr=1e-2"]))
    assert not any(is_mutable_on_resume(k) for k in lr)


def test_indexed_override_of_default_loss_list(tmp_path):
    tree = base_tree()
    del tree["loss"]
    cfg = load_config(write_yaml(tmp_path, tree), ["loss.1.coefficient=2"])
    assert [(t.term, t.coefficient) for t in cfg.loss] == [("mse", 1.0), ("l1", 2.0)]


def test_loss_terms_by_name():
    """`loss.<name>.coefficient` (or the term's own name, when one term has it) in overrides
    and sweeps; positions still work; metrics use the name."""
    from jaxsae import penalties

    terms = "loss=[{term: mse}, {term: l1, name: sparsity}, {term: l1}]"
    cfg = load_config(None, ["data.path=d", terms, "loss.sparsity.coefficient=3",
                             "sweep.loss.l1.coefficient=[1, 5]"])
    assert [m.loss[2].coefficient for m in cfg.sweep_configs()] == [1.0, 5.0]
    with pytest.raises(ConfigError, match=r"override loss\.2\.coefficient: the sweep sets "
                                          r"loss\.l1\.coefficient for every SAE"):
        load_config(None, ["data.path=d", terms, "loss.2.coefficient=4",
                           "sweep.loss.l1.coefficient=[1, 5]"])
    terms = "loss=[{term: mse}, {term: l1, name: sparsity, coefficient: 3}, {term: l1}]"
    cfg = load_config(None, ["data.path=d", terms, "loss.2.coefficient=4",
                             "sweep.loss.sparsity.coefficient=[1, 5]"])
    assert [t.coefficient for t in cfg.loss] == [1.0, 3.0, 4.0]
    assert [m.loss[1].coefficient for m in cfg.sweep_configs()] == [1.0, 5.0]
    assert penalties.term_labels(cfg.loss) == ["mse", "sparsity", "l1"]
    assert cfg.term_index("sparsity") == 1 and cfg.term_index("l1") == 2
    assert load_config(None, ["data.path=d", "loss.l1.coefficient=7"]).loss[1].coefficient == 7
    with raises_naming("loss.sparsty", "did you mean 'sparsity'"):
        load_config(None, ["data.path=d", terms, "loss.sparsty.coefficient=1"])
    with raises_naming("sweep.loss.nope.coefficient", "no loss term named 'nope'"):
        load_config(None, ["data.path=d", terms, "sweep.loss.nope.coefficient=[1]"])
    with raises_naming("loss", "two terms are called 'a'"):
        load_config(None, ["data.path=d", "loss=[{term: mse, name: a}, {term: l1, name: a}]"])
    two = "loss=[{term: mse}, {term: l1}, {term: l1}]"
    with raises_naming("loss.l1", "2 items have term 'l1'"):
        load_config(None, ["data.path=d", two, "loss.l1.coefficient=1"])


@pytest.mark.parametrize("name", [".", "..", "a/../b", "/tmp/abs", "", "a//b"])
def test_a_run_name_stays_below_runs(name):
    with pytest.raises(ConfigError, match="name: must be a relative name below runs/"):
        config_from_dict({"name": name, "data": {"path": "d"}, "sae": {"d_sae": 8}})


def test_a_path_from_the_home_directory_is_expanded(tmp_path, monkeypatch):
    """(fault testing: `run_dir: ~/run` in a YAML trained into a directory named `~` below the
    working directory; a shell expands `~` on the command line, YAML does not)"""
    monkeypatch.setenv("HOME", str(tmp_path))
    preset = tmp_path / "c.yaml"
    preset.write_text("run_dir: ~/run\ninit_from: ~/sae\ndata: {path: ~/d, target: ~/t}\n")
    cfg = load_config(preset)
    assert (cfg.run_dir, cfg.init_from, cfg.data.path, cfg.data.target) == tuple(
        str(tmp_path / name) for name in ("run", "sae", "d", "t"))
    assert load_config(None, ["data.path=d~/x"]).data.path == "d~/x"  # (only a leading ~)
