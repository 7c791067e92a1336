"""Argument validation: bad input is rejected with a message that says what would be valid."""

import pytest

from launcher.__main__ import main
from launcher.cli import build_parser, run_config_from_args
from launcher.config import ConfigError


def _cfg(*argv):
    return run_config_from_args(build_parser().parse_args(["generate", *argv]))


def test_defaults_come_from_the_preset():
    cfg = _cfg("--preset", "tiny", "--prompt", "a cat")
    assert (cfg.height, cfg.width, cfg.frames, cfg.steps) == (64, 96, 9, 4)
    cfg = _cfg("--prompt", "a cat", "--random-weights")
    assert (cfg.preset, cfg.height, cfg.width, cfg.frames, cfg.steps) == ("hunyuan-video-13b", 720, 1280, 129, 50)
    assert cfg.guidance == 6.0 and cfg.flow_shift == 7.0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--size", "720x1270"], r"width 1270 is not a positive multiple of 16; nearest valid width: 1264 or 1280"),
        (["--size", "8x64"], r"height 8 .* nearest valid height: 16"),
        (["--size", "720by1280"], r"expected HEIGHTxWIDTH"),
        (["--frames", "128"], r"--frames 128: the VAE needs 4n\+1 frames; nearest valid: 125 or 129"),
        (["--frames", "0"], r"nearest valid: 1 or 5"),
        (["--steps", "0"], r"--steps 0: must be at least 1"),
        (["--seed", "-1"], r"--seed -1"),
        (["--dtype", "fp8"], r"--dtype 'fp8'; valid: auto, bf16, fp16, fp32"),
        (["--preset", "huge"], r"--preset 'huge' is unknown; valid: .*tiny"),
        (["--model-dir", "/nonexistent/ckpts"], r"--model-dir /nonexistent/ckpts: no such directory"),
    ],
)
def test_bad_arguments_are_explained(argv, message):
    with pytest.raises(ConfigError, match=message):
        _cfg("--preset", "tiny", "--prompt", "a cat", *argv)


def test_prompts_file_rules(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# comments are skipped\n\na cat\n  a dog  \n")
    assert _cfg("--preset", "tiny", "--prompts-file", str(f)).prompts == ("a cat", "a dog")
    f.write_text("# nothing\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        _cfg("--preset", "tiny", "--prompts-file", str(f))
    with pytest.raises(ConfigError, match="cannot read it"):
        _cfg("--preset", "tiny", "--prompts-file", str(tmp_path / "missing.txt"))
    with pytest.raises(ConfigError, match="no prompt"):
        _cfg("--preset", "tiny")


def test_main_exits_2_with_the_message_and_writes_nothing(tmp_path, capsys):
    rc = main(["generate", "--preset", "tiny", "--prompt", "x", "--frames", "10", "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "error: --frames 10" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["file", "under-a-file", "read-only"])
def test_a_bad_output_dir_is_refused_before_any_step(tmp_path, capsys, kind):
    import os

    if kind == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    target = {"file": tmp_path / "out", "under-a-file": tmp_path / "out" / "videos", "read-only": tmp_path / "ro"}[kind]
    if kind == "read-only":
        target.mkdir()
        target.chmod(0o500)
    else:
        (tmp_path / "out").write_text("not a folder")
    rc = main(["generate", "--preset", "tiny", "--prompt", "x", "--steps", "1", "--device", "cpu",
               "--output-dir", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: --output-dir {target}") and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ro"] if kind == "read-only" else ["out"])


def test_cfg_scale_without_a_negative_prompt_uses_the_release_default():
    from models.hunyuan_video.family import NEGATIVE_PROMPT

    cfg = _cfg("--preset", "tiny", "--prompt", "x", "--cfg-scale", "7.5")
    assert cfg.uses_cfg and cfg.negative_prompt == NEGATIVE_PROMPT
    assert NEGATIVE_PROMPT.startswith("Aerial view, aerial view, overexposed")
    assert _cfg("--preset", "tiny", "--prompt", "x").negative_prompt is None  # no CFG: no negative pass


def test_the_demo_preset_samples_with_cfg_against_the_empty_prompt_it_was_trained_on():
    cfg = _cfg("--preset", "hunyuan-video-demo", "--prompt", "a red circle moves left")
    assert cfg.uses_cfg and cfg.cfg_scale == 5.0 and cfg.negative_prompt == ""
    assert _cfg("--preset", "hunyuan-video-demo", "--prompt", "x", "--cfg-scale", "1").negative_prompt is None


@pytest.mark.parametrize("flags, world, options", [([], 2, [2, 1]), (["--ulysses", "2"], 2, [1]),
                                                   (["--ring", "2"], 2, [1]), (["--ulysses", "2"], 4, [2, 1]),
                                                   (["--cfg", "1"], 2, [1]), ([], 3, [1])])
def test_cfg_in_parallel_only_where_the_given_degrees_leave_ranks_for_it(flags, world, options):
    from launcher.resolve import cfg_options

    cfg = _cfg("--preset", "tiny", "--prompt", "x", "--cfg-scale", "5", *flags)
    assert cfg_options(cfg, world) == options


@pytest.mark.parametrize("argv", [["generate"], ["plan", "--gpus", "2"], ["sweep"],
                                  ["slurm", "--nodes", "1", "--gpus-per-node", "1"]])
def test_flags_are_never_abbreviated_and_typos_get_a_suggestion(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--overwrit"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --overwrit" in err and "did you mean --overwrite?" in err
    with pytest.raises(SystemExit):
        main(["generate", "--preset", "tiny", "--prompt", "x", "--over"])  # not --overwrite
    assert "unrecognized arguments: --over" in capsys.readouterr().err


def test_a_released_preset_needs_weights_or_says_random(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match="is a released model: give --model-dir .* or --random-weights"):
        _cfg("--preset", "hunyuan-video-13b", "--prompt", "x")
    assert _cfg("--preset", "hunyuan-video-13b", "--prompt", "x", "--random-weights").random_weights
    with pytest.raises(ConfigError, match="exclude each other"):
        _cfg("--preset", "tiny", "--prompt", "x", "--random-weights", "--model-dir", str(tmp_path))
    # On the CPU a job that cannot fit is refused up front, with the estimate.
    import launcher.job

    monkeypatch.setattr(launcher.job, "host_memory_bytes", lambda: 2 * 2**30)
    rc = main(["generate", "--preset", "hunyuan-video-2block", "--prompt", "x", "--device", "cpu",
               "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and "on the CPU needs about" in err and "this machine has 2.0 GiB per process" in err
    assert not (tmp_path / "o").exists()
