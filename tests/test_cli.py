"""The `jaxsae` command: help, one-line errors, and the whole path with real processes:
synth -> train -> SIGTERM / SIGKILL -> resume -> export -> eval."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from jaxsae import cli, tensorfile
from tests.conftest import small_config_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv", [[], ["synth"], ["synth", "superposition"], ["train"],
                                  ["export"], ["eval"], ["cache"], ["bench"], ["analyze"],
                                  ["stitch"], ["stitch", "compare"], ["stitch", "frankenstein"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    assert "usage: jaxsae" in capsys.readouterr().out


def test_export_help_says_what_data_is_for(capsys):
    """(fault testing: --data was 'activations for the firing frequencies', but every figure
    the export records is measured on it)"""
    with pytest.raises(SystemExit):
        cli.main(["export", "--help"])
    help_text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--data DIR activations to evaluate on: cfg.json's eval_* figures and the" in help_text


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag, capsys):
    import jax

    import jaxsae

    with pytest.raises(SystemExit) as exit_info:
        cli.main([flag])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"jaxsae {jaxsae.__version__} (jax {jax.__version__}, jaxlib ")
    assert len(out.splitlines()) == 1


def test_python_dash_m_runs_the_command(tmp_path):
    """`python -m jaxsae` is the command (for a Python whose scripts are not on PATH): its
    output, and a refusal's exit status 2."""
    env = {**os.environ, "JAXSAE_HUGE_PAGES": "0"}
    done = subprocess.run([sys.executable, "-m", "jaxsae", "--version"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("jaxsae "), done.stderr
    refused = subprocess.run([sys.executable, "-m", "jaxsae", "train", str(tmp_path / "no.yaml")],
                             env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "no.yaml: config file not found" in refused.stderr


def test_the_core_never_imports_torch(tmp_path):
    """The trainer is JAX-only: PyTorch is loaded by `cache` and `eval --model` alone."""
    code = ("import sys; from jaxsae import cli, train, evaluate, export, bench; "
            "cli.parse(['train', 'c.yaml']); cli.parse(['eval', 's', '--model', 'm']); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(all(__import__("importlib").util.find_spec(m) for m in ("torch",)),
                    reason="this environment has the extra `lm`")
def test_cache_without_the_lm_extra_says_how_to_install_it(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("text")
    err = _one_line_error(["cache", "--model", "m", "--layer", "0", "--text",
                           str(tmp_path / "t.txt"), "--tokens", "8", "--out",
                           str(tmp_path / "o")], capsys)
    assert "pip install 'jaxsae[lm]'" in err


def _one_line_error(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"jaxsae {argv[0]}: error: ")
    return err


def test_bad_input_gets_one_line_naming_the_culprit(small_data, tmp_path, capsys):
    assert "nope.yaml" in _one_line_error(["train", str(tmp_path / "nope.yaml")], capsys)
    # (tyro said "Unrecognized options: superpositon")
    assert ("unknown generator 'superpositon' (did you mean 'superposition'?)"
            in _one_line_error(["synth", "superpositon", "--out", str(tmp_path / "s")], capsys))
    assert "Unrecognized options: extra" in _one_line_error(
        ["synth", "superposition", "--out", str(tmp_path / "s"), "extra"], capsys)
    cfg_file = tmp_path / "c.yaml"
    tree = small_config_dict(small_data, tmp_path / "run")
    cfg_file.write_text(yaml.safe_dump({**tree, "optim": {**tree["optim"], "lr_rate": 1}}))
    assert "optim.lr_rate" in _one_line_error(["train", str(cfg_file)], capsys)
    cfg_file.write_text(yaml.safe_dump(tree))
    err = _one_line_error(["train", str(cfg_file), "sae.activation=topk", "sae.k=65"], capsys)
    assert "sae.k" in err
    err = _one_line_error(["train", str(cfg_file), "--no-progress", "sae.activation=topk",
                           "sae.k=65"], capsys)
    assert "sae.k" in err  # overrides may follow flags
    err = _one_line_error(["train", str(cfg_file), "sae.activation=topk", "--no-progress",
                           "sae.k=65"], capsys)
    # on both sides too (fault testing: refused; appending one to a command that ends in a
    # flag is the natural edit); a command without overrides does not take them
    assert "sae.k: must be in 1..sae.d_sae" in err
    assert "Unrecognized options: foo=bar (see --help)" in _one_line_error(
        ["eval", str(tmp_path), "--data", str(small_data), "foo=bar"], capsys)
    err = _one_line_error(["train", str(cfg_file), f"data.path={tmp_path / 'absent'}"], capsys)
    assert "absent" in err
    assert "cfg.json" in _one_line_error(["eval", str(tmp_path), "--data", str(small_data)],
                                         capsys)
    err = _one_line_error(["synth", "superposition", "--out", str(tmp_path / "s"),
                           "--n-features", "many"], capsys)
    assert "--n-features" in err
    # (tyro took the last of a repeated flag silently: `--data a --data b` evaluated b)
    err = _one_line_error(["eval", str(tmp_path), "--data", str(small_data), "--data=x"], capsys)
    assert "--data given twice" in err
    err = _one_line_error(["synth", "superposition", "--out", str(tmp_path / "s"),
                           "--n_features", "8", "--n-features", "9"], capsys)
    assert "--n-features given twice" in err
    err = _one_line_error(["train", str(cfg_file), "--no-progress", "--no-progress"], capsys)
    assert "--no-progress given twice" in err
    # (there is no --progress: tyro names it, rather than a "both given" that implied one)
    err = _one_line_error(["train", str(cfg_file), "--progress", "--no-progress"], capsys)
    assert "unknown option --progress (did you mean --no-progress? see --help)" in err
    # (fault testing: an unknown option before the config was "Missing value for argument
    # 'config'")
    err = _one_line_error(["train", "-x", str(cfg_file)], capsys)
    assert err.endswith("error: unknown option -x (see --help)")
    err = _one_line_error(["eval", str(tmp_path), "--data", str(small_data), "--tokenz", "3"],
                          capsys)
    assert err.endswith("error: unknown option --tokenz (did you mean --tokens? see --help)")
    # (a negative number is a value, not an option: named by the flag's own check)
    err = _one_line_error(["synth", "superposition", "--out", str(tmp_path / "s"),
                           "--n-features", "-3"], capsys)
    assert err.endswith("error: --n-features: must be > 0")
    # a generator's own flags are its options (review: they were called unknown whenever the
    # line failed to parse), and values after a flag that takes one are values
    err = _one_line_error(["synth", "superposition", "--n-features", "100"], capsys)
    assert err.endswith("Missing from jaxsae synth: --out DIR (see --help)")
    err = _one_line_error(["synth", "superposition", "--out", str(tmp_path / "s"),
                           "--n-featurs", "10"], capsys)
    assert err.endswith("unknown option --n-featurs (did you mean --n-features? see --help)")
    err = _one_line_error(["plot", str(tmp_path), "--out", str(tmp_path / "p.png"), "--title",
                           "-x"], capsys)
    assert "unknown option" not in err and "--title" in err
    assert cli.main(["stitch", "compare", "a", "b", "--data", "d", "--threshold", "-1E-3"]) == 2
    assert capsys.readouterr().err.strip().endswith("--out DIR (see --help)")
    assert not (tmp_path / "s").exists()


def _jaxsae(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "jaxsae.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def _train_until_checkpoint(config: Path, run_dir: Path, sig: int) -> subprocess.CompletedProcess:
    """Starts training, waits for the first complete checkpoint, then sends `sig`."""
    proc = _jaxsae("train", str(config), "--no-progress")
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "100").is_dir():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _weights(sae_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in tensorfile.read(sae_dir / "sae_weights.safetensors")
            .items()}


def test_end_to_end_with_interruptions(tmp_path, capsys):
    """Only the runs that are interrupted are subprocesses (signals); the others, the resumes
    included, run in this process (each subprocess start costs seconds of imports and
    compiling)."""
    def run_here(*args: str) -> str:
        assert cli.main(list(args)) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    data = tmp_path / "data dir"  # paths with spaces: the printed hints quote them
    run_here("synth", "superposition", "--out", str(data), "--n-features", "48", "--d-in", "16",
         "--tokens", "32768", "--shard-tokens", "8192", "--no-progress")
    assert (data / "manifest.json").is_file() and (data / "truth.safetensors").is_file()

    def config(name: str) -> Path:
        tree = small_config_dict(data, tmp_path / name)
        tree["sae"]["d_sae"] = 96
        tree["optim"].update(batch_size=512, total_tokens=512 * 700, warmup_steps=20)
        tree["checkpoint"] = {"every_steps": 100, "keep": 2}
        tree["log"] = {"every_steps": 100, "curves": False}  # (drawn where tested:
        # test_curves.py; here they were a third of the test's time)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(tree))
        return path

    # Uninterrupted reference.
    printed = run_here("train", str(config("straight run")), "--no-progress")
    hint = printed.split("evaluate it with: ")[1].splitlines()[0]

    # SIGTERM: saves, exits 143 with a resume hint; the same command finishes the run.
    cfg = config("term")
    stopped = _train_until_checkpoint(cfg, tmp_path / "term", signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Run the same command again to resume" in stopped.stderr
    assert len(stopped.stderr.strip().splitlines()) <= 3, stopped.stderr
    assert "resuming" in run_here("train", str(cfg), "--no-progress")

    # SIGKILL: loses at most the work since the last checkpoint, then resumes exactly.
    cfg = config("kill")
    killed = _train_until_checkpoint(cfg, tmp_path / "kill", signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    run_here("train", str(cfg), "--no-progress")

    reference = _weights(tmp_path / "straight run" / "sae")
    for name in ("term", "kill"):
        got = _weights(tmp_path / name / "sae")
        for key in reference:
            np.testing.assert_array_equal(reference[key], got[key], err_msg=f"{name}: {key}")
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "kill" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(100, 701, 100))

    # Export from the checkpoint and evaluate against the ground truth.
    run_here("export", str(tmp_path / "kill"), "--out", str(tmp_path / "exported"))
    for key, value in _weights(tmp_path / "exported").items():
        np.testing.assert_array_equal(value, reference[key])
    metrics = json.loads(run_here("eval", str(tmp_path / "exported"), "--data", str(data),
                                  "--truth", str(data)))
    # the command train printed runs as printed, on the held-out tokens training evaluated
    # (fault testing: without --tokens it read every token, mostly training tokens)
    command = shlex.split(hint)
    assert command[:2] == ["jaxsae", "eval"] and "--tokens" in command
    hinted = json.loads(run_here(*command[1:], "--no-progress"))
    trained = json.loads((tmp_path / "straight run" / "eval.json").read_text())
    for key in ("tokens", "l0", "mse", "explained_variance", "mcc"):
        assert hinted[key] == pytest.approx(trained[key], rel=1e-5), key
    assert hinted["training_tokens"] == 0
    for key in ("l0", "mse", "explained_variance", "dead_fraction", "mcc", "mmcs"):
        assert key in metrics
    assert metrics["explained_variance"] > 0.5
    assert metrics["mcc"] > 0.5


def test_an_sae_that_learnt_nothing_gets_a_note(small_data, tmp_path, capsys):
    """(fault testing: the defaults on a small data set printed "explained variance -0.1568"
    and nothing more) An SAE none of whose latents fires, or that reconstructs worse than the
    mean token, is followed by a note on what to change; a usable one by none."""
    path = tmp_path / "c.yaml"
    silent = {"sae": {"d_sae": 64, "activation": "jumprelu", "jumprelu_init_threshold": 1e3},
              "freeze": ["threshold"]}  # (thresholds above every pre-activation, kept there)
    for sections, note in [
        ({"loss": [{"term": "mse"}, {"term": "l1", "coefficient": 1000.0}]},
         "note: explained variance below 0: after 24 steps the reconstruction is further from "
         "the tokens than their mean"),
        ({**silent, "loss": [{"term": "mse"}, {"term": "l1", "coefficient": 0.1}]},
         "note: no latent fires on the evaluated tokens: the sparsity penalty outweighs the "
         "reconstruction at this data's scale (lower loss.l1.coefficient).")]:
        tree = small_config_dict(small_data, tmp_path / note[6:14], **sections)
        path.write_text(yaml.safe_dump(tree))
        assert cli.main(["train", str(path), "--no-progress"]) == 0
        err = capsys.readouterr().err
        assert note in err and err.endswith(
            "Loss coefficients are at SAELens's scale, for activations normalised to E|x|^2 = "
            "d_in (data.normalize: unit_mean_squared_norm); this run's are not normalised.\n")
    path.write_text(yaml.safe_dump(small_config_dict(small_data, tmp_path / "usable")))
    assert cli.main(["train", str(path), "--no-progress"]) == 0
    assert "note:" not in capsys.readouterr().err
    # no penalty at the data's scale (a TopK run): no word on normalising
    from jaxsae.commands.train import _degenerate
    from jaxsae.config import config_from_dict

    topk = config_from_dict(small_config_dict(small_data, tmp_path / "t", sae={
        "activation": "topk", "k": 4}, loss=[{"term": "mse"}]))
    assert _degenerate(topk, [{"l0": 0.0, "explained_variance": 0.0}], 5) == (
        "no latent fires on the evaluated tokens.")
    # a sweep's note names its SAEs; normalised data's, no scale (review)
    swept = config_from_dict(small_config_dict(
        small_data, tmp_path / "s", data={"normalize": "unit_mean_squared_norm"},
        sweep={"loss.1.coefficient": [0.1, 9.0]}))
    assert _degenerate(swept, [{"l0": 3.0, "explained_variance": 0.5},
                               {"l0": 0.0, "explained_variance": 0.0}], 5) == (
        "no latent fires on the evaluated tokens (sweep SAE 1: loss.1.coefficient=9.0): the "
        "sparsity penalty outweighs the reconstruction (lower loss.l1.coefficient).")
    # no latent fires and the bias alone is far from the tokens: maybe diverged; tokens that
    # do not vary: said so (fault testing: both blamed only the coefficient)
    assert _degenerate(swept, [{"l0": 0.0, "explained_variance": -358.7},
                               {"l0": 0.0, "explained_variance": -0.5}], 5) == (
        "no latent fires on the evaluated tokens (sweep SAEs 0: loss.1.coefficient=0.1, 1: "
        "loss.1.coefficient=9.0): the sparsity penalty outweighs the reconstruction (lower "
        "loss.l1.coefficient). If the loss in metrics.jsonl grew by orders of magnitude, the "
        "training diverged instead (lower optim.lr).")
    assert _degenerate(topk, [{"l0": 0.0, "explained_variance": None}], 5) == (
        "no latent fires on the evaluated tokens, which do not vary (explained variance "
        "undefined): the held-out tokens are the data's last data.eval_tokens.")
    # worse than the mean with almost no latent firing: the penalty is named too (fault
    # testing: an L1 7x the preset's, L0 0.27, was told only "more tokens, or a higher lr");
    # with many firing (L0 400), not
    assert _degenerate(swept, [{"l0": 0.27, "explained_variance": -1e-4},
                               {"l0": 400.0, "explained_variance": 0.5}], 48) == (
        "explained variance below 0 (sweep SAE 0: loss.1.coefficient=0.1): after 48 steps the "
        "reconstruction is further from the tokens than their mean; a short run may not have "
        "left its start (more tokens, or a higher optim.lr); at L0 0.27 almost no latent "
        "fires: the sparsity penalty may outweigh the reconstruction (lower "
        "loss.l1.coefficient).")
    assert "penalty" not in _degenerate(swept, [{"l0": 400.0, "explained_variance": -3.0},
                                                {"l0": 9.0, "explained_variance": 0.5}], 48)
    # two terms of one kind are named by position, as an override must address them (fault
    # testing: "lower loss.l1.coefficient", which `jaxsae train` refuses as ambiguous)
    twice = config_from_dict(small_config_dict(small_data, tmp_path / "2", loss=[
        {"term": "mse"}, {"term": "l1", "coefficient": 9.0}, {"term": "l1"}]))
    assert "(lower loss.1.coefficient)." in _degenerate(
        twice, [{"l0": 0.0, "explained_variance": 0.0}], 5)
