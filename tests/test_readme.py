"""The README's fresh-machine commands are the ones CI runs and name every plugin in the repository."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The indented command lines of the README's "Fresh machine" section, in order."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Fresh machine", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_ci_runs_the_readme_test_command_verbatim():
    run, test = readme_commands()[:2]
    assert run == "pip install torch==2.13.0 -e . && python -m lightq"
    assert test.endswith("&& python -m pytest")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert test in ci, "`.ci/run` must run the README's test command as written"


def test_readme_test_command_installs_every_plugin():
    test = readme_commands()[1]
    plugins = sorted(p.name for p in (REPO / "plugins").iterdir() if (p / "pyproject.toml").is_file())
    assert sorted(re.findall(r"-e plugins/(\S+)", test)) == plugins
    assert "--no-deps" not in test, "plugins declare their kernel library as an extra: nothing to leave out"
