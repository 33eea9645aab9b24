"""text: budgets read as the x/255 the command line takes."""

from aabl_cli.core.text import in_255ths


def test_in_255ths_names_whole_255ths_only() -> None:
    assert in_255ths(8 / 255) == 8 and in_255ths(2 / 255) == 2 and in_255ths(1.0) == 255
    assert in_255ths(0.03) is None and in_255ths(8.5 / 255) is None
