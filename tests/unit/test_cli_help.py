"""`--help` text reflows to the terminal's width instead of keeping the source's line breaks."""

import pytest
from typer.testing import CliRunner

from prefcurate.cli import app

COMMANDS = [["ingest"], ["sql"], ["repair"], ["import", "judgments"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_paragraphs_fill_the_terminal_width(command):
    width = 120
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": str(width)}, terminal_width=width)
    assert result.exit_code == 0, result.output
    # the description is the text between the usage line and the first option panel
    description = result.output.split("Usage:", 1)[1].split("╭", 1)[0].splitlines()[1:]
    lines = [line.strip() for line in description]
    paragraphs = [p.strip() for p in "\n".join(lines).split("\n\n") if p.strip()]
    assert len(paragraphs) >= 2, result.output
    for paragraph in paragraphs:
        rows = paragraph.splitlines()
        # every row of a paragraph but its last is filled to near the width: none ends where
        # the docstring's source line happened to end (~90 characters)
        assert all(len(row) > width - 25 for row in rows[:-1]), paragraph
