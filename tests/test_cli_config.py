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
    cfg = _cfg("--prompt", "a cat")
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
