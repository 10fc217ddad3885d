"""The scripts that run only on a GPU machine (scripts/) are checked here, where CI can: a syntax
error found during a short GPU lease costs the lease."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHELL_SCRIPTS = sorted((ROOT / "scripts").glob("*.sh")) + sorted((ROOT / "benchmarks").glob("*.sh"))
PY_SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_parses(script):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", PY_SCRIPTS, ids=lambda p: p.name)
def test_python_script_compiles(script):
    compile(script.read_text(), str(script), "exec")


def test_script_lists_are_not_empty():
    names = {p.name for p in SHELL_SCRIPTS + PY_SCRIPTS}
    assert {"gpu_check.sh", "prebuild_for_gpu_machine.sh", "sanitizer_run.py", "profile_step.py"} <= names


def _profile_step():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import profile_step
    finally:
        sys.path.pop(0)
    return profile_step


def test_profile_step_cases_default_and_reject():
    ps = _profile_step()
    assert ps.parse_case("llama") == ("llama", "fp32", "adam")
    assert ps.parse_case("llama:bf16") == ("llama", "bf16", "adam")
    assert ps.parse_case("many-small:fp32:sgd") == ("many-small", "fp32", "sgd")
    for bad in ("gpt2", "llama:fp16", "llama:fp32:lion", "llama:fp32:adam:x", ""):
        with pytest.raises(Exception, match="expected PRESET"):
            ps.parse_case(bad)


def test_gpu_check_exits_1_when_a_step_failed(tmp_path):
    """gpu_check.sh's step bookkeeping (the functions between `t0=` and `finish`), run on
    commands that pass and fail, in the shell and in a subshell as the sanitizer steps run."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    begin = text.index("t0=$(date +%s)")
    end = text.index("\n}\n", text.index("finish() {")) + 3
    driver = tmp_path / "driver.sh"
    driver.write_text(f'out="{tmp_path}"\n' + text[begin:end] +
                      'step ok 5 true\n(step bad_in_subshell 5 false) & wait\nfinish\n')
    done = subprocess.run(["bash", str(driver)], capture_output=True, text=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert (tmp_path / "failed_steps.txt").read_text() == "bad_in_subshell\n"
    assert "failed: bad_in_subshell" in done.stdout
    (tmp_path / "failed_steps.txt").unlink()
    driver.write_text(f'out="{tmp_path}"\n' + text[begin:end] + "step ok 5 true\nfinish\n")
    done = subprocess.run(["bash", str(driver)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "every step passed" in done.stdout
