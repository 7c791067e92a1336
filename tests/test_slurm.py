"""`python -m launcher slurm` renders valid sbatch files; SLURM_* variables map to torchrun's.

No Slurm and no processes here (but `bash -n`): the rendered text is checked line by line, the
host-list parser and the srun -> torchrun variable mapping on fake environments.
"""

import shlex
import subprocess
from pathlib import Path

import pytest

from launcher.__main__ import main
from launcher.config import ConfigError
from launcher.slurm_env import apply_slurm_env, expand_nodelist, first_host, master_port, slurm_to_torchrun

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a cat's \"big\" day $HOME `x`"


def render(capsys, *argv) -> str:
    rc = main(["slurm", "--random-weights", "--prompt", PROMPT, *argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


def bash_n(text: str) -> None:
    proc = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def generate_argv(text: str) -> list[str]:
    """The arguments after `-m launcher generate` in the rendered srun line, unquoted by the shell's rules."""
    command = text[text.index("-m launcher generate"):].replace("\\\n", " ")
    return shlex.split(command)[3:]


def sbatch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("#SBATCH")]


@pytest.mark.parametrize(
    "nodes, per_node, extra, topo",
    [
        (1, 8, (), (8, 1)),  # one node: the table's 8x1 for 720x1280x129
        (2, 8, (), (8, 2)),  # 16 GPUs: ulysses 8 inside each node, ring 2 across
        (4, 4, (), (4, 4)),  # the rule alone would take ulysses 8 (24 heads): it would span nodes
        (2, 4, ("--ulysses", "2"), (2, 4)),  # explicit and node-local: kept
        (2, 4, ("--ring", "2"), (4, 2)),
    ],
)
def test_rendered_shapes(capsys, nodes, per_node, extra, topo):
    text = render(capsys, "--nodes", str(nodes), "--gpus-per-node", str(per_node), "--partition", "gpu",
                  "--time", "02:00:00", "--seed", "42", *extra)
    bash_n(text)
    assert sbatch_lines(text) == [
        "#SBATCH --job-name=videodit",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={per_node}",
        "#SBATCH --partition=gpu",
        f"#SBATCH --cpus-per-task={4 * per_node}",
        "#SBATCH --time=02:00:00",
        "#SBATCH --output=logs/%x-%j.out",
    ]
    assert text.startswith("#!/bin/bash\n") and "set -euo pipefail" in text
    assert 'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in text
    assert f'--nnodes="$SLURM_NNODES" --nproc-per-node={per_node}' in text
    assert '--rdzv-backend=c10d --rdzv-endpoint="$HEAD:$PORT" --rdzv-id="$SLURM_JOB_ID"' in text
    assert 'OUT=outputs/"$SLURM_JOB_ID"' in text
    u, r = topo
    assert f"ulysses {u} ({u}x{r}) on {nodes * per_node} ranks" in text
    argv = generate_argv(text)
    assert argv[:2] == ["--output-dir", "$OUT"]  # expanded by the shell at run time
    assert argv[-4:] == ["--ulysses", str(u), "--ring", str(r)]
    assert argv[argv.index("--prompt") + 1] == PROMPT  # quoting survives the shell
    assert per_node % u == 0


def test_rule_override_is_explained(capsys):
    text = render(capsys, "--nodes", "4", "--gpus-per-node", "4")
    comment = " ".join(line.removeprefix("# ") for line in text.splitlines() if line.startswith("# "))
    assert "largest ulysses dividing 24 heads and 4 GPUs per node (8x2 would span nodes)" in comment


def test_skip_existing_jobs_write_one_folder_so_a_resubmission_continues(capsys):
    text = render(capsys, "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--preset", "tiny",
                  "--seed", "7", "--skip-existing", "--output-dir", "batch 1")
    bash_n(text)
    assert "OUT='batch 1'\n" in text and '$SLURM_JOB_ID"\nmkdir' not in text
    assert "--skip-existing" in generate_argv(text) and "sbatch` this file again" in text
    plain = render(capsys, "--nodes", "1", "--gpus-per-node", "2", "--device", "cpu", "--preset", "tiny")
    assert "OUT=outputs/\"$SLURM_JOB_ID\"" in plain  # without it: a folder per submission


def test_cpu_job_requests_no_gpus_and_passes_flags_through(capsys, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    text = render(capsys, "--nodes", "2", "--gpus-per-node", "1", "--device", "cpu", "--preset", "tiny",
                  "--steps", "2", "--save-latents", "--output-dir", "my out", "--timeout", "60",
                  "--account", "proj1", "--job-name", "fox")
    bash_n(text)
    lines = sbatch_lines(text)
    assert not any("gpus" in line for line in lines)
    assert "#SBATCH --cpus-per-task=1" in lines and "#SBATCH --account=proj1" in lines
    assert "#SBATCH --job-name=fox" in lines
    assert "OUT='my out'/\"$SLURM_JOB_ID\"" in text
    argv = generate_argv(text)
    for flags in (["--device", "cpu"], ["--preset", "tiny"], ["--steps", "2"], ["--timeout", "60.0"],
                  ["--ulysses", "1", "--ring", "2"]):
        i = argv.index(flags[0])
        assert argv[i:i + len(flags)] == flags
    assert "--save-latents" in argv and "--size" not in argv  # defaults are left to generate
    # -o writes the file; the prompts file is passed as an absolute path (validated here).
    target = tmp_path / "job.sbatch"
    assert main(["slurm", "--prompts-file", str(prompts), "--nodes", "2", "--gpus-per-node", "2",
                 "--device", "cpu", "--preset", "tiny", "-o", str(target)]) == 0
    assert "sbatch" in capsys.readouterr().err
    argv = generate_argv(target.read_text())
    assert argv[argv.index("--prompts-file") + 1] == str(prompts.resolve())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--nodes", "2", "--gpus-per-node", "4", "--ulysses", "8"],
         r"--ulysses 8 on 2 nodes x 4 GPUs: ulysses 8 does not divide --gpus-per-node 4.*valid --ulysses: 4, 2, 1"),
        (["--nodes", "2", "--gpus-per-node", "4", "--ring", "1"],
         r"ulysses 8 does not divide --gpus-per-node 4"),
        (["--nodes", "2", "--gpus-per-node", "4", "--ulysses", "3"],
         r"ulysses 3 does not divide the 8 sequence-parallel GPUs; valid: .* must also divide --gpus-per-node 4"),
        (["--nodes", "2", "--gpus-per-node", "4", "--dp", "3"], r"world size is not divisible by cfg 1 x dp 3"),
        (["--nodes", "0"], r"--nodes 0: must be at least 1"),
        (["--gpus-per-node", "0"], r"--gpus-per-node 0"),
        (["--time", "2 hours"], r"--time '2 hours': valid forms"),
        (["--partition", "gpu a"], r"--partition 'gpu a': letters"),
        (["--frames", "10"], r"--frames 10: the VAE needs 4n\+1 frames"),
    ],
)
def test_bad_jobs_exit_2_naming_the_choices(capsys, tmp_path, argv, message):
    import re

    target = tmp_path / "job.sbatch"
    rc = main(["slurm", "--random-weights", "--prompt", "a cat", *argv, "-o", str(target)])
    err = capsys.readouterr().err
    assert rc == 2 and re.search(message, err), err
    assert not target.exists()


