"""The declared dependency floors are the versions CI tests."""

import tomllib
from conftest import REPO_ROOT
from packaging.requirements import Requirement
from packaging.version import Version


def test_ci_tests_exactly_the_declared_floors():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    floors = {}
    for line in declared:
        requirement = Requirement(line)
        lows = [Version(s.version) for s in requirement.specifier if s.operator == ">="]
        if requirement.name != "trl":  # trl is pinned to one minor version, tested as installed
            assert lows, f"{line}: every dependency needs a floor that CI tests"
            floors[requirement.name] = lows[0]
    pinned = {}
    for line in (REPO_ROOT / ".ci" / "floors.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", line
            pinned[requirement.name] = Version(specifier.version)
    assert pinned == floors
