"""The README's first two commands are the contract with a new user and with CI."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    start = lines.index("```bash")
    block = lines[start + 1: lines.index("```", start + 1)]
    return [line for line in block if line.strip() and not line.startswith("#")]


def test_readme_starts_with_demo_and_test_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    demo, tests = commands
    assert "unsup segment data/samples" in demo and "pip install" in demo
    assert "pytest" in tests and "pip install" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert _readme_commands()[1] in ci.splitlines()


def test_demo_input_exists():
    assert len(list((ROOT / "data" / "samples").glob("*.*"))) >= 4