def test_submit_without_sbatch_says_so(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    rc = main(["slurm", "--random-weights", "--prompt", "a cat", "--nodes", "2", "--submit"])
    assert rc == 1
    assert "sbatch is not on PATH" in capsys.readouterr().err
    assert (tmp_path / "slurm-videodit.sbatch").is_file()


def test_submit_calls_sbatch(capsys, tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text('#!/bin/sh\necho "Submitted batch job 123 ($1)"\n')
    fake.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    assert main(["slurm", "--random-weights", "--prompt", "a cat", "--submit", "-o", "j.sbatch"]) == 0
    assert "Submitted batch job 123 (j.sbatch)" in capsys.readouterr().out
    assert (tmp_path / "logs").is_dir()  # Slurm cannot create the log's folder itself


def test_example_file_is_a_rendering(capsys):
    """scripts/slurm/generate.sbatch is what its own 'Rendered by' line renders."""
    path = ROOT / "scripts" / "slurm" / "generate.sbatch"
    text = path.read_text()
    command = text.splitlines()[2].removeprefix("# Rendered by: python -m launcher ")
    assert main(shlex.split(command)) == 0
    rendered = capsys.readouterr().out
    assert rendered.replace("sbatch FILE.sbatch", "sbatch scripts/slurm/generate.sbatch") == text
    bash_n(text)
    bash_n((ROOT / "scripts" / "slurm" / "sweep.sbatch").read_text())


# --------------------------------------------------------------------------------------------
# SLURM_* -> torchrun's variables
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu-a", ["gpu-a"]),
        ("node[01-03,07],gpu-a", ["node01", "node02", "node03", "node07", "gpu-a"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("a[009-010].ib,b", ["a009.ib", "a010.ib", "b"]),
    ],
)
def test_nodelist_expansion(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["node[01-", "node01]", "node[a-b]", ""])
def test_bad_nodelists_raise(bad):
    with pytest.raises(ValueError):
        first_host(bad)


def srun_env(**extra) -> dict[str, str]:
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0",
           "SLURM_STEP_NUM_TASKS": "8", "SLURM_STEP_TASKS_PER_NODE": "2(x4)", "SLURM_JOB_ID": "123456",
           "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[01-10]", "PATH": "/bin"}
    return {**env, **extra}


def test_srun_task_gets_torchrun_variables():
    env = srun_env()
    set_ = apply_slurm_env(env)
    assert set_ == {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000)}
    assert env["RANK"] == "3" and env["PATH"] == "/bin"


