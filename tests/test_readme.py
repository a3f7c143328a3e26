"""The README's commands are the ones CI runs, and every CLI command it shows exists."""

import re

from conftest import ROOT


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_exactly_the_readme_test_command():
    install_and_run, install_and_test = readme_commands()[:2]
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert ci[-1] == install_and_test.strip()
    assert install_and_run.strip().endswith("distill run recipes/quickstart.yaml")


def test_readme_names_every_cli_command():
    from distill.cli import COMMANDS

    text = (ROOT / "README.md").read_text()
    for name in COMMANDS:
        assert f"distill {name}" in text, name
