"""The settings reference cannot drift: docs/configuration.md holds what the generator writes from
OPTIONS, every flag --help shows is in it, and each default and example is a value that parses."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from service import config_docs
from service.access import read_keys_file
from service.config import OPTIONS, SECTIONS, Settings, _argument_parser

ROOT = Path(__file__).resolve().parent.parent


def test_committed_reference_is_what_the_generator_writes() -> None:
    page = config_docs.PAGE.read_text(encoding="utf-8")
    assert config_docs.rendered(page) == page, "run `make docs-reference` and commit docs/configuration.md"


def test_every_flag_and_variable_help_shows_is_in_the_reference() -> None:
    help_text = _argument_parser().format_help()
    page = config_docs.PAGE.read_text(encoding="utf-8")
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z-]+", help_text))
    variables = set(re.findall(r"\[([A-Z][A-Z_]+)\]", help_text)) - {"COMMAND"}
    assert len(flags) > len(OPTIONS)  # the settings, --demo, --version, --help
    assert variables == {option.env for option in OPTIONS}
    for name in flags | variables:
        assert f"`{name}`" in page, name
    for command in ("resolve MODEL", "check"):
        assert f"`{command}`" in page


def test_check_fails_when_the_page_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = tmp_path / "configuration.md"
    page = config_docs.PAGE.read_text(encoding="utf-8")
    stale.write_text(page.replace("`--listen-port`", "`--port`"), encoding="utf-8")
    monkeypatch.setattr(config_docs, "PAGE", stale)
    with pytest.raises(SystemExit) as caught:
        config_docs.main(["--check"])
    assert caught.value.code == 1
    config_docs.main([])  # rewrites it
    assert stale.read_text(encoding="utf-8") == page
    config_docs.main(["--check"])


def test_generator_runs_as_a_module_and_finds_the_page_current() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service.config_docs", "--check"], cwd=ROOT, capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.env)
def test_default_parses_to_the_settings_default(option: object) -> None:
    assert isinstance(option, type(OPTIONS[0]))
    assert option.section in SECTIONS
    spec = {f.name: f for f in dataclasses.fields(Settings)}[option.field]
    built = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
    if option.default is None:
        assert built in (None, (), dataclasses.MISSING)
    else:
        assert repr(option.parse(option.default)) == repr(built)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.env)
def test_example_is_a_value_that_parses(option: object) -> None:
    assert isinstance(option, type(OPTIONS[0]))
    if option.parse is read_keys_file:
        pytest.skip("reads the file the example names")
    option.parse(option.example)


def test_help_line_names_the_default_and_the_variable() -> None:
    port = next(option for option in OPTIONS if option.env == "LISTEN_PORT")
    assert port.help_line.endswith("(default 1234) [LISTEN_PORT]")
    url = next(option for option in OPTIONS if option.env == "UPSTREAM_URL")
    assert "(default" not in url.help_line


def test_readme_settings_table_agrees_with_the_code() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([A-Z_]+)` \| ([^|]+) \| `([^`]+)` \|", readme, flags=re.MULTILINE)
    by_env = {option.env: option for option in OPTIONS}
    assert len(rows) == 10
    for env, default, example in rows:
        option = by_env[env]
        assert default.strip() == ("unset" if option.default is None else f"`{option.default}`"), env
        option.parse(example)
