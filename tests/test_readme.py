import re

from conftest import REPO, load_tool


def test_config_reference_in_readme_matches_the_code():
    tool = load_tool("config_reference")
    text = (REPO / "README.md").read_text()
    assert tool.render(text) == text, "README's config reference is stale: run tools/config_reference.py"


def test_readme_names_only_files_that_exist():
    text = (REPO / "README.md").read_text()
    for path in set(re.findall(r"`((?:jobs|slurm|tools|docs|ddpdiff)/[\w./-]+\.(?:py|sh|yaml|md))`", text)):
        assert (REPO / path).is_file(), path
    for name in re.findall(r"`(\w+\.yaml)`", text):
        assert (REPO / "jobs" / "configs" / name).is_file(), name