def test_job_level_variables_are_the_fallback():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "1", "SLURM_JOB_NODELIST": "localhost",
           "SLURM_TASKS_PER_NODE": "2", "SLURM_JOB_ID": "7", "MASTER_PORT": "29999"}
    assert slurm_to_torchrun(env) == {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2",
                                      "MASTER_ADDR": "localhost", "MASTER_PORT": "29999"}
    assert master_port("39999") == 20000 + 19999 and master_port("") == 20000


@pytest.mark.parametrize(
    "env",
    [
        srun_env(RANK="0", WORLD_SIZE="16"),  # torchrun under srun: its variables win
        {k: v for k, v in srun_env().items() if k != "SLURM_STEP_ID"},  # the batch script itself
        {"PATH": "/bin"},  # no Slurm at all
    ],
)
def test_nothing_changes_outside_an_srun_task(env):
    before = dict(env)
    assert apply_slurm_env(env) == {}
    assert env == before


def test_bad_nodelist_in_a_task_is_a_config_error():
    with pytest.raises(ConfigError, match="SLURM|host list"):
        apply_slurm_env(srun_env(SLURM_STEP_NODELIST="gpu[07-"))


def test_site_setup_memory_and_extra_sbatch_lines(capsys, tmp_path):
    setup = tmp_path / "site.sh"
    setup.write_text("module load cuda/12.4\nsource /opt/conda/bin/activate videodit\n")
    text = render(capsys, "--nodes", "2", "--gpus-per-node", "4", "--mem", "200G", "--sbatch-arg=--qos=high",
                  "--sbatch-arg=--exclusive", "--setup", f"@{setup}")
    head, body = text.split("set -euo pipefail\n", 1)
    assert "#SBATCH --mem=200G\n#SBATCH --qos=high\n#SBATCH --exclusive\n" in head
    assert body.index("module load cuda/12.4\nsource /opt/conda/bin/activate videodit\n") < body.index("srun")
    bash_n(text)
    assert "--sbatch-arg=--qos=high" in text.splitlines()[2]  # the Rendered-by line reproduces it
    for argv, message in ((["--sbatch-arg", "qos high"], "one sbatch option"),
                          (["--setup", f"@{tmp_path / 'none.sh'}"], "cannot read it"),
                          (["--mem", "200 G"], "--mem '200 G'")):
        assert main(["slurm", "--random-weights", "--prompt", "x", *argv]) == 2
        assert message in capsys.readouterr().err
